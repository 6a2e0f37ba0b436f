//! RS256 JSON Web Tokens: Google's id_tokens (and, later, RISC security
//! event tokens), verified with ring against a JWKS that is cached and
//! refetched when a token names an unknown key id.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use serde::Deserialize;

use super::calls::{CallStatus, CallTimer, GoogleEndpoint};

/// Why a token was refused. Never carries the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// The header's algorithm is not RS256.
    #[error("unsupported algorithm")]
    Algorithm,
    /// No key in the JWKS has the token's key id, even after refetching.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// A claim is missing or wrong (named).
    #[error("claim {0} is invalid")]
    Claim(&'static str),
    /// The JWKS could not be fetched or parsed.
    #[error("signing keys unavailable: {0}")]
    Jwks(String),
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// A JWKS fetched over HTTP, cached, and refetched (at most once per
/// `min_refetch`) when a token names a key id it does not hold.
pub struct JwksCache {
    url: String,
    http: reqwest::Client,
    keys: RwLock<(HashMap<String, RsaKey>, Option<Instant>)>,
    min_refetch: Duration,
}

impl JwksCache {
    /// A cache for the JWKS at `url`.
    pub fn new(url: String, http: reqwest::Client) -> Self {
        Self {
            url,
            http,
            keys: RwLock::new((HashMap::new(), None)),
            min_refetch: Duration::from_secs(5),
        }
    }

    async fn refetch(&self) -> Result<(), JwtError> {
        let fetched = self
            .keys
            .read()
            .map_err(|_| JwtError::Jwks("lock".into()))?
            .1;
        if fetched.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return Ok(());
        }
        let timer = CallTimer::start(GoogleEndpoint::Jwks);
        let sent = self.http.get(&self.url).send().await;
        timer.finish(match &sent {
            Ok(resp) => CallStatus::Http(resp.status().as_u16()),
            Err(e) => CallStatus::of_error(e),
        });
        let resp = sent
            .map_err(|e| JwtError::Jwks(format!("fetching {}: {}", self.url, e.without_url())))?;
        if !resp.status().is_success() {
            return Err(JwtError::Jwks(format!(
                "{} answered {}",
                self.url,
                resp.status()
            )));
        }
        let set: JwkSet = resp
            .json()
            .await
            .map_err(|e| JwtError::Jwks(format!("{}: {}", self.url, e.without_url())))?;
        let mut keys = HashMap::new();
        for k in set.keys {
            if let (true, Some(kid), Some(n), Some(e)) = (k.kty == "RSA", k.kid, k.n, k.e) {
                let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
                    continue;
                };
                keys.insert(kid, RsaKey { n, e });
            }
        }
        *self
            .keys
            .write()
            .map_err(|_| JwtError::Jwks("lock".into()))? = (keys, Some(Instant::now()));
        Ok(())
    }

    /// Verifies an RS256 token's signature and returns its claims as JSON.
    /// Claims are the caller's to check.
    pub async fn verify(&self, token: &str) -> Result<serde_json::Value, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h)?;
        if header.alg != "RS256" {
            return Err(JwtError::Algorithm);
        }
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let signed = &token[..h.len() + 1 + p.len()];
        if !self.has_key(&kid) {
            self.refetch().await?;
        }
        let guard = self
            .keys
            .read()
            .map_err(|_| JwtError::Jwks("lock".into()))?;
        let key = guard.0.get(&kid).ok_or(JwtError::UnknownKey)?;
        RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(&RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &signature)
        .map_err(|_| JwtError::Signature)?;
        decode_json(p)
    }

    fn has_key(&self, kid: &str) -> bool {
        self.keys.read().is_ok_and(|k| k.0.contains_key(kid))
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// What the vault learns from a verified id_token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdClaims {
    /// Google's stable account id.
    pub subject: String,
    /// The account's email.
    pub email: String,
}

/// Checks an id_token's claims: issuer, audience, expiry (with a minute of
/// leeway for clock skew) and presence of `sub` and `email`.
pub fn check_id_claims(
    claims: &serde_json::Value,
    issuers: &[String],
    client_id: &str,
    now_secs: i64,
) -> Result<IdClaims, JwtError> {
    const LEEWAY: i64 = 60;
    let iss = claims["iss"].as_str().ok_or(JwtError::Claim("iss"))?;
    if !issuers.iter().any(|i| i == iss) {
        return Err(JwtError::Claim("iss"));
    }
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == client_id,
        serde_json::Value::Array(a) => a.iter().any(|v| v.as_str() == Some(client_id)),
        _ => false,
    };
    if !aud_ok {
        return Err(JwtError::Claim("aud"));
    }
    let exp = claims["exp"].as_i64().ok_or(JwtError::Claim("exp"))?;
    if exp + LEEWAY < now_secs {
        return Err(JwtError::Claim("exp"));
    }
    if claims["iat"]
        .as_i64()
        .is_some_and(|iat| iat - LEEWAY > now_secs)
    {
        return Err(JwtError::Claim("iat"));
    }
    let subject = claims["sub"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or(JwtError::Claim("sub"))?;
    let email = claims["email"].as_str().ok_or(JwtError::Claim("email"))?;
    Ok(IdClaims {
        subject: subject.to_owned(),
        email: email.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn id_claims_check_issuer_audience_and_expiry() {
        let iss = vec!["https://accounts.google.com".to_owned()];
        let good = json!({"iss": "https://accounts.google.com", "aud": "cid", "exp": 1000, "iat": 900, "sub": "123", "email": "a@b"});
        assert_eq!(
            check_id_claims(&good, &iss, "cid", 950).unwrap().subject,
            "123"
        );
        assert_eq!(
            check_id_claims(&good, &iss, "other", 950),
            Err(JwtError::Claim("aud"))
        );
        assert_eq!(
            check_id_claims(&good, &iss, "cid", 2000),
            Err(JwtError::Claim("exp"))
        );
        let mut bad_iss = good.clone();
        bad_iss["iss"] = json!("https://evil.example");
        assert_eq!(
            check_id_claims(&bad_iss, &iss, "cid", 950),
            Err(JwtError::Claim("iss"))
        );
        let mut no_sub = good.clone();
        no_sub["sub"] = json!("");
        assert_eq!(
            check_id_claims(&no_sub, &iss, "cid", 950),
            Err(JwtError::Claim("sub"))
        );
    }
}
