//! Identifier newtypes. Tenant and account ids are chosen by the product
//! backend; connection, lease and receipt ids are minted by the vault.

use std::fmt;

use super::VaultError;
use crate::limits::MAX_ID_BYTES;

/// Checks a caller-chosen identifier: 1..=[`MAX_ID_BYTES`] bytes of `[A-Za-z0-9._:@-]`.
fn parse_external(field: &'static str, value: &str) -> Result<String, VaultError> {
    if value.is_empty() {
        return Err(VaultError::missing(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(VaultError::too_long(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
    {
        return Err(VaultError::invalid(
            field,
            "may contain only letters, digits and . _ : @ -",
        ));
    }
    Ok(value.to_owned())
}

/// Checks a vault-minted identifier: a prefix followed by a UUID.
fn parse_minted(field: &'static str, prefix: &str, value: &str) -> Result<String, VaultError> {
    let rest = value
        .strip_prefix(prefix)
        .ok_or_else(|| VaultError::invalid(field, format!("must look like {prefix}<uuid>")))?;
    uuid::Uuid::try_parse(rest)
        .map_err(|_| VaultError::invalid(field, format!("must look like {prefix}<uuid>")))?;
    Ok(value.to_owned())
}

macro_rules! external_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses a caller-supplied value; the error names the field.
            pub fn parse(value: &str) -> Result<Self, VaultError> {
                parse_external($field, value).map(Self)
            }

            /// The identifier as stored and sent.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Rebuilds an id read back from storage, where it was validated on the way in.
            #[allow(dead_code, reason = "not every id type is stored by every build stage")]
            pub(crate) fn from_stored(value: String) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

macro_rules! minted_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The prefix that names the kind of object in logs and the CLI.
            pub const PREFIX: &'static str = $prefix;

            /// Mints a new id: a UUIDv7 (time-ordered, 74 random bits), so
            /// new rows append to their indexes instead of touching a random
            /// page each.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7()))
            }

            /// Parses a caller-supplied value; the error names the field.
            pub fn parse(value: &str) -> Result<Self, VaultError> {
                parse_minted($field, $prefix, value).map(Self)
            }

            /// The 16 bytes of the id's UUID: how compact rows store it.
            /// Byte order is UUIDv7 time order, so keys of ids minted later
            /// sort after.
            #[allow(dead_code, reason = "not every id type is stored as a key")]
            pub fn key(&self) -> [u8; 16] {
                // Minted and parsed ids are the prefix and a UUID; an id read
                // back from storage was one of those.
                uuid::Uuid::try_parse(self.0.get($prefix.len()..).unwrap_or_default())
                    .map(|u| *u.as_bytes())
                    .unwrap_or_default()
            }

            /// Rebuilds an id from its [`Self::key`], read back from storage.
            #[allow(dead_code, reason = "not every id type is stored as a key")]
            pub fn from_key(key: &[u8]) -> Result<Self, VaultError> {
                let uuid = uuid::Uuid::from_slice(key).map_err(|_| {
                    VaultError::Storage(format!("a stored {} is not 16 bytes", $field))
                })?;
                Ok(Self(format!("{}{}", $prefix, uuid)))
            }

            /// A key that sorts above the key of every id minted before `at`
            /// and below those minted after (UUIDv7 bytes sort by time).
            #[allow(dead_code, reason = "not every id type is pruned by age")]
            pub fn key_minted_before(at: crate::domain::Timestamp) -> [u8; 16] {
                let millis = u64::try_from(at.as_micros() / 1_000).unwrap_or(0);
                *uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10])
                    .into_uuid()
                    .as_bytes()
            }

            /// The identifier as stored and sent.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Rebuilds an id read back from storage, where it was validated on the way in.
            #[allow(dead_code, reason = "not every id type is stored by every build stage")]
            pub(crate) fn from_stored(value: String) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

external_id!(
    /// A tenant of the CRM (one customer organisation).
    TenantId,
    "tenant_id"
);
external_id!(
    /// A user account within a tenant.
    AccountId,
    "account_id"
);
external_id!(
    /// A sync service that consumes the event stream (`calendar-sync`, `email-sync`).
    ConsumerName,
    "consumer"
);
minted_id!(
    /// One integration of one account, linked to one Google account.
    ConnectionId,
    "connection_id",
    "conn_"
);
minted_id!(
    /// One lease of an access token to a worker.
    LeaseId,
    "lease_id",
    "lease_"
);
minted_id!(
    /// A deletion receipt.
    ReceiptId,
    "receipt_id",
    "rcpt_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_ids_reject_empty_long_and_odd_characters() {
        assert!(TenantId::parse("acme-42").is_ok());
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse(&"a".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(AccountId::parse("bob smith").is_err());
        assert!(AccountId::parse("bob/../x").is_err());
        let err = AccountId::parse("").unwrap_err().to_string();
        assert!(err.contains("account_id"), "{err}");
    }

    #[test]
    fn minted_ids_round_trip_and_check_their_prefix() {
        let id = ConnectionId::generate();
        assert_eq!(ConnectionId::parse(id.as_str()).unwrap(), id);
        assert!(ConnectionId::parse("lease_8c4bd4f4-2a64-4f43-9c59-5a1fbc2a0c4c").is_err());
        assert!(ConnectionId::parse("conn_not-a-uuid").is_err());
    }

    #[test]
    fn keys_round_trip_and_sort_by_minting_time() {
        use crate::domain::Timestamp;
        let before = LeaseId::key_minted_before(Timestamp::now());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let id = LeaseId::generate();
        assert_eq!(LeaseId::from_key(&id.key()).unwrap(), id);
        assert!(before < id.key());
        assert!(
            id.key()
                < LeaseId::key_minted_before(
                    Timestamp::now().plus(std::time::Duration::from_millis(2))
                )
        );
        // Any spelling of the UUID names the same key.
        let upper =
            LeaseId::parse(&id.as_str().to_uppercase().replacen("LEASE_", "lease_", 1)).unwrap();
        assert_eq!(upper.key(), id.key());
        assert!(LeaseId::from_key(&[0; 15]).is_err());
    }
}
