//! Encoding of message bodies for the crates above this one.
//!
//! This is the one place in grapevine that names the serialization format (bincode 2 with serde,
//! standard configuration: little endian, variable-length integers), so it can be swapped without
//! touching the users. The framing and the handshake do not use it: they have fixed layouts.

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

/// Encodes `value` with the project's wire format.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| CodecError { message: format!("could not encode a {}: {e}", std::any::type_name::<T>()) })
}

/// Decodes a value encoded by [`encode`]. The whole input must be consumed: trailing bytes mean the
/// sender and receiver disagree about the type (usually different versions), which must not pass
/// silently.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError {
        message: format!(
            "could not decode a {} from {} bytes: {e} (does the sender run a compatible version?)",
            std::any::type_name::<T>(),
            bytes.len()
        ),
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
    fn decode_error_names_the_type() {
        let err = decode::<Msg>(&[9]).unwrap_err().to_string();
        assert!(err.contains("Msg"), "{err}");
    }
}
