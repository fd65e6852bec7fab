//! The admin HTTP endpoint: `/health` for load balancers, `/stats` (JSON) for `clusterstats`,
//! `/metrics` (Prometheus text). Served on `admin_port` when `admin_enabled`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::cluster::WeakCluster;

pub(crate) async fn serve(cluster: WeakCluster, listener: TcpListener, cancel: CancellationToken) {
    let app = Router::new().route("/health", get(health)).route("/stats", get(stats)).with_state(cluster);
    let served = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
    if let Err(error) = served {
        warn!(%error, "admin endpoint stopped with an error");
    }
}

fn gone() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "down", "reason": "member stopped"})))
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
