//! The simulator's in-memory model of Google's authorization server: users,
//! consent, authorization codes, grants and the tokens issued under them.
//!
//! A *grant* is what one Google user has consented to for one OAuth client.
//! Every code, access token and refresh token belongs to a grant, and revoking
//! any of them revokes the grant as a whole, as Google does.
//!
//! One file for the whole model on purpose: the grant rules (consent,
//! refresh-token issue, rotation, expiry, revocation) interact, and are
//! easiest to check against Google's documentation side by side.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

use super::Consent;

/// The scope Google reports for the `email` shorthand.
pub(super) const EMAIL_SCOPE: &str = "https://www.googleapis.com/auth/userinfo.email";
/// The scope Google reports for the `profile` shorthand.
pub(super) const PROFILE_SCOPE: &str = "https://www.googleapis.com/auth/userinfo.profile";
/// The OpenID Connect scope; it makes the token endpoint return an id_token.
pub(super) const OPENID_SCOPE: &str = "openid";

/// Google's answer to every failed refresh: revoked, expired or unknown.
pub(super) const EXPIRED_OR_REVOKED: &str = "Token has been expired or revoked.";
/// Google's terse description for a code that cannot be redeemed.
pub(super) const BAD_REQUEST: &str = "Bad Request";

/// An OAuth error the simulator answers with, in Google's wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OAuthError {
    /// 400 `invalid_request`: a parameter is missing, repeated or malformed.
    InvalidRequest(String),
    /// 401 `invalid_client`: unknown client or wrong secret.
    InvalidClient(&'static str),
    /// 400 `invalid_grant`: bad, used or expired code, wrong PKCE verifier,
    /// revoked or unknown refresh token.
    InvalidGrant(&'static str),
    /// 401 `unauthorized_client`: a refresh token presented by another client.
    UnauthorizedClient,
    /// 400 `redirect_uri_mismatch`: the code was issued for another redirect URI.
    RedirectUriMismatch,
    /// 400 `unsupported_grant_type`, naming the grant type received.
    UnsupportedGrantType(String),
    /// 400 `invalid_scope`: a refresh asked for a scope the grant lacks.
    InvalidScope(String),
    /// 400 `invalid_token` (revocation endpoint): unknown, expired or revoked token.
    InvalidToken,
    /// 500: the simulator could not draw random bytes or sign.
    Internal,
}

impl OAuthError {
    /// The HTTP status Google answers this error with.
    pub(super) fn status(&self) -> u16 {
        match self {
            OAuthError::InvalidClient(_) | OAuthError::UnauthorizedClient => 401,
            OAuthError::Internal => 500,
            _ => 400,
        }
    }

    /// The OAuth `error` code.
    pub(super) fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "invalid_request",
            OAuthError::InvalidClient(_) => "invalid_client",
            OAuthError::InvalidGrant(_) => "invalid_grant",
            OAuthError::UnauthorizedClient => "unauthorized_client",
            OAuthError::RedirectUriMismatch => "redirect_uri_mismatch",
            OAuthError::UnsupportedGrantType(_) => "unsupported_grant_type",
            OAuthError::InvalidScope(_) => "invalid_scope",
            OAuthError::InvalidToken => "invalid_token",
            OAuthError::Internal => "internal_failure",
        }
    }

    /// The `error_description`.
    pub(super) fn description(&self) -> String {
        match self {
            OAuthError::InvalidRequest(d) => d.clone(),
            OAuthError::InvalidClient(d) | OAuthError::InvalidGrant(d) => (*d).to_owned(),
            OAuthError::UnauthorizedClient => "Unauthorized".to_owned(),
            OAuthError::RedirectUriMismatch => BAD_REQUEST.to_owned(),
            OAuthError::UnsupportedGrantType(g) => format!("Invalid grant_type: {g}"),
            OAuthError::InvalidScope(d) => d.clone(),
            OAuthError::InvalidToken => "Token expired or revoked".to_owned(),
            OAuthError::Internal => "Backend Error".to_owned(),
        }
    }
}

