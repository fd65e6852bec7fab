//! Partition assignment: which members hold which partition's replicas.
//!
//! A partition table has one [`Row`] per partition: index 0 is the owner, indices 1.. are backups
//! in order (index 1 is the first synchronous backup). The master computes the table with two
//! pure functions:
//!
//! * [`promote`] runs at once when members die or leave: it only deletes the lost members from
//!   every row, so each row's new owner is its first surviving backup, which holds every
//!   acknowledged write. Nothing moves; rows may become short.
//! * [`plan`] computes the target table the master then migrates toward: every row full, every
//!   member holding its fair share, and as little data copied as possible.
//!
//! # What "balanced" means
//!
//! With `P` partitions, `n` members and `R` replicas per row, [`plan`] guarantees:
//!
//! * for **every** replica index `r` (owner, first backup, second backup, ...), each member sits
//!   at index `r` in `⌊P/n⌋` or `⌈P/n⌉` rows;
//! * each member holds `⌊P(R-1)/n⌋` or `⌈P(R-1)/n⌉` backups in total.
//!
//! Both together are always achievable (and [`plan`] always achieves them): see phase 3.
//!
//! # The algorithm
//!
//! Copying a replica is the expensive part of a migration, so the plan is built in three phases,
//! each of which keeps what it can and changes only what balance forces it to change. Members
//! are numbered in sorted order and ties are broken by a fixed hash of `(member, partition)`,
//! so the result depends only on the inputs.
//!
//! 1. **Owners.** Every member gets an owner quota (`⌊P/n⌋`, plus one for the `P mod n` members
//!    that own the most already, which minimises the number of rows that must change owner).
//!    Owners within quota keep their rows. An owner over quota gives up rows, preferably to a
//!    member that already holds a replica of the row (a data-free move; first backups first),
//!    otherwise to the member with the most spare quota. The old owner stays in the row as its
//!    first backup (it holds everything) and the others shift down one index, which never asks a
//!    backup for data it does not have. Ownership never moves unless a quota forces it.
//! 2. **Backup sets.** Every member gets a backup quota the same way (ties for the extra slots
//!    go to members missing from rows with empty slots, which can fill them directly). Members
//!    keep the backup slots they hold; empty slots are filled, and members over quota hand slots
//!    over, to members with spare quota that are not in the row (former replicas of the row
//!    first, as they hold its data). When no such direct move exists, the cheapest chain of
//!    replacements is applied: `b` takes `a`'s slot in row `x` and leaves row `y`, `c` takes
//!    that one, and so on, ending at a member with spare quota. A step costs a copy only when it
//!    pushes out a member holding the row's data (replacing a copy this plan made costs nothing
//!    more), and the chain with the fewest copies is found by a 0-1 breadth-first search over
//!    members. Such a chain is an augmenting path in the flow network rows → members, so one
//!    always exists if the quotas are feasible. They are: by the max-flow/min-cut condition a
//!    set of `k` members can absorb its quota iff it fits into the rows' free places, which
//!    reduces to "no member's owner + backup quota exceeds `P`" (one replica per row), and the
//!    extra backup slots are given only where that holds.
//! 3. **Backup order.** The backup sets are fixed now; only their order within a row may change,
//!    which copies nothing. For a pair of backup indices `(a, b)`, every row has one member at
//!    `a` and one at `b`, so the rows are arcs of a multigraph on members (from the member at `a`
//!    to the member at `b`); reversing an arc is a swap within that row. While some member sits
//!    at `a` at least twice more than at `b`, the arcs along a shortest path from it to a member
//!    that sits at `a` less often than at `b` are reversed (such a path exists: otherwise the
//!    set of members reachable from it would have more arcs leaving than entering, yet none
//!    leaves it). This strictly decreases `Σ count²` over members and indices, so it ends, and at
//!    the end every member's counts at every two backup indices differ by at most one: each is
//!    `⌊B/(R-1)⌋` or `⌈B/(R-1)⌉` for its backup total `B`, which lies within `⌊P/n⌋..=⌈P/n⌉`.
//!    (This is de Werra's equitable edge colouring, done incrementally.)
//!
//! A balanced table passes all three phases untouched (its quotas are its counts, as the extra
//! slots go to the members that hold the most), so `plan` is idempotent and a table that is
//! already balanced is returned unchanged.
//!
//! # Movement
//!
//! A member joining a balanced table: every old member holds at least its new quota, so phase 1
//! moves only ownership, and only to the newcomer, and phase 2 hands slots only to it. The copies
//! are the newcomer's own slots, at most `Σ_r ⌈P/(n+1)⌉`, and the owner changes its owned rows,
//! at most `⌈P/(n+1)⌉`. (After a long history of changes, rounding can make an old member take
//! one slot too; the tests allow 2 extra copies.)
//!
//! Members removed and the rows promoted: owner changes are exactly the minimum the owner quotas
//! force. Copies are the emptied slots plus what balance forces on top: a member can take an
//! empty slot only in a row it is missing from, and a member whose share must grow by more than
//! such slots allow pushes out another member, who then needs a copy elsewhere. The tests compute
//! that bound (a maximum matching of members' gains to empty slots). After one removal from a
//! table planned from scratch the plans meet it (1 copy over at most, 0 in over 99% of cases).
//! After long histories of joins and deaths the greedy phases can copy more than the bound: the
//! worst case found by the property tests was 11 copies over it for 117 lost replicas (271
//! partitions, 3 replicas), so the history test allows `lost / 8` over the bound. That is extra
//! data movement during recovery, never an imbalance or a lost replica.

use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};

use grapevine_membership::MemberId;

/// One partition's replicas: index 0 the owner, then backups in order.
pub type Row = Vec<MemberId>;

/// Maximum replicas per partition (owner + 6 backups).
pub const REPLICAS_MAX: usize = 7;

/// Applied at once when members die or leave, before any data moves: removes every member that is
/// not in `live` from every row, shifting later replicas up, so each row's new owner is the first
/// surviving replica of the old row (its first synchronous backup, which holds every acknowledged
/// write). Adds nobody. Rows may become shorter or empty (all replicas lost).
pub fn promote(rows: &[Row], live: &BTreeSet<MemberId>) -> Vec<Row> {
    rows.iter().map(|row| row.iter().filter(|m| live.contains(*m)).cloned().collect()).collect()
}

