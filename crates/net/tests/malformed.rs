//! Garbage on the listener closes that connection only; legitimate peers are unaffected.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use grapevine_net::Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hello written by hand, as documented in the crate docs (no expected member).
fn hello(cluster: &str, node: &str, generation: u64) -> Vec<u8> {
    let mut out = b"GRPV".to_vec();
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    for s in [cluster, node] {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&generation.to_be_bytes());
    out.push(0);
    out
}

async fn read_str(stream: &mut TcpStream) -> String {
    let len = stream.read_u16().await.unwrap() as usize;
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await.unwrap();
    String::from_utf8(bytes).unwrap()
}

/// Connects and completes a handshake by hand; returns the raw stream.
async fn handshaken(addr: SocketAddr, node: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&hello(CLUSTER, node, 1)).await.unwrap();
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await.unwrap();
    assert_eq!(&magic, b"GRPV");
    let (_major, _minor) = (stream.read_u16().await.unwrap(), stream.read_u16().await.unwrap());
    let status = stream.read_u8().await.unwrap();
    let (_cluster, _node) = (read_str(&mut stream).await, read_str(&mut stream).await);
    let _generation = stream.read_u64().await.unwrap();
    let reason = read_str(&mut stream).await;
    assert_eq!(status, 0, "handshake refused: {reason}");
    stream
}

/// Waits until the node closes the connection (EOF or reset).
async fn closed_by_peer(mut stream: TcpStream) {
    let mut buf = [0u8; 256];
    within("connection closed by the node", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn legit_peer_still_talks(node: &Net) {
    let client = start("legit", 1).await;
    client.set_peer_address(node.local().clone(), node.local_addr());
    let body = within("legit request", client.request(node.local(), ECHO, Bytes::from_static(b"hi"), LONG)).await;
    assert_eq!(body.unwrap(), Bytes::from_static(b"hi"));
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_instead_of_a_handshake_are_dropped() {
    let node = start("node", 1).await;
    let mut stream = TcpStream::connect(node.local_addr()).await.unwrap();
    let garbage: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    stream.write_all(&garbage).await.unwrap();
    closed_by_peer(stream).await;
    assert_eq!(node.stats().handshakes_rejected, 1);
    legit_peer_still_talks(&node).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_closes_the_connection() {
    let mut config = config("node", 1);
    config.frame_bytes_max = 4096;
    let node = start_with(config).await;
    node.register(ECHO, echo());
    let mut stream = handshaken(node.local_addr(), "raw").await;
    eventually("raw connection open", || node.stats().connections_open == 1).await;
    stream.write_all(&4097u32.to_be_bytes()).await.unwrap();
    closed_by_peer(stream).await;
    eventually("malformed frame counted", || node.stats().frames_malformed == 1).await;
    eventually("raw connection closed", || node.stats().connections_open == 0).await;
    legit_peer_still_talks(&node).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_kind_closes_the_connection() {
    let node = start("node", 1).await;
    let mut stream = handshaken(node.local_addr(), "raw").await;
    let mut frame = 12u32.to_be_bytes().to_vec();
    frame.push(9); // no such kind
    frame.extend_from_slice(&1u64.to_be_bytes());
    frame.push(ECHO.0);
    frame.extend_from_slice(b"hi");
    stream.write_all(&frame).await.unwrap();
    closed_by_peer(stream).await;
    eventually("malformed frame counted", || node.stats().frames_malformed == 1).await;
    legit_peer_still_talks(&node).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_then_close_is_cleaned_up() {
    let node = start("node", 1).await;
    let mut stream = handshaken(node.local_addr(), "raw").await;
    eventually("raw connection open", || node.stats().connections_open == 1).await;
    let mut partial = 100u32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[0u8; 20]);
    stream.write_all(&partial).await.unwrap();
    drop(stream);
    eventually("raw connection closed", || node.stats().connections_open == 0).await;
    legit_peer_still_talks(&node).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_frames_by_hand_are_answered() {
    // The documented frame layout, written by hand, gets a response.
    let node = start("node", 1).await;
    let mut stream = handshaken(node.local_addr(), "raw").await;
    let mut frame = 12u32.to_be_bytes().to_vec();
    frame.push(0); // request
    frame.extend_from_slice(&77u64.to_be_bytes());
    frame.push(ECHO.0);
    frame.extend_from_slice(b"hi");
    stream.write_all(&frame).await.unwrap();
    let mut response = [0u8; 16];
    within("response", stream.read_exact(&mut response)).await.unwrap();
    assert_eq!(&response[..4], &12u32.to_be_bytes());
    assert_eq!(response[4], 1); // response
    assert_eq!(&response[5..13], &77u64.to_be_bytes());
    assert_eq!(&response[14..], b"hi");
    node.shutdown().await;
}

/// The configured handshake timeout (200 ms here) is the one applied: the stalled connection is
/// closed no sooner than 200 ms after it was opened, and long before the 5 s default would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_is_closed_after_the_handshake_timeout() {
    let mut config = config("node", 1);
    let configured = std::time::Duration::from_millis(200);
    let default = config.handshake_timeout;
    assert_eq!(default, std::time::Duration::from_secs(5), "the default this test tells apart");
    config.handshake_timeout = configured;
    let node = start_with(config).await;
    node.register(ECHO, echo());
    // Before connecting: the node's timer starts when it accepts, which is later.
    let opened = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(node.local_addr()).await.unwrap();
    stream.write_all(b"GRP").await.unwrap();
    closed_by_peer(stream).await;
    let closed_after = opened.elapsed();
    assert!(closed_after >= configured, "closed after {closed_after:?}, before the configured {configured:?}");
    assert!(closed_after < default / 2, "closed after {closed_after:?}: the configured {configured:?} was not applied");
    legit_peer_still_talks(&node).await;
    node.shutdown().await;
}
