//! The seeded fault harness on real processes: `grapevine start` members, each in a network
//! namespace of its own, under schedules of single faults drawn from a seed, with concurrent
//! clients whose every operation is recorded and checked afterwards.
//!
//! This is the second form of the harness of `grapevine_tests::faults` (in-process members); it
//! shares its generator ([`Rng`]), its history ([`Op`], [`Outcome`]) and its checkers
//! ([`check_key`], [`check_observed`]), and adds what only real processes have: nftables rules per
//! direction and per protocol, SIGSTOP, SIGKILL, SIGTERM, and exit statuses and logs to inspect.
//!
//! **A schedule** ([`Schedule::from_seed`]): 3 members (5 for seeds divisible by 5), one map with
//! `backup_count` 1 (2 for some 5-member seeds), and one to three steps. Each step holds one fault
//! under load, heals it, waits until the cluster settled, and rests a moment before the next:
//! * `Split`: a minority of the members cannot talk to the others at all (both directions, TCP
//!   and UDP), dropped by rules in their namespaces;
//! * `Mute` / `Deaf`: everything a member sends to the others / receives from them is dropped;
//! * `DataCut`: TCP (the data plane) between two members, both ways; gossip (UDP) flows;
//! * `DataMute`: TCP from a member to the others; `GossipCut`: UDP to and from a member;
//! * `Stall`: SIGSTOP, then SIGCONT;
//! * `Kill`: SIGKILL, then a new process with the same node id in the same namespace;
//! * `Leave`: SIGTERM (a graceful leave; the process must exit with status 0), then a new member
//!   with a new node id in the same namespace;
//! * `Join`: a new member in a namespace not used yet.
//!
//! The first step of seed `s` is fault kind `(s - 1) % 10` in the order above, so the default ten
//! seeds try every kind; the rest is drawn.
//!
//! **Clients** (four threads) put, overwrite and remove shared and per-client keys through the
//! admin HTTP API of random running members, one new connection per operation so that a refused
//! connection certainly did nothing. `200` is acknowledged; `502` (unknown outcome) and transport
//! errors once the request may have been sent are unknown; `503`, `504`, `409` and refused
//! connections failed; any other answer is a failure of the run.
//!
//! **Minority sides.** As in the in-process harness, an operation completed through a member whose
//! view held at most half of the running members may be lost (what a minority side acknowledges is
//! discarded when the sides meet: the harness's map uses the `discard` merge policy). A watcher polls each member's
//! `/health` (its `members` count, the view's size) every 50 ms; a minority span runs from the
//! last poll *sent* that showed a majority to the first one *answered* that shows one again, so a
//! view that changed between two polls is covered. A poll that fails counts as a minority, so
//! does a member on the smaller side of a `Split` while it is cut off (its view can still count
//! members of the other side for a moment, as they are declared dead one at a time), and so does
//! a stalled member from SIGSTOP until a second after SIGCONT (on waking it may declare the
//! others dead for a moment before their gossip reaches it). A member that just started is in a
//! minority until its polls show otherwise.
//!
//! **Settled** means: every running member answers `/health` 200, sees exactly the running members,
//! all active, with one master, excludes nobody, reports `settled` (`/stats` `local.settled`:
//! newest table, balanced plan, backups confirmed), and all hold the same table with no migration.
//!
//! **The check** after the last step and the final settle:
//! * every acknowledged put or remove answered the key's previous value: it must be the effect of
//!   a change that may have come last before it, with no acknowledged change certainly in between
//!   ([`check_observed`]; minority changes in between may be lost). A lost acknowledged change is
//!   thus caught at the key's next change, not only when nothing overwrote it afterwards;
//! * every key the clients touched is read through every running member; all must agree,
//!   `/maps/faults/size` must match, each key's value must be allowed by the history
//!   ([`check_key`]);
//! * every process still runs, each killed one died of SIGKILL, each one that left exited with 0,
//!   and no log holds `panicked`.
//!
//! **Running it.** Needs root, `ip` and `nft` like `chaos_netns.rs` (without them the test is
//! reported ignored with the reason, or fails when `CHAOS_NETNS_REQUIRED=1`). `GRAPEVINE_NETNS_SEEDS=K` runs K seeds from
//! `GRAPEVINE_NETNS_FIRST_SEED` (default 1; K defaults to 10); `GRAPEVINE_NETNS_SEED=N` replays
//! seed N; `GRAPEVINE_NETNS_RUST_LOG` sets the members' `RUST_LOG` (e.g.
//! `info,grapevine_map=debug`). A failing seed prints its schedule, what happened when, the
//! problems found, the tail of every member's log and where the logs are kept.
//!
//! The lab (`gv<pid>z*`): six member namespaces, a bridge in a namespace of its own and a veth to
//! the host in the /28 `10.213.<o>.192` (slot 12; `chaos_netns.rs` uses slots 0 to 11), as in
//! `chaos_netns.rs`. Seeds run one after the other, each with a cluster of its own name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grapevine_tests::faults::{Model, Op, Outcome, Rng, check_key, check_observed, epoch};
use serde_json::Value;

mod netns;
use netns::{build_bridge_lab, drop_table, free_octet, nft, quiet, remove_bridge_lab};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_grapevine");

/// Every member's data and gossip port, and admin port (each has its namespace to itself).
const PORT: u16 = 5701;
const ADMIN_PORT: u16 = 5801;

/// The map the clients write.
const MAP: &str = "faults";

/// The nftables table of a cut, in the member's namespace.
const NFT_TABLE: &str = "gvfaults";

/// The lab's /28 slot (see `chaos_netns.rs`, which uses 0 to 11).
const LAB_SLOT: u8 = 12;

/// Member namespaces: members, and members that join.
const SLOTS: usize = 6;

/// Concurrent clients.
const CLIENTS: u32 = 4;

/// Keys shared by every client; each client also has 8 keys of its own after them.
const SHARED_KEYS: u32 = 24;

/// How long the cluster may take to settle after a fault.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);

/// How long clients may make no progress at all.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP timeout of a map operation: well above the members' operation timeout (4 s) and a
/// stall, so that an operation answers with grapevine's own outcome.
const DATA_TIMEOUT: Duration = Duration::from_secs(15);

/// The HTTP timeout of `/health` and `/stats` (which asks the other members for map statistics,
/// for up to 2 s).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(4);

/// How often the minority watchers poll `/health`.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long after SIGCONT a stalled member still counts as a minority.
const WAKE_SUSPECT: Duration = Duration::from_secs(1);

/// The pause of a client between two operations: about 150 operations a second per client, which
/// leaves the members (debug builds, two cores) enough CPU for their 100 ms failure detection.
const CLIENT_PAUSE: Duration = Duration::from_millis(5);

