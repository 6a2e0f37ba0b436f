//! Plain records exchanged with the store. Sealed bytes are opaque here: only
//! `crypto` can open them.
//!
//! Data types only, no logic: the vocabulary every aggregate module shares,
//! kept in one file so that a record read by several aggregates has one home.

use crate::crypto::KekVersion;
use crate::domain::{
    AccountId, ConnectionId, ConnectionStatus, DeletionReason, EventKind, Integration, KeyState,
    LeaseId, ReceiptId, ScopeSet, TenantId, Timestamp, UpstreamState,
};

/// A connection row (tombstones have no subject, email or scopes).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionRecord {
    /// The connection id.
    pub id: ConnectionId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Owning account.
    pub account: AccountId,
    /// Which integration.
    pub integration: Integration,
    /// Google's stable subject id (`sub`).
    pub google_subject: Option<String>,
    /// The Google account's email.
    pub google_email: Option<String>,
    /// Scopes Google actually granted.
    pub granted_scopes: ScopeSet,
    /// Current status.
    pub status: ConnectionStatus,
    /// Why the status was last changed.
    pub status_reason: Option<String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it was deleted.
    pub deleted_at: Option<Timestamp>,
    /// How its refreshes have gone.
    pub health: RefreshHealth,
}

/// How a connection's refreshes have gone, and when the proactive refresh
/// sweeper looks at it next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefreshHealth {
    /// The last time Google gave it new tokens (a refresh or a connect).
    pub last_refresh_at: Option<Timestamp>,
    /// The last refresh error, cleared by the next successful refresh.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<Timestamp>,
    /// When the sweeper refreshes it next (ACTIVE connections only).
    pub next_check_at: Option<Timestamp>,
}

/// The sealed secrets of a live connection.
#[derive(Clone, PartialEq)]
pub struct SecretsRecord {
    /// The connection.
    pub connection_id: ConnectionId,
    /// The KEK version that wrapped the DEK.
    pub kek_version: KekVersion,
    /// The wrapped DEK.
    pub wrapped_dek: Vec<u8>,
    /// The sealed access token.
    pub access_token: Option<Vec<u8>>,
    /// When the access token expires.
    pub access_expires_at: Option<Timestamp>,
    /// The sealed refresh token.
    pub refresh_token: Option<Vec<u8>>,
    /// Last change.
    pub updated_at: Timestamp,
}

impl std::fmt::Debug for SecretsRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sealed bytes are not secret on their own, but nothing gains from printing them.
        f.debug_struct("SecretsRecord")
            .field("connection_id", &self.connection_id)
            .field("kek_version", &self.kek_version)
            .field("access_expires_at", &self.access_expires_at)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// A KEK version's lifecycle.
#[derive(Clone, Debug, PartialEq)]
pub struct KekRecord {
    /// The version.
    pub version: KekVersion,
    /// Its state.
    pub state: KeyState,
    /// When the key was created.
    pub created_at: Timestamp,
    /// When it last became primary.
    pub primary_since: Option<Timestamp>,
    /// When it last stopped being primary.
    pub primary_until: Option<Timestamp>,
    /// When it was retired.
    pub retired_at: Option<Timestamp>,
    /// When its material was destroyed.
    pub destroyed_at: Option<Timestamp>,
    /// A zero key wrapped by this version (not secret).
    pub key_check: Vec<u8>,
    /// The provider kind that held it when it was registered (`local`, `env`, `pkcs11`).
    pub provider: String,
    /// Who created (or first registered) it.
    pub created_by: String,
    /// Who last made it primary.
    pub promoted_by: Option<String>,
    /// Who retired it.
    pub retired_by: Option<String>,
    /// Who destroyed it.
    pub destroyed_by: Option<String>,
}

/// A KEK version being registered.
#[derive(Clone, Debug)]
pub struct NewKek<'a> {
    /// The version.
    pub version: KekVersion,
    /// When its material was created.
    pub created_at: Timestamp,
    /// A zero key wrapped by it.
    pub key_check: &'a [u8],
    /// The provider kind holding it.
    pub provider: &'a str,
    /// Who created or first registered it.
    pub created_by: &'a str,
}

