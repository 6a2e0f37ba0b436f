//! Keyring providers: where key-encryption keys (KEKs) and the MAC root key live.
//!
//! A provider holds versioned KEK material and performs the operations that need it
//! (wrapping and unwrapping DEKs, computing MACs) itself, so raw KEKs never leave it:
//! [`LocalKeyring`] (a 0600 file, one node), [`EnvKeyring`] (environment variables) and
//! [`Pkcs11Keyring`] (an HSM: the KEKs are non-extractable objects and wrapping happens inside
//! the device). Which version is primary, active, retired or destroyed is recorded in the
//! database, not here: a provider only knows which versions it has material for.

mod env;
mod local;
mod material;
mod pkcs11;

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use async_trait::async_trait;

use super::{CryptoError, Key256};

pub use env::{EnvKeyring, GeneratedEnvValues};
pub use local::LocalKeyring;
pub use pkcs11::{Pkcs11Keyring, Pkcs11Settings};

/// The version number of a key-encryption key: 1, 2, 3, … never 0, never reused.
///
/// Displays as `v3`; parses from `v3` or `3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KekVersion(u32);

impl KekVersion {
    /// The version `keys init` creates.
    pub const FIRST: Self = Self(1);

    /// The version numbered `n`, or `None` for 0.
    pub const fn new(n: u32) -> Option<Self> {
        if n == 0 { None } else { Some(Self(n)) }
    }

    /// The version number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The version after this one, or `None` if the number space is exhausted.
    pub const fn next(self) -> Option<Self> {
        match self.0.checked_add(1) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }
}

impl fmt::Display for KekVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Returned when text is not a key version such as `v3` or `3`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a key version: expected a positive number such as `v3` or `3`")]
pub struct ParseKekVersionError;

impl FromStr for KekVersion {
    type Err = ParseKekVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix('v')
            .or_else(|| s.strip_prefix('V'))
            .unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseKekVersionError);
        }
        digits
            .parse::<u32>()
            .ok()
            .and_then(Self::new)
            .ok_or(ParseKekVersionError)
    }
}

impl TryFrom<i64> for KekVersion {
    type Error = ParseKekVersionError;

    /// For database columns: accepts 1 ..= `u32::MAX`.
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        u32::try_from(n)
            .ok()
            .and_then(Self::new)
            .ok_or(ParseKekVersionError)
    }
}

impl From<KekVersion> for i64 {
    fn from(v: KekVersion) -> Self {
        i64::from(v.0)
    }
}

/// What a provider says about one KEK version whose material it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KekMaterialInfo {
    /// The version number.
    pub version: KekVersion,
    /// When the material was created (whole seconds).
    pub created_at: SystemTime,
}

/// What a MAC is for. Each purpose gets its own HMAC-SHA256 subkey derived from the
/// keyring's MAC root key (with HKDF by the software providers, by an HMAC inside the device
/// for PKCS#11), so a MAC made for one purpose is useless for another.
///
/// The derivation labels are part of the stored format (MACs are persisted as fingerprints,
/// audit chains and lookup hashes): never change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacPurpose {
    /// Names a token in logs and audit records without revealing it.
    TokenFingerprint,
    /// Chains audit-log records together.
    AuditChain,
    /// Hashes OAuth `state` values so the database never holds them in the clear.
    StateHash,
    /// Hashes API keys for lookup and comparison.
    ApiKey,
    /// Derives the Ed25519 seed that signs audit checkpoints.
    AuditCheckpoint,
    /// Makes the MAC root key's key-check value, stored in the database and compared at
    /// every start so that a keyring with another MAC root is refused.
    KeyCheck,
}

impl MacPurpose {
    /// Every purpose, in a fixed order.
    pub const ALL: [Self; 6] = [
        Self::TokenFingerprint,
        Self::AuditChain,
        Self::StateHash,
        Self::ApiKey,
        Self::AuditCheckpoint,
        Self::KeyCheck,
    ];

    /// The HKDF `info` label that derives this purpose's subkey.
    pub const fn label(self) -> &'static str {
        match self {
            Self::TokenFingerprint => "tokenvault/mac/v1/token-fingerprint",
            Self::AuditChain => "tokenvault/mac/v1/audit-chain",
            Self::StateHash => "tokenvault/mac/v1/state-hash",
            Self::ApiKey => "tokenvault/mac/v1/api-key",
            Self::AuditCheckpoint => "tokenvault/mac/v1/audit-checkpoint-seed",
            Self::KeyCheck => "tokenvault/mac/v1/key-check",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::TokenFingerprint => 0,
            Self::AuditChain => 1,
            Self::StateHash => 2,
            Self::ApiKey => 3,
            Self::AuditCheckpoint => 4,
            Self::KeyCheck => 5,
        }
    }
}

