//! Fail-closed, proven with failures the database raises itself: a trigger
//! refuses one kind of write on one table (as a full disk, a revoked
//! privilege or a violated constraint would), inside the vault's own
//! statement. For every step of a lease, a Disconnect, a DeleteAccount, a
//! refresh, an OAuth callback and a RISC event, the call fails with a generic
//! status and nothing it would have changed has changed: no token handed out,
//! no lease row, no audit entry for an operation that did not happen, the
//! chain head where it was, tokens still held, nothing revoked at Google.
//! Once the database accepts writes again the same call succeeds, so each
//! refusal was the trigger's doing and not a broken fixture.

use std::collections::BTreeMap;

use tokenvault::google::sim::GoogleSim;
use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::{RawDb, expire_stored_token};
use crate::support::{
    As, Backend, TestVault, calendar_lease, connect, post_risc, spawn_vault_with_google,
};

/// Tables that change on their own while a vault runs (replica heartbeats).
const BACKGROUND: &[&str] = &["key_replicas"];

/// The audit tables, compared separately: a refused operation may leave its
/// request entry (written, committed, before the operation began) but never
/// the entry of an outcome that did not happen.
const AUDIT: &[&str] = &["audit_log", "audit_head", "audit_checkpoints"];

/// The call failed the way a failed write must be reported: INTERNAL or
/// UNAVAILABLE, and without the database's own words.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    what: &str,
) {
    let status = match result {
        Ok(r) => panic!("{what}: succeeded although the database refused a write: {r:?}"),
        Err(s) => s,
    };
    assert!(
        matches!(status.code(), Code::Internal | Code::Unavailable),
        "{what}: {status:?}"
    );
    assert!(
        !status.message().contains("refused") && !status.message().contains("test:"),
        "{what}: the database's error reached the caller: {:?}",
        status.message()
    );
}

type Snapshot = BTreeMap<String, Vec<String>>;

/// Every table except the background and audit ones.
async fn state(raw: &RawDb) -> Snapshot {
    let skip: Vec<&str> = BACKGROUND.iter().chain(AUDIT).copied().collect();
    raw.snapshot(&skip).await
}

/// Names the tables whose rows differ, with the rows that differ.
fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
    let mut diffs = Vec::new();
    for table in before.keys().chain(after.keys()) {
        let (b, a) = (before.get(table), after.get(table));
        if b != a {
            let b = b.cloned().unwrap_or_default();
            let a = a.cloned().unwrap_or_default();
            let gone: Vec<_> = b.iter().filter(|r| !a.contains(r)).collect();
            let new: Vec<_> = a.iter().filter(|r| !b.contains(r)).collect();
            diffs.push(format!("{table}: removed {gone:?}, added {new:?}"));
        }
    }
    diffs.dedup();
    assert!(
        diffs.is_empty(),
        "{what} changed the database:\n{}",
        diffs.join("\n")
    );
}

/// The audit head's sequence number.
async fn head(raw: &RawDb) -> i64 {
    raw.scalar("SELECT seq FROM audit_head").await
}

/// The actions of the audit entries after `seq`.
async fn actions_after(raw: &RawDb, seq: i64) -> Vec<String> {
    let sql = format!("SELECT action FROM audit_log WHERE seq > {seq} ORDER BY seq");
    match raw {
        RawDb::Sqlite(p) => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(p)
                .await
        }
        RawDb::Postgres(p) => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(p)
                .await
        }
    }
    .unwrap()
}

/// One write the database refuses: `op` on `table`, for the rows matching
/// `when` (all when empty).
type Step = (&'static str, &'static str, &'static str);

/// Runs `call` while the database refuses `step`; asserts it failed, changed
/// no table, and added no audit entry other than one of `allowed`.
async fn refused_changes_nothing<T, F, Fut>(
    raw: &RawDb,
    (table, op, when): Step,
    allowed: &[&str],
    call: F,
) where
    T: std::fmt::Debug,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let what = format!("with {op} on {table} refused {when}");
    let before = state(raw).await;
    let seq = head(raw).await;
    raw.refuse_when(table, op, when).await;
    let result = call().await;
    raw.allow(table, op).await;
    assert_refused(result, &what);
    assert_same(&before, &state(raw).await, &what);
    let added = actions_after(raw, seq).await;
    assert!(
        added.iter().all(|a| allowed.contains(&a.as_str())),
        "{what}: audit entries {added:?} for an operation that did not happen"
    );
    assert_eq!(
        head(raw).await,
        seq + added.len() as i64,
        "{what}: the chain head moved without its entries"
    );
}

async fn setup(
    backend: Backend,
    adjust: impl FnOnce(&mut tokenvault::config::Config),
) -> Option<(TestVault, GoogleSim, RawDb)> {
    let (tv, sim) = spawn_vault_with_google(backend, adjust).await?;
    let raw = RawDb::open(&tv).await;
    Some((tv, sim, raw))
}

