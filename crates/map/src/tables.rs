//! How a member holds and adopts the partition table: applying a table (taking over, handing over
//! or dropping partitions), deciding on tables from the master
//! ([`crate::lineage::follower_applies`]), fetching tables in the background without flooding
//! anyone, and the table's health for `/health`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::codec;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::lineage::{self, Noted};
use crate::messages::{Msg, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::record::now_ms;
use crate::table::{PartitionTable, Role, TableId};
use crate::takeover::TakeOver;

/// Gossip key (`x:` prefixed by membership) carrying a member's table id: `"<epoch> <publisher>"`,
/// the publisher being the master that committed it (`-` for none).
pub(crate) const EPOCH_KEY: &str = "epoch";

/// How many tables a member remembers seeing, and refusing ([`Noted`]).
pub(crate) const SEEN_TABLES_MAX: usize = 16;

/// How long a table request may take.
const TABLE_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The gossip value describing a table.
pub(crate) fn table_gossip_value(table: &PartitionTable) -> String {
    let publisher = table.master.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_string());
    format!("{} {publisher}", table.epoch)
}

/// Parses a member id as `MemberId`'s `Display` writes it: `<node id>@<generation>`.
fn parse_member(text: &str) -> Option<MemberId> {
    let (node_id, generation) = text.rsplit_once('@')?;
    if node_id.is_empty() || node_id.len() > 1024 {
        return None;
    }
    Some(MemberId::new(node_id, generation.parse().ok()?))
}

/// Parses a gossip value written by [`table_gossip_value`]; `None` for anything malformed.
pub(crate) fn parse_gossip_value(value: &str) -> Option<TableId> {
    let (epoch, publisher) = value.split_once(' ')?;
    let epoch = epoch.parse().ok()?;
    let publisher = if publisher == "-" { None } else { Some(parse_member(publisher)?) };
    Some(TableId { epoch, publisher })
}

/// A member's table as advertised in gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdvertisedTable {
    pub(crate) member: MemberId,
    pub(crate) table: TableId,
}

/// A cached plan: the active members and the table rows it was computed for, and the planned rows.
type PlanCacheEntry = (Vec<MemberId>, Vec<crate::assign::Row>, Arc<Vec<crate::assign::Row>>);

/// The table state of one member.
#[derive(Debug)]
pub(crate) struct Tables {
    pub(crate) tx: watch::Sender<Arc<PartitionTable>>,
    /// `tx`'s id for [`grapevine_membership::latest::with_latest`].
    tx_id: u64,
    /// Serializes table application (pushes, fetches and the master's commits can race).
    apply_lock: Mutex<()>,
    /// The last balanced plan computed: planning is the master's most expensive step and the plan
    /// only changes when the table or the members do.
    plan_cache: Mutex<Option<PlanCacheEntry>>,
    /// Members to fetch the table from in the background, coalesced (see [`Node::want_table`]).
    wanted: Mutex<HashSet<MemberId>>,
    wanted_wakeup: Notify,
    /// The last master's table this member kept its own over (logged once).
    kept_own: Mutex<Option<TableId>>,
    /// Since when this member, holding the table with this id, has been behind the master's.
    lagging: Mutex<Option<(TableId, Instant)>>,
    pub(crate) fetches: AtomicU64,
    /// The tables applied, with when: where this member's side forked off (split-brain merge).
    log: Mutex<crate::rejoin::TableLog>,
    /// [`Node::undecided_fork`] for a view version and table.
    fork_check: Mutex<Option<(u64, TableId, Option<String>)>>,
    /// Tables received from their own publishers while this member followed another master,
    /// newest last, at most [`SEEN_TABLES_MAX`] ([`Node::note_seen`]).
    seen: Mutex<VecDeque<TableId>>,
    /// Tables of its master this member refused ([`Node::note_refused`]), likewise.
    refused: Mutex<VecDeque<TableId>>,
}

/// Adds `id` to `list` (newest last, at most [`SEEN_TABLES_MAX`]) unless `current`, the table
/// held, descends from it already.
fn note(list: &Mutex<VecDeque<TableId>>, current: &PartitionTable, id: TableId) {
    if current.descends_from(&id) {
        return;
    }
    let mut list = list.lock().unwrap();
    if list.back() == Some(&id) {
        return;
    }
    list.retain(|t| *t != id);
    if list.len() >= SEEN_TABLES_MAX {
        list.pop_front();
    }
    list.push_back(id);
}

