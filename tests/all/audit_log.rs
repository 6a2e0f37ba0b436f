//! The audit log as a security reviewer relies on it: signed checkpoints that
//! match the chain and reveal a cut-off tail, an append failure that stops
//! the operation it would have recorded, and a writer that drains its queue and
//! stops with its last handle.

use std::sync::Arc;

use tokenvault::audit::{Actor, AuditLog, Outcome};
use tokenvault::crypto::{KeyringProvider, LocalKeyring};
use tokenvault::domain::{Integration, Timestamp};
use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::audit_fill_to as fill_to;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, CALENDAR_SCOPE, TestVault, fresh_database, seed_connection, spawn_vault_with,
};

async fn vault_checkpointing_every(backend: Backend, every: u64) -> Option<TestVault> {
    spawn_vault_with(backend, |c| c.audit.checkpoint_every = every).await
}

async fn verify(tv: &TestVault, from: Option<u64>, to: Option<u64>) -> pb::VerifyAuditResponse {
    tv.admin(As::Auditor)
        .verify_audit(pb::VerifyAuditRequest {
            from_seq: from,
            to_seq: to,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn checkpoints_match_the_chain_and_reveal_a_truncated_tail(backend: Backend) {
    let Some(tv) = vault_checkpointing_every(backend, 5).await else {
        return;
    };
    // Verification itself is audited (it adds entries), so fill past it first.
    fill_to(&tv, 23).await;
    let all = verify(&tv, None, Some(23)).await;
    assert!(all.ok, "{all:?}");
    assert_eq!(all.entries_checked, 23);
    assert_eq!(all.checkpoints_verified, 4, "5, 10, 15, 20: {all:?}");
    assert_eq!(all.checkpoint_public_key.len(), 64, "hex Ed25519 key");

    // A range anchored anywhere verifies the checkpoints inside it.
    let part = verify(&tv, Some(7), Some(16)).await;
    assert!(part.ok, "{part:?}");
    assert_eq!((part.from_seq, part.to_seq), (7, 16));
    assert_eq!((part.entries_checked, part.checkpoints_verified), (10, 2));

    let bad = tv
        .admin(As::Auditor)
        .verify_audit(pb::VerifyAuditRequest {
            from_seq: Some(9),
            to_seq: Some(3),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    // The same keyring always yields the same public key.
    assert_eq!(
        verify(&tv, Some(1), Some(1)).await.checkpoint_public_key,
        all.checkpoint_public_key
    );

    // Someone with database access rewrites a checkpoint: named at its entry.
    let raw = RawDb::open(&tv).await;
    raw.execute(
        "UPDATE audit_checkpoints SET entry_hash = \
         (SELECT entry_hash FROM audit_log WHERE seq = 9) WHERE seq = 10",
    )
    .await;
    let edited = verify(&tv, None, None).await;
    assert!(!edited.ok);
    assert_eq!(edited.first_broken_seq, Some(10), "{edited:?}");

    // Restore it by deleting and cutting the log after entry 12, moving the
    // head back consistently: the MAC chain of 1..=12 is intact, but the
    // checkpoints at 15 and 20 prove entries are gone.
    raw.execute("DELETE FROM audit_checkpoints WHERE seq = 10")
        .await;
    raw.execute("DELETE FROM audit_log WHERE seq > 12").await;
    raw.execute(
        "UPDATE audit_head SET seq = 12, \
         entry_hash = (SELECT entry_hash FROM audit_log WHERE seq = 12) WHERE id = 1",
    )
    .await;
    let cut = verify(&tv, None, None).await;
    assert!(!cut.ok);
    // The verification call itself was audited first, as entry 13.
    assert_eq!(cut.first_broken_seq, Some(14), "{cut:?}");
    assert!(cut.detail.contains("missing"), "{cut:?}");
    raw.close().await;
}
both_backends!(
    audit_checkpoints,
    checkpoints_match_the_chain_and_reveal_a_truncated_tail
);

fn lease_request(connection_id: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.to_owned(),
        purpose: "calendar_sync".to_owned(),
        scopes: vec![CALENDAR_SCOPE.to_owned()],
        min_valid_seconds: 60,
    }
}

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::Unavailable, "{what}: {err:?}");
    assert!(err.message().contains("audit"), "{what}: {err:?}");
}

/// A granted lease's record is its grant's audit entry, stored as one compact
/// row (migration 0013): it reads back as the entry that was sealed (query
/// and verify agree), no text entry repeats it, and a change to any column
/// the entry is rebuilt from — the token fingerprint, the connection, the
/// profile naming actor, purpose and scopes — is named at that entry.
async fn a_lease_record_is_its_grant_entry_and_a_change_to_it_is_named(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, |_| {}).await else {
        return;
    };
    let conn = seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "ya29.a", None).await;
    let other = seed_connection(&tv.vault, "t1", "u2", Integration::Calendar, "ya29.b", None).await;
    let mut leases = tv.leases(As::Worker);
    let mut granted = Vec::new();
    for _ in 0..3 {
        granted.push(
            leases
                .lease_token(lease_request(conn.id.as_str()))
                .await
                .expect("lease")
                .into_inner()
                .lease_id,
        );
    }
    let raw = RawDb::open(&tv).await;
    assert_eq!(raw.scalar("SELECT COUNT(*) FROM leases").await, 3);
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'lease.grant'")
            .await,
        0,
        "no text entry repeats a recorded lease's grant"
    );
    let grants = tv
        .vault
        .store()
        .audit_query(
            &tokenvault::store::AuditFilter {
                action_prefix: Some("lease.grant".into()),
                ascending: true,
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    let named: Vec<&str> = grants
        .iter()
        .map(|g| g.draft.detail.split(' ').next().unwrap())
        .collect();
    let expected: Vec<String> = granted.iter().map(|id| format!("lease={id}")).collect();
    assert_eq!(named, expected);
    assert!(grants.iter().all(|g| g.draft.target == conn.id.as_str()
        && g.draft.actor == As::Worker.identity()
        && g.draft.outcome == "ok"));
    assert!(verify(&tv, None, None).await.ok);

    let seqs: Vec<i64> = grants.iter().map(|g| g.seq).collect();
    let other_key = match backend {
        Backend::Sqlite => format!("x'{}'", hex::encode(other.id.key())),
        Backend::Postgres => format!("'{}'::uuid", uuid::Uuid::from_bytes(other.id.key())),
    };
    for (seq, edit) in [
        (seqs[0], "token = token || token".to_owned()),
        (seqs[1], format!("connection_id = {other_key}")),
    ] {
        let (column, _) = edit.split_once(" = ").unwrap();
        let restore =
            format!("CREATE TABLE kept AS SELECT {column} AS v FROM leases WHERE seq = {seq}");
        raw.execute(&restore).await;
        raw.execute(&format!("UPDATE leases SET {edit} WHERE seq = {seq}"))
            .await;
        let report = verify(&tv, None, None).await;
        assert!(!report.ok, "{edit}: {report:?}");
        assert_eq!(
            report.first_broken_seq,
            Some(seq as u64),
            "{edit}: {report:?}"
        );
        raw.execute(&format!(
            "UPDATE leases SET {column} = (SELECT v FROM kept) WHERE seq = {seq}"
        ))
        .await;
        raw.execute("DROP TABLE kept").await;
        assert!(verify(&tv, None, None).await.ok, "{edit} restored");
    }
    // The profile names who leased, for which purpose and scopes: a change
    // to it is a change to every grant of it, named at the first.
    raw.execute("UPDATE lease_profiles SET purpose = 'email_sync'")
        .await;
    let report = verify(&tv, None, None).await;
    assert_eq!(report.first_broken_seq, Some(seqs[0] as u64), "{report:?}");
    raw.close().await;
}
both_backends!(
    lease_record_is_its_entry,
    a_lease_record_is_its_grant_entry_and_a_change_to_it_is_named
);

async fn a_failing_audit_append_stops_the_operation(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, |_| {}).await else {
        return;
    };
    let conn = seed_connection(
        &tv.vault,
        "t1",
        "u1",
        Integration::Calendar,
        "ya29.audit-fault-access",
        Some("1//audit-fault-refresh"),
    )
    .await;
    let id = conn.id.as_str().to_owned();
    let raw = RawDb::open(&tv).await;
    let before = raw.secret_row(&id).await.expect("secrets held");
    let (head_before, _) = tv.vault.store().audit_head().await.unwrap();

    tv.vault.audit().inject_failure(true);
    refused(
        tv.leases(As::Worker).lease_token(lease_request(&id)).await,
        "lease",
    );
    refused(
        tv.connections(As::App)
            .disconnect(pb::DisconnectRequest {
                connection_id: id.clone(),
                reason: String::new(),
            })
            .await,
        "disconnect",
    );
    refused(
        tv.connections(As::App)
            .delete_account(pb::DeleteAccountRequest {
                tenant_id: "t1".into(),
                account_id: "u1".into(),
                reason: String::new(),
            })
            .await,
        "delete account",
    );
    refused(
        tv.admin(As::Admin)
            .rotate_keys(pb::RotateKeysRequest {})
            .await,
        "rotate keys",
    );
    refused(
        tv.admin(As::Admin)
            .revoke_connection(pb::RevokeConnectionRequest {
                connection_id: id.clone(),
                reason: "audit down".into(),
            })
            .await,
        "admin revoke",
    );
    // Reads are audited too, so they are refused as well.
    refused(
        tv.admin(As::Auditor)
            .key_status(pb::KeyStatusRequest {})
            .await,
        "key status",
    );
    tv.vault.audit().inject_failure(false);

    // Nothing happened: same tokens, no lease, no new key, no new entries.
    assert_eq!(raw.secret_row(&id).await.as_ref(), Some(&before));
    assert_eq!(
        tv.vault
            .store()
            .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), None)
            .await
            .unwrap(),
        0
    );
    let (head_after, _) = tv.vault.store().audit_head().await.unwrap();
    assert_eq!(head_after, head_before, "no entry was written");
    let keys = tv
        .admin(As::Auditor)
        .key_status(pb::KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.versions.len(), 1, "{keys:?}");

    // Once the log accepts entries again, the same calls work.
    let lease = tv
        .leases(As::Worker)
        .lease_token(lease_request(&id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.access_token, "ya29.audit-fault-access");
    tv.connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert!(raw.secret_row(&id).await.is_none());
    raw.close().await;
}
both_backends!(audit_fault, a_failing_audit_append_stops_the_operation);

