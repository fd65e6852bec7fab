//! Replies, encoded for the connection's protocol version by the `redis-protocol` crate: RESP2
//! by default, RESP3 after `HELLO 3` (nulls, maps and verbatim strings differ).

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame as Frame2;
use redis_protocol::resp3::types::{BytesFrame as Frame3, FrameMap, VerbatimStringFormat};

/// A reply to one command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Simple(&'static str),
    /// `-ERR ...`: the text starts with the error code.
    Error(String),
    /// `:42`.
    Int(i64),
    /// A bulk (blob) string.
    Bulk(Bytes),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Null,
    /// An array.
    Array(Vec<Reply>),
    /// A map: a flat array of keys and values in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// Text for humans (`INFO`): a bulk string in RESP2, a verbatim string in RESP3.
    Verbatim(String),
    /// Out-of-band data (pub/sub messages and confirmations): an array in RESP2, a push frame
    /// (`>`) in RESP3.
    Push(Vec<Reply>),
    /// Several replies to one command, one after the other (`SUBSCRIBE a b` answers one
    /// confirmation per channel). Only at the top level.
    Many(Vec<Reply>),
}

impl Reply {
    pub(crate) fn ok() -> Reply {
        Reply::Simple("OK")
    }

    /// `-ERR <message>`.
    pub(crate) fn err(message: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {message}"))
    }

    pub(crate) fn bulk(bytes: impl Into<Bytes>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    pub(crate) fn text(s: impl Into<String>) -> Reply {
        Reply::Bulk(Bytes::from(s.into()))
    }

    pub(crate) fn opt(value: Option<Vec<u8>>) -> Reply {
        value.map_or(Reply::Null, Reply::bulk)
    }
}

/// An error line must be one line.
fn one_line(s: String) -> String {
    if s.contains(['\r', '\n']) { s.replace(['\r', '\n'], " ") } else { s }
}

fn resp2(reply: Reply) -> Frame2 {
    match reply {
        Reply::Simple(s) => Frame2::SimpleString(Bytes::from_static(s.as_bytes())),
        Reply::Error(e) => Frame2::Error(one_line(e).into()),
        Reply::Int(n) => Frame2::Integer(n),
        Reply::Bulk(b) => Frame2::BulkString(b),
        Reply::Null => Frame2::Null,
        Reply::Array(items) => Frame2::Array(items.into_iter().map(resp2).collect()),
        Reply::Map(pairs) => Frame2::Array(pairs.into_iter().flat_map(|(k, v)| [resp2(k), resp2(v)]).collect()),
        Reply::Verbatim(s) => Frame2::BulkString(Bytes::from(s)),
        Reply::Push(items) | Reply::Many(items) => Frame2::Array(items.into_iter().map(resp2).collect()),
    }
}

fn resp3(reply: Reply) -> Frame3 {
    match reply {
        Reply::Simple(s) => Frame3::SimpleString { data: Bytes::from_static(s.as_bytes()), attributes: None },
        Reply::Error(e) => Frame3::SimpleError { data: one_line(e).into(), attributes: None },
        Reply::Int(n) => Frame3::Number { data: n, attributes: None },
        Reply::Bulk(b) => Frame3::BlobString { data: b, attributes: None },
        Reply::Null => Frame3::Null,
        Reply::Array(items) => Frame3::Array { data: items.into_iter().map(resp3).collect(), attributes: None },
        Reply::Map(pairs) => {
            let data: FrameMap<Frame3, Frame3> = pairs.into_iter().map(|(k, v)| (resp3(k), resp3(v))).collect();
            Frame3::Map { data, attributes: None }
        }
        Reply::Verbatim(s) => {
            Frame3::VerbatimString { data: Bytes::from(s), format: VerbatimStringFormat::Text, attributes: None }
        }
        Reply::Push(items) => Frame3::Push { data: items.into_iter().map(resp3).collect(), attributes: None },
        Reply::Many(items) => Frame3::Array { data: items.into_iter().map(resp3).collect(), attributes: None },
    }
}

/// Appends `reply` to `out` in protocol version `proto` (2 or 3).
pub(crate) fn encode(out: &mut BytesMut, reply: Reply, proto: u8) {
    if let Reply::Many(replies) = reply {
        for reply in replies {
            encode(out, reply, proto);
        }
        return;
    }
    let encoded = if proto >= 3 {
        redis_protocol::resp3::encode::complete::extend_encode(out, &resp3(reply), false)
    } else {
        redis_protocol::resp2::encode::extend_encode(out, &resp2(reply), false)
    };
    // Only frames the decoder could not represent fail to encode; ours are all representable.
    debug_assert!(encoded.is_ok(), "{encoded:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(reply: Reply, proto: u8) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(&mut out, reply, proto);
        out.to_vec()
    }

    #[test]
    fn replies_follow_the_protocol_version() {
        assert_eq!(enc(Reply::ok(), 2), b"+OK\r\n");
        assert_eq!(enc(Reply::Null, 2), b"$-1\r\n");
        assert_eq!(enc(Reply::Null, 3), b"_\r\n");
        assert_eq!(enc(Reply::Int(-2), 3), b":-2\r\n");
        assert_eq!(enc(Reply::bulk(&b"a\r\nb"[..]), 2), b"$4\r\na\r\nb\r\n");
        assert_eq!(enc(Reply::err("bad\r\nthing"), 2), b"-ERR bad  thing\r\n");
        let map = Reply::Map(vec![(Reply::text("proto"), Reply::Int(3))]);
        assert_eq!(enc(map.clone(), 2), b"*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(enc(map, 3), b"%1\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(enc(Reply::Verbatim("a".into()), 3), b"=5\r\ntxt:a\r\n");
        let push = Reply::Push(vec![Reply::text("unsubscribe"), Reply::Null, Reply::Int(0)]);
        assert_eq!(enc(push.clone(), 2), b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        assert_eq!(enc(push, 3), b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n");
        let many = Reply::Many(vec![Reply::Int(1), Reply::ok()]);
        assert_eq!(enc(many, 3), b":1\r\n+OK\r\n");
    }
}
