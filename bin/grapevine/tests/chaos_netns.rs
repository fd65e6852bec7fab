//! Chaos tests: real `grapevine start` processes, each in its own network namespace on a private
//! bridge, that lose members to SIGKILL and links to nftables rules.
//!
//! **Needs** root, `ip` (iproute2, with `ip netns`) and `nft` (nftables). The file has its own
//! harness (`harness = false`, [`libtest_mimic`]) so that this is decided when the tests are listed:
//! without them every test is reported `ignored` in the summary (by `cargo test` and nextest
//! alike), and the reason is printed once before the tests run. `CHAOS_NETNS_REQUIRED=1` (set by
//! `.ci/run`, which runs as root) makes each of them fail with that reason instead; `--ignored`
//! runs them anyway, and then they fail with it too.
//!
//! **Isolation.** Each test builds its own lab, named after the process id and the test's letter
//! (`gv<pid><t>`): member namespaces `gv<pid><t>n1..n3`, each with an `eth0` on a bridge that lives
//! in a namespace of its own, `gv<pid><t>s` (so no firewall of the host sees traffic between
//! members), and a veth `gv<pid><t>h` from the host to that bridge. The lab uses the /28
//! `10.213.<o>.<16s>`, where `o` starts at `pid % 250` (the next free one is taken if another lab
//! routes it) and `s` is the test's slot; the host's veth holds `.16s+14`, so the test process
//! reaches each member's admin endpoint (`<ip>:5801`) directly. The namespaces have no default
//! route: no traffic leaves the lab. Leftovers of the same names are removed before a lab is built;
//! the [`Lab`] guard kills the members and removes everything when dropped, also on panic, and then
//! prints the tail of every member's log (kept under `CARGO_TARGET_TMPDIR`).
//! Within this binary the labs run one at a time (see [`ONE_LAB_AT_A_TIME`]).
//!
//! **Faults.** A process is lost with SIGKILL. A link is cut with an `inet` table in the member's
//! namespace whose input and/or output chains drop everything from/to the peers' addresses (the
//! host's address stays reachable, so the test can still ask the cut-off member what it sees); it
//! is healed by deleting the table. Conditions are polled with a deadline, never slept for.
//!
//! **Start order.** Members are started one after the other, so that n1 is the oldest member and
//! thus the master, and the scenarios can choose whether the master is hit. Starting them at the
//! same moment is a scenario of its own.
//!
//! A grapevine bug a scenario finds is fixed before the scenario lands; none is ignored.

use std::cell::RefCell;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

mod netns;
use netns::{build_bridge_lab, drop_table, free_octet, ip, next_millisecond, nft, remove_bridge_lab};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_grapevine");

/// The deadline of every condition. Generous: shared CI machines are slow.
const WAIT: Duration = Duration::from_secs(30);

/// The HTTP timeout of data operations: longer than the members' operation timeout (15 s), so a
/// slow operation answers with grapevine's own error rather than a client timeout.
const DATA_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP timeout of `/stats` and `/health`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Short timers: a join takes about a second, and so does declaring a cut-off member dead.
const MEMBER_ENV: &[(&str, &str)] = &[
    ("GRAPEVINE_GOSSIP__INTERVAL_MS", "100"),
    ("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "1000"),
    ("GRAPEVINE_GOSSIP__PROBE_INTERVAL_MS", "200"),
    ("GRAPEVINE_PARTITIONS__ANTI_ENTROPY_INTERVAL_MS", "500"),
    ("GRAPEVINE_PARTITIONS__OPERATION_TIMEOUT_MS", "15000"),
    // Sides of a healed cut merge one second after they see each other again.
    ("GRAPEVINE_MERGE_FIRST_RUN_DELAY_SECONDS", "0"),
    ("GRAPEVINE_MERGE_RUN_DELAY_SECONDS", "1"),
    // Each member has its namespace to itself: 5701/5801 must be free, and if they are not the
    // member should fail loudly rather than move to another port.
    ("GRAPEVINE_PORT_AUTO_INCREMENT", "false"),
];

/// `merge_run_delay_seconds` of [`MEMBER_ENV`]: how long another group must stay visible before
/// it is merged (and how long a member must have been gone for its return to count as one).
const MERGE_RUN_DELAY: Duration = Duration::from_secs(1);

/// The data and gossip port, and the admin port, of every member.
const PORT: u16 = 5701;
const ADMIN_PORT: u16 = 5801;
const RESP_PORT: u16 = 6701;

/// The map the tests write to.
const MAP: &str = "chaos";

/// The nftables table that cuts a member off.
const NFT_TABLE: &str = "gvchaos";

/// Members per lab.
const MEMBERS: usize = 3;

/// Held by each lab while it exists: one lab at a time. With 100 ms gossip, failure detection
/// takes about a second, so a member starved of CPU for about as long is declared dead although
/// nothing was cut; several labs of three debug-build members at once on a small CI machine
/// caused exactly that.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Every scenario, by name.
const SCENARIOS: &[(&str, fn())] = &[
    (
        "a_node_cut_off_by_the_network_is_declared_dead_and_rejoins_when_healed",
        a_node_cut_off_by_the_network_is_declared_dead_and_rejoins_when_healed,
    ),
    (
        "sigkill_of_the_master_moves_the_master_and_keeps_the_data",
        sigkill_of_the_master_moves_the_master_and_keeps_the_data,
    ),
    ("the_majority_keeps_its_data_across_a_healed_partition", the_majority_keeps_its_data_across_a_healed_partition),
    (
        "the_majority_keeps_its_data_when_the_master_is_the_one_cut_off",
        the_majority_keeps_its_data_when_the_master_is_the_one_cut_off,
    ),
    (
        "a_member_that_stops_sending_is_declared_dead_and_rejoins_when_healed",
        a_member_that_stops_sending_is_declared_dead_and_rejoins_when_healed,
    ),
    (
        "changes_acknowledged_while_the_master_cannot_send_survive_the_heal",
        changes_acknowledged_while_the_master_cannot_send_survive_the_heal,
    ),
    (
        "changes_acknowledged_while_a_member_cannot_send_survive_the_heal",
        changes_acknowledged_while_a_member_cannot_send_survive_the_heal,
    ),
    ("a_member_that_stops_receiving_rejoins_when_healed", a_member_that_stops_receiving_rejoins_when_healed),
    ("members_started_at_once_agree_on_one_partition_table", members_started_at_once_agree_on_one_partition_table),
    (
        "a_host_name_that_starts_resolving_to_a_member_is_joined_through_the_default_advertised_address",
        a_host_name_that_starts_resolving_to_a_member_is_joined_through_the_default_advertised_address,
    ),
    (
        "a_two_way_split_heals_into_one_cluster_and_each_maps_policy_resolves_the_conflicts",
        a_two_way_split_heals_into_one_cluster_and_each_maps_policy_resolves_the_conflicts,
    ),
    (
        "a_member_cut_off_alone_refuses_a_protected_map_and_the_majority_loses_nothing",
        a_member_cut_off_alone_refuses_a_protected_map_and_the_majority_loses_nothing,
    ),
];

/// Runs the scenarios, or reports them ignored with the reason when this host cannot build labs.
fn main() {
    netns::run_tests("chaos_netns", "gvprobe", SCENARIOS, &[]);
}

// ------------------------------------------------------------------------------------------------
// The scenarios
// ------------------------------------------------------------------------------------------------

/// A member cut off by the network (both directions) is declared dead by the other two, sees
/// itself alone, and rejoins when the link is healed, under the same master.
fn a_node_cut_off_by_the_network_is_declared_dead_and_rejoins_when_healed() {
    let lab = Lab::create("cut", 'a', 0);
    let master = lab.start_all();

    lab.cut(2, &[0, 1], Cut::Both);
    assert_eq!(lab.wait_view(&[0, 1], &["n1", "n2"]), master, "the master was not cut off: it stays the master");
    assert_eq!(lab.wait_view(&[2], &["n3"]), "n3", "alone, n3 is its own master");
    lab.assert_all_running();

    lab.heal(2);
    assert_eq!(lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]), master, "the oldest member is the master");
    lab.wait_healthy(&[0, 1, 2]);
    lab.wait_table_settled(&[0, 1, 2]);
    lab.assert_all_running();
}

