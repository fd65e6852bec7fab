//! Which partition table survives when members hold different ones: the pure rules.
//!
//! A member drops a partition's data when a table it applies removes it from the row, so the
//! table members end up holding decides whose data survives.
//!
//! **Followers** apply a table from their master only when it is newer history: it descends from
//! the one they hold ([`follower_applies`]). They never judge a fork themselves. And a follower
//! that is alive and eligible refuses a table that takes every replica away from it: its master
//! then believes it dead (the master cannot hear it, or hears nobody), and applying the table
//! would drop data that its own side keeps writing; the master settles it as two sides once it
//! hears the follower again.
//!
//! **The master** decides forks, with the tables every eligible member holds right now (it asks
//! each of them; gossip can be stale right after a heal), by grouping members into **sides**
//! ([`sides`]): a member belongs with the newest table that descends from its own *and still gives
//! it replicas*. A table that dropped a member from every row was made by a side that declared
//! that member gone; a member that kept working under an older table on its own side is not a
//! laggard of the newer one but the other side of a split. The **largest side wins** (ties: the
//! side whose table descends from the other's, as it carries the later decisions; then the side
//! whose table names more members, as the master may have heard only part of a side so far; then
//! the side with the oldest member), and the master publishes a successor of the winner that lists
//! the losing tables as ancestors ([`crate::table::PartitionTable::successor_superseding`]), so
//! their holders apply it as newer history.
//!
//! What the tables alone do not tell, the master learns from the members and the tables'
//! publishers ([`sides_seen`]). A member that refused its master's table, because it drops a member
//! this one still hears, is not that table's laggard although the table descends from its own and
//! gives it replicas: it is on the dropped member's side (but a table that supersedes the refused
//! one, a master's decision against it, is not its descendant here). A member that still holds the table two
//! sides forked from (its master's next table never reached it, and it ignored the other side's
//! master while it had not declared its own dead yet) descends into both; it belongs with the side
//! whose master reached it, and when both did, with the side whose master it follows as it
//! answers. Each member remembers the tables it refused and those it received from other
//! masters, and reports them with its own and the master it follows ([`Noted`]); so does the
//! master that asks. And a side's table published
//! during the split by a member that has not answered yet (at a heal, the master hears part of the
//! other side a gossip round before the rest) counts that publisher with its side, as it was
//! there; otherwise the master would judge a side by the half it heard first.
//!
//! Why sides and not the tables alone: a one-way cut looks the same in the tables whichever way it
//! runs. Member `a` cut off from sending hears `b` and `c` (heartbeats travel in their requests),
//! so its table still names them, while `b` and `c` declare `a` dead and publish tables without it:
//! `a` alone is the side that lost. Member `c` cut off from receiving hears nobody and publishes a
//! table with only itself, descending from the one `a` and `b` keep using, because they still hear
//! `c`'s heartbeats and never publish: `c` alone is the side that lost, although its table is the
//! newer one. Counting who holds what gets both right; "newer table wins" or "oldest member wins"
//! gets one of them wrong. Who leads (the oldest member) never decides whose data is kept.

use std::collections::{BTreeMap, BTreeSet};

use grapevine_membership::MemberId;

use crate::table::{PartitionTable, TableId};

/// How `incoming` relates to `current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relation {
    /// The same table.
    Same,
    /// `incoming` descends from `current`.
    Newer,
    /// `current` descends from `incoming`.
    Older,
    /// Neither descends from the other.
    Forked,
}

/// How `incoming` relates to `current`.
pub(crate) fn relation(current: &PartitionTable, incoming: &PartitionTable) -> Relation {
    let (c, i) = (current.id(), incoming.id());
    if c == i {
        Relation::Same
    } else if incoming.descends_from(&c) {
        Relation::Newer
    } else if current.descends_from(&i) {
        Relation::Older
    } else {
        Relation::Forked
    }
}

/// Whether `member`, holding `current`, applies `incoming`, a table its master published: only
/// newer history, and (while the member is `staying`, not leaving) not one that takes every
/// replica away from it, unless the master explicitly decided against `current`.
pub(crate) fn follower_applies(
    current: &PartitionTable,
    incoming: &PartitionTable,
    member: &MemberId,
    staying: bool,
) -> bool {
    relation(current, incoming) == Relation::Newer
        && (incoming.supersedes(&current.id())
            || !(staying && current.epoch > 0 && current.holds_any(member) && !incoming.holds_any(member)))
}

