//! Entry points for fuzzing the vault's network edges without a database, a
//! keyring or a network: plain synchronous functions that take untrusted bytes
//! and run them through the parsers the server runs on them.
//!
//! - [`grpc_request`]: decodes any request message of the `tokenvault.v1` API
//!   with `prost` and, when it decodes, parses its fields as the RPC's handler
//!   does, in the same order and with the same parsers (`domain` newtypes,
//!   `grpc::convert`, page tokens) and the checks the vault makes before it
//!   reads storage (an OAuth state's length, a lease's empty scope list).
//! - [`oauth_callback_query`]: the query string of `GET /oauth/callback`,
//!   through axum's `Query` extractor and the callback's checks.
//! - [`risc_body`]: the body of `POST /risc`, through the endpoint's size and
//!   UTF-8 checks and the RS256 JWT parser ([`JwksCache::verify`]) up to the
//!   signature check, which needs Google's keys.
//!
//! The handlers themselves need a running vault; `tests/all/malformed.rs`
//! sends the same requests to a real server and checks that it refuses them
//! with the message [`grpc_request`] predicts, so the two cannot drift apart
//! unnoticed. The cargo-fuzz targets in `fuzz/` and a stable smoke test call
//! these functions; none of them may panic on any input.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use prost::Message;

use crate::crypto::{KekVersion, SecretString};
use crate::domain::{
    AccountId, ConnectionId, ConsumerName, LeaseId, Purpose, ReceiptId, ScopeSet, TenantId,
    VaultError,
};
use crate::google::{JwksCache, JwtError};
use crate::grpc::convert::{self, PageToken};
use crate::proto::v1 as pb;
use crate::store::{AuditFilter, ConnectionFilter};
use crate::vault::Completion;

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

/// The longest authorization code `CompleteAuthorization` accepts (as its handler).
const MAX_CODE: usize = 2048;
/// The longest OAuth state the vault looks up (as `Vault::authorization_complete`).
const MAX_STATE: usize = 512;
/// The largest `min_valid_seconds` `LeaseToken` accepts (as its handler).
const MAX_MIN_VALID: u32 = 3000;

