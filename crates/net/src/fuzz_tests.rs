//! Fuzzing of the data plane's decoders as property tests: frames, the handshake and the codec get
//! random bytes and mutated valid encodings. None may panic, buffer or allocate more than its
//! limit, or accept something it would not have produced. Case counts: see `fuzz_support`
//! (`GRAPEVINE_FUZZ_CASES`, `scripts/fuzz.sh`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use grapevine_membership::{MemberId, ProtocolVersion};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::frame::{self, Frame, FrameError, HEADER_BYTES, Kind, LEN_BYTES};
use crate::handshake::{Hello, STR_MAX, Status, Welcome};
use fuzz_support::{config, mutated, mutations, random_bytes};

#[path = "fuzz_support.rs"]
mod fuzz_support;

// ---------------------------------------------------------------------------------------------
// Frames

/// What parsing a whole buffer gives: the frames, and the error that stopped it (if any).
#[derive(Debug, PartialEq)]
struct Parsed {
    frames: Vec<Frame>,
    error: Option<FrameError>,
    /// Bytes left unparsed (an incomplete frame) when there was no error.
    rest: usize,
}

/// Parses `buf` until it needs more bytes or fails, checking `parse`'s contract at every step.
fn parse_all(buf: &mut BytesMut, max: usize, frames: &mut Vec<Frame>) -> Result<(), FrameError> {
    loop {
        let before = buf.clone();
        match frame::parse(buf, max) {
            Ok(Some(f)) => {
                let wire = LEN_BYTES + HEADER_BYTES + f.body.len();
                assert!(HEADER_BYTES + f.body.len() <= max, "accepted a frame of {wire} bytes over max {max}");
                assert_eq!(before.len() - buf.len(), wire, "parse consumed a different length than the frame's");
                let announced = u32::from_be_bytes(before[..4].try_into().unwrap()) as usize;
                assert_eq!(announced, HEADER_BYTES + f.body.len());
                assert_eq!(f.kind as u8, before[4]);
                assert_eq!(&before[LEN_BYTES + HEADER_BYTES..wire], &f.body[..]);
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(*buf, before, "Ok(None) consumed bytes");
                let needed = frame::bytes_needed(buf);
                assert!(buf.len() < needed, "Ok(None) with {} bytes buffered, {needed} needed", buf.len());
                assert!(needed <= LEN_BYTES + max, "asks to buffer {needed} bytes with max {max}");
                return Ok(());
            }
            Err(e) => {
                let announced = u32::from_be_bytes(before[..4].try_into().unwrap()) as usize;
                match &e {
                    FrameError::TooLarge { len, .. } => assert!(*len == announced && announced > max),
                    FrameError::TooShort { len } => assert!(*len == announced && announced < HEADER_BYTES),
                    FrameError::UnknownKind(k) => {
                        assert!(*k > 3 && before.len() >= LEN_BYTES + announced, "{e} on an incomplete frame")
                    }
                }
                return Err(e);
            }
        }
    }
}

fn parse_whole(bytes: &[u8], max: usize) -> Parsed {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    let error = parse_all(&mut buf, max, &mut frames).err();
    let rest = if error.is_some() { 0 } else { buf.len() };
    Parsed { frames, error, rest }
}

/// Feeds `bytes` in chunks ending at `cuts`, as reads from a socket would, parsing after each.
fn parse_chunked(bytes: &[u8], cuts: &[usize], max: usize) -> Parsed {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    let mut start = 0;
    for end in ends {
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        if let Err(e) = parse_all(&mut buf, max, &mut frames) {
            return Parsed { frames, error: Some(e), rest: 0 };
        }
    }
    Parsed { frames, error: None, rest: buf.len() }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Request), Just(Kind::Response), Just(Kind::OneWay), Just(Kind::ErrorResponse)]
}

/// A valid frame sequence, encoded as the connection writer does.
fn frame_stream() -> impl Strategy<Value = Vec<u8>> {
    let one = (kind(), any::<u64>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..200));
    prop::collection::vec(one, 0..6).prop_map(|frames| {
        let mut out = Vec::new();
        for (kind, correlation, service, body) in frames {
            out.extend_from_slice(&frame::header(kind, correlation, service, body.len()));
            out.extend_from_slice(&body);
        }
        out
    })
}

