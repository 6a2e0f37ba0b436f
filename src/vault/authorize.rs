//! Connecting a Google account: `BeginAuthorization` builds Google's URL
//! (code flow, offline access, PKCE S256, a single-use state stored hashed and
//! bound to tenant, account, integration and caller); completion — from the
//! OAuth callback or `CompleteAuthorization` — consumes (deletes) the state,
//! exchanges the code, verifies the id_token and stores only the scopes
//! Google granted.
//!
//! Pending states are bounded: a caller may begin at most
//! `google.max_states_per_caller_per_minute` authorizations a minute on one
//! replica (beyond it: RESOURCE_EXHAUSTED, audited, nothing stored), and holds
//! at most `google.max_pending_states` unexpired states per (tenant, account):
//! beginning one more evicts the oldest rather than refusing, so the tab a
//! user opened last always works, and storage stays bounded either way.

use std::time::Duration;

use oauth2::{PkceCodeChallenge, PkceCodeVerifier};

use crate::audit::{Actor, Outcome};
use crate::crypto::{MacPurpose, SecretString, TokenKind, WrappedDek, random_token};
use crate::domain::{
    AccountId, ConnectionStatus, ErrorReason, Integration, ScopeSet, TenantId, Timestamp,
    VaultError, excerpt,
};
use crate::store::{AuthzConsume, AuthzStateRecord, ConnectionRecord};

use super::keys::KeyContext;
use super::rate::retry_seconds;
use super::{NewConnection, Vault};

/// How long a state stays valid.
pub const STATE_TTL: Duration = Duration::from_secs(600);

/// How the refusal of an id_token that does not verify begins (a
/// FAILED_PRECONDITION: retrying cannot help).
pub const ID_TOKEN_REFUSED: &str = "Google's sign-in could not be verified (id_token)";

/// What `BeginAuthorization` returns.
pub struct BeginOutcome {
    /// Google's authorization URL (contains the state: treat as sensitive).
    pub url: String,
    /// When the state expires.
    pub expires_at: Timestamp,
}

/// How Google's redirect came back.
pub enum Completion {
    /// The authorization code.
    Code(SecretString),
    /// Google's error (`access_denied`, …) and description.
    Error(String, String),
}

/// Who completes an authorization.
pub enum Completer<'a> {
    /// The product backend via `CompleteAuthorization`: must be the caller
    /// that began it; tenant and account, when given, must match.
    Caller {
        /// The caller.
        actor: &'a Actor,
        /// Tenant the caller expects.
        tenant: Option<&'a TenantId>,
        /// Account the caller expects.
        account: Option<&'a AccountId>,
    },
    /// Google's redirect to `GET /oauth/callback`: the state is the capability.
    Browser,
}

impl Vault {
    /// The scopes requested for an integration: its configured set plus `openid email`.
    pub fn requested_scopes(&self, integration: Integration) -> Vec<String> {
        let mut scopes = vec!["openid".to_owned(), "email".to_owned()];
        scopes.extend(self.required_scopes(integration).to_strings());
        scopes
    }

    /// The scopes an integration requires.
    pub fn required_scopes(&self, integration: Integration) -> ScopeSet {
        let list = match integration {
            Integration::Calendar => &self.settings.google.calendar_scopes,
            Integration::Email => &self.settings.google.email_scopes,
        };
        // Validated with the rest of the configuration.
        ScopeSet::parse(list.iter().map(String::as_str)).unwrap_or_default()
    }

