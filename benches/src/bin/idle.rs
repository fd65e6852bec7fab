//! `idle`: what an idle cluster costs, and how long it takes to form, at several cluster sizes.
//!
//! For each size N it starts N real `grapevine start` processes on 127.0.0.1 at once, waits until
//! every member's `/health` is 200 with all N members (the convergence time, counted from the
//! first spawn), lets the cluster settle, then measures for `--idle-secs` with nothing talking to
//! the members: CPU time per member (user + system, from `/proc`), resident memory per member, and
//! gossip datagrams per member per second (the members' own counters, read before and after the
//! window). A `redis-server` measured over the same window is the reference of an idle server.
//! See docs/benchmarks.md.
//!
//! Discovery is as a user sets it up: `--discovery bare` (the default) lists the bare host
//! (`--members 127.0.0.1`: every port of the member port range, 100 by default), with every
//! member started with the same `--port` and taking the next free one; `--discovery list` lists
//! each member's `127.0.0.1:port`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use grapevine_benches::procinfo;
use grapevine_benches::redis_target::{RedisServer, free_port, server_available};
use grapevine_benches::resp_target::default_binary;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum DiscoveryMode {
    /// `--members 127.0.0.1`: the whole port range of the host.
    Bare,
    /// `--members 127.0.0.1:p1,127.0.0.1:p2,...`: every member's own port.
    List,
}

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Cluster sizes to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_values_t = [3usize, 10, 20, 50])]
    sizes: Vec<usize>,
    /// Seconds of the idle window in which CPU time is measured.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// Seconds to wait after convergence before the idle window (joins settle, tables migrate).
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Give up on a size when it has not converged after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// How members find each other.
    #[arg(long, value_enum, default_value_t = DiscoveryMode::Bare)]
    discovery: DiscoveryMode,
    /// First member port with `--discovery bare` (the range is this port and the 99 after it;
    /// each size uses a range of its own above this one). Must be free, TCP and UDP.
    #[arg(long, default_value_t = 27701)]
    base_port: u16,
    /// Skip the redis-server reference.
    #[arg(long)]
    no_redis: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `grapevine` binary (default: the one next to this one).
    #[arg(long)]
    grapevine_bin: Option<PathBuf>,
}

/// The port range a bare host stands for (`port_count`'s default).
const PORT_COUNT: u16 = 100;

