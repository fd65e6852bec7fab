//! Which network interfaces mDNS runs on, and which address a member advertises when `bind` does
//! not say. Pure functions over a list of the host's interfaces.
//!
//! On a host with several interfaces a member must announce on the one its peers reach it
//! through, and advertise that interface's address, or the cluster never forms (the seed's
//! multi-homed servers). So when neither the interfaces nor `bind` say which one, a host with
//! several candidate interfaces is a start-up error that lists them, rather than a guess.

use std::fmt;
use std::net::IpAddr;

/// How an operator names an interface: by name (`eth1`) or by one of its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSpec {
    /// An interface name, as `ip link` shows it.
    Name(String),
    /// The interface that holds this address.
    Addr(IpAddr),
}

/// The longest interface name Linux accepts (IFNAMSIZ - 1).
pub const INTERFACE_NAME_BYTES_MAX: usize = 15;

impl InterfaceSpec {
    /// Parses `eth1` or `10.0.0.5`.
    pub fn parse(text: &str) -> Result<InterfaceSpec, String> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(format!("{text:?} cannot name an interface: use a name or an interface's own address"));
            }
            return Ok(InterfaceSpec::Addr(ip));
        }
        if text.is_empty()
            || text.len() > INTERFACE_NAME_BYTES_MAX
            || text.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(format!(
                "{text:?} is neither an interface name (1 to {INTERFACE_NAME_BYTES_MAX} characters, e.g. `eth1`) \
                 nor an IP address"
            ));
        }
        Ok(InterfaceSpec::Name(text.to_string()))
    }

    fn matches(&self, interface: &HostInterface) -> bool {
        match self {
            InterfaceSpec::Name(name) => *name == interface.name,
            InterfaceSpec::Addr(ip) => interface.addrs.contains(ip),
        }
    }
}

impl fmt::Display for InterfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceSpec::Name(name) => f.write_str(name),
            InterfaceSpec::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

/// One interface of the host, with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// Its name.
    pub name: String,
    /// Its index (the IPv6 zone), when the system reports one.
    pub index: Option<u32>,
    /// Its addresses, in the order the system lists them.
    pub addrs: Vec<IpAddr>,
    /// True for loopback interfaces.
    pub loopback: bool,
}

impl fmt::Display for HostInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<String> = self.addrs.iter().map(IpAddr::to_string).collect();
        write!(f, "{} ({})", self.name, addrs.join(", "))
    }
}

/// The host's interfaces that are up, are not point-to-point links and have an address.
pub fn host_interfaces() -> std::io::Result<Vec<HostInterface>> {
    let mut out: Vec<HostInterface> = Vec::new();
    for entry in if_addrs::get_if_addrs()? {
        if !entry.is_oper_up() || entry.is_p2p() {
            continue;
        }
        let ip = entry.ip();
        match out.iter_mut().find(|i| i.name == entry.name) {
            Some(known) => {
                if !known.addrs.contains(&ip) {
                    known.addrs.push(ip);
                }
            }
            None => out.push(HostInterface {
                loopback: entry.is_loopback(),
                name: entry.name,
                index: entry.index,
                addrs: vec![ip],
            }),
        }
    }
    Ok(out)
}

/// Why the interfaces or the advertised address could not be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterfaceError {
    /// A configured interface does not exist (or is down, or has no address).
    #[error("no network interface that is up matches {spec:?}; this host has {available}")]
    NoSuchInterface {
        /// The entry as configured.
        spec: String,
        /// The host's interfaces.
        available: String,
    },
    /// `bind` names an address no interface holds.
    #[error("no network interface holds the bind address {bind}; this host has {available}")]
    BindNotFound {
        /// The bind address.
        bind: IpAddr,
        /// The host's interfaces.
        available: String,
    },
    /// Only loopback interfaces (or none) are up.
    #[error(
        "no network interface other than loopback is up ({available}); name one in `mdns_interfaces` \
         (`lo` for members on this host only)"
    )]
    NoInterface {
        /// The host's interfaces.
        available: String,
    },
    /// Several addresses could be advertised.
    #[error(
        "mDNS would run on {choices}: set `bind` to the address other members should use, or \
         `mdns_interfaces` to the one interface they reach this member through"
    )]
    Ambiguous {
        /// The interfaces and addresses.
        choices: String,
    },
    /// The interfaces have no address a peer could use.
    #[error(
        "the mDNS interfaces {interfaces} have no address other members can use (an IPv6 link-local \
         address cannot be announced); set `bind`"
    )]
    NoUsableAddress {
        /// The interfaces.
        interfaces: String,
    },
}

