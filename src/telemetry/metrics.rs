//! The process-wide Prometheus recorder behind `GET /metrics`: how it is
//! built, what every family means (its `# HELP`), and which series exist
//! before their first event.
//!
//! Invariants:
//! - Every histogram is a Prometheus histogram, never a summary (quantiles
//!   cannot be added across replicas; buckets can): a family named
//!   `…_seconds` gets `LATENCY_BUCKETS`, any other histogram counts things
//!   and gets `COUNT_BUCKETS`.
//! - Every family the crate emits has its line in `FAMILIES`, so every
//!   `# TYPE` has a `# HELP`. A new `counter!`, `gauge!` or `histogram!` name
//!   needs a line there (`tests/all/metrics.rs` checks what it sees).
//! - Counter names end in `_total` and no other name does; a unit, where there
//!   is one, is in the name (`_seconds`, `_bytes`).
//! - Series whose label values form a closed set in the code are registered
//!   at install (counters at 0, histograms empty), so a rate over them sees
//!   the first event. Open-ended label values (purposes, HTTP statuses, key
//!   versions, gRPC methods) are never invented here.
//! - Memory stays bounded when nothing scrapes: a thread folds recorded
//!   samples into their histogram buckets every `UPKEEP_INTERVAL`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::DeletionReason;
use crate::grpc::refusals::{CertificateProblem, Reason};

/// The `Content-Type` of the text `GET /metrics` answers (the Prometheus text
/// exposition format).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds (seconds) of every `…_seconds` histogram: a lease takes
/// ~1–20 ms, a batch or a call to Google up to seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Bucket bounds of every other histogram: counts of things (entries in an
/// audit batch, ids in a lease read).
const COUNT_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use, with every
/// family described and the closed label sets registered). `None` if another
/// recorder was installed first (then `/metrics` says so).
///
/// A recorder from `build_recorder` keeps every histogram sample until
/// someone drains it into the buckets: a scrape, or `run_upkeep`. A thread
/// does the latter every few seconds, so memory stays flat when nothing
/// scrapes `/metrics` (without it, every recorded sample is kept until the
/// next scrape and memory grows with every call; see BENCHMARKS.md, the soak
/// section).
pub fn metrics() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok().map(|()| {
                describe();
                register();
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no metrics upkeep thread; histogram samples are kept until scraped");
                }
                handle
            })
        })
        .as_ref()
}

/// The text `GET /metrics` answers: every family of the recorder, then the
/// process's own (`process_*`, read from `/proc` now).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    super::process::render(&mut text);
    text
}

/// The recorder's configuration: histograms with buckets, never summaries.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(&COUNT_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)
        })
        // Both calls refuse an empty bucket list only, and both lists are
        // non-empty constants.
        .expect("bucket lists are not empty")
}

