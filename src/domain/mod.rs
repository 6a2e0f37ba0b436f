//! Domain vocabulary: identifiers, integrations, scopes, purposes and the one
//! transport-agnostic error type. Everything here is parsed once at the edge
//! (gRPC, HTTP, CLI, config) so that invalid input never reaches storage.

mod error;
mod ids;
mod types;

pub use error::{Detail, ERROR_DOMAIN, ErrorReason, VaultError, excerpt, scope_list};
pub use ids::{AccountId, ConnectionId, ConsumerName, LeaseId, ReceiptId, TenantId};
pub use types::{
    ConnectionStatus, DeletionReason, EventKind, Integration, KeyState, Purpose, Scope, ScopeSet,
    Timestamp, UpstreamState,
};
