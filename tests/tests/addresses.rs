//! Which addresses and ports a member uses: `admin_bind`, `public_address`, and
//! `net.outbound_ports` end to end. (The default advertised address, with no `bind`, is tested in
//! network namespaces: `bin/grapevine/tests/chaos_netns.rs`.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use grapevine::Cluster;
use grapevine_tests::{TestCluster, WAIT, next_loopback_ip, start_member, test_config, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await??;
    Ok(response)
}

/// `admin_bind` puts the admin endpoint on its own address: it answers there and not on `bind`,
/// and the other members learn that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bind_moves_the_admin_endpoint_to_its_own_address() {
    let cluster = TestCluster::start(1).await;
    let first = cluster.member(0);
    let admin_ip = next_loopback_ip();
    let mut config = test_config(first.name());
    config.admin_bind = Some(admin_ip);
    let member = start_member(config, &[first]).await;
    let admin = member.addresses().admin.expect("admin enabled");
    assert_eq!(admin.ip(), admin_ip);
    assert_ne!(member.addresses().bind, admin_ip);
    assert!(get(admin, "/health").await.unwrap().starts_with("HTTP/1.1 200"));
    let on_bind = SocketAddr::new(member.addresses().bind, admin.port());
    assert!(get(on_bind, "/health").await.is_err(), "the admin endpoint also answers on {on_bind}");
    wait_until("the first member to learn the admin address", WAIT, || {
        first.view().member(member.local()).is_some_and(|m| m.admin_addr == Some(admin))
    })
    .await;
    member.shutdown().await;
}

/// A member listening on every interface advertises `public_address`: the others see it there,
/// and reach it there for data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_address_is_the_address_the_others_use() {
    let cluster = TestCluster::start(1).await;
    let first = cluster.member(0);
    let public = next_loopback_ip();
    let mut config = test_config(first.name());
    config.bind = None;
    config.public_address = Some(public);
    config.members = vec![first.addresses().gossip.to_string()];
    let member = Cluster::start(config).await.expect("member starts");
    assert_eq!(member.addresses().bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    assert_eq!(member.addresses().gossip.ip(), public);
    assert_eq!(member.addresses().data.ip(), public);
    wait_until("the first member to see the second at its public address", WAIT, || {
        first.view().member(member.local()).is_some_and(|m| m.gossip_addr.ip() == public && m.data_addr.ip() == public)
    })
    .await;
    grapevine_tests::wait_settled(&[first, &member]).await;
    // Writes through the first member reach the second as owner (and as backup).
    let map = first.map::<u32, u32>("public").unwrap();
    for key in 0..200 {
        map.put(&key, &key).await.unwrap();
    }
    let owned = member.map_service().local_stats().maps.iter().find(|m| m.name == "public").map(|m| m.owned_entries);
    assert!(owned.is_some_and(|n| n > 0), "the second member owns some keys: {owned:?}");
    let theirs = member.map::<u32, u32>("public").unwrap();
    for key in 0..200 {
        assert_eq!(theirs.get(&key).await.unwrap(), Some(key));
    }
    member.shutdown().await;
}

/// TCP connections of this host: (local, remote) of each established one, from `/proc/net/tcp`.
fn established_connections() -> Vec<(SocketAddr, SocketAddr)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
    let address = |field: &str| {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        // The kernel prints the address in network byte order read as a host integer.
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip.to_ne_bytes())), u16::from_str_radix(port, 16).ok()?))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // State 01: established.
            (fields.get(3) == Some(&"01")).then(|| Some((address(fields[1])?, address(fields[2])?)))?
        })
        .collect()
}

/// With `net.outbound_ports`, every data connection a member opens comes from a port of the
/// range: the other member's data port sees only connections from those ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(target_os = "linux"), ignore = "reads Linux's /proc/net/tcp")]
async fn outbound_connections_come_from_the_configured_ports() {
    // A range of 20 ports for this process, away from the kernel's ephemeral range.
    let first_port = 20_000 + (std::process::id() % 500) as u16 * 20;
    let range = first_port..=first_port + 19;
    let cluster = TestCluster::start(1).await;
    let other = cluster.member(0);
    let mut config = test_config(other.name());
    config.net.outbound_ports = Some(format!("{}-{}", range.start(), range.end()));
    let member = start_member(config, &[other]).await;
    grapevine_tests::wait_settled(&[other, &member]).await;
    let map = member.map::<u32, u32>("ports").unwrap();
    for key in 0..200 {
        map.put(&key, &key).await.unwrap();
    }
    // Every connection to the other member's data port is the member's (nothing else talks to
    // it): each must come from the range.
    let target = other.addresses().data;
    let from: Vec<u16> = established_connections()
        .into_iter()
        .filter(|(_, remote)| *remote == target)
        .map(|(local, _)| local.port())
        .collect();
    assert!(!from.is_empty(), "the member connected to {target}");
    assert!(
        from.iter().all(|port| range.contains(port)),
        "connections to {target} from ports {from:?}, not all in {range:?}"
    );
    member.shutdown().await;
}
