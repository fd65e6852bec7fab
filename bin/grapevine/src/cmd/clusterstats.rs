//! `grapevine clusterstats`: what a running member knows about the cluster, read from its admin
//! endpoint's `/stats`, printed like Open-Xchange's `showruntimestats -c` (or as JSON).
//!
//! The printer reads the document into the member's own stats types
//! (`grapevine::stats::ClusterStats`), where every field has a default and unknown fields are
//! ignored, so a CLI of one version can read the `/stats` of another, and a counter is added in
//! one place.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::Args;
use serde::Deserialize;
use serde_json::Value;

use crate::Failure;
use crate::client::{AdminClient, DEFAULT_NODE, REQUEST_TIMEOUT};

/// Print cluster statistics from a running member.
#[derive(Debug, Args)]
pub struct ClusterStatsArgs {
    /// The admin address of a member (`host:port`; `host` means port 5801).
    #[arg(long, value_name = "HOST:ADMIN_PORT", default_value = DEFAULT_NODE)]
    pub node: String,
    /// Print the `/stats` document as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ClusterStatsArgs) -> Result<(), Failure> {
    let client = AdminClient::new(&args.node, REQUEST_TIMEOUT).map_err(Failure::usage)?;
    let reply = client.get("/stats").map_err(Failure::error)?;
    if reply.status != 200 {
        return Err(Failure::error(format!(
            "{} answered GET /stats with HTTP {}: {}",
            client.node(),
            reply.status,
            crate::client::error_message(&reply.body)
        )));
    }
    if args.json {
        let text = serde_json::to_string_pretty(&reply.body).unwrap_or_else(|_| reply.body.to_string());
        println!("{text}");
        return Ok(());
    }
    let stats = parse(&reply.body).map_err(|e| {
        Failure::error(format!("{} answered GET /stats with a document this CLI cannot read: {e}", client.node()))
    })?;
    print!("{}", render(&stats, &extra_sections(&reply.body)));
    Ok(())
}

/// The `/stats` document: the member's own type (every field has a default and unknown fields are
/// ignored, so documents of other versions read too).
pub use grapevine::stats::ClusterStats as Stats;

/// Sections of `/stats` this printer knows.
const KNOWN_SECTIONS: &[&str] = &[
    "cluster_name",
    "node_id",
    "generation",
    "master",
    "view_version",
    "members",
    "local",
    "gossip",
    "partitions",
    "maps",
    "topics",
];

pub fn parse(doc: &Value) -> Result<Stats, serde_json::Error> {
    Stats::deserialize(doc)
}

/// Top-level sections this printer does not show (newer members serve more than older CLIs know).
pub fn extra_sections(doc: &Value) -> Vec<String> {
    doc.as_object()
        .map(|o| o.keys().filter(|k| !KNOWN_SECTIONS.contains(&k.as_str())).cloned().collect())
        .unwrap_or_default()
}