/// SIGKILL of the master while a writer is in full flow through another member: the survivors
/// agree on a new master; every write acknowledged before, during or after the kill reads back
/// through each of them (a write that failed during the fail-over may or may not be there); new
/// writes succeed.
fn sigkill_of_the_master_moves_the_master_and_keeps_the_data() {
    let lab = Lab::create("kill", 'b', 1);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);

    let mut keys = lab.write_keys(&[1], 0..300, "before");
    lab.check_data(&[1], &keys, true);

    let killed = lab.index_of(&master);
    let survivors: Vec<usize> = (0..MEMBERS).filter(|i| *i != killed).collect();
    let expected: Vec<&str> = survivors.iter().map(|i| lab.node_id(*i)).collect();
    // The writer goes on through a survivor until enough writes were acknowledged after the new
    // view: some are in flight when the master dies.
    let base = lab.url(survivors[0], &format!("/maps/{MAP}/entries/"));
    let (agent, stop, acked) = (lab.data.clone(), AtomicBool::new(false), AtomicUsize::new(0));
    let (stop, acked) = (&stop, &acked);
    let (outcomes, new_master) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            let mut outcomes = Vec::new();
            for n in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (key, value) = (format!("inflight{n}"), format!("inflight-{n}"));
                let ok = matches!(request(&agent, "PUT", &format!("{base}{key}"), Some(&value)), Ok((200, _)));
                if ok {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                outcomes.push((key, value, ok));
            }
            outcomes
        });
        let at_least = |n: usize| move || if acked.load(Ordering::Relaxed) >= n { Ok(()) } else { Err(format!("{n}")) };
        wait_until("the writer to have 20 writes acknowledged", WAIT, at_least(20));
        lab.kill(killed);
        let new_master = lab.wait_view(&survivors, &expected);
        let after = acked.load(Ordering::Relaxed);
        wait_until("20 more writes acknowledged after the fail-over", WAIT, at_least(after + 20));
        stop.store(true, Ordering::Relaxed);
        (writer.join().expect("the writer thread"), new_master)
    });
    assert_ne!(new_master, master);
    let failed = outcomes.iter().filter(|(_, _, ok)| !ok).count();
    eprintln!("chaos test kill: {} writes in flow, {failed} failed during the fail-over", outcomes.len());

    lab.check_data(&survivors, &keys, false);
    keys.extend(outcomes.iter().filter(|(_, _, ok)| *ok).map(|(k, v, _)| (k.clone(), v.clone())));
    lab.check_data(&survivors, &keys, false);
    // A write that failed may or may not have been applied; it is there with its value or absent
    // (the same through every survivor).
    for (key, value, _) in outcomes.iter().filter(|(_, _, ok)| !ok) {
        let seen: Vec<(u16, String)> = survivors
            .iter()
            .map(|&i| request(&lab.data, "GET", &lab.url(i, &format!("/maps/{MAP}/entries/{key}")), None).unwrap())
            .collect();
        assert!(seen.iter().all(|s| *s == seen[0]), "{key} reads differently through the survivors: {seen:?}");
        match &seen[0] {
            (200, body) if body == value => keys.push((key.clone(), value.clone())),
            (404, _) => {}
            other => panic!("{key}: expected {value:?} or absent, got {other:?}"),
        }
    }
    lab.wait_healthy(&survivors);
    keys.extend(lab.write_keys(&survivors, 300..320, "after"));
    lab.check_data(&survivors, &keys, true);
    for &i in &survivors {
        lab.assert_running(i);
    }
}

/// A network partition cuts one member (not the master) off: the majority goes on serving reads
/// and writes; when the partition heals, the cluster re-forms and everything written before and
/// during the cut on the majority side reads back through every member, the healed one included.
/// (What the minority side writes meanwhile is merged through each map's policy:
/// [`a_two_way_split_heals_into_one_cluster_and_each_maps_policy_resolves_the_conflicts`].)
fn the_majority_keeps_its_data_across_a_healed_partition() {
    let lab = Lab::create("partition", 'c', 2);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..150, "before");

    lab.cut(2, &[0, 1], Cut::Both);
    assert_eq!(lab.wait_view(&[0, 1], &["n1", "n2"]), master);
    lab.wait_view(&[2], &["n3"]);
    majority_writes_and_heal(&lab, 2, &[0, 1], keys, &master);
}

/// The same partition, but the member cut off is the master (the oldest member): the majority
/// elects a new master and goes on; when the partition heals, the old master is the oldest
/// member again and leads, yet everything the majority holds must survive.
fn the_majority_keeps_its_data_when_the_master_is_the_one_cut_off() {
    let lab = Lab::create("mastercut", 'e', 4);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..150, "before");

    lab.cut(0, &[1, 2], Cut::Both);
    assert_ne!(lab.wait_view(&[1, 2], &["n2", "n3"]), master);
    lab.wait_view(&[0], &["n1"]);
    majority_writes_and_heal(&lab, 0, &[1, 2], keys, &master);
}

/// The rest of a partition scenario once both sides see the split: `keys` were written before
/// the cut of member `minority`; the `majority` writes more, then the cut heals and every key
/// must read back through every member, with the oldest member, `master`, leading again.
fn majority_writes_and_heal(
    lab: &Lab,
    minority: usize,
    majority: &[usize],
    mut keys: Vec<(String, String)>,
    master: &str,
) {
    lab.wait_healthy(majority);
    keys.extend(lab.write_keys(majority, 150..300, "during"));
    lab.check_data(majority, &keys, true);

    lab.heal_and_check(minority, master, &keys);
}

/// A one-way cut: n2 (not the master) stops sending to its peers but still receives. The others
/// hear nothing from it and see it dead; nothing crashes; after the heal the cluster re-forms
/// and every key written before reads back through every member.
fn a_member_that_stops_sending_is_declared_dead_and_rejoins_when_healed() {
    let lab = Lab::create("sendcut", 'd', 3);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..100, "before");

    lab.cut(1, &[0, 2], Cut::OutboundOnly);
    assert_eq!(lab.wait_view(&[0, 2], &["n1", "n3"]), master);
    lab.wait_healthy(&[0, 2]);
    lab.check_data(&[0, 2], &keys, true);
    lab.assert_all_running();

    lab.heal_and_check(1, &master, &keys);
}

/// The first schedule: only the master's outbound traffic is cut. It still hears the
/// others (their heartbeats ride in their gossip requests), so it keeps its view and its table,
/// while they declare it dead and carry on without it. 150 changes (overwrites and removes) are
/// acknowledged by the other two during the cut; after the heal the master, the oldest member,
/// leads again and must adopt what they did instead of imposing its stale table.
fn changes_acknowledged_while_the_master_cannot_send_survive_the_heal() {
    let lab = Lab::create("mastersend", 'h', 7);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..150, "before");

    lab.cut(0, &[1, 2], Cut::OutboundOnly);
    assert_ne!(lab.wait_view(&[1, 2], &["n2", "n3"]), master);
    lab.wait_healthy(&[1, 2]);
    let expected = lab.change_keys(&[1, 2], &keys, "during");

    lab.heal(0);
    assert_eq!(lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]), master, "the oldest member leads again");
    lab.wait_healthy(&[0, 1, 2]);
    lab.check_changes(&[0, 1, 2], &expected);
    lab.wait_table_settled(&[0, 1, 2]);
    lab.check_changes(&[0, 1, 2], &expected);
    lab.assert_all_running();
}

