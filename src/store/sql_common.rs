// The store implementation shared by both backends. It is `include!`d by
// `sqlite.rs` and `postgres.rs`, each of which defines:
//   type Db; struct Store type `Self` with `pool`; const BACKEND; const LOCKING: &str
//   (" FOR UPDATE" on Postgres, "" on SQLite, whose write transactions are
//   serialised); and `begin_write()` returning (guard, transaction).
// SQL uses `$N` placeholders in ascending order of first use, which both
// drivers bind by number.

use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, Integration, KeyState, ScopeSet, TenantId,
    Timestamp, VaultError,
};
use crate::store::{
    AuthzConsume, AuthzStateRecord, RefreshedTokens,
    AuditDraft, AuditFilter, AuditRow, AuditSealer, Backend, ConnectionFilter, ConnectionRecord,
    KekRecord, PageRequest, Rewrap, RotationRun, SecretsRecord, StoreResult, WrappedDekRow,
};

type Row = <Db as sqlx::Database>::Row;

fn kek_from_db(v: i64) -> StoreResult<KekVersion> {
    u32::try_from(v)
        .ok()
        .and_then(KekVersion::new)
        .ok_or_else(|| VaultError::Storage(format!("kek version {v} out of range")))
}

fn kek_to_db(v: KekVersion) -> i64 {
    i64::from(v.get())
}

fn ts(v: i64) -> Timestamp {
    Timestamp::from_micros(v)
}

fn opt_ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp::from_micros)
}

fn stored<T>(parsed: Result<T, VaultError>, column: &str) -> StoreResult<T> {
    parsed.map_err(|e| VaultError::Storage(format!("column {column} holds an invalid value: {e}")))
}

const CONNECTION_COLUMNS: &str = "connection_id, tenant_id, account_id, integration, google_subject, \
     google_email, granted_scopes, status, status_reason, created_at, updated_at, deleted_at";

fn connection_from_row(row: &Row) -> StoreResult<ConnectionRecord> {
    Ok(ConnectionRecord {
        id: ConnectionId::from_stored(row.try_get("connection_id")?),
        tenant: TenantId::from_stored(row.try_get("tenant_id")?),
        account: AccountId::from_stored(row.try_get("account_id")?),
        integration: stored(
            Integration::parse(row.try_get::<&str, _>("integration")?),
            "integration",
        )?,
        google_subject: row.try_get("google_subject")?,
        google_email: row.try_get("google_email")?,
        granted_scopes: stored(
            ScopeSet::parse_spaced(row.try_get::<&str, _>("granted_scopes")?),
            "granted_scopes",
        )?,
        status: stored(
            ConnectionStatus::parse(row.try_get::<&str, _>("status")?),
            "status",
        )?,
        status_reason: row.try_get("status_reason")?,
        created_at: ts(row.try_get("created_at")?),
        updated_at: ts(row.try_get("updated_at")?),
        deleted_at: opt_ts(row.try_get("deleted_at")?),
    })
}

fn secrets_from_row(row: &Row) -> StoreResult<SecretsRecord> {
    Ok(SecretsRecord {
        connection_id: ConnectionId::from_stored(row.try_get("connection_id")?),
        kek_version: kek_from_db(row.try_get("kek_version")?)?,
        wrapped_dek: row.try_get("wrapped_dek")?,
        access_token: row.try_get("access_token")?,
        access_expires_at: opt_ts(row.try_get("access_expires_at")?),
        refresh_token: row.try_get("refresh_token")?,
        updated_at: ts(row.try_get("updated_at")?),
    })
}

fn kek_from_row(row: &Row) -> StoreResult<KekRecord> {
    Ok(KekRecord {
        version: kek_from_db(row.try_get("version")?)?,
        state: stored(KeyState::parse(row.try_get::<&str, _>("state")?), "state")?,
        created_at: ts(row.try_get("created_at")?),
        primary_since: opt_ts(row.try_get("primary_since")?),
        primary_until: opt_ts(row.try_get("primary_until")?),
        retired_at: opt_ts(row.try_get("retired_at")?),
        destroyed_at: opt_ts(row.try_get("destroyed_at")?),
        key_check: row.try_get("key_check")?,
    })
}