/// The members' configuration, on top of their defaults: the in-process harness's short timers,
/// except a phi threshold of 12 (a silent member is declared dead after about 1.3 s): with 8, six
/// debug-build members on a busy two-core machine declared several others dead at once although
/// nothing was cut, which loses partitions (more than `backup_count` members lost at once).
fn member_env(backup_count: u8) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("GRAPEVINE_GOSSIP__INTERVAL_MS", "100"),
        ("GRAPEVINE_GOSSIP__PHI_THRESHOLD", "12"),
        ("GRAPEVINE_GOSSIP__PROBE_INTERVAL_MS", "100"),
        ("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "1000"),
        ("GRAPEVINE_PARTITIONS__COUNT", "61"),
        ("GRAPEVINE_PARTITIONS__OPERATION_TIMEOUT_MS", "4000"),
        ("GRAPEVINE_PARTITIONS__BACKUP_ACK_TIMEOUT_MS", "2000"),
        ("GRAPEVINE_PARTITIONS__ANTI_ENTROPY_INTERVAL_MS", "300"),
        ("GRAPEVINE_PARTITIONS__MIGRATION_TIMEOUT_MS", "5000"),
        ("GRAPEVINE_SHUTDOWN_TIMEOUT_SECONDS", "10"),
        ("GRAPEVINE_PORT_AUTO_INCREMENT", "false"),
        ("GRAPEVINE_RESP_ENABLED", "false"),
        // Merges at once after a heal, and none of the smaller side's writes are merged: the
        // checker allows a minority side's acknowledgements to be lost, and a merging policy could
        // let one overrule a later removal (removals are not merged), which it does not model.
        ("GRAPEVINE_MERGE_FIRST_RUN_DELAY_SECONDS", "0"),
        ("GRAPEVINE_MERGE_RUN_DELAY_SECONDS", "0.5"),
        ("GRAPEVINE_MAPS__FAULTS__MERGE_POLICY", "discard"),
        ("RUST_BACKTRACE", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push(("GRAPEVINE_MAPS__FAULTS__BACKUP_COUNT".into(), backup_count.to_string()));
    if let Ok(filter) = std::env::var("GRAPEVINE_NETNS_RUST_LOG") {
        env.push(("RUST_LOG".into(), filter));
    }
    env
}

// ------------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn main() {
    let lab: &[(&str, fn())] = &[(
        "seeded_fault_schedules_on_real_processes_lose_no_acknowledged_write",
        seeded_fault_schedules_on_real_processes_lose_no_acknowledged_write,
    )];
    let plain: &[(&str, fn())] = &[(
        "schedules_are_reproducible_and_the_default_seeds_try_every_kind_of_fault",
        schedules_are_reproducible_and_the_default_seeds_try_every_kind_of_fault,
    )];
    netns::run_tests("faults_netns", "gvzprobe", lab, plain);
}

fn seeded_fault_schedules_on_real_processes_lose_no_acknowledged_write() {
    let seeds: Vec<u64> = match std::env::var("GRAPEVINE_NETNS_SEED") {
        Ok(seed) => vec![seed.parse().expect("GRAPEVINE_NETNS_SEED is a number")],
        Err(_) => {
            let first = env_u64("GRAPEVINE_NETNS_FIRST_SEED", 1);
            (first..first + env_u64("GRAPEVINE_NETNS_SEEDS", 10)).collect()
        }
    };
    let lab = Lab::create();
    epoch();
    let started = Instant::now();
    let (mut passed, mut failures) = (Vec::new(), Vec::new());
    for seed in seeds {
        let schedule = Schedule::from_seed(seed);
        eprintln!("faults_netns: {schedule}");
        match run(&lab, &schedule) {
            Ok(report) => {
                eprintln!("faults_netns: seed {seed} passed: {report}");
                passed.push(report);
            }
            Err(failure) => {
                eprintln!("faults_netns: seed {seed} FAILED\n{failure}");
                failures.push((seed, failure));
            }
        }
    }
    let sum = |f: fn(&Report) -> usize| passed.iter().map(f).sum::<usize>();
    eprintln!(
        "faults_netns: {} seeds passed, {} failed ({:?}), in {:?}; {} operations, {} acknowledged ({} through a \
         minority), {} previous values checked; minority writes lost (allowed: merge_policy discard): {} seen \
         by later writes, {} in final states",
        passed.len(),
        failures.len(),
        failures.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        started.elapsed(),
        sum(|r| r.ops),
        sum(|r| r.acknowledged),
        sum(|r| r.minority_acknowledged),
        sum(|r| r.observations),
        sum(|r| r.minority_skipped),
        sum(|r| r.minority_losses),
    );
    let text: Vec<String> = failures.iter().map(|(_, f)| f.clone()).collect();
    assert!(failures.is_empty(), "{} seeds failed:\n\n{}", failures.len(), text.join("\n\n"));
}

// ------------------------------------------------------------------------------------------------
// Schedules
// ------------------------------------------------------------------------------------------------

/// One fault, applied to indices into the running members (in namespace order) when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    /// `side` (a minority) cannot talk to the others at all.
    Split { side: Vec<usize> },
    /// Everything `member` sends to the others is dropped; it still hears them.
    Mute { member: usize },
    /// Everything the others send to `member` is dropped; it still sends.
    Deaf { member: usize },
    /// TCP between `a` and `b` is dropped both ways; gossip flows.
    DataCut { a: usize, b: usize },
    /// TCP from `member` to the others is dropped; gossip flows.
    DataMute { member: usize },
    /// UDP to and from `member` is dropped; the data plane works.
    GossipCut { member: usize },
    /// SIGSTOP, then SIGCONT.
    Stall { member: usize },
    /// SIGKILL, then a new process with the same node id.
    Kill { member: usize },
    /// SIGTERM, then a new member with a new node id in the same namespace.
    Leave { member: usize },
    /// A new member in a new namespace.
    Join,
}

/// How many kinds of [`Fault`] there are.
const KINDS: u64 = 10;

/// One step: a fault held for `hold`, healed, settled, then `rest` before the next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    fault: Fault,
    hold: Duration,
    rest: Duration,
}

/// A schedule drawn from a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Schedule {
    seed: u64,
    members: usize,
    backup_count: u8,
    steps: Vec<Step>,
}

