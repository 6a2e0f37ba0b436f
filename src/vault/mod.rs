//! Use cases: what the vault does, independent of the transport that asked.
//! A [`Vault`] owns the store, the keyring handle and the audit log; gRPC,
//! HTTP and CLI handlers only parse, authorize and call in here.

mod audit_follow;
mod authorize;
mod connections;
mod deletion;
mod events;
mod expiring;
mod keys;
mod lease;
mod rate;
mod reader;
mod risc;
mod sweeper;

use std::sync::Arc;

pub use audit_follow::{AUDIT_FOLLOW_POLL, AuditBatch, FollowFrom};
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
    archive_turn: ArchiveTurn,
}

/// The configuration the use cases read.
struct Settings {
    google: GoogleConfig,
    lease: LeaseConfig,
    deletion: DeletionConfig,
    refresh: crate::config::RefreshConfig,
    /// Where and when the audit log is archived; `None`: never.
    archive: Option<crate::audit::archive::ArchiveSettings>,
}

/// Held by an archive pass and by a verification of the audit log: on one
/// replica they take turns, so that a verification never sees entries leave
/// the live table under it.
type ArchiveTurn = tokio::sync::Mutex<()>;

impl Vault {
    /// Audit entries matching `filter` (at most `limit`), and the highest
    /// sequence number in the log. The chains of a fleet's log (see
    /// `store::audit`) are merged by time, oldest or newest first as the
    /// filter asks, each chain's entries in their order; `filter.resume`
    /// continues each chain after the entry it names.
    pub async fn audit_query(
        &self,
        filter: &store::AuditFilter,
        limit: i64,
    ) -> Result<(Vec<store::AuditRow>, i64), VaultError> {
        let heads = self.store().audit_heads().await?;
        let mut chains = Vec::with_capacity(heads.len());
        for head in &heads {
            if let Some(f) = chain_filter(filter, head.chain) {
                chains.push(self.audit_query_chain(&f, head.chain, limit).await?);
            }
        }
        let rows = merge_by_time(chains, filter.ascending, limit);
        // The heads after the rows: no row is newer than they are.
        Ok((rows, self.audit_newest().await?))
    }

    /// [`Vault::audit_query`] within one chain (`filter` bounds it there):
    /// from the archive and the live table, in sequence order.
    pub(super) async fn audit_query_chain(
        &self,
        filter: &store::AuditFilter,
        chain: i64,
        limit: i64,
    ) -> Result<Vec<store::AuditRow>, VaultError> {
        let Some(archive) = &self.settings.archive else {
            return self.store().audit_query(filter, limit).await;
        };
        // The chain's archived entries are read from the archive, the rest
        // from the live table (which may still hold archived entries the
        // prune has not reached: they are the archive's). The segment list
        // is read only when the query reaches the archive (a follower
        // polling for new entries does not).
        let archived_to = self
            .store()
            .audit_segment_last(chain)
            .await?
            .map_or(0, |s| s.last_seq);
        let mut live_filter = filter.clone();
        live_filter.after_seq = Some(filter.after_seq.unwrap_or(0).max(archived_to));
        let want = usize::try_from(limit).unwrap_or(0);
        let reaches_archive = filter.after_seq.unwrap_or(0) < archived_to;
        let from_archive = |want: usize| async move {
            if !reaches_archive || want == 0 {
                return Ok(Vec::new());
            }
            let segments = self.store().audit_segments().await?;
            crate::audit::archive::query(&segments, &archive.dir, filter, want).await
        };
        if filter.ascending {
            let mut rows = from_archive(want).await?;
            let rest = want.saturating_sub(rows.len());
            if rest > 0 {
                rows.extend(self.store().audit_query(&live_filter, rest as i64).await?);
            }
            Ok(rows)
        } else {
            let mut rows = self.store().audit_query(&live_filter, limit).await?;
            rows.extend(from_archive(want.saturating_sub(rows.len())).await?);
            Ok(rows)
        }
    }

