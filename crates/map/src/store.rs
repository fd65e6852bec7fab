//! One map's entries in one partition, on one member (owner or backup), and the pure semantics
//! of every operation. Nothing here locks, sends or waits.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use hashbrown::{DefaultHashBuilder, HashTable, hash_table};

use crate::config::MapConfig;
use crate::messages::{EntryEventKind, Op, OpResult, PutMode, ReplOp};
use crate::record::{Expiry, Record, Stored};
use crate::table::Term;

/// A page of live entries (encoded key and value) and the key to continue after, if any.
pub(crate) type Page = (Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>);

/// A partition's entries: one [`Stored`] block per entry (key, value and metadata in one
/// allocation) in a hash table of 16-byte slots, so a read or a write finds its entry with one
/// hash and one key comparison and updates access statistics in place. Walks in key order
/// ([`Entries::after`]) sort what they return: a page costs a pass over the partition.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entries {
    table: HashTable<Stored>,
    hasher: DefaultHashBuilder,
}

impl Entries {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Every entry as key and record (copies: for full copies and events, not hot paths).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Vec<u8>, Record)> + '_ {
        self.table.iter().map(|s| (s.key().to_vec(), s.record()))
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Stored> {
        self.table.find(self.hash(key), |s| s.key() == key)
    }

    fn get_mut(&mut self, key: &[u8]) -> Option<&mut Stored> {
        let hash = self.hash(key);
        self.table.find_mut(hash, |s| s.key() == key)
    }

    /// Inserts or replaces the entry of the block's key; returns the replaced block.
    fn replace(&mut self, stored: Stored) -> Option<Stored> {
        let hash = self.hash(stored.key());
        let hasher = &self.hasher;
        match self.table.entry(hash, |s| s.key() == stored.key(), |s| hasher.hash_one(s.key())) {
            hash_table::Entry::Occupied(mut entry) => Some(std::mem::replace(entry.get_mut(), stored)),
            hash_table::Entry::Vacant(entry) => {
                entry.insert(stored);
                None
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Stored> {
        let hash = self.hash(key);
        let entry = self.table.find_entry(hash, |s| s.key() == key).ok()?;
        Some(entry.remove().0)
    }

    fn clear(&mut self) {
        self.table = HashTable::new();
    }

    /// Up to `limit` blocks with keys after `after`, in key order, and whether more follow.
    fn after(&self, after: Option<&[u8]>, limit: usize) -> (Vec<&Stored>, bool) {
        let mut found: Vec<&Stored> = self.table.iter().filter(|s| after.is_none_or(|a| s.key() > a)).collect();
        let more = found.len() > limit;
        if more {
            found.select_nth_unstable_by(limit, |a, b| a.key().cmp(b.key()));
            found.truncate(limit);
        }
        found.sort_unstable_by(|a, b| a.key().cmp(b.key()));
        (found, more)
    }

    fn blocks(&self) -> impl Iterator<Item = &Stored> {
        self.table.iter()
    }

    /// Every key (copies), in no particular order.
    pub(crate) fn keys(&self) -> Vec<Vec<u8>> {
        self.table.iter().map(|s| s.key().to_vec()).collect()
    }
}

/// Most removed keys a map partition remembers ([`Tombstones`]).
pub(crate) const TOMBSTONES_MAX: usize = 256;

/// Most key bytes of the removals a map partition remembers ([`Tombstones`]).
pub(crate) const TOMBSTONE_BYTES_MAX: usize = 16 << 10;

/// The latest removals of a map partition, for split-brain merges ([`crate::merge::decide_offer`]):
/// when (this member's wall clock, ms) each key was last removed, the latest
/// [`TOMBSTONES_MAX`] keys of at most [`TOMBSTONE_BYTES_MAX`] bytes (the oldest are forgotten
/// first), and when the map partition was last cleared. Kept by the owner (every removal,
/// also of an absent key), by its backups (the removals they apply, at the time they apply them)
/// and passed on with a full copy; not counted in the map's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tombstones {
    at: HashMap<Vec<u8>, u64>,
    /// Removals in the order noted; a key removed again appears again (the older one is stale).
    order: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    cleared_ms: Option<u64>,
}

impl Tombstones {
    /// Notes that `key` was removed at `ms`.
    pub(crate) fn note(&mut self, key: &[u8], ms: u64) {
        let at = self.at.entry(key.to_vec()).or_insert(ms);
        *at = (*at).max(ms);
        self.order.push_back((ms, key.to_vec()));
        self.bytes += key.len();
        while self.order.len() > TOMBSTONES_MAX || self.bytes > TOMBSTONE_BYTES_MAX {
            let Some((when, key)) = self.order.pop_front() else { break };
            self.bytes -= key.len();
            // A later removal of the key keeps it (noted twice in one millisecond, it goes now).
            if self.at.get(&key) == Some(&when) {
                self.at.remove(&key);
            }
        }
    }

    /// Notes that every key was removed at `ms` (a clear).
    pub(crate) fn clear(&mut self, ms: u64) {
        self.at.clear();
        self.order.clear();
        self.bytes = 0;
        self.cleared_ms = self.cleared_ms.max(Some(ms));
    }

    /// When `key` was last removed, as far as this member remembers.
    pub(crate) fn removed_ms(&self, key: &[u8]) -> Option<u64> {
        self.at.get(key).copied().max(self.cleared_ms)
    }

    /// What a full copy passes on: the removals remembered, oldest first, and the last clear.
    pub(crate) fn to_copy(&self) -> Removals {
        let removed = self
            .order
            .iter()
            .filter(|(when, key)| self.at.get(key) == Some(when))
            .map(|(when, key)| (key.clone(), *when))
            .collect();
        Removals { removed, cleared_ms: self.cleared_ms }
    }

    /// Takes in the removals of a full copy (each kept if later than what this member noted;
    /// bounded like any other).
    pub(crate) fn absorb(&mut self, removals: Removals) {
        let Removals { removed, cleared_ms } = removals;
        if let Some(cleared) = cleared_ms
            && self.cleared_ms < Some(cleared)
        {
            // The copy's clear covers what was noted here before it, not what came after.
            self.at.retain(|_, when| *when > cleared);
            self.order.retain(|(when, _)| *when > cleared);
            self.bytes = self.order.iter().map(|(_, key)| key.len()).sum();
            self.cleared_ms = Some(cleared);
        }
        for (key, when) in removed.into_iter().take(TOMBSTONES_MAX) {
            if self.removed_ms(&key) < Some(when) {
                self.note(&key, when);
            }
        }
    }
}

/// The removals a full copy passes on ([`Tombstones::to_copy`]), with its first chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Removals {
    /// Keys and when they were removed (the owner's clock, ms), oldest first.
    pub(crate) removed: Vec<(Vec<u8>, u64)>,
    /// When the map partition was last cleared.
    pub(crate) cleared_ms: Option<u64>,
}

