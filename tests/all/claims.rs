//! Security claims of the README that no other test proved, each against the
//! real server over TCP, on SQLite and on PostgreSQL:
//!
//! 1. API keys are accepted from loopback peers only (`loopback_only_*`): over
//!    the wire through a TLS listener reachable from this host's own
//!    non-loopback address, and through the public [`Authenticator`] for
//!    addresses no test host has.
//! 2. A revocation Google never confirms ends FAILED at the give-up limit: the
//!    outbox's retained copy is destroyed, the live tokens were destroyed all
//!    along, and FAILED counts as settled for the receipt
//!    (`revoke_give_up`).
//! 3. An incomplete receipt past `deletion.receipt_sla_hours` is overdue: it is
//!    flagged and listed by `ListDeletionReceipts { overdue_only }`, and stops
//!    being so once complete (`receipt_overdue`).
//! 4. A RISC Security Event Token whose `iat` is older than
//!    `risc.max_age_seconds` is refused and changes nothing at rest
//!    (`risc_stale_iat`).
//! 5. A RISC-driven deletion leaves neither the raw Google subject nor the
//!    email anywhere in the audit log (`risc_audit_pseudonymous`).
//! 6. Refresh-lock fencing: once a lock expired and was taken over, the stale
//!    holder cannot store its refresh (nor renew), whatever fence it presents;
//!    the new holder's write is the one stored (`refresh_fencing`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokenvault::domain::{Integration, Timestamp};
use tokenvault::google::sim::{Endpoint, Fault, GoogleSim};
use tokenvault::grpc::refusals::{RefusalAggregator, RefusalLimits, counted};
use tokenvault::grpc::transport::{CertIdentity, PeerInfo};
use tokenvault::grpc::{Authenticator, Role};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::admin_service_client::AdminServiceClient;
use tokenvault::store::{AuditFilter, AuditRow, RefreshedTokens};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint as GrpcEndpoint};

use crate::both_backends;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, Bearer, CALENDAR_SCOPE, CLIENT_ID, TestVault, connect, disconnect, post_risc,
    receipt, receipt_until, seed_connection, spawn_vault, spawn_vault_with,
    spawn_vault_with_google, start_google, use_google,
};

/// The simulator's default Google account, which `connect` signs in as.
const SUBJECT: &str = "sim-user-1";
const EMAIL: &str = "user1@sim.test";

/// Tables that change without any request (the audit chain, the replicas'
/// key heartbeat): left out when proving that a request changed nothing.
const BACKGROUND_TABLES: [&str; 4] = [
    "audit_log",
    "audit_head",
    "audit_checkpoints",
    "key_replicas",
];

// --- shared helpers ------------------------------------------------------------------------

/// Every audit entry whose action starts with `prefix`, oldest first.
async fn audit_rows(tv: &TestVault, prefix: &str) -> Vec<AuditRow> {
    tv.vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some(prefix.to_owned()),
                ascending: true,
                ..Default::default()
            },
            10_000,
        )
        .await
        .expect("query the audit log")
}

fn upstream(r: &pb::DeletionReceipt) -> pb::UpstreamRevocationState {
    assert_eq!(r.upstream_revocations.len(), 1, "{r:?}");
    pb::UpstreamRevocationState::try_from(r.upstream_revocations[0].state).unwrap()
}

async fn status_of(tv: &TestVault, id: &str) -> pb::ConnectionStatus {
    let c = tv
        .connections(As::App)
        .get_connection(pb::GetConnectionRequest {
            connection_id: id.into(),
        })
        .await
        .expect("GetConnection")
        .into_inner()
        .connection
        .unwrap();
    pb::ConnectionStatus::try_from(c.status).unwrap()
}

/// Acknowledges every event so far as `calendar-sync`.
async fn ack_everything(tv: &TestVault) {
    let head = tv.vault.store().event_state().await.unwrap().head;
    tv.events(As::Worker)
        .ack(pb::AckRequest {
            consumer: "calendar-sync".into(),
            cursor: u64::try_from(head).unwrap(),
        })
        .await
        .expect("Ack");
}

