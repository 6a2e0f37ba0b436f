//! Online rotation and the end of a version's life: choosing the target,
//! waiting for every live replica to hold it, rewrapping every wrapped key in
//! batches (one owner at a time, taken over if it stops), then retirement
//! and destruction.
//!
//! Invariants: see the parent module; in particular a rotation completes
//! only when no key is left on another version, and a destroyed version is
//! never primary again.

use super::*;

impl KeyManager {
    /// Starts an online rotation: a new KEK version — held by every live
    /// replica — becomes primary and every wrapped key is rewrapped to it in
    /// the background. Returns the run; while one is running, returns that
    /// one instead of starting another.
    pub async fn rotate(&self, actor: &Actor) -> Result<RotationStatus, VaultError> {
        let i = &self.inner;
        if let Some(run) = i.store.rotation_running().await? {
            // One rotation at a time: asking again reports the running one.
            return self.progress_of(run).await;
        }
        let current = self.primary().await?;
        let prepared = async {
            let target = self.rotation_target(current, actor).await?;
            self.wait_for_holders(target).await?;
            Ok::<_, VaultError>(target)
        };
        let target = match prepared.await {
            Ok(t) => t,
            Err(e) => {
                i.audit
                    .record(
                        actor,
                        "keys.rotate.start",
                        &format!("kek:{current}"),
                        Outcome::Failed,
                        e.to_string(),
                    )
                    .await?;
                return Err(e);
            }
        };
        i.audit
            .record(
                actor,
                "keys.rotate.start",
                &format!("kek:{current}"),
                Outcome::Ok,
                format!("from {current} to {target}"),
            )
            .await?;
        let now = Timestamp::now();
        let run = RotationRun {
            run_id: format!("rot_{}", uuid::Uuid::new_v4()),
            target_version: target,
            started_at: now,
            finished_at: None,
            total: 0,
            rewrapped: 0,
            state: "running".to_owned(),
            actor: actor.identity.clone(),
            last_error: None,
            owner: i.replica.id.clone(),
        };
        // This replica's sync leaves the run alone while it is being started here.
        self.state().worker = Some(run.run_id.clone());
        let started = self.start_run(run, target, now, actor).await;
        if started.is_err() {
            // The sync takes over a run left running (as its owner, it needs no claim).
            self.state().worker = None;
        }
        let run = started?;
        tracing::info!(run = %run.run_id, from = %current, to = %target, total = run.total, "key rotation started");
        self.spawn_worker(run.clone());
        Ok(RotationStatus { run, done: 0 })
    }

    /// Records the run (claiming the one rotation slot before anything changes),
    /// promotes its target and counts the work.
    pub(super) async fn start_run(
        &self,
        run: RotationRun,
        target: KekVersion,
        now: Timestamp,
        actor: &Actor,
    ) -> Result<RotationRun, VaultError> {
        let i = &self.inner;
        i.store.rotation_insert(&run).await?;
        if let Err(e) = i.store.kek_promote(target, now, &actor.identity).await {
            let _ = i
                .store
                .rotation_finish(
                    &run.run_id,
                    "failed",
                    Some(&e.to_string()),
                    Timestamp::now(),
                )
                .await;
            return Err(e);
        }
        let total = i.store.wrapped_key_count_not_on(target).await?;
        i.store.rotation_set_total(&run.run_id, total).await?;
        Ok(RotationRun { total, ..run })
    }

    pub(super) async fn progress_of(&self, run: RotationRun) -> Result<RotationStatus, VaultError> {
        let left = self
            .inner
            .store
            .wrapped_key_count_not_on(run.target_version)
            .await?;
        let done = (run.total - left).clamp(0, run.total);
        Ok(RotationStatus { run, done })
    }