/// Who creates and destroys a provider's key versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Custody {
    /// The vault creates new versions inside the provider and destroys them there (the
    /// local file, an HSM).
    Managed,
    /// The operator supplies the versions (environment variables): the vault can neither
    /// create nor erase them. A destruction is recorded once no live replica holds the
    /// version any more, which the operator brings about by removing it and restarting.
    External,
}

/// Holds KEK material and performs every operation that needs it.
///
/// Implementations must keep raw key material inside: nothing in this trait returns a KEK or
/// the MAC root key. Errors and `Debug` output must not carry key bytes.
///
/// A provider only knows which versions it holds. Which of them is primary, retired or
/// destroyed is the database's key registry, shared by every replica; when a replica meets a
/// version it does not hold it calls [`KeyringProvider::reload`] before giving up.
#[async_trait]
pub trait KeyringProvider: Send + Sync + fmt::Debug {
    /// A short name for the provider (`"local"`, `"env"`, `"pkcs11"`), for status output and
    /// audit.
    fn kind(&self) -> &'static str;

    /// Whether the vault or the operator creates and destroys versions.
    fn custody(&self) -> Custody;

    /// The versions whose material this provider currently holds, in ascending order, as of
    /// the last load or [`KeyringProvider::reload`]. Never blocks on a device.
    async fn versions(&self) -> Result<Vec<KekMaterialInfo>, CryptoError>;

    /// Reads the provider's source again (the keyring file, the HSM's objects by label), so
    /// versions created or destroyed by another process are seen. A provider whose source
    /// cannot change while the process runs (environment variables) does nothing.
    async fn reload(&self) -> Result<(), CryptoError>;

    /// Encrypts `dek` under KEK `version` with AES-256-GCM, a random 96-bit nonce and the
    /// associated data `aad`. Returns `nonce (12) || ciphertext (32) || tag (16)`.
    ///
    /// Fails with [`CryptoError::UnknownKeyVersion`] if the version's material is absent.
    async fn wrap(
        &self,
        version: KekVersion,
        dek: &Key256,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError>;

    /// Reverses [`KeyringProvider::wrap`]. Fails with [`CryptoError::Decrypt`] if `wrapped`
    /// was not produced by this version under this `aad` or was changed, and with
    /// [`CryptoError::UnknownKeyVersion`] if the version's material is absent.
    async fn unwrap(
        &self,
        version: KekVersion,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Key256, CryptoError>;

    /// Creates a new random KEK, stores it durably, and returns its description. Its number
    /// is `at_least`, or one above the highest version the provider knows of if that is
    /// higher (the local file remembers destroyed versions too; an HSM only what it holds).
    /// The caller passes one above every version the database's registry has seen, which is
    /// what keeps numbers from ever being reused.
    ///
    /// Fails with [`CryptoError::Unsupported`] for [`Custody::External`] providers.
    async fn create_version(&self, at_least: KekVersion) -> Result<KekMaterialInfo, CryptoError>;

    /// Removes the material of `version` durably, so nothing encrypted under it can ever be
    /// decrypted again. The caller (the database) must have checked that no DEK references
    /// the version.
    ///
    /// Fails with [`CryptoError::Unsupported`] for [`Custody::External`] providers.
    async fn destroy_version(&self, version: KekVersion) -> Result<(), CryptoError>;

    /// HMAC-SHA256 of `data` under the subkey for `purpose`. In memory: never a device call.
    fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32];

    /// Whether `tag` is the MAC of `data` for `purpose`, compared in constant time.
    fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_version_displays_and_parses() {
        let v = KekVersion::new(3).unwrap();
        assert_eq!(v.to_string(), "v3");
        assert_eq!("v3".parse::<KekVersion>().unwrap(), v);
        assert_eq!("V3".parse::<KekVersion>().unwrap(), v);
        assert_eq!("3".parse::<KekVersion>().unwrap(), v);
        assert_eq!(v.to_string().parse::<KekVersion>().unwrap(), v);
        for bad in [
            "",
            "v",
            "0",
            "v0",
            "-1",
            "+3",
            "3a",
            "v 3",
            "99999999999",
            "vv3",
        ] {
            assert!(bad.parse::<KekVersion>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn kek_version_converts_from_database_integers() {
        assert_eq!(KekVersion::try_from(7i64).unwrap().get(), 7);
        assert!(KekVersion::try_from(0i64).is_err());
        assert!(KekVersion::try_from(-2i64).is_err());
        assert!(KekVersion::try_from(i64::from(u32::MAX) + 1).is_err());
        assert_eq!(i64::from(KekVersion::new(9).unwrap()), 9);
        assert_eq!(KekVersion::new(u32::MAX).unwrap().next(), None);
    }

    #[test]
    fn mac_purpose_labels_are_distinct() {
        let mut labels: Vec<_> = MacPurpose::ALL.iter().map(|p| p.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), MacPurpose::ALL.len());
        for (i, p) in MacPurpose::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
        }
    }
}
