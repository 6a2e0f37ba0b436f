//! Storage: one trait per aggregate, each in its own module, and one
//! implementation of every trait per backend: SQLite (the embedded default)
//! and PostgreSQL (production, shared by replicas).
//!
//! | module | trait | what it keeps |
//! |---|---|---|
//! | [`keys`] | [`KeyStore`] | KEK versions, root-key checks, keyring claims, replicas |
//! | [`rotation`] | [`RotationStore`] | rotation runs and the rewrap of wrapped keys |
//! | [`connections`] | [`ConnectionStore`] | connections and their sealed secrets |
//! | [`oauth_states`] | [`OAuthStateStore`] | pending authorization states |
//! | [`refresh`] | [`RefreshStore`] | refresh locks (single flight), the sweeper's claims |
//! | [`leases`] | [`LeaseStore`] | lease records and the lease path's batched read |
//! | [`audit`] | [`AuditStore`] | the hash-chained audit log and its checkpoints |
//! | [`events`] | [`EventStore`] | the event log and consumers' positions |
//! | [`deletion`] | [`DeletionStore`] | deletion, receipts, retention |
//! | [`outbox`] | [`OutboxStore`] | upstream revocations still to make |
//! | [`risc`] | [`RiscStore`] | RISC suspensions and replay protection |
//!
//! [`Store`] is all of them together, plus what belongs to the database as a
//! whole (`ping`, `close`, `clock`).
//!
//! Invariants every implementation keeps:
//! - methods are named resource-first, and every method that changes several
//!   rows does so in one transaction;
//! - SQL uses `$N` placeholders in ascending order of first use, which both
//!   drivers bind by number;
//! - the SQL both backends share is written once in the aggregate's module
//!   and compiled once per backend by [`for_each_backend!`]; the few
//!   statements that differ are the backend's `dialect` (`sqlite.rs`,
//!   `postgres.rs`) or sit in the aggregate's `sqlite { }` / `postgres { }`
//!   block next to the query that uses them.

/// Compiles the items given once per backend, in the manner of vaultwarden's
/// `db_run!`: they are stamped into a `mod sqlite` and a `mod postgres`, each
/// of which sees its parent's imports, its backend's dialect (`Db`, the sqlx
/// database; `StoreImpl`, the store type; the statements that differ) and the
/// helpers `common.rs` stamps the same way. Items that only one backend needs
/// go in the leading `sqlite { }` / `postgres { }` blocks.
///
/// sqlx's query API is generic over the database, but code generic over it
/// needs a bound for every type it binds or decodes, and Rust does not imply
/// those bounds from a trait; a compile-time copy per backend keeps the SQL
/// readable and each copy monomorphic.
macro_rules! for_each_backend {
    (common; $($item:item)*) => {
        pub(in crate::store) mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use crate::store::Store as _;
            #[allow(unused_imports)]
            use crate::store::sqlite::dialect::*;
            $($item)*
        }
        pub(in crate::store) mod postgres {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use crate::store::Store as _;
            #[allow(unused_imports)]
            use crate::store::postgres::dialect::*;
            $($item)*
        }
    };
    (sqlite { $($s:item)* } postgres { $($p:item)* } $($item:item)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use crate::store::Store as _;
            #[allow(unused_imports)]
            use crate::store::sqlite::dialect::*;
            #[allow(unused_imports)]
            use crate::store::common::*;
            #[allow(unused_imports)]
            use crate::store::common::sqlite::*;
            $($s)*
            $($item)*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use crate::store::Store as _;
            #[allow(unused_imports)]
            use crate::store::postgres::dialect::*;
            #[allow(unused_imports)]
            use crate::store::common::*;
            #[allow(unused_imports)]
            use crate::store::common::postgres::*;
            $($p)*
            $($item)*
        }
    };
    ($($item:item)*) => {
        for_each_backend! { sqlite {} postgres {} $($item)* }
    };
}

pub mod audit;
mod common;
pub mod connections;
pub mod deletion;
pub mod events;
pub mod keys;
pub mod leases;
pub mod oauth_states;
pub mod outbox;
mod postgres;
mod records;
pub mod refresh;
pub mod risc;
pub mod rotation;
mod sqlite;

use std::str::FromStr;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use records::*;
pub use sqlite::SqliteStore;

pub use audit::AuditStore;
pub use connections::ConnectionStore;
pub use deletion::DeletionStore;
pub use events::EventStore;
pub use keys::KeyStore;
pub use leases::LeaseStore;
pub use oauth_states::OAuthStateStore;
pub use outbox::OutboxStore;
pub use refresh::RefreshStore;
pub use risc::RiscStore;
pub use rotation::RotationStore;

use crate::domain::{Timestamp, VaultError};

/// Result alias for storage calls.
pub type StoreResult<T> = Result<T, VaultError>;

/// Which database engine a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file (the embedded default).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Computes an audit entry's hash, MAC and (at checkpoint positions) signed
/// checkpoint given its sequence number and the previous entry's hash;
/// supplied by the audit component so that the store never holds the audit key.
pub type AuditSealer<'a> = &'a (dyn Fn(i64, &[u8], &AuditDraft) -> SealedEntry + Sync);

/// Everything the vault persists.
#[async_trait]
pub trait Store:
    KeyStore
    + ConnectionStore
    + OAuthStateStore
    + RefreshStore
    + RotationStore
    + AuditStore
    + LeaseStore
    + EventStore
    + DeletionStore
    + OutboxStore
    + RiscStore
    + Send
    + Sync
    + 'static
{
    /// The engine behind this store.
    fn backend(&self) -> Backend;

    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Closes the pool, waiting for checked-out connections.
    async fn close(&self);

    /// The database's clock, which every replica's heartbeat is stamped and judged by.
    async fn clock(&self) -> StoreResult<Timestamp>;

    /// Makes the space of rows a prune deleted from `tables` reusable, where
    /// the database would not do it by itself: on a PostgreSQL server whose
    /// autovacuum is off, `VACUUM`s them (which takes no lock that writers
    /// wait on) and returns true. SQLite reuses freed pages by itself, and a
    /// PostgreSQL server with autovacuum on vacuums them as they churn (the
    /// migrations tune their thresholds); both return false.
    async fn reclaim(&self, tables: &[&'static str]) -> StoreResult<bool>;
}

/// Opens the store named by a database URL and applies migrations.
pub async fn open(database_url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PostgresStore::connect(database_url).await?,
        ))
    } else if database_url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            SqliteStore::connect(database_url).await?,
        ))
    } else {
        Err(VaultError::invalid(
            "database_url",
            "must start with sqlite: or postgres://",
        ))
    }
}

/// Validates a database URL without connecting (for configuration checks).
pub fn validate_url(database_url: &str) -> Result<(), String> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(database_url)
            .map(drop)
            .map_err(|e| format!("not a valid PostgreSQL URL ({e})"))
    } else if database_url.starts_with("sqlite:") {
        sqlx::sqlite::SqliteConnectOptions::from_str(database_url)
            .map(drop)
            .map_err(|e| format!("not a valid SQLite URL ({e})"))
    } else {
        Err("must start with sqlite: or postgres://".to_owned())
    }
}
