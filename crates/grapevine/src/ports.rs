//! Picking ports and addresses: the first free port of a range for TCP and UDP together, and the
//! address to advertise when none is configured.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;

use grapevine_membership::GossipSocket;
use tokio::net::TcpListener;

use crate::StartError;

/// Binds the member's data (TCP) and gossip (UDP) sockets on the first port of `range` where both
/// are free.
pub(crate) async fn bind_member_ports(
    ip: IpAddr,
    range: RangeInclusive<u16>,
) -> Result<(TcpListener, GossipSocket), StartError> {
    if *range.start() == 0 {
        return bind_any_port(ip).await;
    }
    for port in range.clone() {
        let addr = SocketAddr::new(ip, port);
        let tcp = match TcpListener::bind(addr).await {
            Ok(tcp) => tcp,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error("bind", addr, e)),
        };
        match GossipSocket::bind(addr).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(_) => continue,
        }
    }
    Err(StartError::PortRangeExhausted { what: "member (TCP and UDP)", ip, first: *range.start(), last: *range.end() })
}

/// Port 0: any free port, the same for TCP and UDP (tests and embedders that pick no port).
async fn bind_any_port(ip: IpAddr) -> Result<(TcpListener, GossipSocket), StartError> {
    const ATTEMPTS: usize = 64;
    for _ in 0..ATTEMPTS {
        let addr = SocketAddr::new(ip, 0);
        let tcp = TcpListener::bind(addr).await.map_err(|e| bind_error("bind", addr, e))?;
        let port = tcp.local_addr().map_err(|e| bind_error("bind", addr, e))?.port();
        if let Ok(udp) = GossipSocket::bind(SocketAddr::new(ip, port)).await {
            return Ok((tcp, udp));
        }
    }
    Err(StartError::PortRangeExhausted { what: "member (TCP and UDP, any free port)", ip, first: 0, last: 0 })
}

/// Binds a TCP listener on the first free port of `range` (the admin endpoint).
pub(crate) async fn bind_tcp_in_range(
    what: &'static str,
    ip: IpAddr,
    range: RangeInclusive<u16>,
) -> Result<TcpListener, StartError> {
    for port in range.clone() {
        let addr = SocketAddr::new(ip, port);
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error("admin_bind", addr, e)),
        }
    }
    Err(StartError::PortRangeExhausted { what, ip, first: *range.start(), last: *range.end() })
}

fn bind_error(key: &'static str, addr: SocketAddr, e: io::Error) -> StartError {
    let hint = if e.kind() == io::ErrorKind::AddrNotAvailable {
        format!("{} is not an address of this host; set `{key}` to one of its interface addresses", addr.ip())
    } else {
        e.to_string()
    };
    StartError::Bind { addr, reason: hint }
}

/// The address to advertise when neither `public_address` nor a specific `bind` is set: the
/// source address this host would use to reach `toward` (the first listed member), found with an
/// unconnected UDP socket's `connect`, which sends nothing. Falls back to 127.0.0.1.
pub(crate) fn default_advertise_ip(toward: Option<SocketAddr>) -> IpAddr {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Some(target) = toward else { return loopback };
    if target.ip().is_loopback() {
        return loopback;
    }
    let unspecified: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    std::net::UdpSocket::bind(unspecified)
        .and_then(|socket| {
            socket.connect(target)?;
            socket.local_addr()
        })
        .map(|local| local.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(loopback)
}

/// This host's name, for default node ids.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace) && !h.contains('/'))
        .unwrap_or_else(|| "node".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_next_port_is_taken_when_the_first_is_busy() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (tcp, udp) = bind_member_ports(ip, 0..=0).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        assert_eq!(udp.local_addr().port(), port);
        let (tcp2, _udp2) = bind_member_ports(ip, port..=port.saturating_add(5)).await.unwrap();
        assert!(tcp2.local_addr().unwrap().port() > port);
    }

    #[tokio::test]
    async fn an_exhausted_range_is_an_error_naming_the_range() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (tcp, _udp) = bind_member_ports(ip, 0..=0).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let err = bind_member_ports(ip, port..=port).await.unwrap_err().to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}-{port}")), "{err}");
    }

    #[tokio::test]
    async fn a_foreign_bind_address_says_so() {
        let err = bind_member_ports("192.0.2.1".parse().unwrap(), 5701..=5701).await.unwrap_err().to_string();
        assert!(err.contains("not an address of this host"), "{err}");
    }

    #[test]
    fn advertise_defaults_to_loopback_without_members() {
        assert_eq!(default_advertise_ip(None), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(default_advertise_ip(Some("127.0.0.1:5701".parse().unwrap())), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
