//! The future of a request's response.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::NetError;
use crate::net::Inner;
use crate::peer::{Peer, ResponseResult, lock};
use crate::stats::bump;

/// The response to [`crate::Net::request`]: the body, or why there is none. Always resolves by the
/// request's timeout (measured from the `request` call). Dropping it forgets the request; a
/// request still queued is then not sent.
pub struct ResponseFuture {
    state: State,
}

enum State {
    Failed(Option<NetError>),
    Waiting(Box<Waiting>),
}

struct Waiting {
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    correlation: u64,
    rx: oneshot::Receiver<ResponseResult>,
    deadline: Instant,
    timeout: Duration,
    /// Created on first poll, so `request` can be called outside the runtime.
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl ResponseFuture {
    pub(crate) fn waiting(
        inner: Arc<Inner>,
        peer: Arc<Peer>,
        correlation: u64,
        rx: oneshot::Receiver<ResponseResult>,
        timeout: Duration,
    ) -> ResponseFuture {
        // A timeout too large to represent means "practically never" (a century), not a panic.
        let now = Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let waiting = Waiting { inner, peer, correlation, rx, deadline, timeout, sleep: None, done: false };
        ResponseFuture { state: State::Waiting(Box::new(waiting)) }
    }

    pub(crate) fn failed(error: NetError) -> ResponseFuture {
        ResponseFuture { state: State::Failed(Some(error)) }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Failed(e) => f.debug_struct("ResponseFuture").field("failed", e).finish(),
            State::Waiting(w) => f
                .debug_struct("ResponseFuture")
                .field("peer", &w.peer.id)
                .field("correlation", &w.correlation)
                .field("timeout", &w.timeout)
                .finish(),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Bytes, NetError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let w = match &mut self.state {
            State::Failed(e) => return Poll::Ready(Err(e.take().unwrap_or(NetError::Shutdown))),
            State::Waiting(w) => w,
        };
        if let Poll::Ready(result) = Pin::new(&mut w.rx).poll(cx) {
            w.done = true;
            // The sender is only dropped unsent if the whole peer state went away.
            return Poll::Ready(result.unwrap_or_else(|_| Err(NetError::ConnectionLost { peer: w.peer.id.clone() })));
        }
        let deadline = w.deadline;
        let sleep = w.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        w.done = true;
        let removed = lock(&w.peer.state).pending.remove(&w.correlation);
        if removed.is_none() {
            // The outcome was decided while the timer fired; report it rather than a timeout.
            if let Ok(result) = w.rx.try_recv() {
                return Poll::Ready(result);
            }
        }
        bump(&w.inner.stats.requests_timed_out, 1);
        Poll::Ready(Err(NetError::Timeout { peer: w.peer.id.clone(), after: w.timeout }))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.peer.state).pending.remove(&self.correlation);
        }
    }
}
