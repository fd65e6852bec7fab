//! One client connection: read what arrived, execute every complete request in order, write all
//! their replies with one write, repeat. A protocol error is answered and closes the connection.
//! While the connection has subscriptions, it also writes out the messages of its push queue
//! whenever they arrive (bounded by the same write timeout as replies).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::commands::{After, Session, execute};
use crate::pubsub::PubSub;
use crate::reply::{Reply, encode};
use crate::request::next_request;
use crate::{Shared, reply};

/// Initial size of each connection's buffers; they grow with the requests and replies.
const BUFFER_BYTES: usize = 4096;
/// Replies are written out once this many bytes are pending, even in the middle of a pipeline.
const FLUSH_BYTES: usize = 64 << 10;
/// How long writing a refusal may take.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP keepalive: idle time before the first probe, and between probes. Closes connections whose
/// client's host vanished without a FIN (subscribed connections are never closed for idleness).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Answers a connection that cannot be served with `message` and closes it.
pub(crate) async fn refuse(mut socket: TcpStream, message: &'static str) {
    let mut out = BytesMut::new();
    encode(&mut out, Reply::Error(message.to_string()), 2);
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, socket.write_all(&out)).await;
}

/// Writes the pending replies. Tries a plain non-blocking write first, which sends a whole batch
/// of small replies at once; only what does not fit the socket buffer waits, bounded by `timeout`
/// (a client that stops reading its replies is closed). `false`: the connection is gone.
async fn flush(socket: &mut TcpStream, out: &mut BytesMut, timeout: Option<Duration>) -> bool {
    let mut sent = 0;
    while sent < out.len() {
        match socket.try_write(&out[sent..]) {
            Ok(0) => return false,
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let rest = socket.write_all(&out[sent..]);
                let written = match timeout {
                    Some(t) => tokio::time::timeout(t, rest).await.is_ok_and(|r| r.is_ok()),
                    None => rest.await.is_ok(),
                };
                out.clear();
                return written;
            }
            Err(_) => return false,
        }
    }
    out.clear();
    true
}

pub(crate) async fn serve(shared: &Shared, mut socket: TcpStream, id: u64, cancel: &CancellationToken) {
    let _ = socket.set_nodelay(true);
    let keepalive = TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
    if let Err(error) = SockRef::from(&socket).set_tcp_keepalive(&keepalive) {
        debug!(id, %error, "could not enable TCP keepalive");
    }
    let limits = shared.settings.limits;
    let idle = shared.settings.idle_timeout;
    let mut session = Session::new(id, &shared.settings.default_map, PubSub::new(shared.pubsub.clone()));
    let mut input = BytesMut::with_capacity(BUFFER_BYTES);
    let mut out = BytesMut::with_capacity(BUFFER_BYTES);
    // One cancellation future and one idle timer for the connection's life, rather than one of
    // each per read: both register with shared structures (the token's waiters, the timer wheel).
    // The timer is moved only when it fires early (the connection was active meanwhile).
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let idle_timer = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle_timer);
    let mut last_read = Instant::now();
    loop {
        // Counted per batch: one shared atomic per command would bounce between worker threads.
        let mut commands = 0;
        loop {
            match next_request(&mut input, &limits) {
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => {
                    commands += 1;
                    let (reply, after) = execute(shared, &mut session, args).await;
                    encode(&mut out, reply, session.proto);
                    if after == After::Close {
                        shared.counters.commands_processed.fetch_add(commands, Ordering::Relaxed);
                        flush(&mut socket, &mut out, idle).await;
                        return;
                    }
                    if out.len() >= FLUSH_BYTES && !flush(&mut socket, &mut out, idle).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    shared.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(id, %error, "RESP protocol error; closing the connection");
                    encode(&mut out, reply::Reply::err(&error.0), session.proto);
                    flush(&mut socket, &mut out, idle).await;
                    return;
                }
            }
        }
        shared.counters.commands_processed.fetch_add(commands, Ordering::Relaxed);
        if !flush(&mut socket, &mut out, idle).await {
            return;
        }
        if input.capacity() - input.len() < BUFFER_BYTES / 4 {
            input.reserve(BUFFER_BYTES.max(input.len()));
        }
        // Not biased (beyond what is ready first): a flood of messages must not keep a
        // subscriber's commands (UNSUBSCRIBE) from being read, nor the other way round.
        let read = loop {
            tokio::select! {
                _ = &mut cancelled => return,
                read = socket.read_buf(&mut input) => break read,
                push = session.pubsub.next(), if session.pubsub.has_queue() => {
                    encode(&mut out, push, session.proto);
                    while out.len() < FLUSH_BYTES {
                        let Some(push) = session.pubsub.try_next() else { break };
                        encode(&mut out, push, session.proto);
                    }
                    let flushed = tokio::select! {
                        biased;
                        _ = &mut cancelled => return,
                        flushed = flush(&mut socket, &mut out, idle) => flushed,
                    };
                    if !flushed {
                        debug!(id, "RESP subscriber did not take its messages in time; closing it");
                        return;
                    }
                }
                _ = &mut idle_timer, if idle.is_some() => {
                    let idle = idle.unwrap_or_default();
                    let mut deadline = last_read + idle;
                    let now = Instant::now();
                    if now >= deadline {
                        // As in Redis, a subscriber is not idle: it waits for messages.
                        if !session.pubsub.subscribed() {
                            debug!(id, "RESP connection idle; closing it");
                            return;
                        }
                        deadline = now + idle;
                    }
                    idle_timer.as_mut().reset(deadline.into());
                }
            }
        };
        match read {
            Ok(n) if n > 0 => last_read = Instant::now(),
            _ => return,
        }
    }
}
