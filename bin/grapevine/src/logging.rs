//! Logging to stderr: text or JSON lines, level from `RUST_LOG`.

use std::io::IsTerminal;

use grapevine::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset. chitchat warns on every gossip round for some conditions
/// (a peer of another cluster, an unreachable seed) that grapevine reports once itself, so its
/// warnings are hidden, except for its UDP transport's `invalid-chitchat-payload` warning: a
/// datagram that is not gossip (a port scan, a misdirected client) is worth seeing.
pub const DEFAULT_FILTER: &str = "info,chitchat=error,chitchat::transport::udp=warn";

/// Installs the global subscriber. An invalid `RUST_LOG` falls back to the default, with a note.
pub fn init(format: LogFormat) {
    let (filter, bad_directive) = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some(format!("ignoring RUST_LOG={directives:?}: {error}"))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    if let Some(note) = bad_directive {
        tracing::warn!("{note}");
    }
}