/// The settings of [`super::SimConfig`] the model enforces.
#[derive(Debug, Clone)]
pub(super) struct Policy {
    /// Lifetime of every access token issued.
    pub(super) access_token_lifetime: Duration,
    /// Whether a refresh returns a new refresh token and retires the old one.
    pub(super) rotate_refresh_tokens: bool,
    /// How long a retired (rotated-out) refresh token keeps working.
    pub(super) refresh_token_grace: Duration,
    /// Lifetime of a refresh token from its issue (apps in Testing: 7 days).
    pub(super) refresh_token_lifetime: Option<Duration>,
    /// A refresh token unused this long stops working (Google: six months).
    pub(super) refresh_token_idle_limit: Option<Duration>,
    /// Live refresh tokens kept per grant; the oldest goes beyond that.
    pub(super) max_refresh_tokens_per_grant: usize,
    /// Lifetime of an authorization code.
    pub(super) code_lifetime: Duration,
}

/// A Google account known to the simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct User {
    /// Google's stable account id (`sub`).
    pub(super) subject: String,
    /// The account's address.
    pub(super) email: String,
}

/// (subject, client_id).
type GrantKey = (String, String);

#[derive(Debug, Default)]
struct Grant {
    /// Every scope the user consented to for this client, in first-granted order.
    scopes: Vec<String>,
    /// Whether the user currently has a grant (consented and not revoked since).
    live: bool,
    /// Whether the grant was last ended through `POST /revoke`.
    revoked_via_api: bool,
    /// Live refresh tokens, oldest first.
    refresh_tokens: VecDeque<String>,
    /// Access tokens issued since the last consent, oldest first.
    access_tokens: Vec<String>,
}

#[derive(Debug)]
struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    subject: String,
    scopes: Vec<String>,
    issue_refresh_token: bool,
    nonce: Option<String>,
    expires_at: Instant,
}

#[derive(Debug)]
struct AccessRecord {
    subject: String,
    client_id: String,
    scopes: Vec<String>,
    expires_at: Instant,
}

#[derive(Debug)]
struct RefreshRecord {
    subject: String,
    client_id: String,
    scopes: Vec<String>,
    issued_at: Instant,
    last_used: Instant,
    /// When a rotation replaced it; it works for the grace period after.
    retired_at: Option<Instant>,
}

impl RefreshRecord {
    /// Whether the token still works at `now` under `policy`.
    fn usable(&self, policy: &Policy, now: Instant) -> bool {
        let retired = self
            .retired_at
            .is_some_and(|at| now >= at + policy.refresh_token_grace);
        let expired = policy
            .refresh_token_lifetime
            .is_some_and(|life| now >= self.issued_at + life);
        let idle = policy
            .refresh_token_idle_limit
            .is_some_and(|limit| now >= self.last_used + limit);
        !(retired || expired || idle)
    }
}

/// A validated authorization request.
#[derive(Debug)]
pub(super) struct AuthRequest<'a> {
    /// A registered client.
    pub(super) client_id: &'a str,
    /// One of that client's registered redirect URIs.
    pub(super) redirect_uri: &'a str,
    /// Requested scopes, normalized (see [`normalize_scopes`]).
    pub(super) scopes: Vec<String>,
    /// The PKCE S256 challenge.
    pub(super) code_challenge: &'a str,
    /// `access_type=offline`.
    pub(super) offline: bool,
    /// `prompt` contains `consent`.
    pub(super) prompt_consent: bool,
    /// `prompt=none`.
    pub(super) prompt_none: bool,
    /// `login_hint`, an email or a subject.
    pub(super) login_hint: Option<&'a str>,
    /// `include_granted_scopes=true`.
    pub(super) include_granted_scopes: bool,
    /// `nonce`, echoed in the id_token.
    pub(super) nonce: Option<&'a str>,
}

/// How an authorization ended.
#[derive(Debug)]
pub(super) enum AuthOutcome {
    /// The user consented: a code for these scopes.
    Code {
        /// The authorization code.
        code: String,
        /// The scopes the code's tokens will carry.
        scopes: Vec<String>,
        /// Whether a consent screen was shown (Google reports `prompt=consent`).
        consent_shown: bool,
    },
    /// The user refused (`error=access_denied`).
    AccessDenied,
    /// `prompt=none` but consent is needed (`error=consent_required`).
    ConsentRequired,
}

