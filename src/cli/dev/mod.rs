//! Development mode, NOT FOR PRODUCTION: `tokenvault serve --dev` runs the
//! vault on its embedded default (SQLite and a local keyring, in
//! `./tokenvault-dev-data`) with the Google simulator in-process and fresh API
//! keys for the app, the two sync workers and an admin, printed once as
//! `export` lines; `tokenvault dev …` is the five-minute tour's client, which
//! talks to that vault over gRPC the way the product backend and a sync worker
//! would: connect a Google account through the simulator, lease a token,
//! disconnect and acknowledge the deletion.
//!
//! The keys live only as long as the `serve --dev` process: they are also
//! written to `<data_dir>/dev.env` (mode 0600, removed at shutdown), which the
//! `dev` commands read for any `TOKENVAULT_CLI_*` variable the environment
//! does not set. Dev mode refuses anything but loopback listeners, TLS,
//! PostgreSQL and other keyring providers: it is for a laptop, not a host.
//!
//! Each `dev` command narrates its steps (`-> …` lines) and ends with its
//! result; with `--output json` the result is one JSON document on stdout (in
//! the words of [`super::output`]) and the narration goes to stderr. A leased
//! token is never printed, only its length.
//!
//! The simulator is compiled in only with the `google-sim` feature (the tests
//! turn it on); a binary built without it refuses `serve --dev` and `dev …`
//! with one line saying how to build one that has it.

mod commands;
mod serve;

pub use serve::serve;
use serve::*;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use oauth2::url::Url;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

use super::client::{API_KEY_ENV, DEFAULT_TIMEOUT, SERVER_ENV};
use super::exit::CliError;
use super::output::{self, Fields, OutputFormat};
use crate::config::{ApiKeyConfig, Config, ConfigError, KeyringProviderKind};
use crate::crypto::SecretString;
use crate::grpc::Authenticator;
use crate::policy::{IdentityEntry, PurposeEntry};
use crate::proto::v1 as pb;
use crate::proto::v1::connection_service_client::ConnectionServiceClient;
use crate::proto::v1::event_service_client::EventServiceClient;
use crate::proto::v1::lease_service_client::LeaseServiceClient;
use crate::server::RunningServer;

/// Where dev mode keeps its data unless `TOKENVAULT_DATA_DIR` says otherwise:
/// never the real default (`./tokenvault-data`), so a dev run cannot mix with
/// a real one.
pub const DEV_DATA_DIR: &str = "./tokenvault-dev-data";

/// The file in the data directory holding this run's `export` lines.
pub const ENV_FILE_NAME: &str = "dev.env";

/// Where the `dev` commands look for the env file by default.
pub const DEFAULT_ENV_FILE: &str = "./tokenvault-dev-data/dev.env";

/// The environment variable holding the app's key.
pub const APP_KEY_ENV: &str = "TOKENVAULT_CLI_APP_KEY";

/// The environment variable holding the calendar-sync worker's key.
pub const WORKER_KEY_ENV: &str = "TOKENVAULT_CLI_WORKER_KEY";

/// The environment variable holding the email-sync worker's key.
pub const EMAIL_WORKER_KEY_ENV: &str = "TOKENVAULT_CLI_EMAIL_WORKER_KEY";

/// How long `dev disconnect` waits for the deletion event and the receipt.
const SETTLE: Duration = Duration::from_secs(10);

/// How long `dev ack` waits for one more event before it acknowledges.
const IDLE: Duration = Duration::from_secs(1);

/// One identity dev mode creates: its key's variable and what it may do.
struct DevRole {
    env: &'static str,
    identity: &'static str,
    role: &'static str,
    purpose: Option<&'static str>,
    consumer: Option<&'static str>,
    note: &'static str,
}

const APP: DevRole = DevRole {
    env: APP_KEY_ENV,
    identity: "dev-app",
    role: "app",
    purpose: None,
    consumer: None,
    note: "connects and disconnects (the product backend)",
};

const CALENDAR_WORKER: DevRole = DevRole {
    env: WORKER_KEY_ENV,
    identity: "dev-calendar-sync",
    role: "worker",
    purpose: Some("calendar_sync"),
    consumer: Some("calendar-sync"),
    note: "purpose calendar_sync, consumer calendar-sync",
};

const EMAIL_WORKER: DevRole = DevRole {
    env: EMAIL_WORKER_KEY_ENV,
    identity: "dev-email-sync",
    role: "worker",
    purpose: Some("email_sync"),
    consumer: Some("email-sync"),
    note: "purpose email_sync, consumer email-sync",
};

const ADMIN: DevRole = DevRole {
    env: API_KEY_ENV,
    identity: "dev-admin",
    role: "admin",
    purpose: None,
    consumer: None,
    note: "for `tokenvault admin …`",
};

const ROLES: [&DevRole; 4] = [&APP, &CALENDAR_WORKER, &EMAIL_WORKER, &ADMIN];

// ---------------------------------------------------------------------------
// tokenvault serve --dev
// ---------------------------------------------------------------------------

