//! The background sync with the fleet's key registry: registering the
//! keyring's versions, checking the root keys, learning which versions this
//! replica holds, announcing them in a heartbeat, erasing destroyed
//! material, and taking over a rotation whose owner stopped.
//!
//! Invariants: see the parent module; in particular a replica that meets a
//! version it does not hold re-reads its provider before it fails, and while
//! the registry needs a version this replica cannot find its health is
//! NOT_SERVING, naming the version.

use super::*;

impl KeyManager {
    /// Start-up: checks the root keys against their key-check values, registers
    /// every version the keyring holds, checks that every version the registry
    /// still uses is in the keyring and is the same key, and records what this
    /// replica holds.
    pub async fn sync(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        self.check_root_keys().await?;
        let material = i.keyring.versions().await?;
        let known = i.store.kek_list().await?;
        for m in &material {
            match known.iter().find(|k| k.version == m.version) {
                None => {
                    self.register(m.version, m.created_at, &Actor::system())
                        .await?;
                }
                Some(k) if k.state == KeyState::Destroyed => {
                    tracing::warn!(version = %k.version, provider = i.keyring.kind(),
                        "the keyring still holds a key version the registry records as destroyed; \
                         remove it from this replica's keyring");
                }
                Some(_) => {}
            }
        }
        let known = i.store.kek_list().await?;
        for k in &known {
            if !matches!(k.state, KeyState::Primary | KeyState::Active) {
                continue;
            }
            let present = material.iter().any(|m| m.version == k.version);
            if !present && !needed(k) {
                tracing::warn!(version = %k.version, provider = i.keyring.kind(), remedy = %self.remedy(k.version),
                    "this replica does not hold a key version registered for the next rotation; \
                     that rotation will be refused until it does");
                continue;
            }
            if !present {
                return Err(VaultError::precondition(format!(
                    "key version {} is {} in the database but missing from the {} keyring ({}); \
                     restore the keyring (or its backup) before starting",
                    k.version,
                    k.state,
                    i.keyring.kind(),
                    self.remedy(k.version)
                )));
            }
            if self.key_matches(k).await? {
                self.state().verified.insert(k.version);
            } else {
                return Err(VaultError::precondition(format!(
                    "key version {} in the {} keyring is not the key this database was written with; \
                     restore the matching keyring before starting",
                    k.version,
                    i.keyring.kind()
                )));
            }
        }
        if !known.iter().any(|k| k.state == KeyState::Primary) {
            return Err(VaultError::precondition(
                "no primary key version: the keyring holds no usable key",
            ));
        }
        self.heartbeat(true).await?;
        Ok(())
    }

    /// What the operator must do for this replica to hold `version`.
    pub(super) fn remedy(&self, version: KekVersion) -> String {
        match self.inner.keyring.kind() {
            "env" => format!(
                "add {version}'s entry to TOKENVAULT_KEYRING__KEYS on this replica and restart it"
            ),
            "pkcs11" => format!(
                "the HSM token holds no object for {version}: check keyring.pkcs11.token_label and \
                 keyring.pkcs11.label_prefix on this replica"
            ),
            _ => format!(
                "the keyring file has no {version}: point every replica at the same keyring file \
                 (keyring.path), or restore it from the backup"
            ),
        }
    }

    /// Compares the keyring's MAC root and checkpoint signing key with the
    /// key-check values in the database; records them on first use, after
    /// checking them against the audit log already written.
    pub(super) async fn check_root_keys(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        let checks = [
            (
                MAC_ROOT_CHECK,
                "MAC root key",
                i.keyring
                    .mac(MacPurpose::KeyCheck, MAC_ROOT_CHECK_INPUT)
                    .to_vec(),
            ),
            (
                SIGNING_KEY_CHECK,
                "audit checkpoint signing key",
                CheckpointSigner::new(i.keyring.as_ref(), 1).public_key(),
            ),
        ];
        let refuse = |what: &str, how: &str| {
            VaultError::precondition(format!(
                "the {} keyring's {what} is not the one this database was written with ({how}); \
                 restore the matching keyring before starting",
                i.keyring.kind()
            ))
        };
        for (name, what, value) in checks {
            let recorded = match i.store.root_key_check_get(name).await? {
                Some(v) => v,
                None => {
                    // First start with key-check values: the log written so far
                    // is the evidence of which key wrote it.
                    if !self.root_key_fits_log(name, &value).await? {
                        return Err(refuse(
                            what,
                            "the audit log already written does not verify under it",
                        ));
                    }
                    let v = i
                        .store
                        .root_key_check_put(name, &value, Timestamp::now())
                        .await?;
                    tracing::info!(check = name, "recorded a root key's key-check value");
                    v
                }
            };
            if recorded != value {
                return Err(refuse(what, "its key-check value differs"));
            }
        }
        Ok(())
    }