/// One member process, killed when dropped.
#[derive(Debug)]
struct Member {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What one size measured.
#[derive(Debug, Clone, Serialize)]
struct SizeResult {
    members: usize,
    discovery: DiscoveryMode,
    /// From the first spawn until every member is healthy and lists all members.
    converged_s: Option<f64>,
    /// CPU per member over the idle window, in % of one core: mean and highest.
    cpu_percent_mean: f64,
    cpu_percent_max: f64,
    /// All members together, in % of the machine (all cores).
    cpu_percent_of_machine: f64,
    /// Resident memory per member at the end of the window, MiB: mean and highest.
    rss_mib_mean: f64,
    rss_mib_max: f64,
    /// Gossip datagrams sent per member per second, mean over members.
    datagrams_out_per_s: Option<f64>,
    /// Gossip datagrams received per member per second, mean over members.
    datagrams_in_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct RedisReference {
    cpu_percent: f64,
    rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    idle_secs: u64,
    sizes: Vec<SizeResult>,
    redis: Option<RedisReference>,
}

/// `GET path` on an admin endpoint: (status, body). Bounded by a 5 s timeout.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(16 << 20).read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response =
        tokio::time::timeout(Duration::from_secs(5), exchange).await.context("admin request timed out")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers in the admin response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
    Ok((status, body.to_string()))
}

/// The member's `/health`: healthy and the number of members it lists.
async fn health(addr: SocketAddr) -> Option<(bool, usize)> {
    let (status, body) = http_get(addr, "/health").await.ok()?;
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    let members = value.get("members")?.as_u64()? as usize;
    Some((status == 200 && value.get("healthy")?.as_bool()?, members))
}

/// The member's gossip datagram counters (out, in), from `/stats`.
async fn datagrams(addr: SocketAddr) -> Option<(u64, u64)> {
    let (_, body) = http_get(addr, "/stats").await.ok()?;
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    let gossip = value.get("gossip")?;
    Some((gossip.get("datagrams_out")?.as_u64()?, gossip.get("datagrams_in")?.as_u64()?))
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

fn spawn_member(binary: &Path, cluster: &str, i: usize, port: u16, members: &str) -> anyhow::Result<Member> {
    let admin_port = free_port()?;
    let resp_port = free_port()?;
    let log = std::env::temp_dir().join(format!("grapevine-idle-{}-{cluster}-{i}.log", std::process::id()));
    let child = Command::new(binary)
        .args(["start", "--cluster-name", cluster, "--bind", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
        .args(["--resp-port", &resp_port.to_string(), "--members", members])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).context("creating a member log file")?)
        .spawn()
        .with_context(|| format!("starting {} (build it: cargo build --release -p grapevine-bin)", binary.display()))?;
    Ok(Member { child, admin: SocketAddr::from(([127, 0, 0, 1], admin_port)), log })
}

fn cpu_of(pids: &[u32]) -> Vec<Option<f64>> {
    pids.iter().map(|pid| procinfo::cpu_seconds(Some(*pid))).collect()
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

async fn measure_size(args: &Args, binary: &Path, n: usize, slot: usize) -> anyhow::Result<SizeResult> {
    let cluster = format!("idle-{}-{n}", std::process::id());
    let (ports, members_arg): (Vec<u16>, String) = match args.discovery {
        DiscoveryMode::Bare => {
            anyhow::ensure!(n <= usize::from(PORT_COUNT), "a bare host has {PORT_COUNT} ports; {n} members do not fit");
            let base = args
                .base_port
                .checked_add(u16::try_from(slot).unwrap_or(u16::MAX).saturating_mul(2 * PORT_COUNT))
                .filter(|b| b.checked_add(PORT_COUNT).is_some())
                .context("--base-port is too high for this many sizes")?;
            if let Some(busy) = (base..base + PORT_COUNT).find(|p| !port_free(*p)) {
                bail!(
                    "port {busy} (in the range {base}-{}) is in use; choose another --base-port",
                    base + PORT_COUNT - 1
                );
            }
            // Every member is started with the same port and takes the next free one.
            (vec![base; n], "127.0.0.1".to_string())
        }
        DiscoveryMode::List => {
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
            let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            (ports, list.join(","))
        }
    };
    // In bare mode the range starts at `base`: a bare host means `port`'s range.
    let started = Instant::now();
    let mut members = Vec::with_capacity(n);
    for (i, port) in ports.iter().enumerate() {
        members.push(spawn_member(binary, &cluster, i, *port, &members_arg)?);
    }
    let pids: Vec<u32> = members.iter().map(|m| m.child.id()).collect();

    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut converged_s = None;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut states = Vec::with_capacity(n);
        for member in &members {
            states.push(health(member.admin).await);
        }
        if states.iter().all(|s| *s == Some((true, n))) {
            converged_s = Some(started.elapsed().as_secs_f64());
            break;
        }
        last = states;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if converged_s.is_none() {
        let healthy = last.iter().filter(|s| matches!(s, Some((true, _)))).count();
        let full = last.iter().filter(|s| matches!(s, Some((_, m)) if *m == n)).count();
        eprintln!(
            "idle: {n} members did not converge within {} s ({healthy} healthy, {full} list all {n}); measuring anyway",
            args.timeout_secs
        );
    } else {
        eprintln!("idle: {n} members converged in {:.1} s", converged_s.unwrap_or_default());
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;

    let mut before_dg = Vec::with_capacity(n);
    for member in &members {
        before_dg.push(datagrams(member.admin).await);
    }
    let cpu_before = cpu_of(&pids);
    let window_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu_after = cpu_of(&pids);
    let window = window_start.elapsed().as_secs_f64();
    let rss: Vec<f64> =
        pids.iter().filter_map(|pid| procinfo::rss_bytes(Some(*pid))).map(|b| b as f64 / 1048576.0).collect();
    let mut after_dg = Vec::with_capacity(n);
    for member in &members {
        after_dg.push(datagrams(member.admin).await);
    }
    for (i, member) in members.iter_mut().enumerate() {
        if let Ok(Some(status)) = member.child.try_wait() {
            bail!("member {i} exited during the measurement ({status}); its log: {}", member.log.display());
        }
    }

    let cpu: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .filter_map(|(a, b)| Some((b.as_ref()? - a.as_ref()?) / window * 100.0))
        .collect();
    let rates = |pick: fn(&(u64, u64)) -> u64| -> Option<f64> {
        let per: Vec<f64> = before_dg
            .iter()
            .zip(&after_dg)
            .filter_map(|(a, b)| Some((pick(b.as_ref()?) - pick(a.as_ref()?)) as f64 / window))
            .collect();
        (per.len() == n).then(|| mean(&per))
    };
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1) as f64;
    drop(members);
    Ok(SizeResult {
        members: n,
        discovery: args.discovery,
        converged_s,
        cpu_percent_mean: mean(&cpu),
        cpu_percent_max: max(&cpu),
        cpu_percent_of_machine: cpu.iter().sum::<f64>() / cores,
        rss_mib_mean: mean(&rss),
        rss_mib_max: max(&rss),
        datagrams_out_per_s: rates(|d| d.0),
        datagrams_in_per_s: rates(|d| d.1),
    })
}

async fn measure_redis(idle: Duration) -> anyhow::Result<RedisReference> {
    let server = RedisServer::start(None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = server.pid();
    let before = procinfo::cpu_seconds(Some(pid)).context("reading redis-server's CPU time")?;
    let start = Instant::now();
    tokio::time::sleep(idle).await;
    let after = procinfo::cpu_seconds(Some(pid)).context("reading redis-server's CPU time")?;
    let rss = procinfo::rss_bytes(Some(pid)).context("reading redis-server's RSS")?;
    Ok(RedisReference {
        cpu_percent: (after - before) / start.elapsed().as_secs_f64() * 100.0,
        rss_mib: rss as f64 / 1048576.0,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = args.grapevine_bin.clone().unwrap_or_else(default_binary);
    anyhow::ensure!(!args.sizes.is_empty() && args.sizes.iter().all(|n| *n > 0), "--sizes needs sizes above 0");
    let mut sizes = Vec::new();
    for (slot, n) in args.sizes.iter().copied().enumerate() {
        eprintln!("idle: starting {n} members ({:?} discovery)", args.discovery);
        sizes.push(measure_size(&args, &binary, n, slot).await?);
    }
    let redis = if args.no_redis || server_available().is_err() {
        None
    } else {
        Some(measure_redis(Duration::from_secs(args.idle_secs)).await?)
    };
    let report = Report { machine: procinfo::machine(), idle_secs: args.idle_secs, sizes, redis };

    println!("idle cluster on {} ({} s window, {:?} discovery)", report.machine, report.idle_secs, args.discovery);
    println!();
    println!(
        "| members | converged (s) | CPU per member, mean (% of a core) | max | all members (% of machine) | RSS per member, mean (MiB) | max | gossip datagrams out/in per member per s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &report.sizes {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {} / {} |",
            s.members,
            s.converged_s.map_or_else(|| "did not".into(), |c| format!("{c:.1}")),
            s.cpu_percent_mean,
            s.cpu_percent_max,
            s.cpu_percent_of_machine,
            s.rss_mib_mean,
            s.rss_mib_max,
            opt(s.datagrams_out_per_s, 1),
            opt(s.datagrams_in_per_s, 1),
        );
    }
    if let Some(r) = &report.redis {
        println!("| redis-server (1, reference) | - | {:.2} | - | - | {:.1} | - | - |", r.cpu_percent, r.rss_mib);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
