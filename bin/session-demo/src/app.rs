//! The HTTP service of `session-demo`: log in, a per-session counter, log out, and the health
//! route for load balancers.
//!
//! | route                    | answer                                                          |
//! |--------------------------|-----------------------------------------------------------------|
//! | `POST /login?user=NAME`  | 200 `{"user": NAME, "counter": 0}`, sets the session cookie      |
//! |                          | (a fresh id: an earlier session of the client is deleted)        |
//! | `POST /incr`             | 200 `{"user": NAME, "counter": N}`: N grows by one per request;   |
//! |                          | 401 when not logged in                                           |
//! | `POST /logout`           | 200 `{"logged_out": true}`, deletes the session and its cookie   |
//! | `GET /health`            | 200 while the member is active with a current partition table   |
//! |                          | and the service is not draining, else 503 with a `reason`        |
//!
//! Every answer carries `x-served-by: <node id>`, so a client can see which instance served it.
//! Errors are JSON `{"error": "..."}`: 400 bad query, 401 not logged in, 404 unknown route, 500
//! a session record that does not decode, 503 the cluster could not serve the session (timeout,
//! member shutting down). A 503 whose JSON has `"outcome": "unknown"` means the session could
//! not be saved after the request ran: the change may or may not have been kept (the store
//! reported a write whose outcome is unknown). Other errors changed nothing.
//!
//! Changes of the health answer are logged (at info, with the reason), so an operator can match a
//! balancer's decisions with the member's state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use grapevine::Cluster;
use grapevine_sessions::GrapevineStore;
use serde::Deserialize;
use serde_json::json;
use tower_sessions::{Expiry, Session, SessionManagerLayer};
use tracing::{info, warn};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "grapevine_session";

/// The header naming the instance that served a request.
pub const SERVED_BY: &str = "x-served-by";

const USER: &str = "user";
const COUNTER: &str = "counter";

/// Whether the service is draining (shutting down: `/health` answers 503 while requests are
/// still served). Cheap to clone; all clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Marks the service as draining; `/health` answers 503 from now on.
    pub fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`Draining::start`] was called.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    cluster: Cluster,
    draining: Draining,
    /// The last health answer: 0 none yet, 1 healthy, 2 unhealthy (to log changes).
    last_health: Arc<AtomicU8>,
}

/// The service's router: routes, sessions on `store` expiring after `session_lifetime` without
/// use, and the `x-served-by` header.
pub fn router(cluster: Cluster, store: GrapevineStore, session_lifetime: time::Duration, draining: Draining) -> Router {
    let served_by = HeaderValue::from_str(cluster.local().node_id.as_ref()).ok();
    let sessions = SessionManagerLayer::new(store)
        .with_name(COOKIE_NAME)
        // The demo speaks plain HTTP; behind TLS, keep the default (secure cookies).
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(session_lifetime));
    Router::new()
        .route("/login", post(login))
        .route("/incr", post(incr))
        .route("/logout", post(logout))
        .layer(sessions)
        // Outside the session layer: it sees the answer to a failed save.
        .layer(middleware::from_fn(unsaved_session))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(AppState { cluster, draining, last_health: Arc::default() })
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let served_by = served_by.clone();
            async move {
                let mut response = next.run(request).await;
                if let Some(value) = served_by {
                    response.headers_mut().insert(HeaderName::from_static(SERVED_BY), value);
                }
                response
            }
        }))
}

