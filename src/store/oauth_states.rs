//! Pending OAuth authorization states: the hashed `state` value, who began
//! the flow, and the PKCE verifier sealed under its own wrapped DEK.
//!
//! Invariants: a state is used at most once, because using it deletes it
//! (the delete's row count decides which of two concurrent completions
//! wins); one caller holds at most `max_pending` unexpired states per
//! (tenant, account), enforced in the transaction that inserts one; the
//! table holds hashes of states, never the states themselves.
//!
//! `consumed_at` is set only by rows written before migration 0008, when a
//! used state was marked rather than deleted; such a row is neither pending
//! nor usable, and the purge removes it once it expires.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{AccountId, Integration, TenantId, Timestamp};
use crate::store::{AuthzConsume, AuthzStateRecord, StoreResult};

/// Pending OAuth authorization states.
#[async_trait]
pub trait OAuthStateStore: Send + Sync {
    /// Records a pending authorization, keeping at most `max_pending` (at
    /// least 1) unexpired states of its (tenant, account, caller): when that
    /// many are pending already, the oldest are deleted in the same
    /// transaction to make room. Returns how many were deleted.
    async fn authz_insert(&self, state: &AuthzStateRecord, max_pending: u32) -> StoreResult<u64>;

    /// Uses a state: deletes it and returns it, atomically, so that only
    /// one caller ever gets it.
    async fn authz_consume(&self, state_hash: &[u8]) -> StoreResult<AuthzConsume>;

    /// Deletes states that expired before `before`; returns how many.
    async fn authz_purge(&self, before: Timestamp) -> StoreResult<u64>;
}

for_each_backend! {
sqlite {
    // SQLite's write transaction (BEGIN IMMEDIATE, one writer) already
    // orders the inserts of one (tenant, account, caller).
    const LOCK_PENDING_STATES: Option<&str> = None;
}
postgres {
    // Orders concurrent inserts for one (tenant, account, caller) until the
    // transaction ends, so that each counts the others' states: without it
    // two could both see room for one more. The first key names this lock's
    // class (the one-key advisory locks, such as the event order lock, are a
    // separate key space); a hash collision only serialises two keys.
    const LOCK_PENDING_STATES: Option<&str> =
        Some("SELECT pg_advisory_xact_lock(7431002, hashtext($1))");
}
pub(in crate::store) fn authz_from_row(row: &Row) -> StoreResult<AuthzStateRecord> {
    Ok(AuthzStateRecord {
        state_hash: row.try_get("state_hash")?,
        tenant: TenantId::from_stored(row.try_get("tenant_id")?),
        account: AccountId::from_stored(row.try_get("account_id")?),
        integration: stored(
            Integration::parse(row.try_get::<&str, _>("integration")?),
            "integration",
        )?,
        caller: row.try_get("caller")?,
        kek_version: kek_from_db(row.try_get("kek_version")?)?,
        wrapped_dek: row.try_get("wrapped_dek")?,
        sealed_verifier: row.try_get("sealed_verifier")?,
        created_at: ts(row.try_get("created_at")?),
        expires_at: ts(row.try_get("expires_at")?),
    })
}

#[async_trait]
impl OAuthStateStore for StoreImpl {
    async fn authz_insert(&self, a: &AuthzStateRecord, max_pending: u32) -> StoreResult<u64> {
        let (_guard, mut tx) = self.begin_write().await?;
        check_wrapping_version(&mut tx, a.kek_version).await?;
        if let Some(lock) = LOCK_PENDING_STATES {
            sqlx::query(lock)
                .bind(format!("{}/{}/{}", a.tenant.as_str(), a.account.as_str(), a.caller))
                .execute(&mut *tx)
                .await?;
        }
        // Pending: neither used (rows from before 0008) nor expired, as of
        // this state's creation. Counted and evicted through the
        // authorization_states_pending index (migration 0008).
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM authorization_states \
             WHERE tenant_id = $1 AND account_id = $2 AND caller = $3 \
             AND consumed_at IS NULL AND expires_at > $4",
        )
        .bind(a.tenant.as_str())
        .bind(a.account.as_str())
        .bind(&a.caller)
        .bind(a.created_at.as_micros())
        .fetch_one(&mut *tx)
        .await?;
        // Room for this one: the oldest beyond `max_pending - 1` go.
        let excess = pending - i64::from(max_pending.max(1)) + 1;
        let evicted = if excess > 0 {
            sqlx::query(
                "DELETE FROM authorization_states WHERE state_hash IN ( \
                 SELECT state_hash FROM authorization_states \
                 WHERE tenant_id = $1 AND account_id = $2 AND caller = $3 \
                 AND consumed_at IS NULL AND expires_at > $4 \
                 ORDER BY created_at, state_hash LIMIT $5)",
            )
            .bind(a.tenant.as_str())
            .bind(a.account.as_str())
            .bind(&a.caller)
            .bind(a.created_at.as_micros())
            .bind(excess)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            0
        };
        sqlx::query(
            "INSERT INTO authorization_states (state_hash, tenant_id, account_id, integration, caller, \
             kek_version, wrapped_dek, sealed_verifier, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(a.state_hash.as_slice())
        .bind(a.tenant.as_str())
        .bind(a.account.as_str())
        .bind(a.integration.as_str())
        .bind(&a.caller)
        .bind(kek_to_db(a.kek_version))
        .bind(a.wrapped_dek.as_slice())
        .bind(a.sealed_verifier.as_slice())
        .bind(a.created_at.as_micros())
        .bind(a.expires_at.as_micros())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(evicted)
    }

    async fn authz_consume(&self, state_hash: &[u8]) -> StoreResult<AuthzConsume> {
        let (_guard, mut tx) = self.begin_write().await?;
        // A row marked used before migration 0008 stays unusable.
        let row = sqlx::query(
            "DELETE FROM authorization_states \
             WHERE state_hash = $1 AND consumed_at IS NULL RETURNING *",
        )
        .bind(state_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match row {
            Some(row) => AuthzConsume::Consumed(authz_from_row(&row)?),
            None => AuthzConsume::Unknown,
        };
        tx.commit().await?;
        Ok(result)
    }

    async fn authz_purge(&self, before: Timestamp) -> StoreResult<u64> {
        let (_guard, mut tx) = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM authorization_states WHERE expires_at < $1")
            .bind(before.as_micros())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n)
    }
}
}
