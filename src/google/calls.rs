//! What the vault measures of each call it makes to Google: which endpoint,
//! how it ended, how long it took (`tokenvault_google_request_seconds`).
//! A call whose caller stopped waiting is recorded as `timeout`, so every
//! call started is recorded exactly once. Labels never carry a token, a
//! person or a URL.

use std::time::Instant;

/// A Google endpoint the vault calls: the `endpoint` label of
/// `tokenvault_google_request_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GoogleEndpoint {
    /// The token endpoint, exchanging an authorization code.
    Token,
    /// The token endpoint, refreshing an access token.
    Refresh,
    /// The revocation endpoint.
    Revoke,
    /// A JWKS (Google's signing keys, or the RISC issuer's).
    Jwks,
}

impl GoogleEndpoint {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GoogleEndpoint::Token => "token",
            GoogleEndpoint::Refresh => "refresh",
            GoogleEndpoint::Revoke => "revoke",
            GoogleEndpoint::Jwks => "jwks",
        }
    }
}

/// How an outbound call ended: the `status` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallStatus {
    /// Google answered with this HTTP status.
    Http(u16),
    /// No answer in time: the HTTP client's timeout, or the caller's deadline
    /// ran out first (the call was dropped unfinished).
    Timeout,
    /// No answer at all: connection refused or reset, TLS, a body that did not
    /// arrive whole.
    Error,
}

impl CallStatus {
    /// The status of a reqwest failure.
    pub(crate) fn of_error(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            CallStatus::Timeout
        } else {
            CallStatus::Error
        }
    }

    fn label(self) -> std::borrow::Cow<'static, str> {
        match self {
            CallStatus::Http(code) => code.to_string().into(),
            CallStatus::Timeout => "timeout".into(),
            CallStatus::Error => "error".into(),
        }
    }
}

/// Times one outbound call into `tokenvault_google_request_seconds`. A timer
/// dropped without [`CallTimer::finish`] — the caller stopped waiting, e.g.
/// at a refresh deadline — records the call as `timeout`.
pub(crate) struct CallTimer {
    endpoint: GoogleEndpoint,
    started: Instant,
    finished: bool,
}

impl CallTimer {
    /// Starts timing a call to `endpoint`.
    pub(crate) fn start(endpoint: GoogleEndpoint) -> Self {
        Self {
            endpoint,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Records the call as ended with `status`, and Google's HTTP status
    /// on the span of the call (`http.response.status_code`, where the
    /// current span declares it: see `GoogleClient`).
    pub(crate) fn finish(mut self, status: CallStatus) {
        self.finished = true;
        if let CallStatus::Http(code) = status {
            // Signed: exported spans take integers as i64 only.
            tracing::Span::current().record("http.response.status_code", i64::from(code));
        }
        self.record(status);
    }

    fn record(&self, status: CallStatus) {
        metrics::histogram!(
            "tokenvault_google_request_seconds",
            "endpoint" => self.endpoint.as_str(),
            "status" => status.label(),
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        if !self.finished {
            self.record(CallStatus::Timeout);
        }
    }
}
