//! Fuzzing of what every member decodes from its peers, as property tests: the map service's
//! `Msg` and `Reply` through `grapevine_net::codec` (valid messages of every variant, encoded,
//! mutated, decoded; and random bytes), and the table id published in gossip. Decoding must give
//! a value or an error, quickly and within its memory limit, never panic or abort. Case counts:
//! see `fuzz_support` (`GRAPEVINE_FUZZ_CASES`, `scripts/fuzz.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::codec;
use proptest::prelude::*;

use crate::invalidation::{InvMsg, InvReply, Run as InvalidationRun};
use crate::merge::MergePolicy;
use crate::messages::{
    EntryEventKind, LocalMapStats, LocalStats, MigrationId, Msg, MultiOp, Op, OpResult, PutMode, RawEntryEvent, ReplOp,
    Reply, TermStart,
};
use crate::near_cache::NearCacheStats;
use crate::record::{Expiry, Record};
use crate::ring::RingWrite;
use crate::table::{PartitionTable, Run, TableId};
use crate::tables::{parse_gossip_value, table_gossip_value};
use fuzz_support::{config, mutated, mutations, random_bytes};

#[path = "../../net/src/fuzz_support.rs"]
mod fuzz_support;

// ---------------------------------------------------------------------------------------------
// Strategies for every message type

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z0-9_.-]{0,12}", 1 => "\\PC{0,16}"]
}

fn member() -> impl Strategy<Value = MemberId> {
    ("[a-z0-9@.-]{1,12}", any::<u64>()).prop_map(|(node, generation)| MemberId { generation, node_id: Arc::from(node) })
}

fn members(max: usize) -> impl Strategy<Value = Vec<MemberId>> {
    prop::collection::vec(member(), 0..max)
}

fn table_id() -> impl Strategy<Value = TableId> {
    (any::<u64>(), prop::option::of(member())).prop_map(|(epoch, publisher)| TableId { epoch, publisher })
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        any::<u32>().prop_map(|ms| Duration::from_millis(ms.into())),
    ]
}

fn expiry() -> impl Strategy<Value = Expiry> {
    (prop::option::of(duration()), prop::option::of(duration())).prop_map(|(ttl, max_idle)| Expiry { ttl, max_idle })
}

fn record() -> impl Strategy<Value = Record> {
    (bytes(48), any::<[u64; 7]>()).prop_map(|(value, f)| Record {
        value,
        created_ms: f[0],
        updated_ms: f[1],
        accessed_ms: f[2],
        hits: f[3],
        version: f[4],
        ttl_ms: f[5],
        max_idle_ms: f[6],
    })
}

fn put_mode() -> impl Strategy<Value = PutMode> {
    prop_oneof![Just(PutMode::Always), Just(PutMode::IfAbsent), Just(PutMode::IfPresent)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        bytes(32).prop_map(|key| Op::Get { key }),
        bytes(32).prop_map(|key| Op::ContainsKey { key }),
        (bytes(32), bytes(64), prop::option::of(expiry()), put_mode()).prop_map(|(key, value, expiry, mode)| Op::Put {
            key,
            value,
            expiry,
            mode
        }),
        (bytes(32), prop::option::of(bytes(32)), prop::option::of(bytes(32)))
            .prop_map(|(key, expected, new)| Op::CompareAndSet { key, expected, new }),
        bytes(32).prop_map(|key| Op::Remove { key }),
        (
            bytes(32),
            record(),
            prop::sample::select(MergePolicy::ALL.to_vec()),
            prop::option::of(any::<u64>()),
            any::<bool>()
        )
            .prop_map(|(key, record, policy, healed_ms, restore)| Op::Merge {
                key,
                record,
                policy,
                offer: crate::merge::Offer { healed_ms, restore }
            }),
        bytes(32).prop_map(|key| Op::NearGet { key }),
        (bytes(16), bytes(64), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(key, item, capacity, retention_ms, overwrite)| Op::RingAppend {
                key,
                item,
                capacity,
                retention_ms,
                overwrite
            }
        ),
        (bytes(16), any::<u64>(), any::<u32>(), any::<u32>())
            .prop_map(|(key, from, max_items, max_bytes)| Op::RingRead { key, from, max_items, max_bytes }),
    ]
}

