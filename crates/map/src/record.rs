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

    /// An estimate of the memory the entry takes, key included, as a partition stores it (see
    /// [`Stored`]).
    pub fn memory_bytes(&self, key_len: usize) -> u64 {
        let r = self;
        let meta = [
            r.created_ms,
            zigzag(i128::from(r.updated_ms) - i128::from(r.created_ms)),
            zigzag(i128::from(r.accessed_ms) - i128::from(r.updated_ms)),
            r.hits,
            r.version,
            r.ttl_ms,
            r.max_idle_ms,
        ];
        let block =
            varint_len(key_len as u64) + key_len + r.value.len() + meta.map(varint_len).iter().sum::<usize>() + 1;
        block as u64 + STORED_OVERHEAD_BYTES
    }

    /// When the time to live ends (ms since the Unix epoch), if it has one.
    pub fn ttl_deadline_ms(&self) -> Option<u64> {
        (self.ttl_ms > 0).then(|| self.updated_ms.saturating_add(self.ttl_ms))
    }

    /// When the entry stops being visible, by time to live or maximum idle time, whichever comes
    /// first; `None` when it never expires. `idle_floor_ms` as for [`Record::is_expired`].
    pub fn expires_at_ms(&self, idle_floor_ms: u64) -> Option<u64> {
        let idle = (self.max_idle_ms > 0).then(|| self.accessed_ms.max(idle_floor_ms).saturating_add(self.max_idle_ms));
        match (self.ttl_deadline_ms(), idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How a partition stores an entry: key, value and metadata in one heap block, so an entry costs
/// one allocation and a 16-byte slot in the partition's tree.
///
/// Layout: `[key length: varint][key][value][metadata: varints][metadata length: u8]`. The
/// metadata is the record's seven fields as LEB128 varints, times as differences (created, then
/// updated - created, then accessed - updated, both zigzag-encoded since clocks are not
/// monotonic), so a fresh entry's metadata takes about 13 bytes instead of 56. Blocks compare
/// (equal, ordered) by key alone.
#[derive(Clone)]
pub(crate) struct Stored(Box<[u8]>);

/// Bytes the table and the allocator add to a [`Stored`] block, on average: a 16-byte slot and a
/// control byte in a hash table between 44 % and 87 % full, and the allocator's header and
/// rounding.
const STORED_OVERHEAD_BYTES: u64 = 28 + 12;

fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Decodes a varint at `*pos`. The buffers are built by [`Stored::build`] only, so they are well
/// formed; a truncated one yields what was read.
fn get_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    while let Some(&b) = buf.get(*pos) {
        *pos += 1;
        if shift < 64 {
            v |= u64::from(b & 0x7f) << shift;
        }
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    v
}

/// The longest metadata encoding: seven varints of at most 10 bytes.
const META_MAX: usize = 70;

/// Writes a varint at `out[*pos..]`.
fn write_varint(out: &mut [u8; META_MAX], pos: &mut usize, mut v: u64) {
    while v >= 0x80 {
        out[*pos] = (v as u8) | 0x80;
        *pos += 1;
        v >>= 7;
    }
    out[*pos] = v as u8;
    *pos += 1;
}

/// The metadata's seven fields as varints; returns the length used.
fn encode_meta(meta: &Record, out: &mut [u8; META_MAX]) -> usize {
    let mut pos = 0;
    for v in [
        meta.created_ms,
        zigzag(i128::from(meta.updated_ms) - i128::from(meta.created_ms)),
        zigzag(i128::from(meta.accessed_ms) - i128::from(meta.updated_ms)),
        meta.hits,
        meta.version,
        meta.ttl_ms,
        meta.max_idle_ms,
    ] {
        write_varint(out, &mut pos, v);
    }
    pos
}

fn zigzag(delta: i128) -> u64 {
    let d = delta.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(v: u64) -> i128 {
    i128::from(((v >> 1) as i64) ^ -((v & 1) as i64))
}

fn offset(base: u64, delta: i128) -> u64 {
    (i128::from(base) + delta).clamp(0, i128::from(u64::MAX)) as u64
}

impl Stored {
    /// Builds the block of `key` holding `record`.
    pub(crate) fn encode(key: &[u8], record: &Record) -> Stored {
        Stored::build(key, &record.value, record)
    }

    /// Builds the block of `key` with `value` and the metadata of `meta` (its value is ignored).
    pub(crate) fn build(key: &[u8], value: &[u8], meta: &Record) -> Stored {
        let mut inline = [0u8; META_MAX];
        let meta_len = encode_meta(meta, &mut inline);
        // The exact size, so that the boxed slice is the allocation (no shrinking copy).
        let mut buf = Vec::with_capacity(varint_len(key.len() as u64) + key.len() + value.len() + meta_len + 1);
        put_varint(&mut buf, key.len() as u64);
        buf.extend_from_slice(key);
        buf.extend_from_slice(value);
        buf.extend_from_slice(&inline[..meta_len]);
        buf.push(meta_len as u8);
        debug_assert_eq!(buf.len(), buf.capacity());
        Stored(buf.into_boxed_slice())
    }

    fn key_range(&self) -> (usize, usize) {
        let mut pos = 0;
        let len = get_varint(&self.0, &mut pos) as usize;
        (pos, (pos + len).min(self.0.len()))
    }

    fn meta_start(&self) -> usize {
        let meta_len = self.0.last().copied().unwrap_or(0) as usize;
        self.0.len().saturating_sub(1 + meta_len)
    }

    /// The encoded key.
    pub(crate) fn key(&self) -> &[u8] {
        let (start, end) = self.key_range();
        &self.0[start..end]
    }

    /// The value.
    pub(crate) fn value(&self) -> &[u8] {
        let (_, key_end) = self.key_range();
        &self.0[key_end..self.meta_start().max(key_end)]
    }

    /// The metadata, as a record with an empty value (no allocation).
    pub(crate) fn meta(&self) -> Record {
        let mut pos = self.meta_start();
        let buf = &self.0;
        let created_ms = get_varint(buf, &mut pos);
        let updated_ms = offset(created_ms, unzigzag(get_varint(buf, &mut pos)));
        let accessed_ms = offset(updated_ms, unzigzag(get_varint(buf, &mut pos)));
        Record {
            value: Vec::new(),
            created_ms,
            updated_ms,
            accessed_ms,
            hits: get_varint(buf, &mut pos),
            version: get_varint(buf, &mut pos),
            ttl_ms: get_varint(buf, &mut pos),
            max_idle_ms: get_varint(buf, &mut pos),
        }
    }

    /// The whole record (copies the value).
    pub(crate) fn record(&self) -> Record {
        Record { value: self.value().to_vec(), ..self.meta() }
    }

    /// Changes the metadata: in place when its encoding has the same length (the usual case for
    /// a read's access time and hit count), else in a new block.
    pub(crate) fn set_meta(&mut self, meta: &Record) {
        let mut inline = [0u8; META_MAX];
        let len = encode_meta(meta, &mut inline);
        let start = self.meta_start();
        if start + len + 1 == self.0.len() {
            self.0[start..start + len].copy_from_slice(&inline[..len]);
        } else {
            *self = Stored::build(self.key(), self.value(), meta);
        }
    }

    /// True when the entry has a time to live or a maximum idle time.
    pub(crate) fn expires(&self) -> bool {
        let meta = self.meta();
        meta.ttl_ms > 0 || meta.max_idle_ms > 0
    }

    /// What the entry costs in memory: its block plus the tree's and the allocator's share.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.0.len() as u64 + STORED_OVERHEAD_BYTES
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored").field("key", &self.key()).field("meta", &self.meta()).finish()
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Stored {}

impl Ord for Stored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

impl PartialOrd for Stored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<[u8]> for Stored {
    fn borrow(&self) -> &[u8] {
        self.key()
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
    fn a_stored_entry_gives_back_key_value_and_every_field() {
        let mut r = Record::written(b"value".to_vec(), 1_700_000_000_123, Expiry::ttl(Duration::from_millis(9)), None);
        r.created_ms = 1_600_000_000_000;
        r.accessed_ms = r.updated_ms - 5; // clocks of two owners need not agree
        r.hits = 300;
        r.version = u64::MAX;
        r.max_idle_ms = 1;
        let s = Stored::encode(b"key", &r);
        assert_eq!(r.memory_bytes(3), s.memory_bytes(), "the estimate is the block's size plus overhead");
        assert_eq!((s.key(), s.value()), (&b"key"[..], &b"value"[..]));
        assert_eq!(s.record(), r);
        assert_eq!(s.meta(), Record { value: Vec::new(), ..r.clone() });
        let empty = Stored::encode(b"", &Record { value: Vec::new(), ..r.clone() });
        assert_eq!((empty.key(), empty.value()), (&b""[..], &b""[..]));
        let long_key = vec![7u8; 300];
        assert_eq!(Stored::encode(&long_key, &r).key(), &long_key[..]);
    }

    #[test]
    fn a_small_entry_is_one_compact_block_ordered_by_key() {
        let r = Record::written(vec![1; 100], now_ms(), Expiry::default(), None);
        let s = Stored::encode(b"key:00000042", &r);
        // 12 + 100 bytes of key and value, 1 of key length, at most 16 of metadata and its length.
        assert!(s.0.len() <= 12 + 100 + 1 + 16, "{} bytes", s.0.len());
        let a = Stored::encode(b"a", &r);
        let b = Stored::encode(b"b", &Record { hits: 9, ..r.clone() });
        assert!(a < b && a == Stored::encode(b"a", &Record { version: 7, ..r }));
    }

    #[test]
    fn metadata_changes_in_place_or_in_a_new_block() {
        let r = Record::written(b"v".to_vec(), 1_700_000_000_000, Expiry::default(), None);
        let mut s = Stored::encode(b"k", &r);
        let len = s.0.len();
        let touched = Record { accessed_ms: r.accessed_ms + 5, hits: 1, ..r.clone() };
        s.set_meta(&touched);
        assert_eq!((s.0.len(), s.record()), (len, touched.clone()), "same length: in place");
        let later = Record { accessed_ms: r.accessed_ms + 10_000_000, hits: 100_000, ..touched };
        s.set_meta(&later);
        assert!(s.0.len() > len);
        assert_eq!((s.key(), s.value(), s.record()), (&b"k"[..], &b"v"[..], later));
    }

    #[test]
    fn expiry_deadlines_take_the_earlier_of_ttl_and_idle() {
        let mut r = Record::written(vec![1], 1_000, Expiry::ttl(Duration::from_millis(500)), None);
        assert_eq!((r.ttl_deadline_ms(), r.expires_at_ms(0)), (Some(1_500), Some(1_500)));
        r.max_idle_ms = 100;
        assert_eq!(r.expires_at_ms(0), Some(1_100));
        assert_eq!(r.expires_at_ms(1_450), Some(1_500), "a take-over restarts the idle clock");
        let never = Record::written(vec![1], 1_000, Expiry::default(), None);
        assert_eq!(never.expires_at_ms(0), None);
    }

    #[test]
    fn rewrites_keep_creation_time_and_bump_the_version() {
        let a = Record::written(vec![1], 1_000, Expiry::default(), None);
        let b = Record::written(vec![2], 2_000, Expiry::default(), Some(&a));
        assert_eq!((b.created_ms, b.updated_ms, b.version), (1_000, 2_000, 2));
    }
}
