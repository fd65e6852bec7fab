//! Helpers for the RESP tests: in-process clusters whose members each serve RESP on their own
//! loopback address, external tools (`redis-cli`) that must be installed, and waits with a
//! deadline.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use grapevine::Config;
use grapevine_resp::{RespServer, Settings, serve};
use grapevine_tests::{TestCluster, test_config};

pub use grapevine_tests::WAIT;

/// A cluster of `n` in-process members, each with a RESP endpoint.
pub struct RespCluster {
    pub cluster: TestCluster,
    pub servers: Vec<RespServer>,
}

impl RespCluster {
    /// `n` members with the test harness's short timers, `configure` applied to each config.
    pub async fn start(n: usize, configure: impl Fn(&mut Config)) -> RespCluster {
        let cluster = TestCluster::start_with(n, |name| {
            let mut config = test_config(name);
            config.resp_port = 0;
            configure(&mut config);
            config
        })
        .await;
        cluster.wait_settled().await;
        let mut servers = Vec::new();
        for member in &cluster.members {
            servers.push(serve(member.clone(), Settings::from_cluster(member)).await.expect("RESP endpoint starts"));
        }
        RespCluster { cluster, servers }
    }

    /// The RESP address of member `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].local_addr()
    }

    /// A `redis` crate client of member `i`.
    pub async fn client(&self, i: usize) -> redis::aio::MultiplexedConnection {
        connect(self.addr(i), false).await
    }
}

/// A multiplexed connection with bounded connect and response times, RESP2 or RESP3.
pub async fn connect(addr: SocketAddr, resp3: bool) -> redis::aio::MultiplexedConnection {
    let protocol = if resp3 { "?protocol=resp3" } else { "" };
    let client = redis::Client::open(format!("redis://{addr}/{protocol}")).unwrap();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client.get_multiplexed_async_connection_with_config(&config).await.expect("connects")
}

/// Whether the external tool `name` can run. Absent, the test fails with a message saying how to
/// install it, unless `GRAPEVINE_ALLOW_SKIP=1` (then it prints that it skips and returns false);
/// `GRAPEVINE_REQUIRE_TOOLS=1` (set by CI) always fails without it.
pub fn tool_available(name: &str, package: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let flag = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    let how = format!("`{name}` is not installed (apt-get install -y {package})");
    if flag("GRAPEVINE_REQUIRE_TOOLS") {
        panic!("{how}, and GRAPEVINE_REQUIRE_TOOLS=1 requires it");
    }
    if flag("GRAPEVINE_ALLOW_SKIP") {
        // Straight to stderr, past the test harness's capture: a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {how}; GRAPEVINE_ALLOW_SKIP=1 lets this test pass without it");
        return false;
    }
    panic!("{how}; install it, or set GRAPEVINE_ALLOW_SKIP=1 to skip the tests that need it");
}

/// Runs `redis-cli -h <ip> -p <port> <args>` (stdin: `input`) and returns stdout, failing the
/// test if it does not finish within 30 s. Runs on a blocking thread, so the in-process members
/// keep being served.
pub async fn redis_cli(addr: SocketAddr, args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let input = input.map(<[u8]>::to_vec);
    let run = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new("redis-cli")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(&args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli runs");
        if let Some(input) = input {
            child.stdin.take().unwrap().write_all(&input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    });
    tokio::time::timeout(Duration::from_secs(30), run).await.expect("redis-cli finished within 30 s").unwrap()
}

/// `redis-cli <args>` output as text, without the final newline.
pub async fn cli(addr: SocketAddr, args: &[&str]) -> String {
    String::from_utf8_lossy(&redis_cli(addr, args, None).await).trim_end_matches('\n').to_string()
}

/// The replies of a script sent on one `redis-cli` connection (one command per line), one line
/// per reply line.
pub async fn cli_script(addr: SocketAddr, script: &str) -> Vec<String> {
    let out = redis_cli(addr, &[], Some(script.as_bytes())).await;
    String::from_utf8_lossy(&out).lines().map(str::to_string).collect()
}

/// Polls `check` until it returns true, or panics naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    grapevine_tests::wait_until(what, timeout, &mut check).await;
}
