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

const LOCK_REFRESH: &str = "SELECT fence FROM refresh_locks \
     WHERE connection_id = $1 AND holder = $2 AND fence = $3";

// The lease path's batched read takes its ids as one JSON array, so its
// statement text is the same for any number of ids.
const ID_IN_LIST: &str = "IN (SELECT value FROM json_each($1))";

fn id_list(ids: &[ConnectionId]) -> String {
    serde_json::to_string(&ids.iter().map(ConnectionId::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".to_owned())
}

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
    /// The audit chain head this process last wrote (see `audit_append`).
    head_cache: std::sync::Mutex<Option<ChainHead>>,
    /// Connections the audit writer and the lease reader keep checked out.
    /// All audit appends go through one connection, whose page cache then
    /// stays warm (SQLite drops a connection's cache whenever another
    /// connection wrote since its last transaction).
    hot: HotConnections,
    /// The background WAL checkpoint task; it holds a handle to the pool, so
    /// it is stopped when the store goes away.
    checkpointer: tokio::task::AbortHandle,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
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
            .pragma("secure_delete", "ON")
            // No connection copies the WAL into the database file inside one
            // of its commits (SQLite's default every 1,000 pages, which held
            // an audit batch, and every lease waiting on it, for 5-10 ms):
            // a background task does it (see `checkpoint_in_background`).
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| VaultError::Storage(format!("applying SQLite migrations: {e}")))?;
        let checkpointer = tokio::spawn(checkpoint_in_background(pool.clone())).abort_handle();
        Ok(Self {
            pool,
            write_lock: Mutex::new(()),
            head_cache: std::sync::Mutex::new(None),
            hot: HotConnections::default(),
            checkpointer,
        })
    }

    /// Held by every write: SQLite takes one writer at a time.
    async fn write_guard(&self) -> MutexGuard<'_, ()> {
        self.write_lock.lock().await
    }

    async fn begin_write(
        &self,
    ) -> StoreResult<(MutexGuard<'_, ()>, sqlx::Transaction<'static, Db>)> {
        let guard = self.write_guard().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((guard, tx))
    }
}

/// How often the background task copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Copies committed WAL frames into the database file every
/// [`CHECKPOINT_EVERY`], beside the writers rather than inside one of their
/// commits (`PASSIVE`: it never waits for or blocks a reader or writer). Once
/// a checkpoint has copied everything, the next write starts the WAL from the
/// beginning again, so it stays small. Ends when the pool closes.
async fn checkpoint_in_background(pool: sqlx::SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "background WAL checkpoint failed; the next one retries");
        }
    }
}

