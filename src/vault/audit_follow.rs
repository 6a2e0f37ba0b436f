//! Following the audit log (`AdminService.FollowAudit`, `tokenvault admin
//! audit tail --follow`): one task per follower reads, chain by chain, the
//! entries appended after the last one it sent of that chain, at a modest
//! interval, and sends them in seq order.
//!
//! The follow is audited once, by the transport, when it opens; the reads
//! here are not audited. A follower that polled with `QueryAudit` instead
//! wrote one entry per poll (86,400 a day at one a second), each of which it
//! then read back; a follower now adds one entry however long it runs.
//!
//! Entries committed on other replicas reach the follower through the same
//! reads (the database is the only source), so there is no in-process
//! notification to miss; the cost, per follower every [`AUDIT_FOLLOW_POLL`],
//! is one read of the chains' heads and one indexed read of each chain's
//! newest entries (with the archive on, also of each chain's last segment).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Vault;
use crate::domain::VaultError;
use crate::store::audit::{chain_of, chain_range};
use crate::store::{AuditFilter, AuditRow};

/// How often a follower that has caught up reads the log for new entries.
pub const AUDIT_FOLLOW_POLL: Duration = Duration::from_millis(500);

/// Entries read, and sent, per batch (the largest page `QueryAudit` serves).
const PAGE: i64 = crate::limits::MAX_PAGE_SIZE as i64;

/// Where a follow starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowFrom {
    /// Resuming: after each of these entries in its chain (see
    /// `store::audit`), and from the first entry of every chain none of
    /// them is in. Of two in one chain, the later counts.
    After(Vec<i64>),
    /// With the newest this many entries of each chain (0: only what is
    /// appended from now).
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
    /// follower knows where the past ends. Each chain is followed on its own,
    /// so an entry committed on one chain after a later-numbered one on
    /// another is never skipped.
    pub async fn audit_follow(
        self: &Arc<Self>,
        from: FollowFrom,
    ) -> Result<mpsc::Receiver<Result<AuditBatch, VaultError>>, VaultError> {
        let heads = self.store().audit_heads().await?;
        let mut positions: BTreeMap<i64, i64> = BTreeMap::new();
        match &from {
            FollowFrom::After(seqs) => {
                for &seq in seqs {
                    let chain = chain_of(seq.max(0));
                    let head = heads.iter().find(|h| h.chain == chain);
                    match head {
                        Some(h) if seq <= h.seq => {
                            let p = positions.entry(chain).or_insert(seq);
                            *p = (*p).max(seq);
                        }
                        _ => {
                            let newest = head.map_or(0, |h| h.seq);
                            return Err(VaultError::OutOfRange(
                                format!(
                                    "after_seq {seq} is past the newest entry of its chain \
                                     ({newest})"
                                )
                                .into(),
                            ));
                        }
                    }
                }
            }
            FollowFrom::Newest(n) => {
                for h in &heads {
                    let start = chain_range(h.chain).start() - 1;
                    positions.insert(h.chain, h.seq.saturating_sub(i64::from(*n)).max(start));
                }
            }
        }
        let backlog_to: BTreeMap<i64, i64> = heads.iter().map(|h| (h.chain, h.seq)).collect();
        // A few batches in flight at most: a slow reader slows its own reads.
        let (tx, rx) = mpsc::channel(4);
        let vault = self.clone();
        tokio::spawn(async move { vault.stream_audit(positions, backlog_to, tx).await });
        Ok(rx)
    }

    async fn stream_audit(
        &self,
        mut positions: BTreeMap<i64, i64>,
        backlog_to: BTreeMap<i64, i64>,
        tx: mpsc::Sender<Result<AuditBatch, VaultError>>,
    ) {
        let mut stopping = self.stopping.subscribe();
        let mut caught_up = false;
        loop {
            let mut rows = Vec::new();
            let mut full = false;
            let mut reached = true;
            let chains = match self.store().audit_heads().await {
                Ok(heads) => heads.into_iter().map(|h| h.chain),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for chain in chains {
                let range = chain_range(chain);
                let position = *positions.entry(chain).or_insert(range.start() - 1);
                // At most `PAGE` entries per message, whatever the chains.
                let room = PAGE - i64::try_from(rows.len()).unwrap_or(PAGE);
                if room <= 0 {
                    full = true;
                    reached &= backlog_to.get(&chain).is_none_or(|to| position >= *to);
                    continue;
                }
                let filter = AuditFilter {
                    after_seq: Some(position),
                    before_seq: Some(range.end().saturating_add(1)),
                    ascending: true,
                    ..AuditFilter::default()
                };
                let page = match self.audit_query_chain(&filter, chain, room).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let page_full = i64::try_from(page.len()).is_ok_and(|n| n >= room);
                let at = page.last().map_or(position, |last| last.seq.max(position));
                positions.insert(chain, at);
                // A page that is not full holds everything there is.
                reached &= !page_full || backlog_to.get(&chain).is_none_or(|to| at >= *to);
                full |= page_full;
                rows.extend(page);
            }
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
                            "the server is shutting down; follow again with after_seqs set to \
                             the last entry received of each chain"
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
