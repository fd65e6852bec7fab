//! `session-demo`: an axum service whose sessions live in the grapevine cluster it embeds a member
//! of, so a load balancer may send any request to any instance (no session affinity).
//!
//! ```text
//! session-demo --http-addr 127.0.0.1:8080 --cluster-name demo --members 127.0.0.1
//! ```
//!
//! Routes: see [`session_demo::app`]. Cluster flags and configuration are those of
//! `grapevine start` (defaults < `--config FILE` < `GRAPEVINE_*` environment < flags), parsed by
//! the same code. Sessions live in the map `sessions`; its settings come from `[maps.sessions]`
//! (else `[maps.default]`), and when that sets no `max_idle_seconds` the demo sets it to twice the
//! session lifetime (the safety net the Open-Xchange guide advises: longer than the lifetime).
//!
//! **Stopping.** On SIGTERM or SIGINT: `/health` answers 503 at once while every other route is
//! still served, for `--drain-ms` (default 10 s, enough for a balancer checking every 2 s that
//! takes a server out after 3 failed checks); then the member leaves the cluster gracefully
//! (its partitions are handed over; bounded by `shutdown_timeout_seconds`); then HTTP stops
//! (requests in flight are finished, at most 5 s) and the process exits 0. A second signal at any
//! point stops at once: exit 130 (SIGINT) or 143 (SIGTERM). Exit 1: the HTTP address cannot be
//! bound, the member cannot start, or the leave ran out of time; exit 2: bad flags or
//! configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use grapevine::{Cluster, Config, MapConfig, StartError};
use grapevine_sessions::GrapevineStore;
use session_demo::app::{self, Draining};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

// The configuration layers and logging of the `grapevine` binary, compiled here from the same
// source so that both binaries read flags, files and `GRAPEVINE_*` variables alike.
#[path = "../../grapevine/src/layers.rs"]
#[allow(dead_code)]
mod layers;
#[path = "../../grapevine/src/logging.rs"]
mod logging;

