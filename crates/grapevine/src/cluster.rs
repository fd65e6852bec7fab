//! `Cluster`: one member, tying discovery, membership and the admin endpoint together.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grapevine_discovery::mdns::{self, Announcement, InterfaceError, MdnsDiscovery, MdnsError, MdnsSettings};
use grapevine_discovery::{DiscoveryHandle, StaticDiscovery};
use grapevine_map::{LocalMapStats, MapError, MapService, NearCacheStats, RELIABLE_TOPIC_MAP_PREFIX};
use grapevine_membership::{
    ClusterView, Member, MemberEvent, MemberId, MemberState, Membership, MembershipConfig, MembershipError,
    ProtocolVersion,
};
use grapevine_net::{Net, NetConfig};
use grapevine_topic::{ReliableTopic, Topic, TopicError, TopicKind, TopicService};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, DiscoveryMode};
use crate::map::DistributedMap;
use crate::ports;
use crate::singleton::MasterTask;
use crate::stats::{
    ClusterStats, LocalStats, MapStats, MemberMapStats, MemberStats, MemberTopicStats, RuntimeConfig, TopicSummary,
    add_near_cache,
};

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No port of the range was free.
    #[error(
        "no free {what} port in {ip}:{first}-{last}; stop what uses them, or choose another range with \
         `port`/`admin_port` and `port_count`"
    )]
    PortRangeExhausted {
        /// Which port (member or admin).
        what: &'static str,
        /// The interface address.
        ip: IpAddr,
        /// First port tried.
        first: u16,
        /// Last port tried.
        last: u16,
    },
    /// A socket could not be bound for another reason than the port being in use.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Gossip failed to start.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// mDNS discovery could not start.
    #[error(transparent)]
    Mdns(#[from] MdnsError),
}

/// Errors of cluster operations (not start-up).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A membership operation failed (unknown member, timeout, ...).
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The member is shutting down.
    #[error("this member is shutting down")]
    ShuttingDown,
}

/// A graceful shutdown that left before every partition was handed over: the hand-over did not
/// finish within `shutdown_timeout_seconds`, and the member left anyway. The other members take
/// over as after a crash (but at once, without waiting for failure detection): each partition it
/// still owned is served by its first synchronous backup, which holds every acknowledged write;
/// entries of maps without backups in those partitions are lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the partitions were not all handed over within shutdown_timeout_seconds = {timeout_seconds}: {owned_partitions} \
     partitions owned and {backup_partitions} backup replicas were still on this member; it left anyway, so their \
     backups take over, and the {unprotected_entries} entries of maps without backups in them are lost"
)]
pub struct HandoverIncomplete {
    /// The hand-over wait, `shutdown_timeout_seconds`.
    pub timeout_seconds: u64,
    /// Partitions this member still owned.
    pub owned_partitions: u32,
    /// Partitions this member still held a backup replica of.
    pub backup_partitions: u32,
    /// Entries of maps with `backup_count = 0` in the partitions it still owned: no other member
    /// has them.
    pub unprotected_entries: u64,
}

/// The addresses a running member uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The interface address listened on (`0.0.0.0` = every interface).
    pub bind: IpAddr,
    /// The gossip (UDP) address advertised to peers.
    pub gossip: SocketAddr,
    /// The data (TCP) address advertised to peers.
    pub data: SocketAddr,
    /// The admin HTTP address bound, if the endpoint is enabled.
    pub admin: Option<SocketAddr>,
}

/// Whether this member can serve, for load balancers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// True when the member is active in a cluster, holds a current partition table, and no map
    /// with split-brain protection (`min_cluster_size`) is below its minimum here.
    pub healthy: bool,
    /// The member's life-cycle state.
    pub state: MemberState,
    /// Why it is not healthy.
    pub reason: Option<String>,
    /// Members in the view.
    pub members: usize,
    /// The master's node id.
    pub master: Option<String>,
}

/// Discovery for the builder: a static list of peers, or mDNS.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    members: Vec<String>,
    mode: DiscoveryMode,
    mdns_interfaces: Vec<String>,
}

impl Discovery {
    /// A static list of `host`, `host:port` or `host:first-last` entries.
    pub fn static_list<I, S>(members: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Discovery { members: members.into_iter().map(Into::into).collect(), ..Discovery::default() }
    }

