//! Dialing a peer: bind (optionally to a port of `outbound_ports`), connect, handshake, install.
//! One dial per peer at a time, started when something is queued and there is no connection.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use grapevine_membership::MemberId;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::NetError;
use crate::connection::{configure, install, run_connection};
use crate::handshake::{self, Hello, Side, Status, Welcome};
use crate::net::Inner;
use crate::peer::{ConnCtx, DialSlot, Peer, PeerState, lock};
use crate::stats::bump;

/// First wait for the other side's connection after a "duplicate" answer; doubles per retry.
const DUPLICATE_WAIT_START: Duration = Duration::from_millis(100);

/// Starts a dial for `peer` unless one is running. Called with the peer's state locked.
pub(crate) fn start_dial(inner: &Arc<Inner>, peer: &Arc<Peer>, st: &mut PeerState) {
    if st.dial.is_some() || inner.shutdown.is_cancelled() {
        return;
    }
    let id = inner.next_id();
    let token = inner.shutdown.child_token();
    st.dial = Some(DialSlot { id, token: token.clone(), connecting: false });
    let delay = st.dial_delay();
    inner.spawn(dial(inner.clone(), peer.clone(), id, token, delay));
}

/// After the current connection was closed: what is still queued goes out on a new connection.
pub(crate) fn after_conn_lost(inner: &Arc<Inner>, peer: &Arc<Peer>, st: &mut PeerState) {
    if st.queue.is_empty() || st.closed.is_some() || st.conn.is_some() {
        return;
    }
    if st.addr.is_some() {
        start_dial(inner, peer, st);
    } else {
        let reason = "the connection was lost and no address is known to re-dial it".to_string();
        st.fail_queue(&peer.id, &NetError::NotSent { peer: peer.id.clone(), reason });
    }
}

enum Outcome {
    Connected(TcpStream, SocketAddr),
    Duplicate,
    Rejected(String),
    /// Could not connect or shake hands; `refused` when the peer's host refused the connection
    /// (nothing listens on the port: the member's process is gone).
    Failed {
        reason: String,
        refused: bool,
    },
}

async fn dial(inner: Arc<Inner>, peer: Arc<Peer>, dial_id: u64, token: CancellationToken, delay: Duration) {
    let connected = tokio::select! {
        // A connection installed by the dial must be run even if shutdown raced with it.
        biased;
        c = dial_until_done(&inner, &peer, dial_id, delay) => c,
        _ = token.cancelled() => None,
    };
    {
        // Whatever happened, this dial is over; a later enqueue may start another.
        let mut st = lock(&peer.state);
        if st.is_current_dial(dial_id) {
            st.dial = None;
        }
    }
    // Outside the select: the connection's lifetime is governed by its own token.
    if let Some((ctx, stream)) = connected {
        run_connection(inner, peer, ctx, stream, None).await;
    }
}

/// Dials until connected (returns the installed connection) or until the dial is over.
async fn dial_until_done(
    inner: &Arc<Inner>,
    peer: &Arc<Peer>,
    dial_id: u64,
    delay: Duration,
) -> Option<(ConnCtx, TcpStream)> {
    let config = &inner.config;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let started = Instant::now();
    let mut duplicate_wait = DUPLICATE_WAIT_START;
    // Bounded: every iteration but the last is a "duplicate" answer, and those stop after
    // connect_timeout + handshake_timeout.
    loop {
        let addr = {
            let mut st = lock(&peer.state);
            if !st.is_current_dial(dial_id) || st.conn.is_some() || st.queue.is_empty() {
                return None;
            }
            if let Some(dial) = st.dial.as_mut() {
                dial.connecting = true;
            }
            match st.addr {
                Some(addr) => addr,
                None => {
                    let reason = "no address is known for it".to_string();
                    st.fail_queue(&peer.id, &NetError::NotSent { peer: peer.id.clone(), reason });
                    return None;
                }
            }
        };
        match attempt(inner, &peer.id, addr).await {
            Outcome::Connected(stream, remote) => {
                let ctx = {
                    let mut st = lock(&peer.state);
                    if !st.is_current_dial(dial_id) {
                        // An inbound connection from the peer won meanwhile.
                        debug!(peer = %peer.id, "dropping a dialed connection, the peer's own dial won");
                        return None;
                    }
                    st.dial = None;
                    install(inner, peer, &mut st, true, remote)
                };
                info!(peer = %peer.id, %addr, "connected");
                return Some((ctx, stream));
            }
            Outcome::Duplicate => {
                // The peer is dialing us and keeps its own dial: wait for it to arrive.
                let connected = peer.connected.notified();
                tokio::pin!(connected);
                connected.as_mut().enable();
                {
                    let st = lock(&peer.state);
                    if !st.is_current_dial(dial_id) || st.conn.is_some() || st.queue.is_empty() {
                        return None;
                    }
                }
                let _ = timeout(duplicate_wait, connected).await;
                duplicate_wait = duplicate_wait.saturating_mul(2).min(config.handshake_timeout);
                let mut st = lock(&peer.state);
                if !st.is_current_dial(dial_id) || st.conn.is_some() || st.queue.is_empty() {
                    return None;
                }
                let window = config.connect_timeout.saturating_add(config.handshake_timeout);
                if started.elapsed() >= window {
                    let reason = format!(
                        "{addr} answered that it is dialing this member at the same time, but its \
                         connection did not arrive within {window:?}"
                    );
                    st.record_dial_failure(config.reconnect_backoff_max);
                    st.fail_queue(&peer.id, &NetError::NotSent { peer: peer.id.clone(), reason });
                    return None;
                }
            }
            Outcome::Rejected(reason) => {
                bump(&inner.stats.handshakes_rejected, 1);
                error!(peer = %peer.id, %addr, %reason, "handshake refused");
                let mut st = lock(&peer.state);
                if st.is_current_dial(dial_id) {
                    st.record_dial_failure(config.reconnect_backoff_max);
                    st.fail_queue(&peer.id, &NetError::Rejected { peer: peer.id.clone(), reason });
                }
                return None;
            }
            Outcome::Failed { reason, refused } => {
                info!(peer = %peer.id, %addr, %reason, "dial failed");
                let mut st = lock(&peer.state);
                if refused {
                    st.refused_since.get_or_insert_with(Instant::now);
                }
                if st.is_current_dial(dial_id) {
                    st.record_dial_failure(config.reconnect_backoff_max);
                    st.fail_queue(&peer.id, &NetError::NotSent { peer: peer.id.clone(), reason });
                }
                return None;
            }
        }
    }
}

