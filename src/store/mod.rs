//! Storage behind one trait, with one implementation per backend: SQLite (the
//! embedded default) and PostgreSQL (production, shared by replicas). Both
//! implementations share their SQL text (`sql_common.rs`); methods are named
//! resource-first and every method that changes several rows does so in one
//! transaction.

mod postgres;
mod records;
mod sqlite;

use std::str::FromStr;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use records::*;
pub use sqlite::SqliteStore;

use crate::crypto::KekVersion;
use crate::domain::{ConnectionId, LeaseId, ReceiptId, Timestamp, UpstreamState, VaultError};

/// Result alias for storage calls.
pub type StoreResult<T> = Result<T, VaultError>;

/// Which database engine a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file (the embedded default).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Computes an audit entry's hash, MAC and (at checkpoint positions) signed
/// checkpoint given its sequence number and the previous entry's hash;
/// supplied by the audit component so that the store never holds the audit key.
pub type AuditSealer<'a> = &'a (dyn Fn(i64, &[u8], &AuditDraft) -> SealedEntry + Sync);

/// Everything the vault persists.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The engine behind this store.
    fn backend(&self) -> Backend;

    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Closes the pool, waiting for checked-out connections.
    async fn close(&self);

    // ----- the key registry: KEK versions, root-key checks, replicas -------------------

    /// Every KEK version the database knows, oldest first.
    async fn kek_list(&self) -> StoreResult<Vec<KekRecord>>;

    /// Records a version whose material a keyring holds; no-op if known. The first version
    /// registered becomes primary. `key_check` is a known value wrapped by the version,
    /// checked at every start.
    async fn kek_register(&self, kek: &NewKek<'_>) -> StoreResult<()>;

    /// Makes an ACTIVE `version` primary; the previous primary becomes active. Refused
    /// (FailedPrecondition) for a retired or destroyed version.
    async fn kek_promote(&self, version: KekVersion, at: Timestamp, actor: &str)
    -> StoreResult<()>;

    /// Marks a version retired or destroyed, refusing (FailedPrecondition) while any
    /// wrapped key or running rotation still references it.
    async fn kek_set_state(
        &self,
        version: KekVersion,
        state: crate::domain::KeyState,
        at: Timestamp,
        actor: &str,
    ) -> StoreResult<()>;

    /// How many wrapped keys of each kind reference each version.
    async fn wrapped_key_counts(&self) -> StoreResult<Vec<WrappedKeyCount>>;

    /// The key-check value recorded under `name`, if any.
    async fn root_key_check_get(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Records a key-check value under `name` unless one is recorded already; returns the
    /// value recorded (which may be another replica's, written first).
    async fn root_key_check_put(
        &self,
        name: &str,
        value: &[u8],
        at: Timestamp,
    ) -> StoreResult<Vec<u8>>;

    /// Claims `name` for `holder` unless another holder claimed it less than `ttl` ago (by
    /// the database's clock); returns the holder now recorded.
    async fn keyring_claim(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<String>;

    /// The database's clock, which every replica's heartbeat is stamped and judged by.
    async fn clock(&self) -> StoreResult<Timestamp>;

    /// Writes (inserts or replaces) a replica's row, stamping `seen_at` with the
    /// database's clock (the record's own `seen_at` is ignored).
    async fn replica_upsert(&self, replica: &ReplicaRecord) -> StoreResult<()>;

    /// Every replica row, live or not, by id.
    async fn replica_list(&self) -> StoreResult<Vec<ReplicaRecord>>;

    /// Deletes a replica's row (at clean shutdown).
    async fn replica_remove(&self, replica_id: &str) -> StoreResult<()>;

    // ----- connections and their sealed secrets -------------------------------------

    /// Inserts a connection with its secrets, replacing (deleting) any live
    /// connection of the same tenant, account and integration. Returns the id
    /// of the replaced connection, if any.
    async fn connection_upsert(
        &self,
        connection: &ConnectionRecord,
        secrets: &SecretsRecord,
    ) -> StoreResult<Option<ConnectionId>>;

    /// Inserts many new connections with their secrets in one transaction
    /// (bulk import and seeding). Fails if any collides with a live connection.
    async fn connection_import(
        &self,
        rows: &[(ConnectionRecord, SecretsRecord)],
    ) -> StoreResult<()>;

    /// One connection by id, tombstones included.
    async fn connection_get(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>>;

    /// Connections matching a filter, ordered by id, after `page.after`.
    async fn connection_list(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ConnectionRecord>>;

    /// As [`Store::connection_list`], each with its administrative detail
    /// (leases counted as open at `at`), in one query.
    async fn connection_details(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
        at: Timestamp,
    ) -> StoreResult<Vec<ConnectionDetailRecord>>;

    /// One connection by id, tombstones included, with its administrative
    /// detail (leases counted as open at `at`), in one query.
    async fn connection_detail(
        &self,
        id: &ConnectionId,
        at: Timestamp,
    ) -> StoreResult<Option<ConnectionDetailRecord>>;

    /// The wrapped DEK and sealed tokens of a live connection.
    async fn secrets_get(&self, id: &ConnectionId) -> StoreResult<Option<SecretsRecord>>;

    /// The live connection of an account's integration, if any.
    async fn connection_live(
        &self,
        tenant: &crate::domain::TenantId,
        account: &crate::domain::AccountId,
        integration: crate::domain::Integration,
    ) -> StoreResult<Option<ConnectionRecord>>;

    /// Whether the live connection of this integration of the account holds
    /// a refresh token (and, when `google_email` is given, is linked to that
    /// Google account): whether connecting it again can do without a consent
    /// screen.
    async fn refresh_token_held(
        &self,
        tenant: &crate::domain::TenantId,
        account: &crate::domain::AccountId,
        integration: crate::domain::Integration,
        google_email: Option<&str>,
    ) -> StoreResult<bool>;

    // ----- OAuth authorization states ------------------------------------------------

    /// Records a pending authorization.
    async fn authz_insert(&self, state: &AuthzStateRecord) -> StoreResult<()>;

    /// Consumes a state: single use, atomically.
    async fn authz_consume(&self, state_hash: &[u8], at: Timestamp) -> StoreResult<AuthzConsume>;

    /// Deletes states that expired before `before`; returns how many.
    async fn authz_purge(&self, before: Timestamp) -> StoreResult<u64>;

    // ----- refresh single-flight -----------------------------------------------------

    /// Takes the refresh lock of a connection unless someone holds an unexpired
    /// one; returns the fencing token.
    async fn refresh_lock_acquire(
        &self,
        id: &ConnectionId,
        holder: &str,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> StoreResult<Option<i64>>;

    /// Extends a refresh lock this holder still holds (same fence) to
    /// `expires_at`; false when it was released or taken over.
    async fn refresh_lock_renew(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
        expires_at: Timestamp,
    ) -> StoreResult<bool>;

    /// Releases a refresh lock this holder still holds.
    async fn refresh_lock_release(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
    ) -> StoreResult<()>;

    /// Claims up to `limit` ACTIVE connections whose next check is due at
    /// `now` for the proactive refresh sweeper, moving their next check to
    /// `claim_until` so that no other replica takes them meanwhile.
    async fn refresh_claim_due(
        &self,
        now: Timestamp,
        claim_until: Timestamp,
        limit: i64,
    ) -> StoreResult<Vec<ConnectionId>>;

    /// ACTIVE connections whose next check is due at `now`.
    async fn refresh_due_count(&self, now: Timestamp) -> StoreResult<i64>;

    /// Records a failed refresh of an ACTIVE connection and when to try again.
    async fn refresh_note_error(
        &self,
        id: &ConnectionId,
        error: &str,
        at: Timestamp,
        next_check_at: Timestamp,
    ) -> StoreResult<()>;

    /// Stores refreshed tokens if this holder still holds the lock with this
    /// fence; false (nothing written) otherwise. Records the refresh in the
    /// connection's refresh health.
    async fn secrets_refresh(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
        tokens: &RefreshedTokens<'_>,
    ) -> StoreResult<bool>;

    // ----- key rotation -------------------------------------------------------------

    /// Starts a rotation run; fails with FailedPrecondition if one is running.
    async fn rotation_insert(&self, run: &RotationRun) -> StoreResult<()>;

    /// The running rotation, if any.
    async fn rotation_running(&self) -> StoreResult<Option<RotationRun>>;

    /// Every rotation run, newest first.
    async fn rotation_list(&self) -> StoreResult<Vec<RotationRun>>;

    /// Sets a run's total: the wrapped keys not on its target once the target is primary.
    async fn rotation_set_total(&self, run_id: &str, total: i64) -> StoreResult<()>;

    /// Makes `owner` the replica running a run, if it is still running and still owned by
    /// `previous` (compare-and-swap); returns whether it did.
    async fn rotation_claim(&self, run_id: &str, previous: &str, owner: &str) -> StoreResult<bool>;

    /// How many wrapped keys, of every kind, are not on `target` (index range counts).
    async fn wrapped_key_count_not_on(&self, target: KekVersion) -> StoreResult<i64>;

    /// Scans the next `limit` wrapped keys of `kind` in key order after `after` (the owner
    /// of the last row a previous call scanned); returns those not on `target` and the last
    /// owner scanned (None at the end).
    async fn wrapped_key_scan(
        &self,
        kind: WrappedKeyKind,
        target: KekVersion,
        after: Option<&WrappedKeyOwner>,
        limit: i64,
    ) -> StoreResult<(Vec<WrappedKeyRow>, Option<WrappedKeyOwner>)>;

    /// Replaces wrapped keys in one transaction, each only if it still holds what was read
    /// (compare-and-swap), and adds the count to the run's progress — all only while the run
    /// is running and owned by `owner`. Returns how many rows were replaced, or `None` (and
    /// changes nothing) when the run is no longer `owner`'s to work on.
    async fn wrapped_key_rewrap(
        &self,
        run_id: &str,
        owner: &str,
        rewraps: &[Rewrap],
    ) -> StoreResult<Option<u64>>;

    /// Marks a run finished with a final state (and why, if it failed).
    async fn rotation_finish(
        &self,
        run_id: &str,
        state: &str,
        error: Option<&str>,
        at: Timestamp,
    ) -> StoreResult<()>;

    // ----- audit log ---------------------------------------------------------------

    /// Appends entries to the hash chain in one transaction, serialised against
    /// every other appender (on every replica). Returns the assigned sequence
    /// numbers.
    ///
    /// `leases` are recorded in the same transaction, each only if its
    /// connection is still ACTIVE and unchanged there (a deletion,
    /// suspension or re-consent that committed first wins); the ids of the
    /// leases recorded are returned with the sequence numbers.
    async fn audit_append(
        &self,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<(Vec<i64>, Vec<String>)>;

    /// Connections with their sealed secrets, many at once (the lease path's
    /// batched read). Unknown ids are absent from the result.
    async fn lease_lookup(
        &self,
        ids: &[ConnectionId],
    ) -> StoreResult<Vec<(ConnectionRecord, Option<SecretsRecord>)>>;

    /// Audit entries in sequence order within `[from_seq, to_seq]`, at most `limit`.
    async fn audit_range(
        &self,
        from_seq: i64,
        to_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditRow>>;

    /// Audit entries matching a filter, in the filter's order.
    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>>;

    /// The chain head: last sequence number and hash (0 and empty when empty).
    async fn audit_head(&self) -> StoreResult<(i64, Vec<u8>)>;

    /// Signed checkpoints with `from_seq <= seq <= to_seq`, ascending.
    async fn audit_checkpoints(
        &self,
        from_seq: i64,
        to_seq: i64,
    ) -> StoreResult<Vec<AuditCheckpoint>>;

    /// The checkpoint with the highest sequence number, if any.
    async fn audit_checkpoint_last(&self) -> StoreResult<Option<AuditCheckpoint>>;

    // ----- leases ------------------------------------------------------------------

    /// One lease.
    async fn lease_get(&self, id: &LeaseId) -> StoreResult<Option<LeaseRecord>>;

    /// Ends a lease now unless it already ended; returns when it ended
    /// (`None`: no such lease).
    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>>;

    /// Leases neither revoked nor expired at `at` (of one connection, when given).
    async fn lease_open_count(
        &self,
        at: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64>;

    /// Deletes lease rows that ended before `before`.
    async fn lease_prune(&self, before: Timestamp) -> StoreResult<u64>;

    // ----- events ------------------------------------------------------------------

    /// The newest cursor and the pruning watermark.
    async fn event_state(&self) -> StoreResult<EventLogState>;

    /// Events with a cursor above `after`, in cursor order, at most `limit`.
    async fn events_after(&self, after: i64, limit: i64) -> StoreResult<Vec<EventRecord>>;

    /// Appends events (cursor order is commit order, on every replica).
    async fn events_append(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>>;

    /// A consumer's durable position (0 for a new consumer).
    async fn consumer_position(&self, consumer: &str) -> StoreResult<i64>;

    /// Moves a consumer's position to max(stored, cursor), stamps its ack on
    /// the receipts of the events passed and completes receipts that were
    /// waiting only for it. Returns the new position.
    async fn consumer_ack(&self, consumer: &str, cursor: i64, at: Timestamp) -> StoreResult<i64>;

    // ----- deletion ----------------------------------------------------------------

    /// Runs a deletion in one transaction: destroys tokens and DEKs, leaves
    /// tombstones (status REVOKED_UPSTREAM when the reason is the user's
    /// revocation at Google, else DELETED), revokes open leases, writes the
    /// events, the receipt, the outbox rows for the revocations Google must
    /// confirm — at most one per Google grant — and the `deletion.done` audit
    /// entry, sealed by `sealer`.
    async fn connection_delete(
        &self,
        req: &DeletionRequest,
        sealer: AuditSealer<'_>,
    ) -> StoreResult<DeletionOutcome>;

    /// The receipt of the deletion that removed a connection, if any.
    async fn receipt_of_connection(&self, id: &ConnectionId) -> StoreResult<Option<ReceiptId>>;

    /// A receipt with its parts.
    async fn receipt_get(&self, id: &ReceiptId) -> StoreResult<Option<ReceiptRecord>>;

    /// Receipts matching a filter, by receipt id.
    async fn receipt_list(
        &self,
        filter: &ReceiptFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ReceiptRecord>>;

    /// How many receipts are incomplete and were requested before `before`.
    async fn receipt_incomplete_count(&self, before: Timestamp) -> StoreResult<i64>;

    /// Deletes what is past retention: tombstones and their receipts
    /// (complete ones), RISC token ids, and events every required consumer
    /// acknowledged. Returns rows deleted.
    async fn retention_prune(&self, before: Timestamp, consumers: &[String]) -> StoreResult<u64>;

    /// Pending revocations whose next attempt is due at `now` (of one receipt
    /// only, when given), oldest first, each claimed for a minute so other
    /// replicas skip it.
    async fn outbox_due(
        &self,
        now: Timestamp,
        receipt: Option<&ReceiptId>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxRow>>;

    /// The pending revocations (count, oldest queued time).
    async fn outbox_depth(&self) -> StoreResult<(i64, Option<Timestamp>)>;

    /// Live connections (not deleted) on a Google account.
    async fn connections_by_subject(&self, subject: &str) -> StoreResult<Vec<ConnectionRecord>>;

    /// Suspends (`suspend`) the ACTIVE connections of a Google account, or
    /// resumes its SUSPENDED ones, in one transaction: their open leases are
    /// revoked on suspension, and a SUSPENDED or RESUMED event is written per
    /// connection. Returns the connections changed.
    async fn connections_suspend(
        &self,
        subject: &str,
        suspend: bool,
        detail: &str,
        at: Timestamp,
    ) -> StoreResult<Vec<ConnectionId>>;

    /// Records a RISC token id; false when it was seen before.
    async fn risc_seen_insert(&self, jti: &str, at: Timestamp) -> StoreResult<bool>;

    /// Whether a RISC token id was seen before.
    async fn risc_seen(&self, jti: &str) -> StoreResult<bool>;

    /// Records a failed attempt and when to try next.
    async fn outbox_retry(
        &self,
        receipt: &ReceiptId,
        connection: &ConnectionId,
        at: Timestamp,
        next_at: Timestamp,
        error: &str,
    ) -> StoreResult<()>;

    /// Settles a revocation (confirmed or failed): destroys the retained
    /// token and completes the receipt if nothing else is outstanding.
    async fn outbox_settle(
        &self,
        receipt: &ReceiptId,
        connection: &ConnectionId,
        state: UpstreamState,
        at: Timestamp,
        error: Option<&str>,
    ) -> StoreResult<()>;
}

/// Opens the store named by a database URL and applies migrations.
pub async fn open(database_url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PostgresStore::connect(database_url).await?,
        ))
    } else if database_url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            SqliteStore::connect(database_url).await?,
        ))
    } else {
        Err(VaultError::invalid(
            "database_url",
            "must start with sqlite: or postgres://",
        ))
    }
}

/// Validates a database URL without connecting (for configuration checks).
pub fn validate_url(database_url: &str) -> Result<(), String> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(database_url)
            .map(drop)
            .map_err(|e| format!("not a valid PostgreSQL URL ({e})"))
    } else if database_url.starts_with("sqlite:") {
        sqlx::sqlite::SqliteConnectOptions::from_str(database_url)
            .map(drop)
            .map_err(|e| format!("not a valid SQLite URL ({e})"))
    } else {
        Err("must start with sqlite: or postgres://".to_owned())
    }
}
