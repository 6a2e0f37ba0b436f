//! Enumerations and value types shared by every layer.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::VaultError;
use crate::limits::{MAX_PURPOSE_BYTES, MAX_SCOPE_BYTES};

/// A point in time with microsecond precision, stored as microseconds since the
/// Unix epoch in both database backends.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Converts from `SystemTime`, saturating outside the representable range.
    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// Rebuilds a timestamp from its stored form.
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// The stored form: microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Whole seconds and nanoseconds since the epoch (for protobuf `Timestamp`).
    pub fn seconds_nanos(self) -> (i64, i32) {
        let secs = self.0.div_euclid(1_000_000);
        // rem_euclid of 1e6 is < 1e6, so the nanos fit an i32.
        let nanos = (self.0.rem_euclid(1_000_000) * 1_000) as i32;
        (secs, nanos)
    }

    /// This timestamp plus a duration (saturating).
    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }

    /// This timestamp minus a duration (saturating).
    pub fn minus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }

    /// As `SystemTime`.
    pub fn to_system(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

/// The stored form (microseconds since the Unix epoch), as sqlx's `FromRow`
/// reads a timestamp column.
impl From<i64> for Timestamp {
    fn from(micros: i64) -> Self {
        Self::from_micros(micros)
    }
}

/// The last microsecond RFC 3339 formatting covers: 9999-12-31T23:59:59.999999Z.
const MAX_RFC3339_MICROS: i64 = 253_402_300_800 * 1_000_000 - 1;

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime panics before the epoch and fails after year 9999; callers
        // can send any protobuf timestamp (e.g. a QueryAudit `since`).
        if (0..=MAX_RFC3339_MICROS).contains(&self.0) {
            write!(f, "{}", humantime::format_rfc3339_micros(self.to_system()))
        } else {
            write!(f, "{} us since the Unix epoch", self.0)
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Declares a closed enum with a stable lowercase storage name.
macro_rules! stored_enum {
    ($(#[$doc:meta])* $name:ident, $field:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stable name used in storage, config and logs.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Parses the stable name (case-insensitive); the error names the field.
            pub fn parse(value: &str) -> Result<Self, VaultError> {
                $(if value.eq_ignore_ascii_case($text) {
                    return Ok($name::$variant);
                })+
                Err(VaultError::invalid(
                    $field,
                    format!(
                        "unknown value {:?}; expected one of: {}",
                        super::excerpt(value),
                        [$($text),+].join(", ")
                    ),
                ))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_enum!(
    /// The product features a user can connect.
    Integration, "integration" {
        /// Google Calendar sync.
        Calendar => "calendar",
        /// Gmail sync.
        Email => "email",
    }
);

stored_enum!(
    /// Where a connection stands.
    ConnectionStatus, "status" {
        /// Tokens held, leases granted.
        Active => "active",
        /// Google granted fewer scopes than the integration requires; leases only
        /// for scopes actually granted.
        InsufficientScope => "insufficient_scope",
        /// Temporarily frozen (e.g. RISC account-disabled for hijacking): no leases.
        Suspended => "suspended",
        /// The user revoked access at Google, or the grant expired; tokens are
        /// gone and the user must connect again.
        RevokedUpstream => "revoked_upstream",
        /// Google returned no refresh token (it showed no consent screen): the
        /// connection could not be kept fresh, so it grants no lease until the
        /// user connects again (the vault then asks Google for consent).
        ConsentRequired => "consent_required",
        /// Disconnected or deleted; only a tombstone remains.
        Deleted => "deleted",
    }
);

impl ConnectionStatus {
    /// Whether only a tombstone remains (no tokens, no Google data):
    /// DELETED or REVOKED_UPSTREAM.
    pub fn is_tombstone(self) -> bool {
        matches!(
            self,
            ConnectionStatus::Deleted | ConnectionStatus::RevokedUpstream
        )
    }
}

stored_enum!(
    /// Why a connection was deleted.
    DeletionReason, "reason" {
        /// The user disconnected the integration in the product.
        UserDisconnected => "user_disconnected",
        /// The account was deleted.
        AccountDeleted => "account_deleted",
        /// An admin revoked the integration.
        AdminRevoked => "admin_revoked",
        /// The user revoked access at Google (invalid_grant or a RISC event).
        UserRevokedAtGoogle => "user_revoked_at_google",
    }
);

stored_enum!(
    /// What an event in the event log says happened.
    EventKind, "kind" {
        /// A lease was ended by the vault; holders drop the token.
        LeaseRevoked => "lease_revoked",
        /// A connection was deleted; consumers purge what they synced.
        ConnectionDeleted => "connection_deleted",
        /// An account was deleted (one event per connection it had).
        AccountDeleted => "account_deleted",
        /// A connection was suspended; no leases until resumed.
        Suspended => "suspended",
        /// A suspended connection was resumed.
        Resumed => "resumed",
        /// A connection changed (e.g. reconnected with other scopes).
        ConnectionUpdated => "connection_updated",
    }
);

stored_enum!(
    /// Progress of a deleted connection's revocation at Google.
    UpstreamState, "upstream_state" {
        /// Another live connection uses the same Google account (or the user
        /// already revoked at Google): nothing to revoke.
        NotNeeded => "not_needed",
        /// Waiting for Google to confirm; the outbox retries.
        Pending => "pending",
        /// Google confirmed.
        Confirmed => "confirmed",
        /// Never confirmed within the retry limit; the retained token was destroyed anyway.
        Failed => "failed",
    }
);

stored_enum!(
    /// The lifecycle state of a key-encryption-key version.
    KeyState, "key_state" {
        /// Wraps every new DEK.
        Primary => "primary",
        /// Unwraps existing DEKs; no new wraps.
        Active => "active",
        /// Kept only for emergencies; no DEK references it.
        Retired => "retired",
        /// Key material removed from the keyring.
        Destroyed => "destroyed",
    }
);

/// An OAuth scope, e.g. `https://www.googleapis.com/auth/calendar.events`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    /// Parses one scope: printable ASCII without spaces or quotes (RFC 6749 §3.3).
    pub fn parse(value: &str) -> Result<Self, VaultError> {
        if value.is_empty() || value.len() > MAX_SCOPE_BYTES {
            return Err(VaultError::invalid(
                "scopes",
                format!("each scope must be 1..={MAX_SCOPE_BYTES} bytes"),
            ));
        }
        if !value
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(VaultError::invalid(
                "scopes",
                "a scope may contain only printable ASCII without spaces, quotes or backslashes",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The scope string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// An ordered, de-duplicated set of scopes; stored space-separated.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct ScopeSet(BTreeSet<Scope>);

impl ScopeSet {
    /// Parses a list of scope strings.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, VaultError> {
        values
            .into_iter()
            .map(Scope::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Parses the space-separated stored form (also OAuth's wire form).
    pub fn parse_spaced(value: &str) -> Result<Self, VaultError> {
        Self::parse(value.split_ascii_whitespace())
    }

    /// The space-separated form.
    pub fn to_spaced(&self) -> String {
        self.0
            .iter()
            .map(Scope::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether every scope of `other` is in this set.
    pub fn covers(&self, other: &ScopeSet) -> bool {
        other.0.is_subset(&self.0)
    }

    /// Whether the set contains this scope.
    pub fn contains(&self, scope: &Scope) -> bool {
        self.0.contains(scope)
    }

    /// The scopes of `other` missing from this set.
    pub fn missing_from<'a>(&'a self, other: &'a ScopeSet) -> impl Iterator<Item = &'a Scope> {
        other.0.difference(&self.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the scopes in order.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// The scope strings, in order.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.0.clone()).collect()
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// What a worker says it will do with a leased token (`calendar_sync`, `email_sync`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Purpose(String);

impl Purpose {
    /// Parses a purpose name: 1..=[`MAX_PURPOSE_BYTES`] of `[a-z0-9_.-]`.
    pub fn parse(value: &str) -> Result<Self, VaultError> {
        if value.is_empty() || value.len() > MAX_PURPOSE_BYTES {
            return Err(VaultError::invalid(
                "purpose",
                format!("must be 1..={MAX_PURPOSE_BYTES} bytes"),
            ));
        }
        if !value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        }) {
            return Err(VaultError::invalid(
                "purpose",
                "may contain only lowercase letters, digits and _ . -",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The purpose name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Purpose({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_and_reject_unknown_names() {
        for i in Integration::ALL {
            assert_eq!(Integration::parse(i.as_str()).unwrap(), *i);
        }
        assert_eq!(
            Integration::parse("CALENDAR").unwrap(),
            Integration::Calendar
        );
        let err = Integration::parse("drive").unwrap_err().to_string();
        assert!(
            err.contains("integration") && err.contains("calendar, email"),
            "{err}"
        );
    }

    #[test]
    fn scope_sets_cover_and_report_missing_scopes() {
        let granted = ScopeSet::parse_spaced("openid email https://x/calendar.events").unwrap();
        let want = ScopeSet::parse(["https://x/calendar.events"]).unwrap();
        assert!(granted.covers(&want));
        let more = ScopeSet::parse(["https://x/calendar.events", "https://x/gmail"]).unwrap();
        assert!(!granted.covers(&more));
        let missing: Vec<_> = granted.missing_from(&more).map(Scope::as_str).collect();
        assert_eq!(missing, ["https://x/gmail"]);
        assert!(Scope::parse("a b").is_err());
        assert!(Scope::parse("").is_err());
    }

    #[test]
    fn timestamps_convert_to_protobuf_parts_and_back() {
        let t = Timestamp::from_micros(1_700_000_000_123_456);
        assert_eq!(t.seconds_nanos(), (1_700_000_000, 123_456_000));
        assert_eq!(Timestamp::from_system(t.to_system()), t);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20.123456Z");
        let before = Timestamp::from_micros(-1);
        assert_eq!(before.seconds_nanos(), (-1, 999_999_000));
    }

    #[test]
    fn timestamps_outside_rfc3339_display_without_panicking() {
        assert_eq!(
            Timestamp::from_micros(-1).to_string(),
            "-1 us since the Unix epoch"
        );
        let far = Timestamp::from_micros(i64::MAX).to_string();
        assert!(far.ends_with("us since the Unix epoch"), "{far}");
        let last = Timestamp::from_micros(MAX_RFC3339_MICROS).to_string();
        assert_eq!(last, "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn purposes_are_lowercase_names() {
        assert!(Purpose::parse("calendar_sync").is_ok());
        assert!(Purpose::parse("Calendar Sync").is_err());
    }
}
