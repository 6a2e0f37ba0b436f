//! The vault's OAuth 2.0 client for Google, built on the `oauth2` crate over
//! reqwest with rustls. It follows no redirects, has connect and request
//! timeouts, and classifies every failure so callers can tell a revoked grant
//! (`invalid_grant`) from a passing outage. Token bytes never reach an error
//! message: `oauth2`'s parse errors carry the response body, so they are
//! reduced to a description here.
//!
//! Every outbound call is timed into `tokenvault_google_request_seconds`,
//! labelled by endpoint and HTTP status (or `timeout` / `error`): never by a
//! token, a URL or anything naming a person.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AsyncHttpClient, AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken,
    EndpointNotSet, EndpointSet, ExtraTokenFields, HttpClientError, HttpRequest, HttpResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    StandardRevocableToken, StandardTokenResponse, TokenResponse as _, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::calls::{CallStatus, CallTimer, GoogleEndpoint};
use super::jwt::{IdClaims, JwksCache, JwtError, check_id_claims};
use crate::config::GoogleConfig;
use crate::crypto::SecretString;
use crate::domain::{Timestamp, VaultError};

/// Google's extra token-response field: the OpenID Connect id_token.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct GoogleFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl std::fmt::Debug for GoogleFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GoogleFields { .. }")
    }
}

impl ExtraTokenFields for GoogleFields {}

type GoogleTokenResponse = StandardTokenResponse<GoogleFields, BasicTokenType>;

type OAuthClient = Client<
    BasicErrorResponse,
    GoogleTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// How a call to Google failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoogleError {
    /// `invalid_grant`: the code or refresh token is revoked, expired or unknown.
    #[error("Google answered invalid_grant")]
    InvalidGrant,
    /// Google refused the request for a reason retrying will not fix
    /// (`invalid_client`, `invalid_request`, …); the OAuth error code.
    #[error("Google refused the request: {0}")]
    Rejected(String),
    /// Timeout, connection failure, 5xx or a malformed answer: may succeed later.
    #[error("Google unavailable: {0}")]
    Unavailable(String),
    /// 429: Google asked the client to slow down and to wait this long
    /// (its `Retry-After`) before trying again.
    #[error("Google rate-limited the call; retry after {} s", .0.as_secs())]
    RateLimited(Duration),
}

impl GoogleError {
    /// Whether retrying may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GoogleError::Unavailable(_) | GoogleError::RateLimited(_)
        )
    }

    /// How long Google asked to wait before the next call, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GoogleError::RateLimited(after) => Some(*after),
            _ => None,
        }
    }
}

/// Tokens from a successful exchange or refresh.
pub struct TokenGrant {
    /// The access token.
    pub access_token: SecretString,
    /// When it expires.
    pub expires_at: Timestamp,
    /// A refresh token, when Google sent one.
    pub refresh_token: Option<SecretString>,
    /// The scopes Google actually granted (space-separated), if it said.
    pub scope: Option<String>,
    /// The id_token, when Google sent one.
    pub id_token: Option<String>,
}

impl std::fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGrant")
            .field("expires_at", &self.expires_at)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The configured Google OAuth client.
pub struct GoogleClient {
    oauth: OAuthClient,
    http: reqwest::Client,
    jwks: JwksCache,
    issuers: Vec<String>,
    client_id: String,
    revoke_uri: String,
}

