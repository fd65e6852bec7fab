//! `grapevine map`: read and write string entries of a distributed map through any member's admin
//! endpoint (`/maps/{map}/...`), for operators and scripts.
//!
//! | command                                 | stdout on success (exit 0)                          |
//! |-----------------------------------------|-----------------------------------------------------|
//! | `map put MAP KEY VALUE [--ttl SECONDS]` | the previous value and a newline; nothing if absent |
//! | `map get MAP KEY`                       | the value and a newline                             |
//! | `map remove MAP KEY`                    | the removed value and a newline; nothing if absent  |
//! | `map size MAP`                          | the number of entries in the cluster                |
//!
//! `get` of an absent key prints one line on stderr and exits 1. An unreachable member or a
//! failed operation (timeout, unknown outcome, a map holding values that are not strings...)
//! prints one line on stderr and exits 1; bad arguments exit 2. Keys and values are UTF-8
//! strings (the map is used as `DistributedMap<String, String>`); a value is printed exactly as
//! stored, followed by one newline.

use std::io::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::Failure;
use crate::client::{AdminClient, DEFAULT_NODE, Method, TextReply, error_message, path_segment};

/// The member retries an operation for up to `partitions.operation_timeout_ms` (30 s by default);
/// the client waits a little longer, so that the member's own message is what the user sees.
const MAP_CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// Read and write entries of a distributed map (string keys and values).
#[derive(Debug, Args)]
pub struct MapArgs {
    /// The admin address of any member (`host:port`; `host` means port 5801).
    #[arg(long, global = true, value_name = "HOST:ADMIN_PORT", default_value = DEFAULT_NODE)]
    pub node: String,
    #[command(subcommand)]
    pub command: MapCommand,
}

#[derive(Debug, Subcommand)]
pub enum MapCommand {
    /// Set KEY to VALUE; print the previous value (nothing when the key was absent).
    Put {
        /// The map name.
        map: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// The value (a UTF-8 string).
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Remove the entry this many seconds after this write (at least 1). Default: the map's
        /// `ttl_seconds` setting.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        ttl: Option<u64>,
    },
    /// Print the value of KEY; exit 1 when it is absent.
    Get {
        /// The map name.
        map: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Remove KEY; print the removed value (nothing when the key was absent).
    Remove {
        /// The map name.
        map: String,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: String,
    },
    /// Print the number of entries of the map in the whole cluster.
    Size {
        /// The map name.
        map: String,
    },
}

pub fn run(args: MapArgs) -> Result<(), Failure> {
    let client = AdminClient::new(&args.node, MAP_CLIENT_TIMEOUT).map_err(Failure::usage)?;
    match args.command {
        MapCommand::Put { map, key, value, ttl } => {
            let path = match ttl {
                Some(ttl) => format!("{}?ttl_seconds={ttl}", entry_path(&map, &key)),
                None => entry_path(&map, &key),
            };
            let body = expect_ok(&client, Method::Put, &path, "put", &map, Some(&value))?;
            print_previous(&client, Method::Put, &path, &body)
        }
        MapCommand::Get { map, key } => {
            let path = entry_path(&map, &key);
            let reply = client.send(Method::Get, &path, None).map_err(Failure::error)?;
            match reply.status {
                200 => print_value(&reply.text),
                404 => {
                    // The member's message, when it is the one of an absent key (not of an unknown route).
                    let message = client
                        .json(Method::Get, &path, &reply)
                        .ok()
                        .map(|body| error_message(&body))
                        .filter(|m| m.contains("not found in map"))
                        .unwrap_or_else(|| format!("key {key:?} not found in map {map:?}"));
                    Err(Failure::error(one_line(&message)))
                }
                _ => Err(failure(&client, Method::Get, &path, "get", &map, &reply)),
            }
        }
        MapCommand::Remove { map, key } => {
            let path = entry_path(&map, &key);
            let body = expect_ok(&client, Method::Delete, &path, "remove", &map, None)?;
            print_previous(&client, Method::Delete, &path, &body)
        }
        MapCommand::Size { map } => {
            let path = format!("/maps/{}/size", path_segment(&map));
            let reply = expect_ok(&client, Method::Get, &path, "size", &map, None)?;
            let body = client.json(Method::Get, &path, &reply).map_err(Failure::error)?;
            let size = body.get("size").and_then(Value::as_u64).ok_or_else(|| {
                Failure::error(format!("{} answered GET {path} without a size: {body}", client.node()))
            })?;
            print_value(&size.to_string())
        }
    }
}

fn entry_path(map: &str, key: &str) -> String {
    format!("/maps/{}/entries/{}", path_segment(map), path_segment(key))
}

/// Sends the request; the reply when it is 200, else the failure.
fn expect_ok(
    client: &AdminClient,
    method: Method,
    path: &str,
    op: &str,
    map: &str,
    body: Option<&str>,
) -> Result<TextReply, Failure> {
    let reply = client.send(method, path, body).map_err(Failure::error)?;
    if reply.status == 200 { Ok(reply) } else { Err(failure(client, method, path, op, map, &reply)) }
}

/// A failed operation: one line with the member's message.
fn failure(client: &AdminClient, method: Method, path: &str, op: &str, map: &str, reply: &TextReply) -> Failure {
    let message = match client.json(method, path, reply) {
        Ok(body) => error_message(&body),
        Err(not_json) => return Failure::error(not_json),
    };
    Failure::error(one_line(&format!("{op} in map {map:?} failed (HTTP {}): {message}", reply.status)))
}

/// `{"previous": "..." | null}`: the value and a newline, or nothing.
fn print_previous(client: &AdminClient, method: Method, path: &str, reply: &TextReply) -> Result<(), Failure> {
    let body = client.json(method, path, reply).map_err(Failure::error)?;
    match body.get("previous") {
        Some(Value::String(previous)) => print_value(previous),
        Some(Value::Null) | None => Ok(()),
        Some(other) => Err(Failure::error(format!(
            "{} answered {path} with a previous value that is not a string: {other}",
            client.node()
        ))),
    }
}

/// The value exactly as stored, and a newline. A closed stdout (`| head`) is not an error.
fn print_value(value: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(value.as_bytes()).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::error(format!("cannot write to stdout: {e}"))),
    }
}

/// Messages are printed on one line.
fn one_line(message: &str) -> String {
    message.replace(['\n', '\r'], " ")
}
