//! A writer and a reader run without pause while a member joins, another leaves gracefully and a
//! third is killed. Every operation succeeds or fails with a clear error; none fails during the
//! graceful changes; reads never go back in time; and the final content matches a model of the
//! acknowledged writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use grapevine::{DistributedMap, MapError};
use grapevine_tests::{TestCluster, start_member, test_config, wait_settled};

const KEYS: u64 = 256;

/// Per key: the last acknowledged value, and values written with an unknown outcome since.
#[derive(Debug, Default, Clone)]
struct KeyModel {
    acked: Option<u64>,
    uncertain: Vec<u64>,
}

#[derive(Debug, Default)]
struct Model {
    keys: Mutex<BTreeMap<u64, KeyModel>>,
    write_errors: Mutex<Vec<String>>,
    read_errors: Mutex<Vec<String>>,
    stale_reads: Mutex<Vec<String>>,
    writes: AtomicU64,
    reads: AtomicU64,
}

impl Model {
    fn errors(&self) -> (usize, usize) {
        (self.write_errors.lock().unwrap().len(), self.read_errors.lock().unwrap().len())
    }
}

async fn writer(map: DistributedMap<u64, u64>, model: Arc<Model>, stop: Arc<AtomicBool>) {
    let mut value = 0u64;
    while !stop.load(Ordering::Relaxed) {
        value += 1;
        let key = value % KEYS;
        match map.put(&key, &value).await {
            Ok(_) => {
                let mut keys = model.keys.lock().unwrap();
                let entry = keys.entry(key).or_default();
                entry.acked = Some(value);
                entry.uncertain.clear();
            }
            Err(error) => {
                assert_clear(&error);
                model.keys.lock().unwrap().entry(key).or_default().uncertain.push(value);
                model.write_errors.lock().unwrap().push(error.to_string());
            }
        }
        model.writes.fetch_add(1, Ordering::Relaxed);
    }
}

async fn reader(map: DistributedMap<u64, u64>, model: Arc<Model>, stop: Arc<AtomicBool>) {
    let mut key = 0u64;
    while !stop.load(Ordering::Relaxed) {
        key = (key + 7) % KEYS;
        let floor = model.keys.lock().unwrap().get(&key).and_then(|k| k.acked);
        match map.get(&key).await {
            Ok(found) => {
                if let Some(floor) = floor
                    && found.is_none_or(|v| v < floor)
                {
                    model
                        .stale_reads
                        .lock()
                        .unwrap()
                        .push(format!("key {key}: read {found:?} after {floor} was acknowledged"));
                }
            }
            Err(error) => {
                assert_clear(&error);
                model.read_errors.lock().unwrap().push(error.to_string());
            }
        }
        model.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Errors must say what happened: a known kind with a message, never a panic or a decode error.
fn assert_clear(error: &MapError) {
    assert!(
        matches!(error, MapError::Indeterminate { .. } | MapError::Failed { .. } | MapError::Timeout { .. }),
        "unexpected error kind: {error:?}"
    );
    assert!(error.to_string().len() > 20, "error message too terse: {error}");
}

async fn progress(model: &Model, writes: u64, reads: u64) {
    let (w0, r0) = (model.writes.load(Ordering::Relaxed), model.reads.load(Ordering::Relaxed));
    grapevine_tests::wait_until("the workload to make progress", grapevine_tests::WAIT, || {
        model.writes.load(Ordering::Relaxed) >= w0 + writes && model.reads.load(Ordering::Relaxed) >= r0 + reads
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_and_writes_survive_a_join_a_graceful_leave_and_a_kill() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0).clone(), cluster.member(1).clone(), cluster.member(2).clone());
    let model = Arc::new(Model::default());
    let stop = Arc::new(AtomicBool::new(false));
    let map = a.map::<u64, u64>("sessions").unwrap();
    let write_task = tokio::spawn(writer(map.clone(), model.clone(), stop.clone()));
    let read_task = tokio::spawn(reader(map.clone(), model.clone(), stop.clone()));
    progress(&model, 500, 500).await;

    // A member joins: partitions migrate to it while the workload runs.
    let d = start_member(test_config(a.name()), &[&a]).await;
    wait_settled(&[&a, &b, &c, &d]).await;
    progress(&model, 200, 200).await;
    assert_eq!(model.errors(), (0, 0), "no errors while a member joins: {:?}", model.write_errors.lock().unwrap());

    // A member leaves gracefully: it hands everything over first.
    b.shutdown().await;
    wait_settled(&[&a, &c, &d]).await;
    progress(&model, 200, 200).await;
    assert_eq!(model.errors(), (0, 0), "no errors while a member leaves: {:?}", model.write_errors.lock().unwrap());

    // A member is killed: writes in flight to it may fail with an unknown outcome.
    c.kill().await;
    wait_settled(&[&a, &d]).await;
    progress(&model, 200, 200).await;
    stop.store(true, Ordering::Relaxed);
    write_task.await.unwrap();
    read_task.await.unwrap();

    let stale = model.stale_reads.lock().unwrap().clone();
    assert!(stale.is_empty(), "reads went back in time: {stale:?}");
    let (write_errors, read_errors) = model.errors();
    eprintln!(
        "writes {} reads {}; after the kill: {write_errors} write errors, {read_errors} read errors",
        model.writes.load(Ordering::Relaxed),
        model.reads.load(Ordering::Relaxed)
    );
    assert_eq!(
        read_errors,
        0,
        "reads are retried until the new owner answers: {:?}",
        model.read_errors.lock().unwrap()
    );
    let final_model = model.keys.lock().unwrap().clone();
    for reader in [&a, &d] {
        let map = reader.map::<u64, u64>("sessions").unwrap();
        for (key, expected) in &final_model {
            let found = map.get(key).await.unwrap();
            let ok = found == expected.acked || found.is_some_and(|v| expected.uncertain.contains(&v));
            assert!(
                ok,
                "key {key}: found {found:?}, acknowledged {:?}, uncertain {:?}",
                expected.acked, expected.uncertain
            );
        }
        assert_eq!(map.len().await.unwrap(), final_model.len() as u64);
    }
}
