//! The candidate table: which announced peers are candidates, keyed by their DNS-SD instance.
//!
//! Pure state: the runtime feeds it resolved and removed instances, and publishes
//! [`Candidates::addresses`] whenever an update changes them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use super::records::PeerRecord;

/// The most candidates one member holds. Records beyond it are ignored (and logged) until some
/// disappear: a flood of announcements cannot make a member allocate without a limit.
pub const CANDIDATES_MAX: usize = 1024;

/// The longest instance name kept (a DNS name is at most 255 bytes).
pub const INSTANCE_BYTES_MAX: usize = 255;

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new candidate.
    Added,
    /// A known instance now announces another record (new address, or any other field).
    Changed {
        /// Its gossip address before.
        previous: SocketAddr,
    },
    /// Nothing new.
    Unchanged,
    /// This member's own record.
    Own,
    /// A member of another cluster: not a candidate.
    OtherCluster,
    /// The table is full; the record is ignored.
    Full,
    /// The instance name is longer than a DNS name can be.
    BadInstance,
    /// The instance was removed.
    Removed,
    /// A removal of an instance that was not a candidate.
    Unknown,
}

/// Candidates of one cluster, by instance name.
#[derive(Debug, Clone)]
pub struct Candidates {
    cluster_name: String,
    own_node: (String, u64),
    max: usize,
    by_instance: BTreeMap<String, PeerRecord>,
}

impl Candidates {
    /// An empty table for a member of `cluster_name` with `node_id` and `generation` (its own
    /// record, looped back by multicast, is never a candidate), holding at most `max` entries.
    pub fn new(cluster_name: &str, node_id: &str, generation: u64, max: usize) -> Self {
        assert!(max > 0, "the candidate table must hold at least one entry");
        Candidates {
            cluster_name: cluster_name.to_string(),
            own_node: (node_id.to_string(), generation),
            max,
            by_instance: BTreeMap::new(),
        }
    }

    /// Records that `instance` announces `record`.
    pub fn upsert(&mut self, instance: &str, record: PeerRecord) -> Outcome {
        if instance.len() > INSTANCE_BYTES_MAX {
            return Outcome::BadInstance;
        }
        if (record.node_id.as_str(), record.generation) == (self.own_node.0.as_str(), self.own_node.1) {
            return Outcome::Own;
        }
        if record.cluster_name != self.cluster_name {
            // An instance that switched cluster names (it cannot, but a forged record could) is
            // no candidate any more.
            self.by_instance.remove(instance);
            return Outcome::OtherCluster;
        }
        let full = self.by_instance.len() >= self.max;
        match self.by_instance.get_mut(instance) {
            Some(known) if *known == record => Outcome::Unchanged,
            Some(known) => {
                let previous = known.gossip_addr;
                *known = record;
                Outcome::Changed { previous }
            }
            None if full => Outcome::Full,
            None => {
                self.by_instance.insert(instance.to_string(), record);
                Outcome::Added
            }
        }
    }

    /// Records that `instance` is gone (a goodbye, or its records expired).
    pub fn remove(&mut self, instance: &str) -> Outcome {
        match self.by_instance.remove(instance) {
            Some(_) => Outcome::Removed,
            None => Outcome::Unknown,
        }
    }

