//! Per-RPC server metrics in the names and labels of go-grpc-prometheus, so
//! that dashboards and alerts written for gRPC servers work unchanged:
//! `grpc_server_started_total`, `grpc_server_handled_total` (with
//! `grpc_code`: `OK`, `InvalidArgument`, `Unauthenticated`, …) and the
//! histogram `grpc_server_handling_seconds`, each labelled `grpc_type`
//! (`unary`, `client_stream`, `server_stream`, `bidi_stream`),
//! `grpc_service` and `grpc_method`.
//!
//! [`RpcMetricsLayer`] wraps the whole gRPC server (`Server::builder().layer`):
//! it sees each call after the routes have rewritten their refusals, so the
//! code counted is the code the client gets.
//!
//! Invariants:
//! - Only the methods the server serves are counted: the paths
//!   `/<package.Service>/<Method>` of the descriptor sets it registers
//!   (`tokenvault.v1`, health, reflection v1 and v1alpha), health and
//!   reflection included. Any other path passes uncounted, so no caller can
//!   add label values.
//! - Every counted call is recorded exactly once in `grpc_server_handled_total`
//!   and `grpc_server_handling_seconds`: with the `grpc-status` of a
//!   trailers-only response (how errors are usually sent) or of the trailers
//!   that end the body; as `Unknown` when the response ends without one; and
//!   when the call is dropped unfinished, as `DeadlineExceeded` if its
//!   `grpc-timeout` has passed, else as `Canceled` (the client went away).
//! - No allocation per call: label values are `&'static str` from a table
//!   built once, and each series' handle is created on its first use and
//!   kept. The table is built on the first call, after the recorder is
//!   installed (`crate::server` installs it before it serves).

use std::collections::HashMap;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Request, Response};
use hyper::body::Body;
use metrics::{Counter, Histogram};
use prost::Message as _;
use tonic::Code;
use tower_service::Service;

use super::call_end::{CallEnd, EndBody, EndFuture};

/// The layer that measures every RPC of the server it wraps.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// A gRPC service whose calls are measured (see [`RpcMetricsLayer`]).
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcMetrics<S>
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
        let call = methods()
            .get(request.uri().path())
            .map(|method| Call::start(method, request.headers()));
        EndFuture::new(self.inner.call(request), call)
    }
}

/// A call being measured: counted as started when it is made, recorded as
/// handled exactly once, when it ends (see [`super::call_end`]) or else when
/// dropped.
pub struct Call {
    method: &'static Method,
    started: Instant,
    /// The client's deadline (`grpc-timeout`), if it sent one.
    timeout: Option<Duration>,
    recorded: bool,
}

impl Call {
    fn start(method: &'static Method, headers: &HeaderMap) -> Self {
        method.started().increment(1);
        Self {
            method,
            started: Instant::now(),
            timeout: headers
                .get("grpc-timeout")
                .and_then(|v| timeout(v.as_bytes())),
            recorded: false,
        }
    }

