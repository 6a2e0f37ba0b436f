//! The simulator's HTTP surface: axum handlers for Google's endpoints, fault
//! injection, and answers in Google's shapes. Logs name the endpoint and the
//! status only, never a token, code, secret, state or verifier.
//!
//! Longer than product modules: one handler per Google endpoint, each
//! answering in Google's exact shapes and error codes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::digest::{SHA256, digest};
use serde_json::{Value, json};

use super::model::{
    AuthOutcome, AuthRequest, BAD_REQUEST, EMAIL_SCOPE, EXPIRED_OR_REVOKED, Issued, OAuthError,
    OPENID_SCOPE, PROFILE_SCOPE, normalize_scopes, pkce_well_formed, scope_is_known,
};
use super::{
    AUTH_PATH, DISCOVERY_PATH, Endpoint, Fault, JWKS_PATH, REVOKE_PATH, RISC_CONFIGURATION_PATH,
    Shared, SimClient, TOKEN_PATH, USERINFO_PATH, unix_now,
};

/// How long [`Fault::Hang`] holds a request when the simulator keeps running.
const HANG: Duration = Duration::from_secs(3600);

/// Lifetime of id_tokens, as Google's.
const ID_TOKEN_LIFETIME_SECS: u64 = 3600;

/// Parameters the authorization endpoint accepts; Google refuses others with
/// "Parameter not allowed for this message type".
const AUTH_PARAMS: &[&str] = &[
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "access_type",
    "prompt",
    "login_hint",
    "include_granted_scopes",
    "nonce",
    "hd",
    "enable_granular_consent",
    "authuser",
    "display",
];

/// The simulator's routes.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(AUTH_PATH, get(authorize))
        .route(TOKEN_PATH, post(token))
        .route(REVOKE_PATH, post(revoke))
        .route(USERINFO_PATH, get(userinfo).post(userinfo))
        .route(JWKS_PATH, get(jwks))
        .route(DISCOVERY_PATH, get(discovery))
        .route(RISC_CONFIGURATION_PATH, get(risc_configuration))
        .with_state(shared)
}

/// Query or form parameters in the order received.
#[derive(Default)]
struct Params(Vec<(String, String)>);

impl Params {
    /// The value of a parameter; an empty value counts as absent.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// The first parameter that occurs twice.
    fn repeated(&self) -> Option<&str> {
        self.0.iter().enumerate().find_map(|(i, (name, _))| {
            self.0[..i]
                .iter()
                .any(|(earlier, _)| earlier == name)
                .then_some(name.as_str())
        })
    }
}

fn query_params(query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Option<Params> {
    query.ok().map(|Query(p)| Params(p))
}

fn form_params(form: Result<Form<Vec<(String, String)>>, FormRejection>) -> Option<Params> {
    form.ok().map(|Form(p)| Params(p))
}

/// Logs the answer (endpoint and status only) and passes it on.
fn finish(endpoint: Endpoint, response: Response) -> Response {
    tracing::info!(
        endpoint = ?endpoint,
        status = response.status().as_u16(),
        "google sim answered"
    );
    response
}

/// Applies the fault armed for this call, if any. `None`: answer normally
/// (possibly after an injected latency).
async fn fault(
    sim: &Shared,
    endpoint: Endpoint,
    invalid_grant_description: &'static str,
) -> Option<Response> {
    match sim.take_fault(endpoint)? {
        Fault::Latency(duration) => {
            sim.sleep_unless_shutdown(duration).await;
            None
        }
        Fault::Hang => {
            sim.sleep_unless_shutdown(HANG).await;
            Some(status_fault(endpoint, 503))
        }
        Fault::Status(code) => Some(status_fault(endpoint, code)),
        Fault::RateLimited(after) => Some(rate_limited(after)),
        Fault::HtmlPage(code) => Some(html_error(code)),
        Fault::Answer(code, body) => Some(verbatim(code, body)),
        Fault::LoseAnswer => Some(html_error(502)),
        Fault::MalformedJson => Some(malformed(endpoint)),
        Fault::InvalidGrant => Some(oauth_error(&OAuthError::InvalidGrant(
            invalid_grant_description,
        ))),
    }
}

/// Google's front-end HTML error page.
fn html_error(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Error");
    let page = format!(
        "<!DOCTYPE html><html lang=en><meta charset=utf-8><title>Error {code} ({reason})!!1</title>\
         <p><b>{code}.</b> <ins>That’s an error.</ins></p><p>{reason}. <ins>That’s all we know.</ins></p></html>",
        code = status.as_u16()
    );
    html(status, page)
}

/// 429 with `Retry-After`, as Google's token endpoint throttles.
fn rate_limited(after: Duration) -> Response {
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"error": "rate_limit_exceeded", "error_description": "Rate Limit Exceeded"}),
    );
    if let Ok(value) = header::HeaderValue::from_str(&after.as_secs().to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// A status and JSON body, verbatim.
fn verbatim(code: u16, body: String) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A Google front-end error: the googleapis JSON error, or an HTML page on
/// the authorization endpoint.
fn status_fault(endpoint: Endpoint, code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Error");
    if !endpoint.is_json() {
        return html_error(code);
    }
    let grpc_status = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    };
    json_response(
        status,
        &json!({"error": {"code": status.as_u16(), "message": reason, "status": grpc_status}}),
    )
}

