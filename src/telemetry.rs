//! Tracing set-up (human-readable or JSON lines on stderr, filtered by the
//! configured level, overridable with `RUST_LOG`) and the Prometheus metrics
//! recorder behind `GET /metrics`. Metrics never carry tokens, keys or
//! identifiers of people: labels are purposes, outcomes and key versions.
//!
//! Human-readable lines are coloured only when stderr is a terminal and
//! `NO_COLOR` is unset or empty (<https://no-color.org/>): files, pipes and
//! log collectors get plain text. JSON lines never carry colour codes.

use std::ffi::OsStr;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which keeps tests that start several servers simple.
pub fn init(log: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            // The level was validated with the rest of the configuration.
            EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let use_colour = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Human => builder.with_ansi(use_colour).try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
    };
}

/// Whether human-readable log lines are coloured: only on a terminal, and not
/// when `NO_COLOR` is set to a non-empty value (<https://no-color.org/>; an
/// empty `NO_COLOR` counts as unset).
fn colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded into their summaries.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder (installed on first use). `None` if
/// another recorder was installed first (then `/metrics` says so).
///
/// A recorder from `build_recorder` keeps every histogram sample until
/// someone drains it: a scrape, or `run_upkeep`. A thread does the latter
/// every few seconds, so memory stays flat when nothing scrapes `/metrics`
/// (without it, every recorded sample is kept for good and memory grows with
/// every call; see BENCHMARKS.md, the soak section).
pub fn metrics() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| {
                describe();
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
                    tracing::warn!(error = %e, "no metrics upkeep thread; histograms grow until scraped");
                }
                handle
            })
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "tokenvault_lease_stage_seconds",
        "Time a lease spends in each stage: read (queue and batched database read of the \
         connection and its sealed tokens) and audit (queue and group commit of the grant \
         with its lease row)."
    );
    describe_counter!(
        "tokenvault_lease_grants_total",
        "Leases granted, by purpose."
    );
    describe_counter!(
        "tokenvault_lease_denials_total",
        "Leases refused, by purpose and reason."
    );
    describe_counter!(
        "tokenvault_authn_refusals_total",
        "Calls and TLS handshakes refused before the caller had an identity, by reason \
         (no credentials, unknown API key, certificate problem, …)."
    );
    describe_counter!(
        "tokenvault_authn_refusal_entries_total",
        "Audit entries for refused authentication, by kind (first: a source's first \
         refusal of a window; aggregate: its count at the end of the window; overflow: the \
         sources beyond audit.refusal_max_sources) and outcome (written, failed)."
    );
    describe_gauge!(
        "tokenvault_http_connections",
        "HTTP connections held (at most http.max_connections)."
    );
    describe_counter!(
        "tokenvault_http_connections_closed_total",
        "HTTP connections closed to make room, by reason (limit: the oldest idle one for a \
         new one; accept_failed: an idle one when accepting ran out of descriptors; refused: \
         a new one while every held one had a request in progress)."
    );
    describe_counter!(
        "tokenvault_refresh_total",
        "Token refreshes by outcome (ok, invalid_grant, unavailable)."
    );
    describe_gauge!(
        "tokenvault_kek_primary_version",
        "The primary key-encryption-key version."
    );
    describe_gauge!(
        "tokenvault_kek_deks",
        "Wrapped DEKs per key-encryption-key version."
    );
    describe_gauge!(
        "tokenvault_kek_oldest_in_use_age_seconds",
        "Age of the oldest key version still wrapping a DEK."
    );
    describe_gauge!(
        "tokenvault_kek_rotation_overdue",
        "1 when the oldest key version in use is older than keyring.max_kek_age_days."
    );
    describe_gauge!(
        "tokenvault_rotation_rewrapped",
        "DEKs rewrapped by the latest rotation run."
    );
    describe_gauge!(
        "tokenvault_rotation_total",
        "DEKs the latest rotation run has to rewrap."
    );
    describe_gauge!("tokenvault_rotation_running", "1 while a rotation runs.");
    describe_counter!(
        "tokenvault_audit_witness_errors_total",
        "Failures to write signed audit checkpoints to the audit witness \
         (audit.witness_file); the checkpoints are committed in the database and appended \
         at the next checkpoint."
    );
    describe_gauge!(
        "tokenvault_audit_witness_seq",
        "The sequence number of the newest checkpoint this replica wrote to its audit witness."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("0"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }
}
