//! The admin HTTP endpoint, served on `admin_port` when `admin_enabled`:
//!
//! | route                              | what                                                    |
//! |------------------------------------|---------------------------------------------------------|
//! | `GET /health`                      | 200 + JSON when the member can serve, 503 + JSON with   |
//! |                                    | `reason` otherwise: the load-balancer check             |
//! | `GET /stats`                       | the [`crate::stats::ClusterStats`] document (`grapevine clusterstats`) |
//! | `GET /metrics`                     | Prometheus text exposition                              |
//! | `POST /master/handover`            | `{"node_id": "..."}`: make that member the master       |
//! | `PUT /maps/{map}/entries/{key}`    | set a string entry (body: the value; `?ttl_seconds=N`)  |
//! | `GET /maps/{map}/entries/{key}`    | read it (200 + the value as `text/plain`, or 404)       |
//! | `DELETE /maps/{map}/entries/{key}` | remove it                                               |
//! | `GET /maps/{map}/size`             | `{"map": "...", "size": N}`                             |
//!
//! **Keep this port on a management network.** There is no authentication: operator routes change
//! the cluster (master hand-over), and the `/maps` routes read and write map entries. They are
//! meant for operators and scripts (`grapevine map`), not as the data path of applications, which
//! embed a member and use [`crate::Cluster::map`]. Bind the endpoint to a management interface
//! with `admin_bind`, or turn it off with `admin_enabled = false`.
//!
//! **Map routes.** Keys and values are strings (a map used as `DistributedMap<String, String>`);
//! the map name and the key are URL path segments, percent-decoded (`/` in a key is `%2F`).
//! * `PUT` takes the value as the raw request body, which must be UTF-8 (else 400) and at most
//!   `net.frame_bytes_max` minus 32 KiB (else 413), and an optional `ttl_seconds` query parameter
//!   (an integer of at least 1, else 400). It answers 200 `{"previous": "<old value>" | null}`.
//! * `GET` answers 200 with the value as the body (`text/plain; charset=utf-8`), or 404
//!   `{"error": "key \"k\" not found in map \"m\""}`.
//! * `DELETE` answers 200 `{"previous": "<old value>" | null}`.
//! * Map errors answer `{"error": "<message>"}` with 504 (timed out), 502 (the owner failed, or
//!   the write's outcome is unknown: it may or may not have been applied), 422 (the map holds
//!   keys or values that are not strings), 400 (invalid map name or argument) or 503 (this member
//!   is shutting down).
//!
//! Errors are JSON `{"error": "..."}` with the full message; unknown routes answer 404 with the
//! list of routes. Malformed HTTP is rejected by hyper per connection and never affects the member.

use std::fmt::Write as _;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use grapevine_map::{Expiry, MapError};
use grapevine_membership::MembershipError;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::DistributedMap;
use crate::cluster::{Cluster, ClusterError, WeakCluster};
use crate::stats::{ClusterStats, MapStats};

/// How long `POST /master/handover` waits for the new master to be seen.
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes, for the 404 answer.
const ROUTES: &[&str] = &[
    "GET /health",
    "GET /stats",
    "GET /metrics",
    "POST /master/handover",
    "PUT /maps/{map}/entries/{key}",
    "GET /maps/{map}/entries/{key}",
    "DELETE /maps/{map}/entries/{key}",
    "GET /maps/{map}/size",
];

/// Room left in a data-plane frame, beside a value, for the key, the map name and the message.
const FRAME_HEADROOM: usize = 32 << 10;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn serve(cluster: WeakCluster, listener: TcpListener, cancel: CancellationToken) {
    let Some(frame_bytes_max) = cluster.upgrade().map(|c| c.config().net.frame_bytes_max) else { return };
    let router = router(cluster, value_bytes_max(frame_bytes_max));
    let served = axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned()).await;
    if let Err(error) = served {
        warn!(%error, "admin endpoint stopped with an error");
    }
}

