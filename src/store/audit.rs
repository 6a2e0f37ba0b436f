//! The hash-chained audit log: entries, signed checkpoints and the chain
//! head.
//!
//! Invariants: an entry's sequence number is the head's plus one and its
//! hash covers the head's hash; a batch is written only if the head is
//! still the one it was sealed onto (compare-and-swap), otherwise it is
//! sealed again under the lock; the store computes no hash or MAC itself
//! (the caller's `AuditSealer` does), so it never holds the audit key.
//! Each backend's append statement lives with its dialect (`sqlite.rs`,
//! `postgres.rs`).
//!
//! An entry's previous hash is not stored (migration 0011): it is the hash
//! of the entry before, so every read computes it from that entry, from the
//! last archived segment when that entry was pruned, or as the genesis hash
//! for the first entry of a chain ([`AUDIT_ROWS`]). An entry with none of
//! these reads back with an empty previous hash, which no verification
//! accepts.
//!
//! The log is one or more chains (migration 0012). A sequence number carries
//! its chain in the bits above [`CHAIN_BITS`] and the entry's position in
//! that chain below them: chain 0 holds 1, 2, 3…, chain 1 holds 2⁴⁰ + 1,
//! 2⁴⁰ + 2…, so an entry's predecessor is always `seq - 1` (position 1 has
//! none) and every table keyed by `seq` keeps its one-column key. Each chain
//! has its own head row (`audit_head.id` = chain + 1) and its own archive
//! segments. A SQLite store has chain 0 only; on PostgreSQL each vault
//! process's audit writer claims a chain of its own (see `postgres.rs`), so
//! replicas never move each other's head; a deletion transaction's own
//! entry goes to the chain of the process that runs it.

use async_trait::async_trait;
use sqlx::FromRow as _;

use crate::store::common::ChainHead;

use crate::store::{
    AuditCheckpoint, AuditDraft, AuditFilter, AuditHead, AuditRow, AuditSealer, AuditSegment,
    LeaseGrant, StoreResult,
};

/// The action of a lease grant's entry, the bulk of the log; the index by
/// action leaves these entries out (migration 0010).
pub const LEASE_GRANT: &str = "lease.grant";

/// How many low bits of a sequence number are the position within its chain.
pub const CHAIN_BITS: u32 = 40;

/// The most chains a log holds (the PostgreSQL writers' claims stop here).
pub const MAX_CHAINS: i64 = 1 << 12;

/// The chain an entry (or a head) belongs to.
pub fn chain_of(seq: i64) -> i64 {
    seq >> CHAIN_BITS
}

/// An entry's position in its chain (1 for a chain's first entry; 0 for the
/// head of an empty chain).
pub fn chain_position(seq: i64) -> i64 {
    seq & ((1 << CHAIN_BITS) - 1)
}

/// The sequence numbers chain `chain` can hold, first entry to last.
pub fn chain_range(chain: i64) -> std::ops::RangeInclusive<i64> {
    (chain << CHAIN_BITS) + 1..=((chain + 1) << CHAIN_BITS) - 1
}

/// One audit entry sealed onto the chain.
pub(in crate::store) struct SealedRow<'a> {
    pub(in crate::store) seq: i64,
    pub(in crate::store) entry_hash: Vec<u8>,
    pub(in crate::store) mac: Vec<u8>,
    pub(in crate::store) draft: &'a AuditDraft,
}

/// A group of audit entries sealed onto a known chain head, ready to insert.
pub(in crate::store) struct SealedBatch<'a> {
    /// The head the batch extends; the insert happens only if it still is.
    pub(in crate::store) from: ChainHead,
    /// The head after the batch.
    pub(in crate::store) to: ChainHead,
    pub(in crate::store) entries: Vec<SealedRow<'a>>,
    pub(in crate::store) checkpoints: Vec<AuditCheckpoint>,
}

/// What an append wrote: the new head, the entries' sequence numbers and the
/// ids of the leases recorded.
pub(in crate::store) type Appended = (ChainHead, Vec<i64>, Vec<String>);

impl SealedBatch<'_> {
    pub(in crate::store) fn appended(self, recorded: Vec<String>) -> Appended {
        let seqs = self.entries.iter().map(|e| e.seq).collect();
        (self.to, seqs, recorded)
    }
}

