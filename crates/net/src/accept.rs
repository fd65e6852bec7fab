//! The accept loop and the acceptor's side of the handshake, including the simultaneous-dial rule.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::{debug, error, warn};

use crate::connection::{configure, install, run_connection};
use crate::dial::after_conn_lost;
use crate::handshake::{self, HandshakeError, Hello, Side, Status, Welcome};
use crate::net::Inner;
use crate::peer::{ConnCtx, Peer, lock};
use crate::stats::bump;

const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until shutdown. A permit of `connections_max` is taken before accepting, so excess
/// connections wait in the kernel backlog instead of consuming memory here.
pub(crate) async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(inner.config.connections_max.clamp(1, Semaphore::MAX_PERMITS)));
    let mut backoff = Duration::ZERO;
    loop {
        let permit = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                backoff = Duration::ZERO;
                inner.spawn(serve_inbound(inner.clone(), stream, remote, permit));
            }
            Err(e) => {
                // Usually out of file descriptors: wait for some to be released instead of spinning.
                backoff = (backoff * 2).clamp(Duration::from_millis(1), ACCEPT_BACKOFF_MAX);
                warn!(error = %e, retry_in = ?backoff, "accepting a connection failed");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

async fn serve_inbound(inner: Arc<Inner>, stream: TcpStream, remote: SocketAddr, permit: OwnedSemaphorePermit) {
    let accepted = tokio::select! {
        // A connection installed by the handshake must be run even if shutdown raced with it.
        biased;
        accepted = handshake(&inner, stream, remote) => accepted,
        _ = inner.shutdown.cancelled() => None,
    };
    // Outside the select: the connection's lifetime is governed by its own token.
    if let Some((peer, ctx, stream)) = accepted {
        run_connection(inner, peer, ctx, stream, Some(permit)).await;
    }
}

/// What the acceptor decided, under the peer's lock.
enum Decision {
    Accept,
    Duplicate,
    Reject(String),
}

/// The acceptor's handshake; returns the installed connection if it was accepted.
async fn handshake(
    inner: &Arc<Inner>,
    mut stream: TcpStream,
    remote: SocketAddr,
) -> Option<(Arc<Peer>, ConnCtx, TcpStream)> {
    let config = &inner.config;
    configure(&stream);
    let hello = match timeout(config.handshake_timeout, Hello::read(&mut stream)).await {
        Err(_) => {
            warn!(%remote, "closing an inbound connection: no handshake within {:?}", config.handshake_timeout);
            return None;
        }
        Ok(Err(HandshakeError::NotGrapevine(magic))) => {
            bump(&inner.stats.handshakes_rejected, 1);
            warn!(%remote, ?magic, "not a grapevine peer, closing the connection");
            return None;
        }
        Ok(Err(e)) => {
            bump(&inner.stats.handshakes_rejected, 1);
            warn!(%remote, error = %e, "closing an inbound connection: bad handshake");
            return None;
        }
        Ok(Ok(hello)) => hello,
    };
    let local_addr = stream.local_addr().unwrap_or(inner.local_addr);
    let ours = Side {
        member: &config.local,
        addr: local_addr,
        version: config.protocol_version,
        cluster_name: &config.cluster_name,
    };
    let theirs =
        Side { member: &hello.member, addr: remote, version: hello.version, cluster_name: &hello.cluster_name };
    let mut refusal = handshake::incompatibility(theirs, ours);
    if refusal.is_none() {
        if let Some(expected) = hello.expected.as_ref().filter(|e| **e != config.local) {
            refusal = Some(handshake::wrong_member(local_addr, expected, &config.local));
        } else if hello.member == config.local {
            refusal =
                Some(format!("{remote} claims to be this member ({}); is a node id configured twice?", config.local));
        }
    }

    let (decision, installed) = match refusal {
        Some(reason) => (Decision::Reject(reason), None),
        None => {
            // Only members that passed the checks get a peer entry.
            let peer = inner.peer_or_insert(&hello.member);
            let mut st = lock(&peer.state);
            let local_is_smaller = config.local < hello.member;
            let decision = if let Some(error) = &st.closed {
                Decision::Reject(format!("this member no longer accepts {}: {error}", hello.member))
            } else if st.dial.as_ref().is_some_and(|d| d.connecting) && local_is_smaller {
                // Both are dialing; the smaller member keeps its own dial, which will reach the peer.
                Decision::Duplicate
            } else if let Some(conn) = st.conn.as_mut().filter(|c| local_is_smaller && c.dialed_by_us && !c.suspect) {
                // Either the peer's dial was cancelled in favour of ours but had already been sent
                // (a race that must not break the good connection), or the peer considers our
                // connection dead. Answer "duplicate" once; a second dial means the latter.
                conn.suspect = true;
                Decision::Duplicate
            } else {
                if let Some(dial) = st.dial.take() {
                    // Both are dialing and the peer is smaller: its dial wins, ours stops and our
                    // queue goes out on this connection.
                    dial.token.cancel();
                }
                Decision::Accept
            };
            let ctx = matches!(decision, Decision::Accept).then(|| install(inner, &peer, &mut st, false, remote));
            drop(st);
            (decision, ctx.map(|ctx| (peer, ctx)))
        }
    };

    let (status, reason) = match &decision {
        Decision::Accept => (Status::Accepted, String::new()),
        Decision::Duplicate => {
            (Status::Duplicate, "both members are dialing; keeping the dial of the smaller member".to_string())
        }
        Decision::Reject(reason) => {
            bump(&inner.stats.handshakes_rejected, 1);
            error!(peer = %hello.member, %remote, %reason, "refusing a connection");
            (Status::Rejected, reason.clone())
        }
    };
    let welcome = Welcome {
        version: config.protocol_version,
        status,
        cluster_name: config.cluster_name.clone(),
        member: config.local.clone(),
        reason,
    };
    let written = timeout(config.handshake_timeout, stream.write_all(&welcome.encode())).await;
    let Some((peer, ctx)) = installed else {
        debug!(peer = %hello.member, %remote, ?status, "inbound handshake answered, closing");
        return None;
    };
    if !matches!(written, Ok(Ok(()))) {
        debug!(peer = %hello.member, %remote, "could not write the welcome, closing");
        let mut st = lock(&peer.state);
        if st.close_conn(ctx.id, &peer.id) {
            after_conn_lost(inner, &peer, &mut st);
        }
        return None;
    }
    debug!(peer = %hello.member, %remote, "accepted a connection");
    Some((peer, ctx, stream))
}
