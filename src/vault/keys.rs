//! Key management: registering the keyring's KEK versions, choosing the
//! primary, online rotation (rewrapping every DEK in batches, resumable after
//! a crash), retirement and destruction, and the status a reviewer reads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::{Actor, AuditLog, Outcome};
use crate::config::KeyringConfig;
use crate::crypto::{
    CryptoError, DekContext, KekVersion, Key256, KeyringProvider, WrappedDek, unwrap_dek, wrap_dek,
};
use crate::domain::{KeyState, Timestamp, VaultError};
use crate::store::{KekRecord, Rewrap, RotationRun, Store};

/// One KEK version as `KeyStatus` reports it.
#[derive(Clone, Debug)]
pub struct VersionStatus {
    /// Lifecycle record.
    pub record: KekRecord,
    /// DEKs wrapped by it.
    pub dek_count: i64,
}

/// What `KeyStatus` and `keys report` show.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    /// Provider kind (`local`, `env`).
    pub provider: &'static str,
    /// The primary version.
    pub primary: KekVersion,
    /// Every version, ascending.
    pub versions: Vec<VersionStatus>,
    /// The running rotation, else the latest one.
    pub rotation: Option<RotationRun>,
    /// Every rotation, newest first.
    pub rotations: Vec<RotationRun>,
    /// The oldest version referenced by a DEK (the primary when none is).
    pub oldest_in_use: KekVersion,
    /// Its age.
    pub oldest_in_use_age: Duration,
    /// The policy.
    pub max_kek_age_days: u32,
    /// Whether the oldest version in use is older than the policy allows.
    pub rotation_overdue: bool,
}

/// Associated data of a version's key-check value.
fn key_check_aad(version: KekVersion) -> Vec<u8> {
    format!("tokenvault/key-check/{version}").into_bytes()
}

struct Inner {
    store: Arc<dyn Store>,
    keyring: Arc<dyn KeyringProvider>,
    audit: AuditLog,
    batch_size: i64,
    batch_pause: Duration,
    max_age_days: u32,
    stop: watch::Sender<bool>,
}

/// The key-management component. Cheap to clone.
#[derive(Clone)]
pub struct KeyManager {
    inner: Arc<Inner>,
}

