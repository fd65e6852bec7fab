//! mDNS discovery: every member registers `_grapevine._udp.local.` with a TXT record naming its
//! cluster, node id, generation, gossip and data addresses and protocol version, browses for the
//! same type, and publishes the gossip addresses of the members of its own cluster as candidates.
//!
//! **Interfaces.** mDNS runs on the interfaces [`interfaces::select`] picks (configured ones, or
//! the one holding `bind`, or every one that is up but loopback), in the address family of the
//! advertised gossip address only: IPv4 multicast (224.0.0.251) for an IPv4 member, IPv6
//! (ff02::fb) for an IPv6 one. The record is announced on those interfaces alone, so on a
//! multi-homed host it reaches only the network the member is reached through.
//!
//! **Around mdns-sd's open issues.** With several interfaces on one subnet, or several addresses
//! on one interface, mdns-sd resolves a service to addresses of every interface a response was
//! seen on, with IPv6 scopes of the wrong interface (keepsimple1/mdns-sd#372, #358, #459, #293).
//! grapevine never uses resolved addresses: a candidate is the gossip address of the peer's TXT
//! record, which is exactly what the peer advertises to gossip; link-local IPv6 addresses are
//! never announced nor accepted (no zone travels in a record). Running on one family and only the
//! selected interfaces keeps duplicate sockets off a shared subnet.
//!
//! **Keeping on looking.** mdns-sd backs its queries off to one an hour. Members that missed each
//! other (started at the same moment on a lossy network, or on two sides of a cut) must still find
//! each other, so the browse is restarted every `query_interval`: one query per member per
//! interval, answered only by members the querier does not know yet (known-answer suppression).
//! New members also announce themselves when they start, and a member that stops gracefully says
//! goodbye, so peers drop it at once; a member that crashes is dropped when its records expire
//! (two minutes for its address records). Discovery only proposes candidates: the membership
//! layer probes them and gossip decides who is in the cluster.
//!
//! **Bounded.** At most [`CANDIDATES_MAX`] candidates (further records are ignored, with a warning
//! while the table is full); a record with more than [`TXT_ENTRIES_MAX`] entries, an entry over 255
//! bytes, a missing or unparsable field is ignored with a debug log. mdns-sd's own channels are
//! bounded (its browse channel holds 1000 events and ends the subscription when full, which this
//! module notices and browses again).

mod candidates;
pub mod interfaces;
mod records;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{DaemonEvent, IfKind, Receiver, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

pub use candidates::{CANDIDATES_MAX, Candidates, INSTANCE_BYTES_MAX, Outcome};
pub use interfaces::{HostInterface, InterfaceError, InterfaceSpec};
pub use records::{
    Announcement, AnnouncementError, CLUSTER_NAME_BYTES_MAX, NODE_ID_BYTES_MAX, PeerRecord, RecordError, SERVICE_TYPE,
    TXT_ENTRIES_MAX, TXT_ENTRY_BYTES_MAX,
};

use crate::DiscoveryHandle;

/// How long stopping may wait for the goodbye to be sent and the mDNS thread to end.
const STOP_STEP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait before browsing again when the daemon ended a browse.
const REBROWSE_DELAY: Duration = Duration::from_secs(1);

/// Errors of mDNS discovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MdnsError {
    /// This member's record cannot be announced.
    #[error(transparent)]
    Announcement(#[from] AnnouncementError),
    /// No interface to run on.
    #[error("mDNS discovery needs at least one network interface")]
    NoInterfaces,
    /// The mDNS daemon could not be started or refused a command.
    #[error("mDNS: {0}")]
    Daemon(String),
}

/// Settings of mDNS discovery.
#[derive(Debug, Clone)]
pub struct MdnsSettings {
    /// The interfaces to announce and browse on ([`interfaces::select`]).
    pub interfaces: Vec<HostInterface>,
    /// How often the browse is restarted, so that members that missed each other are found.
    pub query_interval: Duration,
    /// How long [`MdnsDiscovery::start`] waits for the first candidate before returning.
    pub initial_wait: Duration,
    /// The most candidates held ([`CANDIDATES_MAX`] by default).
    pub candidates_max: usize,
}

/// mDNS discovery for one member.
#[derive(Debug, Clone)]
pub struct MdnsDiscovery {
    announcement: Announcement,
    settings: MdnsSettings,
}

impl MdnsDiscovery {
    /// Checks the record and the settings.
    pub fn new(announcement: Announcement, settings: MdnsSettings) -> Result<Self, MdnsError> {
        announcement.validate()?;
        if settings.interfaces.is_empty() {
            return Err(MdnsError::NoInterfaces);
        }
        assert!(!settings.query_interval.is_zero(), "the mDNS query interval must be positive");
        assert!(settings.candidates_max > 0, "the candidate table must hold at least one entry");
        Ok(MdnsDiscovery { announcement, settings })
    }

