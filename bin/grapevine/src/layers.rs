//! The configuration of `grapevine start`, in layers: built-in defaults < TOML file (`--config`)
//! < environment (`GRAPEVINE_*`, nested keys joined with `__`) < command-line flags. Every error
//! names the key (dotted), where its value came from, and what is expected.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use grapevine::Config;
use serde::Serialize;

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "GRAPEVINE_";

/// Environment variables with the prefix that are not configuration keys: `GRAPEVINE_CONFIG`
/// (read by clap), and `GRAPEVINE_REQUIRE_TOOLS` / `GRAPEVINE_ALLOW_SKIP` (read by the tests,
/// set by CI, so a member started in that environment must not take them for keys).
const ENV_NOT_KEYS: &[&str] = &["config", "require_tools", "allow_skip"];

/// Keys whose environment values are always strings, even when they look like numbers
/// (`GRAPEVINE_NODE_ID=7`, `GRAPEVINE_CLUSTER_NAME=2024`).
const STRING_KEYS: &[&str] = &[
    "cluster_name",
    "node_id",
    "members",
    "discovery",
    "mdns_interfaces",
    "log_format",
    "bind",
    "public_address",
    "admin_bind",
    "resp_bind",
    "resp_default_map",
];

/// Values given as command-line flags; `None` leaves the lower layers in charge.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resp_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_first_run_delay_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_run_delay_seconds: Option<f64>,
}

/// The command-line flag that sets `key`, for messages.
fn flag_for(key: &str) -> String {
    // The merge timers' flags leave the unit to their value name (`--merge-run-delay SECONDS`).
    let key = match key {
        "merge_first_run_delay_seconds" | "merge_run_delay_seconds" => key.trim_end_matches("_seconds"),
        _ => key,
    };
    format!("--{}", key.replace('_', "-"))
}

/// A configuration that cannot be used: one to a few lines for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFailure(pub String);

impl std::fmt::Display for ConfigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds the configuration from every layer and validates it. (Validation warnings are logged
/// by `Cluster::start`, which validates again.)
pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigFailure> {
    let env = std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()));
    load_with_env(file, flags, env)
}

