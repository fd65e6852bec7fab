//! Keys to partitions. The hash is fixed and seedless so that every member, every version and
//! every restart agrees on where a key lives: FNV-1a (64-bit) over the key's encoded bytes,
//! finished with MurmurHash3's 64-bit finaliser (`fmix64`) so that the low bits, which the modulo
//! uses, depend on every input byte. Changing this function is a breaking protocol change.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The 64-bit hash of an encoded key.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    fmix64(hash)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The partition (0..`partition_count`) that owns an encoded key.
pub fn partition_of(key: &[u8], partition_count: u32) -> u32 {
    assert!(partition_count > 0, "partition count must be positive");
    (key_hash(key) % u64::from(partition_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // These values are part of the protocol: members of different builds must agree.
        for key in [&b""[..], b"a", b"session-42", &[0xff; 100]] {
            assert_eq!(key_hash(key), key_hash_reference(key));
        }
        assert_eq!(key_hash(b"session-42"), PINNED_SESSION_42);
        assert_eq!(partition_of(b"session-42", 271), (PINNED_SESSION_42 % 271) as u32);
    }

    const PINNED_SESSION_42: u64 = 0x3e6cfda42145251e;

    fn key_hash_reference(key: &[u8]) -> u64 {
        // Straight-line reference of FNV-1a + fmix64, to catch accidental edits of the constants.
        let mut h: u64 = 14_695_981_039_346_656_037;
        for b in key {
            h = (h ^ u64::from(*b)).wrapping_mul(1_099_511_628_211);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51afd7ed558ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
        h ^ (h >> 33)
    }

    #[test]
    fn keys_spread_evenly_over_partitions() {
        let partitions = 271u32;
        let mut counts = vec![0u32; partitions as usize];
        let keys = 271_000u32;
        for i in 0..keys {
            counts[partition_of(format!("key-{i}").as_bytes(), partitions) as usize] += 1;
        }
        let expected = keys / partitions;
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(min > expected * 8 / 10 && max < expected * 12 / 10, "min {min} max {max} expected {expected}");
    }
}