impl GoogleClient {
    /// Builds the client from configuration (URLs were validated there).
    pub fn new(config: &GoogleConfig) -> Result<Self, VaultError> {
        let url_err = |name: &'static str| {
            move |e: oauth2::url::ParseError| VaultError::invalid(name, format!("not a URL ({e})"))
        };
        let oauth = Client::new(ClientId::new(config.client_id.clone()))
            .set_client_secret(ClientSecret::new(config.client_secret.expose().to_owned()))
            .set_auth_uri(
                AuthUrl::new(config.auth_uri.clone()).map_err(url_err("google.auth_uri"))?,
            )
            .set_token_uri(
                TokenUrl::new(config.token_uri.clone()).map_err(url_err("google.token_uri"))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(config.redirect_uri.clone())
                    .map_err(url_err("google.redirect_uri"))?,
            );
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build()
            .map_err(|e| VaultError::Internal(format!("building the HTTP client: {e}").into()))?;
        Ok(Self {
            oauth,
            jwks: JwksCache::new(config.jwks_uri.clone(), http.clone()),
            http,
            issuers: config.issuers.clone(),
            client_id: config.client_id.clone(),
            revoke_uri: config.revoke_uri.clone(),
        })
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Google's authorization URL: code flow, offline access, PKCE S256, the
    /// given state, and `prompt=consent` only when asked.
    pub fn authorization_url(
        &self,
        scopes: &[String],
        state: &str,
        challenge: PkceCodeChallenge,
        login_hint: Option<&str>,
        prompt_consent: bool,
    ) -> String {
        let state = state.to_owned();
        let mut req = self
            .oauth
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(scopes.iter().map(|s| oauth2::Scope::new(s.clone())))
            .set_pkce_challenge(challenge)
            .add_extra_param("access_type", "offline");
        if let Some(hint) = login_hint {
            req = req.add_extra_param("login_hint", hint);
        }
        if prompt_consent {
            req = req.add_extra_param("prompt", "consent");
        }
        req.url().0.to_string()
    }

    /// Exchanges an authorization code (with its PKCE verifier).
    #[tracing::instrument(
        name = "google_token",
        level = "debug",
        skip_all,
        fields(
            otel.kind = "client",
            google.endpoint = "token",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty
        )
    )]
    pub async fn exchange_code(
        &self,
        code: &str,
        verifier: &str,
    ) -> Result<TokenGrant, GoogleError> {
        let resp = self
            .oauth
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
            .request_async(&self.timed(GoogleEndpoint::Token))
            .await
            .map_err(classify)?;
        Ok(grant(resp))
    }

    /// Refreshes an access token.
    #[tracing::instrument(
        name = "google_refresh",
        level = "debug",
        skip_all,
        fields(
            otel.kind = "client",
            google.endpoint = "refresh",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty
        )
    )]
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenGrant, GoogleError> {
        let rt = RefreshToken::new(refresh_token.to_owned());
        let http = self.timed(GoogleEndpoint::Refresh);
        let resp = self
            .oauth
            .exchange_refresh_token(&rt)
            .request_async(&http)
            .await
            .map_err(|e| match http.retry_after() {
                Some(after) => GoogleError::RateLimited(after),
                None => classify(e),
            })?;
        Ok(grant(resp))
    }

    /// Revokes a token — and with it the user's whole grant to this client.
    /// (A plain form POST: `oauth2` refuses revocation URLs that are not
    /// https, which rules out a loopback simulator.) Google answers 400
    /// `invalid_token` for a token that is already revoked or unknown.
    #[tracing::instrument(
        name = "google_revoke",
        level = "debug",
        skip_all,
        fields(
            otel.kind = "client",
            google.endpoint = "revoke",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty
        )
    )]
    pub async fn revoke(&self, token: &str) -> Result<(), GoogleError> {
        let timer = CallTimer::start(GoogleEndpoint::Revoke);
        let sent = self
            .http
            .post(&self.revoke_uri)
            .form(&[("token", token)])
            .send()
            .await;
        timer.finish(match &sent {
            Ok(resp) => CallStatus::Http(resp.status().as_u16()),
            Err(e) => CallStatus::of_error(e),
        });
        let resp = sent.map_err(|e| {
            GoogleError::Unavailable(format!("request failed: {}", error_chain(&e.without_url())))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(GoogleError::Unavailable(format!(
                "Google answered {status}"
            )));
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
        }
        match resp.json::<ErrorBody>().await {
            Ok(body) if body.error == "invalid_grant" => Err(GoogleError::InvalidGrant),
            Ok(body) => Err(GoogleError::Rejected(body.error.chars().take(64).collect())),
            Err(_) => Err(GoogleError::Unavailable(format!(
                "Google answered {status}"
            ))),
        }
    }

    /// An `oauth2` HTTP client that times each call as `endpoint`.
    fn timed(&self, endpoint: GoogleEndpoint) -> TimedHttp<'_> {
        TimedHttp {
            http: &self.http,
            endpoint,
            retry_after: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Verifies an id_token and returns the subject and email.
    pub async fn verify_id_token(&self, id_token: &str) -> Result<IdClaims, JwtError> {
        let claims = self.jwks.verify(id_token).await?;
        let now = Timestamp::now().seconds_nanos().0;
        check_id_claims(&claims, &self.issuers, &self.client_id, now)
    }
}

/// The `oauth2` HTTP client: reqwest, each call timed as one endpoint.
struct TimedHttp<'a> {
    http: &'a reqwest::Client,
    endpoint: GoogleEndpoint,
    /// Seconds of the `Retry-After` of a 429 answer (`u64::MAX`: none).
    retry_after: std::sync::atomic::AtomicU64,
}

