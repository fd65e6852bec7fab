//! The distributed map through real processes: `grapevine map` and the admin `/maps` routes write
//! through one member and read through the others, entries expire, a graceful leave loses
//! nothing, and `clusterstats` and `/metrics` show the map.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Entries written to the main map.
const KEYS: usize = 200;
/// Keys written with the CLI (the rest with HTTP PUT, which is much faster than a process each).
const CLI_KEYS: usize = 5;

/// A blocking HTTP client for the admin endpoint.
struct Http {
    agent: ureq::Agent,
}

impl Http {
    fn new() -> Http {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(40)))
            .http_status_as_error(false)
            .proxy(None)
            .build();
        Http { agent: ureq::Agent::new_with_config(config) }
    }

    fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
        let mut response = response.expect("the admin endpoint answers");
        let status = response.status().as_u16();
        (status, response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap())
    }

    fn put(&self, admin: u16, path: &str, body: &[u8]) -> (u16, String) {
        Http::reply(self.agent.put(format!("http://127.0.0.1:{admin}{path}")).send(body))
    }

    fn get(&self, admin: u16, path: &str) -> (u16, String) {
        Http::reply(self.agent.get(format!("http://127.0.0.1:{admin}{path}")).call())
    }

    fn delete(&self, admin: u16, path: &str) -> (u16, String) {
        Http::reply(self.agent.delete(format!("http://127.0.0.1:{admin}{path}")).call())
    }

    fn post(&self, admin: u16, path: &str) -> (u16, String) {
        Http::reply(self.agent.post(format!("http://127.0.0.1:{admin}{path}")).send(""))
    }
}

/// A URL path segment.
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn entry(map: &str, key: &str) -> String {
    format!("/maps/{}/entries/{}", segment(map), segment(key))
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The main map's keys: a few with characters that need percent-encoding (written with the CLI).
fn key(i: usize) -> String {
    if i < CLI_KEYS { format!("cli key/{i} ü..") } else { format!("key-{i}") }
}

fn value(i: usize) -> String {
    format!("value {i} of {}", key(i))
}

fn node_arg(admin: u16) -> String {
    format!("127.0.0.1:{admin}")
}

/// `grapevine map <args> --node 127.0.0.1:<admin>`.
fn map_cli(admin: u16, args: &[&str]) -> std::process::Output {
    let node = node_arg(admin);
    let mut all = vec!["map"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--node", &node]);
    run(&all, &[])
}

/// Asserts success; returns stdout.
fn cli_ok(admin: u16, args: &[&str]) -> String {
    let out = map_cli(admin, args);
    let stderr = clean_stderr(&out);
    assert!(out.status.success(), "grapevine map {args:?} via {admin}: {:?} {stderr}", out.status);
    assert!(stderr.is_empty(), "grapevine map {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// The samples of a Prometheus text: (name, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (name, rest) = line.split_once('{').unwrap_or_else(|| panic!("{line}"));
            let (labels, value) = rest.rsplit_once("} ").unwrap_or_else(|| panic!("{line}"));
            let labels = labels
                .split("\",")
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap())
        })
        .collect()
}

