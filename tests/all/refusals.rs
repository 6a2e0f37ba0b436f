//! Refused authentication cannot flood the audit log, and hides nothing: on
//! SQLite and on PostgreSQL,
//!
//! 1. an anonymous flood from many addresses and for several reasons writes
//!    at most `2 × audit.refusal_max_sources + 1` entries per
//!    `audit.refusal_window_seconds`, the `count=` of those entries adds up to
//!    exactly the calls refused, and an authenticated lease made during the
//!    flood is served (`anonymous_flood`);
//! 2. a caller with an identity that is denied is still audited once per
//!    call, and fails closed, while an anonymous refusal whose entry cannot be
//!    written gets the same answer and is counted in a later entry
//!    (`authenticated_denials`);
//! 3. handshakes refused for another CA's (or an expired) client certificate
//!    are aggregated the same way (`refused_handshakes`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokenvault::config::Config;
use tokenvault::domain::Integration;
use tokenvault::grpc::refusals::{HANDSHAKE, OVERFLOW, REFUSE, counted};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::store::{AuditFilter, AuditRow};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::both_backends;
use crate::mtls::{Pem, Pki, tls_channel};
use crate::support::{
    As, Authed, Backend, Bearer, TestVault, calendar_lease, seed_connection, spawn_vault_with,
};

/// `audit.refusal_window_seconds` in these tests.
const WINDOW_SECONDS: u64 = 1;
/// `audit.refusal_max_sources` in these tests.
const MAX_SOURCES: u32 = 4;

/// The flood: this many peer addresses (127.0.0.2 onwards: on Linux all of
/// 127.0.0.0/8 is loopback), each with this many tasks making this many calls.
const PEERS: u8 = 20;
const TASKS_PER_PEER: usize = 4;
const CALLS_PER_TASK: usize = 25;

/// What an anonymous caller sends, one per reason a call is refused: nothing,
/// a key the vault does not hold, and a header that is not `Bearer <key>`.
const CREDENTIALS: [Option<&str>; 3] = [
    None,
    Some("Bearer not-a-key-of-this-vault"),
    Some("Basic dXNlcjpwYXNz"),
];

fn small_windows(config: &mut Config) {
    config.audit.refusal_window_seconds = WINDOW_SECONDS;
    config.audit.refusal_max_sources = MAX_SOURCES;
}

/// The most entries refused authentication may write while `elapsed` passes:
/// `2 × max_sources + 1` per window, for every window that overlaps it (at
/// most `elapsed / window + 2`, plus one for the flush task's scheduling
/// latency).
fn bound(elapsed: Duration) -> usize {
    let windows = elapsed.as_secs() / WINDOW_SECONDS + 3;
    usize::try_from(windows).expect("a small number") * (2 * MAX_SOURCES as usize + 1)
}

/// The newest audit sequence number.
async fn audit_seq(tv: &TestVault) -> i64 {
    tv.vault.store().audit_head().await.expect("audit head").0
}

/// Entries after `after` whose action starts with `prefix`, oldest first.
async fn audit_since(tv: &TestVault, after: i64, prefix: &str) -> Vec<AuditRow> {
    tv.vault
        .store()
        .audit_query(
            &AuditFilter {
                action_prefix: Some(prefix.to_owned()),
                after_seq: Some(after),
                ascending: true,
                ..Default::default()
            },
            10_000,
        )
        .await
        .expect("query the audit log")
}

/// The refusals `rows` count between them; every refusal entry says how many
/// it counts.
fn total(rows: &[AuditRow]) -> u64 {
    rows.iter()
        .map(|r| {
            counted(&r.draft.detail)
                .unwrap_or_else(|| panic!("a refusal entry without a count: {r:?}"))
        })
        .sum()
}

