//! Helpers shared by the network-namespace tests (`chaos_netns.rs`, `faults_netns.rs`,
//! `mdns_netns.rs`): whether namespaces can be used here, the lab's address block, running `ip`,
//! and waiting for the clock.

#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether a namespace test that cannot run must fail instead of being skipped
/// (`CHAOS_NETNS_REQUIRED` set to anything but empty or `0`).
pub fn required() -> bool {
    std::env::var_os("CHAOS_NETNS_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Why network-namespace tests cannot run here, if they cannot: not root, no `ip netns`, no `nft`,
/// or no permission to create a namespace and use nftables in it (probed with namespace `probe`).
pub fn unavailable(probe: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some(format!("not running as root (effective uid {})", euid.unwrap_or("unknown")));
    }
    let works = |program: &str, args: &[&str]| match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            Err(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
        Err(e) => Err(format!("`{program}` cannot run: {e}")),
    };
    if let Err(e) = works("ip", &["netns", "list"]) {
        return Some(format!("{e} (install iproute2)"));
    }
    if let Err(e) = works("nft", &["--version"]) {
        return Some(format!("{e} (install nftables)"));
    }
    quiet("ip", &["netns", "del", probe]);
    let probed = works("ip", &["netns", "add", probe])
        .and_then(|()| works("ip", &["netns", "exec", probe, "nft", "list", "ruleset"]));
    quiet("ip", &["netns", "del", probe]);
    probed.err().map(|e| format!("cannot use a network namespace: {e}"))
}

/// The third octet of the lab's /28: the first, from `pid % 250` on, whose /28 for `slot` is not
/// routed on this host already (another lab).
pub fn free_octet(pid: u32, slot: u8) -> u32 {
    let out = Command::new("ip").args(["-4", "route", "show"]).output().expect("ip route");
    let routes = String::from_utf8_lossy(&out.stdout);
    (0..250)
        .map(|k| (pid + k) % 250)
        .find(|o| !routes.contains(&format!("10.213.{o}.{}/28", 16 * u32::from(slot))))
        .expect("a free /28 in 10.213.0.0/16")
}

/// Runs `ip args`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs a command, ignoring its output and outcome.
pub fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Waits until the wall clock (milliseconds since the Unix epoch, which entries' update times use)
/// has moved on by two milliseconds, so that what is written next is certainly later
/// (`latest-update` compares update times).
pub fn next_millisecond() {
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis();
    let (start, deadline) = (now(), Instant::now() + Duration::from_secs(1));
    while now() < start + 2 {
        assert!(Instant::now() < deadline, "the wall clock does not move");
        std::thread::sleep(Duration::from_millis(1));
    }
}
