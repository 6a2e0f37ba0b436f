//! The one transport-agnostic error type of the vault. Transports convert it
//! in exactly one place each (`grpc::status`, `http`), which decides what the
//! caller may see. No variant ever carries token, key or secret bytes.
//!
//! Every error has an [`ErrorReason`]: a stable, documented name for its
//! cause that clients may branch on (the gRPC transport sends it as
//! `google.rpc.ErrorInfo.reason` in the domain [`ERROR_DOMAIN`]; the README's
//! "Error reasons" table lists them all, and a test keeps the two equal).
//!
//! Invariants:
//! - The set of reasons is closed ([`ErrorReason::ALL`]); a reason's name
//!   never changes once released. Each belongs to one [`VaultError`] variant
//!   and so to one status code, except the three the gRPC transport gives
//!   its own refusals made before a handler runs (`REQUEST_TOO_LARGE`,
//!   `REQUEST_MALFORMED`: INVALID_ARGUMENT; `REQUEST_REFUSED`: whatever
//!   code the framework chose). [`VaultError::because`] refuses a reason of
//!   another variant, so a reason and its code always agree.
//! - A reason never says more than the message does: a connection in a
//!   tenant the caller may not see is `CONNECTION_NOT_FOUND`, exactly as a
//!   missing one; an OAuth state bound to another caller is `FIELD_INVALID`,
//!   exactly as an unknown one.
//! - Where a site names no reason, the variant's default applies (see
//!   [`VaultError::reason`]): each variant has a generic reason of its own
//!   (`PRECONDITION_FAILED`, `POLICY_DENIED`, `SERVICE_UNAVAILABLE`, …), so
//!   that every error has one.

use std::borrow::Cow;

use super::{ConnectionStatus, Scope};
use crate::crypto::CryptoError;
use crate::limits::{MAX_QUOTED_CHARS, MAX_QUOTED_SCOPES};

/// The `google.rpc.ErrorInfo.domain` of every reason: the logical name of the
/// service that defines them.
pub const ERROR_DOMAIN: &str = "tokenvault";

/// Declares [`ErrorReason`] with its wire names, in one list, so that the
/// name of a reason is written once.
macro_rules! error_reasons {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )+) => {
        /// Why a call failed, as clients may branch on it: a closed set of
        /// stable SCREAMING_SNAKE_CASE names (see the README's "Error
        /// reasons" table for each one's code, meaning and what a client
        /// should do). Carries no data: the message and the status details
        /// say the rest.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorReason {
            $( $(#[$doc])* $variant, )+
        }

        impl ErrorReason {
            /// Every reason, in the order declared.
            pub const ALL: &'static [ErrorReason] = &[$(ErrorReason::$variant),+];

            /// Its wire name (`google.rpc.ErrorInfo.reason`), e.g.
            /// `CONNECTION_NOT_FOUND`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorReason::$variant => $name,)+
                }
            }
        }
    };
}

