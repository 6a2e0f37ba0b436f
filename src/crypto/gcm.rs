//! AES-256-GCM with a random 96-bit nonce: the one AEAD primitive behind KEK wrapping and
//! token sealing. Output layout: `nonce (12) || ciphertext || tag (16)`.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, Key, KeyInit, Nonce, Tag};
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use super::{CryptoError, Key256, SecretBytes};

/// AES-GCM nonce length in bytes (96 bits).
pub(in crate::crypto) const NONCE_LEN: usize = 12;
/// AES-GCM tag length in bytes (128 bits).
pub(in crate::crypto) const TAG_LEN: usize = 16;
/// Bytes added to a plaintext by [`seal_append`].
pub(in crate::crypto) const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

fn cipher(key: &Key256) -> Aes256Gcm {
    // Borrow the key as the cipher's array type without copying it.
    let key: &Key<Aes256Gcm> = key.expose().into();
    Aes256Gcm::new(key)
}

/// Encrypts `plaintext` under `key` and `aad` with a fresh random nonce and appends
/// `nonce || ciphertext || tag` to `out`.
///
/// The plaintext is copied into `out` and encrypted in place; `out` is grown once, before
/// the copy, so no reallocation leaves a plaintext copy behind.
pub(in crate::crypto) fn seal_append(
    key: &Key256,
    aad: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    super::rng()
        .fill(&mut nonce)
        .map_err(|_| CryptoError::Random)?;

    out.reserve_exact(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = cipher(key)
        .encrypt_inout_detached((&nonce).into(), aad, (&mut out[start..]).into())
        // AES-GCM refuses only plaintexts over 64 GiB or AAD over 2^61 bytes.
        .map_err(|_| CryptoError::Format("plaintext too long for AES-GCM"))?;
    out.extend_from_slice(tag.as_slice());
    Ok(())
}

/// Decrypts `nonce || ciphertext || tag` produced by [`seal_append`] under the same `key`
/// and `aad`. Any mismatch is [`CryptoError::Decrypt`].
pub(in crate::crypto) fn open(
    key: &Key256,
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretBytes, CryptoError> {
    if sealed.len() < OVERHEAD {
        return Err(CryptoError::Format("ciphertext shorter than nonce and tag"));
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce = <&Nonce<Aes256Gcm>>::try_from(nonce)
        .map_err(|_| CryptoError::Format("bad nonce length"))?;
    let tag =
        <&Tag<Aes256Gcm>>::try_from(tag).map_err(|_| CryptoError::Format("bad tag length"))?;

    let mut buf = Zeroizing::new(ciphertext.to_vec());
    cipher(key)
        .decrypt_inout_detached(nonce, aad, (&mut buf[..]).into(), tag)
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn roundtrip_and_layout() {
        let key = Key256::generate(&SystemRandom::new()).unwrap();
        let mut out = vec![0xAA];
        seal_append(&key, b"aad", b"hello", &mut out).unwrap();
        assert_eq!(out.len(), 1 + NONCE_LEN + 5 + TAG_LEN);
        assert_eq!(out[0], 0xAA, "seal_append must append, not overwrite");
        assert!(!out.windows(5).any(|w| w == b"hello"), "plaintext visible");
        assert_eq!(open(&key, b"aad", &out[1..]).unwrap().expose(), b"hello");
        assert!(matches!(
            open(&key, b"aaX", &out[1..]),
            Err(CryptoError::Decrypt)
        ));
    }

    #[test]
    fn nonces_are_fresh() {
        let key = Key256::generate(&SystemRandom::new()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        seal_append(&key, b"", b"same", &mut a).unwrap();
        seal_append(&key, b"", b"same", &mut b).unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn too_short_input_is_a_format_error() {
        let key = Key256::generate(&SystemRandom::new()).unwrap();
        assert!(matches!(
            open(&key, b"", &[0u8; OVERHEAD - 1]),
            Err(CryptoError::Format(_))
        ));
    }
}