    /// mDNS on the local network, on the default interfaces (see `mdns_interfaces` in
    /// [`Config`]).
    pub fn mdns() -> Self {
        Discovery { mode: DiscoveryMode::Mdns, ..Discovery::default() }
    }

    /// mDNS on these interfaces only (names like `eth1`, or addresses).
    pub fn mdns_on<I, S>(interfaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Discovery { mdns_interfaces: interfaces.into_iter().map(Into::into).collect(), ..Discovery::mdns() }
    }

    /// No discovery: a single-node cluster until others list this member.
    pub fn none() -> Self {
        Discovery::default()
    }
}

/// Builds and starts a member. Everything not set here comes from [`Config`].
#[derive(Debug, Clone, Default)]
pub struct ClusterBuilder {
    config: Config,
    protocol_version: Option<ProtocolVersion>,
}

impl ClusterBuilder {
    /// The cluster name (required).
    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.config.cluster_name = name.into();
        self
    }

    /// Replaces the whole configuration (the cluster name included).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// How to find peers.
    pub fn discovery(mut self, discovery: Discovery) -> Self {
        self.config.members = discovery.members;
        self.config.discovery = discovery.mode;
        self.config.mdns_interfaces = discovery.mdns_interfaces;
        self
    }

    /// The interface address to listen on and advertise.
    pub fn bind(mut self, ip: IpAddr) -> Self {
        self.config.bind = Some(ip);
        self
    }

    /// The member port (0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }

    /// The node id.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.config.node_id = Some(node_id.into());
        self
    }

    /// Serve the admin HTTP endpoint or not.
    pub fn admin(mut self, enabled: bool) -> Self {
        self.config.admin_enabled = enabled;
        self
    }

    /// Publishes another protocol version than this build's, to test version checks.
    #[doc(hidden)]
    pub fn protocol_version_for_tests(mut self, version: ProtocolVersion) -> Self {
        self.protocol_version = Some(version);
        self
    }

    /// Starts the member and waits until it has joined the cluster (or found none within the
    /// join timeout and runs alone).
    pub async fn start(self) -> Result<Cluster, StartError> {
        Cluster::start_with(self.config, self.protocol_version).await
    }
}

/// A running cluster member. Cheap to clone; every clone is the same member.
#[derive(Clone, Debug)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    addresses: Addresses,
    membership: Membership,
    discovery: tokio::sync::Mutex<DiscoveryHandle>,
    net: Net,
    maps: Arc<MapService>,
    topics: TopicService,
    started: Instant,
    cancel: CancellationToken,
    tasks: TaskTracker,
    shutting_down: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No background task outlives the member: stop whatever a missing shutdown() left running.
        self.cancel.cancel();
        self.membership.abort_now();
        let net = self.net.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { net.shutdown().await });
        }
    }
}

impl Cluster {
    /// A builder with the default configuration.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts a member with `config`.
    pub async fn start(config: Config) -> Result<Cluster, StartError> {
        Cluster::start_with(config, None).await
    }