/// A member, other than the follower, that `incoming` takes every replica away from although the
/// follower sees it alive (`alive`: active, not excluded). The master declared it dead while this
/// follower still hears it: the master's own gossip may be cut while its data plane still reaches
/// the followers, so applying its table would hand the member's partitions to a side that can
/// lose (writes acknowledged under it would be dropped when the sides meet). The follower waits
/// until it too declares the member dead (or the master keeps it). A table that explicitly
/// supersedes the follower's (a master that settled a fork) is not held back.
pub(crate) fn drops_a_live_member<'a>(
    current: &'a PartitionTable,
    incoming: &PartitionTable,
    follower: &MemberId,
    alive: impl Fn(&MemberId) -> bool,
) -> Option<&'a MemberId> {
    if current.epoch == 0 || incoming.supersedes(&current.id()) {
        return None;
    }
    let mut held: Vec<&MemberId> = current.rows.iter().flatten().collect();
    held.sort();
    held.dedup();
    held.into_iter().find(|m| *m != follower && alive(m) && !incoming.holds_any(m))
}

/// Whether a member holding `theirs` is simply behind a master holding `ours` (it will apply
/// ours): `theirs` is an ancestor of ours and ours still gives the member replicas (or never did).
/// Otherwise the member is a side of its own, to settle with [`sides`].
pub(crate) fn is_laggard(ours: &PartitionTable, theirs: &PartitionTable, member: &MemberId) -> bool {
    theirs.id() == ours.id()
        || (ours.descends_from(&theirs.id())
            && (ours.supersedes(&theirs.id()) || ours.holds_any(member) || !theirs.holds_any(member)))
}

/// What a member reports with its table for the master that settles a split ([`sides_seen`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Noted {
    /// Tables it received from other masters than its own, which it ignored: they reached it.
    pub(crate) seen: Vec<TableId>,
    /// Tables of its own master it refused, newer history than its own: they drop a member it
    /// still hears (or every replica of its own), so it was not on their side.
    pub(crate) refused: Vec<TableId>,
    /// The master it followed when it answered: of several sides that reached it, the one whose
    /// master it follows now (it declared the others' dead, or never did).
    pub(crate) follows: Option<MemberId>,
}

/// The sides the master found: each table some member belongs with, its members, and the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sides {
    /// Per table id: the members that belong with it.
    pub(crate) sides: BTreeMap<TableId, BTreeSet<MemberId>>,
    /// Per table id: the member that published it during the split and did not answer (it is not
    /// back in the master's view yet), counted with the side its table's holders are on.
    pub(crate) presumed: BTreeMap<TableId, MemberId>,
    /// The winning table.
    pub(crate) winner: TableId,
}

impl Sides {
    /// How many members a side counts: those that answered, and its table's publisher if it did
    /// not answer.
    pub(crate) fn size(&self, id: &TableId) -> usize {
        side_size(&self.sides, &self.presumed, id)
    }
}

/// [`Sides::size`], before the winner is known.
fn side_size(
    sides: &BTreeMap<TableId, BTreeSet<MemberId>>,
    presumed: &BTreeMap<TableId, MemberId>,
    id: &TableId,
) -> usize {
    sides.get(id).map_or(0, BTreeSet::len) + usize::from(presumed.contains_key(id))
}

/// [`sides_seen`] without knowing which tables the members saw.
#[cfg(test)]
pub(crate) fn sides(held: &[(MemberId, &PartitionTable)]) -> Option<Sides> {
    sides_seen(held, &BTreeMap::new())
}

