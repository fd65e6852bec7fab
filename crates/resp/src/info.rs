//! `INFO`: Redis's usual sections (server, clients, memory, stats, keyspace) and sections that
//! mirror the member's `/stats` document (cluster, members, local, gossip, partitions, maps).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::Value;

use crate::Shared;
use crate::commands::Session;

/// The Redis version whose commands this endpoint follows, reported where clients look for one.
pub(crate) const REDIS_COMPATIBLE_VERSION: &str = "7.0.0";

/// Sections in the order printed; `INFO` alone prints them all.
const SECTIONS: &[&str] = &[
    "server",
    "clients",
    "memory",
    "stats",
    "keyspace",
    "cluster",
    "members",
    "local",
    "gossip",
    "partitions",
    "maps",
];

/// A JSON scalar as an INFO value.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `key:value` lines of an object, nested keys joined with `_`; arrays in compact JSON.
fn flatten(out: &mut String, prefix: &str, value: &Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}_{k}") };
                flatten(out, &key, v);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            let list: Vec<String> = items.iter().map(scalar).collect();
            let _ = writeln!(out, "{prefix}:{}", list.join(","));
        }
        other => {
            let _ = writeln!(out, "{prefix}:{}", scalar(other).replace(['\r', '\n'], " "));
        }
    }
}

/// One line per element of an array of objects: `<name>:k=v,k=v`.
fn rows(out: &mut String, items: &Value, name_field: &str) {
    for item in items.as_array().into_iter().flatten() {
        let name = item.get(name_field).map(scalar).unwrap_or_default();
        let fields: Vec<String> = item
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != name_field)
            .map(|(k, v)| format!("{k}={}", if v.is_object() || v.is_array() { v.to_string() } else { scalar(v) }))
            .collect();
        let _ = writeln!(out, "{name}:{}", fields.join(","));
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|pages| pages.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// The text of `INFO [section ...]`.
pub(crate) async fn render(shared: &Shared, session: &Session, args: &[Bytes]) -> String {
    let wanted: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    let all = wanted.is_empty() || wanted.iter().any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
    let show = |section: &str| all || wanted.iter().any(|w| w == section);
    let cluster = &shared.cluster;
    let needs_stats = SECTIONS[4..].iter().any(|s| show(s));
    let stats =
        if needs_stats { serde_json::to_value(cluster.stats().await).unwrap_or(Value::Null) } else { Value::Null };
    let counters = &shared.counters;
    let mut out = String::new();
    for section in SECTIONS.iter().filter(|s| show(s)) {
        if !out.is_empty() {
            out.push('\n');
        }
        let mut title = section.to_string();
        title[..1].make_ascii_uppercase();
        let _ = writeln!(out, "# {title}");
        match *section {
            "server" => {
                let _ = writeln!(out, "redis_version:{REDIS_COMPATIBLE_VERSION}");
                let _ = writeln!(out, "grapevine_version:{}", env!("CARGO_PKG_VERSION"));
                let _ = writeln!(out, "redis_mode:standalone");
                let _ = writeln!(out, "process_id:{}", std::process::id());
                let _ = writeln!(out, "tcp_port:{}", shared.addr.port());
                let _ = writeln!(out, "uptime_in_seconds:{}", shared.started.elapsed().as_secs());
                let _ = writeln!(out, "cluster_name:{}", cluster.name());
                let _ = writeln!(out, "node_id:{}", cluster.local().node_id);
                let _ = writeln!(out, "current_map:{}", session.map);
            }
            "clients" => {
                let _ = writeln!(out, "connected_clients:{}", counters.connected.load(Ordering::Relaxed));
                let _ = writeln!(out, "maxclients:{}", shared.settings.max_connections);
                let _ = writeln!(out, "pubsub_clients:{}", shared.pubsub.clients.load(Ordering::Relaxed));
            }
            "memory" => {
                let local = cluster.map_service().local_stats();
                let used: u64 = local.maps.iter().map(|m| m.memory_bytes).sum();
                let _ = writeln!(out, "used_memory:{used}");
                let _ = writeln!(out, "used_memory_rss:{}", rss_bytes());
            }
            "stats" => {
                let c = counters;
                let _ = writeln!(out, "total_connections_received:{}", c.connections_received.load(Ordering::Relaxed));
                let _ = writeln!(out, "total_commands_processed:{}", c.commands_processed.load(Ordering::Relaxed));
                let _ = writeln!(out, "rejected_connections:{}", c.rejected_connections.load(Ordering::Relaxed));
                let _ = writeln!(out, "total_error_replies_protocol:{}", c.protocol_errors.load(Ordering::Relaxed));
                let p = &shared.pubsub;
                let topics = cluster.topic_service().local_stats();
                let channels = topics.iter().filter(|t| t.kind == "topic" && t.subscribers > 0).count();
                let _ = writeln!(out, "pubsub_channels:{channels}");
                let _ = writeln!(out, "pubsub_patterns:0");
                let _ = writeln!(out, "pubsub_subscriptions:{}", p.subscriptions.load(Ordering::Relaxed));
                let _ = writeln!(out, "pubsub_messages_pushed:{}", p.pushed.load(Ordering::Relaxed));
                let _ = writeln!(out, "pubsub_messages_dropped:{}", p.dropped.load(Ordering::Relaxed));
                let _ = writeln!(out, "pubsub_messages_undecodable:{}", p.undecodable.load(Ordering::Relaxed));
                let _ = writeln!(out, "pubsub_queued_bytes:{}", p.queued_bytes.load(Ordering::Relaxed));
            }
            "keyspace" => {
                if let Ok(keys) = cluster.map_service().len(&session.map).await {
                    let _ = writeln!(out, "db0:keys={keys},expires=0,avg_ttl=0");
                }
            }
            "cluster" => {
                for key in ["cluster_name", "node_id", "generation", "master", "view_version"] {
                    let _ = writeln!(out, "{key}:{}", stats.get(key).map(scalar).unwrap_or_default());
                }
                let members = stats.get("members").and_then(Value::as_array).map_or(0, Vec::len);
                let _ = writeln!(out, "members:{members}");
            }
            "members" => rows(&mut out, &stats["members"], "node_id"),
            "maps" => rows(&mut out, &stats["maps"], "name"),
            other => flatten(&mut out, "", &stats[other]),
        }
    }
    out
}
