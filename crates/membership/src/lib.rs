//! Who is in the cluster? Gossip membership on [chitchat], failure detection, and the master.
//!
//! Each member publishes a few small gossip keys (data address, protocol version, life-cycle state,
//! attributes, and `x:` keys for upper layers; see `member.rs`). This crate turns chitchat's view of
//! live nodes into a versioned [`ClusterView`] (on a watch channel) and a [`MemberEvent`] stream.
//! Large state never travels through gossip.
//!
//! * **Discovery feeds seeds.** Every candidate address from discovery that is not a known member
//!   is probed with a gossip SYN, in rounds of one gossip interval while joining and of
//!   `probe_interval` after, so listed peers that are down are retried and joined when they
//!   appear; one that does not answer is probed less and less often (up to every 8 rounds), and
//!   a round sends at most 64 probes (`probe.rs`).
//! * **Failure detection** is chitchat's phi-accrual detector, configured here: a member that stops
//!   gossiping is declared dead after about `phi_threshold` × its mean heartbeat interval (≈ the gossip
//!   interval), i.e. ≈ 8 s with the defaults (1 s gossip, phi 8), plus up to one gossip round.
//! * **Graceful leave.** chitchat has no leave message, so a leaving member publishes
//!   `state = left`, pushes it to every live peer at once, and keeps gossiping one more interval
//!   before it stops; peers remove it on sight and report [`MemberEvent::Left`].
//! * **Master.** The oldest active member (smallest `(generation, node_id)`), unless an operator
//!   forced a hand-over: the target then publishes a claim higher than any other and leads until it
//!   leaves. Every member computes the same master from the same gossip.
//! * **Versions.** A member whose protocol major version differs is not admitted to the view; both
//!   sides log an error that names both versions.
//!
//! [chitchat]: https://github.com/quickwit-oss/chitchat

#[cfg(test)]
mod fuzz_tests;
pub mod latest;
mod member;
mod probe;
mod transport;
mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::Transport;
use chitchat::{Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub use member::{Member, MemberId, MemberParseError, MemberState, PROTOCOL_VERSION, ProtocolVersion};
pub use transport::GossipSocket;
pub use view::{ClusterView, MemberEvent};

pub use view::excluded_members;

use member::{
    KEY_ADMIN_ADDR, KEY_DATA_ADDR, KEY_GONE, KEY_HANDOVER, KEY_MASTER, KEY_MASTER_CLAIM, KEY_PROTOCOL, KEY_STATE,
    KEY_UNREACHABLE, PREFIX_ATTR, PREFIX_EXT, format_handover, format_ids, member_from_node_state,
};
use transport::{PreboundTransport, TransportShared};

/// Capacity of the member-event channel. A subscriber that falls further behind receives
/// `RecvError::Lagged` and should re-read [`Membership::view`].
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// Settings of the membership layer. [`MembershipConfig::new`] fills in the documented defaults.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Members gossip only with members of the same cluster name.
    pub cluster_name: String,
    /// This node's id; unique in the cluster.
    pub node_id: String,
    /// Start time in ms since the Unix epoch: a restarted node is a new member.
    pub generation: u64,
    /// The address peers gossip to (the advertised UDP address).
    pub gossip_addr: SocketAddr,
    /// The data-plane TCP address, published for peers.
    pub data_addr: SocketAddr,
    /// The admin HTTP address, published for operators' tools.
    pub admin_addr: Option<SocketAddr>,
    /// The protocol version published (tests override it to check version checks).
    pub protocol_version: ProtocolVersion,
    /// Time between gossip rounds. Default 1 s.
    pub gossip_interval: Duration,
    /// Phi-accrual threshold above which a silent member is declared dead. Default 8.
    pub phi_threshold: f64,
    /// How long a dead member's state is remembered before it is forgotten. Default 15 min.
    pub dead_member_grace: Duration,
    /// How often discovery candidates that are not members are probed once this member is
    /// active. Default 2 s. While joining they are probed every gossip interval.
    pub probe_interval: Duration,
    /// User attributes published with the member (e.g. zone).
    pub attributes: BTreeMap<String, String>,
    /// Members of another group (see [`view::from_another_group`]) are not merged into this
    /// member's view before it has run this long. Default 20 s.
    pub merge_first_run_delay: Duration,
    /// Members of another group are merged into the view once they have been visible without a
    /// break for this long (a flapping link restarts the wait). Default 10 s.
    pub merge_run_delay: Duration,
}

impl MembershipConfig {
    /// A configuration with the documented defaults.
    pub fn new(
        cluster_name: impl Into<String>,
        node_id: impl Into<String>,
        generation: u64,
        gossip_addr: SocketAddr,
        data_addr: SocketAddr,
    ) -> Self {
        MembershipConfig {
            cluster_name: cluster_name.into(),
            node_id: node_id.into(),
            generation,
            gossip_addr,
            data_addr,
            admin_addr: None,
            protocol_version: PROTOCOL_VERSION,
            gossip_interval: Duration::from_secs(1),
            phi_threshold: 8.0,
            dead_member_grace: Duration::from_secs(15 * 60),
            probe_interval: Duration::from_secs(2),
            attributes: BTreeMap::new(),
            merge_first_run_delay: Duration::from_secs(20),
            merge_run_delay: Duration::from_secs(10),
        }
    }

