//! The event log as sync workers see it: a resumable stream per consumer and
//! cumulative acknowledgements.
//!
//! Every replica learns of new events in two ways: its own writes advance the
//! in-process head at once, and a poller reads the log's head from the
//! database every `events.poll_interval_ms` (default 200 ms), which is how an
//! event committed on another replica reaches this one's watchers well within
//! a second. Watchers never receive event data over the bus — only "the head
//! moved" — and read the events themselves, in cursor order, from the
//! database; cursors are committed in order (see the store), so reading
//! "after my last cursor" never skips one.
//!
//! A watcher limited to some tenants ([`crate::policy::TenantScope`]) is
//! sent only their events. The filter runs here, on the server, before an
//! event reaches the transport, so no field of another tenant's event —
//! tenant, account, connection or lease id, detail — goes on the wire. An
//! event that names no tenant (none does today: every event names a
//! connection or an account) could be anyone's, so only watchers without a
//! limit get it. The stream's own position moves past every event it reads,
//! sent or not, and cursors stay plain positions in the one log: a limited
//! watcher acks the cursor of the last event it acted on, which covers the
//! skipped events before it (or any cursor up to the newest), and resumes
//! from there. What it learns of other tenants is that its cursors have gaps
//! and, from an OUT_OF_RANGE answer, the newest cursor.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::audit::{Actor, Outcome};
use crate::domain::{ConsumerName, ErrorReason, EventKind, Integration, Timestamp, VaultError};
use crate::policy::SharedPolicy;
use crate::store::EventRecord;

use super::Vault;

/// Events read per query while catching up.
const PAGE: i64 = 256;

/// The newest cursor this process knows of, shared with every watcher.
pub(super) struct EventHead {
    tx: watch::Sender<i64>,
}

impl EventHead {
    pub(super) fn new() -> Self {
        Self {
            tx: watch::channel(0).0,
        }
    }

    /// Moves the head forward (never back).
    pub(super) fn advance(&self, cursor: i64) {
        self.tx.send_if_modified(|h| {
            if cursor > *h {
                *h = cursor;
                true
            } else {
                false
            }
        });
    }

    fn subscribe(&self) -> watch::Receiver<i64> {
        self.tx.subscribe()
    }
}

/// What a watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The consumer.
    pub consumer: ConsumerName,
    /// Start after this cursor; `None` = the consumer's stored position.
    pub after_cursor: Option<i64>,
    /// Only these kinds (empty = all).
    pub kinds: Vec<EventKind>,
    /// Only these integrations (empty = all).
    pub integrations: Vec<Integration>,
}

/// Who is watching, for the tenant filter: the caller's identity and the
/// policy in force. The filter reads the policy again for every page it
/// sends, so a reload that narrows the watcher's tenants applies to a running
/// stream too, and an identity the reload removes is sent nothing more.
#[derive(Clone)]
pub struct Watcher {
    /// The caller's identity.
    pub identity: String,
    /// The policy in force, reloadable.
    pub policy: Arc<SharedPolicy>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl WatchRequest {
    fn wants(&self, e: &EventRecord) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&e.event.kind))
            && (self.integrations.is_empty()
                || e.event
                    .integration
                    .is_some_and(|i| self.integrations.contains(&i)))
    }
}

impl Vault {
    /// Starts a watch: checks the start position, then streams past and
    /// future events until the receiver is dropped or the vault shuts down
    /// (the stream then ends with UNAVAILABLE). Only events of tenants the
    /// watcher may see are sent (see the module doc).
    pub async fn events_watch(
        self: &Arc<Self>,
        req: WatchRequest,
        watcher: Watcher,
    ) -> Result<mpsc::Receiver<Result<EventRecord, VaultError>>, VaultError> {
        let state = self.store().event_state().await?;
        let start = match req.after_cursor {
            Some(c) if c > 0 => c,
            _ => {
                self.store()
                    .consumer_position(req.consumer.as_str())
                    .await?
            }
        };
        if start > state.head {
            return Err(VaultError::OutOfRange(
                format!("cursor {start} is past the newest event ({})", state.head).into(),
            ));
        }
        let start = if start == 0 {
            // A new consumer starts at the oldest retained event.
            state.pruned_through
        } else if start < state.pruned_through {
            return Err(VaultError::OutOfRange(
                format!(
                    "events after cursor {start} were pruned (through {}); resuming would miss some",
                    state.pruned_through
                )
                .into(),
            )
            .because(ErrorReason::EventsPruned));
        } else {
            start
        };
        self.events.advance(state.head);
        let (tx, rx) = mpsc::channel(PAGE as usize);
        let vault = self.clone();
        tokio::spawn(async move { vault.stream_events(req, watcher, start, tx).await });
        Ok(rx)
    }

