//! Resident memory and CPU time of processes, from Linux's `/proc`. `None` where `/proc` is not
//! there or does not parse (the report then leaves the figure out).

/// Linux reports `utime`/`stime` in clock ticks of `USER_HZ`, which is 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Resident set size in bytes (`VmRSS` of `/proc/<pid>/status`; `None`: this process).
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    parse_rss(&std::fs::read_to_string(proc_path(pid, "status")).ok()?)
}

/// User plus system CPU time of all the process's threads, in seconds (`None`: this process).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string(proc_path(pid, "stat")).ok()?)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may contain spaces: fields after it are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The CPU model and core count, for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores, {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_formats() {
        let status = "Name:\tredis-server\nVmPeak:\t  9000 kB\nVmRSS:\t    1536 kB\nThreads:\t4\n";
        assert_eq!(parse_rss(status), Some(1536 * 1024));
        assert_eq!(parse_rss("Name:\tx\n"), None);
        // A command name with spaces and a `)`; utime 250 and stime 50 ticks are fields 14 and 15.
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 99 1000 200";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert_eq!(parse_cpu_seconds("4242 (cmd) S 1"), None);
    }

    /// On Linux, `/proc` is there: this process's figures are read, and its CPU time grows while it
    /// computes.
    #[test]
    #[cfg_attr(not(target_os = "linux"), ignore = "reads Linux's /proc")]
    fn reads_this_process() {
        assert!(rss_bytes(None).expect("VmRSS of /proc/self/status") > 0);
        let before = cpu_seconds(None).expect("utime and stime of /proc/self/stat");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        while cpu_seconds(None).unwrap() < before + 0.05 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
            }
            assert!(std::time::Instant::now() < deadline, "CPU time did not grow from {before} s ({x})");
        }
    }
}