    /// The expected time from a member's last heartbeat to its being declared dead.
    pub fn failure_detection_time(&self) -> Duration {
        self.gossip_interval.mul_f64(self.phi_threshold) + self.gossip_interval
    }
}

/// How long a member whose data port refuses connections must also be silent in gossip before it
/// is declared dead: one and a half gossip intervals (a live member's heartbeat arrives about once
/// per interval).
pub fn gone_silence(gossip_interval: Duration) -> Duration {
    gossip_interval.mul_f64(1.5)
}

/// Errors of the membership layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    /// The gossip socket could not be bound.
    #[error("cannot bind the gossip socket on {addr}/udp: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// chitchat failed to start.
    #[error("gossip failed to start: {0}")]
    Start(String),
    /// A node id that is not in the view.
    #[error("no member with node id {node_id:?} in the cluster; members are: {members}")]
    UnknownMember {
        /// The node id asked for.
        node_id: String,
        /// The node ids in the view, comma-separated.
        members: String,
    },
    /// The member exists but cannot take the role asked for.
    #[error("member {node_id:?} is {state}, only an active member can become master")]
    NotActive {
        /// The node id.
        node_id: String,
        /// Its state.
        state: MemberState,
    },
    /// A wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// The membership layer was shut down.
    #[error("membership has been shut down")]
    Stopped,
}

/// Counters for stats and metrics.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MembershipStats {
    /// Gossip SYN messages sent (each starts a gossip exchange).
    pub gossip_rounds: u64,
    /// UDP datagrams received.
    pub datagrams_in: u64,
    /// UDP datagrams sent.
    pub datagrams_out: u64,
    /// Distinct peers of another cluster name that contacted us or rejected us.
    pub foreign_cluster_peers: u64,
    /// Members refused for an incompatible protocol version.
    pub incompatible_members: u64,
    /// Member events emitted.
    pub events: u64,
    /// The current view version.
    pub view_version: u64,
    /// Groups merged into this member's view (members of another group admitted at once count as
    /// one merge).
    #[serde(default)]
    pub groups_merged: u64,
    /// When the last merge happened (ms since the Unix epoch; None: never) and the master the other
    /// group followed.
    #[serde(default)]
    pub last_merge: Option<(u64, MemberId)>,
    /// Members of another group visible right now, waiting for the merge timers.
    #[serde(default)]
    pub outside_members: u64,
}

/// A running membership layer. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("local", &self.inner.local).finish()
    }
}

struct Inner {
    config: MembershipConfig,
    local: MemberId,
    chitchat_id: ChitchatId,
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    handle: Mutex<Option<ChitchatHandle>>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    /// `view_tx`'s id for [`latest::with_latest`].
    view_id: u64,
    events_tx: broadcast::Sender<MemberEvent>,
    poke: Notify,
    stop_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    transport: Arc<TransportShared>,
    candidates: watch::Receiver<Vec<SocketAddr>>,
    events_emitted: AtomicU64,
    incompatible: Mutex<HashSet<ChitchatId>>,
    duplicate_ids_logged: Mutex<HashSet<ChitchatId>>,
    handovers_done: Mutex<HashSet<String>>,
    nonce: AtomicU64,
    /// Per node: its last heartbeat and when it changed, to tell a silent member.
    heartbeats: Mutex<HashMap<ChitchatId, (u64, Instant)>>,
    /// The data-plane reports this member published last: (unreachable, gone).
    reported: tokio::sync::Mutex<(Vec<MemberId>, Vec<MemberId>)>,
    /// Members declared dead because their port refuses and they fell silent, logged once.
    gone_logged: Mutex<HashSet<MemberId>>,
    /// The merge of groups (see [`view::from_another_group`]).
    groups: Mutex<Groups>,
}

/// What the view builder remembers to merge groups on the timers.
#[derive(Debug)]
struct Groups {
    /// When this layer started (the first merge waits `merge_first_run_delay` from it).
    started: Instant,
    /// Members that left the view without announcing it, and when (bounded, see `DEPARTED_MAX`).
    departed: HashMap<MemberId, Instant>,
    /// Members of another group visible now, and since when without a break.
    outside: HashMap<MemberId, Instant>,
    /// The masters of other groups already reported as found (logged once per episode).
    announced: HashSet<MemberId>,
    merged: u64,
    last_merge: Option<(u64, MemberId)>,
}

/// Most departed members remembered for the merge timers (the oldest are forgotten first; a
/// forgotten one counts as never seen, which only makes it wait for the timers).
const DEPARTED_MAX: usize = 4096;

