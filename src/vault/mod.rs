//! Use cases: what the vault does, independent of the transport that asked.
//! A [`Vault`] owns the store, the keyring handle and the audit log; gRPC,
//! HTTP and CLI handlers only parse, authorize and call in here.

mod authorize;
mod connections;
mod deletion;
mod events;
mod keys;
mod lease;
mod rate;
mod reader;
mod risc;
mod sweeper;

use std::sync::Arc;

pub use authorize::{BeginOutcome, Completer, Completion, ID_TOKEN_REFUSED, STATE_TTL};
pub use connections::{NewConnection, OpenedToken};
pub use deletion::Deletion;
pub use events::{WatchRequest, Watcher};
pub use keys::{KEY_CLAIM_TTL, KeyManager, KeyStatus, RotationStatus, VersionStatus};
pub use lease::{Lease, LeaseRequest};
pub use risc::RiscError;
pub use sweeper::SweepReport;

use crate::audit::{AuditLog, Witness};
use crate::config::{Config, DeletionConfig, GoogleConfig, KeyringProviderKind, LeaseConfig};
use crate::crypto::{CryptoError, EnvKeyring, KeyringProvider, LocalKeyring, Pkcs11Keyring};
use crate::domain::VaultError;
use crate::google::GoogleClient;
use crate::store::{self, Store};

/// The vault: every use case hangs off this.
pub struct Vault {
    store: Arc<dyn Store>,
    keyring: Arc<dyn KeyringProvider>,
    audit: AuditLog,
    keys: KeyManager,
    google: Option<GoogleClient>,
    settings: Settings,
    refresh_gates: lease::RefreshGates,
    /// Names this process as a refresh-lock holder.
    instance_id: String,
    /// The newest event cursor this process knows of.
    events: events::EventHead,
    /// Set when the vault stops: watchers end, background tasks return.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Verifies RISC Security Event Tokens.
    risc: risc::RiscReceiver,
    /// Batched connection reads for the lease path.
    reader: reader::LeaseReader,
    /// The event cursor up to which connections named by events were dropped
    /// from this replica's caches.
    cache_events_seen: std::sync::atomic::AtomicI64,
    /// How many authorizations each caller has begun lately, on this replica.
    begin_rate: rate::CallerRate,
}

/// The configuration the use cases read.
struct Settings {
    google: GoogleConfig,
    lease: LeaseConfig,
    deletion: DeletionConfig,
    refresh: crate::config::RefreshConfig,
}

impl Vault {
    /// Audit entries matching `filter` (at most `limit`), and the sequence
    /// number of the newest entry in the log.
    pub async fn audit_query(
        &self,
        filter: &store::AuditFilter,
        limit: i64,
    ) -> Result<(Vec<store::AuditRow>, i64), VaultError> {
        let rows = self.store().audit_query(filter, limit).await?;
        let (last_seq, _) = self.store().audit_head().await?;
        Ok((rows, last_seq))
    }

    /// Checks the audit chain from `from_seq` to `to_seq` (the head when
    /// `None`): hashes, MACs and signed checkpoints; then compares it with
    /// this replica's audit witness (`audit.witness_file`), which names a
    /// tail cut off together with its checkpoints.
    pub async fn audit_verify(
        &self,
        from_seq: i64,
        to_seq: Option<i64>,
    ) -> Result<crate::audit::VerifyReport, VaultError> {
        let witnesses: Vec<std::path::PathBuf> = self
            .audit
            .witness_path()
            .map(std::path::Path::to_path_buf)
            .into_iter()
            .collect();
        crate::audit::verify_with_witness(
            self.store().as_ref(),
            self.keyring().as_ref(),
            from_seq,
            to_seq,
            &witnesses,
        )
        .await
    }

    /// Opens the store (applying migrations) and the keyring named by the
    /// configuration, registers key versions, and resumes an interrupted
    /// rotation. Must run inside a Tokio runtime.
    pub async fn open(config: &Config) -> Result<Arc<Self>, VaultError> {
        let keyring = open_keyring(config)?;
        let store = store::open(&config.database_url()).await?;
        Self::from_parts(store, keyring, config).await
    }

