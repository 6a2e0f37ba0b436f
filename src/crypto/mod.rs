//! Key material and encryption at rest: the only component that ever touches raw key bytes.
//!
//! The key hierarchy (see `DESIGN.md`, "Keys and encryption"):
//!
//! - A [`KeyringProvider`] holds versioned key-encryption keys (KEKs) and a MAC root key. It
//!   wraps and unwraps data-encryption keys itself, so raw KEKs never leave it; that is what
//!   lets an HSM hold them. [`LocalKeyring`] (a 0600 JSON file, the embedded default),
//!   [`EnvKeyring`] (keys given in environment variables) and [`Pkcs11Keyring`] (an HSM over
//!   PKCS#11) are the providers in this crate. The provider only holds material: lifecycle
//!   state (primary, active, retired, destroyed) is tracked by the database.
//! - Each connection has its own data-encryption key (DEK), wrapped by a KEK version with
//!   [`envelope::wrap_dek`]; the wrapped form is bound to its connection by associated data.
//! - Tokens are sealed with the connection's DEK by [`envelope::seal`], bound to tenant,
//!   account, connection, token kind and format version.
//!
//! Secret values live in [`Key256`], [`SecretBytes`] and [`SecretString`]: zeroized on drop,
//! redacted in `Debug`. [`CryptoError`] never carries secret bytes.

pub mod envelope;
mod gcm;
pub mod keyring;
pub mod secret;

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;
use zeroize::Zeroizing;

pub use envelope::{
    Dek, DekContext, TokenContext, TokenKind, WrappedDek, fingerprint, generate_dek, open,
    rewrap_dek, seal, unwrap_dek, wrap_dek,
};
pub use keyring::{
    Custody, EnvKeyring, GeneratedEnvValues, KekMaterialInfo, KekVersion, KeyringProvider,
    LocalKeyring, MacPurpose, ParseKekVersionError, Pkcs11Keyring, Pkcs11Settings,
};
pub use secret::{Key256, SecretBytes, SecretString};

/// Everything that can go wrong in this module.
///
/// No variant carries key bytes, plaintext or ciphertext: messages are safe to log and to
/// turn into a caller-visible status (the transport layer still decides how much to show).
#[derive(Debug, Error)]
pub enum CryptoError {
    /// An AES-GCM ciphertext (a sealed token or a wrapped DEK) did not authenticate: it was
    /// opened with the wrong key, under the wrong context (another connection, tenant,
    /// account or token kind), or its bytes were changed.
    #[error("ciphertext failed authentication: wrong key, wrong context or tampered")]
    Decrypt,

    /// The keyring holds no material for this KEK version: it was never created here, or its
    /// material has been destroyed.
    #[error("key version {0} is not in the keyring")]
    UnknownKeyVersion(keyring::KekVersion),

    /// The KEK version is known to have been destroyed. Providers report a missing version as
    /// [`CryptoError::UnknownKeyVersion`]; this variant is for callers that know the version's
    /// lifecycle state (the database) and want to say why it cannot be used.
    #[error("key version {0} has been destroyed")]
    KeyDestroyed(keyring::KekVersion),

    /// Stored bytes do not have the expected layout (too short, unknown format version, or
    /// a header that disagrees with its context).
    #[error("malformed encrypted data: {0}")]
    Format(&'static str),

    /// The keyring could not be read, written or parsed, or its file permissions are unsafe.
    /// The message names the file or setting and the problem, never key bytes.
    #[error("keyring: {0}")]
    Keyring(String),

    /// The provider cannot perform this operation (for example, creating a key version in a
    /// keyring that is read from environment variables); the message says what to do instead.
    #[error("unsupported keyring operation: {0}")]
    Unsupported(&'static str),

    /// Refused to destroy the only KEK version left in the keyring: nothing could be wrapped
    /// afterwards. Create a new version (and rewrap onto it) first.
    #[error("refusing to destroy key version {0}: it is the only version in the keyring")]
    LastKeyVersion(keyring::KekVersion),

    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,

    /// A keyring setting is wrong: the module, token, PIN or label prefix of an HSM. The
    /// message names the setting and never quotes a PIN or key.
    #[error("configuration error: {setting}: {problem}")]
    Config {
        /// The setting at fault (`keyring.pkcs11.pin`).
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// The process-wide system random number generator (ring's `SystemRandom`).
pub fn rng() -> &'static SystemRandom {
    static RNG: LazyLock<SystemRandom> = LazyLock::new(SystemRandom::new);
    &RNG
}

/// A random bearer secret (an API key): `n_bytes` random bytes in unpadded base64url, which
/// is safe in headers, URLs and TOML. 32 bytes give 43 characters.
pub fn random_token(n_bytes: usize) -> Result<SecretString, CryptoError> {
    let mut raw = Zeroizing::new(vec![0u8; n_bytes]);
    rng().fill(&mut raw).map_err(|_| CryptoError::Random)?;
    let mut text = Zeroizing::new(String::with_capacity(n_bytes.div_ceil(3) * 4));
    URL_SAFE_NO_PAD.encode_string(&*raw, &mut text);
    Ok(SecretString::new(std::mem::take(&mut *text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_are_url_safe_and_distinct() {
        let a = random_token(32).unwrap();
        let b = random_token(32).unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a.expose(), b.expose());
        assert!(
            a.expose()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(format!("{a:?}"), "SecretString([redacted])");
    }

    #[test]
    fn crypto_errors_say_what_happened() {
        let v3 = KekVersion::new(3).unwrap();
        assert_eq!(
            CryptoError::Decrypt.to_string(),
            "ciphertext failed authentication: wrong key, wrong context or tampered"
        );
        assert_eq!(
            CryptoError::UnknownKeyVersion(v3).to_string(),
            "key version v3 is not in the keyring"
        );
        assert_eq!(
            CryptoError::KeyDestroyed(v3).to_string(),
            "key version v3 has been destroyed"
        );
    }
}