fn calendar_lease(connection_id: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.into(),
        purpose: "calendar_sync".into(),
        scopes: vec![CALENDAR_SCOPE.into()],
        min_valid_seconds: 0,
    }
}

/// A vault wired to a fresh Google simulator, its RISC receiver trusting the
/// simulator's signing keys.
async fn spawn_risc_vault(
    backend: Backend,
    max_age_seconds: u64,
) -> Option<(TestVault, GoogleSim)> {
    let sim = start_google().await;
    let tv = spawn_vault_with(backend, |c| {
        use_google(c, &sim);
        c.risc.jwks_uri = sim.jwks_uri();
        c.risc.issuer = sim.risc_issuer();
        c.risc.max_age_seconds = max_age_seconds;
    })
    .await?;
    Some((tv, sim))
}

// --- 1. API keys from loopback peers only ----------------------------------------------------

/// A CA and a server certificate for `localhost` signed by it: (CA PEM,
/// certificate PEM, key PEM).
fn server_pki() -> (String, String, String) {
    let dn = |name: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn
    };
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("claims test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca: CertifiedIssuer<'static, KeyPair> =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("localhost");
    params.subject_alt_names = vec![SanType::DnsName(
        "localhost".try_into().expect("ia5 dns name"),
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &ca)
        .expect("sign the server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// One of this host's own addresses that is not loopback, if it has one: the
/// source address the kernel picks towards a documentation address (a UDP
/// `connect` only looks up the route; nothing is sent).
fn non_loopback_local_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((Ipv4Addr::new(203, 0, 113, 1), 9)).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A TLS channel to `addr` trusting `ca_pem`, checking the name `localhost`,
/// presenting no client certificate.
async fn tls_channel(addr: SocketAddr, ca_pem: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    GrpcEndpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("TLS connection to {addr}: {e:?}"))
}

fn admin_with_key(channel: Channel, key: &str) -> AdminServiceClient<crate::support::Authed> {
    AdminServiceClient::with_interceptor(
        channel,
        Bearer(Some(format!("Bearer {key}").parse().expect("ascii key"))),
    )
}

/// End to end: the vault listens with TLS on every IPv4 address (allowed
/// beyond loopback because TLS is on), and the admin's API key is presented
/// over the same TLS listener twice, once from 127.0.0.1 and once from this
/// host's own non-loopback address — so the peer address the transport
/// records is the only difference. The loopback call is served; the other is
/// refused UNAUTHENTICATED before its handler runs, and the refusal is
/// audited. A host without a non-loopback address cannot run this half; it
/// says SKIPPED, and `loopback_only_authenticator` below still proves the
/// check for any address.
async fn api_keys_from_a_non_loopback_peer_are_refused_over_the_wire(backend: Backend) {
    let (ca_pem, server_cert, server_key) = server_pki();
    let Some(tv) = spawn_vault_with(backend, |c| {
        let cert = c.data_dir.join("claims-server.pem");
        let key = c.data_dir.join("claims-server.key");
        std::fs::write(&cert, &server_cert).expect("write the server certificate");
        std::fs::write(&key, &server_key).expect("write the server key");
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        c.grpc_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    })
    .await
    else {
        return;
    };
    let Some(ip) = non_loopback_local_ip() else {
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (network): {test}: this host has no non-loopback address to call from"
        );
        return;
    };
    let port = tv.grpc_addr.port();
    let key = As::Admin.key();

    let local = tls_channel(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &ca_pem).await;
    admin_with_key(local, &key)
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect("the admin key is accepted from loopback over TLS");

    let remote = tls_channel(SocketAddr::new(ip, port), &ca_pem).await;
    let err = admin_with_key(remote, &key)
        .key_status(pb::KeyStatusRequest {})
        .await
        .expect_err("the admin key must be refused from a non-loopback peer");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("loopback"), "{err:?}");

    let refusals: Vec<AuditRow> = audit_rows(&tv, "authn.refuse")
        .await
        .into_iter()
        .filter(|r| r.draft.target == "AdminService.KeyStatus")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].draft.outcome, "denied");
    assert!(
        refusals[0].draft.detail.contains("loopback peers only"),
        "{refusals:?}"
    );
    let served = audit_rows(&tv, "admin.call")
        .await
        .into_iter()
        .filter(|r| r.draft.detail == "AdminService.KeyStatus")
        .count();
    assert_eq!(served, 1, "only the loopback call reached the handler");
}
both_backends!(
    loopback_only_over_the_wire,
    api_keys_from_a_non_loopback_peer_are_refused_over_the_wire
);