/// A key rotation run.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationRun {
    /// Run id.
    pub run_id: String,
    /// The version every DEK is rewrapped to.
    pub target_version: KekVersion,
    /// Start.
    pub started_at: Timestamp,
    /// End.
    pub finished_at: Option<Timestamp>,
    /// DEKs to rewrap when the run started.
    pub total: i64,
    /// DEKs rewrapped so far.
    pub rewrapped: i64,
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Who started it.
    pub actor: String,
    /// Why it failed.
    pub last_error: Option<String>,
    /// The replica whose worker runs it.
    pub owner: String,
}

/// What a wrapped key protects. A rotation rewraps every kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WrappedKeyKind {
    /// A connection's DEK (its tokens).
    Connection,
    /// A pending OAuth authorization's key (its PKCE verifier).
    OauthState,
    /// A revocation-outbox row's key (the token kept until Google confirms revocation).
    Outbox,
}

impl WrappedKeyKind {
    /// Every kind, in the order a rotation works through them.
    pub const ALL: [Self; 3] = [Self::Connection, Self::OauthState, Self::Outbox];

    /// The name in reports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::OauthState => "oauth_state",
            Self::Outbox => "outbox",
        }
    }
}

/// The row a wrapped key lives in, with what its associated data binds it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WrappedKeyOwner {
    /// `connection_deks`.
    Connection {
        /// The connection.
        id: ConnectionId,
        /// Its tenant.
        tenant: TenantId,
        /// Its account.
        account: AccountId,
    },
    /// `authorization_states`.
    OauthState {
        /// The state's HMAC (the row's key).
        state_hash: Vec<u8>,
        /// The tenant that began it.
        tenant: TenantId,
        /// The account it is for.
        account: AccountId,
    },
    /// `revocation_outbox`.
    Outbox {
        /// The deletion receipt.
        receipt: ReceiptId,
        /// The deleted connection.
        connection: ConnectionId,
        /// The receipt's tenant.
        tenant: TenantId,
    },
}

impl WrappedKeyOwner {
    /// Which kind of key this is.
    pub fn kind(&self) -> WrappedKeyKind {
        match self {
            Self::Connection { .. } => WrappedKeyKind::Connection,
            Self::OauthState { .. } => WrappedKeyKind::OauthState,
            Self::Outbox { .. } => WrappedKeyKind::Outbox,
        }
    }
}

/// A wrapped key read for rewrapping.
#[derive(Clone, Debug)]
pub struct WrappedKeyRow {
    /// Where it lives.
    pub owner: WrappedKeyOwner,
    /// Current KEK version.
    pub kek_version: KekVersion,
    /// Current wrapped bytes.
    pub wrapped_dek: Vec<u8>,
}

/// A compare-and-swap replacement of one wrapped key.
#[derive(Clone, Debug)]
pub struct Rewrap {
    /// Where it lives.
    pub owner: WrappedKeyOwner,
    /// Version that was read.
    pub old_version: KekVersion,
    /// Bytes that were read.
    pub old_wrapped: Vec<u8>,
    /// New version.
    pub new_version: KekVersion,
    /// New wrapped bytes.
    pub new_wrapped: Vec<u8>,
}

/// How many wrapped keys of one kind one KEK version wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrappedKeyCount {
    /// The KEK version.
    pub version: KekVersion,
    /// The kind of key.
    pub kind: WrappedKeyKind,
    /// How many.
    pub count: i64,
}

/// A replica sharing the database, and the key versions its keyring holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaRecord {
    /// The replica (one process) id.
    pub replica_id: String,
    /// Its host name.
    pub host: String,
    /// Its process id.
    pub pid: i64,
    /// The kernel boot and PID namespace it runs in (`boot_id/pid:[inode]`).
    pub instance: String,
    /// Its keyring provider.
    pub provider: String,
    /// The KEK versions its keyring holds, ascending.
    pub versions: Vec<KekVersion>,
    /// How often it writes this row.
    pub heartbeat: std::time::Duration,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last wrote this row (the database's clock).
    pub seen_at: Timestamp,
}

