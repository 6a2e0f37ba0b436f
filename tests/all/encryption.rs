//! Envelope encryption at rest: tampered, moved or mislabelled ciphertexts do
//! not open (and the failure changes nothing), and nothing secret is ever in
//! the database or the logs in plaintext.

use base64::Engine as _;
use tokenvault::domain::{Integration, VaultError};
use tonic::Code;

use crate::both_backends;
use crate::support::raw::{RawDb, SecretRow};
use crate::support::{Backend, TestVault, logs, seed_connection, spawn_vault};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Opening must fail with a crypto error whose status carries no secret.
async fn assert_does_not_open(
    tv: &TestVault,
    id: &tokenvault::domain::ConnectionId,
    secrets: &[&str],
    what: &str,
) {
    match tv.vault.access_token_open(id).await {
        Ok(_) => panic!("{what}: tampered ciphertext opened"),
        Err(err @ VaultError::Crypto(_)) => {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), Code::DataLoss, "{what}");
            for s in secrets {
                assert!(
                    !status.message().contains(s),
                    "{what}: status leaks a secret"
                );
            }
        }
        Err(other) => panic!("{what}: expected a crypto error, got {other:?}"),
    }
}

async fn tampered_moved_or_mislabelled_ciphertexts_fail_and_change_nothing(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let (a1, r1, a2) = (unique("ya29.a1"), unique("1//r1"), unique("ya29.a2"));
    let c1 = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        &a1,
        Some(&r1),
    )
    .await;
    let c2 = seed_connection(
        &tv.vault,
        "acme",
        "bob",
        Integration::Calendar,
        &a2,
        Some("1//r2"),
    )
    .await;
    let secrets = [a1.as_str(), r1.as_str(), a2.as_str()];
    let raw = RawDb::open(&tv).await;
    let original = raw.secret_row(c1.id.as_str()).await.unwrap();

    // Every single byte of the sealed access token and of the wrapped DEK.
    let access = original.access_token.clone().unwrap();
    for i in 0..access.len() {
        let mut row = original.clone();
        row.access_token.as_mut().unwrap()[i] ^= 0x01;
        raw.set_secret_row(c1.id.as_str(), &row).await;
        assert_does_not_open(&tv, &c1.id, &secrets, &format!("access byte {i}")).await;
        assert_eq!(
            raw.secret_row(c1.id.as_str()).await.unwrap(),
            row,
            "a failed open rewrote the row"
        );
    }
    for i in 0..original.wrapped_dek.len() {
        let mut row = original.clone();
        row.wrapped_dek[i] ^= 0x80;
        raw.set_secret_row(c1.id.as_str(), &row).await;
        assert_does_not_open(&tv, &c1.id, &secrets, &format!("wrapped DEK byte {i}")).await;
        assert_eq!(raw.secret_row(c1.id.as_str()).await.unwrap(), row);
    }

    // Access and refresh swapped: the token kind is bound.
    let swapped = SecretRow {
        access_token: original.refresh_token.clone(),
        refresh_token: original.access_token.clone(),
        ..original.clone()
    };
    raw.set_secret_row(c1.id.as_str(), &swapped).await;
    assert_does_not_open(
        &tv,
        &c1.id,
        &secrets,
        "refresh ciphertext in the access field",
    )
    .await;

    // Another connection's ciphertext, alone or with its wrapped DEK.
    raw.set_secret_row(c1.id.as_str(), &original).await;
    let other = raw.secret_row(c2.id.as_str()).await.unwrap();
    let moved_token = SecretRow {
        access_token: original.access_token.clone(),
        ..other.clone()
    };
    raw.set_secret_row(c2.id.as_str(), &moved_token).await;
    assert_does_not_open(
        &tv,
        &c2.id,
        &secrets,
        "ciphertext moved to another connection",
    )
    .await;
    raw.set_secret_row(c2.id.as_str(), &original).await;
    assert_does_not_open(
        &tv,
        &c2.id,
        &secrets,
        "DEK and ciphertext moved to another connection",
    )
    .await;
    raw.set_secret_row(c2.id.as_str(), &other).await;

    // The wrong KEK version: version 2 exists in the keyring, but did not wrap this DEK.
    tv.vault
        .keyring()
        .create_version(tokenvault::crypto::KekVersion::FIRST)
        .await
        .unwrap();
    tv.vault.keys().sync().await.unwrap();
    let relabelled = SecretRow {
        kek_version: 2,
        ..original.clone()
    };
    raw.set_secret_row(c1.id.as_str(), &relabelled).await;
    assert_does_not_open(&tv, &c1.id, &secrets, "KEK version column changed").await;
    let mut forged = relabelled.clone();
    forged.wrapped_dek[1..5].copy_from_slice(&2u32.to_be_bytes());
    raw.set_secret_row(c1.id.as_str(), &forged).await;
    assert_does_not_open(&tv, &c1.id, &secrets, "KEK version header changed").await;

    // Restored, both open again: nothing was lost along the way.
    raw.set_secret_row(c1.id.as_str(), &original).await;
    assert_eq!(
        tv.vault
            .access_token_open(&c1.id)
            .await
            .unwrap()
            .access_token
            .expose(),
        a1
    );
    assert_eq!(
        tv.vault
            .access_token_open(&c2.id)
            .await
            .unwrap()
            .access_token
            .expose(),
        a2
    );
    raw.close().await;
}
both_backends!(
    tamper_fails_closed,
    tampered_moved_or_mislabelled_ciphertexts_fail_and_change_nothing
);

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
    assert!(keys.len() >= 2 && keys.iter().all(|k| k.len() == 32));
    keys
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

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

