//! Envelope encryption: per-connection DEKs wrapped by a KEK version, and tokens sealed with
//! the DEK. Pure functions over a [`KeyringProvider`]; nothing here stores anything.
//!
//! Stored formats (all integers big-endian):
//!
//! - Wrapped DEK, 65 bytes: `0x01 (format) || kek_version u32 || nonce (12) ||
//!   AES-256-GCM(KEK, DEK) (32) || tag (16)`. Associated data: [`dek_aad`].
//! - Sealed token, 29 + n bytes: `0x01 (format) || nonce (12) || AES-256-GCM(DEK, token) (n)
//!   || tag (16)`. Associated data: [`token_aad`].
//!
//! Associated data encodes every field as `len u64 || bytes`, so no two different contexts
//! produce the same bytes: a ciphertext copied to another connection, tenant, account or
//! token field fails to open.

use std::fmt;

use super::keyring::{KekVersion, KeyringProvider, MacPurpose};
use super::{CryptoError, Key256, SecretBytes, gcm};

/// A data-encryption key: 256 random bits, one per connection ([`Key256::generate`]).
pub type Dek = Key256;

/// Format byte of a sealed token.
pub const SEALED_FORMAT_V1: u8 = 1;
/// Format byte of a wrapped DEK.
pub const WRAPPED_DEK_FORMAT_V1: u8 = 1;

const SEALED_HEADER_LEN: usize = 1;
const WRAPPED_HEADER_LEN: usize = 1 + 4;
/// Length of a stored wrapped DEK.
pub const WRAPPED_DEK_LEN: usize = WRAPPED_HEADER_LEN + gcm::OVERHEAD + Key256::LEN;

/// Which field a sealed token belongs in. Part of the associated data, so a ciphertext moved
/// from one field to another fails to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An OAuth access token.
    Access,
    /// An OAuth refresh token.
    Refresh,
    /// A PKCE code verifier held between `BeginAuthorization` and the callback.
    PkceVerifier,
    /// A refresh token kept in the revocation outbox until Google confirms revocation.
    OutboxRefresh,
}

impl TokenKind {
    /// The byte that stands for this kind in associated data. Part of the stored format.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Access => 1,
            Self::Refresh => 2,
            Self::PkceVerifier => 3,
            Self::OutboxRefresh => 4,
        }
    }
}

/// The connection a DEK belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DekContext<'a> {
    /// Tenant id.
    pub tenant: &'a str,
    /// Account id within the tenant.
    pub account: &'a str,
    /// Connection id.
    pub connection: &'a str,
}

impl<'a> DekContext<'a> {
    /// The context of a token of `kind` on this connection.
    pub const fn token(&self, kind: TokenKind) -> TokenContext<'a> {
        TokenContext {
            tenant: self.tenant,
            account: self.account,
            connection: self.connection,
            kind,
        }
    }
}

/// Where a sealed token belongs: its connection and its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenContext<'a> {
    /// Tenant id.
    pub tenant: &'a str,
    /// Account id within the tenant.
    pub account: &'a str,
    /// Connection id.
    pub connection: &'a str,
    /// Which token field.
    pub kind: TokenKind,
}

/// A DEK wrapped by a KEK version, as stored: `kek_version` in its own column (for counting
/// and rotation), `bytes` as an opaque blob.
///
/// `bytes` also names the KEK version (see the module documentation); [`unwrap_dek`] refuses
/// a value whose two versions disagree, so a mixed-up column is reported, not guessed at.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek {
    /// The KEK version that wrapped the DEK.
    pub kek_version: KekVersion,
    /// The stored form produced by [`wrap_dek`] (65 bytes).
    pub bytes: Vec<u8>,
}

impl WrappedDek {
    /// Parses stored bytes alone, reading the KEK version from them. Does not decrypt.
    pub fn from_stored(bytes: Vec<u8>) -> Result<Self, CryptoError> {
        let kek_version = stored_version(&bytes)?;
        Ok(Self { kek_version, bytes })
    }

    /// The ciphertext part (`nonce || encrypted DEK || tag`), after checking the layout and
    /// that the embedded version matches `kek_version`.
    fn checked_ciphertext(&self) -> Result<&[u8], CryptoError> {
        if stored_version(&self.bytes)? != self.kek_version {
            return Err(CryptoError::Format(
                "wrapped DEK names a different key version than its record",
            ));
        }
        Ok(&self.bytes[WRAPPED_HEADER_LEN..])
    }
}

