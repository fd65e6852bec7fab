//! The commands: each works on the connection's current map through the member's map service,
//! which sends it to the key's owner. Argument errors use Redis's wording, so clients and
//! scripts see what they would see from Redis.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grapevine::{Expiry, MapError, PutMode, SetExpiry};

use crate::Shared;
use crate::glob;
use crate::info;
use crate::pubsub::{self, PubSub};
use crate::reply::Reply;

/// What the connection does after a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    Continue,
    Close,
}

/// A connection's state.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: u64,
    /// 2 or 3.
    pub(crate) proto: u8,
    pub(crate) map: String,
    pub(crate) name: Option<Bytes>,
    /// The channels subscribed to and their messages on the way.
    pub(crate) pubsub: PubSub,
    default_map: String,
}

impl Session {
    pub(crate) fn new(id: u64, map: &str, pubsub: PubSub) -> Session {
        Session { id, proto: 2, map: map.to_string(), name: None, pubsub, default_map: map.to_string() }
    }
}

/// A command's name, arity (Redis's convention: `n` exactly n arguments counting the name, `-n` at
/// least n), flags and key positions, for arity checks and `COMMAND`.
#[derive(Debug)]
pub(crate) struct Spec {
    pub(crate) name: &'static str,
    pub(crate) arity: i64,
    pub(crate) flags: &'static [&'static str],
    pub(crate) first_key: i64,
    pub(crate) last_key: i64,
    pub(crate) step: i64,
}

