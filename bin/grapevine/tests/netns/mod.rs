//! Helpers shared by the network-namespace tests (`chaos_netns.rs`, `faults_netns.rs`,
//! `mdns_netns.rs`): whether namespaces can be used here, the lab's address block, running `ip`,
//! building and removing a lab of namespaces on a bridge, nftables tables that drop a member's
//! traffic, and waiting for the clock.

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

/// Builds a lab's network: namespace `switch` holding bridge `br0`; a veth from the host
/// (`host_veth`, holding `host_cidr`, e.g. `10.213.7.14/28`) to the bridge (port `host`), so that
/// the test process reaches the members directly; and for each `(namespace, address)` of
/// `members` a namespace whose `eth0` (holding `address/28`) is on the bridge (port `v<k>`, `k`
/// from 1), with `lo` up. The bridge lives in a namespace of its own, so that no firewall of the
/// host (bridged traffic can go through the host's netfilter hooks) sees traffic between members;
/// the namespaces have no default route, so nothing leaves the lab. Panics naming the `ip`
/// command that failed; [`remove_bridge_lab`] undoes it.
pub fn build_bridge_lab(switch: &str, host_veth: &str, host_cidr: &str, members: &[(&str, &str)]) {
    assert!(host_veth.len() <= 15, "interface name {host_veth} is too long");
    ip(&["netns", "add", switch]);
    ip(&["-n", switch, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", switch, "link", "set", "br0", "up"]);
    ip(&["link", "add", host_veth, "type", "veth", "peer", "name", "host", "netns", switch]);
    ip(&["-n", switch, "link", "set", "host", "master", "br0", "up"]);
    ip(&["addr", "add", host_cidr, "dev", host_veth]);
    ip(&["link", "set", host_veth, "up"]);
    for (k, (ns, address)) in members.iter().enumerate() {
        let port = format!("v{}", k + 1);
        ip(&["netns", "add", ns]);
        ip(&["-n", switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        ip(&["-n", switch, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{address}/28"), "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
}

/// Removes what [`build_bridge_lab`] built (the member namespaces, with the nftables tables in
/// them, the switch namespace and the host's veth); errors are ignored (nothing to remove).
pub fn remove_bridge_lab<'a>(switch: &str, host_veth: &str, namespaces: impl IntoIterator<Item = &'a str>) {
    for ns in namespaces {
        quiet("ip", &["netns", "del", ns]);
    }
    quiet("ip", &["netns", "del", switch]);
    quiet("ip", &["link", "del", host_veth]);
}

/// An nftables script: table `inet <table>` whose `input` chain drops what comes from
/// `addresses` (a comma-separated list) when `input`, and whose `output` chain drops what goes to
/// them when `output`; `only` narrows both to a match such as `meta l4proto tcp`.
pub fn drop_table(table: &str, addresses: &str, input: bool, output: bool, only: Option<&str>) -> String {
    let only = only.map(|m| format!(" {m}")).unwrap_or_default();
    let mut script = format!("table inet {table} {{\n");
    if input {
        script += &format!(
            "  chain input {{ type filter hook input priority filter; policy accept; ip saddr {{ {addresses} }}{only} drop; }}\n"
        );
    }
    if output {
        script += &format!(
            "  chain output {{ type filter hook output priority filter; policy accept; ip daddr {{ {addresses} }}{only} drop; }}\n"
        );
    }
    script + "}\n"
}

/// Loads the nftables script `script` in namespace `ns` (`nft -f`); the error says why not.
pub fn nft(ns: &str, script: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft cannot run: {e}"))?;
    child.stdin.take().expect("piped stdin").write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft -f failed in {ns}: {}\n{script}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The `main` of a namespace test binary (`harness = false`): `lab` tests need network namespaces
/// and are reported ignored with the reason when this host cannot build labs (failed instead when
/// [`required`]); `plain` tests always run. `binary` names the binary in that report, `probe` the
/// namespace used to find out (unique per binary, so binaries running at once do not collide).
pub fn run_tests(binary: &str, probe: &str, lab: &[(&'static str, fn())], plain: &[(&'static str, fn())]) -> ! {
    use libtest_mimic::{Arguments, Failed, Trial};
    let args = Arguments::from_args();
    let unavailable = unavailable(&format!("{probe}{}", std::process::id()));
    let required = required();
    if let Some(reason) = &unavailable
        && !required
        && !args.list
    {
        // Not while listing: nextest parses that output.
        println!(
            "{binary}: the {} network-namespace tests are ignored: {reason}. Run them as root with iproute2 and \
             nftables; CHAOS_NETNS_REQUIRED=1 makes this a failure.",
            lab.len()
        );
    }
    let lab_trials = lab.iter().map(|&(name, test)| {
        let reason = unavailable.clone();
        Trial::test(name, move || match reason {
            Some(reason) => Err(Failed::from(format!(
                "network namespaces are unavailable: {reason}{}",
                if required { " (CHAOS_NETNS_REQUIRED is set)" } else { "" }
            ))),
            None => {
                test();
                Ok(())
            }
        })
        .with_ignored_flag(unavailable.is_some() && !required)
    });
    let plain_trials = plain.iter().map(|&(name, test)| {
        Trial::test(name, move || {
            test();
            Ok(())
        })
    });
    libtest_mimic::run(&args, lab_trials.chain(plain_trials).collect()).exit()
}
