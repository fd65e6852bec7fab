//! Bad input ends with a short message that names the key, and the documented exit status; never
//! a panic or a backtrace.

mod common;

use std::path::PathBuf;

use common::*;

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("grapevine-errors-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

/// Runs `grapevine start <args>` and checks: exit 2, a few lines on stderr, each needle present.
fn assert_config_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let mut all = vec!["start"];
    all.extend_from_slice(args);
    let out = run(&all, env);
    let stderr = clean_stderr(&out);
    assert_eq!(out.status.code(), Some(2), "grapevine {all:?} {env:?}: {stderr}");
    assert!(stderr.lines().count() <= 8, "too long: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing for {all:?} {env:?}: {stderr}");
    }
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let unknown = temp_file("unknown", "cluster_name = 'x'\nprot = 5701\n");
    let unknown_nested = temp_file("nested", "cluster_name = 'x'\n[gossip]\ninterval = 5\n");
    let wrong_type = temp_file("type", "cluster_name = 'x'\nport = 'high'\n");
    let bad_ip = temp_file("ip", "cluster_name = 'x'\nbind = '10.0.0.300'\n");
    let syntax = temp_file("syntax", "cluster_name = 'x\n");
    let (u, n, w, b, s) = (
        unknown.to_str().unwrap(),
        unknown_nested.to_str().unwrap(),
        wrong_type.to_str().unwrap(),
        bad_ip.to_str().unwrap(),
        syntax.to_str().unwrap(),
    );
    assert_config_error(&["--config", u], &[], &["`prot`", u]);
    assert_config_error(&["--config", n], &[], &["`gossip.interval`", "interval_ms", n]);
    assert_config_error(&["--config", w], &[], &["`port`", "u16", w]);
    assert_config_error(&["--config", b], &[], &["`bind`", "IP address", b]);
    assert_config_error(&["--config", s], &[], &[s, "line 1"]);
    assert_config_error(&["--config", "/nonexistent/grapevine.toml"], &[], &["/nonexistent/grapevine.toml"]);

    // Environment.
    assert_config_error(
        &["--cluster-name", "x"],
        &[("GRAPEVINE_GOSSIP__INTERVAL_MS", "fast")],
        &["`gossip.interval_ms`", "GRAPEVINE_GOSSIP__INTERVAL_MS", "u64"],
    );
    assert_config_error(
        &["--cluster-name", "x"],
        &[("GRAPEVINE_GOSSIP__INTERVAL_MS", "1")],
        &["`gossip.interval_ms`", "GRAPEVINE_GOSSIP__INTERVAL_MS", "between 10 and 60000"],
    );
    assert_config_error(&["--cluster-name", "x"], &[("GRAPEVINE_PROT", "1")], &["`prot`", "GRAPEVINE_PROT"]);
    assert_config_error(&[], &[("GRAPEVINE_CLUSTER_NAME", "")], &["`cluster_name`", "GRAPEVINE_CLUSTER_NAME"]);

    // Flags.
    assert_config_error(&["--cluster-name", ""], &[], &["`cluster_name`", "--cluster-name", "must not be empty"]);
    assert_config_error(&[], &[], &["`cluster_name`", "must not be empty"]);
    assert_config_error(
        &["--cluster-name", "x", "--members", "10.0.0.1:99999"],
        &[],
        &["`members`", "--members", "99999"],
    );
    assert_config_error(&["--cluster-name", "x", "--port", "abc"], &[], &["--port", "abc"]);
    assert_config_error(&["--cluster-name", "x", "--bind", "nowhere"], &[], &["--bind", "nowhere"]);
    assert_config_error(&["--cluster-name", "x", "--port", "65500"], &[], &["`port`", "65535"]);
    assert_config_error(&["--cluster-name", "x", "--bogus"], &[], &["--bogus"]);

    for path in [unknown, unknown_nested, wrong_type, bad_ip, syntax] {
        std::fs::remove_file(path).ok();
    }
}

#[test]
fn an_exhausted_port_range_exits_1_naming_the_range() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = run(
        &["start", "--cluster-name", "x", "--bind", "127.0.0.1", "--port", &port, "--admin-port", "0"],
        &[("GRAPEVINE_PORT_COUNT", "1")],
    );
    let stderr = clean_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}-{port}")), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("grapevine:")).count(), 1, "{stderr}");
}

#[test]
fn clusterstats_of_nothing_is_one_line_and_exit_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = format!("127.0.0.1:{port}");
    for args in [vec!["clusterstats", "--node", &node], vec!["clusterstats", "--json", "--node", &node]] {
        let out = run(&args, &[]);
        let stderr = clean_stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&node) && stderr.contains("connection refused"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = run(&["master", "--node", &node, "--handover-to", "a"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(clean_stderr(&out).lines().count(), 1);
}

/// A server that is not a grapevine admin endpoint (answers something that is not JSON).
#[test]
fn clusterstats_of_a_foreign_server_is_one_line_and_exit_1() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    });
    let out = run(&["clusterstats", "--node", &node], &[]);
    let stderr = clean_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&node) && stderr.contains("not JSON"), "{stderr}");
    server.join().unwrap();
}
