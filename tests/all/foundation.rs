//! The service foundation: health, reflection, authentication on every RPC,
//! and honest UNIMPLEMENTED answers for RPCs later issues implement.

use tokenvault::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::both_backends;
use crate::support::{As, Backend, spawn_vault};

async fn health_reports_serving_for_every_service(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut health = HealthClient::new(tv.channel.clone());
    for service in [
        "",
        "tokenvault.v1.ConnectionService",
        "tokenvault.v1.LeaseService",
        "tokenvault.v1.EventService",
        "tokenvault.v1.AdminService",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"));
        assert_eq!(resp.get_ref().status(), ServingStatus::Serving, "{service}");
    }
    let http = reqwest_like_get(tv.http_addr, "/healthz").await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
}
both_backends!(health_serving, health_reports_serving_for_every_service);

/// A minimal HTTP/1.1 GET over a raw TCP stream (no client library needed).
pub async fn reqwest_like_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn reflection_lists_the_four_services(backend: Backend) {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut client = ServerReflectionClient::new(tv.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in tokenvault::grpc::SERVICE_NAMES {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );
}
both_backends!(reflection, reflection_lists_the_four_services);

/// Clients that speak only v1alpha reflection (Postman, Evans, grpcurl
/// before 1.8.8) list the same services.
async fn v1alpha_reflection_lists_the_four_services(backend: Backend) {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut client = ServerReflectionClient::new(tv.channel.clone());
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let symbol = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "tokenvault.v1.LeaseService".into(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![list, symbol]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in tokenvault::grpc::SERVICE_NAMES {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let resp = stream.message().await.unwrap().expect("a second response");
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
both_backends!(
    reflection_v1alpha,
    v1alpha_reflection_lists_the_four_services
);

async fn calls_without_credentials_are_unauthenticated_and_audited(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let err = tv
        .admin_anonymous()
        .key_status(pb::KeyStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let err = tv
        .admin(As::Nobody)
        .key_status(pb::KeyStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A worker may not rotate keys; an auditor may read but not rotate.
    let err = tv
        .admin(As::Worker)
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = tv
        .admin(As::Auditor)
        .rotate_keys(pb::RotateKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    tv.admin(As::Auditor)
        .key_status(pb::KeyStatusRequest {})
        .await
        .unwrap();

    let denials = tv
        .admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest {
            outcome: Some(pb::AuditOutcome::Denied as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let seen: Vec<(String, String, String)> = denials
        .iter()
        .map(|e| (e.actor.clone(), e.action.clone(), e.target.clone()))
        .collect();
    for want in [
        ("anonymous", "authn.refuse", "AdminService.KeyStatus"),
        ("test-nobody", "authz.deny", "AdminService.KeyStatus"),
        (
            "spiffe://tokenvault.test/calendar-sync",
            "authz.deny",
            "AdminService.RotateKeys",
        ),
        ("test-auditor", "authz.deny", "AdminService.RotateKeys"),
    ] {
        assert!(
            seen.iter()
                .any(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()) == want),
            "{want:?} not audited; saw {seen:?}"
        );
    }
}
both_backends!(
    unauthenticated_and_denied,
    calls_without_credentials_are_unauthenticated_and_audited
);

async fn bad_input_gets_invalid_argument_naming_the_field(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut app = tv.connections(As::App);
    let err = app
        .get_connection(pb::GetConnectionRequest {
            connection_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("connection_id"), "{}", err.message());

    let err = app
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "x".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
        ),
        "{err:?}"
    );

    let err = app
        .list_connections(pb::ListConnectionsRequest {
            tenant_id: "acme".into(),
            integration: Some(99),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("integration"));

    let missing = format!("{}00000000-0000-4000-8000-000000000000", "conn_");
    let err = app
        .get_connection(pb::GetConnectionRequest {
            connection_id: missing,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
both_backends!(bad_input, bad_input_gets_invalid_argument_naming_the_field);
