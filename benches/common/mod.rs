//! What the benchmarks share: a fresh database per run, dropped afterwards,
//! and for the lease benchmarks a vault serving one calendar worker with its
//! connections seeded, the bearer header and the latency arithmetic.
#![allow(dead_code, reason = "each benchmark uses part of this module")]

use sqlx::Connection as _;

/// The product's allocator (`src/main.rs`), so that a benchmark measures the
/// vault as it runs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

/// The database's size in bytes as its backend counts it: SQLite's pages in
/// use (`page_count − freelist_count`, times `page_size`; a fresh connection
/// sees the pages still in the WAL), PostgreSQL's `pg_database_size` (tables,
/// indexes and TOAST; not the WAL). `None` when it cannot be read.
pub async fn database_bytes(url: &str) -> Option<u64> {
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.ok()?;
        let mut pragma = async |name: &str| -> Option<i64> {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("PRAGMA {name}")))
                .fetch_one(&mut c)
                .await
                .ok()
        };
        let pages = pragma("page_count").await?;
        let free = pragma("freelist_count").await?;
        let size = pragma("page_size").await?;
        u64::try_from((pages - free) * size).ok()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.ok()?;
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await
            .ok()?;
        let _ = c.close().await;
        u64::try_from(bytes).ok()
    }
}

/// Brings a database that has just taken a bulk import to the state it
/// would be in after running a while, before it is measured: on SQLite the
/// import's WAL is checkpointed into the database file and truncated (else
/// the vault's background checkpoints copy it during the measurement); on
/// PostgreSQL the tables are vacuumed and analysed (autovacuum may be off,
/// and the planner has no statistics for rows it has not seen). Returns how
/// long it took.
pub async fn settle_database(url: &str) -> Duration {
    let start = std::time::Instant::now();
    let outcome = if url.starts_with("sqlite:") {
        match sqlx::SqliteConnection::connect(url).await {
            Ok(mut c) => sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&mut c)
                .await
                .map(drop),
            Err(e) => Err(e),
        }
    } else {
        match sqlx::PgConnection::connect(url).await {
            Ok(mut c) => {
                let r = sqlx::query("VACUUM ANALYZE")
                    .execute(&mut c)
                    .await
                    .map(drop);
                let _ = c.close().await;
                r
            }
            Err(e) => Err(e),
        }
    };
    if let Err(e) = outcome {
        println!("  (settling the database failed: {e})");
    }
    start.elapsed()
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
use tokenvault::crypto::{LocalKeyring, Pkcs11Keyring, SecretString};
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

/// Which keyring a benchmark vault uses.
#[derive(Clone, Debug)]
pub enum BenchKeyring {
    /// A fresh local keyring file.
    Local,
    /// Fresh keys under their own label prefix in a SoftHSM2 token (see [`softhsm_token`]).
    Pkcs11(SoftHsmToken),
}

impl BenchKeyring {
    /// `local` or `pkcs11`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Pkcs11(_) => "pkcs11",
        }
    }
}

/// A SoftHSM2 token this benchmark process can use.
#[derive(Clone, Debug)]
pub struct SoftHsmToken {
    pub module: std::path::PathBuf,
    pub label: String,
}

/// The user PIN of the benchmark's token.
pub const SOFTHSM_PIN: &str = "87654321";
const SOFTHSM_CHILD: &str = "TV_BENCH_SOFTHSM_TOKEN";

/// A SoftHSM2 token for this benchmark. SoftHSM reads its configuration once
/// per process, so the parent makes a token in a temporary directory, runs
/// this same benchmark again as a child with `SOFTHSM2_CONF` pointing at it,
/// and exits with the child's status; the child gets the token. `None` when
/// SoftHSM2 is not installed (Debian package `softhsm2`).
pub fn softhsm_token() -> Option<SoftHsmToken> {
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())?;
    if let Ok(label) = std::env::var(SOFTHSM_CHILD) {
        return Some(SoftHsmToken { module, label });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).expect("token directory");
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("SoftHSM2 configuration");
    let label = "tv-bench";
    let made = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            SOFTHSM_PIN,
        ])
        .args(["--so-pin", "12345678"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("run softhsm2-util");
    assert!(made.status.success(), "softhsm2-util --init-token failed");
    let status = std::process::Command::new(std::env::current_exe().expect("this benchmark"))
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env(SOFTHSM_CHILD, label)
        .status()
        .expect("run the benchmark with the token");
    drop(dir);
    std::process::exit(status.code().unwrap_or(1));
}

/// Starts the real server on loopback (plain gRPC, ephemeral ports, audit on)
/// over `database_url`, with a fresh keyring (a local file in `dir`, or fresh
/// keys in an HSM token) and one API key for [`IDENTITY`], a worker allowed
/// [`PURPOSE`] on calendar connections. Returns the server and the key.
pub async fn start_worker_vault(
    dir: &std::path::Path,
    database_url: String,
    rng: &SystemRandom,
) -> (RunningServer, String) {
    start_worker_vault_with(dir, database_url, rng, &BenchKeyring::Local, |_| {}).await
}

/// As [`start_worker_vault`], with the given keyring, after `adjust` has had
/// its say on the configuration.
pub async fn start_worker_vault_with(
    dir: &std::path::Path,
    database_url: String,
    rng: &SystemRandom,
    keyring: &BenchKeyring,
    adjust: impl FnOnce(&mut Config),
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
            authenticate: None,
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
    adjust(&mut config);
    match keyring {
        BenchKeyring::Local => {
            LocalKeyring::init(config.keyring_path()).expect("init keyring");
        }
        BenchKeyring::Pkcs11(token) => {
            use tokenvault::config::KeyringProviderKind;
            config.keyring.provider = KeyringProviderKind::Pkcs11;
            config.keyring.pkcs11.module = Some(token.module.clone());
            config.keyring.pkcs11.token_label = token.label.clone();
            config.keyring.pkcs11.pin = SOFTHSM_PIN.to_owned().into();
            config.keyring.pkcs11.label_prefix = format!("bench-{}", random_hex(rng, 4));
            Pkcs11Keyring::init(&config.pkcs11_settings().expect("pkcs11 settings"))
                .expect("create the keys in the token");
        }
    }
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
