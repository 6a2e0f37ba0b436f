//! Leases and the event log as sync workers meet them: lease records and
//! ReleaseLease, Watch across replicas, resumable positions and cumulative
//! Acks, and the stream's end when the server stops.

use std::time::{Duration, Instant};

use tokenvault::domain::{Integration, Timestamp};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::event_service_client::EventServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::both_backends;
use crate::support::next_event;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, Bearer, CALENDAR_SCOPE, TestVault, calendar_lease, seed_connection, spawn_vault,
    spawn_vault_with,
};

fn watch_req(after: Option<u64>) -> pb::WatchRequest {
    pb::WatchRequest {
        consumer: "calendar-sync".into(),
        after_cursor: after,
        ..Default::default()
    }
}

/// A second replica: another server process-alike on the same database.
async fn second_replica(tv: &TestVault) -> (tokenvault::server::RunningServer, Channel) {
    let server = tokenvault::server::start(&tv.config)
        .await
        .expect("start a second replica");
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, channel)
}

fn bearer(who: As) -> Bearer {
    Bearer(Some(format!("Bearer {}", who.key()).parse().unwrap()))
}

async fn a_deletion_reaches_watchers_on_another_replica_within_a_second(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let (replica, channel) = second_replica(&tv).await;
    let conn = seed_connection(
        &tv.vault,
        "t1",
        "a1",
        Integration::Calendar,
        "ya29.one",
        None,
    )
    .await;
    let lease = tv
        .leases(As::Worker)
        .lease_token(calendar_lease(conn.id.as_str()))
        .await
        .unwrap()
        .into_inner();
    let mut events = EventServiceClient::with_interceptor(channel.clone(), bearer(As::Worker));
    let mut stream = events.watch(watch_req(None)).await.unwrap().into_inner();
    // Nothing happened yet: the stream is open and quiet.
    assert!(
        next_event(&mut stream, Duration::from_millis(300))
            .await
            .is_none()
    );

    tv.connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: conn.id.to_string(),
            reason: "user clicked disconnect".into(),
        })
        .await
        .unwrap();
    let returned = Instant::now();
    // The README: events another replica wrote reach watchers "within a
    // second", each replica polling the log's head every
    // events.poll_interval_ms (200 ms by default). Nothing else brings them
    // to this replica (it writes no events itself), so a deadline of ten
    // poll intervals still proves the poller delivers them, and leaves a
    // loaded machine room to schedule it.
    let poll = Duration::from_millis(tv.config.events.poll_interval_ms);
    let limit = poll * 10;
    let deadline = returned + limit;
    let revoked = next_event(
        &mut stream,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "no LEASE_REVOKED on the other replica within {limit:?} of Disconnect returning \
             (events.poll_interval_ms = {poll:?})"
        )
    });
    assert_eq!(revoked.kind, pb::EventKind::LeaseRevoked as i32);
    // It names the connection and the cut-off (every lease of it granted
    // up to then), not each lease.
    assert_eq!(revoked.connection_id, conn.id.as_str());
    assert_eq!(revoked.lease_id, "");
    assert!(!lease.lease_id.is_empty());
    let deleted = next_event(
        &mut stream,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "no CONNECTION_DELETED on the other replica within {limit:?} of Disconnect \
             returning (events.poll_interval_ms = {poll:?})"
        )
    });
    let took = returned.elapsed();
    assert_eq!(deleted.kind, pb::EventKind::ConnectionDeleted as i32);
    assert_eq!(deleted.connection_id, conn.id.as_str());
    assert_eq!(deleted.tenant_id, "t1");
    assert_eq!(deleted.integration, pb::Integration::Calendar as i32);
    assert_eq!(deleted.reason, pb::DeletionReason::UserDisconnected as i32);
    assert_eq!(deleted.detail, "user clicked disconnect");
    assert!(deleted.receipt_id.starts_with("rcpt_"));
    assert!(deleted.cursor > revoked.cursor);
    eprintln!(
        "CONNECTION_DELETED reached the other replica {took:?} after Disconnect returned \
         (deadline {limit:?})"
    );

    // No lease is granted again, on either replica.
    for mut client in [
        tv.leases(As::Worker),
        LeaseServiceClient::with_interceptor(channel.clone(), bearer(As::Worker)),
    ] {
        let err = client
            .lease_token(calendar_lease(conn.id.as_str()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    drop(stream);
    replica.shutdown().await;
}
both_backends!(
    cross_replica_watch,
    a_deletion_reaches_watchers_on_another_replica_within_a_second
);

/// What an in-place re-consent by the same Google account writes (replica A
/// doing it behind replica B's back): the granted scopes, and a new
/// `updated_at`.
async fn reconsent(raw: &RawDb, connection_id: &str, scopes: &str) {
    raw.execute(&format!(
        "UPDATE connections SET granted_scopes = '{scopes}', updated_at = {} \
         WHERE connection_id = '{connection_id}'",
        Timestamp::now().as_micros()
    ))
    .await;
}

/// Replica B serves leases from its cache of sealed records; replica A
/// changes the connection underneath it. B must never grant what the
/// connection no longer allows, nor refuse what it allows again.
async fn a_replica_never_leases_from_a_record_another_replica_changed(backend: Backend) {
    use tokenvault::store::AuditFilter;
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let (replica, channel) = second_replica(&tv).await;
    let mut on_b = LeaseServiceClient::with_interceptor(channel.clone(), bearer(As::Worker));
    let conn = seed_connection(
        &tv.vault,
        "t1",
        "a1",
        Integration::Calendar,
        "ya29.one",
        None,
    )
    .await;
    on_b.lease_token(calendar_lease(conn.id.as_str()))
        .await
        .expect("B leases, and caches the record");

    // A: the user re-consents without the Calendar scope.
    let raw = RawDb::open(&tv).await;
    reconsent(&raw, conn.id.as_str(), "openid email").await;
    let err = on_b
        .lease_token(calendar_lease(conn.id.as_str()))
        .await
        .expect_err("B's cached record still shows the scope; the store refuses it");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("did not grant"), "{err:?}");
    let voided = tv
        .vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some("lease.void".into()),
                target: Some(conn.id.to_string()),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(voided.len(), 1, "the voided grant is audited: {voided:?}");
    assert_eq!(voided[0].draft.outcome, "failed");
    let open = tv
        .vault
        .store()
        .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), Some(&conn.id))
        .await
        .unwrap();
    assert_eq!(open, 1, "only the first lease is recorded");

    // A: the scope is granted again; B's cached record (read after the
    // re-consent) lacks it, and B must not refuse on its account.
    reconsent(
        &raw,
        conn.id.as_str(),
        &format!("openid email {CALENDAR_SCOPE}"),
    )
    .await;
    let lease = on_b
        .lease_token(calendar_lease(conn.id.as_str()))
        .await
        .expect("granted again")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.one");

    // A: the connection is suspended; B refuses from then on.
    tv.vault
        .store()
        .connections_suspend("sub-t1-a1", true, "hijacking", Timestamp::now())
        .await
        .unwrap();
    let err = on_b
        .lease_token(calendar_lease(conn.id.as_str()))
        .await
        .expect_err("suspended");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    raw.close().await;
    replica.shutdown().await;
}
both_backends!(
    cached_records_checked_at_commit,
    a_replica_never_leases_from_a_record_another_replica_changed
);

