//! The caller's side: find the owner of a key under this member's table, send the operation,
//! and retry (within the operation timeout) when the table was stale, the partition was moving,
//! or the owner could not be reached before the request went out.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::{NetError, codec};
use tokio::task::JoinSet;

use crate::error::MapError;
use crate::hash::partition_of;
use crate::messages::{Msg, MultiOp, Op, OpResult, Reply};
use crate::node::{MAP_SERVICE, Node};

/// First retry delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Where an attempt goes under this member's table (with the table's epoch).
enum Target {
    /// Nowhere yet: why.
    NoOwner(u64, String),
    Local(u64),
    Remote(u64, MemberId),
}

/// What one attempt produced.
enum Attempt {
    Reply(Reply),
    /// Not delivered, or delivered with no answer for a read: retry.
    Retry(String),
    /// Delivered, answer lost, for a write: give up.
    Lost(String),
}

impl Node {
    /// Refuses an operation on `map` at once when this member is shutting down or, for a map with
    /// split-brain protection, sees fewer members than the map's minimum (before routing, and
    /// again before every retry).
    pub(crate) fn check_running(&self, map: &str) -> Result<(), MapError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(MapError::ShuttingDown { map: map.to_string() });
        }
        self.check_protection(map)
    }

    /// Waits a little before a retry: until the table changes or `delay` passes.
    async fn pause(&self, delay: Duration, deadline: Instant) {
        let mut rx = self.tables.tx.subscribe();
        let delay = delay.min(deadline.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(delay, rx.changed()).await;
    }

    /// After a `WrongOwner`: if the answering member has a newer table, take it from there.
    async fn catch_up(self: &Arc<Self>, from: &MemberId, their_epoch: u64) {
        if their_epoch > self.table().epoch {
            self.fetch_table(from).await;
        }
    }

    /// Sends a partition operation to the partition's owner under this member's table (running
    /// it here when this member is the owner) until the owner gives an answer other than "wrong
    /// owner" or "retry", or the operation timeout passes (from `started`). `local` runs it here;
    /// `msg` builds the request for a remote owner (`None`: there is none to send any more, which
    /// fails the call); both get the caller's `state` and this member's table epoch.
    #[allow(clippy::too_many_arguments)]
    async fn route<S, L, F>(
        self: &Arc<Self>,
        map: &str,
        op: &'static str,
        p: u32,
        retry_if_lost: bool,
        started: Instant,
        state: &mut S,
        mut local: L,
        msg: impl Fn(&S, u64) -> Option<Msg>,
    ) -> Result<Reply, MapError>
    where
        L: FnMut(&mut S, u64) -> F,
        F: Future<Output = Reply>,
    {
        self.check_running(map)?;
        let deadline = started + self.settings.operation_timeout;
        let mut backoff = BACKOFF_MIN;
        let mut last_error: String;
        loop {
            // Read from this thread's copy of the table; the owner is copied only when remote.
            let target = self.with_table(|table| match table.owner(p) {
                None if table.epoch == 0 => {
                    Target::NoOwner(table.epoch, "this member has no partition table yet".into())
                }
                None => Target::NoOwner(table.epoch, format!("partition {p} has no owner")),
                Some(owner) if *owner == self.local => Target::Local(table.epoch),
                Some(owner) => Target::Remote(table.epoch, owner.clone()),
            });
            let (epoch, owner) = match &target {
                Target::NoOwner(epoch, _) => (*epoch, None),
                Target::Local(epoch) => (*epoch, Some(&self.local)),
                Target::Remote(epoch, owner) => (*epoch, Some(owner)),
            };
            let attempt = match &target {
                Target::NoOwner(_, reason) => Attempt::Retry(reason.clone()),
                Target::Local(epoch) => Attempt::Reply(local(state, *epoch).await),
                Target::Remote(epoch, owner) => match msg(state, *epoch) {
                    Some(msg) => {
                        let remaining =
                            deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                        self.remote(owner, Node::encode(&msg), remaining, retry_if_lost).await
                    }
                    None => Attempt::Reply(Reply::Failed {
                        error: "the operation already ran on this member and cannot be sent again".into(),
                    }),
                },
            };
            match attempt {
                Attempt::Reply(Reply::WrongOwner { epoch: theirs }) => {
                    last_error = format!("the owner under table epoch {epoch} moved (its epoch {theirs})");
                    if let Some(owner) = owner {
                        self.catch_up(owner, theirs).await;
                    }
                }
                Attempt::Reply(Reply::Retry { reason }) | Attempt::Retry(reason) => last_error = reason,
                Attempt::Reply(Reply::Failed { error }) => {
                    return Err(MapError::Failed { op, map: map.to_string(), error });
                }
                Attempt::Reply(reply) => return Ok(reply),
                Attempt::Lost(reason) => {
                    let owner = owner.map(ToString::to_string).unwrap_or_default();
                    return Err(MapError::Indeterminate { op, map: map.to_string(), owner, reason });
                }
            }
            if Instant::now() >= deadline {
                return Err(MapError::Timeout {
                    op,
                    map: map.to_string(),
                    after: self.settings.operation_timeout,
                    last_error,
                });
            }
            self.check_running(map)?;
            self.pause(backoff, deadline).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Executes a key operation wherever its partition lives. Run here (this member owns the
    /// partition), the operation is moved into the store rather than copied.
    pub(crate) async fn call(self: &Arc<Self>, map: &str, op: Op) -> Result<OpResult, MapError> {
        let started = Instant::now();
        let p = partition_of(op.key(), self.settings.partition_count);
        let name = op.name();
        let retry_if_lost = op.retry_if_lost();
        // The operation is taken by the local execution once it runs (it then answers for good:
        // no retry follows); until then, each attempt borrows it. Beside it, what the local
        // execution did about the latency.
        let mut state = (Some(op), crate::owner::Latency::NotRun);
        let local = |state: &mut (Option<Op>, crate::owner::Latency), epoch: u64| {
            let (executed, recorded) = self.owner_execute_taking(p, map, &mut state.0, epoch, Some(started));
            if !matches!(recorded, crate::owner::Latency::NotRun) {
                state.1 = recorded;
            }
            async move {
                match executed {
                    crate::owner::Executed::Now(reply) => reply,
                    crate::owner::Executed::Pending(pending) => self.finish_write(pending).await,
                }
            }
        };
        let msg = |state: &(Option<Op>, crate::owner::Latency), epoch| {
            let op = state.0.clone()?;
            Some(Msg::Op { epoch, partition: p, map: map.to_string(), op })
        };
        match self.route(map, name, p, retry_if_lost, started, &mut state, local, msg).await? {
            Reply::Done(result) => {
                match state.1 {
                    crate::owner::Latency::Recorded => {}
                    crate::owner::Latency::Counters(counters) => counters.record_latency(name, started.elapsed()),
                    crate::owner::Latency::NotRun => self.counters(map).record_latency(name, started.elapsed()),
                }
                Ok(result)
            }
            other => {
                Err(MapError::Failed { op: name, map: map.to_string(), error: format!("unexpected reply {other:?}") })
            }
        }
    }

    /// Sends a request to `owner` and classifies the outcome.
    async fn remote(&self, owner: &MemberId, msg: bytes::Bytes, timeout: Duration, retry_if_lost: bool) -> Attempt {
        match self.net.request(owner, MAP_SERVICE, msg, timeout).await {
            Ok(bytes) => match codec::decode::<Reply>(&bytes) {
                Ok(reply) => Attempt::Reply(reply),
                Err(error) => {
                    Attempt::Reply(Reply::Failed { error: format!("undecodable reply from {owner}: {error}") })
                }
            },
            Err(error @ (NetError::ConnectionLost { .. } | NetError::Timeout { .. } | NetError::Remote { .. }))
                if !retry_if_lost =>
            {
                Attempt::Lost(error.to_string())
            }
            // Retrying cannot make a message fit.
            Err(error @ NetError::FrameTooLarge { .. }) => Attempt::Reply(Reply::Failed { error: error.to_string() }),
            Err(error) => Attempt::Retry(error.to_string()),
        }
    }

    /// Runs a per-partition operation on every partition, grouped by owner, retrying partitions
    /// whose owner moved. Returns the sum of the per-partition results.
    pub(crate) async fn fan_out(self: &Arc<Self>, map: &str, op: MultiOp) -> Result<u64, MapError> {
        self.check_running(map)?;
        let name = match op {
            MultiOp::Count => "len",
            MultiOp::Clear => "clear",
        };
        let deadline = Instant::now() + self.settings.operation_timeout;
        let mut remaining: BTreeSet<u32> = (0..self.settings.partition_count).collect();
        let mut total = 0u64;
        let mut backoff = BACKOFF_MIN;
        let mut last_error = String::from("none");
        loop {
            let table = self.table();
            let mut by_owner: BTreeMap<MemberId, Vec<u32>> = BTreeMap::new();
            for p in &remaining {
                match table.owner(*p) {
                    Some(owner) => by_owner.entry(owner.clone()).or_default().push(*p),
                    None => last_error = "some partitions have no owner yet".into(),
                }
            }
            let mut calls = JoinSet::new();
            for (owner, partitions) in by_owner {
                let node = self.clone();
                let map = map.to_string();
                let epoch = table.epoch;
                calls.spawn(async move {
                    if owner == node.local {
                        return (owner, Attempt::Reply(node.owner_multi(&map, partitions, op, epoch).await));
                    }
                    let msg = Node::encode(&Msg::Multi { epoch, map, partitions, op });
                    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    let attempt = node.remote(&owner, msg, remaining, op == MultiOp::Count).await;
                    (owner, attempt)
                });
            }
            while let Some(joined) = calls.join_next().await {
                let Ok((owner, attempt)) = joined else { continue };
                match attempt {
                    Attempt::Reply(Reply::Multi { done, not_owner }) => {
                        for (p, n) in done {
                            if remaining.remove(&p) {
                                total += n;
                            }
                        }
                        if !not_owner.is_empty() {
                            last_error = format!("{} partitions moved away from {owner}", not_owner.len());
                        }
                    }
                    Attempt::Reply(Reply::Failed { error }) => {
                        return Err(MapError::Failed { op: name, map: map.to_string(), error });
                    }
                    Attempt::Reply(other) => last_error = format!("{owner} answered {other:?}"),
                    Attempt::Retry(reason) => last_error = reason,
                    Attempt::Lost(reason) => {
                        return Err(MapError::Indeterminate {
                            op: name,
                            map: map.to_string(),
                            owner: owner.to_string(),
                            reason,
                        });
                    }
                }
            }
            if remaining.is_empty() {
                return Ok(total);
            }
            if Instant::now() >= deadline {
                return Err(MapError::Timeout {
                    op: name,
                    map: map.to_string(),
                    after: self.settings.operation_timeout,
                    last_error,
                });
            }
            self.check_running(map)?;
            self.pause(backoff, deadline).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One page of partition `p`'s entries (live ones, in key order) after `after`.
    pub(crate) async fn page(
        self: &Arc<Self>,
        map: &str,
        p: u32,
        after: Option<Vec<u8>>,
        limit: u32,
    ) -> Result<crate::store::Page, MapError> {
        let local = |_: &mut (), epoch| std::future::ready(self.owner_page(p, map, after.clone(), limit, epoch));
        let msg =
            |_: &(), epoch| Some(Msg::Page { epoch, partition: p, map: map.to_string(), after: after.clone(), limit });
        match self.route(map, "entries", p, true, Instant::now(), &mut (), local, msg).await? {
            Reply::Page { entries, next } => Ok((entries, next)),
            other => Err(MapError::Failed {
                op: "entries",
                map: map.to_string(),
                error: format!("unexpected reply {other:?}"),
            }),
        }
    }
}
