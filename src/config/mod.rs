//! Configuration: a TOML file plus `TOKENVAULT_*` environment variables, with
//! the flat names of the design contract for the settings every deployment
//! touches (`grpc_addr`, `http_addr`, `data_dir`, `database_url`) and sections
//! for the rest (`TOKENVAULT_<SECTION>__<KEY>`). Unknown keys are errors
//! (the variables Kubernetes injects for a Service named `tokenvault` are not
//! keys and are ignored: see `env`).
//! Every error is one line naming the setting and what is wrong with it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

mod env;
mod sections;

use env::{EnvProvider, first_error};
pub use sections::*;

/// Environment variables with this prefix configure the server.
pub const ENV_PREFIX: &str = "TOKENVAULT_";

/// Environment variables with this prefix configure the command-line clients
/// (`tokenvault admin`) and are ignored by the server configuration.
pub const CLI_ENV_PREFIX: &str = "TOKENVAULT_CLI_";

/// A configuration problem, rendered as one line naming the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting (`grpc_addr`, `keyring.path`, `config file`).
    pub setting: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration error: {}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// A secret configuration value: zeroized on drop, redacted in `Debug`, never
/// serialised back out.
#[derive(Clone, Default)]
pub struct SecretValue(Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = SecretValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretValue, E> {
                Ok(SecretValue(Zeroizing::new(v.to_owned())))
            }
            // An all-digit value (a PIN) arrives from the environment as a number.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SecretValue, E> {
                Ok(SecretValue(Zeroizing::new(v.to_string())))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SecretValue, E> {
                Ok(SecretValue(Zeroizing::new(v.to_string())))
            }
        }
        d.deserialize_any(SecretVisitor)
    }
}

impl SecretValue {
    /// The secret, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether a value was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretValue {
    fn from(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "[redacted]"
        })
    }
}

impl Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (OAuth callback, RISC, metrics, health).
    pub http_addr: SocketAddr,
    /// Directory for the SQLite file and the local keyring.
    pub data_dir: PathBuf,
    /// `sqlite:…` or `postgres://…`; default: SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Logging.
    pub log: LogConfig,
    /// Distributed traces (OpenTelemetry, OTLP): off by default.
    pub tracing: TracingConfig,
    /// Key-encryption keys.
    pub keyring: KeyringConfig,
    /// TLS for both listeners.
    pub tls: TlsConfig,
    /// Server behaviour.
    pub server: ServerConfig,
    /// The HTTP port's connection limits and timeouts.
    pub http: HttpConfig,
    /// How callers authenticate (API keys).
    pub auth: AuthConfig,
    /// Who may do what: identities, roles, purposes.
    pub policy: PolicyConfig,
    /// The event log watched by sync services.
    pub events: EventsConfig,
    /// The tamper-evident audit log.
    pub audit: AuditConfig,
    /// Disconnect and account deletion: revocation at Google, receipts, retention.
    pub deletion: DeletionConfig,
    /// Google Cross-Account Protection (RISC) receiver on `POST /risc`.
    pub risc: RiscConfig,
    /// Google OAuth client and endpoints.
    pub google: GoogleConfig,
    /// Token leases.
    pub lease: LeaseConfig,
    /// Proactive refresh: keeping grants fresh and finding revoked ones.
    pub refresh: RefreshConfig,
    /// The file this configuration was read from, if any (for policy reloads).
    #[serde(skip)]
    pub source_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./tokenvault-data"),
            database_url: None,
            log: LogConfig::default(),
            tracing: TracingConfig::default(),
            keyring: KeyringConfig::default(),
            tls: TlsConfig::default(),
            server: ServerConfig::default(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            events: EventsConfig::default(),
            audit: AuditConfig::default(),
            deletion: DeletionConfig::default(),
            risc: RiscConfig::default(),
            google: GoogleConfig::default(),
            lease: LeaseConfig::default(),
            refresh: RefreshConfig::default(),
            source_file: None,
        }
    }
}

