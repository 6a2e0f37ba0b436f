//! Conversions between domain records and protobuf messages, and parsing of
//! request fields into domain types (each error names its field).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;

use crate::domain::{
    ConnectionStatus, DeletionReason, EventKind, Integration, KeyState, Timestamp, UpstreamState,
    VaultError,
};
use crate::limits::{
    DEFAULT_PAGE_SIZE, MAX_LOGIN_HINT_BYTES, MAX_PAGE_SIZE, MAX_PAGE_TOKEN_BYTES, MAX_REASON_BYTES,
};
use crate::proto::v1 as pb;
use crate::store::{
    AuditRow, ConnectionRecord, EventRecord, PageRequest, ReceiptRecord, ReplicaRecord,
};
use crate::vault::{KeyStatus, RotationStatus, Vault, VersionStatus};

/// A protobuf timestamp.
pub fn ts(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

/// An optional protobuf timestamp.
pub fn opt_ts(t: Option<Timestamp>) -> Option<prost_types::Timestamp> {
    t.map(ts)
}

/// A protobuf timestamp as a domain timestamp.
pub fn from_ts(t: &prost_types::Timestamp) -> Timestamp {
    Timestamp::from_micros(
        t.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(t.nanos) / 1_000),
    )
}

/// Parses a required integration enum value.
pub fn integration(value: i32) -> Result<Integration, VaultError> {
    match pb::Integration::try_from(value) {
        Ok(pb::Integration::Calendar) => Ok(Integration::Calendar),
        Ok(pb::Integration::Email) => Ok(Integration::Email),
        _ => Err(VaultError::invalid(
            "integration",
            "must be INTEGRATION_CALENDAR or INTEGRATION_EMAIL",
        )),
    }
}

/// The protobuf value of an integration.
pub fn integration_pb(i: Integration) -> pb::Integration {
    match i {
        Integration::Calendar => pb::Integration::Calendar,
        Integration::Email => pb::Integration::Email,
    }
}

fn status_pb(s: ConnectionStatus) -> pb::ConnectionStatus {
    match s {
        ConnectionStatus::Active => pb::ConnectionStatus::Active,
        ConnectionStatus::InsufficientScope => pb::ConnectionStatus::InsufficientScope,
        ConnectionStatus::Suspended => pb::ConnectionStatus::Suspended,
        ConnectionStatus::RevokedUpstream => pb::ConnectionStatus::RevokedUpstream,
        ConnectionStatus::Deleted => pb::ConnectionStatus::Deleted,
        ConnectionStatus::ConsentRequired => pb::ConnectionStatus::ConsentRequired,
    }
}

/// Parses a connection status filter value.
pub fn connection_status(value: i32) -> Result<ConnectionStatus, VaultError> {
    match pb::ConnectionStatus::try_from(value) {
        Ok(pb::ConnectionStatus::Active) => Ok(ConnectionStatus::Active),
        Ok(pb::ConnectionStatus::InsufficientScope) => Ok(ConnectionStatus::InsufficientScope),
        Ok(pb::ConnectionStatus::Suspended) => Ok(ConnectionStatus::Suspended),
        Ok(pb::ConnectionStatus::RevokedUpstream) => Ok(ConnectionStatus::RevokedUpstream),
        Ok(pb::ConnectionStatus::Deleted) => Ok(ConnectionStatus::Deleted),
        Ok(pb::ConnectionStatus::ConsentRequired) => Ok(ConnectionStatus::ConsentRequired),
        _ => Err(VaultError::invalid(
            "status",
            "unknown or unspecified connection status",
        )),
    }
}

/// A connection as the API shows it (never a token).
pub fn connection(c: &ConnectionRecord, token_expires_at: Option<Timestamp>) -> pb::Connection {
    pb::Connection {
        connection_id: c.id.to_string(),
        tenant_id: c.tenant.to_string(),
        account_id: c.account.to_string(),
        integration: integration_pb(c.integration) as i32,
        google_subject: c.google_subject.clone().unwrap_or_default(),
        google_email: c.google_email.clone().unwrap_or_default(),
        granted_scopes: c.granted_scopes.to_strings(),
        missing_scopes: Vec::new(),
        status: status_pb(c.status) as i32,
        created_at: Some(ts(c.created_at)),
        updated_at: Some(ts(c.updated_at)),
        token_expires_at: opt_ts(token_expires_at),
        deleted_at: opt_ts(c.deleted_at),
        deletion_receipt_id: String::new(),
        status_reason: if c.status == ConnectionStatus::Active {
            String::new()
        } else {
            c.status_reason.clone().unwrap_or_default()
        },
        last_refresh_at: opt_ts(c.health.last_refresh_at),
        last_refresh_error: c.health.last_error.clone().unwrap_or_default(),
        last_refresh_error_at: opt_ts(c.health.last_error_at),
        next_check_at: if c.status == ConnectionStatus::Active {
            opt_ts(c.health.next_check_at)
        } else {
            None
        },
    }
}