impl Tables {
    pub(crate) fn new(partition_count: u32) -> Self {
        Tables {
            tx: watch::channel(Arc::new(PartitionTable::empty(partition_count))).0,
            tx_id: grapevine_membership::latest::channel_id(),
            apply_lock: Mutex::new(()),
            plan_cache: Mutex::new(None),
            wanted: Mutex::new(HashSet::new()),
            wanted_wakeup: Notify::new(),
            kept_own: Mutex::new(None),
            lagging: Mutex::new(None),
            fetches: AtomicU64::new(0),
            log: Mutex::new(crate::rejoin::TableLog::default()),
            fork_check: Mutex::new(None),
            seen: Mutex::new(VecDeque::new()),
            refused: Mutex::new(VecDeque::new()),
        }
    }
}

impl Node {
    pub(crate) fn table(&self) -> Arc<PartitionTable> {
        self.tables.tx.borrow().clone()
    }

    /// Calls `f` with the current table, as [`Node::table`] gives it, from this thread's copy
    /// (see [`grapevine_membership::latest`]): for what every operation reads.
    pub(crate) fn with_table<R>(&self, f: impl FnOnce(&Arc<PartitionTable>) -> R) -> R {
        thread_local! {
            static TABLES: std::cell::RefCell<grapevine_membership::latest::LatestCache<Arc<PartitionTable>>> =
                Default::default();
        }
        grapevine_membership::latest::with_latest(&TABLES, self.tables.tx_id, &self.tables.tx, f)
    }

    /// Waits until no table is being applied (see [`crate::node::PartitionData::applied`]). Must
    /// be called without any partition locked.
    pub(crate) fn await_table_applied(&self) {
        drop(self.tables.apply_lock.lock().unwrap());
    }

