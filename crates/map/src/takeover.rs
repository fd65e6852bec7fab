//! A member becoming the owner of a partition (promotion after a loss, a migration's commit, or a
//! side switch after a split) starts its term with a small view change, before it takes writes:
//!
//! 1. **Probe.** Every other replica of the row, and every other active member (a table that
//!    flapped can have dropped from the row the member that still holds the data), answers where
//!    it stands for each map (`TermStart` without bases). Fencing applies: a member that has not
//!    seen the table yet answers "not yet" and fetches it, and the probe is repeated.
//! 2. **Catch up.** Of the positions whose term belongs to the table's lineage (the table
//!    descends from the term's table), the furthest along wins; if it is a replica's rather than
//!    this member's, this member pulls that replica's copy first ([`Msg::Pull`]). A promoted
//!    backup normally holds every acknowledged write already; this covers the member that adopted
//!    a table of another side together with data of its own side, or an asynchronous backup
//!    promoted past a synchronous one: the new owner never has less than the best surviving
//!    replica. Positions in terms of other lineages are data a master decided against.
//! 3. **Start.** The owner tells every replica where each map continues in the new term; a
//!    replica exactly there continues, any other is copied in full on the next change. Writes
//!    are taken once the synchronous backups accepted (or `backup_ack_timeout` passed).
//!
//! Reads and writes of the partition wait meanwhile (the owner answers "retry").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::codec;
use tracing::{debug, info, warn};

use crate::messages::{Msg, Reply, TermStart};
use crate::node::{MAP_SERVICE, Node};
use crate::record::Record;
use crate::store::MapPartition;
use crate::table::{TableId, Term};

/// A partition this member takes over in a table.
#[derive(Debug, Clone)]
pub(crate) struct TakeOver {
    pub(crate) partition: u32,
    pub(crate) term: Term,
    /// The other replicas of the row: they start the term.
    pub(crate) replicas: Vec<MemberId>,
    /// The members asked where they stand: the replicas and every other active member.
    pub(crate) probed: Vec<MemberId>,
    /// Those that must accept the term before writes (the maps' synchronous backups).
    pub(crate) must_accept: Vec<MemberId>,
}

/// Where one replica stands for each map of one partition.
type Positions = HashMap<(u32, MemberId), Vec<(String, Term, u64)>>;

impl Node {
    /// Runs the view change of every partition this member took over in `table`.
    pub(crate) async fn take_over_partitions(self: Arc<Self>, table: TableId, takeovers: Vec<TakeOver>) {
        let deadline = Instant::now() + self.settings.backup_ack_timeout;
        let positions = self.probe_replicas(&table, &takeovers, deadline).await;
        for takeover in &takeovers {
            if let Err(error) = self.catch_up_from_replicas(takeover, &positions).await {
                warn!(partition = takeover.partition, %error, "could not catch up from a replica before taking over");
            }
        }
        self.start_terms(&table, &takeovers, deadline).await;
    }

    /// Phase 1: asks every replica of the partitions taken over where it stands.
    async fn probe_replicas(&self, table: &TableId, takeovers: &[TakeOver], deadline: Instant) -> Positions {
        let mut per_replica: HashMap<MemberId, Vec<TermStart>> = HashMap::new();
        for t in takeovers {
            for member in &t.probed {
                let probe = TermStart { partition: t.partition, term: t.term.clone(), bases: None };
                per_replica.entry(member.clone()).or_default().push(probe);
            }
        }
        let mut positions = Positions::new();
        self.exchange_term_starts(table, per_replica, deadline, |member, p, found| {
            positions.entry((p, member.clone())).or_default().extend(found);
        })
        .await;
        positions
    }

    /// Phase 2 for one partition: pulls the furthest copy of each map in the table's lineage, if
    /// a replica holds one further than this member's.
    async fn catch_up_from_replicas(&self, takeover: &TakeOver, positions: &Positions) -> Result<(), String> {
        let p = takeover.partition;
        let table = self.table();
        if table.owner(p) != Some(&self.local) || *table.term(p) != takeover.term {
            return Ok(());
        }
        let own: HashMap<String, OwnPosition> = {
            let data = self.slot(p).data.lock().unwrap();
            data.maps
                .iter()
                .map(|(name, mp)| (name.clone(), (mp.term.clone(), mp.seq, mp.continued_from.clone())))
                .collect()
        };
        // Terms of forks the master decided against are not: their data lost (see `table`).
        let in_lineage = |term: &Term| table.term_in_lineage(term);
        let replicas = takeover.probed.iter().map(|replica| {
            let found = positions.get(&(p, replica.clone())).map(Vec::as_slice).unwrap_or(&[]);
            (replica, found)
        });
        let best = furthest_in_lineage(&own, replicas, in_lineage);
        for (name, (from, term, seq)) in best {
            let Some(from) = from else { continue };
            info!(
                partition = p,
                map = %name,
                %from,
                ours = ?own.get(&name),
                theirs = ?(&term, seq),
                "a replica is further along than this new owner: catching up from it before taking over"
            );
            let (entries, term, seq) = self.pull(&from, p, &takeover.term, &name).await?;
            let mut data = self.slot(p).data.lock().unwrap();
            let mut caught_up = MapPartition::new(term.clone());
            caught_up.install(term, seq, entries);
            data.maps.insert(name, caught_up);
        }
        for (name, _) in
            own.iter().filter(|(name, (term, ..))| !in_lineage(term) && !positions_have(positions, p, name))
        {
            debug!(partition = p, map = %name, "no replica holds this map in the table's lineage; keeping this member's copy");
        }
        Ok(())
    }

