//! Reading requests: RESP arrays of bulk strings (what every client sends), decoded by the
//! `redis-protocol` crate, and inline commands (`PING\r\n`, as typed into telnet), split here.
//!
//! The decoder has no size limits of its own: it waits for as many bytes as a header announces.
//! [`check_limits`] therefore walks the headers of the request at the front of the buffer first
//! (without allocating) and refuses an array length, a bulk length or a request size over the
//! limits as soon as the header that declares it has arrived, before any of it is buffered.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::{BytesFrame, Resp2Frame};

/// The limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string, in bytes.
    pub max_bulk_bytes: usize,
    /// Most arguments.
    pub max_array_len: usize,
    /// Longest inline request line.
    pub max_inline_bytes: usize,
    /// Largest request, all bulk strings together.
    pub max_request_bytes: usize,
}

/// Longest header line (`*<n>` or `$<n>`): a sign, 20 digits and CRLF, with room to spare.
const HEADER_MAX: usize = 32;

/// A request that cannot be served; the connection gets `-ERR <message>` and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn protocol(message: impl Into<String>) -> ProtocolError {
    ProtocolError(format!("Protocol error: {}", message.into()))
}

/// Where a header line ends (the index of its `\r`), if it has arrived; an error when a header
/// is longer than any valid one.
fn line_end(buf: &[u8], start: usize, what: &str) -> Result<Option<usize>, ProtocolError> {
    let window = &buf[start..buf.len().min(start + HEADER_MAX)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(Some(start + i - 1)),
        Some(_) => Err(protocol(format!("invalid {what}: a header line must end with CRLF"))),
        None if window.len() >= HEADER_MAX => Err(protocol(format!("invalid {what}: header line too long"))),
        None => Ok(None),
    }
}

fn header_number(buf: &[u8], start: usize, end: usize, what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(&buf[start..end])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| protocol(format!("invalid {what}")))
}

/// Checks the request at the front of `buf` (which starts with `*`) against `limits`, as far as
/// its headers have arrived. `Ok(Some(n))`: the whole request is there, `n` bytes; `Ok(None)`:
/// more bytes are needed and nothing seen so far breaks a limit.
pub fn check_limits(buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
    debug_assert_eq!(buf.first(), Some(&b'*'));
    let Some(end) = line_end(buf, 1, "multibulk length")? else { return Ok(None) };
    let count = header_number(buf, 1, end, "multibulk length")?;
    if count < 0 || count as u64 > limits.max_array_len as u64 {
        return Err(protocol(format!(
            "invalid multibulk length {count} (at most {} arguments, resp.max_array_len)",
            limits.max_array_len
        )));
    }
    let mut pos = end + 2;
    let mut total = 0usize;
    for _ in 0..count {
        let Some(&kind) = buf.get(pos) else { return Ok(None) };
        if kind != b'$' {
            return Err(protocol(format!("expected '$', got '{}'", char::from(kind).escape_default())));
        }
        let Some(end) = line_end(buf, pos + 1, "bulk length")? else { return Ok(None) };
        let len = header_number(buf, pos + 1, end, "bulk length")?;
        if len < 0 || len as u64 > limits.max_bulk_bytes as u64 {
            return Err(protocol(format!(
                "invalid bulk length {len} (at most {} bytes, resp.max_bulk_bytes)",
                limits.max_bulk_bytes
            )));
        }
        total += len as usize;
        if total > limits.max_request_bytes {
            return Err(protocol(format!(
                "request larger than {} bytes (resp.max_request_bytes)",
                limits.max_request_bytes
            )));
        }
        pos = end + 2 + len as usize + 2;
        if pos > buf.len() {
            return Ok(None);
        }
        if &buf[pos - 2..pos] != b"\r\n" {
            return Err(protocol("a bulk string must be followed by CRLF"));
        }
    }
    Ok(Some(pos))
}

