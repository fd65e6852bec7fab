//! One map's entries in one partition, on one member (owner or backup), and the pure semantics
//! of every operation. Nothing here locks, sends or waits.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::MapConfig;
use crate::messages::{EntryEventKind, Op, OpResult, PutMode, ReplOp};
use crate::record::{Expiry, Record};
use crate::table::Term;

/// A page of live entries (encoded key and value) and the key to continue after, if any.
pub(crate) type Page = (Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>);

/// A map partition: entries plus the replication position `(term, seq)`: the term is the owner
/// term (see [`crate::table`]) the changes came in, `seq` the last change applied in it.
#[derive(Debug, Clone, Default)]
pub(crate) struct MapPartition {
    pub(crate) entries: BTreeMap<Vec<u8>, Record>,
    pub(crate) term: Term,
    pub(crate) seq: u64,
    memory: u64,
    /// A full copy arriving in chunks (see [`crate::copy`]).
    pub(crate) staging: Option<Box<crate::copy::Staging>>,
    /// A backup asked the owner for a full copy and has not received it yet.
    pub(crate) sync_requested: bool,
}

/// What an executed operation changed, for replication and listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) repl: ReplOp,
    pub(crate) kind: EntryEventKind,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) old_value: Option<Vec<u8>>,
}

impl MapPartition {
    pub(crate) fn new(term: Term) -> Self {
        MapPartition { term, ..Default::default() }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory
    }

    pub(crate) fn insert(&mut self, key: Vec<u8>, record: Record) -> Option<Record> {
        self.memory += record.memory_bytes(key.len());
        let key_len = key.len();
        let old = self.entries.insert(key, record);
        if let Some(old) = &old {
            self.memory -= old.memory_bytes(key_len);
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Record> {
        let old = self.entries.remove(key);
        if let Some(old) = &old {
            self.memory -= old.memory_bytes(key.len());
        }
        old
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.memory = 0;
    }

    /// Replaces everything with a full copy at `(term, seq)`.
    pub(crate) fn install(&mut self, term: Term, seq: u64, entries: Vec<(Vec<u8>, Record)>) {
        self.clear();
        for (key, record) in entries {
            self.insert(key, record);
        }
        self.term = term;
        self.seq = seq;
        self.staging = None;
        self.sync_requested = false;
    }

    /// Applies a replicated change on a backup.
    pub(crate) fn apply_repl(&mut self, op: &ReplOp) {
        match op {
            ReplOp::Put { key, record } => {
                self.insert(key.clone(), record.clone());
            }
            ReplOp::Remove { key } | ReplOp::Expire { key } => {
                self.remove(key);
            }
            ReplOp::Clear => self.clear(),
        }
    }

    /// Entries not visible to readers at `now`.
    pub(crate) fn expired_keys(&self, now: u64, idle_floor_ms: u64, owner: bool, limit: usize) -> Vec<Vec<u8>> {
        self.entries
            .iter()
            .filter(|(_, r)| if owner { r.is_expired(now, idle_floor_ms) } else { r.ttl_expired(now) })
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Live entries (visible to readers).
    pub(crate) fn live_len(&self, now: u64, idle_floor_ms: u64) -> u64 {
        self.entries.values().filter(|r| !r.is_expired(now, idle_floor_ms)).count() as u64
    }

    /// Live entries with keys after `after`, at most `limit`; and the key to continue from.
    pub(crate) fn page(&self, after: Option<&[u8]>, limit: usize, now: u64, idle_floor_ms: u64) -> Page {
        use std::ops::Bound;
        let lower = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut last = None;
        for (key, record) in self.entries.range((lower, Bound::Unbounded)) {
            if out.len() >= limit {
                return (out, last);
            }
            last = Some(key.clone());
            if !record.is_expired(now, idle_floor_ms) {
                out.push((key.clone(), record.value.clone()));
            }
        }
        (out, None)
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
        let live = |entries: &BTreeMap<Vec<u8>, Record>, key: &[u8]| {
            entries.get(key).filter(|r| !r.is_expired(now, idle_floor_ms)).cloned()
        };
        match op {
            Op::Get { key } => {
                let value = self.touch(&key, now, idle_floor_ms).map(|r| r.value.clone());
                (OpResult::Value(value), None)
            }
            Op::ContainsKey { key } => {
                let found = self.touch(&key, now, idle_floor_ms).is_some();
                (OpResult::Flag(found), None)
            }
            Op::Put { key, value, expiry, mode } => {
                let current = live(&self.entries, &key);
                let applies = match mode {
                    PutMode::Always => true,
                    PutMode::IfAbsent => current.is_none(),
                    PutMode::IfPresent => current.is_some(),
                };
                let old_value = current.as_ref().map(|r| r.value.clone());
                if !applies {
                    return (OpResult::Value(old_value), None);
                }
                let record = Record::written(value.clone(), now, config.resolve(expiry), current.as_ref());
                let change = self.write(key, record, current.is_some(), old_value.clone());
                (OpResult::Value(old_value), Some(change))
            }
            Op::CompareAndSet { key, expected, new } => {
                let current = live(&self.entries, &key);
                let current_value = current.as_ref().map(|r| &r.value);
                if current_value != expected.as_ref() {
                    return (OpResult::Flag(false), None);
                }
                let old_value = current.as_ref().map(|r| r.value.clone());
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
                let current = live(&self.entries, &key);
                match current {
                    Some(record) => {
                        let change = self.delete(key, Some(record.value.clone()), EntryEventKind::Removed);
                        (OpResult::Value(Some(record.value)), Some(change))
                    }
                    None => (OpResult::Value(None), None),
                }
            }
        }
    }

    /// Removes an expired entry as the owner, returning the change to replicate.
    pub(crate) fn expire(&mut self, key: Vec<u8>) -> Option<Change> {
        let old = self.entries.get(&key)?.value.clone();
        Some(self.delete(key, Some(old), EntryEventKind::Expired))
    }

    fn touch(&mut self, key: &[u8], now: u64, idle_floor_ms: u64) -> Option<&Record> {
        let record = self.entries.get_mut(key).filter(|r| !r.is_expired(now, idle_floor_ms))?;
        record.accessed_ms = now;
        record.hits += 1;
        Some(record)
    }

    fn write(&mut self, key: Vec<u8>, record: Record, existed: bool, old_value: Option<Vec<u8>>) -> Change {
        let value = Some(record.value.clone());
        self.insert(key.clone(), record.clone());
        let kind = if existed { EntryEventKind::Updated } else { EntryEventKind::Added };
        Change { repl: ReplOp::Put { key: key.clone(), record }, kind, key, value, old_value }
    }

    fn delete(&mut self, key: Vec<u8>, old_value: Option<Vec<u8>>, kind: EntryEventKind) -> Change {
        self.remove(&key);
        let repl = if kind == EntryEventKind::Expired {
            ReplOp::Expire { key: key.clone() }
        } else {
            ReplOp::Remove { key: key.clone() }
        };
        Change { repl, kind, key, value: None, old_value }
    }
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

    fn put(key: &str, value: &str, mode: PutMode) -> Op {
        Op::Put { key: key.into(), value: value.into(), expiry: None, mode }
    }

    fn exec(mp: &mut MapPartition, op: Op, now: u64) -> (OpResult, Option<Change>) {
        mp.execute(op, now, 0, &MapConfig::default())
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
        assert_eq!(mp.entries[&b"k".to_vec()].hits, 1);
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
