//! `migrate`: how fast a cluster moves data to a new member, and what a light load sees meanwhile.
//! Three `grapevine` processes (`backup_count = 1`) are loaded with `--gigabytes` of entries
//! through RESP, a light load (gets and sets at a fixed rate) runs for `--baseline-secs`, then a
//! fourth member starts; the run ends when the partition table has settled on four members. It
//! reports the migration rate (what the new member holds, by its own estimate, over the time from
//! its start to the settled table) and the light load's latencies before and during. See
//! docs/benchmarks.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use grapevine_benches::redis_target::connect_to;
use grapevine_benches::resp_target::{GrapevineProcesses, default_binary};
use grapevine_benches::{XorShift, key_name, value_for};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Data to load (values only), in GiB.
    #[arg(long, default_value_t = 1.0)]
    gigabytes: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Seconds of light load before the fourth member starts.
    #[arg(long, default_value_t = 10)]
    baseline_secs: u64,
    /// Operations per second of the light load (80 % gets), over 4 clients.
    #[arg(long, default_value_t = 400)]
    light_ops_per_s: u64,
    /// The `grapevine` binary (default: the one next to this one).
    #[arg(long)]
    grapevine_bin: Option<std::path::PathBuf>,
}

const BEFORE: u8 = 0;
const DURING: u8 = 1;
const STOP: u8 = 2;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no operations".into();
    }
    format!(
        "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} ops)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = args.grapevine_bin.clone().unwrap_or_else(default_binary);
    let keys = ((args.gigabytes * f64::from(1u32 << 30)) / args.value_bytes as f64) as u64;
    anyhow::ensure!(keys > 0, "--gigabytes and --value-bytes give no key");

    eprintln!("migrate: starting 3 members (backup_count 1)");
    let mut cluster = GrapevineProcesses::start(&binary, 3, 1).await?;

    let started = Instant::now();
    let loaders = 8u64;
    let mut tasks = tokio::task::JoinSet::new();
    for l in 0..loaders {
        let addr = cluster.resp_addr(l as usize % 3);
        let value = value_for(l as usize, args.value_bytes);
        tasks.spawn(async move {
            let mut con = connect_to(addr).await?;
            let mut key = String::new();
            let mut i = l;
            while i < keys {
                let mut pipe = redis::pipe();
                for _ in 0..256 {
                    if i >= keys {
                        break;
                    }
                    key_name(&mut key, i);
                    pipe.cmd("SET").arg(&key).arg(&value[..]).ignore();
                    i += loaders;
                }
                pipe.exec_async(&mut con).await.context("loading")?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let load_s = started.elapsed().as_secs_f64();
    let loaded_mib = (keys * (12 + args.value_bytes as u64)) as f64 / f64::from(1u32 << 20);
    eprintln!("migrate: loaded {keys} entries ({loaded_mib:.0} MiB of keys and values) in {load_s:.1} s");

    let phase = Arc::new(AtomicU8::new(BEFORE));
    let mut light = tokio::task::JoinSet::new();
    let clients = 4u64;
    for c in 0..clients {
        let (addr, phase) = (cluster.resp_addr(c as usize % 3), phase.clone());
        let value = value_for(100 + c as usize, args.value_bytes);
        let period = Duration::from_secs_f64(clients as f64 / args.light_ops_per_s.max(1) as f64);
        light.spawn(async move {
            let mut con = connect_to(addr).await?;
            let (mut before, mut during, mut errors) = (histogram(), histogram(), 0u64);
            let mut rng = XorShift::new(c + 1);
            let mut key = String::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = phase.load(Ordering::Relaxed);
                if now == STOP {
                    break;
                }
                key_name(&mut key, rng.below(keys));
                let t0 = Instant::now();
                let outcome = if rng.below(100) < 80 {
                    redis::cmd("GET").arg(&key).query_async::<Option<Vec<u8>>>(&mut con).await.map(|_| ())
                } else {
                    redis::cmd("SET").arg(&key).arg(&value[..]).exec_async(&mut con).await
                };
                let micros = (t0.elapsed().as_micros() as u64).max(1);
                match outcome {
                    Ok(()) if now == BEFORE => before.saturating_record(micros),
                    Ok(()) => during.saturating_record(micros),
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((before, during, errors))
        });
    }
    tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;

    eprintln!("migrate: starting a fourth member");
    phase.store(DURING, Ordering::Relaxed);
    let t0 = Instant::now();
    cluster.add_member(&binary)?;
    let settled_at = cluster.wait_settled(4).await?;
    phase.store(STOP, Ordering::Relaxed);
    let migration_s = settled_at.saturating_duration_since(t0).as_secs_f64();
    let (mut before, mut during, mut errors) = (histogram(), histogram(), 0);
    while let Some(done) = light.join_next().await {
        let (b, d, e) = done??;
        before.add(&b)?;
        during.add(&d)?;
        errors += e;
    }
    let moved = cluster.member_used_memory(3).await? as f64 / 1e6;
    let p99_ratio = during.value_at_quantile(0.99) as f64 / before.value_at_quantile(0.99).max(1) as f64;

    println!("machine: {}", grapevine_benches::procinfo::machine());
    println!(
        "loaded: {keys} entries of 12-byte keys and {}-byte values ({loaded_mib:.0} MiB, each stored twice: owner and backup) into 3 members in {load_s:.1} s",
        args.value_bytes
    );
    println!(
        "migration: the fourth member started and the table settled on 4 members in {migration_s:.1} s; it holds {moved:.0} MB \
         (its own estimate, owner and backup copies): {:.0} MB/s (target: at least 500 MB/s)",
        moved / migration_s.max(1e-3)
    );
    println!("light load ({} ops/s, 80 % gets, {clients} clients on the first 3 members):", args.light_ops_per_s);
    println!("  before: {}", quantiles(&before));
    println!("  during: {}", quantiles(&during));
    println!("  p99 during / before: {p99_ratio:.2}x (target: at most 2x); errors: {errors}");
    Ok(())
}