    /// Pulls map `map` of partition `p` from `from`, chunk by chunk.
    async fn pull(
        &self,
        from: &MemberId,
        p: u32,
        term: &Term,
        map: &str,
    ) -> Result<(Vec<(Vec<u8>, Record)>, Term, u64), String> {
        let deadline = Instant::now() + self.settings.migration_timeout;
        let mut entries = Vec::new();
        let mut after = None;
        // Bounded: every round either advances the cursor or ends.
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!(
                    "pulling partition {p} from {from} took longer than {:?}",
                    self.settings.migration_timeout
                ));
            }
            let msg = Node::encode(&Msg::Pull {
                partition: p,
                term: term.clone(),
                map: map.to_string(),
                after: after.take(),
            });
            let bytes = self.net.request(from, MAP_SERVICE, msg, remaining).await.map_err(|e| e.to_string())?;
            match codec::decode::<Reply>(&bytes) {
                Ok(Reply::Pulled { entries: chunk, next, term, seq }) => {
                    entries.extend(chunk);
                    match next {
                        Some(key) => after = Some(key),
                        None => return Ok((entries, term, seq)),
                    }
                }
                Ok(Reply::NotYet { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(other) => return Err(format!("{from} refused the pull: {other:?}")),
                Err(e) => return Err(format!("undecodable answer from {from}: {e}")),
            }
        }
    }

    /// Phase 3: starts the terms on every replica with this member's (caught-up) positions, and
    /// opens each partition for writes once its synchronous backups accepted.
    async fn start_terms(&self, table: &TableId, takeovers: &[TakeOver], deadline: Instant) {
        let mut per_replica: HashMap<MemberId, Vec<TermStart>> = HashMap::new();
        let current = self.table();
        for t in takeovers {
            let p = t.partition;
            if current.owner(p) != Some(&self.local) || *current.term(p) != t.term {
                continue;
            }
            let bases = {
                let mut data = self.slot(p).data.lock().unwrap();
                let mut bases = Vec::with_capacity(data.maps.len());
                for (name, mp) in &mut data.maps {
                    bases.push((name.clone(), mp.term.clone(), mp.seq));
                    mp.continue_in(t.term.clone());
                }
                bases
            };
            for replica in &t.replicas {
                let start = TermStart { partition: p, term: t.term.clone(), bases: Some(bases.clone()) };
                per_replica.entry(replica.clone()).or_default().push(start);
            }
        }
        let mut accepted: std::collections::HashSet<(MemberId, u32)> = std::collections::HashSet::new();
        self.exchange_term_starts(table, per_replica, deadline, |member, p, _| {
            accepted.insert((member.clone(), p));
        })
        .await;
        for t in takeovers {
            let all = t.must_accept.iter().all(|b| accepted.contains(&(b.clone(), t.partition)) || !self.is_live(b));
            if !all {
                warn!(partition = t.partition, term = %t.term, "not every synchronous backup accepted the new term in time; taking writes anyway");
            }
            let mut data = self.slot(t.partition).data.lock().unwrap();
            if data.term == t.term {
                data.starting = false;
            }
        }
    }

    /// Sends term starts (probes or starts) to each replica, retrying those refused "not yet"
    /// until `deadline`; calls `accepted(replica, partition, positions)` for each accepted one.
    async fn exchange_term_starts(
        &self,
        table: &TableId,
        mut per_replica: HashMap<MemberId, Vec<TermStart>>,
        deadline: Instant,
        mut accepted: impl FnMut(&MemberId, u32, Vec<(String, Term, u64)>),
    ) {
        loop {
            let mut calls = tokio::task::JoinSet::new();
            for (member, starts) in per_replica.drain() {
                let msg = Node::encode(&Msg::TermStart { table: table.clone(), starts: starts.clone() });
                let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                let reply = self.net.request(&member, MAP_SERVICE, msg, remaining);
                calls.spawn(async move { (member, starts, reply.await) });
            }
            while let Some(joined) = calls.join_next().await {
                let Ok((member, starts, reply)) = joined else { continue };
                let (refused, positions) = match reply.map(|b| codec::decode::<Reply>(&b)) {
                    Ok(Ok(Reply::Started { refused, positions })) => (refused, positions),
                    Ok(other) => {
                        debug!(%member, reply = ?other, "unexpected answer to a term start");
                        continue;
                    }
                    Err(error) => {
                        if self.is_live(&member) && Instant::now() < deadline {
                            debug!(%member, %error, "term start not answered; retrying");
                            per_replica.insert(member, starts);
                        }
                        continue;
                    }
                };
                let mut retry = Vec::new();
                for start in starts {
                    match refused.iter().find(|(p, _)| *p == start.partition).map(|(_, r)| &**r) {
                        None => {
                            let found = positions
                                .iter()
                                .filter(|(p, ..)| *p == start.partition)
                                .map(|(_, map, term, seq)| (map.clone(), term.clone(), *seq))
                                .collect();
                            accepted(&member, start.partition, found);
                        }
                        Some(Reply::NotYet { .. }) => retry.push(start),
                        Some(Reply::Fenced { table: theirs, .. }) => {
                            self.fence_partition(start.partition, theirs, &member)
                        }
                        Some(other) => {
                            debug!(%member, partition = start.partition, reply = ?other, "term start refused")
                        }
                    }
                }
                if !retry.is_empty() {
                    per_replica.insert(member, retry);
                }
            }
            if per_replica.is_empty() || Instant::now() >= deadline || self.cancel.is_cancelled() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A map's position in this member's copy: its term and sequence, and where it continued from
/// into that term ([`MapPartition::continued_from`]).
type OwnPosition = (Term, u64, Option<(Term, u64)>);

/// Per map, the furthest position in the lineage (`in_lineage`) among this member's copy (`None`)
/// and the replicas' (`replicas`: each with the `(map, term, seq)` it reported). Pure.
///
/// This member's copy counts at its position if its term is in the lineage; if it continued in a
/// term the winner decided against from a position of the lineage, at that position: it holds the
/// lineage up to there (and its own side's writes after it, which stay). A replica not as far
/// along is older, and pulling it would drop writes acknowledged before the fork (harness seed
/// 163: a new owner whose copy had forked off replaced it with a stale copy held by a member
/// outside the map's replicas, and lost writes acknowledged in a settled cluster).
fn furthest_in_lineage<'a>(
    own: &HashMap<String, OwnPosition>,
    replicas: impl Iterator<Item = (&'a MemberId, &'a [(String, Term, u64)])>,
    in_lineage: impl Fn(&Term) -> bool,
) -> HashMap<String, (Option<MemberId>, Term, u64)> {
    let mut best: HashMap<String, (Option<MemberId>, Term, u64)> = HashMap::new();
    for (name, (term, seq, continued_from)) in own {
        if in_lineage(term) {
            best.insert(name.clone(), (None, term.clone(), *seq));
        } else if let Some((before, at)) = continued_from.as_ref().filter(|(before, _)| in_lineage(before)) {
            best.insert(name.clone(), (None, before.clone(), *at));
        }
    }
    for (replica, found) in replicas {
        for (name, term, seq) in found {
            if !in_lineage(term) {
                continue;
            }
            let better = best.get(name).is_none_or(|(_, t, s)| (term.epoch, *seq) > (t.epoch, *s));
            if better {
                best.insert(name.clone(), (Some(replica.clone()), term.clone(), *seq));
            }
        }
    }
    best
}

fn positions_have(positions: &Positions, p: u32, map: &str) -> bool {
    positions.iter().any(|((q, _), found)| *q == p && found.iter().any(|(name, ..)| name == map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(epoch: u64, by: &str) -> Term {
        TableId { epoch, publisher: Some(MemberId::new(by, 1)) }
    }

    #[test]
    fn a_copy_that_forked_off_counts_at_the_position_it_continued_from() {
        let (kept, lost) = (term(66, "a"), term(106, "b"));
        let in_lineage = |t: &Term| *t == kept;
        let stale = MemberId::new("c", 1);
        let stale_positions = vec![("m".to_string(), kept.clone(), 1)];
        let replicas = || std::iter::once((&stale, stale_positions.as_slice()));
        // Forked off at seq 40 of the kept term: the stale replica at 1 is older; keep this copy.
        let own: HashMap<String, OwnPosition> =
            [("m".to_string(), (lost.clone(), 53, Some((kept.clone(), 40))))].into_iter().collect();
        let best = furthest_in_lineage(&own, replicas(), in_lineage);
        assert_eq!(best["m"], (None, kept.clone(), 40));
        // Without knowing where it forked off, the copy is the losing side's alone: the replica's
        // is the lineage's furthest.
        let own: HashMap<String, OwnPosition> = [("m".to_string(), (lost.clone(), 53, None))].into_iter().collect();
        assert_eq!(furthest_in_lineage(&own, replicas(), in_lineage)["m"], (Some(stale.clone()), kept.clone(), 1));
        // A replica further along in the lineage than the fork point is pulled.
        let ahead = vec![("m".to_string(), kept.clone(), 41)];
        let own: HashMap<String, OwnPosition> =
            [("m".to_string(), (lost, 53, Some((kept.clone(), 40))))].into_iter().collect();
        let best = furthest_in_lineage(&own, std::iter::once((&stale, ahead.as_slice())), in_lineage);
        assert_eq!(best["m"], (Some(stale), kept, 41));
    }
}
