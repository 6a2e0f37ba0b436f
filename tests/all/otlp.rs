//! Distributed traces over OTLP, as an operator turns them on: a `tokenvault
//! serve` child with `[tracing] otlp_endpoint` pointed at a small OTLP/gRPC
//! receiver run by the test. A lease made with the caller's `traceparent`
//! is one trace, child of the caller's span: the RPC's server span, the
//! lease use case under it and the lease's database call groups under
//! that; the batches that serve many leases are traces of their own linked
//! to them; everything reaches the receiver by the time the server has
//! stopped (the exporter is flushed on a graceful shutdown, not left to its
//! five-second schedule); and no exported byte is a token or an API key.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokenvault::domain::Integration;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;

use crate::both_backends;
use crate::serve_cli::ServeProcess;
use crate::support::{
    As, Backend, Bearer, calendar_lease, seed_connection, spawn_vault, write_config_file,
};

/// The seeded tokens: neither may appear in anything exported.
const ACCESS: &str = "ya29.otlp-trace-test-access-token-4c1d9e";
const REFRESH: &str = "1//otlp-trace-test-refresh-token-77b0a2";

/// An OTLP/gRPC trace receiver keeping every export request it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on an ephemeral loopback port, until the test ends; its address.
    async fn start(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        addr
    }

    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.0.lock().unwrap().clone()
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }

    /// Everything received, as it came over the wire: names, attributes,
    /// events, links and resources alike.
    fn bytes(&self) -> Vec<u8> {
        self.requests()
            .iter()
            .flat_map(|r| r.encode_to_vec())
            .collect()
    }
}

/// The value of an attribute.
fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn integer(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// The one span named `name` whose parent is `parent`.
fn child<'a>(spans: &[&'a Span], name: &str, parent: &[u8]) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .copied()
        .filter(|s| s.name == name && s.parent_span_id == parent)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {name} span under {}, got {found:?}\nin the trace: {:?}",
        hex::encode(parent),
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// The one span named `name`, outside `trace`, linked to `from`.
fn linked<'a>(spans: &'a [Span], name: &str, trace: &[u8], from: &Span) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.name == name
                && s.links
                    .iter()
                    .any(|l| l.trace_id == trace && l.span_id == from.span_id)
        })
        .collect();
    assert_eq!(found.len(), 1, "one {name} span links to {}", from.name);
    assert_ne!(
        found[0].trace_id, trace,
        "a batch serving many leases is a trace of its own"
    );
    found[0]
}

async fn a_lease_is_one_trace_of_rpc_use_case_and_database_spans(backend: Backend) {
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let Some(mut tv) = spawn_vault(backend).await else {
        return;
    };
    let connection = seed_connection(
        &tv.vault,
        "t-otlp",
        "u-otlp",
        Integration::Calendar,
        ACCESS,
        Some(REFRESH),
    )
    .await;
    let connection_id = connection.id.to_string();
    tv.stop().await;
    let config = write_config_file(
        tv.dir.path(),
        &tv.config,
        &format!(
            "[tracing]\notlp_endpoint = \"http://{collector}\"\nservice_name = \"tokenvault-otlp-test\"\n"
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let server = ServeProcess::start(tv.dir.path(), &["--config", &config], &[]);

    // The caller's own trace, as a sync worker instrumented with OpenTelemetry sends it.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut leases = LeaseServiceClient::with_interceptor(
        channel,
        Bearer(Some(
            format!("Bearer {}", As::Worker.key()).parse().unwrap(),
        )),
    );
    let mut request = tonic::Request::new(calendar_lease(&connection_id));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let lease = leases
        .lease_token(request)
        .await
        .expect("a lease with the caller's traceparent")
        .into_inner();
    assert_eq!(lease.access_token, ACCESS);
    // Close our connection first: the server drains it when it stops.
    drop(leases);

    // A graceful stop flushes the exporter: the spans are there when the
    // process has exited.
    server.signal("TERM");
    let (server, status) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let status = server.wait(Duration::from_secs(30));
        (server, status)
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        server.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = receiver.spans();
        if spans.iter().any(|s| s.name == "lease") || Instant::now() >= deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One lease, one trace: the caller's.
    let trace = hex::decode(&trace_id).unwrap();
    let lease_spans: Vec<&Span> = spans.iter().filter(|s| s.name == "lease").collect();
    assert_eq!(
        lease_spans.len(),
        1,
        "one lease span; received: {:?}\nlog:\n{}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
        server.log_text()
    );
    assert_eq!(
        lease_spans[0].trace_id, trace,
        "the lease is in the caller's trace"
    );
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();

    // The RPC: the server span, child of the caller's span.
    let rpc = child(
        &in_trace,
        "tokenvault.v1.LeaseService/LeaseToken",
        &hex::decode(&caller_span).unwrap(),
    );
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(text(&rpc.attributes, "rpc.system"), Some("grpc"));
    assert_eq!(
        text(&rpc.attributes, "rpc.service"),
        Some("tokenvault.v1.LeaseService")
    );
    assert_eq!(text(&rpc.attributes, "rpc.method"), Some("LeaseToken"));
    assert_eq!(integer(&rpc.attributes, "rpc.grpc.status_code"), Some(0));

    // The use case, under the RPC.
    let use_case = child(&in_trace, "lease", &rpc.span_id);
    assert_eq!(
        text(&use_case.attributes, "connection"),
        Some(connection_id.as_str())
    );
    assert_eq!(text(&use_case.attributes, "purpose"), Some("calendar_sync"));

    // Its database call groups, under the use case: the batched read (the
    // child's cache starts empty) and the audited grant.
    let lookup = child(&in_trace, "lease_lookup", &use_case.span_id);
    let append = child(&in_trace, "audit_append", &use_case.span_id);
    for (span, operation) in [(lookup, "lease_lookup"), (append, "audit_append")] {
        assert_eq!(text(&span.attributes, "db.operation.name"), Some(operation));
        assert_eq!(span.kind, SpanKind::Client as i32);
    }
    // The batches that served them, each linked back to the lease's span.
    let read = linked(&spans, "lease_lookup_batch", &trace, lookup);
    let commit = linked(&spans, "audit_commit", &trace, append);
    assert!(integer(&read.attributes, "db.operation.batch.size").is_some_and(|n| n >= 1));
    let system = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgresql",
    };
    assert_eq!(text(&commit.attributes, "db.system.name"), Some(system));

    // Named as configured.
    let services: BTreeSet<&str> = receiver
        .requests()
        .iter()
        .flat_map(|r| &r.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .filter_map(|r| text(&r.attributes, "service.name"))
        .map(|name| {
            if name == "tokenvault-otlp-test" {
                "as configured"
            } else {
                "other"
            }
        })
        .collect();
    assert_eq!(services, BTreeSet::from(["as configured"]));

    // Nothing exported holds a token or an API key.
    let exported = receiver.bytes();
    assert!(!exported.is_empty());
    let mut secrets = vec![
        ("the access token".to_owned(), ACCESS.to_owned()),
        ("the refresh token".to_owned(), REFRESH.to_owned()),
    ];
    for who in As::ALL {
        secrets.push((format!("the API key of {who:?}"), who.key()));
    }
    for (what, secret) in &secrets {
        assert!(
            !exported
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "{what} is in an exported span"
        );
    }
}
both_backends!(
    otlp_lease_trace,
    a_lease_is_one_trace_of_rpc_use_case_and_database_spans
);
