//! The replica's side of a partition: apply the owner's changes strictly in sequence, and only
//! from the owner this member's table names, in its term ([`crate::fence`]); ask for a full copy
//! whenever the sequence cannot continue (a gap, a new owner's term that does not start where
//! this replica stands, or a map partition this member never had).

use grapevine_membership::MemberId;
use tracing::debug;

use crate::fence::{self, Fence};
use crate::messages::{Msg, ReplOp, Reply, TermStart};
use crate::node::{MAP_SERVICE, Node};
use crate::store::MapPartition;
use crate::table::{TableId, Term};

impl Node {
    /// The fencing verdict for a change of `p` from `sender` in `term` ([`crate::fence`]): the
    /// partition, locked, if the change may be applied, else the refusal to send back (a sender
    /// this member is behind on makes it fetch the sender's table). A table being applied right now (the partition's state is already the newer table's, see
    /// [`crate::node::PartitionData::applied`]) answers `NotYet`: the sender retries shortly.
    pub(crate) fn lock_fenced(
        &self,
        p: u32,
        sender: &MemberId,
        term: &Term,
    ) -> Result<std::sync::MutexGuard<'_, crate::node::PartitionData>, Box<Reply>> {
        // Twice at most: a table being applied right now is waited for (`apply_table` holds the
        // apply lock while it adjusts the partitions, a short CPU-bound step), then judged again.
        for attempt in 0..2 {
            let table = self.table();
            match fence::check(&table, p, sender, term) {
                Fence::Accept => {}
                Fence::Stale { table, term } => return Err(Box::new(Reply::Fenced { table, term })),
                Fence::Ahead => {
                    self.want_table(sender);
                    return Err(Box::new(Reply::NotYet { table: table.id() }));
                }
            }
            let data = self.slot(p).data.lock().unwrap();
            if data.applied == table.id() {
                return Ok(data);
            }
            drop(data);
            if attempt == 0 {
                self.await_table_applied();
            }
        }
        Err(Box::new(Reply::NotYet { table: self.table().id() }))
    }

    /// A replicated change from `from`, the owner of `p` in `term` (as far as it knows).
    pub(crate) fn on_backup(&self, from: &MemberId, p: u32, term: &Term, map: &str, seq: u64, op: &ReplOp) -> Reply {
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        let mut data = match self.lock_fenced(p, from, term) {
            Ok(data) => data,
            Err(refusal) => return *refusal,
        };
        let mp = data.maps.entry(map.to_string()).or_insert_with(|| MapPartition::new(term.clone()));
        if let Some(staging) = mp.staging.as_mut()
            && staging.term == *term
        {
            // A full copy is arriving: keep the change for when it is installed.
            return if staging.buffer(seq, op) { Reply::Staging } else { abort_staging(mp, p, map) };
        }
        if mp.term == *term && seq == mp.seq + 1 {
            mp.apply_repl(op);
            mp.seq = seq;
            Reply::Ack
        } else if mp.term == *term && seq <= mp.seq {
            // Already applied (a full copy overtook it).
            Reply::Ack
        } else {
            debug!(partition = p, map, have = ?(&mp.term, mp.seq), got = ?(term, seq), "backup out of sequence");
            Reply::NeedSync { term: mp.term.clone(), seq: mp.seq }
        }
    }

    /// An asynchronous backup that cannot continue asks the owner for a full copy, once.
    pub(crate) fn request_sync(&self, owner: &MemberId, p: u32, map: &str) {
        let mut data = self.slot(p).data.lock().unwrap();
        let Some(mp) = data.maps.get_mut(map) else { return };
        if mp.sync_requested {
            return;
        }
        mp.sync_requested = true;
        let msg = Node::encode(&Msg::SyncRequest { partition: p, map: map.to_string() });
        if let Err(error) = self.net.send(owner, MAP_SERVICE, msg) {
            debug!(partition = p, %owner, %error, "sync request not sent; anti-entropy will catch it");
            mp.sync_requested = false;
        }
    }

    /// A new owner's term: a probe is answered with where this replica stands; a start makes a
    /// map partition exactly at the owner's position continue in the new term (any other fails
    /// the sequence check on the next change and is copied in full). Answers which partitions
    /// fencing refused, and the positions of the accepted ones (before the start).
    pub(crate) fn on_term_start(&self, from: &MemberId, _table: &TableId, starts: Vec<TermStart>) -> Reply {
        let mut refused = Vec::new();
        let mut positions = Vec::new();
        for TermStart { partition: p, term, bases } in starts {
            if p >= self.settings.partition_count {
                refused.push((p, Box::new(Reply::Failed { error: format!("partition {p} does not exist") })));
                continue;
            }
            let mut data = match self.lock_fenced(p, from, &term) {
                Ok(data) => data,
                Err(refusal) => {
                    refused.push((p, refusal));
                    continue;
                }
            };
            for (map, mp) in &data.maps {
                if mp.staging.is_none() {
                    positions.push((p, map.clone(), mp.term.clone(), mp.seq));
                }
            }
            let Some(bases) = bases else { continue };
            for (map, base_term, base_seq) in bases {
                if let Some(mp) = data.maps.get_mut(&map) {
                    if mp.term == base_term && mp.seq == base_seq {
                        mp.continue_in(term.clone());
                    } else if mp.term != term {
                        debug!(partition = p, map, have = ?(&mp.term, mp.seq), base = ?(&base_term, base_seq), "diverged from the new owner");
                    }
                }
            }
        }
        Reply::Started { refused, positions }
    }

    /// A new owner catching up from this replica: one chunk of `(p, map)` after `after`.
    pub(crate) fn on_pull(&self, from: &MemberId, p: u32, term: &Term, map: &str, after: Option<Vec<u8>>) -> Reply {
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        let data = match self.lock_fenced(p, from, term) {
            Ok(data) => data,
            Err(refusal) => return *refusal,
        };
        let Some(mp) = data.maps.get(map) else {
            return Reply::Pulled { entries: Vec::new(), next: None, term: Term::default(), seq: 0 };
        };
        let (entries, _, next) = crate::copy::chunk_after(mp, after.as_deref());
        Reply::Pulled { entries, next, term: mp.term.clone(), seq: mp.seq }
    }

    /// The owner's positions; answers those where this member is behind or in another term, and
    /// those fencing refuses.
    pub(crate) fn on_version_check(&self, from: &MemberId, versions: Vec<(u32, Term, String, u64)>) -> Reply {
        let mut behind = Vec::new();
        let mut fenced = Vec::new();
        let mut not_yet = false;
        for (p, term, map, seq) in versions {
            if p >= self.settings.partition_count {
                continue;
            }
            let data = match self.lock_fenced(p, from, &term) {
                Ok(data) => data,
                Err(refusal) if matches!(*refusal, Reply::NotYet { .. }) => {
                    not_yet = true;
                    continue;
                }
                Err(_) => {
                    fenced.push(p);
                    continue;
                }
            };
            let in_step =
                data.maps.get(&map).is_some_and(|mp| mp.term == term && mp.seq >= seq && mp.staging.is_none());
            if !in_step {
                behind.push((p, map));
            }
        }
        Reply::Versions { behind, fenced, not_yet, table: self.table().id() }
    }
}

/// A copy's buffer of changes overflowed: drop the copy (the owner starts another later).
fn abort_staging(mp: &mut MapPartition, p: u32, map: &str) -> Reply {
    mp.staging = None;
    debug!(partition = p, map, "too many changes arrived during a full copy; dropping the copy");
    Reply::NeedSync { term: mp.term.clone(), seq: mp.seq }
}
