//! Tracing set-up (human-readable or JSON lines on stderr, filtered by the
//! configured level, overridable with `RUST_LOG`), distributed traces
//! exported over OTLP when `[tracing]` names an endpoint ([`traces`]), and
//! the Prometheus metrics behind `GET /metrics`: the recorder ([`metrics()`])
//! and the process's own figures ([`process`]), rendered together by
//! [`render()`].
//!
//! Invariants:
//! - Metrics never carry tokens, keys or identifiers of people: labels are
//!   purposes, outcomes, reasons, key versions and gRPC method names.
//! - Exported spans never carry a token, key, code, PIN or secret (see
//!   [`traces`]); with no endpoint configured the subscriber is exactly the
//!   log output, with nothing added.
//! - Human-readable lines are coloured only when stderr is a terminal and
//!   `NO_COLOR` is unset or empty (<https://no-color.org/>): files, pipes and
//!   log collectors get plain text. JSON lines never carry colour codes.

mod metrics;
pub mod process;
pub mod traces;

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat, TracingConfig};

pub use self::metrics::{CONTENT_TYPE, metrics, render};

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which keeps tests that start several servers simple.
pub fn init(log: &LogConfig) {
    let filter = log_filter(log);
    let use_colour = stderr_colour();
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

/// As [`init`], for a server: when `[tracing]` names an OTLP endpoint, the
/// subscriber also exports the vault's spans there ([`traces`]), the log
/// lines staying as they are (their own filter, `log.level` or `RUST_LOG`,
/// is applied to them alone). Without an endpoint this is [`init`].
///
/// Must run inside the Tokio runtime the server runs on: the exporter's gRPC
/// channel lives there. [`traces::shutdown`] flushes it when the server
/// stops. An error names the setting.
pub fn init_serving(log: &LogConfig, settings: &TracingConfig) -> Result<(), String> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let Some(endpoint) = settings.otlp_endpoint.as_deref() else {
        init(log);
        return Ok(());
    };
    let provider = traces::provider(settings, endpoint)?;
    // No callsite may be cached as `Interest::always` while two layers have
    // filters of their own: such events and spans skip `enabled()`, and each
    // layer then reads the verdict the previous `enabled()` on that thread left
    // behind. sqlx's query logger asks `log_enabled!(Debug)` after every
    // PostgreSQL statement and emits nothing, so the next `tokenvault` line or
    // `info_span` was dropped by both layers ("tokenvault serving" never
    // reached the log; tokio-rs/tracing#2519). `sometimes` makes every
    // dispatch ask again; callsites neither layer takes stay `never`.
    let exported = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tokenvault"))
        .with_filter(
            tracing_subscriber::filter::dynamic_filter_fn(
                |meta: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, _>| {
                    traces::exported(meta)
                },
            )
            .with_max_level_hint(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_callsite_filter(|meta| {
                if traces::exported(meta) {
                    tracing::subscriber::Interest::sometimes()
                } else {
                    tracing::subscriber::Interest::never()
                }
            }),
        );
    let installed = tracing_subscriber::registry()
        .with(log_layer(log))
        .with(exported)
        .try_init()
        .is_ok();
    if installed {
        traces::install(
            provider,
            std::time::Duration::from_millis(settings.export_timeout_ms),
        );
        tracing::info!(
            endpoint,
            service_name = %settings.service_name,
            sample_ratio = settings.sample_ratio,
            "exporting traces over OTLP"
        );
    }
    Ok(())
}

/// The log output as a layer of its own, with its own filter: what [`init`]
/// installs, for a subscriber that also exports traces.
fn log_layer(
    log: &LogConfig,
) -> Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> {
    use tracing_subscriber::Layer as _;
    let filter = log_filter(log);
    match log.format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(stderr_colour())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
    }
}

/// Which log lines are written: `RUST_LOG` if set and valid, else
/// `log.level`.
fn log_filter(log: &LogConfig) -> EnvFilter {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            // The level was validated with the rest of the configuration.
            EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"))
        })
}

/// Whether log lines on stderr are coloured (see [`colour`]).
fn stderr_colour() -> bool {
    colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Whether human-readable log lines are coloured: only on a terminal, and not
/// when `NO_COLOR` is set to a non-empty value (<https://no-color.org/>; an
/// empty `NO_COLOR` counts as unset).
fn colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
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
