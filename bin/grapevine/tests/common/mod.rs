//! Helpers for tests that run the `grapevine` binary as real processes on 127.0.0.1.
//!
//! Every spawned member is a [`Node`], which kills its process when dropped (also when a test
//! fails), and prints the member's log if the test is failing. Conditions are polled with a
//! deadline, never awaited with fixed sleeps.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_grapevine");

/// The default deadline for a condition. Generous: shared CI machines are slow.
pub const WAIT: Duration = Duration::from_secs(30);

/// Short timers, so that joins and failure detection take about a second.
pub const FAST_TIMERS: &[(&str, &str)] = &[
    ("GRAPEVINE_GOSSIP__INTERVAL_MS", "100"),
    ("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "1000"),
    ("GRAPEVINE_GOSSIP__PROBE_INTERVAL_MS", "200"),
    ("GRAPEVINE_MERGE_FIRST_RUN_DELAY_SECONDS", "0"),
    ("GRAPEVINE_MERGE_RUN_DELAY_SECONDS", "1"),
];

/// A `grapevine` command with a clean environment: no inherited `GRAPEVINE_*` variable, no
/// `RUST_LOG`, so the tests see the defaults; except that the RESP endpoint takes any free port
/// (`GRAPEVINE_RESP_PORT=0`, which `env` may override), so that members started with port
/// auto-increment off never compete for its default port.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
            command.env_remove(key);
        }
    }
    command.env("GRAPEVINE_RESP_PORT", "0");
    command.envs(env.iter().copied());
    command
}

/// Runs `grapevine` to completion.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).stdin(Stdio::null()).output().expect("grapevine runs")
}

/// A running member; killed when dropped.
pub struct Node {
    pub name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Node {
    /// Spawns `grapevine <args>`, collecting its stderr (the log).
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut child = command(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("grapevine starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Node { name: name.to_string(), child, log }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let what = format!("{}: a log line with {needle:?}", self.name);
        let (log, child) = (self.log.clone(), &mut self.child);
        wait_until(&what, WAIT, || {
            let text = log.lock().unwrap().clone();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("exited with {status} before logging {needle:?}:\n{text}");
            }
            text.lines().find(|l| l.contains(needle)).map(str::to_string)
        })
    }

    /// The admin port, from the `grapevine node running` line (`admin=0.0.0.0:5801`).
    pub fn admin_port(&mut self) -> u16 {
        let line = self.wait_for_log("grapevine node running");
        let field = line.split_whitespace().find_map(|w| w.strip_prefix("admin=")).expect("admin= field");
        let port = field.rsplit(':').next().unwrap();
        port.parse().unwrap_or_else(|_| panic!("admin port in {line:?}"))
    }

    /// The RESP address, from the `grapevine node running` line (`resp=127.0.0.1:6701`).
    pub fn resp_addr(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for_log("grapevine node running");
        let field = line.split_whitespace().find_map(|w| w.strip_prefix("resp=")).expect("resp= field");
        field.parse().unwrap_or_else(|_| panic!("RESP address in {line:?}"))
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -s {signal} {}", self.name);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        wait_until(&what, timeout, || self.child.try_wait().unwrap())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/stats` of the member whose admin port is `admin_port`, through `grapevine clusterstats --json`.
pub fn clusterstats(admin_port: u16) -> Option<Value> {
    let node = format!("127.0.0.1:{admin_port}");
    let out = run(&["clusterstats", "--json", "--node", &node], &[]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The master's node id and the node ids of the members in the view, if every member in it is
/// active.
pub fn settled_view(stats: &Value) -> Option<(String, Vec<String>)> {
    let members = stats["members"].as_array()?;
    if members.iter().any(|m| m["state"] != "active") {
        return None;
    }
    let mut ids: Vec<String> = members.iter().filter_map(|m| m["node_id"].as_str().map(str::to_string)).collect();
    ids.sort();
    Some((stats["master"].as_str()?.to_string(), ids))
}

/// Waits until every member (by admin port) sees the same `n` active members and the same master;
/// returns the master's node id and the sorted node ids.
pub fn wait_for_agreement(admin_ports: &[u16], n: usize) -> (String, Vec<String>) {
    wait_until(&format!("members at admin ports {admin_ports:?} to agree on {n} members"), WAIT, || {
        let views: Vec<(String, Vec<String>)> =
            admin_ports.iter().map(|p| clusterstats(*p).as_ref().and_then(settled_view)).collect::<Option<_>>()?;
        let first = views.first()?.clone();
        (first.1.len() == n && views.iter().all(|v| *v == first)).then_some(first)
    })
}

/// A plain HTTP GET with a short timeout: status and body.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .proxy(None)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut response = agent.get(url).call().ok()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().ok()?;
    Some((status, body))
}

/// stderr as text, asserting that it holds no panic or backtrace.
pub fn clean_stderr(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked") && !stderr.to_lowercase().contains("backtrace"), "{stderr}");
    stderr
}

/// Starts three members of `cluster` at once on 127.0.0.1 with fixed ports: data/gossip ports
/// `port_base + 1..=3`, admin ports `admin_base + 1..=3`, node ids `<prefix>1..3`, each listing the
/// others; `env` on top of the clean environment (port auto-increment off, so a port in use is an
/// error rather than another member's port). Returns the nodes and their admin ports, once they
/// announced them.
pub fn start_three(
    cluster: &str,
    prefix: &str,
    port_base: u16,
    admin_base: u16,
    env: &[(&str, &str)],
) -> (Vec<Node>, Vec<u16>) {
    let mut env = env.to_vec();
    env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    let members = format!("127.0.0.1:{}-{}", port_base + 1, port_base + 3);
    let mut nodes: Vec<Node> = (1..=3u16)
        .map(|i| {
            let (port, admin, id) = ((port_base + i).to_string(), (admin_base + i).to_string(), format!("{prefix}{i}"));
            let args = [
                "start",
                "--cluster-name",
                cluster,
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--admin-port",
                &admin,
                "--node-id",
                &id,
                "--members",
                &members,
            ];
            Node::spawn(&id, &args, &env)
        })
        .collect();
    let admins: Vec<u16> = nodes.iter_mut().map(Node::admin_port).collect();
    (nodes, admins)
}
