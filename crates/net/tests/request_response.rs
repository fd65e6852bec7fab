//! Requests, responses and one-way messages between two members.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use grapevine_net::{NetError, Reply, ServiceId};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_gets_the_handlers_response() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let body = within("request", a.request(b.local(), ECHO, Bytes::from_static(b"ping"), LONG)).await.unwrap();
    assert_eq!(body, Bytes::from_static(b"ping"));
    // The connection serves the other direction too.
    let body = within("reverse request", b.request(a.local(), ECHO, Bytes::from_static(b"pong"), LONG)).await.unwrap();
    assert_eq!(body, Bytes::from_static(b"pong"));
    assert_eq!((a.stats().connections_open, b.stats().connections_open), (1, 1));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_responses_finishing_in_reverse_order_match_their_requests() {
    const N: u64 = 50;
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    type Gates = Arc<Mutex<Vec<(u64, oneshot::Sender<()>)>>>;
    let gates: Gates = Arc::default();
    let registry = gates.clone();
    b.register(
        SLOW,
        handler(move |_, body, _| {
            let i = u64::from_be_bytes(body[..].try_into().unwrap());
            let (tx, rx) = oneshot::channel();
            registry.lock().unwrap().push((i, tx));
            Reply::Later(Box::pin(async move {
                let _ = rx.await;
                body
            }))
        }),
    );
    let mut requests = JoinSet::new();
    for i in 0..N {
        let response = a.request(b.local(), SLOW, Bytes::copy_from_slice(&i.to_be_bytes()), LONG);
        requests.spawn(async move { (i, response.await) });
    }
    eventually("all requests reached the handler", || gates.lock().unwrap().len() == N as usize).await;
    let mut open: Vec<_> = std::mem::take(&mut *gates.lock().unwrap());
    open.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (_, gate) in open {
        gate.send(()).unwrap();
    }
    let mut answered = 0;
    while let Some(joined) = within("responses", requests.join_next()).await {
        let (i, response) = joined.unwrap();
        assert_eq!(response.unwrap(), Bytes::copy_from_slice(&i.to_be_bytes()), "request {i}");
        answered += 1;
    }
    assert_eq!(answered, N);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_messages_and_requests_arrive_in_call_order() {
    const N: u64 = 10_000;
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let log = seen.clone();
    let svc = ServiceId(7);
    b.register(
        svc,
        handler(move |_, body, _| {
            log.lock().unwrap().push(u64::from_be_bytes(body[..].try_into().unwrap()));
            Reply::None
        }),
    );
    let mut requests = Vec::new();
    for i in 0..N {
        let body = Bytes::copy_from_slice(&i.to_be_bytes());
        if i % 100 == 0 {
            requests.push(a.request(b.local(), svc, body, LONG));
        } else {
            a.send(b.local(), svc, body).unwrap();
        }
    }
    for r in requests {
        assert_eq!(within("request", r).await.unwrap(), Bytes::new());
    }
    eventually("all messages handled", || seen.lock().unwrap().len() == N as usize).await;
    let in_order = seen.lock().unwrap().iter().copied().eq(0..N);
    assert!(in_order, "messages were reordered");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_times_out_with_its_duration() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let after = Duration::from_millis(200);
    let err = within("timeout", a.request(b.local(), SLOW, Bytes::new(), after)).await.unwrap_err();
    assert!(matches!(&err, NetError::Timeout { after: d, peer } if *d == after && peer == b.local()), "{err}");
    assert_eq!(a.stats().requests_timed_out, 1);
    // The late response is ignored and the connection keeps working.
    gate.open();
    within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_at_the_address_is_not_sent() {
    let a = start("a", 1).await;
    let ghost = member("ghost", 1);
    a.set_peer_address(ghost.clone(), format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let err = within("request", a.request(&ghost, ECHO, Bytes::new(), LONG)).await.unwrap_err();
    assert!(matches!(err, NetError::NotSent { .. }), "{err}");
    assert!(err.to_string().contains("safe to retry"), "{err}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_and_missing_handler_are_reported() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    let err = a.send(b.local(), ECHO, Bytes::new()).unwrap_err();
    assert!(matches!(err, NetError::UnknownPeer { .. }), "{err}");
    introduce(&a, &b);
    let err = within("request", a.request(b.local(), ServiceId(99), Bytes::new(), LONG)).await.unwrap_err();
    assert!(matches!(err, NetError::NoHandler { service: 99, .. }), "{err}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_fails_only_its_request() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    introduce(&a, &b);
    b.register(ServiceId(3), handler(|_, _, _| panic!("boom in handle")));
    b.register(ServiceId(4), handler(|_, _, _| Reply::Later(Box::pin(async { panic!("boom in future") }))));
    for svc in [ServiceId(3), ServiceId(4)] {
        let err = within("request", a.request(b.local(), svc, Bytes::new(), LONG)).await.unwrap_err();
        assert!(matches!(&err, NetError::Remote { .. }) && err.to_string().contains("boom"), "{err}");
    }
    within("request", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    assert_eq!(b.stats().connections_open, 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_in_flight_handlers_stop_the_connection_reading() {
    let a = start("a", 1).await;
    let mut config = config("b", 1);
    config.inflight_handlers_max = 2;
    let b = start_with(config).await;
    b.register(ECHO, echo());
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let slow: Vec<_> = (0..3).map(|_| a.request(b.local(), SLOW, Bytes::new(), LONG)).collect();
    // Two futures run; the third request is handled, then the reader waits for a free slot, so
    // the echo behind it is not read.
    let err =
        within("blocked echo", a.request(b.local(), ECHO, Bytes::new(), Duration::from_millis(300))).await.unwrap_err();
    assert!(matches!(err, NetError::Timeout { .. }), "{err}");
    eventually("third slow request handled", || gate.received() == 3).await;
    gate.open();
    for r in slow {
        within("slow request", r).await.unwrap();
    }
    within("echo", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connection_carries_requests_back_to_the_dialer() {
    let (a, b) = (start("a", 1).await, start("b", 1).await);
    // Only a knows where b is; b can still reach a over the connection a opened.
    a.set_peer_address(b.local().clone(), b.local_addr());
    within("a→b", a.request(b.local(), ECHO, Bytes::new(), LONG)).await.unwrap();
    let body = within("b→a", b.request(a.local(), ECHO, Bytes::from_static(b"back"), LONG)).await.unwrap();
    assert_eq!(body, Bytes::from_static(b"back"));
    assert_eq!((a.stats().connections_open, b.stats().connections_open), (1, 1));
    let err = a.send(a.local(), ECHO, Bytes::new()).unwrap_err();
    assert!(matches!(err, NetError::NotSent { .. }), "sending to oneself: {err}");
    a.shutdown().await;
    b.shutdown().await;
}
