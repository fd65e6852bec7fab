//! Real members on 127.0.0.x loopback addresses, gossiping over UDP, with short timers.

use std::net::SocketAddr;
use std::time::Duration;

use grapevine_discovery::DiscoveryHandle;
use grapevine_membership::{GossipSocket, MemberEvent, MemberState, Membership, MembershipConfig, ProtocolVersion};

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    membership: Membership,
    addr: SocketAddr,
    _discovery: DiscoveryHandle,
}

async fn start_node(cluster: &str, ip: &str, seeds: &[SocketAddr], tweak: impl FnOnce(&mut MembershipConfig)) -> Node {
    let socket = GossipSocket::bind(format!("{ip}:0").parse().unwrap()).await.unwrap();
    let addr = socket.local_addr();
    let generation = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut config = MembershipConfig::new(cluster, format!("node-{ip}-{}", addr.port()), generation, addr, addr);
    config.gossip_interval = Duration::from_millis(100);
    config.probe_interval = Duration::from_millis(200);
    tweak(&mut config);
    let discovery = DiscoveryHandle::fixed(seeds.to_vec());
    let membership = Membership::start(config, socket, discovery.candidates()).await.unwrap();
    Node { membership, addr, _discovery: discovery }
}

async fn start_cluster(n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let node = start_node("test", &format!("127.0.0.{}", i + 1), &seeds, |_| {}).await;
        // Distinct generations (start times) make the age order, and so the master, predictable.
        tokio::time::sleep(Duration::from_millis(2)).await;
        nodes.push(node);
    }
    for node in &nodes {
        node.membership.join(WAIT).await;
    }
    for node in &nodes {
        node.membership.wait_for_view("all members active", WAIT, |v| v.active_members().count() == n).await.unwrap();
    }
    nodes
}

#[tokio::test]
async fn three_members_form_one_cluster_and_agree_on_the_oldest_as_master() {
    let nodes = start_cluster(3).await;
    let oldest = nodes[0].membership.local_id().clone();
    for node in &nodes {
        let view = node.membership.view();
        assert_eq!(view.len(), 3);
        assert_eq!(view.master.as_ref(), Some(&oldest));
    }
    assert!(nodes[0].membership.view().is_master());
    assert!(!nodes[1].membership.view().is_master());
}

#[tokio::test]
async fn a_member_dropped_abruptly_is_declared_dead_and_the_next_oldest_becomes_master() {
    let nodes = start_cluster(3).await;
    let mut events = nodes[1].membership.events();
    let killed = nodes[0].membership.local_id().clone();
    nodes[0].membership.kill().await;
    for node in &nodes[1..] {
        let view = node
            .membership
            .wait_for_view("the killed member to be gone", WAIT, |v| v.member(&killed).is_none())
            .await
            .unwrap();
        assert_eq!(view.master.as_ref(), Some(nodes[1].membership.local_id()));
    }
    let mut saw_dead = false;
    let mut saw_master_change = false;
    while let Ok(event) = events.try_recv() {
        match event {
            MemberEvent::Dead { member } => saw_dead |= member.id == killed,
            MemberEvent::MasterChanged { current, .. } => {
                saw_master_change |= current.as_ref() == Some(nodes[1].membership.local_id())
            }
            MemberEvent::Left { member } => panic!("{} was killed, not left", member.id),
            _ => {}
        }
    }
    assert!(saw_dead && saw_master_change);
}

