//! The local keyring: KEKs and the MAC root key in a JSON file readable only by its owner.
//!
//! File layout (`format_version` 1), written with mode 0600:
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "last_version": 2,
//!   "mac_root_key": "<base64, 32 bytes>",
//!   "keys": [
//!     { "version": 1, "created_at": 1763820000, "key": "<base64, 32 bytes>" },
//!     { "version": 2, "created_at": 1766412000, "key": "<base64, 32 bytes>" }
//!   ]
//! }
//! ```
//!
//! `last_version` is the highest version ever held, destroyed ones included, so numbers are
//! never reused. Every change rewrites the file atomically (temporary file, fsync, rename,
//! fsync of the directory) under an exclusive lock on `.<name>.lock` next to it, so the
//! server and the `tokenvault keys` command can both change it. Unix only: the permission
//! checks are the point of this provider.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::material::{EncodedKey, KekEntry, Material, decode_key, now_secs};
use super::{Custody, KekMaterialInfo, KekVersion, KeyringProvider, MacPurpose};
use crate::crypto::{CryptoError, Key256};

/// The keyring file format this build reads and writes.
const FORMAT_VERSION: u32 = 1;
/// A keyring file larger than this is refused unread (a real one is a few KiB).
const MAX_FILE_LEN: u64 = 1 << 20;

/// A keyring provider backed by a local file (the embedded default).
///
/// Material is loaded once by [`LocalKeyring::open`] and kept in memory; mutations rewrite
/// the file and then the in-memory copy.
#[derive(Clone)]
pub struct LocalKeyring {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    material: RwLock<Material>,
    /// Serialises mutations within this process (the file lock covers other processes).
    mutate: Mutex<()>,
}

impl fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl LocalKeyring {
    /// Creates a new keyring file at `path` holding KEK version 1 and a MAC root key, with
    /// mode 0600, and opens it. Creates the parent directory with mode 0700 if it is
    /// missing. Refuses to overwrite an existing file.
    ///
    /// Blocking: call it at start-up or from `spawn_blocking`.
    pub fn init(path: impl AsRef<Path>) -> Result<Self, CryptoError> {
        let path = path.as_ref();
        let rng = crate::crypto::rng();
        let mut keys = BTreeMap::new();
        keys.insert(
            KekVersion::FIRST,
            KekEntry {
                key: Key256::generate(rng)?,
                created_at: now_secs(),
            },
        );
        let material = Material::new(keys, Some(KekVersion::FIRST), Key256::generate(rng)?)
            .map_err(|e| CryptoError::Keyring(e.to_owned()))?;

        let dir = parent_dir(path);
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io_error("cannot create keyring directory", dir, &e))?;
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    CryptoError::Keyring(format!(
                        "keyring file {} already exists; refusing to overwrite it",
                        path.display()
                    ))
                } else {
                    io_error("cannot create keyring file", path, &e)
                }
            })?;
        let written = write_material(&mut file, &material)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            drop(file);
            // Best effort: a half-written file would block the next `keys init`.
            let _ = fs::remove_file(path);
            return Err(io_error("cannot write keyring file", path, &e));
        }
        Ok(Self::from_material(path, material))
    }

    /// Opens an existing keyring file. Refuses a missing file, a file that grants any
    /// permission to group or others, and a file that does not parse.
    ///
    /// Blocking: call it at start-up or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CryptoError> {
        let path = path.as_ref();
        let material = read_material(path)?;
        Ok(Self::from_material(path, material))
    }

    /// Re-reads the file, picking up versions created or destroyed by another process (for
    /// example another replica sharing the file, or `tokenvault keys`). Blocking; the
    /// provider's [`KeyringProvider::reload`] runs it off the async runtime.
    pub fn reload_file(&self) -> Result<(), CryptoError> {
        let material = read_material(&self.inner.path)?;
        *self
            .inner
            .material
            .write()
            .unwrap_or_else(PoisonError::into_inner) = material;
        Ok(())
    }

    /// The keyring file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn from_material(path: &Path, material: Material) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                material: RwLock::new(material),
                mutate: Mutex::new(()),
            }),
        }
    }

    fn with_material<T>(&self, f: impl FnOnce(&Material) -> T) -> T {
        // A poisoned lock still guards consistent material: writers only ever swap in a
        // complete `Material`.
        f(&self
            .inner
            .material
            .read()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `change` to the material on disk (re-read under the lock, so changes made by
    /// other processes are kept), writes the file atomically, then updates memory.
    async fn mutate<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Material) -> Result<T, CryptoError> + Send + 'static,
    ) -> Result<T, CryptoError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _in_process = inner.mutate.lock().unwrap_or_else(PoisonError::into_inner);
            let _cross_process = lock_file(&inner.path)?;
            let mut material = read_material(&inner.path)?;
            let out = change(&mut material)?;
            replace_file(&inner.path, &material)?;
            *inner
                .material
                .write()
                .unwrap_or_else(PoisonError::into_inner) = material;
            Ok(out)
        })
        .await
        .map_err(|e| CryptoError::Keyring(format!("keyring update task failed: {e}")))?
    }
}

