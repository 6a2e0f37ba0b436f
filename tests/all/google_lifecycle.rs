//! Connections as Google really behaves, against the simulator's grant model
//! (one grant per Google user and client, cumulative scopes, consent — and a
//! refresh token — only on first consent, new scopes or `prompt=consent`,
//! `/revoke` ending the whole grant, optional refresh-token rotation):
//! revoked-upstream status, one revoke per grant, reconnect consent,
//! non-retryable id_token failures, audited reads, a refresh lock that a dead
//! holder loses fast, rotation that never loses the working refresh token,
//! and malformed Google answers that change nothing.

use std::time::{Duration, Instant};

use tokenvault::google::sim::{Endpoint, Fault, SimConfig};
use tokenvault::proto::v1 as pb;
use tokenvault::store::AuditFilter;
use tonic::Code;

use crate::both_backends;
use crate::support::raw::{RawDb, expire_stored_token};
use crate::support::{
    As, Backend, CALENDAR_SCOPE, CLIENT_ID, GMAIL_SCOPE, TestVault, connect, deliver_callback,
    follow_authorization, query_param, spawn_vault_with_google,
};

fn lease_request(connection_id: &str, integration: pb::Integration) -> pb::LeaseTokenRequest {
    let (purpose, scope) = match integration {
        pb::Integration::Email => ("email_sync", GMAIL_SCOPE),
        _ => ("calendar_sync", CALENDAR_SCOPE),
    };
    pb::LeaseTokenRequest {
        connection_id: connection_id.into(),
        purpose: purpose.into(),
        scopes: vec![scope.into()],
        min_valid_seconds: 60,
    }
}

fn worker_for(integration: pb::Integration) -> As {
    match integration {
        pb::Integration::Email => As::EmailWorker,
        _ => As::Worker,
    }
}

