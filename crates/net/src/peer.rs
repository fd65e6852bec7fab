//! Per-peer state: the outbound queue, the requests waiting for a response, and which connection
//! and dial are current. Everything about a peer changes under its one mutex, so "enqueue",
//! "connection installed", "connection lost" and "dial failed" are atomic with respect to each
//! other; no lock is held across an await.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use grapevine_membership::MemberId;
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::NetError;
use crate::frame::{HEADER_BYTES, Kind, LEN_BYTES};

/// Locks ignoring poison: every critical section leaves the state consistent before anything that
/// could panic, and handler panics are caught before they reach a lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame waiting in a peer's queue.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) kind: Kind,
    pub(crate) correlation: u64,
    pub(crate) service: u8,
    pub(crate) body: Bytes,
    /// For responses: the connection the request came in on. The requester fails every request of
    /// a lost connection, so a response is only worth sending on the connection it belongs to.
    pub(crate) origin: Option<u64>,
}

impl Outgoing {
    /// Bytes on the wire, which is what the queue cap counts.
    pub(crate) fn wire_len(&self) -> usize {
        LEN_BYTES + HEADER_BYTES + self.body.len()
    }
}

pub(crate) type ResponseResult = Result<Bytes, NetError>;

/// A request waiting for its response.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) tx: oneshot::Sender<ResponseResult>,
    pub(crate) service: u8,
    /// The connection it was written to; `None` while it is still queued.
    pub(crate) written_on: Option<u64>,
}

/// The live connection, as seen from the peer state.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    pub(crate) id: u64,
    pub(crate) token: CancellationToken,
    /// Wakes the connection's writer.
    pub(crate) wake: Arc<Notify>,
    /// We dialed it (as opposed to accepted it).
    pub(crate) dialed_by_us: bool,
    /// The peer dialed us once while this connection was up and was told "duplicate"; if it dials
    /// again, it really considers this connection dead (see `accept.rs`).
    pub(crate) suspect: bool,
}

/// What a connection's tasks need; the counterpart of [`ConnSlot`].
#[derive(Debug, Clone)]
pub(crate) struct ConnCtx {
    pub(crate) id: u64,
    pub(crate) token: CancellationToken,
    pub(crate) wake: Arc<Notify>,
    pub(crate) remote: SocketAddr,
    /// Bounds concurrently running `Reply::Later` futures of this connection.
    pub(crate) inflight: Arc<Semaphore>,
}

/// A dial in progress.
#[derive(Debug)]
pub(crate) struct DialSlot {
    pub(crate) id: u64,
    pub(crate) token: CancellationToken,
    /// Past its back-off delay and connecting. A dial still waiting out its delay yields to an
    /// inbound connection from the peer, whichever member is smaller.
    pub(crate) connecting: bool,
}

#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: MemberId,
    /// When the peer last answered one of our requests (or completed a handshake with us), in
    /// [`mono_ms`]; when the peer was added, until then. Frames it sends on its own do not count:
    /// a peer that cannot hear us still sends.
    heard_ms: AtomicU64,
    /// A liveness ping to the peer is outstanding.
    pub(crate) pinging: AtomicBool,
    pub(crate) state: Mutex<PeerState>,
    /// Notified (all waiters) whenever a connection is installed; a dialer that was told
    /// "duplicate" waits on it for the other side's dial to arrive.
    pub(crate) connected: Notify,
    /// Held while a handler runs, so that frames of an old and a replacement connection are never
    /// handled concurrently or out of order.
    pub(crate) dispatch: Mutex<()>,
}

#[derive(Debug, Default)]
pub(crate) struct PeerState {
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) queue: VecDeque<Outgoing>,
    pub(crate) queued_bytes: usize,
    pub(crate) pending: HashMap<u64, Pending>,
    pub(crate) conn: Option<ConnSlot>,
    pub(crate) dial: Option<DialSlot>,
    /// Set when the peer was forgotten or the net shut down: every later enqueue fails with it.
    pub(crate) closed: Option<NetError>,
    /// Delay before the next dial; zero after a successful connection.
    pub(crate) backoff: Duration,
    pub(crate) last_failure: Option<Instant>,
    /// Since when dials are refused by the peer's host (nothing listens on its port); cleared by
    /// a successful connection.
    pub(crate) refused_since: Option<Instant>,
}

impl Peer {
    pub(crate) fn new(id: MemberId) -> Peer {
        Peer {
            id,
            heard_ms: AtomicU64::new(mono_ms()),
            pinging: AtomicBool::new(false),
            state: Mutex::default(),
            connected: Notify::new(),
            dispatch: Mutex::new(()),
        }
    }

