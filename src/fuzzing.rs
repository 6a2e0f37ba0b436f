//! Entry points for fuzzing the vault's network edges without a database, a
//! keyring or a network: plain synchronous functions that take untrusted bytes
//! and run them through the parsers the server runs on them.
//!
//! - [`grpc_request`]: decodes any request message of the `tokenvault.v1` API
//!   with `prost` and, when it decodes, parses it with the RPC handler's own
//!   parser (its `TryFrom` impl in `grpc::requests`), then makes the checks
//!   the vault makes before it reads storage (an OAuth state's length, a
//!   lease's empty scope list), which stay in the vault because it audits
//!   their refusals.
//! - [`oauth_callback_query`]: the query string of `GET /oauth/callback`,
//!   through axum's `Query` extractor and the callback's checks.
//! - [`risc_body`]: the body of `POST /risc`, through the endpoint's size and
//!   UTF-8 checks and the RS256 JWT parser ([`JwksCache::verify`]) up to the
//!   signature check, which needs Google's keys.
//!
//! The handlers themselves need a running vault; `tests/all/malformed.rs`
//! sends the same requests to a real server and checks that it refuses them
//! with the message [`grpc_request`] predicts. The parsing is the server's
//! own, so what those tests still guard is the handlers' use of it (parsing
//! after authorization, nothing read before) and the two vault checks
//! mirrored here. The cargo-fuzz targets in `fuzz/` and a stable smoke test
//! call these functions; none of them may panic on any input.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use prost::Message;

use crate::crypto::SecretString;
use crate::domain::VaultError;
use crate::google::{JwksCache, JwtError};
use crate::grpc::requests::{
    AckRequest, BeginAuthorizationRequest, CompleteAuthorizationRequest, DeleteAccountRequest,
    DestroyKeyRequest, DisconnectRequest, GetConnectionRequest, GetDeletionReceiptRequest,
    LeaseTokenRequest, ListConnectionsRequest, ListDeletionReceiptsRequest, QueryAuditRequest,
    ReleaseLeaseRequest, RetireKeyRequest, VerifyAuditRequest,
};
use crate::limits::{MAX_RISC_BODY_BYTES, MAX_STATE_BYTES};
use crate::proto::v1 as pb;
use crate::vault::{Completion, WatchRequest};

/// What a parser made of its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The bytes are not a valid encoding (protobuf, URI); the reason. A gRPC
    /// caller gets INVALID_ARGUMENT ("failed to decode Protobuf message"), an
    /// HTTP one 400 from hyper.
    Undecodable(String),
    /// Decoded, then refused: the message the caller gets (with gRPC status
    /// INVALID_ARGUMENT, or HTTP 400).
    Rejected(String),
    /// Decoded and valid as far as parsing goes; the server would go on to
    /// storage (or, for RISC, to Google's signing keys).
    Accepted,
}

/// Every RPC of the `tokenvault.v1` API, naming the request message
/// [`grpc_request`] decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `ConnectionService.BeginAuthorization`.
    BeginAuthorization,
    /// `ConnectionService.CompleteAuthorization`.
    CompleteAuthorization,
    /// `ConnectionService.GetConnection`.
    GetConnection,
    /// `ConnectionService.ListConnections`.
    ListConnections,
    /// `ConnectionService.Disconnect`.
    Disconnect,
    /// `ConnectionService.DeleteAccount`.
    DeleteAccount,
    /// `ConnectionService.GetDeletionReceipt`.
    GetDeletionReceipt,
    /// `LeaseService.LeaseToken`.
    LeaseToken,
    /// `LeaseService.ReleaseLease`.
    ReleaseLease,
    /// `EventService.Watch`.
    Watch,
    /// `EventService.Ack`.
    Ack,
    /// `AdminService.ListConnections`.
    AdminListConnections,
    /// `AdminService.GetConnection`.
    AdminGetConnection,
    /// `AdminService.RevokeConnection`.
    RevokeConnection,
    /// `AdminService.DeleteAccount`.
    AdminDeleteAccount,
    /// `AdminService.GetDeletionReceipt`.
    AdminGetDeletionReceipt,
    /// `AdminService.ListDeletionReceipts`.
    ListDeletionReceipts,
    /// `AdminService.KeyStatus`.
    KeyStatus,
    /// `AdminService.RotateKeys`.
    RotateKeys,
    /// `AdminService.RetireKey`.
    RetireKey,
    /// `AdminService.DestroyKey`.
    DestroyKey,
    /// `AdminService.KeyReport`.
    KeyReport,
    /// `AdminService.QueryAudit`.
    QueryAudit,
    /// `AdminService.VerifyAudit`.
    VerifyAudit,
}

