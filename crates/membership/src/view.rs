//! The cluster view and the pure rules over it: who is master, and what changed between two views.
//! No I/O here, so every rule is unit-tested with plain values.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::member::{Member, MemberId, MemberState};

/// A consistent picture of the cluster as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// Grows by one each time the view changes.
    pub version: u64,
    /// This member.
    pub local: MemberId,
    /// Live members, this one included, oldest first (ordered by [`MemberId`]).
    pub members: Vec<Member>,
    /// The master: the active member with the highest forced-master claim, or else the oldest
    /// active member, among those not excluded. `None` while no member is active (e.g. this
    /// member is still joining alone).
    pub master: Option<MemberId>,
    /// Active members that others cannot reach over the data plane although gossip says they are
    /// alive ([`excluded_members`]): not eligible as master or partition owner until reachable.
    pub excluded: BTreeSet<MemberId>,
}

impl ClusterView {
    pub(crate) fn empty(local: MemberId) -> Self {
        ClusterView { version: 0, local, members: Vec::new(), master: None, excluded: BTreeSet::new() }
    }

    /// The member with this id, if it is in the view.
    pub fn member(&self, id: &MemberId) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == id)
    }

    /// The member with this node id (any generation), if it is in the view.
    pub fn member_by_node_id(&self, node_id: &str) -> Option<&Member> {
        self.members.iter().find(|m| &*m.id.node_id == node_id)
    }

    /// This member, once its own gossip state is visible.
    pub fn local_member(&self) -> Option<&Member> {
        self.member(&self.local)
    }

    /// True when this member is the master.
    pub fn is_master(&self) -> bool {
        self.master.as_ref() == Some(&self.local)
    }

    /// The active members, oldest first.
    pub fn active_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.state == MemberState::Active)
    }

    /// The active members that are not excluded: those that may own partitions, oldest first.
    pub fn eligible_members(&self) -> impl Iterator<Item = &Member> {
        self.active_members().filter(|m| !self.excluded.contains(&m.id))
    }

    /// True when `member` is excluded (see [`ClusterView::excluded`]).
    pub fn is_excluded(&self, member: &MemberId) -> bool {
        self.excluded.contains(member)
    }

    /// Number of members in the view.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when the view holds no member (not even this one yet).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// A change in the cluster, as seen by this member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MemberEvent {
    /// A member entered the view.
    Joined {
        /// The member.
        member: Member,
    },
    /// A member moved from one life-cycle state to another (e.g. joining to active).
    StateChanged {
        /// The member, with its new state.
        member: Member,
        /// Its state before.
        previous: MemberState,
    },
    /// A member announced that it left (graceful shutdown).
    Left {
        /// The member as last seen.
        member: Member,
    },
    /// A member stopped answering and was declared dead by the failure detector, or was replaced
    /// by a newer generation of the same node.
    Dead {
        /// The member as last seen.
        member: Member,
    },
    /// The master changed.
    MasterChanged {
        /// The master before.
        previous: Option<MemberId>,
        /// The master now.
        current: Option<MemberId>,
    },
}

/// The master rule: among active members that are not `excluded`, the highest forced-master claim
/// wins (ties: the older); without claims, the oldest such member. Every member computes the same
/// answer from the same gossip, so no election round is needed.
pub(crate) fn compute_master(members: &[Member], excluded: &BTreeSet<MemberId>) -> Option<MemberId> {
    let active = members.iter().filter(|m| m.state == MemberState::Active && !excluded.contains(&m.id));
    let claimed = active.clone().filter(|m| m.master_claim > 0).max_by(|a, b| {
        // Highest claim first; among equal claims, the smaller (older) id wins, so reverse it.
        a.master_claim.cmp(&b.master_claim).then_with(|| b.id.cmp(&a.id))
    });
    claimed.or_else(|| active.min_by(|a, b| a.id.cmp(&b.id))).map(|m| m.id.clone())
}

