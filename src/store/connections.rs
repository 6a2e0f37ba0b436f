//! Connections (who connected which Google integration, with which grant)
//! and their sealed secrets: the wrapped DEK in `connection_deks`, the
//! sealed tokens in `connection_secrets`.
//!
//! Invariants: a tenant, account and integration have at most one live
//! (not deleted) connection; a connection's secrets are written only under
//! a KEK version that is primary in the same transaction; listing applies
//! every filter in the query, before the page limit, so a page is short
//! only at the end.

use async_trait::async_trait;
use sqlx::Row as _;

use crate::crypto::KekVersion;
use crate::domain::{
    AccountId, ConnectionId, Integration, LeaseId, ReceiptId, TenantId, Timestamp,
};
use crate::store::{
    ConnectionDetailRecord, ConnectionFilter, ConnectionRecord, PageRequest, SecretsRecord,
    StoreResult,
};

/// Connections and their sealed secrets.
#[async_trait]
pub trait ConnectionStore: Send + Sync {
    /// Inserts a connection with its secrets, replacing (deleting) any live
    /// connection of the same tenant, account and integration. Returns the id
    /// of the replaced connection, if any.
    async fn connection_upsert(
        &self,
        connection: &ConnectionRecord,
        secrets: &SecretsRecord,
    ) -> StoreResult<Option<ConnectionId>>;

    /// Inserts many new connections with their secrets in one transaction
    /// (bulk import and seeding). Fails if any collides with a live connection.
    async fn connection_import(
        &self,
        rows: &[(ConnectionRecord, SecretsRecord)],
    ) -> StoreResult<()>;

    /// One connection by id, tombstones included.
    async fn connection_get(&self, id: &ConnectionId) -> StoreResult<Option<ConnectionRecord>>;

    /// Connections matching a filter, ordered by id, after `page.after`.
    async fn connection_list(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
    ) -> StoreResult<Vec<ConnectionRecord>>;

    /// As [`Store::connection_list`], each with its administrative detail,
    /// in one query. With `leases` (`at`, `granted_after`), the leases open
    /// at `at` among those granted after `granted_after` are counted (a scan
    /// of that window's leases per connection: leases have no index by
    /// connection); without, `open_leases` is 0.
    async fn connection_details(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
        leases: Option<(Timestamp, Timestamp)>,
    ) -> StoreResult<Vec<ConnectionDetailRecord>>;

    /// One connection by id, tombstones included, with its administrative
    /// detail (`leases` as for [`Store::connection_details`]), in one query.
    async fn connection_detail(
        &self,
        id: &ConnectionId,
        leases: Option<(Timestamp, Timestamp)>,
    ) -> StoreResult<Option<ConnectionDetailRecord>>;

    /// The wrapped DEK and sealed tokens of a live connection.
    async fn secrets_get(&self, id: &ConnectionId) -> StoreResult<Option<SecretsRecord>>;

    /// The live connection of an account's integration, if any.
    async fn connection_live(
        &self,
        tenant: &crate::domain::TenantId,
        account: &crate::domain::AccountId,
        integration: crate::domain::Integration,
    ) -> StoreResult<Option<ConnectionRecord>>;

    /// Whether the live connection of this integration of the account holds
    /// a refresh token (and, when `google_email` is given, is linked to that
    /// Google account): whether connecting it again can do without a consent
    /// screen.
    async fn refresh_token_held(
        &self,
        tenant: &crate::domain::TenantId,
        account: &crate::domain::AccountId,
        integration: crate::domain::Integration,
        google_email: Option<&str>,
    ) -> StoreResult<bool>;

    /// Live connections (not deleted) on a Google account.
    async fn connections_by_subject(&self, subject: &str) -> StoreResult<Vec<ConnectionRecord>>;
}

