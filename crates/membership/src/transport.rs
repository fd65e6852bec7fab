//! The gossip socket: chitchat's UDP socket, bound before chitchat starts (so the node can pick
//! the first free port of its range for TCP and UDP together) and wrapped to observe traffic:
//! count gossip rounds, log once per peer when a member of another cluster name contacts us, and
//! (for tests) drop datagrams to or from chosen addresses as a network partition would.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::{ChitchatEnvelope, ChitchatMessage};
use tracing::warn;

use crate::MembershipError;

/// A UDP socket bound for gossip, not yet handed to chitchat.
pub struct GossipSocket {
    socket: Box<dyn Socket>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for GossipSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipSocket").field("local_addr", &self.local_addr).finish()
    }
}

impl GossipSocket {
    /// Binds the gossip UDP socket. Fails if the address is in use or not local.
    pub async fn bind(addr: SocketAddr) -> Result<GossipSocket, MembershipError> {
        let socket =
            UdpTransport.open(addr).await.map_err(|e| MembershipError::Bind { addr, reason: format!("{e:#}") })?;
        let local_addr = socket.local_addr().map_err(|e| MembershipError::Bind { addr, reason: format!("{e:#}") })?;
        Ok(GossipSocket { socket, local_addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Counters and switches shared between the socket (owned by chitchat) and the membership handle.
#[derive(Debug, Default)]
pub(crate) struct TransportShared {
    pub(crate) cluster_name: String,
    pub(crate) gossip_rounds: AtomicU64,
    pub(crate) datagrams_in: AtomicU64,
    pub(crate) datagrams_out: AtomicU64,
    /// Peers of another cluster name that contacted us or rejected us: logged once each.
    pub(crate) foreign_peers: Mutex<HashSet<SocketAddr>>,
    /// Test hook: datagrams to these addresses are dropped.
    pub(crate) blocked_out: Mutex<HashSet<SocketAddr>>,
    /// Test hook: datagrams from these addresses are dropped.
    pub(crate) blocked_in: Mutex<HashSet<SocketAddr>>,
}

impl TransportShared {
    fn is_blocked(set: &Mutex<HashSet<SocketAddr>>, addr: &SocketAddr) -> bool {
        let blocked = set.lock().unwrap();
        !blocked.is_empty() && blocked.contains(addr)
    }

    fn first_contact_from_foreign(&self, addr: SocketAddr) -> bool {
        self.foreign_peers.lock().unwrap().insert(addr)
    }
}

/// Hands the pre-bound socket to chitchat (which calls `open` exactly once).
pub(crate) struct PreboundTransport {
    socket: Mutex<Option<Box<dyn Socket>>>,
    shared: Arc<TransportShared>,
}

impl PreboundTransport {
    pub(crate) fn new(socket: GossipSocket, shared: Arc<TransportShared>) -> Self {
        PreboundTransport { socket: Mutex::new(Some(socket.socket)), shared }
    }
}

#[async_trait]
impl Transport for PreboundTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner =
            self.socket.lock().unwrap().take().ok_or_else(|| anyhow::anyhow!("gossip socket already opened"))?;
        Ok(Box::new(ObservedSocket { inner, shared: self.shared.clone() }))
    }
}

struct ObservedSocket {
    inner: Box<dyn Socket>,
    shared: Arc<TransportShared>,
}

#[async_trait]
impl Socket for ObservedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        if TransportShared::is_blocked(&self.shared.blocked_out, &to) {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        if matches!(envelope.message, ChitchatMessage::Syn { .. }) {
            self.shared.gossip_rounds.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.datagrams_out.fetch_add(1, Ordering::Relaxed);
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let outcome = self.inner.recv().await?;
            if TransportShared::is_blocked(&self.shared.blocked_in, &outcome.from_addr) {
                continue;
            }
            self.shared.datagrams_in.fetch_add(1, Ordering::Relaxed);
            match &outcome.envelope.message {
                ChitchatMessage::Syn { cluster_id, .. }
                    if *cluster_id != self.shared.cluster_name
                        && self.shared.first_contact_from_foreign(outcome.from_addr) =>
                {
                    warn!(
                        peer = %outcome.from_addr,
                        peer_cluster = %cluster_id,
                        our_cluster = %self.shared.cluster_name,
                        "a member of cluster {cluster_id:?} contacted this member of cluster {:?}; \
                         they will not join each other (check cluster_name and the member lists); \
                         logged once per peer",
                        self.shared.cluster_name
                    );
                }
                ChitchatMessage::BadCluster if self.shared.first_contact_from_foreign(outcome.from_addr) => {
                    warn!(
                        peer = %outcome.from_addr,
                        our_cluster = %self.shared.cluster_name,
                        "the member at {} belongs to another cluster than {:?} and rejected our gossip; \
                         it will not join (check cluster_name and the member lists); logged once per peer",
                        outcome.from_addr,
                        self.shared.cluster_name
                    );
                }
                _ => {}
            }
            return Ok(outcome);
        }
    }
}
