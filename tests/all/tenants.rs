//! Tenant limits as a worker limited to some tenants meets them: its Watch
//! carries only its tenants' events (and it still acks past the others and
//! resumes), and a connection id of another tenant answers it exactly as an
//! id that does not exist — same code, same message, same audit entry.

use std::time::Duration;

use tokenvault::domain::{ConnectionId, Integration};
use tokenvault::proto::v1 as pb;
use tokenvault::store::{AuditFilter, AuditRow, ConnectionRecord};
use tonic::{Code, Status};

use crate::both_backends;
use crate::support::next_event;
use crate::support::{
    As, Backend, TestVault, calendar_lease, disconnect, seed_connection, spawn_vault_with,
};

const MINE: &str = "tenant-a";
const FOREIGN: &str = "tenant-b";

/// A vault where `As::Worker` (purpose `calendar_sync`, consumer
/// `calendar-sync`) is limited to tenant A; `As::EmailWorker` keeps no limit.
/// Deletion receipts wait for `calendar-sync` only when `receipts_wait` is
/// set (otherwise for a consumer nobody here acts as).
async fn spawn_limited_with(backend: Backend, receipts_wait: bool) -> Option<TestVault> {
    spawn_vault_with(backend, move |c| {
        c.policy
            .purposes
            .get_mut("calendar_sync")
            .expect("the test policy defines calendar_sync")
            .tenants = vec![MINE.into()];
        if !receipts_wait {
            c.deletion
                .required_consumers
                .insert("calendar".into(), vec!["calendar-purger".into()]);
        }
    })
    .await
}

async fn spawn_limited(backend: Backend) -> Option<TestVault> {
    spawn_limited_with(backend, false).await
}

/// A watch of the deletions (each disconnect also logs the connection's
/// LEASE_REVOKED, which carries the same tenant).
fn watch(consumer: &str, after: Option<u64>) -> pb::WatchRequest {
    pb::WatchRequest {
        consumer: consumer.into(),
        after_cursor: after,
        kinds: vec![pb::EventKind::ConnectionDeleted as i32],
        ..Default::default()
    }
}

/// The next `n` events, failing if they do not come within a few seconds each.
async fn take(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    n: usize,
    what: &str,
) -> Vec<pb::WatchResponse> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_event(stream, Duration::from_secs(5)).await {
            Some(e) => got.push(e),
            None => panic!("{what}: {} of {n} events arrived: {got:?}", got.len()),
        }
    }
    got
}

/// Asserts the stream stays quiet (nothing more is sent to it for now).
async fn quiet(stream: &mut tonic::Streaming<pb::WatchResponse>, what: &str) {
    if let Some(e) = next_event(stream, Duration::from_millis(600)).await {
        panic!("{what}: unexpected event {e:?}");
    }
}

/// A calendar connection of `tenant`.
async fn calendar(tv: &TestVault, tenant: &str, account: &str) -> ConnectionRecord {
    seed_connection(
        &tv.vault,
        tenant,
        account,
        Integration::Calendar,
        "ya29.t",
        None,
    )
    .await
}

async fn ack(tv: &TestVault, cursor: u64) -> u64 {
    tv.events(As::Worker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor,
        })
        .await
        .unwrap_or_else(|e| panic!("ack {cursor}: {e:?}"))
        .into_inner()
        .position
}

