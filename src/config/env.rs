//! Reading settings from `TOKENVAULT_*` environment variables, and turning
//! figment's errors into one line naming the setting. Values of secret
//! settings never appear in an error.

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
    pub(super) fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !k.starts_with(CLI_ENV_PREFIX))
            .collect();
        Self { vars }
    }
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
