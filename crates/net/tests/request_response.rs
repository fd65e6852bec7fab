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
        handler(move |_, body, incoming| {
            let i = u64::from_be_bytes(body[..].try_into().unwrap());
            let (tx, rx) = oneshot::channel();
            registry.lock().unwrap().push((i, tx));
            Reply::Later(
                incoming.reserve().expect("a free handler slot"),
                Box::pin(async move {
                    let _ = rx.await;
                    body
                }),
            )
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
    b.register(
        ServiceId(4),
        handler(|_, _, incoming| {
            Reply::Later(incoming.reserve().unwrap(), Box::pin(async { panic!("boom in future") }))
        }),
    );
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
async fn with_every_handler_slot_taken_requests_are_answered_at_once_and_reading_goes_on() {
    let a = start("a", 1).await;
    let mut config = config("b", 1);
    config.inflight_handlers_max = 2;
    let b = start_with(config).await;
    b.register(ECHO, echo());
    introduce(&a, &b);
    let gate = Gate::default();
    b.register(SLOW, gate.handler());
    let slow: Vec<_> = (0..2).map(|_| a.request(b.local(), SLOW, Bytes::new(), LONG)).collect();
    eventually("two slow requests hold both slots", || gate.received() == 2).await;
    // A third gets the handler's "busy" answer at once, and frames behind it are still read.
    let third = within("third slow request", a.request(b.local(), SLOW, Bytes::new(), LONG)).await.unwrap();
    assert_eq!(third.as_ref(), b"busy");
    within("echo", a.request(b.local(), ECHO, Bytes::new(), Duration::from_secs(2))).await.unwrap();
    gate.open();
    for r in slow {
        assert_eq!(within("slow request", r).await.unwrap().as_ref(), b"");
    }
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

/// With every handler slot of a connection taken by futures that wait for responses from the
/// requester, the reader must keep reading: those responses arrive on the same connection.
/// (Blocking the reader on a free slot deadlocked two members that both wait for each other's
/// acknowledgements until the requests timed out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_every_handler_slot_taken_still_reads_the_responses_they_wait_for() {
    const SLOTS: usize = 4;
    const REQUESTS: usize = 40;
    let a = start("a", 1).await;
    let mut config_b = config("b", 1);
    config_b.inflight_handlers_max = SLOTS;
    let b = start_with(config_b).await;
    introduce(&a, &b);
    let b_net = b.clone();
    let a_id = a.local().clone();
    // Each request to b's SLOW service holds a slot while b asks a for an echo.
    b.register(
        SLOW,
        handler(move |_, body, incoming| {
            let Some(slot) = incoming.reserve() else { return Reply::Now(Bytes::from_static(b"busy")) };
            let echo = b_net.request(&a_id, ECHO, body, LONG);
            Reply::Later(slot, Box::pin(async move { echo.await.unwrap_or_else(|_| Bytes::from_static(b"lost")) }))
        }),
    );
    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let response = a.request(b.local(), SLOW, Bytes::copy_from_slice(&(i as u64).to_be_bytes()), LONG);
        requests.spawn(response);
    }
    let (mut echoed, mut busy) = (0, 0);
    while let Some(joined) = within("every request answered", requests.join_next()).await {
        match joined.unwrap().expect("answered, not timed out") {
            body if body.as_ref() == b"busy" => busy += 1,
            body => {
                assert_eq!(body.len(), 8, "an echo of the request: {body:?}");
                echoed += 1;
            }
        }
    }
    assert_eq!(echoed + busy, REQUESTS);
    assert!(echoed >= SLOTS, "at least the first {SLOTS} requests were served ({echoed} were)");
    a.shutdown().await;
    b.shutdown().await;
}