/// A channel to a `tokenvault serve` child process's gRPC address.
fn channel_to(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

fn bearer(who: As) -> crate::support::Bearer {
    crate::support::Bearer(Some(format!("Bearer {}", who.key()).parse().unwrap()))
}

/// `LeaseService` of a `tokenvault serve` child process, called as `who`.
fn leases_at(
    addr: &str,
    who: As,
) -> pb::lease_service_client::LeaseServiceClient<crate::support::Authed> {
    pb::lease_service_client::LeaseServiceClient::with_interceptor(channel_to(addr), bearer(who))
}

/// `ConnectionService` of a `tokenvault serve` child process, called as `who`.
fn connections_at(
    addr: &str,
    who: As,
) -> pb::connection_service_client::ConnectionServiceClient<crate::support::Authed> {
    pb::connection_service_client::ConnectionServiceClient::with_interceptor(
        channel_to(addr),
        bearer(who),
    )
}

async fn lease(
    tv: &TestVault,
    c: &pb::Connection,
) -> Result<pb::LeaseTokenResponse, tonic::Status> {
    let integration = pb::Integration::try_from(c.integration).unwrap();
    tv.leases(worker_for(integration))
        .lease_token(lease_request(&c.connection_id, integration))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(tv: &TestVault, id: &str) -> pb::Connection {
    tv.connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection
        .unwrap()
}

/// What the admin API says about a connection's secrets.
async fn detail(tv: &TestVault, tenant: &str, id: &str) -> pb::ConnectionDetail {
    tv.admin(As::Admin)
        .list_connections(pb::AdminServiceListConnectionsRequest {
            tenant_id: Some(tenant.into()),
            include_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections
        .into_iter()
        .find(|d| d.connection.as_ref().unwrap().connection_id == id)
        .expect("the connection in the admin listing")
}

async fn audit_actions(tv: &TestVault, prefix: &str) -> Vec<(String, String, String)> {
    tv.vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some(prefix.into()),
                ..Default::default()
            },
            10_000,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.draft.action, r.draft.target, r.draft.detail))
        .collect()
}

/// Waits until the revocation outbox holds nothing — every revocation queued
/// so far went out and was settled — then runs a pass of the outbox worker
/// by hand and checks it found nothing to send: the positive signal, before
/// counting revocations, that whatever could still send one has run.
async fn outbox_drained_and_passed(tv: &TestVault) {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        let (depth, _) = tv.vault.store().outbox_depth().await.unwrap();
        if depth == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revocation outbox still holds {depth} revocation(s) after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let due = tv
        .vault
        .outbox_pass()
        .await
        .expect("a pass of the outbox worker");
    assert_eq!(
        due, 0,
        "a pass of the outbox worker found revocations to send"
    );
}

// --- 1. invalid_grant → REVOKED_UPSTREAM ---------------------------------------

async fn invalid_grant_leaves_the_connection_revoked_upstream_until_the_user_reconnects(
    backend: Backend,
) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let c = connect(&tv, "gone", "u1", pb::Integration::Calendar).await;
    sim.revoke_grant_silently("sim-user-1");
    expire_stored_token(&tv, &c.connection_id).await;
    let err = lease(&tv, &c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("REVOKED_UPSTREAM"), "{err:?}");

    let now = get(&tv, &c.connection_id).await;
    assert_eq!(now.status, pb::ConnectionStatus::RevokedUpstream as i32);
    assert_eq!(now.status_reason, "user_revoked_at_google");
    assert_eq!(now.google_email, "", "no Google data kept");
    assert!(now.granted_scopes.is_empty());
    assert!(!now.deletion_receipt_id.is_empty(), "a receipt says why");
    let receipt = tv
        .connections(As::App)
        .get_deletion_receipt(pb::GetDeletionReceiptRequest {
            receipt_id: now.deletion_receipt_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(
        receipt.reason,
        pb::DeletionReason::UserRevokedAtGoogle as i32
    );
    assert_eq!(
        sim.calls(Endpoint::Revoke),
        0,
        "nothing to revoke at Google"
    );
    let raw = RawDb::open(&tv).await;
    assert!(raw.secret_row(&c.connection_id).await.is_none());
    raw.close().await;

    // The product finds it by status, without asking for tombstones.
    let listed = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "gone".into(),
            status: Some(pb::ConnectionStatus::RevokedUpstream as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].connection_id, c.connection_id);

    // Told again (another invalid_grant, a RISC event): nothing changes.
    let id = tokenvault::domain::ConnectionId::parse(&c.connection_id).unwrap();
    let record = tv.vault.connection_get(&id).await.unwrap();
    tv.vault.revoked_at_google(&record).await.unwrap();
    assert_eq!(
        get(&tv, &c.connection_id).await.deletion_receipt_id,
        now.deletion_receipt_id
    );

    // The user reconnects: a new ACTIVE connection with a refresh token
    // (the grant is gone, so Google shows consent again).
    let again = connect(&tv, "gone", "u1", pb::Integration::Calendar).await;
    assert_ne!(again.connection_id, c.connection_id);
    assert_eq!(again.status, pb::ConnectionStatus::Active as i32);
    assert!(
        detail(&tv, "gone", &again.connection_id)
            .await
            .has_refresh_token
    );
    assert_eq!(
        get(&tv, &c.connection_id).await.status,
        pb::ConnectionStatus::Deleted as i32,
        "the revoked connection is retired by the new one"
    );
    expire_stored_token(&tv, &again.connection_id).await;
    lease(&tv, &again)
        .await
        .expect("the new connection refreshes");
}
both_backends!(
    invalid_grant_revoked_upstream,
    invalid_grant_leaves_the_connection_revoked_upstream_until_the_user_reconnects
);

// --- 2. one revoke per grant ------------------------------------------------

async fn deleting_an_account_revokes_its_google_grant_once(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    connect(&tv, "once", "u1", pb::Integration::Calendar).await;
    connect(&tv, "once", "u1", pb::Integration::Email).await;
    let receipt = tv
        .connections(As::App)
        .delete_account(pb::DeleteAccountRequest {
            tenant_id: "once".into(),
            account_id: "u1".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(
        sim.calls(Endpoint::Revoke),
        1,
        "one /revoke for the one grant"
    );
    assert_eq!(sim.revocations(), 1);
    assert!(sim.grant_revoked("sim-user-1", CLIENT_ID));
    let states: Vec<i32> = receipt
        .upstream_revocations
        .iter()
        .map(|u| u.state)
        .collect();
    assert_eq!(states.len(), 2);
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == pb::UpstreamRevocationState::Confirmed as i32)
            .count(),
        1,
        "one connection carries the grant's revocation: {states:?}"
    );
    // The outbox worker has nothing left to send: nothing is queued, and a
    // pass of it sends nothing.
    outbox_drained_and_passed(&tv).await;
    assert_eq!(sim.calls(Endpoint::Revoke), 1);
}
both_backends!(
    account_revokes_once,
    deleting_an_account_revokes_its_google_grant_once
);

/// The one revocation of a grant goes out with a refresh token when any of
/// the grant's connections holds one: an access token may have expired, and
/// Google answers `invalid_token` to that while the grant lives on.
async fn the_grant_is_revoked_with_a_refresh_token_when_one_is_held(backend: Backend) {
    use tokenvault::domain::{AccountId, ConnectionStatus, Integration, ScopeSet, TenantId};
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    // First (so first in id order): a connection on the same Google account
    // holding only an access token Google no longer knows.
    tv.vault
        .connection_store(
            tokenvault::vault::NewConnection {
                tenant: TenantId::parse("carrier").unwrap(),
                account: AccountId::parse("u1").unwrap(),
                integration: Integration::Calendar,
                google_subject: "sim-user-1".into(),
                google_email: "user1@sim.test".into(),
                granted_scopes: ScopeSet::parse_spaced(CALENDAR_SCOPE).unwrap(),
                status: ConnectionStatus::Active,
                access_token: tokenvault::crypto::SecretString::new("ya29.expired".into()),
                access_expires_at: tokenvault::domain::Timestamp::now(),
                refresh_token: None,
            },
            &tokenvault::audit::Actor::system(),
        )
        .await
        .unwrap();
    connect(&tv, "carrier", "u1", pb::Integration::Email).await;
    tv.connections(As::App)
        .delete_account(pb::DeleteAccountRequest {
            tenant_id: "carrier".into(),
            account_id: "u1".into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(sim.calls(Endpoint::Revoke), 1);
    assert!(
        sim.grant_revoked("sim-user-1", CLIENT_ID),
        "revoked with the email connection's refresh token"
    );
}
both_backends!(
    revoke_carrier_holds_refresh_token,
    the_grant_is_revoked_with_a_refresh_token_when_one_is_held
);

async fn concurrent_disconnects_of_one_grant_revoke_it_once(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let cal = connect(&tv, "race", "u1", pb::Integration::Calendar).await;
    let mail = connect(&tv, "race", "u1", pb::Integration::Email).await;
    let disconnect = |id: String| {
        let mut client = tv.connections(As::App);
        async move {
            client
                .disconnect(pb::DisconnectRequest {
                    connection_id: id,
                    reason: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .receipt
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(
        disconnect(cal.connection_id.clone()),
        disconnect(mail.connection_id.clone())
    );
    let pending_or_done = [a, b]
        .iter()
        .flat_map(|r| r.upstream_revocations.iter())
        .filter(|u| u.state != pb::UpstreamRevocationState::NotNeeded as i32)
        .count();
    assert_eq!(
        pending_or_done, 1,
        "exactly one of the two revokes the grant"
    );
    // The one revocation went out (inline, or from the outbox if its worker
    // claimed the row first) and nothing is left that could send another.
    outbox_drained_and_passed(&tv).await;
    assert_eq!(sim.calls(Endpoint::Revoke), 1);
    assert!(sim.grant_revoked("sim-user-1", CLIENT_ID));
}
both_backends!(
    concurrent_disconnects_revoke_once,
    concurrent_disconnects_of_one_grant_revoke_it_once
);

// --- 3. reconnect consent -----------------------------------------------------

async fn reconnecting_an_integration_whose_grant_lives_on_gets_a_refresh_token(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    connect(&tv, "again", "u1", pb::Integration::Calendar).await;
    let mail = connect(&tv, "again", "u1", pb::Integration::Email).await;
    tv.connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: mail.connection_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        sim.calls(Endpoint::Revoke),
        0,
        "calendar still uses the grant: nothing revoked"
    );
    // The grant still covers the email scopes, so Google would show no
    // consent (and issue no refresh token) unless asked to.
    let begun = tv
        .connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "again".into(),
            account_id: "u1".into(),
            integration: pb::Integration::Email as i32,
            login_hint: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        query_param(begun.authorization_url.split_once('?').unwrap().1, "prompt").as_deref(),
        Some("consent")
    );
    let query = follow_authorization(&begun.authorization_url).await;
    let (status, body) = deliver_callback(&tv, &query).await;
    assert_eq!(status, 200, "{body}");
    let again = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "again".into(),
            integration: Some(pb::Integration::Email as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections
        .remove(0);
    assert_eq!(again.status, pb::ConnectionStatus::Active as i32);
    assert!(
        detail(&tv, "again", &again.connection_id)
            .await
            .has_refresh_token
    );
    expire_stored_token(&tv, &again.connection_id).await;
    let before = sim.refresh_calls();
    lease(&tv, &again)
        .await
        .expect("the reconnected connection refreshes");
    assert_eq!(sim.refresh_calls() - before, 1);

    // Connecting calendar again while it holds a refresh token needs no consent.
    let begun = tv
        .connections(As::App)
        .begin_authorization(pb::BeginAuthorizationRequest {
            tenant_id: "again".into(),
            account_id: "u1".into(),
            integration: pb::Integration::Calendar as i32,
            login_hint: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        query_param(begun.authorization_url.split_once('?').unwrap().1, "prompt"),
        None
    );
}
both_backends!(
    reconnect_gets_refresh_token,
    reconnecting_an_integration_whose_grant_lives_on_gets_a_refresh_token
);

/// Google's token answer for a code, forged with the simulator's key: a
/// valid id_token for `sim-user-1`, and no refresh token.
fn answer_without_refresh_token(sim: &tokenvault::google::sim::GoogleSim) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let id_token = sim.sign_claims(serde_json::json!({
        "iss": sim.issuer(), "aud": CLIENT_ID, "sub": "sim-user-1",
        "email": "user1@sim.test", "iat": now, "exp": now + 3600,
    }));
    serde_json::json!({
        "access_token": "ya29.forged-without-refresh",
        "expires_in": 3599,
        "scope": format!("openid https://www.googleapis.com/auth/userinfo.email {GMAIL_SCOPE}"),
        "token_type": "Bearer",
        "id_token": id_token,
    })
    .to_string()
}

async fn a_connection_google_gave_no_refresh_token_is_consent_required(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    sim.inject(
        Endpoint::Token,
        Fault::Answer(200, answer_without_refresh_token(&sim)),
        Some(1),
    );
    let c = connect(&tv, "norefresh", "u1", pb::Integration::Email).await;
    assert_eq!(c.status, pb::ConnectionStatus::ConsentRequired as i32);
    assert_eq!(c.status_reason, "no_refresh_token");
    let err = lease(&tv, &c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Connecting again asks Google for consent and ends ACTIVE.
    let again = connect(&tv, "norefresh", "u1", pb::Integration::Email).await;
    assert_eq!(
        again.connection_id, c.connection_id,
        "same Google account: same connection"
    );
    assert_eq!(again.status, pb::ConnectionStatus::Active as i32);
    assert!(
        detail(&tv, "norefresh", &again.connection_id)
            .await
            .has_refresh_token
    );
}
both_backends!(
    no_refresh_token_consent_required,
    a_connection_google_gave_no_refresh_token_is_consent_required
);

// --- 4. id_token failures are not retryable -----------------------------------

async fn an_id_token_that_does_not_verify_is_refused_for_good(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": sim.issuer(), "aud": CLIENT_ID, "sub": "sim-user-1",
        "email": "user1@sim.test", "iat": now, "exp": now + 3600,
    });
    let forged = |id_token: String| {
        serde_json::json!({
            "access_token": "ya29.forged", "expires_in": 3599, "token_type": "Bearer",
            "refresh_token": "1//0forged", "scope": format!("openid {CALENDAR_SCOPE}"),
            "id_token": id_token,
        })
        .to_string()
    };
    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = serde_json::json!("another-client");
    let cases = [
        (
            "untrusted key",
            forged(sim.sign_with_untrusted_key(claims.clone())),
        ),
        ("wrong audience", forged(sim.sign_claims(wrong_audience))),
        ("tampered", {
            let token = sim.sign_claims(claims.clone());
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            parts[1] = parts[1].chars().rev().collect();
            forged(parts.join("."))
        }),
    ];
    for (what, answer) in cases {
        // Through the browser callback: a 400 page that says what happened.
        sim.inject(Endpoint::Token, Fault::Answer(200, answer.clone()), Some(1));
        let begun = tv
            .connections(As::App)
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "idt".into(),
                account_id: "u1".into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: None,
            })
            .await
            .unwrap()
            .into_inner();
        let query = follow_authorization(&begun.authorization_url).await;
        let (status, body) = deliver_callback(&tv, &query).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains("id_token_invalid"), "{what}: {body}");
        assert!(body.contains("could not be verified"), "{what}: {body}");

        // Through CompleteAuthorization: FAILED_PRECONDITION, not UNAVAILABLE.
        sim.inject(Endpoint::Token, Fault::Answer(200, answer), Some(1));
        let begun = tv
            .connections(As::App)
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: "idt".into(),
                account_id: "u1".into(),
                integration: pb::Integration::Calendar as i32,
                login_hint: None,
            })
            .await
            .unwrap()
            .into_inner();
        let query = follow_authorization(&begun.authorization_url).await;
        let err = tv
            .connections(As::App)
            .complete_authorization(pb::CompleteAuthorizationRequest {
                state: query_param(&query, "state").unwrap(),
                outcome: Some(pb::complete_authorization_request::Outcome::Code(
                    query_param(&query, "code").unwrap(),
                )),
                tenant_id: "idt".into(),
                account_id: "u1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert!(err.message().contains("id_token"), "{what}: {err:?}");
    }
    let listed = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "idt".into(),
            include_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.connections.is_empty(), "nothing was connected");
}
both_backends!(
    id_token_refused_for_good,
    an_id_token_that_does_not_verify_is_refused_for_good
);

// --- 6. audited reads and deletion.done ------------------------------------------

async fn every_successful_read_rpc_is_audited(backend: Backend) {
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |_| {}).await else {
        return;
    };
    let c = connect(&tv, "reads", "u1", pb::Integration::Calendar).await;
    let receipt = tv
        .connections(As::App)
        .disconnect(pb::DisconnectRequest {
            connection_id: c.connection_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let before_get = audit_actions(&tv, "connection.get").await.len();
    get(&tv, &c.connection_id).await;
    let gets = audit_actions(&tv, "connection.get").await;
    assert_eq!(gets.len(), before_get + 1);
    assert_eq!(gets.last().unwrap().1, c.connection_id);

    let before_list = audit_actions(&tv, "connection.list").await.len();
    tv.connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "reads".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let lists = audit_actions(&tv, "connection.list").await;
    assert_eq!(lists.len(), before_list + 1);
    assert_eq!(lists.last().unwrap().1, "reads");

    tv.connections(As::App)
        .get_deletion_receipt(pb::GetDeletionReceiptRequest {
            receipt_id: receipt.receipt_id.clone(),
        })
        .await
        .unwrap();
    let receipts = audit_actions(&tv, "receipt.get").await;
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].1, receipt.receipt_id);

    // Fail closed: with the audit log refusing, a read answers nothing.
    tv.vault.audit().inject_failure(true);
    let err = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: c.connection_id.clone(),
        })
        .await
        .unwrap_err();
    tv.vault.audit().inject_failure(false);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The deletion's own entry names its receipt.
    let done = audit_actions(&tv, "deletion.done").await;
    assert_eq!(done.len(), 1);
    assert!(done[0].2.contains(&receipt.receipt_id), "{done:?}");
    let report = tokenvault::audit::verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
}
both_backends!(reads_are_audited, every_successful_read_rpc_is_audited);

