//! Handling of received frames: responses complete pending requests; requests and one-way
//! messages go to the registered handler, in frame order.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tracing::{debug, error, warn};

use crate::connection::Closed;
use crate::frame::{self, Frame, Kind};
use crate::net::Inner;
use crate::peer::{ConnCtx, Peer, lock};
use crate::{Incoming, NetError, Reply};

/// Handles one frame. `Err` closes the connection.
pub(crate) async fn dispatch(inner: &Arc<Inner>, peer: &Arc<Peer>, ctx: &ConnCtx, f: Frame) -> Result<(), Closed> {
    match f.kind {
        Kind::Response | Kind::ErrorResponse => {
            complete(peer, f);
            Ok(())
        }
        Kind::Request | Kind::OneWay => handle(inner, peer, ctx, f).await,
    }
}

fn complete(peer: &Peer, f: Frame) {
    // A round trip completed: the peer hears us and we hear it.
    peer.heard();
    let Some(pending) = lock(&peer.state).pending.remove(&f.correlation) else {
        // Normal after a timeout; harmless otherwise, so not a reason to drop the connection.
        debug!(peer = %peer.id, correlation = f.correlation, "response to an unknown or expired request, ignored");
        return;
    };
    let result = match f.kind {
        Kind::Response => Ok(f.body),
        _ => {
            let (code, message) = frame::parse_error_body(&f.body);
            Err(match code {
                frame::ERR_NO_HANDLER => NetError::NoHandler { peer: peer.id.clone(), service: pending.service },
                _ => NetError::Remote { peer: peer.id.clone(), service: pending.service, reason: message },
            })
        }
    };
    let _ = pending.tx.send(result);
}

async fn handle(inner: &Arc<Inner>, peer: &Arc<Peer>, ctx: &ConnCtx, f: Frame) -> Result<(), Closed> {
    let one_way = f.kind == Kind::OneWay;
    let (service, correlation) = (f.service, f.correlation);
    if service == frame::PING_SERVICE {
        // The data plane's own liveness probe: answered here, by no handler.
        if !one_way {
            inner.respond(peer, ctx.id, correlation, service, Ok(Bytes::new()));
        }
        return Ok(());
    }
    let Some(handler) = inner.handler(service) else {
        if one_way {
            warn!(peer = %peer.id, service, "dropping a one-way message for a service without a handler");
        } else {
            let message = format!("no handler for service {service} on {}", inner.config.local);
            inner.respond(peer, ctx.id, correlation, service, Err((frame::ERR_NO_HANDLER, message)));
        }
        return Ok(());
    };
    let outcome = {
        let _in_order = lock(&peer.dispatch);
        // Checked under the dispatch lock: once a replacement connection is installed, nothing
        // more of the old one is handled.
        if ctx.token.is_cancelled() {
            return Err(Closed::Cancelled);
        }
        let incoming = Incoming::new(one_way, &ctx.inflight);
        catch_unwind(AssertUnwindSafe(|| handler.handle(&peer.id, f.body, &incoming)))
    };
    let reply = match outcome {
        Ok(reply) => reply,
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            error!(peer = %peer.id, service, %message, "handler panicked");
            if !one_way {
                let message = format!("the handler panicked: {message}");
                inner.respond(peer, ctx.id, correlation, service, Err((frame::ERR_HANDLER_FAILED, message)));
            }
            return Ok(());
        }
    };
    if one_way {
        return Ok(());
    }
    match reply {
        Reply::None => inner.respond(peer, ctx.id, correlation, service, Ok(Bytes::new())),
        Reply::Now(body) => inner.respond(peer, ctx.id, correlation, service, Ok(body)),
        Reply::Later(slot, future) => {
            // The handler reserved a slot before doing the work, so nothing waits here: the
            // reader goes on reading (responses to our own requests among them).
            let (task_inner, task_peer, conn_id) = (inner.clone(), peer.clone(), ctx.id);
            inner.spawn(async move {
                let _slot = slot;
                let result = tokio::select! {
                    _ = task_inner.shutdown.cancelled() => return,
                    result = CatchUnwind(future) => result,
                };
                let reply = result.map_err(|message| {
                    error!(peer = %task_peer.id, service, %message, "handler future panicked");
                    (frame::ERR_HANDLER_FAILED, format!("the handler panicked: {message}"))
                });
                task_inner.respond(&task_peer, conn_id, correlation, service, reply);
            });
        }
    }
    Ok(())
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Turns a panic while polling a handler future into an error value.
struct CatchUnwind(Pin<Box<dyn Future<Output = Bytes> + Send>>);

impl Future for CatchUnwind {
    type Output = Result<Bytes, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Ready(body)) => Poll::Ready(Ok(body)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        }
    }
}