error_reasons! {
    // INVALID_ARGUMENT: the caller must change the request.
    /// A required field is empty or unset.
    FieldMissing => "FIELD_MISSING",
    /// A field's value does not parse or is not allowed (including an OAuth
    /// state or code the vault or Google does not accept).
    FieldInvalid => "FIELD_INVALID",
    /// A field is longer, or a repeated field has more elements, than its
    /// limit.
    FieldTooLong => "FIELD_TOO_LONG",
    /// The request message is larger than the server decodes (set by the
    /// transport before any handler runs).
    RequestTooLarge => "REQUEST_TOO_LARGE",
    /// The request body is not the request message (set by the transport
    /// before any handler runs).
    RequestMalformed => "REQUEST_MALFORMED",

    // NOT_FOUND.
    /// No such connection, or one in a tenant the caller may not see.
    ConnectionNotFound => "CONNECTION_NOT_FOUND",
    /// No such lease.
    LeaseNotFound => "LEASE_NOT_FOUND",
    /// No such deletion receipt.
    ReceiptNotFound => "RECEIPT_NOT_FOUND",
    /// No such key version.
    KeyVersionNotFound => "KEY_VERSION_NOT_FOUND",
    /// Another kind of object named in the request does not exist.
    ResourceNotFound => "RESOURCE_NOT_FOUND",

    // FAILED_PRECONDITION: the request is fine, the state is not.
    /// The connection was disconnected or deleted.
    ConnectionDeleted => "CONNECTION_DELETED",
    /// The connection is suspended (e.g. Google reported the account hijacked).
    ConnectionSuspended => "CONNECTION_SUSPENDED",
    /// The connection holds no usable grant (revoked at Google, expired, no
    /// refresh token): the user must connect again.
    ReconnectRequired => "RECONNECT_REQUIRED",
    /// Google did not grant a scope the request needs.
    ScopeNotGranted => "SCOPE_NOT_GRANTED",
    /// The connection changed while the request was served.
    ConnectionChanged => "CONNECTION_CHANGED",
    /// Google ended the authorization without a usable grant; nothing was
    /// connected.
    AuthorizationFailed => "AUTHORIZATION_FAILED",
    /// The vault has no Google OAuth client configured.
    GoogleNotConfigured => "GOOGLE_NOT_CONFIGURED",
    /// Another state of the vault does not allow the operation (key
    /// versions, rotations, the audit archive); the message says which.
    PreconditionFailed => "PRECONDITION_FAILED",

    // UNAUTHENTICATED.
    /// The call carried no credentials.
    CredentialsMissing => "CREDENTIALS_MISSING",
    /// The call's credentials are not accepted.
    CredentialsInvalid => "CREDENTIALS_INVALID",

    // PERMISSION_DENIED.
    /// The caller's identity has no role, or its role may not call the RPC.
    RoleNotAllowed => "ROLE_NOT_ALLOWED",
    /// The policy does not grant the caller the purpose it named.
    PurposeNotAllowed => "PURPOSE_NOT_ALLOWED",
    /// The caller may not act as the event consumer it named.
    ConsumerNotAllowed => "CONSUMER_NOT_ALLOWED",
    /// The lease belongs to another identity.
    LeaseNotOwned => "LEASE_NOT_OWNED",
    /// The policy does not grant what was asked (e.g. a lease beyond its
    /// purpose's integrations, tenants or scopes).
    PolicyDenied => "POLICY_DENIED",

    // OUT_OF_RANGE.
    /// A cursor or sequence number is past the newest event or entry.
    CursorOutOfRange => "CURSOR_OUT_OF_RANGE",
    /// Events after the cursor were pruned: resuming would miss some.
    EventsPruned => "EVENTS_PRUNED",

    // RESOURCE_EXHAUSTED.
    /// The caller asked too often; the message says when to retry.
    RateLimited => "RATE_LIMITED",

    // UNAVAILABLE: retrying later may succeed.
    /// The database cannot be reached.
    DatabaseUnavailable => "DATABASE_UNAVAILABLE",
    /// The audit log cannot be written, so the operation was not performed.
    AuditUnavailable => "AUDIT_UNAVAILABLE",
    /// Google did not answer, or not in time.
    GoogleUnavailable => "GOOGLE_UNAVAILABLE",
    /// The server is shutting down.
    ShuttingDown => "SHUTTING_DOWN",
    /// Another transient failure (a key rotation racing the call, a replica
    /// lacking a key version, concurrent changes).
    ServiceUnavailable => "SERVICE_UNAVAILABLE",

    // DATA_LOSS.
    /// The stored tokens were sealed under a destroyed key version.
    KeyVersionDestroyed => "KEY_VERSION_DESTROYED",
    /// Stored secret data failed to open.
    DecryptionFailed => "DECRYPTION_FAILED",

    // UNIMPLEMENTED.
    /// The server does not serve this method.
    MethodNotImplemented => "METHOD_NOT_IMPLEMENTED",

    // INTERNAL.
    /// A fault inside the vault; details are in its logs.
    Internal => "INTERNAL",

    // Any code.
    /// The gRPC framework refused the call before a handler ran, for a
    /// reason none of the above names (the code and message say which).
    RequestRefused => "REQUEST_REFUSED",
}

/// The [`VaultError`] variant (and so the status code) a reason belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    DataLoss,
    Unimplemented,
    Internal,
    /// Set by the transport only, for refusals made before a handler ran.
    Transport,
}