    /// Starts connecting a Google account.
    #[tracing::instrument(
        name = "authorization_begin",
        skip_all,
        fields(tenant = %tenant, account = %account, integration = %integration)
    )]
    pub async fn authorization_begin(
        &self,
        actor: &Actor,
        tenant: TenantId,
        account: AccountId,
        integration: Integration,
        login_hint: Option<&str>,
    ) -> Result<BeginOutcome, VaultError> {
        let google = self.google()?;
        let target = format!("{tenant}/{account}");
        if let Err(wait) = self.begin_rate.take(&actor.identity) {
            let per_minute = self.begin_rate.per_minute();
            metrics::counter!("tokenvault_oauth_begin_limited_total", "limit" => "caller_rate")
                .increment(1);
            self.audit()
                .record(
                    actor,
                    "oauth.begin",
                    &target,
                    Outcome::Denied,
                    format!(
                        "integration={integration} refused: more than {per_minute} \
                         authorizations a minute by this caller (google.max_states_per_caller_per_minute)"
                    ),
                )
                .await?;
            return Err(VaultError::ResourceExhausted(
                format!(
                    "too many authorizations started by {}; retry in {} s",
                    excerpt(&actor.identity),
                    retry_seconds(wait)
                )
                .into(),
            )
            .because(ErrorReason::RateLimited));
        }
        let state = random_token(32)?;
        let state_hash = self
            .keyring()
            .mac(MacPurpose::StateHash, state.expose().as_bytes())
            .to_vec();
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let verifier = SecretString::new(verifier.secret().to_owned());
        // Google shows consent — and issues a refresh token — only on a first
        // consent, for new scopes, or when asked. Ask whenever the connection
        // being made would otherwise hold no refresh token.
        let prompt_consent = !self
            .store()
            .refresh_token_held(&tenant, &account, integration, login_hint)
            .await?;
        self.audit()
            .record(
                actor,
                "oauth.begin",
                &target,
                Outcome::Ok,
                format!("integration={integration} prompt_consent={prompt_consent}"),
            )
            .await?;
        let max_pending = self.settings.google.max_pending_states;
        let mut retried = false;
        let (record, evicted) = loop {
            let owner = KeyContext::oauth_state(tenant.as_str(), account.as_str(), &state_hash);
            let cipher = self.keys().new_cipher(owner).await?;
            let sealed_verifier =
                cipher.seal(TokenKind::PkceVerifier, verifier.expose().as_bytes())?;
            let wrapped = cipher.wrapped();
            let now = Timestamp::now();
            let record = AuthzStateRecord {
                state_hash: state_hash.clone(),
                tenant: tenant.clone(),
                account: account.clone(),
                integration,
                caller: actor.identity.clone(),
                kek_version: wrapped.kek_version,
                wrapped_dek: wrapped.bytes.clone(),
                sealed_verifier,
                created_at: now,
                expires_at: now.plus(STATE_TTL),
            };
            match self.store().authz_insert(&record, max_pending).await {
                // A rotation made another version primary meanwhile: wrap again.
                Err(VaultError::KeyVersionChanged(_)) if !retried => retried = true,
                stored => break (record, stored?),
            }
        };
        if evicted > 0 {
            // The begin itself was audited before anything was stored; this
            // records what it displaced. Should this entry fail, the caller
            // never receives the new state (stored only hashed, so unusable).
            metrics::counter!("tokenvault_oauth_begin_limited_total", "limit" => "pending_states")
                .increment(evicted);
            self.audit()
                .record(
                    actor,
                    "oauth.evict",
                    &target,
                    Outcome::Ok,
                    format!(
                        "integration={integration} evicted={evicted} oldest pending states of this \
                         caller (google.max_pending_states={max_pending})"
                    ),
                )
                .await?;
        }
        let url = google.authorization_url(
            &self.requested_scopes(integration),
            state.expose(),
            challenge,
            login_hint,
            prompt_consent,
        );
        Ok(BeginOutcome {
            url,
            expires_at: record.expires_at,
        })
    }

    /// Completes an authorization. Every refusal is audited and stores nothing.
    /// (The span records nothing of the request: its state and code are secrets.)
    #[tracing::instrument(name = "authorization_complete", skip_all)]
    pub async fn authorization_complete(
        &self,
        completer: Completer<'_>,
        state: &str,
        completion: Completion,
    ) -> Result<ConnectionRecord, VaultError> {
        let google = self.google()?;
        let audit_actor = match &completer {
            Completer::Caller { actor, .. } => (*actor).clone(),
            Completer::Browser => Actor {
                identity: "browser".to_owned(),
                role: "oauth-callback".to_owned(),
            },
        };
        let refuse = |target: String, detail: String, err: VaultError| {
            let audit = self.audit().clone();
            let actor = audit_actor.clone();
            async move {
                audit
                    .record(&actor, "oauth.complete", &target, Outcome::Failed, detail)
                    .await?;
                Err::<ConnectionRecord, VaultError>(err)
            }
        };
        let bad_state = || VaultError::invalid("state", "unknown, expired or already used");
        if state.is_empty() || state.len() > crate::limits::MAX_STATE_BYTES {
            return refuse("-".into(), "malformed state".into(), bad_state()).await;
        }
        let state_hash = self
            .keyring()
            .mac(MacPurpose::StateHash, state.as_bytes())
            .to_vec();
        let now = Timestamp::now();
        let rec = match self.store().authz_consume(&state_hash).await? {
            AuthzConsume::Consumed(rec) => rec,
            // A used state is deleted: a replay reads as a state never issued.
            AuthzConsume::Unknown => {
                return refuse(
                    "-".into(),
                    "unknown state (never issued, already used, evicted or expired)".into(),
                    bad_state(),
                )
                .await;
            }
        };
        let target = format!("{}/{}", rec.tenant, rec.account);
        if rec.expires_at < now {
            return refuse(target, "state expired".into(), bad_state()).await;
        }
        if let Completer::Caller {
            actor,
            tenant,
            account,
        } = &completer
        {
            let mismatch = actor.identity != rec.caller
                || tenant.is_some_and(|t| *t != rec.tenant)
                || account.is_some_and(|a| *a != rec.account);
            if mismatch {
                return refuse(
                    target,
                    "state bound to another caller, tenant or account".into(),
                    bad_state(),
                )
                .await;
            }
        }
        let code = match completion {
            Completion::Code(code) if !code.is_empty() => code,
            Completion::Code(_) => {
                return refuse(
                    target,
                    "missing code".into(),
                    VaultError::missing("code", "missing"),
                )
                .await;
            }
            Completion::Error(error, _) => {
                let error: String = error
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(64)
                    .collect();
                return refuse(
                    target,
                    format!("google error {error}"),
                    VaultError::precondition(format!(
                        "Google returned {error}; nothing was connected"
                    ))
                    .because(ErrorReason::AuthorizationFailed),
                )
                .await;
            }
        };

        // Open the PKCE verifier sealed at begin.
        let owner =
            KeyContext::oauth_state(rec.tenant.as_str(), rec.account.as_str(), &rec.state_hash);
        let wrapped = WrappedDek {
            kek_version: rec.kek_version,
            bytes: rec.wrapped_dek.clone(),
        };
        let verifier = self
            .keys()
            .open_cipher(owner, wrapped)
            .await?
            .open(TokenKind::PkceVerifier, &rec.sealed_verifier)?;
        let verifier = PkceCodeVerifier::new(verifier.expose().to_owned());

        let grant = match google.exchange_code(code.expose(), verifier.secret()).await {
            Ok(g) => g,
            Err(crate::google::GoogleError::InvalidGrant) => {
                return refuse(
                    target,
                    "code rejected by Google (invalid_grant)".into(),
                    VaultError::invalid("code", "Google rejected the authorization code"),
                )
                .await;
            }
            Err(e) if e.retryable() => {
                return refuse(
                    target,
                    format!("exchange failed: {e}"),
                    VaultError::Unavailable(e.to_string().into())
                        .because(ErrorReason::GoogleUnavailable),
                )
                .await;
            }
            Err(e) => {
                return refuse(
                    target,
                    format!("exchange refused: {e}"),
                    VaultError::precondition(e.to_string())
                        .because(ErrorReason::AuthorizationFailed),
                )
                .await;
            }
        };
        // A missing or unverifiable id_token will not verify on a retry, and
        // the state is spent: the answer says so (only Google's signing keys
        // being unreachable is worth trying again later).
        let Some(id_token) = grant.id_token.as_deref() else {
            return refuse(
                target,
                "no id_token".into(),
                VaultError::precondition(format!(
                    "{ID_TOKEN_REFUSED}: Google sent no id_token; nothing was connected; begin the authorization again"
                ))
                .because(ErrorReason::AuthorizationFailed),
            )
            .await;
        };
        let claims = match google.verify_id_token(id_token).await {
            Ok(c) => c,
            Err(e @ crate::google::JwtError::Jwks(_)) => {
                return refuse(
                    target,
                    format!("id_token not checked: {e}"),
                    VaultError::Unavailable(
                        format!("Google's signing keys are unavailable ({e}); nothing was connected; begin the authorization again later").into(),
                    )
                    .because(ErrorReason::GoogleUnavailable),
                )
                .await;
            }
            Err(e) => {
                return refuse(
                    target,
                    format!("id_token refused: {e}"),
                    VaultError::precondition(format!(
                        "{ID_TOKEN_REFUSED}: {e}; nothing was connected; begin the authorization again"
                    ))
                    .because(ErrorReason::AuthorizationFailed),
                )
                .await;
            }
        };
        let granted = match &grant.scope {
            Some(s) => ScopeSet::parse_spaced(s)?,
            None => ScopeSet::parse(
                self.requested_scopes(rec.integration)
                    .iter()
                    .map(String::as_str),
            )?,
        };
        let required = self.required_scopes(rec.integration);
        let status = if granted.covers(&required) {
            ConnectionStatus::Active
        } else {
            ConnectionStatus::InsufficientScope
        };
        // Reconnecting the same Google account keeps the connection (and the
        // refresh token, when Google sends no new one).
        let live = self
            .store()
            .connection_live(&rec.tenant, &rec.account, rec.integration)
            .await?;
        let (existing, replaced) = match live {
            Some(c) if c.google_subject.as_deref() == Some(claims.subject.as_str()) => {
                (Some(c), None)
            }
            // Its tokens are gone already; storing the new connection retires it.
            Some(c) if c.status == ConnectionStatus::RevokedUpstream => (None, None),
            other => (None, other),
        };
        let refresh_token = match (grant.refresh_token, &existing) {
            (Some(t), _) => Some(t),
            (None, Some(c)) => self.refresh_token_open(c).await?,
            (None, None) => None,
        };
        // Without a refresh token the connection would fail at its first
        // refresh: it waits for the user to connect again, which asks Google
        // for consent (see `authorization_begin`).
        let status = if refresh_token.is_none() && status == ConnectionStatus::Active {
            ConnectionStatus::ConsentRequired
        } else {
            status
        };
        self.audit()
            .record(
                &audit_actor,
                "oauth.complete",
                &target,
                Outcome::Ok,
                format!(
                    "integration={} status={status} scopes={} refresh_token={}",
                    rec.integration,
                    granted.to_spaced(),
                    refresh_token.is_some()
                ),
            )
            .await?;
        if let Some(old) = replaced {
            // Another Google account takes this integration's place: the old
            // connection goes through the whole deletion cascade (tokens,
            // leases, events, receipt, revocation at Google if it was the
            // last connection on that account).
            self.delete(
                &audit_actor,
                crate::store::DeletionTarget::Connection(old.id.clone()),
                crate::domain::DeletionReason::UserDisconnected,
                "replaced by another Google account",
            )
            .await?;
        }
        let new = NewConnection {
            tenant: rec.tenant,
            account: rec.account,
            integration: rec.integration,
            google_subject: claims.subject,
            google_email: claims.email,
            granted_scopes: granted,
            status,
            access_token: grant.access_token,
            access_expires_at: grant.expires_at,
            refresh_token,
        };
        self.connection_store_as(new, existing.map(|c| c.id)).await
    }

    /// Opens a live connection's refresh token.
    pub(super) async fn refresh_token_open(
        &self,
        connection: &ConnectionRecord,
    ) -> Result<Option<SecretString>, VaultError> {
        let Some(secrets) = self.store().secrets_get(&connection.id).await? else {
            return Ok(None);
        };
        let Some(sealed) = secrets.refresh_token.as_deref() else {
            return Ok(None);
        };
        let token = self
            .token_open(connection, &secrets, TokenKind::Refresh, sealed)
            .await?;
        Ok(Some(token))
    }
}