/// The largest value `PUT /maps/...` accepts: what fits in a data-plane frame beside the key.
fn value_bytes_max(frame_bytes_max: usize) -> usize {
    frame_bytes_max.saturating_sub(FRAME_HEADROOM).max(1)
}

#[derive(Clone)]
struct AdminState {
    cluster: WeakCluster,
    value_bytes_max: usize,
}

fn router(cluster: WeakCluster, value_bytes_max: usize) -> Router {
    let maps = Router::new()
        .route("/maps/{map}/entries/{key}", get(map_get).put(map_put).delete(map_remove))
        .route("/maps/{map}/size", get(map_size))
        .layer(DefaultBodyLimit::max(value_bytes_max))
        .with_state(AdminState { cluster: cluster.clone(), value_bytes_max });
    Router::new()
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/master/handover", post(handover))
        .with_state(cluster)
        .merge(maps)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

fn gone() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "down", "reason": "member stopped", "error": "member stopped"})),
    )
        .into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "no such route", "routes": ROUTES }))).into_response()
}

async fn method_not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, Json(json!({ "error": "method not allowed on this route", "routes": ROUTES })))
        .into_response()
}

async fn health(State(cluster): State<WeakCluster>) -> Response {
    let Some(cluster) = cluster.upgrade() else { return gone() };
    let health = cluster.health();
    let code = if health.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(health)).into_response()
}

async fn stats(State(cluster): State<WeakCluster>) -> Response {
    let Some(cluster) = cluster.upgrade() else { return gone() };
    Json(cluster.stats().await).into_response()
}

async fn metrics(State(cluster): State<WeakCluster>) -> Response {
    let Some(cluster) = cluster.upgrade() else { return gone() };
    let text = render_metrics(&cluster.stats().await);
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoverRequest {
    node_id: String,
}

/// Any content type is accepted, so `curl -d '{"node_id":"a"}'` works without a header.
async fn handover(State(cluster): State<WeakCluster>, body: Bytes) -> Response {
    let request: HandoverRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("expected a JSON body {{\"node_id\": \"<node id>\"}}: {e}"));
        }
    };
    let Some(cluster) = cluster.upgrade() else { return gone() };
    info!(target_node = %request.node_id, "master hand-over requested through the admin endpoint");
    match cluster.handover_master(&request.node_id, HANDOVER_TIMEOUT).await {
        Ok(master) => Json(json!({ "master": master.node_id.to_string() })).into_response(),
        Err(e) => {
            // Written so that new error variants (added by other layers) default to 500.
            let code = if let ClusterError::Membership(m) = &e {
                match m {
                    MembershipError::UnknownMember { .. } => StatusCode::NOT_FOUND,
                    MembershipError::NotActive { .. } => StatusCode::CONFLICT,
                    MembershipError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                    MembershipError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                }
            } else if matches!(e, ClusterError::ShuttingDown) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            error(code, e.to_string())
        }
    }
}

/// A `/maps/{map}/entries/{key}` path, percent-decoded.
type EntryPath = Result<Path<(String, String)>, PathRejection>;

/// The map `name`, used with string keys and values.
fn string_map(cluster: &Cluster, name: &str) -> Result<DistributedMap<String, String>, MapError> {
    cluster.map::<String, String>(name)
}

/// The map and key an entry route names, or the response that says why not (a bad path, the
/// member stopping, a bad map name).
fn entry_target(
    state: &AdminState,
    path: EntryPath,
) -> Result<(DistributedMap<String, String>, String, String), Box<Response>> {
    let Path((name, key)) = path.map_err(|r| Box::new(path_error(r)))?;
    let cluster = state.cluster.upgrade().ok_or_else(|| Box::new(gone()))?;
    let map = string_map(&cluster, &name).map_err(|e| Box::new(map_error(e)))?;
    Ok((map, name, key))
}

