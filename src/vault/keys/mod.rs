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

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audit::{Actor, AuditLog, CheckpointSigner, Outcome};
use crate::config::Config;
use crate::crypto::{
    CryptoError, Custody, DekContext, KekVersion, Key256, KeyringProvider, MacPurpose, WrappedDek,
    unwrap_dek, wrap_dek,
};
use crate::domain::{ConnectionId, KeyState, ReceiptId, TenantId, Timestamp, VaultError};
use crate::store::{
    KekRecord, NewKek, ReplicaRecord, Rewrap, RotationRun, Store, WrappedKeyCount, WrappedKeyKind,
    WrappedKeyOwner,
};

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

/// The associated-data context of a wrapped key, owned.
pub(super) struct KeyContext {
    tenant: String,
    account: String,
    connection: String,
}

impl KeyContext {
    /// As the envelope functions take it.
    pub(super) fn as_dek(&self) -> DekContext<'_> {
        DekContext {
            tenant: &self.tenant,
            account: &self.account,
            connection: &self.connection,
        }
    }

    /// A pending authorization's key: bound to its tenant, account and state.
    pub(super) fn oauth_state(tenant: &str, account: &str, state_hash: &[u8]) -> Self {
        Self {
            tenant: tenant.to_owned(),
            account: account.to_owned(),
            connection: format!(
                "authz-{}",
                hex::encode(&state_hash[..state_hash.len().min(16)])
            ),
        }
    }

    /// A revocation-outbox key: bound to its receipt, tenant and connection.
    pub(super) fn outbox(
        receipt: &ReceiptId,
        tenant: &TenantId,
        connection: &ConnectionId,
    ) -> Self {
        Self {
            tenant: receipt.as_str().to_owned(),
            account: tenant.as_str().to_owned(),
            connection: connection.as_str().to_owned(),
        }
    }

    fn of(owner: &WrappedKeyOwner) -> Self {
        match owner {
            WrappedKeyOwner::Connection {
                id,
                tenant,
                account,
            } => Self {
                tenant: tenant.as_str().to_owned(),
                account: account.as_str().to_owned(),
                connection: id.as_str().to_owned(),
            },
            WrappedKeyOwner::OauthState {
                state_hash,
                tenant,
                account,
            } => Self::oauth_state(tenant.as_str(), account.as_str(), state_hash),
            WrappedKeyOwner::Outbox {
                receipt,
                connection,
                tenant,
            } => Self::outbox(receipt, tenant, connection),
        }
    }
}

/// Unwrapped connection DEKs, by connection.
struct DekCache {
    entries: Mutex<HashMap<ConnectionId, CachedDek>>,
    ttl: Duration,
    capacity: usize,
    /// Moves on every drop, so an unwrap that was in flight when its connection was
    /// dropped does not put the key back.
    epoch: std::sync::atomic::AtomicU64,
}

struct CachedDek {
    version: KekVersion,
    wrapped: Vec<u8>,
    key: Arc<Key256>,
    at: Instant,
}

