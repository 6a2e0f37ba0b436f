//! The PostgreSQL store, shared by every vault replica. Concurrent writers
//! are ordered by row locks (`FOR UPDATE`) on the rows they change.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

type Db = sqlx::Postgres;
type StoreImpl = PostgresStore;
const BACKEND: Backend = Backend::Postgres;

const LOCK_KEK_VERSION: &str = "SELECT state FROM kek_versions WHERE version = $1 FOR UPDATE";
const LOCK_LIVE_CONNECTION: &str = "SELECT connection_id FROM connections \
     WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted' \
     FOR UPDATE";
const LOCK_AUDIT_HEAD: &str = "SELECT seq, entry_hash FROM audit_head WHERE id = 1 FOR UPDATE";

const LOCK_REFRESH: &str = "SELECT fence FROM refresh_locks \
     WHERE connection_id = $1 AND holder = $2 AND fence = $3 FOR UPDATE";

// Appended to SELECTs that lock the rows they read.
const FOR_UPDATE: &str = " FOR UPDATE";
// Taken before appending events, so cursors are committed in cursor order and
// a watcher reading "after cursor N" never skips an event committed later
// with a smaller cursor.
const EVENT_ORDER_LOCK: Option<&str> = Some("SELECT pg_advisory_xact_lock(7431001)");

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A store on a PostgreSQL database.
pub struct PostgresStore {
    pool: sqlx::PgPool,
}

impl PostgresStore {
    /// Connects to `url` and applies migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            VaultError::invalid("database_url", format!("not a valid PostgreSQL URL ({e})"))
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            // Healthy acquires take milliseconds; when the database is down a
            // call fails with UNAVAILABLE after this long instead of hanging.
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| VaultError::Storage(format!("applying PostgreSQL migrations: {e}")))?;
        Ok(Self { pool })
    }

    async fn begin_write(&self) -> StoreResult<((), sqlx::Transaction<'static, Db>)> {
        Ok(((), self.pool.begin().await?))
    }
}

impl PostgresStore {
    /// Nothing to do: deleted rows are invisible to every query at once and
    /// autovacuum reclaims their space.
    async fn scrub(&self) {}
}

include!("sql_common.rs");
