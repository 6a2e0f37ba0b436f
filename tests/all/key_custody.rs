//! Key custody for a fleet: three `tokenvault serve` processes on one
//! PostgreSQL for each keyring provider that replicas can share (one SoftHSM2
//! token, the same env values, one keyring file). While B and C lease and
//! every replica's health is watched, A rotates (`keys rotate --wait`, the
//! CLI), then retires and destroys the old version; every kind of wrapped key
//! — connection DEKs, a pending OAuth state, a revocation waiting in the
//! outbox — moves to the new version and still opens afterwards. Also: a
//! replica without the new version makes the rotation refuse, a rotation
//! whose replica is killed is taken over by a live one, and bad HSM settings
//! are one-line configuration errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokenvault::google::sim::{Endpoint, Fault, GoogleSim};
use tokenvault::proto::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::serve_cli::{BIN, ServeProcess};
use crate::support::softhsm::SoftHsm;
use crate::support::{
    As, Authed, Bearer, CALENDAR_SCOPE, follow_authorization, fresh_postgres_database, query_param,
    start_google, test_config, use_google, write_config_file,
};

/// The keyring the replicas of a fleet share.
enum Provider {
    /// One keyring file, named by `keyring.path` in every replica's configuration.
    SharedFile,
    /// The same values in every replica's environment (until an operator changes them).
    Env { v1: String, v2: String, mac: String },
    /// One SoftHSM2 token.
    Pkcs11(SoftHsm),
}

impl Provider {
    fn env() -> Self {
        use tokenvault::crypto::{EnvKeyring, KekVersion};
        let first = EnvKeyring::generate_values(KekVersion::FIRST).unwrap();
        let second = EnvKeyring::generate_values(KekVersion::new(2).unwrap()).unwrap();
        Provider::Env {
            v1: first.keys.expose().to_owned(),
            v2: second.keys.expose().to_owned(),
            mac: first.mac_root_key.expose().to_owned(),
        }
    }
}

/// Which key versions an env replica is given.
#[derive(Clone, Copy)]
enum EnvKeys {
    V1,
    V1V2,
    V2,
}

/// A database, a Google simulator and the configuration replicas share.
struct Fleet {
    _drop: Option<crate::support::DropDatabase>,
    database_url: String,
    dir: tempfile::TempDir,
    sim: GoogleSim,
    config_path: String,
    provider: Provider,
}

/// Fast sync and heartbeats so that the fleet converges within a test.
const KEYRING_TUNING: &str =
    "sync_interval_ms = 200\nheartbeat_seconds = 1\nreplica_wait_ms = 3000\n";

impl Fleet {
    /// `None` when PostgreSQL is unavailable and not required.
    async fn new(provider: Provider, rotation: &str) -> Option<Self> {
        let database_url = fresh_postgres_database().await?;
        let dir = tempfile::tempdir().unwrap();
        let sim = start_google().await;
        let mut config = test_config(dir.path(), &database_url);
        use_google(&mut config, &sim);
        let keyring = match &provider {
            Provider::SharedFile => format!(
                "[keyring]\npath = {:?}\n{KEYRING_TUNING}{rotation}",
                dir.path().join("shared-keyring.json").display().to_string()
            ),
            Provider::Env { .. } => format!("[keyring]\n{KEYRING_TUNING}{rotation}"),
            Provider::Pkcs11(hsm) => hsm.keyring_toml(&format!("{KEYRING_TUNING}{rotation}")),
        };
        let extra = format!(
            "{keyring}\n[deletion]\ninline_revoke_timeout_ms = 300\noutbox_initial_backoff_ms = 200\n\
             outbox_max_backoff_seconds = 1\n[lease]\ncache_ttl_seconds = 30\n"
        );
        let path = write_config_file(dir.path(), &config, &extra);
        Some(Self {
            _drop: crate::support::DropDatabase::new(&database_url),
            database_url: database_url.clone(),
            config_path: path.display().to_string(),
            dir,
            sim,
            provider,
        })
    }