pub(in crate::store) fn seal_batch<'a>(
    from: ChainHead,
    drafts: &'a [AuditDraft],
    sealer: AuditSealer<'_>,
) -> SealedBatch<'a> {
    let (mut seq, mut prev) = from.clone();
    let mut entries = Vec::with_capacity(drafts.len());
    let mut checkpoints = Vec::new();
    for draft in drafts {
        seq += 1;
        let sealed = sealer(seq, &prev, draft);
        checkpoints.extend(sealed.checkpoint);
        prev.clone_from(&sealed.entry_hash);
        entries.push(SealedRow {
            seq,
            entry_hash: sealed.entry_hash,
            mac: sealed.mac,
            draft,
        });
    }
    SealedBatch {
        from,
        to: (seq, prev),
        entries,
        checkpoints,
    }
}

/// The hash-chained audit log.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends entries to this process's chain in one transaction,
    /// serialised against every other appender of that chain (a deletion's
    /// own entry; see the module documentation). Returns the assigned
    /// sequence numbers.
    ///
    /// `leases` are recorded in the same transaction, each only if its
    /// connection is still ACTIVE and unchanged there (a deletion,
    /// suspension or re-consent that committed first wins); the ids of the
    /// leases recorded are returned with the sequence numbers.
    async fn audit_append(
        &self,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<(Vec<i64>, Vec<String>)>;

    /// Audit entries in sequence order within `[from_seq, to_seq]`, at most `limit`.
    async fn audit_range(
        &self,
        from_seq: i64,
        to_seq: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditRow>>;

    /// Audit entries matching a filter, in the filter's order.
    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>>;

    /// The head of chain 0: last sequence number and hash (0 and the genesis
    /// hash when it is empty). Chain 0 is the whole log of a SQLite store and
    /// of a single vault; code that reads the log as a whole uses
    /// [`AuditStore::audit_heads`].
    async fn audit_head(&self) -> StoreResult<(i64, Vec<u8>)>;

    /// Every chain's head, by chain.
    async fn audit_heads(&self) -> StoreResult<Vec<AuditHead>>;

    /// Signed checkpoints with `from_seq <= seq <= to_seq`, ascending.
    async fn audit_checkpoints(
        &self,
        from_seq: i64,
        to_seq: i64,
    ) -> StoreResult<Vec<AuditCheckpoint>>;

    /// The checkpoint of chain `chain` with the highest sequence number, if any.
    async fn audit_checkpoint_last(&self, chain: i64) -> StoreResult<Option<AuditCheckpoint>>;

    /// The archive's segments, in sequence order (chain by chain).
    async fn audit_segments(&self) -> StoreResult<Vec<AuditSegment>>;

    /// The last archived segment of chain `chain`, if any: where that
    /// chain's live entries begin.
    async fn audit_segment_last(&self, chain: i64) -> StoreResult<Option<AuditSegment>>;

    /// Records a sealed segment, marking its entries archived. Records
    /// nothing and returns false unless the segment continues its chain's
    /// archive (its first entry follows the chain's last segment's and links
    /// to its hash; in a chain with no segment yet, it is the chain's first
    /// entry linking to the genesis hash) and its last entry is still in the
    /// live table with the hash it names: another archiver got there first,
    /// or the live table changed under it.
    async fn audit_segment_record(&self, segment: &AuditSegment) -> StoreResult<bool>;

    /// Deletes from the live table at most `limit` archived entries, oldest
    /// first in each chain, with their checkpoints; returns how many entries
    /// it deleted. Each chain's deletion is one short transaction, so that
    /// pruning a segment does not hold the write lock the lease path needs.
    async fn audit_prune_archived(&self, limit: i64) -> StoreResult<u64>;

    /// The lowest sequence number of chain `chain` in the live table (`None`
    /// when it has none).
    async fn audit_first_live(&self, chain: i64) -> StoreResult<Option<i64>>;
}

/// The previous-hash of each chain's first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

for_each_backend! {
/// The head of every read of whole entries (`audit_log a`): each row with its
/// previous hash computed (see the module documentation).
pub(in crate::store) static AUDIT_ROWS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT a.*, COALESCE( \
           (SELECT p.entry_hash FROM audit_log p WHERE p.seq = a.seq - 1), \
           (SELECT s.last_hash FROM audit_segments s WHERE s.last_seq = a.seq - 1), \
           {NO_PREDECESSOR}) AS prev_hash \
         FROM audit_log a"
    )
});

