//! The event log sync services watch (`Watch`), and each consumer's
//! acknowledged position.
//!
//! Invariants: cursors are committed in cursor order (PostgreSQL takes an
//! advisory lock before appending; SQLite has one writer), so a reader of
//! "after N" never skips an event committed later with a smaller cursor; a
//! consumer's position only moves forward.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{
    AccountId, ConnectionId, DeletionReason, EventKind, Integration, LeaseId, ReceiptId, TenantId,
    Timestamp, VaultError,
};
use crate::store::{EventLogState, EventRecord, NewEvent, StoreResult};

/// The event log and its consumers' positions.
#[async_trait]
pub trait EventStore: Send + Sync {
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
}

for_each_backend! {
pub(in crate::store) fn event_from_row(row: &Row) -> StoreResult<EventRecord> {
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

#[async_trait]
impl EventStore for StoreImpl {
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
}
}
