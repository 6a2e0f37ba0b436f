//! The configuration's sections, one type per `[section]` of the TOML file,
//! each with its defaults. Every section refuses unknown keys
//! (`deny_unknown_fields`), so a misspelt setting is an error, not a default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SecretValue;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter directive (`info`, `tokenvault=debug,sqlx=warn`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_owned(),
        }
    }
}

/// `[tracing]`: distributed traces exported over OTLP/gRPC (see
/// `crate::telemetry`). Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/gRPC endpoint of a collector or agent
    /// (`http://127.0.0.1:4317`, or `https://…` verified against the Mozilla
    /// roots); unset: no trace is exported and nothing is traced beyond the
    /// log lines.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of every exported span.
    pub service_name: String,
    /// The share of traces recorded (0.0 to 1.0) among those a caller did
    /// not already decide: a `traceparent` from the caller carries its
    /// sampling decision, which is followed (parent-based sampling).
    pub sample_ratio: f64,
    /// How long one export to the endpoint may take, and how long shutdown
    /// waits for the last one (milliseconds).
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "tokenvault".to_owned(),
            sample_ratio: 1.0,
            export_timeout_ms: 10_000,
        }
    }
}

/// Which keyring provider holds the KEKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyringProviderKind {
    /// A keyring file (`tokenvault keys init`), mode 0600.
    Local,
    /// Key versions given base64 in environment variables.
    Env,
    /// An HSM over PKCS#11 (`[keyring.pkcs11]`): KEKs never leave the device.
    Pkcs11,
}

impl KeyringProviderKind {
    /// The name used in configuration, logs and the key registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Env => "env",
            Self::Pkcs11 => "pkcs11",
        }
    }
}

/// `[keyring]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyringConfig {
    /// `local`, `env` or `pkcs11`.
    pub provider: KeyringProviderKind,
    /// Local keyring file; default `<data_dir>/keyring.json`.
    pub path: Option<PathBuf>,
    /// Env provider: `1:BASE64,2:BASE64` (32-byte keys).
    pub keys: SecretValue,
    /// Env provider: the MAC root key, base64 of 32 bytes.
    pub mac_key: SecretValue,
    /// A KEK older than this many days as primary marks rotation overdue.
    pub max_kek_age_days: u32,
    /// DEKs rewrapped per transaction during rotation.
    pub rotation_batch_size: u32,
    /// Pause between rotation batches (milliseconds), to bound database load.
    pub rotation_batch_pause_ms: u64,
    /// How often a replica compares the database's key registry with its keyring
    /// (milliseconds): it re-reads its provider when a version appeared or was destroyed.
    pub sync_interval_ms: u64,
    /// How often a replica records in the database which key versions it holds (seconds).
    /// A replica not heard from for three intervals no longer counts as live.
    pub heartbeat_seconds: u64,
    /// How long `RotateKeys` waits for every live replica to hold the new version before
    /// refusing (milliseconds).
    pub replica_wait_ms: u64,
    /// The HSM, for `provider = "pkcs11"`.
    pub pkcs11: Pkcs11Config,
}

impl Default for KeyringConfig {
    fn default() -> Self {
        Self {
            provider: KeyringProviderKind::Local,
            path: None,
            keys: SecretValue::default(),
            mac_key: SecretValue::default(),
            max_kek_age_days: 30,
            rotation_batch_size: 500,
            rotation_batch_pause_ms: 0,
            sync_interval_ms: 1_000,
            heartbeat_seconds: 10,
            replica_wait_ms: 5_000,
            pkcs11: Pkcs11Config::default(),
        }
    }
}

/// `[keyring.pkcs11]`: the HSM that holds the KEKs and the MAC root key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: Option<PathBuf>,
    /// The label of the token holding the keys.
    pub token_label: String,
    /// The user PIN (set it through `TOKENVAULT_KEYRING__PKCS11__PIN`), or …
    pub pin: SecretValue,
    /// … a file holding the PIN (one line, mode 0600 or stricter).
    pub pin_file: Option<PathBuf>,
    /// Prefix of the labels of the vault's objects in the token.
    pub label_prefix: String,
    /// The most PKCS#11 sessions open at once (also how many HSM operations run at once).
    pub sessions: u32,
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Self {
            module: None,
            token_label: String::new(),
            pin: SecretValue::default(),
            pin_file: None,
            label_prefix: "tokenvault".to_owned(),
            sessions: 4,
        }
    }
}