    async fn stream_events(
        &self,
        req: WatchRequest,
        watcher: Watcher,
        mut position: i64,
        tx: mpsc::Sender<Result<EventRecord, VaultError>>,
    ) {
        let mut head = self.events.subscribe();
        let mut stopping = self.stopping.subscribe();
        loop {
            head.mark_unchanged();
            let page = match self.store().events_after(position, PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let full = page.len() as i64 == PAGE;
            let policy = watcher.policy.current();
            let tenants = policy.tenant_scope(&watcher.identity);
            for e in page {
                // Past every event read, sent or not: the next page starts after it.
                position = e.cursor;
                let shown = req.wants(&e) && tenants.sees(e.event.tenant.as_ref());
                if shown && tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                _ = super::stopped(&mut stopping) => {
                    let _ = tx
                        .send(Err(VaultError::Unavailable(
                            "the server is shutting down; reconnect and resume from your last cursor".into(),
                        )
                        .because(ErrorReason::ShuttingDown)))
                        .await;
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// Whether deletion receipts wait for `consumer`'s acknowledgements
    /// (`deletion.required_consumers`).
    pub fn receipts_wait_for(&self, consumer: &ConsumerName) -> bool {
        self.required_consumers()
            .iter()
            .any(|(_, c)| c == consumer.as_str())
    }

    /// Acknowledges every event up to `cursor` for `consumer`; returns the
    /// durable position. Any cursor up to the newest is accepted, whether or
    /// not the caller was sent the event at it: a tenant-limited watcher acks
    /// past the other tenants' events it was not sent. A consumer's position
    /// is one position in the one log, and its ack is stamped on the receipts
    /// of every event it covers, whatever their tenant: so the transport
    /// refuses an ack from a tenant-limited caller for a consumer that
    /// deletion receipts wait for ([`Vault::receipts_wait_for`]), which would
    /// otherwise record other tenants' data as purged unseen.
    pub async fn events_ack(
        &self,
        actor: &Actor,
        consumer: &ConsumerName,
        cursor: i64,
    ) -> Result<i64, VaultError> {
        if cursor <= 0 {
            return Err(VaultError::invalid("cursor", "must be a positive cursor"));
        }
        let before = self.store().consumer_position(consumer.as_str()).await?;
        if cursor <= before {
            return Ok(before);
        }
        self.audit()
            .record(
                actor,
                "events.ack",
                consumer.as_str(),
                Outcome::Ok,
                format!("cursor={cursor}"),
            )
            .await?;
        self.store()
            .consumer_ack(consumer.as_str(), cursor, Timestamp::now())
            .await
    }

    /// Reads the log's head, so watchers here see events other replicas
    /// wrote (polled) or this one just wrote (after a write). A failure is
    /// logged: the next poll catches up.
    pub(super) async fn refresh_event_head(&self) {
        match self.store().event_state().await {
            Ok(state) => {
                self.events.advance(state.head);
                self.forget_changed_connections(state.head).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the event log head"),
        }
    }

    /// Drops this replica's cached records and DEKs of every connection an
    /// event up to `head` names (deleted, suspended, leases revoked — on any
    /// replica), so a deletion elsewhere reaches this replica's caches within
    /// a poll rather than when their entries expire.
    async fn forget_changed_connections(&self, head: i64) {
        let mut from = self
            .cache_events_seen
            .load(std::sync::atomic::Ordering::Acquire);
        while from < head {
            match self.store().events_after(from, PAGE).await {
                Ok(events) => {
                    let Some(last) = events.last() else { break };
                    from = last.cursor;
                    for id in events.iter().filter_map(|e| e.event.connection_id.as_ref()) {
                        self.reader.forget(id);
                        self.keys().forget_connection(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read new events to drop cached records");
                    return;
                }
            }
        }
        self.cache_events_seen
            .fetch_max(from.max(head), std::sync::atomic::Ordering::AcqRel);
    }
}
