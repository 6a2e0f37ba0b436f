//! The one place where a [`VaultError`] becomes a `tonic::Status`: it decides
//! the code and what the caller may read. Internal details are logged, never
//! sent; no variant carries secret bytes to begin with.

use tonic::{Code, Status};

use crate::domain::VaultError;

impl From<VaultError> for Status {
    fn from(err: VaultError) -> Self {
        let code = match &err {
            VaultError::InvalidArgument { .. } => Code::InvalidArgument,
            VaultError::NotFound { .. } => Code::NotFound,
            VaultError::FailedPrecondition(_) => Code::FailedPrecondition,
            VaultError::Unauthenticated(_) => Code::Unauthenticated,
            VaultError::PermissionDenied(_) => Code::PermissionDenied,
            VaultError::OutOfRange(_) => Code::OutOfRange,
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
        Status::new(code, message)
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
}
