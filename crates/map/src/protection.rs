//! Split-brain protection (`min_cluster_size`): a map whose minimum is N refuses every operation
//! on a member that sees fewer than N active, non-excluded members, itself included, so that a
//! minority side of a network partition never acknowledges a write (or serves a read) that the
//! merge after the heal would overrule. The larger side keeps serving.
//!
//! Checked twice: by the caller before it routes an operation (and before each retry), which
//! fails at once with [`MapError::BelowMinClusterSize`]; and by the owner, which answers "retry"
//! to a caller that still counts enough members while the owner does not (their views disagree
//! for a moment, or the owner is the one cut off: the caller's side will promote its partitions
//! away). The decision is [`below_minimum`], pure; the member count comes from the view.

use crate::error::MapError;
use crate::messages::Reply;
use crate::node::Node;

/// The refusal for an operation on `map`, whose `min_cluster_size` is `min`, on a member that
/// counts `current` members; `None` when it may proceed (always when `min` is 0).
pub(crate) fn below_minimum(map: &str, min: u32, current: u32) -> Option<MapError> {
    (current < min).then(|| MapError::BelowMinClusterSize { map: map.to_string(), min_cluster_size: min, current })
}

impl Node {
    /// Active, non-excluded members of this member's view, itself included when it is one.
    pub(crate) fn protection_size(&self) -> u32 {
        let count = self.membership.view().eligible_members().count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// `Err` when `map` has a minimum cluster size this member's view is below.
    pub(crate) fn check_protection(&self, map: &str) -> Result<(), MapError> {
        let min = self.settings.map_ref(map).min_cluster_size;
        if min == 0 {
            return Ok(());
        }
        below_minimum(map, min, self.protection_size()).map_or(Ok(()), Err)
    }

    /// As an owner: "retry" when `map` is below its minimum here (see the module documentation).
    pub(crate) fn protection_retry(&self, map: &str) -> Option<Reply> {
        self.protection_retry_with(map, self.settings.map_ref(map))
    }

    /// [`Node::protection_retry`] with the map's settings at hand.
    pub(crate) fn protection_retry_with(&self, map: &str, config: &crate::config::MapConfig) -> Option<Reply> {
        if config.min_cluster_size == 0 {
            return None;
        }
        below_minimum(map, config.min_cluster_size, self.protection_size())
            .map(|e| Reply::Retry { reason: format!("on the owner {}: {e}", self.local) })
    }

    /// `Ok` unless some map this member knows of (configured, or used here) has a minimum cluster
    /// size its view is below; then why, naming each such map (for `/health`).
    pub(crate) fn protection_status(&self) -> Result<(), String> {
        let mut names: Vec<String> = self.settings.maps.keys().cloned().collect();
        names.extend(self.counters.lock().unwrap().keys().cloned());
        names.sort();
        names.dedup();
        let protected: Vec<(String, u32)> = names
            .into_iter()
            .map(|name| {
                let min = self.settings.map(&name).min_cluster_size;
                (name, min)
            })
            .filter(|(_, min)| *min > 0)
            .collect();
        if protected.is_empty() {
            return Ok(());
        }
        let current = self.protection_size();
        let below: Vec<String> = protected
            .iter()
            .filter(|(_, min)| current < *min)
            .map(|(name, min)| {
                let scope = if name == "default" { " (and every map without a section of its own)" } else { "" };
                format!("map {name:?}{scope} needs {min}")
            })
            .collect();
        if below.is_empty() {
            return Ok(());
        }
        Err(format!(
            "split-brain protection: this member sees {current} active members and {}; their operations are \
             refused until the cluster is large enough again (is this member cut off from the others?)",
            below.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_below_its_minimum_is_refused_with_a_message_naming_map_minimum_and_size() {
        assert!(below_minimum("sessions", 0, 0).is_none(), "0 turns protection off");
        assert!(below_minimum("sessions", 2, 2).is_none());
        assert!(below_minimum("sessions", 2, 3).is_none());
        let err = below_minimum("sessions", 2, 1).expect("below the minimum");
        let text = err.to_string();
        assert!(matches!(err, MapError::BelowMinClusterSize { min_cluster_size: 2, current: 1, .. }));
        for part in ["\"sessions\"", "at least 2", "sees 1", "min_cluster_size", "retry once the network heals"] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }
}
