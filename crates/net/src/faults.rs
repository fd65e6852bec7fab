//! Fault injection for tests: dropping outbound frames and severing connections. Real code paths,
//! one relaxed atomic load per written frame when unused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use grapevine_membership::MemberId;

use crate::ServiceId;
use crate::net::Inner;
use crate::peer::lock;

#[derive(Debug, Default)]
pub(crate) struct FaultState {
    /// Fast path: no drop rule is set.
    any: AtomicBool,
    /// `(peer, None)` drops everything to the peer, `(peer, Some(s))` only service `s`.
    drops: Mutex<HashSet<(MemberId, Option<u8>)>>,
    /// Fast path: no inbound rule is set.
    any_inbound: AtomicBool,
    /// Frames from these peers are discarded on arrival.
    inbound: Mutex<HashSet<MemberId>>,
}

impl FaultState {
    /// Whether a frame of `service` to `peer` must be discarded.
    pub(crate) fn drops(&self, peer: &MemberId, service: u8) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let drops = lock(&self.drops);
        drops.contains(&(peer.clone(), None)) || drops.contains(&(peer.clone(), Some(service)))
    }

    /// Whether a frame that arrived from `peer` must be discarded.
    pub(crate) fn drops_inbound(&self, peer: &MemberId) -> bool {
        self.any_inbound.load(Ordering::Relaxed) && lock(&self.inbound).contains(peer)
    }
}

/// Test hooks, see [`crate::Net::faults`].
#[derive(Clone, Debug)]
pub struct Faults {
    pub(crate) inner: Arc<Inner>,
}

impl Faults {
    /// While enabled, frames to `peer` (of `service` only, if given) are silently discarded by the
    /// writer: one-way messages vanish, requests time out, responses never arrive.
    pub fn drop_outbound(&self, peer: &MemberId, service: Option<ServiceId>, enabled: bool) {
        let state = &self.inner.faults;
        let mut drops = lock(&state.drops);
        let rule = (peer.clone(), service.map(|s| s.0));
        if enabled {
            drops.insert(rule);
        } else {
            drops.remove(&rule);
        }
        state.any.store(!drops.is_empty(), Ordering::Relaxed);
    }

    /// While enabled, frames arriving from `peer` are silently discarded by the reader, as if the
    /// network dropped them on the way in: its requests time out at the peer, its responses never
    /// complete our requests. With [`Faults::drop_outbound`] on the other member this makes a
    /// one-way cut.
    pub fn drop_inbound(&self, peer: &MemberId, enabled: bool) {
        let state = &self.inner.faults;
        let mut inbound = lock(&state.inbound);
        if enabled {
            inbound.insert(peer.clone());
        } else {
            inbound.remove(peer);
        }
        state.any_inbound.store(!inbound.is_empty(), Ordering::Relaxed);
    }

    /// Closes the current connection to `peer` abruptly, as a network failure would: requests
    /// written to it fail with `ConnectionLost`, queued frames go out on the next connection.
    pub fn sever(&self, peer: &MemberId) {
        if let Some(p) = self.inner.peer(peer) {
            let mut st = lock(&p.state);
            if let Some(id) = st.conn.as_ref().map(|c| c.id) {
                st.close_conn(id, &p.id);
                crate::dial::after_conn_lost(&self.inner, &p, &mut st);
            }
        }
    }
}
