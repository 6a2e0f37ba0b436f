//! Refresh single-flight under a thundering herd: many workers lease the same
//! connections the moment their access tokens expire.
//!
//! ```text
//! cargo bench --bench refresh -- [--backend sqlite|postgres] [--connections 20]
//!     [--concurrency 100] [--rounds 5] [--latency-ms 100]
//! ```
//!
//! What it does, in one process:
//!
//! 1. Starts the Google simulator and the real server wired to it (plain gRPC
//!    and HTTP on 127.0.0.1), with API keys for an app and a calendar worker.
//! 2. Connects `--connections` Google accounts through the real OAuth flow
//!    (BeginAuthorization, the simulator's consent redirect, the vault's
//!    `/oauth/callback`).
//! 3. Injects `--latency-ms` on every call to the simulator's token endpoint
//!    (Google's refresh latency), then per round: marks every stored access
//!    token expired (a direct `UPDATE` of the expiry column, the one thing a
//!    client cannot do), and fires `--concurrency` simultaneous LeaseToken
//!    calls per connection.
//! 4. Prints, per round and overall, the refreshes Google saw (single-flight
//!    means exactly one per connection per round), lease errors, and lease
//!    latency percentiles (client side).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use tokenvault::config::{ApiKeyConfig, Config};
use tokenvault::crypto::LocalKeyring;
use tokenvault::google::sim::{Endpoint, Fault, GoogleSim, SimClient, SimConfig};
use tokenvault::grpc::Authenticator;
use tokenvault::policy::{IdentityEntry, PurposeEntry};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tonic::transport::Channel;

use common::{Bearer, CALENDAR_SCOPE, database, drop_database};

const CLIENT_ID: &str = "tokenvault-bench.apps.googleusercontent.com";
const CLIENT_SECRET: &str = "GOCSPX-bench-secret";
const REDIRECT_URI: &str = "http://127.0.0.1:8080/oauth/callback";
const APP: &str = "bench-app";
const WORKER: &str = "spiffe://bench.local/calendar-sync";
const APP_KEY: &str = "tv-bench-app-key-0123456789";
const WORKER_KEY: &str = "tv-bench-worker-key-0123456789";

struct Args {
    backend: String,
    connections: usize,
    concurrency: usize,
    rounds: usize,
    latency_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        connections: 20,
        concurrency: 100,
        rounds: 5,
        latency_ms: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value(),
            "--connections" => a.connections = value().parse().expect("--connections N"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--rounds" => a.rounds = value().parse().expect("--rounds N"),
            "--latency-ms" => a.latency_ms = value().parse().expect("--latency-ms N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.connections > 0 && a.concurrency > 0 && a.rounds > 0);
    a
}

fn config(dir: &std::path::Path, url: String, sim: &GoogleSim) -> Config {
    let mut c = Config {
        grpc_addr: "127.0.0.1:0".parse().expect("address"),
        http_addr: "127.0.0.1:0".parse().expect("address"),
        data_dir: dir.to_path_buf(),
        database_url: Some(url),
        ..Default::default()
    };
    c.server.shutdown_grace_seconds = 5;
    c.google.client_id = CLIENT_ID.into();
    c.google.client_secret = CLIENT_SECRET.to_owned().into();
    c.google.redirect_uri = REDIRECT_URI.into();
    c.google.auth_uri = sim.auth_uri();
    c.google.token_uri = sim.token_uri();
    c.google.revoke_uri = sim.revoke_uri();
    c.google.userinfo_uri = sim.userinfo_uri();
    c.google.jwks_uri = sim.jwks_uri();
    for (identity, key) in [(APP, APP_KEY), (WORKER, WORKER_KEY)] {
        c.auth.api_keys.push(ApiKeyConfig {
            identity: identity.into(),
            sha256: Authenticator::hash_api_key(key),
        });
    }
    c.policy.identities.insert(
        APP.into(),
        IdentityEntry {
            role: "app".into(),
            purposes: vec![],
            consumers: vec![],
            authenticate: None,
        },
    );
    c.policy.identities.insert(
        WORKER.into(),
        IdentityEntry {
            role: "worker".into(),
            purposes: vec!["calendar_sync".into()],
            consumers: vec!["calendar-sync".into()],
            authenticate: None,
        },
    );
    c.policy.purposes.insert(
        "calendar_sync".into(),
        PurposeEntry {
            integrations: vec!["calendar".into()],
            scopes: vec![CALENDAR_SCOPE.into()],
            tenants: vec![],
        },
    );
    c
}

/// The OAuth flow a browser would drive: begin, the simulator's consent
/// redirect, the vault's callback. Returns the new connection's id.
async fn connect(
    app: &mut ConnectionServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, Bearer>,
    >,
    http: &reqwest::Client,
    http_addr: std::net::SocketAddr,
    account: &str,
) -> String {
    let begun = app
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "bench".into(),
            account_id: account.into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: Some(format!("{account}@example.test")),
        })
        .await
        .expect("begin authorization")
        .into_inner();
    let consent = http
        .get(&begun.authorization_url)
        .send()
        .await
        .expect("reach the simulator");
    let location = consent.headers()["location"]
        .to_str()
        .expect("ascii redirect")
        .to_owned();
    let (_, query) = location.split_once('?').expect("redirect with a query");
    let callback = http
        .get(format!("http://{http_addr}/oauth/callback?{query}"))
        .send()
        .await
        .expect("reach the vault's callback");
    assert!(callback.status().is_success(), "callback failed");
    app.list_connections(pb::ListConnectionsRequest {
        tenant_id: "bench".into(),
        account_id: Some(account.into()),
        ..Default::default()
    })
    .await
    .expect("list connections")
    .into_inner()
    .connections
    .into_iter()
    .next()
    .expect("a connection after the callback")
    .connection_id
}

