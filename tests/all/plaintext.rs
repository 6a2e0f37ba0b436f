//! No secret the vault ever sees is at rest or in a log in plaintext: every
//! authorization code, PKCE verifier, access and refresh token Google issued
//! (first ones and refreshed ones), the OAuth client secret, every API key
//! and every root key. The vault connects accounts end to end through the
//! simulator, leases, refreshes, rotates its key-encryption key and deletes a
//! connection whose revocation waits in the outbox (a sealed copy of its
//! token), in process and in a `tokenvault serve` child logging at debug
//! level. Then everything is scanned in four encodings (raw, hex, base64,
//! base64url): the SQLite database with its WAL and shared-memory files, or
//! on PostgreSQL every row of every table and the write-ahead log segments
//! written during the test; the in-process log and the child's log.

use std::time::{Duration, SystemTime};

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use tokenvault::google::sim::{Endpoint, Fault};
use tokenvault::proto::v1 as pb;

use crate::both_backends;
use crate::serve_cli::ServeProcess;
use crate::support::raw::{RawDb, expire_stored_token};
use crate::support::{
    As, Backend, Bearer, CLIENT_SECRET, TestVault, calendar_lease, logs, spawn_vault_with_google,
    write_config_file,
};

/// Every encoding a secret could leak in.
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        b64.encode(secret).trim_end_matches('=').as_bytes().to_vec(),
        b64url.encode(secret).into_bytes(),
    ]
}

/// The key material in the local keyring file.
fn keyring_secrets(tv: &TestVault) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(tv.keyring_path()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut keys: Vec<Vec<u8>> = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| b64.decode(k["key"].as_str().unwrap()).unwrap())
        .collect();
    keys.push(b64.decode(json["mac_root_key"].as_str().unwrap()).unwrap());
    assert!(
        keys.len() >= 3,
        "two KEK versions and the MAC root: {}",
        keys.len()
    );
    keys
}

/// The PostgreSQL write-ahead log segments modified since `since`, read
/// through the server (`pg_ls_waldir`, `pg_read_binary_file`: superuser),
/// one 16 MB segment at a time.
async fn postgres_wal(raw: &RawDb, since: SystemTime, mut scan: impl FnMut(&str, &[u8])) {
    let RawDb::Postgres(pool) = raw else {
        panic!("postgres_wal on SQLite")
    };
    sqlx::query("CHECKPOINT").execute(pool).await.unwrap();
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 2.0;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name::text FROM pg_ls_waldir() \
         WHERE extract(epoch FROM modification) >= $1 ORDER BY name",
    )
    .bind(since)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!names.is_empty(), "no WAL segment written during the test");
    for name in names {
        let bytes: Vec<u8> = sqlx::query_scalar("SELECT pg_read_binary_file('pg_wal/' || $1)")
            .bind(&name)
            .fetch_one(pool)
            .await
            .unwrap();
        scan(&format!("WAL segment {name}"), &bytes);
    }
}

