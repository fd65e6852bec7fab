//! The data plane: TCP between cluster members.
//!
//! One connection per pair of members, opened lazily when something is sent and re-opened after
//! failures; a handshake that refuses members of another cluster, major version or incarnation
//! with a message naming both sides' values; length-prefixed frames carrying requests (with
//! correlation ids, answered in any order), responses and one-way messages; per-service
//! [`Handler`]s. Upper crates register handlers by [`ServiceId`] and encode their own message
//! enums with [`codec`], the one place that names the serialization format.
//!
//! # Wire protocol
//!
//! All integers are big endian; `str` is a `u16` length (at most 1024) followed by UTF-8 bytes.
//!
//! **Handshake** (fixed layout, not bincode, identical in every version so that members of any
//! two versions can tell each other what is wrong):
//!
//! ```text
//! dialer → acceptor:  "GRPV" | major u16 | minor u16 | cluster_name str | node_id str | generation u64
//!                     | expected u8 (0 or 1) [| expected node_id str | expected generation u64]
//! acceptor → dialer:  "GRPV" | major u16 | minor u16 | status u8 | cluster_name str | node_id str
//!                     | generation u64 | reason str
//! status: 0 accepted, 1 rejected, 2 duplicate (both are dialing, see below)
//! ```
//!
//! The acceptor closes connections that do not start with the magic (logging "not a grapevine
//! peer" with the remote address) and rejects, with a reason naming both values, a different
//! major version, a different cluster name, or an expected member that is not itself (the member
//! at that address restarted: a new generation is a new member). Minor versions may differ. Both
//! sides log the refusal as an error; the dialer fails what it had queued with
//! [`NetError::Rejected`]. The handshake must complete within `handshake_timeout`.
//!
//! **Frames** follow: `length u32 | kind u8 | correlation id u64 | service u8 | body`, where the
//! length counts everything after itself and may not exceed `frame_bytes_max` (so a body may be
//! `frame_bytes_max - 10` bytes). Kinds: 0 request, 1 response, 2 one-way, 3 error response (body:
//! code u8 — 1 no handler, 2 handler failed — then a UTF-8 message). A length over the maximum or
//! an unknown kind closes that connection only, with a warning naming the peer and the reason;
//! a response to an unknown correlation id (usually a request that timed out) is ignored.
//!
//! # Connections
//!
//! * Each peer has one outbound queue (capped at `queue_bytes_max`) and at most one connection,
//!   whoever dialed it; it carries traffic both ways. [`Net::send`] and [`Net::request`] enqueue
//!   before returning and start a dial when there is no connection.
//! * **Simultaneous dials** end with one connection: the member with the smaller [`MemberId`]
//!   keeps its own dial and answers the other's handshake with "duplicate"; the larger member
//!   accepts the smaller one's dial, abandons its own and sends its queue over the accepted
//!   connection. A dialer told "duplicate" keeps its queue and waits for the other side's dial.
//!   An inbound handshake while a connection is up means the peer considers it dead: it is
//!   replaced (once the smaller member has answered "duplicate" once, to tell this apart from a
//!   late handshake of an abandoned dial).
//! * **Failures.** A dial that cannot connect fails what is queued with [`NetError::NotSent`]
//!   (nothing was sent: safe to retry) and delays the next dial (50 ms, doubling up to
//!   `reconnect_backoff_max`). When a connection breaks, requests already written to it fail
//!   with [`NetError::ConnectionLost`] (they may or may not have been handled), and what is still
//!   queued goes out, in order, on a new connection dialed at once. Responses owed on a broken
//!   connection are dropped: the requester has failed those requests already.
//! * Members are not sent to themselves: `send`/`request` to the local member fail with
//!   [`NetError::NotSent`]; local work does not go through the network.
//! * Outgoing connections can be bound to `outbound_ports` (first free port, SO_REUSEADDR so
//!   ports in TIME_WAIT can be reused); TCP_NODELAY and keepalive are set.
//! * Accepted connections are capped at `connections_max` (a permit is taken before accepting).
//!
//! # Ordering and delivery
//!
//! * Per peer, frames are written in the order `send`/`request` were called, across both kinds,
//!   except frames that were lost with a connection; frames written together are flushed together.
//! * The receiver calls [`Handler::handle`] on the connection's reader, in frame order, one frame
//!   at a time per peer (also across a connection and its replacement). Synchronous work in
//!   `handle` is therefore applied in send order. [`Reply::Later`] futures run concurrently
//!   (at most `inflight_handlers_max` per connection: a handler reserves a [`Slot`] before doing
//!   work that answers later, and answers at once when none is free), so responses can arrive in
//!   any order; correlation ids match them up. The reader never waits: responses to this
//!   member's own requests are read however many handler futures are running.
//! * **Reachability.** Every peer with an address is pinged (an internal request answered by the
//!   data plane itself, not a handler) when it has not answered anything for `ping_interval`.
//!   [`Net::reachability`] reports, per peer, how long no round trip with it has worked (its own
//!   messages do not count: a peer that cannot hear us still sends), and whether its host refused
//!   the connection (nothing listens on its port: the process is gone). The membership layer turns
//!   this into "unreachable" reports and fast failure detection.
//! * One-way messages are at most once; requests resolve exactly once, by their timeout at the
//!   latest. A panicking handler fails its request with [`NetError::Remote`] and affects nothing
//!   else.
//! * [`Net::shutdown`] stops accepting, closes everything, fails pending work with
//!   [`NetError::Shutdown`] and waits (bounded) for every task of this crate. All channels and
//!   queues are bounded and every wait is bounded by a timeout or by the connection's or the
//!   member's shutdown.

