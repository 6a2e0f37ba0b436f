//! Pending OAuth authorization states: the hashed `state` value, who began
//! the flow, and the PKCE verifier sealed under its own wrapped DEK.
//!
//! Invariants: a state is consumed at most once, and only before it
//! expires; the table holds hashes of states, never the states themselves.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::domain::{AccountId, Integration, TenantId, Timestamp};
use crate::store::{AuthzConsume, AuthzStateRecord, StoreResult};

/// Pending OAuth authorization states.
#[async_trait]
pub trait OAuthStateStore: Send + Sync {
    /// Records a pending authorization.
    async fn authz_insert(&self, state: &AuthzStateRecord) -> StoreResult<()>;

    /// Consumes a state: single use, atomically.
    async fn authz_consume(&self, state_hash: &[u8], at: Timestamp) -> StoreResult<AuthzConsume>;

    /// Deletes states that expired before `before`; returns how many.
    async fn authz_purge(&self, before: Timestamp) -> StoreResult<u64>;
}

for_each_backend! {
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
        consumed_at: opt_ts(row.try_get("consumed_at")?),
    })
}

#[async_trait]
impl OAuthStateStore for StoreImpl {
    async fn authz_insert(&self, a: &AuthzStateRecord) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        check_wrapping_version(&mut tx, a.kek_version).await?;
        sqlx::query(
            "INSERT INTO authorization_states (state_hash, tenant_id, account_id, integration, caller, \
             kek_version, wrapped_dek, sealed_verifier, created_at, expires_at, consumed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)",
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
        Ok(())
    }

    async fn authz_consume(&self, state_hash: &[u8], at: Timestamp) -> StoreResult<AuthzConsume> {
        let (_guard, mut tx) = self.begin_write().await?;
        let first = sqlx::query(
            "UPDATE authorization_states SET consumed_at = $1 \
             WHERE state_hash = $2 AND consumed_at IS NULL RETURNING *",
        )
        .bind(at.as_micros())
        .bind(state_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let result = match first {
            Some(row) => AuthzConsume::Consumed(authz_from_row(&row)?),
            None => {
                let again = sqlx::query("SELECT * FROM authorization_states WHERE state_hash = $1")
                    .bind(state_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                match again {
                    Some(row) => AuthzConsume::Replayed(authz_from_row(&row)?),
                    None => AuthzConsume::Unknown,
                }
            }
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