async fn no_secret_the_vault_sees_is_at_rest_or_logged(backend: Backend) {
    let started = SystemTime::now();
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.deletion.inline_revoke_timeout_ms = 300;
        c.deletion.outbox_initial_backoff_ms = 60_000;
    })
    .await
    else {
        return;
    };
    let raw = RawDb::open(&tv).await;
    let mut leased = Vec::new();
    let mut ids = Vec::new();
    for account in ["u1", "u2", "u3"] {
        sim.add_user(&format!("{account}@sim.test"), &format!("sub-{account}"));
        let begun = tv
            .connections(As::App)
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "scan".into(),
                account_id: account.into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: Some(format!("{account}@sim.test")),
            })
            .await
            .unwrap()
            .into_inner();
        let query = crate::support::follow_authorization(&begun.authorization_url).await;
        let (status, body) = crate::support::deliver_callback(&tv, &query).await;
        assert_eq!(status, 200, "{body}");
        let id = tv
            .connections(As::App)
            .list_connections(pb::ListConnectionsRequest {
                tenant_id: "scan".into(),
                account_id: Some(account.into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .connections[0]
            .connection_id
            .clone();
        ids.push(id);
    }
    // Leases, then leases that refresh.
    let mut leases = tv.leases(As::Worker);
    for id in &ids {
        leased.push(
            leases
                .lease_token(calendar_lease(id))
                .await
                .unwrap()
                .into_inner()
                .access_token,
        );
        expire_stored_token(&tv, id).await;
        leased.push(
            leases
                .lease_token(calendar_lease(id))
                .await
                .unwrap()
                .into_inner()
                .access_token,
        );
    }
    // A rotation rewraps every DEK.
    tv.vault
        .keys()
        .rotate(&tokenvault::audit::Actor::system())
        .await
        .unwrap();
    crate::support::wait_for_rotation(&tv.vault, Duration::from_secs(10)).await;

    // A `tokenvault serve` child on the same database and keyring refreshes
    // and leases, logging at debug level.
    let config_path = write_config_file(tv.dir.path(), &tv.config, "");
    let child = ServeProcess::start(
        tv.dir.path(),
        &["--config", &config_path.display().to_string()],
        &[("TOKENVAULT_LOG__LEVEL", "debug")],
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", child.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut on_child = pb::lease_service_client::LeaseServiceClient::with_interceptor(
        channel,
        Bearer(Some(
            format!("Bearer {}", As::Worker.key()).parse().unwrap(),
        )),
    );
    expire_stored_token(&tv, &ids[1]).await;
    leased.push(
        on_child
            .lease_token(calendar_lease(&ids[1]))
            .await
            .expect("a lease from the child")
            .into_inner()
            .access_token,
    );

    // A deletion whose revocation Google refuses for now: the outbox keeps a
    // sealed copy of the token to revoke.
    sim.inject(Endpoint::Revoke, Fault::Status(503), None);
    tv.connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: ids[0].clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM revocation_outbox").await,
        1,
        "the revocation waits in the outbox"
    );

    // What must never appear.
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let seen = sim.secrets_seen();
    for kind in ["4/0Sim", "ya29.sim", "1//0Sim"] {
        assert!(
            seen.iter().any(|s| s.starts_with(kind)),
            "the simulator issued no {kind}… secret"
        );
    }
    assert!(
        seen.iter().any(|s| !s.contains("Sim")),
        "the simulator saw no PKCE verifier"
    );
    for s in seen.iter().chain(&leased) {
        secrets.push(("a Google secret".to_owned(), s.clone().into_bytes()));
    }
    secrets.push((
        "the client secret".into(),
        CLIENT_SECRET.as_bytes().to_vec(),
    ));
    for who in As::ALL {
        secrets.push((format!("the API key of {who:?}"), who.key().into_bytes()));
    }
    for key in keyring_secrets(&tv) {
        secrets.push(("a root key".into(), key));
    }
    let mut needles = Vec::new();
    let mut names = Vec::new();
    for (what, secret) in &secrets {
        for enc in encodings(secret) {
            needles.push(enc);
            names.push(what.clone());
        }
    }
    let finder = AhoCorasick::new(&needles).unwrap();

    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    match backend {
        Backend::Sqlite => {
            for suffix in ["", "-wal", "-shm"] {
                let path = tv.dir.path().join(format!("tokenvault.db{suffix}"));
                if let Ok(bytes) = std::fs::read(&path) {
                    places.push((format!("tokenvault.db{suffix}"), bytes));
                }
            }
            assert!(
                places[0].1.windows(18).any(|w| w == b"connection_secrets"),
                "read the database file"
            );
        }
        Backend::Postgres => {
            let dump = raw.postgres_dump().await;
            assert!(dump.contains("revocation_outbox"));
            places.push(("every table".into(), dump.into_bytes()));
        }
    }
    let logged = logs::captured();
    assert!(!logged.is_empty(), "logs were captured");
    places.push(("the vault's log".into(), logged));
    let child_log = child.log_text();
    assert!(
        child_log.contains("\"DEBUG\"") || child_log.contains("\"debug\""),
        "the child logged at debug level"
    );
    // Lines logged while serving a request name it (the gRPC span).
    assert!(
        child_log.lines().any(|l| l.contains("\"request_id\"")
            && l.contains("/tokenvault.v1.LeaseService/LeaseToken")),
        "no log line of the child names its request"
    );
    places.push(("the child's log".into(), child_log.into_bytes()));
    let scan = |place: &str, bytes: &[u8]| {
        if let Some(m) = finder.find(bytes) {
            panic!(
                "{} found in plaintext in {place} ({backend:?}) at byte {}",
                names[m.pattern().as_usize()],
                m.start()
            );
        }
    };
    for (place, bytes) in &places {
        scan(place, bytes);
    }
    if backend == Backend::Postgres {
        postgres_wal(&raw, started, scan).await;
    }
}
both_backends!(
    nothing_in_plaintext_anywhere,
    no_secret_the_vault_sees_is_at_rest_or_logged
);