const fn spec(name: &'static str, arity: i64, flags: &'static [&'static str], keys: (i64, i64, i64)) -> Spec {
    Spec { name, arity, flags, first_key: keys.0, last_key: keys.1, step: keys.2 }
}

const W: &[&str] = &["write"];
const R: &[&str] = &["readonly", "fast"];
const A: &[&str] = &["fast"];
const PUBSUB: &[&str] = &["pubsub", "noscript", "loading", "stale"];
const NOKEY: (i64, i64, i64) = (0, 0, 0);
const ONE: (i64, i64, i64) = (1, 1, 1);
const ALL: (i64, i64, i64) = (1, -1, 1);

/// Every command served, in `COMMAND`'s order.
pub(crate) const COMMANDS: &[Spec] = &[
    spec("GET", 2, R, ONE),
    spec("SET", -3, W, ONE),
    spec("SETNX", 3, W, ONE),
    spec("SETEX", 4, W, ONE),
    spec("PSETEX", 4, W, ONE),
    spec("GETSET", 3, W, ONE),
    spec("GETDEL", 2, W, ONE),
    spec("STRLEN", 2, R, ONE),
    spec("DEL", -2, W, ALL),
    spec("UNLINK", -2, W, ALL),
    spec("EXISTS", -2, R, ALL),
    spec("TYPE", 2, R, ONE),
    spec("MGET", -2, R, ALL),
    spec("MSET", -3, W, (1, -1, 2)),
    spec("EXPIRE", -3, W, ONE),
    spec("PEXPIRE", -3, W, ONE),
    spec("TTL", 2, R, ONE),
    spec("PTTL", 2, R, ONE),
    spec("PERSIST", 2, W, ONE),
    spec("INCR", 2, W, ONE),
    spec("DECR", 2, W, ONE),
    spec("INCRBY", 3, W, ONE),
    spec("DECRBY", 3, W, ONE),
    spec("DBSIZE", 1, R, NOKEY),
    spec("SCAN", -2, &["readonly"], NOKEY),
    spec("KEYS", 2, &["readonly"], NOKEY),
    spec("FLUSHDB", -1, W, NOKEY),
    spec("PING", -1, A, NOKEY),
    spec("ECHO", 2, A, NOKEY),
    spec("INFO", -1, &["loading", "stale"], NOKEY),
    spec("CLIENT", -2, &["loading", "stale"], NOKEY),
    spec("CONFIG", -2, &["admin"], NOKEY),
    spec("COMMAND", -1, &["loading", "stale"], NOKEY),
    spec("HELLO", -1, A, NOKEY),
    spec("AUTH", -2, A, NOKEY),
    spec("SELECT", 2, A, NOKEY),
    spec("GV.SELECT", 2, A, NOKEY),
    spec("WAIT", 3, &[], NOKEY),
    spec("RESET", 1, A, NOKEY),
    spec("QUIT", -1, A, NOKEY),
    spec("PUBLISH", 3, &["pubsub", "loading", "stale", "fast"], NOKEY),
    spec("SUBSCRIBE", -2, PUBSUB, NOKEY),
    spec("UNSUBSCRIBE", -1, PUBSUB, NOKEY),
    spec("PSUBSCRIBE", -2, PUBSUB, NOKEY),
    spec("PUNSUBSCRIBE", -1, PUBSUB, NOKEY),
    spec("PUBSUB", -2, &["pubsub", "loading", "stale"], NOKEY),
];

/// What a RESP2 connection in subscribed mode may send (RESP3 connections may send anything).
const SUBSCRIBED_MODE: &[&str] = &["SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "PING", "QUIT", "RESET"];

/// The spec of a command name, any case.
pub(crate) fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS.iter().find(|s| s.name.len() == name.len() && s.name.as_bytes().eq_ignore_ascii_case(name))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wrong_arity(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

fn syntax_error() -> Reply {
    Reply::err("syntax error")
}

fn not_an_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

/// A Redis-style integer argument: optional `-`, digits, no spaces or `+`, within `i64`.
fn int_arg(b: &[u8]) -> Result<i64, Reply> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if digits.is_empty() || b.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(not_an_integer());
    }
    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(not_an_integer)
}

fn is(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A map error as the client sees it.
fn map_error(error: MapError) -> Reply {
    match error {
        MapError::Rejected { reason, .. } => Reply::err(reason),
        other => Reply::err(other),
    }
}

/// The result of a map call, or its error reply.
macro_rules! try_map {
    ($call:expr) => {
        match $call.await {
            Ok(value) => value,
            Err(error) => return map_error(error),
        }
    };
}

/// The result of an argument parse, or its error reply.
macro_rules! try_arg {
    ($parse:expr) => {
        match $parse {
            Ok(value) => value,
            Err(reply) => return reply,
        }
    };
}

/// A map name for `GV.SELECT`: the rules of `Cluster::map`.
fn valid_map_name(name: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(name).ok()?;
    (!name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control)).then(|| name.to_string())
}

/// Executes one request (`args[0]` is the command name).
pub(crate) async fn execute(shared: &Shared, session: &mut Session, args: Vec<Bytes>) -> (Reply, After) {
    let Some(spec) = lookup(&args[0]) else {
        let mut message = format!("unknown command '{}', with args beginning with: ", lossy(&args[0]));
        for arg in args.iter().skip(1).take(8) {
            message.push_str(&format!("'{}' ", lossy(arg)));
        }
        return (Reply::err(message), After::Continue);
    };
    let argc = args.len() as i64;
    if (spec.arity > 0 && argc != spec.arity) || (spec.arity < 0 && argc < -spec.arity) {
        return (wrong_arity(spec.name), After::Continue);
    }
    if session.proto < 3 && session.pubsub.subscribed() && !SUBSCRIBED_MODE.contains(&spec.name) {
        let message = format!(
            "Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            spec.name.to_ascii_lowercase()
        );
        return (Reply::err(message), After::Continue);
    }
    if spec.name == "QUIT" {
        return (Reply::ok(), After::Close);
    }
    (run(shared, session, spec.name, &args).await, After::Continue)
}

async fn run(shared: &Shared, session: &mut Session, name: &'static str, args: &[Bytes]) -> Reply {
    let maps = shared.cluster.map_service();
    let map = session.map.as_str();
    let key = || args[1].to_vec();
    match name {
        "GET" => Reply::opt(try_map!(maps.get(map, key()))),
        "SET" => set(shared, session, args).await,
        "SETNX" => {
            let old = try_map!(maps.set(map, key(), args[2].to_vec(), PutMode::IfAbsent, SetExpiry::Default));
            Reply::Int(i64::from(old.is_none()))
        }
        "SETEX" | "PSETEX" => {
            let n = try_arg!(int_arg(&args[2]));
            let unit = if name == "SETEX" { 1000 } else { 1 };
            let Some(ms) = n.checked_mul(unit).filter(|ms| *ms > 0) else {
                return Reply::err(format!("invalid expire time in '{}' command", name.to_ascii_lowercase()));
            };
            let expiry = SetExpiry::Explicit(Expiry::ttl(Duration::from_millis(ms as u64)));
            try_map!(maps.set(map, key(), args[3].to_vec(), PutMode::Always, expiry));
            Reply::ok()
        }
        "GETSET" => Reply::opt(try_map!(maps.put(map, key(), args[2].to_vec(), None))),
        "GETDEL" => Reply::opt(try_map!(maps.remove(map, key()))),
        "STRLEN" => Reply::Int(try_map!(maps.get(map, key())).map_or(0, |v| v.len() as i64)),
        "DEL" | "UNLINK" => {
            let mut removed = 0;
            for k in &args[1..] {
                removed += i64::from(try_map!(maps.remove(map, k.to_vec())).is_some());
            }
            Reply::Int(removed)
        }
        "EXISTS" => {
            let mut found = 0;
            for k in &args[1..] {
                found += i64::from(try_map!(maps.contains_key(map, k.to_vec())));
            }
            Reply::Int(found)
        }
        "TYPE" => Reply::Simple(if try_map!(maps.contains_key(map, key())) { "string" } else { "none" }),
        "MGET" => {
            let mut values = Vec::with_capacity(args.len() - 1);
            for k in &args[1..] {
                values.push(Reply::opt(try_map!(maps.get(map, k.to_vec()))));
            }
            Reply::Array(values)
        }
        "MSET" => {
            if args.len().is_multiple_of(2) {
                return wrong_arity(name);
            }
            // Each key is written on its own owner: not atomic across keys (see the README).
            for pair in args[1..].chunks(2) {
                try_map!(maps.set(map, pair[0].to_vec(), pair[1].to_vec(), PutMode::Always, SetExpiry::Default));
            }
            Reply::ok()
        }
        "EXPIRE" | "PEXPIRE" => {
            if args.len() > 3 {
                return Reply::err(format!(
                    "{name} options (NX, XX, GT, LT) are not supported by grapevine; set the time to live without them"
                ));
            }
            let n = try_arg!(int_arg(&args[2]));
            let unit = if name == "EXPIRE" { 1000 } else { 1 };
            let Some(ms) = n.checked_mul(unit).filter(|ms| ms.checked_add(now_ms()).is_some()) else {
                return Reply::err(format!("invalid expire time in '{}' command", name.to_ascii_lowercase()));
            };
            // A time to live that is not positive removes the key, as in Redis.
            let ttl = Duration::from_millis(ms.max(0) as u64);
            Reply::Int(i64::from(try_map!(maps.set_ttl(map, key(), Some(ttl)))))
        }
        "PERSIST" => Reply::Int(i64::from(try_map!(maps.set_ttl(map, key(), None)))),
        "TTL" | "PTTL" => match try_map!(maps.time_to_live(map, key())) {
            None => Reply::Int(-2),
            Some(None) => Reply::Int(-1),
            Some(Some(left)) if name == "TTL" => Reply::Int(((left.as_millis() + 500) / 1000) as i64),
            Some(Some(left)) => Reply::Int(left.as_millis() as i64),
        },
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let delta = match name {
                "INCR" => 1,
                "DECR" => -1,
                "INCRBY" => try_arg!(int_arg(&args[2])),
                _ => match try_arg!(int_arg(&args[2])).checked_neg() {
                    Some(d) => d,
                    None => return Reply::err("decrement would overflow"),
                },
            };
            Reply::Int(try_map!(maps.incr_by(map, key(), delta)))
        }
        "DBSIZE" => Reply::Int(try_map!(maps.len(map)) as i64),
        "SCAN" => scan(shared, session, args).await,
        "KEYS" => {
            let mut keys = Vec::new();
            for p in 0..maps.partition_count() {
                if let Err(reply) = partition_keys(shared, map, p, Some(&args[1]), &mut keys).await {
                    return reply;
                }
            }
            Reply::Array(keys)
        }
        "FLUSHDB" => {
            if args.len() > 2 || args.get(1).is_some_and(|a| !is(a, "ASYNC") && !is(a, "SYNC")) {
                return syntax_error();
            }
            try_map!(maps.clear(map));
            Reply::ok()
        }
        "PING" if session.proto < 3 && session.pubsub.subscribed() => match args.len() {
            1 => Reply::Array(vec![Reply::text("pong"), Reply::text("")]),
            2 => Reply::Array(vec![Reply::text("pong"), Reply::Bulk(args[1].clone())]),
            _ => wrong_arity(name),
        },
        "PING" => match args.len() {
            1 => Reply::Simple("PONG"),
            2 => Reply::Bulk(args[1].clone()),
            _ => wrong_arity(name),
        },
        "ECHO" => Reply::Bulk(args[1].clone()),
        "INFO" => Reply::Verbatim(info::render(shared, session, &args[1..]).await),
        "CLIENT" => client(shared, session, args),
        "CONFIG" => {
            if is(&args[1], "GET") {
                // No Redis configuration, but the answers tools look for (redis-benchmark asks for
                // `save` and `appendonly`): grapevine keeps data in memory only.
                let mut pairs = Vec::new();
                for param in &args[2..] {
                    for (name, value) in [("save", ""), ("appendonly", "no")] {
                        if glob::matches(&param.to_ascii_lowercase(), name.as_bytes()) {
                            pairs.push((Reply::text(name), Reply::text(value)));
                        }
                    }
                }
                Reply::Map(pairs)
            } else {
                Reply::err("CONFIG is not supported by grapevine: configure members with config/grapevine.toml")
            }
        }
        "COMMAND" => command(args),
        "HELLO" => hello(session, args),
        "AUTH" => Reply::err(
            "AUTH <password> called without any password configured for the default user. \
             grapevine's RESP endpoint has no authentication: keep resp_bind on a trusted network",
        ),
        "SELECT" => match int_arg(&args[1]) {
            Ok(0) => Reply::ok(),
            Ok(_) => {
                Reply::err("DB index is out of range (grapevine has db 0 only; use GV.SELECT <map> for other maps)")
            }
            Err(reply) => reply,
        },
        "GV.SELECT" => match valid_map_name(&args[1]) {
            Some(name) => {
                session.map = name;
                Reply::ok()
            }
            None => Reply::err("invalid map name: use 1 to 255 printable UTF-8 characters"),
        },
        "WAIT" => {
            try_arg!(int_arg(&args[1]));
            try_arg!(int_arg(&args[2]));
            // Writes return once every synchronous backup has them: nothing to wait for.
            let config = shared.cluster.config();
            let backups = config.maps.get(map).or(config.maps.get("default")).map_or(1, |m| m.backup_count);
            Reply::Int(i64::from(backups))
        }
        "PUBLISH" => publish(shared, args).await,
        "SUBSCRIBE" => session.pubsub.subscribe(&shared.cluster, &args[1..]).await,
        "UNSUBSCRIBE" => session.pubsub.unsubscribe(&args[1..]).await,
        "PSUBSCRIBE" => Reply::err(
            "PSUBSCRIBE is not supported: grapevine topics have no pattern subscriptions; SUBSCRIBE to each channel by \
             name",
        ),
        "PUNSUBSCRIBE" => session.pubsub.punsubscribe(&args[1..]),
        "PUBSUB" => pubsub_command(shared, args),
        "RESET" => {
            session.pubsub.clear().await;
            session.proto = 2;
            session.map = session.default_map.clone();
            session.name = None;
            Reply::Simple("RESET")
        }
        _ => Reply::err(format!("command '{name}' is listed but not implemented")),
    }
}

