//! The tamper-evident audit log. Every security-relevant action is appended
//! with actor, action, target and outcome (never a secret: tokens are named by
//! HMAC). Each entry holds the SHA-256 of the previous entry, and an HMAC of
//! its own hash under the keyring's audit key, so editing, deleting or
//! reordering a row breaks verification at that row.
//!
//! Appends go through one writer that commits whatever has queued up in one
//! transaction (group commit), so auditing does not cap throughput. The log
//! fails closed: [`AuditLog::record`] returns only after the entry is
//! committed, and callers perform their operation only if it succeeded.
//!
//! The writer's loop is the one serial step every lease passes through, so
//! its wake-ups must not queue behind request work. On SQLite it runs on a
//! thread of its own (`tokenvault-audit`, with a single-threaded Tokio
//! runtime): the SQLite driver does its work on its own thread anyway, and on
//! the shared runtime each of the loop's wake-ups would wait behind the
//! request tasks queued on busy workers (what that cost: see BENCHMARKS.md,
//! the lease section). On PostgreSQL the writer's connection does its I/O
//! through the shared runtime's reactor, so the loop stays a task there.
//!
//! On PostgreSQL each vault process's writer appends to a chain of its own
//! (see `store::audit`); whenever its chain reaches a checkpoint position it
//! also appends an entry naming the other chains' latest checkpoints (see
//! the `chains` module), which is what ties the chains into one log.
//!
//! Signed checkpoints kept in the database cannot prove its tail to someone
//! who can rewrite the database; the writer also appends each one to the
//! audit witness, a file outside the database, after its batch commits (see
//! the `witness` module for when, and for what happens when that fails).
//!
//! Traced (when traces are exported): an append's wait for its group commit
//! is an `audit_append` span in the caller's trace (a lease's, say); each
//! group commit, which serves many callers, is an `audit_commit` trace of
//! its own, linked to the `audit_append` span of every entry it commits.

pub mod archive;
pub mod chains;
mod checkpoint;
mod verify;
mod witness;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ring::digest;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

pub use checkpoint::CheckpointSigner;
pub use verify::{VerifyReport, verify_chain, verify_with_witness};
pub use witness::{
    LOG_TARGET as WITNESS_LOG_TARGET, Witness, WitnessContents, WitnessRecord, Witnessed,
    read as read_witness,
};

use crate::crypto::{KeyringProvider, MacPurpose};
use crate::domain::{Timestamp, VaultError};
use crate::store::{
    AuditCheckpoint, AuditDraft, AuditStore, Backend, LeaseGrant, SealedEntry, Store,
};
use crate::telemetry::traces::{self, Link};

/// The most entries committed in one group.
const MAX_GROUP: usize = 512;

/// After an append fails because the database is unreachable, appends are
/// refused at once for this long instead of each waiting out the pool's
/// acquire timeout again: during an outage callers get UNAVAILABLE promptly,
/// and the first append after the window probes the database.
const FAIL_FAST: std::time::Duration = std::time::Duration::from_secs(1);

/// Who performed an action, as the audit log names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The authenticated identity (SPIFFE id, DNS name, API key name, `system`).
    pub identity: String,
    /// The role the policy gave it.
    pub role: String,
}

impl Actor {
    /// The vault itself (background jobs, start-up).
    pub fn system() -> Self {
        Self {
            identity: "tokenvault".to_owned(),
            role: "system".to_owned(),
        }
    }

    /// A local operator running an offline command (`tokenvault keys init`).
    pub fn local_operator() -> Self {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
        Self {
            identity: format!("local:{user}"),
            role: "operator".to_owned(),
        }
    }
}

/// How an audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It happened.
    Ok,
    /// Authorization refused it.
    Denied,
    /// It was attempted and failed.
    Failed,
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Where the writer sends an append's outcome.
type Reply = oneshot::Sender<Result<i64, Refusal>>;

struct Job {
    draft: AuditDraft,
    lease: Option<LeaseGrant>,
    reply: Reply,
    /// The span waiting for the commit, which the commit's span links to.
    link: Link,
}

/// Why an append did not take.
#[derive(Clone, Debug)]
enum Refusal {
    /// The entry is not in the log.
    Failed(String),
    /// The entry is in the log, but the lease was not recorded: its
    /// connection stopped being ACTIVE, or changed, first.
    LeaseVoid,
}

/// What became of a lease grant sent to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseRecorded {
    /// The grant is in the log and the lease is recorded: the entry's
    /// sequence number.
    Granted(i64),
    /// The grant is in the log but the lease is not recorded: when the batch
    /// committed, the connection was no longer ACTIVE, or had changed since
    /// the lease path read it. The token must not be handed out.
    Void,
}