for_each_backend! {
sqlite {
    const LOCK_LIVE_CONNECTION: &str = "SELECT connection_id FROM connections \
         WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted'";

    /// Inserts `rows` with three set-based statements (one per table), each
    /// taking its rows as one JSON array of arrays (blobs in hex), so a batch
    /// costs three round trips to SQLite's worker thread whatever its size.
    async fn insert_connections(
        tx: &mut sqlx::Transaction<'static, Db>,
        rows: &[(ConnectionRecord, SecretsRecord)],
    ) -> StoreResult<()> {
        use serde_json::json;
        let micros = |t: Option<Timestamp>| t.map(Timestamp::as_micros);
        let connections: Vec<_> = rows
            .iter()
            .map(|(c, _)| {
                json!([
                    c.id.as_str(),
                    c.tenant.as_str(),
                    c.account.as_str(),
                    c.integration.as_str(),
                    c.google_subject.as_deref(),
                    c.google_email.as_deref(),
                    c.granted_scopes.to_spaced(),
                    c.status.as_str(),
                    c.status_reason.as_deref(),
                    c.created_at.as_micros(),
                    c.updated_at.as_micros(),
                    micros(c.deleted_at),
                    micros(c.health.last_refresh_at),
                    micros(c.health.next_check_at),
                ])
            })
            .collect();
        let deks: Vec<_> = rows
            .iter()
            .map(|(_, s)| {
                json!([s.connection_id.as_str(), kek_to_db(s.kek_version), hex::encode(&s.wrapped_dek)])
            })
            .collect();
        let secrets: Vec<_> = rows
            .iter()
            .map(|(_, s)| {
                json!([
                    s.connection_id.as_str(),
                    s.access_token.as_deref().map(hex::encode),
                    micros(s.access_expires_at),
                    s.refresh_token.as_deref().map(hex::encode),
                    s.updated_at.as_micros(),
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, account_id, integration, \
             google_subject, google_email, granted_scopes, status, status_reason, created_at, \
             updated_at, deleted_at, last_refresh_at, next_check_at) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
             value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, \
             value ->> 12, value ->> 13 FROM json_each($1)",
        )
        .bind(serde_json::Value::Array(connections).to_string())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO connection_deks (connection_id, kek_version, wrapped_dek) \
             SELECT value ->> 0, value ->> 1, unhex(value ->> 2) FROM json_each($1)",
        )
        .bind(serde_json::Value::Array(deks).to_string())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO connection_secrets (connection_id, access_token, access_expires_at, \
             refresh_token, updated_at) \
             SELECT value ->> 0, unhex(value ->> 1), value ->> 2, unhex(value ->> 3), value ->> 4 \
             FROM json_each($1)",
        )
        .bind(serde_json::Value::Array(secrets).to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
postgres {
    const LOCK_LIVE_CONNECTION: &str = "SELECT connection_id FROM connections \
         WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted' \
         FOR UPDATE";

    /// Inserts `rows` with three set-based statements (one per table), each
    /// taking its columns as arrays (`UNNEST`), so a batch costs three round
    /// trips whatever its size.
    async fn insert_connections(
        tx: &mut sqlx::Transaction<'static, Db>,
        rows: &[(ConnectionRecord, SecretsRecord)],
    ) -> StoreResult<()> {
        let micros = |t: Option<Timestamp>| t.map(Timestamp::as_micros);
        let conns = || rows.iter().map(|(c, _)| c);
        let secrets = || rows.iter().map(|(_, s)| s);
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, account_id, integration, \
             google_subject, google_email, granted_scopes, status, status_reason, created_at, \
             updated_at, deleted_at, last_refresh_at, next_check_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], \
             $12::bigint[], $13::bigint[], $14::bigint[])",
        )
        .bind(conns().map(|c| c.id.as_str()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.tenant.as_str()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.account.as_str()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.integration.as_str()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.google_subject.as_deref()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.google_email.as_deref()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.granted_scopes.to_spaced()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.status.as_str()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.status_reason.as_deref()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.created_at.as_micros()).collect::<Vec<_>>())
        .bind(conns().map(|c| c.updated_at.as_micros()).collect::<Vec<_>>())
        .bind(conns().map(|c| micros(c.deleted_at)).collect::<Vec<_>>())
        .bind(conns().map(|c| micros(c.health.last_refresh_at)).collect::<Vec<_>>())
        .bind(conns().map(|c| micros(c.health.next_check_at)).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO connection_deks (connection_id, kek_version, wrapped_dek) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[])",
        )
        .bind(secrets().map(|s| s.connection_id.as_str()).collect::<Vec<_>>())
        .bind(secrets().map(|s| kek_to_db(s.kek_version)).collect::<Vec<_>>())
        .bind(secrets().map(|s| s.wrapped_dek.as_slice()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO connection_secrets (connection_id, access_token, access_expires_at, \
             refresh_token, updated_at) \
             SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::bigint[], $4::bytea[], $5::bigint[])",
        )
        .bind(secrets().map(|s| s.connection_id.as_str()).collect::<Vec<_>>())
        .bind(secrets().map(|s| s.access_token.as_deref()).collect::<Vec<_>>())
        .bind(secrets().map(|s| micros(s.access_expires_at)).collect::<Vec<_>>())
        .bind(secrets().map(|s| s.refresh_token.as_deref()).collect::<Vec<_>>())
        .bind(secrets().map(|s| s.updated_at.as_micros()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
/// The query of one page of connections matching `filter`, ordered by id.
pub(in crate::store) fn connection_filter(filter: &ConnectionFilter, page: &PageRequest) -> Filter {
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
    if let Some(s) = filter.status {
        f.push("status = ?", FilterValue::Text(s.as_str().to_owned()));
    } else if !filter.include_deleted {
        f.push("status <> ?", FilterValue::Text("deleted".to_owned()));
    }
    if let Some(g) = &filter.google_subject {
        if g.contains('\0') {
            // No stored subject holds a NUL (and PostgreSQL text cannot).
            f.sql.push_str(" AND 1 = 0");
        } else {
            f.push("google_subject = ?", FilterValue::Text(g.clone()));
        }
    }
    if let Some(after) = &page.after {
        f.push("connection_id > ?", FilterValue::Text(after.clone()));
    }
    f.sql.push_str(" ORDER BY connection_id");
    f.binds.push(FilterValue::Int(page.limit));
    f.sql.push_str(&format!(" LIMIT ${}", f.binds.len()));
    f
}

/// The connections `f` selects (a query of [`CONNECTION_COLUMNS`]), each with
/// its secrets' expiry and key version, refresh-token presence, leases open
/// (see [`Store::connection_details`]) and deletion receipt, in one query.
pub(in crate::store) async fn connection_details_of(
    pool: &sqlx::Pool<Db>,
    mut f: Filter,
    leases: Option<(Timestamp, Timestamp)>,
) -> StoreResult<Vec<ConnectionDetailRecord>> {
    // The connections first, exactly as `f` reads them; then, per row, its
    // secrets, open leases and receipt.
    let open_leases = match leases {
        None => "CAST(0 AS BIGINT)".to_owned(),
        Some((at, granted_after)) => {
            f.binds.push(FilterValue::Int(at.as_micros()));
            let at_bind = f.binds.len();
            f.binds.push(FilterValue::Bytes(
                LeaseId::key_minted_before(granted_after).to_vec(),
            ));
            let after_bind = f.binds.len();
            format!(
                "CASE WHEN {} THEN CAST(0 AS BIGINT) ELSE \
                 (SELECT COUNT(*) FROM leases l WHERE l.lease_id >= {} \
                  AND l.connection_id = {} AND l.expires_at > ${at_bind} AND {}) END",
                leases_revoked_status("c.status"),
                uuid_param(after_bind),
                connection_uuid("c.connection_id"),
                lease_not_ended(at_bind)
            )
        }
    };
    f.sql = format!(
        "SELECT c.*, s.access_expires_at, d.kek_version, \
         CAST(CASE WHEN s.refresh_token IS NULL THEN 0 ELSE 1 END AS BIGINT) AS has_refresh_token, \
         {open_leases} AS open_leases, \
         (SELECT rc.receipt_id FROM receipt_connections rc WHERE rc.connection_id = c.connection_id \
          ORDER BY rc.receipt_id LIMIT 1) AS receipt_id \
         FROM ({}) c \
         LEFT JOIN connection_secrets s ON s.connection_id = c.connection_id \
         LEFT JOIN connection_deks d ON d.connection_id = c.connection_id \
         ORDER BY c.connection_id",
        f.sql
    );
    let rows = f.query().fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            let connection = connection_from_row(row)?;
            let receipt: Option<String> = row.try_get("receipt_id")?;
            Ok(ConnectionDetailRecord {
                access_expires_at: opt_ts(row.try_get("access_expires_at")?),
                kek_version: row
                    .try_get::<Option<i64>, _>("kek_version")?
                    .map(kek_from_db)
                    .transpose()?,
                has_refresh_token: row.try_get::<i64, _>("has_refresh_token")? == 1,
                open_leases: row.try_get("open_leases")?,
                receipt_id: receipt
                    .filter(|_| connection.deleted_at.is_some())
                    .map(ReceiptId::from_stored),
                connection,
            })
        })
        .collect()
}

pub(in crate::store) async fn insert_connection(
    tx: &mut sqlx::Transaction<'static, Db>,
    c: &ConnectionRecord,
    s: &SecretsRecord,
) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO connections (connection_id, tenant_id, account_id, integration, \
             google_subject, google_email, granted_scopes, status, status_reason, created_at, \
             updated_at, deleted_at, last_refresh_at, next_check_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
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
        .bind(c.health.last_refresh_at.map(Timestamp::as_micros))
        .bind(c.health.next_check_at.map(Timestamp::as_micros))
        .execute(&mut **tx)
        .await?;
    insert_secrets(tx, s).await
}

/// Inserts a connection's wrapped DEK and sealed tokens. The caller has
/// checked, in this transaction, that their KEK version may wrap keys
/// ([`check_wrapping_version`]).
pub(in crate::store) async fn insert_secrets(tx: &mut sqlx::Transaction<'static, Db>, s: &SecretsRecord) -> StoreResult<()> {
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

#[async_trait]
impl ConnectionStore for StoreImpl {
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
                 status = $4, status_reason = $5, updated_at = $6, last_refresh_at = $7, \
                 last_refresh_error = NULL, last_refresh_error_at = NULL, next_check_at = $8 \
                 WHERE connection_id = $9",
            )
            .bind(c.google_subject.as_deref())
            .bind(c.google_email.as_deref())
            .bind(c.granted_scopes.to_spaced())
            .bind(c.status.as_str())
            .bind(c.status_reason.as_deref())
            .bind(c.updated_at.as_micros())
            .bind(c.health.last_refresh_at.map(Timestamp::as_micros))
            .bind(c.health.next_check_at.map(Timestamp::as_micros))
            .bind(c.id.as_str())
            .execute(&mut *tx)
            .await?;
            delete_secrets(&mut tx, c.id.as_str()).await?;
            check_wrapping_version(&mut tx, s.kek_version).await?;
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
                 updated_at = $1, deleted_at = $1, last_refresh_at = NULL, last_refresh_error = NULL, \
                 last_refresh_error_at = NULL, next_check_at = NULL WHERE connection_id = $2",
            )
            .bind(c.created_at.as_micros())
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        }
        check_wrapping_version(&mut tx, s.kek_version).await?;
        insert_connection(&mut tx, c, s).await?;
        tx.commit().await?;
        Ok(old.map(ConnectionId::from_stored))
    }

    async fn connection_import(&self, rows: &[(ConnectionRecord, SecretsRecord)]) -> StoreResult<()> {
        let (_guard, mut tx) = self.begin_write().await?;
        let mut versions: Vec<KekVersion> = rows.iter().map(|(_, s)| s.kek_version).collect();
        versions.sort_unstable();
        versions.dedup();
        for v in versions {
            check_wrapping_version(&mut tx, v).await?;
        }
        insert_connections(&mut tx, rows).await?;
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
        let f = connection_filter(filter, page);
        let rows = f.query().fetch_all(&self.pool).await?;
        rows.iter().map(connection_from_row).collect()
    }

    async fn connection_details(
        &self,
        filter: &ConnectionFilter,
        page: &PageRequest,
        leases: Option<(Timestamp, Timestamp)>,
    ) -> StoreResult<Vec<ConnectionDetailRecord>> {
        connection_details_of(&self.pool, connection_filter(filter, page), leases).await
    }

    async fn connection_detail(
        &self,
        id: &ConnectionId,
        leases: Option<(Timestamp, Timestamp)>,
    ) -> StoreResult<Option<ConnectionDetailRecord>> {
        let mut f = Filter::new(&format!("SELECT {CONNECTION_COLUMNS} FROM connections"));
        f.push("connection_id = ?", FilterValue::Text(id.as_str().to_owned()));
        Ok(connection_details_of(&self.pool, f, leases).await?.pop())
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
        integration: Integration,
        google_email: Option<&str>,
    ) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections c JOIN connection_secrets s \
             ON s.connection_id = c.connection_id \
             WHERE c.tenant_id = $1 AND c.account_id = $2 AND c.integration = $3 \
             AND c.status <> 'deleted' AND s.refresh_token IS NOT NULL \
             AND ($4 IS NULL OR LOWER(c.google_email) = LOWER($4))",
        )
        .bind(tenant.as_str())
        .bind(account.as_str())
        .bind(integration.as_str())
        .bind(google_email)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn connections_by_subject(&self, subject: &str) -> StoreResult<Vec<ConnectionRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections WHERE google_subject = $1 \
             AND status <> 'deleted' ORDER BY connection_id"
        )))
        .bind(subject)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(connection_from_row).collect()
    }
}
}
