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
//!
//! Every non-OK status carries rich error details
//! (`grpc-status-details-bin`, a `google.rpc.Status`):
//!
//! - always a `google.rpc.ErrorInfo` whose `reason` is one of the closed set
//!   [`ErrorReason`] (the README's "Error reasons" table; a test below keeps
//!   the two equal) and whose `domain` is [`ERROR_DOMAIN`] (`tokenvault`);
//!   its metadata holds at most the name of the request field at fault,
//!   never a value the caller sent, an identifier or anything secret;
//! - for an INVALID_ARGUMENT about a field, a `google.rpc.BadRequest` with one
//!   field violation: the field and what is wrong with it, the same text the
//!   message gives, cut to [`MAX_VIOLATION_BYTES`].
//!
//! The details travel in a header too, and repeat the message: with the cuts
//! above they stay under 2 KiB before base64, so a status still fits any
//! client's header limits.
//!
//! Statuses the vault does not make — tonic refusing a request before a
//! handler runs, the router answering an unknown method — get their
//! ErrorInfo from [`add_error_info`], which the routes' response layer
//! (`grpc::refused_requests`) applies to every answer that has none.

use std::collections::HashMap;

use axum::http::HeaderMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::domain::{ERROR_DOMAIN, ErrorReason, VaultError};
use crate::limits::MAX_STATUS_MESSAGE_BYTES;

/// What ends a message that was cut.
const CUT: &str = "…";

/// The longest description a `BadRequest` field violation carries, in bytes:
/// the details repeat the message, and a header is not the place for more.
const MAX_VIOLATION_BYTES: usize = 256;

/// The header that carries the details (as tonic names it).
const DETAILS_HEADER: &str = "grpc-status-details-bin";

/// `message`, cut to at most `max` bytes on a character boundary and then
/// ending in "…", when it is longer.
fn cut(mut message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut end = max - CUT.len();
    // A character is at most 4 bytes: this stops within 3 steps.
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(CUT);
    message
}

/// `message`, cut to at most [`MAX_STATUS_MESSAGE_BYTES`] bytes.
fn bounded(message: String) -> String {
    cut(message, MAX_STATUS_MESSAGE_BYTES)
}

/// The details of a status: `reason`'s ErrorInfo and, for a request field
/// `(name, what is wrong)`, a BadRequest violation naming it.
fn details(reason: ErrorReason, field: Option<(&'static str, String)>) -> ErrorDetails {
    let mut metadata = HashMap::new();
    if let Some((name, _)) = &field {
        metadata.insert("field".to_owned(), (*name).to_owned());
    }
    let mut details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata);
    if let Some((name, description)) = field {
        details.add_bad_request_violation(name, cut(description, MAX_VIOLATION_BYTES));
    }
    details
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
        let reason = err.reason();
        let field = match &err {
            VaultError::InvalidArgument { field, message, .. } => {
                Some((*field, message.to_string()))
            }
            _ => None,
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
        Status::with_error_details(code, bounded(message), details(reason, field))
    }
}