// --- refresh-token rotation ----------------------------------------------------------

async fn rotated_refresh_tokens_are_kept_and_a_lost_answer_loses_no_token(backend: Backend) {
    let sim = tokenvault::google::sim::GoogleSim::start(SimConfig {
        rotate_refresh_tokens: true,
        refresh_token_grace: Duration::from_secs(60),
        ..crate::support::sim_config()
    })
    .await
    .unwrap();
    let Some(tv) = crate::support::spawn_vault_with(backend, |c| {
        crate::support::use_google(c, &sim);
    })
    .await
    else {
        return;
    };
    let c = connect(&tv, "rot", "u1", pb::Integration::Calendar).await;
    let raw = RawDb::open(&tv).await;
    let first = raw.secret_row(&c.connection_id).await.unwrap();

    // A rotated refresh: the new refresh token is stored with the new access token.
    expire_stored_token(&tv, &c.connection_id).await;
    lease(&tv, &c).await.expect("refresh");
    let second = raw.secret_row(&c.connection_id).await.unwrap();
    assert_ne!(
        second.refresh_token, first.refresh_token,
        "new refresh token stored"
    );
    // The old one dies after the grace period; the stored one keeps working.
    sim.advance_clock(Duration::from_secs(120));
    assert_eq!(sim.live_refresh_tokens("sim-user-1", CLIENT_ID), 1);
    expire_stored_token(&tv, &c.connection_id).await;
    lease(&tv, &c)
        .await
        .expect("refresh with the rotated token");
    let third = raw.secret_row(&c.connection_id).await.unwrap();
    assert_ne!(third.refresh_token, second.refresh_token);

    // Google rotates but its answer never arrives — what a crash between
    // Google's answer and the commit looks like to the database: the new
    // refresh token exists only at Google, the stored one is now retired.
    // The vault keeps the retired one (still valid for the grace period),
    // tries again, and stores the token of the retry.
    sim.advance_clock(Duration::from_secs(120));
    sim.inject(Endpoint::Token, Fault::LoseAnswer, Some(1));
    expire_stored_token(&tv, &c.connection_id).await;
    let before = sim.refresh_calls();
    lease(&tv, &c).await.expect("refresh after a lost answer");
    assert_eq!(
        sim.refresh_calls() - before,
        2,
        "the lost answer, then a retry"
    );
    let fourth = raw.secret_row(&c.connection_id).await.unwrap();
    assert_ne!(fourth.refresh_token, third.refresh_token);
    sim.advance_clock(Duration::from_secs(120));
    expire_stored_token(&tv, &c.connection_id).await;
    lease(&tv, &c)
        .await
        .expect("the token stored after the lost answer works after the grace period");
    raw.close().await;
}
both_backends!(
    refresh_token_rotation,
    rotated_refresh_tokens_are_kept_and_a_lost_answer_loses_no_token
);