/// A request carrying `key` as a bearer API key (if any) from `peer` (the
/// extension the gRPC transport attaches to every request).
fn request_from(peer: Option<PeerInfo>, key: Option<&str>) -> tonic::Request<()> {
    let mut request = tonic::Request::new(());
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii key"),
        );
    }
    if let Some(peer) = peer {
        request.extensions_mut().insert(peer);
    }
    request
}

/// The same check through the public [`Authenticator`] the server builds
/// (same API keys, same policy, the real vault's audit log), for peer
/// addresses a test host cannot call from: private, documentation, IPv6
/// global and link-local, IPv4-mapped, and no address at all. Every one is
/// refused with a valid admin key while 127.0.0.0/8 and ::1 are accepted, and
/// a verified client certificate from a non-loopback address is still
/// accepted: the address limits API keys, not callers. (The certificate names
/// an admin identity of its own: the admin's API-key identity cannot be
/// reached by certificate, see `identities`.)
async fn api_keys_are_accepted_only_when_the_peer_is_loopback(backend: Backend) {
    const ADMIN_BY_CERTIFICATE: &str = "spiffe://tokenvault.test/admin-by-certificate";
    let Some(tv) = spawn_vault_with(backend, |c| {
        c.policy.identities.insert(
            ADMIN_BY_CERTIFICATE.to_owned(),
            tokenvault::policy::IdentityEntry {
                role: "admin".to_owned(),
                purposes: vec![],
                consumers: vec![],
                authenticate: None,
            },
        );
    })
    .await
    else {
        return;
    };
    const RPC: &str = "AdminService.KeyStatus";
    let policy = tv.server.as_ref().expect("the server runs").policy.clone();
    // Its own refusal aggregator, flushed below: the refusals this test
    // makes are counted apart from the server's.
    let refusals = Arc::new(RefusalAggregator::new(RefusalLimits::from(
        &tv.config.audit,
    )));
    let auth = Authenticator::new(&tv.config.auth, policy, refusals.clone());
    let key = As::Admin.key();

    for (remote, tls) in [
        ("127.0.0.1:50123", false),
        ("127.8.9.10:2", true),
        ("[::1]:50123", false),
        // An IPv4 loopback peer of a dual-stack `[::]` listener.
        ("[::ffff:127.0.0.1]:50123", true),
    ] {
        let peer = PeerInfo {
            remote: Some(remote.parse().unwrap()),
            tls,
            certificate: None,
        };
        let caller = auth
            .authorize(
                &tv.vault,
                &request_from(Some(peer), Some(&key)),
                RPC,
                &[Role::Admin],
            )
            .await
            .unwrap_or_else(|e| panic!("{remote}: the admin key was refused: {e:?}"));
        assert_eq!(caller.identity, As::Admin.identity());
        assert_eq!(caller.role, Role::Admin);
    }

    let mut refused = 0;
    let non_loopback = [
        "10.0.0.1:50123",
        "192.168.1.20:50123",
        "203.0.113.9:443",
        "[2001:db8::1]:50123",
        "[fe80::1]:50123",
        "[::ffff:10.0.0.1]:50123",
    ];
    let mut peers: Vec<(String, Option<PeerInfo>)> = Vec::new();
    for remote in non_loopback {
        for tls in [false, true] {
            peers.push((
                format!("{remote} tls={tls}"),
                Some(PeerInfo {
                    remote: Some(remote.parse().unwrap()),
                    tls,
                    certificate: None,
                }),
            ));
        }
    }
    peers.push((
        "unknown address".to_owned(),
        Some(PeerInfo {
            remote: None,
            tls: false,
            certificate: None,
        }),
    ));
    peers.push(("no transport information".to_owned(), None));
    for (what, peer) in peers {
        let Err(err) = auth
            .authorize(
                &tv.vault,
                &request_from(peer, Some(&key)),
                RPC,
                &[Role::Admin],
            )
            .await
        else {
            panic!("{what}: the admin key must be refused");
        };
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(err.message().contains("loopback"), "{what}: {err:?}");
        refused += 1;
    }

    let by_certificate = PeerInfo {
        remote: Some("10.0.0.1:50123".parse().unwrap()),
        tls: true,
        certificate: Some(CertIdentity::Named(ADMIN_BY_CERTIFICATE.to_owned())),
    };
    let caller = auth
        .authorize(
            &tv.vault,
            &request_from(Some(by_certificate), None),
            RPC,
            &[Role::Admin],
        )
        .await
        .expect("a verified certificate identifies a non-loopback caller");
    assert_eq!(caller.identity, ADMIN_BY_CERTIFICATE);

    // Refusals are aggregated per peer address and reason (see
    // `refusals`): each source's first is written at once, the rest when the
    // window closes; between them they count every refusal.
    refusals.flush(tv.vault.audit()).await;
    let audited: u64 = audit_rows(&tv, "authn.refuse")
        .await
        .into_iter()
        .filter(|r| r.draft.target == RPC && r.draft.detail.contains("loopback peers only"))
        .map(|r| counted(&r.draft.detail).expect("a refusal entry says how many it counts"))
        .sum();
    assert_eq!(
        audited, refused,
        "every refusal is counted in the audit log"
    );
}
both_backends!(
    loopback_only_authenticator,
    api_keys_are_accepted_only_when_the_peer_is_loopback
);

