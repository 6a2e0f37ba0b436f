//! Distributed traces: with `[tracing] otlp_endpoint` set, the spans of the
//! vault's own code are exported over OTLP/gRPC by a batch exporter (its own
//! thread; its gRPC channel on the server's runtime), and the last of them are
//! flushed when the server shuts down ([`shutdown`]). What is traced:
//!
//! - every gRPC call: a server span named `package.Service/Method` with
//!   `rpc.system`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code`,
//!   whose parent is the caller's W3C `traceparent`/`tracestate` when the
//!   request carries them ([`rpc_started`], `crate::grpc::trace_context`);
//! - the use cases the calls run (`lease`, `delete`, `authorization_begin`, …);
//! - database call groups (`lease_lookup`, `audit_append`): the caller's wait
//!   for a batched read or a group commit is a span in the caller's trace,
//!   and the batch itself (`lease_lookup_batch`, `audit_commit`), which serves
//!   many callers, is a trace of its own linked to each of their spans
//!   ([`Link`]);
//! - calls to Google (`google_token`, `google_refresh`, `google_revoke`).
//!
//! Without an endpoint (the default) nothing here runs: no exporter, no
//! layer, no header is read, no link is taken ([`exporting`]).
//!
//! Invariants:
//! - No token, key, authorization code, PKCE verifier, PIN, client secret or
//!   API key is ever a span attribute or event: instrumented functions skip
//!   all their arguments (`#[tracing::instrument(skip_all)]`) and record
//!   only identifiers (connection, tenant, purpose), RPC methods, status
//!   codes, database operations and Google endpoints. Of a request's
//!   headers, only `traceparent` and `tracestate` are read.
//! - Only the vault's own targets (`tokenvault::*`) are exported: spans at
//!   debug level and above, events at info and above (the same lines the
//!   logs carry). Other crates' spans (h2, hyper, sqlx) are not.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, Status, TraceContextExt as _};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::{Level, Metadata};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::TracingConfig;

/// The exporter in force, once [`install`]ed.
struct Exporter {
    provider: SdkTracerProvider,
    /// How long the final flush may take.
    timeout: Duration,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Whether spans are exported: an endpoint is configured and its exporter is
/// part of the global subscriber. Everything else here is skipped when not.
pub fn exporting() -> bool {
    EXPORTER.get().is_some()
}

/// The tracer provider exporting to `endpoint` in batches, sampling new
/// traces at `settings.sample_ratio` and following a caller's decision.
/// Must run inside a Tokio runtime (the gRPC channel is spawned on it; it
/// connects on the first export). An error names the setting.
pub(super) fn provider(
    settings: &TracingConfig,
    endpoint: &str,
) -> Result<SdkTracerProvider, String> {
    let timeout = Duration::from_millis(settings.export_timeout_ms);
    let refused = |e: &dyn std::fmt::Display| format!("tracing.otlp_endpoint: {e}");
    // The channel is built here rather than by the exporter so that TLS
    // uses the tonic features this crate already has (rustls with ring, the
    // Mozilla roots).
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| refused(&e))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if endpoint.starts_with("https://") {
        channel = channel
            .tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
            .map_err(|e| refused(&e))?;
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_channel(channel.connect_lazy())
        .with_timeout(timeout)
        .build()
        .map_err(|e| refused(&e))?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build())
}

/// Records the exporter now in the global subscriber, for [`exporting`]
/// and [`shutdown`].
pub(super) fn install(provider: SdkTracerProvider, timeout: Duration) {
    let _ = EXPORTER.set(Exporter { provider, timeout });
}

/// Whether the exporter takes `meta`: spans of the vault's own targets at
/// debug level and above, their events at info and above.
pub(super) fn exported(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    let ours = target == "tokenvault" || target.starts_with("tokenvault::");
    let least = if meta.is_span() {
        Level::DEBUG
    } else {
        Level::INFO
    };
    // More verbose levels compare greater (TRACE > DEBUG > … > ERROR).
    ours && *meta.level() <= least
}

/// Exports the spans not yet exported and stops the exporter, waiting at
/// most `[tracing] export_timeout_ms`: the last step of a graceful shutdown.
/// Does nothing when no exporter runs. Spans ended after it are dropped.
pub async fn shutdown() {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let provider = exporter.provider.clone();
    let timeout = exporter.timeout;
    // Blocking: it waits for the exporter's thread, whose gRPC calls run on
    // this runtime, so it must not hold one of the runtime's workers.
    match tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "not every trace could be exported at shutdown"),
        Err(e) => tracing::warn!(error = %e, "the trace exporter's shutdown failed"),
    }
}