/// A map partition: entries plus the replication position `(term, seq)`: the term is the owner
/// term (see [`crate::table`]) the changes came in, `seq` the last change applied in it.
#[derive(Debug, Clone, Default)]
pub(crate) struct MapPartition {
    pub(crate) entries: Entries,
    pub(crate) term: Term,
    pub(crate) seq: u64,
    memory: u64,
    /// Entries with a time to live or a maximum idle time: when there are none, expiry sweeps and
    /// live counts need not look at every entry.
    expiring: usize,
    /// A full copy arriving in chunks (see [`crate::copy`]).
    pub(crate) staging: Option<Box<crate::copy::Staging>>,
    /// A backup asked the owner for a full copy and has not received it yet.
    pub(crate) sync_requested: bool,
    /// As owner of a ring buffer (a reliable topic): the term, and the sequence below which its
    /// items are confirmed by the synchronous backups (see [`crate::ring`]).
    pub(crate) ring_confirmed: Option<(Term, u64)>,
    /// As owner: the map's counters on this member, kept here so that an operation does not look
    /// them up by name (filled by the first operation executed as owner).
    pub(crate) counters: Option<std::sync::Arc<crate::stats::MapCounters>>,
    /// The latest removals, for merges.
    pub(crate) tombstones: Tombstones,
    /// Where this copy stood when it last continued in a new term (its owner's term start):
    /// everything up to that position of that term is in it. A new owner whose copy continued
    /// in a term the winning lineage does not keep still holds the lineage up to there (see
    /// [`crate::takeover`]).
    pub(crate) continued_from: Option<(Term, u64)>,
}

/// What an executed operation changed, for replication and listeners. The event's key and value
/// are those of `repl` (not copied again: most writes have no listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) repl: ReplOp,
    pub(crate) kind: EntryEventKind,
    /// The key the event names when `repl` names none itself (a ring's batch names its ring).
    event_key: Vec<u8>,
    pub(crate) old_value: Option<Vec<u8>>,
}

impl Change {
    pub(crate) fn new(repl: ReplOp, kind: EntryEventKind, old_value: Option<Vec<u8>>) -> Change {
        Change { repl, kind, event_key: Vec::new(), old_value }
    }

    /// A change whose event names `key` although `repl` does not (a ring append).
    pub(crate) fn naming(key: Vec<u8>, repl: ReplOp, kind: EntryEventKind) -> Change {
        Change { repl, kind, event_key: key, old_value: None }
    }

    /// The key of the change's event.
    pub(crate) fn key(&self) -> &[u8] {
        match &self.repl {
            ReplOp::Put { key, .. } | ReplOp::Remove { key } | ReplOp::Expire { key } => key,
            ReplOp::Clear | ReplOp::Batch(_) => &self.event_key,
        }
    }

    /// The new value of the change's event (none for removals).
    pub(crate) fn value(&self) -> Option<&[u8]> {
        match &self.repl {
            ReplOp::Put { record, .. } => Some(&record.value),
            _ => None,
        }
    }
}

/// Redis's answers when a counter cannot be changed.
pub(crate) const NOT_AN_INTEGER: &str = "value is not an integer or out of range";
pub(crate) const OVERFLOW: &str = "increment or decrement would overflow";

