//! The one place where a [`VaultError`] becomes a `tonic::Status`: it decides
//! the code and what the caller may read. Internal details are logged, never
//! sent; no variant carries secret bytes to begin with.
//!
//! Every message sent is at most [`MAX_STATUS_MESSAGE_BYTES`] (1 KiB). The
//! messages are short by construction — limits are stated, not the values
//! that broke them, and caller input is quoted only as a short excerpt — so
//! the cut made here is a last line of defence: a message that somehow grew
//! (say, from a dependency's error text) still reaches the caller as the
//! real error, not as RESOURCE_EXHAUSTED from headers too large for HTTP/2.

use tonic::{Code, Status};

use crate::domain::VaultError;
use crate::limits::MAX_STATUS_MESSAGE_BYTES;

/// What ends a message that was cut.
const CUT: &str = "…";

/// `message`, cut to at most [`MAX_STATUS_MESSAGE_BYTES`] bytes on a
/// character boundary and then ending in "…", when it is longer.
fn bounded(mut message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES - CUT.len();
    // A character is at most 4 bytes: this stops within 3 steps.
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(CUT);
    message
}

impl From<VaultError> for Status {
    fn from(err: VaultError) -> Self {
        let code = match &err {
            VaultError::InvalidArgument { .. } => Code::InvalidArgument,
            VaultError::NotFound { .. } => Code::NotFound,
            VaultError::FailedPrecondition(_) => Code::FailedPrecondition,
            VaultError::Unauthenticated(_) => Code::Unauthenticated,
            VaultError::PermissionDenied(_) => Code::PermissionDenied,
            VaultError::OutOfRange(_) => Code::OutOfRange,
            VaultError::ResourceExhausted(_) => Code::ResourceExhausted,
            VaultError::Unavailable(_)
            | VaultError::AuditUnavailable(_)
            | VaultError::KeyVersionChanged(_) => Code::Unavailable,
            VaultError::Crypto(_) => Code::DataLoss,
            VaultError::Unimplemented(_) => Code::Unimplemented,
            VaultError::Storage(_) | VaultError::Internal(_) => Code::Internal,
        };
        let message = match &err {
            // Storage and internal errors may name tables or SQL: log them, send a generic line.
            VaultError::Storage(_) | VaultError::Internal(_) => {
                tracing::error!(error = %err, "internal error");
                "internal error; see the vault's logs".to_owned()
            }
            VaultError::AuditUnavailable(_) => {
                "audit log unavailable; the operation was not performed".to_owned()
            }
            VaultError::Unavailable(_) => {
                tracing::warn!(error = %err, "dependency unavailable");
                err.to_string()
            }
            _ => err.to_string(),
        };
        Status::new(code, bounded(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::CryptoError;

    #[test]
    fn codes_follow_the_contract() {
        let cases = [
            (
                VaultError::invalid("tenant_id", "must not be empty"),
                Code::InvalidArgument,
            ),
            (
                VaultError::not_found("connection", "conn_x"),
                Code::NotFound,
            ),
            (
                VaultError::precondition("rotation running"),
                Code::FailedPrecondition,
            ),
            (
                VaultError::ResourceExhausted("too many authorizations".into()),
                Code::ResourceExhausted,
            ),
            (VaultError::Unavailable("db down".into()), Code::Unavailable),
            (
                VaultError::AuditUnavailable("disk full".into()),
                Code::Unavailable,
            ),
            (VaultError::Crypto(CryptoError::Decrypt), Code::DataLoss),
            (
                VaultError::Unimplemented("LeaseService.LeaseToken"),
                Code::Unimplemented,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn internal_details_stay_in_the_logs() {
        let status = Status::from(VaultError::Storage(
            "UNIQUE constraint failed: connection_secrets.connection_id".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("connection_secrets"));
        let status = Status::from(VaultError::invalid("tenant_id", "must not be empty"));
        assert_eq!(status.message(), "invalid tenant_id: must not be empty");
    }

    #[test]
    fn messages_longer_than_1_kib_are_cut_on_a_character_boundary() {
        // Two-byte characters, so the limit falls inside one.
        let long = VaultError::precondition("é".repeat(MAX_STATUS_MESSAGE_BYTES));
        let status = Status::from(long);
        let message = status.message();
        assert!(
            message.len() <= MAX_STATUS_MESSAGE_BYTES,
            "{}",
            message.len()
        );
        assert!(
            message.len() > MAX_STATUS_MESSAGE_BYTES - 8,
            "{}",
            message.len()
        );
        assert!(message.ends_with("é…"), "{message}");
        assert!(message.trim_end_matches('…').chars().all(|c| c == 'é'));

        let long = VaultError::PermissionDenied("x".repeat(10 * MAX_STATUS_MESSAGE_BYTES).into());
        let status = Status::from(long);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message().len(), MAX_STATUS_MESSAGE_BYTES);
        assert!(status.message().ends_with("x…"));

        let exact = "y".repeat(MAX_STATUS_MESSAGE_BYTES);
        let status = Status::from(VaultError::precondition(exact.clone()));
        assert_eq!(
            status.message(),
            exact,
            "a message of exactly the limit is sent whole"
        );
    }
}
