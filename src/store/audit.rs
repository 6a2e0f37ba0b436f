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
//! for the first entry of a chain (`audit_rows`). An entry with none of
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
//!
//! Entries live in two tables (migration 0013): a recorded lease's grant is
//! a compact row of `leases`, read back through the `lease_entries` view as
//! exactly the entry that was sealed ([`rebuilds`] decides, before it is
//! stored so); every other entry is a text row of `audit_log`. A sequence
//! number is in one of them; every read of entries reads both.

use async_trait::async_trait;
use sqlx::FromRow as _;

use crate::store::common::ChainHead;

use crate::domain::{ConnectionId, LeaseId, Timestamp};
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

/// The `lease_profiles` id of each lease grant of a batch, by the index of
/// its entry (see [`LeaseGrant::entry`]).
pub(in crate::store) type Profiles = std::collections::HashMap<usize, i64>;

/// Whether `draft` is exactly the entry that `lease_entries` (migration
/// 0013) rebuilds from the compact row of `grant`: only then is the grant's
/// entry stored as that row, so that every read of it hashes to what was
/// sealed. A grant whose entry is not (which the lease path never writes)
/// is stored as a text entry, and its lease is not recorded.
pub(in crate::store) fn rebuilds(draft: &AuditDraft, grant: &LeaseGrant) -> bool {
    let lease = &grant.lease;
    let token_ok = grant.token.len() == 32
        && grant
            .token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    token_ok
        && draft.action == LEASE_GRANT
        && draft.outcome == "ok"
        && ConnectionId::from_key(&lease.connection_id.key())
            .is_ok_and(|c| c.as_str() == draft.target && c == lease.connection_id)
        && LeaseId::from_key(&lease.lease_id.key()).is_ok_and(|l| l == lease.lease_id)
        && draft.detail
            == crate::store::lease_grant_detail(
                &lease.lease_id,
                &grant.purpose,
                &grant.scopes,
                &grant.token,
            )
}

/// A recorded lease's compact row: the grant, its sealed entry and its
/// profile id.
pub(in crate::store) struct LeaseEntry<'b> {
    pub(in crate::store) grant: &'b LeaseGrant,
    pub(in crate::store) entry: &'b SealedRow<'b>,
    pub(in crate::store) profile: i64,
}

impl LeaseEntry<'_> {
    /// The token fingerprint's 16 bytes ([`rebuilds`] checked its form).
    pub(in crate::store) fn token(&self) -> Vec<u8> {
        hex::decode(&self.grant.token).unwrap_or_default()
    }
}

/// The leases of `batch` to record as compact rows (each with the entry it
/// replaces): those of `leases` with a profile whose entry [`rebuilds`].
pub(in crate::store) fn lease_entries<'b>(
    batch: &'b SealedBatch<'b>,
    leases: &'b [LeaseGrant],
    profiles: &Profiles,
) -> Vec<LeaseEntry<'b>> {
    leases
        .iter()
        .filter_map(|grant| {
            let entry = batch.entries.get(grant.entry)?;
            let profile = *profiles.get(&grant.entry)?;
            rebuilds(entry.draft, grant).then_some(LeaseEntry {
                grant,
                entry,
                profile,
            })
        })
        .collect()
}