/// A connection with its administrative detail, as read in one query.
pub fn connection_detail(d: &crate::store::ConnectionDetailRecord) -> pb::ConnectionDetail {
    pb::ConnectionDetail {
        connection: Some(connection_listed(d, d.access_expires_at)),
        kek_version: d.kek_version.map_or(0, |v| v.get()),
        has_refresh_token: d.has_refresh_token,
        open_leases: u32::try_from(d.open_leases).unwrap_or(u32::MAX),
    }
}

/// A listed connection, with the receipt of its deletion if it has one.
pub fn connection_listed(
    d: &crate::store::ConnectionDetailRecord,
    token_expires_at: Option<Timestamp>,
) -> pb::Connection {
    let mut shown = connection(&d.connection, token_expires_at);
    if let Some(receipt) = &d.receipt_id {
        shown.deletion_receipt_id = receipt.to_string();
    }
    shown
}

fn key_state_pb(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Primary => pb::KeyState::Primary,
        KeyState::Active => pb::KeyState::Active,
        KeyState::Retired => pb::KeyState::Retired,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

/// One key version.
pub fn key_version(v: &VersionStatus) -> pb::KeyVersionInfo {
    let r = &v.record;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    pb::KeyVersionInfo {
        version: r.version.get(),
        state: key_state_pb(r.state) as i32,
        created_at: Some(ts(r.created_at)),
        primary_since: opt_ts(r.primary_since),
        primary_until: opt_ts(r.primary_until),
        retired_at: opt_ts(r.retired_at),
        destroyed_at: opt_ts(r.destroyed_at),
        dek_count: count(v.dek_count),
        provider: r.provider.clone(),
        created_by: r.created_by.clone(),
        promoted_by: r.promoted_by.clone().unwrap_or_default(),
        retired_by: r.retired_by.clone().unwrap_or_default(),
        destroyed_by: r.destroyed_by.clone().unwrap_or_default(),
        connection_keys: count(v.by_kind[0]),
        oauth_state_keys: count(v.by_kind[1]),
        outbox_keys: count(v.by_kind[2]),
        held_by: v.holders.clone(),
    }
}

/// One replica.
pub fn replica(r: &ReplicaRecord, live: bool) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        replica_id: r.replica_id.clone(),
        host: r.host.clone(),
        pid: r.pid,
        provider: r.provider.clone(),
        versions: r.versions.iter().map(|v| v.get()).collect(),
        started_at: Some(ts(r.started_at)),
        last_seen_at: Some(ts(r.seen_at)),
        live,
    }
}

/// One rotation run with its progress.
pub fn rotation(status: &RotationStatus) -> pb::RotationProgress {
    let r = &status.run;
    let state = match r.state.as_str() {
        "running" => pb::RotationState::Running,
        "completed" => pb::RotationState::Completed,
        _ => pb::RotationState::Failed,
    };
    pb::RotationProgress {
        run_id: r.run_id.clone(),
        target_version: r.target_version.get(),
        state: state as i32,
        started_at: Some(ts(r.started_at)),
        finished_at: opt_ts(r.finished_at),
        rewrapped: u64::try_from(r.rewrapped).unwrap_or(0),
        total: u64::try_from(r.total).unwrap_or(0),
        started_by: r.actor.clone(),
        last_error: r.last_error.clone().unwrap_or_default(),
        done: u64::try_from(status.done).unwrap_or(0),
        owner: r.owner.clone(),
    }
}

