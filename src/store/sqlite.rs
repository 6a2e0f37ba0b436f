//! The SQLite store: one database file in WAL mode, the embedded default.
//! SQLite allows one writer at a time, so write transactions are serialised
//! in-process (and begin `IMMEDIATE`) instead of failing with `SQLITE_BUSY`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{Mutex, MutexGuard};

use self::dialect::Db;
use super::audit::{
    Appended, LeaseEntry, Profiles, SealedBatch, compacted, lease_entries, seal_batch,
};
use super::common::ChainHead;
use super::common::sqlite::{HotConnections, read_audit_head};
use crate::domain::VaultError;
use crate::store::{AuditDraft, AuditSealer, LeaseGrant, StoreResult};

/// What the SQL shared by both backends needs to know about this one
/// (see `for_each_backend!`).
pub(super) mod dialect {
    use crate::store::Backend;

    pub(in crate::store) type Db = sqlx::Sqlite;
    pub(in crate::store) type StoreImpl = super::SqliteStore;
    pub(in crate::store) const BACKEND: Backend = Backend::Sqlite;

    pub(in crate::store) const SHARE_KEK_VERSION: &str =
        "SELECT state FROM kek_versions WHERE version = $1";
    // The clock of the one host SQLite runs on, microseconds since the Unix epoch.
    pub(in crate::store) const CLOCK_MICROS: &str =
        "SELECT CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)";

    // Appended to SELECTs that lock the rows they read.
    pub(in crate::store) const FOR_UPDATE: &str = "";
    // Taken before appending events, so cursors are committed in cursor order and
    // a watcher reading "after cursor N" never skips an event committed later
    // with a smaller cursor.
    pub(in crate::store) const EVENT_ORDER_LOCK: Option<&str> = None;
    // A UUID-valued column of the compact lease rows as its 16 bytes, and a
    // parameter of 16 bytes as such a column's value: SQLite stores the bytes.
    pub(in crate::store) fn uuid_bytes(column: &str) -> String {
        column.to_owned()
    }
    pub(in crate::store) fn uuid_param(n: usize) -> String {
        format!("${n}")
    }
    // A connection id (`conn_<uuid>`) in `column` as a compact lease row's
    // `connection_id` holds it.
    pub(in crate::store) fn connection_uuid(column: &str) -> String {
        format!("unhex(replace(substr({column}, 6), '-', ''))")
    }
    // The previous hash of an entry with no entry or segment before it: the
    // genesis hash (32 zero bytes) for a chain's first entry (position 1: the low
    // `CHAIN_BITS` bits, 2^40 - 1 = 1099511627775), else empty (a broken link).
    pub(in crate::store) const NO_PREDECESSOR: &str =
        "CASE WHEN (a.seq & 1099511627775) = 1 THEN zeroblob(32) ELSE x'' END";