    pub(super) async fn root_key_fits_log(
        &self,
        name: &str,
        value: &[u8],
    ) -> Result<bool, VaultError> {
        let store = &self.inner.store;
        // Chain 0 always exists, and every other chain's writer derives its
        // keys from the same root: chain 0's newest entry and checkpoint
        // answer for the log.
        if name == SIGNING_KEY_CHECK {
            return Ok(store
                .audit_checkpoint_last(0)
                .await?
                .is_none_or(|c| c.public_key == value));
        }
        let (head, _) = store.audit_head().await?;
        if head == 0 {
            return Ok(true);
        }
        let last = store.audit_range(head, head, 1).await?;
        Ok(last.first().is_none_or(|row| {
            self.inner
                .keyring
                .mac_verify(MacPurpose::AuditChain, &row.entry_hash, &row.mac)
        }))
    }

    /// Whether this keyring's `record.version` is the key the registry records: its
    /// key-check value opens. Errors are not answers (the version is not held, a device or
    /// database failed).
    pub(super) async fn key_matches(&self, record: &KekRecord) -> Result<bool, VaultError> {
        let aad = key_check_aad(record.version);
        let open = || {
            self.inner
                .keyring
                .unwrap(record.version, &record.key_check, &aad)
        };
        // A mismatch is recorded only when it is seen twice: a device may fail once.
        match open().await {
            Ok(_) => Ok(true),
            Err(CryptoError::Decrypt) => match open().await {
                Ok(_) => Ok(true),
                Err(CryptoError::Decrypt) => Ok(false),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn mismatch(&self, version: KekVersion) -> VaultError {
        VaultError::precondition(format!(
            "key version {version} in this replica's {} keyring is not the key the key registry \
             records under that number (its key-check value does not open); it is not used: {}",
            self.inner.keyring.kind(),
            self.remedy(version)
        ))
    }

    /// The versions this replica holds and may use: in its keyring and, where the registry
    /// knows the number, the same key the registry records.
    pub(super) async fn held(
        &self,
        registry: &[KekRecord],
    ) -> Result<BTreeSet<KekVersion>, VaultError> {
        let mut held = BTreeSet::new();
        for m in self.inner.keyring.versions().await? {
            if !registry.iter().any(|k| k.version == m.version) {
                held.insert(m.version);
                continue;
            }
            match self.check_version(m.version).await {
                Ok(()) => {
                    held.insert(m.version);
                }
                Err(VaultError::FailedPrecondition(why)) => {
                    if !self.state().verified.contains(&m.version) {
                        tracing::error!(version = %m.version, "{why}");
                    }
                }
                // Not answerable now (a device or database hiccup): what this replica last
                // said it holds stands.
                Err(e) => {
                    tracing::warn!(version = %m.version, error = %e, "could not check a key version");
                    let said = self
                        .state()
                        .written
                        .as_ref()
                        .is_some_and(|(v, _)| v.contains(&m.version));
                    if said {
                        held.insert(m.version);
                    }
                }
            }
        }
        Ok(held)
    }

    /// Records a version the keyring holds in the registry; audited when new. A
    /// number the registry knows already must be the same key.
    pub(super) async fn register(
        &self,
        version: KekVersion,
        created_at: std::time::SystemTime,
        actor: &Actor,
    ) -> Result<(), VaultError> {
        let i = &self.inner;
        let known = i.store.kek_list().await?;
        if let Some(record) = known.iter().find(|k| k.version == version) {
            return if self.key_matches(record).await? {
                Ok(())
            } else {
                self.state().mismatched.insert(version);
                Err(self.mismatch(version))
            };
        }
        let check = i
            .keyring
            .wrap(
                version,
                &Key256::from_bytes([0; 32]),
                &key_check_aad(version),
            )
            .await?;
        i.audit
            .record(
                actor,
                "keys.register",
                &format!("kek:{version}"),
                Outcome::Ok,
                format!("provider {} on {}", i.keyring.kind(), i.replica.id),
            )
            .await?;
        i.store
            .kek_register(&NewKek {
                version,
                created_at: Timestamp::from_system(created_at),
                key_check: &check,
                provider: i.keyring.kind(),
                created_by: &actor.identity,
            })
            .await?;
        // Two replicas registering the same number at once: one row wins.
        let registry = i.store.kek_list().await?;
        match registry.iter().find(|k| k.version == version) {
            Some(record) if record.key_check == check => {
                self.state().verified.insert(version);
                tracing::info!(%version, provider = i.keyring.kind(), "registered key version");
                Ok(())
            }
            Some(record) if self.key_matches(record).await? => Ok(()),
            _ => {
                self.state().mismatched.insert(version);
                Err(self.mismatch(version))
            }
        }
    }

    /// Starts the background sync: compares the registry with the keyring every
    /// `keyring.sync_interval_ms`, re-reads the provider when they differ,
    /// writes this replica's row, and takes over a rotation whose replica
    /// stopped.
    ///
    /// The task holds the manager only during a pass: it ends when the vault
    /// stops or is dropped.
    pub fn start(&self) {
        let weak = Arc::downgrade(&self.inner);
        let period = self.inner.sync_interval;
        let mut stop = self.inner.stop.subscribe();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                let this = Self { inner };
                if let Err(e) = this.sync_pass().await {
                    tracing::warn!(error = %e, "key registry sync failed");
                }
            }
        });
        self.state().task = Some(task);
    }

