//! Near caches: a bounded local copy of the entries a member read from other members' partitions,
//! kept fresh by the owners' invalidation events ([`crate::invalidation`]).
//!
//! **What may be cached.** A read for a near cache (`Op::NearGet`) returns the value with the map
//! partition's position `(term, seq)` at the moment it was read. Each partition has a [`Track`]:
//! the owner's term and the last change sequence this member has heard of (from an event, or from
//! the owner's periodic position report). A value is cached only when the track is live (heard
//! from that owner within the liveness time), in the same term, and not past the read's position:
//! every later change then still has to reach the track, which removes the key, or shows up as a
//! gap, which purges the partition. A value is never cached from a partition this member owns.
//!
//! **Purges.** Any doubt drops every cached entry of a partition at once (a generation bump, so
//! the purge is O(1) and the entries are reclaimed in the background): a change sequence that is
//! not the next one (an event was lost), a position report ahead of what was heard, another term
//! (the partition changed owner), events from a member that is not the owner under this member's
//! table, a new table that names another owner, or an owner silent for longer than the liveness
//! time (three report intervals: the connection to it is lost, or it never heard of this cache).
//! Hazelcast only repairs after ten missed invalidations and reconciles once a minute; its tracker
//! has reports of entries stale indefinitely under that threshold, so here any gap purges.
//!
//! Without event invalidation (`event_invalidation = false`, or the map's `invalidate_on_change =
//! false`) no track is kept and entries only expire by the near cache's time to live.
//!
//! The decisions are pure functions of [`Track`]; [`NearCache`] applies them under one lock per
//! cache, which is also held while a value is inserted, so an event is never processed between a
//! read's check and its insertion.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use grapevine_membership::MemberId;
use moka::policy::EvictionPolicy;
use serde::{Deserialize, Serialize};

use crate::config::NearCacheConfig;
use crate::table::{PartitionTable, Term};

/// What the near cache heard last from a partition's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The owner's term.
    pub(crate) term: Term,
    /// The last change sequence heard of in that term.
    pub(crate) seen: u64,
    /// When the owner was last heard from (ms).
    pub(crate) heard_ms: u64,
}

/// One partition as a near cache knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Track {
    pub(crate) source: Option<Source>,
}

/// What to do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Drop the changed key (or nothing, for a position report).
    Keep,
    /// Drop every entry of the partition.
    Purge,
}

impl Track {
    /// A change at `seq` in `term`, reported by the partition's owner at `now_ms`.
    pub(crate) fn on_change(&mut self, term: &Term, seq: u64, now_ms: u64) -> Verdict {
        match &mut self.source {
            Some(s) if s.term == *term => {
                s.heard_ms = now_ms;
                if seq <= s.seen + 1 {
                    // The next change, or an old one again (dropping its key is harmless).
                    s.seen = s.seen.max(seq);
                    Verdict::Keep
                } else {
                    s.seen = seq;
                    Verdict::Purge
                }
            }
            // A new term, or the first word from this owner: what came before is unknown (without
            // a source nothing is cached).
            other => {
                let verdict = if other.is_some() { Verdict::Purge } else { Verdict::Keep };
                self.source = Some(Source { term: term.clone(), seen: seq, heard_ms: now_ms });
                verdict
            }
        }
    }

    /// The owner reports the partition at `seq` in `term` at `now_ms`.
    pub(crate) fn on_position(&mut self, term: &Term, seq: u64, now_ms: u64) -> Verdict {
        match &mut self.source {
            Some(s) if s.term == *term => {
                s.heard_ms = now_ms;
                if seq > s.seen {
                    s.seen = seq;
                    Verdict::Purge
                } else {
                    Verdict::Keep
                }
            }
            other => {
                // Nothing is cached without a source; after another term, what is cached is stale.
                let verdict = if other.is_some() { Verdict::Purge } else { Verdict::Keep };
                self.source = Some(Source { term: term.clone(), seen: seq, heard_ms: now_ms });
                verdict
            }
        }
    }

    /// Forgets the source (owner changed, silent or unknown): purge what was cached with it.
    pub(crate) fn reset(&mut self) -> Verdict {
        if self.source.take().is_some() { Verdict::Purge } else { Verdict::Keep }
    }

    /// Whether a value read at `(term, seq)` may be cached at `now_ms`.
    pub(crate) fn may_cache(&self, term: &Term, seq: u64, now_ms: u64, liveness_ms: u64) -> bool {
        matches!(&self.source, Some(s) if s.term == *term && s.seen <= seq && now_ms.saturating_sub(s.heard_ms) <= liveness_ms)
    }

