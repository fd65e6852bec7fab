//! The load generator behind `loadgen`: N concurrent clients run a get/put mix on uniformly
//! random keys against a target (a grapevine cluster, or `redis-server` with a replica), and every
//! operation's latency goes into a histogram. Each target only has to say how to get and put one
//! key ([`KvClient`]); the generator, the key distribution, the values and the mix are the same
//! for all, so figures measured in the same run can be compared.
//!
//! Speed is reported as ratios between targets measured in the same run, never asserted.

use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

pub mod grapevine_target;
pub mod procinfo;
pub mod redis_target;
pub mod report;
pub mod resp_target;

/// What the clients do, and for how long.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Concurrent clients, each with one operation in flight at a time.
    pub clients: usize,
    /// Operations before measuring starts (not recorded).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Distinct keys; every key is written once before measuring, so gets hit.
    pub keys: u64,
    /// Bytes of every value.
    pub value_bytes: usize,
    /// Percentage of operations that are gets; the rest are puts.
    pub read_percent: u8,
    /// Seed of the clients' random number generators.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 32,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            keys: 100_000,
            value_bytes: 100,
            read_percent: 80,
            seed: 0x6772_6170_6576_696e,
        }
    }
}

/// The name of key number `i`, the same bytes for every target: `key:00000042` (12 bytes below
/// 10^8 keys).
pub fn key_name(buf: &mut String, i: u64) {
    buf.clear();
    let _ = write!(buf, "key:{i:08}");
}

/// The value a client writes: `bytes` bytes, different per client, the same for every target.
pub fn value_for(client: usize, bytes: usize) -> Vec<u8> {
    let mut rng = XorShift::new(client as u64 + 1);
    (0..bytes).map(|_| rng.next_u64() as u8).collect()
}