/// Tokens issued by a code exchange or a refresh.
#[derive(Debug)]
pub(super) struct Issued {
    /// The new access token.
    pub(super) access_token: String,
    /// Its lifetime in seconds.
    pub(super) expires_in: u64,
    /// A refresh token, when one is issued.
    pub(super) refresh_token: Option<String>,
    /// The scopes the access token carries.
    pub(super) scopes: Vec<String>,
    /// The user.
    pub(super) user: User,
    /// The client the tokens were issued to.
    pub(super) client_id: String,
    /// The authorization request's nonce, for the id_token.
    pub(super) nonce: Option<String>,
}

/// The whole mutable state of the simulated authorization server.
#[derive(Debug)]
pub(super) struct Model {
    policy: Policy,
    rng: SystemRandom,
    users: Vec<User>,
    consent: Consent,
    codes: HashMap<String, CodeRecord>,
    grants: HashMap<GrantKey, Grant>,
    access: HashMap<String, AccessRecord>,
    refresh: HashMap<String, RefreshRecord>,
    revocations: u64,
    /// Every secret the simulator has issued or been shown: codes, access and
    /// refresh tokens, PKCE verifiers (for tests that scan for plaintext).
    secrets: Vec<String>,
    /// How far the simulated clock runs ahead of the real one.
    offset: Duration,
}

impl Model {
    /// An empty model with the default user (`sim-user-1`, `user1@sim.test`).
    pub(super) fn new(policy: Policy) -> Self {
        Self {
            policy,
            rng: SystemRandom::new(),
            users: vec![User {
                subject: "sim-user-1".to_owned(),
                email: "user1@sim.test".to_owned(),
            }],
            consent: Consent::GrantAll,
            codes: HashMap::new(),
            grants: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            revocations: 0,
            secrets: Vec::new(),
            offset: Duration::ZERO,
        }
    }

    /// The simulated clock: real time plus every [`Model::advance`].
    fn now(&self) -> Instant {
        Instant::now() + self.offset
    }

    /// Moves the simulated clock forward: codes, access tokens and refresh
    /// tokens age as if `by` had passed.
    pub(super) fn advance(&mut self, by: Duration) {
        self.offset += by;
    }

    /// Registers (or re-points) the account with this email.
    pub(super) fn add_user(&mut self, email: &str, subject: &str) {
        if let Some(user) = self
            .users
            .iter_mut()
            .find(|u| u.email.eq_ignore_ascii_case(email))
        {
            subject.clone_into(&mut user.subject);
        } else {
            self.users.push(User {
                subject: subject.to_owned(),
                email: email.to_owned(),
            });
        }
    }

    /// What the user answers at the next consent screens.
    pub(super) fn set_consent(&mut self, consent: Consent) {
        self.consent = consent;
    }