/// tower-sessions answers a bare 500 (no body) when it cannot save the session after the
/// handler ran. Say what happened instead: the store's write failed, and may or may not have
/// been applied (a write whose synchronous backup did not confirm it, a lost answer).
async fn unsaved_session(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status() == StatusCode::INTERNAL_SERVER_ERROR && !response.headers().contains_key(header::CONTENT_TYPE)
    {
        let body = json!({
            "error": "the session could not be saved (see the service's log); the change may or may not have been kept",
            "outcome": "unknown",
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A session that could not be read or written: 500 when the stored record is unreadable
/// (log out to start over), 503 when the cluster could not serve it in time.
fn session_error(failure: tower_sessions::session::Error) -> Response {
    use tower_sessions::session::Error as SessionError;
    use tower_sessions::session_store::Error as StoreError;
    warn!(error = %failure, "session unavailable");
    match failure {
        SessionError::Store(StoreError::Decode(message)) | SessionError::Store(StoreError::Encode(message)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the session record is unreadable ({message}); log out and in again"),
        ),
        SessionError::SerdeJson(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the session holds an unexpected value ({e}); log out and in again"),
        ),
        SessionError::Store(StoreError::Backend(message)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the session store is unavailable: {message}"))
        }
    }
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    user: String,
}

/// 1 to 64 characters, none of them a control character.
fn valid_user(name: &str) -> bool {
    (1..=64).contains(&name.chars().count()) && !name.chars().any(char::is_control) && name.trim() == name
}

async fn login(session: Session, query: Result<Query<LoginQuery>, QueryRejection>) -> Response {
    let Ok(Query(LoginQuery { user })) = query else {
        return error(StatusCode::BAD_REQUEST, "expected a query `?user=NAME`");
    };
    if !valid_user(&user) {
        return error(
            StatusCode::BAD_REQUEST,
            "a user name has 1 to 64 characters, without control characters or surrounding spaces",
        );
    }
    // A fresh session id at every login (no session fixation); the old record is deleted
    // without being read, so a login also recovers from an unreadable record.
    if session.id().is_some() {
        if let Err(e) = session.flush().await {
            return session_error(e);
        }
        if let Err(e) = session.cycle_id().await {
            return session_error(e);
        }
    }
    let inserted = async {
        session.insert(USER, &user).await?;
        session.insert(COUNTER, 0u64).await
    };
    match inserted.await {
        Ok(()) => Json(json!({ "user": user, "counter": 0 })).into_response(),
        Err(e) => session_error(e),
    }
}

async fn incr(session: Session) -> Response {
    let user = match session.get::<String>(USER).await {
        Ok(Some(user)) => user,
        Ok(None) => return error(StatusCode::UNAUTHORIZED, "not logged in: POST /login?user=NAME first"),
        Err(e) => return session_error(e),
    };
    let counter = match session.get::<u64>(COUNTER).await {
        Ok(counter) => counter.unwrap_or(0).saturating_add(1),
        Err(e) => return session_error(e),
    };
    match session.insert(COUNTER, counter).await {
        Ok(()) => Json(json!({ "user": user, "counter": counter })).into_response(),
        Err(e) => session_error(e),
    }
}

async fn logout(session: Session) -> Response {
    if session.id().is_some()
        && let Err(e) = session.flush().await
    {
        return session_error(e);
    }
    Json(json!({ "logged_out": true })).into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    let mut health = state.cluster.health();
    if state.draining.is_draining() {
        health.healthy = false;
        health.reason = Some("draining: leaving the load balancer before shutdown".to_string());
    }
    let now = if health.healthy { 1 } else { 2 };
    if state.last_health.swap(now, Ordering::Relaxed) != now {
        match &health.reason {
            None => info!(members = health.members, "health: 200, serving"),
            Some(reason) => info!(%reason, members = health.members, "health: 503, not serving"),
        }
    }
    let status = if health.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(health)).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "unknown route; routes: POST /login?user=NAME, POST /incr, POST /logout, GET /health")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_short_and_printable() {
        for good in ["alice", "zoë", "user 7", &"x".repeat(64)] {
            assert!(valid_user(good), "{good:?}");
        }
        for bad in ["", " alice", "alice ", "a\nb", "\u{7}", &"x".repeat(65)] {
            assert!(!valid_user(bad), "{bad:?}");
        }
    }
}
