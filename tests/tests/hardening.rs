//! Hostile input on a member's ports (issue 7, "hardened input"), end to end against in-process
//! members over real sockets: on the data plane, a raw client that completes the handshake by
//! hand (it only needs the cluster name) and then sends what no member would; on the admin port,
//! slow, large and numerous requests. Each closes or refuses that connection only: the member
//! keeps serving its peers, map operations and `/health`.

use std::net::SocketAddr;
use std::time::Duration;

use grapevine::{Cluster, PROTOCOL_VERSION};
use grapevine_tests::{TestCluster, WAIT, encode_key, test_config, wait_until, wait_until_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// The data plane's service id of the map (`grapevine_map::node::MAP_SERVICE`).
const MAP_SERVICE: u8 = 1;

// ---------------------------------------------------------------------------------------------
// Data plane

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A hello as documented in `grapevine_net`: magic, version, cluster name, node id, generation,
/// no expected member.
fn hello(cluster_name: &[u8], node_id: &str) -> Vec<u8> {
    let mut out = b"GRPV".to_vec();
    out.extend_from_slice(&PROTOCOL_VERSION.major.to_be_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.minor.to_be_bytes());
    put_str(&mut out, cluster_name);
    put_str(&mut out, node_id.as_bytes());
    out.extend_from_slice(&1u64.to_be_bytes());
    out.push(0);
    out
}

async fn read_str(stream: &mut TcpStream) -> String {
    let len = stream.read_u16().await.unwrap() as usize;
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await.unwrap();
    String::from_utf8(bytes).unwrap()
}

/// Connects to `member`'s data port and completes the handshake by hand, as an outsider who knows
/// only the cluster name.
async fn intruder(member: &Cluster, node_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(member.addresses().data).await.unwrap();
    stream.write_all(&hello(member.name().as_bytes(), node_id)).await.unwrap();
    let welcome = async {
        let mut magic = [0; 4];
        stream.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic, b"GRPV");
        let _version = (stream.read_u16().await.unwrap(), stream.read_u16().await.unwrap());
        let status = stream.read_u8().await.unwrap();
        let (_cluster, _node) = (read_str(&mut stream).await, read_str(&mut stream).await);
        let _generation = stream.read_u64().await.unwrap();
        let reason = read_str(&mut stream).await;
        assert_eq!(status, 0, "handshake refused: {reason}");
    };
    timeout(WAIT, welcome).await.expect("a welcome");
    stream
}

/// A request frame: `length u32 | kind 0 | correlation u64 | service u8 | body`.
fn request_frame(correlation: u64, service: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((10 + body.len()) as u32).to_be_bytes().to_vec();
    out.push(0);
    out.extend_from_slice(&correlation.to_be_bytes());
    out.push(service);
    out.extend_from_slice(body);
    out
}

/// Waits until the member closes `stream` (EOF or reset), ignoring what it sends first.
async fn closed_by_member(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the member closes the connection");
}

/// This process's resident memory in bytes (Linux), for a coarse check that nothing big was
/// allocated.
fn vm_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Map operations through the other members on keys that `target` owns still work, and the
/// member keeps its connections to its peers.
async fn still_serves(cluster: &TestCluster, target: usize, round: &str) {
    let owner = cluster.member(target).local().clone();
    let others: Vec<&Cluster> =
        (0..cluster.members.len()).filter(|i| *i != target).map(|i| cluster.member(i)).collect();
    let table = others[0].map_service().table();
    let keys: Vec<String> = (0..2000)
        .map(|i| format!("{round}-{i}"))
        .filter(|k| table.owner(others[0].map_service().partition_of(&encode_key(k))) == Some(&owner))
        .take(20)
        .collect();
    assert!(!keys.is_empty(), "no key owned by the target");
    let writer = others[0].map::<String, String>("hardening").unwrap();
    let reader = others[others.len() - 1].map::<String, String>("hardening").unwrap();
    for key in &keys {
        writer.put(key, &format!("value of {key}")).await.unwrap();
    }
    for key in &keys {
        assert_eq!(reader.get(key).await.unwrap(), Some(format!("value of {key}")));
    }
    assert!(cluster.member(target).health().healthy, "{:?}", cluster.member(target).health());
}

