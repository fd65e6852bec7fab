//! `session-demo` as real processes on loopback addresses of this test binary: the routes, a
//! session that follows its user from one instance to another, the drain-then-leave sequence of
//! SIGTERM, a second signal, and bad command lines.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use session_demo::harness::{self, FAST_TIMERS, Instance, MEMBER_PORT, SessionClient, wait_for_members, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_session-demo");
const WAIT: Duration = Duration::from_secs(30);

/// Each test takes its own last octets of this process's loopback prefix.
fn ip(last: u8) -> IpAddr {
    harness::loopback(harness::loopback_prefix(), last)
}

fn log_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("service-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An instance named `name` on `ip` in `cluster`, listing `peers` (by address), with `extra` flags.
fn instance(test: &str, name: &str, ip: IpAddr, cluster: &str, peers: &[IpAddr], extra: &[&str]) -> Instance {
    let members: Vec<String> = peers.iter().map(|p| SocketAddr::new(*p, MEMBER_PORT).to_string()).collect();
    let mut common: Vec<String> = vec!["--cluster-name".into(), cluster.into()];
    if !members.is_empty() {
        common.extend(["--members".to_string(), members.join(",")]);
    }
    common.extend(extra.iter().map(|s| s.to_string()));
    Instance::new(BIN.as_ref(), &log_dir(&format!("{test}-{name}")), name, ip, &common, FAST_TIMERS)
}

fn cluster_name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

fn client(instance: &Instance) -> SessionClient {
    SessionClient::new(&format!("http://{}", instance.http), Duration::from_secs(10))
}

#[test]
fn login_counter_and_logout_on_one_instance() {
    let mut a = instance("routes", "r1", ip(11), &cluster_name("routes"), &[], &[]);
    a.start();
    a.wait_healthy(WAIT);
    let mut c = client(&a);

    let answer = c.post("/incr").unwrap();
    assert_eq!(answer.status, 401, "{}", answer.text);
    assert!(answer.body["error"].as_str().unwrap().contains("not logged in"));
    assert_eq!(answer.served_by.as_deref(), Some("r1"));
    for bad in ["/login", "/login?user=", "/login?user=%20alice", "/login?name=alice"] {
        let answer = c.post(bad).unwrap();
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text);
        assert!(answer.body["error"].is_string(), "{bad}: {}", answer.text);
        assert_eq!(c.cookie, None, "{bad} sets no cookie");
    }

    let answer = c.post("/login?user=alice").unwrap();
    assert_eq!((answer.status, answer.body.clone()), (200, serde_json::json!({"user": "alice", "counter": 0})));
    let alice = c.cookie.clone().expect("login sets the session cookie");
    for n in 1..=3 {
        let answer = c.post("/incr").unwrap();
        assert_eq!((answer.status, answer.body.clone()), (200, serde_json::json!({"user": "alice", "counter": n})));
    }

    // Bad cookies are no session, and harm nothing.
    for bad in ["garbage!!", "", "AAAAAAAAAAAAAAAAAAAAAA", &"x".repeat(4000)] {
        let mut other = client(&a);
        other.cookie = Some(bad.to_string());
        let answer = other.post("/incr").unwrap();
        assert_eq!(answer.status, 401, "cookie {bad:?}: {}", answer.text);
    }

    // Logging in again gives a fresh id and deletes the old session.
    let answer = c.post("/login?user=bob").unwrap();
    assert_eq!(answer.body, serde_json::json!({"user": "bob", "counter": 0}));
    let bob = c.cookie.clone().unwrap();
    assert_ne!(bob, alice, "a login never keeps the previous session id");
    let mut old = client(&a);
    old.cookie = Some(alice);
    assert_eq!(old.post("/incr").unwrap().status, 401, "the session before the login is gone");
    assert_eq!(c.post("/incr").unwrap().body["counter"], 1);

    let answer = c.post("/logout").unwrap();
    assert_eq!((answer.status, answer.body.clone()), (200, serde_json::json!({"logged_out": true})));
    assert_eq!(c.cookie, None, "logout removes the cookie");
    let mut after = client(&a);
    after.cookie = Some(bob);
    assert_eq!(after.post("/incr").unwrap().status, 401, "the session is deleted, not only its cookie");
    assert_eq!(client(&a).post("/logout").unwrap().status, 200, "logging out without a session is fine");

    let (status, body) = harness::http_get(&a.url("/health")).unwrap();
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((health["healthy"].clone(), health["state"].clone()), (true.into(), "active".into()));
    let (status, body) = harness::http_get(&a.url("/nope")).unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("POST /login"), "{body}");
    assert!(a.process.is_running());
    assert!(!a.process.log().contains("panicked"), "{}", a.process.log());
}

