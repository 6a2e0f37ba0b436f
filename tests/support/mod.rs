//! Test harness: starts the real server on 127.0.0.1:0 with a fresh database
//! (a new SQLite file, or a new PostgreSQL database per test) and returns
//! generated tonic clients authenticated as each role.

#![allow(dead_code)]

pub mod cli;
pub mod logs;
pub mod raw;
pub mod softhsm;

use std::path::PathBuf;
use std::sync::Arc;

use tempfile::TempDir;
use tokenvault::config::{ApiKeyConfig, Config};
use tokenvault::crypto::LocalKeyring;
use tokenvault::grpc::Authenticator;
use tokenvault::policy::{IdentityEntry, PurposeEntry};
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::event_service_client::EventServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tokenvault::server::RunningServer;
use tokenvault::vault::Vault;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The database engine a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The roles of the design, each with its own API key in the test config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    App,
    Worker,
    Admin,
    Auditor,
    /// An identity with a key but no role.
    Nobody,
    /// The email sync worker (purpose `email_sync`, consumer `email-sync`).
    EmailWorker,
}

/// Scopes the test policy's purposes allow.
pub const CALENDAR_READONLY: &str = "https://www.googleapis.com/auth/calendar.readonly";

impl As {
    pub const ALL: [As; 6] = [
        As::App,
        As::Worker,
        As::Admin,
        As::Auditor,
        As::Nobody,
        As::EmailWorker,
    ];

    pub fn identity(self) -> &'static str {
        match self {
            As::App => "test-app",
            As::Worker => "spiffe://tokenvault.test/calendar-sync",
            As::Admin => "test-admin",
            As::Auditor => "test-auditor",
            As::Nobody => "test-nobody",
            As::EmailWorker => "spiffe://tokenvault.test/email-sync",
        }
    }

    pub fn key(self) -> String {
        format!("tv-test-key-{}", self.identity().replace(['/', ':'], "-"))
    }

    fn role(self) -> Option<&'static str> {
        match self {
            As::App => Some("app"),
            As::Worker | As::EmailWorker => Some("worker"),
            As::Admin => Some("admin"),
            As::Auditor => Some("auditor"),
            As::Nobody => None,
        }
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// A running vault with its data directory and database.
pub struct TestVault {
    pub backend: Backend,
    pub dir: TempDir,
    pub config: Config,
    pub database_url: String,
    pub server: Option<RunningServer>,
    pub vault: Arc<Vault>,
    pub grpc_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    pub channel: Channel,
    /// Drops the PostgreSQL database this vault was spawned on (last field:
    /// it goes after the server).
    pub database_guard: Option<DropDatabase>,
}

impl TestVault {
    fn bearer(who: Option<As>) -> Bearer {
        Bearer(who.map(|w| format!("Bearer {}", w.key()).parse().expect("ascii key")))
    }

    pub fn connections(&self, who: As) -> ConnectionServiceClient<Authed> {
        ConnectionServiceClient::with_interceptor(self.channel.clone(), Self::bearer(Some(who)))
    }

    pub fn leases(&self, who: As) -> LeaseServiceClient<Authed> {
        LeaseServiceClient::with_interceptor(self.channel.clone(), Self::bearer(Some(who)))
    }

    pub fn events(&self, who: As) -> EventServiceClient<Authed> {
        EventServiceClient::with_interceptor(self.channel.clone(), Self::bearer(Some(who)))
    }

    pub fn admin(&self, who: As) -> AdminServiceClient<Authed> {
        AdminServiceClient::with_interceptor(self.channel.clone(), Self::bearer(Some(who)))
    }

    /// An admin client that sends no credentials at all.
    pub fn admin_anonymous(&self) -> AdminServiceClient<Authed> {
        AdminServiceClient::with_interceptor(self.channel.clone(), Self::bearer(None))
    }

    pub fn keyring_path(&self) -> PathBuf {
        self.config.keyring_path()
    }

