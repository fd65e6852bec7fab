//! `redis-cli` against a three-member cluster: every command, expiry, keys written through one
//! member and read through the others, binary values, per-connection maps, and Redis's errors.
//! Needs `redis-cli` (Debian's redis-tools); see `common::tool_available`.

mod common;

use std::time::Duration;

use common::{RespCluster, WAIT, cli, cli_script, redis_cli, tool_available};

fn lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_command_through_redis_cli_on_a_three_member_cluster() {
    if !tool_available("redis-cli", "redis-tools") {
        return;
    }
    let c = RespCluster::start(3, |_| {}).await;
    let (a, b, d) = (c.addr(0), c.addr(1), c.addr(2));

    assert_eq!(cli(a, &["PING"]).await, "PONG");
    assert_eq!(cli(a, &["PING", "hello"]).await, "hello");
    assert_eq!(cli(a, &["ECHO", "hi there"]).await, "hi there");

    // Written through one member, read through every other.
    assert_eq!(cli(a, &["SET", "k1", "v1"]).await, "OK");
    assert_eq!(cli(b, &["GET", "k1"]).await, "v1");
    assert_eq!(cli(d, &["GET", "k1"]).await, "v1");
    assert_eq!(cli(b, &["GET", "missing"]).await, "", "nil");

    // SET's conditions and GET.
    assert_eq!(cli(a, &["SET", "k1", "v2", "NX"]).await, "", "NX on a present key: nil");
    assert_eq!(cli(b, &["SET", "k1", "v2", "XX", "GET"]).await, "v1", "XX GET: the old value");
    assert_eq!(cli(d, &["GET", "k1"]).await, "v2");
    assert_eq!(cli(a, &["SET", "k2", "x", "XX"]).await, "");
    assert_eq!(cli(a, &["SET", "k2", "x", "NX"]).await, "OK");
    assert_eq!(cli(a, &["SET", "k2", "x", "NX", "XX"]).await, "ERR syntax error");
    assert_eq!(cli(a, &["SET", "k2", "x", "EX", "0"]).await, "ERR invalid expire time in 'set' command");

    // Expiry: EX, PX, KEEPTTL, EXPIRE, PEXPIRE, TTL, PTTL, PERSIST.
    assert_eq!(cli(a, &["SET", "k2", "y", "EX", "100"]).await, "OK");
    let ttl: i64 = cli(b, &["TTL", "k2"]).await.parse().unwrap();
    assert!((98..=100).contains(&ttl), "{ttl}");
    let pttl: i64 = cli(d, &["PTTL", "k2"]).await.parse().unwrap();
    assert!((95_000..=100_000).contains(&pttl), "{pttl}");
    assert_eq!(cli(a, &["SET", "k2", "z", "KEEPTTL"]).await, "OK");
    let ttl: i64 = cli(b, &["TTL", "k2"]).await.parse().unwrap();
    assert!((95..=100).contains(&ttl), "KEEPTTL keeps the deadline: {ttl}");
    assert_eq!(cli(a, &["SET", "k2", "z"]).await, "OK");
    assert_eq!(cli(b, &["TTL", "k2"]).await, "-1", "a plain SET drops the time to live");
    assert_eq!(cli(b, &["TTL", "nope"]).await, "-2");
    assert_eq!(cli(b, &["PTTL", "nope"]).await, "-2");
    assert_eq!(cli(d, &["EXPIRE", "k2", "50"]).await, "1");
    let ttl: i64 = cli(a, &["TTL", "k2"]).await.parse().unwrap();
    assert!((48..=50).contains(&ttl), "{ttl}");
    assert_eq!(cli(d, &["PEXPIRE", "k2", "70000"]).await, "1");
    let ttl: i64 = cli(a, &["TTL", "k2"]).await.parse().unwrap();
    assert!((68..=70).contains(&ttl), "{ttl}");
    assert_eq!(cli(b, &["PERSIST", "k2"]).await, "1");
    assert_eq!(cli(b, &["PERSIST", "k2"]).await, "0", "nothing left to remove");
    assert_eq!(cli(a, &["TTL", "k2"]).await, "-1");
    assert_eq!(cli(a, &["EXPIRE", "nope", "5"]).await, "0");
    assert_eq!(cli(a, &["EXPIRE", "k2", "x"]).await, "ERR value is not an integer or out of range");

    // An entry with a short time to live disappears everywhere.
    assert_eq!(cli(a, &["SET", "short", "v", "PX", "300"]).await, "OK");
    assert_eq!(cli(b, &["GET", "short"]).await, "v");
    let deadline = tokio::time::Instant::now() + WAIT;
    while cli(d, &["GET", "short"]).await == "v" {
        assert!(tokio::time::Instant::now() < deadline, "the entry did not expire within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cli(b, &["EXISTS", "short"]).await, "0");

    // Several keys at once.
    assert_eq!(cli(a, &["MSET", "a", "1", "b", "2", "c", "3"]).await, "OK");
    assert_eq!(cli(b, &["MGET", "a", "b", "nope", "c"]).await, "1\n2\n\n3");
    assert_eq!(cli(d, &["EXISTS", "a", "b", "nope", "a"]).await, "3");
    assert_eq!(cli(a, &["DEL", "a", "b", "nope"]).await, "2");
    assert_eq!(cli(b, &["EXISTS", "a", "b"]).await, "0");
    assert_eq!(cli(a, &["MSET", "a", "1", "b"]).await, "ERR wrong number of arguments for 'mset' command");

    // Counters, atomic on the owner, read anywhere.
    assert_eq!(cli(a, &["INCR", "n"]).await, "1");
    assert_eq!(cli(b, &["INCRBY", "n", "10"]).await, "11");
    assert_eq!(cli(d, &["DECR", "n"]).await, "10");
    assert_eq!(cli(a, &["DECRBY", "n", "3"]).await, "7");
    assert_eq!(cli(d, &["GET", "n"]).await, "7");
    assert_eq!(cli(a, &["INCR", "k1"]).await, "ERR value is not an integer or out of range");
    assert_eq!(cli(a, &["INCRBY", "n", "abc"]).await, "ERR value is not an integer or out of range");
    assert_eq!(cli(a, &["SET", "big", "9223372036854775807"]).await, "OK");
    assert_eq!(cli(a, &["INCR", "big"]).await, "ERR increment or decrement would overflow");

    // The key space: DBSIZE, SCAN (redis-cli --scan walks the cursor), KEYS, TYPE.
    assert_eq!(cli(b, &["DBSIZE"]).await, "5");
    assert_eq!(lines(&cli(a, &["--scan"]).await), ["big", "c", "k1", "k2", "n"]);
    assert_eq!(lines(&cli(d, &["--scan", "--pattern", "k*"]).await), ["k1", "k2"]);
    // The cursor by hand, one key or more per call: every key exactly once.
    let (mut cursor, mut seen, mut calls) = ("0".to_string(), Vec::new(), 0);
    loop {
        let reply = cli(d, &["SCAN", &cursor, "COUNT", "1"]).await;
        let mut reply = reply.lines();
        cursor = reply.next().unwrap().to_string();
        seen.extend(reply.filter(|k| !k.is_empty()).map(str::to_string));
        calls += 1;
        if cursor == "0" {
            break;
        }
    }
    seen.sort();
    assert_eq!(seen, ["big", "c", "k1", "k2", "n"]);
    assert!(calls >= 5, "COUNT 1 takes several calls: {calls}");
    assert_eq!(lines(&cli(b, &["KEYS", "?"]).await), ["c", "n"]);
    assert_eq!(cli(b, &["TYPE", "c"]).await, "string");
    assert_eq!(cli(b, &["TYPE", "nope"]).await, "none");
    assert_eq!(cli(a, &["SCAN", "x"]).await, "ERR invalid cursor");

    // Binary values round-trip byte for byte.
    let binary: Vec<u8> = (0..=255u8).chain([b'\r', b'\n', 0, 0]).collect();
    assert_eq!(redis_cli(a, &["-x", "SET", "bin"], Some(&binary)).await, b"OK\n");
    let mut expected = binary.clone();
    expected.push(b'\n');
    assert_eq!(redis_cli(b, &["--raw", "GET", "bin"], None).await, expected);
    assert_eq!(cli(d, &["STRLEN", "bin"]).await, binary.len().to_string());

    // Connection state: database 0 only, other maps with GV.SELECT, client names (QUIT: see malformed.rs, redis-cli
    // handles it itself).
    assert_eq!(cli(a, &["SELECT", "0"]).await, "OK");
    assert!(cli(a, &["SELECT", "1"]).await.starts_with("ERR DB index is out of range"));
    let replies = cli_script(b, "GV.SELECT other\nSET k1 other\nGET k1\nDBSIZE\nGV.SELECT default\nGET k1\n").await;
    assert_eq!(replies, ["OK", "OK", "other", "1", "OK", "v2"]);
    assert_eq!(cli(d, &["GET", "k1"]).await, "v2", "the default map is untouched");
    assert_eq!(
        cli_script(a, "CLIENT SETNAME tester\nCLIENT GETNAME\nCLIENT SETINFO lib-name x\n").await,
        ["OK", "tester", "OK"]
    );

    // Handshakes: COMMAND, HELLO (RESP3), INFO.
    let count: usize = cli(a, &["COMMAND", "COUNT"]).await.parse().unwrap();
    assert!(count >= 30, "{count}");
    assert!(cli(a, &["COMMAND", "INFO", "get"]).await.starts_with("get\n2\n"));
    let hello = cli(a, &["-3", "HELLO", "3"]).await;
    assert!(hello.lines().any(|l| l == "proto 3"), "{hello}");
    assert_eq!(cli(b, &["-3", "GET", "k1"]).await, "v2");
    assert_eq!(cli(a, &["HELLO", "4"]).await, "NOPROTO unsupported protocol version");
    let info = cli(d, &["INFO"]).await;
    for needle in ["# Server", "redis_version:", "# Cluster", "members:3", "# Maps", "# Keyspace", "db0:keys=6"] {
        assert!(info.contains(needle), "INFO has no {needle:?}:\n{info}");
    }
    assert!(!cli(d, &["INFO", "keyspace"]).await.contains("# Server"), "INFO <section> shows that section");

    // Redis's errors for wrong arity and unknown commands.
    assert_eq!(cli(a, &["GET"]).await, "ERR wrong number of arguments for 'get' command");
    assert_eq!(cli(a, &["SET", "k"]).await, "ERR wrong number of arguments for 'set' command");
    assert_eq!(cli(a, &["TTL", "a", "b"]).await, "ERR wrong number of arguments for 'ttl' command");
    assert_eq!(
        cli(a, &["FOO", "bar", "baz"]).await,
        "ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' "
    );

    // FLUSHDB empties the map on every member.
    assert_eq!(cli(b, &["FLUSHDB"]).await, "OK");
    assert_eq!(cli(a, &["DBSIZE"]).await, "0");
    assert_eq!(cli(d, &["GET", "k1"]).await, "");
    assert_eq!(cli_script(a, "GV.SELECT other\nDBSIZE\n").await, ["OK", "1"], "other maps stay");
}