// --- malformed Google answers ---------------------------------------------------------

async fn malformed_or_unexpected_google_answers_change_nothing(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.google.refresh_deadline_ms = 1_000;
    })
    .await
    else {
        return;
    };
    let c = connect(&tv, "bad", "u1", pb::Integration::Calendar).await;
    expire_stored_token(&tv, &c.connection_id).await;
    let raw = RawDb::open(&tv).await;
    let stored = raw.secret_row(&c.connection_id).await.unwrap();
    let cases: Vec<(&str, Fault)> = vec![
        ("empty object", Fault::Answer(200, "{}".into())),
        (
            "no access_token",
            Fault::Answer(
                200,
                r#"{"expires_in": 3599, "token_type": "Bearer"}"#.into(),
            ),
        ),
        (
            "expires_in of the wrong type",
            Fault::Answer(
                200,
                r#"{"access_token": "ya29.x", "expires_in": "soon", "token_type": "Bearer"}"#
                    .into(),
            ),
        ),
        ("not JSON", Fault::Answer(200, "<html>hello</html>".into())),
        ("HTML error page", Fault::HtmlPage(502)),
        (
            "429 with Retry-After",
            Fault::RateLimited(Duration::from_secs(30)),
        ),
        (
            "unknown OAuth error",
            Fault::Answer(400, r#"{"error": "something_new"}"#.into()),
        ),
        ("cut-off JSON", Fault::MalformedJson),
    ];
    for (what, fault) in cases {
        sim.clear_faults();
        let rate_limited = matches!(fault, Fault::RateLimited(_));
        sim.inject(Endpoint::Token, fault, None);
        let calls = sim.refresh_calls();
        let err = lease(&tv, &c).await.unwrap_err();
        if rate_limited {
            // Google asked for 30 s, the caller has 1 s: one call, then a clear answer.
            assert_eq!(
                sim.refresh_calls() - calls,
                1,
                "{what}: no retry inside Retry-After"
            );
            assert!(
                err.message().contains("retry after 30 s"),
                "{what}: {err:?}"
            );
        }
        assert!(
            matches!(err.code(), Code::Unavailable | Code::FailedPrecondition),
            "{what}: {err:?}"
        );
        assert!(!err.message().is_empty(), "{what}");
        assert_eq!(
            raw.secret_row(&c.connection_id).await.as_ref(),
            Some(&stored),
            "{what}: stored tokens unchanged"
        );
        assert_eq!(
            get(&tv, &c.connection_id).await.status,
            pb::ConnectionStatus::Active as i32,
            "{what}"
        );
    }
    sim.clear_faults();
    lease(&tv, &c).await.expect("a good answer still refreshes");
    raw.close().await;
}
both_backends!(
    malformed_google_answers,
    malformed_or_unexpected_google_answers_change_nothing
);