async fn a_tenant_limited_watch_carries_only_its_tenants_events_and_acks_past_the_others(
    backend: Backend,
) {
    let Some(tv) = spawn_limited(backend).await else {
        return;
    };
    let a1 = calendar(&tv, MINE, "a1").await;
    let b1 = calendar(&tv, FOREIGN, "b1").await;
    let b2 = calendar(&tv, FOREIGN, "b2").await;
    let a2 = calendar(&tv, MINE, "a2").await;
    let b3 = calendar(&tv, FOREIGN, "b3").await;
    let a3 = calendar(&tv, MINE, "a3").await;

    let mut limited = tv
        .events(As::Worker)
        .watch(watch("calendar-sync", None))
        .await
        .unwrap()
        .into_inner();
    // The control: a worker without a tenant limit is sent every tenant's events.
    let mut everything = tv
        .events(As::EmailWorker)
        .watch(watch("email-sync", None))
        .await
        .unwrap()
        .into_inner();

    for c in [&a1, &b1, &b2, &a2] {
        disconnect(&tv, c.id.as_str()).await;
    }
    let all = take(&mut everything, 4, "unlimited watcher").await;
    let all_ids: Vec<&str> = all.iter().map(|e| e.connection_id.as_str()).collect();
    assert_eq!(
        all_ids,
        [
            a1.id.as_str(),
            b1.id.as_str(),
            b2.id.as_str(),
            a2.id.as_str()
        ],
        "the unlimited watcher sees both tenants' deletions, in order"
    );
    let foreign_cursors: Vec<u64> = all
        .iter()
        .filter(|e| e.tenant_id == FOREIGN)
        .map(|e| e.cursor)
        .collect();
    assert_eq!(foreign_cursors.len(), 2);

    let mine = take(&mut limited, 2, "limited watcher").await;
    for e in &mine {
        assert_eq!(e.tenant_id, MINE, "{e:?}");
        assert_eq!(e.kind, pb::EventKind::ConnectionDeleted as i32, "{e:?}");
    }
    assert_eq!(mine[0].connection_id, a1.id.as_str());
    assert_eq!(mine[1].connection_id, a2.id.as_str());
    quiet(&mut limited, "limited watcher after A's two deletions").await;
    let (c1, c2) = (mine[0].cursor, mine[1].cursor);
    assert!(
        foreign_cursors.iter().all(|b| c1 < *b && *b < c2),
        "B's events lie between A's: {c1} {foreign_cursors:?} {c2}"
    );

    // Ack the first, resume from the stored position: only A's second event
    // comes back; B's, in between, are skipped again.
    assert_eq!(ack(&tv, c1).await, c1);
    drop(limited);
    let mut resumed = tv
        .events(As::Worker)
        .watch(watch("calendar-sync", None))
        .await
        .unwrap()
        .into_inner();
    let again = take(&mut resumed, 1, "resumed from the stored position").await;
    assert_eq!(again[0].cursor, c2);
    assert_eq!(again[0].connection_id, a2.id.as_str());
    quiet(&mut resumed, "resumed watcher").await;

    // The ack of A's second cursor moves the position past B's cursors.
    assert_eq!(ack(&tv, c2).await, c2);
    assert!(foreign_cursors.iter().all(|b| *b < c2));
    drop(resumed);

    // A new B event, then a new A one: resuming past c2, only A's arrives.
    let mut resumed = tv
        .events(As::Worker)
        .watch(watch("calendar-sync", None))
        .await
        .unwrap()
        .into_inner();
    disconnect(&tv, b3.id.as_str()).await;
    disconnect(&tv, a3.id.as_str()).await;
    let later = take(&mut everything, 2, "unlimited watcher, later").await;
    assert_eq!(later[0].connection_id, b3.id.as_str());
    let got = take(&mut resumed, 1, "resumed watcher, later").await;
    assert_eq!(got[0].connection_id, a3.id.as_str());
    assert_eq!(got[0].tenant_id, MINE);
    assert!(got[0].cursor > later[0].cursor);
    quiet(&mut resumed, "resumed watcher, later").await;
    assert_eq!(ack(&tv, got[0].cursor).await, got[0].cursor);

    // A replay after A's first event (an explicit after_cursor) skips B's
    // too, old and new.
    drop(resumed);
    let mut replay = tv
        .events(As::Worker)
        .watch(watch("calendar-sync", Some(c1)))
        .await
        .unwrap()
        .into_inner();
    let replayed = take(&mut replay, 2, "replay").await;
    let ids: Vec<&str> = replayed.iter().map(|e| e.connection_id.as_str()).collect();
    assert_eq!(ids, [a2.id.as_str(), a3.id.as_str()]);
    quiet(&mut replay, "replay").await;
}
/// A tenant-limited worker may watch a consumer that deletion receipts wait
/// for, but not acknowledge as it: its ack would cover other tenants' events
/// it was never sent, and their receipts would record a purge that did not
/// happen. The refusal is audited and moves nothing.
async fn a_tenant_limited_worker_cannot_ack_for_a_consumer_receipts_wait_for(backend: Backend) {
    let Some(tv) = spawn_limited_with(backend, true).await else {
        return;
    };
    let b = calendar(&tv, FOREIGN, "b1").await;
    disconnect(&tv, b.id.as_str()).await;
    let head_before = tv.vault.store().audit_head().await.unwrap().0;
    let err = tv
        .events(As::Worker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: 1,
        })
        .await
        .expect_err("a tenant-limited ack for a required consumer is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("calendar-sync")
            && err.message().contains("limited to some tenants"),
        "{err:?}"
    );
    assert_eq!(
        tv.vault
            .store()
            .consumer_position("calendar-sync")
            .await
            .unwrap(),
        0,
        "the refused ack moved nothing"
    );
    let denials = tv
        .vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some("authz.deny".into()),
                after_seq: Some(head_before),
                ..Default::default()
            },
            10,
        )
        .await
        .unwrap();
    assert!(
        denials
            .iter()
            .any(|r| r.draft.target == "EventService.Ack"
                && r.draft.detail.contains("calendar-sync")),
        "the refusal is audited: {denials:?}"
    );
}

