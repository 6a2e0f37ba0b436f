//! tokenvault: the service that holds a CRM's Google OAuth tokens. It runs the
//! OAuth flows, keeps tokens envelope-encrypted at rest, leases short-lived
//! access tokens to sync workers for a stated purpose, and deletes tokens
//! immediately — everywhere — when a user disconnects or deletes an account.
//!
//! Layers, outermost first: transports (`grpc`, `http`, `cli`) call use cases
//! (`vault`), which use the domain (`domain`), key material (`crypto`),
//! persistence (`store`), the audit log (`audit`) and events (`events`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod fuzzing;
pub mod google;
pub mod grpc;
pub mod http;
pub mod policy;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod vault;