async fn a_lease_whose_record_the_database_refuses_is_not_granted(backend: Backend) {
    let Some((tv, _sim, raw)) = setup(backend, |_| {}).await else {
        return;
    };
    let id = connect(&tv, "t1", "u1", pb::Integration::Calendar)
        .await
        .connection_id;
    // The first lease puts the connection in the replica's cache: the
    // refused ones below take the hot path.
    let mut leases = tv.leases(As::Worker);
    leases
        .lease_token(calendar_lease(&id))
        .await
        .expect("lease");
    // A granted lease's record is its grant's audit entry (a row of
    // `leases`), written with the head's move.
    for step in [("audit_head", "UPDATE", ""), ("leases", "INSERT", "")] {
        refused_changes_nothing(&raw, step, &[], || leases.lease_token(calendar_lease(&id))).await;
    }
    leases
        .lease_token(calendar_lease(&id))
        .await
        .expect("a lease once the database accepts writes");
    assert_eq!(raw.scalar("SELECT COUNT(*) FROM leases").await, 2);
    assert_eq!(raw.scalar("SELECT COUNT(*) FROM lease_entries").await, 2);
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'lease.grant'")
            .await,
        0,
        "no grant entry besides the two leases' own"
    );
}
both_backends!(
    lease_refused,
    a_lease_whose_record_the_database_refuses_is_not_granted
);

/// Every write a deletion makes, in its one transaction: the last is its
/// `deletion.done` audit entry (the request entry before it is written first,
/// on its own).
const DELETION_STEPS: [Step; 11] = [
    ("connection_secrets", "DELETE", ""),
    ("connection_deks", "DELETE", ""),
    ("connections", "UPDATE", ""),
    ("connections", "UPDATE", "NEW.leases_revoked_at IS NOT NULL"),
    ("events", "INSERT", ""),
    ("deletion_receipts", "INSERT", ""),
    ("receipt_connections", "INSERT", ""),
    ("receipt_acks", "INSERT", ""),
    ("revocation_outbox", "INSERT", ""),
    ("audit_log", "INSERT", ""),
    ("audit_log", "INSERT", "NEW.action = 'deletion.done'"),
];

async fn a_deletion_that_fails_half_way_changes_nothing(backend: Backend) {
    // A consumer must acknowledge calendar deletions, so receipts have acks.
    let Some((tv, sim, raw)) = setup(backend, |c| {
        c.deletion
            .required_consumers
            .insert("calendar".into(), vec!["calendar-sync".into()]);
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar)
        .await
        .connection_id;
    connect(&tv, "t1", "u1", pb::Integration::Email).await;
    let mut leases = tv.leases(As::Worker);
    leases
        .lease_token(calendar_lease(&cal))
        .await
        .expect("lease");
    let mut app = tv.connections(As::App);
    for step in DELETION_STEPS {
        // The email connection still holds the Google grant: disconnecting
        // the calendar alone revokes nothing and writes no outbox row.
        if step.0 != "revocation_outbox" {
            refused_changes_nothing(&raw, step, &["deletion.request"], || {
                app.disconnect(pb::DisconnectRequest {
                    connection_id: cal.clone(),
                    reason: "user clicked disconnect".into(),
                })
            })
            .await;
        }
        refused_changes_nothing(&raw, step, &["deletion.request"], || {
            app.delete_account(pb::DeleteAccountRequest {
                tenant_id: "t1".into(),
                account_id: "u1".into(),
                reason: "account closed".into(),
            })
        })
        .await;
    }
    assert_eq!(
        sim.revocations(),
        0,
        "Google was told about a deletion that did not happen"
    );
    // The same lease still works: the tokens were never touched.
    leases
        .lease_token(calendar_lease(&cal))
        .await
        .expect("a lease after the failed deletions");
    // And with writes accepted the deletion goes through.
    let receipt = app
        .delete_account(pb::DeleteAccountRequest {
            tenant_id: "t1".into(),
            account_id: "u1".into(),
            reason: "account closed".into(),
        })
        .await
        .expect("delete account")
        .into_inner()
        .receipt
        .unwrap();
    assert!(!receipt.receipt_id.is_empty());
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM connection_secrets").await,
        0
    );
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'deletion.done'")
            .await,
        1
    );
}
both_backends!(
    deletion_refused,
    a_deletion_that_fails_half_way_changes_nothing
);