both_backends!(
    tenant_limited_ack_for_required_consumer,
    a_tenant_limited_worker_cannot_ack_for_a_consumer_receipts_wait_for
);

both_backends!(
    tenant_filtered_watch,
    a_tenant_limited_watch_carries_only_its_tenants_events_and_acks_past_the_others
);

/// The caller's view of an answer, with the id it asked about replaced.
fn shape(answer: Result<(), Status>, id: &str) -> (Code, String) {
    let status = answer.expect_err("a connection id the caller may not see is refused");
    (status.code(), status.message().replace(id, "<id>"))
}

/// Every RPC that takes a connection id, called by the limited worker.
async fn ask_everything(tv: &TestVault, id: &str) -> Vec<(&'static str, (Code, String))> {
    let get = || pb::GetConnectionRequest {
        connection_id: id.into(),
    };
    vec![
        (
            "LeaseService.LeaseToken",
            shape(
                tv.leases(As::Worker)
                    .lease_token(calendar_lease(id))
                    .await
                    .map(drop),
                id,
            ),
        ),
        (
            "ConnectionService.GetConnection",
            shape(
                tv.connections(As::Worker)
                    .get_connection(get())
                    .await
                    .map(drop),
                id,
            ),
        ),
        (
            "ConnectionService.Disconnect",
            shape(
                tv.connections(As::Worker)
                    .disconnect(pb::DisconnectRequest {
                        connection_id: id.into(),
                        reason: String::new(),
                    })
                    .await
                    .map(drop),
                id,
            ),
        ),
        (
            "AdminService.GetConnection",
            shape(
                tv.admin(As::Worker)
                    .get_connection(pb::AdminServiceGetConnectionRequest {
                        connection_id: id.into(),
                    })
                    .await
                    .map(drop),
                id,
            ),
        ),
        (
            "AdminService.RevokeConnection",
            shape(
                tv.admin(As::Worker)
                    .revoke_connection(pb::RevokeConnectionRequest {
                        connection_id: id.into(),
                        reason: String::new(),
                    })
                    .await
                    .map(drop),
                id,
            ),
        ),
    ]
}

/// The one `lease.deny` entry about `id`.
async fn lease_denial(tv: &TestVault, id: &str) -> AuditRow {
    let (rows, _) = tv
        .vault
        .audit_query(
            &AuditFilter {
                action_prefix: Some("lease.deny".into()),
                target: Some(id.to_owned()),
                ..Default::default()
            },
            10,
        )
        .await
        .expect("query the audit log");
    assert_eq!(rows.len(), 1, "one lease.deny entry for {id}: {rows:?}");
    rows.into_iter().next().expect("one row")
}

