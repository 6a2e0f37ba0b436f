//! The one transport-agnostic error type of the vault. Transports convert it
//! in exactly one place each (`grpc::status`, `http`), which decides what the
//! caller may see. No variant ever carries token, key or secret bytes.

use std::borrow::Cow;

use super::Scope;
use crate::crypto::CryptoError;
use crate::limits::{MAX_QUOTED_CHARS, MAX_QUOTED_SCOPES};

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
    FailedPrecondition(Cow<'static, str>),

    /// The caller presented no usable identity.
    #[error("{0}")]
    Unauthenticated(Cow<'static, str>),

    /// The caller's identity is not granted this operation by the policy.
    #[error("{0}")]
    PermissionDenied(Cow<'static, str>),

    /// A position outside what exists (an event cursor past the newest, or
    /// before what was pruned).
    #[error("{0}")]
    OutOfRange(Cow<'static, str>),

    /// The caller reached a limit on how often it may ask (authorizations
    /// begun per minute); the message says when retrying succeeds.
    #[error("{0}")]
    ResourceExhausted(Cow<'static, str>),

    /// A dependency (database, keyring, Google) cannot be reached right now;
    /// retrying later may succeed.
    #[error("{0}")]
    Unavailable(Cow<'static, str>),

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
    /// Shorthand for an invalid-argument error naming its field.
    pub fn invalid(field: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
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
        Self::FailedPrecondition(message.into())
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
            }
            E::Database(db) => {
                // Connection-level failures surface as database errors on Postgres
                // (57P01 admin shutdown, 57P03 cannot connect now, 08xxx).
                let code = db.code().unwrap_or_default();
                if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                    Self::Unavailable(format!("database unavailable: {}", db.message()).into())
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
