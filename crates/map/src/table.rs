//! The partition table: for each partition, its replicas (owner first, then backups in order) and
//! the owner's replication *term*; the table's id; and its lineage. Only the master writes it;
//! every member holds a copy.
//!
//! **Ids.** A table is identified by its epoch and the master that published it ([`TableId`]).
//! Masters publish epochs above every epoch they have seen, but two members that act as master at
//! the same moment (started together, or the two sides of a network split) can publish the same
//! epoch: the publisher makes the id unique.
//!
//! **Terms.** `terms[p]` is the id of the table in which `rows[p][0]` became the owner of `p`.
//! It changes exactly when the owner does, so it is unique to one ownership of one partition:
//! every message that changes a replica carries it, and a replica applies it only from the owner
//! its own table names, in that term (see [`crate::fence`]).
//!
//! **Lineage.** A master derives each table from the one it holds. `history` lists the runs of
//! tables this one descends from, oldest first: a run is a contiguous sequence of tables one
//! master published, each derived from the previous, so `(publisher, first..=last)` covers every
//! table of that run. A table descends from another exactly when one of its runs covers the
//! other's id (see [`crate::lineage`]). A master's epochs only grow, so its runs never overlap.
//!
//! **Forks.** When a master settles a fork (a healed split, a one-way cut), the tables it decided
//! against become ancestors of its next table, so that their holders apply it as newer history:
//! their runs are listed in `forks`. A table descends from those too, but the *terms* they issued
//! are not part of its data lineage: an owner that took a partition over on the losing side wrote
//! data the master decided against, and a new owner catching up from the replicas must not pull
//! it ([`PartitionTable::term_in_lineage`], used by [`crate::takeover`]).

use grapevine_membership::MemberId;
use serde::{Deserialize, Serialize};

use crate::assign::Row;

/// How many superseded table ids a table carries (the most recent ones).
pub const SUPERSEDED_MAX: usize = 64;

/// How many runs a table's history keeps (the most recent ones). Older ancestors are then no
/// longer recognised as ancestors, which only matters for a table that has not been updated for
/// that many changes of master.
pub const HISTORY_RUNS_MAX: usize = 32;

/// Identifies one table: its epoch and the master that published it. Ordered by epoch, then
/// publisher; the order says nothing about lineage (see [`crate::lineage`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableId {
    /// The epoch.
    pub epoch: u64,
    /// The publishing master; `None` only for the empty table every member starts with.
    pub publisher: Option<MemberId>,
}

impl TableId {
    /// The id of the empty table (epoch 0).
    pub fn empty() -> Self {
        TableId { epoch: 0, publisher: None }
    }
}

impl Default for TableId {
    fn default() -> Self {
        TableId::empty()
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.publisher {
            Some(p) => write!(f, "{}/{p}", self.epoch),
            None => write!(f, "{}/-", self.epoch),
        }
    }
}

/// The replication term of a partition's owner: the id of the table that made it the owner.
pub type Term = TableId;

/// Tables `first..=last` published by `publisher`, each derived from the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The master that published the run.
    pub publisher: MemberId,
    /// Its first epoch.
    pub first: u64,
    /// Its last epoch.
    pub last: u64,
}

/// A version of the partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    /// Grows on every change. Operations carry the caller's epoch.
    pub epoch: u64,
    /// The master that published this table.
    pub master: Option<MemberId>,
    /// `rows[p]`: the replicas of partition `p`, owner first.
    pub rows: Vec<Row>,
    /// `terms[p]`: the id of the table in which `rows[p][0]` became the owner of `p`.
    pub terms: Vec<Term>,
    /// The runs of tables this one descends from, oldest first; the last one ends with this table.
    pub history: Vec<Run>,
    /// Tables other members held that a master compared with this lineage and decided against
    /// (most recent last): their holders apply this table even if it gives them no replica.
    pub superseded: Vec<TableId>,
    /// The runs of the tables a master decided against (see the [module docs](self)): this table
    /// descends from them, but their terms are not in its data lineage. At most
    /// [`HISTORY_RUNS_MAX`], the most recent last.
    pub forks: Vec<Run>,
}

/// A member's role for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Index 0.
    Owner,
    /// Index 1.. (1 is the first backup).
    Backup(usize),
    /// Not a replica.
    None,
}

impl PartitionTable {
    /// The table before any master published one: epoch 0, no owners.
    pub fn empty(partition_count: u32) -> Self {
        let count = partition_count as usize;
        PartitionTable {
            epoch: 0,
            master: None,
            rows: vec![Vec::new(); count],
            terms: vec![TableId::empty(); count],
            history: Vec::new(),
            superseded: Vec::new(),
            forks: Vec::new(),
        }
    }

