//! A member's life through real processes: a signal while it is still looking for the cluster,
//! a graceful shutdown whose hand-over runs out of time, JSON logs, a cluster too small for the
//! map's backups, two members with one node id, and configuration from every layer at once.
//!
//! Ports 27600-27699 (data and gossip) and 28600-28699 (admin) belong to this file.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .proxy(None)
        .build();
    ureq::Agent::new_with_config(config)
}

/// `PUT /maps/{map}/entries/{key}` through the admin port: the status.
fn put(admin: u16, map: &str, key: &str, value: &str) -> u16 {
    let url = format!("http://127.0.0.1:{admin}/maps/{map}/entries/{key}");
    agent().put(&url).send(value).map(|r| r.status().as_u16()).unwrap_or(0)
}

/// `GET /health`: status and the JSON body.
fn health(admin: u16) -> Option<(u16, Value)> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{admin}/health"))?;
    Some((status, serde_json::from_str(&body).ok()?))
}

fn wait_healthy(admin: u16) {
    wait_until(&format!("/health 200 on {admin}"), WAIT, || health(admin).filter(|(s, _)| *s == 200));
}

/// Arguments of `grapevine start` on 127.0.0.1 with fixed ports.
fn start_args(cluster: &str, id: &str, port: u16, admin: u16, members: &str) -> Vec<String> {
    let mut args: Vec<String> = ["start", "--cluster-name", cluster, "--bind", "127.0.0.1", "--node-id", id]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--port".into(), port.to_string(), "--admin-port".into(), admin.to_string()]);
    if !members.is_empty() {
        args.extend(["--members".into(), members.to_string()]);
    }
    args
}

fn spawn(name: &str, args: &[String], env: &[(&str, &str)]) -> Node {
    let mut all = FAST_TIMERS.to_vec();
    all.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    all.extend_from_slice(env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::spawn(name, &args, &all)
}

/// While the member is still looking for the cluster, `/health` answers 503 saying so; a signal
/// then stops it at once with status 0.
#[test]
fn a_signal_while_looking_for_the_cluster_stops_the_member_with_status_0() {
    // Nobody listens on 27699: the member looks for the cluster for a minute.
    let args = start_args("startup", "s1", 27601, 28601, "127.0.0.1:27699");
    let mut node = spawn("s1", &args, &[("GRAPEVINE_GOSSIP__JOIN_TIMEOUT_MS", "60000")]);
    let (status, body) = wait_until("/health to answer while joining", WAIT, || health(28601));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["state"], "joining", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("looking for the cluster"), "{body}");
    assert!(!node.log().contains("grapevine node running"), "{}", node.log());

    let signalled = Instant::now();
    node.signal("TERM");
    let status = node.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", node.log());
    assert!(node.log().contains("received SIGTERM; stopping before start-up finished"), "{}", node.log());
    // At once: well before the minute of the join timeout.
    assert!(signalled.elapsed() < Duration::from_secs(20), "{:?}", signalled.elapsed());
}

