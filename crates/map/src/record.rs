//! Entries and their metadata, and the expiry rules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, by this member's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// When an entry expires: after a time to live since its last update, after a maximum idle time
/// since its last access, or both (whichever comes first). `Expiry::default()` never expires
/// (unless the map's configuration sets defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    /// Time to live since the last update.
    pub ttl: Option<Duration>,
    /// Maximum time since the last read or write.
    pub max_idle: Option<Duration>,
}

impl Expiry {
    /// Expires `ttl` after the last update.
    pub fn ttl(ttl: Duration) -> Self {
        Expiry { ttl: Some(ttl), max_idle: None }
    }

    /// Expires `max_idle` after the last read or write (session semantics).
    pub fn max_idle(max_idle: Duration) -> Self {
        Expiry { ttl: None, max_idle: Some(max_idle) }
    }

    /// Adds a maximum idle time.
    pub fn and_max_idle(mut self, max_idle: Duration) -> Self {
        self.max_idle = Some(max_idle);
        self
    }

    /// Never expires, even if the map has default expiry settings.
    pub fn never() -> Self {
        Expiry { ttl: Some(Duration::ZERO), max_idle: Some(Duration::ZERO) }
    }
}

/// A stored entry: the value and the metadata that expiry, statistics and merge policies use.
/// Timestamps come from the owner's clock and travel to backups unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The encoded value.
    pub value: Vec<u8>,
    /// When the key was first written (ms since the Unix epoch).
    pub created_ms: u64,
    /// When the value was last written.
    pub updated_ms: u64,
    /// When the entry was last read or written. Kept on the owner only; see [`Record::is_expired`].
    pub accessed_ms: u64,
    /// Reads since creation, on the owner.
    pub hits: u64,
    /// Grows by one on every write of the key.
    pub version: u64,
    /// Time to live in ms (0: none).
    pub ttl_ms: u64,
    /// Maximum idle time in ms (0: none).
    pub max_idle_ms: u64,
}

impl Record {
    /// A new record written at `now`, replacing `previous` (whose creation time and version carry on).
    pub fn written(value: Vec<u8>, now: u64, expiry: Expiry, previous: Option<&Record>) -> Record {
        let millis = |d: Option<Duration>| d.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64).unwrap_or(0);
        Record {
            value,
            created_ms: previous.map(|p| p.created_ms).unwrap_or(now),
            updated_ms: now,
            accessed_ms: now,
            hits: previous.map(|p| p.hits).unwrap_or(0),
            version: previous.map(|p| p.version + 1).unwrap_or(1),
            ttl_ms: millis(expiry.ttl),
            max_idle_ms: millis(expiry.max_idle),
        }
    }

    /// True when the time to live has passed. Deterministic from the replicated update time, so
    /// owner and backups agree.
    pub fn ttl_expired(&self, now: u64) -> bool {
        self.ttl_ms > 0 && now >= self.updated_ms.saturating_add(self.ttl_ms)
    }

    /// True when the entry must be invisible to readers. `idle_floor_ms` is when this member
    /// became the owner of the entry's partition: reads that happened on a previous owner are not
    /// replicated, so after a fail-over the idle clock restarts from the take-over instead of
    /// expiring entries that were in use.
    pub fn is_expired(&self, now: u64, idle_floor_ms: u64) -> bool {
        if self.ttl_expired(now) {
            return true;
        }
        self.max_idle_ms > 0 && now >= self.accessed_ms.max(idle_floor_ms).saturating_add(self.max_idle_ms)
    }

    /// An estimate of the memory the entry takes, key included.
    pub fn memory_bytes(&self, key_len: usize) -> u64 {
        // Key and value buffers plus the record's fixed fields and tree-node overhead.
        (key_len + self.value.len() + std::mem::size_of::<Record>() + 48) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_counts_from_the_last_update_and_idle_from_the_last_access() {
        let r = Record::written(vec![1], 1_000, Expiry::ttl(Duration::from_millis(500)), None);
        assert!(!r.is_expired(1_499, 0) && r.is_expired(1_500, 0));
        let mut s = Record::written(vec![1], 1_000, Expiry::max_idle(Duration::from_millis(500)), None);
        s.accessed_ms = 1_400;
        assert!(!s.is_expired(1_899, 0) && s.is_expired(1_900, 0));
        assert!(!s.ttl_expired(10_000), "idle expiry is the owner's decision, not a backup's");
    }

    #[test]
    fn a_take_over_restarts_the_idle_clock() {
        let s = Record::written(vec![1], 1_000, Expiry::max_idle(Duration::from_millis(500)), None);
        assert!(s.is_expired(1_600, 0));
        assert!(!s.is_expired(1_600, 1_200), "the new owner took over at 1200: idle until 1700");
    }

    #[test]
    fn rewrites_keep_creation_time_and_bump_the_version() {
        let a = Record::written(vec![1], 1_000, Expiry::default(), None);
        let b = Record::written(vec![2], 2_000, Expiry::default(), Some(&a));
        assert_eq!((b.created_ms, b.updated_ms, b.version), (1_000, 2_000, 2));
    }
}
