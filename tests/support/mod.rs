//! Test harness: starts the real server on 127.0.0.1:0 with a fresh database
//! (a new SQLite file, or a new PostgreSQL database per test) and returns
//! generated tonic clients authenticated as each role.

#![allow(dead_code)]

pub mod logs;
pub mod raw;

use std::path::PathBuf;
use std::sync::Arc;

use tempfile::TempDir;
use tokenvault::config::{ApiKeyConfig, Config};
use tokenvault::crypto::LocalKeyring;
use tokenvault::grpc::Authenticator;
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
}

impl As {
    pub const ALL: [As; 5] = [As::App, As::Worker, As::Admin, As::Auditor, As::Nobody];

    pub fn identity(self) -> &'static str {
        match self {
            As::App => "test-app",
            As::Worker => "spiffe://tokenvault.test/calendar-sync",
            As::Admin => "test-admin",
            As::Auditor => "test-auditor",
            As::Nobody => "test-nobody",
        }
    }

    pub fn key(self) -> String {
        format!("tv-test-key-{}", self.identity().replace(['/', ':'], "-"))
    }

    fn role(self) -> Option<&'static str> {
        match self {
            As::App => Some("app"),
            As::Worker => Some("worker"),
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
            config
                .auth
                .roles
                .insert(who.identity().to_owned(), role.to_owned());
        }
    }
    config
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
            eprintln!("SKIPPED (postgres): {admin} is unavailable ({e}); set TV_TEST_POSTGRES_URL");
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
    logs::capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = fresh_database(backend, dir.path()).await?;
    let mut config = test_config(dir.path(), &database_url);
    adjust(&mut config);
    if !config.keyring_path().exists() {
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
    Some(TestVault {
        backend,
        grpc_addr: server.grpc_addr,
        http_addr: server.http_addr,
        vault: server.vault.clone(),
        server: Some(server),
        dir,
        config,
        database_url,
        channel,
    })
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
