//! Split-brain merge, on the side that lost: when this member applies a table of another side's
//! lineage over its own (its side of a split was the smaller one, or lost the tie), the entries
//! it wrote as owner while the sides were apart would be dropped with its table. Instead,
//! [`Node::apply_table`](crate::node::Node) snapshots them ([`Merging::collect`]) before it
//! adjusts the partitions, and [`push`] offers them, once the table is applied, to the owners of
//! the cluster it joined, where each map's merge policy decides ([`crate::merge::decide`]).
//!
//! Which entries, per partition this member owned under its last table whose owner term the
//! winning table does not continue (a partition whose term the winner continues was owned by this
//! member on both sides: its data is the winner's):
//! - every entry, when none of the partition's synchronous replicas in the last table both sides
//!   shared is on the winner's side ([`winner_kept`]): the winner took the partition over empty
//!   and reported it lost, and this member holds the only copy of what was written before the
//!   split;
//! - otherwise the entries last written since this member applied its side's first table outside
//!   the winner's lineage, or since the first write of the partition it acknowledged without its
//!   synchronous backup since then (`PartitionData::merge_floors`:
//!   between the cut and its side's first table, a write whose backup was on the other side
//!   waited for that table, which replaced the backup, and was then acknowledged); and the merged
//!   entries it took since then (`PartitionData::merged_keys`: a merge into a group that split
//!   off again before the cluster settled; they keep their older update times). Older entries
//!   were written before the sides parted and reached the winner's replica: it holds them as they
//!   were, or changed or removed them since, and merging them back would undo its removals
//!   (tombstones are bounded, and kept for `latest-update` only), or, with `pass-through`,
//!   overwrite its later writes.
//!
//! Every entry is offered with the time this member applied the winner's table (what the owners
//! change after it stays), and those written before the fork in a partition the winner lost as
//! restorations (they fill only keys the winner left alone): see [`crate::merge::decide_offer`].
//!
//! Ring buffers (reliable topics) are not merged, nor maps whose policy is `discard`.
//!
//! Bounded: at most [`MERGE_ENTRIES_MAX`] entries and [`MERGE_BYTES_MAX`] bytes are kept for a
//! merge; beyond that the rest is dropped with a warning that says how many (the policy would
//! have decided about them; the winner's entries stay).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{MapSettings, RELIABLE_TOPIC_MAP_PREFIX};
use crate::merge::{MergePolicy, Offer};
use crate::node::{Node, PartitionData};
use crate::record::Record;
use crate::table::{PartitionTable, TableId};
use grapevine_membership::MemberId;

/// The most entries one merge keeps in memory.
pub(crate) const MERGE_ENTRIES_MAX: usize = 1_000_000;

/// The most key and value bytes one merge keeps in memory.
pub(crate) const MERGE_BYTES_MAX: usize = 256 << 20;

/// Tables this member remembers applying, with when, to find where its side forked off.
pub(crate) const TABLE_LOG_MAX: usize = 64;

/// Merge floors noted this long before the fork still count (millisecond clock readings).
const FLOOR_SLACK_MS: u64 = 5;

/// Rounds of merging the entries that failed (owner unreachable, timeouts) before giving up.
const MERGE_ROUNDS: u32 = 5;

/// The tables this member applied, oldest first, with the wall-clock time (ms) of each (the
/// tables themselves: the one a merge starts from tells which partitions the winner lost).
#[derive(Debug, Default)]
pub(crate) struct TableLog {
    applied: VecDeque<(Arc<PartitionTable>, u64)>,
}

impl TableLog {
    pub(crate) fn push(&mut self, table: Arc<PartitionTable>, now: u64) {
        if self.applied.len() == TABLE_LOG_MAX {
            self.applied.pop_front();
        }
        self.applied.push_back((table, now));
    }

    /// The newest remembered table `winner` continues: the last one both sides shared.
    pub(crate) fn base(&self, winner: &PartitionTable) -> Option<Arc<PartitionTable>> {
        self.applied.iter().rev().find(|(t, _)| winner.term_in_lineage(&t.id())).map(|(t, _)| t.clone())
    }

    /// When this member's side left `winner`'s lineage: the time it applied the first table after
    /// the newest one `winner` continues (its oldest remembered table's when `winner` continues
    /// none of them; 0, everything, when it remembers none).
    pub(crate) fn forked_at(&self, winner: &PartitionTable) -> u64 {
        let at = fork_time(self.applied.iter().map(|(t, at)| (winner.term_in_lineage(&t.id()), *at)));
        let oldest = self.applied.front().map(|(_, at)| *at);
        // Every remembered table is outside the winner's lineage and older ones were forgotten:
        // the fork may be older still.
        if self.applied.len() == TABLE_LOG_MAX && Some(at) == oldest { 0 } else { at }
    }
}

