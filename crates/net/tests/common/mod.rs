//! Helpers shared by the integration tests: members on 127.0.0.1 ephemeral ports, closure
//! handlers, and polling a condition with a deadline (never a fixed sleep).

#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grapevine_membership::{MemberId, ProtocolVersion};
use grapevine_net::{Handler, Incoming, Net, NetConfig, Reply, ServiceId};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub const V1: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };
pub const CLUSTER: &str = "test-cluster";
/// Answers with the request body.
pub const ECHO: ServiceId = ServiceId(1);
/// Answers only when the test opens its gate.
pub const SLOW: ServiceId = ServiceId(2);
/// Generous: only reached when something is broken.
pub const LONG: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

pub fn member(node: &str, generation: u64) -> MemberId {
    MemberId::new(node, generation)
}

pub fn config(node: &str, generation: u64) -> NetConfig {
    NetConfig::new(CLUSTER, member(node, generation), V1)
}

pub async fn start_with(config: NetConfig) -> Net {
    init_tracing();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Net::start(config, listener)
}

/// A member with the ECHO handler registered.
pub async fn start(node: &str, generation: u64) -> Net {
    let net = start_with(config(node, generation)).await;
    net.register(ECHO, echo());
    net
}

/// Tells each member where the other listens.
pub fn introduce(a: &Net, b: &Net) {
    a.set_peer_address(b.local().clone(), b.local_addr());
    b.set_peer_address(a.local().clone(), a.local_addr());
}

pub struct FnHandler<F>(pub F);

impl<F> Handler for FnHandler<F>
where
    F: Fn(&MemberId, Bytes, &Incoming<'_>) -> Reply + Send + Sync + 'static,
{
    fn handle(&self, from: &MemberId, body: Bytes, incoming: &Incoming<'_>) -> Reply {
        (self.0)(from, body, incoming)
    }
}

pub fn handler<F>(f: F) -> Arc<dyn Handler>
where
    F: Fn(&MemberId, Bytes, &Incoming<'_>) -> Reply + Send + Sync + 'static,
{
    Arc::new(FnHandler(f))
}

pub fn echo() -> Arc<dyn Handler> {
    handler(|_, body, _| Reply::Now(body))
}

/// A handler whose requests are answered only after `open()`; counts what it received.
#[derive(Clone, Default)]
pub struct Gate {
    pub received: Arc<AtomicUsize>,
    opened: Arc<Mutex<bool>>,
    notify: Arc<Notify>,
}

impl Gate {
    pub fn handler(&self) -> Arc<dyn Handler> {
        let gate = self.clone();
        handler(move |_, body, incoming| {
            gate.received.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            let Some(slot) = incoming.reserve() else { return Reply::Now(Bytes::from_static(b"busy")) };
            Reply::Later(
                slot,
                Box::pin(async move {
                    loop {
                        let notified = gate.notify.notified();
                        if *gate.opened.lock().unwrap() {
                            return body;
                        }
                        notified.await;
                    }
                }),
            )
        })
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    pub fn open(&self) {
        *self.opened.lock().unwrap() = true;
        self.notify.notify_waiters();
    }
}

/// Polls `condition` until it holds; panics naming `what` after 5 s.
pub async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `future`, failing the test if it takes longer than `LONG`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LONG, future).await.unwrap_or_else(|_| panic!("took too long: {what}"))
}

/// A free local port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
