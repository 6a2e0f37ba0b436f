//! The HTTP side port: `GET /healthz` for load balancers (and, as the other
//! issues land, the OAuth callback, the RISC receiver and metrics).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::vault::Vault;

/// Builds the HTTP router.
pub fn router(vault: Arc<Vault>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(vault)
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