/// [`load`] with the environment given as `(name, value)` pairs instead of read from the process:
/// the tests choose exactly what they set.
pub fn load_with_env(
    file: Option<&Path>,
    flags: &FlagOverrides,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigFailure> {
    let figment = figment(file, flags, env_data(env))?;
    let config: Config = figment.extract().map_err(|e| describe_figment_error(&figment, e))?;
    config.validate().map_err(|e| {
        let source = source_of(&figment, &e.key).map(|s| format!(" ({s})")).unwrap_or_default();
        ConfigFailure(format!("invalid configuration: `{}`{source}: {}", e.key, e.message))
    })?;
    Ok(config)
}

fn figment(file: Option<&Path>, flags: &FlagOverrides, env: Map<Profile, Dict>) -> Result<Figment, ConfigFailure> {
    let mut figment = Figment::from(Layer {
        name: "built-in default",
        describe: |_| "built-in default".to_string(),
        data: Serialized::defaults(Config::default()).data(),
    });
    if let Some(path) = file {
        // figment treats a missing file as empty; an operator who names a file means it.
        if let Err(error) = std::fs::read_to_string(path) {
            return Err(ConfigFailure(format!("cannot read the configuration file {}: {error}", path.display())));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Layer {
        name: "environment variable",
        describe: |keys| format!("environment variable {ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase()),
        data: Ok(env),
    });
    figment = figment.merge(Layer {
        name: "command-line flag",
        describe: |keys| format!("flag {}", flag_for(&keys.join("."))),
        data: Serialized::defaults(flags).data(),
    });
    Ok(figment)
}

/// The configuration key of environment variable `name`, if it is one: the prefix (in any case)
/// removed, `__` turned into `.`, lower-cased; `None` for other variables and [`ENV_NOT_KEYS`].
/// (What figment's `Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_NOT_KEYS)` does, on any
/// list of variables rather than only the process's.)
fn env_key(name: &str) -> Option<String> {
    let name = name.trim();
    let prefix = name.get(..ENV_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(ENV_PREFIX) {
        return None;
    }
    let key = name[ENV_PREFIX.len()..].replace("__", ".").to_ascii_lowercase();
    if key.is_empty() || key.split('.').any(str::is_empty) || ENV_NOT_KEYS.contains(&key.as_str()) {
        return None;
    }
    Some(key)
}

/// `GRAPEVINE_*` variables as nested configuration values: `GRAPEVINE_GOSSIP__INTERVAL_MS=100`
/// is `gossip.interval_ms = 100`. Values are parsed as TOML-like scalars (numbers, booleans), except
/// for keys that are strings whatever they look like.
fn env_data(env: impl IntoIterator<Item = (String, String)>) -> Map<Profile, Dict> {
    let mut dict = Dict::new();
    for (key, raw) in env.into_iter().filter_map(|(name, value)| Some((env_key(&name)?, value))) {
        let key = key.as_str();
        let value = if STRING_KEYS.contains(&key) || key.starts_with("attributes.") {
            Value::from(raw)
        } else {
            raw.parse::<Value>().unwrap_or_else(|_| Value::from(raw))
        };
        let Some(nested) = figment::util::nest(key, value).into_dict() else { continue };
        dict = merge_dicts(dict, nested);
    }
    Profile::Default.collect(dict)
}

fn merge_dicts(mut into: Dict, from: Dict) -> Dict {
    for (key, value) in from {
        let merged = match (into.remove(&key), value) {
            (Some(Value::Dict(_, old)), Value::Dict(tag, new)) => Value::Dict(tag, merge_dicts(old, new)),
            (_, value) => value,
        };
        into.insert(key, merged);
    }
    into
}

/// A provider with a name and a way to say where a key came from.
struct Layer {
    name: &'static str,
    describe: fn(&[&str]) -> String,
    data: Result<Map<Profile, Dict>, figment::Error>,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let describe = self.describe;
        Metadata::named(self.name).interpolater(move |_: &Profile, keys: &[&str]| describe(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.data.clone()
    }
}

/// Where the value of `key` came from: `file /etc/x.toml`, `environment variable GRAPEVINE_X`,
/// `flag --x`, `built-in default`.
fn source_of(figment: &Figment, key: &str) -> Option<String> {
    let metadata = figment.find_metadata(key)?;
    Some(describe_metadata(metadata, key))
}

fn describe_metadata(metadata: &Metadata, key: &str) -> String {
    if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
        return format!("in file {}", path.display());
    }
    let keys: Vec<&str> = key.split('.').collect();
    metadata.interpolate(&Profile::Default, &keys)
}

fn describe_figment_error(figment: &Figment, error: figment::Error) -> ConfigFailure {
    let mut out = String::new();
    for (i, e) in error.into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut path = e.path.clone();
        // The key at fault: for an unknown field, the field itself (figment usually has it already).
        if let figment::error::Kind::UnknownField(field, _) = &e.kind
            && path.last() != Some(field)
        {
            path.push(field.clone());
        }
        let key = path.join(".");
        let source = if key.is_empty() { None } else { source_of(figment, &key) }
            .or_else(|| e.metadata.as_ref().map(|m| describe_metadata(m, &key)));
        let what = describe_kind(&key, &e.kind);
        let _ = match (key.is_empty(), source) {
            (true, Some(source)) => write!(out, "invalid configuration {source}: {what}"),
            (true, None) => write!(out, "invalid configuration: {what}"),
            (false, Some(source)) => write!(out, "invalid configuration: `{key}` ({source}): {what}"),
            (false, None) => write!(out, "invalid configuration: `{key}`: {what}"),
        };
    }
    ConfigFailure(out)
}

fn describe_kind(key: &str, kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(field, expected) => {
            let known = expected.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            format!("unknown key `{field}` (check the spelling; keys here are {known})")
        }
        Kind::Message(message) if key == "members" && message.contains("untagged") => {
            "expected a list of `host[:port]` strings or one comma-separated string".to_string()
        }
        Kind::UnknownVariant(value, expected) => {
            let known = expected.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ");
            format!("unknown value `{value}`, expected {known}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn write_temp(name: &str, contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("grapevine-layers-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Every test names its environment: an exported `GRAPEVINE_*` variable of the shell that
    /// runs the tests must not change their results.
    fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigFailure> {
        load_with_env(file, flags, [])
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn flags_override_the_file() {
        let path = write_temp("flags", "cluster_name = 'from-file'\nport = 6000\n[gossip]\ninterval_ms = 250\n");
        let flags = FlagOverrides { cluster_name: Some("from-flag".into()), ..Default::default() };
        let loaded = load(Some(&path), &flags).unwrap();
        assert_eq!(loaded.cluster_name, "from-flag");
        assert_eq!(loaded.port, 6000);
        assert_eq!(loaded.gossip.interval_ms, 250);
        assert_eq!(loaded.admin_port, 5801);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn file_errors_name_the_key_and_the_file() {
        let path = write_temp("unknown", "cluster_name = 'x'\n[gossip]\ninterval = 5\n");
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`gossip.interval`"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("default."), "{err}");

        std::fs::write(&path, "cluster_name = 'x'\nport = 'abc'\n").unwrap();
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`port`") && err.contains("u16"), "{err}");

        std::fs::write(&path, "cluster_name = 'x'\nbind = '10.0.0.300'\n").unwrap();
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`bind`") && err.contains("IP address"), "{err}");

        std::fs::write(&path, "cluster_name = 'x'\nmembers = 5\n").unwrap();
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`members`") && err.contains("comma-separated"), "{err}");

        std::fs::write(&path, "cluster_name = 'x'\nlog_format = 'xml'\n").unwrap();
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`log_format`") && err.contains("`json`"), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn validation_errors_name_the_flag() {
        let flags = FlagOverrides {
            cluster_name: Some("x".into()),
            members: Some("10.0.0.1:99999".into()),
            ..Default::default()
        };
        let err = load(None, &flags).unwrap_err().0;
        assert!(err.contains("`members`") && err.contains("flag --members"), "{err}");
        let err = load(None, &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`cluster_name`") && err.contains("built-in default"), "{err}");
        let flags = FlagOverrides {
            cluster_name: Some("x".into()),
            members: Some("10.0.0.1".into()),
            discovery: Some("mdns".into()),
            ..Default::default()
        };
        let err = load(None, &flags).unwrap_err().0;
        assert!(
            err.contains("`discovery`") && err.contains("flag --discovery") && err.contains("mutually exclusive"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_overrides_the_file_and_flags_override_the_environment() {
        let path = write_temp(
            "env",
            "cluster_name = 'from-file'\nport = 6000\nnode_id = 'file'\n[gossip]\ninterval_ms = 250\n",
        );
        let env = vars(&[
            ("GRAPEVINE_CLUSTER_NAME", "2024"),
            ("GRAPEVINE_NODE_ID", "7"),
            ("grapevine_gossip__interval_ms", "300"),
            ("GRAPEVINE_MEMBERS", "10.0.0.1, 10.0.0.2:5701"),
            ("GRAPEVINE_MAPS__SESSIONS__BACKUP_COUNT", "2"),
            ("GRAPEVINE_ATTRIBUTES__ZONE", "1"),
            // Not keys: read by clap and by the tests.
            ("GRAPEVINE_CONFIG", "/elsewhere.toml"),
            ("GRAPEVINE_REQUIRE_TOOLS", "1"),
            ("GRAPEVINE_ALLOW_SKIP", "1"),
            ("OTHER_PORT", "1"),
        ]);
        let flags = FlagOverrides { node_id: Some("flag".into()), ..Default::default() };
        let loaded = load_with_env(Some(&path), &flags, env.clone()).unwrap();
        assert_eq!(loaded.cluster_name, "2024", "a string even when it looks like a number");
        assert_eq!(loaded.node_id.as_deref(), Some("flag"));
        assert_eq!(loaded.port, 6000);
        assert_eq!(loaded.gossip.interval_ms, 300);
        assert_eq!(loaded.members, vec!["10.0.0.1", "10.0.0.2:5701"]);
        assert_eq!(loaded.maps["sessions"].backup_count, 2);
        assert_eq!(loaded.attributes["zone"], "1");
        let without_flag = load_with_env(Some(&path), &FlagOverrides::default(), env).unwrap();
        assert_eq!(without_flag.node_id.as_deref(), Some("7"));

        let err = load_with_env(
            None,
            &FlagOverrides::default(),
            vars(&[("GRAPEVINE_CLUSTER_NAME", "x"), ("GRAPEVINE_PROT", "1")]),
        )
        .unwrap_err()
        .0;
        assert!(err.contains("`prot`") && err.contains("environment variable GRAPEVINE_PROT"), "{err}");
        let err = load_with_env(
            None,
            &FlagOverrides::default(),
            vars(&[("GRAPEVINE_CLUSTER_NAME", "x"), ("GRAPEVINE_PORT", "x")]),
        )
        .unwrap_err()
        .0;
        assert!(err.contains("`port`") && err.contains("GRAPEVINE_PORT"), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn only_prefixed_variables_are_keys() {
        assert_eq!(env_key("GRAPEVINE_GOSSIP__INTERVAL_MS").as_deref(), Some("gossip.interval_ms"));
        assert_eq!(env_key("grapevine_port").as_deref(), Some("port"));
        for name in
            ["GRAPEVINE_", "GRAPEVINE_CONFIG", "GRAPEVINE_A____B", "GRAPE", "PORT", "XGRAPEVINE_PORT", "GRAPEVINÉ_X"]
        {
            assert_eq!(env_key(name), None, "{name}");
        }
    }

    #[test]
    fn the_merge_timer_flags_set_their_keys_and_errors_name_the_flags() {
        let flags = FlagOverrides {
            cluster_name: Some("x".into()),
            merge_first_run_delay_seconds: Some(7.0),
            merge_run_delay_seconds: Some(3.0),
            ..Default::default()
        };
        let loaded = load(None, &flags).unwrap();
        assert_eq!((loaded.merge_first_run_delay_seconds, loaded.merge_run_delay_seconds), (7.0, 3.0));
        let flags = FlagOverrides { merge_run_delay_seconds: Some(-1.0), ..flags };
        let err = load(None, &flags).unwrap_err().0;
        assert!(err.contains("`merge_run_delay_seconds`") && err.contains("flag --merge-run-delay)"), "{err}");
    }

    #[test]
    fn a_bad_merge_policy_names_the_key_and_the_valid_policies() {
        let path = write_temp("policy", "cluster_name = 'x'\n[maps.sessions]\nmerge_policy = 'newest'\n");
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`maps.sessions.merge_policy`") && err.contains("`latest-update`"), "{err}");
        assert!(err.contains("`put-if-absent`") && err.contains("newest"), "{err}");
        std::fs::write(&path, "cluster_name = 'x'\n[maps.sessions]\nmin_cluster_size = 100000\n").unwrap();
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("`maps.sessions.min_cluster_size`") && err.contains("0 (off) to 1024"), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let path = PathBuf::from("/nonexistent/grapevine.toml");
        let err = load(Some(&path), &FlagOverrides::default()).unwrap_err().0;
        assert!(err.contains("/nonexistent/grapevine.toml"), "{err}");
    }
}
