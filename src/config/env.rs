//! Reading settings from `TOKENVAULT_*` environment variables, and turning
//! figment's errors into one line naming the setting. Values of secret
//! settings never appear in an error.
//!
//! Every `TOKENVAULT_*` variable is a setting, and an unknown one is an error,
//! with two exceptions: `TOKENVAULT_CLI_*` variables configure the
//! command-line clients, and the variables Kubernetes injects into every pod
//! of a namespace for a Service named `tokenvault` (service links) are
//! ignored. Those are exactly:
//!
//! - `TOKENVAULT_PORT` (`tcp://10.0.0.1:50051`);
//! - `TOKENVAULT_PORT_<digits>_<TCP|UDP|SCTP>`, alone or followed by `_ADDR`,
//!   `_PORT` or `_PROTO`;
//! - `TOKENVAULT_SERVICE_HOST`, `TOKENVAULT_SERVICE_PORT` and
//!   `TOKENVAULT_SERVICE_PORT_<port name>`.
//!
//! No setting has these names. Anything else, `TOKENVAULT_PORTX` or
//! `TOKENVAULT_SERVICE` say, is still an unknown setting. A Service with
//! another name that Kubernetes also turns into a `TOKENVAULT_` prefix
//! (`tokenvault-grpc` gives `TOKENVAULT_GRPC_SERVICE_HOST`) is not covered:
//! name it otherwise or set `enableServiceLinks: false` in the pod spec.

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::{CLI_ENV_PREFIX, ConfigError, ENV_PREFIX};

/// Renders the first figment error as one line naming the setting.
pub(super) fn first_error(err: figment::Error) -> ConfigError {
    let err = err
        .into_iter()
        .next()
        .expect("a figment error holds at least one error");
    let mut setting = err.path.join(".");
    let problem = match &err.kind {
        figment::error::Kind::UnknownField(field, _) => {
            // figment's path already ends with the unknown key when it has one.
            if !setting.ends_with(field.as_str()) {
                setting = if setting.is_empty() {
                    field.clone()
                } else {
                    format!("{setting}.{field}")
                };
            }
            "unknown setting".to_owned()
        }
        kind => kind.to_string(),
    };
    let source = err
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    if setting.is_empty() {
        setting = "config".to_owned();
    }
    ConfigError::new(setting, format!("{problem}{source}"))
}

/// Settings whose environment values are always taken as text.
const SECRET_SETTINGS: [&str; 4] = ["pin", "keys", "mac_key", "client_secret"];

/// The `TOKENVAULT_*` variables as a figment provider: `TOKENVAULT_GRPC_ADDR`
/// sets `grpc_addr`, `TOKENVAULT_KEYRING__PATH` sets `keyring.path`.
pub(super) struct EnvProvider {
    vars: Vec<(String, String)>,
}

impl EnvProvider {
    /// Keeps the `TOKENVAULT_*` variables that are settings: not the
    /// `TOKENVAULT_CLI_*` ones, nor Kubernetes service links (see
    /// [`is_service_link`]).
    pub(super) fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX) && !k.starts_with(CLI_ENV_PREFIX) && !is_service_link(k)
            })
            .collect();
        Self { vars }
    }
}

