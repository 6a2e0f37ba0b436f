//! Key rotation runs and the rewrap of every wrapped key (connection DEKs,
//! pending OAuth states, retained outbox tokens) onto the primary version.
//!
//! Invariants: at most one run is running; a run has one owner at a time,
//! taken over by compare-and-swap on its owner token, so a paused owner
//! that resumes rewraps nothing twice; a rewrap replaces a key only if it is
//! still wrapped by the version the caller read (otherwise it is skipped and
//! rescanned).

use async_trait::async_trait;
use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{AccountId, ConnectionId, ReceiptId, TenantId, Timestamp, VaultError};
use crate::store::{
    Rewrap, RotationRun, StoreResult, WrappedKeyKind, WrappedKeyOwner, WrappedKeyRow,
};

/// Key rotation runs and the rewrap of wrapped keys.
#[async_trait]
pub trait RotationStore: Send + Sync {
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
}

for_each_backend! {
pub(in crate::store) fn rotation_from_row(row: &Row) -> StoreResult<RotationRun> {
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

#[async_trait]
impl RotationStore for StoreImpl {
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
}
}