// --- 2. a revocation Google never confirms ends FAILED ---------------------------------------

/// Google answers 503 to every revoke. The outbox retries; once the give-up
/// time has passed, the next pass settles the revocation FAILED and destroys
/// the retained copy. `deletion.revoke_give_up_days` is whole days (at least
/// 1), so the test moves the outbox row's `give_up_at` into the past, as if
/// the days had gone by; the vault's own worker does the rest.
async fn a_revocation_google_never_confirms_ends_failed(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.deletion.inline_revoke_timeout_ms = 500;
        c.deletion.outbox_initial_backoff_ms = 100;
        c.deletion.outbox_max_backoff_seconds = 1;
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    sim.inject(Endpoint::Revoke, Fault::Status(503), None);

    let r = disconnect(&tv, &cal.connection_id).await;
    assert_eq!(upstream(&r), pb::UpstreamRevocationState::Pending, "{r:?}");
    assert!(r.tokens_destroyed_at.is_some());
    let raw = RawDb::open(&tv).await;
    assert!(raw.secret_row(&cal.connection_id).await.is_none());

    // The outbox keeps trying; Google keeps failing.
    let retried = receipt_until(
        &tv,
        &r.receipt_id,
        Duration::from_secs(20),
        "3 attempts",
        |r| r.upstream_revocations[0].attempts >= 3,
    )
    .await;
    assert_eq!(upstream(&retried), pb::UpstreamRevocationState::Pending);
    assert!(
        retried.upstream_revocations[0].last_error.contains("503"),
        "{retried:?}"
    );
    assert_eq!(tv.vault.store().outbox_depth().await.unwrap().0, 1);

    let past = Timestamp::now().as_micros() - 1_000_000;
    raw.execute(&format!(
        "UPDATE revocation_outbox SET give_up_at = {past}, next_attempt_at = 0 \
         WHERE receipt_id = '{}'",
        r.receipt_id
    ))
    .await;

    let failed = receipt_until(&tv, &r.receipt_id, Duration::from_secs(20), "FAILED", |r| {
        upstream(r) == pb::UpstreamRevocationState::Failed
    })
    .await;
    let revocation = &failed.upstream_revocations[0];
    assert!(revocation.failed_at.is_some(), "{failed:?}");
    assert!(revocation.confirmed_at.is_none(), "{failed:?}");
    assert!(revocation.next_attempt_at.is_none(), "{failed:?}");
    assert!(revocation.last_error.contains("give-up"), "{failed:?}");
    assert!(sim.calls(Endpoint::Revoke) >= 3);
    assert_eq!(sim.revocations(), 0, "Google never confirmed");
    assert!(!sim.grant_revoked(SUBJECT, CLIENT_ID));
    assert_eq!(
        tv.vault.store().outbox_depth().await.unwrap().0,
        0,
        "the retained copy is destroyed on giving up"
    );
    let settled: Vec<AuditRow> = audit_rows(&tv, "google.revoke").await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert_eq!(settled[0].draft.outcome, "failed");
    assert_eq!(settled[0].draft.target, cal.connection_id);
    assert!(
        settled[0].draft.detail.contains(&r.receipt_id),
        "{settled:?}"
    );

    // The give-up concerns Google only: the tokens are gone, the connection is
    // a tombstone, and nothing can be leased.
    assert!(raw.secret_row(&cal.connection_id).await.is_none());
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::Deleted
    );
    let err = tv
        .leases(As::Worker)
        .lease_token(calendar_lease(&cal.connection_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // FAILED is settled: the consumer's ack completes the receipt.
    assert_eq!(failed.status, pb::ReceiptStatus::Pending as i32);
    ack_everything(&tv).await;
    let done = receipt_until(
        &tv,
        &r.receipt_id,
        Duration::from_secs(5),
        "COMPLETE",
        |r| r.status == pb::ReceiptStatus::Complete as i32,
    )
    .await;
    assert_eq!(upstream(&done), pb::UpstreamRevocationState::Failed);
    assert!(done.completed_at.is_some());
    raw.close().await;
}
both_backends!(
    revoke_give_up,
    a_revocation_google_never_confirms_ends_failed
);

// --- 3. an incomplete receipt past its SLA is overdue ---------------------------------------

async fn overdue_receipts(tv: &TestVault) -> Vec<pb::DeletionReceipt> {
    tv.admin(As::Auditor)
        .list_deletion_receipts(pb::ListDeletionReceiptsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await
        .expect("ListDeletionReceipts")
        .into_inner()
        .receipts
}

/// `deletion.receipt_sla_hours` is whole hours (at least 1): the SLA is set to
/// its shortest, 1 h, and one receipt's `requested_at` is moved two hours
/// back, as if it had waited that long for `calendar-sync`'s ack. It becomes
/// overdue (polled for, with a deadline) while a receipt of the same age as
/// the test does not; once acknowledged and complete it is no longer overdue,
/// however old.
async fn an_incomplete_receipt_past_its_sla_is_overdue(backend: Backend) {
    let Some((tv, _sim)) = spawn_vault_with_google(backend, |c| {
        c.deletion.receipt_sla_hours = 1;
    })
    .await
    else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let young = seed_connection(
        &tv.vault,
        "t1",
        "u2",
        Integration::Calendar,
        "ya29.claims-young",
        Some("1//claims-young"),
    )
    .await;
    let old = disconnect(&tv, &cal.connection_id).await;
    let fresh = disconnect(&tv, young.id.as_str()).await;
    for r in [&old, &fresh] {
        assert_eq!(r.status, pb::ReceiptStatus::Pending as i32, "{r:?}");
        assert!(!r.overdue, "{r:?}");
    }
    assert!(overdue_receipts(&tv).await.is_empty());

    let raw = RawDb::open(&tv).await;
    raw.execute(&format!(
        "UPDATE deletion_receipts SET requested_at = requested_at - {} WHERE receipt_id = '{}'",
        2 * 3_600_000_000_i64,
        old.receipt_id
    ))
    .await;
    raw.close().await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = overdue_receipts(&tv).await;
        if listed.iter().any(|r| r.receipt_id == old.receipt_id) {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "receipt {} never listed as overdue: {listed:?}",
            old.receipt_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: Vec<&str> = listed.iter().map(|r| r.receipt_id.as_str()).collect();
    assert_eq!(
        ids,
        [old.receipt_id.as_str()],
        "only the old receipt is overdue"
    );
    assert!(listed[0].overdue);
    assert_eq!(listed[0].status, pb::ReceiptStatus::Pending as i32);
    assert!(receipt(&tv, &old.receipt_id).await.overdue);
    assert!(!receipt(&tv, &fresh.receipt_id).await.overdue);

    ack_everything(&tv).await;
    let done = receipt_until(
        &tv,
        &old.receipt_id,
        Duration::from_secs(5),
        "COMPLETE",
        |r| r.status == pb::ReceiptStatus::Complete as i32,
    )
    .await;
    assert!(
        !done.overdue,
        "a complete receipt is never overdue: {done:?}"
    );
    assert!(
        !overdue_receipts(&tv)
            .await
            .iter()
            .any(|r| r.receipt_id == old.receipt_id)
    );
}
both_backends!(
    receipt_overdue,
    an_incomplete_receipt_past_its_sla_is_overdue
);

// --- 4. a RISC token older than max_age is refused ------------------------------------------

const RISC_MAX_AGE_SECONDS: u64 = 600;

/// A `tokens-revoked` Security Event Token's claims for [`SUBJECT`].
fn tokens_revoked_claims(sim: &GoogleSim, iat: i64, jti: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": sim.risc_issuer(),
        "aud": CLIENT_ID,
        "iat": iat,
        "jti": jti,
        "events": {
            "https://schemas.openid.net/secevent/risc/event-type/tokens-revoked": {
                "subject": {"subject_type": "iss-sub", "iss": sim.risc_issuer(), "sub": SUBJECT}
            }
        },
    })
}

/// Tables whose rows differ between two snapshots.
fn changed_tables(
    before: &BTreeMap<String, Vec<String>>,
    after: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    before
        .keys()
        .chain(after.keys())
        .filter(|t| before.get(*t) != after.get(*t))
        .cloned()
        .collect()
}

/// A correctly signed `tokens-revoked` token for a live connection's subject,
/// issued two minutes before the `max_age_seconds` window: 400, nothing at
/// rest changes, the connection stays ACTIVE and leasable. The control is the
/// very same token (same `jti`) issued two minutes inside the window: 202 and
/// the cascade runs — so the refusal was the age, and it did not spend the
/// `jti` either.
async fn a_risc_token_older_than_max_age_is_refused_and_changes_nothing(backend: Backend) {
    let Some((tv, sim)) = spawn_risc_vault(backend, RISC_MAX_AGE_SECONDS).await else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let now = Timestamp::now().seconds_nanos().0;
    let max_age = i64::try_from(RISC_MAX_AGE_SECONDS).unwrap();
    let jti = "claims-stale-iat-1";

    let stale = sim.sign_claims(tokens_revoked_claims(&sim, now - max_age - 120, jti));
    let raw = RawDb::open(&tv).await;
    let before = raw.snapshot(&BACKGROUND_TABLES).await;
    let (status, body) = post_risc(&tv, &stale).await;
    let after = raw.snapshot(&BACKGROUND_TABLES).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("iat"), "{body}");
    let changed = changed_tables(&before, &after);
    assert!(changed.is_empty(), "a stale token changed {changed:?}");
    assert!(
        audit_rows(&tv, "risc.").await.is_empty(),
        "a refused token is not processed"
    );
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::Active
    );
    assert!(raw.secret_row(&cal.connection_id).await.is_some());
    tv.leases(As::Worker)
        .lease_token(calendar_lease(&cal.connection_id))
        .await
        .expect("still leasable after a stale RISC token");

    let recent = sim.sign_claims(tokens_revoked_claims(&sim, now - max_age + 120, jti));
    let (status, body) = post_risc(&tv, &recent).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        status_of(&tv, &cal.connection_id).await,
        pb::ConnectionStatus::RevokedUpstream
    );
    assert!(raw.secret_row(&cal.connection_id).await.is_none());
    raw.close().await;
}
both_backends!(
    risc_stale_iat,
    a_risc_token_older_than_max_age_is_refused_and_changes_nothing
);