impl ErrorReason {
    /// The reason with this wire name, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == name)
    }

    /// Why a connection in `status` cannot be used (leased, refreshed): what
    /// the caller can do differs with the status.
    pub fn unusable(status: ConnectionStatus) -> Self {
        match status {
            ConnectionStatus::Deleted => Self::ConnectionDeleted,
            ConnectionStatus::Suspended => Self::ConnectionSuspended,
            ConnectionStatus::RevokedUpstream | ConnectionStatus::ConsentRequired => {
                Self::ReconnectRequired
            }
            ConnectionStatus::InsufficientScope => Self::ScopeNotGranted,
            // Active when looked at again: it changed under the call.
            ConnectionStatus::Active => Self::ConnectionChanged,
        }
    }

    fn family(self) -> Family {
        use ErrorReason as R;
        match self {
            R::FieldMissing | R::FieldInvalid | R::FieldTooLong => Family::InvalidArgument,
            R::RequestTooLarge | R::RequestMalformed | R::RequestRefused => Family::Transport,
            R::ConnectionNotFound
            | R::LeaseNotFound
            | R::ReceiptNotFound
            | R::KeyVersionNotFound
            | R::ResourceNotFound => Family::NotFound,
            R::ConnectionDeleted
            | R::ConnectionSuspended
            | R::ReconnectRequired
            | R::ScopeNotGranted
            | R::ConnectionChanged
            | R::AuthorizationFailed
            | R::GoogleNotConfigured
            | R::PreconditionFailed => Family::FailedPrecondition,
            R::CredentialsMissing | R::CredentialsInvalid => Family::Unauthenticated,
            R::RoleNotAllowed
            | R::PurposeNotAllowed
            | R::ConsumerNotAllowed
            | R::LeaseNotOwned
            | R::PolicyDenied => Family::PermissionDenied,
            R::CursorOutOfRange | R::EventsPruned => Family::OutOfRange,
            R::RateLimited => Family::ResourceExhausted,
            R::DatabaseUnavailable
            | R::AuditUnavailable
            | R::GoogleUnavailable
            | R::ShuttingDown
            | R::ServiceUnavailable => Family::Unavailable,
            R::KeyVersionDestroyed | R::DecryptionFailed => Family::DataLoss,
            R::MethodNotImplemented => Family::Unimplemented,
            R::Internal => Family::Internal,
        }
    }
}

impl std::fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller is told, and why: the message of the variants that carry
/// one, with the reason when the site that made the error named one (see
/// [`VaultError::because`]). Built from any string (`"…".into()`,
/// `format!(…).into()`), reason unset; reads as the message (`Display`,
/// `Deref<Target = str>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    /// Set only by [`VaultError::because`], which checks that it belongs to
    /// the variant holding it.
    reason: Option<ErrorReason>,
    message: Cow<'static, str>,
}

impl Detail {
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The reason the site named, if it named one.
    pub fn reason(&self) -> Option<ErrorReason> {
        self.reason
    }
}

impl From<&'static str> for Detail {
    fn from(message: &'static str) -> Self {
        Self {
            reason: None,
            message: Cow::Borrowed(message),
        }
    }
}

impl From<String> for Detail {
    fn from(message: String) -> Self {
        Self {
            reason: None,
            message: Cow::Owned(message),
        }
    }
}

