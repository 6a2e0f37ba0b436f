//! Reads for the lease path: a short-lived cache of sealed records in front
//! of batched database reads.
//!
//! Every lease needs its connection, its wrapped DEK and its sealed access
//! token. Most leases find them in the cache: sealed bytes only (the wrapped
//! DEK and the access token's ciphertext, never a refresh token, never
//! anything opened), kept at most `lease.cache_ttl_seconds` and dropped at
//! once when this vault deletes the connection, or reads an event naming it
//! that another replica wrote. A cached record is never
//! trusted on its own: the lease's record (its grant's audit entry) is written only
//! if the connection is still ACTIVE and unchanged since the record was read
//! (the store compares its `updated_at` in the same transaction), and the
//! lease path retries once from the database when it is not.
//!
//! On a miss, concurrent leases queue their connection ids here and one task
//! reads whatever has queued up with a single query (the read-side twin of
//! the audit log's group commit). Up to [`IN_FLIGHT`] batches are read at
//! once, so a new batch gathers while the previous one is still in the
//! database.
//!
//! Traced (when traces are exported): a lease's wait for its row is a
//! `lease_lookup` span in the lease's trace; each batch is a
//! `lease_lookup_batch` trace of its own, linked to the `lease_lookup` spans
//! it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use super::expiring::ExpiringMap;
use crate::domain::{ConnectionId, ConnectionStatus, ErrorReason, VaultError};
use crate::store::{ConnectionRecord, LeaseStore, SecretsRecord};
use crate::telemetry::traces::{self, Link};

/// The most ids read in one query.
const MAX_BATCH: usize = 256;

/// Batches read concurrently.
const IN_FLIGHT: usize = 3;

type Found = Option<(ConnectionRecord, Option<SecretsRecord>)>;
type Reply = oneshot::Sender<Result<Found, String>>;

/// One lease's request for a row: the id, where the row goes, and the span
/// waiting for it.
type Request = (ConnectionId, Reply, Link);

/// What the lease path reads: the connection and its sealed secrets, and
/// whether they came from the cache (and so may be out of date).
pub(super) struct LeaseRead {
    /// The connection as read.
    pub conn: Arc<ConnectionRecord>,
    /// Its wrapped DEK and sealed access token (no refresh token), if it holds any.
    pub secrets: Option<Arc<SecretsRecord>>,
    /// Served from the cache rather than read just now.
    pub cached: bool,
}

/// A cached record: the connection and its sealed secrets.
type Entry = (Arc<ConnectionRecord>, Arc<SecretsRecord>);

/// Sealed records of ACTIVE connections, by id, each kept for the TTL (see
/// [`ExpiringMap`] for how a full cache makes room).
struct SealedCache {
    entries: Mutex<ExpiringMap<ConnectionId, Entry>>,
    enabled: bool,
}