/// The target table the master migrates toward: balanced, with minimal movement from `current`.
///
/// `current.len()` is the partition count (rows may be empty, e.g. the very first table); members
/// of `current` that are not in `members`, and repeats within a row, are ignored. `members`: the
/// members that may hold replicas (any order, duplicates ignored). `replica_count`: wanted
/// replicas per row, clamped to `1..=REPLICAS_MAX` and to the number of members. Empty `members`
/// → all rows empty.
///
/// Every returned row has exactly the clamped replica count of distinct members, and the table
/// is balanced as described in the [module documentation](self).
pub fn plan(current: &[Row], members: &[MemberId], replica_count: usize) -> Vec<Row> {
    let mut ids = members.to_vec();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return vec![Row::new(); current.len()];
    }
    let replicas = replica_count.clamp(1, REPLICAS_MAX).min(ids.len());
    let holders: Vec<Vec<usize>> = current
        .iter()
        .map(|row| {
            let mut held = Vec::with_capacity(row.len());
            for m in row {
                if let Ok(i) = ids.binary_search(m)
                    && !held.contains(&i)
                {
                    held.push(i);
                }
            }
            held
        })
        .collect();
    let keys: Vec<u64> = ids.iter().map(tie_key).collect();

    let (owners, owner_quota) = choose_owners(&holders, ids.len(), replicas, &keys);
    let mut planner = Planner::new(holders, owners, &owner_quota, replicas, keys);
    planner.fill_backups();
    planner.balance_backup_order();
    planner.finish(&ids, &owner_quota)
}

/// The number of replicas whose data must be copied to go from `from` to `to`: the pairs
/// `(partition, member)` with the member in `to`'s row but not in `from`'s row. Reordering a row
/// copies nothing.
pub fn copies_needed(from: &[Row], to: &[Row]) -> usize {
    to.iter()
        .enumerate()
        .map(|(p, row)| {
            let old = from.get(p).map_or(&[][..], Vec::as_slice);
            row.iter().filter(|m| !old.contains(m)).count()
        })
        .sum()
}

/// Whether the master should keep migrating toward `target`, which [`plan`] computed from `base`
/// for the same members, now that the table is `current`: true when every row of `current` is
/// still the row of `base` or already the row of `target`, i.e. only migrations toward `target`
/// happened since. Any other change (members died and rows were promoted, another side's table
/// was adopted) calls for a new plan from `current`.
///
/// The master must hold on to one target while it migrates. Planning again from every
/// intermediate table does not converge: moving one row shifts the counts the next plan starts
/// from, so it picks other rows to move, and with migrations committed one at a time the plans
/// chase each other for ever (an idle 10-member cluster committed hundreds of tables a second).
/// With the target kept, each row moves at most once and the table ends at `target`, which
/// `plan` returns unchanged (it is idempotent), so every member sees a settled table.
pub fn keeps_target(base: &[Row], target: &[Row], current: &[Row]) -> bool {
    base.len() == current.len()
        && target.len() == current.len()
        && current.iter().zip(base.iter().zip(target)).all(|(row, (was, wanted))| row == was || row == wanted)
}

/// The number of partitions whose owner differs between `from` and `to` (a row gaining or losing
/// its owner counts too).
pub fn owner_changes(from: &[Row], to: &[Row]) -> usize {
    (0..from.len().max(to.len()))
        .filter(|&p| from.get(p).and_then(|r| r.first()) != to.get(p).and_then(|r| r.first()))
        .count()
}