/// Whether `name` is one of the variables Kubernetes injects for a Service
/// named `tokenvault`, which are not settings: `TOKENVAULT_PORT`,
/// `TOKENVAULT_PORT_<digits>_<TCP|UDP|SCTP>` alone or followed by `_ADDR`,
/// `_PORT` or `_PROTO`, `TOKENVAULT_SERVICE_HOST`, `TOKENVAULT_SERVICE_PORT`
/// and `TOKENVAULT_SERVICE_PORT_<port name>`. Names are matched as Kubernetes
/// writes them (upper case); nothing else matches.
fn is_service_link(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    if matches!(rest, "PORT" | "SERVICE_HOST" | "SERVICE_PORT") {
        return true;
    }
    if let Some(port_name) = rest.strip_prefix("SERVICE_PORT_") {
        return !port_name.is_empty();
    }
    // PORT_<digits>_<PROTOCOL>[_ADDR|_PORT|_PROTO]
    let Some((digits, rest)) = rest.strip_prefix("PORT_").and_then(|r| r.split_once('_')) else {
        return false;
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let (protocol, suffix) = rest.split_once('_').unwrap_or((rest, ""));
    matches!(protocol, "TCP" | "UDP" | "SCTP") && matches!(suffix, "" | "ADDR" | "PORT" | "PROTO")
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named("TOKENVAULT_* environment variables")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, raw) in &self.vars {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            // Secrets stay text as given: a PIN such as 0123 is not the number 123.
            let secret = path
                .last()
                .is_some_and(|k| SECRET_SETTINGS.contains(&k.as_str()));
            let value: Value = if secret {
                Value::from(raw.clone())
            } else {
                raw.parse().unwrap_or_else(|_| Value::from(raw.clone()))
            };
            insert_path(&mut root, &path, value);
        }
        Ok(Profile::Default.collect(root))
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            } else {
                let mut inner = Dict::new();
                insert_path(&mut inner, rest, value);
                *entry = Value::from(inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(None, env)
    }

    /// What Kubernetes injects for a `Service/tokenvault` (ports of each protocol).
    const SERVICE_LINKS: [(&str, &str); 14] = [
        ("TOKENVAULT_PORT", "tcp://10.0.0.1:50051"),
        ("TOKENVAULT_PORT_50051_TCP", "tcp://10.0.0.1:50051"),
        ("TOKENVAULT_PORT_50051_TCP_ADDR", "10.0.0.1"),
        ("TOKENVAULT_PORT_50051_TCP_PORT", "50051"),
        ("TOKENVAULT_PORT_50051_TCP_PROTO", "tcp"),
        ("TOKENVAULT_PORT_8080_UDP", "udp://10.0.0.1:8080"),
        ("TOKENVAULT_PORT_8080_UDP_PORT", "8080"),
        ("TOKENVAULT_PORT_9_SCTP_PROTO", "sctp"),
        ("TOKENVAULT_PORT_9_SCTP_ADDR", "10.0.0.1"),
        ("TOKENVAULT_SERVICE_HOST", "10.0.0.1"),
        ("TOKENVAULT_SERVICE_PORT", "50051"),
        ("TOKENVAULT_SERVICE_PORT_GRPC", "50051"),
        ("TOKENVAULT_SERVICE_PORT_HTTP", "8080"),
        ("TOKENVAULT_SERVICE_PORT_METRICS_PLAIN", "9100"),
    ];

    #[test]
    fn kubernetes_service_links_are_ignored() {
        for (name, _) in SERVICE_LINKS {
            assert!(is_service_link(name), "{name}");
        }
        let mut vars = SERVICE_LINKS.to_vec();
        vars.push(("TOKENVAULT_GRPC_ADDR", "127.0.0.1:7"));
        let c = load(&vars).unwrap();
        assert_eq!(c.grpc_addr.port(), 7);
    }

    #[test]
    fn other_names_near_service_links_are_still_unknown_settings() {
        for (name, setting) in [
            ("TOKENVAULT_PORTX", "portx"),
            ("TOKENVAULT_SERVICE", "service"),
            ("TOKENVAULT_SERVICE_HOSTS", "service_hosts"),
            ("TOKENVAULT_SERVICE_PORT_", "service_port_"),
            ("TOKENVAULT_PORT_", "port_"),
            ("TOKENVAULT_PORT_50051", "port_50051"),
            ("TOKENVAULT_PORT_50051_", "port_50051_"),
            ("TOKENVAULT_PORT_50051_HTTP", "port_50051_http"),
            ("TOKENVAULT_PORT_50051_TCP_HOST", "port_50051_tcp_host"),
            ("TOKENVAULT_PORT_50051_TCP_PORT_X", "port_50051_tcp_port_x"),
            ("TOKENVAULT_PORT_X1_TCP", "port_x1_tcp"),
            ("TOKENVAULT_PORT__TCP", "port"),
            ("TOKENVAULT_PORT_50051_tcp", "port_50051_tcp"),
            ("TOKENVAULT_port", "port"),
        ] {
            assert!(!is_service_link(name), "{name}");
            let e = load(&[(name, "1")]).unwrap_err();
            assert!(e.problem.starts_with("unknown setting"), "{name}: {e}");
            assert_eq!(e.setting, setting, "{name}: {e}");
        }
    }
}