    /// One background pass (see [`KeyManager::start`]).
    pub(super) async fn sync_pass(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        let registry = i.store.kek_list().await?;
        let held = self.held(&registry).await?;
        // Liveness first: a pass that fails further on must not make this replica
        // look stopped to the others.
        self.write_heartbeat(&held, false).await?;
        let material: BTreeSet<KekVersion> = i
            .keyring
            .versions()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect();
        // Re-read the provider when it and the registry disagree, and once per
        // heartbeat anyway, so a keyring that lost a version is noticed before
        // a restart would be refused.
        let stale = self
            .state()
            .reloaded
            .is_none_or(|at| at.elapsed() >= i.heartbeat);
        let differs = registry.iter().any(|k| match k.state {
            KeyState::Destroyed => material.contains(&k.version),
            KeyState::Retired => false,
            KeyState::Primary | KeyState::Active => !material.contains(&k.version),
        });
        let held = if stale || differs {
            self.reload_provider().await?;
            self.held(&registry).await?
        } else {
            held
        };
        self.erase_destroyed(&registry, &held).await;
        self.note_missing(&registry, &held);
        let usable: BTreeSet<KekVersion> = registry
            .iter()
            .filter(|k| matches!(k.state, KeyState::Primary | KeyState::Active))
            .map(|k| k.version)
            .collect();
        i.deks.keep_only(&usable);
        self.write_heartbeat(&held, false).await?;
        self.take_over_rotation().await
    }

    /// Re-reads the provider, at most once per sync interval (concurrent
    /// callers wait for the one in progress). What was checked against the
    /// registry is checked again afterwards.
    pub(super) async fn reload_provider(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        let _one = i.reload.lock().await;
        let recent = self
            .state()
            .reloaded
            .is_some_and(|at| at.elapsed() < i.sync_interval);
        if recent {
            return Ok(());
        }
        let result = i.keyring.reload().await;
        let mut state = self.state();
        state.reloaded = Some(Instant::now());
        if result.is_ok() {
            state.verified.clear();
            state.mismatched.clear();
        }
        drop(state);
        Ok(result?)
    }

