//! One client connection: read what arrived, execute every complete request in order, write all
//! their replies with one write, repeat. A protocol error is answered and closes the connection.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::commands::{After, Session, execute};
use crate::reply::{Reply, encode};
use crate::request::next_request;
use crate::{Shared, reply};

/// Initial size of each connection's buffers; they grow with the requests and replies.
const BUFFER_BYTES: usize = 4096;
/// Replies are written out once this many bytes are pending, even in the middle of a pipeline.
const FLUSH_BYTES: usize = 64 << 10;
/// How long writing a refusal may take.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection that cannot be served with `message` and closes it.
pub(crate) async fn refuse(mut socket: TcpStream, message: &'static str) {
    let mut out = BytesMut::new();
    encode(&mut out, Reply::Error(message.to_string()), 2);
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, socket.write_all(&out)).await;
}

async fn flush(socket: &mut TcpStream, out: &mut BytesMut, timeout: Option<Duration>) -> bool {
    if out.is_empty() {
        return true;
    }
    let written = match timeout {
        Some(t) => tokio::time::timeout(t, socket.write_all(out)).await.unwrap_or(Ok(())).is_ok(),
        None => socket.write_all(out).await.is_ok(),
    };
    out.clear();
    written
}

pub(crate) async fn serve(shared: &Shared, mut socket: TcpStream, id: u64, cancel: &CancellationToken) {
    let _ = socket.set_nodelay(true);
    let limits = shared.settings.limits;
    let idle = shared.settings.idle_timeout;
    let mut session = Session::new(id, &shared.settings.default_map);
    let mut input = BytesMut::with_capacity(BUFFER_BYTES);
    let mut out = BytesMut::with_capacity(BUFFER_BYTES);
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
        let read = tokio::select! {
            _ = cancel.cancelled() => return,
            read = read_some(&mut socket, &mut input, idle) => read,
        };
        match read {
            Some(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Reads what is available; `None` after `idle` without data or on an error.
async fn read_some(socket: &mut TcpStream, input: &mut BytesMut, idle: Option<Duration>) -> Option<usize> {
    match idle {
        Some(idle) => tokio::time::timeout(idle, socket.read_buf(input)).await.ok()?.ok(),
        None => socket.read_buf(input).await.ok(),
    }
}
