//! The handshake: a fixed, version-independent layout (not bincode), so that members of any two
//! versions can always tell each other what is wrong instead of failing on a decoding error.
//!
//! ```text
//! hello   (dialer → acceptor): magic "GRPV" | major u16 | minor u16 | cluster_name str | node_id str
//!                              | generation u64 | expected flag u8 [| node_id str | generation u64]
//! welcome (acceptor → dialer): magic "GRPV" | major u16 | minor u16 | status u8 | cluster_name str
//!                              | node_id str | generation u64 | reason str
//! str = u16 length (at most 1024) + UTF-8 bytes; all integers big endian.
//! ```
//!
//! Reads are exact (no read-ahead), so frames the acceptor writes right after the welcome are left
//! in the socket for the frame reader.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use grapevine_membership::{MemberId, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) const MAGIC: [u8; 4] = *b"GRPV";
/// Longest string field, in bytes.
pub(crate) const STR_MAX: usize = 1024;

/// What the acceptor answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Accepted = 0,
    Rejected = 1,
    /// Both members are dialing each other; the acceptor keeps its own dial (it has the smaller id).
    Duplicate = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: ProtocolVersion,
    pub(crate) cluster_name: String,
    pub(crate) member: MemberId,
    /// The member the dialer believes listens at the address it dialed.
    pub(crate) expected: Option<MemberId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub(crate) version: ProtocolVersion,
    pub(crate) status: Status,
    pub(crate) cluster_name: String,
    pub(crate) member: MemberId,
    pub(crate) reason: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a grapevine peer: it sent {0:02x?} instead of the magic \"GRPV\"")]
    NotGrapevine([u8; 4]),
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a character boundary; identities that long are rejected upstream
    // by the mismatch checks rather than by a decoding error.
    let mut end = s.len().min(STR_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_version(out: &mut Vec<u8>, v: ProtocolVersion) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&v.major.to_be_bytes());
    out.extend_from_slice(&v.minor.to_be_bytes());
}

async fn read_u8<R: AsyncRead + Unpin>(r: &mut R) -> Result<u8, HandshakeError> {
    Ok(r.read_u8().await?)
}

async fn read_str<R: AsyncRead + Unpin>(r: &mut R, what: &str) -> Result<String, HandshakeError> {
    let len = r.read_u16().await? as usize;
    if len > STR_MAX {
        return Err(HandshakeError::Malformed(format!("{what} of {len} bytes, the limit is {STR_MAX}")));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes).await?;
    String::from_utf8(bytes).map_err(|_| HandshakeError::Malformed(format!("{what} is not UTF-8")))
}

async fn read_member<R: AsyncRead + Unpin>(r: &mut R, what: &str) -> Result<MemberId, HandshakeError> {
    let node_id = read_str(r, what).await?;
    let generation = r.read_u64().await?;
    Ok(MemberId { generation, node_id: Arc::from(node_id) })
}

/// Reads the magic and the version that start both messages.
async fn read_version<R: AsyncRead + Unpin>(r: &mut R) -> Result<ProtocolVersion, HandshakeError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).await?;
    if magic != MAGIC {
        return Err(HandshakeError::NotGrapevine(magic));
    }
    let major = r.read_u16().await?;
    let minor = r.read_u16().await?;
    Ok(ProtocolVersion { major, minor })
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put_version(&mut out, self.version);
        put_str(&mut out, &self.cluster_name);
        put_str(&mut out, &self.member.node_id);
        out.extend_from_slice(&self.member.generation.to_be_bytes());
        match &self.expected {
            None => out.push(0),
            Some(expected) => {
                out.push(1);
                put_str(&mut out, &expected.node_id);
                out.extend_from_slice(&expected.generation.to_be_bytes());
            }
        }
        out
    }

    pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, HandshakeError> {
        let version = read_version(r).await?;
        let cluster_name = read_str(r, "cluster name").await?;
        let member = read_member(r, "node id").await?;
        let expected = match read_u8(r).await? {
            0 => None,
            1 => Some(read_member(r, "expected node id").await?),
            other => return Err(HandshakeError::Malformed(format!("expected-peer flag {other}"))),
        };
        Ok(Hello { version, cluster_name, member, expected })
    }
}

