//! What every aggregate's SQL shares: value conversions (timestamps as
//! microseconds, KEK versions), the row mappers of records several
//! aggregates read, the connections the hot paths keep checked out, the
//! dynamic filter builder, and the writes that several transactions make
//! (events, lease revocation, receipt completion, secret destruction, the
//! wrapping-version check). Also `Store`'s own methods (`ping`, `close`,
//! `clock`).
//!
//! Invariants: every value in a dynamic filter is bound, never formatted
//! into the text; a held connection goes back to the pool after any error,
//! so a broken one is replaced on its next use.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, EventKind, Integration, ScopeSet, TenantId,
    Timestamp, VaultError,
};
use crate::store::{Backend, ConnectionRecord, NewEvent, SecretsRecord, StoreResult};

/// The audit chain's head: the last entry's sequence number and hash.
pub(in crate::store) type ChainHead = (i64, Vec<u8>);

pub(in crate::store) fn opt_parse<T>(
    v: Option<&str>,
    parse: impl Fn(&str) -> Result<T, VaultError>,
    column: &str,
) -> StoreResult<Option<T>> {
    v.map(|v| stored(parse(v), column)).transpose()
}

/// An event about one connection; lease, receipt and reason are set by the caller.
pub(in crate::store) fn connection_event(
    kind: EventKind,
    c: &ConnectionRecord,
    at: Timestamp,
    detail: &str,
) -> NewEvent {
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

/// Ends a write-lock guard early (on PostgreSQL the guard is `()`).
pub(in crate::store) fn release<G>(_guard: G) {}

pub(in crate::store) fn kek_from_db(v: i64) -> StoreResult<KekVersion> {
    u32::try_from(v)
        .ok()
        .and_then(KekVersion::new)
        .ok_or_else(|| VaultError::Storage(format!("kek version {v} out of range")))
}

pub(in crate::store) fn kek_to_db(v: KekVersion) -> i64 {
    i64::from(v.get())
}

pub(in crate::store) fn ts(v: i64) -> Timestamp {
    Timestamp::from_micros(v)
}

pub(in crate::store) fn opt_ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp::from_micros)
}

pub(in crate::store) fn stored<T>(parsed: Result<T, VaultError>, column: &str) -> StoreResult<T> {
    parsed.map_err(|e| VaultError::Storage(format!("column {column} holds an invalid value: {e}")))
}

pub(in crate::store) const CONNECTION_COLUMNS: &str = "connection_id, tenant_id, account_id, integration, google_subject, \
     google_email, granted_scopes, status, status_reason, created_at, updated_at, deleted_at, \
     last_refresh_at, last_refresh_error, last_refresh_error_at, next_check_at";

pub(in crate::store) enum FilterValue {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

/// The statuses of a connection whose every lease is revoked: a deletion or
/// a suspension set its cut-off too.
pub(in crate::store) const LEASES_REVOKED: [&str; 3] = ["deleted", "revoked_upstream", "suspended"];

/// `status IN (…)` over [`LEASES_REVOKED`], for the connection `column`
/// names.
pub(in crate::store) fn leases_revoked_status(column: &str) -> String {
    let list: Vec<String> = LEASES_REVOKED.iter().map(|s| format!("'{s}'")).collect();
    format!("{column} IN ({})", list.join(", "))
}

for_each_backend! {
    common;
/// A connection kept checked out of the pool for a hot path (the audit
/// writer, the lease reader). A pooled query pays a checkout and, when the
/// connection goes back, a ping round trip; a held connection pays them once.
/// It is closed after any error, so a broken connection is replaced by a
/// fresh one on the next use, and whatever the session held (the audit
/// writer's claim on its chain, on PostgreSQL) ends with it.
#[derive(Default)]
pub(in crate::store) struct HeldConnection(tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<Db>>>);

/// Exclusive use of a [`HeldConnection`]; `fresh` when it was just checked
/// out of the pool.
pub(in crate::store) struct Held<'a> {
    pub(in crate::store) guard: tokio::sync::MutexGuard<'a, Option<sqlx::pool::PoolConnection<Db>>>,
    pub(in crate::store) fresh: bool,
}

impl HeldConnection {
    /// Waits for the connection, checking one out if none is held.
    pub(in crate::store) async fn lock(&self, pool: &sqlx::Pool<Db>) -> StoreResult<Held<'_>> {
        Held::fill(self.0.lock().await, pool).await
    }