/// Whether `member`, which gossip says is alive, belongs to another group than this member's
/// `previous` view: two sides of a split that meet again, or groups that formed apart at start-up
/// (found later by discovery). Such a member is kept out of the view until the groups merge on
/// the merge timers (see the crate documentation), so that a flapping link does not merge and
/// split the groups, and their data, over and over.
///
/// It is another group's when it is a full member (active or leaving) that is not in the view,
/// it follows another master than this member's (and than any member of the view is or follows:
/// a view still filling up after a join may have computed a master of its own from the first
/// members it heard of), and it has been out of this member's view for
/// at least `merge_run_delay` (`absent_for`; `None`: never in it). A member that was out only
/// briefly (a stalled process, a lost gossip round) is taken back at once, and so are members
/// joining, members that follow our master, and everyone while this member itself is joining.
pub fn from_another_group(
    member: &Member,
    previous: &ClusterView,
    local_joining: bool,
    absent_for: Option<std::time::Duration>,
    merge_run_delay: std::time::Duration,
) -> bool {
    if local_joining || member.id == previous.local || previous.member(&member.id).is_some() {
        return false;
    }
    if !matches!(member.state, MemberState::Active | MemberState::Leaving) {
        return false;
    }
    let (Some(ours), Some(theirs)) = (previous.master.as_ref(), member.master.as_ref()) else {
        return false;
    };
    // Its master is ours, one of our members, or the master one of our members follows: the same
    // group, seen from a view that is still filling up (a member that just joined computes its
    // master from the first members it heard of, and follows the real one a moment later).
    let same_group = ours == theirs
        || previous.member(theirs).is_some()
        || previous.members.iter().any(|m| m.master.as_ref() == Some(theirs));
    !same_group && absent_for.is_none_or(|absent| absent >= merge_run_delay)
}

/// Which active members to exclude from ownership because other members cannot reach them over
/// the data plane, from the members' `unreachable` reports. Each report of an active member about
/// another is a directed edge, reporter to target. While some member is the target of at least
/// two reporters, the member with the most edges (in and out) among those is excluded, and its
/// edges go with it; ties go to the member reported by more members, then to the youngest. So a
/// member the others cannot reach (it cannot send, cannot hear, or its data plane is cut) is
/// excluded once two of them say so, while a cut between just two members excludes neither: one
/// report against one report cannot tell which side is broken, and members that see the reports
/// arrive in different orders must not each exclude the other (they would both act as master).
/// Pure: every member computes the same set from the same gossip.
pub fn excluded_members(members: &[Member]) -> BTreeSet<MemberId> {
    let active: BTreeSet<&MemberId> =
        members.iter().filter(|m| m.state == MemberState::Active).map(|m| &m.id).collect();
    let mut edges: BTreeSet<(MemberId, MemberId)> = BTreeSet::new();
    for member in members.iter().filter(|m| active.contains(&m.id)) {
        for target in member.unreachable.iter().filter(|t| active.contains(t) && **t != member.id) {
            edges.insert((member.id.clone(), target.clone()));
        }
    }
    let mut excluded = BTreeSet::new();
    // Bounded: every pass removes at least one edge.
    while !edges.is_empty() {
        let mut score: BTreeMap<&MemberId, (usize, usize)> = BTreeMap::new();
        for (reporter, target) in &edges {
            score.entry(reporter).or_default().0 += 1;
            let t = score.entry(target).or_default();
            t.0 += 1;
            t.1 += 1;
        }
        let Some(worst) = score
            .into_iter()
            .filter(|(_, (_, reported_by))| *reported_by >= 2)
            .max_by(|(a, sa), (b, sb)| sa.cmp(sb).then_with(|| a.cmp(b)))
            .map(|(m, _)| m.clone())
        else {
            break;
        };
        edges.retain(|(a, b)| *a != worst && *b != worst);
        excluded.insert(worst);
    }
    excluded
}