    pub(in crate::store) use super::{
        LOCK_AUDIT_HEAD, append_locked, append_on, prepare_audit_connection,
    };
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A store on one SQLite file.
pub struct SqliteStore {
    pub(super) pool: sqlx::SqlitePool,
    pub(super) write_lock: Arc<Mutex<()>>,
    /// The audit chain head this process last wrote (see `audit_append`).
    pub(super) head_cache: std::sync::Mutex<Option<ChainHead>>,
    /// Lease profile ids (`lease_profiles`) by actor, role, purpose and
    /// scopes, as the audit writer found or made them.
    pub(super) profile_ids: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// The audit chain this process's writer appends to (see `store::audit`).
    pub(super) writer_chain: std::sync::atomic::AtomicI64,
    /// Whether the writer has claimed `writer_chain` (since it started).
    pub(super) writer_claimed: std::sync::atomic::AtomicBool,
    /// Connections the audit writer and the lease reader keep checked out.
    /// All audit appends go through one connection, whose page cache then
    /// stays warm (SQLite drops a connection's cache whenever another
    /// connection wrote since its last transaction).
    pub(super) hot: HotConnections,
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
            .pragma("wal_autocheckpoint", "0")
            // When the WAL starts over after a checkpoint, its file is cut
            // back to this size rather than keeping its high-water mark.
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
        // The database file is created here, 0600, before SQLite opens it:
        // SQLite would create it 0644 (less the umask). SQLite creates the
        // -wal, -shm and -journal files with the database file's mode
        // (`findCreateFileMode`, `unixOpenSharedMemory`), so they follow.
        // Files left by an earlier, looser run are narrowed to the owner:
        // SQLite only sets the mode of a file it finds empty.
        let in_memory = {
            use sqlx::ConnectOptions as _;
            options
                .to_url_lossy()
                .query_pairs()
                .any(|(k, v)| k == "mode" && v == "memory")
        };
        if !in_memory {
            let db = options.get_filename();
            let failed = |e: std::io::Error| {
                VaultError::Storage(format!(
                    "cannot make the SQLite database {} owner-only: {e}",
                    db.display()
                ))
            };
            crate::files::create_private_if_missing(db).map_err(failed)?;
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut path = db.as_os_str().to_owned();
                path.push(suffix);
                let path = std::path::PathBuf::from(path);
                if let Some(was) = crate::files::restrict_to_owner(&path).map_err(failed)? {
                    tracing::warn!(
                        path = %path.display(),
                        mode = %format!("{was:04o}"),
                        "database file was readable by group or others; group and other permissions removed"
                    );
                }
            }
        }
        let target = open_target(in_memory, options.get_filename());
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| open_failed(&target, e))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| VaultError::Storage(format!("applying SQLite migrations: {e}")))?;
        let write_lock = Arc::new(Mutex::new(()));
        let checkpointer =
            tokio::spawn(checkpoint_in_background(pool.clone(), write_lock.clone())).abort_handle();
        Ok(Self {
            pool,
            write_lock,
            head_cache: std::sync::Mutex::new(None),
            profile_ids: std::sync::Mutex::new(std::collections::HashMap::new()),
            writer_chain: std::sync::atomic::AtomicI64::new(0),
            writer_claimed: std::sync::atomic::AtomicBool::new(false),
            hot: HotConnections::default(),
            checkpointer,
        })
    }

    /// Held by every write: SQLite takes one writer at a time.
    pub(super) async fn write_guard(&self) -> MutexGuard<'_, ()> {
        self.write_lock.lock().await
    }

    pub(super) async fn begin_write(
        &self,
    ) -> StoreResult<(MutexGuard<'_, ()>, sqlx::Transaction<'static, Db>)> {
        let guard = self.write_guard().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok((guard, tx))
    }
}

/// The database a connection opens, for messages: its file's path, or "in
/// memory".
fn open_target(in_memory: bool, file: &std::path::Path) -> String {
    if in_memory {
        "in memory".to_owned()
    } else {
        file.display().to_string()
    }
}

/// A failure to open the database `target` (see [`open_target`]) as one line
/// naming it: UNAVAILABLE for an I/O failure (as any outage is), a storage
/// error otherwise (a file SQLite cannot open or that is not a database).
fn open_failed(target: &str, err: sqlx::Error) -> VaultError {
    let message = format!("cannot open the SQLite database {target}: {err}");
    match VaultError::from(err) {
        VaultError::Unavailable(_) => VaultError::Unavailable(message.into()),
        _ => VaultError::Storage(message),
    }
}

/// How often the background task copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL frames (pages) beyond which a checkpoint also finishes under the
/// write lock, so that the WAL starts over: 16 MiB of 4 KiB pages.
const WAL_RESTART_FRAMES: i64 = 4096;

/// Unblocking passes between the first and the one under the write lock.
const CATCH_UP_PASSES: usize = 3;