fn authz_from_row(row: &Row) -> StoreResult<AuthzStateRecord> {
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

fn rotation_from_row(row: &Row) -> StoreResult<RotationRun> {
    Ok(RotationRun {
        run_id: row.try_get("run_id")?,
        target_version: kek_from_db(row.try_get("target_version")?)?,
        started_at: ts(row.try_get("started_at")?),
        finished_at: opt_ts(row.try_get("finished_at")?),
        total: row.try_get("total")?,
        rewrapped: row.try_get("rewrapped")?,
        state: row.try_get("state")?,
        actor: row.try_get("actor")?,
        last_error: row.try_get("last_error")?,
    })
}

fn audit_from_row(row: &Row) -> StoreResult<AuditRow> {
    Ok(AuditRow {
        seq: row.try_get("seq")?,
        draft: AuditDraft {
            at: ts(row.try_get("at")?),
            actor: row.try_get("actor")?,
            role: row.try_get("role")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            outcome: row.try_get("outcome")?,
            detail: row.try_get("detail")?,
        },
        prev_hash: row.try_get("prev_hash")?,
        entry_hash: row.try_get("entry_hash")?,
        mac: row.try_get("mac")?,
    })
}

/// Builds `SELECT ... WHERE` text for the dynamic filters; every value is bound.
struct Filter {
    sql: String,
    binds: Vec<FilterValue>,
}

enum FilterValue {
    Text(String),
    Int(i64),
}

impl Filter {
    fn new(base: &str) -> Self {
        Self {
            sql: format!("{base} WHERE 1 = 1"),
            binds: Vec::new(),
        }
    }

    fn push(&mut self, clause: &str, value: FilterValue) {
        self.binds.push(value);
        // `clause` contains a single `?`, replaced by the next numbered placeholder.
        let n = self.binds.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&clause.replace('?', &format!("${n}")));
    }

    fn query(&self) -> sqlx::query::Query<'_, Db, <Db as sqlx::Database>::Arguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()));
        for b in &self.binds {
            q = match b {
                FilterValue::Text(s) => q.bind(s.as_str()),
                FilterValue::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

async fn insert_connection(
    tx: &mut sqlx::Transaction<'static, Db>,
    c: &ConnectionRecord,
    s: &SecretsRecord,
) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, account_id, integration, \
             google_subject, google_email, granted_scopes, status, status_reason, created_at, \
             updated_at, deleted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(c.id.as_str())
        .bind(c.tenant.as_str())
        .bind(c.account.as_str())
        .bind(c.integration.as_str())
        .bind(c.google_subject.as_deref())
        .bind(c.google_email.as_deref())
        .bind(c.granted_scopes.to_spaced())
        .bind(c.status.as_str())
        .bind(c.status_reason.as_deref())
        .bind(c.created_at.as_micros())
        .bind(c.updated_at.as_micros())
        .bind(c.deleted_at.map(Timestamp::as_micros))
        .execute(&mut **tx)
        .await?;
    insert_secrets(tx, s).await
}

/// Destroys a connection's sealed tokens and its wrapped DEK.
async fn delete_secrets(tx: &mut sqlx::Transaction<'static, Db>, id: &str) -> StoreResult<()> {
    sqlx::query("DELETE FROM connection_secrets WHERE connection_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM connection_deks WHERE connection_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_secrets(tx: &mut sqlx::Transaction<'static, Db>, s: &SecretsRecord) -> StoreResult<()> {
    sqlx::query("INSERT INTO connection_deks (connection_id, kek_version, wrapped_dek) VALUES ($1, $2, $3)")
        .bind(s.connection_id.as_str())
        .bind(kek_to_db(s.kek_version))
        .bind(s.wrapped_dek.as_slice())
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO connection_secrets (connection_id, access_token, access_expires_at, \
         refresh_token, updated_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(s.connection_id.as_str())
    .bind(s.access_token.as_deref())
    .bind(s.access_expires_at.map(Timestamp::as_micros))
    .bind(s.refresh_token.as_deref())
    .bind(s.updated_at.as_micros())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl crate::store::Store for StoreImpl {
    fn backend(&self) -> Backend {
        BACKEND
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn kek_list(&self) -> StoreResult<Vec<KekRecord>> {
        let rows = sqlx::query("SELECT * FROM kek_versions ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(kek_from_row).collect()
    }

    async fn kek_register(
        &self,
        version: KekVersion,
        created_at: Timestamp,
        key_check: &[u8],
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let has_primary: Option<i64> =
            sqlx::query_scalar("SELECT version FROM kek_versions WHERE state = 'primary'")
                .fetch_optional(&mut *tx)
                .await?;
        let state = if has_primary.is_some() { "active" } else { "primary" };
        let primary_since = has_primary.is_none().then(|| Timestamp::now().as_micros());
        sqlx::query(
            "INSERT INTO kek_versions (version, state, created_at, primary_since, key_check) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (version) DO NOTHING",
        )
        .bind(kek_to_db(version))
        .bind(state)
        .bind(created_at.as_micros())
        .bind(primary_since)
        .bind(key_check)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_promote(&self, version: KekVersion, at: Timestamp) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM kek_versions WHERE version = $1")
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
            "UPDATE kek_versions SET state = 'primary', primary_since = $1 WHERE version = $2",
        )
        .bind(at.as_micros())
        .bind(kek_to_db(version))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn kek_set_state(&self, version: KekVersion, state: KeyState, at: Timestamp) -> StoreResult<()> {
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
                  + (SELECT COUNT(*) FROM rotation_runs WHERE target_version = $1 AND state = 'running')",
        )
        .bind(kek_to_db(version))
        .fetch_one(&mut *tx)
        .await?;
        if refs > 0 {
            return Err(VaultError::precondition(format!(
                "key version {version} still wraps {refs} data keys; rotate first"
            )));
        }
        let sql = match state {
            KeyState::Retired => "UPDATE kek_versions SET state = 'retired', retired_at = $1 WHERE version = $2",
            _ => "UPDATE kek_versions SET state = 'destroyed', destroyed_at = $1 WHERE version = $2",
        };
        sqlx::query(sql)
            .bind(at.as_micros())
            .bind(kek_to_db(version))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn dek_count_by_version(&self) -> StoreResult<Vec<(KekVersion, i64)>> {
        let rows = sqlx::query(
            "SELECT kek_version, COUNT(*) AS n FROM ( \
                 SELECT kek_version FROM connection_deks \
                 UNION ALL SELECT kek_version FROM authorization_states \
             ) refs GROUP BY kek_version ORDER BY kek_version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((kek_from_db(r.try_get("kek_version")?)?, r.try_get("n")?)))
            .collect()
    }

    async fn connection_upsert(
        &self,
        c: &ConnectionRecord,
        s: &SecretsRecord,
    ) -> StoreResult<Option<ConnectionId>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let old: Option<String> = sqlx::query_scalar(LOCK_LIVE_CONNECTION)
            .bind(c.tenant.as_str())
            .bind(c.account.as_str())
            .bind(c.integration.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if old.as_deref() == Some(c.id.as_str()) {
            // Reconnecting the same Google account: new tokens under a new DEK
            // replace the old ones in place; the connection keeps its id.
            sqlx::query(
                "UPDATE connections SET google_subject = $1, google_email = $2, granted_scopes = $3, \
                 status = $4, status_reason = $5, updated_at = $6 WHERE connection_id = $7",
            )
            .bind(c.google_subject.as_deref())
            .bind(c.google_email.as_deref())
            .bind(c.granted_scopes.to_spaced())
            .bind(c.status.as_str())
            .bind(c.status_reason.as_deref())
            .bind(c.updated_at.as_micros())
            .bind(c.id.as_str())
            .execute(&mut *tx)
            .await?;
            delete_secrets(&mut tx, c.id.as_str()).await?;
            insert_secrets(&mut tx, s).await?;
            tx.commit().await?;
            return Ok(None);
        }
        if let Some(old_id) = &old {
            // Replacing: the old DEK and tokens are destroyed, the row becomes a tombstone.
            delete_secrets(&mut tx, old_id).await?;
            sqlx::query(
                "UPDATE connections SET status = 'deleted', status_reason = 'replaced', \
                 google_subject = NULL, google_email = NULL, granted_scopes = '', \
                 updated_at = $1, deleted_at = $1 WHERE connection_id = $2",
            )
            .bind(c.created_at.as_micros())
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        }
        insert_connection(&mut tx, c, s).await?;
        tx.commit().await?;
        Ok(old.map(ConnectionId::from_stored))
    }

    async fn connection_import(&self, rows: &[(ConnectionRecord, SecretsRecord)]) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        for (c, s) in rows {
            insert_connection(&mut tx, c, s).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn connection_get(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections WHERE connection_id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    async fn connection_list(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ConnectionRecord>> {
        let mut f = Filter::new(&format!("SELECT {CONNECTION_COLUMNS} FROM connections"));
        if let Some(t) = &filter.tenant {
            f.push("tenant_id = ?", FilterValue::Text(t.as_str().to_owned()));
        }
        if let Some(a) = &filter.account {
            f.push("account_id = ?", FilterValue::Text(a.as_str().to_owned()));
        }
        if let Some(i) = filter.integration {
            f.push("integration = ?", FilterValue::Text(i.as_str().to_owned()));
        }
        if !filter.include_deleted {
            f.push("status <> ?", FilterValue::Text("deleted".to_owned()));
        }
        if let Some(after) = &page.after {
            f.push("connection_id > ?", FilterValue::Text(after.clone()));
        }
        f.sql.push_str(" ORDER BY connection_id");
        f.binds.push(FilterValue::Int(page.limit));
        f.sql.push_str(&format!(" LIMIT ${}", f.binds.len()));
        let rows = f.query().fetch_all(&self.pool).await?;
        rows.iter().map(connection_from_row).collect()
    }

    async fn secrets_get(&self, id: &ConnectionId) -> StoreResult<Option<SecretsRecord>> {
        let row = sqlx::query(
            "SELECT s.connection_id, d.kek_version, d.wrapped_dek, s.access_token, \
             s.access_expires_at, s.refresh_token, s.updated_at \
             FROM connection_secrets s JOIN connection_deks d ON d.connection_id = s.connection_id \
             WHERE s.connection_id = $1",
        )
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(secrets_from_row).transpose()
    }

    async fn connection_live(
        &self,
        tenant: &TenantId,
        account: &AccountId,
        integration: Integration,
    ) -> StoreResult<Option<ConnectionRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections \
             WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted'"
        )))
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(integration.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    async fn refresh_token_held(
        &self,
        tenant: &TenantId,
        account: &AccountId,
        google_email: Option<&str>,
    ) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections c JOIN connection_secrets s \
             ON s.connection_id = c.connection_id \
             WHERE c.tenant_id = $1 AND c.account_id = $2 AND c.status <> 'deleted' \
             AND s.refresh_token IS NOT NULL AND ($3 IS NULL OR c.google_email = $3)",
        )
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(google_email)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn connection_revoke_upstream(&self, id: &ConnectionId, at: Timestamp) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        delete_secrets(&mut tx, id.as_str()).await?;
        let n = sqlx::query(
            "UPDATE connections SET status = 'revoked_upstream', status_reason = 'user_revoked_at_google', \
             google_subject = NULL, google_email = NULL, granted_scopes = '', updated_at = $1, \
             deleted_at = $1 WHERE connection_id = $2 AND status NOT IN ('deleted', 'revoked_upstream')",
        )
        .bind(at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM refresh_locks WHERE connection_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn authz_insert(&self, a: &AuthzStateRecord) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
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

    async fn refresh_lock_acquire(
        &self,
        id: &ConnectionId,
        holder: &str,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> StoreResult<Option<i64>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let fence: Option<i64> = sqlx::query_scalar(
            "INSERT INTO refresh_locks (connection_id, holder, fence, expires_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (connection_id) DO UPDATE SET holder = excluded.holder, \
             fence = refresh_locks.fence + 1, expires_at = excluded.expires_at \
             WHERE refresh_locks.expires_at < $4 RETURNING fence",
        )
        .bind(id.as_str())
        .bind(holder)
        .bind(expires_at.as_micros())
        .bind(now.as_micros())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(fence)
    }

    async fn refresh_lock_release(&self, id: &ConnectionId, holder: &str, fence: i64) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query("UPDATE refresh_locks SET expires_at = 0 WHERE connection_id = $1 AND holder = $2 AND fence = $3")
            .bind(id.as_str())
            .bind(holder)
            .bind(fence)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn secrets_refresh(
        &self,
        id: &ConnectionId,
        holder: &str,
        fence: i64,
        t: &RefreshedTokens<'_>,
    ) -> StoreResult<bool> {
        let (_guard, mut tx) = self.begin_write().await?;
        let held: Option<i64> = sqlx::query_scalar(LOCK_REFRESH)
            .bind(id.as_str())
            .bind(holder)
            .bind(fence)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_none() {
            return Ok(false);
        }
        let n = sqlx::query(
            "UPDATE connection_secrets SET access_token = $1, access_expires_at = $2, \
             refresh_token = COALESCE($3, refresh_token), updated_at = $4 WHERE connection_id = $5",
        )
        .bind(t.access_token)
        .bind(t.access_expires_at.as_micros())
        .bind(t.refresh_token)
        .bind(t.at.as_micros())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    async fn rotation_insert(&self, run: &RotationRun) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let running: Option<String> =
            sqlx::query_scalar("SELECT run_id FROM rotation_runs WHERE state = 'running'")
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(id) = running {
            return Err(VaultError::precondition(format!(
                "rotation {id} is still running"
            )));
        }
        sqlx::query(
            "INSERT INTO rotation_runs (run_id, target_version, started_at, finished_at, total, \
             rewrapped, state, actor) VALUES ($1, $2, $3, NULL, $4, 0, 'running', $5)",
        )
        .bind(&run.run_id)
        .bind(kek_to_db(run.target_version))
        .bind(run.started_at.as_micros())
        .bind(run.total)
        .bind(&run.actor)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                VaultError::precondition("another rotation is already running")
            }
            _ => e.into(),
        })?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotation_running(&self) -> StoreResult<Option<RotationRun>> {
        let row = sqlx::query("SELECT * FROM rotation_runs WHERE state = 'running'")
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    async fn rotation_list(&self) -> StoreResult<Vec<RotationRun>> {
        let rows = sqlx::query("SELECT * FROM rotation_runs ORDER BY started_at DESC, run_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rotation_from_row).collect()
    }

    async fn dek_count_not_on(&self, target: KekVersion) -> StoreResult<i64> {
        // Two index ranges (not `<>`, which no index serves).
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM connection_deks WHERE kek_version < $1 OR kek_version > $1",
        )
        .bind(kek_to_db(target))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn dek_batch_scan(
        &self,
        target: KekVersion,
        after: Option<&ConnectionId>,
        limit: i64,
    ) -> StoreResult<(Vec<WrappedDekRow>, Option<ConnectionId>)> {
        // A primary-key range scan: `kek_version <> $1` can use no index, so
        // filtering in SQL would scan (and sort) every remaining row per batch.
        let rows = sqlx::query(
            "SELECT d.connection_id, c.tenant_id, c.account_id, d.kek_version, d.wrapped_dek \
             FROM connection_deks d JOIN connections c ON c.connection_id = d.connection_id \
             WHERE d.connection_id > $1 ORDER BY d.connection_id LIMIT $2",
        )
        .bind(after.map(ConnectionId::as_str).unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let last = match rows.last() {
            Some(r) => Some(ConnectionId::from_stored(r.try_get("connection_id")?)),
            None => None,
        };
        let mut out = Vec::new();
        for r in &rows {
            let version = kek_from_db(r.try_get("kek_version")?)?;
            if version == target {
                continue;
            }
            out.push(WrappedDekRow {
                connection_id: ConnectionId::from_stored(r.try_get("connection_id")?),
                tenant: TenantId::from_stored(r.try_get("tenant_id")?),
                account: AccountId::from_stored(r.try_get("account_id")?),
                kek_version: version,
                wrapped_dek: r.try_get("wrapped_dek")?,
            });
        }
        Ok((out, last))
    }

    async fn dek_rewrap(&self, run_id: &str, rewraps: &[Rewrap]) -> StoreResult<u64> {
        // One set-based compare-and-swap per chunk instead of a statement per
        // row: each row changes only if it still holds what was read.
        const CHUNK: usize = 50;
        let (_guard, mut tx) = self.begin_write().await?;
        let mut changed = 0u64;
        for chunk in rewraps.chunks(CHUNK) {
            let mut rows = String::with_capacity(chunk.len() * 48);
            for i in 0..chunk.len() {
                let p = i * 5;
                if i == 0 {
                    rows.push_str(&format!(
                        "SELECT ${} AS id, ${} AS ov, ${} AS ow, ${} AS nv, ${} AS nw",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    ));
                } else {
                    rows.push_str(&format!(
                        " UNION ALL SELECT ${}, ${}, ${}, ${}, ${}",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    ));
                }
            }
            let sql = format!(
                "UPDATE connection_deks AS d SET kek_version = v.nv, wrapped_dek = v.nw \
                 FROM ({rows}) AS v \
                 WHERE d.connection_id = v.id AND d.kek_version = v.ov AND d.wrapped_dek = v.ow"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.connection_id.as_str())
                    .bind(kek_to_db(r.old_version))
                    .bind(r.old_wrapped.as_slice())
                    .bind(kek_to_db(r.new_version))
                    .bind(r.new_wrapped.as_slice());
            }
            changed += q.execute(&mut *tx).await?.rows_affected();
        }
        sqlx::query(
            "UPDATE rotation_runs SET rewrapped = rewrapped + $1 WHERE run_id = $2 AND state = 'running'",
        )
        .bind(i64::try_from(changed).unwrap_or(i64::MAX))
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn rotation_finish(
        &self,
        run_id: &str,
        state: &str,
        error: Option<&str>,
        at: Timestamp,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        sqlx::query(
            "UPDATE rotation_runs SET state = $1, last_error = $2, finished_at = $3 \
             WHERE run_id = $4 AND state = 'running'",
        )
        .bind(state)
        .bind(error)
        .bind(at.as_micros())
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_append(
        &self,
        drafts: &[AuditDraft],
        sealer: AuditSealer<'_>,
    ) -> StoreResult<Vec<i64>> {
        let (_guard, mut tx) = self.begin_write().await?;
        let head = sqlx::query(LOCK_AUDIT_HEAD).fetch_optional(&mut *tx).await?;
        let (mut seq, mut prev): (i64, Vec<u8>) = match &head {
            Some(r) => (r.try_get("seq")?, r.try_get("entry_hash")?),
            None => return Err(VaultError::Internal("audit_head row missing".into())),
        };
        let mut seqs = Vec::with_capacity(drafts.len());
        for d in drafts {
            seq += 1;
            let (hash, mac) = sealer(seq, &prev, d);
            sqlx::query(
                "INSERT INTO audit_log (seq, at, actor, role, action, target, outcome, detail, \
                 prev_hash, entry_hash, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(seq)
            .bind(d.at.as_micros())
            .bind(&d.actor)
            .bind(&d.role)
            .bind(&d.action)
            .bind(&d.target)
            .bind(&d.outcome)
            .bind(&d.detail)
            .bind(prev.as_slice())
            .bind(hash.as_slice())
            .bind(mac.as_slice())
            .execute(&mut *tx)
            .await?;
            prev = hash;
            seqs.push(seq);
        }
        sqlx::query("UPDATE audit_head SET seq = $1, entry_hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(prev.as_slice())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(seqs)
    }

    async fn audit_range(&self, from_seq: i64, to_seq: i64, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(from_seq)
        .bind(to_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_query(&self, filter: &AuditFilter, limit: i64) -> StoreResult<Vec<AuditRow>> {
        let mut f = Filter::new("SELECT * FROM audit_log");
        if let Some(a) = &filter.actor {
            f.push("actor = ?", FilterValue::Text(a.clone()));
        }
        if let Some(p) = &filter.action_prefix {
            // Range scan instead of LIKE so no pattern characters need escaping.
            f.push("action >= ?", FilterValue::Text(p.clone()));
            f.push("action < ?", FilterValue::Text(format!("{p}\u{10FFFF}")));
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
        rows.iter().map(audit_from_row).collect()
    }

    async fn audit_head(&self) -> StoreResult<(i64, Vec<u8>)> {
        let row = sqlx::query("SELECT seq, entry_hash FROM audit_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok((r.try_get("seq")?, r.try_get("entry_hash")?)),
            None => Err(VaultError::Internal("audit_head row missing".into())),
        }
    }
}