/// `SET key value [NX | XX] [GET] [EX s | PX ms | EXAT t | PXAT t | KEEPTTL]`.
async fn set(shared: &Shared, session: &Session, args: &[Bytes]) -> Reply {
    let mut mode = PutMode::Always;
    let mut get = false;
    let mut expiry: Option<SetExpiry> = None;
    let mut i = 3;
    while i < args.len() {
        let opt = &args[i];
        let next = args.get(i + 1);
        if is(opt, "NX") || is(opt, "XX") {
            if mode != PutMode::Always {
                return syntax_error();
            }
            mode = if is(opt, "NX") { PutMode::IfAbsent } else { PutMode::IfPresent };
        } else if is(opt, "GET") {
            get = true;
        } else if is(opt, "KEEPTTL") {
            if expiry.is_some() {
                return syntax_error();
            }
            expiry = Some(SetExpiry::Keep);
        } else if ["EX", "PX", "EXAT", "PXAT"].iter().any(|w| is(opt, w)) {
            let Some(arg) = next else { return syntax_error() };
            if expiry.is_some() {
                return syntax_error();
            }
            let n = try_arg!(int_arg(arg));
            let invalid = || Reply::err("invalid expire time in 'set' command");
            if n <= 0 {
                return invalid();
            }
            let ms = if is(opt, "EX") {
                n.checked_mul(1000)
            } else if is(opt, "PX") {
                Some(n)
            } else if is(opt, "EXAT") {
                n.checked_mul(1000).map(|at| at - now_ms())
            } else {
                Some(n - now_ms())
            };
            let Some(ms) = ms else { return invalid() };
            // A deadline already past leaves the entry for a millisecond.
            let ttl = Duration::from_millis(ms.max(1) as u64);
            expiry = Some(SetExpiry::Explicit(Expiry { ttl: Some(ttl), max_idle: None }));
            i += 1;
        } else {
            return syntax_error();
        }
        i += 1;
    }
    let maps = shared.cluster.map_service();
    let expiry = expiry.unwrap_or(SetExpiry::Default);
    let old = try_map!(maps.set(&session.map, args[1].to_vec(), args[2].to_vec(), mode, expiry));
    let applied = match mode {
        PutMode::Always => true,
        PutMode::IfAbsent => old.is_none(),
        PutMode::IfPresent => old.is_some(),
    };
    match (get, applied) {
        (true, _) => Reply::opt(old),
        (false, true) => Reply::ok(),
        (false, false) => Reply::Null,
    }
}