// --- 5. refresh lock: a dead holder loses it fast ----------------------------------------

/// How long a refresh lock lasts unless its holder renews it (the README's
/// "the lock row lasts 3 seconds"; `REFRESH_LOCK_TTL` in src/vault/lease.rs).
const REFRESH_LOCK_TTL: Duration = Duration::from_secs(3);

/// Replica A takes a connection's refresh lock and is SIGKILLed while Google
/// has not answered; replica B must lease within twice the lock's TTL.
async fn a_killed_refresh_lock_holder_is_taken_over_within_seconds(backend: Backend) {
    use crate::serve_cli::ServeProcess;
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.refresh.sweeper = false;
        c.google.refresh_deadline_ms = 30_000;
        c.google.request_timeout_ms = 10_000;
    })
    .await
    else {
        return;
    };
    let c = connect(&tv, "lock", "u1", pb::Integration::Calendar).await;
    let config_path = crate::support::write_config_file(tv.dir.path(), &tv.config, "");
    let arg = config_path.display().to_string();
    let mut a = ServeProcess::start(tv.dir.path(), &["--config", &arg], &[]);
    let b = ServeProcess::start(tv.dir.path(), &["--config", &arg], &[]);
    let raw = RawDb::open(&tv).await;
    raw.execute(&format!(
        "UPDATE connection_secrets SET access_expires_at = 0 WHERE connection_id = '{}'",
        c.connection_id
    ))
    .await;

    let mut worker_a = leases_at(&a.grpc_addr, As::Worker);
    let mut worker_b = leases_at(&b.grpc_addr, As::Worker);
    let request = lease_request(&c.connection_id, pb::Integration::Calendar);
    let lock_taken = || async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while raw
            .scalar(&format!(
                "SELECT COUNT(*) FROM refresh_locks WHERE connection_id = '{}' AND expires_at > 0",
                c.connection_id
            ))
            .await
            == 0
        {
            assert!(Instant::now() < deadline, "A never took the refresh lock");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // A live holder keeps its lock beyond the lock's 3 s while Google takes
    // 4.5 s: B waits for A's result instead of calling Google again.
    sim.inject(
        Endpoint::Token,
        Fault::Latency(Duration::from_millis(4_500)),
        Some(1),
    );
    let before = sim.refresh_calls();
    let slow = tokio::spawn({
        let mut worker = worker_a.clone();
        let request = request.clone();
        async move { worker.lease_token(request).await }
    });
    lock_taken().await;
    let from_b = worker_b
        .lease_token(request.clone())
        .await
        .expect("lease on B");
    let from_a = slow.await.unwrap().expect("lease on A");
    assert_eq!(
        sim.refresh_calls() - before,
        1,
        "one refresh: the live holder kept its lock"
    );
    assert_eq!(
        from_a.into_inner().access_token,
        from_b.into_inner().access_token
    );
    raw.execute(&format!(
        "UPDATE connection_secrets SET access_expires_at = 0 WHERE connection_id = '{}'",
        c.connection_id
    ))
    .await;

    // A's refresh hangs at Google while A holds the lock; then A dies.
    sim.inject(Endpoint::Token, Fault::Hang, Some(1));
    let held = tokio::spawn({
        let request = request.clone();
        async move { worker_a.lease_token(request).await }
    });
    lock_taken().await;
    a.signal("KILL");
    a.wait(Duration::from_secs(10));
    let killed = Instant::now();
    let _ = held.await;

    // The README: a replica that dies mid-refresh holds up leases of that
    // connection for about the lock's 3 s. B gets twice that — room for a
    // loaded machine, and far below the 30 s refresh deadline B would wait
    // out if the dead holder's lock never expired. Every try carries the
    // time left as its deadline, so none can end after it.
    let limit = REFRESH_LOCK_TTL * 2;
    let deadline = killed + limit;
    let mut last_error: Option<tonic::Status> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no lease on B within {limit:?} of the holder's death (lock TTL \
             {REFRESH_LOCK_TTL:?}); last error: {last_error:?}"
        );
        let mut attempt = tonic::Request::new(request.clone());
        attempt.set_timeout(left);
        match worker_b.lease_token(attempt).await {
            Ok(_) => break,
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let took = killed.elapsed();
    eprintln!("lease on B {took:?} after SIGKILL of the lock holder (deadline {limit:?})");
    raw.close().await;
}
both_backends!(
    refresh_lock_takeover,
    a_killed_refresh_lock_holder_is_taken_over_within_seconds
);

