//! The map service's wire messages, encoded with `grapevine_net::codec`. One enum each way keeps
//! the protocol in one place; every variant is versioned by the protocol major version checked at
//! the data-plane handshake.

use grapevine_membership::MemberId;
use serde::{Deserialize, Serialize};

use crate::merge::MergePolicy;
use crate::record::{Expiry, Record};
use crate::table::{PartitionTable, TableId, Term};

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
    /// Split-brain merge: offers `record`, an entry of a side that merges, to the owner, which
    /// stores it when `policy` decides so against its current entry ([`crate::merge::decide`]).
    /// `Flag`: whether the merging entry was taken (then it is replicated as a `ReplOp::Put`).
    Merge {
        key: Vec<u8>,
        record: Record,
        policy: MergePolicy,
        /// When the merging member joined, and whether the entry restores a lost partition.
        offer: crate::merge::Offer,
    },
    /// A read for a near cache: the value, and the map partition's position `(term, seq)` it was
    /// read at (`Positioned`; see `crate::near_cache`).
    NearGet {
        key: Vec<u8>,
    },
    /// Appends `item` to the ring buffer this map partition holds (a reliable topic: `key` is the
    /// topic name, which chooses the partition). See `crate::ring`.
    RingAppend {
        key: Vec<u8>,
        item: Vec<u8>,
        capacity: u64,
        retention_ms: u64,
        overwrite: bool,
    },
    /// Reads a ring buffer's confirmed items from sequence `from` on (`RingItems`).
    RingRead {
        key: Vec<u8>,
        from: u64,
        max_items: u32,
        max_bytes: u32,
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
            | Op::Ttl { key }
            | Op::Merge { key, .. }
            | Op::NearGet { key }
            | Op::RingAppend { key, .. }
            | Op::RingRead { key, .. } => key,
        }
    }

    /// Bytes of key and values the operation carries.
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Op::Get { key }
            | Op::ContainsKey { key }
            | Op::Remove { key }
            | Op::SetTtl { key, .. }
            | Op::Ttl { key }
            | Op::NearGet { key }
            | Op::RingRead { key, .. } => key.len(),
            // The item, and its sequence key and the ring's bounds beside it.
            Op::RingAppend { key, item, .. } => key.len() + item.len() + 64,
            // The largest counter is 20 digits.
            Op::Incr { key, .. } => key.len() + 20,
            Op::Put { key, value, .. } | Op::PutKeepTtl { key, value, .. } => key.len() + value.len(),
            Op::CompareAndSet { key, expected, new } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new.as_ref().map_or(0, Vec::len)
            }
            Op::Merge { key, record, .. } => key.len() + record.value.len(),
        }
    }

    pub(crate) fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Get { .. } | Op::ContainsKey { .. } | Op::Ttl { .. } | Op::NearGet { .. } | Op::RingRead { .. }
        )
    }

    /// Whether a caller may send the operation again when the owner's answer was lost: reads, and
    /// merges (merging the same record again keeps what the first attempt left, except that
    /// `pass-through` writes the same entry once more).
    pub(crate) fn retry_if_lost(&self) -> bool {
        self.is_read() || matches!(self, Op::Merge { .. })
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
            Op::Merge { .. } => "merge",
            Op::NearGet { .. } => "get",
            Op::RingAppend { .. } => "ring_append",
            Op::RingRead { .. } => "ring_read",
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
    /// A near-cache read: the value, and the position of the map partition it was read at.
    Positioned { value: Option<Vec<u8>>, term: Term, seq: u64 },
    /// A ring append: the sequence number the item got.
    RingStored { seq: u64 },
    /// A ring append refused: every slot holds an item still retained; the oldest may be
    /// overwritten in `retry_in_ms`.
    RingFull { retry_in_ms: u64 },
    /// A ring read: the oldest sequence held, the next sequence to be written (as far as it is
    /// confirmed by the synchronous backups), and items `(seq, item)` in order.
    RingItems { head: u64, next: u64, items: Vec<(u64, Vec<u8>)> },
}

