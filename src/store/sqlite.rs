//! The SQLite store: one database file in WAL mode, the embedded default.
//! SQLite allows one writer at a time, so write transactions are serialised
//! in-process (and begin `IMMEDIATE`) instead of failing with `SQLITE_BUSY`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{Mutex, MutexGuard};

type Db = sqlx::Sqlite;
type StoreImpl = SqliteStore;
const BACKEND: Backend = Backend::Sqlite;

// SQLite has no row locks; the serialised write transaction is the lock.
const LOCK_KEK_VERSION: &str = "SELECT state FROM kek_versions WHERE version = $1";
const LOCK_LIVE_CONNECTION: &str = "SELECT connection_id FROM connections \
     WHERE tenant_id = $1 AND account_id = $2 AND integration = $3 AND status <> 'deleted'";
const LOCK_AUDIT_HEAD: &str = "SELECT seq, entry_hash FROM audit_head WHERE id = 1";

const LOCK_REFRESH: &str = "SELECT fence FROM refresh_locks \
     WHERE connection_id = $1 AND holder = $2 AND fence = $3";

// Appended to SELECTs that lock the rows they read.
const FOR_UPDATE: &str = "";
// Taken before appending events, so cursors are committed in cursor order and
// a watcher reading "after cursor N" never skips an event committed later
// with a smaller cursor.
const EVENT_ORDER_LOCK: Option<&str> = None;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A store on one SQLite file.
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
    write_lock: Mutex<()>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` and applies migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                VaultError::invalid("database_url", format!("not a valid SQLite URL ({e})"))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a deletion that returned must survive a power cut.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // 32 MiB of page cache per connection (the default is 2 MiB):
            // rotation and listing walk the whole table.
            .pragma("cache_size", "-32768")
            // Deleted tokens and DEKs are overwritten with zeros in the file,
            // not left in free pages.
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| VaultError::Storage(format!("applying SQLite migrations: {e}")))?;
        Ok(Self {
            pool,
            write_lock: Mutex::new(()),
        })
    }

    async fn begin_write(
        &self,
    ) -> StoreResult<(MutexGuard<'_, ()>, sqlx::Transaction<'static, Db>)> {
        let guard = self.write_lock.lock().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((guard, tx))
    }
}

impl SqliteStore {
    /// After destroying secrets: copies the WAL into the (zero-overwritten)
    /// database file and truncates the WAL, so no earlier page image holding
    /// the destroyed bytes stays on disk.
    async fn scrub(&self) {
        let _guard = self.write_lock.lock().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await
        {
            Ok((0, _, _)) => {}
            Ok((busy, log, done)) => {
                tracing::warn!(
                    busy,
                    log,
                    done,
                    "WAL checkpoint after a deletion was incomplete; the next one retries"
                );
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint after a deletion failed"),
        }
    }
}

include!("sql_common.rs");