impl ReplicaRecord {
    /// Whether the replica counts as running at `now` (the database's clock): heard from
    /// within three heartbeats.
    pub fn is_live(&self, now: Timestamp) -> bool {
        now.since(self.seen_at) < self.heartbeat * 3
    }

    /// `host pid N` (`replica_id`), for messages.
    pub fn describe(&self) -> String {
        format!("{} (host {}, pid {})", self.replica_id, self.host, self.pid)
    }
}

/// Filters for listing connections.
#[derive(Clone, Debug, Default)]
pub struct ConnectionFilter {
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only this account (with tenant).
    pub account: Option<AccountId>,
    /// Only this integration.
    pub integration: Option<Integration>,
    /// Include deleted tombstones.
    pub include_deleted: bool,
    /// Only connections with this status (DELETED ones too when that is it).
    pub status: Option<ConnectionStatus>,
    /// Only connections of this Google account (its `sub`); tombstones have
    /// none, so they never match.
    pub google_subject: Option<String>,
}

/// A connection with what an administrator sees beside it, read in one
/// query: its token's expiry and key version, whether it holds a refresh
/// token, its open leases, and the receipt of its deletion.
#[derive(Clone, Debug)]
pub struct ConnectionDetailRecord {
    /// The connection itself.
    pub connection: ConnectionRecord,
    /// The access token's expiry, while the connection holds tokens.
    pub access_expires_at: Option<Timestamp>,
    /// The version of the KEK its DEK is wrapped with, while it holds one.
    pub kek_version: Option<KekVersion>,
    /// Whether it holds a refresh token.
    pub has_refresh_token: bool,
    /// Leases neither expired nor revoked at the time of the query.
    pub open_leases: i64,
    /// The first receipt naming it, once it is deleted.
    pub receipt_id: Option<ReceiptId>,
}

/// Keyset pagination: items after `after`, at most `limit`.
#[derive(Clone, Debug)]
pub struct PageRequest {
    /// The last id of the previous page.
    pub after: Option<String>,
    /// Page size.
    pub limit: i64,
}

/// An audit entry before it is chained.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AuditDraft {
    /// When it happened.
    #[sqlx(try_from = "i64")]
    pub at: Timestamp,
    /// Who did it (identity).
    pub actor: String,
    /// The actor's role.
    pub role: String,
    /// What was done (`lease.grant`, `key.rotate.start`, …).
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// `ok`, `denied`, `failed`.
    pub outcome: String,
    /// Free-form detail, never a secret (tokens named by HMAC).
    pub detail: String,
}

/// What the audit component computes for an entry once its position is known.
pub struct SealedEntry {
    /// SHA-256 over the entry, including the previous entry's hash.
    pub entry_hash: Vec<u8>,
    /// HMAC of `entry_hash` under the audit key.
    pub mac: Vec<u8>,
    /// A signed checkpoint of this entry, at checkpoint positions.
    pub checkpoint: Option<AuditCheckpoint>,
}

/// The head of one audit chain: its last entry (position 0 and the genesis
/// hash while the chain is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditHead {
    /// The chain (see `crate::store::audit` for how sequence numbers carry it).
    pub chain: i64,
    /// The sequence number of its last entry.
    pub seq: i64,
    /// That entry's hash.
    pub entry_hash: Vec<u8>,
}

/// A signed checkpoint of the audit chain.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditCheckpoint {
    /// The entry it vouches for.
    pub seq: i64,
    /// That entry's hash.
    pub entry_hash: Vec<u8>,
    /// When it was signed.
    #[sqlx(try_from = "i64")]
    pub signed_at: Timestamp,
    /// The Ed25519 public key that verifies `signature`.
    pub public_key: Vec<u8>,
    /// Ed25519 signature over the checkpoint's canonical encoding.
    pub signature: Vec<u8>,
}

