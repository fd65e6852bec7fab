//! Shared by the fuzz property tests of every crate (included with `#[path]`, test builds only):
//! the case count, and mutations of valid encodings.
//!
//! Fuzzing runs on stable Rust as property tests: random bytes, and valid messages mutated by bit
//! flips, truncations, inserted and overwritten bytes, and length fields replaced by huge values.
//! The normal test suite runs a bounded number of cases per property; `scripts/fuzz.sh` runs many
//! more by setting [`CASES_ENV`].
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

/// The environment variable that overrides every fuzz property's case count.
pub const CASES_ENV: &str = "GRAPEVINE_FUZZ_CASES";

/// `default` cases, or the count in [`CASES_ENV`].
pub fn cases(default: u32) -> u32 {
    match std::env::var(CASES_ENV) {
        Ok(value) => value.trim().parse().unwrap_or_else(|_| panic!("{CASES_ENV}={value:?} is not a case count")),
        Err(_) => default,
    }
}

/// The proptest configuration of a fuzz property: `default` cases unless [`CASES_ENV`] is set.
/// Shrinking is bounded so that a failure of a long run is reported in reasonable time.
pub fn config(default: u32) -> Config {
    Config { cases: cases(default), max_shrink_iters: 10_000, ..Config::default() }
}

/// Byte strings that decoders read as enormous lengths: bincode varints (`0xfb` u16, `0xfc` u32,
/// `0xfd` u64 little endian, among them 2^44 as in issue 7), big-endian u32 and u16 prefixes
/// (frames, handshake strings), and a single byte just below the varint markers.
pub fn huge_lengths() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [1u64 << 44, u64::MAX, 1 << 32, (1 << 31) + 7, 1 << 20] {
        out.push([&[0xfd][..], &n.to_le_bytes()].concat());
    }
    out.push([&[0xfc][..], &u32::MAX.to_le_bytes()].concat());
    out.push([&[0xfc][..], &(1u32 << 30).to_le_bytes()].concat());
    out.push([&[0xfb][..], &u16::MAX.to_le_bytes()].concat());
    out.push([&[0xfe][..], &u128::MAX.to_le_bytes()].concat());
    out.push(u32::MAX.to_be_bytes().to_vec());
    out.push((1u32 << 24).to_be_bytes().to_vec());
    out.push(u16::MAX.to_be_bytes().to_vec());
    out.push(1025u16.to_be_bytes().to_vec());
    out.push(vec![0xfa]);
    out
}

/// One change to a byte string; indices are taken modulo its length at the time.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flips one bit.
    FlipBit(Index, u8),
    /// Keeps only a prefix.
    Truncate(Index),
    /// Inserts bytes.
    Insert(Index, Vec<u8>),
    /// Overwrites bytes (extending the string if they run past its end).
    Overwrite(Index, Vec<u8>),
    /// Overwrites, or inserts, one of [`huge_lengths`] at an index.
    HugeLength(Index, Index, bool),
    /// Removes a range.
    Remove(Index, usize),
    /// Repeats a range (a duplicated field or element).
    Duplicate(Index, usize),
}

impl Mutation {
    /// Applies the mutation to `bytes`.
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let at = |index: &Index, len: usize| if len == 0 { 0 } else { index.index(len) };
        match self {
            Mutation::FlipBit(index, bit) => {
                if !bytes.is_empty() {
                    let i = at(index, bytes.len());
                    bytes[i] ^= 1 << (bit % 8);
                }
            }
            Mutation::Truncate(index) => {
                let len = at(index, bytes.len() + 1);
                bytes.truncate(len);
            }
            Mutation::Insert(index, extra) => {
                let i = at(index, bytes.len() + 1);
                bytes.splice(i..i, extra.iter().copied());
            }
            Mutation::Overwrite(index, extra) => overwrite(bytes, at(index, bytes.len() + 1), extra),
            Mutation::HugeLength(index, which, insert) => {
                let lengths = huge_lengths();
                let value = &lengths[which.index(lengths.len())];
                let i = at(index, bytes.len() + 1);
                if *insert {
                    bytes.splice(i..i, value.iter().copied());
                } else {
                    overwrite(bytes, i, value);
                }
            }
            Mutation::Remove(index, n) => {
                let i = at(index, bytes.len() + 1);
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Duplicate(index, n) => {
                let i = at(index, bytes.len() + 1);
                let end = (i + n).min(bytes.len());
                let copy = bytes[i..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
}

fn overwrite(bytes: &mut Vec<u8>, at: usize, with: &[u8]) {
    let end = at + with.len();
    if end > bytes.len() {
        bytes.resize(end, 0);
    }
    bytes[at..end].copy_from_slice(with);
}

/// Any single mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        3 => (any::<Index>(), any::<Index>(), any::<bool>()).prop_map(|(i, w, ins)| Mutation::HugeLength(i, w, ins)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

/// One to four mutations, applied in order.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=4)
}

/// `bytes` with `mutations` applied.
pub fn mutated(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        m.apply(&mut out);
    }
    out
}

/// Random input: mostly short, sometimes a few KiB; biased toward bytes that decoders treat
/// specially (zero, varint markers, 0xff).
pub fn random_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![6 => any::<u8>(), 1 => Just(0u8), 1 => 0xfbu8..=0xff];
    prop_oneof![
        4 => prop::collection::vec(byte.clone(), 0..64),
        1 => prop::collection::vec(byte, 0..4096),
    ]
}