/// Groups `held` (each eligible member and the table it holds) into sides and picks the winner:
/// see the [module documentation](self). `noted` gives, per member, what it reported besides its
/// table ([`Noted`]): a table it refused (or a descendant of one) is not a table it would follow;
/// and a member holding the table two sides forked from (its own master's next table never
/// reached it) belongs with the sides whose masters reached it, when that tells them apart.
/// `None` when nobody holds a table yet.
pub(crate) fn sides_seen(held: &[(MemberId, &PartitionTable)], noted: &BTreeMap<MemberId, Noted>) -> Option<Sides> {
    let mut all: Vec<&PartitionTable> = Vec::new();
    for (_, table) in held {
        if table.epoch > 0 && !all.iter().any(|t| t.id() == table.id()) {
            all.push(table);
        }
    }
    // A table published by a member that did not answer (the master no longer hears it), which
    // took every replica away from a member that did answer, records a decision made on the other
    // side of a cut: its publisher declared that member dead while members it still reached
    // applied it. It does not carry the later decisions of this side; its holders belong with the
    // newest table before it.
    let answered: BTreeSet<&MemberId> = held.iter().map(|(m, _)| m).collect();
    let from_the_other_side = |t: &PartitionTable| {
        t.id().publisher.as_ref().is_some_and(|p| !answered.contains(p))
            && answered.iter().any(|m| {
                !t.holds_any(m) && all.iter().any(|u| u.id() != t.id() && t.descends_from(&u.id()) && u.holds_any(m))
            })
    };
    let tables: Vec<&PartitionTable> = all.iter().copied().filter(|t| !from_the_other_side(t)).collect();
    let mut sides: BTreeMap<TableId, BTreeSet<MemberId>> = BTreeMap::new();
    for (member, own) in held {
        if own.epoch == 0 {
            continue;
        }
        let own: &PartitionTable = if tables.iter().any(|t| t.id() == own.id()) {
            own
        } else {
            match tables.iter().copied().filter(|t| own.descends_from(&t.id())).max_by_key(|t| t.id()) {
                Some(before) => before,
                None => own,
            }
        };
        // The tables this member would follow as newer history: its own, and those that descend
        // from it and still give it replicas, but not one it refused (nor a descendant of one):
        // it heard the member that table drops. A table that descends from a refused one only
        // because a master decided against it (it superseded the refused table: harness seed 240,
        // a member that refused the flapping master's table then counted on no side of the tables
        // the winner published after that decision) is not a descendant.
        let noted = noted.get(member);
        let refused = |t: &PartitionTable| {
            noted.is_some_and(|n| n.refused.iter().any(|r| !own.descends_from(r) && t.term_in_lineage(r)))
        };
        let mut candidates: Vec<&PartitionTable> = tables
            .iter()
            .copied()
            .filter(|t| t.id() == own.id() || (t.descends_from(&own.id()) && t.holds_any(member) && !refused(t)))
            .collect();
        // A table from the other side none of whose ancestors is held (histories are bounded, so
        // an old ancestor may no longer show): its holder is a side of its own rather than none.
        if !tables.iter().any(|t| t.id() == own.id()) {
            candidates.push(own);
        }
        // The newest of them (several when it held the point two forks started from).
        let newest: Vec<&PartitionTable> = candidates
            .iter()
            .copied()
            .filter(|t| !candidates.iter().any(|o| o.id() != t.id() && o.descends_from(&t.id())))
            .collect();
        // Of several, those whose masters reached this member during the split (it received
        // their table, or an ancestor of it newer than its own, from its publisher): the others
        // could not, or it would hold their table.
        let reached: Vec<&PartitionTable> = match noted {
            Some(noted) if newest.len() > 1 => newest
                .iter()
                .copied()
                .filter(|t| noted.seen.iter().any(|s| !own.descends_from(s) && t.descends_from(s)))
                .collect(),
            _ => Vec::new(),
        };
        let belongs = if reached.is_empty() { newest } else { reached };
        // Still several (every side's master reached it: it ignored the other side's master
        // while it followed its own, then declared its own dead and ignored it when it came
        // back): the side whose master it follows at the heal. Its data is on that side, and
        // writes through it went there (seed 2 of `faults_netns`: at the end of a one-way cut of
        // the master a, c holds the fork point, follows b and is about to apply b's table; on
        // both sides, c made a's lone side as large as b's, and a's table, naming more members,
        // won and dropped the writes of b and c).
        let followed: Vec<&PartitionTable> = match noted.and_then(|n| n.follows.as_ref()) {
            Some(master) if belongs.len() > 1 => {
                belongs.iter().copied().filter(|t| t.id().publisher.as_ref() == Some(master)).collect()
            }
            _ => Vec::new(),
        };
        let belongs = if followed.is_empty() { belongs } else { followed };
        for table in &belongs {
            sides.entry(table.id()).or_default().insert(member.clone());
        }
    }
    // A side's table published during the split by a member that did not answer (the master hears
    // part of the other side before the rest) counts its publisher: it was on that side. Not for a
    // table another side's descends from (published before the sides forked).
    let mut presumed: BTreeMap<TableId, MemberId> = BTreeMap::new();
    for id in sides.keys() {
        let Some(publisher) = id.publisher.as_ref() else { continue };
        let forked = sides
            .keys()
            .all(|other| other == id || all.iter().find(|t| t.id() == *other).is_none_or(|t| !t.descends_from(id)));
        if forked && !answered.contains(publisher) && !sides.values().any(|m| m.contains(publisher)) {
            presumed.insert(id.clone(), publisher.clone());
        }
    }
    let size = |id: &TableId| side_size(&sides, &presumed, id);
    // The largest sides; of those, one whose table descends from every other's (it carries the
    // later decisions: a promotion the other side did not make), else the side with the oldest
    // member, then the older publisher.
    let largest = sides.keys().map(size).max()?;
    let top: Vec<(&TableId, &BTreeSet<MemberId>)> = sides.iter().filter(|(id, _)| size(id) == largest).collect();
    let table_of = |id: &TableId| all.iter().find(|t| t.id() == *id).copied();
    let newest = top.iter().find(|(id, _)| {
        let Some(t) = table_of(id) else { return false };
        top.iter().all(|(other, _)| other == id || t.descends_from(other))
    });
    // Without one, the side whose table names more members: the master may be asking while its
    // view is still filling up after a heal (members come back one gossip round apart), and a
    // side it heard one member of so far is the larger one if its table names more.
    let named =
        |id: &TableId| table_of(id).map_or(0, |t| t.rows.iter().flatten().collect::<BTreeSet<&MemberId>>().len());
    let most_named = top.iter().map(|(id, _)| named(id)).max().unwrap_or(0);
    let winner = match newest {
        Some((id, _)) => (*id).clone(),
        None => top
            .iter()
            .filter(|(id, _)| named(id) == most_named)
            .min_by(|(a_id, a), (b_id, b)| {
                a.first()
                    .cmp(&b.first())
                    .then_with(|| a_id.publisher.cmp(&b_id.publisher))
                    .then_with(|| b_id.epoch.cmp(&a_id.epoch))
            })
            .map(|(id, _)| (*id).clone())?,
    };
    Some(Sides { sides, presumed, winner })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign::Row;
    use proptest::prelude::*;

    fn id(name: &str) -> MemberId {
        MemberId::new(name, name.as_bytes()[0] as u64)
    }

    /// Rows cycling through `members`, two replicas each.
    fn spread(members: &[&str]) -> Vec<Row> {
        (0..12)
            .map(|p| {
                let first = p % members.len();
                let mut row = vec![id(members[first])];
                if members.len() > 1 {
                    row.push(id(members[(first + 1) % members.len()]));
                }
                row
            })
            .collect()
    }

    /// The table before [`agreed`].
    fn agreed_parent() -> PartitionTable {
        let mut t = PartitionTable::empty(12).successor(&id("a"), 1, spread(&["a", "b", "c"]));
        for e in 2..=4 {
            t = t.successor(&id("a"), e, spread(&["a", "b", "c"]));
        }
        t
    }

    /// The table a, b, c agreed on before trouble started: published by `a` at epoch 5.
    fn agreed() -> PartitionTable {
        let mut t = PartitionTable::empty(12).successor(&id("a"), 1, spread(&["a", "b", "c"]));
        for e in 2..=5 {
            t = t.successor(&id("a"), e, spread(&["a", "b", "c"]));
        }
        t
    }

    fn winner(held: &[(&str, &PartitionTable)]) -> TableId {
        let held: Vec<(MemberId, &PartitionTable)> = held.iter().map(|(m, t)| (id(m), *t)).collect();
        sides(&held).expect("someone holds a table").winner
    }

    #[test]
    fn a_master_that_could_not_send_adopts_what_the_others_did_without_it() {
        // a (the master) stops being heard; b and c declare it dead, b leads, promotes a away and
        // migrates. a hears them all along and publishes nothing, or (a migration it had started)
        // one more table of its own.
        let stale = agreed();
        let moved_on = stale.successor(&id("b"), 6, spread(&["b", "c"])).successor(&id("b"), 9, spread(&["b", "c"]));
        assert_eq!(winner(&[("a", &stale), ("b", &moved_on), ("c", &moved_on)]), moved_on.id());
        let zombie = stale.successor(&id("a"), 6, spread(&["a", "b", "c"]));
        assert_eq!(winner(&[("a", &zombie), ("b", &moved_on), ("c", &moved_on)]), moved_on.id());
        assert!(follower_applies(&stale, &moved_on, &id("c"), true));
        assert!(!follower_applies(&moved_on, &stale, &id("c"), true));
    }

    #[test]
    fn a_member_that_could_not_receive_loses_although_its_table_is_newer() {
        // c hears nobody, declares a and b dead and publishes a table of its own, descending from
        // the one a and b keep using (they hear c's heartbeats, so nothing changed for them).
        let kept = agreed();
        let alone = kept.successor(&id("c"), 6, spread(&["c"]));
        assert_eq!(relation(&kept, &alone), Relation::Newer);
        assert_eq!(winner(&[("a", &kept), ("b", &kept), ("c", &alone)]), kept.id());
        // The master then supersedes c's table; c applies the result as newer history.
        let next = kept.successor_superseding(&id("a"), 7, kept.rows.clone(), &[&alone]);
        assert!(follower_applies(&alone, &next, &id("c"), true));
        assert!(follower_applies(&kept, &next, &id("a"), true));
    }

    #[test]
    fn a_table_the_cut_off_master_made_without_a_member_that_is_heard_does_not_decide() {
        // a's gossip is cut (its data plane works). a declares b dead first and publishes a table
        // without b, which c applies (it still follows a). Then b and c declare a dead; b, the new
        // master, asks b and c: a's table, which took everything away from b, must not win, or b
        // drops its data for partitions whose only other copy is on a.
        let agreed = agreed();
        let without_b = agreed.successor(&id("a"), 6, spread(&["a", "c"]));
        let found = sides(&[(id("b"), &agreed), (id("c"), &without_b)]).unwrap();
        assert_eq!(found.winner, agreed.id());
        assert_eq!(found.sides[&agreed.id()], [id("b"), id("c")].into_iter().collect());
        // a's table still decides when a answers (it is a side of its own, with c)...
        assert_eq!(winner(&[("a", &without_b), ("b", &agreed), ("c", &without_b)]), without_b.id());
        // ...and a table a dead master made without removing anyone who answers is followed.
        let moved = agreed.successor(&id("a"), 6, spread(&["b", "c", "a"]));
        assert_eq!(winner(&[("b", &agreed), ("c", &moved)]), moved.id());
    }

    #[test]
    fn a_follower_holds_back_a_table_that_drops_a_member_it_still_hears() {
        let agreed = agreed();
        let without_b = agreed.successor(&id("a"), 6, spread(&["a", "c"]));
        let alive = |m: &MemberId| *m == id("b");
        assert_eq!(drops_a_live_member(&agreed, &without_b, &id("c"), alive), Some(&id("b")));
        // Once c too declares b dead, it applies the table; b itself is judged by follower_applies.
        assert_eq!(drops_a_live_member(&agreed, &without_b, &id("c"), |_| false), None);
        assert_eq!(drops_a_live_member(&agreed, &without_b, &id("b"), |m| *m == id("b")), None);
        // A table that settles a fork against the follower's is applied.
        let settled = agreed.successor_superseding(&id("a"), 7, spread(&["a", "c"]), &[&agreed]);
        assert_eq!(drops_a_live_member(&agreed, &settled, &id("c"), alive), None);
        // Moving replicas without dropping anyone is fine.
        let moved = agreed.successor(&id("a"), 6, spread(&["c", "b", "a"]));
        assert_eq!(drops_a_live_member(&agreed, &moved, &id("c"), |_| true), None);
    }

    #[test]
    fn a_stalled_master_heard_before_the_whole_other_side_is_back_loses() {
        // a is stopped (SIGSTOP); b and c declare it dead and b publishes without it. a wakes,
        // declares b and c dead at once (their heartbeats are old), publishes a table with only
        // itself, then hears b again a gossip round before c: it decides with b's answer alone.
        let agreed = agreed();
        let without_a = agreed.successor(&id("b"), 6, spread(&["b", "c"]));
        let alone = agreed.successor(&id("a"), 6, spread(&["a"]));
        assert_eq!(winner(&[("a", &alone), ("b", &without_a)]), without_a.id(), "b's table names two members");
        assert_eq!(winner(&[("a", &alone), ("b", &without_a), ("c", &without_a)]), without_a.id());
        // Equal sides whose tables name as many members: the oldest member's side, as before.
        let other = agreed.successor(&id("b"), 6, spread(&["b"]));
        assert_eq!(winner(&[("a", &alone), ("b", &other)]), alone.id());
    }

    #[test]
    fn a_live_member_refuses_a_table_that_takes_everything_away_from_it() {
        // The master a hears nobody (its messages still arrive): it declares b and c dead and
        // publishes a table with only itself. b and c are alive and keep writing: they refuse.
        let kept = agreed();
        let deaf = kept.successor(&id("a"), 6, spread(&["a"]));
        assert!(!follower_applies(&kept, &deaf, &id("b"), true));
        // A leaving member accepts it; a member that never held anything too.
        assert!(follower_applies(&kept, &deaf, &id("b"), false));
        assert!(follower_applies(&PartitionTable::empty(12), &deaf, &id("b"), true));
        // After the heal, b and c are a side of their own, not laggards, and win.
        assert!(!is_laggard(&deaf, &kept, &id("b")));
        assert!(is_laggard(&deaf, &kept, &id("a")));
        assert_eq!(winner(&[("a", &deaf), ("b", &kept), ("c", &kept)]), kept.id());
        // A member that is merely behind is a laggard.
        let next = kept.successor(&id("a"), 6, spread(&["a", "b", "c"]));
        assert!(is_laggard(&next, &kept, &id("b")));
        // When a master decided against a member's table, the member follows even a table that
        // gives it nothing, and it is no longer a side to settle.
        let settled = deaf.successor_superseding(&id("a"), 7, spread(&["a"]), &[&kept]);
        assert!(follower_applies(&kept, &settled, &id("b"), true));
        assert!(is_laggard(&settled, &kept, &id("b")));
    }

    #[test]
    fn after_a_split_the_larger_side_wins_whichever_side_the_master_is_on() {
        let base = agreed();
        let alone = base.successor(&id("a"), 6, spread(&["a"]));
        let pair = base.successor(&id("b"), 6, spread(&["b", "c"]));
        assert_eq!(winner(&[("a", &alone), ("b", &pair), ("c", &pair)]), pair.id());
        let pair = base.successor(&id("a"), 6, spread(&["a", "b"]));
        let alone = base.successor(&id("c"), 6, spread(&["c"]));
        assert_eq!(winner(&[("a", &pair), ("b", &pair), ("c", &alone)]), pair.id());
    }

    #[test]
    fn laggards_belong_with_the_newer_table_that_still_names_them() {
        // The old master committed a last table only b received before dying; a (new master) and
        // c still hold the one before. They are laggards: one side, the newest table wins.
        let before = agreed();
        let last = before.successor(&id("a"), 6, spread(&["a", "b", "c"]));
        let got = winner(&[("b", &last), ("c", &before), ("a", &before)]);
        assert_eq!(got, last.id());
        let s = sides(&[(id("b"), &last), (id("c"), &before), (id("a"), &before)]).unwrap();
        assert_eq!(s.sides.len(), 1);
    }

    #[test]
    fn a_tie_between_a_table_and_its_descendant_goes_to_the_descendant() {
        // Two members: a could not send, b declared it dead and carried on alone.
        let base = PartitionTable::empty(12).successor(&id("a"), 1, spread(&["a", "b"]));
        let alone = base.successor(&id("b"), 2, spread(&["b"]));
        assert_eq!(winner(&[("a", &base), ("b", &alone)]), alone.id());
        // Two members: a could not hear, declared b dead and carried on alone.
        let deaf = base.successor(&id("a"), 2, spread(&["a"]));
        assert_eq!(winner(&[("a", &deaf), ("b", &base)]), deaf.id());
    }

    #[test]
    fn ties_go_to_the_side_with_the_oldest_member() {
        let empty = PartitionTable::empty(12);
        let a = empty.successor(&id("a"), 1, spread(&["a"]));
        let b = empty.successor(&id("b"), 1, spread(&["b"]));
        assert_eq!(winner(&[("a", &a), ("b", &b)]), a.id());
        assert_eq!(winner(&[("b", &b), ("a", &a)]), a.id(), "the order of the answers does not matter");
        let none: Vec<(MemberId, &PartitionTable)> = vec![(id("a"), &empty)];
        assert_eq!(sides(&none), None);
    }

    #[test]
    fn a_member_holding_the_fork_point_goes_with_the_master_that_reached_it() {
        // a, the master, is cut off from b and c for half a second. a declares b dead and
        // publishes a table without b, which never reaches c (cut); b declares a dead and
        // publishes a table without a, which c receives but ignores (a is still its master).
        // c holds the table both forked from: both descend from it and give c replicas.
        let base = agreed();
        let without_b = base.successor(&id("a"), 6, spread(&["a", "c"]));
        let without_a = base.successor(&id("b"), 7, spread(&["b", "c"]));
        let held = [(id("a"), &without_b), (id("b"), &without_a), (id("c"), &base)];
        let blind = sides(&held).unwrap();
        assert_eq!(blind.sides[&without_b.id()].len(), 2, "from the tables alone, c is on both sides");
        // c saw b's table (and older ones of a's, from before the cut): it was on b's side.
        let seen = |tables: Vec<TableId>| -> BTreeMap<MemberId, Noted> {
            [(id("c"), Noted { seen: tables, ..Noted::default() })].into_iter().collect()
        };
        let seen_b = seen(vec![agreed_parent().id(), without_a.id()]);
        let found = sides_seen(&held, &seen_b).unwrap();
        assert_eq!(found.winner, without_a.id());
        assert_eq!(found.sides[&without_a.id()], [id("b"), id("c")].into_iter().collect());
        assert_eq!(found.sides[&without_b.id()], [id("a")].into_iter().collect());
        // Seen both (a's reached it too, and it refused it): still on both sides, as before.
        assert_eq!(sides_seen(&held, &seen(vec![without_b.id(), without_a.id()])).unwrap(), blind);
        // Seen both, and it follows b when it answers (it declared a dead, then ignored a's
        // table when a came back): on b's side, which wins.
        let seen_both_following = |master: &str| -> BTreeMap<MemberId, Noted> {
            let noted =
                Noted { seen: vec![without_b.id(), without_a.id()], refused: Vec::new(), follows: Some(id(master)) };
            [(id("c"), noted)].into_iter().collect()
        };
        let found = sides_seen(&held, &seen_both_following("b")).unwrap();
        assert_eq!(found.sides[&without_a.id()], [id("b"), id("c")].into_iter().collect());
        assert_eq!(found.sides[&without_b.id()], [id("a")].into_iter().collect());
        assert_eq!(found.winner, without_a.id());
        // Following a member that published neither side's table changes nothing.
        assert_eq!(sides_seen(&held, &seen_both_following("d")).unwrap(), blind);
        // Seeing a descendant's ancestor counts: b published once more since.
        let later = without_a.successor(&id("b"), 8, spread(&["b", "c"]));
        let held = [(id("a"), &without_b), (id("b"), &later), (id("c"), &base)];
        assert_eq!(sides_seen(&held, &seen_b).unwrap().winner, later.id());
    }

    #[test]
    fn a_member_that_refused_the_masters_table_is_not_on_its_side() {
        // Five members; the master a's gossip is cut. a declares b and c dead and publishes a
        // table without them; d and e still hear b and c and refuse it, then declare a dead. At
        // the heal a asks everyone: d and e still hold the table before, which a's descends from
        // and still gives them replicas, so from the tables they look like a's laggards.
        let names = ["a", "b", "c", "d", "e"];
        let before = PartitionTable::empty(12).successor(&id("a"), 1, spread(&names));
        let without_bc = before.successor(&id("a"), 2, spread(&["a", "d", "e"]));
        let held =
            [(id("a"), &without_bc), (id("b"), &before), (id("c"), &before), (id("d"), &before), (id("e"), &before)];
        assert_eq!(sides(&held).unwrap().winner, without_bc.id(), "from the tables alone");
        let refused = Noted { refused: vec![without_bc.id()], ..Noted::default() };
        let noted: BTreeMap<MemberId, Noted> = [(id("d"), refused.clone()), (id("e"), refused)].into_iter().collect();
        let found = sides_seen(&held, &noted).unwrap();
        assert_eq!(found.winner, before.id());
        assert_eq!(found.sides[&before.id()].len(), 4);
        // A refusal of a table the member has since moved past (it holds a descendant) is moot.
        let later = without_bc.successor(&id("a"), 3, spread(&["a", "d", "e"]));
        let held = [(id("a"), &later), (id("d"), &without_bc), (id("b"), &before)];
        assert_eq!(sides_seen(&held, &noted).unwrap().sides[&later.id()].len(), 2);
    }

    #[test]
    fn a_refusal_does_not_extend_to_the_tables_that_decided_against_it() {
        // The master a flaps: it declares c dead and publishes a table without c, which b and c
        // refuse (they still hear c / it is c). b then leads, decides for its side against a's
        // table and publishes a successor that supersedes it; a adopts it. The master flaps
        // again: a and b each publish one more table of their own; c still holds the table from
        // before and answers with its refusal of a's first table.
        let base = agreed();
        let without_c = base.successor(&id("a"), 6, spread(&["a", "b"]));
        let decided = base.successor_superseding(&id("b"), 7, spread(&["b", "c"]), &[&without_c]);
        assert!(decided.descends_from(&without_c.id()), "a successor that supersedes counts it as an ancestor");
        let by_b = decided.successor(&id("b"), 8, spread(&["b", "c"]));
        let by_a = decided.successor(&id("a"), 8, spread(&["a", "c"]));
        let held = [(id("a"), &by_a), (id("b"), &by_b), (id("c"), &base)];
        let noted: BTreeMap<MemberId, Noted> =
            [(id("c"), Noted { refused: vec![without_c.id(), by_a.id()], ..Noted::default() })].into_iter().collect();
        let found = sides_seen(&held, &noted).unwrap();
        // c follows b's table (it refused a's), which supersedes the table c refused.
        assert_eq!(found.sides[&by_b.id()], [id("b"), id("c")].into_iter().collect());
        assert_eq!(found.sides[&by_a.id()], [id("a")].into_iter().collect());
        assert!(!found.sides.contains_key(&base.id()), "{found:?}");
        assert_eq!(found.winner, by_b.id());
    }

    #[test]
    fn a_tied_side_is_not_outweighed_by_a_table_its_holder_refused() {
        // Harness seed 388: a's gossip is cut; a declares b dead and publishes a table without b,
        // which c refuses (it hears b); b, acting as master, publishes tables of its own from the
        // table before. Three sides of one member each: c's table, which a's descends from but c
        // refused, names all three and wins; preferring a's as "carrying later decisions" handed
        // the cluster to the member cut off alone.
        let base = agreed();
        let without_b = base.successor(&id("a"), 6, spread(&["a", "c"]));
        let by_b = agreed_parent().successor(&id("b"), 7, spread(&["b", "c"]));
        let noted: BTreeMap<MemberId, Noted> =
            [(id("c"), Noted { refused: vec![without_b.id()], ..Noted::default() })].into_iter().collect();
        let held = [(id("a"), &without_b), (id("b"), &by_b), (id("c"), &base)];
        let found = sides_seen(&held, &noted).unwrap();
        assert_eq!(found.sides.len(), 3, "{found:?}");
        assert_eq!(found.winner, base.id());
    }

    #[test]
    fn a_side_counts_the_master_that_published_its_table_before_it_answers() {
        // a, the master, was cut off; b declared it dead and published a table without it, which
        // c applied. At the heal a hears c a gossip round before b: b, the other side's master,
        // has not answered yet, and the side a sees is c alone.
        let base = agreed();
        let alone = base.successor(&id("a"), 6, spread(&["a", "c"]));
        let without_a = base.successor(&id("b"), 7, spread(&["b", "c"]));
        let found = sides(&[(id("a"), &alone), (id("c"), &without_a)]).unwrap();
        assert_eq!(found.presumed.get(&without_a.id()), Some(&id("b")));
        assert_eq!(found.size(&without_a.id()), 2);
        assert_eq!(found.winner, without_a.id());
        // Once b answers it is counted as what it is, not twice.
        let found = sides(&[(id("a"), &alone), (id("b"), &without_a), (id("c"), &without_a)]).unwrap();
        assert!(found.presumed.is_empty());
        assert_eq!(found.winner, without_a.id());
        // A table from before the fork does not count its (gone) publisher: c holds the table a
        // published before b split off with a table of its own.
        let apart = base.successor(&id("b"), 7, spread(&["b"]));
        let found = sides(&[(id("b"), &apart), (id("c"), &base)]).unwrap();
        assert!(found.presumed.is_empty(), "{found:?}");
    }

    /// A random history: tables published by random masters, each derived from a random earlier
    /// table (so forks happen), and a random assignment of members to the tables they hold.
    fn scenario() -> impl Strategy<Value = (Vec<PartitionTable>, Vec<usize>)> {
        let names = ["a", "b", "c", "d", "e"];
        let steps = prop::collection::vec(
            (0usize..5, any::<prop::sample::Index>(), prop::collection::vec(0usize..5, 1..4)),
            1..16,
        );
        (steps, prop::collection::vec(any::<prop::sample::Index>(), 5)).prop_map(move |(steps, holds)| {
            let mut tables = vec![PartitionTable::empty(12)];
            let mut epoch = 0;
            for (publisher, parent, members) in steps {
                let parent = tables[parent.index(tables.len())].clone();
                epoch = epoch.max(parent.epoch) + 1;
                let mut members: Vec<&str> = members.iter().map(|m| names[*m]).collect();
                members.sort();
                members.dedup();
                tables.push(parent.successor(&id(names[publisher]), epoch, spread(&members)));
            }
            let holds = holds.iter().map(|i| i.index(tables.len())).collect();
            (tables, holds)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Exactly one table wins, it is one some member holds, every member belongs to at least
        /// one side, and the answer does not depend on the order members answered in.
        #[test]
        fn exactly_one_table_wins_whatever_the_order_of_the_answers(
            (tables, holds) in scenario(),
            rotate in 0usize..5,
            answered in 2usize..=5,
            saw in prop::collection::vec(any::<u16>(), 5),
        ) {
            let names = ["a", "b", "c", "d", "e"];
            // Some members may not have answered yet; each saw some of the tables.
            let held: Vec<(MemberId, &PartitionTable)> =
                names.iter().zip(&holds).take(answered).map(|(n, t)| (id(n), &tables[*t])).collect();
            let pick = |mask: u16, shift: usize| -> Vec<TableId> {
                tables.iter().enumerate().filter(|(k, _)| mask & (1 << ((k + shift) % 16)) != 0).map(|(_, t)| t.id()).collect()
            };
            let seen: BTreeMap<MemberId, Noted> = names
                .iter()
                .zip(&saw)
                .map(|(n, mask)| {
                    let follows = (mask % 7 < 5).then(|| id(names[usize::from(mask % 7)]));
                    (id(n), Noted { seen: pick(*mask, 0), refused: pick(mask.rotate_left(5), 3), follows })
                })
                .collect();
            let mut rotated = held.clone();
            rotated.rotate_left(rotate % held.len());
            match (sides_seen(&held, &seen), sides_seen(&rotated, &seen)) {
                (None, None) => prop_assert!(held.iter().all(|(_, t)| t.epoch == 0)),
                (Some(s), Some(r)) => {
                    prop_assert_eq!(&s, &r);
                    prop_assert!(held.iter().any(|(_, t)| t.id() == s.winner));
                    for (member, table) in &held {
                        if table.epoch > 0 {
                            prop_assert!(s.sides.values().any(|side| side.contains(member)));
                        }
                    }
                    // The winner's side is at least as large as any other.
                    let largest = s.sides.keys().map(|id| s.size(id)).max().unwrap();
                    prop_assert_eq!(s.size(&s.winner), largest);
                    // Only a publisher that did not answer is presumed, on one side at most.
                    for publisher in s.presumed.values() {
                        prop_assert!(!held.iter().any(|(m, _)| m == publisher));
                    }
                }
                _ => prop_assert!(false, "the order of answers changed the outcome"),
            }
        }

        /// Descent is the ancestry of the history that built the tables, and superseding makes
        /// the losers' holders follow the winner.
        #[test]
        fn descent_matches_how_the_tables_were_derived((tables, _) in scenario()) {
            for t in &tables {
                prop_assert!(t.validate(12).is_ok());
                prop_assert!(t.descends_from(&t.id()));
                prop_assert!(t.descends_from(&tables[0].id()));
            }
            for (k, t) in tables.iter().enumerate().skip(1) {
                prop_assert!(tables[..k].iter().any(|p| t.descends_from(&p.id()) && p.id() != t.id()));
                for older in &tables[..k] {
                    if t.descends_from(&older.id()) && older.id() != t.id() {
                        prop_assert!(!older.descends_from(&t.id()));
                        prop_assert_eq!(relation(older, t), Relation::Newer);
                    }
                }
            }
            let last = tables.last().unwrap();
            let others: Vec<&PartitionTable> = tables.iter().filter(|t| t.epoch > 0).collect();
            let next = last.successor_superseding(&id("z"), last.epoch.max(tables.iter().map(|t| t.epoch).max().unwrap()) + 1, last.rows.clone(), &others);
            for t in &others {
                if next.history.len() < crate::table::HISTORY_RUNS_MAX {
                    prop_assert!(follower_applies(t, &next, &id("z"), true), "{} does not follow {}", t.id(), next.id());
                }
            }
        }
    }
}