// --- proactive refresh ---------------------------------------------------------------------

/// The sweeper's outcome counter: one increment per connection a pass claimed.
const SWEEPS: &str = "tokenvault_refresh_sweeps_total";

/// The sum of the samples of counter `name` in a `tokenvault serve`
/// process's /metrics (0 before its first increment).
async fn counter_total(process: &crate::serve_cli::ServeProcess, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", process.http_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics text");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split_once('{').map_or(series, |(metric, _)| metric);
            if metric != name {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum::<f64>() as u64
}

fn micros(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1_000))
}

/// Connects `n` accounts of tenant `tenant`, each to its own Google user.
async fn connect_many(
    tv: &TestVault,
    sim: &tokenvault::google::sim::GoogleSim,
    tenant: &str,
    n: usize,
) -> Vec<pb::Connection> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let email = format!("{tenant}-{i}@sim.test");
        sim.add_user(&email, &format!("{tenant}-sub-{i}"));
        let begun = tv
            .connections(As::App)
            .begin_authorization(pb::BeginAuthorizationRequest {
                tenant_id: tenant.into(),
                account_id: format!("a{i}"),
                integration: pb::Integration::Calendar as i32,
                login_hint: Some(email),
            })
            .await
            .unwrap()
            .into_inner();
        let query = follow_authorization(&begun.authorization_url).await;
        let (status, body) = deliver_callback(tv, &query).await;
        assert_eq!(status, 200, "{body}");
    }
    let listed = tv
        .connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: tenant.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .connections;
    out.extend(listed);
    assert_eq!(out.len(), n);
    out
}

/// Makes every ACTIVE connection of `tenant` due for the sweeper.
async fn make_due(tv: &TestVault, tenant: &str) {
    let raw = RawDb::open(tv).await;
    raw.execute(&format!(
        "UPDATE connections SET next_check_at = 0 WHERE tenant_id = '{tenant}' AND status = 'active'"
    ))
    .await;
    raw.close().await;
}

