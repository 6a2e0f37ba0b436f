//! Refreshing access tokens: the per-connection refresh lock (single flight
//! across replicas, fenced), the sweeper's claims of due connections, and
//! the write of refreshed tokens.
//!
//! Invariants: refreshed tokens are stored only by the holder of the
//! current fence, and only while the connection is still ACTIVE; a claim
//! passes over rows another replica holds (`SKIP LOCKED` on PostgreSQL).

use async_trait::async_trait;

use crate::domain::{ConnectionId, ConnectionStatus, Timestamp};
use crate::store::{RefreshedTokens, StoreResult};

/// Refresh single-flight, the sweeper's claims and refreshed tokens.
#[async_trait]
pub trait RefreshStore: Send + Sync {
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
}

for_each_backend! {
sqlite {
    const LOCK_REFRESH: &str = "SELECT fence FROM refresh_locks \
         WHERE connection_id = $1 AND holder = $2 AND fence = $3";
    /// One writer at a time: nothing to skip.
    const SKIP_LOCKED: &str = "";
}
postgres {
    const LOCK_REFRESH: &str = "SELECT fence FROM refresh_locks \
         WHERE connection_id = $1 AND holder = $2 AND fence = $3 FOR UPDATE";
    /// Rows another transaction holds are passed over (the sweeper's claim).
    const SKIP_LOCKED: &str = " FOR UPDATE SKIP LOCKED";
}
#[async_trait]
impl RefreshStore for StoreImpl {
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
}
}