fn parse_request(rpc: Rpc, bytes: &[u8]) -> Result<(), Refusal> {
    match rpc {
        Rpc::BeginAuthorization => {
            let req = pb::BeginAuthorizationRequest::decode(bytes)?;
            TenantId::parse(&req.tenant_id)?;
            AccountId::parse(&req.account_id)?;
            convert::integration(req.integration)?;
            req.login_hint
                .as_deref()
                .map(convert::login_hint)
                .transpose()?;
        }
        Rpc::CompleteAuthorization => {
            let req = pb::CompleteAuthorizationRequest::decode(bytes)?;
            if !req.tenant_id.is_empty() {
                TenantId::parse(&req.tenant_id)?;
            }
            if !req.account_id.is_empty() {
                AccountId::parse(&req.account_id)?;
            }
            match &req.outcome {
                Some(pb::complete_authorization_request::Outcome::Code(code)) => {
                    if code.len() > MAX_CODE {
                        return Err(VaultError::invalid("code", "longer than 2048 bytes").into());
                    }
                }
                Some(pb::complete_authorization_request::Outcome::Error(_)) => {}
                None => return Err(VaultError::invalid("outcome", "set code or error").into()),
            }
            state(&req.state)?;
        }
        Rpc::GetConnection | Rpc::AdminGetConnection => {
            let req = pb::GetConnectionRequest::decode(bytes)?;
            ConnectionId::parse(&req.connection_id)?;
        }
        Rpc::ListConnections => {
            let req = pb::ListConnectionsRequest::decode(bytes)?;
            let filter = ConnectionFilter {
                tenant: Some(TenantId::parse(&req.tenant_id)?),
                account: req
                    .account_id
                    .as_deref()
                    .map(AccountId::parse)
                    .transpose()?,
                integration: req.integration.map(convert::integration).transpose()?,
                include_deleted: req.include_deleted,
                status: req.status.map(convert::connection_status).transpose()?,
                google_subject: None,
            };
            PageToken::request(req.page_size, &req.page_token, &format!("{filter:?}"))?;
        }
        Rpc::Disconnect => {
            let req = pb::DisconnectRequest::decode(bytes)?;
            ConnectionId::parse(&req.connection_id)?;
            convert::reason_text(&req.reason)?;
        }
        Rpc::DeleteAccount | Rpc::AdminDeleteAccount => {
            let req = pb::DeleteAccountRequest::decode(bytes)?;
            TenantId::parse(&req.tenant_id)?;
            AccountId::parse(&req.account_id)?;
            convert::reason_text(&req.reason)?;
        }
        Rpc::GetDeletionReceipt | Rpc::AdminGetDeletionReceipt => {
            let req = pb::GetDeletionReceiptRequest::decode(bytes)?;
            ReceiptId::parse(&req.receipt_id)?;
        }
        Rpc::LeaseToken => {
            let req = pb::LeaseTokenRequest::decode(bytes)?;
            if req.min_valid_seconds > MAX_MIN_VALID {
                return Err(VaultError::invalid(
                    "min_valid_seconds",
                    "must be at most 3000 (Google tokens live one hour)",
                )
                .into());
            }
            ConnectionId::parse(&req.connection_id)?;
            Purpose::parse(&req.purpose)?;
            let scopes = ScopeSet::parse(req.scopes.iter().map(String::as_str))?;
            // Checked by `Vault::lease_token` before anything else.
            if scopes.is_empty() {
                return Err(VaultError::invalid("scopes", "name at least one scope").into());
            }
        }
        Rpc::ReleaseLease => {
            let req = pb::ReleaseLeaseRequest::decode(bytes)?;
            LeaseId::parse(&req.lease_id)?;
        }
        Rpc::Watch => {
            let req = pb::WatchRequest::decode(bytes)?;
            ConsumerName::parse(&req.consumer)?;
            req.after_cursor
                .map(|c| {
                    i64::try_from(c).map_err(|_| VaultError::invalid("after_cursor", "too large"))
                })
                .transpose()?;
            for kind in &req.kinds {
                convert::event_kind(*kind)?;
            }
            for integration in &req.integrations {
                convert::integration(*integration)?;
            }
        }
        Rpc::Ack => {
            let req = pb::AckRequest::decode(bytes)?;
            ConsumerName::parse(&req.consumer)?;
            if req.cursor == 0 {
                return Err(VaultError::invalid("cursor", "must be a positive cursor").into());
            }
            i64::try_from(req.cursor).map_err(|_| VaultError::invalid("cursor", "too large"))?;
        }
        Rpc::AdminListConnections => {
            let req = pb::AdminListConnectionsRequest::decode(bytes)?;
            let filter = ConnectionFilter {
                tenant: req.tenant_id.as_deref().map(TenantId::parse).transpose()?,
                account: req
                    .account_id
                    .as_deref()
                    .map(AccountId::parse)
                    .transpose()?,
                integration: req.integration.map(convert::integration).transpose()?,
                include_deleted: req.include_deleted,
                status: req.status.map(convert::connection_status).transpose()?,
                google_subject: req.google_subject.clone(),
            };
            let key = format!("{filter:?}");
            PageToken::request(req.page_size, &req.page_token, &key)?;
        }
        Rpc::RevokeConnection => {
            let req = pb::RevokeConnectionRequest::decode(bytes)?;
            ConnectionId::parse(&req.connection_id)?;
            convert::reason_text(&req.reason)?;
        }
        Rpc::ListDeletionReceipts => {
            let req = pb::ListDeletionReceiptsRequest::decode(bytes)?;
            let tenant = req.tenant_id.as_deref().map(TenantId::parse).transpose()?;
            let account = req
                .account_id
                .as_deref()
                .map(AccountId::parse)
                .transpose()?;
            let key = format!(
                "{}|{}|{tenant:?}|{account:?}",
                req.incomplete_only, req.overdue_only
            );
            PageToken::request(req.page_size, &req.page_token, &key)?;
        }
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
            let req = pb::RetireKeyRequest::decode(bytes)?;
            kek_version(req.version)?;
        }
        Rpc::DestroyKey => {
            let req = pb::DestroyKeyRequest::decode(bytes)?;
            kek_version(req.version)?;
        }
        Rpc::QueryAudit => query_audit(&pb::QueryAuditRequest::decode(bytes)?)?,
        Rpc::VerifyAudit => {
            let req = pb::VerifyAuditRequest::decode(bytes)?;
            let from = req
                .from_seq
                .map_or(1, |s| i64::try_from(s).unwrap_or(i64::MAX));
            let to = req.to_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
            if to.is_some_and(|to| to < from) {
                return Err(VaultError::invalid("from_seq", "is greater than to_seq").into());
            }
        }
    }
    Ok(())
}