    /// A local keyring file of this replica's own erases its copy of a version
    /// the registry records as destroyed; any other keyring is told to (an HSM
    /// or environment another deployment may share is never changed from here).
    pub(super) async fn erase_destroyed(
        &self,
        registry: &[KekRecord],
        held: &BTreeSet<KekVersion>,
    ) {
        let i = &self.inner;
        let stale: BTreeSet<KekVersion> = registry
            .iter()
            .filter(|k| k.state == KeyState::Destroyed && held.contains(&k.version))
            .map(|k| k.version)
            .collect();
        for &version in &stale {
            if i.keyring.kind() == "local" {
                match i.keyring.destroy_version(version).await {
                    Ok(()) | Err(CryptoError::UnknownKeyVersion(_)) => {
                        tracing::info!(%version, "erased a destroyed key version from this replica's keyring");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%version, error = %e, "could not erase a destroyed key version");
                    }
                }
            }
            if !self.state().stale.contains(&version) {
                tracing::warn!(%version, provider = i.keyring.kind(),
                    "this replica's keyring holds a key version the registry records as destroyed; \
                     remove it (env: from TOKENVAULT_KEYRING__KEYS; pkcs11: the object \
                     <label_prefix>/kek/vN) and restart");
            }
        }
        self.state().stale = stale;
    }

    /// Records which versions the registry needs that this replica lacks,
    /// logging what the operator must do when that changes.
    pub(super) fn note_missing(&self, registry: &[KekRecord], held: &BTreeSet<KekVersion>) {
        let missing: BTreeSet<KekVersion> = registry
            .iter()
            .filter(|k| needed(k))
            .filter(|k| !held.contains(&k.version))
            .map(|k| k.version)
            .collect();
        let changed = self.state().missing != missing;
        if changed {
            for &v in &missing {
                tracing::error!(version = %v, provider = self.inner.keyring.kind(),
                    remedy = %self.remedy(v),
                    "the key registry uses a version this replica does not hold (or holds another key under its number); it is not serving");
            }
            if missing.is_empty() {
                tracing::info!("this replica holds every key version the registry uses again");
            }
        }
        self.state().missing = missing;
    }

    /// Writes this replica's row when what it holds changed, when `force`d,
    /// or once per heartbeat. The database stamps it with its own clock.
    pub(super) async fn heartbeat(&self, force: bool) -> Result<(), VaultError> {
        let registry = self.inner.store.kek_list().await?;
        let held = self.held(&registry).await?;
        self.write_heartbeat(&held, force).await
    }

    /// As [`KeyManager::heartbeat`], with what this replica holds already known.
    pub(super) async fn write_heartbeat(
        &self,
        held: &BTreeSet<KekVersion>,
        force: bool,
    ) -> Result<(), VaultError> {
        let i = &self.inner;
        let held: Vec<KekVersion> = held.iter().copied().collect();
        let due = force
            || match &self.state().written {
                None => true,
                Some((v, at)) => *v != held || at.elapsed() >= i.heartbeat,
            };
        if !due {
            return Ok(());
        }
        i.store
            .replica_upsert(&ReplicaRecord {
                replica_id: i.replica.id.clone(),
                host: i.replica.host.clone(),
                pid: i.replica.pid,
                instance: i.replica.instance.clone(),
                provider: i.keyring.kind().to_owned(),
                versions: held.clone(),
                heartbeat: i.heartbeat,
                started_at: i.replica.started_at,
                seen_at: Timestamp::now(),
            })
            .await?;
        self.state().written = Some((held, Instant::now()));
        Ok(())
    }

    /// Takes over a running rotation whose replica is no longer live (or, in
    /// this kernel and PID namespace, whose process is gone), if this replica
    /// holds its target. A run this replica owns is its own worker's.
    pub(super) async fn take_over_rotation(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        let Some(run) = i.store.rotation_running().await? else {
            return Ok(());
        };
        if self.state().worker.as_deref() == Some(run.run_id.as_str()) {
            return Ok(());
        }
        if run.owner == i.replica.id {
            // This replica's own run, left without a worker (its start or its end could not
            // be recorded): carry on with it.
            tracing::info!(run = %run.run_id, "resuming this replica's key rotation");
            self.spawn_worker(run);
            return Ok(());
        }
        let now = i.store.clock().await?;
        let replicas = i.store.replica_list().await?;
        let owner_alive = replicas
            .iter()
            .find(|r| r.replica_id == run.owner)
            .is_some_and(|r| r.is_live(now) && !i.replica.saw_exit_of(r));
        if owner_alive {
            return Ok(());
        }
        let registry = i.store.kek_list().await?;
        if !self.held(&registry).await?.contains(&run.target_version) {
            return Ok(());
        }
        if !i
            .store
            .rotation_claim(&run.run_id, &run.owner, &i.replica.id)
            .await?
        {
            return Ok(());
        }
        i.audit
            .record(
                &Actor::system(),
                "keys.rotate.resume",
                &run.run_id,
                Outcome::Ok,
                format!(
                    "{} took over from {}",
                    i.replica.id,
                    if run.owner.is_empty() {
                        "an earlier start"
                    } else {
                        &run.owner
                    }
                ),
            )
            .await?;
        tracing::info!(run = %run.run_id, done = run.rewrapped, total = run.total, "resuming key rotation");
        self.spawn_worker(RotationRun {
            owner: i.replica.id.clone(),
            ..run
        });
        Ok(())
    }
}