async fn a_refresh_whose_write_the_database_refuses_keeps_the_old_tokens(backend: Backend) {
    let Some((tv, sim, raw)) = setup(backend, |_| {}).await else {
        return;
    };
    let id = connect(&tv, "t1", "u1", pb::Integration::Calendar)
        .await
        .connection_id;
    expire_stored_token(&tv, &id).await;
    let stored = raw.secret_row(&id).await.expect("tokens held");
    let mut leases = tv.leases(As::Worker);
    // A failed refresh may note its error in the connection's refresh health
    // and audit the refused lease; it may not change the tokens, grant a
    // lease or record one. With the lease's audit entry (its row of
    // `leases`) refused, the refresh itself succeeds and Google's new token
    // is kept (a refresh is not audited); only the lease, which must be, is
    // refused.
    for (table, op) in [
        ("connection_secrets", "UPDATE"),
        ("connections", "UPDATE"),
        ("leases", "INSERT"),
    ] {
        let what = format!("refresh with {op} on {table} refused");
        let refreshes = sim.refresh_calls();
        let seq = head(&raw).await;
        raw.refuse(table, op).await;
        let result = leases.lease_token(calendar_lease(&id)).await;
        raw.allow(table, op).await;
        assert_refused(result, &what);
        assert!(
            sim.refresh_calls() > refreshes,
            "{what}: the refused write came after a real refresh at Google"
        );
        if table != "leases" {
            assert_eq!(raw.secret_row(&id).await.as_ref(), Some(&stored), "{what}");
        }
        assert_eq!(raw.scalar("SELECT COUNT(*) FROM leases").await, 0, "{what}");
        // The refusal itself is audited (when the audit log can be written).
        let added = actions_after(&raw, seq).await;
        assert!(added.iter().all(|a| a == "lease.deny"), "{what}: {added:?}");
    }
    let lease = leases
        .lease_token(calendar_lease(&id))
        .await
        .expect("a lease once the database accepts writes")
        .into_inner();
    assert_eq!(
        Some(lease.access_token),
        sim.current_access_token("sim-user-1", crate::support::CLIENT_ID),
        "the lease hands out the token of the last refresh"
    );
}
both_backends!(
    refresh_refused,
    a_refresh_whose_write_the_database_refuses_keeps_the_old_tokens
);

async fn a_callback_whose_write_the_database_refuses_connects_nothing(backend: Backend) {
    let Some((tv, _sim, raw)) = setup(backend, |_| {}).await else {
        return;
    };
    for (table, op) in [
        ("connections", "INSERT"),
        ("connection_deks", "INSERT"),
        ("connection_secrets", "INSERT"),
        ("audit_log", "INSERT"),
    ] {
        let url = tv
            .connections(As::App)
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "t1".into(),
                account_id: "u1".into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: None,
            })
            .await
            .expect("begin")
            .into_inner()
            .authorization_url;
        let query = crate::support::follow_authorization(&url).await;
        raw.refuse(table, op).await;
        let (status, body) = crate::support::deliver_callback(&tv, &query).await;
        raw.allow(table, op).await;
        assert!(
            status >= 500,
            "callback with {op} on {table} refused answered {status}: {body}"
        );
        assert!(
            !body.contains("test:"),
            "the database's error reached the browser: {body}"
        );
        for t in ["connections", "connection_deks", "connection_secrets"] {
            assert_eq!(
                raw.scalar(&format!("SELECT COUNT(*) FROM {t}")).await,
                0,
                "callback with {op} on {table} refused left rows in {t}"
            );
        }
    }
    let conn = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    assert_eq!(conn.status, pb::ConnectionStatus::Active as i32);
}
both_backends!(
    callback_refused,
    a_callback_whose_write_the_database_refuses_connects_nothing
);

async fn a_risc_event_whose_write_the_database_refuses_is_redelivered(backend: Backend) {
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
    let raw = RawDb::open(&tv).await;
    let id = connect(&tv, "t1", "u1", pb::Integration::Calendar)
        .await
        .connection_id;
    let revoked = sim.sign_risc_event(
        crate::support::CLIENT_ID,
        "tokens-revoked",
        "sim-user-1",
        serde_json::json!({}),
    );
    for (table, op) in [
        ("audit_log", "INSERT"),
        ("connection_secrets", "DELETE"),
        ("risc_seen", "INSERT"),
    ] {
        let before = state(&raw).await;
        raw.refuse(table, op).await;
        let (status, _) = post_risc(&tv, &revoked).await;
        raw.allow(table, op).await;
        assert_eq!(
            status, 503,
            "{op} on {table} refused: Google must deliver again"
        );
        if table != "risc_seen" {
            assert_same(
                &before,
                &state(&raw).await,
                &format!("RISC with {op} on {table} refused"),
            );
        }
    }
    // The deletion itself committed before `risc_seen` was refused; the
    // redelivery finds it done and is accepted.
    assert_eq!(
        post_risc(&tv, &revoked).await.0,
        202,
        "the redelivered event is accepted"
    );
    assert_eq!(post_risc(&tv, &revoked).await.0, 400, "and then spent");
    let status = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest { connection_id: id })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap()
        .status;
    assert_eq!(status, pb::ConnectionStatus::RevokedUpstream as i32);
    assert_eq!(
        raw.scalar("SELECT COUNT(*) FROM connection_secrets").await,
        0
    );
}
both_backends!(
    risc_refused,
    a_risc_event_whose_write_the_database_refuses_is_redelivered
);
