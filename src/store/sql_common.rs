// The store implementation shared by both backends. It is `include!`d by
// `sqlite.rs` and `postgres.rs`, each of which defines:
//   type Db; struct Store type `Self` with `pool`; const BACKEND; const FOR_UPDATE: &str
//   (" FOR UPDATE" on Postgres, "" on SQLite, whose write transactions are
//   serialised); `write_guard()` (SQLite's one-writer lock, nothing on
//   Postgres); `begin_write()` returning (guard, transaction); `ID_IN_LIST` and
//   `id_list()` for the batched lease read; and `append_on()`, which seals and
//   writes an audit batch on one connection.
// SQL uses `$N` placeholders in ascending order of first use, which both
// drivers bind by number.

use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, DeletionReason, EventKind, Integration, KeyState,
    LeaseId, ReceiptId, ScopeSet, TenantId, Timestamp, UpstreamState, VaultError,
};
use crate::store::{
    AuthzConsume, AuthzStateRecord, RefreshedTokens,
    AuditCheckpoint, AuditDraft, AuditFilter, AuditRow, AuditSealer, Backend, ConnectionDetailRecord, ConnectionFilter, ConnectionRecord,
    DeletedConnection, DeletionOutcome, DeletionRequest, DeletionTarget, EventLogState,
    EventRecord, KekRecord, LeaseGrant, LeaseRecord, NewEvent, OutboxRow, OutboxToken, PageRequest,
    NewKek, ReceiptConnection, ReceiptFilter, ReceiptRecord, ReplicaRecord, Rewrap, RotationRun,
    SecretsRecord, StoreResult, WrappedKeyCount, WrappedKeyKind, WrappedKeyOwner, WrappedKeyRow,
};

/// The audit chain's head: the last entry's sequence number and hash.
type ChainHead = (i64, Vec<u8>);

/// The lease path's batched read: connections with their wrapped DEK and
/// sealed tokens, for the ids in `$1` (bound with `id_list`).
static LEASE_LOOKUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT c.connection_id, c.tenant_id, c.account_id, c.integration, \
     c.google_subject, c.google_email, c.granted_scopes, c.status, c.status_reason, c.created_at, \
     c.updated_at, c.deleted_at, c.last_refresh_at, c.last_refresh_error, c.last_refresh_error_at, \
     c.next_check_at, d.kek_version, d.wrapped_dek, s.access_token, \
     s.access_expires_at, s.refresh_token, s.updated_at AS secrets_updated_at \
     FROM connections c \
     LEFT JOIN connection_deks d ON d.connection_id = c.connection_id \
     LEFT JOIN connection_secrets s ON s.connection_id = c.connection_id \
     WHERE c.connection_id {ID_IN_LIST}"
    )
});

/// A connection kept checked out of the pool for a hot path (the audit
/// writer, the lease reader). A pooled query pays a checkout and, when the
/// connection goes back, a ping round trip; a held connection pays them once.
/// It goes back to the pool (which tests it) after any error, so a broken
/// connection is replaced by a fresh one on the next use.
#[derive(Default)]
struct HeldConnection(tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<Db>>>);

/// Exclusive use of a [`HeldConnection`]; `fresh` when it was just checked
/// out of the pool.
struct Held<'a> {
    guard: tokio::sync::MutexGuard<'a, Option<sqlx::pool::PoolConnection<Db>>>,
    fresh: bool,
}

impl HeldConnection {
    /// Waits for the connection, checking one out if none is held.
    async fn lock(&self, pool: &sqlx::Pool<Db>) -> StoreResult<Held<'_>> {
        Held::fill(self.0.lock().await, pool).await
    }

    /// The connection if no one else is using it.
    async fn try_lock(&self, pool: &sqlx::Pool<Db>) -> Option<StoreResult<Held<'_>>> {
        let guard = self.0.try_lock().ok()?;
        Some(Held::fill(guard, pool).await)
    }

    /// Returns the connection to the pool (before the pool closes).
    async fn release(&self) {
        self.0.lock().await.take();
    }
}

impl<'a> Held<'a> {
    async fn fill(
        mut guard: tokio::sync::MutexGuard<'a, Option<sqlx::pool::PoolConnection<Db>>>,
        pool: &sqlx::Pool<Db>,
    ) -> StoreResult<Self> {
        let fresh = guard.is_none();
        if fresh {
            *guard = Some(pool.acquire().await?);
        }
        Ok(Self { guard, fresh })
    }

    fn conn(&mut self) -> StoreResult<&mut <Db as sqlx::Database>::Connection> {
        match self.guard.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(VaultError::Internal("held connection missing".into())),
        }
    }

    /// Gives the connection back to the pool after an error.
    fn discard_on_error<T>(mut self, result: StoreResult<T>) -> StoreResult<T> {
        if result.is_err() {
            self.guard.take();
        }
        result
    }
}

/// The connections the hot paths keep checked out.
#[derive(Default)]
struct HotConnections {
    /// The audit writer's.
    writer: HeldConnection,
    /// The lease reader's; a read finding all of them busy uses the pool.
    readers: [HeldConnection; 3],
}

impl HotConnections {
    async fn release(&self) {
        self.writer.release().await;
        for r in &self.readers {
            r.release().await;
        }
    }
}

impl StoreImpl {
    /// Appends on the audit writer's held connection (each backend's
    /// `append_on` seals and writes), holding the backend's write guard; the
    /// connection goes back to the pool after an error.
    async fn append_sealing(
        &self,
        cached: Option<ChainHead>,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<Appended> {
        let _guard = self.write_guard().await;
        let mut held = self.hot.writer.lock(&self.pool).await?;
        let fresh = held.fresh;
        let result = async {
            let conn = held.conn()?;
            if fresh {
                prepare_audit_connection(conn).await?;
            }
            append_on(conn, cached, drafts, leases, sealer).await
        }
        .await;
        held.discard_on_error(result)
    }
}

/// One audit entry sealed onto the chain.
struct SealedRow<'a> {
    seq: i64,
    prev_hash: Vec<u8>,
    entry_hash: Vec<u8>,
    mac: Vec<u8>,
    draft: &'a AuditDraft,
}

/// A group of audit entries sealed onto a known chain head, ready to insert.
struct SealedBatch<'a> {
    /// The head the batch extends; the insert happens only if it still is.
    from: ChainHead,
    /// The head after the batch.
    to: ChainHead,
    entries: Vec<SealedRow<'a>>,
    checkpoints: Vec<AuditCheckpoint>,
}

/// What an append wrote: the new head, the entries' sequence numbers and the
/// ids of the leases recorded.
type Appended = (ChainHead, Vec<i64>, Vec<String>);

impl SealedBatch<'_> {
    fn appended(self, recorded: Vec<String>) -> Appended {
        let seqs = self.entries.iter().map(|e| e.seq).collect();
        (self.to, seqs, recorded)
    }
}

async fn read_audit_head<'c, E: sqlx::Executor<'c, Database = Db>>(
    db: E,
    sql: &'static str,
) -> StoreResult<ChainHead> {
    match sqlx::query_as::<_, (i64, Vec<u8>)>(sql).fetch_optional(db).await? {
        Some(head) => Ok(head),
        None => Err(VaultError::Internal("audit_head row missing".into())),
    }
}

fn seal_batch<'a>(from: ChainHead, drafts: &'a [AuditDraft], sealer: AuditSealer<'_>) -> SealedBatch<'a> {
    let (mut seq, mut prev) = from.clone();
    let mut entries = Vec::with_capacity(drafts.len());
    let mut checkpoints = Vec::new();
    for draft in drafts {
        seq += 1;
        let sealed = sealer(seq, &prev, draft);
        checkpoints.extend(sealed.checkpoint);
        let prev_hash = std::mem::replace(&mut prev, sealed.entry_hash.clone());
        entries.push(SealedRow { seq, prev_hash, entry_hash: sealed.entry_hash, mac: sealed.mac, draft });
    }
    SealedBatch { from, to: (seq, prev), entries, checkpoints }
}

fn opt_parse<T>(v: Option<&str>, parse: impl Fn(&str) -> Result<T, VaultError>, column: &str) -> StoreResult<Option<T>> {
    v.map(|v| stored(parse(v), column)).transpose()
}

fn lease_from_row(row: &Row) -> StoreResult<LeaseRecord> {
    Ok(LeaseRecord {
        lease_id: LeaseId::from_stored(row.try_get("lease_id")?),
        connection_id: ConnectionId::from_stored(row.try_get("connection_id")?),
        caller: row.try_get("caller")?,
        purpose: row.try_get("purpose")?,
        scopes: row.try_get("scopes")?,
        token_fingerprint: row.try_get("token_fingerprint")?,
        granted_at: ts(row.try_get("granted_at")?),
        expires_at: ts(row.try_get("expires_at")?),
        revoked_at: opt_ts(row.try_get("revoked_at")?),
        revoke_reason: row.try_get("revoke_reason")?,
    })
}

fn event_from_row(row: &Row) -> StoreResult<EventRecord> {
    Ok(EventRecord {
        cursor: row.try_get("cursor")?,
        event: NewEvent {
            kind: stored(EventKind::parse(row.try_get::<&str, _>("kind")?), "kind")?,
            occurred_at: ts(row.try_get("occurred_at")?),
            tenant: row.try_get::<Option<String>, _>("tenant_id")?.map(TenantId::from_stored),
            account: row.try_get::<Option<String>, _>("account_id")?.map(AccountId::from_stored),
            connection_id: row
                .try_get::<Option<String>, _>("connection_id")?
                .map(ConnectionId::from_stored),
            integration: opt_parse(row.try_get("integration")?, Integration::parse, "integration")?,
            lease_id: row.try_get::<Option<String>, _>("lease_id")?.map(LeaseId::from_stored),
            receipt_id: row.try_get::<Option<String>, _>("receipt_id")?.map(ReceiptId::from_stored),
            reason: opt_parse(row.try_get("reason")?, DeletionReason::parse, "reason")?,
            detail: row.try_get("detail")?,
        },
    })
}

/// Appends events inside a write transaction, after taking the event-order lock.
async fn insert_events(tx: &mut sqlx::Transaction<'static, Db>, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(lock) = EVENT_ORDER_LOCK {
        sqlx::query(lock).execute(&mut **tx).await?;
    }
    let mut cursors = Vec::with_capacity(events.len());
    for e in events {
        let cursor: i64 = sqlx::query_scalar(
            "INSERT INTO events (kind, occurred_at, tenant_id, account_id, connection_id, integration, \
             lease_id, receipt_id, reason, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             RETURNING cursor",
        )
        .bind(e.kind.as_str())
        .bind(e.occurred_at.as_micros())
        .bind(e.tenant.as_ref().map(|t| t.as_str()))
        .bind(e.account.as_ref().map(|a| a.as_str()))
        .bind(e.connection_id.as_ref().map(|c| c.as_str()))
        .bind(e.integration.map(|i| i.as_str()))
        .bind(e.lease_id.as_ref().map(|l| l.as_str()))
        .bind(e.receipt_id.as_ref().map(|r| r.as_str()))
        .bind(e.reason.map(|r| r.as_str()))
        .bind(&e.detail)
        .fetch_one(&mut **tx)
        .await?;
        cursors.push(cursor);
    }
    Ok(cursors)
}

