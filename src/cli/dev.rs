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
use super::output::{self, Fields};
use crate::config::{ApiKeyConfig, Config, ConfigError, KeyringProviderKind};
use crate::crypto::SecretString;
use crate::google::sim::{GoogleSim, SimClient, SimConfig};
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

/// The OAuth client the simulator registers (the same as
/// `tokenvault-google-sim`'s development client).
const DEV_CLIENT_ID: &str = "tokenvault-dev.apps.googleusercontent.com";
const DEV_CLIENT_SECRET: &str = "tokenvault-dev-secret";

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

/// `tokenvault serve --dev`: the embedded default plus the Google simulator
/// and fresh API keys, until SIGINT/SIGTERM.
pub fn serve() -> Result<(), CliError> {
    let config = dev_config()?;
    config.prepare_data_dir().map_err(|e| e.to_string())?;
    crate::telemetry::init(&config.log);
    super::runtime()?.block_on(serve_dev(config))
}

/// The configuration from the environment (no file), with dev mode's data
/// directory, refusing what dev mode does not do.
fn dev_config() -> Result<Config, CliError> {
    let refuse = |setting: &str, problem: String| -> CliError {
        ConfigError {
            setting: setting.to_owned(),
            problem,
        }
        .to_string()
        .into()
    };
    let beyond_loopback = |name: &str, addr: SocketAddr| {
        refuse(
            name,
            format!("{addr} is not a loopback address; serve --dev listens on loopback only"),
        )
    };
    // Looked at before loading too: loading refuses them with advice (TLS)
    // that does not apply to dev mode.
    for (name, var) in [
        ("grpc_addr", "TOKENVAULT_GRPC_ADDR"),
        ("http_addr", "TOKENVAULT_HTTP_ADDR"),
    ] {
        if let Some(addr) = std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .filter(|a| !a.ip().is_loopback())
        {
            return Err(beyond_loopback(name, addr));
        }
    }
    let mut config = Config::load(None).map_err(|e| e.to_string())?;
    if std::env::var_os("TOKENVAULT_DATA_DIR").is_none() {
        config.data_dir = PathBuf::from(DEV_DATA_DIR);
    }
    for (name, addr) in [
        ("grpc_addr", config.grpc_addr),
        ("http_addr", config.http_addr),
    ] {
        if !addr.ip().is_loopback() {
            return Err(beyond_loopback(name, addr));
        }
    }
    if config.tls.enabled() || config.tls.client_ca_file.is_some() {
        return Err(refuse(
            "tls",
            "serve --dev serves plaintext on loopback; unset the [tls] settings".to_owned(),
        ));
    }
    if config
        .database_url
        .as_deref()
        .is_some_and(|url| !url.starts_with("sqlite:"))
    {
        return Err(refuse(
            "database_url",
            "serve --dev runs on SQLite only; unset it to use the dev data directory".to_owned(),
        ));
    }
    if config.keyring.provider != KeyringProviderKind::Local {
        return Err(refuse(
            "keyring.provider",
            "serve --dev uses the local keyring in its data directory".to_owned(),
        ));
    }
    Ok(config)
}

