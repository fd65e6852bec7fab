//! The admin endpoint's error statuses, each produced by a real request to a real member in the
//! state that causes it (not by calling the status mapping): the map routes' 502, 504, 422 and 503,
//! the master hand-over's 404, 409, 503 and 504, and `/health`'s 503 while the partition table is
//! behind the master's. (`/health` while joining and while leaving: `bin/grapevine/tests/lifecycle.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use grapevine::Cluster;
use grapevine_tests::{TestCluster, WAIT, encode_key, start_member, test_config, wait_until};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `method path` with `body` on a new connection: the status and the JSON body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    };
    let text = tokio::time::timeout(WAIT, exchange).await.expect("the admin endpoint answers in time");
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

fn admin(member: &Cluster) -> SocketAddr {
    member.addresses().admin.expect("the admin endpoint is enabled")
}

/// The first string key `key-<n>` whose partition `owner` owns.
fn key_owned_by(owner: &Cluster) -> String {
    let service = owner.map_service();
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| service.table().owner(service.partition_of(&encode_key(k))) == Some(owner.local()))
        .unwrap()
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no error in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_routes_answer_502_504_422_and_503_for_what_went_wrong() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.partitions.backup_ack_timeout_ms = 300;
        config.partitions.operation_timeout_ms = 1_500;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (a, b) = (cluster.member(0), cluster.member(1));

    // 502: the owner applied the write but its synchronous backup did not confirm it.
    let mine = key_owned_by(a);
    a.net().faults().drop_outbound(b.local(), None, true);
    let (status, body) = http(admin(a), "PUT", &format!("/maps/m/entries/{mine}"), b"v").await;
    assert_eq!(status, 502, "{body}");
    assert!(error_of(&body).contains("may or may not"), "{body}");

    // 504: the key's owner cannot be reached within operation_timeout_ms.
    let theirs = key_owned_by(b);
    let started = tokio::time::Instant::now();
    let (status, body) = http(admin(a), "GET", &format!("/maps/m/entries/{theirs}"), b"").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(1_500), "answered after {:?}", started.elapsed());
    a.net().faults().drop_outbound(b.local(), None, false);

    // 422: an entry the admin routes cannot read as text (written by a typed map).
    a.map::<String, u32>("typed").unwrap().put(&"n".to_string(), &7).await.unwrap();
    let (status, body) = http(admin(b), "GET", "/maps/typed/entries/n", b"").await;
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("typed"), "{body}");
    let (status, _) = http(admin(b), "GET", &format!("/maps/m/entries/{mine}"), b"").await;
    assert_eq!(status, 200, "the owner kept serving after the 502");

    // 503: the member's map service has stopped (as during the last steps of a shutdown) while
    // its admin endpoint still answers.
    b.map_service().shutdown().await;
    let (status, body) = http(admin(b), "GET", "/maps/m/size", b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(error_of(&body).contains("shutting down"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_handover_answers_404_409_503_and_504_for_what_went_wrong() {
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = test_config(name);
        config.admin.handover_timeout_ms = 500;
        config.shutdown_timeout_seconds = 3;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    let handover = |to: &str| format!(r#"{{"node_id": "{to}"}}"#).into_bytes();

    // 404: no member has that node id; the error lists those there are.
    let (status, body) = http(admin(a), "POST", "/master/handover", &handover("nobody")).await;
    assert_eq!(status, 404, "{body}");
    assert!(error_of(&body).contains(&*b.local().node_id), "{body}");

    // 504: b cannot hear about the hand-over (its gossip with both others is cut) within
    // admin.handover_timeout_ms. The cut is shorter than failure detection.
    let cut_b = |on: bool| {
        for other in [a, c] {
            other.block_gossip_with(b.addresses().gossip, on);
            b.block_gossip_with(other.addresses().gossip, on);
        }
    };
    cut_b(true);
    let started = tokio::time::Instant::now();
    let (status, body) = http(admin(a), "POST", "/master/handover", &handover(&b.local().node_id)).await;
    cut_b(false);
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(500), "answered after {:?}", started.elapsed());
    cluster.wait_all_active(3).await;

    // c leaves, and its hand-over cannot finish (nothing it sends reaches the others).
    for other in [a, b] {
        c.net().faults().drop_outbound(other.local(), None, true);
    }
    let leaving = c.clone();
    let shutdown = tokio::spawn(async move { leaving.shutdown_reporting().await });
    wait_until("a to see c leaving", WAIT, || {
        a.view().member(c.local()).is_some_and(|m| m.state == grapevine::MemberState::Leaving)
    })
    .await;
    // 409: the target is not active.
    let (status, body) = http(admin(a), "POST", "/master/handover", &handover(&c.local().node_id)).await;
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("leaving"), "{body}");
    // 503: asked through the member that is shutting down; its /health says so too.
    let (status, body) = http(admin(c), "POST", "/master/handover", &handover(&a.local().node_id)).await;
    assert_eq!(status, 503, "{body}");
    assert!(error_of(&body).contains("shutting down"), "{body}");
    let (status, body) = http(admin(c), "GET", "/health", b"").await;
    assert_eq!((status, &body["healthy"]), (503, &Value::Bool(false)), "{body}");
    assert_eq!(body["reason"], "shutting down", "{body}");

    for other in [a, b] {
        c.net().faults().drop_outbound(other.local(), None, false);
    }
    let _ = tokio::time::timeout(WAIT, shutdown).await.expect("c's shutdown ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_partition_table_is_behind_the_masters() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    assert_eq!(http(admin(c), "GET", "/health", b"").await.0, 200);
    // c hears gossip (and so the master's epoch) but no table: nothing reaches it on the data
    // plane, and nothing it sends arrives.
    let cut = |on: bool| {
        for other in [a, b] {
            other.net().faults().drop_outbound(c.local(), None, on);
            c.net().faults().drop_outbound(other.local(), None, on);
        }
    };
    cut(true);
    // A fourth member makes the master publish new tables.
    let d = start_member(test_config(a.name()), &[a]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = http(admin(c), "GET", "/health", b"").await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "c's /health stayed 200 although its table is behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["state"], "active", "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    cut(false);
    wait_until("c to catch up", WAIT, || c.health().healthy).await;
    assert_eq!(http(admin(c), "GET", "/health", b"").await.0, 200);
    d.shutdown().await;
}
