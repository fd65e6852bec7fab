//! Counters, cheap to bump from any task.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of the data plane's counters (totals since start, except `connections_open`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Connections past the handshake and not yet closed.
    pub connections_open: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// Frame bytes received, headers included.
    pub bytes_in: u64,
    /// Frame bytes written, headers included.
    pub bytes_out: u64,
    /// Requests of this member that timed out.
    pub requests_timed_out: u64,
    /// Handshakes this member refused (wrong magic, version, cluster or identity) plus handshakes
    /// of this member that peers refused.
    pub handshakes_rejected: u64,
    /// Connections closed because the peer sent something that is not a valid frame.
    pub frames_malformed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) requests_timed_out: AtomicU64,
    pub(crate) handshakes_rejected: AtomicU64,
    pub(crate) frames_malformed: AtomicU64,
}

/// Bumps a counter; ordering does not matter for statistics.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            connections_open: get(&self.connections_open),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            requests_timed_out: get(&self.requests_timed_out),
            handshakes_rejected: get(&self.handshakes_rejected),
            frames_malformed: get(&self.frames_malformed),
        }
    }
}
