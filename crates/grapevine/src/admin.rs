//! The admin HTTP endpoint, served on `admin_port` when `admin_enabled`:
//!
//! | route                              | what                                                    |
//! |------------------------------------|---------------------------------------------------------|
//! | `GET /health`                      | 200 + JSON when the member can serve, 503 + JSON with   |
//! |                                    | `reason` otherwise (joining, leaving, no current table, |
//! |                                    | a protected map below its `min_cluster_size`)           |
//! | `GET /stats`                       | the [`crate::stats::ClusterStats`] document (`grapevine clusterstats`) |
//! | `GET /metrics`                     | Prometheus text exposition                              |
//! | `POST /master/handover`            | `{"node_id": "..."}`: make that member the master       |
//! | `PUT /maps/{map}/entries/{key}`    | set a string entry (body: the value; `?ttl_seconds=N`)  |
//! | `GET /maps/{map}/entries/{key}`    | read it (200 + the value as `text/plain`, or 404)       |
//! | `DELETE /maps/{map}/entries/{key}` | remove it                                               |
//! | `GET /maps/{map}/size`             | `{"map": "...", "size": N}`                             |
//! | `POST /topics/{topic}/publish`     | publish the body (a string); `?reliable=true` for a     |
//! |                                    | reliable topic: `{"sequence": N}`                       |
//! | `GET /topics/{topic}/subscribe`    | stream the messages as JSON lines until disconnected;   |
//! |                                    | `?reliable=true[&from_sequence=N\|&from=oldest]`         |
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
//!   is shutting down, or sees fewer members than the map's `min_cluster_size`).
//!
//! **Topic routes.** Messages are strings (a `Topic<String>`). `publish` answers 200
//! `{"published": true}`, or `{"sequence": N}` for a reliable topic (`null`: dropped by the
//! `discard_newest` policy); 413 for a message too large, 503 when a reliable topic's ring buffer
//! is full and its policy refuses, map errors as above. `subscribe` answers 200 with
//! `application/x-ndjson`, one line per message, `{"payload": "...", "publisher": "<node id>",
//! "publish_time_ms": N, "sequence": N | null}`, or per error `{"error": "...", "kind": "lagged" |
//! "lost" | "decode" | "malformed", ...}`; the subscription starts when the response does and ends
//! when the client disconnects or the member stops. A reliable subscription starts with new
//! messages unless `from=oldest` or `from_sequence=N` says otherwise.
//!
//! Errors are JSON `{"error": "..."}` with the full message; unknown routes answer 404 with the
//! list of routes. Malformed HTTP is rejected by hyper per connection and never affects the member.
//!
//! **Limits** (`[admin]` in the configuration), so that slow or numerous clients cannot tie the
//! endpoint up or make the member allocate without bound:
//! * at most `admin.connections_max` connections are served at once: a permit is taken *before*
//!   accepting, so further connections wait in the kernel's listen backlog and are served as
//!   earlier ones close;
//! * a client must send a request's headers within `admin.header_read_timeout_ms` (an idle
//!   keep-alive connection is closed after that time too), else the connection is closed;
//! * and its body within `admin.body_read_timeout_ms` of the headers, else 408;
//! * bodies are capped: map values as above, other routes at [`OPERATOR_BODY_BYTES_MAX`] (413);
//! * a client that stops reading its response for [`WRITE_STALL_TIMEOUT`] is disconnected;
//! * on shutdown the endpoint stops accepting, lets requests in flight finish for at most
//!   [`SHUTDOWN_GRACE`], and closes every connection.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use grapevine_map::{Expiry, MapError};
use grapevine_membership::MembershipError;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::DistributedMap;
use crate::cluster::{Cluster, ClusterError, WeakCluster};
use crate::stats::{ClusterStats, MapStats, TopicSummary};
use crate::{StartAt, TopicError};

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
    "POST /topics/{topic}/publish",
    "GET /topics/{topic}/subscribe",
];

/// Room left in a data-plane frame, beside a value, for the key, the map name and the message.
const FRAME_HEADROOM: usize = 32 << 10;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The largest request body of the routes other than `PUT /maps/...` (`POST /master/handover`
/// takes a few bytes of JSON).
pub(crate) const OPERATOR_BODY_BYTES_MAX: usize = 1 << 20;

/// How long requests in flight may take to finish once the member shuts down; then their
/// connections are closed. Below the 10 s the member waits for its background tasks.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long writing a response may make no progress (the client stopped reading) before the
/// connection is closed.
pub(crate) const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest pause after a failed `accept` (usually: out of file descriptors).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The endpoint's limits, from the `[admin]` configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) connections_max: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) write_stall_timeout: Duration,
}

