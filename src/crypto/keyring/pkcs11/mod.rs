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

/// A logged-in token: the module, the slot and a pool of sessions.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    module: PathBuf,
    token_label: String,
    prefix: String,
    /// Keeps the login alive (PKCS#11 logs in an application, not a session, until its
    /// last session closes), and logs in again if the token forgot it. Never used for work.
    anchor: Mutex<Session>,
    pin: AuthPin,
    pool: Mutex<Pool>,
    /// Signalled when a session goes back to the pool.
    returned: Condvar,
    max_sessions: usize,
}

/// Sessions not in use, and how many exist.
struct Pool {
    idle: Vec<Session>,
    open: usize,
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

/// A loaded module and how many tokens of this process are open, or being opened, on it.
struct Module {
    ctx: Pkcs11,
    open_tokens: usize,
    opening: usize,
}

/// A token being opened on a module: counted so that the module is not re-initialised
/// under it; on success it becomes an open token.
struct Opening(PathBuf);

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(m) = MODULES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.0)
        {
            m.opening = m.opening.saturating_sub(1);
        }
    }
}

/// One context per module path per process: `C_Initialize` may run only once at a time.
static MODULES: LazyLock<Mutex<HashMap<PathBuf, Module>>> = LazyLock::new(Default::default);

fn initialize(module: &Path) -> Result<Pkcs11, CryptoError> {
    if !module.is_file() {
        return Err(config_error(
            "keyring.pkcs11.module",
            format!("{} is not a file", module.display()),
        ));
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        config_error(
            "keyring.pkcs11.module",
            format!("cannot load {} as a PKCS#11 module ({e})", module.display()),
        )
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(config_error(
                "keyring.pkcs11.module",
                format!(
                    "{} failed to initialise ({})",
                    module.display(),
                    rv_name(&e)
                ),
            ));
        }
    }
    Ok(ctx)
}

/// The process's context for `module`, loading and initialising it on first use, and the
/// mark of a token being opened on it.
fn context(module: &Path) -> Result<(Pkcs11, Opening), CryptoError> {
    let mut modules = MODULES.lock().unwrap_or_else(PoisonError::into_inner);
    if !modules.contains_key(module) {
        let ctx = initialize(module)?;
        modules.insert(
            module.to_owned(),
            Module {
                ctx,
                open_tokens: 0,
                opening: 0,
            },
        );
    }
    let m = modules
        .get_mut(module)
        .expect("inserted just above when missing");
    m.opening += 1;
    Ok((m.ctx.clone(), Opening(module.to_owned())))
}

/// Initialises `module` afresh, when the caller's is the only token of this process open
/// or being opened on it, so that it reads its tokens again (SoftHSM2 reads them once, at
/// initialisation, and skips one that another process is rewriting at that moment).
/// `None` when other tokens use it.
fn reinitialize(module: &Path) -> Option<Pkcs11> {
    let mut modules = MODULES.lock().unwrap_or_else(PoisonError::into_inner);
    let m = modules.get_mut(module)?;
    if m.open_tokens > 0 || m.opening > 1 {
        return None;
    }
    let _ = m.ctx.clone().finalize();
    let ctx = initialize(module).ok()?;
    m.ctx = ctx.clone();
    Some(ctx)
}

/// Counts a token opened on the module (its [`Opening`] mark goes when dropped).
fn token_opened(module: &Path) {
    if let Some(m) = MODULES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_mut(module)
    {
        m.open_tokens += 1;
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        if let Some(m) = MODULES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.module)
        {
            m.open_tokens = m.open_tokens.saturating_sub(1);
        }
    }
}