/// A sealed segment of the audit log's archive (see `crate::audit::archive`):
/// entries `first_seq..=last_seq`, written to `file_name` under the archive
/// directory before they were pruned from the live table.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditSegment {
    /// The first entry in the segment.
    pub first_seq: i64,
    /// The last entry in the segment.
    pub last_seq: i64,
    /// The hash of the entry before `first_seq` (32 zero bytes before entry 1).
    pub prev_hash: Vec<u8>,
    /// The hash of entry `last_seq`.
    pub last_hash: Vec<u8>,
    /// The file's name within the archive directory.
    pub file_name: String,
    /// The SHA-256 of the whole file.
    pub file_sha256: Vec<u8>,
    /// When it was sealed.
    #[sqlx(try_from = "i64")]
    pub sealed_at: Timestamp,
    /// The replica that sealed it.
    pub sealed_by: String,
}

/// A stored audit entry.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct AuditRow {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// The entry.
    #[sqlx(flatten)]
    pub draft: AuditDraft,
    /// Hash of the previous entry.
    pub prev_hash: Vec<u8>,
    /// This entry's hash.
    pub entry_hash: Vec<u8>,
    /// HMAC of the entry hash under the audit key.
    pub mac: Vec<u8>,
}

/// Filters for querying the audit log.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Exact actor.
    pub actor: Option<String>,
    /// Action prefix (`lease.` matches every lease action).
    pub action_prefix: Option<String>,
    /// Exact target.
    pub target: Option<String>,
    /// At or after.
    pub since: Option<Timestamp>,
    /// Before.
    pub until: Option<Timestamp>,
    /// Exact outcome (`ok`, `denied`, `failed`).
    pub outcome: Option<String>,
    /// Only entries with seq below this.
    pub before_seq: Option<i64>,
    /// Only entries with seq above this.
    pub after_seq: Option<i64>,
    /// Oldest first instead of newest first.
    pub ascending: bool,
    /// Continues a read page by page: by chain (see `crate::store::audit`),
    /// the entry of that chain after which (in the filter's order) to go on.
    /// Applied by `Vault::audit_query`; the store's query ignores it.
    pub resume: std::collections::BTreeMap<i64, i64>,
}

/// A pending OAuth authorization (state stored hashed, verifier sealed).
#[derive(Clone, PartialEq)]
pub struct AuthzStateRecord {
    /// HMAC of the state value.
    pub state_hash: Vec<u8>,
    /// Tenant it was begun for.
    pub tenant: TenantId,
    /// Account it was begun for.
    pub account: AccountId,
    /// Integration it was begun for.
    pub integration: Integration,
    /// Identity that began it.
    pub caller: String,
    /// KEK version of the wrapped DEK.
    pub kek_version: KekVersion,
    /// DEK sealing the verifier.
    pub wrapped_dek: Vec<u8>,
    /// The sealed PKCE verifier.
    pub sealed_verifier: Vec<u8>,
    /// When it was begun.
    pub created_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for AuthzStateRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzStateRecord")
            .field("tenant", &self.tenant)
            .field("account", &self.account)
            .field("integration", &self.integration)
            .field("caller", &self.caller)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The outcome of consuming an authorization state.
#[derive(Debug)]
pub enum AuthzConsume {
    /// First use: the state is deleted and returned (expired or not; the
    /// caller judges its expiry).
    Consumed(AuthzStateRecord),
    /// No such state: never issued, already used, evicted or purged. A used
    /// state is deleted, so a replay is indistinguishable from a state that
    /// was never issued.
    Unknown,
}

/// Tokens written by a refresh.
pub struct RefreshedTokens<'a> {
    /// New sealed access token.
    pub access_token: &'a [u8],
    /// Its expiry.
    pub access_expires_at: Timestamp,
    /// New sealed refresh token, when Google rotated it.
    pub refresh_token: Option<&'a [u8]>,
    /// When.
    pub at: Timestamp,
    /// When the sweeper should refresh the connection next.
    pub next_check_at: Timestamp,
}

