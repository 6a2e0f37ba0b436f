//! Key management, the one owner of key material in the vault: registering
//! the keyring's KEK versions, checking every root key at start, choosing the
//! primary, online rotation of every wrapped key, retirement and destruction,
//! the replicas' view of which versions they hold, and the status a reviewer
//! reads.
//!
//! Invariants:
//! - The database's key registry is the truth for the fleet: which versions
//!   exist, which is primary, retired or destroyed, and which versions each
//!   live replica holds. A keyring provider only holds material.
//! - A replica that meets a version it does not hold re-reads its provider
//!   before it fails; while the registry needs a version this replica cannot
//!   find, its health is NOT_SERVING, naming the version.
//! - A version becomes primary only when every live replica holds it, and a
//!   destroyed version is never primary again.
//! - A rotation rewraps every key the vault has wrapped (connection DEKs,
//!   OAuth-state keys, outbox keys); it completes only when none is left on
//!   another version, so `retire` succeeds right after it.
//! - The MAC root key and the audit checkpoint signing key have key-check
//!   values in the database; a keyring that does not reproduce them is
//!   refused before anything is written under it.
//! - Unwrapped connection DEKs may be cached in memory (zeroized on drop),
//!   bounded in number and age, keyed by the exact wrapped bytes they came
//!   from, and dropped when the connection is deleted or replaced, when its
//!   DEK is rewrapped here, and when their version is retired or destroyed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audit::{Actor, AuditLog, CheckpointSigner, Outcome};
use crate::config::Config;
use crate::crypto::{
    CryptoError, Custody, KekVersion, Key256, KeyringProvider, MacPurpose, WrappedDek, unwrap_dek,
    wrap_dek,
};
use crate::domain::{ConnectionId, KeyState, Timestamp, VaultError};
use crate::store::{
    ConnectionRecord, KekRecord, NewKek, ReplicaRecord, Rewrap, RotationRun, SecretsRecord, Store,
    WrappedKeyCount, WrappedKeyKind, WrappedKeyOwner,
};

mod cipher;
mod rotation;
mod sync;

use cipher::DekCache;
pub use cipher::{Cipher, KeyContext};

/// How long a claim to create keys in the fleet's keyring holds before another
/// replica may take it over (the claimer died between claiming and creating).
pub const KEY_CLAIM_TTL: Duration = Duration::from_secs(60);

/// The input of the MAC root key's key-check value.
const MAC_ROOT_CHECK_INPUT: &[u8] = b"tokenvault/key-check/mac-root";
/// Names of the root key-check values in the database.
const MAC_ROOT_CHECK: &str = "mac_root";
const SIGNING_KEY_CHECK: &str = "checkpoint_signing";

/// One KEK version as `KeyStatus` reports it.
#[derive(Clone, Debug)]
pub struct VersionStatus {
    /// Lifecycle record.
    pub record: KekRecord,
    /// Wrapped keys of every kind it wraps.
    pub dek_count: i64,
    /// Wrapped keys it wraps, by kind (connection, OAuth state, outbox), in
    /// [`WrappedKeyKind::ALL`] order.
    pub by_kind: [i64; 3],
    /// The live replicas whose keyring holds it.
    pub holders: Vec<String>,
}

/// A rotation run with its progress.
#[derive(Clone, Debug)]
pub struct RotationStatus {
    /// The run as recorded.
    pub run: RotationRun,
    /// Wrapped keys no longer on another version: rewrapped, or deleted or
    /// replaced meanwhile. Reaches `run.total` when the run completes.
    pub done: i64,
}

/// What `KeyStatus` and `keys report` show.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    /// Provider kind of the replica answering (`local`, `env`, `pkcs11`).
    pub provider: &'static str,
    /// The replica answering.
    pub replica_id: String,
    /// The primary version.
    pub primary: KekVersion,
    /// Every version, ascending.
    pub versions: Vec<VersionStatus>,
    /// The running rotation, else the latest one.
    pub rotation: Option<RotationStatus>,
    /// Every rotation, newest first.
    pub rotations: Vec<RotationStatus>,
    /// The oldest version referenced by a wrapped key (the primary when none is).
    pub oldest_in_use: KekVersion,
    /// Its age.
    pub oldest_in_use_age: Duration,
    /// The policy.
    pub max_kek_age_days: u32,
    /// Whether the oldest version in use is older than the policy allows.
    pub rotation_overdue: bool,
    /// Every replica row, with whether it is live now.
    pub replicas: Vec<(ReplicaRecord, bool)>,
}

