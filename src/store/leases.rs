//! Lease records and the lease path's batched read of connections with
//! their sealed secrets.
//!
//! A lease's record is one row of `leases` (migration 0013), which is also
//! its grant's audit entry: the entry's sequence number, time, hash and MAC,
//! the lease and connection ids as 16 bytes, the expiry, the token
//! fingerprint and a `lease_profiles` id naming who it was granted to and
//! for which purpose and scopes. Every place a lease is written:
//! - granted: only as its audit entry, in the one statement that also moves
//!   the chain head: PostgreSQL's `APPEND_AUDIT` (`postgres.rs`), SQLite's
//!   `APPEND_BATCH` into the `audit_append_batch` view whose trigger inserts
//!   the rows (migration 0013), or, when that statement is refused, the same
//!   statement under the write lock after `HOLDING_LEASES` (`sqlite.rs`);
//!   each records a lease only if its connection is still ACTIVE and
//!   unchanged since the lease path read it;
//! - released: a row of `lease_releases` ([`LeaseStore::lease_release`]);
//! - revoked: by its connection, not one by one: a deletion or suspension
//!   sets the connection's `leases_revoked_at` cut-off (`revoke_open_leases`
//!   in `common.rs`), which ends every lease of it granted up to then;
//! - pruned with the audit entries it is, once archived and expired past
//!   `lease.record_retention_seconds` (`AuditStore::audit_prune_archived`).
//!
//! Lease ids are UUIDv7, so their index is in grant order and serves as the
//! time index of the open-lease counts.
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

    /// One lease, with how it ended if it did: released, or revoked when
    /// its connection's cut-off is at or after its grant or the connection
    /// is deleted, revoked upstream or suspended (a lease whose connection
    /// row was pruned reads as ended at its expiry).
    async fn lease_get(&self, id: &LeaseId) -> StoreResult<Option<LeaseRecord>>;

    /// Ends a lease now unless it already ended; returns when it ended
    /// (`None`: no such lease).
    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>>;

    /// Leases neither released, revoked nor expired at `at` (of one
    /// connection, when given), among those granted after `granted_after`
    /// (no lease lives longer than `lease.max_ttl_seconds`, so that bound
    /// loses none). A lease granted while its connection was being revoked
    /// may be counted until it expires (see [`LeaseStore::lease_get`]).
    async fn lease_open_count(
        &self,
        at: Timestamp,
        granted_after: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64>;
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} AS connection_key, p.actor, l.at, l.expires_at, r.released_at \
             FROM leases l JOIN lease_profiles p ON p.id = l.profile \
             LEFT JOIN lease_releases r ON r.seq = l.seq WHERE l.lease_id = {}",
            uuid_bytes("l.connection_id"),
            uuid_param(1)
        )))
        .bind(id.key().as_slice())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let connection_id = ConnectionId::from_key(row.try_get("connection_key")?)?;
        let granted = ts(row.try_get("at")?);
        let expires_at = ts(row.try_get("expires_at")?);
        let released = opt_ts(row.try_get("released_at")?);
        // The connection's revocation cut-off ends every lease granted up to
        // it; a deleted or suspended one has none open (whatever the clocks
        // stamped). A connection gone altogether was pruned long after its
        // leases expired.
        let revocation: Option<(String, Option<i64>, Option<i64>, Option<String>, Option<String>)> =
            sqlx::query_as(
                "SELECT status, leases_revoked_at, deleted_at, leases_revoke_reason, status_reason \
                 FROM connections WHERE connection_id = $1",
            )
            .bind(connection_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let revoked = match revocation {
            None => Some((expires_at, "expired".to_owned())),
            Some((status, cut, deleted, why, status_reason)) => {
                let cut = cut.map(ts);
                if cut.is_some_and(|c| c >= granted) || LEASES_REVOKED.contains(&status.as_str()) {
                    let when = cut.or(deleted.map(ts)).unwrap_or(granted);
                    Some((when, why.or(status_reason).unwrap_or(status)))
                } else {
                    None
                }
            }
        };
        let (revoked_at, revoke_reason) = match (released, revoked) {
            (Some(r), Some((v, why))) if v < r => (Some(v), Some(why)),
            (Some(r), _) => (Some(r), Some("released".to_owned())),
            (None, Some((v, why))) => (Some(v), Some(why)),
            (None, None) => (None, None),
        };
        Ok(Some(LeaseRecord {
            lease_id: id.clone(),
            connection_id,
            caller: row.try_get("actor")?,
            expires_at,
            revoked_at,
            revoke_reason,
        }))
    }

    async fn lease_release(&self, id: &LeaseId, at: Timestamp) -> StoreResult<Option<Timestamp>> {
        let Some(lease) = self.lease_get(id).await? else {
            return Ok(None);
        };
        if let Some(ended) = lease.revoked_at {
            return Ok(Some(ended.min(lease.expires_at)));
        }
        if lease.expires_at <= at {
            return Ok(Some(lease.expires_at));
        }
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO lease_releases (seq, released_at) \
             SELECT seq, $1 FROM leases WHERE lease_id = {} ON CONFLICT (seq) DO NOTHING",
            uuid_param(2)
        )))
        .bind(at.as_micros())
        .bind(id.key().as_slice())
        .execute(&mut *tx)
        .await?;
        let released: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT r.released_at FROM lease_releases r JOIN leases l ON l.seq = r.seq \
             WHERE l.lease_id = {}",
            uuid_param(1)
        )))
        .bind(id.key().as_slice())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(released.map_or(at, ts)))
    }

    async fn lease_open_count(
        &self,
        at: Timestamp,
        granted_after: Timestamp,
        connection: Option<&ConnectionId>,
    ) -> StoreResult<i64> {
        let after = LeaseId::key_minted_before(granted_after);
        let mut sql = format!(
            "SELECT COUNT(*) FROM leases l WHERE l.lease_id >= {} AND l.expires_at > $2 \
             AND {}",
            uuid_param(1),
            lease_not_ended(2)
        );
        if connection.is_some() {
            sql.push_str(&format!(" AND l.connection_id = {}", uuid_param(3)));
        }
        let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(after.as_slice())
            .bind(at.as_micros());
        if let Some(c) = connection {
            q = q.bind(c.key().to_vec());
        }
        Ok(q.fetch_one(&self.pool).await?)
    }
}
}