fn describe(rows: &[AuditRow]) -> String {
    rows.iter()
        .map(|r| {
            let d = &r.draft;
            format!(
                "  #{} actor={:?} action={} target={} detail={:?}",
                r.seq, d.actor, d.action, d.target, d.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls the refusal entries after `after` (those `keep` selects) until they
/// count `want` refusals, at most `limit`; returns them.
async fn refusals_counting(
    tv: &TestVault,
    after: i64,
    keep: impl Fn(&AuditRow) -> bool,
    want: u64,
    limit: Duration,
) -> Vec<AuditRow> {
    let deadline = Instant::now() + limit;
    loop {
        let rows: Vec<AuditRow> = audit_since(tv, after, REFUSE)
            .await
            .into_iter()
            .filter(|r| keep(r))
            .collect();
        if total(&rows) >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of the connection service that sends `credentials` as its
/// `authorization` header (none: no header).
fn anonymous(channel: Channel, credentials: Option<&str>) -> ConnectionServiceClient<Authed> {
    let bearer = Bearer(credentials.map(|c| c.parse().expect("ascii credentials")));
    ConnectionServiceClient::with_interceptor(channel, bearer)
}

fn get_connection(id: &str) -> pb::GetConnectionRequest {
    pb::GetConnectionRequest {
        connection_id: id.to_owned(),
    }
}

/// The sum of `tokenvault_authn_refusals_total` over its reasons, as
/// `GET /metrics` reports it (every test in this binary adds to it).
async fn refusals_metric(tv: &TestVault) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", tv.http_addr))
        .await
        .expect("reach /metrics")
        .text()
        .await
        .expect("read /metrics");
    text.lines()
        .filter(|l| l.starts_with("tokenvault_authn_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn an_anonymous_flood_writes_at_most_the_configured_entries(backend: Backend) {
    let Some(tv) = spawn_vault_with(backend, small_windows).await else {
        return;
    };
    let id = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.flood-access-token",
        Some("1//flood-refresh-token"),
    )
    .await
    .id
    .to_string();
    let start = audit_seq(&tv).await;
    let started = Instant::now();

    // 2,000 calls without a usable credential, from 20 addresses, for 3
    // reasons: 60 sources, far more than the 4 a window tracks.
    let mut flood = tokio::task::JoinSet::new();
    for p in 0..PEERS {
        let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + p));
        let channel = Endpoint::from_shared(format!("http://{}", tv.grpc_addr))
            .expect("the vault's address")
            .local_address(Some(local))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect from {local}: {e:?}"));
        for t in 0..TASKS_PER_PEER {
            let channel = channel.clone();
            flood.spawn(async move {
                for i in 0..CALLS_PER_TASK {
                    let credentials = CREDENTIALS[(t + i) % CREDENTIALS.len()];
                    let err = anonymous(channel.clone(), credentials)
                        .get_connection(get_connection("00000000-0000-0000-0000-000000000000"))
                        .await
                        .expect_err("a call without a usable credential must be refused");
                    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
                }
                CALLS_PER_TASK as u64
            });
        }
    }
    // Meanwhile a worker leases with its key, from 127.0.0.1.
    let stop = Arc::new(AtomicBool::new(false));
    let leasing = {
        let mut leases = tv.leases(As::Worker);
        let stop = stop.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut granted = 0u32;
            loop {
                leases.lease_token(calendar_lease(&id)).await?;
                granted += 1;
                if stop.load(Ordering::SeqCst) {
                    return Ok::<_, tonic::Status>(granted);
                }
            }
        })
    };
    let mut sent = 0u64;
    while let Some(done) = flood.join_next().await {
        sent += done.expect("a flood task failed");
    }
    stop.store(true, Ordering::SeqCst);
    let granted = leasing
        .await
        .expect("the leasing task")
        .expect("an authenticated lease made during the flood was refused");
    assert!(granted >= 1);
    assert_eq!(
        sent,
        u64::from(PEERS) * (TASKS_PER_PEER * CALLS_PER_TASK) as u64
    );

    // Each source's first refusal was written before its caller heard of
    // it; the rest are written when their window closes.
    let rows = refusals_counting(
        &tv,
        start,
        |_| true,
        sent,
        Duration::from_secs(10 * WINDOW_SECONDS + 20),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        total(&rows),
        sent,
        "the refusal entries do not count every refused call once:\n{}",
        describe(&rows)
    );
    assert!(
        rows.len() <= bound(elapsed),
        "{} refusal entries in {elapsed:?}, more than the {} that {MAX_SOURCES} sources per \
         {WINDOW_SECONDS} s window allow:\n{}",
        rows.len(),
        bound(elapsed),
        describe(&rows)
    );
    for r in &rows {
        assert!(
            matches!(r.draft.action.as_str(), REFUSE | OVERFLOW),
            "{r:?}"
        );
        assert_eq!(r.draft.outcome, "denied", "{r:?}");
        assert_eq!(r.draft.role, "", "{r:?}");
    }
    assert!(
        rows.iter().any(|r| r.draft.action == OVERFLOW),
        "60 sources in windows of 4: the rest must be folded into an overflow entry:\n{}",
        describe(&rows)
    );
    // Every reason is accounted for: by its sources' entries, or in the
    // overflow's count per reason.
    for (message, label) in [
        ("no credentials", "no_credentials"),
        ("unknown API key", "unknown_api_key"),
        ("malformed authorization", "malformed_authorization"),
    ] {
        assert!(
            rows.iter().any(|r| r.draft.detail.starts_with(message)
                || (r.draft.action == OVERFLOW && r.draft.detail.contains(label))),
            "no entry accounts for {message:?}:\n{}",
            describe(&rows)
        );
    }
    assert!(
        refusals_metric(&tv).await >= sent as f64,
        "tokenvault_authn_refusals_total does not count every refusal"
    );
}
both_backends!(
    anonymous_flood,
    an_anonymous_flood_writes_at_most_the_configured_entries
);

async fn authenticated_denials_are_audited_one_by_one_and_fail_closed(backend: Backend) {
    const DENIALS: usize = 20;
    let Some(tv) = spawn_vault_with(backend, small_windows).await else {
        return;
    };
    let id = seed_connection(
        &tv.vault,
        "acme",
        "bob",
        Integration::Calendar,
        "ya29.denials-access-token",
        Some("1//denials-refresh-token"),
    )
    .await
    .id
    .to_string();
    let start = audit_seq(&tv).await;

    for _ in 0..DENIALS {
        let err = anonymous(tv.channel.clone(), None)
            .get_connection(get_connection(&id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = tv
            .connections(As::Nobody)
            .get_connection(get_connection(&id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        let err = tv
            .leases(As::App)
            .lease_token(calendar_lease(&id))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    let denials = audit_since(&tv, start, "authz.deny").await;
    let by = |who: As| {
        denials
            .iter()
            .filter(|r| r.draft.actor == who.identity() && r.draft.outcome == "denied")
            .count()
    };
    assert_eq!(by(As::Nobody), DENIALS, "{}", describe(&denials));
    assert_eq!(by(As::App), DENIALS, "{}", describe(&denials));
    assert_eq!(denials.len(), 2 * DENIALS, "{}", describe(&denials));

    // While the audit log refuses every append, a denied caller gets
    // UNAVAILABLE (its denial cannot be audited, so nothing is answered), but
    // an anonymous caller — here with a key the vault does not hold, a source
    // new to the window, whose entry would be written at once — gets the
    // very answer it gets otherwise.
    tv.vault.audit().inject_failure(true);
    let denied = tv
        .connections(As::Nobody)
        .get_connection(get_connection(&id))
        .await
        .unwrap_err();
    let refused = anonymous(tv.channel.clone(), CREDENTIALS[1])
        .get_connection(get_connection(&id))
        .await
        .unwrap_err();
    tv.vault.audit().inject_failure(false);
    assert_eq!(denied.code(), Code::Unavailable, "{denied:?}");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let again = anonymous(tv.channel.clone(), CREDENTIALS[1])
        .get_connection(get_connection(&id))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (again.code(), again.message())
    );

    // Nothing was written for the failed denial; the refusal whose entry
    // failed is counted in a later one, with the others.
    let want = (DENIALS + 2) as u64;
    let rows = refusals_counting(
        &tv,
        start,
        |_| true,
        want,
        Duration::from_secs(10 * WINDOW_SECONDS + 20),
    )
    .await;
    assert_eq!(total(&rows), want, "{}", describe(&rows));
    let unknown_key: u64 = rows
        .iter()
        .filter(|r| r.draft.detail.starts_with("unknown API key"))
        .filter_map(|r| counted(&r.draft.detail))
        .sum();
    assert_eq!(unknown_key, 2, "{}", describe(&rows));
    assert_eq!(
        audit_since(&tv, start, "authz.deny").await.len(),
        2 * DENIALS,
        "a denial was recorded although its audit entry failed"
    );
}
both_backends!(
    authenticated_denials,
    authenticated_denials_are_audited_one_by_one_and_fail_closed
);

/// One TLS handshake presenting `client`, which the vault must refuse. Waits
/// for the vault's verdict (its alert, or the connection closing), so the
/// refusal has been counted when this returns; exactly one handshake per
/// call (a tonic channel could reconnect on its own).
async fn refused_handshake(addr: SocketAddr, ca_pem: &str, client: &Pem) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("the CA's PEM"))
            .expect("trust the vault's CA");
    }
    let chain = CertificateDer::pem_slice_iter(client.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the client certificate's PEM");
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).expect("the client key's PEM");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("a client identity");
    let name = ServerName::try_from("localhost").expect("a server name");
    let verdict = tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("reach the vault");
        // TLS 1.3: the client's side may complete before the vault has
        // checked its certificate; the refusal then arrives as an alert.
        if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            let mut byte = [0u8; 1];
            let read = tls.read(&mut byte).await;
            assert!(
                !matches!(read, Ok(n) if n > 0),
                "the vault sent data over a connection it should have refused: {read:?}"
            );
        }
    })
    .await;
    assert!(verdict.is_ok(), "no verdict on a handshake within 10 s");
}

