//! Process helpers for the drill and the process tests: `session-demo` instances and `haproxy` as
//! child processes that are killed when dropped (also when a test panics, after printing the
//! tail of their logs), HTTP calls with a timeout, and waits with a deadline.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::app::{COOKIE_NAME, SERVED_BY};

/// Short timers for drills and tests, as the `grapevine` process tests use: joins and leaves take
/// a few hundred ms; a silent member is declared dead after about 1.2 s (phi 12 × 100 ms: lower
/// thresholds made members of a busy 2-core machine declare live peers dead).
pub const FAST_TIMERS: &[(&str, &str)] = &[
    ("GRAPEVINE_GOSSIP__INTERVAL_MS", "100"),
    ("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "1000"),
    ("GRAPEVINE_GOSSIP__PROBE_INTERVAL_MS", "200"),
    ("GRAPEVINE_GOSSIP__PHI_THRESHOLD", "12"),
];

/// Lines of a log printed when something fails.
pub const LOG_TAIL_LINES: usize = 60;

/// Polls `check` every 20 ms until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback prefix `127.a.b` for this process: `a` and `b` come from the process id, so test
/// binaries running at once use different addresses (`b` is 200 or more: the in-process harness
/// of `tests/` uses 0 and 1 there).
pub fn loopback_prefix() -> [u8; 3] {
    let pid = std::process::id();
    [127, (pid % 200) as u8 + 20, 200 + ((pid / 200) % 50) as u8]
}

/// `prefix.last` as an address.
pub fn loopback(prefix: [u8; 3], last: u8) -> IpAddr {
    IpAddr::from([prefix[0], prefix[1], prefix[2], last])
}

/// Panics with a clear message when `addr` cannot be bound (TCP, and UDP too when `udp`).
pub fn assert_free(addr: SocketAddr, udp: bool) {
    if let Err(e) = TcpListener::bind(addr) {
        panic!("{addr} (TCP) is not free: {e}; stop what uses it");
    }
    if udp && let Err(e) = UdpSocket::bind(addr) {
        panic!("{addr} (UDP) is not free: {e}; stop what uses it");
    }
}

/// Sends `signal` (`TERM`, `INT`, `KILL`) to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args(["-s", signal, &pid.to_string()]).status().expect("kill(1) runs");
    assert!(status.success(), "kill -s {signal} {pid} failed");
}

/// The last `lines` lines of the file at `path`.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(256 << 10)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// An HTTP agent for checks: short timeout, statuses are not errors, no proxy.
pub fn agent(timeout: Duration) -> ureq::Agent {
    let config =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).proxy(None).build();
    ureq::Agent::new_with_config(config)
}

/// `GET url`: status and body, `None` when there is no answer.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    let mut response = agent(Duration::from_secs(5)).get(url).call().ok()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().ok()?;
    Some((status, body))
}

/// An answer of the service (or of the balancer in front of it).
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The `x-served-by` header: the instance that answered (`None`: not the service).
    pub served_by: Option<String>,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: serde_json::Value,
    /// The body as text.
    pub text: String,
}

/// An HTTP client that keeps the session cookie as a browser would: sends it, and takes the
/// new value (or its removal) from `set-cookie`.
#[derive(Debug)]
pub struct SessionClient {
    base: String,
    agent: ureq::Agent,
    /// The session cookie's value.
    pub cookie: Option<String>,
}

impl SessionClient {
    /// A client of `base` (`http://host:port`) whose requests time out after `timeout`.
    pub fn new(base: &str, timeout: Duration) -> SessionClient {
        SessionClient { base: base.to_string(), agent: agent(timeout), cookie: None }
    }

    /// The same client (and cookie) pointed at another base URL.
    pub fn with_base(&mut self, base: &str) -> &mut SessionClient {
        self.base = base.to_string();
        self
    }

    /// `POST <base><path>` with the cookie; `Err` when no answer came.
    pub fn post(&mut self, path: &str) -> Result<Answer, String> {
        let mut request = self.agent.post(format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", format!("{COOKIE_NAME}={cookie}"));
        }
        let mut response = request.send_empty().map_err(|e| e.to_string())?;
        for value in response.headers().get_all("set-cookie") {
            let Ok(value) = value.to_str() else { continue };
            if let Some(rest) = value.strip_prefix(&format!("{COOKIE_NAME}=")) {
                let cookie = rest.split(';').next().unwrap_or("").to_string();
                self.cookie = (!cookie.is_empty()).then_some(cookie);
            }
        }
        let status = response.status().as_u16();
        let served_by = response.headers().get(SERVED_BY).and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = response.body_mut().read_to_string().map_err(|e| format!("HTTP {status}, body unreadable: {e}"))?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok(Answer { status, served_by, body, text })
    }
}

/// A child process whose stderr and stdout go to a log file; killed when dropped.
#[derive(Debug)]
pub struct Process {
    /// A name for messages.
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    /// A process that is not started yet. `env` comes on top of the inherited environment, less
    /// every `GRAPEVINE_*`, `RUST_LOG` and `RUST_BACKTRACE` variable.
    pub fn new(name: &str, program: &Path, args: &[String], env: &[(&str, &str)], log: PathBuf) -> Process {
        Process {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log,
            child: None,
            starts: 0,
        }
    }

