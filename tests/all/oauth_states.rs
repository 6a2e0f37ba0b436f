//! Pending OAuth states are bounded: at most `google.max_pending_states` per
//! (tenant, account, caller), the oldest evicted to make room, also under
//! concurrent begins; at most `google.max_states_per_caller_per_minute`
//! begins per caller, beyond which BeginAuthorization is refused with
//! RESOURCE_EXHAUSTED and stores nothing; and a state is deleted when used.

use tokenvault::google::sim::Consent;
use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, TestVault, deliver_callback, follow_authorization, spawn_vault_with_google,
};

fn begin_request(tenant: &str, account: &str) -> pb::BeginAuthorizationRequest {
    pb::BeginAuthorizationRequest {
        tenant_id: tenant.into(),
        account_id: account.into(),
        integration: pb::Integration::Calendar as i32,
        login_hint: None,
    }
}

/// Begins an authorization as the app; returns Google's URL.
async fn begin(tv: &TestVault, tenant: &str, account: &str) -> String {
    tv.connections(As::App)
        .begin_authorization(begin_request(tenant, account))
        .await
        .unwrap_or_else(|e| panic!("begin {tenant}/{account}: {e:?}"))
        .into_inner()
        .authorization_url
}

/// How many states the table holds for `tenant` (and `account`, if given).
async fn states(raw: &RawDb, tenant: &str, account: Option<&str>) -> i64 {
    let account = account
        .map(|a| format!(" AND account_id = '{a}'"))
        .unwrap_or_default();
    raw.scalar(&format!(
        "SELECT COUNT(*) FROM authorization_states WHERE tenant_id = '{tenant}'{account}"
    ))
    .await
}

async fn audit_entries(
    tv: &TestVault,
    action: &str,
    outcome: pb::AuditOutcome,
) -> Vec<pb::AuditEntry> {
    tv.admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest {
            action: Some(action.into()),
            outcome: Some(outcome as i32),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

async fn a_caller_holds_at_most_max_pending_states_per_account_and_the_newest_works(
    backend: Backend,
) {
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |c| {
        c.google.max_pending_states = 3;
    })
    .await
    else {
        return;
    };
    let raw = RawDb::open(&tv).await;

    // Another account's states, begun first (so they are the oldest).
    let bob = [
        begin(&tv, "capped", "bob").await,
        begin(&tv, "capped", "bob").await,
    ];
    let mut alice = Vec::new();
    for i in 0..10 {
        alice.push(begin(&tv, "capped", "alice").await);
        let held = states(&raw, "capped", Some("alice")).await;
        assert!(
            held <= 3,
            "after begin {i}: {held} pending states for one account"
        );
    }
    assert_eq!(states(&raw, "capped", Some("alice")).await, 3);
    assert_eq!(
        states(&raw, "capped", Some("bob")).await,
        2,
        "another account's states are untouched"
    );

    // The newest state completes; the oldest was evicted and is refused.
    let newest = follow_authorization(alice.last().unwrap()).await;
    let (status, body) = deliver_callback(&tv, &newest).await;
    assert_eq!(status, 200, "the newest state completes: {body}");
    let oldest = follow_authorization(&alice[0]).await;
    let (status, body) = deliver_callback(&tv, &oldest).await;
    assert_eq!(status, 400, "the evicted state is refused: {body}");
    // Bob's oldest state, older than all of Alice's, still completes.
    let bobs = follow_authorization(&bob[0]).await;
    let (status, body) = deliver_callback(&tv, &bobs).await;
    assert_eq!(status, 200, "another account's state completes: {body}");

    // Every eviction is audited: begins 4 to 10 each displaced one state.
    let evictions = audit_entries(&tv, "oauth.evict", pb::AuditOutcome::Success).await;
    assert_eq!(evictions.len(), 7, "{evictions:?}");
    for e in &evictions {
        assert_eq!(e.target, "capped/alice");
        assert_eq!(e.actor, As::App.identity());
        assert!(e.detail.contains("evicted=1"), "{}", e.detail);
    }

    // Concurrent begins for one account count each other's states (on
    // PostgreSQL they are serialised by a lock on the key).
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let mut app = tv.connections(As::App);
            tokio::spawn(async move {
                app.begin_authorization(begin_request("capped", "carol"))
                    .await
                    .map(|r| r.into_inner().authorization_url)
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("a concurrent begin");
    }
    assert_eq!(
        states(&raw, "capped", Some("carol")).await,
        3,
        "concurrent begins keep the cap"
    );
    raw.close().await;
}
both_backends!(
    pending_state_cap,
    a_caller_holds_at_most_max_pending_states_per_account_and_the_newest_works
);

async fn a_caller_beyond_its_rate_is_refused_with_resource_exhausted_and_stores_nothing(
    backend: Backend,
) {
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |c| {
        c.google.max_states_per_caller_per_minute = 5;
    })
    .await
    else {
        return;
    };
    let raw = RawDb::open(&tv).await;
    // Five begins within the minute pass (one start refills every 12 s).
    for i in 0..5 {
        begin(&tv, "rated", &format!("u{i}")).await;
    }
    assert_eq!(states(&raw, "rated", None).await, 5);

    let err = tv
        .connections(As::App)
        .begin_authorization(begin_request("rated", "u5"))
        .await
        .expect_err("the sixth begin within the minute");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "too many authorizations started by {}",
            As::App.identity()
        )) && err.message().contains("retry in"),
        "{}",
        err.message()
    );
    assert_eq!(
        states(&raw, "rated", None).await,
        5,
        "a refused begin stores no state"
    );

    let denied = audit_entries(&tv, "oauth.begin", pb::AuditOutcome::Denied).await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].target, "rated/u5");
    assert_eq!(denied[0].actor, As::App.identity());
    raw.close().await;
}
both_backends!(
    caller_rate,
    a_caller_beyond_its_rate_is_refused_with_resource_exhausted_and_stores_nothing
);

async fn a_used_state_is_deleted_whether_the_completion_succeeds_or_not(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let raw = RawDb::open(&tv).await;

    let url = begin(&tv, "used", "u1").await;
    assert_eq!(states(&raw, "used", None).await, 1);
    let redirect = follow_authorization(&url).await;
    let (status, body) = deliver_callback(&tv, &redirect).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        states(&raw, "used", None).await,
        0,
        "a completed state's row is gone"
    );
    let (status, _) = deliver_callback(&tv, &redirect).await;
    assert_eq!(status, 400, "and it cannot be used again");

    // A state spent on a refused completion (Google's access_denied) goes too.
    sim.set_consent(Consent::Deny);
    let redirect = follow_authorization(&begin(&tv, "used", "u2").await).await;
    assert_eq!(states(&raw, "used", None).await, 1);
    let (status, body) = deliver_callback(&tv, &redirect).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(states(&raw, "used", None).await, 0);
    raw.close().await;
}
both_backends!(
    used_state_deleted,
    a_used_state_is_deleted_whether_the_completion_succeeds_or_not
);