/// A lease as a release reads it back: from its grant's compact row (which
/// is also the grant's audit entry, migration 0013), its release, and its
/// connection's revocation cut-off.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRecord {
    /// The lease id.
    pub lease_id: LeaseId,
    /// The leased connection.
    pub connection_id: ConnectionId,
    /// The identity holding it.
    pub caller: String,
    /// When it ends on its own.
    pub expires_at: Timestamp,
    /// When the vault or the holder ended it early.
    pub revoked_at: Option<Timestamp>,
    /// Why (`released`, or a deletion reason).
    pub revoke_reason: Option<String>,
}

/// The detail of a lease grant's audit entry, exactly as `lease_entries`
/// (migration 0013) rebuilds it from the lease's compact row.
pub fn lease_grant_detail(lease: &LeaseId, purpose: &str, scopes: &str, token: &str) -> String {
    format!("lease={lease} purpose={purpose} scopes={scopes} token={token}")
}

/// A lease to record with its grant's audit entry.
#[derive(Clone, Debug)]
pub struct LeaseGrant {
    /// The lease (its revocation fields unset).
    pub lease: LeaseRecord,
    /// The connection's `updated_at` as the lease path read it: the row is
    /// recorded only if the connection is still ACTIVE and unchanged since
    /// (every change to a connection moves its `updated_at`).
    pub connection_version: Timestamp,
    /// The purpose it was granted for, as the entry's detail names it.
    pub purpose: String,
    /// The scopes it grants, space-separated, as the entry's detail names them.
    pub scopes: String,
    /// The token's fingerprint (32 hex digits), as the entry's detail names it.
    pub token: String,
    /// The index of its grant entry among the entries appended with it (the
    /// audit writer sets it; 0 for a lease appended on its own).
    pub entry: usize,
}

/// An event to append to the log.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// When.
    pub occurred_at: Timestamp,
    /// The connection's tenant.
    pub tenant: Option<TenantId>,
    /// The connection's account.
    pub account: Option<AccountId>,
    /// The connection.
    pub connection_id: Option<ConnectionId>,
    /// Its integration.
    pub integration: Option<Integration>,
    /// The revoked lease.
    pub lease_id: Option<LeaseId>,
    /// The deletion receipt.
    pub receipt_id: Option<ReceiptId>,
    /// Why a connection was deleted.
    pub reason: Option<DeletionReason>,
    /// Free text, never secret.
    pub detail: String,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    /// Position in the log.
    pub cursor: i64,
    /// The event.
    pub event: NewEvent,
}

/// Where the event log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLogState {
    /// The newest cursor (0 when empty).
    pub head: i64,
    /// Events up to this cursor were pruned.
    pub pruned_through: i64,
}

/// A deleted connection's token, prepared for the revocation outbox: sealed
/// under a DEK of its own. The store keeps it only if the revocation is needed.
#[derive(Clone)]
pub struct OutboxToken {
    /// The connection.
    pub connection_id: ConnectionId,
    /// The outbox DEK's KEK version.
    pub kek_version: KekVersion,
    /// The outbox DEK, wrapped.
    pub wrapped_dek: Vec<u8>,
    /// The token, sealed.
    pub sealed_token: Vec<u8>,
}

impl std::fmt::Debug for OutboxToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxToken")
            .field("connection_id", &self.connection_id)
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

/// What a deletion covers.
#[derive(Clone, Debug, PartialEq)]
pub enum DeletionTarget {
    /// One connection.
    Connection(ConnectionId),
    /// Every live connection of an account.
    Account(TenantId, AccountId),
}

impl DeletionTarget {
    /// The key under which a repeated request finds the same receipt.
    pub fn subject_key(&self) -> String {
        match self {
            DeletionTarget::Connection(id) => format!("connection:{id}"),
            DeletionTarget::Account(t, a) => format!("account:{t}/{a}"),
        }
    }
}

