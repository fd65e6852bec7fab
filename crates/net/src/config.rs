//! Settings of the data plane.

use std::ops::RangeInclusive;
use std::time::Duration;

use grapevine_membership::{MemberId, ProtocolVersion};

/// Settings of the data plane. [`NetConfig::new`] fills in the documented defaults.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Members only talk to members of the same cluster.
    pub cluster_name: String,
    /// This member.
    pub local: MemberId,
    /// Members only talk to members with the same major version.
    pub protocol_version: ProtocolVersion,
    /// Largest frame, header included, in both directions (default 16 MiB). A received frame
    /// announcing more closes the connection, so use the same value on every member.
    pub frame_bytes_max: usize,
    /// How long a TCP connect may take (default 5 s).
    pub connect_timeout: Duration,
    /// How long the handshake may take, on both sides (default 5 s).
    pub handshake_timeout: Duration,
    /// Local ports to bind outgoing connections to, for firewalls that filter source ports; the
    /// first free one is used. `None` (default): an ephemeral port.
    pub outbound_ports: Option<RangeInclusive<u16>>,
    /// Cap on the bytes queued for one peer (default 64 MiB); beyond it sends fail with
    /// `QueueFull`.
    pub queue_bytes_max: usize,
    /// Per connection, how many `Reply::Later` futures may run at once (default 1024); when
    /// reached, the connection stops reading until one finishes.
    pub inflight_handlers_max: usize,
    /// Longest delay between re-dials of an unreachable peer (default 2 s; starts at 50 ms and
    /// doubles).
    pub reconnect_backoff_max: Duration,
    /// Most accepted connections open at once (default 1024); further connections wait in the
    /// listen backlog.
    pub connections_max: usize,
    /// A peer from which nothing arrived for this long is sent a liveness ping (answered by its
    /// data plane), and a peer whose connection breaks is pinged at once, so that
    /// [`crate::Net::reachability`] knows every peer's state even when idle (default `None`: no
    /// pings; a cluster member sets its gossip interval).
    pub ping_interval: Option<Duration>,
}

impl NetConfig {
    /// Settings with the documented defaults.
    pub fn new(cluster_name: impl Into<String>, local: MemberId, protocol_version: ProtocolVersion) -> Self {
        NetConfig {
            cluster_name: cluster_name.into(),
            local,
            protocol_version,
            frame_bytes_max: 16 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            outbound_ports: None,
            queue_bytes_max: 64 * 1024 * 1024,
            inflight_handlers_max: 1024,
            reconnect_backoff_max: Duration::from_secs(2),
            connections_max: 1024,
            ping_interval: None,
        }
    }
}