impl Config {
    /// The HSM settings of `[keyring.pkcs11]`, with the PIN read from its file when one is
    /// named. Errors name the setting.
    pub fn pkcs11_settings(&self) -> Result<crate::crypto::Pkcs11Settings, ConfigError> {
        let p = &self.keyring.pkcs11;
        let module = p.module.clone().ok_or_else(|| {
            ConfigError::new(
                "keyring.pkcs11.module",
                "required with provider = \"pkcs11\" (the HSM's PKCS#11 library)",
            )
        })?;
        if p.token_label.is_empty() {
            return Err(ConfigError::new(
                "keyring.pkcs11.token_label",
                "required with provider = \"pkcs11\"",
            ));
        }
        let pin = match (&p.pin_file, p.pin.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::new(
                    "keyring.pkcs11.pin",
                    "give either pin or pin_file, not both",
                ));
            }
            (None, true) => {
                return Err(ConfigError::new(
                    "keyring.pkcs11.pin",
                    "required with provider = \"pkcs11\" (set TOKENVAULT_KEYRING__PKCS11__PIN or \
                     keyring.pkcs11.pin_file)",
                ));
            }
            (None, false) => p.pin.expose().to_owned(),
            (Some(path), true) => read_pin_file(path)?,
        };
        Ok(crate::crypto::Pkcs11Settings {
            module,
            token_label: p.token_label.clone(),
            pin: crate::crypto::SecretString::new(pin),
            label_prefix: p.label_prefix.clone(),
            max_sessions: usize::try_from(p.sessions).unwrap_or(usize::MAX),
        })
    }
}

/// Reads a PIN file: it must grant nothing to group or others; one line, trailing newline
/// dropped. Errors never quote the file's contents.
fn read_pin_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let setting = "keyring.pkcs11.pin_file";
    let mut file = std::fs::File::open(path)
        .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| ConfigError::new(setting, format!("cannot stat {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::new(
            setting,
            format!(
                "{} has mode {mode:04o}; it must not be readable by group or others (chmod 600)",
                path.display()
            ),
        ));
    }
    let mut text = Zeroizing::new(String::with_capacity(256));
    file.by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() || pin.contains('\n') {
        return Err(ConfigError::new(
            setting,
            format!("{} must hold the PIN on one line", path.display()),
        ));
    }
    Ok(pin.to_owned())
}

impl Config {
    /// Loads defaults, then the TOML file (if given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            std::fs::File::open(path).map_err(|e| {
                ConfigError::new(
                    "config file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvProvider::new(env));
        let mut config: Config = figment.extract().map_err(first_error)?;
        config.source_file = file.map(Path::to_path_buf);
        config.validate()?;
        Ok(config)
    }