    /// Builds a vault from an opened store and keyring.
    pub async fn from_parts(
        store: Arc<dyn Store>,
        keyring: Arc<dyn KeyringProvider>,
        config: &Config,
    ) -> Result<Arc<Self>, VaultError> {
        let instance_id = format!("vault-{}", uuid::Uuid::new_v4());
        let witness_path = config.audit_witness_path();
        let witness = Witness::open(&witness_path, &instance_id).map_err(|e| {
            VaultError::precondition(format!(
                "audit.witness_file: cannot open {} for appending: {e}",
                witness_path.display()
            ))
        })?;
        let witnessed = witness.last_seq();
        let audit = AuditLog::start_witnessed(
            store.clone(),
            keyring.clone(),
            config.audit.checkpoint_every,
            Some(witness),
        )?;
        let (head, _) = store.audit_head().await?;
        if witnessed > head {
            tracing::error!(
                witness = %witness_path.display(),
                witnessed,
                head,
                "the audit witness holds a checkpoint past the database's last entry: the log's \
                 tail was cut off, or the database was restored from a backup; run \
                 `tokenvault admin audit verify`"
            );
        }
        let keys = KeyManager::new(
            store.clone(),
            keyring.clone(),
            audit.clone(),
            config,
            &instance_id,
        );
        keys.sync().await?;
        let events_head = store.event_state().await?.head;
        let google = if config.google.client_id.is_empty() {
            None
        } else {
            Some(GoogleClient::new(&config.google)?)
        };
        let vault = Arc::new(Self {
            store: store.clone(),
            keyring,
            audit,
            keys,
            google,
            settings: Settings {
                google: config.google.clone(),
                lease: config.lease.clone(),
                deletion: config.deletion.clone(),
                refresh: config.refresh.clone(),
            },
            refresh_gates: lease::RefreshGates::default(),
            instance_id,
            events: events::EventHead::new(),
            stopping: tokio::sync::watch::channel(false).0,
            risc: risc::RiscReceiver::new(config)?,
            reader: reader::LeaseReader::start(
                store.clone(),
                std::time::Duration::from_secs(config.lease.cache_ttl_seconds),
                config.lease.cache_entries,
            ),
            cache_events_seen: std::sync::atomic::AtomicI64::new(events_head),
            begin_rate: rate::CallerRate::new(config.google.max_states_per_caller_per_minute),
        });
        vault.keys.resume_rotation().await?;
        vault.keys.start();
        tokio::spawn(every(
            Arc::downgrade(&vault),
            std::time::Duration::from_millis(config.events.poll_interval_ms),
            |v| async move { v.refresh_event_head().await },
        ));
        if config.refresh.sweeper && vault.google.is_some() {
            tokio::spawn(every(
                Arc::downgrade(&vault),
                std::time::Duration::from_secs(config.refresh.check_interval_seconds),
                |v| async move {
                    if let Err(e) = v.refresh_sweep_pass().await {
                        tracing::warn!(error = %e, "refresh sweep failed");
                    }
                },
            ));
        }
        tokio::spawn(every(
            Arc::downgrade(&vault),
            deletion::OUTBOX_POLL,
            |v| async move {
                if let Err(e) = v.outbox_pass().await {
                    tracing::warn!(error = %e, "revocation outbox pass failed");
                }
            },
        ));
        Ok(vault)
    }