/// Whether this replica must hold `k` to serve: the primary, and every
/// version that ever was primary and is not retired (it may wrap keys). An
/// active version that never was primary wraps nothing: it waits for a
/// rotation, which refuses to start until every live replica holds it.
fn needed(k: &KekRecord) -> bool {
    match k.state {
        KeyState::Primary => true,
        KeyState::Active => k.primary_since.is_some(),
        KeyState::Retired | KeyState::Destroyed => false,
    }
}

/// Associated data of a version's key-check value.
fn key_check_aad(version: KekVersion) -> Vec<u8> {
    format!("tokenvault/key-check/{version}").into_bytes()
}

/// This process as a replica of the fleet.
struct Replica {
    id: String,
    host: String,
    pid: i64,
    /// The kernel boot and PID namespace this process runs in.
    instance: String,
    started_at: Timestamp,
}

impl Replica {
    /// Whether `other`, a replica in the same kernel boot and PID namespace as this one,
    /// has a process that no longer runs: a crashed predecessor on this host.
    fn saw_exit_of(&self, other: &ReplicaRecord) -> bool {
        other.instance == self.instance
            && !self.instance.is_empty()
            && other.pid != self.pid
            && !std::path::Path::new(&format!("/proc/{}", other.pid)).exists()
    }
}

/// What the background sync last saw and wrote.
#[derive(Default)]
struct SyncState {
    /// Versions the registry needs (primary, active) that this replica lacks.
    missing: BTreeSet<KekVersion>,
    /// Destroyed versions this replica's keyring still holds (warned about).
    stale: BTreeSet<KekVersion>,
    /// What the replica row last said, and when it was written.
    written: Option<(Vec<KekVersion>, Instant)>,
    /// When the provider was last re-read.
    reloaded: Option<Instant>,
    /// The run a local worker is rewrapping for, if any.
    worker: Option<String>,
    /// Versions held here whose key-check value in the registry opens: the same keys the
    /// registry records. Cleared when the keyring is re-read.
    verified: BTreeSet<KekVersion>,
    /// Versions held here under a number the registry knows, whose key-check value does
    /// not open: another key that only shares the number. Never used.
    mismatched: BTreeSet<KekVersion>,
    /// The background sync task, awaited at shutdown.
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    store: Arc<dyn Store>,
    keyring: Arc<dyn KeyringProvider>,
    audit: AuditLog,
    batch_size: i64,
    batch_pause: Duration,
    max_age_days: u32,
    sync_interval: Duration,
    heartbeat: Duration,
    replica_wait: Duration,
    replica: Replica,
    state: Mutex<SyncState>,
    /// Serialises provider reloads, so concurrent misses share one.
    reload: tokio::sync::Mutex<()>,
    deks: DekCache,
    stop: watch::Sender<bool>,
}

/// The key-management component. Cheap to clone.
#[derive(Clone)]
pub struct KeyManager {
    inner: Arc<Inner>,
}

/// The kernel boot id and PID namespace of this process (`boot_id/pid:[inode]`): two
/// processes that share it see each other's pids. Empty when either cannot be read.
fn instance_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
    let pidns = std::fs::read_link("/proc/self/ns/pid").ok();
    match (boot, pidns) {
        (Some(b), Some(ns)) => format!("{}/{}", b.trim(), ns.display()),
        _ => String::new(),
    }
}

