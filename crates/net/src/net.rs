//! The handle users hold, and the state shared by all tasks of one member's data plane.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use grapevine_membership::MemberId;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::faults::{FaultState, Faults};
use crate::frame::{self, HEADER_BYTES, Kind};
use crate::peer::{Outgoing, Peer, Pending, lock};
use crate::response::ResponseFuture;
use crate::stats::Stats;
use crate::{Handler, NetConfig, NetError, NetStats, ServiceId};

/// How long [`Net::shutdown`] waits for the tasks to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// One member's data plane. Cheap to clone; when the last clone is dropped without
/// [`Net::shutdown`], the tasks are cancelled (but not awaited).
#[derive(Clone, Debug)]
pub struct Net {
    inner: Arc<Inner>,
    _cancel_on_drop: Arc<DropGuard>,
}

pub(crate) struct Inner {
    pub(crate) config: NetConfig,
    pub(crate) local_addr: SocketAddr,
    runtime: Handle,
    handlers: RwLock<HashMap<u8, Arc<dyn Handler>>>,
    peers: Mutex<HashMap<MemberId, Arc<Peer>>>,
    tracker: TaskTracker,
    /// Cancelled by shutdown (or when the last `Net` is dropped); every token is a child of it.
    pub(crate) shutdown: CancellationToken,
    pub(crate) stats: Stats,
    pub(crate) faults: FaultState,
    next_id: AtomicU64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("local", &self.config.local)
            .field("local_addr", &self.local_addr)
            .field("shut_down", &self.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Correlation, connection and dial ids; unique within this member.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Spawns a tracked task on the runtime `Net::start` ran on, so `send` and `request` work
    /// from any thread and `shutdown` can await everything.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, &self.runtime)
    }

    pub(crate) fn handler(&self, service: u8) -> Option<Arc<dyn Handler>> {
        self.handlers.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&service).cloned()
    }

    pub(crate) fn peer(&self, id: &MemberId) -> Option<Arc<Peer>> {
        lock(&self.peers).get(id).cloned()
    }

    pub(crate) fn peer_or_insert(&self, id: &MemberId) -> Arc<Peer> {
        lock(&self.peers).entry(id.clone()).or_insert_with(|| Arc::new(Peer::new(id.clone()))).clone()
    }

    /// Checks a body against `frame_bytes_max`.
    pub(crate) fn check_size(&self, body_len: usize) -> Result<(), NetError> {
        let size = HEADER_BYTES + body_len;
        let max = self.config.frame_bytes_max;
        if size > max { Err(NetError::FrameTooLarge { size, max }) } else { Ok(()) }
    }

    /// Queues a request or one-way message, synchronously, and makes sure a connection is coming.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        to: &MemberId,
        out: Outgoing,
        pending: Option<Pending>,
    ) -> Result<Arc<Peer>, NetError> {
        if self.shutdown.is_cancelled() {
            return Err(NetError::Shutdown);
        }
        self.check_size(out.body.len())?;
        if *to == self.config.local {
            let reason = "it is this member; local work does not go through the network".to_string();
            return Err(NetError::NotSent { peer: to.clone(), reason });
        }
        let peer = self.peer(to).ok_or_else(|| NetError::UnknownPeer { peer: to.clone() })?;
        let mut st = lock(&peer.state);
        if let Some(error) = &st.closed {
            return Err(error.clone());
        }
        if st.conn.is_none() && st.dial.is_none() && st.addr.is_none() {
            return Err(NetError::UnknownPeer { peer: to.clone() });
        }
        let cap = self.config.queue_bytes_max;
        // A single frame larger than the cap still goes out when the queue is empty, otherwise it
        // could never be sent at all.
        if !st.queue.is_empty() && st.queued_bytes + out.wire_len() > cap {
            return Err(NetError::QueueFull { peer: to.clone(), bytes_max: cap });
        }
        if let Some(pending) = pending {
            st.pending.insert(out.correlation, pending);
        }
        st.push(out);
        if st.conn.is_none() && st.dial.is_none() {
            crate::dial::start_dial(self, &peer, &mut st);
        }
        drop(st);
        Ok(peer)
    }

    /// Queues a response to a request that arrived on connection `origin`. Dropped (the requester
    /// has already failed it) when that connection is no longer current.
    pub(crate) fn respond(
        &self,
        peer: &Peer,
        origin: u64,
        correlation: u64,
        service: u8,
        reply: Result<Bytes, (u8, String)>,
    ) {
        let (kind, body) = match reply {
            Ok(body) => match self.check_size(body.len()) {
                Ok(()) => (Kind::Response, body),
                Err(e) => {
                    warn!(peer = %peer.id, service, error = %e, "response too large, sending an error instead");
                    (
                        Kind::ErrorResponse,
                        frame::error_body(frame::ERR_HANDLER_FAILED, &format!("the response could not be sent: {e}")),
                    )
                }
            },
            Err((code, message)) => (Kind::ErrorResponse, frame::error_body(code, &message)),
        };
        let out = Outgoing { kind, correlation, service, body, origin: Some(origin) };
        let mut st = lock(&peer.state);
        if !st.is_current_conn(origin) {
            debug!(peer = %peer.id, "dropping a response: the request's connection is closed");
            return;
        }
        // Responses never wait for space (the reader producing them must not block on the writer,
        // or two members answering each other could deadlock), so a full queue drops them.
        if !st.queue.is_empty() && st.queued_bytes + out.wire_len() > self.config.queue_bytes_max {
            warn!(peer = %peer.id, service, bytes_max = self.config.queue_bytes_max,
                "outbound queue full, dropping a response; the requester will time out");
            return;
        }
        st.push(out);
    }
}