fn frame_max() -> impl Strategy<Value = usize> {
    prop_oneof![Just(HEADER_BYTES), HEADER_BYTES..300usize, Just(1024), Just(64 << 10), Just(u32::MAX as usize)]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn frames_random_streams(bytes in random_bytes(), max in frame_max()) {
        parse_whole(&bytes, max);
    }

    #[test]
    fn frames_mutated_streams(stream in frame_stream(), mutations in mutations(), max in frame_max()) {
        parse_whole(&mutated(&stream, &mutations), max);
    }

    /// However the bytes are split into reads, parsing yields the same frames and the same error.
    #[test]
    fn frames_are_the_same_whatever_the_reads(
        stream in frame_stream(),
        mutations in prop::collection::vec(fuzz_support::mutation(), 0..3),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let bytes = mutated(&stream, &mutations);
        let whole = parse_whole(&bytes, 1024);
        let chunked = parse_chunked(&bytes, &cuts, 1024);
        prop_assert_eq!(&chunked, &whole);
        if mutations.is_empty() {
            prop_assert_eq!((whole.error, whole.rest), (None, 0));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The longest hello: magic, version, three strings of `STR_MAX`, two generations, the flag.
const HELLO_BYTES_MAX: usize = 8 + 3 * (2 + STR_MAX) + 2 * 8 + 1;
/// The longest welcome: magic, version, status, three strings of `STR_MAX`, a generation.
const WELCOME_BYTES_MAX: usize = 8 + 1 + 3 * (2 + STR_MAX) + 8;

fn block_on<F: Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().build().expect("a test runtime");
    }
    RUNTIME.with(|rt| rt.block_on(future))
}

/// Reads a hello from `bytes` and checks the contract: bounded reads, bounded strings, and a
/// hello that re-encodes to exactly the bytes it was read from.
fn check_hello(bytes: &[u8]) {
    let mut reader = bytes;
    let read = block_on(Hello::read(&mut reader));
    let consumed = bytes.len() - reader.len();
    assert!(consumed <= HELLO_BYTES_MAX, "a hello read {consumed} bytes");
    if let Ok(hello) = read {
        let strings =
            [Some(&*hello.cluster_name), Some(&*hello.member.node_id), hello.expected.as_ref().map(|e| &*e.node_id)];
        assert!(strings.iter().flatten().all(|s| s.len() <= STR_MAX));
        assert_eq!(hello.encode(), &bytes[..consumed], "the hello read is not what its bytes encode");
    }
}

fn check_welcome(bytes: &[u8]) {
    let mut reader = bytes;
    let read = block_on(Welcome::read(&mut reader));
    let consumed = bytes.len() - reader.len();
    assert!(consumed <= WELCOME_BYTES_MAX, "a welcome read {consumed} bytes");
    if let Ok(welcome) = read {
        assert!([&welcome.cluster_name, &*welcome.member.node_id, &welcome.reason].iter().all(|s| s.len() <= STR_MAX));
        assert_eq!(welcome.encode(), &bytes[..consumed], "the welcome read is not what its bytes encode");
    }
}

/// Strings around the limit, some multi-byte (encoding cuts them at a character boundary).
fn handshake_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9@/.-]{0,24}",
        1 => "\\PC{0,40}",
        1 => (1000usize..1100).prop_map(|n| "x".repeat(n)),
        1 => (500usize..560).prop_map(|n| "é".repeat(n)),
    ]
}

fn member() -> impl Strategy<Value = MemberId> {
    (handshake_string(), any::<u64>()).prop_map(|(node, generation)| MemberId { generation, node_id: Arc::from(node) })
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u16>(), any::<u16>()).prop_map(|(major, minor)| ProtocolVersion { major, minor })
}

fn hello() -> impl Strategy<Value = Hello> {
    (version(), handshake_string(), member(), prop::option::of(member()))
        .prop_map(|(version, cluster_name, member, expected)| Hello { version, cluster_name, member, expected })
}

fn welcome() -> impl Strategy<Value = Welcome> {
    let status = prop_oneof![Just(Status::Accepted), Just(Status::Rejected), Just(Status::Duplicate)];
    (version(), status, handshake_string(), member(), handshake_string()).prop_map(
        |(version, status, cluster_name, member, reason)| Welcome { version, status, cluster_name, member, reason },
    )
}

/// `s` as encoding leaves it: cut to `STR_MAX` bytes at a character boundary.
fn cut(s: &str) -> &str {
    let mut end = s.len().min(STR_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn handshake_random_bytes(bytes in random_bytes(), magic in any::<bool>()) {
        // Half the inputs start with the magic, so that the fields behind it are reached.
        let bytes = if magic { [&b"GRPV"[..], &bytes].concat() } else { bytes };
        check_hello(&bytes);
        check_welcome(&bytes);
    }

    #[test]
    fn handshake_mutated_hellos(hello in hello(), mutations in mutations()) {
        check_hello(&mutated(&hello.encode(), &mutations));
    }

    #[test]
    fn handshake_mutated_welcomes(welcome in welcome(), mutations in mutations()) {
        check_welcome(&mutated(&welcome.encode(), &mutations));
    }

    /// Valid messages read back as written, strings over the limit cut at a character boundary.
    #[test]
    fn handshake_round_trips(hello in hello(), welcome in welcome()) {
        let read = block_on(Hello::read(&mut &hello.encode()[..])).unwrap();
        prop_assert_eq!(&read.cluster_name, cut(&hello.cluster_name));
        prop_assert_eq!(&*read.member.node_id, cut(&hello.member.node_id));
        prop_assert_eq!(read.expected.map(|e| e.generation), hello.expected.map(|e| e.generation));
        let read = block_on(Welcome::read(&mut &welcome.encode()[..])).unwrap();
        prop_assert_eq!(&read.reason, cut(&welcome.reason));
        prop_assert_eq!(read.status, welcome.status);
    }
}

// ---------------------------------------------------------------------------------------------
// Codec: generic shapes (the map crate fuzzes its own messages)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Scalars(bool, char, u8, i16, u32, i64, u128, f64),
    Text { name: String, tags: Vec<String>, note: Option<String> },
    Bytes(Vec<u8>, Option<Vec<u8>>),
    Nested(Vec<Vec<(u64, String)>>),
    Map(BTreeMap<String, Vec<u64>>),
    Time(Duration, Option<Duration>),
    Member(MemberId),
    Boxed(Option<Box<Shape>>),
}

