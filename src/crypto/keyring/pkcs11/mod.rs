//! The PKCS#11 keyring: KEKs live in an HSM as non-extractable AES-256 key objects, DEKs are
//! wrapped and unwrapped by the device, and no KEK ever enters this process's memory.
//!
//! Objects the vault keeps in the token (token objects, private, sensitive, never
//! extractable, found by label):
//!
//! - `<prefix>/kek/v<N>`: one per KEK version, `CKK_AES`, 32 bytes, usable only for
//!   `CKM_AES_GCM`. Its `CKA_ID` is `"tvk1" || N (u32) || created (u64 Unix seconds) ||
//!   8 random bytes`, big-endian.
//!   A DEK is wrapped with `CKM_AES_GCM` (random 96-bit nonce from the system generator,
//!   128-bit tag, the caller's associated data), giving the same stored layout as the
//!   software providers: `nonce (12) || ciphertext (32) || tag (16)`.
//! - `<prefix>/mac-root`: the MAC root key, `CKK_GENERIC_SECRET`, 32 bytes, usable only to
//!   sign; its `CKA_ID` is 16 random bytes. When the keyring opens, the device computes one HMAC-SHA256 per [`MacPurpose`] over
//!   `tokenvault/pkcs11-mac/v1/<purpose label>`; the results are the per-purpose MAC subkeys,
//!   held in memory like the software providers' (MACs are made for every lease and audit
//!   entry, too often for a device round trip). The root itself never leaves the device.
//!
//! Invariants:
//! - Wrapping, unwrapping, creating, destroying and re-reading run on a blocking thread
//!   (opening the keyring blocks its caller, at start-up), each on a session of its own from
//!   a pool of at most `keyring.pkcs11.sessions`; sessions are never shared between threads.
//!   One more session, never used for work, holds the login for as long as the keyring
//!   lives; a lost login is restored with it.
//! - Only objects that are sensitive and never extractable are used as KEKs, each label at
//!   most once: a token that shows anything else is refused, not guessed at.
//! - The library is loaded and `C_Initialize`d once per module path per process and never
//!   finalized, so several keyrings in one process (tests, the CLI) share it.
//! - The PIN lives in a zeroizing buffer and appears in no error, log or `Debug` output.
//! - Version numbers are never reused: [`KeyringProvider::create_version`] takes the lowest
//!   number the database allows, and refuses a label another object already has.
//! - Creating keys is serialised by the caller through the database (replicas sharing a
//!   token claim the creation first); a label found twice is refused, never guessed at.

mod module;
mod token;

use module::*;
use token::*;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use super::material::{MacKeys, now_secs};
use super::{Custody, KekMaterialInfo, KekVersion, KeyringProvider, MacPurpose};
use crate::crypto::{CryptoError, Key256, SecretString};

/// Prefix of a KEK object's `CKA_ID`, naming this layout.
const ID_MAGIC: &[u8; 4] = b"tvk1";
/// Input prefix of the in-device MAC subkey derivation. Part of the stored format.
const MAC_DERIVATION: &str = "tokenvault/pkcs11-mac/v1/";
/// AES-GCM nonce and tag sizes (bytes).
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Where the keys are and how to log in: from the `[keyring.pkcs11]` configuration.
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token holding the keys.
    pub token_label: String,
    /// The token's user PIN.
    pub pin: SecretString,
    /// Prefix of the labels of the vault's objects.
    pub label_prefix: String,
    /// The most sessions open for work at once (idle ones are kept for reuse).
    pub max_sessions: usize,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("label_prefix", &self.label_prefix)
            .finish_non_exhaustive()
    }
}

/// A keyring provider whose KEKs and MAC root live in a PKCS#11 token.
#[derive(Clone)]
pub struct Pkcs11Keyring {
    inner: Arc<Inner>,
}

struct Inner {
    token: Token,
    /// Handles of the KEK objects, by version, as of the last load.
    keks: RwLock<BTreeMap<KekVersion, KekObject>>,
    mac_keys: MacKeys,
}

#[derive(Clone, Copy)]
struct KekObject {
    handle: ObjectHandle,
    created_at: u64,
}

impl fmt::Debug for Pkcs11Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Keyring")
            .field("module", &self.inner.token.module)
            .field("token_label", &self.inner.token.token_label)
            .field("label_prefix", &self.inner.token.prefix)
            .finish_non_exhaustive()
    }
}