async fn positions_are_durable_and_acks_cumulative(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        let c = seed_connection(
            &tv.vault,
            "t1",
            &format!("acct{i}"),
            Integration::Calendar,
            &format!("ya29.{i}"),
            None,
        )
        .await;
        ids.push(c.id.to_string());
    }
    for id in &ids {
        tv.connections(As::App)
            .disconnect(pb::DisconnectRequest {
                connection_id: id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap();
    }
    // Each disconnect logs LEASE_REVOKED (the connection's cut-off) and
    // CONNECTION_DELETED; this test follows the deletions.
    let watch_req = |after: Option<u64>| pb::WatchRequest {
        kinds: vec![pb::EventKind::ConnectionDeleted as i32],
        ..watch_req(after)
    };
    let mut events = tv.events(As::Worker);
    let mut stream = events.watch(watch_req(None)).await.unwrap().into_inner();
    let mut cursors = Vec::new();
    while let Some(e) = next_event(&mut stream, Duration::from_millis(500)).await {
        cursors.push(e.cursor);
    }
    assert_eq!(cursors.len(), 3, "a new consumer sees the whole log");
    assert!(cursors.windows(2).all(|w| w[0] < w[1]));
    drop(stream);

    let pos = events
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: cursors[1],
        })
        .await
        .unwrap()
        .into_inner()
        .position;
    assert_eq!(pos, cursors[1]);
    // A lower ack is a no-op.
    let pos = events
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: cursors[0],
        })
        .await
        .unwrap()
        .into_inner()
        .position;
    assert_eq!(pos, cursors[1]);

    // Resuming from the stored position yields only the rest.
    let mut stream = events.watch(watch_req(None)).await.unwrap().into_inner();
    let e = next_event(&mut stream, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(e.cursor, cursors[2]);
    assert!(
        next_event(&mut stream, Duration::from_millis(300))
            .await
            .is_none()
    );
    drop(stream);
    // An explicit cursor replays without moving the position.
    let mut stream = events
        .watch(watch_req(Some(cursors[0])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next_event(&mut stream, Duration::from_millis(500))
            .await
            .unwrap()
            .cursor,
        cursors[1]
    );
    drop(stream);
    // Filters skip, never reorder.
    let mut only = events
        .watch(pb::WatchRequest {
            consumer: "calendar-sync".into(),
            after_cursor: Some(cursors[0] - 1),
            kinds: vec![pb::EventKind::Suspended as i32],
            integrations: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        next_event(&mut only, Duration::from_millis(300))
            .await
            .is_none()
    );
    drop(only);

    let head = *cursors.last().unwrap();
    let err = events.watch(watch_req(Some(head + 10))).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = events
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: head + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = events
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = events
        .watch(pb::WatchRequest {
            consumer: "calendar-sync".into(),
            kinds: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Another worker may not act as this consumer.
    let err = tv
        .events(As::EmailWorker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: head,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The position survived all of that.
    assert_eq!(
        tv.vault
            .store()
            .consumer_position("calendar-sync")
            .await
            .unwrap(),
        i64::try_from(cursors[1]).unwrap()
    );
}
both_backends!(
    positions_and_acks,
    positions_are_durable_and_acks_cumulative
);

async fn leases_are_recorded_without_the_token_and_release_early(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let token = "ya29.lease-record-token";
    let conn = seed_connection(&tv.vault, "t1", "a1", Integration::Calendar, token, None).await;
    let lease = tv
        .leases(As::Worker)
        .lease_token(calendar_lease(conn.id.as_str()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.access_token, token);
    let id: tokenvault::domain::LeaseId =
        tokenvault::domain::LeaseId::parse(&lease.lease_id).unwrap();
    let record = tv
        .vault
        .store()
        .lease_get(&id)
        .await
        .unwrap()
        .expect("lease row");
    assert_eq!(record.caller, As::Worker.identity());
    assert_eq!(record.connection_id, conn.id);
    // Purpose, scopes and the token's fingerprint are in the grant's entry,
    // which names the lease.
    let grants = tv
        .vault
        .store()
        .audit_query(
            &tokenvault::store::AuditFilter {
                action_prefix: Some("lease.grant".into()),
                target: Some(conn.id.to_string()),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
    let detail = &grants[0].draft.detail;
    assert!(
        detail.starts_with(&format!(
            "lease={id} purpose=calendar_sync scopes={CALENDAR_SCOPE} token="
        )),
        "{detail}"
    );
    assert!(!detail.contains(token), "{detail}");
    let until = lease.lease_expires_at.unwrap();
    assert!(until.seconds <= lease.token_expires_at.unwrap().seconds);
    assert!(until.seconds <= Timestamp::now().seconds_nanos().0 + 900 + 1);
    assert_eq!(
        tv.vault
            .store()
            .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), None)
            .await
            .unwrap(),
        1
    );
    if backend == Backend::Postgres {
        let raw = RawDb::open(&tv).await;
        let dump = raw.postgres_dump().await;
        assert!(!dump.contains(token), "the lease table holds no token");
        raw.close().await;
    }

    // Only the holder may release it.
    let err = tv
        .leases(As::EmailWorker)
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let first = tv
        .leases(As::Worker)
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.lease_id, lease.lease_id);
    let again = tv
        .leases(As::Worker)
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.ended_at, first.ended_at, "idempotent");
    assert_eq!(
        tv.vault
            .store()
            .lease_open_count(Timestamp::now(), Timestamp::from_micros(0), None)
            .await
            .unwrap(),
        0
    );
    let err = tv
        .leases(As::Worker)
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: tokenvault::domain::LeaseId::generate().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = tv
        .leases(As::Worker)
        .release_lease(pb::ReleaseLeaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
both_backends!(
    lease_records,
    leases_are_recorded_without_the_token_and_release_early
);

async fn watch_streams_end_with_unavailable_at_shutdown(backend: Backend) {
    // A long grace period: a Watch that held up shutdown would keep stop()
    // waiting for all of it, so a deadline of a third of it is both generous
    // and telling.
    let grace = Duration::from_secs(30);
    let Some(mut tv) = spawn_vault_with(backend, |c| {
        c.server.shutdown_grace_seconds = grace.as_secs();
    })
    .await
    else {
        return;
    };
    let mut stream = tv
        .events(As::Worker)
        .watch(watch_req(None))
        .await
        .unwrap()
        .into_inner();
    let limit = grace / 3;
    let started = Instant::now();
    let stopped = tokio::time::timeout(limit, tv.stop()).await;
    assert!(
        stopped.is_ok(),
        "an open Watch must not hold up shutdown: still stopping after {limit:?} \
         (grace period {grace:?})"
    );
    eprintln!("shutdown with an open Watch took {:?}", started.elapsed());
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(None) => {
            panic!("the stream ended cleanly; a worker would take that for the end of the log")
        }
        Ok(Some(e)) => panic!("unexpected event {e:?}"),
    }
}
both_backends!(
    watch_shutdown,
    watch_streams_end_with_unavailable_at_shutdown
);