/// The `KeyStatus` response.
pub fn key_status(s: &KeyStatus) -> pb::KeyStatusResponse {
    pb::KeyStatusResponse {
        provider: s.provider.to_owned(),
        primary_version: s.primary.get(),
        versions: s.versions.iter().map(key_version).collect(),
        rotation: s.rotation.as_ref().map(rotation),
        oldest_version_in_use: s.oldest_in_use.get(),
        oldest_in_use_age_seconds: i64::try_from(s.oldest_in_use_age.as_secs()).unwrap_or(i64::MAX),
        max_kek_age_days: s.max_kek_age_days,
        rotation_overdue: s.rotation_overdue,
        replica_id: s.replica_id.clone(),
        replicas: s
            .replicas
            .iter()
            .map(|(r, live)| replica(r, *live))
            .collect(),
    }
}

/// The `KeyReport` response.
pub fn key_report(s: &KeyStatus) -> pb::KeyReportResponse {
    let age_days = s.oldest_in_use_age.as_secs() / 86_400;
    let policy_detail = if s.rotation_overdue {
        format!(
            "not met: {} is still in use and is {age_days} days old (policy: at most {} days)",
            s.oldest_in_use, s.max_kek_age_days
        )
    } else {
        format!(
            "met: the oldest version in use, {}, is {age_days} days old (policy: at most {} days)",
            s.oldest_in_use, s.max_kek_age_days
        )
    };
    let mut rotations: Vec<_> = s.rotations.iter().map(rotation).collect();
    rotations.reverse();
    pb::KeyReportResponse {
        generated_at: Some(ts(Timestamp::now())),
        provider: s.provider.to_owned(),
        primary_version: s.primary.get(),
        versions: s.versions.iter().map(key_version).collect(),
        rotations,
        oldest_version_in_use: s.oldest_in_use.get(),
        oldest_in_use_age_seconds: i64::try_from(s.oldest_in_use_age.as_secs()).unwrap_or(i64::MAX),
        max_kek_age_days: s.max_kek_age_days,
        policy_met: !s.rotation_overdue,
        policy_detail,
        replicas: s
            .replicas
            .iter()
            .map(|(r, live)| replica(r, *live))
            .collect(),
    }
}

/// Audit outcome names ↔ protobuf.
pub fn outcome_pb(o: &str) -> pb::AuditOutcome {
    match o {
        "ok" => pb::AuditOutcome::Success,
        "denied" => pb::AuditOutcome::Denied,
        "failed" => pb::AuditOutcome::Failure,
        _ => pb::AuditOutcome::Unspecified,
    }
}

/// One audit entry.
pub fn audit_entry(r: &AuditRow) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: u64::try_from(r.seq).unwrap_or(0),
        at: Some(ts(r.draft.at)),
        actor: r.draft.actor.clone(),
        role: r.draft.role.clone(),
        action: r.draft.action.clone(),
        target: r.draft.target.clone(),
        outcome: outcome_pb(&r.draft.outcome) as i32,
        detail: r.draft.detail.clone(),
        prev_hash: r.prev_hash.clone(),
        entry_hash: r.entry_hash.clone(),
        mac: r.mac.clone(),
    }
}

/// Parses an optional `login_hint` (an email or Google subject).
pub fn login_hint(value: &str) -> Result<&str, VaultError> {
    if value.is_empty()
        || value.len() > MAX_LOGIN_HINT_BYTES
        || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(VaultError::invalid(
            "login_hint",
            format!("must be 1..={MAX_LOGIN_HINT_BYTES} printable ASCII characters"),
        ));
    }
    Ok(value)
}

/// The call's deadline: the client's `grpc-timeout`, capped at `max`.
pub fn deadline(
    metadata: &tonic::metadata::MetadataMap,
    max: std::time::Duration,
) -> std::time::Instant {
    let requested = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let budget = requested.map_or(max, |r| r.min(max));
    std::time::Instant::now() + budget
}

/// `grpc-timeout` is digits followed by a unit: H, M, S, m, u or n.
fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Opaque keyset page tokens bound to the filters they were issued for.
pub struct PageToken;

