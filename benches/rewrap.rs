//! DEK rewrap throughput: imports N connections, then times an online key
//! rotation (read batch, unwrap with the old KEK, wrap with the new one,
//! compare-and-swap write, progress update) until every DEK is on the new
//! version.
//!
//! `cargo bench --bench rewrap -- [--backend sqlite|postgres] [--deks N] [--batch N]`
//! PostgreSQL: `TV_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432/postgres);
//! a fresh database is created and dropped.

use std::time::{Duration, Instant};

use tokenvault::audit::Actor;
use tokenvault::config::Config;
use tokenvault::crypto::{LocalKeyring, SecretString};
use tokenvault::domain::{AccountId, ConnectionStatus, Integration, ScopeSet, TenantId, Timestamp};
use tokenvault::vault::{NewConnection, Vault};

struct Args {
    backend: String,
    deks: usize,
    batch: u32,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        deks: 100_000,
        batch: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => a.backend = it.next().expect("--backend sqlite|postgres"),
            "--deks" => a.deks = it.next().and_then(|v| v.parse().ok()).expect("--deks N"),
            "--batch" => a.batch = it.next().and_then(|v| v.parse().ok()).expect("--batch N"),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

#[path = "common/mod.rs"]
mod common;
use common::{database, drop_database};

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (url, cleanup) = database(&a.backend, dir.path()).await;
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            database_url: Some(url),
            ..Default::default()
        };
        config.keyring.rotation_batch_size = a.batch;
        LocalKeyring::init(config.keyring_path()).unwrap();
        let vault = Vault::open(&config).await.unwrap();

        let scopes = ScopeSet::parse_spaced("https://www.googleapis.com/auth/calendar.events").unwrap();
        let start = Instant::now();
        let mut i = 0usize;
        while i < a.deks {
            let n = (a.deks - i).min(5000);
            let batch = (i..i + n)
                .map(|k| NewConnection {
                    tenant: TenantId::parse("bench").unwrap(),
                    account: AccountId::parse(&format!("user{k}")).unwrap(),
                    integration: Integration::Calendar,
                    google_subject: format!("sub{k}"),
                    google_email: format!("user{k}@example.test"),
                    granted_scopes: scopes.clone(),
                    status: ConnectionStatus::Active,
                    access_token: SecretString::new(format!("ya29.bench-access-token-{k:0>120}")),
                    access_expires_at: Timestamp::now().plus(Duration::from_secs(3600)),
                    refresh_token: Some(SecretString::new(format!("1//bench-refresh-{k:0>80}"))),
                })
                .collect();
            vault.connection_import(batch).await.unwrap();
            i += n;
        }
        let import = start.elapsed();
        println!(
            "import   {:>8} connections on {:<8} {:>8.2?}  {:>9.0} connections/s",
            a.deks,
            a.backend,
            import,
            a.deks as f64 / import.as_secs_f64()
        );

        let start = Instant::now();
        let run = vault.keys().rotate(&Actor::system()).await.unwrap();
        loop {
            // The runs table, not KeyStatus: counting DEKs per version scans them all.
            let runs = vault.store().rotation_list().await.unwrap();
            let r = runs.into_iter().find(|r| r.run_id == run.run.run_id).unwrap();
            if r.state == "completed" {
                assert_eq!(r.rewrapped as usize, a.deks);
                break;
            }
            assert_ne!(r.state, "failed", "{:?}", r.last_error);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = start.elapsed();
        let rate = a.deks as f64 / elapsed.as_secs_f64();
        println!(
            "rewrap   {:>8} DEKs on {:<8} (batch {:>4}) {:>8.2?}  {:>9.0} DEKs/s  -> 1,000,000 DEKs in {:.1} s",
            a.deks,
            a.backend,
            a.batch,
            elapsed,
            rate,
            1_000_000.0 / rate
        );
        vault.shutdown().await;
        if let Some((admin, name)) = cleanup {
            drop_database(&admin, &name).await;
        }
    });
}