async fn the_sweeper_refreshes_idle_connections_and_finds_revoked_grants(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.refresh.sweeper = false; // passes are run by hand below
    })
    .await
    else {
        return;
    };
    let conns = connect_many(&tv, &sim, "sweep", 3).await;
    let first = get(&tv, &conns[0].connection_id).await;
    let next = first
        .next_check_at
        .expect("an ACTIVE connection has a next check");
    let refreshed = first.last_refresh_at.expect("connected = refreshed");
    assert!(
        next.seconds - refreshed.seconds >= 7 * 86_400 - 1,
        "due a week after its last refresh by default"
    );
    // Nothing is due yet: a pass does nothing.
    let before = sim.refresh_calls();
    assert_eq!(tv.vault.refresh_sweep_pass().await.unwrap().claimed, 0);
    assert_eq!(sim.refresh_calls(), before);

    // Idle past the threshold, and one user removed the app at Google.
    make_due(&tv, "sweep").await;
    sim.revoke_grant_silently("sweep-sub-2");
    let report = tv.vault.refresh_sweep_pass().await.unwrap();
    assert_eq!(report.claimed, 3, "{report:?}");
    assert_eq!(report.refreshed, 2, "{report:?}");
    assert_eq!(report.revoked, 1, "{report:?}");
    assert_eq!(
        sim.refresh_calls() - before,
        3,
        "one call per due connection"
    );
    for c in &conns[..2] {
        let now = get(&tv, &c.connection_id).await;
        assert_eq!(now.status, pb::ConnectionStatus::Active as i32);
        assert!(
            micros(now.last_refresh_at.as_ref()) > micros(c.last_refresh_at.as_ref()),
            "refreshed by the pass"
        );
        assert!(
            now.next_check_at.unwrap().seconds > now.last_refresh_at.unwrap().seconds + 86_400,
            "next check moved a week ahead"
        );
        assert_eq!(now.last_refresh_error, "");
    }
    let revoked = get(&tv, &conns[2].connection_id).await;
    assert_eq!(revoked.status, pb::ConnectionStatus::RevokedUpstream as i32);
    assert_eq!(revoked.next_check_at, None);
    let events = tv.vault.store().events_after(0, 100).await.unwrap();
    assert!(
        events.iter().any(
            |e| e.event.kind == tokenvault::domain::EventKind::ConnectionDeleted
                && e.event.connection_id.as_ref().map(|c| c.as_str())
                    == Some(revoked.connection_id.as_str())
                && e.event.reason == Some(tokenvault::domain::DeletionReason::UserRevokedAtGoogle)
        ),
        "the product backend learns it must ask for a reconnect"
    );
    // Done: the next pass has nothing to do.
    assert_eq!(tv.vault.refresh_sweep_pass().await.unwrap().claimed, 0);

    // Google unavailable: the error is recorded and retried later; tokens unchanged.
    make_due(&tv, "sweep").await;
    sim.inject(Endpoint::Token, Fault::Status(503), None);
    let report = tv.vault.refresh_sweep_pass().await.unwrap();
    sim.clear_faults();
    assert_eq!(report.failed, 2, "{report:?}");
    let failing = get(&tv, &conns[0].connection_id).await;
    assert_eq!(failing.status, pb::ConnectionStatus::Active as i32);
    assert!(!failing.last_refresh_error.is_empty());
    assert!(failing.last_refresh_error_at.is_some());
    let retry =
        failing.next_check_at.unwrap().seconds - failing.last_refresh_error_at.unwrap().seconds;
    assert!(
        (890..=910).contains(&retry),
        "retried 15 minutes later, not {retry} s"
    );
    // The admin CLI's view shows the same health.
    let shown = detail(&tv, "sweep", &conns[0].connection_id).await;
    assert_eq!(
        shown.connection.unwrap().last_refresh_error,
        failing.last_refresh_error
    );
}
both_backends!(
    sweeper_refreshes_and_finds_revoked,
    the_sweeper_refreshes_idle_connections_and_finds_revoked_grants
);

async fn the_sweeper_keeps_to_its_rate_limit(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.refresh.sweeper = false;
        c.refresh.max_calls_per_second = 4;
    })
    .await
    else {
        return;
    };
    connect_many(&tv, &sim, "rate", 9).await;
    make_due(&tv, "rate").await;
    let before = sim.refresh_calls();
    let started = Instant::now();
    let report = tv.vault.refresh_sweep_pass().await.unwrap();
    let took = started.elapsed();
    let calls = sim.refresh_calls() - before;
    assert_eq!(report.refreshed, 9, "{report:?}");
    assert_eq!(calls, 9);
    // 4 calls a second: the 9th call starts no earlier than 2 s after the first.
    assert!(
        took >= Duration::from_millis(1_950),
        "9 calls at 4/s took only {took:?}"
    );
    eprintln!("sweeper: {calls} refreshes at max 4/s took {took:?}");
}
both_backends!(sweeper_rate_limit, the_sweeper_keeps_to_its_rate_limit);

/// Three `tokenvault serve` processes with the sweeper on, one database:
/// every due connection is refreshed exactly once.
async fn three_replicas_refresh_each_due_connection_once(backend: Backend) {
    use crate::serve_cli::ServeProcess;
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.refresh.sweeper = false;
    })
    .await
    else {
        return;
    };
    let conns = connect_many(&tv, &sim, "fleet", 8).await;
    let config_path = crate::support::write_config_file(
        tv.dir.path(),
        &tv.config,
        "[refresh]\ncheck_interval_seconds = 1\nmax_calls_per_second = 20\n",
    );
    let arg = config_path.display().to_string();
    let replicas: Vec<ServeProcess> = (0..3)
        .map(|_| ServeProcess::start(tv.dir.path(), &["--config", &arg], &[]))
        .collect();
    let before = sim.refresh_calls();
    make_due(&tv, "fleet").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut done = 0;
        for c in &conns {
            let now = get(&tv, &c.connection_id).await;
            if micros(now.last_refresh_at.as_ref()) > micros(c.last_refresh_at.as_ref()) {
                done += 1;
            }
        }
        if done == conns.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} refreshed",
            conns.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every pass that claimed a connection has finished with it: across the
    // three processes, the sweepers have counted one outcome per connection.
    let swept = || async {
        let mut total = 0;
        for r in &replicas {
            total += counter_total(r, SWEEPS).await;
        }
        total
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let total = swept().await;
        if total >= conns.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas' {SWEEPS} add up to {total} of {} refreshed connections",
            conns.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Double work would come from a later pass claiming a connection again.
    // No replica reports its passes as such, so a window is the only thing
    // to wait on: two check intervals (check_interval_seconds = 1), in which
    // every replica makes at least one more pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.refresh_calls() - before,
        conns.len() as u64,
        "each due connection refreshed once across three replicas"
    );
    assert_eq!(
        swept().await,
        conns.len() as u64,
        "each due connection claimed by one sweep, once"
    );
    drop(replicas);
}
both_backends!(
    sweeper_three_replicas,
    three_replicas_refresh_each_due_connection_once
);