pub mod codec;

mod accept;
mod config;
mod connection;
mod dial;
mod dispatch;
mod error;
mod faults;
mod frame;
#[cfg(test)]
mod fuzz_tests;
mod handshake;
mod net;
mod peer;
mod response;
mod stats;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use grapevine_membership::MemberId;

pub use config::NetConfig;
pub use error::NetError;
#[doc(hidden)]
pub use faults::Faults;
pub use net::{Net, PeerReachability};
pub use response::ResponseFuture;
pub use stats::NetStats;

/// Identifies a service (a handler) on every member; chosen by the users of this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId(pub u8);

/// Handles the requests and one-way messages of one service.
pub trait Handler: Send + Sync + 'static {
    /// Called for every request or one-way message from `from`, in frame order per connection:
    /// the next frame of that peer is not handled before this call returns, so synchronous work
    /// done here is ordered. Keep it short: it holds up that peer's connection.
    ///
    /// For requests, the reply is the response ([`Reply::None`]: an empty body). For one-way
    /// messages the reply is ignored (a [`Reply::Later`] future is dropped unpolled).
    ///
    /// Work that answers later needs a [`Slot`] from [`Incoming::reserve`], taken *before* doing
    /// anything: when the connection's `inflight_handlers_max` slots are all taken, the handler
    /// must answer at once (for example "busy, retry") without doing the work. The reader never
    /// waits for a slot, so responses to this member's own requests keep being read however busy
    /// it is.
    fn handle(&self, from: &MemberId, body: Bytes, incoming: &Incoming<'_>) -> Reply;
}

/// What the data plane tells a [`Handler`] about the frame it hands over.
#[derive(Debug)]
pub struct Incoming<'a> {
    one_way: bool,
    slots: &'a Arc<tokio::sync::Semaphore>,
}

impl<'a> Incoming<'a> {
    pub(crate) fn new(one_way: bool, slots: &'a Arc<tokio::sync::Semaphore>) -> Self {
        Incoming { one_way, slots }
    }

    /// True for a one-way message (no response is expected).
    pub fn one_way(&self) -> bool {
        self.one_way
    }

    /// Reserves one of the connection's `inflight_handlers_max` slots for a [`Reply::Later`]
    /// future; `None` when all are taken.
    pub fn reserve(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(|permit| Slot { _permit: permit })
    }
}

/// One of a connection's slots for a handler future, held until the future finishes.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A handler's answer to a request.
pub enum Reply {
    /// Respond with an empty body.
    None,
    /// Respond with this body.
    Now(Bytes),
    /// Respond with the future's output. It runs as its own task, concurrently with the following
    /// frames, holding the slot; a panic in it is reported to the requester as
    /// [`NetError::Remote`].
    Later(Slot, Pin<Box<dyn Future<Output = Bytes> + Send>>),
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::None => f.write_str("Reply::None"),
            Reply::Now(body) => write!(f, "Reply::Now({} bytes)", body.len()),
            Reply::Later(..) => f.write_str("Reply::Later(..)"),
        }
    }
}