impl Schedule {
    /// The schedule of `seed` (see the module's documentation).
    fn from_seed(seed: u64) -> Schedule {
        // Another stream than the in-process harness's, so that the same seed tries other things.
        let mut rng = Rng::new(seed ^ 0x6e65_746e_7300_0000);
        let members = if seed.is_multiple_of(5) { 5 } else { 3 };
        let backup_count = if members == 5 && rng.below(2) == 0 { 2 } else { 1 };
        let faults = rng.between(1, 3);
        let mut size = members;
        let mut steps = Vec::new();
        for i in 0..faults {
            let kind = if i == 0 { seed.wrapping_sub(1) % KINDS } else { rng.below(KINDS) };
            let pick = |rng: &mut Rng| rng.below(size as u64) as usize;
            let fault = match kind {
                0 => {
                    let count = rng.between(1, (size as u64 - 1) / 2) as usize;
                    let mut side: Vec<usize> = Vec::new();
                    while side.len() < count {
                        let m = pick(&mut rng);
                        if !side.contains(&m) {
                            side.push(m);
                        }
                    }
                    side.sort();
                    Fault::Split { side }
                }
                1 => Fault::Mute { member: pick(&mut rng) },
                2 => Fault::Deaf { member: pick(&mut rng) },
                3 => {
                    let a = pick(&mut rng);
                    let b = (a + 1 + rng.below(size as u64 - 1) as usize) % size;
                    Fault::DataCut { a, b }
                }
                4 => Fault::DataMute { member: pick(&mut rng) },
                5 => Fault::GossipCut { member: pick(&mut rng) },
                6 => Fault::Stall { member: pick(&mut rng) },
                7 => Fault::Kill { member: pick(&mut rng) },
                8 => Fault::Leave { member: pick(&mut rng) },
                _ => Fault::Join,
            };
            if fault == Fault::Join {
                if size >= SLOTS {
                    continue;
                }
                size += 1;
            }
            let hold = Duration::from_millis(rng.between(500, 2_500));
            let rest = Duration::from_millis(rng.between(100, 800));
            steps.push(Step { fault, hold, rest });
        }
        Schedule { seed, members, backup_count, steps }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}: {} members, backup_count {}", self.seed, self.members, self.backup_count)?;
        for step in &self.steps {
            write!(f, "; {:?} for {:?}, rest {:?}", step.fault, step.hold, step.rest)?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// The lab: namespaces on a bridge, and cuts
// ------------------------------------------------------------------------------------------------

/// Which direction of a member's traffic with some peers a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Both,
    In,
    Out,
}

/// Which traffic a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plane {
    /// TCP and UDP.
    All,
    /// TCP: the data plane.
    Data,
    /// UDP: gossip.
    Gossip,
}

/// One member namespace and its address.
struct SlotNet {
    ns: String,
    ip: String,
}

/// [`SLOTS`] member namespaces on a bridge in a namespace of its own, and a veth from the host to
/// the bridge. Dropping it removes them.
struct Lab {
    switch: String,
    host_veth: String,
    slots: Vec<SlotNet>,
    /// Where the logs of failed seeds are kept.
    log_root: PathBuf,
}

impl Lab {
    /// Builds the lab; [`main`] checked that this host can.
    fn create() -> Lab {
        let pid = std::process::id();
        let prefix = format!("gv{pid}z");
        let octet = free_octet(pid, LAB_SLOT);
        let base = 16 * u32::from(LAB_SLOT);
        let subnet = |host: u32| format!("10.213.{octet}.{}", base + host);
        let lab = Lab {
            switch: format!("{prefix}s"),
            host_veth: format!("{prefix}h"),
            slots: (1..=SLOTS).map(|i| SlotNet { ns: format!("{prefix}n{i}"), ip: subnet(i as u32) }).collect(),
            log_root: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-netns-{pid}")),
        };
        lab.remove_network();
        let host_ip = format!("{}/28", subnet(14));
        let members: Vec<(&str, &str)> = lab.slots.iter().map(|s| (s.ns.as_str(), s.ip.as_str())).collect();
        build_bridge_lab(&lab.switch, &lab.host_veth, &host_ip, &members);
        let sw = lab.switch.as_str();
        eprintln!(
            "faults_netns: host {} ({host_ip}) to the bridge in {sw}; namespaces {}",
            lab.host_veth,
            lab.slots.iter().map(|s| format!("{}@{}", s.ip, s.ns)).collect::<Vec<_>>().join(" ")
        );
        lab
    }

    /// Drops the traffic of the member in `slot` with the members in `peers`, in `direction`, of
    /// `plane`, with a table in its namespace.
    fn cut(&self, slot: usize, peers: &[usize], direction: Direction, plane: Plane) -> Result<(), String> {
        let addresses = peers.iter().map(|p| self.slots[*p].ip.as_str()).collect::<Vec<_>>().join(", ");
        let only = match plane {
            Plane::All => None,
            Plane::Data => Some("meta l4proto tcp"),
            Plane::Gossip => Some("meta l4proto udp"),
        };
        let input = matches!(direction, Direction::Both | Direction::In);
        let output = matches!(direction, Direction::Both | Direction::Out);
        nft(&self.slots[slot].ns, &drop_table(NFT_TABLE, &addresses, input, output, only))
    }

    /// Removes any cut of the member in `slot`.
    fn heal(&self, slot: usize) {
        quiet("ip", &["netns", "exec", &self.slots[slot].ns, "nft", "delete", "table", "inet", NFT_TABLE]);
    }

    fn remove_network(&self) {
        remove_bridge_lab(&self.switch, &self.host_veth, self.slots.iter().map(|s| s.ns.as_str()));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove_network();
    }
}

// ------------------------------------------------------------------------------------------------
// Members
// ------------------------------------------------------------------------------------------------

/// A time span `(from, until)`, `until` open while it lasts.
type Span = (Instant, Option<Instant>);

/// How the harness ended a process on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Killed,
    Left,
}

/// One process of a member (a member restarted with the same node id is a new incarnation).
struct Incarnation {
    node_id: String,
    slot: usize,
    ip: String,
    pid: u32,
    child: Mutex<Option<Child>>,
    log: PathBuf,
    /// SIGSTOPped right now.
    stalled: AtomicBool,
    /// Counted as a minority until then (set at SIGCONT).
    suspect_until: Mutex<Option<Instant>>,
    /// On the smaller side of a `Split` right now: a minority whatever its view says (members
    /// of the other side are declared dead one at a time, so for a moment its view can still
    /// count more than half of the cluster while it can reach only its own side).
    cut_off: AtomicBool,
    /// When its view held at most half of the running members (see the module's documentation).
    minority: Mutex<Vec<Span>>,
    /// Polls its watcher completed.
    polls: AtomicUsize,
    /// Set when the harness ends it: its watcher stops, and clients no longer use it.
    ending: Mutex<Option<Ending>>,
    /// Its exit status, once reaped.
    exit: Mutex<Option<ExitStatus>>,
}

impl Incarnation {
    fn url(&self, path: &str) -> String {
        format!("http://{}:{ADMIN_PORT}{path}", self.ip)
    }

    /// Whether its view was a minority at any moment of `from..=until` (with a little slack: an
    /// owner applies a write a moment before its caller hears back).
    fn minority_during(&self, from: Instant, until: Instant) -> bool {
        let from = from.checked_sub(Duration::from_millis(50)).unwrap_or(from);
        self.minority.lock().unwrap().iter().any(|(start, end)| *start <= until && end.is_none_or(|e| e >= from))
    }

