//! Online key rotation: 10,000 connections rewrapped while reads continue,
//! retire and destroy refused while a version is in use, and a rotation that
//! survives SIGKILL of the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokenvault::crypto::{KekVersion, SecretString};
use tokenvault::domain::{
    AccountId, ConnectionId, ConnectionStatus, Integration, ScopeSet, TenantId, Timestamp,
};
use tokenvault::proto::v1 as pb;
use tokenvault::vault::{NewConnection, Vault};
use tonic::Code;

use crate::both_backends;
use crate::serve_cli::ServeProcess;
use crate::support::{As, Backend, Bearer, spawn_vault_with, test_config};

const CONNECTIONS: usize = 10_000;

/// Rotation pacing for the load test: 20 batches of 500 with 200 ms between
/// them, so the run lasts at least 3.8 s and is certainly still running when
/// the test asks again right after starting it.
const BATCH_SIZE: u32 = 500;
const BATCH_PAUSE_MS: u64 = 200;

/// The token each seeded connection holds.
fn token_of(i: usize) -> String {
    format!("ya29.rotation-{i}")
}

/// Imports `n` connections through the vault's bulk path, 1,000 per transaction.
async fn import(vault: &Vault, n: usize) -> Vec<ConnectionId> {
    let scopes = ScopeSet::parse_spaced("https://www.googleapis.com/auth/calendar.events").unwrap();
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&i| NewConnection {
                tenant: TenantId::parse("load").unwrap(),
                account: AccountId::parse(&format!("user{i}")).unwrap(),
                integration: Integration::Calendar,
                google_subject: format!("sub{i}"),
                google_email: format!("user{i}@example.test"),
                granted_scopes: scopes.clone(),
                status: ConnectionStatus::Active,
                access_token: SecretString::new(token_of(i)),
                access_expires_at: Timestamp::now().plus(Duration::from_secs(3600)),
                refresh_token: None,
            })
            .collect();
        ids.extend(
            vault
                .connection_import(batch)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.id),
        );
    }
    ids
}

async fn wait_for_completion(
    admin: &mut pb::admin_service_client::AdminServiceClient<crate::support::Authed>,
    limit: Duration,
) -> pb::KeyStatusResponse {
    let deadline = Instant::now() + limit;
    loop {
        let status = admin
            .key_status(pb::KeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let rotation = status.rotation.clone().expect("a rotation");
        if rotation.state == pb::RotationState::Completed as i32 {
            return status;
        }
        assert_ne!(
            rotation.state,
            pb::RotationState::Failed as i32,
            "{}",
            rotation.last_error
        );
        assert!(
            Instant::now() < deadline,
            "rotation did not finish: {rotation:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rotation_rewraps_every_dek_while_reads_continue(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, |c| {
        c.keyring.rotation_batch_size = BATCH_SIZE;
        c.keyring.rotation_batch_pause_ms = BATCH_PAUSE_MS;
    })
    .await
    else {
        return;
    };
    let ids = Arc::new(import(&tv.vault, CONNECTIONS).await);
    let mut admin = tv.admin(As::Admin);

    // Readers keep opening tokens through the vault's read path.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (vault, ids, stop, reads, failures) = (
                tv.vault.clone(),
                ids.clone(),
                stop.clone(),
                reads.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut i = r * 997;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 7919) % ids.len();
                    match vault.access_token_open(&ids[i]).await {
                        Ok(t) if t.access_token.expose() == token_of(i) => {}
                        other => {
                            eprintln!("read {i} failed: {:?}", other.map(|t| t.expires_at));
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(100)).await;
    let run = admin
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    assert_eq!(run.target_version, 2);
    assert_eq!(run.total, CONNECTIONS as u64);
    // Asking again while it runs (the pacing guarantees it still does)
    // reports the same run instead of starting another.
    let again = admin
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    assert_eq!(
        again.state,
        pb::RotationState::Running as i32,
        "a paced rotation of {CONNECTIONS} keys cannot have finished yet: {again:?}"
    );
    assert_eq!(again.run_id, run.run_id, "a second rotation was started");
    assert_eq!(again.target_version, 2);
    let reads_before = reads.load(Ordering::Relaxed);
    let status = wait_for_completion(&mut admin, Duration::from_secs(300)).await;
    let reads_during = reads.load(Ordering::Relaxed) - reads_before;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "reads failed during rotation"
    );
    assert!(reads_during > 0, "reads continued during the rotation");
    eprintln!("{backend:?}: {reads_during} reads during rotation, zero failures");

    assert_eq!(status.primary_version, 2);
    let count = |v: u32| {
        status
            .versions
            .iter()
            .find(|k| k.version == v)
            .unwrap()
            .dek_count
    };
    assert_eq!(count(1), 0);
    assert_eq!(count(2), CONNECTIONS as u64);
    let rotation = status.rotation.unwrap();
    assert_eq!(rotation.rewrapped, CONNECTIONS as u64);
    assert_eq!(status.oldest_version_in_use, 2);
    assert!(!status.rotation_overdue);

    // The primary cannot be retired; v1, now unused, can — then destroyed.
    let err = admin
        .retire_key(pb::RetireKeyRequest { version: 2 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = admin
        .destroy_key(pb::DestroyKeyRequest { version: 1 })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "destroy requires retirement first"
    );
    let v1 = admin
        .retire_key(pb::RetireKeyRequest { version: 1 })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v1.state, pb::KeyState::Retired as i32);
    let v1 = admin
        .destroy_key(pb::DestroyKeyRequest { version: 1 })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v1.state, pb::KeyState::Destroyed as i32);
    let keyring: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tv.keyring_path()).unwrap()).unwrap();
    let versions: Vec<u64> = keyring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2], "v1's material is gone from the keyring");
    for i in (0..CONNECTIONS).step_by(499) {
        assert_eq!(
            tv.vault
                .access_token_open(&ids[i])
                .await
                .unwrap()
                .access_token
                .expose(),
            token_of(i)
        );
    }

    let actions: Vec<String> = admin
        .query_audit(pb::QueryAuditRequest {
            action: Some("keys.".into()),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| format!("{}:{}", e.action, e.outcome))
        .collect();
    for want in [
        "keys.rotate.start:1",
        "keys.rotate.complete:1",
        "keys.retire:1",
        "keys.destroy:1",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} not audited: {actions:?}"
        );
    }
    let report = admin
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
}
both_backends!(
    rotation_under_load,
    rotation_rewraps_every_dek_while_reads_continue
);