/// The second schedule: only a member's (not the master's) outbound traffic is cut; the
/// other two acknowledge 150 changes meanwhile, which must survive the heal. (The cut-off member
/// owned partitions and kept talking to its former backups' ports: its anti-entropy must not
/// overwrite their newer data.)
fn changes_acknowledged_while_a_member_cannot_send_survive_the_heal() {
    let lab = Lab::create("membersend", 'i', 8);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..150, "before");

    lab.cut(1, &[0, 2], Cut::OutboundOnly);
    assert_eq!(lab.wait_view(&[0, 2], &["n1", "n3"]), master);
    lab.wait_healthy(&[0, 2]);
    let expected = lab.change_keys(&[0, 2], &keys, "during");

    lab.heal(1);
    assert_eq!(lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]), master);
    lab.wait_healthy(&[0, 1, 2]);
    lab.check_changes(&[0, 1, 2], &expected);
    lab.wait_table_settled(&[0, 1, 2]);
    lab.check_changes(&[0, 1, 2], &expected);
    lab.assert_all_running();
}

/// The other one-way cut: n3 (not the master) stops receiving from its peers but still sends.
/// It hears nothing and sees itself alone (what n1 and n2 see depends on whether they take its
/// one-way gossip as a sign of life); nothing crashes; after the heal the cluster re-forms, every
/// member is healthy again and every key written before reads back through every member.
fn a_member_that_stops_receiving_rejoins_when_healed() {
    let lab = Lab::create("recvcut", 'g', 6);
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let keys = lab.write_keys(&[0, 1, 2], 0..100, "before");

    lab.cut(2, &[0, 1], Cut::InboundOnly);
    lab.wait_view(&[2], &["n3"]);
    lab.assert_all_running();

    lab.heal_and_check(2, &master, &keys);
}

/// Members started at the same moment may each lead for an instant, each committing partition
/// tables of its own, before they agree on the oldest one as master. Once they agree, they must
/// agree on one table too: every member serves writes and reads. Several rounds, since it is a
/// race.
fn members_started_at_once_agree_on_one_partition_table() {
    for round in 0..10 {
        let mut lab = Lab::create("atonce", 'f', 5);
        // A failed write then takes 5 s instead of 15.
        lab.env.push(("GRAPEVINE_PARTITIONS__OPERATION_TIMEOUT_MS", "5000"));
        lab.start_all_at_once();
        lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]);
        lab.wait_healthy(&[0, 1, 2]);
        eprintln!("chaos test atonce: round {round}");
        let keys = lab.write_keys(&[0, 1, 2], 0..60, &format!("round{round}"));
        lab.check_data(&[0, 1, 2], &keys, true);
        lab.wait_table_settled(&[0, 1, 2]);
    }
}

/// A member started without `--bind` and with only a host name in its member list, which at first
/// resolves (through its namespace's `/etc/hosts`) to an address where nobody runs: it runs alone.
/// When the name is changed to resolve to n1, the next refresh (`member_refresh_seconds = 1`)
/// makes it probe n1, and it joins: the others reach it at the address it advertises by default,
/// its own interface's address (the one that routes toward the member list), not 127.0.0.1.
fn a_host_name_that_starts_resolving_to_a_member_is_joined_through_the_default_advertised_address() {
    let mut lab = Lab::create("dns", 'j', 9);
    lab.env.push(("GRAPEVINE_MEMBER_REFRESH_SECONDS", "1"));
    // n1 and n2 do not list n3: only n3's own member list can bring them together.
    let first_two = format!("{}:{PORT},{}:{PORT}", lab.members[0].ip, lab.members[1].ip);
    lab.start_with(0, true, &first_two);
    lab.wait_view(&[0], &["n1"]);
    lab.start_with(1, true, &first_two);
    let master = lab.wait_view(&[0, 1], &["n1", "n2"]);
    lab.wait_healthy(&[0, 1]);

    lab.set_hosts(2, &format!("{} gvpeer\n", lab.unused_ip));
    lab.start_with(2, false, "gvpeer:5701");
    lab.wait_healthy(&[2]);
    // Alone for several refresh intervals: the name does not lead to the cluster yet.
    let alone_since = Instant::now();
    while alone_since.elapsed() < Duration::from_secs(3) {
        let members = lab.stats(2).expect("n3's /stats")["members"].as_array().map_or(0, Vec::len);
        assert_eq!(members, 1, "n3 found the cluster before its member name resolved to it");
        std::thread::sleep(Duration::from_millis(200));
    }

    lab.set_hosts(2, &format!("{} gvpeer\n", lab.members[0].ip));
    assert_eq!(lab.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]), master);
    lab.wait_healthy(&[0, 1, 2]);
    let stats = lab.stats(0).expect("n1's /stats");
    let n3 = stats["members"].as_array().unwrap().iter().find(|m| m["node_id"] == "n3").expect("n3 in n1's view");
    let advertised = format!("{}:{PORT}", lab.members[2].ip);
    assert_eq!(n3["gossip_addr"], advertised.as_str(), "{n3}");
    assert_eq!(n3["data_addr"], advertised.as_str(), "{n3}");
    let keys = lab.write_keys(&[2], 0..30, "via-n3");
    lab.check_data(&[0, 1, 2], &keys, true);
}

/// The split-brain scenarios' failure detector: a silent member is declared dead after about
/// 1.3 s instead of 0.9 s. Members starved of CPU (debug builds on a busy two-core machine) that
/// declare each other dead for a moment within a side make a different test: owners change
/// (higher-hits compares owner-side hit counts, which a promoted backup does not have) and the
/// merge can meet a flap (see the known failure below).
const SPLIT_PHI_THRESHOLD: (&str, &str) = ("GRAPEVINE_GOSSIP__PHI_THRESHOLD", "12");

/// The maps of [`a_two_way_split_heals_into_one_cluster_and_each_maps_policy_resolves_the_conflicts`],
/// one per merge policy, named after it.
/// (map, policy, the variable that sets it)
const POLICY_MAPS: &[(&str, &str, &str)] = &[
    ("latest_update", "latest-update", "GRAPEVINE_MAPS__LATEST_UPDATE__MERGE_POLICY"),
    ("put_if_absent", "put-if-absent", "GRAPEVINE_MAPS__PUT_IF_ABSENT__MERGE_POLICY"),
    ("pass_through", "pass-through", "GRAPEVINE_MAPS__PASS_THROUGH__MERGE_POLICY"),
    ("higher_hits", "higher-hits", "GRAPEVINE_MAPS__HIGHER_HITS__MERGE_POLICY"),
    ("discard", "discard", "GRAPEVINE_MAPS__DISCARD__MERGE_POLICY"),
];

