//! Deletion of connections and its receipts, and retention of what a
//! deletion leaves behind.
//!
//! Invariants: one transaction destroys the connection's wrapped DEK and
//! sealed tokens, marks it deleted, revokes its open leases, queues its
//! upstream revocation, writes the receipt, the events and the
//! `deletion.done` audit entry; if any of them cannot be written, none is.
//! After it commits, SQLite's WAL is checkpointed and truncated so no page
//! image of the destroyed bytes stays on disk.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, DeletionReason, EventKind, Integration, ReceiptId,
    TenantId, Timestamp, UpstreamState, VaultError,
};
use crate::store::{
    AuditDraft, AuditSealer, DeletedConnection, DeletionOutcome, DeletionRequest, DeletionTarget,
    NewEvent, PageRequest, ReceiptConnection, ReceiptFilter, ReceiptRecord, StoreResult,
};

/// Deletion and its receipts.
#[async_trait]
pub trait DeletionStore: Send + Sync {
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
}

for_each_backend! {
#[async_trait]
impl DeletionStore for StoreImpl {
    async fn connection_delete(
        &self,
        req: &DeletionRequest,
        sealer: AuditSealer<'_>,
    ) -> StoreResult<DeletionOutcome> {
        let (_guard, mut tx) = self.begin_write().await?;
        // The deletion's `deletion.done` entry is appended in this
        // transaction, to the chain this process's audit writer appends to;
        // the chain head is taken first, in the audit writer's lock order
        // (head, then connection rows).
        let chain = self.writer_chain.load(std::sync::atomic::Ordering::Relaxed);
        let head = read_audit_head(&mut *tx, LOCK_AUDIT_HEAD, chain).await?;
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
        let (to, _, _) =
            append_locked(
                &mut tx,
                chain,
                head.clone(),
                std::slice::from_ref(&done),
                &[],
                &Default::default(),
                sealer,
            )
            .await?;
        tx.commit().await?;
        // When the writer's cached head was the one this entry extends, it
        // is this entry now: the writer's next batch goes on without a
        // conflict.
        if let Ok(mut cached) = self.head_cache.lock()
            && cached.as_ref() == Some(&head)
        {
            *cached = Some(to);
        }
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
        // A lease of a pruned connection reads as ended at its expiry, long
        // past by then (see `leases.rs`).
        n += sqlx::query(
            "DELETE FROM connections WHERE status IN ('deleted', 'revoked_upstream') AND deleted_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM receipt_connections rc WHERE rc.connection_id = connections.connection_id)",
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
}