/// Peer connections of a member: one per other member, once they talked.
async fn wait_connections(member: &Cluster, n: u64, what: &str) {
    wait_until(what, WAIT, || member.net().stats().connections_open == n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_21_byte_op_announcing_a_2_pow_44_byte_map_name_is_answered_with_an_error() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let target = cluster.member(0);
    still_serves(&cluster, 0, "before").await;
    wait_connections(target, 2, "connections to both peers").await;
    let rss_before = vm_rss();

    let mut raw = intruder(target, "intruder").await;
    wait_connections(target, 3, "the raw connection").await;
    // Msg::Op { epoch: 2^40, partition: 7, map: <2^44 bytes announced>, .. }: variant 0, a 9-byte
    // varint epoch, the partition, then the map name's length prefix and one byte of it.
    let mut body = vec![0u8, 0xfd];
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    body.push(7);
    body.push(0xfd);
    body.extend_from_slice(&(1u64 << 44).to_le_bytes());
    body.push(b'm');
    assert_eq!(body.len(), 21);
    raw.write_all(&request_frame(42, MAP_SERVICE, &body)).await.unwrap();

    // An error response, or the connection closed: either way, not an abort.
    let answer = timeout(WAIT, async {
        let len = raw.read_u32().await.ok()? as usize;
        let mut frame = vec![0; len];
        raw.read_exact(&mut frame).await.ok()?;
        Some(frame)
    })
    .await
    .expect("an answer or a close");
    if let Some(frame) = answer {
        assert!(frame[0] == 1 || frame[0] == 3, "kind {} is not a response", frame[0]);
        assert_eq!(&frame[1..9], &42u64.to_be_bytes(), "the response to another request");
        let text = String::from_utf8_lossy(&frame[10..]);
        assert!(text.contains("undecodable message"), "{text}");
        assert!(text.contains("a length field announces more"), "the error says what was wrong: {text}");
    }
    still_serves(&cluster, 0, "after").await;
    if let (Some(before), Some(after)) = (rss_before, vm_rss()) {
        assert!(after < before + (100 << 20), "resident memory grew from {before} to {after} bytes");
    }
    drop(raw);
    wait_connections(target, 2, "the raw connection to close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_frames_and_long_handshake_strings_close_that_connection_only() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let target = cluster.member(0);
    still_serves(&cluster, 0, "before").await;
    wait_connections(target, 2, "connections to both peers").await;
    let stats = target.net().stats();

    // Random garbage after a valid handshake (then end of input, in case the garbage announced a
    // frame that would still be incomplete).
    let mut seed: u32 = 7;
    for round in 0..4 {
        let mut raw = intruder(target, &format!("garbage-{round}")).await;
        let garbage: Vec<u8> = (0..(64usize << round))
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (seed >> 16) as u8
            })
            .collect();
        // The member may close before reading it all.
        let _ = raw.write_all(&garbage).await;
        let _ = raw.shutdown().await;
        closed_by_member(&mut raw).await;
    }
    still_serves(&cluster, 0, "after-garbage").await;

    // A frame announcing more than frame_bytes_max: refused on its length, before any body.
    let frame_bytes_max = target.config().net.frame_bytes_max as u32;
    let malformed_before = target.net().stats().frames_malformed;
    let mut raw = intruder(target, "oversized").await;
    raw.write_all(&(frame_bytes_max + 1).to_be_bytes()).await.unwrap();
    closed_by_member(&mut raw).await;
    wait_until("the frame counted as malformed", WAIT, || target.net().stats().frames_malformed > malformed_before)
        .await;

    // A handshake whose cluster name is 60 KiB (the limit is 1 KiB): refused on its length.
    let mut raw = TcpStream::connect(target.addresses().data).await.unwrap();
    let _ = raw.write_all(&hello(&vec![b'c'; 60 << 10], "long")).await;
    closed_by_member(&mut raw).await;
    wait_until("the handshake counted as rejected", WAIT, || {
        target.net().stats().handshakes_rejected > stats.handshakes_rejected
    })
    .await;

    // The member kept its peers, serves, and holds no connection of the intruders.
    wait_connections(target, 2, "only the peer connections").await;
    still_serves(&cluster, 0, "after-all").await;
}

// ---------------------------------------------------------------------------------------------
// Admin endpoint