    /// This table's id.
    pub fn id(&self) -> TableId {
        TableId { epoch: self.epoch, publisher: self.master.clone() }
    }

    /// Whether this table's id is `id` (without a copy of the id).
    pub fn has_id(&self, id: &TableId) -> bool {
        self.epoch == id.epoch && self.master == id.publisher
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.rows.len() as u32
    }

    /// The owner of partition `p`, if any.
    pub fn owner(&self, p: u32) -> Option<&MemberId> {
        self.rows.get(p as usize).and_then(|row| row.first())
    }

    /// The term of partition `p`'s owner.
    pub fn term(&self, p: u32) -> &Term {
        static EMPTY: std::sync::OnceLock<TableId> = std::sync::OnceLock::new();
        self.terms.get(p as usize).unwrap_or_else(|| EMPTY.get_or_init(TableId::empty))
    }

    /// The replicas of partition `p`, owner first.
    pub fn row(&self, p: u32) -> &[MemberId] {
        self.rows.get(p as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `member`'s role for partition `p`.
    pub fn role(&self, p: u32, member: &MemberId) -> Role {
        match self.row(p).iter().position(|m| m == member) {
            Some(0) => Role::Owner,
            Some(i) => Role::Backup(i),
            None => Role::None,
        }
    }

    /// The replica index of `member` for partition `p`.
    pub fn index_of(&self, p: u32, member: &MemberId) -> Option<usize> {
        self.row(p).iter().position(|m| m == member)
    }

    /// Partitions owned by `member`.
    pub fn owned_by<'a>(&'a self, member: &'a MemberId) -> impl Iterator<Item = u32> + 'a {
        self.rows.iter().enumerate().filter(move |(_, row)| row.first() == Some(member)).map(|(p, _)| p as u32)
    }

    /// True when `member` holds a replica of any partition.
    pub fn holds_any(&self, member: &MemberId) -> bool {
        self.rows.iter().any(|row| row.contains(member))
    }

    /// True when this table is `id` or descends from it (the empty table is everyone's ancestor),
    /// forks a master decided against included.
    pub fn descends_from(&self, id: &TableId) -> bool {
        covered(&self.history, id) || covered(&self.forks, id)
    }

    /// True when `term` was issued in this table's own lineage, not in a fork a master decided
    /// against: the data an owner wrote in that term is data this table keeps.
    pub fn term_in_lineage(&self, term: &Term) -> bool {
        covered(&self.history, term)
    }

    /// The table `publisher` derives from this one as epoch `epoch` with `rows`: owners that stay
    /// keep their term, new owners get the new table's id as theirs; the history gains the new
    /// table (extending the publisher's run if this table ends it).
    pub fn successor(&self, publisher: &MemberId, epoch: u64, rows: Vec<Row>) -> PartitionTable {
        assert!(epoch > self.epoch, "epoch {epoch} does not follow {}", self.epoch);
        assert_eq!(rows.len(), self.rows.len(), "a successor keeps the partition count");
        let id = TableId { epoch, publisher: Some(publisher.clone()) };
        let terms = rows
            .iter()
            .enumerate()
            .map(|(p, row)| match (row.first(), self.rows[p].first()) {
                (Some(new), Some(old)) if new == old => self.terms[p].clone(),
                _ => id.clone(),
            })
            .collect();
        let mut history = self.history.clone();
        match history.last_mut() {
            Some(run) if run.publisher == *publisher && run.last == self.epoch => run.last = epoch,
            _ => history.push(Run { publisher: publisher.clone(), first: epoch, last: epoch }),
        }
        if history.len() > HISTORY_RUNS_MAX {
            history.drain(..history.len() - HISTORY_RUNS_MAX);
        }
        let superseded = self.superseded.clone();
        let forks = self.forks.clone();
        PartitionTable { epoch, master: Some(publisher.clone()), rows, terms, history, superseded, forks }
    }

    /// True when a master decided against table `id` in this table's lineage (see
    /// [`PartitionTable::successor_superseding`]).
    pub fn supersedes(&self, id: &TableId) -> bool {
        self.superseded.contains(id)
    }

    /// Like [`PartitionTable::successor`], for a master that decided that `superseded` (tables
    /// other members hold, on other lineages) lose to this one: the new table counts them as
    /// ancestors, so the members holding them apply it as newer history (see [`crate::lineage`]).
    pub fn successor_superseding(
        &self,
        publisher: &MemberId,
        epoch: u64,
        rows: Vec<Row>,
        superseded: &[&PartitionTable],
    ) -> PartitionTable {
        let mut next = self.successor(publisher, epoch, rows);
        for table in superseded {
            if !next.superseded.contains(&table.id()) && table.id() != next.id() {
                next.superseded.push(table.id());
            }
            // Every run of the losing lineage that this one does not cover yet: members holding
            // any of its tables (laggards of the losing side included) see this one as newer.
            for run in table.history.iter().chain(&table.forks) {
                let ends = TableId { epoch: run.last, publisher: Some(run.publisher.clone()) };
                if !next.descends_from(&ends) {
                    next.forks.push(run.clone());
                }
            }
        }
        if next.superseded.len() > SUPERSEDED_MAX {
            next.superseded.drain(..next.superseded.len() - SUPERSEDED_MAX);
        }
        if next.forks.len() > HISTORY_RUNS_MAX {
            next.forks.drain(..next.forks.len() - HISTORY_RUNS_MAX);
        }
        next
    }

    /// Checks what a table received from another member must satisfy before it is used: the
    /// partition count, one term per partition, no member twice in a row, terms no newer than
    /// the table, and a history that ends with the table itself. Cheap; never panics.
    pub fn validate(&self, partition_count: u32) -> Result<(), String> {
        if self.rows.len() != partition_count as usize {
            return Err(format!(
                "it has {} partitions and this member {partition_count}; `partitions.count` must be the same on \
                 every member",
                self.rows.len()
            ));
        }
        if self.terms.len() != self.rows.len() {
            return Err(format!("it has {} terms for {} partitions", self.terms.len(), self.rows.len()));
        }
        for (p, row) in self.rows.iter().enumerate() {
            if row.len() > crate::assign::REPLICAS_MAX {
                return Err(format!(
                    "partition {p} has {} replicas, more than {}",
                    row.len(),
                    crate::assign::REPLICAS_MAX
                ));
            }
            for (i, m) in row.iter().enumerate() {
                if row[..i].contains(m) {
                    return Err(format!("partition {p}: member {m} appears twice in {row:?}"));
                }
            }
            if self.terms[p].epoch > self.epoch {
                return Err(format!(
                    "partition {p} has term {} from after the table's epoch {}",
                    self.terms[p], self.epoch
                ));
            }
        }
        if self.epoch > 0 {
            let own = self.history.last().is_some_and(|run| {
                Some(&run.publisher) == self.master.as_ref() && run.last == self.epoch && run.first <= run.last
            });
            if !own || self.history.len() > HISTORY_RUNS_MAX {
                return Err(format!("its history does not end with the table itself ({})", self.id()));
            }
            if self.forks.len() > HISTORY_RUNS_MAX {
                return Err(format!("it lists {} forks, more than {HISTORY_RUNS_MAX}", self.forks.len()));
            }
            if self.superseded.len() > SUPERSEDED_MAX {
                return Err(format!(
                    "it lists {} superseded tables, more than {SUPERSEDED_MAX}",
                    self.superseded.len()
                ));
            }
        }
        Ok(())
    }
}

/// True when one of `runs` covers `id` (the empty table is covered by anything).
fn covered(runs: &[Run], id: &TableId) -> bool {
    let Some(publisher) = &id.publisher else { return true };
    id.epoch == 0 || runs.iter().any(|run| run.publisher == *publisher && run.first <= id.epoch && id.epoch <= run.last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> MemberId {
        MemberId::new(name, 1)
    }

    fn rows(owners: &[&str]) -> Vec<Row> {
        owners.iter().map(|o| vec![id(o)]).collect()
    }

    #[test]
    fn successors_keep_the_terms_of_owners_that_stay_and_start_terms_for_new_ones() {
        let t0 = PartitionTable::empty(3);
        let t1 = t0.successor(&id("a"), 1, rows(&["a", "a", "b"]));
        assert!(t1.terms.iter().all(|t| *t == t1.id()), "every owner is new in the first table");
        let t2 = t1.successor(&id("a"), 2, rows(&["a", "c", "b"]));
        assert_eq!(t2.terms[0], t1.id());
        assert_eq!(t2.terms[1], t2.id(), "partition 1 changed owner");
        assert_eq!(t2.terms[2], t1.id());
        assert_eq!(t2.history, vec![Run { publisher: id("a"), first: 1, last: 2 }]);
        assert!(t2.validate(3).is_ok());
    }

    #[test]
    fn a_new_publisher_starts_a_run_and_descent_follows_the_runs() {
        let t1 = PartitionTable::empty(2).successor(&id("a"), 1, rows(&["a", "b"]));
        let t2 = t1.successor(&id("a"), 2, rows(&["a", "b"]));
        let t5 = t2.successor(&id("b"), 5, rows(&["b", "b"]));
        assert_eq!(t5.history.len(), 2);
        for ancestor in [&t1, &t2, &t5] {
            assert!(t5.descends_from(&ancestor.id()));
        }
        assert!(t5.descends_from(&TableId::empty()));
        // a's table 3, published on a fork after t2, is not an ancestor of t5.
        let fork = t2.successor(&id("a"), 3, rows(&["a", "a"]));
        assert!(!t5.descends_from(&fork.id()));
        assert!(!fork.descends_from(&t5.id()));
    }

    #[test]
    fn superseded_tables_become_ancestors_without_changing_the_rows_or_terms() {
        let base = PartitionTable::empty(2).successor(&id("a"), 1, rows(&["a", "b"]));
        let other = base.successor(&id("b"), 4, rows(&["b", "b"]));
        let next = base.successor_superseding(&id("a"), 5, rows(&["a", "b"]), &[&other, &base]);
        assert!(next.descends_from(&other.id()) && next.descends_from(&base.id()));
        assert!(next.supersedes(&other.id()) && next.supersedes(&base.id()));
        assert!(next.successor(&id("a"), 6, rows(&["a", "b"])).supersedes(&other.id()), "carried on");
        assert_eq!(next.terms, base.terms);
        assert!(next.validate(2).is_ok());
        assert_eq!(next.history.last().unwrap().publisher, id("a"));
    }

    #[test]
    fn terms_a_losing_fork_issued_are_not_in_the_winners_data_lineage() {
        // a publishes 1..=2; a split: a alone takes partition 1 over in 3..=4 (its own run goes
        // on), b publishes 3 on the other side, keeping b as the owner of partition 1.
        let t1 = PartitionTable::empty(2).successor(&id("a"), 1, rows(&["a", "b"]));
        let t2 = t1.successor(&id("a"), 2, rows(&["a", "b"]));
        let minority = t2.successor(&id("a"), 3, rows(&["a", "a"])).successor(&id("a"), 4, rows(&["a", "a"]));
        let majority = t2.successor(&id("b"), 3, rows(&["b", "b"]));
        // The heal: b's side wins; a's fork is superseded.
        let next = majority.successor_superseding(&id("a"), 5, majority.rows.clone(), &[&minority, &t2]);
        assert!(next.descends_from(&minority.id()), "a's members apply it as newer history");
        assert!(next.validate(2).is_ok());
        assert!(next.term_in_lineage(&t1.id()), "terms from before the fork are kept");
        assert!(next.term_in_lineage(majority.term(0)));
        assert!(!next.term_in_lineage(minority.term(1)), "the minority's take-over term lost");
        assert_eq!(minority.term(1).epoch, 3);
        // Carried on by later tables, and bounded.
        let later = next.successor(&id("a"), 6, next.rows.clone());
        assert!(later.descends_from(&minority.id()) && !later.term_in_lineage(minority.term(1)));
        assert!(later.forks.len() <= HISTORY_RUNS_MAX);
    }

    #[test]
    fn history_is_bounded() {
        let mut t = PartitionTable::empty(1);
        for e in 1..=(HISTORY_RUNS_MAX as u64 + 10) {
            let publisher = if e % 2 == 0 { "a" } else { "b" };
            t = t.successor(&id(publisher), e, rows(&[publisher]));
        }
        assert_eq!(t.history.len(), HISTORY_RUNS_MAX);
        assert!(t.validate(1).is_ok());
    }

    #[test]
    fn invalid_tables_are_refused_with_a_reason() {
        let good = PartitionTable::empty(2).successor(&id("a"), 1, rows(&["a", "b"]));
        assert!(good.validate(3).unwrap_err().contains("partitions.count"));
        let mut twice = good.clone();
        twice.rows[0] = vec![id("a"), id("a")];
        assert!(twice.validate(2).unwrap_err().contains("twice"));
        let mut no_terms = good.clone();
        no_terms.terms.pop();
        assert!(no_terms.validate(2).is_err());
        let mut future_term = good.clone();
        future_term.terms[0].epoch = 9;
        assert!(future_term.validate(2).is_err());
        let mut no_history = good;
        no_history.history.clear();
        assert!(no_history.validate(2).unwrap_err().contains("history"));
    }
}
