//! What a member knows of its peers' reachability over the data plane: an idle healthy peer is
//! pinged and never silent for long, a peer whose process is gone (its port refuses) is reported
//! refused at once, a silent host is reported silent but not refused, and a one-way cut makes
//! each side silent to the other (no round trip works), although one side's frames still arrive.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use grapevine_net::{Net, PeerReachability};

const PING: Duration = Duration::from_millis(100);

async fn pinging(node: &str) -> Net {
    let mut config = config(node, 1);
    config.ping_interval = Some(PING);
    config.reconnect_backoff_max = Duration::from_millis(200);
    config.connect_timeout = Duration::from_millis(500);
    let net = start_with(config).await;
    net.register(ECHO, echo());
    net
}

fn of(net: &Net, peer: &grapevine_membership::MemberId) -> PeerReachability {
    net.reachability().into_iter().find(|r| &r.member == peer).expect("the peer is listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_healthy_peer_is_pinged_and_never_silent_for_long() {
    let (a, b) = (pinging("a").await, pinging("b").await);
    introduce(&a, &b);
    eventually("a connection from the pings alone", || a.stats().connections_open == 1).await;
    let pings_before = a.stats().frames_out;
    for _ in 0..10 {
        tokio::time::sleep(PING).await;
        let r = of(&a, b.local());
        assert!(r.silent_for < PING * 10, "an idle but healthy peer looked silent: {r:?}");
        assert_eq!(r.refused_for, None);
    }
    assert!(a.stats().frames_out > pings_before, "pings were sent while idle");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_port_refuses_is_reported_refused() {
    let (a, b) = (pinging("a").await, pinging("b").await);
    introduce(&a, &b);
    eventually("connected", || a.stats().connections_open == 1).await;
    let b_id = b.local().clone();
    b.shutdown().await;
    eventually("the peer reported refused", || of(&a, &b_id).refused_for.is_some()).await;
    // A request now fails without being sent.
    let err = within("request", a.request(&b_id, ECHO, Bytes::new(), LONG)).await.unwrap_err();
    assert!(err.to_string().contains("not sent") || err.to_string().contains("refused"), "{err}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_is_silent_but_not_refused() {
    let a = pinging("a").await;
    // Accepts TCP connections but never answers the handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let ghost = member("ghost", 1);
    a.set_peer_address(ghost.clone(), silent_addr);
    eventually("silence noticed", || of(&a, &ghost).silent_for > PING * 5).await;
    assert_eq!(of(&a, &ghost).refused_for, None, "a host that accepts is not refusing");
    accepted.abort();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_silences_each_side_to_the_other() {
    let (a, b) = (pinging("a").await, pinging("b").await);
    introduce(&a, &b);
    within("echo", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    // a hears nothing from b; a's frames (its pings among them) still reach b.
    let frames_at_b = b.stats().frames_in;
    a.faults().drop_inbound(b.local(), true);
    eventually("b looks silent to a", || of(&a, b.local()).silent_for > PING * 5).await;
    eventually("a looks silent to b too", || of(&b, a.local()).silent_for > PING * 5).await;
    assert!(b.stats().frames_in > frames_at_b, "a's frames kept arriving at b meanwhile");
    let err = within("request", a.request(b.local(), ECHO, Bytes::new(), Duration::from_millis(300))).await;
    assert!(err.is_err(), "the response cannot arrive through the cut");
    a.faults().drop_inbound(b.local(), false);
    within("echo after the heal", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