impl Limits {
    fn of(config: &crate::Config) -> Limits {
        let admin = &config.admin;
        Limits {
            connections_max: admin.connections_max,
            header_read_timeout: Duration::from_millis(admin.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(admin.body_read_timeout_ms),
            write_stall_timeout: WRITE_STALL_TIMEOUT,
        }
    }
}

pub(crate) async fn serve(cluster: WeakCluster, listener: TcpListener, cancel: CancellationToken) {
    let Some((frame_bytes_max, limits)) =
        cluster.upgrade().map(|c| (c.config().net.frame_bytes_max, Limits::of(c.config())))
    else {
        return;
    };
    let router = router(cluster, value_bytes_max(frame_bytes_max));
    serve_router(router, listener, limits, cancel).await;
}

/// Serves `router` on `listener` within `limits` until `cancel`, then shuts down gracefully
/// (bounded by [`SHUTDOWN_GRACE`]).
pub(crate) async fn serve_router(router: Router, listener: TcpListener, limits: Limits, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.connections_max.clamp(1, Semaphore::MAX_PERMITS)));
    let connections = TaskTracker::new();
    let mut backoff = Duration::ZERO;
    loop {
        // The permit first: while every one is taken, connections wait in the listen backlog.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                backoff = Duration::ZERO;
                connections.spawn(serve_connection(router.clone(), stream, remote, limits, cancel.clone(), permit));
            }
            Err(error) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(1), ACCEPT_BACKOFF_MAX);
                warn!(%error, retry_in = ?backoff, "admin endpoint: accepting a connection failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    // Refuse new connections at once; those being served finish within the grace period.
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), connections.wait()).await.is_err() {
        warn!("admin endpoint: connections still open {SHUTDOWN_GRACE:?} after shutdown");
    }
}

/// Serves one connection: HTTP/1 with the header-read timeout, each request's body behind its
/// read deadline. Holds its permit until the connection is closed.
async fn serve_connection(
    router: Router,
    stream: TcpStream,
    remote: SocketAddr,
    limits: Limits,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%remote, %error, "admin endpoint: could not set TCP_NODELAY");
    }
    let body_read_timeout = limits.body_read_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let request = request.map(|body| Body::new(ReadDeadline::new(body, body_read_timeout)));
        router.clone().oneshot(request)
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let io = StallDeadline { stream, limit: limits.write_stall_timeout, stalled: None };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = cancel.cancelled() => {
            // Finishes the request in flight, if any, then closes.
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await {
                Ok(served) => served,
                Err(_) => {
                    debug!(%remote, "admin endpoint: closing a connection whose request did not finish in time");
                    return;
                }
            }
        }
    };
    if let Err(error) = served {
        // Header timeouts, malformed requests, clients that went away: that connection only.
        debug!(%remote, %error, "admin endpoint: connection closed");
    }
}

/// A connection's socket whose writes fail once they made no progress for `limit`, so that a
/// client that stops reading its response cannot hold the connection (and its permit) forever.
struct StallDeadline {
    stream: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StallDeadline {
    /// Passes on a write's outcome; a write pending for `limit` in a row becomes an error.
    fn progress<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing of its response for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StallDeadline {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallDeadline {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.progress(cx, poll)
    }
}

/// A request body that fails once its read deadline passes, so that a client sending a body
/// slowly (or not at all) cannot hold a connection and a handler forever.
struct ReadDeadline {
    body: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl ReadDeadline {
    fn new(body: Incoming, timeout: Duration) -> Self {
        ReadDeadline { body, deadline: Box::pin(tokio::time::sleep(timeout)), timeout }
    }
}

/// The error a [`ReadDeadline`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimedOut(Duration);

impl hyper::body::Body for ReadDeadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// True when `error`, or one of its causes, is a [`BodyTimedOut`].
fn timed_out(mut error: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if error.is::<BodyTimedOut>() {
            return true;
        }
        match error.source() {
            Some(source) => error = source,
            None => return false,
        }
    }
}

/// The response for a body that could not be read: 413 with `too_large` when it was over the
/// cap, 408 when it did not arrive in time, else the rejection's own status.
fn body_error(rejection: BytesRejection, too_large: impl FnOnce() -> String) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return error(StatusCode::PAYLOAD_TOO_LARGE, too_large());
    }
    if timed_out(&rejection) {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            format!("{}; send the body faster, or raise admin.body_read_timeout_ms", rejection.body_text()),
        );
    }
    error(rejection.status(), format!("cannot read the request body: {}", rejection.body_text()))
}