/// A change replicated from the owner to backups, applied in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReplOp {
    Put {
        key: Vec<u8>,
        record: Record,
    },
    Remove {
        key: Vec<u8>,
    },
    Expire {
        key: Vec<u8>,
    },
    Clear,
    /// Changes applied together (a ring append: the item, the ring's bounds, evicted items).
    Batch(Vec<crate::ring::RingWrite>),
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

/// One map's statistics on one member. (Every field has a default, so that readers of the JSON
/// `/stats` of another version can read it; bincode always carries every field.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
    /// Split-brain merges executed as owner in which the map's merge policy kept the entry this
    /// member held (or kept the key absent).
    #[serde(default)]
    pub merge_kept_existing: u64,
    /// Split-brain merges executed as owner in which the merging entry was stored.
    #[serde(default)]
    pub merge_took_merging: u64,
    /// The map's merge policy (on this member).
    #[serde(default)]
    pub merge_policy: String,
    /// The map's split-brain protection minimum (on this member; 0: off).
    #[serde(default)]
    pub min_cluster_size: u32,
    /// Partitions this member owns whose row has fewer members than `1 + backup_count` (the
    /// cluster is too small): writes to them are acknowledged with fewer synchronous backups.
    #[serde(default)]
    pub under_replicated_partitions: u64,
    /// Writes this member acknowledged, as owner, with fewer synchronous backups than
    /// `backup_count`.
    #[serde(default)]
    pub under_replicated_writes: u64,
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
    /// Partitions this member learned were lost (every replica up to a map's backup count gone
    /// at once) since it started.
    #[serde(default)]
    pub partitions_lost: u64,
    /// Per-map statistics.
    pub maps: Vec<LocalMapStats>,
}

/// Identifies one migration attempt: the master that started it and a number unique to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct MigrationId {
    pub(crate) master: MemberId,
    pub(crate) n: u64,
}

impl std::fmt::Display for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.master, self.n)
    }
}

/// One partition's term start, for one backup (see [`crate::takeover`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TermStart {
    pub(crate) partition: u32,
    /// The new owner's term.
    pub(crate) term: Term,
    /// `None`: a probe; the backup only answers where it stands. `Some`: per map, the position
    /// `(term, seq)` the new owner holds; a backup exactly there continues in the new term, any
    /// other is copied in full on the next change.
    pub(crate) bases: Option<Vec<(String, Term, u64)>>,
}

/// Every message of the map service. Messages that change a replica carry the sender's owner
/// term, checked by [`crate::fence`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Caller → owner: a key operation.
    Op { epoch: u64, partition: u32, map: String, op: Op },
    /// Caller → owner: count or clear a map over partitions the callee owns.
    Multi { epoch: u64, map: String, partitions: Vec<u32>, op: MultiOp },
    /// Caller → owner: entries of a partition after `after`, at most `limit`.
    Page { epoch: u64, partition: u32, map: String, after: Option<Vec<u8>>, limit: u32 },
    /// Owner → replica: one change, `seq` following the previous one in `term`.
    Backup { partition: u32, term: Term, map: String, seq: u64, op: ReplOp },
    /// New owner → one backup, for the partitions it took over in its table `table`.
    TermStart { table: TableId, starts: Vec<TermStart> },
    /// Owner → replica: chunk `chunk` of full copy `copy` of a map partition, taken from the
    /// owner's position `(term, start_seq)` on. Changes after `start_seq` reach the replica as
    /// `Backup` messages meanwhile; it buffers them and replays them on the copy. `end`, on the last
    /// chunk: the owner's position when it was taken; the replica then holds exactly
    /// `(term, end)`.
    Copy {
        partition: u32,
        term: Term,
        map: String,
        copy: u64,
        chunk: u32,
        start_seq: u64,
        end: Option<u64>,
        entries: Vec<(Vec<u8>, Record)>,
        /// With the first chunk: the owner's latest removals (for merges, see `store::Tombstones`).
        removals: crate::store::Removals,
    },
    /// Replica → owner: "I missed changes of this map partition; send me a full copy."
    SyncRequest { partition: u32, map: String },
    /// Owner → replica: is the replica at least at `(term, seq)` for each `(partition, term, map, seq)`?
    VersionCheck { versions: Vec<(u32, Term, String, u64)> },
    /// Master → member: a new table.
    TablePush { table: PartitionTable },
    /// Anyone → member: send me your table.
    TableGet,
    /// Master → owner: attempt `id`: bring partition `partition` from `old_row` (its row in the
    /// master's table `table`) to `new_row`, freezing writes at the end if the owner changes.
    MigrateStart { id: MigrationId, table: TableId, partition: u32, old_row: Vec<MemberId>, new_row: Vec<MemberId> },
    /// Master → owner: migration attempt `id` will not be committed.
    MigrateAbort { id: MigrationId, partition: u32 },
    /// Owner → listening member: entry events.
    Events { events: Vec<RawEntryEvent> },
    /// Anyone → member: your map statistics.
    Stats,
    /// Master → every member: every replica of `partition` up to index `lost_replicas - 1` is gone.
    PartitionLost { table: TableId, partition: u32, lost_replicas: u8 },
    /// New owner (in `term`) → replica: the entries of a map partition after `after`, one chunk,
    /// to catch up from a replica that is further along before starting its term.
    Pull { partition: u32, term: Term, map: String, after: Option<Vec<u8>> },
}