/// Seals entries onto the chain: each entry's hash, its MAC under the
/// keyring's audit key and, at checkpoint positions, a signed checkpoint.
/// Shared by the writer and by the few store transactions that append an
/// entry of their own (a deletion's `deletion.done`), so that the store never
/// holds the audit key.
pub struct Sealer {
    keyring: Arc<dyn KeyringProvider>,
    signer: CheckpointSigner,
}

impl Sealer {
    /// Seals `draft` as entry `seq` after an entry whose hash is `prev`.
    pub fn seal(&self, seq: i64, prev: &[u8], draft: &AuditDraft) -> SealedEntry {
        let hash = entry_hash(seq, prev, draft);
        SealedEntry {
            mac: self.keyring.mac(MacPurpose::AuditChain, &hash).to_vec(),
            checkpoint: self.signer.checkpoint(seq, &hash),
            entry_hash: hash,
        }
    }

    /// Whether a stored entry's hash is its contents' and its MAC verifies.
    pub fn entry_intact(&self, row: &crate::store::AuditRow) -> bool {
        verify::check_entry(self.keyring.as_ref(), row).is_ok()
    }

    /// A checkpoint signed for entry `seq` wherever it falls: the seal of an
    /// archive segment.
    pub fn sign_seal(&self, seq: i64, entry_hash: &[u8]) -> AuditCheckpoint {
        self.signer.sign(seq, entry_hash)
    }
}

/// Handle to the audit writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    fault: Arc<AtomicBool>,
    sealer: Arc<Sealer>,
    /// Where the writer witnesses checkpoints, if anywhere.
    witness: Option<Arc<Path>>,
}

impl AuditLog {
    /// Starts the writer (see the module documentation for where it runs);
    /// every `checkpoint_every`-th entry gets a signed checkpoint. Must be
    /// called inside a Tokio runtime. The writer stops once every handle is
    /// dropped and the entries queued before are committed.
    pub fn start(
        store: Arc<dyn Store>,
        keyring: Arc<dyn KeyringProvider>,
        checkpoint_every: u64,
    ) -> Result<Self, VaultError> {
        Self::start_witnessed(store, keyring, checkpoint_every, None)
    }

    /// As [`AuditLog::start`]; with a `witness`, the writer also appends
    /// every checkpoint to it once the checkpoint's batch has committed, and
    /// before it answers that batch's callers.
    pub fn start_witnessed(
        store: Arc<dyn Store>,
        keyring: Arc<dyn KeyringProvider>,
        checkpoint_every: u64,
        witness: Option<Witness>,
    ) -> Result<Self, VaultError> {
        let (jobs, rx) = mpsc::channel(8 * MAX_GROUP);
        let fault = Arc::new(AtomicBool::new(false));
        let signer = CheckpointSigner::new(keyring.as_ref(), checkpoint_every);
        let sealer = Arc::new(Sealer { keyring, signer });
        let witness_path = witness.as_ref().map(|w| Arc::<Path>::from(w.path()));
        // `db.system.name` of the commits' spans.
        let system = match store.backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        };
        let writer = writer(
            store.clone(),
            sealer.clone(),
            rx,
            fault.clone(),
            witness,
            system,
        );
        match store.backend() {
            Backend::Sqlite => {
                let failed = |what: &str, e: std::io::Error| {
                    VaultError::Internal(format!("starting the audit writer's {what}: {e}").into())
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| failed("runtime", e))?;
                std::thread::Builder::new()
                    .name("tokenvault-audit".to_owned())
                    .spawn(move || runtime.block_on(writer))
                    .map_err(|e| failed("thread", e))?;
            }
            Backend::Postgres => {
                tokio::spawn(writer);
            }
        }
        Ok(Self {
            jobs,
            fault,
            sealer,
            witness: witness_path,
        })
    }

    /// The witness file the writer appends checkpoints to, if any.
    pub fn witness_path(&self) -> Option<&Path> {
        self.witness.as_deref()
    }

    /// Appends an entry and waits until it is committed. An error means the
    /// entry is not in the log, and the caller must not perform the action.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: impl Into<String>,
    ) -> Result<i64, VaultError> {
        match self
            .append(actor, action, target, outcome, detail.into(), None)
            .await?
        {
            LeaseRecorded::Granted(seq) => Ok(seq),
            // Only a lease can be void, and this entry carries none.
            LeaseRecorded::Void => Err(VaultError::Internal(
                "an audit entry without a lease came back void".into(),
            )),
        }
    }

    /// Appends a lease grant, which is the lease's record (one compact row,
    /// see `store::leases`): the lease exists only if its grant is audited,
    /// and is recorded only if its connection is still ACTIVE and unchanged
    /// in the same transaction.
    pub async fn record_lease(
        &self,
        actor: &Actor,
        target: &str,
        detail: String,
        lease: LeaseGrant,
    ) -> Result<LeaseRecorded, VaultError> {
        self.append(
            actor,
            crate::store::audit::LEASE_GRANT,
            target,
            Outcome::Ok,
            detail,
            Some(lease),
        )
        .await
    }

    /// The sealer, for a store transaction that appends its own entry
    /// (see [`Sealer`]). Such an append bypasses [`AuditLog::inject_failure`].
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// An entry as it will be appended, stamped now.
    pub fn draft(
        actor: &Actor,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: String,
    ) -> AuditDraft {
        AuditDraft {
            at: Timestamp::now(),
            actor: actor.identity.clone(),
            role: actor.role.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: outcome.as_str().to_owned(),
            detail,
        }
    }

    #[tracing::instrument(
        name = "audit_append",
        level = "debug",
        skip_all,
        fields(otel.kind = "client", db.operation.name = "audit_append")
    )]
    async fn append(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: String,
        lease: Option<LeaseGrant>,
    ) -> Result<LeaseRecorded, VaultError> {
        let started = std::time::Instant::now();
        let draft = Self::draft(actor, action, target, outcome, detail);
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                draft,
                lease,
                reply,
                link: Link::current(),
            })
            .await
            .map_err(|_| VaultError::AuditUnavailable("audit writer stopped".to_owned()))?;
        let result = rx.await;
        metrics::histogram!("tokenvault_audit_append_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(seq)) => Ok(LeaseRecorded::Granted(seq)),
            Ok(Err(Refusal::Failed(e))) => Err(VaultError::AuditUnavailable(e)),
            Ok(Err(Refusal::LeaseVoid)) => Ok(LeaseRecorded::Void),
            Err(_) => Err(VaultError::AuditUnavailable(
                "audit writer stopped".to_owned(),
            )),
        }
    }

    /// Fault injection for tests and drills: while set, every append fails as
    /// if the database refused it.
    pub fn inject_failure(&self, fail: bool) {
        self.fault.store(fail, Ordering::SeqCst);
    }
}