async fn refused_handshakes_are_aggregated_too(backend: Backend) {
    const HANDSHAKES: u64 = 40;
    let pki = Pki::generate();
    let Some(tv) = spawn_vault_with(backend, |c| {
        pki.configure(c);
        small_windows(c);
    })
    .await
    else {
        return;
    };
    let ca = pki.ca.pem();
    let start = audit_seq(&tv).await;
    let started = Instant::now();

    let mut handshakes = tokio::task::JoinSet::new();
    for h in 0..HANDSHAKES {
        let client = if h % 2 == 0 {
            pki.untrusted_worker.clone()
        } else {
            pki.expired_worker.clone()
        };
        let (addr, ca) = (tv.grpc_addr, ca.clone());
        handshakes.spawn(async move { refused_handshake(addr, &ca, &client).await });
    }
    while let Some(done) = handshakes.join_next().await {
        done.expect("a handshake task failed");
    }
    // The listener still serves a trusted certificate.
    let trusted = tls_channel(tv.grpc_addr, &ca, Some(&pki.worker))
        .await
        .expect("a trusted certificate connects after the refusals");
    HealthClient::new(trusted)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over mTLS after the refusals");

    let rows = refusals_counting(
        &tv,
        start,
        |r| r.draft.target == HANDSHAKE,
        HANDSHAKES,
        Duration::from_secs(10 * WINDOW_SECONDS + 20),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        total(&rows),
        HANDSHAKES,
        "the handshake refusals are not each counted once:\n{}",
        describe(&rows)
    );
    let all = audit_since(&tv, start, REFUSE).await;
    assert!(
        all.len() <= bound(elapsed),
        "{} refusal entries in {elapsed:?}, more than the {} allowed:\n{}",
        all.len(),
        bound(elapsed),
        describe(&all)
    );
    for needle in ["UnknownIssuer", "Expired"] {
        let counted_here: u64 = rows
            .iter()
            .filter(|r| r.draft.detail.contains(needle))
            .filter_map(|r| counted(&r.draft.detail))
            .sum();
        assert_eq!(
            counted_here,
            HANDSHAKES / 2,
            "{needle}:\n{}",
            describe(&rows)
        );
    }
    for r in &rows {
        assert!(r.draft.actor.starts_with("tls:127.0.0.1"), "{r:?}");
        assert_eq!(r.draft.outcome, "denied", "{r:?}");
    }
}
both_backends!(refused_handshakes, refused_handshakes_are_aggregated_too);
