//! Fencing: whether a replica applies a message that changes it (a replicated write, a term start,
//! a full copy, a version check) from the member that sent it. The pure rule:
//!
//! A replica applies a change of partition `p` only from the owner its own newest table names for
//! `p`, in the term that table gives that owner. Anything else is refused, and the refusal says
//! which side must catch up: a sender whose term this replica's table has moved past is **stale**
//! (it lost the partition and must stop serving it); a sender whose term comes from a table this
//! replica has not seen is **ahead** (this replica fetches that table before it can apply).
//!
//! Terms are table ids, unique across publishers (see [`crate::table`]), so two owners of one
//! partition never share a term, even when two masters published the same epoch.

use grapevine_membership::MemberId;

use crate::table::{PartitionTable, TableId, Term};

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The sender is the owner of the partition under this replica's table, in that term.
    Accept,
    /// This replica's table moved the partition past the sender's term: the sender is stale.
    Stale {
        /// This replica's table.
        table: TableId,
        /// The partition's term in it.
        term: Term,
    },
    /// The sender's term comes from a table this replica does not hold (or descend from) yet.
    Ahead,
}

/// Whether a replica holding `table` applies a change of partition `p` that `sender` sent as the
/// owner in `term`.
pub(crate) fn check(table: &PartitionTable, p: u32, sender: &MemberId, term: &Term) -> Fence {
    if table.owner(p) == Some(sender) && table.term(p) == term {
        return Fence::Accept;
    }
    if table.descends_from(term) {
        Fence::Stale { table: table.id(), term: table.term(p).clone() }
    } else {
        Fence::Ahead
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::Row;
    use proptest::prelude::*;

    fn id(name: &str) -> MemberId {
        MemberId::new(name, 1)
    }

    fn rows(owners: &[&str]) -> Vec<Row> {
        owners.iter().map(|o| vec![id(o), id("z")]).collect()
    }

    #[test]
    fn only_the_owner_in_its_term_is_accepted() {
        let t1 = PartitionTable::empty(2).successor(&id("m"), 1, rows(&["a", "b"]));
        let t2 = t1.successor(&id("m"), 2, rows(&["c", "b"]));
        assert_eq!(check(&t2, 1, &id("b"), &t1.id()), Fence::Accept, "b kept partition 1 and its term");
        assert_eq!(check(&t2, 0, &id("c"), &t2.id()), Fence::Accept);
        // a lost partition 0 in t2: stale.
        assert_eq!(check(&t2, 0, &id("a"), &t1.id()), Fence::Stale { table: t2.id(), term: t2.id() });
        // A replica still at t1 gets c's messages of t2's term: it must catch up.
        assert_eq!(check(&t1, 0, &id("c"), &t2.id()), Fence::Ahead);
        // The same epoch from another master is another term.
        let rival = t1.successor(&id("n"), 2, rows(&["c", "b"]));
        assert_eq!(check(&t2, 0, &id("c"), &rival.id()), Fence::Ahead);
        assert_ne!(check(&rival, 0, &id("c"), &t2.id()), Fence::Accept);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Along any chain of tables, a replica holding a later table never applies a change sent
        /// in an earlier term of the partition; and it always applies its own owner's.
        #[test]
        fn a_fenced_receiver_never_applies_an_older_term(owners in prop::collection::vec(prop::collection::vec(0usize..4, 4), 1..12), p in 0u32..4) {
            let names = ["a", "b", "c", "d"];
            let mut chain = vec![PartitionTable::empty(4)];
            for (k, step) in owners.iter().enumerate() {
                let owners: Vec<&str> = step.iter().map(|i| names[*i]).collect();
                let next = chain.last().unwrap().successor(&id("m"), k as u64 + 1, rows(&owners));
                chain.push(next);
            }
            let newest = chain.last().unwrap();
            let owner = newest.owner(p).unwrap().clone();
            prop_assert_eq!(check(newest, p, &owner, newest.term(p)), Fence::Accept);
            for older in &chain[1..] {
                let (sender, term) = (older.owner(p).unwrap(), older.term(p));
                if term != newest.term(p) {
                    let fenced = check(newest, p, sender, term);
                    prop_assert!(matches!(fenced, Fence::Stale { .. }), "{:?}", fenced);
                }
            }
        }
    }
}