async fn writer(
    store: Arc<dyn AuditStore>,
    sealer: Arc<Sealer>,
    mut rx: mpsc::Receiver<Job>,
    fault: Arc<AtomicBool>,
    mut witness: Option<Witness>,
    system: &'static str,
) {
    let every = sealer.signer.every();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    // Set while the database is known to be unreachable: until when, and why.
    let mut unreachable: Option<(std::time::Instant, String)> = None;
    while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
        // The jobs' parts are moved, not copied: the drafts and lease grants
        // to the store (each grant told its entry's index), the replies kept
        // here with the index of the grant each one waits on.
        let entries = batch.len();
        let mut drafts: Vec<AuditDraft> = Vec::with_capacity(entries);
        let mut leases: Vec<LeaseGrant> = Vec::new();
        let mut replies: Vec<(Option<usize>, Reply)> = Vec::with_capacity(entries);
        // One commit for many callers: a trace of its own, linked to each
        // caller's wait (`audit_append`).
        let span = tracing::debug_span!(
            parent: None,
            "audit_commit",
            otel.kind = "client",
            db.system.name = system,
            db.operation.name = "audit_append",
            db.operation.batch.size = i64::try_from(entries).unwrap_or(i64::MAX)
        );
        traces::link_all(&span, batch.iter().map(|job| &job.link));
        for job in batch.drain(..) {
            let entry = drafts.len();
            drafts.push(job.draft);
            let waits_on = job.lease.map(|mut g| {
                g.entry = entry;
                leases.push(g);
                leases.len() - 1
            });
            replies.push((waits_on, job.reply));
        }
        let started = std::time::Instant::now();
        if unreachable
            .as_ref()
            .is_some_and(|(until, _)| std::time::Instant::now() >= *until)
        {
            unreachable = None;
        }
        let sealed = Sealed::new(witness.is_some());
        let result = if fault.load(Ordering::SeqCst) {
            Err("injected audit failure".to_owned())
        } else if let Some((_, why)) = &unreachable {
            Err(why.clone())
        } else {
            let seal = |seq: i64, prev: &[u8], d: &AuditDraft| sealed.seal(&sealer, seq, prev, d);
            store
                .audit_append(&drafts, &leases, &seal)
                .instrument(span)
                .await
                .map_err(|e| {
                    if matches!(e, VaultError::Unavailable(_)) {
                        unreachable = Some((std::time::Instant::now() + FAIL_FAST, e.to_string()));
                    }
                    e.to_string()
                })
        };
        metrics::histogram!("tokenvault_audit_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tokenvault_audit_batch_entries").record(entries as f64);
        match result {
            Ok((seqs, recorded)) => {
                sealed
                    .witness(witness.as_mut(), &*store, &seqs, every)
                    .await;
                let crossed = seqs
                    .last()
                    .filter(|_| seqs.iter().any(|&s| sealer.signer.is_position(s)))
                    .map(|&last| crate::store::audit::chain_of(last));
                let recorded: std::collections::HashSet<String> = recorded.into_iter().collect();
                for ((waits_on, reply), seq) in replies.into_iter().zip(seqs) {
                    let outcome = match waits_on {
                        Some(i) if !recorded.contains(leases[i].lease.lease_id.as_str()) => {
                            Err(Refusal::LeaseVoid)
                        }
                        _ => Ok(seq),
                    };
                    let _ = reply.send(outcome);
                }
                if let Some(chain) = crossed {
                    cross_reference(&*store, &sealer, witness.as_mut(), every, chain).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, entries, "audit append failed; operations refused");
                for (_, reply) in replies {
                    let _ = reply.send(Err(Refusal::Failed(e.clone())));
                }
            }
        }
    }
}

