//! Discovery answers one question: which addresses may hold peers of my cluster?
//!
//! The answer is a set of *candidate gossip addresses*, published on a [`tokio::sync::watch`]
//! channel. The membership layer probes every candidate that is not already a known member, so a
//! listed peer that is down is retried until it appears. Discovery never decides who is in the
//! cluster; gossip does.
//!
//! Two mechanisms, exactly one per member:
//!
//! * **Static**: a list of `host`, `host:port` or `host:port-range` entries (see [`SeedSpec`]).
//!   Host names are resolved at start and again every [`StaticDiscovery::refresh_interval`], so a
//!   peer whose DNS record changes is found again.
//! * **mDNS** ([`mdns`]): each member announces `_grapevine._udp.local.` with its cluster name and
//!   addresses in a TXT record, browses, and proposes the members of its own cluster.

pub mod mdns;
mod seed;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub use seed::{MAX_ADDRESSES, MAX_PORTS_PER_ENTRY, SeedSpec, parse_member_list};

/// Errors of the discovery layer. Each names the entry that was wrong and the accepted forms.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DiscoveryError {
    /// A member-list entry could not be parsed.
    #[error(
        "invalid member entry {entry:?}: {reason}; expected `host`, `host:port` or `host:first-last` \
         (IPv6 as `[addr]:port`)"
    )]
    InvalidEntry {
        /// The entry as written.
        entry: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The list expands to more addresses than discovery will probe.
    #[error("the member list expands to {count} addresses; at most {max} are allowed (use narrower port ranges)")]
    TooManyAddresses {
        /// How many addresses the list expands to.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Static discovery: a fixed list of seed entries, re-resolved periodically.
#[derive(Debug, Clone)]
pub struct StaticDiscovery {
    seeds: Vec<SeedSpec>,
    refresh_interval: Duration,
}

/// How long [`DiscoveryHandle::stop`] waits for a task to finish what it does on stopping (mDNS
/// says goodbye) before aborting it.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// A running discovery task. Dropping it aborts the task; [`DiscoveryHandle::stop`] lets it finish
/// (an mDNS member says goodbye, so peers drop it at once).
#[derive(Debug)]
pub struct DiscoveryHandle {
    candidates: watch::Receiver<Vec<SocketAddr>>,
    task: Option<JoinHandle<()>>,
    /// Asks the task to stop on its own (mDNS); without it the task is aborted.
    stop: Option<oneshot::Sender<()>>,
}

impl StaticDiscovery {
    /// Discovery over `seeds`, re-resolving host names every `refresh_interval`.
    pub fn new(seeds: Vec<SeedSpec>, refresh_interval: Duration) -> Self {
        assert!(!refresh_interval.is_zero(), "refresh interval must be positive");
        Self { seeds, refresh_interval }
    }

    /// The configured entries.
    pub fn seeds(&self) -> &[SeedSpec] {
        &self.seeds
    }

    /// How often host names are resolved again.
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval
    }

    /// Resolves every entry once. Entries whose host does not resolve are logged and skipped: a
    /// peer that is not in DNS yet is like a peer that is down, and is found on a later refresh.
    pub async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out = BTreeSet::new();
        for seed in &self.seeds {
            match seed.resolve().await {
                Ok(addrs) => out.extend(addrs),
                Err(error) => {
                    warn!(entry = %seed, %error, "cannot resolve member entry; will retry on next refresh")
                }
            }
            if out.len() >= MAX_ADDRESSES {
                warn!(max = MAX_ADDRESSES, "member list resolves to too many addresses; truncated");
                break;
            }
        }
        out.into_iter().take(MAX_ADDRESSES).collect()
    }

    /// Resolves now, then again every refresh interval, publishing the candidate set.
    pub async fn start(self) -> DiscoveryHandle {
        let initial = self.resolve().await;
        debug!(candidates = initial.len(), "static discovery resolved");
        let (tx, rx) = watch::channel(initial);
        let needs_refresh = self.seeds.iter().any(|seed| !seed.is_literal());
        let task = needs_refresh.then(|| {
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(self.refresh_interval);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let addrs = self.resolve().await;
                    tx.send_if_modified(|current| {
                        let changed = *current != addrs;
                        if changed {
                            debug!(candidates = addrs.len(), "member list re-resolved to new addresses");
                            *current = addrs;
                        }
                        changed
                    });
                    if tx.is_closed() {
                        return;
                    }
                }
            })
        });
        DiscoveryHandle { candidates: rx, task, stop: None }
    }
}

impl DiscoveryHandle {
    /// A handle that publishes a fixed candidate set and runs no task.
    pub fn fixed(candidates: Vec<SocketAddr>) -> Self {
        let (_tx, rx) = watch::channel(candidates);
        Self { candidates: rx, task: None, stop: None }
    }

    /// The current candidate addresses, updated as discovery learns more.
    pub fn candidates(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.candidates.clone()
    }

    /// Stops the task and waits for it to end: an mDNS task unregisters first (bounded by a few
    /// seconds, then it is aborted); a static refresh task is aborted.
    pub async fn stop(&mut self) {
        let Some(mut task) = self.task.take() else { return };
        if let Some(stop) = self.stop.take()
            && stop.send(()).is_ok()
            && tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_ok()
        {
            return;
        }
        task.abort();
        let _ = task.await;
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_entries_resolve_without_a_refresh_task() {
        let seeds = parse_member_list("127.0.0.1:7000-7002, 127.0.0.2:7100", 5701..=5800).unwrap();
        let handle = StaticDiscovery::new(seeds, Duration::from_secs(30)).start().await;
        assert!(handle.task.is_none());
        let got = handle.candidates().borrow().clone();
        let want: Vec<SocketAddr> = ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.2:7100"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn host_names_are_resolved_and_refreshed() {
        let seeds = parse_member_list("localhost:7000", 5701..=5800).unwrap();
        let mut handle = StaticDiscovery::new(seeds, Duration::from_millis(20)).start().await;
        assert!(handle.task.is_some());
        let got = handle.candidates().borrow().clone();
        assert!(
            got.iter().any(|a| a.ip().is_loopback() && a.port() == 7000),
            "localhost should resolve to a loopback address, got {got:?}"
        );
        handle.stop().await;
    }

    #[tokio::test]
    async fn unresolvable_hosts_are_skipped_not_fatal() {
        let seeds = parse_member_list("no-such-host.invalid:7000, 127.0.0.1:7001", 5701..=5800).unwrap();
        let got = StaticDiscovery::new(seeds, Duration::from_secs(30)).resolve().await;
        assert_eq!(got, vec!["127.0.0.1:7001".parse::<SocketAddr>().unwrap()]);
    }
}