/// 200 with a JSON body cut off mid-value.
fn malformed(endpoint: Endpoint) -> Response {
    let body = match endpoint {
        Endpoint::Token => "{\n  \"access_token\": \"ya29.a0AfB_byC",
        Endpoint::Jwks => "{\n  \"keys\": [\n    {\n      \"kty\": \"RSA\",\n      \"n\": \"",
        Endpoint::Userinfo => "{\n  \"sub\": \"",
        _ => "{\n  \"",
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (
                header::CACHE_CONTROL,
                "no-cache, no-store, max-age=0, must-revalidate",
            ),
            (header::PRAGMA, "no-cache"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(error: &OAuthError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(
        status,
        &json!({"error": error.code(), "error_description": error.description()}),
    )
}

fn html(status: StatusCode, page: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// Google's "Access blocked" page: the authorization endpoint's answer when
/// it cannot trust the redirect URI or the request is malformed.
fn error_page(error: &str, details: &str) -> Response {
    let page = format!(
        "<!DOCTYPE html><html lang=en><meta charset=utf-8><title>Error 400: {error}</title>\
         <h1>Access blocked: This app’s request is invalid</h1>\
         <p>Error 400: {error}</p><p>{details}</p></html>",
        error = escape_html(error),
        details = escape_html(details),
    );
    html(StatusCode::BAD_REQUEST, page)
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A 302 to `base` with these query parameters appended.
fn redirect(base: &str, params: &[(&str, &str)]) -> Response {
    let mut location = base.to_owned();
    let mut separator = if base.contains('?') { '&' } else { '?' };
    for (name, value) in params {
        location.push(separator);
        separator = '&';
        location.push_str(name);
        location.push('=');
        location.push_str(&percent_encode(value));
    }
    match HeaderValue::try_from(location) {
        Ok(location) => (StatusCode::FOUND, [(header::LOCATION, location)]).into_response(),
        Err(_) => error_page(
            "redirect_uri_mismatch",
            "The redirect URI cannot be used in a redirect.",
        ),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes an `application/x-www-form-urlencoded` component (`+` is a space),
/// as RFC 6749 §2.3.1 has clients encode HTTP Basic credentials.
fn form_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------
// GET /o/oauth2/v2/auth

async fn authorize(
    State(sim): State<Arc<Shared>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    sim.count(Endpoint::Auth);
    if let Some(response) = fault(&sim, Endpoint::Auth, BAD_REQUEST).await {
        return finish(Endpoint::Auth, response);
    }
    let response = match query_params(query) {
        Some(params) => authorize_request(&sim, &params),
        None => error_page("invalid_request", "The request could not be parsed."),
    };
    finish(Endpoint::Auth, response)
}

fn authorize_request(sim: &Shared, params: &Params) -> Response {
    if let Some(name) = params.repeated() {
        return error_page(
            "invalid_request",
            &format!("Parameter must not be repeated: {name}"),
        );
    }
    if let Some((name, _)) = params
        .0
        .iter()
        .find(|(name, _)| !AUTH_PARAMS.contains(&name.as_str()))
    {
        return error_page(
            "invalid_request",
            &format!("Parameter not allowed for this message type: {name}"),
        );
    }
    let Some(client_id) = params.get("client_id") else {
        return error_page("invalid_request", "Missing required parameter: client_id");
    };
    let Some(client) = sim.config.clients.iter().find(|c| c.client_id == client_id) else {
        return error_page("invalid_client", "The OAuth client was not found.");
    };
    // From here the request names a real client; still, nothing is redirected
    // anywhere but to a URI registered exactly.
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return error_page(
            "invalid_request",
            "Missing required parameter: redirect_uri",
        );
    };
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        return error_page(
            "redirect_uri_mismatch",
            "The redirect URI in the request does not match the ones authorized for the OAuth client.",
        );
    }
    match params.get("response_type") {
        Some("code") => {}
        None => {
            return error_page(
                "invalid_request",
                "Missing required parameter: response_type",
            );
        }
        Some(other) => {
            return error_page(
                "unsupported_response_type",
                &format!("Invalid response_type: {other}"),
            );
        }
    }
    let raw_scope = params.get("scope").unwrap_or_default();
    if let Some(bad) = raw_scope.split_whitespace().find(|s| !scope_is_known(s)) {
        return error_page(
            "invalid_scope",
            &format!("Some requested scopes were invalid. {{invalid=[{bad}]}}"),
        );
    }
    let scopes = normalize_scopes(raw_scope);
    if scopes.is_empty() {
        return error_page("invalid_request", "Missing required parameter: scope");
    }
    let Some(code_challenge) = params.get("code_challenge") else {
        return error_page(
            "invalid_request",
            "Missing required parameter: code_challenge (the simulator requires PKCE)",
        );
    };
    if params.get("code_challenge_method") != Some("S256") {
        return error_page(
            "invalid_request",
            "code_challenge_method must be S256 (the simulator requires PKCE with S256)",
        );
    }
    // An S256 challenge is a base64url SHA-256: 43 characters.
    if code_challenge.len() != 43 || !pkce_well_formed(code_challenge) {
        return error_page("invalid_request", "Invalid code_challenge.");
    }
    let offline = match params.get("access_type") {
        None | Some("online") => false,
        Some("offline") => true,
        Some(other) => {
            return error_page("invalid_request", &format!("Invalid access_type: {other}"));
        }
    };
    let Some((prompt_consent, prompt_none)) = parse_prompt(params.get("prompt")) else {
        return error_page("invalid_request", "Invalid prompt.");
    };
    let include_granted_scopes = match params.get("include_granted_scopes") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return error_page("invalid_request", "Invalid include_granted_scopes.");
        }
    };
    let request = AuthRequest {
        client_id: &client.client_id,
        redirect_uri,
        scopes,
        code_challenge,
        offline,
        prompt_consent,
        prompt_none,
        login_hint: params.get("login_hint"),
        include_granted_scopes,
        nonce: params.get("nonce"),
    };
    let outcome = sim.model().authorize(&request);
    // Google's order: `state` first on success, after `error` on failure.
    let state = params.get("state").map(|s| ("state", s.to_owned()));
    let error = |code: &str| std::iter::once(("error", code.to_owned())).chain(state.clone());
    let pairs: Vec<(&str, String)> = match outcome {
        Ok(AuthOutcome::Code {
            code,
            scopes,
            consent_shown,
        }) => {
            let prompt = if consent_shown { "consent" } else { "none" };
            state
                .clone()
                .into_iter()
                .chain([
                    ("code", code),
                    ("scope", redirect_scope(raw_scope, &scopes)),
                    ("authuser", "0".to_owned()),
                    ("prompt", prompt.to_owned()),
                ])
                .collect()
        }
        Ok(AuthOutcome::AccessDenied) => error("access_denied").collect(),
        Ok(AuthOutcome::ConsentRequired) => error("consent_required").collect(),
        Err(error) => return oauth_error(&error),
    };
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    redirect(redirect_uri, &pairs)
}

/// `(consent, none)` from a space-separated `prompt`; `None` if invalid.
fn parse_prompt(prompt: Option<&str>) -> Option<(bool, bool)> {
    let Some(prompt) = prompt else {
        return Some((false, false));
    };
    let values: Vec<&str> = prompt.split_whitespace().collect();
    if values
        .iter()
        .any(|v| !matches!(*v, "none" | "consent" | "select_account"))
    {
        return None;
    }
    let none = values.contains(&"none");
    if none && values.len() > 1 {
        return None;
    }
    Some((values.contains(&"consent"), none))
}

/// The redirect's `scope`: like Google's, the requested shorthands that were
/// granted (`email`, `profile`) followed by the granted scopes.
fn redirect_scope(raw_requested: &str, granted: &[String]) -> String {
    let requested: Vec<&str> = raw_requested.split_whitespace().collect();
    let mut out: Vec<&str> = Vec::new();
    for (short, long) in [("email", EMAIL_SCOPE), ("profile", PROFILE_SCOPE)] {
        if requested.contains(&short) && granted.iter().any(|g| g == long) {
            out.push(short);
        }
    }
    out.extend(granted.iter().map(String::as_str));
    out.join(" ")
}

// ---------------------------------------------------------------------------
// POST /token

async fn token(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    sim.count(Endpoint::Token);
    let params = form_params(form);
    let grant_type = params.as_ref().and_then(|p| p.get("grant_type"));
    let invalid_grant = match grant_type {
        Some("refresh_token") => {
            sim.count_refresh();
            EXPIRED_OR_REVOKED
        }
        Some("authorization_code") => {
            sim.count_code_exchange();
            BAD_REQUEST
        }
        _ => BAD_REQUEST,
    };
    let lose_answer = sim
        .take_fault_if(Endpoint::Token, |f| *f == Fault::LoseAnswer)
        .is_some();
    if !lose_answer && let Some(response) = fault(&sim, Endpoint::Token, invalid_grant).await {
        return finish(Endpoint::Token, response);
    }
    let result = match &params {
        Some(params) => token_grant(&sim, &headers, params),
        None => Err(OAuthError::InvalidRequest(
            "The request must be an application/x-www-form-urlencoded POST.".to_owned(),
        )),
    };
    let response = match result {
        _ if lose_answer => html_error(502),
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => oauth_error(&error),
    };
    finish(Endpoint::Token, response)
}

fn missing(name: &str) -> OAuthError {
    OAuthError::InvalidRequest(format!("Missing required parameter: {name}"))
}

fn token_grant(sim: &Shared, headers: &HeaderMap, params: &Params) -> Result<Value, OAuthError> {
    if let Some(name) = params.repeated() {
        return Err(OAuthError::InvalidRequest(format!(
            "Parameter must not be repeated: {name}"
        )));
    }
    let client = authenticate(sim, headers, params)?;
    let issued = match params.get("grant_type") {
        Some("authorization_code") => {
            let code = params.get("code").ok_or_else(|| missing("code"))?;
            let redirect_uri = params
                .get("redirect_uri")
                .ok_or_else(|| missing("redirect_uri"))?;
            let verifier = params.get("code_verifier");
            sim.model()
                .exchange_code(&client.client_id, code, redirect_uri, verifier)?
        }
        Some("refresh_token") => {
            let refresh_token = params
                .get("refresh_token")
                .ok_or_else(|| missing("refresh_token"))?;
            let scope = params.get("scope");
            sim.model()
                .refresh(&client.client_id, refresh_token, scope)?
        }
        other => {
            return Err(OAuthError::UnsupportedGrantType(
                other.unwrap_or_default().to_owned(),
            ));
        }
    };
    token_body(sim, &issued)
}

/// The client a token request authenticates as: HTTP Basic (form-encoded
/// id and secret, RFC 6749 §2.3.1) or `client_id` + `client_secret` in the form.
fn authenticate<'a>(
    sim: &'a Shared,
    headers: &HeaderMap,
    params: &Params,
) -> Result<&'a SimClient, OAuthError> {
    let (client_id, secret) = match basic_credentials(headers)? {
        Some((id, secret)) => {
            if params.get("client_id").is_some_and(|form_id| form_id != id) {
                return Err(OAuthError::InvalidClient("Unauthorized"));
            }
            (id, Some(secret))
        }
        None => (
            params
                .get("client_id")
                .ok_or_else(|| {
                    OAuthError::InvalidRequest(
                        "Could not determine client ID from request.".to_owned(),
                    )
                })?
                .to_owned(),
            params.get("client_secret").map(str::to_owned),
        ),
    };
    let client = sim
        .config
        .clients
        .iter()
        .find(|c| c.client_id == client_id)
        .ok_or(OAuthError::InvalidClient("The OAuth client was not found."))?;
    let secret = secret
        .filter(|s| !s.is_empty())
        .ok_or_else(|| OAuthError::InvalidRequest("client_secret is missing.".to_owned()))?;
    if secret != client.client_secret {
        return Err(OAuthError::InvalidClient("Unauthorized"));
    }
    Ok(client)
}

/// `Authorization: Basic …` credentials, if that is the scheme used.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || OAuthError::InvalidClient("Unauthorized");
    let value = value.to_str().map_err(|_| malformed())?;
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok(Some((
        form_decode(id).ok_or_else(malformed)?,
        form_decode(secret).ok_or_else(malformed)?,
    )))
}

