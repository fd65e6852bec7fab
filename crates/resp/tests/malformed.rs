//! Malformed and hostile input: the connection that sent it gets an error and is closed, and the
//! member carries on serving (other connections, and new ones). Also the connection limit, the
//! idle timeout and QUIT.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::RespCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes the connection (failing after 10 s: no hang).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server closed the connection within 10 s")
        .expect("read");
    out
}

/// Sends `request` on a new connection and returns the first reply line.
async fn one_reply(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.expect("a reply").unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_close_only_their_connection() {
    let c = RespCluster::start(1, |config| config.resp.max_bulk_bytes = 1 << 20).await;
    let addr = c.addr(0);
    // A connection open before the bad ones, used after them.
    let mut bystander = TcpStream::connect(addr).await.unwrap();
    bystander.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n").await.unwrap();
    let mut buf = [0u8; 5];
    bystander.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+OK\r\n");

    let mut garbage = vec![0u8; 100_000];
    let mut x = 0x2545_f491_u32;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = (x as u8) | 1; // no newline byte
        if *b == b'\n' {
            *b = b'x';
        }
    }
    let mut star_garbage = b"*".to_vec();
    star_garbage.extend_from_slice(&garbage[..40]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a bulk length over the limit", b"*2\r\n$3\r\nGET\r\n$99999999999\r\n".to_vec(), "invalid bulk length"),
        ("a huge array length", b"*999999999999\r\n".to_vec(), "invalid multibulk length"),
        ("a negative array length", b"*-5\r\n".to_vec(), "invalid multibulk length"),
        ("a negative bulk length", b"*1\r\n$-7\r\n".to_vec(), "invalid bulk length"),
        ("a bulk string longer than declared", b"*1\r\n$2\r\nPING\r\n".to_vec(), "followed by CRLF"),
        ("a header without CRLF", b"*1\r\n$4\n".to_vec(), "must end with CRLF"),
        ("binary garbage after '*'", star_garbage, "Protocol error"),
        ("100 kB of binary garbage without a newline", garbage, "too big inline request"),
        ("a non-bulk argument", b"*1\r\n:5\r\n".to_vec(), "expected '$'"),
    ];
    for (what, input, expected) in cases {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The server may close before reading everything: a failed write is fine.
        let _ = stream.write_all(&input).await;
        let reply = String::from_utf8_lossy(&read_to_close(&mut stream).await).to_string();
        assert!(reply.starts_with("-ERR Protocol error") && reply.contains(expected), "{what}: {reply:?}");
        assert_eq!(reply.matches("\r\n").count(), 1, "{what}: one error line, then closed: {reply:?}");
    }

    // Unterminated requests: the client gives up (EOF) or goes silent; neither blocks the member.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"*2\r\n$3\r\nGET\r\n$5\r\nab").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, b"", "EOF mid-request: closed without a reply");

    // The member carries on: the old connection and new ones are served.
    bystander.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").await.unwrap();
    let mut buf = [0u8; 8];
    bystander.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"$2\r\nv1\r\n");
    assert_eq!(one_reply(addr, b"PING\r\n").await, "+PONG\r\n");
    // Pipelined requests split anywhere are answered in order.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let pipeline =
        b"*3\r\n$3\r\nSET\r\n$1\r\nn\r\n$1\r\n5\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n";
    for chunk in pipeline.chunks(7) {
        stream.write_all(chunk).await.unwrap();
    }
    assert_eq!(read_to_close(&mut stream).await, b"+OK\r\n:6\r\n+PONG\r\n+OK\r\n", "QUIT answers, then closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_member_refuses_with_an_error_and_idle_connections_are_closed() {
    let c = RespCluster::start(1, |config| {
        config.resp.max_connections = 2;
        config.resp.idle_timeout_seconds = 1;
    })
    .await;
    let addr = c.addr(0);
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"+PONG\r\n");
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_close(&mut third).await, b"-ERR max number of clients reached\r\n");

    // A connection in use outlives the idle timeout (1 s): one PING every 250 ms for 2 s.
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        first.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        first.read_exact(&mut buf).await.expect("an active connection stays open");
        assert_eq!(&buf, b"+PONG\r\n");
    }
    // Both go idle: closed after the idle timeout (read_to_close fails after 10 s otherwise).
    assert_eq!(read_to_close(&mut first).await, b"");
    assert_eq!(read_to_close(&mut second).await, b"");
    common::wait_for("the slots to be free again", common::WAIT, || c.servers[0].connections() == 0).await;
    assert_eq!(one_reply(addr, b"PING\r\n").await, "+PONG\r\n");
}