/// This run's API keys, one per role.
struct DevKeys(Vec<(&'static DevRole, SecretString)>);

impl DevKeys {
    fn generate() -> Result<Self, String> {
        ROLES
            .iter()
            .map(|role| {
                crate::crypto::random_token(32)
                    .map(|key| (*role, key))
                    .map_err(|e| format!("cannot generate a dev API key: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Replaces the configuration's API keys and policy with dev mode's.
    fn configure(&self, config: &mut Config) {
        config.auth.api_keys = self
            .0
            .iter()
            .map(|(role, key)| ApiKeyConfig {
                identity: role.identity.to_owned(),
                sha256: Authenticator::hash_api_key(key.expose()),
            })
            .collect();
        config.policy.file = None;
        config.policy.identities = ROLES
            .iter()
            .map(|role| {
                (
                    role.identity.to_owned(),
                    IdentityEntry {
                        role: role.role.to_owned(),
                        purposes: role.purpose.map(str::to_owned).into_iter().collect(),
                        consumers: role.consumer.map(str::to_owned).into_iter().collect(),
                    },
                )
            })
            .collect();
        config.policy.purposes = [
            ("calendar_sync", "calendar", &config.google.calendar_scopes),
            ("email_sync", "email", &config.google.email_scopes),
        ]
        .into_iter()
        .map(|(purpose, integration, scopes)| {
            (
                purpose.to_owned(),
                PurposeEntry {
                    integrations: vec![integration.to_owned()],
                    scopes: scopes.clone(),
                    tenants: Vec::new(),
                },
            )
        })
        .collect();
    }

    /// The `export` lines (with a comment naming each identity).
    fn exports(&self, grpc_addr: SocketAddr) -> String {
        let mut text = String::new();
        for (role, key) in &self.0 {
            text.push_str(&format!(
                "# {}: role {}, {}\nexport {}={}\n",
                role.identity,
                role.role,
                role.note,
                role.env,
                key.expose()
            ));
        }
        text.push_str(&format!("export {SERVER_ENV}=http://{grpc_addr}\n"));
        text
    }
}

async fn serve_dev(mut config: Config) -> Result<(), CliError> {
    tracing::warn!(data_dir = %config.data_dir.display(), "DEV MODE, NOT FOR PRODUCTION: simulated Google, throwaway API keys printed on stdout, loopback only");
    super::first_start_keyring(&config).await?;

    // The simulator redirects the browser to the vault's real callback, so it
    // must know the HTTP port before the vault binds it.
    config.http_addr = resolve_port(config.http_addr)?;
    let redirect_uri = format!("http://{}/oauth/callback", config.http_addr);
    let sim = GoogleSim::start(SimConfig::with_clients(vec![SimClient::new(
        DEV_CLIENT_ID,
        DEV_CLIENT_SECRET,
        &redirect_uri,
    )]))
    .await
    .map_err(|e| format!("cannot start the Google simulator: {e}"))?;
    let google = &mut config.google;
    google.client_id = DEV_CLIENT_ID.to_owned();
    google.client_secret = DEV_CLIENT_SECRET.to_owned().into();
    google.redirect_uri = redirect_uri;
    google.return_url = None;
    google.auth_uri = sim.auth_uri();
    google.token_uri = sim.token_uri();
    google.revoke_uri = sim.revoke_uri();
    google.userinfo_uri = sim.userinfo_uri();
    google.jwks_uri = sim.jwks_uri();
    google.issuers = vec![sim.issuer()];

    let keys = DevKeys::generate()?;
    keys.configure(&mut config);
    config.validate().map_err(|e| e.to_string())?;

    let env_file = config.data_dir.join(ENV_FILE_NAME);
    let result = crate::server::serve_then(&config, |server| {
        announce(server, &config, &sim, &keys, &env_file)
    })
    .await;
    // The keys die with this process; so does the file that holds them.
    let _ = std::fs::remove_file(&env_file);
    sim.shutdown().await;
    result.map_err(|e| CliError::failed(e.to_string()))
}

/// A port-0 address turned into a free port, by binding it briefly. (Another
/// process could take the port before the vault binds it again; in dev mode
/// that costs a restart, not a secret.)
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    std::net::TcpListener::bind(addr)
        .and_then(|probe| probe.local_addr())
        .map_err(|e| format!("http_addr: cannot listen on {addr}: {e}"))
}

/// Writes the keys' `export` lines to the 0600 env file and prints the
/// banner on stdout, once the listeners are bound.
fn announce(
    server: &RunningServer,
    config: &Config,
    sim: &GoogleSim,
    keys: &DevKeys,
    env_file: &Path,
) -> Result<(), String> {
    let exports = Zeroizing::new(keys.exports(server.grpc_addr));
    write_private(
        env_file,
        &format!(
            "# tokenvault serve --dev: NOT FOR PRODUCTION. Valid while that process runs.\n{}",
            exports.as_str()
        ),
    )
    .map_err(|e| format!("cannot write {}: {e}", env_file.display()))?;
    let banner = format!(
        "\
*** tokenvault DEV MODE: NOT FOR PRODUCTION ***
Google is simulated (every sign-in consents), the API keys below are new on
every start and die with this process, and nothing listens beyond loopback.

  gRPC            http://{grpc}
  OAuth callback  http://{http}/oauth/callback
  Google (sim)    {google}
  data            {data} (SQLite + local keyring)

In another terminal, paste these lines (or run `. {env_file}`):

{exports}
Then: tokenvault dev connect --tenant acme --account alice --integration calendar
",
        grpc = server.grpc_addr,
        http = server.http_addr,
        google = sim.base_url(),
        data = config.data_dir.display(),
        env_file = env_file.display(),
        exports = exports.as_str(),
    );
    let banner = Zeroizing::new(banner);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot print the dev keys: {e}"))?;
    tracing::warn!(grpc_addr = %server.grpc_addr, http_addr = %server.http_addr, google = %sim.base_url(), env_file = %env_file.display(), identities = ?ROLES.map(|r| r.identity), "DEV MODE, NOT FOR PRODUCTION: dev API keys printed on stdout");
    Ok(())
}

/// Writes `text` to a file only its owner can read (mode 0600, also when the
/// file existed).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

// ---------------------------------------------------------------------------
// tokenvault dev …
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
            if acked.is_none() {
                println!("{consumer}: nothing to acknowledge");
            }
            Ok(())
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
}

impl Dev {
    async fn open(args: &DevArgs) -> Result<Self, CliError> {
        let file = read_env_file(&args.env_file)?;
        let server = args
            .server
            .clone()
            .or_else(|| file.get(SERVER_ENV).map(|s| s.to_string()))
            .unwrap_or_else(|| super::client::DEFAULT_SERVER.to_owned());
        let url = Url::parse(&server)
            .map_err(|e| CliError::usage(format!("--server {server:?}: {e}")))?;
        let loopback = match url.host() {
            Some(oauth2::url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(oauth2::url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            Some(oauth2::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        if url.scheme() != "http" || !loopback {
            return Err(CliError::usage(format!(
                "--server {server:?}: the dev commands talk to `tokenvault serve --dev`, \
                 which serves plaintext on loopback (http://127.0.0.1:…)"
            )));
        }
        let channel = Endpoint::from_shared(server.clone())
            .map_err(|e| CliError::usage(format!("--server {server:?}: {e}")))?
            .connect_timeout(DEFAULT_TIMEOUT)
            .timeout(DEFAULT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| CliError::unreachable(&server, &e))?;
        Ok(Self {
            channel,
            env_file: args.env_file.clone(),
            file,
        })
    }

    /// The key of `role`: its environment variable, else the env file.
    fn bearer(&self, role: &DevRole) -> Result<DevBearer, CliError> {
        let key = match std::env::var(role.env) {
            Ok(key) => Zeroizing::new(key),
            Err(_) => match self.file.get(role.env) {
                Some(key) => key.clone(),
                None => {
                    return Err(CliError::usage(format!(
                        "{} is not set and {} does not hold it: start `tokenvault serve --dev` \
                         and paste the export lines it prints",
                        role.env,
                        self.env_file.display()
                    )));
                }
            },
        };
        let header = Zeroizing::new(format!("Bearer {}", key.trim()));
        let mut value = MetadataValue::try_from(header.as_str()).map_err(|_| {
            CliError::usage(format!(
                "{} holds characters not allowed in a header",
                role.env
            ))
        })?;
        value.set_sensitive(true);
        Ok(DevBearer(value))
    }

    fn connections(&self, role: &DevRole) -> Result<ConnectionServiceClient<Authed>, CliError> {
        Ok(ConnectionServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    fn leases(&self, role: &DevRole) -> Result<LeaseServiceClient<Authed>, CliError> {
        Ok(LeaseServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    fn events(&self, role: &DevRole) -> Result<EventServiceClient<Authed>, CliError> {
        Ok(EventServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(role)?,
        ))
    }

    /// `dev connect`: the whole OAuth flow, as a browser and the app would.
    async fn connect(
        &self,
        tenant: String,
        account: String,
        integration: DevIntegration,
        email: Option<String>,
    ) -> Result<(), CliError> {
        let rpc = "ConnectionService.BeginAuthorization";
        let begun = answer(
            rpc,
            self.connections(&APP)?
                .begin_authorization(pb::BeginAuthorizationRequest {
                    tenant_id: tenant.clone(),
                    account_id: account.clone(),
                    integration: integration.proto() as i32,
                    login_hint: email,
                })
                .await,
        )?;
        let auth_url = Url::parse(&begun.authorization_url)
            .map_err(|e| CliError::failed(format!("{rpc}: the authorization URL: {e}")))?;
        println!(
            "-> {rpc} as {}: state valid until {}",
            APP.identity,
            output::ts_text(begun.state_expires_at.as_ref())
        );
        println!(
            "-> the browser goes to Google: {}{} (scope={})",
            auth_url.origin().ascii_serialization(),
            auth_url.path(),
            query_value(&auth_url, "scope").unwrap_or_default()
        );

        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(DEFAULT_TIMEOUT)
            .build()
            .map_err(|e| CliError::failed(format!("cannot build an HTTP client: {e}")))?;
        let consent = http.get(auth_url.as_str()).send().await.map_err(|e| {
            CliError::unreachable(auth_url.origin().ascii_serialization().as_str(), &e)
        })?;
        let location = consent
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Url::parse(v).ok())
            .filter(|_| consent.status().is_redirection())
            .ok_or_else(|| {
                CliError::failed(format!(
                    "Google answered {} instead of redirecting back: is this a vault started \
                     with `tokenvault serve --dev`?",
                    consent.status()
                ))
            })?;
        match query_value(&location, "error") {
            Some(error) => println!("-> Google refused (error={error}); back to the vault"),
            None => println!(
                "-> Google (simulated) signed the user in and got consent; back to {}{}",
                location.origin().ascii_serialization(),
                location.path()
            ),
        }

        let callback = http.get(location.as_str()).send().await.map_err(|e| {
            CliError::unreachable(location.origin().ascii_serialization().as_str(), &e)
        })?;
        let status = callback.status();
        let body = callback.text().await.unwrap_or_default();
        let page = body
            .split_once("<p>")
            .and_then(|(_, rest)| rest.split_once("</p>"))
            .map_or("", |(text, _)| text);
        println!("-> the vault's callback answered {status}: {page}");
        if !status.is_success() {
            return Err(CliError::failed(format!(
                "the connection failed: the vault's callback answered {status}"
            )));
        }

        let rpc = "ConnectionService.ListConnections";
        let list = answer(
            rpc,
            self.connections(&APP)?
                .list_connections(pb::ListConnectionsRequest {
                    tenant_id: tenant,
                    account_id: Some(account),
                    integration: Some(integration.proto() as i32),
                    ..Default::default()
                })
                .await,
        )?;
        // With several Google accounts on one integration, the one just
        // connected is the one updated last.
        let connection = list
            .connections
            .into_iter()
            .max_by_key(|c| {
                c.updated_at
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or_default()
            })
            .ok_or_else(|| CliError::failed(format!("{rpc}: no connection after the callback")))?;
        println!();
        print_fields(&connection_fields(&connection))
    }

    /// `dev lease`: a token for a purpose, as that purpose's worker. The
    /// token itself is not printed, only its length.
    async fn lease(
        &self,
        connection: String,
        purpose: String,
        scopes: Vec<String>,
    ) -> Result<(), CliError> {
        // The dev policy gives each purpose its integration's scopes; unless
        // the vault was told otherwise, those are the defaults.
        let defaults = crate::config::GoogleConfig::default();
        let (worker, default_scopes) = match purpose.as_str() {
            "email_sync" => (&EMAIL_WORKER, defaults.email_scopes),
            // Any other purpose is asked for as calendar-sync, and refused
            // by the policy unless it is calendar_sync.
            _ => (&CALENDAR_WORKER, defaults.calendar_scopes),
        };
        let scopes = if scopes.is_empty() {
            default_scopes
        } else {
            scopes
        };
        let rpc = "LeaseService.LeaseToken";
        println!("-> {rpc} as {} (purpose {purpose})", worker.identity);
        let mut lease = answer(
            rpc,
            self.leases(worker)?
                .lease_token(pb::LeaseTokenRequest {
                    connection_id: connection.clone(),
                    purpose: purpose.clone(),
                    scopes,
                    min_valid_seconds: 0,
                })
                .await,
        )?;
        let token = Zeroizing::new(std::mem::take(&mut lease.access_token));
        let mut f = Fields::new();
        f.add("lease_id", lease.lease_id.clone())
            .add("connection_id", connection)
            .add("purpose", purpose)
            .add("granted_scopes", output::list_text(&lease.granted_scopes))
            .add(
                "token_expires_at",
                output::ts_text(lease.token_expires_at.as_ref()),
            )
            .add(
                "lease_expires_at",
                output::ts_text(lease.lease_expires_at.as_ref()),
            )
            .add(
                "access_token",
                format!(
                    "{} characters, not shown (a worker sends it to Google as a Bearer token)",
                    token.len()
                ),
            );
        print_fields(&f)
    }

    /// `dev disconnect`: Disconnect as the app; unless `ack` is false, each
    /// required consumer with a dev key acknowledges the deletion event; then
    /// the receipt.
    async fn disconnect(
        &self,
        connection: String,
        reason: String,
        ack: bool,
    ) -> Result<(), CliError> {
        let rpc = "ConnectionService.Disconnect";
        let mut app = self.connections(&APP)?;
        let receipt = answer(
            rpc,
            app.disconnect(pb::DisconnectRequest {
                connection_id: connection.clone(),
                reason,
            })
            .await,
        )?;
        let waiting = if receipt.status == pb::ReceiptStatus::Complete as i32 {
            "complete".to_owned()
        } else {
            format!(
                "pending until acknowledged by {}",
                output::list_text(&receipt.required_consumers)
            )
        };
        println!(
            "-> {rpc} as {}: tokens destroyed at {}, receipt {} ({waiting})",
            APP.identity,
            output::ts_text(receipt.tokens_destroyed_at.as_ref()),
            receipt.receipt_id,
        );
        if ack {
            let acked: Vec<&str> = receipt
                .consumer_acks
                .iter()
                .map(|a| a.consumer.as_str())
                .collect();
            for consumer in &receipt.required_consumers {
                if acked.contains(&consumer.as_str()) {
                    // Disconnecting again answers the same receipt.
                    println!("-> {consumer} has acknowledged this deletion already");
                    continue;
                }
                let Ok(role) = consumer_role(consumer) else {
                    println!("-> no dev key acts as {consumer}: the receipt waits for it");
                    continue;
                };
                let target = Target {
                    connection: &connection,
                    receipt: &receipt.receipt_id,
                };
                self.acknowledge(role, consumer, Some(target)).await?;
            }
        }
        // The revocation at Google is confirmed within moments (inline, else
        // by the outbox); the acknowledgements complete the receipt.
        let rpc = "ConnectionService.GetDeletionReceipt";
        let deadline = Instant::now() + SETTLE;
        let receipt = loop {
            let r = answer(
                rpc,
                app.get_deletion_receipt(pb::GetDeletionReceiptRequest {
                    receipt_id: receipt.receipt_id.clone(),
                })
                .await,
            )?;
            if !ack || r.status == pb::ReceiptStatus::Complete as i32 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut f = Fields::new();
        f.add("receipt_id", receipt.receipt_id.clone())
            .add(
                "status",
                short(
                    pb::ReceiptStatus::try_from(receipt.status)
                        .ok()
                        .map(|s| s.as_str_name()),
                    "RECEIPT_STATUS_",
                    receipt.status,
                ),
            )
            .add(
                "completed_at",
                output::ts_text(receipt.completed_at.as_ref()),
            )
            .add(
                "details",
                format!("tokenvault admin receipts show {}", receipt.receipt_id),
            );
        println!();
        print_fields(&f)
    }

    /// Watches `consumer`'s events from its acknowledged position and
    /// acknowledges them: with a `target`, up to that deletion's event
    /// (printing the events of its connection); without, everything that
    /// arrives until the stream stays idle. Returns the cursor acknowledged.
    async fn acknowledge(
        &self,
        role: &DevRole,
        consumer: &str,
        target: Option<Target<'_>>,
    ) -> Result<Option<u64>, CliError> {
        let mut events = self.events(role)?;
        let mut stream = answer(
            "EventService.Watch",
            events
                .watch(pb::WatchRequest {
                    consumer: consumer.to_owned(),
                    ..Default::default()
                })
                .await,
        )?;
        println!("-> {consumer} (as {}) watches its events:", role.identity);
        let deadline = Instant::now() + SETTLE;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if target.is_some() {
                left
            } else {
                IDLE.min(left)
            };
            let event = match tokio::time::timeout(wait, stream.message()).await {
                Err(_) | Ok(Ok(None)) if target.is_some() => {
                    return Err(CliError::failed(format!(
                        "{consumer} saw no deletion event for {} within {SETTLE:?}",
                        target.as_ref().map_or("", |t| t.connection)
                    )));
                }
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(status)) => return Err(CliError::status("EventService.Watch", &status)),
                Ok(Ok(Some(event))) => event,
            };
            last = Some(event.cursor);
            let done = target
                .as_ref()
                .is_some_and(|t| t.receipt == event.receipt_id);
            if target
                .as_ref()
                .is_none_or(|t| t.connection == event.connection_id)
            {
                println!("     {}", event_text(&event));
            }
            if done {
                break;
            }
        }
        drop(stream);
        let Some(cursor) = last else {
            return Ok(None);
        };
        let acked = answer(
            "EventService.Ack",
            events
                .ack(pb::AckRequest {
                    consumer: consumer.to_owned(),
                    cursor,
                })
                .await,
        )?;
        println!(
            "-> {consumer} acknowledged {} (EventService.Ack up to #{})",
            if target.is_some() {
                "the deletion"
            } else {
                "its events"
            },
            acked.position
        );
        Ok(Some(acked.position))
    }
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

/// `#7  connection_deleted  conn_…  receipt rcpt_…`.
fn event_text(e: &pb::Event) -> String {
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

fn print_fields(fields: &Fields) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    fields
        .write(&mut stdout)
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::failed(format!("cannot write the output: {e}")))
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
