//! The grapevine target: an in-process cluster of real members on distinct loopback addresses
//! (each with its own TCP data plane and UDP gossip), default timers and map settings
//! (`backup_count = 1`), and clients spread over the members so that most operations cross the
//! loopback data plane as in a deployment where the application talks to a member on its host.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use grapevine::{Cluster, Config, DistributedMap};
use serde::Serialize;

use crate::{KvClient, key_name, value_for};

/// The map the benchmark uses.
pub const MAP: &str = "bench";

/// How long the cluster may take to form and settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running in-process cluster.
#[derive(Debug)]
pub struct GrapevineCluster {
    /// The members, oldest first.
    pub members: Vec<Cluster>,
}

/// The member configuration: defaults, except for the loopback address and any free port, and
/// no admin endpoint.
fn member_config(cluster_name: &str) -> Config {
    let mut config = Config::new(cluster_name);
    config.port = 0;
    config.admin_enabled = false;
    config
}

impl GrapevineCluster {
    /// Starts `n` members on `127.0.<third>.<first_host + i>` and waits until every member sees
    /// all of them as active and replication has settled (the balanced partition table, every
    /// backup confirmed).
    pub async fn start(n: usize, third: u8, first_host: u8) -> anyhow::Result<GrapevineCluster> {
        Self::start_with(n, third, first_host, |_| {}).await
    }

    /// [`GrapevineCluster::start`] with `configure` applied to every member's configuration.
    pub async fn start_with(
        n: usize,
        third: u8,
        first_host: u8,
        configure: impl Fn(&mut Config),
    ) -> anyhow::Result<GrapevineCluster> {
        anyhow::ensure!(n > 0, "a cluster needs at least one member");
        let name = format!("bench-{}", std::process::id());
        let mut members: Vec<Cluster> = Vec::with_capacity(n);
        for i in 0..n {
            let host = first_host.checked_add(i as u8).context("too many members for the address range")?;
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, third, host));
            let mut config = member_config(&name);
            configure(&mut config);
            let mut builder = Cluster::builder().config(config).bind(ip);
            if !members.is_empty() {
                let seeds: Vec<String> = members.iter().map(|m| m.addresses().gossip.to_string()).collect();
                builder = builder.discovery(grapevine::Discovery::static_list(seeds));
            }
            let member = builder.start().await.with_context(|| format!("starting member {i} on {ip}"))?;
            members.push(member);
        }
        let cluster = GrapevineCluster { members };
        cluster.wait_settled(n).await?;
        Ok(cluster)
    }

    async fn wait_settled(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let views: Vec<_> = self.members.iter().map(|m| m.view()).collect();
            let all_active = views.iter().all(|v| v.active_members().count() == n && v.master == views[0].master);
            let epochs: Vec<u64> = self.members.iter().map(|m| m.map_service().table().epoch).collect();
            let settled = all_active
                && epochs.iter().all(|e| *e == epochs[0])
                && self.members.iter().all(|m| m.map_service().is_settled());
            if settled {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the cluster did not settle within {SETTLE_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `n` clients; client `i` uses member `i % members`.
    pub fn clients(&self, n: usize, value_bytes: usize) -> anyhow::Result<Vec<GrapevineClient>> {
        (0..n)
            .map(|i| {
                let member = &self.members[i % self.members.len()];
                Ok(GrapevineClient { map: member.map(MAP)?, key: String::new(), value: value_for(i, value_bytes) })
            })
            .collect()
    }

    /// The cluster's own memory estimate for the benchmark map, summed over members (owner and
    /// backup copies), and the entries it counts.
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let mut estimate = MemoryEstimate::default();
        for member in &self.members {
            for map in member.map_service().local_stats().maps.into_iter().filter(|m| m.name == MAP) {
                estimate.memory_bytes += map.memory_bytes;
                estimate.owned_entries += map.owned_entries;
                estimate.backup_entries += map.backup_entries;
            }
        }
        estimate
    }

    /// Stops every member at once, without the graceful hand-over (which would migrate all the
    /// data for nothing).
    pub async fn kill(self) {
        let kills = self.members.iter().map(|m| m.kill());
        for kill in kills {
            kill.await;
        }
    }
}

/// `MapStats::memory_bytes` and entry counts summed over members.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryEstimate {
    /// Estimated bytes of entries, owner and backup copies.
    pub memory_bytes: u64,
    /// Entries held as owner.
    pub owned_entries: u64,
    /// Entries held as backup.
    pub backup_entries: u64,
}

/// One client: a typed map handle on one member.
#[derive(Debug)]
pub struct GrapevineClient {
    map: DistributedMap<String, Vec<u8>>,
    key: String,
    value: Vec<u8>,
}

impl KvClient for GrapevineClient {
    async fn get(&mut self, key: u64) -> anyhow::Result<bool> {
        key_name(&mut self.key, key);
        Ok(self.map.get(&self.key).await?.is_some())
    }

    async fn put(&mut self, key: u64) -> anyhow::Result<()> {
        key_name(&mut self.key, key);
        self.map.put(&self.key, &self.value).await?;
        Ok(())
    }
}