/// A map error as a response: the full message, with a status that tells retryable from not.
fn map_error(e: MapError) -> Response {
    // Exhaustive on purpose: a new variant must get its status decided here.
    let code = match &e {
        MapError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        // The message says that the write may or may not have been applied.
        MapError::Indeterminate { .. } | MapError::Failed { .. } => StatusCode::BAD_GATEWAY,
        MapError::Codec { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        MapError::Invalid(_) => StatusCode::BAD_REQUEST,
        MapError::Rejected { .. } => StatusCode::CONFLICT,
        MapError::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, e.to_string())
}

fn path_error(rejection: PathRejection) -> Response {
    error(StatusCode::BAD_REQUEST, format!("invalid map name or key in the path: {}", rejection.body_text()))
}

fn previous(old: Option<String>) -> Response {
    Json(json!({ "previous": old })).into_response()
}

/// `ttl_seconds` (the only query parameter), at least 1; the message of a 400 otherwise.
fn parse_ttl(query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Option<Duration>, String> {
    let Query(pairs) = query.map_err(|r| r.body_text())?;
    let mut ttl = None;
    for (name, value) in pairs {
        if name != "ttl_seconds" {
            return Err(format!("unknown query parameter {name:?}: the only one is ttl_seconds"));
        }
        match value.parse::<u64>() {
            Ok(seconds) if seconds >= 1 => ttl = Some(Duration::from_secs(seconds)),
            _ => return Err(format!("ttl_seconds must be a whole number of seconds, at least 1 (got {value:?})")),
        }
    }
    Ok(ttl)
}

/// `PUT /maps/{map}/entries/{key}[?ttl_seconds=N]`, body: the value.
async fn map_put(
    State(state): State<AdminState>,
    path: EntryPath,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Path((name, key)) = match path {
        Ok(path) => path,
        Err(rejection) => return path_error(rejection),
    };
    let ttl = match parse_ttl(query) {
        Ok(ttl) => ttl,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the value is larger than {} bytes, the most this member accepts (net.frame_bytes_max minus \
                     {} KiB for the key and the message); store a smaller value or raise net.frame_bytes_max on \
                     every member",
                    state.value_bytes_max,
                    FRAME_HEADROOM >> 10
                ),
            );
        }
        Err(rejection) => {
            return error(rejection.status(), format!("cannot read the value: {}", rejection.body_text()));
        }
    };
    let Ok(value) = String::from_utf8(Vec::from(body)) else {
        return error(StatusCode::BAD_REQUEST, "the value (the request body) must be UTF-8 text");
    };
    let Some(cluster) = state.cluster.upgrade() else { return gone() };
    let map = match string_map(&cluster, &name) {
        Ok(map) => map,
        Err(e) => return map_error(e),
    };
    let put = match ttl {
        Some(ttl) => map.put_with(&key, &value, Expiry::ttl(ttl)).await,
        None => map.put(&key, &value).await,
    };
    put.map_or_else(map_error, previous)
}

/// `GET /maps/{map}/entries/{key}`: the value as text, or 404.
async fn map_get(State(state): State<AdminState>, path: EntryPath) -> Response {
    let (map, name, key) = match entry_target(&state, path) {
        Ok(target) => target,
        Err(response) => return *response,
    };
    match map.get(&key).await {
        // A `String` answers `text/plain; charset=utf-8`.
        Ok(Some(value)) => value.into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("key {key:?} not found in map {name:?}")),
        Err(e) => map_error(e),
    }
}

/// `DELETE /maps/{map}/entries/{key}`.
async fn map_remove(State(state): State<AdminState>, path: EntryPath) -> Response {
    let (map, _, key) = match entry_target(&state, path) {
        Ok(target) => target,
        Err(response) => return *response,
    };
    map.remove(&key).await.map_or_else(map_error, previous)
}

/// `GET /maps/{map}/size`: entries in the whole cluster.
async fn map_size(State(state): State<AdminState>, path: Result<Path<String>, PathRejection>) -> Response {
    let Path(name) = match path {
        Ok(path) => path,
        Err(rejection) => return path_error(rejection),
    };
    let Some(cluster) = state.cluster.upgrade() else { return gone() };
    let map = match string_map(&cluster, &name) {
        Ok(map) => map,
        Err(e) => return map_error(e),
    };
    match map.len().await {
        Ok(size) => Json(json!({ "map": name, "size": size })).into_response(),
        Err(e) => map_error(e),
    }
}

