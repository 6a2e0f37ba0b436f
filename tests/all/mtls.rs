//! Mutual TLS on the gRPC listener, end to end over real TLS: callers are
//! identified by their verified client certificate (URI SAN, else DNS SAN),
//! certificates from an unknown CA or past their validity are refused at the
//! handshake and audited, and `SIGHUP` swaps the access policy without
//! dropping connections (and keeps the old one when the new one is invalid).
//!
//! Every certificate is generated at test time with `rcgen`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokenvault::config::Config;
use tokenvault::domain::Integration;
use tokenvault::policy::IdentityEntry;
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::event_service_client::EventServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tokenvault::store::{AuditFilter, AuditRow};
use tokenvault::vault::Vault;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::both_backends;
use crate::serve_cli::ServeProcess;
use crate::support::{
    As, Backend, Bearer, CALENDAR_SCOPE, TestVault, policy_toml, seed_connection, spawn_vault,
    spawn_vault_with, write_config_file,
};

/// The identity of the DNS-SAN-only application certificate.
const APP_DNS: &str = "app.tokenvault.test";

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub(crate) struct Pem {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Pem {
    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }
}

/// A test certificate authority.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate signed by this CA; `expired` puts its validity in the past.
    fn leaf(
        &self,
        name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Pem {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub(crate) fn client(&self, name: &str, sans: Vec<SanType>) -> Pem {
        self.leaf(name, sans, ExtendedKeyUsagePurpose::ClientAuth, false)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

pub(crate) fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().expect("ia5 uri"))
}

pub(crate) fn dns(d: &str) -> SanType {
    SanType::DnsName(d.try_into().expect("ia5 dns name"))
}

/// The vault's CA and server certificate, and the client certificates the
/// tests present.
pub(crate) struct Pki {
    pub(crate) ca: Ca,
    server: Pem,
    pub(crate) worker: Pem,
    app: Pem,
    no_san: Pem,
    /// Names the worker, but signed by a CA the vault does not trust.
    pub(crate) untrusted_worker: Pem,
    /// Names the worker, signed by the right CA, expired.
    pub(crate) expired_worker: Pem,
}

impl Pki {
    pub(crate) fn generate() -> Self {
        let ca = Ca::new("tokenvault test CA");
        let server = ca.leaf(
            "localhost",
            vec![
                dns("localhost"),
                SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let worker = ca.client("calendar-sync", vec![uri(As::Worker.identity())]);
        let app = ca.client("app", vec![dns(APP_DNS)]);
        let no_san = ca.client("anonymous", vec![]);
        let rogue = Ca::new("some other CA");
        let untrusted_worker = rogue.client("calendar-sync", vec![uri(As::Worker.identity())]);
        let expired_worker = ca.leaf(
            "calendar-sync",
            vec![uri(As::Worker.identity())],
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        );
        Self {
            ca,
            server,
            worker,
            app,
            no_san,
            untrusted_worker,
            expired_worker,
        }
    }

    /// Writes the server side into `dir` and points `config` at it, with
    /// client certificates required (no API keys) and the DNS-SAN app in the
    /// policy.
    pub(crate) fn configure(&self, config: &mut Config) {
        let dir = config.data_dir.clone();
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        config.tls.cert_file = Some(write("server.pem", &self.server.cert));
        config.tls.key_file = Some(write("server.key", &self.server.key));
        config.tls.client_ca_file = Some(write("client-ca.pem", &self.ca.pem()));
        config.auth.api_keys.clear();
        config.policy.identities.insert(
            APP_DNS.to_owned(),
            IdentityEntry {
                role: "app".to_owned(),
                purposes: vec![],
                consumers: vec![],
                authenticate: None,
            },
        );
    }
}

/// Connects over TLS to the vault (trusting `ca_pem`, checking the server
/// name `localhost`), presenting `client` if given.
pub(crate) async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(pem) = client {
        tls = tls.identity(pem.identity());
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

pub(crate) fn lease_request(connection_id: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.to_owned(),
        purpose: "calendar_sync".to_owned(),
        scopes: vec![CALENDAR_SCOPE.to_owned()],
        min_valid_seconds: 60,
    }
}

pub(crate) async fn audit(vault: &Vault, action: &str) -> Vec<AuditRow> {
    vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some(action.to_owned()),
                ascending: true,
                ..Default::default()
            },
            1000,
        )
        .await
        .expect("query the audit log")
}

/// Starts a vault with mTLS required; the harness's own plain-text channel
/// is not used.
async fn spawn_mtls_vault(backend: Backend, pki: &Pki) -> Option<TestVault> {
    spawn_vault_with(backend, |config| pki.configure(config)).await
}

async fn mtls_identities_from_san(backend: Backend) {
    let pki = Pki::generate();
    let Some(tv) = spawn_mtls_vault(backend, &pki).await else {
        return;
    };
    let seeded = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.mtls-access-token",
        Some("1//mtls-refresh-token"),
    )
    .await;
    let id = seeded.id.to_string();
    let ca = pki.ca.pem();

    // The worker, named by its URI SAN, leases the seeded token…
    let worker = tls_channel(tv.grpc_addr, &ca, Some(&pki.worker))
        .await
        .expect("worker connects over mTLS");
    let lease = LeaseServiceClient::new(worker.clone())
        .lease_token(lease_request(&id))
        .await
        .expect("worker leases over mTLS")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.mtls-access-token");
    let grants = audit(&tv.vault, "lease.grant").await;
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0].draft.actor, As::Worker.identity());
    assert_eq!(grants[0].draft.role, "worker");

    // …but its role may not read connections.
    let err = ConnectionServiceClient::new(worker)
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The app, named by its DNS SAN alone, reads the connection.
    let app = tls_channel(tv.grpc_addr, &ca, Some(&pki.app))
        .await
        .expect("app connects over mTLS");
    let got = ConnectionServiceClient::new(app.clone())
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("app reads the connection")
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(got.connection_id, id);
    // The app may not lease.
    let err = LeaseServiceClient::new(app)
        .lease_token(lease_request(&id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A verified certificate without any SAN identifies nobody.
    let anonymous = tls_channel(tv.grpc_addr, &ca, Some(&pki.no_san))
        .await
        .expect("a SAN-less certificate from the CA completes the handshake");
    let err = ConnectionServiceClient::new(anonymous.clone())
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = LeaseServiceClient::new(anonymous)
        .lease_token(lease_request(&id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("SAN"), "{err:?}");

    let grants = audit(&tv.vault, "lease.grant").await;
    assert_eq!(grants.len(), 1, "only the worker leased: {grants:?}");
}
both_backends!(mtls_identities, mtls_identities_from_san);

/// An error followed by the `Display` of every error in its source chain,
/// lowercased: everything a client can learn of why a call failed.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{err:?}");
    let mut next = Some(err);
    while let Some(e) = next {
        text.push_str(" | ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text.to_lowercase()
}

/// What a client sees when the server refuses its certificate in the TLS
/// handshake: the server's fatal alert (rustls: "received fatal alert: …",
/// `AlertReceived(…)`), or — when the client was still writing as the server
/// hung up, or its connection task read the alert before a request could —
/// the peer resetting the connection, the pipe breaking, or hyper's
/// "connection closed". (A server that is not there gives "connection
/// refused" instead, and the trusted-certificate control around every
/// refusal shows the listener serving.)
const SERVER_REFUSED: [&str; 7] = [
    "received fatal alert",
    "alertreceived",
    "connection reset",
    "connectionreset",
    "broken pipe",
    "brokenpipe",
    "connection closed",
];

/// Failures that are not a refusal by a listening server: nothing listening
/// (TCP refused), a bad address, a timeout, or the client rejecting the
/// server's certificate.
const NOT_A_REFUSAL: [&str; 9] = [
    "connection refused",
    "connectionrefused",
    "dns error",
    "failed to lookup address",
    "invalid uri",
    "timed out",
    "timeout",
    "invalid peer certificate",
    "invalidcertificate",
];

/// Connects with `client` and makes calls: none may succeed, every failure
/// comes from the transport (not a gRPC answer of the vault), none is of the
/// kind a missing or unreachable server gives, and at least one shows the
/// server refusing the handshake. With TLS 1.3 the client's side of the
/// handshake completes before the server has verified its certificate, so the
/// refusal surfaces at connect or on the first use of the connection.
async fn refused(tv: &TestVault, ca: &str, client: Option<&Pem>, connection_id: &str, what: &str) {
    let mut failures = Vec::new();
    match tls_channel(tv.grpc_addr, ca, client).await {
        Err(e) => failures.push(error_chain(&e)),
        Ok(channel) => {
            for _ in 0..2 {
                let lease = match LeaseServiceClient::new(channel.clone())
                    .lease_token(lease_request(connection_id))
                    .await
                {
                    Ok(r) => panic!("{what}: lease {} was granted", r.into_inner().lease_id),
                    Err(status) => status,
                };
                let health = match HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) => panic!("{what}: a health check answered {:?}", r.into_inner()),
                    Err(status) => status,
                };
                for status in [lease, health] {
                    assert!(
                        std::error::Error::source(&status).is_some(),
                        "{what}: the vault answered instead of refusing the handshake: {status:?}"
                    );
                    failures.push(error_chain(&status));
                }
            }
        }
    }
    for failure in &failures {
        let wrong = NOT_A_REFUSAL.iter().find(|m| failure.contains(**m));
        assert!(
            wrong.is_none(),
            "{what}: failed with {wrong:?}, not a refused handshake: {failure}"
        );
    }
    assert!(
        failures
            .iter()
            .any(|f| SERVER_REFUSED.iter().any(|m| f.contains(m))),
        "{what}: no failure shows the server refusing the TLS handshake: {failures:#?}"
    );
}

/// The positive control for [`refused`]: the same listener completes a
/// handshake with a trusted certificate and answers over it.
async fn serves_trusted(tv: &TestVault, ca: &str, client: &Pem, when: &str) {
    let channel = tls_channel(tv.grpc_addr, ca, Some(client))
        .await
        .unwrap_or_else(|e| panic!("{when}: a trusted certificate cannot connect: {e:?}"));
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{when}: health over mTLS failed: {e:?}"))
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving, "{when}");
}