/// A deletion to carry out in one transaction.
#[derive(Debug)]
pub struct DeletionRequest {
    /// The receipt id to use if this creates a receipt.
    pub receipt_id: ReceiptId,
    /// What to delete.
    pub target: DeletionTarget,
    /// Why.
    pub reason: DeletionReason,
    /// The caller's free-text reason.
    pub detail: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub at: Timestamp,
    /// Consumers whose ack a receipt needs, per integration.
    pub required_consumers: Vec<(Integration, String)>,
    /// Tokens prepared for the outbox, per connection expected to be deleted.
    pub outbox: Vec<OutboxToken>,
    /// Whether Google must be asked to revoke (false when the user already
    /// revoked there).
    pub revoke_upstream: bool,
    /// When the outbox first retries if the inline revocation fails.
    pub retry_at: Timestamp,
    /// When the outbox stops trying.
    pub give_up_at: Timestamp,
    /// The `deletion.done` audit entry, appended in the deletion's own
    /// transaction; the store fills in its detail (receipt, connections and
    /// what happens at Google for each).
    pub done: AuditDraft,
}

/// One connection a deletion removed.
#[derive(Clone, Debug, PartialEq)]
pub struct DeletedConnection {
    /// The connection.
    pub connection_id: ConnectionId,
    /// Its integration.
    pub integration: Integration,
    /// What happens at Google.
    pub upstream: UpstreamState,
}

/// What a deletion transaction did.
#[derive(Debug, PartialEq)]
pub enum DeletionOutcome {
    /// Deleted now, under a new receipt.
    Deleted {
        /// The receipt.
        receipt_id: ReceiptId,
        /// The connections removed.
        connections: Vec<DeletedConnection>,
    },
    /// Deleted before: the same receipt.
    Existing(ReceiptId),
    /// A connection to delete appeared after the outbox tokens were prepared:
    /// prepare again.
    Retry,
    /// Nothing by that id (connection deletions only).
    NotFound,
}

/// A deletion receipt with its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiptRecord {
    /// The receipt.
    pub receipt_id: ReceiptId,
    /// The tenant.
    pub tenant: TenantId,
    /// The account.
    pub account: AccountId,
    /// Why.
    pub reason: DeletionReason,
    /// The caller's reason.
    pub reason_detail: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Timestamp,
    /// When tokens and DEKs were destroyed.
    pub tokens_destroyed_at: Option<Timestamp>,
    /// When it became complete.
    pub completed_at: Option<Timestamp>,
    /// Per connection: its upstream revocation.
    pub connections: Vec<ReceiptConnection>,
    /// Required consumers and when each acknowledged.
    pub acks: Vec<(String, Option<Timestamp>)>,
}

/// A connection on a receipt and its revocation at Google.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceiptConnection {
    /// The connection.
    pub connection_id: ConnectionId,
    /// Its integration.
    pub integration: Integration,
    /// Revocation state.
    pub upstream: UpstreamState,
    /// Revoke requests sent.
    pub attempts: i64,
    /// When the last was sent.
    pub last_attempt_at: Option<Timestamp>,
    /// When the outbox tries next (pending only).
    pub next_attempt_at: Option<Timestamp>,
    /// When confirmed or failed.
    pub settled_at: Option<Timestamp>,
    /// Last error from Google (never a token).
    pub last_error: Option<String>,
}

/// A pending revocation the outbox worker may attempt.
#[derive(Clone)]
pub struct OutboxRow {
    /// The receipt.
    pub receipt_id: ReceiptId,
    /// The token, sealed as prepared.
    pub token: OutboxToken,
    /// When it was queued.
    pub created_at: Timestamp,
    /// When the worker gives up.
    pub give_up_at: Timestamp,
    /// Attempts so far.
    pub attempts: i64,
}

/// Filters for listing deletion receipts.
#[derive(Clone, Debug, Default)]
pub struct ReceiptFilter {
    /// Only receipts not yet complete.
    pub incomplete_only: bool,
    /// Only receipts requested before this (with `incomplete_only`: overdue).
    pub requested_before: Option<Timestamp>,
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only this account.
    pub account: Option<AccountId>,
}