    async fn start_with(config: Config, protocol_version: Option<ProtocolVersion>) -> Result<Cluster, StartError> {
        for warning in config.validate()? {
            warn!("{warning}");
        }
        // mDNS chooses its interfaces first: when `bind` is unset, they say what to advertise.
        let mdns_interfaces = match config.discovery {
            DiscoveryMode::Mdns => Some(select_mdns_interfaces(&config)?),
            DiscoveryMode::Static => None,
        };
        let static_discovery = match config.discovery {
            DiscoveryMode::Static => {
                let seeds =
                    config.seeds().map_err(|e| ConfigError { key: "members".into(), message: e.to_string() })?;
                if seeds.is_empty() {
                    info!(
                        "static discovery with an empty member list: running as a single-node cluster until other \
                         members list this one (set `members`, or `discovery = \"mdns\"` on every member)"
                    );
                }
                Some(StaticDiscovery::new(seeds, Duration::from_secs(config.member_refresh_seconds)).start().await)
            }
            DiscoveryMode::Mdns => None,
        };
        let first_candidate = static_discovery.as_ref().and_then(|d| d.candidates().borrow().first().copied());

        let listen_ip = config.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let (data_listener, gossip_socket) = ports::bind_member_ports(listen_ip, config.port_range()).await?;
        let port = gossip_socket.local_addr().port();
        let advertise_ip =
            match (config.public_address.or(config.bind.filter(|ip| !ip.is_unspecified())), &mdns_interfaces) {
                (Some(ip), _) => ip,
                (None, Some(interfaces)) => mdns::interfaces::advertise_ip(interfaces).map_err(mdns_config_error)?,
                (None, None) => ports::default_advertise_ip(first_candidate),
            };
        let advertised = SocketAddr::new(advertise_ip, port);

        let admin_listener = if config.admin_enabled {
            let admin_ip = config.admin_bind.or(config.bind).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            Some(ports::bind_tcp_in_range("admin", admin_ip, config.admin_port_range()).await?)
        } else {
            None
        };
        let admin_bound = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let admin_advertised =
            admin_bound.map(|a| if a.ip().is_unspecified() { SocketAddr::new(advertise_ip, a.port()) } else { a });

        // The port is unique on the host when listening on every interface; with a specific
        // `bind`, only the address and port together are.
        let node_id = config.node_id.clone().unwrap_or_else(|| match config.bind.filter(|ip| !ip.is_unspecified()) {
            Some(ip) => format!("{}-{ip}-{port}", ports::hostname()),
            None => format!("{}-{port}", ports::hostname()),
        });
        let generation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut membership_config =
            MembershipConfig::new(config.cluster_name.clone(), node_id, generation, advertised, advertised);
        membership_config.admin_addr = admin_advertised;
        membership_config.gossip_interval = config.gossip_interval();
        membership_config.phi_threshold = config.gossip.phi_threshold;
        membership_config.dead_member_grace = Duration::from_secs(config.gossip.dead_member_grace_seconds);
        membership_config.probe_interval = Duration::from_millis(config.gossip.probe_interval_ms);
        membership_config.attributes = config.attributes.clone();
        membership_config.merge_first_run_delay = Duration::from_secs_f64(config.merge_first_run_delay_seconds);
        membership_config.merge_run_delay = Duration::from_secs_f64(config.merge_run_delay_seconds);
        if let Some(version) = protocol_version {
            membership_config.protocol_version = version;
        }
        let discovery = match (static_discovery, mdns_interfaces) {
            (Some(discovery), _) => discovery,
            (None, interfaces) => {
                let version = membership_config.protocol_version;
                let announcement = Announcement {
                    cluster_name: config.cluster_name.clone(),
                    node_id: membership_config.node_id.clone(),
                    generation,
                    gossip_addr: advertised,
                    data_addr: advertised,
                    protocol_version: (version.major, version.minor),
                };
                let settings = MdnsSettings {
                    interfaces: interfaces.unwrap_or_default(),
                    query_interval: Duration::from_millis(config.mdns_query_interval_ms),
                    // Long enough for a running cluster to answer (responders answer within 120 ms),
                    // short enough not to delay a lone member's start much.
                    initial_wait: Duration::from_millis(config.gossip.join_timeout_ms).min(Duration::from_secs(2)),
                    candidates_max: mdns::CANDIDATES_MAX,
                };
                MdnsDiscovery::new(announcement, settings)?.start().await?
            }
        };
        let membership = Membership::start(membership_config, gossip_socket, discovery.candidates()).await?;

        let mut net_config = NetConfig::new(
            config.cluster_name.clone(),
            membership.local_id().clone(),
            membership.config().protocol_version,
        );
        net_config.frame_bytes_max = config.net.frame_bytes_max;
        net_config.connect_timeout = Duration::from_millis(config.net.connect_timeout_ms);
        net_config.outbound_ports =
            config.outbound_ports().map_err(|message| ConfigError { key: "net.outbound_ports".into(), message })?;
        // Idle peers are pinged once a gossip interval, so that the data plane knows every peer's
        // reachability (see `reachability_reports`).
        net_config.ping_interval = Some(config.gossip_interval());
        let net = Net::start(net_config, data_listener);
        let maps = Arc::new(MapService::start(net.clone(), membership.clone(), config.map_settings()));
        let topics = TopicService::start(net.clone(), membership.clone(), maps.clone(), config.topic_settings());

        let cluster = Cluster {
            inner: Arc::new(Inner {
                addresses: Addresses { bind: listen_ip, gossip: advertised, data: advertised, admin: admin_bound },
                config,
                membership,
                discovery: tokio::sync::Mutex::new(discovery),
                net,
                maps,
                topics,
                started: Instant::now(),
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
                shutting_down: AtomicBool::new(false),
            }),
        };
        cluster.inner.tasks.spawn(peer_directory(
            cluster.inner.membership.clone(),
            cluster.inner.net.clone(),
            cluster.inner.cancel.clone(),
        ));
        cluster.inner.tasks.spawn(reachability_reports(
            cluster.inner.membership.clone(),
            cluster.inner.net.clone(),
            cluster.inner.cancel.clone(),
        ));
        if let Some(listener) = admin_listener {
            cluster.serve_admin(listener);
        }
        let join_timeout = Duration::from_millis(cluster.inner.config.gossip.join_timeout_ms);
        cluster.inner.membership.join(join_timeout).await;
        // Ready means usable: wait (bounded) for the partition table, so maps work on return.
        let table_wait = join_timeout.max(Duration::from_secs(5));
        if let Err(reason) = cluster.inner.maps.wait_table_current(table_wait).await {
            warn!(%reason, waited = ?table_wait, "started without a current partition table; /health reports 503 until it arrives");
        }
        info!(
            node = %cluster.local(),
            cluster = %cluster.name(),
            gossip = %cluster.inner.addresses.gossip,
            admin = ?cluster.inner.addresses.admin,
            members = cluster.view().len(),
            "member started"
        );
        Ok(cluster)
    }

