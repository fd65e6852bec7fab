//! A [`tower-sessions`](tower_sessions) store on a grapevine distributed map: sessions live in
//! the cluster, not on one member, so a load balancer may send each request of a user to any
//! member, and a member can crash, restart or be upgraded without logging anyone out.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use grapevine::Cluster;
//! use grapevine_sessions::GrapevineStore;
//! use tower_sessions::{Expiry, SessionManagerLayer};
//!
//! let cluster = Cluster::builder().cluster_name("web").start().await?;
//! let store = GrapevineStore::new(&cluster, GrapevineStore::DEFAULT_MAP)?;
//! let sessions = SessionManagerLayer::new(store)
//!     .with_expiry(Expiry::OnInactivity(time::Duration::minutes(30)));
//! // axum::Router::new().route(...).layer(sessions)
//! # Ok(()) }
//! ```
//!
//! # How records are stored
//!
//! * **Key**: the session id as tower-sessions prints it (22 URL-safe base64 characters). The
//!   map is a `DistributedMap<String, Vec<u8>>`.
//! * **Value**: the whole [`Record`] (id, data, expiry date) encoded as MessagePack with field
//!   names (`rmp_serde::to_vec_named`). A record's data holds `serde_json::Value`s, which need a
//!   self-describing encoding (the map's own codec, bincode, cannot decode them).
//! * **Expiry**: every write sets the entry's **time to live** to the time left until the
//!   record's `expiry_date`; a record whose date has passed is removed instead of written, and
//!   [`load`](SessionStore::load) also ignores records whose date has passed (members' clocks
//!   may differ slightly). Why a time to live rather than a maximum idle time: tower-sessions
//!   computes the absolute expiry itself (`OnInactivity` moves it on every save, `AtDateTime`
//!   fixes it, `OnSessionEnd` gives two weeks), and a time to live counts from the replicated
//!   update time, so owner and backups expire the entry at the same moment; a maximum idle time
//!   is restarted by reads and restarts at a fail-over, so it would keep sessions alive past
//!   their date. The map's own `max_idle_seconds` (and `ttl_seconds`) still apply where the store
//!   sets nothing: keep `max_idle_seconds` above the application's session lifetime, as a
//!   safety net for entries whose removal was never triggered.
//! * **Backups**: the map's `backup_count` and `async_backup_count` come from the member's
//!   configuration (`[maps.sessions]`, or `[maps.default]`), applied by each partition's owner:
//!   keep them the same on every member. With `backup_count = 1` (the default) a session
//!   survives the crash of any one member.
//!
//! # Rules
//!
//! * [`create`](SessionStore::create) never overwrites a session: it writes with put-if-absent
//!   (one write, with the record's time to live) and, when the id is taken, draws a new id and
//!   tries again (at most [`GrapevineStore::CREATE_ATTEMPTS`] times).
//! * **Last write wins.** [`save`](SessionStore::save) replaces the whole record in one write on
//!   the partition's owner, which applies writes to a key one at a time. Two members saving one
//!   session at once never produce a mixture of the two records: the one the owner applies last
//!   is kept, whole, and the other's changes are lost. tower-sessions saves the record it loaded
//!   at the start of the request, so two concurrent requests of one user that both change the
//!   session keep only one change. Applications that need concurrent updates of one value to
//!   add up (a counter hit by parallel requests) keep that value in a map of its own and update
//!   it with `DistributedMap::compare_and_set`.
//! * A write whose outcome the cluster reports as unknown (its owner died before answering) is
//!   repeated, at most [`GrapevineStore::INDETERMINATE_RETRIES`] times: writing a whole record
//!   again is idempotent, and a repeated put-if-absent recognises its own record.
//! * A stored value that does not decode as a record (another program wrote the map, a record
//!   of an incompatible version) is a [`session_store::Error::Decode`] for the request that
//!   loads it, never a panic; the entry is left in place.

use std::time::Duration;

use async_trait::async_trait;
use grapevine::{Cluster, DistributedMap, Expiry, MapConfig, MapError};
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, SessionStore};
use tracing::{info, warn};