async fn no_token_or_key_is_at_rest_or_in_the_logs(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut tokens = Vec::new();
    for i in 0..6 {
        let (access, refresh) = (unique("ya29.scan"), unique("1//scan"));
        let c = seed_connection(
            &tv.vault,
            "scan",
            &format!("u{i}"),
            Integration::Email,
            &access,
            Some(&refresh),
        )
        .await;
        assert_eq!(
            tv.vault
                .access_token_open(&c.id)
                .await
                .unwrap()
                .access_token
                .expose(),
            access
        );
        tokens.push(access.into_bytes());
        tokens.push(refresh.into_bytes());
    }
    // A rotation writes every wrapped DEK again, and logs as it goes.
    let actor = tokenvault::audit::Actor::system();
    tv.vault.keys().rotate(&actor).await.unwrap();
    crate::support::wait_for_rotation(&tv.vault, std::time::Duration::from_secs(10)).await;
    let keys = keyring_secrets(&tv);

    let at_rest: Vec<u8> = match backend {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm"] {
                let path = tv.dir.path().join(format!("tokenvault.db{suffix}"));
                if let Ok(b) = std::fs::read(&path) {
                    bytes.extend(b);
                }
            }
            assert!(
                contains(&bytes, b"connection_secrets"),
                "read the database files"
            );
            bytes
        }
        Backend::Postgres => {
            let raw = RawDb::open(&tv).await;
            let dump = raw.postgres_dump().await;
            raw.close().await;
            assert!(dump.contains("connection_secrets") || dump.contains("audit_log"));
            dump.into_bytes()
        }
    };
    let logged = logs::captured();
    assert!(!logged.is_empty(), "logs were captured");
    for (what, secret) in tokens
        .iter()
        .map(|t| ("token", t))
        .chain(keys.iter().map(|k| ("key", k)))
    {
        for enc in encodings(secret) {
            assert!(
                !contains(&at_rest, &enc),
                "a {what} is stored in plaintext ({backend:?})"
            );
            assert!(!contains(&logged, &enc), "a {what} was logged");
        }
    }
}
both_backends!(
    nothing_in_plaintext,
    no_token_or_key_is_at_rest_or_in_the_logs
);