impl Membership {
    /// Starts gossip on `socket` in state `joining`. Call [`Membership::join`] to become active.
    pub async fn start(
        config: MembershipConfig,
        socket: GossipSocket,
        candidates: watch::Receiver<Vec<SocketAddr>>,
    ) -> Result<Membership, MembershipError> {
        assert!(!config.cluster_name.is_empty(), "cluster name must not be empty");
        assert!(!config.gossip_interval.is_zero(), "gossip interval must be positive");
        let listen_addr = socket.local_addr();
        let chitchat_id = ChitchatId::new(config.node_id.clone(), config.generation, config.gossip_addr);
        let local = MemberId::new(config.node_id.clone(), config.generation);
        let failure_detector_config = FailureDetectorConfig {
            phi_threshold: config.phi_threshold,
            sampling_window_size: 1_000,
            max_interval: config.gossip_interval.mul_f64(10.0).max(Duration::from_secs(10)),
            initial_interval: config.gossip_interval,
            dead_node_grace_period: config.dead_member_grace,
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id: chitchat_id.clone(),
            cluster_id: config.cluster_name.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr,
            seed_nodes: Vec::new(),
            failure_detector_config,
            marked_for_deletion_grace_period: config.dead_member_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let mut initial = vec![
            (KEY_DATA_ADDR.to_string(), config.data_addr.to_string()),
            (KEY_PROTOCOL.to_string(), config.protocol_version.to_string()),
            (KEY_STATE.to_string(), MemberState::Joining.to_string()),
        ];
        if let Some(admin) = config.admin_addr {
            initial.push((KEY_ADMIN_ADDR.to_string(), admin.to_string()));
        }
        for (key, value) in &config.attributes {
            initial.push((format!("{PREFIX_ATTR}{key}"), value.clone()));
        }
        let transport_shared =
            Arc::new(TransportShared { cluster_name: config.cluster_name.clone(), ..Default::default() });
        let transport = PreboundTransport::new(socket, transport_shared.clone());
        let handle = spawn_chitchat(chitchat_config, initial, &transport as &dyn Transport)
            .await
            .map_err(|e| MembershipError::Start(format!("{e:#}")))?;
        let chitchat = handle.chitchat();
        let live_watch = chitchat.lock().await.live_nodes_watcher();
        let (view_tx, _) = watch::channel(Arc::new(ClusterView::empty(local.clone())));
        let (events_tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let (stop_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            local,
            chitchat_id,
            chitchat,
            handle: Mutex::new(Some(handle)),
            view_tx,
            view_id: latest::channel_id(),
            events_tx,
            poke: Notify::new(),
            stop_tx,
            tasks: Mutex::new(Vec::new()),
            transport: transport_shared,
            candidates,
            events_emitted: AtomicU64::new(0),
            incompatible: Mutex::new(HashSet::new()),
            duplicate_ids_logged: Mutex::new(HashSet::new()),
            handovers_done: Mutex::new(HashSet::new()),
            nonce: AtomicU64::new(0),
            heartbeats: Mutex::new(HashMap::new()),
            reported: tokio::sync::Mutex::new((Vec::new(), Vec::new())),
            gone_logged: Mutex::new(HashSet::new()),
            groups: Mutex::new(Groups {
                started: Instant::now(),
                departed: HashMap::new(),
                outside: HashMap::new(),
                announced: HashSet::new(),
                merged: 0,
                last_merge: None,
            }),
        });
        inner.rebuild_view().await;
        let view_task = tokio::spawn(view_loop(inner.clone(), live_watch));
        let probe_task = tokio::spawn(probe_loop(inner.clone()));
        inner.tasks.lock().unwrap().extend([view_task, probe_task]);
        info!(
            node = %inner.local,
            gossip = %inner.config.gossip_addr,
            data = %inner.config.data_addr,
            cluster = %inner.config.cluster_name,
            "membership started; joining"
        );
        Ok(Membership { inner })
    }

    /// This member's id.
    pub fn local_id(&self) -> &MemberId {
        &self.inner.local
    }

    /// The configuration in use.
    pub fn config(&self) -> &MembershipConfig {
        &self.inner.config
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view_tx.borrow().clone()
    }

    /// Calls `f` with the current view, as [`Membership::view`] gives it, from this thread's copy
    /// (see [`latest`]): for what every operation reads.
    pub fn with_view<R>(&self, f: impl FnOnce(&ClusterView) -> R) -> R {
        thread_local! {
            static VIEWS: std::cell::RefCell<latest::LatestCache<Arc<ClusterView>>> = Default::default();
        }
        latest::with_latest(&VIEWS, self.inner.view_id, &self.inner.view_tx, |view| f(view))
    }

    /// A receiver of every new view.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.inner.view_tx.subscribe()
    }