/// The host name, for naming replicas in messages.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn version_list(versions: &[KekVersion]) -> String {
    if versions.is_empty() {
        return "none".to_owned();
    }
    versions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl KeyManager {
    /// Creates the manager for this replica; call [`KeyManager::sync`] before use and
    /// [`KeyManager::start`] to keep it in step with the fleet.
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<dyn KeyringProvider>,
        audit: AuditLog,
        config: &Config,
        replica_id: &str,
    ) -> Self {
        let k = &config.keyring;
        Self {
            inner: Arc::new(Inner {
                store,
                keyring,
                audit,
                batch_size: i64::from(k.rotation_batch_size),
                batch_pause: Duration::from_millis(k.rotation_batch_pause_ms),
                max_age_days: k.max_kek_age_days,
                sync_interval: Duration::from_millis(k.sync_interval_ms.max(1)),
                heartbeat: Duration::from_secs(k.heartbeat_seconds.max(1)),
                replica_wait: Duration::from_millis(k.replica_wait_ms),
                replica: Replica {
                    id: replica_id.to_owned(),
                    host: host_name(),
                    pid: i64::from(std::process::id()),
                    instance: instance_id(),
                    started_at: Timestamp::now(),
                },
                state: Mutex::new(SyncState::default()),
                reload: tokio::sync::Mutex::new(()),
                deks: DekCache::new(
                    Duration::from_secs(config.lease.cache_ttl_seconds),
                    config.lease.cache_entries,
                ),
                stop: watch::Sender::new(false),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks once per load of the keyring that `version`, if the registry knows it, is
    /// the key the registry records. A version the keyring does not hold fails with
    /// [`CryptoError::UnknownKeyVersion`].
    async fn check_version(&self, version: KekVersion) -> Result<(), VaultError> {
        {
            let state = self.state();
            if state.verified.contains(&version) {
                return Ok(());
            }
            if state.mismatched.contains(&version) {
                return Err(self.mismatch(version));
            }
        }
        let registry = self.inner.store.kek_list().await?;
        let Some(record) = registry.iter().find(|k| k.version == version) else {
            return Ok(());
        };
        if self.key_matches(record).await? {
            self.state().verified.insert(version);
            Ok(())
        } else {
            self.state().mismatched.insert(version);
            Err(self.mismatch(version))
        }
    }

    /// Runs `op` with `version`'s material, after checking that it is the key
    /// the registry records. When the keyring does not hold the version it is
    /// re-read once; a version the registry records as destroyed is reported
    /// as such without a reload.
    async fn with_version<T, F, Fut>(&self, version: KekVersion, op: F) -> Result<T, VaultError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CryptoError>>,
    {
        let attempt = async || match self.check_version(version).await {
            Ok(()) => op().await.map_err(VaultError::from),
            Err(e) => Err(e),
        };
        match attempt().await {
            Err(VaultError::Crypto(CryptoError::UnknownKeyVersion(_))) => {}
            other => return other,
        }
        let registry = self.inner.store.kek_list().await?;
        if registry
            .iter()
            .any(|k| k.version == version && k.state == KeyState::Destroyed)
        {
            return Err(CryptoError::KeyDestroyed(version).into());
        }
        self.reload_provider().await?;
        match attempt().await {
            Err(VaultError::Crypto(CryptoError::UnknownKeyVersion(_))) => {
                let held = self.held(&registry).await?;
                self.note_missing(&registry, &held);
                Err(VaultError::Unavailable(
                    format!(
                        "key version {version} is not in this replica's {} keyring: {}",
                        self.inner.keyring.kind(),
                        self.remedy(version)
                    )
                    .into(),
                ))
            }
            other => other,
        }
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

    /// Checks that this replica holds every version the registry uses and
    /// that the primary wraps and unwraps (health).
    pub async fn check_health(&self) -> Result<(), VaultError> {
        let version = self.primary().await?;
        let probe = Key256::from_bytes([0x5a; 32]);
        let aad = b"tokenvault/health-probe";
        let keyring = &self.inner.keyring;
        let wrapped = self
            .with_version(version, || keyring.wrap(version, &probe, aad))
            .await?;
        keyring.unwrap(version, &wrapped, aad).await?;
        let missing = self.state().missing.clone();
        if let Some(v) = missing.first() {
            return Err(VaultError::Unavailable(
                format!(
                    "key version {v} is in use but not in this replica's {} keyring: {}",
                    keyring.kind(),
                    self.remedy(*v)
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// A cipher for a new owner: a fresh DEK, wrapped by the primary version.
    pub async fn new_cipher(&self, owner: KeyContext) -> Result<Cipher, VaultError> {
        let version = self.primary().await?;
        let dek = Key256::generate(crate::crypto::rng())?;
        let keyring = self.inner.keyring.as_ref();
        let ctx = owner.as_dek();
        let wrapped = self
            .with_version(version, || wrap_dek(keyring, version, &dek, &ctx))
            .await?;
        Ok(Cipher::new(Arc::new(dek), owner, wrapped))
    }

    /// A new connection's cipher (its record is about to be stored).
    pub async fn new_connection_cipher(
        &self,
        connection: &ConnectionRecord,
    ) -> Result<Cipher, VaultError> {
        self.new_cipher(KeyContext::connection(connection)).await
    }

    /// The cipher of an owner whose DEK is stored wrapped (an OAuth state's,
    /// an outbox row's); a DEK wrapped for another owner does not open.
    pub async fn open_cipher(
        &self,
        owner: KeyContext,
        wrapped: WrappedDek,
    ) -> Result<Cipher, VaultError> {
        let keyring = self.inner.keyring.as_ref();
        let ctx = owner.as_dek();
        let dek = self
            .with_version(wrapped.kek_version, || unwrap_dek(keyring, &wrapped, &ctx))
            .await?;
        Ok(Cipher::new(Arc::new(dek), owner, wrapped))
    }

    /// A stored connection's cipher, from the cache when these exact wrapped
    /// bytes were opened recently: a lease served from a cached record does
    /// not call the provider.
    pub async fn connection_cipher(
        &self,
        connection: &ConnectionRecord,
        secrets: &SecretsRecord,
    ) -> Result<Cipher, VaultError> {
        let owner = KeyContext::connection(connection);
        let wrapped = WrappedDek {
            kek_version: secrets.kek_version,
            bytes: secrets.wrapped_dek.clone(),
        };
        if let Some(key) = self.inner.deks.get(&connection.id, &wrapped) {
            metrics::counter!("tokenvault_dek_cache_total", "outcome" => "hit").increment(1);
            return Ok(Cipher::new(key, owner, wrapped));
        }
        metrics::counter!("tokenvault_dek_cache_total", "outcome" => "miss").increment(1);
        let epoch = self.inner.deks.epoch();
        let keyring = self.inner.keyring.as_ref();
        let ctx = owner.as_dek();
        let key = Arc::new(
            self.with_version(wrapped.kek_version, || unwrap_dek(keyring, &wrapped, &ctx))
                .await?,
        );
        self.inner
            .deks
            .put(&connection.id, &wrapped, key.clone(), epoch);
        Ok(Cipher::new(key, owner, wrapped))
    }

    /// Drops a connection's cached DEK (it was deleted or replaced).
    pub fn forget_connection(&self, connection: &ConnectionId) {
        self.inner.deks.forget(connection);
    }

    /// How many unwrapped DEKs this replica holds in memory (a gauge).
    pub fn cached_deks(&self) -> usize {
        self.inner.deks.len()
    }

    /// The status a reviewer reads.
    pub async fn status(&self) -> Result<KeyStatus, VaultError> {
        let i = &self.inner;
        let records = i.store.kek_list().await?;
        let counts = i.store.wrapped_key_counts().await?;
        let runs = i.store.rotation_list().await?;
        let replicas = i.store.replica_list().await?;
        let now = i.store.clock().await?;
        let primary = records
            .iter()
            .find(|k| k.state == KeyState::Primary)
            .ok_or_else(|| VaultError::precondition("no primary key version"))?;
        let count_of = |v: KekVersion, kind: WrappedKeyKind| {
            counts
                .iter()
                .filter(|c: &&WrappedKeyCount| c.version == v && c.kind == kind)
                .map(|c| c.count)
                .sum::<i64>()
        };
        let versions: Vec<VersionStatus> = records
            .iter()
            .map(|r| {
                let by_kind = WrappedKeyKind::ALL.map(|kind| count_of(r.version, kind));
                VersionStatus {
                    record: r.clone(),
                    dek_count: by_kind.iter().sum(),
                    by_kind,
                    holders: replicas
                        .iter()
                        .filter(|x| x.is_live(now) && x.versions.contains(&r.version))
                        .map(|x| x.replica_id.clone())
                        .collect(),
                }
            })
            .collect();
        let oldest = versions
            .iter()
            .find(|v| v.dek_count > 0)
            .map_or(primary, |v| &v.record)
            .clone();
        let age = now.since(oldest.created_at);
        let max_age = Duration::from_secs(u64::from(i.max_age_days) * 86_400);
        let mut rotations = Vec::with_capacity(runs.len());
        for run in runs {
            let done = match run.state.as_str() {
                "completed" => run.total,
                "running" => {
                    let left = i.store.wrapped_key_count_not_on(run.target_version).await?;
                    (run.total - left).clamp(0, run.total)
                }
                _ => run.rewrapped.min(run.total),
            };
            rotations.push(RotationStatus { run, done });
        }
        let rotation = rotations
            .iter()
            .find(|r| r.run.state == "running")
            .or_else(|| rotations.first())
            .cloned();
        Ok(KeyStatus {
            provider: i.keyring.kind(),
            replica_id: i.replica.id.clone(),
            primary: primary.version,
            versions,
            rotation,
            rotations,
            oldest_in_use: oldest.version,
            oldest_in_use_age: age,
            max_kek_age_days: i.max_age_days,
            rotation_overdue: age > max_age,
            replicas: replicas
                .into_iter()
                .map(|r| {
                    let live = r.is_live(now);
                    (r, live)
                })
                .collect(),
        })
    }

    /// Stops background work (a rotation resumes on the next start, or on
    /// another replica) and removes this replica's row.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        // A pass in flight could write the row again after it is removed.
        let task = self.state().task.take();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        if let Err(e) = self
            .inner
            .store
            .replica_remove(&self.inner.replica.id)
            .await
        {
            tracing::debug!(error = %e, "could not remove this replica's key registry row");
        }
    }

    /// Stops background work without touching the database.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }
}