/// The split {n1, n2} | {n3} with real processes: n3's namespace drops everything from and to
/// the other two, so both sides declare the other dead and serve alone. During the split both
/// sides write to one map per merge policy: keys only one side writes, a key both sides write
/// (n1 first, n3 a moment later), and for `higher-hits` two keys written on both sides, each
/// read more often on the side that wrote it *first* (so that the policy's answer differs from
/// the last write's). n3 also removes a key written before the split. When the cut heals, n3
/// (the smaller side) merges into {n1, n2}: one cluster under the old master with one table, and
/// through every member each key reads as its map's policy says (`crates/map/src/merge.rs`
/// `decide`): `latest-update` and `pass-through` take n3's later write, `put-if-absent` and
/// `discard` keep n1's, `higher-hits` keeps the entry read more often; keys only n3 wrote are
/// added except under `discard`; a removal is not merged; and the owners counted their verdicts.
fn a_two_way_split_heals_into_one_cluster_and_each_maps_policy_resolves_the_conflicts() {
    let mut lab = Lab::create("policies", 'k', 10);
    lab.env.push(SPLIT_PHI_THRESHOLD);
    lab.env.extend(POLICY_MAPS.iter().map(|(_, policy, variable)| (*variable, *policy)));
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    for (map, policy, _) in POLICY_MAPS {
        lab.put_ok(0, map, "before", "old");
        lab.put_ok(1, map, "removed-by-c", "old");
        // The configuration took: the map runs with its policy.
        let stats = lab.stats(2).expect("n3's /stats");
        let row = stats["maps"].as_array().and_then(|maps| maps.iter().find(|m| m["name"] == *map)).cloned();
        let row = row.unwrap_or_else(|| panic!("map {map} is not in n3's /stats: {}", stats["maps"]));
        assert_eq!(row["merge_policy"], *policy, "map {map}: {row}");
    }

    lab.cut(2, &[0, 1], Cut::Both);
    assert_eq!(lab.wait_view(&[0, 1], &["n1", "n2"]), master);
    lab.wait_view(&[2], &["n3"]);
    lab.wait_healthy(&[0, 1, 2]);
    lab.wait_table_settled(&[0, 1]);
    lab.wait_table_settled(&[2]);

    // Both sides serve. higher-hits' "c-first": n3 writes it before n1 does.
    lab.put_ok(2, "higher_hits", "c-first", "c");
    next_millisecond();
    for (k, (map, _, _)) in POLICY_MAPS.iter().enumerate() {
        let via = k % 2;
        if *map == "higher_hits" {
            lab.put_ok(via, map, "a-first", "a");
            lab.put_ok(via, map, "c-first", "a");
        } else {
            lab.put_ok(via, map, "both", "a");
        }
        lab.put_ok(via, map, "only-a", "a");
    }
    // n3's writes come later by the clock that latest-update compares (one host, one clock).
    next_millisecond();
    for (map, _, _) in POLICY_MAPS {
        if *map == "higher_hits" {
            lab.put_ok(2, map, "a-first", "c");
        } else {
            lab.put_ok(2, map, "both", "c");
        }
        lab.put_ok(2, map, "only-c", "c");
        let (status, body) = lab.entry(2, "DELETE", map, "removed-by-c", None);
        assert_eq!(status, 200, "DELETE removed-by-c of {map} through n3: {body}");
    }
    // Reads count as hits on the key's owner: each side reads the entry it wrote first.
    for k in 0..5 {
        assert_eq!(
            lab.entry(k % 2, "GET", "higher_hits", "a-first", None),
            (200, "a".to_string()),
            "read {k} on n1/n2"
        );
        assert_eq!(lab.entry(2, "GET", "higher_hits", "c-first", None), (200, "c".to_string()), "read {k} on n3");
    }
    // Each side reads its own writes.
    for (map, _, _) in POLICY_MAPS {
        assert_eq!(lab.entry(1, "GET", map, "only-a", None), (200, "a".to_string()), "{map}: only-a through n2");
        assert_eq!(lab.entry(2, "GET", map, "only-c", None), (200, "c".to_string()), "{map}: only-c through n3");
        assert_eq!(lab.entry(2, "GET", map, "only-a", None).0, 404, "{map}: n3 cannot know only-a");
    }

    // The owners' merge verdicts so far (cluster-wide, through n1), per map.
    let verdicts = |map: &str| -> Result<(u64, u64), String> {
        let stats = lab.stats(0)?;
        let row = stats["maps"].as_array().and_then(|m| m.iter().find(|r| r["name"] == map)).cloned();
        let row = row.ok_or_else(|| format!("map {map} is not in n1's /stats"))?;
        match (row["merge_took_merging"].as_u64(), row["merge_kept_existing"].as_u64()) {
            (Some(took), Some(kept)) => Ok((took, kept)),
            _ => Err(format!("map {map}: no merge verdicts in {row}")),
        }
    };
    let before: Vec<(u64, u64)> =
        POLICY_MAPS.iter().map(|(map, _, _)| verdicts(map).unwrap_or_else(|e| panic!("{e}"))).collect();

    lab.hold_split(2, &[0, 1]);
    lab.heal_and_merge(2, &master);

    // Reads count as hits, which higher-hits compares: read nothing before the owners decided on
    // every entry n3 offers (those it wrote during the split: the conflicting keys and only-c;
    // discard offers none).
    //
    // Known failure (a grapevine gap, not fixed here; see `crates/map/src/rejoin.rs` `push` and
    // `Merging::collect`): if n3 falls into a group of its own again while it is still offering
    // its entries (members starved of CPU declare each other dead for a moment), the retries go
    // to the owners of n3's own new table, i.e. to n3, which "takes" them; n3 rejoins within the
    // merge run delay and its entries are never offered again (`collect` skips records whose
    // update time, kept from the split, is older than the new fork). The keys read below then
    // show the larger side's values (or nothing, for only-c) although the verdicts were counted.
    let offered = |map: &str| match map {
        "higher_hits" => 3,
        "discard" => 0,
        _ => 2,
    };
    wait_until("the owners to decide on every entry n3 wrote during the split", WAIT, || {
        let mut pending = Vec::new();
        for ((map, _, _), (took, kept)) in POLICY_MAPS.iter().zip(&before) {
            // Saturating: a member that did not answer n1 in time is missing from the sums.
            let (t, k) = verdicts(map)?;
            let (t, k) = (t.saturating_sub(*took), k.saturating_sub(*kept));
            if t + k < offered(map) {
                pending.push(format!("{map}: took {t} kept {k} of {}", offered(map)));
            }
        }
        if pending.is_empty() { Ok(()) } else { Err(pending.join("; ")) }
    });

    // (map, key, the value every member must read; None: absent)
    let a = || Some("a");
    let c = || Some("c");
    let mut expected: Vec<(&str, &str, Option<&str>)> = vec![
        ("latest_update", "both", c()),
        ("latest_update", "only-c", c()),
        ("put_if_absent", "both", a()),
        ("put_if_absent", "only-c", c()),
        ("pass_through", "both", c()),
        ("pass_through", "only-c", c()),
        // n1's entry was read 5 times, n3's later one never: the reads win over the last write.
        ("higher_hits", "a-first", a()),
        // n3's entry was read 5 times, n1's later one never.
        ("higher_hits", "c-first", c()),
        ("higher_hits", "only-c", c()),
        ("discard", "both", a()),
        ("discard", "only-c", None),
    ];
    for (map, _, _) in POLICY_MAPS {
        // Every policy keeps the larger side's own writes and what was there before the split,
        // and removals are not merged.
        expected.extend([(*map, "only-a", a()), (*map, "before", Some("old")), (*map, "removed-by-c", Some("old"))]);
    }
    wait_until("every member to read each key as its map's merge policy decided", WAIT, || {
        let mut wrong = Vec::new();
        for (map, key, want) in &expected {
            let seen: Vec<(u16, String)> = (0..MEMBERS).map(|i| lab.entry(i, "GET", map, key, None)).collect();
            let ok = seen.iter().all(|(status, body)| match want {
                Some(v) => *status == 200 && body == v,
                None => *status == 404,
            });
            if !ok {
                wrong.push(format!("{map}/{key}: expected {want:?}, n1/n2/n3 read {seen:?}"));
            }
        }
        if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
    });
    // Sizes agree with the keys, through every member.
    for (map, _, _) in POLICY_MAPS {
        let present = expected.iter().filter(|(m, _, v)| m == map && v.is_some()).count() as u64;
        for i in 0..MEMBERS {
            let (status, body) = request(&lab.data, "GET", &lab.url(i, &format!("/maps/{map}/size")), None)
                .unwrap_or_else(|e| panic!("{e}"));
            let size = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["size"].as_u64());
            assert_eq!((status, size), (200, Some(present)), "size of {map} through {}: {body}", lab.node_id(i));
        }
    }
    // The owners' verdicts: latest-update took n3's "both" and "only-c", discard took nothing.
    let took = |k: usize| verdicts(POLICY_MAPS[k].0).unwrap_or_else(|e| panic!("{e}")).0.saturating_sub(before[k].0);
    assert!(took(0) >= 2, "latest_update took n3's both and only-c: {}", took(0));
    assert_eq!(took(4), 0, "discard takes nothing");
    lab.assert_all_running();
}