/// `[tls]`: server certificate, and client CAs for mTLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the server.
    pub key_file: Option<PathBuf>,
    /// PEM bundle of CAs whose client certificates are accepted (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether a server certificate is configured.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_grace_seconds: 30,
        }
    }
}

/// `[http]`: the HTTP port's defences (see `crate::http::serve`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The most connections served at once. A new connection beyond it
    /// closes the oldest one that has no request in progress (and is refused
    /// when every one has); lowered at start to half the process's open-file
    /// limit, so that accepting never fails for want of descriptors.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, counted from
    /// the connection's start or the end of its previous response: it is the
    /// keep-alive idle timeout too.
    pub header_read_timeout_seconds: u64,
    /// How long a client may take to send a request's body once its headers
    /// are in (HTTP 408 and the connection closed after it).
    pub body_read_timeout_seconds: u64,
    /// Where `GET /metrics` is served instead of `http_addr` (which then
    /// answers 404 for it). Beyond loopback it is served over TLS, like
    /// `http_addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_read_timeout_seconds: 10,
            body_read_timeout_seconds: 10,
            metrics_addr: None,
        }
    }
}

/// `[google]`: the OAuth client registered in the Google Cloud project, and
/// Google's endpoints (defaults: the real ones).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoogleConfig {
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: SecretValue,
    /// Where Google redirects the browser: this vault's `GET /oauth/callback`.
    pub redirect_uri: String,
    /// Where the callback sends the browser afterwards, with `status`,
    /// `connection_id` or `error` appended; unset: a short page.
    pub return_url: Option<String>,
    /// Authorization endpoint.
    pub auth_uri: String,
    /// Token endpoint.
    pub token_uri: String,
    /// Revocation endpoint.
    pub revoke_uri: String,
    /// OpenID Connect userinfo endpoint.
    pub userinfo_uri: String,
    /// JWKS of the id_token signing keys.
    pub jwks_uri: String,
    /// Accepted id_token issuers.
    pub issuers: Vec<String>,
    /// Scopes requested for the CALENDAR integration (plus `openid email`).
    pub calendar_scopes: Vec<String>,
    /// Scopes requested for the EMAIL integration (plus `openid email`).
    pub email_scopes: Vec<String>,
    /// TCP connect timeout for calls to Google.
    pub connect_timeout_ms: u64,
    /// Timeout of one HTTP request to Google.
    pub request_timeout_ms: u64,
    /// How long a lease may wait for a refresh (retries included) when the
    /// caller set no shorter deadline.
    pub refresh_deadline_ms: u64,
    /// The most pending authorizations (begun, neither completed nor
    /// expired) one caller holds for one (tenant, account): beginning one
    /// more evicts the oldest, whose callback is then refused as an unknown
    /// state. A user may have a few tabs open.
    pub max_pending_states: u32,
    /// The most authorizations one caller may begin per minute on one
    /// replica (a token bucket: bursts up to this many, refilled evenly over
    /// the minute); beyond it `BeginAuthorization` answers
    /// RESOURCE_EXHAUSTED. A CRM backend may begin them for many users.
    pub max_states_per_caller_per_minute: u32,
}

impl Default for GoogleConfig {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            client_secret: SecretValue::default(),
            redirect_uri: "http://127.0.0.1:8080/oauth/callback".to_owned(),
            return_url: None,
            auth_uri: "https://accounts.google.com/o/oauth2/v2/auth".to_owned(),
            token_uri: "https://oauth2.googleapis.com/token".to_owned(),
            revoke_uri: "https://oauth2.googleapis.com/revoke".to_owned(),
            userinfo_uri: "https://openidconnect.googleapis.com/v1/userinfo".to_owned(),
            jwks_uri: "https://www.googleapis.com/oauth2/v3/certs".to_owned(),
            issuers: vec![
                "https://accounts.google.com".to_owned(),
                "accounts.google.com".to_owned(),
            ],
            calendar_scopes: vec!["https://www.googleapis.com/auth/calendar.events".to_owned()],
            email_scopes: vec!["https://www.googleapis.com/auth/gmail.modify".to_owned()],
            connect_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            refresh_deadline_ms: 10_000,
            max_pending_states: 10,
            max_states_per_caller_per_minute: 600,
        }
    }
}

