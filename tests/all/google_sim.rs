//! The Google simulator over real HTTP: the authorization code flow with PKCE,
//! consent knobs, refresh, grant-wide revocation, RS256 id_tokens and RISC
//! events verified against its JWKS, injected faults and call counters.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde_json::{Value, json};
use tokenvault::google::sim::{Consent, Endpoint, Fault, GoogleSim, SimClient, SimConfig};

const CLIENT_ID: &str = "sim-test.apps.googleusercontent.com";
const SECRET: &str = "sim-test-secret";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
const OTHER_REDIRECT: &str = "http://127.0.0.1:9/other/callback";
const OTHER_CLIENT_ID: &str = "other.apps.googleusercontent.com";
const OTHER_SECRET: &str = "other-secret";
const CALENDAR: &str = "https://www.googleapis.com/auth/calendar.events";
const GMAIL: &str = "https://www.googleapis.com/auth/gmail.modify";
const USERINFO_EMAIL: &str = "https://www.googleapis.com/auth/userinfo.email";
const DEFAULT_SUBJECT: &str = "sim-user-1";

fn config() -> SimConfig {
    SimConfig::with_clients(vec![
        SimClient {
            client_id: CLIENT_ID.to_owned(),
            client_secret: SECRET.to_owned(),
            redirect_uris: vec![REDIRECT.to_owned(), OTHER_REDIRECT.to_owned()],
        },
        SimClient::new(OTHER_CLIENT_ID, OTHER_SECRET, REDIRECT),
    ])
}

async fn start() -> GoogleSim {
    start_with(config()).await
}

