//! The revocation outbox: refresh tokens a deletion took out of the
//! connection, sealed, until Google confirms their revocation.
//!
//! Invariants: a due row is claimed for a minute when it is read, so
//! workers on other replicas skip it while it is being revoked; settling a
//! row records the outcome on its receipt, destroys the retained token and
//! completes the receipt if nothing else is outstanding, in one
//! transaction.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{ConnectionId, ReceiptId, Timestamp, UpstreamState};
use crate::store::{OutboxRow, OutboxToken, StoreResult};

/// The revocation outbox.
#[async_trait]
pub trait OutboxStore: Send + Sync {
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

for_each_backend! {
#[async_trait]
impl OutboxStore for StoreImpl {
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
}
}
