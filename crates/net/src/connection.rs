//! A live connection: a reader task that parses frames and dispatches them in order, and a writer
//! task that drains the peer's queue, coalescing whatever is queued into one flush.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::dial::after_conn_lost;
use crate::dispatch::dispatch;
use crate::frame::{self, FrameError, Kind};
use crate::net::Inner;
use crate::peer::{ConnCtx, ConnSlot, Outgoing, Peer, PeerState, lock};
use crate::stats::bump;

/// Spare room kept in the read buffer for small frames; big frames get exactly their size.
const READ_SPARE: usize = 64 * 1024;
/// Writer buffer; frames queued together go out in as few writes as this allows.
const WRITE_BUFFER: usize = 64 * 1024;
/// Most frames or bytes the writer takes off the queue per lock; frames taken are lost if the
/// connection breaks, frames left queued go out on the next connection.
const BATCH_FRAMES: usize = 256;
const BATCH_BYTES: usize = 256 * 1024;
/// How long a closing connection waits for its writer (which stops at once when cancelled).
const WRITER_WAIT: Duration = Duration::from_secs(5);
/// Idle time before TCP keepalive probes; detects peers that vanished without a FIN.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Socket options for every connection, dialed or accepted. Failures only cost latency or
/// dead-peer detection, so they are logged, not fatal.
pub(crate) fn configure(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "could not set TCP_NODELAY");
    }
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE_IDLE)) {
        debug!(error = %e, "could not enable TCP keepalive");
    }
}

/// Makes a new connection the peer's current one (closing the previous one, if any). Called with
/// the peer's state locked, right after the handshake decided to use it.
pub(crate) fn install(
    inner: &Inner,
    peer: &Peer,
    st: &mut PeerState,
    dialed_by_us: bool,
    remote: SocketAddr,
) -> ConnCtx {
    let permits = inner.config.inflight_handlers_max.clamp(1, Semaphore::MAX_PERMITS);
    let ctx = ConnCtx {
        id: inner.next_id(),
        token: inner.shutdown.child_token(),
        wake: Arc::new(Notify::new()),
        remote,
        inflight: Arc::new(Semaphore::new(permits)),
    };
    if let Some(old) = st.conn.as_ref().map(|c| c.id) {
        info!(peer = %peer.id, %remote, "replacing the connection to the peer: it dialed again, so it considers the old one dead");
        st.close_conn(old, &peer.id);
    }
    st.conn =
        Some(ConnSlot { id: ctx.id, token: ctx.token.clone(), wake: ctx.wake.clone(), dialed_by_us, suspect: false });
    st.backoff = Duration::ZERO;
    st.last_failure = None;
    st.refused_since = None;
    peer.heard();
    peer.connected.notify_waiters();
    ctx
}

/// Why a connection's reader stopped.
#[derive(Debug)]
pub(crate) enum Closed {
    /// Closed on purpose: replaced, severed, peer forgotten, shutdown.
    Cancelled,
    Eof,
    Truncated(usize),
    Io(io::Error),
    Malformed(FrameError),
}

/// Runs an installed connection until it closes, then cleans up: requests written to it fail with
/// `ConnectionLost`, what is still queued goes out on a new connection.
pub(crate) async fn run_connection(
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    ctx: ConnCtx,
    stream: TcpStream,
    permit: Option<OwnedSemaphorePermit>,
) {
    bump(&inner.stats.connections_open, 1);
    let (rd, wr) = stream.into_split();
    let writer = inner.spawn(write_loop(inner.clone(), peer.clone(), ctx.clone(), wr));
    let closed = read_loop(&inner, &peer, &ctx, rd).await;
    ctx.token.cancel();
    if timeout(WRITER_WAIT, writer).await.is_err() {
        warn!(peer = %peer.id, "connection writer did not stop within {WRITER_WAIT:?}");
    }
    let (peer_id, remote) = (&peer.id, ctx.remote);
    match &closed {
        Closed::Cancelled => debug!(peer = %peer_id, %remote, "connection closed"),
        Closed::Eof => info!(peer = %peer_id, %remote, "the peer closed the connection"),
        Closed::Truncated(n) => {
            info!(peer = %peer_id, %remote, buffered = n, "the peer closed the connection in the middle of a frame")
        }
        Closed::Io(e) => info!(peer = %peer_id, %remote, error = %e, "connection failed"),
        Closed::Malformed(e) => {
            bump(&inner.stats.frames_malformed, 1);
            warn!(peer = %peer_id, %remote, reason = %e, "closing the connection: the peer sent a malformed frame");
        }
    }
    let current = {
        let mut st = lock(&peer.state);
        let current = st.close_conn(ctx.id, &peer.id);
        if current {
            after_conn_lost(&inner, &peer, &mut st);
        }
        current && st.closed.is_none()
    };
    // The peer closed or broke the connection: find out at once whether it is still there (a
    // process that died leaves a port that refuses), rather than at the next ping round.
    if current
        && !matches!(closed, Closed::Cancelled)
        && let Some(interval) = inner.config.ping_interval.filter(|i| !i.is_zero())
        && !inner.shutdown.is_cancelled()
    {
        crate::net::ping(&inner, &peer, interval);
    }
    inner.stats.connections_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    drop(permit);
}

