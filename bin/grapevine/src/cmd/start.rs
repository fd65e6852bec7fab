//! `grapevine start`: run a cluster member until SIGTERM or SIGINT.
//!
//! The first signal leaves the cluster gracefully (bounded by `shutdown_timeout_seconds`) and
//! exits 0; a second signal during that shutdown stops at once and exits 128 + the signal number
//! (130 for SIGINT, 143 for SIGTERM). A graceful shutdown whose hand-over runs out of time
//! (`shutdown_timeout_seconds`) leaves anyway, logs what was not handed over, and exits 1. A signal
//! that arrives while the member is still starting (looking for the cluster) stops it at once and
//! exits 0.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use grapevine::{Cluster, Config, StartError};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::layers::{self, FlagOverrides};
use crate::{Failure, logging};

/// How long an immediate stop (second signal, shutdown timeout) may take before the process exits.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long leaving may take once the hand-over is over (or its wait ran out): announcing the
/// departure and stopping the member's tasks.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Run a cluster member until SIGTERM or SIGINT.
///
/// Configuration comes from, lowest first: built-in defaults, the TOML file of --config,
/// GRAPEVINE_* environment variables (nested keys joined with `__`, e.g.
/// GRAPEVINE_GOSSIP__INTERVAL_MS=100), then these flags. Every key is documented in
/// config/grapevine.toml.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The cluster name; members join only members with the same name (key `cluster_name`).
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// A TOML configuration file (see config/grapevine.toml).
    #[arg(long, short = 'c', value_name = "FILE", env = "GRAPEVINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The interface address to listen on and advertise (key `bind`). Default: all interfaces.
    #[arg(long, value_name = "IP")]
    pub bind: Option<IpAddr>,
    /// The TCP data and UDP gossip port, auto-incremented when taken (key `port`, default 5701).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// The admin HTTP port, auto-incremented when taken (key `admin_port`, default 5801).
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,
    /// The Redis-protocol (RESP) port, auto-incremented when taken (key `resp_port`, default 6701;
    /// `resp_enabled = false` turns the endpoint off).
    #[arg(long, value_name = "PORT")]
    pub resp_port: Option<u16>,
    /// Static discovery: comma-separated `host`, `host:port` or `host:first-last` (key `members`).
    #[arg(long, value_name = "LIST")]
    pub members: Option<String>,
    /// How members find each other (key `discovery`, default static): `static` (the `members`
    /// list) or `mdns` (multicast DNS on the local network; not together with `members`).
    #[arg(long, value_enum, value_name = "MECHANISM")]
    pub discovery: Option<DiscoveryArg>,
    /// This member's id, unique in the cluster (key `node_id`). Default: `<hostname>-<port>`
    /// (`<hostname>-<bind>-<port>` when `--bind` is set).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Log format on stderr (key `log_format`). The level comes from RUST_LOG.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,
    /// Split-brain merge: seconds this member runs before it merges with another group of its
    /// cluster (key `merge_first_run_delay_seconds`, default 20; fractions allowed).
    #[arg(long, value_name = "SECONDS")]
    pub merge_first_run_delay: Option<f64>,
    /// Split-brain merge: seconds another group must stay visible before the merge (key
    /// `merge_run_delay_seconds`, default 10).
    #[arg(long, value_name = "SECONDS")]
    pub merge_run_delay: Option<f64>,
}

/// `--discovery`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DiscoveryArg {
    /// The `members` list.
    Static,
    /// Multicast DNS on the local network.
    Mdns,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl StartArgs {
    fn overrides(&self) -> FlagOverrides {
        FlagOverrides {
            cluster_name: self.cluster_name.clone(),
            bind: self.bind,
            port: self.port,
            admin_port: self.admin_port,
            resp_port: self.resp_port,
            members: self.members.clone(),
            discovery: self.discovery.map(|d| match d {
                DiscoveryArg::Static => "static".to_string(),
                DiscoveryArg::Mdns => "mdns".to_string(),
            }),
            node_id: self.node_id.clone(),
            log_format: self.log_format.map(|f| match f {
                LogFormatArg::Text => "text".to_string(),
                LogFormatArg::Json => "json".to_string(),
            }),
            merge_first_run_delay_seconds: self.merge_first_run_delay,
            merge_run_delay_seconds: self.merge_run_delay,
        }
    }
}