    /// The peer answered: a round trip with it works.
    pub(crate) fn heard(&self) {
        self.heard_ms.store(mono_ms(), Ordering::Relaxed);
    }

    /// How long the peer has not answered.
    pub(crate) fn silent_for(&self) -> Duration {
        Duration::from_millis(mono_ms().saturating_sub(self.heard_ms.load(Ordering::Relaxed)))
    }
}

/// Milliseconds on a monotonic clock shared by the process (for cheap atomic timestamps).
pub(crate) fn mono_ms() -> u64 {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    BASE.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// First re-dial delay after a failure; it doubles up to `reconnect_backoff_max`.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(50);

impl PeerState {
    pub(crate) fn is_current_conn(&self, id: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == id)
    }

    pub(crate) fn is_current_dial(&self, id: u64) -> bool {
        self.dial.as_ref().is_some_and(|d| d.id == id)
    }

    pub(crate) fn push(&mut self, out: Outgoing) {
        self.queued_bytes += out.wire_len();
        self.queue.push_back(out);
        if let Some(conn) = &self.conn {
            conn.wake.notify_one();
        }
    }

    /// How long a new dial should wait, given the recent failures.
    pub(crate) fn dial_delay(&self) -> Duration {
        match self.last_failure {
            Some(at) => self.backoff.saturating_sub(at.elapsed()),
            None => Duration::ZERO,
        }
    }

    pub(crate) fn record_dial_failure(&mut self, max: Duration) {
        self.backoff = if self.backoff.is_zero() { BACKOFF_START } else { self.backoff.saturating_mul(2).min(max) };
        self.last_failure = Some(Instant::now());
    }

    /// Fails everything still queued (nothing of it was sent). One-way messages have nobody to
    /// tell, so they are counted in a log line.
    pub(crate) fn fail_queue(&mut self, peer: &MemberId, error: &NetError) {
        let mut one_way = 0usize;
        for out in self.queue.drain(..) {
            match out.kind {
                Kind::Request => {
                    if let Some(p) = self.pending.remove(&out.correlation) {
                        let _ = p.tx.send(Err(error.clone()));
                    }
                }
                Kind::OneWay => one_way += 1,
                Kind::Response | Kind::ErrorResponse => {}
            }
        }
        self.queued_bytes = 0;
        if one_way > 0 {
            warn!(%peer, dropped = one_way, %error, "dropped queued one-way messages");
        }
    }

    /// Fails the requests written to connection `conn_id`, which is gone.
    pub(crate) fn fail_written(&mut self, conn_id: u64, peer: &MemberId) {
        for (_, p) in self.pending.extract_if(|_, p| p.written_on == Some(conn_id)) {
            let _ = p.tx.send(Err(NetError::ConnectionLost { peer: peer.clone() }));
        }
    }

    /// Fails every pending request: those still queued with `error`, those already written to a
    /// connection with `ConnectionLost` (the peer may have handled them; a caller told anything
    /// else would send a write again that was applied).
    pub(crate) fn fail_all_pending(&mut self, peer: &MemberId, error: &NetError) {
        for (_, p) in self.pending.drain() {
            let result =
                if p.written_on.is_some() { NetError::ConnectionLost { peer: peer.clone() } } else { error.clone() };
            let _ = p.tx.send(Err(result));
        }
    }

    /// Drops queued responses to requests that came in on connection `conn_id`.
    pub(crate) fn drop_responses_of(&mut self, conn_id: u64) {
        let before = self.queue.len();
        let mut freed = 0;
        self.queue.retain(|o| {
            let stale = o.origin == Some(conn_id);
            if stale {
                freed += o.wire_len();
            }
            !stale
        });
        if self.queue.len() != before {
            self.queued_bytes -= freed;
        }
    }

    /// Closes the current connection if it is `conn_id`: fails what was written to it and drops
    /// responses meant for it. Queued requests and messages stay for the next connection. Returns
    /// whether it was current.
    pub(crate) fn close_conn(&mut self, conn_id: u64, peer: &MemberId) -> bool {
        let current = self.is_current_conn(conn_id);
        if current && let Some(slot) = self.conn.take() {
            slot.token.cancel();
        }
        self.fail_written(conn_id, peer);
        self.drop_responses_of(conn_id);
        current
    }

    /// The peer is gone for good (forgotten, or shut down): fail and stop everything.
    pub(crate) fn close_for_good(&mut self, peer: &MemberId, error: NetError) {
        if let Some(slot) = self.conn.take() {
            slot.token.cancel();
        }
        if let Some(dial) = self.dial.take() {
            dial.token.cancel();
        }
        self.fail_queue(peer, &error);
        self.fail_all_pending(peer, &error);
        self.closed = Some(error);
    }
}