/// Split-brain protection on real processes: map `chaos` has `min_cluster_size = 2`. When n3 is
/// cut off alone (both ways), n3 refuses the map at once, over HTTP and RESP, with the error that
/// names the map, the minimum and the size it sees, and its `/health` answers 503 saying why,
/// while it still serves a map without protection; n1 and n2 keep accepting writes. After the heal
/// n3 accepts again, and everything acknowledged before and during the split reads back through
/// every member.
fn a_member_cut_off_alone_refuses_a_protected_map_and_the_majority_loses_nothing() {
    let mut lab = Lab::create("protected", 'l', 11);
    lab.env.push(SPLIT_PHI_THRESHOLD);
    lab.env.push(("GRAPEVINE_MAPS__CHAOS__MIN_CLUSTER_SIZE", "2"));
    // Written through RESP only (RESP stores keys as raw bytes, the HTTP routes encode them).
    lab.env.push(("GRAPEVINE_MAPS__CHAOS_RESP__MIN_CLUSTER_SIZE", "2"));
    let master = lab.start_all();
    lab.wait_healthy(&[0, 1, 2]);
    let mut keys = lab.write_keys(&[0, 1, 2], 0..60, "before");

    lab.cut(2, &[0, 1], Cut::Both);
    assert_eq!(lab.wait_view(&[0, 1], &["n1", "n2"]), master);
    lab.wait_view(&[2], &["n3"]);
    lab.wait_healthy(&[0, 1]);
    let reason = wait_until("n3's /health to answer 503 for split-brain protection", WAIT, || {
        let (status, body) = request(&lab.admin, "GET", &lab.url(2, "/health"), None)?;
        let reason = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["reason"].as_str().map(String::from));
        match reason {
            Some(reason) if status == 503 && reason.contains("split-brain protection") => Ok(reason),
            _ => Err(format!("{status} {body}")),
        }
    });
    assert!(reason.contains("sees 1 active members and map \"chaos\" needs 2"), "{reason}");

    let refused = |what: &str, (status, body): (u16, String), started: Instant| {
        assert_eq!(status, 503, "{what} through n3: {body}");
        let error = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"].as_str().map(String::from));
        let error = error.unwrap_or_else(|| panic!("{what}: no error message: {body}"));
        check_protection_error(what, MAP, &error);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what} refused after {:?}, not at once",
            started.elapsed()
        );
    };
    let started = Instant::now();
    refused("PUT", lab.entry(2, "PUT", MAP, "during-c", Some("c")), started);
    let started = Instant::now();
    refused("GET", lab.entry(2, "GET", MAP, "key0", None), started);
    // The same error over RESP.
    let mut resp = lab.resp(2);
    let () = redis::cmd("GV.SELECT").arg("chaos_resp").query(&mut resp).expect("GV.SELECT");
    let started = Instant::now();
    let err = redis::cmd("SET").arg("during-c").arg("c").query::<()>(&mut resp).expect_err("SET refused on n3");
    check_protection_error("RESP SET", "chaos_resp", &err.to_string());
    assert!(started.elapsed() < Duration::from_secs(5), "RESP SET refused after {:?}", started.elapsed());
    // A map without protection is served on the lone member.
    lab.put_ok(2, "open", "during-c", "c");

    // The majority side accepts.
    keys.extend(lab.write_keys(&[0, 1], 60..120, "during"));
    lab.check_data(&[0, 1], &keys, true);

    lab.hold_split(2, &[0, 1]);
    lab.heal_and_merge(2, &master);
    keys.extend(lab.write_keys(&[2], 120..140, "after"));
    // The connection that was refused during the split is served again, and its refused write
    // did not happen.
    let () = redis::cmd("SET").arg("after-c").arg("c").query(&mut resp).expect("RESP SET on n3 after the heal");
    let mut on_n1 = lab.resp(0);
    let () = redis::cmd("GV.SELECT").arg("chaos_resp").query(&mut on_n1).expect("GV.SELECT");
    let read: (Option<String>, Option<String>) =
        redis::cmd("MGET").arg("after-c").arg("during-c").query(&mut on_n1).expect("RESP MGET on n1");
    assert_eq!(read, (Some("c".into()), None), "after-c and during-c of chaos_resp through n1");
    assert_eq!(lab.entry(2, "GET", MAP, "during-c", None).0, 404, "n3's refused write did not happen");
    lab.check_data(&[0, 1, 2], &keys, true);
    lab.assert_all_running();
}

/// `error` is split-brain protection's message for `map` (min 2, seen 1).
fn check_protection_error(what: &str, map: &str, error: &str) {
    let map = format!("{map:?}");
    for part in [&map, "protected against split brain", "at least 2", "sees 1", "retry once the network heals"] {
        assert!(error.contains(part), "{what} through n3: {part:?} missing in the error {error:?}");
    }
}

// ------------------------------------------------------------------------------------------------
// The lab: namespaces, bridge, members
// ------------------------------------------------------------------------------------------------

/// Which direction of a member's traffic with its peers is dropped.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Both,
    InboundOnly,
    OutboundOnly,
}

/// One member: its namespace, address and process.
struct Member {
    node_id: String,
    ns: String,
    ip: String,
    child: RefCell<Option<Child>>,
    log: PathBuf,
}

