//! One logged-in token: a pool of sessions, each used by one thread at a
//! time, and the device operations the keyring makes on them (find, create,
//! destroy, wrap, unwrap, sign).

use super::*;

/// A logged-in token: the module, the slot and a pool of sessions.
pub(super) struct Token {
    pub(super) ctx: Pkcs11,
    pub(super) slot: Slot,
    pub(super) module: PathBuf,
    pub(super) token_label: String,
    pub(super) prefix: String,
    /// Keeps the login alive (PKCS#11 logs in an application, not a session, until its
    /// last session closes), and logs in again if the token forgot it. Never used for work.
    pub(super) anchor: Mutex<Session>,
    pub(super) pin: AuthPin,
    pub(super) pool: Mutex<Pool>,
    /// Signalled when a session goes back to the pool.
    pub(super) returned: Condvar,
    pub(super) max_sessions: usize,
}

/// Sessions not in use, and how many exist.
pub(super) struct Pool {
    pub(super) idle: Vec<Session>,
    pub(super) open: usize,
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
    pub(super) fn open(settings: &Pkcs11Settings) -> Result<Self, CryptoError> {
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
    pub(super) fn relogin(&self) -> Result<(), P11Error> {
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
    pub(super) fn find_slot(
        ctx: &Pkcs11,
        label: &str,
    ) -> Result<(Vec<String>, Option<Slot>), P11Error> {
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

    pub(super) fn kek_label(&self, version: KekVersion) -> String {
        format!("{}/kek/{version}", self.prefix)
    }

    pub(super) fn mac_root_label(&self) -> String {
        format!("{}/mac-root", self.prefix)
    }

    /// Runs `op` on a session of its own (an idle one, or a new one while fewer than the
    /// maximum are open; otherwise waits for one). A session the token broke is closed; a
    /// lost login is restored and `op` tried once more. Blocking.
    pub(super) fn with_session<T>(
        &self,
        op: impl Fn(&Session) -> Result<T, P11Error>,
    ) -> Result<T, P11Error> {
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

    pub(super) fn on_session<T>(
        &self,
        op: &impl Fn(&Session) -> Result<T, P11Error>,
    ) -> Result<T, P11Error> {
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
    pub(super) fn give_back(&self, session: Option<Session>) {
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
    pub(super) fn find_keks(&self) -> Result<BTreeMap<KekVersion, KekObject>, CryptoError> {
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
    pub(super) fn find_one(&self, label: &str) -> Result<Vec<ObjectHandle>, CryptoError> {
        self.with_session(|s| {
            s.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
        })
        .map_err(|e| device_error("finding a key object", &e))
    }

    /// Generates the MAC root key object. Blocking.
    pub(super) fn generate_mac_root(&self) -> Result<(), CryptoError> {
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
    pub(super) fn generate_kek(
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
    pub(super) fn derive_mac_keys(&self) -> Result<MacKeys, CryptoError> {
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
pub(super) struct Borrowed<'a> {
    pub(super) token: &'a Token,
    pub(super) session: Option<Session>,
    pub(super) reusable: bool,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let session = self.session.take().filter(|_| self.reusable);
        self.token.give_back(session);
    }
}

pub(super) fn make_id(version: KekVersion, created_at: u64) -> Result<Vec<u8>, CryptoError> {
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

pub(super) fn parse_id(id: &[u8]) -> Option<(u32, u64)> {
    if id.len() != 24 || &id[..4] != ID_MAGIC {
        return None;
    }
    let version = u32::from_be_bytes(id[4..8].try_into().ok()?);
    let created = u64::from_be_bytes(id[8..16].try_into().ok()?);
    Some((version, created))
}
