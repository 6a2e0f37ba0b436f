//! tokenvault: the service that holds a CRM's Google OAuth tokens. It runs the
//! OAuth flows, keeps tokens envelope-encrypted at rest, leases short-lived
//! access tokens to sync workers for a stated purpose, and deletes tokens
//! immediately — everywhere — when a user disconnects or deletes an account.
//!
//! Layers, outermost first: transports (`grpc`, `http`, `cli`) call use cases
//! (`vault`), which use the domain (`domain`), key material (`crypto`),
//! persistence (`store`), the audit log (`audit`), the access policy
//! (`policy`) and Google (`google`). The event log is part of the use cases
//! (`vault`) and the store; `grpc` serves it as `EventService`.
//!
//! Modules:
//! - `audit`: the tamper-evident, hash-chained audit log, its signed checkpoints, their
//!   witness outside the database, and verification.
//! - `cli`: the command line: `serve`, offline `keys`, the `admin` and `dev` clients.
//! - `config`: configuration from a TOML file and `TOKENVAULT_*` variables.
//! - `crypto`: keyring providers, envelope encryption and secret types.
//! - `domain`: identifiers, value types and the one error type, parsed at the edge.
//! - `files`: files the vault creates, owner-only (0600).
//! - `fuzzing`: database-free entry points into the network parsers, for fuzzing.
//! - `google`: the OAuth client for Google, JWT verification and, with the
//!   `google-sim` feature (not in the product build), a Google simulator.
//! - `grpc`: the gRPC transport: authentication, role checks, handlers, mTLS listener.
//! - `http`: the HTTP side port: health, OAuth callback, metrics, RISC receiver.
//! - `limits`: every limit on what a caller sends (sizes, lengths, page sizes), in one place.
//! - `policy`: which identity holds which role, purposes and event consumers.
//! - `proto`: the generated `tokenvault.v1` API and its descriptor set.
//! - `server`: binds the listeners, serves, and shuts down gracefully.
//! - `store`: the `Store` trait with its SQLite and PostgreSQL backends.
//! - `telemetry`: tracing set-up, OpenTelemetry trace export (OTLP), the Prometheus metrics
//!   recorder and the process metrics.
//! - `vault`: the use cases: authorization flow, leases, deletion, events, keys, RISC, sweeper.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod files;
pub mod fuzzing;
pub mod google;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod policy;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod vault;
