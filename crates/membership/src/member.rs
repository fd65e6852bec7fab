//! The typed member: identity, state, and the few small gossip keys every member publishes.
//! Every gossip key is named here and parsed in [`member_from_node_state`], nowhere else.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use chitchat::{ChitchatId, NodeState};
use serde::{Deserialize, Serialize};

/// Gossip key: the member's data-plane address (`ip:port`).
pub(crate) const KEY_DATA_ADDR: &str = "data";
/// Gossip key: the member's admin HTTP address, when it serves one.
pub(crate) const KEY_ADMIN_ADDR: &str = "admin";
/// Gossip key: the grapevine protocol version (`major.minor`).
pub(crate) const KEY_PROTOCOL: &str = "pv";
/// Gossip key: `joining`, `active`, `leaving` or `left`.
pub(crate) const KEY_STATE: &str = "state";
/// Gossip key: a forced-master claim; the highest claim among active members wins.
pub(crate) const KEY_MASTER_CLAIM: &str = "claim";
/// Gossip key: a request that another member become master: `node_id/generation/nonce`.
pub(crate) const KEY_HANDOVER: &str = "handover";
/// Gossip key: the members this member cannot reach over the data plane although gossip says they
/// are alive (comma-separated member ids). Used to exclude members from ownership (see
/// [`crate::view::excluded_members`]).
pub(crate) const KEY_UNREACHABLE: &str = "unreach";
/// Gossip key: the member this member follows as master (a member id), so that members of two
/// groups that meet again (a healed split, groups formed apart at start-up) can tell each other
/// from members of their own group (see [`crate::view::from_another_group`]).
pub(crate) const KEY_MASTER: &str = "master";
/// Gossip key: the members whose data port refuses this member's connections (comma-separated):
/// their process is gone. With their heartbeat silent too, they are declared dead at once.
pub(crate) const KEY_GONE: &str = "gone";
/// Most member ids a report key may list; longer lists are cut (a cluster has far fewer members).
pub(crate) const REPORT_IDS_MAX: usize = 256;
/// Prefix of user attributes (`attr:zone = eu-1`).
pub(crate) const PREFIX_ATTR: &str = "attr:";
/// Prefix of keys published by upper layers (map, topic): `x:<name>`.
pub(crate) const PREFIX_EXT: &str = "x:";

/// The version of grapevine's wire protocols (gossip keys and data plane). Members with a
/// different major version cannot work together and are not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incompatible changes bump the major version.
    pub major: u16,
    /// Compatible additions bump the minor version.
    pub minor: u16,
}

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

impl ProtocolVersion {
    /// True when a member speaking `other` can join a cluster of members speaking `self`.
    pub fn is_compatible_with(&self, other: &ProtocolVersion) -> bool {
        self.major == other.major
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for ProtocolVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s.split_once('.').ok_or_else(|| format!("protocol version {s:?} is not `major.minor`"))?;
        let parse =
            |part: &str| part.parse::<u16>().map_err(|_| format!("protocol version {s:?} is not `major.minor`"));
        Ok(ProtocolVersion { major: parse(major)?, minor: parse(minor)? })
    }
}

/// A member's identity. The generation is the member's start time in milliseconds since the Unix
/// epoch, so a restarted node is a new member. Ordering is by age: `(generation, node_id)`, the
/// oldest first; the default master is the smallest active `MemberId`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId {
    /// Start time in milliseconds since the Unix epoch.
    pub generation: u64,
    /// The node id, unique in the cluster (`--node-id`, by default `<hostname>-<port>`).
    pub node_id: Arc<str>,
}

impl MemberId {
    /// A member id from its parts.
    pub fn new(node_id: impl Into<Arc<str>>, generation: u64) -> Self {
        Self { generation, node_id: node_id.into() }
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.node_id, self.generation)
    }
}

impl FromStr for MemberId {
    type Err = String;

