//! Split-brain merge, on the side that lost: when this member applies a table of another side's
//! lineage over its own (its side of a split was the smaller one, or lost the tie), the entries
//! it wrote as owner while the sides were apart would be dropped with its table. Instead,
//! [`Node::apply_table`](crate::node::Node) snapshots them ([`Merging::collect`]) before it
//! adjusts the partitions, and [`push`] offers them, once the table is applied, to the owners of
//! the cluster it joined, where each map's merge policy decides ([`crate::merge::decide`]).
//!
//! Which entries: those of every partition this member owned under its last table whose owner
//! term the winning table does not continue (a partition whose term the winner continues was
//! owned by this member on both sides: its data is the winner's), last written at or after the
//! moment this member applied its side's first table outside the winner's lineage. Older entries
//! were written before the sides parted: the winner holds them as they were, or changed or
//! removed them since, and merging them back would undo its removals (removals are not merged).
//! What the smaller side acknowledged between the cut and its first table of its own (possible
//! only where every synchronous replica was on its side) is not merged. Ring buffers (reliable
//! topics) are not merged, nor maps whose policy is `discard`.
//!
//! Bounded: at most [`MERGE_ENTRIES_MAX`] entries and [`MERGE_BYTES_MAX`] bytes are kept for a
//! merge; beyond that the rest is dropped with a warning that says how many (the policy would
//! have decided about them; the winner's entries stay).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{MapSettings, RELIABLE_TOPIC_MAP_PREFIX};
use crate::merge::MergePolicy;
use crate::node::{Node, PartitionData};
use crate::record::Record;
use crate::table::{PartitionTable, TableId};

/// The most entries one merge keeps in memory.
pub(crate) const MERGE_ENTRIES_MAX: usize = 1_000_000;

/// The most key and value bytes one merge keeps in memory.
pub(crate) const MERGE_BYTES_MAX: usize = 256 << 20;

/// Tables this member remembers applying, with when, to find where its side forked off.
pub(crate) const TABLE_LOG_MAX: usize = 64;

/// Rounds of merging the entries that failed (owner unreachable, timeouts) before giving up.
const MERGE_ROUNDS: u32 = 5;

/// The tables this member applied, oldest first, with the wall-clock time (ms) of each.
#[derive(Debug, Default)]
pub(crate) struct TableLog {
    applied: VecDeque<(TableId, u64)>,
}

impl TableLog {
    pub(crate) fn push(&mut self, id: TableId, now: u64) {
        if self.applied.len() == TABLE_LOG_MAX {
            self.applied.pop_front();
        }
        self.applied.push_back((id, now));
    }

    /// When this member's side left `winner`'s lineage: the time it applied the first table after
    /// the newest one `winner` continues (its oldest remembered table's when `winner` continues
    /// none of them; 0, everything, when it remembers none).
    pub(crate) fn forked_at(&self, winner: &PartitionTable) -> u64 {
        let at = fork_time(self.applied.iter().map(|(id, at)| (winner.term_in_lineage(id), *at)));
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

/// The entries of a side that lost, by map, to be merged into the winner's cluster.
#[derive(Debug)]
pub(crate) struct Merging {
    /// Entries written at or after this time (ms) are merged.
    pub(crate) since_ms: u64,
    /// Why this member merges: its table and the winner's.
    pub(crate) ours: TableId,
    pub(crate) theirs: TableId,
    pub(crate) maps: BTreeMap<String, Vec<(Vec<u8>, Record)>>,
    entries: usize,
    bytes: usize,
    /// Entries left out over the bounds.
    pub(crate) dropped: u64,
}

impl Merging {
    pub(crate) fn new(since_ms: u64, ours: TableId, theirs: TableId) -> Merging {
        Merging { since_ms, ours, theirs, maps: BTreeMap::new(), entries: 0, bytes: 0, dropped: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Takes the entries of one partition this member owned: those of maps that merge, written
    /// at or after `since_ms`.
    pub(crate) fn collect(&mut self, settings: &MapSettings, data: &PartitionData) {
        for (name, mp) in &data.maps {
            if name.starts_with(RELIABLE_TOPIC_MAP_PREFIX) || settings.map(name).merge_policy == MergePolicy::Discard {
                continue;
            }
            for (key, record) in mp.entries.iter() {
                if record.updated_ms < self.since_ms {
                    continue;
                }
                let size = key.len() + record.value.len();
                if self.entries >= MERGE_ENTRIES_MAX || self.bytes + size > MERGE_BYTES_MAX {
                    self.dropped += 1;
                    continue;
                }
                self.entries += 1;
                self.bytes += size;
                self.maps.entry(name.clone()).or_default().push((key, record));
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
                    last_error = outcome.failed.first().map(|(_, _, e)| e.to_string());
                    pending = outcome.failed.into_iter().map(|(key, record, _)| (key, record)).collect();
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

/// What [`Node::merge_entries`] did: entries kept and taken, and those that failed, with their
/// records (to try again) and why.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub(crate) kept_existing: u64,
    pub(crate) took_merging: u64,
    pub(crate) failed: Vec<(Vec<u8>, Record, crate::MapError)>,
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
        entries: Vec<(Vec<u8>, Record)>,
    ) -> Result<Merged, (crate::MapError, Vec<(Vec<u8>, Record)>)> {
        if let Err(error) = self.check_running(map) {
            return Err((error, entries));
        }
        let mut outcome = Merged::default();
        let mut pending = entries.into_iter();
        let mut calls = tokio::task::JoinSet::new();
        loop {
            while calls.len() < MERGE_IN_FLIGHT {
                let Some((key, record)) = pending.next() else { break };
                let node = self.clone();
                let map = map.to_string();
                calls.spawn(async move {
                    let op = crate::messages::Op::Merge { key: key.clone(), record: record.clone(), policy };
                    let result = node.call(&map, op).await;
                    (key, record, result)
                });
            }
            let Some(joined) = calls.join_next().await else { break };
            let (key, record, result) = match joined {
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
                    outcome.failed.push((key, record, error));
                }
                Err(error) => outcome.failed.push((key, record, error)),
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
