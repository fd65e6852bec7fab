//! Handshake refusals name both sides' values.

mod common;

use bytes::Bytes;
use common::*;
use grapevine_membership::ProtocolVersion;
use grapevine_net::{NetConfig, NetError};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_name_mismatch_is_rejected_naming_both_clusters() {
    let a = start_with(NetConfig::new("alpha", member("a", 1), V1)).await;
    let b = start_with(NetConfig::new("beta", member("b", 1), V1)).await;
    b.register(ECHO, echo());
    a.set_peer_address(b.local().clone(), b.local_addr());
    let err = within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, NetError::Rejected { .. }), "{message}");
    assert!(message.contains("\"alpha\"") && message.contains("\"beta\""), "{message}");
    assert_eq!(a.stats().handshakes_rejected, 1);
    eventually("acceptor counted the refusal", || b.stats().handshakes_rejected == 1).await;
    assert_eq!(b.stats().connections_open, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn major_version_mismatch_is_rejected_naming_both_versions() {
    let a = start("a", 1).await;
    let b = start_with(NetConfig::new(CLUSTER, member("b", 1), ProtocolVersion { major: 2, minor: 0 })).await;
    b.register(ECHO, echo());
    a.set_peer_address(b.local().clone(), b.local_addr());
    let err = within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, NetError::Rejected { .. }), "{message}");
    assert!(message.contains("speaks 1.0") && message.contains("speaks 2.0"), "{message}");
    assert!(message.contains("upgrade all members"), "{message}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minor_version_difference_is_accepted() {
    let a = start("a", 1).await;
    let b = start_with(NetConfig::new(CLUSTER, member("b", 1), ProtocolVersion { major: 1, minor: 7 })).await;
    b.register(ECHO, echo());
    introduce(&a, &b);
    within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    within("reverse request", b.request(a.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_restarted_peer_is_rejected_naming_expected_and_actual_member() {
    let a = start("a", 1).await;
    let old = start("b", 1).await;
    let addr = old.local_addr();
    a.set_peer_address(old.local().clone(), addr);
    within("request", a.request(old.local(), ECHO, Bytes::new(), LONG)).await.unwrap();

    // "b" restarts on the same port as a new member (generation 2).
    let old_id = old.local().clone();
    old.shutdown().await;
    eventually("a noticed the closed connection", || a.stats().connections_open == 0).await;
    let new = grapevine_net::Net::start(config("b", 2), TcpListener::bind(addr).await.unwrap());
    new.register(ECHO, echo());

    let err = within("request", a.request(&old_id, ECHO, Bytes::new(), LONG)).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, NetError::Rejected { .. }), "{message}");
    assert!(message.contains("b@1") && message.contains("b@2"), "{message}");
    assert_eq!(new.stats().connections_open, 0);
    a.shutdown().await;
    new.shutdown().await;
}