    /// A receiver of member events from now on (bounded; see [`EVENT_CHANNEL_CAPACITY`]).
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.inner.events_tx.subscribe()
    }

    /// Waits until `predicate` holds for the view, or `timeout` passes.
    pub async fn wait_for_view(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&ClusterView) -> bool,
    ) -> Result<Arc<ClusterView>, MembershipError> {
        let mut rx = self.watch();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let view = rx.borrow_and_update().clone();
                if predicate(&view) {
                    return Ok(view);
                }
                if rx.changed().await.is_err() {
                    return Err(MembershipError::Stopped);
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(MembershipError::Timeout { what: what.to_string(), after: timeout }))
    }

    /// Looks for the cluster, then becomes `active`. Returns once another member is in the view,
    /// or discovery has no candidate other than this member, or `timeout` has passed (the member
    /// then runs alone and still joins the others when they appear).
    pub async fn join(&self, timeout: Duration) {
        let local = self.inner.local.clone();
        let own_addr = self.inner.config.gossip_addr;
        let no_candidates = self.inner.candidates.borrow().iter().all(|a| *a == own_addr);
        if !no_candidates {
            let found =
                self.wait_for_view("another member", timeout, |view| view.members.iter().any(|m| m.id != local)).await;
            match found {
                Ok(view) => info!(members = view.len(), "found the cluster"),
                Err(_) => info!(
                    waited = ?timeout,
                    "no other member answered; running alone and joining the others when they appear"
                ),
            }
        }
        self.set_state(MemberState::Active).await;
    }

    /// Publishes a new life-cycle state for this member.
    pub async fn set_state(&self, state: MemberState) {
        self.set_key(KEY_STATE, state.as_str()).await;
        info!(node = %self.inner.local, %state, "member state changed");
    }

    /// This member's published state.
    pub async fn state(&self) -> MemberState {
        let mut chitchat = self.inner.chitchat.lock().await;
        chitchat.self_node_state().get(KEY_STATE).and_then(|s| s.parse().ok()).unwrap_or(MemberState::Joining)
    }

    /// Publishes an upper-layer key (`x:<key>`), e.g. the partition-table epoch. Keep values small.
    pub async fn set_ext_key(&self, key: &str, value: &str) {
        self.set_key(&format!("{PREFIX_EXT}{key}"), value).await;
    }

    /// Removes an upper-layer key.
    pub async fn delete_ext_key(&self, key: &str) {
        let full = format!("{PREFIX_EXT}{key}");
        self.inner.chitchat.lock().await.self_node_state().delete(&full);
        // Our own change is visible in our view at once, not a loop pass later.
        self.inner.rebuild_view().await;
    }

    async fn set_key(&self, key: &str, value: &str) {
        self.inner.chitchat.lock().await.self_node_state().set(key, value);
        self.inner.rebuild_view().await;
    }

    /// Publishes what this member's data plane knows of its peers: those it cannot reach although
    /// gossip says they are alive (`unreachable`, which excludes them from ownership when the
    /// reports say so, see [`excluded_members`]), and those whose data port refuses its
    /// connections (`gone`: their process is gone; with their heartbeat silent too, they are
    /// declared dead without waiting for the gossip failure detector). Publishes only changes.
    pub async fn report_data_plane(&self, mut unreachable: Vec<MemberId>, mut gone: Vec<MemberId>) {
        unreachable.sort();
        gone.sort();
        let mut reported = self.inner.reported.lock().await;
        if reported.0 == unreachable && reported.1 == gone {
            return;
        }
        if reported.0 != unreachable {
            if !unreachable.is_empty() {
                warn!(members = %format_ids(&unreachable), "cannot reach these members over the data plane");
            } else {
                info!("every member is reachable over the data plane again");
            }
        }
        {
            let mut chitchat = self.inner.chitchat.lock().await;
            let state = chitchat.self_node_state();
            for (key, ids) in [(KEY_UNREACHABLE, &unreachable), (KEY_GONE, &gone)] {
                if ids.is_empty() {
                    state.delete(key);
                } else {
                    state.set(key, format_ids(ids.iter()));
                }
            }
        }
        *reported = (unreachable, gone);
        drop(reported);
        self.inner.rebuild_view().await;
    }

    /// Asks that the member with `node_id` become master. It leads until it leaves. Returns the
    /// target's id; the hand-over itself completes when gossip has spread (see
    /// [`Membership::wait_for_view`]).
    pub async fn request_master_handover(&self, node_id: &str) -> Result<MemberId, MembershipError> {
        let view = self.view();
        let target = view.member_by_node_id(node_id).ok_or_else(|| MembershipError::UnknownMember {
            node_id: node_id.to_string(),
            members: view.members.iter().map(|m| m.id.node_id.to_string()).collect::<Vec<_>>().join(", "),
        })?;
        if target.state != MemberState::Active {
            return Err(MembershipError::NotActive { node_id: node_id.to_string(), state: target.state });
        }
        let target = target.id.clone();
        if target == self.inner.local {
            let claim = view.members.iter().map(|m| m.master_claim).max().unwrap_or(0) + 1;
            self.set_key(KEY_MASTER_CLAIM, &claim.to_string()).await;
        } else {
            let nonce = format!("{}-{}", self.inner.local.generation, self.inner.nonce.fetch_add(1, Ordering::Relaxed));
            self.set_key(KEY_HANDOVER, &format_handover(&target, &nonce)).await;
        }
        info!(target = %target, "master hand-over requested");
        Ok(target)
    }

    /// Members of this cluster in another group that are held outside the view until the merge
    /// timers pass (see the crate documentation). While there are any, the view holds only part of
    /// what will be one cluster: a decision between the groups' data should wait for them.
    pub fn outside_members(&self) -> Vec<MemberId> {
        self.inner.groups.lock().unwrap().outside.keys().cloned().collect()
    }

    /// Counters for stats and metrics.
    pub fn stats(&self) -> MembershipStats {
        let t = &self.inner.transport;
        let groups = self.inner.groups.lock().unwrap();
        MembershipStats {
            gossip_rounds: t.gossip_rounds.load(Ordering::Relaxed),
            datagrams_in: t.datagrams_in.load(Ordering::Relaxed),
            datagrams_out: t.datagrams_out.load(Ordering::Relaxed),
            foreign_cluster_peers: t.foreign_peers.lock().unwrap().len() as u64,
            incompatible_members: self.inner.incompatible.lock().unwrap().len() as u64,
            events: self.inner.events_emitted.load(Ordering::Relaxed),
            view_version: self.view().version,
            groups_merged: groups.merged,
            last_merge: groups.last_merge.clone(),
            outside_members: groups.outside.len() as u64,
        }
    }

    /// Leaves gracefully: publishes `left`, pushes it to every live peer, gossips one more interval
    /// so it spreads, then stops gossip and every task of this layer.
    pub async fn shutdown(&self) {
        if *self.inner.stop_tx.borrow() {
            return;
        }
        self.set_key(KEY_STATE, MemberState::Left.as_str()).await;
        self.push_to_live_peers().await;
        // chitchat has no leave message: let one more round carry `left` to peers that missed the push.
        tokio::time::sleep(self.inner.config.gossip_interval.min(Duration::from_secs(2))).await;
        self.push_to_live_peers().await;
        info!(node = %self.inner.local, "left the cluster");
        self.stop(true).await;
    }

    /// Stops at once without telling anyone, as a crash would (peers detect it as dead). For tests
    /// and for a second shutdown signal.
    pub async fn kill(&self) {
        self.stop(false).await;
    }

    /// Stops every task at once without waiting (for `Drop` of an owner that was not shut down).
    pub fn abort_now(&self) {
        let _ = self.inner.stop_tx.send_replace(true);
        for task in self.inner.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        if let Some(handle) = self.inner.handle.lock().unwrap().take() {
            handle.abort();
        }
    }

    /// Test hook: drop gossip to and from `addr` (a one-member view of a network partition).
    #[doc(hidden)]
    pub fn block_gossip_with(&self, addr: SocketAddr, blocked: bool) {
        self.block_gossip(addr, true, true, blocked);
    }

    /// Test hook: drop gossip datagrams to `addr` (`outbound`) and/or from it (`inbound`).
    #[doc(hidden)]
    pub fn block_gossip(&self, addr: SocketAddr, outbound: bool, inbound: bool, blocked: bool) {
        let t = &self.inner.transport;
        for (set, applies) in [(&t.blocked_out, outbound), (&t.blocked_in, inbound)] {
            if !applies {
                continue;
            }
            let mut set = set.lock().unwrap();
            if blocked {
                set.insert(addr);
            } else {
                set.remove(&addr);
            }
        }
    }

    async fn push_to_live_peers(&self) {
        let peers: Vec<SocketAddr> = {
            let chitchat = self.inner.chitchat.lock().await;
            chitchat
                .live_nodes()
                .filter(|id| **id != self.inner.chitchat_id)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        if let Some(handle) = self.inner.handle.lock().unwrap().as_ref() {
            for addr in peers {
                let _ = handle.gossip(addr);
            }
        }
    }

    async fn stop(&self, graceful: bool) {
        if self.inner.stop_tx.send_replace(true) {
            return;
        }
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        let handle = self.inner.handle.lock().unwrap().take();
        if let Some(handle) = handle {
            if graceful {
                if let Err(error) = tokio::time::timeout(Duration::from_secs(5), handle.shutdown()).await {
                    warn!(%error, "gossip did not stop within 5 s");
                }
            } else {
                handle.abort();
            }
        }
    }
}

