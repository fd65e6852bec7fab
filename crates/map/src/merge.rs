//! Merge policies: when two sides of a split brain become one cluster again, the entries of the
//! side that merges are offered, key by key, to the owner of the key in the cluster it joins, and
//! the map's policy decides whether the entry the owner holds stays or the merging one replaces
//! it. [`decide`] is that decision: pure (no clock, no I/O), so that every member reaches the
//! same verdict from the same two records, and property-tested below.
//!
//! The policies are Hazelcast's (`com.hazelcast.spi.merge`), with two differences, both so that
//! the outcome cannot depend on which side happens to merge into which:
//!
//! * **Ties are broken deterministically.** Hazelcast lets the merging entry win a tie
//!   (`merging.getLastUpdateTime() >= existing.getLastUpdateTime()`), so the survivor of two
//!   entries written in the same millisecond is whichever side merged. Here the comparing
//!   policies order two records by their policy's figure, then by update time, then by value
//!   bytes: the larger survives whichever of the two is the merging one. Records equal in all
//!   three keep the existing one (nothing to change).
//! * **An expired merging entry never wins**, under every policy: it would be invisible the
//!   moment it was written. (Hazelcast leaves that to the record store.)
//!
//! The existing entry is given as the owner sees it: `None` when the key is absent *or expired*
//! (the owner judges its own entries' expiry, which after a take-over restarts the idle clock:
//! see [`Record::is_expired`]). The merging entry's expiry is judged from its own times.
//!
//! [`decide_offer`] wraps [`decide`] with what the owner remembers of a key besides its live entry
//! and how the entry is offered ([`Offer`]):
//!
//! * **Changes made after the sides met stay.** A merge stands for the moment the merging member
//!   joined the cluster ([`Offer::healed_ms`]); its entries can reach their owners seconds later
//!   (retries, migrations). An entry the owner wrote after that moment, or a key it removed after
//!   it, came after the merge: it stays whatever the policy (with `pass-through` too).
//! * **A removal is a tombstone for `latest-update`**: a merging entry last written before the
//!   owner removed the key does not bring it back. Owners and their backups remember the latest
//!   removals of each map partition (`store::Tombstones`: at most [`crate::store::TOMBSTONES_MAX`]
//!   keys and [`crate::store::TOMBSTONE_BYTES_MAX`] bytes, and a map-wide floor for a clear);
//!   a key whose removal was forgotten is absent, and the entry fills it. The other policies see
//!   entries, not removals: a key removed on one side during the split and still present on the
//!   other is present after the merge (except under `discard`, which never adds a key).
//! * **Restoring a lost partition is not a policy decision.** When the side that merges into
//!   this one held the only copy of a partition (this side took it over empty), it offers the
//!   entries written before the split too ([`Offer::restore`]). They are this side's own lost
//!   data, not the other side's writes: each fills its key only if this side has not written or
//!   removed the key since; it never overwrites (not even with `pass-through`). The same holds
//!   for an entry written between the cut and the merging side's first table (acknowledged once
//!   that table replaced its unreachable backup): this side may hold it, written before it knew
//!   of the cut, and may have changed or removed the key since.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::record::Record;

/// What a map does with the entries of a side that merges into another after a split brain
/// (configuration key `merge_policy`, kebab-case names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergePolicy {
    /// The merging entry replaces the existing one (or is added), unless it has expired.
    PassThrough,
    /// The merging entry is added only when the key is absent; an existing entry stays.
    PutIfAbsent,
    /// The entry read more often (owner-side hit count) survives.
    HigherHits,
    /// The entry written last (update time) survives. The default: for sessions, the last write
    /// is the user's latest state (a login, a cart, a logout's cleared fields), whichever side of
    /// a split the user's requests reached; `put-if-absent` would keep the bigger side's stale
    /// copy of every session that was used on the smaller side during the split.
    #[default]
    LatestUpdate,
    /// The entry read or written last (access time, kept by owners) survives.
    LatestAccess,
    /// The entry that expires last (the earlier of its time-to-live and max-idle deadlines; an
    /// entry that never expires counts as latest) survives.
    ExpirationTime,
    /// The existing entry always stays; merging entries are dropped, also for absent keys.
    Discard,
}

impl MergePolicy {
    /// Every policy, in the order of the documentation.
    pub const ALL: [MergePolicy; 7] = [
        MergePolicy::PassThrough,
        MergePolicy::PutIfAbsent,
        MergePolicy::HigherHits,
        MergePolicy::LatestUpdate,
        MergePolicy::LatestAccess,
        MergePolicy::ExpirationTime,
        MergePolicy::Discard,
    ];

