//! Encoding of message bodies for the crates above this one.
//!
//! This is the one place in grapevine that names the serialization format (bincode 2 with serde,
//! standard configuration: little endian, variable-length integers), so it can be swapped without
//! touching the users. The framing and the handshake do not use it: they have fixed layouts.
//!
//! **Decoding is bounded.** Bincode trusts the length prefixes it reads: without a limit, a
//! 21-byte message announcing a 2^44-byte string makes it allocate 16 TiB and abort the process.
//! [`decode`] therefore runs with a limit on the bytes bincode may claim (every primitive and
//! every container it allocates counts its in-memory size), chosen from the input's length:
//! [`DECODE_AMPLIFICATION`] times the input, at least [`DECODE_FLOOR_BYTES`], rounded up to the
//! next step of a fixed ladder (bincode's limit is a compile-time constant). An announced length
//! that cannot be backed by the input fails with an error before anything is allocated.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encoding or decoding a message body failed. The message names the type and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodecError {
    message: String,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// How many bytes of memory decoding may claim per byte of input. A decoded value takes more
/// memory than its encoding (a one-byte varint decodes to an 8-byte `u64`, a string to a 24-byte
/// header plus its bytes); 8 covers every message grapevine sends with room to spare.
pub const DECODE_AMPLIFICATION: usize = 8;

/// The smallest decoding limit, so that small messages never hit it.
pub const DECODE_FLOOR_BYTES: usize = 64 << 10;

/// The limit [`decode`] uses for an input of `len` bytes (see the module documentation).
pub fn decode_limit(len: usize) -> usize {
    let wanted = len.saturating_mul(DECODE_AMPLIFICATION).max(DECODE_FLOOR_BYTES);
    LADDER.iter().copied().find(|step| *step >= wanted).unwrap_or(usize::MAX)
}

/// The limits bincode can be configured with here: 64 KiB, then every factor of 4 up to 16 GiB.
const LADDER: [usize; 10] = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28, 1 << 30, 1 << 32, 1 << 34];

fn decode_with<T: DeserializeOwned, const N: usize>(bytes: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, config().with_limit::<N>())
}

fn decode_bounded<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    match decode_limit(bytes.len()) {
        l if l <= LADDER[0] => decode_with::<T, { LADDER[0] }>(bytes),
        l if l <= LADDER[1] => decode_with::<T, { LADDER[1] }>(bytes),
        l if l <= LADDER[2] => decode_with::<T, { LADDER[2] }>(bytes),
        l if l <= LADDER[3] => decode_with::<T, { LADDER[3] }>(bytes),
        l if l <= LADDER[4] => decode_with::<T, { LADDER[4] }>(bytes),
        l if l <= LADDER[5] => decode_with::<T, { LADDER[5] }>(bytes),
        l if l <= LADDER[6] => decode_with::<T, { LADDER[6] }>(bytes),
        l if l <= LADDER[7] => decode_with::<T, { LADDER[7] }>(bytes),
        l if l <= LADDER[8] => decode_with::<T, { LADDER[8] }>(bytes),
        _ => decode_with::<T, { LADDER[9] }>(bytes),
    }
}

/// Encodes `value` with the project's wire format.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| CodecError { message: format!("could not encode a {}: {e}", std::any::type_name::<T>()) })
}

/// Decodes a value encoded by [`encode`]. The whole input must be consumed: trailing bytes mean the
/// sender and receiver disagree about the type (usually different versions), which must not pass
/// silently.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = decode_bounded::<T>(bytes).map_err(|e| CodecError {
        message: match e {
            bincode::error::DecodeError::LimitExceeded => format!(
                "could not decode a {} from {} bytes: a length field announces more than such an input can \
                 hold (decoding may claim at most {} bytes); the message is corrupt or was not sent by a \
                 grapevine member",
                std::any::type_name::<T>(),
                bytes.len(),
                decode_limit(bytes.len())
            ),
            e => format!(
                "could not decode a {} from {} bytes: {e} (does the sender run a compatible version?)",
                std::any::type_name::<T>(),
                bytes.len()
            ),
        },
    })?;
    if used != bytes.len() {
        return Err(CodecError {
            message: format!(
                "decoding a {} used {used} of {} bytes; the {} trailing bytes suggest the sender \
                 encoded a different type or version",
                std::any::type_name::<T>(),
                bytes.len(),
                bytes.len() - used
            ),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Put { key: String, value: Vec<u8> },
        Get(u64),
    }

    #[test]
    fn round_trips_an_enum() {
        let msg = Msg::Put { key: "k".into(), value: vec![1, 2, 3] };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode::<Msg>(&bytes).unwrap(), msg);
        assert_eq!(decode::<Msg>(&encode(&Msg::Get(7)).unwrap()).unwrap(), Msg::Get(7));
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let mut bytes = encode(&Msg::Get(7)).unwrap();
        bytes.push(0);
        let err = decode::<Msg>(&bytes).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn an_announced_length_the_input_cannot_back_fails_without_allocating_it() {
        // A variant index, then a string whose varint length prefix announces 2^44 bytes.
        let mut bytes = vec![0u8];
        bytes.push(0xfd);
        bytes.extend_from_slice(&(1u64 << 44).to_le_bytes());
        let err = decode::<Msg>(&bytes).unwrap_err().to_string();
        assert!(err.contains("Msg") && err.contains("a length field announces more"), "{err}");
        let err = decode::<Vec<Vec<u8>>>(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap_err().to_string();
        assert!(err.contains("could not decode"), "{err}");
    }

    #[test]
    fn large_values_still_decode() {
        let msg = Msg::Put { key: "k".repeat(1000), value: vec![7u8; 3 << 20] };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode::<Msg>(&bytes).unwrap(), msg);
        let many: Vec<(u64, u64, u64)> = (0..100_000).map(|i| (i, i, i)).collect();
        assert_eq!(decode::<Vec<(u64, u64, u64)>>(&encode(&many).unwrap()).unwrap(), many);
    }

    #[test]
    fn the_limit_grows_with_the_input_and_has_a_floor() {
        assert_eq!(decode_limit(0), DECODE_FLOOR_BYTES);
        assert_eq!(decode_limit(21), DECODE_FLOOR_BYTES);
        assert!(decode_limit(16 << 20) >= (16 << 20) * DECODE_AMPLIFICATION);
        assert_eq!(decode_limit(usize::MAX / 2), usize::MAX);
    }

    #[test]
    fn decode_error_names_the_type() {
        let err = decode::<Msg>(&[9]).unwrap_err().to_string();
        assert!(err.contains("Msg"), "{err}");
    }
}