    /// The effective database URL.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("tokenvault.db").display()),
        }
    }

    /// The effective local keyring path.
    pub fn keyring_path(&self) -> PathBuf {
        self.keyring
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keyring.json"))
    }

    /// The effective audit witness file.
    pub fn audit_witness_path(&self) -> PathBuf {
        self.audit
            .witness_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit-witness.jsonl"))
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            crate::store::validate_url(url).map_err(|p| ConfigError::new("database_url", p))?;
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "tls.key_file",
                    "missing: tls.cert_file is set",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "tls.cert_file",
                    "missing: tls.key_file is set",
                ));
            }
            _ => {}
        }
        for (name, path) in [
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
            ("tls.client_ca_file", &self.tls.client_ca_file),
        ] {
            if let Some(p) = path {
                std::fs::File::open(p).map_err(|e| {
                    ConfigError::new(name, format!("cannot read {}: {e}", p.display()))
                })?;
            }
        }
        if !self.tls.enabled() {
            let metrics = self.http.metrics_addr.map(|a| ("http.metrics_addr", a));
            for (name, addr) in [("grpc_addr", self.grpc_addr), ("http_addr", self.http_addr)]
                .into_iter()
                .chain(metrics)
            {
                if !addr.ip().is_loopback() {
                    return Err(ConfigError::new(
                        name,
                        format!(
                            "{addr} is not a loopback address; listening beyond loopback requires [tls] cert_file and key_file"
                        ),
                    ));
                }
            }
        }
        if !(1..=100_000).contains(&self.http.max_connections) {
            return Err(ConfigError::new(
                "http.max_connections",
                "must be 1..=100000",
            ));
        }
        for (name, seconds) in [
            (
                "http.header_read_timeout_seconds",
                self.http.header_read_timeout_seconds,
            ),
            (
                "http.body_read_timeout_seconds",
                self.http.body_read_timeout_seconds,
            ),
        ] {
            if !(1..=3_600).contains(&seconds) {
                return Err(ConfigError::new(name, "must be 1..=3600"));
            }
        }
        if self.auth.refusal_delay_ms > 10_000 {
            return Err(ConfigError::new(
                "auth.refusal_delay_ms",
                "must be 0..=10000",
            ));
        }
        if self.keyring.max_kek_age_days == 0 {
            return Err(ConfigError::new(
                "keyring.max_kek_age_days",
                "must be at least 1",
            ));
        }
        if !(1..=10_000).contains(&self.keyring.rotation_batch_size) {
            return Err(ConfigError::new(
                "keyring.rotation_batch_size",
                "must be 1..=10000",
            ));
        }
        if self.keyring.provider == KeyringProviderKind::Pkcs11 {
            self.pkcs11_settings()?;
        }
        if self.keyring.sync_interval_ms == 0 || self.keyring.heartbeat_seconds == 0 {
            return Err(ConfigError::new(
                if self.keyring.sync_interval_ms == 0 {
                    "keyring.sync_interval_ms"
                } else {
                    "keyring.heartbeat_seconds"
                },
                "must be at least 1",
            ));
        }
        if self.keyring.provider == KeyringProviderKind::Env && self.keyring.keys.is_empty() {
            return Err(ConfigError::new(
                "keyring.keys",
                "required with provider = \"env\" (set TOKENVAULT_KEYRING__KEYS)",
            ));
        }
        for (name, value) in [
            ("google.redirect_uri", &self.google.redirect_uri),
            ("google.auth_uri", &self.google.auth_uri),
            ("google.token_uri", &self.google.token_uri),
            ("google.revoke_uri", &self.google.revoke_uri),
            ("google.userinfo_uri", &self.google.userinfo_uri),
            ("google.jwks_uri", &self.google.jwks_uri),
        ] {
            match oauth2::url::Url::parse(value) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(_) => return Err(ConfigError::new(name, "must be an http(s) URL")),
                Err(e) => return Err(ConfigError::new(name, format!("not a URL ({e})"))),
            }
        }
        if !self.google.client_id.is_empty() && self.google.client_secret.is_empty() {
            return Err(ConfigError::new(
                "google.client_secret",
                "required with google.client_id (set TOKENVAULT_GOOGLE__CLIENT_SECRET)",
            ));
        }
        for (name, scopes) in [
            ("google.calendar_scopes", &self.google.calendar_scopes),
            ("google.email_scopes", &self.google.email_scopes),
        ] {
            if scopes.is_empty() {
                return Err(ConfigError::new(name, "must name at least one scope"));
            }
            crate::domain::ScopeSet::parse(scopes.iter().map(String::as_str))
                .map_err(|e| ConfigError::new(name, e.to_string()))?;
        }
        for (name, value) in [
            ("google.max_pending_states", self.google.max_pending_states),
            (
                "google.max_states_per_caller_per_minute",
                self.google.max_states_per_caller_per_minute,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(name, "must be at least 1"));
            }
        }
        if self.lease.max_ttl_seconds == 0 {
            return Err(ConfigError::new(
                "lease.max_ttl_seconds",
                "must be at least 1",
            ));
        }
        for (name, value) in [
            (
                "refresh.check_interval_seconds",
                self.refresh.check_interval_seconds,
            ),
            (
                "refresh.refresh_after_hours",
                self.refresh.refresh_after_hours,
            ),
            (
                "refresh.retry_after_seconds",
                self.refresh.retry_after_seconds,
            ),
            (
                "refresh.max_calls_per_second",
                u64::from(self.refresh.max_calls_per_second),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(name, "must be at least 1"));
            }
        }
        if self.refresh.refresh_after_hours > 24 * 150 {
            return Err(ConfigError::new(
                "refresh.refresh_after_hours",
                "must be at most 3600 (150 days): Google drops refresh tokens unused for six months",
            ));
        }
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            if key.sha256.len() != 64 || hex::decode(&key.sha256).is_err() {
                return Err(ConfigError::new(
                    format!("auth.api_keys[{i}].sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                ));
            }
        }
        if self.policy.file.is_some()
            && !(self.policy.identities.is_empty() && self.policy.purposes.is_empty())
        {
            return Err(ConfigError::new(
                "policy.file",
                "set either policy.file or inline [policy] identities and purposes, not both",
            ));
        }
        if self.policy.file.is_none() {
            crate::policy::Policy::build(&self.inline_policy(), &self.api_key_holders())
                .map_err(|e| ConfigError::new("policy", e))?;
        }
        for (integration, consumers) in &self.deletion.required_consumers {
            let name = format!("deletion.required_consumers.{integration}");
            crate::domain::Integration::parse(integration)
                .map_err(|e| ConfigError::new(name.clone(), e.to_string()))?;
            for c in consumers {
                crate::domain::ConsumerName::parse(c)
                    .map_err(|e| ConfigError::new(name.clone(), e.to_string()))?;
            }
        }
        for (name, value) in [
            (
                "deletion.inline_revoke_timeout_ms",
                self.deletion.inline_revoke_timeout_ms,
            ),
            (
                "deletion.outbox_initial_backoff_ms",
                self.deletion.outbox_initial_backoff_ms,
            ),
            (
                "deletion.outbox_max_backoff_seconds",
                self.deletion.outbox_max_backoff_seconds,
            ),
            (
                "deletion.revoke_give_up_days",
                self.deletion.revoke_give_up_days,
            ),
            (
                "deletion.receipt_sla_hours",
                self.deletion.receipt_sla_hours,
            ),
            ("deletion.retention_days", self.deletion.retention_days),
        ] {
            if value == 0 {
                return Err(ConfigError::new(name, "must be at least 1"));
            }
        }
        if !(1..=1_000_000).contains(&self.audit.checkpoint_every) {
            return Err(ConfigError::new(
                "audit.checkpoint_every",
                "must be between 1 and 1000000",
            ));
        }
        if self
            .audit
            .witness_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::new(
                "audit.witness_file",
                "must name a file (leave it unset for <data_dir>/audit-witness.jsonl)",
            ));
        }
        if !(1..=3_650 * 86_400).contains(&self.lease.record_retention_seconds) {
            return Err(ConfigError::new(
                "lease.record_retention_seconds",
                "must be between 1 and 315360000 (ten years)",
            ));
        }
        if self
            .audit
            .archive_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::new(
                "audit.archive_dir",
                "must name a directory (leave it unset to keep every entry in the database)",
            ));
        }
        if !(1..=3_650 * 86_400).contains(&self.audit.hot_retention_seconds) {
            return Err(ConfigError::new(
                "audit.hot_retention_seconds",
                "must be between 1 and 315360000 (ten years)",
            ));
        }
        if !(1..=10_000_000).contains(&self.audit.segment_max_entries) {
            return Err(ConfigError::new(
                "audit.segment_max_entries",
                "must be between 1 and 10000000",
            ));
        }
        if !(1..=86_400).contains(&self.audit.archive_interval_seconds) {
            return Err(ConfigError::new(
                "audit.archive_interval_seconds",
                "must be between 1 and 86400",
            ));
        }
        if !(1..=3_600).contains(&self.audit.refusal_window_seconds) {
            return Err(ConfigError::new(
                "audit.refusal_window_seconds",
                "must be between 1 and 3600",
            ));
        }
        if !(1..=10_000).contains(&self.audit.refusal_max_sources) {
            return Err(ConfigError::new(
                "audit.refusal_max_sources",
                "must be between 1 and 10000",
            ));
        }
        if !(50..=1000).contains(&self.events.poll_interval_ms) {
            return Err(ConfigError::new(
                "events.poll_interval_ms",
                "must be between 50 and 1000 (events must reach every replica within 1 s)",
            ));
        }
        check_log_level(&self.log.level).map_err(|e| ConfigError::new("log.level", e))?;
        self.validate_tracing()?;
        Ok(())
    }

    /// `[tracing]`: an endpoint that is an http(s) URL of a host without
    /// credentials in it (the URL is logged), a service name, a ratio and a
    /// timeout in range.
    fn validate_tracing(&self) -> Result<(), ConfigError> {
        let t = &self.tracing;
        if let Some(endpoint) = &t.otlp_endpoint {
            let setting = "tracing.otlp_endpoint";
            let url = oauth2::url::Url::parse(endpoint).map_err(|e| {
                ConfigError::new(
                    setting,
                    format!("not a URL ({e}); leave it unset to export no traces"),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ConfigError::new(
                    setting,
                    "must be an http:// or https:// URL of the collector's OTLP/gRPC port, \
                     e.g. http://127.0.0.1:4317",
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(ConfigError::new(
                    setting,
                    "must not hold credentials (give the collector's headers in \
                     OTEL_EXPORTER_OTLP_HEADERS)",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(ConfigError::new(
                    setting,
                    "must not have a query or fragment",
                ));
            }
        }
        if t.service_name.trim().is_empty() || t.service_name.len() > 255 {
            return Err(ConfigError::new(
                "tracing.service_name",
                "must be 1 to 255 characters",
            ));
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::new(
                "tracing.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if !(100..=60_000).contains(&t.export_timeout_ms) {
            return Err(ConfigError::new(
                "tracing.export_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        Ok(())
    }

    /// The inline `[policy]` section, as a policy document.
    pub fn inline_policy(&self) -> crate::policy::PolicyDocument {
        crate::policy::PolicyDocument {
            identities: self.policy.identities.clone(),
            purposes: self.policy.purposes.clone(),
        }
    }

    /// The identities `[[auth.api_keys]]` gives a key: the policy is built
    /// against them (they decide how an identity authenticates).
    pub fn api_key_holders(&self) -> crate::policy::ApiKeyHolders {
        crate::policy::ApiKeyHolders::new(self.auth.api_keys.iter().map(|k| k.identity.as_str()))
    }

    /// The policy to enforce, built against this configuration's API keys,
    /// and where to reload it from: the policy file if one is named, else the
    /// inline `[policy]` (reloadable when it came from a configuration file).
    pub fn policy_source(
        &self,
    ) -> Result<(crate::policy::Policy, crate::policy::PolicySource), String> {
        use crate::policy::{Policy, PolicySource, load_file};
        let keys = self.api_key_holders();
        match &self.policy.file {
            Some(path) => Ok((
                load_file(path, &keys).map_err(|e| format!("policy.file: {e}"))?,
                PolicySource::File(path.clone()),
            )),
            None => {
                let policy = Policy::build(&self.inline_policy(), &keys)
                    .map_err(|e| format!("policy: {e}"))?;
                let source = match &self.source_file {
                    Some(p) => PolicySource::ConfigFile(p.clone()),
                    None => PolicySource::Fixed,
                };
                Ok((policy, source))
            }
        }
    }

    /// Creates `data_dir` (mode 0700) if needed and checks it is writable.
    pub fn prepare_data_dir(&self) -> Result<(), ConfigError> {
        let dir = &self.data_dir;
        let err = |e: std::io::Error| {
            ConfigError::new("data_dir", format!("cannot use {}: {e}", dir.display()))
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode_private()
                .create(dir)
                .map_err(err)?;
        }
        // One probe per process: replicas may share a data directory.
        let probe = dir.join(format!(".write-probe-{}", std::process::id()));
        crate::files::private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .map_err(err)?;
        std::fs::remove_file(&probe).map_err(err)?;
        Ok(())
    }
}

/// The levels a `log.level` directive may name on its own (in any case).
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `log.level` filter: tracing's `EnvFilter` syntax, where every
/// comma-separated directive is either a level name (`info`) or names a
/// target or span (`tokenvault=debug`, `[grpc]=trace`). A bare word that is
/// not a level is refused, although tracing reads it as a target to log at
/// every level: here it is a misspelt level (`verbose`) that would hide every
/// line. So is a filter with no directive, which hides every line too, and a
/// directive with spaces around it, which tracing takes as part of its name.
/// The problem, as one line, on error.
fn check_log_level(level: &str) -> Result<(), String> {
    const EXPECTED: &str =
        "is not a level (trace, debug, info, warn, error, off) or a target=level directive";
    // Split as tracing splits it (empty directives are skipped).
    let directives: Vec<&str> = level.split(',').filter(|d| !d.is_empty()).collect();
    if directives.is_empty() {
        return Err(format!("{level:?} {EXPECTED}"));
    }
    if let Some(d) = directives.iter().find(|d| d.trim() != **d) {
        return Err(format!(
            "{d:?} has spaces around it (separate directives with a comma alone)"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("{level:?} is not a valid filter ({e})"))?;
    for d in directives {
        let is_level = LOG_LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l));
        if !is_level && !d.contains(['=', '[']) {
            return Err(format!("{d:?} {EXPECTED}"));
        }
    }
    Ok(())
}

/// Sets mode 0700 on directories the vault creates.
trait PrivateDir {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateDir for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_toml(toml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenvault.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_from(Some(&path), env(vars))
    }

    #[test]
    fn defaults_are_the_embedded_loopback_setup() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url(), "sqlite://./tokenvault-data/tokenvault.db");
        assert_eq!(
            c.keyring_path(),
            PathBuf::from("./tokenvault-data/keyring.json")
        );
        assert_eq!(
            c.audit_witness_path(),
            PathBuf::from("./tokenvault-data/audit-witness.jsonl")
        );
    }

    #[test]
    fn environment_overrides_file_with_flat_and_sectioned_names() {
        let c = load_toml(
            "grpc_addr = \"127.0.0.1:1\"\n[keyring]\nmax_kek_age_days = 10\n",
            &[
                ("TOKENVAULT_GRPC_ADDR", "127.0.0.1:2"),
                ("TOKENVAULT_KEYRING__ROTATION_BATCH_SIZE", "64"),
                ("TOKENVAULT_CLI_ENDPOINT", "ignored by the server"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.grpc_addr.port(), 2);
        assert_eq!(c.keyring.max_kek_age_days, 10);
        assert_eq!(c.keyring.rotation_batch_size, 64);
    }

    #[test]
    fn unknown_keys_are_one_line_errors_naming_the_setting() {
        let e = load_toml("[keyring]\nrotaton_batch_size = 3\n", &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.rotaton_batch_size", "{e}");
        let e = load_toml("", &[("TOKENVAULT_GRPC_ADRR", "127.0.0.1:1")]).unwrap_err();
        assert_eq!(e.setting, "grpc_adrr", "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn bad_values_name_their_setting() {
        let e = load_toml("database_url = \"mysql://x\"\n", &[]).unwrap_err();
        assert_eq!(e.setting, "database_url");
        let e = load_toml("grpc_addr = \"not an address\"\n", &[]).unwrap_err();
        assert_eq!(e.setting, "grpc_addr", "{e}");
        let e = load_toml("grpc_addr = \"0.0.0.0:50051\"\n", &[]).unwrap_err();
        assert_eq!(e.setting, "grpc_addr");
        assert!(e.problem.contains("loopback"), "{e}");
        let e = Config::load_from(Some(Path::new("/nonexistent/tv.toml")), env(&[])).unwrap_err();
        assert_eq!(e.setting, "config file");
        let e = load_toml("[google]\nmax_pending_states = 0\n", &[]).unwrap_err();
        assert_eq!(e.setting, "google.max_pending_states", "{e}");
        let e = load_toml(
            "",
            &[("TOKENVAULT_GOOGLE__MAX_STATES_PER_CALLER_PER_MINUTE", "0")],
        )
        .unwrap_err();
        assert_eq!(e.setting, "google.max_states_per_caller_per_minute", "{e}");
    }

    #[test]
    fn the_sample_configuration_is_valid_and_lists_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tokenvault.example.toml");
        let mut sample = Config::load_from(Some(&path), env(&[])).unwrap();
        assert_eq!(sample.source_file.as_deref(), Some(path.as_path()));
        sample.source_file = None;
        let defaults = Config::default();
        assert_eq!(format!("{sample:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn tracing_is_off_by_default_and_its_settings_are_checked() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert!(
            c.tracing.otlp_endpoint.is_none(),
            "no export unless configured"
        );
        assert_eq!(c.tracing.service_name, "tokenvault");
        assert!((c.tracing.sample_ratio - 1.0).abs() < f64::EPSILON);
        assert_eq!(c.tracing.export_timeout_ms, 10_000);

        let c = load_toml(
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
            &[
                ("TOKENVAULT_TRACING__SAMPLE_RATIO", "0.25"),
                ("TOKENVAULT_TRACING__SERVICE_NAME", "vault-eu"),
                ("TOKENVAULT_TRACING__EXPORT_TIMEOUT_MS", "2500"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert!((c.tracing.sample_ratio - 0.25).abs() < f64::EPSILON);
        assert_eq!(c.tracing.service_name, "vault-eu");
        assert_eq!(c.tracing.export_timeout_ms, 2_500);
        let c = load_toml(
            "",
            &[(
                "TOKENVAULT_TRACING__OTLP_ENDPOINT",
                "https://otel.internal:4317",
            )],
        )
        .unwrap();
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("https://otel.internal:4317")
        );

        for (toml, setting) in [
            ("[tracing]\notlp_endpoint = \"\"\n", "tracing.otlp_endpoint"),
            (
                "[tracing]\notlp_endpoint = \"collector:4317\"\n",
                "tracing.otlp_endpoint",
            ),
            (
                "[tracing]\notlp_endpoint = \"grpc://127.0.0.1:4317\"\n",
                "tracing.otlp_endpoint",
            ),
            (
                "[tracing]\notlp_endpoint = \"https://user:pw@otel.internal:4317\"\n",
                "tracing.otlp_endpoint",
            ),
            ("[tracing]\nsample_ratio = 1.5\n", "tracing.sample_ratio"),
            ("[tracing]\nsample_ratio = -0.1\n", "tracing.sample_ratio"),
            ("[tracing]\nservice_name = \"\"\n", "tracing.service_name"),
            (
                "[tracing]\nexport_timeout_ms = 0\n",
                "tracing.export_timeout_ms",
            ),
            (
                "[tracing]\notlp_endpont = \"http://x:1\"\n",
                "tracing.otlp_endpont",
            ),
        ] {
            let e = load_toml(toml, &[]).unwrap_err();
            assert_eq!(e.setting, setting, "{toml}: {e}");
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = Config::load_from(
            None,
            env(&[("TOKENVAULT_KEYRING__MAC_KEY", "c2VjcmV0LW1hYy1rZXk=")]),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
        assert_eq!(c.keyring.mac_key.expose(), "c2VjcmV0LW1hYy1rZXk=");
    }

    #[test]
    fn pkcs11_settings_name_what_is_missing_and_keep_pins_as_text() {
        let e = load_toml("[keyring]\nprovider = \"hsm\"\n", &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.provider", "{e}");
        let e = load_toml("[keyring]\nprovider = \"pkcs11\"\n", &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.pkcs11.module", "{e}");
        let base = "[keyring]\nprovider = \"pkcs11\"\n[keyring.pkcs11]\nmodule = \"/x.so\"\n";
        let e = load_toml(base, &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.pkcs11.token_label", "{e}");
        let with_label = format!("{base}token_label = \"t\"\n");
        let e = load_toml(&with_label, &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.pkcs11.pin", "{e}");
        // An all-digit PIN from the environment stays text, leading zeros and all.
        let c = load_toml(&with_label, &[("TOKENVAULT_KEYRING__PKCS11__PIN", "0123")]).unwrap();
        assert_eq!(c.pkcs11_settings().unwrap().pin.expose(), "0123");
        assert!(!format!("{c:?}").contains("0123"));

        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "4321\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let with_file = format!(
            "{with_label}pin_file = {:?}\n",
            pin_file.display().to_string()
        );
        let e = load_toml(&with_file, &[]).unwrap_err();
        assert_eq!(e.setting, "keyring.pkcs11.pin_file", "{e}");
        assert!(
            e.problem.contains("chmod 600") && !e.problem.contains("4321"),
            "{e}"
        );
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load_toml(&with_file, &[]).unwrap();
        assert_eq!(c.pkcs11_settings().unwrap().pin.expose(), "4321");
        let e = load_toml(&with_file, &[("TOKENVAULT_KEYRING__PKCS11__PIN", "1")]).unwrap_err();
        assert_eq!(e.setting, "keyring.pkcs11.pin", "{e}");
    }

    #[test]
    fn log_levels_are_level_names_or_target_directives() {
        for level in [
            "info",
            "TRACE",
            "Warn",
            "off",
            "info,",
            "warn,tokenvault=debug",
            "tokenvault::store=trace,sqlx=warn",
            "tokenvault=",
            "[grpc]=debug",
            "tokenvault[lease]=trace",
        ] {
            let c = load_toml(&format!("[log]\nlevel = {level:?}\n"), &[])
                .unwrap_or_else(|e| panic!("{level:?}: {e}"));
            assert_eq!(c.log.level, level);
        }
        for (level, quoted) in [
            ("verbose", "\"verbose\""),
            ("info,verbose", "\"verbose\""),
            ("tokenvault", "\"tokenvault\""),
            ("", "\"\""),
            (",", "\",\""),
            ("info, tokenvault=debug", "\" tokenvault=debug\""),
            ("info ", "\"info \""),
            ("tokenvault=verbose", "\"tokenvault=verbose\""),
            ("tokenvault=debug=x", "\"tokenvault=debug=x\""),
        ] {
            let e = load_toml(&format!("[log]\nlevel = {level:?}\n"), &[]).unwrap_err();
            assert_eq!(e.setting, "log.level", "{level:?}: {e}");
            assert!(e.problem.starts_with(quoted), "{level:?}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let e = load_toml("", &[("TOKENVAULT_LOG__LEVEL", "verbose")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration error: log.level: \"verbose\" is not a level (trace, debug, info, \
             warn, error, off) or a target=level directive"
        );
    }
}
