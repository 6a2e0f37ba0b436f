//! The env keyring: KEK versions and the MAC root key given as text (environment variables
//! read by the configuration layer), for containers without a writable keyring file.
//!
//! Keys value: comma-separated entries `VERSION:BASE64KEY[:CREATED_UNIX_SECS]`, for example
//! `1:q83v…=:1763820000,2:3q2+…=`. `VERSION` is `3` or `v3`; `BASE64KEY` is 32 bytes in
//! standard base64 (44 characters). Without a creation time the version counts as created
//! when the keyring was loaded. MAC root key value: 32 bytes in standard base64.
//!
//! This provider cannot create or destroy versions ([`Custody::External`]): the operator adds
//! a version (`tokenvault keys init --env --version N` prints one) or removes one by editing
//! the variable on every replica and restarting it. The database's key registry records which
//! versions each live replica holds, so a rotation waits until every replica holds the new
//! version and a destruction is recorded once none holds the old one.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::material::{EncodedKey, KekEntry, Material, decode_key, now_secs};
use super::{Custody, KekMaterialInfo, KekVersion, KeyringProvider, MacPurpose};
use crate::crypto::{CryptoError, Key256, SecretString};

/// A keyring provider whose material is given as text (environment variables).
pub struct EnvKeyring {
    material: Material,
}

/// Freshly generated values for an env keyring (`tokenvault keys init --env`), to be put in
/// the environment by the operator.
#[derive(Debug)]
pub struct GeneratedEnvValues {
    /// One keys entry, `VERSION:BASE64KEY:CREATED`: the whole value of a new keyring, or the
    /// entry to append for a new version.
    pub keys: SecretString,
    /// The MAC root key value.
    pub mac_root_key: SecretString,
}