impl SqliteStore {
    /// After destroying secrets: copies the WAL into the (zero-overwritten)
    /// database file and truncates the WAL, so no earlier page image holding
    /// the destroyed bytes stays on disk.
    async fn scrub(&self) {
        let _guard = self.write_guard().await;
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

/// Inserts one batch of audit entries: 11 columns per entry, as one JSON
/// array of arrays with the hashes and MAC in hex (see [`entry_rows`]).
const INSERT_AUDIT_ROWS: &str = "INSERT INTO audit_log \
     (seq, at, actor, role, action, target, outcome, detail, prev_hash, entry_hash, mac) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
     value ->> 6, value ->> 7, unhex(value ->> 8), unhex(value ->> 9), unhex(value ->> 10) \
     FROM jsonb_each($1)";

/// Records the batch's leases whose connection is still ACTIVE and unchanged
/// since the lease path read it (rows as one JSON array of arrays, the read
/// `updated_at` last; see [`lease_rows`]), returning their ids.
const INSERT_LEASE_ROWS: &str = "INSERT INTO leases (lease_id, connection_id, caller, purpose, \
     scopes, token_fingerprint, granted_at, expires_at) \
     SELECT v.value ->> 0, v.value ->> 1, v.value ->> 2, v.value ->> 3, v.value ->> 4, \
     v.value ->> 5, v.value ->> 6, v.value ->> 7 \
     FROM jsonb_each($1) AS v JOIN connections c ON c.connection_id = v.value ->> 1 \
     WHERE c.status = 'active' AND c.updated_at = v.value ->> 8 RETURNING lease_id";

/// The whole batch in one statement (migration 0005): it aborts, writing
/// nothing, unless the head is still `from` and every lease still holds.
const APPEND_BATCH: &str = "INSERT INTO audit_append_batch \
     (from_seq, from_hash, to_seq, to_hash, entries, checkpoints, leases) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

const READ_AUDIT_HEAD: &str = "SELECT seq, entry_hash FROM audit_head WHERE id = 1";

/// Seals `drafts` onto the chain head and writes them, with the lease rows.
/// With the head this process wrote last (`cached`), one statement does it
/// all (see [`APPEND_BATCH`]). When nothing is cached, or that statement
/// refused (another appender moved the head, a leased connection changed,
/// or the database failed), the batch is written step by step in one write
/// transaction on `conn`: the head is read there, under SQLite's write lock,
/// the batch sealed onto it, and only the leases that still hold recorded.
/// Fixed statement texts (rows travel as one JSON argument), so each is
/// prepared once per connection.
async fn append_on(
    conn: &mut sqlx::SqliteConnection,
    cached: Option<ChainHead>,
    drafts: &[AuditDraft],
    leases: &[LeaseGrant],
    sealer: AuditSealer<'_>,
) -> StoreResult<Appended> {
    use sqlx::Connection as _;
    if let Some(head) = cached {
        let batch = seal_batch(head, drafts, sealer);
        match append_batch(&mut *conn, &batch, leases).await {
            Ok(()) => {
                let recorded = leases
                    .iter()
                    .map(|g| g.lease.lease_id.to_string())
                    .collect();
                return Ok(batch.appended(recorded));
            }
            Err(e) => {
                tracing::debug!(error = %e, "one-statement audit append refused; appending step by step");
            }
        }
    }
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let head = read_audit_head(&mut *tx, READ_AUDIT_HEAD).await?;
    let batch = seal_batch(head, drafts, sealer);
    if !move_head(&mut tx, &batch).await? {
        return Err(VaultError::Internal(
            "the audit chain head moved inside a write transaction".into(),
        ));
    }
    sqlx::query(INSERT_AUDIT_ROWS)
        .bind(entry_rows(&batch)?)
        .execute(&mut *tx)
        .await?;
    let recorded = if leases.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(INSERT_LEASE_ROWS)
            .bind(lease_rows(leases)?)
            .fetch_all(&mut *tx)
            .await?
    };
    for c in &batch.checkpoints {
        insert_checkpoint(&mut tx, c).await?;
    }
    tx.commit().await?;
    Ok(batch.appended(recorded))
}

/// Runs [`APPEND_BATCH`] for a sealed batch, in autocommit mode.
async fn append_batch(
    conn: &mut sqlx::SqliteConnection,
    batch: &SealedBatch<'_>,
    leases: &[LeaseGrant],
) -> StoreResult<()> {
    let checkpoints: Vec<_> = batch
        .checkpoints
        .iter()
        .map(|c| {
            (
                c.seq,
                hex::encode(&c.entry_hash),
                c.signed_at.as_micros(),
                hex::encode(&c.public_key),
                hex::encode(&c.signature),
            )
        })
        .collect();
    sqlx::query(APPEND_BATCH)
        .bind(batch.from.0)
        .bind(batch.from.1.as_slice())
        .bind(batch.to.0)
        .bind(batch.to.1.as_slice())
        .bind(entry_rows(batch)?)
        .bind(to_json(&checkpoints)?)
        .bind(lease_rows(leases)?)
        .execute(conn)
        .await?;
    Ok(())
}

/// A batch's entries as the JSON rows [`INSERT_AUDIT_ROWS`] and [`APPEND_BATCH`] read.
fn entry_rows(batch: &SealedBatch<'_>) -> StoreResult<String> {
    let rows: Vec<_> = batch
        .entries
        .iter()
        .map(|e| {
            let d = e.draft;
            (
                e.seq,
                d.at.as_micros(),
                &d.actor,
                &d.role,
                &d.action,
                &d.target,
                &d.outcome,
                &d.detail,
                hex::encode(&e.prev_hash),
                hex::encode(&e.entry_hash),
                hex::encode(&e.mac),
            )
        })
        .collect();
    to_json(&rows)
}

/// Lease rows as the JSON rows [`INSERT_LEASE_ROWS`] and [`APPEND_BATCH`] read.
fn lease_rows(leases: &[LeaseGrant]) -> StoreResult<String> {
    let rows: Vec<_> = leases
        .iter()
        .map(|g| {
            let l = &g.lease;
            (
                l.lease_id.as_str(),
                l.connection_id.as_str(),
                &l.caller,
                &l.purpose,
                &l.scopes,
                &l.token_fingerprint,
                l.granted_at.as_micros(),
                l.expires_at.as_micros(),
                g.connection_version.as_micros(),
            )
        })
        .collect();
    to_json(&rows)
}

/// Moves the chain head from the batch's start to its end, if it is still
/// at the start.
async fn move_head(
    tx: &mut sqlx::Transaction<'_, Db>,
    batch: &SealedBatch<'_>,
) -> StoreResult<bool> {
    let moved = sqlx::query(
        "UPDATE audit_head SET seq = $1, entry_hash = $2 \
         WHERE id = 1 AND seq = $3 AND entry_hash = $4",
    )
    .bind(batch.to.0)
    .bind(batch.to.1.as_slice())
    .bind(batch.from.0)
    .bind(batch.from.1.as_slice())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

async fn insert_checkpoint(
    tx: &mut sqlx::Transaction<'_, Db>,
    c: &AuditCheckpoint,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(c.seq)
    .bind(c.entry_hash.as_slice())
    .bind(c.signed_at.as_micros())
    .bind(c.public_key.as_slice())
    .bind(c.signature.as_slice())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn to_json(rows: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(rows)
        .map_err(|e| VaultError::Internal(format!("encoding rows: {e}").into()))
}

include!("sql_common.rs");
