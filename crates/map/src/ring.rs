//! Ring buffers kept as map data, for reliable topics.
//!
//! A reliable topic's messages live in the map `__topic:<name>` (see
//! [`crate::config::RELIABLE_TOPIC_MAP_PREFIX`]), all of them in the one partition that owns the
//! topic name: every ring operation's key is the topic name, so it routes there. The partition's
//! owner, backups, terms, fencing, migration and fail-over are the map's own; the ring adds only
//! three operations ([`crate::messages::Op::RingAppend`], `RingRead`) and one replicated change
//! ([`crate::messages::ReplOp::Batch`]).
//!
//! **Layout.** Item `seq` is the entry whose key is `seq` as 8 big-endian bytes; the entry with
//! the empty key holds the bounds `head` (the oldest sequence held) and `next` (the sequence the
//! next item gets), 16 big-endian bytes. An append writes the item and the bounds, and removes
//! the oldest items beyond the capacity, as one `Batch` change, so a backup never holds an item
//! without its bounds.
//!
//! **Full rings.** A ring holds at most `capacity` items; an append to a full ring overwrites the
//! oldest item, unless that item is younger than the retention time and the caller does not allow
//! overwriting retained items: then it is refused with how long until the oldest may go, and the
//! caller applies its overload policy (wait, drop the new message, or fail).
//!
//! **Only confirmed items are read.** The owner applies an append before its synchronous backups
//! confirm it. If the owner died right then, the new owner would not hold the item and would give
//! its sequence to another message; a subscriber that had read the first would skip the second,
//! an acknowledged message. So reads return items only up to what the synchronous backups have
//! confirmed: the owner raises its confirmed bound when an append's backups all answered
//! (`Node::on_write_confirmed`), and a member that starts a term as owner counts everything it
//! holds as confirmed (it holds it: it was a synchronous backup, or received it by migration).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::MapService;
use crate::config::RELIABLE_TOPIC_MAP_PREFIX;
use crate::error::MapError;
use crate::messages::{EntryEventKind, Op, OpResult, ReplOp};
use crate::node::Node;
use crate::record::{Expiry, Record};
use crate::store::{Change, MapPartition};
use crate::table::Term;

/// The most items a ring may hold; larger capacities are clamped.
pub const RING_CAPACITY_MAX: u64 = 10_000_000;

/// The most items one read returns.
pub const RING_READ_ITEMS_MAX: u32 = 10_000;

/// The most items one append removes when the capacity was lowered: the ring then shrinks over
/// the following appends, and each change stays small.
const EVICTIONS_PER_APPEND_MAX: u64 = 64;

/// The key of the entry holding the ring's bounds.
const BOUNDS_KEY: &[u8] = b"";

/// One change of a [`ReplOp::Batch`]. Not recursive, so a batch cannot nest batches (a decoder
/// must never recurse as deep as a peer's message says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RingWrite {
    Put { key: Vec<u8>, record: Record },
    Remove { key: Vec<u8> },
}

impl RingWrite {
    /// Bytes the change takes in a buffered copy (as `copy::repl_bytes` counts them).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            RingWrite::Put { key, record } => key.len() + record.value.len() + 64,
            RingWrite::Remove { key } => key.len() + 16,
        }
    }
}

/// The key of item `seq`.
pub(crate) fn item_key(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

fn encode_bounds(head: u64, next: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&head.to_be_bytes());
    bytes.extend_from_slice(&next.to_be_bytes());
    bytes
}

/// `(head, next)` from the bounds entry's value; `None` when it is not 16 bytes with
/// `head <= next`.
fn decode_bounds(bytes: &[u8]) -> Option<(u64, u64)> {
    let head = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
    let next = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    (bytes.len() == 16 && head <= next).then_some((head, next))
}

fn never() -> Expiry {
    Expiry { ttl: None, max_idle: None }
}

impl MapPartition {
    /// The ring's `(head, next)`; `(0, 0)` for a ring never written.
    pub(crate) fn ring_bounds(&self) -> (u64, u64) {
        self.entries.get(BOUNDS_KEY).and_then(|s| decode_bounds(s.value())).unwrap_or((0, 0))
    }

    /// As owner: the confirmed bound of the ring (items below it are on every synchronous
    /// backup). The first time in a term, everything held counts as confirmed.
    fn ring_confirmed_next(&mut self) -> u64 {
        match &self.ring_confirmed {
            Some((term, next)) if *term == self.term => *next,
            _ => {
                let (_, next) = self.ring_bounds();
                self.ring_confirmed = Some((self.term.clone(), next));
                next
            }
        }
    }