    fn serve_admin(&self, listener: TcpListener) {
        #[cfg(feature = "admin")]
        {
            let cluster = self.downgrade();
            let cancel = self.inner.cancel.clone();
            self.inner.tasks.spawn(crate::admin::serve(cluster, listener, cancel));
        }
        #[cfg(not(feature = "admin"))]
        {
            drop(listener);
            warn!("admin_enabled is set but grapevine was built without the `admin` feature; no admin endpoint");
        }
    }

    /// Runs `task` as one of the member's background tasks (awaited on shutdown).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn spawn_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.inner.tasks.spawn(task);
    }

    /// A handle that does not keep the member alive (for its own background tasks).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn downgrade(&self) -> WeakCluster {
        WeakCluster { inner: Arc::downgrade(&self.inner) }
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.inner.config.cluster_name
    }

    /// This member's id.
    pub fn local(&self) -> &MemberId {
        self.inner.membership.local_id()
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The addresses bound and advertised.
    pub fn addresses(&self) -> Addresses {
        self.inner.addresses
    }

    /// The current view of the cluster.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.membership.view()
    }

    /// A receiver of every new view.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<ClusterView>> {
        self.inner.membership.watch()
    }

    /// The members in the view, oldest first.
    pub fn members(&self) -> Vec<Member> {
        self.view().members.clone()
    }

    /// Member events (joined, state changed, left, dead, master changed) from now on. The channel
    /// is bounded; a receiver that falls behind gets `Lagged` and should re-read [`Cluster::view`].
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.inner.membership.events()
    }

    /// True when this member is the master.
    pub fn is_master(&self) -> bool {
        self.view().is_master()
    }

    /// Runs singleton work on the master: `make` is called to start a task whenever this member
    /// becomes master, and the task's token is cancelled when it stops being master (or on
    /// shutdown). The task should return promptly when cancelled; after
    /// [`crate::MASTER_TASK_STOP_TIMEOUT`] it is aborted.
    ///
    /// During a hand-over, gossip reaches members at slightly different times, so the old and new
    /// master may overlap for up to a gossip round or two; singleton work must tolerate that.
    pub fn run_while_master<F, Fut>(&self, name: &str, make: F) -> MasterTask
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        MasterTask::spawn(name.to_string(), self.inner.membership.clone(), &self.inner.cancel, make)
    }

    /// The distributed map `name`, typed. Its settings (backup counts, default expiry) come from the
    /// `[maps.<name>]` section of the configuration (or `[maps.default]`), on the member owning
    /// each partition: keep them the same on every member.
    pub fn map<K, V>(&self, name: &str) -> Result<DistributedMap<K, V>, MapError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        DistributedMap::new(name, self.inner.maps.clone())
    }

    /// The map service: every map operation on encoded (raw) keys and values, as the RESP
    /// endpoint, the admin routes and tools use it. A map's keys and values are whatever bytes its
    /// users agree on; [`Cluster::map`] encodes typed ones with the data plane's codec.
    pub fn map_service(&self) -> &MapService {
        &self.inner.maps
    }

    /// The topic `name`: publish messages of type `T` to every subscriber in the cluster. Its
    /// subscribers' queue size comes from `[topics.<name>]` (or `[topics.default]`).
    pub fn topic<T>(&self, name: &str) -> Result<Topic<T>, TopicError>
    where
        T: Serialize + DeserializeOwned,
    {
        self.inner.topics.topic(name)
    }

    /// The reliable topic `name`: messages of type `T` kept in a ring buffer in the partition that
    /// owns the name, with that partition's backups, each with a sequence number. Its settings
    /// (capacity, backups, overload policy) come from `[reliable_topics.<name>]` (or
    /// `[reliable_topics.default]`): keep them the same on every member.
    pub fn reliable_topic<T>(&self, name: &str) -> Result<ReliableTopic<T>, TopicError>
    where
        T: Serialize + DeserializeOwned,
    {
        self.inner.topics.reliable_topic(name)
    }

    /// The topic service (statistics, raw access for tools).
    pub fn topic_service(&self) -> &TopicService {
        &self.inner.topics
    }

    /// The data plane, for tests that inject faults.
    #[doc(hidden)]
    pub fn net(&self) -> &Net {
        &self.inner.net
    }

    /// Makes the member with `node_id` master until it leaves, and waits (up to `timeout`) until
    /// this member sees it as master.
    pub async fn handover_master(&self, node_id: &str, timeout: Duration) -> Result<MemberId, ClusterError> {
        if self.inner.shutting_down.load(Ordering::Relaxed) {
            return Err(ClusterError::ShuttingDown);
        }
        let target = self.inner.membership.request_master_handover(node_id).await?;
        self.inner
            .membership
            .wait_for_view("the master hand-over", timeout, |v| v.master.as_ref() == Some(&target))
            .await?;
        Ok(target)
    }

    /// Whether this member can serve (for load balancers).
    pub fn health(&self) -> Health {
        let view = self.view();
        let state = view.local_member().map(|m| m.state).unwrap_or(MemberState::Joining);
        let reason = if self.inner.shutting_down.load(Ordering::Relaxed) {
            Some("shutting down".to_string())
        } else {
            match state {
                MemberState::Active => {
                    self.inner.maps.table_status().and_then(|()| self.inner.maps.protection_status()).err()
                }
                MemberState::Joining => Some("joining: looking for the cluster".to_string()),
                MemberState::Leaving => Some("leaving: handing over before shutdown".to_string()),
                MemberState::Left => Some("left the cluster".to_string()),
            }
        };
        Health {
            healthy: reason.is_none(),
            state,
            reason,
            members: view.len(),
            master: view.master.as_ref().map(|m| m.node_id.to_string()),
        }
    }

    /// The `/stats` document as this member sees the cluster.
    pub async fn stats(&self) -> ClusterStats {
        let (maps, topics) = self.map_and_topic_stats().await;
        let view = self.view();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let health = self.health();
        let config = &self.inner.config;
        let addresses = self.inner.addresses;
        let membership_config = self.inner.membership.config();
        let range = config.port_range();
        ClusterStats {
            cluster_name: config.cluster_name.clone(),
            node_id: self.local().node_id.to_string(),
            generation: self.local().generation,
            master: view.master.as_ref().map(|m| m.node_id.to_string()),
            view_version: view.version,
            members: view
                .members
                .iter()
                .map(|m| MemberStats {
                    node_id: m.id.node_id.to_string(),
                    generation: m.id.generation,
                    gossip_addr: m.gossip_addr.to_string(),
                    data_addr: m.data_addr.to_string(),
                    admin_addr: m.admin_addr.map(|a| a.to_string()),
                    protocol_version: m.protocol_version.to_string(),
                    state: m.state.to_string(),
                    uptime_s: m.uptime_ms(now_ms) / 1000,
                    is_master: view.master.as_ref() == Some(&m.id),
                    attributes: m.attributes.clone(),
                })
                .collect(),
            excluded: view.excluded.iter().map(|m| m.node_id.to_string()).collect(),
            local: LocalStats {
                state: health.state.to_string(),
                healthy: health.healthy,
                health_reason: health.reason,
                settled: self.inner.maps.is_settled(),
                uptime_s: self.inner.started.elapsed().as_secs(),
                config: RuntimeConfig {
                    bind: addresses.bind.to_string(),
                    public_address: addresses.gossip.ip().to_string(),
                    port: addresses.gossip.port(),
                    port_range: format!("{}-{}", range.start(), range.end()),
                    admin_addr: addresses.admin.map(|a| a.to_string()),
                    discovery: match config.discovery {
                        DiscoveryMode::Mdns => "mdns".into(),
                        DiscoveryMode::Static if config.members.is_empty() => "none (single node)".into(),
                        DiscoveryMode::Static => "static".into(),
                    },
                    members: config.members.clone(),
                    gossip_interval_ms: config.gossip.interval_ms,
                    phi_threshold: config.gossip.phi_threshold,
                    failure_detection_ms: membership_config.failure_detection_time().as_millis() as u64,
                    dead_member_grace_s: config.gossip.dead_member_grace_seconds,
                    join_timeout_ms: config.gossip.join_timeout_ms,
                    probe_interval_ms: config.gossip.probe_interval_ms,
                    merge_first_run_delay_s: config.merge_first_run_delay_seconds,
                    merge_run_delay_s: config.merge_run_delay_seconds,
                    event_invalidation: config.event_invalidation,
                },
            },
            gossip: self.inner.membership.stats(),
            partitions: Some(self.inner.maps.partition_summary()),
            maps,
            topics,
        }
    }

    /// Per-map and per-topic statistics, summed over members, with each member's part. The ring
    /// buffer maps of reliable topics are counted with their topics.
    async fn map_and_topic_stats(&self) -> (Vec<MapStats>, Vec<TopicSummary>) {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let (per_member, near_caches, topic_stats) = tokio::join!(
            self.inner.maps.cluster_stats(TIMEOUT),
            self.inner.maps.near_cache_cluster_stats(TIMEOUT),
            self.inner.topics.cluster_stats(TIMEOUT),
        );
        let mut maps: BTreeMap<String, MapStats> = BTreeMap::new();
        let mut rings: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (member, outcome) in per_member {
            let Ok(local) = outcome else { continue };
            for m in local.maps {
                if let Some(topic) = m.name.strip_prefix(RELIABLE_TOPIC_MAP_PREFIX) {
                    let ring = rings.entry(topic.to_string()).or_default();
                    // The bounds entry of each ring is not a message.
                    ring.0 += m.owned_entries.saturating_sub(1);
                    ring.1 += m.memory_bytes;
                    continue;
                }
                let total = maps
                    .entry(m.name.clone())
                    .or_insert_with(|| MapStats { name: m.name.clone(), ..Default::default() });
                total.owned_entries += m.owned_entries;
                total.backup_entries += m.backup_entries;
                total.hits += m.hits;
                total.gets += m.gets;
                total.puts += m.puts;
                total.removes += m.removes;
                total.memory_bytes += m.memory_bytes;
                total.under_replicated_partitions += m.under_replicated_partitions;
                total.under_replicated_writes += m.under_replicated_writes;
                total.get_p99_us = total.get_p99_us.max(m.get_p99_us);
                total.put_p99_us = total.put_p99_us.max(m.put_p99_us);
                total.backup_count = m.backup_count;
                total.async_backup_count = m.async_backup_count;
                total.merge_kept_existing += m.merge_kept_existing;
                total.merge_took_merging += m.merge_took_merging;
                total.merge_policy = m.merge_policy.clone();
                total.min_cluster_size = m.min_cluster_size;
                total.per_member.push(MemberMapStats {
                    node_id: member.node_id.to_string(),
                    stats: m,
                    near_cache: None,
                });
            }
        }
        for (member, outcome) in near_caches {
            let Ok(caches) = outcome else { continue };
            for cache in caches {
                let total = maps
                    .entry(cache.map.clone())
                    .or_insert_with(|| MapStats { name: cache.map.clone(), ..Default::default() });
                let sum = total
                    .near_cache
                    .get_or_insert_with(|| NearCacheStats { map: cache.map.clone(), ..Default::default() });
                add_near_cache(sum, &cache);
                let node_id = member.node_id.to_string();
                match total.per_member.iter_mut().find(|p| p.node_id == node_id) {
                    Some(part) => part.near_cache = Some(cache),
                    None => total.per_member.push(MemberMapStats {
                        node_id,
                        stats: LocalMapStats { name: cache.map.clone(), ..Default::default() },
                        near_cache: Some(cache),
                    }),
                }
            }
        }
        let mut topics: BTreeMap<(String, String), TopicSummary> = BTreeMap::new();
        for (member, outcome) in topic_stats {
            let Ok(stats) = outcome else { continue };
            for t in stats {
                let total = topics.entry((t.name.clone(), t.kind.clone())).or_insert_with(|| TopicSummary {
                    name: t.name.clone(),
                    kind: t.kind.clone(),
                    ..Default::default()
                });
                total.published += t.published;
                total.received += t.received;
                total.subscribers += t.subscribers;
                total.dropped += t.dropped;
                total.lost += t.lost;
                total.malformed += t.malformed;
                total.per_member.push(MemberTopicStats { node_id: member.node_id.to_string(), stats: t });
            }
        }
        for (name, (stored, memory_bytes)) in rings {
            let key = (name.clone(), TopicKind::Reliable.as_str().to_string());
            let total = topics.entry(key).or_insert_with(|| TopicSummary {
                name,
                kind: TopicKind::Reliable.as_str().to_string(),
                ..Default::default()
            });
            total.stored = stored;
            total.memory_bytes = memory_bytes;
        }
        (maps.into_values().collect(), topics.into_values().collect())
    }

    /// Leaves the cluster gracefully: announces the departure so peers see `Left` within a gossip
    /// round or two, then stops every task of this member.
    ///
    /// The hand-over waits at most `shutdown_timeout_seconds`; past that the member leaves
    /// anyway, logging what it still held ([`Cluster::shutdown_reporting`] also returns it).
    pub async fn shutdown(&self) {
        let _ = self.shutdown_reporting().await;
    }

    /// [`Cluster::shutdown`], telling whether every partition was handed over before the member
    /// left. `Ok` also when another call already shut it down.
    pub async fn shutdown_reporting(&self) -> Result<(), HandoverIncomplete> {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        info!(node = %self.local(), "shutting down gracefully");
        self.inner.membership.set_state(MemberState::Leaving).await;
        let timeout = Duration::from_secs(self.inner.config.shutdown_timeout_seconds);
        let outcome = match self.inner.maps.wait_handoff(timeout).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let local = self.inner.maps.local_stats();
                let incomplete = HandoverIncomplete {
                    timeout_seconds: timeout.as_secs(),
                    owned_partitions: local.owned_partitions,
                    backup_partitions: local.backup_partitions,
                    unprotected_entries: local
                        .maps
                        .iter()
                        .filter(|m| m.backup_count == 0)
                        .map(|m| m.owned_entries)
                        .sum(),
                };
                warn!(%error, "leaving before every partition was handed over: {incomplete}");
                Err(incomplete)
            }
        };
        // Members still using a table from before the hand-over get "wrong owner" answers and
        // retry elsewhere; give requests already on the wire a moment to be answered.
        tokio::time::sleep(self.inner.config.gossip_interval().min(Duration::from_millis(500)) * 2).await;
        self.inner.membership.shutdown().await;
        self.inner.topics.shutdown().await;
        self.inner.maps.shutdown().await;
        self.inner.net.shutdown().await;
        self.stop_tasks().await;
        info!(node = %self.local(), "shut down");
        outcome
    }

    /// Stops at once without telling peers, as a crash would (they detect it as dead). For tests,
    /// and for a second shutdown signal.
    pub async fn kill(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.membership.kill().await;
        self.inner.topics.shutdown().await;
        self.inner.maps.shutdown().await;
        self.inner.net.shutdown().await;
        self.stop_tasks().await;
    }

    async fn stop_tasks(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.inner.tasks.wait()).await.is_err() {
            warn!("background tasks did not stop within 10 s");
        }
        self.inner.discovery.lock().await.stop().await;
    }

    /// Test hook: drop gossip with `addr`, as a network partition would.
    #[doc(hidden)]
    pub fn block_gossip_with(&self, addr: SocketAddr, blocked: bool) {
        self.inner.membership.block_gossip_with(addr, blocked);
    }

    /// Test hook: drop gossip to `addr` (`outbound`) and/or from it (`inbound`).
    #[doc(hidden)]
    pub fn block_gossip(&self, addr: SocketAddr, outbound: bool, inbound: bool, blocked: bool) {
        self.inner.membership.block_gossip(addr, outbound, inbound, blocked);
    }
}