/// A graceful shutdown whose hand-over cannot finish (the only other member, the master, is
/// stopped with SIGSTOP, and failure detection is slow, so it still counts as active) leaves anyway after
/// `shutdown_timeout_seconds`, logging what it still held and what is lost, and exits 1. While it
/// waits, `/health` answers 503.
#[test]
fn a_hand_over_that_runs_out_of_time_is_logged_and_exits_1() {
    let members = "127.0.0.1:27611-27612";
    let env = [
        // About 10 s before a silent member is declared dead: longer than the shutdown timeout.
        ("GRAPEVINE_GOSSIP__PHI_THRESHOLD", "100"),
        ("GRAPEVINE_SHUTDOWN_TIMEOUT_SECONDS", "2"),
        ("GRAPEVINE_MAPS__NOBACKUP__BACKUP_COUNT", "0"),
    ];
    // b starts first, so it is the master: the leaving member cannot commit a table by itself.
    let mut b = spawn("b", &start_args("late", "b", 27612, 28612, members), &env);
    b.wait_for_log("grapevine node running");
    let mut a = spawn("a", &start_args("late", "a", 27611, 28611, members), &env);
    a.wait_for_log("grapevine node running");
    wait_for_agreement(&[28611, 28612], 2);
    wait_healthy(28611);
    wait_healthy(28612);
    for i in 0..40 {
        assert_eq!(put(28611, "nobackup", &format!("k{i}"), "v"), 200);
    }

    b.signal("STOP");
    a.signal("TERM");
    let (status, body) =
        wait_until("/health 503 while leaving", WAIT, || health(28611).filter(|(status, _)| *status != 200));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["healthy"], false, "{body}");
    let status = a.wait_exit(WAIT);
    b.signal("CONT");
    let log = a.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("leaving before every partition was handed over"))
        .unwrap_or_else(|| panic!("no warning about the hand-over in\n{log}"));
    for needle in ["shutdown_timeout_seconds = 2", "partitions owned", "their backups take over", "are lost"] {
        assert!(line.contains(needle), "{needle:?} in {line}");
    }
    assert!(log.contains("exiting with status 1"), "{log}");
    assert!(!log.contains("stopping at once"), "the member left by itself, it was not killed:\n{log}");
}

/// `--log-format json`: every line on stderr is a JSON object with a level and a message; the
/// start-up line carries the addresses as fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let mut args = start_args("jsonlogs", "j1", 27621, 28621, "");
    args.extend(["--log-format".into(), "json".into()]);
    let mut node = spawn("j1", &args, &[]);
    node.wait_for_log("grapevine node running");
    node.signal("TERM");
    assert_eq!(node.wait_exit(WAIT).code(), Some(0), "{}", node.log());
    let log = node.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        assert!(line["level"].is_string() && line["fields"]["message"].is_string(), "{line}");
    }
    let running = lines.iter().find(|l| l["fields"]["message"].as_str().unwrap().contains("node running")).unwrap();
    assert_eq!(running["level"], "INFO");
    assert_eq!(running["fields"]["node"], "j1", "{running}");
    assert_eq!(running["fields"]["admin"], "127.0.0.1:28621", "{running}");
}

/// A single member with the default `backup_count = 1`: writes succeed with no backup, and say
/// so: a warning once (not once per write), and `under_replicated` figures in `/stats` and
/// `/metrics`. When a second member joins, the partitions get their backups, the figure of
/// partitions drops to 0 and the owner logs that the map recovered.
#[test]
fn writes_with_fewer_members_than_replicas_are_reported() {
    let members = "127.0.0.1:27631-27632";
    let mut a = spawn("u1", &start_args("under", "u1", 27631, 28631, members), &[]);
    a.wait_for_log("grapevine node running");
    wait_healthy(28631);
    for i in 0..10 {
        assert_eq!(put(28631, "sessions", &format!("k{i}"), "v"), 200);
    }
    let warning = "writes to the map are acknowledged with 0 of its 1 synchronous backups";
    let log = a.log();
    assert_eq!(log.lines().filter(|l| l.contains(warning)).count(), 1, "one warning, not one per write:\n{log}");
    let line = log.lines().find(|l| l.contains(warning)).unwrap();
    assert!(line.contains("sessions") && line.contains("fewer members than 1 + backup_count"), "{line}");

    let map_stats = |admin: u16| {
        let stats = clusterstats(admin)?;
        stats["maps"].as_array()?.iter().find(|m| m["name"] == "sessions").cloned()
    };
    let sessions = map_stats(28631).unwrap();
    assert_eq!(sessions["under_replicated_writes"], 10, "{sessions}");
    assert_eq!(sessions["under_replicated_partitions"], 271, "{sessions}");
    let (_, metrics) = http_get("http://127.0.0.1:28631/metrics").unwrap();
    for sample in [
        "grapevine_map_under_replicated_writes_total{cluster=\"under\",node=\"u1\",map=\"sessions\"} 10",
        "grapevine_map_under_replicated_partitions{cluster=\"under\",node=\"u1\",map=\"sessions\"} 271",
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample} in\n{metrics}");
    }
    let out = run(&["clusterstats", "--node", "127.0.0.1:28631"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("UNDER-REPLICATED sessions: 271 partitions"), "{text}");

    let _b = spawn("u2", &start_args("under", "u2", 27632, 28632, members), &[]);
    wait_for_agreement(&[28631, 28632], 2);
    wait_until("every partition to have its backup", WAIT, || {
        map_stats(28631).filter(|m| m["under_replicated_partitions"] == 0 && m["backup_entries"] == 10)
    });
    // Writes through u1 to keys it owns now go to a backup: the recovery is logged once.
    for i in 10..40 {
        assert_eq!(put(28631, "sessions", &format!("k{i}"), "v"), 200);
    }
    a.wait_for_log("writes to the map have all their synchronous backups again");
    let sessions = map_stats(28632).unwrap();
    assert_eq!(sessions["under_replicated_writes"], 10, "no write since the join was under-replicated: {sessions}");
    assert_eq!(a.log().lines().filter(|l| l.contains(warning)).count(), 1);
}