    /// True when the owner has been silent for longer than the liveness time.
    pub(crate) fn is_silent(&self, now_ms: u64, liveness_ms: u64) -> bool {
        matches!(&self.source, Some(s) if now_ms.saturating_sub(s.heard_ms) > liveness_ms)
    }
}

/// A near cache's statistics on one member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NearCacheStats {
    /// The map.
    pub map: String,
    /// Entries cached (approximate: purged entries are reclaimed in the background).
    pub entries: u64,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the owner.
    pub misses: u64,
    /// Keys dropped because the owner reported a change (or this member wrote them).
    pub invalidations: u64,
    /// Times every entry of a partition was dropped (a missed event, an owner change, a silent owner).
    pub purges: u64,
}

#[derive(Debug, Clone)]
struct Cached {
    value: Arc<[u8]>,
    partition: u32,
    generation: u64,
}

/// Per partition: its track and the owner this member's table names.
#[derive(Debug, Default)]
struct Partitions {
    tracks: Vec<Track>,
    owners: Vec<Option<MemberId>>,
}

/// One map's near cache on one member.
pub(crate) struct NearCache {
    pub(crate) map: String,
    /// Whether entries are kept fresh by events (else only by their time to live).
    pub(crate) events: bool,
    cache: moka::sync::Cache<Vec<u8>, Cached>,
    /// Bumped by a purge; entries of an older generation are not served.
    generations: Box<[AtomicU64]>,
    partitions: Mutex<Partitions>,
    liveness_ms: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    purges: AtomicU64,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache").field("map", &self.map).field("events", &self.events).finish()
    }
}

impl NearCache {
    pub(crate) fn new(
        map: &str,
        config: &NearCacheConfig,
        events: bool,
        partition_count: u32,
        liveness: Duration,
    ) -> NearCache {
        let mut builder = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .support_invalidation_closures();
        if config.ttl_seconds > 0 {
            builder = builder.time_to_live(Duration::from_secs(config.ttl_seconds));
        }
        let n = partition_count as usize;
        NearCache {
            map: map.to_string(),
            events,
            cache: builder.build(),
            generations: (0..n).map(|_| AtomicU64::new(0)).collect(),
            partitions: Mutex::new(Partitions { tracks: vec![Track::default(); n], owners: vec![None; n] }),
            liveness_ms: liveness.as_millis() as u64,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            purges: AtomicU64::new(0),
        }
    }

