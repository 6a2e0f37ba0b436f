//! In-memory key material shared by the software providers: KEK versions, the MAC root key
//! and the per-purpose HMAC subkeys derived from it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::{hkdf, hmac};
use zeroize::Zeroizing;

use super::{KekMaterialInfo, KekVersion, MacPurpose};
use crate::crypto::{CryptoError, Key256, gcm};

/// HKDF salt for deriving MAC subkeys from the MAC root key. Part of the stored format.
const MAC_HKDF_SALT: &[u8] = b"tokenvault/mac-root/v1";

/// Decodes a 256-bit key from standard base64 (with padding) straight into a [`Key256`].
/// Returns `None` for anything else; the caller words the error, which must not quote the
/// input.
pub(super) fn decode_key(text: &str) -> Option<Key256> {
    // 64 characters is far more than the 44 a 32-byte key needs; refuse before decoding.
    if text.len() > 64 {
        return None;
    }
    let mut buf = Zeroizing::new([0u8; 48]);
    let n = STANDARD.decode_slice(text, &mut buf[..]).ok()?;
    Key256::from_slice(&buf[..n])
}

/// A key in standard base64, in a zeroizing buffer.
pub(super) struct EncodedKey(Zeroizing<[u8; 44]>);

impl EncodedKey {
    pub(super) fn new(key: &Key256) -> Self {
        let mut buf = Zeroizing::new([0u8; 44]);
        let n = STANDARD
            .encode_slice(key.expose(), &mut buf[..])
            // Invariant: 32 bytes always encode to exactly 44 characters with padding.
            .expect("a 32-byte key encodes to 44 base64 characters");
        debug_assert_eq!(n, 44);
        Self(buf)
    }

    pub(super) fn as_str(&self) -> &str {
        // Invariant: base64 output is ASCII.
        std::str::from_utf8(&self.0[..]).expect("base64 is ASCII")
    }
}

/// One KEK version's material.
pub(super) struct KekEntry {
    pub(super) key: Key256,
    /// Creation time in whole seconds since the Unix epoch.
    pub(super) created_at: u64,
}

impl KekEntry {
    pub(super) fn info(&self, version: KekVersion) -> KekMaterialInfo {
        KekMaterialInfo {
            version,
            created_at: UNIX_EPOCH + Duration::from_secs(self.created_at),
        }
    }
}

/// Seconds since the Unix epoch, now.
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// HMAC subkeys, one per [`MacPurpose`], in `MacPurpose::index` order.
pub(super) struct MacKeys([hmac::Key; MacPurpose::ALL.len()]);

impl MacKeys {
    /// Derives every subkey from a root key held in memory (the software providers).
    fn derive(root: &Key256) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, MAC_HKDF_SALT).extract(root.expose());
        Self(MacPurpose::ALL.map(|purpose| {
            let info = [purpose.label().as_bytes()];
            let okm = prk
                .expand(&info, hmac::HMAC_SHA256)
                // Invariant: expand fails only for outputs over 255 hash lengths; an
                // HMAC-SHA256 key is one hash length.
                .expect("HKDF-SHA256 can expand to 32 bytes");
            hmac::Key::from(okm)
        }))
    }

    /// Subkeys computed elsewhere (inside an HSM, from a root key that never leaves it),
    /// one per purpose in `MacPurpose::ALL` order.
    pub(super) fn from_subkeys(subkeys: [Key256; MacPurpose::ALL.len()]) -> Self {
        Self(subkeys.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.expose())))
    }

    fn key(&self, purpose: MacPurpose) -> &hmac::Key {
        &self.0[purpose.index()]
    }

    pub(super) fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(self.key(purpose), data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    pub(super) fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        hmac::verify(self.key(purpose), data, tag).is_ok()
    }
}

/// Everything a software keyring holds.
pub(super) struct Material {
    keys: BTreeMap<KekVersion, KekEntry>,
    /// The highest version this keyring has ever held, including destroyed ones, so a
    /// version number is never reused.
    last_version: Option<KekVersion>,
    mac_root: Key256,
    mac_keys: MacKeys,
}