/// An event about one connection; lease, receipt and reason are set by the caller.
fn connection_event(kind: EventKind, c: &ConnectionRecord, at: Timestamp, detail: &str) -> NewEvent {
    NewEvent {
        kind,
        occurred_at: at,
        tenant: Some(c.tenant.clone()),
        account: Some(c.account.clone()),
        connection_id: Some(c.id.clone()),
        integration: Some(c.integration),
        lease_id: None,
        receipt_id: None,
        reason: None,
        detail: detail.to_owned(),
    }
}

/// Ends a connection's open leases inside a write transaction and queues a
/// LEASE_REVOKED event, copied from `template`, for each.
async fn revoke_open_leases(
    tx: &mut sqlx::Transaction<'static, Db>,
    connection: &ConnectionId,
    at: Timestamp,
    reason: &str,
    template: &NewEvent,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    let revoked: Vec<String> = sqlx::query_scalar(
        "UPDATE leases SET revoked_at = $1, revoke_reason = $2 \
         WHERE connection_id = $3 AND revoked_at IS NULL AND expires_at > $1 RETURNING lease_id",
    )
    .bind(at.as_micros())
    .bind(reason)
    .bind(connection.as_str())
    .fetch_all(&mut **tx)
    .await?;
    events.extend(revoked.into_iter().map(|lease| NewEvent {
        kind: EventKind::LeaseRevoked,
        lease_id: Some(LeaseId::from_stored(lease)),
        ..template.clone()
    }));
    Ok(())
}

/// Ends a write-lock guard early (on PostgreSQL the guard is `()`).
fn release<G>(_guard: G) {}

/// Marks complete every receipt with no outstanding ack or revocation.
async fn complete_receipts(tx: &mut sqlx::Transaction<'static, Db>, at: Timestamp) -> StoreResult<u64> {
    Ok(sqlx::query(
        "UPDATE deletion_receipts SET completed_at = $1 WHERE completed_at IS NULL \
         AND NOT EXISTS (SELECT 1 FROM receipt_acks a \
             WHERE a.receipt_id = deletion_receipts.receipt_id AND a.acknowledged_at IS NULL) \
         AND NOT EXISTS (SELECT 1 FROM receipt_connections c \
             WHERE c.receipt_id = deletion_receipts.receipt_id AND c.upstream_state = 'pending')",
    )
    .bind(at.as_micros())
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

type Row = <Db as sqlx::Database>::Row;

fn kek_from_db(v: i64) -> StoreResult<KekVersion> {
    u32::try_from(v)
        .ok()
        .and_then(KekVersion::new)
        .ok_or_else(|| VaultError::Storage(format!("kek version {v} out of range")))
}

fn kek_to_db(v: KekVersion) -> i64 {
    i64::from(v.get())
}

fn ts(v: i64) -> Timestamp {
    Timestamp::from_micros(v)
}

fn opt_ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp::from_micros)
}

fn stored<T>(parsed: Result<T, VaultError>, column: &str) -> StoreResult<T> {
    parsed.map_err(|e| VaultError::Storage(format!("column {column} holds an invalid value: {e}")))
}

const CONNECTION_COLUMNS: &str = "connection_id, tenant_id, account_id, integration, google_subject, \
     google_email, granted_scopes, status, status_reason, created_at, updated_at, deleted_at, \
     last_refresh_at, last_refresh_error, last_refresh_error_at, next_check_at";

fn connection_from_row(row: &Row) -> StoreResult<ConnectionRecord> {
    Ok(ConnectionRecord {
        id: ConnectionId::from_stored(row.try_get("connection_id")?),
        tenant: TenantId::from_stored(row.try_get("tenant_id")?),
        account: AccountId::from_stored(row.try_get("account_id")?),
        integration: stored(
            Integration::parse(row.try_get::<&str, _>("integration")?),
            "integration",
        )?,
        google_subject: row.try_get("google_subject")?,
        google_email: row.try_get("google_email")?,
        granted_scopes: stored(
            ScopeSet::parse_spaced(row.try_get::<&str, _>("granted_scopes")?),
            "granted_scopes",
        )?,
        status: stored(
            ConnectionStatus::parse(row.try_get::<&str, _>("status")?),
            "status",
        )?,
        status_reason: row.try_get("status_reason")?,
        created_at: ts(row.try_get("created_at")?),
        updated_at: ts(row.try_get("updated_at")?),
        deleted_at: opt_ts(row.try_get("deleted_at")?),
        health: crate::store::RefreshHealth {
            last_refresh_at: opt_ts(row.try_get("last_refresh_at")?),
            last_error: row.try_get("last_refresh_error")?,
            last_error_at: opt_ts(row.try_get("last_refresh_error_at")?),
            next_check_at: opt_ts(row.try_get("next_check_at")?),
        },
    })
}

fn secrets_from_row(row: &Row) -> StoreResult<SecretsRecord> {
    secrets_from_columns(row, "updated_at")
}

/// The secrets columns of a row whose secrets' `updated_at` is named
/// `updated_at_column` (joins with `connections` alias it).
fn secrets_from_columns(row: &Row, updated_at_column: &str) -> StoreResult<SecretsRecord> {
    Ok(SecretsRecord {
        connection_id: ConnectionId::from_stored(row.try_get("connection_id")?),
        kek_version: kek_from_db(row.try_get("kek_version")?)?,
        wrapped_dek: row.try_get("wrapped_dek")?,
        access_token: row.try_get("access_token")?,
        access_expires_at: opt_ts(row.try_get("access_expires_at")?),
        refresh_token: row.try_get("refresh_token")?,
        updated_at: ts(row.try_get(updated_at_column)?),
    })
}

fn kek_from_row(row: &Row) -> StoreResult<KekRecord> {
    Ok(KekRecord {
        version: kek_from_db(row.try_get("version")?)?,
        state: stored(KeyState::parse(row.try_get::<&str, _>("state")?), "state")?,
        created_at: ts(row.try_get("created_at")?),
        primary_since: opt_ts(row.try_get("primary_since")?),
        primary_until: opt_ts(row.try_get("primary_until")?),
        retired_at: opt_ts(row.try_get("retired_at")?),
        destroyed_at: opt_ts(row.try_get("destroyed_at")?),
        key_check: row.try_get("key_check")?,
        provider: row.try_get("provider")?,
        created_by: row.try_get("created_by")?,
        promoted_by: row.try_get("promoted_by")?,
        retired_by: row.try_get("retired_by")?,
        destroyed_by: row.try_get("destroyed_by")?,
    })
}

fn replica_from_row(row: &Row) -> StoreResult<ReplicaRecord> {
    let text: String = row.try_get("versions")?;
    let versions = text
        .split(',')
        .filter(|v| !v.is_empty())
        .map(|v| stored(v.parse::<KekVersion>().map_err(|e| VaultError::Storage(e.to_string())), "versions"))
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(ReplicaRecord {
        replica_id: row.try_get("replica_id")?,
        host: row.try_get("host")?,
        pid: row.try_get("pid")?,
        instance: row.try_get("instance")?,
        provider: row.try_get("provider")?,
        versions,
        heartbeat: std::time::Duration::from_millis(
            u64::try_from(row.try_get::<i64, _>("heartbeat_ms")?).unwrap_or(0),
        ),
        started_at: ts(row.try_get("started_at")?),
        seen_at: ts(row.try_get("seen_at")?),
    })
}

/// Refuses to store a freshly wrapped key unless its version is still the
/// primary, after waiting out (on PostgreSQL) a promotion or retirement of it
/// in progress: a replica that read the primary just before a rotation began
/// must not leave a key behind that the rotation's last pass has already
/// counted out. The caller wraps again under the new primary.
async fn check_wrapping_version(
    tx: &mut sqlx::Transaction<'static, Db>,
    version: KekVersion,
) -> StoreResult<()> {
    let state: Option<String> = sqlx::query_scalar(SHARE_KEK_VERSION)
        .bind(kek_to_db(version))
        .fetch_optional(&mut **tx)
        .await?;
    match state.as_deref() {
        Some("primary") => Ok(()),
        Some(_) => Err(VaultError::KeyVersionChanged(version)),
        None => Err(VaultError::not_found("key version", version)),
    }
}

fn authz_from_row(row: &Row) -> StoreResult<AuthzStateRecord> {
    Ok(AuthzStateRecord {
        state_hash: row.try_get("state_hash")?,
        tenant: TenantId::from_stored(row.try_get("tenant_id")?),
        account: AccountId::from_stored(row.try_get("account_id")?),
        integration: stored(
            Integration::parse(row.try_get::<&str, _>("integration")?),
            "integration",
        )?,
        caller: row.try_get("caller")?,
        kek_version: kek_from_db(row.try_get("kek_version")?)?,
        wrapped_dek: row.try_get("wrapped_dek")?,
        sealed_verifier: row.try_get("sealed_verifier")?,
        created_at: ts(row.try_get("created_at")?),
        expires_at: ts(row.try_get("expires_at")?),
        consumed_at: opt_ts(row.try_get("consumed_at")?),
    })
}

fn rotation_from_row(row: &Row) -> StoreResult<RotationRun> {
    Ok(RotationRun {
        run_id: row.try_get("run_id")?,
        target_version: kek_from_db(row.try_get("target_version")?)?,
        started_at: ts(row.try_get("started_at")?),
        finished_at: opt_ts(row.try_get("finished_at")?),
        total: row.try_get("total")?,
        rewrapped: row.try_get("rewrapped")?,
        state: row.try_get("state")?,
        actor: row.try_get("actor")?,
        last_error: row.try_get("last_error")?,
        owner: row.try_get("owner")?,
    })
}

fn checkpoint_from_row(row: &Row) -> StoreResult<AuditCheckpoint> {
    Ok(AuditCheckpoint {
        seq: row.try_get("seq")?,
        entry_hash: row.try_get("entry_hash")?,
        signed_at: ts(row.try_get("signed_at")?),
        public_key: row.try_get("public_key")?,
        signature: row.try_get("signature")?,
    })
}

