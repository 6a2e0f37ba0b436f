//! The lease token path: find the connection, check it is ACTIVE and that
//! Google granted the requested scopes, open its access token, refresh it
//! when it would not stay valid long enough, and hand it out for at most the
//! token's remaining life (and the configured maximum).
//!
//! Refresh is single-flight per connection: inside a process concurrent
//! leases queue on one gate, and across replicas the first to take the
//! database lock row (with a fencing token) calls Google while the others
//! wait for its result. A failed refresh never loses or overwrites the
//! stored refresh token; `invalid_grant` marks the connection
//! REVOKED_UPSTREAM and destroys its tokens.
//!
//! Longer than most modules on purpose: the lease path (batched read, policy,
//! refresh on demand, batched audit append) is one use case, read top to
//! bottom; its storage side is `store::leases`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ring::rand::SecureRandom as _;

use crate::audit::{Actor, LeaseRecorded, Outcome};
use crate::crypto::{SecretString, TokenKind, fingerprint};
use crate::domain::{
    ConnectionId, ConnectionStatus, DeletionReason, ErrorReason, LeaseId, Purpose, ScopeSet,
    TenantId, Timestamp, VaultError, scope_list,
};
use crate::google::GoogleError;
use crate::policy::{LeaseAsk, Policy};
use crate::store::{
    ConnectionRecord, DeletionTarget, LeaseGrant, LeaseRecord, RefreshedTokens, SecretsRecord,
    lease_grant_detail,
};

use super::Vault;

/// How often a waiter looks for another replica's refresh result.
const REFRESH_POLL: Duration = Duration::from_millis(25);

/// How long a refresh lock lasts unless its holder renews it: a holder that
/// died (crash, SIGKILL, partition) loses the lock this long after its last
/// renewal, and a waiter on any replica then takes over with a higher fence.
pub const REFRESH_LOCK_TTL: Duration = Duration::from_secs(3);

/// How often a live holder renews its refresh lock while it talks to Google.
const REFRESH_LOCK_RENEW: Duration = Duration::from_secs(1);

/// A lease request, parsed.
#[derive(Debug)]
pub struct LeaseRequest {
    /// The connection.
    pub connection: ConnectionId,
    /// The stated purpose.
    pub purpose: Purpose,
    /// The scopes the worker needs.
    pub scopes: ScopeSet,
    /// The token must stay valid at least this long.
    pub min_valid: Duration,
    /// When the caller stops waiting.
    pub deadline: Instant,
}

/// A granted lease.
#[derive(Debug)]
pub struct Lease {
    /// Lease id.
    pub lease_id: LeaseId,
    /// The access token.
    pub access_token: SecretString,
    /// When the token expires.
    pub token_expires_at: Timestamp,
    /// When the lease ends.
    pub lease_expires_at: Timestamp,
    /// The scopes leased.
    pub scopes: ScopeSet,
}

/// A refused lease: the error the caller gets and, for the audit log only,
/// what the caller is not told.
struct Refusal {
    /// What the caller gets.
    error: VaultError,
    /// The tenant of a connection that exists but that the caller may not
    /// see; the caller was told NOT_FOUND, as for an id that does not exist.
    foreign_tenant: Option<TenantId>,
}

impl From<VaultError> for Refusal {
    fn from(error: VaultError) -> Self {
        Self {
            error,
            foreign_tenant: None,
        }
    }
}

/// The task renewing a refresh lock; dropping it stops the renewal, however
/// the refresh ends (a caller that gives up drops the refresh mid-call).
pub(super) struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per-connection refresh gates of this process.
#[derive(Default)]
pub(super) struct RefreshGates {
    gates: Mutex<HashMap<ConnectionId, Weak<tokio::sync::Mutex<()>>>>,
}

impl RefreshGates {
    fn gate(&self, id: &ConnectionId) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map only means another thread panicked mid-insert; the map is still usable.
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = gates.get(id).and_then(Weak::upgrade) {
            return g;
        }
        if gates.len() > 1024 {
            gates.retain(|_, w| w.strong_count() > 0);
        }
        let g = Arc::new(tokio::sync::Mutex::new(()));
        gates.insert(id.clone(), Arc::downgrade(&g));
        g
    }
}

/// The sealed access token and its expiry, when the secrets hold both.
fn sealed_access(secrets: &SecretsRecord) -> Option<(&[u8], Timestamp)> {
    Some((secrets.access_token.as_deref()?, secrets.access_expires_at?))
}