    /// The highest sequence number in the log (its newest chain's head).
    async fn audit_newest(&self) -> Result<i64, VaultError> {
        Ok(self
            .store()
            .audit_heads()
            .await?
            .iter()
            .map(|h| h.seq)
            .max()
            .unwrap_or(0))
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
        let _turn = self.archive_turn.lock().await;
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
            self.settings.archive.as_ref().map(|a| a.dir.as_path()),
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
        let head = store
            .audit_heads()
            .await?
            .into_iter()
            .find(|h| h.chain == store::audit::chain_of(witnessed))
            .map_or(0, |h| h.seq);
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
                archive: config.audit.archive_dir.as_ref().map(|dir| {
                    crate::audit::archive::ArchiveSettings {
                        dir: dir.clone(),
                        hot_retention: std::time::Duration::from_secs(
                            config.audit.hot_retention_seconds,
                        ),
                        segment_max_entries: config.audit.segment_max_entries,
                    }
                }),
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
            archive_turn: ArchiveTurn::default(),
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
        if vault.settings.archive.is_some() {
            // The first pass one interval after start, not during it.
            let period = std::time::Duration::from_secs(config.audit.archive_interval_seconds);
            let weak = Arc::downgrade(&vault);
            tokio::spawn(async move {
                tokio::time::sleep(period).await;
                every(weak, period, |v| async move {
                    if let Err(e) = v.audit_archive_pass().await {
                        tracing::warn!(error = %e, "audit archive pass failed");
                    }
                })
                .await;
            });
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
                .because(crate::domain::ErrorReason::GoogleNotConfigured)
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

    /// The window open leases are counted in: now, and the earliest grant
    /// that can still be open (no lease outlives `lease.max_ttl_seconds`).
    pub(crate) fn open_lease_window(&self) -> (crate::domain::Timestamp, crate::domain::Timestamp) {
        let now = crate::domain::Timestamp::now();
        let ttl = std::time::Duration::from_secs(self.settings.lease.max_ttl_seconds);
        (now, now.minus(ttl))
    }

    /// Periodic housekeeping: deletes OAuth states that expired, counts open
    /// leases, and prunes what outlived its retention.
    pub async fn maintenance(&self) -> Result<(), VaultError> {
        let now = crate::domain::Timestamp::now();
        let purged = self.store.authz_purge(now).await?;
        if purged > 0 {
            tracing::debug!(purged, "expired authorization states deleted");
        }
        let retention =
            std::time::Duration::from_secs(self.settings.deletion.retention_days * 86_400);
        let before = now.minus(retention);
        // A lease's record is its grant's audit entry: the archiver prunes
        // it (`audit_archive_pass`), once archived and past its retention.
        let (at, granted_after) = self.open_lease_window();
        let open = self.store.lease_open_count(at, granted_after, None).await?;
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

    /// One pass of the audit archiver (see `crate::audit::archive`): seals
    /// every entry past the hot retention into segments, records each one
    /// (after an `audit.archive` entry: no entry, no archive), then prunes
    /// the archived entries from the live table in short steps. Does nothing
    /// without `audit.archive_dir`.
    pub async fn audit_archive_pass(&self) -> Result<ArchivePass, VaultError> {
        let mut pass = ArchivePass::default();
        let Some(settings) = &self.settings.archive else {
            return Ok(pass);
        };
        let _turn = self.archive_turn.lock().await;
        // Each chain is archived on its own (see `store::audit`).
        for head in self.store.audit_heads().await? {
            self.archive_chain(settings, &head, &mut pass).await?;
        }
        // A lease's record (its grant's entry) stays while the lease is
        // open and for `lease.record_retention_seconds` after it expired.
        let lease_records_before = crate::domain::Timestamp::now().minus(
            std::time::Duration::from_secs(self.settings.lease.record_retention_seconds),
        );
        pass.pruned = paced(|| async {
            let pruned = self
                .store
                .audit_prune_archived(PRUNE_STEP, lease_records_before)
                .await?;
            metrics::counter!("tokenvault_audit_pruned_entries_total").increment(pruned);
            Ok(pruned)
        })
        .await?;
        if pass.pruned > 0 {
            self.store
                .reclaim(&["audit_log", "leases", "lease_releases", "audit_checkpoints"])
                .await?;
        }
        Ok(pass)
    }

    /// Archives chain `head.chain`'s entries past the hot retention, segment
    /// by segment (see [`Vault::audit_archive_pass`]).
    async fn archive_chain(
        &self,
        settings: &crate::audit::archive::ArchiveSettings,
        head: &store::AuditHead,
        pass: &mut ArchivePass,
    ) -> Result<(), VaultError> {
        use crate::audit::{Actor, Outcome, archive};
        let chain_start = *store::audit::chain_range(head.chain).start();
        while !*self.stopping.borrow() {
            let Some(w) = archive::write_next_segment(
                self.store.as_ref(),
                self.audit.sealer(),
                settings,
                &self.instance_id,
                head.chain,
                crate::domain::Timestamp::now(),
            )
            .await?
            else {
                break;
            };
            let s = &w.segment;
            let entries = u64::try_from(s.last_seq - s.first_seq + 1).unwrap_or(0);
            let detail = format!(
                "entries {}..={} sealed in {} (sha256 {})",
                s.first_seq,
                s.last_seq,
                w.path.display(),
                hex::encode(&s.file_sha256)
            );
            // Another replica's archiver may have recorded these entries
            // while this one wrote them: then this file goes, and no entry
            // names it.
            let continues = self
                .store
                .audit_segment_last(head.chain)
                .await?
                .map_or(s.first_seq == chain_start, |last| {
                    last.last_seq + 1 == s.first_seq && last.last_hash == s.prev_hash
                });
            if !continues {
                remove_unrecorded(self.store.as_ref(), &w).await;
                tracing::debug!(
                    first = s.first_seq,
                    last = s.last_seq,
                    "audit archive: another replica archived these entries first"
                );
                break;
            }
            // No entry, no archive: the file goes if this cannot be written.
            if let Err(e) = self
                .audit
                .record(
                    &Actor::system(),
                    "audit.archive",
                    &s.file_name,
                    Outcome::Ok,
                    detail,
                )
                .await
            {
                remove_unrecorded(self.store.as_ref(), &w).await;
                return Err(e);
            }
            let recorded = self.store.audit_segment_record(s).await;
            if !matches!(recorded, Ok(true)) {
                // Lost the race after all, or the database failed: the entry
                // written above stands, so a second one says the file went.
                remove_unrecorded(self.store.as_ref(), &w).await;
                let why = match recorded {
                    Err(ref e) => e.to_string(),
                    _ => "another replica archived these entries first".to_owned(),
                };
                self.audit
                    .record(
                        &Actor::system(),
                        "audit.archive",
                        &s.file_name,
                        Outcome::Failed,
                        format!(
                            "entries {}..={} not archived here ({why}); the file was removed",
                            s.first_seq, s.last_seq
                        ),
                    )
                    .await?;
                return recorded.map(|_| ());
            }
            pass.segments += 1;
            pass.entries += entries;
            metrics::counter!("tokenvault_audit_archived_entries_total").increment(entries);
            if entries < settings.segment_max_entries {
                break;
            }
        }
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

/// `filter` bounded to chain `chain` and continued where `filter.resume`
/// says; `None` when nothing of the chain can match.
fn chain_filter(filter: &store::AuditFilter, chain: i64) -> Option<store::AuditFilter> {
    let range = store::audit::chain_range(chain);
    let mut after = filter.after_seq.unwrap_or(i64::MIN).max(range.start() - 1);
    let mut before = filter
        .before_seq
        .unwrap_or(i64::MAX)
        .min(range.end().saturating_add(1));
    if let Some(&at) = filter.resume.get(&chain) {
        if filter.ascending {
            after = after.max(at);
        } else {
            before = before.min(at);
        }
    }
    if after.saturating_add(1) >= before {
        return None;
    }
    Some(store::AuditFilter {
        after_seq: Some(after),
        before_seq: Some(before),
        resume: std::collections::BTreeMap::new(),
        ..filter.clone()
    })
}

/// Merges the chains' rows (each in its chain's order) by time, oldest or
/// newest first, keeping each chain's order: at most `limit` rows, of each
/// chain a prefix of its rows, so that a page continues each chain after the
/// last of its rows taken.
fn merge_by_time(
    chains: Vec<Vec<store::AuditRow>>,
    ascending: bool,
    limit: i64,
) -> Vec<store::AuditRow> {
    let want = usize::try_from(limit).unwrap_or(0);
    let mut chains: Vec<std::iter::Peekable<std::vec::IntoIter<store::AuditRow>>> = chains
        .into_iter()
        .map(|rows| rows.into_iter().peekable())
        .collect();
    let mut rows = Vec::with_capacity(want);
    while rows.len() < want {
        let next = chains
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| c.peek().map(|r| (i, (r.draft.at.as_micros(), r.seq))))
            .reduce(|best, candidate| {
                let earlier = candidate.1 < best.1;
                if earlier == ascending {
                    candidate
                } else {
                    best
                }
            });
        let Some((i, _)) = next else {
            break;
        };
        rows.extend(chains[i].next());
    }
    rows
}

/// Removes a segment file that no recorded segment names (one that does was
/// written, byte for byte, by the archiver that won).
async fn remove_unrecorded(store: &dyn store::Store, w: &crate::audit::archive::WrittenSegment) {
    let named = store.audit_segments().await.map_or(true, |all| {
        all.iter().any(|r| r.file_name == w.segment.file_name)
    });
    if !named {
        let _ = std::fs::remove_file(&w.path);
    }
}

/// Rows deleted per transaction by the prunes (archived audit entries, the
/// lease records among them).
const PRUNE_STEP: i64 = 1_000;

/// Runs `step` (one short delete transaction, returning the rows it deleted)
/// until it deletes less than a full step, pausing after each for as long as
/// it took (at least 5 ms): a prune holds the database's write lock at most
/// half the time, so the lease path's batches wait at most one step.
async fn paced<F, Fut>(mut step: F) -> Result<u64, VaultError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, VaultError>>,
{
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let n = step().await?;
        total += n;
        if n < PRUNE_STEP as u64 {
            return Ok(total);
        }
        let took = started.elapsed();
        tokio::time::sleep(took.max(std::time::Duration::from_millis(5))).await;
    }
}

/// What one pass of the audit archiver did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ArchivePass {
    /// Segments sealed and recorded.
    pub segments: u64,
    /// Entries in them.
    pub entries: u64,
    /// Archived entries deleted from the live table.
    pub pruned: u64,
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