async fn start_with(config: SimConfig) -> GoogleSim {
    GoogleSim::start(config).await.expect("simulator starts")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).unwrap();
    let verifier = URL_SAFE_NO_PAD.encode(bytes);
    let challenge = URL_SAFE_NO_PAD.encode(digest(&SHA256, verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

/// Authorization parameters for an offline request of `openid email
/// calendar.events` with PKCE; `overrides` replace (or, with "", remove) them.
fn auth_params(pkce: &Pkce, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = [
        ("client_id", CLIENT_ID),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
        ("scope", &format!("openid email {CALENDAR}")),
        ("state", "state-123"),
        ("code_challenge", &pkce.challenge),
        ("code_challenge_method", "S256"),
        ("access_type", "offline"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    for (name, value) in overrides {
        params.retain(|(k, _)| k != name);
        if !value.is_empty() {
            params.push(((*name).to_owned(), (*value).to_owned()));
        }
    }
    params
}

async fn get_auth(sim: &GoogleSim, params: &[(String, String)]) -> reqwest::Response {
    http()
        .get(sim.auth_uri())
        .query(params)
        .send()
        .await
        .expect("auth request")
}

/// Where the authorization endpoint redirected the browser.
struct Redirect(reqwest::Url);

impl Redirect {
    fn param(&self, name: &str) -> Option<String> {
        self.0
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    fn code(&self) -> String {
        self.param("code").expect("redirect carries a code")
    }
}

/// Runs an authorization that must redirect; returns the PKCE pair and the redirect.
async fn authorize(sim: &GoogleSim, overrides: &[(&str, &str)]) -> (Pkce, Redirect) {
    let pkce = pkce();
    let resp = get_auth(sim, &auth_params(&pkce, overrides)).await;
    assert_eq!(resp.status(), StatusCode::FOUND, "authorization redirects");
    let location = resp.headers()[reqwest::header::LOCATION].to_str().unwrap();
    let url = reqwest::Url::parse(location).expect("absolute redirect");
    (pkce, Redirect(url))
}

async fn post_token(sim: &GoogleSim, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let resp = http()
        .post(sim.token_uri())
        .form(form)
        .send()
        .await
        .expect("token request");
    let status = resp.status();
    let body = resp
        .json::<Value>()
        .await
        .expect("token endpoint answers JSON");
    (status, body)
}

async fn exchange(sim: &GoogleSim, code: &str, verifier: &str) -> (StatusCode, Value) {
    post_token(
        sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ],
    )
    .await
}

async fn refresh(sim: &GoogleSim, refresh_token: &str) -> (StatusCode, Value) {
    post_token(
        sim,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ],
    )
    .await
}

/// Authorizes and exchanges: the token response.
async fn connect(sim: &GoogleSim, overrides: &[(&str, &str)]) -> Value {
    let (pkce, redirect) = authorize(sim, overrides).await;
    let (status, body) = exchange(sim, &redirect.code(), &pkce.verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn str_field(body: &Value, name: &str) -> String {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {body}"))
        .to_owned()
}

fn scopes(body: &Value) -> Vec<String> {
    str_field(body, "scope")
        .split(' ')
        .map(str::to_owned)
        .collect()
}

fn assert_oauth_error(status: StatusCode, body: &Value, want_status: u16, want_error: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["error"], want_error, "{body}");
    assert!(body["error_description"].is_string(), "{body}");
}

async fn userinfo_status(sim: &GoogleSim, access_token: &str) -> StatusCode {
    http()
        .get(sim.userinfo_uri())
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn fetch_jwks(sim: &GoogleSim) -> Value {
    let resp = http().get(sim.jwks_uri()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

fn jwt_part(jwt: &str, index: usize) -> Value {
    let part = jwt.split('.').nth(index).expect("three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// Verifies an RS256 JWT against a JWKS with ring; the claims if it verifies.
fn verify_jwt(jwt: &str, jwks: &Value) -> Result<Value, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("not three parts".into());
    }
    let header = jwt_part(jwt, 0);
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let key = jwks["keys"]
        .as_array()
        .ok_or("no keys")?
        .iter()
        .find(|k| k["kid"] == kid)
        .ok_or_else(|| format!("kid {kid} not in JWKS"))?;
    let n = URL_SAFE_NO_PAD
        .decode(key["n"].as_str().ok_or("no n")?)
        .map_err(|e| e.to_string())?;
    let e = URL_SAFE_NO_PAD
        .decode(key["e"].as_str().ok_or("no e")?)
        .map_err(|e| e.to_string())?;
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .map_err(|e| e.to_string())?;
    let signed = format!("{}.{}", parts[0], parts[1]);
    RsaPublicKeyComponents { n: &n, e: &e }
        .verify(&RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &signature)
        .map_err(|_| "bad signature".to_owned())?;
    Ok(jwt_part(jwt, 1))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn authorization_code_flow_with_pkce_issues_tokens_like_google() {
    let sim = start().await;
    let (pkce, redirect) = authorize(&sim, &[]).await;
    assert!(redirect.0.as_str().starts_with(&format!("{REDIRECT}?")));
    assert_eq!(redirect.param("state").as_deref(), Some("state-123"));
    let code = redirect.code();
    assert!(code.starts_with("4/0"), "Google-shaped code");
    let redirect_scope = redirect.param("scope").unwrap();
    assert!(
        redirect_scope.split(' ').any(|s| s == CALENDAR),
        "{redirect_scope}"
    );

    let (status, body) = exchange(&sim, &code, &pkce.verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let access = str_field(&body, "access_token");
    assert!(str_field(&body, "refresh_token").starts_with("1//"));
    assert!(body["id_token"].is_string());
    // `email` comes back as the URL Google reports.
    let mut granted = scopes(&body);
    granted.sort();
    assert_eq!(granted, [CALENDAR, USERINFO_EMAIL, "openid"]);
    assert_eq!(
        sim.current_access_token(DEFAULT_SUBJECT, CLIENT_ID)
            .as_deref(),
        Some(access.as_str())
    );
    assert_eq!(sim.calls(Endpoint::Auth), 1);
    assert_eq!(sim.code_exchange_calls(), 1);

    let info: Value = http()
        .get(sim.userinfo_uri())
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info,
        json!({"sub": DEFAULT_SUBJECT, "email": "user1@sim.test", "email_verified": true})
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_code_is_single_use() {
    let sim = start().await;
    let (pkce, redirect) = authorize(&sim, &[]).await;
    let (status, _) = exchange(&sim, &redirect.code(), &pkce.verifier).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = exchange(&sim, &redirect.code(), &pkce.verifier).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
    assert_eq!(body["error_description"], "Bad Request");
}

#[tokio::test]
async fn a_tampered_or_expired_code_is_invalid_grant() {
    let sim = start_with(SimConfig {
        code_lifetime: Duration::from_millis(200),
        ..config()
    })
    .await;
    let (pkce, redirect) = authorize(&sim, &[]).await;
    let tampered = format!("{}x", redirect.code());
    let (status, body) = exchange(&sim, &tampered, &pkce.verifier).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");

    let (pkce, redirect) = authorize(&sim, &[]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = exchange(&sim, &redirect.code(), &pkce.verifier).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
}

#[tokio::test]
async fn a_wrong_or_missing_pkce_verifier_is_invalid_grant() {
    let sim = start().await;
    let (_, redirect) = authorize(&sim, &[]).await;
    let (status, body) = exchange(&sim, &redirect.code(), &pkce().verifier).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");

    let (_, redirect) = authorize(&sim, &[]).await;
    let (status, body) = post_token(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &redirect.code()),
            ("redirect_uri", REDIRECT),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
    assert_eq!(sim.current_access_token(DEFAULT_SUBJECT, CLIENT_ID), None);
}

#[tokio::test]
async fn a_code_is_bound_to_its_redirect_uri_and_client() {
    let sim = start().await;
    let (pkce, redirect) = authorize(&sim, &[("redirect_uri", OTHER_REDIRECT)]).await;
    assert!(redirect.0.as_str().starts_with(OTHER_REDIRECT));
    // Redeemed with the other registered URI: Google's redirect_uri_mismatch.
    let (status, body) = exchange(&sim, &redirect.code(), &pkce.verifier).await;
    assert_oauth_error(status, &body, 400, "redirect_uri_mismatch");

    let (pkce, redirect) = authorize(&sim, &[]).await;
    let (status, body) = post_token(
        &sim,
        &[
            ("grant_type", "authorization_code"),
            ("code", &redirect.code()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &pkce.verifier),
            ("client_id", OTHER_CLIENT_ID),
            ("client_secret", OTHER_SECRET),
        ],
    )
    .await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
}

#[tokio::test]
async fn client_authentication_by_form_or_basic_and_wrong_secret_is_invalid_client() {
    let sim = start().await;
    let (pkce, redirect) = authorize(&sim, &[]).await;
    let code = redirect.code();
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", pkce.verifier.as_str()),
        ("client_id", CLIENT_ID),
        ("client_secret", "wrong"),
    ];
    let (status, body) = post_token(&sim, &form).await;
    assert_oauth_error(status, &body, 401, "invalid_client");
    form.pop();
    let (status, body) = post_token(&sim, &form).await;
    assert_oauth_error(status, &body, 400, "invalid_request");

    // A refused client does not consume the code; HTTP Basic works.
    form.pop();
    let basic = |secret: &str| {
        http()
            .post(sim.token_uri())
            .basic_auth(CLIENT_ID, Some(secret))
            .form(&form)
    };
    let resp = basic("wrong").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = basic(SECRET).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let (status, body) = post_token(
        &sim,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "1//0nope"),
            ("client_id", "unknown-client"),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_oauth_error(status, &body, 401, "invalid_client");
    let (status, body) = post_token(
        &sim,
        &[
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_oauth_error(status, &body, 400, "unsupported_grant_type");
}

#[tokio::test]
async fn refresh_issues_a_new_access_token_after_expiry() {
    let sim = start().await;
    let body = connect(&sim, &[]).await;
    let first = str_field(&body, "access_token");
    let refresh_token = str_field(&body, "refresh_token");

    sim.expire_access_tokens();
    assert_eq!(
        userinfo_status(&sim, &first).await,
        StatusCode::UNAUTHORIZED
    );

    let (status, refreshed) = refresh(&sim, &refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let second = str_field(&refreshed, "access_token");
    assert_ne!(second, first);
    assert!(
        refreshed.get("refresh_token").is_none(),
        "Google does not rotate"
    );
    assert_eq!(scopes(&refreshed), scopes(&body));
    assert_eq!(userinfo_status(&sim, &second).await, StatusCode::OK);
    assert_eq!(
        sim.current_access_token(DEFAULT_SUBJECT, CLIENT_ID),
        Some(second)
    );
    assert_eq!(sim.refresh_calls(), 1);
    assert_eq!(sim.code_exchange_calls(), 1);
    assert_eq!(sim.calls(Endpoint::Token), 2);

    // The refresh token keeps working (no rotation).
    let (status, _) = refresh(&sim, &refresh_token).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn refresh_by_another_client_is_unauthorized_client() {
    let sim = start().await;
    let refresh_token = str_field(&connect(&sim, &[]).await, "refresh_token");
    let (status, body) = post_token(
        &sim,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh_token),
            ("client_id", OTHER_CLIENT_ID),
            ("client_secret", OTHER_SECRET),
        ],
    )
    .await;
    assert_oauth_error(status, &body, 401, "unauthorized_client");
}

#[tokio::test]
async fn rotation_when_configured_retires_the_used_refresh_token() {
    let sim = start_with(SimConfig {
        rotate_refresh_tokens: true,
        refresh_token_grace: Duration::from_secs(30),
        ..config()
    })
    .await;
    let old = str_field(&connect(&sim, &[]).await, "refresh_token");
    let (status, body) = refresh(&sim, &old).await;
    assert_eq!(status, StatusCode::OK);
    let new = str_field(&body, "refresh_token");
    assert_ne!(new, old);
    // Within the grace period the retired token still works (a client that
    // lost the answer can try again); after it, it is dead.
    let (status, body) = refresh(&sim, &old).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let newer = str_field(&body, "refresh_token");
    sim.advance_clock(Duration::from_secs(31));
    let (status, body) = refresh(&sim, &old).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
    assert_eq!(
        body["error_description"],
        "Token has been expired or revoked."
    );
    assert_eq!(refresh(&sim, &newer).await.0, StatusCode::OK);
}

#[tokio::test]
async fn testing_mode_refresh_tokens_die_seven_days_after_issue() {
    let sim = start_with(SimConfig {
        testing_mode: true,
        ..config()
    })
    .await;
    let token = str_field(&connect(&sim, &[]).await, "refresh_token");
    sim.advance_clock(Duration::from_secs(6 * 86_400));
    assert_eq!(refresh(&sim, &token).await.0, StatusCode::OK, "six days");
    sim.advance_clock(Duration::from_secs(86_400));
    let (status, body) = refresh(&sim, &token).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
    assert_eq!(sim.live_refresh_tokens("sim-user-1", CLIENT_ID), 0);
}

#[tokio::test]
async fn refresh_tokens_unused_for_six_months_stop_working() {
    let sim = start().await;
    let used = str_field(&connect(&sim, &[]).await, "refresh_token");
    let idle = str_field(
        &connect(&sim, &[("prompt", "consent")]).await,
        "refresh_token",
    );
    for _ in 0..4 {
        sim.advance_clock(Duration::from_secs(60 * 86_400));
        assert_eq!(
            refresh(&sim, &used).await.0,
            StatusCode::OK,
            "used every 60 days"
        );
    }
    let (status, body) = refresh(&sim, &idle).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
}

#[tokio::test]
async fn refresh_token_only_on_first_consent_or_prompt_consent() {
    let sim = start().await;
    assert!(
        connect(&sim, &[]).await.get("refresh_token").is_some(),
        "first consent"
    );
    let again = connect(&sim, &[]).await;
    assert!(again.get("refresh_token").is_none(), "already consented");
    assert!(again["access_token"].is_string());
    assert!(
        connect(&sim, &[("prompt", "consent")])
            .await
            .get("refresh_token")
            .is_some(),
        "prompt=consent"
    );
    assert!(
        connect(&sim, &[("prompt", "consent"), ("access_type", "")])
            .await
            .get("refresh_token")
            .is_none(),
        "online access never gets one"
    );
    // A new scope shows the consent screen again.
    assert!(
        connect(&sim, &[("scope", &format!("openid email {GMAIL}"))])
            .await
            .get("refresh_token")
            .is_some(),
        "new scope"
    );
    assert_eq!(sim.live_refresh_tokens(DEFAULT_SUBJECT, CLIENT_ID), 3);
}

#[tokio::test]
async fn prompt_none_needs_an_existing_consent() {
    let sim = start().await;
    let (_, redirect) = authorize(&sim, &[("prompt", "none")]).await;
    assert_eq!(redirect.param("error").as_deref(), Some("consent_required"));
    assert_eq!(redirect.param("code"), None);
    connect(&sim, &[]).await;
    let body = connect(&sim, &[("prompt", "none")]).await;
    assert!(body.get("refresh_token").is_none());
}

#[tokio::test]
async fn partial_consent_is_reflected_in_scope() {
    let sim = start().await;
    sim.set_consent(Consent::Partial(vec![CALENDAR.to_owned()]));
    let (pkce, redirect) = authorize(&sim, &[]).await;
    let redirect_scope = redirect.param("scope").unwrap();
    assert!(!redirect_scope.contains(CALENDAR), "{redirect_scope}");
    let (status, body) = exchange(&sim, &redirect.code(), &pkce.verifier).await;
    assert_eq!(status, StatusCode::OK);
    let granted = scopes(&body);
    assert!(!granted.iter().any(|s| s == CALENDAR), "{granted:?}");
    assert!(granted.iter().any(|s| s == "openid"), "{granted:?}");
    assert!(granted.iter().any(|s| s == USERINFO_EMAIL), "{granted:?}");

    // The refused scope is asked again next time: GrantAll now grants it.
    sim.set_consent(Consent::GrantAll);
    assert!(
        scopes(&connect(&sim, &[]).await)
            .iter()
            .any(|s| s == CALENDAR)
    );
}

#[tokio::test]
async fn include_granted_scopes_returns_earlier_grants() {
    let sim = start().await;
    connect(&sim, &[]).await;
    let body = connect(
        &sim,
        &[("scope", GMAIL), ("include_granted_scopes", "true")],
    )
    .await;
    let granted = scopes(&body);
    assert!(
        granted.iter().any(|s| s == CALENDAR) && granted.iter().any(|s| s == GMAIL),
        "{granted:?}"
    );
    let body = connect(&sim, &[("scope", GMAIL)]).await;
    assert_eq!(scopes(&body), [GMAIL]);
}

#[tokio::test]
async fn denial_redirects_with_access_denied() {
    let sim = start().await;
    sim.set_consent(Consent::Deny);
    let (_, redirect) = authorize(&sim, &[]).await;
    assert!(redirect.0.as_str().starts_with(REDIRECT));
    assert_eq!(redirect.param("error").as_deref(), Some("access_denied"));
    assert_eq!(redirect.param("state").as_deref(), Some("state-123"));
    assert_eq!(redirect.param("code"), None);
}

#[tokio::test]
async fn bad_authorization_requests_get_an_error_page_not_a_redirect() {
    let sim = start().await;
    let p = pkce();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("redirect_uri", "http://127.0.0.1:9/evil")],
            "redirect_uri_mismatch",
        ),
        (vec![("redirect_uri", "")], "invalid_request"),
        (
            vec![("client_id", "unknown.apps.googleusercontent.com")],
            "invalid_client",
        ),
        (
            vec![("response_type", "token")],
            "unsupported_response_type",
        ),
        (vec![("scope", "")], "invalid_request"),
        (vec![("scope", "calendar")], "invalid_scope"),
        (vec![("code_challenge", "")], "invalid_request"),
        (vec![("code_challenge_method", "plain")], "invalid_request"),
        (vec![("access_type", "forever")], "invalid_request"),
        (vec![("prompt", "none consent")], "invalid_request"),
        (vec![("approval_prompt", "force")], "invalid_request"),
    ];
    for (overrides, error) in cases {
        let resp = get_auth(&sim, &auth_params(&p, &overrides)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{overrides:?}");
        assert!(
            resp.headers().get(reqwest::header::LOCATION).is_none(),
            "{overrides:?}"
        );
        let page = resp.text().await.unwrap();
        assert!(page.contains(error), "{overrides:?}: {page}");
    }
    assert_eq!(sim.code_exchange_calls(), 0);
}

#[tokio::test]
async fn login_hint_picks_the_account() {
    let sim = start().await;
    sim.add_user("alice@example.com", "alice-sub");
    let body = connect(&sim, &[("login_hint", "alice@example.com")]).await;
    let claims = jwt_part(&str_field(&body, "id_token"), 1);
    assert_eq!(claims["sub"], "alice-sub");
    assert_eq!(claims["email"], "alice@example.com");
    assert!(sim.current_access_token("alice-sub", CLIENT_ID).is_some());
    assert_eq!(sim.current_access_token(DEFAULT_SUBJECT, CLIENT_ID), None);

    let body = connect(&sim, &[("login_hint", "bob@example.com")]).await;
    let claims = jwt_part(&str_field(&body, "id_token"), 1);
    assert_eq!(claims["email"], "bob@example.com");
    assert_ne!(claims["sub"], DEFAULT_SUBJECT);
    assert_ne!(claims["sub"], "alice-sub");
}

#[tokio::test]
async fn revoking_any_token_revokes_the_whole_grant() {
    let sim = start().await;
    let first = connect(&sim, &[]).await;
    let second = connect(
        &sim,
        &[("prompt", "consent"), ("scope", &format!("openid {GMAIL}"))],
    )
    .await;
    let other_user = connect(&sim, &[("login_hint", "carol@example.com")]).await;
    assert!(!sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID));

    let resp = http()
        .post(sim.revoke_uri())
        .form(&[("token", str_field(&second, "access_token"))])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID));
    assert_eq!(sim.revocations(), 1);

    for body in [&first, &second] {
        let (status, err) = refresh(&sim, &str_field(body, "refresh_token")).await;
        assert_oauth_error(status, &err, 400, "invalid_grant");
        assert_eq!(
            err["error_description"],
            "Token has been expired or revoked."
        );
        assert_eq!(
            userinfo_status(&sim, &str_field(body, "access_token")).await,
            StatusCode::UNAUTHORIZED
        );
    }
    // Another user's grant is untouched.
    assert_eq!(
        refresh(&sim, &str_field(&other_user, "refresh_token"))
            .await
            .0,
        StatusCode::OK
    );

    // Revoking again: Google answers invalid_token.
    let resp = http()
        .post(sim.revoke_uri())
        .form(&[("token", str_field(&first, "refresh_token"))])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"], "invalid_token");
    assert_eq!(sim.revocations(), 1);
    assert_eq!(sim.calls(Endpoint::Revoke), 2);

    // Consenting again is a first consent: a refresh token, and no longer revoked.
    assert!(connect(&sim, &[]).await.get("refresh_token").is_some());
    assert!(!sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID));
}

#[tokio::test]
async fn silent_revocation_at_google_makes_refresh_invalid_grant() {
    let sim = start().await;
    let body = connect(&sim, &[]).await;
    sim.revoke_grant_silently(DEFAULT_SUBJECT);
    let (status, err) = refresh(&sim, &str_field(&body, "refresh_token")).await;
    assert_oauth_error(status, &err, 400, "invalid_grant");
    assert!(
        !sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID),
        "not revoked through the API"
    );
    assert_eq!(sim.revocations(), 0);
    assert_eq!(sim.current_access_token(DEFAULT_SUBJECT, CLIENT_ID), None);
}

#[tokio::test]
async fn the_101st_refresh_token_invalidates_the_oldest() {
    let sim = start().await;
    let mut tokens = Vec::new();
    for _ in 0..101 {
        tokens.push(str_field(
            &connect(&sim, &[("prompt", "consent")]).await,
            "refresh_token",
        ));
    }
    assert_eq!(sim.live_refresh_tokens(DEFAULT_SUBJECT, CLIENT_ID), 100);
    let (status, err) = refresh(&sim, &tokens[0]).await;
    assert_oauth_error(status, &err, 400, "invalid_grant");
    assert_eq!(refresh(&sim, &tokens[1]).await.0, StatusCode::OK);
    assert_eq!(refresh(&sim, &tokens[100]).await.0, StatusCode::OK);
    assert!(!sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID));
}

#[tokio::test]
async fn id_token_verifies_against_the_jwks_and_carries_googles_claims() {
    let sim = start().await;
    let pkce = pkce();
    let resp = get_auth(&sim, &auth_params(&pkce, &[("nonce", "n-0S6_WzA2Mj")])).await;
    let location = resp.headers()[reqwest::header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    let code = Redirect(reqwest::Url::parse(&location).unwrap()).code();
    let (status, body) = exchange(&sim, &code, &pkce.verifier).await;
    assert_eq!(status, StatusCode::OK);
    let id_token = str_field(&body, "id_token");

    let header = jwt_part(&id_token, 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], sim.current_kid());

    let jwks = fetch_jwks(&sim).await;
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["alg"].as_str(),
            key["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    assert_eq!(key["e"], "AQAB");

    let claims = verify_jwt(&id_token, &jwks).expect("id_token verifies");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["azp"], CLIENT_ID);
    assert_eq!(claims["sub"], DEFAULT_SUBJECT);
    assert_eq!(claims["email"], "user1@sim.test");
    assert_eq!(claims["email_verified"], true);
    assert_eq!(claims["nonce"], "n-0S6_WzA2Mj");
    let iat = claims["iat"].as_i64().unwrap();
    assert!((iat - unix_now()).abs() < 60);
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
    let access = str_field(&body, "access_token");
    let at_hash = URL_SAFE_NO_PAD.encode(&digest(&SHA256, access.as_bytes()).as_ref()[..16]);
    assert_eq!(claims["at_hash"], at_hash);

    // A changed payload no longer verifies.
    let parts: Vec<&str> = id_token.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(json!({"sub": "someone-else"}).to_string());
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    assert!(verify_jwt(&forged, &jwks).is_err());
    // Neither does a token signed with the untrusted key under the same kid.
    let untrusted = sim.sign_with_untrusted_key(claims.clone());
    assert_eq!(jwt_part(&untrusted, 0)["kid"], sim.current_kid());
    assert_eq!(
        verify_jwt(&untrusted, &jwks),
        Err("bad signature".to_owned())
    );
}

#[tokio::test]
async fn rotated_signing_keys_stay_in_the_jwks() {
    let sim = start().await;
    let old_kid = sim.current_kid();
    let before = connect(&sim, &[]).await;
    assert_eq!(fetch_jwks(&sim).await["keys"].as_array().unwrap().len(), 1);

    let new_kid = sim.rotate_signing_key();
    assert_ne!(new_kid, old_kid);
    assert_eq!(sim.current_kid(), new_kid);
    let jwks = fetch_jwks(&sim).await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert!(
        kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
        "{kids:?}"
    );

    let after = connect(&sim, &[]).await;
    let id_token = str_field(&after, "id_token");
    assert_eq!(jwt_part(&id_token, 0)["kid"], new_kid);
    assert!(verify_jwt(&id_token, &jwks).is_ok());
    assert!(verify_jwt(&str_field(&before, "id_token"), &jwks).is_ok());
}

#[tokio::test]
async fn risc_events_are_signed_security_event_tokens() {
    let sim = start().await;
    let aud = "123-risc.apps.googleusercontent.com";
    let set = sim.sign_risc_event(
        aud,
        "account-disabled",
        "subject-42",
        json!({"reason": "hijacking"}),
    );
    let claims = verify_jwt(&set, &fetch_jwks(&sim).await).expect("SET verifies");
    assert_eq!(claims["iss"], "https://accounts.google.com/");
    assert_eq!(claims["aud"], aud);
    assert!((claims["iat"].as_i64().unwrap() - unix_now()).abs() < 60);
    assert!(claims.get("exp").is_none());
    let event =
        &claims["events"]["https://schemas.openid.net/secevent/risc/event-type/account-disabled"];
    assert_eq!(
        event,
        &json!({
            "subject": {"subject_type": "iss-sub", "iss": "https://accounts.google.com/", "sub": "subject-42"},
            "reason": "hijacking",
        })
    );
    let other = sim.sign_risc_event(
        aud,
        "https://schemas.openid.net/secevent/risc/event-type/tokens-revoked",
        "subject-42",
        Value::Null,
    );
    let other_claims = jwt_part(&other, 1);
    assert!(other_claims["events"]["https://schemas.openid.net/secevent/risc/event-type/tokens-revoked"].is_object());
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert_ne!(claims["jti"], other_claims["jti"], "fresh jti per event");
}

#[tokio::test]
async fn a_status_fault_applies_n_times_then_the_endpoint_recovers() {
    let sim = start().await;
    let refresh_token = str_field(&connect(&sim, &[]).await, "refresh_token");
    sim.inject(Endpoint::Token, Fault::Status(503), Some(2));
    for _ in 0..2 {
        let (status, body) = refresh(&sim, &refresh_token).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], 503);
        assert_eq!(body["error"]["status"], "UNAVAILABLE");
    }
    let (status, body) = refresh(&sim, &refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.calls(Endpoint::Token), 4);
    assert_eq!(sim.refresh_calls(), 3);
    assert_eq!(sim.code_exchange_calls(), 1);
    assert_eq!(sim.calls(Endpoint::Userinfo), 0);
}

#[tokio::test]
async fn a_fault_until_cleared_and_on_other_endpoints() {
    let sim = start().await;
    let body = connect(&sim, &[]).await;
    sim.inject(Endpoint::Revoke, Fault::Status(500), None);
    sim.inject(Endpoint::Jwks, Fault::Status(502), None);
    sim.inject(Endpoint::Auth, Fault::Status(503), Some(1));
    let revoke = || {
        http()
            .post(sim.revoke_uri())
            .form(&[("token", str_field(&body, "refresh_token"))])
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            revoke().await.unwrap().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert!(
        !sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID),
        "a faulted revoke changes nothing"
    );
    assert_eq!(
        http().get(sim.jwks_uri()).send().await.unwrap().status(),
        StatusCode::BAD_GATEWAY
    );
    let resp = get_auth(&sim, &auth_params(&pkce(), &[])).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().get(reqwest::header::LOCATION).is_none());

    sim.clear_faults();
    assert_eq!(revoke().await.unwrap().status(), StatusCode::OK);
    assert!(sim.grant_revoked(DEFAULT_SUBJECT, CLIENT_ID));
    assert_eq!(sim.calls(Endpoint::Revoke), 4);
    assert_eq!(sim.calls(Endpoint::Jwks), 1);
    assert_eq!(sim.calls(Endpoint::Auth), 2);
}

#[tokio::test]
async fn malformed_json_and_injected_invalid_grant_leave_tokens_alone() {
    let sim = start().await;
    let refresh_token = str_field(&connect(&sim, &[]).await, "refresh_token");
    sim.inject(Endpoint::Token, Fault::MalformedJson, Some(1));
    sim.inject(Endpoint::Token, Fault::InvalidGrant, Some(1));

    let resp = http()
        .post(sim.token_uri())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.as_str()),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let (status, body) = refresh(&sim, &refresh_token).await;
    assert_oauth_error(status, &body, 400, "invalid_grant");
    assert_eq!(
        body["error_description"],
        "Token has been expired or revoked."
    );

    let (status, _) = refresh(&sim, &refresh_token).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the refresh token survived both faults"
    );
    assert_eq!(sim.refresh_calls(), 3);
}

