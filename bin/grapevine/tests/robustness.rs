//! Garbage on the gossip port and malformed HTTP on the admin port never stop a member.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;

const GOSSIP_PORT: u16 = 27121;
const ADMIN_PORT: u16 = 28121;

/// Sends `bytes` on a new connection and reads whatever comes back until the server closes or
/// a short timeout passes.
fn tcp_exchange(port: u16, bytes: &[u8], close_early: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    if !close_early {
        let _ = stream.read_to_end(&mut reply);
    }
    reply
}

#[test]
fn garbage_datagrams_and_malformed_http_do_not_stop_the_member() {
    let port = GOSSIP_PORT.to_string();
    let admin = ADMIN_PORT.to_string();
    let args = ["start", "--cluster-name", "garbage", "--bind", "127.0.0.1", "--port", &port, "--admin-port", &admin];
    let mut env = FAST_TIMERS.to_vec();
    env.push(("GRAPEVINE_PORT_AUTO_INCREMENT", "false"));
    let mut node = Node::spawn("garbage", &args, &env);
    assert_eq!(node.admin_port(), ADMIN_PORT);
    let health = format!("http://127.0.0.1:{ADMIN_PORT}/health");
    wait_until("the member to be healthy", WAIT, || http_get(&health).filter(|(status, _)| *status == 200));

    // UDP garbage on the gossip port: empty, short, long, and bytes that start like gossip.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut datagrams: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 1],
        b"hello, gossip".to_vec(),
        vec![0xff; 1400],
        vec![0; 9000],
        vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ];
    // Pseudo-random bytes (a fixed LCG: the test is reproducible).
    let mut state: u32 = 12345;
    for len in [3usize, 17, 64, 255, 512, 1024] {
        datagrams.push(
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (state >> 16) as u8
                })
                .collect(),
        );
    }
    for datagram in &datagrams {
        udp.send_to(datagram, ("127.0.0.1", GOSSIP_PORT)).unwrap();
    }

    // Malformed HTTP and raw garbage on the admin port, and garbage on the data port.
    let replies = [
        tcp_exchange(ADMIN_PORT, b"\x00\xff\xfe garbage \r\n\r\n", false),
        tcp_exchange(ADMIN_PORT, b"GET / HTTP/9.9\r\n\r\n", false),
        tcp_exchange(ADMIN_PORT, b"POST /master/handover HTTP/1.1\r\nContent-Length: abc\r\n\r\n", false),
        tcp_exchange(ADMIN_PORT, &[b"GET /health HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 1_000_000]].concat(), false),
        tcp_exchange(ADMIN_PORT, b"GET /stats HTTP/1.1\r\nHost: x\r\n", true),
        tcp_exchange(ADMIN_PORT, b"", true),
    ];
    assert!(
        replies[1].is_empty() || replies[1].starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&replies[1])
    );
    tcp_exchange(GOSSIP_PORT, b"\x00\x01garbage on the data port", true);

    // The member keeps serving, and said what it dropped.
    let (status, body) = wait_until("/health after the garbage", WAIT, || http_get(&health));
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(&format!("http://127.0.0.1:{ADMIN_PORT}/no/such/route")).unwrap();
    assert_eq!(status, 404);
    node.wait_for_log("invalid-chitchat-payload");
    assert!(node.is_running());
    assert!(!node.log().contains("panicked"), "{}", node.log());

    node.signal("TERM");
    assert_eq!(node.wait_exit(WAIT).code(), Some(0), "{}", node.log());
}