    /// As owner: the synchronous backups confirmed the ring up to `next` in `term`.
    pub(crate) fn ring_confirm(&mut self, term: &Term, next: u64) {
        if let Some((confirmed_term, confirmed)) = &mut self.ring_confirmed
            && confirmed_term == term
            && *confirmed < next
        {
            *confirmed = next;
        }
    }

    /// Appends `item` as the owner at `now`; see the module documentation.
    pub(crate) fn ring_append(
        &mut self,
        item: Vec<u8>,
        capacity: u64,
        retention_ms: u64,
        overwrite: bool,
        now: u64,
    ) -> (OpResult, Option<Change>) {
        let capacity = capacity.clamp(1, RING_CAPACITY_MAX);
        // Fix the confirmed bound of this term before the ring grows.
        self.ring_confirmed_next();
        let (head, next) = self.ring_bounds();
        let held = next - head;
        let evict = (held + 1).saturating_sub(capacity).min(EVICTIONS_PER_APPEND_MAX);
        if evict > 0 && !overwrite && retention_ms > 0 {
            // Items are in age order: the youngest to evict decides.
            let youngest = self.entries.get(&item_key(head + evict - 1)).map(|s| s.meta().created_ms);
            if let Some(created) = youngest {
                let age = now.saturating_sub(created);
                if age < retention_ms {
                    return (OpResult::RingFull { retry_in_ms: retention_ms - age }, None);
                }
            }
        }
        let mut writes = Vec::with_capacity(2 + evict as usize);
        for seq in head..head + evict {
            let key = item_key(seq);
            self.remove(&key);
            writes.push(RingWrite::Remove { key });
        }
        let key = item_key(next);
        let record = Record::written(item, now, never(), None);
        self.insert(key.clone(), record.clone());
        writes.push(RingWrite::Put { key: key.clone(), record });
        let bounds = Record::written(encode_bounds(head + evict, next + 1), now, never(), None);
        self.insert(BOUNDS_KEY.to_vec(), bounds.clone());
        writes.push(RingWrite::Put { key: BOUNDS_KEY.to_vec(), record: bounds });
        let change = Change::naming(key, ReplOp::Batch(writes), EntryEventKind::Added);
        (OpResult::RingStored { seq: next }, Some(change))
    }

    /// Reads confirmed items from `from` on as the owner: at most `max_items`, and no more than
    /// `max_bytes` of items unless the first alone is larger.
    pub(crate) fn ring_read(&mut self, from: u64, max_items: u32, max_bytes: u32) -> OpResult {
        let confirmed = self.ring_confirmed_next();
        let (head, next) = self.ring_bounds();
        let end = next.min(confirmed);
        let max_items = max_items.clamp(1, RING_READ_ITEMS_MAX) as usize;
        let mut items = Vec::new();
        let mut bytes = 0usize;
        for seq in from.max(head)..end {
            if items.len() >= max_items {
                break;
            }
            // A missing item (never expected) is skipped: the reader sees the gap in sequences.
            let Some(stored) = self.entries.get(&item_key(seq)) else { continue };
            let len = stored.value().len();
            if !items.is_empty() && bytes + len > max_bytes as usize {
                break;
            }
            bytes += len;
            items.push((seq, stored.value().to_vec()));
        }
        OpResult::RingItems { head, next: end, items }
    }

    /// Applies a batch replicated by the owner.
    pub(crate) fn apply_batch(&mut self, writes: &[RingWrite]) {
        for write in writes {
            match write {
                RingWrite::Put { key, record } => {
                    self.insert(key.clone(), record.clone());
                }
                RingWrite::Remove { key } => {
                    self.remove(key);
                }
            }
        }
    }
}

impl Node {
    /// A write's synchronous backups all confirmed it (or it has none): a ring append raises the
    /// ring's confirmed bound. Other writes need nothing.
    pub(crate) fn on_write_confirmed(&self, p: u32, map: &str, term: &Term, result: &OpResult) {
        let OpResult::RingStored { seq } = result else { return };
        let mut data = self.slot(p).data.lock().unwrap();
        if let Some(mp) = data.maps.get_mut(map) {
            mp.ring_confirm(term, seq + 1);
        }
    }
}