/// One peer's reachability over the data plane, see [`Net::reachability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReachability {
    /// The peer.
    pub member: MemberId,
    /// How long the peer has not answered one of our requests (or completed a handshake): a round
    /// trip with it has not worked for that long. Counted from when it was added if it never
    /// answered. With pings on, a reachable peer is never silent for much more than
    /// `ping_interval` plus a round trip; a peer that cannot hear us is silent even though its own
    /// messages still arrive.
    pub silent_for: std::time::Duration,
    /// How long dials to the peer have been refused by its host (nothing listens on its port),
    /// if the last ones were; `None` once a connection succeeds.
    pub refused_for: Option<std::time::Duration>,
}

/// Pings every peer with an address from which nothing arrived for `interval`, one ping at a
/// time per peer, so that silence means "unreachable" and not "idle".
async fn ping_loop(inner: Arc<Inner>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let peers: Vec<Arc<Peer>> = lock(&inner.peers).values().cloned().collect();
        for peer in peers {
            if peer.silent_for() >= interval {
                ping(&inner, &peer, interval);
            }
        }
    }
}

/// Sends one liveness ping to `peer` unless one is outstanding; it expires after a few
/// `interval`s. Starts a dial when there is no connection, which is how a peer whose process is
/// gone is found refusing.
pub(crate) fn ping(inner: &Arc<Inner>, peer: &Arc<Peer>, interval: Duration) {
    if peer.pinging.swap(true, Ordering::Relaxed) {
        return;
    }
    let correlation = inner.next_id();
    let (tx, rx) = oneshot::channel();
    let out =
        Outgoing { kind: Kind::Request, correlation, service: frame::PING_SERVICE, body: Bytes::new(), origin: None };
    let pending = Pending { tx, service: frame::PING_SERVICE, written_on: None };
    match inner.enqueue(&peer.id, out, Some(pending)) {
        Ok(p) => {
            let response = ResponseFuture::waiting(inner.clone(), p, correlation, rx, interval * 3);
            let task_peer = peer.clone();
            inner.spawn(async move {
                let _ = response.await;
                task_peer.pinging.store(false, Ordering::Relaxed);
            });
        }
        Err(_) => peer.pinging.store(false, Ordering::Relaxed),
    }
}

