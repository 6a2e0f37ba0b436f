//! Bounds on what a caller sends and on what the vault sends back (finding
//! L3): a lease request with 10,000 scopes is refused by its count, with a
//! short INVALID_ARGUMENT that quotes none of them and without a large audit
//! entry; a lease naming the most scopes allowed, each as long as allowed and
//! none granted, is denied in a message and an audit entry under 1 KiB that
//! quote only excerpts of a few; and `Watch` filters are counted too. Limits
//! come from `tokenvault::limits`.

use prost::Message as _;
use tokenvault::domain::Integration;
use tokenvault::limits::{
    MAX_FILTER_VALUES, MAX_QUOTED_CHARS, MAX_QUOTED_SCOPES, MAX_REQUEST_BYTES, MAX_SCOPE_BYTES,
    MAX_SCOPES_PER_LEASE, MAX_STATUS_MESSAGE_BYTES,
};
use tokenvault::proto::v1 as pb;
use tokenvault::store::{AuditFilter, AuditRow};
use tonic::Code;

use crate::both_backends;
use crate::support::{As, Backend, TestVault, calendar_lease, seed_connection, spawn_vault};

/// The most bytes of text one audit entry may hold here.
const ENTRY_MAX: usize = 1024;

/// A vault with one live calendar connection (tenant `acme`, account
/// `alice`); its id.
async fn vault_with_connection(backend: Backend) -> Option<(TestVault, String)> {
    let tv = spawn_vault(backend).await?;
    let conn = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.bounds-access",
        Some("1//bounds-refresh"),
    )
    .await;
    let id = conn.id.as_str().to_owned();
    Some((tv, id))
}

/// The chain head's sequence number.
async fn head(tv: &TestVault) -> i64 {
    tv.vault.store().audit_head().await.expect("audit head").0
}

/// The audit entries after `seq`, oldest first.
async fn audit_after(tv: &TestVault, seq: i64) -> Vec<AuditRow> {
    tv.vault
        .store()
        .audit_query(
            &AuditFilter {
                after_seq: Some(seq),
                ascending: true,
                ..Default::default()
            },
            1000,
        )
        .await
        .expect("query the audit log")
}

/// The text an entry holds (its hashes and MAC have a fixed size).
fn entry_len(row: &AuditRow) -> usize {
    let d = &row.draft;
    d.actor.len()
        + d.role.len()
        + d.action.len()
        + d.target.len()
        + d.outcome.len()
        + d.detail.len()
}

/// Every entry of `rows` up to `last` holds at most [`ENTRY_MAX`] bytes of text.
fn assert_small_entries(rows: &[AuditRow], last: i64, what: &str) {
    for row in rows.iter().filter(|r| r.seq <= last) {
        assert!(
            entry_len(row) <= ENTRY_MAX,
            "{what}: audit entry #{} ({}) holds {} bytes: {:.300}",
            row.seq,
            row.draft.action,
            entry_len(row),
            row.draft.detail
        );
    }
}

async fn a_lease_with_10000_scopes_is_refused_by_count_in_a_short_message(backend: Backend) {
    let Some((tv, conn)) = vault_with_connection(backend).await else {
        return;
    };
    // Each a well-formed scope, so only their number is wrong; short, so
    // that all 10,000 fit in one request and reach the handler.
    let scopes: Vec<String> = (0..10_000).map(|i| format!("bulk.scope.{i:05}")).collect();
    let mut request = calendar_lease(&conn);
    request.scopes = scopes.clone();
    assert!(
        request.encoded_len() < MAX_REQUEST_BYTES,
        "the request must be within the request limit, or the decoder refuses it first"
    );

    let before = head(&tv).await;
    let err = tv
        .leases(As::Worker)
        .lease_token(request)
        .await
        .expect_err("a lease with 10,000 scopes");
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{:?}: {:.300}",
        err.code(),
        err.message()
    );
    let message = err.message();
    assert!(
        message.len() < 200,
        "{} bytes: {message:.300}",
        message.len()
    );
    assert_eq!(
        message,
        format!("invalid scopes: at most {MAX_SCOPES_PER_LEASE} scopes (got 10000)")
    );
    let echoed: Vec<&String> = scopes
        .iter()
        .filter(|s| message.contains(s.as_str()))
        .collect();
    assert!(echoed.is_empty(), "the message echoes {echoed:?}");

    let after = head(&tv).await;
    assert!(
        after - before <= 1,
        "the refusal wrote {} audit entries",
        after - before
    );
    let written = audit_after(&tv, before).await;
    assert_small_entries(&written, after, "10,000 scopes");
    for row in written.iter().filter(|r| r.seq <= after) {
        assert!(
            !row.draft.detail.contains("bulk.scope."),
            "audit entry #{} quotes the scopes: {:.300}",
            row.seq,
            row.draft.detail
        );
    }

    // The refusal changed nothing: the connection is still leased.
    let lease = tv
        .leases(As::Worker)
        .lease_token(calendar_lease(&conn))
        .await
        .expect("a lease with one scope after the refusal")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.bounds-access");
}
both_backends!(
    bounds_10000_scopes,
    a_lease_with_10000_scopes_is_refused_by_count_in_a_short_message
);

