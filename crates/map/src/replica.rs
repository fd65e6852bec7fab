//! The backup's side of a partition: apply the owner's changes strictly in sequence, and ask for
//! a full copy whenever the sequence cannot continue (a gap, a new owner's term that does not
//! start where this backup stands, or a map partition this member never had).

use grapevine_membership::MemberId;
use tracing::debug;

use crate::messages::{Msg, ReplOp, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::record::{Record, now_ms};
use crate::store::MapPartition;

impl Node {
    /// A replicated change from `from`, the owner of `p` (as far as it knows).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_backup(
        &self,
        from: &MemberId,
        epoch: u64,
        p: u32,
        map: &str,
        term: u64,
        seq: u64,
        op: &ReplOp,
    ) -> Reply {
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        let table = self.table();
        if table.epoch > epoch && table.owner(p) != Some(from) {
            // A newer table moved the partition away from the sender: refuse, so it learns.
            return Reply::Stale { epoch: table.epoch };
        }
        let mut data = self.slot(p).data.lock().unwrap();
        let mp = data.maps.entry(map.to_string()).or_insert_with(|| MapPartition::new(term));
        if mp.term == term && seq == mp.seq + 1 {
            mp.apply_repl(op);
            mp.seq = seq;
            Reply::Ack
        } else if mp.term == term && seq <= mp.seq {
            // Already applied (a full copy overtook it).
            Reply::Ack
        } else {
            debug!(partition = p, map, have = ?(mp.term, mp.seq), got = ?(term, seq), "backup out of sequence");
            Reply::NeedSync { term: mp.term, seq: mp.seq }
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

    /// A new owner's term starts: a map partition exactly at the old position continues in the
    /// new term; any other will fail the sequence check on the next change and be copied in full.
    pub(crate) fn on_term_start(&self, p: u32, term: u64, bases: Vec<(String, u64, u64)>) {
        if p >= self.settings.partition_count {
            return;
        }
        let mut data = self.slot(p).data.lock().unwrap();
        for (map, base_term, base_seq) in bases {
            if let Some(mp) = data.maps.get_mut(&map) {
                if mp.term == base_term && mp.seq == base_seq {
                    mp.term = term;
                } else {
                    debug!(partition = p, map, have = ?(mp.term, mp.seq), base = ?(base_term, base_seq), "diverged from the new owner");
                }
            }
        }
    }

    /// One chunk of a full copy.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_install(
        &self,
        p: u32,
        map: &str,
        term: u64,
        seq: u64,
        chunk: u32,
        last: bool,
        entries: Vec<(Vec<u8>, Record)>,
    ) -> Reply {
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        let mut data = self.slot(p).data.lock().unwrap();
        data.last_install_ms = now_ms();
        let mp = data.maps.entry(map.to_string()).or_default();
        if chunk == 0 {
            mp.staging = Some((0, Vec::new()));
        }
        match mp.staging.as_mut() {
            Some((next, staged)) if *next == chunk => {
                staged.extend(entries);
                *next += 1;
            }
            _ => {
                // A chunk of a copy whose start was lost: drop it; the owner's check that follows
                // every copy will report the mismatch and send a new one.
                mp.staging = None;
                return Reply::Ack;
            }
        }
        if last {
            debug!(local = %self.local, partition = p, map, term, seq, "full copy installed");
            let (_, staged) = mp.staging.take().unwrap_or_default();
            mp.install(term, seq, staged);
        }
        Reply::Ack
    }

    /// The owner's positions; answers those where this member is behind or in another term.
    pub(crate) fn on_version_check(&self, versions: Vec<(u32, String, u64, u64)>) -> Reply {
        let mut mismatched = Vec::new();
        for (p, map, term, seq) in versions {
            if p >= self.settings.partition_count {
                continue;
            }
            let data = self.slot(p).data.lock().unwrap();
            let in_step =
                data.maps.get(&map).is_some_and(|mp| mp.term == term && mp.seq >= seq && mp.staging.is_none());
            if !in_step {
                mismatched.push((p, map));
            }
        }
        Reply::Mismatch { partitions: mismatched }
    }
}