impl From<Cow<'static, str>> for Detail {
    fn from(message: Cow<'static, str>) -> Self {
        Self {
            reason: None,
            message,
        }
    }
}

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::ops::Deref for Detail {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

/// Everything that can go wrong in a vault operation.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The caller sent a value that does not parse; nothing was changed.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The request field, as named in the API.
        field: &'static str,
        /// What is wrong with it.
        message: Cow<'static, str>,
        /// `FIELD_MISSING`, `FIELD_INVALID` or `FIELD_TOO_LONG`; set by the
        /// constructors ([`VaultError::invalid`], [`VaultError::missing`],
        /// [`VaultError::too_long`]).
        reason: ErrorReason,
    },

    /// The named object does not exist (or the caller may not know it does).
    #[error("{what} {id} not found")]
    NotFound {
        /// The kind of object.
        what: &'static str,
        /// Its identifier as the caller gave it.
        id: String,
    },

    /// The request is well-formed but the object's state does not allow it
    /// (a destroyed key, a connection that is not active, a rotation running).
    #[error("{0}")]
    FailedPrecondition(Detail),

    /// The caller presented no usable identity.
    #[error("{0}")]
    Unauthenticated(Detail),

    /// The caller's identity is not granted this operation by the policy.
    #[error("{0}")]
    PermissionDenied(Detail),

    /// A position outside what exists (an event cursor past the newest, or
    /// before what was pruned).
    #[error("{0}")]
    OutOfRange(Detail),

    /// The caller reached a limit on how often it may ask (authorizations
    /// begun per minute); the message says when retrying succeeds.
    #[error("{0}")]
    ResourceExhausted(Detail),

    /// A dependency (database, keyring, Google) cannot be reached right now;
    /// retrying later may succeed.
    #[error("{0}")]
    Unavailable(Detail),

    /// A key was wrapped under the primary KEK version, which stopped being primary (a
    /// rotation began) before the key was stored: nothing was stored. Wrapping again under
    /// the new primary succeeds.
    #[error("key version {0} stopped being primary while a key was wrapped under it; retry")]
    KeyVersionChanged(crate::crypto::KekVersion),

    /// The audit entry could not be written, so the operation was not performed.
    #[error("audit log unavailable, operation not performed: {0}")]
    AuditUnavailable(String),

    /// Sealed data or a wrapped key failed to open. Never carries the bytes.
    #[error("stored secret could not be decrypted: {0}")]
    Crypto(#[from] CryptoError),

    /// The RPC is part of the contract but this build does not serve it yet.
    #[error("{0} is not implemented by this server")]
    Unimplemented(&'static str),

    /// A storage failure that is not a dependency outage (constraint, decode).
    #[error("storage error: {0}")]
    Storage(String),

    /// A broken invariant inside the vault.
    #[error("internal error: {0}")]
    Internal(Cow<'static, str>),
}

impl VaultError {
    /// Shorthand for an invalid-argument error naming its field
    /// (`FIELD_INVALID`).
    pub fn invalid(field: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
            reason: ErrorReason::FieldInvalid,
        }
    }

    /// An invalid-argument error for a required field left empty or unset
    /// (`FIELD_MISSING`).
    pub fn missing(field: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
            reason: ErrorReason::FieldMissing,
        }
    }

    /// An invalid-argument error for a field over its length limit, or a
    /// repeated field with more elements than its limit (`FIELD_TOO_LONG`).
    /// The message states the limit, never the value.
    pub fn too_long(field: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
            reason: ErrorReason::FieldTooLong,
        }
    }

    /// Shorthand for a not-found error.
    pub fn not_found(what: &'static str, id: impl std::fmt::Display) -> Self {
        Self::NotFound {
            what,
            id: id.to_string(),
        }
    }

    /// Shorthand for a failed precondition.
    pub fn precondition(message: impl Into<Cow<'static, str>>) -> Self {
        let message: Cow<'static, str> = message.into();
        Self::FailedPrecondition(Detail::from(message))
    }

    /// The same error, with `reason` as its [`ErrorReason`]:
    /// `VaultError::precondition(…).because(ErrorReason::ConnectionDeleted)`.
    ///
    /// The reason must belong to the variant (a `FIELD_*` reason to
    /// `InvalidArgument`, `CONNECTION_DELETED` to `FailedPrecondition`, …;
    /// see the README's table): one that does not is a bug, caught by a debug
    /// assertion and otherwise ignored, so the code and the reason sent
    /// never disagree. `NotFound`, `Crypto`, `AuditUnavailable` and the
    /// internal variants keep the reason that follows from their data.
    pub fn because(mut self, reason: ErrorReason) -> Self {
        let fits = reason.family() == self.family();
        debug_assert!(fits, "{reason} is not a reason for {self:?}");
        if fits {
            match &mut self {
                Self::InvalidArgument { reason: r, .. } => *r = reason,
                Self::FailedPrecondition(d)
                | Self::Unauthenticated(d)
                | Self::PermissionDenied(d)
                | Self::OutOfRange(d)
                | Self::ResourceExhausted(d)
                | Self::Unavailable(d) => d.reason = Some(reason),
                _ => {}
            }
        }
        self
    }

    /// Why it happened, as clients see it: the reason its site named (see
    /// [`VaultError::because`]), else the one that follows from the variant
    /// and its data.
    pub fn reason(&self) -> ErrorReason {
        use ErrorReason as R;
        match self {
            Self::InvalidArgument { reason, .. } if reason.family() == Family::InvalidArgument => {
                *reason
            }
            Self::InvalidArgument { .. } => R::FieldInvalid,
            // The kinds `not_found` is called with; a new kind reads as
            // RESOURCE_NOT_FOUND until it is named here.
            Self::NotFound { what, .. } => match *what {
                "connection" => R::ConnectionNotFound,
                "lease" => R::LeaseNotFound,
                "receipt" => R::ReceiptNotFound,
                "key version" => R::KeyVersionNotFound,
                _ => R::ResourceNotFound,
            },
            Self::FailedPrecondition(d) => d.reason.unwrap_or(R::PreconditionFailed),
            Self::Unauthenticated(d) => d.reason.unwrap_or(R::CredentialsInvalid),
            Self::PermissionDenied(d) => d.reason.unwrap_or(R::PolicyDenied),
            Self::OutOfRange(d) => d.reason.unwrap_or(R::CursorOutOfRange),
            Self::ResourceExhausted(d) => d.reason.unwrap_or(R::RateLimited),
            Self::Unavailable(d) => d.reason.unwrap_or(R::ServiceUnavailable),
            Self::KeyVersionChanged(_) => R::ServiceUnavailable,
            Self::AuditUnavailable(_) => R::AuditUnavailable,
            Self::Crypto(CryptoError::KeyDestroyed(_)) => R::KeyVersionDestroyed,
            Self::Crypto(_) => R::DecryptionFailed,
            Self::Unimplemented(_) => R::MethodNotImplemented,
            Self::Storage(_) | Self::Internal(_) => R::Internal,
        }
    }

    /// The family of its reasons (the variant, up to the code it is sent with).
    fn family(&self) -> Family {
        match self {
            Self::InvalidArgument { .. } => Family::InvalidArgument,
            Self::NotFound { .. } => Family::NotFound,
            Self::FailedPrecondition(_) => Family::FailedPrecondition,
            Self::Unauthenticated(_) => Family::Unauthenticated,
            Self::PermissionDenied(_) => Family::PermissionDenied,
            Self::OutOfRange(_) => Family::OutOfRange,
            Self::ResourceExhausted(_) => Family::ResourceExhausted,
            Self::Unavailable(_) | Self::KeyVersionChanged(_) | Self::AuditUnavailable(_) => {
                Family::Unavailable
            }
            Self::Crypto(_) => Family::DataLoss,
            Self::Unimplemented(_) => Family::Unimplemented,
            Self::Storage(_) | Self::Internal(_) => Family::Internal,
        }
    }
}