fn list(interfaces: &[HostInterface]) -> String {
    if interfaces.is_empty() {
        return "no interface that is up".to_string();
    }
    interfaces.iter().map(HostInterface::to_string).collect::<Vec<_>>().join(", ")
}

/// The interfaces to announce and browse on: those named in `specs`; else the one holding
/// `bind` (when it names an address); else every interface that is up, except loopback ones.
pub fn select(
    specs: &[InterfaceSpec],
    bind: Option<IpAddr>,
    host: &[HostInterface],
) -> Result<Vec<HostInterface>, InterfaceError> {
    let mut chosen: Vec<HostInterface> = Vec::new();
    let mut add = |interface: &HostInterface| {
        if !chosen.iter().any(|c| c.name == interface.name) {
            chosen.push(interface.clone());
        }
    };
    if !specs.is_empty() {
        for spec in specs {
            let matching: Vec<&HostInterface> = host.iter().filter(|i| spec.matches(i)).collect();
            if matching.is_empty() {
                return Err(InterfaceError::NoSuchInterface { spec: spec.to_string(), available: list(host) });
            }
            matching.into_iter().for_each(&mut add);
        }
    } else if let Some(bind) = bind.filter(|ip| !ip.is_unspecified()) {
        let holder = host
            .iter()
            .find(|i| i.addrs.contains(&bind))
            .ok_or_else(|| InterfaceError::BindNotFound { bind, available: list(host) })?;
        add(holder);
    } else {
        host.iter().filter(|i| !i.loopback).for_each(&mut add);
        if chosen.is_empty() {
            return Err(InterfaceError::NoInterface { available: list(host) });
        }
    }
    Ok(chosen)
}

/// The address to advertise when neither `bind` nor `public_address` names one: the single
/// IPv4 address of the selected interfaces, or else their single IPv6 address that is not
/// link-local. Several of either kind are ambiguous.
pub fn advertise_ip(selected: &[HostInterface]) -> Result<IpAddr, InterfaceError> {
    let v4: Vec<(&HostInterface, IpAddr)> =
        selected.iter().flat_map(|i| i.addrs.iter().filter(|a| a.is_ipv4()).map(move |a| (i, *a))).collect();
    let v6: Vec<(&HostInterface, IpAddr)> = selected
        .iter()
        .flat_map(|i| {
            i.addrs.iter().filter(|a| matches!(a, IpAddr::V6(v6) if !v6.is_unicast_link_local())).map(move |a| (i, *a))
        })
        .collect();
    let pool = if v4.is_empty() { v6 } else { v4 };
    match pool.as_slice() {
        [] => Err(InterfaceError::NoUsableAddress { interfaces: list(selected) }),
        [(_, ip)] => Ok(*ip),
        many => Err(InterfaceError::Ambiguous {
            choices: many.iter().map(|(i, ip)| format!("{} {ip}", i.name)).collect::<Vec<_>>().join(" and "),
        }),
    }
}