#[async_trait]
impl KeyringProvider for LocalKeyring {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn custody(&self) -> Custody {
        Custody::Managed
    }

    async fn versions(&self) -> Result<Vec<KekMaterialInfo>, CryptoError> {
        Ok(self.with_material(Material::versions))
    }

    async fn reload(&self) -> Result<(), CryptoError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.reload_file())
            .await
            .map_err(|e| CryptoError::Keyring(format!("keyring reload task failed: {e}")))?
    }

    async fn wrap(
        &self,
        version: KekVersion,
        dek: &Key256,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.with_material(|m| m.wrap(version, dek, aad))
    }

    async fn unwrap(
        &self,
        version: KekVersion,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Key256, CryptoError> {
        self.with_material(|m| m.unwrap(version, wrapped, aad))
    }

    async fn create_version(&self, at_least: KekVersion) -> Result<KekMaterialInfo, CryptoError> {
        self.mutate(move |material| {
            let version = material.next_version(at_least)?;
            let entry = KekEntry {
                key: Key256::generate(crate::crypto::rng())?,
                created_at: now_secs(),
            };
            let info = entry.info(version);
            material.insert(version, entry);
            Ok(info)
        })
        .await
    }

    async fn destroy_version(&self, version: KekVersion) -> Result<(), CryptoError> {
        self.mutate(move |material| material.remove(version)).await
    }

    fn mac(&self, purpose: MacPurpose, data: &[u8]) -> [u8; 32] {
        self.with_material(|m| m.mac(purpose, data))
    }

    fn mac_verify(&self, purpose: MacPurpose, data: &[u8], tag: &[u8]) -> bool {
        self.with_material(|m| m.mac_verify(purpose, data, tag))
    }
}

// ---- file format ----------------------------------------------------------------------

/// Just the format version, read first so a newer format is reported as such rather than as
/// an unknown field.
#[derive(Deserialize)]
struct FormatProbe {
    format_version: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    #[expect(dead_code, reason = "checked first, through `FormatProbe`")]
    format_version: u32,
    last_version: u32,
    mac_root_key: KeyIn,
    keys: Vec<EntryIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryIn {
    version: u32,
    created_at: u64,
    key: KeyIn,
}

/// A key decoded from base64 straight into a [`Key256`], without an intermediate `String`.
struct KeyIn(Key256);

impl<'de> Deserialize<'de> for KeyIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte key in standard base64")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyIn, E> {
                // The error must not quote the value.
                decode_key(v)
                    .map(KeyIn)
                    .ok_or_else(|| E::custom("key is not 32 bytes of base64"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[derive(Serialize)]
struct FileOut<'a> {
    format_version: u32,
    last_version: u32,
    mac_root_key: KeyOut<'a>,
    keys: Vec<EntryOut<'a>>,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    version: u32,
    created_at: u64,
    key: KeyOut<'a>,
}

/// Serialises a key as base64 from a zeroizing buffer.
struct KeyOut<'a>(&'a Key256);

impl Serialize for KeyOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(EncodedKey::new(self.0).as_str())
    }
}

/// Serialises `material` into a zeroizing buffer sized up front (so it never reallocates
/// and leaves copies behind) and writes it to `file`.
fn write_material(file: &mut File, material: &Material) -> io::Result<()> {
    let doc = FileOut {
        format_version: FORMAT_VERSION,
        last_version: material.last_version().map_or(0, KekVersion::get),
        mac_root_key: KeyOut(material.mac_root()),
        keys: material
            .keys()
            .iter()
            .map(|(v, e)| EntryOut {
                version: v.get(),
                created_at: e.created_at,
                key: KeyOut(&e.key),
            })
            .collect(),
    };
    // Generous: an entry takes at most ~130 bytes pretty-printed.
    let mut buf = Zeroizing::new(Vec::with_capacity(512 + 192 * doc.keys.len()));
    serde_json::to_writer_pretty(&mut *buf, &doc).map_err(io::Error::other)?;
    buf.push(b'\n');
    file.write_all(&buf)
}

