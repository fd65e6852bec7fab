//! The failover drill: `session-demo` instances behind `haproxy` (round robin, no session
//! affinity, health checks on `/health`), client sessions that keep incrementing their counters
//! through haproxy, and the operations of a cluster's life while they do:
//!
//! 1. **steady**: three instances, nothing happens (the baseline);
//! 2. **kill -9**: one instance is killed with SIGKILL (failed requests are reported here: the
//!    requests it was serving die with it);
//! 3. **restart killed**: it is started again and rejoins;
//! 4. **rolling restart**: each instance in turn gets SIGTERM (it drains from the balancer,
//!    leaves the cluster, exits 0), is started again, and the drill waits until it has joined,
//!    is healthy and back in the balancer before the next;
//! 5. **scale out and in**: a fourth instance is added, then the first one removed (SIGTERM).
//!
//! Each request is counted in the phase during which it was sent, and a failed one in the phase
//! during which it failed. **Sessions lost**: a request
//! that finds its user logged out (401), that answers for another user, or whose counter is not
//! the next one. A request without an answer from the service (transport error, or an error that
//! haproxy generated: no `x-served-by` header) may or may not have been applied, so after `k`
//! such requests the next counter may be up to `k` higher. **Longest gap**: the longest time a
//! session waited between two successful answers (it includes the client's pause between
//! requests). Expectations: no session lost in any phase, no failed request outside the kill.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::harness::{self, Answer, FAST_TIMERS, Haproxy, Instance, SessionClient, wait_for_members, wait_until};

/// How long an instance may take to start and become healthy.
const START_WAIT: Duration = Duration::from_secs(60);
/// How long members may take to agree on a membership change.
const VIEW_WAIT: Duration = Duration::from_secs(30);
/// How long a stopped instance may take to exit (drain and leave included).
const EXIT_WAIT: Duration = Duration::from_secs(60);
/// How long haproxy may take to see a server change state.
const BALANCER_WAIT: Duration = Duration::from_secs(15);
/// A client request's timeout (a request that takes longer counts as failed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Failure and loss examples kept per phase.
const SAMPLES: usize = 12;
/// A bound on the requests of one client, whatever the phases take.
const REQUESTS_PER_CLIENT_MAX: u64 = 100_000;

/// What to run and how.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The `session-demo` binary.
    pub demo_bin: PathBuf,
    /// The `haproxy` binary.
    pub haproxy_bin: PathBuf,
    /// Logs and the haproxy configuration go here (emptied first).
    pub work_dir: PathBuf,
    /// Client sessions in parallel. Default 24.
    pub sessions: usize,
    /// Each client's pause between two requests. Default 50 ms.
    pub pause: Duration,
    /// The instances' `--drain-ms`. Default 1 s: five times haproxy's check interval.
    pub drain: Duration,
    /// Traffic time after each step, with nothing changing. Default 1 s.
    pub settle: Duration,
}

impl DrillOptions {
    /// The defaults, for these binaries and directory.
    pub fn new(demo_bin: PathBuf, haproxy_bin: PathBuf, work_dir: PathBuf) -> DrillOptions {
        DrillOptions {
            demo_bin,
            haproxy_bin,
            work_dir,
            sessions: 24,
            pause: Duration::from_millis(50),
            drain: Duration::from_secs(1),
            settle: Duration::from_secs(1),
        }
    }
}

/// The figures of one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    /// The phase.
    pub name: String,
    /// Whether failed requests are expected (the kill).
    pub failures_expected: bool,
    /// How long the phase lasted, in ms.
    pub duration_ms: u64,
    /// Requests sent.
    pub requests: u64,
    /// Requests without a successful answer (errors, timeouts, 5xx).
    pub failed: u64,
    /// The longest wait of a session between two successful answers, in ms.
    pub longest_gap_ms: u64,
    /// Requests that found their session lost (logged out, another user, a wrong counter).
    pub sessions_lost: u64,
    /// Successful answers per instance (`x-served-by`).
    pub served_by: BTreeMap<String, u64>,
    /// The first failed requests, with the time since the drill's start.
    pub failure_samples: Vec<String>,
    /// The first lost sessions, with the time since the drill's start.
    pub loss_samples: Vec<String>,
}