    /// The account a `login_hint` names: a known email or subject; an unknown
    /// email signs in as a new account; anything else falls back to the default
    /// user (Google lets the user pick an account when the hint is unusable).
    fn resolve_user(&mut self, hint: Option<&str>) -> User {
        let Some(hint) = hint else {
            return self.users[0].clone();
        };
        if let Some(user) = self
            .users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(hint) || u.subject == hint)
        {
            return user.clone();
        }
        if !hint.contains('@') {
            return self.users[0].clone();
        }
        let mut n = self.users.len() + 1;
        while self
            .users
            .iter()
            .any(|u| u.subject == format!("sim-user-{n}"))
        {
            n += 1;
        }
        let user = User {
            subject: format!("sim-user-{n}"),
            email: hint.to_owned(),
        };
        self.users.push(user.clone());
        user
    }

    fn user_by_subject(&self, subject: &str) -> User {
        self.users
            .iter()
            .find(|u| u.subject == subject)
            .cloned()
            // Tokens of a subject that `add_user` re-pointed elsewhere keep
            // their subject, without an email.
            .unwrap_or_else(|| User {
                subject: subject.to_owned(),
                email: String::new(),
            })
    }

    fn random(&self, prefix: &str) -> Result<String, OAuthError> {
        let mut bytes = [0u8; 32];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| OAuthError::Internal)?;
        Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Every code, access token and refresh token issued and every PKCE
    /// verifier received so far.
    pub(super) fn secrets(&self) -> Vec<String> {
        self.secrets.clone()
    }

    /// Runs the consent step of an authorization request.
    pub(super) fn authorize(&mut self, req: &AuthRequest<'_>) -> Result<AuthOutcome, OAuthError> {
        let user = self.resolve_user(req.login_hint);
        let key = (user.subject.clone(), req.client_id.to_owned());
        let covered = self
            .grants
            .get(&key)
            .is_some_and(|g| g.live && req.scopes.iter().all(|s| g.scopes.contains(s)));
        if req.prompt_none && !covered {
            return Ok(AuthOutcome::ConsentRequired);
        }
        let consent_shown = !req.prompt_none && (req.prompt_consent || !covered);
        let granted: Vec<String> = match &self.consent {
            Consent::Deny => return Ok(AuthOutcome::AccessDenied),
            Consent::GrantAll => req.scopes.clone(),
            Consent::Partial(dropped) => {
                let dropped = normalize_scopes(&dropped.join(" "));
                req.scopes
                    .iter()
                    .filter(|s| !dropped.contains(s))
                    .cloned()
                    .collect()
            }
        };
        if granted.is_empty() {
            return Ok(AuthOutcome::AccessDenied);
        }
        let code = self.random("4/0Sim")?;
        self.secrets.push(code.clone());
        let grant = self.grants.entry(key).or_default();
        grant.live = true;
        grant.revoked_via_api = false;
        for scope in &granted {
            if !grant.scopes.contains(scope) {
                grant.scopes.push(scope.clone());
            }
        }
        let scopes = if req.include_granted_scopes {
            grant.scopes.clone()
        } else {
            granted
        };
        self.codes.insert(
            code.clone(),
            CodeRecord {
                client_id: req.client_id.to_owned(),
                redirect_uri: req.redirect_uri.to_owned(),
                code_challenge: req.code_challenge.to_owned(),
                subject: user.subject,
                scopes: scopes.clone(),
                issue_refresh_token: req.offline && consent_shown,
                nonce: req.nonce.map(str::to_owned),
                expires_at: self.now() + self.policy.code_lifetime,
            },
        );
        Ok(AuthOutcome::Code {
            code,
            scopes,
            consent_shown,
        })
    }

    /// Redeems an authorization code. A code is consumed by its first
    /// redemption attempt, successful or not.
    pub(super) fn exchange_code(
        &mut self,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        let record = self
            .codes
            .remove(code)
            .ok_or(OAuthError::InvalidGrant(BAD_REQUEST))?;
        if record.client_id != client_id || self.now() >= record.expires_at {
            return Err(OAuthError::InvalidGrant(BAD_REQUEST));
        }
        if record.redirect_uri != redirect_uri {
            return Err(OAuthError::RedirectUriMismatch);
        }
        let verifier = code_verifier.ok_or(OAuthError::InvalidGrant("Missing code verifier."))?;
        self.secrets.push(verifier.to_owned());
        if !pkce_matches(verifier, &record.code_challenge) {
            return Err(OAuthError::InvalidGrant(BAD_REQUEST));
        }
        let key = (record.subject.clone(), record.client_id.clone());
        let access_token = self.issue_access_token(&key, &record.scopes)?;
        let refresh_token = if record.issue_refresh_token {
            Some(self.issue_refresh_token(&key, &record.scopes)?)
        } else {
            None
        };
        Ok(Issued {
            access_token,
            expires_in: self.policy.access_token_lifetime.as_secs(),
            refresh_token,
            scopes: record.scopes,
            user: self.user_by_subject(&record.subject),
            client_id: record.client_id,
            nonce: record.nonce,
        })
    }

    /// Uses a refresh token. `scope`, when given, must be a subset of the
    /// refresh token's scopes and narrows the new access token.
    pub(super) fn refresh(
        &mut self,
        client_id: &str,
        refresh_token: &str,
        scope: Option<&str>,
    ) -> Result<Issued, OAuthError> {
        let now = self.now();
        let record = self
            .refresh
            .get(refresh_token)
            .ok_or(OAuthError::InvalidGrant(EXPIRED_OR_REVOKED))?;
        if record.client_id != client_id {
            return Err(OAuthError::UnauthorizedClient);
        }
        if !record.usable(&self.policy, now) {
            return Err(OAuthError::InvalidGrant(EXPIRED_OR_REVOKED));
        }
        let scopes = match scope {
            None => record.scopes.clone(),
            Some(requested) => {
                let requested = normalize_scopes(requested);
                if let Some(extra) = requested.iter().find(|s| !record.scopes.contains(s)) {
                    return Err(OAuthError::InvalidScope(format!(
                        "Some requested scopes were invalid. {{invalid=[{extra}]}}"
                    )));
                }
                requested
            }
        };
        let key = (record.subject.clone(), record.client_id.clone());
        let token_scopes = record.scopes.clone();
        let access_token = self.issue_access_token(&key, &scopes)?;
        if let Some(record) = self.refresh.get_mut(refresh_token) {
            record.last_used = now;
        }
        let new_refresh = if self.policy.rotate_refresh_tokens {
            // The used token keeps working for the grace period (a client
            // that lost this answer can try again), then dies.
            if let Some(record) = self.refresh.get_mut(refresh_token) {
                record.retired_at.get_or_insert(now);
            }
            Some(self.issue_refresh_token(&key, &token_scopes)?)
        } else {
            None
        };
        Ok(Issued {
            access_token,
            expires_in: self.policy.access_token_lifetime.as_secs(),
            refresh_token: new_refresh,
            scopes,
            user: self.user_by_subject(&key.0),
            client_id: key.1,
            nonce: None,
        })
    }

    fn issue_access_token(
        &mut self,
        key: &GrantKey,
        scopes: &[String],
    ) -> Result<String, OAuthError> {
        let token = self.random("ya29.sim")?;
        self.secrets.push(token.clone());
        self.access.insert(
            token.clone(),
            AccessRecord {
                subject: key.0.clone(),
                client_id: key.1.clone(),
                scopes: scopes.to_vec(),
                expires_at: self.now() + self.policy.access_token_lifetime,
            },
        );
        self.grants
            .entry(key.clone())
            .or_default()
            .access_tokens
            .push(token.clone());
        Ok(token)
    }

    /// Issues a refresh token; beyond the per-grant limit the oldest live one
    /// is silently invalidated, as Google does.
    fn issue_refresh_token(
        &mut self,
        key: &GrantKey,
        scopes: &[String],
    ) -> Result<String, OAuthError> {
        let token = self.random("1//0Sim")?;
        self.secrets.push(token.clone());
        let now = self.now();
        self.refresh.insert(
            token.clone(),
            RefreshRecord {
                subject: key.0.clone(),
                client_id: key.1.clone(),
                scopes: scopes.to_vec(),
                issued_at: now,
                last_used: now,
                retired_at: None,
            },
        );
        let limit = self.policy.max_refresh_tokens_per_grant.max(1);
        let grant = self.grants.entry(key.clone()).or_default();
        grant.refresh_tokens.push_back(token.clone());
        while grant.refresh_tokens.len() > limit {
            if let Some(oldest) = grant.refresh_tokens.pop_front() {
                self.refresh.remove(&oldest);
            }
        }
        Ok(token)
    }

    /// `POST /revoke`: an unexpired access token or a live refresh token
    /// revokes its whole grant.
    pub(super) fn revoke(&mut self, token: &str) -> Result<(), OAuthError> {
        let key = if let Some(access) = self.access.get(token) {
            if self.now() >= access.expires_at {
                return Err(OAuthError::InvalidToken);
            }
            (access.subject.clone(), access.client_id.clone())
        } else if let Some(refresh) = self
            .refresh
            .get(token)
            .filter(|r| r.usable(&self.policy, self.now()))
        {
            (refresh.subject.clone(), refresh.client_id.clone())
        } else {
            return Err(OAuthError::InvalidToken);
        };
        self.end_grant(&key, true);
        self.revocations += 1;
        Ok(())
    }

    /// Ends a grant: every token and pending code of it stops working, and the
    /// next authorization is a first consent again.
    fn end_grant(&mut self, key: &GrantKey, via_api: bool) {
        let Some(grant) = self.grants.get_mut(key) else {
            return;
        };
        for token in grant.refresh_tokens.drain(..) {
            self.refresh.remove(&token);
        }
        for token in grant.access_tokens.drain(..) {
            self.access.remove(&token);
        }
        grant.scopes.clear();
        grant.live = false;
        if via_api {
            grant.revoked_via_api = true;
        }
        self.codes
            .retain(|_, c| !(c.subject == key.0 && c.client_id == key.1));
    }

    /// The user of an unexpired access token, and whether it carries the
    /// email scope.
    pub(super) fn userinfo(&self, token: &str) -> Option<(User, bool)> {
        let record = self.access.get(token)?;
        if self.now() >= record.expires_at {
            return None;
        }
        let email = record.scopes.iter().any(|s| s == EMAIL_SCOPE);
        Some((self.user_by_subject(&record.subject), email))
    }

    /// Whether the grant was revoked through `POST /revoke` and not consented again since.
    pub(super) fn grant_revoked(&self, subject: &str, client_id: &str) -> bool {
        self.grants
            .get(&(subject.to_owned(), client_id.to_owned()))
            .is_some_and(|g| !g.live && g.revoked_via_api)
    }

    /// Successful `POST /revoke` calls so far.
    pub(super) fn revocations(&self) -> u64 {
        self.revocations
    }

    /// Makes every access token issued so far expired.
    pub(super) fn expire_access_tokens(&mut self) {
        let now = self.now();
        for record in self.access.values_mut() {
            record.expires_at = now;
        }
    }

    /// Ends every grant of this user, as when they remove the app's access in
    /// their Google account settings. Not counted as a revocation.
    pub(super) fn revoke_grant_silently(&mut self, subject: &str) {
        let keys: Vec<GrantKey> = self
            .grants
            .keys()
            .filter(|(s, _)| s == subject)
            .cloned()
            .collect();
        for key in keys {
            self.end_grant(&key, false);
        }
    }

    /// The most recently issued access token of the grant that is not revoked
    /// (it may have expired).
    pub(super) fn current_access_token(&self, subject: &str, client_id: &str) -> Option<String> {
        let grant = self
            .grants
            .get(&(subject.to_owned(), client_id.to_owned()))?;
        grant
            .access_tokens
            .iter()
            .rev()
            .find(|t| self.access.contains_key(*t))
            .cloned()
    }

    /// How many refresh tokens of the grant still work.
    pub(super) fn live_refresh_tokens(&self, subject: &str, client_id: &str) -> usize {
        let now = self.now();
        self.grants
            .get(&(subject.to_owned(), client_id.to_owned()))
            .map_or(0, |g| {
                g.refresh_tokens
                    .iter()
                    .filter_map(|t| self.refresh.get(t))
                    .filter(|r| r.usable(&self.policy, now))
                    .count()
            })
    }
}