fn parse_material(path: &Path, bytes: &[u8]) -> Result<Material, CryptoError> {
    let invalid = |what: &str, e: &serde_json::Error| {
        CryptoError::Keyring(format!(
            "keyring file {} {what} (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        ))
    };
    // serde_json's own messages can quote field values; report only the position.
    let describe = |e: &serde_json::Error| match e.classify() {
        serde_json::error::Category::Data => invalid("has a missing, unknown or invalid field", e),
        _ => invalid("is not valid JSON", e),
    };
    let probe: FormatProbe = serde_json::from_slice(bytes).map_err(|e| describe(&e))?;
    if probe.format_version != FORMAT_VERSION {
        return Err(CryptoError::Keyring(format!(
            "keyring file {} has format version {}; this build reads version {FORMAT_VERSION}",
            path.display(),
            probe.format_version
        )));
    }
    let file: FileIn = serde_json::from_slice(bytes).map_err(|e| describe(&e))?;

    let bad = |problem: String| {
        CryptoError::Keyring(format!("keyring file {}: {problem}", path.display()))
    };
    let mut keys = BTreeMap::new();
    for entry in file.keys {
        let version = KekVersion::new(entry.version)
            .ok_or_else(|| bad("key version 0 is not allowed".to_owned()))?;
        let previous = keys.insert(
            version,
            KekEntry {
                key: entry.key.0,
                created_at: entry.created_at,
            },
        );
        if previous.is_some() {
            return Err(bad(format!("key version {version} appears twice")));
        }
    }
    Material::new(
        keys,
        KekVersion::new(file.last_version),
        file.mac_root_key.0,
    )
    .map_err(|e| bad(e.to_owned()))
}

// ---- file system ----------------------------------------------------------------------

fn io_error(what: &str, path: &Path, e: &io::Error) -> CryptoError {
    CryptoError::Keyring(format!("{what} {}: {e}", path.display()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `dir/.name.suffix`, next to the keyring file.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "keyring".into(), |n| n.to_string_lossy());
    parent_dir(path).join(format!(".{name}.{suffix}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads and checks the keyring file: it must exist, be a regular file, grant nothing to
/// group or others, and parse.
fn read_material(path: &Path) -> Result<Material, CryptoError> {
    let mut file = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CryptoError::Keyring(format!(
                "keyring file {} does not exist; create it with `tokenvault keys init`",
                path.display()
            ))
        } else {
            io_error("cannot open keyring file", path, &e)
        }
    })?;
    // Check the file we opened, not the path, so a swap between check and read is caught.
    let meta = file
        .metadata()
        .map_err(|e| io_error("cannot stat keyring file", path, &e))?;
    if !meta.is_file() {
        return Err(CryptoError::Keyring(format!(
            "keyring file {} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::Keyring(format!(
            "keyring file {} has mode {mode:04o}; it must not be readable by group or others \
             (chmod 600)",
            path.display()
        )));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(CryptoError::Keyring(format!(
            "keyring file {} is {} bytes, larger than any keyring; refusing to read it",
            path.display(),
            meta.len()
        )));
    }
    // Sized to the file plus slack so reading never reallocates and leaves a copy behind.
    let capacity = usize::try_from(meta.len()).unwrap_or(0) + 4096;
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    (&mut file)
        .take(MAX_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("cannot read keyring file", path, &e))?;
    parse_material(path, &bytes)
}

/// Atomically replaces the keyring file: temporary file (0600) in the same directory,
/// fsync, rename over the old file, fsync the directory.
fn replace_file(path: &Path, material: &Material) -> Result<(), CryptoError> {
    let tmp = sibling(path, "tmp");
    let result = (|| {
        // A temporary file left by a crash is replaced, never reused: `create_new` refuses
        // symlinks and guarantees the fresh file's mode is 0600.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        write_material(&mut file, material)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(parent_dir(path))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("cannot rewrite keyring file", path, &e));
    }
    Ok(())
}

/// Takes an exclusive lock on `.<name>.lock` next to the keyring file, released when the
/// returned file is dropped.
fn lock_file(path: &Path) -> Result<File, CryptoError> {
    let lock_path = sibling(path, "lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io_error("cannot open keyring lock file", &lock_path, &e))?;
    file.lock()
        .map_err(|e| io_error("cannot lock keyring lock file", &lock_path, &e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keyring::material::EncodedKey;
    use ring::rand::SystemRandom;
    use std::os::unix::fs::MetadataExt;

    fn keyring_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("data").join("keyring.json")
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn v(n: u32) -> KekVersion {
        KekVersion::new(n).unwrap()
    }

    #[tokio::test]
    async fn init_creates_a_0600_file_in_a_0700_dir_with_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(path.parent().unwrap()), 0o700);
        let versions = keyring.versions().await.unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].version, KekVersion::FIRST);
        assert_eq!(keyring.kind(), "local");

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["format_version"], 1);
        assert_eq!(json["last_version"], 1);
        assert_eq!(json["keys"][0]["version"], 1);
        assert_eq!(json["keys"][0]["key"].as_str().unwrap().len(), 44);
        assert_eq!(json["mac_root_key"].as_str().unwrap().len(), 44);
        assert_ne!(json["keys"][0]["key"], json["mac_root_key"]);
    }

    #[test]
    fn init_refuses_to_overwrite_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        LocalKeyring::init(&path).unwrap();
        let before = fs::read(&path).unwrap();
        let err = LocalKeyring::init(&path).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "existing keyring was changed"
        );
    }

    #[test]
    fn open_refuses_a_file_readable_by_group_or_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        LocalKeyring::init(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o601] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = LocalKeyring::open(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("chmod 600"), "{err}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        LocalKeyring::open(&path).unwrap();
    }

    #[test]
    fn open_of_a_missing_file_suggests_keys_init() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalKeyring::open(keyring_path(&dir))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenvault keys init"), "{err}");
    }

    #[test]
    fn open_reports_bad_contents_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let write = |text: &str| {
            let _ = fs::remove_file(&path);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        let good = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=";
        let short = "U0VDUkVUU0VDUkVUU0VDUkVU";
        let cases = [
            ("{not json", "not valid JSON"),
            (
                r#"{"format_version":2,"last_version":1,"mac_root_key":"","keys":[]}"#,
                "format version 2",
            ),
            (
                &format!(
                    r#"{{"format_version":1,"last_version":1,"mac_root_key":"{short}","keys":[]}}"#
                ),
                "invalid field",
            ),
            (
                &format!(
                    r#"{{"format_version":1,"last_version":1,"mac_root_key":"{good}","keys":[{{"version":"{short}","created_at":0,"key":"{good}"}}]}}"#
                ),
                "invalid field",
            ),
            (
                &format!(
                    r#"{{"format_version":1,"last_version":1,"mac_root_key":"{good}","keys":[{{"version":1,"created_at":0,"key":"{good}"}},{{"version":1,"created_at":0,"key":"{good}"}}]}}"#
                ),
                "appears twice",
            ),
            (
                &format!(
                    r#"{{"format_version":1,"last_version":1,"mac_root_key":"{good}","keys":[{{"version":2,"created_at":0,"key":"{good}"}}]}}"#
                ),
                "last_version",
            ),
        ];
        for (text, expected) in cases {
            write(text);
            let err = LocalKeyring::open(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} (wanted {expected:?})");
            assert!(!err.contains(short) && !err.contains(good), "quoted: {err}");
            assert!(!err.contains("U0VDUkVU"), "quoted: {err}");
        }
    }

    #[tokio::test]
    async fn create_version_survives_reopen_with_both_versions_usable() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        let dek = Key256::generate(&SystemRandom::new()).unwrap();
        let wrapped_v1 = keyring.wrap(v(1), &dek, b"ctx").await.unwrap();

        let info = keyring.create_version(KekVersion::FIRST).await.unwrap();
        assert_eq!(info.version, v(2));
        assert_eq!(mode_of(&path), 0o600, "rewrite must keep mode 0600");
        let wrapped_v2 = keyring.wrap(v(2), &dek, b"ctx").await.unwrap();

        let reopened = LocalKeyring::open(&path).unwrap();
        let versions: Vec<_> = reopened
            .versions()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(versions, [v(1), v(2)]);
        for (version, wrapped) in [(v(1), &wrapped_v1), (v(2), &wrapped_v2)] {
            let back = reopened.unwrap(version, wrapped, b"ctx").await.unwrap();
            assert_eq!(back.expose(), dek.expose());
        }
        // The MAC root key survives the rewrite too.
        assert_eq!(
            keyring.mac(MacPurpose::StateHash, b"s"),
            reopened.mac(MacPurpose::StateHash, b"s")
        );
    }

    #[tokio::test]
    async fn destroy_version_removes_the_material_durably() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        keyring.create_version(KekVersion::FIRST).await.unwrap();
        let dek = Key256::generate(&SystemRandom::new()).unwrap();
        let wrapped = keyring.wrap(v(1), &dek, b"ctx").await.unwrap();
        let v1_key_b64 =
            keyring.with_material(|m| EncodedKey::new(&m.keys()[&v(1)].key).as_str().to_owned());
        assert!(
            String::from_utf8(fs::read(&path).unwrap())
                .unwrap()
                .contains(&v1_key_b64)
        );

        keyring.destroy_version(v(1)).await.unwrap();

        // In memory, at once.
        assert!(matches!(
            keyring.unwrap(v(1), &wrapped, b"ctx").await,
            Err(CryptoError::UnknownKeyVersion(x)) if x == v(1)
        ));
        // On disk: the key's bytes are gone from the file and a reopen cannot use v1.
        let text = String::from_utf8(fs::read(&path).unwrap()).unwrap();
        assert!(
            !text.contains(&v1_key_b64),
            "destroyed key still in the file"
        );
        let reopened = LocalKeyring::open(&path).unwrap();
        assert!(matches!(
            reopened.unwrap(v(1), &wrapped, b"ctx").await,
            Err(CryptoError::UnknownKeyVersion(x)) if x == v(1)
        ));
        let versions: Vec<_> = reopened
            .versions()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(versions, [v(2)]);
        // No temporary file with old material is left behind.
        assert!(!sibling(&path, "tmp").exists());
    }

    #[tokio::test]
    async fn a_stale_temporary_file_is_replaced_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        let tmp = sibling(&path, "tmp");
        fs::write(&tmp, b"left over by a crash").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        keyring.create_version(KekVersion::FIRST).await.unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert!(!tmp.exists());
        assert_eq!(
            LocalKeyring::open(&path)
                .unwrap()
                .versions()
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn version_numbers_are_never_reused_after_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        assert_eq!(
            keyring
                .create_version(KekVersion::FIRST)
                .await
                .unwrap()
                .version,
            v(2)
        );
        keyring.destroy_version(v(2)).await.unwrap();
        assert_eq!(
            keyring
                .create_version(KekVersion::FIRST)
                .await
                .unwrap()
                .version,
            v(3)
        );
        let reopened = LocalKeyring::open(&path).unwrap();
        assert_eq!(
            reopened
                .create_version(KekVersion::FIRST)
                .await
                .unwrap()
                .version,
            v(4)
        );
    }

    #[tokio::test]
    async fn destroy_refuses_the_last_version_and_unknown_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        assert!(matches!(
            keyring.destroy_version(v(1)).await,
            Err(CryptoError::LastKeyVersion(_))
        ));
        assert!(matches!(
            keyring.destroy_version(v(9)).await,
            Err(CryptoError::UnknownKeyVersion(_))
        ));
        assert_eq!(keyring.versions().await.unwrap().len(), 1);
        assert_eq!(
            LocalKeyring::open(&path)
                .unwrap()
                .versions()
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn mutations_keep_changes_made_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let server = LocalKeyring::init(&path).unwrap();
        let cli = LocalKeyring::open(&path).unwrap();
        assert_eq!(
            cli.create_version(KekVersion::FIRST).await.unwrap().version,
            v(2)
        );
        // The server's stale view must not overwrite v2 when it creates v3.
        assert_eq!(
            server
                .create_version(KekVersion::FIRST)
                .await
                .unwrap()
                .version,
            v(3)
        );
        let versions: Vec<_> = LocalKeyring::open(&path)
            .unwrap()
            .versions()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.version)
            .collect();
        assert_eq!(versions, [v(1), v(2), v(3)]);
        cli.reload_file().unwrap();
        assert_eq!(cli.versions().await.unwrap().len(), 3);
    }

    #[test]
    fn debug_shows_the_path_but_no_material() {
        let dir = tempfile::tempdir().unwrap();
        let path = keyring_path(&dir);
        let keyring = LocalKeyring::init(&path).unwrap();
        let debug = format!("{keyring:?}");
        assert!(debug.contains("keyring.json"));
        let text = fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(!debug.contains(json["mac_root_key"].as_str().unwrap()));
        assert!(!debug.contains(json["keys"][0]["key"].as_str().unwrap()));
    }
}