/// Three member namespaces on a private bridge in a fourth (the switch), a veth from the host to
/// the bridge, and the members running in them. Dropping it kills the members and removes every
/// namespace, link and table it created.
struct Lab {
    test: &'static str,
    cluster: String,
    /// The namespace that holds the bridge (`br0`) and the member-side veths (`v1`..`v3`, `host`).
    switch: String,
    /// The host end of the veth to the bridge.
    host_veth: String,
    members: Vec<Member>,
    /// The members' environment: [`MEMBER_ENV`], then overrides (later entries win).
    env: Vec<(&'static str, &'static str)>,
    /// An address of the lab's subnet that no member or host holds.
    unused_ip: String,
    log_dir: PathBuf,
    admin: ureq::Agent,
    data: ureq::Agent,
    /// Dropped after [`Lab::drop`] has cleaned up.
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds the lab for test `test` (letter `tag`, address slot `slot` in 0..16). [`main`]
    /// checked that this host can.
    fn create(test: &'static str, tag: char, slot: u8) -> Lab {
        let pid = std::process::id();
        let prefix = format!("gv{pid}{tag}");
        // A test that failed while holding the lock poisons it; the lab it held is gone anyway.
        let one_at_a_time = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{pid}-{test}"));
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("log directory");

        let members: Vec<Member> = (1..=MEMBERS)
            .map(|i| Member {
                node_id: format!("n{i}"),
                ns: format!("{prefix}n{i}"),
                ip: String::new(),
                child: RefCell::new(None),
                log: log_dir.join(format!("n{i}.log")),
            })
            .collect();
        let mut lab = Lab {
            test,
            cluster: format!("chaos-{pid}-{test}"),
            switch: format!("{prefix}s"),
            host_veth: format!("{prefix}h"),
            members,
            env: MEMBER_ENV.to_vec(),
            unused_ip: String::new(),
            log_dir,
            admin: agent(ADMIN_TIMEOUT),
            data: agent(DATA_TIMEOUT),
            _one_at_a_time: one_at_a_time,
        };
        // Leftovers of a previous run with the same process id.
        lab.remove_network();

        let octet = free_octet(pid, slot);
        let base = 16 * u32::from(slot);
        let subnet = |host: u32| format!("10.213.{octet}.{}", base + host);
        let host_ip = format!("{}/28", subnet(14));
        for (i, member) in lab.members.iter_mut().enumerate() {
            member.ip = subnet(i as u32 + 1);
        }
        lab.unused_ip = subnet(13);

        let members: Vec<(&str, &str)> = lab.members.iter().map(|m| (m.ns.as_str(), m.ip.as_str())).collect();
        build_bridge_lab(&lab.switch, &lab.host_veth, &host_ip, &members);
        let sw = lab.switch.as_str();
        eprintln!(
            "chaos test {test}: host {} ({host_ip}) to the bridge in {sw}; members {}",
            lab.host_veth,
            lab.members.iter().map(|m| format!("{}={}@{}", m.node_id, m.ip, m.ns)).collect::<Vec<_>>().join(" ")
        );
        lab
    }

    /// Starts the members one after the other, each once the previous ones agree on the view, so
    /// that n1 is the oldest member and thus the master. Returns the master's node id (n1).
    fn start_all(&self) -> String {
        let mut master = String::new();
        for i in 0..MEMBERS {
            self.start(i);
            let nodes: Vec<usize> = (0..=i).collect();
            let ids: Vec<&str> = nodes.iter().map(|n| self.node_id(*n)).collect();
            master = self.wait_view(&nodes, &ids);
        }
        assert_eq!(master, "n1", "the first member started is the oldest, hence the master");
        master
    }

    /// Starts every member at once.
    fn start_all_at_once(&self) {
        for i in 0..MEMBERS {
            self.start(i);
        }
    }

    /// Starts member `i` in its namespace, bound to its address and listing every member, its log
    /// (stderr) going to a file.
    fn start(&self, i: usize) {
        let seeds = self.members.iter().map(|m| format!("{}:{PORT}", m.ip)).collect::<Vec<_>>().join(",");
        self.start_with(i, true, &seeds);
    }