// --- deletion.done survives a crash ---------------------------------------------------------

/// A burst of Disconnects against a `tokenvault serve` process that is
/// SIGKILLed mid-burst: every deletion that committed has its
/// `deletion.done` entry (it is written in the deletion's own transaction),
/// and the audit chain verifies.
async fn every_committed_deletion_has_its_done_entry_after_a_crash(backend: Backend) {
    use crate::serve_cli::ServeProcess;
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |c| {
        c.refresh.sweeper = false;
        c.deletion.inline_revoke_timeout_ms = 200;
    })
    .await
    else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..120 {
        let c = crate::support::seed_connection(
            &tv.vault,
            "crash",
            &format!("a{i}"),
            tokenvault::domain::Integration::Calendar,
            "ya29.seeded",
            Some("1//0seeded"),
        )
        .await;
        ids.push(c.id.to_string());
    }
    let config_path = crate::support::write_config_file(tv.dir.path(), &tv.config, "");
    let arg = config_path.display().to_string();
    let mut replica = ServeProcess::start(tv.dir.path(), &["--config", &arg], &[]);
    let app = connections_at(&replica.grpc_addr, As::App);
    let calls: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut app = app.clone();
            let id = id.clone();
            tokio::spawn(async move {
                app.disconnect(pb::DisconnectRequest {
                    connection_id: id,
                    reason: String::new(),
                })
                .await
            })
        })
        .collect();
    // Kill it once some deletions have committed and others have not.
    let raw = RawDb::open(&tv).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while raw.scalar("SELECT COUNT(*) FROM deletion_receipts").await < 10 {
        assert!(Instant::now() < deadline, "no deletion committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replica.signal("KILL");
    replica.wait(Duration::from_secs(10));
    for call in calls {
        let _ = call.await;
    }
    let committed = raw.scalar("SELECT COUNT(*) FROM deletion_receipts").await;
    let done = raw
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'deletion.done'")
        .await;
    let requested = raw
        .scalar("SELECT COUNT(*) FROM audit_log WHERE action = 'deletion.request'")
        .await;
    eprintln!("{requested} deletions requested, {committed} committed before SIGKILL");
    assert!(committed >= 10);
    assert_eq!(
        done, committed,
        "a deletion.done for every committed deletion"
    );
    let orphans = raw
        .scalar(
            "SELECT COUNT(*) FROM deletion_receipts r WHERE NOT EXISTS ( \
             SELECT 1 FROM audit_log a WHERE a.action = 'deletion.done' \
             AND a.detail LIKE 'receipt=' || r.receipt_id || ' %')",
        )
        .await;
    assert_eq!(orphans, 0, "every receipt named by its deletion.done");
    raw.close().await;
    let report = tokenvault::audit::verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .unwrap();
    assert!(report.ok(), "{report:?}");
}
both_backends!(
    deletion_done_survives_crash,
    every_committed_deletion_has_its_done_entry_after_a_crash
);

/// An app in publishing status "Testing": Google kills refresh tokens seven
/// days after issue, used or not. The sweeper cannot prevent that, but finds
/// it before a worker does.
async fn the_sweeper_finds_testing_mode_tokens_that_expired(backend: Backend) {
    let sim = tokenvault::google::sim::GoogleSim::start(SimConfig {
        testing_mode: true,
        ..crate::support::sim_config()
    })
    .await
    .unwrap();
    let Some(tv) = crate::support::spawn_vault_with(backend, |c| {
        crate::support::use_google(c, &sim);
        c.refresh.sweeper = false;
        c.refresh.refresh_after_hours = 24;
    })
    .await
    else {
        return;
    };
    let c = connect(&tv, "testing", "u1", pb::Integration::Calendar).await;
    // Day 1 … 6: the daily sweep keeps it fresh.
    for _ in 0..6 {
        sim.advance_clock(Duration::from_secs(86_400));
        make_due(&tv, "testing").await;
        let report = tv.vault.refresh_sweep_pass().await.unwrap();
        assert_eq!(report.refreshed, 1, "{report:?}");
    }
    // Day 7: the refresh token is dead at Google whatever its use.
    sim.advance_clock(Duration::from_secs(86_400));
    make_due(&tv, "testing").await;
    let report = tv.vault.refresh_sweep_pass().await.unwrap();
    assert_eq!(report.revoked, 1, "{report:?}");
    let now = get(&tv, &c.connection_id).await;
    assert_eq!(now.status, pb::ConnectionStatus::RevokedUpstream as i32);
    assert_eq!(now.status_reason, "user_revoked_at_google");
}
both_backends!(
    sweeper_testing_mode,
    the_sweeper_finds_testing_mode_tokens_that_expired
);
