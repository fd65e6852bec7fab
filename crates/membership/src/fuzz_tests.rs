//! Fuzzing of the gossip-key parsers that `member_from_node_state` uses, as property tests: any
//! string gives a value or an error (never a panic), values are bounded, and what a member
//! publishes parses back to itself. Case counts: see `fuzz_support` (`GRAPEVINE_FUZZ_CASES`).

use std::str::FromStr;

use proptest::prelude::*;

use crate::member::{REPORT_IDS_MAX, format_handover, format_ids, parse_handover, parse_ids};
use crate::{MemberId, MemberState, ProtocolVersion};
use fuzz_support::config;

#[path = "../../net/src/fuzz_support.rs"]
mod fuzz_support;

/// Gossip values as a peer could publish them: any text, text made of the separators the parsers
/// split on, and long text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\PC{0,40}",
        3 => "[0-9@,./ a-z+-]{0,40}",
        1 => ".{0,12}",
        1 => prop::collection::vec("[a-z0-9@,]{0,40}", 0..40).prop_map(|parts| parts.concat()),
        1 => (1000usize..1100, "[a-z@]{0,3}").prop_map(|(n, tail)| format!("{}{tail}", "n".repeat(n))),
    ]
}

/// Node ids as configuration allows them: 1 to 128 characters without whitespace, control
/// characters, `/` or `,` (see `Config::validate` in the facade); `@` is allowed.
fn node_id() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.-]{1,20}",
        1 => "[^\\s\\p{Cc}/,]{1,128}",
        1 => "[a-z]{1,4}@[0-9]{1,4}",
    ]
}

fn member() -> impl Strategy<Value = MemberId> {
    (node_id(), any::<u64>()).prop_map(|(node, generation)| MemberId::new(node, generation))
}

fn valid_member_id(id: &MemberId) -> bool {
    !id.node_id.is_empty() && id.node_id.len() <= 1024
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn protocol_versions(text in value(), major in any::<u16>(), minor in any::<u16>()) {
        if let Ok(version) = ProtocolVersion::from_str(&text) {
            prop_assert_eq!(version.to_string().parse::<ProtocolVersion>(), Ok(version));
        }
        let version = ProtocolVersion { major, minor };
        prop_assert_eq!(version.to_string().parse::<ProtocolVersion>(), Ok(version));
    }

    #[test]
    fn member_states(text in value()) {
        match MemberState::from_str(&text) {
            Ok(state) => prop_assert_eq!(state.as_str(), text.as_str()),
            Err(e) => prop_assert!(e.contains("unknown member state"), "{}", e),
        }
    }

    #[test]
    fn member_ids(text in value(), id in member()) {
        if let Ok(parsed) = MemberId::from_str(&text) {
            prop_assert!(valid_member_id(&parsed), "{:?}", parsed);
            prop_assert_eq!(parsed.to_string().parse::<MemberId>(), Ok(parsed));
        }
        prop_assert_eq!(id.to_string().parse::<MemberId>(), Ok(id));
    }

    #[test]
    fn report_lists(text in value(), ids in prop::collection::vec(member(), 0..8)) {
        let parsed = parse_ids(&text);
        prop_assert!(parsed.len() <= REPORT_IDS_MAX);
        prop_assert!(parsed.iter().all(valid_member_id), "{:?}", parsed);
        prop_assert_eq!(parse_ids(&format_ids(&ids)), ids);
    }

    #[test]
    fn handovers(text in value(), target in member(), nonce in "[0-9a-z-]{0,24}") {
        if let Some((node, _, nonce)) = parse_handover(&text) {
            prop_assert!(node.len() <= text.len() && nonce.len() <= text.len());
        }
        let parsed = parse_handover(&format_handover(&target, &nonce));
        prop_assert_eq!(parsed, Some((target.node_id.to_string(), target.generation, nonce)));
    }
}

/// A node id with a comma cannot be listed in a report key: the list is comma-separated, so it
/// would be read as other members (found by `report_lists` when node ids could contain `,`;
/// configuration now refuses such node ids).
#[test]
fn a_comma_in_a_node_id_breaks_report_lists() {
    let ids = vec![MemberId::new("a,b", 5)];
    assert_eq!(parse_ids(&format_ids(&ids)), vec![MemberId::new("b", 5)]);
}