    /// Starts member `i` with `--bind <its address>` or without `--bind`, and `--members members`.
    fn start_with(&self, i: usize, bind: bool, members: &str) {
        let member = &self.members[i];
        let log = File::create(&member.log).expect("log file");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &member.ns, BIN, "start"]);
        command.args(["--cluster-name", &self.cluster, "--members", members]);
        if bind {
            command.args(["--bind", &member.ip]);
        }
        command.args(["--node-id", &member.node_id, "--port", &PORT.to_string()]);
        command.args(["--admin-port", &ADMIN_PORT.to_string(), "--resp-port", &RESP_PORT.to_string()]);
        for (key, _) in std::env::vars() {
            if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().copied());
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // `ip netns exec` execs the command: the child is the member itself.
        let child = command.spawn().expect("ip netns exec grapevine starts");
        *member.child.borrow_mut() = Some(child);
    }

    /// SIGKILL of member `i`, waiting until it is gone.
    fn kill(&self, i: usize) {
        let member = &self.members[i];
        let mut child = member.child.borrow_mut().take().unwrap_or_else(|| panic!("{} is not running", member.node_id));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        eprintln!("chaos test {}: killed {} with SIGKILL", self.test, member.node_id);
    }

    /// Drops member `i`'s traffic with `peers` in direction `cut`.
    fn cut(&self, i: usize, peers: &[usize], cut: Cut) {
        let addresses = peers.iter().map(|p| self.members[*p].ip.as_str()).collect::<Vec<_>>().join(", ");
        let input = matches!(cut, Cut::Both | Cut::InboundOnly);
        let output = matches!(cut, Cut::Both | Cut::OutboundOnly);
        let member = &self.members[i];
        nft(&member.ns, &drop_table(NFT_TABLE, &addresses, input, output, None)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("chaos test {}: cut {} off from {addresses} ({cut:?})", self.test, member.node_id);
    }

    /// Sets the `/etc/hosts` that processes in member `i`'s namespace see (`ip netns exec`
    /// mounts `/etc/netns/<namespace>/hosts` over it). Written in place: the mount follows the file.
    fn set_hosts(&self, i: usize, entries: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.members[i].ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns/<namespace>");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{entries}")).expect("hosts file");
    }

    /// Removes member `i`'s cut.
    fn heal(&self, i: usize) {
        let member = &self.members[i];
        ip(&["netns", "exec", &member.ns, "nft", "delete", "table", "inet", NFT_TABLE]);
        eprintln!("chaos test {}: healed {}", self.test, member.node_id);
    }

    /// Heals member `i`'s cut, then waits until the cluster re-forms under `master` (the oldest
    /// member), every member is healthy, every key of `keys` reads back through every member, and
    /// the members hold one settled table; and checks that no member exited.
    fn heal_and_check(&self, i: usize, master: &str, keys: &[(String, String)]) {
        self.heal(i);
        assert_eq!(self.wait_view(&[0, 1, 2], &["n1", "n2", "n3"]), master, "the oldest member leads again");
        self.wait_healthy(&[0, 1, 2]);
        self.check_data(&[0, 1, 2], keys, true);
        self.wait_table_settled(&[0, 1, 2]);
        self.assert_all_running();
    }

    fn node_id(&self, i: usize) -> &str {
        &self.members[i].node_id
    }

    fn index_of(&self, node_id: &str) -> usize {
        self.members.iter().position(|m| m.node_id == node_id).unwrap_or_else(|| panic!("no member {node_id}"))
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}:{ADMIN_PORT}{path}", self.members[i].ip)
    }

    /// An error if member `i` exited (it is never supposed to, unless killed by the test).
    fn running(&self, i: usize) -> Result<(), String> {
        let member = &self.members[i];
        let mut child = member.child.borrow_mut();
        let Some(child) = child.as_mut() else { return Ok(()) };
        match child.try_wait().expect("try_wait") {
            None => Ok(()),
            Some(status) => Err(format!("{} exited with {status}", member.node_id)),
        }
    }

    fn assert_running(&self, i: usize) {
        if let Err(e) = self.running(i) {
            panic!("{e}");
        }
    }

    fn assert_all_running(&self) {
        for i in 0..MEMBERS {
            self.assert_running(i);
        }
    }

    /// Member `i`'s `/stats`.
    fn stats(&self, i: usize) -> Result<Value, String> {
        let (status, body) = request(&self.admin, "GET", &self.url(i, "/stats"), None)?;
        if status != 200 {
            return Err(format!("{}: /stats answered {status}: {body}", self.node_id(i)));
        }
        serde_json::from_str(&body).map_err(|e| format!("{}: /stats is not JSON ({e}): {body}", self.node_id(i)))
    }

    /// Member `i`'s view: its master and the sorted node ids of the members, if all are active.
    fn view(&self, i: usize) -> Result<(String, Vec<String>), String> {
        let stats = self.stats(i)?;
        let who = self.node_id(i);
        let members = stats["members"].as_array().ok_or_else(|| format!("{who}: no members in /stats"))?;
        let mut ids = Vec::new();
        for m in members {
            let id = m["node_id"].as_str().unwrap_or("?").to_string();
            if m["state"] != "active" {
                return Err(format!("{who} sees {id} in state {}", m["state"]));
            }
            ids.push(id);
        }
        ids.sort();
        let master = stats["master"].as_str().ok_or_else(|| format!("{who} sees no master (members {ids:?})"))?;
        let flagged: Vec<&str> =
            members.iter().filter(|m| m["is_master"] == true).filter_map(|m| m["node_id"].as_str()).collect();
        if flagged != [master] {
            return Err(format!("{who}: master {master} but is_master set on {flagged:?}"));
        }
        Ok((master.to_string(), ids))
    }

    /// Waits until each member of `nodes` sees exactly the active members `expected` and they all
    /// name the same master, one of them; returns the master's node id.
    fn wait_view(&self, nodes: &[usize], expected: &[&str]) -> String {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        let who: Vec<&str> = nodes.iter().map(|i| self.node_id(*i)).collect();
        let what = format!("{who:?} to see exactly {expected:?}, all active, with one master among them");
        let started = Instant::now();
        let master = wait_until(&what, WAIT, || {
            let mut master: Option<String> = None;
            for &i in nodes {
                self.running(i)?;
                let (m, ids) = self.view(i)?;
                if ids != expected {
                    return Err(format!("{} sees {ids:?} (master {m})", self.node_id(i)));
                }
                if !expected.contains(&m) {
                    return Err(format!("{} names master {m}, not one of {expected:?}", self.node_id(i)));
                }
                match &master {
                    Some(first) if *first != m => {
                        return Err(format!("masters differ: {first} and {m} ({})", self.node_id(i)));
                    }
                    _ => master = Some(m),
                }
            }
            Ok(master.expect("at least one node"))
        });
        eprintln!("chaos test {}: {what}: master {master}, after {:?}", self.test, started.elapsed());
        master
    }

    /// Waits until `/health` answers 200 on each member of `nodes`.
    fn wait_healthy(&self, nodes: &[usize]) {
        let who: Vec<&str> = nodes.iter().map(|i| self.node_id(*i)).collect();
        wait_until(&format!("/health 200 on {who:?}"), WAIT, || {
            for &i in nodes {
                self.running(i)?;
                let (status, body) = request(&self.admin, "GET", &self.url(i, "/health"), None)?;
                if status != 200 {
                    return Err(format!("{}: /health {status} {body}", self.node_id(i)));
                }
            }
            Ok(())
        });
    }

    /// Waits until each member of `nodes` holds the same partition table (same epoch, same owners
    /// and backups per member) and none has migrations under way: the cluster converged.
    fn wait_table_settled(&self, nodes: &[usize]) {
        let who: Vec<&str> = nodes.iter().map(|i| self.node_id(*i)).collect();
        wait_until(&format!("{who:?} to hold the same partition table, no migration under way"), WAIT, || {
            let mut tables = Vec::new();
            for &i in nodes {
                self.running(i)?;
                let stats = self.stats(i)?;
                let p = &stats["partitions"];
                if p["migrating"].as_u64() != Some(0) {
                    return Err(format!("{}: migrating {}", self.node_id(i), p["migrating"]));
                }
                let table = (p["epoch"].clone(), p["owned_by_member"].clone(), p["backups_by_member"].clone());
                tables.push((self.node_id(i), table));
            }
            if tables.windows(2).any(|w| w[0].1 != w[1].1) {
                let tables: Vec<String> = tables
                    .iter()
                    .map(|(who, (epoch, owned, backups))| {
                        format!("{who}: epoch {epoch} owned {owned} backups {backups}")
                    })
                    .collect();
                return Err(tables.join("; "));
            }
            Ok(())
        });
    }

    /// Writes `key<n>` = `<label>-<n>` for every n of `range`, round-robin through `via`; every
    /// write must succeed and find no previous value. Returns the pairs written.
    fn write_keys(&self, via: &[usize], range: std::ops::Range<usize>, label: &str) -> Vec<(String, String)> {
        let started = Instant::now();
        let mut written = Vec::new();
        for (k, n) in range.enumerate() {
            let i = via[k % via.len()];
            let (key, value) = (format!("key{n}"), format!("{label}-{n}"));
            let url = self.url(i, &format!("/maps/{MAP}/entries/{key}"));
            let (status, body) = request(&self.data, "PUT", &url, Some(&value))
                .unwrap_or_else(|e| panic!("PUT {key} through {}: {e}", self.node_id(i)));
            assert_eq!(status, 200, "PUT {key} through {}: {body}", self.node_id(i));
            let reply: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("PUT {key}: not JSON: {body}"));
            assert!(
                reply["previous"].is_null(),
                "PUT {key} through {}: a fresh key had a value: {body}",
                self.node_id(i)
            );
            written.push((key, value));
        }
        eprintln!(
            "chaos test {}: wrote {} keys ({label}) through {:?} in {:?}",
            self.test,
            written.len(),
            via.iter().map(|i| self.node_id(*i)).collect::<Vec<_>>(),
            started.elapsed()
        );
        written
    }

    /// Changes every key of `keys` through `via`, round-robin, every acknowledged: one in three is
    /// removed, the others get the value `<label>-<n>`. Returns what each key must hold afterwards
    /// (`None`: absent).
    fn change_keys(&self, via: &[usize], keys: &[(String, String)], label: &str) -> Vec<(String, Option<String>)> {
        let started = Instant::now();
        let mut expected = Vec::new();
        for (k, (key, _)) in keys.iter().enumerate() {
            let i = via[k % via.len()];
            let url = self.url(i, &format!("/maps/{MAP}/entries/{key}"));
            let (status, body) = if k % 3 == 0 {
                request(&self.data, "DELETE", &url, None)
            } else {
                request(&self.data, "PUT", &url, Some(&format!("{label}-{k}")))
            }
            .unwrap_or_else(|e| panic!("changing {key} through {}: {e}", self.node_id(i)));
            assert_eq!(status, 200, "changing {key} through {}: {body}", self.node_id(i));
            expected.push((key.clone(), (k % 3 != 0).then(|| format!("{label}-{k}"))));
        }
        eprintln!(
            "chaos test {}: {} changes ({label}) acknowledged through {:?} in {:?}",
            self.test,
            expected.len(),
            via.iter().map(|i| self.node_id(*i)).collect::<Vec<_>>(),
            started.elapsed()
        );
        expected
    }

    /// Reads every key of `expected` through each member of `nodes` and checks it holds the
    /// expected value or is absent, and the map's size; reports every member's lost changes.
    fn check_changes(&self, nodes: &[usize], expected: &[(String, Option<String>)]) {
        let mut problems = Vec::new();
        let present = expected.iter().filter(|(_, v)| v.is_some()).count();
        for &i in nodes {
            let who = self.node_id(i);
            let mut lost = Vec::new();
            for (key, value) in expected {
                let url = self.url(i, &format!("/maps/{MAP}/entries/{key}"));
                match (request(&self.data, "GET", &url, None), value) {
                    (Ok((200, body)), Some(v)) if body == *v => {}
                    (Ok((404, _)), None) => {}
                    (Ok((status, body)), _) => lost.push(format!("{key}: expected {value:?}, got {status} {body}")),
                    (Err(e), _) => lost.push(format!("{key}: {e}")),
                }
            }
            if !lost.is_empty() {
                problems.push(format!(
                    "{} of {} acknowledged changes are lost through {who}; the first ones:\n  {}",
                    lost.len(),
                    expected.len(),
                    lost.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
                ));
            }
            let url = self.url(i, &format!("/maps/{MAP}/size"));
            match request(&self.data, "GET", &url, None) {
                Ok((200, body)) => {
                    let reply: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    if reply["size"].as_u64() != Some(present as u64) {
                        problems.push(format!("size through {who}: expected {present}, got {body}"));
                    }
                }
                other => problems.push(format!("size through {who}: {other:?}")),
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// Reads every key through each member of `nodes`: each must be there with its value; with
    /// `size`, the map's size through each must be the number of keys. Checks every member before
    /// failing, so that the message says which ones are wrong.
    fn check_data(&self, nodes: &[usize], keys: &[(String, String)], size: bool) {
        let mut problems = Vec::new();
        for &i in nodes {
            let started = Instant::now();
            let who = self.node_id(i);
            let mut wrong = Vec::new();
            for (key, value) in keys {
                let url = self.url(i, &format!("/maps/{MAP}/entries/{key}"));
                match request(&self.data, "GET", &url, None) {
                    Ok((200, body)) if body == *value => {}
                    Ok((status, body)) => wrong.push(format!("{key}: expected {value:?}, got {status} {body}")),
                    Err(e) => wrong.push(format!("{key}: {e}")),
                }
            }
            if !wrong.is_empty() {
                problems.push(format!(
                    "{} of {} keys read through {who} are wrong or missing; the first ones:\n  {}",
                    wrong.len(),
                    keys.len(),
                    wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
                ));
            }
            if size {
                let url = self.url(i, &format!("/maps/{MAP}/size"));
                match request(&self.data, "GET", &url, None) {
                    Ok((200, body)) => {
                        let reply: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        if reply["size"].as_u64() != Some(keys.len() as u64) {
                            problems.push(format!("size through {who}: expected {}, got {body}", keys.len()));
                        }
                    }
                    Ok((status, body)) => problems.push(format!("size through {who}: {status} {body}")),
                    Err(e) => problems.push(format!("size through {who}: {e}")),
                }
            }
            eprintln!("chaos test {}: read {} keys through {who} in {:?}", self.test, keys.len(), started.elapsed());
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// Keeps member `alone` cut off from `rest` until both sides have seen the split for twice
    /// [`MERGE_RUN_DELAY`], checking all along (with `/health`, which asks no other member) that
    /// `alone` counts one member and each of `rest` counts `rest` (whatever the status: a protected
    /// map makes it 503): a member back within the delay would count as a flap, not as another
    /// group, and the heal would not go through the merge timers. A poll that gets no answer (a
    /// slow machine) shows nothing and is not held against the split.
    fn hold_split(&self, alone: usize, rest: &[usize]) {
        let since = Instant::now();
        while since.elapsed() < 2 * MERGE_RUN_DELAY {
            for (i, expected) in std::iter::once((alone, 1)).chain(rest.iter().map(|i| (*i, rest.len()))) {
                self.assert_running(i);
                let Ok((_, body)) = request(&self.admin, "GET", &self.url(i, "/health"), None) else { continue };
                let members = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["members"].as_u64());
                assert_eq!(
                    members,
                    Some(expected as u64),
                    "the split did not hold for {:?}: {} answers {body}",
                    since.elapsed(),
                    self.node_id(i)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Heals member `i`'s cut after [`Lab::hold_split`] and waits until the two groups became one
    /// cluster under `master` through the merge timers (not before the other group was visible for
    /// [`MERGE_RUN_DELAY`], and counted as a merged group by the member cut off), every member
    /// healthy, one settled table.
    fn heal_and_merge(&self, i: usize, master: &str) {
        let healed = Instant::now();
        self.heal(i);
        let all: Vec<usize> = (0..MEMBERS).collect();
        assert_eq!(self.wait_view(&all, &self.ids(&all)), master, "the oldest member leads again");
        let took = healed.elapsed();
        assert!(took >= MERGE_RUN_DELAY, "the groups merged {took:?} after the heal, before the merge run delay");
        let merged = self.stats(i).expect("/stats")["gossip"]["groups_merged"].clone();
        assert!(merged.as_u64() >= Some(1), "{} counts no merged group: {merged}", self.node_id(i));
        self.wait_healthy(&all);
        self.wait_table_settled(&all);
        eprintln!(
            "chaos test {}: one cluster {took:?} after the heal, settled after {:?}",
            self.test,
            healed.elapsed()
        );
    }

    fn ids(&self, nodes: &[usize]) -> Vec<&str> {
        nodes.iter().map(|i| self.node_id(*i)).collect()
    }

    /// `method` (`GET`, `PUT` with `value`, `DELETE`) on entry `key` of `map` through member `i`:
    /// status and body.
    fn entry(&self, i: usize, method: &str, map: &str, key: &str, value: Option<&str>) -> (u16, String) {
        let url = self.url(i, &format!("/maps/{map}/entries/{key}"));
        request(&self.data, method, &url, value)
            .unwrap_or_else(|e| panic!("{method} {map}/{key} through {}: {e}", self.node_id(i)))
    }

    /// Puts `key` = `value` into `map` through member `i`, which must acknowledge it.
    fn put_ok(&self, i: usize, map: &str, key: &str, value: &str) {
        let (status, body) = self.entry(i, "PUT", map, key, Some(value));
        assert_eq!(status, 200, "PUT {map}/{key} = {value:?} through {}: {body}", self.node_id(i));
    }

    /// A RESP connection to member `i`.
    fn resp(&self, i: usize) -> redis::Connection {
        let client = redis::Client::open(format!("redis://{}:{RESP_PORT}/", self.members[i].ip)).expect("RESP url");
        let con = client.get_connection_with_timeout(ADMIN_TIMEOUT).expect("a RESP connection");
        con.set_read_timeout(Some(DATA_TIMEOUT)).expect("read timeout");
        con
    }

    /// Removes the namespaces (with the bridge, veths and nft tables in them) and the host's veth;
    /// errors are ignored (nothing to remove).
    fn remove_network(&self) {
        for member in &self.members {
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&member.ns));
        }
        remove_bridge_lab(&self.switch, &self.host_veth, self.members.iter().map(|m| m.ns.as_str()));
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
                let tail = &lines[lines.len().saturating_sub(300)..];
                eprintln!(
                    "----- chaos test {}: last {} lines of {} ({}, {}) -----\n{}",
                    self.test,
                    tail.len(),
                    member.node_id,
                    member.ip,
                    member.log.display(),
                    tail.join("\n")
                );
            }
            eprintln!("----- chaos test {}: logs kept in {} -----", self.test, self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// An HTTP client that never uses a proxy and returns every status as a reply.
fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .build();
    ureq::Agent::new_with_config(config)
}

/// `method url` with an optional UTF-8 body: status and body text.
fn request(agent: &ureq::Agent, method: &str, url: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let response = match (method, body) {
        ("GET", None) => agent.get(url).call(),
        ("DELETE", None) => agent.delete(url).call(),
        ("PUT", Some(body)) => agent.put(url).send(body),
        _ => unreachable!("{method} with body {body:?}"),
    };
    let mut response = response.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    Ok((status, text))
}

/// Polls `check` every 50 ms until it returns `Ok`; after `timeout`, panics with the last error.
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