    /// Stops the server gracefully.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// The configuration a test vault runs with: loopback on ephemeral ports, a
/// fresh data directory, an API key per role.
pub fn test_config(dir: &std::path::Path, database_url: &str) -> Config {
    let mut config = Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        database_url: Some(database_url.to_owned()),
        ..Default::default()
    };
    config.server.shutdown_grace_seconds = 5;
    for who in As::ALL {
        config.auth.api_keys.push(ApiKeyConfig {
            identity: who.identity().to_owned(),
            sha256: Authenticator::hash_api_key(&who.key()),
        });
        if let Some(role) = who.role() {
            let (purposes, consumers) = match who {
                As::Worker => (vec!["calendar_sync".into()], vec!["calendar-sync".into()]),
                As::EmailWorker => (vec!["email_sync".into()], vec!["email-sync".into()]),
                _ => (vec![], vec![]),
            };
            config.policy.identities.insert(
                who.identity().to_owned(),
                IdentityEntry {
                    role: role.to_owned(),
                    purposes,
                    consumers,
                    authenticate: None,
                },
            );
        }
    }
    config.policy.purposes.insert(
        "calendar_sync".into(),
        PurposeEntry {
            integrations: vec!["calendar".into()],
            scopes: vec![CALENDAR_SCOPE.into(), CALENDAR_READONLY.into()],
            tenants: vec![],
        },
    );
    config.policy.purposes.insert(
        "email_sync".into(),
        PurposeEntry {
            integrations: vec!["email".into()],
            scopes: vec![GMAIL_SCOPE.into()],
            tenants: vec![],
        },
    );
    config
}

/// The `[policy]` of a configuration as TOML text.
pub fn policy_toml(config: &Config, prefix: &str) -> String {
    let mut text = String::new();
    for (identity, e) in &config.policy.identities {
        text.push_str(&format!(
            "[{prefix}identities.{identity:?}]\nrole = {:?}\npurposes = {:?}\nconsumers = {:?}\n",
            e.role, e.purposes, e.consumers
        ));
        if let Some(method) = e.authenticate {
            text.push_str(&format!("authenticate = {:?}\n", method.as_str()));
        }
    }
    for (name, p) in &config.policy.purposes {
        text.push_str(&format!(
            "[{prefix}purposes.{name}]\nintegrations = {:?}\nscopes = {:?}\ntenants = {:?}\n",
            p.integrations, p.scopes, p.tenants
        ));
    }
    text
}

/// The PostgreSQL server tests use.
pub fn postgres_admin_url() -> String {
    std::env::var("TV_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn postgres_required() -> bool {
    std::env::var("TV_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// Creates a fresh, uniquely named database and returns its URL; `None` (after
/// saying so) when PostgreSQL is unavailable and not required.
pub async fn fresh_postgres_database() -> Option<String> {
    use sqlx::Connection as _;
    let admin = postgres_admin_url();
    let mut conn = match sqlx::PgConnection::connect(&admin).await {
        Ok(c) => c,
        Err(e) => {
            if postgres_required() {
                panic!(
                    "PostgreSQL required (TV_REQUIRE_POSTGRES=1) but {admin} is unavailable: {e}"
                );
            }
            // Written to stderr directly: libtest captures eprintln! of passing tests,
            // and a skip must be seen (CI fails on this line).
            use std::io::Write as _;
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (postgres): {test}: {admin} is unavailable ({e}); set TV_TEST_POSTGRES_URL"
            );
            return None;
        }
    };
    let name = format!("tv_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let _ = conn.close().await;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(b, _)| b)
        .to_owned();
    Some(format!("{base}/{name}"))
}

/// Drops a test's PostgreSQL database when it goes out of scope, closing
/// whatever connections are still open to it; declare it before what uses the
/// database, so that it is dropped after.
pub struct DropDatabase {
    name: String,
}

impl DropDatabase {
    /// A guard for `url` when it names a PostgreSQL test database; `None` otherwise.
    pub fn new(url: &str) -> Option<Self> {
        let name = url.strip_prefix("postgres://")?.rsplit_once('/')?.1;
        name.starts_with("tv_test_").then(|| Self {
            name: name.to_owned(),
        })
    }
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // Its own thread and runtime: a drop cannot await, and may run on a
        // runtime that is shutting down.
        let dropped = std::thread::spawn(move || {
            use sqlx::Connection as _;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&postgres_admin_url()).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("could not drop the test database: {dropped:?}");
        }
    }
}

/// A fresh database URL for a backend inside `dir`.
pub async fn fresh_database(backend: Backend, dir: &std::path::Path) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}", dir.join("tokenvault.db").display())),
        Backend::Postgres => fresh_postgres_database().await,
    }
}

