//! The proactive refresh sweeper: keeps Google grants in use and finds
//! revoked ones before a worker does.
//!
//! Google drops refresh tokens unused for six months (seven days after issue
//! for apps in publishing status "Testing"), and a user can remove the app in
//! their Google account at any time. Every ACTIVE connection carries a
//! `next_check_at`, set `refresh.refresh_after_hours` after each successful
//! refresh (by a lease or by the sweeper). A pass claims the connections that
//! are due by moving their `next_check_at` past the pass — one replica gets
//! each, others skip it — and refreshes them one at a time, at most
//! `refresh.max_calls_per_second` calls to Google per replica.
//!
//! The refresh itself is the lease path's: the same per-connection gate and
//! database lock (single-flight with leases on every replica), the same
//! fencing. A refresh that finds the grant revoked (`invalid_grant`) makes
//! the connection REVOKED_UPSTREAM with its events and receipt; any other
//! failure is recorded as the connection's last refresh error and tried
//! again `refresh.retry_after_seconds` later.

use std::time::{Duration, Instant};

use crate::domain::{ConnectionStatus, Timestamp, VaultError};

use super::Vault;

/// A refresh the sweeper forces asks for a token valid this long, which no
/// stored token is: the call goes to Google unless another caller refreshed
/// the connection after the sweep reached it.
const FORCE: Duration = Duration::from_secs(7 * 86_400);

/// The most connections one pass claims.
const MAX_BATCH: u64 = 500;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Connections claimed.
    pub claimed: usize,
    /// Refreshed (by this pass or by a concurrent lease).
    pub refreshed: usize,
    /// Found revoked at Google: now REVOKED_UPSTREAM.
    pub revoked: usize,
    /// Failed; recorded and retried later.
    pub failed: usize,
}

impl Vault {
    /// When a connection refreshed at `at` is next due.
    pub(super) fn next_refresh_check(&self, at: Timestamp) -> Timestamp {
        at.plus(Duration::from_secs(
            self.settings.refresh.refresh_after_hours * 3_600,
        ))
    }

    /// One pass of the sweeper (see the module documentation).
    #[tracing::instrument(name = "refresh_sweep", level = "debug", skip_all)]
    pub async fn refresh_sweep_pass(&self) -> Result<SweepReport, VaultError> {
        let cfg = &self.settings.refresh;
        let rate = u64::from(cfg.max_calls_per_second.max(1));
        let batch = (rate * cfg.check_interval_seconds).clamp(1, MAX_BATCH);
        let per_call = Duration::from_millis(self.settings.google.request_timeout_ms);
        let gap = Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX);
        let now = Timestamp::now();
        // Long enough to work the whole batch at the rate limit, each call
        // taking its full timeout; after that another replica may take over.
        let claim_until = now.plus(
            gap.saturating_mul(u32::try_from(batch).unwrap_or(u32::MAX))
                + per_call
                    .saturating_mul(u32::try_from(batch).unwrap_or(u32::MAX))
                    .min(Duration::from_secs(600))
                + Duration::from_secs(cfg.check_interval_seconds),
        );
        let ids = self
            .store()
            .refresh_claim_due(now, claim_until, i64::try_from(batch).unwrap_or(i64::MAX))
            .await?;
        let mut report = SweepReport {
            claimed: ids.len(),
            ..SweepReport::default()
        };
        let mut next_call = Instant::now();
        for id in ids {
            let Some(conn) = self.store().connection_get(&id).await? else {
                continue;
            };
            if conn.status != ConnectionStatus::Active {
                continue;
            }
            // Pace the calls to Google.
            tokio::time::sleep_until(next_call.into()).await;
            next_call = Instant::now() + gap;
            let deadline = Instant::now() + per_call + Duration::from_secs(1);
            let outcome = match self
                .fresh_access_token(&conn, Timestamp::now().plus(FORCE), deadline, 1)
                .await
            {
                Ok(_) => {
                    report.refreshed += 1;
                    "refreshed"
                }
                Err(e) => {
                    let now = self.store().connection_get(&id).await?;
                    if now.is_some_and(|c| c.status == ConnectionStatus::RevokedUpstream) {
                        report.revoked += 1;
                        "revoked"
                    } else {
                        tracing::warn!(connection = %id, error = %e, "proactive refresh failed; retrying later");
                        report.failed += 1;
                        "failed"
                    }
                }
            };
            metrics::counter!("tokenvault_refresh_sweeps_total", "outcome" => outcome).increment(1);
        }
        let due = self.store().refresh_due_count(Timestamp::now()).await?;
        metrics::gauge!("tokenvault_refresh_due_connections").set(due as f64);
        if report.claimed > 0 {
            tracing::info!(
                claimed = report.claimed,
                refreshed = report.refreshed,
                revoked = report.revoked,
                failed = report.failed,
                "refresh sweep"
            );
        }
        Ok(report)
    }
}
