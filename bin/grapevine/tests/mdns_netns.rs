//! mDNS discovery with real `grapevine start --discovery mdns` processes, each in its own network
//! namespace, on private bridges: no member has a static list.
//!
//! **Needs** root, `ip` (iproute2) and `nft` (nftables), like `chaos_netns.rs`; without them each
//! namespace test is reported ignored with the reason (its own harness, like `chaos_netns.rs`),
//! or fails when `CHAOS_NETNS_REQUIRED=1`. The records
//! are checked with python-zeroconf (Debian's `python3-zeroconf`, installed by `.ci/run`), an mDNS
//! implementation independent of grapevine's; without it a test fails saying how to install it,
//! unless `GRAPEVINE_ALLOW_SKIP=1` (then it prints `SKIPPED: ...` for that check).
//!
//! **The lab** (`gm<pid><t>`): member namespaces on up to two bridges, LAN A (`br0`,
//! 10.217.<o>.<16s>/28) and LAN B (`br1`, 10.218.<o>.<16s>/28), which live in a namespace of their
//! own; the host reaches each bridge through a veth (`.16s+14`) to read the members' admin
//! endpoints. **Multicast stays in the lab**: an nftables `bridge` table in the switch namespace
//! drops every mDNS frame (to 01:00:5e:00:00:fb and 33:33:00:00:00:fb) from and to the host's ports,
//! so the host neither sees the members' announcements nor answers them, and the namespaces have
//! no default route. Members start with short timers (100 ms gossip); the mDNS query interval
//! stays at its default (10 s), since the tests check that the defaults form one cluster in time,
//! except in the group-merge scenarios (`groups_of_*`, [`GROUP_ENV`]), which check what the merge
//! does with the groups' data and use a 1 s query interval and 1 s merge timers to stay short.
//! Within this binary the labs run one at a time.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

mod netns;
use netns::{drop_table, ip, next_millisecond, nft, quiet};

const BIN: &str = env!("CARGO_BIN_EXE_grapevine");

/// The deadline of every condition, and what the issue allows members started at once to take to
/// form one cluster with the default mDNS settings.
const WAIT: Duration = Duration::from_secs(30);

const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