/// Starts a vault on a fresh database; `None` if the backend is unavailable
/// and not required.
pub async fn spawn_vault(backend: Backend) -> Option<TestVault> {
    spawn_vault_with(backend, |_| {}).await
}

/// As [`spawn_vault`], after letting the test adjust the configuration.
pub async fn spawn_vault_with(
    backend: Backend,
    adjust: impl FnOnce(&mut Config),
) -> Option<TestVault> {
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = fresh_database(backend, dir.path()).await?;
    let guard = DropDatabase::new(&database_url);
    let mut tv = start_vault(backend, dir, database_url, adjust).await;
    tv.database_guard = guard;
    Some(tv)
}

/// Starts a vault on `database_url` with its configuration and keyring in
/// `dir`, after letting the test adjust the configuration.
pub async fn start_vault(
    backend: Backend,
    dir: tempfile::TempDir,
    database_url: String,
    adjust: impl FnOnce(&mut Config),
) -> TestVault {
    logs::capture();
    let mut config = test_config(dir.path(), &database_url);
    adjust(&mut config);
    if config.keyring.provider == tokenvault::config::KeyringProviderKind::Local
        && !config.keyring_path().exists()
    {
        LocalKeyring::init(config.keyring_path()).expect("init keyring");
    }
    let server = tokenvault::server::start(&config)
        .await
        .expect("start vault");
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to vault");
    TestVault {
        backend,
        grpc_addr: server.grpc_addr,
        http_addr: server.http_addr,
        vault: server.vault.clone(),
        server: Some(server),
        dir,
        config,
        database_url,
        channel,
        database_guard: None,
    }
}

/// Runs an async test body once per backend: `both_backends!(name, body_fn)`
/// defines `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::support::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body($crate::support::Backend::Postgres).await
            }
        }
    };
}

/// Stores a connection with the given plaintext tokens through the vault's
/// own write path (the one OAuth completion uses).
pub async fn seed_connection(
    vault: &Vault,
    tenant: &str,
    account: &str,
    integration: tokenvault::domain::Integration,
    access: &str,
    refresh: Option<&str>,
) -> tokenvault::store::ConnectionRecord {
    use tokenvault::crypto::SecretString;
    use tokenvault::domain::*;
    let new = tokenvault::vault::NewConnection {
        tenant: TenantId::parse(tenant).unwrap(),
        account: AccountId::parse(account).unwrap(),
        integration,
        google_subject: format!("sub-{tenant}-{account}"),
        google_email: format!("{account}@example.test"),
        granted_scopes: ScopeSet::parse_spaced(
            "openid email https://www.googleapis.com/auth/calendar.events",
        )
        .unwrap(),
        status: ConnectionStatus::Active,
        access_token: SecretString::new(access.to_owned()),
        access_expires_at: Timestamp::now().plus(std::time::Duration::from_secs(3600)),
        refresh_token: refresh.map(|r| SecretString::new(r.to_owned())),
    };
    vault
        .connection_store(new, &tokenvault::audit::Actor::system())
        .await
        .expect("store connection")
}

