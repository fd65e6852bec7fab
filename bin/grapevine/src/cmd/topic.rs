//! `grapevine topic`: publish to and subscribe to topics through any member's admin endpoint
//! (`/topics/{topic}/...`), for operators and scripts. Messages are UTF-8 strings (the topic is
//! used as `Topic<String>`).
//!
//! | command                                                   | stdout                                 |
//! |-----------------------------------------------------------|----------------------------------------|
//! | `topic publish NAME MESSAGE [--reliable]`                 | reliable: the message's sequence number |
//! | `topic subscribe NAME [--reliable] [--from-sequence N \| --from-oldest] [--json]` | one line per message, until interrupted |
//!
//! `subscribe` prints each message's payload on a line of its own (`--json`: the member's JSON
//! line, with the publisher, the publish time and the sequence). Messages a subscriber missed or
//! lost, and messages that are not strings, are reported on stderr and the subscription goes on.
//! It ends with status 1 when the member stops or the connection breaks. Failures print one line
//! on stderr and exit 1; bad arguments exit 2.

use std::io::{BufRead, BufReader, Read, Write as _};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::Failure;
use crate::client::{AdminClient, DEFAULT_NODE, Method, error_message, path_segment};

/// A reliable publish may wait (`block` policy) up to the operation timeout (30 s by default);
/// the client waits a little longer, so that the member's own message is what the user sees.
const TOPIC_CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// The longest line a subscription may send (a message is at most `net.frame_bytes_max`, at most
/// 1 GiB, as JSON).
const LINE_BYTES_MAX: u64 = 3 << 30;

/// Publish to and subscribe to topics (string messages).
#[derive(Debug, Args)]
pub struct TopicArgs {
    /// The admin address of any member (`host:port`; `host` means port 5801).
    #[arg(long, global = true, value_name = "HOST:ADMIN_PORT", default_value = DEFAULT_NODE)]
    pub node: String,
    #[command(subcommand)]
    pub command: TopicCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Publish MESSAGE to every subscriber of topic NAME.
    Publish {
        /// The topic name.
        name: String,
        /// The message (a UTF-8 string).
        #[arg(allow_hyphen_values = true)]
        message: String,
        /// A reliable topic: store the message in its ring buffer and print its sequence number.
        #[arg(long)]
        reliable: bool,
    },
    /// Print the messages of topic NAME, one per line, until interrupted.
    Subscribe {
        /// The topic name.
        name: String,
        /// A reliable topic (starts with new messages unless told otherwise).
        #[arg(long)]
        reliable: bool,
        /// Start at this sequence number (reliable topics).
        #[arg(long, value_name = "N", requires = "reliable", conflicts_with = "from_oldest")]
        from_sequence: Option<u64>,
        /// Start at the oldest message the ring buffer holds (reliable topics).
        #[arg(long, requires = "reliable")]
        from_oldest: bool,
        /// Print each message as the member's JSON line (publisher, publish time, sequence).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: TopicArgs) -> Result<(), Failure> {
    let client = AdminClient::new(&args.node, TOPIC_CLIENT_TIMEOUT).map_err(Failure::usage)?;
    match args.command {
        TopicCommand::Publish { name, message, reliable } => publish(&client, &name, &message, reliable),
        TopicCommand::Subscribe { name, reliable, from_sequence, from_oldest, json } => {
            let mut query = Vec::new();
            if reliable {
                query.push("reliable=true".to_string());
            }
            if let Some(n) = from_sequence {
                query.push(format!("from_sequence={n}"));
            }
            if from_oldest {
                query.push("from=oldest".to_string());
            }
            let path = format!("/topics/{}/subscribe?{}", path_segment(&name), query.join("&"));
            subscribe(&client, &name, &path, json)
        }
    }
}

fn publish(client: &AdminClient, name: &str, message: &str, reliable: bool) -> Result<(), Failure> {
    let query = if reliable { "?reliable=true" } else { "" };
    let path = format!("/topics/{}/publish{query}", path_segment(name));
    let reply = client.send(Method::Post, &path, Some(message)).map_err(Failure::error)?;
    let body = client.json(Method::Post, &path, &reply).map_err(Failure::error)?;
    if reply.status != 200 {
        let message = error_message(&body);
        return Err(Failure::error(one_line(&format!(
            "publish to topic {name:?} failed (HTTP {}): {message}",
            reply.status
        ))));
    }
    if reliable {
        match body.get("sequence") {
            Some(Value::Number(n)) => print_line(&n.to_string()),
            Some(Value::Null) => {
                eprintln!("grapevine: the ring buffer is full and the discard_newest policy dropped the message");
                Ok(())
            }
            _ => Err(Failure::error(format!("{} answered {path} without a sequence: {body}", client.node()))),
        }
    } else {
        Ok(())
    }
}

fn subscribe(client: &AdminClient, name: &str, path: &str, json: bool) -> Result<(), Failure> {
    let (status, body) = client.stream(path, crate::client::REQUEST_TIMEOUT).map_err(Failure::error)?;
    let mut lines = BufReader::new(body);
    if status != 200 {
        let mut text = String::new();
        let _ = lines.take(1 << 20).read_to_string(&mut text);
        let message = serde_json::from_str::<Value>(&text).map(|b| error_message(&b)).unwrap_or(text);
        return Err(Failure::error(one_line(&format!(
            "subscribe to topic {name:?} failed (HTTP {status}): {message}"
        ))));
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut lines).take(LINE_BYTES_MAX).read_until(b'\n', &mut line);
        match read {
            Ok(0) => {
                return Err(Failure::error(format!(
                    "{} ended the subscription to topic {name:?} (the member stopped?)",
                    client.node()
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::error(format!("the subscription to topic {name:?} broke: {e}"))),
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let value: Value = serde_json::from_str(text).map_err(|_| {
            Failure::error(format!(
                "{} sent a line that is not JSON: is it a grapevine member's admin port?",
                client.node()
            ))
        })?;
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            eprintln!("grapevine: {}", one_line(error));
            continue;
        }
        if json {
            print_line(text)?;
        } else {
            match value.get("payload").and_then(Value::as_str) {
                Some(payload) => print_line(payload)?,
                None => eprintln!("grapevine: a message without a string payload: {text}"),
            }
        }
    }
}

/// A line on stdout, flushed at once. A closed stdout (`| head`) ends quietly.
fn print_line(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::exit(0)),
        Err(e) => Err(Failure::error(format!("cannot write to stdout: {e}"))),
    }
}

fn one_line(message: &str) -> String {
    message.replace(['\n', '\r'], " ")
}
