//! What a member announces over mDNS (its TXT record) and how a peer's record is read back.
//!
//! Pure functions: the runtime in `mdns.rs` only moves packets and timers. A peer's addresses are
//! taken from its TXT record, never from the A/AAAA records mDNS resolves: mdns-sd reports
//! addresses of every interface a response was seen on, with the wrong IPv6 scope when two
//! interfaces share a subnet (keepsimple1/mdns-sd#372, #358, #459), while the TXT record carries
//! exactly the address the member listens on and advertises to gossip.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The DNS-SD service type every member registers and browses.
pub const SERVICE_TYPE: &str = "_grapevine._udp.local.";

/// A DNS TXT string is prefixed by one length byte: `key=value` is at most 255 bytes.
pub const TXT_ENTRY_BYTES_MAX: usize = 255;

/// The longest cluster name a TXT record can carry (`cluster=` takes 8 of the 255 bytes).
pub const CLUSTER_NAME_BYTES_MAX: usize = TXT_ENTRY_BYTES_MAX - KEY_CLUSTER.len() - 1;

/// The longest node id accepted in a peer's record (the configuration allows 128).
pub const NODE_ID_BYTES_MAX: usize = 128;

/// How many TXT entries of a peer's record are looked at; a record with more is malformed.
pub const TXT_ENTRIES_MAX: usize = 32;

pub(crate) const KEY_CLUSTER: &str = "cluster";
pub(crate) const KEY_NODE: &str = "node";
pub(crate) const KEY_GENERATION: &str = "gen";
pub(crate) const KEY_GOSSIP: &str = "gossip";
pub(crate) const KEY_DATA: &str = "data";
pub(crate) const KEY_PROTOCOL: &str = "pv";

/// Why this member's own record cannot be announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// A `key=value` entry does not fit a TXT string.
    #[error(
        "the mDNS TXT entry `{key}` would be {len} bytes; a TXT string holds at most {TXT_ENTRY_BYTES_MAX} \
         (shorten the value)"
    )]
    EntryTooLong {
        /// The TXT key.
        key: &'static str,
        /// Its `key=value` length.
        len: usize,
    },
    /// An address that peers could not use.
    #[error("the mDNS record cannot announce {what} address {addr}: {reason}")]
    UnusableAddress {
        /// `gossip` or `data`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: &'static str,
    },
}

/// What this member announces: everything a peer needs to decide whether it is a candidate and
/// where to send gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The cluster name; peers of other names ignore the record.
    pub cluster_name: String,
    /// The member's node id.
    pub node_id: String,
    /// The member's generation (start time in ms): a restart is a new record.
    pub generation: u64,
    /// The advertised gossip (UDP) address.
    pub gossip_addr: SocketAddr,
    /// The advertised data (TCP) address.
    pub data_addr: SocketAddr,
    /// The protocol version, major and minor.
    pub protocol_version: (u16, u16),
}

impl Announcement {
    /// Checks that the record can be announced: every entry fits a TXT string, and both
    /// addresses are ones a peer can send to.
    pub fn validate(&self) -> Result<(), AnnouncementError> {
        for (key, value) in self.txt() {
            let len = key.len() + 1 + value.len();
            if len > TXT_ENTRY_BYTES_MAX {
                return Err(AnnouncementError::EntryTooLong { key, len });
            }
        }
        for (what, addr) in [("gossip", self.gossip_addr), ("data", self.data_addr)] {
            if let Some(reason) = unusable(addr) {
                return Err(AnnouncementError::UnusableAddress { what, addr, reason });
            }
        }
        Ok(())
    }

    /// The TXT entries, in a fixed order.
    pub fn txt(&self) -> Vec<(&'static str, String)> {
        vec![
            (KEY_CLUSTER, self.cluster_name.clone()),
            (KEY_NODE, self.node_id.clone()),
            (KEY_GENERATION, self.generation.to_string()),
            (KEY_GOSSIP, self.gossip_addr.to_string()),
            (KEY_DATA, self.data_addr.to_string()),
            (KEY_PROTOCOL, format!("{}.{}", self.protocol_version.0, self.protocol_version.1)),
        ]
    }