#[tokio::test]
async fn latency_delays_a_normal_answer() {
    let sim = start().await;
    let body = connect(&sim, &[]).await;
    let access = str_field(&body, "access_token");
    let delay = Duration::from_millis(800);
    sim.inject(Endpoint::Userinfo, Fault::Latency(delay), Some(1));
    let started = Instant::now();
    assert_eq!(userinfo_status(&sim, &access).await, StatusCode::OK);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(userinfo_status(&sim, &access).await, StatusCode::OK);
    assert!(
        started.elapsed() < delay,
        "only once: {:?}",
        started.elapsed()
    );
    assert_eq!(sim.calls(Endpoint::Userinfo), 2);
}

#[tokio::test]
async fn a_hung_endpoint_times_clients_out_and_shutdown_ends_it() {
    let sim = start().await;
    sim.inject(Endpoint::Jwks, Fault::Hang, None);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient.get(sim.jwks_uri()).send().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");

    let patient = tokio::spawn(http().get(sim.jwks_uri()).send());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.calls(Endpoint::Jwks) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.calls(Endpoint::Jwks), 2);
    let started = Instant::now();
    sim.clone().shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), patient)
        .await
        .expect("the hung call ends with the simulator")
        .unwrap();
    assert!(answer.is_err() || answer.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE);
    assert!(http().get(sim.jwks_uri()).send().await.is_err(), "stopped");
}