/// The interfaces mDNS runs on; a problem is a configuration error naming the key to change.
fn select_mdns_interfaces(config: &Config) -> Result<Vec<mdns::HostInterface>, StartError> {
    let specs =
        config.mdns_interface_specs().map_err(|message| ConfigError { key: "mdns_interfaces".into(), message })?;
    let host = mdns::interfaces::host_interfaces()
        .map_err(|e| MdnsError::Daemon(format!("cannot list the network interfaces: {e}")))?;
    let selected = mdns::interfaces::select(&specs, config.bind, &host).map_err(mdns_config_error)?;
    if let Some(bind) = config.bind.filter(|ip| !ip.is_unspecified())
        && !mdns::interfaces::holds(&selected, bind)
    {
        warn!(
            %bind,
            "the bind address is on none of the mDNS interfaces ({}): peers find this member there but must \
             route to {bind}; set `mdns_interfaces` to the interface of `bind` unless that is intended",
            selected.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(selected)
}

fn mdns_config_error(error: InterfaceError) -> StartError {
    let key = match error {
        InterfaceError::Ambiguous { .. }
        | InterfaceError::NoUsableAddress { .. }
        | InterfaceError::BindNotFound { .. } => "bind",
        InterfaceError::NoSuchInterface { .. } | InterfaceError::NoInterface { .. } => "mdns_interfaces",
    };
    StartError::Config(ConfigError { key: key.into(), message: error.to_string() })
}

/// Keeps the data plane's directory of member addresses in step with the view, and drops
/// connections to members that left or died (their pending requests fail at once).
async fn peer_directory(membership: Membership, net: Net, cancel: CancellationToken) {
    let mut views = membership.watch();
    let mut known: std::collections::HashSet<MemberId> = std::collections::HashSet::new();
    loop {
        let view = views.borrow_and_update().clone();
        let current: std::collections::HashSet<MemberId> = view.members.iter().map(|m| m.id.clone()).collect();
        for member in &view.members {
            if member.id != view.local && !known.contains(&member.id) {
                net.set_peer_address(member.id.clone(), member.data_addr);
            }
        }
        for gone in known.difference(&current) {
            net.forget_peer(gone);
        }
        known = current;
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

/// Publishes, twice a gossip interval, what the data plane knows of the members in the view:
/// those it has heard nothing from for the failure-detection time although gossip says they are
/// alive (a data-plane-only cut: the membership layer excludes them from ownership when the
/// reports say so), and those whose data port refuses connections (their process is gone: they
/// are declared dead as soon as their heartbeat is silent too, well before gossip's failure
/// detector would).
async fn reachability_reports(membership: Membership, net: Net, cancel: CancellationToken) {
    let detection = membership.config().failure_detection_time();
    let mut tick = tokio::time::interval(membership.config().gossip_interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = cancel.cancelled() => return,
        }
        let view = membership.view();
        let mut unreachable = Vec::new();
        let mut gone = Vec::new();
        for peer in net.reachability() {
            if view.member(&peer.member).is_none() {
                continue;
            }
            if peer.refused_for.is_some() {
                gone.push(peer.member.clone());
            }
            if peer.silent_for >= detection {
                unreachable.push(peer.member);
            }
        }
        membership.report_data_plane(unreachable, gone).await;
    }
}

/// A non-owning handle to a member, held by the member's own background tasks so they never keep
/// it alive.
#[derive(Debug, Clone)]
pub(crate) struct WeakCluster {
    inner: std::sync::Weak<Inner>,
}

impl WeakCluster {
    /// The member, if it still exists.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn upgrade(&self) -> Option<Cluster> {
        self.inner.upgrade().map(|inner| Cluster { inner })
    }
}