/// Appends chain `chain`'s cross-reference entry (see the `chains` module)
/// and witnesses the other chains' checkpoints it names, and any checkpoint
/// it lands on. A failure is logged and left: the entry is the vault's own,
/// and the chain's next checkpoint writes one again.
async fn cross_reference(
    store: &dyn AuditStore,
    sealer: &Sealer,
    witness: Option<&mut Witness>,
    every: i64,
    chain: i64,
) {
    let (draft, named) = match chains::draft(store, chain).await {
        Ok(Some(drafted)) => drafted,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, chain, "audit: reading the other chains' checkpoints failed");
            return;
        }
    };
    let sealed = Sealed::new(witness.is_some());
    let seal = |seq: i64, prev: &[u8], d: &AuditDraft| sealed.seal(sealer, seq, prev, d);
    match store
        .audit_append(std::slice::from_ref(&draft), &[], &seal)
        .await
    {
        Ok((seqs, _)) => {
            if let Some(w) = witness {
                w.other_chains(named).await;
                sealed.witness(Some(w), store, &seqs, every).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, chain, "audit: appending the cross-reference entry failed");
        }
    }
}

/// The checkpoints sealed for one append, kept for the witness when there
/// is one, in sealing order (the store seals a batch again when another
/// appender moved the head first).
struct Sealed {
    keep: bool,
    checkpoints: std::sync::Mutex<Vec<AuditCheckpoint>>,
}

impl Sealed {
    fn new(keep: bool) -> Self {
        Self {
            keep,
            checkpoints: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Seals as `sealer` does, keeping the checkpoint sealed, if any.
    fn seal(&self, sealer: &Sealer, seq: i64, prev: &[u8], d: &AuditDraft) -> SealedEntry {
        let entry = sealer.seal(seq, prev, d);
        if self.keep
            && let Some(c) = &entry.checkpoint
            && let Ok(mut kept) = self.checkpoints.lock()
        {
            kept.push(c.clone());
        }
        entry
    }

    /// Appends to `witness` the checkpoints of the append that committed as
    /// `seqs`.
    async fn witness(
        self,
        witness: Option<&mut Witness>,
        store: &dyn AuditStore,
        seqs: &[i64],
        every: i64,
    ) {
        let Some(w) = witness else {
            return;
        };
        let sealed = self
            .checkpoints
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let committed = committed_checkpoints(sealed, seqs);
        if !committed.is_empty() {
            w.after_commit(store, committed, every).await;
        }
    }
}

/// The checkpoints of a batch that committed as sequence numbers `seqs`:
/// those sealed for these numbers, each as last sealed (a batch sealed again
/// onto a moved head replaces what it sealed before; checkpoint positions
/// depend on the sequence number alone).
fn committed_checkpoints(sealed: Vec<AuditCheckpoint>, seqs: &[i64]) -> Vec<AuditCheckpoint> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Vec::new();
    };
    let mut by_seq = std::collections::BTreeMap::new();
    for c in sealed {
        if (first..=last).contains(&c.seq) {
            by_seq.insert(c.seq, c);
        }
    }
    by_seq.into_values().collect()
}

/// The SHA-256 of an entry: an unambiguous (length-prefixed) encoding of its
/// sequence number, the previous hash and every field.
pub fn entry_hash(seq: i64, prev_hash: &[u8], d: &AuditDraft) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"tokenvault-audit-v1\0");
    ctx.update(&seq.to_be_bytes());
    ctx.update(&d.at.as_micros().to_be_bytes());
    for field in [
        prev_hash,
        d.actor.as_bytes(),
        d.role.as_bytes(),
        d.action.as_bytes(),
        d.target.as_bytes(),
        d.outcome.as_bytes(),
        d.detail.as_bytes(),
    ] {
        ctx.update(&(field.len() as u64).to_be_bytes());
        ctx.update(field);
    }
    ctx.finish().as_ref().to_vec()
}
