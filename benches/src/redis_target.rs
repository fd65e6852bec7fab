//! The redis target: `redis-server` processes started here on free loopback ports, without
//! persistence, one primary and one replica, and clients with one connection each through the
//! `redis` crate. Puts are `SET`, or `SET` then `WAIT 1 <timeout>` (pipelined in one round trip)
//! for the synchronous case, the analogue of grapevine's `backup_count = 1`. Gets are `GET`.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use crate::{KvClient, key_name, value_for};

/// How long a server may take to start, and the replica to sync.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `WAIT` waits for the replica, in ms: grapevine's default `backup_ack_timeout_ms`.
pub const WAIT_TIMEOUT_MS: u64 = 5_000;
/// Response timeout of client connections: grapevine's default operation timeout.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to any RESP server (redis-server, or a grapevine member's RESP port).
pub async fn connect_to(addr: SocketAddr) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    client.get_multiplexed_async_connection_with_config(&config).await.with_context(|| format!("connecting to {addr}"))
}

/// The `redis-server` binary: `$REDIS_SERVER`, else `redis-server` on the `PATH`.
pub fn server_binary() -> PathBuf {
    std::env::var_os("REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// Whether `redis-server` can be run (`--version` succeeds); `Err` says why not.
pub fn server_available() -> Result<String, String> {
    let binary = server_binary();
    match Command::new(&binary).arg("--version").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Ok(out) => Err(format!("`{} --version` failed: {}", binary.display(), out.status)),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(format!("`{}` is not installed (apt-get install -y redis-server)", binary.display()))
        }
        Err(e) => Err(format!("cannot run `{}`: {e}", binary.display())),
    }
}

