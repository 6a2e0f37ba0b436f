//! The HTTP side port: `GET /healthz` for load balancers and
//! `GET /oauth/callback`, Google's redirect target, and `GET /metrics`
//! (Prometheus, on `http.metrics_addr` instead when one is set), and
//! `POST /risc`, Google's Cross-Account Protection receiver. [`serve`] holds
//! the connections and what a client may cost; the routes here see a request
//! only once its body is read, within [`body_limit`].

pub mod serve;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use crate::crypto::SecretString;
use crate::domain::{ConnectionStatus, VaultError};
use crate::limits::MAX_RISC_BODY_BYTES;
use crate::vault::{Completer, Completion, ID_TOKEN_REFUSED, RiscError, Vault};

/// Builds the HTTP router; `with_metrics` false leaves `/metrics` to
/// [`metrics_router`] on its own address.
pub fn router(vault: Arc<Vault>, with_metrics: bool) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/oauth/callback", get(oauth_callback))
        .route("/risc", post(risc));
    let router = if with_metrics {
        router.route("/metrics", get(metrics))
    } else {
        router
    };
    router.with_state(vault)
}

/// The router of `http.metrics_addr`: `/metrics` and `/healthz`.
pub fn metrics_router(vault: Arc<Vault>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(vault)
}

/// What [`serve`] reads of a request's body before routing it: at most
/// `bytes`, and `too_large` answers a larger one.
pub struct BodyLimit {
    /// The largest body read.
    pub bytes: usize,
    /// The answer to a larger body.
    pub too_large: fn() -> Response,
}

/// The body limit of a path: a Security Event Token for `/risc`, nothing
/// for the `GET` routes.
pub fn body_limit(path: &str) -> BodyLimit {
    match path {
        "/risc" => BodyLimit {
            bytes: MAX_RISC_BODY_BYTES,
            too_large: || risc_invalid("token too large".to_owned()),
        },
        _ => BodyLimit {
            bytes: 0,
            too_large: || (StatusCode::PAYLOAD_TOO_LARGE, "no body expected\n").into_response(),
        },
    }
}

/// RFC 8935's answer to an invalid Security Event Token: 400 with an error
/// body; nothing changed.
fn risc_invalid(description: String) -> Response {
    metrics::counter!("tokenvault_risc_events_total", "outcome" => "invalid").increment(1);
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"err": "invalid_request", "description": description}).to_string(),
    )
        .into_response()
}

/// 200 `ok` when the database answers and the primary key works; 503 otherwise.
async fn healthz(State(vault): State<Arc<Vault>>) -> (StatusCode, String) {
    match vault.health().await {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n".to_owned())
        }
    }
}

/// `POST /risc`: a Security Event Token (RFC 8417) as the body (RFC 8935
/// push delivery). 202 when accepted, 400 with an RFC 8935 error body when
/// invalid (nothing changed), 503 when the vault cannot process it now
/// (Google retries).
async fn risc(State(vault): State<Arc<Vault>>, body: axum::body::Bytes) -> Response {
    let bad = risc_invalid;
    if body.len() > MAX_RISC_BODY_BYTES {
        return bad("token too large".to_owned());
    }
    let Ok(token) = std::str::from_utf8(&body) else {
        return bad("body is not a token".to_owned());
    };
    match vault.risc_receive(token).await {
        Ok(()) => {
            metrics::counter!("tokenvault_risc_events_total", "outcome" => "accepted").increment(1);
            StatusCode::ACCEPTED.into_response()
        }
        Err(RiscError::Vault(e)) => {
            tracing::warn!(error = %e, "RISC event not processed; Google will retry");
            (StatusCode::SERVICE_UNAVAILABLE, "try again later\n").into_response()
        }
        Err(e) => {
            tracing::info!(error = %e, "RISC token refused");
            bad(e.to_string())
        }
    }
}