    /// The interfaces, as `eth1 (10.0.0.5)`, for logs and stats.
    pub fn describe_interfaces(&self) -> String {
        self.settings.interfaces.iter().map(HostInterface::to_string).collect::<Vec<_>>().join(", ")
    }

    /// Starts the mDNS daemon (its own thread), registers this member, browses, and waits up to
    /// `initial_wait` for a first candidate of this cluster (a member started next to a running
    /// cluster then joins it instead of starting alone).
    pub async fn start(self) -> Result<DiscoveryHandle, MdnsError> {
        let daemon_error = |e: mdns_sd::Error| MdnsError::Daemon(e.to_string());
        let daemon = ServiceDaemon::new().map_err(daemon_error)?;
        // From here on the daemon's thread is stopped however this function or the task ends.
        let daemon = DaemonGuard(daemon);
        let ipv4 = self.announcement.gossip_addr.is_ipv4();
        let kinds: Vec<IfKind> = self
            .settings
            .interfaces
            .iter()
            .map(|i| match (i.index, ipv4) {
                (Some(index), true) => IfKind::IndexV4(index),
                (Some(index), false) => IfKind::IndexV6(index),
                (None, _) => IfKind::Name(i.name.clone()),
            })
            .collect();
        daemon.0.disable_interface(IfKind::All).map_err(daemon_error)?;
        daemon.0.enable_interface(kinds.clone()).map_err(daemon_error)?;
        if kinds.iter().any(|k| matches!(k, IfKind::Name(_))) {
            daemon.0.disable_interface(if ipv4 { IfKind::IPv6 } else { IfKind::IPv4 }).map_err(daemon_error)?;
        }
        let monitor = daemon.0.monitor().map_err(daemon_error)?;

        let a = &self.announcement;
        let properties: Vec<(&str, String)> = a.txt();
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &a.instance_name(),
            &a.host_name(),
            (),
            a.gossip_addr.port(),
            &properties[..],
        )
        .map_err(daemon_error)?
        .enable_addr_auto();
        info.set_interfaces(kinds);
        // Instance and host names embed a hash of cluster, node id and generation: they do not
        // collide, so the three probes (750 ms before the first announcement) are skipped.
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_string();
        daemon.0.register(info).map_err(daemon_error)?;
        let events = daemon.0.browse(SERVICE_TYPE).map_err(daemon_error)?;
        info!(
            cluster = %a.cluster_name,
            interfaces = %self.describe_interfaces(),
            instance = %fullname,
            gossip = %a.gossip_addr,
            "mDNS discovery: announcing {SERVICE_TYPE} and browsing for members of this cluster"
        );