impl Rpc {
    /// Every RPC, in the order of the proto files.
    pub const ALL: [Rpc; 24] = [
        Rpc::BeginAuthorization,
        Rpc::CompleteAuthorization,
        Rpc::GetConnection,
        Rpc::ListConnections,
        Rpc::Disconnect,
        Rpc::DeleteAccount,
        Rpc::GetDeletionReceipt,
        Rpc::LeaseToken,
        Rpc::ReleaseLease,
        Rpc::Watch,
        Rpc::Ack,
        Rpc::AdminListConnections,
        Rpc::AdminGetConnection,
        Rpc::RevokeConnection,
        Rpc::AdminDeleteAccount,
        Rpc::AdminGetDeletionReceipt,
        Rpc::ListDeletionReceipts,
        Rpc::KeyStatus,
        Rpc::RotateKeys,
        Rpc::RetireKey,
        Rpc::DestroyKey,
        Rpc::KeyReport,
        Rpc::QueryAudit,
        Rpc::VerifyAudit,
    ];

    /// The gRPC path, e.g. `/tokenvault.v1.LeaseService/LeaseToken`.
    pub const fn path(self) -> &'static str {
        match self {
            Rpc::BeginAuthorization => "/tokenvault.v1.ConnectionService/BeginAuthorization",
            Rpc::CompleteAuthorization => "/tokenvault.v1.ConnectionService/CompleteAuthorization",
            Rpc::GetConnection => "/tokenvault.v1.ConnectionService/GetConnection",
            Rpc::ListConnections => "/tokenvault.v1.ConnectionService/ListConnections",
            Rpc::Disconnect => "/tokenvault.v1.ConnectionService/Disconnect",
            Rpc::DeleteAccount => "/tokenvault.v1.ConnectionService/DeleteAccount",
            Rpc::GetDeletionReceipt => "/tokenvault.v1.ConnectionService/GetDeletionReceipt",
            Rpc::LeaseToken => "/tokenvault.v1.LeaseService/LeaseToken",
            Rpc::ReleaseLease => "/tokenvault.v1.LeaseService/ReleaseLease",
            Rpc::Watch => "/tokenvault.v1.EventService/Watch",
            Rpc::Ack => "/tokenvault.v1.EventService/Ack",
            Rpc::AdminListConnections => "/tokenvault.v1.AdminService/ListConnections",
            Rpc::AdminGetConnection => "/tokenvault.v1.AdminService/GetConnection",
            Rpc::RevokeConnection => "/tokenvault.v1.AdminService/RevokeConnection",
            Rpc::AdminDeleteAccount => "/tokenvault.v1.AdminService/DeleteAccount",
            Rpc::AdminGetDeletionReceipt => "/tokenvault.v1.AdminService/GetDeletionReceipt",
            Rpc::ListDeletionReceipts => "/tokenvault.v1.AdminService/ListDeletionReceipts",
            Rpc::KeyStatus => "/tokenvault.v1.AdminService/KeyStatus",
            Rpc::RotateKeys => "/tokenvault.v1.AdminService/RotateKeys",
            Rpc::RetireKey => "/tokenvault.v1.AdminService/RetireKey",
            Rpc::DestroyKey => "/tokenvault.v1.AdminService/DestroyKey",
            Rpc::KeyReport => "/tokenvault.v1.AdminService/KeyReport",
            Rpc::QueryAudit => "/tokenvault.v1.AdminService/QueryAudit",
            Rpc::VerifyAudit => "/tokenvault.v1.AdminService/VerifyAudit",
        }
    }

    /// Whether the server streams its answer (`EventService.Watch`).
    pub const fn is_streaming(self) -> bool {
        matches!(self, Rpc::Watch)
    }
}