/// Takes the next complete request off the front of `buf`: its arguments (empty for an empty
/// line or `*0`), or `None` when more bytes are needed.
pub fn next_request(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    if first != b'*' {
        return inline_request(buf, limits);
    }
    if check_limits(buf, limits)?.is_none() {
        return Ok(None);
    }
    let decoded = decode_bytes_mut(buf).map_err(|e| protocol(e.details().to_string()))?;
    let Some((frame, _, _)) = decoded else {
        // check_limits saw the whole request; the decoder must agree.
        return Err(protocol("incomplete request"));
    };
    match frame {
        BytesFrame::Array(items) => items
            .into_iter()
            .map(|item| match item {
                BytesFrame::BulkString(bytes) => Ok(bytes),
                other => Err(protocol(format!("expected a bulk string, got {:?}", other.kind()))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        BytesFrame::Null => Ok(Some(Vec::new())),
        other => Err(protocol(format!("expected an array, got {:?}", other.kind()))),
    }
}

/// An inline request: one line of space-separated arguments.
fn inline_request(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let window = &buf[..buf.len().min(limits.max_inline_bytes + 1)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        if window.len() > limits.max_inline_bytes {
            return Err(protocol(format!(
                "too big inline request (at most {} bytes, resp.max_inline_bytes)",
                limits.max_inline_bytes
            )));
        }
        return Ok(None);
    };
    let line = buf.split_to(newline + 1).freeze();
    let text = line.slice(..newline);
    let text = text.strip_suffix(b"\r").map_or(text.clone(), |t| text.slice(..t.len()));
    let mut args = Vec::new();
    let mut start = None;
    for (i, &b) in text.iter().enumerate() {
        match (b.is_ascii_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                args.push(text.slice(s..i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        args.push(text.slice(s..));
    }
    if args.len() > limits.max_array_len {
        return Err(protocol("too many arguments in an inline request"));
    }
    Ok(Some(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits =
        Limits { max_bulk_bytes: 1024, max_array_len: 8, max_inline_bytes: 64, max_request_bytes: 2048 };

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(request) = next_request(&mut buf, &LIMITS)? {
            out.push(request);
        }
        Ok(out)
    }

    #[test]
    fn pipelined_requests_come_out_in_order_and_partial_ones_wait() {
        let input = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\na\0b\r\n*1\r\n$4\r\nPI";
        let mut buf = BytesMut::from(&input[..]);
        let a = next_request(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(a, vec![Bytes::from("GET"), Bytes::from("k")]);
        let b = next_request(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(b, vec![Bytes::from("PING")]);
        let c = next_request(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(c[2], Bytes::from(&b"a\0b"[..]), "binary values are kept byte for byte");
        assert_eq!(next_request(&mut buf, &LIMITS).unwrap(), None, "the last request is incomplete");
        buf.extend_from_slice(b"NG\r\n");
        assert_eq!(next_request(&mut buf, &LIMITS).unwrap().unwrap(), vec![Bytes::from("PING")]);
        assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete_rather_than_an_error() {
        let input = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        for cut in 0..input.len() {
            assert_eq!(parse_all(&input[..cut]), Ok(vec![]), "cut at {cut}");
        }
        assert_eq!(parse_all(input).unwrap().len(), 1);
    }

    #[test]
    fn declared_lengths_over_the_limits_fail_before_the_data_arrives() {
        for (input, needle) in [
            (&b"*1\r\n$99999999999\r\n"[..], "invalid bulk length"),
            (b"*1\r\n$1025\r\n", "invalid bulk length"),
            (b"*9\r\n", "invalid multibulk length"),
            (b"*-5\r\n", "invalid multibulk length"),
            (b"*1\r\n$-3\r\n", "invalid bulk length"),
            (b"*3\r\n$1000\r\n", ""),
            (b"*1\r\n:12\r\n", "expected '$'"),
            (b"*x\r\n", "invalid multibulk length"),
            (b"*1\r\n$3\r\nabcde\r\n", "followed by CRLF"),
            (b"*100000000000000000000000000000000000000\r\n", "too long"),
        ] {
            let result = parse_all(input);
            if needle.is_empty() {
                assert_eq!(result, Ok(vec![]), "{input:?}: within the limits, waits for more");
                continue;
            }
            let err = result.unwrap_err().0;
            assert!(err.starts_with("Protocol error") && err.contains(needle), "{input:?}: {err}");
        }
        let big = b"*3\r\n$1000\r\n".iter().chain([b'x'; 1000].iter()).chain(b"\r\n$1000\r\n").copied();
        let mut input: Vec<u8> = big.collect();
        input.extend_from_slice(&[b'x'; 1000]);
        input.extend_from_slice(b"\r\n$100\r\n");
        assert!(parse_all(&input).unwrap_err().0.contains("resp.max_request_bytes"));
    }

    #[test]
    fn inline_requests_split_on_spaces_and_have_a_length_limit() {
        assert_eq!(
            parse_all(b"  set  k v\r\n\r\n").unwrap(),
            vec![vec!["set", "k", "v"], vec![]]
                .into_iter()
                .map(|r| r.into_iter().map(Bytes::from).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        assert_eq!(parse_all(&[b'a'; 64]), Ok(vec![]), "at the limit: waits for the newline");
        assert!(parse_all(&[b'a'; 65]).unwrap_err().0.contains("too big inline request"));
    }
}
