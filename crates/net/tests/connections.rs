//! Connection management: simultaneous dials, broken connections, local ports, dropped frames.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use grapevine_net::{Net, NetError};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

async fn all_succeed(from: &Net, to: &Net, n: u64, results: &mut JoinSet<Result<Bytes, NetError>>) {
    for i in 0..n {
        results.spawn(from.request(to.local(), ECHO, Bytes::copy_from_slice(&i.to_be_bytes()), LONG));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_end_with_one_connection_and_no_failed_request() {
    // Several rounds, as the interleavings differ from run to run.
    for round in 0..5 {
        let (a, b) = (start("a", round).await, start("b", round).await);
        introduce(&a, &b);
        let mut results = JoinSet::new();
        // Both sides enqueue (and so start dialing) before either dial can have completed.
        results.spawn(a.request(b.local(), ECHO, Bytes::new(), LONG));
        results.spawn(b.request(a.local(), ECHO, Bytes::new(), LONG));
        all_succeed(&a, &b, 99, &mut results).await;
        all_succeed(&b, &a, 99, &mut results).await;
        let mut ok = 0;
        while let Some(joined) = within("responses", results.join_next()).await {
            joined.unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            ok += 1;
        }
        assert_eq!(ok, 200);
        eventually("exactly one connection on each side", || {
            a.stats().connections_open == 1 && b.stats().connections_open == 1
        })
        .await;
        // And it is the same one: traffic in both directions still flows over it.
        within("a→b", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
        within("b→a", b.request(a.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
        assert_eq!((a.stats().connections_open, b.stats().connections_open), (1, 1));
        a.shutdown().await;
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn severed_connection_fails_in_flight_requests_and_later_ones_reconnect() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let in_flight: Vec<_> = (0..5).map(|_| a.request(b.local(), SLOW, Bytes::new(), LONG)).collect();
    eventually("requests reached the handler", || gate.received() == 5).await;
    a.faults().sever(b.local());
    for r in in_flight {
        let err = within("severed request", r).await.unwrap_err();
        assert!(matches!(&err, NetError::ConnectionLost { peer } if peer == b.local()), "{err}");
    }
    within("request after sever", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    within("reverse request after sever", b.request(a.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    eventually("one connection again", || a.stats().connections_open == 1 && b.stats().connections_open == 1).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_a_severed_connection_in_order() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    within("connect", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    // Sever, then send at once: what is queued goes out on the next connection.
    a.faults().sever(b.local());
    let responses: Vec<_> = (0..20u8).map(|i| a.request(b.local(), ECHO, Bytes::from(vec![i]), LONG)).collect();
    for (i, r) in responses.into_iter().enumerate() {
        assert_eq!(within("request", r).await.unwrap(), Bytes::from(vec![i as u8]));
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_connections_use_a_port_of_the_configured_range() {
    let acceptor = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = free_port();
    let mut config = config("a", 1);
    config.outbound_ports = Some(port..=port.saturating_add(2));
    let a = start_with(config).await;
    let peer = member("b", 1);
    a.set_peer_address(peer.clone(), acceptor.local_addr().unwrap());
    a.send(&peer, ECHO, Bytes::new()).unwrap();
    let (_stream, remote) = within("accept", acceptor.accept()).await.unwrap();
    assert!((port..=port.saturating_add(2)).contains(&remote.port()), "dialed from {remote}, range starts at {port}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_outbound_port_range_is_not_sent_naming_the_range() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut config = config("a", 1);
    config.outbound_ports = Some(port..=port);
    let a = start_with(config).await;
    let b = start("b", 1).await;
    a.set_peer_address(b.local().clone(), b.local_addr());
    let err = within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, NetError::NotSent { .. }), "{message}");
    assert!(message.contains(&format!("{port}..={port}")), "{message}");
    drop(taken);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_outbound_frames_time_out_until_the_fault_is_lifted() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let gate = Gate::default();
    gate.open();
    b.register(SLOW, gate.handler());
    a.faults().drop_outbound(b.local(), Some(ECHO), true);
    let err =
        within("dropped", a.request(b.local(), ECHO, Bytes::new(), Duration::from_millis(200))).await.unwrap_err();
    assert!(matches!(err, NetError::Timeout { .. }), "{err}");
    // Other services are unaffected.
    within("other service", a.request(b.local(), SLOW, Bytes::new(), LONG)).await.unwrap();
    a.faults().drop_outbound(b.local(), Some(ECHO), false);
    within("after lifting", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_refuses_more_messages() {
    // A peer that accepts TCP but never answers the handshake: everything stays queued.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config("a", 1);
    config.queue_bytes_max = 10_000;
    let a = start_with(config).await;
    let peer = member("silent", 1);
    a.set_peer_address(peer.clone(), silent.local_addr().unwrap());
    let body = Bytes::from(vec![0u8; 1000]);
    let mut sent = 0;
    let err = loop {
        match a.send(&peer, ECHO, body.clone()) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "the queue cap is not enforced");
    };
    assert!(matches!(err, NetError::QueueFull { bytes_max: 10_000, .. }), "{err}");
    assert!(sent >= 9, "only {sent} messages fit");
    a.shutdown().await;
}