fn repl_op() -> impl Strategy<Value = ReplOp> {
    prop_oneof![
        (bytes(32), record()).prop_map(|(key, record)| ReplOp::Put { key, record }),
        bytes(32).prop_map(|key| ReplOp::Remove { key }),
        bytes(32).prop_map(|key| ReplOp::Expire { key }),
        Just(ReplOp::Clear),
        prop::collection::vec(
            prop_oneof![
                (bytes(16), record()).prop_map(|(key, record)| RingWrite::Put { key, record }),
                bytes(16).prop_map(|key| RingWrite::Remove { key }),
            ],
            0..4
        )
        .prop_map(ReplOp::Batch),
    ]
}

fn multi_op() -> impl Strategy<Value = MultiOp> {
    prop_oneof![Just(MultiOp::Count), Just(MultiOp::Clear)]
}

fn table() -> impl Strategy<Value = PartitionTable> {
    let run =
        || (member(), any::<u64>(), any::<u64>()).prop_map(|(publisher, first, last)| Run { publisher, first, last });
    (
        any::<u64>(),
        prop::option::of(member()),
        prop::collection::vec(members(4), 0..6),
        prop::collection::vec(table_id(), 0..6),
        prop::collection::vec(run(), 0..4),
        prop::collection::vec(table_id(), 0..4),
        prop::collection::vec(run(), 0..3),
    )
        .prop_map(|(epoch, master, rows, terms, history, superseded, forks)| PartitionTable {
            epoch,
            master,
            rows,
            terms,
            history,
            superseded,
            forks,
        })
}

fn migration_id() -> impl Strategy<Value = MigrationId> {
    (member(), any::<u64>()).prop_map(|(master, n)| MigrationId { master, n })
}

fn event() -> impl Strategy<Value = RawEntryEvent> {
    let kind = prop_oneof![
        Just(EntryEventKind::Added),
        Just(EntryEventKind::Updated),
        Just(EntryEventKind::Removed),
        Just(EntryEventKind::Expired)
    ];
    (name(), kind, bytes(16), prop::option::of(bytes(16)), prop::option::of(bytes(16)))
        .prop_map(|(map, kind, key, value, old_value)| RawEntryEvent { map, kind, key, value, old_value })
}

fn local_stats() -> impl Strategy<Value = LocalStats> {
    let map = (name(), any::<[u64; 13]>(), any::<(u8, u8, u32)>(), name()).prop_map(
        |(name, f, (backup_count, async_backup_count, min_cluster_size), merge_policy)| LocalMapStats {
            name,
            owned_entries: f[0],
            backup_entries: f[1],
            hits: f[2],
            gets: f[3],
            puts: f[4],
            removes: f[5],
            get_p99_us: f[6],
            put_p99_us: f[7],
            memory_bytes: f[8],
            backup_count,
            async_backup_count,
            under_replicated_partitions: f[9],
            under_replicated_writes: f[10],
            merge_kept_existing: f[11],
            merge_took_merging: f[12],
            merge_policy,
            min_cluster_size,
        },
    );
    (name(), any::<(u64, u32, u32, u64)>(), prop::collection::vec(map, 0..3)).prop_map(
        |(node_id, (epoch, owned_partitions, backup_partitions, partitions_lost), maps)| LocalStats {
            node_id,
            epoch,
            owned_partitions,
            backup_partitions,
            partitions_lost,
            maps,
        },
    )
}