/// One connect + handshake.
async fn attempt(inner: &Inner, expected: &MemberId, addr: SocketAddr) -> Outcome {
    let config = &inner.config;
    let mut stream = match timeout(config.connect_timeout, connect(addr, config.outbound_ports.as_ref())).await {
        Err(_) => {
            let reason = format!("connecting to {addr} timed out after {:?}", config.connect_timeout);
            return Outcome::Failed { reason, refused: false };
        }
        Ok(Err((reason, refused))) => return Outcome::Failed { reason, refused },
        Ok(Ok(stream)) => stream,
    };
    configure(&stream);
    let local_side_addr = stream.local_addr().unwrap_or(inner.local_addr);
    let hello = Hello {
        version: config.protocol_version,
        cluster_name: config.cluster_name.clone(),
        member: config.local.clone(),
        expected: Some(expected.clone()),
    };
    let exchange = async {
        stream.write_all(&hello.encode()).await?;
        Welcome::read(&mut stream).await
    };
    let welcome = match timeout(config.handshake_timeout, exchange).await {
        Err(_) => {
            let reason = format!("the handshake with {addr} did not complete within {:?}", config.handshake_timeout);
            return Outcome::Failed { reason, refused: false };
        }
        Ok(Err(e)) => return Outcome::Failed { reason: format!("handshake with {addr} failed: {e}"), refused: false },
        Ok(Ok(welcome)) => welcome,
    };
    let ours = Side {
        member: &config.local,
        addr: local_side_addr,
        version: config.protocol_version,
        cluster_name: &config.cluster_name,
    };
    let theirs = Side { member: &welcome.member, addr, version: welcome.version, cluster_name: &welcome.cluster_name };
    match welcome.status {
        Status::Duplicate => Outcome::Duplicate,
        Status::Rejected => {
            // Prefer our own statement of a version or cluster mismatch (it names both values from
            // the reply); otherwise the acceptor's reason.
            Outcome::Rejected(handshake::incompatibility(ours, theirs).unwrap_or(welcome.reason))
        }
        Status::Accepted => {
            if let Some(reason) = handshake::incompatibility(ours, theirs) {
                return Outcome::Rejected(reason);
            }
            if &welcome.member != expected {
                return Outcome::Rejected(handshake::wrong_member(addr, expected, &welcome.member));
            }
            Outcome::Connected(stream, addr)
        }
    }
}

/// Connects, binding to the first free port of `ports` if given. The error says whether the
/// connection was refused (nothing listens on the port).
async fn connect(addr: SocketAddr, ports: Option<&RangeInclusive<u16>>) -> Result<TcpStream, (String, bool)> {
    let refused = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionRefused;
    let new_socket = || if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let Some(ports) = ports else {
        let socket = new_socket().map_err(|e| (format!("could not create a socket: {e}"), false))?;
        return socket.connect(addr).await.map_err(|e| (format!("connecting to {addr} failed: {e}"), refused(&e)));
    };
    let unspecified = |port| match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    };
    // Bounded by the size of the range.
    for port in ports.clone() {
        let socket = new_socket().map_err(|e| (format!("could not create a socket: {e}"), false))?;
        // Lets a port whose previous connection is in TIME_WAIT be reused, so a small range
        // survives reconnects. Ports with a listener or an identical live connection still fail.
        if let Err(e) = socket.set_reuseaddr(true) {
            debug!(error = %e, "could not set SO_REUSEADDR on an outbound socket");
        }
        match socket.bind(unspecified(port)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err((format!("binding local port {port} of net.outbound_ports failed: {e}"), false)),
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            // This port is free to bind but already connected to the same destination.
            Err(e) if matches!(e.kind(), io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable) => continue,
            Err(e) => {
                return Err((format!("connecting to {addr} from local port {port} failed: {e}"), refused(&e)));
            }
        }
    }
    Err((
        format!(
            "no free local port in net.outbound_ports {}..={} ({} ports, all in use); widen the range or \
             unset it to use ephemeral ports",
            ports.start(),
            ports.end(),
            usize::from(*ports.end()).saturating_sub(usize::from(*ports.start())) + 1
        ),
        false,
    ))
}