fn audit_from_row(row: &Row) -> StoreResult<AuditRow> {
    Ok(AuditRow {
        seq: row.try_get("seq")?,
        draft: AuditDraft {
            at: ts(row.try_get("at")?),
            actor: row.try_get("actor")?,
            role: row.try_get("role")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            outcome: row.try_get("outcome")?,
            detail: row.try_get("detail")?,
        },
        prev_hash: row.try_get("prev_hash")?,
        entry_hash: row.try_get("entry_hash")?,
        mac: row.try_get("mac")?,
    })
}

/// Builds `SELECT ... WHERE` text for the dynamic filters; every value is bound.
struct Filter {
    sql: String,
    binds: Vec<FilterValue>,
}

enum FilterValue {
    Text(String),
    Int(i64),
}

impl Filter {
    fn new(base: &str) -> Self {
        Self {
            sql: format!("{base} WHERE 1 = 1"),
            binds: Vec::new(),
        }
    }

    fn push(&mut self, clause: &str, value: FilterValue) {
        self.binds.push(value);
        // `clause` contains a single `?`, replaced by the next numbered placeholder.
        let n = self.binds.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&clause.replace('?', &format!("${n}")));
    }

    fn query(&self) -> sqlx::query::Query<'_, Db, <Db as sqlx::Database>::Arguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
        for b in &self.binds {
            q = match b {
                FilterValue::Text(s) => q.bind(s.as_str()),
                FilterValue::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

/// The query of one page of connections matching `filter`, ordered by id.
fn connection_filter(filter: &ConnectionFilter, page: &PageRequest) -> Filter {
    let mut f = Filter::new(&format!("SELECT {CONNECTION_COLUMNS} FROM connections"));
    if let Some(t) = &filter.tenant {
        f.push("tenant_id = ?", FilterValue::Text(t.as_str().to_owned()));
    }
    if let Some(a) = &filter.account {
        f.push("account_id = ?", FilterValue::Text(a.as_str().to_owned()));
    }
    if let Some(i) = filter.integration {
        f.push("integration = ?", FilterValue::Text(i.as_str().to_owned()));
    }
    if let Some(s) = filter.status {
        f.push("status = ?", FilterValue::Text(s.as_str().to_owned()));
    } else if !filter.include_deleted {
        f.push("status <> ?", FilterValue::Text("deleted".to_owned()));
    }
    if let Some(g) = &filter.google_subject {
        if g.contains('\0') {
            // No stored subject holds a NUL (and PostgreSQL text cannot).
            f.sql.push_str(" AND 1 = 0");
        } else {
            f.push("google_subject = ?", FilterValue::Text(g.clone()));
        }
    }
    if let Some(after) = &page.after {
        f.push("connection_id > ?", FilterValue::Text(after.clone()));
    }
    f.sql.push_str(" ORDER BY connection_id");
    f.binds.push(FilterValue::Int(page.limit));
    f.sql.push_str(&format!(" LIMIT ${}", f.binds.len()));
    f
}

/// The connections `f` selects (a query of [`CONNECTION_COLUMNS`]), each with
/// its secrets' expiry and key version, refresh-token presence, leases open
/// at `at` and deletion receipt, in one query.
async fn connection_details_of(
    pool: &sqlx::Pool<Db>,
    mut f: Filter,
    at: Timestamp,
) -> StoreResult<Vec<ConnectionDetailRecord>> {
    // The connections first, exactly as `f` reads them; then, per row, its
    // secrets, open leases and receipt.
    f.binds.push(FilterValue::Int(at.as_micros()));
    let at_bind = f.binds.len();
    f.sql = format!(
        "SELECT c.*, s.access_expires_at, d.kek_version, \
         CAST(CASE WHEN s.refresh_token IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_refresh_token, \
         (SELECT COUNT(*) FROM leases l WHERE l.connection_id = c.connection_id \
          AND l.expires_at > ${at_bind} AND l.revoked_at IS NULL) AS open_leases, \
         (SELECT rc.receipt_id FROM receipt_connections rc WHERE rc.connection_id = c.connection_id \
          ORDER BY rc.receipt_id LIMIT 1) AS receipt_id \
         FROM ({}) c \
         LEFT JOIN connection_secrets s ON s.connection_id = c.connection_id \
         LEFT JOIN connection_deks d ON d.connection_id = c.connection_id \
         ORDER BY c.connection_id",
        f.sql
    );
    let rows = f.query().fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            let connection = connection_from_row(row)?;
            let receipt: Option<String> = row.try_get("receipt_id")?;
            Ok(ConnectionDetailRecord {
                access_expires_at: opt_ts(row.try_get("access_expires_at")?),
                kek_version: row
                    .try_get::<Option<i64>, _>("kek_version")?
                    .map(kek_from_db)
                    .transpose()?,
                has_refresh_token: row.try_get::<i64, _>("has_refresh_token")? == 1,
                open_leases: row.try_get("open_leases")?,
                receipt_id: receipt
                    .filter(|_| connection.deleted_at.is_some())
                    .map(ReceiptId::from_stored),
                connection,
            })
        })
        .collect()
}

async fn insert_connection(
    tx: &mut sqlx::Transaction<'static, Db>,
    c: &ConnectionRecord,
    s: &SecretsRecord,
) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, account_id, integration, \
             google_subject, google_email, granted_scopes, status, status_reason, created_at, \
             updated_at, deleted_at, last_refresh_at, next_check_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(c.id.as_str())
        .bind(c.tenant.as_str())
        .bind(c.account.as_str())
        .bind(c.integration.as_str())
        .bind(c.google_subject.as_deref())
        .bind(c.google_email.as_deref())
        .bind(c.granted_scopes.to_spaced())
        .bind(c.status.as_str())
        .bind(c.status_reason.as_deref())
        .bind(c.created_at.as_micros())
        .bind(c.updated_at.as_micros())
        .bind(c.deleted_at.map(Timestamp::as_micros))
        .bind(c.health.last_refresh_at.map(Timestamp::as_micros))
        .bind(c.health.next_check_at.map(Timestamp::as_micros))
        .execute(&mut **tx)
        .await?;
    insert_secrets(tx, s).await
}