/// What a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family the crate emits, with its help text. Process metrics
/// (`process_*`) are described where they are rendered, in `process.rs`.
const FAMILIES: &[(Kind, &str, &str)] = &[
    // Build.
    (
        Kind::Gauge,
        "tokenvault_build_info",
        "Always 1; the version of the running tokenvault in its label.",
    ),
    // gRPC server, in the names and labels of go-grpc-prometheus (src/grpc/rpc_metrics.rs).
    (
        Kind::Counter,
        "grpc_server_started_total",
        "RPCs started on the server, by type, service and method.",
    ),
    (
        Kind::Counter,
        "grpc_server_handled_total",
        "RPCs completed on the server, by type, service, method and gRPC status code \
         (Canceled: the client went away; DeadlineExceeded: its deadline passed).",
    ),
    (
        Kind::Histogram,
        "grpc_server_handling_seconds",
        "Time from an RPC's arrival to its status, by type, service and method \
         (a stream's whole life for streams).",
    ),
    // Leases.
    (
        Kind::Counter,
        "tokenvault_lease_grants_total",
        "Leases granted, by purpose.",
    ),
    (
        Kind::Counter,
        "tokenvault_lease_denials_total",
        "Leases refused, by purpose and reason.",
    ),
    (
        Kind::Histogram,
        "tokenvault_lease_seconds",
        "Time the vault takes to grant or refuse a lease, after authentication.",
    ),
    (
        Kind::Histogram,
        "tokenvault_lease_stage_seconds",
        "Time a lease spends in each stage: read (queue and batched database read of the \
         connection and its sealed tokens) and audit (queue and group commit of the grant, \
         which is the lease's record).",
    ),
    (
        Kind::Histogram,
        "tokenvault_lease_read_batch_seconds",
        "Time of one batched database read of connections for leases.",
    ),
    (
        Kind::Histogram,
        "tokenvault_lease_read_batch_ids",
        "Distinct connections read by one batched lease read.",
    ),
    (
        Kind::Counter,
        "tokenvault_lease_cache_total",
        "Lookups in this replica's cache of sealed records for leasing, by result (hit, \
         miss, stale: a cached record the lease's commit found changed).",
    ),
    (
        Kind::Gauge,
        "tokenvault_open_leases",
        "Leases not yet expired or released, at the last maintenance pass.",
    ),
    // Refresh.
    (
        Kind::Counter,
        "tokenvault_refresh_total",
        "Access-token refreshes for leases, by outcome (ok, invalid_grant, rate_limited, \
         unavailable).",
    ),
    (
        Kind::Counter,
        "tokenvault_refresh_sweeps_total",
        "Connections the proactive refresh sweeper claimed, by outcome (refreshed, revoked, \
         failed).",
    ),
    (
        Kind::Gauge,
        "tokenvault_refresh_due_connections",
        "Connections due for a proactive refresh, at the sweeper's last pass.",
    ),
    // Google.
    (
        Kind::Histogram,
        "tokenvault_google_request_seconds",
        "Duration of calls to Google, by endpoint (token, refresh, revoke, jwks) and HTTP \
         status, timeout or error.",
    ),
    (
        Kind::Counter,
        "tokenvault_google_revocations_total",
        "Token revocations at Google, by outcome (confirmed, failed).",
    ),
    (
        Kind::Counter,
        "tokenvault_oauth_begin_limited_total",
        "OAuth authorizations held back by a limit (caller_rate: a refused begin; \
         pending_states: an evicted pending state).",
    ),
    (
        Kind::Counter,
        "tokenvault_risc_events_total",
        "Security events (RISC) received on POST /risc, by outcome (accepted, invalid).",
    ),
    // Deletion.
    (
        Kind::Counter,
        "tokenvault_deletions_total",
        "Deletions of connections' tokens, by reason.",
    ),
    (
        Kind::Gauge,
        "tokenvault_outbox_depth",
        "Revocations at Google waiting in the outbox.",
    ),
    (
        Kind::Gauge,
        "tokenvault_outbox_oldest_seconds",
        "Age of the oldest revocation waiting in the outbox (0 when it is empty).",
    ),
    (
        Kind::Gauge,
        "tokenvault_receipts_overdue",
        "Deletion receipts still incomplete after deletion.receipt_sla_hours.",
    ),
    // Authentication.
    (
        Kind::Counter,
        "tokenvault_authn_refusals_total",
        "Calls and TLS handshakes refused before the caller had an identity, by reason \
         (no credentials, unknown API key, certificate problem, …).",
    ),
    (
        Kind::Counter,
        "tokenvault_authn_refusal_entries_total",
        "Audit entries for refused authentication, by kind (first: a source's first \
         refusal of a window; aggregate: its count at the end of the window; overflow: the \
         sources beyond audit.refusal_max_sources) and outcome (written, failed).",
    ),
    // HTTP port.
    (
        Kind::Gauge,
        "tokenvault_http_connections",
        "HTTP connections held (at most http.max_connections).",
    ),
    (
        Kind::Counter,
        "tokenvault_http_connections_closed_total",
        "HTTP connections closed to make room, by reason (limit: the oldest idle one for a \
         new one; accept_failed: an idle one when accepting ran out of descriptors; refused: \
         a new one while every held one had a request in progress).",
    ),
    // Keys.
    (
        Kind::Counter,
        "tokenvault_dek_cache_total",
        "Lookups in the unwrapped-DEK cache, by outcome (hit; miss: one call to the keyring \
         provider).",
    ),
    (
        Kind::Gauge,
        "tokenvault_dek_cache_entries",
        "Unwrapped DEKs this replica holds in memory.",
    ),
    (
        Kind::Gauge,
        "tokenvault_kek_primary_version",
        "The primary key-encryption-key version.",
    ),
    (
        Kind::Gauge,
        "tokenvault_kek_deks",
        "Wrapped DEKs per key-encryption-key version.",
    ),
    (
        Kind::Gauge,
        "tokenvault_kek_oldest_in_use_age_seconds",
        "Age of the oldest key version still wrapping a DEK.",
    ),
    (
        Kind::Gauge,
        "tokenvault_kek_rotation_overdue",
        "1 when the oldest key version in use is older than keyring.max_kek_age_days.",
    ),
    (
        Kind::Gauge,
        "tokenvault_rotation_rewrapped",
        "DEKs rewrapped by the latest rotation run.",
    ),
    (
        Kind::Gauge,
        "tokenvault_rotation_done",
        "Wrapped keys no longer on an older version in the latest rotation run (rewrapped, \
         or deleted or replaced meanwhile); reaches tokenvault_rotation_deks when it completes.",
    ),
    (
        Kind::Gauge,
        "tokenvault_rotation_deks",
        "DEKs the latest rotation run has to rewrap.",
    ),
    (
        Kind::Gauge,
        "tokenvault_rotation_running",
        "1 while a rotation runs.",
    ),
    // Audit log.
    (
        Kind::Histogram,
        "tokenvault_audit_append_seconds",
        "Time from handing an audit entry to the writer until it is committed (queue and \
         group commit).",
    ),
    (
        Kind::Histogram,
        "tokenvault_audit_batch_seconds",
        "Time of one group commit of audit entries.",
    ),
    (
        Kind::Histogram,
        "tokenvault_audit_batch_entries",
        "Audit entries in one group commit.",
    ),
    (
        Kind::Counter,
        "tokenvault_audit_head_conflicts_total",
        "Audit batches sealed again because another appender (a replica, a deletion) moved \
         the chain head first (PostgreSQL).",
    ),
    (
        Kind::Counter,
        "tokenvault_audit_witness_errors_total",
        "Failures to write signed audit checkpoints to the audit witness \
         (audit.witness_file); the checkpoints are committed in the database and appended \
         at the next checkpoint.",
    ),
    (
        Kind::Gauge,
        "tokenvault_audit_witness_seq",
        "The sequence number of the newest checkpoint this replica wrote to its audit witness.",
    ),
    (
        Kind::Counter,
        "tokenvault_audit_archived_entries_total",
        "Audit entries this replica sealed into archive segments (audit.archive_dir).",
    ),
    (
        Kind::Counter,
        "tokenvault_audit_pruned_entries_total",
        "Archived audit entries this replica deleted from the database.",
    ),
    // Storage.
    (
        Kind::Histogram,
        "tokenvault_sqlite_checkpoint_blocking_seconds",
        "Time writers waited while a WAL checkpoint finished under the write lock (SQLite).",
    ),
];