    /// The DNS-SD instance name: the node id (cut to 40 bytes) and a hash of the cluster name,
    /// node id and generation, so that two members never share an instance name, not even two
    /// clusters' members with the same node id, nor a member and its restarted self.
    pub fn instance_name(&self) -> String {
        let mut cut = self.node_id.len().min(40);
        while !self.node_id.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}-{:08x}", &self.node_id[..cut], self.identity_hash() as u32)
    }

    /// The host name of the A/AAAA records: unique per member like the instance name, so that
    /// mDNS never sees two members' addresses under one name (which it would treat as a conflict).
    pub fn host_name(&self) -> String {
        format!("gv-{:016x}.local.", self.identity_hash())
    }

    fn identity_hash(&self) -> u64 {
        let mut hash = Fnv::default();
        hash.write(self.cluster_name.as_bytes());
        hash.write(&[0]);
        hash.write(self.node_id.as_bytes());
        hash.write(&[0]);
        hash.write(&self.generation.to_le_bytes());
        hash.0
    }
}

/// A peer's record, read from its TXT entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// Its cluster name.
    pub cluster_name: String,
    /// Its node id.
    pub node_id: String,
    /// Its generation.
    pub generation: u64,
    /// Where it gossips.
    pub gossip_addr: SocketAddr,
    /// Where its data plane listens.
    pub data_addr: SocketAddr,
    /// Its protocol version, major and minor.
    pub protocol_version: (u16, u16),
}

/// Why a peer's record was not usable. Logged at debug; the record is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PeerRecord {
    /// Reads a record from TXT entries `(key, value)`. Unknown keys are ignored (newer members
    /// may add some); a missing, repeated, oversized or unparsable known key makes the record
    /// malformed. Never allocates more than the entries it is given, never panics.
    pub fn parse<'a>(entries: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Result<Self, RecordError> {
        let mut fields: [Option<&str>; 6] = [None; 6];
        let keys = [KEY_CLUSTER, KEY_NODE, KEY_GENERATION, KEY_GOSSIP, KEY_DATA, KEY_PROTOCOL];
        for (count, (key, value)) in entries.into_iter().enumerate() {
            if count >= TXT_ENTRIES_MAX {
                return Err(RecordError(format!("more than {TXT_ENTRIES_MAX} TXT entries")));
            }
            let Some(slot) = keys.iter().position(|k| k.eq_ignore_ascii_case(key)) else { continue };
            let value = value.unwrap_or_default();
            if key.len() + 1 + value.len() > TXT_ENTRY_BYTES_MAX {
                return Err(RecordError(format!("TXT entry `{key}` is longer than {TXT_ENTRY_BYTES_MAX} bytes")));
            }
            let text = std::str::from_utf8(value).map_err(|_| RecordError(format!("`{key}` is not UTF-8")))?;
            if fields[slot].replace(text).is_some() {
                return Err(RecordError(format!("`{key}` appears twice")));
            }
        }
        let field = |i: usize| fields[i].ok_or_else(|| RecordError(format!("no `{}` entry", keys[i])));
        let cluster_name = field(0)?;
        if cluster_name.is_empty() || cluster_name.chars().any(char::is_control) {
            return Err(RecordError("`cluster` is empty or has control characters".into()));
        }
        let node_id = field(1)?;
        if node_id.is_empty()
            || node_id.len() > NODE_ID_BYTES_MAX
            || node_id.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == ',')
        {
            return Err(RecordError(format!("`node` {node_id:?} is not a valid node id")));
        }
        let generation = field(2)?.parse::<u64>().map_err(|_| RecordError("`gen` is not a number".into()))?;
        let address = |i: usize| -> Result<SocketAddr, RecordError> {
            let text = field(i)?;
            let addr: SocketAddr =
                text.parse().map_err(|_| RecordError(format!("`{}` {text:?} is not `ip:port`", keys[i])))?;
            match unusable(addr) {
                Some(reason) => Err(RecordError(format!("`{}` {addr}: {reason}", keys[i]))),
                None => Ok(addr),
            }
        };
        let gossip_addr = address(3)?;
        let data_addr = address(4)?;
        let protocol = field(5)?;
        let protocol_version = protocol
            .split_once('.')
            .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
            .ok_or_else(|| RecordError(format!("`pv` {protocol:?} is not `major.minor`")))?;
        Ok(PeerRecord {
            cluster_name: cluster_name.to_string(),
            node_id: node_id.to_string(),
            generation,
            gossip_addr,
            data_addr,
            protocol_version,
        })
    }
}