/// Decodes `bytes` as the request message of `rpc` and, when it decodes,
/// parses its fields as the RPC's handler does.
pub fn grpc_request(rpc: Rpc, bytes: &[u8]) -> Verdict {
    match parse_request(rpc, bytes) {
        Ok(()) => Verdict::Accepted,
        Err(Refusal::Decode(e)) => Verdict::Undecodable(e.to_string()),
        Err(Refusal::Invalid(e)) => Verdict::Rejected(tonic::Status::from(e).message().to_owned()),
    }
}

enum Refusal {
    Decode(prost::DecodeError),
    Invalid(VaultError),
}

impl From<prost::DecodeError> for Refusal {
    fn from(e: prost::DecodeError) -> Self {
        Refusal::Decode(e)
    }
}

impl From<VaultError> for Refusal {
    fn from(e: VaultError) -> Self {
        Refusal::Invalid(e)
    }
}

/// Decodes `bytes` as `M` and parses it into `R`, as the server does.
fn parse<M, R>(bytes: &[u8]) -> Result<R, Refusal>
where
    M: Message + Default,
    R: TryFrom<M, Error = VaultError>,
{
    Ok(R::try_from(M::decode(bytes)?)?)
}

fn parse_request(rpc: Rpc, bytes: &[u8]) -> Result<(), Refusal> {
    match rpc {
        Rpc::BeginAuthorization => {
            parse::<pb::BeginAuthorizationRequest, BeginAuthorizationRequest>(bytes)?;
        }
        Rpc::CompleteAuthorization => {
            let req =
                parse::<pb::CompleteAuthorizationRequest, CompleteAuthorizationRequest>(bytes)?;
            state(req.state.expose())?;
        }
        Rpc::GetConnection => {
            parse::<pb::GetConnectionRequest, GetConnectionRequest>(bytes)?;
        }
        Rpc::ListConnections => {
            parse::<pb::ListConnectionsRequest, ListConnectionsRequest>(bytes)?;
        }
        Rpc::Disconnect => {
            parse::<pb::DisconnectRequest, DisconnectRequest>(bytes)?;
        }
        Rpc::DeleteAccount => {
            parse::<pb::DeleteAccountRequest, DeleteAccountRequest>(bytes)?;
        }
        Rpc::GetDeletionReceipt => {
            parse::<pb::GetDeletionReceiptRequest, GetDeletionReceiptRequest>(bytes)?;
        }
        Rpc::LeaseToken => {
            let req = parse::<pb::LeaseTokenRequest, LeaseTokenRequest>(bytes)?;
            // Checked (and the refusal audited) by `Vault::lease_token` before anything else.
            if req.scopes.is_empty() {
                return Err(VaultError::invalid("scopes", "name at least one scope").into());
            }
        }
        Rpc::ReleaseLease => {
            parse::<pb::ReleaseLeaseRequest, ReleaseLeaseRequest>(bytes)?;
        }
        Rpc::Watch => {
            parse::<pb::WatchRequest, WatchRequest>(bytes)?;
        }
        Rpc::Ack => {
            parse::<pb::AckRequest, AckRequest>(bytes)?;
        }
        Rpc::AdminListConnections => {
            parse::<pb::AdminServiceListConnectionsRequest, ListConnectionsRequest>(bytes)?;
        }
        Rpc::AdminGetConnection => {
            parse::<pb::AdminServiceGetConnectionRequest, GetConnectionRequest>(bytes)?;
        }
        Rpc::RevokeConnection => {
            parse::<pb::RevokeConnectionRequest, DisconnectRequest>(bytes)?;
        }
        Rpc::AdminDeleteAccount => {
            parse::<pb::AdminServiceDeleteAccountRequest, DeleteAccountRequest>(bytes)?;
        }
        Rpc::AdminGetDeletionReceipt => {
            parse::<pb::AdminServiceGetDeletionReceiptRequest, GetDeletionReceiptRequest>(bytes)?;
        }
        Rpc::ListDeletionReceipts => {
            parse::<pb::ListDeletionReceiptsRequest, ListDeletionReceiptsRequest>(bytes)?;
        }
        // No fields to parse.
        Rpc::KeyStatus => {
            pb::KeyStatusRequest::decode(bytes)?;
        }
        Rpc::RotateKeys => {
            pb::RotateKeysRequest::decode(bytes)?;
        }
        Rpc::KeyReport => {
            pb::KeyReportRequest::decode(bytes)?;
        }
        Rpc::RetireKey => {
            parse::<pb::RetireKeyRequest, RetireKeyRequest>(bytes)?;
        }
        Rpc::DestroyKey => {
            parse::<pb::DestroyKeyRequest, DestroyKeyRequest>(bytes)?;
        }
        Rpc::QueryAudit => {
            parse::<pb::QueryAuditRequest, QueryAuditRequest>(bytes)?;
        }
        Rpc::VerifyAudit => {
            parse::<pb::VerifyAuditRequest, VerifyAuditRequest>(bytes)?;
        }
    }
    Ok(())
}

