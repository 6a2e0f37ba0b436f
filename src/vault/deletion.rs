//! Deletion, immediately and everywhere: `Disconnect`, `DeleteAccount`, the
//! same cascade when the user revoked access at Google, and the revocation
//! outbox.
//!
//! In the one transaction that answers the call the store destroys the
//! connections' sealed tokens and DEKs, leaves tombstones (REVOKED_UPSTREAM
//! when the user revoked at Google, else DELETED), revokes open leases,
//! writes the events, the receipt and the `deletion.done` audit entry and —
//! when no other live connection uses the same Google grant — queues the
//! grant's revocation, once per grant however many of its connections go,
//! with a copy of the token sealed under a DEK of its own. After commit the
//! vault tries Google's revoke inline (short timeout); whatever Google does
//! not confirm, the outbox worker retries with backoff until it does, or
//! until the give-up limit, then destroys the copy either way.

use std::time::Duration;

use crate::audit::{Actor, AuditLog, Outcome};
use crate::crypto::{SecretString, TokenKind};
use crate::domain::{
    DeletionReason, Integration, ReceiptId, TenantId, Timestamp, UpstreamState, VaultError,
};
use crate::google::GoogleError;
use crate::store::{
    AuditDraft, ConnectionFilter, ConnectionRecord, DeletionOutcome, DeletionRequest,
    DeletionTarget, OutboxRow, OutboxToken, PageRequest, ReceiptRecord,
};

use super::Vault;
use super::keys::KeyContext;

/// How often the outbox worker looks for due revocations.
pub(super) const OUTBOX_POLL: Duration = Duration::from_secs(1);

/// A finished deletion.
#[derive(Debug)]
pub struct Deletion {
    /// The receipt (as it stands after the inline revocation attempt).
    pub receipt: ReceiptRecord,
    /// Whether this call deleted anything (false: a repeated call).
    pub deleted_now: bool,
}

