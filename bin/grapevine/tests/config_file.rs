//! `config/grapevine.toml` documents every configuration key with its default: it must parse to
//! `Config::default()`, mention every key that `Config` has (those of a `[maps.<name>]` section
//! and `[attributes]` included), and every key it shows commented out must be a real key with a
//! value of the right type, so the documentation cannot drift.

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
/// A map's own name (`maps.<name>.backup_count`) is written `maps.*`, as is an attribute's.
fn keys(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
    let prefix = generic(prefix);
    let prefix = prefix.as_str();
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
    found.into_iter().map(|k| generic(&k)).collect()
}

/// `maps.sessions.backup_count` as `maps.*.backup_count`, `attributes.zone` as `attributes.*`.
fn generic(key: &str) -> String {
    let (bracket, bare) = match key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) {
        Some(inner) => (true, inner),
        None => (false, key),
    };
    let parts: Vec<&str> = bare.split('.').collect();
    let generic = match parts.as_slice() {
        ["maps", _, rest @ ..] => std::iter::once("maps.*").chain(rest.iter().copied()).collect::<Vec<_>>().join("."),
        ["attributes", _] => "attributes.*".to_string(),
        _ => bare.to_string(),
    };
    if bracket { format!("[{generic}]") } else { generic }
}

/// The commented-out assignments (`# key = value`), each with the section it sits in.
fn commented_assignments(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    for line in text.lines() {
        let Some(commented) = line.trim_start().strip_prefix('#') else {
            if let Some(name) = line.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            }
            continue;
        };
        let commented = commented.trim();
        if let Some(name) = commented.strip_prefix('[').and_then(|l| l.strip_suffix(']'))
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            section = name.to_string();
            continue;
        }
        if let Some((key, _)) = commented.split_once(" = ")
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            out.push((section.clone(), commented.to_string()));
        }
    }
    out
}

/// Each commented-out example, uncommented on its own under its section, is accepted: a real key
/// (a misspelt one is an unknown key) with a value of the right type that passes validation.
#[test]
fn every_commented_out_key_is_a_real_key_with_a_valid_value() {
    let examples = commented_assignments(&doc());
    assert!(examples.len() >= 10, "{examples:?}");
    for (section, line) in &examples {
        let text = if section.is_empty() && line.starts_with("mdns_") {
            // The mDNS keys take effect (and are accepted without a warning) with mDNS discovery.
            format!("cluster_name = 'x'\ndiscovery = 'mdns'\n{line}\n")
        } else if section.is_empty() {
            format!("cluster_name = 'x'\n{line}\n")
        } else {
            format!("cluster_name = 'x'\n[{section}]\n{line}\n")
        };
        let config: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("`{line}` under [{section}]: {e}"));
        assert_ne!(config, Config::new("x"), "`{line}` under [{section}] changed nothing");
        let warnings = config.validate().unwrap_or_else(|e| panic!("`{line}` under [{section}]: {e}"));
        assert!(warnings.is_empty(), "`{line}` under [{section}]: {warnings:?}");
    }
    // Every optional key of Config is among the examples.
    let shown: BTreeSet<String> = examples
        .iter()
        .map(|(section, line)| {
            let key = line.split_once(" = ").unwrap().0;
            generic(&if section.is_empty() { key.to_string() } else { format!("{section}.{key}") })
        })
        .collect();
    for key in
        ["node_id", "bind", "public_address", "admin_bind", "resp_bind", "net.outbound_ports", "maps.*.backup_count"]
    {
        assert!(shown.contains(key), "{key} has no commented-out example: {shown:?}");
    }
}

#[test]
fn the_checker_sees_a_misspelt_commented_key() {
    let text = "# [maps.sessions]\n# backup_cuont = 1\n";
    let examples = commented_assignments(text);
    assert_eq!(examples, vec![("maps.sessions".to_string(), "backup_cuont = 1".to_string())]);
    let parsed = toml::from_str::<Config>(&format!("[{}]\n{}\n", examples[0].0, examples[0].1));
    assert!(parsed.unwrap_err().to_string().contains("backup_cuont"));
}

#[test]
fn every_key_is_documented() {
    // The default leaves optional keys out; fill them in so they are checked too.
    let ip = "127.0.0.1".parse().ok();
    let mut full = Config {
        node_id: Some("n".into()),
        bind: ip,
        public_address: ip,
        admin_bind: ip,
        resp_bind: ip,
        ..Config::default()
    };
    full.net.outbound_ports = Some("33000-33100".into());
    full.maps.insert("sessions".into(), grapevine::MapConfig::default());
    full.attributes.insert("zone".into(), "eu-1".into());
    let mut expected = BTreeSet::new();
    keys("", &serde_json::to_value(Config::default()).unwrap(), &mut expected);
    keys("", &serde_json::to_value(&full).unwrap(), &mut expected);
    for key in ["gossip.interval_ms", "node_id", "maps.*.backup_count", "maps.*.max_idle_seconds", "attributes.*"] {
        assert!(expected.contains(key), "{key} in {expected:?}");
    }

    let found = documented(&doc());
    let missing: Vec<&String> = expected.iter().filter(|k| !found.contains(*k)).collect();
    assert!(missing.is_empty(), "config/grapevine.toml does not document {missing:?}");
}

#[test]
fn the_checker_sees_commented_keys_and_sections() {
    let found = documented("a = 1\n# b = 2\n[s]\n# c = 3\n# [maps.sessions]\n# backup_count = 1\n");
    for key in ["a", "b", "s.c", "[s]", "[maps]", "[maps.*]", "maps.*.backup_count"] {
        assert!(found.contains(key), "{key} in {found:?}");
    }
}