    /// The connection if no one else is using it.
    pub(in crate::store) async fn try_lock(&self, pool: &sqlx::Pool<Db>) -> Option<StoreResult<Held<'_>>> {
        let guard = self.0.try_lock().ok()?;
        Some(Held::fill(guard, pool).await)
    }

    /// Closes the connection (before the pool closes).
    pub(in crate::store) async fn release(&self) {
        if let Some(mut conn) = self.0.lock().await.take() {
            conn.close_on_drop();
        }
    }
}

impl<'a> Held<'a> {
    pub(in crate::store) async fn fill(
        mut guard: tokio::sync::MutexGuard<'a, Option<sqlx::pool::PoolConnection<Db>>>,
        pool: &sqlx::Pool<Db>,
    ) -> StoreResult<Self> {
        let fresh = guard.is_none();
        if fresh {
            *guard = Some(pool.acquire().await?);
        }
        Ok(Self { guard, fresh })
    }

    pub(in crate::store) fn conn(&mut self) -> StoreResult<&mut <Db as sqlx::Database>::Connection> {
        match self.guard.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(VaultError::Internal("held connection missing".into())),
        }
    }

    /// Closes the connection after an error, waiting a moment for the
    /// close to reach the server (so that what the session held is released
    /// before the next use opens another).
    pub(in crate::store) async fn discard_on_error<T>(mut self, result: StoreResult<T>) -> StoreResult<T> {
        if result.is_err()
            && let Some(conn) = self.guard.take()
        {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.close()).await;
        }
        result
    }
}

/// The connections the hot paths keep checked out.
#[derive(Default)]
pub(in crate::store) struct HotConnections {
    /// The audit writer's.
    pub(in crate::store) writer: HeldConnection,
    /// The lease reader's; a read finding all of them busy uses the pool.
    pub(in crate::store) readers: [HeldConnection; 3],
}

impl HotConnections {
    pub(in crate::store) async fn release(&self) {
        self.writer.release().await;
        for r in &self.readers {
            r.release().await;
        }
    }
}

/// Reads chain `chain`'s head with `sql` (which binds the chain as `$1`).
pub(in crate::store) async fn read_audit_head<'c, E: sqlx::Executor<'c, Database = Db>>(
    db: E,
    sql: &'static str,
    chain: i64,
) -> StoreResult<ChainHead> {
    match sqlx::query_as::<_, (i64, Vec<u8>)>(sql).bind(chain).fetch_optional(db).await? {
        Some(head) => Ok(head),
        None => Err(VaultError::Internal("audit_head row missing".into())),
    }
}

/// Appends events inside a write transaction, after taking the event-order lock.
pub(in crate::store) async fn insert_events(tx: &mut sqlx::Transaction<'static, Db>, events: &[NewEvent]) -> StoreResult<Vec<i64>> {
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

/// A lease `l` (a row of `leases`) neither released nor revoked at the time
/// bound as `$at`: no release by then, and no revocation cut-off of its
/// connection at or after its grant (the partial index on
/// `leases_revoked_at` finds the few connections revoked since).
pub(in crate::store) fn lease_not_ended(at: usize) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM lease_releases r WHERE r.seq = l.seq AND r.released_at <= ${at}) \
         AND NOT EXISTS (SELECT 1 FROM connections cut WHERE cut.leases_revoked_at >= l.at \
           AND {} = l.connection_id)",
        connection_uuid("cut.connection_id")
    )
}

