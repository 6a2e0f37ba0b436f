//! Every gRPC request, parsed once: one type per request message whose fields
//! a handler reads, built from the decoded message with `TryFrom`. The
//! handlers (`connection.rs`, `lease.rs`, `events.rs`, `admin.rs`) call these
//! after authenticating the caller and before calling the vault, and
//! [`crate::fuzzing`] calls the very same impls on untrusted bytes: there is
//! no second copy of the parsing to drift from the server's.
//!
//! Invariants:
//! - A request field is parsed here and nowhere else (with the parsers of
//!   `domain` and `grpc::convert`, and the limits of [`crate::limits`]).
//! - Each impl parses its fields in a fixed order and stops at the first bad
//!   one, with a [`VaultError::InvalidArgument`] naming it: the same request
//!   always gets the same message, which the malformed-input tests compare
//!   word for word with what `fuzzing::grpc_request` predicts. Its reason
//!   says what kind of fault it is: [`VaultError::missing`] (FIELD_MISSING)
//!   for a required field left unset, [`VaultError::too_long`]
//!   (FIELD_TOO_LONG) for a value or a list over its limit,
//!   [`VaultError::invalid`] (FIELD_INVALID) for anything else.
//! - Every field is bounded (see [`crate::limits`]). A repeated field is
//!   counted before any of its elements is parsed, and a refusal states the
//!   limit and the count, never the values: bulk input is neither parsed nor
//!   echoed.
//! - Nothing here reads storage, the clock or the policy; checks that do, or
//!   that the vault audits (an OAuth state's length in
//!   `Vault::authorization_complete`, a lease's empty scope list in
//!   `Vault::lease_token`), stay in the vault.
//!
//! `EventService` requests name a consumer, which the handler parses and
//! checks the caller may act as before it reads anything else; so they also
//! parse from `(ConsumerName, message)`, with the consumer already parsed.
//! `AdminService.KeyStatus`, `RotateKeys` and `KeyReport` have no fields.
//!
//! One file for every RPC on purpose: the parsing rules (order, limits,
//! messages) are compared with each other and with `fuzzing` in one place.

use std::time::Duration;

use super::convert::{self, PageToken};
use crate::crypto::{KekVersion, SecretString};
use crate::domain::{
    AccountId, ConnectionId, ConsumerName, EventKind, Integration, LeaseId, Purpose, ReceiptId,
    ScopeSet, TenantId, VaultError,
};
use crate::limits::{
    MAX_AUDIT_FILTER_BYTES, MAX_CODE_BYTES, MAX_FILTER_VALUES, MAX_GOOGLE_SUBJECT_BYTES,
    MAX_MIN_VALID_SECONDS, MAX_SCOPES_PER_LEASE,
};
use crate::proto::v1 as pb;
use crate::store::{AuditFilter, ConnectionFilter, PageRequest};
use crate::vault::{Completion, FollowFrom, WatchRequest};