/// Gives an error answer that carries no details — a refusal tonic or the
/// router made before any handler ran, whose status is in `headers`
/// (a trailers-only response) — its ErrorInfo. An answer that already has
/// details (every status made from a `VaultError`) or no error status is
/// left as it is.
///
/// The reason is read from the code and the message, as
/// `grpc::refused_requests` leaves them: INVALID_ARGUMENT "request too
/// large…" (its rewrite of tonic's OUT_OF_RANGE) is `REQUEST_TOO_LARGE`,
/// INVALID_ARGUMENT "failed to decode Protobuf message…" (its rewrite of
/// tonic's INTERNAL) is `REQUEST_MALFORMED`, UNIMPLEMENTED with no message
/// (the router's answer to a method it does not serve) is
/// `METHOD_NOT_IMPLEMENTED`, anything else `REQUEST_REFUSED`.
pub(super) fn add_error_info(headers: &mut HeaderMap) {
    if headers.contains_key(DETAILS_HEADER) {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() == Code::Ok {
        return;
    }
    let reason = match status.code() {
        Code::InvalidArgument if status.message().starts_with("request too large") => {
            ErrorReason::RequestTooLarge
        }
        Code::InvalidArgument
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            ErrorReason::RequestMalformed
        }
        Code::Unimplemented if status.message().is_empty() => ErrorReason::MethodNotImplemented,
        _ => ErrorReason::RequestRefused,
    };
    let rich = Status::with_error_details(
        status.code(),
        bounded(status.message().to_owned()),
        details(reason, None),
    );
    // Rewrites grpc-status and grpc-message as they were (the message cut as
    // every message is) and adds the details.
    if let Err(e) = rich.add_header(headers) {
        tracing::warn!(error = %e, "cannot add error details to a refusal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::exit::code_name;
    use crate::crypto::{CryptoError, KekVersion};

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
        assert!(
            !String::from_utf8_lossy(status.details()).contains("connection_secrets"),
            "nor in the details"
        );
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

    /// One error of every variant (and of the variants' distinct reasons).
    fn every_variant() -> Vec<VaultError> {
        vec![
            VaultError::invalid("tenant_id", "must not be empty"),
            VaultError::missing("outcome", "set code or error"),
            VaultError::too_long("scopes", "at most 64 scopes (got 65)"),
            VaultError::not_found("connection", "conn_x"),
            VaultError::not_found("lease", "lease_x"),
            VaultError::precondition("rotation running"),
            VaultError::precondition("connection c is deleted")
                .because(ErrorReason::ConnectionDeleted),
            VaultError::Unauthenticated("unknown API key".into()),
            VaultError::PermissionDenied("role app may not call X".into()),
            VaultError::OutOfRange("cursor 9 is past the newest event (3)".into()),
            VaultError::ResourceExhausted("too many authorizations".into()),
            VaultError::Unavailable("db down".into()),
            VaultError::KeyVersionChanged(KekVersion::FIRST),
            VaultError::AuditUnavailable("disk full".into()),
            VaultError::Crypto(CryptoError::Decrypt),
            VaultError::Crypto(CryptoError::KeyDestroyed(KekVersion::FIRST)),
            VaultError::Unimplemented("LeaseService.LeaseToken"),
            VaultError::Storage("disk I/O error".into()),
            VaultError::Internal("broken invariant".into()),
        ]
    }

    #[test]
    fn every_error_carries_error_info_with_a_documented_reason() {
        for err in every_variant() {
            let (reason, shown) = (err.reason(), format!("{err:?}"));
            let status = Status::from(err);
            let info = status
                .get_details_error_info()
                .unwrap_or_else(|| panic!("{shown}: no ErrorInfo"));
            assert_eq!(info.domain, "tokenvault", "{shown}");
            assert_eq!(info.reason, reason.as_str(), "{shown}");
            assert!(ErrorReason::parse(&info.reason).is_some(), "{shown}");
            let bad_request = status.get_details_bad_request();
            if status.code() == Code::InvalidArgument {
                let bad_request = bad_request.unwrap_or_else(|| panic!("{shown}: no BadRequest"));
                assert_eq!(bad_request.field_violations.len(), 1, "{shown}");
                let violation = &bad_request.field_violations[0];
                assert!(
                    status
                        .message()
                        .starts_with(&format!("invalid {}: ", violation.field)),
                    "{shown}"
                );
                assert!(
                    status.message().ends_with(&violation.description),
                    "{shown}"
                );
                assert_eq!(
                    info.metadata.get("field"),
                    Some(&violation.field),
                    "{shown}"
                );
            } else {
                assert!(bad_request.is_none(), "{shown}");
                assert!(info.metadata.is_empty(), "{shown}: {:?}", info.metadata);
            }
        }
    }

    #[test]
    fn an_invalid_field_names_it_in_a_bad_request_violation() {
        let status = Status::from(VaultError::too_long(
            "scopes",
            "at most 64 scopes (got 10000)",
        ));
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "FIELD_TOO_LONG");
        let violations = status
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "scopes");
        assert_eq!(violations[0].description, "at most 64 scopes (got 10000)");
    }

    #[test]
    fn details_stay_small_whatever_the_message() {
        let long = "é".repeat(4 * MAX_STATUS_MESSAGE_BYTES);
        for err in [
            VaultError::invalid("reason", long.clone()),
            VaultError::precondition(long),
        ] {
            let status = Status::from(err);
            let violations = status
                .get_details_bad_request()
                .map(|b| b.field_violations)
                .unwrap_or_default();
            for v in &violations {
                assert!(
                    v.description.len() <= MAX_VIOLATION_BYTES,
                    "{}",
                    v.description.len()
                );
            }
            assert!(
                status.details().len() <= 2 * 1024,
                "{} bytes of details",
                status.details().len()
            );
        }
    }

    /// A status as a trailers-only answer carries it: in `headers`, after
    /// the routes' response layer has run [`add_error_info`].
    fn through_the_layer(status: Status) -> Status {
        let mut headers = HeaderMap::new();
        status
            .add_header(&mut headers)
            .expect("a short status fits in headers");
        add_error_info(&mut headers);
        Status::from_header_map(&headers).expect("a grpc-status header")
    }

    #[test]
    fn refusals_made_before_a_handler_get_error_info() {
        let cases = [
            (
                Status::invalid_argument("request too large: at most 262144 bytes"),
                "REQUEST_TOO_LARGE",
            ),
            (
                Status::invalid_argument("failed to decode Protobuf message: invalid wire type"),
                "REQUEST_MALFORMED",
            ),
            (Status::unimplemented(""), "METHOD_NOT_IMPLEMENTED"),
            (
                Status::not_found("service not registered"),
                "REQUEST_REFUSED",
            ),
        ];
        for (status, reason) in cases {
            let (code, message) = (status.code(), status.message().to_owned());
            let answered = through_the_layer(status);
            assert_eq!(answered.code(), code, "the code is kept");
            assert_eq!(answered.message(), message, "the message is kept");
            let info = answered.get_details_error_info().expect("ErrorInfo");
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, "tokenvault")
            );
        }
        // The vault's own statuses keep their details.
        let answered = through_the_layer(Status::from(VaultError::not_found("lease", "lease_x")));
        let info = answered.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "LEASE_NOT_FOUND");
        // An OK answer gets none.
        let mut headers = HeaderMap::new();
        add_error_info(&mut headers);
        assert!(headers.is_empty());
    }

    /// A status of each reason, as the vault or its transport sends it.
    fn sample(reason: ErrorReason) -> Status {
        use ErrorReason as R;
        let failed = |r: ErrorReason| Status::from(VaultError::precondition("x").because(r));
        let denied =
            |r: ErrorReason| Status::from(VaultError::PermissionDenied("x".into()).because(r));
        let unavailable =
            |r: ErrorReason| Status::from(VaultError::Unavailable("x".into()).because(r));
        let not_found = |what: &'static str| Status::from(VaultError::not_found(what, "x"));
        match reason {
            R::FieldMissing => VaultError::missing("outcome", "set code or error").into(),
            R::FieldInvalid => VaultError::invalid("tenant_id", "must not be empty").into(),
            R::FieldTooLong => VaultError::too_long("reason", "at most 1024 bytes").into(),
            R::RequestTooLarge => through_the_layer(Status::invalid_argument(
                "request too large: at most 262144 bytes",
            )),
            R::RequestMalformed => through_the_layer(Status::invalid_argument(
                "failed to decode Protobuf message: buffer underflow",
            )),
            R::RequestRefused => through_the_layer(Status::not_found("service not registered")),
            R::ConnectionNotFound => not_found("connection"),
            R::LeaseNotFound => not_found("lease"),
            R::ReceiptNotFound => not_found("receipt"),
            R::KeyVersionNotFound => not_found("key version"),
            R::ResourceNotFound => not_found("gadget"),
            R::ConnectionDeleted
            | R::ConnectionSuspended
            | R::ReconnectRequired
            | R::ScopeNotGranted
            | R::ConnectionChanged
            | R::AuthorizationFailed
            | R::GoogleNotConfigured
            | R::PreconditionFailed => failed(reason),
            R::CredentialsMissing | R::CredentialsInvalid => {
                VaultError::Unauthenticated("x".into())
                    .because(reason)
                    .into()
            }
            R::RoleNotAllowed
            | R::PurposeNotAllowed
            | R::ConsumerNotAllowed
            | R::LeaseNotOwned
            | R::PolicyDenied => denied(reason),
            R::CursorOutOfRange | R::EventsPruned => {
                VaultError::OutOfRange("x".into()).because(reason).into()
            }
            R::RateLimited => VaultError::ResourceExhausted("x".into())
                .because(reason)
                .into(),
            R::DatabaseUnavailable
            | R::GoogleUnavailable
            | R::ShuttingDown
            | R::ServiceUnavailable => unavailable(reason),
            R::AuditUnavailable => VaultError::AuditUnavailable("disk full".into()).into(),
            R::KeyVersionDestroyed => {
                VaultError::Crypto(CryptoError::KeyDestroyed(KekVersion::FIRST)).into()
            }
            R::DecryptionFailed => VaultError::Crypto(CryptoError::Decrypt).into(),
            R::MethodNotImplemented => VaultError::Unimplemented("LeaseService.LeaseToken").into(),
            R::Internal => VaultError::Internal("x".into()).into(),
        }
    }

    #[test]
    fn every_reason_is_sent_with_its_code() {
        for reason in ErrorReason::ALL {
            let status = sample(*reason);
            let info = status
                .get_details_error_info()
                .unwrap_or_else(|| panic!("{reason}: no ErrorInfo"));
            assert_eq!(info.reason, reason.as_str());
            assert_eq!(info.domain, "tokenvault");
        }
    }

    /// The README's "Error reasons" table: (reason, code) per row.
    fn documented_reasons() -> Vec<(String, String)> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## ")
            .find(|s| s.starts_with("Error reasons"))
            .expect("README.md has a section \"## Error reasons\"");
        section
            .lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| {
                l.split('|')
                    .map(|cell| cell.trim().trim_matches('`').to_owned())
                    .collect::<Vec<_>>()
            })
            // Cells: "", reason, code, meaning, what to do, "".
            .filter(|cells| cells.len() >= 4)
            .filter(|cells| cells[1] != "reason" && !cells[1].starts_with("---"))
            .map(|cells| (cells[1].clone(), cells[2].clone()))
            .collect()
    }

    #[test]
    fn the_readme_documents_exactly_the_reasons_with_their_codes() {
        let documented = documented_reasons();
        let names: Vec<&str> = documented.iter().map(|(r, _)| r.as_str()).collect();
        let expected: Vec<&str> = ErrorReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names, expected,
            "the README's \"Error reasons\" table lists every reason once, in the order declared"
        );
        for (name, code) in &documented {
            let reason = ErrorReason::parse(name).expect("a reason");
            if code == "any" {
                assert_eq!(
                    reason,
                    ErrorReason::RequestRefused,
                    "only {name} is sent with any code"
                );
                continue;
            }
            assert_eq!(
                code_name(sample(reason).code()),
                code,
                "the README's code for {name}"
            );
        }
    }
}
