//! What the benchmarks share: a fresh database per run, dropped afterwards,
//! and for the lease benchmarks a vault serving one calendar worker with its
//! connections seeded, the bearer header and the latency arithmetic.
#![allow(dead_code, reason = "each benchmark uses part of this module")]

use sqlx::Connection as _;

/// A fresh database URL for the backend, and what to drop afterwards
/// (PostgreSQL: the admin URL and the database name). PostgreSQL comes from
/// `TV_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432/postgres).
pub async fn database(backend: &str, dir: &std::path::Path) -> (String, Option<(String, String)>) {
    match backend {
        "sqlite" => (format!("sqlite://{}", dir.join("bench.db").display()), None),
        "postgres" => {
            let admin = std::env::var("TV_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let name = format!("tv_bench_{}", uuid::Uuid::new_v4().simple());
            let mut c = sqlx::PgConnection::connect(&admin)
                .await
                .expect("connect to PostgreSQL (TV_TEST_POSTGRES_URL)");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut c)
                .await
                .expect("create the bench database");
            let _ = c.close().await;
            let base = admin
                .rsplit_once('/')
                .map_or(admin.as_str(), |(b, _)| b)
                .to_owned();
            (format!("{base}/{name}"), Some((admin, name)))
        }
        other => panic!("unknown backend {other} (sqlite|postgres)"),
    }
}

/// Drops a database [`database`] created; failures are reported, not fatal.
pub async fn drop_database(admin: &str, name: &str) {
    match sqlx::PgConnection::connect(admin).await {
        Ok(mut c) => {
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {name} WITH (FORCE)"
            )))
            .execute(&mut c)
            .await
            {
                eprintln!("could not drop database {name}: {e}");
            }
            let _ = c.close().await;
        }
        Err(e) => eprintln!("could not drop database {name}: {e}"),
    }
}

// ----- a vault serving one calendar worker, for the lease benchmarks ----------

use std::time::Duration;

use ring::rand::{SecureRandom as _, SystemRandom};
use tokenvault::config::{ApiKeyConfig, Config};
use tokenvault::crypto::{LocalKeyring, SecretString};
use tokenvault::domain::{AccountId, ConnectionStatus, Integration, ScopeSet, TenantId, Timestamp};
use tokenvault::grpc::Authenticator;
use tokenvault::policy::{IdentityEntry, PurposeEntry};
use tokenvault::server::RunningServer;
use tokenvault::vault::{NewConnection, Vault};
use tonic::metadata::{Ascii, MetadataValue};

/// The worker identity the lease benchmarks call as.
pub const IDENTITY: &str = "spiffe://bench.local/calendar-sync";
/// The purpose it leases for.
pub const PURPOSE: &str = "calendar_sync";
/// The one scope the purpose allows and every lease asks for.
pub const CALENDAR_SCOPE: &str = "https://www.googleapis.com/auth/calendar.events";
const GRANTED_SCOPES: &str = "openid email https://www.googleapis.com/auth/calendar.events";
/// Connections per bulk import.
const IMPORT_BATCH: usize = 1000;

/// Random lowercase hex of `bytes` random bytes.
pub fn random_hex(rng: &SystemRandom, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill(&mut b).expect("system randomness");
    hex::encode(b)
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl Bearer {
    /// The header for an API key.
    pub fn key(key: &str) -> Self {
        Self(format!("Bearer {key}").parse().expect("ascii key"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// xorshift64*: cheap randomness for picking connections.
pub struct XorShift(pub u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (multiply-shift, no modulo bias worth the name).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
pub fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

/// Starts the real server on loopback (plain gRPC, ephemeral ports, audit on)
/// over `database_url`, with a fresh local keyring in `dir` and one API key
/// for [`IDENTITY`], a worker allowed [`PURPOSE`] on calendar connections.
/// Returns the server and the key.
pub async fn start_worker_vault(
    dir: &std::path::Path,
    database_url: String,
    rng: &SystemRandom,
) -> (RunningServer, String) {
    let key = format!("tv-bench-{}", random_hex(rng, 16));
    let mut config = Config {
        grpc_addr: "127.0.0.1:0".parse().expect("address"),
        http_addr: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.to_path_buf(),
        database_url: Some(database_url),
        ..Default::default()
    };
    config.server.shutdown_grace_seconds = 5;
    config.auth.api_keys.push(ApiKeyConfig {
        identity: IDENTITY.to_owned(),
        sha256: Authenticator::hash_api_key(&key),
    });
    config.policy.identities.insert(
        IDENTITY.to_owned(),
        IdentityEntry {
            role: "worker".into(),
            purposes: vec![PURPOSE.into()],
            consumers: vec!["calendar-sync".into()],
        },
    );
    config.policy.purposes.insert(
        PURPOSE.into(),
        PurposeEntry {
            integrations: vec!["calendar".into()],
            scopes: vec![CALENDAR_SCOPE.into()],
            tenants: vec![],
        },
    );
    LocalKeyring::init(config.keyring_path()).expect("init keyring");
    let server = tokenvault::server::start(&config)
        .await
        .expect("start the vault");
    println!("server: gRPC on {}", server.grpc_addr);
    (server, key)
}

/// Seeds `count` ACTIVE calendar connections of `tenant` through the bulk
/// import path, each with its own random access token valid for
/// `token_life` and a refresh token; returns their ids.
pub async fn seed_calendar_connections(
    vault: &Vault,
    tenant: &str,
    count: usize,
    token_life: Duration,
    rng: &SystemRandom,
) -> Vec<String> {
    let granted = ScopeSet::parse_spaced(GRANTED_SCOPES).expect("scopes");
    let tenant = TenantId::parse(tenant).expect("tenant");
    let mut ids = Vec::with_capacity(count);
    let mut i = 0usize;
    while i < count {
        let n = (count - i).min(IMPORT_BATCH);
        let batch = (i..i + n)
            .map(|k| NewConnection {
                tenant: tenant.clone(),
                account: AccountId::parse(&format!("user{k}")).expect("account"),
                integration: Integration::Calendar,
                google_subject: format!("sub{k}"),
                google_email: format!("user{k}@example.test"),
                granted_scopes: granted.clone(),
                status: ConnectionStatus::Active,
                access_token: SecretString::new(format!("ya29.{}", random_hex(rng, 64))),
                access_expires_at: Timestamp::now().plus(token_life),
                refresh_token: Some(SecretString::new(format!("1//{}", random_hex(rng, 48)))),
            })
            .collect();
        let records = vault
            .connection_import(batch)
            .await
            .expect("import connections");
        ids.extend(records.into_iter().map(|r| r.id.to_string()));
        i += n;
    }
    ids
}