impl fmt::Debug for EnvKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvKeyring")
            .field("versions", &self.material.keys().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn entry_error(index: usize, version: Option<KekVersion>, problem: &str) -> CryptoError {
    match version {
        Some(v) => CryptoError::Keyring(format!("keyring.env keys entry {index} ({v}): {problem}")),
        None => CryptoError::Keyring(format!("keyring.env keys entry {index}: {problem}")),
    }
}

impl EnvKeyring {
    /// Parses the keys value and the MAC root key value (see the module documentation).
    ///
    /// Errors name the entry (1-based) and the problem, never the key text.
    pub fn from_values(keys: &str, mac_root: &str) -> Result<Self, CryptoError> {
        let loaded_at = now_secs();
        let mut parsed = BTreeMap::new();
        let entries = keys.split(',').map(str::trim).filter(|e| !e.is_empty());
        for (i, entry) in entries.enumerate() {
            let index = i + 1;
            let mut parts = entry.splitn(3, ':').map(str::trim);
            let version = parts
                .next()
                .and_then(|p| p.parse::<KekVersion>().ok())
                .ok_or_else(|| {
                    entry_error(
                        index,
                        None,
                        "expected VERSION:BASE64KEY with a version such as 2 or v2",
                    )
                })?;
            let key = parts
                .next()
                .and_then(decode_key)
                .ok_or_else(|| entry_error(index, Some(version), "not 32 bytes of base64"))?;
            let created_at = match parts.next() {
                None => loaded_at,
                Some(t) => t.parse::<u64>().map_err(|_| {
                    entry_error(
                        index,
                        Some(version),
                        "creation time must be whole seconds since the Unix epoch",
                    )
                })?,
            };
            if parsed
                .insert(version, KekEntry { key, created_at })
                .is_some()
            {
                return Err(entry_error(index, Some(version), "version appears twice"));
            }
        }
        if parsed.is_empty() {
            return Err(CryptoError::Keyring(
                "keyring.env keys: no key versions given; expected VERSION:BASE64KEY entries \
                 separated by commas"
                    .to_owned(),
            ));
        }
        let mac_root = decode_key(mac_root.trim()).ok_or_else(|| {
            CryptoError::Keyring("keyring.env mac root key: not 32 bytes of base64".to_owned())
        })?;
        let last = parsed.keys().next_back().copied();
        let material = Material::new(parsed, last, mac_root)
            .map_err(|e| CryptoError::Keyring(e.to_owned()))?;
        Ok(Self { material })
    }

    /// Generates values for an env keyring: a key for `version` (with its creation time) and
    /// a MAC root key, each from the system's random number generator. A new keyring uses
    /// both with version 1; a rotation appends the keys entry of the next version and keeps
    /// its MAC root.
    pub fn generate_values(version: KekVersion) -> Result<GeneratedEnvValues, CryptoError> {
        let rng = crate::crypto::rng();
        let kek = Key256::generate(rng)?;
        let mac_root = Key256::generate(rng)?;
        let created = now_secs().to_string();

        let kek_text = EncodedKey::new(&kek);
        let mut keys = Zeroizing::new(String::with_capacity(64));
        keys.push_str(&version.get().to_string());
        keys.push(':');
        keys.push_str(kek_text.as_str());
        keys.push(':');
        keys.push_str(&created);

        Ok(GeneratedEnvValues {
            keys: SecretString::new(std::mem::take(&mut *keys)),
            mac_root_key: SecretString::new(EncodedKey::new(&mac_root).as_str().to_owned()),
        })
    }
}

#[async_trait]
impl KeyringProvider for EnvKeyring {
    fn kind(&self) -> &'static str {
        "env"
    }

    fn custody(&self) -> Custody {
        Custody::External
    }

    async fn versions(&self) -> Result<Vec<KekMaterialInfo>, CryptoError> {
        Ok(self.material.versions())
    }

    async fn reload(&self) -> Result<(), CryptoError> {
        // The values were read from the process's environment at start; they change only
        // by a restart.
        Ok(())
    }

    async fn wrap(
        &self,
        version: KekVersion,
        dek: &Key256,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.material.wrap(version, dek, aad)
    }

    async fn unwrap(
        &self,
        version: KekVersion,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Key256, CryptoError> {
        self.material.unwrap(version, wrapped, aad)
    }

    async fn create_version(&self, _at_least: KekVersion) -> Result<KekMaterialInfo, CryptoError> {
        Err(CryptoError::Unsupported(
            "the env keyring cannot create key versions: generate one with \
             `tokenvault keys init --env --version N` (N: the next version number), append it \
             to TOKENVAULT_KEYRING__KEYS on every replica and restart them",
        ))
    }

    async fn destroy_version(&self, _version: KekVersion) -> Result<(), CryptoError> {
        Err(CryptoError::Unsupported(
            "the env keyring cannot erase key versions: remove the version's entry from \
             TOKENVAULT_KEYRING__KEYS on every replica and restart them; the destruction is \
             then recorded",
        ))
    }

    fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32] {
        self.material.mac(purpose, data)
    }

    fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        self.material.mac_verify(purpose, data, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    const MAC: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";

    fn err(keys: &str, mac: &str) -> String {
        EnvKeyring::from_values(keys, mac).unwrap_err().to_string()
    }

    #[tokio::test]
    async fn parses_versions_with_and_without_creation_time() {
        let keyring =
            EnvKeyring::from_values(&format!(" 1:{K1}:1700000000 , v2:{K2} ,"), MAC).unwrap();
        let versions = keyring.versions().await.unwrap();
        assert_eq!(versions.len(), 2);
        assert_eq!(versions[0].version.get(), 1);
        assert_eq!(
            versions[0].created_at,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
        assert_eq!(versions[1].version.get(), 2);
        assert_eq!(keyring.kind(), "env");
    }

    #[test]
    fn parse_errors_name_the_entry_and_never_quote_keys() {
        let short = "c2hvcnRrZXk="; // "shortkey"
        let cases = [
            (
                format!("1:{K1},2:{short}"),
                MAC,
                "entry 2 (v2): not 32 bytes of base64",
            ),
            (
                format!("1:{K1},2:!!!"),
                MAC,
                "entry 2 (v2): not 32 bytes of base64",
            ),
            (
                format!("1:{K1},2"),
                MAC,
                "entry 2 (v2): not 32 bytes of base64",
            ),
            (K1.to_owned(), MAC, "entry 1: expected VERSION:BASE64KEY"),
            (
                format!("0:{K1}"),
                MAC,
                "entry 1: expected VERSION:BASE64KEY",
            ),
            (
                format!("1:{K1},1:{K2}"),
                MAC,
                "entry 2 (v1): version appears twice",
            ),
            (
                format!("1:{K1}:yesterday"),
                MAC,
                "entry 1 (v1): creation time",
            ),
            (String::new(), MAC, "no key versions given"),
            (" , ".to_owned(), MAC, "no key versions given"),
            (
                format!("1:{K1}"),
                short,
                "mac root key: not 32 bytes of base64",
            ),
            (
                format!("1:{K1}"),
                "",
                "mac root key: not 32 bytes of base64",
            ),
        ];
        for (keys, mac, expected) in cases {
            let e = err(&keys, mac);
            assert!(e.contains(expected), "{e:?} (wanted {expected:?})");
            assert!(e.contains("keyring.env"), "{e}");
            for secret in [K1, K2, short, "c2hvcnRr"] {
                assert!(!e.contains(secret), "error quoted key text: {e}");
            }
        }
    }

    #[tokio::test]
    async fn create_and_destroy_are_unsupported_with_instructions() {
        let keyring = EnvKeyring::from_values(&format!("1:{K1}"), MAC).unwrap();
        let e = keyring.create_version(KekVersion::FIRST).await.unwrap_err();
        assert!(matches!(e, CryptoError::Unsupported(_)));
        assert!(
            e.to_string()
                .contains("append it to TOKENVAULT_KEYRING__KEYS")
        );
        let e = keyring
            .destroy_version(KekVersion::FIRST)
            .await
            .unwrap_err();
        assert!(matches!(e, CryptoError::Unsupported(_)));
        assert_eq!(keyring.versions().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn generated_values_parse_back_into_a_working_keyring() {
        let values = EnvKeyring::generate_values(KekVersion::FIRST).unwrap();
        let keyring =
            EnvKeyring::from_values(values.keys.expose(), values.mac_root_key.expose()).unwrap();
        let versions = keyring.versions().await.unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].version, KekVersion::FIRST);
        let age = std::time::SystemTime::now()
            .duration_since(versions[0].created_at)
            .unwrap();
        assert!(age.as_secs() < 60, "creation time was not recorded");

        let dek = Key256::generate(&SystemRandom::new()).unwrap();
        let wrapped = keyring.wrap(KekVersion::FIRST, &dek, b"a").await.unwrap();
        let back = keyring
            .unwrap(KekVersion::FIRST, &wrapped, b"a")
            .await
            .unwrap();
        assert_eq!(back.expose(), dek.expose());

        let other = EnvKeyring::generate_values(KekVersion::FIRST).unwrap();
        assert_ne!(values.keys.expose(), other.keys.expose());
        assert_ne!(values.mac_root_key.expose(), other.mac_root_key.expose());
        let debug = format!("{values:?} {keyring:?}");
        assert!(!debug.contains(values.mac_root_key.expose()));
        assert!(!debug.contains(&values.keys.expose()[2..46]));
    }
}