/// `tokenvault dev`: the tour's client for a vault started with `serve --dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The dev vault's gRPC address [default: the env file's, else http://127.0.0.1:50051]
    #[arg(long, global = true, env = SERVER_ENV, value_name = "URL")]
    pub server: Option<String>,
    /// The `export` lines `serve --dev` wrote; read for every TOKENVAULT_CLI_*
    /// variable the environment does not set.
    #[arg(
        long,
        global = true,
        env = "TOKENVAULT_CLI_DEV_ENV_FILE",
        value_name = "PATH",
        default_value = DEFAULT_ENV_FILE
    )]
    pub env_file: PathBuf,
    /// How to print results: `json` prints one JSON document on stdout and
    /// the steps on stderr.
    #[arg(
        short = 'o',
        long,
        global = true,
        env = output::OUTPUT_ENV,
        value_enum,
        default_value_t,
        help_heading = "Output"
    )]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: DevCommand,
}

/// The steps of the tour.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Connect a Google account (simulated) as the app: BeginAuthorization,
    /// the simulator's consent, the vault's callback.
    Connect {
        /// The tenant (your customer).
        #[arg(long)]
        tenant: String,
        /// The account (your user) within the tenant.
        #[arg(long)]
        account: String,
        /// Which Google integration.
        #[arg(long, value_enum)]
        integration: DevIntegration,
        /// The Google account to sign in as (a login hint; any address works
        /// with the simulator) [default: user1@sim.test]
        #[arg(long)]
        email: Option<String>,
    },
    /// Lease an access token as the sync worker of the purpose.
    Lease {
        /// The connection id.
        #[arg(long)]
        connection: String,
        /// The purpose: calendar_sync (as calendar-sync) or email_sync (as email-sync).
        #[arg(long, default_value = "calendar_sync")]
        purpose: String,
        /// A scope to lease (repeatable) [default: the purpose's scopes]
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Disconnect as the app, then acknowledge the deletion as each required
    /// consumer, and print the deletion receipt.
    Disconnect {
        /// The connection id.
        #[arg(long)]
        connection: String,
        /// Why (recorded on the receipt).
        #[arg(long, default_value = "disconnected in the dev tour")]
        reason: String,
        /// Do not acknowledge: the receipt stays pending until `tokenvault dev ack`.
        #[arg(long)]
        no_ack: bool,
    },
    /// Acknowledge every event a consumer has not yet acknowledged.
    Ack {
        /// calendar-sync or email-sync.
        #[arg(long)]
        consumer: String,
    },
}

/// The integrations, as `--integration` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DevIntegration {
    /// Google Calendar.
    Calendar,
    /// Gmail.
    Email,
}

impl DevIntegration {
    fn proto(self) -> pb::Integration {
        match self {
            DevIntegration::Calendar => pb::Integration::Calendar,
            DevIntegration::Email => pb::Integration::Email,
        }
    }
}

/// Runs a `tokenvault dev` command.
pub async fn run(args: DevArgs) -> Result<(), CliError> {
    require_simulator()?;
    let dev = Dev::open(&args).await?;
    match args.command {
        DevCommand::Connect {
            tenant,
            account,
            integration,
            email,
        } => dev.connect(tenant, account, integration, email).await,
        DevCommand::Lease {
            connection,
            purpose,
            scopes,
        } => dev.lease(connection, purpose, scopes).await,
        DevCommand::Disconnect {
            connection,
            reason,
            no_ack,
        } => dev.disconnect(connection, reason, !no_ack).await,
        DevCommand::Ack { consumer } => {
            let role = consumer_role(&consumer)?;
            let acked = dev.acknowledge(role, &consumer, None).await?;
            output::print(
                dev.output,
                || {
                    serde_json::json!({
                        "consumer": consumer,
                        "events": acked.events.iter().map(output::event_json).collect::<Vec<_>>(),
                        "position": acked.position,
                    })
                },
                |out| match acked.position {
                    Some(_) => Ok(()),
                    None => writeln!(out, "{consumer}: nothing to acknowledge"),
                },
            )
        }
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
struct DevBearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for DevBearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, DevBearer>;

/// The connected dev client: one channel, a key per role.
struct Dev {
    channel: Channel,
    env_file: PathBuf,
    file: HashMap<String, Zeroizing<String>>,
    /// How results are printed (and where the narration goes).
    output: OutputFormat,
}

/// What `Dev::acknowledge` did: the events it showed and the position it
/// acknowledged (`None`: there was nothing to acknowledge).
struct Acked {
    events: Vec<pb::WatchResponse>,
    position: Option<u64>,
}

/// The deletion `dev disconnect` waits for.
struct Target<'a> {
    connection: &'a str,
    receipt: &'a str,
}

/// The dev identity that acts as `consumer`.
fn consumer_role(consumer: &str) -> Result<&'static DevRole, CliError> {
    ROLES
        .into_iter()
        .find(|r| r.consumer == Some(consumer))
        .ok_or_else(|| {
            CliError::usage(format!(
                "no dev key acts as consumer {consumer:?}: use calendar-sync or email-sync"
            ))
        })
}

/// The answer of `rpc`, or its status as a [`CliError`].
fn answer<T>(rpc: &str, result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, CliError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| CliError::status(rpc, &status))
}