    /// Starts the process (again); the log file is appended to, with a line marking each start.
    pub fn start(&mut self) {
        assert!(!self.is_running(), "{} is already running", self.name);
        self.starts += 1;
        let mut log = File::options().create(true).append(true).open(&self.log).expect("log file opens");
        let _ = writeln!(log, "===== start {} of {} =====", self.starts, self.name);
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, _) in std::env::vars() {
            if key.starts_with("GRAPEVINE_") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let stdout = log.try_clone().expect("log file handle");
        command.stdin(Stdio::null()).stdout(Stdio::from(stdout)).stderr(Stdio::from(log));
        let child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid().unwrap_or_else(|| panic!("{} is not running", self.name)), signal);
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The exit status once the process has exited (reaping it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        Some(status)
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        let status = wait_until(&what, timeout, || self.try_exit_status());
        self.child = None;
        status
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Prints the tail of the log to stderr.
    pub fn print_log_tail(&self) {
        eprintln!(
            "----- last {LOG_TAIL_LINES} lines of {} ({}) -----\n{}",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.print_log_tail();
        }
    }
}

/// One `session-demo` instance on its own loopback address.
#[derive(Debug)]
pub struct Instance {
    /// The process.
    pub process: Process,
    /// Its node id.
    pub node_id: String,
    /// The HTTP service address.
    pub http: SocketAddr,
    /// The member's gossip and data address.
    pub member: SocketAddr,
    /// The member's admin address.
    pub admin: SocketAddr,
}

/// Ports an instance uses on its own address.
pub const HTTP_PORT: u16 = 48080;
/// The member port (TCP data and UDP gossip).
pub const MEMBER_PORT: u16 = 45701;
/// The member's admin port.
pub const ADMIN_PORT: u16 = 45801;

impl Instance {
    /// An instance of `bin` named `node_id` on `ip`, with the flags `common` (cluster name,
    /// members, ...) after its own addresses; `env` on top of a clean environment with port
    /// auto-increment off. Its log is `<log_dir>/<node_id>.log`.
    pub fn new(
        bin: &Path,
        log_dir: &Path,
        node_id: &str,
        ip: IpAddr,
        common: &[String],
        env: &[(&str, &str)],
    ) -> Instance {
        let http = SocketAddr::new(ip, HTTP_PORT);
        let member = SocketAddr::new(ip, MEMBER_PORT);
        let admin = SocketAddr::new(ip, ADMIN_PORT);
        let mut args: Vec<String> = [
            "--http-addr".to_string(),
            http.to_string(),
            "--bind".to_string(),
            ip.to_string(),
            "--port".to_string(),
            MEMBER_PORT.to_string(),
            "--admin-port".to_string(),
            ADMIN_PORT.to_string(),
            "--node-id".to_string(),
            node_id.to_string(),
        ]
        .to_vec();
        args.extend(common.iter().cloned());
        let mut env = env.to_vec();
        env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
        let log = log_dir.join(format!("{node_id}.log"));
        Instance {
            process: Process::new(node_id, bin, &args, &env, log),
            node_id: node_id.to_string(),
            http,
            member,
            admin,
        }
    }

    /// Checks the instance's addresses are free, then starts it.
    pub fn start(&mut self) {
        assert_free(self.http, false);
        assert_free(self.member, true);
        assert_free(self.admin, false);
        self.process.start();
    }

    /// `http://<http address><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Waits until `GET /health` answers 200; panics if the process exits first or after `timeout`.
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let url = self.url("/health");
        let what = format!("{} to answer 200 on /health", self.node_id);
        let process = &mut self.process;
        wait_until(&what, timeout, || {
            if let Some(status) = process.try_exit_status() {
                panic!("{} exited with {status} before it was healthy", process.name);
            }
            http_get(&url).filter(|(status, _)| *status == 200).map(drop)
        });
    }