impl Inner {
    /// Rebuilds the view from chitchat's state, publishes it if it changed, and emits events.
    async fn rebuild_view(&self) {
        let (candidates, announced_left, claims_to_fix, silent) = {
            let mut chitchat = self.chitchat.lock().await;
            let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
            let mut candidates = Vec::with_capacity(live.len());
            let mut silent = HashMap::new();
            let now = Instant::now();
            let mut heartbeats = self.heartbeats.lock().unwrap();
            heartbeats.retain(|id, _| live.contains(id));
            for id in &live {
                let Some(state) = chitchat.node_state(id) else {
                    continue;
                };
                let beat = u64::from(state.heartbeat());
                let entry = heartbeats.entry(id.clone()).or_insert((beat, now));
                if entry.0 != beat {
                    *entry = (beat, now);
                }
                silent.insert(MemberId::new(id.node_id.clone(), id.generation_id), now.duration_since(entry.1));
                match member_from_node_state(id, state) {
                    Ok(member) => candidates.push(member),
                    Err(error) => {
                        debug!(node = ?id, %error, "ignoring node with incomplete gossip state")
                    }
                }
            }
            let announced_left: HashSet<MemberId> = chitchat
                .node_states()
                .iter()
                .filter(|(_, state)| state.get(KEY_STATE) == Some(MemberState::Left.as_str()))
                .map(|(id, _)| MemberId::new(id.node_id.clone(), id.generation_id))
                .collect();
            drop(heartbeats);
            let claims_to_fix = self.handle_master_claims(&mut chitchat, &candidates);
            // Publish the master this member follows (the last view's), for the merge of groups.
            let master = self.view_tx.borrow().master.as_ref().map(ToString::to_string).unwrap_or_default();
            if chitchat.self_node_state().get(KEY_MASTER) != Some(master.as_str()) {
                chitchat.self_node_state().set(KEY_MASTER, master);
            }
            (candidates, announced_left, claims_to_fix, silent)
        };
        if claims_to_fix {
            self.poke.notify_one();
        }
        let compatible: Vec<Member> = candidates.into_iter().filter(|m| self.admit(m)).collect();
        let present: Vec<Member> = compatible.into_iter().filter(|m| m.state != MemberState::Left).collect();
        let present = self.drop_gone(present, &silent);
        let (members, replaced) = view::dedupe_node_ids(present, &self.local);
        for old in replaced {
            let id = ChitchatId::new(old.id.node_id.clone(), old.id.generation, old.gossip_addr);
            let newer = members.iter().find(|m| m.id.node_id == old.id.node_id);
            if let Some(newer) = newer.filter(|n| n.gossip_addr != old.gossip_addr)
                && self.duplicate_ids_logged.lock().unwrap().insert(id)
            {
                error!(
                    node_id = %old.id.node_id,
                    a = %old.gossip_addr,
                    b = %newer.gossip_addr,
                    "two members use node id {:?} ({} and {}); node ids must be unique, set --node-id",
                    old.id.node_id, old.gossip_addr, newer.gossip_addr
                );
            }
        }
        let old = self.view_tx.borrow().clone();
        let members = self.hold_other_groups(members, &old);
        let excluded = view::excluded_members(&members);
        let master = view::compute_master(&members, &excluded);
        if old.members == members && old.master == master && old.excluded == excluded {
            return;
        }
        if old.excluded != excluded {
            if excluded.is_empty() {
                info!(local = %self.local, "no member is excluded from ownership any more");
            } else {
                warn!(
                    local = %self.local,
                    excluded = %format_ids(&excluded),
                    "members that others cannot reach over the data plane are excluded from ownership until they can"
                );
            }
        }
        let new =
            Arc::new(ClusterView { version: old.version + 1, local: self.local.clone(), members, master, excluded });
        self.note_departures(&old, &new, &announced_left);
        let events = view::diff(&old, &new, &announced_left);
        for event in &events {
            log_event(&self.local, event);
        }
        self.view_tx.send_replace(new);
        for event in events {
            self.events_emitted.fetch_add(1, Ordering::Relaxed);
            // No receiver is fine: events are for whoever listens.
            let _ = self.events_tx.send(event);
        }
    }

