//! `loadgen`: the same get/put load against a grapevine cluster and against `redis-server`
//! (primary + replica), in one run, printing throughput, latency quantiles, the ratios between
//! them and memory per entry. See `docs/benchmarks.md`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use grapevine_benches::grapevine_target::GrapevineCluster;
use grapevine_benches::procinfo::{machine, rss_bytes};
use grapevine_benches::redis_target::{RedisPair, server_available};
use grapevine_benches::report::{
    GRAPEVINE, GRAPEVINE_RESP, GrapevineMemory, REDIS, REDIS_WAIT, RedisMemoryReport, Report, medians,
};
use grapevine_benches::resp_target::{GrapevineProcesses, default_binary};
use grapevine_benches::{Workload, preload, run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// The in-process (embedded) cluster only.
    Grapevine,
    /// grapevine processes through RESP only.
    Resp,
    /// Redis only.
    Redis,
    /// Embedded grapevine and Redis.
    Both,
    /// grapevine through RESP and Redis: the same client, the same protocol.
    RespVsRedis,
    /// grapevine through RESP, embedded grapevine, and Redis.
    All,
}

/// Load generator: N concurrent clients, a get/put mix on uniformly random keys, against
/// grapevine member processes through RESP (the same client code as for Redis), an embedded
/// grapevine cluster (in this process, `backup_count = 1`) and redis-server (primary + replica,
/// started here), in the same run.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Concurrent clients (each with one operation in flight).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Measured seconds per target.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Seconds of load before measuring, per target.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Distinct keys, all written once before measuring.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Percentage of gets (the rest are puts).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: u8,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Target::All)]
    target: Target,
    /// grapevine members (embedded: on 127.0.0.11, .12, ...; RESP: processes on 127.0.0.1).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Synchronous backups of the RESP target's map (the embedded target uses 1).
    #[arg(long, default_value_t = 1)]
    backup_count: u8,
    /// The `grapevine` binary of the RESP target (default: the one next to loadgen).
    #[arg(long)]
    grapevine_bin: Option<std::path::PathBuf>,
    /// Measured runs per target, alternating targets (grapevine, redis + WAIT, redis) so that a
    /// noisy neighbour hurts all of them alike; the report gives every round and the median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seed of the clients' key sequences.
    #[arg(long, default_value_t = Workload::default().seed)]
    seed: u64,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args = Args::parse();
    // On Ctrl-C the run is dropped, which stops the redis-server processes (drop guards).
    tokio::select! {
        outcome = bench(args) => match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("loadgen: {error:#}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("loadgen: interrupted");
            ExitCode::from(130)
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let workload = Workload {
        clients: args.clients,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
        keys: args.keys,
        value_bytes: args.value_bytes,
        read_percent: args.read_percent,
        seed: args.seed,
    };
    anyhow::ensure!(workload.clients > 0 && workload.keys > 0, "--clients and --keys must be positive");
    anyhow::ensure!(!workload.duration.is_zero(), "--duration-secs must be positive");
    let redis_version = match args.target {
        Target::Grapevine | Target::Resp => None,
        Target::Redis | Target::Both | Target::RespVsRedis | Target::All => {
            Some(server_available().map_err(anyhow::Error::msg)?)
        }
    };
    anyhow::ensure!(args.rounds > 0, "--rounds must be positive");
    let (with_resp, with_grapevine, with_redis) = match args.target {
        Target::Grapevine => (false, true, false),
        Target::Resp => (true, false, false),
        Target::Redis => (false, false, true),
        Target::Both => (false, true, true),
        Target::RespVsRedis => (true, false, true),
        Target::All => (true, true, true),
    };
    // Every target is loaded first (memory is measured then), then measured in turns.
    let binary = args.grapevine_bin.clone().unwrap_or_else(default_binary);
    let resp =
        if with_resp { Some(setup_resp(&workload, &binary, args.members, args.backup_count).await?) } else { None };
    let grapevine = if with_grapevine { Some(setup_grapevine(&workload, args.members).await?) } else { None };
    let redis = if with_redis { Some(setup_redis(&workload).await?) } else { None };
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let mut results = Vec::new();
        let what = format!("round {round}/{}: {:?} + {:?} warm-up", args.rounds, workload.duration, workload.warmup);
        if let Some((cluster, _)) = &resp {
            eprintln!("grapevine (RESP): {what}");
            let clients = cluster.clients(workload.clients, workload.value_bytes).await?;
            results.push(run(GRAPEVINE_RESP, clients, &workload, &cluster.pids()).await?);
        }
        if let Some((cluster, _)) = &grapevine {
            eprintln!("grapevine: {what}");
            let clients = cluster.clients(workload.clients, workload.value_bytes)?;
            results.push(run(GRAPEVINE, clients, &workload, &[]).await?);
        }
        if let Some((pair, _)) = &redis {
            let pids = pair.pids();
            eprintln!("redis (SET + WAIT 1): {what}");
            let clients = pair.clients(workload.clients, workload.value_bytes, true).await?;
            results.push(run(REDIS_WAIT, clients, &workload, &pids).await?);
            eprintln!("redis (SET): {what}");
            let clients = pair.clients(workload.clients, workload.value_bytes, false).await?;
            results.push(run(REDIS, clients, &workload, &pids).await?);
        }
        rounds.push(results);
    }
    let report = Report {
        machine: machine(),
        redis_version,
        workload: workload.clone(),
        members: args.members,
        results: medians(&rounds),
        rounds,
        grapevine_memory: grapevine.as_ref().map(|(_, m)| m.clone()),
        redis_memory: redis.as_ref().map(|(_, m)| m.clone()),
        resp_memory: resp.as_ref().map(|(_, m)| m.clone()),
        resp_members: args.members,
        resp_backup_count: args.backup_count,
    };
    if let Some((cluster, _)) = grapevine {
        cluster.kill().await;
    }
    drop(redis);
    if let Some(path) = &args.json_file {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// Starts the cluster and writes every key once; measures memory around the load.
async fn setup_grapevine(workload: &Workload, members: usize) -> anyhow::Result<(GrapevineCluster, GrapevineMemory)> {
    let started = Instant::now();
    eprintln!("grapevine: starting {members} members on 127.0.0.11..");
    let cluster = GrapevineCluster::start(members, 0, 11).await?;
    eprintln!("grapevine: cluster formed and settled in {:.1} s", started.elapsed().as_secs_f64());
    let clients = cluster.clients(workload.clients, workload.value_bytes)?;
    let rss_before = rss_bytes(None).context("reading /proc/self/status")?;
    let started = Instant::now();
    preload(clients, workload.keys).await?;
    let rss_after = rss_bytes(None).context("reading /proc/self/status")?;
    eprintln!("grapevine: preloaded {} keys in {:.1} s", workload.keys, started.elapsed().as_secs_f64());
    let memory = GrapevineMemory {
        entries: workload.keys,
        rss_before,
        rss_after,
        estimate: cluster.memory_estimate(),
        copies: 2,
    };
    Ok((cluster, memory))
}

/// Starts the grapevine processes and writes every key once through RESP; measures their memory
/// around the load.
async fn setup_resp(
    workload: &Workload,
    binary: &std::path::Path,
    members: usize,
    backup_count: u8,
) -> anyhow::Result<(GrapevineProcesses, GrapevineMemory)> {
    let started = Instant::now();
    eprintln!("grapevine (RESP): starting {members} processes of {}", binary.display());
    let cluster = GrapevineProcesses::start(binary, members, backup_count).await?;
    eprintln!("grapevine (RESP): cluster formed and settled in {:.1} s", started.elapsed().as_secs_f64());
    // Connections first: their buffers are not entries.
    let clients = cluster.clients(workload.clients, workload.value_bytes).await?;
    let (rss_before, used_before) = (cluster.rss(), cluster.used_memory().await?);
    let started = Instant::now();
    let clients = preload(clients, workload.keys).await?;
    let (rss_after, used_after) = (cluster.rss(), cluster.used_memory().await?);
    drop(clients);
    eprintln!("grapevine (RESP): preloaded {} keys in {:.1} s", workload.keys, started.elapsed().as_secs_f64());
    let copies = 1 + u64::from(backup_count);
    let estimate = grapevine_benches::grapevine_target::MemoryEstimate {
        memory_bytes: used_after.saturating_sub(used_before),
        owned_entries: workload.keys,
        backup_entries: workload.keys * u64::from(backup_count),
    };
    let memory = GrapevineMemory { entries: workload.keys, rss_before, rss_after, estimate, copies };
    Ok((cluster, memory))
}

/// Starts the primary and the replica and writes every key once; measures memory around the load.
async fn setup_redis(workload: &Workload) -> anyhow::Result<(RedisPair, RedisMemoryReport)> {
    eprintln!("redis: starting a primary and a replica");
    let pair = RedisPair::start().await?;
    eprintln!("redis: primary on port {}, replica on port {}, in sync", pair.primary.port, pair.replica.port);
    // Connections first: their buffers are not entries.
    let clients = pair.clients(workload.clients, workload.value_bytes, false).await?;
    let before = pair.memory().await?;
    let started = Instant::now();
    let clients = preload(clients, workload.keys).await?;
    pair.wait_replicated().await?;
    eprintln!("redis: preloaded {} keys in {:.1} s", workload.keys, started.elapsed().as_secs_f64());
    let entries = pair.primary.dbsize().await?;
    let after = pair.memory().await?;
    drop(clients);
    Ok((pair, RedisMemoryReport { entries, before, after }))
}