/// One query parameter of a URL.
fn query_value(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// An enum's proto name without its type prefix, lowercase (`active`).
fn short(name: Option<&str>, prefix: &str, value: i32) -> String {
    match name {
        Some(n) => n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase(),
        None => value.to_string(),
    }
}

/// `#7  connection_deleted  conn_…  receipt rcpt_…`, or `#6  lease_revoked  conn_…
/// leases granted up to 2026-…Z`.
fn event_text(e: &pb::WatchResponse) -> String {
    let kind = short(
        pb::EventKind::try_from(e.kind)
            .ok()
            .map(|k| k.as_str_name()),
        "EVENT_KIND_",
        e.kind,
    );
    let mut text = format!("#{:<4} {kind:<20} {}", e.cursor, e.connection_id);
    if !e.lease_id.is_empty() {
        text.push_str(&format!("  lease {}", e.lease_id));
    } else if e.kind == pb::EventKind::LeaseRevoked as i32 {
        // The connection's cut-off: every lease of it granted until then.
        text.push_str(&format!(
            "  leases granted up to {}",
            output::ts_text(e.occurred_at.as_ref())
        ));
    }
    if !e.receipt_id.is_empty() {
        text.push_str(&format!("  receipt {}", e.receipt_id));
    }
    text
}

/// A connection, field by field.
fn connection_fields(c: &pb::Connection) -> Fields {
    let mut f = Fields::new();
    f.add("connection_id", c.connection_id.clone())
        .add("tenant", c.tenant_id.clone())
        .add("account", c.account_id.clone())
        .add(
            "integration",
            short(
                pb::Integration::try_from(c.integration)
                    .ok()
                    .map(|i| i.as_str_name()),
                "INTEGRATION_",
                c.integration,
            ),
        )
        .add(
            "status",
            short(
                pb::ConnectionStatus::try_from(c.status)
                    .ok()
                    .map(|s| s.as_str_name()),
                "CONNECTION_STATUS_",
                c.status,
            ),
        )
        .add("google_email", c.google_email.clone())
        .add("granted_scopes", output::list_text(&c.granted_scopes))
        .add("missing_scopes", output::list_text(&c.missing_scopes))
        .add("created_at", output::ts_text(c.created_at.as_ref()));
    f
}

impl Dev {
    /// One step of the tour, for the person following it: a line on stdout,
    /// or on stderr with `--output json` (stdout then holds only the JSON
    /// document; a failure to write the step there is ignored).
    fn say(&self, line: &str) -> Result<(), CliError> {
        match self.output {
            OutputFormat::Table => {
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .map_err(CliError::output)
            }
            OutputFormat::Json => {
                let _ = writeln!(std::io::stderr(), "{line}");
                Ok(())
            }
        }
    }

    /// The command's result: `json`, or (after an empty line that sets it off
    /// from the steps) the fields.
    fn result(
        &self,
        json: impl FnOnce() -> serde_json::Value,
        fields: &Fields,
    ) -> Result<(), CliError> {
        output::print(self.output, json, |out| {
            writeln!(out)?;
            fields.write(out)
        })
    }
}

/// The `export NAME=VALUE` lines of the env file (`TOKENVAULT_CLI_*` only);
/// empty when the file does not exist.
fn read_env_file(path: &Path) -> Result<HashMap<String, Zeroizing<String>>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => {
            return Err(CliError::usage(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    Ok(text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .filter(|(name, _)| name.starts_with(crate::config::CLI_ENV_PREFIX))
        .map(|(name, value)| (name.to_owned(), Zeroizing::new(value.trim().to_owned())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_file_round_trips_the_exports() {
        let keys = DevKeys::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ENV_FILE_NAME);
        write_private(&path, &keys.exports("127.0.0.1:4242".parse().unwrap())).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let vars = read_env_file(&path).unwrap();
        assert_eq!(vars[SERVER_ENV].as_str(), "http://127.0.0.1:4242");
        for (role, key) in &keys.0 {
            assert_eq!(vars[role.env].as_str(), key.expose(), "{}", role.env);
        }
        assert!(
            read_env_file(&dir.path().join("missing"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            Path::new(DEFAULT_ENV_FILE),
            Path::new(DEV_DATA_DIR).join(ENV_FILE_NAME)
        );
    }

    #[test]
    fn the_dev_policy_validates_and_gives_each_worker_its_purpose() {
        let keys = DevKeys::generate().unwrap();
        let mut config = Config::default();
        keys.configure(&mut config);
        config.validate().unwrap();
        assert_eq!(config.auth.api_keys.len(), ROLES.len());
        let worker = &config.policy.identities[CALENDAR_WORKER.identity];
        assert_eq!(worker.purposes, ["calendar_sync"]);
        assert_eq!(worker.consumers, ["calendar-sync"]);
        assert_eq!(config.policy.purposes["email_sync"].integrations, ["email"]);
        // Every consumer deletion requires has a dev key acting as it.
        for consumers in config.deletion.required_consumers.values() {
            for c in consumers {
                assert!(consumer_role(c).is_ok(), "{c}");
            }
        }
    }
}