async fn untrusted_and_expired_certificates_are_refused_and_audited(backend: Backend) {
    let pki = Pki::generate();
    let Some(tv) = spawn_mtls_vault(backend, &pki).await else {
        return;
    };
    let seeded = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.never-leased",
        None,
    )
    .await;
    let id = seeded.id.to_string();
    let ca = pki.ca.pem();

    // The listener is up and serves a trusted worker: what follows is refused
    // for the certificate, not because nothing answers.
    serves_trusted(&tv, &ca, &pki.worker, "before the refusals").await;
    refused(
        &tv,
        &ca,
        Some(&pki.untrusted_worker),
        &id,
        "certificate from an unknown CA",
    )
    .await;
    refused(
        &tv,
        &ca,
        Some(&pki.expired_worker),
        &id,
        "expired certificate",
    )
    .await;
    refused(&tv, &ca, None, &id, "no client certificate").await;

    // The refusals are written after the failed handshake, asynchronously.
    let deadline = Instant::now() + Duration::from_secs(2);
    let refusals = loop {
        let rows: Vec<AuditRow> = audit(&tv.vault, "authn.refuse")
            .await
            .into_iter()
            .filter(|r| r.draft.target == "tls.handshake")
            .collect();
        let has = |needle: &str| rows.iter().any(|r| r.draft.detail.contains(needle));
        if (has("UnknownIssuer") && has("Expired") && has("no certificate presented"))
            || Instant::now() > deadline
        {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let details: Vec<&str> = refusals.iter().map(|r| r.draft.detail.as_str()).collect();
    for needle in ["UnknownIssuer", "Expired", "no certificate presented"] {
        assert!(
            details.iter().any(|d| d.contains(needle)),
            "no tls.handshake refusal mentioning {needle}; saw {details:?}"
        );
    }
    for r in &refusals {
        assert_eq!(r.draft.action, "authn.refuse");
        assert_eq!(r.draft.outcome, "denied", "{r:?}");
        // `tls:127.0.0.1:<port>`, or `tls:127.0.0.1` for an entry counting a
        // window's further refusals from that address (see `refusals`).
        assert!(r.draft.actor.starts_with("tls:127.0.0.1"), "{r:?}");
        assert_eq!(r.draft.role, "");
    }
    let grants = audit(&tv.vault, "lease.").await;
    assert!(grants.is_empty(), "something was leased: {grants:?}");

    // The listener still serves trusted clients afterwards.
    serves_trusted(&tv, &ca, &pki.worker, "after the refusals").await;
}
both_backends!(
    refused_certificates,
    untrusted_and_expired_certificates_are_refused_and_audited
);

fn bearer(who: As) -> Bearer {
    Bearer(Some(
        format!("Bearer {}", who.key()).parse().expect("ascii key"),
    ))
}

/// Polls `f` every 50 ms until it returns `Some`, at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_policy(path: &Path, config: &Config) {
    std::fs::write(path, policy_toml(config, "")).expect("write policy file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy() {
    // Seed through an in-process vault, then serve the same data directory
    // (database and keyring) from the binary.
    let Some(mut tv) = spawn_vault(Backend::Sqlite).await else {
        return;
    };
    let seeded = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.sighup-access-token",
        Some("1//sighup-refresh-token"),
    )
    .await;
    let id = seeded.id.to_string();
    tv.stop().await;

    let dir = tv.dir.path();
    let policy_path = dir.join("policy.toml");
    write_policy(&policy_path, &tv.config);
    let mut file_config = tv.config.clone();
    file_config.policy.file = Some(policy_path.clone());
    file_config.policy.identities.clear();
    file_config.policy.purposes.clear();
    let config_path = write_config_file(
        dir,
        &file_config,
        &format!("[policy]\nfile = {:?}\n", policy_path.display().to_string()),
    );
    let mut server = ServeProcess::start(
        dir,
        &["--config", config_path.to_str().expect("utf-8 path")],
        &[],
    );

    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to tokenvault serve");
    let mut leases = LeaseServiceClient::with_interceptor(channel.clone(), bearer(As::Worker));
    let mut app = ConnectionServiceClient::with_interceptor(channel.clone(), bearer(As::App));
    let mut health = HealthClient::new(channel.clone());
    let lease = leases
        .lease_token(lease_request(&id))
        .await
        .expect("lease under the first policy")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.sighup-access-token");

    // A stream opened before the reloads, on the same connection: it must
    // outlive them.
    let mut watch = EventServiceClient::with_interceptor(channel.clone(), bearer(As::Worker))
        .watch(pb::WatchRequest {
            consumer: "calendar-sync".to_owned(),
            after_cursor: None,
            kinds: vec![pb::EventKind::ConnectionDeleted as i32],
            integrations: vec![],
        })
        .await
        .expect("watch as calendar-sync")
        .into_inner();

    // The worker loses the purpose.
    let mut narrowed = tv.config.clone();
    narrowed
        .policy
        .identities
        .get_mut(As::Worker.identity())
        .expect("worker in the test policy")
        .purposes
        .clear();
    write_policy(&policy_path, &narrowed);
    server.signal("HUP");
    let denied = eventually(Duration::from_secs(2), || {
        let mut leases = leases.clone();
        let id = id.clone();
        async move {
            match leases.lease_token(lease_request(&id)).await {
                Err(e) if e.code() == Code::PermissionDenied => Some(e),
                _ => None,
            }
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "leases still granted 2 s after SIGHUP; log:\n{}",
            server.log_text()
        )
    });
    assert!(
        denied.message().contains("calendar_sync"),
        "{:?}",
        denied.message()
    );
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health on the same channel after the reload")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), watch.message())
            .await
            .is_err(),
        "the watch stream ended at the reload"
    );

    // An invalid policy is refused; the narrowed one stays in force.
    let mut invalid = narrowed.clone();
    invalid
        .policy
        .identities
        .get_mut(As::App.identity())
        .expect("app in the test policy")
        .role = "superuser".to_owned();
    write_policy(&policy_path, &invalid);
    server.signal("HUP");
    let refusal = eventually(Duration::from_secs(2), || {
        let lines = server.log.lock().unwrap().clone();
        std::future::ready(
            lines
                .into_iter()
                .find(|l| l.contains("policy reload refused")),
        )
    })
    .await
    .unwrap_or_else(|| panic!("no refused reload in the log:\n{}", server.log_text()));
    let line: serde_json::Value = serde_json::from_str(&refusal).expect("a JSON log line");
    assert_eq!(line["level"], "ERROR", "{refusal}");
    let reason = line["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unknown role") && reason.contains("superuser"),
        "the reason is not in the log line: {refusal}"
    );
    let err = leases.lease_token(lease_request(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let got = app
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.clone(),
        })
        .await
        .expect("the app keeps its role from the policy in force")
        .into_inner()
        .connection
        .unwrap();
    assert_eq!(got.connection_id, id);

    // Both reloads are audited.
    let reloads = AdminServiceClient::with_interceptor(channel.clone(), bearer(As::Auditor))
        .query_audit(pb::QueryAuditRequest {
            action: Some("policy.reload".to_owned()),
            ..Default::default()
        })
        .await
        .expect("query the audit log")
        .into_inner()
        .entries;
    let outcomes: Vec<i32> = reloads.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::AuditOutcome::Success as i32,
            pb::AuditOutcome::Failure as i32
        ],
        "{reloads:?}"
    );

    // The stream opened before both reloads still delivers.
    app.disconnect(pb::DisconnectRequest {
        connection_id: id.clone(),
        reason: "mtls test".to_owned(),
    })
    .await
    .expect("disconnect");
    let event = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the event reached the old stream")
        .expect("the stream is healthy")
        .expect("the stream is open");
    assert_eq!(event.kind, pb::EventKind::ConnectionDeleted as i32);
    assert_eq!(event.connection_id, id);

    drop((watch, leases, app, health, channel));
    server.signal("TERM");
    let exit = server.wait(Duration::from_secs(20));
    assert!(exit.success(), "exit {exit:?}; log:\n{}", server.log_text());
}