/// The Prometheus text exposition of a `/stats` document. Every sample carries the labels
/// `cluster` and `node`; per-map samples also `map`.
pub(crate) fn render_metrics(stats: &ClusterStats) -> String {
    let labels = format!("cluster=\"{}\",node=\"{}\"", escape_label(&stats.cluster_name), escape_label(&stats.node_id));
    let is_master = stats.master.as_deref() == Some(stats.node_id.as_str());
    let active = stats.members.iter().filter(|m| m.state == "active").count();
    let g = &stats.gossip;
    let samples: [(&str, &str, &str, u64); 12] = [
        ("grapevine_members", "gauge", "Members in this member's view of the cluster.", stats.members.len() as u64),
        ("grapevine_members_active", "gauge", "Members in the view that are active.", active as u64),
        ("grapevine_is_master", "gauge", "1 when this member is the master.", u64::from(is_master)),
        ("grapevine_healthy", "gauge", "1 when /health answers 200.", u64::from(stats.local.healthy)),
        ("grapevine_view_version", "gauge", "Version of the membership view.", stats.view_version),
        ("grapevine_gossip_rounds_total", "counter", "Gossip exchanges started.", g.gossip_rounds),
        ("grapevine_gossip_datagrams_received_total", "counter", "Gossip UDP datagrams received.", g.datagrams_in),
        ("grapevine_gossip_datagrams_sent_total", "counter", "Gossip UDP datagrams sent.", g.datagrams_out),
        ("grapevine_member_events_total", "counter", "Member events emitted.", g.events),
        (
            "grapevine_foreign_cluster_peers",
            "gauge",
            "Distinct peers of another cluster name that contacted this member.",
            g.foreign_cluster_peers,
        ),
        (
            "grapevine_incompatible_members",
            "gauge",
            "Members refused for an incompatible protocol version.",
            g.incompatible_members,
        ),
        ("grapevine_uptime_seconds", "gauge", "Seconds since this member started.", stats.local.uptime_s),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in samples {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}");
    }
    if let Some(p) = &stats.partitions {
        let mine = |by_member: &std::collections::BTreeMap<String, u32>| {
            u64::from(by_member.get(&stats.node_id).copied().unwrap_or(0))
        };
        let partitions: [(&str, &str, u64); 4] = [
            ("grapevine_partition_table_epoch", "Epoch of this member's partition table.", p.epoch),
            ("grapevine_partitions_owned", "Partitions this member owns.", mine(&p.owned_by_member)),
            ("grapevine_partitions_backup", "Partition backup replicas this member holds.", mine(&p.backups_by_member)),
            (
                "grapevine_migrations_in_progress",
                "Partition migrations under way (counted by the master; 0 on other members).",
                p.migrating as u64,
            ),
        ];
        for (name, help, value) in partitions {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}");
        }
    }
    if !stats.maps.is_empty() {
        for (name, kind, help, value) in MAP_METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for map in &stats.maps {
                let _ = writeln!(out, "{name}{{{labels},map=\"{}\"}} {}", escape_label(&map.name), value(map));
            }
        }
    }
    out
}

