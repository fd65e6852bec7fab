//! The map service's wire messages, encoded with `grapevine_net::codec`. One enum each way keeps
//! the protocol in one place; every variant is versioned by the protocol major version checked at
//! the data-plane handshake.

use grapevine_membership::MemberId;
use serde::{Deserialize, Serialize};

use crate::record::{Expiry, Record};
use crate::table::PartitionTable;

/// A key-level operation, executed by the partition's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Op {
    Get {
        key: Vec<u8>,
    },
    ContainsKey {
        key: Vec<u8>,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        expiry: Option<Expiry>,
        mode: PutMode,
    },
    /// Sets `new` (or removes, when `None`) if the current value equals `expected` (`None`: absent).
    CompareAndSet {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    Remove {
        key: Vec<u8>,
    },
    /// A put that keeps the current entry's expiry (its time-to-live deadline and its maximum
    /// idle time); an absent key gets the map's defaults.
    PutKeepTtl {
        key: Vec<u8>,
        value: Vec<u8>,
        mode: PutMode,
    },
    /// Adds `delta` to the value, read as a decimal integer (an absent key counts as 0), keeping
    /// the entry's expiry; the result is the new value (`Int`).
    Incr {
        key: Vec<u8>,
        delta: i64,
    },
    /// Sets the time to live of a present entry to `ttl_ms` from now (0: expire it now, i.e.
    /// remove it), or removes its time to live (`None`). `Flag`: whether the entry was present
    /// (for `None`: whether it had a time to live).
    SetTtl {
        key: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    /// The remaining time before the entry expires (`Int` in ms; -1: never; -2: absent).
    Ttl {
        key: Vec<u8>,
    },
}

impl Op {
    pub(crate) fn key(&self) -> &[u8] {
        match self {
            Op::Get { key }
            | Op::ContainsKey { key }
            | Op::Put { key, .. }
            | Op::CompareAndSet { key, .. }
            | Op::Remove { key }
            | Op::PutKeepTtl { key, .. }
            | Op::Incr { key, .. }
            | Op::SetTtl { key, .. }
            | Op::Ttl { key } => key,
        }
    }

    /// Bytes of key and values the operation carries.
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Op::Get { key }
            | Op::ContainsKey { key }
            | Op::Remove { key }
            | Op::SetTtl { key, .. }
            | Op::Ttl { key } => key.len(),
            // The largest counter is 20 digits.
            Op::Incr { key, .. } => key.len() + 20,
            Op::Put { key, value, .. } | Op::PutKeepTtl { key, value, .. } => key.len() + value.len(),
            Op::CompareAndSet { key, expected, new } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new.as_ref().map_or(0, Vec::len)
            }
        }
    }

    pub(crate) fn is_read(&self) -> bool {
        matches!(self, Op::Get { .. } | Op::ContainsKey { .. } | Op::Ttl { .. })
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Get { .. } => "get",
            Op::ContainsKey { .. } => "contains_key",
            Op::Put { mode: PutMode::Always, .. } => "put",
            Op::Put { mode: PutMode::IfAbsent, .. } => "put_if_absent",
            Op::Put { mode: PutMode::IfPresent, .. } => "replace",
            Op::CompareAndSet { .. } => "compare_and_set",
            Op::Remove { .. } => "remove",
            Op::PutKeepTtl { mode: PutMode::Always, .. } => "put",
            Op::PutKeepTtl { mode: PutMode::IfAbsent, .. } => "put_if_absent",
            Op::PutKeepTtl { mode: PutMode::IfPresent, .. } => "replace",
            Op::Incr { .. } => "incr",
            Op::SetTtl { .. } => "set_ttl",
            Op::Ttl { .. } => "ttl",
        }
    }
}

/// When a put applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutMode {
    /// Always.
    Always,
    /// Only when the key is absent (or expired).
    IfAbsent,
    /// Only when the key is present.
    IfPresent,
}

/// The result of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum OpResult {
    /// The previous (or current, for reads) value.
    Value(Option<Vec<u8>>),
    /// Whether the condition held.
    Flag(bool),
    /// A number (a counter's new value, a remaining time).
    Int(i64),
    /// The operation does not apply to the entry's value; the text says why (Redis's wording).
    Rejected(String),
}

/// A change replicated from the owner to backups, applied in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReplOp {
    Put { key: Vec<u8>, record: Record },
    Remove { key: Vec<u8> },
    Expire { key: Vec<u8> },
    Clear,
}

/// Operations over all of a member's owned partitions of a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MultiOp {
    Count,
    Clear,
}

/// What happened to an entry, for listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryEventKind {
    /// A new key was written.
    Added,
    /// An existing key got a new value.
    Updated,
    /// A key was removed (or cleared).
    Removed,
    /// A key expired (time to live or max idle).
    Expired,
}

