//! Deletion, immediately and everywhere, against the Google simulator:
//! Disconnect and DeleteAccount destroy tokens in the answering transaction,
//! Google is asked to revoke only when the last connection on a Google account
//! goes, the outbox retries until Google confirms (also across a SIGKILL), and
//! receipts complete when the required consumers acknowledge.

use std::time::{Duration, Instant};

use tokenvault::domain::Timestamp;
use tokenvault::google::sim::{Endpoint, Fault};
use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, CALENDAR_SCOPE, CLIENT_ID, GMAIL_SCOPE, TestVault, connect, disconnect, post_risc,
    receipt, receipt_until, spawn_vault_with_google,
};

const SUBJECT: &str = "sim-user-1";

fn lease(connection_id: &str, purpose: &str, scope: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.into(),
        purpose: purpose.into(),
        scopes: vec![scope.into()],
        min_valid_seconds: 0,
    }
}

fn upstream(r: &pb::DeletionReceipt) -> pb::UpstreamRevocationState {
    pb::UpstreamRevocationState::try_from(r.upstream_revocations[0].state).unwrap()
}

async fn the_grant_is_revoked_only_when_its_last_connection_goes(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let mail = connect(&tv, "t1", "u1", pb::Integration::Email).await;
    let raw = RawDb::open(&tv).await;
    assert!(raw.secret_row(&cal.connection_id).await.is_some());

    let r = disconnect(&tv, &cal.connection_id).await;
    assert_eq!(r.connection_ids, vec![cal.connection_id.clone()]);
    assert!(r.tokens_destroyed_at.is_some());
    assert_eq!(upstream(&r), pb::UpstreamRevocationState::NotNeeded);
    assert_eq!(sim.revocations(), 0, "EMAIL still uses the grant");
    assert!(raw.secret_row(&cal.connection_id).await.is_none());
    let err = tv
        .leases(As::Worker)
        .lease_token(lease(&cal.connection_id, "calendar_sync", CALENDAR_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let token = tv
        .leases(As::EmailWorker)
        .lease_token(lease(&mail.connection_id, "email_sync", GMAIL_SCOPE))
        .await
        .expect("EMAIL keeps working")
        .into_inner();
    assert!(!token.access_token.is_empty());
    // Repeating the call returns the same receipt.
    assert_eq!(
        disconnect(&tv, &cal.connection_id).await.receipt_id,
        r.receipt_id
    );

    let r = disconnect(&tv, &mail.connection_id).await;
    assert_eq!(
        upstream(&r),
        pb::UpstreamRevocationState::Confirmed,
        "{r:?}"
    );
    assert_eq!(sim.revocations(), 1, "exactly one revoke");
    assert!(sim.grant_revoked(SUBJECT, CLIENT_ID));
    assert_eq!(tv.vault.store().outbox_depth().await.unwrap().0, 0);
    raw.close().await;
}
both_backends!(
    revoke_when_last_goes,
    the_grant_is_revoked_only_when_its_last_connection_goes
);

async fn delete_account_removes_everything_and_completes_on_acks(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let mail = connect(&tv, "t1", "u1", pb::Integration::Email).await;
    // Another account of the tenant, on another Google account.
    let other = crate::support::seed_connection(
        &tv.vault,
        "t1",
        "someone-else",
        tokenvault::domain::Integration::Calendar,
        "ya29.other",
        Some("1//other"),
    )
    .await;
    let mut cal_watch = tv
        .events(As::Worker)
        .watch(pb::WatchRequest {
            consumer: "calendar-sync".into(),
            kinds: vec![pb::EventKind::AccountDeleted as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = tv
        .connections(As::App)
        .delete_account(pb::DeleteAccountRequest {
            tenant_id: "t1".into(),
            account_id: "u1".into(),
            reason: "account closed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let mut ids = vec![cal.connection_id.clone(), mail.connection_id.clone()];
    ids.sort();
    assert_eq!(r.connection_ids, ids);
    assert_eq!(r.reason, pb::DeletionReason::AccountDeleted as i32);
    assert_eq!(r.required_consumers, vec!["calendar-sync", "email-sync"]);
    assert_eq!(r.status, pb::ReceiptStatus::Pending as i32);
    let raw = RawDb::open(&tv).await;
    for id in &ids {
        assert!(
            raw.secret_row(id).await.is_none(),
            "{id} destroyed before the call returned"
        );
    }
    assert!(raw.secret_row(other.id.as_str()).await.is_some());
    raw.close().await;
    assert!(sim.grant_revoked(SUBJECT, CLIENT_ID));
    // The tombstone names the receipt that proves the deletion.
    let tombstone = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: cal.connection_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(tombstone.status, pb::ConnectionStatus::Deleted as i32);
    assert_eq!(tombstone.deletion_receipt_id, r.receipt_id);

    // Watchers get one ACCOUNT_DELETED per connection; each consumer acks.
    let mut last = 0;
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(2), cal_watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.kind, pb::EventKind::AccountDeleted as i32);
        assert_eq!(e.receipt_id, r.receipt_id);
        last = e.cursor;
    }
    drop(cal_watch);
    tv.events(As::Worker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: last,
        })
        .await
        .unwrap();
    let half = receipt(&tv, &r.receipt_id).await;
    assert_eq!(half.status, pb::ReceiptStatus::Pending as i32);
    assert_eq!(half.consumer_acks.len(), 1);
    assert_eq!(half.consumer_acks[0].consumer, "calendar-sync");
    tv.events(As::EmailWorker)
        .ack(pb::AckRequest {
            consumer: "email-sync".into(),
            cursor: last,
        })
        .await
        .unwrap();
    let done = receipt_until(&tv, &r.receipt_id, Duration::from_secs(5), "done", |r| {
        r.status == pb::ReceiptStatus::Complete as i32
    })
    .await;
    assert!(done.completed_at.is_some());
    // Both connections share one Google grant: one revocation, carried by one
    // of them.
    let mut states: Vec<i32> = done.upstream_revocations.iter().map(|u| u.state).collect();
    states.sort_unstable();
    assert_eq!(
        states,
        vec![
            pb::UpstreamRevocationState::NotNeeded as i32,
            pb::UpstreamRevocationState::Confirmed as i32
        ]
    );

    // Repeating returns the same receipt; the other account is untouched.
    let again = tv
        .connections(As::App)
        .delete_account(pb::DeleteAccountRequest {
            tenant_id: "t1".into(),
            account_id: "u1".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(again.receipt_id, r.receipt_id);
    let still = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: other.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(still.status, pb::ConnectionStatus::Active as i32);
}
both_backends!(
    delete_account,
    delete_account_removes_everything_and_completes_on_acks
);

async fn a_failing_revoke_is_retried_until_google_confirms(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.deletion.inline_revoke_timeout_ms = 500;
        c.deletion.outbox_initial_backoff_ms = 200;
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let before = tv
        .vault
        .store()
        .secrets_get(&tokenvault::domain::ConnectionId::parse(&cal.connection_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    sim.inject(Endpoint::Revoke, Fault::Status(503), Some(3));
    let r = disconnect(&tv, &cal.connection_id).await;
    assert_eq!(upstream(&r), pb::UpstreamRevocationState::Pending, "{r:?}");
    assert_eq!(r.upstream_revocations[0].attempts, 1);
    assert!(
        r.upstream_revocations[0].last_error.contains("503"),
        "{r:?}"
    );
    assert_eq!(tv.vault.store().outbox_depth().await.unwrap().0, 1);
    // Meanwhile nothing can be leased and the live tables hold none of it.
    let err = tv
        .leases(As::Worker)
        .lease_token(lease(&cal.connection_id, "calendar_sync", CALENDAR_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let raw = RawDb::open(&tv).await;
    assert!(raw.secret_row(&cal.connection_id).await.is_none());
    let destroyed = [
        before.wrapped_dek.clone(),
        before.refresh_token.clone().unwrap(),
        before.access_token.clone().unwrap(),
    ];
    if backend == Backend::Sqlite {
        for suffix in ["", "-wal"] {
            let path = tv.dir.path().join(format!("tokenvault.db{suffix}"));
            let bytes = std::fs::read(&path).unwrap_or_default();
            for secret in &destroyed {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                    "{} still holds a destroyed ciphertext",
                    path.display()
                );
            }
        }
    }
    if backend == Backend::Postgres {
        let dump = raw.postgres_dump().await;
        for bytes in &destroyed {
            assert!(
                !dump.contains(&hex::encode(bytes)),
                "a destroyed ciphertext is still in a table"
            );
        }
    }
    let done = receipt_until(&tv, &r.receipt_id, Duration::from_secs(15), "done", |r| {
        upstream(r) == pb::UpstreamRevocationState::Confirmed
    })
    .await;
    assert!(done.upstream_revocations[0].attempts >= 4, "{done:?}");
    assert!(done.upstream_revocations[0].confirmed_at.is_some());
    assert!(sim.grant_revoked(SUBJECT, CLIENT_ID));
    assert_eq!(
        tv.vault.store().outbox_depth().await.unwrap().0,
        0,
        "the retained token is destroyed once Google confirms"
    );
    raw.close().await;
}
both_backends!(
    revoke_retried,
    a_failing_revoke_is_retried_until_google_confirms
);

async fn status_of(tv: &TestVault, id: &str) -> pb::ConnectionStatus {
    let c = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    pb::ConnectionStatus::try_from(c.status).unwrap()
}

async fn risc_events_are_verified_then_acted_on(backend: Backend) {
    let sim = crate::support::start_google().await;
    let Some(tv) = crate::support::spawn_vault_with(backend, |c| {
        crate::support::use_google(c, &sim);
        c.risc.jwks_uri = sim.jwks_uri();
        c.risc.issuer = sim.risc_issuer();
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;

    // Invalid tokens: 400, nothing changes.
    let wrong_aud = sim.sign_risc_event(
        "someone-else.apps.googleusercontent.com",
        "tokens-revoked",
        SUBJECT,
        serde_json::json!({}),
    );
    let forged = sim.sign_with_untrusted_key(serde_json::json!({
        "iss": sim.risc_issuer(),
        "aud": CLIENT_ID,
        "iat": Timestamp::now().seconds_nanos().0,
        "jti": "forged-1",
        "events": {"https://schemas.openid.net/secevent/risc/event-type/tokens-revoked":
            {"subject": {"subject_type": "iss-sub", "iss": sim.risc_issuer(), "sub": SUBJECT}}},
    }));
    for body in [wrong_aud.as_str(), forged.as_str(), "not a token", ""] {
        assert_eq!(post_risc(&tv, body).await.0, 400, "{body:.20}");
    }
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::Active
    );

    // account-disabled (hijacking) suspends, account-enabled resumes.
    let disabled = sim.sign_risc_event(
        CLIENT_ID,
        "account-disabled",
        SUBJECT,
        serde_json::json!({"reason": "hijacking"}),
    );
    assert_eq!(post_risc(&tv, &disabled).await.0, 202);
    assert_eq!(
        post_risc(&tv, &disabled).await.0,
        400,
        "a replayed jti is refused"
    );
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::Suspended
    );
    let err = tv
        .leases(As::Worker)
        .lease_token(lease(&cal.connection_id, "calendar_sync", CALENDAR_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let enabled = sim.sign_risc_event(CLIENT_ID, "account-enabled", SUBJECT, serde_json::json!({}));
    assert_eq!(post_risc(&tv, &enabled).await.0, 202);
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::Active
    );
    tv.leases(As::Worker)
        .lease_token(lease(&cal.connection_id, "calendar_sync", CALENDAR_SCOPE))
        .await
        .expect("leases again after account-enabled");

    // tokens-revoked runs the cascade, with nothing to revoke upstream.
    let revoked = sim.sign_risc_event(CLIENT_ID, "tokens-revoked", SUBJECT, serde_json::json!({}));
    assert_eq!(post_risc(&tv, &revoked).await.0, 202);
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::RevokedUpstream,
        "the user ended the grant at Google: the product asks them to reconnect"
    );
    assert_eq!(sim.revocations(), 0);
    let events = tv.vault.store().events_after(0, 100).await.unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event.kind).collect();
    use tokenvault::domain::EventKind;
    assert!(kinds.contains(&EventKind::Suspended), "{kinds:?}");
    assert!(kinds.contains(&EventKind::Resumed), "{kinds:?}");
    let deleted = events
        .iter()
        .find(|e| e.event.kind == EventKind::ConnectionDeleted)
        .expect("CONNECTION_DELETED");
    assert_eq!(
        deleted.event.reason,
        Some(tokenvault::domain::DeletionReason::UserRevokedAtGoogle)
    );
    // Every RISC token, accepted or not, leaves no raw subject in the audit log.
    let audit = tv
        .vault
        .store()
        .audit_query(&tokenvault::store::AuditFilter::default(), 1000)
        .await
        .unwrap();
    assert!(audit.iter().any(|a| a.draft.action == "risc.event"));
}
both_backends!(risc, risc_events_are_verified_then_acted_on);

async fn receipts_are_listed_and_old_ones_pruned(backend: Backend) {
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    // A worker holds a lease, so the disconnect logs two events (LEASE_REVOKED,
    // then CONNECTION_DELETED): once both are pruned, cursor 1 lies before the
    // retained range.
    tv.leases(As::Worker)
        .lease_token(lease(&cal.connection_id, "calendar_sync", CALENDAR_SCOPE))
        .await
        .expect("the worker leases before the disconnect");
    let r = disconnect(&tv, &cal.connection_id).await;
    let pending = tv
        .admin(As::Auditor)
        .list_deletion_receipts(pb::ListDeletionReceiptsRequest {
            incomplete_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.receipts.len(), 1, "waits for calendar-sync's ack");
    assert_eq!(pending.receipts[0].receipt_id, r.receipt_id);
    assert!(!pending.receipts[0].overdue);
    let overdue = tv
        .admin(As::Admin)
        .list_deletion_receipts(pb::ListDeletionReceiptsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(overdue.receipts.is_empty());

    // Once acknowledged, it is complete; past retention, it is pruned with
    // its events and its tombstone.
    let head = tv.vault.store().event_state().await.unwrap().head;
    assert!(
        head > 1,
        "the disconnect logged LEASE_REVOKED and CONNECTION_DELETED; head is {head}"
    );
    tv.events(As::Worker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: u64::try_from(head).unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(
        receipt(&tv, &r.receipt_id).await.status,
        pb::ReceiptStatus::Complete as i32
    );
    let later = Timestamp::from_micros(Timestamp::now().as_micros() + 1_000_000);
    let pruned = tv
        .vault
        .store()
        .retention_prune(later, &["calendar-sync".into(), "email-sync".into()])
        .await
        .unwrap();
    assert_eq!(pruned, 0, "email-sync has not acknowledged the events yet");
    tv.vault
        .store()
        .consumer_ack("email-sync", head, Timestamp::now())
        .await
        .unwrap();
    let pruned = tv
        .vault
        .store()
        .retention_prune(later, &["calendar-sync".into(), "email-sync".into()])
        .await
        .unwrap();
    assert!(pruned > 0);
    let err = tv
        .connections(As::App)
        .get_deletion_receipt(pb::GetDeletionReceiptRequest {
            receipt_id: r.receipt_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let state = tv.vault.store().event_state().await.unwrap();
    assert_eq!(state.pruned_through, head);
    // A consumer resuming from before the pruned range is told, not silently skipped.
    let err = tv
        .events(As::Worker)
        .watch(pb::WatchRequest {
            consumer: "calendar-sync".into(),
            after_cursor: Some(1),
            ..Default::default()
        })
        .await
        .expect_err("resuming after cursor 1 would skip the pruned events");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("were pruned"), "{err:?}");
}
both_backends!(
    receipts_and_retention,
    receipts_are_listed_and_old_ones_pruned
);

async fn the_outbox_finishes_a_revocation_after_a_sigkill(backend: Backend) {
    use crate::serve_cli::ServeProcess;
    use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
    let sim = crate::support::start_google().await;
    let Some(mut tv) = crate::support::spawn_vault_with(backend, |c| {
        crate::support::use_google(c, &sim);
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    tv.stop().await;
    let config = crate::support::write_config_file(
        tv.dir.path(),
        &tv.config,
        "[deletion]\ninline_revoke_timeout_ms = 300\noutbox_initial_backoff_ms = 200\n",
    );
    let config = config.to_str().unwrap().to_owned();
    let client = |addr: &str| {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        ConnectionServiceClient::with_interceptor(
            channel,
            crate::support::Bearer(Some(format!("Bearer {}", As::App.key()).parse().unwrap())),
        )
    };

    // Google refuses every revoke while the first process runs.
    sim.inject(Endpoint::Revoke, Fault::Status(503), None);
    let mut first = ServeProcess::start(tv.dir.path(), &["--config", &config], &[]);
    let r = client(&first.grpc_addr)
        .disconnect(pb::DisconnectRequest {
            connection_id: cal.connection_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(upstream(&r), pb::UpstreamRevocationState::Pending, "{r:?}");
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    assert!(!sim.grant_revoked(SUBJECT, CLIENT_ID));
    // What the killed process left: no live secrets, one outbox row holding
    // the token the revocation still needs.
    let raw = RawDb::open(&tv).await;
    assert!(raw.secret_row(&cal.connection_id).await.is_none());
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM revocation_outbox").await,
        1,
        "the pending revocation survives the SIGKILL in the outbox"
    );
    raw.close().await;

    // Google recovers; a new process finishes the job from the outbox.
    sim.clear_faults();
    let mut second = ServeProcess::start(tv.dir.path(), &["--config", &config], &[]);
    let mut app = client(&second.grpc_addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = app
            .get_deletion_receipt(pb::GetDeletionReceiptRequest {
                receipt_id: r.receipt_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .receipt
            .unwrap();
        if upstream(&now) == pb::UpstreamRevocationState::Confirmed {
            break;
        }
        assert!(Instant::now() < deadline, "never confirmed: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sim.grant_revoked(SUBJECT, CLIENT_ID));
    second.signal("TERM");
    second.wait(Duration::from_secs(20));
    let raw = RawDb::open(&tv).await;
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM revocation_outbox").await,
        0,
        "the outbox copy of the token is destroyed once Google confirms"
    );
    if backend == Backend::Postgres {
        let dump = raw.postgres_dump().await;
        assert!(
            !dump.contains("revocation_outbox {"),
            "the outbox copy is destroyed"
        );
    }
    raw.close().await;
}
both_backends!(
    outbox_after_sigkill,
    the_outbox_finishes_a_revocation_after_a_sigkill
);

async fn a_connection_replaced_by_another_google_account_is_deleted_like_a_disconnect(
    backend: Backend,
) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let first = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    sim.add_user("second@sim.test", "sim-user-second");
    let begun = tv
        .connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "t1".into(),
            account_id: "u1".into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: Some("second@sim.test".into()),
        })
        .await
        .unwrap()
        .into_inner();
    let query = crate::support::follow_authorization(&begun.authorization_url).await;
    let (status, body) = crate::support::deliver_callback(&tv, &query).await;
    assert_eq!(status, 200, "{body}");

    // The first Google account's connection went through the cascade: tombstone,
    // CONNECTION_DELETED with a receipt, and its grant revoked at Google.
    assert_eq!(
        status_of(&tv, &first.connection_id).await,
        pb::ConnectionStatus::Deleted
    );
    let events = tv.vault.store().events_after(0, 100).await.unwrap();
    let deleted = events
        .iter()
        .find(|e| {
            e.event.kind == tokenvault::domain::EventKind::ConnectionDeleted
                && e.event.connection_id.as_ref().map(|c| c.as_str())
                    == Some(first.connection_id.as_str())
        })
        .expect("CONNECTION_DELETED for the replaced connection");
    assert_eq!(deleted.event.detail, "replaced by another Google account");
    assert!(sim.grant_revoked(SUBJECT, CLIENT_ID));
    assert!(!sim.grant_revoked("sim-user-second", CLIENT_ID));
    let list = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "t1".into(),
            account_id: Some("u1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.connections.len(), 1);
    assert_ne!(list.connections[0].connection_id, first.connection_id);
    assert_eq!(list.connections[0].google_subject, "sim-user-second");
}
both_backends!(
    replaced_connection,
    a_connection_replaced_by_another_google_account_is_deleted_like_a_disconnect
);