    /// `None` while the process runs, else its exit status (reaping it).
    fn exited(&self) -> Option<ExitStatus> {
        if let Some(status) = *self.exit.lock().unwrap() {
            return Some(status);
        }
        let mut child = self.child.lock().unwrap();
        let status = child.as_mut()?.try_wait().expect("try_wait")?;
        *self.exit.lock().unwrap() = Some(status);
        *child = None;
        Some(status)
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`) with kill(1).
    fn signal(&self, signal: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .status()
            .map_err(|e| format!("kill cannot run: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("kill -s {signal} {} ({}) failed", self.pid, self.node_id)) }
    }

    /// SIGKILL and reap.
    fn kill(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let status = c.wait().ok();
            *self.exit.lock().unwrap() = status;
        }
        *self.exit.lock().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The previous value an acknowledged change returned (`Some(None)`: the key was absent); `None`
/// when the change was not acknowledged.
type Previous = Option<Option<u64>>;

/// One operation as a client saw it.
struct Recorded {
    /// `Op::minority` is decided at the end, when the watchers have stopped: a span is only known
    /// once a later poll showed it.
    op: Op,
    previous: Previous,
    /// The answer (status and body, or the error), for reports.
    answer: String,
    /// The process it went through.
    via: Arc<Incarnation>,
}

/// What clients, watchers and the harness share.
#[derive(Default)]
struct Shared {
    /// The processes clients may use.
    routable: Mutex<Vec<Arc<Incarnation>>>,
    /// Processes meant to be running: the cluster's size for the minority test.
    alive: AtomicUsize,
    stop_clients: AtomicBool,
    stop_watchers: AtomicBool,
    /// Every operation.
    ops: Mutex<Vec<Recorded>>,
    count: AtomicUsize,
    /// Answers no operation should get (a bug of the harness or of a member).
    anomalies: Mutex<Vec<String>>,
}

/// An HTTP client that never uses a proxy, opens a new connection per request (a refused
/// connection then certainly did nothing) and returns every status as a reply.
fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .timeout_connect(Some(Duration::from_secs(1)))
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .max_idle_connections(0)
        .build();
    ureq::Agent::new_with_config(config)
}

/// GET `url` as JSON (any status): the status and the document.
fn get_json(agent: &ureq::Agent, url: &str) -> Result<(u16, Value), String> {
    let mut response = agent.get(url).call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    let value = serde_json::from_str(&text).map_err(|e| format!("GET {url}: {status}, not JSON ({e}): {text}"))?;
    Ok((status, value))
}

/// Polls `inc`'s `/health` until it ends, recording its minority spans.
fn watch(shared: Arc<Shared>, inc: Arc<Incarnation>, started: Instant) {
    let agent = agent(Duration::from_secs(1));
    // A member that just started sees only itself.
    inc.minority.lock().unwrap().push((started, None));
    // The send time of the last poll that showed a majority.
    let mut majority_sent: Option<Instant> = None;
    while inc.ending.lock().unwrap().is_none() && !shared.stop_watchers.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let forced = inc.stalled.load(Ordering::SeqCst)
            || inc.cut_off.load(Ordering::SeqCst)
            || inc.suspect_until.lock().unwrap().is_some_and(|until| sent < until);
        let members = get_json(&agent, &inc.url("/health")).ok().and_then(|(_, v)| v["members"].as_u64());
        let alive = shared.alive.load(Ordering::SeqCst) as u64;
        let minority = forced || members.is_none_or(|m| m * 2 <= alive);
        {
            let mut spans = inc.minority.lock().unwrap();
            let open = spans.last().is_some_and(|(_, end)| end.is_none());
            if !minority && open {
                spans.last_mut().expect("open span").1 = Some(Instant::now());
            } else if minority && !open {
                // From the last poll that showed a majority: the view may have changed right after.
                spans.push((majority_sent.unwrap_or(sent), None));
            }
        }
        if !minority {
            majority_sent = Some(sent);
        }
        inc.polls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// One client until `stop_clients`: puts and removes on shared and own keys through random
/// running members, each recorded.
fn client(id: u32, shared: Arc<Shared>, seed: u64) {
    let agent = agent(DATA_TIMEOUT);
    let mut rng = Rng::new(seed ^ (u64::from(id) << 32) ^ 0x636c_6965_6e74);
    let mut seq = 0u64;
    while !shared.stop_clients.load(Ordering::Relaxed) {
        let routable = shared.routable.lock().unwrap().clone();
        if routable.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let inc = routable[rng.below(routable.len() as u64) as usize].clone();
        if inc.stalled.load(Ordering::SeqCst) && rng.below(4) != 0 {
            // Mostly avoid waiting on a frozen member, but sometimes do.
            std::thread::sleep(CLIENT_PAUSE);
            continue;
        }
        let key = if rng.below(4) == 0 {
            SHARED_KEYS + id * 1_000 + rng.below(8) as u32
        } else {
            rng.below(u64::from(SHARED_KEYS)) as u32
        };
        seq += 1;
        let value = (rng.below(5) != 0).then_some((u64::from(id) << 40) | seq);
        let invoked = Instant::now();
        let (outcome, previous, answer) = operate(&agent, &inc, key, value, &shared);
        let completed = Instant::now();
        let via = inc.node_id.clone();
        let op = Op { key, value, invoked, completed, outcome, minority: false, via };
        shared.ops.lock().unwrap().push(Recorded { op, previous, answer, via: inc });
        shared.count.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(CLIENT_PAUSE);
    }
}

/// Puts `value` (or removes, `None`) at `key` through `inc`: what the client knows of the outcome,
/// and for an acknowledged change the previous value it returned.
fn operate(
    agent: &ureq::Agent,
    inc: &Incarnation,
    key: u32,
    value: Option<u64>,
    shared: &Shared,
) -> (Outcome, Previous, String) {
    let url = inc.url(&format!("/maps/{MAP}/entries/{key}"));
    let what = if value.is_some() { "PUT" } else { "DELETE" };
    let result = match value {
        Some(v) => agent.put(&url).send(v.to_string()),
        None => agent.delete(&url).call(),
    };
    let mut response = match result {
        Ok(response) => response,
        Err(e) => return (error_outcome(&e), None, format!("error: {e}")),
    };
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string();
    let answer = format!("{status} {}", body.as_deref().unwrap_or("(body cut)"));
    match (status, body) {
        (200, Ok(body)) => {
            let previous = serde_json::from_str::<Value>(&body).ok().and_then(|v| match &v["previous"] {
                Value::Null => Some(None),
                Value::String(p) => p.parse::<u64>().ok().map(Some),
                _ => None,
            });
            if previous.is_none() {
                shared.anomalies.lock().unwrap().push(format!("{what} {url}: 200 with an unexpected body {body}"));
            }
            (Outcome::Ok, previous, answer)
        }
        // Answered, but the body was cut: acknowledged, previous value unknown.
        (200, Err(_)) => (Outcome::Ok, None, answer),
        (502, _) => (Outcome::Unknown, None, answer),
        (409 | 503 | 504, _) => (Outcome::Failed, None, answer),
        _ => {
            shared.anomalies.lock().unwrap().push(format!("{what} {url}: {answer}"));
            (Outcome::Unknown, None, answer)
        }
    }
}

/// The outcome of a request that got no answer: failed if the connection was never made (the
/// request was not sent), else unknown.
fn error_outcome(error: &ureq::Error) -> Outcome {
    use std::io::ErrorKind;
    match error {
        ureq::Error::Io(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
            ) =>
        {
            Outcome::Failed
        }
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

// ------------------------------------------------------------------------------------------------
// A run
// ------------------------------------------------------------------------------------------------

/// What the checks of one seed found (when they passed).
#[derive(Debug, Default)]
struct Checked {
    /// Previous values returned by acknowledged changes, checked against the history.
    observations: usize,
    /// Of those, how many showed that a minority side's acknowledged change was lost.
    minority_skipped: usize,
    /// Keys whose final state shows that a minority side's acknowledged change was lost.
    minority_losses: usize,
}

/// The result of one seed.
#[derive(Debug)]
struct Report {
    ops: usize,
    acknowledged: usize,
    unknown: usize,
    /// Acknowledged through a member in a minority.
    minority_acknowledged: usize,
    observations: usize,
    minority_losses: usize,
    minority_skipped: usize,
    elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} operations ({} acknowledged, {} of them through a minority, {} unknown), {} previous values checked \
             ({} skipped a lost minority write), {} keys' final state lost a minority write, in {:?}",
            self.ops,
            self.acknowledged,
            self.minority_acknowledged,
            self.unknown,
            self.observations,
            self.minority_skipped,
            self.minority_losses,
            self.elapsed
        )
    }
}

/// One seed's cluster and history.
struct Run<'a> {
    lab: &'a Lab,
    schedule: &'a Schedule,
    cluster: String,
    env: Vec<(String, String)>,
    shared: Arc<Shared>,
    /// Every process started, in order.
    every: Vec<Arc<Incarnation>>,
    /// Namespaces used so far (their addresses are the members' `--members`).
    used: BTreeSet<usize>,
    log_dir: PathBuf,
    /// What happened when, for the report.
    events: Vec<String>,
    clients: Vec<JoinHandle<()>>,
    watchers: Vec<JoinHandle<()>>,
}

/// Milliseconds since the harness's epoch, and the wall clock (members log UTC times).
fn now_label() -> String {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{} ms (unix {}.{:03})", epoch().elapsed().as_millis(), unix.as_secs(), unix.subsec_millis())
}

impl Run<'_> {
    fn event(&mut self, what: String) {
        let line = format!("{}: {what}", now_label());
        eprintln!("faults_netns seed {}: {line}", self.schedule.seed);
        self.events.push(line);
    }

    /// The running members clients use, in namespace order.
    fn live(&self) -> Vec<Arc<Incarnation>> {
        let mut live = self.shared.routable.lock().unwrap().clone();
        live.sort_by_key(|i| i.slot);
        live
    }

    /// Starts `node_id` in namespace `slot`, its log (stderr) going to a file.
    fn start(&mut self, slot: usize, node_id: &str) -> Arc<Incarnation> {
        self.used.insert(slot);
        let net = &self.lab.slots[slot];
        let members: Vec<String> = self.used.iter().map(|s| format!("{}:{PORT}", self.lab.slots[*s].ip)).collect();
        let log = self.log_dir.join(format!("{}-{node_id}.log", self.every.len() + 1));
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.ns, BIN, "start"]);
        command.args(["--cluster-name", &self.cluster, "--bind", &net.ip, "--members", &members.join(",")]);
        command.args(["--node-id", node_id, "--port", &PORT.to_string(), "--admin-port", &ADMIN_PORT.to_string()]);
        for (key, _) in std::env::vars() {
            if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let file = File::create(&log).expect("log file");
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        // `ip netns exec` execs the command: the child is the member itself.
        let child = command.spawn().expect("ip netns exec grapevine starts");
        let started = Instant::now();
        let inc = Arc::new(Incarnation {
            node_id: node_id.to_string(),
            slot,
            ip: net.ip.clone(),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            log,
            stalled: AtomicBool::new(false),
            suspect_until: Mutex::new(None),
            cut_off: AtomicBool::new(false),
            minority: Mutex::new(Vec::new()),
            polls: AtomicUsize::new(0),
            ending: Mutex::new(None),
            exit: Mutex::new(None),
        });
        self.every.push(inc.clone());
        self.shared.alive.fetch_add(1, Ordering::SeqCst);
        self.shared.routable.lock().unwrap().push(inc.clone());
        let (shared, watched) = (self.shared.clone(), inc.clone());
        self.watchers.push(std::thread::spawn(move || watch(shared, watched, started)));
        self.event(format!("started {node_id} (pid {}) in {} at {}", inc.pid, net.ns, net.ip));
        inc
    }

    /// Ends `inc` on purpose: clients stop using it and it no longer counts as running.
    fn retire(&self, inc: &Arc<Incarnation>, ending: Ending) {
        *inc.ending.lock().unwrap() = Some(ending);
        self.shared.routable.lock().unwrap().retain(|i| !Arc::ptr_eq(i, inc));
    }

    /// An error naming every process that exited without the harness ending it.
    fn unexpected_exits(&self) -> Result<(), String> {
        let mut exits = Vec::new();
        for inc in &self.every {
            if inc.ending.lock().unwrap().is_some() {
                continue;
            }
            if let Some(status) = inc.exited() {
                exits.push(format!("{} (pid {}) exited on its own with {status}", inc.node_id, inc.pid));
            }
        }
        if exits.is_empty() { Ok(()) } else { Err(exits.join("; ")) }
    }

    /// Waits until the cluster settled (see the module's documentation); how long it took.
    fn settle(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let admin = agent(ADMIN_TIMEOUT);
        loop {
            self.unexpected_exits()?;
            match self.settled(&admin) {
                Ok(()) => return Ok(started.elapsed()),
                Err(last) if started.elapsed() > SETTLE_TIMEOUT => {
                    return Err(format!("not settled after {SETTLE_TIMEOUT:?}; last seen: {last}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether the running members settled; what is missing if not.
    fn settled(&self, admin: &ureq::Agent) -> Result<(), String> {
        let live = self.live();
        let expected: BTreeSet<&str> = live.iter().map(|i| i.node_id.as_str()).collect();
        let mut first: Option<(String, Value)> = None;
        for inc in &live {
            let who = &inc.node_id;
            let (status, health) = get_json(admin, &inc.url("/health"))?;
            if status != 200 {
                return Err(format!("{who}: /health {status} {health}"));
            }
            let (_, stats) = get_json(admin, &inc.url("/stats"))?;
            let members = stats["members"].as_array().ok_or_else(|| format!("{who}: no members in /stats"))?;
            let seen: BTreeSet<&str> = members.iter().filter_map(|m| m["node_id"].as_str()).collect();
            if seen != expected {
                return Err(format!("{who} sees {seen:?}, expected {expected:?}"));
            }
            if let Some(m) = members.iter().find(|m| m["state"] != "active") {
                return Err(format!("{who} sees {} {}", m["node_id"], m["state"]));
            }
            if stats["excluded"].as_array().is_none_or(|e| !e.is_empty()) {
                return Err(format!("{who} excludes {}", stats["excluded"]));
            }
            if stats["local"]["settled"] != true {
                return Err(format!("{who}: replication not settled"));
            }
            let p = &stats["partitions"];
            if p["migrating"].as_u64() != Some(0) {
                return Err(format!("{who}: migrating {}", p["migrating"]));
            }
            let table = serde_json::json!({
                "master": stats["master"],
                "epoch": p["epoch"],
                "owned": p["owned_by_member"],
                "backups": p["backups_by_member"],
            });
            match &first {
                None => first = Some((who.clone(), table)),
                Some((other, reference)) if *reference != table => {
                    return Err(format!("{other} holds {reference}, {who} holds {table}"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Waits until clients completed `n` more operations.
    fn wait_ops(&self, n: usize) -> Result<(), String> {
        let target = self.shared.count.load(Ordering::Relaxed) + n;
        let started = Instant::now();
        while self.shared.count.load(Ordering::Relaxed) < target {
            if started.elapsed() > PROGRESS_TIMEOUT {
                return Err(format!("the clients made no progress for {PROGRESS_TIMEOUT:?}"));
            }
            self.unexpected_exits()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Each running member's view size and master, for the report.
    fn views(&self) -> String {
        let admin = agent(Duration::from_secs(1));
        self.live()
            .iter()
            .map(|inc| match get_json(&admin, &inc.url("/health")) {
                Ok((status, v)) => format!("{} sees {} (master {}, {status})", inc.node_id, v["members"], v["master"]),
                Err(_) => format!("{} does not answer", inc.node_id),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Applies `step`'s fault, holds it and heals it.
    fn apply(&mut self, step: &Step) -> Result<(), String> {
        let live = self.live();
        let n = live.len();
        let at = |i: usize| live[i % n].clone();
        let others = |i: usize| -> Vec<usize> { live.iter().map(|l| l.slot).filter(|s| *s != at(i).slot).collect() };
        let cut = |run: &mut Run, slots: Vec<(usize, Vec<usize>)>, direction, plane| -> Result<(), String> {
            for (slot, peers) in &slots {
                run.lab.cut(*slot, peers, direction, plane)?;
            }
            let names: Vec<String> = slots
                .iter()
                .map(|(s, p)| {
                    let name = |s: &usize| live.iter().find(|l| l.slot == *s).map_or("?", |l| l.node_id.as_str());
                    format!("{} from {:?}", name(s), p.iter().map(name).collect::<Vec<_>>())
                })
                .collect();
            run.event(format!("cut {} ({direction:?}, {plane:?})", names.join("; ")));
            std::thread::sleep(step.hold);
            let seen = run.views();
            for (slot, _) in &slots {
                run.lab.heal(*slot);
            }
            run.event(format!("healed; before the heal: {seen}"));
            Ok(())
        };
        match &step.fault {
            Fault::Split { side } => {
                let side: BTreeSet<usize> = side.iter().map(|i| at(*i).slot).collect();
                let rest: Vec<usize> = live.iter().map(|l| l.slot).filter(|s| !side.contains(s)).collect();
                let slots = side.iter().map(|s| (*s, rest.clone())).collect();
                let cut_off: Vec<Arc<Incarnation>> = live.iter().filter(|l| side.contains(&l.slot)).cloned().collect();
                cut_off.iter().for_each(|inc| inc.cut_off.store(true, Ordering::SeqCst));
                let result = cut(self, slots, Direction::Both, Plane::All);
                cut_off.iter().for_each(|inc| inc.cut_off.store(false, Ordering::SeqCst));
                result?;
            }
            Fault::Mute { member } => cut(self, vec![(at(*member).slot, others(*member))], Direction::Out, Plane::All)?,
            Fault::Deaf { member } => cut(self, vec![(at(*member).slot, others(*member))], Direction::In, Plane::All)?,
            Fault::DataCut { a, b } => {
                let (a, mut b) = (at(*a), at(*b));
                if a.slot == b.slot {
                    b = live.iter().find(|l| l.slot != a.slot).expect("two members").clone();
                }
                cut(self, vec![(a.slot, vec![b.slot])], Direction::Both, Plane::Data)?;
            }
            Fault::DataMute { member } => {
                cut(self, vec![(at(*member).slot, others(*member))], Direction::Out, Plane::Data)?;
            }
            Fault::GossipCut { member } => {
                cut(self, vec![(at(*member).slot, others(*member))], Direction::Both, Plane::Gossip)?;
            }
            Fault::Stall { member } => {
                let inc = at(*member);
                inc.stalled.store(true, Ordering::SeqCst);
                inc.signal("STOP")?;
                self.event(format!("SIGSTOP {}", inc.node_id));
                std::thread::sleep(step.hold);
                let seen = self.views();
                inc.signal("CONT")?;
                *inc.suspect_until.lock().unwrap() = Some(Instant::now() + WAKE_SUSPECT);
                inc.stalled.store(false, Ordering::SeqCst);
                self.event(format!("SIGCONT {}; while it was stopped: {seen}", inc.node_id));
            }
            Fault::Kill { member } => {
                let inc = at(*member);
                self.shared.alive.fetch_sub(1, Ordering::SeqCst);
                self.retire(&inc, Ending::Killed);
                let status = inc.kill();
                self.event(format!("SIGKILL {}: {status:?}", inc.node_id));
                std::thread::sleep(step.hold);
                let seen = self.views();
                self.event(format!("before the restart: {seen}"));
                self.start(inc.slot, &inc.node_id.clone());
            }
            Fault::Leave { member } => {
                let inc = at(*member);
                self.shared.alive.fetch_sub(1, Ordering::SeqCst);
                inc.signal("TERM")?;
                self.event(format!("SIGTERM {}", inc.node_id));
                // Clients keep using it while it leaves, as they would.
                let deadline = Instant::now() + Duration::from_secs(20);
                let status = loop {
                    if let Some(status) = inc.exited() {
                        break Some(status);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                self.retire(&inc, Ending::Left);
                let Some(status) = status else {
                    inc.kill();
                    return Err(format!("{} did not exit within 20 s of SIGTERM", inc.node_id));
                };
                self.event(format!("{} left: {status}", inc.node_id));
                std::thread::sleep(step.hold);
                let node_id = format!("n{}r{}", inc.slot + 1, self.every.len());
                self.start(inc.slot, &node_id);
            }
            Fault::Join => {
                let slot = (0..SLOTS).find(|s| !self.used.contains(s)).ok_or("no namespace left for a join")?;
                self.start(slot, &format!("n{}", slot + 1));
                std::thread::sleep(step.hold);
            }
        }
        Ok(())
    }

    /// The final check: reads every key the history touched through every running member and
    /// checks agreement, sizes and the history; returns how many keys lost a minority-side write.
    fn check(&self, recorded: &[Recorded]) -> Result<Checked, String> {
        let mut per_key: BTreeMap<u32, Vec<Op>> = BTreeMap::new();
        let mut answers: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        let mut observed: BTreeMap<u32, Vec<(usize, Option<u64>)>> = BTreeMap::new();
        for r in recorded {
            let ops = per_key.entry(r.op.key).or_default();
            if let Some(previous) = r.previous
                && !r.op.minority
            {
                observed.entry(r.op.key).or_default().push((ops.len(), previous));
            }
            ops.push(r.op.clone());
            answers.entry(r.op.key).or_default().push(&r.answer);
        }
        // The answers of the operations a problem names that were not acknowledged.
        let explain = |key: u32, problem: &str| -> String {
            let mut text = String::new();
            for (op, answer) in per_key[&key].iter().zip(&answers[&key]) {
                if op.outcome != Outcome::Ok && problem.contains(&format!("{op:?}")) {
                    let _ = write!(text, "\n    answer of {op:?}: {answer}");
                }
            }
            text
        };
        let mut checked = Checked::default();
        let mut problems = Vec::new();
        // Each acknowledged change saw the effect of a change that may have come last before it.
        for (key, seen) in &observed {
            let ops = &per_key[key];
            let mut lost = Vec::new();
            for (at, previous) in seen {
                checked.observations += 1;
                match check_observed(ops, *at, *previous, Model::Discard, &[]) {
                    Ok(minority_lost) => checked.minority_skipped += usize::from(minority_lost),
                    Err(e) => {
                        let why = explain(*key, &e);
                        lost.push(e + &why);
                    }
                }
            }
            if !lost.is_empty() {
                problems.push(format!(
                    "key {key}: {} acknowledged changes saw a state the history does not allow; the first ones:\n    {}",
                    lost.len(),
                    lost.iter().take(3).cloned().collect::<Vec<_>>().join("\n    ")
                ));
            }
        }
        let data = agent(DATA_TIMEOUT);
        let mut first: Option<(String, BTreeMap<u32, Option<u64>>)> = None;
        for inc in self.live() {
            let mut state = BTreeMap::new();
            for key in per_key.keys() {
                let url = inc.url(&format!("/maps/{MAP}/entries/{key}"));
                let read = data.get(&url).call().map_err(|e| format!("GET {url}: {e}")).and_then(|mut r| {
                    let status = r.status().as_u16();
                    Ok((status, r.body_mut().read_to_string().map_err(|e| format!("GET {url}: {e}"))?))
                });
                match read {
                    Ok((200, body)) => match body.parse::<u64>() {
                        Ok(v) => {
                            state.insert(*key, Some(v));
                        }
                        Err(_) => problems.push(format!("{} holds {body:?} at key {key}", inc.node_id)),
                    },
                    Ok((404, _)) => {
                        state.insert(*key, None);
                    }
                    Ok((status, body)) => {
                        problems.push(format!("reading {key} through {}: {status} {body}", inc.node_id))
                    }
                    Err(e) => problems.push(format!("reading {key} through {}: {e}", inc.node_id)),
                }
            }
            let present = state.values().filter(|v| v.is_some()).count() as u64;
            match get_json(&data, &inc.url(&format!("/maps/{MAP}/size"))) {
                Ok((200, v)) if v["size"].as_u64() == Some(present) => {}
                other => problems.push(format!("{}: size {other:?}, but {present} keys are present", inc.node_id)),
            }
            match &first {
                None => first = Some((inc.node_id.clone(), state)),
                Some((who, reference)) if *reference != state => {
                    let differ: Vec<String> = reference
                        .keys()
                        .filter(|k| reference.get(k) != state.get(k))
                        .take(5)
                        .map(|k| format!("{k}: {:?} vs {:?}", reference.get(k), state.get(k)))
                        .collect();
                    problems.push(format!("{} disagrees with {who} on keys {differ:?}", inc.node_id));
                }
                Some(_) => {}
            }
        }
        let state = first.map(|(_, s)| s).unwrap_or_default();
        for (key, ops) in &per_key {
            match check_key(ops, state.get(key).copied().flatten(), Model::Discard, &[]) {
                Ok(true) => checked.minority_losses += 1,
                Ok(false) => {}
                Err(e) => problems.push(format!(
                    "key {key} = {:?}: {e}{}",
                    state.get(key).copied().flatten(),
                    explain(*key, &e)
                )),
            }
        }
        if problems.is_empty() { Ok(checked) } else { Err(problems.join("\n")) }
    }

    /// Exit statuses and logs: killed processes died of SIGKILL, leavers exited with 0, the others
    /// still run, and no log holds a panic.
    fn check_processes(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for inc in &self.every {
            let ending = *inc.ending.lock().unwrap();
            let status = inc.exited();
            match (ending, status) {
                (None, None) => {}
                (Some(Ending::Killed), Some(s)) if s.signal() == Some(9) => {}
                (Some(Ending::Left), Some(s)) if s.success() => {}
                (ending, status) => {
                    problems.push(format!("{} (pid {}): ended {ending:?}, exit {status:?}", inc.node_id, inc.pid))
                }
            }
            for line in inc.log_text().lines().filter(|l| l.contains("panicked")).take(3) {
                problems.push(format!("{} panicked: {line}", inc.node_id));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
    }

    /// Runs the schedule; `Err` says what went wrong.
    fn execute(&mut self) -> Result<Report, String> {
        let started = Instant::now();
        // Started one after the other, so that the first is the oldest member (the master).
        for slot in 0..self.schedule.members {
            self.start(slot, &format!("n{}", slot + 1));
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            let admin = agent(ADMIN_TIMEOUT);
            loop {
                self.unexpected_exits()?;
                let views: Vec<Option<u64>> = self
                    .live()
                    .iter()
                    .map(|i| get_json(&admin, &i.url("/health")).ok().and_then(|(_, v)| v["members"].as_u64()))
                    .collect();
                if views.iter().all(|v| *v == Some(slot as u64 + 1)) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{} members did not see each other: {views:?}", slot + 1));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let took = self.settle().map_err(|e| format!("the cluster did not form: {e}"))?;
        self.event(format!("formed and settled ({took:?} to settle)"));
        for id in 0..CLIENTS {
            let (shared, seed) = (self.shared.clone(), self.schedule.seed);
            self.clients.push(std::thread::spawn(move || client(id, shared, seed)));
        }
        self.wait_ops(50)?;
        for step in &self.schedule.steps {
            self.event(format!("fault {:?} for {:?}", step.fault, step.hold));
            self.apply(step)?;
            let took = self.settle().map_err(|e| format!("after {:?}: {e}", step.fault))?;
            self.event(format!("settled after {:?} in {took:?}", step.fault));
            self.wait_ops(20)?;
            std::thread::sleep(step.rest);
        }
        self.shared.stop_clients.store(true, Ordering::Relaxed);
        for thread in self.clients.drain(..) {
            let _ = thread.join();
        }
        // One more poll of every watcher, so that the last operations' views are known.
        let live = self.live();
        let polls: Vec<usize> = live.iter().map(|i| i.polls.load(Ordering::SeqCst)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while live.iter().zip(&polls).any(|(i, p)| i.polls.load(Ordering::SeqCst) <= *p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shared.stop_watchers.store(true, Ordering::Relaxed);
        for thread in self.watchers.drain(..) {
            let _ = thread.join();
        }
        let took = self.settle().map_err(|e| format!("after the last step: {e}"))?;
        self.event(format!("clients stopped; settled in {took:?}"));
        let mut recorded = std::mem::take(&mut *self.shared.ops.lock().unwrap());
        for r in &mut recorded {
            r.op.minority = r.via.minority_during(r.op.invoked, r.op.completed);
        }
        let anomalies = self.shared.anomalies.lock().unwrap().clone();
        let mut problems = Vec::new();
        if !anomalies.is_empty() {
            problems.push(format!(
                "{} unexpected answers, the first ones:\n  {}",
                anomalies.len(),
                anomalies.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
            ));
        }
        let checked = self.check(&recorded);
        if let Err(e) = &checked {
            problems.push(e.clone());
        }
        if let Err(e) = self.check_processes() {
            problems.push(e);
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let checked = checked.unwrap_or_default();
        let count = |f: &dyn Fn(&Op) -> bool| recorded.iter().filter(|r| f(&r.op)).count();
        Ok(Report {
            ops: recorded.len(),
            acknowledged: count(&|o| o.outcome == Outcome::Ok),
            unknown: count(&|o| o.outcome == Outcome::Unknown),
            minority_acknowledged: count(&|o| o.outcome == Outcome::Ok && o.minority),
            observations: checked.observations,
            minority_losses: checked.minority_losses,
            minority_skipped: checked.minority_skipped,
            elapsed: started.elapsed(),
        })
    }

    /// Stops every process and thread, and removes the cuts.
    fn teardown(&mut self) {
        self.shared.stop_clients.store(true, Ordering::Relaxed);
        self.shared.stop_watchers.store(true, Ordering::Relaxed);
        for inc in &self.every {
            if inc.ending.lock().unwrap().is_none() {
                // A stalled process dies of SIGKILL too.
                inc.kill();
            }
        }
        for thread in self.clients.drain(..).chain(self.watchers.drain(..)) {
            let _ = thread.join();
        }
        for slot in 0..SLOTS {
            self.lab.heal(slot);
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Runs `schedule` on `lab`; `Err` is the full report of a failure.
fn run(lab: &Lab, schedule: &Schedule) -> Result<Report, String> {
    let pid = std::process::id();
    let log_dir = lab.log_root.join(format!("seed-{}", schedule.seed));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir).expect("log directory");
    let mut run = Run {
        lab,
        schedule,
        cluster: format!("faults-{pid}-{}", schedule.seed),
        env: member_env(schedule.backup_count),
        shared: Arc::new(Shared::default()),
        every: Vec::new(),
        used: BTreeSet::new(),
        log_dir: log_dir.clone(),
        events: Vec::new(),
        clients: Vec::new(),
        watchers: Vec::new(),
    };
    let outcome = run.execute();
    run.teardown();
    match outcome {
        Ok(report) => {
            let _ = std::fs::remove_dir_all(&log_dir);
            Ok(report)
        }
        Err(problems) => {
            let mut text = format!(
                "faults_netns: {schedule}\n{problems}\nreplay with: GRAPEVINE_NETNS_SEED={} cargo test -p grapevine-bin \
                 --test faults_netns (add GRAPEVINE_NETNS_RUST_LOG=info,grapevine_map=debug for the members' debug \
                 logs)\nwhat happened:\n  {}\n",
                schedule.seed,
                run.events.join("\n  ")
            );
            for inc in &run.every {
                let log = inc.log_text();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                let _ = writeln!(
                    text,
                    "----- last {} lines of {} (pid {}, {}) -----\n{}",
                    tail.len(),
                    inc.node_id,
                    inc.pid,
                    inc.log.display(),
                    tail.join("\n")
                );
            }
            let _ = writeln!(text, "----- logs kept in {} -----", log_dir.display());
            Err(text)
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The schedules themselves
// ------------------------------------------------------------------------------------------------

fn kind(fault: &Fault) -> String {
    format!("{fault:?}").split([' ', '{']).next().unwrap_or_default().to_string()
}

fn schedules_are_reproducible_and_the_default_seeds_try_every_kind_of_fault() {
    assert_eq!(Schedule::from_seed(7), Schedule::from_seed(7));
    let defaults: Vec<Schedule> = (1..=10).map(Schedule::from_seed).collect();
    let kinds: BTreeSet<String> = defaults.iter().flat_map(|s| s.steps.iter().map(|st| kind(&st.fault))).collect();
    assert_eq!(kinds.len(), KINDS as usize, "every kind of fault is drawn by seeds 1 to 10: {kinds:?}");
    assert!(defaults.iter().any(|s| s.members == 5), "seeds 1 to 10 include a 5-member cluster");
    for schedule in (1..500).map(Schedule::from_seed) {
        assert!(!schedule.steps.is_empty() && schedule.steps.len() <= 3, "{schedule}");
        let mut size = schedule.members;
        for step in &schedule.steps {
            if let Fault::Split { side } = &step.fault {
                assert!(!side.is_empty() && side.len() * 2 < size, "a split cuts a minority off: {schedule}");
            }
            if let Fault::DataCut { a, b } = &step.fault {
                assert_ne!(a, b, "{schedule}");
            }
            if step.fault == Fault::Join {
                size += 1;
            }
            assert!(size <= SLOTS, "{schedule}");
        }
    }
}
