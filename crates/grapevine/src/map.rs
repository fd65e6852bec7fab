//! `DistributedMap<K, V>`: the typed face of the partitioned map. Keys and values are any serde
//! types, encoded with the data plane's codec; a key's encoding decides its partition, so every
//! member must use the same key type for a map.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use grapevine_map::{EntryEventKind, Expiry, MapError, MapService, RawEntries, RawEntryEvent};
use grapevine_net::codec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

/// Marks the key and value types without owning any (so the map is `Send` and `Sync` whatever
/// `K` and `V` are).
type Types<K, V> = PhantomData<fn(K, V) -> (K, V)>;

/// A distributed map from `K` to `V`. Cheap to clone.
pub struct DistributedMap<K, V> {
    name: Arc<str>,
    service: Arc<MapService>,
    _types: Types<K, V>,
}

impl<K, V> Clone for DistributedMap<K, V> {
    fn clone(&self) -> Self {
        DistributedMap { name: self.name.clone(), service: self.service.clone(), _types: PhantomData }
    }
}

impl<K, V> fmt::Debug for DistributedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistributedMap").field("name", &self.name).finish()
    }
}

/// A change to an entry, delivered to listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryEvent<K, V> {
    /// What happened.
    pub kind: EntryEventKind,
    /// The key.
    pub key: K,
    /// The new value (added, updated).
    pub value: Option<V>,
    /// The previous value (updated, removed, expired).
    pub old_value: Option<V>,
}

impl<K, V> DistributedMap<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    pub(crate) fn new(name: &str, service: Arc<MapService>) -> Result<Self, MapError> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(MapError::Invalid(format!("invalid map name {name:?}: use 1 to 255 printable characters")));
        }
        if name.starts_with(grapevine_map::RELIABLE_TOPIC_MAP_PREFIX) {
            return Err(MapError::Invalid(format!(
                "invalid map name {name:?}: names starting with {:?} hold reliable topics; use Cluster::reliable_topic",
                grapevine_map::RELIABLE_TOPIC_MAP_PREFIX
            )));
        }
        Ok(DistributedMap { name: name.into(), service, _types: PhantomData })
    }

    /// The map's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn encode<T: Serialize>(&self, what: &str, value: &T) -> Result<Vec<u8>, MapError> {
        codec::encode(value).map_err(|e| MapError::Codec {
            map: self.name.to_string(),
            message: format!("cannot encode the {what}: {e}"),
        })
    }

    fn decode<T: DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> Result<T, MapError> {
        codec::decode(bytes).map_err(|e| MapError::Codec {
            map: self.name.to_string(),
            message: format!(
                "a stored {what} does not decode as {}: {e} (is the map used with another type elsewhere?)",
                std::any::type_name::<T>()
            ),
        })
    }

    fn decode_opt<T: DeserializeOwned>(&self, what: &str, bytes: Option<Vec<u8>>) -> Result<Option<T>, MapError> {
        bytes.map(|b| self.decode(what, &b)).transpose()
    }

    /// The value of `key`, if present and not expired.
    pub async fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        let bytes = self.service.get(&self.name, self.encode("key", key)?).await?;
        self.decode_opt("value", bytes)
    }

    /// True when `key` is present and not expired.
    pub async fn contains_key(&self, key: &K) -> Result<bool, MapError> {
        self.service.contains_key(&self.name, self.encode("key", key)?).await
    }

    /// Sets `key` to `value` with the map's default expiry; returns the previous value.
    pub async fn put(&self, key: &K, value: &V) -> Result<Option<V>, MapError> {
        let old = self.service.put(&self.name, self.encode("key", key)?, self.encode("value", value)?, None).await?;
        self.decode_opt("value", old)
    }

    /// Sets `key` to `value` with its own expiry (fields left `None` use the map's defaults);
    /// returns the previous value.
    pub async fn put_with(&self, key: &K, value: &V, expiry: Expiry) -> Result<Option<V>, MapError> {
        let old =
            self.service.put(&self.name, self.encode("key", key)?, self.encode("value", value)?, Some(expiry)).await?;
        self.decode_opt("value", old)
    }

    /// Sets `key` only if it is absent; returns the existing value when present (nothing changes then).
    pub async fn put_if_absent(&self, key: &K, value: &V) -> Result<Option<V>, MapError> {
        let old = self
            .service
            .put_if_absent(&self.name, self.encode("key", key)?, self.encode("value", value)?, None)
            .await?;
        self.decode_opt("value", old)
    }

    /// Like [`DistributedMap::put_if_absent`], with the entry's expiry (only used when the key was
    /// absent and the entry is written).
    pub async fn put_if_absent_with(&self, key: &K, value: &V, expiry: Expiry) -> Result<Option<V>, MapError> {
        let old = self
            .service
            .put_if_absent(&self.name, self.encode("key", key)?, self.encode("value", value)?, Some(expiry))
            .await?;
        self.decode_opt("value", old)
    }

    /// Sets `key` only if it is present; returns the previous value (`None`: nothing changed).
    pub async fn replace(&self, key: &K, value: &V) -> Result<Option<V>, MapError> {
        let old = self.service.replace(&self.name, self.encode("key", key)?, self.encode("value", value)?).await?;
        self.decode_opt("value", old)
    }

    /// Sets `key` to `new` if its current value is `expected` (`None`: absent). `new = None`
    /// removes it. Returns whether the value was changed.
    pub async fn compare_and_set(&self, key: &K, expected: Option<&V>, new: Option<&V>) -> Result<bool, MapError> {
        let expected = expected.map(|v| self.encode("value", v)).transpose()?;
        let new = new.map(|v| self.encode("value", v)).transpose()?;
        self.service.compare_and_set(&self.name, self.encode("key", key)?, expected, new).await
    }

    /// Removes `key`; returns its value.
    pub async fn remove(&self, key: &K) -> Result<Option<V>, MapError> {
        let old = self.service.remove(&self.name, self.encode("key", key)?).await?;
        self.decode_opt("value", old)
    }

    /// The number of entries in the whole cluster (expired ones excluded).
    pub async fn len(&self) -> Result<u64, MapError> {
        self.service.len(&self.name).await
    }

    /// True when the map has no entry anywhere.
    pub async fn is_empty(&self) -> Result<bool, MapError> {
        Ok(self.len().await? == 0)
    }

    /// Removes every entry; returns how many were removed.
    pub async fn clear(&self) -> Result<u64, MapError> {
        self.service.clear(&self.name).await
    }

    /// Streams the entries, a page at a time (weakly consistent: writes made during the walk may
    /// or may not be seen; no entry is seen twice).
    pub fn entries(&self) -> Entries<K, V> {
        Entries { map: self.clone(), raw: self.service.entries(&self.name), buffer: Vec::new().into_iter() }
    }

    /// Listens to entry events (added, updated, removed, expired) from every member, from now on.
    /// Delivery is best effort: events in flight when a member fails may be lost.
    pub async fn listen(&self) -> EntryListener<K, V> {
        EntryListener { map: self.clone(), rx: self.service.subscribe(&self.name).await }
    }
}