/// Google's token response, with an id_token when the scopes include OpenID
/// Connect ones.
fn token_body(sim: &Shared, issued: &Issued) -> Result<Value, OAuthError> {
    let mut body = json!({
        "access_token": issued.access_token,
        "expires_in": issued.expires_in,
        "scope": issued.scopes.join(" "),
        "token_type": "Bearer",
    });
    if let Some(refresh_token) = &issued.refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    if issued
        .scopes
        .iter()
        .any(|s| s == OPENID_SCOPE || s == EMAIL_SCOPE || s == PROFILE_SCOPE)
    {
        body["id_token"] = json!(id_token(sim, issued)?);
    }
    Ok(body)
}

fn id_token(sim: &Shared, issued: &Issued) -> Result<String, OAuthError> {
    let now = unix_now();
    let at_hash =
        URL_SAFE_NO_PAD.encode(&digest(&SHA256, issued.access_token.as_bytes()).as_ref()[..16]);
    let mut claims = json!({
        "iss": sim.config.issuer,
        "azp": issued.client_id,
        "aud": issued.client_id,
        "sub": issued.user.subject,
        "at_hash": at_hash,
        "iat": now,
        "exp": now + ID_TOKEN_LIFETIME_SECS,
    });
    if issued.scopes.iter().any(|s| s == EMAIL_SCOPE) {
        claims["email"] = json!(issued.user.email);
        claims["email_verified"] = json!(true);
    }
    if let Some(nonce) = &issued.nonce {
        claims["nonce"] = json!(nonce);
    }
    sim.current_key()
        .sign_jwt(&claims)
        .map_err(|_| OAuthError::Internal)
}