/// [`TableLog::forked_at`] over `(in the winner's lineage, applied at)`, oldest first.
fn fork_time(log: impl DoubleEndedIterator<Item = (bool, u64)> + Clone) -> u64 {
    let mut first_outside = None;
    for (in_lineage, at) in log.rev() {
        if in_lineage {
            break;
        }
        first_outside = Some(at);
    }
    first_outside.unwrap_or(0)
}

/// Whether the winner's side kept a synchronous replica of a partition whose row was `base_row`
/// in the last table both sides shared: some of its first `durable` replicas is on the winner's
/// side. When none is, the winner took the partition over with nothing (and reported it lost).
pub(crate) fn winner_kept(base_row: &[MemberId], durable: usize, winner_side: &BTreeSet<MemberId>) -> bool {
    base_row.iter().take(durable.max(1)).any(|m| winner_side.contains(m))
}

/// The members of the winner's side: those `winner` names that `ours` (this member's last table,
/// its side's) does not.
pub(crate) fn winner_side(ours: &PartitionTable, winner: &PartitionTable) -> BTreeSet<MemberId> {
    let named = |t: &PartitionTable| t.rows.iter().flatten().cloned().collect::<BTreeSet<MemberId>>();
    let ours = named(ours);
    named(winner).into_iter().filter(|m| !ours.contains(m)).collect()
}

/// The entries of a side that lost, by map, to be merged into the winner's cluster.
#[derive(Debug)]
pub(crate) struct Merging {
    /// Entries written at or after this time (ms) are merged (all of a partition the winner lost).
    pub(crate) since_ms: u64,
    /// The last table both sides shared (`None`: none is remembered, every entry is merged).
    base: Option<Arc<PartitionTable>>,
    /// The winner's members that were not on this member's side.
    winner_side: BTreeSet<MemberId>,
    /// Why this member merges: its table and the winner's.
    pub(crate) ours: TableId,
    pub(crate) theirs: TableId,
    /// When this member applied the winner's table (its clock, ms): what the owners change after
    /// it stays ([`Offer::healed_ms`]).
    pub(crate) healed_ms: u64,
    /// Each entry, and whether it restores a partition the winner lost ([`Offer::restore`]).
    pub(crate) maps: BTreeMap<String, Vec<(Vec<u8>, Record, bool)>>,
    entries: usize,
    bytes: usize,
    /// Entries left out over the bounds.
    pub(crate) dropped: u64,
    /// Partitions (of some map) the winner lost, whose every entry is merged.
    pub(crate) lost_partitions: u64,
}

