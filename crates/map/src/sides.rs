//! Tables from two sides: while the network was cut, each side of a partition promoted the other
//! side's members away and published tables of its own (members that start at the same moment
//! can also act as master apart for an instant). When the sides meet again, whichever table
//! every member ends up following decides whose data survives: a member drops a partition's data
//! when a table removes it from the row. The master and every follower apply the same rule, so a
//! follower never drops data that the master is about to keep.

use std::collections::BTreeSet;

use grapevine_membership::MemberId;

use crate::table::PartitionTable;

/// Whether `a` and `b` come from two sides: published by two different live members, neither of
/// which holds a replica in the other's table. A table of one lineage, even an old one a member
/// has not replaced yet, names its successor's publisher (a master holds partitions) or was
/// published by a member that is gone.
pub(crate) fn from_two_sides(a: &PartitionTable, b: &PartitionTable, live: &dyn Fn(&MemberId) -> bool) -> bool {
    let (Some(pa), Some(pb)) = (&a.master, &b.master) else { return false };
    pa != pb && live(pa) && live(pb) && !a.holds_any(pb) && !b.holds_any(pa)
}

/// Of two tables from two sides, whether `challenger` wins over `incumbent` (the table of the
/// master every member now follows): its side has more live members that the other side does not
/// have. On a tie the master's side wins. Writes made on the losing side while the sides were
/// apart are discarded.
pub(crate) fn challenger_wins(
    incumbent: &PartitionTable,
    challenger: &PartitionTable,
    live: &dyn Fn(&MemberId) -> bool,
) -> bool {
    let ours = live_members(incumbent, live);
    let theirs = live_members(challenger, live);
    theirs.difference(&ours).count() > ours.difference(&theirs).count()
}

/// The live members a table gives a replica to.
pub(crate) fn live_members(table: &PartitionTable, live: &dyn Fn(&MemberId) -> bool) -> BTreeSet<MemberId> {
    table.rows.iter().flatten().filter(|m| live(m)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> MemberId {
        MemberId::new(name, 1)
    }

    /// A table published by `publisher` whose rows cycle through `members`, two replicas each.
    fn table(publisher: &str, epoch: u64, members: &[&str]) -> PartitionTable {
        let rows = (0..12)
            .map(|p| {
                let first = p % members.len();
                let mut row = vec![id(members[first])];
                if members.len() > 1 {
                    row.push(id(members[(first + 1) % members.len()]));
                }
                row
            })
            .collect();
        PartitionTable { epoch, master: Some(id(publisher)), rows }
    }

    fn all_live(_: &MemberId) -> bool {
        true
    }

    #[test]
    fn a_healed_partition_is_two_sides_and_the_larger_wins_either_way_round() {
        let minority = table("n1", 40, &["n1"]);
        let majority = table("n2", 37, &["n2", "n3"]);
        assert!(from_two_sides(&minority, &majority, &all_live));
        assert!(from_two_sides(&majority, &minority, &all_live));
        // n1 is master after the heal (oldest): the majority's table wins over its own...
        assert!(challenger_wins(&minority, &majority, &all_live));
        // ...and a majority member keeps its table over the master's.
        assert!(!challenger_wins(&majority, &minority, &all_live));
    }

    #[test]
    fn on_a_tie_the_masters_side_wins() {
        let ours = table("n1", 10, &["n1", "n4"]);
        let theirs = table("n2", 12, &["n2", "n3"]);
        assert!(from_two_sides(&ours, &theirs, &all_live));
        assert!(!challenger_wins(&ours, &theirs, &all_live));
    }

    #[test]
    fn only_live_members_count() {
        let ours = table("n1", 10, &["n1", "n4"]);
        let theirs = table("n2", 12, &["n2", "n3", "n5"]);
        let live = |m: &MemberId| !["n3", "n5"].contains(&&*m.node_id);
        assert!(!challenger_wins(&ours, &theirs, &live), "n2 alone against n1 and n4");
        assert!(challenger_wins(&ours, &theirs, &all_live));
    }

    #[test]
    fn one_lineage_is_not_two_sides() {
        // An old table of the previous master, which the current master's table includes.
        let old = table("n1", 5, &["n1", "n2", "n3"]);
        let new = table("n2", 9, &["n1", "n2", "n3"]);
        assert!(!from_two_sides(&new, &old, &all_live));
        // A table whose publisher is gone: the previous master died.
        let orphan = table("n9", 5, &["n9", "n3"]);
        let live = |m: &MemberId| &*m.node_id != "n9";
        assert!(!from_two_sides(&table("n1", 9, &["n1", "n3"]), &orphan, &live));
        // The same publisher.
        assert!(!from_two_sides(&table("n1", 3, &["n1"]), &table("n1", 4, &["n2"]), &all_live));
    }
}