/// Ends a connection's open leases inside a write transaction: sets its
/// revocation cut-off (every lease of it granted up to `at` is revoked; see
/// `leases.rs`) and queues one LEASE_REVOKED event, copied from `template`,
/// that names the connection and the cut-off rather than each lease.
pub(in crate::store) async fn revoke_open_leases(
    tx: &mut sqlx::Transaction<'static, Db>,
    connection: &ConnectionId,
    at: Timestamp,
    reason: &str,
    template: &NewEvent,
    events: &mut Vec<NewEvent>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE connections SET leases_revoked_at = $1, leases_revoke_reason = $2 \
         WHERE connection_id = $3",
    )
    .bind(at.as_micros())
    .bind(reason)
    .bind(connection.as_str())
    .execute(&mut **tx)
    .await?;
    events.push(NewEvent {
        kind: EventKind::LeaseRevoked,
        lease_id: None,
        ..template.clone()
    });
    Ok(())
}

/// Marks complete every receipt with no outstanding ack or revocation.
pub(in crate::store) async fn complete_receipts(tx: &mut sqlx::Transaction<'static, Db>, at: Timestamp) -> StoreResult<u64> {
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

pub(in crate::store) type Row = <Db as sqlx::Database>::Row;

pub(in crate::store) fn connection_from_row(row: &Row) -> StoreResult<ConnectionRecord> {
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

pub(in crate::store) fn secrets_from_row(row: &Row) -> StoreResult<SecretsRecord> {
    secrets_from_columns(row, "updated_at")
}

/// The secrets columns of a row whose secrets' `updated_at` is named
/// `updated_at_column` (joins with `connections` alias it).
pub(in crate::store) fn secrets_from_columns(row: &Row, updated_at_column: &str) -> StoreResult<SecretsRecord> {
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

/// Refuses to store a freshly wrapped key unless its version is still the
/// primary, after waiting out (on PostgreSQL) a promotion or retirement of it
/// in progress: a replica that read the primary just before a rotation began
/// must not leave a key behind that the rotation's last pass has already
/// counted out. The caller wraps again under the new primary.
pub(in crate::store) async fn check_wrapping_version(
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

/// Builds `SELECT ... WHERE` text for the dynamic filters; every value is bound.
pub(in crate::store) struct Filter {
    pub(in crate::store) sql: String,
    pub(in crate::store) binds: Vec<FilterValue>,
}

impl Filter {
    pub(in crate::store) fn new(base: &str) -> Self {
        Self {
            sql: format!("{base} WHERE 1 = 1"),
            binds: Vec::new(),
        }
    }

    pub(in crate::store) fn push(&mut self, clause: &str, value: FilterValue) {
        self.binds.push(value);
        // `clause` contains a single `?`, replaced by the next numbered placeholder.
        let n = self.binds.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&clause.replace('?', &format!("${n}")));
    }

    pub(in crate::store) fn query(&self) -> sqlx::query::Query<'_, Db, <Db as sqlx::Database>::Arguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
        for b in &self.binds {
            q = match b {
                FilterValue::Text(s) => q.bind(s.as_str()),
                FilterValue::Int(i) => q.bind(*i),
                FilterValue::Bytes(b) => q.bind(b.as_slice()),
            };
        }
        q
    }
}

/// Destroys a connection's sealed tokens and its wrapped DEK.
pub(in crate::store) async fn delete_secrets(tx: &mut sqlx::Transaction<'static, Db>, id: &str) -> StoreResult<()> {
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

#[async_trait]
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

    async fn clock(&self) -> StoreResult<Timestamp> {
        let micros: i64 = sqlx::query_scalar(CLOCK_MICROS).fetch_one(&self.pool).await?;
        Ok(ts(micros))
    }

    async fn reclaim(&self, tables: &[&'static str]) -> StoreResult<bool> {
        // SQLite reuses the pages of deleted rows by itself (its free list).
        if BACKEND != Backend::Postgres {
            return Ok(false);
        }
        let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(&self.pool)
            .await?;
        if autovacuum != "off" {
            return Ok(false);
        }
        for table in tables {
            // Table names come from this crate, never from input.
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM {table}")))
                .execute(&self.pool)
                .await?;
        }
        Ok(true)
    }
}
}
