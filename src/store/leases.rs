//! Lease records and the lease path's batched read of connections with
//! their sealed secrets.
//!
//! Every place a lease row is written:
//! - granted: only with its audit entry, in one statement that also moves
//!   the chain head: PostgreSQL's `APPEND_AUDIT` (`postgres.rs`), SQLite's
//!   `APPEND_BATCH` into the `audit_append_batch` view whose trigger inserts
//!   the rows (migration 0005), or, when that statement is refused, the same
//!   statement under the write lock after `HOLDING_LEASES` (`sqlite.rs`);
//!   each inserts a lease only if its connection is still ACTIVE and
//!   unchanged since the lease path read it;
//! - released: [`LeaseStore::lease_release`];
//! - revoked: `revoke_open_leases` (`common.rs`), called by a deletion
//!   (`deletion.rs`) and a RISC suspension (`risc.rs`);
//! - pruned once expired: [`LeaseStore::lease_prune`].
//!
//! A lease row is compact (migration 0010): the lease and connection ids as
//! the 16 bytes of their UUIDs ([`LeaseId::key`]), the holder, the expiry and
//! how it ended. Its purpose, scopes and token fingerprint are in the grant's
//! audit entry, written in the same statement. Lease ids are UUIDv7, so the
//! primary key is in grant order and serves as the time index.
//!
//! Invariants: no lease is recorded for a connection that is not ACTIVE and
//! unchanged in the same transaction; a lease ends once (released, revoked
//! or expired, whichever comes first); every lease open at a time `t` was
//! granted after `t - lease.max_ttl_seconds`.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{ConnectionId, LeaseId, Timestamp, VaultError};
use crate::store::{ConnectionRecord, LeaseRecord, SecretsRecord, StoreResult};

/// Lease records and the lease path's batched read.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Connections with their sealed secrets, many at once (the lease path's
    /// batched read). Unknown ids are absent from the result.
    async fn lease_lookup(
        &self,
        ids: &[ConnectionId],
    ) -> StoreResult<Vec<(ConnectionRecord, Option<SecretsRecord>)>>;

    /// One lease.
    async fn lease_get(&self, id: &LeaseId) -> StoreResult<Option<LeaseRecord>>;

    /// Ends a lease now unless it already ended; returns when it ended
    /// (`None`: no such lease).
    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>>;

    /// Leases neither revoked nor expired at `at` (of one connection, when
    /// given), among those granted after `granted_after` (no lease lives
    /// longer than `lease.max_ttl_seconds`, so that bound loses none).
    async fn lease_open_count(
        &self,
        at: Timestamp,
        granted_after: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64>;

    /// Deletes at most `limit` lease rows that expired before `before`,
    /// oldest first, among those granted before `granted_before`: lease ids
    /// are time-ordered, so the rows are found by a range of the primary key
    /// and each call is one short transaction.
    async fn lease_prune(
        &self,
        before: Timestamp,
        granted_before: Timestamp,
        limit: i64,
    ) -> StoreResult<u64>;
}

for_each_backend! {
sqlite {
    // The lease path's batched read takes its ids as one JSON array, so its
    // statement text is the same for any number of ids.
    const ID_IN_LIST: &str = "IN (SELECT value FROM json_each($1))";
    fn id_list(ids: &[ConnectionId]) -> String {
        serde_json::to_string(&ids.iter().map(ConnectionId::as_str).collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".to_owned())
    }
}
postgres {
    // The lease path's batched read takes its ids as one array parameter, so its
    // statement text is the same for any number of ids.
    const ID_IN_LIST: &str = "= ANY($1)";
    fn id_list(ids: &[ConnectionId]) -> Vec<&str> {
        ids.iter().map(ConnectionId::as_str).collect()
    }
}
/// The lease path's batched read: connections with their wrapped DEK and
/// sealed tokens, for the ids in `$1` (bound with `id_list`).
pub(in crate::store) static LEASE_LOOKUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
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

pub(in crate::store) fn lease_from_row(row: &Row) -> StoreResult<LeaseRecord> {
    Ok(LeaseRecord {
        lease_id: LeaseId::from_key(row.try_get("lease_id")?)?,
        connection_id: ConnectionId::from_key(row.try_get("connection_id")?)?,
        caller: row.try_get("caller")?,
        expires_at: ts(row.try_get("expires_at")?),
        revoked_at: opt_ts(row.try_get("revoked_at")?),
        revoke_reason: row.try_get("revoke_reason")?,
    })
}

#[async_trait]
impl LeaseStore for StoreImpl {
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
                held.discard_on_error(rows).await?
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

    async fn lease_get(&self, id: &LeaseId) -> StoreResult<Option<LeaseRecord>> {
        let row = sqlx::query("SELECT * FROM leases WHERE lease_id = $1")
            .bind(id.key().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(lease_from_row).transpose()
    }

    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT expires_at, revoked_at FROM leases WHERE lease_id = $1{FOR_UPDATE}"
        )))
        .bind(id.key().as_slice())
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
        .bind(id.key().as_slice())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(at))
    }

    async fn lease_open_count(
        &self,
        at: Timestamp,
        granted_after: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64> {
        let after = LeaseId::key_minted_before(granted_after);
        Ok(match connection {
            None => sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases WHERE lease_id >= $1 AND expires_at > $2 \
                 AND revoked_at IS NULL",
            )
            .bind(after.as_slice())
            .bind(at.as_micros())
            .fetch_one(&self.pool)
            .await?,
            Some(c) => sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases WHERE connection_id = $1 AND revoked_at IS NULL \
                 AND lease_id >= $2 AND expires_at > $3",
            )
            .bind(c.key().as_slice())
            .bind(after.as_slice())
            .bind(at.as_micros())
            .fetch_one(&self.pool)
            .await?,
        })
    }

    async fn lease_prune(
        &self,
        before: Timestamp,
        granted_before: Timestamp,
        limit: i64,
    ) -> StoreResult<u64> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query(
            "DELETE FROM leases WHERE lease_id IN (SELECT lease_id FROM leases \
             WHERE lease_id < $1 AND expires_at < $2 ORDER BY lease_id LIMIT $3)",
        )
        .bind(LeaseId::key_minted_before(granted_before).as_slice())
        .bind(before.as_micros())
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
}
