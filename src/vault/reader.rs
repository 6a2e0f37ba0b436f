//! Batched reads for the lease path. Every lease needs its connection and
//! sealed secrets; instead of two queries per lease, concurrent leases queue
//! their connection ids here and one task reads whatever has queued up with a
//! single query (the read-side twin of the audit log's group commit). Up to
//! [`IN_FLIGHT`] batches are read at once, so a new batch gathers while the
//! previous one is still in the database. Only sealed bytes pass through;
//! nothing is cached between batches.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::domain::{ConnectionId, VaultError};
use crate::store::{ConnectionRecord, SecretsRecord, Store};

/// The most ids read in one query.
const MAX_BATCH: usize = 256;

/// Batches read concurrently.
const IN_FLIGHT: usize = 3;

type Found = Option<(ConnectionRecord, Option<SecretsRecord>)>;
type Reply = oneshot::Sender<Result<Found, String>>;

/// Handle to the batching reader task.
pub(super) struct LeaseReader {
    tx: mpsc::Sender<(ConnectionId, Reply)>,
}

impl LeaseReader {
    /// Starts the reader task; it ends when the handle is dropped.
    pub(super) fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// A connection and its sealed secrets; `None` when there is no such
    /// connection.
    pub(super) async fn get(&self, id: &ConnectionId) -> Result<Found, VaultError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || VaultError::Unavailable("the vault is shutting down".into());
        self.tx
            .send((id.clone(), reply))
            .await
            .map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| VaultError::Unavailable(format!("database: {e}").into()))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(ConnectionId, Reply)>) {
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

async fn read_batch(store: &dyn Store, batch: Vec<(ConnectionId, Reply)>) {
    let mut ids: Vec<ConnectionId> = batch.iter().map(|(id, _)| id.clone()).collect();
    ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup();
    let started = std::time::Instant::now();
    let result = store.lease_lookup(&ids).await;
    metrics::histogram!("tokenvault_lease_read_batch_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("tokenvault_lease_read_batch_ids").record(ids.len() as f64);
    match result {
        Ok(rows) => {
            let unique = batch.len() == ids.len();
            let mut found: HashMap<ConnectionId, (ConnectionRecord, Option<SecretsRecord>)> =
                rows.into_iter().map(|r| (r.0.id.clone(), r)).collect();
            for (id, reply) in batch {
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
            for (_, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