fn kek_version(v: u32) -> Result<KekVersion, VaultError> {
    KekVersion::new(v).ok_or_else(|| VaultError::invalid("version", "must be at least 1"))
}

/// The state checks `Vault::authorization_complete` makes before its lookup.
fn state(state: &str) -> Result<(), VaultError> {
    if state.is_empty() || state.len() > MAX_STATE {
        return Err(VaultError::invalid(
            "state",
            "unknown, expired or already used",
        ));
    }
    Ok(())
}

/// `AdminService.QueryAudit`'s parsing, as its handler.
fn query_audit(req: &pb::QueryAuditRequest) -> Result<(), VaultError> {
    let outcome = match req.outcome.map(pb::AuditOutcome::try_from) {
        None => None,
        Some(Ok(pb::AuditOutcome::Success)) => Some("ok".to_owned()),
        Some(Ok(pb::AuditOutcome::Denied)) => Some("denied".to_owned()),
        Some(Ok(pb::AuditOutcome::Failure)) => Some("failed".to_owned()),
        Some(_) => return Err(VaultError::invalid("outcome", "unknown or unspecified")),
    };
    for (field, value) in [
        ("actor", &req.actor),
        ("action", &req.action),
        ("target", &req.target),
    ] {
        if value
            .as_deref()
            .is_some_and(|v| v.chars().any(char::is_control))
        {
            return Err(VaultError::invalid(
                field,
                "must not contain control characters",
            ));
        }
    }
    let filter = AuditFilter {
        actor: req.actor.clone(),
        action_prefix: req.action.clone(),
        target: req.target.clone(),
        since: req.since.as_ref().map(convert::from_ts),
        until: req.until.as_ref().map(convert::from_ts),
        outcome,
        before_seq: None,
        after_seq: req.after_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        ascending: !req.newest_first,
    };
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && since > until
    {
        return Err(VaultError::invalid("since", "is after until"));
    }
    let page = PageToken::request(req.page_size, &req.page_token, &format!("{filter:?}"))?;
    if let Some(after) = &page.after {
        after
            .parse::<i64>()
            .map_err(|_| VaultError::invalid("page_token", "malformed"))?;
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

/// The largest body `POST /risc` reads as a token (as the route).
const MAX_SET_BYTES: usize = 64 * 1024;

/// Parses a `POST /risc` body as the route does: size and UTF-8 checks, then
/// the RS256 JWT parser up to the signature check. The key cache used here
/// holds no keys and cannot fetch any (its URL has no HTTP scheme), so a token
/// that parses ends at "signing keys unavailable", reported as
/// [`Verdict::Accepted`].
pub fn risc_body(body: &[u8]) -> Verdict {
    if body.len() > MAX_SET_BYTES {
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