    /// Keeps members of another group (see [`view::from_another_group`]) out of the view until
    /// the merge timers allow: this member has run `merge_first_run_delay`, and they have been
    /// visible without a break for `merge_run_delay`. Then they are admitted together, and the
    /// layers above settle whose data wins (the map's sides and merge policies).
    fn hold_other_groups(&self, members: Vec<Member>, previous: &ClusterView) -> Vec<Member> {
        let now = Instant::now();
        let (first_delay, run_delay) = (self.config.merge_first_run_delay, self.config.merge_run_delay);
        let local_joining = members.iter().find(|m| m.id == self.local).is_none_or(|m| m.state == MemberState::Joining);
        let mut groups = self.groups.lock().unwrap();
        let mut kept = Vec::with_capacity(members.len());
        let mut held: Vec<MemberId> = Vec::new();
        let mut admitted: Vec<&Member> = Vec::new();
        let mut admitting = Vec::new();
        for member in members {
            let absent_for = groups.departed.get(&member.id).map(|at| now.duration_since(*at));
            if !view::from_another_group(&member, previous, local_joining, absent_for, run_delay) {
                kept.push(member);
                continue;
            }
            let since = *groups.outside.entry(member.id.clone()).or_insert(now);
            if now.duration_since(since) >= run_delay && now.duration_since(groups.started) >= first_delay {
                admitting.push(kept.len());
                kept.push(member);
            } else {
                held.push(member.id.clone());
                let theirs = member.master.clone().expect("another group's member names its master");
                if groups.announced.insert(theirs.clone()) {
                    let wait = run_delay
                        .saturating_sub(now.duration_since(since))
                        .max(first_delay.saturating_sub(now.duration_since(groups.started)));
                    warn!(
                        local = %self.local,
                        their_master = %theirs,
                        our_master = ?previous.master.as_ref().map(ToString::to_string),
                        member = %member.id,
                        "found members of this cluster in another group (a healed network split, or groups that \
                         formed apart); merging them in about {wait:?} if they stay visible \
                         (merge_run_delay_seconds, merge_first_run_delay_seconds)"
                    );
                }
            }
        }
        // A member that vanished again restarts its wait (a flapping link).
        groups.outside.retain(|id, _| held.contains(id));
        if !admitting.is_empty() {
            admitted.extend(admitting.iter().map(|i| &kept[*i]));
            let masters: BTreeSet<MemberId> = admitted.iter().filter_map(|m| m.master.clone()).collect();
            for theirs in &masters {
                groups.announced.remove(theirs);
            }
            groups.merged += masters.len().max(1) as u64;
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            groups.last_merge = masters.iter().next().map(|m| (at, m.clone()));
            warn!(
                local = %self.local,
                our_master = ?previous.master.as_ref().map(ToString::to_string),
                their_masters = %format_ids(&masters),
                members = %format_ids(admitted.iter().map(|m| &m.id)),
                "merging another group of this cluster into this member's view"
            );
        }
        kept
    }

