//! What a `loadgen` run reports, as a serializable document and as text tables.

use std::fmt::Write as _;

use serde::Serialize;

use crate::grapevine_target::MemoryEstimate;
use crate::redis_target::RedisMemory;
use crate::{RunResult, Workload};

/// The target names used in reports.
pub const GRAPEVINE: &str = "grapevine (embedded)";
/// Redis with `SET` only (asynchronous replication).
pub const REDIS: &str = "redis (SET)";
/// The grapevine processes, reached through RESP by the same client code as Redis.
pub const GRAPEVINE_RESP: &str = "grapevine (RESP)";

/// The grapevine targets, each compared with the Redis targets.
const GRAPEVINES: [&str; 2] = [GRAPEVINE_RESP, GRAPEVINE];
/// Redis with `SET` + `WAIT 1` (synchronous replication).
pub const REDIS_WAIT: &str = "redis (SET + WAIT 1)";

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Cores and CPU model.
    pub machine: String,
    /// `redis-server --version`, when redis was measured.
    pub redis_version: Option<String>,
    /// The workload.
    pub workload: Workload,
    /// grapevine members.
    pub members: usize,
    /// Every measured run: one list per round, one entry per target, in the order run.
    pub rounds: Vec<Vec<RunResult>>,
    /// Per target, the run of the round with the median throughput (the only round when there is
    /// one); the tables and ratios are computed from these.
    pub results: Vec<RunResult>,
    /// grapevine's memory figures, when measured.
    pub grapevine_memory: Option<GrapevineMemory>,
    /// Redis's memory figures, when measured.
    pub redis_memory: Option<RedisMemoryReport>,
    /// The memory figures of the grapevine processes (RESP target), when measured.
    pub resp_memory: Option<GrapevineMemory>,
    /// Members and synchronous backups of the RESP target.
    pub resp_members: usize,
    /// Synchronous backups of the RESP target's map.
    pub resp_backup_count: u8,
}

/// grapevine's memory: before and after writing every key once.
#[derive(Debug, Clone, Serialize)]
pub struct GrapevineMemory {
    /// Entries loaded.
    pub entries: u64,
    /// Process RSS before loading (every member plus the load generator live in the process).
    pub rss_before: u64,
    /// Process RSS after loading.
    pub rss_after: u64,
    /// The cluster's own estimate after loading, summed over members.
    pub estimate: MemoryEstimate,
    /// Copies of each entry (owner plus synchronous backups).
    pub copies: u64,
}

/// Redis's memory: before and after writing every key once.
#[derive(Debug, Clone, Serialize)]
pub struct RedisMemoryReport {
    /// Entries loaded (`DBSIZE`).
    pub entries: u64,
    /// Before loading.
    pub before: RedisMemory,
    /// After loading and the replica's acknowledgement.
    pub after: RedisMemory,
}

fn per(delta_bytes: i64, entries: u64) -> f64 {
    if entries == 0 { 0.0 } else { delta_bytes as f64 / entries as f64 }
}

fn delta(after: u64, before: u64) -> i64 {
    after as i64 - before as i64
}

impl GrapevineMemory {
    /// RSS growth per entry; both copies (owner and backup) are in this process.
    pub fn rss_per_entry_both_copies(&self) -> f64 {
        per(delta(self.rss_after, self.rss_before), self.entries)
    }

    /// The cluster's estimate per entry, both copies.
    pub fn estimate_per_entry_both_copies(&self) -> f64 {
        per(self.estimate.memory_bytes as i64, self.entries)
    }

    /// RSS growth per copy of an entry.
    pub fn rss_per_copy(&self) -> f64 {
        self.rss_per_entry_both_copies() / self.copies.max(1) as f64
    }
}

impl RedisMemoryReport {
    /// `used_memory` growth per entry on the primary.
    pub fn primary_used_per_entry(&self) -> f64 {
        per(delta(self.after.primary_used_memory, self.before.primary_used_memory), self.entries)
    }

    /// `used_memory` growth per entry on the replica.
    pub fn replica_used_per_entry(&self) -> f64 {
        per(delta(self.after.replica_used_memory, self.before.replica_used_memory), self.entries)
    }

    /// RSS growth per entry of the primary process.
    pub fn primary_rss_per_entry(&self) -> f64 {
        per(delta(self.after.primary_rss, self.before.primary_rss), self.entries)
    }