    /// Parses what `Display` writes: `<node id>@<generation>` (the node id may contain `@`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("member id {s:?} is not `<node id>@<generation>`");
        let (node_id, generation) = s.rsplit_once('@').ok_or_else(bad)?;
        if node_id.is_empty() || node_id.len() > 1024 {
            return Err(bad());
        }
        Ok(MemberId::new(node_id, generation.parse::<u64>().map_err(|_| bad())?))
    }
}

/// Formats a list of member ids for a report key.
pub(crate) fn format_ids<'a>(ids: impl IntoIterator<Item = &'a MemberId>) -> String {
    ids.into_iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Parses a report key's list; entries that do not parse are skipped, at most
/// [`REPORT_IDS_MAX`] are kept.
pub(crate) fn parse_ids(value: &str) -> Vec<MemberId> {
    value.split(',').filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).take(REPORT_IDS_MAX).collect()
}

/// Where a member is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Started, looking for the cluster; not yet eligible as master or partition owner.
    Joining,
    /// A full member.
    Active,
    /// Shutting down gracefully: handing its data over; still serves, never becomes master.
    Leaving,
    /// Gone. Members in this state are removed from views at once.
    Left,
}

impl MemberState {
    /// The lowercase name used in gossip, stats and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Leaving => "leaving",
            MemberState::Left => "left",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemberState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "joining" => Ok(MemberState::Joining),
            "active" => Ok(MemberState::Active),
            "leaving" => Ok(MemberState::Leaving),
            "left" => Ok(MemberState::Left),
            other => Err(format!("unknown member state {other:?}")),
        }
    }
}

/// A member as seen through gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Identity (node id and generation).
    pub id: MemberId,
    /// The UDP address gossip reaches it on.
    pub gossip_addr: SocketAddr,
    /// The TCP address of its data plane.
    pub data_addr: SocketAddr,
    /// Its admin HTTP address, if it serves one.
    pub admin_addr: Option<SocketAddr>,
    /// The protocol version it speaks.
    pub protocol_version: ProtocolVersion,
    /// Its life-cycle state.
    pub state: MemberState,
    /// Its forced-master claim (0: none).
    pub master_claim: u64,
    /// User attributes (`attr:` keys, prefix stripped).
    pub attributes: BTreeMap<String, String>,
    /// Keys published by upper layers (`x:` keys, prefix stripped).
    pub ext: BTreeMap<String, String>,
    /// Members it cannot reach over the data plane although gossip says they are alive.
    pub unreachable: Vec<MemberId>,
    /// Members whose data port refuses its connections (their process is gone).
    pub gone: Vec<MemberId>,
    /// The member it follows as master, as it last published it (`None`: none yet, or unparsable).
    pub master: Option<MemberId>,
    /// A pending request that another member become master: `(target node id, nonce)`.
    #[serde(skip)]
    pub(crate) handover: Option<(String, u64, String)>,
}

impl Member {
    /// Milliseconds since this member started, by the local clock (0 if the clocks disagree).
    pub fn uptime_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.id.generation)
    }
}