/// Destroys a connection's sealed tokens and its wrapped DEK.
async fn delete_secrets(tx: &mut sqlx::Transaction<'static, Db>, id: &str) -> StoreResult<()> {
    sqlx::query("DELETE FROM connection_secrets WHERE connection_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM connection_deks WHERE connection_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Inserts a connection's wrapped DEK and sealed tokens. The caller has
/// checked, in this transaction, that their KEK version may wrap keys
/// ([`check_wrapping_version`]).
async fn insert_secrets(tx: &mut sqlx::Transaction<'static, Db>, s: &SecretsRecord) -> StoreResult<()> {
    sqlx::query("INSERT INTO connection_deks (connection_id, kek_version, wrapped_dek) VALUES ($1, $2, $3)")
        .bind(s.connection_id.as_str())
        .bind(kek_to_db(s.kek_version))
        .bind(s.wrapped_dek.as_slice())
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO connection_secrets (connection_id, access_token, access_expires_at, \
         refresh_token, updated_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(s.connection_id.as_str())
    .bind(s.access_token.as_deref())
    .bind(s.access_expires_at.map(Timestamp::as_micros))
    .bind(s.refresh_token.as_deref())
    .bind(s.updated_at.as_micros())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl crate::store::Store for StoreImpl {
    fn backend(&self) -> Backend {
        BACKEND
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.hot.release().await;
        self.pool.close().await;
    }

    async fn kek_list(&self) -> StoreResult<Vec<KekRecord>> {
        let rows = sqlx::query("SELECT * FROM kek_versions ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(kek_from_row).collect()
    }

    async fn kek_register(&self, k: &NewKek<'_>) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let has_primary: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kek_versions WHERE state = 'primary'")
                .fetch_optional(&mut *tx)
                .await?;
        let state = if has_primary.is_some() { "active" } else { "primary" };
        let primary_since = has_primary.is_none().then(|| Timestamp::now().as_micros());
        let promoted_by = has_primary.is_none().then_some(k.created_by);
        sqlx::query(
            "INSERT INTO kek_versions (version, state, created_at, primary_since, key_check, \
             provider, created_by, promoted_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(kek_to_db(k.version))
        .bind(state)
        .bind(k.created_at.as_micros())
        .bind(primary_since)
        .bind(k.key_check)
        .bind(k.provider)
        .bind(k.created_by)
        .bind(promoted_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_promote(&self, version: KekVersion, at: Timestamp, actor: &str) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let state: Option<String> = sqlx::query_scalar(LOCK_KEK_VERSION)
            .bind(kek_to_db(version))
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => return Err(VaultError::not_found("key version", version)),
            Some("primary") => return Ok(()),
            Some("active") => {}
            Some(other) => {
                return Err(VaultError::precondition(format!(
                    "key version {version} is {other} and cannot become primary"
                )));
            }
        }
        sqlx::query(
            "UPDATE kek_versions SET state = 'active', primary_until = $1 WHERE state = 'primary'",
        )
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE kek_versions SET state = 'primary', primary_since = $1, primary_until = NULL, \
             promoted_by = $2 WHERE version = $3",
        )
        .bind(at.as_micros())
        .bind(actor)
        .bind(kek_to_db(version))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_set_state(
        &self,
        version: KekVersion,
        state: KeyState,
        at: Timestamp,
        actor: &str,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let current: Option<String> = sqlx::query_scalar(LOCK_KEK_VERSION)
            .bind(kek_to_db(version))
            .fetch_optional(&mut *tx)
            .await?;
        let current = match current {
            None => return Err(VaultError::not_found("key version", version)),
            Some(s) => stored(KeyState::parse(&s), "state")?,
        };
        let allowed = matches!(
            (current, state),
            (KeyState::Active, KeyState::Retired) | (KeyState::Retired, KeyState::Destroyed)
        );
        if current == state {
            return Ok(());
        }
        if !allowed {
            return Err(VaultError::precondition(format!(
                "key version {version} is {current}; it cannot become {state}"
            )));
        }
        let refs: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM connection_deks WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM authorization_states WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM revocation_outbox WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM rotation_runs WHERE target_version = $1 AND state = 'running')",
        )
        .bind(kek_to_db(version))
        .fetch_one(&mut *tx)
        .await?;
        if refs > 0 {
            return Err(VaultError::precondition(format!(
                "key version {version} still wraps {refs} keys; rotate first"
            )));
        }
        let sql = match state {
            KeyState::Retired => "UPDATE kek_versions SET state = 'retired', retired_at = $1, retired_by = $2 WHERE version = $3",
            _ => "UPDATE kek_versions SET state = 'destroyed', destroyed_at = $1, destroyed_by = $2 WHERE version = $3",
        };
        sqlx::query(sql)
            .bind(at.as_micros())
            .bind(actor)
            .bind(kek_to_db(version))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn wrapped_key_counts(&self) -> StoreResult<Vec<WrappedKeyCount>> {
        let rows = sqlx::query(
            "SELECT kek_version, kind, COUNT(*) AS n FROM ( \
                 SELECT kek_version, 'connection' AS kind FROM connection_deks \
                 UNION ALL SELECT kek_version, 'oauth_state' AS kind FROM authorization_states \
                 UNION ALL SELECT kek_version, 'outbox' AS kind FROM revocation_outbox \
             ) refs GROUP BY kek_version, kind ORDER BY kek_version, kind",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind = match r.try_get::<&str, _>("kind")? {
                    "connection" => WrappedKeyKind::Connection,
                    "oauth_state" => WrappedKeyKind::OauthState,
                    _ => WrappedKeyKind::Outbox,
                };
                Ok(WrappedKeyCount {
                    version: kek_from_db(r.try_get("kek_version")?)?,
                    kind,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    async fn root_key_check_get(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT check_value FROM root_key_checks WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn root_key_check_put(&self, name: &str, value: &[u8], at: Timestamp) -> StoreResult<Vec<u8>> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO root_key_checks (name, check_value, recorded_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?;
        let recorded: Vec<u8> =
            sqlx::query_scalar("SELECT check_value FROM root_key_checks WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    async fn keyring_claim(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<String> {
        let now = self.clock().await?;
        let stale_before = now.as_micros() - i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO keyring_claims (name, holder, claimed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             claimed_at = excluded.claimed_at WHERE keyring_claims.claimed_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now.as_micros())
        .bind(stale_before)
        .execute(&mut *tx)
        .await?;
        let recorded: String =
            sqlx::query_scalar("SELECT holder FROM keyring_claims WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    async fn clock(&self) -> StoreResult<Timestamp> {
        let micros: i64 = sqlx::query_scalar(CLOCK_MICROS).fetch_one(&self.pool).await?;
        Ok(ts(micros))
    }

    async fn replica_upsert(&self, r: &ReplicaRecord) -> StoreResult<()> {
        let versions = r
            .versions
            .iter()
            .map(|v| v.get().to_string())
            .collect::<Vec<_>>()
            .join(",");
        // The clock first: not a second pool connection while this one holds a transaction.
        let seen_at = self.clock().await?;
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO key_replicas (replica_id, host, pid, instance, provider, versions, \
             heartbeat_ms, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (replica_id) DO UPDATE SET versions = excluded.versions, \
             heartbeat_ms = excluded.heartbeat_ms, seen_at = excluded.seen_at",
        )
        .bind(&r.replica_id)
        .bind(&r.host)
        .bind(r.pid)
        .bind(&r.instance)
        .bind(&r.provider)
        .bind(versions)
        .bind(i64::try_from(r.heartbeat.as_millis()).unwrap_or(i64::MAX))
        .bind(r.started_at.as_micros())
        .bind(seen_at.as_micros())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn replica_list(&self) -> StoreResult<Vec<ReplicaRecord>> {
        let rows = sqlx::query("SELECT * FROM key_replicas ORDER BY replica_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(replica_from_row).collect()
    }

    async fn replica_remove(&self, replica_id: &str) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM key_replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn connection_upsert(
        &self,
        c: &ConnectionRecord,
        s: &SecretsRecord,
    ) -> StoreResult<Option<ConnectionId>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let old: Option<String> = sqlx::query_scalar(LOCK_LIVE_CONNECTION)
            .bind(c.tenant.as_str())
            .bind(c.account.as_str())
            .bind(c.integration.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if old.as_deref() == Some(c.id.as_str()) {
            // Reconnecting the same Google account: new tokens under a new DEK
            // replace the old ones in place; the connection keeps its id.
            sqlx::query(
                "UPDATE connections SET google_subject = $1, google_email = $2, granted_scopes = $3, \
                 status = $4, status_reason = $5, updated_at = $6, last_refresh_at = $7, \
                 last_refresh_error = NULL, last_refresh_error_at = NULL, next_check_at = $8 \
                 WHERE connection_id = $9",
            )
            .bind(c.google_subject.as_deref())
            .bind(c.google_email.as_deref())
            .bind(c.granted_scopes.to_spaced())
            .bind(c.status.as_str())
            .bind(c.status_reason.as_deref())
            .bind(c.updated_at.as_micros())
            .bind(c.health.last_refresh_at.map(Timestamp::as_micros))
            .bind(c.health.next_check_at.map(Timestamp::as_micros))
            .bind(c.id.as_str())
            .execute(&mut *tx)
            .await?;
            delete_secrets(&mut tx, c.id.as_str()).await?;
            check_wrapping_version(&mut tx, s.kek_version).await?;
            insert_secrets(&mut tx, s).await?;
            tx.commit().await?;
            return Ok(None);
        }
        if let Some(old_id) = &old {
            // Replacing: the old DEK and tokens are destroyed, the row becomes a tombstone.
            delete_secrets(&mut tx, old_id).await?;
            sqlx::query(
                "UPDATE connections SET status = 'deleted', status_reason = 'replaced', \
                 google_subject = NULL, google_email = NULL, granted_scopes = '', \
                 updated_at = $1, deleted_at = $1, last_refresh_at = NULL, last_refresh_error = NULL, \
                 last_refresh_error_at = NULL, next_check_at = NULL WHERE connection_id = $2",
            )
            .bind(c.created_at.as_micros())
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        }
        check_wrapping_version(&mut tx, s.kek_version).await?;
        insert_connection(&mut tx, c, s).await?;
        tx.commit().await?;
        Ok(old.map(ConnectionId::from_stored))
    }

    async fn connection_import(&self, rows: &[(ConnectionRecord, SecretsRecord)]) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let mut versions: Vec<KekVersion> = rows.iter().map(|(_, s)| s.kek_version).collect();
        versions.sort_unstable();
        versions.dedup();
        for v in versions {
            check_wrapping_version(&mut tx, v).await?;
        }
        for (c, s) in rows {
            insert_connection(&mut tx, c, s).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connection_get(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections WHERE connection_id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    async fn connection_list(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let f = connection_filter(filter, page);
        let rows = f.query().fetch_all(&self.pool).await?;
        rows.iter().map(connection_from_row).collect()
    }

    async fn connection_details(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
        at: Timestamp,
    ) -> StoreResult<Vec<ConnectionDetailRecord>> {
        connection_details_of(&self.pool, connection_filter(filter, page), at).await
    }

    async fn connection_detail(
        &self,
        id: &ConnectionId,
        at: Timestamp,
    ) -> StoreResult<Option<ConnectionDetailRecord>> {
        let mut f = Filter::new(&format!("SELECT {CONNECTION_COLUMNS} FROM connections"));
        f.push("connection_id = ?", FilterValue::Text(id.as_str().to_owned()));
        Ok(connection_details_of(&self.pool, f, at).await?.pop())
    }

    async fn secrets_get(&self, id: &ConnectionId) -> StoreResult<Option<SecretsRecord>> {
        let row = sqlx::query(
            "SELECT s.connection_id, d.kek_version, d.wrapped_dek, s.access_token, \
             s.access_expires_at, s.refresh_token, s.updated_at \
             FROM connection_secrets s JOIN connection_deks d ON d.connection_id = s.connection_id \
             WHERE s.connection_id = $1",
        )
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(secrets_from_row).transpose()
    }

    async fn connection_live(
        &self,
        tenant: &TenantId,
        account: &AccountId,
        integration: Integration,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections \
             WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted'"
        )))
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(integration.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    async fn refresh_token_held(
        &self,
        tenant: &TenantId,
        account: &AccountId,
        integration: Integration,
        google_email: Option<&str>,
    ) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections c JOIN connection_secrets s \
             ON s.connection_id = c.connection_id \
             WHERE c.tenant_id = $1 AND c.account_id = $2 AND c.integration = $3 \
             AND c.status <> 'deleted' AND s.refresh_token IS NOT NULL \
             AND ($4 IS NULL OR LOWER(c.google_email) = LOWER($4))",
        )
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(integration.as_str())
        .bind(google_email)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn authz_insert(&self, a: &AuthzStateRecord) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        check_wrapping_version(&mut tx, a.kek_version).await?;
        sqlx::query(
            "INSERT INTO authorization_states (state_hash, tenant_id, account_id, integration, caller, \
             kek_version, wrapped_dek, sealed_verifier, created_at, expires_at, consumed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)",
        )
        .bind(a.state_hash.as_slice())
        .bind(a.tenant.as_str())
        .bind(a.account.as_str())
        .bind(a.integration.as_str())
        .bind(&a.caller)
        .bind(kek_to_db(a.kek_version))
        .bind(a.wrapped_dek.as_slice())
        .bind(a.sealed_verifier.as_slice())
        .bind(a.created_at.as_micros())
        .bind(a.expires_at.as_micros())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn authz_consume(&self, state_hash: &[u8], at: Timestamp) -> StoreResult<AuthzConsume> {
        let (_guard, mut tx) = self.begin_write().await?;
        let first = sqlx::query(
            "UPDATE authorization_states SET consumed_at = $1 \
             WHERE state_hash = $2 AND consumed_at IS NULL RETURNING *",
        )
        .bind(at.as_micros())
        .bind(state_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match first {
            Some(row) => AuthzConsume::Consumed(authz_from_row(&row)?),
            None => {
                let again = sqlx::query("SELECT * FROM authorization_states WHERE state_hash = $1")
                    .bind(state_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                match again {
                    Some(row) => AuthzConsume::Replayed(authz_from_row(&row)?),
                    None => AuthzConsume::Unknown,
                }
            }
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn authz_purge(&self, before: Timestamp) -> StoreResult<u64> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM authorization_states WHERE expires_at < $1")
            .bind(before.as_micros())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn refresh_lock_acquire(
        &self,
        id: &ConnectionId,
        holder: &str,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> StoreResult<Option<i64>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let fence: Option<i64> = sqlx::query_scalar(
            "INSERT INTO refresh_locks (connection_id, holder, fence, expires_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (connection_id) DO UPDATE SET holder = excluded.holder, \
             fence = refresh_locks.fence + 1, expires_at = excluded.expires_at \
             WHERE refresh_locks.expires_at < $4 RETURNING fence",
        )
        .bind(id.as_str())
        .bind(holder)
        .bind(expires_at.as_micros())
        .bind(now.as_micros())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(fence)
    }

    async fn refresh_lock_renew(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
        expires_at: Timestamp,
    ) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE refresh_locks SET expires_at = $4 \
             WHERE connection_id = $1 AND holder = $2 AND fence = $3 AND expires_at > 0",
        )
        .bind(id.as_str())
        .bind(holder)
        .bind(fence)
        .bind(expires_at.as_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn refresh_lock_release(&self, id: &ConnectionId, holder: &str, fence: i64) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("UPDATE refresh_locks SET expires_at = 0 WHERE connection_id = $1 AND holder = $2 AND fence = $3")
            .bind(id.as_str())
            .bind(holder)
            .bind(fence)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn refresh_claim_due(
        &self,
        now: Timestamp,
        claim_until: Timestamp,
        limit: i64,
    ) -> StoreResult<Vec<ConnectionId>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE connections SET next_check_at = $1 WHERE connection_id IN ( \
               SELECT connection_id FROM connections \
               WHERE status = 'active' AND next_check_at <= $2 \
               ORDER BY next_check_at LIMIT $3{SKIP_LOCKED}) \
             RETURNING connection_id"
        )))
        .bind(claim_until.as_micros())
        .bind(now.as_micros())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids.into_iter().map(ConnectionId::from_stored).collect())
    }

    async fn refresh_due_count(&self, now: Timestamp) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections WHERE status = 'active' AND next_check_at <= $1",
        )
        .bind(now.as_micros())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn refresh_note_error(
        &self,
        id: &ConnectionId,
        error: &str,
        at: Timestamp,
        next_check_at: Timestamp,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "UPDATE connections SET last_refresh_error = $1, last_refresh_error_at = $2, \
             next_check_at = $3 WHERE connection_id = $4 AND status = 'active'",
        )
        .bind(error)
        .bind(at.as_micros())
        .bind(next_check_at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn secrets_refresh(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
        t: &RefreshedTokens<'_>,
    ) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        // The connection row first, as a deletion takes it: a refresh and a
        // deletion of one connection queue instead of deadlocking.
        let status: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT status FROM connections WHERE connection_id = $1{FOR_UPDATE}"
        )))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if status.as_deref() != Some(ConnectionStatus::Active.as_str()) {
            return Ok(false);
        }
        let held: Option<i64> = sqlx::query_scalar(LOCK_REFRESH)
            .bind(id.as_str())
            .bind(holder)
            .bind(fence)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_none() {
            return Ok(false);
        }
        let n = sqlx::query(
            "UPDATE connection_secrets SET access_token = $1, access_expires_at = $2, \
             refresh_token = COALESCE($3, refresh_token), updated_at = $4 WHERE connection_id = $5",
        )
        .bind(t.access_token)
        .bind(t.access_expires_at.as_micros())
        .bind(t.refresh_token)
        .bind(t.at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // Refresh health; `updated_at`, which leases are checked against, is untouched.
        sqlx::query(
            "UPDATE connections SET last_refresh_at = $1, last_refresh_error = NULL, \
             last_refresh_error_at = NULL, next_check_at = $2 \
             WHERE connection_id = $3 AND status = 'active'",
        )
        .bind(t.at.as_micros())
        .bind(t.next_check_at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn rotation_insert(&self, run: &RotationRun) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let running: Option<String> =
            sqlx::query_scalar("SELECT run_id FROM rotation_runs WHERE state = 'running'")
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(id) = running {
            return Err(VaultError::precondition(format!(
                "rotation {id} is still running"
            )));
        }
        sqlx::query(
            "INSERT INTO rotation_runs (run_id, target_version, started_at, finished_at, total, \
             rewrapped, state, actor, owner) VALUES ($1, $2, $3, NULL, $4, 0, 'running', $5, $6)",
        )
        .bind(&run.run_id)
        .bind(kek_to_db(run.target_version))
        .bind(run.started_at.as_micros())
        .bind(run.total)
        .bind(&run.actor)
        .bind(&run.owner)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                VaultError::precondition("another rotation is already running")
            }
            _ => e.into(),
        })?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotation_running(&self) -> StoreResult<Option<RotationRun>> {
        let row = sqlx::query("SELECT * FROM rotation_runs WHERE state = 'running'")
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    async fn rotation_list(&self) -> StoreResult<Vec<RotationRun>> {
        let rows = sqlx::query("SELECT * FROM rotation_runs ORDER BY started_at DESC, run_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rotation_from_row).collect()
    }

    async fn rotation_set_total(&self, run_id: &str, total: i64) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("UPDATE rotation_runs SET total = $1 WHERE run_id = $2")
            .bind(total)
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotation_claim(&self, run_id: &str, previous: &str, owner: &str) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE rotation_runs SET owner = $1 WHERE run_id = $2 AND owner = $3 AND state = 'running'",
        )
        .bind(owner)
        .bind(run_id)
        .bind(previous)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn wrapped_key_count_not_on(&self, target: KekVersion) -> StoreResult<i64> {
        // Index ranges on each table's kek_version (not `<>`, which no index serves).
        Ok(sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM connection_deks WHERE kek_version < $1 OR kek_version > $1) \
                  + (SELECT COUNT(*) FROM authorization_states WHERE kek_version < $1 OR kek_version > $1) \
                  + (SELECT COUNT(*) FROM revocation_outbox WHERE kek_version < $1 OR kek_version > $1)",
        )
        .bind(kek_to_db(target))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn wrapped_key_scan(
        &self,
        kind: WrappedKeyKind,
        target: KekVersion,
        after: Option<&WrappedKeyOwner>,
        limit: i64,
    ) -> StoreResult<(Vec<WrappedKeyRow>, Option<WrappedKeyOwner>)> {
        // Key-order range scans: `kek_version <> $1` can use no index, so filtering
        // in SQL would scan (and sort) every remaining row per batch.
        let rows = match (kind, after) {
            (WrappedKeyKind::Connection, after) => {
                let after = match after {
                    Some(WrappedKeyOwner::Connection { id, .. }) => id.as_str(),
                    _ => "",
                };
                sqlx::query(
                    "SELECT d.connection_id, c.tenant_id, c.account_id, d.kek_version, d.wrapped_dek \
                     FROM connection_deks d JOIN connections c ON c.connection_id = d.connection_id \
                     WHERE d.connection_id > $1 ORDER BY d.connection_id LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            (WrappedKeyKind::OauthState, after) => {
                let after: &[u8] = match after {
                    Some(WrappedKeyOwner::OauthState { state_hash, .. }) => state_hash,
                    _ => &[],
                };
                sqlx::query(
                    "SELECT state_hash, tenant_id, account_id, kek_version, wrapped_dek \
                     FROM authorization_states WHERE state_hash > $1 ORDER BY state_hash LIMIT $2",
                )
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            (WrappedKeyKind::Outbox, after) => {
                let (receipt, connection) = match after {
                    Some(WrappedKeyOwner::Outbox { receipt, connection, .. }) => {
                        (receipt.as_str(), connection.as_str())
                    }
                    _ => ("", ""),
                };
                sqlx::query(
                    "SELECT o.receipt_id, o.connection_id, r.tenant_id, o.kek_version, o.wrapped_dek \
                     FROM revocation_outbox o JOIN deletion_receipts r ON r.receipt_id = o.receipt_id \
                     WHERE (o.receipt_id, o.connection_id) > ($1, $2) \
                     ORDER BY o.receipt_id, o.connection_id LIMIT $3",
                )
                .bind(receipt)
                .bind(connection)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let owner_of = |r: &Row| -> StoreResult<WrappedKeyOwner> {
            Ok(match kind {
                WrappedKeyKind::Connection => WrappedKeyOwner::Connection {
                    id: ConnectionId::from_stored(r.try_get("connection_id")?),
                    tenant: TenantId::from_stored(r.try_get("tenant_id")?),
                    account: AccountId::from_stored(r.try_get("account_id")?),
                },
                WrappedKeyKind::OauthState => WrappedKeyOwner::OauthState {
                    state_hash: r.try_get("state_hash")?,
                    tenant: TenantId::from_stored(r.try_get("tenant_id")?),
                    account: AccountId::from_stored(r.try_get("account_id")?),
                },
                WrappedKeyKind::Outbox => WrappedKeyOwner::Outbox {
                    receipt: ReceiptId::from_stored(r.try_get("receipt_id")?),
                    connection: ConnectionId::from_stored(r.try_get("connection_id")?),
                    tenant: TenantId::from_stored(r.try_get("tenant_id")?),
                },
            })
        };
        let last = rows.last().map(owner_of).transpose()?;
        let mut out = Vec::new();
        for r in &rows {
            let version = kek_from_db(r.try_get("kek_version")?)?;
            if version == target {
                continue;
            }
            out.push(WrappedKeyRow {
                owner: owner_of(r)?,
                kek_version: version,
                wrapped_dek: r.try_get("wrapped_dek")?,
            });
        }
        Ok((out, last))
    }

    async fn wrapped_key_rewrap(
        &self,
        run_id: &str,
        owner: &str,
        rewraps: &[Rewrap],
    ) -> StoreResult<Option<u64>> {
        // Connection DEKs, the bulk of any rotation, go in one set-based
        // compare-and-swap per chunk instead of a statement per row: each row
        // changes only if it still holds what was read. The few OAuth-state and
        // outbox keys go one statement each.
        const CHUNK: usize = 50;
        let (_guard, mut tx) = self.begin_write().await?;
        let mut changed = 0u64;
        let connections: Vec<&Rewrap> = rewraps
            .iter()
            .filter(|r| matches!(r.owner, WrappedKeyOwner::Connection { .. }))
            .collect();
        for chunk in connections.chunks(CHUNK) {
            let mut rows = String::with_capacity(chunk.len() * 48);
            for i in 0..chunk.len() {
                let p = i * 5;
                if i == 0 {
                    rows.push_str(&format!(
                        "SELECT ${} AS id, ${} AS ov, ${} AS ow, ${} AS nv, ${} AS nw",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    ));
                } else {
                    rows.push_str(&format!(
                        " UNION ALL SELECT ${}, ${}, ${}, ${}, ${}",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    ));
                }
            }
            let sql = format!(
                "UPDATE connection_deks AS d SET kek_version = v.nv, wrapped_dek = v.nw \
                 FROM ({rows}) AS v \
                 WHERE d.connection_id = v.id AND d.kek_version = v.ov AND d.wrapped_dek = v.ow"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                let WrappedKeyOwner::Connection { id, .. } = &r.owner else {
                    continue;
                };
                q = q
                    .bind(id.as_str())
                    .bind(kek_to_db(r.old_version))
                    .bind(r.old_wrapped.as_slice())
                    .bind(kek_to_db(r.new_version))
                    .bind(r.new_wrapped.as_slice());
            }
            changed += q.execute(&mut *tx).await?.rows_affected();
        }
        for r in rewraps {
            let q = match &r.owner {
                WrappedKeyOwner::Connection { .. } => continue,
                WrappedKeyOwner::OauthState { state_hash, .. } => sqlx::query(
                    "UPDATE authorization_states SET kek_version = $1, wrapped_dek = $2 \
                     WHERE state_hash = $3 AND kek_version = $4 AND wrapped_dek = $5",
                )
                .bind(kek_to_db(r.new_version))
                .bind(r.new_wrapped.as_slice())
                .bind(state_hash.as_slice()),
                WrappedKeyOwner::Outbox { receipt, connection, .. } => sqlx::query(
                    "UPDATE revocation_outbox SET kek_version = $1, wrapped_dek = $2 \
                     WHERE receipt_id = $3 AND connection_id = $4 AND kek_version = $5 AND wrapped_dek = $6",
                )
                .bind(kek_to_db(r.new_version))
                .bind(r.new_wrapped.as_slice())
                .bind(receipt.as_str())
                .bind(connection.as_str()),
            };
            changed += q
                .bind(kek_to_db(r.old_version))
                .bind(r.old_wrapped.as_slice())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        let owned = sqlx::query(
            "UPDATE rotation_runs SET rewrapped = rewrapped + $1 \
             WHERE run_id = $2 AND state = 'running' AND owner = $3",
        )
        .bind(i64::try_from(changed).unwrap_or(i64::MAX))
        .bind(run_id)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if owned == 0 {
            // Taken over (or finished) elsewhere: leave everything as it was.
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(changed))
    }

    async fn rotation_finish(
        &self,
        run_id: &str,
        state: &str,
        error: Option<&str>,
        at: Timestamp,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "UPDATE rotation_runs SET state = $1, last_error = $2, finished_at = $3 \
             WHERE run_id = $4 AND state = 'running'",
        )
        .bind(state)
        .bind(error)
        .bind(at.as_micros())
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_append(
        &self,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<(Vec<i64>, Vec<String>)> {
        // This process's audit writer is the only appender here, so the head
        // it last wrote is almost always still the head; other appenders
        // (replicas, a second vault on the same SQLite file) are caught by a
        // compare-and-swap on the head, after which the backend reads it
        // under a lock and seals the batch again.
        let cached = self.head_cache.lock().map_or(None, |h| h.clone());
        let result = self.append_sealing(cached, drafts, leases, sealer).await;
        if let Ok(mut h) = self.head_cache.lock() {
            *h = result.as_ref().ok().map(|(batch_to, _, _)| batch_to.clone());
        }
        result.map(|(_, seqs, recorded)| (seqs, recorded))
    }

    async fn lease_lookup(
        &self,
        ids: &[ConnectionId],
    ) -> StoreResult<Vec<(ConnectionRecord, Option<SecretsRecord>)>> {
        // One statement text whatever the number of ids, so it is prepared
        // once per connection and then served from the statement cache.
        let query = sqlx::query(sqlx::AssertSqlSafe(LEASE_LOOKUP.as_str())).bind(id_list(ids));
        let mut held = None;
        for slot in &self.hot.readers {
            if let Some(h) = slot.try_lock(&self.pool).await {
                held = Some(h?);
                break;
            }
        }
        let rows = match held {
            Some(mut held) => {
                let rows = match held.conn() {
                    Ok(conn) => query.fetch_all(conn).await.map_err(VaultError::from),
                    Err(e) => Err(e),
                };
                held.discard_on_error(rows)?
            }
            None => query.fetch_all(&self.pool).await?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let conn = connection_from_row(&row)?;
            // Both LEFT JOINs matched: the connection holds secrets.
            let held = row.try_get::<Option<i64>, _>("kek_version")?.is_some()
                && row.try_get::<Option<i64>, _>("secrets_updated_at")?.is_some();
            let secrets = held
                .then(|| secrets_from_columns(&row, "secrets_updated_at"))
                .transpose()?;
            out.push((conn, secrets));
        }
        Ok(out)
    }

    async fn audit_range(&self, from_seq: i64, to_seq: i64, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(from_seq)
        .bind(to_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let mut f = Filter::new("SELECT * FROM audit_log");
        if let Some(a) = &filter.actor {
            f.push("actor = ?", FilterValue::Text(a.clone()));
        }
        if let Some(p) = &filter.action_prefix {
            // Range scan instead of LIKE so no pattern characters need escaping.
            f.push("action >= ?", FilterValue::Text(p.clone()));
            f.push("action < ?", FilterValue::Text(format!("{p}\u{10FFFF}")));
        }
        if let Some(t) = &filter.target {
            f.push("target = ?", FilterValue::Text(t.clone()));
        }
        if let Some(s) = filter.since {
            f.push("at >= ?", FilterValue::Int(s.as_micros()));
        }
        if let Some(u) = filter.until {
            f.push("at < ?", FilterValue::Int(u.as_micros()));
        }
        if let Some(o) = &filter.outcome {
            f.push("outcome = ?", FilterValue::Text(o.clone()));
        }
        if let Some(b) = filter.before_seq {
            f.push("seq < ?", FilterValue::Int(b));
        }
        if let Some(a) = filter.after_seq {
            f.push("seq > ?", FilterValue::Int(a));
        }
        f.sql.push_str(if filter.ascending { " ORDER BY seq" } else { " ORDER BY seq DESC" });
        f.binds.push(FilterValue::Int(limit));
        f.sql.push_str(&format!(" LIMIT ${}", f.binds.len()));
        let rows = f.query().fetch_all(&self.pool).await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_checkpoints(&self, from_seq: i64, to_seq: i64) -> StoreResult<Vec<AuditCheckpoint>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
        )
        .bind(from_seq)
        .bind(to_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkpoint_from_row).collect()
    }

    async fn audit_checkpoint_last(&self) -> StoreResult<Option<AuditCheckpoint>> {
        let row = sqlx::query("SELECT * FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(checkpoint_from_row).transpose()
    }

    async fn audit_head(&self) -> StoreResult<(i64, Vec<u8>)> {
        read_audit_head(&self.pool, "SELECT seq, entry_hash FROM audit_head WHERE id = 1").await
    }

    async fn lease_get(&self, id: &LeaseId) -> StoreResult<Option<LeaseRecord>> {
        let row = sqlx::query("SELECT * FROM leases WHERE lease_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT expires_at, revoked_at FROM leases WHERE lease_id = $1{FOR_UPDATE}"
        )))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let expires = ts(row.try_get("expires_at")?);
        if let Some(revoked) = opt_ts(row.try_get("revoked_at")?) {
            return Ok(Some(revoked));
        }
        if expires <= at {
            return Ok(Some(expires));
        }
        sqlx::query(
            "UPDATE leases SET revoked_at = $1, revoke_reason = 'released' \
             WHERE lease_id = $2 AND revoked_at IS NULL",
        )
        .bind(at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(at))
    }

    async fn lease_open_count(
        &self,
        at: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64> {
        Ok(match connection {
            None => sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases WHERE expires_at > $1 AND revoked_at IS NULL",
            )
            .bind(at.as_micros())
            .fetch_one(&self.pool)
            .await?,
            Some(c) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases WHERE expires_at > $1 AND revoked_at IS NULL \
                 AND connection_id = $2",
            )
            .bind(at.as_micros())
            .bind(c.as_str())
            .fetch_one(&self.pool)
            .await?,
        })
    }

    async fn lease_prune(&self, before: Timestamp) -> StoreResult<u64> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM leases WHERE expires_at < $1")
            .bind(before.as_micros())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn event_state(&self) -> StoreResult<EventLogState> {
        let row = sqlx::query(
            "SELECT (SELECT COALESCE(MAX(cursor), 0) FROM events) AS head, pruned_through \
             FROM event_log_state WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let head: i64 = row.try_get("head")?;
        let pruned_through: i64 = row.try_get("pruned_through")?;
        Ok(EventLogState {
            head: head.max(pruned_through),
            pruned_through,
        })
    }

    async fn events_after(&self, after: i64, limit: i64) -> StoreResult<Vec<EventRecord>> {
        let rows = sqlx::query("SELECT * FROM events WHERE cursor > $1 ORDER BY cursor LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn events_append(&self, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let cursors = insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(cursors)
    }

    async fn consumer_position(&self, consumer: &str) -> StoreResult<i64> {
        let pos: Option<i64> =
            sqlx::query_scalar("SELECT cursor FROM consumer_positions WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?;
        Ok(pos.unwrap_or(0))
    }

    async fn consumer_ack(&self, consumer: &str, cursor: i64, at: Timestamp) -> StoreResult<i64> {
        let (_guard, mut tx) = self.begin_write().await?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(cursor), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        if cursor > head {
            return Err(VaultError::OutOfRange(
                format!("cursor {cursor} is past the newest event ({head})").into(),
            ));
        }
        let old: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT cursor FROM consumer_positions WHERE consumer = $1{FOR_UPDATE}"
        )))
        .bind(consumer)
        .fetch_optional(&mut *tx)
        .await?;
        let old = old.unwrap_or(0);
        if cursor <= old {
            return Ok(old);
        }
        sqlx::query(
            "INSERT INTO consumer_positions (consumer, cursor, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (consumer) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
        )
        .bind(consumer)
        .bind(cursor)
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?;
        let stamped = sqlx::query(
            "UPDATE receipt_acks SET acknowledged_at = $1 WHERE consumer = $2 AND acknowledged_at IS NULL \
             AND receipt_id IN (SELECT receipt_id FROM events \
                 WHERE receipt_id IS NOT NULL AND cursor > $3 AND cursor <= $4)",
        )
        .bind(at.as_micros())
        .bind(consumer)
        .bind(old)
        .bind(cursor)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if stamped > 0 {
            complete_receipts(&mut tx, at).await?;
        }
        tx.commit().await?;
        Ok(cursor)
    }

    async fn connection_delete(
        &self,
        req: &DeletionRequest,
        sealer: AuditSealer<'_>,
    ) -> StoreResult<DeletionOutcome> {
        let (_guard, mut tx) = self.begin_write().await?;
        // The deletion's `deletion.done` entry is appended in this
        // transaction; the chain head is taken first, in the audit writer's
        // lock order (head, then connection rows).
        let head = read_audit_head(&mut *tx, LOCK_AUDIT_HEAD).await?;
        let at = req.at.as_micros();
        let key = req.target.subject_key();
        let (tenant, account, targets) = match &req.target {
            DeletionTarget::Connection(id) => {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CONNECTION_COLUMNS} FROM connections WHERE connection_id = $1{FOR_UPDATE}"
                )))
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(DeletionOutcome::NotFound);
                };
                let conn = connection_from_row(&row)?;
                // Deleted, or already revoked upstream and told so again.
                let settled = conn.status == ConnectionStatus::Deleted
                    || (conn.status == ConnectionStatus::RevokedUpstream
                        && req.reason == DeletionReason::UserRevokedAtGoogle);
                if settled {
                    let receipt: Option<String> = sqlx::query_scalar(
                        "SELECT rc.receipt_id FROM receipt_connections rc \
                         JOIN deletion_receipts r ON r.receipt_id = rc.receipt_id \
                         WHERE rc.connection_id = $1 ORDER BY r.requested_at DESC LIMIT 1",
                    )
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                    return match receipt {
                        Some(r) => Ok(DeletionOutcome::Existing(ReceiptId::from_stored(r))),
                        None => Err(VaultError::precondition(format!(
                            "connection {id} was replaced by a newer connection and holds nothing"
                        ))),
                    };
                }
                (conn.tenant.clone(), conn.account.clone(), vec![conn])
            }
            DeletionTarget::Account(t, a) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CONNECTION_COLUMNS} FROM connections WHERE tenant_id = $1 AND account_id = $2 \
                     AND status <> 'deleted' ORDER BY connection_id{FOR_UPDATE}"
                )))
                .bind(t.as_str())
                .bind(a.as_str())
                .fetch_all(&mut *tx)
                .await?;
                let targets = rows.iter().map(connection_from_row).collect::<StoreResult<Vec<_>>>()?;
                let existing: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT receipt_id FROM deletion_receipts WHERE subject_key = $1{FOR_UPDATE}"
                )))
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(r) = existing {
                    if targets.is_empty() {
                        return Ok(DeletionOutcome::Existing(ReceiptId::from_stored(r)));
                    }
                    // The account was deleted before and has connected again:
                    // the old receipt keeps its history under another key.
                    sqlx::query("UPDATE deletion_receipts SET subject_key = $1 WHERE receipt_id = $2")
                        .bind(format!("{key}@{r}"))
                        .bind(&r)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("DELETE FROM authorization_states WHERE tenant_id = $1 AND account_id = $2")
                    .bind(t.as_str())
                    .bind(a.as_str())
                    .execute(&mut *tx)
                    .await?;
                (t.clone(), a.clone(), targets)
            }
        };
        let target_ids: Vec<&str> = targets.iter().map(|c| c.id.as_str()).collect();
        // The Google grants (subjects) this deletion revokes, each once, by
        // the one connection whose outbox copy the vault prepared for it.
        let mut carriers: Vec<&ConnectionId> = Vec::new();
        if req.revoke_upstream {
            let mut subjects: Vec<&str> = targets
                .iter()
                .filter(|t| t.status != ConnectionStatus::RevokedUpstream)
                .filter_map(|t| t.google_subject.as_deref())
                .collect();
            subjects.sort_unstable();
            subjects.dedup();
            for subject in subjects {
                // Lock every live connection on this Google account, so two
                // concurrent deletions cannot each think the other survives.
                let live: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT connection_id FROM connections WHERE google_subject = $1 \
                     AND status <> 'deleted' ORDER BY connection_id{FOR_UPDATE}"
                )))
                .bind(subject)
                .fetch_all(&mut *tx)
                .await?;
                if live.iter().any(|o| !target_ids.contains(&o.as_str())) {
                    continue; // another connection still uses the grant
                }
                let carrier = targets.iter().find(|t| {
                    t.google_subject.as_deref() == Some(subject)
                        && req.outbox.iter().any(|o| o.connection_id == t.id)
                });
                match carrier {
                    Some(c) => carriers.push(&c.id),
                    // Tokens appeared after the outbox copies were prepared.
                    None => return Ok(DeletionOutcome::Retry),
                }
            }
        }
        let deleted: Vec<DeletedConnection> = targets
            .iter()
            .map(|conn| DeletedConnection {
                connection_id: conn.id.clone(),
                integration: conn.integration,
                upstream: if carriers.contains(&&conn.id) {
                    UpstreamState::Pending
                } else {
                    UpstreamState::NotNeeded
                },
            })
            .collect();
        let reason = req.reason.as_str();
        let mut events = Vec::new();
        // Revoked at Google by the user: the connection says so, and the
        // product asks them to reconnect. Every other reason deletes.
        let status = if req.reason == DeletionReason::UserRevokedAtGoogle {
            ConnectionStatus::RevokedUpstream
        } else {
            ConnectionStatus::Deleted
        };
        for conn in &targets {
            delete_secrets(&mut tx, conn.id.as_str()).await?;
            sqlx::query(
                "UPDATE connections SET status = $1, status_reason = $2, google_subject = NULL, \
                 google_email = NULL, granted_scopes = '', updated_at = $3, deleted_at = $3, \
                 last_refresh_at = NULL, last_refresh_error = NULL, last_refresh_error_at = NULL, \
                 next_check_at = NULL WHERE connection_id = $4",
            )
            .bind(status.as_str())
            .bind(reason)
            .bind(at)
            .bind(conn.id.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM refresh_locks WHERE connection_id = $1")
                .bind(conn.id.as_str())
                .execute(&mut *tx)
                .await?;
            let template = NewEvent {
                reason: Some(req.reason),
                ..connection_event(EventKind::LeaseRevoked, conn, req.at, &req.detail)
            };
            revoke_open_leases(&mut tx, &conn.id, req.at, reason, &template, &mut events).await?;
        }
        let overall = if deleted.iter().any(|d| d.upstream == UpstreamState::Pending) {
            UpstreamState::Pending
        } else {
            UpstreamState::NotNeeded
        };
        sqlx::query(
            "INSERT INTO deletion_receipts (receipt_id, subject_key, tenant_id, account_id, reason, \
             reason_detail, requested_at, tokens_destroyed_at, upstream_state, requested_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9)",
        )
        .bind(req.receipt_id.as_str())
        .bind(&key)
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(reason)
        .bind(&req.detail)
        .bind(at)
        .bind(overall.as_str())
        .bind(&req.requested_by)
        .execute(&mut *tx)
        .await?;
        for d in &deleted {
            let pending = d.upstream == UpstreamState::Pending;
            sqlx::query(
                "INSERT INTO receipt_connections (receipt_id, connection_id, integration, upstream_state, \
                 next_attempt_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(req.receipt_id.as_str())
            .bind(d.connection_id.as_str())
            .bind(d.integration.as_str())
            .bind(d.upstream.as_str())
            .bind(pending.then_some(req.retry_at.as_micros()))
            .execute(&mut *tx)
            .await?;
            if pending && let Some(o) = req.outbox.iter().find(|o| o.connection_id == d.connection_id) {
                check_wrapping_version(&mut tx, o.kek_version).await?;
                sqlx::query(
                    "INSERT INTO revocation_outbox (receipt_id, connection_id, kek_version, wrapped_dek, \
                     sealed_token, created_at, next_attempt_at, give_up_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(req.receipt_id.as_str())
                .bind(d.connection_id.as_str())
                .bind(kek_to_db(o.kek_version))
                .bind(o.wrapped_dek.as_slice())
                .bind(o.sealed_token.as_slice())
                .bind(at)
                .bind(req.retry_at.as_micros())
                .bind(req.give_up_at.as_micros())
                .execute(&mut *tx)
                .await?;
            }
        }
        let mut consumers: Vec<&str> = req
            .required_consumers
            .iter()
            .filter(|(i, _)| deleted.iter().any(|d| d.integration == *i))
            .map(|(_, c)| c.as_str())
            .collect();
        consumers.sort_unstable();
        consumers.dedup();
        for c in consumers {
            sqlx::query("INSERT INTO receipt_acks (receipt_id, consumer) VALUES ($1, $2)")
                .bind(req.receipt_id.as_str())
                .bind(c)
                .execute(&mut *tx)
                .await?;
        }
        let kind = match req.target {
            DeletionTarget::Connection(_) => EventKind::ConnectionDeleted,
            DeletionTarget::Account(..) => EventKind::AccountDeleted,
        };
        for conn in &targets {
            events.push(NewEvent {
                receipt_id: Some(req.receipt_id.clone()),
                reason: Some(req.reason),
                ..connection_event(kind, conn, req.at, &req.detail)
            });
        }
        if targets.is_empty() {
            events.push(NewEvent {
                kind,
                occurred_at: req.at,
                tenant: Some(tenant.clone()),
                account: Some(account.clone()),
                connection_id: None,
                integration: None,
                lease_id: None,
                receipt_id: Some(req.receipt_id.clone()),
                reason: Some(req.reason),
                detail: req.detail.clone(),
            });
        }
        insert_events(&mut tx, &events).await?;
        complete_receipts(&mut tx, req.at).await?;
        let done = AuditDraft {
            // Stamped under the chain head's lock: entries stay in time order.
            at: Timestamp::now(),
            detail: format!(
                "receipt={} connections={}",
                req.receipt_id,
                deleted
                    .iter()
                    .map(|d| format!("{}:{}", d.connection_id, d.upstream))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ..req.done.clone()
        };
        append_locked(&mut tx, head, std::slice::from_ref(&done), &[], sealer).await?;
        tx.commit().await?;
        release(_guard);
        self.scrub().await;
        Ok(DeletionOutcome::Deleted {
            receipt_id: req.receipt_id.clone(),
            connections: deleted,
        })
    }

    async fn receipt_of_connection(&self, id: &ConnectionId) -> StoreResult<Option<ReceiptId>> {
        let row = sqlx::query(
            "SELECT receipt_id FROM receipt_connections WHERE connection_id = $1 \
             ORDER BY receipt_id LIMIT 1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get("receipt_id").map(ReceiptId::from_stored))
            .transpose()
            .map_err(Into::into)
    }

    async fn receipt_get(&self, id: &ReceiptId) -> StoreResult<Option<ReceiptRecord>> {
        let Some(row) = sqlx::query("SELECT * FROM deletion_receipts WHERE receipt_id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let conns = sqlx::query("SELECT * FROM receipt_connections WHERE receipt_id = $1 ORDER BY connection_id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        let acks = sqlx::query("SELECT consumer, acknowledged_at FROM receipt_acks WHERE receipt_id = $1 ORDER BY consumer")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(ReceiptRecord {
            receipt_id: ReceiptId::from_stored(row.try_get("receipt_id")?),
            tenant: TenantId::from_stored(row.try_get("tenant_id")?),
            account: AccountId::from_stored(row.try_get("account_id")?),
            reason: stored(DeletionReason::parse(row.try_get::<&str, _>("reason")?), "reason")?,
            reason_detail: row.try_get("reason_detail")?,
            requested_by: row.try_get("requested_by")?,
            requested_at: ts(row.try_get("requested_at")?),
            tokens_destroyed_at: opt_ts(row.try_get("tokens_destroyed_at")?),
            completed_at: opt_ts(row.try_get("completed_at")?),
            connections: conns
                .iter()
                .map(|r| {
                    Ok(ReceiptConnection {
                        connection_id: ConnectionId::from_stored(r.try_get("connection_id")?),
                        integration: stored(Integration::parse(r.try_get::<&str, _>("integration")?), "integration")?,
                        upstream: stored(UpstreamState::parse(r.try_get::<&str, _>("upstream_state")?), "upstream_state")?,
                        attempts: r.try_get("attempts")?,
                        last_attempt_at: opt_ts(r.try_get("last_attempt_at")?),
                        next_attempt_at: opt_ts(r.try_get("next_attempt_at")?),
                        settled_at: opt_ts(r.try_get("settled_at")?),
                        last_error: r.try_get("last_error")?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?,
            acks: acks
                .iter()
                .map(|r| Ok((r.try_get("consumer")?, opt_ts(r.try_get("acknowledged_at")?))))
                .collect::<StoreResult<Vec<_>>>()?,
        }))
    }

    async fn outbox_due(
        &self,
        now: Timestamp,
        receipt: Option<&ReceiptId>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxRow>> {
        let base = "SELECT o.*, rc.attempts FROM revocation_outbox o JOIN receipt_connections rc \
             ON rc.receipt_id = o.receipt_id AND rc.connection_id = o.connection_id \
             WHERE o.next_attempt_at <= $1";
        let rows = match receipt {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{base} ORDER BY o.next_attempt_at LIMIT $2"
                )))
                .bind(now.as_micros())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(r) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{base} AND o.receipt_id = $2 ORDER BY o.next_attempt_at LIMIT $3"
                )))
                .bind(now.as_micros())
                .bind(r.as_str())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut due = Vec::with_capacity(rows.len());
        for r in &rows {
            let receipt_id = ReceiptId::from_stored(r.try_get("receipt_id")?);
            let connection_id = ConnectionId::from_stored(r.try_get("connection_id")?);
            let seen: i64 = r.try_get("next_attempt_at")?;
            // Claim it for a minute, so another replica does not attempt it too.
            let (_guard, mut tx) = self.begin_write().await?;
            let claimed = sqlx::query(
                "UPDATE revocation_outbox SET next_attempt_at = $1 \
                 WHERE receipt_id = $2 AND connection_id = $3 AND next_attempt_at = $4",
            )
            .bind(now.plus(std::time::Duration::from_secs(60)).as_micros())
            .bind(receipt_id.as_str())
            .bind(connection_id.as_str())
            .bind(seen)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            if claimed == 0 {
                continue;
            }
            due.push(OutboxRow {
                token: OutboxToken {
                    connection_id,
                    kek_version: kek_from_db(r.try_get("kek_version")?)?,
                    wrapped_dek: r.try_get("wrapped_dek")?,
                    sealed_token: r.try_get("sealed_token")?,
                },
                receipt_id,
                created_at: ts(r.try_get("created_at")?),
                give_up_at: ts(r.try_get("give_up_at")?),
                attempts: r.try_get("attempts")?,
            });
        }
        Ok(due)
    }

    async fn outbox_depth(&self) -> StoreResult<(i64, Option<Timestamp>)> {
        let row = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM revocation_outbox")
            .fetch_one(&self.pool)
            .await?;
        Ok((row.try_get("n")?, opt_ts(row.try_get("oldest")?)))
    }

    async fn outbox_retry(
        &self,
        receipt: &ReceiptId,
        connection: &ConnectionId,
        at: Timestamp,
        next_at: Timestamp,
        error: &str,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "UPDATE receipt_connections SET attempts = attempts + 1, last_attempt_at = $1, \
             next_attempt_at = $2, last_error = $3 WHERE receipt_id = $4 AND connection_id = $5",
        )
        .bind(at.as_micros())
        .bind(next_at.as_micros())
        .bind(error)
        .bind(receipt.as_str())
        .bind(connection.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE revocation_outbox SET next_attempt_at = $1 WHERE receipt_id = $2 AND connection_id = $3",
        )
        .bind(next_at.as_micros())
        .bind(receipt.as_str())
        .bind(connection.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_settle(
        &self,
        receipt: &ReceiptId,
        connection: &ConnectionId,
        state: UpstreamState,
        at: Timestamp,
        error: Option<&str>,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM revocation_outbox WHERE receipt_id = $1 AND connection_id = $2")
            .bind(receipt.as_str())
            .bind(connection.as_str())
            .execute(&mut *tx)
            .await?;
        let attempted = i64::from(state == UpstreamState::Confirmed);
        sqlx::query(
            "UPDATE receipt_connections SET upstream_state = $1, attempts = attempts + $2, \
             last_attempt_at = $3, settled_at = $3, next_attempt_at = NULL, \
             last_error = COALESCE($4, last_error) WHERE receipt_id = $5 AND connection_id = $6",
        )
        .bind(state.as_str())
        .bind(attempted)
        .bind(at.as_micros())
        .bind(error)
        .bind(receipt.as_str())
        .bind(connection.as_str())
        .execute(&mut *tx)
        .await?;
        let still_pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM receipt_connections WHERE receipt_id = $1 AND upstream_state = 'pending'",
        )
        .bind(receipt.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if still_pending == 0 {
            let overall = if state == UpstreamState::Failed { "failed" } else { "confirmed" };
            sqlx::query(
                "UPDATE deletion_receipts SET upstream_state = $1, upstream_updated_at = $2 WHERE receipt_id = $3",
            )
            .bind(overall)
            .bind(at.as_micros())
            .bind(receipt.as_str())
            .execute(&mut *tx)
            .await?;
        }
        complete_receipts(&mut tx, at).await?;
        tx.commit().await?;
        release(_guard);
        self.scrub().await;
        Ok(())
    }

    async fn connections_by_subject(&self, subject: &str) -> StoreResult<Vec<ConnectionRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections WHERE google_subject = $1 \
             AND status <> 'deleted' ORDER BY connection_id"
        )))
        .bind(subject)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(connection_from_row).collect()
    }

    async fn connections_suspend(
        &self,
        subject: &str,
        suspend: bool,
        detail: &str,
        at: Timestamp,
    ) -> StoreResult<Vec<ConnectionId>> {
        let (from, to) = if suspend { ("active", "suspended") } else { ("suspended", "active") };
        let (_guard, mut tx) = self.begin_write().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections WHERE google_subject = $1 \
             AND status = $2 ORDER BY connection_id{FOR_UPDATE}"
        )))
        .bind(subject)
        .bind(from)
        .fetch_all(&mut *tx)
        .await?;
        let conns = rows.iter().map(connection_from_row).collect::<StoreResult<Vec<_>>>()?;
        let mut events = Vec::new();
        for c in &conns {
            sqlx::query(
                "UPDATE connections SET status = $1, status_reason = $2, updated_at = $3, \
                 next_check_at = COALESCE(next_check_at, $3) WHERE connection_id = $4",
            )
            .bind(to)
            .bind(suspend.then_some(detail))
            .bind(at.as_micros())
            .bind(c.id.as_str())
            .execute(&mut *tx)
            .await?;
            let kind = if suspend { EventKind::Suspended } else { EventKind::Resumed };
            let base = connection_event(kind, c, at, detail);
            if suspend {
                revoke_open_leases(&mut tx, &c.id, at, "suspended", &base, &mut events).await?;
            }
            events.push(base);
        }
        insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(conns.into_iter().map(|c| c.id).collect())
    }

    async fn risc_seen_insert(&self, jti: &str, at: Timestamp) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query(
            "INSERT INTO risc_seen (jti, received_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
        )
        .bind(jti)
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn risc_seen(&self, jti: &str) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM risc_seen WHERE jti = $1")
            .bind(jti)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    async fn receipt_list(
        &self,
        filter: &ReceiptFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ReceiptRecord>> {
        let mut f = Filter::new("SELECT receipt_id FROM deletion_receipts");
        if filter.incomplete_only {
            f.sql.push_str(" AND completed_at IS NULL");
        }
        if let Some(b) = filter.requested_before {
            f.push("requested_at < ?", FilterValue::Int(b.as_micros()));
        }
        if let Some(t) = &filter.tenant {
            f.push("tenant_id = ?", FilterValue::Text(t.to_string()));
        }
        if let Some(a) = &filter.account {
            f.push("account_id = ?", FilterValue::Text(a.to_string()));
        }
        if let Some(after) = &page.after {
            f.push("receipt_id > ?", FilterValue::Text(after.clone()));
        }
        f.binds.push(FilterValue::Int(page.limit));
        f.sql.push_str(&format!(" ORDER BY receipt_id LIMIT ${}", f.binds.len()));
        let ids: Vec<String> = f
            .query()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("receipt_id"))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.receipt_get(&ReceiptId::from_stored(id)).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn receipt_incomplete_count(&self, before: Timestamp) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM deletion_receipts WHERE completed_at IS NULL AND requested_at < $1",
        )
        .bind(before.as_micros())
        .fetch_one(&self.pool)
        .await?)
    }

    async fn retention_prune(&self, before: Timestamp, consumers: &[String]) -> StoreResult<u64> {
        let b = before.as_micros();
        let (_guard, mut tx) = self.begin_write().await?;
        let mut n = 0;
        // Events every required consumer has acknowledged, past retention.
        let mut acked: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(cursor), 0) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        for c in consumers {
            let pos: Option<i64> =
                sqlx::query_scalar("SELECT cursor FROM consumer_positions WHERE consumer = $1")
                    .bind(c)
                    .fetch_optional(&mut *tx)
                    .await?;
            acked = acked.min(pos.unwrap_or(0));
        }
        let through: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(cursor) FROM events WHERE cursor <= $1 AND occurred_at < $2",
        )
        .bind(acked)
        .bind(b)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(through) = through {
            n += sqlx::query("DELETE FROM events WHERE cursor <= $1")
                .bind(through)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE event_log_state SET pruned_through = $1 WHERE id = 1 AND pruned_through < $1",
            )
            .bind(through)
            .execute(&mut *tx)
            .await?;
        }
        // Complete receipts past retention, with their parts and tombstones.
        let old: Vec<String> = sqlx::query_scalar(
            "SELECT receipt_id FROM deletion_receipts WHERE completed_at IS NOT NULL AND completed_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.receipt_id = deletion_receipts.receipt_id)",
        )
        .bind(b)
        .fetch_all(&mut *tx)
        .await?;
        for r in &old {
            for sql in [
                "DELETE FROM receipt_acks WHERE receipt_id = $1",
                "DELETE FROM revocation_outbox WHERE receipt_id = $1",
                "DELETE FROM receipt_connections WHERE receipt_id = $1",
                "DELETE FROM deletion_receipts WHERE receipt_id = $1",
            ] {
                n += sqlx::query(sql).bind(r).execute(&mut *tx).await?.rows_affected();
            }
        }
        n += sqlx::query(
            "DELETE FROM connections WHERE status IN ('deleted', 'revoked_upstream') AND deleted_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM receipt_connections rc WHERE rc.connection_id = connections.connection_id) \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.connection_id = connections.connection_id)",
        )
        .bind(b)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        n += sqlx::query("DELETE FROM risc_seen WHERE received_at < $1")
            .bind(b)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