/// `[lease]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// The longest lease granted, whatever the token's remaining lifetime.
    pub max_ttl_seconds: u64,
    /// `min_valid_seconds` when a request leaves it at 0.
    pub default_min_valid_seconds: u32,
    /// How long the lease path may serve a connection's sealed record (its
    /// wrapped DEK and sealed access token, never a refresh token) from
    /// memory instead of reading it again; 0 turns the cache off. A lease
    /// from a cached record is recorded only if the connection is still
    /// ACTIVE and unchanged when its audit entry commits.
    pub cache_ttl_seconds: u64,
    /// The most records that cache holds.
    pub cache_entries: usize,
    /// How long a lease's record (its grant's audit entry) stays in the live
    /// database at least after the lease expired: the archiver prunes it
    /// with the archived entries (with `audit.archive_dir` set), not before.
    /// `ReleaseLease` of a lease whose record is gone answers NOT_FOUND.
    pub record_retention_seconds: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_ttl_seconds: 900,
            default_min_valid_seconds: 60,
            cache_ttl_seconds: 30,
            cache_entries: 100_000,
            record_retention_seconds: 86_400,
        }
    }
}

/// `[refresh]`: the proactive refresh sweeper. Google drops refresh tokens
/// unused for six months (seven days after issue for apps in publishing
/// status "Testing") and a user can remove the app at any time; the sweeper
/// refreshes every ACTIVE connection not refreshed for `refresh_after_hours`,
/// so grants stay in use and revoked ones are found (and the connection made
/// REVOKED_UPSTREAM) before a worker needs a token. Each due connection is
/// claimed by one replica; its refresh is single-flight with leases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Whether this replica runs the sweeper.
    pub sweeper: bool,
    /// How often the sweeper looks for due connections.
    pub check_interval_seconds: u64,
    /// A connection not refreshed for this long is due.
    pub refresh_after_hours: u64,
    /// After a failed proactive refresh (Google unavailable), the next try.
    pub retry_after_seconds: u64,
    /// The most refresh calls per second this replica's sweeper makes to
    /// Google (leases are not limited by it).
    pub max_calls_per_second: u32,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            sweeper: true,
            check_interval_seconds: 60,
            refresh_after_hours: 7 * 24,
            retry_after_seconds: 900,
            max_calls_per_second: 5,
        }
    }
}

/// `[auth]`: how callers prove an identity besides client certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// API keys (accepted from loopback peers only), stored as SHA-256 hashes;
    /// reloaded with the policy on SIGHUP when read from a configuration file.
    pub api_keys: Vec<ApiKeyConfig>,
    /// How long a call refused for want of usable credentials waits before
    /// its UNAUTHENTICATED answer, in milliseconds (0: none). Callers with
    /// credentials never wait; a client looping on refused calls is slowed to
    /// one call per delay per stream, which bounds the CPU an anonymous flood
    /// takes from authenticated work.
    pub refusal_delay_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            refusal_delay_ms: 100,
        }
    }
}

/// `[policy]`: the access policy, inline or in its own file (`file`), never
/// both. See [`crate::policy`] for the format.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A policy file (TOML with `[identities…]` and `[purposes…]`); reloaded on SIGHUP.
    pub file: Option<PathBuf>,
    /// Inline identities (when no file is named).
    pub identities: std::collections::BTreeMap<String, crate::policy::IdentityEntry>,
    /// Inline purposes (when no file is named).
    pub purposes: std::collections::BTreeMap<String, crate::policy::PurposeEntry>,
}

/// `[deletion]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeletionConfig {
    /// Consumers that must acknowledge a deletion's events before its receipt
    /// is complete, per integration (`calendar`, `email`).
    pub required_consumers: std::collections::BTreeMap<String, Vec<String>>,
    /// How long the inline revocation at Google may take before the outbox takes over.
    pub inline_revoke_timeout_ms: u64,
    /// First retry delay of the revocation outbox (doubles per attempt, with jitter).
    pub outbox_initial_backoff_ms: u64,
    /// Longest delay between two outbox attempts.
    pub outbox_max_backoff_seconds: u64,
    /// After this long the retained token is destroyed and the revocation recorded as failed.
    pub revoke_give_up_days: u64,
    /// Receipts still incomplete after this long are overdue (admin API, metrics).
    pub receipt_sla_hours: u64,
    /// Tombstones, receipts and acknowledged events are kept this long.
    pub retention_days: u64,
}