impl KeyManager {
    /// Creates the manager; call [`KeyManager::sync`] before use.
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<dyn KeyringProvider>,
        audit: AuditLog,
        config: &KeyringConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                keyring,
                audit,
                batch_size: i64::from(config.rotation_batch_size),
                batch_pause: Duration::from_millis(config.rotation_batch_pause_ms),
                max_age_days: config.max_kek_age_days,
                stop: watch::Sender::new(false),
            }),
        }
    }

    /// Registers every version the keyring holds and checks that every version
    /// the database still uses is in the keyring. The first version becomes
    /// primary.
    pub async fn sync(&self) -> Result<(), VaultError> {
        let i = &self.inner;
        let material = i.keyring.versions().await?;
        let known = i.store.kek_list().await?;
        for m in &material {
            if !known.iter().any(|k| k.version == m.version) {
                self.register(m.version, m.created_at).await?;
            }
        }
        let known = i.store.kek_list().await?;
        for k in &known {
            if !matches!(k.state, KeyState::Primary | KeyState::Active) {
                continue;
            }
            let present = material.iter().any(|m| m.version == k.version);
            if !present {
                return Err(VaultError::precondition(format!(
                    "key version {} is {} in the database but missing from the {} keyring; \
                     restore the keyring (or its backup) before starting",
                    k.version,
                    k.state,
                    i.keyring.kind()
                )));
            }
            if i.keyring
                .unwrap(k.version, &k.key_check, &key_check_aad(k.version))
                .await
                .is_err()
            {
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
        Ok(())
    }

    async fn register(
        &self,
        version: KekVersion,
        created_at: std::time::SystemTime,
    ) -> Result<(), VaultError> {
        let i = &self.inner;
        let check = i
            .keyring
            .wrap(
                version,
                &Key256::from_bytes([0; 32]),
                &key_check_aad(version),
            )
            .await?;
        i.store
            .kek_register(version, Timestamp::from_system(created_at), &check)
            .await?;
        tracing::info!(%version, provider = i.keyring.kind(), "registered key version");
        Ok(())
    }

    /// The primary version.
    pub async fn primary(&self) -> Result<KekVersion, VaultError> {
        self.inner
            .store
            .kek_list()
            .await?
            .into_iter()
            .find(|k| k.state == KeyState::Primary)
            .map(|k| k.version)
            .ok_or_else(|| VaultError::precondition("no primary key version"))
    }

    /// Checks that the primary version can wrap and unwrap (health).
    pub async fn check_primary(&self) -> Result<(), VaultError> {
        let version = self.primary().await?;
        let probe = Key256::from_bytes([0x5a; 32]);
        let aad = b"tokenvault/health-probe";
        let wrapped = self.inner.keyring.wrap(version, &probe, aad).await?;
        self.inner.keyring.unwrap(version, &wrapped, aad).await?;
        Ok(())
    }

    /// Creates a fresh DEK wrapped by the primary version.
    pub async fn new_dek(&self, ctx: &DekContext<'_>) -> Result<(Key256, WrappedDek), VaultError> {
        let version = self.primary().await?;
        let dek = Key256::generate(crate::crypto::rng())?;
        let wrapped = wrap_dek(self.inner.keyring.as_ref(), version, &dek, ctx).await?;
        Ok((dek, wrapped))
    }

    /// Opens a stored DEK.
    pub async fn open_dek(
        &self,
        wrapped: &WrappedDek,
        ctx: &DekContext<'_>,
    ) -> Result<Key256, VaultError> {
        Ok(unwrap_dek(self.inner.keyring.as_ref(), wrapped, ctx).await?)
    }

    /// The status a reviewer reads.
    pub async fn status(&self) -> Result<KeyStatus, VaultError> {
        let i = &self.inner;
        let records = i.store.kek_list().await?;
        let counts = i.store.dek_count_by_version().await?;
        let rotations = i.store.rotation_list().await?;
        let primary = records
            .iter()
            .find(|k| k.state == KeyState::Primary)
            .ok_or_else(|| VaultError::precondition("no primary key version"))?;
        let versions: Vec<VersionStatus> = records
            .iter()
            .map(|r| VersionStatus {
                record: r.clone(),
                dek_count: counts
                    .iter()
                    .find(|(v, _)| *v == r.version)
                    .map_or(0, |(_, n)| *n),
            })
            .collect();
        let oldest = versions
            .iter()
            .find(|v| v.dek_count > 0)
            .map_or(&primary.clone(), |v| &v.record)
            .clone();
        let age = Timestamp::now().since(oldest.created_at);
        let max_age = Duration::from_secs(u64::from(i.max_age_days) * 86_400);
        let rotation = rotations
            .iter()
            .find(|r| r.state == "running")
            .or_else(|| rotations.first())
            .cloned();
        Ok(KeyStatus {
            provider: i.keyring.kind(),
            primary: primary.version,
            versions,
            rotation,
            rotations,
            oldest_in_use: oldest.version,
            oldest_in_use_age: age,
            max_kek_age_days: i.max_age_days,
            rotation_overdue: age > max_age,
        })
    }

    /// Starts an online rotation: a new KEK version becomes primary and every
    /// DEK is rewrapped in the background. Returns the run; while one is
    /// running, returns that one instead of starting another.
    pub async fn rotate(&self, actor: &Actor) -> Result<RotationRun, VaultError> {
        let i = &self.inner;
        if let Some(run) = i.store.rotation_running().await? {
            // One rotation at a time: asking again reports the running one.
            return Ok(run);
        }
        let current = self.primary().await?;
        i.audit
            .record(
                actor,
                "keys.rotate.start",
                &format!("kek:{current}"),
                Outcome::Ok,
                format!("from {current}"),
            )
            .await?;
        let target = match i.keyring.create_version().await {
            Ok(info) => {
                self.register(info.version, info.created_at).await?;
                info.version
            }
            Err(CryptoError::Unsupported(_)) => {
                // Providers managed outside the vault (env, KMS): rotate to the
                // newest version the operator has added.
                self.sync().await?;
                let newest = i
                    .keyring
                    .versions()
                    .await?
                    .into_iter()
                    .map(|m| m.version)
                    .max();
                match newest {
                    Some(v) if v > current => v,
                    _ => {
                        return Err(VaultError::precondition(format!(
                            "the {} keyring holds no version newer than {current}; add one and restart",
                            i.keyring.kind()
                        )));
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        let now = Timestamp::now();
        i.store.kek_promote(target, now).await?;
        let total = i
            .store
            .dek_count_by_version()
            .await?
            .iter()
            .filter(|(v, _)| *v != target)
            .map(|(_, n)| n)
            .sum();
        let run = RotationRun {
            run_id: format!("rot_{}", uuid::Uuid::new_v4()),
            target_version: target,
            started_at: now,
            finished_at: None,
            total,
            rewrapped: 0,
            state: "running".to_owned(),
            actor: actor.identity.clone(),
            last_error: None,
        };
        i.store.rotation_insert(&run).await?;
        tracing::info!(run = %run.run_id, from = %current, to = %target, total, "key rotation started");
        self.spawn_worker(run.clone());
        Ok(run)
    }

    /// Resumes a rotation left running by a crash or restart.
    pub async fn resume_rotation(&self) -> Result<(), VaultError> {
        if let Some(run) = self.inner.store.rotation_running().await? {
            tracing::info!(run = %run.run_id, done = run.rewrapped, total = run.total, "resuming key rotation");
            self.spawn_worker(run);
        }
        Ok(())
    }

    /// Retires a version no DEK references.
    pub async fn retire(
        &self,
        version: KekVersion,
        actor: &Actor,
    ) -> Result<KekRecord, VaultError> {
        self.set_state(version, KeyState::Retired, actor).await
    }

    /// Destroys a retired version's key material. Refused while any DEK
    /// references it.
    pub async fn destroy(
        &self,
        version: KekVersion,
        actor: &Actor,
    ) -> Result<KekRecord, VaultError> {
        self.set_state(version, KeyState::Destroyed, actor).await
    }

    async fn set_state(
        &self,
        version: KekVersion,
        state: KeyState,
        actor: &Actor,
    ) -> Result<KekRecord, VaultError> {
        let i = &self.inner;
        let action = match state {
            KeyState::Retired => "keys.retire",
            _ => "keys.destroy",
        };
        let target = format!("kek:{version}");
        // Check first so that a refusal is audited as such and changes nothing.
        let check = self.check_transition(version, state).await;
        if let Err(e) = check {
            i.audit
                .record(actor, action, &target, Outcome::Failed, e.to_string())
                .await?;
            return Err(e);
        }
        i.audit
            .record(actor, action, &target, Outcome::Ok, "")
            .await?;
        if state == KeyState::Destroyed {
            // Material first: a retired version wraps nothing and nothing new can
            // reference it, so if recording the state fails, a retry finishes it.
            match i.keyring.destroy_version(version).await {
                Ok(()) | Err(CryptoError::UnknownKeyVersion(_)) => {}
                Err(CryptoError::Unsupported(msg)) => return Err(VaultError::precondition(msg)),
                Err(e) => return Err(e.into()),
            }
        }
        i.store
            .kek_set_state(version, state, Timestamp::now())
            .await?;
        tracing::info!(%version, %state, actor = %actor.identity, "key version state changed");
        i.store
            .kek_list()
            .await?
            .into_iter()
            .find(|k| k.version == version)
            .ok_or_else(|| VaultError::not_found("key version", version))
    }

    async fn check_transition(
        &self,
        version: KekVersion,
        state: KeyState,
    ) -> Result<(), VaultError> {
        let records = self.inner.store.kek_list().await?;
        let rec = records
            .iter()
            .find(|k| k.version == version)
            .ok_or_else(|| VaultError::not_found("key version", version))?;
        if rec.state == KeyState::Primary {
            return Err(VaultError::precondition(format!(
                "key version {version} is primary; rotate to a new version first"
            )));
        }
        if rec.state == state {
            return Ok(());
        }
        if state == KeyState::Destroyed && rec.state != KeyState::Retired {
            return Err(VaultError::precondition(format!(
                "key version {version} is {}; retire it before destroying it",
                rec.state
            )));
        }
        let refs: i64 = self
            .inner
            .store
            .dek_count_by_version()
            .await?
            .iter()
            .filter(|(v, _)| *v == version)
            .map(|(_, n)| n)
            .sum();
        if refs > 0 {
            return Err(VaultError::precondition(format!(
                "key version {version} still wraps {refs} data keys; rotate first"
            )));
        }
        Ok(())
    }

    /// Stops background rotation workers (they resume on the next start).
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    fn spawn_worker(&self, run: RotationRun) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut stop = this.inner.stop.subscribe();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = this.run_rotation(run) => {}
            }
        });
    }

    async fn run_rotation(&self, run: RotationRun) {
        let i = &self.inner;
        let actor = Actor::system();
        let mut backoff = Duration::from_millis(100);
        loop {
            // Passes repeat until no DEK is left on another version: a DEK
            // created by a replica that read the old primary just before the
            // switch may land behind the first pass.
            let step = async {
                if i.store.dek_count_not_on(run.target_version).await? == 0 {
                    return Ok(true);
                }
                self.rewrap_pass(&run).await.map(|_| false)
            };
            match step.await {
                Ok(true) => break,
                Ok(false) => backoff = Duration::from_millis(100),
                Err(VaultError::Unavailable(e)) => {
                    tracing::warn!(run = %run.run_id, error = %e, "rotation paused; database unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::error!(run = %run.run_id, error = %e, "rotation failed");
                    let msg = e.to_string();
                    let _ = i
                        .audit
                        .record(
                            &actor,
                            "keys.rotate.fail",
                            &run.run_id,
                            Outcome::Failed,
                            msg.clone(),
                        )
                        .await;
                    let _ = i
                        .store
                        .rotation_finish(&run.run_id, "failed", Some(&msg), Timestamp::now())
                        .await;
                    return;
                }
            }
        }
        // The end is audited before it is recorded; if the audit fails the run
        // stays "running" and resumes (finding nothing left) on the next start.
        if i.audit
            .record(
                &actor,
                "keys.rotate.complete",
                &run.run_id,
                Outcome::Ok,
                format!("to {}", run.target_version),
            )
            .await
            .is_ok()
        {
            if let Err(e) = i
                .store
                .rotation_finish(&run.run_id, "completed", None, Timestamp::now())
                .await
            {
                tracing::error!(run = %run.run_id, error = %e, "could not record rotation end");
            } else {
                tracing::info!(run = %run.run_id, "key rotation completed");
            }
        }
    }

    /// One pass over every DEK not yet on the target; returns how many it
    /// rewrapped.
    async fn rewrap_pass(&self, run: &RotationRun) -> Result<u64, VaultError> {
        let i = &self.inner;
        let mut after = None;
        let mut done = 0u64;
        loop {
            let (batch, last) = i
                .store
                .dek_batch_scan(run.target_version, after.as_ref(), i.batch_size)
                .await?;
            let Some(last) = last else { break };
            after = Some(last);
            if batch.is_empty() {
                continue;
            }
            let mut rewraps = Vec::with_capacity(batch.len());
            for row in &batch {
                let ctx = DekContext {
                    tenant: row.tenant.as_str(),
                    account: row.account.as_str(),
                    connection: row.connection_id.as_str(),
                };
                let old = WrappedDek {
                    kek_version: row.kek_version,
                    bytes: row.wrapped_dek.clone(),
                };
                let dek = unwrap_dek(i.keyring.as_ref(), &old, &ctx)
                    .await
                    .map_err(|e| {
                        VaultError::Internal(
                            format!("{}: wrapped DEK does not open: {e}", row.connection_id).into(),
                        )
                    })?;
                let new = wrap_dek(i.keyring.as_ref(), run.target_version, &dek, &ctx).await?;
                rewraps.push(Rewrap {
                    connection_id: row.connection_id.clone(),
                    old_version: row.kek_version,
                    old_wrapped: old.bytes,
                    new_version: new.kek_version,
                    new_wrapped: new.bytes,
                });
            }
            done += i.store.dek_rewrap(&run.run_id, &rewraps).await?;
            if !i.batch_pause.is_zero() {
                tokio::time::sleep(i.batch_pause).await;
            }
        }
        Ok(done)
    }
}