    /// The store (for transports that page through records).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The keyring handle (MACs only; it never hands out keys).
    pub fn keyring(&self) -> &Arc<dyn KeyringProvider> {
        &self.keyring
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Key management: status, rotation, retirement.
    pub fn keys(&self) -> &KeyManager {
        &self.keys
    }

    /// The Google client; FailedPrecondition when none is configured.
    pub fn google(&self) -> Result<&GoogleClient, VaultError> {
        self.google.as_ref().ok_or_else(|| {
            VaultError::precondition("no Google OAuth client configured (google.client_id)")
        })
    }

    /// How long a lease may wait for a refresh.
    pub fn refresh_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.settings.google.refresh_deadline_ms)
    }

    /// `min_valid_seconds` when a request leaves it at 0.
    pub fn default_min_valid(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.settings.lease.default_min_valid_seconds))
    }

    /// Where the OAuth callback sends the browser afterwards.
    pub fn return_url(&self) -> Option<&str> {
        self.settings.google.return_url.as_deref()
    }

    /// Whether the vault can serve: the database answers, this replica holds
    /// every key version the registry uses, and the primary key can wrap.
    pub async fn health(&self) -> Result<(), VaultError> {
        self.store.ping().await?;
        self.keys.check_health().await
    }

    /// Periodic housekeeping: deletes OAuth states that expired and lease
    /// rows past the retention period.
    pub async fn maintenance(&self) -> Result<(), VaultError> {
        let now = crate::domain::Timestamp::now();
        let purged = self.store.authz_purge(now).await?;
        if purged > 0 {
            tracing::debug!(purged, "expired authorization states deleted");
        }
        let retention =
            std::time::Duration::from_secs(self.settings.deletion.retention_days * 86_400);
        let before = crate::domain::Timestamp::from_micros(
            now.as_micros() - i64::try_from(retention.as_micros()).unwrap_or(i64::MAX),
        );
        let pruned = self.store.lease_prune(before).await?;
        if pruned > 0 {
            tracing::debug!(pruned, "lease rows past retention deleted");
        }
        let open = self.store.lease_open_count(now, None).await?;
        metrics::gauge!("tokenvault_open_leases").set(open as f64);
        let mut consumers: Vec<String> = self
            .settings
            .deletion
            .required_consumers
            .values()
            .flatten()
            .cloned()
            .collect();
        consumers.sort();
        consumers.dedup();
        let pruned = self.store.retention_prune(before, &consumers).await?;
        if pruned > 0 {
            tracing::info!(
                pruned,
                "rows past retention deleted (events, receipts, tombstones)"
            );
        }
        let sla = self.receipt_sla_cutoff();
        let overdue = self.store.receipt_incomplete_count(sla).await?;
        metrics::gauge!("tokenvault_receipts_overdue").set(overdue as f64);
        Ok(())
    }

    /// Tells watchers and background tasks that the vault is stopping.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Stops background work and closes the database pool.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        self.keys.shutdown().await;
        self.store.close().await;
    }
}

/// Opens the configured keyring provider. A setting at fault is reported as
/// a one-line configuration error naming it.
pub fn open_keyring(config: &Config) -> Result<Arc<dyn KeyringProvider>, VaultError> {
    let opened: Result<Arc<dyn KeyringProvider>, CryptoError> = match config.keyring.provider {
        KeyringProviderKind::Local => {
            LocalKeyring::open(config.keyring_path()).map(|k| Arc::new(k) as _)
        }
        KeyringProviderKind::Env => EnvKeyring::from_values(
            config.keyring.keys.expose(),
            config.keyring.mac_key.expose(),
        )
        .map(|k| Arc::new(k) as _),
        KeyringProviderKind::Pkcs11 => {
            let settings = config
                .pkcs11_settings()
                .map_err(|e| VaultError::precondition(e.to_string()))?;
            Pkcs11Keyring::open(&settings).map(|k| Arc::new(k) as _)
        }
    };
    opened.map_err(|e| match e {
        e @ CryptoError::Config { .. } => VaultError::precondition(e.to_string()),
        e => e.into(),
    })
}

/// Resolves once `stopping` is set (the guard `wait_for` returns is dropped
/// here, so callers' futures stay `Send`).
pub(crate) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// A background task: runs `pass` every `period` until the vault stops or is
/// dropped, holding the vault only during a pass.
async fn every<F, Fut>(vault: std::sync::Weak<Vault>, period: std::time::Duration, mut pass: F)
where
    F: FnMut(Arc<Vault>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(mut stopping) = vault.upgrade().map(|v| v.stopping.subscribe()) else {
        return;
    };
    loop {
        let Some(v) = vault.upgrade() else { return };
        pass(v).await;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stopped(&mut stopping) => return,
        }
    }
}
