//! The gRPC transport: thin handlers that authenticate the caller, parse the
//! request into domain types (once, in `requests.rs`), call the vault and
//! convert the result. Errors become `tonic::Status` in one place
//! (`status.rs`); every call is measured in one place (`rpc_metrics.rs`)
//! and runs in one span, the trace's server span when traces are exported
//! (`trace_context.rs`).

mod admin;
pub mod auth;
pub mod call_end;
mod connection;
pub mod convert;
mod events;
mod lease;
pub mod refusals;
pub mod requests;
pub mod rpc_metrics;
mod status;
pub mod trace_context;
pub mod transport;

use std::sync::Arc;

use tonic::service::Routes;

use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::connection_service_server::ConnectionServiceServer;
use crate::proto::v1::event_service_server::EventServiceServer;
use crate::proto::v1::lease_service_server::LeaseServiceServer;
use crate::vault::Vault;

pub use auth::{Authenticator, Caller, Role};
pub use rpc_metrics::RpcMetricsLayer;
pub use trace_context::RpcSpanLayer;

/// What every handler needs.
pub struct Context {
    /// The vault.
    pub vault: Arc<Vault>,
    /// Caller authentication and roles.
    pub auth: Authenticator,
}

/// The largest request the server decodes (bytes); defined with the other
/// request limits in [`crate::limits`].
pub use crate::limits::MAX_REQUEST_BYTES;

/// The four `tokenvault.v1` services, health and reflection (v1 and
/// v1alpha), as routes.
pub fn routes<H>(
    ctx: Arc<Context>,
    health: tonic_health::pb::health_server::HealthServer<H>,
) -> Result<Routes, tonic_reflection::server::Error>
where
    H: tonic_health::pb::health_server::Health,
{
    // Reflection in both versions: v1, and v1alpha for the clients that
    // speak only that (Postman, Evans, grpcurl before 1.8.8).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = Routes::builder();
    routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            ConnectionServiceServer::new(connection::Connections(ctx.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            LeaseServiceServer::new(lease::Leases(ctx.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            EventServiceServer::new(events::Events(ctx.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServiceServer::new(admin::Admin(ctx)).max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    let router = routes.routes().into_axum_router();
    Ok(Routes::from(
        router.layer(axum::middleware::map_response(refused_requests)),
    ))
}

/// tonic refuses requests it cannot decode before any handler runs: one over
/// [`MAX_REQUEST_BYTES`] with OUT_OF_RANGE (a code the API gives event
/// cursors only), one whose body is not the request message with INTERNAL
/// (which the API keeps for the vault's own bugs). Callers get
/// INVALID_ARGUMENT instead, as for any other request they must change,
/// with the reason `REQUEST_TOO_LARGE` or `REQUEST_MALFORMED` (see
/// `status::add_error_info`).
async fn refused_requests(mut response: axum::response::Response) -> axum::response::Response {
    use axum::http::HeaderValue;
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").map(HeaderValue::as_bytes);
    // grpc-message is percent-encoded.
    let message = headers
        .get("grpc-message")
        .map_or(&b""[..], HeaderValue::as_bytes);
    let too_large = status == Some(&b"11"[..])
        && message.starts_with(b"Error,%20decoded%20message%20length%20too%20large");
    let undecodable = status == Some(&b"13"[..])
        && message.starts_with(b"failed%20to%20decode%20Protobuf%20message");
    if too_large {
        const _: () = assert!(MAX_REQUEST_BYTES == 262_144, "update the message below");
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("request%20too%20large:%20at%20most%20262144%20bytes"),
        );
    }
    if too_large || undecodable {
        headers.insert("grpc-status", HeaderValue::from_static("3"));
    }
    // Like every status the vault sends, these (and any other refusal made
    // before a handler ran) carry an ErrorInfo with a documented reason.
    self::status::add_error_info(response.headers_mut());
    response
}

/// The service names health checking reports on.
pub const SERVICE_NAMES: [&str; 4] = [
    "tokenvault.v1.ConnectionService",
    "tokenvault.v1.LeaseService",
    "tokenvault.v1.EventService",
    "tokenvault.v1.AdminService",
];