/// For each entry of `batch`, the index among `compact` of the lease whose
/// compact row it is stored as (`None`: a text entry).
pub(in crate::store) fn compacted(
    batch: &SealedBatch<'_>,
    compact: &[LeaseEntry<'_>],
) -> Vec<Option<usize>> {
    let mut out = vec![None; batch.entries.len()];
    for (i, l) in compact.iter().enumerate() {
        if let Some(c) = out.get_mut(l.grant.entry) {
            *c = Some(i);
        }
    }
    out
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
    /// it deleted. A lease grant's entry is its lease's record, so a chain's
    /// pruning stops before the first lease that had not expired before
    /// `leases_expired_before`. Each chain's deletion is one short
    /// transaction, so that pruning a segment does not hold the write lock
    /// the lease path needs.
    async fn audit_prune_archived(
        &self,
        limit: i64,
        leases_expired_before: Timestamp,
    ) -> StoreResult<u64>;

    /// The lowest sequence number of chain `chain` in the live table (`None`
    /// when it has none).
    async fn audit_first_live(&self, chain: i64) -> StoreResult<Option<i64>>;
}

/// The previous-hash of each chain's first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// The columns of an entry, in the order `audit_log` and `lease_entries`
/// both give them.
const ENTRY_COLUMNS: &str =
    "a.seq, a.at, a.actor, a.role, a.action, a.target, a.outcome, a.detail, a.entry_hash, a.mac";

/// Inserts a lease profile, or finds it, and returns its id.
const UPSERT_PROFILE: &str = "INSERT INTO lease_profiles (actor, role, purpose, scopes) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (actor, role, purpose, scopes) \
     DO UPDATE SET actor = excluded.actor RETURNING id";

/// How many lease profiles a store keeps in memory; past that, a grant of a
/// profile not yet cached looks its id up.
const PROFILES_CACHED: usize = 65_536;

for_each_backend! {
/// A read of whole entries from `source` (`audit_log` or `lease_entries`,
/// as `a`): each row with its previous hash computed (see the module
/// documentation), from whichever table holds the entry before.
fn audit_rows(source: &str) -> String {
    format!(
        "SELECT {ENTRY_COLUMNS}, COALESCE( \
           (SELECT p.entry_hash FROM audit_log p WHERE p.seq = a.seq - 1), \
           (SELECT p.entry_hash FROM leases p WHERE p.seq = a.seq - 1), \
           (SELECT s.last_hash FROM audit_segments s WHERE s.last_seq = a.seq - 1), \
           {NO_PREDECESSOR}) AS prev_hash \
         FROM {source} a"
    )
}

/// Whole entries matching `filter` (a `WHERE` clause) from both tables that
/// hold entries, in sequence order (`order`: `ASC` or `DESC`), at most
/// `$limit`: one statement whose two parts each read at most `$limit` rows
/// in key order (so neither sorts the rest of its range), merged.
pub(in crate::store) fn entries_where(filter: &str, order: &str, limit: usize) -> String {
    format!(
        "SELECT * FROM ({}{filter} ORDER BY a.seq {order} LIMIT ${limit}) AS texts \
         UNION ALL \
         SELECT * FROM ({}{filter} ORDER BY a.seq {order} LIMIT ${limit}) AS grants \
         ORDER BY seq {order} LIMIT ${limit}",
        audit_rows("audit_log"),
        audit_rows("lease_entries")
    )
}

/// The stored hash of entry `$1`, from whichever table holds it.
const ENTRY_HASH: &str = "SELECT COALESCE( \
       (SELECT entry_hash FROM audit_log WHERE seq = $1), \
       (SELECT entry_hash FROM leases WHERE seq = $1))";

impl StoreImpl {
    /// The profile id of each lease grant in `leases` (see [`Profiles`]):
    /// from this store's cache, else found or made on `conn`.
    async fn lease_profiles(
        &self,
        conn: &mut <Db as sqlx::Database>::Connection,
        drafts: &[AuditDraft],
        leases: &[LeaseGrant],
    ) -> StoreResult<Profiles> {
        let mut out = Profiles::with_capacity(leases.len());
        for grant in leases {
            let Some(draft) = drafts.get(grant.entry) else {
                continue;
            };
            let key = format!(
                "{}\0{}\0{}\0{}",
                draft.actor, draft.role, grant.purpose, grant.scopes
            );
            let cached = self
                .profile_ids
                .lock()
                .ok()
                .and_then(|m| m.get(&key).copied());
            let id = match cached {
                Some(id) => id,
                None => {
                    let id: i64 = sqlx::query_scalar(UPSERT_PROFILE)
                        .bind(&draft.actor)
                        .bind(&draft.role)
                        .bind(&grant.purpose)
                        .bind(&grant.scopes)
                        .fetch_one(&mut *conn)
                        .await?;
                    if let Ok(mut m) = self.profile_ids.lock()
                        && m.len() < PROFILES_CACHED
                    {
                        m.insert(key, id);
                    }
                    id
                }
            };
            out.insert(grant.entry, id);
        }
        Ok(out)
    }
}

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
            let profiles = self.lease_profiles(&mut *conn, drafts, leases).await?;
            append_on(conn, chain, cached, drafts, leases, &profiles, sealer).await
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(entries_where(
            " WHERE a.seq >= $1 AND a.seq <= $2",
            "ASC",
            3,
        )))
        .bind(from_seq)
        .bind(to_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(AuditRow::from_row(r)?)).collect()
    }

    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let mut f = Filter::new("");
        if let Some(a) = &filter.actor {
            f.push("a.actor = ?", FilterValue::Text(a.clone()));
        }
        if let Some(p) = &filter.action_prefix {
            // Range scan instead of LIKE so no pattern characters need escaping.
            f.push("a.action >= ?", FilterValue::Text(p.clone()));
            f.push("a.action < ?", FilterValue::Text(format!("{p}\u{10FFFF}")));
            // The index by action leaves out lease grants (migration 0010):
            // a query that cannot match them says so, and may use it.
            if !LEASE_GRANT.starts_with(p.as_str()) {
                f.sql.push_str(" AND a.action <> 'lease.grant'");
            }
        }
        if let Some(t) = &filter.target {
            f.push("a.target = ?", FilterValue::Text(t.clone()));
        }
        if let Some(s) = filter.since {
            f.push("a.at >= ?", FilterValue::Int(s.as_micros()));
        }
        if let Some(u) = filter.until {
            f.push("a.at < ?", FilterValue::Int(u.as_micros()));
        }
        if let Some(o) = &filter.outcome {
            f.push("a.outcome = ?", FilterValue::Text(o.clone()));
        }
        if let Some(b) = filter.before_seq {
            f.push("a.seq < ?", FilterValue::Int(b));
        }
        if let Some(a) = filter.after_seq {
            f.push("a.seq > ?", FilterValue::Int(a));
        }
        f.binds.push(FilterValue::Int(limit));
        f.sql = entries_where(
            &f.sql,
            if filter.ascending { "ASC" } else { "DESC" },
            f.binds.len(),
        );
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
        let live: Option<Vec<u8>> = sqlx::query_scalar(ENTRY_HASH)
            .bind(segment.last_seq)
            .fetch_one(&mut *tx)
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

    async fn audit_prune_archived(
        &self,
        limit: i64,
        leases_expired_before: Timestamp,
    ) -> StoreResult<u64> {
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
            let mut upto = archived.min(first.saturating_add(budget - 1));
            // A lease still open, or within its record's retention, keeps
            // its entry and every later one of its chain.
            let kept: Option<i64> = sqlx::query_scalar(
                "SELECT MIN(seq) FROM leases WHERE seq >= $1 AND seq <= $2 AND expires_at >= $3",
            )
            .bind(first)
            .bind(upto)
            .bind(leases_expired_before.as_micros())
            .fetch_one(&self.pool)
            .await?;
            if let Some(kept) = kept {
                upto = kept - 1;
            }
            if upto < first {
                continue;
            }
            let (_guard, mut tx) = self.begin_write().await?;
            sqlx::query("DELETE FROM audit_checkpoints WHERE seq >= $1 AND seq <= $2")
                .bind(chain_range(chain).start())
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            let mut n = 0;
            for table in ["audit_log", "leases"] {
                n += sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE seq >= $1 AND seq <= $2"
                )))
                .bind(first)
                .bind(upto)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            sqlx::query("DELETE FROM lease_releases WHERE seq >= $1 AND seq <= $2")
                .bind(first)
                .bind(upto)
                .execute(&mut *tx)
                .await?;
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
        let mut first: Option<i64> = None;
        for table in ["audit_log", "leases"] {
            let min: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT MIN(seq) FROM {table} WHERE seq >= $1 AND seq <= $2"
            )))
            .bind(range.start())
            .bind(range.end())
            .fetch_one(&self.pool)
            .await?;
            first = match (first, min) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(first)
    }
}
}