/// How an append treats a full ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLimits {
    /// Most items held (clamped to [`RING_CAPACITY_MAX`]).
    pub capacity: u64,
    /// Items younger than this are not overwritten unless `overwrite` is set (zero: any item
    /// may be overwritten).
    pub retention: Duration,
    /// Overwrite the oldest item even when it is retained.
    pub overwrite: bool,
}

/// The outcome of [`MapService::ring_append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingAppended {
    /// Stored with this sequence number, and confirmed by the synchronous backups.
    Stored(u64),
    /// Not stored: the ring is full of retained items; the oldest may be overwritten after this.
    Full {
        /// How long until the oldest item is no longer retained.
        retry_in: Duration,
    },
}

/// Items of a ring, from [`MapService::ring_read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPage {
    /// The oldest sequence the ring holds: a reader asking for less lost the items in between.
    pub head: u64,
    /// The sequence the next confirmed item will have.
    pub next: u64,
    /// Items `(sequence, bytes)`, in order.
    pub items: Vec<(u64, Vec<u8>)>,
}

fn ring_map(ring: &str) -> String {
    format!("{RELIABLE_TOPIC_MAP_PREFIX}{ring}")
}

fn unexpected(op: &'static str, ring: &str, result: OpResult) -> MapError {
    MapError::Failed { op, map: ring_map(ring), error: format!("unexpected result {result:?}") }
}

impl MapService {
    /// Appends `item` to the ring buffer `ring` (kept in map `__topic:<ring>`, in the partition
    /// of the name), as the partition's owner applies it; returns once the synchronous backups
    /// hold it. An error after the request went out means the outcome is unknown.
    pub async fn ring_append(&self, ring: &str, item: Vec<u8>, limits: RingLimits) -> Result<RingAppended, MapError> {
        let retention_ms = limits.retention.as_millis().min(u128::from(u64::MAX)) as u64;
        let op = Op::RingAppend {
            key: ring.as_bytes().to_vec(),
            item,
            capacity: limits.capacity,
            retention_ms,
            overwrite: limits.overwrite,
        };
        match self.node.call(&ring_map(ring), op).await? {
            OpResult::RingStored { seq } => Ok(RingAppended::Stored(seq)),
            OpResult::RingFull { retry_in_ms } => {
                Ok(RingAppended::Full { retry_in: Duration::from_millis(retry_in_ms) })
            }
            other => Err(unexpected("ring_append", ring, other)),
        }
    }

    /// Confirmed items of `ring` from sequence `from` on (at most `max_items`, about `max_bytes`).
    pub async fn ring_read(&self, ring: &str, from: u64, max_items: u32, max_bytes: u32) -> Result<RingPage, MapError> {
        let op = Op::RingRead { key: ring.as_bytes().to_vec(), from, max_items, max_bytes };
        match self.node.call(&ring_map(ring), op).await? {
            OpResult::RingItems { head, next, items } => Ok(RingPage { head, next, items }),
            other => Err(unexpected("ring_read", ring, other)),
        }
    }

