//! Redis pub/sub on grapevine topics, with real members: the `redis` crate's subscribers
//! (RESP2 and RESP3), raw connections for the exact frames, Rust services on the same topics, a
//! subscriber that never reads, and what closing connections retracts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{RespCluster, WAIT, cli, connect, tool_available, wait_for};
use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request as a RESP array of bulk strings.
fn request(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads exactly `expected.len()` bytes (within `WAIT`) and compares them with `expected`.
async fn expect(stream: &mut TcpStream, expected: &[u8]) {
    let mut buf = vec![0; expected.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await.expect("a reply within WAIT").expect("read");
    assert_eq!(String::from_utf8_lossy(&buf), String::from_utf8_lossy(expected));
}

/// `["kind", channel, count]` as RESP2 sends it.
fn confirmation(kind: &str, channel: Option<&str>, count: usize) -> Vec<u8> {
    let channel = channel.map_or("$-1\r\n".to_string(), |c| format!("${}\r\n{c}\r\n", c.len()));
    format!("*3\r\n${}\r\n{kind}\r\n{channel}:{count}\r\n", kind.len()).into_bytes()
}

/// A RESP2 subscriber (the `redis` crate's async pub/sub connection) of `channels` on `addr`.
async fn subscriber(addr: SocketAddr, channels: &[&str]) -> (redis::aio::PubSubSink, redis::aio::PubSubStream) {
    let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
    let (mut sink, stream) =
        tokio::time::timeout(WAIT, client.get_async_pubsub()).await.expect("connects").expect("connects").split();
    for channel in channels {
        tokio::time::timeout(WAIT, sink.subscribe(*channel)).await.expect("subscribed in time").unwrap();
    }
    (sink, stream)
}

/// The next message of a subscriber, as (channel, payload), within `WAIT`.
async fn next_message(stream: &mut redis::aio::PubSubStream) -> (String, Vec<u8>) {
    let msg = tokio::time::timeout(WAIT, stream.next()).await.expect("a message within WAIT").expect("stream open");
    (msg.get_channel_name().to_string(), msg.get_payload_bytes().to_vec())
}

async fn publish(con: &mut redis::aio::MultiplexedConnection, channel: &str, message: &[u8]) -> i64 {
    con.publish(channel, message).await.unwrap()
}

/// A numeric field of `INFO <section>`.
async fn info_field(con: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query_async(con).await.unwrap();
    let prefix = format!("{field}:");
    let line = info.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {field} in {info}"));
    line[prefix.len()..].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_published_through_one_member_reach_subscribers_of_others_in_order() {
    let c = RespCluster::start(3, |_| {}).await;
    let (mut sink, mut on_a) = subscriber(c.addr(0), &["news", "other"]).await;
    let mut through_b = c.client(1).await;
    let mut through_a = c.client(0).await;

    // PUBLISH counts this member's subscribers plus one per other member with subscribers.
    assert_eq!(publish(&mut through_b, "nobody", b"x").await, 0, "no subscriber anywhere");
    assert_eq!(publish(&mut through_a, "news", b"first").await, 1, "one subscriber on this member");
    assert_eq!(next_message(&mut on_a).await, ("news".into(), b"first".to_vec()));
    let (_sink2, mut also_on_a) = subscriber(c.addr(0), &["news"]).await;
    let (_sink3, mut on_c) = subscriber(c.addr(2), &["news"]).await;
    assert_eq!(publish(&mut through_a, "news", b"second").await, 3, "two here, one other member");
    assert_eq!(publish(&mut through_b, "news", b"third").await, 2, "two other members, whatever their subscribers");
    for stream in [&mut on_a, &mut also_on_a, &mut on_c] {
        let mut got = Vec::new();
        while got.last().is_none_or(|m: &(String, Vec<u8>)| m.1 != b"third") {
            got.push(next_message(stream).await);
        }
        assert_eq!(got.last().unwrap().0, "news");
    }

    // In order, binary-safe, through another member.
    let sent: Vec<Vec<u8>> = (0..300u32).map(|i| [&i.to_be_bytes()[..], b"\x00\r\n\xff"].concat()).collect();
    let mut pipe = redis::pipe();
    for message in &sent {
        pipe.publish("news", message.as_slice()).ignore();
    }
    let () = pipe.query_async(&mut through_b).await.unwrap();
    for expected in &sent {
        assert_eq!(next_message(&mut on_a).await, ("news".into(), expected.clone()));
    }

    // A Rust service's Topic<String> and Topic<Vec<u8>> share the channel.
    let rust = &c.cluster.members[1];
    let mut strings = rust.topic::<String>("news").unwrap().subscribe().await.unwrap();
    let mut byte_vecs = rust.topic::<Vec<u8>>("news").unwrap().subscribe().await.unwrap();
    assert_eq!(publish(&mut through_a, "news", b"from resp").await, 2 + 2, "two here, members 1 and 2");
    let got = tokio::time::timeout(WAIT, strings.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.payload, "from resp");
    let got = tokio::time::timeout(WAIT, byte_vecs.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.payload, b"from resp");
    rust.topic::<String>("news").unwrap().publish(&"from rust".to_string()).await.unwrap();
    assert_eq!(next_message(&mut on_a).await, ("news".into(), b"from resp".to_vec()));
    assert_eq!(next_message(&mut on_a).await, ("news".into(), b"from rust".to_vec()));
    drop((strings, byte_vecs));

    // UNSUBSCRIBE stops delivery of that channel; the other goes on.
    sink.unsubscribe("news").await.unwrap();
    for i in 0..20 {
        publish(&mut through_b, "news", format!("late {i}").as_bytes()).await;
    }
    publish(&mut through_b, "other", b"marker").await;
    assert_eq!(
        next_message(&mut on_a).await,
        ("other".into(), b"marker".to_vec()),
        "nothing of news after UNSUBSCRIBE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resp2_subscriber_may_send_only_pubsub_commands_and_gets_redis_frames() {
    let c = RespCluster::start(1, |_| {}).await;
    let mut s = TcpStream::connect(c.addr(0)).await.unwrap();
    s.write_all(&request(&[b"SUBSCRIBE", b"a", b"b", b"a"])).await.unwrap();
    expect(&mut s, &confirmation("subscribe", Some("a"), 1)).await;
    expect(&mut s, &confirmation("subscribe", Some("b"), 2)).await;
    expect(&mut s, &confirmation("subscribe", Some("a"), 2)).await;

    s.write_all(&request(&[b"GET", b"k"])).await.unwrap();
    expect(
        &mut s,
        b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this \
          context\r\n",
    )
    .await;
    s.write_all(b"PING\r\nPING hi\r\n").await.unwrap();
    expect(&mut s, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n*2\r\n$4\r\npong\r\n$2\r\nhi\r\n").await;
    s.write_all(&request(&[b"PSUBSCRIBE", b"a*"])).await.unwrap();
    expect(
        &mut s,
        b"-ERR PSUBSCRIBE is not supported: grapevine topics have no pattern subscriptions; SUBSCRIBE to each channel \
          by name\r\n",
    )
    .await;
    s.write_all(&request(&[b"PUNSUBSCRIBE"])).await.unwrap();
    expect(&mut s, &confirmation("punsubscribe", None, 2)).await;

    // A message, pushed between replies.
    let mut publisher = c.client(0).await;
    assert_eq!(publish(&mut publisher, "b", b"hello\r\n").await, 1);
    expect(&mut s, b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$7\r\nhello\r\n\r\n").await;

    // Not topic names, or too many channels: refused, nothing subscribed.
    s.write_all(&request(&[b"SUBSCRIBE", b"c", b"\xff"])).await.unwrap();
    expect(&mut s, "-ERR invalid channel name '\u{fffd}': grapevine channels are topic names, 1 to 255 bytes of printable UTF-8\r\n".as_bytes()).await;
    let names: Vec<Vec<u8>> = (0..1023).map(|i| format!("ch{i}").into_bytes()).collect();
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend(names.iter().map(Vec::as_slice));
    s.write_all(&request(&args)).await.unwrap();
    expect(
        &mut s,
        b"-ERR too many channels: a connection subscribes to at most 1024 (this one has 2, and asked for 1023 more); \
          unsubscribe from some, or subscribe on another connection\r\n",
    )
    .await;

    // UNSUBSCRIBE without channels: every channel, then out of subscribed mode.
    s.write_all(&request(&[b"UNSUBSCRIBE"])).await.unwrap();
    expect(&mut s, &confirmation("unsubscribe", Some("a"), 1)).await;
    expect(&mut s, &confirmation("unsubscribe", Some("b"), 0)).await;
    s.write_all(&request(&[b"GET", b"k"])).await.unwrap();
    expect(&mut s, b"$-1\r\n").await;
    s.write_all(&request(&[b"UNSUBSCRIBE"])).await.unwrap();
    expect(&mut s, &confirmation("unsubscribe", None, 0)).await;
    assert_eq!(publish(&mut publisher, "b", b"gone").await, 0, "the subscription is gone on this member");

    // RESET leaves subscribed mode without confirmations.
    s.write_all(&request(&[b"SUBSCRIBE", b"a"])).await.unwrap();
    expect(&mut s, &confirmation("subscribe", Some("a"), 1)).await;
    s.write_all(b"RESET\r\nPING\r\n").await.unwrap();
    expect(&mut s, b"+RESET\r\n+PONG\r\n").await;

    // The commands are listed for clients' handshakes.
    let info: redis::Value =
        redis::cmd("COMMAND").arg("INFO").arg("publish").arg("subscribe").query_async(&mut publisher).await.unwrap();
    let text = format!("{info:?}");
    assert!(text.contains("publish") && text.contains("subscribe") && text.contains("pubsub"), "{text}");
    let channels: Vec<String> = redis::cmd("PUBSUB").arg("CHANNELS").query_async(&mut publisher).await.unwrap();
    assert!(channels.is_empty(), "{channels:?}");

    if tool_available("redis-cli", "redis-tools") {
        let (_sink, mut stream) = subscriber(c.addr(0), &["cli"]).await;
        assert_eq!(cli(c.addr(0), &["PUBLISH", "cli", "from redis-cli"]).await, "1");
        assert_eq!(next_message(&mut stream).await, ("cli".into(), b"from redis-cli".to_vec()));
        assert_eq!(cli(c.addr(0), &["PUBSUB", "NUMSUB", "cli", "none"]).await, "cli\n1\nnone\n0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resp3_client_gets_push_frames_and_keeps_using_commands() {
    let c = RespCluster::start(2, |_| {}).await;
    let client = redis::Client::open(format!("redis://{}/?protocol=resp3", c.addr(0))).unwrap();
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_push_sender(tx);
    let mut con = client.get_multiplexed_async_connection_with_config(&config).await.unwrap();
    con.subscribe(&["r3", "other"]).await.unwrap();
    // Subscribed, a RESP3 connection still runs any command.
    let () = con.set("k", "v").await.unwrap();
    let value: String = con.get("k").await.unwrap();
    assert_eq!(value, "v");

    let mut publisher = connect(c.addr(1), false).await;
    assert_eq!(publish(&mut publisher, "r3", b"pushed").await, 1);
    let message = loop {
        let push = tokio::time::timeout(WAIT, pushes.recv()).await.expect("a push within WAIT").expect("open");
        if push.kind == redis::PushKind::Message {
            break redis::Msg::from_push_info(push).expect("a message");
        }
        // The subscribe confirmations come as push frames too.
        assert_eq!(push.kind, redis::PushKind::Subscribe, "{push:?}");
    };
    assert_eq!(message.get_channel_name(), "r3");
    assert_eq!(message.get_payload_bytes(), b"pushed");

    // The push frame on the wire: `>`.
    let mut raw = TcpStream::connect(c.addr(0)).await.unwrap();
    raw.write_all(b"HELLO 3\r\n").await.unwrap();
    // HELLO's map ends with `modules`, an empty array.
    let mut hello = Vec::new();
    while !hello.ends_with(b"*0\r\n") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, raw.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "HELLO 3 answered {:?}", String::from_utf8_lossy(&hello));
        hello.extend_from_slice(&buf[..n]);
    }
    assert!(hello.starts_with(b"%"), "HELLO 3 answers a map");
    raw.write_all(&request(&[b"SUBSCRIBE", b"wire"])).await.unwrap();
    expect(&mut raw, b">3\r\n$9\r\nsubscribe\r\n$4\r\nwire\r\n:1\r\n").await;
    assert_eq!(publish(&mut publisher, "wire", b"w").await, 1);
    expect(&mut raw, b">3\r\n$7\r\nmessage\r\n$4\r\nwire\r\n$1\r\nw\r\n").await;
    raw.write_all(b"PING\r\n").await.unwrap();
    expect(&mut raw, b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_that_never_reads_loses_messages_within_a_bound_and_slows_no_one() {
    let c = RespCluster::start(2, |_| {}).await;
    // A subscriber that never reads, with a small receive buffer so that its backlog piles up on
    // the member rather than in the kernel.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(c.addr(0)).await.unwrap();
    stuck.write_all(&request(&[b"SUBSCRIBE", b"flood"])).await.unwrap();
    expect(&mut stuck, &confirmation("subscribe", Some("flood"), 1)).await;
    let (_s1, mut beside) = subscriber(c.addr(0), &["flood"]).await;
    let (_s2, mut elsewhere) = subscriber(c.addr(1), &["flood"]).await;

    let mut publisher = c.client(1).await;
    let mut stats = c.client(0).await;
    let payload_bytes = 16 << 10;
    let (batches, batch) = (20, 32);
    let mut queued_max = 0;
    for b in 0..batches {
        let mut pipe = redis::pipe();
        let sent: Vec<Vec<u8>> = (0..batch)
            .map(|i| {
                let mut m = format!("{:06}", b * batch + i).into_bytes();
                m.resize(payload_bytes, b'x');
                m
            })
            .collect();
        for m in &sent {
            pipe.publish("flood", m.as_slice()).ignore();
        }
        let () = pipe.query_async(&mut publisher).await.unwrap();
        // The readers get every message, in order, while the other one's backlog is capped.
        for stream in [&mut beside, &mut elsewhere] {
            for m in &sent {
                assert_eq!(next_message(stream).await.1, *m);
            }
        }
        queued_max = queued_max.max(info_field(&mut stats, "stats", "pubsub_queued_bytes").await);
    }
    let total = (batches * batch * payload_bytes) as u64;
    let dropped = info_field(&mut stats, "stats", "pubsub_messages_dropped").await;
    assert!(dropped > 0, "{total} bytes for a subscriber that reads nothing: some are dropped");
    let bound = (1 << 20) + payload_bytes as u64 + 128;
    assert!(queued_max <= bound, "the push queue held {queued_max} bytes, more than its bound {bound}");
    assert_eq!(info_field(&mut stats, "clients", "pubsub_clients").await, 2);

    // Closing it drops its subscription and its backlog.
    drop(stuck);
    grapevine_tests::wait_until_async("the stuck subscriber to be gone", WAIT, || {
        let mut stats = stats.clone();
        async move {
            info_field(&mut stats, "clients", "pubsub_clients").await == 1
                && info_field(&mut stats, "stats", "pubsub_queued_bytes").await == 0
        }
    })
    .await;
    assert_eq!(info_field(&mut stats, "stats", "pubsub_subscriptions").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_subscribers_stay_open_and_closed_connections_retract_their_subscriptions() {
    let c = RespCluster::start(2, |config| config.resp.idle_timeout_seconds = 1).await;
    let mut raw = TcpStream::connect(c.addr(0)).await.unwrap();
    raw.write_all(&request(&[b"SUBSCRIBE", b"quiet"])).await.unwrap();
    expect(&mut raw, &confirmation("subscribe", Some("quiet"), 1)).await;
    let mut idle = TcpStream::connect(c.addr(0)).await.unwrap();
    idle.write_all(b"PING\r\n").await.unwrap();
    expect(&mut idle, b"+PONG\r\n").await;
    // The plain connection is closed after the idle timeout; the subscriber, idle for longer, is
    // not (and is given one more idle period to be sure).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, idle.read_to_end(&mut rest)).await.expect("idle connection closed");
    assert!(closed.is_ok() && rest.is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // (Clients that are not subscribed connect afresh: they would be closed as idle too.)
    let mut publisher = c.client(1).await;
    assert_eq!(publish(&mut publisher, "quiet", b"still here").await, 1);
    expect(&mut raw, b"*3\r\n$7\r\nmessage\r\n$5\r\nquiet\r\n$10\r\nstill here\r\n").await;

    // Closing the subscriber's connection retracts its subscription from the other members.
    drop(raw);
    let addr = c.addr(1);
    grapevine_tests::wait_until_async("PUBLISH to find no subscriber", WAIT, || async move {
        publish(&mut connect(addr, false).await, "quiet", b"anyone?").await == 0
    })
    .await;
    wait_for("the member to have no subscribers", WAIT, || {
        c.cluster.members[0].topic_service().local_stats().iter().all(|t| t.subscribers == 0)
    })
    .await;
}
