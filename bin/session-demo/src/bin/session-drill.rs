//! `session-drill`: runs the failover drill of `session_demo::drill` and prints its report.
//!
//! ```text
//! cargo build -p session-demo && target/debug/session-drill [--sessions 24] [--pause-ms 50] [--drain-ms 1000]
//! ```
//!
//! Needs `haproxy` (Debian: `apt-get install -y haproxy`) and the `session-demo` binary (by
//! default the one next to this binary). Uses loopback addresses `127.a.b.1-4` and `.100` derived
//! from the process id. Exit status: 0 when every expectation holds, 1 when one does not (the
//! report says which, and the logs' tails are printed), 2 when a tool is missing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use session_demo::drill::{self, DrillOptions};
use session_demo::harness::Haproxy;

/// Runs session-demo instances behind haproxy and checks that no session is lost while one is
/// killed, each is restarted in turn, and one is added and another removed.
#[derive(Debug, Parser)]
#[command(name = "session-drill", version)]
struct Cli {
    /// The session-demo binary. Default: the one next to this binary.
    #[arg(long, value_name = "FILE")]
    demo_bin: Option<PathBuf>,
    /// The haproxy binary. Default: `haproxy` on PATH or in /usr/sbin.
    #[arg(long, value_name = "FILE")]
    haproxy: Option<PathBuf>,
    /// Logs and the haproxy configuration go here (emptied first).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Client sessions in parallel.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=500))]
    sessions: u16,
    /// Each client's pause between two requests, in ms.
    #[arg(long, default_value_t = 50)]
    pause_ms: u64,
    /// The instances' drain period (`session-demo --drain-ms`).
    #[arg(long, default_value_t = 1000)]
    drain_ms: u64,
    /// Traffic time after each step, in ms.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let demo_bin = cli.demo_bin.clone().or_else(|| {
        let exe = std::env::current_exe().ok()?;
        Some(exe.with_file_name("session-demo"))
    });
    let Some(demo_bin) = demo_bin.filter(|p| p.is_file()) else {
        eprintln!(
            "session-drill: no session-demo binary next to this one: build it (`cargo build -p session-demo`) or pass --demo-bin"
        );
        return ExitCode::from(2);
    };
    let Some(haproxy_bin) = cli.haproxy.clone().or_else(Haproxy::find) else {
        eprintln!("session-drill: haproxy not found: install it (`apt-get install -y haproxy`) or pass --haproxy");
        return ExitCode::from(2);
    };
    let work_dir = cli
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("session-drill-{}", std::process::id())));
    let mut options = DrillOptions::new(demo_bin, haproxy_bin, work_dir);
    options.sessions = usize::from(cli.sessions);
    options.pause = Duration::from_millis(cli.pause_ms);
    options.drain = Duration::from_millis(cli.drain_ms);
    options.settle = Duration::from_millis(cli.settle_ms);
    let report = drill::run(options);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!("{report}");
    }
    if report.violations().is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