    /// The version a rotation from `current` goes to: an active version newer
    /// than it (left by a rotation that was refused, or added by the operator
    /// to an external keyring), else a new one created in the provider.
    pub(super) async fn rotation_target(
        &self,
        current: KekVersion,
        actor: &Actor,
    ) -> Result<KekVersion, VaultError> {
        let i = &self.inner;
        if i.keyring.custody() == Custody::External {
            // Register whatever newer versions this replica holds.
            for m in i.keyring.versions().await? {
                self.register(m.version, m.created_at, actor).await?;
            }
        }
        let registry = i.store.kek_list().await?;
        let prepared = registry
            .iter()
            .filter(|k| k.state == KeyState::Active && k.version > current)
            .map(|k| k.version)
            .max();
        if let Some(v) = prepared {
            return Ok(v);
        }
        if i.keyring.custody() == Custody::External {
            return Err(VaultError::precondition(format!(
                "the {} keyring holds no version newer than {current}: generate one with \
                 `tokenvault keys init --env --version {}`, add it to TOKENVAULT_KEYRING__KEYS on \
                 every replica and restart them",
                i.keyring.kind(),
                current.next().map_or(current.get(), KekVersion::get)
            )));
        }
        let at_least = registry
            .iter()
            .map(|k| k.version)
            .max()
            .and_then(KekVersion::next)
            .unwrap_or(KekVersion::FIRST);
        // A version the keyring holds that the registry never saw: a rotation that
        // stopped between creating and registering it. It is used, not orphaned.
        let unregistered = i
            .keyring
            .versions()
            .await?
            .into_iter()
            .filter(|m| m.version >= at_least)
            .max_by_key(|m| m.version);
        if let Some(m) = unregistered {
            self.register(m.version, m.created_at, actor).await?;
            return Ok(m.version);
        }
        // One replica at a time creates a version (the keyring may be shared).
        let holder = i
            .store
            .keyring_claim(&format!("kek:{at_least}"), &i.replica.id, KEY_CLAIM_TTL)
            .await?;
        if holder != i.replica.id {
            return Err(VaultError::precondition(format!(
                "replica {holder} is creating key version {at_least}; rotate again once it has \
                 (or after a minute, if it stopped)"
            )));
        }
        let info = i.keyring.create_version(at_least).await?;
        if let Err(e) = self.register(info.version, info.created_at, actor).await {
            if matches!(e, VaultError::FailedPrecondition(_)) {
                // Another replica, with a keyring of its own, registered the same number
                // first: this copy is not the fleet's key and is never used. A file of
                // this replica's own is rid of it; an HSM object is left for the operator.
                if i.keyring.kind() == "local"
                    && let Err(d) = i.keyring.destroy_version(info.version).await
                {
                    tracing::warn!(version = %info.version, error = %d, "could not erase a key that lost its number");
                }
                return Err(VaultError::precondition(format!(
                    "another replica created key version {} at the same time; rotate again",
                    info.version
                )));
            }
            return Err(e);
        }
        Ok(info.version)
    }

