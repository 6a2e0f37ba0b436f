//! The one integration-test binary: every behaviour test runs against the
//! real server over TCP, on SQLite and on PostgreSQL.

#[path = "../support/mod.rs"]
mod support;

mod admin_cli;
mod audit_archive;
mod audit_chains;
mod audit_log;
mod audit_witness;
mod authz_matrix;
mod bounds;
mod claims;
mod deletion;
mod dev_tour;
mod encryption;
mod events;
mod fail_closed;
mod file_modes;
mod foundation;
mod google_lifecycle;
mod google_sim;
mod http_port;
mod identities;
mod key_custody;
mod key_registry;
pub mod malformed;
mod metrics;
mod mtls;
mod oauth;
mod oauth_states;
mod otlp;
mod packaging;
mod plaintext;
mod properties;
mod python_worker;
mod refusals;
mod reload;
mod replicas;
mod resilience;
mod rotation;
pub mod serve_cli;
mod store_contract;
mod tenants;
