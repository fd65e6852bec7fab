//! The partition table: for each partition, its replicas (owner first, then backups in order),
//! stamped with an epoch that only grows. Only the master writes it; every member holds a copy.

use grapevine_membership::MemberId;
use serde::{Deserialize, Serialize};

use crate::assign::Row;

/// A version of the partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    /// Grows by at least one on every change. Operations carry the caller's epoch.
    pub epoch: u64,
    /// The master that published this table.
    pub master: Option<MemberId>,
    /// `rows[p]`: the replicas of partition `p`, owner first.
    pub rows: Vec<Row>,
}

/// A member's role for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Index 0.
    Owner,
    /// Index 1.. (1 is the first backup).
    Backup(usize),
    /// Not a replica.
    None,
}

impl PartitionTable {
    /// The table before any master published one: epoch 0, no owners.
    pub fn empty(partition_count: u32) -> Self {
        PartitionTable { epoch: 0, master: None, rows: vec![Vec::new(); partition_count as usize] }
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.rows.len() as u32
    }

    /// The owner of partition `p`, if any.
    pub fn owner(&self, p: u32) -> Option<&MemberId> {
        self.rows.get(p as usize).and_then(|row| row.first())
    }

    /// The replicas of partition `p`, owner first.
    pub fn row(&self, p: u32) -> &[MemberId] {
        self.rows.get(p as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `member`'s role for partition `p`.
    pub fn role(&self, p: u32, member: &MemberId) -> Role {
        match self.row(p).iter().position(|m| m == member) {
            Some(0) => Role::Owner,
            Some(i) => Role::Backup(i),
            None => Role::None,
        }
    }

    /// The replica index of `member` for partition `p`.
    pub fn index_of(&self, p: u32, member: &MemberId) -> Option<usize> {
        self.row(p).iter().position(|m| m == member)
    }

    /// Partitions owned by `member`.
    pub fn owned_by<'a>(&'a self, member: &'a MemberId) -> impl Iterator<Item = u32> + 'a {
        self.rows.iter().enumerate().filter(move |(_, row)| row.first() == Some(member)).map(|(p, _)| p as u32)
    }

    /// True when `member` holds a replica of any partition.
    pub fn holds_any(&self, member: &MemberId) -> bool {
        self.rows.iter().any(|row| row.contains(member))
    }

    /// Checks the invariants a table must keep. Cheap; runs in release builds.
    pub fn assert_valid(&self) {
        for (p, row) in self.rows.iter().enumerate() {
            for (i, m) in row.iter().enumerate() {
                assert!(!row[..i].contains(m), "partition {p}: member {m} appears twice in {row:?}");
            }
        }
    }
}