fn config_error(setting: &'static str, problem: impl Into<String>) -> CryptoError {
    CryptoError::Config {
        setting,
        problem: problem.into(),
    }
}

/// The short name of a PKCS#11 failure (`PinIncorrect`, `ObjectHandleInvalid`), never data.
fn rv_name(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function}: {rv:?}"),
        other => other.to_string(),
    }
}

fn device_error(what: &str, e: &P11Error) -> CryptoError {
    CryptoError::Keyring(format!("pkcs11: {what} failed ({})", rv_name(e)))
}

fn rv_of(e: &P11Error) -> Option<RvError> {
    match e {
        P11Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

impl Pkcs11Keyring {
    /// Logs in to the token and loads the vault's objects. Refuses a token that holds no MAC
    /// root under the prefix (`tokenvault keys init` creates it). Blocking.
    ///
    /// Errors name the setting at fault: `keyring.pkcs11.module` (missing or not a PKCS#11
    /// module), `keyring.pkcs11.token_label` (no such token), `keyring.pkcs11.pin` (refused),
    /// `keyring.pkcs11.label_prefix` (no keys under it).
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, CryptoError> {
        let token = Token::open(settings)?;
        Self::load(token)
    }

    fn load(token: Token) -> Result<Self, CryptoError> {
        let mac_keys = token.derive_mac_keys()?;
        let keks = token.find_keks()?;
        Ok(Self {
            inner: Arc::new(Inner {
                token,
                keks: RwLock::new(keks),
                mac_keys,
            }),
        })
    }

    /// Whether the token holds a usable set of the vault's keys under the prefix: the MAC
    /// root and at least one KEK. Blocking.
    pub fn token_has_keys(settings: &Pkcs11Settings) -> Result<bool, CryptoError> {
        let token = Token::open(settings)?;
        Ok(!token.find_keks()?.is_empty() && !token.find_one(&token.mac_root_label())?.is_empty())
    }

    /// Creates what a first start is missing — the MAC root, KEK version 1 — and opens the
    /// keyring. The caller has claimed the creation (replicas share the token). Blocking.
    pub fn complete(settings: &Pkcs11Settings) -> Result<Self, CryptoError> {
        let token = Token::open(settings)?;
        if token.find_one(&token.mac_root_label())?.is_empty() {
            token.generate_mac_root()?;
        }
        if token.find_keks()?.is_empty() {
            token.generate_kek(KekVersion::FIRST, now_secs())?;
        }
        Self::load(token)
    }

    /// Creates the MAC root and KEK version 1 in a token that holds none of the vault's
    /// objects under the prefix, and opens the keyring. Blocking.
    pub fn init(settings: &Pkcs11Settings) -> Result<Self, CryptoError> {
        let token = Token::open(settings)?;
        if !token.find_keks()?.is_empty() || !token.find_one(&token.mac_root_label())?.is_empty() {
            return Err(CryptoError::Keyring(format!(
                "pkcs11: token {:?} already holds keys labelled {}/…; refusing to create another \
                 set",
                settings.token_label, settings.label_prefix
            )));
        }
        token.generate_mac_root()?;
        token.generate_kek(KekVersion::FIRST, now_secs())?;
        Self::load(token)
    }

    fn kek(&self, version: KekVersion) -> Result<ObjectHandle, CryptoError> {
        self.inner
            .keks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&version)
            .map(|k| k.handle)
            .ok_or(CryptoError::UnknownKeyVersion(version))
    }

    /// Runs a blocking device operation off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Self) -> Result<T, CryptoError> + Send + 'static,
    ) -> Result<T, CryptoError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || op(&this))
            .await
            .map_err(|e| CryptoError::Keyring(format!("pkcs11 task failed: {e}")))?
    }

    /// Whether the KEK behind `handle` still encrypts and decrypts a probe. Blocking.
    fn probe(&self, handle: ObjectHandle) -> bool {
        let aad = b"tokenvault/pkcs11-probe";
        self.inner
            .token
            .with_session(|s| {
                let mut iv = [7u8; NONCE_LEN];
                let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                let sealed = s.encrypt(&Mechanism::AesGcm(params), handle, &[0u8; 32])?;
                let mut iv = [7u8; NONCE_LEN];
                let params = GcmParams::new(&mut iv, aad, (TAG_LEN as u64 * 8).into())?;
                s.decrypt(&Mechanism::AesGcm(params), handle, &sealed)
            })
            .is_ok()
    }

    /// Maps a failure on a KEK object: a handle that no longer names an object means another
    /// process destroyed it, so the version is forgotten and reported unknown.
    fn kek_failure(&self, version: KekVersion, what: &str, e: &P11Error) -> CryptoError {
        match rv_of(e) {
            Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid) => {
                self.inner
                    .keks
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&version);
                CryptoError::UnknownKeyVersion(version)
            }
            _ => device_error(what, e),
        }
    }
}