/// The WAL file's size after it starts over (`journal_size_limit`), bytes.
/// A WAL that a reader held back from starting over (an archive pass, an
/// export) gives back what it grew past this. Below it the file keeps the
/// most the WAL held: cutting it back to the start-over size on every cycle
/// made each cycle's last frames extend the file again, and the commits
/// that wrote them slower (lease p99 up by 46 % at the median, see
/// BENCHMARKS.md).
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Copies committed WAL frames into the database file every
/// [`CHECKPOINT_EVERY`], beside the writers rather than inside one of their
/// commits.
///
/// A `PASSIVE` checkpoint never waits for or blocks anyone, but under a
/// steady stream of commits it never catches up either: frames committed
/// while it copies are left for the next one, the WAL can only start over
/// once every frame is copied, and so it grows without bound for as long as
/// the load lasts (see BENCHMARKS.md). So once the WAL holds more
/// than [`WAL_RESTART_FRAMES`], the pass that has just copied the bulk
/// without blocking anyone is followed by [`CATCH_UP_PASSES`] more, each
/// copying what was committed during the one before, and then by one under
/// the store's write lock: it copies only what was committed meanwhile (the
/// catch-up passes left little), nothing new can arrive, and the next write
/// starts the WAL from the beginning. Ends when the pool closes.
async fn checkpoint_in_background(pool: sqlx::SqlitePool, write_lock: Arc<Mutex<()>>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        match passive_checkpoint(&pool).await {
            Ok((_, log, _)) if log > WAL_RESTART_FRAMES => {
                // Catch up without blocking anyone: each pass copies what was
                // committed during the one before, a shorter stretch each time.
                for _ in 0..CATCH_UP_PASSES {
                    if let Err(e) = passive_checkpoint(&pool).await {
                        checkpoint_failed(&pool, &e);
                        break;
                    }
                }
                let started = std::time::Instant::now();
                let guard = write_lock.lock().await;
                let finished = passive_checkpoint(&pool).await;
                drop(guard);
                metrics::histogram!("tokenvault_sqlite_checkpoint_blocking_seconds")
                    .record(started.elapsed().as_secs_f64());
                match finished {
                    Ok((0, log, copied)) if copied == log => {}
                    Ok((busy, log, copied)) => tracing::debug!(
                        busy,
                        log,
                        copied,
                        "WAL checkpoint under the write lock left frames behind (a reader holds them); the next one retries"
                    ),
                    Err(e) => checkpoint_failed(&pool, &e),
                }
            }
            Ok(_) => {}
            Err(e) => checkpoint_failed(&pool, &e),
        }
    }
}

/// One `PRAGMA wal_checkpoint(PASSIVE)`: (busy, frames in the WAL, frames copied).
async fn passive_checkpoint(pool: &sqlx::SqlitePool) -> Result<(i64, i64, i64), sqlx::Error> {
    sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await
}

fn checkpoint_failed(pool: &sqlx::SqlitePool, e: &sqlx::Error) {
    if !pool.is_closed() {
        tracing::warn!(error = %e, "background WAL checkpoint failed; the next one retries");
    }
}