async fn a_denial_of_the_longest_scope_list_quotes_only_excerpts(backend: Backend) {
    let Some((tv, conn)) = vault_with_connection(backend).await else {
        return;
    };
    // As many scopes as a lease may name, each as long as a scope may be,
    // none of them allowed to the purpose: parsed, then denied by the policy.
    let scopes: Vec<String> = (0..MAX_SCOPES_PER_LEASE)
        .map(|i| {
            let prefix = format!("https://bounds.test/{i:03}/");
            format!("{prefix}{}", "x".repeat(MAX_SCOPE_BYTES - prefix.len()))
        })
        .collect();
    let mut request = calendar_lease(&conn);
    request.scopes = scopes.clone();

    let before = head(&tv).await;
    let err = tv
        .leases(As::Worker)
        .lease_token(request)
        .await
        .expect_err("a lease of scopes the purpose does not allow");
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "{:?}: {:.300}",
        err.code(),
        err.message()
    );
    let message = err.message();
    assert!(
        message.len() <= MAX_STATUS_MESSAGE_BYTES,
        "{} bytes: {message:.300}",
        message.len()
    );
    assert!(message.contains("does not allow"), "{message}");
    assert!(
        message.ends_with(&format!(
            " (and {} more)",
            MAX_SCOPES_PER_LEASE - MAX_QUOTED_SCOPES
        )),
        "the scopes not named are counted: {message}"
    );
    let whole: Vec<&String> = scopes
        .iter()
        .filter(|s| message.contains(s.as_str()))
        .collect();
    assert!(
        whole.is_empty(),
        "the message quotes whole scopes: {whole:?}"
    );
    // It does name the first, by an excerpt.
    let excerpt: String = scopes[0].chars().take(MAX_QUOTED_CHARS).collect();
    assert!(message.contains(&format!("{excerpt}…")), "{message}");

    let after = head(&tv).await;
    let written = audit_after(&tv, before).await;
    let denials: Vec<&AuditRow> = written
        .iter()
        .filter(|r| r.seq <= after && r.draft.action == "lease.deny")
        .collect();
    assert_eq!(
        denials.len(),
        1,
        "one lease.deny entry, {} in all",
        after - before
    );
    assert_small_entries(&written, after, "the longest scope list");
}
both_backends!(
    bounds_long_scopes,
    a_denial_of_the_longest_scope_list_quotes_only_excerpts
);

async fn watch_filters_are_counted(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let watch = |n: usize| pb::WatchRequest {
        consumer: "calendar-sync".into(),
        kinds: vec![pb::EventKind::ConnectionDeleted as i32; n],
        ..Default::default()
    };
    let mut events = tv.events(As::Worker);
    let stream = events
        .watch(watch(MAX_FILTER_VALUES))
        .await
        .expect("a watch with as many kinds as allowed");
    drop(stream);
    let err = events
        .watch(watch(10_000))
        .await
        .expect_err("a watch with 10,000 kinds");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        format!("invalid kinds: at most {MAX_FILTER_VALUES} kinds (got 10000)")
    );
}
both_backends!(bounds_watch_filters, watch_filters_are_counted);