/// Entries fetched per page while scanning a partition.
const SCAN_PAGE: u32 = 1024;

/// Appends the keys of partition `p` matching `pattern` to `out`.
async fn partition_keys(
    shared: &Shared,
    map: &str,
    p: u32,
    pattern: Option<&[u8]>,
    out: &mut Vec<Reply>,
) -> Result<(), Reply> {
    let maps = shared.cluster.map_service();
    let mut after = None;
    loop {
        let (entries, next) = maps.partition_page(map, p, after, SCAN_PAGE).await.map_err(map_error)?;
        for (key, _) in entries {
            if pattern.is_none_or(|pattern| glob::matches(pattern, &key)) {
                out.push(Reply::bulk(key));
            }
        }
        match next {
            Some(key) => after = Some(key),
            None => return Ok(()),
        }
    }
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`: the cursor is the next partition to
/// scan; each call returns whole partitions until at least COUNT keys were found, so no key that
/// stays in the map during the scan is missed or repeated.
async fn scan(shared: &Shared, session: &Session, args: &[Bytes]) -> Reply {
    let partitions = shared.cluster.map_service().partition_count();
    let Ok(cursor) = std::str::from_utf8(&args[1]).unwrap_or("x").parse::<u64>() else {
        return Reply::err("invalid cursor");
    };
    let (mut pattern, mut count, mut strings) = (None, 10usize, true);
    let mut i = 2;
    while i < args.len() {
        let Some(value) = args.get(i + 1) else { return syntax_error() };
        if is(&args[i], "MATCH") {
            pattern = Some(value.as_ref());
        } else if is(&args[i], "COUNT") {
            match int_arg(value) {
                Ok(n) if n >= 1 => count = n as usize,
                Ok(_) => return syntax_error(),
                Err(reply) => return reply,
            }
        } else if is(&args[i], "TYPE") {
            strings = is(value, "string");
        } else {
            return syntax_error();
        }
        i += 2;
    }
    let mut keys = Vec::new();
    let mut p = cursor.min(u64::from(partitions)) as u32;
    while p < partitions && keys.len() < count {
        if let Err(reply) = partition_keys(shared, &session.map, p, pattern, &mut keys).await {
            return reply;
        }
        p += 1;
    }
    if !strings {
        keys.clear();
    }
    let next = if p >= partitions { 0 } else { p };
    Reply::Array(vec![Reply::text(next.to_string()), Reply::Array(keys)])
}

fn client(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let sub = args[1].to_ascii_uppercase();
    let describe = |session: &Session| {
        let name = session.name.as_deref().map(lossy).unwrap_or_default();
        format!(
            "id={} addr= laddr={} name={name} db=0 map={} resp={}\n",
            session.id, shared.addr, session.map, session.proto
        )
    };
    match (sub.as_slice(), args.len()) {
        (b"SETNAME", 3) => {
            let name = &args[2];
            if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                return Reply::err("Client names cannot contain spaces, newlines or special characters.");
            }
            session.name = (!name.is_empty()).then(|| name.clone());
            Reply::ok()
        }
        (b"GETNAME", 2) => session.name.clone().map_or(Reply::Null, Reply::Bulk),
        (b"ID", 2) => Reply::Int(session.id as i64),
        (b"SETINFO", 4) => Reply::ok(),
        (b"INFO", 2) => Reply::Verbatim(describe(session)),
        (b"LIST", _) => Reply::Verbatim(describe(session)),
        (b"SETNAME" | b"GETNAME" | b"ID" | b"SETINFO" | b"INFO", _) => {
            Reply::err(format!("wrong number of arguments for 'client|{}' command", lossy(&sub).to_lowercase()))
        }
        _ => Reply::err(format!("unknown subcommand '{}'. Try CLIENT HELP.", lossy(&args[1]))),
    }
}

/// `PUBLISH channel message`: the number of subscribers on this member that the message was
/// queued for, plus one for each other member with subscribers that it was sent to (that member
/// delivers it to all of its subscribers; how many they are is not known here). 0: no
/// subscriber anywhere, as far as this member knows.
async fn publish(shared: &Shared, args: &[Bytes]) -> Reply {
    let name = try_arg!(pubsub::topic_name(&args[1]));
    let topic = match shared.cluster.topic::<Vec<u8>>(name) {
        Ok(topic) => topic,
        Err(error) => return Reply::err(error),
    };
    match topic.publish_reporting(&args[2].to_vec()).await {
        Ok(delivered) => Reply::Int((delivered.local_subscribers + delivered.members) as i64),
        Err(error) => Reply::err(error),
    }
}

/// `PUBSUB CHANNELS [pattern] | NUMSUB [channel ...] | NUMPAT`: this member's subscribers of
/// plain topics (RESP connections and the member's own), not the cluster's.
fn pubsub_command(shared: &Shared, args: &[Bytes]) -> Reply {
    let sub = args[1].to_ascii_uppercase();
    let local = || {
        let stats = shared.cluster.topic_service().local_stats();
        stats.into_iter().filter(|t| t.kind == "topic" && t.subscribers > 0).map(|t| (t.name, t.subscribers))
    };
    match (sub.as_slice(), args.len()) {
        (b"CHANNELS", 2 | 3) => Reply::Array(
            local()
                .filter(|(name, _)| args.get(2).is_none_or(|pattern| glob::matches(pattern, name.as_bytes())))
                .map(|(name, _)| Reply::text(name))
                .collect(),
        ),
        (b"NUMSUB", _) => {
            let counts: std::collections::HashMap<String, u64> = local().collect();
            let mut pairs = Vec::with_capacity(2 * (args.len() - 2));
            for channel in &args[2..] {
                let n = std::str::from_utf8(channel).ok().and_then(|c| counts.get(c)).copied().unwrap_or(0);
                pairs.push(Reply::Bulk(channel.clone()));
                pairs.push(Reply::Int(n as i64));
            }
            Reply::Array(pairs)
        }
        (b"NUMPAT", 2) => Reply::Int(0),
        (b"CHANNELS" | b"NUMPAT", _) => {
            Reply::err(format!("wrong number of arguments for 'pubsub|{}' command", lossy(&sub).to_lowercase()))
        }
        _ => Reply::err(format!("unknown subcommand '{}'. Try PUBSUB HELP.", lossy(&args[1]))),
    }
}

fn command_entry(spec: &Spec) -> Reply {
    Reply::Array(vec![
        Reply::text(spec.name.to_ascii_lowercase()),
        Reply::Int(spec.arity),
        Reply::Array(spec.flags.iter().map(|f| Reply::Simple(f)).collect()),
        Reply::Int(spec.first_key),
        Reply::Int(spec.last_key),
        Reply::Int(spec.step),
    ])
}

fn command(args: &[Bytes]) -> Reply {
    let Some(sub) = args.get(1) else { return Reply::Array(COMMANDS.iter().map(command_entry).collect()) };
    if is(sub, "COUNT") {
        Reply::Int(COMMANDS.len() as i64)
    } else if is(sub, "INFO") {
        Reply::Array(args[2..].iter().map(|name| lookup(name).map_or(Reply::Null, command_entry)).collect())
    } else if is(sub, "LIST") {
        Reply::Array(COMMANDS.iter().map(|s| Reply::text(s.name.to_ascii_lowercase())).collect())
    } else if is(sub, "DOCS") {
        Reply::Map(Vec::new())
    } else {
        Reply::err(format!("unknown subcommand '{}'. Try COMMAND HELP.", lossy(sub)))
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
fn hello(session: &mut Session, args: &[Bytes]) -> Reply {
    let mut proto = session.proto;
    if let Some(version) = args.get(1) {
        proto = match int_arg(version) {
            Ok(v @ 2..=3) => v as u8,
            Ok(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            Err(_) => return Reply::err("Protocol version is not an integer or out of range"),
        };
    }
    let mut i = 2;
    let mut name = None;
    while i < args.len() {
        if is(&args[i], "AUTH") && i + 2 < args.len() {
            // No authentication: accepted and ignored, as Redis does for a user without a password.
            i += 3;
        } else if is(&args[i], "SETNAME") && i + 1 < args.len() {
            name = Some(args[i + 1].clone());
            i += 2;
        } else {
            return Reply::err(format!("syntax error in HELLO option '{}'", lossy(&args[i])));
        }
    }
    session.proto = proto;
    if let Some(name) = name {
        session.name = (!name.is_empty()).then_some(name);
    }
    Reply::Map(vec![
        (Reply::text("server"), Reply::text("grapevine")),
        (Reply::text("version"), Reply::text(info::REDIS_COMPATIBLE_VERSION)),
        (Reply::text("grapevine_version"), Reply::text(env!("CARGO_PKG_VERSION"))),
        (Reply::text("proto"), Reply::Int(i64::from(proto))),
        (Reply::text("id"), Reply::Int(session.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_in_any_case_and_arity_follows_redis() {
        assert_eq!(lookup(b"get").unwrap().name, "GET");
        assert_eq!(lookup(b"gV.SeLeCt").unwrap().name, "GV.SELECT");
        assert!(lookup(b"GETX").is_none());
        assert_eq!(wrong_arity("GET"), Reply::Error("ERR wrong number of arguments for 'get' command".into()));
        let mut names: Vec<&str> = COMMANDS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len(), "no command is listed twice");
    }

    #[test]
    fn integer_arguments_are_strict() {
        assert_eq!(int_arg(b"-12"), Ok(-12));
        for bad in [&b""[..], b"+1", b" 1", b"1.0", b"abc", b"99999999999999999999"] {
            assert_eq!(int_arg(bad), Err(not_an_integer()), "{bad:?}");
        }
    }
}
