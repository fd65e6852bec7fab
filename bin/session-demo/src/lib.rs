//! The `session-demo` example service ([`app`]), and its load-balanced failover drill
//! ([`drill`], run by the `session-drill` binary and by `tests/drill.rs`) with the process
//! helpers it shares with the process tests ([`harness`]).

pub mod app;
pub mod drill;
pub mod harness;