/// Every reply of the map service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    Done(OpResult),
    /// The callee does not own the partition under its table of `epoch`.
    WrongOwner {
        epoch: u64,
    },
    /// Try again shortly (partition frozen for a migration, table not yet received, busy, ...).
    Retry {
        reason: String,
    },
    /// The operation failed; the message says why and what to do.
    Failed {
        error: String,
    },
    Ack,
    /// Replica: cannot apply; it holds `(term, seq)` and needs a full copy.
    NeedSync {
        term: Term,
        seq: u64,
    },
    /// Replica: refused by fencing, the sender is stale: this member's table moved the partition
    /// to another term.
    Fenced {
        table: TableId,
        term: Term,
    },
    /// Replica: refused for now: the sender's term comes from a table this member does not hold
    /// yet (it is fetching it); retry shortly.
    NotYet {
        table: TableId,
    },
    /// Replica: a full copy of the map partition is being received; the change is buffered and
    /// applied when the copy completes, not yet.
    Staging,
    Multi {
        done: Vec<(u32, u64)>,
        not_owner: Vec<u32>,
    },
    Page {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        next: Option<Vec<u8>>,
    },
    /// Version check: the entries this member is behind on, those fencing refused, and whether
    /// some were refused for now (table not yet seen).
    Versions {
        behind: Vec<(u32, String)>,
        fenced: Vec<u32>,
        not_yet: bool,
        table: TableId,
    },
    /// Term start: the partitions fencing refused (the others are accepted), and where the
    /// replica stands for each map of the accepted ones: `(partition, map, term, seq)`.
    Started {
        refused: Vec<(u32, Box<Reply>)>,
        positions: Vec<(u32, String, Term, u64)>,
    },
    /// A chunk of a pull: entries, the key to continue after (`None`: the last chunk), and the
    /// replica's position.
    Pulled {
        entries: Vec<(Vec<u8>, Record)>,
        next: Option<Vec<u8>>,
        term: Term,
        seq: u64,
    },
    /// The table a member holds; the tables it received lately from other masters than its own
    /// (`seen`) and those of its own master it refused (`refused`), newest last, at most
    /// [`crate::tables::SEEN_TABLES_MAX`] each: which side of a split it was on (see
    /// [`crate::lineage::sides_seen`]).
    Table {
        table: PartitionTable,
        seen: Vec<TableId>,
        refused: Vec<TableId>,
        /// The master it follows as it answers.
        follows: Option<MemberId>,
    },
    TableAck {
        table: TableId,
    },
    MigrateReady {
        id: MigrationId,
    },
    Stats(LocalStats),
}