impl Welcome {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.reason.len());
        put_version(&mut out, self.version);
        out.push(self.status as u8);
        put_str(&mut out, &self.cluster_name);
        put_str(&mut out, &self.member.node_id);
        out.extend_from_slice(&self.member.generation.to_be_bytes());
        put_str(&mut out, &self.reason);
        out
    }

    pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Welcome, HandshakeError> {
        let version = read_version(r).await?;
        let status = match read_u8(r).await? {
            0 => Status::Accepted,
            1 => Status::Rejected,
            2 => Status::Duplicate,
            other => return Err(HandshakeError::Malformed(format!("unknown handshake status {other}"))),
        };
        let cluster_name = read_str(r, "cluster name").await?;
        let member = read_member(r, "node id").await?;
        let reason = read_str(r, "reason").await?;
        Ok(Welcome { version, status, cluster_name, member, reason })
    }
}

/// One side of a handshake, for messages that must name both sides.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Side<'a> {
    pub(crate) member: &'a MemberId,
    pub(crate) addr: SocketAddr,
    pub(crate) version: ProtocolVersion,
    pub(crate) cluster_name: &'a str,
}

/// Why two members cannot talk, or `None` when they can. Both sides run the same check (the
/// acceptor on the hello, the dialer on the welcome) and the message names both values in neutral
/// terms, so it reads the same in either member's log.
pub(crate) fn incompatibility(a: Side<'_>, b: Side<'_>) -> Option<String> {
    if !a.version.is_compatible_with(&b.version) {
        return Some(format!(
            "protocol version mismatch: {} at {} speaks {}, {} at {} speaks {}; \
             upgrade all members to the same major version",
            a.member.node_id, a.addr, a.version, b.member.node_id, b.addr, b.version
        ));
    }
    if a.cluster_name != b.cluster_name {
        return Some(format!(
            "cluster name mismatch: {} at {} is in cluster {:?}, {} at {} is in cluster {:?}; \
             members of different clusters do not talk to each other, check cluster_name",
            a.member.node_id, a.addr, a.cluster_name, b.member.node_id, b.addr, b.cluster_name
        ));
    }
    None
}

/// The reason when the member answering at an address is not the one the dialer expected.
pub(crate) fn wrong_member(addr: SocketAddr, expected: &MemberId, actual: &MemberId) -> String {
    format!(
        "expected member {expected} at {addr} but {actual} answers there: the member restarted \
         (a new generation is a new member) or the address is stale; the membership view will \
         report the new member"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str, generation: u64) -> MemberId {
        MemberId { generation, node_id: Arc::from(node) }
    }

    #[tokio::test]
    async fn hello_and_welcome_round_trip() {
        let hello = Hello {
            version: ProtocolVersion { major: 1, minor: 2 },
            cluster_name: "prod".into(),
            member: member("a", 1),
            expected: Some(member("b", 2)),
        };
        let bytes = hello.encode();
        assert_eq!(&bytes[..4], b"GRPV");
        assert_eq!(Hello::read(&mut &bytes[..]).await.unwrap(), hello);

        let welcome = Welcome {
            version: ProtocolVersion { major: 1, minor: 0 },
            status: Status::Duplicate,
            cluster_name: "prod".into(),
            member: member("b", 2),
            reason: "both dialing".into(),
        };
        assert_eq!(Welcome::read(&mut &welcome.encode()[..]).await.unwrap(), welcome);
    }

    #[tokio::test]
    async fn wrong_magic_and_long_strings_are_errors() {
        let err = Hello::read(&mut &b"GET / HTTP/1.1\r\n"[..]).await.unwrap_err();
        assert!(matches!(err, HandshakeError::NotGrapevine(_)), "{err}");
        let mut bytes = b"GRPV\x00\x01\x00\x00".to_vec();
        bytes.extend_from_slice(&2000u16.to_be_bytes());
        let err = Hello::read(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, HandshakeError::Malformed(_)), "{err}");
    }

    #[test]
    fn long_strings_are_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        put_str(&mut out, &"é".repeat(600));
        let len = u16::from_be_bytes([out[0], out[1]]) as usize;
        assert!(len <= STR_MAX && std::str::from_utf8(&out[2..]).is_ok());
    }

    #[test]
    fn incompatibility_names_both_sides() {
        let (a, b) = (member("node-a", 1), member("node-b", 2));
        let side = |m, major, cluster| Side {
            member: m,
            addr: "10.0.0.1:5701".parse().unwrap(),
            version: ProtocolVersion { major, minor: 0 },
            cluster_name: cluster,
        };
        let msg = incompatibility(side(&a, 1, "x"), side(&b, 2, "x")).unwrap();
        assert!(msg.contains("1.0") && msg.contains("2.0") && msg.contains("node-b"), "{msg}");
        let msg = incompatibility(side(&a, 1, "x"), side(&b, 1, "y")).unwrap();
        assert!(msg.contains("\"x\"") && msg.contains("\"y\""), "{msg}");
        assert!(incompatibility(side(&a, 1, "x"), side(&b, 1, "x")).is_none());
    }
}