const MEMBER_ENV: &[(&str, &str)] = &[
    ("GRAPEVINE_GOSSIP__INTERVAL_MS", "100"),
    ("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "1000"),
    ("GRAPEVINE_GOSSIP__PROBE_INTERVAL_MS", "200"),
    ("GRAPEVINE_PARTITIONS__ANTI_ENTROPY_INTERVAL_MS", "500"),
    ("GRAPEVINE_PORT_AUTO_INCREMENT", "false"),
];

const PORT: u16 = 5701;
const ADMIN_PORT: u16 = 5801;
const NFT_TABLE: &str = "gvmdnscut";
/// The table of [`Lab::drop_from`].
const DROP_TABLE: &str = "gvmdnsdrop";

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The namespace scenarios, by name.
const SCENARIOS: &[(&str, fn())] = &[
    (
        "three_members_form_one_cluster_and_another_cluster_stays_out",
        three_members_form_one_cluster_and_another_cluster_stays_out,
    ),
    ("members_started_at_once_become_one_cluster", members_started_at_once_become_one_cluster),
    (
        "groups_formed_apart_find_each_other_and_become_one_cluster",
        groups_formed_apart_find_each_other_and_become_one_cluster,
    ),
    (
        "a_member_with_two_interfaces_announces_only_on_the_configured_one",
        a_member_with_two_interfaces_announces_only_on_the_configured_one,
    ),
    (
        "groups_of_one_one_and_one_merge_into_one_cluster_with_their_data",
        groups_of_one_one_and_one_merge_into_one_cluster_with_their_data,
    ),
    (
        "groups_of_two_and_one_merge_into_one_cluster_with_their_data",
        groups_of_two_and_one_merge_into_one_cluster_with_their_data,
    ),
    (
        "groups_of_three_and_two_merge_into_one_cluster_with_their_data",
        groups_of_three_and_two_merge_into_one_cluster_with_their_data,
    ),
];

/// Runs the tests; the namespace ones are reported ignored, with the reason, when this host
/// cannot build labs (failures instead when `CHAOS_NETNS_REQUIRED` is set).
fn main() {
    let plain: &[(&str, fn())] = &[(
        "conflicting_or_unknown_discovery_settings_are_start_up_errors",
        conflicting_or_unknown_discovery_settings_are_start_up_errors,
    )];
    netns::run_tests("mdns_netns", "gmprobe", SCENARIOS, plain);
}

// ------------------------------------------------------------------------------------------------
// The scenarios
// ------------------------------------------------------------------------------------------------

/// Three members with no static list find each other and form one cluster; a fourth of another
/// cluster name on the same network stays out (and both sides log why); python-zeroconf reads each
/// member's record and finds what the member reports about itself; a member that stops gracefully
/// says goodbye and disappears from its peers' candidates and from the network.
fn three_members_form_one_cluster_and_another_cluster_stays_out() {
    let mut lab = Lab::create("form", 'a', 0);
    let cluster = lab.cluster.clone();
    for node in ["n1", "n2", "n3"] {
        lab.add_member(node, &cluster, &[Lan::A], &[]);
    }
    lab.add_member("x1", &format!("{cluster}-other"), &[Lan::A], &[]);
    lab.build();

    for i in 0..3 {
        lab.start(i);
        let nodes: Vec<usize> = (0..=i).collect();
        lab.wait_view(&nodes, &lab.ids(&nodes));
    }
    lab.wait_healthy(&[0, 1, 2]);
    lab.start(3);
    lab.wait_healthy(&[3]);
    // Both sides saw the other's record and say why they ignore it.
    lab.wait_log(0, "ignoring member x1");
    lab.wait_log(3, "ignoring member n1");
    assert!(lab.log(0).contains("belongs to cluster"), "the line names the other cluster");
    lab.assert_view(&[0, 1, 2], &["n1", "n2", "n3"]);
    lab.assert_view(&[3], &["x1"]);

    // The records, as an independent implementation reads them, from inside n1's namespace.
    if let Some(records) = lab.browse(0, Duration::from_secs(2)) {
        for i in 0..4 {
            let record = find_record(&records, lab.node_id(i))
                .unwrap_or_else(|| panic!("python-zeroconf found no record of {}: {records:#?}", lab.node_id(i)));
            lab.check_record(i, record);
        }
        eprintln!("mdns test form: python-zeroconf read {} records matching what each member reports", records.len());
    }

    // A graceful stop: peers drop it from discovery (the goodbye) and from the view.
    lab.stop(2);
    lab.wait_log(0, "member n3 is gone from mDNS");
    lab.wait_view(&[0, 1], &["n1", "n2"]);
    if let Some(records) = lab.browse(0, Duration::from_secs(2)) {
        assert!(find_record(&records, "n3").is_none(), "n3 said goodbye, yet: {records:#?}");
        assert!(find_record(&records, "n1").is_some(), "{records:#?}");
    }
    lab.assert_running(&[0, 1, 3]);
}

/// Members started at the same moment with mDNS, each of them alone at first (1+1+1), end as one
/// cluster with one master and one settled table, with the default discovery settings. Several
/// rounds, since it is a race.
fn members_started_at_once_become_one_cluster() {
    for round in 0..3 {
        let mut lab = Lab::create("atonce", 'b', 1);
        let cluster = lab.cluster.clone();
        for node in ["n1", "n2", "n3"] {
            lab.add_member(node, &cluster, &[Lan::A], &[]);
        }
        lab.build();
        let started = Instant::now();
        for i in 0..3 {
            lab.start(i);
        }
        lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]);
        lab.wait_healthy(&[0, 1, 2]);
        lab.wait_table_settled(&[0, 1, 2]);
        eprintln!("mdns test atonce: round {round}: one cluster after {:?}", started.elapsed());
        lab.assert_running(&[0, 1, 2]);
    }
}

/// Groups that formed apart (2+1: n3 could not hear n1 and n2, nor they it, while all started)
/// find each other through discovery once the network lets them, and become one cluster within
/// the deadline: discovery keeps querying, so the groups do not have to wait for a restart.
fn groups_formed_apart_find_each_other_and_become_one_cluster() {
    let mut lab = Lab::create("groups", 'c', 2);
    let cluster = lab.cluster.clone();
    for node in ["n1", "n2", "n3"] {
        lab.add_member(node, &cluster, &[Lan::A], &[]);
    }
    lab.build();
    lab.cut(2, &[0, 1]);
    lab.start(0);
    lab.start(1);
    lab.start(2);
    lab.wait_view(&[0, 1], &["n1", "n2"]);
    lab.wait_view(&[2], &["n3"]);
    lab.wait_healthy(&[0, 1, 2]);

    lab.heal(2);
    let healed = Instant::now();
    lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]);
    lab.wait_healthy(&[0, 1, 2]);
    lab.wait_table_settled(&[0, 1, 2]);
    eprintln!("mdns test groups: one cluster {:?} after the heal", healed.elapsed());
    // n1 finds n3's record at its next query (n3 may have found n1 first and gossiped).
    lab.wait_log(0, "found member n3");
    lab.assert_running(&[0, 1, 2]);
}

