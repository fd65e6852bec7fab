//! A Redis-protocol endpoint for a grapevine member: `redis-cli`, `redis-benchmark` and any Redis
//! client library read and write the member's distributed maps.
//!
//! ```no_run
//! # async fn run(cluster: grapevine::Cluster) -> Result<(), grapevine_resp::RespError> {
//! let server = grapevine_resp::serve(cluster.clone(), grapevine_resp::Settings::from_cluster(&cluster)).await?;
//! println!("redis-cli -p {}", server.local_addr().port());
//! // ...
//! server.shutdown().await; // before cluster.shutdown()
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Each connection speaks RESP2 until it sends `HELLO 3`. Commands work on one map, the
//! connection's current map: `resp_default_map` until `GV.SELECT <map>` picks another. Keys and
//! values are stored byte for byte as the map's encoded keys and values (they are not
//! bincode-encoded as `DistributedMap<K, V>` does), and any member serves any key: the member
//! forwards each command to the key's owner. The README's operator guide lists the commands.
//!
//! **Pub/sub.** A channel is grapevine's plain topic of the same name (1 to 255 bytes of
//! printable UTF-8), a message its payload as raw bytes: `PUBLISH` through any member reaches the
//! `SUBSCRIBE`rs of every member, and a Rust service's `cluster.topic::<Vec<u8>>(name)` or
//! `topic::<String>(name)` (the codec encodes both alike) sees the same messages. Delivery is the
//! topics': best effort, in publish order per publishing member. `PUBLISH` answers the number of
//! subscribers on this member that the message was queued for plus one for each other member
//! with subscribers that it was sent to (that member delivers it to all of its own; how many is
//! not known here); 0 means no subscriber anywhere, as far as this member knows. `SUBSCRIBE` and
//! `UNSUBSCRIBE` answer as Redis does (push frames in RESP3); a RESP2 connection in subscribed mode
//! may send only (P)SUBSCRIBE, (P)UNSUBSCRIBE, PING, QUIT and RESET. There are no pattern
//! subscriptions (`PSUBSCRIBE` is refused). A connection subscribes to at most 1024 channels; its
//! messages wait in a queue of at most 1024 messages and 1 MiB, and a client that reads slower
//! than they come misses those that do not fit (`INFO stats`: `pubsub_messages_dropped`). A
//! subscribed connection is not closed for being idle (as in Redis); TCP keepalive closes it
//! once its client's host is gone. `PUBSUB CHANNELS/NUMSUB/NUMPAT` count this member's
//! subscribers only.

mod commands;
mod conn;
mod glob;
mod info;
mod pubsub;
mod reply;
pub mod request;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use grapevine::Cluster;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use request::Limits;

/// How long [`RespServer::shutdown`] waits for connections to finish their current command.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// Every port of the range is in use.
    #[error(
        "no free RESP port in {ip}:{first}-{last}; stop what uses them, or choose another range with \
         `resp_port` and `port_count` (or turn the endpoint off with `resp_enabled = false`)"
    )]
    PortRangeExhausted {
        /// The interface address.
        ip: IpAddr,
        /// First port tried.
        first: u16,
        /// Last port tried.
        last: u16,
    },
    /// The socket could not be bound for another reason than the port being in use.
    #[error("cannot listen for RESP on {addr}: {reason}; check `resp_bind` (or `bind`)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// How the endpoint listens and what it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The interface address to listen on.
    pub bind: IpAddr,
    /// The ports to try, in order (`0..=0`: any free port).
    pub ports: RangeInclusive<u16>,
    /// The map of new connections.
    pub default_map: String,
    /// Request size limits.
    pub limits: Limits,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections idle for this long are closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Settings {
    /// The settings of `cluster`'s configuration (`resp_bind` or the member's own address,
    /// `resp_port` and its range, `resp_default_map`, `[resp]` limits).
    pub fn from_cluster(cluster: &Cluster) -> Settings {
        let config = cluster.config();
        let r = &config.resp;
        Settings {
            bind: config.resp_bind.unwrap_or(cluster.addresses().bind),
            ports: config.resp_port_range(),
            default_map: config.resp_default_map.clone(),
            limits: Limits {
                max_bulk_bytes: r.max_bulk_bytes,
                max_array_len: r.max_array_len,
                max_inline_bytes: r.max_inline_bytes,
                max_request_bytes: r.max_request_bytes,
            },
            max_connections: r.max_connections,
            idle_timeout: (r.idle_timeout_seconds > 0).then(|| Duration::from_secs(r.idle_timeout_seconds)),
        }
    }
}

/// Counters of the endpoint (`INFO clients`, `INFO stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connected: AtomicUsize,
    pub(crate) connections_received: AtomicU64,
    pub(crate) rejected_connections: AtomicU64,
    pub(crate) commands_processed: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    next_id: AtomicU64,
}

/// What every connection of one endpoint shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cluster: Cluster,
    pub(crate) settings: Settings,
    pub(crate) counters: Counters,
    pub(crate) pubsub: Arc<pubsub::Counters>,
    pub(crate) addr: SocketAddr,
    pub(crate) started: Instant,
}

/// A running endpoint. [`RespServer::shutdown`] stops it; dropping it stops accepting too.
#[derive(Debug)]
pub struct RespServer {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for RespServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl RespServer {
    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.shared.counters.connected.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets every connection finish the command it is executing, closes them,
    /// and waits (up to 5 s) until they are gone.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.tasks.wait()).await.is_err() {
            warn!(connections = self.connections(), "RESP connections did not close within {SHUTDOWN_TIMEOUT:?}");
        }
    }
}

/// Binds the first free port of `ports` on `ip`.
async fn bind(ip: IpAddr, ports: RangeInclusive<u16>) -> Result<TcpListener, RespError> {
    for port in ports.clone() {
        let addr = SocketAddr::new(ip, port);
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(RespError::Bind { addr, reason: e.to_string() }),
        }
    }
    Err(RespError::PortRangeExhausted { ip, first: *ports.start(), last: *ports.end() })
}

/// Starts serving RESP for `cluster` and returns once the port is bound.
pub async fn serve(cluster: Cluster, settings: Settings) -> Result<RespServer, RespError> {
    let listener = bind(settings.bind, settings.ports.clone()).await?;
    let addr = listener.local_addr().map_err(|e| RespError::Bind {
        addr: SocketAddr::new(settings.bind, *settings.ports.start()),
        reason: e.to_string(),
    })?;
    let shared = Arc::new(Shared {
        cluster,
        settings,
        counters: Counters::default(),
        pubsub: Arc::default(),
        addr,
        started: Instant::now(),
    });
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(accept_loop(listener, shared.clone(), cancel.clone(), tasks.clone()));
    info!(%addr, map = %shared.settings.default_map, "RESP endpoint listening");
    Ok(RespServer { shared, cancel, tasks })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(shared.settings.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: wait a moment instead of spinning.
                warn!(%error, "accepting a RESP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.counters.connections_received.fetch_add(1, Ordering::Relaxed);
        let id = shared.counters.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let (shared, cancel) = (shared.clone(), cancel.clone());
                tasks.spawn(async move {
                    shared.counters.connected.fetch_add(1, Ordering::Relaxed);
                    conn::serve(&shared, socket, id, &cancel).await;
                    shared.counters.connected.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                    debug!(%peer, id, "RESP connection closed");
                });
            }
            Err(_) => {
                // Refused with an answer rather than left waiting in the backlog, so a client never
                // hangs on a full member.
                shared.counters.rejected_connections.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(conn::refuse(socket, "ERR max number of clients reached"));
            }
        }
    }
}