    fn record(&mut self, code: Code) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.method.handled(code).increment(1);
        self.method
            .handling()
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl CallEnd for Call {
    fn finish(mut self, code: Code) {
        self.record(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let late = self.timeout.is_some_and(|t| self.started.elapsed() >= t);
        self.record(if late {
            Code::DeadlineExceeded
        } else {
            Code::Cancelled
        });
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`).
fn timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc_code` label: the code's name as gRPC's own libraries spell it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The number of gRPC status codes (0 to 16).
const CODES: usize = 17;

/// One method the server serves, with the handles of its series.
struct Method {
    /// `grpc_type`.
    kind: &'static str,
    /// `grpc_service`: the fully qualified service name.
    service: String,
    /// `grpc_method`.
    method: String,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    /// `grpc_server_handled_total` by code.
    handled: [OnceLock<Counter>; CODES],
}

impl Method {
    fn new(kind: &'static str, service: String, method: String) -> Self {
        Self {
            kind,
            service,
            method,
            started: OnceLock::new(),
            handling: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn started(&'static self) -> &'static Counter {
        self.started.get_or_init(|| {
            metrics::counter!(
                "grpc_server_started_total",
                "grpc_type" => self.kind,
                "grpc_service" => self.service.as_str(),
                "grpc_method" => self.method.as_str()
            )
        })
    }

    fn handling(&'static self) -> &'static Histogram {
        self.handling.get_or_init(|| {
            metrics::histogram!(
                "grpc_server_handling_seconds",
                "grpc_type" => self.kind,
                "grpc_service" => self.service.as_str(),
                "grpc_method" => self.method.as_str()
            )
        })
    }

    fn handled(&'static self, code: Code) -> &'static Counter {
        // Code's discriminants are 0 to 16: always within the array.
        self.handled[code as usize].get_or_init(|| {
            metrics::counter!(
                "grpc_server_handled_total",
                "grpc_type" => self.kind,
                "grpc_service" => self.service.as_str(),
                "grpc_method" => self.method.as_str(),
                "grpc_code" => code_name(code)
            )
        })
    }
}

/// The fully qualified service and the method of a path the server serves
/// (`/tokenvault.v1.LeaseService/LeaseToken` gives
/// `("tokenvault.v1.LeaseService", "LeaseToken")`); `None` for any other
/// path. The names come from the served descriptor sets, never from the
/// caller (the call's trace span is named with them).
pub(crate) fn served_method(path: &str) -> Option<(&'static str, &'static str)> {
    methods()
        .get(path)
        .map(|m| (m.service.as_str(), m.method.as_str()))
}

/// The methods the server serves, by path (`/package.Service/Method`).
fn methods() -> &'static HashMap<String, Method> {
    static METHODS: OnceLock<HashMap<String, Method>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let mut methods = HashMap::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let files = match prost_types::FileDescriptorSet::decode(set) {
                Ok(set) => set.file,
                Err(e) => {
                    tracing::warn!(error = %e, "a descriptor set does not decode; its methods are not measured");
                    continue;
                }
            };
            for file in files {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let service_name = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for m in service.method {
                        let kind = match (
                            m.client_streaming.unwrap_or(false),
                            m.server_streaming.unwrap_or(false),
                        ) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let method = m.name.unwrap_or_default();
                        methods.insert(
                            format!("/{service_name}/{method}"),
                            Method::new(kind, service_name.clone(), method),
                        );
                    }
                }
            }
        }
        methods
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_methods_are_known_with_their_types() {
        let kind = |path: &str| methods().get(path).map(|m| m.kind);
        for (path, expected) in [
            ("/tokenvault.v1.LeaseService/LeaseToken", "unary"),
            ("/tokenvault.v1.AdminService/KeyStatus", "unary"),
            ("/tokenvault.v1.EventService/Watch", "server_stream"),
            ("/grpc.health.v1.Health/Check", "unary"),
            ("/grpc.health.v1.Health/Watch", "server_stream"),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "bidi_stream",
            ),
            (
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "bidi_stream",
            ),
        ] {
            assert_eq!(kind(path), Some(expected), "{path}");
        }
        let method = &methods()["/tokenvault.v1.AdminService/KeyStatus"];
        assert_eq!(method.service, "tokenvault.v1.AdminService");
        assert_eq!(method.method, "KeyStatus");
        for unknown in ["/", "/tokenvault.v1.LeaseService/Nope", "/x/y", "/metrics"] {
            assert!(methods().get(unknown).is_none(), "{unknown}");
        }
    }

    #[test]
    fn codes_have_their_grpc_names() {
        let names: Vec<&str> = (0..CODES as i32)
            .map(|i| code_name(Code::from_i32(i)))
            .collect();
        let mut distinct = names.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), CODES, "{names:?}");
        assert_eq!(names[0], "OK");
        assert_eq!(names[1], "Canceled");
        assert_eq!(names[16], "Unauthenticated");
    }

    #[test]
    fn grpc_timeouts_are_parsed() {
        assert_eq!(timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(timeout(b"123456789S"), None, "at most 8 digits");
        assert_eq!(timeout(b"S"), None);
        assert_eq!(timeout(b"5x"), None);
        assert_eq!(timeout(b""), None);
        assert_eq!(timeout(b"-5S"), None);
    }
}