/// Prometheus text exposition. Key-state gauges are computed at scrape time,
/// and the `process_*` families read from `/proc` then.
async fn metrics(State(vault): State<Arc<Vault>>) -> Response {
    let Some(handle) = crate::telemetry::metrics() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n",
        )
            .into_response();
    };
    metrics::gauge!("tokenvault_dek_cache_entries").set(vault.keys().cached_deks() as f64);
    match vault.keys().status().await {
        Ok(status) => {
            metrics::gauge!("tokenvault_kek_primary_version").set(f64::from(status.primary.get()));
            for v in &status.versions {
                metrics::gauge!("tokenvault_kek_deks", "version" => v.record.version.to_string())
                    .set(v.dek_count as f64);
            }
            metrics::gauge!("tokenvault_kek_oldest_in_use_age_seconds")
                .set(status.oldest_in_use_age.as_secs_f64());
            metrics::gauge!("tokenvault_kek_rotation_overdue").set(if status.rotation_overdue {
                1.0
            } else {
                0.0
            });
            if let Some(r) = &status.rotation {
                metrics::gauge!("tokenvault_rotation_rewrapped").set(r.run.rewrapped as f64);
                metrics::gauge!("tokenvault_rotation_done").set(r.done as f64);
                metrics::gauge!("tokenvault_rotation_deks").set(r.run.total as f64);
                metrics::gauge!("tokenvault_rotation_running").set(if r.run.state == "running" {
                    1.0
                } else {
                    0.0
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "key status unavailable for metrics"),
    }
    (
        [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
        crate::telemetry::render(handle),
    )
        .into_response()
}

/// Google's redirect: completes the authorization, then sends the browser to
/// the configured return URL with the outcome (or shows a short page).
async fn oauth_callback(
    State(vault): State<Arc<Vault>>,
    Query(mut params): Query<HashMap<String, String>>,
) -> Response {
    let state = params.remove("state").unwrap_or_default();
    let completion = match (params.remove("code"), params.remove("error")) {
        (_, Some(error)) => Completion::Error(
            error,
            params.remove("error_description").unwrap_or_default(),
        ),
        (Some(code), None) => Completion::Code(SecretString::new(code)),
        (None, None) => Completion::Code(SecretString::new(String::new())),
    };
    let outcome = vault
        .authorization_complete(Completer::Browser, &state, completion)
        .await;
    let (status, query, page) = match &outcome {
        Ok(c) if c.status == ConnectionStatus::ConsentRequired => (
            StatusCode::OK,
            format!(
                "status=consent_required&connection_id={}&integration={}",
                c.id, c.integration
            ),
            "Google did not grant lasting access, so the connection is not usable yet. \
             Connect again and confirm Google's consent screen."
                .to_owned(),
        ),
        Ok(c) => (
            StatusCode::OK,
            format!(
                "status=connected&connection_id={}&integration={}",
                c.id, c.integration
            ),
            "Connected. You can close this window.".to_owned(),
        ),
        Err(e) => {
            let (code, reason) = match e {
                VaultError::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
                VaultError::FailedPrecondition(m) if m.starts_with(ID_TOKEN_REFUSED) => {
                    (StatusCode::BAD_REQUEST, "id_token_invalid")
                }
                VaultError::FailedPrecondition(_) => (StatusCode::BAD_REQUEST, "access_denied"),
                VaultError::Unavailable(_)
                | VaultError::AuditUnavailable(_)
                | VaultError::KeyVersionChanged(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            };
            let advice = match reason {
                "id_token_invalid" => {
                    " Google's answer could not be verified, so nothing was connected. \
                     Start connecting again; if this keeps happening, tell your administrator."
                }
                "temporarily_unavailable" => " Nothing was connected. Try again in a few minutes.",
                _ => " Nothing was connected. Start connecting again.",
            };
            (
                code,
                format!("status=error&error={reason}"),
                format!("The connection failed ({reason}).{advice}"),
            )
        }
    };
    match vault.return_url() {
        Some(base) => {
            let sep = if base.contains('?') { '&' } else { '?' };
            (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, format!("{base}{sep}{query}"))],
            )
                .into_response()
        }
        None => (
            status,
            Html(format!(
                "<!doctype html><title>tokenvault</title><p>{page}</p>\n"
            )),
        )
            .into_response(),
    }
}
