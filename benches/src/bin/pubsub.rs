//! `pubsub`: topic publish throughput and publish-to-delivery latency, grapevine against
//! `redis-server`, with the same client (the `redis` crate) over the same protocol (RESP
//! `PUBLISH`/`SUBSCRIBE`) in the same run.
//!
//! grapevine: three `grapevine start` processes; the subscriber is connected to member 0 and the
//! publishers to member 1, so every message crosses from one member to another (a plain topic
//! sends each message to the members with subscribers). Redis: one `redis-server`, subscriber
//! and publishers on it. Each publisher sends its share of the messages one after the other
//! (waiting for each `PUBLISH` reply); every payload carries its send time, so the subscriber
//! measures publish-to-delivery latency. Messages not delivered within the timeout are reported
//! as lost (grapevine's topics are best effort, as Redis's pub/sub).
//!
//! ```sh
//! cargo build --release -p grapevine-bin -p grapevine-benches --bin grapevine --bin pubsub
//! target/release/pubsub --messages 50000 --publishers 8
//! ```
//! See docs/benchmarks.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt as _;
use grapevine_benches::redis_target::{RedisServer, connect_to, server_available};
use grapevine_benches::resp_target::{GrapevineProcesses, default_binary};
use hdrhistogram::Histogram;
use redis::AsyncCommands as _;

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Messages published per target.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Concurrent publishers (connections), each sending its share one message at a time.
    #[arg(long, default_value_t = 8)]
    publishers: u64,
    /// Payload size in bytes (at least 16: the send time and a sequence number).
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// How long the subscriber may wait for the last messages after the publishers finished.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// The `grapevine` binary (default: the one next to this one).
    #[arg(long)]
    grapevine_bin: Option<PathBuf>,
}

/// What one target measured.
#[derive(Debug)]
struct Measured {
    published_per_s: f64,
    received: u64,
    latency: Histogram<u64>,
}

const CHANNEL: &str = "bench";

/// Publishes from `publishers` connections to `pub_addr` while one subscriber on `sub_addr`
/// counts and times the deliveries.
async fn measure(sub_addr: SocketAddr, pub_addr: SocketAddr, args: &Args) -> anyhow::Result<Measured> {
    let epoch = Instant::now();
    let client = redis::Client::open(format!("redis://{sub_addr}/"))?;
    let (mut sink, mut stream) = tokio::time::timeout(Duration::from_secs(10), client.get_async_pubsub())
        .await
        .context("connecting the subscriber timed out")??
        .split();
    sink.subscribe(CHANNEL).await.context("SUBSCRIBE")?;
    // The subscription must be known where the publishers are before they start: wait until a
    // probe PUBLISH reaches someone.
    let mut probe = connect_to(pub_addr).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let receivers: i64 = probe.publish(CHANNEL, b"probe".as_slice()).await?;
        if receivers > 0 {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the subscription did not reach the publishers' member within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = args.messages;
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while let Some(msg) = stream.next().await {
                let payload = msg.get_payload_bytes();
                if payload.len() < 16 {
                    continue; // a probe
                }
                let sent = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let now = epoch.elapsed().as_micros() as u64;
                let _ = latency.record(now.saturating_sub(sent).max(1));
                if received.fetch_add(1, Ordering::Relaxed) + 1 == total {
                    break;
                }
            }
            latency
        })
    };
    let started = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    let per = total / args.publishers;
    for p in 0..args.publishers {
        let count = if p + 1 == args.publishers { total - per * (args.publishers - 1) } else { per };
        let mut con = connect_to(pub_addr).await?;
        let bytes = args.payload_bytes.max(16);
        publishers.spawn(async move {
            let mut payload = vec![b'x'; bytes];
            for i in 0..count {
                payload[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_le_bytes());
                payload[8..16].copy_from_slice(&((p << 40) | i).to_le_bytes());
                let _: i64 = con.publish(CHANNEL, payload.as_slice()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = publishers.join_next().await {
        done??;
    }
    let published_per_s = total as f64 / started.elapsed().as_secs_f64();
    let latency = match tokio::time::timeout(Duration::from_secs(args.drain_secs), receiver).await {
        Ok(joined) => joined?,
        Err(_) => bail!(
            "the subscriber got {} of {total} messages within {} s of the last publish",
            received.load(Ordering::Relaxed),
            args.drain_secs
        ),
    };
    Ok(Measured { published_per_s, received: received.load(Ordering::Relaxed), latency })
}

fn row(name: &str, m: &Measured, reference: Option<&Measured>, total: u64) -> String {
    let ratio = reference.map_or("1.00x".to_string(), |r| format!("{:.2}x", m.published_per_s / r.published_per_s));
    let q = |p: f64| m.latency.value_at_quantile(p);
    format!(
        "| {name} | {:.0} | {ratio} | {} | {} | {} | {} |",
        m.published_per_s,
        q(0.5),
        q(0.99),
        q(0.999),
        total - m.received.min(total)
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.publishers > 0 && args.messages >= args.publishers, "need messages >= publishers > 0");
    if let Err(why) = server_available() {
        bail!("redis-server is needed as the reference: {why}");
    }
    let binary = args.grapevine_bin.clone().unwrap_or_else(default_binary);
    eprintln!("pubsub: redis-server");
    let redis = RedisServer::start(None).await?;
    let addr: SocketAddr = ([127, 0, 0, 1], redis.port).into();
    let on_redis = measure(addr, addr, &args).await?;
    drop(redis);
    eprintln!("pubsub: three grapevine members");
    let cluster = GrapevineProcesses::start(&binary, 3, 1).await?;
    let on_grapevine = measure(cluster.resp_addr(0), cluster.resp_addr(1), &args).await?;
    println!(
        "{} messages of {} bytes, {} publishers (one PUBLISH at a time each), one subscriber\n",
        args.messages, args.payload_bytes, args.publishers
    );
    println!("| target | published/s | ratio | delivery p50 (µs) | p99 | p99.9 | lost |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("{}", row("redis-server (one server)", &on_redis, None, args.messages));
    println!(
        "{}",
        row("grapevine (3 members, subscriber on another member)", &on_grapevine, Some(&on_redis), args.messages)
    );
    Ok(())
}
