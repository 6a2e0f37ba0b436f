//! Types for secret values: zeroized when dropped, redacted in `Debug`, no `Display`.
//!
//! Nothing here implements `Clone`, `Serialize` or `Display`, so a secret cannot be copied,
//! logged or serialised by accident; reaching the bytes takes an explicit `expose()`.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// A 256-bit symmetric key (a DEK outside this module; KEKs and the MAC root key inside
/// keyring providers).
///
/// The bytes live on the heap, so moving a `Key256` moves a pointer and leaves no copy of
/// the key on the stack; they are zeroized when the key is dropped.
pub struct Key256(Box<Zeroizing<[u8; 32]>>);

impl Key256 {
    /// Length of the key in bytes.
    pub const LEN: usize = 32;

    /// A fresh key of 256 random bits from the operating system's generator.
    pub fn generate(rng: &SystemRandom) -> Result<Self, CryptoError> {
        let mut key = Self::zeroed();
        rng.fill(&mut key.0[..]).map_err(|_| CryptoError::Random)?;
        Ok(key)
    }

    /// A key with the given bytes. The argument is a by-value copy that this function
    /// zeroizes; the caller's own copy is not. Meant for fixed probe values and tests, not
    /// for secret material (which should be generated here or unwrapped by a provider).
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(&bytes);
        bytes.zeroize();
        key
    }

    /// An all-zero key, to be filled in place (so the bytes are written only to the heap).
    pub(in crate::crypto) fn zeroed() -> Self {
        Self(Box::new(Zeroizing::new([0u8; 32])))
    }

    /// Copies a key out of a slice that must be exactly 32 bytes long.
    pub(in crate::crypto) fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    /// The raw key bytes, for the AEAD and HMAC code in this module only.
    pub(in crate::crypto) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256([redacted])")
    }
}

/// Secret bytes of any length (an opened token, a decrypted payload).
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are zeroized when this value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes. Keep the borrow short and do not copy them into unzeroized buffers.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Number of secret bytes (not secret itself).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Converts to a [`SecretString`] without copying, if the bytes are UTF-8. On failure
    /// the bytes are zeroized and the error says only that they were not UTF-8.
    pub fn into_secret_string(mut self) -> Result<SecretString, CryptoError> {
        let bytes = std::mem::take(&mut *self.0);
        match String::from_utf8(bytes) {
            Ok(s) => Ok(SecretString::new(s)),
            Err(e) => {
                // Re-wrap so the rejected bytes are zeroized on drop.
                drop(Zeroizing::new(e.into_bytes()));
                Err(CryptoError::Format("secret is not valid UTF-8"))
            }
        }
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes([redacted])")
    }
}

/// A secret string (an OAuth token, a generated key value for an operator to copy).
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `s`; it is zeroized when this value is dropped.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The secret text. Keep the borrow short and do not copy it into unzeroized buffers.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes (not secret itself).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn debug_of_a_key_shows_no_key_bytes() {
        let key = Key256::generate(&SystemRandom::new()).unwrap();
        let debug = format!("{key:?} {key:#?}");
        assert_eq!(format!("{key:?}"), "Key256([redacted])");
        let hex = hex::encode(key.expose());
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.expose());
        assert!(!debug.contains(&hex), "hex of the key leaked into Debug");
        assert!(!debug.contains(&b64), "base64 of the key leaked into Debug");
        assert!(
            !debug.contains(&format!("{:?}", key.expose())),
            "byte list leaked"
        );
    }

    #[test]
    fn debug_of_secret_bytes_and_strings_is_redacted() {
        let bytes = SecretBytes::new(b"ya29.secret-access-token".to_vec());
        let string = SecretString::new("1//refresh-token-value".to_owned());
        let debug = format!("{bytes:?} {string:?} {bytes:#?} {string:#?}");
        assert!(!debug.contains("secret-access-token"));
        assert!(!debug.contains("refresh-token-value"));
        assert!(!debug.contains("121, 97, 50, 57")); // "ya29" as a byte list
        assert_eq!(format!("{string:?}"), "SecretString([redacted])");
    }

    #[test]
    fn generated_keys_differ() {
        let rng = SystemRandom::new();
        let a = Key256::generate(&rng).unwrap();
        let b = Key256::generate(&rng).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.expose(), &[0u8; 32]);
    }

    #[test]
    fn from_slice_requires_exactly_32_bytes() {
        assert!(Key256::from_slice(&[7u8; 31]).is_none());
        assert!(Key256::from_slice(&[7u8; 33]).is_none());
        assert_eq!(Key256::from_slice(&[7u8; 32]).unwrap().expose(), &[7u8; 32]);
    }

    #[test]
    fn from_bytes_keeps_the_given_bytes() {
        assert_eq!(Key256::from_bytes([0x5a; 32]).expose(), &[0x5a; 32]);
    }

    #[test]
    fn secret_bytes_convert_to_string_only_when_utf8() {
        let s = SecretBytes::new(b"token".to_vec())
            .into_secret_string()
            .unwrap();
        assert_eq!(s.expose(), "token");
        let err = SecretBytes::new(vec![0xff, 0xfe]).into_secret_string();
        assert!(matches!(err, Err(CryptoError::Format(_))));
    }
}
