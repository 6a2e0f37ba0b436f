//! A fake Google for tests and local development: Google's OAuth 2.0
//! authorization, token, revocation, userinfo, JWKS and discovery endpoints,
//! served over real HTTP on loopback, with knobs for consent, fault injection
//! and signed RISC security events.
//!
//! Compiled only with the `google-sim` feature, never into the product build.
//! Integration tests start it in-process with [`GoogleSim::start`]; the
//! `tokenvault-google-sim` binary runs it on its own. It follows Google's wire
//! behaviour where clients tend to trip:
//!
//! - the authorization endpoint never redirects to an unregistered redirect
//!   URI and rejects malformed requests (unknown or repeated parameters, a bad
//!   `prompt`, …) with an HTML error page (status 400); consent outcomes
//!   (`access_denied`, `consent_required`) are redirects;
//! - the shorthands `email` and `profile` come back in `scope` as
//!   `https://www.googleapis.com/auth/userinfo.email` and `….profile`
//!   (the redirect's `scope` also repeats the shorthand, as Google's does);
//! - a refresh token is issued only with `access_type=offline` when a consent
//!   screen is shown: the first consent, new scopes, or `prompt=consent`;
//! - codes look like `4/0…` and refresh tokens like `1//0…` (they contain `/`,
//!   so clients must encode them);
//! - a grant is per (Google user, OAuth client) and cumulative: scopes
//!   granted for one integration stay granted when another asks for more;
//! - revoking any token revokes the user's whole grant to that client, and
//!   revoking a token that is already revoked answers `400 invalid_token`;
//! - refresh tokens die unused after six months, seven days after issue in
//!   publishing status "Testing" ([`SimConfig::testing_mode`]), and — when
//!   rotation is on — a grace period after a refresh replaced them; the
//!   simulated clock can be advanced ([`GoogleSim::advance_clock`]);
//! - errors are Google's JSON (`{"error": …, "error_description": …}`) with
//!   Google's statuses and wording: 401 `invalid_client`, 400 `invalid_grant`
//!   (`"Bad Request"` for codes, `"Token has been expired or revoked."` for
//!   refresh tokens), 400 `redirect_uri_mismatch` for a code redeemed with
//!   another redirect URI, 401 `unauthorized_client` for a refresh token of
//!   another client.
//!
//! Beyond Google, the simulator requires PKCE with S256 on every
//! authorization, so a client that forgets it fails here first. It is a test
//! double, not a security boundary.
//!
//! The simulator (this file, `model.rs`, `http.rs`) is longer than product
//! modules because it follows Google's surface endpoint by endpoint; it is
//! compiled only with the `google-sim` feature.

mod http;
mod keys;
mod model;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use keys::SigningKey;
use model::{Model, Policy};

/// Path of the authorization endpoint (Google: `https://accounts.google.com/o/oauth2/v2/auth`).
pub const AUTH_PATH: &str = "/o/oauth2/v2/auth";
/// Path of the token endpoint (Google: `https://oauth2.googleapis.com/token`).
pub const TOKEN_PATH: &str = "/token";
/// Path of the revocation endpoint (Google: `https://oauth2.googleapis.com/revoke`).
pub const REVOKE_PATH: &str = "/revoke";
/// Path of the userinfo endpoint (Google: `https://openidconnect.googleapis.com/v1/userinfo`).
pub const USERINFO_PATH: &str = "/v1/userinfo";
/// Path of the JWKS (Google: `https://www.googleapis.com/oauth2/v3/certs`).
pub const JWKS_PATH: &str = "/oauth2/v3/certs";
/// Path of the OpenID discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the RISC (Cross-Account Protection) configuration document.
pub const RISC_CONFIGURATION_PATH: &str = "/.well-known/risc-configuration";
/// Prefix of the RISC event type URIs.
pub const RISC_EVENT_TYPE_PREFIX: &str = "https://schemas.openid.net/secevent/risc/event-type/";

/// Lifetime of refresh tokens of an app in publishing status "Testing".
pub const TESTING_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// An OAuth client registered with the simulator.
#[derive(Clone, PartialEq, Eq)]
pub struct SimClient {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
    /// The exact redirect URIs the authorization endpoint accepts.
    pub redirect_uris: Vec<String>,
}

impl SimClient {
    /// A client with one redirect URI.
    pub fn new(client_id: &str, client_secret: &str, redirect_uri: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            redirect_uris: vec![redirect_uri.to_owned()],
        }
    }
}