    /// RSS growth per entry of the replica process.
    pub fn replica_rss_per_entry(&self) -> f64 {
        per(delta(self.after.replica_rss, self.before.replica_rss), self.entries)
    }
}

/// A figure of a run, for the ratio table.
type Metric = fn(&RunResult) -> f64;

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() { format!("{:.2}x", a / b) } else { "-".into() }
}

/// Per target (in the order of the first round), the run with the median throughput.
pub fn medians(rounds: &[Vec<RunResult>]) -> Vec<RunResult> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .filter_map(|r| {
            let mut runs: Vec<&RunResult> = rounds.iter().flatten().filter(|x| x.target == r.target).collect();
            runs.sort_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
            runs.get(runs.len() / 2).map(|r| (*r).clone())
        })
        .collect()
}

impl Report {
    fn result(&self, target: &str) -> Option<&RunResult> {
        self.results.iter().find(|r| r.target == target)
    }

    /// Every round in brief, with the throughput ratios within each round.
    fn rounds_table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<6} {:<22} {:>10} {:>10} {:>10} {:>12} {:>12}",
            "round", "target", "ops/s", "get p99", "put p99", "gv/WAIT ops", "gv/SET ops"
        );
        for (i, round) in self.rounds.iter().enumerate() {
            let ops = |t: &str| round.iter().find(|r| r.target == t).map(|r| r.ops_per_s);
            for r in round {
                let (vs_wait, vs_set) = match (GRAPEVINES.contains(&r.target.as_str()), ops(&r.target)) {
                    (true, Some(g)) => (
                        ops(REDIS_WAIT).map(|w| ratio(g, w)).unwrap_or_default(),
                        ops(REDIS).map(|s| ratio(g, s)).unwrap_or_default(),
                    ),
                    _ => (String::new(), String::new()),
                };
                let _ = writeln!(
                    out,
                    "{:<6} {:<22} {:>10.0} {:>10} {:>10} {:>12} {:>12}",
                    i + 1,
                    r.target,
                    r.ops_per_s,
                    r.get.p99_us,
                    r.put.p99_us,
                    vs_wait,
                    vs_set
                );
            }
        }
    }

    /// The report as text tables.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let w = &self.workload;
        let _ = writeln!(out, "machine: {}", self.machine);
        if let Some(v) = &self.redis_version {
            let _ = writeln!(out, "redis:   {v}");
        }
        let _ = writeln!(
            out,
            "workload: {} clients, {}% gets / {}% puts, {} keys (uniform), {}-byte values, warm-up {:?}, measured {:?}; \
             grapevine: {} members, backup_count 1 (embedded: in this process; RESP: {} processes, backup_count {})",
            w.clients,
            w.read_percent,
            100 - u32::from(w.read_percent),
            w.keys,
            w.value_bytes,
            w.warmup,
            w.duration,
            self.members,
            self.resp_members,
            self.resp_backup_count
        );
        let _ = writeln!(out);
        if self.rounds.len() > 1 {
            self.rounds_table(&mut out);
            let _ = writeln!(out);
            let _ = writeln!(out, "median round per target (by throughput) of {} rounds:", self.rounds.len());
        }
        let _ = writeln!(
            out,
            "{:<22} {:>10} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>6}",
            "target", "ops/s", "get p50", "p99", "p99.9", "put p50", "p99", "p99.9", "CPU/op", "server", "errors"
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>6}",
            "", "", "(µs)", "(µs)", "(µs)", "(µs)", "(µs)", "(µs)", "(µs)", "(µs)", ""
        );
        for r in &self.results {
            let cpu = r.cpu_us_per_op.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into());
            let server = r.server_cpu_us_per_op.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<22} {:>10.0} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>6}",
                r.target,
                r.ops_per_s,
                r.get.p50_us,
                r.get.p99_us,
                r.get.p999_us,
                r.put.p50_us,
                r.put.p99_us,
                r.put.p999_us,
                cpu,
                server,
                r.errors
            );
        }
        for r in &self.results {
            if let Some(e) = &r.first_error {
                let _ = writeln!(out, "  {}: first error: {e}", r.target);
            }
            if r.misses > 0 {
                let _ = writeln!(out, "  {}: {} gets found no value", r.target, r.misses);
            }
        }
        for g in GRAPEVINES.iter().filter_map(|t| self.result(t)) {
            let peers: Vec<&RunResult> = [REDIS_WAIT, REDIS].iter().filter_map(|t| self.result(t)).collect();
            if !peers.is_empty() {
                let _ = writeln!(out);
                let mut header = format!("{:<22}", format!("ratios: {}", g.target));
                for p in &peers {
                    let _ = write!(header, " {:>24}", format!("/ {}", p.target));
                }
                let _ = writeln!(out, "{header}");
                let rows: [(&str, Metric); 7] = [
                    ("throughput", |r| r.ops_per_s),
                    ("get p50", |r| r.get.p50_us as f64),
                    ("get p99", |r| r.get.p99_us as f64),
                    ("get p99.9", |r| r.get.p999_us as f64),
                    ("put p50", |r| r.put.p50_us as f64),
                    ("put p99", |r| r.put.p99_us as f64),
                    ("put p99.9", |r| r.put.p999_us as f64),
                ];
                for (name, f) in rows {
                    let mut line = format!("{name:<22}");
                    for p in &peers {
                        let _ = write!(line, " {:>24}", ratio(f(g), f(p)));
                    }
                    let _ = writeln!(out, "{line}");
                }
                let mut line = format!("{:<22}", "CPU per op");
                for p in &peers {
                    let _ = write!(
                        line,
                        " {:>24}",
                        ratio(g.cpu_us_per_op.unwrap_or(f64::NAN), p.cpu_us_per_op.unwrap_or(0.0))
                    );
                }
                let _ = writeln!(out, "{line}");
            }
        }
        if self.grapevine_memory.is_some() || self.redis_memory.is_some() || self.resp_memory.is_some() {
            let _ = writeln!(out);
            let _ =
                writeln!(out, "memory per entry ({} entries, 12-byte keys, {}-byte values):", w.keys, w.value_bytes);
        }
        if let Some(m) = &self.grapevine_memory {
            let est = m.estimate_per_entry_both_copies();
            let rss = m.rss_per_entry_both_copies();
            let _ = writeln!(
                out,
                "  grapevine estimate (MapStats memory_bytes, {} owned + {} backup entries): {:.0} B/entry for both copies, {:.0} per copy",
                m.estimate.owned_entries,
                m.estimate.backup_entries,
                est,
                est / 2.0
            );
            let _ = writeln!(
                out,
                "  grapevine (embedded) process RSS growth (members and load generator in one process, owner + backup copy): {:.0} B/entry, {:.0} per copy",
                rss,
                m.rss_per_copy()
            );
        }
        if let Some(m) = &self.resp_memory {
            let _ = writeln!(
                out,
                "  grapevine (RESP) estimate (INFO memory used_memory, summed): {:.0} B/entry for {} copies, {:.0} per copy",
                m.estimate_per_entry_both_copies(),
                m.copies,
                m.estimate_per_entry_both_copies() / m.copies.max(1) as f64
            );
            let _ = writeln!(
                out,
                "  grapevine (RESP) RSS growth ({} member processes, backup_count {}): {:.0} B/entry for {} copies, {:.0} per copy",
                self.resp_members,
                self.resp_backup_count,
                m.rss_per_entry_both_copies(),
                m.copies,
                m.rss_per_copy()
            );
        }
        if let Some(m) = &self.redis_memory {
            let _ = writeln!(
                out,
                "  redis used_memory growth: primary {:.0} B/entry, replica {:.0} B/entry, both {:.0}",
                m.primary_used_per_entry(),
                m.replica_used_per_entry(),
                m.primary_used_per_entry() + m.replica_used_per_entry()
            );
            let _ = writeln!(
                out,
                "  redis process RSS growth: primary {:.0} B/entry, replica {:.0} B/entry, both {:.0}",
                m.primary_rss_per_entry(),
                m.replica_rss_per_entry(),
                m.primary_rss_per_entry() + m.replica_rss_per_entry()
            );
        }
        for (name, g) in [("grapevine (RESP)", &self.resp_memory), ("grapevine (embedded)", &self.grapevine_memory)] {
            if let (Some(g), Some(r)) = (g, &self.redis_memory) {
                let _ = writeln!(
                    out,
                    "  ratio {name} RSS per copy / redis primary: {} of RSS, {} of used_memory",
                    ratio(g.rss_per_copy(), r.primary_rss_per_entry()),
                    ratio(g.rss_per_copy(), r.primary_used_per_entry())
                );
            }
        }
        out
    }
}