impl StoreImpl {
    /// Appends on the audit writer's held connection (each backend's
    /// `append_on` seals and writes), holding the backend's write guard; the
    /// connection goes back to the pool after an error.
    pub(in crate::store) async fn append_sealing(
        &self,
        cached: Option<ChainHead>,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<Appended> {
        let _guard = self.write_guard().await;
        let mut held = self.hot.writer.lock(&self.pool).await?;
        let fresh = held.fresh;
        let result = async {
            let conn = held.conn()?;
            if fresh {
                // The chain this process wrote before, if it did: claimed
                // again in preference to any other.
                let previous = self
                    .writer_claimed
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then(|| self.writer_chain.load(std::sync::atomic::Ordering::Relaxed));
                let chain = prepare_audit_connection(conn, previous).await?;
                self.writer_chain.store(chain, std::sync::atomic::Ordering::Relaxed);
                self.writer_claimed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let chain = self.writer_chain.load(std::sync::atomic::Ordering::Relaxed);
            // A head cached for another chain (before the writer's
            // connection was replaced) is no head of this one.
            let cached = cached.filter(|(seq, _)| chain_of(*seq) == chain);
            append_on(conn, chain, cached, drafts, leases, sealer).await
        }
        .await;
        held.discard_on_error(result).await
    }
}

impl StoreImpl {
    /// The one row `sql` reads within chain `chain`'s sequence numbers
    /// (bound as `$1` and `$2`), if any.
    async fn last_of_chain<T>(&self, sql: &'static str, chain: i64) -> StoreResult<Option<T>>
    where
        T: for<'r> sqlx::FromRow<'r, <Db as sqlx::Database>::Row>,
    {
        let range = chain_range(chain);
        let row = sqlx::query(sql)
            .bind(range.start())
            .bind(range.end())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| Ok(T::from_row(r)?)).transpose()
    }
}

#[async_trait]
impl AuditStore for StoreImpl {
    async fn audit_append(
        &self,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<(Vec<i64>, Vec<String>)> {
        // This process's audit writer is the only appender of its chain, so
        // the head it last wrote is almost always still the head; other
        // appenders (a second vault on the same SQLite file, a session that
        // held this PostgreSQL chain before) are caught by a compare-and-swap
        // on the head, after which the backend reads it under a lock and
        // seals the batch again.
        let cached = self.head_cache.lock().map_or(None, |h| h.clone());
        let result = self.append_sealing(cached, drafts, leases, sealer).await;
        if let Ok(mut h) = self.head_cache.lock() {
            *h = result.as_ref().ok().map(|(batch_to, _, _)| batch_to.clone());
        }
        result.map(|(_, seqs, recorded)| (seqs, recorded))
    }

    async fn audit_range(&self, from_seq: i64, to_seq: i64, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{} WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            *AUDIT_ROWS
        )))
        .bind(from_seq)
        .bind(to_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(AuditRow::from_row(r)?)).collect()
    }

    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let mut f = Filter::new(&AUDIT_ROWS);
        if let Some(a) = &filter.actor {
            f.push("actor = ?", FilterValue::Text(a.clone()));
        }
        if let Some(p) = &filter.action_prefix {
            // Range scan instead of LIKE so no pattern characters need escaping.
            f.push("action >= ?", FilterValue::Text(p.clone()));
            f.push("action < ?", FilterValue::Text(format!("{p}\u{10FFFF}")));
            // The index by action leaves out lease grants (migration 0010):
            // a query that cannot match them says so, and may use it.
            if !LEASE_GRANT.starts_with(p.as_str()) {
                f.sql.push_str(" AND action <> 'lease.grant'");
            }
        }
        if let Some(t) = &filter.target {
            f.push("target = ?", FilterValue::Text(t.clone()));
        }
        if let Some(s) = filter.since {
            f.push("at >= ?", FilterValue::Int(s.as_micros()));
        }
        if let Some(u) = filter.until {
            f.push("at < ?", FilterValue::Int(u.as_micros()));
        }
        if let Some(o) = &filter.outcome {
            f.push("outcome = ?", FilterValue::Text(o.clone()));
        }
        if let Some(b) = filter.before_seq {
            f.push("seq < ?", FilterValue::Int(b));
        }
        if let Some(a) = filter.after_seq {
            f.push("seq > ?", FilterValue::Int(a));
        }
        f.sql.push_str(if filter.ascending { " ORDER BY seq" } else { " ORDER BY seq DESC" });
        f.binds.push(FilterValue::Int(limit));
        f.sql.push_str(&format!(" LIMIT ${}", f.binds.len()));
        let rows = f.query().fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(AuditRow::from_row(r)?)).collect()
    }

    async fn audit_checkpoints(&self, from_seq: i64, to_seq: i64) -> StoreResult<Vec<AuditCheckpoint>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
        )
        .bind(from_seq)
        .bind(to_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(AuditCheckpoint::from_row(r)?)).collect()
    }

    async fn audit_checkpoint_last(&self, chain: i64) -> StoreResult<Option<AuditCheckpoint>> {
        self.last_of_chain(
            "SELECT * FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2 \
             ORDER BY seq DESC LIMIT 1",
            chain,
        )
        .await
    }

    async fn audit_head(&self) -> StoreResult<(i64, Vec<u8>)> {
        read_audit_head(
            &self.pool,
            "SELECT seq, entry_hash FROM audit_head WHERE id = CAST($1 AS BIGINT) + 1",
            0,
        )
        .await
    }

    async fn audit_heads(&self) -> StoreResult<Vec<AuditHead>> {
        let rows: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT CAST(id AS BIGINT) - 1, seq, entry_hash FROM audit_head ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(chain, seq, entry_hash)| AuditHead {
                chain,
                seq,
                entry_hash,
            })
            .collect())
    }

    async fn audit_segments(&self) -> StoreResult<Vec<AuditSegment>> {
        let rows = sqlx::query("SELECT * FROM audit_segments ORDER BY first_seq")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(AuditSegment::from_row(r)?)).collect()
    }

    async fn audit_segment_last(&self, chain: i64) -> StoreResult<Option<AuditSegment>> {
        self.last_of_chain(
            "SELECT * FROM audit_segments WHERE first_seq >= $1 AND first_seq <= $2 \
             ORDER BY first_seq DESC LIMIT 1",
            chain,
        )
        .await
    }

    async fn audit_segment_record(&self, segment: &AuditSegment) -> StoreResult<bool> {
        let range = chain_range(chain_of(segment.first_seq));
        if !range.contains(&segment.first_seq)
            || !range.contains(&segment.last_seq)
            || segment.last_seq < segment.first_seq
        {
            return Ok(false);
        }
        let (_guard, mut tx) = self.begin_write().await?;
        let last: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT last_seq, last_hash FROM audit_segments \
             WHERE first_seq >= $1 AND first_seq <= $2 ORDER BY first_seq DESC LIMIT 1",
        )
        .bind(range.start())
        .bind(range.end())
        .fetch_optional(&mut *tx)
        .await?;
        let continues = match &last {
            None => segment.first_seq == *range.start() && segment.prev_hash == GENESIS_HASH,
            Some((seq, hash)) => segment.first_seq == seq + 1 && &segment.prev_hash == hash,
        };
        if !continues {
            return Ok(false);
        }
        let live: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT entry_hash FROM audit_log WHERE seq = $1")
                .bind(segment.last_seq)
                .fetch_optional(&mut *tx)
                .await?;
        if live.as_deref() != Some(segment.last_hash.as_slice()) {
            return Ok(false);
        }
        let inserted = sqlx::query(
            "INSERT INTO audit_segments (first_seq, last_seq, prev_hash, last_hash, file_name, \
             file_sha256, sealed_at, sealed_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (first_seq) DO NOTHING",
        )
        .bind(segment.first_seq)
        .bind(segment.last_seq)
        .bind(&segment.prev_hash)
        .bind(&segment.last_hash)
        .bind(&segment.file_name)
        .bind(&segment.file_sha256)
        .bind(segment.sealed_at.as_micros())
        .bind(&segment.sealed_by)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(inserted == 1)
    }

    async fn audit_prune_archived(&self, limit: i64) -> StoreResult<u64> {
        // Each chain's last archived entry (a chain's segments are in order).
        let archived: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT MAX(last_seq) FROM audit_segments GROUP BY first_seq >> {CHAIN_BITS} \
             ORDER BY 1"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut budget = limit.max(1);
        let mut deleted = 0;
        for archived in archived {
            let chain = chain_of(archived);
            let Some(first) = self.audit_first_live(chain).await? else {
                continue;
            };
            if first > archived {
                continue;
            }
            let upto = archived.min(first.saturating_add(budget - 1));
            let (_guard, mut tx) = self.begin_write().await?;
            sqlx::query("DELETE FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2")
                .bind(chain_range(chain).start())
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query("DELETE FROM audit_log WHERE seq >= $1 AND seq <= $2")
                .bind(first)
                .bind(upto)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            deleted += n;
            budget -= i64::try_from(n).unwrap_or(budget);
            if budget <= 0 {
                break;
            }
        }
        Ok(deleted)
    }

    async fn audit_first_live(&self, chain: i64) -> StoreResult<Option<i64>> {
        let range = chain_range(chain);
        Ok(
            sqlx::query_scalar("SELECT MIN(seq) FROM audit_log WHERE seq >= $1 AND seq <= $2")
                .bind(range.start())
                .bind(range.end())
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
}