/// The largest value `PUT /maps/...` accepts: what fits in a data-plane frame beside the key.
pub(crate) fn value_bytes_max(frame_bytes_max: usize) -> usize {
    frame_bytes_max.saturating_sub(FRAME_HEADROOM).max(1)
}

#[derive(Clone)]
struct AdminState {
    cluster: WeakCluster,
    value_bytes_max: usize,
}

pub(crate) fn router(cluster: WeakCluster, value_bytes_max: usize) -> Router {
    let maps = Router::new()
        .route("/maps/{map}/entries/{key}", get(map_get).put(map_put).delete(map_remove))
        .route("/maps/{map}/size", get(map_size))
        .route("/topics/{topic}/publish", post(topic_publish))
        .route("/topics/{topic}/subscribe", get(topic_subscribe))
        .layer(DefaultBodyLimit::max(value_bytes_max))
        .with_state(AdminState { cluster: cluster.clone(), value_bytes_max });
    Router::new()
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/master/handover", post(handover))
        .layer(DefaultBodyLimit::max(OPERATOR_BODY_BYTES_MAX))
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
async fn handover(State(cluster): State<WeakCluster>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return body_error(rejection, || {
                format!("the body is larger than {OPERATOR_BODY_BYTES_MAX} bytes; send {{\"node_id\": \"<node id>\"}}")
            });
        }
    };
    let request: HandoverRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("expected a JSON body {{\"node_id\": \"<node id>\"}}: {e}"));
        }
    };
    let Some(cluster) = cluster.upgrade() else { return gone() };
    info!(target_node = %request.node_id, "master hand-over requested through the admin endpoint");
    let timeout = Duration::from_millis(cluster.config().admin.handover_timeout_ms);
    match cluster.handover_master(&request.node_id, timeout).await {
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
        // This member is cut off (or the cluster is too small): another member may serve it.
        MapError::ShuttingDown { .. } | MapError::BelowMinClusterSize { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
        Err(rejection) => {
            return body_error(rejection, || {
                format!(
                    "the value is larger than {} bytes, the most this member accepts (net.frame_bytes_max minus \
                     {} KiB for the key and the message); store a smaller value or raise net.frame_bytes_max on \
                     every member",
                    state.value_bytes_max,
                    FRAME_HEADROOM >> 10
                )
            });
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

/// A topic error as a response. Subscribers' errors never come out of `publish`.
fn topic_error(e: TopicError) -> Response {
    // Exhaustive on purpose: a new variant must get its status decided here.
    let code = match &e {
        TopicError::Invalid(_) | TopicError::Encode { .. } => StatusCode::BAD_REQUEST,
        TopicError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        TopicError::Overloaded { .. } | TopicError::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
        TopicError::Storage { source, .. } => return map_error(source.clone()),
        TopicError::Decode { .. }
        | TopicError::Malformed { .. }
        | TopicError::Lagged { .. }
        | TopicError::Lost { .. } => StatusCode::BAD_GATEWAY,
    };
    error(code, e.to_string())
}

/// The query of the topic routes.
#[derive(Debug, Default)]
struct TopicQuery {
    reliable: bool,
    start: Option<StartAt>,
}

fn parse_topic_query(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    subscribe: bool,
) -> Result<TopicQuery, String> {
    let Query(pairs) = query.map_err(|r| r.body_text())?;
    let mut parsed = TopicQuery::default();
    for (name, value) in pairs {
        match name.as_str() {
            "reliable" => {
                parsed.reliable = match value.as_str() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("reliable must be true or false (got {value:?})")),
                }
            }
            "from_sequence" if subscribe => match value.parse::<u64>() {
                Ok(n) => parsed.start = Some(StartAt::Sequence(n)),
                Err(_) => return Err(format!("from_sequence must be a sequence number (got {value:?})")),
            },
            "from" if subscribe => {
                parsed.start = Some(match value.as_str() {
                    "oldest" => StartAt::Oldest,
                    "newest" => StartAt::Newest,
                    _ => return Err(format!("from must be oldest or newest (got {value:?})")),
                })
            }
            _ if subscribe => {
                return Err(format!("unknown query parameter {name:?}: use reliable, from_sequence or from"));
            }
            _ => return Err(format!("unknown query parameter {name:?}: the only one is reliable")),
        }
    }
    if parsed.start.is_some() && !parsed.reliable {
        return Err("from_sequence and from apply to reliable topics: add reliable=true".into());
    }
    Ok(parsed)
}

/// `POST /topics/{topic}/publish[?reliable=true]`, body: the message.
async fn topic_publish(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Path(name) = match path {
        Ok(path) => path,
        Err(rejection) => {
            return error(StatusCode::BAD_REQUEST, format!("invalid topic name: {}", rejection.body_text()));
        }
    };
    let query = match parse_topic_query(query, false) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return body_error(rejection, || {
                format!("the message is larger than {} bytes, the most this member accepts", state.value_bytes_max)
            });
        }
    };
    let Ok(message) = String::from_utf8(Vec::from(body)) else {
        return error(StatusCode::BAD_REQUEST, "the message (the request body) must be UTF-8 text");
    };
    let Some(cluster) = state.cluster.upgrade() else { return gone() };
    if query.reliable {
        let topic = match cluster.reliable_topic::<String>(&name) {
            Ok(topic) => topic,
            Err(e) => return topic_error(e),
        };
        match topic.publish(&message).await {
            Ok(sequence) => Json(json!({ "sequence": sequence })).into_response(),
            Err(e) => topic_error(e),
        }
    } else {
        let topic = match cluster.topic::<String>(&name) {
            Ok(topic) => topic,
            Err(e) => return topic_error(e),
        };
        match topic.publish(&message).await {
            Ok(()) => Json(json!({ "published": true })).into_response(),
            Err(e) => topic_error(e),
        }
    }
}

