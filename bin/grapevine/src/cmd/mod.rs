//! The subcommands, one module each. To add one: a module with an `Args` struct and a
//! `run(args) -> Result<(), Failure>`, and a variant in [`Command`].

use clap::Subcommand;

use crate::Failure;

pub mod clusterstats;
pub mod map;
pub mod master;
pub mod start;
pub mod topic;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a cluster member until SIGTERM or SIGINT.
    Start(start::StartArgs),
    /// Print what a running member knows about the cluster (like `showruntimestats -c`).
    Clusterstats(clusterstats::ClusterStatsArgs),
    /// Force a member to become the master (it leads until it leaves).
    Master(master::MasterArgs),
    /// Read and write entries of a distributed map (string keys and values).
    Map(map::MapArgs),
    /// Publish to and subscribe to topics (string messages).
    Topic(topic::TopicArgs),
}

impl Command {
    pub fn run(self) -> Result<(), Failure> {
        match self {
            Command::Start(args) => start::run(args),
            Command::Clusterstats(args) => clusterstats::run(args),
            Command::Master(args) => master::run(args),
            Command::Map(args) => map::run(args),
            Command::Topic(args) => topic::run(args),
        }
    }
}