/// Whether `ip` is an address of one of `interfaces` (for a warning when `bind` is elsewhere).
pub fn holds(interfaces: &[HostInterface], ip: IpAddr) -> bool {
    interfaces.iter().any(|i| i.addrs.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, addrs: &[&str]) -> HostInterface {
        HostInterface {
            name: name.into(),
            index: Some(index),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            loopback: name == "lo",
        }
    }

    fn host() -> Vec<HostInterface> {
        vec![
            iface("lo", 1, &["127.0.0.1", "::1"]),
            iface("eth0", 2, &["10.0.0.5", "fe80::1"]),
            iface("eth1", 3, &["192.168.7.5", "fe80::2"]),
        ]
    }

    fn names(selected: &[HostInterface]) -> Vec<&str> {
        selected.iter().map(|i| i.name.as_str()).collect()
    }

    #[test]
    fn specs_parse_names_and_addresses() {
        assert_eq!(InterfaceSpec::parse("eth1"), Ok(InterfaceSpec::Name("eth1".into())));
        assert_eq!(InterfaceSpec::parse(" 10.0.0.5 "), Ok(InterfaceSpec::Addr("10.0.0.5".parse().unwrap())));
        for bad in ["", "a b", "averyveryverylongname", "0.0.0.0", "224.0.0.251", "a/b"] {
            assert!(InterfaceSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn configured_interfaces_are_used_alone() {
        let specs = [InterfaceSpec::Name("eth1".into())];
        assert_eq!(names(&select(&specs, None, &host()).unwrap()), ["eth1"]);
        let by_addr = [InterfaceSpec::Addr("10.0.0.5".parse().unwrap())];
        assert_eq!(names(&select(&by_addr, Some("192.168.7.5".parse().unwrap()), &host()).unwrap()), ["eth0"]);
        let err = select(&[InterfaceSpec::Name("eth9".into())], None, &host()).unwrap_err().to_string();
        assert!(err.contains("\"eth9\"") && err.contains("eth0 (10.0.0.5, fe80::1)"), "{err}");
    }

    #[test]
    fn the_bind_address_picks_its_interface() {
        assert_eq!(names(&select(&[], Some("192.168.7.5".parse().unwrap()), &host()).unwrap()), ["eth1"]);
        let err = select(&[], Some("10.9.9.9".parse().unwrap()), &host()).unwrap_err();
        assert!(matches!(err, InterfaceError::BindNotFound { .. }), "{err}");
    }

    #[test]
    fn by_default_every_interface_but_loopback_is_used() {
        assert_eq!(names(&select(&[], None, &host()).unwrap()), ["eth0", "eth1"]);
        assert_eq!(names(&select(&[], Some("0.0.0.0".parse().unwrap()), &host()).unwrap()), ["eth0", "eth1"]);
        let only_lo = vec![iface("lo", 1, &["127.0.0.1"])];
        assert!(matches!(select(&[], None, &only_lo), Err(InterfaceError::NoInterface { .. })));
        assert_eq!(names(&select(&[InterfaceSpec::Name("lo".into())], None, &only_lo).unwrap()), ["lo"]);
    }

    #[test]
    fn the_advertised_address_must_be_unambiguous() {
        let eth1 = select(&[InterfaceSpec::Name("eth1".into())], None, &host()).unwrap();
        assert_eq!(advertise_ip(&eth1), Ok("192.168.7.5".parse().unwrap()));
        let both = select(&[], None, &host()).unwrap();
        let err = advertise_ip(&both).unwrap_err().to_string();
        assert!(err.contains("eth0 10.0.0.5 and eth1 192.168.7.5") && err.contains("`bind`"), "{err}");
        let two_on_one = vec![iface("eth0", 2, &["10.0.0.5", "10.1.0.5"])];
        assert!(matches!(advertise_ip(&two_on_one), Err(InterfaceError::Ambiguous { .. })));
        // IPv6 only: the global address, never the link-local one.
        let v6 = vec![iface("eth0", 2, &["fe80::1", "2001:db8::5"])];
        assert_eq!(advertise_ip(&v6), Ok("2001:db8::5".parse().unwrap()));
        let link_local_only = vec![iface("eth0", 2, &["fe80::1"])];
        assert!(matches!(advertise_ip(&link_local_only), Err(InterfaceError::NoUsableAddress { .. })));
    }
}
