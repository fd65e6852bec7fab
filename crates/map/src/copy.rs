//! Full copies of a map partition, streamed from the owner to a replica with flow control.
//!
//! A partition may be far larger than a frame (hundreds of MB), and writes go on while it is
//! copied. The owner therefore sends a *fuzzy snapshot*: chunks of entries in key order, each read
//! under the partition lock when it is sent, with a bounded number of bytes in flight
//! ([`WINDOW_BYTES`]) so that a copy never fills the peer's queue. From the first chunk on, the
//! replica also receives every change of the map (as `Backup` messages, after the change's
//! position `start_seq`); it buffers them and, when the last chunk arrives (which carries the
//! owner's position `end` when it was read), installs the entries and replays the buffered changes
//! `start_seq + 1 ..= end` in order. Changes are whole records or removals, so replaying one that
//! a later chunk already reflects is harmless: each key ends with its last change. The replica
//! then stands exactly at `(term, end)` and continues in sequence.
//!
//! Every chunk is fenced like any other change ([`crate::fence`]). A gap in the buffered changes,
//! an overflowing buffer ([`STAGING_CHANGES_BYTES_MAX`]) or a chunk out of order fails the copy;
//! the owner starts another one later.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::{ResponseFuture, codec};
use tracing::debug;

use crate::messages::{Msg, ReplOp, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::record::{Record, now_ms};
use crate::store::{MapPartition, Removals};
use crate::table::Term;

/// Largest chunk, in approximate encoded bytes (a single larger entry is sent alone).
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// Chunk bytes one copy may have in flight (sent, not yet acknowledged); at least one chunk.
pub(crate) const WINDOW_BYTES: usize = 4 << 20;

/// Most bytes of changes a replica buffers while a copy arrives; beyond it the copy is dropped.
pub(crate) const STAGING_CHANGES_BYTES_MAX: usize = 64 << 20;

/// What a replica knows while a full copy arrives.
#[derive(Debug, Clone)]
pub(crate) struct Staging {
    pub(crate) copy: u64,
    pub(crate) term: Term,
    pub(crate) start_seq: u64,
    next_chunk: u32,
    entries: Vec<(Vec<u8>, Record)>,
    /// Changes `start_seq + 1 ..`, in order.
    changes: Vec<ReplOp>,
    changes_bytes: usize,
    /// A change was missing: the copy cannot be completed.
    gap: bool,
    /// The owner's removals, from the first chunk.
    removals: Removals,
}

fn repl_bytes(op: &ReplOp) -> usize {
    match op {
        ReplOp::Put { key, record } => key.len() + record.value.len() + 64,
        ReplOp::Remove { key } | ReplOp::Expire { key } => key.len() + 16,
        ReplOp::Clear => 16,
        ReplOp::Batch(writes) => writes.iter().map(crate::ring::RingWrite::bytes).sum::<usize>() + 16,
    }
}

impl Staging {
    /// Keeps change `seq` for the copy. False when the buffer is full (the copy must be dropped).
    pub(crate) fn buffer(&mut self, seq: u64, op: &ReplOp) -> bool {
        let expected = self.start_seq + self.changes.len() as u64 + 1;
        if seq < expected {
            return true; // Already in the copy's range or buffered.
        }
        if seq > expected {
            self.gap = true;
            return true;
        }
        self.changes_bytes += repl_bytes(op);
        self.changes.push(op.clone());
        self.changes_bytes <= STAGING_CHANGES_BYTES_MAX
    }
}

/// Which chunk of which copy: `(copy, chunk, start_seq, end)` of [`Msg::Copy`].
pub(crate) type ChunkPosition = (u64, u32, u64, Option<u64>);

/// Receives one chunk into `mp`; installs the copy with the last one. `Err`: why the copy failed
/// (the owner starts another).
fn receive_chunk(
    mp: &mut MapPartition,
    term: &Term,
    (copy, chunk, start_seq, end): ChunkPosition,
    entries: Vec<(Vec<u8>, Record)>,
    removals: Removals,
) -> Result<(), String> {
    if chunk == 0 {
        mp.staging = Some(Box::new(Staging {
            copy,
            term: term.clone(),
            start_seq,
            next_chunk: 0,
            entries: Vec::new(),
            changes: Vec::new(),
            changes_bytes: 0,
            gap: false,
            removals,
        }));
    }
    let Some(staging) = mp.staging.as_mut().filter(|s| s.copy == copy && s.term == *term && s.next_chunk == chunk)
    else {
        return Err(format!("chunk {chunk} of copy {copy} arrived out of order"));
    };
    staging.entries.extend(entries);
    staging.next_chunk += 1;
    let Some(end) = end else { return Ok(()) };
    let staging = mp.staging.take().expect("checked above");
    let covered = staging.start_seq + staging.changes.len() as u64;
    if staging.gap || covered < end {
        return Err(format!(
            "changes {}..={end} made during the copy did not all arrive (got up to {covered})",
            staging.start_seq + 1
        ));
    }
    let Staging { term, start_seq, entries, changes, removals, .. } = *staging;
    mp.install(term, start_seq, entries);
    mp.tombstones.absorb(removals);
    for op in &changes {
        mp.apply_repl(op);
    }
    mp.seq = start_seq + changes.len() as u64;
    Ok(())
}

impl Node {
    /// One chunk of a full copy from `from`.
    pub(crate) fn on_copy(
        &self,
        from: &MemberId,
        p: u32,
        term: &Term,
        map: &str,
        position: ChunkPosition,
        (entries, removals): (Vec<(Vec<u8>, Record)>, Removals),
    ) -> Reply {
        let end = position.3;
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        let mut data = match self.lock_fenced(p, from, term) {
            Ok(data) => data,
            Err(refusal) => return *refusal,
        };
        data.last_install_ms = now_ms();
        let mp = data.maps.entry(map.to_string()).or_insert_with(|| MapPartition::new(term.clone()));
        match receive_chunk(mp, term, position, entries, removals) {
            Ok(()) => {
                if end.is_some() {
                    debug!(local = %self.local, partition = p, map, term = %term, seq = mp.seq, "full copy installed");
                }
                Reply::Ack
            }
            Err(error) => {
                mp.staging = None;
                debug!(partition = p, map, %error, "full copy failed");
                Reply::Failed { error }
            }
        }
    }

    /// Streams a full copy of map partition `(p, map)` to `member`, which from then on gets every
    /// change of the map (as a replica of the row, or as a copy target registered here). Returns
    /// once the replica installed it.
    pub(crate) async fn stream_copy(self: &Arc<Self>, member: &MemberId, p: u32, map: &str) -> Result<(), String> {
        let copy = self.copy_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.settings.migration_timeout;
        let mut window: VecDeque<(usize, ResponseFuture)> = VecDeque::new();
        let mut in_flight = 0usize;
        // The keys when the copy starts; each chunk reads their current records. Keys written
        // later arrive as buffered changes (see the module documentation).
        let mut keys: Option<Vec<Vec<u8>>> = None;
        let mut cursor = 0usize;
        let mut chunk = 0u32;
        let mut started: Option<(Term, u64)> = None;
        let begun = Instant::now();
        loop {
            // Each chunk is read under the partition's lock. The first is also sent under it: the
            // changes made after it reach the replica behind it on the connection, so the replica
            // is staging when they arrive. The later ones are encoded and sent after the lock is
            // released (the replica buffers whatever changes arrive first), so operations on the
            // partition wait for the read only.
            let (outgoing, bytes, last) = {
                let table = self.table();
                let mut data = self.slot(p).data.lock().unwrap();
                if table.owner(p) != Some(&self.local) || data.fenced.is_some() {
                    return Err(format!("this member no longer owns partition {p}"));
                }
                let term = data.term.clone();
                if started.as_ref().is_some_and(|(t, _)| *t != term) {
                    return Err(format!("partition {p} started a new term during the copy"));
                }
                let replicates = table.index_of(p, member).is_some_and(|i| i < self.settings.map(map).replicas());
                if chunk == 0 && !replicates && !data.copy_targets.iter().any(|(m, n, _)| m == member && n == map) {
                    data.copy_targets.push((member.clone(), map.to_string(), false));
                }
                let mp = data.maps.entry(map.to_string()).or_insert_with(|| MapPartition::new(term.clone()));
                let (term, seq) = (mp.term.clone(), mp.seq);
                let start_seq = started.get_or_insert_with(|| (term.clone(), seq)).1;
                let keys = keys.get_or_insert_with(|| mp.entries.keys());
                let (entries, bytes, next) = chunk_of(mp, keys, cursor);
                let last = next >= keys.len();
                cursor = next;
                let msg = Msg::Copy {
                    partition: p,
                    term,
                    map: map.to_string(),
                    copy,
                    chunk,
                    start_seq,
                    end: last.then_some(seq),
                    entries,
                    removals: if chunk == 0 { mp.tombstones.to_copy() } else { Removals::default() },
                };
                if chunk == 0 {
                    (Outgoing::Sent(self.net.request(member, MAP_SERVICE, Node::encode(&msg), timeout)), bytes, last)
                } else {
                    (Outgoing::ToSend(msg), bytes, last)
                }
            };
            let request = match outgoing {
                Outgoing::Sent(request) => request,
                Outgoing::ToSend(msg) => self.net.request(member, MAP_SERVICE, Node::encode(&msg), timeout),
            };
            window.push_back((bytes, request));
            in_flight += bytes;
            chunk += 1;
            while let Some((bytes, _)) = window.front()
                && (in_flight > WINDOW_BYTES || last)
            {
                let bytes = *bytes;
                let (_, request) = window.pop_front().expect("front exists");
                in_flight -= bytes;
                let reply = request.await.map_err(|e| format!("copy chunk not confirmed by {member}: {e}"))?;
                match codec::decode::<Reply>(&reply) {
                    Ok(Reply::Ack) => {}
                    Ok(Reply::Fenced { table, .. }) => {
                        self.fence_partition(p, &table, member);
                        return Err(format!("{member} holds a newer table for partition {p} ({table})"));
                    }
                    Ok(other) => return Err(format!("{member} refused a copy chunk: {other:?}")),
                    Err(e) => return Err(format!("undecodable answer from {member}: {e}")),
                }
                if window.is_empty() {
                    break;
                }
            }
            if last {
                debug!(partition = p, map, %member, chunks = chunk, took = ?begun.elapsed(), "full copy sent");
                return Ok(());
            }
        }
    }

    /// Makes sure `member` holds map partition `(p, map)` at least up to `(term, seq)`: asks it,
    /// and streams a full copy when it is behind (one copy at a time per replica and map: a second
    /// caller waits for the first copy). Gives up at `deadline`.
    pub(crate) async fn ensure_synced(
        self: &Arc<Self>,
        member: &MemberId,
        p: u32,
        map: &str,
        term: &Term,
        seq: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        const COPIES_MAX: usize = 3;
        let mut copies = 0;
        loop {
            match self.check_version(member, p, map, term, seq, deadline).await? {
                Version::InStep => return Ok(()),
                Version::NotYet => {
                    if Instant::now() >= deadline {
                        return Err(format!("{member} has not received the partition table of this term yet"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Version::Behind => {
                    if copies == COPIES_MAX {
                        return Err(format!("{member} is still behind after {COPIES_MAX} full copies"));
                    }
                    let lock = {
                        let mut locks = self.slot(p).copy_locks.lock().unwrap();
                        locks.entry((member.clone(), map.to_string())).or_default().clone()
                    };
                    let _one_copy_at_a_time = lock.lock().await;
                    // Another caller's copy may have brought it up to date meanwhile.
                    if self.check_version(member, p, map, term, seq, deadline).await? == Version::InStep {
                        return Ok(());
                    }
                    copies += 1;
                    self.stream_copy(member, p, map).await?;
                }
            }
        }
    }

    /// Asks `member` where it stands on `(p, map)` relative to `(term, seq)`.
    async fn check_version(
        self: &Arc<Self>,
        member: &MemberId,
        p: u32,
        map: &str,
        term: &Term,
        seq: u64,
        deadline: Instant,
    ) -> Result<Version, String> {
        if self.table().owner(p) != Some(&self.local) {
            return Err(format!("this member no longer owns partition {p}"));
        }
        let msg = Node::encode(&Msg::VersionCheck { versions: vec![(p, term.clone(), map.to_string(), seq)] });
        let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let bytes = self.net.request(member, MAP_SERVICE, msg, timeout).await.map_err(|e| e.to_string())?;
        match codec::decode::<Reply>(&bytes) {
            Ok(Reply::Versions { behind, fenced, not_yet, table }) => {
                if !fenced.is_empty() {
                    self.fence_partition(p, &table, member);
                    Err(format!("{member} holds a newer table for partition {p} ({table})"))
                } else if not_yet {
                    Ok(Version::NotYet)
                } else if behind.is_empty() {
                    Ok(Version::InStep)
                } else {
                    Ok(Version::Behind)
                }
            }
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(format!("undecodable answer: {e}")),
        }
    }

    /// A replica asked for a full copy (it missed asynchronous changes).
    pub(crate) async fn resync_backup(self: &Arc<Self>, member: &MemberId, p: u32, map: &str) {
        let position = {
            let data = self.slot(p).data.lock().unwrap();
            data.maps.get(map).map(|mp| (mp.term.clone(), mp.seq))
        };
        let Some((term, seq)) = position else { return };
        let deadline = Instant::now() + self.settings.migration_timeout;
        if let Err(error) = self.ensure_synced(member, p, map, &term, seq, deadline).await {
            debug!(partition = p, map, %member, %error, "resync of a replica failed; anti-entropy will retry");
        }
    }
}

/// A chunk of [`Node::stream_copy`]: sent already (under the partition's lock), or to send.
enum Outgoing {
    Sent(ResponseFuture),
    ToSend(Msg),
}

/// Where a replica stands, see [`Node::check_version`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    InStep,
    Behind,
    NotYet,
}

/// One chunk of a copy: entries, their approximate size, and the key to continue after.
pub(crate) type Chunk = (Vec<(Vec<u8>, Record)>, usize, Option<Vec<u8>>);

/// The records of `keys[from..]` still present in `mp`, up to [`CHUNK_BYTES`] (at least one),
/// their approximate size, and the index to continue from (`keys.len()`: this is the last chunk).
fn chunk_of(mp: &MapPartition, keys: &[Vec<u8>], from: usize) -> (Vec<(Vec<u8>, Record)>, usize, usize) {
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut next = from;
    while next < keys.len() && (entries.is_empty() || bytes < CHUNK_BYTES) {
        let key = &keys[next];
        next += 1;
        if let Some(stored) = mp.entries.get(key) {
            let record = stored.record();
            bytes += key.len() + record.value.len() + 64;
            entries.push((key.clone(), record));
        }
    }
    (entries, bytes, next)
}

/// The entries of `mp` after `after` in key order, up to [`CHUNK_BYTES`] (at least one), their
/// approximate size, and the key to continue after (`None`: the last chunk). Sorts the keys on
/// every call: for pulls, which are rare, not for copies.
pub(crate) fn chunk_after(mp: &MapPartition, after: Option<&[u8]>) -> Chunk {
    let mut keys: Vec<Vec<u8>> =
        mp.entries.keys().into_iter().filter(|k| after.is_none_or(|a| k.as_slice() > a)).collect();
    keys.sort_unstable();
    let (entries, bytes, next) = chunk_of(mp, &keys, 0);
    let continue_after = (next < keys.len()).then(|| keys[next - 1].clone());
    (entries, bytes, continue_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Expiry;
    use crate::table::TableId;

    fn record(v: &[u8]) -> Record {
        Record::written(v.to_vec(), 1, Expiry::default(), None)
    }

    fn term() -> Term {
        TableId { epoch: 3, publisher: Some(MemberId::new("o", 1)) }
    }

    fn put(k: &[u8], v: &[u8]) -> ReplOp {
        ReplOp::Put { key: k.to_vec(), record: record(v) }
    }

    /// A copy read chunk by chunk while the owner keeps changing keys on both sides of the cursor,
    /// plus the changes buffered meanwhile, ends equal to the owner.
    #[test]
    fn a_fuzzy_copy_plus_the_changes_made_meanwhile_equals_the_owner() {
        let mut owner = MapPartition::new(term());
        for i in 0..5_000u32 {
            owner.insert(i.to_be_bytes().to_vec(), record(&[7u8; 500]));
        }
        owner.seq = 10;
        let mut replica = MapPartition::default();
        let start = owner.seq;
        let keys = owner.entries.keys();
        let (mut cursor, mut chunk, mut round) = (0usize, 0u32, 0u32);
        loop {
            let (entries, _, next) = chunk_of(&owner, &keys, cursor);
            let end = (next >= keys.len()).then_some(owner.seq);
            receive_chunk(&mut replica, &term(), (9, chunk, start, end), entries, Removals::default()).unwrap();
            if end.is_some() {
                break;
            }
            cursor = next;
            chunk += 1;
            // Changes between two chunks: one behind the cursor, one ahead, one removal.
            round += 1;
            let changes = [
                put(&round.to_be_bytes(), format!("v{round}").as_bytes()),
                put(&(4_000 + round).to_be_bytes(), b"ahead"),
                ReplOp::Remove { key: (4_999 - round).to_be_bytes().to_vec() },
            ];
            for op in changes {
                owner.apply_repl(&op);
                owner.seq += 1;
                assert!(replica.staging.as_mut().unwrap().buffer(owner.seq, &op));
            }
        }
        assert!(chunk > 1, "the partition spans several chunks");
        assert_eq!((replica.seq, &replica.term), (owner.seq, &term()));
        let contents = |mp: &MapPartition| -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
            mp.entries.iter().map(|(k, r)| (k, r.value)).collect()
        };
        assert_eq!(contents(&replica), contents(&owner));
    }

    #[test]
    fn a_copy_passes_on_the_owners_removals() {
        let mut owner = MapPartition::new(term());
        owner.insert(b"kept".to_vec(), record(b"v"));
        owner.tombstones.note(b"gone", 1_234);
        let mut replica = MapPartition::default();
        replica.tombstones.note(b"mine", 99);
        let keys = owner.entries.keys();
        let (entries, _, _) = chunk_of(&owner, &keys, 0);
        let removals = owner.tombstones.to_copy();
        receive_chunk(&mut replica, &term(), (2, 0, 0, None), entries, removals).unwrap();
        assert_eq!(replica.tombstones.removed_ms(b"gone"), None, "taken in with the install, not before");
        receive_chunk(&mut replica, &term(), (2, 1, 0, Some(0)), vec![], Removals::default()).unwrap();
        assert_eq!(replica.tombstones.removed_ms(b"gone"), Some(1_234));
        assert_eq!(replica.tombstones.removed_ms(b"mine"), Some(99), "its own stay");
        assert!(replica.entries.get(b"kept").is_some());
    }

    #[test]
    fn a_missing_change_or_a_chunk_out_of_order_fails_the_copy() {
        let mut replica = MapPartition::default();
        receive_chunk(&mut replica, &term(), (1, 0, 5, None), vec![(b"a".to_vec(), record(b"1"))], Removals::default())
            .unwrap();
        let staging = replica.staging.as_mut().unwrap();
        assert!(staging.buffer(6, &put(b"b", b"2")));
        assert!(staging.buffer(8, &put(b"c", b"3")), "a gap is remembered, not refused");
        let err = receive_chunk(&mut replica, &term(), (1, 1, 5, Some(8)), vec![], Removals::default()).unwrap_err();
        assert!(err.contains("did not all arrive"), "{err}");
        assert!(replica.staging.is_none() && replica.entries.is_empty(), "nothing was installed");
        let err = receive_chunk(&mut replica, &term(), (1, 3, 5, None), vec![], Removals::default()).unwrap_err();
        assert!(err.contains("out of order"), "{err}");
    }

    #[test]
    fn the_change_buffer_is_bounded() {
        let mut replica = MapPartition::default();
        receive_chunk(&mut replica, &term(), (1, 0, 0, None), vec![], Removals::default()).unwrap();
        let staging = replica.staging.as_mut().unwrap();
        let big = put(b"k", &vec![0u8; 1 << 20]);
        let mut seq = 1;
        while staging.buffer(seq, &big) {
            seq += 1;
            assert!(seq < 1_000, "the buffer never filled");
        }
        assert!(staging.changes_bytes > STAGING_CHANGES_BYTES_MAX);
    }

    #[test]
    fn an_entry_larger_than_a_chunk_is_sent_alone_and_nothing_is_skipped() {
        let mut mp = MapPartition::new(term());
        mp.insert(b"a".to_vec(), record(&vec![1u8; CHUNK_BYTES * 2]));
        mp.insert(b"b".to_vec(), record(b"x"));
        let (first, _, next) = chunk_after(&mp, None);
        assert_eq!((first.len(), first[0].0.as_slice()), (1, &b"a"[..]));
        let (second, _, next) = chunk_after(&mp, next.as_deref());
        assert_eq!((second.len(), next), (1, None));
        let (empty, bytes, next) = chunk_after(&MapPartition::default(), None);
        assert!(empty.is_empty() && bytes == 0 && next.is_none(), "an empty partition is one empty chunk");
        // A copy's chunks skip keys removed since the copy started.
        let keys = vec![b"a".to_vec(), b"gone".to_vec(), b"b".to_vec()];
        let (entries, _, next) = chunk_of(&mp, &keys, 1);
        assert_eq!((entries.len(), next), (1, 3));
    }
}