/// Why a store operation failed. Converts into tower-sessions' [`session_store::Error`]:
/// [`StoreError::Encode`] into `Encode`, [`StoreError::Decode`] into `Decode`, the others into
/// `Backend`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The map operation failed (timed out, unknown outcome, member shutting down, ...).
    #[error(transparent)]
    Map(#[from] MapError),
    /// A record could not be encoded.
    #[error("map {map:?}: cannot encode a session record: {reason}")]
    Encode {
        /// The map.
        map: String,
        /// What failed.
        reason: String,
    },
    /// A stored value is not a session record this store can read.
    #[error("map {map:?}: a stored session record does not decode: {reason}")]
    Decode {
        /// The map.
        map: String,
        /// What failed.
        reason: String,
    },
    /// Every new id drawn was already taken.
    #[error("map {map:?}: no unused session id found in {attempts} attempts")]
    IdsExhausted {
        /// The map.
        map: String,
        /// Ids tried.
        attempts: u32,
    },
}

impl From<StoreError> for session_store::Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Encode { .. } => session_store::Error::Encode(error.to_string()),
            StoreError::Decode { .. } | StoreError::Map(MapError::Codec { .. }) => {
                session_store::Error::Decode(error.to_string())
            }
            other => session_store::Error::Backend(other.to_string()),
        }
    }
}

/// A tower-sessions [`SessionStore`] on a grapevine distributed map. Cheap to clone; see the
/// crate documentation for how records are stored and the rules of concurrent writes.
#[derive(Debug, Clone)]
pub struct GrapevineStore {
    map: DistributedMap<String, Vec<u8>>,
    config: MapConfig,
}

impl GrapevineStore {
    /// The map name of the examples and of `session-demo`.
    pub const DEFAULT_MAP: &'static str = "sessions";

    /// How many ids [`create`](SessionStore::create) tries before it gives up. Ids are 128
    /// random bits: a second attempt is already astronomically rare.
    pub const CREATE_ATTEMPTS: u32 = 8;

    /// How many times a write with an unknown outcome is repeated.
    pub const INDETERMINATE_RETRIES: u32 = 2;

    /// A store on the map `map` of `cluster`. Its backup counts and default expiry come from the
    /// member's configuration (`[maps.<map>]`, else `[maps.default]`); they are logged, with a
    /// warning when the map has no backup (a crashed member's sessions are then lost).
    pub fn new(cluster: &Cluster, map: &str) -> Result<GrapevineStore, StoreError> {
        let config = cluster.config().map_settings().map(map);
        let store = GrapevineStore { map: cluster.map(map)?, config };
        let c = &store.config;
        info!(
            map,
            backup_count = c.backup_count,
            async_backup_count = c.async_backup_count,
            ttl_seconds = c.ttl_seconds,
            max_idle_seconds = c.max_idle_seconds,
            "session store ready"
        );
        if c.backup_count == 0 && c.async_backup_count == 0 {
            warn!(map, "the session map has no backup: the sessions held by a member that crashes are lost");
        }
        Ok(store)
    }

    /// The map's name.
    pub fn map_name(&self) -> &str {
        self.map.name()
    }

    /// The map's settings on this member (backup counts, default expiry).
    pub fn map_config(&self) -> &MapConfig {
        &self.config
    }

    fn encode(&self, record: &Record) -> Result<Vec<u8>, StoreError> {
        rmp_serde::to_vec_named(record)
            .map_err(|e| StoreError::Encode { map: self.map.name().to_string(), reason: e.to_string() })
    }

    fn decode(&self, id: &Id, bytes: &[u8]) -> Result<Record, StoreError> {
        let decode_error = |reason: String| {
            warn!(map = self.map.name(), %reason, "a stored session record does not decode");
            StoreError::Decode { map: self.map.name().to_string(), reason }
        };
        let record: Record = rmp_serde::from_slice(bytes).map_err(|e| decode_error(e.to_string()))?;
        if record.id != *id {
            return Err(decode_error("the record stored under this id holds another id".to_string()));
        }
        Ok(record)
    }

