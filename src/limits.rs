//! Every limit the vault puts on what a caller sends, in one place: the
//! parsers (`domain`, `grpc::convert`, `grpc::requests`, `http`), the fuzzing
//! entry points and the malformed-input tests all read these constants, so a
//! limit changes here and nowhere else. Error messages that state a limit are
//! formatted from the constant, so they change with it.
//!
//! The maxima are inclusive: a value of exactly the limit is accepted. Unless
//! its doc says otherwise, one more is refused with INVALID_ARGUMENT naming
//! the field and the limit, never quoting the value. Repeated fields are
//! counted before any element is parsed.
//!
//! The last section bounds what the vault sends back: error messages and the
//! caller input they (and audit entries) may quote.

/// The largest gRPC request message the server decodes, in bytes. Larger
/// requests are refused before any handler runs ("request too large").
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The longest caller-chosen identifier (tenant, account, event consumer), in
/// bytes.
pub const MAX_ID_BYTES: usize = 128;

/// The longest OAuth scope in a lease request, in bytes.
pub const MAX_SCOPE_BYTES: usize = 256;

/// The most scopes one lease request may list, counted as sent (before
/// duplicates are merged) and before any of them is parsed: a longer list
/// is refused whole, and none of it is parsed, stored or echoed. A lease asks
/// for scopes its purpose allows, and a purpose allows a handful (its
/// integration's Calendar or Gmail scopes), so no real worker comes near 64;
/// at [`MAX_SCOPE_BYTES`] each, 64 scopes are still a small request (16 KiB).
pub const MAX_SCOPES_PER_LEASE: usize = 64;

/// The longest purpose name in a lease request, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 64;

/// The most values a repeated enum filter may list (`Watch`'s `kinds` and
/// `integrations`), counted before any is parsed. Each enum has fewer than
/// 16 values, so a longer list can only repeat some.
pub const MAX_FILTER_VALUES: usize = 16;

/// The longest `google_subject` filter `AdminService.ListConnections`
/// accepts, in bytes: OpenID Connect limits a subject to 255 ASCII
/// characters, so a longer one matches nothing.
pub const MAX_GOOGLE_SUBJECT_BYTES: usize = 255;

/// The longest `actor`, `action` or `target` filter `QueryAudit` accepts, in
/// bytes: longer than any identity the policy can name (512 bytes) and any
/// action or target the vault writes.
pub const MAX_AUDIT_FILTER_BYTES: usize = 1024;

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

/// The longest `page_token` a list RPC accepts, in bytes. The vault's own
/// tokens are under 100 bytes; a longer one cannot be one of them.
pub const MAX_PAGE_TOKEN_BYTES: usize = 512;

/// The largest `POST /risc` body (a Security Event Token) read as a token,
/// in bytes; a larger one gets HTTP 400 ("token too large").
pub const MAX_RISC_BODY_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// What the vault sends back
// ---------------------------------------------------------------------------

/// The longest status message a gRPC caller gets, in bytes. Every message is
/// short by construction; `grpc::status` cuts a longer one (on a character
/// boundary, ending in "…") as a last line of defence, so that no input can
/// make an error too large for the caller's HTTP/2 headers
/// (RESOURCE_EXHAUSTED instead of the real error).
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// The most characters of one caller-sent value (a scope, a name) that a
/// message or an audit entry quotes; a longer value is cut, ending in "…".
pub const MAX_QUOTED_CHARS: usize = 64;

/// The most scopes a message or an audit entry names; the rest are counted
/// ("and 3 more"), never listed.
pub const MAX_QUOTED_SCOPES: usize = 4;

const _: () = assert!(
    MAX_QUOTED_SCOPES * (MAX_QUOTED_CHARS + 4) <= MAX_STATUS_MESSAGE_BYTES / 2,
    "a message naming the most scopes it may must fit a status message with room to spare"
);

const _: () = assert!(
    DEFAULT_PAGE_SIZE > 0 && DEFAULT_PAGE_SIZE <= MAX_PAGE_SIZE,
    "the default page must be a page the vault serves"
);