    /// The configuration name (`latest-update`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MergePolicy::PassThrough => "pass-through",
            MergePolicy::PutIfAbsent => "put-if-absent",
            MergePolicy::HigherHits => "higher-hits",
            MergePolicy::LatestUpdate => "latest-update",
            MergePolicy::LatestAccess => "latest-access",
            MergePolicy::ExpirationTime => "expiration-time",
            MergePolicy::Discard => "discard",
        }
    }
}

impl fmt::Display for MergePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A merge policy name that is not one of [`MergePolicy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown merge policy {given:?}: expected one of pass-through, put-if-absent, higher-hits, latest-update, \
     latest-access, expiration-time, discard"
)]
pub struct UnknownMergePolicy {
    /// What was given.
    pub given: String,
}

impl FromStr for MergePolicy {
    type Err = UnknownMergePolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        MergePolicy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| UnknownMergePolicy { given: s.to_string() })
    }
}

/// Which entry survives a merge of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The owner keeps what it holds (also: keeps the key absent).
    KeepExisting,
    /// The merging entry is stored, with its own times, hits and expiry.
    TakeMerging,
}

/// Decides the merge of one key under `policy`: `existing` is the owner's live entry (`None`
/// when absent or expired), `merging` the entry of the side that merges, `now_ms` the owner's
/// clock (only used to tell whether `merging` has expired).
pub fn decide(policy: MergePolicy, existing: Option<&Record>, merging: &Record, now_ms: u64) -> Verdict {
    if merging.is_expired(now_ms, 0) {
        return Verdict::KeepExisting;
    }
    let take = match (policy, existing) {
        (MergePolicy::Discard, _) => false,
        (MergePolicy::PassThrough, _) | (_, None) => true,
        (MergePolicy::PutIfAbsent, Some(_)) => false,
        (_, Some(existing)) => rank(policy, merging, existing) == Ordering::Greater,
    };
    if take { Verdict::TakeMerging } else { Verdict::KeepExisting }
}

/// How a merging entry is offered to its owner, besides the record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Offer {
    /// When the member that merges applied the table of the cluster it joins (its wall clock,
    /// ms): the owner's changes after that moment stay. `None`: no such moment (an entry given
    /// to [`crate::MapService::merge_entries`]).
    pub(crate) healed_ms: Option<u64>,
    /// The entry was written before the merging side forked off: it is offered because the
    /// cluster it joins took its partition over empty, or because it was acknowledged between the
    /// cut and the merging side's first table (see the module documentation).
    pub(crate) restore: bool,
}

/// Decides the merge of one key: [`decide`] under `policy`, after what the owner remembers
/// besides its live entry `existing`: `removed_ms`, when it last removed the key (its tombstone,
/// if it remembers one), and how the entry is offered (see the module documentation).
pub(crate) fn decide_offer(
    policy: MergePolicy,
    existing: Option<&Record>,
    removed_ms: Option<u64>,
    merging: &Record,
    offer: Offer,
    now_ms: u64,
) -> Verdict {
    if policy == MergePolicy::Discard || merging.is_expired(now_ms, 0) {
        return Verdict::KeepExisting;
    }
    let changed_after = |t: u64| match existing {
        Some(existing) => existing.updated_ms > t,
        None => removed_ms.is_some_and(|removed| removed > t),
    };
    if offer.healed_ms.is_some_and(changed_after) {
        return Verdict::KeepExisting;
    }
    // A removal at or after the entry's last write: the entry is not the key's latest state.
    let removed_since = existing.is_none() && removed_ms.is_some_and(|removed| removed >= merging.updated_ms);
    if offer.restore {
        return if existing.is_none() && !removed_since { Verdict::TakeMerging } else { Verdict::KeepExisting };
    }
    if policy == MergePolicy::LatestUpdate && removed_since {
        return Verdict::KeepExisting;
    }
    decide(policy, existing, merging, now_ms)
}

/// Orders two records for a comparing policy: by the policy's figure, then update time, then value
/// bytes. A total order on what it looks at, so the larger of two records is the same whichever
/// side merges.
fn rank(policy: MergePolicy, a: &Record, b: &Record) -> Ordering {
    let figure = |r: &Record| match policy {
        MergePolicy::HigherHits => r.hits,
        MergePolicy::LatestAccess => r.accessed_ms,
        MergePolicy::ExpirationTime => r.expires_at_ms(0).unwrap_or(u64::MAX),
        // The others do not compare; latest-update compares the update time below.
        _ => 0,
    };
    figure(a).cmp(&figure(b)).then(a.updated_ms.cmp(&b.updated_ms)).then_with(|| a.value.cmp(&b.value))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: u64 = 1_000_000;

    fn record(value: &[u8], updated_ms: u64) -> Record {
        Record {
            value: value.to_vec(),
            created_ms: updated_ms,
            updated_ms,
            accessed_ms: updated_ms,
            hits: 0,
            version: 1,
            ttl_ms: 0,
            max_idle_ms: 0,
        }
    }

    /// Records around `NOW`, with few distinct values so that ties happen often, and expiry that
    /// is sometimes already over.
    fn any_record() -> impl Strategy<Value = Record> {
        (
            prop::collection::vec(0u8..3, 0..3),
            (NOW - 20..NOW + 5, 0u64..15),
            0u64..4,
            0u64..4,
            prop_oneof![Just(0u64), 1u64..30],
            prop_oneof![Just(0u64), 1u64..30],
        )
            .prop_map(|(value, (updated_ms, since_access), hits, version, ttl_ms, max_idle_ms)| Record {
                value,
                created_ms: updated_ms.saturating_sub(5),
                updated_ms,
                accessed_ms: updated_ms + since_access,
                hits,
                version,
                ttl_ms,
                max_idle_ms,
            })
    }

    fn any_policy() -> impl Strategy<Value = MergePolicy> {
        prop::sample::select(MergePolicy::ALL.to_vec())
    }

    /// The owner's view of its own entry: absent when expired.
    fn live(r: &Record) -> Option<&Record> {
        (!r.is_expired(NOW, 0)).then_some(r)
    }

    /// The value readers see after merging `merging` into an owner holding `existing`.
    fn survivor(policy: MergePolicy, existing: &Record, merging: &Record) -> Option<Vec<u8>> {
        let existing = live(existing);
        match decide(policy, existing, merging, NOW) {
            Verdict::TakeMerging => Some(merging.value.clone()),
            Verdict::KeepExisting => existing.map(|r| r.value.clone()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_verdict_depends_only_on_its_inputs(
            policy in any_policy(), existing in prop::option::of(any_record()), merging in any_record(),
        ) {
            let first = decide(policy, existing.as_ref(), &merging, NOW);
            let again = decide(policy, existing.clone().as_ref(), &merging.clone(), NOW);
            prop_assert_eq!(first, again);
        }

        #[test]
        fn comparing_policies_keep_the_same_value_whichever_side_merges(
            policy in prop::sample::select(vec![
                MergePolicy::LatestUpdate, MergePolicy::LatestAccess, MergePolicy::HigherHits,
                MergePolicy::ExpirationTime,
            ]),
            a in any_record(),
            b in any_record(),
        ) {
            prop_assert_eq!(survivor(policy, &a, &b), survivor(policy, &b, &a));
        }

        #[test]
        fn an_expired_merging_entry_never_wins(
            policy in any_policy(), existing in prop::option::of(any_record()), merging in any_record(),
            ttl_or_idle in any::<bool>(),
        ) {
            // Made expired: by its time to live, or by its maximum idle time, ended before NOW.
            let mut merging = merging;
            if ttl_or_idle {
                merging.updated_ms = merging.updated_ms.min(NOW - 1);
                merging.created_ms = merging.created_ms.min(merging.updated_ms);
                merging.ttl_ms = NOW - merging.updated_ms;
            } else {
                merging.accessed_ms = merging.accessed_ms.min(NOW - 1);
                merging.max_idle_ms = NOW - merging.accessed_ms;
            }
            prop_assert!(merging.is_expired(NOW, 0), "{merging:?}");
            prop_assert_eq!(decide(policy, existing.as_ref(), &merging, NOW), Verdict::KeepExisting);
        }

        #[test]
        fn discard_always_keeps_the_existing_entry(existing in prop::option::of(any_record()), merging in any_record()) {
            prop_assert_eq!(decide(MergePolicy::Discard, existing.as_ref(), &merging, NOW), Verdict::KeepExisting);
        }

        #[test]
        fn put_if_absent_takes_the_merging_entry_only_for_an_absent_key(
            existing in prop::option::of(any_record()), merging in any_record(),
        ) {
            let verdict = decide(MergePolicy::PutIfAbsent, existing.as_ref(), &merging, NOW);
            let expected = existing.is_none() && !merging.is_expired(NOW, 0);
            prop_assert_eq!(verdict == Verdict::TakeMerging, expected);
        }

        #[test]
        fn pass_through_takes_every_live_merging_entry(existing in prop::option::of(any_record()), merging in any_record()) {
            let verdict = decide(MergePolicy::PassThrough, existing.as_ref(), &merging, NOW);
            prop_assert_eq!(verdict == Verdict::TakeMerging, !merging.is_expired(NOW, 0));
        }

        #[test]
        fn an_absent_key_takes_a_live_merging_entry_except_under_discard(policy in any_policy(), merging in any_record()) {
            prop_assume!(!merging.is_expired(NOW, 0));
            let expected = if policy == MergePolicy::Discard { Verdict::KeepExisting } else { Verdict::TakeMerging };
            prop_assert_eq!(decide(policy, None, &merging, NOW), expected);
        }

        #[test]
        fn merging_a_record_into_itself_changes_nothing(policy in any_policy(), r in any_record()) {
            prop_assume!(policy != MergePolicy::PassThrough && live(&r).is_some());
            prop_assert_eq!(decide(policy, Some(&r), &r, NOW), Verdict::KeepExisting);
        }
    }

    #[test]
    fn each_policy_picks_by_its_own_figure() {
        let old = Record { hits: 9, accessed_ms: NOW - 1, ..record(b"old", NOW - 100) };
        let new = Record { hits: 1, accessed_ms: NOW - 50, ..record(b"new", NOW - 10) };
        let pick = |policy, existing: &Record, merging: &Record| decide(policy, Some(existing), merging, NOW);
        assert_eq!(pick(MergePolicy::LatestUpdate, &old, &new), Verdict::TakeMerging);
        assert_eq!(pick(MergePolicy::LatestUpdate, &new, &old), Verdict::KeepExisting);
        assert_eq!(pick(MergePolicy::HigherHits, &new, &old), Verdict::TakeMerging);
        assert_eq!(pick(MergePolicy::HigherHits, &old, &new), Verdict::KeepExisting);
        assert_eq!(pick(MergePolicy::LatestAccess, &new, &old), Verdict::TakeMerging, "old was read last");
        assert_eq!(pick(MergePolicy::PutIfAbsent, &old, &new), Verdict::KeepExisting);
        assert_eq!(pick(MergePolicy::PassThrough, &new, &old), Verdict::TakeMerging, "even an older entry");
        assert_eq!(pick(MergePolicy::Discard, &old, &new), Verdict::KeepExisting);
        let forever = record(b"a", NOW - 100);
        let soon = Record { ttl_ms: 1_000, ..record(b"b", NOW - 10) };
        assert_eq!(pick(MergePolicy::ExpirationTime, &soon, &forever), Verdict::TakeMerging, "never expires: latest");
        assert_eq!(pick(MergePolicy::ExpirationTime, &forever, &soon), Verdict::KeepExisting);
    }

    #[test]
    fn a_tie_goes_to_the_larger_value_whichever_side_merges() {
        let a = record(b"apple", NOW - 5);
        let b = record(b"banana", NOW - 5);
        assert_eq!(decide(MergePolicy::LatestUpdate, Some(&a), &b, NOW), Verdict::TakeMerging);
        assert_eq!(decide(MergePolicy::LatestUpdate, Some(&b), &a, NOW), Verdict::KeepExisting);
    }

    #[test]
    fn an_expired_merging_entry_is_not_added_even_to_an_absent_key() {
        let expired = Record { ttl_ms: 10, ..record(b"v", NOW - 10) };
        assert!(expired.is_expired(NOW, 0));
        for policy in MergePolicy::ALL {
            assert_eq!(decide(policy, None, &expired, NOW), Verdict::KeepExisting, "{policy}");
        }
    }

    fn any_offer() -> impl Strategy<Value = Offer> {
        (prop::option::of(NOW - 25..NOW + 10), any::<bool>())
            .prop_map(|(healed_ms, restore)| Offer { healed_ms, restore })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn an_offer_with_nothing_remembered_is_the_policy(
            policy in any_policy(), existing in prop::option::of(any_record()), merging in any_record(),
        ) {
            let plain = decide(policy, existing.as_ref(), &merging, NOW);
            prop_assert_eq!(decide_offer(policy, existing.as_ref(), None, &merging, Offer::default(), NOW), plain);
        }

        #[test]
        fn an_offer_never_takes_an_entry_the_policy_would_not(
            policy in any_policy(),
            existing in prop::option::of(any_record()),
            removed_ms in prop::option::of(NOW - 25..NOW + 10),
            merging in any_record(),
            offer in any_offer(),
        ) {
            if decide_offer(policy, existing.as_ref(), removed_ms, &merging, offer, NOW) == Verdict::TakeMerging {
                prop_assert_eq!(decide(policy, existing.as_ref(), &merging, NOW), Verdict::TakeMerging);
            }
        }

        #[test]
        fn what_the_owner_changed_after_the_sides_met_stays(
            policy in any_policy(),
            existing in prop::option::of(any_record()),
            removed_ms in NOW - 25..NOW + 10,
            merging in any_record(),
            earlier in 1u64..20,
            restore in any::<bool>(),
        ) {
            // Changed (written, or removed while absent) `earlier` ms after the merging member joined.
            let changed = existing.as_ref().map_or(removed_ms, |e| e.updated_ms);
            let offer = Offer { healed_ms: Some(changed - earlier), restore };
            let removed_ms = Some(removed_ms);
            prop_assert_eq!(
                decide_offer(policy, existing.as_ref(), removed_ms, &merging, offer, NOW),
                Verdict::KeepExisting
            );
        }

        #[test]
        fn a_restored_entry_only_fills_a_key_this_side_left_alone(
            policy in any_policy(),
            existing in prop::option::of(any_record()),
            removed_ms in prop::option::of(NOW - 25..NOW + 10),
            merging in any_record(),
        ) {
            let offer = Offer { healed_ms: None, restore: true };
            let verdict = decide_offer(policy, existing.as_ref(), removed_ms, &merging, offer, NOW);
            let left_alone = existing.is_none() && removed_ms.is_none_or(|r| r < merging.updated_ms);
            let fills = left_alone && policy != MergePolicy::Discard && !merging.is_expired(NOW, 0);
            prop_assert_eq!(verdict == Verdict::TakeMerging, fills);
        }

        #[test]
        fn a_removal_is_a_tombstone_for_latest_update_only(
            policy in any_policy(), removed_ms in NOW - 25..NOW + 10, merging in any_record(),
        ) {
            let offer = Offer::default();
            let verdict = decide_offer(policy, None, Some(removed_ms), &merging, offer, NOW);
            if policy == MergePolicy::LatestUpdate && removed_ms >= merging.updated_ms {
                prop_assert_eq!(verdict, Verdict::KeepExisting);
            } else {
                prop_assert_eq!(verdict, decide(policy, None, &merging, NOW));
            }
        }
    }

    #[test]
    fn a_late_merge_does_not_bring_back_what_the_cluster_removed_after_it_joined() {
        let pre_split = record(b"old", NOW - 100);
        let offer = Offer { healed_ms: Some(NOW - 50), restore: true };
        // Taken over empty during the split, written and removed after the heal.
        assert_eq!(
            decide_offer(MergePolicy::PutIfAbsent, None, Some(NOW - 10), &pre_split, offer, NOW),
            Verdict::KeepExisting
        );
        // Nothing happened to the key here: the lost entry comes back.
        assert_eq!(decide_offer(MergePolicy::PutIfAbsent, None, None, &pre_split, offer, NOW), Verdict::TakeMerging);
        // Pass-through does not overwrite a write made after the merging member joined.
        let split_write = Offer { healed_ms: Some(NOW - 50), restore: false };
        let later = record(b"later", NOW - 20);
        let during = record(b"during", NOW - 60);
        assert_eq!(
            decide_offer(MergePolicy::PassThrough, Some(&later), None, &during, split_write, NOW),
            Verdict::KeepExisting
        );
        let earlier = record(b"earlier", NOW - 70);
        assert_eq!(
            decide_offer(MergePolicy::PassThrough, Some(&earlier), None, &during, split_write, NOW),
            Verdict::TakeMerging
        );
    }

    #[test]
    fn names_parse_back_and_unknown_names_list_the_valid_ones() {
        for policy in MergePolicy::ALL {
            assert_eq!(policy.name().parse::<MergePolicy>(), Ok(policy));
            assert_eq!(policy.to_string().to_uppercase().parse::<MergePolicy>(), Ok(policy));
        }
        assert_eq!(MergePolicy::default(), MergePolicy::LatestUpdate);
        let err = "latest_update".parse::<MergePolicy>().unwrap_err().to_string();
        assert!(err.contains("\"latest_update\"") && err.contains("latest-update, latest-access"), "{err}");
    }
}