    /// Starts a replica; for the env provider, with the given key versions.
    fn start(&self, keys: EnvKeys) -> Replica {
        let mut env: Vec<(&str, String)> = Vec::new();
        match &self.provider {
            Provider::SharedFile => {}
            Provider::Env { v1, v2, mac } => {
                let keys = match keys {
                    EnvKeys::V1 => v1.clone(),
                    EnvKeys::V1V2 => format!("{v1},{v2}"),
                    EnvKeys::V2 => v2.clone(),
                };
                env.push(("TOKENVAULT_KEYRING__PROVIDER", "env".to_owned()));
                env.push(("TOKENVAULT_KEYRING__KEYS", keys));
                env.push(("TOKENVAULT_KEYRING__MAC_KEY", mac.clone()));
            }
            Provider::Pkcs11(hsm) => env.extend(hsm.env()),
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let process = ServeProcess::start(self.dir.path(), &["--config", &self.config_path], &env);
        let channel = Channel::from_shared(format!("http://{}", process.grpc_addr))
            .unwrap()
            .connect_lazy();
        Replica { process, channel }
    }
}

/// One `tokenvault serve` process and a channel to it.
struct Replica {
    process: ServeProcess,
    channel: Channel,
}

impl Replica {
    fn bearer(who: As) -> Bearer {
        Bearer(Some(format!("Bearer {}", who.key()).parse().unwrap()))
    }

    fn connections(&self) -> pb::connection_service_client::ConnectionServiceClient<Authed> {
        pb::connection_service_client::ConnectionServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(As::App),
        )
    }