    /// Remembers members that left the view without announcing it (declared dead, dropped as
    /// gone), and forgets those back in it.
    fn note_departures(&self, old: &ClusterView, new: &ClusterView, announced_left: &HashSet<MemberId>) {
        let now = Instant::now();
        let mut groups = self.groups.lock().unwrap();
        for member in &old.members {
            if new.member(&member.id).is_none() && !announced_left.contains(&member.id) {
                groups.departed.insert(member.id.clone(), now);
            }
        }
        for member in &new.members {
            groups.departed.remove(&member.id);
        }
        if groups.departed.len() > DEPARTED_MAX {
            let mut by_age: Vec<(Instant, MemberId)> =
                groups.departed.iter().map(|(id, at)| (*at, id.clone())).collect();
            by_age.sort();
            for (_, id) in by_age.into_iter().take(groups.departed.len() - DEPARTED_MAX) {
                groups.departed.remove(&id);
            }
        }
    }

    /// Drops members whose data port refuses connections (some member reports them `gone`) and
    /// whose heartbeat has been silent for [`gone_silence`]: their process is gone, and waiting
    /// for the gossip failure detector (which cannot tell a dead process from a slow network)
    /// would only leave their partitions without an owner for longer. A member that turns out
    /// alive (its heartbeat moves again) is back in the next view.
    fn drop_gone(&self, members: Vec<Member>, silent: &HashMap<MemberId, Duration>) -> Vec<Member> {
        let reported: BTreeSet<MemberId> = members.iter().flat_map(|m| m.gone.iter().cloned()).collect();
        if reported.is_empty() {
            return members;
        }
        let threshold = gone_silence(self.config.gossip_interval);
        let (gone, kept): (Vec<Member>, Vec<Member>) = members.into_iter().partition(|m| {
            m.id != self.local && reported.contains(&m.id) && silent.get(&m.id).is_some_and(|s| *s >= threshold)
        });
        let mut logged = self.gone_logged.lock().unwrap();
        logged.retain(|id| gone.iter().any(|m| m.id == *id));
        for member in &gone {
            if logged.insert(member.id.clone()) {
                warn!(
                    local = %self.local,
                    node = %member.id,
                    addr = %member.data_addr,
                    "member's data port refuses connections and its heartbeat stopped: its process is gone"
                );
            }
        }
        kept
    }

    /// Returns whether the member may be in the view; logs an incompatible version once per member.
    fn admit(&self, member: &Member) -> bool {
        let ours = self.config.protocol_version;
        if ours.is_compatible_with(&member.protocol_version) {
            return true;
        }
        let id = ChitchatId::new(member.id.node_id.clone(), member.id.generation, member.gossip_addr);
        if self.incompatible.lock().unwrap().insert(id) {
            error!(
                peer = %member.id,
                peer_addr = %member.gossip_addr,
                peer_version = %member.protocol_version,
                our_version = %ours,
                "member {} at {} speaks protocol {}, incompatible with this member's {}; it is not admitted \
                 (run the same major version on every member)",
                member.id, member.gossip_addr, member.protocol_version, ours
            );
        }
        false
    }