/// What the drill saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Client sessions.
    pub sessions: usize,
    /// Each client's pause between requests, in ms.
    pub pause_ms: u64,
    /// The instances' drain period, in ms.
    pub drain_ms: u64,
    /// The phases, in order.
    pub phases: Vec<PhaseReport>,
    /// Sessions that were served by more than one instance (no affinity: all of them).
    pub sessions_on_several_instances: usize,
    /// Steps and their timings, and every change of a server's state in the balancer.
    pub timeline: Vec<String>,
    /// Health checks that failed while the drill was not stopping the server (its `/health`
    /// answered 503, or did not answer): `UP -> UP 1/2` is one failed check, `-> DOWN` took it
    /// out. Not an expectation, but worth a look.
    pub balancer_flaps: Vec<String>,
    /// Problems the drill's own steps saw (an instance that exited before the balancer took it
    /// out, a non-zero exit status).
    pub step_problems: Vec<String>,
    /// Where the logs are.
    pub work_dir: PathBuf,
}

impl Report {
    /// Every expectation that does not hold; empty when the drill passed.
    pub fn violations(&self) -> Vec<String> {
        let mut out = self.step_problems.clone();
        for p in &self.phases {
            if p.sessions_lost > 0 {
                out.push(format!("{}: {} sessions lost", p.name, p.sessions_lost));
            }
            if p.failed > 0 && !p.failures_expected {
                out.push(format!("{}: {} failed requests", p.name, p.failed));
            }
            if p.requests == 0 {
                out.push(format!("{}: no request was sent", p.name));
            }
        }
        if self.sessions_on_several_instances < self.sessions {
            out.push(format!(
                "only {} of {} sessions were served by more than one instance: is the balancer sticky?",
                self.sessions_on_several_instances, self.sessions
            ));
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "session failover drill: {} sessions through haproxy (round robin, no affinity), {} ms between requests, drain {} ms",
            self.sessions, self.pause_ms, self.drain_ms
        )?;
        writeln!(
            f,
            "{:<18} {:>8} {:>9} {:>7} {:>12} {:>14}  served by",
            "phase", "time", "requests", "failed", "longest gap", "sessions lost"
        )?;
        for p in &self.phases {
            let served: Vec<String> = p.served_by.iter().map(|(k, v)| format!("{k} {v}")).collect();
            writeln!(
                f,
                "{:<18} {:>6.1} s {:>9} {:>7} {:>9} ms {:>14}  {}",
                p.name,
                p.duration_ms as f64 / 1000.0,
                p.requests,
                p.failed,
                p.longest_gap_ms,
                p.sessions_lost,
                served.join(", ")
            )?;
        }
        writeln!(
            f,
            "sessions served by more than one instance: {} of {}",
            self.sessions_on_several_instances, self.sessions
        )?;
        for p in &self.phases {
            for (what, samples) in [("failed requests", &p.failure_samples), ("lost sessions", &p.loss_samples)] {
                if !samples.is_empty() {
                    writeln!(f, "{what} in {} (first {}):", p.name, samples.len())?;
                    for s in samples {
                        writeln!(f, "  {s}")?;
                    }
                }
            }
        }
        if !self.balancer_flaps.is_empty() {
            writeln!(f, "failed health checks the drill did not cause (-> UP 1/2: one check; -> DOWN: taken out):")?;
            for s in &self.balancer_flaps {
                writeln!(f, "  {s}")?;
            }
        }
        writeln!(f, "timeline:")?;
        for t in &self.timeline {
            writeln!(f, "  {t}")?;
        }
        let violations = self.violations();
        if violations.is_empty() {
            writeln!(f, "PASSED: no session lost; no failed request outside the kill")?;
        } else {
            writeln!(f, "FAILED:")?;
            for v in violations {
                writeln!(f, "  {v}")?;
            }
        }
        write!(f, "logs: {}", self.work_dir.display())
    }
}

/// State shared by the coordinator and the clients.
struct Shared {
    start: Instant,
    phase: AtomicUsize,
    stop: AtomicBool,
    phases: Mutex<Vec<PhaseReport>>,
    served: Mutex<Vec<BTreeSet<String>>>,
    /// Servers the drill is stopping (or has stopped): their leaving the balancer is expected.
    expected_down: Mutex<BTreeSet<String>>,
    /// Timeline entries: time since the start, text.
    timeline: Mutex<Vec<(Duration, String)>>,
    flaps: Mutex<Vec<String>>,
}