#[test]
fn a_session_follows_its_user_across_instances_and_outlives_a_graceful_stop() {
    let cluster = cluster_name("follow");
    let (ip_a, ip_b) = (ip(21), ip(22));
    let mut a = instance("follow", "f1", ip_a, &cluster, &[ip_b], &["--drain-ms", "1500"]);
    let mut b = instance("follow", "f2", ip_b, &cluster, &[ip_a], &["--drain-ms", "1500"]);
    a.start();
    b.start();
    a.wait_healthy(WAIT);
    b.wait_healthy(WAIT);
    wait_for_members(&[&a, &b], &["f1".into(), "f2".into()], WAIT);

    let mut c = client(&a);
    assert_eq!(c.post("/login?user=carol").unwrap().status, 200);
    let url_a = format!("http://{}", a.http);
    let url_b = format!("http://{}", b.http);
    let answer = c.with_base(&url_b).post("/incr").unwrap();
    assert_eq!((answer.body["counter"].clone(), answer.served_by.as_deref()), (1.into(), Some("f2")));
    assert_eq!(c.with_base(&url_a).post("/incr").unwrap().body["counter"], 2);

    // SIGTERM: unhealthy at once, still serving during the drain, then leaving, then stopping.
    let signalled = Instant::now();
    a.process.signal("TERM");
    let body = wait_until("f1's /health to answer 503", Duration::from_secs(5), || {
        harness::http_get(&a.url("/health")).filter(|(status, _)| *status == 503).map(|(_, body)| body)
    });
    assert!(body.contains("draining"), "{body}");
    let answer = c.with_base(&url_a).post("/incr").unwrap();
    assert!(signalled.elapsed() < Duration::from_millis(1500), "still within the drain period");
    assert_eq!((answer.status, answer.body["counter"].clone()), (200, 3.into()), "served while draining");
    let status = a.process.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", a.process.log());
    assert!(signalled.elapsed() >= Duration::from_millis(1500), "the drain lasted --drain-ms");
    let log = a.process.log();
    let position = |needle: &str| log.find(needle).unwrap_or_else(|| panic!("{needle:?} in the log:\n{log}"));
    assert!(position("draining") < position("drained; leaving the cluster"));
    assert!(position("drained; leaving the cluster") < position("shutting down gracefully"));
    assert!(position("shutting down gracefully") < position("HTTP stopped"));
    wait_for_members(&[&b], &["f2".into()], WAIT);

    let answer = c.with_base(&url_b).post("/incr").unwrap();
    assert_eq!((answer.status, answer.body["counter"].clone()), (200, 4.into()), "nothing lost: {}", answer.text);
}

#[test]
fn an_unreadable_session_record_fails_its_requests_only_and_a_new_login_recovers() {
    let mut a = instance("unreadable", "u1", ip(41), &cluster_name("unreadable"), &[], &[]);
    a.start();
    a.wait_healthy(WAIT);
    let (mut broken, mut fine) = (client(&a), client(&a));
    assert_eq!(broken.post("/login?user=dave").unwrap().status, 200);
    assert_eq!(fine.post("/login?user=erin").unwrap().status, 200);

    // Overwrite dave's record with something that is not a session, through the admin routes.
    let id = broken.cookie.clone().unwrap();
    let url = format!("http://{}/maps/sessions/entries/{id}", a.admin);
    // (The answer is 422: the previous value, a record, is not a string. The write is done.)
    harness::agent(Duration::from_secs(5)).put(&url).send("not a session record").unwrap();
    assert_eq!(harness::http_get(&url), Some((200, "not a session record".to_string())));

    for _ in 0..3 {
        let answer = broken.post("/incr").unwrap();
        assert_eq!(answer.status, 500, "{}", answer.text);
        assert!(answer.body["error"].as_str().unwrap().contains("unreadable"), "{}", answer.text);
    }
    assert_eq!(fine.post("/incr").unwrap().body["counter"], 1, "other sessions are unaffected");
    let answer = broken.post("/login?user=dave").unwrap();
    assert_eq!((answer.status, answer.body["counter"].clone()), (200, 0.into()), "{}", answer.text);
    assert_ne!(broken.cookie.as_deref(), Some(id.as_str()));
    assert_eq!(broken.post("/incr").unwrap().body["counter"], 1);
    assert!(a.process.is_running());
    assert!(!a.process.log().contains("panicked"));
}

#[test]
fn a_second_signal_stops_at_once() {
    let mut a = instance("twice", "t1", ip(31), &cluster_name("twice"), &[], &["--drain-ms", "60000"]);
    a.start();
    a.wait_healthy(WAIT);
    a.process.signal("TERM");
    wait_until("t1 to drain", Duration::from_secs(5), || {
        harness::http_get(&a.url("/health")).filter(|(status, _)| *status == 503)
    });
    let second = Instant::now();
    a.process.signal("INT");
    let status = a.process.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "128 + SIGINT\n{}", a.process.log());
    assert!(second.elapsed() < Duration::from_secs(5), "stopped at once, not after the 60 s drain");
    assert!(a.process.log().contains("stopping at once"));
}

#[test]
fn a_taken_http_address_fails_fast() {
    let taken = std::net::TcpListener::bind(SocketAddr::new(ip(51), harness::HTTP_PORT)).unwrap();
    let mut a = instance("taken", "x1", ip(51), &cluster_name("taken"), &[], &[]);
    a.process.start();
    let status = a.process.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1));
    let log = a.process.log();
    assert!(log.contains("cannot listen on") && log.contains(&taken.local_addr().unwrap().to_string()), "{log}");
    assert!(!log.contains("member started"), "fails before joining:\n{log}");
}

/// Arguments, environment, and what stderr must mention.
type BadCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_command_lines_exit_2_with_a_message() {
    let cases: &[BadCase] = &[
        (&["--http-addr", "nonsense", "--cluster-name", "x"], &[], "--http-addr"),
        (&["--http-addr", "127.0.0.1:1"], &[], "cluster_name"),
        (&["--cluster-name", "x", "--members", "10.0.0.1:99999"], &[], "members"),
        (&["--cluster-name", "x", "--port", "70000"], &[], "--port"),
        (&["--cluster-name", "x"], &[("GRAPEVINE_GOSSIP__INTERVAL_MS", "1")], "gossip.interval_ms"),
        (&["--cluster-name", "x", "--session-lifetime-seconds", "0"], &[], "session-lifetime-seconds"),
    ];
    for (args, env, needle) in cases {
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("GRAPEVINE_")) {
            command.env_remove(key);
        }
        let out = command.args(*args).envs(env.iter().copied()).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