    /// The candidate gossip addresses, sorted, without duplicates.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let set: BTreeSet<SocketAddr> = self.by_instance.values().map(|r| r.gossip_addr).collect();
        set.into_iter().collect()
    }

    /// The record of `instance`, if it is a candidate.
    pub fn get(&self, instance: &str) -> Option<&PeerRecord> {
        self.by_instance.get(instance)
    }

    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(cluster: &str, node: &str, generation: u64, addr: &str) -> PeerRecord {
        PeerRecord {
            cluster_name: cluster.into(),
            node_id: node.into(),
            generation,
            gossip_addr: addr.parse().unwrap(),
            data_addr: addr.parse().unwrap(),
            protocol_version: (1, 0),
        }
    }

    #[test]
    fn only_other_members_of_the_same_cluster_are_candidates() {
        let mut table = Candidates::new("demo", "n1", 7, 8);
        assert_eq!(table.upsert("n1-a", record("demo", "n1", 7, "10.0.0.1:5701")), Outcome::Own);
        assert_eq!(table.upsert("n2-a", record("demo", "n2", 1, "10.0.0.2:5701")), Outcome::Added);
        assert_eq!(table.upsert("x-a", record("other", "x", 1, "10.0.0.9:5701")), Outcome::OtherCluster);
        // The same node id in another generation is another member (a restart): a candidate.
        assert_eq!(table.upsert("n1-b", record("demo", "n1", 8, "10.0.0.1:5702")), Outcome::Added);
        assert_eq!(table.addresses(), vec!["10.0.0.1:5702".parse().unwrap(), "10.0.0.2:5701".parse().unwrap()]);
    }

    #[test]
    fn a_changed_address_replaces_the_old_one_and_removal_drops_it() {
        let mut table = Candidates::new("demo", "n1", 7, 8);
        table.upsert("n2-a", record("demo", "n2", 1, "10.0.0.2:5701"));
        assert_eq!(table.upsert("n2-a", record("demo", "n2", 1, "10.0.0.2:5701")), Outcome::Unchanged);
        assert_eq!(
            table.upsert("n2-a", record("demo", "n2", 1, "10.0.1.2:5701")),
            Outcome::Changed { previous: "10.0.0.2:5701".parse().unwrap() }
        );
        assert_eq!(table.addresses(), vec!["10.0.1.2:5701".parse().unwrap()]);
        assert_eq!(table.remove("n2-a"), Outcome::Removed);
        assert_eq!(table.remove("n2-a"), Outcome::Unknown);
        assert!(table.addresses().is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = Candidates::new("demo", "n0", 0, 2);
        assert_eq!(table.upsert("a", record("demo", "a", 1, "10.0.0.1:1")), Outcome::Added);
        assert_eq!(table.upsert("b", record("demo", "b", 1, "10.0.0.2:1")), Outcome::Added);
        assert_eq!(table.upsert("c", record("demo", "c", 1, "10.0.0.3:1")), Outcome::Full);
        // Known instances still update when full; a removal makes room.
        assert!(matches!(table.upsert("b", record("demo", "b", 1, "10.0.0.4:1")), Outcome::Changed { .. }));
        table.remove("a");
        assert_eq!(table.upsert("c", record("demo", "c", 1, "10.0.0.3:1")), Outcome::Added);
        assert_eq!(table.upsert(&"i".repeat(256), record("demo", "d", 1, "10.0.0.5:1")), Outcome::BadInstance);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Upsert { instance: u8, cluster: bool, node: u8, port: u16 },
        Remove { instance: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..20, any::<bool>(), 0u8..4, 1u16..6).prop_map(|(instance, cluster, node, port)| Step::Upsert {
                instance,
                cluster,
                node,
                port
            }),
            (0u8..20).prop_map(|instance| Step::Remove { instance }),
        ]
    }

    proptest! {
        /// Against a model (a plain map of the latest record per instance, same cluster, not
        /// our own, first come first kept when full): the table never exceeds its bound and its
        /// addresses are exactly the model's.
        #[test]
        fn the_table_follows_the_latest_record_of_each_instance(steps in proptest::collection::vec(step(), 0..200)) {
            let max = 8;
            let mut table = Candidates::new("demo", "n0", 0, max);
            let mut model: BTreeMap<String, SocketAddr> = BTreeMap::new();
            for step in steps {
                match step {
                    Step::Upsert { instance, cluster, node, port } => {
                        let name = format!("i{instance}");
                        let addr: SocketAddr = format!("10.0.0.{node}:{port}").parse().unwrap();
                        let rec = record(if cluster { "demo" } else { "other" }, &format!("n{node}"), 0, &addr.to_string());
                        let outcome = table.upsert(&name, rec);
                        if node == 0 {
                            prop_assert_eq!(outcome, Outcome::Own);
                        } else if !cluster {
                            model.remove(&name);
                        } else if model.contains_key(&name) || model.len() < max {
                            model.insert(name, addr);
                        } else {
                            prop_assert_eq!(outcome, Outcome::Full);
                        }
                    }
                    Step::Remove { instance } => {
                        model.remove(&format!("i{instance}"));
                        table.remove(&format!("i{instance}"));
                    }
                }
                prop_assert!(table.len() <= max);
                let want: BTreeSet<SocketAddr> = model.values().copied().collect();
                prop_assert_eq!(table.addresses(), want.into_iter().collect::<Vec<_>>());
            }
        }
    }
}
