//! Google Cross-Account Protection (RISC): Security Event Tokens (RFC 8417)
//! delivered to `POST /risc`.
//!
//! A token is accepted only when its RS256 signature verifies against the
//! configured RISC JWKS (cached; refetched on an unknown `kid`), `iss` is the
//! configured issuer, `aud` is one of the accepted client ids, `iat` is recent
//! and its `jti` was not seen before. Then:
//! - `tokens-revoked` / `token-revoked` for a Google subject: the deletion
//!   cascade for every live connection on that account, reason
//!   USER_REVOKED_AT_GOOGLE (nothing to revoke upstream);
//! - `account-disabled` with reason `hijacking`: its connections are
//!   SUSPENDED (no leases; leases revoked; events written);
//! - `account-enabled`: suspended connections RESUME;
//! - anything else is audited and acknowledged.

use std::time::Duration;

use serde_json::Value;

use crate::audit::{Actor, Outcome};
use crate::config::Config;
use crate::domain::{DeletionReason, Timestamp, VaultError};
use crate::google::JwksCache;
use crate::store::DeletionTarget;

use super::Vault;

/// The RISC event-type URI prefix.
const EVENT_PREFIX: &str = "https://schemas.openid.net/secevent/risc/event-type/";

/// How far in the future an `iat` may be (clock skew).
const MAX_SKEW_SECONDS: i64 = 300;

/// Why a token was refused (answered 400). Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum RiscError {
    /// Signature, claims or structure are wrong.
    #[error("{0}")]
    Invalid(String),
    /// This `jti` was processed before.
    #[error("replayed token (jti seen before)")]
    Replayed,
    /// The vault could not process it (answered 5xx; Google retries).
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// The verifier's configuration and key cache.
pub(super) struct RiscReceiver {
    jwks: JwksCache,
    issuer: String,
    audiences: Vec<String>,
    max_age: Duration,
}

impl RiscReceiver {
    pub(super) fn new(config: &Config) -> Result<Self, VaultError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(config.google.connect_timeout_ms))
            .timeout(Duration::from_millis(config.google.request_timeout_ms))
            .build()
            .map_err(|e| VaultError::Internal(format!("building the HTTP client: {e}").into()))?;
        let audiences = if config.risc.audiences.is_empty() {
            vec![config.google.client_id.clone()]
                .into_iter()
                .filter(|c| !c.is_empty())
                .collect()
        } else {
            config.risc.audiences.clone()
        };
        Ok(Self {
            jwks: JwksCache::new(config.risc.jwks_uri.clone(), http),
            issuer: config.risc.issuer.clone(),
            audiences,
            max_age: Duration::from_secs(config.risc.max_age_seconds),
        })
    }
}

/// A verified Security Event Token.
struct SecurityEvent {
    jti: String,
    events: Vec<(String, Value)>,
}

fn invalid(why: impl Into<String>) -> RiscError {
    RiscError::Invalid(why.into())
}

impl Vault {
    /// Verifies and processes one Security Event Token.
    #[tracing::instrument(name = "risc", skip_all)]
    pub async fn risc_receive(&self, token: &str) -> Result<(), RiscError> {
        let set = self.risc_verify(token).await?;
        if self.store().risc_seen(&set.jti).await? {
            return Err(RiscError::Replayed);
        }
        let google = Actor {
            identity: "google".to_owned(),
            role: "system".to_owned(),
        };
        for (event_type, event) in &set.events {
            self.risc_event(&google, &set.jti, event_type, event)
                .await?;
        }
        if !self
            .store()
            .risc_seen_insert(&set.jti, Timestamp::now())
            .await?
        {
            // A concurrent delivery of the same token got there first; the
            // processing above is idempotent.
            tracing::debug!(jti = %set.jti, "RISC token delivered twice concurrently");
        }
        Ok(())
    }