pub fn run(args: StartArgs) -> Result<(), Failure> {
    let config = layers::load(args.config.as_deref(), &args.overrides()).map_err(|e| Failure::config(e.0))?;
    logging::init(config.log_format);
    // Cluster::start validates again and logs the warnings.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("grapevine")
        .build()
        .map_err(|e| Failure::error(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(serve(config));
    runtime.shutdown_timeout(KILL_TIMEOUT);
    result
}

async fn serve(config: Config) -> Result<(), Failure> {
    // Handlers first: a signal during start-up must not kill the process half-way.
    let mut signals = Signals::install()?;
    let shutdown_timeout = Duration::from_secs(config.shutdown_timeout_seconds);
    let cluster = tokio::select! {
        started = Cluster::start(config) => started.map_err(start_failure)?,
        received = signals.recv() => {
            info!("received {}; stopping before start-up finished", received.name());
            return Ok(());
        }
    };
    // The RESP endpoint starts once the member serves maps, and stops before it leaves.
    let resp = if cluster.config().resp_enabled {
        match grapevine_resp::serve(cluster.clone(), grapevine_resp::Settings::from_cluster(&cluster)).await {
            Ok(server) => Some(server),
            Err(error) => {
                kill(&cluster).await;
                return Err(Failure::error(format!("cannot start: {error}")));
            }
        }
    } else {
        None
    };
    let addresses = cluster.addresses();
    info!(
        cluster = %cluster.name(),
        node = %cluster.local().node_id,
        bind = %addresses.bind,
        gossip = %addresses.gossip,
        data = %addresses.data,
        admin = %addresses.admin.map(|a| a.to_string()).unwrap_or_else(|| "disabled".to_string()),
        resp = %resp.as_ref().map(|r| r.local_addr().to_string()).unwrap_or_else(|| "disabled".to_string()),
        "grapevine node running; stop with SIGTERM or Ctrl-C (a second signal stops at once)"
    );

    let first = signals.recv().await;
    info!(
        "received {}; leaving the cluster gracefully (at most {} s; send another signal to stop at once)",
        first.name(),
        shutdown_timeout.as_secs()
    );
    if let Some(resp) = &resp {
        resp.shutdown().await;
    }
    // The hand-over wait inside is bounded by shutdown_timeout_seconds; past it the member leaves
    // anyway (announcing it, so peers take over at once) and says what it still held. The outer
    // bound only catches a leave that hangs after that.
    tokio::select! {
        finished = tokio::time::timeout(shutdown_timeout + LEAVE_TIMEOUT, cluster.shutdown_reporting()) => match finished {
            Ok(Ok(())) => {
                info!("stopped");
                Ok(())
            }
            Ok(Err(_incomplete)) => {
                // Cluster::shutdown_reporting logged what was not handed over and what that means.
                warn!("stopped after leaving without a complete hand-over; exiting with status 1");
                Err(Failure::exit(1))
            }
            Err(_) => {
                warn!(
                    "graceful shutdown did not finish within shutdown_timeout_seconds = {} + {} s; stopping at once",
                    shutdown_timeout.as_secs(),
                    LEAVE_TIMEOUT.as_secs()
                );
                kill(&cluster).await;
                Err(Failure::exit(1))
            }
        },
        second = signals.recv() => {
            warn!("received {} during shutdown; stopping at once", second.name());
            kill(&cluster).await;
            Err(Failure::exit(second.exit_code()))
        }
    }
}

async fn kill(cluster: &Cluster) {
    if tokio::time::timeout(KILL_TIMEOUT, cluster.kill()).await.is_err() {
        warn!("the member did not stop within {} s; exiting anyway", KILL_TIMEOUT.as_secs());
    }
}

fn start_failure(error: StartError) -> Failure {
    match error {
        StartError::Config(e) => Failure::config(format!("invalid configuration: `{}`: {}", e.key, e.message)),
        other => Failure::error(format!("cannot start: {other}")),
    }
}

/// SIGTERM and SIGINT.
struct Signals {
    term: Signal,
    int: Signal,
}

#[derive(Debug, Clone, Copy)]
enum Received {
    Term,
    Int,
}

impl Received {
    fn name(self) -> &'static str {
        match self {
            Received::Term => "SIGTERM",
            Received::Int => "SIGINT",
        }
    }

    /// 128 + the signal number, as a shell reports a process killed by it.
    fn exit_code(self) -> u8 {
        match self {
            Received::Term => 143,
            Received::Int => 130,
        }
    }
}

impl Signals {
    fn install() -> Result<Signals, Failure> {
        let install = |kind| signal(kind).map_err(|e| Failure::error(format!("cannot install signal handlers: {e}")));
        Ok(Signals { term: install(SignalKind::terminate())?, int: install(SignalKind::interrupt())? })
    }

    async fn recv(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received::Term,
            _ = self.int.recv() => Received::Int,
        }
    }
}