impl SqliteStore {
    /// After destroying secrets: copies the WAL into the (zero-overwritten)
    /// database file and truncates the WAL, so no earlier page image holding
    /// the destroyed bytes stays on disk.
    pub(super) async fn scrub(&self) {
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

/// The ids of the leases (JSON rows, see [`holding_rows`]) whose connection
/// is still ACTIVE and unchanged since the lease path read it.
const HOLDING_LEASES: &str = "SELECT v.value ->> 0 FROM jsonb_each($1) AS v \
     JOIN connections c ON c.connection_id = v.value ->> 1 \
     WHERE c.status = 'active' AND c.updated_at = v.value ->> 2";

/// The whole batch in one statement (migrations 0005, 0010, 0011 and 0013):
/// it aborts, writing nothing, unless the head is still `from` and every
/// recorded lease still holds.
const APPEND_BATCH: &str = "INSERT INTO audit_append_batch \
     (from_seq, from_hash, to_seq, to_hash, entries, checkpoints, leases) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Reads a chain's head (`$1`; a SQLite store has chain 0 only) in a write
/// transaction (`BEGIN IMMEDIATE` already excludes every other writer).
pub(super) const LOCK_AUDIT_HEAD: &str =
    "SELECT seq, entry_hash FROM audit_head WHERE id = CAST($1 AS BIGINT) + 1";

/// Appends `drafts` (and every one of `leases`) on `conn`, inside a write
/// transaction that read `head` with [`LOCK_AUDIT_HEAD`].
pub(super) async fn append_locked(
    conn: &mut sqlx::SqliteConnection,
    _chain: i64,
    head: ChainHead,
    drafts: &[AuditDraft],
    leases: &[LeaseGrant],
    profiles: &Profiles,
    sealer: AuditSealer<'_>,
) -> StoreResult<Appended> {
    let batch = seal_batch(head, drafts, sealer);
    let recorded = append_batch(conn, &batch, leases, profiles).await?;
    Ok(batch.appended(recorded))
}

/// Sets up the connection the audit writer keeps, once, when it is checked
/// out: a 2 MiB page cache instead of the pool's 32 MiB. Whenever a B-tree
/// page split renumbers pages, SQLite parks one under a page number past
/// 1 GiB, and the commit then walks the connection's whole page-cache hash
/// table to drop pages past the end of the file. That walk grows with the
/// cache and is paid on the writer's serial path, so the writer keeps a small
/// cache (the figures: see BENCHMARKS.md). The bundled SQLite is built with
/// `SQLITE_ENABLE_MEMORY_MANAGEMENT`, so every connection's cache belongs to
/// one shared page-cache group: this setting is when the writer starts
/// recycling the group's least-recently-used pages rather than adding its
/// own, not a hard cap.
/// Pages that do not stay cached are read back from the OS cache. A writer
/// connection is closed after an error, and the setting with it.
///
/// Returns the chain the writer appends to: a SQLite store has one, chain 0.
pub(super) async fn prepare_audit_connection(
    conn: &mut sqlx::SqliteConnection,
    _previous: Option<i64>,
) -> StoreResult<i64> {
    sqlx::query("PRAGMA cache_size = -2048")
        .execute(&mut *conn)
        .await?;
    Ok(0)
}

/// Seals `drafts` onto the chain head and writes them, each recorded lease's
/// grant as its compact row, through [`APPEND_BATCH`]. With the head this
/// process wrote last (`cached`), that one statement is the whole
/// transaction. When nothing is cached, or it refused (another appender
/// moved the head, a leased connection changed, or the database failed), it
/// runs again inside a write transaction on `conn` that first reads the
/// head, under SQLite's write lock, and the leases that still hold
/// ([`HOLDING_LEASES`]), and seals and records only those; the others'
/// grants are written as text entries. Fixed statement texts (rows travel as
/// one JSON argument), so each is prepared once per connection.
pub(super) async fn append_on(
    conn: &mut sqlx::SqliteConnection,
    _chain: i64,
    cached: Option<ChainHead>,
    drafts: &[AuditDraft],
    leases: &[LeaseGrant],
    profiles: &Profiles,
    sealer: AuditSealer<'_>,
) -> StoreResult<Appended> {
    use sqlx::Connection as _;
    if let Some(head) = cached {
        let batch = seal_batch(head, drafts, sealer);
        match append_batch(&mut *conn, &batch, leases, profiles).await {
            Ok(recorded) => return Ok(batch.appended(recorded)),
            Err(e) => {
                tracing::debug!(error = %e, "one-statement audit append refused; appending under the write lock");
            }
        }
    }
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let head = read_audit_head(&mut *tx, LOCK_AUDIT_HEAD, 0).await?;
    let holds: Vec<String> = if leases.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar(HOLDING_LEASES)
            .bind(holding_rows(leases)?)
            .fetch_all(&mut *tx)
            .await?
    };
    let holding: Vec<LeaseGrant> = leases
        .iter()
        .filter(|g| holds.iter().any(|id| id == g.lease.lease_id.as_str()))
        .cloned()
        .collect();
    let appended = append_locked(&mut tx, 0, head, drafts, &holding, profiles, sealer).await?;
    tx.commit().await?;
    Ok(appended)
}

/// Runs [`APPEND_BATCH`] for a sealed batch (its own transaction unless
/// `conn` is inside one); returns the ids of the leases it recorded.
async fn append_batch(
    conn: &mut sqlx::SqliteConnection,
    batch: &SealedBatch<'_>,
    leases: &[LeaseGrant],
    profiles: &Profiles,
) -> StoreResult<Vec<String>> {
    let compact = lease_entries(batch, leases, profiles);
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
        .bind(entry_rows(batch, &compact)?)
        .bind(to_json(&checkpoints)?)
        .bind(lease_rows(&compact)?)
        .execute(conn)
        .await?;
    Ok(compact
        .iter()
        .map(|l| l.grant.lease.lease_id.to_string())
        .collect())
}

/// A batch's text entries (every one but the recorded leases' grants) as the
/// JSON rows [`APPEND_BATCH`] reads.
fn entry_rows(batch: &SealedBatch<'_>, compact: &[LeaseEntry<'_>]) -> StoreResult<String> {
    let compacted = compacted(batch, compact);
    let rows: Vec<_> = batch
        .entries
        .iter()
        .zip(compacted)
        .filter(|(_, lease)| lease.is_none())
        .map(|(e, _)| {
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
                hex::encode(&e.entry_hash),
                hex::encode(&e.mac),
            )
        })
        .collect();
    to_json(&rows)
}