impl Net {
    /// Starts the accept loop on an already-bound listener (the caller picks the port).
    ///
    /// Must be called within a Tokio runtime; all tasks of this `Net` run on that runtime, while
    /// the methods can be called from anywhere.
    pub fn start(mut config: NetConfig, listener: TcpListener) -> Net {
        config.frame_bytes_max = config.frame_bytes_max.clamp(HEADER_BYTES, u32::MAX as usize);
        let local_addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            local_addr,
            runtime: Handle::current(),
            handlers: RwLock::default(),
            peers: Mutex::default(),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            stats: Stats::default(),
            faults: FaultState::default(),
            next_id: AtomicU64::new(1),
        });
        inner.spawn(crate::accept::accept_loop(inner.clone(), listener));
        if let Some(interval) = inner.config.ping_interval.filter(|i| !i.is_zero()) {
            inner.spawn(ping_loop(inner.clone(), interval));
        }
        Net { inner, _cancel_on_drop: Arc::new(shutdown.drop_guard()) }
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This member.
    pub fn local(&self) -> &MemberId {
        &self.inner.config.local
    }

    /// The largest frame this member sends or accepts (`frame_bytes_max`), header included.
    pub fn frame_bytes_max(&self) -> usize {
        self.inner.config.frame_bytes_max
    }

    /// Registers (or replaces) the handler of a service.
    pub fn register(&self, service: ServiceId, handler: Arc<dyn Handler>) {
        assert_ne!(service.0, frame::PING_SERVICE, "service id {} is the data plane's own", frame::PING_SERVICE);
        let mut handlers = self.inner.handlers.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if handlers.insert(service.0, handler).is_some() {
            debug!(service = service.0, "replaced the handler of a service");
        }
    }

    /// Directory: where to dial a member. Called by the owner of the membership view.
    pub fn set_peer_address(&self, peer: MemberId, addr: SocketAddr) {
        let p = self.inner.peer_or_insert(&peer);
        lock(&p.state).addr = Some(addr);
    }

    /// The member is gone: close its connection, fail everything pending or queued for it with
    /// [`NetError::PeerGone`]. Later sends to it fail with [`NetError::UnknownPeer`].
    pub fn forget_peer(&self, peer: &MemberId) {
        let removed = lock(&self.inner.peers).remove(peer);
        if let Some(p) = removed {
            lock(&p.state).close_for_good(&p.id, NetError::PeerGone { peer: p.id.clone() });
        }
    }

    /// One-way message. Enqueued before this returns, so messages and requests to the same peer
    /// keep their call order. Does not wait for the connection.
    pub fn send(&self, to: &MemberId, service: ServiceId, body: Bytes) -> Result<(), NetError> {
        let out = Outgoing { kind: Kind::OneWay, correlation: 0, service: service.0, body, origin: None };
        self.inner.enqueue(to, out, None).map(drop)
    }

    /// Request. The frame is enqueued when this is called (not on first poll), which lets callers
    /// order requests and one-way messages under their own locks. The future resolves to the
    /// response body or an error, and always finishes by `timeout`.
    pub fn request(&self, to: &MemberId, service: ServiceId, body: Bytes, timeout: Duration) -> ResponseFuture {
        let correlation = self.inner.next_id();
        let (tx, rx) = oneshot::channel();
        let out = Outgoing { kind: Kind::Request, correlation, service: service.0, body, origin: None };
        let pending = Pending { tx, service: service.0, written_on: None };
        match self.inner.enqueue(to, out, Some(pending)) {
            Ok(peer) => ResponseFuture::waiting(self.inner.clone(), peer, correlation, rx, timeout),
            Err(e) => ResponseFuture::failed(e),
        }
    }

    /// What this member knows of each peer's reachability over the data plane (see the crate
    /// documentation). Peers are listed from [`Net::set_peer_address`] until
    /// [`Net::forget_peer`].
    pub fn reachability(&self) -> Vec<PeerReachability> {
        let peers: Vec<Arc<Peer>> = lock(&self.inner.peers).values().cloned().collect();
        peers
            .into_iter()
            .map(|p| {
                let refused_for = lock(&p.state).refused_since.map(|at| at.elapsed());
                PeerReachability { member: p.id.clone(), silent_for: p.silent_for(), refused_for }
            })
            .collect()
    }

    /// How long `peer` has not answered (see [`PeerReachability::silent_for`]); `None` for a peer
    /// without an address.
    pub fn silent_for(&self, peer: &MemberId) -> Option<std::time::Duration> {
        self.inner.peer(peer).map(|p| p.silent_for())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetStats {
        self.inner.stats.snapshot()
    }

    /// Stops accepting, closes every connection, fails pending work with [`NetError::Shutdown`],
    /// and waits (at most 5 s) for every task this crate spawned.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        // Fail what is pending with `Shutdown` before the connections are cancelled: a connection
        // closing first would fail its requests with `ConnectionLost` ("may have been handled"),
        // which is not what happened.
        let peers: Vec<Arc<Peer>> = lock(&inner.peers).values().cloned().collect();
        for p in peers {
            lock(&p.state).close_for_good(&p.id, NetError::Shutdown);
        }
        inner.shutdown.cancel();
        inner.tracker.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, inner.tracker.wait()).await.is_err() {
            warn!(
                tasks = inner.tracker.len(),
                "data-plane tasks still running after {SHUTDOWN_WAIT:?}; giving up on them"
            );
        }
    }

    /// Test hooks.
    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        Faults { inner: self.inner.clone() }
    }
}