/// A request's headers as a propagator reads them.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` the server span of a gRPC call: its parent is the caller's
/// `traceparent`/`tracestate` from `headers` (none: a new trace), its name
/// `package.Service/Method` and its attributes the method's, for a `method`
/// the server serves (any other path keeps the span's own name and only
/// `rpc.system`, so that no caller can name spans). Call it before the span
/// is first entered, and only when [`exporting`].
pub(crate) fn rpc_started(
    span: &tracing::Span,
    headers: &HeaderMap,
    method: Option<(&'static str, &'static str)>,
) {
    let parent = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &HeaderExtractor(headers));
    // Refused only for a span that is disabled (then nothing is exported)
    // or already started (it is not: it was just made).
    let _ = span.set_parent(parent);
    span.record("otel.kind", "server");
    span.set_attribute("rpc.system", "grpc");
    if let Some((service, name)) = method {
        span.record("otel.name", format!("{service}/{name}").as_str());
        span.set_attribute("rpc.service", service);
        span.set_attribute("rpc.method", name);
    }
}

/// Records how a gRPC call ended on its span: `rpc.grpc.status_code`, and an
/// error status for the codes that mean the server failed (UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, as
/// the semantic conventions have it); a refusal of the caller's request is
/// not the server's error.
pub(crate) fn rpc_finished(span: &tracing::Span, code: tonic::Code) {
    use tonic::Code;
    if !exporting() {
        return;
    }
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.set_status(Status::error(code.description()));
    }
    // A span ends when it was last exited: the response has ended now.
    span.in_scope(|| {});
}

/// The span a unit of work was handed over from, for a batch that serves
/// many callers: the batch's span links to each (see [`link_all`]). Empty
/// when nothing is exported.
#[derive(Clone, Debug, Default)]
pub(crate) struct Link(Option<SpanContext>);

impl Link {
    /// The current span, when it is exported.
    pub(crate) fn current() -> Self {
        if !exporting() {
            return Self(None);
        }
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let span_context = span.span_context();
        Self(span_context.is_valid().then(|| span_context.clone()))
    }
}

/// Links `span` (a batch's, before it is first entered) to the spans its
/// work came from.
pub(crate) fn link_all<'a>(span: &tracing::Span, links: impl IntoIterator<Item = &'a Link>) {
    if !exporting() {
        return;
    }
    for from in links.into_iter().filter_map(|link| link.0.as_ref()) {
        span.add_link(from.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_vaults_own_spans_and_lines_are_exported() {
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;
        /// A callsite for metadata made by hand (never registered).
        struct Unregistered;
        impl tracing::callsite::Callsite for Unregistered {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("never registered")
            }
        }
        static CALLSITE: Unregistered = Unregistered;
        let meta = |target: &'static str, level: Level, kind: Kind| {
            Metadata::new(
                "m",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CALLSITE)),
                kind,
            )
        };
        for (target, level, kind, expected) in [
            ("tokenvault::vault::lease", Level::INFO, Kind::SPAN, true),
            ("tokenvault::vault::reader", Level::DEBUG, Kind::SPAN, true),
            ("tokenvault::vault::reader", Level::TRACE, Kind::SPAN, false),
            ("tokenvault", Level::WARN, Kind::EVENT, true),
            ("tokenvault::server", Level::DEBUG, Kind::EVENT, false),
            ("tokenvaults", Level::INFO, Kind::SPAN, false),
            ("h2::codec", Level::INFO, Kind::SPAN, false),
            ("sqlx::query", Level::INFO, Kind::EVENT, false),
        ] {
            assert_eq!(
                exported(&meta(target, level, kind.clone())),
                expected,
                "{target} {level} {kind:?}"
            );
        }
    }

    #[test]
    fn nothing_is_linked_or_extracted_without_an_exporter() {
        assert!(!exporting());
        assert!(Link::current().0.is_none());
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let cx = TraceContextPropagator::new()
            .extract_with_context(&opentelemetry::Context::new(), &HeaderExtractor(&headers));
        let span = cx.span();
        let remote = span.span_context();
        assert!(remote.is_valid() && remote.is_remote() && remote.is_sampled());
        assert_eq!(
            remote.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(remote.span_id().to_string(), "b7ad6b7169203331");
    }
}