impl Default for DeletionConfig {
    fn default() -> Self {
        Self {
            required_consumers: std::collections::BTreeMap::from([
                ("calendar".to_owned(), vec!["calendar-sync".to_owned()]),
                ("email".to_owned(), vec!["email-sync".to_owned()]),
            ]),
            inline_revoke_timeout_ms: 2_000,
            outbox_initial_backoff_ms: 1_000,
            outbox_max_backoff_seconds: 3_600,
            revoke_give_up_days: 7,
            receipt_sla_hours: 24,
            retention_days: 30,
        }
    }
}

/// `[risc]`: how `POST /risc` verifies Security Event Tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RiscConfig {
    /// Google's RISC signing keys (from its risc-configuration document).
    pub jwks_uri: String,
    /// The expected `iss`.
    pub issuer: String,
    /// Accepted `aud` values; empty means `google.client_id`.
    pub audiences: Vec<String>,
    /// Tokens issued longer ago than this (`iat`) are refused.
    pub max_age_seconds: u64,
}

impl Default for RiscConfig {
    fn default() -> Self {
        Self {
            jwks_uri: "https://www.googleapis.com/oauth2/v3/certs".to_owned(),
            issuer: "https://accounts.google.com/".to_owned(),
            audiences: Vec::new(),
            max_age_seconds: 3_600,
        }
    }
}

/// `[events]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// How often each replica looks for events other replicas wrote.
    pub poll_interval_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 200,
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A signed checkpoint (Ed25519 over the entry's hash) is written with
    /// every entry whose sequence number is a multiple of this.
    pub checkpoint_every: u64,
    /// Refused authentication (calls without usable credentials, refused
    /// client certificates) is counted per peer address and reason over
    /// windows this long: a source's first refusal of a window is audited at
    /// once, the rest as one entry with their count when the window ends
    /// (see `crate::grpc::refusals`).
    pub refusal_window_seconds: u64,
    /// The most sources (peer address and reason) audited individually per
    /// window; refusals from any other source are folded into one
    /// `authn.refuse.overflow` entry. Unauthenticated callers add at most
    /// `2 × refusal_max_sources + 1` entries to the audit log per window,
    /// whatever their rate or number of addresses.
    pub refusal_max_sources: u32,
    /// The audit witness: a JSON Lines file outside the database to which
    /// this replica appends every signed checkpoint, so that `audit verify`
    /// can name a tail cut off the log together with its checkpoints.
    /// Default `<data_dir>/audit-witness.jsonl`; it protects only where the
    /// database's owner cannot rewrite it (another volume, another owner,
    /// `chattr +a`, or shipped off the host).
    pub witness_file: Option<PathBuf>,
    /// The audit archive: a directory where entries older than
    /// `hot_retention_seconds` are written in sealed segment files before
    /// they are pruned from the database (see `crate::audit::archive`).
    /// Unset: nothing is archived or pruned and the live table keeps every
    /// entry. On a fleet, set it on one replica, or to storage every
    /// replica shares: `audit verify` reads it.
    pub archive_dir: Option<PathBuf>,
    /// How long entries stay in the database before they are archived.
    pub hot_retention_seconds: u64,
    /// The most entries in one archive segment.
    pub segment_max_entries: u64,
    /// How often the archiver looks for entries past the hot retention.
    pub archive_interval_seconds: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            refusal_window_seconds: 60,
            refusal_max_sources: 30,
            witness_file: None,
            archive_dir: None,
            hot_retention_seconds: 30 * 86_400,
            segment_max_entries: 100_000,
            archive_interval_seconds: 60,
        }
    }
}

/// One API key entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The identity the key authenticates as.
    pub identity: String,
    /// Lowercase hex SHA-256 of the key (printed by `tokenvault keys new-api-key`).
    pub sha256: String,
}