/// A configuration file for a `tokenvault serve` child process whose
/// rotation is slowed down enough to be killed midway.
fn write_config(
    dir: &std::path::Path,
    database_url: &str,
    sim: &tokenvault::google::sim::GoogleSim,
) -> std::path::PathBuf {
    let mut config = test_config(dir, database_url);
    crate::support::use_google(&mut config, sim);
    crate::support::write_config_file(
        dir,
        &config,
        "[keyring]\nrotation_batch_size = 100\nrotation_batch_pause_ms = 25\n\
         [deletion]\ninline_revoke_timeout_ms = 300\n",
    )
}

const PENDING_STATES: usize = 50;
const OUTBOX_ROWS: usize = 5;

async fn admin_client(
    addr: &str,
) -> pb::admin_service_client::AdminServiceClient<crate::support::Authed> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(Some(format!("Bearer {}", As::Admin.key()).parse().unwrap()));
    pb::admin_service_client::AdminServiceClient::with_interceptor(channel, bearer)
}

async fn a_rotation_killed_midway_resumes_after_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(database_url) = crate::support::fresh_database(backend, dir.path()).await else {
        return;
    };
    let _drop = crate::support::DropDatabase::new(&database_url);
    let sim = crate::support::start_google().await;
    let config_path = write_config(dir.path(), &database_url, &sim);
    let config = tokenvault::config::Config::load_from(Some(&config_path), Vec::new()).unwrap();
    tokenvault::crypto::LocalKeyring::init(config.keyring_path()).unwrap();
    let seeded = Vault::open(&config).await.unwrap();
    let ids = import(&seeded, CONNECTIONS).await;
    // Every kind of wrapped key: connection DEKs, pending OAuth states, and
    // revocations Google refuses, waiting in the outbox.
    let actor = tokenvault::audit::Actor::system();
    for i in 0..PENDING_STATES {
        seeded
            .authorization_begin(
                &actor,
                TenantId::parse("load").unwrap(),
                AccountId::parse(&format!("pending{i}")).unwrap(),
                Integration::Calendar,
                None,
            )
            .await
            .unwrap();
    }
    sim.inject(
        tokenvault::google::sim::Endpoint::Revoke,
        tokenvault::google::sim::Fault::Status(503),
        None,
    );
    for id in &ids[..OUTBOX_ROWS] {
        seeded
            .delete(
                &actor,
                tokenvault::store::DeletionTarget::Connection(id.clone()),
                tokenvault::domain::DeletionReason::UserDisconnected,
                "",
            )
            .await
            .unwrap();
    }
    let live = CONNECTIONS - OUTBOX_ROWS;
    let all_keys = (live + PENDING_STATES + OUTBOX_ROWS) as u64;
    seeded.shutdown().await;

    let config_arg = config_path.display().to_string();
    let mut first = ServeProcess::start(dir.path(), &["--config", &config_arg], &[]);
    let mut admin = admin_client(&first.grpc_addr).await;
    let run = admin
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .rotation
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let progress = admin
            .key_status(pb::KeyStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .rotation
            .unwrap();
        assert_eq!(
            progress.state,
            pb::RotationState::Running as i32,
            "finished before the kill; slow it down"
        );
        if progress.rewrapped >= 1000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation rewrapped only {} of {} keys in 60 s; it never got far enough to be \
             killed midway",
            progress.rewrapped,
            progress.total
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(admin);
    first.signal("KILL");
    first.wait(Duration::from_secs(10));

    let mut second = ServeProcess::start(dir.path(), &["--config", &config_arg], &[]);
    let mut admin = admin_client(&second.grpc_addr).await;
    let status = wait_for_completion(&mut admin, Duration::from_secs(120)).await;
    let rotation = status.rotation.unwrap();
    assert_eq!(rotation.run_id, run.run_id, "the same run resumed");
    assert_eq!(run.total, all_keys, "every kind of key is counted");
    assert_eq!(rotation.rewrapped, all_keys, "every key counted once");
    assert_eq!(rotation.done, all_keys);
    let on = |v: u32| {
        let k = status.versions.iter().find(|k| k.version == v).unwrap();
        (k.connection_keys, k.oauth_state_keys, k.outbox_keys)
    };
    assert_eq!(on(1), (0, 0, 0));
    assert_eq!(
        on(2),
        (live as u64, PENDING_STATES as u64, OUTBOX_ROWS as u64)
    );
    assert!(second.log_text().contains("resuming key rotation"));
    drop(admin);
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(30)).success());

    let check = Vault::open(&config).await.unwrap();
    // v1 retires at once: nothing of any kind is left on it.
    check
        .keys()
        .retire(KekVersion::FIRST, &actor)
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate().skip(OUTBOX_ROWS) {
        let opened = check
            .access_token_open(id)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(opened.access_token.expose(), token_of(i));
    }
    check.shutdown().await;
}
both_backends!(
    rotation_survives_sigkill,
    a_rotation_killed_midway_resumes_after_restart
);