    fn leases(&self) -> pb::lease_service_client::LeaseServiceClient<Authed> {
        pb::lease_service_client::LeaseServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(As::Worker),
        )
    }

    fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Authed> {
        pb::admin_service_client::AdminServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(As::Admin),
        )
    }

    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    async fn health(&self) -> Option<i32> {
        HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .ok()
            .map(|r| r.into_inner().status)
    }

    async fn lease(&self, connection_id: &str) -> Result<String, tonic::Status> {
        self.leases()
            .lease_token(pb::LeaseTokenRequest {
                connection_id: connection_id.to_owned(),
                purpose: "calendar_sync".into(),
                scopes: vec![CALENDAR_SCOPE.into()],
                min_valid_seconds: 0,
            })
            .await
            .map(|r| r.into_inner().access_token)
    }

    /// Begins an authorization here; returns the URL the browser goes to.
    async fn begin(&self, account: &str) -> String {
        self.connections()
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "fleet".into(),
                account_id: account.into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: Some(format!("{account}@sim.test")),
            })
            .await
            .expect("begin authorization")
            .into_inner()
            .authorization_url
    }

    /// Delivers Google's redirect to this replica's callback; returns the status.
    async fn callback(&self, query: &str) -> u16 {
        reqwest::get(format!(
            "http://{}/oauth/callback?{query}",
            self.process.http_addr
        ))
        .await
        .expect("reach the callback")
        .status()
        .as_u16()
    }

    /// Connects a calendar account end to end through this replica.
    async fn connect(&self, account: &str) -> String {
        let url = self.begin(account).await;
        let query = follow_authorization(&url).await;
        assert_eq!(self.callback(&query).await, 200, "callback for {account}");
        self.connections()
            .list_connections(pb::ListConnectionsRequest {
                tenant_id: "fleet".into(),
                account_id: Some(account.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .connections
            .into_iter()
            .next()
            .expect("a connection after the callback")
            .connection_id
    }

    async fn key_status(&self) -> pb::KeyStatusResponse {
        self.admin()
            .key_status(pb::KeyStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    fn stop(mut self) {
        self.process.signal("TERM");
        assert!(
            self.process.wait(Duration::from_secs(30)).success(),
            "replica exits cleanly"
        );
    }
}

/// `tokenvault admin --server <replica> … --output json` as the admin.
async fn admin_cli(replica: &Replica, args: &[&str]) -> (i32, Value, String) {
    let out = tokio::process::Command::new(BIN)
        .env("TOKENVAULT_CLI_API_KEY", As::Admin.key())
        .env_remove("TOKENVAULT_CLI_SERVER")
        .env("HOME", "/nonexistent")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .arg("admin")
        .arg("--server")
        .arg(format!("http://{}", replica.process.grpc_addr))
        .args(["--output", "json"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run tokenvault admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// Leases on some replicas and watches every replica's health until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    leases: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        leasing: Vec<Arc<Replica>>,
        watched: Vec<Arc<Replica>>,
        ids: Arc<Vec<String>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let leases = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (n, replica) in leasing.into_iter().enumerate() {
            for worker in 0..2 {
                let (stop, leases, failures, ids, replica) = (
                    stop.clone(),
                    leases.clone(),
                    failures.clone(),
                    ids.clone(),
                    replica.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut i = n * 7 + worker * 3;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 1) % ids.len();
                        match replica.lease(&ids[i]).await {
                            Ok(_) => {
                                leases.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("lease on pid {}: {e:?}", replica.pid())),
                        }
                    }
                }));
            }
        }
        for replica in watched {
            let (stop, failures) = (stop.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let status = replica.health().await;
                    if status != Some(ServingStatus::Serving as i32) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("health of pid {}: {status:?}", replica.pid()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        Self {
            stop,
            leases,
            failures,
            tasks,
        }
    }

    /// Stops; returns the leases granted, failing on any lease or health failure.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        assert!(
            failures.is_empty(),
            "{} failures: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        self.leases.load(Ordering::Relaxed)
    }
}

/// A time limit for something awaited in a polling loop.
struct Deadline {
    what: &'static str,
    at: Instant,
}

impl Deadline {
    fn new(what: &'static str, limit: Duration) -> Self {
        Self {
            what,
            at: Instant::now() + limit,
        }
    }

    /// Fails once the limit has passed; otherwise waits a little.
    async fn tick(&self) {
        assert!(Instant::now() < self.at, "not in time: {}", self.what);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CONNECTIONS: usize = 12;

async fn a_rotation_completes_on_every_replica(provider: Provider) {
    let Some(fleet) = Fleet::new(provider, "").await else {
        return;
    };
    let is_env = matches!(fleet.provider, Provider::Env { .. });
    // Env replicas are given v2 ahead of the rotation (a rolling restart the
    // operator did); the others create it when A rotates.
    let keys = if is_env { EnvKeys::V1V2 } else { EnvKeys::V1 };
    // A starts first: on a fresh database it creates the keyring (the file, or
    // the HSM's objects); B and C find it.
    let a = Arc::new(fleet.start(keys));
    let b = Arc::new(fleet.start(keys));
    let c = Arc::new(fleet.start(keys));

    let mut ids = Vec::new();
    for i in 0..CONNECTIONS {
        let via = [&a, &b, &c][i % 3];
        ids.push(via.connect(&format!("user{i}")).await);
    }
    let ids = Arc::new(ids);
    let mut tokens = BTreeMap::new();
    for id in ids.iter() {
        tokens.insert(id.clone(), a.lease(id).await.expect("first lease"));
    }
    // An OAuth state left pending, and a revocation Google keeps refusing.
    let pending_url = b.begin("pending").await;
    let doomed = c.connect("doomed").await;
    fleet.sim.inject(Endpoint::Revoke, Fault::Status(503), None);
    let receipt = c
        .connections()
        .disconnect(pb::DisconnectRequest {
            connection_id: doomed,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let before = a.key_status().await;
    let v1 = before.versions.iter().find(|v| v.version == 1).unwrap();
    assert!(v1.oauth_state_keys >= 1 && v1.outbox_keys == 1, "{v1:?}");
    let wrapped_before = v1.dek_count;

    // B and C lease and every replica's health is watched while A rotates.
    let load = Load::start(
        vec![b.clone(), c.clone()],
        vec![a.clone(), b.clone(), c.clone()],
        ids.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, run, stderr) = admin_cli(&a, &["keys", "rotate", "--wait"]).await;
    assert_eq!(code, 0, "rotate failed: {stderr}");
    assert_eq!(run["state"], "completed", "{run}");
    assert_eq!(run["target_version"], 2);
    let total = run["total"].as_u64().unwrap();
    assert_eq!(run["done"].as_u64(), Some(total), "N/N: {run}");
    assert!(total >= wrapped_before, "{run}");
    // Retire at once: nothing of any kind is left on v1.
    let (code, retired, stderr) = admin_cli(&a, &["keys", "retire", "1"]).await;
    assert_eq!(code, 0, "retire failed: {stderr}");
    assert_eq!(retired["state"], "retired");
    if !is_env {
        let (code, destroyed, stderr) = admin_cli(&a, &["keys", "destroy", "1", "--yes"]).await;
        assert_eq!(code, 0, "destroy failed: {stderr}");
        assert_eq!(destroyed["state"], "destroyed");
        // The others see the destruction and keep leasing from their caches and the database.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let leased = load.finish().await;
    assert!(leased > 0, "leases flowed during the rotation");
    eprintln!(
        "{leased} leases on B and C during the rotation, no errors, health SERVING throughout"
    );

    let (a, b, c) = if is_env {
        // The vault cannot erase environment variables: destroy is refused,
        // naming the replicas, until none holds v1.
        let (code, _, stderr) = admin_cli(&a, &["keys", "destroy", "1", "--yes"]).await;
        assert_ne!(code, 0);
        assert!(
            stderr.contains("still held by 3 live replica(s)"),
            "{stderr}"
        );
        for r in [&a, &b, &c] {
            assert!(stderr.contains(&format!("pid {}", r.pid())), "{stderr}");
        }
        // A rolling restart without v1, then the destruction is recorded.
        let mut restarted = Vec::new();
        for r in [a, b, c] {
            Arc::try_unwrap(r).ok().unwrap().stop();
            restarted.push(Arc::new(fleet.start(EnvKeys::V2)));
        }
        let (code, destroyed, stderr) =
            admin_cli(&restarted[0], &["keys", "destroy", "1", "--yes"]).await;
        assert_eq!(code, 0, "destroy failed: {stderr}");
        assert_eq!(destroyed["state"], "destroyed");
        let c = restarted.pop().unwrap();
        let b = restarted.pop().unwrap();
        let a = restarted.pop().unwrap();
        (a, b, c)
    } else {
        (a, b, c)
    };

    // The outbox key and the OAuth state key were rewrapped: both still open.
    fleet.sim.clear_faults();
    let deadline = Deadline::new(
        "the outbox revocation is confirmed",
        Duration::from_secs(20),
    );
    loop {
        let r = b
            .connections()
            .get_deletion_receipt(pb::GetDeletionReceiptRequest {
                receipt_id: receipt.receipt_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .receipt
            .unwrap();
        if r.upstream_revocations[0].state == pb::UpstreamRevocationState::Confirmed as i32 {
            break;
        }
        deadline.tick().await;
    }
    let query = follow_authorization(&pending_url).await;
    assert!(query_param(&query, "code").is_some(), "{query}");
    assert_eq!(
        c.callback(&query).await,
        200,
        "the pending authorization completes"
    );

    // Every connection still leases its own token, on every replica.
    for r in [&a, &b, &c] {
        for (id, token) in &tokens {
            assert_eq!(&r.lease(id).await.expect("lease after rotation"), token);
        }
    }
    let (code, report, stderr) = admin_cli(&c, &["keys", "report"]).await;
    assert_eq!(code, 0, "{stderr}");
    let versions = report["versions"].as_array().unwrap();
    assert_eq!(versions[0]["state"], "destroyed", "{report}");
    assert_eq!(versions[0]["destroyed_by"], As::Admin.identity());
    assert_eq!(versions[0]["retired_by"], As::Admin.identity());
    assert_eq!(versions[1]["state"], "primary");
    assert_eq!(versions[1]["promoted_by"], As::Admin.identity());
    assert_eq!(versions[0]["dek_count"], 0);
    let live: Vec<&Value> = report["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["live"] == true)
        .collect();
    assert_eq!(live.len(), 3, "{report}");
    let deadline = Deadline::new(
        "every replica reports holding only v2",
        Duration::from_secs(5),
    );
    loop {
        let (_, report, _) = admin_cli(&c, &["keys", "report"]).await;
        let versions = &report["versions"];
        if versions[1]["held_by"]
            .as_array()
            .is_some_and(|h| h.len() == 3)
            && versions[0]["held_by"]
                .as_array()
                .is_some_and(|h| h.is_empty())
        {
            break;
        }
        deadline.tick().await;
    }
    if let Provider::SharedFile = fleet.provider {
        let file: Value = serde_json::from_slice(
            &std::fs::read(fleet.dir.path().join("shared-keyring.json")).unwrap(),
        )
        .unwrap();
        let held: Vec<u64> = file["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["version"].as_u64().unwrap())
            .collect();
        assert_eq!(held, [2], "v1's material is erased from the shared file");
    }
    let verified = a
        .admin()
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    for r in [a, b, c] {
        Arc::try_unwrap(r).ok().unwrap().stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_rotate_retire_and_destroy_on_one_shared_keyring_file() {
    a_rotation_completes_on_every_replica(Provider::SharedFile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_rotate_retire_and_destroy_on_env_keyrings() {
    a_rotation_completes_on_every_replica(Provider::env()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_rotate_retire_and_destroy_on_one_softhsm2_token() {
    let Some(hsm) = SoftHsm::new("tv-fleet") else {
        return;
    };
    a_rotation_completes_on_every_replica(Provider::Pkcs11(hsm)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_new_version_makes_the_rotation_refuse() {
    let Some(fleet) = Fleet::new(Provider::env(), "").await else {
        return;
    };
    let a = fleet.start(EnvKeys::V1V2);
    let b = fleet.start(EnvKeys::V1V2);
    // C was started from an old environment.
    let c = fleet.start(EnvKeys::V1);
    let id = a.connect("alice").await;
    let token = c.lease(&id).await.unwrap();

    let err = a
        .admin()
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(msg.contains("refusing to make v2 primary"), "{msg}");
    assert!(msg.contains(&format!("pid {}", c.pid())), "{msg}");
    assert!(!msg.contains(&format!("pid {}", a.pid())), "{msg}");
    assert!(!msg.contains(&format!("pid {}", b.pid())), "{msg}");
    assert!(
        msg.contains("holds v1,") || msg.contains("holds v1;") || msg.contains("holds v1 "),
        "{msg}"
    );
    // Nothing changed and nothing broke.
    let status = a.key_status().await;
    assert_eq!(status.primary_version, 1);
    assert!(status.rotation.is_none(), "{status:?}");
    for r in [&a, &b, &c] {
        assert_eq!(r.health().await, Some(ServingStatus::Serving as i32));
        assert_eq!(r.lease(&id).await.unwrap(), token);
    }
    let refused = a
        .admin()
        .query_audit(pb::QueryAuditRequest {
            action: Some("keys.rotate.start".into()),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        refused
            .iter()
            .any(|e| e.outcome == pb::AuditOutcome::Failure as i32 && e.detail.contains("v2")),
        "{refused:?}"
    );

    // C restarted with the new environment: the same rotation now goes through.
    c.stop();
    let c = fleet.start(EnvKeys::V1V2);
    let (code, run, stderr) = admin_cli(&a, &["keys", "rotate", "--wait"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(run["state"], "completed");
    assert_eq!(c.lease(&id).await.unwrap(), token);
    for r in [a, b, c] {
        r.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_whose_replica_is_killed_is_taken_over_by_a_live_one() {
    let Some(fleet) = Fleet::new(
        Provider::SharedFile,
        "rotation_batch_size = 10\nrotation_batch_pause_ms = 100\n",
    )
    .await
    else {
        return;
    };
    let mut a = fleet.start(EnvKeys::V1);
    let b = fleet.start(EnvKeys::V1);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(b.connect(&format!("user{i}")).await);
    }
    let run = a
        .admin()
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    let deadline = Deadline::new(
        "the rotation has started rewrapping",
        Duration::from_secs(20),
    );
    while b.key_status().await.rotation.is_none_or(|r| r.done < 10) {
        deadline.tick().await;
    }
    let owner = b.key_status().await.rotation.unwrap().owner;
    a.process.signal("KILL");
    a.process.wait(Duration::from_secs(10));

    // Within three heartbeats B sees that A is gone and finishes the run.
    let deadline = Deadline::new("B completes the rotation", Duration::from_secs(30));
    while b
        .key_status()
        .await
        .rotation
        .is_none_or(|r| r.state != pb::RotationState::Completed as i32)
    {
        deadline.tick().await;
    }
    let status = b.key_status().await;
    let finished = status.rotation.clone().unwrap();
    assert_eq!(finished.run_id, run.run_id, "the same run");
    assert_ne!(finished.owner, owner, "another replica finished it");
    assert_eq!(finished.owner, status.replica_id);
    assert_eq!(finished.done, finished.total);
    assert_eq!(status.versions[0].dek_count, 0, "{status:?}");
    assert!(b.process.log_text().contains("resuming key rotation"));
    for id in &ids {
        b.lease(id).await.expect("lease after the takeover");
    }
    b.stop();
}

/// `tokenvault serve` with this configuration in `dir`; returns the exit code and stderr.
/// The owner of a rotation stops (SIGSTOP: alive, its database sessions and
/// any row locks still open, but no heartbeat), another replica takes the run
/// over, then the first resumes (SIGCONT), possibly in the middle of a batch
/// whose rows it holds locked. The owner check in each batch's transaction
/// and the compare-and-swap on every wrapped key mean each key is rewrapped
/// and counted exactly once, whoever did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rotation_owner_that_resumes_after_a_takeover_does_no_row_twice() {
    let Some(fleet) = Fleet::new(
        Provider::SharedFile,
        "rotation_batch_size = 10\nrotation_batch_pause_ms = 100\n",
    )
    .await
    else {
        return;
    };
    let a = fleet.start(EnvKeys::V1);
    let b = fleet.start(EnvKeys::V1);
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(b.connect(&format!("user{i}")).await);
    }
    let run = a
        .admin()
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    let deadline = Deadline::new(
        "the rotation has started rewrapping",
        Duration::from_secs(20),
    );
    while b.key_status().await.rotation.is_none_or(|r| r.done < 10) {
        deadline.tick().await;
    }
    let first_owner = b.key_status().await.rotation.unwrap().owner;
    a.process.signal("STOP");
    let deadline = Deadline::new("B takes the run over", Duration::from_secs(30));
    while b
        .key_status()
        .await
        .rotation
        .is_none_or(|r| r.owner == first_owner && r.state == pb::RotationState::Running as i32)
    {
        deadline.tick().await;
    }
    a.process.signal("CONT");
    let deadline = Deadline::new("the rotation completes", Duration::from_secs(30));
    while b
        .key_status()
        .await
        .rotation
        .is_none_or(|r| r.state != pb::RotationState::Completed as i32)
    {
        deadline.tick().await;
    }
    let finished = b.key_status().await.rotation.unwrap();
    assert_eq!(finished.run_id, run.run_id);
    assert_ne!(finished.owner, first_owner, "{finished:?}");
    // Counted once each: the stored count is the sum of every committed
    // batch, not clamped as the status is.
    let db = sqlx::PgPool::connect(&fleet.database_url).await.unwrap();
    let (rewrapped, total): (i64, i64) =
        sqlx::query_as("SELECT rewrapped, total FROM rotation_runs WHERE run_id = $1")
            .bind(&run.run_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        rewrapped, total,
        "every key rewrapped and counted exactly once"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM connection_deks WHERE kek_version = 1")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(left, 0);
    db.close().await;
    for id in &ids {
        a.lease(id).await.expect("lease on the resumed replica");
        b.lease(id)
            .await
            .expect("lease on the replica that finished");
    }
    a.stop();
    b.stop();
}

fn serve_fails(dir: &std::path::Path, toml: &str, env: &[(&str, String)]) -> (i32, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    crate::serve_cli::serve_exit(dir, Some(toml), &env)
}

#[test]
fn bad_keyring_settings_are_one_line_configuration_errors() {
    let Some(hsm) = SoftHsm::new("tv-settings") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = format!(
        "data_dir = {:?}\n",
        dir.path().join("data").display().to_string()
    );
    let good_env = hsm.env();
    let wrong_pin: Vec<(&str, String)> = vec![
        ("SOFTHSM2_CONF", hsm.conf.display().to_string()),
        ("TOKENVAULT_KEYRING__PKCS11__PIN", "00000000".to_owned()),
    ];
    let module = hsm.module.display().to_string();
    // (configuration, environment, the setting named, what is said about it)
    type Case<'a> = (String, Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            format!("{data}[keyring]\nprovider = \"hsm\"\n"),
            vec![],
            "keyring.provider",
            "unknown variant",
        ),
        (
            format!("{data}{}", hsm.keyring_toml("")),
            wrong_pin,
            "keyring.pkcs11.pin",
            "refused the PIN",
        ),
        (
            format!(
                "{data}[keyring]\nprovider = \"pkcs11\"\n[keyring.pkcs11]\nmodule = \"/nonexistent/libpkcs11.so\"\ntoken_label = \"x\"\n"
            ),
            good_env.clone(),
            "keyring.pkcs11.module",
            "is not a file",
        ),
        (
            format!(
                "{data}[keyring]\nprovider = \"pkcs11\"\n[keyring.pkcs11]\nmodule = {:?}\n",
                dir.path().join("data").display().to_string()
            ),
            good_env.clone(),
            "keyring.pkcs11.token_label",
            "required",
        ),
        (
            format!(
                "{data}[keyring]\nprovider = \"pkcs11\"\n[keyring.pkcs11]\nmodule = {module:?}\ntoken_label = \"no-such-token\"\n"
            ),
            good_env.clone(),
            "keyring.pkcs11.token_label",
            "no initialised token labelled \"no-such-token\"",
        ),
        (
            format!("{data}{}", hsm.keyring_toml("")),
            vec![("SOFTHSM2_CONF", hsm.conf.display().to_string())],
            "keyring.pkcs11.pin",
            "required",
        ),
    ];
    for (toml, env, setting, problem) in cases {
        let (code, stderr) = serve_fails(dir.path(), &toml, &env);
        assert_ne!(code, 0, "{setting}: expected failure, stderr: {stderr}");
        assert_ne!(code, 101, "{setting}: panicked: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{setting}: expected one line, got {stderr:?}"
        );
        assert!(
            lines[0].starts_with(&format!("tokenvault: configuration error: {setting}: ")),
            "{setting}: {stderr:?}"
        );
        assert!(lines[0].contains(problem), "{setting}: {stderr:?}");
        assert!(!lines[0].contains(crate::support::softhsm::PIN), "{stderr}");
        assert!(!lines[0].contains("00000000"), "{stderr}");
    }

    // A label prefix under which the token holds nothing, once the database
    // uses keys: refused, not silently replaced by new keys.
    let config = format!("{data}{}", hsm.keyring_toml(""));
    let mut first = ServeProcess::start(
        dir.path(),
        &["--config", &{
            let p = dir.path().join("good.toml");
            std::fs::write(&p, &config).unwrap();
            p.display().to_string()
        }],
        &good_env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(30)).success());
    let moved = config.replace(
        "[keyring.pkcs11]\n",
        "[keyring.pkcs11]\nlabel_prefix = \"elsewhere\"\n",
    );
    let (code, stderr) = serve_fails(dir.path(), &moved, &good_env);
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("keyring.pkcs11.token_label") && stderr.contains("elsewhere/"),
        "{stderr}"
    );
}

#[test]
fn keys_init_env_prints_values_an_env_keyring_accepts() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["keys", "init", "--env"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run(&[]);
    let value = |name: &str| {
        first
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {first}"))
            .to_owned()
    };
    assert_eq!(value("TOKENVAULT_KEYRING__PROVIDER"), "env");
    let (v1, mac) = (
        value("TOKENVAULT_KEYRING__KEYS"),
        value("TOKENVAULT_KEYRING__MAC_KEY"),
    );
    assert!(v1.starts_with("1:"), "{v1}");
    let second = run(&["--version", "2"]);
    let v2 = second
        .lines()
        .find(|l| !l.starts_with('#'))
        .expect("the new entry")
        .to_owned();
    assert!(v2.starts_with("2:"), "{second}");
    assert!(
        !second.contains("MAC_KEY"),
        "a new version keeps the MAC key: {second}"
    );
    let keyring = tokenvault::crypto::EnvKeyring::from_values(&format!("{v1},{v2}"), &mac).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let held: Vec<u32> = rt
        .block_on(tokenvault::crypto::KeyringProvider::versions(&keyring))
        .unwrap()
        .iter()
        .map(|m| m.version.get())
        .collect();
    assert_eq!(held, [1, 2]);
    // Version 0 is refused as usage.
    let out = std::process::Command::new(BIN)
        .args(["keys", "init", "--env", "--version", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_an_empty_token_share_one_set_of_keys() {
    let Some(hsm) = SoftHsm::new("tv-together") else {
        return;
    };
    let Some(fleet) = Fleet::new(Provider::Pkcs11(hsm), "").await else {
        return;
    };
    let fleet = Arc::new(fleet);
    // Three first starts at once, each finding an empty token and an empty database.
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let fleet = fleet.clone();
            tokio::task::spawn_blocking(move || fleet.start(EnvKeys::V1))
        })
        .collect();
    let mut replicas: Vec<Replica> = Vec::new();
    for start in starts {
        replicas.push(start.await.unwrap());
    }
    let id = replicas[0].connect("alice").await;
    let token = replicas[1].lease(&id).await.unwrap();
    for r in &replicas {
        assert_eq!(r.lease(&id).await.unwrap(), token, "one set of keys");
        assert_eq!(r.health().await, Some(ServingStatus::Serving as i32));
    }
    let (code, report, stderr) = admin_cli(&replicas[2], &["keys", "report"]).await;
    assert_eq!(code, 0, "{stderr}");
    let versions = report["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{report}");
    let verified = replicas[0]
        .admin()
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "one MAC root for every replica: {verified:?}");
    for r in replicas {
        r.stop();
    }
}
