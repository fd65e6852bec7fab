//! `nearcache`: get throughput and latency of a map with a near cache against the same map
//! without one, on the same in-process cluster in the same run (embedded use: the reads are made
//! through a member's API, as a service that embeds a member makes them).
//!
//! Three members on loopback addresses; both maps hold the same keys and values; clients on
//! member 0 read random keys for `--secs` seconds, first from the plain map, then from the
//! near-cached one (after one warm-up pass over its keys). Reads of keys that member 0 owns need
//! no hop either way; the rest cross to their owner on the plain map and are answered locally
//! from the near cache.
//!
//! ```sh
//! cargo build --release -p grapevine-benches --bin nearcache
//! target/release/nearcache --keys 10000 --clients 16 --secs 5
//! ```
//! See docs/benchmarks.md.

use std::time::{Duration, Instant};

use clap::Parser;
use grapevine::{MapConfig, NearCacheConfig};
use grapevine_benches::XorShift;
use grapevine_benches::grapevine_target::GrapevineCluster;
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Distinct keys in each map.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Concurrent readers on member 0.
    #[arg(long, default_value_t = 16)]
    clients: u64,
    /// Seconds each map is read for.
    #[arg(long, default_value_t = 5)]
    secs: u64,
}

const PLAIN: &str = "plain";
const CACHED: &str = "cached";

struct Measured {
    gets_per_s: f64,
    latency: Histogram<u64>,
}

async fn read_for(cluster: &GrapevineCluster, map: &str, args: &Args) -> anyhow::Result<Measured> {
    let member = &cluster.members[0];
    let started = Instant::now();
    let until = started + Duration::from_secs(args.secs);
    let mut readers = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let map = member.map::<String, Vec<u8>>(map)?;
        let keys = args.keys;
        readers.spawn(async move {
            let mut rng = XorShift::new(0x5eed ^ c);
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut gets = 0u64;
            while Instant::now() < until {
                let key = format!("key-{}", rng.below(keys));
                let t = Instant::now();
                anyhow::ensure!(map.get(&key).await?.is_some(), "{key} is missing");
                let _ = latency.record((t.elapsed().as_micros() as u64).max(1));
                gets += 1;
            }
            anyhow::Ok((gets, latency))
        });
    }
    let mut total = 0u64;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(done) = readers.join_next().await {
        let (gets, h) = done??;
        total += gets;
        latency.add(h)?;
    }
    Ok(Measured { gets_per_s: total as f64 / started.elapsed().as_secs_f64(), latency })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.keys > 0 && args.clients > 0 && args.secs > 0, "keys, clients and secs must be positive");
    let near = NearCacheConfig { max_entries: args.keys.max(1) * 2, ..NearCacheConfig::default() };
    let cluster = GrapevineCluster::start_with(3, 217, 1, |config| {
        config.maps.insert(PLAIN.into(), MapConfig::default());
        config.maps.insert(CACHED.into(), MapConfig { near_cache: Some(near.clone()), ..MapConfig::default() });
    })
    .await?;
    let member = &cluster.members[0];
    let value = vec![b'v'; args.value_bytes];
    for name in [PLAIN, CACHED] {
        let map = member.map::<String, Vec<u8>>(name)?;
        for k in 0..args.keys {
            map.put(&format!("key-{k}"), &value).await?;
        }
    }
    // Warm the near cache: one read of every key.
    let cached = member.map::<String, Vec<u8>>(CACHED)?;
    for k in 0..args.keys {
        cached.get(&format!("key-{k}")).await?;
    }
    let plain = read_for(&cluster, PLAIN, &args).await?;
    let near_cached = read_for(&cluster, CACHED, &args).await?;
    let stats = member.map_service().near_cache_stats();
    println!(
        "{} keys of {} bytes, {} readers on member 0 of 3, {} s per map (embedded reads)\n",
        args.keys, args.value_bytes, args.clients, args.secs
    );
    println!("| map | gets/s | ratio | p50 (µs) | p99 | p99.9 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, m) in [("plain", &plain), ("near-cached", &near_cached)] {
        let q = |p: f64| m.latency.value_at_quantile(p);
        println!(
            "| {name} | {:.0} | {:.2}x | {} | {} | {} |",
            m.gets_per_s,
            m.gets_per_s / plain.gets_per_s,
            q(0.5),
            q(0.99),
            q(0.999)
        );
    }
    for s in stats.iter().filter(|s| s.map == CACHED) {
        println!(
            "\nnear cache on member 0: {} entries, {} hits, {} misses, {} purges",
            s.entries, s.hits, s.misses, s.purges
        );
    }
    cluster.kill().await;
    Ok(())
}