#[async_trait]
impl KeyringProvider for Pkcs11Keyring {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn custody(&self) -> Custody {
        Custody::Managed
    }

    async fn versions(&self) -> Result<Vec<KekMaterialInfo>, CryptoError> {
        Ok(self
            .inner
            .keks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(v, k)| KekMaterialInfo {
                version: *v,
                created_at: UNIX_EPOCH + Duration::from_secs(k.created_at),
            })
            .collect())
    }

    async fn reload(&self) -> Result<(), CryptoError> {
        self.blocking(|this| {
            let had = !this
                .inner
                .keks
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            let mut found = this.inner.token.find_keks()?;
            if had && found.is_empty() {
                // A token that forgot the login hides every private object: log in again
                // and look once more, rather than forget every key.
                this.inner
                    .token
                    .relogin()
                    .map_err(|e| device_error("logging in again", &e))?;
                found = this.inner.token.find_keks()?;
                if found.is_empty() {
                    return Err(CryptoError::Keyring(format!(
                        "pkcs11: token {:?} now shows none of the vault's keys; keeping the \
                         ones loaded before",
                        this.inner.token.token_label
                    )));
                }
            }
            *this
                .inner
                .keks
                .write()
                .unwrap_or_else(PoisonError::into_inner) = found;
            Ok(())
        })
        .await
    }

    async fn wrap(
        &self,
        version: KekVersion,
        dek: &Key256,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let handle = self.kek(version)?;
        let mut nonce = [0u8; NONCE_LEN];
        crate::crypto::rng()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Random)?;
        let plain = Zeroizing::new(*dek.expose());
        let aad = aad.to_vec();
        self.blocking(move |this| {
            let (iv, sealed) = this
                .inner
                .token
                .with_session(|s| {
                    let mut iv = nonce;
                    let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
                    let sealed = s.encrypt(&Mechanism::AesGcm(params), handle, &plain[..])?;
                    Ok((iv, sealed))
                })
                .map_err(|e| this.kek_failure(version, "wrapping a key", &e))?;
            if sealed.len() != Key256::LEN + TAG_LEN {
                return Err(CryptoError::Keyring(
                    "pkcs11: AES-GCM output has an unexpected length".to_owned(),
                ));
            }
            // Stored with the IV the device used: one that generates its own (FIPS mode)
            // writes it back into the parameters.
            let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
            out.extend_from_slice(&iv);
            out.extend_from_slice(&sealed);
            Ok(out)
        })
        .await
    }

    async fn unwrap(
        &self,
        version: KekVersion,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Key256, CryptoError> {
        let handle = self.kek(version)?;
        if wrapped.len() != NONCE_LEN + Key256::LEN + TAG_LEN {
            return Err(CryptoError::Decrypt);
        }
        let wrapped = wrapped.to_vec();
        let aad = aad.to_vec();
        self.blocking(move |this| {
            let decrypt = || {
                this.inner
                    .token
                    .with_session(|s| {
                        let mut iv = [0u8; NONCE_LEN];
                        iv.copy_from_slice(&wrapped[..NONCE_LEN]);
                        let params = GcmParams::new(&mut iv, &aad, (TAG_LEN as u64 * 8).into())?;
                        s.decrypt(&Mechanism::AesGcm(params), handle, &wrapped[NONCE_LEN..])
                    })
                    .map(Zeroizing::new)
            };
            let mut plain = decrypt();
            // CKR_GENERAL_ERROR may be transient (SoftHSM2 while another process writes):
            // tried once more before it counts.
            if matches!(&plain, Err(e) if rv_of(e) == Some(RvError::GeneralError)) {
                plain = decrypt();
            }
            match plain {
                Ok(plain) => Key256::from_slice(&plain)
                    .ok_or(CryptoError::Format("unwrapped key is not 32 bytes")),
                Err(e) => match rv_of(&e) {
                    // The tag did not verify: wrong key, wrong associated data or tampered.
                    Some(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::DataInvalid
                        | RvError::DataLenRange,
                    ) => Err(CryptoError::Decrypt),
                    // SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR, which a
                    // failing device also returns: a probe with the same key tells them apart.
                    Some(RvError::GeneralError) if this.probe(handle) => Err(CryptoError::Decrypt),
                    _ => Err(this.kek_failure(version, "unwrapping a key", &e)),
                },
            }
        })
        .await
    }

    async fn create_version(&self, at_least: KekVersion) -> Result<KekMaterialInfo, CryptoError> {
        self.blocking(move |this| {
            let token = &this.inner.token;
            let held = token.find_keks()?;
            let after_held = match held.keys().next_back() {
                Some(v) => v.next().ok_or(CryptoError::Unsupported(
                    "key version numbers are exhausted",
                ))?,
                None => KekVersion::FIRST,
            };
            let version = after_held.max(at_least);
            let label = token.kek_label(version);
            if !token.find_one(&label)?.is_empty() {
                return Err(CryptoError::Keyring(format!(
                    "pkcs11: token {:?} already holds a key labelled {label:?}",
                    token.token_label
                )));
            }
            let created_at = now_secs();
            let handle = token.generate_kek(version, created_at)?;
            // Another process created the same label meanwhile (the database claim that
            // serialises creation expired under it): keep neither of ours.
            if token.find_one(&label)?.len() > 1 {
                let _ = token.with_session(|s| s.destroy_object(handle));
                return Err(CryptoError::Keyring(format!(
                    "pkcs11: another process created {label:?} at the same time; rotate again"
                )));
            }
            let mut keks = this
                .inner
                .keks
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *keks = held;
            keks.insert(version, KekObject { handle, created_at });
            Ok(KekMaterialInfo {
                version,
                created_at: UNIX_EPOCH + Duration::from_secs(created_at),
            })
        })
        .await
    }

    async fn destroy_version(&self, version: KekVersion) -> Result<(), CryptoError> {
        self.blocking(move |this| {
            let token = &this.inner.token;
            let handles = token.find_one(&token.kek_label(version))?;
            if handles.is_empty() {
                this.inner
                    .keks
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&version);
                return Err(CryptoError::UnknownKeyVersion(version));
            }
            let others = token.find_keks()?.keys().filter(|v| **v != version).count();
            if others == 0 {
                return Err(CryptoError::LastKeyVersion(version));
            }
            for handle in handles {
                token
                    .with_session(|s| s.destroy_object(handle))
                    .map_err(|e| device_error("destroying a key", &e))?;
            }
            this.inner
                .keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&version);
            Ok(())
        })
        .await
    }

    fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32] {
        self.inner.mac_keys.mac(purpose, data)
    }

    fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        self.inner.mac_keys.mac_verify(purpose, data, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_round_trip_and_refuse_other_layouts() {
        let v = KekVersion::new(7).unwrap();
        let id = make_id(v, 1_765_000_000).unwrap();
        assert_eq!(parse_id(&id), Some((7, 1_765_000_000)));
        assert_eq!(parse_id(&id[..23]), None);
        assert_ne!(
            make_id(v, 1_765_000_000).unwrap(),
            id,
            "ids of two creations differ"
        );
        let mut other = id.clone();
        other[0] = b'x';
        assert_eq!(parse_id(&other), None);
    }

    #[test]
    fn a_missing_module_is_a_configuration_error_naming_the_setting() {
        let settings = Pkcs11Settings {
            module: PathBuf::from("/nonexistent/libpkcs11.so"),
            token_label: "t".into(),
            pin: SecretString::new("1234".into()),
            label_prefix: "tokenvault".into(),
            max_sessions: 2,
        };
        let e = Pkcs11Keyring::open(&settings).unwrap_err().to_string();
        assert!(
            e.starts_with("configuration error: keyring.pkcs11.module:"),
            "{e}"
        );
        assert!(!e.contains("1234"), "{e}");
        let debug = format!("{settings:?}");
        assert!(!debug.contains("1234"), "{debug}");
    }

    #[test]
    fn a_bad_label_prefix_is_refused_before_loading_anything() {
        let settings = Pkcs11Settings {
            module: PathBuf::from("/nonexistent/libpkcs11.so"),
            token_label: "t".into(),
            pin: SecretString::new("1234".into()),
            label_prefix: "a/b".into(),
            max_sessions: 2,
        };
        let e = Pkcs11Keyring::open(&settings).unwrap_err().to_string();
        assert!(e.contains("keyring.pkcs11.label_prefix"), "{e}");
    }
}