/// Keeps one member per node id: the newest generation, except that this member (`local`) always
/// stays in its own view. Two live generations of one node id mean a restart whose old generation
/// has not been declared dead yet (the old one is gone for good), or two members misconfigured with
/// the same node id (logged by the caller). Returns the kept members (oldest first) and the dropped.
pub(crate) fn dedupe_node_ids(members: Vec<Member>, local: &MemberId) -> (Vec<Member>, Vec<Member>) {
    let mut chosen: BTreeMap<std::sync::Arc<str>, Member> = BTreeMap::new();
    let mut dropped = Vec::new();
    for member in members {
        let keep_new = match chosen.get(&member.id.node_id) {
            None => true,
            Some(existing) if existing.id == *local => false,
            Some(existing) => member.id == *local || member.id.generation > existing.id.generation,
        };
        if keep_new {
            if let Some(old) = chosen.insert(member.id.node_id.clone(), member) {
                dropped.push(old);
            }
        } else {
            dropped.push(member);
        }
    }
    let mut kept: Vec<Member> = chosen.into_values().collect();
    kept.sort_by(|a, b| a.id.cmp(&b.id));
    (kept, dropped)
}

/// The events that lead from `old` to `new`. `announced_left` holds members known to have
/// announced their departure (state `left` in their last gossip), so their removal is `Left`, not
/// `Dead`. A member that was `leaving` and then disappears also counts as left.
pub(crate) fn diff(old: &ClusterView, new: &ClusterView, announced_left: &HashSet<MemberId>) -> Vec<MemberEvent> {
    let mut events = Vec::new();
    for member in &new.members {
        match old.member(&member.id) {
            None => events.push(MemberEvent::Joined { member: member.clone() }),
            Some(before) if before.state != member.state => {
                events.push(MemberEvent::StateChanged { member: member.clone(), previous: before.state })
            }
            Some(_) => {}
        }
    }
    for member in &old.members {
        if new.member(&member.id).is_none() {
            let left = announced_left.contains(&member.id) || member.state == MemberState::Leaving;
            events.push(if left {
                MemberEvent::Left { member: member.clone() }
            } else {
                MemberEvent::Dead { member: member.clone() }
            });
        }
    }
    if old.master != new.master {
        events.push(MemberEvent::MasterChanged { previous: old.master.clone(), current: new.master.clone() });
    }
    events
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::member::PROTOCOL_VERSION;

    pub(crate) fn member(node_id: &str, generation: u64, state: MemberState) -> Member {
        Member {
            id: MemberId::new(node_id, generation),
            gossip_addr: "127.0.0.1:5701".parse().unwrap(),
            data_addr: "127.0.0.1:5701".parse().unwrap(),
            admin_addr: None,
            protocol_version: PROTOCOL_VERSION,
            state,
            master_claim: 0,
            attributes: Default::default(),
            ext: Default::default(),
            unreachable: Vec::new(),
            gone: Vec::new(),
            master: None,
            handover: None,
        }
    }

    fn view(members: Vec<Member>) -> ClusterView {
        let master = compute_master(&members, &BTreeSet::new());
        ClusterView { version: 1, local: MemberId::new("a", 1), members, master, excluded: BTreeSet::new() }
    }

    fn ids(names: &[(&str, u64)]) -> BTreeSet<MemberId> {
        names.iter().map(|(n, g)| MemberId::new(*n, *g)).collect()
    }

    fn reporting(node_id: &str, generation: u64, unreachable: &[(&str, u64)]) -> Member {
        let mut m = member(node_id, generation, MemberState::Active);
        m.unreachable = unreachable.iter().map(|(n, g)| MemberId::new(*n, *g)).collect();
        m
    }

    #[test]
    fn a_member_nobody_can_reach_is_excluded_and_loses_the_mastership() {
        // a (the master) cannot be reached by b and c; its own reports never arrive.
        let members = vec![reporting("a", 1, &[]), reporting("b", 2, &[("a", 1)]), reporting("c", 3, &[("a", 1)])];
        let excluded = excluded_members(&members);
        assert_eq!(excluded, ids(&[("a", 1)]));
        assert_eq!(compute_master(&members, &excluded), Some(MemberId::new("b", 2)));
    }

    fn following(node_id: &str, generation: u64, master: (&str, u64)) -> Member {
        let mut m = member(node_id, generation, MemberState::Active);
        m.master = Some(MemberId::new(master.0, master.1));
        m
    }

    #[test]
    fn members_of_another_group_are_told_from_members_of_ours() {
        use std::time::Duration;
        let delay = Duration::from_secs(10);
        // Our view: a (master) and b. c and d follow c: another group.
        let ours = view(vec![following("a", 1, ("a", 1)), following("b", 2, ("a", 1))]);
        let c = following("c", 3, ("c", 3));
        assert!(from_another_group(&c, &ours, false, None, delay), "never in our view");
        assert!(from_another_group(&c, &ours, false, Some(delay), delay), "out of it for the run delay");
        assert!(!from_another_group(&c, &ours, false, Some(Duration::from_secs(1)), delay), "out only briefly");
        assert!(!from_another_group(&c, &ours, true, None, delay), "we are joining: everyone is welcome");
        // A member of our group we had not seen, a joining member, members already in the view.
        assert!(!from_another_group(&following("e", 5, ("a", 1)), &ours, false, None, delay));
        let mut joining = following("f", 6, ("f", 6));
        joining.state = MemberState::Joining;
        assert!(!from_another_group(&joining, &ours, false, None, delay));
        assert!(!from_another_group(&following("b", 2, ("c", 3)), &ours, false, None, delay));
        // Nothing published yet: not judged.
        assert!(!from_another_group(&member("g", 7, MemberState::Active), &ours, false, None, delay));
        // A member that just joined and heard of b before a: its master is b, a member of ours.
        assert!(!from_another_group(&following("h", 8, ("b", 2)), &ours, false, None, delay));
    }

    #[test]
    fn a_member_whose_view_is_still_filling_up_takes_in_its_own_group_at_once() {
        use std::time::Duration;
        let delay = Duration::from_secs(10);
        // s2 restarted and heard of s3 first: its view computes s3 as master, while s3 follows
        // s1. s1 (which follows itself) is the master of s2's own group, not another group.
        let filling = view(vec![following("s2", 9, ("s3", 3)), following("s3", 3, ("s1", 1))]);
        assert!(!from_another_group(&following("s1", 1, ("s1", 1)), &filling, false, None, delay));
        // A group of its own is still another group.
        assert!(from_another_group(&following("x", 4, ("x", 4)), &filling, false, None, delay));
    }

    #[test]
    fn two_members_that_cannot_reach_each_other_exclude_neither() {
        let members = vec![reporting("a", 1, &[]), reporting("b", 2, &[("c", 3)]), reporting("c", 3, &[("b", 2)])];
        assert!(excluded_members(&members).is_empty());
        // Seen in either order of arrival, a single report excludes nobody either.
        let members = vec![reporting("a", 1, &[("b", 2)]), reporting("b", 2, &[]), reporting("c", 3, &[])];
        assert!(excluded_members(&members).is_empty());
    }

    #[test]
    fn a_member_that_reports_everyone_and_is_reported_by_them_is_the_broken_one() {
        let members = vec![
            reporting("a", 1, &[("c", 3)]),
            reporting("b", 2, &[("c", 3)]),
            reporting("c", 3, &[("a", 1), ("b", 2)]),
            reporting("d", 4, &[]),
        ];
        assert_eq!(excluded_members(&members), ids(&[("c", 3)]));
    }

    #[test]
    fn a_member_two_others_cannot_reach_is_excluded_never_its_reporters() {
        // b's own reports have not arrived yet.
        let members = vec![reporting("a", 1, &[("b", 2)]), reporting("b", 2, &[]), reporting("c", 3, &[("b", 2)])];
        assert_eq!(excluded_members(&members), ids(&[("b", 2)]));
        // b cannot send: it reports everyone, everyone reports it.
        let members = vec![
            reporting("a", 1, &[("b", 2)]),
            reporting("b", 2, &[("a", 1), ("c", 3)]),
            reporting("c", 3, &[("b", 2)]),
        ];
        assert_eq!(excluded_members(&members), ids(&[("b", 2)]));
    }

    #[test]
    fn reports_about_or_from_members_that_are_not_active_do_not_count() {
        let mut leaving = reporting("b", 2, &[("a", 1)]);
        leaving.state = MemberState::Leaving;
        let members = vec![reporting("a", 1, &[("z", 9)]), leaving];
        assert!(excluded_members(&members).is_empty());
    }

    #[test]
    fn oldest_active_member_is_master() {
        let members = vec![
            member("a", 1, MemberState::Joining),
            member("b", 2, MemberState::Active),
            member("c", 3, MemberState::Active),
        ];
        assert_eq!(compute_master(&members, &BTreeSet::new()), Some(MemberId::new("b", 2)));
    }

    #[test]
    fn equal_generations_break_ties_by_node_id() {
        let members = vec![member("b", 5, MemberState::Active), member("a", 5, MemberState::Active)];
        assert_eq!(compute_master(&members, &BTreeSet::new()), Some(MemberId::new("a", 5)));
    }

    #[test]
    fn highest_claim_beats_age_and_leaving_members_never_lead() {
        let mut members = vec![
            member("a", 1, MemberState::Active),
            member("b", 2, MemberState::Active),
            member("c", 3, MemberState::Leaving),
        ];
        members[1].master_claim = 3;
        members[2].master_claim = 9;
        assert_eq!(compute_master(&members, &BTreeSet::new()), Some(MemberId::new("b", 2)));
        members[1].state = MemberState::Leaving;
        assert_eq!(compute_master(&members, &BTreeSet::new()), Some(MemberId::new("a", 1)));
    }

    #[test]
    fn no_active_member_means_no_master() {
        assert_eq!(compute_master(&[member("a", 1, MemberState::Joining)], &BTreeSet::new()), None);
        assert_eq!(compute_master(&[], &BTreeSet::new()), None);
    }

    #[test]
    fn a_restarted_node_replaces_its_old_generation() {
        let members = vec![
            member("a", 1, MemberState::Active),
            member("b", 2, MemberState::Active),
            member("a", 7, MemberState::Joining),
        ];
        let (kept, dropped) = dedupe_node_ids(members.clone(), &MemberId::new("b", 2));
        let kept_ids: Vec<_> = kept.iter().map(|m| m.id.clone()).collect();
        assert_eq!(kept_ids, vec![MemberId::new("b", 2), MemberId::new("a", 7)]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].id, MemberId::new("a", 1));
        // A member never drops itself, even for a newer member with the same (misconfigured) id.
        let (kept, _) = dedupe_node_ids(members, &MemberId::new("a", 1));
        assert!(kept.iter().any(|m| m.id == MemberId::new("a", 1)));
    }

    #[test]
    fn diff_reports_joins_state_changes_departures_and_master_changes() {
        let old = view(vec![
            member("a", 1, MemberState::Active),
            member("b", 2, MemberState::Joining),
            member("c", 3, MemberState::Active),
            member("d", 4, MemberState::Leaving),
        ]);
        let new = view(vec![member("b", 2, MemberState::Active), member("e", 5, MemberState::Joining)]);
        let announced: HashSet<MemberId> = [MemberId::new("a", 1)].into_iter().collect();
        let events = diff(&old, &new, &announced);
        let names: Vec<String> = events
            .iter()
            .map(|e| match e {
                MemberEvent::Joined { member } => format!("joined {}", member.id.node_id),
                MemberEvent::StateChanged { member, previous } => {
                    format!("{} {}->{}", member.id.node_id, previous, member.state)
                }
                MemberEvent::Left { member } => format!("left {}", member.id.node_id),
                MemberEvent::Dead { member } => format!("dead {}", member.id.node_id),
                MemberEvent::MasterChanged { previous, current } => {
                    format!("master {}->{}", previous.as_ref().unwrap().node_id, current.as_ref().unwrap().node_id)
                }
            })
            .collect();
        assert_eq!(names, vec!["b joining->active", "joined e", "left a", "dead c", "left d", "master a->b"]);
    }
}
