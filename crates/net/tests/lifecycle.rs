//! Forgetting peers, size limits and shutdown.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use grapevine_net::NetError;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_peer_fails_its_queued_and_pending_requests_saying_which_may_have_been_handled() {
    // Queued: the peer accepts TCP but never answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = start("a", 1).await;
    let stuck = member("silent", 1);
    a.set_peer_address(stuck.clone(), silent.local_addr().unwrap());
    let queued = a.request(&stuck, ECHO, Bytes::new(), LONG);
    let _accepted = within("dial arrives", silent.accept()).await.unwrap();
    a.forget_peer(&stuck);
    let err = within("queued request", queued).await.unwrap_err();
    assert!(matches!(&err, NetError::PeerGone { peer } if *peer == stuck), "{err}");

    // Pending: written and being handled.
    let b = start("b", 1).await;
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let pending = a.request(b.local(), SLOW, Bytes::new(), LONG);
    eventually("request handled", || gate.received() == 1).await;
    a.forget_peer(b.local());
    // It was written and b's handler runs: "may have been handled", so a caller does not send a
    // write again that b applied.
    let err = within("pending request", pending).await.unwrap_err();
    assert!(matches!(err, NetError::ConnectionLost { .. }), "{err}");
    eventually("connection closed", || a.stats().connections_open == 0).await;
    let err = a.send(b.local(), ECHO, Bytes::new()).unwrap_err();
    assert!(matches!(err, NetError::UnknownPeer { .. }), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_frame_bytes_max_is_refused_before_anything_is_sent() {
    let mut config = config("a", 1);
    config.frame_bytes_max = 1024;
    let a = start_with(config).await;
    let b = start("b", 1).await;
    introduce(&a, &b);
    let body = Bytes::from(vec![0u8; 2000]);
    let err = a.send(b.local(), ECHO, body.clone()).unwrap_err();
    assert!(matches!(err, NetError::FrameTooLarge { size: 2010, max: 1024 }), "{err}");
    assert!(err.to_string().contains("raise net.frame_bytes_max"), "{err}");
    let err = within("request", a.request(b.local(), ECHO, body, LONG)).await.unwrap_err();
    assert!(matches!(err, NetError::FrameTooLarge { .. }), "{err}");
    // Nothing was sent, not even a connection opened.
    assert_eq!(a.stats().connections_open, 0);
    assert_eq!(a.stats().frames_out, 0);
    // The largest body that fits goes through.
    let fits = Bytes::from(vec![1u8; 1024 - 10]);
    assert_eq!(within("request", a.request(b.local(), ECHO, fits.clone(), LONG)).await.unwrap(), fits);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_over_the_responders_frame_bytes_max_is_an_error_not_a_hang() {
    let a = start("a", 1).await;
    let mut config = config("b", 1);
    config.frame_bytes_max = 1024;
    let b = start_with(config).await;
    introduce(&a, &b);
    b.register(ECHO, handler(|_, _, _| grapevine_net::Reply::Now(Bytes::from(vec![0u8; 5000]))));
    let err = within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap_err();
    assert!(matches!(err, NetError::Remote { .. }) && err.to_string().contains("frame_bytes_max"), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_pending_requests_as_possibly_handled_and_finishes() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let pending = a.request(b.local(), SLOW, Bytes::new(), LONG);
    eventually("request handled", || gate.received() == 1).await;
    within("shutdown of a", a.shutdown()).await;
    // Written and being handled by b: it may have been handled.
    let err = within("pending request", pending).await.unwrap_err();
    assert!(matches!(err, NetError::ConnectionLost { .. }), "{err}");
    assert!(matches!(a.send(b.local(), ECHO, Bytes::new()), Err(NetError::Shutdown)));
    assert_eq!(a.stats().connections_open, 0);
    // b still runs the handler future it will never answer: shutdown cancels it.
    tokio::time::timeout(Duration::from_secs(3), b.shutdown()).await.expect("shutdown of b hangs");
    assert_eq!(b.stats().connections_open, 0);
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(b.local_addr()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_dial_in_progress_finishes() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = start("a", 1).await;
    let stuck = member("silent", 1);
    a.set_peer_address(stuck.clone(), silent.local_addr().unwrap());
    let queued = a.request(&stuck, ECHO, Bytes::new(), LONG);
    let _accepted = within("dial arrives", silent.accept()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), a.shutdown()).await.expect("shutdown hangs");
    assert!(matches!(within("queued", queued).await, Err(NetError::Shutdown)));
}