        let (tx, rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = oneshot::channel();
        let runtime = Runtime {
            table: Candidates::new(&a.cluster_name, &a.node_id, a.generation, self.settings.candidates_max),
            cluster_name: a.cluster_name.clone(),
            daemon,
            fullname,
            tx,
            foreign_logged: HashSet::new(),
            full_logged: false,
        };
        let task = tokio::spawn(runtime.run(events, monitor, self.settings.query_interval, stop_rx));

        let mut first = rx.clone();
        let found = tokio::time::timeout(self.settings.initial_wait, first.wait_for(|c| !c.is_empty())).await;
        if !matches!(found, Ok(Ok(_))) {
            info!(
                cluster = %a.cluster_name,
                waited = ?self.settings.initial_wait,
                interfaces = %self.describe_interfaces(),
                "mDNS discovery: no member of this cluster answered yet; starting alone and still looking \
                 (members join when they are found)"
            );
        }
        Ok(DiscoveryHandle { candidates: rx, task: Some(task), stop: Some(stop_tx) })
    }
}

/// Shuts the mDNS daemon's thread down when dropped (the daemon has no drop of its own; its
/// thread would run on).
struct DaemonGuard(ServiceDaemon);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

struct Runtime {
    table: Candidates,
    cluster_name: String,
    daemon: DaemonGuard,
    fullname: String,
    tx: watch::Sender<Vec<SocketAddr>>,
    /// Instances of other clusters already logged (bounded: cleared when it reaches the cap).
    foreign_logged: HashSet<String>,
    /// Whether the table being full was logged since it last had room.
    full_logged: bool,
}

/// Waits for the next event of `receiver`, or forever when there is none: `None` when it ended.
async fn next<T>(receiver: &Option<Receiver<T>>) -> Option<T> {
    match receiver {
        Some(r) => r.recv_async().await.ok(),
        None => std::future::pending().await,
    }
}

impl Runtime {
    async fn run(
        mut self,
        events: Receiver<ServiceEvent>,
        monitor: Receiver<DaemonEvent>,
        query_interval: Duration,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut events = Some(events);
        // After a new browse, the previous subscription may still deliver what the daemon sent
        // before it switched; it ends (disconnects) once the daemon has replaced it.
        let mut retired: Option<Receiver<ServiceEvent>> = None;
        let mut monitor = Some(monitor);
        let mut requery = tokio::time::interval_at(tokio::time::Instant::now() + query_interval, query_interval);
        requery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                event = next(&events) => match event {
                    Some(event) => self.handle(event),
                    None => {
                        warn!("mDNS discovery: the browse ended (events were not read fast enough?); browsing again");
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = tokio::time::sleep(REBROWSE_DELAY) => {}
                        }
                        events = self.browse();
                    }
                },
                event = next(&retired) => match event {
                    Some(event) => self.handle(event),
                    None => retired = None,
                },
                event = next(&monitor) => match event {
                    Some(DaemonEvent::Error(error)) => warn!(%error, "mDNS daemon error"),
                    Some(other) => debug!(event = ?other, "mDNS daemon event"),
                    None => monitor = None,
                },
                _ = requery.tick() => {
                    if let Some(fresh) = self.browse() {
                        debug!("mDNS discovery: querying again");
                        retired = events.replace(fresh);
                    }
                }
            }
        }
        self.goodbye().await;
    }

    /// Starts a browse (which also sends a query at once); `None` if the daemon refused.
    fn browse(&self) -> Option<Receiver<ServiceEvent>> {
        match self.daemon.0.browse(SERVICE_TYPE) {
            Ok(receiver) => Some(receiver),
            Err(error) => {
                warn!(%error, "mDNS discovery: cannot browse; trying again at the next query interval");
                None
            }
        }
    }

    fn handle(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::ServiceResolved(service) => {
                let instance = service.fullname.as_str();
                if instance == self.fullname {
                    return;
                }
                let entries = service.txt_properties.iter().map(|p| (p.key(), p.val()));
                match PeerRecord::parse(entries) {
                    Ok(record) => self.upsert(instance, record),
                    Err(error) => {
                        debug!(%instance, %error, "mDNS discovery: ignoring a malformed record");
                        if self.table.remove(instance) == Outcome::Removed {
                            self.publish();
                        }
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, instance) => {
                let record = self.table.get(&instance).cloned();
                if self.table.remove(&instance) == Outcome::Removed {
                    if let Some(r) = record {
                        info!(
                            gossip = %r.gossip_addr,
                            "mDNS discovery: member {} is gone from mDNS (goodbye or expired records)",
                            r.node_id
                        );
                    }
                    self.full_logged = false;
                    self.publish();
                }
            }
            other => debug!(event = ?other, "mDNS discovery event"),
        }
    }

    fn upsert(&mut self, instance: &str, record: PeerRecord) {
        let (node, gossip) = (record.node_id.clone(), record.gossip_addr);
        let their_cluster = record.cluster_name.clone();
        match self.table.upsert(instance, record) {
            Outcome::Added => {
                info!(%gossip, "mDNS discovery: found member {node} of this cluster");
                self.publish();
            }
            Outcome::Changed { previous } => {
                info!(%gossip, %previous, "mDNS discovery: member {node} announces a new address");
                self.publish();
            }
            Outcome::OtherCluster => {
                if self.foreign_logged.len() >= CANDIDATES_MAX {
                    self.foreign_logged.clear();
                }
                if self.foreign_logged.insert(instance.to_string()) {
                    info!(
                        %gossip,
                        "mDNS discovery: ignoring member {node}: it belongs to cluster {their_cluster:?}, this member \
                         to {:?} (members join only members with the same cluster_name)",
                        self.cluster_name
                    );
                }
                // It may have been a candidate under this name before.
                self.publish();
            }
            Outcome::Full => {
                if !self.full_logged {
                    self.full_logged = true;
                    warn!(
                        max = self.table.len(),
                        %node,
                        "mDNS discovery: the candidate table is full; ignoring further members until some leave"
                    );
                }
            }
            Outcome::BadInstance => debug!(%instance, "mDNS discovery: ignoring an instance name over 255 bytes"),
            Outcome::Own | Outcome::Unchanged | Outcome::Removed | Outcome::Unknown => {}
        }
    }

    fn publish(&self) {
        let addresses = self.table.addresses();
        self.tx.send_if_modified(|current| {
            let changed = *current != addresses;
            if changed {
                debug!(candidates = addresses.len(), "mDNS discovery: candidates changed");
                current.clone_from(&addresses);
            }
            changed
        });
    }

    /// Unregisters (peers get a goodbye and drop this member at once) and stops the daemon,
    /// each step bounded.
    async fn goodbye(self) {
        if let Ok(status) = self.daemon.0.unregister(&self.fullname) {
            let _ = tokio::time::timeout(STOP_STEP_TIMEOUT, status.recv_async()).await;
        }
        if let Ok(status) = self.daemon.0.shutdown() {
            let _ = tokio::time::timeout(STOP_STEP_TIMEOUT, status.recv_async()).await;
        }
    }
}