/// Every variant of `Msg`.
fn msg() -> impl Strategy<Value = Msg> {
    let term_start =
        (any::<u32>(), table_id(), prop::option::of(prop::collection::vec((name(), table_id(), any::<u64>()), 0..3)))
            .prop_map(|(partition, term, bases)| TermStart { partition, term, bases });
    prop_oneof![
        (any::<u64>(), any::<u32>(), name(), op())
            .prop_map(|(epoch, partition, map, op)| Msg::Op { epoch, partition, map, op })
            .boxed(),
        (any::<u64>(), name(), prop::collection::vec(any::<u32>(), 0..8), multi_op())
            .prop_map(|(epoch, map, partitions, op)| Msg::Multi { epoch, map, partitions, op })
            .boxed(),
        (any::<u64>(), any::<u32>(), name(), prop::option::of(bytes(16)), any::<u32>())
            .prop_map(|(epoch, partition, map, after, limit)| Msg::Page { epoch, partition, map, after, limit })
            .boxed(),
        (any::<u32>(), table_id(), name(), any::<u64>(), repl_op())
            .prop_map(|(partition, term, map, seq, op)| Msg::Backup { partition, term, map, seq, op })
            .boxed(),
        (table_id(), prop::collection::vec(term_start, 0..3))
            .prop_map(|(table, starts)| Msg::TermStart { table, starts })
            .boxed(),
        (
            (any::<u32>(), table_id(), name(), any::<u64>()),
            (any::<u32>(), any::<u64>(), prop::option::of(any::<u64>())),
            prop::collection::vec((bytes(16), record()), 0..4),
            (prop::collection::vec((bytes(16), any::<u64>()), 0..4), prop::option::of(any::<u64>())),
        )
            .prop_map(|((partition, term, map, copy), (chunk, start_seq, end), entries, (removed, cleared_ms))| {
                Msg::Copy {
                    partition,
                    term,
                    map,
                    copy,
                    chunk,
                    start_seq,
                    end,
                    entries,
                    removals: crate::store::Removals { removed, cleared_ms },
                }
            })
            .boxed(),
        (any::<u32>(), name()).prop_map(|(partition, map)| Msg::SyncRequest { partition, map }).boxed(),
        prop::collection::vec((any::<u32>(), table_id(), name(), any::<u64>()), 0..4)
            .prop_map(|versions| Msg::VersionCheck { versions })
            .boxed(),
        table().prop_map(|table| Msg::TablePush { table }).boxed(),
        Just(Msg::TableGet).boxed(),
        (migration_id(), table_id(), any::<u32>(), members(4), members(4))
            .prop_map(|(id, table, partition, old_row, new_row)| Msg::MigrateStart {
                id,
                table,
                partition,
                old_row,
                new_row
            })
            .boxed(),
        (migration_id(), any::<u32>()).prop_map(|(id, partition)| Msg::MigrateAbort { id, partition }).boxed(),
        prop::collection::vec(event(), 0..4).prop_map(|events| Msg::Events { events }).boxed(),
        Just(Msg::Stats).boxed(),
        (table_id(), any::<u32>(), any::<u8>())
            .prop_map(|(table, partition, lost_replicas)| Msg::PartitionLost { table, partition, lost_replicas })
            .boxed(),
        (any::<u32>(), table_id(), name(), prop::option::of(bytes(16)))
            .prop_map(|(partition, term, map, after)| Msg::Pull { partition, term, map, after })
            .boxed(),
    ]
}

