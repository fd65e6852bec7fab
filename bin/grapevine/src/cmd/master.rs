//! `grapevine master --handover-to NODE_ID`: force a member to become the master (it leads until it
//! leaves), through any member's admin endpoint.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::Failure;
use crate::client::{AdminClient, DEFAULT_NODE, error_message};

/// The member waits up to 30 s for the hand-over; the client a little longer.
const HANDOVER_CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// Make another member the master.
#[derive(Debug, Args)]
pub struct MasterArgs {
    /// The admin address of any member (`host:port`; `host` means port 5801).
    #[arg(long, value_name = "HOST:ADMIN_PORT", default_value = DEFAULT_NODE)]
    pub node: String,
    /// The node id of the member that should become master (see `grapevine clusterstats`).
    #[arg(long, value_name = "NODE_ID")]
    pub handover_to: String,
}

pub fn run(args: MasterArgs) -> Result<(), Failure> {
    let client = AdminClient::new(&args.node, HANDOVER_CLIENT_TIMEOUT).map_err(Failure::usage)?;
    let reply = client.post("/master/handover", &json!({ "node_id": args.handover_to })).map_err(Failure::error)?;
    if reply.status == 200 {
        let master = reply.body.get("master").and_then(|m| m.as_str()).unwrap_or(&args.handover_to);
        println!("master is now {master}");
        return Ok(());
    }
    let message = error_message(&reply.body);
    Err(Failure::error(format!("hand-over to {:?} failed (HTTP {}): {message}", args.handover_to, reply.status)))
}