impl PageToken {
    /// Parses `page_size` and `page_token` into a page request. `filters`
    /// describes the request's filters; a token issued for others, or longer
    /// than [`MAX_PAGE_TOKEN_BYTES`], is refused.
    pub fn request(page_size: i32, token: &str, filters: &str) -> Result<PageRequest, VaultError> {
        let limit = match i64::from(page_size) {
            n if n < 0 => return Err(VaultError::invalid("page_size", "must not be negative")),
            0 => i64::from(DEFAULT_PAGE_SIZE),
            n => n.min(i64::from(MAX_PAGE_SIZE)),
        };
        if token.len() > MAX_PAGE_TOKEN_BYTES {
            return Err(VaultError::too_long(
                "page_token",
                format!("at most {MAX_PAGE_TOKEN_BYTES} bytes"),
            ));
        }
        let after = if token.is_empty() {
            None
        } else {
            let raw = URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| VaultError::invalid("page_token", "malformed"))?;
            let (fp, after) = raw
                .split_once('|')
                .ok_or_else(|| VaultError::invalid("page_token", "malformed"))?;
            if fp != Self::fingerprint(filters) {
                return Err(VaultError::invalid(
                    "page_token",
                    "was issued for different filters",
                ));
            }
            Some(after.to_owned())
        };
        Ok(PageRequest { after, limit })
    }

    /// The token for the page after `last`, or empty when the page was not full.
    pub fn next(page: &PageRequest, returned: usize, last: Option<&str>, filters: &str) -> String {
        match last {
            Some(last) if returned as i64 >= page.limit => {
                URL_SAFE_NO_PAD.encode(format!("{}|{last}", Self::fingerprint(filters)))
            }
            _ => String::new(),
        }
    }

    fn fingerprint(filters: &str) -> String {
        let d = digest::digest(&digest::SHA256, filters.as_bytes());
        hex::encode(&d.as_ref()[..8])
    }
}

/// A caller's free-text deletion reason: at most [`MAX_REASON_BYTES`], no
/// control characters.
pub fn reason_text(value: &str) -> Result<&str, VaultError> {
    if value.len() > MAX_REASON_BYTES {
        return Err(VaultError::too_long(
            "reason",
            format!("at most {MAX_REASON_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(VaultError::invalid(
            "reason",
            "must not contain control characters",
        ));
    }
    Ok(value)
}

/// Parses an event-kind filter value.
pub fn event_kind(value: i32) -> Result<EventKind, VaultError> {
    Ok(match pb::EventKind::try_from(value) {
        Ok(pb::EventKind::LeaseRevoked) => EventKind::LeaseRevoked,
        Ok(pb::EventKind::ConnectionDeleted) => EventKind::ConnectionDeleted,
        Ok(pb::EventKind::AccountDeleted) => EventKind::AccountDeleted,
        Ok(pb::EventKind::Suspended) => EventKind::Suspended,
        Ok(pb::EventKind::Resumed) => EventKind::Resumed,
        Ok(pb::EventKind::ConnectionUpdated) => EventKind::ConnectionUpdated,
        _ => {
            return Err(VaultError::invalid(
                "kinds",
                "unknown or UNSPECIFIED event kind",
            ));
        }
    })
}

fn event_kind_pb(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::LeaseRevoked => pb::EventKind::LeaseRevoked,
        EventKind::ConnectionDeleted => pb::EventKind::ConnectionDeleted,
        EventKind::AccountDeleted => pb::EventKind::AccountDeleted,
        EventKind::Suspended => pb::EventKind::Suspended,
        EventKind::Resumed => pb::EventKind::Resumed,
        EventKind::ConnectionUpdated => pb::EventKind::ConnectionUpdated,
    }
}

fn reason_pb(r: DeletionReason) -> pb::DeletionReason {
    match r {
        DeletionReason::UserDisconnected => pb::DeletionReason::UserDisconnected,
        DeletionReason::AccountDeleted => pb::DeletionReason::AccountDeleted,
        DeletionReason::AdminRevoked => pb::DeletionReason::AdminRevoked,
        DeletionReason::UserRevokedAtGoogle => pb::DeletionReason::UserRevokedAtGoogle,
    }
}

fn upstream_pb(u: UpstreamState) -> pb::UpstreamRevocationState {
    match u {
        UpstreamState::NotNeeded => pb::UpstreamRevocationState::NotNeeded,
        UpstreamState::Pending => pb::UpstreamRevocationState::Pending,
        UpstreamState::Confirmed => pb::UpstreamRevocationState::Confirmed,
        UpstreamState::Failed => pb::UpstreamRevocationState::Failed,
    }
}