/// Why a gossiped node state could not be turned into a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberParseError {
    /// A required key is absent (the node is still publishing its keys, or is not grapevine).
    #[error("gossip key {0:?} is missing")]
    Missing(&'static str),
    /// A key holds a value that does not parse.
    #[error("gossip key {key:?} has invalid value {value:?}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

fn required<'a>(state: &'a NodeState, key: &'static str) -> Result<&'a str, MemberParseError> {
    state.get(key).ok_or(MemberParseError::Missing(key))
}

fn parsed<T: FromStr>(key: &'static str, value: &str) -> Result<T, MemberParseError>
where
    T::Err: fmt::Display,
{
    value.parse::<T>().map_err(|e| MemberParseError::Invalid { key, value: value.to_string(), reason: e.to_string() })
}

/// Builds a typed member from a chitchat node state. The one place gossip keys are read.
pub(crate) fn member_from_node_state(id: &ChitchatId, state: &NodeState) -> Result<Member, MemberParseError> {
    let data_addr: SocketAddr = parsed(KEY_DATA_ADDR, required(state, KEY_DATA_ADDR)?)?;
    let protocol_version: ProtocolVersion = parsed(KEY_PROTOCOL, required(state, KEY_PROTOCOL)?)?;
    let member_state: MemberState = parsed(KEY_STATE, required(state, KEY_STATE)?)?;
    let admin_addr = match state.get(KEY_ADMIN_ADDR) {
        Some(value) if !value.is_empty() => Some(parsed::<SocketAddr>(KEY_ADMIN_ADDR, value)?),
        _ => None,
    };
    let master_claim = match state.get(KEY_MASTER_CLAIM) {
        Some(value) => parsed::<u64>(KEY_MASTER_CLAIM, value)?,
        None => 0,
    };
    let handover = state.get(KEY_HANDOVER).and_then(parse_handover);
    let unreachable = state.get(KEY_UNREACHABLE).map(parse_ids).unwrap_or_default();
    let gone = state.get(KEY_GONE).map(parse_ids).unwrap_or_default();
    let master = state.get(KEY_MASTER).and_then(|value| value.parse::<MemberId>().ok());
    let mut attributes = BTreeMap::new();
    let mut ext = BTreeMap::new();
    for (key, value) in state.key_values() {
        if let Some(name) = key.strip_prefix(PREFIX_ATTR) {
            attributes.insert(name.to_string(), value.to_string());
        } else if let Some(name) = key.strip_prefix(PREFIX_EXT) {
            ext.insert(name.to_string(), value.to_string());
        }
    }
    Ok(Member {
        id: MemberId::new(id.node_id.clone(), id.generation_id),
        gossip_addr: id.gossip_advertise_addr,
        data_addr,
        admin_addr,
        protocol_version,
        state: member_state,
        master_claim,
        attributes,
        ext,
        unreachable,
        gone,
        master,
        handover,
    })
}

pub(crate) fn format_handover(target: &MemberId, nonce: &str) -> String {
    format!("{}/{}/{}", target.node_id, target.generation, nonce)
}

pub(crate) fn parse_handover(value: &str) -> Option<(String, u64, String)> {
    let mut parts = value.rsplitn(3, '/');
    let nonce = parts.next()?;
    let generation = parts.next()?.parse().ok()?;
    let node_id = parts.next()?;
    Some((node_id.to_string(), generation, nonce.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_order_by_age_then_node_id() {
        let old = MemberId::new("z", 10);
        let young = MemberId::new("a", 20);
        let twin = MemberId::new("b", 20);
        assert!(old < young && young < twin);
    }

    #[test]
    fn protocol_versions_parse_and_compare() {
        let v: ProtocolVersion = "1.7".parse().unwrap();
        assert_eq!(v, ProtocolVersion { major: 1, minor: 7 });
        assert!(v.is_compatible_with(&PROTOCOL_VERSION));
        assert!(!ProtocolVersion { major: 2, minor: 0 }.is_compatible_with(&PROTOCOL_VERSION));
        assert!("1".parse::<ProtocolVersion>().is_err());
        assert!("1.x".parse::<ProtocolVersion>().is_err());
    }

    #[test]
    fn member_ids_and_report_lists_round_trip_and_garbage_is_skipped() {
        let ids = vec![MemberId::new("a@b", 5), MemberId::new("c", 7)];
        assert_eq!(parse_ids(&format_ids(&ids)), ids);
        assert_eq!(parse_ids("x,@5,a@,a@-1,,d@9"), vec![MemberId::new("d", 9)]);
        let many = (0..1000).map(|i| format!("n{i}@1")).collect::<Vec<_>>().join(",");
        assert_eq!(parse_ids(&many).len(), REPORT_IDS_MAX);
        assert!("".parse::<MemberId>().is_err());
    }

    #[test]
    fn handover_values_round_trip_even_with_slashes_in_node_ids() {
        let target = MemberId::new("rack/a", 42);
        let parsed = parse_handover(&format_handover(&target, "n1")).unwrap();
        assert_eq!(parsed, ("rack/a".to_string(), 42, "n1".to_string()));
        assert_eq!(parse_handover("garbage"), None);
    }
}