/// Checks the length and format byte of a stored wrapped DEK and reads its KEK version.
fn stored_version(bytes: &[u8]) -> Result<KekVersion, CryptoError> {
    if bytes.len() != WRAPPED_DEK_LEN {
        return Err(CryptoError::Format("wrapped DEK has the wrong length"));
    }
    if bytes[0] != WRAPPED_DEK_FORMAT_V1 {
        return Err(CryptoError::Format("unknown wrapped DEK format version"));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[1..WRAPPED_HEADER_LEN]);
    KekVersion::new(u32::from_be_bytes(version))
        .ok_or(CryptoError::Format("wrapped DEK names key version 0"))
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedDek")
            .field("kek_version", &self.kek_version)
            .field("len", &self.bytes.len())
            .finish()
    }
}

fn put(aad: &mut Vec<u8>, field: &[u8]) {
    aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
    aad.extend_from_slice(field);
}

/// Associated data for wrapping a DEK: binds it to its connection and KEK version.
///
/// `lp("tokenvault/dek") || lp([format]) || lp(tenant) || lp(account) || lp(connection) ||
/// lp(kek_version u32)`, where `lp(x) = len(x) as u64 || x`.
pub fn dek_aad(ctx: &DekContext<'_>, version: KekVersion) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        6 * 8 + 14 + 1 + 4 + ctx.tenant.len() + ctx.account.len() + ctx.connection.len(),
    );
    put(&mut aad, b"tokenvault/dek");
    put(&mut aad, &[WRAPPED_DEK_FORMAT_V1]);
    put(&mut aad, ctx.tenant.as_bytes());
    put(&mut aad, ctx.account.as_bytes());
    put(&mut aad, ctx.connection.as_bytes());
    put(&mut aad, &version.get().to_be_bytes());
    aad
}

/// Associated data for sealing a token: binds it to its connection, field and format.
///
/// `lp("tokenvault/token") || lp([format]) || lp(tenant) || lp(account) || lp(connection) ||
/// lp([kind])`, where `lp(x) = len(x) as u64 || x`.
pub fn token_aad(ctx: &TokenContext<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        6 * 8 + 16 + 1 + 1 + ctx.tenant.len() + ctx.account.len() + ctx.connection.len(),
    );
    put(&mut aad, b"tokenvault/token");
    put(&mut aad, &[SEALED_FORMAT_V1]);
    put(&mut aad, ctx.tenant.as_bytes());
    put(&mut aad, ctx.account.as_bytes());
    put(&mut aad, ctx.connection.as_bytes());
    put(&mut aad, &[ctx.kind.as_u8()]);
    aad
}

/// A fresh DEK for a new connection.
pub fn generate_dek() -> Result<Dek, CryptoError> {
    Key256::generate(super::rng())
}

/// Wraps `dek` for the connection `ctx` under KEK `version`.
pub async fn wrap_dek(
    provider: &dyn KeyringProvider,
    version: KekVersion,
    dek: &Dek,
    ctx: &DekContext<'_>,
) -> Result<WrappedDek, CryptoError> {
    let inner = provider.wrap(version, dek, &dek_aad(ctx, version)).await?;
    let mut bytes = Vec::with_capacity(WRAPPED_HEADER_LEN + inner.len());
    bytes.push(WRAPPED_DEK_FORMAT_V1);
    bytes.extend_from_slice(&version.get().to_be_bytes());
    bytes.extend_from_slice(&inner);
    Ok(WrappedDek {
        kek_version: version,
        bytes,
    })
}

/// Unwraps the DEK of the connection `ctx`. Fails with [`CryptoError::Decrypt`] if the
/// wrapped DEK belongs to another connection or was changed, with
/// [`CryptoError::UnknownKeyVersion`] if its KEK version is no longer in the keyring, and
/// with [`CryptoError::Format`] if the bytes are malformed or name another version than
/// `kek_version`.
pub async fn unwrap_dek(
    provider: &dyn KeyringProvider,
    wrapped: &WrappedDek,
    ctx: &DekContext<'_>,
) -> Result<Dek, CryptoError> {
    let ciphertext = wrapped.checked_ciphertext()?;
    let version = wrapped.kek_version;
    provider
        .unwrap(version, ciphertext, &dek_aad(ctx, version))
        .await
}