fn describe() {
    for &(kind, name, help) in FAMILIES {
        match kind {
            Kind::Counter => ::metrics::describe_counter!(name, help),
            Kind::Gauge => ::metrics::describe_gauge!(name, help),
            Kind::Histogram => ::metrics::describe_histogram!(name, help),
        }
    }
}

/// Counters whose label values are a closed set in the code: family, label,
/// every value a call site emits (the call site in the comment).
const CLOSED_COUNTERS: &[(&str, &str, &[&str])] = &[
    // src/vault/lease.rs, refreshing for a lease.
    (
        "tokenvault_refresh_total",
        "outcome",
        &["ok", "invalid_grant", "rate_limited", "unavailable"],
    ),
    // src/vault/sweeper.rs.
    (
        "tokenvault_refresh_sweeps_total",
        "outcome",
        &["refreshed", "revoked", "failed"],
    ),
    // src/http/mod.rs, POST /risc.
    (
        "tokenvault_risc_events_total",
        "outcome",
        &["accepted", "invalid"],
    ),
    // src/vault/deletion.rs.
    (
        "tokenvault_google_revocations_total",
        "outcome",
        &["confirmed", "failed"],
    ),
    // src/vault/authorize.rs.
    (
        "tokenvault_oauth_begin_limited_total",
        "limit",
        &["caller_rate", "pending_states"],
    ),
    // src/vault/reader.rs and src/vault/lease.rs.
    (
        "tokenvault_lease_cache_total",
        "result",
        &["hit", "miss", "stale"],
    ),
    // src/vault/keys/mod.rs.
    ("tokenvault_dek_cache_total", "outcome", &["hit", "miss"]),
    // src/http/serve.rs.
    (
        "tokenvault_http_connections_closed_total",
        "reason",
        &["limit", "accept_failed", "refused"],
    ),
];