fn shape() -> impl Strategy<Value = Shape> {
    let leaf = prop_oneof![
        Just(Shape::Unit),
        (
            any::<bool>(),
            any::<char>(),
            any::<u8>(),
            any::<i16>(),
            any::<u32>(),
            any::<i64>(),
            any::<u128>(),
            -1e9f64..1e9
        )
            .prop_map(|(a, b, c, d, e, f, g, h)| Shape::Scalars(a, b, c, d, e, f, g, h)),
        (".{0,12}", prop::collection::vec(".{0,6}", 0..4), prop::option::of(".{0,8}"))
            .prop_map(|(name, tags, note)| Shape::Text { name, tags, note }),
        (prop::collection::vec(any::<u8>(), 0..64), prop::option::of(prop::collection::vec(any::<u8>(), 0..16)))
            .prop_map(|(a, b)| Shape::Bytes(a, b)),
        prop::collection::vec(prop::collection::vec((any::<u64>(), ".{0,4}"), 0..3), 0..3).prop_map(Shape::Nested),
        prop::collection::btree_map(".{0,4}", prop::collection::vec(any::<u64>(), 0..3), 0..3).prop_map(Shape::Map),
        (any::<u64>(), 0u32..1_000_000_000, prop::option::of(any::<u32>()))
            .prop_map(|(s, n, o)| { Shape::Time(Duration::new(s, n), o.map(|ms| Duration::from_millis(ms.into()))) }),
        (".{0,8}", any::<u64>()).prop_map(|(n, g)| Shape::Member(MemberId { generation: g, node_id: Arc::from(n) })),
    ];
    leaf.prop_recursive(2, 8, 1, |inner| prop::option::of(inner.prop_map(Box::new)).prop_map(Shape::Boxed))
}

/// Decodes `bytes` into several types; each must give a value or an error, quickly.
fn decode_everything(bytes: &[u8]) {
    let started = Instant::now();
    let _ = codec::decode::<Shape>(bytes);
    let _ = codec::decode::<Vec<Shape>>(bytes);
    let _ = codec::decode::<String>(bytes);
    let _ = codec::decode::<Vec<Vec<u8>>>(bytes);
    let _ = codec::decode::<HashMap<String, Vec<String>>>(bytes);
    let _ = codec::decode::<(u64, Option<Duration>, Vec<(String, MemberId)>)>(bytes);
    assert!(started.elapsed() < Duration::from_secs(2), "decoding {} bytes took {:?}", bytes.len(), started.elapsed());
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn codec_random_bytes(bytes in random_bytes()) {
        decode_everything(&bytes);
    }

    #[test]
    fn codec_mutated_values(values in prop::collection::vec(shape(), 1..4), mutations in mutations()) {
        let bytes = codec::encode(&values).unwrap();
        prop_assert_eq!(&codec::decode::<Vec<Shape>>(&bytes).unwrap(), &values);
        decode_everything(&mutated(&bytes, &mutations));
    }
}

/// Every bincode length prefix announcing more than the input holds, alone or in front of a few
/// bytes, at the top level or inside a message, is an error at once.
#[test]
fn codec_huge_length_prefixes_fail_fast() {
    let varints = fuzz_support::huge_lengths().into_iter().filter(|p| p.len() > 1 && (0xfb..=0xfe).contains(&p[0]));
    for prefix in varints {
        for tail in [&[][..], &[0u8; 12][..], b"some bytes that follow"] {
            let started = Instant::now();
            let bytes = [&prefix[..], tail].concat();
            assert!(codec::decode::<String>(&bytes).is_err(), "{bytes:02x?}");
            assert!(codec::decode::<Vec<u8>>(&bytes).is_err(), "{bytes:02x?}");
            assert!(codec::decode::<Vec<Vec<u64>>>(&bytes).is_err(), "{bytes:02x?}");
            let in_shape = [&[2u8][..], &bytes].concat(); // Shape::Text { name: <huge> }
            assert!(codec::decode::<Shape>(&in_shape).is_err(), "{in_shape:02x?}");
            assert!(started.elapsed() < Duration::from_secs(1), "{bytes:02x?} took {:?}", started.elapsed());
        }
    }
}
