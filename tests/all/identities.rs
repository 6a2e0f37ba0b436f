//! Certificate identities and API-key identities are distinct name spaces,
//! end to end over real mutual TLS (a listener that takes client
//! certificates and, from loopback, the test configuration's API keys).
//! Each identity authenticates one way only: as its policy entry's
//! `authenticate` says, else by API key when `[[auth.api_keys]]` holds one
//! for it and by certificate otherwise.
//!
//! - A certificate signed by the trusted CA whose SAN spells an API-key
//!   identity gets nothing: UNAUTHENTICATED, audited; the identity's own key
//!   still works (`certificate_to_api_key_identity`).
//! - `authenticate = "certificate"` beside a configured API key is allowed
//!   (an identity can move to certificates before its keys are removed) and
//!   makes the key useless: refused, audited and warned of; the certificate
//!   works (`certificate_identity_with_a_key`).
//! - `authenticate = "api_key"` for an identity no key names is a
//!   configuration error at start and a refused reload
//!   (`api_key_identity_without_a_key`).
//! - A certificate identity works by certificate, and no bearer reaches it
//!   (`certificate_identity_by_bearer`).

use tokenvault::config::Config;
use tokenvault::domain::Integration;
use tokenvault::policy::{AuthMethod, IdentityEntry};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tokenvault::store::AuditRow;
use tonic::Code;

use crate::both_backends;
use crate::mtls::{Pki, audit, dns, lease_request, tls_channel, uri};
use crate::support::{
    As, Backend, Bearer, TestVault, policy_toml, seed_connection, spawn_vault_with, test_config,
};

/// An application identity no API key names: it authenticates by certificate.
const CRM_BY_CERTIFICATE: &str = "spiffe://tokenvault.test/crm-backend";

const KEY_STATUS: &str = "AdminService.KeyStatus";
const LEASE_TOKEN: &str = "LeaseService.LeaseToken";
const LIST_CONNECTIONS: &str = "ConnectionService.ListConnections";

/// Why a certificate naming an API-key identity is refused, and the reverse.
const NOT_BY_CERTIFICATE: &str = "authenticates by API key, not by certificate";
const NOT_BY_API_KEY: &str = "authenticates by certificate, not by API key";

fn entry(role: &str, authenticate: Option<AuthMethod>) -> IdentityEntry {
    IdentityEntry {
        role: role.to_owned(),
        purposes: vec![],
        consumers: vec![],
        authenticate,
    }
}

fn bearer(key: &str) -> Bearer {
    Bearer(Some(format!("Bearer {key}").parse().expect("ascii key")))
}

/// Starts a vault with TLS, client certificates from `pki`'s CA (optional,
/// since there are API keys), the test configuration's API keys and
/// [`CRM_BY_CERTIFICATE`] in the policy; `adjust` comes last.
async fn spawn_tls_vault(
    backend: Backend,
    pki: &Pki,
    adjust: impl FnOnce(&mut Config),
) -> Option<TestVault> {
    spawn_vault_with(backend, |config| {
        let keys = config.auth.api_keys.clone();
        pki.configure(config);
        config.auth.api_keys = keys;
        config
            .policy
            .identities
            .insert(CRM_BY_CERTIFICATE.to_owned(), entry("app", None));
        adjust(config);
    })
    .await
}

/// The `action` entries for `rpc` whose detail contains `needle`.
async fn entries(tv: &TestVault, action: &str, rpc: &str, needle: &str) -> Vec<AuditRow> {
    audit(&tv.vault, action)
        .await
        .into_iter()
        .filter(|r| r.draft.target == rpc && r.draft.detail.contains(needle))
        .collect()
}

/// Asserts that `refused` (the refusals of one call) is one entry naming
/// `identity`, without a role, denied.
fn assert_refusal_of(identity: &str, refused: &[AuditRow]) {
    let [row] = refused else {
        panic!("one authn.method entry for {identity}: {refused:?}");
    };
    assert_eq!(row.draft.actor, identity, "{row:?}");
    assert_eq!(row.draft.role, "", "{row:?}");
    assert_eq!(row.draft.outcome, "denied", "{row:?}");
}

