//! The PostgreSQL store, shared by every vault replica. Concurrent writers
//! are ordered by row locks (`FOR UPDATE`) on the rows they change.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use self::dialect::Db;
use super::audit::{
    Appended, LeaseEntry, Profiles, SealedBatch, SealedRow, compacted, lease_entries, seal_batch,
};
use super::common::ChainHead;
use super::common::postgres::{HotConnections, read_audit_head};
use crate::domain::{LeaseId, VaultError};
use crate::store::{AuditDraft, AuditSealer, LeaseGrant, StoreResult};

/// What the SQL shared by both backends needs to know about this one
/// (see `for_each_backend!`).
pub(super) mod dialect {
    use crate::store::Backend;

    pub(in crate::store) type Db = sqlx::Postgres;
    pub(in crate::store) type StoreImpl = super::PostgresStore;
    pub(in crate::store) const BACKEND: Backend = Backend::Postgres;

    // Taken before writing a key wrapped by a version: waits for a retirement of
    // that version in progress, and then sees it.
    pub(in crate::store) const SHARE_KEK_VERSION: &str =
        "SELECT state FROM kek_versions WHERE version = $1 FOR SHARE";
    // The server's clock, microseconds since the Unix epoch.
    pub(in crate::store) const CLOCK_MICROS: &str =
        "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT";

    // Appended to SELECTs that lock the rows they read.
    pub(in crate::store) const FOR_UPDATE: &str = " FOR UPDATE";
    // Taken before appending events, so cursors are committed in cursor order and
    // a watcher reading "after cursor N" never skips an event committed later
    // with a smaller cursor.
    pub(in crate::store) const EVENT_ORDER_LOCK: Option<&str> =
        Some("SELECT pg_advisory_xact_lock(7431001)");
    // A UUID-valued column of the compact lease rows as its 16 bytes, and a
    // parameter of 16 bytes as such a column's value (PostgreSQL's `uuid`).
    pub(in crate::store) fn uuid_bytes(column: &str) -> String {
        format!("uuid_send({column})")
    }
    pub(in crate::store) fn uuid_param(n: usize) -> String {
        format!("CAST(encode(${n}, 'hex') AS uuid)")
    }
    // A connection id (`conn_<uuid>`) in `column` as a compact lease row's
    // `connection_id` holds it.
    pub(in crate::store) fn connection_uuid(column: &str) -> String {
        format!("CAST(substr({column}, 6) AS uuid)")
    }
    // The previous hash of an entry with no entry or segment before it: the
    // genesis hash (32 zero bytes) for a chain's first entry (position 1: the low
    // `CHAIN_BITS` bits, 2^40 - 1 = 1099511627775), else empty (a broken link).
    pub(in crate::store) const NO_PREDECESSOR: &str = "CASE WHEN (a.seq & 1099511627775) = 1 THEN decode(repeat('00', 32), 'hex') \
         ELSE ''::bytea END";

    pub(in crate::store) use super::{
        LOCK_AUDIT_HEAD, append_locked, append_on, prepare_audit_connection,
    };
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long a session may sit idle inside a transaction before PostgreSQL
/// ends it (see `PostgresStore::connect`).
const IDLE_IN_TRANSACTION: &str = "10s";

/// A store on a PostgreSQL database.
pub struct PostgresStore {
    pub(super) pool: sqlx::PgPool,
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
    pub(super) hot: HotConnections,
}

impl PostgresStore {
    /// Connects to `url` and applies migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                VaultError::invalid("database_url", format!("not a valid PostgreSQL URL ({e})"))
            })?
            // A replica that freezes inside a transaction (a paused VM, a
            // SIGSTOP, a stalled host) must not hold its row locks — on a
            // rotation run, a refresh lock, the audit head — for the rest of
            // the fleet forever: the server ends such a session, its
            // transaction rolls back, and the others go on (take the run
            // over, retry). The vault never waits on anything but the
            // database inside a transaction, so a live replica never idles
            // in one for this long.
            //
            // A replica whose host vanishes (a power loss, a partition)
            // cannot close its sessions; with the kernel's default TCP
            // keepalive the server would notice after some two hours, and
            // its audit writer's claim on its chain would last as long. The
            // server probes an idle client after 10 s, every 5 s, and ends
            // the session after 3 unanswered probes.
            .options([
                ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION),
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]);
        let target = connect_target(&options);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            // Healthy acquires take milliseconds; when the database is down a
            // call fails with UNAVAILABLE after this long instead of hanging.
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options)
            .await
            .map_err(|e| connect_failed(&target, e))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| VaultError::Storage(format!("applying PostgreSQL migrations: {e}")))?;
        Ok(Self {
            pool,
            head_cache: std::sync::Mutex::new(None),
            profile_ids: std::sync::Mutex::new(std::collections::HashMap::new()),
            writer_chain: std::sync::atomic::AtomicI64::new(0),
            writer_claimed: std::sync::atomic::AtomicBool::new(false),
            hot: HotConnections::default(),
        })
    }

    /// Nothing to hold: row locks order PostgreSQL's writers.
    pub(super) async fn write_guard(&self) {}

    pub(super) async fn begin_write(&self) -> StoreResult<((), sqlx::Transaction<'static, Db>)> {
        Ok(((), self.pool.begin().await?))
    }
}

