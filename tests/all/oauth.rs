//! The Google OAuth flows against the simulator over real HTTP: connecting,
//! refusing bad callbacks, partial consent, refresh single-flight across
//! processes, invalid_grant and an unreachable Google.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenvault::google::sim::{Consent, Endpoint, Fault};
use tokenvault::proto::v1 as pb;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::{RawDb, expire_stored_token};
use crate::support::{
    As, Backend, CALENDAR_SCOPE, GMAIL_SCOPE, TestVault, connect, deliver_callback,
    follow_authorization, query_param, spawn_vault_with_google,
};

fn lease_request(connection_id: &str, scope: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.into(),
        purpose: "calendar_sync".into(),
        scopes: vec![scope.into()],
        min_valid_seconds: 60,
    }
}

async fn count_connections(tv: &TestVault, tenant: &str) -> usize {
    tv.connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: tenant.into(),
            include_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections
        .len()
}

async fn begin(tv: &TestVault, tenant: &str, account: &str) -> String {
    tv.connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: tenant.into(),
            account_id: account.into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: None,
        })
        .await
        .unwrap()
        .into_inner()
        .authorization_url
}

async fn connecting_stores_an_active_connection_whose_lease_is_googles_token(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let url = begin(&tv, "acme", "alice").await;
    let (_, query) = url.split_once('?').unwrap();
    for (k, v) in [
        ("response_type", "code"),
        ("client_id", crate::support::CLIENT_ID),
        ("redirect_uri", crate::support::REDIRECT_URI),
        ("access_type", "offline"),
        ("code_challenge_method", "S256"),
        ("prompt", "consent"),
    ] {
        assert_eq!(query_param(query, k).as_deref(), Some(v), "{k} in {url}");
    }
    let scope = query_param(query, "scope").unwrap();
    let scopes: Vec<&str> = scope.split(' ').collect();
    assert!(
        scopes.contains(&"openid") && scopes.contains(&"email") && scopes.contains(&CALENDAR_SCOPE),
        "{scope}"
    );
    assert!(!scopes.contains(&GMAIL_SCOPE), "one grant per integration");
    assert!(query_param(query, "include_granted_scopes").is_none());
    assert!(
        query_param(query, "state").unwrap().len() >= 22,
        "state carries at least 128 bits"
    );

    let redirect = follow_authorization(&url).await;
    let (status, body) = deliver_callback(&tv, &redirect).await;
    assert_eq!(status, 200, "{body}");
    let list = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(list.len(), 1);
    let c = &list[0];
    assert_eq!(c.status, pb::ConnectionStatus::Active as i32);
    assert_eq!(c.google_subject, "sim-user-1");
    assert_eq!(c.google_email, "user1@sim.test");
    assert!(
        c.granted_scopes.iter().any(|s| s == CALENDAR_SCOPE),
        "{:?}",
        c.granted_scopes
    );

    let lease = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, CALENDAR_SCOPE))
        .await
        .unwrap()
        .into_inner();
    let current = sim
        .current_access_token("sim-user-1", crate::support::CLIENT_ID)
        .expect("sim issued a token");
    assert_eq!(lease.access_token, current);
    assert!(lease.lease_expires_at.unwrap().seconds <= lease.token_expires_at.unwrap().seconds);

    // The same Google account connecting again keeps the connection id; a
    // second begin no longer asks for consent (the vault holds a refresh token).
    let again_url = begin(&tv, "acme", "alice").await;
    assert!(
        query_param(again_url.split_once('?').unwrap().1, "prompt").is_none(),
        "{again_url}"
    );
    let again = connect(&tv, "acme", "alice", pb::Integration::Calendar).await;
    assert_eq!(again.connection_id, c.connection_id);
    let lease = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, CALENDAR_SCOPE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lease.access_token,
        sim.current_access_token("sim-user-1", crate::support::CLIENT_ID)
            .unwrap()
    );
}
both_backends!(
    connect_and_lease,
    connecting_stores_an_active_connection_whose_lease_is_googles_token
);