impl Material {
    /// Assembles material, checking that `last_version` is at least every held version.
    pub(super) fn new(
        keys: BTreeMap<KekVersion, KekEntry>,
        last_version: Option<KekVersion>,
        mac_root: Key256,
    ) -> Result<Self, &'static str> {
        let highest = keys.keys().next_back().copied();
        if highest > last_version {
            return Err("last_version is lower than a key version in the keyring");
        }
        let mac_keys = MacKeys::derive(&mac_root);
        Ok(Self {
            keys,
            last_version,
            mac_root,
            mac_keys,
        })
    }

    pub(super) fn keys(&self) -> &BTreeMap<KekVersion, KekEntry> {
        &self.keys
    }

    pub(super) fn last_version(&self) -> Option<KekVersion> {
        self.last_version
    }

    pub(super) fn mac_root(&self) -> &Key256 {
        &self.mac_root
    }

    pub(super) fn versions(&self) -> Vec<KekMaterialInfo> {
        self.keys.iter().map(|(v, e)| e.info(*v)).collect()
    }

    /// The number a new version gets: `at_least`, or one above the highest ever held if
    /// that is higher.
    pub(super) fn next_version(&self, at_least: KekVersion) -> Result<KekVersion, CryptoError> {
        let after_last = match self.last_version {
            None => KekVersion::FIRST,
            Some(v) => v.next().ok_or(CryptoError::Unsupported(
                "key version numbers are exhausted",
            ))?,
        };
        Ok(after_last.max(at_least))
    }

    /// Adds a version; it must be above every version held before.
    pub(super) fn insert(&mut self, version: KekVersion, entry: KekEntry) {
        self.keys.insert(version, entry);
        self.last_version = self.last_version.max(Some(version));
    }

    /// Drops a version's material (zeroized as the entry drops).
    pub(super) fn remove(&mut self, version: KekVersion) -> Result<(), CryptoError> {
        if !self.keys.contains_key(&version) {
            return Err(CryptoError::UnknownKeyVersion(version));
        }
        if self.keys.len() == 1 {
            return Err(CryptoError::LastKeyVersion(version));
        }
        self.keys.remove(&version);
        Ok(())
    }

    fn kek(&self, version: KekVersion) -> Result<&Key256, CryptoError> {
        self.keys
            .get(&version)
            .map(|e| &e.key)
            .ok_or(CryptoError::UnknownKeyVersion(version))
    }

    pub(super) fn wrap(
        &self,
        version: KekVersion,
        dek: &Key256,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(gcm::OVERHEAD + Key256::LEN);
        gcm::seal_append(self.kek(version)?, aad, dek.expose(), &mut out)?;
        Ok(out)
    }

    pub(super) fn unwrap(
        &self,
        version: KekVersion,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Key256, CryptoError> {
        let plain = gcm::open(self.kek(version)?, aad, wrapped)?;
        Key256::from_slice(plain.expose())
            .ok_or(CryptoError::Format("unwrapped key is not 32 bytes"))
    }

    pub(super) fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32] {
        self.mac_keys.mac(purpose, data)
    }

    pub(super) fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        self.mac_keys.mac_verify(purpose, data, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(root: [u8; 32]) -> Material {
        let mut keys = BTreeMap::new();
        keys.insert(
            KekVersion::FIRST,
            KekEntry {
                key: Key256::from_slice(&[9u8; 32]).unwrap(),
                created_at: 0,
            },
        );
        Material::new(
            keys,
            Some(KekVersion::FIRST),
            Key256::from_slice(&root).unwrap(),
        )
        .unwrap()
    }

    /// HKDF-SHA256 (RFC 5869) for one 32-byte block, written out with plain HMAC so it
    /// checks the derivation independently of `ring::hkdf`.
    fn reference_mac(root: &[u8], purpose: MacPurpose, data: &[u8]) -> Vec<u8> {
        let salt = hmac::Key::new(hmac::HMAC_SHA256, MAC_HKDF_SALT);
        let prk = hmac::sign(&salt, root);
        let prk = hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref());
        let mut info = purpose.label().as_bytes().to_vec();
        info.push(1);
        let okm = hmac::sign(&prk, &info);
        let subkey = hmac::Key::new(hmac::HMAC_SHA256, okm.as_ref());
        hmac::sign(&subkey, data).as_ref().to_vec()
    }

    #[test]
    fn mac_is_deterministic_per_purpose_and_differs_across_purposes() {
        let m = material([1u8; 32]);
        let tags: Vec<_> = MacPurpose::ALL.iter().map(|p| m.mac(*p, b"data")).collect();
        for (i, p) in MacPurpose::ALL.iter().enumerate() {
            assert_eq!(m.mac(*p, b"data"), tags[i], "{p:?} not deterministic");
            assert_ne!(m.mac(*p, b"datb"), tags[i], "{p:?} ignores the data");
            for j in 0..i {
                assert_ne!(
                    tags[i],
                    tags[j],
                    "{p:?} and {:?} share a key",
                    MacPurpose::ALL[j]
                );
            }
        }
        let other_root = material([2u8; 32]);
        assert_ne!(
            other_root.mac(MacPurpose::AuditChain, b"data"),
            m.mac(MacPurpose::AuditChain, b"data")
        );
    }

    #[test]
    fn mac_matches_the_documented_derivation() {
        let root = [0x42u8; 32];
        let m = material(root);
        for p in MacPurpose::ALL {
            assert_eq!(
                m.mac(p, b"payload").to_vec(),
                reference_mac(&root, p, b"payload"),
                "{p:?}"
            );
        }
        // Pinned output: changing a label or the salt would orphan every stored MAC.
        assert_eq!(
            hex::encode(m.mac(MacPurpose::TokenFingerprint, b"payload")),
            "f9a9fea371ab35f9fd3c1af177f053c683a028041069a5dd20d8a77ebb489fc7"
        );
    }

    #[test]
    fn mac_verify_accepts_only_the_right_tag_and_purpose() {
        let m = material([3u8; 32]);
        let tag = m.mac(MacPurpose::ApiKey, b"tv_live_abc");
        assert!(m.mac_verify(MacPurpose::ApiKey, b"tv_live_abc", &tag));
        assert!(!m.mac_verify(MacPurpose::StateHash, b"tv_live_abc", &tag));
        assert!(!m.mac_verify(MacPurpose::ApiKey, b"tv_live_abd", &tag));
        assert!(!m.mac_verify(MacPurpose::ApiKey, b"tv_live_abc", &tag[..31]));
        let mut bad = tag;
        bad[31] ^= 1;
        assert!(!m.mac_verify(MacPurpose::ApiKey, b"tv_live_abc", &bad));
    }

    #[test]
    fn decode_key_accepts_only_32_bytes_of_standard_base64() {
        let key = Key256::from_slice(&[0xfb; 32]).unwrap();
        let text = EncodedKey::new(&key).as_str().to_owned();
        assert_eq!(text.len(), 44);
        assert_eq!(decode_key(&text).unwrap().expose(), key.expose());
        assert!(decode_key(&text[..43]).is_none());
        assert!(decode_key(&text.replace('+', "-")).is_none());
        assert!(decode_key("c2hvcnQ=").is_none());
        assert!(decode_key(&"A".repeat(1000)).is_none());
        assert!(decode_key("").is_none());
    }
}
