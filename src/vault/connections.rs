//! Storing a connection's tokens (sealed under a fresh per-connection DEK) and
//! the read path that opens them again.

use crate::audit::Actor;
use crate::crypto::{SecretString, TokenKind};
use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, Integration, ScopeSet, TenantId, Timestamp,
    VaultError,
};
use crate::store::{ConnectionRecord, RefreshHealth, SecretsRecord};

use super::Vault;

/// A connection about to be stored, with its plaintext tokens.
pub struct NewConnection {
    /// Owning tenant.
    pub tenant: TenantId,
    /// Owning account.
    pub account: AccountId,
    /// Which integration.
    pub integration: Integration,
    /// Google subject.
    pub google_subject: String,
    /// Google email.
    pub google_email: String,
    /// Scopes Google granted.
    pub granted_scopes: ScopeSet,
    /// Initial status (ACTIVE or INSUFFICIENT_SCOPE).
    pub status: ConnectionStatus,
    /// The access token.
    pub access_token: SecretString,
    /// When it expires.
    pub access_expires_at: Timestamp,
    /// The refresh token, if Google sent one.
    pub refresh_token: Option<SecretString>,
}

impl std::fmt::Debug for NewConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewConnection")
            .field("tenant", &self.tenant)
            .field("account", &self.account)
            .field("integration", &self.integration)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// An opened access token and its expiry.
#[derive(Debug)]
pub struct OpenedToken {
    /// The connection it belongs to.
    pub connection: ConnectionRecord,
    /// The plaintext access token (zeroized on drop, redacted in Debug).
    pub access_token: SecretString,
    /// When it expires.
    pub expires_at: Option<Timestamp>,
}

impl Vault {
    /// Stores a new connection: a fresh DEK wrapped by the primary KEK, both
    /// tokens sealed under it, replacing (and destroying) any live connection
    /// of the same tenant, account and integration.
    pub async fn connection_store(
        &self,
        new: NewConnection,
        _actor: &Actor,
    ) -> Result<ConnectionRecord, VaultError> {
        self.connection_store_as(new, None).await
    }

    /// As [`Vault::connection_store`], reusing `id` when the same Google
    /// account reconnects (its tokens and DEK are replaced in place).
    pub(super) async fn connection_store_as(
        &self,
        new: NewConnection,
        id: Option<ConnectionId>,
    ) -> Result<ConnectionRecord, VaultError> {
        let (mut record, secrets) = self.connection_seal(&new, id).await?;
        let stored = match self.store().connection_upsert(&record, &secrets).await {
            // A rotation made another version primary meanwhile: wrap again.
            Err(VaultError::KeyVersionChanged(_)) => {
                let (again, secrets) = self.connection_seal(&new, Some(record.id)).await?;
                record = again;
                self.store().connection_upsert(&record, &secrets).await
            }
            other => other,
        };
        stored?;
        self.reader.forget(&record.id);
        self.keys().forget_connection(&record.id);
        if let Some(current) = self.store().connection_get(&record.id).await? {
            record = current;
        }
        Ok(record)
    }

    /// Stores many new connections in one transaction (bulk import of tokens
    /// from a previous system, and seeding for tests and benchmarks). Each
    /// gets its own DEK; none may collide with a live connection.
    pub async fn connection_import(
        &self,
        batch: Vec<NewConnection>,
    ) -> Result<Vec<ConnectionRecord>, VaultError> {
        let mut rows = Vec::with_capacity(batch.len());
        for new in &batch {
            rows.push(self.connection_seal(new, None).await?);
        }
        self.store().connection_import(&rows).await?;
        Ok(rows.into_iter().map(|(c, _)| c).collect())
    }