impl Merging {
    /// A merge of what this member wrote since `since_ms` (or, in partitions the winner lost,
    /// ever) on its side, whose last table is `ours`, into `winner`'s.
    pub(crate) fn new(
        since_ms: u64,
        base: Option<Arc<PartitionTable>>,
        ours: &PartitionTable,
        winner: &PartitionTable,
    ) -> Merging {
        Merging {
            since_ms,
            base,
            winner_side: winner_side(ours, winner),
            ours: ours.id(),
            theirs: winner.id(),
            healed_ms: crate::record::now_ms(),
            maps: BTreeMap::new(),
            entries: 0,
            bytes: 0,
            dropped: 0,
            lost_partitions: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Takes the entries of partition `p`, which this member owned: those of maps that merge,
    /// written at or after `since_ms`, or all of them where the winner kept no synchronous replica.
    pub(crate) fn collect(&mut self, settings: &MapSettings, p: u32, data: &PartitionData) {
        for (name, mp) in &data.maps {
            let config = settings.map(name);
            if name.starts_with(RELIABLE_TOPIC_MAP_PREFIX) || config.merge_policy == MergePolicy::Discard {
                continue;
            }
            let all = self
                .base
                .as_ref()
                .is_none_or(|base| !winner_kept(base.row(p), config.durable_replicas(), &self.winner_side));
            self.lost_partitions += u64::from(all && !mp.entries.is_empty());
            // Noted on this side since it forked off: a write acknowledged without its backup
            // waited for this side's table, a merge into this side came after it.
            let forked = self.since_ms.saturating_sub(FLOOR_SLACK_MS);
            let floor = data.merge_floors.iter().filter(|(when, _)| *when >= forked).map(|(_, since)| *since).min();
            let since = floor.map_or(self.since_ms, |t| t.min(self.since_ms));
            let merged: BTreeSet<&[u8]> = data
                .merged_keys
                .iter()
                .filter(|(when, updated, map, _)| *when >= forked && *updated < since && map == name)
                .map(|(_, _, _, key)| key.as_slice())
                .collect();
            for (key, record) in mp.entries.iter() {
                let merged_here = merged.contains(key.as_slice());
                if !all && record.updated_ms < since && !merged_here {
                    continue;
                }
                // Older than the fork (a partition the winner lost, or a write acknowledged between
                // the cut and this side's first table): the winner may hold it, and may have
                // written or removed the key since. It fills only a key the winner left alone.
                let before = record.updated_ms < self.since_ms && !merged_here;
                let size = key.len() + record.value.len();
                if self.entries >= MERGE_ENTRIES_MAX || self.bytes + size > MERGE_BYTES_MAX {
                    self.dropped += 1;
                    continue;
                }
                self.entries += 1;
                self.bytes += size;
                self.maps.entry(name.clone()).or_default().push((key, record, before));
            }
        }
    }
}

/// Offers the entries of `merging` to their owners under this member's (new) table, map by map,
/// through each map's policy; entries whose merge failed are tried again a few times.
pub(crate) async fn push(node: Arc<Node>, merging: Merging) {
    let total: usize = merging.maps.values().map(Vec::len).sum();
    info!(
        ours = %merging.ours, theirs = %merging.theirs, entries = total, since_ms = merging.since_ms,
        partitions_lost_by_the_winner = merging.lost_partitions,
        "this member's side of a split lost to the larger one: merging the entries it wrote meanwhile"
    );
    if merging.dropped > 0 {
        warn!(
            dropped = merging.dropped,
            "more entries to merge than a merge keeps ({MERGE_ENTRIES_MAX} entries, {MERGE_BYTES_MAX} bytes): \
             the rest are not merged and the larger side's entries stay"
        );
    }
    for (map, entries) in merging.maps {
        let policy = node.settings.map(&map).merge_policy;
        let healed_ms = Some(merging.healed_ms);
        let entries =
            entries.into_iter().map(|(key, record, restore)| (key, record, Offer { healed_ms, restore })).collect();
        let (mut kept, mut took) = (0u64, 0u64);
        let mut pending = entries;
        let mut last_error = None;
        for round in 0..MERGE_ROUNDS {
            if round > 0 {
                tokio::time::sleep(Duration::from_secs(1 << round).min(Duration::from_secs(10))).await;
            }
            match node.merge_entries(&map, policy, pending).await {
                Ok(outcome) => {
                    kept += outcome.kept_existing;
                    took += outcome.took_merging;
                    last_error = outcome.failed.first().map(|(_, _, _, e)| e.to_string());
                    pending = outcome.failed.into_iter().map(|(key, record, offer, _)| (key, record, offer)).collect();
                }
                Err((error, back)) => {
                    last_error = Some(error.to_string());
                    pending = back;
                    if matches!(error, crate::MapError::ShuttingDown { .. }) {
                        break;
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        if pending.is_empty() {
            info!(%map, %policy, kept_existing = kept, took_merging = took, "merged the entries of this member's side");
        } else {
            warn!(
                %map, %policy, kept_existing = kept, took_merging = took, failed = pending.len(),
                error = last_error.as_deref().unwrap_or("-"),
                "entries of this member's side could not be merged: the larger side's entries stay for those keys"
            );
        }
    }
}

/// An entry to merge: encoded key, record, and how it is offered.
pub(crate) type MergeEntry = (Vec<u8>, Record, Offer);

/// What [`Node::merge_entries`] did: entries kept and taken, and those that failed, with their
/// records and offers (to try again) and why.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub(crate) kept_existing: u64,
    pub(crate) took_merging: u64,
    pub(crate) failed: Vec<(Vec<u8>, Record, Offer, crate::MapError)>,
}

/// Merge operations one call keeps in flight at once: enough to hide the round trip to the
/// owners, few enough to leave the members' request queues to other work.
pub const MERGE_IN_FLIGHT: usize = 32;

impl Node {
    /// Offers each `(encoded key, record)` to the key's owner, which keeps its entry or stores the
    /// merging one as `policy` decides. `Err` (with the entries back) when the whole call is
    /// refused at once: shutting down, or below the map's `min_cluster_size`.
    pub(crate) async fn merge_entries(
        self: &Arc<Self>,
        map: &str,
        policy: MergePolicy,
        entries: Vec<MergeEntry>,
    ) -> Result<Merged, (crate::MapError, Vec<MergeEntry>)> {
        if let Err(error) = self.check_running(map) {
            return Err((error, entries));
        }
        let mut outcome = Merged::default();
        let mut pending = entries.into_iter();
        let mut calls = tokio::task::JoinSet::new();
        loop {
            while calls.len() < MERGE_IN_FLIGHT {
                let Some((key, record, offer)) = pending.next() else { break };
                let node = self.clone();
                let map = map.to_string();
                calls.spawn(async move {
                    let op = crate::messages::Op::Merge { key: key.clone(), record: record.clone(), policy, offer };
                    let result = node.call(&map, op).await;
                    (key, record, offer, result)
                });
            }
            let Some(joined) = calls.join_next().await else { break };
            let (key, record, offer, result) = match joined {
                Ok(done) => done,
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // Tasks are never aborted here, and the set is dropped only with the future.
                Err(error) => unreachable!("a merge task was cancelled: {error}"),
            };
            match result {
                Ok(crate::messages::OpResult::Flag(true)) => outcome.took_merging += 1,
                Ok(crate::messages::OpResult::Flag(false)) => outcome.kept_existing += 1,
                Ok(other) => {
                    let error = crate::MapError::Failed {
                        op: "merge",
                        map: map.to_string(),
                        error: format!("unexpected result {other:?}"),
                    };
                    outcome.failed.push((key, record, offer, error));
                }
                Err(error) => outcome.failed.push((key, record, offer, error)),
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fork_is_the_first_table_after_the_newest_one_the_winner_continues() {
        let log = [(true, 10), (true, 20), (false, 30), (false, 40)];
        assert_eq!(fork_time(log.iter().copied()), 30);
        assert_eq!(fork_time([(false, 5), (false, 7)].iter().copied()), 5, "none continued: the oldest");
        assert_eq!(fork_time([(true, 5)].iter().copied()), 0, "all continued: nothing forked, merge all");
        assert_eq!(fork_time(std::iter::empty::<(bool, u64)>()), 0);
        // A table the winner continues after one it does not (the side rejoined the winner's
        // lineage for a while, then forked again): the last fork counts.
        assert_eq!(fork_time([(false, 1), (true, 2), (false, 3)].iter().copied()), 3);
    }

    fn m(name: &str) -> MemberId {
        MemberId::new(name, 1)
    }

    #[test]
    fn a_partition_whose_synchronous_replicas_were_all_on_the_losing_side_was_lost_by_the_winner() {
        let winner: BTreeSet<MemberId> = [m("a"), m("b")].into();
        // c owned it, a was its backup: the winner promoted a and has the data.
        assert!(winner_kept(&[m("c"), m("a")], 2, &winner));
        // c and d (both on the losing side) held it: the winner has nothing.
        assert!(!winner_kept(&[m("c"), m("d"), m("a")], 2, &winner), "a was only an asynchronous backup");
        assert!(winner_kept(&[m("c"), m("d"), m("a")], 3, &winner));
        // No backups: only the owner counts.
        assert!(!winner_kept(&[m("c"), m("a")], 1, &winner));
        assert!(winner_kept(&[m("a")], 0, &winner), "the owner always counts");
        assert!(!winner_kept(&[], 2, &winner), "a row with no replica kept nothing");
    }

    #[test]
    fn merge_floors_join_notes_made_close_together_and_keep_the_latest_few() {
        let mut data = PartitionData::default();
        data.note_merge_floor(10_000, 9_000);
        data.note_merge_floor(10_500, 3_000);
        data.note_merge_floor(10_900, 9_500);
        assert_eq!(data.merge_floors, vec![(10_900, 3_000)], "one merge's entries make one note");
        for i in 1..=20u64 {
            data.note_merge_floor(10_000 + i * 5_000, 1_000 * i);
        }
        assert_eq!(data.merge_floors.len(), crate::node::MERGE_FLOORS_MAX);
        assert_eq!(data.merge_floors.last(), Some(&(110_000, 20_000)));
        assert_eq!(data.merge_floors.first(), Some(&(75_000, 13_000)), "the oldest notes go first");
    }

    #[test]
    fn a_merge_takes_the_merged_entries_it_took_along_but_not_what_the_other_side_wrote_before() {
        let record = |updated_ms: u64| {
            Record::written(updated_ms.to_be_bytes().to_vec(), updated_ms, crate::record::Expiry::default(), None)
        };
        let mut data = PartitionData::default();
        let mut mp = crate::store::MapPartition::new(TableId::default());
        // Written by the other side before the split and replicated here, then a merged entry
        // this member took (its update time is as old), then a write on this side after the fork.
        mp.insert(b"theirs".to_vec(), record(1_000));
        mp.insert(b"merged".to_vec(), record(1_500));
        mp.insert(b"ours".to_vec(), record(5_000));
        data.maps.insert("default".to_string(), mp);
        data.note_merged_key(4_000, 1_500, "default", b"merged".to_vec());
        data.note_merged_key(4_000, 1_200, "other", b"theirs".to_vec());
        let mut ours = PartitionTable::empty(1);
        ours.rows = vec![vec![m("c")]];
        let mut winner = PartitionTable::empty(1);
        winner.rows = vec![vec![m("a")]];
        let base = Arc::new(winner.clone());
        let settings = MapSettings::default();
        // The side forked at 3 000 ms.
        let mut merging = Merging::new(3_000, Some(base.clone()), &ours, &winner);
        merging.collect(&settings, 0, &data);
        let keys: BTreeSet<Vec<u8>> = merging.maps["default"].iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(keys, [b"merged".to_vec(), b"ours".to_vec()].into(), "not the other side's older entry");
        // A merged entry taken before this side forked off is the winner's already.
        let mut merging = Merging::new(4_500, Some(base), &ours, &winner);
        merging.collect(&settings, 0, &data);
        let keys: BTreeSet<Vec<u8>> = merging.maps["default"].iter().map(|(k, _, _)| k.clone()).collect();
        assert_eq!(keys, [b"ours".to_vec()].into());
        assert!(merging.maps["default"].iter().all(|(_, _, restore)| !restore));
        // The winner kept no replica (the last shared table had only this member): every entry,
        // and those written before the fork restore what the winner lost.
        let mut merging = Merging::new(3_000, Some(Arc::new(ours.clone())), &ours, &winner);
        merging.collect(&settings, 0, &data);
        let restores: BTreeMap<Vec<u8>, bool> =
            merging.maps["default"].iter().map(|(k, _, restore)| (k.clone(), *restore)).collect();
        let expected = [(b"theirs".to_vec(), true), (b"merged".to_vec(), false), (b"ours".to_vec(), false)];
        assert_eq!(restores, expected.into());
        // A write acknowledged alone between the cut (2 000 ms) and the fork: taken along as one
        // that fills only a key the winner left alone (the winner may have its copy).
        data.maps.get_mut("default").unwrap().insert(b"alone".to_vec(), record(2_500));
        data.note_merge_floor(3_100, 2_000);
        let mut merging = Merging::new(3_000, Some(Arc::new(winner.clone())), &ours, &winner);
        merging.collect(&settings, 0, &data);
        let restores: BTreeMap<Vec<u8>, bool> =
            merging.maps["default"].iter().map(|(k, _, restore)| (k.clone(), *restore)).collect();
        assert_eq!(restores.get(b"alone".as_slice()), Some(&true), "{restores:?}");
        assert_eq!(restores.get(b"ours".as_slice()), Some(&false));
        assert!(!restores.contains_key(b"theirs".as_slice()), "older than the floor");
        // Beyond the notes kept, the oldest become a floor.
        for i in 0..crate::node::MERGED_KEYS_MAX as u64 {
            data.note_merged_key(6_000 + i, 2_000, "default", i.to_be_bytes().to_vec());
        }
        assert_eq!(data.merged_keys.len(), crate::node::MERGED_KEYS_MAX);
        assert_eq!(data.merge_floors, vec![(4_000, 1_200)]);
    }

    #[test]
    fn the_winners_side_is_who_its_table_names_and_ours_does_not() {
        let mut ours = PartitionTable::empty(3);
        ours.rows = vec![vec![m("c")], vec![m("c"), m("d")], vec![m("d")]];
        let mut winner = PartitionTable::empty(3);
        winner.rows = vec![vec![m("a"), m("b")], vec![m("b"), m("d")], vec![m("a")]];
        // d appears in both (it rejoined the winner already): it is not the winner's side.
        assert_eq!(winner_side(&ours, &winner), [m("a"), m("b")].into());
    }

    proptest! {
        /// The fork time is one of the times applied after every table the winner continues, and
        /// the earliest of those.
        #[test]
        fn the_fork_time_follows_every_table_of_the_winners_lineage(log in prop::collection::vec((any::<bool>(), 0..1000u64), 0..20)) {
            let mut log = log;
            let mut t = 0;
            for entry in &mut log {
                t += entry.1 + 1;
                entry.1 = t;
            }
            let at = fork_time(log.iter().copied());
            let last_in = log.iter().rposition(|(i, _)| *i);
            match last_in {
                Some(i) if i + 1 < log.len() => prop_assert_eq!(at, log[i + 1].1),
                Some(_) => prop_assert_eq!(at, 0),
                None => prop_assert_eq!(at, log.first().map_or(0, |e| e.1)),
            }
        }
    }
}