/// Refuses a repeated field with more than `max` elements before any is
/// parsed; the message names the field and the limit and counts what was
/// sent, quoting none of it ("at most 64 scopes (got 10000)").
fn count(field: &'static str, noun: &str, got: usize, max: usize) -> Result<(), VaultError> {
    if got > max {
        return Err(VaultError::too_long(
            field,
            format!("at most {max} {noun} (got {got})"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// ConnectionService
// ---------------------------------------------------------------------------

/// `ConnectionService.BeginAuthorization`, parsed.
#[derive(Debug)]
pub struct BeginAuthorizationRequest {
    /// The tenant connecting.
    pub tenant: TenantId,
    /// The account connecting.
    pub account: AccountId,
    /// The integration to connect.
    pub integration: Integration,
    /// The Google account to suggest (an email or subject), if the caller named one.
    pub login_hint: Option<String>,
}

impl TryFrom<pb::BeginAuthorizationRequest> for BeginAuthorizationRequest {
    type Error = VaultError;

    fn try_from(req: pb::BeginAuthorizationRequest) -> Result<Self, VaultError> {
        let tenant = TenantId::parse(&req.tenant_id)?;
        let account = AccountId::parse(&req.account_id)?;
        let integration = convert::integration(req.integration)?;
        if let Some(hint) = &req.login_hint {
            convert::login_hint(hint)?;
        }
        Ok(Self {
            tenant,
            account,
            integration,
            login_hint: req.login_hint,
        })
    }
}

/// `ConnectionService.CompleteAuthorization`, parsed. No `Debug`: it holds
/// the OAuth state and code.
pub struct CompleteAuthorizationRequest {
    /// The tenant the caller completes for; `None` (an empty `tenant_id`)
    /// means not checked.
    pub tenant: Option<TenantId>,
    /// The account the caller completes for; `None` (an empty `account_id`)
    /// means not checked.
    pub account: Option<AccountId>,
    /// What Google sent besides the state: a code (at most
    /// [`MAX_CODE_BYTES`](crate::limits::MAX_CODE_BYTES)) or an error.
    pub completion: Completion,
    /// The `state` Google sent back, unchecked: `Vault::authorization_complete`
    /// checks its length and looks it up, auditing a refusal.
    pub state: SecretString,
}

impl TryFrom<pb::CompleteAuthorizationRequest> for CompleteAuthorizationRequest {
    type Error = VaultError;

    fn try_from(req: pb::CompleteAuthorizationRequest) -> Result<Self, VaultError> {
        use crate::proto::v1::complete_authorization_request::Outcome;
        let tenant = (!req.tenant_id.is_empty())
            .then(|| TenantId::parse(&req.tenant_id))
            .transpose()?;
        let account = (!req.account_id.is_empty())
            .then(|| AccountId::parse(&req.account_id))
            .transpose()?;
        let completion = match req.outcome {
            Some(Outcome::Code(code)) => {
                let code = SecretString::new(code);
                if code.len() > MAX_CODE_BYTES {
                    return Err(VaultError::too_long(
                        "code",
                        format!("longer than {MAX_CODE_BYTES} bytes"),
                    ));
                }
                Completion::Code(code)
            }
            Some(Outcome::Error(e)) => Completion::Error(e.error, e.error_description),
            None => return Err(VaultError::missing("outcome", "set code or error")),
        };
        Ok(Self {
            tenant,
            account,
            completion,
            state: SecretString::new(req.state),
        })
    }
}

/// `ConnectionService.GetConnection` and `AdminService.GetConnection`, parsed.
#[derive(Debug)]
pub struct GetConnectionRequest {
    /// The connection asked for.
    pub connection: ConnectionId,
}

impl TryFrom<pb::GetConnectionRequest> for GetConnectionRequest {
    type Error = VaultError;

    fn try_from(req: pb::GetConnectionRequest) -> Result<Self, VaultError> {
        Ok(Self {
            connection: ConnectionId::parse(&req.connection_id)?,
        })
    }
}

impl TryFrom<pb::AdminServiceGetConnectionRequest> for GetConnectionRequest {
    type Error = VaultError;

    fn try_from(req: pb::AdminServiceGetConnectionRequest) -> Result<Self, VaultError> {
        Ok(Self {
            connection: ConnectionId::parse(&req.connection_id)?,
        })
    }
}

/// `ConnectionService.ListConnections` (always one tenant's) and
/// `AdminService.ListConnections` (any filter), parsed.
#[derive(Debug)]
pub struct ListConnectionsRequest {
    /// Which connections.
    pub filter: ConnectionFilter,
    /// The page asked for.
    pub page: PageRequest,
    /// What page tokens are bound to: the filter as asked.
    pub page_key: String,
}

impl ListConnectionsRequest {
    /// Parses the page of `filter`, whose fields are parsed already.
    fn with_page(
        filter: ConnectionFilter,
        page_size: i32,
        page_token: &str,
    ) -> Result<Self, VaultError> {
        let page_key = format!("{filter:?}");
        let page = PageToken::request(page_size, page_token, &page_key)?;
        Ok(Self {
            filter,
            page,
            page_key,
        })
    }
}

impl TryFrom<pb::ListConnectionsRequest> for ListConnectionsRequest {
    type Error = VaultError;

    fn try_from(req: pb::ListConnectionsRequest) -> Result<Self, VaultError> {
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
        Self::with_page(filter, req.page_size, &req.page_token)
    }
}

impl TryFrom<pb::AdminServiceListConnectionsRequest> for ListConnectionsRequest {
    type Error = VaultError;

    fn try_from(req: pb::AdminServiceListConnectionsRequest) -> Result<Self, VaultError> {
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
            // An exact-match filter applied in memory: any value up to the
            // longest subject OpenID Connect allows is valid.
            google_subject: match req.google_subject {
                Some(s) if s.len() > MAX_GOOGLE_SUBJECT_BYTES => {
                    return Err(VaultError::too_long(
                        "google_subject",
                        format!("at most {MAX_GOOGLE_SUBJECT_BYTES} bytes"),
                    ));
                }
                subject => subject,
            },
        };
        Self::with_page(filter, req.page_size, &req.page_token)
    }
}

/// `ConnectionService.Disconnect` and `AdminService.RevokeConnection`,
/// parsed.
#[derive(Debug)]
pub struct DisconnectRequest {
    /// The connection to delete.
    pub connection: ConnectionId,
    /// The caller's free-text reason (may be empty).
    pub reason: String,
}

impl DisconnectRequest {
    fn parse(connection_id: &str, reason: String) -> Result<Self, VaultError> {
        let connection = ConnectionId::parse(connection_id)?;
        convert::reason_text(&reason)?;
        Ok(Self { connection, reason })
    }
}

impl TryFrom<pb::DisconnectRequest> for DisconnectRequest {
    type Error = VaultError;

    fn try_from(req: pb::DisconnectRequest) -> Result<Self, VaultError> {
        Self::parse(&req.connection_id, req.reason)
    }
}

impl TryFrom<pb::RevokeConnectionRequest> for DisconnectRequest {
    type Error = VaultError;

    fn try_from(req: pb::RevokeConnectionRequest) -> Result<Self, VaultError> {
        Self::parse(&req.connection_id, req.reason)
    }
}

/// `ConnectionService.DeleteAccount` and `AdminService.DeleteAccount`, parsed.
#[derive(Debug)]
pub struct DeleteAccountRequest {
    /// The tenant of the account.
    pub tenant: TenantId,
    /// The account to delete.
    pub account: AccountId,
    /// The caller's free-text reason (may be empty).
    pub reason: String,
}

impl DeleteAccountRequest {
    fn parse(tenant_id: &str, account_id: &str, reason: String) -> Result<Self, VaultError> {
        let tenant = TenantId::parse(tenant_id)?;
        let account = AccountId::parse(account_id)?;
        convert::reason_text(&reason)?;
        Ok(Self {
            tenant,
            account,
            reason,
        })
    }
}

impl TryFrom<pb::DeleteAccountRequest> for DeleteAccountRequest {
    type Error = VaultError;

    fn try_from(req: pb::DeleteAccountRequest) -> Result<Self, VaultError> {
        Self::parse(&req.tenant_id, &req.account_id, req.reason)
    }
}

impl TryFrom<pb::AdminServiceDeleteAccountRequest> for DeleteAccountRequest {
    type Error = VaultError;

    fn try_from(req: pb::AdminServiceDeleteAccountRequest) -> Result<Self, VaultError> {
        Self::parse(&req.tenant_id, &req.account_id, req.reason)
    }
}

/// `ConnectionService.GetDeletionReceipt` and
/// `AdminService.GetDeletionReceipt`, parsed.
#[derive(Debug)]
pub struct GetDeletionReceiptRequest {
    /// The receipt asked for.
    pub receipt: ReceiptId,
}

impl TryFrom<pb::GetDeletionReceiptRequest> for GetDeletionReceiptRequest {
    type Error = VaultError;

    fn try_from(req: pb::GetDeletionReceiptRequest) -> Result<Self, VaultError> {
        Ok(Self {
            receipt: ReceiptId::parse(&req.receipt_id)?,
        })
    }
}

impl TryFrom<pb::AdminServiceGetDeletionReceiptRequest> for GetDeletionReceiptRequest {
    type Error = VaultError;

    fn try_from(req: pb::AdminServiceGetDeletionReceiptRequest) -> Result<Self, VaultError> {
        Ok(Self {
            receipt: ReceiptId::parse(&req.receipt_id)?,
        })
    }
}

// ---------------------------------------------------------------------------
// LeaseService
// ---------------------------------------------------------------------------

/// `LeaseService.LeaseToken`, parsed. The handler adds what is not in the
/// message (the vault's default `min_valid`, the call's deadline) to make a
/// [`crate::vault::LeaseRequest`]. An empty scope list parses: the vault
/// refuses it, and audits the refusal. More than
/// [`MAX_SCOPES_PER_LEASE`] scopes are refused here, before any is parsed.
#[derive(Debug)]
pub struct LeaseTokenRequest {
    /// The connection whose token is asked for.
    pub connection: ConnectionId,
    /// What the worker says it will do with the token.
    pub purpose: Purpose,
    /// The scopes the worker needs.
    pub scopes: ScopeSet,
    /// How long the token must stay valid, at most
    /// [`MAX_MIN_VALID_SECONDS`](crate::limits::MAX_MIN_VALID_SECONDS);
    /// `None` (0 in the message) means the vault's default.
    pub min_valid: Option<Duration>,
}

impl TryFrom<pb::LeaseTokenRequest> for LeaseTokenRequest {
    type Error = VaultError;

    fn try_from(req: pb::LeaseTokenRequest) -> Result<Self, VaultError> {
        let min_valid = match req.min_valid_seconds {
            0 => None,
            n if n > MAX_MIN_VALID_SECONDS => {
                return Err(VaultError::invalid(
                    "min_valid_seconds",
                    format!(
                        "must be at most {MAX_MIN_VALID_SECONDS} (Google tokens live one hour)"
                    ),
                ));
            }
            n => Some(Duration::from_secs(u64::from(n))),
        };
        let connection = ConnectionId::parse(&req.connection_id)?;
        let purpose = Purpose::parse(&req.purpose)?;
        count("scopes", "scopes", req.scopes.len(), MAX_SCOPES_PER_LEASE)?;
        let scopes = ScopeSet::parse(req.scopes.iter().map(String::as_str))?;
        Ok(Self {
            connection,
            purpose,
            scopes,
            min_valid,
        })
    }
}

/// `LeaseService.ReleaseLease`, parsed.
#[derive(Debug)]
pub struct ReleaseLeaseRequest {
    /// The lease to end.
    pub lease: LeaseId,
}

impl TryFrom<pb::ReleaseLeaseRequest> for ReleaseLeaseRequest {
    type Error = VaultError;

    fn try_from(req: pb::ReleaseLeaseRequest) -> Result<Self, VaultError> {
        Ok(Self {
            lease: LeaseId::parse(&req.lease_id)?,
        })
    }
}

// ---------------------------------------------------------------------------
// EventService
// ---------------------------------------------------------------------------

/// `EventService.Watch` with its consumer parsed (and, in the handler,
/// permitted) already: the cursor, then the kinds, then the integrations,
/// each list counted (at most [`MAX_FILTER_VALUES`]) before it is parsed.
impl TryFrom<(ConsumerName, pb::WatchRequest)> for WatchRequest {
    type Error = VaultError;

    fn try_from((consumer, req): (ConsumerName, pb::WatchRequest)) -> Result<Self, VaultError> {
        let after_cursor = req
            .after_cursor
            .map(|c| i64::try_from(c).map_err(|_| VaultError::invalid("after_cursor", "too large")))
            .transpose()?;
        count("kinds", "kinds", req.kinds.len(), MAX_FILTER_VALUES)?;
        let kinds: Vec<EventKind> = req
            .kinds
            .iter()
            .map(|k| convert::event_kind(*k))
            .collect::<Result<_, VaultError>>()?;
        count(
            "integrations",
            "integrations",
            req.integrations.len(),
            MAX_FILTER_VALUES,
        )?;
        let integrations: Vec<Integration> = req
            .integrations
            .iter()
            .map(|i| convert::integration(*i))
            .collect::<Result<_, VaultError>>()?;
        Ok(Self {
            consumer,
            after_cursor,
            kinds,
            integrations,
        })
    }
}

/// `EventService.Watch`: the consumer first, then the rest.
impl TryFrom<pb::WatchRequest> for WatchRequest {
    type Error = VaultError;

    fn try_from(req: pb::WatchRequest) -> Result<Self, VaultError> {
        let consumer = ConsumerName::parse(&req.consumer)?;
        Self::try_from((consumer, req))
    }
}

/// `EventService.Ack`, parsed.
#[derive(Debug)]
pub struct AckRequest {
    /// The consumer acknowledging.
    pub consumer: ConsumerName,
    /// The cursor of the event it acted on (positive).
    pub cursor: i64,
}

/// `EventService.Ack` with its consumer parsed (and, in the handler,
/// permitted) already.
impl TryFrom<(ConsumerName, pb::AckRequest)> for AckRequest {
    type Error = VaultError;

    fn try_from((consumer, req): (ConsumerName, pb::AckRequest)) -> Result<Self, VaultError> {
        if req.cursor == 0 {
            return Err(VaultError::invalid("cursor", "must be a positive cursor"));
        }
        let cursor =
            i64::try_from(req.cursor).map_err(|_| VaultError::invalid("cursor", "too large"))?;
        Ok(Self { consumer, cursor })
    }
}

/// `EventService.Ack`: the consumer first, then the cursor.
impl TryFrom<pb::AckRequest> for AckRequest {
    type Error = VaultError;

    fn try_from(req: pb::AckRequest) -> Result<Self, VaultError> {
        let consumer = ConsumerName::parse(&req.consumer)?;
        Self::try_from((consumer, req))
    }
}

// ---------------------------------------------------------------------------
// AdminService
// ---------------------------------------------------------------------------

/// `AdminService.ListDeletionReceipts`, parsed. The handler adds the SLA
/// cut-off for `overdue_only`, which moves with the clock.
#[derive(Debug)]
pub struct ListDeletionReceiptsRequest {
    /// Only receipts not yet complete.
    pub incomplete_only: bool,
    /// Only incomplete receipts past their SLA.
    pub overdue_only: bool,
    /// Only this tenant's.
    pub tenant: Option<TenantId>,
    /// Only this account's.
    pub account: Option<AccountId>,
    /// The page asked for.
    pub page: PageRequest,
    /// What page tokens are bound to: the filters as asked.
    pub page_key: String,
}

impl TryFrom<pb::ListDeletionReceiptsRequest> for ListDeletionReceiptsRequest {
    type Error = VaultError;

    fn try_from(req: pb::ListDeletionReceiptsRequest) -> Result<Self, VaultError> {
        let tenant = req.tenant_id.as_deref().map(TenantId::parse).transpose()?;
        let account = req
            .account_id
            .as_deref()
            .map(AccountId::parse)
            .transpose()?;
        // The SLA cut-off moves with the clock; the token binds the filters as asked.
        let page_key = format!(
            "{}|{}|{tenant:?}|{account:?}",
            req.incomplete_only, req.overdue_only
        );
        let page = PageToken::request(req.page_size, &req.page_token, &page_key)?;
        Ok(Self {
            incomplete_only: req.incomplete_only,
            overdue_only: req.overdue_only,
            tenant,
            account,
            page,
            page_key,
        })
    }
}

/// A key version named by an admin: 0 is not one.
fn kek_version(v: u32) -> Result<KekVersion, VaultError> {
    KekVersion::new(v).ok_or_else(|| VaultError::invalid("version", "must be at least 1"))
}

/// `AdminService.RetireKey`, parsed.
#[derive(Debug)]
pub struct RetireKeyRequest {
    /// The KEK version to retire.
    pub version: KekVersion,
}

impl TryFrom<pb::RetireKeyRequest> for RetireKeyRequest {
    type Error = VaultError;

    fn try_from(req: pb::RetireKeyRequest) -> Result<Self, VaultError> {
        Ok(Self {
            version: kek_version(req.version)?,
        })
    }
}

/// `AdminService.DestroyKey`, parsed.
#[derive(Debug)]
pub struct DestroyKeyRequest {
    /// The KEK version to destroy.
    pub version: KekVersion,
}

impl TryFrom<pb::DestroyKeyRequest> for DestroyKeyRequest {
    type Error = VaultError;

    fn try_from(req: pb::DestroyKeyRequest) -> Result<Self, VaultError> {
        Ok(Self {
            version: kek_version(req.version)?,
        })
    }
}

/// `AdminService.QueryAudit`, parsed: the filter already narrowed to the
/// page after the page token's position.
#[derive(Debug)]
pub struct QueryAuditRequest {
    /// Which entries, from where.
    pub filter: AuditFilter,
    /// The page asked for.
    pub page: PageRequest,
    /// What page tokens are bound to: the filter as asked.
    pub page_key: String,
}

impl TryFrom<pb::QueryAuditRequest> for QueryAuditRequest {
    type Error = VaultError;

    fn try_from(req: pb::QueryAuditRequest) -> Result<Self, VaultError> {
        let outcome = match req.outcome.map(pb::AuditOutcome::try_from) {
            None => None,
            Some(Ok(pb::AuditOutcome::Success)) => Some("ok".to_owned()),
            Some(Ok(pb::AuditOutcome::Denied)) => Some("denied".to_owned()),
            Some(Ok(pb::AuditOutcome::Failure)) => Some("failed".to_owned()),
            Some(_) => return Err(VaultError::invalid("outcome", "unknown or unspecified")),
        };
        // No audit field is longer than the limit or holds a control
        // character; PostgreSQL refuses NUL in text.
        for (field, value) in [
            ("actor", &req.actor),
            ("action", &req.action),
            ("target", &req.target),
        ] {
            let Some(value) = value.as_deref() else {
                continue;
            };
            if value.len() > MAX_AUDIT_FILTER_BYTES {
                return Err(VaultError::too_long(
                    field,
                    format!("at most {MAX_AUDIT_FILTER_BYTES} bytes"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(VaultError::invalid(
                    field,
                    "must not contain control characters",
                ));
            }
        }
        let mut filter = AuditFilter {
            actor: req.actor,
            action_prefix: req.action,
            target: req.target,
            since: req.since.as_ref().map(convert::from_ts),
            until: req.until.as_ref().map(convert::from_ts),
            outcome,
            before_seq: None,
            after_seq: req.after_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
            ascending: !req.newest_first,
            resume: std::collections::BTreeMap::new(),
        };
        if let (Some(since), Some(until)) = (filter.since, filter.until)
            && since > until
        {
            return Err(VaultError::invalid("since", "is after until"));
        }
        let page_key = format!("{filter:?}");
        let page = PageToken::request(req.page_size, &req.page_token, &page_key)?;
        if let Some(after) = &page.after {
            filter.resume = audit_positions(after)?;
        }
        Ok(Self {
            filter,
            page,
            page_key,
        })
    }
}

/// Where `AdminService.FollowAudit` starts: after `after_seq` and every one
/// of `after_seqs` (at most one per chain the log can hold), or with the
/// newest `backlog` entries of each chain.
pub fn follow_from(req: &pb::FollowAuditRequest) -> Result<FollowFrom, VaultError> {
    let max = usize::try_from(crate::store::audit::MAX_CHAINS).unwrap_or(usize::MAX);
    if req.after_seqs.len() > max {
        return Err(VaultError::too_long(
            "after_seqs",
            format!("at most {max} entries, one per chain"),
        ));
    }
    if req.after_seq.is_none() && req.after_seqs.is_empty() {
        return Ok(FollowFrom::Newest(req.backlog));
    }
    let seqs = req
        .after_seq
        .iter()
        .map(|s| ("after_seq", *s))
        .chain(req.after_seqs.iter().map(|s| ("after_seqs", *s)))
        .map(|(field, seq)| {
            i64::try_from(seq).map_err(|_| VaultError::invalid(field, "at most 2^63 - 1"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FollowFrom::After(seqs))
}

/// The positions a `QueryAudit` page token carries (see [`audit_page_after`]):
/// for each chain of the log, the last entry of it already read.
fn audit_positions(after: &str) -> Result<std::collections::BTreeMap<i64, i64>, VaultError> {
    use crate::store::audit::{MAX_CHAINS, chain_of};
    let malformed = || VaultError::invalid("page_token", "malformed");
    let mut positions = std::collections::BTreeMap::new();
    for part in after.split(',') {
        let seq: i64 = part.parse().map_err(|_| malformed())?;
        let chain = chain_of(seq);
        if seq < 1 || chain >= MAX_CHAINS || positions.insert(chain, seq).is_some() {
            return Err(malformed());
        }
    }
    Ok(positions)
}

/// What a `QueryAudit` page token says after a page of `rows` read past
/// `resume`: each chain's last entry read so far, by sequence number.
pub fn audit_page_after(
    resume: &std::collections::BTreeMap<i64, i64>,
    rows: &[crate::store::AuditRow],
) -> Option<String> {
    if rows.is_empty() {
        return None;
    }
    let mut positions = resume.clone();
    for r in rows {
        positions.insert(crate::store::audit::chain_of(r.seq), r.seq);
    }
    let list: Vec<String> = positions.values().map(i64::to_string).collect();
    Some(list.join(","))
}

/// `AdminService.VerifyAudit`, parsed.
#[derive(Debug)]
pub struct VerifyAuditRequest {
    /// The first entry to verify (1 when not given).
    pub from_seq: i64,
    /// The last entry to verify; `None` means the newest.
    pub to_seq: Option<i64>,
}

impl TryFrom<pb::VerifyAuditRequest> for VerifyAuditRequest {
    type Error = VaultError;

    fn try_from(req: pb::VerifyAuditRequest) -> Result<Self, VaultError> {
        let from_seq = req
            .from_seq
            .map_or(1, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let to_seq = req.to_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        if to_seq.is_some_and(|to| to < from_seq) {
            return Err(VaultError::invalid("from_seq", "is greater than to_seq"));
        }
        Ok(Self { from_seq, to_seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_ID_BYTES;

    /// The message a refusal shows the caller (the request types need no `Debug`).
    fn refusal<T>(parsed: Result<T, VaultError>) -> String {
        match parsed {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn lease(min_valid_seconds: u32) -> pb::LeaseTokenRequest {
        pb::LeaseTokenRequest {
            connection_id: ConnectionId::generate().to_string(),
            purpose: "calendar_sync".into(),
            scopes: vec!["openid".into()],
            min_valid_seconds,
        }
    }

    #[test]
    fn min_valid_seconds_is_accepted_up_to_its_limit_and_zero_means_the_default() {
        let at = LeaseTokenRequest::try_from(lease(MAX_MIN_VALID_SECONDS)).unwrap();
        let limit = u64::from(MAX_MIN_VALID_SECONDS);
        assert_eq!(at.min_valid, Some(Duration::from_secs(limit)));
        assert_eq!(
            LeaseTokenRequest::try_from(lease(0)).unwrap().min_valid,
            None
        );
        assert_eq!(
            refusal(LeaseTokenRequest::try_from(lease(
                MAX_MIN_VALID_SECONDS + 1
            ))),
            format!(
                "invalid min_valid_seconds: must be at most {MAX_MIN_VALID_SECONDS} \
                 (Google tokens live one hour)"
            )
        );
    }

    #[test]
    fn the_first_bad_field_in_parse_order_decides_the_refusal() {
        let mut req = lease(MAX_MIN_VALID_SECONDS + 1);
        req.connection_id = "nope".into();
        req.purpose = "Not A Purpose".into();
        let message = refusal(LeaseTokenRequest::try_from(req.clone()));
        assert!(
            message.starts_with("invalid min_valid_seconds"),
            "{message}"
        );
        req.min_valid_seconds = 0;
        let message = refusal(LeaseTokenRequest::try_from(req));
        assert!(message.starts_with("invalid connection_id"), "{message}");
    }

    #[test]
    fn an_empty_scope_list_is_left_to_the_vault() {
        let mut req = lease(0);
        req.scopes.clear();
        assert!(LeaseTokenRequest::try_from(req).unwrap().scopes.is_empty());
    }

    #[test]
    fn scopes_are_counted_before_any_is_parsed_and_never_echoed() {
        let scopes = |n: usize| (0..n).map(|i| format!("scope-{i:05}")).collect::<Vec<_>>();
        let mut req = lease(0);
        req.scopes = scopes(MAX_SCOPES_PER_LEASE);
        let parsed = LeaseTokenRequest::try_from(req.clone()).unwrap();
        assert_eq!(parsed.scopes.iter().count(), MAX_SCOPES_PER_LEASE);

        req.scopes = scopes(MAX_SCOPES_PER_LEASE + 1);
        assert_eq!(
            refusal(LeaseTokenRequest::try_from(req.clone())),
            format!(
                "invalid scopes: at most {MAX_SCOPES_PER_LEASE} scopes (got {})",
                MAX_SCOPES_PER_LEASE + 1
            )
        );
        // 10,000 scopes none of which would parse: the count decides, and
        // the message quotes none of them.
        req.scopes = vec!["bad scope".to_owned(); 10_000];
        let message = refusal(LeaseTokenRequest::try_from(req));
        assert_eq!(
            message,
            format!("invalid scopes: at most {MAX_SCOPES_PER_LEASE} scopes (got 10000)")
        );
    }

    #[test]
    fn watch_filters_are_counted_before_they_are_parsed() {
        let watch = |kinds: Vec<i32>, integrations: Vec<i32>| pb::WatchRequest {
            consumer: "calendar-sync".into(),
            after_cursor: None,
            kinds,
            integrations,
        };
        let at = WatchRequest::try_from(watch(
            vec![1; MAX_FILTER_VALUES],
            vec![1; MAX_FILTER_VALUES],
        ))
        .unwrap();
        assert_eq!(
            (at.kinds.len(), at.integrations.len()),
            (MAX_FILTER_VALUES, MAX_FILTER_VALUES)
        );
        // Unknown values, too many of them: the count decides.
        assert_eq!(
            refusal(WatchRequest::try_from(watch(vec![99; 1000], vec![]))),
            format!("invalid kinds: at most {MAX_FILTER_VALUES} kinds (got 1000)")
        );
        assert_eq!(
            refusal(WatchRequest::try_from(watch(
                vec![],
                vec![1; MAX_FILTER_VALUES + 1]
            ))),
            format!(
                "invalid integrations: at most {MAX_FILTER_VALUES} integrations (got {})",
                MAX_FILTER_VALUES + 1
            )
        );
    }

    #[test]
    fn free_text_filters_are_bounded_without_being_echoed() {
        let audit = |actor: String| pb::QueryAuditRequest {
            actor: Some(actor),
            ..Default::default()
        };
        QueryAuditRequest::try_from(audit("a".repeat(MAX_AUDIT_FILTER_BYTES))).unwrap();
        assert_eq!(
            refusal(QueryAuditRequest::try_from(audit(
                "a".repeat(MAX_AUDIT_FILTER_BYTES + 1)
            ))),
            format!("invalid actor: at most {MAX_AUDIT_FILTER_BYTES} bytes")
        );
        let subject = |s: String| pb::AdminServiceListConnectionsRequest {
            google_subject: Some(s),
            ..Default::default()
        };
        let at = ListConnectionsRequest::try_from(subject("1".repeat(MAX_GOOGLE_SUBJECT_BYTES)))
            .unwrap();
        assert_eq!(
            at.filter.google_subject.map(|s| s.len()),
            Some(MAX_GOOGLE_SUBJECT_BYTES)
        );
        assert_eq!(
            refusal(ListConnectionsRequest::try_from(subject(
                "1".repeat(MAX_GOOGLE_SUBJECT_BYTES + 1)
            ))),
            format!("invalid google_subject: at most {MAX_GOOGLE_SUBJECT_BYTES} bytes")
        );
    }

    #[test]
    fn codes_are_accepted_up_to_their_limit_and_the_state_is_left_to_the_vault() {
        use crate::proto::v1::complete_authorization_request::Outcome;
        let complete = |code_len: usize| pb::CompleteAuthorizationRequest {
            state: String::new(),
            outcome: Some(Outcome::Code("c".repeat(code_len))),
            tenant_id: String::new(),
            account_id: String::new(),
        };
        let parsed = CompleteAuthorizationRequest::try_from(complete(MAX_CODE_BYTES)).unwrap();
        assert!(parsed.state.is_empty() && parsed.tenant.is_none() && parsed.account.is_none());
        assert_eq!(
            refusal(CompleteAuthorizationRequest::try_from(complete(
                MAX_CODE_BYTES + 1
            ))),
            format!("invalid code: longer than {MAX_CODE_BYTES} bytes")
        );
        let mut none = complete(1);
        none.outcome = None;
        assert_eq!(
            refusal(CompleteAuthorizationRequest::try_from(none)),
            "invalid outcome: set code or error"
        );
    }

    #[test]
    fn a_refusal_says_whether_a_field_is_missing_too_long_or_invalid() {
        use crate::domain::ErrorReason;
        use crate::proto::v1::complete_authorization_request::Outcome;
        let reason = |parsed: Result<(), VaultError>| match parsed {
            Ok(()) => panic!("accepted"),
            Err(e) => e.reason(),
        };
        // No outcome: neither a code nor an error.
        let unset = pb::CompleteAuthorizationRequest::default();
        assert_eq!(
            reason(CompleteAuthorizationRequest::try_from(unset).map(drop)),
            ErrorReason::FieldMissing
        );
        let long_code = pb::CompleteAuthorizationRequest {
            outcome: Some(Outcome::Code("c".repeat(MAX_CODE_BYTES + 1))),
            ..Default::default()
        };
        assert_eq!(
            reason(CompleteAuthorizationRequest::try_from(long_code).map(drop)),
            ErrorReason::FieldTooLong
        );
        let mut many = lease(0);
        many.scopes = vec!["openid".to_owned(); MAX_SCOPES_PER_LEASE + 1];
        assert_eq!(
            reason(LeaseTokenRequest::try_from(many).map(drop)),
            ErrorReason::FieldTooLong
        );
        assert_eq!(
            reason(LeaseTokenRequest::try_from(lease(MAX_MIN_VALID_SECONDS + 1)).map(drop)),
            ErrorReason::FieldInvalid
        );
    }

    #[test]
    fn an_event_consumer_is_parsed_before_the_rest() {
        let ack = |consumer: String, cursor| pb::AckRequest { consumer, cursor };
        let long = "c".repeat(MAX_ID_BYTES + 1);
        let message = refusal(AckRequest::try_from(ack(long, 0)));
        assert!(message.starts_with("invalid consumer"), "{message}");
        let message = refusal(AckRequest::try_from(ack("calendar-sync".into(), 0)));
        assert_eq!(message, "invalid cursor: must be a positive cursor");
        let parsed = AckRequest::try_from(ack("calendar-sync".into(), 7)).unwrap();
        assert_eq!(
            (parsed.consumer.as_str(), parsed.cursor),
            ("calendar-sync", 7)
        );
    }
}
