//! Google RISC (Cross-Account Protection) events: suspending and resuming
//! every connection of a Google subject, and the token ids already seen.
//!
//! Invariants: a suspension revokes the subject's open leases in the same
//! transaction; a token id (`jti`) is accepted once.

use async_trait::async_trait;

use crate::domain::{ConnectionId, EventKind, Timestamp};
use crate::store::StoreResult;

/// RISC events: suspension by subject and replay protection.
#[async_trait]
pub trait RiscStore: Send + Sync {
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
}

for_each_backend! {
#[async_trait]
impl RiscStore for StoreImpl {
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
}
}