/// Why a peer could not send to `addr`, if it could not.
fn unusable(addr: SocketAddr) -> Option<&'static str> {
    let ip = addr.ip();
    if addr.port() == 0 {
        return Some("port 0");
    }
    if ip.is_unspecified() {
        return Some("an unspecified address (0.0.0.0 or ::)");
    }
    if ip.is_multicast() {
        return Some("a multicast address");
    }
    if let IpAddr::V6(v6) = ip
        && v6.is_unicast_link_local()
    {
        // A link-local address is only usable with the interface (zone) it belongs to, which a
        // TXT record cannot carry for the receiver: its interfaces have other indexes.
        return Some("an IPv6 link-local address, usable only with a zone no peer knows (set `bind`)");
    }
    None
}

/// FNV-1a, 64 bits: a fixed, seedless hash (names must not change between runs or builds).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn announcement() -> Announcement {
        Announcement {
            cluster_name: "demo".into(),
            node_id: "web-1-5701".into(),
            generation: 1_700_000_000_123,
            gossip_addr: "10.0.0.1:5701".parse().unwrap(),
            data_addr: "10.0.0.1:5701".parse().unwrap(),
            protocol_version: (1, 0),
        }
    }

    type Entries = Vec<(String, Vec<u8>)>;

    fn entries(a: &Announcement) -> Entries {
        a.txt().into_iter().map(|(k, v)| (k.to_string(), v.into_bytes())).collect()
    }

    fn parse(entries: &[(String, Vec<u8>)]) -> Result<PeerRecord, RecordError> {
        PeerRecord::parse(entries.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))))
    }

    #[test]
    fn an_announcement_reads_back_as_the_same_peer() {
        let a = announcement();
        a.validate().unwrap();
        let peer = parse(&entries(&a)).unwrap();
        assert_eq!(
            (peer.cluster_name.as_str(), peer.node_id.as_str(), peer.generation),
            ("demo", "web-1-5701", a.generation)
        );
        assert_eq!((peer.gossip_addr, peer.data_addr, peer.protocol_version), (a.gossip_addr, a.data_addr, (1, 0)));
    }

    #[test]
    fn names_are_unique_per_cluster_node_and_generation_and_fit_a_label() {
        let a = announcement();
        let restarted = Announcement { generation: a.generation + 1, ..a.clone() };
        let other_cluster = Announcement { cluster_name: "other".into(), ..a.clone() };
        assert_ne!(a.instance_name(), restarted.instance_name());
        assert_ne!(a.instance_name(), other_cluster.instance_name());
        assert_ne!(a.host_name(), restarted.host_name());
        assert!(a.instance_name().starts_with("web-1-5701-"));
        let long = Announcement { node_id: "é".repeat(64), ..a };
        assert!(long.instance_name().len() <= 63, "{}", long.instance_name());
    }

    #[test]
    fn oversized_or_unusable_announcements_are_refused() {
        let long = Announcement { cluster_name: "c".repeat(CLUSTER_NAME_BYTES_MAX + 1), ..announcement() };
        assert!(matches!(long.validate(), Err(AnnouncementError::EntryTooLong { key: "cluster", len: 256 })));
        let longest = Announcement { cluster_name: "c".repeat(CLUSTER_NAME_BYTES_MAX), ..announcement() };
        longest.validate().unwrap();
        for addr in ["0.0.0.0:5701", "10.0.0.1:0", "224.0.0.251:5353", "[fe80::1]:5701"] {
            let bad = Announcement { gossip_addr: addr.parse().unwrap(), ..announcement() };
            assert!(matches!(bad.validate(), Err(AnnouncementError::UnusableAddress { .. })), "{addr}");
        }
    }

    #[test]
    fn malformed_records_say_what_is_wrong() {
        let good = entries(&announcement());
        let without = |key: &str| good.iter().filter(|(k, _)| k != key).cloned().collect::<Vec<_>>();
        let with = |key: &str, value: &str| {
            let mut e = without(key);
            e.push((key.to_string(), value.as_bytes().to_vec()));
            e
        };
        let cases: Vec<(Entries, &str)> = vec![
            (without("cluster"), "no `cluster`"),
            (without("gossip"), "no `gossip`"),
            (with("gen", "x"), "`gen`"),
            (with("gossip", "10.0.0.1"), "`gossip`"),
            (with("gossip", "[fe80::1]:5701"), "link-local"),
            (with("data", "0.0.0.0:5701"), "unspecified"),
            (with("pv", "1"), "`pv`"),
            (with("node", "a b"), "`node`"),
            (with("node", &"n".repeat(129)), "`node`"),
            (with("cluster", ""), "`cluster`"),
            ({ good.iter().cloned().chain([("node".to_string(), b"x".to_vec())]).collect() }, "twice"),
            ({ good.iter().cloned().chain([("gossip".to_string(), vec![0xff, 0xfe])]).collect() }, "UTF-8"),
            ((0..40).map(|i| (format!("k{i}"), vec![])).collect(), "more than"),
        ];
        for (entries, needle) in cases {
            let err = parse(&entries).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // Unknown keys are ignored; keys match regardless of case (DNS-SD keys are case-insensitive).
        let mut extended = good.clone();
        extended.push(("future".into(), b"whatever".to_vec()));
        assert!(parse(&extended).is_ok());
        let upper: Vec<_> = good.iter().map(|(k, v)| (k.to_uppercase(), v.clone())).collect();
        assert!(parse(&upper).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("GRAPEVINE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// Any TXT entries whatever parse or fail, without panicking; what parses is within bounds.
        #[test]
        fn arbitrary_entries_never_panic(
            raw in proptest::collection::vec(
                ("(cluster|node|gen|gossip|data|pv|[a-z]{0,8})", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))),
                0..40,
            )
        ) {
            let parsed = PeerRecord::parse(raw.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
            if let Ok(peer) = parsed {
                prop_assert!(peer.cluster_name.len() < TXT_ENTRY_BYTES_MAX);
                prop_assert!(peer.node_id.len() <= NODE_ID_BYTES_MAX);
                prop_assert!(unusable(peer.gossip_addr).is_none());
            }
        }

        /// Mutations of a valid record (values replaced by random strings, entries dropped or
        /// duplicated) parse or fail cleanly, and a record that parses says what its entries say.
        #[test]
        fn mutated_records_parse_to_what_they_say_or_fail(
            drop_index in proptest::option::of(0usize..6),
            replace in proptest::option::of((0usize..6, ".{0,300}")),
            duplicate in proptest::option::of(0usize..6),
        ) {
            let mut e = entries(&announcement());
            if let Some((i, value)) = &replace {
                e[*i].1 = value.as_bytes().to_vec();
            }
            if let Some(i) = duplicate {
                e.push(e[i].clone());
            }
            if let Some(i) = drop_index {
                e.remove(i);
            }
            if let Ok(peer) = parse(&e) {
                let text = |key: &str| e.iter().find(|(k, _)| k == key).map(|(_, v)| String::from_utf8_lossy(v).to_string());
                prop_assert_eq!(Some(peer.cluster_name.clone()), text("cluster"));
                prop_assert_eq!(Some(peer.gossip_addr.to_string()), text("gossip").map(|g| g.parse::<SocketAddr>().unwrap().to_string()));
            }
        }

        /// Every announcement that validates reads back to itself.
        #[test]
        fn valid_announcements_round_trip(
            cluster in "[^\\p{C}]{1,60}",
            node in "[a-z0-9.-]{1,128}",
            generation in any::<u64>(),
            ip in any::<[u8; 4]>(),
            port in 1u16..,
            pv in (any::<u16>(), any::<u16>()),
        ) {
            let addr = SocketAddr::from((ip, port));
            let a = Announcement { cluster_name: cluster, node_id: node, generation, gossip_addr: addr, data_addr: addr, protocol_version: pv };
            if a.validate().is_ok() {
                let peer = parse(&entries(&a)).unwrap();
                prop_assert_eq!(peer.cluster_name, a.cluster_name);
                prop_assert_eq!(peer.node_id, a.node_id);
                prop_assert_eq!((peer.generation, peer.gossip_addr, peer.protocol_version), (a.generation, a.gossip_addr, a.protocol_version));
            }
        }
    }
}