async fn the_env_keyring_serves_and_refuses_what_it_cannot_do(backend: Backend) {
    let generated =
        tokenvault::crypto::EnvKeyring::generate_values(tokenvault::crypto::KekVersion::FIRST)
            .unwrap();
    let (keys, mac) = (
        generated.keys.expose().to_owned(),
        generated.mac_root_key.expose().to_owned(),
    );
    let Some(tv) = crate::support::spawn_vault_with(backend, |c| {
        c.keyring.provider = tokenvault::config::KeyringProviderKind::Env;
        c.keyring.keys = keys.into();
        c.keyring.mac_key = mac.into();
    })
    .await
    else {
        return;
    };
    assert!(
        !tv.keyring_path().exists(),
        "no keyring file with the env provider"
    );
    let access = unique("ya29.env");
    let c = seed_connection(&tv.vault, "env", "u1", Integration::Calendar, &access, None).await;
    assert_eq!(
        tv.vault
            .access_token_open(&c.id)
            .await
            .unwrap()
            .access_token
            .expose(),
        access
    );
    let mut admin = tv.admin(crate::support::As::Admin);
    let status = admin
        .key_status(tokenvault::proto::v1::KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.provider, "env");
    // The env keyring holds no newer version, and cannot create one.
    let err = admin
        .rotate_keys(tokenvault::proto::v1::RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("newer"), "{}", err.message());
}
both_backends!(
    env_keyring,
    the_env_keyring_serves_and_refuses_what_it_cannot_do
);

async fn an_overdue_rotation_shows_in_key_status_and_metrics(backend: Backend) {
    let Some(tv) =
        crate::support::spawn_vault_with(backend, |c| c.keyring.max_kek_age_days = 30).await
    else {
        return;
    };
    seed_connection(
        &tv.vault,
        "age",
        "u1",
        Integration::Calendar,
        &unique("ya29.age"),
        None,
    )
    .await;
    let mut admin = tv.admin(crate::support::As::Auditor);
    let fresh = admin
        .key_status(tokenvault::proto::v1::KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!fresh.rotation_overdue);
    // Metrics are process-wide and these gauges are set when scraped: a
    // `serve` process of this vault's own (same database and keyring) is
    // scraped, so that no other test's scrape can change what this one reads.
    let config_path = crate::support::write_config_file(
        tv.dir.path(),
        &tv.config,
        "[keyring]\nmax_kek_age_days = 30\n",
    );
    let child = crate::serve_cli::ServeProcess::start(
        tv.dir.path(),
        &["--config", &config_path.display().to_string()],
        &[],
    );
    let child_http: std::net::SocketAddr = child.http_addr.parse().unwrap();
    let metrics = crate::foundation::reqwest_like_get(child_http, "/metrics").await;
    assert!(
        metrics.contains("tokenvault_kek_rotation_overdue 0"),
        "{metrics}"
    );

    // Version 1 was created 31 days ago.
    let raw = RawDb::open(&tv).await;
    raw.execute(&format!(
        "UPDATE kek_versions SET created_at = created_at - {} WHERE version = 1",
        31i64 * 86_400 * 1_000_000
    ))
    .await;
    raw.close().await;
    let old = admin
        .key_status(tokenvault::proto::v1::KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(old.rotation_overdue);
    assert!(old.oldest_in_use_age_seconds >= 31 * 86_400);
    let report = admin
        .key_report(tokenvault::proto::v1::KeyReportRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!report.policy_met);
    assert!(
        report.policy_detail.starts_with("not met"),
        "{}",
        report.policy_detail
    );
    let metrics = crate::foundation::reqwest_like_get(child_http, "/metrics").await;
    assert!(
        metrics.contains("tokenvault_kek_rotation_overdue 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokenvault_kek_deks{version=\"v1\"} 1"),
        "{metrics}"
    );
}
both_backends!(
    overdue_rotation,
    an_overdue_rotation_shows_in_key_status_and_metrics
);