impl fmt::Debug for SimClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("redirect_uris", &self.redirect_uris)
            .finish()
    }
}

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The registered OAuth clients.
    pub clients: Vec<SimClient>,
    /// Lifetime of access tokens (`expires_in`). Default one hour.
    pub access_token_lifetime: Duration,
    /// Whether a refresh also returns a new refresh token, retiring the one
    /// used. Google does not rotate today but its documentation tells clients
    /// to expect it; default false.
    pub rotate_refresh_tokens: bool,
    /// How long a refresh token retired by a rotation keeps working. Default
    /// one minute.
    pub refresh_token_grace: Duration,
    /// Publishing status "Testing": refresh tokens die seven days after they
    /// were issued, as Google does for such apps with scopes beyond the basic
    /// profile. Default false ("In production").
    pub testing_mode: bool,
    /// A refresh token unused this long stops working. Google: six months
    /// (the default, 183 days).
    pub refresh_token_idle_limit: Option<Duration>,
    /// Live refresh tokens per user and client; issuing one more silently
    /// invalidates the oldest. Google's limit is 100 (the default).
    pub max_refresh_tokens_per_grant: usize,
    /// `iss` of id_tokens. Default `https://accounts.google.com`.
    pub issuer: String,
    /// `iss` of RISC security event tokens and of their subjects. Google's
    /// carries a trailing slash: default `https://accounts.google.com/`.
    pub risc_issuer: String,
    /// Lifetime of authorization codes. Default ten minutes.
    pub code_lifetime: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            access_token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: false,
            refresh_token_grace: Duration::from_secs(60),
            testing_mode: false,
            refresh_token_idle_limit: Some(Duration::from_secs(183 * 86_400)),
            max_refresh_tokens_per_grant: 100,
            issuer: "https://accounts.google.com".to_owned(),
            risc_issuer: "https://accounts.google.com/".to_owned(),
            code_lifetime: Duration::from_secs(600),
        }
    }
}

impl SimConfig {
    /// The default configuration with these clients.
    pub fn with_clients(clients: Vec<SimClient>) -> Self {
        Self {
            clients,
            ..Self::default()
        }
    }
}

/// What the simulated user does at the consent screen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Consent {
    /// Grants every requested scope (the default).
    #[default]
    GrantAll,
    /// Unticks these scopes (shorthands like `email` allowed) and grants the
    /// rest; if nothing is left, it is a denial.
    Partial(Vec<String>),
    /// Refuses: the redirect carries `error=access_denied`.
    Deny,
}

/// One of the simulator's endpoints, for faults and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /o/oauth2/v2/auth`.
    Auth,
    /// `POST /token`.
    Token,
    /// `POST /revoke`.
    Revoke,
    /// `GET /v1/userinfo`.
    Userinfo,
    /// `GET /oauth2/v3/certs`.
    Jwks,
    /// `GET /.well-known/openid-configuration` and `/.well-known/risc-configuration`.
    Discovery,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Auth,
        Endpoint::Token,
        Endpoint::Revoke,
        Endpoint::Userinfo,
        Endpoint::Jwks,
        Endpoint::Discovery,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the endpoint answers JSON (all but the authorization endpoint).
    fn is_json(self) -> bool {
        self != Endpoint::Auth
    }
}

/// A failure injected into an endpoint. A faulted call changes no state,
/// except under [`Fault::Latency`], which delays a normal answer, and
/// [`Fault::LoseAnswer`] on the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After` (whole seconds) and Google's
    /// `rate_limit_exceeded` JSON error.
    RateLimited(Duration),
    /// An HTML error page with this status, as a proxy or Google's front end
    /// answers, on any endpoint (a JSON client must not parse it as JSON).
    HtmlPage(u16),
    /// This status and body verbatim, as `application/json`: answers with
    /// missing fields, wrong types or unknown errors.
    Answer(u16, String),
    /// The token endpoint handles the request (codes are spent, refresh
    /// tokens used or rotated), then the answer is lost: 502 and an HTML page.
    /// Elsewhere, a 502 page without handling the request.
    LoseAnswer,
    /// Answers this status with a Google-style error body (JSON
    /// `{"error": {"code", "message", "status"}}`, an HTML page on the
    /// authorization endpoint). An invalid status code answers 500.
    Status(u16),
    /// Sleeps this long, then handles the request normally. A client that
    /// gives up during the delay may close the connection before the request
    /// is handled; use [`Fault::Status`] for "Google did not do it".
    Latency(Duration),
    /// Answers 200 with a JSON body cut off in the middle.
    MalformedJson,
    /// Answers 400 `{"error": "invalid_grant", …}` (on refreshes with Google's
    /// `"Token has been expired or revoked."`) without touching any token.
    InvalidGrant,
    /// Never answers (until the simulator shuts down or an hour passes).
    Hang,
}