/// Sends `request` on a new connection and reads until the member closes it.
async fn http(addr: SocketAddr, request: Vec<u8>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The member may answer (413) and close before reading a large body: the rest of the write
    // then fails, and the close may arrive as a reset after the response.
    let _ = stream.write_all(&request).await;
    let response = read_until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Everything the peer sends until it closes the connection (EOF or reset).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut response = Vec::new();
    let mut buf = [0u8; 16 << 10];
    timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the member closes the connection");
    response
}

fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    [head.as_bytes(), body].concat()
}

async fn health(addr: SocketAddr) -> u16 {
    http(addr, request("GET", "/health", b"")).await.0
}

fn admin_addr(member: &Cluster) -> SocketAddr {
    member.addresses().admin.expect("the admin endpoint is enabled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_large_admin_requests_are_cut_off_and_the_member_carries_on() {
    let cluster = TestCluster::start_with(1, |name| {
        let mut config = test_config(name);
        config.admin.header_read_timeout_ms = 500;
        config.admin.body_read_timeout_ms = 500;
        config.net.frame_bytes_max = 64 << 10; // values up to 32 KiB
        config
    })
    .await;
    let member = cluster.member(0);
    let admin = admin_addr(member);
    wait_until_async("/health 200", WAIT, || async move { health(admin).await == 200 }).await;

    // Headers sent byte by byte, forever: cut off after the header timeout, while /health answers.
    let mut slow = TcpStream::connect(admin).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"PUT /maps/m/entries/k HTTP/1.1\r\nHost: t\r\nX-Slow: ").await.unwrap();
    assert_eq!(health(admin).await, 200);
    let mut buf = [0u8; 256];
    loop {
        if slow.write_all(b"a").await.is_err() {
            break;
        }
        match timeout(Duration::from_millis(20), slow.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                panic!("answered a request whose headers never ended: {:?}", String::from_utf8_lossy(&buf[..n]))
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < WAIT, "the slow client is still connected after {:?}", started.elapsed());
    }
    assert!(started.elapsed() >= Duration::from_millis(450), "cut off after {:?}", started.elapsed());
    assert_eq!(health(admin).await, 200);

    // A body that never arrives in full: 408, with the key to raise.
    let mut partial = request("PUT", "/maps/m/entries/k", &[b'v'; 100]);
    partial.truncate(partial.len() - 90);
    let (status, body) = http(admin, partial).await;
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("\"error\"") && body.contains("admin.body_read_timeout_ms"), "{body}");

    // Bodies over the caps: 413 with a JSON error, for a map value and for an operator route.
    let (status, body) = http(admin, request("PUT", "/maps/m/entries/k", &vec![b'v'; 40 << 10])).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"error\"") && body.contains("net.frame_bytes_max"), "{body}");
    let (status, body) = http(admin, request("POST", "/master/handover", &vec![b' '; (1 << 20) + 1])).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("\"error\""), "{body}");

    // The member carries on: a value within the cap is stored and read back, /health answers.
    let (status, body) = http(admin, request("PUT", "/maps/m/entries/k", &vec![b'v'; 30 << 10])).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(admin, request("GET", "/maps/m/entries/k", b"")).await;
    assert_eq!((status, body.len()), (200, 30 << 10));
    assert_eq!(health(admin).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_beyond_the_cap_wait_and_are_served_when_others_close() {
    let cluster = TestCluster::start_with(1, |name| {
        let mut config = test_config(name);
        config.admin.connections_max = 2;
        config
    })
    .await;
    let admin = admin_addr(cluster.member(0));
    wait_until_async("/health 200", WAIT, || async move { health(admin).await == 200 }).await;

    // Two idle connections take both slots (the header timeout is the default 5 s).
    let idle: Vec<TcpStream> = vec![TcpStream::connect(admin).await.unwrap(), TcpStream::connect(admin).await.unwrap()];
    let waiting: Vec<_> = (0..10).map(|_| tokio::spawn(health(admin))).collect();
    // None is served while both slots are taken: give them time to be served wrongly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(waiting.iter().filter(|w| w.is_finished()).count(), 0, "served beyond connections_max");
    drop(idle);
    for w in waiting {
        assert_eq!(timeout(WAIT, w).await.expect("served once the idle connections closed").unwrap(), 200);
    }
    // And many more, two at a time, without error.
    let many: Vec<_> = (0..40).map(|_| tokio::spawn(health(admin))).collect();
    for m in many {
        assert_eq!(m.await.unwrap(), 200);
    }
}