async fn a_foreign_connection_id_answers_exactly_like_a_missing_one(backend: Backend) {
    let Some(tv) = spawn_limited(backend).await else {
        return;
    };
    let own = seed_connection(&tv.vault, MINE, "a1", Integration::Calendar, "ya29.a", None).await;
    // Of tenant B: an ACTIVE calendar connection (leasable but for its
    // tenant), an EMAIL one (which the purpose would refuse for its
    // integration) and a DELETED one (refused for its status): each of those
    // other answers would tell the caller it exists.
    let active = seed_connection(
        &tv.vault,
        FOREIGN,
        "b1",
        Integration::Calendar,
        "ya29.b",
        None,
    )
    .await;
    let email = seed_connection(&tv.vault, FOREIGN, "b2", Integration::Email, "ya29.c", None).await;
    let deleted = seed_connection(
        &tv.vault,
        FOREIGN,
        "b3",
        Integration::Calendar,
        "ya29.d",
        None,
    )
    .await;
    disconnect(&tv, deleted.id.as_str()).await;

    // The limit is not a blanket refusal: its own tenant's connection leases.
    tv.leases(As::Worker)
        .lease_token(calendar_lease(own.id.as_str()))
        .await
        .expect("the limited worker leases a connection of its own tenant");

    let missing = ConnectionId::generate();
    let missing = missing.as_str();
    let want = ask_everything(&tv, missing).await;
    let (code, message) = &want[0].1;
    assert_eq!(*code, Code::NotFound, "LeaseToken of a missing id");
    assert_eq!(message, "connection <id> not found");

    for (what, foreign) in [
        ("active calendar", &active),
        ("email", &email),
        ("deleted", &deleted),
    ] {
        let id = foreign.id.as_str();
        let got = ask_everything(&tv, id).await;
        for ((rpc, missing_answer), (_, foreign_answer)) in want.iter().zip(&got) {
            assert_eq!(
                foreign_answer, missing_answer,
                "{rpc}: tenant B's {what} connection {id} answered unlike a missing id"
            );
        }

        // The audit log records both alike — same action, same outcome, the
        // same detail but for the id — and tells reviewers (only) which id
        // was another tenant's.
        let missing_entry = lease_denial(&tv, missing).await;
        let foreign_entry = lease_denial(&tv, id).await;
        assert_eq!(foreign_entry.draft.action, missing_entry.draft.action);
        assert_eq!(foreign_entry.draft.outcome, missing_entry.draft.outcome);
        assert_eq!(missing_entry.draft.outcome, "denied");
        let missing_detail = missing_entry.draft.detail.replace(missing, "<id>");
        let foreign_detail = foreign_entry.draft.detail.replace(id, "<id>");
        assert!(
            missing_detail.contains("reason=not_found: connection <id> not found"),
            "{missing_detail}"
        );
        let note = foreign_detail.strip_prefix(&missing_detail).unwrap_or_else(|| {
            panic!("foreign entry {foreign_detail:?} does not begin as the missing one {missing_detail:?}")
        });
        assert!(note.contains(FOREIGN), "reviewers see the tenant: {note:?}");
        assert!(!missing_detail.contains(FOREIGN), "{missing_detail}");
    }

    // No lease was recorded on any of tenant B's connections.
    for foreign in [&active, &email, &deleted] {
        let (rows, _) = tv
            .vault
            .audit_query(
                &AuditFilter {
                    action_prefix: Some("lease.grant".into()),
                    target: Some(foreign.id.to_string()),
                    ..Default::default()
                },
                10,
            )
            .await
            .expect("query the audit log");
        assert!(rows.is_empty(), "{rows:?}");
    }
}
both_backends!(
    foreign_connection_ids,
    a_foreign_connection_id_answers_exactly_like_a_missing_one
);