/// How long an immediate stop (second signal, leave timeout) may take before the process exits.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long requests in flight may take to finish once HTTP stops.
const HTTP_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// An axum service with distributed sessions on an embedded grapevine member.
///
/// Configuration of the member comes from, lowest first: built-in defaults, the TOML file of
/// --config, GRAPEVINE_* environment variables (nested keys joined with `__`, e.g.
/// GRAPEVINE_GOSSIP__INTERVAL_MS=100), then these flags, as for `grapevine start`.
#[derive(Debug, Parser)]
#[command(name = "session-demo", version)]
struct Cli {
    /// The address of the HTTP service (login, counter, health).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// How long to keep serving after SIGTERM/SIGINT while /health answers 503, in ms, so the
    /// load balancer's health checks take this instance out before it leaves the cluster.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    drain_ms: u64,
    /// A session unused for this long expires, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    session_lifetime_seconds: u64,
    /// The cluster name; members join only members with the same name (key `cluster_name`).
    #[arg(long, value_name = "NAME")]
    cluster_name: Option<String>,
    /// A TOML configuration file (see config/grapevine.toml).
    #[arg(long, short = 'c', value_name = "FILE", env = "GRAPEVINE_CONFIG")]
    config: Option<PathBuf>,
    /// The interface address of the member: listened on and advertised (key `bind`).
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// The member's TCP data and UDP gossip port, auto-incremented when taken (key `port`, default 5701).
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// The member's admin HTTP port, auto-incremented when taken (key `admin_port`, default 5801).
    #[arg(long, value_name = "PORT")]
    admin_port: Option<u16>,
    /// Static discovery: comma-separated `host`, `host:port` or `host:first-last` (key `members`).
    #[arg(long, value_name = "LIST")]
    members: Option<String>,
    /// This member's id, unique in the cluster (key `node_id`).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Log format on stderr (key `log_format`). The level comes from RUST_LOG.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Cli {
    fn overrides(&self) -> layers::FlagOverrides {
        layers::FlagOverrides {
            cluster_name: self.cluster_name.clone(),
            bind: self.bind,
            port: self.port,
            admin_port: self.admin_port,
            members: self.members.clone(),
            // Set `discovery` in the file or GRAPEVINE_DISCOVERY.
            discovery: None,
            node_id: self.node_id.clone(),
            // The demo serves HTTP, not RESP.
            resp_port: None,
            log_format: self.log_format.map(|f| match f {
                LogFormatArg::Text => "text".to_string(),
                LogFormatArg::Json => "json".to_string(),
            }),
            // Set the merge timers in the file or the environment (GRAPEVINE_MERGE_*).
            merge_first_run_delay_seconds: None,
            merge_run_delay_seconds: None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match layers::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(config) => config,
        Err(failure) => {
            eprintln!("session-demo: {failure}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format);
    session_map_defaults(&mut config, cli.session_lifetime_seconds);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("session-demo").build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("session-demo: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(serve(cli, config)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("session-demo: {error:#}");
            1
        }
    };
    runtime.shutdown_timeout(KILL_TIMEOUT);
    ExitCode::from(code)
}

/// Gives the session map a maximum idle time above the session lifetime when the configuration
/// sets none (twice the lifetime), and warns when a configured one is not above it.
fn session_map_defaults(config: &mut Config, lifetime_seconds: u64) {
    let name = GrapevineStore::DEFAULT_MAP;
    let mut map: MapConfig = config.map_settings().map(name);
    if map.max_idle_seconds == 0 {
        map.max_idle_seconds = lifetime_seconds.saturating_mul(2);
        config.maps.insert(name.to_string(), map);
    } else if map.max_idle_seconds <= lifetime_seconds {
        warn!(
            max_idle_seconds = map.max_idle_seconds,
            session_lifetime_seconds = lifetime_seconds,
            "maps.{name}.max_idle_seconds is not above the session lifetime: sessions may be evicted while in use"
        );
    }
}

async fn serve(cli: Cli, config: Config) -> anyhow::Result<u8> {
    // Handlers first: a signal during start-up must not kill the process half-way.
    let mut signals = Signals::install()?;
    // Bind HTTP before joining, so a taken address fails fast without disturbing the cluster.
    let listener =
        TcpListener::bind(cli.http_addr).await.with_context(|| format!("cannot listen on {}", cli.http_addr))?;
    let shutdown_timeout = Duration::from_secs(config.shutdown_timeout_seconds);
    let cluster = tokio::select! {
        started = Cluster::start(config) => match started {
            Ok(cluster) => cluster,
            Err(StartError::Config(e)) => {
                eprintln!("session-demo: invalid configuration: `{}`: {}", e.key, e.message);
                return Ok(2);
            }
            Err(other) => anyhow::bail!("cannot start the member: {other}"),
        },
        received = signals.recv() => {
            info!("received {}; stopping before start-up finished", received.name());
            return Ok(0);
        }
    };
    let store = GrapevineStore::new(&cluster, GrapevineStore::DEFAULT_MAP)?;
    let lifetime = time::Duration::seconds(i64::try_from(cli.session_lifetime_seconds).unwrap_or(i64::MAX));
    let draining = Draining::default();
    let router = app::router(cluster.clone(), store, lifetime, draining.clone());
    let http_stop = CancellationToken::new();
    let mut http = tokio::spawn({
        let stop = http_stop.clone();
        async move { axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await }
    });
    info!(
        http = %cli.http_addr,
        node = %cluster.local().node_id,
        gossip = %cluster.addresses().gossip,
        admin = %cluster.addresses().admin.map(|a| a.to_string()).unwrap_or_else(|| "disabled".to_string()),
        drain_ms = cli.drain_ms,
        "session-demo running; stop with SIGTERM or Ctrl-C (a second signal stops at once)"
    );

    let first = tokio::select! {
        received = signals.recv() => received,
        ended = &mut http => {
            let reason = match ended {
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            warn!(%reason, "the HTTP server ended by itself; leaving the cluster");
            cluster.shutdown().await;
            return Ok(1);
        }
    };
    draining.start();
    info!(
        drain_ms = cli.drain_ms,
        "received {}; draining: /health answers 503, requests are still served (send another signal to stop at once)",
        first.name()
    );
    let graceful = async {
        tokio::time::sleep(Duration::from_millis(cli.drain_ms)).await;
        info!("drained; leaving the cluster (at most {} s)", shutdown_timeout.as_secs());
        let left = tokio::time::timeout(shutdown_timeout, cluster.shutdown()).await.is_ok();
        if !left {
            warn!(
                "leaving did not finish within shutdown_timeout_seconds = {}; stopping at once",
                shutdown_timeout.as_secs()
            );
            kill(&cluster).await;
        }
        http_stop.cancel();
        match tokio::time::timeout(HTTP_STOP_TIMEOUT, &mut http).await {
            Ok(_) => info!("HTTP stopped"),
            Err(_) => warn!("requests still in flight after {} s; exiting anyway", HTTP_STOP_TIMEOUT.as_secs()),
        }
        if left { 0 } else { 1 }
    };
    tokio::select! {
        code = graceful => {
            info!("stopped");
            Ok(code)
        }
        second = signals.recv() => {
            warn!("received {} during shutdown; stopping at once", second.name());
            kill(&cluster).await;
            Ok(second.exit_code())
        }
    }
}

async fn kill(cluster: &Cluster) {
    if tokio::time::timeout(KILL_TIMEOUT, cluster.kill()).await.is_err() {
        warn!("the member did not stop within {} s; exiting anyway", KILL_TIMEOUT.as_secs());
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
    fn install() -> anyhow::Result<Signals> {
        let install = |kind| signal(kind).context("cannot install signal handlers");
        Ok(Signals { term: install(SignalKind::terminate())?, int: install(SignalKind::interrupt())? })
    }

    async fn recv(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received::Term,
            _ = self.int.recv() => Received::Int,
        }
    }
}