/// The writer commits every entry queued before its last handle is dropped,
/// then stops and lets go of the store: on SQLite it runs on a thread of its
/// own, which must not outlive the vault that started it.
async fn the_writer_drains_and_stops_with_its_last_handle(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_database(backend, dir.path()).await else {
        return;
    };
    let _drop = crate::support::DropDatabase::new(&url);
    let store = tokenvault::store::open(&url).await.unwrap();
    let keyring: Arc<dyn KeyringProvider> =
        Arc::new(LocalKeyring::init(dir.path().join("keyring.json")).unwrap());
    let audit = AuditLog::start(store.clone(), keyring, 1000).unwrap();
    let (before, _) = store.audit_head().await.unwrap();
    // Many appenders at once, so that most wait behind a batch in flight.
    let appends: Vec<_> = (0..200)
        .map(|i| {
            let audit = audit.clone();
            tokio::spawn(async move {
                audit
                    .record(
                        &Actor::system(),
                        "test.drain",
                        "t",
                        Outcome::Ok,
                        format!("{i}"),
                    )
                    .await
            })
        })
        .collect();
    drop(audit);
    for append in appends {
        append.await.unwrap().expect("committed");
    }
    let (head, _) = store.audit_head().await.unwrap();
    assert_eq!(head, before + 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Arc::strong_count(&store) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the audit writer still holds the store after its last handle was dropped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    store.close().await;
}
both_backends!(
    audit_writer_stops,
    the_writer_drains_and_stops_with_its_last_handle
);