async fn expire_all(url: &str) {
    let sql = "UPDATE connection_secrets SET access_expires_at = 0";
    if url.starts_with("sqlite") {
        let mut c = sqlx::SqliteConnection::connect(url).await.expect("sqlite");
        sqlx::query(sql).execute(&mut c).await.expect("expire");
        let _ = c.close().await;
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.expect("postgres");
        sqlx::query(sql).execute(&mut c).await.expect("expire");
        let _ = c.close().await;
    }
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let a = args();
    println!(
        "refresh: backend {}, {} connections, {} concurrent leases each, {} rounds, Google token latency {} ms",
        a.backend, a.connections, a.concurrency, a.rounds, a.latency_ms
    );
    if cfg!(debug_assertions) {
        println!("build: debug assertions ON: numbers are not representative");
    }
    let sim = GoogleSim::start(SimConfig {
        clients: vec![SimClient {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            redirect_uris: vec![REDIRECT_URI.into()],
        }],
        ..Default::default()
    })
    .await
    .expect("start the Google simulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, cleanup) = database(&a.backend, dir.path()).await;
    let config = config(dir.path(), url.clone(), &sim);
    LocalKeyring::init(config.keyring_path()).expect("init keyring");
    let server = tokenvault::server::start(&config)
        .await
        .expect("start the vault");
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut app = ConnectionServiceClient::with_interceptor(channel.clone(), Bearer::key(APP_KEY));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let mut ids = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        ids.push(connect(&mut app, &http, server.http_addr, &format!("user{i}")).await);
    }
    println!("connected {} accounts through the OAuth flow", ids.len());
    let ids = Arc::new(ids);
    if a.latency_ms > 0 {
        sim.inject(
            Endpoint::Token,
            Fault::Latency(Duration::from_millis(a.latency_ms)),
            None,
        );
    }

    let worker = LeaseServiceClient::with_interceptor(channel, Bearer::key(WORKER_KEY));
    let mut all = Vec::new();
    let mut total_refreshes = 0;
    let mut total_errors = 0;
    for round in 1..=a.rounds {
        expire_all(&url).await;
        let before = sim.refresh_calls();
        let barrier = Arc::new(tokio::sync::Barrier::new(ids.len() * a.concurrency));
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(ids.len() * a.concurrency);
        for id in ids.iter() {
            for _ in 0..a.concurrency {
                let mut client = worker.clone();
                let barrier = barrier.clone();
                let req = pb::LeaseTokenRequest {
                    connection_id: id.clone(),
                    purpose: "calendar_sync".into(),
                    scopes: vec![CALENDAR_SCOPE.into()],
                    min_valid_seconds: 60,
                };
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let t = Instant::now();
                    client.lease_token(req).await.map(|_| t.elapsed())
                }));
            }
        }
        let mut latencies = Vec::with_capacity(tasks.len());
        let mut errors = 0;
        for t in tasks {
            match t.await.expect("lease task") {
                Ok(d) => latencies.push(d),
                Err(status) => {
                    errors += 1;
                    if errors == 1 {
                        println!("  first error: {:?}: {}", status.code(), status.message());
                    }
                }
            }
        }
        let wall = started.elapsed();
        let refreshes = sim.refresh_calls() - before;
        latencies.sort_unstable();
        println!(
            "round {round}: {} leases in {:.0?}, {errors} errors, Google refreshes {refreshes} (single-flight: {}), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            wall,
            ids.len(),
            percentile_ms(&latencies, 0.50),
            percentile_ms(&latencies, 0.99),
            percentile_ms(&latencies, 1.0),
        );
        total_refreshes += refreshes;
        total_errors += errors;
        all.extend(latencies);
    }
    all.sort_unstable();
    let expected = (ids.len() * a.rounds) as u64;
    println!();
    println!(
        "| backend | connections | leases per connection | Google latency | refreshes (expected) | errors | lease p50 | lease p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {} ms | {} ({}) | {} | {:.1} ms | {:.1} ms |",
        a.backend,
        ids.len(),
        a.concurrency,
        a.latency_ms,
        total_refreshes,
        expected,
        total_errors,
        percentile_ms(&all, 0.50),
        percentile_ms(&all, 0.99),
    );
    println!(
        "single-flight: {}",
        if total_refreshes == expected && total_errors == 0 {
            "held (one Google refresh per connection per round, no errors)"
        } else {
            "NOT held"
        }
    );
    server.shutdown().await;
    sim.shutdown().await;
    if let Some((admin, name)) = cleanup {
        drop_database(&admin, &name).await;
    }
}