    /// Mints the record and seals the tokens under a fresh DEK.
    async fn connection_seal(
        &self,
        new: &NewConnection,
        id: Option<ConnectionId>,
    ) -> Result<(ConnectionRecord, SecretsRecord), VaultError> {
        let now = Timestamp::now();
        let record = ConnectionRecord {
            id: id.unwrap_or_else(ConnectionId::generate),
            tenant: new.tenant.clone(),
            account: new.account.clone(),
            integration: new.integration,
            google_subject: Some(new.google_subject.clone()),
            google_email: Some(new.google_email.clone()),
            granted_scopes: new.granted_scopes.clone(),
            status: new.status,
            status_reason: match new.status {
                ConnectionStatus::ConsentRequired => Some("no_refresh_token".to_owned()),
                ConnectionStatus::InsufficientScope => Some("insufficient_scope".to_owned()),
                _ => None,
            },
            created_at: now,
            updated_at: now,
            deleted_at: None,
            health: RefreshHealth {
                last_refresh_at: Some(now),
                next_check_at: Some(self.next_refresh_check(now)),
                ..RefreshHealth::default()
            },
        };
        let cipher = self.keys().new_connection_cipher(&record).await?;
        let access = cipher.seal(TokenKind::Access, new.access_token.expose().as_bytes())?;
        let refresh = match &new.refresh_token {
            Some(t) => Some(cipher.seal(TokenKind::Refresh, t.expose().as_bytes())?),
            None => None,
        };
        let wrapped = cipher.wrapped();
        let secrets = SecretsRecord {
            connection_id: record.id.clone(),
            kek_version: wrapped.kek_version,
            wrapped_dek: wrapped.bytes.clone(),
            access_token: Some(access),
            access_expires_at: Some(new.access_expires_at),
            refresh_token: refresh,
            updated_at: now,
        };
        Ok((record, secrets))
    }

    /// Opens one of a connection's sealed tokens (`sealed` is a field of
    /// `secrets`) with the connection's cipher.
    pub(super) async fn token_open(
        &self,
        connection: &ConnectionRecord,
        secrets: &SecretsRecord,
        kind: TokenKind,
        sealed: &[u8],
    ) -> Result<SecretString, VaultError> {
        self.keys()
            .connection_cipher(connection, secrets)
            .await?
            .open(kind, sealed)
    }

    /// One page of connections matching `filter`, each with what an
    /// administrator sees beside it. The filter is applied in the query, so
    /// a page is short only when it is the last.
    ///
    /// With `count_leases`, each counts its open leases (an administrator's
    /// view: a scan of the open-lease window per connection).
    pub async fn connection_details(
        &self,
        filter: &crate::store::ConnectionFilter,
        page: &crate::store::PageRequest,
        count_leases: bool,
    ) -> Result<Vec<crate::store::ConnectionDetailRecord>, VaultError> {
        self.store()
            .connection_details(filter, page, count_leases.then(|| self.open_lease_window()))
            .await
    }

    /// One connection by id, tombstones included, with what an
    /// administrator sees beside it.
    pub async fn connection_detail(
        &self,
        id: &ConnectionId,
        count_leases: bool,
    ) -> Result<crate::store::ConnectionDetailRecord, VaultError> {
        self.store()
            .connection_detail(id, count_leases.then(|| self.open_lease_window()))
            .await?
            .ok_or_else(|| VaultError::not_found("connection", id))
    }

    /// One connection by id.
    pub async fn connection_get(&self, id: &ConnectionId) -> Result<ConnectionRecord, VaultError> {
        self.store()
            .connection_get(id)
            .await?
            .ok_or_else(|| VaultError::not_found("connection", id))
    }

    /// Opens a live connection's access token: unwraps its DEK and opens the
    /// sealed token. Decryption failures surface as `VaultError::Crypto` and
    /// change nothing.
    pub async fn access_token_open(&self, id: &ConnectionId) -> Result<OpenedToken, VaultError> {
        let connection = self.connection_get(id).await?;
        let secrets = self.store().secrets_get(id).await?.ok_or_else(|| {
            VaultError::precondition(format!(
                "connection {id} holds no tokens ({})",
                connection.status
            ))
        })?;
        let sealed = secrets.access_token.as_deref().ok_or_else(|| {
            VaultError::precondition(format!("connection {id} holds no access token"))
        })?;
        let access_token = self
            .token_open(&connection, &secrets, TokenKind::Access, sealed)
            .await?;
        Ok(OpenedToken {
            connection,
            access_token,
            expires_at: secrets.access_expires_at,
        })
    }
}
