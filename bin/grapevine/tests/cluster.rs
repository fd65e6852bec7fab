//! Multi-process clusters: real `grapevine start` processes on 127.0.0.1 that find each other,
//! agree on members and master, survive a crash and a graceful leave, and hand the master over.

mod common;

use std::time::Duration;

use common::*;

/// The only test that uses the default ports (5701/5801 and up): every default-port scenario
/// lives in this one function so that they never run concurrently.
#[test]
fn three_members_on_default_ports_form_a_cluster_survive_a_crash_and_a_leave() {
    let cluster = format!("defaults-{}", std::process::id());
    let args = ["start", "--cluster-name", &cluster, "--members", "127.0.0.1"];
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::spawn(&format!("node{i}"), &args, FAST_TIMERS)).collect();
    let ports: Vec<u16> = nodes.iter_mut().map(Node::admin_port).collect();
    let (master, ids) = wait_for_agreement(&ports, 3);
    assert!(ids.contains(&master));

    // Every member answers the same through clusterstats, as tables too.
    let out = run(&["clusterstats", "--node", &format!("127.0.0.1:{}", ports[0])], &[]);
    assert!(out.status.success(), "{}", clean_stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for section in ["CLUSTER", "THIS NODE", "MEMBERS", &cluster, "Members            3 (3 active)"] {
        assert!(text.contains(section), "{section:?} in\n{text}");
    }
    for id in &ids {
        assert!(text.contains(id.as_str()), "{id} in\n{text}");
    }

    // Metrics and health of a member.
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{}/metrics", ports[1])).unwrap();
    assert_eq!(status, 200);
    let members_line = metrics.lines().find(|l| l.starts_with("grapevine_members{")).unwrap();
    assert!(members_line.contains(&format!("cluster=\"{cluster}\"")) && members_line.ends_with(" 3"), "{metrics}");
    // Members agree on the master before they all hold its partition table: wait for it.
    let health = format!("http://127.0.0.1:{}/health", ports[2]);
    wait_until("/health to answer 200", WAIT, || http_get(&health).filter(|(status, _)| *status == 200));

    // A crash (SIGKILL) of the master: the other two see it dead and agree on a new master.
    let index_of = |stats_master: &str, ports: &[u16]| {
        ports.iter().position(|p| clusterstats(*p).is_some_and(|s| s["node_id"] == stats_master)).unwrap()
    };
    let crashed = index_of(&master, &ports);
    nodes[crashed].signal("KILL");
    nodes[crashed].wait_exit(WAIT);
    let mut nodes: Vec<Node> = nodes.into_iter().enumerate().filter(|(i, _)| *i != crashed).map(|(_, n)| n).collect();
    let ports: Vec<u16> = ports.into_iter().enumerate().filter(|(i, _)| *i != crashed).map(|(_, p)| p).collect();
    let (new_master, ids) = wait_for_agreement(&ports, 2);
    assert!(!ids.contains(&master) && new_master != master, "{new_master} {ids:?}");

    // A graceful leave (SIGTERM): exits 0, and the last member sees itself alone at once.
    nodes[0].signal("TERM");
    let status = nodes[0].wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{}", nodes[0].log());
    assert!(nodes[0].log().contains("stopped"));
    let (alone_master, ids) = wait_for_agreement(&ports[1..], 1);
    assert_eq!(ids, vec![alone_master]);

    nodes[1].signal("INT");
    assert_eq!(nodes[1].wait_exit(WAIT).code(), Some(0));
}

/// Three members on their own ports; `grapevine master --handover-to` moves the master, as every
/// member's clusterstats shows; errors are one line and exit 1.
#[test]
fn master_handover_through_the_cli() {
    let cluster = format!("handover-{}", std::process::id());
    let (nodes, ports) = start_three(&cluster, "h", 27100, 28100, FAST_TIMERS);
    assert_eq!(ports, vec![28101, 28102, 28103]);
    let (master, ids) = wait_for_agreement(&ports, 3);
    assert_eq!(ids, vec!["h1", "h2", "h3"]);

    // Ask a member that is neither the master nor the target.
    let target = ids.iter().find(|id| **id != master).unwrap().clone();
    let via = ids.iter().position(|id| *id != master && *id != target).unwrap();
    let node = format!("127.0.0.1:{}", ports[via]);
    let out = run(&["master", "--node", &node, "--handover-to", &target], &[]);
    assert!(out.status.success(), "{}", clean_stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("master is now {target}")));
    wait_until("every member to see the new master", WAIT, || {
        ports.iter().all(|p| clusterstats(*p).is_some_and(|s| s["master"] == target.as_str())).then_some(())
    });
    let (now, _) = wait_for_agreement(&ports, 3);
    assert_eq!(now, target);

    // An unknown node id: one line that lists the members, exit 1.
    let out = run(&["master", "--node", &node, "--handover-to", "nobody"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = clean_stderr(&out);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("nobody") && stderr.contains("h1") && stderr.contains("h3"), "{stderr}");

    // The admin API itself: a bad body is 400 with a JSON error.
    let (status, body) = post(&format!("http://{node}/master/handover"), "{\"node\": 1}");
    assert_eq!(status, 400, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());
    drop(nodes);
}

fn post(url: &str, body: &str) -> (u16, String) {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .proxy(None)
        .build();
    let mut response = ureq::Agent::new_with_config(config).post(url).send(body).unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

/// A second signal during a graceful shutdown stops at once: exit status 128 + signal number.
#[test]
fn a_second_signal_stops_at_once() {
    let args =
        ["start", "--cluster-name", "signals", "--bind", "127.0.0.1", "--port", "27111", "--admin-port", "28111"];
    // A 1 s gossip interval: the graceful leave gossips for one more interval, time enough to
    // send the second signal.
    let env = [("GRAPEVINE_PORT_AUTO_INCREMENT", "false"), ("GRAPEVINE_GOSSIP__INTERVAL_MS", "1000")];
    let mut node = Node::spawn("signals", &args, &env);
    node.wait_for_log("grapevine node running");
    node.signal("TERM");
    node.wait_for_log("leaving the cluster gracefully");
    node.signal("INT");
    let status = node.wait_exit(WAIT);
    assert_eq!(status.code(), Some(130), "{}", node.log());
    assert!(node.log().contains("received SIGINT during shutdown; stopping at once"), "{}", node.log());
}