/// Where a connection goes, for messages: `host:port` (or the Unix socket's
/// path) and the database when one is named, as in `db.internal:5432
/// (database tokenvault)`. Never the user's password, nor the URL, which may
/// carry it.
fn connect_target(options: &PgConnectOptions) -> String {
    let port = options.get_port();
    let host = options.get_host();
    // As sqlx connects: a socket directory given as `host=/dir` or `/dir` as the host.
    let socket = match options.get_socket() {
        Some(dir) => Some(dir.as_path()),
        None if host.starts_with('/') => Some(std::path::Path::new(host)),
        None => None,
    };
    let mut target = match socket {
        Some(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
        // An IPv6 address from PGHOST comes without brackets (one from a URL has them).
        None if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    };
    if let Some(database) = options.get_database() {
        target.push_str(&format!(" (database {database})"));
    }
    target
}

/// A failure to connect to the database at `target` (see [`connect_target`])
/// as one line naming it: UNAVAILABLE when the database cannot be reached (as
/// any outage is), a storage error when it refuses the connection (a wrong
/// password, a missing database).
fn connect_failed(target: &str, err: sqlx::Error) -> VaultError {
    let message = format!("cannot connect to PostgreSQL at {target}: {err}");
    match VaultError::from(err) {
        VaultError::Unavailable(_) => VaultError::Unavailable(message.into()),
        _ => VaultError::Storage(message),
    }
}

impl PostgresStore {
    /// Nothing to do: deleted rows are invisible to every query at once and
    /// autovacuum reclaims their space.
    pub(super) async fn scrub(&self) {}
}

/// Appends one sealed batch in a single statement (one round trip, its own
/// transaction): moves the chain's head (`$5`: its row, the chain + 1) by
/// compare-and-swap and, only if that succeeded, inserts the checkpoints,
/// the compact rows of the leases whose connection is still ACTIVE and
/// unchanged since the lease path read it (locking that row against a
/// concurrent disconnect; migration 0013), and every other entry as text,
/// a grant whose lease did not hold among them. Rows travel as arrays, so
/// the text is the same for any batch.
const APPEND_AUDIT: &str = "WITH head AS ( \
       UPDATE audit_head SET seq = $1, entry_hash = $2 \
       WHERE id = $5::bigint AND seq = $3 AND entry_hash = $4 RETURNING 1), \
     holds AS ( \
       SELECT v.i FROM unnest($22::bigint[], $23::text[], $24::bigint[]) \
         AS v (i, connection_id, connection_version) \
       JOIN connections c ON c.connection_id = v.connection_id \
       WHERE c.status = 'active' AND c.updated_at = v.connection_version \
         AND EXISTS (SELECT 1 FROM head) \
       FOR SHARE OF c), \
     entries AS ( \
       INSERT INTO audit_log \
         (seq, at, actor, role, action, target, outcome, detail, entry_hash, mac) \
       SELECT e.seq, e.at, e.actor, e.role, e.action, e.target, e.outcome, e.detail, \
         e.entry_hash, e.mac \
       FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], \
         $11::text[], $12::text[], $13::text[], $14::bytea[], $15::bytea[], $16::bigint[]) \
         AS e (seq, at, actor, role, action, target, outcome, detail, entry_hash, mac, lease) \
       WHERE EXISTS (SELECT 1 FROM head) \
         AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.i = e.lease)), \
     checkpoints AS ( \
       INSERT INTO audit_checkpoints (seq, entry_hash, signed_at, public_key, signature) \
       SELECT * FROM unnest($17::bigint[], $18::bytea[], $19::bigint[], $20::bytea[], \
         $21::bytea[]) \
       WHERE EXISTS (SELECT 1 FROM head)), \
     granted AS ( \
       INSERT INTO leases \
         (seq, at, expires_at, profile, lease_id, connection_id, token, entry_hash, mac) \
       SELECT l.seq, l.at, l.expires_at, l.profile, CAST(encode(l.lease_key, 'hex') AS uuid), \
         CAST(encode(l.connection_key, 'hex') AS uuid), l.token, l.entry_hash, l.mac \
       FROM unnest($22::bigint[], $25::bigint[], $26::bigint[], $27::bigint[], $28::bigint[], \
         $29::bytea[], $30::bytea[], $31::bytea[], $32::bytea[], $33::bytea[]) \
         AS l (i, seq, at, expires_at, profile, lease_key, connection_key, token, entry_hash, \
         mac) \
       WHERE EXISTS (SELECT 1 FROM holds h WHERE h.i = l.i) \
       RETURNING uuid_send(lease_id) AS lease_key) \
     SELECT EXISTS (SELECT 1 FROM head) AS appended, \
       ARRAY(SELECT lease_key FROM granted) AS leases";

/// The advisory-lock class (the first of the two keys) of the audit writers'
/// chain claims; the second key is the chain.
const CHAIN_CLAIM: i32 = 7_431_002;

/// How long a writer whose connection was replaced waits for its old
/// session's claim on its chain to end before it claims another.
const RECLAIM_WAIT: Duration = Duration::from_secs(2);

/// Claims an audit chain for the writer whose connection this is, and
/// returns it: the chain it wrote before (`previous`) when its session-level
/// advisory lock ([`CHAIN_CLAIM`], chain) comes free within
/// [`RECLAIM_WAIT`], else the lowest chain whose lock no other session
/// holds, with its head row made if it is new. The claim lasts as long as
/// the session: the writer's connection is closed after any error (see
/// `HeldConnection`), and the claim with it; waiting for the old session's
/// end keeps a writer on its chain across such errors rather than starting
/// a chain per error.
///
/// Replicas thus append to chains of their own and never move each other's
/// head. Correctness does not rest on the claim: every append still
/// compare-and-swaps its chain's head, so two sessions that ever wrote one
/// chain (a claim lost with a connection the server had not yet noticed was
/// gone) would only make each other seal again.
pub(super) async fn prepare_audit_connection(
    conn: &mut sqlx::PgConnection,
    previous: Option<i64>,
) -> StoreResult<i64> {
    async fn try_claim(conn: &mut sqlx::PgConnection, chain: i64) -> StoreResult<bool> {
        let key = i32::try_from(chain).unwrap_or(i32::MAX);
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(CHAIN_CLAIM)
            .bind(key)
            .fetch_one(&mut *conn)
            .await?)
    }
    let mut claimed = None;
    if let Some(chain) = previous {
        let until = tokio::time::Instant::now() + RECLAIM_WAIT;
        while claimed.is_none() {
            if try_claim(conn, chain).await? {
                claimed = Some(chain);
            } else if tokio::time::Instant::now() >= until {
                break;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if claimed.is_none() {
        for chain in 0..super::audit::MAX_CHAINS {
            if try_claim(conn, chain).await? {
                claimed = Some(chain);
                break;
            }
        }
    }
    let Some(chain) = claimed else {
        return Err(VaultError::Unavailable(
            format!(
                "every one of the {} audit chains is claimed by another session",
                super::audit::MAX_CHAINS
            )
            .into(),
        ));
    };
    sqlx::query(
        "INSERT INTO audit_head (id, seq, entry_hash) \
         VALUES ($1::bigint + 1, $1::bigint << 40, decode(repeat('00', 32), 'hex')) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(chain)
    .execute(&mut *conn)
    .await?;
    tracing::info!(chain, "audit writer claimed its chain");
    Ok(chain)
}

/// Appends on `conn` to chain `chain`: with the head this process wrote last
/// (`cached`), one statement does it all unless another appender moved the
/// head since; then, and when nothing is cached, the head is locked (`FOR
/// UPDATE`) in a transaction and the batch sealed onto it.
pub(super) async fn append_on(
    conn: &mut sqlx::PgConnection,
    chain: i64,
    cached: Option<ChainHead>,
    drafts: &[AuditDraft],
    leases: &[LeaseGrant],
    profiles: &Profiles,
    sealer: AuditSealer<'_>,
) -> StoreResult<Appended> {
    use sqlx::Connection as _;
    if let Some(head) = cached {
        let batch = seal_batch(head, drafts, sealer);
        if let Some(recorded) = append_batch(&mut *conn, chain, &batch, leases, profiles).await? {
            return Ok(batch.appended(recorded));
        }
        // Another appender (a deletion's own entry, a session that wrote
        // this chain before) moved the head: the batch is sealed again under
        // the lock.
        metrics::counter!("tokenvault_audit_head_conflicts_total").increment(1);
    }
    let mut tx = conn.begin().await?;
    let head = read_audit_head(&mut *tx, LOCK_AUDIT_HEAD, chain).await?;
    let appended = append_locked(&mut tx, chain, head, drafts, leases, profiles, sealer).await?;
    tx.commit().await?;
    Ok(appended)
}

/// Reads a chain's head (`$1`) and locks it until the transaction ends: the
/// first statement of a transaction that appends an entry of its own (a
/// deletion's), so that it takes the head before any row an audit writer
/// locks after it.
pub(super) const LOCK_AUDIT_HEAD: &str =
    "SELECT seq, entry_hash FROM audit_head WHERE id = CAST($1 AS BIGINT) + 1 FOR UPDATE";

/// Appends `drafts` (and the `leases` that still hold) to chain `chain` on
/// `conn`, inside a transaction that has held its head locked since it read
/// `head` with [`LOCK_AUDIT_HEAD`].
pub(super) async fn append_locked(
    conn: &mut sqlx::PgConnection,
    chain: i64,
    head: ChainHead,
    drafts: &[AuditDraft],
    leases: &[LeaseGrant],
    profiles: &Profiles,
    sealer: AuditSealer<'_>,
) -> StoreResult<Appended> {
    let batch = seal_batch(head, drafts, sealer);
    let recorded = append_batch(&mut *conn, chain, &batch, leases, profiles)
        .await?
        .ok_or_else(|| VaultError::Internal("the locked audit chain head moved".into()))?;
    Ok(batch.appended(recorded))
}

/// Runs [`APPEND_AUDIT`] for a sealed batch: `None` when the head was no
/// longer the batch's start and nothing was written; else the ids of the
/// leases it recorded.
async fn append_batch<'c, E: sqlx::Executor<'c, Database = Db>>(
    db: E,
    chain: i64,
    batch: &SealedBatch<'_>,
    leases: &[LeaseGrant],
    profiles: &Profiles,
) -> StoreResult<Option<Vec<String>>> {
    let compact = lease_entries(batch, leases, profiles);
    // Each entry's index among the compact leases (-1: a text entry).
    let lease_of: Vec<i64> = compacted(batch, &compact)
        .into_iter()
        .map(|i| i.and_then(|i| i64::try_from(i).ok()).unwrap_or(-1))
        .collect();
    let e = &batch.entries;
    let k = &batch.checkpoints;
    let text = |f: fn(&AuditDraft) -> &str| e.iter().map(|r| f(r.draft)).collect::<Vec<_>>();
    let bytes = |f: for<'r> fn(&'r SealedRow<'r>) -> &'r [u8]| e.iter().map(f).collect::<Vec<_>>();
    let lease_int = |f: fn(&LeaseEntry<'_>) -> i64| compact.iter().map(f).collect::<Vec<_>>();
    let lease_bytes = |f: fn(&LeaseEntry<'_>) -> Vec<u8>| compact.iter().map(f).collect::<Vec<_>>();
    let row = sqlx::query(APPEND_AUDIT)
        .bind(batch.to.0)
        .bind(batch.to.1.as_slice())
        .bind(batch.from.0)
        .bind(batch.from.1.as_slice())
        .bind(chain + 1)
        .bind(e.iter().map(|r| r.seq).collect::<Vec<_>>())
        .bind(e.iter().map(|r| r.draft.at.as_micros()).collect::<Vec<_>>())
        .bind(text(|d| &d.actor))
        .bind(text(|d| &d.role))
        .bind(text(|d| &d.action))
        .bind(text(|d| &d.target))
        .bind(text(|d| &d.outcome))
        .bind(text(|d| &d.detail))
        .bind(bytes(|r| &r.entry_hash))
        .bind(bytes(|r| &r.mac))
        .bind(lease_of)
        .bind(k.iter().map(|c| c.seq).collect::<Vec<_>>())
        .bind(
            k.iter()
                .map(|c| c.entry_hash.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(
            k.iter()
                .map(|c| c.signed_at.as_micros())
                .collect::<Vec<_>>(),
        )
        .bind(
            k.iter()
                .map(|c| c.public_key.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(k.iter().map(|c| c.signature.as_slice()).collect::<Vec<_>>())
        .bind(
            (0..compact.len())
                .map(|i| i64::try_from(i).unwrap_or(-1))
                .collect::<Vec<_>>(),
        )
        .bind(
            compact
                .iter()
                .map(|l| l.grant.lease.connection_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(lease_int(|l| l.grant.connection_version.as_micros()))
        .bind(lease_int(|l| l.entry.seq))
        .bind(lease_int(|l| l.entry.draft.at.as_micros()))
        .bind(lease_int(|l| l.grant.lease.expires_at.as_micros()))
        .bind(lease_int(|l| l.profile))
        .bind(lease_bytes(|l| l.grant.lease.lease_id.key().to_vec()))
        .bind(lease_bytes(|l| l.grant.lease.connection_id.key().to_vec()))
        .bind(lease_bytes(|l| l.token()))
        .bind(lease_bytes(|l| l.entry.entry_hash.clone()))
        .bind(lease_bytes(|l| l.entry.mac.clone()))
        .fetch_one(db)
        .await?;
    if !row.try_get::<bool, _>("appended")? {
        return Ok(None);
    }
    let keys: Vec<Vec<u8>> = row.try_get("leases")?;
    let recorded = keys
        .iter()
        .map(|k| LeaseId::from_key(k).map(|id| id.to_string()))
        .collect::<StoreResult<_>>()?;
    Ok(Some(recorded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> String {
        connect_target(&PgConnectOptions::from_str(url).unwrap())
    }

    #[test]
    fn connect_errors_name_host_port_and_database_but_never_the_password() {
        let url = "postgres://vault:s3cret-pw@db.internal:6543/tokenvault?password=s3cret-q";
        let t = target(url);
        assert_eq!(t, "db.internal:6543 (database tokenvault)");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = connect_failed(&t, sqlx::Error::Io(refused));
        assert!(matches!(e, VaultError::Unavailable(_)), "{e:?}");
        let message = e.to_string();
        assert!(
            message.starts_with(
                "cannot connect to PostgreSQL at db.internal:6543 (database tokenvault): "
            ),
            "{message}"
        );
        for secret in ["s3cret", "vault:", "postgres://"] {
            assert!(!message.contains(secret), "{message}");
        }
        let e = connect_failed(&t, sqlx::Error::PoolTimedOut);
        assert!(matches!(e, VaultError::Unavailable(_)), "{e:?}");
        assert!(!e.to_string().contains('\n'), "{e}");

        assert_eq!(
            target("postgres://u:pw@[::1]:5433/db"),
            "[::1]:5433 (database db)"
        );
        assert_eq!(
            target("postgres://u:pw@localhost:5433/db?host=/run/postgresql/"),
            "/run/postgresql/.s.PGSQL.5433 (database db)"
        );
    }
}
