//! The key registry: which KEK versions exist and in what state, the
//! known-value checks that prove a keyring holds the right root keys, the
//! keyring claims, and the replicas that announced which versions they can
//! unwrap.
//!
//! Invariants: a version's state only moves forward (pending → primary →
//! retired → destroyed) and exactly one version is primary; promotion and
//! retirement lock the version row (on PostgreSQL) so that a key being
//! wrapped under it concurrently is either counted or refused
//! (`check_wrapping_version` in `common.rs`).

use async_trait::async_trait;
use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{KeyState, Timestamp, VaultError};
use crate::store::{
    KekRecord, NewKek, ReplicaRecord, StoreResult, WrappedKeyCount, WrappedKeyKind,
};

/// The key registry: KEK versions, root-key checks, replicas.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Every KEK version the database knows, oldest first.
    async fn kek_list(&self) -> StoreResult<Vec<KekRecord>>;

    /// Records a version whose material a keyring holds; no-op if known. The first version
    /// registered becomes primary. `key_check` is a known value wrapped by the version,
    /// checked at every start.
    async fn kek_register(&self, kek: &NewKek<'_>) -> StoreResult<()>;

    /// Makes an ACTIVE `version` primary; the previous primary becomes active. Refused
    /// (FailedPrecondition) for a retired or destroyed version.
    async fn kek_promote(&self, version: KekVersion, at: Timestamp, actor: &str)
    -> StoreResult<()>;

    /// Marks a version retired or destroyed, refusing (FailedPrecondition) while any
    /// wrapped key or running rotation still references it.
    async fn kek_set_state(
        &self,
        version: KekVersion,
        state: crate::domain::KeyState,
        at: Timestamp,
        actor: &str,
    ) -> StoreResult<()>;

    /// How many wrapped keys of each kind reference each version.
    async fn wrapped_key_counts(&self) -> StoreResult<Vec<WrappedKeyCount>>;

    /// The key-check value recorded under `name`, if any.
    async fn root_key_check_get(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Records a key-check value under `name` unless one is recorded already; returns the
    /// value recorded (which may be another replica's, written first).
    async fn root_key_check_put(
        &self,
        name: &str,
        value: &[u8],
        at: Timestamp,
    ) -> StoreResult<Vec<u8>>;

    /// Claims `name` for `holder` unless another holder claimed it less than `ttl` ago (by
    /// the database's clock); returns the holder now recorded.
    async fn keyring_claim(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<String>;

    /// Writes (inserts or replaces) a replica's row, stamping `seen_at` with the
    /// database's clock (the record's own `seen_at` is ignored).
    async fn replica_upsert(&self, replica: &ReplicaRecord) -> StoreResult<()>;

    /// Every replica row, live or not, by id.
    async fn replica_list(&self) -> StoreResult<Vec<ReplicaRecord>>;

    /// Deletes a replica's row (at clean shutdown).
    async fn replica_remove(&self, replica_id: &str) -> StoreResult<()>;
}

for_each_backend! {
sqlite {
    // SQLite has no row locks; the serialised write transaction is the lock.
    const LOCK_KEK_VERSION: &str =
        "SELECT state FROM kek_versions WHERE version = $1";
}
postgres {
    const LOCK_KEK_VERSION: &str =
        "SELECT state FROM kek_versions WHERE version = $1 FOR UPDATE";
}
pub(in crate::store) fn kek_from_row(row: &Row) -> StoreResult<KekRecord> {
    Ok(KekRecord {
        version: kek_from_db(row.try_get("version")?)?,
        state: stored(KeyState::parse(row.try_get::<&str, _>("state")?), "state")?,
        created_at: ts(row.try_get("created_at")?),
        primary_since: opt_ts(row.try_get("primary_since")?),
        primary_until: opt_ts(row.try_get("primary_until")?),
        retired_at: opt_ts(row.try_get("retired_at")?),
        destroyed_at: opt_ts(row.try_get("destroyed_at")?),
        key_check: row.try_get("key_check")?,
        provider: row.try_get("provider")?,
        created_by: row.try_get("created_by")?,
        promoted_by: row.try_get("promoted_by")?,
        retired_by: row.try_get("retired_by")?,
        destroyed_by: row.try_get("destroyed_by")?,
    })
}

pub(in crate::store) fn replica_from_row(row: &Row) -> StoreResult<ReplicaRecord> {
    let text: String = row.try_get("versions")?;
    let versions = text
        .split(',')
        .filter(|v| !v.is_empty())
        .map(|v| stored(v.parse::<KekVersion>().map_err(|e| VaultError::Storage(e.to_string())), "versions"))
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(ReplicaRecord {
        replica_id: row.try_get("replica_id")?,
        host: row.try_get("host")?,
        pid: row.try_get("pid")?,
        instance: row.try_get("instance")?,
        provider: row.try_get("provider")?,
        versions,
        heartbeat: std::time::Duration::from_millis(
            u64::try_from(row.try_get::<i64, _>("heartbeat_ms")?).unwrap_or(0),
        ),
        started_at: ts(row.try_get("started_at")?),
        seen_at: ts(row.try_get("seen_at")?),
    })
}

#[async_trait]
impl KeyStore for StoreImpl {
    async fn kek_list(&self) -> StoreResult<Vec<KekRecord>> {
        let rows = sqlx::query("SELECT * FROM kek_versions ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(kek_from_row).collect()
    }

    async fn kek_register(&self, k: &NewKek<'_>) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let has_primary: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kek_versions WHERE state = 'primary'")
                .fetch_optional(&mut *tx)
                .await?;
        let state = if has_primary.is_some() { "active" } else { "primary" };
        let primary_since = has_primary.is_none().then(|| Timestamp::now().as_micros());
        let promoted_by = has_primary.is_none().then_some(k.created_by);
        sqlx::query(
            "INSERT INTO kek_versions (version, state, created_at, primary_since, key_check, \
             provider, created_by, promoted_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(kek_to_db(k.version))
        .bind(state)
        .bind(k.created_at.as_micros())
        .bind(primary_since)
        .bind(k.key_check)
        .bind(k.provider)
        .bind(k.created_by)
        .bind(promoted_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_promote(&self, version: KekVersion, at: Timestamp, actor: &str) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let state: Option<String> = sqlx::query_scalar(LOCK_KEK_VERSION)
            .bind(kek_to_db(version))
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => return Err(VaultError::not_found("key version", version)),
            Some("primary") => return Ok(()),
            Some("active") => {}
            Some(other) => {
                return Err(VaultError::precondition(format!(
                    "key version {version} is {other} and cannot become primary"
                )));
            }
        }
        sqlx::query(
            "UPDATE kek_versions SET state = 'active', primary_until = $1 WHERE state = 'primary'",
        )
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE kek_versions SET state = 'primary', primary_since = $1, primary_until = NULL, \
             promoted_by = $2 WHERE version = $3",
        )
        .bind(at.as_micros())
        .bind(actor)
        .bind(kek_to_db(version))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_set_state(
        &self,
        version: KekVersion,
        state: KeyState,
        at: Timestamp,
        actor: &str,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let current: Option<String> = sqlx::query_scalar(LOCK_KEK_VERSION)
            .bind(kek_to_db(version))
            .fetch_optional(&mut *tx)
            .await?;
        let current = match current {
            None => return Err(VaultError::not_found("key version", version)),
            Some(s) => stored(KeyState::parse(&s), "state")?,
        };
        let allowed = matches!(
            (current, state),
            (KeyState::Active, KeyState::Retired) | (KeyState::Retired, KeyState::Destroyed)
        );
        if current == state {
            return Ok(());
        }
        if !allowed {
            return Err(VaultError::precondition(format!(
                "key version {version} is {current}; it cannot become {state}"
            )));
        }
        let refs: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM connection_deks WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM authorization_states WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM revocation_outbox WHERE kek_version = $1) \
                  + (SELECT COUNT(*) FROM rotation_runs WHERE target_version = $1 AND state = 'running')",
        )
        .bind(kek_to_db(version))
        .fetch_one(&mut *tx)
        .await?;
        if refs > 0 {
            return Err(VaultError::precondition(format!(
                "key version {version} still wraps {refs} keys; rotate first"
            )));
        }
        let sql = match state {
            KeyState::Retired => "UPDATE kek_versions SET state = 'retired', retired_at = $1, retired_by = $2 WHERE version = $3",
            _ => "UPDATE kek_versions SET state = 'destroyed', destroyed_at = $1, destroyed_by = $2 WHERE version = $3",
        };
        sqlx::query(sql)
            .bind(at.as_micros())
            .bind(actor)
            .bind(kek_to_db(version))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn wrapped_key_counts(&self) -> StoreResult<Vec<WrappedKeyCount>> {
        let rows = sqlx::query(
            "SELECT kek_version, kind, COUNT(*) AS n FROM ( \
                 SELECT kek_version, 'connection' AS kind FROM connection_deks \
                 UNION ALL SELECT kek_version, 'oauth_state' AS kind FROM authorization_states \
                 UNION ALL SELECT kek_version, 'outbox' AS kind FROM revocation_outbox \
             ) refs GROUP BY kek_version, kind ORDER BY kek_version, kind",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind = match r.try_get::<&str, _>("kind")? {
                    "connection" => WrappedKeyKind::Connection,
                    "oauth_state" => WrappedKeyKind::OauthState,
                    _ => WrappedKeyKind::Outbox,
                };
                Ok(WrappedKeyCount {
                    version: kek_from_db(r.try_get("kek_version")?)?,
                    kind,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    async fn root_key_check_get(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT check_value FROM root_key_checks WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn root_key_check_put(&self, name: &str, value: &[u8], at: Timestamp) -> StoreResult<Vec<u8>> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO root_key_checks (name, check_value, recorded_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .bind(at.as_micros())
        .execute(&mut *tx)
        .await?;
        let recorded: Vec<u8> =
            sqlx::query_scalar("SELECT check_value FROM root_key_checks WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    async fn keyring_claim(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<String> {
        let now = self.clock().await?;
        let stale_before = now.as_micros() - i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO keyring_claims (name, holder, claimed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             claimed_at = excluded.claimed_at WHERE keyring_claims.claimed_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now.as_micros())
        .bind(stale_before)
        .execute(&mut *tx)
        .await?;
        let recorded: String =
            sqlx::query_scalar("SELECT holder FROM keyring_claims WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(recorded)
    }

    async fn replica_upsert(&self, r: &ReplicaRecord) -> StoreResult<()> {
        let versions = r
            .versions
            .iter()
            .map(|v| v.get().to_string())
            .collect::<Vec<_>>()
            .join(",");
        // The clock first: not a second pool connection while this one holds a transaction.
        let seen_at = self.clock().await?;
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO key_replicas (replica_id, host, pid, instance, provider, versions, \
             heartbeat_ms, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (replica_id) DO UPDATE SET versions = excluded.versions, \
             heartbeat_ms = excluded.heartbeat_ms, seen_at = excluded.seen_at",
        )
        .bind(&r.replica_id)
        .bind(&r.host)
        .bind(r.pid)
        .bind(&r.instance)
        .bind(&r.provider)
        .bind(versions)
        .bind(i64::try_from(r.heartbeat.as_millis()).unwrap_or(i64::MAX))
        .bind(r.started_at.as_micros())
        .bind(seen_at.as_micros())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn replica_list(&self) -> StoreResult<Vec<ReplicaRecord>> {
        let rows = sqlx::query("SELECT * FROM key_replicas ORDER BY replica_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(replica_from_row).collect()
    }

    async fn replica_remove(&self, replica_id: &str) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("DELETE FROM key_replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
}