impl Shared {
    fn at(&self) -> String {
        at(self.start.elapsed())
    }

    fn note(&self, text: String) {
        let elapsed = self.start.elapsed();
        eprintln!("drill: {}  {text}", at(elapsed));
        self.timeline.lock().unwrap().push((elapsed, text));
    }

    fn record(&self, phase: usize, f: impl FnOnce(&mut PhaseReport)) {
        let mut phases = self.phases.lock().unwrap();
        if let Some(p) = phases.get_mut(phase) {
            f(p);
        }
    }

    fn failure(&self, phase: usize, text: String) {
        let at = self.at();
        self.record(phase, |p| {
            p.failed += 1;
            if p.failure_samples.len() < SAMPLES {
                p.failure_samples.push(format!("{at}  {text}"));
            }
        });
    }

    fn loss(&self, phase: usize, text: String) {
        let at = self.at();
        self.record(phase, |p| {
            p.sessions_lost += 1;
            if p.loss_samples.len() < SAMPLES {
                p.loss_samples.push(format!("{at}  {text}"));
            }
        });
    }
}

fn at(elapsed: Duration) -> String {
    format!("{:>7.3} s", elapsed.as_secs_f64())
}

/// Records every change of a server's state in the balancer, every 50 ms, until the drill stops.
fn watch_balancer(shared: Arc<Shared>, stats: SocketAddr) {
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    while !shared.stop.load(Ordering::SeqCst) {
        if let Some(states) = harness::balancer_states(stats) {
            for (server, state) in &states {
                let before = previous.get(server).map(String::as_str).unwrap_or("?");
                if before != state {
                    shared.note(format!("balancer: {server} {before} -> {state}"));
                    if before == "UP" && !shared.expected_down.lock().unwrap().contains(server) {
                        let line = format!("{}  {server} {before} -> {state}", shared.at());
                        shared.flaps.lock().unwrap().push(line);
                    }
                }
            }
            previous = states;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client threads; dropping them stops and joins them.
struct Clients {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Client {
    n: usize,
    user: String,
    http: SessionClient,
}

impl Client {
    fn post(&mut self, path: &str) -> Result<Answer, String> {
        self.http.post(path)
    }

    /// Logs in, retrying until it works or the drill stops.
    fn login(&mut self, shared: &Shared) -> bool {
        let path = format!("/login?user={}", self.user);
        let deadline = Instant::now() + START_WAIT;
        while !shared.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            if let Ok(answer) = self.post(&path)
                && answer.status == 200
                && self.http.cookie.is_some()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn run(mut self, shared: Arc<Shared>, pause: Duration, logged_in: Arc<AtomicUsize>) {
        if !self.login(&shared) {
            shared.failure(shared.phase.load(Ordering::SeqCst), format!("{}: could not log in", self.user));
            return;
        }
        logged_in.fetch_add(1, Ordering::SeqCst);
        let mut last_counter = 0u64;
        let mut unanswered = 0u64;
        let mut last_success = Instant::now();
        for _ in 0..REQUESTS_PER_CLIENT_MAX {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            let phase = shared.phase.load(Ordering::SeqCst);
            let outcome = self.post("/incr");
            shared.record(phase, |p| p.requests += 1);
            // A request that fails does so because of what happened while it was in flight: one
            // sent just before the kill and cut by it counts in the kill's phase.
            let failed_in = shared.phase.load(Ordering::SeqCst).max(phase);
            match outcome {
                Ok(answer) if answer.status == 200 => {
                    let counter = answer.body["counter"].as_u64();
                    let user_ok = answer.body["user"].as_str() == Some(self.user.as_str());
                    let served = answer.served_by.clone().unwrap_or_else(|| "?".to_string());
                    let expected = last_counter + 1..=last_counter + 1 + unanswered;
                    match counter {
                        Some(c) if user_ok && expected.contains(&c) => last_counter = c,
                        _ => {
                            shared.loss(
                                phase,
                                format!(
                                    "{}: LOST: counter {:?} (expected {}..={}) user ok {user_ok}, served by {served}: {}",
                                    self.user,
                                    counter,
                                    expected.start(),
                                    expected.end(),
                                    answer.text
                                ),
                            );
                            last_counter = counter.unwrap_or(last_counter);
                        }
                    }
                    unanswered = 0;
                    let gap = last_success.elapsed();
                    last_success = Instant::now();
                    shared.record(phase, |p| {
                        p.longest_gap_ms = p.longest_gap_ms.max(gap.as_millis() as u64);
                        *p.served_by.entry(served.clone()).or_default() += 1;
                    });
                    shared.served.lock().unwrap()[self.n].insert(served);
                }
                Ok(answer) if answer.status == 401 && answer.served_by.is_some() => {
                    shared.loss(
                        phase,
                        format!(
                            "{}: LOST: logged out (401 from {}) after counter {last_counter}",
                            self.user,
                            answer.served_by.unwrap_or_default()
                        ),
                    );
                    if !self.login(&shared) {
                        return;
                    }
                    (last_counter, unanswered) = (0, 0);
                }
                Ok(answer) => {
                    // An error of the service is definitive (nothing was saved), unless it says
                    // the outcome is unknown (a save that failed after the handler ran); an error
                    // that haproxy generated (no `x-served-by`) may hide a request that was applied.
                    let from = answer.served_by.clone().unwrap_or_else(|| "haproxy".to_string());
                    if answer.served_by.is_none() || answer.body["outcome"] == "unknown" {
                        unanswered += 1;
                    }
                    let body: String = answer.text.chars().take(300).collect();
                    shared.failure(
                        failed_in,
                        format!("{}: HTTP {} from {from}: {}", self.user, answer.status, body.trim()),
                    );
                }
                Err(error) => {
                    unanswered += 1;
                    shared.failure(failed_in, format!("{}: no answer: {error}", self.user));
                }
            }
            std::thread::sleep(pause);
        }
    }
}

/// The coordinator's view of the running system.
struct Drill {
    options: DrillOptions,
    shared: Arc<Shared>,
    instances: Vec<Instance>,
    haproxy: Option<Haproxy>,
    step_problems: Vec<String>,
    phase_started: Instant,
}

impl Drill {
    fn note(&mut self, text: impl Into<String>) {
        self.shared.note(text.into());
    }

    fn expect_down(&self, name: &str, expected: bool) {
        let mut set = self.shared.expected_down.lock().unwrap();
        if expected {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().expect("haproxy runs")
    }

    fn begin(&mut self, name: &str, failures_expected: bool) {
        self.end_phase();
        let mut phases = self.shared.phases.lock().unwrap();
        phases.push(PhaseReport { name: name.to_string(), failures_expected, ..Default::default() });
        self.shared.phase.store(phases.len() - 1, Ordering::SeqCst);
        drop(phases);
        self.phase_started = Instant::now();
        self.note(format!("phase: {name}"));
    }

    fn end_phase(&mut self) {
        let elapsed = self.phase_started.elapsed().as_millis() as u64;
        let index = self.shared.phase.load(Ordering::SeqCst);
        self.shared.record(index, |p| p.duration_ms = elapsed);
    }

    fn running(&self, names: &[&str]) -> Vec<&Instance> {
        self.instances.iter().filter(|i| names.contains(&i.node_id.as_str())).collect()
    }

    fn index(&self, name: &str) -> usize {
        self.instances.iter().position(|i| i.node_id == name).expect("a known instance")
    }

    fn wait_members(&self, running: &[&str]) {
        let expected: Vec<String> = running.iter().map(|s| s.to_string()).collect();
        wait_for_members(&self.running(running), &expected, VIEW_WAIT);
    }

    /// Starts `name`, waits until it is healthy, every member in `running` (it included) sees
    /// exactly them, and haproxy has it UP.
    fn start(&mut self, name: &str, running: &[&str]) {
        let t = Instant::now();
        let i = self.index(name);
        self.instances[i].start();
        self.instances[i].wait_healthy(START_WAIT);
        let healthy = t.elapsed();
        self.wait_members(running);
        let joined = t.elapsed();
        self.haproxy().wait_server(name, "UP", BALANCER_WAIT);
        self.expect_down(name, false);
        self.note(format!(
            "{name} started: healthy after {} ms, all members agree after {} ms, in the balancer after {} ms",
            healthy.as_millis(),
            joined.as_millis(),
            t.elapsed().as_millis()
        ));
    }

    /// SIGTERM to `name`: it must be out of the balancer before it exits, and exit 0; then every
    /// member of `remaining` sees exactly them.
    fn stop_gracefully(&mut self, name: &str, remaining: &[&str]) {
        let t = Instant::now();
        let i = self.index(name);
        self.expect_down(name, true);
        self.instances[i].process.signal("TERM");
        let mut out_of_balancer = None;
        let haproxy = self.haproxy.as_ref().expect("haproxy runs");
        let process = &mut self.instances[i].process;
        let status = wait_until(&format!("{name} to exit after SIGTERM"), EXIT_WAIT, || {
            if out_of_balancer.is_none() && haproxy.server_state(name).as_deref() == Some("DOWN") {
                out_of_balancer = Some(t.elapsed());
            }
            process.try_exit_status()
        });
        let exited = t.elapsed();
        self.instances[i].process.wait_exit(Duration::from_secs(1));
        match out_of_balancer {
            Some(at) => self.note(format!(
                "{name} stopped: out of the balancer after {} ms, exited after {} ms with {status}",
                at.as_millis(),
                exited.as_millis()
            )),
            None => {
                let problem = format!("{name} exited ({status}) before haproxy took it out of the balancer");
                self.note(problem.clone());
                self.step_problems.push(problem);
            }
        }
        if status.code() != Some(0) {
            self.step_problems.push(format!("{name} exited with {status} after SIGTERM, expected 0"));
        }
        self.haproxy().wait_server(name, "DOWN", BALANCER_WAIT);
        let t = Instant::now();
        self.wait_members(remaining);
        self.note(format!("members {remaining:?} agree {} ms later", t.elapsed().as_millis()));
    }

    fn kill(&mut self, name: &str, remaining: &[&str]) {
        let t = Instant::now();
        let i = self.index(name);
        self.expect_down(name, true);
        self.instances[i].process.signal("KILL");
        self.instances[i].process.wait_exit(EXIT_WAIT);
        self.haproxy().wait_server(name, "DOWN", BALANCER_WAIT);
        let down = t.elapsed();
        self.wait_members(remaining);
        self.note(format!(
            "{name} killed: out of the balancer after {} ms, declared dead by all after {} ms",
            down.as_millis(),
            t.elapsed().as_millis()
        ));
    }

    fn settle(&self) {
        // Traffic with nothing changing: a duration of load, not a wait for a condition.
        std::thread::sleep(self.options.settle);
    }

    fn print_logs(&self) {
        for instance in &self.instances {
            instance.process.print_log_tail();
        }
        if let Some(haproxy) = &self.haproxy {
            haproxy.process.print_log_tail();
        }
    }
}

/// Runs the drill and returns what it saw. Panics (with the tails of every log) when a step
/// cannot be done: an instance that does not start, members that do not agree in time. When the
/// report has violations, the tails of the logs are printed too.
pub fn run(options: DrillOptions) -> Report {
    let _ = std::fs::remove_dir_all(&options.work_dir);
    std::fs::create_dir_all(&options.work_dir).expect("the drill's directory can be created");
    let prefix = harness::loopback_prefix();
    let cluster = format!("drill-{}", std::process::id());
    let names = ["s1", "s2", "s3", "s4"];
    let ips: Vec<_> = (1..=4u8).map(|n| harness::loopback(prefix, n)).collect();
    let members: Vec<String> = ips.iter().map(|ip| SocketAddr::new(*ip, harness::MEMBER_PORT).to_string()).collect();
    let common: Vec<String> = [
        "--cluster-name",
        &cluster,
        "--members",
        &members.join(","),
        "--drain-ms",
        &options.drain.as_millis().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut env: Vec<(&str, &str)> = FAST_TIMERS.to_vec();
    env.push(("GRAPEVINE_SHUTDOWN_TIMEOUT_SECONDS", "30"));
    let instances: Vec<Instance> = names
        .iter()
        .zip(&ips)
        .map(|(name, ip)| Instance::new(&options.demo_bin, &options.work_dir, name, *ip, &common, &env))
        .collect();
    let shared = Arc::new(Shared {
        start: Instant::now(),
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        phases: Mutex::new(Vec::new()),
        served: Mutex::new(vec![BTreeSet::new(); options.sessions]),
        expected_down: Mutex::new(BTreeSet::from(["s4".to_string()])),
        timeline: Mutex::new(Vec::new()),
        flaps: Mutex::new(Vec::new()),
    });
    let mut drill = Drill {
        options: options.clone(),
        shared: shared.clone(),
        instances,
        haproxy: None,
        step_problems: Vec::new(),
        phase_started: Instant::now(),
    };

    // Three instances at once, then the balancer in front of all four (s4 is down until the
    // scaling phase).
    for i in 0..3 {
        drill.instances[i].start();
    }
    for i in 0..3 {
        drill.instances[i].wait_healthy(START_WAIT);
    }
    drill.wait_members(&names[..3]);
    drill.note("s1, s2, s3 healthy and agreeing");
    let servers: Vec<(String, SocketAddr)> = drill.instances.iter().map(|i| (i.node_id.clone(), i.http)).collect();
    let frontend = SocketAddr::new(harness::loopback(prefix, 100), 48000);
    let stats = SocketAddr::new(harness::loopback(prefix, 100), 48001);
    drill.haproxy = Some(Haproxy::start(&options.haproxy_bin, &options.work_dir, frontend, stats, &servers));
    for name in &names[..3] {
        drill.haproxy().wait_server(name, "UP", BALANCER_WAIT);
    }
    drill.haproxy().wait_server("s4", "DOWN", BALANCER_WAIT);
    drill.note(format!("haproxy on {frontend}: s1, s2, s3 UP, s4 DOWN"));

    drill.begin("steady", false);
    let logged_in = Arc::new(AtomicUsize::new(0));
    let mut clients = Clients { shared: shared.clone(), threads: Vec::new() };
    let watched = shared.clone();
    clients.threads.push(std::thread::spawn(move || watch_balancer(watched, stats)));
    for n in 0..options.sessions {
        let client = Client {
            n,
            user: format!("user{n}"),
            http: SessionClient::new(&format!("http://{frontend}"), REQUEST_TIMEOUT),
        };
        let (shared, logged_in, pause) = (shared.clone(), logged_in.clone(), options.pause);
        clients.threads.push(std::thread::spawn(move || client.run(shared, pause, logged_in)));
    }
    let sessions = options.sessions;
    wait_until("every client to log in", START_WAIT, || (logged_in.load(Ordering::SeqCst) == sessions).then_some(()));
    drill.note(format!("{sessions} sessions logged in"));
    drill.settle();
    drill.settle();

    drill.begin("kill -9", true);
    drill.kill("s2", &["s1", "s3"]);
    drill.settle();

    drill.begin("restart killed", false);
    drill.start("s2", &names[..3]);
    drill.settle();

    drill.begin("rolling restart", false);
    for name in &names[..3] {
        drill.stop_gracefully(name, &names[..3].iter().copied().filter(|n| n != name).collect::<Vec<_>>());
        drill.start(name, &names[..3]);
        drill.settle();
    }

    drill.begin("scale out and in", false);
    drill.start("s4", &names);
    drill.settle();
    drill.stop_gracefully("s1", &names[1..]);
    drill.settle();
    drill.end_phase();

    clients.stop();
    let served = shared.served.lock().unwrap();
    let mut timeline = shared.timeline.lock().unwrap().clone();
    timeline.sort_by_key(|(elapsed, _)| *elapsed);
    let report = Report {
        sessions,
        pause_ms: options.pause.as_millis() as u64,
        drain_ms: options.drain.as_millis() as u64,
        phases: shared.phases.lock().unwrap().clone(),
        sessions_on_several_instances: served.iter().filter(|s| s.len() > 1).count(),
        timeline: timeline.into_iter().map(|(elapsed, text)| format!("{}  {text}", at(elapsed))).collect(),
        balancer_flaps: shared.flaps.lock().unwrap().clone(),
        step_problems: drill.step_problems.clone(),
        work_dir: options.work_dir.clone(),
    };
    if !report.violations().is_empty() {
        drill.print_logs();
    }
    report
}
