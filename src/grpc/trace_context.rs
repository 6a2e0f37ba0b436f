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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tonic::Code;
use tower_service::Service;

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
    type Response = Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

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
        ResponseFuture {
            inner,
            call: Some(Call::new(span)),
        }
    }
}

/// The response future of [`RpcSpan`]: polled inside the call's span.
pub struct ResponseFuture<F> {
    inner: F,
    call: Option<Call>,
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
    B: Body,
{
    type Output = Result<Response<TracedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            Pin::new(&mut this.inner).poll(cx)
        };
        let result = ready!(polled);
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => Ok(traced(response, call)),
            Err(e) => {
                if let Some(call) = call {
                    call.finish(Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

/// Ends a call whose status is in the response's headers (trailers-only)
/// or that has no body to carry trailers; leaves the others to the body.
fn traced<B: Body>(response: Response<B>, call: Option<Call>) -> Response<TracedBody<B>> {
    let call = match (call, status(response.headers())) {
        (Some(call), Some(code)) => {
            call.finish(code);
            None
        }
        (Some(call), None) if response.body().is_end_stream() => {
            call.finish(Code::Unknown);
            None
        }
        (call, _) => call,
    };
    response.map(|inner| TracedBody { inner, call })
}

/// A response body that ends its call's span when the trailers pass, when
/// it ends without them, or when it is dropped first.
pub struct TracedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> Body for TracedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| status(trailers).unwrap_or(Code::Unknown)),
            Poll::Ready(Some(Err(_)) | None) => Some(Code::Unknown),
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of headers or trailers (`Unknown` if it is not a code).
fn status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// A call in progress: its span, ended with a status code exactly once, by
/// [`Call::finish`] or else when dropped (`Cancelled`).
struct Call {
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

    /// Records that the call ended with `code`; the span closes with it.
    fn finish(mut self, code: Code) {
        self.finished = true;
        traces::rpc_finished(&self.span, code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            traces::rpc_finished(&self.span, Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_read_from_headers_and_trailers() {
        let mut headers = HeaderMap::new();
        assert_eq!(status(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status(&headers), Some(Code::NotFound));
        headers.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(status(&headers), Some(Code::Unknown));
    }
}