/// A caller-sent value as a message or an audit entry may quote it: the
/// value itself when it has at most [`MAX_QUOTED_CHARS`] characters, else its
/// first [`MAX_QUOTED_CHARS`] characters followed by "…" (cut on a character
/// boundary). Messages never quote more of one value than this.
pub fn excerpt(value: &str) -> Cow<'_, str> {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => Cow::Borrowed(value),
        Some((end, _)) => Cow::Owned(format!("{}…", &value[..end])),
    }
}

/// Scopes a caller sent, as a message or an audit entry may name them: the
/// first [`MAX_QUOTED_SCOPES`], each an [`excerpt`], separated by spaces, then
/// "(and N more)" counting the rest, which are never listed.
pub fn scope_list<'a>(scopes: impl IntoIterator<Item = &'a Scope>) -> String {
    let mut out = String::new();
    let mut more = 0usize;
    for (i, scope) in scopes.into_iter().enumerate() {
        if i >= MAX_QUOTED_SCOPES {
            more += 1;
            continue;
        }
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&excerpt(scope.as_str()));
    }
    if more > 0 {
        out.push_str(&format!(" (and {more} more)"));
    }
    out
}

impl From<sqlx::Error> for VaultError {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &err {
            E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) => {
                Self::Unavailable(format!("database unavailable: {err}").into())
                    .because(ErrorReason::DatabaseUnavailable)
            }
            E::Database(db) => {
                // Connection-level failures surface as database errors on Postgres
                // (57P01 admin shutdown, 57P03 cannot connect now, 08xxx).
                let code = db.code().unwrap_or_default();
                if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                    Self::Unavailable(format!("database unavailable: {}", db.message()).into())
                        .because(ErrorReason::DatabaseUnavailable)
                } else {
                    Self::Storage(db.message().to_owned())
                }
            }
            _ => Self::Storage(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_screaming_snake_case_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in ErrorReason::ALL {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            // google.rpc.ErrorInfo: at most 63 characters of [A-Z0-9_].
            assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert_eq!(ErrorReason::parse(name), Some(*reason));
            assert_eq!(reason.to_string(), name);
        }
        assert_eq!(ErrorReason::parse("connection_not_found"), None);
    }

    #[test]
    fn a_site_names_the_reason_and_a_variant_has_a_default() {
        let err = VaultError::precondition("connection c is deleted; it cannot be leased")
            .because(ErrorReason::ConnectionDeleted);
        assert_eq!(err.reason(), ErrorReason::ConnectionDeleted);
        assert_eq!(
            err.to_string(),
            "connection c is deleted; it cannot be leased",
            "the reason does not change the message"
        );
        assert_eq!(
            VaultError::precondition("rotation running").reason(),
            ErrorReason::PreconditionFailed
        );
        assert_eq!(
            VaultError::invalid("tenant_id", "x").reason(),
            ErrorReason::FieldInvalid
        );
        assert_eq!(
            VaultError::missing("outcome", "set code or error").reason(),
            ErrorReason::FieldMissing
        );
        assert_eq!(
            VaultError::too_long("scopes", "at most 64 scopes (got 65)").reason(),
            ErrorReason::FieldTooLong
        );
        assert_eq!(
            VaultError::not_found("lease", "lease_x").reason(),
            ErrorReason::LeaseNotFound
        );
        assert_eq!(
            VaultError::not_found("gadget", "g").reason(),
            ErrorReason::ResourceNotFound
        );
        assert_eq!(
            VaultError::Crypto(CryptoError::Decrypt).reason(),
            ErrorReason::DecryptionFailed
        );
        assert_eq!(
            VaultError::AuditUnavailable("disk full".into()).reason(),
            ErrorReason::AuditUnavailable
        );
    }

    #[test]
    fn each_connection_status_has_its_reason_for_being_unusable() {
        use ConnectionStatus as S;
        let cases = [
            (S::Deleted, ErrorReason::ConnectionDeleted),
            (S::Suspended, ErrorReason::ConnectionSuspended),
            (S::RevokedUpstream, ErrorReason::ReconnectRequired),
            (S::ConsentRequired, ErrorReason::ReconnectRequired),
            (S::InsufficientScope, ErrorReason::ScopeNotGranted),
            (S::Active, ErrorReason::ConnectionChanged),
        ];
        for (status, reason) in cases {
            assert_eq!(ErrorReason::unusable(status), reason, "{status}");
            // Each is a reason a failed precondition may carry.
            assert_eq!(
                VaultError::precondition("x").because(reason).reason(),
                reason
            );
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "is not a reason for")]
    fn a_reason_of_another_variant_is_a_bug() {
        let _ = VaultError::precondition("x").because(ErrorReason::RateLimited);
    }

    #[test]
    fn an_excerpt_keeps_short_values_and_cuts_long_ones_on_a_character_boundary() {
        let short = "a".repeat(MAX_QUOTED_CHARS);
        assert_eq!(excerpt(&short), short);
        let long = "é".repeat(MAX_QUOTED_CHARS + 1);
        let cut = excerpt(&long);
        assert_eq!(cut, format!("{}…", "é".repeat(MAX_QUOTED_CHARS)));
        assert_eq!(
            excerpt(&"x".repeat(100_000)).chars().count(),
            MAX_QUOTED_CHARS + 1
        );
    }

    #[test]
    fn a_scope_list_names_a_few_scopes_and_counts_the_rest() {
        let scopes: Vec<Scope> = (0..10)
            .map(|i| Scope::parse(&format!("scope-{i}")).unwrap())
            .collect();
        assert_eq!(scope_list(&scopes[..1]), "scope-0");
        assert_eq!(
            scope_list(&scopes[..MAX_QUOTED_SCOPES]),
            (0..MAX_QUOTED_SCOPES)
                .map(|i| format!("scope-{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let listed = scope_list(&scopes);
        assert!(
            listed.ends_with(&format!(" (and {} more)", 10 - MAX_QUOTED_SCOPES)),
            "{listed}"
        );
        assert!(!listed.contains("scope-9"), "{listed}");
        let long = Scope::parse(&"s".repeat(200)).unwrap();
        assert_eq!(
            scope_list([&long]),
            format!("{}…", "s".repeat(MAX_QUOTED_CHARS))
        );
    }
}