// ---------------------------------------------------------------------------
// POST /revoke

async fn revoke(
    State(sim): State<Arc<Shared>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    sim.count(Endpoint::Revoke);
    if let Some(response) = fault(&sim, Endpoint::Revoke, BAD_REQUEST).await {
        return finish(Endpoint::Revoke, response);
    }
    let form = form_params(form).unwrap_or_default();
    let query = query_params(query).unwrap_or_default();
    let response = match form.get("token").or_else(|| query.get("token")) {
        None => oauth_error(&missing("token")),
        Some(token) => {
            let revoked = sim.model().revoke(token);
            match revoked {
                Ok(()) => json_response(StatusCode::OK, &json!({})),
                Err(error) => oauth_error(&error),
            }
        }
    };
    finish(Endpoint::Revoke, response)
}

// ---------------------------------------------------------------------------
// GET /v1/userinfo

async fn userinfo(
    State(sim): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    sim.count(Endpoint::Userinfo);
    if let Some(response) = fault(&sim, Endpoint::Userinfo, BAD_REQUEST).await {
        return finish(Endpoint::Userinfo, response);
    }
    let query = query_params(query).unwrap_or_default();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let token = bearer.or_else(|| query.get("access_token"));
    let found = token.and_then(|t| sim.model().userinfo(t));
    let response = match found {
        Some((user, with_email)) => {
            let mut body = json!({"sub": user.subject});
            if with_email {
                body["email"] = json!(user.email);
                body["email_verified"] = json!(true);
            }
            json_response(StatusCode::OK, &body)
        }
        None => {
            let mut response = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_request", "error_description": "Invalid Credentials"}),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
                ),
            );
            response
        }
    };
    finish(Endpoint::Userinfo, response)
}