async fn a_certificate_never_reaches_an_api_key_identity(backend: Backend) {
    let pki = Pki::generate();
    let Some(tv) = spawn_tls_vault(backend, &pki, |_| {}).await else {
        return;
    };
    let id = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.api-key-identity-token",
        None,
    )
    .await
    .id
    .to_string();
    let ca = pki.ca.pem();

    // Signed by the trusted CA, its DNS SAN spelling the admin's API-key
    // identity: the finding's `lab-admin` certificate.
    let dns_admin = pki.ca.client("lab-admin", vec![dns(As::Admin.identity())]);
    let channel = tls_channel(tv.grpc_addr, &ca, Some(&dns_admin))
        .await
        .expect("a certificate from the trusted CA completes the handshake");
    let err = AdminServiceClient::new(channel)
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect_err("a certificate got the role of the admin's API-key identity");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(NOT_BY_CERTIFICATE), "{err:?}");
    assert_refusal_of(
        As::Admin.identity(),
        &entries(&tv, "authn.method", KEY_STATUS, NOT_BY_CERTIFICATE).await,
    );

    // The same through a URI SAN spelling the calendar worker's identity.
    let uri_worker = pki
        .ca
        .client("calendar-sync", vec![uri(As::Worker.identity())]);
    let channel = tls_channel(tv.grpc_addr, &ca, Some(&uri_worker))
        .await
        .expect("a certificate from the trusted CA completes the handshake");
    let err = LeaseServiceClient::new(channel)
        .lease_token(lease_request(&id))
        .await
        .expect_err("a certificate leased as the worker's API-key identity");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_refusal_of(
        As::Worker.identity(),
        &entries(&tv, "authn.method", LEASE_TOKEN, NOT_BY_CERTIFICATE).await,
    );
    assert!(
        audit(&tv.vault, "lease.grant").await.is_empty(),
        "a refused certificate leased"
    );

    // The identities' own keys work on the same listener, from loopback.
    let keyed = tls_channel(tv.grpc_addr, &ca, None)
        .await
        .expect("TLS without a client certificate (API keys are configured)");
    AdminServiceClient::with_interceptor(keyed.clone(), bearer(&As::Admin.key()))
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect("the admin's API key works on loopback");
    let lease = LeaseServiceClient::with_interceptor(keyed, bearer(&As::Worker.key()))
        .lease_token(lease_request(&id))
        .await
        .expect("the worker's API key leases on loopback")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.api-key-identity-token");
    let served: Vec<AuditRow> = audit(&tv.vault, "admin.call")
        .await
        .into_iter()
        .filter(|r| r.draft.detail == KEY_STATUS)
        .collect();
    assert_eq!(served.len(), 1, "only the key's call reached the handler");
    assert_eq!(served[0].draft.actor, As::Admin.identity());
}
both_backends!(
    certificate_to_api_key_identity,
    a_certificate_never_reaches_an_api_key_identity
);