    /// Waits until every live replica holds `target`, or refuses naming the
    /// replicas that do not.
    pub(super) async fn wait_for_holders(&self, target: KekVersion) -> Result<(), VaultError> {
        let i = &self.inner;
        let deadline = Instant::now() + i.replica_wait + i.sync_interval * 2;
        loop {
            let registry = i.store.kek_list().await?;
            if !self.held(&registry).await?.contains(&target) {
                self.reload_provider().await?;
            }
            self.heartbeat(true).await?;
            let now = i.store.clock().await?;
            let lacking: Vec<ReplicaRecord> = i
                .store
                .replica_list()
                .await?
                .into_iter()
                .filter(|r| r.is_live(now) && !r.versions.contains(&target))
                .collect();
            if lacking.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = lacking
                    .iter()
                    .map(|r| {
                        format!(
                            "{} holds {}, last seen {}s ago",
                            r.describe(),
                            version_list(&r.versions),
                            now.since(r.seen_at).as_secs()
                        )
                    })
                    .collect();
                return Err(VaultError::precondition(format!(
                    "refusing to make {target} primary: {} live replica(s) do not hold it: {}; give \
                     each the new version (or stop it) and rotate again",
                    lacking.len(),
                    names.join("; ")
                )));
            }
            tokio::time::sleep(i.sync_interval / 2).await;
        }
    }

    /// Resumes, at start, a rotation left running by a replica that is gone.
    pub async fn resume_rotation(&self) -> Result<(), VaultError> {
        self.take_over_rotation().await
    }

    /// Retires a version no wrapped key references.
    pub async fn retire(
        &self,
        version: KekVersion,
        actor: &Actor,
    ) -> Result<KekRecord, VaultError> {
        self.set_state(version, KeyState::Retired, actor).await
    }

    /// Destroys a retired version's key material. Refused while any wrapped
    /// key references it, and — for an external keyring — while a live
    /// replica still holds it.
    pub async fn destroy(
        &self,
        version: KekVersion,
        actor: &Actor,
    ) -> Result<KekRecord, VaultError> {
        self.set_state(version, KeyState::Destroyed, actor).await
    }

    pub(super) async fn set_state(
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
        if state == KeyState::Destroyed && i.keyring.custody() == Custody::Managed {
            // Material first: a retired version wraps nothing and nothing new can
            // reference it, so if recording the state fails, a retry finishes it.
            match i.keyring.destroy_version(version).await {
                Ok(()) | Err(CryptoError::UnknownKeyVersion(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        i.store
            .kek_set_state(version, state, Timestamp::now(), &actor.identity)
            .await?;
        let usable = i
            .store
            .kek_list()
            .await?
            .into_iter()
            .filter(|k| matches!(k.state, KeyState::Primary | KeyState::Active))
            .map(|k| k.version)
            .collect();
        i.deks.keep_only(&usable);
        if state == KeyState::Destroyed {
            // The fleet's view of who holds what changes here first.
            self.heartbeat(true).await?;
        }
        tracing::info!(%version, %state, actor = %actor.identity, "key version state changed");
        i.store
            .kek_list()
            .await?
            .into_iter()
            .find(|k| k.version == version)
            .ok_or_else(|| VaultError::not_found("key version", version))
    }

    pub(super) async fn check_transition(
        &self,
        version: KekVersion,
        state: KeyState,
    ) -> Result<(), VaultError> {
        let i = &self.inner;
        let records = i.store.kek_list().await?;
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
        let refs: Vec<String> = i
            .store
            .wrapped_key_counts()
            .await?
            .iter()
            .filter(|c| c.version == version && c.count > 0)
            .map(|c| format!("{} {}", c.count, c.kind.as_str()))
            .collect();
        if !refs.is_empty() {
            return Err(VaultError::precondition(format!(
                "key version {version} still wraps keys ({}); rotate first",
                refs.join(", ")
            )));
        }
        if state == KeyState::Destroyed && i.keyring.custody() == Custody::External {
            // Keep this replica's row current before judging the fleet by it.
            self.heartbeat(true).await?;
            let now = i.store.clock().await?;
            let holders: Vec<String> = i
                .store
                .replica_list()
                .await?
                .into_iter()
                .filter(|r| r.is_live(now) && r.versions.contains(&version))
                .map(|r| r.describe())
                .collect();
            if !holders.is_empty() {
                return Err(VaultError::precondition(format!(
                    "key version {version} is still held by {} live replica(s): {}; remove its entry \
                     from TOKENVAULT_KEYRING__KEYS on each and restart them, then destroy it again \
                     (the destruction is recorded once no live replica holds it)",
                    holders.len(),
                    holders.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub(super) fn spawn_worker(&self, run: RotationRun) {
        self.state().worker = Some(run.run_id.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let mut stop = this.inner.stop.subscribe();
            let run_id = run.run_id.clone();
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = this.run_rotation(run) => {}
            }
            let mut state = this.state();
            if state.worker.as_deref() == Some(run_id.as_str()) {
                state.worker = None;
            }
        });
    }

    pub(super) async fn run_rotation(&self, run: RotationRun) {
        let i = &self.inner;
        let actor = Actor::system();
        let mut backoff = Duration::from_millis(100);
        loop {
            // Passes repeat until no key is left on another version: a key
            // wrapped by a replica that read the old primary just before the
            // switch may land behind the first pass.
            let step = async {
                if i.store.wrapped_key_count_not_on(run.target_version).await? == 0 {
                    return Ok(Some(true));
                }
                self.rewrap_pass(&run).await.map(|done| done.map(|_| false))
            };
            match step.await {
                Ok(Some(true)) => break,
                Ok(Some(false)) => backoff = Duration::from_millis(100),
                Ok(None) => {
                    tracing::info!(run = %run.run_id, "the rotation continues on another replica; this worker stops");
                    return;
                }
                Err(e @ VaultError::Unavailable(_)) => {
                    tracing::warn!(run = %run.run_id, error = %e, "rotation paused; retrying");
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

    /// One pass over every wrapped key of every kind not yet on the target;
    /// returns how many it rewrapped, or `None` when the run stopped being
    /// this replica's (another one took it over).
    pub(super) async fn rewrap_pass(&self, run: &RotationRun) -> Result<Option<u64>, VaultError> {
        let i = &self.inner;
        let keyring = i.keyring.as_ref();
        let target = run.target_version;
        let mut done = 0u64;
        for kind in WrappedKeyKind::ALL {
            let mut after = None;
            loop {
                let (batch, last) = i
                    .store
                    .wrapped_key_scan(kind, target, after.as_ref(), i.batch_size)
                    .await?;
                let Some(last) = last else { break };
                after = Some(last);
                if batch.is_empty() {
                    continue;
                }
                let mut rewraps = Vec::with_capacity(batch.len());
                for row in batch {
                    let key_ctx = KeyContext::of(&row.owner);
                    let ctx = key_ctx.as_dek();
                    let old = WrappedDek {
                        kek_version: row.kek_version,
                        bytes: row.wrapped_dek,
                    };
                    let dek = self
                        .with_version(old.kek_version, || unwrap_dek(keyring, &old, &ctx))
                        .await
                        .map_err(|e| match e {
                            e @ VaultError::Unavailable(_) => e,
                            e => VaultError::Internal(
                                format!("a wrapped {} key does not open: {e}", kind.as_str())
                                    .into(),
                            ),
                        })?;
                    let new = self
                        .with_version(target, || wrap_dek(keyring, target, &dek, &ctx))
                        .await?;
                    if let WrappedKeyOwner::Connection { id, .. } = &row.owner {
                        i.deks.forget(id);
                    }
                    rewraps.push(Rewrap {
                        owner: row.owner,
                        old_version: old.kek_version,
                        old_wrapped: old.bytes,
                        new_version: new.kek_version,
                        new_wrapped: new.bytes,
                    });
                }
                match i
                    .store
                    .wrapped_key_rewrap(&run.run_id, &i.replica.id, &rewraps)
                    .await?
                {
                    Some(n) => done += n,
                    None => return Ok(None),
                }
                if !i.batch_pause.is_zero() {
                    tokio::time::sleep(i.batch_pause).await;
                }
            }
        }
        Ok(Some(done))
    }
}