// ---------------------------------------------------------------------------
// GET /oauth2/v3/certs, discovery documents

async fn jwks(State(sim): State<Arc<Shared>>) -> Response {
    sim.count(Endpoint::Jwks);
    if let Some(response) = fault(&sim, Endpoint::Jwks, BAD_REQUEST).await {
        return finish(Endpoint::Jwks, response);
    }
    let response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json; charset=UTF-8"),
            (
                header::CACHE_CONTROL,
                "public, max-age=19800, must-revalidate, no-transform",
            ),
        ],
        sim.jwks().to_string(),
    )
        .into_response();
    finish(Endpoint::Jwks, response)
}

async fn discovery(State(sim): State<Arc<Shared>>) -> Response {
    sim.count(Endpoint::Discovery);
    if let Some(response) = fault(&sim, Endpoint::Discovery, BAD_REQUEST).await {
        return finish(Endpoint::Discovery, response);
    }
    let body = json!({
        "issuer": sim.config.issuer,
        "authorization_endpoint": sim.url(AUTH_PATH),
        "token_endpoint": sim.url(TOKEN_PATH),
        "userinfo_endpoint": sim.url(USERINFO_PATH),
        "revocation_endpoint": sim.url(REVOKE_PATH),
        "jwks_uri": sim.url(JWKS_PATH),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "claims_supported": ["aud", "email", "email_verified", "exp", "iat", "iss", "sub", "azp", "at_hash", "nonce"],
        "code_challenge_methods_supported": ["S256"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
    });
    finish(Endpoint::Discovery, json_response(StatusCode::OK, &body))
}

async fn risc_configuration(State(sim): State<Arc<Shared>>) -> Response {
    sim.count(Endpoint::Discovery);
    if let Some(response) = fault(&sim, Endpoint::Discovery, BAD_REQUEST).await {
        return finish(Endpoint::Discovery, response);
    }
    let body = json!({
        "issuer": sim.config.risc_issuer,
        "jwks_uri": sim.url(JWKS_PATH),
        "delivery_methods_supported": ["https://schemas.openid.net/secevent/risc/delivery-method/push"],
    });
    finish(Endpoint::Discovery, json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_round_trips_through_form_decoding() {
        let raw = "1//0Sim a+b/c:d%e~f";
        let encoded = percent_encode(raw);
        assert_eq!(encoded, "1%2F%2F0Sim%20a%2Bb%2Fc%3Ad%25e~f");
        assert_eq!(form_decode(&encoded).as_deref(), Some(raw));
        assert_eq!(form_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(form_decode("%4"), None);
    }

    #[test]
    fn prompt_none_cannot_be_combined() {
        assert_eq!(parse_prompt(None), Some((false, false)));
        assert_eq!(
            parse_prompt(Some("select_account consent")),
            Some((true, false))
        );
        assert_eq!(parse_prompt(Some("none")), Some((false, true)));
        assert_eq!(parse_prompt(Some("none consent")), None);
        assert_eq!(parse_prompt(Some("login")), None);
    }

    #[test]
    fn redirect_scope_repeats_granted_shorthands() {
        let granted = vec![EMAIL_SCOPE.to_owned(), OPENID_SCOPE.to_owned()];
        assert_eq!(
            redirect_scope("openid email", &granted),
            format!("email {EMAIL_SCOPE} openid")
        );
    }
}