impl DekCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, CachedDek>> {
        // A panic while holding the lock leaves a map that is still usable.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    fn get(&self, id: &ConnectionId, wrapped: &WrappedDek) -> Option<Arc<Key256>> {
        if !self.enabled() {
            return None;
        }
        let entries = self.lock();
        let e = entries.get(id)?;
        (e.at.elapsed() < self.ttl
            && e.version == wrapped.kek_version
            && e.wrapped == wrapped.bytes)
            .then(|| e.key.clone())
    }

    /// The epoch to pass to [`DekCache::put`] for an unwrap that starts now.
    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Caches `key`, unless something was dropped since `epoch` was read.
    fn put(&self, id: &ConnectionId, wrapped: &WrappedDek, key: Arc<Key256>, epoch: u64) {
        if !self.enabled() {
            return;
        }
        let mut entries = self.lock();
        if self.epoch() != epoch {
            return;
        }
        if entries.len() >= self.capacity && !entries.contains_key(id) {
            entries.retain(|_, e| e.at.elapsed() < self.ttl);
            if entries.len() >= self.capacity {
                // Full of live entries: make room by dropping any one.
                if let Some(victim) = entries.keys().next().cloned() {
                    entries.remove(&victim);
                }
            }
        }
        entries.insert(
            id.clone(),
            CachedDek {
                version: wrapped.kek_version,
                wrapped: wrapped.bytes.clone(),
                key,
                at: Instant::now(),
            },
        );
    }

    fn forget(&self, id: &ConnectionId) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.remove(id);
    }

    /// Drops every entry whose version is not in `usable`, and expired ones.
    fn keep_only(&self, usable: &BTreeSet<KekVersion>) {
        let mut entries = self.lock();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.retain(|_, e| usable.contains(&e.version) && e.at.elapsed() < self.ttl);
    }
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
                deks: DekCache {
                    entries: Mutex::new(HashMap::new()),
                    ttl: Duration::from_secs(config.lease.cache_ttl_seconds),
                    capacity: config.lease.cache_entries,
                    epoch: std::sync::atomic::AtomicU64::new(0),
                },
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
    fn remedy(&self, version: KekVersion) -> String {
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
    async fn check_root_keys(&self) -> Result<(), VaultError> {
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

    async fn root_key_fits_log(&self, name: &str, value: &[u8]) -> Result<bool, VaultError> {
        let store = &self.inner.store;
        if name == SIGNING_KEY_CHECK {
            return Ok(store
                .audit_checkpoint_last()
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
    async fn key_matches(&self, record: &KekRecord) -> Result<bool, VaultError> {
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

    fn mismatch(&self, version: KekVersion) -> VaultError {
        VaultError::precondition(format!(
            "key version {version} in this replica's {} keyring is not the key the key registry \
             records under that number (its key-check value does not open); it is not used: {}",
            self.inner.keyring.kind(),
            self.remedy(version)
        ))
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

    /// The versions this replica holds and may use: in its keyring and, where the registry
    /// knows the number, the same key the registry records.
    async fn held(&self, registry: &[KekRecord]) -> Result<BTreeSet<KekVersion>, VaultError> {
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
    async fn register(
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
    async fn sync_pass(&self) -> Result<(), VaultError> {
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
    async fn reload_provider(&self) -> Result<(), VaultError> {
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
    async fn erase_destroyed(&self, registry: &[KekRecord], held: &BTreeSet<KekVersion>) {
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
    fn note_missing(&self, registry: &[KekRecord], held: &BTreeSet<KekVersion>) {
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
    async fn heartbeat(&self, force: bool) -> Result<(), VaultError> {
        let registry = self.inner.store.kek_list().await?;
        let held = self.held(&registry).await?;
        self.write_heartbeat(&held, force).await
    }

    /// As [`KeyManager::heartbeat`], with what this replica holds already known.
    async fn write_heartbeat(
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
    async fn take_over_rotation(&self) -> Result<(), VaultError> {
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

    /// Creates a fresh key wrapped by the primary version.
    pub async fn new_dek(&self, ctx: &DekContext<'_>) -> Result<(Key256, WrappedDek), VaultError> {
        let version = self.primary().await?;
        let dek = Key256::generate(crate::crypto::rng())?;
        let keyring = self.inner.keyring.as_ref();
        let wrapped = self
            .with_version(version, || wrap_dek(keyring, version, &dek, ctx))
            .await?;
        Ok((dek, wrapped))
    }

    /// Opens a wrapped key (an OAuth state's, an outbox row's).
    pub async fn open_dek(
        &self,
        wrapped: &WrappedDek,
        ctx: &DekContext<'_>,
    ) -> Result<Key256, VaultError> {
        let keyring = self.inner.keyring.as_ref();
        self.with_version(wrapped.kek_version, || unwrap_dek(keyring, wrapped, ctx))
            .await
    }

    /// Opens a connection's DEK, from the cache when this exact wrapped key
    /// was opened recently: a lease served from a cached record does not call
    /// the provider.
    pub async fn open_connection_dek(
        &self,
        connection: &ConnectionId,
        wrapped: &WrappedDek,
        ctx: &DekContext<'_>,
    ) -> Result<Arc<Key256>, VaultError> {
        if let Some(key) = self.inner.deks.get(connection, wrapped) {
            metrics::counter!("tokenvault_dek_cache_total", "outcome" => "hit").increment(1);
            return Ok(key);
        }
        metrics::counter!("tokenvault_dek_cache_total", "outcome" => "miss").increment(1);
        let epoch = self.inner.deks.epoch();
        let key = Arc::new(self.open_dek(wrapped, ctx).await?);
        self.inner.deks.put(connection, wrapped, key.clone(), epoch);
        Ok(key)
    }

    /// Drops a connection's cached DEK (it was deleted or replaced).
    pub fn forget_connection(&self, connection: &ConnectionId) {
        self.inner.deks.forget(connection);
    }

    /// How many unwrapped DEKs this replica holds in memory (a gauge).
    pub fn cached_deks(&self) -> usize {
        self.inner.deks.lock().len()
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
    async fn start_run(
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

    async fn progress_of(&self, run: RotationRun) -> Result<RotationStatus, VaultError> {
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
    async fn rotation_target(
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
    async fn wait_for_holders(&self, target: KekVersion) -> Result<(), VaultError> {
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

    async fn check_transition(
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

    fn spawn_worker(&self, run: RotationRun) {
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

    async fn run_rotation(&self, run: RotationRun) {
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
    async fn rewrap_pass(&self, run: &RotationRun) -> Result<Option<u64>, VaultError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: Duration, capacity: usize) -> DekCache {
        DekCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn wrapped(version: u32, byte: u8) -> WrappedDek {
        WrappedDek {
            kek_version: KekVersion::new(version).unwrap(),
            bytes: vec![byte; 65],
        }
    }

    #[test]
    fn the_dek_cache_answers_only_for_the_exact_wrapped_key() {
        let c = cache(Duration::from_secs(30), 10);
        let id = ConnectionId::from_stored("conn_a".into());
        let w = wrapped(1, 7);
        c.put(&id, &w, Arc::new(Key256::from_bytes([1; 32])), c.epoch());
        assert!(c.get(&id, &w).is_some());
        // Rewrapped elsewhere (new bytes or version): a miss, never the old key.
        assert!(c.get(&id, &wrapped(1, 8)).is_none());
        assert!(c.get(&id, &wrapped(2, 7)).is_none());
        c.forget(&id);
        assert!(c.get(&id, &w).is_none());
        // An unwrap that started before the connection was dropped does not put it back.
        let before = c.epoch();
        c.forget(&id);
        c.put(&id, &w, Arc::new(Key256::from_bytes([1; 32])), before);
        assert!(c.get(&id, &w).is_none());
    }

    #[test]
    fn the_dek_cache_is_bounded_expires_and_drops_unusable_versions() {
        let c = cache(Duration::from_secs(30), 2);
        let ids: Vec<_> = (0..3)
            .map(|n| ConnectionId::from_stored(format!("conn_{n}")))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            c.put(
                id,
                &wrapped(1 + n as u32 % 2, 1),
                Arc::new(Key256::from_bytes([2; 32])),
                c.epoch(),
            );
        }
        assert_eq!(c.lock().len(), 2, "capacity holds");
        let usable: BTreeSet<KekVersion> = [KekVersion::new(2).unwrap()].into();
        c.keep_only(&usable);
        assert!(c.lock().values().all(|e| e.version.get() == 2));

        let expired = cache(Duration::from_millis(1), 10);
        expired.put(
            &ids[0],
            &wrapped(1, 1),
            Arc::new(Key256::from_bytes([3; 32])),
            expired.epoch(),
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(expired.get(&ids[0], &wrapped(1, 1)).is_none());

        let off = cache(Duration::ZERO, 10);
        off.put(
            &ids[0],
            &wrapped(1, 1),
            Arc::new(Key256::from_bytes([4; 32])),
            off.epoch(),
        );
        assert!(off.lock().is_empty(), "a zero TTL turns the cache off");
    }
}