/// One line of a subscription stream.
fn topic_line(result: Result<crate::Message<String>, TopicError>) -> Bytes {
    let value = match result {
        Ok(m) => json!({
            "payload": m.payload,
            "publisher": m.publisher.node_id.to_string(),
            "publish_time_ms": m.publish_time_ms,
            "sequence": m.sequence,
        }),
        Err(e) => {
            let mut value = json!({ "error": e.to_string() });
            match &e {
                TopicError::Lagged { missed, .. } => {
                    value["kind"] = "lagged".into();
                    value["missed"] = (*missed).into();
                }
                TopicError::Lost { missed, resumed_at, .. } => {
                    value["kind"] = "lost".into();
                    value["missed"] = (*missed).into();
                    value["resumed_at"] = (*resumed_at).into();
                }
                TopicError::Decode { .. } => value["kind"] = "decode".into(),
                TopicError::Malformed { .. } => value["kind"] = "malformed".into(),
                _ => value["kind"] = "other".into(),
            }
            value
        }
    };
    let mut line = serde_json::to_vec(&value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The lines of a subscription, as a response body.
struct Lines {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl futures_core::Stream for Lines {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|line| line.map(Ok))
    }
}

/// Lines buffered between a subscription and a slow client.
const SUBSCRIBE_LINES_BUFFERED: usize = 64;

/// `GET /topics/{topic}/subscribe[?reliable=true[&from_sequence=N|&from=oldest]]`.
async fn topic_subscribe(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let Path(name) = match path {
        Ok(path) => path,
        Err(rejection) => {
            return error(StatusCode::BAD_REQUEST, format!("invalid topic name: {}", rejection.body_text()));
        }
    };
    let query = match parse_topic_query(query, true) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Some(cluster) = state.cluster.upgrade() else { return gone() };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(SUBSCRIBE_LINES_BUFFERED);
    // The pump ends when the client goes (the body, and with it `rx`, is dropped) or the
    // subscription ends (the member stops).
    if query.reliable {
        let topic = match cluster.reliable_topic::<String>(&name) {
            Ok(topic) => topic,
            Err(e) => return topic_error(e),
        };
        let mut subscription = match topic.subscribe(query.start.unwrap_or(StartAt::Newest)).await {
            Ok(subscription) => subscription,
            Err(e) => return topic_error(e),
        };
        cluster.spawn_task(async move {
            loop {
                let next = tokio::select! {
                    next = subscription.recv() => next,
                    _ = tx.closed() => return,
                };
                let Some(result) = next else { return };
                if tx.send(topic_line(result)).await.is_err() {
                    return;
                }
            }
        });
    } else {
        let topic = match cluster.topic::<String>(&name) {
            Ok(topic) => topic,
            Err(e) => return topic_error(e),
        };
        let mut subscription = match topic.subscribe().await {
            Ok(subscription) => subscription,
            Err(e) => return topic_error(e),
        };
        cluster.spawn_task(async move {
            loop {
                let next = tokio::select! {
                    next = subscription.recv() => next,
                    _ = tx.closed() => return,
                };
                let Some(result) = next else { return };
                if tx.send(topic_line(result)).await.is_err() {
                    return;
                }
            }
        });
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(Lines { rx })).into_response()
}

/// The Prometheus text exposition of a `/stats` document. Every sample carries the labels
/// `cluster` and `node`; per-map samples also `map`.
pub(crate) fn render_metrics(stats: &ClusterStats) -> String {
    let labels = format!("cluster=\"{}\",node=\"{}\"", escape_label(&stats.cluster_name), escape_label(&stats.node_id));
    let is_master = stats.master.as_deref() == Some(stats.node_id.as_str());
    let active = stats.members.iter().filter(|m| m.state == "active").count();
    let g = &stats.gossip;
    let samples: [(&str, &str, &str, u64); 14] = [
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
        ("grapevine_groups_merged_total", "counter", "Other groups merged into this member's view.", g.groups_merged),
        (
            "grapevine_outside_members",
            "gauge",
            "Members of this cluster in another group, waiting for the merge timers.",
            g.outside_members,
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
    let near_cached: Vec<&MapStats> = stats.maps.iter().filter(|m| m.near_cache.is_some()).collect();
    if !near_cached.is_empty() {
        for (name, kind, help, value) in NEAR_CACHE_METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for map in &near_cached {
                let Some(near) = &map.near_cache else { continue };
                let _ = writeln!(out, "{name}{{{labels},map=\"{}\"}} {}", escape_label(&map.name), value(near));
            }
        }
    }
    if !stats.topics.is_empty() {
        for (name, kind, help, value) in TOPIC_METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for topic in &stats.topics {
                let _ = writeln!(
                    out,
                    "{name}{{{labels},topic=\"{}\",kind=\"{}\"}} {}",
                    escape_label(&topic.name),
                    escape_label(&topic.kind),
                    value(topic)
                );
            }
        }
    }
    out
}

/// Per-map near-cache series (label `map`), summed over the members with a near cache of it.
type NearCacheMetric = (&'static str, &'static str, &'static str, fn(&grapevine_map::NearCacheStats) -> u64);
const NEAR_CACHE_METRICS: [NearCacheMetric; 5] = [
    ("grapevine_near_cache_entries", "gauge", "Entries in the map's near caches, cluster-wide.", |n| n.entries),
    ("grapevine_near_cache_hits_total", "counter", "Reads answered by the map's near caches.", |n| n.hits),
    ("grapevine_near_cache_misses_total", "counter", "Near-cache reads that went to the owner.", |n| n.misses),
    ("grapevine_near_cache_invalidations_total", "counter", "Near-cached keys dropped on a change.", |n| {
        n.invalidations
    }),
    (
        "grapevine_near_cache_purges_total",
        "counter",
        "Partitions purged from near caches (missed event, owner change, silent owner).",
        |n| n.purges,
    ),
];

/// Per-topic series (labels `topic`, `kind`): cluster-wide totals, like the map series.
type TopicMetric = (&'static str, &'static str, &'static str, fn(&TopicSummary) -> u64);
const TOPIC_METRICS: [TopicMetric; 8] = [
    ("grapevine_topic_published_total", "counter", "Messages published to the topic, cluster-wide.", |t| t.published),
    ("grapevine_topic_received_total", "counter", "Messages delivered to the topic's subscribers.", |t| t.received),
    ("grapevine_topic_subscribers", "gauge", "Subscribers of the topic in the cluster.", |t| t.subscribers),
    (
        "grapevine_topic_dropped_total",
        "counter",
        "Messages dropped for slow subscribers (reliable: discard_newest).",
        |t| t.dropped,
    ),
    ("grapevine_topic_lost_total", "counter", "Reliable: messages subscribers lost by falling behind.", |t| t.lost),
    ("grapevine_topic_malformed_total", "counter", "Malformed or undecodable messages.", |t| t.malformed),
    ("grapevine_topic_stored", "gauge", "Reliable: messages held in the ring buffer.", |t| t.stored),
    ("grapevine_topic_memory_bytes", "gauge", "Reliable: estimated memory of the ring buffer and its backups.", |t| {
        t.memory_bytes
    }),
];

/// Per-map series (label `map`): the cluster-wide totals of `/stats`, as this member collected
/// them, so every member exports the same values: aggregate them with `max`, not `sum`.
type MapMetric = (&'static str, &'static str, &'static str, fn(&MapStats) -> u64);
const MAP_METRICS: [MapMetric; 14] = [
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
    (
        "grapevine_map_merge_kept_existing_total",
        "counter",
        "Split-brain merges of the map's entries in which the merge policy kept the owner's entry, cluster-wide.",
        |m| m.merge_kept_existing,
    ),
    (
        "grapevine_map_merge_took_merging_total",
        "counter",
        "Split-brain merges of the map's entries in which the merging entry was stored, cluster-wide.",
        |m| m.merge_took_merging,
    ),
    (
        "grapevine_map_min_cluster_size",
        "gauge",
        "The map's split-brain protection minimum (0: off); operations fail below it.",
        |m| u64::from(m.min_cluster_size),
    ),
    (
        "grapevine_map_under_replicated_partitions",
        "gauge",
        "Partitions whose owner has fewer synchronous backups than backup_count (too few members).",
        |m| m.under_replicated_partitions,
    ),
    (
        "grapevine_map_under_replicated_writes_total",
        "counter",
        "Writes acknowledged with fewer synchronous backups than backup_count, cluster-wide.",
        |m| m.under_replicated_writes,
    ),
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
                    "backup_count": 1, "async_backup_count": 0, "under_replicated_partitions": 5,
                    "under_replicated_writes": 17, "per_member": [],
                    "merge_kept_existing": 3, "merge_took_merging": 4, "merge_policy": "latest-update",
                    "min_cluster_size": 2,
                    "near_cache": {"map": "sessions", "entries": 30, "hits": 70, "misses": 12, "invalidations": 5,
                                   "purges": 2}
                },
                {"name": "odd \"name\"", "owned_entries": 1, "backup_entries": 0, "hits": 0, "gets": 0, "puts": 1,
                 "removes": 0, "get_p99_us": 0, "put_p99_us": 0, "memory_bytes": 10, "backup_count": 0,
                 "async_backup_count": 0, "per_member": []}
            ],
            "topics": [
                {"name": "news", "kind": "topic", "published": 10, "received": 30, "subscribers": 3, "dropped": 1,
                 "lost": 0, "malformed": 0, "stored": 0, "memory_bytes": 0, "per_member": []},
                {"name": "orders", "kind": "reliable", "published": 5, "received": 10, "subscribers": 2,
                 "dropped": 0, "lost": 4, "malformed": 1, "stored": 5, "memory_bytes": 900, "per_member": []}
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
            r#"grapevine_map_merge_kept_existing_total{cluster="demo \"q\"",node="a",map="sessions"} 3"#.to_string(),
            r#"grapevine_map_merge_took_merging_total{cluster="demo \"q\"",node="a",map="sessions"} 4"#.to_string(),
            r#"grapevine_map_min_cluster_size{cluster="demo \"q\"",node="a",map="sessions"} 2"#.to_string(),
            r#"grapevine_map_merge_took_merging_total{cluster="demo \"q\"",node="a",map="odd \"name\""} 0"#.to_string(),
            "# TYPE grapevine_map_merge_took_merging_total counter".to_string(),
            r#"grapevine_map_under_replicated_partitions{cluster="demo \"q\"",node="a",map="sessions"} 5"#.to_string(),
            r#"grapevine_map_under_replicated_writes_total{cluster="demo \"q\"",node="a",map="sessions"} 17"#
                .to_string(),
            r#"grapevine_map_under_replicated_writes_total{cluster="demo \"q\"",node="a",map="odd \"name\""} 0"#
                .to_string(),
            "# TYPE grapevine_map_gets_total counter".to_string(),
            "# TYPE grapevine_map_entries gauge".to_string(),
            r#"grapevine_near_cache_hits_total{cluster="demo \"q\"",node="a",map="sessions"} 70"#.to_string(),
            r#"grapevine_near_cache_misses_total{cluster="demo \"q\"",node="a",map="sessions"} 12"#.to_string(),
            r#"grapevine_near_cache_entries{cluster="demo \"q\"",node="a",map="sessions"} 30"#.to_string(),
            r#"grapevine_near_cache_invalidations_total{cluster="demo \"q\"",node="a",map="sessions"} 5"#.to_string(),
            r#"grapevine_near_cache_purges_total{cluster="demo \"q\"",node="a",map="sessions"} 2"#.to_string(),
            r#"grapevine_topic_published_total{cluster="demo \"q\"",node="a",topic="news",kind="topic"} 10"#
                .to_string(),
            r#"grapevine_topic_received_total{cluster="demo \"q\"",node="a",topic="news",kind="topic"} 30"#.to_string(),
            r#"grapevine_topic_subscribers{cluster="demo \"q\"",node="a",topic="orders",kind="reliable"} 2"#
                .to_string(),
            r#"grapevine_topic_dropped_total{cluster="demo \"q\"",node="a",topic="news",kind="topic"} 1"#.to_string(),
            r#"grapevine_topic_lost_total{cluster="demo \"q\"",node="a",topic="orders",kind="reliable"} 4"#.to_string(),
            r#"grapevine_topic_stored{cluster="demo \"q\"",node="a",topic="orders",kind="reliable"} 5"#.to_string(),
            "# TYPE grapevine_topic_published_total counter".to_string(),
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
        stats.topics.clear();
        let text = render_metrics(&stats);
        assert!(!text.contains("grapevine_map_") && !text.contains("grapevine_partition"), "{text}");
        assert!(!text.contains("grapevine_near_cache_") && !text.contains("grapevine_topic_"), "{text}");
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
        let protected = MapError::BelowMinClusterSize { map: map(), min_cluster_size: 2, current: 1 };
        assert_eq!(status(protected), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(value_bytes_max(16 << 20), (16 << 20) - (32 << 10));
        assert_eq!(value_bytes_max(64 << 10), 32 << 10);
    }

    // The serving limits, over real sockets, with a router of test routes (the routes of a real
    // member are tested in `tests/tests/hardening.rs`).

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;
    use tokio::time::{Instant, timeout};

    /// Requests in `/hold`: how many now, the most at once, and the gate they wait at.
    struct Held {
        now: AtomicUsize,
        max: AtomicUsize,
        gate: Semaphore,
    }

    impl Default for Held {
        fn default() -> Self {
            Held { now: AtomicUsize::new(0), max: AtomicUsize::new(0), gate: Semaphore::new(0) }
        }
    }

    fn test_router(held: Arc<Held>) -> Router {
        async fn hold(State(held): State<Arc<Held>>) -> &'static str {
            let n = held.now.fetch_add(1, Ordering::SeqCst) + 1;
            held.max.fetch_max(n, Ordering::SeqCst);
            if let Ok(permit) = held.gate.acquire().await {
                permit.forget();
            }
            held.now.fetch_sub(1, Ordering::SeqCst);
            "held"
        }
        async fn echo(body: Result<Bytes, BytesRejection>) -> Response {
            match body {
                Ok(body) => body.len().to_string().into_response(),
                Err(rejection) => body_error(rejection, || "over the cap".to_string()),
            }
        }
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/hold", get(hold))
            .route("/echo", post(echo))
            .route("/big", get(|| async { vec![b'x'; 32 << 20] }))
            .layer(DefaultBodyLimit::max(1024))
            .with_state(held)
    }

    fn limits(connections_max: usize, header_ms: u64, body_ms: u64) -> Limits {
        Limits {
            connections_max,
            header_read_timeout: Duration::from_millis(header_ms),
            body_read_timeout: Duration::from_millis(body_ms),
            write_stall_timeout: Duration::from_millis(500),
        }
    }

    async fn start(limits: Limits, held: &Arc<Held>) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve_router(test_router(held.clone()), listener, limits, cancel.clone()));
        (addr, cancel, task)
    }

    const GET_CLOSE: &[u8] = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    const HOLD_CLOSE: &[u8] = b"GET /hold HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

    /// Sends `request` on a new connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, request: &'static [u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // A server that answers before reading the whole body (413) and closes makes the rest of
        // the write fail, and its close may arrive as a reset after the response.
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        timeout(Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("a response");
        String::from_utf8_lossy(&response).into_owned()
    }

    fn status(response: &str) -> u16 {
        response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {response:?}"))
    }

    /// Reads until the server closes `stream` (EOF or reset); fails after `limit`.
    async fn closed_by_server(stream: &mut TcpStream, limit: Duration) {
        let mut buf = [0u8; 1024];
        timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the server closes the connection");
    }

    async fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_cap_wait_in_the_backlog_and_are_served_in_turn() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(2, 10_000, 10_000), &held).await;
        let clients: Vec<_> = (0..6).map(|_| tokio::spawn(exchange(addr, HOLD_CLOSE))).collect();
        wait_for("two requests held", || held.now.load(Ordering::SeqCst) == 2).await;
        // The other four are connected (the kernel queued them) but not served while both
        // permits are taken: give them time to be served wrongly.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(held.max.load(Ordering::SeqCst), 2);
        assert_eq!(clients.iter().filter(|c| c.is_finished()).count(), 0);
        held.gate.add_permits(6);
        for client in clients {
            let response = client.await.unwrap();
            assert_eq!(status(&response), 200, "{response}");
            assert!(response.ends_with("held"), "{response}");
        }
        assert_eq!(held.max.load(Ordering::SeqCst), 2, "more than connections_max requests at once");
        assert_eq!(status(&exchange(addr, GET_CLOSE).await), 200);
        cancel.cancel();
        timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_sending_headers_byte_by_byte_is_cut_off_after_the_header_timeout() {
        let held = Arc::new(Held::default());
        let header_timeout = Duration::from_millis(500);
        let (addr, cancel, task) = start(limits(4, 500, 10_000), &held).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ").await.unwrap();
        // The endpoint serves others while the slow client is connected.
        assert_eq!(status(&exchange(addr, GET_CLOSE).await), 200);
        let mut buf = [0u8; 256];
        loop {
            // One more header byte every 20 ms, for as long as the server keeps the connection.
            if slow.write_all(b"a").await.is_err() {
                break;
            }
            match timeout(Duration::from_millis(20), slow.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => panic!("the server answered a request whose headers never ended: {:?}", &buf[..n]),
                Err(_) => {}
            }
            assert!(
                started.elapsed() < header_timeout + Duration::from_secs(5),
                "still open after {:?}",
                started.elapsed()
            );
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= header_timeout - Duration::from_millis(50), "cut off after {elapsed:?}, before the timeout");
        assert_eq!(status(&exchange(addr, GET_CLOSE).await), 200);
        cancel.cancel();
        timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_keep_alive_connection_is_closed_and_frees_its_slot() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(1, 500, 10_000), &held).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 256];
        while !response.ends_with(b"ok") {
            let n = timeout(Duration::from_secs(10), idle.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before answering");
            response.extend_from_slice(&buf[..n]);
        }
        // The only slot is held by the idle connection: the next client waits until it is closed.
        let waiting = tokio::spawn(exchange(addr, GET_CLOSE));
        closed_by_server(&mut idle, Duration::from_secs(5)).await;
        let response = timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(status(&response), 200, "{response}");
        cancel.cancel();
        timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_its_response_is_disconnected() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(1, 5_000, 5_000), &held).await;
        // 32 MiB do not fit in the socket buffers: the response stalls while the client reads nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        // The only slot is taken; the next client is served once the stalled one is dropped.
        let started = Instant::now();
        let response =
            timeout(Duration::from_secs(20), exchange(addr, GET_CLOSE)).await.expect("served after the stall");
        assert_eq!(status(&response), 200, "{response}");
        assert!(started.elapsed() >= Duration::from_millis(450), "served after {:?}", started.elapsed());
        drop(stalled);
        cancel.cancel();
        timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_body_gets_408_and_a_large_one_413() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(4, 5_000, 300), &held).await;
        let started = Instant::now();
        let response = exchange(addr, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten b").await;
        assert_eq!(status(&response), 408, "{response}");
        assert!(response.contains("admin.body_read_timeout_ms"), "{response}");
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());

        let large: &'static [u8] = Box::leak(
            [
                &b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2000\r\n\r\n"[..],
                &[b'x'; 2000],
            ]
            .concat()
            .into_boxed_slice(),
        );
        let response = exchange(addr, large).await;
        assert_eq!(status(&response), 413, "{response}");
        assert!(response.contains("over the cap"), "{response}");
        let fits = b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
        let response = exchange(addr, fits).await;
        assert!(response.ends_with("\r\n\r\n5"), "{response}");
        cancel.cancel();
        timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_lets_requests_in_flight_finish_and_refuses_new_connections() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(4, 5_000, 5_000), &held).await;
        let in_flight = tokio::spawn(exchange(addr, HOLD_CLOSE));
        wait_for("the request to be held", || held.now.load(Ordering::SeqCst) == 1).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        cancel.cancel();
        // An idle connection is closed at once; new connections are refused.
        closed_by_server(&mut idle, Duration::from_secs(2)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting connections after shutdown");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!task.is_finished(), "the endpoint stopped with a request in flight");
        held.gate.add_permits(1);
        let response = in_flight.await.unwrap();
        assert_eq!(status(&response), 200, "{response}");
        timeout(Duration::from_secs(5), task).await.expect("the endpoint stops once the request finished").unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_is_bounded_when_a_request_never_finishes() {
        let held = Arc::new(Held::default());
        let (addr, cancel, task) = start(limits(4, 5_000, 5_000), &held).await;
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck.write_all(HOLD_CLOSE).await.unwrap();
        wait_for("the request to be held", || held.now.load(Ordering::SeqCst) == 1).await;
        let started = Instant::now();
        cancel.cancel();
        timeout(SHUTDOWN_GRACE + Duration::from_secs(3), task).await.expect("shutdown is bounded").unwrap();
        assert!(started.elapsed() >= SHUTDOWN_GRACE - Duration::from_millis(100), "{:?}", started.elapsed());
        closed_by_server(&mut stuck, Duration::from_secs(2)).await;
    }
}