/// Re-wraps a DEK under KEK version `to` (key rotation). The DEK itself, and so every token
/// sealed with it, is unchanged.
pub async fn rewrap_dek(
    provider: &dyn KeyringProvider,
    wrapped: &WrappedDek,
    to: KekVersion,
    ctx: &DekContext<'_>,
) -> Result<WrappedDek, CryptoError> {
    let dek = unwrap_dek(provider, wrapped, ctx).await?;
    wrap_dek(provider, to, &dek, ctx).await
}

/// Seals a token with its connection's DEK, bound to `ctx`.
pub fn seal(dek: &Dek, ctx: &TokenContext<'_>, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(SEALED_HEADER_LEN + gcm::OVERHEAD + plaintext.len());
    out.push(SEALED_FORMAT_V1);
    gcm::seal_append(dek, &token_aad(ctx), plaintext, &mut out)?;
    Ok(out)
}

/// Opens a token sealed by [`seal`]. Fails with [`CryptoError::Decrypt`] under another
/// DEK or context or if any byte changed, and with [`CryptoError::Format`] for an unknown
/// format byte or truncated input.
pub fn open(dek: &Dek, ctx: &TokenContext<'_>, sealed: &[u8]) -> Result<SecretBytes, CryptoError> {
    match sealed.split_first() {
        None => Err(CryptoError::Format("sealed token is empty")),
        Some((&SEALED_FORMAT_V1, rest)) => gcm::open(dek, &token_aad(ctx), rest),
        Some(_) => Err(CryptoError::Format("unknown sealed token format version")),
    }
}