/// Per-map series (label `map`): the cluster-wide totals of `/stats`, as this member collected
/// them, so every member exports the same values: aggregate them with `max`, not `sum`.
type MapMetric = (&'static str, &'static str, &'static str, fn(&MapStats) -> u64);
const MAP_METRICS: [MapMetric; 9] = [
    ("grapevine_map_entries", "gauge", "Entries of the map in the cluster (owned copies).", |m| m.owned_entries),
    ("grapevine_map_backup_entries", "gauge", "Backup copies of the map's entries in the cluster.", |m| {
        m.backup_entries
    }),
    ("grapevine_map_gets_total", "counter", "Reads of the map, cluster-wide.", |m| m.gets),
    ("grapevine_map_hits_total", "counter", "Reads of the map that found an entry, cluster-wide.", |m| m.hits),
    ("grapevine_map_puts_total", "counter", "Writes to the map, cluster-wide.", |m| m.puts),
    ("grapevine_map_removes_total", "counter", "Removes from the map, cluster-wide.", |m| m.removes),
    ("grapevine_map_get_p99_microseconds", "gauge", "99th percentile of get latency, the highest over members.", |m| {
        m.get_p99_us
    }),
    ("grapevine_map_put_p99_microseconds", "gauge", "99th percentile of put latency, the highest over members.", |m| {
        m.put_p99_us
    }),
    ("grapevine_map_memory_bytes", "gauge", "Estimated memory of the map's entries and backups, cluster-wide.", |m| {
        m.memory_bytes
    }),
];

/// Label values escape `\`, `"` and newlines.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built from JSON, so that fields added to the document later (with defaults) need no change.
    fn stats() -> ClusterStats {
        let member = |node_id: &str, state: &str, is_master: bool| {
            json!({
                "node_id": node_id, "generation": 1, "gossip_addr": "127.0.0.1:5701", "data_addr": "127.0.0.1:5701",
                "admin_addr": null, "protocol_version": "1.0", "state": state, "uptime_s": 3, "is_master": is_master,
                "attributes": {}
            })
        };
        serde_json::from_value(json!({
            "cluster_name": "demo \"q\"",
            "node_id": "a",
            "generation": 1,
            "master": "a",
            "view_version": 4,
            "members": [member("a", "active", true), member("b", "joining", false)],
            "local": {
                "state": "active", "healthy": true, "health_reason": null, "uptime_s": 42,
                "config": {
                    "bind": "0.0.0.0", "public_address": "127.0.0.1", "port": 5701, "port_range": "5701-5800",
                    "admin_addr": null, "discovery": "static", "members": [], "gossip_interval_ms": 1000,
                    "phi_threshold": 8.0, "failure_detection_ms": 9000, "dead_member_grace_s": 900,
                    "join_timeout_ms": 5000, "probe_interval_ms": 2000
                }
            },
            "gossip": {
                "gossip_rounds": 0, "datagrams_in": 0, "datagrams_out": 0, "foreign_cluster_peers": 0,
                "incompatible_members": 0, "events": 0, "view_version": 4
            },
            "partitions": {
                "count": 271, "epoch": 9, "migrating": 3,
                "owned_by_member": {"a": 136, "b": 135}, "backups_by_member": {"a": 135, "b": 136}
            },
            "maps": [
                {
                    "name": "sessions", "owned_entries": 200, "backup_entries": 200, "hits": 7, "gets": 9,
                    "puts": 201, "removes": 1, "get_p99_us": 850, "put_p99_us": 1200, "memory_bytes": 40960,
                    "backup_count": 1, "async_backup_count": 0, "per_member": []
                },
                {"name": "odd \"name\"", "owned_entries": 1, "backup_entries": 0, "hits": 0, "gets": 0, "puts": 1,
                 "removes": 0, "get_p99_us": 0, "put_p99_us": 0, "memory_bytes": 10, "backup_count": 0,
                 "async_backup_count": 0, "per_member": []}
            ]
        }))
        .expect("a /stats document")
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let text = render_metrics(&stats());
        let labels = r#"{cluster="demo \"q\"",node="a"}"#;
        for line in [
            format!("grapevine_members{labels} 2"),
            format!("grapevine_members_active{labels} 1"),
            format!("grapevine_is_master{labels} 1"),
            format!("grapevine_healthy{labels} 1"),
            format!("grapevine_view_version{labels} 4"),
            format!("grapevine_uptime_seconds{labels} 42"),
            format!("grapevine_gossip_rounds_total{labels} 0"),
            "# TYPE grapevine_gossip_datagrams_received_total counter".to_string(),
            "# TYPE grapevine_gossip_datagrams_sent_total counter".to_string(),
            "# TYPE grapevine_member_events_total counter".to_string(),
            "# HELP grapevine_foreign_cluster_peers ".to_string(),
            "# TYPE grapevine_incompatible_members gauge".to_string(),
            format!("grapevine_partition_table_epoch{labels} 9"),
            format!("grapevine_partitions_owned{labels} 136"),
            format!("grapevine_partitions_backup{labels} 135"),
            format!("grapevine_migrations_in_progress{labels} 3"),
            r#"grapevine_map_entries{cluster="demo \"q\"",node="a",map="sessions"} 200"#.to_string(),
            r#"grapevine_map_entries{cluster="demo \"q\"",node="a",map="odd \"name\""} 1"#.to_string(),
            r#"grapevine_map_backup_entries{cluster="demo \"q\"",node="a",map="sessions"} 200"#.to_string(),
            r#"grapevine_map_gets_total{cluster="demo \"q\"",node="a",map="sessions"} 9"#.to_string(),
            r#"grapevine_map_hits_total{cluster="demo \"q\"",node="a",map="sessions"} 7"#.to_string(),
            r#"grapevine_map_puts_total{cluster="demo \"q\"",node="a",map="sessions"} 201"#.to_string(),
            r#"grapevine_map_removes_total{cluster="demo \"q\"",node="a",map="sessions"} 1"#.to_string(),
            r#"grapevine_map_get_p99_microseconds{cluster="demo \"q\"",node="a",map="sessions"} 850"#.to_string(),
            r#"grapevine_map_put_p99_microseconds{cluster="demo \"q\"",node="a",map="sessions"} 1200"#.to_string(),
            r#"grapevine_map_memory_bytes{cluster="demo \"q\"",node="a",map="sessions"} 40960"#.to_string(),
            "# TYPE grapevine_map_gets_total counter".to_string(),
            "# TYPE grapevine_map_entries gauge".to_string(),
        ] {
            assert!(text.lines().any(|l| l.starts_with(&line)), "missing {line:?} in\n{text}");
        }
        // Every sample line is `name{labels} value`, preceded by its HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, rest) = line.split_once('{').unwrap();
            assert!(text.contains(&format!("# HELP {name} ")) && text.contains(&format!("# TYPE {name} ")), "{line}");
            let value = rest.rsplit_once(' ').unwrap().1;
            value.parse::<f64>().unwrap();
        }
        // Each metric family is described once, its samples together.
        let helps: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# HELP ")).collect();
        let mut names: Vec<&str> = helps.iter().map(|h| h.split_once(' ').unwrap().0).collect();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "{text}");
    }

    #[test]
    fn without_maps_there_are_no_map_series() {
        let mut stats = stats();
        stats.maps.clear();
        stats.partitions = None;
        let text = render_metrics(&stats);
        assert!(!text.contains("grapevine_map_") && !text.contains("grapevine_partition"), "{text}");
    }

    #[test]
    fn map_errors_have_statuses_that_tell_what_to_do() {
        let status = |e: MapError| map_error(e).status();
        let map = || "m".to_string();
        let after = Duration::from_secs(1);
        assert_eq!(
            status(MapError::Timeout { op: "put", map: map(), after, last_error: "x".into() }),
            StatusCode::GATEWAY_TIMEOUT
        );
        let lost = MapError::Indeterminate { op: "put", map: map(), owner: "b".into(), reason: "x".into() };
        assert!(lost.to_string().contains("may or may not have been applied"), "{lost}");
        assert_eq!(status(lost), StatusCode::BAD_GATEWAY);
        assert_eq!(status(MapError::Failed { op: "put", map: map(), error: "x".into() }), StatusCode::BAD_GATEWAY);
        assert_eq!(status(MapError::Codec { map: map(), message: "x".into() }), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status(MapError::Invalid("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(status(MapError::ShuttingDown { map: map() }), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(value_bytes_max(16 << 20), (16 << 20) - (32 << 10));
        assert_eq!(value_bytes_max(64 << 10), 32 << 10);
    }
}