/// Every variant of `Reply` (`Started` nests replies).
fn reply() -> impl Strategy<Value = Reply> {
    let op_result =
        prop_oneof![
            prop::option::of(bytes(32)).prop_map(OpResult::Value),
            any::<bool>().prop_map(OpResult::Flag),
            (prop::option::of(bytes(32)), table_id(), any::<u64>())
                .prop_map(|(value, term, seq)| OpResult::Positioned { value, term, seq }),
            any::<u64>().prop_map(|seq| OpResult::RingStored { seq }),
            any::<u64>().prop_map(|retry_in_ms| OpResult::RingFull { retry_in_ms }),
            (any::<u64>(), any::<u64>(), prop::collection::vec((any::<u64>(), bytes(16)), 0..4))
                .prop_map(|(head, next, items)| OpResult::RingItems { head, next, items }),
        ];
    let leaf = prop_oneof![
        op_result.prop_map(Reply::Done).boxed(),
        any::<u64>().prop_map(|epoch| Reply::WrongOwner { epoch }).boxed(),
        name().prop_map(|reason| Reply::Retry { reason }).boxed(),
        name().prop_map(|error| Reply::Failed { error }).boxed(),
        Just(Reply::Ack).boxed(),
        (table_id(), any::<u64>()).prop_map(|(term, seq)| Reply::NeedSync { term, seq }).boxed(),
        (table_id(), table_id()).prop_map(|(table, term)| Reply::Fenced { table, term }).boxed(),
        table_id().prop_map(|table| Reply::NotYet { table }).boxed(),
        Just(Reply::Staging).boxed(),
        (prop::collection::vec(any::<(u32, u64)>(), 0..4), prop::collection::vec(any::<u32>(), 0..4))
            .prop_map(|(done, not_owner)| Reply::Multi { done, not_owner })
            .boxed(),
        (prop::collection::vec((bytes(16), bytes(32)), 0..4), prop::option::of(bytes(16)))
            .prop_map(|(entries, next)| Reply::Page { entries, next })
            .boxed(),
        (
            prop::collection::vec((any::<u32>(), name()), 0..4),
            prop::collection::vec(any::<u32>(), 0..4),
            any::<bool>(),
            table_id()
        )
            .prop_map(|(behind, fenced, not_yet, table)| Reply::Versions { behind, fenced, not_yet, table })
            .boxed(),
        (prop::collection::vec((bytes(16), record()), 0..4), prop::option::of(bytes(16)), table_id(), any::<u64>())
            .prop_map(|(entries, next, term, seq)| Reply::Pulled { entries, next, term, seq })
            .boxed(),
        (
            table(),
            prop::collection::vec(table_id(), 0..4),
            prop::collection::vec(table_id(), 0..4),
            prop::option::of(member())
        )
            .prop_map(|(table, seen, refused, follows)| Reply::Table { table, seen, refused, follows })
            .boxed(),
        table_id().prop_map(|table| Reply::TableAck { table }).boxed(),
        migration_id().prop_map(|id| Reply::MigrateReady { id }).boxed(),
        local_stats().prop_map(Reply::Stats).boxed(),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        (
            prop::collection::vec((any::<u32>(), inner.prop_map(Box::new)), 0..3),
            prop::collection::vec((any::<u32>(), name(), table_id(), any::<u64>()), 0..3),
        )
            .prop_map(|(refused, positions)| Reply::Started { refused, positions })
    })
}

/// Every variant of the invalidation bus's messages and replies.
fn inv_msg() -> impl Strategy<Value = InvMsg> {
    let run =
        (name(), any::<u32>(), table_id(), any::<u64>(), prop::collection::vec(prop::option::of(bytes(16)), 0..4))
            .prop_map(|(map, partition, term, seq, keys)| InvalidationRun { map, partition, term, seq, keys });
    prop_oneof![
        name().prop_map(|map| InvMsg::Register { map }),
        prop::collection::vec(run, 0..4).prop_map(|runs| InvMsg::Events { runs }),
        Just(InvMsg::Stats),
    ]
}

fn inv_reply() -> impl Strategy<Value = InvReply> {
    let stats = (name(), any::<[u64; 5]>()).prop_map(|(map, f)| NearCacheStats {
        map,
        entries: f[0],
        hits: f[1],
        misses: f[2],
        invalidations: f[3],
        purges: f[4],
    });
    prop_oneof![
        Just(InvReply::Ack),
        prop::collection::vec(stats, 0..3).prop_map(InvReply::Stats),
        name().prop_map(|error| InvReply::Failed { error }),
    ]
}

