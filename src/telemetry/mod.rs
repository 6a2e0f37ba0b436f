//! Tracing set-up (human-readable or JSON lines on stderr, filtered by the
//! configured level, overridable with `RUST_LOG`) and the Prometheus metrics
//! behind `GET /metrics`: the recorder ([`metrics()`]) and the process's own
//! figures ([`process`]), rendered together by [`render()`].
//!
//! Invariants:
//! - Metrics never carry tokens, keys or identifiers of people: labels are
//!   purposes, outcomes, reasons, key versions and gRPC method names.
//! - Human-readable lines are coloured only when stderr is a terminal and
//!   `NO_COLOR` is unset or empty (<https://no-color.org/>): files, pipes and
//!   log collectors get plain text. JSON lines never carry colour codes.

mod metrics;
pub mod process;

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub use self::metrics::{CONTENT_TYPE, metrics, render};

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