#[tokio::test]
async fn discovery_documents_name_the_endpoints() {
    let sim = start().await;
    let doc: Value = http()
        .get(sim.discovery_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["issuer"], "https://accounts.google.com");
    assert_eq!(doc["authorization_endpoint"], sim.auth_uri());
    assert_eq!(doc["token_endpoint"], sim.token_uri());
    assert_eq!(doc["revocation_endpoint"], sim.revoke_uri());
    assert_eq!(doc["userinfo_endpoint"], sim.userinfo_uri());
    assert_eq!(doc["jwks_uri"], sim.jwks_uri());
    assert!(
        sim.auth_uri().starts_with(&sim.base_url())
            && sim.auth_uri().ends_with("/o/oauth2/v2/auth")
    );
    let risc: Value = http()
        .get(sim.risc_configuration_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(risc["issuer"], "https://accounts.google.com/");
    assert_eq!(risc["jwks_uri"], sim.jwks_uri());
    assert_eq!(sim.calls(Endpoint::Discovery), 2);
}

#[tokio::test]
async fn userinfo_refuses_unknown_tokens() {
    let sim = start().await;
    let resp = http()
        .get(sim.userinfo_uri())
        .bearer_auth("ya29.nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .is_some()
    );
    let resp = http().get(sim.userinfo_uri()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn the_binary_prints_its_urls_and_serves() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenvault-google-sim"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            SECRET,
            "--redirect-uri",
            REDIRECT,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("redirect_uri="))
        .collect();
    let value = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {lines:?}"))
            .to_owned()
    };
    let base = value("base_url");
    assert_eq!(value("auth_uri"), format!("{base}/o/oauth2/v2/auth"));
    assert_eq!(value("token_uri"), format!("{base}/token"));
    assert_eq!(value("client_id"), CLIENT_ID);
    assert!(
        !lines.iter().any(|l| l.contains(SECRET)),
        "secret not printed"
    );
    let discovery = value("discovery_uri");
    let status = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { http().get(&discovery).send().await.map(|r| r.status()) });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn the_oauth2_crate_completes_the_flow_against_the_simulator() {
    use oauth2::basic::{BasicClient, BasicErrorResponseType};
    use oauth2::{
        AuthUrl, AuthorizationCode, ClientId, ClientSecret, ConfigurationError, CsrfToken,
        PkceCodeChallenge, RedirectUrl, RequestTokenError, RevocationUrl, Scope,
        StandardRevocableToken, TokenResponse as _, TokenUrl,
    };

    let sim = start().await;
    // The crate's default client authentication is HTTP Basic.
    let client = BasicClient::new(ClientId::new(CLIENT_ID.to_owned()))
        .set_client_secret(ClientSecret::new(SECRET.to_owned()))
        .set_auth_uri(AuthUrl::new(sim.auth_uri()).unwrap())
        .set_token_uri(TokenUrl::new(sim.token_uri()).unwrap())
        .set_revocation_url(RevocationUrl::new(sim.revoke_uri()).unwrap())
        .set_redirect_uri(RedirectUrl::new(REDIRECT.to_owned()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("openid".to_owned()))
        .add_scope(Scope::new("email".to_owned()))
        .add_scope(Scope::new(CALENDAR.to_owned()))
        .set_pkce_challenge(challenge)
        .add_extra_param("access_type", "offline")
        .url();
    let resp = http().get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    let location = resp.headers()[reqwest::header::LOCATION].to_str().unwrap();
    let redirect = Redirect(reqwest::Url::parse(location).unwrap());
    assert_eq!(
        redirect.param("state").as_deref(),
        Some(csrf.secret().as_str())
    );

    let http = http();
    let token = client
        .exchange_code(AuthorizationCode::new(redirect.code()))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .expect("code exchange");
    let granted: Vec<&str> = token.scopes().unwrap().iter().map(|s| s.as_str()).collect();
    assert!(
        granted.contains(&CALENDAR) && granted.contains(&USERINFO_EMAIL),
        "{granted:?}"
    );
    let refresh_token = token.refresh_token().expect("refresh token").clone();
    let refreshed = client
        .exchange_refresh_token(&refresh_token)
        .request_async(&http)
        .await
        .expect("refresh");
    assert_ne!(
        refreshed.access_token().secret(),
        token.access_token().secret()
    );

    // A 503 is not an OAuth error body: the crate reports a parse failure.
    sim.inject(Endpoint::Token, Fault::Status(503), Some(1));
    let err = client
        .exchange_refresh_token(&refresh_token)
        .request_async(&http)
        .await
        .unwrap_err();
    assert!(matches!(err, RequestTokenError::Parse(..)), "{err:?}");

    // oauth2 refuses to send a revocation to a non-https URL (RFC 7009), so a
    // client revoking against the simulator must POST `token=` itself.
    let revocation =
        client.revoke_token(StandardRevocableToken::RefreshToken(refresh_token.clone()));
    assert!(matches!(
        revocation,
        Err(ConfigurationError::InsecureUrl(_))
    ));
    sim.revoke_grant_silently(DEFAULT_SUBJECT);
    match client
        .exchange_refresh_token(&refresh_token)
        .request_async(&http)
        .await
    {
        Err(RequestTokenError::ServerResponse(r)) => {
            assert_eq!(*r.error(), BasicErrorResponseType::InvalidGrant);
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }
}