    /// The partition that holds ring `ring`.
    pub fn ring_partition(&self, ring: &str) -> u32 {
        self.partition_of(ring.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn append(mp: &mut MapPartition, item: &str, capacity: u64, retention_ms: u64, now: u64) -> OpResult {
        let (result, change) = mp.ring_append(item.as_bytes().to_vec(), capacity, retention_ms, false, now);
        if let Some(change) = &change {
            assert!(matches!(change.repl, ReplOp::Batch(_)));
        }
        result
    }

    /// Reads as the owner once every append is confirmed.
    fn read(mp: &mut MapPartition, from: u64) -> (u64, u64, Vec<(u64, String)>) {
        let term = mp.term.clone();
        mp.ring_confirm(&term, u64::MAX);
        read_confirmed(mp, from)
    }

    fn read_confirmed(mp: &mut MapPartition, from: u64) -> (u64, u64, Vec<(u64, String)>) {
        match mp.ring_read(from, 100, 1 << 20) {
            OpResult::RingItems { head, next, items } => {
                (head, next, items.into_iter().map(|(s, b)| (s, String::from_utf8(b).unwrap())).collect())
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_ring_overwrites_its_oldest_item_and_readers_see_where_it_starts() {
        let mut mp = MapPartition::default();
        for (i, item) in ["a", "b", "c", "d"].iter().enumerate() {
            assert_eq!(append(&mut mp, item, 3, 0, 10), OpResult::RingStored { seq: i as u64 });
        }
        let (head, next, items) = read(&mut mp, 0);
        assert_eq!((head, next), (1, 4));
        assert_eq!(items, vec![(1, "b".into()), (2, "c".into()), (3, "d".into())]);
        assert_eq!(read(&mut mp, 3).2, vec![(3, "d".into())]);
        assert!(read(&mut mp, 4).2.is_empty());
        assert_eq!(mp.len(), 4, "three items and the bounds");
    }

    #[test]
    fn retained_items_are_not_overwritten_unless_allowed() {
        let mut mp = MapPartition::default();
        append(&mut mp, "a", 2, 1_000, 100);
        append(&mut mp, "b", 2, 1_000, 400);
        assert_eq!(append(&mut mp, "c", 2, 1_000, 600), OpResult::RingFull { retry_in_ms: 500 });
        assert_eq!(append(&mut mp, "c", 2, 1_000, 1_100), OpResult::RingStored { seq: 2 }, "a aged out");
        let (result, _) = mp.ring_append(b"d".to_vec(), 2, 1_000, true, 1_101);
        assert_eq!(result, OpResult::RingStored { seq: 3 }, "overwrite allowed");
        assert_eq!(read(&mut mp, 0).2, vec![(2, "c".into()), (3, "d".into())]);
    }

    #[test]
    fn reads_stop_at_the_confirmed_bound_of_the_term() {
        let term_a = Term { epoch: 1, publisher: None };
        let mut mp = MapPartition::new(term_a.clone());
        append(&mut mp, "a", 10, 0, 1);
        append(&mut mp, "b", 10, 0, 1);
        assert!(read_confirmed(&mut mp, 0).2.is_empty(), "nothing confirmed yet");
        mp.ring_confirm(&term_a, 1);
        assert_eq!(read_confirmed(&mut mp, 0), (0, 1, vec![(0, "a".into())]));
        // A new term (this member took over): everything held counts as confirmed.
        mp.term = Term { epoch: 2, publisher: None };
        assert_eq!(read_confirmed(&mut mp, 0).1, 2);
        append(&mut mp, "c", 10, 0, 1);
        mp.ring_confirm(&term_a, 5);
        assert_eq!(read_confirmed(&mut mp, 0).1, 2, "confirmations of an older term are ignored");
    }

    #[test]
    fn a_lowered_capacity_shrinks_the_ring_a_bounded_step_per_append() {
        let mut mp = MapPartition::default();
        for _ in 0..200 {
            append(&mut mp, "x", 1_000, 0, 1);
        }
        append(&mut mp, "y", 10, 0, 1);
        assert_eq!(mp.ring_bounds(), (EVICTIONS_PER_APPEND_MAX, 201));
        for _ in 0..10 {
            append(&mut mp, "z", 10, 0, 1);
        }
        let (head, next) = mp.ring_bounds();
        assert_eq!(next - head, 10);
    }

    proptest! {
        /// The backup that applies every replicated batch holds exactly the owner's ring.
        #[test]
        fn backups_that_apply_the_batches_hold_the_owners_ring(
            appends in prop::collection::vec((0u8..255, 1u64..6, any::<bool>()), 1..60)
        ) {
            let mut owner = MapPartition::default();
            let mut backup = MapPartition::default();
            let mut held_before = 0;
            for (i, (byte, capacity, overwrite)) in appends.into_iter().enumerate() {
                let (result, change) = owner.ring_append(vec![byte], capacity, 5, overwrite, i as u64);
                if let Some(Change { repl: ReplOp::Batch(writes), .. }) = change {
                    backup.apply_batch(&writes);
                } else {
                    let full = matches!(result, OpResult::RingFull { .. });
                    prop_assert!(full, "no change only when full: {:?}", result);
                }
                let (head, next) = owner.ring_bounds();
                prop_assert!(next - head <= capacity.max(held_before), "{} items, capacity {capacity}", next - head);
                prop_assert!((head..next).all(|seq| owner.entries.get(&item_key(seq)).is_some()), "no hole");
                prop_assert_eq!(owner.len() as u64, next - head + 1, "only the items and the bounds");
                prop_assert_eq!(backup.ring_bounds(), (head, next));
                held_before = next - head;
            }
            let mut owned: Vec<_> = owner.entries.iter().collect();
            let mut copied: Vec<_> = backup.entries.iter().collect();
            owned.sort_by(|a, b| a.0.cmp(&b.0));
            copied.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(owned, copied);
        }
    }
}
