//! The session store on real in-process members: records round-trip with nested JSON values,
//! `create` never overwrites, the expiry becomes the entry's time to live, bad records are errors,
//! concurrent saves from two members keep one whole record, and sessions outlive a member.

use std::collections::HashMap;
use std::time::Duration;

use grapevine_sessions::GrapevineStore;
use grapevine_tests::{TestCluster, WAIT, wait_until_async};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{Error, SessionStore};

fn record(data: &[(&str, Value)], expires_in: time::Duration) -> Record {
    let data: HashMap<String, Value> = data.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    Record { id: Id::default(), data, expiry_date: OffsetDateTime::now_utc() + expires_in }
}

fn half_an_hour() -> time::Duration {
    time::Duration::minutes(30)
}

/// The record's expiry date survives MessagePack with sub-second precision, but compare the
/// parts that matter exactly.
fn assert_same(loaded: &Record, saved: &Record) {
    assert_eq!(loaded.id, saved.id);
    assert_eq!(loaded.data, saved.data);
    assert_eq!(loaded.expiry_date, saved.expiry_date);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_nested_json_values_round_trip() {
    let cluster = TestCluster::start(1).await;
    let store = GrapevineStore::new(cluster.member(0), GrapevineStore::DEFAULT_MAP).unwrap();
    let nested = json!({
        "user": {"name": "zoë", "roles": ["admin", "ops"], "limits": {"daily": 10, "ratio": 0.25}},
        "cart": [{"sku": "a-1", "qty": 3, "tags": []}, {"sku": "b-2", "qty": null, "meta": {}}],
        "big": u64::MAX,
        "negative": i64::MIN,
        "flag": false,
        "text": "line\nbreak \u{1F600}"
    });
    let mut created =
        record(&[("profile", nested.clone()), ("counter", json!(41)), ("empty", json!({}))], half_an_hour());
    store.create(&mut created).await.unwrap();
    let loaded = store.load(&created.id).await.unwrap().expect("the created session loads");
    assert_same(&loaded, &created);
    assert_eq!(loaded.data["profile"]["user"]["limits"]["ratio"], json!(0.25));
    assert_eq!(loaded.data["profile"]["big"], json!(u64::MAX));

    let mut changed = loaded.clone();
    changed.data.insert("counter".into(), json!(42));
    changed.data.remove("empty");
    store.save(&changed).await.unwrap();
    assert_same(&store.load(&created.id).await.unwrap().unwrap(), &changed);

    store.delete(&created.id).await.unwrap();
    assert_eq!(store.load(&created.id).await.unwrap(), None);
    store.delete(&created.id).await.expect("deleting an absent session is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_never_overwrites_an_existing_session() {
    let cluster = TestCluster::start(1).await;
    let store = GrapevineStore::new(cluster.member(0), GrapevineStore::DEFAULT_MAP).unwrap();
    let existing = record(&[("user", json!("alice"))], half_an_hour());
    store.save(&existing).await.unwrap();

    // A new session that drew the same id.
    let mut colliding = record(&[("user", json!("mallory"))], half_an_hour());
    colliding.id = existing.id;
    store.create(&mut colliding).await.unwrap();
    assert_ne!(colliding.id, existing.id, "create drew a new id");
    assert_same(&store.load(&existing.id).await.unwrap().unwrap(), &existing);
    assert_same(&store.load(&colliding.id).await.unwrap().unwrap(), &colliding);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_expiry_is_the_entry_time_to_live() {
    let cluster = TestCluster::start(1).await;
    let member = cluster.member(0);
    let store = GrapevineStore::new(member, GrapevineStore::DEFAULT_MAP).unwrap();
    let raw = member.map::<String, Vec<u8>>(GrapevineStore::DEFAULT_MAP).unwrap();

    // Created and saved sessions both get the time to live: the entry itself goes away.
    let mut created = record(&[("n", json!(1))], time::Duration::milliseconds(700));
    store.create(&mut created).await.unwrap();
    let saved = record(&[("n", json!(2))], time::Duration::milliseconds(700));
    store.save(&saved).await.unwrap();
    let long = record(&[("n", json!(3))], half_an_hour());
    store.save(&long).await.unwrap();
    for r in [&created, &saved] {
        assert!(store.load(&r.id).await.unwrap().is_some(), "alive before its expiry date");
    }
    wait_until_async("the expired sessions' entries to be gone", WAIT, || async {
        !raw.contains_key(&created.id.to_string()).await.unwrap()
            && !raw.contains_key(&saved.id.to_string()).await.unwrap()
    })
    .await;
    assert_eq!(store.load(&created.id).await.unwrap(), None);
    assert!(store.load(&long.id).await.unwrap().is_some(), "a session with time left stays");

    // Saving a session whose date has passed removes it.
    let mut ended = long.clone();
    ended.expiry_date = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    store.save(&ended).await.unwrap();
    assert!(!raw.contains_key(&long.id.to_string()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_decode_is_an_error_for_that_load_only() {
    let cluster = TestCluster::start(1).await;
    let member = cluster.member(0);
    let store = GrapevineStore::new(member, GrapevineStore::DEFAULT_MAP).unwrap();
    let good = record(&[("user", json!("alice"))], half_an_hour());
    store.save(&good).await.unwrap();

    // Bytes that are not MessagePack, a value of another type, a record filed under another id.
    let bytes = member.map::<String, Vec<u8>>(GrapevineStore::DEFAULT_MAP).unwrap();
    let not_msgpack = Id::default();
    bytes.put(&not_msgpack.to_string(), &vec![0xc1, 0xff, 0x00]).await.unwrap();
    let truncated = Id::default();
    let mut encoded = rmp_serde::to_vec_named(&good).unwrap();
    encoded.truncate(encoded.len() / 2);
    bytes.put(&truncated.to_string(), &encoded).await.unwrap();
    let misfiled = Id::default();
    bytes.put(&misfiled.to_string(), &rmp_serde::to_vec_named(&good).unwrap()).await.unwrap();
    let numbers = member.map::<String, u8>(GrapevineStore::DEFAULT_MAP).unwrap();
    let wrong_type = Id::default();
    numbers.put(&wrong_type.to_string(), &7).await.unwrap();

    for id in [not_msgpack, truncated, misfiled, wrong_type] {
        match store.load(&id).await {
            Err(Error::Decode(message)) => assert!(message.contains("sessions"), "{message}"),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
    assert_same(&store.load(&good.id).await.unwrap().unwrap(), &good);
    assert_eq!(store.load(&Id::default()).await.unwrap(), None, "an unknown id is no session, not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves_from_two_members_keep_one_whole_record() {
    let cluster = TestCluster::start(2).await;
    cluster.wait_settled().await;
    let stores: Vec<GrapevineStore> =
        cluster.members.iter().map(|m| GrapevineStore::new(m, GrapevineStore::DEFAULT_MAP).unwrap()).collect();
    let mut base = record(&[("writer", json!("none"))], half_an_hour());
    stores[0].create(&mut base).await.unwrap();

    // Each member saves 50 versions of the session, with a large payload so that a mixture of
    // two records could not go unnoticed, all at once.
    let mut tasks = Vec::new();
    for (writer, store) in stores.iter().enumerate() {
        for version in 0..50 {
            let store = store.clone();
            let mut r = base.clone();
            let payload: Vec<Value> = (0..200).map(|i| json!(format!("{writer}-{version}-{i}"))).collect();
            r.data.insert("writer".into(), json!(writer));
            r.data.insert("version".into(), json!(version));
            r.data.insert("payload".into(), Value::Array(payload));
            tasks.push(tokio::spawn(async move { store.save(&r).await.map(|()| r) }));
        }
    }
    let mut saved = Vec::new();
    for task in tasks {
        saved.push(task.await.unwrap().expect("every save succeeds"));
    }
    let from_0 = stores[0].load(&base.id).await.unwrap().unwrap();
    let from_1 = stores[1].load(&base.id).await.unwrap().unwrap();
    assert_eq!(from_0, from_1, "both members read the same record");
    assert!(
        saved.contains(&from_0),
        "the record kept is one of the records saved, whole: {:?}",
        from_0.data["version"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_outlive_a_crashed_member_and_a_leaving_one() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let store = GrapevineStore::new(cluster.member(0), GrapevineStore::DEFAULT_MAP).unwrap();
    assert_eq!(store.map_config().backup_count, 1, "the default configuration keeps one backup");
    let mut sessions = Vec::new();
    for n in 0..60 {
        let mut r = record(&[("n", json!(n)), ("deep", json!({"a": [n, {"b": n}]}))], half_an_hour());
        store.create(&mut r).await.unwrap();
        sessions.push(r);
    }

    cluster.member(1).kill().await;
    let survivor = GrapevineStore::new(cluster.member(2), GrapevineStore::DEFAULT_MAP).unwrap();
    for r in &sessions {
        let loaded = survivor.load(&r.id).await.unwrap().expect("no session is lost with one crashed member");
        assert_same(&loaded, r);
    }

    cluster.member(0).shutdown().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        for r in &sessions {
            assert_same(&survivor.load(&r.id).await.unwrap().expect("nothing lost by a graceful leave"), r);
        }
    })
    .await
    .expect("loads finish");
}