async fn read_loop(inner: &Arc<Inner>, peer: &Arc<Peer>, ctx: &ConnCtx, mut rd: OwnedReadHalf) -> Closed {
    let max = inner.config.frame_bytes_max;
    let mut buf = BytesMut::with_capacity(READ_SPARE);
    loop {
        // Bounded by what is buffered, which is bounded by the reservation below.
        loop {
            match frame::parse(&mut buf, max) {
                Ok(Some(f)) => {
                    if inner.faults.drops_inbound(&peer.id) {
                        continue;
                    }
                    bump(&inner.stats.frames_in, 1);
                    bump(&inner.stats.bytes_in, (frame::LEN_BYTES + frame::HEADER_BYTES + f.body.len()) as u64);
                    if let Err(closed) = dispatch(inner, peer, ctx, f).await {
                        return closed;
                    }
                }
                Ok(None) => break,
                Err(e) => return Closed::Malformed(e),
            }
        }
        // `needed` is at most 4 + frame_bytes_max: parse rejected anything larger.
        let needed = frame::bytes_needed(&buf);
        buf.reserve(needed.saturating_sub(buf.len()).max(READ_SPARE.min(max)));
        let read = tokio::select! {
            _ = ctx.token.cancelled() => return Closed::Cancelled,
            r = rd.read_buf(&mut buf) => r,
        };
        match read {
            Ok(0) if buf.is_empty() => return Closed::Eof,
            Ok(0) => return Closed::Truncated(buf.len()),
            Ok(_) => {}
            Err(e) => return Closed::Io(e),
        }
    }
}

async fn write_loop(inner: Arc<Inner>, peer: Arc<Peer>, ctx: ConnCtx, wr: OwnedWriteHalf) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let result = tokio::select! {
        _ = ctx.token.cancelled() => Ok(()),
        r = write_frames(&inner, &peer, &ctx, &mut w) => r,
    };
    if let Err(e) = result {
        info!(peer = %peer.id, remote = %ctx.remote, error = %e, "write failed, closing the connection");
    }
    ctx.token.cancel();
}

async fn write_frames(inner: &Inner, peer: &Peer, ctx: &ConnCtx, w: &mut BufWriter<OwnedWriteHalf>) -> io::Result<()> {
    let mut batch = Vec::with_capacity(BATCH_FRAMES);
    loop {
        if !take_batch(peer, ctx.id, &mut batch) {
            return Ok(());
        }
        if batch.is_empty() {
            // The queue is momentarily empty: now is the time to flush what was coalesced.
            w.flush().await?;
            ctx.wake.notified().await;
            continue;
        }
        for out in batch.drain(..) {
            if inner.faults.drops(&peer.id, out.service) {
                continue;
            }
            w.write_all(&frame::header(out.kind, out.correlation, out.service, out.body.len())).await?;
            w.write_all(&out.body).await?;
            bump(&inner.stats.frames_out, 1);
            bump(&inner.stats.bytes_out, out.wire_len() as u64);
        }
    }
}

/// Takes the next frames to write off the queue. Requests are marked as written to this
/// connection (so they fail with `ConnectionLost` if it breaks); requests whose caller gave up
/// and responses meant for another connection are skipped. False when this connection is no
/// longer current.
fn take_batch(peer: &Peer, conn_id: u64, batch: &mut Vec<Outgoing>) -> bool {
    let mut st = lock(&peer.state);
    if !st.is_current_conn(conn_id) {
        return false;
    }
    let mut bytes = 0;
    while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
        let Some(out) = st.queue.pop_front() else { break };
        st.queued_bytes -= out.wire_len();
        match out.kind {
            Kind::Request => match st.pending.get_mut(&out.correlation) {
                Some(pending) => pending.written_on = Some(conn_id),
                None => continue,
            },
            Kind::Response | Kind::ErrorResponse if out.origin != Some(conn_id) => continue,
            _ => {}
        }
        bytes += out.wire_len();
        batch.push(out);
    }
    true
}