async fn an_identity_that_authenticates_by_certificate_refuses_its_api_key(backend: Backend) {
    let pki = Pki::generate();
    let Some(tv) = spawn_tls_vault(backend, &pki, |config| {
        config
            .policy
            .identities
            .get_mut(As::Worker.identity())
            .expect("the worker is in the test policy")
            .authenticate = Some(AuthMethod::Certificate);
        assert!(
            config
                .auth
                .api_keys
                .iter()
                .any(|k| k.identity == As::Worker.identity()),
            "the worker keeps its API key"
        );
    })
    .await
    else {
        return;
    };
    let id = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.certificate-identity-token",
        None,
    )
    .await
    .id
    .to_string();
    let ca = pki.ca.pem();

    // The configuration is accepted, and says the key is useless.
    let log = String::from_utf8_lossy(&crate::support::logs::captured()).into_owned();
    assert!(
        log.lines()
            .any(|l| l.contains("API keys of this identity are refused")
                && l.contains(As::Worker.identity())),
        "no warning that the worker's API keys are refused"
    );

    // Its key, valid and configured, is refused from loopback.
    let keyed = tls_channel(tv.grpc_addr, &ca, None)
        .await
        .expect("TLS without a client certificate (API keys are configured)");
    let err = LeaseServiceClient::with_interceptor(keyed, bearer(&As::Worker.key()))
        .lease_token(lease_request(&id))
        .await
        .expect_err("the key of an identity that authenticates by certificate leased");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(NOT_BY_API_KEY), "{err:?}");
    assert_refusal_of(
        As::Worker.identity(),
        &entries(&tv, "authn.method", LEASE_TOKEN, NOT_BY_API_KEY).await,
    );
    assert!(audit(&tv.vault, "lease.grant").await.is_empty());

    // Its certificate works.
    let worker = pki
        .ca
        .client("calendar-sync", vec![uri(As::Worker.identity())]);
    let channel = tls_channel(tv.grpc_addr, &ca, Some(&worker))
        .await
        .expect("the worker connects over mTLS");
    let lease = LeaseServiceClient::new(channel)
        .lease_token(lease_request(&id))
        .await
        .expect("the worker leases by certificate")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.certificate-identity-token");
    let grants = audit(&tv.vault, "lease.grant").await;
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0].draft.actor, As::Worker.identity());
}
both_backends!(
    certificate_identity_with_a_key,
    an_identity_that_authenticates_by_certificate_refuses_its_api_key
);