/// An event as watchers receive it.
pub fn event(e: &EventRecord) -> pb::WatchResponse {
    let ev = &e.event;
    pb::WatchResponse {
        cursor: u64::try_from(e.cursor).unwrap_or(0),
        kind: event_kind_pb(ev.kind) as i32,
        occurred_at: Some(ts(ev.occurred_at)),
        tenant_id: ev
            .tenant
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        account_id: ev
            .account
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        connection_id: ev
            .connection_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        integration: ev.integration.map_or(0, |i| integration_pb(i) as i32),
        lease_id: ev
            .lease_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        receipt_id: ev
            .receipt_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        reason: ev.reason.map_or(0, |r| reason_pb(r) as i32),
        detail: ev.detail.clone(),
    }
}

/// A deletion receipt, marked overdue by the vault's SLA.
pub fn receipt(vault: &Vault, r: &ReceiptRecord) -> pb::DeletionReceipt {
    let overdue = vault.receipt_overdue(r);
    pb::DeletionReceipt {
        receipt_id: r.receipt_id.to_string(),
        tenant_id: r.tenant.to_string(),
        account_id: r.account.to_string(),
        connection_ids: r
            .connections
            .iter()
            .map(|c| c.connection_id.to_string())
            .collect(),
        reason: reason_pb(r.reason) as i32,
        reason_detail: r.reason_detail.clone(),
        requested_by: r.requested_by.clone(),
        requested_at: Some(ts(r.requested_at)),
        tokens_destroyed_at: opt_ts(r.tokens_destroyed_at),
        upstream_revocations: r
            .connections
            .iter()
            .map(|c| pb::UpstreamRevocation {
                connection_id: c.connection_id.to_string(),
                state: upstream_pb(c.upstream) as i32,
                attempts: u32::try_from(c.attempts).unwrap_or(u32::MAX),
                last_attempt_at: opt_ts(c.last_attempt_at),
                next_attempt_at: if c.upstream == UpstreamState::Pending {
                    opt_ts(c.next_attempt_at)
                } else {
                    None
                },
                confirmed_at: if c.upstream == UpstreamState::Confirmed {
                    opt_ts(c.settled_at)
                } else {
                    None
                },
                failed_at: if c.upstream == UpstreamState::Failed {
                    opt_ts(c.settled_at)
                } else {
                    None
                },
                last_error: c.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        required_consumers: r.acks.iter().map(|(c, _)| c.clone()).collect(),
        consumer_acks: r
            .acks
            .iter()
            .filter_map(|(c, at)| {
                at.map(|at| pb::ConsumerAck {
                    consumer: c.clone(),
                    acknowledged_at: Some(ts(at)),
                })
            })
            .collect(),
        status: if r.completed_at.is_some() {
            pb::ReceiptStatus::Complete
        } else {
            pb::ReceiptStatus::Pending
        } as i32,
        completed_at: opt_ts(r.completed_at),
        overdue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_bound_to_their_filters() {
        let page = PageToken::request(2, "", "tenant=a").unwrap();
        let next = PageToken::next(&page, 2, Some("conn_x"), "tenant=a");
        assert!(!next.is_empty());
        let again = PageToken::request(2, &next, "tenant=a").unwrap();
        assert_eq!(again.after.as_deref(), Some("conn_x"));
        assert!(PageToken::request(2, &next, "tenant=b").is_err());
        assert!(PageToken::request(2, "%%%", "tenant=a").is_err());
        let long = "A".repeat(MAX_PAGE_TOKEN_BYTES + 1);
        assert_eq!(
            PageToken::request(2, &long, "tenant=a")
                .unwrap_err()
                .to_string(),
            format!("invalid page_token: at most {MAX_PAGE_TOKEN_BYTES} bytes")
        );
        assert!(PageToken::request(-1, "", "").is_err());
        assert_eq!(
            PageToken::request(5000, "", "").unwrap().limit,
            i64::from(MAX_PAGE_SIZE)
        );
        assert_eq!(PageToken::next(&page, 1, Some("conn_x"), "tenant=a"), "");
    }

    #[test]
    fn grpc_timeouts_parse_with_their_units() {
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }

    #[test]
    fn timestamps_round_trip_through_protobuf() {
        let t = Timestamp::from_micros(1_700_000_000_123_456);
        assert_eq!(from_ts(&ts(t)), t);
    }
}