/// A stable, non-reversible name for a token, for logs and audit records: hex of the first
/// 16 bytes of HMAC-SHA256 under the keyring's token-fingerprint subkey (32 characters).
pub fn fingerprint(provider: &dyn KeyringProvider, token: &[u8]) -> String {
    hex::encode(&provider.mac(MacPurpose::TokenFingerprint, token)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::EnvKeyring;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    const MAC: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
    const TOKEN: &[u8] = b"ya29.a0AfH6SMBx-example-access-token";

    fn provider() -> EnvKeyring {
        EnvKeyring::from_values(&format!("1:{K1},2:{K2}"), MAC).unwrap()
    }

    fn v(n: u32) -> KekVersion {
        KekVersion::new(n).unwrap()
    }

    const CONN: DekContext<'static> = DekContext {
        tenant: "tenant-a",
        account: "account-1",
        connection: "conn-1",
    };

    #[test]
    fn seal_open_roundtrip_and_layout() {
        let dek = generate_dek().unwrap();
        let ctx = CONN.token(TokenKind::Access);
        let sealed = seal(&dek, &ctx, TOKEN).unwrap();
        assert_eq!(sealed.len(), 1 + 12 + TOKEN.len() + 16);
        assert_eq!(sealed[0], SEALED_FORMAT_V1);
        assert!(!sealed.windows(8).any(|w| TOKEN.windows(8).any(|t| t == w)));
        assert_eq!(open(&dek, &ctx, &sealed).unwrap().expose(), TOKEN);

        let empty = seal(&dek, &ctx, b"").unwrap();
        assert!(open(&dek, &ctx, &empty).unwrap().is_empty());
        let big = vec![0x5a; 2048];
        assert_eq!(
            open(&dek, &ctx, &seal(&dek, &ctx, &big).unwrap())
                .unwrap()
                .expose(),
            big
        );
    }

    #[test]
    fn flipping_any_byte_of_a_sealed_token_fails() {
        let dek = generate_dek().unwrap();
        let ctx = CONN.token(TokenKind::Refresh);
        let sealed = seal(&dek, &ctx, TOKEN).unwrap();
        for i in 0..sealed.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = sealed.clone();
                bad[i] ^= mask;
                match open(&dek, &ctx, &bad) {
                    Err(CryptoError::Format(_)) if i == 0 => {}
                    Err(CryptoError::Decrypt) if i > 0 => {}
                    other => panic!("byte {i} ^ {mask:#x}: {other:?}"),
                }
            }
        }
        assert!(open(&dek, &ctx, &sealed[..sealed.len() - 1]).is_err());
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            open(&dek, &ctx, &longer),
            Err(CryptoError::Decrypt)
        ));
        assert!(matches!(open(&dek, &ctx, &[]), Err(CryptoError::Format(_))));
        assert!(matches!(
            open(&dek, &ctx, &sealed[..20]),
            Err(CryptoError::Format(_))
        ));
    }

    #[test]
    fn a_sealed_token_moved_to_another_context_fails() {
        let dek = generate_dek().unwrap();
        let ctx = CONN.token(TokenKind::Access);
        let sealed = seal(&dek, &ctx, TOKEN).unwrap();
        let elsewhere = [
            TokenContext {
                connection: "conn-2",
                ..ctx
            },
            TokenContext {
                tenant: "tenant-b",
                ..ctx
            },
            TokenContext {
                account: "account-2",
                ..ctx
            },
            TokenContext {
                kind: TokenKind::Refresh,
                ..ctx
            },
            TokenContext {
                kind: TokenKind::OutboxRefresh,
                ..ctx
            },
            TokenContext {
                kind: TokenKind::PkceVerifier,
                ..ctx
            },
            // Same concatenated text, different field boundaries.
            TokenContext {
                tenant: "tenant-a",
                account: "ccount-1",
                connection: "conn-1",
                kind: ctx.kind,
            },
            TokenContext {
                tenant: "tenant-aa",
                account: "ccount-1",
                ..ctx
            },
        ];
        for other in elsewhere {
            assert!(
                matches!(open(&dek, &other, &sealed), Err(CryptoError::Decrypt)),
                "opened under {other:?}"
            );
        }
        let other_dek = generate_dek().unwrap();
        assert!(matches!(
            open(&other_dek, &ctx, &sealed),
            Err(CryptoError::Decrypt)
        ));
        assert!(open(&dek, &ctx, &sealed).is_ok());
    }

    #[test]
    fn aad_is_unambiguous_across_field_boundaries() {
        let a = DekContext {
            tenant: "ab",
            account: "c",
            connection: "d",
        };
        let b = DekContext {
            tenant: "a",
            account: "bc",
            connection: "d",
        };
        assert_ne!(dek_aad(&a, v(1)), dek_aad(&b, v(1)));
        assert_ne!(
            token_aad(&a.token(TokenKind::Access)),
            token_aad(&b.token(TokenKind::Access))
        );
        assert_ne!(dek_aad(&a, v(1)), dek_aad(&a, v(2)));
    }

    #[tokio::test]
    async fn wrap_unwrap_roundtrip_and_layout() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let wrapped = wrap_dek(&keyring, v(2), &dek, &CONN).await.unwrap();
        assert_eq!(wrapped.kek_version, v(2));
        let bytes = &wrapped.bytes;
        assert_eq!(bytes.len(), WRAPPED_DEK_LEN);
        assert_eq!(bytes.len(), 65);
        assert_eq!(bytes[0], WRAPPED_DEK_FORMAT_V1);
        assert_eq!(bytes[1..5], 2u32.to_be_bytes());
        assert!(
            !bytes
                .windows(8)
                .any(|w| dek.expose().windows(8).any(|d| d == w))
        );

        let stored = WrappedDek::from_stored(wrapped.bytes.clone()).unwrap();
        assert_eq!(stored, wrapped);
        let back = unwrap_dek(&keyring, &stored, &CONN).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    }

    #[tokio::test]
    async fn flipping_any_byte_of_a_wrapped_dek_fails() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let wrapped = wrap_dek(&keyring, v(1), &dek, &CONN).await.unwrap();
        let good = wrapped.bytes.clone();
        for i in 0..good.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                let result = match WrappedDek::from_stored(bad) {
                    Err(e) => Err(e),
                    Ok(w) => unwrap_dek(&keyring, &w, &CONN).await,
                };
                match result {
                    Err(CryptoError::Format(_)) if i == 0 => {}
                    // The version field: another version, missing or present.
                    Err(CryptoError::Format(_) | CryptoError::UnknownKeyVersion(_))
                        if (1..5).contains(&i) => {}
                    Err(CryptoError::Decrypt) if i >= 1 => {}
                    other => panic!("byte {i} ^ {mask:#x}: {other:?}"),
                }
            }
        }
        assert!(matches!(
            WrappedDek::from_stored(good[..good.len() - 1].to_vec()),
            Err(CryptoError::Format(_))
        ));
    }

    #[tokio::test]
    async fn unwrapping_under_another_kek_version_fails() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let wrapped = wrap_dek(&keyring, v(1), &dek, &CONN).await.unwrap();
        // Relabel the wrapped DEK as version 2 (as a tampered or mixed-up column would).
        let mut bytes = wrapped.bytes.clone();
        bytes[1..5].copy_from_slice(&2u32.to_be_bytes());
        let relabelled = WrappedDek::from_stored(bytes).unwrap();
        assert!(matches!(
            unwrap_dek(&keyring, &relabelled, &CONN).await,
            Err(CryptoError::Decrypt)
        ));
        // Version 1's ciphertext under version 2's key with version 1's context, directly.
        assert!(matches!(
            keyring
                .unwrap(v(2), &wrapped.bytes[5..], &dek_aad(&CONN, v(1)))
                .await,
            Err(CryptoError::Decrypt)
        ));
        // A version the keyring does not hold.
        let mut bytes = wrapped.bytes.clone();
        bytes[1..5].copy_from_slice(&7u32.to_be_bytes());
        let missing = WrappedDek::from_stored(bytes).unwrap();
        assert!(matches!(
            unwrap_dek(&keyring, &missing, &CONN).await,
            Err(CryptoError::UnknownKeyVersion(x)) if x == v(7)
        ));
    }

    #[tokio::test]
    async fn a_version_column_that_disagrees_with_the_bytes_is_refused() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let wrapped = wrap_dek(&keyring, v(1), &dek, &CONN).await.unwrap();
        let mixed_up = WrappedDek {
            kek_version: v(2),
            ..wrapped.clone()
        };
        assert!(matches!(
            unwrap_dek(&keyring, &mixed_up, &CONN).await,
            Err(CryptoError::Format(_))
        ));
        assert!(unwrap_dek(&keyring, &wrapped, &CONN).await.is_ok());
    }

    #[tokio::test]
    async fn a_wrapped_dek_moved_to_another_connection_fails() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let wrapped = wrap_dek(&keyring, v(1), &dek, &CONN).await.unwrap();
        for other in [
            DekContext {
                connection: "conn-2",
                ..CONN
            },
            DekContext {
                account: "account-2",
                ..CONN
            },
            DekContext {
                tenant: "tenant-b",
                ..CONN
            },
        ] {
            assert!(matches!(
                unwrap_dek(&keyring, &wrapped, &other).await,
                Err(CryptoError::Decrypt)
            ));
        }
    }

    #[tokio::test]
    async fn rewrap_moves_a_dek_to_the_new_version_and_tokens_still_open() {
        let keyring = provider();
        let dek = generate_dek().unwrap();
        let ctx = CONN.token(TokenKind::Refresh);
        let sealed = seal(&dek, &ctx, TOKEN).unwrap();
        let old = wrap_dek(&keyring, v(1), &dek, &CONN).await.unwrap();
        let new = rewrap_dek(&keyring, &old, v(2), &CONN).await.unwrap();
        assert_eq!(new.kek_version, v(2));
        assert_ne!(new.bytes, old.bytes);
        let dek2 = unwrap_dek(&keyring, &new, &CONN).await.unwrap();
        assert_eq!(open(&dek2, &ctx, &sealed).unwrap().expose(), TOKEN);
    }

    #[test]
    fn fingerprint_is_stable_keyed_and_not_the_token() {
        let keyring = provider();
        let fp = fingerprint(&keyring, TOKEN);
        assert_eq!(fp.len(), 32);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(fp, fingerprint(&keyring, TOKEN));
        assert_ne!(fp, fingerprint(&keyring, b"another token"));
        let other = EnvKeyring::from_values(&format!("1:{K1}"), K2).unwrap();
        assert_ne!(
            fp,
            fingerprint(&other, TOKEN),
            "fingerprint must depend on the mac key"
        );
        assert_eq!(
            fp,
            hex::encode(&keyring.mac(MacPurpose::TokenFingerprint, TOKEN)[..16])
        );
    }
}
