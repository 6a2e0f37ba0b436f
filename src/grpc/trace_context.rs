//! The span every gRPC call runs in, as a tower layer around the whole
//! server (`Server::builder().layer`, outside [`super::RpcMetricsLayer`]):
//! the span the server makes for the call's log lines (its method and
//! request id: see `crate::server`), entered while the call's response is
//! made and kept until the response has ended.
//!
//! When traces are exported (`crate::telemetry::traces`) it is also the
//! call's OpenTelemetry server span: its parent is the caller's W3C
//! `traceparent`/`tracestate` metadata, its name the method
//! (`tokenvault.v1.LeaseService/LeaseToken`), with `rpc.system`,
//! `rpc.service`, `rpc.method` and, once known, `rpc.grpc.status_code`: from
//! a trailers-only response (how errors are usually sent) or the trailers
//! that end the body, `Unknown` when the response ends without one,
//! `Cancelled` when the call is dropped unfinished. Without an exporter none
//! of this is done: no header is read.
//!
//! Invariant: no header but `traceparent` and `tracestate` is read, and the
//! span's attributes are the method's names and the status code only.

use std::task::{Context, Poll};

use axum::http::{Request, Response};
use hyper::body::Body;
use tonic::Code;
use tower_service::Service;

use super::call_end::{CallEnd, EndBody, EndFuture};
use crate::telemetry::traces;

/// Makes the span of one call from its head (URI and headers; no body).
pub type MakeSpan = fn(&Request<()>) -> tracing::Span;

/// The layer that runs every RPC of the server it wraps in a span.
#[derive(Clone, Copy)]
pub struct RpcSpanLayer {
    make_span: MakeSpan,
}

impl RpcSpanLayer {
    /// A layer whose calls run in the spans `make_span` makes.
    pub fn new(make_span: MakeSpan) -> Self {
        Self { make_span }
    }
}

impl std::fmt::Debug for RpcSpanLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcSpanLayer").finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan {
            inner,
            make_span: self.make_span,
        }
    }
}

/// A gRPC service whose calls run in spans (see [`RpcSpanLayer`]).
#[derive(Clone)]
pub struct RpcSpan<S> {
    inner: S,
    make_span: MakeSpan,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcSpan<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Unpin,
    ResBody: Body,
{
    type Response = Response<EndBody<ResBody, Call>>;
    type Error = S::Error;
    type Future = EndFuture<S::Future, Call>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The span is made from the request's head alone (as tonic's
        // `trace_fn` does), then the body is put back.
        let (parts, body) = request.into_parts();
        let head = Request::from_parts(parts, ());
        let span = (self.make_span)(&head);
        if traces::exporting() {
            let method = super::rpc_metrics::served_method(head.uri().path());
            traces::rpc_started(&span, head.headers(), method);
        }
        let (parts, ()) = head.into_parts();
        let inner = {
            let _entered = span.enter();
            self.inner.call(Request::from_parts(parts, body))
        };
        EndFuture::new(inner, Some(Call::new(span)))
    }
}

/// A call in progress: its span, entered while the response is made and
/// ended with a status code exactly once, when the call ends (see
/// [`super::call_end`]) or else when dropped (`Cancelled`).
pub struct Call {
    span: tracing::Span,
    finished: bool,
}

impl Call {
    fn new(span: tracing::Span) -> Self {
        Self {
            span,
            finished: false,
        }
    }
}

impl CallEnd for Call {
    /// Records that the call ended with `code`; the span closes with it.
    fn finish(mut self, code: Code) {
        self.finished = true;
        traces::rpc_finished(&self.span, code);
    }

    fn poll_in<T>(&self, poll: impl FnOnce() -> T) -> T {
        let _entered = self.span.enter();
        poll()
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            traces::rpc_finished(&self.span, Code::Cancelled);
        }
    }
}