    /// Applies forced-master rules to this member's own keys: take a claim when another member asked
    /// us to become master, and drop our claim once someone holds a higher one. Returns true when
    /// a key changed.
    fn handle_master_claims(&self, chitchat: &mut Chitchat, members: &[Member]) -> bool {
        let Some(local) = members.iter().find(|m| m.id == self.local) else {
            return false;
        };
        let highest_other = members
            .iter()
            .filter(|m| m.id != self.local && m.state == MemberState::Active)
            .map(|m| m.master_claim)
            .max();
        let highest_other = highest_other.unwrap_or(0);
        let mut changed = false;
        for member in members {
            let Some((node_id, generation, nonce)) = &member.handover else {
                continue;
            };
            if **node_id != *self.local.node_id || *generation != self.local.generation {
                continue;
            }
            let key = format!("{}:{nonce}", member.id);
            if self.handovers_done.lock().unwrap().insert(key) && local.state == MemberState::Active {
                let claim = highest_other.max(local.master_claim) + 1;
                chitchat.self_node_state().set(KEY_MASTER_CLAIM, claim.to_string());
                info!(requested_by = %member.id, claim, "taking over as master on request");
                changed = true;
            }
        }
        if !changed && local.master_claim > 0 && highest_other > local.master_claim {
            chitchat.self_node_state().delete(KEY_MASTER_CLAIM);
            changed = true;
        }
        changed
    }
}

fn log_event(local: &MemberId, event: &MemberEvent) {
    match event {
        MemberEvent::Joined { member } => info!(
            %local, node = %member.id, addr = %member.gossip_addr, data = %member.data_addr, state = %member.state,
            "member joined"
        ),
        MemberEvent::StateChanged { member, previous } => info!(
            %local, node = %member.id, addr = %member.gossip_addr, from = %previous, to = %member.state,
            "member state changed"
        ),
        MemberEvent::Left { member } => {
            info!(%local, node = %member.id, addr = %member.gossip_addr, "member left")
        }
        MemberEvent::Dead { member } => {
            warn!(%local, node = %member.id, addr = %member.gossip_addr, "member declared dead")
        }
        MemberEvent::MasterChanged { previous, current } => info!(
            %local,
            previous = previous.as_ref().map(ToString::to_string).unwrap_or_else(|| "none".into()),
            current = current.as_ref().map(ToString::to_string).unwrap_or_else(|| "none".into()),
            "master changed"
        ),
    }
}

async fn view_loop(inner: Arc<Inner>, mut live_watch: watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>>) {
    let mut stop = inner.stop_tx.subscribe();
    // The watch fires on liveness and key changes; the tick is a safety net (and picks up
    // hand-over requests) in case a change slipped between two notifications, and notices silent
    // heartbeats of members reported gone.
    let mut tick = tokio::time::interval(inner.config.gossip_interval / 2);
    loop {
        tokio::select! {
            changed = live_watch.changed() => if changed.is_err() { return },
            _ = inner.poke.notified() => {},
            _ = tick.tick() => {},
            _ = stop.changed() => return,
        }
        inner.rebuild_view().await;
    }
}

/// Probes the discovery candidates that are not live members, so that listed peers that are down
/// are found when they come up, and two groups that could not see each other merge when they can.
/// Candidates that do not answer are probed less and less often, and a round sends a bounded
/// number of probes (see [`probe::ProbeSchedule`]).
async fn probe_loop(inner: Arc<Inner>) {
    let mut stop = inner.stop_tx.subscribe();
    let mut candidates = inner.candidates.clone();
    let own = inner.config.gossip_addr;
    let mut schedule = probe::ProbeSchedule::default();
    let mut listed: Vec<SocketAddr> = Vec::new();
    loop {
        let joining = inner.view_tx.borrow().local_member().is_none_or(|m| m.state == MemberState::Joining);
        let wait = if joining { inner.config.gossip_interval } else { inner.config.probe_interval };
        let targets: Vec<SocketAddr> = {
            let chitchat = inner.chitchat.lock().await;
            let known: HashSet<SocketAddr> = chitchat.live_nodes().map(|id| id.gossip_advertise_addr).collect();
            let current = candidates.borrow_and_update();
            let mut now_listed = current.clone();
            now_listed.sort_unstable();
            if now_listed != listed {
                // Discovery changed its list: every candidate is probed afresh.
                listed = now_listed;
                schedule.reset();
            }
            current.iter().filter(|addr| **addr != own && !known.contains(addr)).copied().collect()
        };
        let due = schedule.due(&targets, Instant::now(), wait);
        if !due.is_empty()
            && let Some(handle) = inner.handle.lock().unwrap().as_ref()
        {
            for addr in &due {
                let _ = handle.gossip(*addr);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            changed = candidates.changed() => if changed.is_err() {
                // Discovery stopped: keep probing the last known candidates.
                tokio::time::sleep(wait).await;
            },
            _ = stop.changed() => return,
        }
    }
}