/// The state checks `Vault::authorization_complete` makes before its lookup
/// (which audits a refusal, so they are made there, not in
/// `grpc::requests`): both the gRPC call and the HTTP callback reach them.
fn state(state: &str) -> Result<(), VaultError> {
    if state.is_empty() || state.len() > MAX_STATE_BYTES {
        return Err(VaultError::invalid(
            "state",
            "unknown, expired or already used",
        ));
    }
    Ok(())
}

/// Parses the query string of `GET /oauth/callback` (without the `?`) as the
/// route does: axum's `Query` extractor, then the parameters the callback
/// reads and the state checks made before the state is looked up.
pub fn oauth_callback_query(query: &str) -> Verdict {
    use axum::extract::Query;
    let Ok(uri) = format!("/oauth/callback?{query}").parse::<axum::http::Uri>() else {
        // hyper refuses such a request line before any route sees it.
        return Verdict::Undecodable("not a valid request target".to_owned());
    };
    let mut params = match Query::<HashMap<String, String>>::try_from_uri(&uri) {
        Ok(Query(params)) => params,
        Err(e) => return Verdict::Rejected(e.body_text()),
    };
    let state_param = params.remove("state").unwrap_or_default();
    let _completion = match (params.remove("code"), params.remove("error")) {
        (_, Some(error)) => Completion::Error(
            error,
            params.remove("error_description").unwrap_or_default(),
        ),
        (Some(code), None) => Completion::Code(SecretString::new(code)),
        (None, None) => Completion::Code(SecretString::new(String::new())),
    };
    match state(&state_param) {
        Ok(()) => Verdict::Accepted,
        Err(e) => Verdict::Rejected(e.to_string()),
    }
}

/// Parses a `POST /risc` body as the route does: size and UTF-8 checks, then
/// the RS256 JWT parser up to the signature check. The key cache used here
/// holds no keys and cannot fetch any (its URL has no HTTP scheme), so a token
/// that parses ends at "signing keys unavailable", reported as
/// [`Verdict::Accepted`].
pub fn risc_body(body: &[u8]) -> Verdict {
    if body.len() > MAX_RISC_BODY_BYTES {
        return Verdict::Rejected("token too large".to_owned());
    }
    let Ok(token) = std::str::from_utf8(body) else {
        return Verdict::Rejected("body is not a token".to_owned());
    };
    static KEYLESS: OnceLock<Option<JwksCache>> = OnceLock::new();
    let cache = KEYLESS.get_or_init(|| {
        let http = reqwest::Client::builder().build().ok()?;
        Some(JwksCache::new("fuzzing:no-keys".to_owned(), http))
    });
    let Some(cache) = cache else {
        return Verdict::Undecodable("no HTTP client could be built for the key cache".to_owned());
    };
    let verify = std::pin::pin!(cache.verify(token.trim()));
    match verify.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(_) | Err(JwtError::Jwks(_))) => Verdict::Accepted,
        Poll::Ready(Err(e)) => Verdict::Rejected(e.to_string()),
        // reqwest refuses a URL without an HTTP scheme before any I/O, so the
        // first poll always completes; waiting would mean network access.
        Poll::Pending => panic!("JWT verification waited for I/O in the keyless fuzzing cache"),
    }
}