/// A counter's value: a decimal integer as Redis writes it (optional `-`, no `+`, no leading zeros
/// or spaces, at most 20 characters, within `i64`).
pub(crate) fn parse_counter(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = !digits.is_empty()
        && bytes.len() <= 20
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || bytes == b"0");
    if !canonical {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

impl MapPartition {
    pub(crate) fn new(term: Term) -> Self {
        MapPartition { term, ..Default::default() }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Continues this copy, at its position, in the owner's new `term`.
    pub(crate) fn continue_in(&mut self, term: Term) {
        if self.term != term {
            self.continued_from = Some((std::mem::replace(&mut self.term, term), self.seq));
        }
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory
    }

    fn put_block(&mut self, stored: Stored) -> Option<Stored> {
        self.memory += stored.memory_bytes();
        self.expiring += usize::from(stored.expires());
        let old = self.entries.replace(stored);
        if let Some(old) = &old {
            self.memory -= old.memory_bytes();
            self.expiring -= usize::from(old.expires());
        }
        old
    }

    pub(crate) fn insert(&mut self, key: Vec<u8>, record: Record) -> Option<Stored> {
        self.put_block(Stored::encode(&key, &record))
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Stored> {
        let old = self.entries.remove(key);
        if let Some(old) = &old {
            self.memory -= old.memory_bytes();
            self.expiring -= usize::from(old.expires());
        }
        old
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.memory = 0;
        self.expiring = 0;
    }

    /// Removes every entry, as a clear of the map at `now` (remembered for merges).
    pub(crate) fn clear_at(&mut self, now: u64) {
        self.clear();
        self.tombstones.clear(now);
    }

    /// Replaces everything with a full copy at `(term, seq)`.
    pub(crate) fn install(&mut self, term: Term, seq: u64, entries: Vec<(Vec<u8>, Record)>) {
        self.clear();
        for (key, record) in entries {
            self.insert(key, record);
        }
        self.term = term;
        self.seq = seq;
        self.continued_from = None;
        self.staging = None;
        self.sync_requested = false;
        self.ring_confirmed = None;
    }

    /// Applies a replicated change on a backup.
    pub(crate) fn apply_repl(&mut self, op: &ReplOp) {
        match op {
            ReplOp::Put { key, record } => {
                self.put_block(Stored::encode(key, record));
            }
            ReplOp::Remove { key } => {
                self.remove(key);
                self.tombstones.note(key, crate::record::now_ms());
            }
            ReplOp::Expire { key } => {
                self.remove(key);
            }
            ReplOp::Clear => self.clear_at(crate::record::now_ms()),
            ReplOp::Batch(writes) => self.apply_batch(writes),
        }
    }

    /// Entries not visible to readers at `now`.
    pub(crate) fn expired_keys(&self, now: u64, idle_floor_ms: u64, owner: bool, limit: usize) -> Vec<Vec<u8>> {
        if self.expiring == 0 {
            return Vec::new();
        }
        self.entries
            .blocks()
            .filter(|s| {
                let meta = s.meta();
                if owner { meta.is_expired(now, idle_floor_ms) } else { meta.ttl_expired(now) }
            })
            .take(limit)
            .map(|s| s.key().to_vec())
            .collect()
    }

    /// Live entries (visible to readers).
    pub(crate) fn live_len(&self, now: u64, idle_floor_ms: u64) -> u64 {
        if self.expiring == 0 {
            return self.entries.len() as u64;
        }
        self.entries.blocks().filter(|s| !s.meta().is_expired(now, idle_floor_ms)).count() as u64
    }

    /// Live entries with keys after `after`, at most `limit`; and the key to continue from.
    pub(crate) fn page(&self, after: Option<&[u8]>, limit: usize, now: u64, idle_floor_ms: u64) -> Page {
        let (blocks, more) = self.entries.after(after, limit);
        let next = if more { blocks.last().map(|s| s.key().to_vec()) } else { None };
        let out = blocks
            .into_iter()
            .filter(|s| !s.meta().is_expired(now, idle_floor_ms))
            .map(|s| (s.key().to_vec(), s.value().to_vec()))
            .collect();
        (out, next)
    }

    /// The live entry of `key` (copied out), if any.
    fn live(&self, key: &[u8], now: u64, idle_floor_ms: u64) -> Option<Record> {
        let stored = self.entries.get(key)?;
        let meta = stored.meta();
        (!meta.is_expired(now, idle_floor_ms)).then(|| Record { value: stored.value().to_vec(), ..meta })
    }

    /// Executes an operation as the owner at `now`. Returns the result and the change to
    /// replicate (none for reads and for writes whose condition failed).
    pub(crate) fn execute(
        &mut self,
        op: Op,
        now: u64,
        idle_floor_ms: u64,
        config: &MapConfig,
    ) -> (OpResult, Option<Change>) {
        match op {
            Op::Get { key } => {
                let value = self.touch(&key, now, idle_floor_ms, |s| s.value().to_vec());
                (OpResult::Value(value), None)
            }
            Op::ContainsKey { key } => {
                let found = self.touch(&key, now, idle_floor_ms, |_| ()).is_some();
                (OpResult::Flag(found), None)
            }
            Op::Put { key, value, expiry, mode } => {
                self.put(key, value, mode, now, idle_floor_ms, |_| config.resolve(expiry))
            }
            Op::PutKeepTtl { key, value, mode } => self.put(key, value, mode, now, idle_floor_ms, |current| {
                current.map_or_else(|| config.resolve(None), |r| kept_expiry(r, now))
            }),
            Op::CompareAndSet { key, expected, new } => {
                let current = self.live(&key, now, idle_floor_ms);
                let current_value = current.as_ref().map(|r| &r.value);
                if current_value != expected.as_ref() {
                    return (OpResult::Flag(false), None);
                }
                let old_value = current.as_ref().map(|r| r.value.clone());
                if new.is_none() {
                    self.tombstones.note(&key, now);
                }
                let change = match new {
                    Some(value) => {
                        let record = Record::written(value, now, config.resolve(None), current.as_ref());
                        self.write(key, record, current.is_some(), old_value)
                    }
                    None if current.is_some() => self.delete(key, old_value, EntryEventKind::Removed),
                    // Expected absent and asked to remove: nothing to change.
                    None => return (OpResult::Flag(true), None),
                };
                (OpResult::Flag(true), Some(change))
            }
            Op::Remove { key } => {
                // Also for an absent key: a merge must not fill it with an entry older than this.
                self.tombstones.note(&key, now);
                let current = self.live(&key, now, idle_floor_ms);
                match current {
                    Some(record) => {
                        let change = self.delete(key, Some(record.value.clone()), EntryEventKind::Removed);
                        (OpResult::Value(Some(record.value)), Some(change))
                    }
                    None => (OpResult::Value(None), None),
                }
            }
            Op::Incr { key, delta } => {
                let current = self.live(&key, now, idle_floor_ms);
                let base = match &current {
                    Some(record) => match parse_counter(&record.value) {
                        Some(n) => n,
                        None => return (OpResult::Rejected(NOT_AN_INTEGER.into()), None),
                    },
                    None => 0,
                };
                let Some(n) = base.checked_add(delta) else {
                    return (OpResult::Rejected(OVERFLOW.into()), None);
                };
                let expiry = current.as_ref().map_or_else(|| config.resolve(None), |r| kept_expiry(r, now));
                let record = Record::written(n.to_string().into_bytes(), now, expiry, current.as_ref());
                let old_value = current.map(|r| r.value);
                let existed = old_value.is_some();
                let change = self.write(key, record, existed, old_value);
                (OpResult::Int(n), Some(change))
            }
            Op::SetTtl { key, ttl_ms } => {
                let Some(current) = self.live(&key, now, idle_floor_ms) else {
                    return (OpResult::Flag(false), None);
                };
                let ttl = match ttl_ms {
                    Some(0) => {
                        let change = self.delete(key, Some(current.value), EntryEventKind::Removed);
                        return (OpResult::Flag(true), Some(change));
                    }
                    // Counted from the last update, as every time to live: the deadline is now + ttl.
                    Some(ms) => now.saturating_add(ms).saturating_sub(current.updated_ms).max(1),
                    None if current.ttl_ms == 0 => return (OpResult::Flag(false), None),
                    None => 0,
                };
                let record = Record {
                    ttl_ms: ttl,
                    accessed_ms: now,
                    version: current.version + 1,
                    value: current.value.clone(),
                    ..current
                };
                let change = self.write(key, record, true, Some(current.value));
                (OpResult::Flag(true), Some(change))
            }
            Op::Ttl { key } => {
                let remaining = match self.entries.get(&key).map(Stored::meta) {
                    Some(meta) if !meta.is_expired(now, idle_floor_ms) => match meta.expires_at_ms(idle_floor_ms) {
                        Some(at) => at.saturating_sub(now).min(i64::MAX as u64) as i64,
                        None => -1,
                    },
                    _ => -2,
                };
                (OpResult::Int(remaining), None)
            }
            Op::Merge { key, record, policy, offer } => {
                let current = self.live(&key, now, idle_floor_ms);
                let removed = self.tombstones.removed_ms(&key);
                let verdict = crate::merge::decide_offer(policy, current.as_ref(), removed, &record, offer, now);
                if verdict == crate::merge::Verdict::KeepExisting {
                    return (OpResult::Flag(false), None);
                }
                // The merging entry keeps its own times, hits and expiry (so a later merge or the
                // expiry sweep judges it as its side did); its version continues past both.
                let version = current.as_ref().map_or(0, |c| c.version).max(record.version).saturating_add(1);
                let old_value = current.map(|c| c.value);
                let existed = old_value.is_some();
                let change = self.write(key, Record { version, ..record }, existed, old_value);
                (OpResult::Flag(true), Some(change))
            }
            Op::NearGet { key } => {
                let value = self.touch(&key, now, idle_floor_ms, |s| s.value().to_vec());
                (OpResult::Positioned { value, term: self.term.clone(), seq: self.seq }, None)
            }
            Op::RingAppend { item, capacity, retention_ms, overwrite, .. } => {
                self.ring_append(item, capacity, retention_ms, overwrite, now)
            }
            Op::RingRead { from, max_items, max_bytes, .. } => (self.ring_read(from, max_items, max_bytes), None),
        }
    }

    /// A put of any mode; `expiry` gives the new entry's expiry from the current live record.
    fn put(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        mode: PutMode,
        now: u64,
        idle_floor_ms: u64,
        expiry: impl FnOnce(Option<&Record>) -> Expiry,
    ) -> (OpResult, Option<Change>) {
        let current = self.live(&key, now, idle_floor_ms);
        let applies = match mode {
            PutMode::Always => true,
            PutMode::IfAbsent => current.is_none(),
            PutMode::IfPresent => current.is_some(),
        };
        let existed = current.is_some();
        let expiry = expiry(current.as_ref());
        let record = Record::written(value, now, expiry, current.as_ref());
        let old_value = current.map(|r| r.value);
        if !applies {
            return (OpResult::Value(old_value), None);
        }
        let change = self.write(key, record, existed, old_value.clone());
        (OpResult::Value(old_value), Some(change))
    }

    /// Removes an expired entry as the owner, returning the change to replicate.
    pub(crate) fn expire(&mut self, key: Vec<u8>) -> Option<Change> {
        let old = self.entries.get(&key)?.value().to_vec();
        Some(self.delete(key, Some(old), EntryEventKind::Expired))
    }

    /// A read on the owner: counts a hit and the access time, and returns `read` of the entry.
    fn touch<T>(&mut self, key: &[u8], now: u64, idle_floor_ms: u64, read: impl FnOnce(&Stored) -> T) -> Option<T> {
        let stored = self.entries.get_mut(key)?;
        let mut meta = stored.meta();
        if meta.is_expired(now, idle_floor_ms) {
            return None;
        }
        let out = read(stored);
        meta.accessed_ms = now;
        meta.hits += 1;
        let before = stored.memory_bytes();
        stored.set_meta(&meta);
        let after = stored.memory_bytes();
        self.memory = self.memory + after - before;
        Some(out)
    }

    fn write(&mut self, key: Vec<u8>, record: Record, existed: bool, old_value: Option<Vec<u8>>) -> Change {
        self.put_block(Stored::encode(&key, &record));
        let kind = if existed { EntryEventKind::Updated } else { EntryEventKind::Added };
        Change::new(ReplOp::Put { key, record }, kind, old_value)
    }

    fn delete(&mut self, key: Vec<u8>, old_value: Option<Vec<u8>>, kind: EntryEventKind) -> Change {
        self.remove(&key);
        let repl = if kind == EntryEventKind::Expired { ReplOp::Expire { key } } else { ReplOp::Remove { key } };
        Change::new(repl, kind, old_value)
    }
}

/// The expiry of a rewrite that keeps `current`'s: the same time-to-live deadline (counted again
/// from `now`, the new update time) and the same maximum idle time.
fn kept_expiry(current: &Record, now: u64) -> Expiry {
    let ttl = current.ttl_deadline_ms().map(|deadline| Duration::from_millis(deadline.saturating_sub(now).max(1)));
    let max_idle = (current.max_idle_ms > 0).then(|| Duration::from_millis(current.max_idle_ms));
    // `Some(ZERO)` means "none" rather than "the map's default".
    Expiry { ttl: Some(ttl.unwrap_or(Duration::ZERO)), max_idle: Some(max_idle.unwrap_or(Duration::ZERO)) }
}

impl MapConfig {
    /// The expiry an entry gets: explicit values win, missing ones come from the map's defaults,
    /// and zero durations mean "never".
    pub(crate) fn resolve(&self, expiry: Option<Expiry>) -> Expiry {
        let expiry = expiry.unwrap_or_default();
        let pick = |explicit: Option<Duration>, default_s: u64| match explicit {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None if default_s > 0 => Some(Duration::from_secs(default_s)),
            None => None,
        };
        Expiry { ttl: pick(expiry.ttl, self.ttl_seconds), max_idle: pick(expiry.max_idle, self.max_idle_seconds) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::MergePolicy;

    fn put(key: &str, value: &str, mode: PutMode) -> Op {
        Op::Put { key: key.into(), value: value.into(), expiry: None, mode }
    }

    fn exec(mp: &mut MapPartition, op: Op, now: u64) -> (OpResult, Option<Change>) {
        mp.execute(op, now, 0, &MapConfig::default())
    }

    #[test]
    fn a_copy_remembers_where_it_continued_into_its_term() {
        let first = Term { epoch: 3, publisher: None };
        let next = Term { epoch: 7, publisher: None };
        let mut mp = MapPartition::new(first.clone());
        mp.seq = 12;
        mp.continue_in(first.clone());
        assert_eq!(mp.continued_from, None, "the same term is no continuation");
        mp.continue_in(next.clone());
        assert_eq!((&mp.term, mp.seq, &mp.continued_from), (&next, 12, &Some((first.clone(), 12))));
        // A full copy replaces the whole history.
        mp.install(first, 4, Vec::new());
        assert_eq!(mp.continued_from, None);
    }

    #[test]
    fn put_get_remove_report_previous_values_and_changes() {
        let mut mp = MapPartition::default();
        let (r, c) = exec(&mut mp, put("k", "a", PutMode::Always), 10);
        assert_eq!(r, OpResult::Value(None));
        assert_eq!(c.unwrap().kind, EntryEventKind::Added);
        let (r, c) = exec(&mut mp, put("k", "b", PutMode::Always), 11);
        assert_eq!(r, OpResult::Value(Some(b"a".to_vec())));
        assert_eq!(c.unwrap().kind, EntryEventKind::Updated);
        assert_eq!(exec(&mut mp, Op::Get { key: b"k".to_vec() }, 12).0, OpResult::Value(Some(b"b".to_vec())));
        assert_eq!(mp.entries.get(b"k").unwrap().meta().hits, 1);
        let (r, c) = exec(&mut mp, Op::Remove { key: b"k".to_vec() }, 13);
        assert_eq!(r, OpResult::Value(Some(b"b".to_vec())));
        assert_eq!(c.unwrap().repl, ReplOp::Remove { key: b"k".to_vec() });
        assert!(exec(&mut mp, Op::Remove { key: b"k".to_vec() }, 14).1.is_none());
        assert_eq!(mp.memory_bytes(), 0);
    }

    #[test]
    fn conditional_writes_only_change_when_the_condition_holds() {
        let mut mp = MapPartition::default();
        assert!(exec(&mut mp, put("k", "a", PutMode::IfPresent), 1).1.is_none());
        assert!(exec(&mut mp, put("k", "a", PutMode::IfAbsent), 2).1.is_some());
        let (r, c) = exec(&mut mp, put("k", "b", PutMode::IfAbsent), 3);
        assert_eq!((r, c), (OpResult::Value(Some(b"a".to_vec())), None));
        let cas = |expected: Option<&str>, new: Option<&str>| Op::CompareAndSet {
            key: b"k".to_vec(),
            expected: expected.map(Into::into),
            new: new.map(Into::into),
        };
        assert_eq!(exec(&mut mp, cas(Some("x"), Some("c")), 4).0, OpResult::Flag(false));
        assert_eq!(exec(&mut mp, cas(Some("a"), Some("c")), 5).0, OpResult::Flag(true));
        assert_eq!(exec(&mut mp, cas(Some("c"), None), 6).0, OpResult::Flag(true));
        assert!(mp.entries.is_empty());
        assert_eq!(exec(&mut mp, cas(None, Some("d")), 7).0, OpResult::Flag(true));
    }

    #[test]
    fn expired_entries_are_invisible_at_once_and_can_be_rewritten() {
        let mut mp = MapPartition::default();
        let op = Op::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            expiry: Some(Expiry::ttl(Duration::from_millis(100))),
            mode: PutMode::Always,
        };
        exec(&mut mp, op, 1_000);
        assert_eq!(exec(&mut mp, Op::Get { key: b"k".to_vec() }, 1_099).0, OpResult::Value(Some(b"v".to_vec())));
        assert_eq!(exec(&mut mp, Op::Get { key: b"k".to_vec() }, 1_100).0, OpResult::Value(None));
        assert_eq!(mp.live_len(1_100, 0), 0);
        assert_eq!(mp.expired_keys(1_100, 0, true, 10), vec![b"k".to_vec()]);
        let (r, c) = exec(&mut mp, put("k", "w", PutMode::IfAbsent), 1_200);
        assert_eq!(r, OpResult::Value(None));
        assert_eq!(c.unwrap().kind, EntryEventKind::Added, "an expired key counts as absent");
    }

    #[test]
    fn map_defaults_apply_unless_the_caller_says_otherwise() {
        let config = MapConfig { ttl_seconds: 10, max_idle_seconds: 5, ..MapConfig::default() };
        assert_eq!(
            config.resolve(None),
            Expiry { ttl: Some(Duration::from_secs(10)), max_idle: Some(Duration::from_secs(5)) }
        );
        assert_eq!(config.resolve(Some(Expiry::ttl(Duration::from_secs(1)))).ttl, Some(Duration::from_secs(1)));
        assert_eq!(config.resolve(Some(Expiry::never())), Expiry::default());
    }

    fn key(k: &str) -> Vec<u8> {
        k.as_bytes().to_vec()
    }

    fn put_ttl(k: &str, v: &str, ttl_ms: u64) -> Op {
        Op::Put {
            key: key(k),
            value: key(v),
            expiry: Some(Expiry::ttl(Duration::from_millis(ttl_ms))),
            mode: PutMode::Always,
        }
    }

    fn ttl_of(mp: &mut MapPartition, k: &str, now: u64) -> OpResult {
        exec(mp, Op::Ttl { key: key(k) }, now).0
    }

    #[test]
    fn counters_count_from_zero_keep_their_expiry_and_refuse_what_is_not_an_integer() {
        let mut mp = MapPartition::default();
        let incr = |k: &str, delta| Op::Incr { key: key(k), delta };
        let (r, c) = exec(&mut mp, incr("n", 5), 1_000);
        assert_eq!(r, OpResult::Int(5));
        let c = c.unwrap();
        assert_eq!(c.kind, EntryEventKind::Added);
        assert!(matches!(c.repl, ReplOp::Put { ref record, .. } if record.value == b"5"), "replicated as a put");
        assert_eq!(exec(&mut mp, incr("n", -7), 1_001).0, OpResult::Int(-2));
        assert_eq!(exec(&mut mp, Op::Get { key: key("n") }, 1_002).0, OpResult::Value(Some(key("-2"))));

        exec(&mut mp, put_ttl("t", "10", 1_000), 2_000);
        assert_eq!(exec(&mut mp, incr("t", 1), 2_400).0, OpResult::Int(11));
        assert_eq!(ttl_of(&mut mp, "t", 2_400), OpResult::Int(600), "the deadline stays at 3000");
        assert_eq!(exec(&mut mp, Op::Get { key: key("t") }, 3_000).0, OpResult::Value(None));

        for bad in ["abc", "", " 1", "+1", "01", "-0", "1.5", "99999999999999999999"] {
            exec(&mut mp, put("b", bad, PutMode::Always), 4_000);
            let (r, c) = exec(&mut mp, incr("b", 1), 4_001);
            assert_eq!((r, c), (OpResult::Rejected(NOT_AN_INTEGER.into()), None), "{bad:?}");
        }
        exec(&mut mp, put("m", &i64::MAX.to_string(), PutMode::Always), 5_000);
        assert_eq!(exec(&mut mp, incr("m", 1), 5_001), (OpResult::Rejected(OVERFLOW.into()), None));
        assert_eq!(exec(&mut mp, incr("m", -1), 5_002).0, OpResult::Int(i64::MAX - 1));
    }

    #[test]
    fn ttls_can_be_set_read_and_removed_on_present_entries_only() {
        let mut mp = MapPartition::default();
        let set_ttl = |k: &str, ttl_ms| Op::SetTtl { key: key(k), ttl_ms };
        assert_eq!(ttl_of(&mut mp, "k", 1_000), OpResult::Int(-2), "absent");
        assert_eq!(exec(&mut mp, set_ttl("k", Some(100)), 1_000), (OpResult::Flag(false), None));
        exec(&mut mp, put("k", "v", PutMode::Always), 1_000);
        assert_eq!(ttl_of(&mut mp, "k", 1_500), OpResult::Int(-1), "no expiry");
        let (r, c) = exec(&mut mp, set_ttl("k", Some(300)), 2_000);
        assert_eq!(r, OpResult::Flag(true));
        let Some(Change { repl: ReplOp::Put { record, .. }, .. }) = c else { panic!("replicated as a put") };
        assert_eq!((record.updated_ms, record.ttl_deadline_ms(), record.version), (1_000, Some(2_300), 2));
        assert_eq!(ttl_of(&mut mp, "k", 2_100), OpResult::Int(200));
        assert_eq!(exec(&mut mp, set_ttl("k", None), 2_200).0, OpResult::Flag(true), "persist");
        assert_eq!(exec(&mut mp, set_ttl("k", None), 2_201), (OpResult::Flag(false), None), "already persistent");
        assert_eq!(ttl_of(&mut mp, "k", 9_000), OpResult::Int(-1));
        let (r, c) = exec(&mut mp, set_ttl("k", Some(0)), 9_000);
        assert_eq!((r, c.unwrap().repl), (OpResult::Flag(true), ReplOp::Remove { key: key("k") }), "0 expires it now");
        assert_eq!(exec(&mut mp, Op::Get { key: key("k") }, 9_001).0, OpResult::Value(None));
    }

    #[test]
    fn a_put_that_keeps_the_ttl_keeps_the_deadline_and_otherwise_uses_the_defaults() {
        let mut mp = MapPartition::default();
        let keep = |k: &str, v: &str| Op::PutKeepTtl { key: key(k), value: key(v), mode: PutMode::Always };
        exec(&mut mp, put_ttl("k", "a", 1_000), 10_000);
        let (r, _) = exec(&mut mp, keep("k", "b"), 10_400);
        assert_eq!(r, OpResult::Value(Some(key("a"))));
        assert_eq!(ttl_of(&mut mp, "k", 10_500), OpResult::Int(500));
        exec(&mut mp, put("k", "c", PutMode::Always), 10_600);
        assert_eq!(ttl_of(&mut mp, "k", 10_700), OpResult::Int(-1), "a plain put drops the ttl");
        let config = MapConfig { ttl_seconds: 7, ..MapConfig::default() };
        mp.execute(keep("new", "x"), 20_000, 0, &config);
        assert_eq!(ttl_of(&mut mp, "new", 20_000), OpResult::Int(7_000), "absent: the map's default ttl");
    }

    #[test]
    fn memory_follows_inserts_rewrites_and_removes() {
        let mut mp = MapPartition::default();
        for i in 0..100u32 {
            exec(&mut mp, put(&format!("key:{i:08}"), &"v".repeat(100), PutMode::Always), 1);
        }
        let per_entry = mp.memory_bytes() / 100;
        assert!((150..=200).contains(&per_entry), "{per_entry} B per entry");
        for i in 0..100u32 {
            exec(&mut mp, Op::Get { key: key(&format!("key:{i:08}")) }, 2);
            exec(&mut mp, Op::Remove { key: key(&format!("key:{i:08}")) }, 3);
        }
        assert_eq!(mp.memory_bytes(), 0);
    }

    #[test]
    fn entries_with_an_expiry_are_counted_so_sweeps_can_skip_partitions_without_any() {
        let mut mp = MapPartition::default();
        exec(&mut mp, put("a", "v", PutMode::Always), 1_000);
        assert_eq!((mp.expiring, mp.live_len(1_000, 0)), (0, 1));
        exec(&mut mp, put_ttl("b", "v", 100), 1_000);
        exec(&mut mp, Op::SetTtl { key: key("a"), ttl_ms: Some(50) }, 1_000);
        assert_eq!(mp.expiring, 2);
        assert_eq!(mp.live_len(1_060, 0), 1);
        assert_eq!(mp.expired_keys(1_200, 0, true, 10).len(), 2);
        exec(&mut mp, Op::SetTtl { key: key("b"), ttl_ms: None }, 1_050);
        exec(&mut mp, put("a", "w", PutMode::Always), 1_050);
        assert_eq!(mp.expiring, 0, "persisted and rewritten without ttl");
        exec(&mut mp, put_ttl("c", "v", 100), 1_000);
        exec(&mut mp, Op::Remove { key: key("c") }, 1_001);
        assert_eq!(mp.expiring, 0);
        exec(&mut mp, put_ttl("d", "v", 100), 1_000);
        mp.clear();
        assert_eq!((mp.expiring, mp.memory_bytes()), (0, 0));
    }

    fn merging(value: &str, updated_ms: u64, hits: u64) -> Record {
        Record {
            value: key(value),
            created_ms: updated_ms - 100,
            updated_ms,
            accessed_ms: updated_ms,
            hits,
            version: 3,
            ttl_ms: 0,
            max_idle_ms: 0,
        }
    }

    fn merge(
        mp: &mut MapPartition,
        k: &str,
        record: &Record,
        policy: MergePolicy,
        now: u64,
    ) -> (OpResult, Option<Change>) {
        exec(mp, Op::Merge { key: key(k), record: record.clone(), policy, offer: Default::default() }, now)
    }

    #[test]
    fn removals_are_remembered_for_latest_update_merges_within_their_bounds() {
        let mut mp = MapPartition::default();
        exec(&mut mp, put("k", "mine", PutMode::Always), 1_000);
        exec(&mut mp, Op::Remove { key: key("k") }, 2_000);
        exec(&mut mp, Op::Remove { key: key("never") }, 2_100);
        let cas = Op::CompareAndSet { key: key("cas"), expected: None, new: None };
        exec(&mut mp, cas, 2_200);
        assert_eq!(mp.tombstones.removed_ms(&key("k")), Some(2_000));
        assert_eq!(mp.tombstones.removed_ms(&key("never")), Some(2_100), "also a key that was absent");
        assert_eq!(mp.tombstones.removed_ms(&key("cas")), Some(2_200));
        // Written before the removal: not brought back by latest-update; the others fill it.
        let before = merging("theirs", 1_500, 0);
        assert_eq!(merge(&mut mp, "k", &before, MergePolicy::LatestUpdate, 3_000), (OpResult::Flag(false), None));
        assert_eq!(
            merge(&mut mp, "never", &merging("x", 2_500, 0), MergePolicy::LatestUpdate, 3_000).0,
            OpResult::Flag(true)
        );
        assert_eq!(merge(&mut mp, "k", &before, MergePolicy::PutIfAbsent, 3_000).0, OpResult::Flag(true));
        // A clear removes every key at once.
        mp.clear_at(4_000);
        assert_eq!(mp.tombstones.removed_ms(&key("other")), Some(4_000));
        assert_eq!(
            merge(&mut mp, "other", &merging("y", 3_900, 0), MergePolicy::LatestUpdate, 5_000).0,
            OpResult::Flag(false)
        );
        // A backup notes the removals it applies.
        let mut backup = MapPartition::default();
        backup.apply_repl(&ReplOp::Remove { key: key("b") });
        assert!(backup.tombstones.removed_ms(&key("b")).is_some());
        backup.apply_repl(&ReplOp::Expire { key: key("e") });
        assert_eq!(backup.tombstones.removed_ms(&key("e")), None, "an expiry is no removal");
        // Bounded in keys and bytes, the oldest forgotten first.
        let mut t = Tombstones::default();
        for i in 0..(TOMBSTONES_MAX as u64 + 10) {
            t.note(&i.to_be_bytes(), i);
        }
        assert_eq!(t.at.len(), TOMBSTONES_MAX);
        assert_eq!(t.removed_ms(&0u64.to_be_bytes()), None);
        assert_eq!(t.removed_ms(&(TOMBSTONES_MAX as u64 + 9).to_be_bytes()), Some(TOMBSTONES_MAX as u64 + 9));
        t.note(&[7u8; TOMBSTONE_BYTES_MAX], 10_000);
        assert!(t.bytes <= TOMBSTONE_BYTES_MAX && t.at.len() <= 1, "a huge key pushes the others out");
        // Removed again: the latest time counts, and an older note of the key does not evict it.
        let mut t = Tombstones::default();
        t.note(b"a", 1);
        t.note(b"a", 5);
        for i in 0..(TOMBSTONES_MAX as u64 - 1) {
            t.note(&i.to_be_bytes(), 10 + i);
        }
        assert_eq!(t.removed_ms(b"a"), Some(5));
        // What a copy passes on arrives whole.
        let mut copied = Tombstones::default();
        copied.absorb(t.to_copy());
        assert_eq!(copied.removed_ms(b"a"), Some(5));
        assert_eq!(copied.at, t.at);
        // A copied clear covers the removals noted before it, not a later one.
        let mut replica = Tombstones::default();
        replica.note(b"old", 10);
        replica.note(b"new", 30);
        replica.absorb(Removals { removed: vec![], cleared_ms: Some(20) });
        assert_eq!((replica.removed_ms(b"old"), replica.removed_ms(b"new")), (Some(20), Some(30)));
        assert_eq!(replica.bytes, 3);
    }

    #[test]
    fn a_merge_keeps_or_takes_as_the_policy_says_and_replicates_only_what_it_takes() {
        let mut mp = MapPartition::default();
        exec(&mut mp, put("k", "mine", PutMode::Always), 1_000);
        let newer = merging("theirs", 2_000, 0);
        let (r, c) = merge(&mut mp, "k", &newer, MergePolicy::LatestUpdate, 3_000);
        assert_eq!(r, OpResult::Flag(true));
        let c = c.expect("a taken entry is replicated");
        assert_eq!((c.kind, c.old_value.as_deref()), (EntryEventKind::Updated, Some(&b"mine"[..])));
        let ReplOp::Put { record, .. } = c.repl else { panic!("replicated as a put") };
        assert_eq!(record, Record { version: 4, ..newer.clone() }, "its own times, a version past both");
        let older = merging("stale", 500, 0);
        assert_eq!(merge(&mut mp, "k", &older, MergePolicy::LatestUpdate, 3_000), (OpResult::Flag(false), None));
        assert_eq!(merge(&mut mp, "k", &older, MergePolicy::PutIfAbsent, 3_000), (OpResult::Flag(false), None));
        assert_eq!(merge(&mut mp, "k", &older, MergePolicy::Discard, 3_000), (OpResult::Flag(false), None));
        assert_eq!(exec(&mut mp, Op::Get { key: key("k") }, 3_001).0, OpResult::Value(Some(key("theirs"))));

        let (r, c) = merge(&mut mp, "k", &older, MergePolicy::PassThrough, 3_002);
        assert_eq!(
            (r, c.map(|c| c.value().map(<[u8]>::to_vec))),
            (OpResult::Flag(true), Some(Some(key("stale")))),
            "even an older one"
        );

        // The merged entry came with its own hit count (0); one read makes it 1. Under higher-hits
        // an entry with fewer hits does not replace it, one with more does.
        exec(&mut mp, Op::Get { key: key("k") }, 3_003);
        assert_eq!(
            merge(&mut mp, "k", &merging("few", 900, 0), MergePolicy::HigherHits, 3_003).0,
            OpResult::Flag(false)
        );
        assert_eq!(
            merge(&mut mp, "k", &merging("many", 900, 7), MergePolicy::HigherHits, 3_004).0,
            OpResult::Flag(true)
        );

        let (r, c) = merge(&mut mp, "new", &older, MergePolicy::PutIfAbsent, 3_005);
        assert_eq!((r, c.map(|c| c.kind)), (OpResult::Flag(true), Some(EntryEventKind::Added)));
        assert_eq!(merge(&mut mp, "absent", &older, MergePolicy::Discard, 3_006), (OpResult::Flag(false), None));
        assert_eq!(exec(&mut mp, Op::ContainsKey { key: key("absent") }, 3_007).0, OpResult::Flag(false));
    }

    #[test]
    fn an_expired_merging_entry_is_never_stored_and_an_expired_existing_one_counts_as_absent() {
        let mut mp = MapPartition::default();
        let expired = Record { ttl_ms: 100, ..merging("old", 1_000, 0) };
        assert_eq!(merge(&mut mp, "k", &expired, MergePolicy::PassThrough, 1_100), (OpResult::Flag(false), None));
        assert_eq!(mp.len(), 0);
        exec(&mut mp, put_ttl("k", "mine", 100), 1_000);
        let (r, c) = merge(&mut mp, "k", &merging("theirs", 900, 0), MergePolicy::PutIfAbsent, 1_200);
        assert_eq!((r, c.map(|c| c.kind)), (OpResult::Flag(true), Some(EntryEventKind::Added)), "mine expired at 1100");
    }

    #[test]
    fn pages_walk_every_live_entry_once_in_key_order() {
        let mut mp = MapPartition::default();
        for i in 0..25u8 {
            mp.insert(vec![i], Record::written(vec![i], 1, Expiry::default(), None));
        }
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, next) = mp.page(after.as_deref(), 10, 2, 0);
            seen.extend(page.into_iter().map(|(k, _)| k[0]));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, (0..25).collect::<Vec<u8>>());
    }
}