impl SealedCache {
    fn new(ttl: Duration, capacity: usize) -> Self {
        let entries = ExpiringMap::new(ttl, capacity);
        Self {
            enabled: entries.enabled(),
            entries: Mutex::new(entries),
        }
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExpiringMap<ConnectionId, Entry>> {
        // A panic while holding the lock leaves a map that is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &ConnectionId) -> Option<Entry> {
        self.lock().get(id).cloned()
    }

    /// Keeps a record just read, if its connection is ACTIVE and holds an
    /// access token (nothing else can be leased from a cached record).
    fn put(&self, conn: &Arc<ConnectionRecord>, secrets: &Arc<SecretsRecord>) {
        if conn.status != ConnectionStatus::Active || secrets.access_token.is_none() {
            return;
        }
        self.lock()
            .put(conn.id.clone(), (conn.clone(), secrets.clone()));
    }

    fn forget(&self, id: &ConnectionId) {
        self.lock().remove(id);
    }
}

/// Handle to the lease path's reads.
pub(super) struct LeaseReader {
    tx: mpsc::Sender<Request>,
    cache: SealedCache,
}

impl LeaseReader {
    /// Starts the batching task on the current runtime; it ends when the
    /// handle is dropped. Records are cached for `ttl`, at
    /// most `capacity` of them; either at zero turns the cache off.
    pub(super) fn start(store: Arc<dyn LeaseStore>, ttl: Duration, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx));
        Self {
            tx,
            cache: SealedCache::new(ttl, capacity),
        }
    }

    /// A connection and its sealed secrets; `None` when there is no such
    /// connection. `fresh` skips the cache.
    pub(super) async fn get(
        &self,
        id: &ConnectionId,
        fresh: bool,
    ) -> Result<Option<LeaseRead>, VaultError> {
        if self.cache.enabled() && !fresh {
            if let Some((conn, secrets)) = self.cache.get(id) {
                metrics::counter!("tokenvault_lease_cache_total", "result" => "hit").increment(1);
                return Ok(Some(LeaseRead {
                    conn,
                    secrets: Some(secrets),
                    cached: true,
                }));
            }
            metrics::counter!("tokenvault_lease_cache_total", "result" => "miss").increment(1);
        }
        let found = self.lookup(id).await?;
        Ok(found.map(|(conn, secrets)| {
            let (conn, secrets) = (Arc::new(conn), secrets.map(Arc::new));
            if self.cache.enabled()
                && let Some(secrets) = &secrets
            {
                self.cache.put(&conn, secrets);
            }
            LeaseRead {
                conn,
                secrets,
                cached: false,
            }
        }))
    }

    /// Queues `id` for the next batched read and waits for its row: the
    /// lease path's database call group.
    #[tracing::instrument(
        name = "lease_lookup",
        level = "debug",
        skip_all,
        fields(otel.kind = "client", db.operation.name = "lease_lookup")
    )]
    async fn lookup(&self, id: &ConnectionId) -> Result<Found, VaultError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || {
            VaultError::Unavailable("the vault is shutting down".into())
                .because(ErrorReason::ShuttingDown)
        };
        self.tx
            .send((id.clone(), reply, Link::current()))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(|e| {
            VaultError::Unavailable(format!("database: {e}").into())
                .because(ErrorReason::DatabaseUnavailable)
        })
    }

    /// Drops a connection's cached record (deleted, found out of date, or
    /// its token refreshed).
    pub(super) fn forget(&self, id: &ConnectionId) {
        self.cache.forget(id);
    }
}

async fn run(store: Arc<dyn LeaseStore>, mut rx: mpsc::Receiver<Request>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let store = store.clone();
        tokio::spawn(async move {
            read_batch(store.as_ref(), batch).await;
            drop(slot);
        });
    }
}

async fn read_batch(store: &dyn LeaseStore, batch: Vec<Request>) {
    let mut ids: Vec<ConnectionId> = batch.iter().map(|(id, _, _)| id.clone()).collect();
    ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup();
    // One read for many leases: a trace of its own, linked to each lease's
    // wait (`lease_lookup`).
    let span = tracing::debug_span!(
        parent: None,
        "lease_lookup_batch",
        otel.kind = "client",
        db.operation.name = "lease_lookup",
        db.operation.batch.size = i64::try_from(ids.len()).unwrap_or(i64::MAX)
    );
    traces::link_all(&span, batch.iter().map(|(_, _, link)| link));
    let started = std::time::Instant::now();
    let result = store.lease_lookup(&ids).instrument(span).await;
    metrics::histogram!("tokenvault_lease_read_batch_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("tokenvault_lease_read_batch_ids").record(ids.len() as f64);
    match result {
        Ok(rows) => {
            let unique = batch.len() == ids.len();
            // The lease path never needs the refresh token: it stays in the store.
            let mut found: HashMap<ConnectionId, (ConnectionRecord, Option<SecretsRecord>)> = rows
                .into_iter()
                .map(|(conn, mut secrets)| {
                    if let Some(s) = secrets.as_mut() {
                        s.refresh_token = None;
                    }
                    (conn.id.clone(), (conn, secrets))
                })
                .collect();
            for (id, reply, _) in batch {
                // Usually one request per id: move the row out; clone for repeats.
                let row = if unique {
                    found.remove(&id)
                } else {
                    found.get(&id).cloned()
                };
                let _ = reply.send(Ok(row));
            }
        }
        Err(e) => {
            let e = e.to_string();
            for (_, reply, _) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