async fn bad_callbacks_are_refused_store_nothing_and_are_audited(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let mut app = tv.connections(As::App);

    // Unknown state.
    let (status, _) = deliver_callback(&tv, "state=not-a-state-we-issued&code=abc").await;
    assert_eq!(status, 400);

    // Replayed state: the first use works (and deletes the state), the
    // second is refused as an unknown state.
    let url = begin(&tv, "replay", "u1").await;
    let redirect = follow_authorization(&url).await;
    assert_eq!(deliver_callback(&tv, &redirect).await.0, 200);
    assert_eq!(deliver_callback(&tv, &redirect).await.0, 400);
    assert_eq!(count_connections(&tv, "replay").await, 1);

    // Missing code.
    let url = begin(&tv, "nocode", "u1").await;
    let redirect = follow_authorization(&url).await;
    let state = query_param(&redirect, "state").unwrap();
    assert_eq!(
        deliver_callback(&tv, &format!("state={state}")).await.0,
        400
    );

    // Another tenant's state, through CompleteAuthorization.
    let url = begin(&tv, "tenant-a", "u1").await;
    let redirect = follow_authorization(&url).await;
    let err = app
        .complete_authorization(pb::CompleteAuthorizationRequest {
            state: query_param(&redirect, "state").unwrap(),
            tenant_id: "tenant-b".into(),
            account_id: "u1".into(),
            outcome: Some(pb::complete_authorization_request::Outcome::Code(
                query_param(&redirect, "code").unwrap(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        !err.message()
            .contains(&query_param(&redirect, "code").unwrap())
    );

    // Expired state.
    let url = begin(&tv, "expired", "u1").await;
    let redirect = follow_authorization(&url).await;
    let raw = RawDb::open(&tv).await;
    raw.execute("UPDATE authorization_states SET expires_at = 0 WHERE tenant_id = 'expired'")
        .await;
    assert_eq!(deliver_callback(&tv, &redirect).await.0, 400);

    // A tampered code: Google answers invalid_grant.
    let url = begin(&tv, "tampered", "u1").await;
    let redirect = follow_authorization(&url).await;
    let code = query_param(&redirect, "code").unwrap();
    let state = query_param(&redirect, "state").unwrap();
    assert_eq!(
        deliver_callback(&tv, &format!("state={state}&code={code}x"))
            .await
            .0,
        400
    );

    // A wrong PKCE verifier: the code of one authorization with the state
    // (and so the verifier) of another.
    let first = follow_authorization(&begin(&tv, "pkce", "u1").await).await;
    let second = follow_authorization(&begin(&tv, "pkce", "u1").await).await;
    let mixed = format!(
        "state={}&code={}",
        query_param(&second, "state").unwrap(),
        query_param(&first, "code").unwrap()
    );
    assert_eq!(deliver_callback(&tv, &mixed).await.0, 400);

    // Google's access_denied.
    sim.set_consent(Consent::Deny);
    let redirect = follow_authorization(&begin(&tv, "denied", "u1").await).await;
    assert_eq!(
        query_param(&redirect, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(deliver_callback(&tv, &redirect).await.0, 400);

    for tenant in [
        "nocode", "tenant-a", "tenant-b", "expired", "tampered", "pkce", "denied",
    ] {
        assert_eq!(
            count_connections(&tv, tenant).await,
            0,
            "{tenant}: nothing stored"
        );
    }
    let failures = tv
        .admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest {
            action: Some("oauth.complete".into()),
            outcome: Some(pb::AuditOutcome::Failure as i32),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let details: Vec<&str> = failures.iter().map(|e| e.detail.as_str()).collect();
    // A used state is deleted, so the replay is audited as an unknown state,
    // like the state that was never issued: two entries.
    assert!(
        details
            .iter()
            .filter(|d| d.contains("unknown state"))
            .count()
            >= 2,
        "the replay is not audited: {details:?}"
    );
    for want in [
        "unknown state",
        "missing code",
        "another caller",
        "state expired",
        "invalid_grant",
        "google error access_denied",
    ] {
        assert!(
            details.iter().any(|d| d.contains(want)),
            "{want} not audited: {details:?}"
        );
    }
    raw.close().await;
}
both_backends!(
    bad_callbacks,
    bad_callbacks_are_refused_store_nothing_and_are_audited
);

async fn a_partial_grant_records_only_granted_scopes(backend: Backend) {
    let readonly = "https://www.googleapis.com/auth/calendar.readonly";
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.google.calendar_scopes = vec![CALENDAR_SCOPE.into(), readonly.into()];
    })
    .await
    else {
        return;
    };
    sim.set_consent(Consent::Partial(vec![readonly.into()]));
    let c = connect(&tv, "partial", "u1", pb::Integration::Calendar).await;
    assert_eq!(c.status, pb::ConnectionStatus::InsufficientScope as i32);
    assert!(c.granted_scopes.iter().any(|s| s == CALENDAR_SCOPE));
    assert!(
        !c.granted_scopes.iter().any(|s| s == readonly),
        "{:?}",
        c.granted_scopes
    );
    let err = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, readonly))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
both_backends!(partial_grant, a_partial_grant_records_only_granted_scopes);

async fn invalid_grant_on_refresh_revokes_the_connection_and_destroys_its_tokens(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let c = connect(&tv, "revoked", "u1", pb::Integration::Calendar).await;
    sim.revoke_grant_silently("sim-user-1");
    expire_stored_token(&tv, &c.connection_id).await;
    let err = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, CALENDAR_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let now = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: c.connection_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap();
    // The same cascade as a disconnect, with the reason recorded and nothing
    // to revoke at Google (the user already did).
    assert_eq!(now.status, pb::ConnectionStatus::RevokedUpstream as i32);
    assert_eq!(now.google_email, "", "tombstone keeps no email");
    assert_eq!(sim.revocations(), 0);
    let events = tv.vault.store().events_after(0, 100).await.unwrap();
    let deleted = events
        .iter()
        .find(|e| e.event.kind == tokenvault::domain::EventKind::ConnectionDeleted)
        .expect("a CONNECTION_DELETED event");
    assert_eq!(
        deleted.event.reason,
        Some(tokenvault::domain::DeletionReason::UserRevokedAtGoogle)
    );
    let receipt = tv
        .connections(As::App)
        .get_deletion_receipt(pb::GetDeletionReceiptRequest {
            receipt_id: deleted.event.receipt_id.clone().unwrap().to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(
        receipt.upstream_revocations[0].state,
        pb::UpstreamRevocationState::NotNeeded as i32
    );
    let raw = RawDb::open(&tv).await;
    assert!(
        raw.secret_row(&c.connection_id).await.is_none(),
        "sealed tokens and DEK destroyed"
    );
    raw.close().await;
    let err = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, CALENDAR_SCOPE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
both_backends!(
    invalid_grant_revokes,
    invalid_grant_on_refresh_revokes_the_connection_and_destroys_its_tokens
);

async fn an_unreachable_google_fails_within_the_deadline_and_keeps_the_refresh_token(
    backend: Backend,
) {
    // The vault's own limit on a refresh is long, so the call's deadline
    // (its grpc-timeout) is what must end it: a vault that ignored the
    // caller's deadline would keep retrying for this long.
    let vault_deadline = Duration::from_secs(20);
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.google.refresh_deadline_ms = vault_deadline.as_millis() as u64;
    })
    .await
    else {
        return;
    };
    let c = connect(&tv, "outage", "u1", pb::Integration::Calendar).await;
    expire_stored_token(&tv, &c.connection_id).await;
    let raw = RawDb::open(&tv).await;
    let before = raw.secret_row(&c.connection_id).await.unwrap();

    sim.inject(Endpoint::Token, Fault::Status(503), None);
    let call_deadline = Duration::from_millis(1500);
    let mut req = tonic::Request::new(lease_request(&c.connection_id, CALENDAR_SCOPE));
    req.set_timeout(call_deadline);
    // Generous past the call's deadline for a loaded machine, and far short
    // of the vault's own refresh deadline.
    let limit = call_deadline + Duration::from_secs(5);
    let started = Instant::now();
    let err = tokio::time::timeout(limit, tv.leases(As::Worker).lease_token(req))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a lease with a {call_deadline:?} deadline was still waiting after {limit:?} \
                 (the vault's refresh deadline is {vault_deadline:?})"
            )
        })
        .unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "a lease with a {call_deadline:?} deadline failed after {took:?} while Google answered 503"
    );
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(sim.calls(Endpoint::Token) >= 2, "retried");
    let after = raw.secret_row(&c.connection_id).await.unwrap();
    assert_eq!(
        after.refresh_token, before.refresh_token,
        "refresh token intact"
    );

    sim.clear_faults();
    let lease = tv
        .leases(As::Worker)
        .lease_token(lease_request(&c.connection_id, CALENDAR_SCOPE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lease.access_token,
        sim.current_access_token("sim-user-1", crate::support::CLIENT_ID)
            .unwrap()
    );
    raw.close().await;
}
both_backends!(
    google_down,
    an_unreachable_google_fails_within_the_deadline_and_keeps_the_refresh_token
);

/// Fires `n` concurrent leases spread over the given vault addresses.
async fn concurrent_leases(
    addrs: &[String],
    connection_id: &str,
    n: usize,
) -> Vec<Result<String, tonic::Status>> {
    let mut clients = Vec::new();
    for addr in addrs {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let bearer = crate::support::Bearer(Some(
            format!("Bearer {}", As::Worker.key()).parse().unwrap(),
        ));
        clients
            .push(pb::lease_service_client::LeaseServiceClient::with_interceptor(channel, bearer));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let barrier = barrier.clone();
            let req = lease_request(connection_id, CALENDAR_SCOPE);
            tokio::spawn(async move {
                barrier.wait().await;
                let mut r = tonic::Request::new(req);
                r.set_timeout(Duration::from_secs(20));
                client
                    .lease_token(r)
                    .await
                    .map(|l| l.into_inner().access_token)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn concurrent_leases_on_an_expired_token_refresh_it_once(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let c = connect(&tv, "flight", "u1", pb::Integration::Calendar).await;
    expire_stored_token(&tv, &c.connection_id).await;
    sim.inject(
        Endpoint::Token,
        Fault::Latency(Duration::from_millis(300)),
        Some(1),
    );
    let before = sim.refresh_calls();
    let results = concurrent_leases(&[tv.grpc_addr.to_string()], &c.connection_id, 200).await;
    assert_eq!(
        sim.refresh_calls() - before,
        1,
        "exactly one refresh reached Google"
    );
    let current = sim
        .current_access_token("sim-user-1", crate::support::CLIENT_ID)
        .unwrap();
    for r in results {
        assert_eq!(r.expect("lease"), current);
    }
}
both_backends!(
    refresh_single_flight,
    concurrent_leases_on_an_expired_token_refresh_it_once
);

/// 1,000 concurrent leases over three vault processes sharing PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_across_three_vault_processes_sharing_postgres() {
    use crate::serve_cli::ServeProcess;
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = crate::support::fresh_database(Backend::Postgres, dir.path()).await else {
        return;
    };
    let _drop = crate::support::DropDatabase::new(&url);
    let sim = crate::support::start_google().await;
    let mut config = crate::support::test_config(dir.path(), &url);
    crate::support::use_google(&mut config, &sim);
    tokenvault::crypto::LocalKeyring::init(config.keyring_path()).unwrap();
    let config_path = crate::support::write_config_file(dir.path(), &config, "");

    let arg = config_path.display().to_string();
    let procs: Vec<ServeProcess> = (0..3)
        .map(|_| ServeProcess::start(dir.path(), &["--config", &arg], &[]))
        .collect();
    let addrs: Vec<String> = procs.iter().map(|p| p.grpc_addr.clone()).collect();

    // Connect through the first process.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let app_bearer =
        crate::support::Bearer(Some(format!("Bearer {}", As::App.key()).parse().unwrap()));
    let mut app = pb::connection_service_client::ConnectionServiceClient::with_interceptor(
        channel, app_bearer,
    );
    let url_begun = app
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "multi".into(),
            account_id: "u1".into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: None,
        })
        .await
        .unwrap()
        .into_inner()
        .authorization_url;
    let redirect = follow_authorization(&url_begun).await;
    let resp = reqwest::get(format!(
        "http://{}/oauth/callback?{redirect}",
        procs[0].http_addr
    ))
    .await
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let c = app
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "multi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections
        .remove(0);

    let raw = RawDb::open_url(Backend::Postgres, &url).await;
    raw.execute(&format!(
        "UPDATE connection_secrets SET access_expires_at = 0 WHERE connection_id = '{}'",
        c.connection_id
    ))
    .await;
    raw.close().await;
    sim.inject(
        Endpoint::Token,
        Fault::Latency(Duration::from_millis(500)),
        Some(1),
    );
    let before = sim.refresh_calls();
    let results = concurrent_leases(&addrs, &c.connection_id, 1000).await;
    assert_eq!(
        sim.refresh_calls() - before,
        1,
        "exactly one refresh across three processes"
    );
    let current = sim
        .current_access_token("sim-user-1", crate::support::CLIENT_ID)
        .unwrap();
    let mut ok = 0;
    for r in results {
        assert_eq!(r.expect("lease"), current);
        ok += 1;
    }
    assert_eq!(ok, 1000);
}
