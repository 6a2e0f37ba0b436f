//! Following the audit log (`AdminService.FollowAudit`, `tokenvault admin
//! audit tail --follow`): one task per follower reads the entries appended
//! after the last one it sent, at a modest interval, and sends them in seq
//! order.
//!
//! The follow is audited once, by the transport, when it opens; the reads
//! here are not audited. A follower that polled with `QueryAudit` instead
//! wrote one entry per poll (86,400 a day at one a second), each of which it
//! then read back; a follower now adds one entry however long it runs.
//!
//! Entries committed on other replicas reach the follower through the same
//! reads (the database is the only source), so there is no in-process
//! notification to miss; the cost is one indexed read of the head of the log
//! per follower every [`AUDIT_FOLLOW_POLL`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Vault;
use crate::domain::VaultError;
use crate::store::{AuditFilter, AuditRow};

/// How often a follower that has caught up reads the log for new entries.
pub const AUDIT_FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Entries read, and sent, per batch (the largest page `QueryAudit` serves).
const PAGE: i64 = crate::limits::MAX_PAGE_SIZE as i64;

/// Where a follow starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowFrom {
    /// After this seq (resuming): every entry with a greater seq.
    After(i64),
    /// With the newest this many entries (0: only what is appended from now).
    Newest(u32),
}

/// One batch sent to a follower.
#[derive(Debug)]
pub struct AuditBatch {
    /// Entries in seq order, each sent once.
    pub rows: Vec<AuditRow>,
    /// Whether this batch completes the backlog (the entries up to the newest
    /// when the follow opened); true on every batch after that one too.
    pub caught_up: bool,
}

impl Vault {
    /// Starts following the audit log from `from`: the backlog first, then
    /// every entry appended after it, until the receiver is dropped or the
    /// vault shuts down (the stream then ends with UNAVAILABLE). A batch that
    /// completes the backlog is sent even when it is empty, so that the
    /// follower knows where the past ends.
    pub async fn audit_follow(
        self: &Arc<Self>,
        from: FollowFrom,
    ) -> Result<mpsc::Receiver<Result<AuditBatch, VaultError>>, VaultError> {
        let (head, _) = self.store().audit_head().await?;
        let after = match from {
            FollowFrom::After(seq) if seq > head => {
                return Err(VaultError::OutOfRange(
                    format!("after_seq {seq} is past the newest entry ({head})").into(),
                ));
            }
            FollowFrom::After(seq) => seq.max(0),
            FollowFrom::Newest(n) => head.saturating_sub(i64::from(n)).max(0),
        };
        // A few batches in flight at most: a slow reader slows its own reads.
        let (tx, rx) = mpsc::channel(4);
        let vault = self.clone();
        tokio::spawn(async move { vault.stream_audit(after, head, tx).await });
        Ok(rx)
    }

    async fn stream_audit(
        &self,
        mut position: i64,
        backlog_to: i64,
        tx: mpsc::Sender<Result<AuditBatch, VaultError>>,
    ) {
        let mut stopping = self.stopping.subscribe();
        let mut caught_up = false;
        loop {
            let filter = AuditFilter {
                after_seq: Some(position),
                ascending: true,
                ..AuditFilter::default()
            };
            let rows = match self.audit_query(&filter, PAGE).await {
                Ok((rows, _)) => rows,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let full = i64::try_from(rows.len()).is_ok_and(|n| n >= PAGE);
            if let Some(last) = rows.last() {
                position = position.max(last.seq);
            }
            // A page that is not full holds everything there is.
            let reached = position >= backlog_to || !full;
            if !rows.is_empty() || (reached && !caught_up) {
                caught_up = caught_up || reached;
                let batch = AuditBatch { rows, caught_up };
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(AUDIT_FOLLOW_POLL) => {}
                () = super::stopped(&mut stopping) => {
                    let _ = tx
                        .send(Err(VaultError::Unavailable(
                            "the server is shutting down; follow again with after_seq set to the \
                             last entry received"
                                .into(),
                        )
                        .because(crate::domain::ErrorReason::ShuttingDown)))
                        .await;
                    return;
                }
                () = tx.closed() => return,
            }
        }
    }
}
