//! `config/grapevine.toml` documents every configuration key with its default: it must parse to
//! `Config::default()` and mention every key that `Config` has, so the documentation cannot drift.

use std::collections::BTreeSet;
use std::path::PathBuf;

use grapevine::Config;
use serde_json::Value;

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/grapevine.toml")
}

fn doc() -> String {
    std::fs::read_to_string(doc_path()).expect("config/grapevine.toml is readable")
}

#[test]
fn the_documented_file_is_the_default_configuration() {
    let parsed: Config = toml::from_str(&doc()).expect("config/grapevine.toml parses into Config");
    assert_eq!(parsed, Config::default());
}

/// Dotted keys of a serialized value: leaves, and empty tables (maps of free-form entries).
fn keys(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                keys(&key, v, out);
            }
        }
        Value::Object(_) => {
            out.insert(format!("[{prefix}]"));
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// Keys the file mentions, commented out or not: `key = ...` lines under `[section]` headers
/// (`# key = ...` and `# [section]` count), and the section headers themselves.
fn documented(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']'))
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            section = name.to_string();
            // `[maps.sessions]` documents the table `maps` too.
            let mut prefix = String::new();
            for part in name.split('.') {
                prefix = if prefix.is_empty() { part.to_string() } else { format!("{prefix}.{part}") };
                found.insert(format!("[{prefix}]"));
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                found.insert(if section.is_empty() { key.to_string() } else { format!("{section}.{key}") });
            }
        }
    }
    found
}

#[test]
fn every_key_is_documented() {
    // The default leaves optional keys out; fill them in so they are checked too.
    let ip = "127.0.0.1".parse().ok();
    let full = Config { node_id: Some("n".into()), bind: ip, public_address: ip, admin_bind: ip, ..Config::default() };
    let mut expected = BTreeSet::new();
    keys("", &serde_json::to_value(Config::default()).unwrap(), &mut expected);
    keys("", &serde_json::to_value(&full).unwrap(), &mut expected);
    assert!(expected.contains("gossip.interval_ms") && expected.contains("node_id"), "{expected:?}");

    let found = documented(&doc());
    let missing: Vec<&String> = expected.iter().filter(|k| !found.contains(*k)).collect();
    assert!(missing.is_empty(), "config/grapevine.toml does not document {missing:?}");
}

#[test]
fn the_checker_sees_commented_keys_and_sections() {
    let found = documented("a = 1\n# b = 2\n[s]\n# c = 3\n# [maps.sessions]\n# backup_count = 1\n");
    for key in ["a", "b", "s.c", "[s]", "[maps]", "[maps.sessions]", "maps.sessions.backup_count"] {
        assert!(found.contains(key), "{key} in {found:?}");
    }
}