    /// Runs a write, repeating it while its outcome is unknown.
    async fn write<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, MapError>>,
    {
        let mut retries = 0;
        loop {
            match op().await {
                Err(MapError::Indeterminate { reason, .. }) if retries < Self::INDETERMINATE_RETRIES => {
                    retries += 1;
                    warn!(map = self.map.name(), %reason, "a session write has an unknown outcome; writing it again");
                }
                outcome => return Ok(outcome?),
            }
        }
    }

    /// Writes the whole record with its time to live, or removes it when its date has passed.
    async fn put_record(&self, key: &String, record: &Record, bytes: &[u8]) -> Result<(), StoreError> {
        let bytes = bytes.to_vec();
        match time_left(record.expiry_date) {
            Some(ttl) => self.write(|| self.map.put_with(key, &bytes, Expiry::ttl(ttl))).await.map(drop),
            None => self.write(|| self.map.remove(key)).await.map(drop),
        }
    }
}

/// The time left until `expiry_date`, rounded up to a millisecond; `None` when it has passed.
fn time_left(expiry_date: OffsetDateTime) -> Option<Duration> {
    let left = expiry_date - OffsetDateTime::now_utc();
    if !left.is_positive() {
        return None;
    }
    let left = Duration::try_from(left).unwrap_or(Duration::MAX);
    Some(left.max(Duration::from_millis(1)))
}

fn key_of(id: &Id) -> String {
    id.to_string()
}

#[async_trait]
impl SessionStore for GrapevineStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        for _ in 0..Self::CREATE_ATTEMPTS {
            let key = key_of(&record.id);
            let bytes = self.encode(record)?;
            // A record created already expired is not stored at all.
            let Some(ttl) = time_left(record.expiry_date) else { return Ok(()) };
            let existing = self.write(|| self.map.put_if_absent_with(&key, &bytes, Expiry::ttl(ttl))).await?;
            match existing {
                // Absent, or present with exactly our bytes: a repeated attempt found its own write.
                None => return Ok(()),
                Some(existing) if existing == bytes => return Ok(()),
                Some(_) => {
                    warn!(map = self.map.name(), "a new session id is taken; drawing another");
                    record.id = Id::default();
                }
            }
        }
        Err(StoreError::IdsExhausted { map: self.map.name().to_string(), attempts: Self::CREATE_ATTEMPTS }.into())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let bytes = self.encode(record)?;
        Ok(self.put_record(&key_of(&record.id), record, &bytes).await?)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let Some(bytes) = self.map.get(&key_of(id)).await.map_err(StoreError::from)? else {
            return Ok(None);
        };
        let record = self.decode(id, &bytes)?;
        Ok((record.expiry_date > OffsetDateTime::now_utc()).then_some(record))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let key = key_of(id);
        Ok(self.write(|| self.map.remove(&key)).await.map(drop)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_rounds_up_and_is_none_once_passed() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(time_left(now - time::Duration::seconds(1)), None);
        assert_eq!(time_left(now), None);
        let left = time_left(now + time::Duration::minutes(30)).unwrap();
        assert!(left > Duration::from_secs(29 * 60) && left <= Duration::from_secs(30 * 60), "{left:?}");
        assert_eq!(
            time_left(now + time::Duration::microseconds(1500)).map(|d| d >= Duration::from_millis(1)),
            Some(true)
        );
        assert!(time_left(OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT)).is_some());
    }

    #[test]
    fn store_errors_keep_their_kind_in_tower_sessions() {
        let decode = StoreError::Decode { map: "s".into(), reason: "bad".into() };
        assert!(matches!(session_store::Error::from(decode), session_store::Error::Decode(m) if m.contains("bad")));
        let codec = StoreError::Map(MapError::Codec { map: "s".into(), message: "not bytes".into() });
        assert!(matches!(session_store::Error::from(codec), session_store::Error::Decode(_)));
        let timeout = StoreError::Map(MapError::ShuttingDown { map: "s".into() });
        assert!(matches!(session_store::Error::from(timeout), session_store::Error::Backend(_)));
    }
}
