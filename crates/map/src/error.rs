//! Errors of map operations. Each says what happened and what the caller can do.

use std::time::Duration;

/// Why a map operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MapError {
    /// The operation did not complete within the operation timeout. `last_error` says what kept
    /// failing (no partition table yet, owner unreachable, partition migrating, ...).
    #[error(
        "map {map:?}: {op} timed out after {after:?} (last problem: {last_error}); check that the cluster has an active master and reachable members"
    )]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The map.
        map: String,
        /// How long it tried.
        after: Duration,
        /// The last reason it had to retry.
        last_error: String,
    },
    /// The request reached the owner but its answer was lost: the write may or may not have been
    /// applied. Read the key to find out, or repeat the write if it is idempotent.
    #[error(
        "map {map:?}: {op} on owner {owner} has an unknown outcome ({reason}); the write may or may not have been applied"
    )]
    Indeterminate {
        /// The operation.
        op: &'static str,
        /// The map.
        map: String,
        /// The owner asked.
        owner: String,
        /// What was lost.
        reason: String,
    },
    /// The owner executed the operation but reported a failure (e.g. a synchronous backup did not
    /// confirm a write).
    #[error("map {map:?}: {op} failed: {error}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// The map.
        map: String,
        /// The owner's explanation.
        error: String,
    },
    /// A key or value could not be encoded or decoded as the map's types.
    #[error("map {map:?}: {message}")]
    Codec {
        /// The map.
        map: String,
        /// What failed.
        message: String,
    },
    /// The operation does not apply to the entry's current value (a counter operation on a value
    /// that is not an integer, or whose result would overflow). `reason` uses Redis's wording.
    #[error("map {map:?}: {op} refused: {reason}")]
    Rejected {
        /// The operation.
        op: &'static str,
        /// The map.
        map: String,
        /// Why.
        reason: String,
    },
    /// An invalid argument (map name, page size...).
    #[error("{0}")]
    Invalid(String),
    /// Split-brain protection: this member sees fewer active members than the map's
    /// `min_cluster_size`, so it refuses every operation on the map at once (it may be on the
    /// minority side of a network partition, whose writes a merge could overrule).
    #[error(
        "map {map:?} is protected against split brain: it needs at least {min_cluster_size} active members \
         (min_cluster_size) and this member sees {current}, so its operations are refused; this member may be cut \
         off from the rest of the cluster: retry once the network heals or more members join (a side with enough \
         members keeps serving), or lower the map's min_cluster_size"
    )]
    BelowMinClusterSize {
        /// The map.
        map: String,
        /// The map's `min_cluster_size`.
        min_cluster_size: u32,
        /// Active, non-excluded members this member sees (itself included).
        current: u32,
    },
    /// This member is shutting down.
    #[error("map {map:?}: this member is shutting down")]
    ShuttingDown {
        /// The map.
        map: String,
    },
}