#[derive(Debug)]
struct ArmedFault {
    endpoint: Endpoint,
    fault: Fault,
    remaining: Option<u32>,
}

/// State shared by the handle and the HTTP handlers.
struct Shared {
    config: SimConfig,
    base_url: String,
    model: Mutex<Model>,
    /// Oldest first; the last is the current signing key.
    keys: RwLock<Vec<Arc<SigningKey>>>,
    untrusted: OnceLock<SigningKey>,
    faults: Mutex<Vec<ArmedFault>>,
    calls: [AtomicU64; Endpoint::ALL.len()],
    refresh_calls: AtomicU64,
    code_exchange_calls: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    fn count(&self, endpoint: Endpoint) {
        self.calls[endpoint.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn count_refresh(&self) {
        self.refresh_calls.fetch_add(1, Ordering::Relaxed);
    }

    fn count_code_exchange(&self) {
        self.code_exchange_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The fault that applies to this call of `endpoint`, if any: the first
    /// armed one for it, which loses one of its remaining uses.
    fn take_fault(&self, endpoint: Endpoint) -> Option<Fault> {
        self.take_fault_if(endpoint, |_| true)
    }

    /// [`Shared::take_fault`], only if the first armed fault for `endpoint`
    /// satisfies `wanted`.
    fn take_fault_if(&self, endpoint: Endpoint, wanted: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let index = faults.iter().position(|f| f.endpoint == endpoint)?;
        if !wanted(&faults[index].fault) {
            return None;
        }
        let armed = &mut faults[index];
        let fault = armed.fault.clone();
        if let Some(remaining) = armed.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                faults.remove(index);
            }
        }
        Some(fault)
    }

    /// Sleeps for `duration`, or until the simulator shuts down.
    async fn sleep_unless_shutdown(&self, duration: Duration) {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
    }

    fn current_key(&self) -> Arc<SigningKey> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Invariant: `keys` starts with one key and keys are only ever added.
        Arc::clone(&keys[keys.len() - 1])
    }