/// `1d 02h 03m`, `2h 03m 04s`, `3m 04s`, `5s`.
pub fn format_uptime(seconds: u64) -> String {
    let (d, h, m, s) = (seconds / 86_400, seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// The line under the near-cache table.
const NEAR_CACHE_LEGEND: &str = "  (summed over members; PURGES: partitions dropped at once after a missed event, \
                                 an owner change or a silent owner)";

/// The line under the topics table.
const TOPIC_LEGEND: &str = "  (RECEIVED: once per subscriber; DROPPED: slow subscribers, or discard_newest; \
                            LOST: behind the ring buffer)";

/// The line under the maps table.
const MAP_LEGEND: &str = "  (ENTRIES: owned copies; BACKUP: backup copies; P99: the highest of any member; \
                          SYNC+ASYNC: backups configured)";

/// Map names longer than this are cut in the table (`--json` has them whole).
const MAP_NAME_WIDTH: usize = 28;

/// `text`, cut to `width` characters with `…` when longer.
fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// A counter: exact below a million, then `1.2M`, `9.9G`, `1.0T`.
pub fn format_count(n: u64) -> String {
    match n {
        0..1_000_000 => n.to_string(),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        1_000_000_000..1_000_000_000_000 => format!("{:.1}G", n as f64 / 1e9),
        _ => format!("{:.1}T", n as f64 / 1e12),
    }
}

/// A latency in microseconds: `850 µs`, `12.3 ms`, `1.25 s`.
pub fn format_micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A size in bytes: `512 B`, `1.5 KiB`, `12.0 MiB`, `1.25 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

/// A table: a header and rows of cells, columns two spaces apart; `numeric` columns are aligned
/// right. No trailing spaces.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], numeric: &[bool]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::from("  ");
        for (i, cell) in cells.enumerate() {
            let w = widths[i];
            if numeric.get(i).copied().unwrap_or(false) {
                let _ = write!(text, "{cell:>w$}  ");
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, &mut header.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
}

/// The node id, marked when it is the answering member.
fn this(stats: &Stats, node_id: &str) -> String {
    if node_id == stats.node_id { format!("{node_id} (this)") } else { node_id.to_string() }
}

/// The tables, as printed.
pub fn render(stats: &Stats, extra: &[String]) -> String {
    let mut out = String::new();
    let row = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<19}{value}");
    };

    let _ = writeln!(out, "CLUSTER");
    row(&mut out, "Name", or_dash(&stats.cluster_name));
    row(&mut out, "Master", stats.master.as_deref().unwrap_or("none"));
    let active = stats.members.iter().filter(|m| m.state == "active").count();
    row(&mut out, "Members", &format!("{} ({active} active)", stats.members.len()));
    row(&mut out, "View version", &stats.view_version.to_string());

    let local = &stats.local;
    let config = &local.config;
    let _ = writeln!(out, "\nTHIS NODE");
    row(&mut out, "Node id", or_dash(&stats.node_id));
    let health = match (&local.healthy, &local.health_reason) {
        (true, _) => "healthy".to_string(),
        (false, Some(reason)) => format!("NOT healthy: {reason}"),
        (false, None) => "NOT healthy".to_string(),
    };
    row(&mut out, "State", &format!("{}, {health}", or_dash(&local.state)));
    row(&mut out, "Uptime", &format_uptime(local.uptime_s));
    let bind = match config.bind.as_str() {
        "0.0.0.0" | "::" => format!("{} (all interfaces)", config.bind),
        other => or_dash(other).to_string(),
    };
    row(&mut out, "Bind", &bind);
    row(&mut out, "Public address", or_dash(&config.public_address));
    row(&mut out, "Port", &format!("{} (range {}; TCP data, UDP gossip)", config.port, or_dash(&config.port_range)));
    row(&mut out, "Admin address", config.admin_addr.as_deref().unwrap_or("disabled"));
    let discovery = if config.members.is_empty() {
        or_dash(&config.discovery).to_string()
    } else {
        format!("{}: {}", or_dash(&config.discovery), config.members.join(", "))
    };
    row(&mut out, "Discovery", &discovery);
    row(&mut out, "Gossip interval", &format!("{} ms", config.gossip_interval_ms));
    row(&mut out, "Phi threshold", &config.phi_threshold.to_string());
    row(&mut out, "Failure detection", &format!("{} ms", config.failure_detection_ms));
    row(&mut out, "Dead member grace", &format!("{} s", config.dead_member_grace_s));
    row(&mut out, "Join timeout", &format!("{} ms", config.join_timeout_ms));
    row(&mut out, "Probe interval", &format!("{} ms", config.probe_interval_ms));
    let merge = format!(
        "after {} s running, with the other group visible for {} s",
        config.merge_first_run_delay_s, config.merge_run_delay_s
    );
    row(&mut out, "Merge groups", &merge);

    let g = &stats.gossip;
    let _ = writeln!(out, "\nGOSSIP");
    row(&mut out, "Gossip rounds", &g.gossip_rounds.to_string());
    row(&mut out, "Datagrams in/out", &format!("{} / {}", g.datagrams_in, g.datagrams_out));
    row(&mut out, "Member events", &g.events.to_string());
    row(&mut out, "Foreign peers", &g.foreign_cluster_peers.to_string());
    row(&mut out, "Incompatible", &g.incompatible_members.to_string());
    row(&mut out, "Other groups", &format!("{} members waiting for the merge timers", g.outside_members));
    let last = match &g.last_merge {
        Some((at_ms, master)) => format!(" (last: the group of {master}, at {at_ms} ms since the epoch)"),
        None => String::new(),
    };
    row(&mut out, "Groups merged", &format!("{}{last}", g.groups_merged));

    let _ = writeln!(out, "\nMEMBERS");
    let header = ["NODE ID", "GOSSIP ADDR", "ADMIN ADDR", "VERSION", "STATE", "UPTIME", "MASTER"];
    let rows: Vec<Vec<String>> = stats
        .members
        .iter()
        .map(|m| {
            vec![
                this(stats, &m.node_id),
                or_dash(&m.gossip_addr).to_string(),
                m.admin_addr.clone().unwrap_or_else(|| "-".to_string()),
                or_dash(&m.protocol_version).to_string(),
                or_dash(&m.state).to_string(),
                format_uptime(m.uptime_s),
                if m.is_master { "*".to_string() } else { String::new() },
            ]
        })
        .collect();
    table(&mut out, &header, &rows, &[]);

    if let Some(p) = &stats.partitions {
        let _ = writeln!(out, "\nPARTITIONS");
        row(&mut out, "Count", &p.count.to_string());
        row(&mut out, "Table epoch", &p.epoch.to_string());
        let is_master = stats.master.is_some() && stats.master.as_deref() == Some(stats.node_id.as_str());
        let migrating = match stats.master.as_deref() {
            _ if is_master => p.migrating.to_string(),
            Some(master) => format!("{} (only the master counts them: ask {master})", p.migrating),
            None => format!("{} (only the master counts them; there is none)", p.migrating),
        };
        row(&mut out, "Migrations", &migrating);
        // Every member of the view, and any other node id the table names.
        let mut nodes: BTreeMap<&str, (u32, u32)> =
            stats.members.iter().map(|m| (m.node_id.as_str(), (0, 0))).collect();
        for (node, n) in &p.owned_by_member {
            nodes.entry(node).or_default().0 = *n;
        }
        for (node, n) in &p.backups_by_member {
            nodes.entry(node).or_default().1 = *n;
        }
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|(node, (owned, backups))| vec![this(stats, node), owned.to_string(), backups.to_string()])
            .collect();
        let _ = writeln!(out);
        table(&mut out, &["NODE ID", "OWNED", "BACKUPS"], &rows, &[false, true, true]);
    }

    if stats.partitions.is_some() || !stats.maps.is_empty() {
        let _ = writeln!(out, "\nMAPS (cluster-wide; each member's part: --json)");
        let header = [
            "NAME",
            "ENTRIES",
            "BACKUP",
            "HITS",
            "GETS",
            "PUTS",
            "REMOVES",
            "GET P99",
            "PUT P99",
            "MEMORY",
            "SYNC+ASYNC",
        ];
        let rows: Vec<Vec<String>> = stats
            .maps
            .iter()
            .map(|m| {
                vec![
                    shorten(or_dash(&m.name), MAP_NAME_WIDTH),
                    m.owned_entries.to_string(),
                    m.backup_entries.to_string(),
                    format_count(m.hits),
                    format_count(m.gets),
                    format_count(m.puts),
                    format_count(m.removes),
                    format_micros(m.get_p99_us),
                    format_micros(m.put_p99_us),
                    format_bytes(m.memory_bytes),
                    format!("{}+{}", m.backup_count, m.async_backup_count),
                ]
            })
            .collect();
        let mut numeric = [true; 11];
        numeric[0] = false;
        table(&mut out, &header, &rows, &numeric);
        if !rows.is_empty() {
            let _ = writeln!(out, "{MAP_LEGEND}");
        }
        for m in stats.maps.iter().filter(|m| m.under_replicated_partitions > 0 || m.under_replicated_writes > 0) {
            let _ = writeln!(
                out,
                "  UNDER-REPLICATED {}: {} partitions have fewer than {} synchronous backups, {} writes were \
                 acknowledged with fewer (too few members: start more, or lower backup_count)",
                or_dash(&m.name),
                m.under_replicated_partitions,
                m.backup_count,
                m.under_replicated_writes
            );
        }
    }

    let near_cached: Vec<_> = stats.maps.iter().filter_map(|m| m.near_cache.as_ref().map(|n| (&m.name, n))).collect();
    if !near_cached.is_empty() {
        let _ = writeln!(out, "\nNEAR CACHES (cluster-wide; each member's part: --json)");
        let header = ["MAP", "ENTRIES", "HITS", "MISSES", "HIT RATIO", "INVALIDATIONS", "PURGES"];
        let rows: Vec<Vec<String>> = near_cached
            .iter()
            .map(|(name, n)| {
                let reads = n.hits + n.misses;
                let ratio =
                    if reads == 0 { "-".to_string() } else { format!("{:.1} %", n.hits as f64 * 100.0 / reads as f64) };
                vec![
                    shorten(or_dash(name), MAP_NAME_WIDTH),
                    format_count(n.entries),
                    format_count(n.hits),
                    format_count(n.misses),
                    ratio,
                    format_count(n.invalidations),
                    format_count(n.purges),
                ]
            })
            .collect();
        let mut numeric = [true; 7];
        numeric[0] = false;
        table(&mut out, &header, &rows, &numeric);
        let _ = writeln!(out, "{NEAR_CACHE_LEGEND}");
    }

    if stats.partitions.is_some() || !stats.topics.is_empty() {
        let _ = writeln!(out, "\nTOPICS (cluster-wide; each member's part: --json)");
        let header = ["NAME", "KIND", "PUBLISHED", "RECEIVED", "SUBSCRIBERS", "DROPPED", "LOST", "MALFORMED", "STORED"];
        let rows: Vec<Vec<String>> = stats
            .topics
            .iter()
            .map(|t| {
                let reliable = t.kind == "reliable";
                vec![
                    shorten(or_dash(&t.name), MAP_NAME_WIDTH),
                    or_dash(&t.kind).to_string(),
                    format_count(t.published),
                    format_count(t.received),
                    t.subscribers.to_string(),
                    format_count(t.dropped),
                    if reliable { format_count(t.lost) } else { "-".to_string() },
                    format_count(t.malformed),
                    if reliable { format_count(t.stored) } else { "-".to_string() },
                ]
            })
            .collect();
        let mut numeric = [true; 9];
        numeric[0] = false;
        numeric[1] = false;
        table(&mut out, &header, &rows, &numeric);
        if !rows.is_empty() {
            let _ = writeln!(out, "{TOPIC_LEGEND}");
        }
    }

    if !stats.maps.is_empty() {
        let _ = writeln!(out, "\nSPLIT BRAIN (per map: merge policy, protection, merges cluster-wide)");
        let rows: Vec<Vec<String>> = stats
            .maps
            .iter()
            .map(|m| {
                let min = if m.min_cluster_size == 0 { "off".to_string() } else { m.min_cluster_size.to_string() };
                vec![
                    shorten(or_dash(&m.name), MAP_NAME_WIDTH),
                    or_dash(&m.merge_policy).to_string(),
                    min,
                    format_count(m.merge_kept_existing),
                    format_count(m.merge_took_merging),
                ]
            })
            .collect();
        let header = ["NAME", "MERGE POLICY", "MIN MEMBERS", "KEPT EXISTING", "TOOK MERGING"];
        table(&mut out, &header, &rows, &[false, false, true, true, true]);
    }

    if !extra.is_empty() {
        let _ = writeln!(out, "\n(not shown by this version of the CLI: {}; see --json)", extra.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANNED: &str = r#"{
      "cluster_name": "sessions-prod",
      "node_id": "web-2",
      "generation": 1700000001000,
      "master": "web-1",
      "view_version": 7,
      "members": [
        {"node_id": "web-1", "generation": 1700000000000, "gossip_addr": "10.0.0.1:5701",
         "data_addr": "10.0.0.1:5701", "admin_addr": "10.0.0.1:5801", "protocol_version": "1.0",
         "state": "active", "uptime_s": 93784, "is_master": true, "attributes": {"zone": "eu-1"},
         "owned_partitions": 136},
        {"node_id": "web-2", "generation": 1700000001000, "gossip_addr": "10.0.0.2:5701",
         "data_addr": "10.0.0.2:5701", "admin_addr": null, "protocol_version": "1.0",
         "state": "joining", "uptime_s": 65, "is_master": false, "attributes": {}}
      ],
      "local": {"state": "joining", "healthy": false, "health_reason": "joining: looking for the cluster",
        "uptime_s": 65, "config": {"bind": "0.0.0.0", "public_address": "10.0.0.2", "port": 5701,
        "port_range": "5701-5800", "admin_addr": "0.0.0.0:5801", "discovery": "static",
        "members": ["10.0.0.1", "10.0.0.2"], "gossip_interval_ms": 1000, "phi_threshold": 8.0,
        "failure_detection_ms": 9000, "dead_member_grace_s": 900, "join_timeout_ms": 5000,
        "probe_interval_ms": 2000, "merge_first_run_delay_s": 20, "merge_run_delay_s": 10,
        "net": {"connect_timeout_ms": 1000}}},
      "gossip": {"gossip_rounds": 12, "datagrams_in": 30, "datagrams_out": 31, "foreign_cluster_peers": 0,
        "incompatible_members": 0, "events": 3, "view_version": 7, "bytes_in": 99},
      "partitions": {"count": 271, "epoch": 4, "migrating": 2, "owned_by_member": {"web-1": 136, "web-2": 135},
        "backups_by_member": {"web-1": 135, "web-2": 136, "web-9": 0}, "replicas_by_member": {}},
      "maps": [
        {"name": "sessions", "owned_entries": 1234567, "backup_entries": 1234567, "hits": 9876543210,
         "gets": 9999999999, "puts": 123456789, "removes": 4567, "get_p99_us": 850, "put_p99_us": 12345,
         "memory_bytes": 1610612736, "backup_count": 1, "async_backup_count": 0, "eviction": "lru",
         "near_cache": {"map": "sessions", "entries": 420, "hits": 9000, "misses": 1000, "invalidations": 12,
           "purges": 3},
         "memory_bytes": 1610612736, "backup_count": 1, "async_backup_count": 0,          "merge_kept_existing": 12, "merge_took_merging": 3456789, "merge_policy": "latest-update",
         "min_cluster_size": 2,
         "per_member": [{"node_id": "web-1", "name": "sessions", "owned_entries": 617283}]},
        {"name": "a-map-with-a-rather-long-name", "owned_entries": 0, "backup_entries": 0, "hits": 0,
         "gets": 0, "puts": 0, "removes": 0, "get_p99_us": 2500000, "put_p99_us": 0, "memory_bytes": 1536,
         "backup_count": 2, "async_backup_count": 1, "per_member": []},
        {"name": "sparse"}
      ],
      "topics": [
        {"name": "cache-invalidation", "kind": "topic", "published": 1500000, "received": 4500000,
         "subscribers": 3, "dropped": 7, "lost": 0, "malformed": 1, "per_member": []},
        {"name": "orders", "kind": "reliable", "published": 42, "received": 84, "subscribers": 2, "dropped": 0,
         "lost": 5, "stored": 42, "memory_bytes": 9000}
      ],
      "queues": []
    }"#;

    #[test]
    fn prints_every_section_and_tolerates_unknown_fields() {
        let doc: Value = serde_json::from_str(CANNED).unwrap();
        let stats = parse(&doc).unwrap();
        let text = render(&stats, &extra_sections(&doc));
        for expected in [
            "CLUSTER",
            "sessions-prod",
            "Master             web-1",
            "Members            2 (1 active)",
            "View version       7",
            "THIS NODE",
            "Node id            web-2",
            "joining, NOT healthy: joining: looking for the cluster",
            "Uptime             1m 05s",
            "0.0.0.0 (all interfaces)",
            "Public address     10.0.0.2",
            "5701 (range 5701-5800",
            "Admin address      0.0.0.0:5801",
            "static: 10.0.0.1, 10.0.0.2",
            "Gossip interval    1000 ms",
            "Phi threshold      8",
            "Failure detection  9000 ms",
            "Dead member grace  900 s",
            "Join timeout       5000 ms",
            "Probe interval     2000 ms",
            "Merge groups       after 20 s running, with the other group visible for 10 s",
            "SPLIT BRAIN",
            "MEMBERS",
            "PARTITIONS",
            "Count              271",
            "Table epoch        4",
            "Migrations         2 (only the master counts them: ask web-1)",
            "MAPS",
            "NEAR CACHES",
            "TOPICS",
            "not shown by this version of the CLI: queues",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.trim_start().starts_with("NODE ID")).unwrap();
        let web1 = lines[header + 1];
        assert!(web1.contains("web-1") && web1.contains("10.0.0.1:5801") && web1.ends_with('*'), "{web1}");
        assert!(web1.contains("1d 02h 03m"), "{web1}");
        let web2 = lines[header + 2];
        assert!(web2.contains("web-2 (this)") && web2.contains("joining") && !web2.ends_with('*'), "{web2}");
        // Columns line up: every row starts its second column at the same offset.
        let col = lines[header].find("GOSSIP ADDR").unwrap();
        assert_eq!(web1.find("10.0.0.1:5701"), Some(col));
        assert_eq!(web2.find("10.0.0.2:5701"), Some(col));

        // The partition distribution: every member of the view, and node ids only the table names.
        let cells = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let header = lines.iter().position(|l| l.trim_start().starts_with("NODE ID") && l.contains("OWNED")).unwrap();
        assert_eq!(cells(lines[header]), ["NODE", "ID", "OWNED", "BACKUPS"]);
        assert_eq!(cells(lines[header + 1]), ["web-1", "136", "135"]);
        assert_eq!(cells(lines[header + 2]), ["web-2", "(this)", "135", "136"]);
        assert_eq!(cells(lines[header + 3]), ["web-9", "0", "0"]);

        // The maps: totals in human units, numbers aligned right.
        let header = lines.iter().position(|l| l.trim_start().starts_with("NAME")).unwrap();
        for name in
            ["ENTRIES", "BACKUP", "HITS", "GETS", "PUTS", "REMOVES", "GET P99", "PUT P99", "MEMORY", "SYNC+ASYNC"]
        {
            assert!(lines[header].contains(name), "{name} in {}", lines[header]);
        }
        let sessions = cells(lines[header + 1]);
        assert_eq!(
            sessions,
            [
                "sessions", "1234567", "1234567", "9.9G", "10.0G", "123.5M", "4567", "850", "µs", "12.3", "ms", "1.5",
                "GiB", "1+0"
            ]
        );
        let long = cells(lines[header + 2]);
        assert_eq!(long[0], "a-map-with-a-rather-long-na…");
        assert_eq!(long[7..], ["2.50", "s", "0", "µs", "1.5", "KiB", "2+1"]);
        assert_eq!(cells(lines[header + 3])[0], "sparse");
        assert!(lines[header + 3].trim_end().ends_with("0+0"), "{}", lines[header + 3]);
        // Split brain: policy, protection and merge counts per map.
        let header =
            lines.iter().position(|l| l.trim_start().starts_with("NAME") && l.contains("MERGE POLICY")).unwrap();
        assert_eq!(cells(lines[header + 1]), ["sessions", "latest-update", "2", "12", "3.5M"]);
        assert_eq!(cells(lines[header + 3]), ["sparse", "-", "off", "0", "0"]);
        let header = lines.iter().position(|l| l.trim_start().starts_with("NAME")).unwrap();
        let entries_end = lines[header].find("ENTRIES").unwrap() + "ENTRIES".len();
        assert_eq!(lines[header + 1].find("1234567").map(|i| i + 7), Some(entries_end), "{text}");
        // Near caches and topics.
        let header = lines.iter().position(|l| l.trim_start().starts_with("MAP ")).unwrap();
        assert_eq!(cells(lines[header + 1]), ["sessions", "420", "9000", "1000", "90.0", "%", "12", "3"]);
        let header = lines.iter().position(|l| l.trim_start().starts_with("NAME") && l.contains("KIND")).unwrap();
        for name in ["PUBLISHED", "RECEIVED", "SUBSCRIBERS", "DROPPED", "LOST", "MALFORMED", "STORED"] {
            assert!(lines[header].contains(name), "{name} in {}", lines[header]);
        }
        assert_eq!(cells(lines[header + 1]), ["cache-invalidation", "topic", "1.5M", "4.5M", "3", "7", "-", "1", "-"]);
        assert_eq!(cells(lines[header + 2]), ["orders", "reliable", "42", "84", "2", "0", "5", "0", "42"]);
        for line in &lines {
            assert!(line.chars().count() <= 120, "wider than 120 columns: {line}");
            assert_eq!(line.trim_end(), *line, "trailing spaces: {line:?}");
        }
    }

    #[test]
    fn the_master_reports_its_migrations() {
        let doc: Value = serde_json::from_str(
            r#"{"node_id": "a", "master": "a", "partitions": {"count": 7, "epoch": 2, "migrating": 3,
                "owned_by_member": {"a": 7}}, "maps": []}"#,
        )
        .unwrap();
        let text = render(&parse(&doc).unwrap(), &extra_sections(&doc));
        assert!(text.contains("Migrations         3\n"), "{text}");
        assert!(text.contains("MAPS") && text.contains("(none)"), "{text}");
        assert!(text.contains("TOPICS"), "{text}");
        assert!(!text.contains("NEAR CACHES"), "no map has a near cache: {text}");
        assert!(!text.contains("not shown"), "{text}");
    }

    #[test]
    fn a_sparse_document_still_prints() {
        let doc: Value = serde_json::from_str(r#"{"cluster_name": "x", "future": 1}"#).unwrap();
        let text = render(&parse(&doc).unwrap(), &extra_sections(&doc));
        assert!(text.contains("Master             none"), "{text}");
        assert!(text.contains("(none)"), "{text}");
        assert!(text.contains("future"), "{text}");
        assert!(!text.contains("PARTITIONS") && !text.contains("MAPS"), "{text}");
    }

    #[test]
    fn a_document_of_the_wrong_shape_is_an_error() {
        let doc: Value = serde_json::from_str(r#"{"members": 5}"#).unwrap();
        assert!(parse(&doc).is_err());
    }

    #[test]
    fn uptimes() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(65), "1m 05s");
        assert_eq!(format_uptime(3_725), "1h 02m 05s");
        assert_eq!(format_uptime(93_784), "1d 02h 03m");
    }

    #[test]
    fn human_units() {
        assert_eq!(format_micros(0), "0 µs");
        assert_eq!(format_micros(999), "999 µs");
        assert_eq!(format_micros(1_000), "1.0 ms");
        assert_eq!(format_micros(12_345), "12.3 ms");
        assert_eq!(format_micros(1_250_000), "1.25 s");
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(12 << 20), "12.0 MiB");
        assert_eq!(format_bytes(3 << 40), "3.0 TiB");
        assert_eq!(format_bytes(5000 << 40), "5000.0 TiB");
        assert_eq!(format_count(999_999), "999999");
        assert_eq!(format_count(1_250_000), "1.2M");
        assert_eq!(format_count(25_000_000_000_000), "25.0T");
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "ab…");
    }
}