/// A walk over a map's entries; see [`DistributedMap::entries`].
pub struct Entries<K, V> {
    map: DistributedMap<K, V>,
    raw: RawEntries,
    buffer: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
}

impl<K, V> fmt::Debug for Entries<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entries").field("map", &self.map.name).finish()
    }
}

impl<K, V> Entries<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// The next entry; `None` at the end.
    pub async fn next(&mut self) -> Option<Result<(K, V), MapError>> {
        loop {
            if let Some((k, v)) = self.buffer.next() {
                let entry = self.map.decode("key", &k).and_then(|k| Ok((k, self.map.decode("value", &v)?)));
                return Some(entry);
            }
            match self.raw.next_page().await {
                Ok(Some(page)) => self.buffer = page.into_iter(),
                Ok(None) => return None,
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// Every remaining entry.
    pub async fn collect(mut self) -> Result<Vec<(K, V)>, MapError> {
        let mut out = Vec::new();
        while let Some(entry) = self.next().await {
            out.push(entry?);
        }
        Ok(out)
    }
}

/// Receives entry events; see [`DistributedMap::listen`].
pub struct EntryListener<K, V> {
    map: DistributedMap<K, V>,
    rx: broadcast::Receiver<RawEntryEvent>,
}

impl<K, V> fmt::Debug for EntryListener<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryListener").field("map", &self.map.name).finish()
    }
}

/// Why a listener missed events or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// The listener fell behind and `n` events were dropped.
    #[error("the listener fell behind; {0} events were dropped")]
    Lagged(u64),
    /// The member shut down.
    #[error("the member shut down")]
    Closed,
    /// An event did not decode as the map's types.
    #[error("{0}")]
    Codec(String),
}

impl<K, V> EntryListener<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    /// The next event.
    pub async fn recv(&mut self) -> Result<EntryEvent<K, V>, ListenError> {
        let raw = match self.rx.recv().await {
            Ok(raw) => raw,
            Err(broadcast::error::RecvError::Lagged(n)) => return Err(ListenError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => return Err(ListenError::Closed),
        };
        let codec_error = |e: MapError| ListenError::Codec(e.to_string());
        Ok(EntryEvent {
            kind: raw.kind,
            key: self.map.decode("key", &raw.key).map_err(codec_error)?,
            value: self.map.decode_opt("value", raw.value).map_err(codec_error)?,
            old_value: self.map.decode_opt("value", raw.old_value).map_err(codec_error)?,
        })
    }
}
