//! Fuzzing of what a member decodes from its peers on the topic service, as property tests:
//! `TopicMsg`, `TopicReply` and the message `Envelope` through `grapevine_net::codec` (valid
//! messages of every variant, encoded, mutated, decoded; and random bytes). Decoding must give a
//! value or an error, quickly and within its memory limit, never panic. Case counts: see
//! `fuzz_support` (`GRAPEVINE_FUZZ_CASES`, `scripts/fuzz.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::codec;
use proptest::prelude::*;

use crate::TopicStats;
use crate::messages::{Envelope, TopicKind, TopicMsg, TopicReply};
use fuzz_support::{config, mutated, mutations, random_bytes};

#[path = "../../net/src/fuzz_support.rs"]
mod fuzz_support;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z0-9_.-]{0,12}", 1 => "\\PC{0,16}"]
}

fn member() -> impl Strategy<Value = MemberId> {
    ("[a-z0-9@.-]{1,12}", any::<u64>()).prop_map(|(node, generation)| MemberId { generation, node_id: Arc::from(node) })
}

fn kind() -> impl Strategy<Value = TopicKind> {
    prop_oneof![Just(TopicKind::Plain), Just(TopicKind::Reliable)]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (member(), any::<u64>(), bytes(64)).prop_map(|(publisher, publish_time_ms, payload)| Envelope {
        publisher,
        publish_time_ms,
        payload,
    })
}

fn msg() -> impl Strategy<Value = TopicMsg> {
    prop_oneof![
        (name(), envelope()).prop_map(|(topic, e)| TopicMsg::Publish { topic, envelope: codec::encode(&e).unwrap() }),
        (name(), bytes(64)).prop_map(|(topic, envelope)| TopicMsg::Publish { topic, envelope }),
        (name(), any::<u64>(), envelope()).prop_map(|(topic, seq, e)| TopicMsg::Stored {
            topic,
            seq,
            envelope: codec::encode(&e).unwrap()
        }),
        (kind(), name()).prop_map(|(kind, topic)| TopicMsg::Subscribe { kind, topic }),
        (kind(), name()).prop_map(|(kind, topic)| TopicMsg::Unsubscribe { kind, topic }),
        Just(TopicMsg::Stats),
    ]
}

fn reply() -> impl Strategy<Value = TopicReply> {
    let stats = (name(), name(), any::<[u64; 6]>()).prop_map(|(name, kind, f)| TopicStats {
        name,
        kind,
        published: f[0],
        received: f[1],
        subscribers: f[2],
        dropped: f[3],
        lost: f[4],
        malformed: f[5],
    });
    prop_oneof![
        Just(TopicReply::Ack),
        prop::collection::vec(stats, 0..4).prop_map(TopicReply::Stats),
        name().prop_map(|error| TopicReply::Failed { error }),
    ]
}

/// Decodes `bytes` as every topic type: each gives a value or an error, quickly, and a value
/// re-encodes to bytes that decode to the same value.
fn decode_all(bytes: &[u8]) {
    let started = Instant::now();
    if let Ok(msg) = codec::decode::<TopicMsg>(bytes) {
        let again = codec::encode(&msg).unwrap();
        assert_eq!(codec::decode::<TopicMsg>(&again).unwrap(), msg);
        if let TopicMsg::Publish { envelope, .. } | TopicMsg::Stored { envelope, .. } = &msg {
            let _ = codec::decode::<Envelope>(envelope);
        }
    }
    if let Ok(reply) = codec::decode::<TopicReply>(bytes) {
        assert_eq!(codec::decode::<TopicReply>(&codec::encode(&reply).unwrap()).unwrap(), reply);
    }
    if let Ok(envelope) = codec::decode::<Envelope>(bytes) {
        assert_eq!(codec::decode::<Envelope>(&codec::encode(&envelope).unwrap()).unwrap(), envelope);
    }
    assert!(started.elapsed() < Duration::from_secs(2), "decoding {} bytes took {:?}", bytes.len(), started.elapsed());
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn messages_round_trip(msg in msg(), reply in reply(), envelope in envelope()) {
        prop_assert_eq!(codec::decode::<TopicMsg>(&codec::encode(&msg).unwrap()).unwrap(), msg);
        prop_assert_eq!(codec::decode::<TopicReply>(&codec::encode(&reply).unwrap()).unwrap(), reply);
        prop_assert_eq!(codec::decode::<Envelope>(&codec::encode(&envelope).unwrap()).unwrap(), envelope);
    }

    #[test]
    fn mutated_messages(msg in msg(), mutations in mutations()) {
        let bytes = codec::encode(&msg).unwrap();
        decode_all(&mutated(&bytes, &mutations));
        if let TopicMsg::Publish { envelope, .. } = &msg {
            decode_all(&mutated(envelope, &mutations));
        }
    }

    #[test]
    fn mutated_replies(reply in reply(), mutations in mutations()) {
        decode_all(&mutated(&codec::encode(&reply).unwrap(), &mutations));
    }

    #[test]
    fn random_bytes_as_messages(bytes in random_bytes(), variant in 0u8..8) {
        decode_all(&bytes);
        decode_all(&[&[variant][..], &bytes].concat());
    }
}

/// No announced length in any length field of a small message may make decoding reserve the
/// memory it announces, or take long.
#[test]
fn announced_lengths_the_input_cannot_back_fail_fast() {
    let envelope = Envelope { publisher: MemberId::new("a", 1), publish_time_ms: 5, payload: b"hello".to_vec() };
    let samples = [
        codec::encode(&TopicMsg::Publish { topic: "news".into(), envelope: codec::encode(&envelope).unwrap() }),
        codec::encode(&TopicMsg::Subscribe { kind: TopicKind::Reliable, topic: "news".into() }),
        codec::encode(&envelope),
    ];
    for sample in samples.into_iter().map(Result::unwrap) {
        for at in 0..=sample.len() {
            for n in [1u64 << 44, 1 << 36, 1 << 32, u64::MAX] {
                let mut bytes = sample.clone();
                bytes.splice(at..at, [&[0xfd][..], &n.to_le_bytes()].concat());
                let started = Instant::now();
                decode_all(&bytes);
                assert!(started.elapsed() < Duration::from_secs(1), "{bytes:02x?} took {:?}", started.elapsed());
            }
        }
    }
}