/// Counters without labels.
const PLAIN_COUNTERS: [&str; 4] = [
    "tokenvault_audit_witness_errors_total",
    "tokenvault_audit_archived_entries_total",
    "tokenvault_audit_pruned_entries_total",
    "tokenvault_audit_head_conflicts_total",
];

/// Histograms without labels that every backend records (the SQLite
/// checkpoint histogram is left to SQLite, where it means something).
const PLAIN_HISTOGRAMS: [&str; 6] = [
    "tokenvault_lease_seconds",
    "tokenvault_lease_read_batch_seconds",
    "tokenvault_lease_read_batch_ids",
    "tokenvault_audit_append_seconds",
    "tokenvault_audit_batch_seconds",
    "tokenvault_audit_batch_entries",
];

/// Every reason `tokenvault_authn_refusals_total` counts.
const REFUSAL_REASONS: [Reason; 15] = [
    Reason::NoCredentials,
    Reason::MalformedAuthorization,
    Reason::ApiKeyNotFromLoopback,
    Reason::UnknownApiKey,
    Reason::CertificateWithoutSan,
    Reason::NoClientCertificate,
    Reason::Certificate(CertificateProblem::UnknownIssuer),
    Reason::Certificate(CertificateProblem::Expired),
    Reason::Certificate(CertificateProblem::NotValidYet),
    Reason::Certificate(CertificateProblem::Revoked),
    Reason::Certificate(CertificateProblem::BadSignature),
    Reason::Certificate(CertificateProblem::NotValidForName),
    Reason::Certificate(CertificateProblem::InvalidPurpose),
    Reason::Certificate(CertificateProblem::BadEncoding),
    Reason::Certificate(CertificateProblem::Other),
];

/// Registers the series known in advance: the build, counters at 0 and empty
/// histograms.
fn register() {
    ::metrics::gauge!("tokenvault_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for &(name, label, values) in CLOSED_COUNTERS {
        for &value in values {
            ::metrics::counter!(name, label => value).increment(0);
        }
    }
    for name in PLAIN_COUNTERS {
        ::metrics::counter!(name).increment(0);
    }
    for reason in DeletionReason::ALL {
        ::metrics::counter!("tokenvault_deletions_total", "reason" => reason.as_str()).increment(0);
    }
    for reason in REFUSAL_REASONS {
        ::metrics::counter!("tokenvault_authn_refusals_total", "reason" => reason.label())
            .increment(0);
    }
    for kind in ["first", "aggregate", "overflow"] {
        for outcome in ["written", "failed"] {
            ::metrics::counter!(
                "tokenvault_authn_refusal_entries_total",
                "kind" => kind,
                "outcome" => outcome
            )
            .increment(0);
        }
    }
    for name in PLAIN_HISTOGRAMS {
        // Registering is enough: an empty histogram renders with its buckets at 0.
        let _ = ::metrics::histogram!(name);
    }
    for stage in ["read", "audit"] {
        let _ = ::metrics::histogram!("tokenvault_lease_stage_seconds", "stage" => stage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_lists_are_accepted_and_ascending() {
        let _ = builder();
        for list in [&LATENCY_BUCKETS[..], &COUNT_BUCKETS[..]] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
    }

    #[test]
    fn counters_and_only_counters_end_in_total() {
        for &(kind, name, help) in FAMILIES {
            assert_eq!(
                kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: a counter's name ends in _total, no other name does"
            );
            assert!(!help.is_empty() && !help.contains('\n'), "{name}");
        }
    }

    #[test]
    fn what_is_registered_in_advance_is_described() {
        let described =
            |kind: Kind, name: &str| FAMILIES.iter().any(|&(k, n, _)| k == kind && n == name);
        for &(name, _, _) in CLOSED_COUNTERS {
            assert!(described(Kind::Counter, name), "{name}");
        }
        for name in PLAIN_COUNTERS {
            assert!(described(Kind::Counter, name), "{name}");
        }
        for name in PLAIN_HISTOGRAMS {
            assert!(described(Kind::Histogram, name), "{name}");
        }
        for name in [
            "tokenvault_build_info",
            "tokenvault_deletions_total",
            "tokenvault_authn_refusals_total",
            "tokenvault_authn_refusal_entries_total",
            "tokenvault_lease_stage_seconds",
        ] {
            assert!(FAMILIES.iter().any(|&(_, n, _)| n == name), "{name}");
        }
    }

    #[test]
    fn every_family_is_described_once() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|&(_, n, _)| n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a family is described twice");
    }
}