pub(super) fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 4];
    let _ = crate::crypto::rng().fill(&mut b);
    let frac = f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX);
    max.mul_f64(frac)
}

impl Vault {
    /// Leases a connection's access token, if `policy` grants it to `actor`.
    /// Every grant and every denial is audited; if the audit entry cannot be
    /// written the caller gets no token.
    ///
    /// A caller limited to some tenants ([`crate::policy::TenantScope`]) is
    /// answered for a connection of another tenant exactly as for an id that
    /// does not exist: NOT_FOUND, `connection <id> not found`, decided before
    /// any other check of the connection, the same metric label
    /// (`reason=not_found`) and the same audit entry (`lease.deny`, outcome
    /// `denied` — a limited caller's unknown id is recorded as a denial too —
    /// detail `reason=not_found: connection <id> not found`). Only reviewers
    /// reading the audit log see the difference: the foreign connection's
    /// entry ends by naming the tenant it is in.
    #[tracing::instrument(
        name = "lease",
        skip_all,
        fields(connection = %req.connection, purpose = %req.purpose, caller = %actor.identity)
    )]
    pub async fn lease_token(
        &self,
        actor: &Actor,
        policy: &Policy,
        req: LeaseRequest,
    ) -> Result<Lease, VaultError> {
        let started = Instant::now();
        let (result, foreign_tenant) = match self.lease_token_inner(actor, policy, &req).await {
            Ok(lease) => (Ok(lease), None),
            Err(refusal) => (Err(refusal.error), refusal.foreign_tenant),
        };
        let purpose = req.purpose.to_string();
        metrics::histogram!("tokenvault_lease_seconds").record(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                metrics::counter!("tokenvault_lease_grants_total", "purpose" => purpose)
                    .increment(1);
            }
            Err(VaultError::AuditUnavailable(_)) => {
                metrics::counter!("tokenvault_lease_denials_total", "purpose" => purpose, "reason" => "audit_unavailable")
                    .increment(1);
            }
            Err(e) => {
                let limited = policy.tenant_scope(&actor.identity).is_limited();
                let (reason, outcome) = match e {
                    VaultError::PermissionDenied(_) => ("policy", Outcome::Denied),
                    VaultError::FailedPrecondition(_) => ("precondition", Outcome::Failed),
                    // Missing or in another tenant: one entry shape for both.
                    VaultError::NotFound { .. } if limited => ("not_found", Outcome::Denied),
                    VaultError::NotFound { .. } => ("not_found", Outcome::Failed),
                    VaultError::InvalidArgument { .. } => ("invalid", Outcome::Failed),
                    VaultError::Unavailable(_) => ("unavailable", Outcome::Failed),
                    _ => ("other", Outcome::Failed),
                };
                metrics::counter!("tokenvault_lease_denials_total", "purpose" => purpose.clone(), "reason" => reason)
                    .increment(1);
                // The scopes asked for may be anything a worker sent: name a
                // few, count the rest, so that a denial's entry stays small.
                let scopes = scope_list(req.scopes.iter());
                let mut detail = format!("purpose={purpose} scopes={scopes} reason={reason}: {e}");
                if let Some(tenant) = &foreign_tenant {
                    detail.push_str(&format!(
                        " (for reviewers: it exists in tenant {tenant}, outside the caller's tenants)"
                    ));
                }
                self.audit()
                    .record(
                        actor,
                        "lease.deny",
                        req.connection.as_str(),
                        outcome,
                        detail,
                    )
                    .await?;
            }
        }
        result
    }

    async fn lease_token_inner(
        &self,
        actor: &Actor,
        policy: &Policy,
        req: &LeaseRequest,
    ) -> Result<Lease, Refusal> {
        if req.scopes.is_empty() {
            return Err(VaultError::missing("scopes", "name at least one scope").into());
        }
        if !policy.allows_purpose(&actor.identity, &req.purpose) {
            return Err(VaultError::PermissionDenied(
                format!(
                    "the policy does not allow {} the purpose {:?}",
                    actor.identity,
                    req.purpose.as_str()
                )
                .into(),
            )
            .because(ErrorReason::PurposeNotAllowed)
            .into());
        }
        // A cached record may be out of date; the store records no lease on a
        // connection that changed since it was read, and then one read from
        // the database decides.
        if let Some(lease) = self.lease_attempt(actor, policy, req, false).await? {
            return Ok(lease);
        }
        self.lease_attempt(actor, policy, req, true)
            .await?
            .ok_or_else(|| {
                Refusal::from(
                    VaultError::precondition(format!(
                        "connection {} was deleted, suspended or changed while the lease was being granted",
                        req.connection
                    ))
                    .because(ErrorReason::ConnectionChanged),
                )
            })
    }

    /// One try at a lease, from the cache unless `fresh`. `None` when a
    /// cached record may be out of date: it lacks a requested scope, its DEK
    /// no longer opens, or the store refused the lease because the
    /// connection changed since (the grant entry is then in the audit log,
    /// followed by a `lease.void` entry saying it did not take).
    async fn lease_attempt(
        &self,
        actor: &Actor,
        policy: &Policy,
        req: &LeaseRequest,
        fresh: bool,
    ) -> Result<Option<Lease>, Refusal> {
        let read_started = Instant::now();
        let found = self.reader.get(&req.connection, fresh).await;
        metrics::histogram!("tokenvault_lease_stage_seconds", "stage" => "read")
            .record(read_started.elapsed().as_secs_f64());
        let read = found?.ok_or_else(|| VaultError::not_found("connection", &req.connection))?;
        let conn: &ConnectionRecord = &read.conn;
        // Before any check that could tell them apart (integration, status,
        // scopes): a connection in a tenant the caller may not see is
        // answered exactly as a missing one, with the error built the same
        // way from the id the caller sent.
        if !policy
            .tenant_scope(&actor.identity)
            .sees(Some(&conn.tenant))
        {
            return Err(Refusal {
                error: VaultError::not_found("connection", &req.connection),
                foreign_tenant: Some(conn.tenant.clone()),
            });
        }
        policy
            .check_lease(
                &actor.identity,
                &LeaseAsk {
                    purpose: &req.purpose,
                    integration: conn.integration,
                    tenant: &conn.tenant,
                    scopes: &req.scopes,
                },
            )
            // The purpose was checked above: what is left is the purpose's
            // rule (integration, tenant, scopes), which the policy reports as
            // one string, so one reason.
            .map_err(|why| {
                VaultError::PermissionDenied(why.into()).because(ErrorReason::PolicyDenied)
            })?;
        if conn.status != ConnectionStatus::Active {
            return Err(VaultError::precondition(format!(
                "connection {} is {}; it cannot be leased",
                conn.id, conn.status
            ))
            .because(ErrorReason::unusable(conn.status))
            .into());
        }
        if !conn.granted_scopes.covers(&req.scopes) {
            if read.cached {
                // The user may have granted more since it was cached.
                self.reader.forget(&conn.id);
                return Ok(None);
            }
            let missing = scope_list(conn.granted_scopes.missing_from(&req.scopes));
            return Err(VaultError::precondition(format!(
                "Google did not grant {missing} for connection {}",
                conn.id
            ))
            .because(ErrorReason::ScopeNotGranted)
            .into());
        }
        let want = Timestamp::now().plus(req.min_valid);
        // The common case: the token read with the connection is fresh enough.
        let stored = match read
            .secrets
            .as_ref()
            .and_then(|s| Some((s, sealed_access(s)?)))
        {
            Some((secrets, (sealed, expires))) if expires >= want => {
                match self
                    .token_open(conn, secrets, TokenKind::Access, sealed)
                    .await
                {
                    Ok(token) => Some((token, expires)),
                    // E.g. its KEK version was destroyed after a rotation
                    // rewrapped the DEK: read it again.
                    Err(_) if read.cached => {
                        self.reader.forget(&conn.id);
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => None,
        };
        let (token, expires_at) = match stored {
            Some(found) => found,
            None => {
                // Refreshed (here or elsewhere): the next lease reads it anew.
                self.reader.forget(&conn.id);
                self.fresh_access_token(conn, want, req.deadline, u32::MAX)
                    .await?
            }
        };
        let now = Timestamp::now();
        let max = now.plus(Duration::from_secs(self.settings.lease.max_ttl_seconds));
        let lease = Lease {
            lease_id: LeaseId::generate(),
            token_expires_at: expires_at,
            lease_expires_at: expires_at.min(max),
            scopes: req.scopes.clone(),
            access_token: token,
        };
        let fp = fingerprint(
            self.keyring().as_ref(),
            lease.access_token.expose().as_bytes(),
        );
        let scopes = lease.scopes.to_spaced();
        let detail = lease_grant_detail(&lease.lease_id, req.purpose.as_str(), &scopes, &fp);
        let grant = LeaseGrant {
            lease: LeaseRecord {
                lease_id: lease.lease_id.clone(),
                connection_id: conn.id.clone(),
                caller: actor.identity.clone(),
                expires_at: lease.lease_expires_at,
                revoked_at: None,
                revoke_reason: None,
            },
            connection_version: conn.updated_at,
            purpose: req.purpose.as_str().to_owned(),
            scopes,
            token: fp,
            entry: 0,
        };
        let audit_started = Instant::now();
        let recorded = self
            .audit()
            .record_lease(actor, conn.id.as_str(), detail, grant)
            .await;
        metrics::histogram!("tokenvault_lease_stage_seconds", "stage" => "audit")
            .record(audit_started.elapsed().as_secs_f64());
        match recorded? {
            LeaseRecorded::Granted(_) => Ok(Some(lease)),
            LeaseRecorded::Void if read.cached => {
                // The grant entry is in the log; say that it did not take.
                self.reader.forget(&conn.id);
                metrics::counter!("tokenvault_lease_cache_total", "result" => "stale").increment(1);
                self.audit()
                    .record(
                        actor,
                        "lease.void",
                        conn.id.as_str(),
                        Outcome::Failed,
                        format!(
                            "lease={} not recorded: the connection changed after it was read; reading it again",
                            lease.lease_id
                        ),
                    )
                    .await?;
                Ok(None)
            }
            LeaseRecorded::Void => Ok(None),
        }
    }

    /// Ends a lease early. Only its holder may release it; releasing an
    /// ended lease succeeds and says when it ended.
    #[tracing::instrument(name = "lease_release", skip_all, fields(lease = %id))]
    pub async fn lease_release(
        &self,
        actor: &Actor,
        id: &LeaseId,
    ) -> Result<Timestamp, VaultError> {
        let lease = self
            .store()
            .lease_get(id)
            .await?
            .ok_or_else(|| VaultError::not_found("lease", id))?;
        if lease.caller != actor.identity {
            self.audit()
                .record(
                    actor,
                    "lease.release",
                    id.as_str(),
                    Outcome::Denied,
                    format!("held by {}", lease.caller),
                )
                .await?;
            return Err(VaultError::PermissionDenied(
                format!("lease {id} belongs to another identity").into(),
            )
            .because(ErrorReason::LeaseNotOwned));
        }
        self.audit()
            .record(actor, "lease.release", id.as_str(), Outcome::Ok, "")
            .await?;
        self.store()
            .lease_release(id, Timestamp::now())
            .await?
            .ok_or_else(|| VaultError::not_found("lease", id))
    }

    /// Opens the stored access token and its expiry.
    async fn access_open(
        &self,
        conn: &ConnectionRecord,
    ) -> Result<Option<(SecretString, Timestamp, Timestamp)>, VaultError> {
        let Some(secrets) = self.store().secrets_get(&conn.id).await? else {
            return Ok(None);
        };
        let Some((sealed, expires)) = sealed_access(&secrets) else {
            return Ok(None);
        };
        let token = self
            .token_open(conn, &secrets, TokenKind::Access, sealed)
            .await?;
        Ok(Some((token, expires, secrets.updated_at)))
    }

    /// An access token valid until at least `want`, refreshing (once,
    /// across every caller and replica) when the stored one is not.
    #[tracing::instrument(
        name = "refresh",
        level = "debug",
        skip_all,
        fields(connection = %conn.id)
    )]
    pub(super) async fn fresh_access_token(
        &self,
        conn: &ConnectionRecord,
        want: Timestamp,
        deadline: Instant,
        max_attempts: u32,
    ) -> Result<(SecretString, Timestamp), VaultError> {
        let started = Timestamp::now();
        // A stored token is usable when it is fresh enough or was refreshed
        // after this call began (by whoever got there first).
        let usable = |expires: Timestamp, updated: Timestamp| expires >= want || updated > started;
        let gate = self.refresh_gates.gate(&conn.id);
        let _turn = tokio::time::timeout_at(deadline.into(), gate.lock())
            .await
            .map_err(|_| {
                VaultError::Unavailable("token refresh did not finish within the deadline".into())
                    .because(ErrorReason::GoogleUnavailable)
            })?;
        loop {
            match self.access_open(conn).await? {
                // Refreshed by someone else while we waited: take their result.
                Some((token, expires, updated)) if usable(expires, updated) => {
                    return Ok((token, expires));
                }
                Some(_) => {}
                None => {
                    let now = self.connection_get(&conn.id).await?;
                    return Err(VaultError::precondition(format!(
                        "connection {} is {}; it cannot be leased",
                        conn.id, now.status
                    ))
                    .because(ErrorReason::unusable(now.status)));
                }
            }
            // Lock times are the database's, not this host's: replicas' clocks may differ.
            let now = self.store().clock().await?;
            if let Some(fence) = self
                .store()
                .refresh_lock_acquire(&conn.id, &self.instance_id, now, now.plus(REFRESH_LOCK_TTL))
                .await?
            {
                let renewal = self.renew_refresh_lock(&conn.id, fence);
                // Another replica may have stored its refresh between our read
                // above and taking the lock: look again before calling Google.
                let result = match self.access_open(conn).await {
                    Ok(Some((token, expires, updated))) if usable(expires, updated) => {
                        Ok((token, expires))
                    }
                    Ok(_) => {
                        self.refresh_holding(conn, fence, deadline, max_attempts)
                            .await
                    }
                    Err(e) => Err(e),
                };
                drop(renewal);
                if !matches!(result, Err(VaultError::FailedPrecondition(_))) {
                    self.store()
                        .refresh_lock_release(&conn.id, &self.instance_id, fence)
                        .await?;
                }
                return result;
            }
            if Instant::now() + REFRESH_POLL >= deadline {
                return Err(VaultError::Unavailable(
                    "a token refresh in progress elsewhere did not finish within the deadline"
                        .into(),
                )
                .because(ErrorReason::GoogleUnavailable));
            }
            tokio::time::sleep(REFRESH_POLL).await;
        }
    }

    /// Keeps this process's refresh lock (with `fence`) alive until the
    /// returned task is aborted or the lock is lost.
    fn renew_refresh_lock(&self, id: &ConnectionId, fence: i64) -> Renewal {
        let store = Arc::clone(self.store());
        let holder = self.instance_id.clone();
        let id = id.clone();
        Renewal(tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_LOCK_RENEW).await;
                let renewed = match store.clock().await {
                    Ok(now) => {
                        store
                            .refresh_lock_renew(&id, &holder, fence, now.plus(REFRESH_LOCK_TTL))
                            .await
                    }
                    Err(e) => Err(e),
                };
                match renewed {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(connection = %id, "refresh lock no longer held (taken over, or its connection deleted)");
                        return;
                    }
                    // The next renewal tries again; the fence protects the write.
                    Err(e) => {
                        tracing::warn!(connection = %id, error = %e, "cannot renew a refresh lock")
                    }
                }
            }
        }))
    }

    /// Refreshes while holding the lock with `fence`, retrying transient
    /// failures with backoff and jitter until the deadline (at most
    /// `max_attempts` calls to Google). A failure other than a revoked grant
    /// is recorded in the connection's refresh health.
    async fn refresh_holding(
        &self,
        conn: &ConnectionRecord,
        fence: i64,
        deadline: Instant,
        max_attempts: u32,
    ) -> Result<(SecretString, Timestamp), VaultError> {
        let result = self
            .refresh_attempts(conn, fence, deadline, max_attempts)
            .await;
        let gone = match &result {
            Err(VaultError::FailedPrecondition(_)) => self.is_gone(conn).await,
            _ => false,
        };
        if let Err(e) = &result
            && !gone
        {
            let now = Timestamp::now();
            let retry = now.plus(Duration::from_secs(
                self.settings.refresh.retry_after_seconds,
            ));
            let why = e.to_string();
            if let Err(note) = self
                .store()
                .refresh_note_error(&conn.id, &why, now, retry)
                .await
            {
                tracing::warn!(connection = %conn.id, error = %note, "cannot record a refresh error");
            }
        }
        result
    }

    /// Whether the connection is no longer ACTIVE-able (deleted or revoked
    /// upstream meanwhile).
    async fn is_gone(&self, conn: &ConnectionRecord) -> bool {
        matches!(
            self.store().connection_get(&conn.id).await,
            Ok(Some(c)) if c.status.is_tombstone()
        )
    }

    async fn refresh_attempts(
        &self,
        conn: &ConnectionRecord,
        fence: i64,
        deadline: Instant,
        max_attempts: u32,
    ) -> Result<(SecretString, Timestamp), VaultError> {
        let google = self.google()?;
        let refresh = self.refresh_token_open(conn).await?.ok_or_else(|| {
            VaultError::precondition(format!(
                "connection {} holds no refresh token and its access token expired; reconnect it",
                conn.id
            ))
            .because(ErrorReason::ReconnectRequired)
        })?;
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = tokio::time::timeout(remaining, google.refresh(refresh.expose())).await;
            let err = match outcome {
                Ok(Ok(grant)) => {
                    let secrets = self.store().secrets_get(&conn.id).await?.ok_or_else(|| {
                        VaultError::precondition(format!(
                            "connection {} was deleted during refresh",
                            conn.id
                        ))
                        .because(ErrorReason::ConnectionDeleted)
                    })?;
                    let cipher = self.keys().connection_cipher(conn, &secrets).await?;
                    let access =
                        cipher.seal(TokenKind::Access, grant.access_token.expose().as_bytes())?;
                    let new_refresh = match &grant.refresh_token {
                        Some(r) => Some(cipher.seal(TokenKind::Refresh, r.expose().as_bytes())?),
                        None => None,
                    };
                    let stored = self
                        .store()
                        .secrets_refresh(
                            &conn.id,
                            &self.instance_id,
                            fence,
                            &RefreshedTokens {
                                access_token: &access,
                                access_expires_at: grant.expires_at,
                                refresh_token: new_refresh.as_deref(),
                                at: Timestamp::now(),
                                next_check_at: self.next_refresh_check(Timestamp::now()),
                            },
                        )
                        .await?;
                    if !stored {
                        // Our lock expired and another holder took over: its
                        // result stands, ours is discarded.
                        tracing::warn!(connection = %conn.id, "refresh lock lost; discarding this refresh");
                    }
                    metrics::counter!("tokenvault_refresh_total", "outcome" => "ok").increment(1);
                    tracing::info!(connection = %conn.id, attempts, "access token refreshed");
                    return Ok((grant.access_token, grant.expires_at));
                }
                Ok(Err(GoogleError::InvalidGrant)) => {
                    metrics::counter!("tokenvault_refresh_total", "outcome" => "invalid_grant")
                        .increment(1);
                    self.revoked_at_google(conn).await?;
                    return Err(VaultError::precondition(format!(
                        "Google answered invalid_grant: the user revoked access at Google or the grant expired; \
                         connection {} is REVOKED_UPSTREAM and its tokens were destroyed; the user must reconnect",
                        conn.id
                    ))
                    .because(ErrorReason::ReconnectRequired));
                }
                // Google asked us to wait longer than the caller can: stop now.
                Ok(Err(e))
                    if e.retry_after()
                        .is_some_and(|after| Instant::now() + after >= deadline) =>
                {
                    metrics::counter!("tokenvault_refresh_total", "outcome" => "rate_limited")
                        .increment(1);
                    return Err(VaultError::Unavailable(format!("{e}").into())
                        .because(ErrorReason::GoogleUnavailable));
                }
                Ok(Err(e)) if e.retryable() => {
                    if let Some(after) = e.retry_after() {
                        backoff = backoff.max(after);
                    }
                    e.to_string()
                }
                Ok(Err(e)) => {
                    return Err(VaultError::Unavailable(
                        format!("Google refused the refresh: {e}").into(),
                    )
                    .because(ErrorReason::GoogleUnavailable));
                }
                Err(_) => "timed out".to_owned(),
            };
            let wait = backoff + jitter(backoff / 2);
            if attempts >= max_attempts || Instant::now() + wait >= deadline {
                metrics::counter!("tokenvault_refresh_total", "outcome" => "unavailable")
                    .increment(1);
                tracing::warn!(connection = %conn.id, attempts, error = %err, "refresh failed within the deadline");
                return Err(VaultError::Unavailable(
                    format!("Google did not refresh the token within the deadline ({attempts} attempts; last: {err})").into(),
                )
                .because(ErrorReason::GoogleUnavailable));
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// The user revoked access at Google (`invalid_grant` on refresh): the
    /// same cascade as a disconnect, with reason USER_REVOKED_AT_GOOGLE, no
    /// revocation to send, and the connection left REVOKED_UPSTREAM.
    pub async fn revoked_at_google(&self, conn: &ConnectionRecord) -> Result<(), VaultError> {
        let google = Actor {
            identity: "google".to_owned(),
            role: "system".to_owned(),
        };
        self.delete(
            &google,
            DeletionTarget::Connection(conn.id.clone()),
            DeletionReason::UserRevokedAtGoogle,
            "invalid_grant on refresh",
        )
        .await?;
        tracing::info!(connection = %conn.id, "user revoked access at Google; tokens destroyed");
        Ok(())
    }
}