async fn api_key_without_a_key_is_refused_at_start_and_at_reload(backend: Backend) {
    // A typo of the admin's identity: no key names it.
    const TYPO: &str = "test-admn";
    // The policy in its own file, so that the in-process server can reload it
    // (its API keys are fixed: it has no configuration file).
    let Some(tv) = spawn_vault_with(backend, |config| {
        let path = config.data_dir.join("policy.toml");
        std::fs::write(&path, policy_toml(config, "")).expect("write the policy file");
        config.policy.file = Some(path);
        config.policy.identities.clear();
        config.policy.purposes.clear();
    })
    .await
    else {
        return;
    };
    let written = test_config(tv.dir.path(), &tv.database_url);
    let policy_file = tv.config.policy.file.clone().expect("a policy file");

    // At start: inline, and in a policy file.
    let mut inline = written.clone();
    inline
        .policy
        .identities
        .insert(TYPO.to_owned(), entry("admin", Some(AuthMethod::ApiKey)));
    let e = inline
        .validate()
        .expect_err("api_key for an identity without a key");
    assert_eq!(e.setting, "policy", "{e}");
    assert!(
        e.problem
            .contains(&format!("identities.\"{TYPO}\".authenticate")),
        "{e}"
    );
    let e = inline
        .policy_source()
        .expect_err("api_key for an identity without a key");
    assert!(e.contains(TYPO), "{e}");
    let bad_file = tv.dir.path().join("typo-policy.toml");
    std::fs::write(&bad_file, policy_toml(&inline, "")).expect("write the policy file");
    let mut from_file = tv.config.clone();
    from_file.policy.file = Some(bad_file);
    let e = from_file
        .policy_source()
        .expect_err("api_key for an identity without a key, in a policy file");
    assert!(e.contains(TYPO) && e.contains("authenticate"), "{e}");

    // At reload: refused whole; the policy in force stays (the app, which
    // the refused policy drops, keeps its role).
    let mut refused = inline.clone();
    refused.policy.identities.remove(As::App.identity());
    std::fs::write(&policy_file, policy_toml(&refused, "")).expect("write the policy file");
    let server = tv.server.as_ref().expect("the server runs");
    let e = server
        .reload_policy()
        .await
        .expect_err("the reload of a policy naming an API-key identity without a key");
    assert!(e.contains(TYPO), "{e}");
    let reloads = audit(&tv.vault, "policy.reload").await;
    let last = reloads.last().expect("the reload is audited");
    assert_eq!(last.draft.outcome, "failed", "{last:?}");
    assert!(last.draft.detail.contains(TYPO), "{last:?}");
    tv.connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("the app keeps its role: the refused policy is not in force");

    // A reload is built against the keys in force: `api_key` for the app,
    // which holds one, is accepted; `certificate` for the auditor takes
    // effect at once, refusing its key.
    let mut accepted = written.clone();
    accepted
        .policy
        .identities
        .get_mut(As::App.identity())
        .expect("the app is in the test policy")
        .authenticate = Some(AuthMethod::ApiKey);
    accepted
        .policy
        .identities
        .get_mut(As::Auditor.identity())
        .expect("the auditor is in the test policy")
        .authenticate = Some(AuthMethod::Certificate);
    std::fs::write(&policy_file, policy_toml(&accepted, "")).expect("write the policy file");
    server
        .reload_policy()
        .await
        .expect("a policy whose api_key identities hold keys reloads");
    tv.connections(As::App)
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("the app's key works");
    let err = tv
        .admin(As::Auditor)
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect_err("the auditor's key works although it authenticates by certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(NOT_BY_API_KEY), "{err:?}");
}
both_backends!(
    api_key_identity_without_a_key,
    api_key_without_a_key_is_refused_at_start_and_at_reload
);

async fn a_certificate_identity_is_reached_by_its_certificate_only(backend: Backend) {
    let pki = Pki::generate();
    let Some(tv) = spawn_tls_vault(backend, &pki, |_| {}).await else {
        return;
    };
    let ca = pki.ca.pem();
    let list = || pb::ListConnectionsRequest {
        tenant_id: "acme".into(),
        ..Default::default()
    };

    let crm = pki.ca.client("crm-backend", vec![uri(CRM_BY_CERTIFICATE)]);
    let channel = tls_channel(tv.grpc_addr, &ca, Some(&crm))
        .await
        .expect("the certificate identity connects over mTLS");
    ConnectionServiceClient::new(channel)
        .list_connections(list())
        .await
        .expect("the certificate identity lists connections by certificate");

    // No key exists for it: whatever a bearer says, nothing reaches it.
    let keyed = tls_channel(tv.grpc_addr, &ca, None)
        .await
        .expect("TLS without a client certificate (API keys are configured)");
    let forged = [
        CRM_BY_CERTIFICATE.to_owned(),
        format!(
            "tv-test-key-{}",
            CRM_BY_CERTIFICATE.replace(['/', ':'], "-")
        ),
        "x".repeat(43),
    ];
    for key in &forged {
        let err = ConnectionServiceClient::with_interceptor(keyed.clone(), bearer(key))
            .list_connections(list())
            .await
            .expect_err("a forged bearer reached the certificate identity");
        assert_eq!(err.code(), Code::Unauthenticated, "{key}: {err:?}");
        assert!(err.message().contains("unknown API key"), "{key}: {err:?}");
    }
    // Refused before any identity was found: audited as anonymous (the first
    // at once; the others counted into the end of the refusal window, see
    // `grpc::refusals`), never as the certificate identity.
    let audited = entries(&tv, "authn.refuse", LIST_CONNECTIONS, "unknown API key").await;
    assert!(!audited.is_empty(), "the forged bearers are not audited");
    assert!(
        audited.iter().all(|r| r.draft.actor == "anonymous"),
        "{audited:?}"
    );
    let listed: Vec<AuditRow> = audit(&tv.vault, "connection.list").await;
    assert_eq!(listed.len(), 1, "only the certificate listed: {listed:?}");
    assert_eq!(listed[0].draft.actor, CRM_BY_CERTIFICATE);
}
both_backends!(
    certificate_identity_by_bearer,
    a_certificate_identity_is_reached_by_its_certificate_only
);