/// Two members started with the same `--node-id`: each logs an error that names the id and both
/// addresses, and tells how to fix it; neither exits.
#[test]
fn two_members_with_one_node_id_are_reported() {
    let members = "127.0.0.1:27641-27642";
    let mut a = spawn("dup-a", &start_args("dups", "same", 27641, 28641, members), &[]);
    let mut b = spawn("dup-b", &start_args("dups", "same", 27642, 28642, members), &[]);
    for node in [&mut a, &mut b] {
        let line = node.wait_for_log("two members use node id");
        assert!(line.contains("ERROR") && line.contains("\"same\""), "{line}");
        assert!(line.contains("127.0.0.1:27641") && line.contains("127.0.0.1:27642"), "{line}");
        assert!(line.contains("set --node-id"), "{line}");
    }
    assert!(a.is_running() && b.is_running());
}

/// Every configuration layer at once: the file (named by `GRAPEVINE_CONFIG`), environment
/// variables over the file (`GRAPEVINE_MEMBERS` among them), flags over both.
#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let dir = std::env::temp_dir().join(format!("grapevine-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("grapevine.toml");
    std::fs::write(
        &file,
        "cluster_name = 'from-file'\nnode_id = 'file-id'\nport = 27651\nadmin_port = 28651\n\
         port_auto_increment = false\nmembers = ['127.0.0.1:27690']\n\
         [gossip]\ninterval_ms = 150\nprobe_interval_ms = 300\njoin_timeout_ms = 500\n",
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let env = [
        ("GRAPEVINE_CONFIG", file_arg.as_str()),
        // Over the file's values.
        ("GRAPEVINE_CLUSTER_NAME", "from-env"),
        ("GRAPEVINE_NODE_ID", "env-id"),
        ("GRAPEVINE_MEMBERS", "127.0.0.1:27652,127.0.0.1:27653"),
        ("GRAPEVINE_GOSSIP__INTERVAL_MS", "200"),
    ];
    // Flags over the environment: the node id only.
    let mut node = Node::spawn("layers", &["start", "--node-id", "flag-id", "--bind", "127.0.0.1"], &env);
    node.wait_for_log("grapevine node running");
    let stats = wait_until("/stats of the layered member", WAIT, || clusterstats(28651));
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(stats["cluster_name"], "from-env", "env over file");
    assert_eq!(stats["node_id"], "flag-id", "flag over env over file");
    let config = &stats["local"]["config"];
    assert_eq!(config["port"], 27651, "from the file: {config}");
    assert_eq!(config["port_range"], "27651-27651", "port_auto_increment from the file: {config}");
    assert_eq!(config["gossip_interval_ms"], 200, "env over file: {config}");
    assert_eq!(config["probe_interval_ms"], 300, "file over the default: {config}");
    assert_eq!(config["members"], serde_json::json!(["127.0.0.1:27652", "127.0.0.1:27653"]), "{config}");
    assert_eq!(config["admin_addr"], "127.0.0.1:28651", "{config}");
}