impl TimedHttp<'_> {
    /// The `Retry-After` of a 429 answer to the last call, if there was one
    /// (a missing or HTTP-date header counts as one second).
    fn retry_after(&self) -> Option<Duration> {
        match self.retry_after.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => None,
            secs => Some(Duration::from_secs(secs)),
        }
    }
}

type OAuthHttpError = HttpClientError<reqwest::Error>;

impl<'c> AsyncHttpClient<'c> for TimedHttp<'_> {
    type Error = OAuthHttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, OAuthHttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let timer = CallTimer::start(self.endpoint);
            let result = self.http.call(request).await;
            if let Ok(resp) = &result
                && resp.status().as_u16() == 429
            {
                let secs = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(86_400);
                self.retry_after
                    .store(secs, std::sync::atomic::Ordering::Relaxed);
            }
            timer.finish(match &result {
                Ok(resp) => CallStatus::Http(resp.status().as_u16()),
                Err(HttpClientError::Reqwest(e)) => CallStatus::of_error(e),
                Err(_) => CallStatus::Error,
            });
            result
        })
    }
}

fn grant(resp: GoogleTokenResponse) -> TokenGrant {
    let expires_in = resp.expires_in().unwrap_or(Duration::from_secs(3600));
    TokenGrant {
        access_token: SecretString::new(resp.access_token().secret().to_owned()),
        expires_at: Timestamp::now().plus(expires_in),
        refresh_token: resp
            .refresh_token()
            .map(|r| SecretString::new(r.secret().to_owned())),
        scope: resp
            .scopes()
            .map(|s| s.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
        id_token: resp.extra_fields().id_token.clone(),
    }
}

/// Turns an `oauth2` error into a [`GoogleError`] without keeping the body.
fn classify<RE, T>(err: RequestTokenError<RE, T>) -> GoogleError
where
    RE: std::error::Error + 'static,
    T: oauth2::ErrorResponse + ErrorCode + 'static,
{
    match err {
        RequestTokenError::ServerResponse(r) => match r.code().as_str() {
            "invalid_grant" => GoogleError::InvalidGrant,
            code @ ("invalid_client"
            | "unauthorized_client"
            | "invalid_request"
            | "unsupported_grant_type"
            | "invalid_scope"
            | "invalid_token"
            | "unsupported_token_type") => GoogleError::Rejected(code.to_owned()),
            other => GoogleError::Unavailable(format!("Google answered {other}")),
        },
        RequestTokenError::Request(e) => {
            // reqwest errors name the URL but never the form body.
            GoogleError::Unavailable(format!("request failed: {}", error_chain(&e)))
        }
        RequestTokenError::Parse(e, _body) => {
            GoogleError::Unavailable(format!("malformed answer at {}", e.path()))
        }
        RequestTokenError::Other(m) => GoogleError::Unavailable(m),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// The OAuth error code of an error response, as a string.
pub trait ErrorCode {
    /// The `error` field.
    fn code(&self) -> String;
}

impl ErrorCode for BasicErrorResponse {
    fn code(&self) -> String {
        match self.error() {
            BasicErrorResponseType::Extension(s) => s.clone(),
            other => other.as_ref().to_owned(),
        }
    }
}

impl ErrorCode for BasicRevocationErrorResponse {
    fn code(&self) -> String {
        match self.error() {
            oauth2::RevocationErrorResponseType::Basic(b) => match b {
                BasicErrorResponseType::Extension(s) => s.clone(),
                other => other.as_ref().to_owned(),
            },
            other => other.as_ref().to_owned(),
        }
    }
}
