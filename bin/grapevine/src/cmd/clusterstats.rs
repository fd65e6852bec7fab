//! `grapevine clusterstats`: what a running member knows about the cluster, read from its admin
//! endpoint's `/stats`, printed like Open-Xchange's `showruntimestats -c` (or as JSON).
//!
//! The printer reads the document into structs where every field has a default and unknown
//! fields are ignored, so a CLI of one version can read the `/stats` of another.

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

/// The `/stats` document, as far as this CLI knows it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub cluster_name: String,
    pub node_id: String,
    pub generation: u64,
    pub master: Option<String>,
    pub view_version: u64,
    pub members: Vec<MemberRow>,
    pub local: Local,
    pub gossip: Gossip,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct MemberRow {
    pub node_id: String,
    pub generation: u64,
    pub gossip_addr: String,
    pub data_addr: String,
    pub admin_addr: Option<String>,
    pub protocol_version: String,
    pub state: String,
    pub uptime_s: u64,
    pub is_master: bool,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Local {
    pub state: String,
    pub healthy: bool,
    pub health_reason: Option<String>,
    pub uptime_s: u64,
    pub config: RuntimeConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    pub bind: String,
    pub public_address: String,
    pub port: u16,
    pub port_range: String,
    pub admin_addr: Option<String>,
    pub discovery: String,
    pub members: Vec<String>,
    pub gossip_interval_ms: u64,
    pub phi_threshold: f64,
    pub failure_detection_ms: u64,
    pub dead_member_grace_s: u64,
    pub join_timeout_ms: u64,
    pub probe_interval_ms: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Gossip {
    pub gossip_rounds: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub foreign_cluster_peers: u64,
    pub incompatible_members: u64,
    pub events: u64,
    pub view_version: u64,
}

/// Sections of `/stats` this printer knows.
const KNOWN_SECTIONS: &[&str] =
    &["cluster_name", "node_id", "generation", "master", "view_version", "members", "local", "gossip"];

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

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
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

    let g = &stats.gossip;
    let _ = writeln!(out, "\nGOSSIP");
    row(&mut out, "Gossip rounds", &g.gossip_rounds.to_string());
    row(&mut out, "Datagrams in/out", &format!("{} / {}", g.datagrams_in, g.datagrams_out));
    row(&mut out, "Member events", &g.events.to_string());
    row(&mut out, "Foreign peers", &g.foreign_cluster_peers.to_string());
    row(&mut out, "Incompatible", &g.incompatible_members.to_string());

    let _ = writeln!(out, "\nMEMBERS");
    let header = ["NODE ID", "GOSSIP ADDR", "ADMIN ADDR", "VERSION", "STATE", "UPTIME", "MASTER"];
    let rows: Vec<[String; 7]> = stats
        .members
        .iter()
        .map(|m| {
            let node = if m.node_id == stats.node_id { format!("{} (this)", m.node_id) } else { m.node_id.clone() };
            [
                node,
                or_dash(&m.gossip_addr).to_string(),
                m.admin_addr.clone().unwrap_or_else(|| "-".to_string()),
                or_dash(&m.protocol_version).to_string(),
                or_dash(&m.state).to_string(),
                format_uptime(m.uptime_s),
                if m.is_master { "*".to_string() } else { String::new() },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[&str]| {
        let mut text = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &header);
    for r in &rows {
        line(&mut out, &r.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
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
        "probe_interval_ms": 2000, "net": {"connect_timeout_ms": 1000}}},
      "gossip": {"gossip_rounds": 12, "datagrams_in": 30, "datagrams_out": 31, "foreign_cluster_peers": 0,
        "incompatible_members": 0, "events": 3, "view_version": 7, "bytes_in": 99},
      "partitions": {"count": 271, "epoch": 4},
      "maps": [{"name": "sessions", "entries": 10}]
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
            "MEMBERS",
            "not shown by this version of the CLI: maps, partitions",
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
    }

    #[test]
    fn a_sparse_document_still_prints() {
        let doc: Value = serde_json::from_str(r#"{"cluster_name": "x", "future": 1}"#).unwrap();
        let text = render(&parse(&doc).unwrap(), &extra_sections(&doc));
        assert!(text.contains("Master             none"), "{text}");
        assert!(text.contains("(none)"), "{text}");
        assert!(text.contains("future"), "{text}");
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
}