/// Splits a space-separated scope string, maps Google's shorthands to the
/// scopes Google reports (`email` → `…/auth/userinfo.email`, `profile` →
/// `…/auth/userinfo.profile`) and drops duplicates, keeping the order.
pub(super) fn normalize_scopes(raw: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for scope in raw.split_whitespace() {
        let scope = match scope {
            "email" => EMAIL_SCOPE,
            "profile" => PROFILE_SCOPE,
            other => other,
        };
        if !out.iter().any(|s| s == scope) {
            out.push(scope.to_owned());
        }
    }
    out
}

/// Whether a scope is one Google would recognise: the OpenID shorthands or a
/// scope URL.
pub(super) fn scope_is_known(scope: &str) -> bool {
    matches!(scope, "openid" | "email" | "profile") || scope.starts_with("https://")
}

/// Whether `s` is a well-formed PKCE value (RFC 7636: 43 to 128 unreserved
/// characters), as both verifiers and S256 challenges are.
pub(super) fn pkce_well_formed(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// RFC 7636 S256: `BASE64URL(SHA256(verifier)) == challenge`.
fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    pkce_well_formed(verifier)
        && URL_SAFE_NO_PAD.encode(digest(&SHA256, verifier.as_bytes())) == challenge
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthand_scopes_become_the_urls_google_reports() {
        assert_eq!(
            normalize_scopes("openid email  email https://x/y profile"),
            vec![
                OPENID_SCOPE.to_owned(),
                EMAIL_SCOPE.to_owned(),
                "https://x/y".to_owned(),
                PROFILE_SCOPE.to_owned()
            ]
        );
    }

    #[test]
    fn pkce_s256_matches_the_rfc_7636_example() {
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(&verifier.replace('d', "e"), challenge));
        assert!(!pkce_matches("short", challenge));
    }
}
