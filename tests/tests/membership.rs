//! Cluster formation, failure detection, leave, master fail-over and hand-over, through the
//! embedding API (`grapevine::Cluster`), with real members on loopback addresses.

use grapevine::{MemberEvent, MemberState, ProtocolVersion};
use grapevine_tests::{TestCluster, WAIT, start_member_with, test_config, wait_until, wait_until_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_form_one_cluster_and_agree_on_the_master() {
    let cluster = TestCluster::start(3).await;
    let oldest = cluster.member(0).local().clone();
    for member in &cluster.members {
        assert_eq!(member.view().master.as_ref(), Some(&oldest));
        // Agreeing on the master comes before holding its partition table.
        wait_until("the member to be healthy", WAIT, || member.health().healthy).await;
        let stats = member.stats().await;
        assert_eq!(stats.members.len(), 3);
        assert_eq!(stats.master.as_deref(), Some(&*oldest.node_id));
        assert_eq!(stats.members.iter().filter(|m| m.is_master).count(), 1);
    }
    assert!(cluster.member(0).is_master() && !cluster.member(1).is_master());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dropped_abruptly_is_declared_dead_and_the_master_fails_over() {
    let cluster = TestCluster::start(3).await;
    let mut events = cluster.member(2).events();
    let master = cluster.member(0).local().clone();
    cluster.member(0).kill().await;
    for member in &cluster.members[1..] {
        wait_until("the killed master to be removed", WAIT, || member.view().member(&master).is_none()).await;
    }
    let next = cluster.member(1).local().clone();
    wait_until("the next oldest to be master", WAIT, || {
        cluster.members[1..].iter().all(|m| m.view().master.as_ref() == Some(&next))
    })
    .await;
    let mut dead = false;
    while let Ok(event) = events.try_recv() {
        dead |= matches!(event, MemberEvent::Dead { member } if member.id == master);
    }
    assert!(dead, "the killed member must be reported dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_is_seen_as_left() {
    let cluster = TestCluster::start(3).await;
    let mut events = cluster.member(0).events();
    let leaver = cluster.member(1).local().clone();
    cluster.member(1).shutdown().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_handover_moves_the_master_and_singleton_work_follows_it() {
    let cluster = TestCluster::start(3).await;
    let runs: Vec<_> = cluster
        .members
        .iter()
        .map(|member| {
            let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = running.clone();
            let task = member.run_while_master("indexer", move |cancel| {
                let flag = flag.clone();
                async move {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    cancel.cancelled().await;
                    flag.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            });
            (running, task)
        })
        .collect();
    let running = |i: usize| runs[i].0.load(std::sync::atomic::Ordering::SeqCst);
    wait_until("the singleton to run on the oldest member", WAIT, || running(0) && !running(1) && !running(2)).await;
    let target = cluster.member(2).local().node_id.to_string();
    cluster.member(1).handover_master(&target, WAIT).await.unwrap();
    wait_until("the singleton to move to the new master", WAIT, || !running(0) && !running(1) && running(2)).await;
    for member in &cluster.members {
        wait_until("every member to agree", WAIT, || member.view().master.as_ref() == Some(cluster.member(2).local()))
            .await;
    }
    let last = runs[2].0.clone();
    for (_, task) in runs {
        task.stop().await;
    }
    assert!(!last.load(std::sync::atomic::Ordering::SeqCst), "stopping the supervisor stops the task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_with_different_names_that_list_each_other_stay_apart() {
    let a = start_member_with(&[], |b| b.config(test_config("alpha"))).await;
    let b = start_member_with(&[&a], |b| b.config(test_config("beta"))).await;
    let c = start_member_with(&[&a, &b], |b| b.config(test_config("alpha"))).await;
    wait_until("alpha to have two members", WAIT, || a.view().len() == 2 && c.view().len() == 2).await;
    wait_until_async("both sides to notice the foreign cluster", WAIT, || async {
        a.stats().await.gossip.foreign_cluster_peers > 0 && b.stats().await.gossip.foreign_cluster_peers > 0
    })
    .await;
    assert_eq!(b.view().len(), 1);
    assert!(a.view().member(b.local()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_major_protocol_version_is_not_admitted() {
    let a = start_member_with(&[], |b| b.config(test_config("versions"))).await;
    let b = start_member_with(&[&a], |b| {
        b.config(test_config("versions")).protocol_version_for_tests(ProtocolVersion { major: 9, minor: 0 })
    })
    .await;
    wait_until_async("both sides to refuse each other", WAIT, || async {
        a.stats().await.gossip.incompatible_members > 0 && b.stats().await.gossip.incompatible_members > 0
    })
    .await;
    assert_eq!(a.view().len(), 1);
    assert_eq!(b.view().len(), 1);
    assert_eq!(b.health().state, MemberState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_with_no_configuration_is_a_healthy_cluster_of_one() {
    let mut config = test_config("solo");
    config.members.clear();
    let solo = start_member_with(&[], |b| b.config(config)).await;
    assert!(solo.health().healthy);
    assert!(solo.is_master());
    assert_eq!(solo.view().len(), 1);
}