/// A per-member hash, stable across runs and platforms (FNV-1a; std's hasher is randomly seeded),
/// used only to break ties so that equal choices spread over the cluster instead of favouring
/// the oldest member.
fn tie_key(m: &MemberId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in m.node_id.as_bytes().iter().chain(m.generation.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Mixes a member's tie key with a partition (splitmix64's finaliser), so each partition ranks
/// tied members differently.
fn tie_rank(key: u64, partition: usize) -> u64 {
    let mut z = key ^ (partition as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Shares `total` slots among members as evenly as possible: everyone gets `total / n`, and the
/// `total % n` extra slots go to the eligible members that hold the most already (`held`), so a
/// balanced table keeps its counts and an unbalanced one gives up as few slots as possible.
/// Among members holding as many, the extra slots go to those with the highest `preference`.
fn fair_quotas(
    total: usize,
    held: &[usize],
    preference: impl Fn(usize) -> usize,
    eligible: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let n = held.len();
    let mut quotas = vec![total / n; n];
    let mut extra = total % n;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&m| (Reverse(held[m]), Reverse(preference(m)), m));
    for m in order {
        if extra == 0 {
            break;
        }
        if eligible(m) {
            quotas[m] += 1;
            extra -= 1;
        }
    }
    assert_eq!(extra, 0, "too few members may take an extra slot");
    quotas
}

/// Phase 1: one owner per row, each member owning its quota. Returns the owners and the quotas.
fn choose_owners(holders: &[Vec<usize>], n: usize, replicas: usize, keys: &[u64]) -> (Vec<usize>, Vec<usize>) {
    let mut owned = vec![0; n];
    for o in holders.iter().filter_map(|h| h.first()) {
        owned[*o] += 1;
    }
    let quota = fair_quotas(holders.len(), &owned, |_| 0, |_| true);
    let mut excess: Vec<usize> = (0..n).map(|m| owned[m].saturating_sub(quota[m])).collect();
    let mut room: Vec<usize> = (0..n).map(|m| quota[m].saturating_sub(owned[m])).collect();
    let mut owner: Vec<Option<usize>> = holders.iter().map(|h| h.first().copied()).collect();

    // Data-free moves first: an owner over quota hands rows to replicas with spare quota, trying
    // every row's first backup before any second backup, and so on, as the first backup is the
    // one `promote` would pick and the one holding the most.
    let longest = holders.iter().map(Vec::len).max().unwrap_or(0);
    for k in 1..longest {
        for (p, h) in holders.iter().enumerate() {
            let (Some(&old), Some(&v)) = (h.first(), h.get(k)) else { continue };
            if owner[p] == Some(old) && excess[old] > 0 && room[v] > 0 {
                owner[p] = Some(v);
                excess[old] -= 1;
                room[v] -= 1;
            }
        }
    }

    // The rest needs a copy. Rows with a free replica slot go first: there the old owner, which
    // stays as first backup, takes a slot that would otherwise need a copy too.
    let mut needy: Vec<usize> = holders.iter().enumerate().filter(|(_, h)| h.is_empty()).map(|(p, _)| p).collect();
    for short_rows in [true, false] {
        for (p, h) in holders.iter().enumerate() {
            let Some(&old) = h.first() else { continue };
            if owner[p] == Some(old) && excess[old] > 0 && (h.len() < replicas) == short_rows {
                excess[old] -= 1;
                needy.push(p);
            }
        }
    }
    needy.sort_unstable();
    for p in needy {
        let w = (0..n)
            .filter(|&m| room[m] > 0)
            .max_by_key(|&m| (holders[p].contains(&m), room[m], Reverse(tie_rank(keys[m], p))))
            .expect("spare owner quota equals the rows needing an owner");
        room[w] -= 1;
        owner[p] = Some(w);
    }
    let owners = owner.into_iter().map(|o| o.expect("every row has an owner")).collect();
    (owners, quota)
}

/// Where an augmenting chain of replacements starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// An empty backup slot `(row, slot)`.
    Vacancy(usize, usize),
    /// A member over its backup quota.
    Excess(usize),
}

/// Phases 2 and 3 work on member numbers (indices into the sorted member list).
#[derive(Debug)]
struct Planner {
    n: usize,
    /// Backup slots per row (`replicas - 1`); slot `j` is replica index `j + 1`.
    backups: usize,
    keys: Vec<u64>,
    /// The members of each current row that hold its data, in row order.
    holders: Vec<Vec<usize>>,
    owners: Vec<usize>,
    slots: Vec<Vec<Option<usize>>>,
    /// Backup slots held per member.
    count: Vec<usize>,
    /// Backup slots wanted per member.
    quota: Vec<usize>,
    /// `at[m][j]`: rows with member `m` in slot `j`.
    at: Vec<Vec<usize>>,
}

impl Planner {
    fn new(
        holders: Vec<Vec<usize>>,
        owners: Vec<usize>,
        owner_quota: &[usize],
        replicas: usize,
        keys: Vec<u64>,
    ) -> Self {
        let n = keys.len();
        let backups = replicas - 1;
        // The new owner moves to the front and everyone else keeps their order: the old owner
        // becomes first backup and the others shift down, so every backup still holds at least
        // the data of the index it now sits at. Replicas pushed past the end stay in `holders`
        // and may come back for free.
        let slots: Vec<Vec<Option<usize>>> = holders
            .iter()
            .zip(&owners)
            .map(|(h, &o)| {
                let mut rest = h.iter().copied().filter(|&m| m != o);
                (0..backups).map(|_| rest.next()).collect()
            })
            .collect();
        let mut count = vec![0; n];
        let mut at = vec![vec![0; backups]; n];
        for row in &slots {
            for (j, m) in row.iter().enumerate() {
                if let Some(m) = *m {
                    count[m] += 1;
                    at[m][j] += 1;
                }
            }
        }
        let rows = holders.len();
        let total = rows * backups;
        // Rounding leaves a few members one slot more; prefer those that can take empty slots
        // directly (are missing from rows with empty slots), as the empty slots need a copy
        // anyway. A member can hold one replica per row, so nobody may get both extra slots
        // when that would exceed the row count (only when members are in almost every row).
        let mut fillable = vec![0; n];
        for (row, &o) in slots.iter().zip(&owners) {
            let empty = row.iter().filter(|s| s.is_none()).count();
            if empty > 0 {
                for (m, f) in fillable.iter_mut().enumerate() {
                    if m != o && !row.contains(&Some(m)) {
                        *f += empty;
                    }
                }
            }
        }
        let quota = fair_quotas(total, &count, |m| fillable[m], |m| owner_quota[m] + total / n < rows);
        Self { n, backups, keys, holders, owners, slots, count, quota, at }
    }

    fn room(&self, m: usize) -> usize {
        self.quota[m].saturating_sub(self.count[m])
    }

    fn excess(&self, m: usize) -> usize {
        self.count[m].saturating_sub(self.quota[m])
    }

    fn in_row(&self, p: usize, m: usize) -> bool {
        self.owners[p] == m || self.slots[p].contains(&Some(m))
    }

    /// Copies needed to put `m` into row `p`: none if it held the row's data already.
    fn cost(&self, p: usize, m: usize) -> usize {
        usize::from(!self.holders[p].contains(&m))
    }

    fn put(&mut self, p: usize, j: usize, m: usize) {
        if let Some(old) = self.slots[p][j] {
            self.count[old] -= 1;
            self.at[old][j] -= 1;
        }
        self.count[m] += 1;
        self.at[m][j] += 1;
        self.slots[p][j] = Some(m);
    }

    /// The best member to put into slot `j` of row `p`, among those with spare quota that are not
    /// in the row: a former replica (no copy), then the most spare quota (so filling stays even
    /// and never corners itself), then the fewest rows at that index (less reordering later).
    fn taker(&self, p: usize, j: usize) -> Option<usize> {
        (0..self.n).filter(|&m| self.room(m) > 0 && !self.in_row(p, m)).max_by_key(|&m| {
            (self.cost(p, m) == 0, self.room(m), Reverse(self.at[m][j]), Reverse(tie_rank(self.keys[m], p)))
        })
    }

    /// Phase 2: fills every backup slot and brings every member to its quota.
    fn fill_backups(&mut self) {
        if self.backups == 0 {
            return;
        }
        let rows = self.slots.len();
        // Free: a former replica pushed out of the row comes back instead of a member over quota.
        for p in 0..rows {
            for k in 0..self.holders[p].len() {
                let w = self.holders[p][k];
                if self.room(w) == 0 || self.in_row(p, w) {
                    continue;
                }
                let over = (0..self.backups).rev().find(|&j| self.slots[p][j].is_some_and(|u| self.excess(u) > 0));
                if let Some(j) = over {
                    self.put(p, j, w);
                }
            }
        }
        // Empty slots: must be copied anyway.
        let mut stuck = Vec::new();
        for p in 0..rows {
            for j in 0..self.backups {
                if self.slots[p][j].is_none() {
                    match self.taker(p, j) {
                        Some(w) => self.put(p, j, w),
                        None => stuck.push((p, j)),
                    }
                }
            }
        }
        for u in 0..self.n {
            self.shed(u);
        }
        // What direct moves could not do, chains of replacements do.
        for (p, j) in stuck {
            let found = self.augment(Start::Vacancy(p, j));
            assert!(found, "no chain of replacements fills row {p} slot {j}");
        }
        for u in 0..self.n {
            while self.excess(u) > 0 {
                let found = self.augment(Start::Excess(u));
                assert!(found, "no chain of replacements relieves member {u}");
            }
        }
    }

    /// Hands member `u`'s slots over to members with spare quota until `u` is within quota (or
    /// no direct move is left). It leaves first the index it sits at most, so its remaining
    /// slots stay spread over the indices and phase 3 has little to reorder.
    fn shed(&mut self, u: usize) {
        if self.excess(u) == 0 {
            return;
        }
        let mut seats: Vec<Vec<usize>> = vec![Vec::new(); self.backups];
        for (p, row) in self.slots.iter().enumerate() {
            if let Some(j) = row.iter().position(|&s| s == Some(u)) {
                seats[j].push(p);
            }
        }
        let mut next = vec![0; self.backups];
        while self.excess(u) > 0 {
            let Some(j) = (0..self.backups).filter(|&j| next[j] < seats[j].len()).max_by_key(|&j| (self.at[u][j], j))
            else {
                return;
            };
            let p = seats[j][next[j]];
            next[j] += 1;
            if let Some(w) = self.taker(p, j) {
                self.put(p, j, w);
            }
        }
    }

    /// Applies the cheapest chain of replacements (fewest copies, then fewest steps) that fills
    /// the vacancy or relieves the member at `start`, ending at a member with spare quota.
    /// Returns false if there is none (which the quotas' feasibility rules out).
    fn augment(&mut self, start: Start) -> bool {
        let n = self.n;
        let mut seats: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
        for (p, row) in self.slots.iter().enumerate() {
            for (j, m) in row.iter().enumerate() {
                if let Some(m) = *m {
                    seats[m].push((p, j));
                }
            }
        }
        let mut dist = vec![usize::MAX; n];
        // `via[x] = (y, p, j)`: x takes slot j of row p from y (or fills it, if y is None).
        let mut via: Vec<Option<(Option<usize>, usize, usize)>> = vec![None; n];
        let mut queue = VecDeque::new();
        match start {
            Start::Excess(u) => {
                dist[u] = 0;
                queue.push_back(u);
            }
            Start::Vacancy(p, j) => {
                for w in (0..n).filter(|&w| !self.in_row(p, w)) {
                    dist[w] = self.cost(p, w);
                    via[w] = Some((None, p, j));
                    queue.push_back(w);
                }
                queue.make_contiguous().sort_by_key(|&w| dist[w]);
            }
        }
        let mut done = vec![false; n];
        while let Some(v) = queue.pop_front() {
            if done[v] {
                continue;
            }
            done[v] = true;
            if self.room(v) > 0 {
                // Members on the chain are distinct, and each takes a slot in a row it was not
                // in, so applying the whole chain keeps every row free of repeats.
                let mut cur = v;
                while let Some((prev, p, j)) = via[cur] {
                    self.put(p, j, cur);
                    match prev {
                        Some(prev) => cur = prev,
                        None => break,
                    }
                }
                return true;
            }
            for &(p, j) in &seats[v] {
                for x in 0..n {
                    if done[x] || self.in_row(p, x) {
                        continue;
                    }
                    // Replacing a member that this plan copied into the row by another
                    // copies nothing more than planned; only pushing out a holder costs.
                    let c = self.cost(p, x).saturating_sub(self.cost(p, v));
                    if dist[v] + c < dist[x] {
                        dist[x] = dist[v] + c;
                        via[x] = Some((Some(v), p, j));
                        if c == 0 {
                            queue.push_front(x);
                        } else {
                            queue.push_back(x);
                        }
                    }
                }
            }
        }
        false
    }

    /// Phase 3: reorders backups within rows until, for every member, its counts at any two
    /// backup indices differ by at most one.
    fn balance_backup_order(&mut self) {
        loop {
            let mut changed = false;
            for a in 0..self.backups {
                for b in a + 1..self.backups {
                    changed |= self.balance_pair(a, b);
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Balances every member's counts at slots `a` and `b` by reversing arcs along shortest
    /// paths in the multigraph whose arcs are rows, from the member at `a` to the member at `b`.
    fn balance_pair(&mut self, a: usize, b: usize) -> bool {
        let n = self.n;
        let seat = |row: &[Option<usize>], j: usize| row[j].expect("phase 2 fills every slot");
        let mut arcs: Vec<Vec<usize>> = vec![Vec::new(); n * n];
        for (p, row) in self.slots.iter().enumerate() {
            arcs[seat(row, a) * n + seat(row, b)].push(p);
        }
        let mut changed = false;
        while let Some(m) = (0..n).find(|&m| self.at[m][a].abs_diff(self.at[m][b]) >= 2) {
            // Walk away from the slot `m` has too often: along arcs u→v if that is `a`,
            // against them if it is `b`; `lead(u)` is how much more often `u` has that slot.
            let forward = self.at[m][a] > self.at[m][b];
            let (hi, lo) = if forward { (a, b) } else { (b, a) };
            let lead = |at: &[Vec<usize>], u: usize| at[u][hi] as i64 - at[u][lo] as i64;
            let arc = |u: usize, v: usize| if forward { u * n + v } else { v * n + u };
            let mut parent = vec![usize::MAX; n];
            parent[m] = m;
            let mut queue = VecDeque::from([m]);
            let mut end = None;
            while let Some(u) = queue.pop_front() {
                if u != m && lead(&self.at, u) < 0 {
                    end = Some(u);
                    break;
                }
                for v in 0..n {
                    if parent[v] == usize::MAX && !arcs[arc(u, v)].is_empty() {
                        parent[v] = u;
                        queue.push_back(v);
                    }
                }
            }
            let mut v = end.expect("a member with a deficit is reachable (see module docs)");
            while v != m {
                let u = parent[v];
                let p = arcs[arc(u, v)].pop().expect("arc exists");
                // Row p has u at `hi` and v at `lo`: swap them.
                self.slots[p].swap(a, b);
                self.at[u][hi] -= 1;
                self.at[u][lo] += 1;
                self.at[v][lo] -= 1;
                self.at[v][hi] += 1;
                arcs[arc(v, u)].push(p);
                v = u;
            }
            changed = true;
        }
        changed
    }

    /// Builds the rows and checks the cheap invariants.
    fn finish(self, ids: &[MemberId], owner_quota: &[usize]) -> Vec<Row> {
        let mut owned = vec![0; self.n];
        let rows: Vec<Row> = self
            .owners
            .iter()
            .zip(&self.slots)
            .map(|(&o, slots)| {
                owned[o] += 1;
                let row: Vec<usize> =
                    std::iter::once(o).chain(slots.iter().map(|s| s.expect("phase 2 fills every slot"))).collect();
                for (i, m) in row.iter().enumerate() {
                    assert!(!row[..i].contains(m), "member {m} twice in a row");
                }
                row.into_iter().map(|m| ids[m].clone()).collect()
            })
            .collect();
        assert_eq!(owned, owner_quota, "owner quotas missed");
        assert_eq!(self.count, self.quota, "backup quotas missed");
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(i: usize) -> MemberId {
        MemberId::new(format!("node-{i:02}"), 1_000 + i as u64)
    }

    fn members(n: usize) -> Vec<MemberId> {
        (0..n).map(member).collect()
    }

    fn empty(partitions: usize) -> Vec<Row> {
        vec![Row::new(); partitions]
    }

    /// A small deterministic generator for test tables (xorshift64*).
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    fn replicas(replica_count: usize, n: usize) -> usize {
        replica_count.clamp(1, REPLICAS_MAX).min(n)
    }

    fn assert_shape(rows: &[Row], members: &[MemberId], replica_count: usize) {
        let want = replicas(replica_count, members.len());
        for row in rows {
            assert_eq!(row.len(), want, "row {row:?}");
            for (i, m) in row.iter().enumerate() {
                assert!(members.contains(m), "{m} is not a member");
                assert!(!row[..i].contains(m), "{m} twice in {row:?}");
            }
        }
    }

    /// Per index `r`: rows with each member at `r`; and each member's backups in total.
    fn load(rows: &[Row], members: &[MemberId]) -> (Vec<Vec<usize>>, Vec<usize>) {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut at = vec![vec![0; members.len()]; width];
        let mut backups = vec![0; members.len()];
        for row in rows {
            for (r, m) in row.iter().enumerate() {
                let i = members.iter().position(|x| x == m).unwrap();
                at[r][i] += 1;
                if r > 0 {
                    backups[i] += 1;
                }
            }
        }
        (at, backups)
    }

    fn spread(counts: &[usize]) -> usize {
        counts.iter().max().unwrap() - counts.iter().min().unwrap()
    }

    fn assert_balanced(rows: &[Row], members: &[MemberId]) {
        let (at, backups) = load(rows, members);
        for (r, counts) in at.iter().enumerate() {
            assert!(spread(counts) <= 1, "index {r} unbalanced: {counts:?}");
        }
        assert!(spread(&backups) <= 1, "backups unbalanced: {backups:?}");
    }

    fn empty_slots(rows: &[Row], replica_count: usize, n: usize) -> usize {
        let want = replicas(replica_count, n);
        rows.iter().map(|r| want.saturating_sub(r.len())).sum()
    }

    /// The fewest owner changes any balanced table needs: the owners over quota when the extra
    /// owned rows go to those owning the most (the rows without owner need one too).
    fn forced_owner_changes(rows: &[Row], members: &[MemberId]) -> usize {
        let mut owned: Vec<usize> =
            members.iter().map(|m| rows.iter().filter(|r| r.first() == Some(m)).count()).collect();
        owned.sort_unstable_by(|a, b| b.cmp(a));
        let (base, extra) = (rows.len() / members.len(), rows.len() % members.len());
        let over: usize = owned.iter().enumerate().map(|(i, &c)| c.saturating_sub(base + usize::from(i < extra))).sum();
        over + rows.iter().filter(|r| r.is_empty()).count()
    }

    const PARTITIONS: [usize; 4] = [1, 7, 271, 1000];

    /// How the table handed to `plan` came about.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        /// The very first table.
        Empty,
        /// Random rows: foreign members, repeats, any length.
        Random,
        /// A table planned for the same members.
        Planned,
        /// Planned with 1-3 more members, which then died: promoted.
        Promoted,
        /// Planned with 1-3 fewer members, which then joined.
        Joined,
        /// Planned for the same members with another replica count.
        Resized,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Empty),
            Just(Kind::Random),
            Just(Kind::Planned),
            Just(Kind::Promoted),
            Just(Kind::Joined),
            Just(Kind::Resized),
        ]
    }

    /// A table of `kind` for `members` (drawn from a pool of 64), reproducibly from `seed`.
    fn table(kind: Kind, members: &[MemberId], partitions: usize, replica_count: usize, seed: u64) -> Vec<Row> {
        let mut g = Gen(seed | 1);
        let n = members.len();
        let k = 1 + g.below(3);
        match kind {
            Kind::Empty => empty(partitions),
            Kind::Random => (0..partitions)
                .map(|_| {
                    let len = g.below(REPLICAS_MAX + 2);
                    (0..len).map(|_| member(g.below(n + 3))).collect()
                })
                .collect(),
            Kind::Planned => plan(&empty(partitions), members, replica_count),
            Kind::Promoted => {
                let dead: Vec<MemberId> = (0..k).map(|i| member(100 + i)).collect();
                let mut all = [members, &dead[..]].concat();
                g.shuffle(&mut all);
                let before = plan(&empty(partitions), &all, replica_count);
                promote(&before, &members.iter().cloned().collect())
            }
            Kind::Joined => {
                let mut old = members.to_vec();
                g.shuffle(&mut old);
                old.truncate(n.saturating_sub(k).max(1));
                plan(&empty(partitions), &old, replica_count)
            }
            Kind::Resized => plan(&empty(partitions), members, 1 + g.below(REPLICAS_MAX)),
        }
    }

    fn check_plan(kind: Kind, n: usize, partitions: usize, replica_count: usize, seed: u64) {
        let ms = members(n);
        let current = table(kind, &ms, partitions, replica_count, seed);
        let planned = plan(&current, &ms, replica_count);
        assert_eq!(planned.len(), partitions);
        assert_shape(&planned, &ms, replica_count);
        assert_balanced(&planned, &ms);
        assert_eq!(plan(&planned, &ms, replica_count), planned, "plan is not idempotent");
        let mut shuffled = [&ms[..], &ms[..1]].concat();
        Gen(seed ^ 0x5555).shuffle(&mut shuffled);
        assert_eq!(plan(&current, &shuffled, replica_count), planned, "member order matters");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn plan_is_balanced_idempotent_and_deterministic(
            kind in kind(),
            n in 1..=12usize,
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            seed in any::<u64>(),
        ) {
            check_plan(kind, n, partitions, replica_count, seed);
        }

        #[test]
        fn promote_keeps_survivors_in_order_and_adds_nobody(
            n in 1..=12usize,
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            dead in prop::collection::btree_set(0..12usize, 0..=3),
        ) {
            let ms = members(n);
            let rows = plan(&empty(partitions), &ms, replica_count);
            let live: BTreeSet<MemberId> =
                (0..n).filter(|i| !dead.contains(i)).map(member).collect();
            let promoted = promote(&rows, &live);
            for (old, new) in rows.iter().zip(&promoted) {
                let survivors: Row = old.iter().filter(|m| live.contains(m)).cloned().collect();
                prop_assert_eq!(&survivors, new);
            }
            prop_assert_eq!(copies_needed(&rows, &promoted), 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Property 4: a member joins a balanced table of `n`.
        #[test]
        fn joining_member_moves_about_its_fair_share_to_it(
            n in 1..=12usize,
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            seed in any::<u64>(),
        ) {
            let mut all = members(n + 1);
            Gen(seed | 1).shuffle(&mut all);
            let newcomer = all[n].clone();
            let old = plan(&empty(partitions), &all[..n], replica_count);
            let new = plan(&old, &all, replica_count);
            let share: usize = replicas(replica_count, n + 1) * partitions.div_ceil(n + 1);
            let copies = copies_needed(&old, &new);
            let to_old_members = copies - new.iter().filter(|r| r.contains(&newcomer)).count();
            prop_assert!(copies <= share, "copies {} > fair share {}", copies, share);
            prop_assert_eq!(to_old_members, 0, "old members copied data among themselves");
            prop_assert!(owner_changes(&old, &new) <= partitions.div_ceil(n + 1));
            prop_assert_eq!(owner_changes(&old, &new), forced_owner_changes(&old, &all));
        }

        /// Property 5: 1-3 members die; the rows are promoted, then planned.
        #[test]
        fn removal_copies_little_more_than_the_lost_replicas(
            n in 2..=12usize,
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            k in 1..=3usize,
            seed in any::<u64>(),
        ) {
            let k = k.min(n - 1);
            let mut all = members(n);
            Gen(seed | 1).shuffle(&mut all);
            let before = plan(&empty(partitions), &all, replica_count);
            let live = &all[k..];
            let promoted = promote(&before, &live.iter().cloned().collect());
            let after = plan(&promoted, live, replica_count);
            assert_shape(&after, live, replica_count);
            assert_balanced(&after, live);
            let lost = empty_slots(&promoted, replica_count, live.len());
            let copies = copies_needed(&promoted, &after);
            prop_assert!(copies <= lost + REMOVAL_SLACK * live.len(),
                "copies {} > lost {} + slack", copies, lost);
            let forced = forced_extra_copies(&promoted, &after, live, replica_count);
            prop_assert!(copies - lost <= forced + 1, "{} extra copies, {} forced", copies - lost, forced);
            prop_assert_eq!(owner_changes(&promoted, &after), forced_owner_changes(&promoted, live));
        }
    }

    /// Extra copies allowed after one removal from a table planned from scratch, per surviving
    /// member. (Observed: at most 1 in total, and none in over 99% of cases.)
    const REMOVAL_SLACK: usize = 1;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn large_clusters_are_balanced_too(
            kind in kind(),
            n in 13..=40usize,
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            seed in any::<u64>(),
        ) {
            check_plan(kind, n, partitions, replica_count, seed);
        }
    }

    /// The fewest extra copies (beyond filling `promoted`'s empty slots) of any full table in
    /// which every member holds as many rows as in `after`. Every empty slot gets a copy; a
    /// member can take one for free only as part of its gain (rows held in `after` minus rows
    /// held in `promoted`) and only in a row it is missing from; every other fill makes its
    /// member give a row up elsewhere, which someone must then copy. So the bound is the empty
    /// slots minus a maximum matching of gains to fitting empty slots.
    fn forced_extra_copies(promoted: &[Row], after: &[Row], live: &[MemberId], replica_count: usize) -> usize {
        let n = live.len();
        let want = replicas(replica_count, n);
        let index = |m: &MemberId| live.iter().position(|x| x == m).unwrap();
        let mut gain = vec![0i64; n];
        after.iter().flatten().for_each(|m| gain[index(m)] += 1);
        promoted.iter().flatten().for_each(|m| gain[index(m)] -= 1);
        let mut free: Vec<usize> = promoted.iter().map(|r| want.saturating_sub(r.len())).collect();
        let lost: usize = free.iter().sum();
        let fits: Vec<Vec<usize>> = live
            .iter()
            .map(|m| (0..promoted.len()).filter(|&p| free[p] > 0 && !promoted[p].contains(m)).collect())
            .collect();
        // placed[p]: members matched to empty slots of row p. Augmenting paths: a member takes
        // a slot in a row it fits, possibly moving a member placed there to another row.
        let mut placed: Vec<Vec<usize>> = vec![Vec::new(); promoted.len()];
        let mut matched = 0;
        for m in 0..n {
            for _ in 0..gain[m].max(0) {
                let mut came: Vec<Option<(usize, usize)>> = vec![None; n];
                let mut seen = vec![false; n];
                seen[m] = true;
                let mut queue = VecDeque::from([m]);
                let mut end = None;
                'search: while let Some(u) = queue.pop_front() {
                    for &p in &fits[u] {
                        if placed[p].contains(&u) {
                            continue;
                        }
                        if free[p] > 0 {
                            end = Some((u, p));
                            break 'search;
                        }
                        for &y in &placed[p] {
                            if !seen[y] {
                                seen[y] = true;
                                came[y] = Some((p, u));
                                queue.push_back(y);
                            }
                        }
                    }
                }
                let Some((mut u, mut p)) = end else { continue };
                free[p] -= 1;
                matched += 1;
                loop {
                    placed[p].push(u);
                    let Some((from_row, from)) = came[u] else { break };
                    placed[from_row].retain(|&y| y != u);
                    (u, p) = (from, from_row);
                }
            }
        }
        lost - matched
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Tables that went through several joins and deaths stay balanced, and every death
        /// copies only what balance forces.
        #[test]
        fn histories_stay_balanced_and_removals_copy_only_what_balance_forces(
            partitions in prop::sample::select(&PARTITIONS[..]),
            replica_count in 1..=REPLICAS_MAX,
            start in 1..=10usize,
            events in prop::collection::vec((any::<bool>(), 1..=3usize, any::<u64>()), 1..=6),
        ) {
            let mut live = members(start);
            let mut next = 100;
            let mut rows = plan(&empty(partitions), &live, replica_count);
            for (join, k, seed) in events {
                if join || live.len() == 1 {
                    let old = rows.clone();
                    live.extend((next..next + k).map(member));
                    next += k;
                    rows = plan(&old, &live, replica_count);
                    if k == 1 {
                        let n = live.len();
                        let share = replicas(replica_count, n) * partitions.div_ceil(n);
                        prop_assert!(copies_needed(&old, &rows) <= share + JOIN_SLACK);
                        prop_assert_eq!(owner_changes(&old, &rows), forced_owner_changes(&old, &live));
                    }
                } else {
                    Gen(seed | 1).shuffle(&mut live);
                    live.drain(..k.min(live.len() - 1));
                    let promoted = promote(&rows, &live.iter().cloned().collect());
                    rows = plan(&promoted, &live, replica_count);
                    let lost = empty_slots(&promoted, replica_count, live.len());
                    let extra = copies_needed(&promoted, &rows) - lost;
                    let forced = forced_extra_copies(&promoted, &rows, &live, replica_count);
                    prop_assert!(
                        extra <= forced + 1 + lost / 8,
                        "{} extra copies, {} forced, {} lost",
                        extra,
                        forced,
                        lost
                    );
                    prop_assert_eq!(owner_changes(&promoted, &rows), forced_owner_changes(&promoted, &live));
                }
                assert_shape(&rows, &live, replica_count);
                assert_balanced(&rows, &live);
                prop_assert_eq!(&plan(&rows, &live, replica_count), &rows);
            }
        }
    }

    /// Extra copies allowed when one member joins a table planned after a history of changes:
    /// rounding can make an old member take one slot (observed at most 1).
    const JOIN_SLACK: usize = 2;

    /// The master's migration loop, reduced to its table: members join (and some die) while
    /// rows move one at a time, in random order, toward the target, which is planned again only
    /// when [`keeps_target`] says so. Returns the final rows and members, the rows moved since the
    /// last plan and how many rows that plan changed.
    fn migrate_one_row_at_a_time(
        first: usize,
        n: usize,
        deaths: usize,
        partitions: usize,
        replica_count: usize,
        in_order: bool,
        seed: u64,
    ) -> (Vec<Row>, Vec<MemberId>, usize, usize) {
        let mut g = Gen(seed | 1);
        let mut members = members(first);
        let mut rows = plan(&empty(partitions), &members, replica_count);
        let mut joins = (first..n).map(member).collect::<VecDeque<_>>();
        let mut deaths = deaths;
        let mut cache: Option<(Vec<MemberId>, Vec<Row>, Vec<Row>)> = None;
        let (mut moved_since_change, mut planned_diff) = (0, 0);
        // Far more steps than needed: one move per row per member change at most.
        for _ in 0..(partitions + 1) * (n + deaths + 2) * 2 {
            // Now and then the members change in the middle of the migrations.
            if g.below(8) == 0 {
                if let Some(m) = joins.pop_front() {
                    members.push(m);
                } else if deaths > 0 {
                    deaths -= 1;
                    if members.len() > 1 {
                        members.remove(g.below(members.len()));
                        rows = promote(&rows, &members.iter().cloned().collect());
                    }
                }
            }
            let fresh = match &cache {
                Some((m, base, target)) => *m != members || !keeps_target(base, target, &rows),
                None => true,
            };
            if fresh {
                let target = plan(&rows, &members, replica_count);
                planned_diff = rows.iter().zip(&target).filter(|(a, b)| a != b).count();
                moved_since_change = 0;
                cache = Some((members.clone(), rows.clone(), target));
            }
            let target = &cache.as_ref().expect("planned above").2;
            let differing: Vec<usize> = (0..partitions).filter(|p| rows[*p] != target[*p]).collect();
            if differing.is_empty() {
                if joins.is_empty() && deaths == 0 {
                    return (rows, members, moved_since_change, planned_diff);
                }
                continue;
            }
            // The master starts migrations in partition order; they finish in any order.
            let p = if in_order { differing[0] } else { differing[g.below(differing.len())] };
            rows[p] = target[p].clone();
            moved_since_change += 1;
        }
        panic!("the migrations did not settle: {} rows still differ", {
            let target = &cache.expect("planned").2;
            rows.iter().zip(target).filter(|(a, b)| a != b).count()
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// With the target kept while rows move toward it, a master that commits one migration
        /// at a time settles, each row moving at most once per plan, on a table that is its own
        /// plan (what `MapService::is_settled` checks). Planning again from each intermediate
        /// table instead never settled for 10 members joining one (issue 11).
        #[test]
        fn migrating_toward_a_kept_target_settles(
            first in 1..=3usize,
            n in 1..=24usize,
            deaths in 0..=2usize,
            partitions in prop::sample::select(&[7usize, 64, 271][..]),
            replica_count in 1..=REPLICAS_MAX,
            in_order in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let first = first.min(n);
            let (rows, members, moved, planned) =
                migrate_one_row_at_a_time(first, n, deaths, partitions, replica_count, in_order, seed);
            prop_assert!(moved <= planned, "{moved} moves for {planned} rows to move");
            assert_shape(&rows, &members, replica_count);
            assert_balanced(&rows, &members);
            prop_assert_eq!(plan(&rows, &members, replica_count), rows);
        }
    }

    #[test]
    fn a_kept_target_is_replanned_after_any_other_change() {
        let ms = members(4);
        let base = plan(&empty(16), &ms[..3], 3);
        let target = plan(&base, &ms, 3);
        let mut current = base.clone();
        assert!(keeps_target(&base, &target, &current));
        let moved = (0..16).find(|p| base[*p] != target[*p]).expect("the newcomer gets rows");
        current[moved] = target[moved].clone();
        assert!(keeps_target(&base, &target, &current), "a row moved to the target");
        current[moved] = vec![ms[3].clone()];
        assert!(!keeps_target(&base, &target, &current), "a row changed some other way");
        assert!(!keeps_target(&base, &target, &current[..15]), "another partition count");
    }

    #[test]
    fn dead_owner_is_replaced_by_its_first_backup() {
        let [a, b, c, d] = [0, 1, 2, 3].map(member);
        let rows = vec![vec![a.clone(), b.clone(), c.clone()], vec![d.clone(), a.clone(), b.clone()]];
        let live = BTreeSet::from([b.clone(), c.clone(), d.clone()]);
        let promoted = promote(&rows, &live);
        assert_eq!(promoted, vec![vec![b.clone(), c.clone()], vec![d.clone(), b.clone()]]);
    }

    #[test]
    fn promoted_owners_keep_their_rows_when_balance_allows() {
        let ms = members(5);
        let before = plan(&empty(271), &ms, 3);
        let live: BTreeSet<MemberId> = ms[1..].iter().cloned().collect();
        let promoted = promote(&before, &live);
        let after = plan(&promoted, &ms[1..], 3);
        let changed = owner_changes(&promoted, &after);
        assert_eq!(changed, forced_owner_changes(&promoted, &ms[1..]));
        assert!(changed < 271 / 5, "{changed} owners changed");
    }

    #[test]
    fn joining_member_takes_about_a_fair_share_from_everyone() {
        let ms = members(5);
        let old = plan(&empty(271), &ms[..4], 3);
        let new = plan(&old, &ms, 3);
        assert_balanced(&new, &ms);
        // 271 / 5 → the newcomer holds 54 or 55 slots at each of the 3 indices.
        let copies = copies_needed(&old, &new);
        assert!((3 * 54..=3 * 55).contains(&copies), "{copies} copies");
        assert_eq!(copies, new.iter().filter(|r| r.contains(&ms[4])).count());
        assert!(owner_changes(&old, &new) <= 55);
        // Every old member gave something up.
        let (old_load, _) = load(&old, &ms);
        let (new_load, _) = load(&new, &ms);
        for i in 0..4 {
            let before: usize = old_load.iter().map(|c| c[i]).sum();
            let after: usize = new_load.iter().map(|c| c[i]).sum();
            assert!(after < before, "member {i} kept {after} of {before}");
        }
    }

    #[test]
    fn ownership_moves_to_a_replica_holder_rather_than_a_stranger() {
        let [a, b, c] = [0, 1, 2].map(member);
        // a owns both rows; one must go to b or c, and b holds a replica of the second row.
        let current = vec![vec![a.clone(), c.clone()], vec![a.clone(), b.clone()]];
        let planned = plan(&current, &[a.clone(), b.clone(), c.clone()], 2);
        assert_eq!(copies_needed(&current, &planned), 0, "{planned:?}");
        assert_eq!(owner_changes(&current, &planned), 1);
    }

    #[test]
    fn old_owner_stays_as_first_backup_after_a_forced_move() {
        let [a, b, c] = [0, 1, 2].map(member);
        let current = vec![vec![a.clone(), b.clone(), c.clone()]; 3];
        let planned = plan(&current, &[a.clone(), b.clone(), c.clone()], 3);
        assert_balanced(&planned, &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(copies_needed(&current, &planned), 0);
        assert_eq!(owner_changes(&current, &planned), 2);
    }

    #[test]
    fn first_table_is_balanced_and_uses_every_member() {
        let ms = members(7);
        let rows = plan(&empty(271), &ms, 7);
        assert_shape(&rows, &ms, 7);
        assert_balanced(&rows, &ms);
    }

    #[test]
    fn balanced_table_is_returned_unchanged() {
        let [a, b, c] = [0, 1, 2].map(member);
        // Balanced at every index and in backups, though a and b hold two replicas and c none.
        let rows = vec![vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]];
        let ms = [a, b, c];
        assert_balanced(&rows, &ms);
        assert_eq!(plan(&rows, &ms, 2), rows);
    }

    #[test]
    fn no_members_means_empty_rows() {
        let rows = vec![vec![member(0)], Row::new()];
        assert_eq!(plan(&rows, &[], 3), empty(2));
        assert_eq!(plan(&[], &members(3), 3), Vec::<Row>::new());
    }

    #[test]
    fn replica_count_is_clamped_to_members_and_maximum() {
        assert_shape(&plan(&empty(7), &members(3), 99), &members(3), 3);
        assert_shape(&plan(&empty(7), &members(9), 99), &members(9), REPLICAS_MAX);
        assert_shape(&plan(&empty(7), &members(3), 0), &members(3), 1);
    }

    #[test]
    fn lost_partitions_get_new_owners() {
        let ms = members(3);
        let rows = plan(&empty(7), &ms, 1);
        let live: BTreeSet<MemberId> = ms[1..].iter().cloned().collect();
        let promoted = promote(&rows, &live);
        let lost = promoted.iter().filter(|r| r.is_empty()).count();
        assert!(lost > 0);
        let after = plan(&promoted, &ms[1..], 1);
        assert_eq!(copies_needed(&promoted, &after), lost);
        assert_balanced(&after, &ms[1..]);
    }

    #[test]
    fn many_partitions_few_members() {
        let ms = members(12);
        let rows = plan(&empty(10_000), &ms[..11], 3);
        let rows = plan(&rows, &ms, 3);
        assert_shape(&rows, &ms, 3);
        assert_balanced(&rows, &ms);
    }
}
