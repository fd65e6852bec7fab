//! Parsing of member-list entries: `host`, `host:port`, `host:first-last`, IPv6 in brackets.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use crate::DiscoveryError;

/// The widest port range one entry may name. A bare host expands to the node's whole port range
/// (`port` .. `port + port_count - 1`), which must stay under this too.
pub const MAX_PORTS_PER_ENTRY: usize = 1024;

/// The most addresses a whole member list may expand to.
pub const MAX_ADDRESSES: usize = 16_384;

/// One entry of a static member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    host: String,
    ports: RangeInclusive<u16>,
}

impl SeedSpec {
    /// Parses one entry. A bare host means every port of `default_ports` (the node's own range).
    pub fn parse(entry: &str, default_ports: RangeInclusive<u16>) -> Result<SeedSpec, DiscoveryError> {
        let invalid = |reason: &str| DiscoveryError::InvalidEntry { entry: entry.to_string(), reason: reason.into() };
        let entry_trimmed = entry.trim();
        if entry_trimmed.is_empty() {
            return Err(invalid("the entry is empty"));
        }
        let (host, port_part) = if let Some(rest) = entry_trimmed.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| invalid("missing `]` after IPv6 address"))?;
            let port_part = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| invalid("expected `:port` after `]`"))?),
            };
            (host, port_part)
        } else if entry_trimmed.matches(':').count() > 1 {
            // An IPv6 address without brackets cannot carry a port.
            (entry_trimmed, None)
        } else {
            match entry_trimmed.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (entry_trimmed, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(invalid("the host contains a space or `/`"));
        }
        let ports = match port_part {
            None => default_ports,
            Some(spec) => parse_ports(spec).map_err(|reason| invalid(&reason))?,
        };
        let width = usize::from(*ports.end()) - usize::from(*ports.start()) + 1;
        if width > MAX_PORTS_PER_ENTRY {
            return Err(invalid(&format!(
                "the port range has {width} ports; at most {MAX_PORTS_PER_ENTRY} are allowed"
            )));
        }
        Ok(SeedSpec { host: host.to_string(), ports })
    }

    /// The host as written (without IPv6 brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The ports this entry covers.
    pub fn ports(&self) -> RangeInclusive<u16> {
        self.ports.clone()
    }

    /// True when the host is an IP literal, which never needs resolving again.
    pub fn is_literal(&self) -> bool {
        self.host.parse::<IpAddr>().is_ok()
    }

    /// Expands the entry to socket addresses, resolving the host name if needed.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let ips: Vec<IpAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let mut ips: Vec<IpAddr> =
                    tokio::net::lookup_host((self.host.as_str(), 0)).await?.map(|a| a.ip()).collect();
                ips.sort();
                ips.dedup();
                ips
            }
        };
        Ok(ips.into_iter().flat_map(|ip| self.ports.clone().map(move |port| SocketAddr::new(ip, port))).collect())
    }
}

impl fmt::Display for SeedSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.ports.start() == self.ports.end() {
            write!(f, "{host}:{}", self.ports.start())
        } else {
            write!(f, "{host}:{}-{}", self.ports.start(), self.ports.end())
        }
    }
}

fn parse_ports(spec: &str) -> Result<RangeInclusive<u16>, String> {
    let parse_one = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(0) => Err("port 0 is not a valid peer port".into()),
            Ok(port) => Ok(port),
            Err(_) => Err(format!("{s:?} is not a port number (1-65535)")),
        }
    };
    match spec.split_once('-') {
        None => {
            let port = parse_one(spec)?;
            Ok(port..=port)
        }
        Some((first, last)) => {
            let (first, last) = (parse_one(first)?, parse_one(last)?);
            if first > last {
                return Err(format!("the port range {first}-{last} is reversed"));
            }
            Ok(first..=last)
        }
    }
}

/// Parses a comma-separated member list. Empty entries (from `a,,b` or a trailing comma) are
/// ignored; an empty list means a single-node cluster.
pub fn parse_member_list(list: &str, default_ports: RangeInclusive<u16>) -> Result<Vec<SeedSpec>, DiscoveryError> {
    let seeds: Vec<SeedSpec> = list
        .split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| SeedSpec::parse(entry, default_ports.clone()))
        .collect::<Result<_, _>>()?;
    let count: usize = seeds.iter().map(|s| s.ports.clone().count()).sum();
    if count > MAX_ADDRESSES {
        return Err(DiscoveryError::TooManyAddresses { count, max: MAX_ADDRESSES });
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: RangeInclusive<u16> = 5701..=5800;

    fn parse(s: &str) -> Result<SeedSpec, DiscoveryError> {
        SeedSpec::parse(s, RANGE)
    }

    #[test]
    fn accepts_every_documented_form() {
        assert_eq!(parse("10.0.0.1").unwrap().ports(), RANGE);
        assert_eq!(parse("10.0.0.1:5702").unwrap().ports(), 5702..=5702);
        assert_eq!(parse("db-1.example:5701-5703").unwrap().ports(), 5701..=5703);
        let v6 = parse("[::1]:6000-6001").unwrap();
        assert_eq!((v6.host(), v6.ports()), ("::1", 6000..=6001));
        assert_eq!(parse("::1").unwrap().host(), "::1");
        assert_eq!(parse(" 10.0.0.1 ").unwrap().host(), "10.0.0.1");
    }

    #[test]
    fn rejects_malformed_entries_with_a_reason() {
        for (entry, needle) in [
            ("10.0.0.1:", "not a port"),
            ("10.0.0.1:http", "not a port"),
            ("10.0.0.1:0", "port 0"),
            ("10.0.0.1:70000", "not a port"),
            ("10.0.0.1:5800-5701", "reversed"),
            ("10.0.0.1:1-60000", "at most"),
            (":5701", "host is empty"),
            ("[::1", "missing `]`"),
            ("[::1]5701", "expected `:port`"),
            ("a b:1", "space"),
        ] {
            let err = parse(entry).unwrap_err().to_string();
            assert!(err.contains(needle), "{entry:?}: {err}");
            assert!(err.contains("expected `host`"), "{entry:?}: {err}");
        }
    }

    #[test]
    fn list_skips_empty_entries_and_limits_total_size() {
        assert!(parse_member_list("", RANGE).unwrap().is_empty());
        assert_eq!(parse_member_list("a,,b,", RANGE).unwrap().len(), 2);
        let huge: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}:1000-2000")).collect();
        assert!(matches!(parse_member_list(&huge.join(","), RANGE), Err(DiscoveryError::TooManyAddresses { .. })));
    }

    #[test]
    fn display_round_trips() {
        for entry in ["10.0.0.1:5701-5800", "[::1]:6000", "host:7"] {
            assert_eq!(parse(entry).unwrap().to_string(), entry);
        }
    }
}
