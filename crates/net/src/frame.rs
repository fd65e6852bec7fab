//! Frames after the handshake: `u32 BE length | kind u8 | correlation id u64 BE | service u8 | body`.
//! The length counts everything after itself. Parsing distinguishes "not all here yet" (`Ok(None)`)
//! from "this peer is broken" (`Err`), and never panics on any input.

use bytes::{Buf, Bytes, BytesMut};

/// Bytes of the length prefix.
pub(crate) const LEN_BYTES: usize = 4;
/// Bytes after the length prefix and before the body: kind, correlation id, service.
pub(crate) const HEADER_BYTES: usize = 1 + 8 + 1;

/// The service id the data plane keeps for its own liveness probe (see `Net::reachability`).
pub(crate) const PING_SERVICE: u8 = 0;

/// Error-response codes (first body byte of a [`Kind::ErrorResponse`]); the rest is a UTF-8 message.
pub(crate) const ERR_NO_HANDLER: u8 = 1;
/// The handler ran but failed (panicked, or its response was too large to send).
pub(crate) const ERR_HANDLER_FAILED: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Request = 0,
    Response = 1,
    OneWay = 2,
    ErrorResponse = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Request),
            1 => Some(Kind::Response),
            2 => Some(Kind::OneWay),
            3 => Some(Kind::ErrorResponse),
            _ => None,
        }
    }
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    pub(crate) correlation: u64,
    pub(crate) service: u8,
    pub(crate) body: Bytes,
}

/// Why the byte stream is not a valid frame sequence. The connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {len} bytes announced, more than frame_bytes_max {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes announced, shorter than the {HEADER_BYTES}-byte frame header")]
    TooShort { len: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
}

/// The frame length the peer announced, once the prefix is in `buf`.
fn announced(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; LEN_BYTES] = buf.get(..LEN_BYTES)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

/// Takes the next complete frame off `buf`. `Ok(None)`: more bytes are needed, see
/// [`bytes_needed`]. The length is validated before the body is waited for, so a peer cannot make
/// us buffer more than `max` bytes.
pub(crate) fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some(len) = announced(buf) else { return Ok(None) };
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len < HEADER_BYTES {
        return Err(FrameError::TooShort { len });
    }
    if buf.len() < LEN_BYTES + len {
        return Ok(None);
    }
    let kind_byte = buf[LEN_BYTES];
    let kind = Kind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    buf.advance(LEN_BYTES + 1);
    let correlation = buf.get_u64();
    let service = buf.get_u8();
    let body = buf.split_to(len - HEADER_BYTES).freeze();
    Ok(Some(Frame { kind, correlation, service, body }))
}

/// How many bytes `buf` must hold before [`parse`] can make progress (for sizing reads).
pub(crate) fn bytes_needed(buf: &[u8]) -> usize {
    match announced(buf) {
        Some(len) => LEN_BYTES + len,
        None => LEN_BYTES,
    }
}

/// The fixed part of a frame, ready to write before its body.
pub(crate) fn header(kind: Kind, correlation: u64, service: u8, body_len: usize) -> [u8; LEN_BYTES + HEADER_BYTES] {
    let mut out = [0u8; LEN_BYTES + HEADER_BYTES];
    // The caller checked body_len + HEADER_BYTES <= frame_bytes_max, which fits u32 by construction
    // of the check in `Net` (frame_bytes_max is clamped to u32::MAX).
    let len = u32::try_from(HEADER_BYTES + body_len).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4] = kind as u8;
    out[5..13].copy_from_slice(&correlation.to_be_bytes());
    out[13] = service;
    out
}

/// Body of an error response: code, then a UTF-8 message.
pub(crate) fn error_body(code: u8, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(1 + message.len());
    out.push(code);
    out.extend_from_slice(message.as_bytes());
    Bytes::from(out)
}

/// Splits an error response body into its code and message (lossy: it is only shown to people).
pub(crate) fn parse_error_body(body: &[u8]) -> (u8, String) {
    match body.split_first() {
        Some((code, rest)) => (*code, String::from_utf8_lossy(rest).into_owned()),
        None => (0, String::from("(empty error response)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: Kind, correlation: u64, service: u8, body: &[u8]) -> Vec<u8> {
        let mut out = header(kind, correlation, service, body.len()).to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_back_what_header_encodes() {
        let mut buf = BytesMut::from(&encoded(Kind::Request, 42, 7, b"hello")[..]);
        buf.extend_from_slice(&encoded(Kind::OneWay, 0, 1, b"")[..]);
        let first = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(
            first,
            Frame { kind: Kind::Request, correlation: 42, service: 7, body: Bytes::from_static(b"hello") }
        );
        let second = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((second.kind, second.body.len()), (Kind::OneWay, 0));
        assert_eq!(parse(&mut buf, 1024).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_input_is_not_an_error_at_any_split() {
        let bytes = encoded(Kind::Response, 1, 2, b"body bytes");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(parse(&mut buf, 1024).unwrap(), None, "cut at {cut}");
            assert!(bytes_needed(&buf) > buf.len());
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body_arrives() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert_eq!(parse(&mut buf, 1024), Err(FrameError::TooLarge { len: u32::MAX as usize, max: 1024 }));
    }

    #[test]
    fn short_length_and_unknown_kind_are_malformed() {
        let mut buf = BytesMut::from(&3u32.to_be_bytes()[..]);
        assert_eq!(parse(&mut buf, 1024), Err(FrameError::TooShort { len: 3 }));
        let mut bytes = encoded(Kind::Request, 1, 1, b"x");
        bytes[4] = 9;
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(parse(&mut buf, 1024), Err(FrameError::UnknownKind(9)));
    }

    #[test]
    fn error_bodies_round_trip() {
        let body = error_body(ERR_NO_HANDLER, "no handler for 3");
        assert_eq!(parse_error_body(&body), (ERR_NO_HANDLER, "no handler for 3".to_string()));
        assert_eq!(parse_error_body(&[]).0, 0);
    }
}