#[tokio::test]
async fn a_graceful_leave_is_seen_as_left_well_before_failure_detection() {
    let nodes = start_cluster(3).await;
    let mut events = nodes[0].membership.events();
    let leaver = nodes[2].membership.local_id().clone();
    let started = std::time::Instant::now();
    nodes[2].membership.shutdown().await;
    let detection = nodes[0].membership.config().failure_detection_time();
    nodes[0]
        .membership
        .wait_for_view("the leaver to be gone", detection, |v| v.member(&leaver).is_none())
        .await
        .expect("a graceful leave must be seen before failure detection would declare the member dead");
    assert!(started.elapsed() < detection);
    let event = tokio::time::timeout(WAIT, async {
        loop {
            if let e @ (MemberEvent::Left { .. } | MemberEvent::Dead { .. }) = events.recv().await.unwrap() {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(event, MemberEvent::Left { ref member } if member.id == leaver), "{event:?}");
}

#[tokio::test]
async fn forced_handover_makes_the_target_master_until_it_leaves() {
    let nodes = start_cluster(3).await;
    let target = nodes[2].membership.local_id().clone();
    // Ask a member that is neither the master nor the target.
    nodes[1].membership.request_master_handover(&target.node_id).await.unwrap();
    for node in &nodes {
        node.membership.wait_for_view("the hand-over", WAIT, |v| v.master.as_ref() == Some(&target)).await.unwrap();
    }
    // A second hand-over, back to the oldest, asked of the current master itself.
    let oldest = nodes[0].membership.local_id().clone();
    nodes[2].membership.request_master_handover(&oldest.node_id).await.unwrap();
    for node in &nodes {
        node.membership.wait_for_view("the hand-back", WAIT, |v| v.master.as_ref() == Some(&oldest)).await.unwrap();
    }
    // Force the youngest again, then make it leave: the oldest leads again.
    nodes[0].membership.request_master_handover(&target.node_id).await.unwrap();
    nodes[0].membership.wait_for_view("the hand-over", WAIT, |v| v.master.as_ref() == Some(&target)).await.unwrap();
    nodes[2].membership.shutdown().await;
    nodes[0].membership.wait_for_view("the fallback", WAIT, |v| v.master.as_ref() == Some(&oldest)).await.unwrap();
}

#[tokio::test]
async fn handover_to_unknown_or_inactive_members_is_refused_with_the_member_list() {
    let nodes = start_cluster(2).await;
    let err = nodes[0].membership.request_master_handover("nobody").await.unwrap_err().to_string();
    assert!(err.contains("nobody") && err.contains(&*nodes[1].membership.local_id().node_id), "{err}");
}

#[tokio::test]
async fn clusters_with_different_names_listing_each_other_stay_apart() {
    let a = start_node("alpha", "127.0.0.4", &[], |_| {}).await;
    let b = start_node("beta", "127.0.0.5", &[a.addr], |_| {}).await;
    let c = start_node("alpha", "127.0.0.6", &[a.addr, b.addr], |_| {}).await;
    for n in [&a, &b, &c] {
        n.membership.join(Duration::from_millis(500)).await;
    }
    // Wait until b has contacted a and been rejected, and a noticed it, so the test proves something.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.membership.stats().foreign_cluster_peers == 0 || b.membership.stats().foreign_cluster_peers == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the members never contacted each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.membership.wait_for_view("alpha to have two members", WAIT, |v| v.len() == 2).await.unwrap();
    // Logged once per peer: a keeps a single foreign peer however many rounds pass.
    assert_eq!(a.membership.stats().foreign_cluster_peers, 1);
    assert_eq!(b.membership.view().len(), 1);
    assert!(a.membership.view().member(b.membership.local_id()).is_none());
}

#[tokio::test]
async fn a_member_with_an_incompatible_major_version_is_not_admitted() {
    let a = start_node("test", "127.0.0.7", &[], |_| {}).await;
    let b = start_node("test", "127.0.0.8", &[a.addr], |c| {
        c.protocol_version = ProtocolVersion { major: 2, minor: 0 };
    })
    .await;
    a.membership.join(Duration::from_millis(300)).await;
    b.membership.join(Duration::from_millis(300)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.membership.stats().incompatible_members == 0 || b.membership.stats().incompatible_members == 0 {
        assert!(tokio::time::Instant::now() < deadline, "neither side noticed the version mismatch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.membership.view().len(), 1);
    assert_eq!(b.membership.view().len(), 1);
    assert_eq!(a.membership.view().local_member().unwrap().state, MemberState::Active);
}

#[tokio::test]
async fn a_listed_peer_that_starts_later_is_joined_when_it_appears() {
    // Reserve an address for the late peer, then free it so the first node probes a dead address.
    let late_socket = GossipSocket::bind("127.0.0.9:0".parse().unwrap()).await.unwrap();
    let late_addr = late_socket.local_addr();
    drop(late_socket);
    let first = start_node("test", "127.0.0.10", &[late_addr], |_| {}).await;
    first.membership.join(Duration::from_millis(300)).await;
    assert_eq!(first.membership.view().len(), 1);
    let socket = GossipSocket::bind(late_addr).await.unwrap();
    let mut config = MembershipConfig::new("test", "late", 1, late_addr, late_addr);
    config.gossip_interval = Duration::from_millis(100);
    let discovery = DiscoveryHandle::fixed(vec![]);
    let late = Membership::start(config, socket, discovery.candidates()).await.unwrap();
    late.join(Duration::from_millis(100)).await;
    first.membership.wait_for_view("the late peer", WAIT, |v| v.len() == 2).await.unwrap();
    late.wait_for_view("the first node", WAIT, |v| v.len() == 2).await.unwrap();
}