impl Vault {
    /// Deletes a connection, or every live connection of an account, and
    /// returns the receipt. Repeating the call returns the same receipt.
    #[tracing::instrument(
        name = "delete",
        skip_all,
        fields(target = %target.subject_key(), reason = %reason)
    )]
    pub async fn delete(
        &self,
        actor: &Actor,
        target: DeletionTarget,
        reason: DeletionReason,
        detail: &str,
    ) -> Result<Deletion, VaultError> {
        let subject = target.subject_key();
        // Fail closed: no audit entry, no deletion.
        self.audit()
            .record(
                actor,
                "deletion.request",
                &subject,
                Outcome::Ok,
                format!("reason={reason} detail={detail:?}"),
            )
            .await?;
        let revoke_upstream = reason != DeletionReason::UserRevokedAtGoogle;
        let mut outcome = DeletionOutcome::Retry;
        let mut receipt_id = ReceiptId::generate();
        for _ in 0..3 {
            let victims = self.deletion_victims(&target).await?;
            let mut outbox = Vec::new();
            if revoke_upstream {
                // One copy per Google grant (the store revokes each grant
                // once): a refresh token if any of the grant's connections
                // holds one — an access token may have expired, and revoking
                // an expired one would leave the grant alive.
                let mut sealed: Vec<&str> = Vec::new();
                for refresh_only in [true, false] {
                    for conn in &victims {
                        let subject = conn.google_subject.as_deref();
                        if subject.is_some_and(|s| sealed.contains(&s)) {
                            continue;
                        }
                        if let Some(t) = self.outbox_seal(conn, &receipt_id, refresh_only).await? {
                            outbox.push(t);
                            sealed.extend(subject);
                        }
                    }
                }
            }
            let now = Timestamp::now();
            let req = DeletionRequest {
                receipt_id: receipt_id.clone(),
                target: target.clone(),
                reason,
                detail: detail.to_owned(),
                requested_by: actor.identity.clone(),
                at: now,
                required_consumers: self.required_consumers(),
                outbox,
                revoke_upstream,
                retry_at: now.plus(
                    Duration::from_millis(self.settings.deletion.inline_revoke_timeout_ms)
                        + Duration::from_secs(5),
                ),
                give_up_at: now.plus(Duration::from_secs(
                    self.settings.deletion.revoke_give_up_days * 86_400,
                )),
                done: AuditLog::draft(actor, "deletion.done", &subject, Outcome::Ok, String::new()),
            };
            let sealer = self.audit().sealer();
            let seal = |seq: i64, prev: &[u8], d: &AuditDraft| sealer.seal(seq, prev, d);
            outcome = match self.store().connection_delete(&req, &seal).await {
                // A rotation made another version primary while the outbox copies were
                // sealed: seal them again.
                Err(VaultError::KeyVersionChanged(_)) => DeletionOutcome::Retry,
                other => other?,
            };
            if outcome != DeletionOutcome::Retry {
                break;
            }
            receipt_id = ReceiptId::generate();
        }
        let (receipt_id, deleted_now) = match outcome {
            DeletionOutcome::Deleted {
                receipt_id,
                connections,
            } => {
                for c in &connections {
                    self.reader.forget(&c.connection_id);
                    self.keys().forget_connection(&c.connection_id);
                }
                metrics::counter!("tokenvault_deletions_total", "reason" => reason.as_str())
                    .increment(1);
                tracing::info!(%receipt_id, target = %subject, connections = connections.len(), %reason, "deleted; tokens destroyed");
                self.refresh_event_head().await;
                if connections
                    .iter()
                    .any(|c| c.upstream == UpstreamState::Pending)
                {
                    self.revoke_inline(&receipt_id).await;
                }
                (receipt_id, true)
            }
            DeletionOutcome::Existing(r) => (r, false),
            DeletionOutcome::NotFound => {
                return Err(VaultError::not_found("connection", subject));
            }
            DeletionOutcome::Retry => {
                return Err(VaultError::Unavailable(
                    "connections kept changing during the deletion; retry".into(),
                ));
            }
        };
        let receipt = self.receipt_get(&receipt_id).await?;
        Ok(Deletion {
            receipt,
            deleted_now,
        })
    }

    /// One receipt.
    pub async fn receipt_get(&self, id: &ReceiptId) -> Result<ReceiptRecord, VaultError> {
        self.store()
            .receipt_get(id)
            .await?
            .ok_or_else(|| VaultError::not_found("receipt", id))
    }

    /// One page of receipts matching `filter`, ordered by id.
    pub async fn receipt_list(
        &self,
        filter: &crate::store::ReceiptFilter,
        page: &crate::store::PageRequest,
    ) -> Result<Vec<ReceiptRecord>, VaultError> {
        self.store().receipt_list(filter, page).await
    }

    /// Whether a receipt is past its SLA and still incomplete.
    pub fn receipt_overdue(&self, r: &ReceiptRecord) -> bool {
        r.completed_at.is_none() && r.requested_at < self.receipt_sla_cutoff()
    }

    /// Receipts requested before this and still incomplete are overdue.
    pub fn receipt_sla_cutoff(&self) -> Timestamp {
        let sla = i64::try_from(self.settings.deletion.receipt_sla_hours)
            .unwrap_or(i64::MAX / 3_600_000_000)
            .saturating_mul(3_600_000_000);
        Timestamp::from_micros(Timestamp::now().as_micros().saturating_sub(sla))
    }

    pub(super) fn required_consumers(&self) -> Vec<(Integration, String)> {
        let mut out = Vec::new();
        for (integration, consumers) in &self.settings.deletion.required_consumers {
            if let Ok(i) = Integration::parse(integration) {
                out.extend(consumers.iter().map(|c| (i, c.clone())));
            }
        }
        out
    }

    /// The live connections a deletion would remove (read without locks; the
    /// store re-reads them under lock).
    async fn deletion_victims(
        &self,
        target: &DeletionTarget,
    ) -> Result<Vec<ConnectionRecord>, VaultError> {
        let all = match target {
            DeletionTarget::Connection(id) => {
                self.store().connection_get(id).await?.into_iter().collect()
            }
            DeletionTarget::Account(t, a) => {
                let filter = ConnectionFilter {
                    tenant: Some(t.clone()),
                    account: Some(a.clone()),
                    ..Default::default()
                };
                let mut out = Vec::new();
                let mut after = None;
                loop {
                    let page = self
                        .store()
                        .connection_list(
                            &filter,
                            &PageRequest {
                                after: after.clone(),
                                limit: 500,
                            },
                        )
                        .await?;
                    let done = page.len() < 500;
                    after = page.last().map(|c| c.id.to_string());
                    out.extend(page);
                    if done {
                        break;
                    }
                }
                out
            }
        };
        Ok(all
            .into_iter()
            .filter(|c| !c.status.is_tombstone())
            .collect())
    }

    /// Seals a connection's refresh token (else, unless `refresh_only`, its
    /// access token) under a new DEK for the outbox; `None` when it holds
    /// neither.
    async fn outbox_seal(
        &self,
        conn: &ConnectionRecord,
        receipt: &ReceiptId,
        refresh_only: bool,
    ) -> Result<Option<OutboxToken>, VaultError> {
        let Some(secrets) = self.store().secrets_get(&conn.id).await? else {
            return Ok(None);
        };
        let token = match (&secrets.refresh_token, &secrets.access_token) {
            (Some(r), _) => {
                self.token_open(conn, &secrets, TokenKind::Refresh, r)
                    .await?
            }
            (None, _) if refresh_only => return Ok(None),
            (None, Some(a)) => {
                self.token_open(conn, &secrets, TokenKind::Access, a)
                    .await?
            }
            (None, None) => return Ok(None),
        };
        // The outbox copy's key and token are bound to the receipt and connection.
        let owner = KeyContext::outbox(receipt, &conn.tenant, &conn.id);
        let cipher = self.keys().new_cipher(owner).await?;
        let sealed = cipher.seal(TokenKind::OutboxRefresh, token.expose().as_bytes())?;
        let wrapped = cipher.wrapped();
        Ok(Some(OutboxToken {
            connection_id: conn.id.clone(),
            kek_version: wrapped.kek_version,
            wrapped_dek: wrapped.bytes.clone(),
            sealed_token: sealed,
        }))
    }

    async fn outbox_open(
        &self,
        row: &OutboxRow,
        tenant: &TenantId,
    ) -> Result<SecretString, VaultError> {
        let owner = KeyContext::outbox(&row.receipt_id, tenant, &row.token.connection_id);
        let wrapped = crate::crypto::WrappedDek {
            kek_version: row.token.kek_version,
            bytes: row.token.wrapped_dek.clone(),
        };
        self.keys()
            .open_cipher(owner, wrapped)
            .await?
            .open(TokenKind::OutboxRefresh, &row.token.sealed_token)
    }

    /// Tries the receipt's pending revocations once, inline.
    async fn revoke_inline(&self, receipt: &ReceiptId) {
        let timeout = Duration::from_millis(self.settings.deletion.inline_revoke_timeout_ms);
        let far = Timestamp::now().plus(Duration::from_secs(366 * 86_400));
        let rows = match self.store().outbox_due(far, Some(receipt), 64).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, %receipt, "cannot read the revocation outbox");
                return;
            }
        };
        for row in rows {
            self.revoke_one(&row, Some(timeout)).await;
        }
    }

    /// One revocation attempt: settles the row on confirmation (or past the
    /// give-up time), else schedules the next attempt with backoff.
    async fn revoke_one(&self, row: &OutboxRow, timeout: Option<Duration>) {
        let now = Timestamp::now();
        let store = self.store();
        let receipt = match store.receipt_get(&row.receipt_id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a receipt for the outbox");
                return;
            }
        };
        if now >= row.give_up_at {
            self.settle(
                row,
                UpstreamState::Failed,
                Some("not confirmed before the give-up limit; retained token destroyed"),
            )
            .await;
            return;
        }
        let attempt = async {
            let google = self.google()?;
            let token = self.outbox_open(row, &receipt.tenant).await?;
            let call = google.revoke(token.expose());
            let result = match timeout {
                Some(t) => tokio::time::timeout(t, call)
                    .await
                    .unwrap_or_else(|_| Err(GoogleError::Unavailable("timed out".into()))),
                None => call.await,
            };
            Ok::<_, VaultError>(result)
        };
        let error = match attempt.await {
            Ok(Ok(())) => None,
            // The token is already invalid at Google: the grant is gone.
            Ok(Err(GoogleError::InvalidGrant)) => None,
            Ok(Err(GoogleError::Rejected(code))) if code == "invalid_token" => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        metrics::counter!("tokenvault_google_revocations_total", "outcome" => if error.is_none() { "confirmed" } else { "failed" })
            .increment(1);
        match error {
            None => self.settle(row, UpstreamState::Confirmed, None).await,
            Some(err) => {
                let backoff = self.outbox_backoff(row.attempts);
                let next = now.plus(backoff).min(row.give_up_at);
                tracing::warn!(receipt = %row.receipt_id, connection = %row.token.connection_id, attempts = row.attempts + 1, error = %err, retry_in = ?backoff, "Google did not confirm the revocation; will retry");
                if let Err(e) = store
                    .outbox_retry(&row.receipt_id, &row.token.connection_id, now, next, &err)
                    .await
                {
                    tracing::error!(error = %e, "cannot record a revocation attempt");
                }
            }
        }
    }

    fn outbox_backoff(&self, attempts: i64) -> Duration {
        let initial = Duration::from_millis(self.settings.deletion.outbox_initial_backoff_ms);
        let max = Duration::from_secs(self.settings.deletion.outbox_max_backoff_seconds);
        let exp = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
        let base = initial.saturating_mul(2u32.saturating_pow(exp)).min(max);
        base + super::lease::jitter(base / 4)
    }

    async fn settle(&self, row: &OutboxRow, state: UpstreamState, error: Option<&str>) {
        let audit = self
            .audit()
            .record(
                &Actor::system(),
                "google.revoke",
                row.token.connection_id.as_str(),
                if state == UpstreamState::Confirmed {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                },
                format!("receipt={} state={state}", row.receipt_id),
            )
            .await;
        if let Err(e) = audit {
            // Settling destroys the retained token; without an audit entry, wait.
            tracing::error!(error = %e, "cannot audit a revocation; the outbox retries later");
            return;
        }
        match self
            .store()
            .outbox_settle(
                &row.receipt_id,
                &row.token.connection_id,
                state,
                Timestamp::now(),
                error,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(receipt = %row.receipt_id, connection = %row.token.connection_id, %state, "revocation settled; retained token destroyed");
            }
            Err(e) => tracing::error!(error = %e, "cannot settle a revocation"),
        }
    }

    /// One pass of the outbox worker.
    pub async fn outbox_pass(&self) -> Result<usize, VaultError> {
        let rows = self.store().outbox_due(Timestamp::now(), None, 32).await?;
        let timeout = Duration::from_millis(self.settings.google.request_timeout_ms);
        for row in &rows {
            self.revoke_one(row, Some(timeout)).await;
        }
        let (depth, oldest) = self.store().outbox_depth().await?;
        metrics::gauge!("tokenvault_outbox_depth").set(depth as f64);
        metrics::gauge!("tokenvault_outbox_oldest_seconds")
            .set(oldest.map_or(0.0, |o| Timestamp::now().since(o).as_secs_f64()));
        Ok(rows.len())
    }
}
