//! The grapevine target through RESP: real `grapevine start` processes on 127.0.0.1 (each with
//! its own data, gossip and RESP ports), and clients that speak RESP to them with the `redis`
//! crate, exactly as they speak to `redis-server` ([`RedisClient`] without `WAIT`). Client `i`
//! talks to member `i % members`; each member forwards a command to its key's owner.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::redis_target::{RedisClient, connect_to, free_port};
use crate::value_for;

/// How long the members may take to form a cluster and settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// One member process, killed when dropped.
#[derive(Debug)]
struct Member {
    child: Child,
    resp: SocketAddr,
    log: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A cluster of `grapevine` processes serving RESP.
#[derive(Debug)]
pub struct GrapevineProcesses {
    members: Vec<Member>,
    /// Synchronous backups of the benchmark's map.
    pub backup_count: u8,
    data_ports: Vec<u16>,
}

/// The `grapevine` binary next to this one (`target/release/grapevine` beside `loadgen`).
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("grapevine")))
        .unwrap_or_else(|| PathBuf::from("grapevine"))
}

/// A field of an `INFO` text.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':'))).map(str::trim)
}

async fn info(addr: SocketAddr, section: &str) -> anyhow::Result<String> {
    let mut con = connect_to(addr).await?;
    Ok(redis::cmd("INFO").arg(section).query_async(&mut con).await?)
}

impl GrapevineProcesses {
    /// Starts `n` members with default settings but `backup_count` (and no admin endpoint), and
    /// waits until each is healthy, sees all `n`, and the partition table has settled.
    pub async fn start(binary: &Path, n: usize, backup_count: u8) -> anyhow::Result<GrapevineProcesses> {
        anyhow::ensure!(n > 0, "a cluster needs at least one member");
        let data_ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let mut cluster = GrapevineProcesses { members: Vec::with_capacity(n), backup_count, data_ports };
        for i in 0..n {
            let member = cluster.spawn(binary, i)?;
            cluster.members.push(member);
        }
        cluster.wait_settled(n).await?;
        Ok(cluster)
    }

    /// Starts one more member, listing every member so far; returns at once (see
    /// [`GrapevineProcesses::wait_settled`]).
    pub fn add_member(&mut self, binary: &Path) -> anyhow::Result<()> {
        self.data_ports.push(free_port()?);
        let member = self.spawn(binary, self.members.len())?;
        self.members.push(member);
        Ok(())
    }

    fn spawn(&self, binary: &Path, i: usize) -> anyhow::Result<Member> {
        let seeds: Vec<String> = self.data_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let port = self.data_ports[i];
        let resp_port = free_port()?;
        let log = std::env::temp_dir().join(format!("grapevine-bench-{}-{i}.log", std::process::id()));
        let child = Command::new(binary)
            .args(["start", "--cluster-name", &format!("bench-{}", std::process::id())])
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--resp-port", &resp_port.to_string()])
            .args(["--node-id", &format!("gv{}", i + 1), "--members", &seeds.join(",")])
            .env("GRAPEVINE_PORT_AUTO_INCREMENT", "false")
            .env("GRAPEVINE_ADMIN_ENABLED", "false")
            .env("GRAPEVINE_MAPS__DEFAULT__BACKUP_COUNT", self.backup_count.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).context("creating a member log file")?)
            .spawn()
            .with_context(|| {
                format!("starting {} (build it: cargo build --release -p grapevine-bin)", binary.display())
            })?;
        Ok(Member { child, resp: SocketAddr::from(([127, 0, 0, 1], resp_port)), log })
    }

    /// The RESP address of member `i`.
    pub fn resp_addr(&self, i: usize) -> SocketAddr {
        self.members[i].resp
    }

    /// Members started.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True before any member started.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `INFO memory` `used_memory` of member `i`: its estimate of the entries it holds.
    pub async fn member_used_memory(&self, i: usize) -> anyhow::Result<u64> {
        let text = info(self.members[i].resp, "memory").await?;
        field(&text, "used_memory").and_then(|v| v.parse::<u64>().ok()).context("used_memory")
    }

    async fn settled(&self, n: usize) -> Option<u64> {
        let mut epochs = Vec::new();
        for member in &self.members {
            let local = info(member.resp, "local").await.ok()?;
            let cluster = info(member.resp, "cluster").await.ok()?;
            let partitions = info(member.resp, "partitions").await.ok()?;
            let owners = partitions.lines().filter(|l| l.starts_with("owned_by_member_")).count();
            let ok = field(&local, "state") == Some("active")
                && field(&local, "healthy") == Some("true")
                && field(&cluster, "members") == Some(n.to_string().as_str())
                && field(&partitions, "migrating") == Some("0")
                && owners == n;
            if !ok {
                return None;
            }
            epochs.push(field(&partitions, "epoch")?.parse::<u64>().ok()?);
        }
        epochs.iter().all(|e| *e == epochs[0]).then_some(epochs[0])
    }

    /// Waits until every member is healthy, sees `n` members, no migration is under way, the
    /// table gives every member partitions, and that table held for a second.
    /// Returns when that table was first seen.
    pub async fn wait_settled(&self, n: usize) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut stable: Option<(u64, Instant)> = None;
        loop {
            match (self.settled(n).await, stable) {
                // The same settled table for a second: no migration is about to start.
                (Some(epoch), Some((e, since))) if e == epoch && since.elapsed() >= Duration::from_secs(1) => {
                    return Ok(since);
                }
                (Some(epoch), Some((e, _))) if e == epoch => {}
                (Some(epoch), _) => stable = Some((epoch, Instant::now())),
                (None, _) => stable = None,
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> =
                    self.members.iter().map(|m| std::fs::read_to_string(&m.log).unwrap_or_default()).collect();
                bail!("the grapevine processes did not settle within {SETTLE_TIMEOUT:?}; logs:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `n` clients; client `i` talks to member `i % members`.
    pub async fn clients(&self, n: usize, value_bytes: usize) -> anyhow::Result<Vec<RedisClient>> {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let addr = self.members[i % self.members.len()].resp;
            clients.push(RedisClient::connect(addr, value_for(i, value_bytes), false).await?);
        }
        Ok(clients)
    }

    /// The process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.child.id()).collect()
    }

    /// Resident memory of all members.
    pub fn rss(&self) -> u64 {
        self.members.iter().filter_map(|m| crate::procinfo::rss_bytes(Some(m.child.id()))).sum()
    }

    /// The members' own estimate of their entries' memory (`INFO memory` `used_memory`), summed.
    pub async fn used_memory(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for member in &self.members {
            let text = info(member.resp, "memory").await?;
            total += field(&text, "used_memory").and_then(|v| v.parse::<u64>().ok()).context("used_memory")?;
        }
        Ok(total)
    }
}
