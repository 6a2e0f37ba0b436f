//! Every limit the vault puts on what a caller sends, in one place: the
//! parsers (`domain`, `grpc::convert`, `grpc::requests`, `http`), the fuzzing
//! entry points and the malformed-input tests all read these constants, so a
//! limit changes here and nowhere else. Error messages that state a limit are
//! formatted from the constant, so they change with it.
//!
//! The maxima are inclusive: a value of exactly the limit is accepted. Unless
//! its doc says otherwise, one more is refused with INVALID_ARGUMENT naming
//! the field.

/// The largest gRPC request message the server decodes, in bytes. Larger
/// requests are refused before any handler runs ("request too large").
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The longest caller-chosen identifier (tenant, account, event consumer), in
/// bytes.
pub const MAX_ID_BYTES: usize = 128;

/// The longest OAuth scope in a lease request, in bytes.
pub const MAX_SCOPE_BYTES: usize = 256;

/// The longest purpose name in a lease request, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 64;

/// The longest `login_hint` `BeginAuthorization` accepts (an email address
/// or a Google subject), in bytes.
pub const MAX_LOGIN_HINT_BYTES: usize = 320;

/// The longest authorization code `CompleteAuthorization` accepts, in bytes.
pub const MAX_CODE_BYTES: usize = 2048;

/// The longest OAuth `state` the vault looks up, in bytes; a longer (or empty)
/// one is refused as unknown, and the refusal is audited.
/// The check is made by `Vault::authorization_complete`, for the gRPC call
/// and the HTTP callback alike.
pub const MAX_STATE_BYTES: usize = 512;

/// The longest free-text deletion reason (`Disconnect`, `DeleteAccount`,
/// `RevokeConnection`), in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// The largest `min_valid_seconds` a lease may ask for: Google's access
/// tokens live one hour, so a token cannot be promised valid for much longer.
pub const MAX_MIN_VALID_SECONDS: u32 = 3000;

/// The page size of a list RPC whose `page_size` is 0.
pub const DEFAULT_PAGE_SIZE: i32 = 100;

/// The largest page a list RPC returns; a larger `page_size` is clamped to it,
/// not refused.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// The largest `POST /risc` body (a Security Event Token) read as a token,
/// in bytes; a larger one gets HTTP 400 ("token too large").
pub const MAX_RISC_BODY_BYTES: usize = 64 * 1024;

const _: () = assert!(
    DEFAULT_PAGE_SIZE > 0 && DEFAULT_PAGE_SIZE <= MAX_PAGE_SIZE,
    "the default page must be a page the vault serves"
);