// --- 5. RISC deletions keep the Google identity out of the audit log ------------------------

/// Two connections on one Google account; RISC `account-disabled`
/// (hijacking), then `tokens-revoked`, delete both. Afterwards every column of
/// every row of the audit tables, read as text with raw SQL, holds neither
/// the raw subject nor the email — while the same scan finds both in the
/// `connections` table beforehand, and finds the RISC entries (which name the
/// subject by an HMAC) afterwards.
async fn a_risc_deletion_leaves_no_subject_or_email_in_the_audit_log(backend: Backend) {
    let Some((tv, sim)) = spawn_risc_vault(backend, 3_600).await else {
        return;
    };
    let cal = connect(&tv, "t1", "u1", pb::Integration::Calendar).await;
    let mail = connect(&tv, "t1", "u1", pb::Integration::Email).await;
    for c in [&cal, &mail] {
        assert_eq!(c.google_subject, SUBJECT);
        assert_eq!(c.google_email, EMAIL);
    }
    let raw = RawDb::open(&tv).await;
    let before = raw.snapshot(&[]).await;
    let stored = before.get("connections").expect("the connections table");
    assert!(
        stored
            .iter()
            .any(|row| row.contains(SUBJECT) && row.contains(EMAIL)),
        "the scan must see the subject and email where they are stored: {stored:?}"
    );

    let disabled = sim.sign_risc_event(
        CLIENT_ID,
        "account-disabled",
        SUBJECT,
        serde_json::json!({"reason": "hijacking"}),
    );
    let (status, body) = post_risc(&tv, &disabled).await;
    assert_eq!(status, 202, "{body}");
    let revoked = sim.sign_risc_event(CLIENT_ID, "tokens-revoked", SUBJECT, serde_json::json!({}));
    let (status, body) = post_risc(&tv, &revoked).await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in [&cal, &mail] {
        loop {
            let now = status_of(&tv, &c.connection_id).await;
            if now == pb::ConnectionStatus::RevokedUpstream {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not deleted: {now:?}",
                c.connection_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(raw.secret_row(&c.connection_id).await.is_none());
    }

    let risc = audit_rows(&tv, "risc.event").await;
    assert_eq!(risc.len(), 2, "{risc:?}");
    for r in &risc {
        assert_eq!(r.draft.actor, "google");
        assert!(r.draft.target.starts_with("google-subject:"), "{r:?}");
    }
    assert_eq!(
        risc[0].draft.target, risc[1].draft.target,
        "one pseudonym per subject"
    );
    let deletions: Vec<String> = audit_rows(&tv, "deletion.request")
        .await
        .into_iter()
        .filter(|r| r.draft.actor == "google")
        .map(|r| r.draft.target)
        .collect();
    for c in [&cal, &mail] {
        let target = format!("connection:{}", c.connection_id);
        assert!(deletions.contains(&target), "{target} not in {deletions:?}");
    }

    let after = raw.snapshot(&[]).await;
    raw.close().await;
    let audit_log = after.get("audit_log").expect("the audit_log table");
    assert!(
        audit_log.iter().any(|row| row.contains("risc.event")),
        "the scan covers the RISC entries"
    );
    let mut leaks = Vec::new();
    for (table, rows) in after.iter().filter(|(t, _)| t.starts_with("audit")) {
        for row in rows {
            for needle in [SUBJECT, EMAIL] {
                if row.contains(needle) {
                    leaks.push(format!("{table}: {needle:?} in {row}"));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "the audit log names the Google account:\n{}",
        leaks.join("\n")
    );
}
both_backends!(
    risc_audit_pseudonymous,
    a_risc_deletion_leaves_no_subject_or_email_in_the_audit_log
);

// --- 6. refresh-lock fencing -----------------------------------------------------------------

/// At the store, as two replicas would: A takes the lock; B cannot while it
/// lives; at a time past A's expiry B takes over with a higher fence. Then
/// A's renewal and A's refresh write are refused with its own fence and with
/// B's, and the stored secrets stay untouched; B's write is stored. After B
/// releases and A takes the lock again (same holder name, newer fence), a
/// write with A's first fence and one with B's released fence are refused
/// too: the fence, not the holder name, decides. (The existing
/// `refresh_lock_takeover` test proves only that B takes over a dead
/// holder's lock; no test wrote with a stale fence.)
async fn a_stale_refresh_lock_holder_cannot_store_its_refresh(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let store = tv.vault.store();
    let conn = seed_connection(
        &tv.vault,
        "fence",
        "u1",
        Integration::Calendar,
        "ya29.claims-before",
        Some("1//claims-before"),
    )
    .await;
    let id = conn.id.clone();
    let before = store.secrets_get(&id).await.unwrap().expect("secrets");
    let ttl = Duration::from_secs(3);
    let later = Timestamp::now().plus(Duration::from_secs(7 * 86_400));
    let tokens = |access: &'static [u8], refresh: &'static [u8]| RefreshedTokens {
        access_token: access,
        access_expires_at: Timestamp::now().plus(Duration::from_secs(3_600)),
        refresh_token: Some(refresh),
        at: Timestamp::now(),
        next_check_at: later,
    };
    let stale = tokens(
        b"sealed-access-from-stale-a",
        b"sealed-refresh-from-stale-a",
    );

    let t0 = store.clock().await.unwrap();
    let fence_a = store
        .refresh_lock_acquire(&id, "replica-a", t0, t0.plus(ttl))
        .await
        .unwrap()
        .expect("A takes the free lock");
    assert_eq!(
        store
            .refresh_lock_acquire(&id, "replica-b", t0, t0.plus(ttl))
            .await
            .unwrap(),
        None,
        "B cannot take a live lock"
    );
    let t1 = t0.plus(ttl + Duration::from_secs(1));
    let fence_b = store
        .refresh_lock_acquire(&id, "replica-b", t1, t1.plus(ttl))
        .await
        .unwrap()
        .expect("B takes over the expired lock");
    assert!(
        fence_b > fence_a,
        "takeover raises the fence: {fence_a} -> {fence_b}"
    );

    assert!(
        !store
            .refresh_lock_renew(&id, "replica-a", fence_a, t1.plus(ttl))
            .await
            .unwrap(),
        "A cannot renew a lock it lost"
    );
    for fence in [fence_a, fence_b] {
        assert!(
            !store
                .secrets_refresh(&id, "replica-a", fence, &stale)
                .await
                .unwrap(),
            "A's write with fence {fence} must be refused"
        );
    }
    let untouched = store.secrets_get(&id).await.unwrap().expect("secrets");
    assert_eq!(untouched.access_token, before.access_token);
    assert_eq!(untouched.refresh_token, before.refresh_token);
    assert_eq!(untouched.access_expires_at, before.access_expires_at);
    assert_eq!(untouched.updated_at, before.updated_at);

    let fresh = tokens(b"sealed-access-from-b", b"sealed-refresh-from-b");
    assert!(
        store
            .secrets_refresh(&id, "replica-b", fence_b, &fresh)
            .await
            .unwrap(),
        "the current holder's write is stored"
    );
    let stored = store.secrets_get(&id).await.unwrap().expect("secrets");
    assert_eq!(
        stored.access_token.as_deref(),
        Some(&b"sealed-access-from-b"[..])
    );
    assert_eq!(
        stored.refresh_token.as_deref(),
        Some(&b"sealed-refresh-from-b"[..])
    );

    store
        .refresh_lock_release(&id, "replica-b", fence_b)
        .await
        .unwrap();
    let fence_a2 = store
        .refresh_lock_acquire(&id, "replica-a", t1, t1.plus(ttl))
        .await
        .unwrap()
        .expect("A takes the released lock");
    assert!(fence_a2 > fence_b, "{fence_b} -> {fence_a2}");
    assert!(
        !store
            .secrets_refresh(&id, "replica-a", fence_a, &stale)
            .await
            .unwrap(),
        "the same holder with its earlier fence is refused"
    );
    assert!(
        !store
            .secrets_refresh(&id, "replica-b", fence_b, &stale)
            .await
            .unwrap(),
        "a released fence is refused"
    );
    let stored = store.secrets_get(&id).await.unwrap().expect("secrets");
    assert_eq!(
        stored.access_token.as_deref(),
        Some(&b"sealed-access-from-b"[..])
    );
    assert_eq!(
        stored.refresh_token.as_deref(),
        Some(&b"sealed-refresh-from-b"[..])
    );
}
both_backends!(
    refresh_fencing,
    a_stale_refresh_lock_holder_cannot_store_its_refresh
);