/// An entry event, with encoded key and values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEntryEvent {
    /// The map.
    pub map: String,
    /// What happened.
    pub kind: EntryEventKind,
    /// The encoded key.
    pub key: Vec<u8>,
    /// The new value (added, updated).
    pub value: Option<Vec<u8>>,
    /// The value before (updated, removed, expired).
    pub old_value: Option<Vec<u8>>,
}

/// One map's statistics on one member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMapStats {
    /// The map name.
    pub name: String,
    /// Entries in partitions this member owns.
    pub owned_entries: u64,
    /// Entries this member holds as a backup.
    pub backup_entries: u64,
    /// Reads that found an entry, on owned entries.
    pub hits: u64,
    /// Reads executed as owner.
    pub gets: u64,
    /// Writes executed as owner.
    pub puts: u64,
    /// Removes executed as owner.
    pub removes: u64,
    /// 99th percentile of get latency seen by callers on this member, in microseconds.
    pub get_p99_us: u64,
    /// 99th percentile of put latency seen by callers on this member, in microseconds.
    pub put_p99_us: u64,
    /// Estimated memory of owned and backup entries.
    pub memory_bytes: u64,
    /// Synchronous backups configured (on this member).
    pub backup_count: u8,
    /// Asynchronous backups configured (on this member).
    pub async_backup_count: u8,
}

/// A member's map-service statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalStats {
    /// The member's node id.
    pub node_id: String,
    /// Partition-table epoch on this member.
    pub epoch: u64,
    /// Partitions this member owns.
    pub owned_partitions: u32,
    /// Partitions this member backs up.
    pub backup_partitions: u32,
    /// Per-map statistics.
    pub maps: Vec<LocalMapStats>,
}

/// Every message of the map service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Caller → owner: a key operation.
    Op { epoch: u64, partition: u32, map: String, op: Op },
    /// Caller → owner: count or clear a map over partitions the callee owns.
    Multi { epoch: u64, map: String, partitions: Vec<u32>, op: MultiOp },
    /// Caller → owner: entries of a partition after `after`, at most `limit`.
    Page { epoch: u64, partition: u32, map: String, after: Option<Vec<u8>>, limit: u32 },
    /// Owner → backup: one change, `seq` following the previous one in `term`.
    Backup { epoch: u64, partition: u32, map: String, term: u64, seq: u64, op: ReplOp },
    /// New owner → backups: its term starts at `epoch`; a backup at exactly `base` for a map
    /// continues, any other needs a full copy.
    TermStart { epoch: u64, partition: u32, term: u64, bases: Vec<(String, u64, u64)> },
    /// Owner → replica: a full copy of a map partition at `(term, seq)`, in chunks numbered from 0,
    /// installed atomically when the `last` one arrives.
    Install {
        epoch: u64,
        partition: u32,
        map: String,
        term: u64,
        seq: u64,
        chunk: u32,
        last: bool,
        entries: Vec<(Vec<u8>, Record)>,
    },
    /// Backup → owner: "I missed changes of this map partition; send me a full copy."
    SyncRequest { partition: u32, map: String },
    /// Owner → backup, periodic anti-entropy: the owner's version of each map partition.
    VersionCheck { epoch: u64, versions: Vec<(u32, String, u64, u64)> },
    /// Master → member: a new table.
    TablePush { table: PartitionTable },
    /// Anyone → member: send me your table.
    TableGet,
    /// Master → owner: the partition's row is `old_row`; bring `new_row`'s members up to date,
    /// and freeze writes if the owner changes, until the master commits the new row.
    MigrateStart { old_row: Vec<MemberId>, partition: u32, new_row: Vec<MemberId> },
    /// Master → owner: the migration to `new_row` will not be committed; unfreeze.
    MigrateAbort { partition: u32, new_row: Vec<MemberId> },
    /// Owner → listening member: entry events.
    Events { events: Vec<RawEntryEvent> },
    /// Anyone → member: your map statistics.
    Stats,
}

/// Every reply of the map service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    Done(OpResult),
    /// The callee does not own the partition under its table of `epoch`.
    WrongOwner {
        epoch: u64,
    },
    /// Try again shortly (partition frozen for a migration, table not yet received, ...).
    Retry {
        reason: String,
    },
    /// The operation failed; the message says why and what to do.
    Failed {
        error: String,
    },
    Ack,
    /// Backup: cannot apply; it holds `(term, seq)` and needs a full copy.
    NeedSync {
        term: u64,
        seq: u64,
    },
    /// The sender is not the owner under the callee's newer table.
    Stale {
        epoch: u64,
    },
    Multi {
        done: Vec<(u32, u64)>,
        not_owner: Vec<u32>,
    },
    Page {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        next: Option<Vec<u8>>,
    },
    Mismatch {
        partitions: Vec<(u32, String)>,
    },
    Table(PartitionTable),
    TableAck {
        epoch: u64,
    },
    MigrateReady,
    Stats(LocalStats),
}