/// One client connection of a target.
pub trait KvClient: Send + 'static {
    /// Reads key number `key`; true when it was found.
    fn get(&mut self, key: u64) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Writes key number `key` with this client's value; returns when the target considers the
    /// write done (for grapevine: acknowledged by the synchronous backup).
    fn put(&mut self, key: u64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// xorshift64*: a tiny, seeded generator, so every target sees the same key sequence.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from any seed (mixed with splitmix64; never zero).
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is negligible for our `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Latency quantiles of one operation type, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Operations recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// What a measured run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The target's name as printed (`grapevine`, `redis (SET)`, ...).
    pub target: String,
    /// Operations completed in the measured window (errors excluded).
    pub ops: u64,
    /// Operations that failed in the measured window.
    pub errors: u64,
    /// Gets that found no value (should be 0: every key is preloaded).
    pub misses: u64,
    /// Length of the measured window, in seconds.
    pub seconds: f64,
    /// `ops / seconds`.
    pub ops_per_s: f64,
    /// Get latencies.
    pub get: Latency,
    /// Put latencies.
    pub put: Latency,
    /// CPU time per operation, in µs, of everything involved: this process (load generator and,
    /// for grapevine, the members) plus the target's own processes (redis-server). `None` when
    /// `/proc` is not readable.
    pub cpu_us_per_op: Option<f64>,
    /// The part of [`RunResult::cpu_us_per_op`] spent in other processes (the redis servers).
    pub server_cpu_us_per_op: Option<f64>,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Operations done during the warm-up (not measured).
    pub warmup_ops: u64,
}

/// What one client task counted.
struct ClientTally {
    get: Histogram<u64>,
    put: Histogram<u64>,
    errors: u64,
    misses: u64,
    first_error: Option<String>,
    warmup_ops: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Runs the workload with one task per client: warm-up, then the measured window. Each client
/// yields to the scheduler between operations, as independent clients would (an operation on a
/// member that owns the key completes without ever yielding, and would otherwise keep the worker
/// thread to itself). CPU time is sampled from a separate thread at the start and end of the
/// measured window, for this process and for `server_pids` (the target's own processes).
pub async fn run<C: KvClient>(
    target: &str,
    clients: Vec<C>,
    workload: &Workload,
    server_pids: &[u32],
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(!clients.is_empty(), "no clients");
    anyhow::ensure!(workload.keys > 0, "no keys");
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + workload.warmup;
    let end = measure_from + workload.duration;
    let pids = server_pids.to_vec();
    let sampler = std::thread::spawn(move || {
        let cpu = || -> Option<(f64, f64)> {
            let servers = pids.iter().map(|pid| procinfo::cpu_seconds(Some(*pid))).sum::<Option<f64>>()?;
            Some((procinfo::cpu_seconds(None)?, servers))
        };
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let before = cpu();
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        (before, cpu())
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let (keys, read_percent) = (workload.keys, u64::from(workload.read_percent));
        let mut rng = XorShift::new(workload.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tasks.spawn(async move {
            let mut tally = ClientTally {
                get: histogram(),
                put: histogram(),
                errors: 0,
                misses: 0,
                first_error: None,
                warmup_ops: 0,
            };
            tokio::time::sleep_until(start.into()).await;
            loop {
                tokio::task::yield_now().await;
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let key = rng.below(keys);
                let read = rng.below(100) < read_percent;
                let outcome = if read { client.get(key).await } else { client.put(key).await.map(|()| true) };
                let latency = t0.elapsed();
                if t0 < measure_from {
                    tally.warmup_ops += 1;
                    continue;
                }
                match outcome {
                    Ok(found) => {
                        let h = if read { &mut tally.get } else { &mut tally.put };
                        h.saturating_record(micros(latency));
                        if !found {
                            tally.misses += 1;
                        }
                    }
                    Err(error) => {
                        tally.errors += 1;
                        if tally.first_error.is_none() {
                            tally.first_error = Some(format!("{error:#}"));
                        }
                    }
                }
            }
            tally
        });
    }
    let mut get = histogram();
    let mut put = histogram();
    let (mut errors, mut misses, mut warmup_ops, mut first_error) = (0, 0, 0, None);
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.context("a client task panicked")?;
        get.add(&tally.get).context("merging histograms")?;
        put.add(&tally.put).context("merging histograms")?;
        errors += tally.errors;
        misses += tally.misses;
        warmup_ops += tally.warmup_ops;
        first_error = first_error.or(tally.first_error);
    }
    let (cpu_before, cpu_after) = sampler.join().map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
    // Operations that started before the end are counted; the window is the nominal duration.
    let seconds = workload.duration.as_secs_f64();
    let ops = get.len() + put.len();
    let (cpu_us_per_op, server_cpu_us_per_op) = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) if ops > 0 => {
            let per_op = |seconds: f64| seconds * 1e6 / ops as f64;
            (Some(per_op(b.0 - a.0 + b.1 - a.1)), Some(per_op(b.1 - a.1)))
        }
        _ => (None, None),
    };
    Ok(RunResult {
        target: target.to_string(),
        ops,
        errors,
        misses,
        seconds,
        ops_per_s: ops as f64 / seconds,
        get: Latency::of(&get),
        put: Latency::of(&put),
        cpu_us_per_op,
        server_cpu_us_per_op,
        first_error,
        warmup_ops,
    })
}

/// Writes every key once, the keys split over the clients, all clients at once. Returns the
/// clients (in their order) for the measured run.
pub async fn preload<C: KvClient>(clients: Vec<C>, keys: u64) -> anyhow::Result<Vec<C>> {
    let n = clients.len() as u64;
    anyhow::ensure!(n > 0, "no clients");
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut key = i as u64;
            while key < keys {
                if let Err(error) = client.put(key).await {
                    return Err(error.context(format!("preloading key {key}")));
                }
                key += n;
            }
            Ok((i, client))
        });
    }
    let mut done = Vec::with_capacity(n as usize);
    while let Some(joined) = tasks.join_next().await {
        done.push(joined.context("a preload task panicked")??);
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, c)| c).collect())
}