fn decode_invalidations(bytes: &[u8]) {
    let started = Instant::now();
    if let Ok(msg) = codec::decode::<InvMsg>(bytes) {
        assert_eq!(codec::decode::<InvMsg>(&codec::encode(&msg).unwrap()).unwrap(), msg);
    }
    if let Ok(reply) = codec::decode::<InvReply>(bytes) {
        assert_eq!(codec::decode::<InvReply>(&codec::encode(&reply).unwrap()).unwrap(), reply);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "decoding {} bytes took {:?}", bytes.len(), started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Decodes `bytes` as a message and as a reply: each gives a value or an error, quickly, and a
/// value re-encodes to a message that decodes to the same value.
fn decode_both(bytes: &[u8]) {
    let started = Instant::now();
    if let Ok(msg) = codec::decode::<Msg>(bytes) {
        let again = codec::encode(&msg).unwrap();
        assert_eq!(codec::encode(&codec::decode::<Msg>(&again).unwrap()).unwrap(), again);
    }
    if let Ok(reply) = codec::decode::<Reply>(bytes) {
        let again = codec::encode(&reply).unwrap();
        assert_eq!(codec::encode(&codec::decode::<Reply>(&again).unwrap()).unwrap(), again);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "decoding {} bytes took {:?}", bytes.len(), started.elapsed());
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn messages_round_trip(msg in msg(), reply in reply()) {
        let bytes = codec::encode(&msg).unwrap();
        prop_assert_eq!(codec::encode(&codec::decode::<Msg>(&bytes).unwrap()).unwrap(), bytes);
        let bytes = codec::encode(&reply).unwrap();
        prop_assert_eq!(codec::encode(&codec::decode::<Reply>(&bytes).unwrap()).unwrap(), bytes);
    }

    #[test]
    fn mutated_messages(msg in msg(), mutations in mutations()) {
        decode_both(&mutated(&codec::encode(&msg).unwrap(), &mutations));
    }

    #[test]
    fn mutated_replies(reply in reply(), mutations in mutations()) {
        decode_both(&mutated(&codec::encode(&reply).unwrap(), &mutations));
    }

    #[test]
    fn random_bytes_as_messages(bytes in random_bytes(), variant in 0u8..20) {
        // Half the inputs start with a valid variant index, so that the fields behind it are reached.
        decode_both(&bytes);
        decode_both(&[&[variant][..], &bytes].concat());
    }

    #[test]
    fn invalidation_messages(msg in inv_msg(), reply in inv_reply(), mutations in mutations(), noise in random_bytes()) {
        prop_assert_eq!(codec::decode::<InvMsg>(&codec::encode(&msg).unwrap()).unwrap(), msg.clone());
        prop_assert_eq!(codec::decode::<InvReply>(&codec::encode(&reply).unwrap()).unwrap(), reply.clone());
        decode_invalidations(&mutated(&codec::encode(&msg).unwrap(), &mutations));
        decode_invalidations(&mutated(&codec::encode(&reply).unwrap(), &mutations));
        decode_invalidations(&noise);
    }

    #[test]
    fn gossip_table_ids(text in "\\PC{0,40}", spaced in "[0-9]{0,21} [a-z@0-9-]{0,12}", id in table_id()) {
        for value in [&text, &spaced] {
            if let Some(parsed) = parse_gossip_value(value) {
                prop_assert!(parsed.publisher.as_ref().is_none_or(|p| !p.node_id.is_empty() && p.node_id.len() <= 1024));
            }
        }
        let mut table = PartitionTable::empty(1);
        table.epoch = id.epoch;
        table.master = id.publisher.clone();
        prop_assert_eq!(parse_gossip_value(&table_gossip_value(&table)), Some(id));
    }
}

/// Peak virtual memory of this process, in bytes (Linux).
fn vm_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Issue 7: a `Msg::Op` whose map-name length prefix announces 2^44 bytes, 21 bytes in all,
/// aborted a member (bincode allocated the announced length). It must fail at once, and no
/// announced length, in any length field of a small message, may make decoding reserve memory
/// (the process's peak virtual size would jump by gigabytes).
#[test]
fn announced_lengths_the_input_cannot_back_fail_fast() {
    // Op variant, epoch 2^40 (a 9-byte varint), partition 7, then the map name: 2^44 bytes announced.
    let mut bytes = vec![0u8, 0xfd];
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bytes.push(7);
    bytes.push(0xfd);
    bytes.extend_from_slice(&(1u64 << 44).to_le_bytes());
    bytes.push(b'm');
    assert_eq!(bytes.len(), 21);
    let peak_before = vm_peak();
    let started = Instant::now();
    let err = codec::decode::<Msg>(&bytes).unwrap_err().to_string();
    assert!(err.contains("Msg"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());

    // The same for every length field of messages of every kind: a huge varint length inserted
    // at every position of a few valid messages.
    let samples: Vec<Vec<u8>> = [
        codec::encode(&Msg::Op {
            epoch: 3,
            partition: 1,
            map: "sessions".into(),
            op: Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                expiry: Some(Expiry::never()),
                mode: PutMode::Always,
            },
        }),
        codec::encode(&Msg::Copy {
            partition: 2,
            term: TableId { epoch: 4, publisher: Some(MemberId::new("a", 1)) },
            map: "m".into(),
            copy: 1,
            chunk: 0,
            start_seq: 9,
            end: Some(10),
            entries: vec![(b"k".to_vec(), Record::written(b"v".to_vec(), 1, Expiry::default(), None))],
            removals: crate::store::Removals { removed: vec![(b"gone".to_vec(), 7)], cleared_ms: None },
        }),
        codec::encode(&Msg::TablePush { table: PartitionTable::empty(3) }),
        codec::encode(&Reply::Page { entries: vec![(b"k".to_vec(), b"v".to_vec())], next: Some(b"k".to_vec()) }),
        codec::encode(&Msg::Backup {
            partition: 1,
            term: TableId::empty(),
            map: "__topic:t".into(),
            seq: 3,
            op: ReplOp::Batch(vec![RingWrite::Remove { key: vec![0; 8] }]),
        }),
        codec::encode(&Reply::Done(OpResult::RingItems { head: 1, next: 2, items: vec![(1, b"m".to_vec())] })),
        codec::encode(&InvMsg::Events {
            runs: vec![InvalidationRun {
                map: "m".into(),
                partition: 4,
                term: TableId::empty(),
                seq: 9,
                keys: vec![Some(b"k".to_vec()), None],
            }],
        }),
    ]
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for sample in &samples {
        for at in 0..=sample.len() {
            for n in [1u64 << 44, 1 << 36, 1 << 32, u64::MAX] {
                let mut bytes = sample.clone();
                bytes.splice(at..at, [&[0xfd][..], &n.to_le_bytes()].concat());
                let started = Instant::now();
                let _ = codec::decode::<Msg>(&bytes);
                let _ = codec::decode::<Reply>(&bytes);
                let _ = codec::decode::<InvMsg>(&bytes);
                assert!(started.elapsed() < Duration::from_secs(1), "{bytes:02x?} took {:?}", started.elapsed());
            }
        }
    }
    if let (Some(before), Some(after)) = (peak_before, vm_peak()) {
        // Other tests of this binary run meanwhile: their threads' stacks and allocator arenas
        // reserve up to about a gigabyte. A decoder reserving what was announced would add 4 GiB
        // at least.
        assert!(after.saturating_sub(before) < 3 << 30, "peak virtual memory grew by {} MiB", (after - before) >> 20);
    }
}
