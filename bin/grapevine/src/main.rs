//! `grapevine`: the node binary of the grapevine clustering runtime.
//!
//! * `grapevine start --cluster-name NAME [--config FILE] ...` runs a member.
//! * `grapevine clusterstats [--node HOST:ADMIN_PORT] [--json]` prints what a member knows.
//! * `grapevine master --node HOST:ADMIN_PORT --handover-to NODE_ID` moves the master role.
//! * `grapevine map put|get|remove|size MAP [KEY [VALUE]] [--ttl SECONDS] [--node HOST:ADMIN_PORT]`
//!   reads and writes string entries of a distributed map.
//! * `grapevine topic publish|subscribe NAME [MESSAGE] [--reliable] [--node HOST:ADMIN_PORT]`
//!   publishes to and subscribes to topics.
//!
//! Exit status: 0 success; 1 failure (start-up failure such as an exhausted port range, an
//! unreachable member, a refused operation, `map get` of an absent key, a graceful shutdown that
//! ran out of time); 2 bad configuration or command line; 130 / 143 when a second SIGINT /
//! SIGTERM cut a graceful shutdown short.

mod client;
mod cmd;
mod layers;
mod logging;

use std::process::ExitCode;

use clap::Parser;

/// jemalloc (as Redis uses) rather than the system allocator: map entries are many small blocks,
/// which it packs in size classes without a per-block header, and it allocates and frees faster
/// than glibc's malloc under the member's many threads. Measured against glibc and mimalloc in
/// docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// grapevine: a peer-to-peer clustering runtime.
#[derive(Debug, Parser)]
#[command(name = "grapevine", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: cmd::Command,
}

/// How a command failed: the exit status, and a message for stderr (one line, or a few).
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: Option<String>,
}

/// Exit status of failures.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a bad configuration or command line (clap's usage errors use it too).
pub const EXIT_USAGE: u8 = 2;

impl Failure {
    /// A failure of the operation: status 1.
    pub fn error(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_FAILURE, message: Some(message.into()) }
    }

    /// A bad configuration: status 2.
    pub fn config(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_USAGE, message: Some(message.into()) }
    }

    /// A bad command-line value: status 2.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure { code: EXIT_USAGE, message: Some(message.into()) }
    }

    /// Exit with `code`; the reason was logged already.
    pub fn exit(code: u8) -> Failure {
        Failure { code, message: None }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(message) = failure.message {
                eprintln!("grapevine: {message}");
            }
            ExitCode::from(failure.code)
        }
    }
}