/// A member with two interfaces, configured with `mdns_interfaces = eth1` and no `bind`,
/// advertises eth1's address, joins the member on LAN B, and is invisible on LAN A: the member
/// there stays alone, and python-zeroconf on LAN A sees that member's record but not its own.
/// Without the setting the member refuses to start, naming both interfaces.
fn a_member_with_two_interfaces_announces_only_on_the_configured_one() {
    let mut lab = Lab::create("twoif", 'd', 3);
    let cluster = lab.cluster.clone();
    lab.add_member("d1", &cluster, &[Lan::A, Lan::B], &[("GRAPEVINE_MDNS_INTERFACES", "eth1")]);
    lab.add_member("b1", &cluster, &[Lan::B], &[]);
    lab.add_member("a1", &cluster, &[Lan::A], &[]);
    lab.build();

    // Two interfaces, neither chosen: a start-up error that says what to set.
    let out = lab.run_member(0, &[("GRAPEVINE_MDNS_INTERFACES", "")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let (a, b) = (&lab.members[0].ips[0], &lab.members[0].ips[1]);
    assert!(
        stderr.contains("`bind`") && stderr.contains(&format!("eth0 {a}")) && stderr.contains(&format!("eth1 {b}")),
        "{stderr}"
    );

    lab.start(0);
    lab.wait_log(0, "interfaces=eth1");
    lab.start(1);
    lab.wait_view(&[0, 1], &["b1", "d1"]);
    lab.start(2);
    lab.wait_healthy(&[2]);
    let stats = lab.stats(0).expect("d1's stats");
    assert_eq!(stats["local"]["config"]["public_address"], Value::from(b.as_str()), "d1 advertises eth1's address");
    assert_eq!(stats["local"]["config"]["discovery"], "mdns");

    match (lab.browse(2, Duration::from_secs(3)), lab.browse(1, Duration::from_secs(2))) {
        (Some(on_a), Some(on_b)) => {
            assert!(find_record(&on_a, "a1").is_some(), "the browser on LAN A works: {on_a:#?}");
            assert!(find_record(&on_a, "d1").is_none(), "d1 must not announce on LAN A: {on_a:#?}");
            let record = find_record(&on_b, "d1").unwrap_or_else(|| panic!("d1 announces on LAN B: {on_b:#?}"));
            lab.check_record(0, record);
        }
        _ => eprintln!("mdns test twoif: records not checked (see SKIPPED above)"),
    }
    // By now a1 has announced and queried for a while: d1 never saw it, so a1 is alone.
    lab.assert_view(&[2], &["a1"]);
    lab.assert_view(&[0, 1], &["b1", "d1"]);
    assert!(!lab.log(0).contains("found member a1"), "d1 does not listen on LAN A");
    lab.assert_running(&[0, 1, 2]);
}

/// The members' settings of the group scenarios, on top of [`MEMBER_ENV`]: short merge timers
/// (merged 1 s after the other group is seen, at the earliest 1 s after start), a query every
/// second, so that groups find each other soon after the heal, and a more patient failure
/// detector.
const GROUP_ENV: &[(&str, &str)] = &[
    ("GRAPEVINE_MDNS_QUERY_INTERVAL_MS", "1000"),
    // Nothing here needs a member declared dead: a silent member is declared so after about 3 s
    // instead of 0.9 s, so that five debug-build members starved of CPU on a busy machine do not
    // declare each other dead (and shatter the cluster they just formed) although nothing is cut.
    ("GRAPEVINE_GOSSIP__PHI_THRESHOLD", "30"),
    ("GRAPEVINE_MERGE_FIRST_RUN_DELAY_SECONDS", "1"),
    ("GRAPEVINE_MERGE_RUN_DELAY_SECONDS", "1"),
];

/// The map the group scenarios write (default policy: `latest-update`).
const GROUP_MAP: &str = "groups";

/// Three members formed three clusters by mDNS while cut apart (1+1+1), then the cut is removed.
fn groups_of_one_one_and_one_merge_into_one_cluster_with_their_data() {
    groups_formed_apart_merge_with_their_data("merge111", 'e', 4, &[1, 1, 1]);
}

/// Two members and one (2+1), formed apart by mDNS, then the cut is removed.
fn groups_of_two_and_one_merge_into_one_cluster_with_their_data() {
    groups_formed_apart_merge_with_their_data("merge21", 'f', 5, &[2, 1]);
}

/// Three members and two (3+2), formed apart by mDNS, then the cut is removed.
fn groups_of_three_and_two_merge_into_one_cluster_with_their_data() {
    groups_formed_apart_merge_with_their_data("merge32", 'g', 6, &[3, 2]);
}

/// Groups of `sizes` members start by mDNS at the same moment while nftables drops everything
/// each member receives from the members of the other groups (multicast included), so each group
/// forms a cluster of its own, with its own master and table. Each group writes keys of its own,
/// and every group writes one shared key, one group after the other. When the cut is removed,
/// discovery's next query brings the groups together and the merge timers merge them: one
/// cluster, one master, one settled table, and through every member every group's keys read
/// back, the shared key holds the last group's write (`latest-update`), and the members counted
/// the merges.
fn groups_formed_apart_merge_with_their_data(test: &'static str, tag: char, slot: u8, sizes: &[usize]) {
    let mut lab = Lab::create(test, tag, slot);
    let cluster = lab.cluster.clone();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (g, size) in sizes.iter().enumerate() {
        let mut group = Vec::new();
        for k in 0..*size {
            group.push(lab.members.len());
            let node = format!("{}{}", (b'a' + g as u8) as char, k + 1);
            lab.add_member(&node, &cluster, &[Lan::A], GROUP_ENV);
        }
        groups.push(group);
    }
    lab.build();
    let everyone: Vec<usize> = (0..lab.members.len()).collect();
    for group in &groups {
        let others: Vec<usize> = everyone.iter().copied().filter(|i| !group.contains(i)).collect();
        for &i in group {
            lab.drop_from(i, &others);
        }
    }
    for &i in &everyone {
        lab.start(i);
    }
    let mut masters = Vec::new();
    for group in &groups {
        masters.push(lab.wait_view(group, &lab.ids(group)));
        lab.wait_healthy(group);
        lab.wait_table_settled(group);
    }
    eprintln!("mdns test {test}: {} groups formed apart, masters {masters:?}", groups.len());

    // What each group writes while apart: its own keys, and the shared key, later group by group.
    let mut expected: Vec<(String, String)> = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for (k, key) in (0..6).map(|k| (k, format!("g{g}-k{k}"))) {
            let value = format!("g{g}-v{k}");
            lab.put_ok(group[k % group.len()], GROUP_MAP, &key, &value);
            expected.push((key, value));
        }
        next_millisecond();
        lab.put_ok(group[0], GROUP_MAP, "shared", &format!("g{g}"));
        next_millisecond();
    }
    expected.push(("shared".into(), format!("g{}", groups.len() - 1)));

    let healed = Instant::now();
    for &i in &everyone {
        lab.undrop(i);
    }
    let master = lab.wait_view(&everyone, &lab.ids(&everyone));
    let took = healed.elapsed();
    assert!(took >= Duration::from_secs(1), "merged {took:?} after the heal, before merge_run_delay_seconds (1)");
    assert!(masters.contains(&master), "the master {master} is one of the groups' masters {masters:?}");
    lab.wait_healthy(&everyone);
    lab.wait_table_settled(&everyone);
    eprintln!("mdns test {test}: one cluster {took:?} after the heal, settled after {:?}", healed.elapsed());

    wait_until("every group's writes to read back through every member", WAIT, || {
        let mut wrong = Vec::new();
        for &i in &everyone {
            for (key, value) in &expected {
                let url = lab.url(i, &format!("/maps/{GROUP_MAP}/entries/{key}"));
                match get(&lab.admin, &url) {
                    Ok((200, body)) if body == *value => {}
                    other => wrong.push(format!("{key} through {}: expected {value:?}, got {other:?}", lab.node_id(i))),
                }
            }
            let size = get(&lab.admin, &lab.url(i, &format!("/maps/{GROUP_MAP}/size")))
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .and_then(|v| v["size"].as_u64());
            if size != Some(expected.len() as u64) {
                wrong.push(format!("size through {}: {size:?}, expected {}", lab.node_id(i), expected.len()));
            }
        }
        if wrong.is_empty() { Ok(()) } else { Err(format!("{} wrong: {}", wrong.len(), wrong.join("; "))) }
    });
    // Each of the merges was admitted by the group rule on at least one member (the others may
    // meet the other group's members after they already follow their own master).
    let merged: Vec<u64> = everyone
        .iter()
        .map(|i| lab.stats(*i).expect("/stats")["gossip"]["groups_merged"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        merged.iter().sum::<u64>() >= groups.len() as u64 - 1,
        "{} groups merged, yet the members count {merged:?} merged groups",
        groups.len()
    );
    lab.assert_running(&everyone);
}

/// Configuring both mechanisms, or an interface that does not exist, stops the member at start
/// with exit status 2 and a message naming the key. (No namespace needed: nothing is sent.)
fn conflicting_or_unknown_discovery_settings_are_start_up_errors() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command.args(["start", "--cluster-name", "mdns-errors"]).args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied()).stdin(Stdio::null());
        let out = command.output().expect("grapevine runs");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, stderr) = run(&["--discovery", "mdns", "--members", "10.0.0.1"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`discovery`") && stderr.contains("mutually exclusive"), "{stderr}");

    let (code, stderr) = run(&["--discovery", "mdns"], &[("GRAPEVINE_MDNS_INTERFACES", "nosuch0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("`mdns_interfaces`") && stderr.contains("\"nosuch0\"") && stderr.contains("lo ("),
        "{stderr}"
    );
}

// ------------------------------------------------------------------------------------------------
// The lab
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lan {
    A,
    B,
}

struct Member {
    node_id: String,
    cluster: String,
    ns: String,
    lans: Vec<Lan>,
    /// One address per LAN, in the order of `lans` (interfaces eth0, eth1).
    ips: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
    child: RefCell<Option<Child>>,
    log: PathBuf,
}

struct Lab {
    test: &'static str,
    cluster: String,
    prefix: String,
    switch: String,
    octet: u32,
    slot: u8,
    members: Vec<Member>,
    log_dir: PathBuf,
    admin: ureq::Agent,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds the lab for test `test`; [`main`] checked that this host can.
    fn create(test: &'static str, tag: char, slot: u8) -> Lab {
        let pid = std::process::id();
        let prefix = format!("gm{pid}{tag}");
        let one_at_a_time = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("mdns-{pid}-{test}"));
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log directory");
        let lab = Lab {
            test,
            cluster: format!("mdns-{pid}-{test}"),
            switch: format!("{prefix}s"),
            prefix,
            octet: free_octet(pid, slot),
            slot,
            members: Vec::new(),
            log_dir,
            admin: agent(ADMIN_TIMEOUT),
            _one_at_a_time: one_at_a_time,
        };
        lab.remove_network();
        lab
    }

    fn subnet(&self, lan: Lan, host: u32) -> String {
        let second = match lan {
            Lan::A => 217,
            Lan::B => 218,
        };
        format!("10.{second}.{}.{}", self.octet, 16 * u32::from(self.slot) + host)
    }

    fn host_veth(&self, lan: Lan) -> String {
        format!("{}h{}", self.prefix, if lan == Lan::A { 0 } else { 1 })
    }

    fn add_member(&mut self, node_id: &str, cluster: &str, lans: &[Lan], env: &[(&'static str, &'static str)]) {
        let n = self.members.len() as u32 + 1;
        let ips = lans.iter().map(|lan| self.subnet(*lan, n)).collect();
        self.members.push(Member {
            node_id: node_id.to_string(),
            cluster: cluster.to_string(),
            ns: format!("{}n{n}", self.prefix),
            lans: lans.to_vec(),
            ips,
            env: env.to_vec(),
            child: RefCell::new(None),
            log: self.log_dir.join(format!("{node_id}.log")),
        });
    }

    /// Creates the switch with both bridges, the host's veths and the member namespaces.
    fn build(&self) {
        let sw = self.switch.as_str();
        ip(&["netns", "add", sw]);
        for (lan, bridge) in [(Lan::A, "br0"), (Lan::B, "br1")] {
            ip(&["-n", sw, "link", "add", bridge, "type", "bridge"]);
            ip(&["-n", sw, "link", "set", bridge, "up"]);
            let veth = self.host_veth(lan);
            assert!(veth.len() <= 15, "interface name {veth} is too long");
            let port = format!("host{}", &bridge[2..]);
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &port, "netns", sw]);
            ip(&["-n", sw, "link", "set", &port, "master", bridge, "up"]);
            ip(&["addr", "add", &format!("{}/28", self.subnet(lan, 14)), "dev", &veth]);
            ip(&["link", "set", &veth, "up"]);
        }
        // No mDNS frame crosses between the lab and the host, in either direction.
        nft(
            sw,
            "table bridge gvmdnsfence {\n  chain forward {\n    type filter hook forward priority filter; policy accept;\n    \
             oifname { \"host0\", \"host1\" } ether daddr { 01:00:5e:00:00:fb, 33:33:00:00:00:fb } drop\n    \
             iifname { \"host0\", \"host1\" } ether daddr { 01:00:5e:00:00:fb, 33:33:00:00:00:fb } drop\n  }\n}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (i, member) in self.members.iter().enumerate() {
            let ns = member.ns.as_str();
            ip(&["netns", "add", ns]);
            for (k, (lan, addr)) in member.lans.iter().zip(&member.ips).enumerate() {
                let port = format!("v{}{}", i + 1, k);
                let bridge = if *lan == Lan::A { "br0" } else { "br1" };
                let eth = format!("eth{k}");
                ip(&["-n", sw, "link", "add", &port, "type", "veth", "peer", "name", &eth, "netns", ns]);
                ip(&["-n", sw, "link", "set", &port, "master", bridge, "up"]);
                ip(&["-n", ns, "addr", "add", &format!("{addr}/28"), "dev", &eth]);
                ip(&["-n", ns, "link", "set", &eth, "up"]);
            }
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // A member started before its interfaces are up refuses to start (no interface to run
        // mDNS on): wait for the links, as a boot order would.
        for member in &self.members {
            for k in 0..member.lans.len() {
                let eth = format!("eth{k}");
                wait_until(&format!("{eth} of {} to be up", member.node_id), WAIT, || {
                    let out = Command::new("ip").args(["-n", &member.ns, "-o", "link", "show", "dev", &eth]).output();
                    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
                    if text.contains("state UP") { Ok(()) } else { Err(text) }
                });
            }
        }
        eprintln!(
            "mdns test {}: members {}",
            self.test,
            self.members
                .iter()
                .map(|m| format!("{}={}@{}", m.node_id, m.ips.join("+"), m.ns))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    fn command(&self, i: usize, extra_env: &[(&str, &str)]) -> Command {
        let member = &self.members[i];
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &member.ns, BIN, "start", "--discovery", "mdns"]);
        command.args(["--cluster-name", &member.cluster, "--node-id", &member.node_id]);
        command.args(["--port", &PORT.to_string(), "--admin-port", &ADMIN_PORT.to_string()]);
        for (key, _) in std::env::vars() {
            if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.envs(MEMBER_ENV.iter().copied()).envs(member.env.iter().copied()).envs(extra_env.iter().copied());
        command.stdin(Stdio::null());
        command
    }

    fn start(&self, i: usize) {
        let member = &self.members[i];
        let log = File::create(&member.log).expect("log file");
        let child = self.command(i, &[]).stdout(Stdio::null()).stderr(log).spawn().expect("grapevine starts");
        *member.child.borrow_mut() = Some(child);
    }

    /// Runs member `i` to completion (for start-up errors), with extra environment.
    fn run_member(&self, i: usize, env: &[(&str, &str)]) -> std::process::Output {
        self.command(i, env).output().expect("grapevine runs")
    }

    /// SIGTERM (graceful leave) and wait for the exit.
    fn stop(&self, i: usize) {
        let member = &self.members[i];
        let mut child = member.child.borrow_mut().take().expect("running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(status.success(), "{} exited with {status} after SIGTERM", member.node_id);
                break;
            }
            assert!(Instant::now() < deadline, "{} did not stop within {WAIT:?}", member.node_id);
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("mdns test {}: stopped {} gracefully", self.test, member.node_id);
    }

    /// Drops all traffic of member `i` with `peers`, multicast included, in both directions.
    fn cut(&self, i: usize, peers: &[usize]) {
        let addresses = peers.iter().flat_map(|p| self.members[*p].ips.clone()).collect::<Vec<_>>().join(", ");
        let mut script = format!("table inet {NFT_TABLE} {{\n");
        let _ = writeln!(
            script,
            "  chain input {{ type filter hook input priority filter; policy accept; ip saddr {{ {addresses} }} drop; }}"
        );
        let _ = writeln!(
            script,
            "  chain output {{ type filter hook output priority filter; policy accept; ip daddr {{ {addresses}, 224.0.0.251 }} drop; }}"
        );
        script.push_str("}\n");
        nft(&self.members[i].ns, &script).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("mdns test {}: cut {} off from {addresses}", self.test, self.node_id(i));
    }

    /// Drops everything member `i` receives from `peers` (their multicast too: it comes from
    /// their addresses), with a table of its own. Applied on both sides, it cuts the two apart.
    fn drop_from(&self, i: usize, peers: &[usize]) {
        let addresses = peers.iter().flat_map(|p| self.members[*p].ips.clone()).collect::<Vec<_>>().join(", ");
        nft(&self.members[i].ns, &drop_table(DROP_TABLE, &addresses, true, false, None))
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("mdns test {}: {} drops what {addresses} send", self.test, self.node_id(i));
    }

    /// Removes [`Lab::drop_from`]'s table of member `i`.
    fn undrop(&self, i: usize) {
        ip(&["netns", "exec", &self.members[i].ns, "nft", "delete", "table", "inet", DROP_TABLE]);
    }

    /// Puts `key` = `value` into `map` through member `i`'s admin endpoint; it must be acknowledged.
    fn put_ok(&self, i: usize, map: &str, key: &str, value: &str) {
        let url = self.url(i, &format!("/maps/{map}/entries/{key}"));
        let reply = self.admin.put(&url).send(value).map_err(|e| e.to_string()).and_then(|mut r| {
            let status = r.status().as_u16();
            Ok((status, r.body_mut().read_to_string().map_err(|e| e.to_string())?))
        });
        assert!(matches!(&reply, Ok((200, _))), "PUT {map}/{key} through {}: {reply:?}", self.node_id(i));
    }

    fn heal(&self, i: usize) {
        ip(&["netns", "exec", &self.members[i].ns, "nft", "delete", "table", "inet", NFT_TABLE]);
        eprintln!("mdns test {}: healed {}", self.test, self.node_id(i));
    }

    fn node_id(&self, i: usize) -> &str {
        &self.members[i].node_id
    }

    fn ids(&self, nodes: &[usize]) -> Vec<&str> {
        nodes.iter().map(|i| self.node_id(*i)).collect()
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    fn wait_log(&self, i: usize, needle: &str) {
        wait_until(&format!("{}'s log to contain {needle:?}", self.node_id(i)), WAIT, || {
            self.running(i)?;
            if self.log(i).contains(needle) { Ok(()) } else { Err("not yet".into()) }
        });
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}:{ADMIN_PORT}{path}", self.members[i].ips[0])
    }

    fn running(&self, i: usize) -> Result<(), String> {
        let member = &self.members[i];
        let mut child = member.child.borrow_mut();
        let Some(child) = child.as_mut() else { return Ok(()) };
        match child.try_wait().expect("try_wait") {
            None => Ok(()),
            Some(status) => Err(format!("{} exited with {status}", member.node_id)),
        }
    }

    fn assert_running(&self, nodes: &[usize]) {
        for &i in nodes {
            if let Err(e) = self.running(i) {
                panic!("{e}");
            }
        }
    }

    fn stats(&self, i: usize) -> Result<Value, String> {
        let (status, body) = get(&self.admin, &self.url(i, "/stats"))?;
        if status != 200 {
            return Err(format!("{}: /stats answered {status}: {body}", self.node_id(i)));
        }
        serde_json::from_str(&body).map_err(|e| format!("{}: /stats is not JSON ({e})", self.node_id(i)))
    }

    /// Member `i`'s master and sorted member ids, if every member it sees is active.
    fn view(&self, i: usize) -> Result<(String, Vec<String>), String> {
        let stats = self.stats(i)?;
        let who = self.node_id(i);
        let members = stats["members"].as_array().ok_or_else(|| format!("{who}: no members"))?;
        let mut ids = Vec::new();
        for m in members {
            let id = m["node_id"].as_str().unwrap_or("?").to_string();
            if m["state"] != "active" {
                return Err(format!("{who} sees {id} in state {}", m["state"]));
            }
            ids.push(id);
        }
        ids.sort();
        let master = stats["master"].as_str().ok_or_else(|| format!("{who} sees no master ({ids:?})"))?;
        Ok((master.to_string(), ids))
    }

    fn check_view(&self, nodes: &[usize], expected: &[&str]) -> Result<String, String> {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        for &i in nodes {
            self.running(i)?;
        }
        let mut master: Option<String> = None;
        for &i in nodes {
            let (m, ids) = self.view(i)?;
            if ids != expected {
                return Err(format!("{} sees {ids:?} (master {m})", self.node_id(i)));
            }
            match &master {
                Some(first) if *first != m => return Err(format!("masters differ: {first} and {m}")),
                _ => master = Some(m),
            }
        }
        Ok(master.unwrap_or_default())
    }

    /// Waits until each of `nodes` sees exactly `expected`, all active, with one master.
    fn wait_view(&self, nodes: &[usize], expected: &[&str]) -> String {
        let started = Instant::now();
        let what = format!("{:?} to see exactly {expected:?} with one master", self.ids(nodes));
        let master = wait_until(&what, WAIT, || self.check_view(nodes, expected));
        eprintln!("mdns test {}: {what}: master {master}, after {:?}", self.test, started.elapsed());
        master
    }

    fn assert_view(&self, nodes: &[usize], expected: &[&str]) {
        if let Err(e) = self.check_view(nodes, expected) {
            panic!("expected {:?} to see exactly {expected:?}: {e}", self.ids(nodes));
        }
    }

    fn wait_healthy(&self, nodes: &[usize]) {
        wait_until(&format!("/health 200 on {:?}", self.ids(nodes)), WAIT, || {
            for &i in nodes {
                self.running(i)?;
                let (status, body) = get(&self.admin, &self.url(i, "/health"))?;
                if status != 200 {
                    return Err(format!("{}: /health {status} {body}", self.node_id(i)));
                }
            }
            Ok(())
        });
    }

    fn wait_table_settled(&self, nodes: &[usize]) {
        wait_until(&format!("{:?} to hold one settled partition table", self.ids(nodes)), WAIT, || {
            let mut tables = Vec::new();
            for &i in nodes {
                self.running(i)?;
                let p = self.stats(i)?["partitions"].clone();
                if p["migrating"].as_u64() != Some(0) {
                    return Err(format!("{}: migrating {}", self.node_id(i), p["migrating"]));
                }
                tables.push((p["epoch"].clone(), p["owned_by_member"].clone(), p["backups_by_member"].clone()));
            }
            if tables.windows(2).any(|w| w[0] != w[1]) {
                return Err(format!("tables differ: {tables:?}"));
            }
            Ok(())
        });
    }

    /// Browses with python-zeroconf for `seconds` inside member `i`'s namespace, on its first
    /// interface: the records found, or `None` (after printing SKIPPED) when python-zeroconf is
    /// missing and skipping is allowed.
    fn browse(&self, i: usize, seconds: Duration) -> Option<Vec<Value>> {
        let python = python_with_zeroconf()?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mdns_browse.py");
        let member = &self.members[i];
        let out = Command::new("ip")
            .args(["netns", "exec", &member.ns, &python])
            .arg(&script)
            .arg(format!("{}", seconds.as_secs_f64()))
            .arg(&member.ips[0])
            .stdin(Stdio::null())
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "mdns_browse.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("mdns_browse.py printed {l:?}: {e}")))
            .collect();
        Some(records)
    }

    /// Checks that `record` (as python-zeroconf read it) says what member `i` reports about
    /// itself in `/stats`: cluster, node id, generation, gossip and data addresses, protocol
    /// version; and that its SRV port is the gossip port and its A record the advertised address.
    fn check_record(&self, i: usize, record: &Value) {
        let stats = self.stats(i).expect("stats");
        let me = stats["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["node_id"] == self.node_id(i)))
            .unwrap_or_else(|| panic!("{} is not in its own /stats", self.node_id(i)))
            .clone();
        let txt = &record["txt"];
        let who = self.node_id(i);
        assert_eq!(record["resolved"], true, "{who}: {record}");
        assert_eq!(txt["cluster"], Value::from(self.members[i].cluster.as_str()), "{who}: {record}");
        assert_eq!(txt["node"], me["node_id"], "{who}: {record}");
        assert_eq!(txt["gen"], Value::from(me["generation"].as_u64().unwrap().to_string()), "{who}: {record}");
        assert_eq!(txt["gossip"], me["gossip_addr"], "{who}: {record}");
        assert_eq!(txt["data"], me["data_addr"], "{who}: {record}");
        assert_eq!(txt["pv"], me["protocol_version"], "{who}: {record}");
        assert_eq!(record["port"], Value::from(PORT), "{who}: {record}");
        let gossip_ip = me["gossip_addr"].as_str().unwrap().rsplit_once(':').unwrap().0.to_string();
        assert_eq!(record["addresses"], Value::from(vec![gossip_ip]), "{who}: A records: {record}");
    }

    fn remove_network(&self) {
        for n in 1..=8 {
            quiet("ip", &["netns", "del", &format!("{}n{n}", self.prefix)]);
        }
        quiet("ip", &["netns", "del", &self.switch]);
        quiet("ip", &["link", "del", &self.host_veth(Lan::A)]);
        quiet("ip", &["link", "del", &self.host_veth(Lan::B)]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for member in &self.members {
            if let Some(mut child) = member.child.borrow_mut().take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.remove_network();
        if std::thread::panicking() {
            for member in &self.members {
                let log = std::fs::read_to_string(&member.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(200)..];
                eprintln!(
                    "----- mdns test {}: last {} lines of {} ({}) -----\n{}",
                    self.test,
                    tail.len(),
                    member.node_id,
                    member.ips.join("+"),
                    tail.join("\n")
                );
            }
            eprintln!("----- mdns test {}: logs kept in {} -----", self.test, self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

fn find_record<'a>(records: &'a [Value], node: &str) -> Option<&'a Value> {
    records.iter().find(|r| r["txt"]["node"] == node)
}

/// A python3 that can import zeroconf; `None` (after printing SKIPPED) when there is none and
/// `GRAPEVINE_ALLOW_SKIP=1` without `GRAPEVINE_REQUIRE_TOOLS=1`; otherwise a failure saying how to
/// install it.
fn python_with_zeroconf() -> Option<String> {
    for python in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(python)
            .args(["-c", "import zeroconf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(python.to_string());
        }
    }
    let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
    let why = "python-zeroconf is not installed (apt-get install -y python3-zeroconf)";
    if flag("GRAPEVINE_ALLOW_SKIP") && !flag("GRAPEVINE_REQUIRE_TOOLS") {
        eprintln!("SKIPPED: checking mDNS records with an independent implementation: {why}");
        return None;
    }
    panic!("{why}; set GRAPEVINE_ALLOW_SKIP=1 to skip this check");
}

/// The third octet of the lab's /28s: the first from `pid % 250` on that no route of the host uses
/// for `slot` on either LAN.
fn free_octet(pid: u32, slot: u8) -> u32 {
    let out = Command::new("ip").args(["-4", "route", "show"]).output().expect("ip route");
    let routes = String::from_utf8_lossy(&out.stdout);
    let base = 16 * u32::from(slot);
    (0..250)
        .map(|k| (pid + k) % 250)
        .find(|o| {
            !routes.contains(&format!("10.217.{o}.{base}/28")) && !routes.contains(&format!("10.218.{o}.{base}/28"))
        })
        .expect("a free /28 in 10.217.0.0/16 and 10.218.0.0/16")
}

fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .build();
    ureq::Agent::new_with_config(config)
}

fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    let mut response = agent.get(url).call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().map_err(|e| format!("GET {url}: {e}"))?;
    Ok((status, text))
}

fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
