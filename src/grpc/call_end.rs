//! When and how a gRPC call ends, as a layer around the whole server sees
//! it: with the `grpc-status` of a trailers-only response (how errors are
//! usually sent) or of the trailers that end the body, as `Unknown` when the
//! response ends without one, or dropped unfinished. The per-RPC metrics
//! (`rpc_metrics`) and the per-RPC span (`trace_context`) both need that
//! moment; this module is the one place that finds it.
//!
//! Invariant: a call's [`CallEnd::finish`] runs at most once, at the first of
//! these; a call dropped before any of them is left to its own `Drop`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, Response};
use hyper::body::{Body, Frame, SizeHint};
use tonic::Code;

/// What a layer keeps for one call until it ends.
pub trait CallEnd {
    /// The call ended with `code`.
    fn finish(self, code: Code);

    /// Runs one poll of the call's response future (the span layer runs it
    /// inside the call's span).
    fn poll_in<T>(&self, poll: impl FnOnce() -> T) -> T {
        poll()
    }
}

/// A response future that hands its call to the response body, or finishes
/// it when the future fails.
pub struct EndFuture<F, C> {
    inner: F,
    call: Option<C>,
}

impl<F, C> EndFuture<F, C> {
    /// Watches `inner`, the response future of `call` (none: not watched).
    pub fn new(inner: F, call: Option<C>) -> Self {
        Self { inner, call }
    }
}

impl<F, B, E, C> Future for EndFuture<F, C>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
    B: Body,
    C: CallEnd + Unpin,
{
    type Output = Result<Response<EndBody<B, C>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        let polled = match &this.call {
            Some(call) => call.poll_in(|| Pin::new(inner).poll(cx)),
            None => Pin::new(inner).poll(cx),
        };
        let result = ready!(polled);
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => Ok(watched(response, call)),
            Err(e) => {
                if let Some(call) = call {
                    call.finish(Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

/// Finishes a call whose status is in the response's headers (trailers-only)
/// or that has no body to carry trailers; leaves the others to the body.
fn watched<B: Body, C: CallEnd>(response: Response<B>, call: Option<C>) -> Response<EndBody<B, C>> {
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
    response.map(|inner| EndBody { inner, call })
}

/// A response body that finishes its call when the trailers pass or when it
/// ends without them (dropped first, the call is dropped with it).
pub struct EndBody<B, C> {
    inner: B,
    call: Option<C>,
}

impl<B, C> Body for EndBody<B, C>
where
    B: Body + Unpin,
    C: CallEnd + Unpin,
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