    /// Installs `table`, which the caller decided to adopt (a newer table, a fork's winner, or the
    /// master's own commit). Returns false (and changes nothing) for the table already held or an
    /// invalid one. Adjusts every partition whose row changed for this member: takes over (new
    /// term, announced to the backups), hands over, or drops data it no longer replicates.
    pub(crate) fn apply_table(self: &Arc<Self>, table: PartitionTable) -> bool {
        if let Err(reason) = table.validate(self.settings.partition_count) {
            error!(table = %table.id(), %reason, "refusing an invalid partition table");
            return false;
        }
        let _serial = self.tables.apply_lock.lock().unwrap();
        let old = self.table();
        if table.id() == old.id() {
            return false;
        }
        let table = Arc::new(table);
        let now = now_ms();
        let migration_window_ms = self.settings.migration_timeout.as_millis() as u64;
        let mut takeovers = Vec::new();
        // This member's table is not in the new one's lineage: its side of a split lost. What it
        // wrote as owner meanwhile is merged into the winner's cluster (`crate::rejoin`).
        let mut merging = {
            let mut log = self.tables.log.lock().unwrap();
            let lost = !table.term_in_lineage(&old.id());
            let merging =
                lost.then(|| crate::rejoin::Merging::new(log.forked_at(&table), log.base(&table), &old, &table));
            log.push(table.clone(), now);
            merging
        };
        for p in 0..table.partition_count() {
            let (old_row, new_row) = (old.row(p), table.row(p));
            let mut data = self.slot(p).data.lock().unwrap();
            if let Some(merging) = merging.as_mut()
                && old.owner(p) == Some(&self.local)
                && old.term(p) != table.term(p)
            {
                merging.collect(&self.settings, p, &data);
            }
            // A new table: whatever a replica said about the partition is re-examined under it.
            data.fenced = None;
            data.applied = table.id();
            if old_row == new_row && old.term(p) == table.term(p) {
                continue;
            }
            // The row changed: a migration of this partition is over (committed or superseded).
            data.frozen = None;
            data.migration = None;
            data.copy_targets.clear();
            data.unconfirmed = table.role(p, &self.local) == Role::Owner && new_row.len() > 1;
            let copying = now.saturating_sub(data.last_install_ms) < migration_window_ms;
            if let Role::Backup(index) = table.role(p, &self.local)
                && !copying
            {
                // Maps that use fewer replicas than this index get no writes here any more: their
                // copies would go stale (and count as backups in statistics). A later move to a
                // lower index brings a full copy.
                data.maps.retain(|name, _| self.settings.map(name).replicas() > index);
            }
            // Still the owner in the same term, holding every map in it: nothing to start.
            let continuing = old.role(p, &self.local) == Role::Owner
                && old.term(p) == table.term(p)
                && data.maps.values().all(|mp| mp.term == *table.term(p));
            match table.role(p, &self.local) {
                Role::Owner if continuing => {}
                Role::Owner => takeovers.push(self.take_over(p, &mut data, &table, now)),
                Role::None if old_row.contains(&self.local) => {
                    // A migration may be copying the partition to this member while it catches up
                    // on tables (it can apply a table that predates the migration after the copy
                    // arrived): keep recent copies; `drop_stray_data` removes them if the migration
                    // is abandoned.
                    if copying {
                        debug!(partition = p, table = %table.id(), "not a replica, but a copy just arrived: keeping it");
                    } else {
                        if !data.maps.is_empty() {
                            debug!(partition = p, table = %table.id(), "no longer a replica: dropping data");
                        }
                        data.maps.clear();
                    }
                }
                _ => {}
            }
        }
        let id = table.id();
        self.tables.tx.send_replace(table);
        drop(_serial);
        self.slots.iter().for_each(|s| s.drained.notify_waiters());
        self.master_wakeup.notify_one();
        self.confirm_wakeup.notify_one();
        if !takeovers.is_empty() {
            let node = self.clone();
            let table = id.clone();
            self.spawn(async move { node.take_over_partitions(table, takeovers).await });
        }
        if let Some(merging) = merging.filter(|m| !m.is_empty()) {
            self.merges_running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let node = self.clone();
            self.spawn(async move {
                crate::rejoin::push(node.clone(), merging).await;
                node.merges_running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        debug!(table = %id, "partition table applied");
        true
    }

    /// This member became the owner of `p` under `table`: it will start the term `table` gives
    /// it with a view change ([`crate::takeover`]); until then the partition takes no operations.
    fn take_over(&self, p: u32, data: &mut crate::node::PartitionData, table: &PartitionTable, now: u64) -> TakeOver {
        let term = table.term(p).clone();
        data.term = term.clone();
        data.owner_since_ms = now;
        data.starting = true;
        let row = table.row(p);
        let sync_end =
            data.maps.keys().map(|name| self.settings.map(name).durable_replicas()).max().unwrap_or(1).min(row.len());
        // Every other active member is probed too: a table that flapped (members excluded and
        // back) can have dropped from the row the member that still holds the data.
        let view = self.membership.view();
        let mut probed: Vec<MemberId> = row.get(1..).unwrap_or_default().to_vec();
        for member in view.active_members().map(|m| &m.id) {
            if *member != self.local && !probed.contains(member) {
                probed.push(member.clone());
            }
        }
        TakeOver {
            partition: p,
            term,
            replicas: row.get(1..).unwrap_or_default().to_vec(),
            probed,
            must_accept: row.get(1..sync_end).unwrap_or_default().to_vec(),
        }
    }

    /// A replica's table moved partition `p` past this member's term (it answered `Fenced`): stop
    /// serving it until this member holds a table at least that new, and fetch it.
    pub(crate) fn fence_partition(&self, p: u32, theirs: &TableId, from: &MemberId) {
        let ours = self.table();
        if ours.descends_from(theirs) {
            return;
        }
        let mut data = self.slot(p).data.lock().unwrap();
        if data.fenced.is_none() {
            info!(partition = p, ours = %ours.id(), theirs = %theirs, %from, "a replica's table moved the partition on: not serving it until this member catches up");
        }
        data.fenced = Some((theirs.clone(), now_ms()));
        drop(data);
        self.want_table(from);
    }

    /// A table pushed by `from`. Only the master this member follows may change its table, and
    /// only while it answers this member: a master that cannot hear the others (its messages
    /// still arrive) believes them dead and pushes tables that would drop their data. Without a
    /// working round trip the push is ignored; the follow-up loop fetches the master's table
    /// later, which takes a round trip.
    pub(crate) fn on_table_push(self: &Arc<Self>, from: &MemberId, table: PartitionTable) -> Reply {
        let master = self.membership.view().master.clone();
        let answers_within = self.membership.config().gossip_interval * 3;
        if master.as_ref() != Some(from) || table.master.as_ref() != Some(from) {
            debug!(%from, ?master, table = %table.id(), "ignored a table pushed by a member that is not our master");
            self.note_seen(from, &table);
        } else if self.net.silent_for(from).is_some_and(|silent| silent > answers_within) {
            // Not noted as seen: this member cannot reach it (a one-way cut).
            debug!(%from, table = %table.id(), "ignored a table pushed by a master that does not answer this member");
        } else {
            self.offer_table(from, table);
        }
        Reply::TableAck { table: self.table().id() }
    }

    /// Decides on a table published by the master this member follows, and applies it if it is
    /// newer history (see [`lineage::follower_applies`]). Returns whether it was applied.
    pub(crate) fn offer_table(self: &Arc<Self>, from: &MemberId, table: PartitionTable) -> bool {
        if let Err(reason) = table.validate(self.settings.partition_count) {
            warn!(%from, table = %table.id(), %reason, "refusing an invalid partition table");
            return false;
        }
        let view = self.membership.view();
        if table.master.is_none() || table.master != view.master {
            debug!(%from, table = %table.id(), master = ?view.master, "not adopting a table our master did not publish");
            self.note_seen(from, &table);
            return false;
        }
        let current = self.table();
        // Only a member that is leaving gives its replicas up to a table without it; an excluded
        // one waits for the master to settle it (exclusion can flap while reports spread).
        let staying = view.local_member().is_some_and(|m| m.state == grapevine_membership::MemberState::Active);
        let alive = |m: &MemberId| {
            !view.excluded.contains(m)
                && view.member(m).is_some_and(|m| m.state == grapevine_membership::MemberState::Active)
        };
        if let Some(member) = lineage::drops_a_live_member(&current, &table, &self.local, alive) {
            self.note_refused(table.id());
            let mut logged = self.tables.kept_own.lock().unwrap();
            if logged.as_ref() != Some(&table.id()) {
                info!(
                    local = %self.local,
                    theirs = %table.id(),
                    ours = %current.id(),
                    %member,
                    "the master's table drops a member this member still hears: waiting until this member declares \
                     it dead too (the master's gossip may be cut while its messages still arrive)"
                );
                *logged = Some(table.id());
            }
            return false;
        }
        if lineage::follower_applies(&current, &table, &self.local, staying) {
            return self.apply_table(table);
        }
        match lineage::relation(&current, &table) {
            lineage::Relation::Newer => {
                self.note_refused(table.id());
                let mut logged = self.tables.kept_own.lock().unwrap();
                if logged.as_ref() != Some(&table.id()) {
                    warn!(
                        local = %self.local,
                        theirs = %table.id(),
                        ours = %current.id(),
                        "the master's table takes every partition away from this member, which is alive: the master \
                         cannot hear it (or hears nobody); keeping this table until the master has compared both"
                    );
                    *logged = Some(table.id());
                }
                false
            }
            lineage::Relation::Same | lineage::Relation::Older => false,
            lineage::Relation::Forked => {
                let mut logged = self.tables.kept_own.lock().unwrap();
                if logged.as_ref() != Some(&table.id()) {
                    warn!(
                        local = %self.local,
                        theirs = %table.id(),
                        ours = %current.id(),
                        "the master's table is not newer history than this member's (members acted as master \
                         apart: a healed network split, or members started together): keeping this one until the \
                         master has compared both"
                    );
                    *logged = Some(table.id());
                }
                false
            }
        }
    }

    /// Remembers that `from` sent `table`, which it published itself, while this member follows
    /// another master (it ignores the table): `from` could reach this member then. When a split
    /// heals, the master asks for these ([`Node::table_reply`]): a member still holding the table
    /// several sides forked from belongs with the side whose master reached it. (A table applied
    /// needs no note: the member holds it or a successor.)
    fn note_seen(&self, from: &MemberId, table: &PartitionTable) {
        if table.master.as_ref() == Some(from) && table.epoch > 0 {
            note(&self.tables.seen, &self.table(), table.id());
        }
    }

    /// Remembers that this member refused a table its master published, newer history than its
    /// own, because it drops a member this one still hears, or every replica of this one: this
    /// member is on the other side of whatever cut its master sees, and the master that settles
    /// the split must not count it with that table ([`lineage::sides_seen`]).
    fn note_refused(&self, id: TableId) {
        note(&self.tables.refused, &self.table(), id);
    }

    /// The answer to a table request: the table held, and the others seen and refused
    /// ([`Node::note_seen`], [`Node::note_refused`]).
    pub(crate) fn table_reply(&self) -> Reply {
        let table = (*self.table()).clone();
        let Noted { seen, refused, follows } = self.noted(&table.id());
        Reply::Table { table, seen, refused, follows }
    }

    /// The tables other than `current` this member noted: received from other masters, and
    /// refused from its own (what a master weighs when it resolves sides, its own included).
    pub(crate) fn noted(&self, current: &TableId) -> Noted {
        let list = |tables: &Mutex<VecDeque<TableId>>| {
            tables.lock().unwrap().iter().filter(|t| *t != current).cloned().collect::<Vec<TableId>>()
        };
        let follows = self.membership.view().master.clone();
        Noted { seen: list(&self.tables.seen), refused: list(&self.tables.refused), follows }
    }

    /// Asks `from` for its table and offers it (see [`Node::offer_table`]).
    pub(crate) async fn fetch_table(self: &Arc<Self>, from: &MemberId) -> bool {
        match self.request_table(from).await {
            Some((table, _)) => self.offer_table(from, table),
            None => false,
        }
    }

    /// Asks `from` for the table it holds, without applying it, and what it noted besides
    /// ([`Noted`]); `None` when it does not answer or answers with an invalid table.
    pub(crate) async fn request_table(&self, from: &MemberId) -> Option<(PartitionTable, Noted)> {
        if *from == self.local {
            return None;
        }
        self.tables.fetches.fetch_add(1, Ordering::Relaxed);
        let reply = self.net.request(from, MAP_SERVICE, Self::encode(&Msg::TableGet), TABLE_REQUEST_TIMEOUT).await;
        match reply.map(|bytes| codec::decode::<Reply>(&bytes)) {
            Ok(Ok(Reply::Table { table, mut seen, mut refused, follows })) => {
                match table.validate(self.settings.partition_count) {
                    Ok(()) => {
                        seen.truncate(SEEN_TABLES_MAX);
                        refused.truncate(SEEN_TABLES_MAX);
                        Some((table, Noted { seen, refused, follows }))
                    }
                    Err(reason) => {
                        warn!(%from, table = %table.id(), %reason, "a member sent an invalid partition table");
                        None
                    }
                }
            }
            Ok(Ok(other)) => {
                warn!(%from, reply = ?other, "unexpected reply to a table request");
                None
            }
            Ok(Err(error)) => {
                warn!(%from, %error, "undecodable table reply");
                None
            }
            Err(error) => {
                debug!(%from, %error, "table request failed");
                None
            }
        }
    }

    /// Asks for the table of `from` in the background. Requests are coalesced: however many
    /// operations are refused at once (a heal, a fail-over), each member is asked at most once per
    /// round of [`refresh_loop`].
    pub(crate) fn want_table(&self, from: &MemberId) {
        if *from == self.local {
            return;
        }
        if self.tables.wanted.lock().unwrap().insert(from.clone()) {
            self.tables.wanted_wakeup.notify_one();
        }
    }

    /// Fetches the master's table in the background (see [`Node::want_table`]).
    pub(crate) fn want_master_table(&self) {
        self.master_wakeup.notify_one();
        if let Some(master) = self.membership.view().master.clone() {
            self.want_table(&master);
        }
    }

    /// Whether `table` is one this member may serve under: published by the master it follows,
    /// or by a member that is no longer an active member (the previous master died or is leaving;
    /// the new one republishes soon). A table published by another active member comes from
    /// members that acted as master apart (starting together, or a healed network split) and may
    /// be replaced by one that moves the partition, dropping what was written under it.
    pub(crate) fn table_followed(&self, table: &PartitionTable) -> Result<(), String> {
        self.membership.with_view(|view| {
            let active =
                |m: &MemberId| view.member(m).is_some_and(|m| m.state == grapevine_membership::MemberState::Active);
            match (&table.master, &view.master) {
                (Some(publisher), Some(master)) if publisher != master && active(publisher) => Err(format!(
                    "partition table {} was published by {publisher}, not by the master {master}: waiting for the \
                     master's",
                    table.id()
                )),
                _ => Ok(()),
            }
        })
    }

    /// Whether the member's table is current (for `/health`): it has one, and it is the master's
    /// table: it follows the master, no member advertises a newer epoch, and the master holds the
    /// same one (members that acted as master at the same moment can hold different tables of one
    /// epoch until the master republishes). Tables reach members a few milliseconds apart while
    /// partitions migrate, and a member a moment behind still serves (callers retry), so a
    /// difference counts only once it lasted two gossip intervals.
    pub(crate) fn table_status(&self) -> Result<(), String> {
        let table = self.table();
        if table.epoch == 0 {
            return Err("no partition table yet".into());
        }
        let Some(reason) = self.table_lag(&table) else {
            *self.tables.lagging.lock().unwrap() = None;
            return Ok(());
        };
        let grace = self.membership.config().gossip_interval * 2;
        let mut lagging = self.tables.lagging.lock().unwrap();
        let since = match &*lagging {
            Some((id, since)) if *id == table.id() => *since,
            _ => {
                let now = Instant::now();
                *lagging = Some((table.id(), now));
                now
            }
        };
        if since.elapsed() >= grace { Err(reason) } else { Ok(()) }
    }

    /// Lifts fences older than two gossip intervals while this member holds the master's current
    /// table: the table that fenced them did not win (see [`crate::node::PartitionData::fenced`]).
    pub(crate) fn lift_stale_fences(&self) {
        let table = self.table();
        if table.epoch == 0 || self.table_lag(&table).is_some() {
            return;
        }
        let hold_ms = (self.membership.config().gossip_interval * 2).as_millis() as u64;
        let now = now_ms();
        for (p, slot) in self.slots.iter().enumerate() {
            let mut data = slot.data.lock().unwrap();
            if data
                .fenced
                .as_ref()
                .is_some_and(|(fence, since)| now.saturating_sub(*since) >= hold_ms && !table.descends_from(fence))
            {
                debug!(partition = p, fence = ?data.fenced, table = %table.id(), "lifting a fence: this member holds the master's table");
                data.fenced = None;
            }
        }
    }

    /// Why this member must not serve under `table` yet: an active member of its view holds a
    /// table that `table`'s lineage does not contain. Either this member is behind (it fetches the
    /// newer one), or the two come from sides that acted apart and meet again (a healed split or
    /// cut) and the master has not yet decided which side's table wins: whatever this member
    /// accepted under its own could be dropped with it. Cached per view and table, as every
    /// operation asks.
    pub(crate) fn undecided_fork(&self, table: &PartitionTable) -> Option<String> {
        // This thread's copy of the last answer first: the shared one is behind a lock.
        type Memo = Option<(u64, u64, TableId, Option<String>)>;
        thread_local! {
            static MEMO: std::cell::RefCell<Memo> = const { std::cell::RefCell::new(None) };
        }
        let version = self.membership.with_view(|view| view.version);
        let known = MEMO.with(|memo| match &*memo.borrow() {
            Some((tables, v, id, reason)) if *tables == self.tables.tx_id && *v == version && table.has_id(id) => {
                Some(reason.clone())
            }
            _ => None,
        });
        if let Some(reason) = known {
            return reason;
        }
        let view = self.membership.view();
        let reason = self.undecided_fork_in(table, &view);
        MEMO.with(|memo| *memo.borrow_mut() = Some((self.tables.tx_id, view.version, table.id(), reason.clone())));
        reason
    }

    fn undecided_fork_in(&self, table: &PartitionTable, view: &grapevine_membership::ClusterView) -> Option<String> {
        let mut cache = self.tables.fork_check.lock().unwrap();
        if let Some((version, id, reason)) = cache.as_ref()
            && *version == view.version
            && table.has_id(id)
        {
            return reason.clone();
        }
        let active =
            |m: &MemberId| view.member(m).is_some_and(|m| m.state == grapevine_membership::MemberState::Active);
        let reason = self
            .gossip_tables()
            .into_iter()
            .find(|t| t.member != self.local && active(&t.member) && !table.descends_from(&t.table))
            .map(|t| {
                format!(
                    "{} holds partition table {}, which this member's table {} does not descend from: waiting until \
                     the master settles which one holds",
                    t.member,
                    t.table,
                    table.id()
                )
            });
        *cache = Some((view.version, table.id(), reason.clone()));
        reason
    }

    /// Why `table` is not the master's, if it is not.
    fn table_lag(&self, table: &PartitionTable) -> Option<String> {
        if let Err(reason) = self.table_followed(table) {
            return Some(reason);
        }
        let advertised = self.gossip_tables();
        let newest = advertised.iter().map(|t| t.table.epoch).max().unwrap_or(0);
        if newest > table.epoch {
            return Some(format!("partition table {} is behind the cluster's epoch {newest}", table.id()));
        }
        let master = self.membership.view().master.clone();
        if let Some(theirs) = master.and_then(|m| advertised.into_iter().find(|t| t.member == m))
            && theirs.table != table.id()
        {
            return Some(format!(
                "this member holds partition table {}, the master holds {}: waiting for the master's",
                table.id(),
                theirs.table
            ));
        }
        None
    }

    /// The tables members advertise in gossip.
    pub(crate) fn gossip_tables(&self) -> Vec<AdvertisedTable> {
        let view = self.membership.view();
        view.members
            .iter()
            .filter_map(|m| {
                let table = parse_gossip_value(m.ext.get(EPOCH_KEY)?)?;
                Some(AdvertisedTable { member: m.id.clone(), table })
            })
            .collect()
    }

    /// The table epochs members advertise in gossip.
    pub(crate) fn gossip_epochs(&self) -> Vec<(MemberId, u64)> {
        self.gossip_tables().into_iter().map(|t| (t.member, t.table.epoch)).collect()
    }

    /// The balanced table the master migrates toward, for `table` and the `members` that may hold
    /// replicas (sorted, as the view lists them). The same target is kept while the table only
    /// moves toward it ([`crate::assign::keeps_target`]): planning again from each intermediate
    /// table would never settle.
    pub(crate) fn target_rows(&self, table: &PartitionTable, members: &[MemberId]) -> Arc<Vec<crate::assign::Row>> {
        let mut cache = self.tables.plan_cache.lock().unwrap();
        if let Some((cached_members, base, rows)) = cache.as_ref()
            && cached_members == members
            && crate::assign::keeps_target(base, rows, &table.rows)
        {
            return rows.clone();
        }
        let replicas = members.len().min(crate::assign::REPLICAS_MAX);
        let rows = Arc::new(crate::assign::plan(&table.rows, members, replicas));
        *cache = Some((members.to_vec(), table.rows.clone(), rows.clone()));
        rows
    }
}

/// Fetches tables asked for with [`Node::want_table`], each member at most once per round and at
/// most a few rounds a second, so that a burst of refusals (a heal) does not flood anyone.
pub(crate) async fn refresh_loop(node: Arc<Node>) {
    const ROUND: Duration = Duration::from_millis(50);
    loop {
        tokio::select! {
            _ = node.tables.wanted_wakeup.notified() => {},
            _ = node.cancel.cancelled() => return,
        }
        // Let a burst of wishes gather.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let wanted: Vec<MemberId> = node.tables.wanted.lock().unwrap().drain().collect();
        let mut fetches = tokio::task::JoinSet::new();
        for from in wanted {
            let node = node.clone();
            fetches.spawn(async move { node.fetch_table(&from).await });
        }
        while fetches.join_next().await.is_some() {}
        tokio::time::sleep(ROUND).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_values_round_trip_and_garbage_is_refused() {
        let mut table = PartitionTable::empty(1);
        assert_eq!(parse_gossip_value(&table_gossip_value(&table)), Some(TableId::empty()));
        table = table.successor(&MemberId::new("host@x-5701", 17), 4, vec![vec![]]);
        assert_eq!(parse_gossip_value(&table_gossip_value(&table)), Some(table.id()));
        for garbage in ["", "4", "x y", "4 nobody", "4 @5", "-1 a@1", "4 a@b"] {
            assert_eq!(parse_gossip_value(garbage), None, "{garbage:?}");
        }
    }
}
