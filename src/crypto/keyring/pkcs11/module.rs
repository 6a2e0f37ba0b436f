//! Loading a PKCS#11 library: `C_Initialize` once per module path per
//! process, never finalized, shared by every keyring the process opens.

use super::*;

/// A loaded module and how many tokens of this process are open, or being opened, on it.
pub(super) struct Module {
    pub(super) ctx: Pkcs11,
    pub(super) open_tokens: usize,
    pub(super) opening: usize,
}

/// A token being opened on a module: counted so that the module is not re-initialised
/// under it; on success it becomes an open token.
pub(super) struct Opening(PathBuf);

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
pub(super) static MODULES: LazyLock<Mutex<HashMap<PathBuf, Module>>> =
    LazyLock::new(Default::default);

pub(super) fn initialize(module: &Path) -> Result<Pkcs11, CryptoError> {
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
pub(super) fn context(module: &Path) -> Result<(Pkcs11, Opening), CryptoError> {
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
pub(super) fn reinitialize(module: &Path) -> Option<Pkcs11> {
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
pub(super) fn token_opened(module: &Path) {
    if let Some(m) = MODULES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_mut(module)
    {
        m.open_tokens += 1;
    }
}