    fn jwks(&self) -> Value {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Newest first, as a client scanning for the current key would like.
        json!({ "keys": keys.iter().rev().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the simulator's plain data
    // half-updated in a way that matters to a test double: keep going.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The handle's own part: dropping the last handle stops the server.
struct Handle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// A running Google simulator. Cheap to clone; the server stops when
/// [`GoogleSim::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct GoogleSim {
    inner: Arc<Handle>,
}

impl fmt::Debug for GoogleSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoogleSim")
            .field("base_url", &self.inner.shared.base_url)
            .finish_non_exhaustive()
    }
}

impl GoogleSim {
    /// Starts the simulator on `127.0.0.1` with a free port.
    pub async fn start(config: SimConfig) -> std::io::Result<GoogleSim> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Starts the simulator on `addr`. Generates its first signing key (a
    /// fraction of a second) before binding.
    pub async fn start_on(addr: SocketAddr, config: SimConfig) -> std::io::Result<GoogleSim> {
        let key = tokio::task::spawn_blocking(SigningKey::generate)
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            model: Mutex::new(Model::new(Policy {
                access_token_lifetime: config.access_token_lifetime,
                rotate_refresh_tokens: config.rotate_refresh_tokens,
                refresh_token_grace: config.refresh_token_grace,
                refresh_token_lifetime: config
                    .testing_mode
                    .then_some(TESTING_REFRESH_TOKEN_LIFETIME),
                refresh_token_idle_limit: config.refresh_token_idle_limit,
                max_refresh_tokens_per_grant: config.max_refresh_tokens_per_grant,
                code_lifetime: config.code_lifetime,
            })),
            config,
            base_url: base_url_for(local),
            keys: RwLock::new(vec![Arc::new(key)]),
            untrusted: OnceLock::new(),
            faults: Mutex::new(Vec::new()),
            calls: Default::default(),
            refresh_calls: AtomicU64::new(0),
            code_exchange_calls: AtomicU64::new(0),
            shutdown: shutdown_rx.clone(),
        });
        let app = http::router(Arc::clone(&shared));
        let mut signal = shutdown_rx;
        let server = tokio::spawn(async move {
            let stopped = async move {
                // Resolves on `shutdown` or when the last handle is dropped.
                let _ = signal.wait_for(|down| *down).await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::warn!(%error, "google sim server stopped");
            }
        });
        tracing::info!(base_url = %shared.base_url, "google sim listening");
        Ok(GoogleSim {
            inner: Arc::new(Handle {
                shared,
                shutdown: shutdown_tx,
                server: Mutex::new(Some(server)),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.shared().base_url.clone()
    }

    /// The authorization endpoint URL.
    pub fn auth_uri(&self) -> String {
        self.shared().url(AUTH_PATH)
    }

    /// The token endpoint URL.
    pub fn token_uri(&self) -> String {
        self.shared().url(TOKEN_PATH)
    }

    /// The revocation endpoint URL.
    pub fn revoke_uri(&self) -> String {
        self.shared().url(REVOKE_PATH)
    }

    /// The userinfo endpoint URL.
    pub fn userinfo_uri(&self) -> String {
        self.shared().url(USERINFO_PATH)
    }

    /// The JWKS URL (id_tokens and RISC events are signed by these keys).
    pub fn jwks_uri(&self) -> String {
        self.shared().url(JWKS_PATH)
    }

    /// The OpenID discovery document URL.
    pub fn discovery_uri(&self) -> String {
        self.shared().url(DISCOVERY_PATH)
    }

    /// The RISC configuration document URL.
    pub fn risc_configuration_uri(&self) -> String {
        self.shared().url(RISC_CONFIGURATION_PATH)
    }

    /// The configured `iss` of id_tokens.
    pub fn issuer(&self) -> String {
        self.shared().config.issuer.clone()
    }

    /// The configured `iss` of RISC events.
    pub fn risc_issuer(&self) -> String {
        self.shared().config.risc_issuer.clone()
    }

    /// Registers a Google account: authorizations whose `login_hint` is this
    /// email (or this subject) sign in as it. Re-adding an email re-points it
    /// to the new subject. Without a `login_hint` the default account signs in
    /// (subject `sim-user-1`, email `user1@sim.test`); an unknown email hint
    /// signs in as a new account with subject `sim-user-N`.
    pub fn add_user(&self, login_hint_or_email: &str, subject: &str) {
        self.shared().model().add_user(login_hint_or_email, subject);
    }

    /// Sets the user's answer at the consent screen for the next authorizations.
    pub fn set_consent(&self, consent: Consent) {
        self.shared().model().set_consent(consent);
    }

    /// Arms `fault` on `endpoint` for the next `times` calls (`None`: until
    /// [`GoogleSim::clear_faults`]). Faults on one endpoint apply in the order
    /// they were armed; `Some(0)` arms nothing.
    pub fn inject(&self, endpoint: Endpoint, fault: Fault, times: Option<u32>) {
        if times == Some(0) {
            return;
        }
        lock(&self.shared().faults).push(ArmedFault {
            endpoint,
            fault,
            remaining: times,
        });
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        lock(&self.shared().faults).clear();
    }

    /// Calls `endpoint` has received, faulted ones included.
    pub fn calls(&self, endpoint: Endpoint) -> u64 {
        self.shared().calls[endpoint.index()].load(Ordering::Relaxed)
    }

    /// Token-endpoint calls with `grant_type=refresh_token`, faulted ones included.
    pub fn refresh_calls(&self) -> u64 {
        self.shared().refresh_calls.load(Ordering::Relaxed)
    }

    /// Token-endpoint calls with `grant_type=authorization_code`, faulted ones included.
    pub fn code_exchange_calls(&self) -> u64 {
        self.shared().code_exchange_calls.load(Ordering::Relaxed)
    }

    /// Whether the user's grant to this client was revoked through `POST
    /// /revoke` (by any of its tokens) and not consented to again since.
    /// [`GoogleSim::revoke_grant_silently`] does not make this true.
    pub fn grant_revoked(&self, subject: &str, client_id: &str) -> bool {
        self.shared().model().grant_revoked(subject, client_id)
    }

    /// Every authorization code, access token and refresh token the
    /// simulator has issued and every PKCE verifier it has been sent, so that
    /// a test can prove none of them is stored or logged in plaintext.
    pub fn secrets_seen(&self) -> Vec<String> {
        self.shared().model().secrets()
    }

    /// Successful `POST /revoke` calls so far.
    pub fn revocations(&self) -> u64 {
        self.shared().model().revocations()
    }

    /// Moves the simulator's clock forward by `by`: codes, access tokens and
    /// refresh tokens age as if that time had passed (Testing-mode expiry,
    /// the six-month idle limit, the rotation grace).
    pub fn advance_clock(&self, by: Duration) {
        self.shared().model().advance(by);
    }

    /// Makes every access token issued so far expired: userinfo refuses them
    /// and revoking them answers `invalid_token`. Refresh tokens are untouched.
    pub fn expire_access_tokens(&self) {
        self.shared().model().expire_access_tokens();
    }

    /// Ends every grant of this user, as when they remove the app in their
    /// Google account: refreshes then answer `invalid_grant`, access tokens
    /// stop working. Not counted in [`GoogleSim::revocations`].
    pub fn revoke_grant_silently(&self, subject: &str) {
        self.shared().model().revoke_grant_silently(subject);
    }

    /// The most recently issued, unrevoked access token of the user's grant to
    /// this client (it may have expired).
    pub fn current_access_token(&self, subject: &str, client_id: &str) -> Option<String> {
        self.shared()
            .model()
            .current_access_token(subject, client_id)
    }

    /// How many refresh tokens of the user's grant to this client still work.
    pub fn live_refresh_tokens(&self, subject: &str, client_id: &str) -> usize {
        self.shared()
            .model()
            .live_refresh_tokens(subject, client_id)
    }

    /// The key id new tokens are signed with.
    pub fn current_kid(&self) -> String {
        self.shared().current_key().kid().to_owned()
    }

    /// Generates a new signing key and makes it current; the old keys stay in
    /// the JWKS. Returns the new key id. Blocks for a fraction of a second.
    ///
    /// # Panics
    /// If the system random number generator fails.
    pub fn rotate_signing_key(&self) -> String {
        let key = SigningKey::generate().unwrap_or_else(|e| panic!("google sim: {e}"));
        let kid = key.kid().to_owned();
        self.shared()
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(key));
        kid
    }

    /// Signs arbitrary claims with the current key (header `{alg: RS256, kid,
    /// typ: JWT}`), e.g. an id_token with a wrong audience.
    ///
    /// # Panics
    /// If the system random number generator fails.
    pub fn sign_claims(&self, claims: Value) -> String {
        self.shared()
            .current_key()
            .sign_jwt(&claims)
            .unwrap_or_else(|e| panic!("google sim: {e}"))
    }

    /// A signed Security Event Token (RFC 8417) as Google's Cross-Account
    /// Protection sends it: `iss` (the RISC issuer), `aud`, `iat`, a fresh
    /// `jti`, and `events` with one event whose `subject` is
    /// `{"subject_type": "iss-sub", "iss", "sub"}`. `event_type` is a full URI
    /// or a RISC short name such as `tokens-revoked` or `account-disabled`;
    /// `extra`, if an object, is merged into the event (e.g. `{"reason":
    /// "hijacking"}`); anything else is ignored.
    ///
    /// # Panics
    /// If the system random number generator fails.
    pub fn sign_risc_event(
        &self,
        audience: &str,
        event_type: &str,
        subject: &str,
        extra: Value,
    ) -> String {
        let shared = self.shared();
        let event_uri = if event_type.contains("://") {
            event_type.to_owned()
        } else {
            format!("{RISC_EVENT_TYPE_PREFIX}{event_type}")
        };
        let mut event = json!({
            "subject": {
                "subject_type": "iss-sub",
                "iss": shared.config.risc_issuer,
                "sub": subject,
            }
        });
        if let (Value::Object(extra), Value::Object(event)) = (extra, &mut event) {
            event.extend(extra);
        }
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .unwrap_or_else(|_| panic!("google sim: the system random number generator failed"));
        let mut events = serde_json::Map::new();
        events.insert(event_uri, event);
        self.sign_claims(json!({
            "iss": shared.config.risc_issuer,
            "aud": audience,
            "iat": unix_now(),
            "jti": hex::encode(jti),
            "events": events,
        }))
    }

    /// Signs `claims` with a key that is not in the JWKS, under the current
    /// key's `kid`: the token names a known key but its signature does not
    /// verify. The untrusted key is generated on first use.
    ///
    /// # Panics
    /// If the system random number generator fails.
    pub fn sign_with_untrusted_key(&self, claims: Value) -> String {
        let shared = self.shared();
        let untrusted = shared
            .untrusted
            .get_or_init(|| SigningKey::generate().unwrap_or_else(|e| panic!("google sim: {e}")));
        untrusted
            .sign_jwt_as(shared.current_key().kid(), &claims)
            .unwrap_or_else(|e| panic!("google sim: {e}"))
    }

    /// Stops the server: pending (latent or hung) calls end, open connections
    /// close. Other clones of the handle then point at a stopped server.
    pub async fn shutdown(self) {
        self.inner.shutdown.send_replace(true);
        let task = lock(&self.inner.server).take();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

/// `http://IP:PORT` for a bound address; a wildcard address becomes loopback.
fn base_url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}
