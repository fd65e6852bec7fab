//! Fuzzing of the admin router as a property test: random methods, paths (percent-encoded bytes,
//! route words, separators), query strings and bodies, sent with `tower::ServiceExt::oneshot` to
//! the router of a running single-member cluster. No request may panic a handler or fail the
//! member (5xx); every client error is JSON with an `error` message. Case counts: see
//! `fuzz_support` (`GRAPEVINE_FUZZ_CASES`, `scripts/fuzz.sh`).

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tower::ServiceExt as _;

use crate::admin::{OPERATOR_BODY_BYTES_MAX, router};
use crate::{Cluster, Config};

#[path = "../../net/src/fuzz_support.rs"]
mod fuzz_support;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        3 => Just(Method::PUT),
        2 => Just(Method::DELETE),
        2 => Just(Method::POST),
        1 => Just(Method::HEAD),
        1 => Just(Method::PATCH),
        1 => Just(Method::OPTIONS),
    ]
}

/// A path segment: route words, plain text, percent-encoded bytes (invalid UTF-8 and `%2F`
/// included), broken escapes, dot segments.
fn segment() -> impl Strategy<Value = String> {
    const WORDS: &[&str] = &[
        "maps",
        "entries",
        "size",
        "health",
        "stats",
        "metrics",
        "master",
        "handover",
        "m",
        "topics",
        "publish",
        "subscribe",
    ];
    prop_oneof![
        4 => prop::sample::select(WORDS).prop_map(str::to_string),
        3 => "[a-zA-Z0-9._~!$&'()*+,;=:@-]{0,10}",
        2 => prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect()),
        1 => prop_oneof![Just("%"), Just("%4"), Just("%zz"), Just(".."), Just("."), Just("")].prop_map(str::to_string),
    ]
}

/// Mostly the routes with random segments, sometimes the fixed routes or any segments.
fn path() -> impl Strategy<Value = String> {
    const FIXED: &[&str] = &["/health", "/stats", "/metrics", "/master/handover", "/maps", "/"];
    let entry = (segment(), segment()).prop_map(|(map, key)| format!("/maps/{map}/entries/{key}"));
    let size = segment().prop_map(|map| format!("/maps/{map}/size"));
    let topic = (segment(), prop_oneof![Just("publish"), Just("subscribe")])
        .prop_map(|(topic, action)| format!("/topics/{topic}/{action}"));
    let any_segments = prop::collection::vec(segment(), 0..5).prop_map(|s| format!("/{}", s.join("/")));
    prop_oneof![
        4 => entry,
        2 => size,
        2 => topic,
        2 => prop::sample::select(FIXED).prop_map(str::to_string),
        1 => any_segments,
    ]
}

fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("1".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("true".to_string()),
        Just("oldest".to_string()),
        segment(),
    ];
    let name = prop_oneof![
        3 => Just("ttl_seconds".to_string()),
        1 => Just("reliable".to_string()),
        1 => Just("from_sequence".to_string()),
        1 => Just("from".to_string()),
        1 => segment(),
    ];
    let pair = (name, value).prop_map(|(n, v)| format!("{n}={v}"));
    prop_oneof![
        2 => Just(String::new()),
        3 => prop::collection::vec(pair, 0..3).prop_map(|pairs| format!("?{}", pairs.join("&"))),
        1 => segment().prop_map(|s| format!("?{s}")),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json = prop_oneof![
        "[a-z0-9-]{0,12}".prop_map(|id| format!("{{\"node_id\": \"{id}\"}}")),
        Just("{\"node_id\": 5}".to_string()),
        Just("{\"node_id\": \"a\", \"extra\": 1}".to_string()),
        Just("{\"node\": \"a\"}".to_string()),
        Just("[]".to_string()),
        "\\PC{0,20}",
    ];
    prop_oneof![
        2 => fuzz_support::random_bytes(),
        2 => "\\PC{0,64}".prop_map(String::into_bytes),
        2 => json.prop_map(String::into_bytes),
        // Just over the cap of the operator routes (413 there; a value for the map routes).
        1 => Just(vec![b'x'; OPERATOR_BODY_BYTES_MAX + 1]),
    ]
}

async fn single_member() -> Cluster {
    let mut config = Config::new(format!("fuzz-{}", std::process::id()));
    config.port = 0;
    config.admin_enabled = false;
    config.gossip.interval_ms = 100;
    config.gossip.join_timeout_ms = 200;
    config.partitions.count = 16;
    config.partitions.operation_timeout_ms = 5_000;
    let cluster = Cluster::builder().config(config).bind("127.0.0.1".parse().unwrap()).start().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cluster.health().healthy {
        assert!(tokio::time::Instant::now() < deadline, "the member did not become healthy: {:?}", cluster.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
}

#[test]
fn admin_requests_never_fail_the_member() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = runtime.block_on(single_member());
    let router = router(cluster.downgrade(), crate::admin::value_bytes_max(cluster.config().net.frame_bytes_max));
    let config = proptest::test_runner::Config {
        source_file: Some(file!()),
        test_name: Some("admin_requests_never_fail_the_member"),
        ..fuzz_support::config(500)
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&(method(), path(), query(), body()), |(method, path, query, body)| {
        let uri = format!("{path}{query}");
        // Inputs that are not a URI at all are refused by hyper before any routing.
        let Ok(request) = Request::builder().method(method.clone()).uri(&uri).body(Body::from(body)) else {
            return Ok(());
        };
        let (status, bytes) = runtime.block_on(async {
            let response = tokio::time::timeout(Duration::from_secs(10), router.clone().oneshot(request))
                .await
                .expect("the router answers within 10 s")
                .expect("the router is infallible");
            let status = response.status();
            if response.headers().get("content-type").is_some_and(|t| t == "application/x-ndjson") {
                // A subscription streams until the client goes: dropping it is going.
                return (status, axum::body::Bytes::new());
            }
            (status, axum::body::to_bytes(response.into_body(), 64 << 20).await.expect("a readable response"))
        });
        let text = String::from_utf8_lossy(&bytes);
        prop_assert!(!status.is_server_error(), "{} {} answered {}: {}", method, uri, status, text);
        if status.is_client_error() && method != Method::HEAD {
            let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestCaseError::fail(format!("{method} {uri} answered {status} without JSON ({e}): {text}"))
            })?;
            prop_assert!(
                json["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{} {} answered {}: {}",
                method,
                uri,
                status,
                text
            );
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            prop_assert!(text.contains("larger than"), "{}", text);
        }
        Ok(())
    });
    // The member still answers after all of it.
    assert!(cluster.health().healthy, "{:?}", cluster.health());
    runtime.block_on(cluster.kill());
    if let Err(e) = result {
        panic!("{e}");
    }
}