    /// The cached value of `key`, counting a hit or a miss.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let found = self.cache.get(key).filter(|c| {
            let current = self.generations[c.partition as usize].load(Ordering::Acquire);
            c.generation == current
        });
        match found {
            Some(cached) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(cached.value.to_vec())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Caches `value` of `key` in partition `p`, read at `(term, seq)`, if that is safe (see the
    /// module documentation).
    pub(crate) fn offer(&self, p: u32, key: Vec<u8>, value: Vec<u8>, term: &Term, seq: u64, now_ms: u64) {
        let partitions = self.partitions.lock().unwrap();
        if self.events && !partitions.tracks[p as usize].may_cache(term, seq, now_ms, self.liveness_ms) {
            return;
        }
        let generation = self.generations[p as usize].load(Ordering::Acquire);
        self.cache.insert(key, Cached { value: value.into(), partition: p, generation });
        drop(partitions);
    }

    /// This member changed `key` itself: drop it.
    pub(crate) fn invalidate_key(&self, key: &[u8]) {
        let _partitions = self.partitions.lock().unwrap();
        self.cache.invalidate(key);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every entry (this member cleared the map).
    pub(crate) fn invalidate_all(&self) {
        let _partitions = self.partitions.lock().unwrap();
        for generation in self.generations.iter() {
            generation.fetch_add(1, Ordering::AcqRel);
        }
        self.cache.invalidate_all();
        self.purges.fetch_add(1, Ordering::Relaxed);
    }

    fn purge_locked(&self, p: u32) {
        let generation = self.generations[p as usize].fetch_add(1, Ordering::AcqRel) + 1;
        // Reclaim the entries in the background; they are not served any more already.
        let _ = self.cache.invalidate_entries_if(move |_, c| c.partition == p && c.generation < generation);
        self.purges.fetch_add(1, Ordering::Relaxed);
    }

    fn apply(&self, p: u32, verdict: Verdict) {
        if verdict == Verdict::Purge {
            self.purge_locked(p);
        }
    }

    /// A run of events for partition `p` from `from`: the changes `keys` (numbered up to `seq`),
    /// then the partition's position `seq`.
    pub(crate) fn on_run(&self, from: &MemberId, p: u32, term: &Term, seq: u64, keys: &[Option<Vec<u8>>], now_ms: u64) {
        if !self.events || p as usize >= self.generations.len() {
            return;
        }
        let mut partitions = self.partitions.lock().unwrap();
        if partitions.owners[p as usize].as_ref() != Some(from) {
            // Someone else changes this partition (this member's table is behind or ahead): trust
            // nothing cached for it.
            let verdict = partitions.tracks[p as usize].reset();
            self.apply(p, verdict);
            return;
        }
        let first = (seq + 1).checked_sub(keys.len() as u64).filter(|first| *first >= 1);
        let Some(first) = first else {
            // More changes than the position allows: not a run an owner sends.
            let verdict = partitions.tracks[p as usize].reset();
            self.apply(p, verdict);
            return;
        };
        for (i, key) in keys.iter().enumerate() {
            let verdict = partitions.tracks[p as usize].on_change(term, first + i as u64, now_ms);
            match (verdict, key) {
                (Verdict::Keep, Some(key)) => {
                    self.cache.invalidate(key.as_slice());
                    self.invalidations.fetch_add(1, Ordering::Relaxed);
                }
                (Verdict::Keep, None) | (Verdict::Purge, _) => self.purge_locked(p),
            }
        }
        let verdict = partitions.tracks[p as usize].on_position(term, seq, now_ms);
        self.apply(p, verdict);
    }

    /// A new partition table: partitions whose owner changed are purged.
    pub(crate) fn on_table(&self, table: &PartitionTable, local: &MemberId) {
        let mut partitions = self.partitions.lock().unwrap();
        for p in 0..partitions.owners.len() {
            let owner = table.owner(p as u32).cloned();
            if partitions.owners[p] != owner {
                partitions.owners[p] = owner.clone();
                if self.events {
                    let verdict = partitions.tracks[p].reset();
                    self.apply(p as u32, verdict);
                } else if owner.as_ref() == Some(local) {
                    // Reads of partitions this member owns are local: drop what was cached.
                    self.purge_locked(p as u32);
                }
            }
        }
    }

    /// Purges the partitions whose owner has been silent for longer than the liveness time, or
    /// has left the view (`is_live` says no).
    pub(crate) fn check_owners(&self, now_ms: u64, is_live: impl Fn(&MemberId) -> bool) {
        if !self.events {
            return;
        }
        let mut partitions = self.partitions.lock().unwrap();
        for p in 0..partitions.tracks.len() {
            let gone = partitions.owners[p].as_ref().is_some_and(|o| !is_live(o));
            if partitions.tracks[p].source.is_some()
                && (gone || partitions.tracks[p].is_silent(now_ms, self.liveness_ms))
            {
                let verdict = partitions.tracks[p].reset();
                self.apply(p as u32, verdict);
            }
        }
    }

    pub(crate) fn stats(&self) -> NearCacheStats {
        self.cache.run_pending_tasks();
        NearCacheStats {
            map: self.map.clone(),
            entries: self.cache.entry_count(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            purges: self.purges.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn term(epoch: u64) -> Term {
        Term { epoch, publisher: None }
    }

    /// A near cache on partition 0 of 1, whose owner is member `a`, that heard `a` at `(term 1, 0)`.
    fn cache(events: bool) -> (NearCache, MemberId) {
        let owner = MemberId::new("a", 1);
        let nc = NearCache::new("m", &NearCacheConfig::default(), events, 1, Duration::from_secs(3));
        let mut table = PartitionTable::empty(1);
        table.rows = vec![vec![owner.clone()]];
        nc.on_table(&table, &MemberId::new("b", 1));
        nc.on_run(&owner, 0, &term(1), 0, &[], 1_000);
        (nc, owner)
    }

    fn value(nc: &NearCache, key: &str) -> Option<String> {
        nc.get(key.as_bytes()).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn a_value_is_cached_until_its_change_arrives() {
        let (nc, a) = cache(true);
        nc.offer(0, b"k".to_vec(), b"v1".to_vec(), &term(1), 0, 1_001);
        assert_eq!(value(&nc, "k").as_deref(), Some("v1"));
        nc.on_run(&a, 0, &term(1), 1, &[Some(b"k".to_vec())], 1_002);
        assert_eq!(value(&nc, "k"), None);
        assert_eq!(nc.stats().purges, 0);
    }

    #[test]
    fn a_gap_in_the_sequence_purges_the_partition() {
        let (nc, a) = cache(true);
        nc.offer(0, b"k".to_vec(), b"v1".to_vec(), &term(1), 0, 1_001);
        nc.offer(0, b"j".to_vec(), b"w1".to_vec(), &term(1), 0, 1_001);
        // Change 1 (of "k") was lost; change 2 touches another key.
        nc.on_run(&a, 0, &term(1), 2, &[Some(b"x".to_vec())], 1_002);
        assert_eq!((value(&nc, "k"), value(&nc, "j")), (None, None));
        assert_eq!(nc.stats().purges, 1);
    }

    #[test]
    fn a_position_ahead_of_the_events_purges_and_one_behind_does_not() {
        let (nc, a) = cache(true);
        nc.offer(0, b"k".to_vec(), b"v1".to_vec(), &term(1), 0, 1_001);
        nc.on_run(&a, 0, &term(1), 0, &[], 1_500);
        assert!(value(&nc, "k").is_some());
        nc.on_run(&a, 0, &term(1), 3, &[], 2_000);
        assert!(value(&nc, "k").is_none());
    }

    #[test]
    fn a_read_older_than_what_was_heard_is_not_cached() {
        let (nc, a) = cache(true);
        nc.on_run(&a, 0, &term(1), 1, &[Some(b"k".to_vec())], 1_001);
        nc.offer(0, b"k".to_vec(), b"old".to_vec(), &term(1), 0, 1_002);
        assert_eq!(value(&nc, "k"), None, "the change at 1 may have been this key's");
        nc.offer(0, b"k".to_vec(), b"new".to_vec(), &term(1), 1, 1_003);
        assert_eq!(value(&nc, "k").as_deref(), Some("new"));
        nc.offer(0, b"j".to_vec(), b"x".to_vec(), &term(2), 5, 1_003);
        assert_eq!(value(&nc, "j"), None, "another term");
    }

    #[test]
    fn an_owner_change_a_silent_owner_and_a_foreign_sender_purge() {
        let (nc, a) = cache(true);
        let put = |nc: &NearCache| nc.offer(0, b"k".to_vec(), b"v".to_vec(), &term(1), 0, 1_001);
        put(&nc);
        let mut table = PartitionTable::empty(1);
        table.rows = vec![vec![MemberId::new("c", 1)]];
        nc.on_table(&table, &MemberId::new("b", 1));
        assert_eq!(value(&nc, "k"), None, "owner changed");

        let (nc, _) = cache(true);
        put(&nc);
        nc.check_owners(2_000, |_| true);
        assert!(value(&nc, "k").is_some(), "heard 1 s ago");
        nc.check_owners(4_500, |_| true);
        assert_eq!(value(&nc, "k"), None, "silent for 3.5 s");

        let (nc, _) = cache(true);
        put(&nc);
        nc.check_owners(1_002, |_| false);
        assert_eq!(value(&nc, "k"), None, "owner left the view");

        let (nc, _) = cache(true);
        put(&nc);
        nc.on_run(&MemberId::new("z", 9), 0, &term(7), 1, &[Some(b"other".to_vec())], 1_002);
        assert_eq!(value(&nc, "k"), None, "a member that is not the owner changes the partition");
        let _ = a;
    }

    #[test]
    fn without_events_entries_stay_until_their_ttl() {
        let (nc, a) = cache(false);
        nc.offer(0, b"k".to_vec(), b"v".to_vec(), &term(9), 99, 1_001);
        nc.on_run(&a, 0, &term(1), 5, &[Some(b"k".to_vec())], 1_002);
        assert!(value(&nc, "k").is_some());
    }

    proptest! {
        /// Whatever the owner sends and whatever is lost or reordered on the way, a cached value
        /// that a delivered-or-lost later change made stale is never served once a later event of
        /// the partition (or a position report) has been processed.
        #[test]
        fn no_stale_value_survives_the_next_event(
            ops in prop::collection::vec((0u8..4, any::<bool>(), any::<bool>()), 1..80)
        ) {
            let (nc, a) = cache(true);
            // The owner's state: the partition's sequence and each key's value version.
            let mut seq = 0u64;
            let mut versions = [0u64; 4];
            let mut now = 1_001;
            for (key, write, lost) in ops {
                now += 1;
                let name = vec![key];
                if write {
                    seq += 1;
                    versions[key as usize] += 1;
                    if !lost {
                        nc.on_run(&a, 0, &term(1), seq, &[Some(name.clone())], now);
                    }
                } else {
                    // A read at the current position, cached if allowed.
                    let encoded = versions[key as usize].to_be_bytes().to_vec();
                    if nc.get(&name).is_none() {
                        nc.offer(0, name.clone(), encoded, &term(1), seq, now);
                    }
                }
                // A position report (never lost in this model) then settles everything.
                if lost && write {
                    continue;
                }
                nc.on_run(&a, 0, &term(1), seq, &[], now);
                for k in 0..4u8 {
                    if let Some(v) = nc.get(&[k]) {
                        let version = u64::from_be_bytes(v.try_into().unwrap());
                        prop_assert_eq!(version, versions[k as usize], "stale value of key {}", k);
                    }
                }
            }
        }
    }
}