    /// The node ids of the active members this instance's member sees, from its admin `/stats`.
    pub fn active_members(&self) -> Option<Vec<String>> {
        let (status, body) = http_get(&format!("http://{}/stats", self.admin))?;
        if status != 200 {
            return None;
        }
        let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut ids: Vec<String> = stats["members"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "active")
            .filter_map(|m| m["node_id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        Some(ids)
    }
}

/// Waits until every instance of `instances` sees exactly `expected` (sorted node ids) as its
/// active members.
pub fn wait_for_members(instances: &[&Instance], expected: &[String], timeout: Duration) {
    let mut expected = expected.to_vec();
    expected.sort();
    let names: Vec<&str> = instances.iter().map(|i| i.node_id.as_str()).collect();
    wait_until(&format!("{names:?} to see the active members {expected:?}"), timeout, || {
        instances.iter().all(|i| i.active_members().as_ref() == Some(&expected)).then_some(())
    });
}

/// `haproxy` in front of the instances: round robin, no session affinity, health checks on
/// `/health`.
#[derive(Debug)]
pub struct Haproxy {
    /// The process.
    pub process: Process,
    /// Where clients connect.
    pub frontend: SocketAddr,
    /// The statistics page (`/stats;csv`).
    pub stats: SocketAddr,
    /// The configuration file.
    pub config_path: PathBuf,
}

/// The backend's name in the configuration.
pub const BACKEND: &str = "demo";

impl Haproxy {
    /// The `haproxy` binary: on `PATH`, else in `/usr/sbin` or `/usr/local/sbin`.
    pub fn find() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
            .map(|dir| dir.join("haproxy"))
            .find(|candidate| candidate.is_file())
    }

    /// The configuration the drill uses (and `docs/sessions.md` shows): `servers` are
    /// `(name, address)` pairs.
    pub fn config(frontend: SocketAddr, stats: SocketAddr, servers: &[(String, SocketAddr)]) -> String {
        let mut text = format!(
            "\
global
    log stdout format raw local0 notice
    maxconn 2000

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    # A connection that fails (refused, reset before the request was sent) is retried on another
    # server; a request that reached a server is never sent again (POST /incr is not idempotent).
    retries 3
    retry-on conn-failure
    option redispatch 1

frontend web
    bind {frontend}
    default_backend {BACKEND}

backend {BACKEND}
    # Every request goes to the next server: no cookie, no stickiness, no affinity.
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    # Check every 200 ms; two failed checks in a row take a server out (a draining instance
    # answers 503 at once: out within about half a second), two good ones put it back.
    default-server inter 200ms fastinter 200ms downinter 200ms fall 2 rise 2
"
        );
        for (name, addr) in servers {
            text.push_str(&format!("    server {name} {addr} check\n"));
        }
        text.push_str(&format!("\nlisten stats\n    bind {stats}\n    stats enable\n    stats uri /stats\n"));
        text
    }

    /// Writes the configuration into `dir`, checks it with `haproxy -c`, and starts haproxy in
    /// the foreground.
    pub fn start(
        bin: &Path,
        dir: &Path,
        frontend: SocketAddr,
        stats: SocketAddr,
        servers: &[(String, SocketAddr)],
    ) -> Haproxy {
        assert_free(frontend, false);
        assert_free(stats, false);
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, Haproxy::config(frontend, stats, servers)).expect("haproxy.cfg is written");
        let config = config_path.display().to_string();
        let check = Command::new(bin).args(["-c", "-q", "-f", &config]).output().expect("haproxy -c runs");
        assert!(
            check.status.success(),
            "haproxy rejects {config}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let args = ["-db".to_string(), "-f".to_string(), config];
        let mut process = Process::new("haproxy", bin, &args, &[], dir.join("haproxy.log"));
        process.start();
        let haproxy = Haproxy { process, frontend, stats, config_path };
        wait_until("haproxy to serve its statistics", Duration::from_secs(10), || haproxy.server_states());
        haproxy
    }

    /// `http://<frontend><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.frontend)
    }

    /// The status of each server of the backend (`UP`, `DOWN`, `DOWN 1/2`, ...).
    pub fn server_states(&self) -> Option<BTreeMap<String, String>> {
        balancer_states(self.stats)
    }

    /// The status of server `name`.
    pub fn server_state(&self, name: &str) -> Option<String> {
        self.server_states()?.remove(name)
    }

    /// Waits until server `name` is exactly `UP` or `DOWN` (`state`).
    pub fn wait_server(&self, name: &str, state: &str, timeout: Duration) {
        wait_until(&format!("haproxy to see server {name} {state}"), timeout, || {
            (self.server_state(name).as_deref() == Some(state)).then_some(())
        });
    }
}

/// The status of each server of haproxy's backend, from the statistics page at `stats`
/// (`/stats;csv`).
pub fn balancer_states(stats: SocketAddr) -> Option<BTreeMap<String, String>> {
    let (status, csv) = http_get(&format!("http://{stats}/stats;csv"))?;
    if status != 200 {
        return None;
    }
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (px, sv, st) = (column("pxname")?, column("svname")?, column("status")?);
    let mut states = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(px) == Some(&BACKEND) && !matches!(fields.get(sv), Some(&"BACKEND") | Some(&"FRONTEND") | None) {
            states.insert(fields[sv].to_string(), fields.get(st).unwrap_or(&"").to_string());
        }
    }
    Some(states)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/sessions.md` shows the configuration the drill uses: keep them equal.
    #[test]
    fn the_guide_shows_the_drills_haproxy_configuration() {
        let guide = include_str!("../../../docs/sessions.md");
        let start = guide.find("```haproxy\n").expect("a haproxy block in docs/sessions.md") + "```haproxy\n".len();
        let shown = &guide[start..start + guide[start..].find("```").unwrap()];
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let servers: Vec<(String, SocketAddr)> = (1..=3).map(|i| (format!("s{i}"), local(8080 + i))).collect();
        assert_eq!(shown, Haproxy::config(local(8000), local(8404), &servers));
    }

    #[test]
    fn loopback_prefixes_stay_clear_of_the_in_process_harness() {
        let [a, b, c] = loopback_prefix();
        assert_eq!(a, 127);
        assert!((20..220).contains(&b) && c >= 200, "{b}.{c}");
    }
}
