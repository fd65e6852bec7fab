//! The admin HTTP endpoint, served on `admin_port` when `admin_enabled`:
//!
//! | route                   | what                                                              |
//! |-------------------------|-------------------------------------------------------------------|
//! | `GET /health`           | 200 + JSON when the member can serve, 503 + JSON with `reason`    |
//! |                         | otherwise: the load-balancer check                                |
//! | `GET /stats`            | the [`crate::stats::ClusterStats`] document (`grapevine clusterstats`) |
//! | `GET /metrics`          | Prometheus text exposition                                        |
//! | `POST /master/handover` | `{"node_id": "..."}`: make that member the master                 |
//!
//! **Keep this port on a management network.** There is no authentication: operator routes change
//! the cluster (master hand-over), and data routes for the `map` CLI will read and write entries.
//! Bind it to a management interface with `admin_bind`, or turn it off with `admin_enabled = false`.
//!
//! Errors are JSON `{"error": "..."}` with the full message; unknown routes answer 404 with the
//! list of routes. Malformed HTTP is rejected by hyper per connection and never affects the member.

use std::fmt::Write as _;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use grapevine_membership::MembershipError;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::{ClusterError, WeakCluster};
use crate::stats::ClusterStats;

/// How long `POST /master/handover` waits for the new master to be seen.
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes, for the 404 answer.
const ROUTES: &[&str] = &["GET /health", "GET /stats", "GET /metrics", "POST /master/handover"];

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn serve(cluster: WeakCluster, listener: TcpListener, cancel: CancellationToken) {
    let served = axum::serve(listener, router(cluster)).with_graceful_shutdown(cancel.cancelled_owned()).await;
    if let Err(error) = served {
        warn!(%error, "admin endpoint stopped with an error");
    }
}

fn router(cluster: WeakCluster) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/master/handover", post(handover))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(cluster)
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

/// The Prometheus text exposition of a `/stats` document. Every sample carries the labels
/// `cluster` and `node`.
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
    out
}

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
            }
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
    }
}
