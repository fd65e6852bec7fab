//! Which discovery candidates a member probes in a round. A candidate that is not a member gets a
//! gossip SYN; one that does not answer (it does not become a member) is probed again after a
//! wait that doubles with each unanswered probe, from one round up to [`BACKOFF_ROUNDS_MAX`]
//! rounds, and a round sends at most [`PROBES_PER_ROUND_MAX`] probes, the candidates probed least
//! often first. A bare host in `--members` names every port of its 100-port range: without the
//! backoff, the absent ports took most of an idle member's gossip datagrams. A candidate that
//! answers leaves the targets and its backoff is forgotten (probed at once if it leaves the
//! cluster again); a new list from discovery forgets every backoff. The decision is
//! [`ProbeSchedule::due`], a pure function of the targets, the time and the round's length.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The most probes one round sends.
pub(crate) const PROBES_PER_ROUND_MAX: usize = 64;

/// The longest wait between two probes of a candidate that does not answer, in rounds.
pub(crate) const BACKOFF_ROUNDS_MAX: u32 = 8;

/// The wait before a candidate that left `unanswered` probes unanswered is probed again: one
/// round, doubled for each unanswered probe after the first, at most [`BACKOFF_ROUNDS_MAX`] rounds.
pub(crate) fn backoff(unanswered: u32, round: Duration) -> Duration {
    let rounds = 1u32 << unanswered.saturating_sub(1).min(BACKOFF_ROUNDS_MAX.ilog2());
    round * rounds.min(BACKOFF_ROUNDS_MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probed {
    unanswered: u32,
    next: Instant,
}

/// The probing state of one member's candidates.
#[derive(Debug, Default)]
pub(crate) struct ProbeSchedule {
    probed: HashMap<SocketAddr, Probed>,
}

impl ProbeSchedule {
    /// Forgets every backoff (discovery gave a new list).
    pub(crate) fn reset(&mut self) {
        self.probed.clear();
    }

    /// The candidates among `targets` (those that are not members) to probe at `now`, in rounds
    /// of length `round`; counts them as probed. Targets that were never probed, or whose wait is
    /// over, are due; the least probed first (then the longest waiting, then by address), at most
    /// [`PROBES_PER_ROUND_MAX`]. Candidates that are no longer targets are forgotten.
    pub(crate) fn due(&mut self, targets: &[SocketAddr], now: Instant, round: Duration) -> Vec<SocketAddr> {
        let current: HashSet<&SocketAddr> = targets.iter().collect();
        self.probed.retain(|addr, _| current.contains(addr));
        let mut due: Vec<(u32, Instant, SocketAddr)> = current
            .into_iter()
            .filter_map(|addr| match self.probed.get(addr) {
                None => Some((0, now, *addr)),
                Some(p) if p.next <= now => Some((p.unanswered, p.next, *addr)),
                Some(_) => None,
            })
            .collect();
        due.sort();
        due.truncate(PROBES_PER_ROUND_MAX);
        due.into_iter()
            .map(|(unanswered, _, addr)| {
                let unanswered = unanswered.saturating_add(1);
                self.probed.insert(addr, Probed { unanswered, next: now + backoff(unanswered, round) });
                addr
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROUND: Duration = Duration::from_secs(1);

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i))).collect()
    }

    #[test]
    fn the_wait_doubles_from_one_round_up_to_the_maximum() {
        let waits: Vec<u64> = (0..8).map(|n| backoff(n, ROUND).as_secs()).collect();
        assert_eq!(waits, [1, 1, 2, 4, 8, 8, 8, 8]);
    }

    #[test]
    fn absent_ports_are_probed_less_and_less_often() {
        let targets = addrs(99);
        let mut schedule = ProbeSchedule::default();
        let start = Instant::now();
        let sent: Vec<usize> = (0..40).map(|r| schedule.due(&targets, start + ROUND * r, ROUND).len()).collect();
        assert_eq!(sent[0], PROBES_PER_ROUND_MAX, "the first round spends the budget");
        assert!(sent.iter().all(|n| *n <= PROBES_PER_ROUND_MAX));
        let late: usize = sent[24..].iter().sum();
        // Every port once per 8 rounds at most: about 99 / 8 per round, against 99 before.
        assert!(late <= 99 * 16 / 8 + 99, "{late} probes in the last 16 rounds: {sent:?}");
        assert!(late >= 99 * 16 / 8 - 99, "{late}: every absent port is still probed: {sent:?}");
    }

    #[test]
    fn a_candidate_that_answered_and_left_again_is_probed_at_once() {
        let targets = addrs(10);
        let mut schedule = ProbeSchedule::default();
        let start = Instant::now();
        for r in 0..10 {
            schedule.due(&targets, start + ROUND * r, ROUND);
        }
        // targets[3] became a member (not a target), then left again.
        let without: Vec<SocketAddr> = targets.iter().copied().filter(|a| *a != targets[3]).collect();
        schedule.due(&without, start + ROUND * 10, ROUND);
        assert_eq!(schedule.due(&targets, start + ROUND * 11, ROUND).first(), Some(&targets[3]));
        schedule.reset();
        assert_eq!(schedule.due(&targets, start + ROUND * 12, ROUND).len(), 10, "a new list: every candidate");
    }

    proptest! {
        /// Over any run of rounds (candidates coming and going): no round sends more than the
        /// budget, no candidate is probed twice within its wait, and a candidate that stays a
        /// target is never left out for long: at most twice `BACKOFF_ROUNDS_MAX` rounds plus the
        /// rounds the budget needs to go around every target (candidates probed less often go
        /// first, so a long list ramps up over a few rounds).
        #[test]
        fn rounds_respect_the_budget_and_the_backoff(
            n in 1u16..300,
            rounds in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 300), 1..40),
        ) {
            let all = addrs(n);
            let mut schedule = ProbeSchedule::default();
            let start = Instant::now();
            let mut last: HashMap<SocketAddr, (u32, u32)> = HashMap::new();
            let mut present_since: HashMap<SocketAddr, u32> = HashMap::new();
            for (r, present) in rounds.iter().enumerate() {
                let r = r as u32;
                let targets: Vec<SocketAddr> =
                    all.iter().zip(present).filter(|(_, p)| **p).map(|(a, _)| *a).collect();
                present_since.retain(|a, _| targets.contains(a));
                for a in &targets {
                    present_since.entry(*a).or_insert(r);
                }
                last.retain(|a, _| targets.contains(a));
                let due = schedule.due(&targets, start + ROUND * r, ROUND);
                prop_assert!(due.len() <= PROBES_PER_ROUND_MAX);
                for a in &due {
                    prop_assert!(targets.contains(a), "only targets are probed");
                    if let Some((at, count)) = last.get(a) {
                        let wait = backoff(*count, ROUND).as_secs() as u32;
                        prop_assert!(r - at >= wait, "{a} probed {} rounds after the last, wait {wait}", r - at);
                    }
                    let count = last.get(a).map_or(0, |(_, c)| *c) + 1;
                    last.insert(*a, (r, count));
                }
                let slack = 2 * (BACKOFF_ROUNDS_MAX + (n as u32).div_ceil(PROBES_PER_ROUND_MAX as u32));
                for a in &targets {
                    let since = last.get(a).map_or(present_since[a], |(at, _)| *at);
                    prop_assert!(r - since <= slack, "{a} not probed for {} rounds", r - since);
                }
            }
        }
    }
}