    async fn risc_verify(&self, token: &str) -> Result<SecurityEvent, RiscError> {
        let receiver = &self.risc;
        if receiver.audiences.is_empty() {
            return Err(invalid(
                "no audience configured (risc.audiences or google.client_id)",
            ));
        }
        let claims = receiver
            .jwks
            .verify(token.trim())
            .await
            .map_err(|e| match e {
                crate::google::JwtError::Jwks(_) => RiscError::Vault(VaultError::Unavailable(
                    format!("RISC signing keys unavailable: {e}").into(),
                )),
                other => invalid(other.to_string()),
            })?;
        if claims.get("iss").and_then(Value::as_str) != Some(receiver.issuer.as_str()) {
            return Err(invalid("iss is not the configured RISC issuer"));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => receiver.audiences.iter().any(|x| x == a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| receiver.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(invalid("aud is not an accepted client id"));
        }
        let iat = claims
            .get("iat")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid("iat missing"))?;
        let now = Timestamp::now().seconds_nanos().0;
        let max_age = i64::try_from(receiver.max_age.as_secs()).unwrap_or(i64::MAX);
        // Saturating: `iat` is the sender's and may be i64::MIN.
        if iat > now.saturating_add(MAX_SKEW_SECONDS) || now.saturating_sub(iat) > max_age {
            return Err(invalid("iat is not recent"));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256 && j.chars().all(|c| c.is_ascii_graphic()))
            .ok_or_else(|| invalid("jti missing or malformed"))?
            .to_owned();
        let events = match claims.get("events") {
            Some(Value::Object(map)) if !map.is_empty() => {
                map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            _ => return Err(invalid("events missing")),
        };
        Ok(SecurityEvent { jti, events })
    }

    async fn risc_event(
        &self,
        google: &Actor,
        jti: &str,
        event_type: &str,
        event: &Value,
    ) -> Result<(), RiscError> {
        let kind = event_type.strip_prefix(EVENT_PREFIX).unwrap_or(event_type);
        let subject = event.get("subject");
        let sub = subject
            .filter(|s| s.get("subject_type").and_then(Value::as_str) == Some("iss-sub"))
            .and_then(|s| s.get("sub"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256);
        let reason = event.get("reason").and_then(Value::as_str).unwrap_or("");
        let detail = format!("jti={jti} type={kind} reason={reason:?}");
        let Some(sub) = sub else {
            self.audit()
                .record(
                    google,
                    "risc.event",
                    kind,
                    Outcome::Ok,
                    format!("{detail} (no iss-sub subject; nothing to match)"),
                )
                .await?;
            return Ok(());
        };
        let target = format!(
            "google-subject:{}",
            crate::crypto::fingerprint(self.keyring().as_ref(), sub.as_bytes())
        );
        self.audit()
            .record(google, "risc.event", &target, Outcome::Ok, detail.clone())
            .await?;
        match kind {
            "tokens-revoked" | "token-revoked" => {
                for conn in self.store().connections_by_subject(sub).await? {
                    self.delete(
                        google,
                        DeletionTarget::Connection(conn.id.clone()),
                        DeletionReason::UserRevokedAtGoogle,
                        &format!("RISC {kind}"),
                    )
                    .await?;
                }
            }
            "account-disabled" if reason == "hijacking" => {
                let changed = self
                    .store()
                    .connections_suspend(sub, true, "hijacking", Timestamp::now())
                    .await?;
                changed.iter().for_each(|id| self.reader.forget(id));
                self.refresh_event_head().await;
                tracing::warn!(
                    connections = changed.len(),
                    "RISC account-disabled (hijacking): connections suspended"
                );
            }
            "account-enabled" => {
                let changed = self
                    .store()
                    .connections_suspend(sub, false, "account-enabled", Timestamp::now())
                    .await?;
                changed.iter().for_each(|id| self.reader.forget(id));
                self.refresh_event_head().await;
                tracing::info!(
                    connections = changed.len(),
                    "RISC account-enabled: connections resumed"
                );
            }
            _ => {}
        }
        Ok(())
    }
}