impl Token {
    /// Loads the module, finds the token by label and logs in. Blocking.
    fn open(settings: &Pkcs11Settings) -> Result<Self, CryptoError> {
        if settings.label_prefix.is_empty() || settings.label_prefix.contains('/') {
            return Err(config_error(
                "keyring.pkcs11.label_prefix",
                "must be non-empty and contain no '/'",
            ));
        }
        let (mut ctx, _opening) = context(&settings.module)?;
        // SoftHSM2 answers CKR_GENERAL_ERROR, or lists no token, while another process
        // rewrites the token's files (and reads its tokens only when initialised): the
        // listing is tried again for about a second, initialising the module afresh when
        // no other token of this process uses it.
        let mut attempt = 0;
        let (seen, found) = loop {
            attempt += 1;
            let retry = attempt < 10;
            let unreadable = match Self::find_slot(&ctx, &settings.token_label) {
                Err(e) if retry && rv_of(&e) == Some(RvError::GeneralError) => true,
                Ok((_, None)) if retry => true,
                other => break other.map_err(|e| device_error("listing tokens", &e))?,
            };
            if unreadable && let Some(fresh) = reinitialize(&settings.module) {
                ctx = fresh;
            }
            std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
        };
        let slot = found.ok_or_else(|| {
            config_error(
                "keyring.pkcs11.token_label",
                format!(
                    "no initialised token labelled {:?} in {} (tokens: {})",
                    settings.token_label,
                    settings.module.display(),
                    if seen.is_empty() {
                        "none".to_owned()
                    } else {
                        format!("{seen:?}")
                    }
                ),
            )
        })?;
        let anchor = ctx
            .open_rw_session(slot)
            .map_err(|e| device_error("opening a session", &e))?;
        let pin = AuthPin::from(settings.pin.expose().to_owned());
        let mut login = anchor.login(UserType::User, Some(&pin));
        // SoftHSM2 fails a login with CKR_GENERAL_ERROR while another process rewrites the
        // token's files.
        for attempt in 1..10 {
            if !matches!(&login, Err(e) if rv_of(e) == Some(RvError::GeneralError)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            login = anchor.login(UserType::User, Some(&pin));
        }
        match login {
            Ok(()) => {}
            // Another keyring in this process logged in to the same token already (the
            // token does not check the PIN again then).
            Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(P11Error::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLenRange), _)) => {
                return Err(config_error(
                    "keyring.pkcs11.pin",
                    format!("token {:?} refused the PIN ({rv:?})", settings.token_label),
                ));
            }
            Err(P11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(config_error(
                    "keyring.pkcs11.pin",
                    format!(
                        "token {:?} has locked its user PIN after too many wrong attempts",
                        settings.token_label
                    ),
                ));
            }
            Err(e) => return Err(device_error("logging in", &e)),
        }
        token_opened(&settings.module);
        Ok(Self {
            ctx,
            slot,
            module: settings.module.clone(),
            token_label: settings.token_label.clone(),
            prefix: settings.label_prefix.clone(),
            anchor: Mutex::new(anchor),
            pin,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
            max_sessions: settings.max_sessions.max(1),
        })
    }

    /// Logs in again through the anchor session after the token reported that nobody is
    /// logged in (a token reset, a device that dropped its state). Blocking.
    fn relogin(&self) -> Result<(), P11Error> {
        let mut anchor = self.anchor.lock().unwrap_or_else(PoisonError::into_inner);
        let mut login = anchor.login(UserType::User, Some(&self.pin));
        if matches!(
            login.as_ref().err().and_then(rv_of),
            Some(RvError::SessionHandleInvalid | RvError::SessionClosed)
        ) {
            // The anchor itself is gone (the library was re-initialised): open another.
            *anchor = self.ctx.open_rw_session(self.slot)?;
            login = anchor.login(UserType::User, Some(&self.pin));
        }
        match login {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The labels of the initialised tokens seen before the one labelled `label`, and its slot.
    fn find_slot(ctx: &Pkcs11, label: &str) -> Result<(Vec<String>, Option<Slot>), P11Error> {
        let mut seen = Vec::new();
        for slot in ctx.get_slots_with_initialized_token()? {
            let info = ctx.get_token_info(slot)?;
            let found = info.label().trim_end().to_owned();
            if found == label {
                return Ok((seen, Some(slot)));
            }
            seen.push(found);
        }
        Ok((seen, None))
    }

    fn kek_label(&self, version: KekVersion) -> String {
        format!("{}/kek/{version}", self.prefix)
    }

    fn mac_root_label(&self) -> String {
        format!("{}/mac-root", self.prefix)
    }

    /// Runs `op` on a session of its own (an idle one, or a new one while fewer than the
    /// maximum are open; otherwise waits for one). A session the token broke is closed; a
    /// lost login is restored and `op` tried once more. Blocking.
    fn with_session<T>(&self, op: impl Fn(&Session) -> Result<T, P11Error>) -> Result<T, P11Error> {
        let result = self.on_session(&op);
        if matches!(
            result.as_ref().err().and_then(rv_of),
            Some(RvError::UserNotLoggedIn)
        ) {
            self.relogin()?;
            return self.on_session(&op);
        }
        result
    }

    fn on_session<T>(&self, op: &impl Fn(&Session) -> Result<T, P11Error>) -> Result<T, P11Error> {
        let session = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(s) = pool.idle.pop() {
                    break Some(s);
                }
                if pool.open < self.max_sessions {
                    pool.open += 1;
                    break None;
                }
                pool = self
                    .returned
                    .wait(pool)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // Goes back to the pool however `op` ends, a panic included.
        let mut lease = Borrowed {
            token: self,
            session: None,
            reusable: false,
        };
        lease.session = Some(match session {
            Some(s) => s,
            None => self.ctx.open_rw_session(self.slot)?,
        });
        let result = op(lease.session.as_ref().expect("set just above"));
        lease.reusable = !matches!(
            result.as_ref().err().and_then(rv_of),
            Some(
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::DeviceError
            )
        );
        result
    }

    /// Returns a session to the pool, or (`None`) accounts for one that was closed.
    fn give_back(&self, session: Option<Session>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        match session {
            Some(s) => pool.idle.push(s),
            None => pool.open -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }

    /// Every KEK object under the prefix, by version. Blocking.
    ///
    /// Refuses a token where a version's label appears twice or a KEK could leave the
    /// device (not sensitive, or extractable): such a key is not one this vault made.
    fn find_keks(&self) -> Result<BTreeMap<KekVersion, KekObject>, CryptoError> {
        let label_start = format!("{}/kek/", self.prefix);
        let found = self
            .with_session(|s| {
                let handles = s.find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(true),
                ])?;
                let mut out = Vec::new();
                for handle in handles {
                    let attrs = s.get_attributes(
                        handle,
                        &[
                            AttributeType::Label,
                            AttributeType::Id,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                        ],
                    )?;
                    let (mut label, mut id, mut sealed) = (None, None, (false, true));
                    for a in attrs {
                        match a {
                            Attribute::Label(l) => label = Some(l),
                            Attribute::Id(i) => id = Some(i),
                            Attribute::Sensitive(v) => sealed.0 = v,
                            Attribute::Extractable(v) => sealed.1 = v,
                            _ => {}
                        }
                    }
                    out.push((handle, label, id, sealed));
                }
                Ok(out)
            })
            .map_err(|e| device_error("finding key objects", &e))?;
        let mut keks = BTreeMap::new();
        for (handle, label, id, (sensitive, extractable)) in found {
            let Some(version) = label
                .as_deref()
                .and_then(|l| std::str::from_utf8(l).ok())
                .and_then(|l| l.strip_prefix(&label_start))
                .and_then(|v| v.parse::<KekVersion>().ok())
            else {
                continue;
            };
            let label = self.kek_label(version);
            if !sensitive || extractable {
                return Err(CryptoError::Keyring(format!(
                    "pkcs11: the key labelled {label:?} in token {:?} is extractable or not \
                     sensitive, so it is not one this vault made; remove it",
                    self.token_label
                )));
            }
            let created_at = id.as_deref().and_then(parse_id).map_or(0, |(_, c)| c);
            if keks
                .insert(version, KekObject { handle, created_at })
                .is_some()
            {
                return Err(CryptoError::Keyring(format!(
                    "pkcs11: token {:?} holds more than one key labelled {label:?}; keep the one \
                     the key registry's key-check value opens and remove the others",
                    self.token_label
                )));
            }
        }
        Ok(keks)
    }

    /// The object with exactly this label (`None`: there is none). Blocking.
    fn find_one(&self, label: &str) -> Result<Vec<ObjectHandle>, CryptoError> {
        self.with_session(|s| {
            s.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
        })
        .map_err(|e| device_error("finding a key object", &e))
    }

    /// Generates the MAC root key object. Blocking.
    fn generate_mac_root(&self) -> Result<(), CryptoError> {
        let label = self.mac_root_label();
        let mut id = [0u8; 16];
        crate::crypto::rng()
            .fill(&mut id)
            .map_err(|_| CryptoError::Random)?;
        self.with_session(|s| {
            s.generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Verify(false),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.to_vec()),
                ],
            )
        })
        .map(drop)
        .map_err(|e| device_error("generating the MAC root key", &e))
    }

    /// Generates the AES KEK object of `version`. Blocking.
    fn generate_kek(
        &self,
        version: KekVersion,
        created_at: u64,
    ) -> Result<ObjectHandle, CryptoError> {
        let label = self.kek_label(version);
        let id = make_id(version, created_at)?;
        self.with_session(|s| {
            s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                ],
            )
        })
        .map_err(|e| device_error("generating a key", &e))
    }

    /// The per-purpose MAC subkeys, computed by the device from the MAC root. Blocking.
    fn derive_mac_keys(&self) -> Result<MacKeys, CryptoError> {
        let label = self.mac_root_label();
        let roots = self.find_one(&label)?;
        let root = match roots.as_slice() {
            [one] => *one,
            [] => {
                return Err(config_error(
                    "keyring.pkcs11.label_prefix",
                    format!(
                        "token {:?} holds no key labelled {label:?}; create the vault's keys \
                         with `tokenvault keys init` (or check the prefix)",
                        self.token_label
                    ),
                ));
            }
            _ => {
                return Err(CryptoError::Keyring(format!(
                    "pkcs11: token {:?} holds {} keys labelled {label:?}; remove the extra ones",
                    self.token_label,
                    roots.len()
                )));
            }
        };
        let mut subkeys = Vec::with_capacity(MacPurpose::ALL.len());
        for purpose in MacPurpose::ALL {
            let input = format!("{MAC_DERIVATION}{}", purpose.label());
            let tag = Zeroizing::new(
                self.with_session(|s| s.sign(&Mechanism::Sha256Hmac, root, input.as_bytes()))
                    .map_err(|e| device_error("deriving MAC keys", &e))?,
            );
            subkeys.push(
                Key256::from_slice(&tag)
                    .ok_or(CryptoError::Format("HMAC-SHA256 output is not 32 bytes"))?,
            );
        }
        let subkeys: [Key256; MacPurpose::ALL.len()] = subkeys
            .try_into()
            .map_err(|_| CryptoError::Format("one MAC subkey per purpose"))?;
        Ok(MacKeys::from_subkeys(subkeys))
    }
}

/// A session taken from a token's pool, given back when dropped: to the pool when it is
/// still good, else closed and no longer counted.
struct Borrowed<'a> {
    token: &'a Token,
    session: Option<Session>,
    reusable: bool,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let session = self.session.take().filter(|_| self.reusable);
        self.token.give_back(session);
    }
}

fn make_id(version: KekVersion, created_at: u64) -> Result<Vec<u8>, CryptoError> {
    let mut id = Vec::with_capacity(24);
    id.extend_from_slice(ID_MAGIC);
    id.extend_from_slice(&version.get().to_be_bytes());
    id.extend_from_slice(&created_at.to_be_bytes());
    let mut nonce = [0u8; 8];
    crate::crypto::rng()
        .fill(&mut nonce)
        .map_err(|_| CryptoError::Random)?;
    id.extend_from_slice(&nonce);
    Ok(id)
}

fn parse_id(id: &[u8]) -> Option<(u32, u64)> {
    if id.len() != 24 || &id[..4] != ID_MAGIC {
        return None;
    }
    let version = u32::from_be_bytes(id[4..8].try_into().ok()?);
    let created = u64::from_be_bytes(id[8..16].try_into().ok()?);
    Some((version, created))
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