/// A `redis-server` process, killed when dropped (also on errors and panics).
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Where a replica stores the data set of its initial sync (removed on drop).
    rdb: PathBuf,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.rdb);
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server without persistence; `primary`: the port of the server to replicate.
    pub async fn start(primary: Option<u16>) -> anyhow::Result<RedisServer> {
        let port = free_port()?;
        let dir = std::env::temp_dir();
        let rdb_name = format!("grapevine-bench-{port}.rdb");
        let mut command = Command::new(server_binary());
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            // The initial sync streams the data set over the socket at once (Redis 7 otherwise
            // waits 5 s for more replicas before starting it).
            .args(["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"])
            .args(["--dir", &dir.to_string_lossy()])
            .args(["--dbfilename", &rdb_name])
            .args(["--loglevel", "warning", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(primary) = primary {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = command.spawn().with_context(|| format!("starting {}", server_binary().display()))?;
        let mut server = RedisServer { child, port, rdb: dir.join(rdb_name) };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("redis-server on port {port} exited at start: {status}");
            }
            if let Ok(mut con) = server.connect().await
                && redis::cmd("PING").query_async::<String>(&mut con).await.is_ok()
            {
                return Ok(server);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new connection.
    pub async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        connect_to(SocketAddr::from(([127, 0, 0, 1], self.port))).await
    }

    /// A field of `INFO <section>`.
    pub async fn info_field(&self, section: &str, field: &str) -> anyhow::Result<String> {
        let mut con = self.connect().await?;
        let info: String = redis::cmd("INFO").arg(section).query_async(&mut con).await?;
        info.lines()
            .find_map(|l| l.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no {field} in INFO {section} of port {}", self.port))
    }

    /// A numeric field of `INFO <section>`.
    pub async fn info_number(&self, section: &str, field: &str) -> anyhow::Result<u64> {
        let value = self.info_field(section, field).await?;
        value.parse().with_context(|| format!("{field} of port {} is not a number: {value:?}", self.port))
    }

    /// `used_memory` (bytes the allocator handed out, as Redis counts them).
    pub async fn used_memory(&self) -> anyhow::Result<u64> {
        self.info_number("memory", "used_memory").await
    }

    /// The number of keys in db 0.
    pub async fn dbsize(&self) -> anyhow::Result<u64> {
        let mut con = self.connect().await?;
        Ok(redis::cmd("DBSIZE").query_async(&mut con).await?)
    }
}

/// A primary and its replica, in sync.
#[derive(Debug)]
pub struct RedisPair {
    /// The primary (clients talk to it).
    pub primary: RedisServer,
    /// The replica.
    pub replica: RedisServer,
}

impl RedisPair {
    /// Starts both and waits until the replica's link is up and its initial sync is done.
    pub async fn start() -> anyhow::Result<RedisPair> {
        let primary = RedisServer::start(None).await?;
        let replica = RedisServer::start(Some(primary.port)).await?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let up = replica.info_field("replication", "master_link_status").await.is_ok_and(|s| s == "up");
            let synced = replica.info_field("replication", "master_sync_in_progress").await.is_ok_and(|s| s == "0");
            let online = primary.info_field("replication", "connected_slaves").await.is_ok_and(|s| s == "1");
            if up && synced && online {
                return Ok(RedisPair { primary, replica });
            }
            anyhow::ensure!(Instant::now() < deadline, "the replica did not sync within {START_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the replica has processed everything written to the primary so far: its
    /// replication offset reaches the primary's. (`WAIT` would not do on a fresh connection: it
    /// waits only for that connection's own writes.)
    pub async fn wait_replicated(&self) -> anyhow::Result<()> {
        let target = self.primary.info_number("replication", "master_repl_offset").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reached = self.replica.info_number("replication", "slave_repl_offset").await?;
            if reached >= target {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the replica reached replication offset {reached} of the primary's {target} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `n` clients with a connection each to the primary; `wait`: follow every `SET` with
    /// `WAIT 1`.
    pub async fn clients(&self, n: usize, value_bytes: usize, wait: bool) -> anyhow::Result<Vec<RedisClient>> {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            clients.push(RedisClient {
                con: self.primary.connect().await?,
                key: String::new(),
                value: value_for(i, value_bytes),
                wait,
            });
        }
        Ok(clients)
    }

    /// Memory figures of both servers (see [`RedisMemory`]).
    pub async fn memory(&self) -> anyhow::Result<RedisMemory> {
        Ok(RedisMemory {
            primary_used_memory: self.primary.used_memory().await?,
            replica_used_memory: self.replica.used_memory().await?,
            primary_rss: crate::procinfo::rss_bytes(Some(self.primary.pid())).unwrap_or(0),
            replica_rss: crate::procinfo::rss_bytes(Some(self.replica.pid())).unwrap_or(0),
        })
    }

    /// The process ids of the primary and the replica.
    pub fn pids(&self) -> [u32; 2] {
        [self.primary.pid(), self.replica.pid()]
    }
}

/// Memory of the two servers at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RedisMemory {
    /// `INFO memory` `used_memory` of the primary.
    pub primary_used_memory: u64,
    /// The same on the replica.
    pub replica_used_memory: u64,
    /// Resident set size of the primary process.
    pub primary_rss: u64,
    /// Resident set size of the replica process.
    pub replica_rss: u64,
}

/// One client: its own connection to the primary.
#[derive(Debug)]
pub struct RedisClient {
    con: MultiplexedConnection,
    key: String,
    value: Vec<u8>,
    wait: bool,
}

impl RedisClient {
    /// A client with its own connection to `addr`, writing `value`; `wait`: follow every `SET`
    /// with `WAIT 1`.
    pub async fn connect(addr: SocketAddr, value: Vec<u8>, wait: bool) -> anyhow::Result<RedisClient> {
        Ok(RedisClient { con: connect_to(addr).await?, key: String::new(), value, wait })
    }
}

impl KvClient for RedisClient {
    async fn get(&mut self, key: u64) -> anyhow::Result<bool> {
        key_name(&mut self.key, key);
        let value: Option<Vec<u8>> = redis::cmd("GET").arg(&self.key).query_async(&mut self.con).await?;
        Ok(value.is_some())
    }

    async fn put(&mut self, key: u64) -> anyhow::Result<()> {
        key_name(&mut self.key, key);
        if !self.wait {
            redis::cmd("SET").arg(&self.key).arg(&self.value[..]).exec_async(&mut self.con).await?;
            return Ok(());
        }
        let (acked,): (i64,) = redis::pipe()
            .cmd("SET")
            .arg(&self.key)
            .arg(&self.value[..])
            .ignore()
            .cmd("WAIT")
            .arg(1)
            .arg(WAIT_TIMEOUT_MS)
            .query_async(&mut self.con)
            .await?;
        anyhow::ensure!(acked >= 1, "the replica did not acknowledge the SET within {WAIT_TIMEOUT_MS} ms");
        Ok(())
    }
}