/// Three members on their own ports; entries written through the first are read through the
/// others, with the CLI and HTTP; a graceful leave of the first loses none of them.
#[test]
fn map_entries_survive_a_graceful_leave_and_show_in_stats() {
    let started = Instant::now();
    let cluster = format!("maps-{}", std::process::id());
    let map = "sessions";
    // Started at the same moment: each may lead for an instant and publish a partition table of
    // its own before they agree on the master; they must converge on the master's table without
    // losing writes (the start-up race the chaos tests also cover).
    let (mut nodes, admins) = start_three(&cluster, "m", 27200, 28200, FAST_TIMERS);
    wait_for_agreement(&admins, 3);
    for admin in &admins {
        let health = format!("http://127.0.0.1:{admin}/health");
        wait_until("every member to be healthy", WAIT, || http_get(&health).filter(|(status, _)| *status == 200));
    }
    assert_eq!(admins, vec![28201, 28202, 28203]);
    let (n1, n2, n3) = (admins[0], admins[1], admins[2]);
    let http = Http::new();

    // Writes through node 1: a few with the CLI, the rest with HTTP.
    let writes = Instant::now();
    for i in 0..CLI_KEYS {
        assert_eq!(cli_ok(n1, &["put", map, &key(i), &value(i)]), "", "no previous value");
    }
    assert_eq!(cli_ok(n1, &["put", map, &key(0), &value(0)]), format!("{}\n", value(0)), "the previous value");
    for i in CLI_KEYS..KEYS {
        let (status, body) = http.put(n1, &entry(map, &key(i)), value(i).as_bytes());
        assert_eq!((status, json(&body)), (200, serde_json::json!({"previous": null})), "{}", key(i));
    }
    let (status, body) = http.put(n1, &entry(map, &key(KEYS - 1)), value(KEYS - 1).as_bytes());
    assert_eq!((status, json(&body)["previous"].as_str()), (200, Some(value(KEYS - 1).as_str())));
    let write_time = writes.elapsed();

    // Reads through nodes 2 and 3.
    for admin in [n2, n3] {
        for i in 0..KEYS {
            assert_eq!(http.get(admin, &entry(map, &key(i))), (200, value(i)), "{} via {admin}", key(i));
        }
        for i in [0, 1, CLI_KEYS, KEYS - 1] {
            assert_eq!(cli_ok(admin, &["get", map, &key(i)]), format!("{}\n", value(i)));
        }
    }
    for admin in &admins {
        assert_eq!(cli_ok(*admin, &["size", map]), format!("{KEYS}\n"), "size via {admin}");
    }

    // An absent key: exit 1, one line on stderr, nothing on stdout.
    let out = map_cli(n2, &["get", map, "no such key"]);
    let stderr = clean_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("\"no such key\"") && stderr.contains("\"sessions\""), "{stderr}");
    assert!(out.stdout.is_empty());

    // Remove prints the removed value, then nothing.
    cli_ok(n3, &["put", "scratch", "k", "-v-"]);
    assert_eq!(cli_ok(n1, &["remove", "scratch", "k"]), "-v-\n");
    assert_eq!(cli_ok(n2, &["remove", "scratch", "k"]), "");
    assert_eq!(map_cli(n3, &["get", "scratch", "k"]).status.code(), Some(1));
    assert_eq!(cli_ok(n3, &["size", "scratch"]), "0\n");

    // Time to live: a 3 s entry is there at first and disappears (read from another member), a 1 h
    // entry does not. 3 s leave time enough for the first read on a slow machine.
    cli_ok(n1, &["put", "ephemeral", "long", "stays", "--ttl", "3600"]);
    let written = Instant::now();
    cli_ok(n1, &["put", "ephemeral", "short", "goes", "--ttl", "3"]);
    let (status, body) = http.get(n2, &entry("ephemeral", "short"));
    assert_eq!((status, body.as_str()), (200, "goes"), "read {:?} after the write", written.elapsed());
    wait_until("the 3 s entry to expire", Duration::from_secs(15), || {
        (map_cli(n3, &["get", "ephemeral", "short"]).status.code() == Some(1)).then_some(())
    });
    assert!(written.elapsed() >= Duration::from_millis(2900), "expired after {:?}", written.elapsed());
    assert_eq!(cli_ok(n2, &["get", "ephemeral", "long"]), "stays\n");

    // clusterstats shows the map with its entries (and at least as many backup copies: every
    // entry has one synchronous backup), and the partition table.
    wait_until("clusterstats to show the map's entries", WAIT, || {
        let out = run(&["clusterstats", "--node", &node_arg(n1)], &[]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let row: Vec<&str> =
            text.lines().find(|l| l.trim_start().starts_with("sessions "))?.split_whitespace().collect();
        // NAME ENTRIES BACKUP HITS GETS PUTS REMOVES GET P99 PUT P99 MEMORY SYNC+ASYNC
        let backups: usize = row[2].parse().ok()?;
        (row[1] == KEYS.to_string() && backups >= KEYS && row.last() == Some(&"1+0")).then_some(())
    });
    let out = run(&["clusterstats", "--node", &node_arg(n2)], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["PARTITIONS", "Count              271", "Table epoch", "MAPS", "m1", "m2", "m3"] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    let stats = clusterstats(n1).unwrap();
    let owned: u64 =
        stats["partitions"]["owned_by_member"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(owned, 271, "{stats}");
    let sessions = stats["maps"].as_array().unwrap().iter().find(|m| m["name"] == map).unwrap();
    assert_eq!(sessions["per_member"].as_array().unwrap().len(), 3, "{sessions}");
    // Once migrations are over, backup_count 1 means exactly one backup copy of each entry.
    wait_until("one backup copy per entry", WAIT, || {
        let stats = clusterstats(n1)?;
        let sessions = stats["maps"].as_array()?.iter().find(|m| m["name"] == map)?.clone();
        (stats["partitions"]["migrating"] == 0 && sessions["backup_entries"] == KEYS).then_some(())
    });

    // /metrics: per-map series with a `map` label, and the partition gauges.
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{n3}/metrics")).unwrap();
    assert_eq!(status, 200);
    let samples = samples(&metrics);
    let find = |name: &str, map_label: Option<&str>| {
        samples
            .iter()
            .find(|(n, labels, _)| n == name && labels.get("map").map(String::as_str) == map_label)
            .map(|(_, labels, value)| (labels.clone(), *value))
            .unwrap_or_else(|| panic!("{name} {map_label:?} in\n{metrics}"))
    };
    let (labels, entries) = find("grapevine_map_entries", Some(map));
    assert_eq!(entries, KEYS as f64, "{metrics}");
    assert_eq!(labels.get("cluster"), Some(&cluster));
    assert_eq!(labels.get("node").map(String::as_str), Some("m3"));
    assert!(find("grapevine_map_backup_entries", Some(map)).1 >= KEYS as f64);
    assert!(find("grapevine_map_puts_total", Some(map)).1 >= (KEYS + 2) as f64);
    assert!(find("grapevine_map_gets_total", Some(map)).1 >= (2 * KEYS) as f64);
    assert!(find("grapevine_map_hits_total", Some(map)).1 >= (2 * KEYS) as f64);
    assert!(find("grapevine_map_memory_bytes", Some(map)).1 > 0.0);
    for name in
        ["grapevine_map_removes_total", "grapevine_map_get_p99_microseconds", "grapevine_map_put_p99_microseconds"]
    {
        find(name, Some(map));
    }
    // Two removes: one of a present key, one of an absent key.
    assert_eq!(find("grapevine_map_removes_total", Some("scratch")).1, 2.0);
    assert!(find("grapevine_partition_table_epoch", None).1 >= 1.0);
    let owned = find("grapevine_partitions_owned", None).1;
    assert!(owned > 0.0 && owned < 271.0, "{metrics}");
    assert!(find("grapevine_partitions_backup", None).1 > 0.0);
    find("grapevine_migrations_in_progress", None);

    // A graceful leave of node 1 (SIGTERM): it hands its partitions over and exits 0.
    let leave = Instant::now();
    nodes[0].signal("TERM");
    let status = nodes[0].wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", nodes[0].log());
    let leave_time = leave.elapsed();
    wait_for_agreement(&admins[1..], 2);

    // Every entry is still there, through both remaining members.
    for admin in [n2, n3] {
        for i in 0..KEYS {
            assert_eq!(
                http.get(admin, &entry(map, &key(i))),
                (200, value(i)),
                "{} via {admin} after the leave",
                key(i)
            );
        }
        assert_eq!(cli_ok(admin, &["size", map]), format!("{KEYS}\n"));
        assert_eq!(cli_ok(admin, &["get", map, &key(1)]), format!("{}\n", value(1)));
    }
    eprintln!("writes {write_time:?}, leave {leave_time:?}, total {:?}", started.elapsed());
}

/// Bad requests to the admin map routes are answered with a status and a JSON error; keys that
/// need percent-encoding round-trip.
#[test]
fn admin_map_routes_reject_bad_requests() {
    let args = [
        "start",
        "--cluster-name",
        "map-routes",
        "--bind",
        "127.0.0.1",
        "--port",
        "27211",
        "--admin-port",
        "28211",
        "--node-id",
        "solo",
    ];
    let mut env = FAST_TIMERS.to_vec();
    env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    let mut node = Node::spawn("solo", &args, &env);
    let admin = node.admin_port();
    let health = format!("http://127.0.0.1:{admin}/health");
    wait_until("the member to be healthy", WAIT, || http_get(&health).filter(|(status, _)| *status == 200));
    let http = Http::new();
    let error_of = |(status, body): (u16, String)| (status, json(&body)["error"].as_str().unwrap().to_string());

    // A body that is not UTF-8.
    let (status, error) = error_of(http.put(admin, "/maps/m/entries/k", &[0xff, 0xfe, 0x00]));
    assert_eq!(status, 400);
    assert!(error.contains("UTF-8"), "{error}");

    // Bad times to live, and an unknown parameter.
    for query in ["ttl_seconds=0", "ttl_seconds=abc", "ttl_seconds=-1", "ttl_seconds=", "ttl=5"] {
        let (status, error) = error_of(http.put(admin, &format!("/maps/m/entries/k?{query}"), b"v"));
        assert_eq!(status, 400, "{query}: {error}");
        assert!(error.contains("ttl"), "{query}: {error}");
    }
    assert_eq!(http.get(admin, "/maps/m/size"), (200, r#"{"map":"m","size":0}"#.to_string()));

    // An absent key.
    let (status, body) = http.get(admin, "/maps/m/entries/missing");
    assert_eq!(status, 404);
    assert_eq!(json(&body), serde_json::json!({"error": "key \"missing\" not found in map \"m\""}));
    assert_eq!(http.delete(admin, "/maps/m/entries/missing"), (200, r#"{"previous":null}"#.to_string()));

    // Keys and map names are percent-decoded path segments.
    for (map, key) in [("m", "a/b"), ("m", ".."), ("m", "sp ace?#"), ("ümlaut map", "ключ"), ("m", "%41")] {
        let (status, _) = http.put(admin, &format!("{}?ttl_seconds=60", entry(map, key)), key.as_bytes());
        assert_eq!(status, 200, "{map:?} {key:?}");
        assert_eq!(http.get(admin, &entry(map, key)), (200, key.to_string()), "{map:?} {key:?}");
    }
    assert_eq!(http.get(admin, "/maps/m/entries/A").0, 404, "%41 was stored as the key \"%41\"");
    assert_eq!(http.get(admin, "/maps/m/size"), (200, r#"{"map":"m","size":4}"#.to_string()));
    let (status, body) = http.delete(admin, &entry("m", "a/b"));
    assert_eq!((status, json(&body)), (200, serde_json::json!({"previous": "a/b"})));

    // An invalid map name is the map's own error (400).
    let (status, error) = error_of(http.get(admin, "/maps/a%01b/size"));
    assert_eq!(status, 400);
    assert!(error.contains("invalid map name"), "{error}");
    let (status, _) = error_of(http.get(admin, "/maps/%FF/size"));
    assert_eq!(status, 400);

    // A value larger than the limit (net.frame_bytes_max, 16 MiB, minus 32 KiB).
    let too_large = vec![b'a'; (16 << 20) - (32 << 10) + 1];
    let (status, error) = error_of(http.put(admin, "/maps/m/entries/big", &too_large));
    assert_eq!(status, 413, "{error}");
    assert!(error.contains("net.frame_bytes_max"), "{error}");

    // Wrong method, unknown route: the route list.
    for (status, body) in [http.post(admin, "/maps/m/size"), http.get(admin, "/maps/m")] {
        assert!(status == 405 || status == 404, "{status} {body}");
        let routes = json(&body)["routes"].as_array().unwrap().clone();
        assert!(routes.iter().any(|r| r == "PUT /maps/{map}/entries/{key}"), "{body}");
        assert!(routes.iter().any(|r| r == "GET /maps/{map}/size"), "{body}");
    }

    // CLI errors: --ttl 0 is a usage error (2); an unreachable member is one line and exit 1.
    let out = map_cli(admin, &["put", "m", "k", "v", "--ttl", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", clean_stderr(&out));
    let out = map_cli(admin, &["get", "m"]);
    assert_eq!(out.status.code(), Some(2), "{}", clean_stderr(&out));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for args in [&["get", "m", "k"][..], &["put", "m", "k", "v"], &["remove", "m", "k"], &["size", "m"]] {
        let out = map_cli(closed, args);
        let stderr = clean_stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("connection refused"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    // A server error is one line with the member's message.
    let out = map_cli(admin, &["size", "a\u{1}b"]);
    let stderr = clean_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HTTP 400") && stderr.contains("invalid map name"), "{stderr}");
    drop(node);
}