/// Recorded leases as the compact JSON rows [`APPEND_BATCH`] reads
/// (migration 0013).
fn lease_rows(compact: &[LeaseEntry<'_>]) -> StoreResult<String> {
    let rows: Vec<_> = compact
        .iter()
        .map(|l| {
            let g = l.grant;
            (
                g.lease.connection_id.as_str(),
                g.connection_version.as_micros(),
                l.entry.seq,
                l.entry.draft.at.as_micros(),
                l.profile,
                hex::encode(g.lease.lease_id.key()),
                hex::encode(g.lease.connection_id.key()),
                g.lease.expires_at.as_micros(),
                &g.token,
                hex::encode(&l.entry.entry_hash),
                hex::encode(&l.entry.mac),
            )
        })
        .collect();
    to_json(&rows)
}

/// Leases as the JSON rows [`HOLDING_LEASES`] reads.
fn holding_rows(leases: &[LeaseGrant]) -> StoreResult<String> {
    let rows: Vec<_> = leases
        .iter()
        .map(|g| {
            (
                g.lease.lease_id.as_str(),
                g.lease.connection_id.as_str(),
                g.connection_version.as_micros(),
            )
        })
        .collect();
    to_json(&rows)
}

fn to_json(rows: &impl serde::Serialize) -> StoreResult<String> {
    serde_json::to_string(rows)
        .map_err(|e| VaultError::Internal(format!("encoding rows: {e}").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_name_the_file() {
        let file = std::path::Path::new("/var/lib/tokenvault/tokenvault.db");
        let target = open_target(false, file);
        let e = open_failed(&target, sqlx::Error::Protocol("broken".into()));
        assert!(matches!(e, VaultError::Storage(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("cannot open the SQLite database /var/lib/tokenvault/tokenvault.db: "),
            "{e}"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = open_failed(&target, sqlx::Error::Io(refused));
        assert!(matches!(e, VaultError::Unavailable(_)), "{e:?}");
        assert!(
            e.to_string().contains("/var/lib/tokenvault/tokenvault.db"),
            "{e}"
        );
        assert_eq!(open_target(true, file), "in memory");
    }

    /// A WAL that grew past [`WAL_SIZE_LIMIT`] while a reader held it back
    /// gives the space back once it starts over: its file is cut back to the
    /// limit, not left at the most the WAL ever held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_file_is_cut_back_when_it_starts_over() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenvault.db");
        let url = format!("sqlite://{}", path.display());
        let store = SqliteStore::connect(&url).await.unwrap();
        let wal = path.with_extension("db-wal");
        let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len() as i64);
        sqlx::query("CREATE TABLE scratch (n INTEGER PRIMARY KEY, b BLOB NOT NULL)")
            .execute(&store.pool)
            .await
            .unwrap();
        // A reader whose snapshot keeps every frame written after it in the WAL.
        let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let mut snapshot = reader.begin().await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch")
            .fetch_one(&mut *snapshot)
            .await
            .unwrap();
        // About one page per row: a quarter more than the limit.
        let blob = vec![7u8; 3000];
        let per_chunk = 2048;
        let chunks = WAL_SIZE_LIMIT * 5 / 4 / 4096 / per_chunk + 1;
        for chunk in 0..chunks {
            let mut tx = store.pool.begin().await.unwrap();
            for i in 0..per_chunk {
                sqlx::query("INSERT INTO scratch (n, b) VALUES ($1, $2)")
                    .bind(chunk * per_chunk + i)
                    .bind(blob.as_slice())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        let grown = wal_len();
        assert!(
            grown > WAL_SIZE_LIMIT,
            "the WAL held {grown} bytes, not past {WAL_SIZE_LIMIT}"
        );
        snapshot.rollback().await.unwrap();
        reader.close().await.unwrap();
        // The background checkpoint copies the whole WAL now that no reader
        // holds it, and the next write starts it over and cuts the file.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while wal_len() > WAL_SIZE_LIMIT {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL file stayed at {} bytes (grown to {grown}, limit {WAL_SIZE_LIMIT}) after its reader ended",
                wal_len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            sqlx::query("INSERT INTO scratch (b) VALUES (x'00')")
                .execute(&store.pool)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenvault.db");
        std::fs::write(&path, [b'x'; 4096]).unwrap();
        let url = format!("sqlite://{}", path.display());
        let Err(e) = SqliteStore::connect(&url).await else {
            panic!("opened a file that is not a database");
        };
        let message = e.to_string();
        assert!(
            message.contains(&format!(
                "cannot open the SQLite database {}: ",
                path.display()
            )),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}
