//! Topics through a real process: `grapevine topic subscribe` prints the messages that
//! `grapevine topic publish` sends, for plain and reliable topics, and `clusterstats` shows them.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;

use common::*;

/// A running `grapevine topic subscribe`, killed when dropped; its stdout lines arrive on `lines`.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Subscriber {
    fn spawn(args: &[&str]) -> Subscriber {
        let mut child =
            command(args, &[]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Subscriber { child, lines }
    }

    fn next(&self) -> String {
        self.lines.recv_timeout(WAIT).expect("a line from `grapevine topic subscribe` in time")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(args: &[&str]) -> String {
    let out = run(args, &[]);
    let stderr = clean_stderr(&out);
    assert!(out.status.success(), "grapevine {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_cli_publishes_and_subscribes_and_clusterstats_shows_the_topics() {
    let args = [
        "start",
        "--cluster-name",
        "topic-cli",
        "--bind",
        "127.0.0.1",
        "--port",
        "27411",
        "--admin-port",
        "28411",
        "--node-id",
        "solo",
    ];
    let mut env = FAST_TIMERS.to_vec();
    env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    let mut node = Node::spawn("solo", &args, &env);
    let admin = node.admin_port();
    let health = format!("http://127.0.0.1:{admin}/health");
    wait_until("the member to be healthy", WAIT, || http_get(&health).filter(|(status, _)| *status == 200));
    let addr = format!("127.0.0.1:{admin}");

    // Reliable: two messages stored before anyone subscribes, read back from the oldest.
    assert_eq!(cli(&["topic", "publish", "orders", "first", "--reliable", "--node", &addr]), "0\n");
    assert_eq!(cli(&["topic", "publish", "orders", "second", "--reliable", "--node", &addr]), "1\n");
    let reliable = Subscriber::spawn(&["topic", "subscribe", "orders", "--reliable", "--from-oldest", "--node", &addr]);
    assert_eq!(reliable.next(), "first");
    assert_eq!(reliable.next(), "second");
    let resumed = Subscriber::spawn(&[
        "topic",
        "subscribe",
        "orders",
        "--reliable",
        "--from-sequence",
        "1",
        "--json",
        "--node",
        &addr,
    ]);
    let line: serde_json::Value = serde_json::from_str(&resumed.next()).unwrap();
    assert_eq!((line["payload"].as_str(), line["sequence"].as_u64()), (Some("second"), Some(1)), "{line}");
    assert_eq!(line["publisher"].as_str(), Some("solo"));

    // Plain: the subscription is registered once its first line could arrive; publish until it does.
    let plain = Subscriber::spawn(&["topic", "subscribe", "news", "--node", &addr]);
    wait_until("the plain subscriber to get a message", WAIT, || {
        cli(&["topic", "publish", "news", "hello", "--node", &addr]);
        plain.lines.recv_timeout(std::time::Duration::from_millis(200)).ok()
    });
    cli(&["topic", "publish", "news", "world", "--node", &addr]);
    wait_until("the next message", WAIT, || plain.lines.recv_timeout(WAIT).ok().filter(|l| l == "world"));

    // Bad arguments exit 2; a refused name exits 1 with the member's message.
    let out = run(&["topic", "subscribe", "news", "--from-sequence", "3", "--node", &addr], &[]);
    assert_eq!(out.status.code(), Some(2), "--from-sequence needs --reliable");
    let out = run(&["topic", "publish", "", "x", "--node", &addr], &[]);
    assert_eq!(out.status.code(), Some(1));

    let text = cli(&["clusterstats", "--node", &addr]);
    assert!(text.contains("TOPICS"), "{text}");
    let orders = text.lines().find(|l| l.trim_start().starts_with("orders")).expect("the reliable topic's row");
    let cells: Vec<&str> = orders.split_whitespace().collect();
    assert_eq!(&cells[..3], ["orders", "reliable", "2"], "{orders}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("news ")), "{text}");
    let metrics = http_get(&format!("http://127.0.0.1:{admin}/metrics")).unwrap().1;
    assert!(metrics.contains("grapevine_topic_published_total{"), "{metrics}");
    drop((reliable, resumed, plain));
    node.signal("TERM");
    assert!(node.wait_exit(WAIT).success());
}