/// Waits until the vault's latest rotation has completed, failing if it failed or
/// takes longer than `limit`.
pub async fn wait_for_rotation(vault: &Vault, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let run = vault
            .keys()
            .status()
            .await
            .unwrap()
            .rotation
            .expect("a rotation")
            .run;
        match run.state.as_str() {
            "completed" => return,
            "failed" => panic!("rotation failed: {:?}", run.last_error),
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation did not complete in {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The OAuth client the simulator registers and the vault uses in tests.
pub const CLIENT_ID: &str = "tokenvault-test.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-test-client-secret";
/// An opaque registered redirect URI; tests deliver the redirect to the
/// vault's real callback address themselves.
pub const REDIRECT_URI: &str = "http://127.0.0.1:8080/oauth/callback";
pub const CALENDAR_SCOPE: &str = "https://www.googleapis.com/auth/calendar.events";
pub const GMAIL_SCOPE: &str = "https://www.googleapis.com/auth/gmail.modify";

/// Starts a Google simulator with the test client registered.
pub async fn start_google() -> tokenvault::google::sim::GoogleSim {
    tokenvault::google::sim::GoogleSim::start(sim_config())
        .await
        .expect("start Google simulator")
}

/// The simulator's default configuration with the test OAuth client.
pub fn sim_config() -> tokenvault::google::sim::SimConfig {
    use tokenvault::google::sim::{SimClient, SimConfig};
    SimConfig {
        clients: vec![SimClient {
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            redirect_uris: vec![REDIRECT_URI.to_owned()],
        }],
        ..Default::default()
    }
}

/// Points a configuration at the simulator.
pub fn use_google(config: &mut Config, sim: &tokenvault::google::sim::GoogleSim) {
    config.google.client_id = CLIENT_ID.to_owned();
    config.google.client_secret = CLIENT_SECRET.to_owned().into();
    config.google.redirect_uri = REDIRECT_URI.to_owned();
    config.google.auth_uri = sim.auth_uri();
    config.google.token_uri = sim.token_uri();
    config.google.revoke_uri = sim.revoke_uri();
    config.google.userinfo_uri = sim.userinfo_uri();
    config.google.jwks_uri = sim.jwks_uri();
    config.google.request_timeout_ms = 2_000;
    config.google.refresh_deadline_ms = 3_000;
}

/// A vault wired to a fresh Google simulator.
pub async fn spawn_vault_with_google(
    backend: Backend,
    adjust: impl FnOnce(&mut Config),
) -> Option<(TestVault, tokenvault::google::sim::GoogleSim)> {
    let sim = start_google().await;
    let tv = spawn_vault_with(backend, |c| {
        use_google(c, &sim);
        adjust(c);
    })
    .await?;
    Some((tv, sim))
}

/// Follows an authorization URL the way a browser would, to the simulator
/// and back: returns the query Google appended to the redirect URI.
pub async fn follow_authorization(url: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http.get(url).send().await.expect("reach the simulator");
    assert_eq!(
        resp.status().as_u16(),
        302,
        "authorization endpoint answered {}",
        resp.status()
    );
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let (base, query) = location.split_once('?').expect("redirect with a query");
    assert_eq!(base, REDIRECT_URI);
    query.to_owned()
}

/// Delivers Google's redirect to the vault's `GET /oauth/callback`; returns
/// the HTTP status and body.
pub async fn deliver_callback(tv: &TestVault, query: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{}/oauth/callback?{query}", tv.http_addr))
        .await
        .expect("reach the vault's callback");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// One query parameter's value.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    oauth2::url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Connects a Google account end to end (begin → simulator → callback) and
/// returns the new connection.
pub async fn connect(
    tv: &TestVault,
    tenant: &str,
    account: &str,
    integration: tokenvault::proto::v1::Integration,
) -> tokenvault::proto::v1::Connection {
    use tokenvault::proto::v1 as pb;
    let begun = tv
        .connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: tenant.into(),
            account_id: account.into(),
            integration: integration as i32,
            login_hint: None,
        })
        .await
        .expect("begin authorization")
        .into_inner();
    let query = follow_authorization(&begun.authorization_url).await;
    let (status, body) = deliver_callback(tv, &query).await;
    assert_eq!(status, 200, "callback failed: {body}");
    let list = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: tenant.into(),
            account_id: Some(account.into()),
            integration: Some(integration as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    list.connections
        .into_iter()
        .next()
        .expect("a connection after the callback")
}

/// Writes a TOML configuration file for a `tokenvault serve` child process:
/// the data directory, database, API keys and roles and Google settings of
/// `config`, followed by `extra` (more TOML sections).
pub fn write_config_file(dir: &std::path::Path, config: &Config, extra: &str) -> PathBuf {
    let mut text = format!(
        "data_dir = {:?}\ndatabase_url = {:?}\n",
        config.data_dir.display().to_string(),
        config.database_url.clone().unwrap_or_default()
    );
    let g = &config.google;
    if !g.client_id.is_empty() {
        text.push_str(&format!(
            "[google]\nclient_id = {:?}\nclient_secret = {:?}\nredirect_uri = {:?}\nauth_uri = {:?}\n\
             token_uri = {:?}\nrevoke_uri = {:?}\nuserinfo_uri = {:?}\njwks_uri = {:?}\n\
             request_timeout_ms = {}\nrefresh_deadline_ms = {}\n",
            g.client_id,
            g.client_secret.expose(),
            g.redirect_uri,
            g.auth_uri,
            g.token_uri,
            g.revoke_uri,
            g.userinfo_uri,
            g.jwks_uri,
            g.request_timeout_ms,
            g.refresh_deadline_ms
        ));
    }
    text.push_str(extra);
    text.push('\n');
    if config.policy.file.is_none() {
        text.push_str(&policy_toml(config, "policy."));
    }
    for key in &config.auth.api_keys {
        text.push_str(&format!(
            "[[auth.api_keys]]\nidentity = {:?}\nsha256 = {:?}\n",
            key.identity, key.sha256
        ));
    }
    let path = dir.join("tokenvault.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A lease of the calendar scope for the calendar sync purpose, with the
/// vault's default minimum validity.
pub fn calendar_lease(connection_id: &str) -> tokenvault::proto::v1::LeaseTokenRequest {
    tokenvault::proto::v1::LeaseTokenRequest {
        connection_id: connection_id.to_owned(),
        purpose: "calendar_sync".into(),
        scopes: vec![CALENDAR_SCOPE.into()],
        min_valid_seconds: 0,
    }
}

/// Disconnects a connection as the app.
pub async fn disconnect(tv: &TestVault, id: &str) -> tokenvault::proto::v1::DeletionReceipt {
    tv.connections(As::App)
        .disconnect(tokenvault::proto::v1::DisconnectRequest {
            connection_id: id.into(),
            reason: "test".into(),
        })
        .await
        .expect("disconnect")
        .into_inner()
        .receipt
        .unwrap()
}

/// A deletion receipt, as the app sees it.
pub async fn receipt(tv: &TestVault, id: &str) -> tokenvault::proto::v1::DeletionReceipt {
    tv.connections(As::App)
        .get_deletion_receipt(tokenvault::proto::v1::GetDeletionReceiptRequest {
            receipt_id: id.into(),
        })
        .await
        .expect("GetDeletionReceipt")
        .into_inner()
        .receipt
        .unwrap()
}

/// Polls a receipt until `done` holds; panics after `limit`, naming `what`.
pub async fn receipt_until(
    tv: &TestVault,
    id: &str,
    limit: std::time::Duration,
    what: &str,
    done: impl Fn(&tokenvault::proto::v1::DeletionReceipt) -> bool,
) -> tokenvault::proto::v1::DeletionReceipt {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let r = receipt(tv, id).await;
        if done(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receipt {id}: {what} not reached within {limit:?}: {r:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Posts a body to the vault's `POST /risc`; the HTTP status and body.
pub async fn post_risc(tv: &TestVault, body: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/risc", tv.http_addr))
        .header("content-type", "application/secevent+jwt")
        .body(body.to_owned())
        .send()
        .await
        .expect("reach /risc");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// Appends test entries (`test.fill`) until the audit chain's head is at
/// `seq`; panics if it is already past it.
pub async fn audit_fill_to(tv: &TestVault, seq: i64) {
    loop {
        let (head, _) = tv.vault.store().audit_head().await.unwrap();
        if head >= seq {
            assert_eq!(head, seq, "overshot");
            return;
        }
        tv.vault
            .audit()
            .record(
                &tokenvault::audit::Actor::system(),
                "test.fill",
                "t",
                tokenvault::audit::Outcome::Ok,
                head.to_string(),
            )
            .await
            .unwrap();
    }
}

/// The next event on a Watch stream, or `None` if none comes `within`.
pub async fn next_event(
    stream: &mut tonic::Streaming<tokenvault::proto::v1::WatchResponse>,
    within: std::time::Duration,
) -> Option<tokenvault::proto::v1::WatchResponse> {
    tokio::time::timeout(within, stream.message())
        .await
        .ok()
        .and_then(|m| m.expect("stream error"))
}
