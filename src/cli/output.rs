//! What `tokenvault admin`, `keys` and `dev` print: JSON documents built
//! from the `tokenvault.v1` messages, and aligned tables for people.
//!
//! JSON and tables use one vocabulary. JSON uses the proto field names
//! (snake_case); enums are the words the tables show (`active`, `calendar`,
//! `insufficient_scope`: the proto value name without its type prefix, in
//! lowercase; an unknown value stays a number). "None" has one spelling,
//! `null`: an unset timestamp, an empty string (a tombstone's
//! `google_email`, the `role` of an unauthenticated caller), a key version 0
//! (a connection that holds no key); where a table shows `-`, JSON has
//! `null`, never `""`. Lists are arrays (empty when empty), timestamps are
//! RFC 3339 strings in UTC with microseconds, bytes are lowercase hex, and
//! 64-bit integers are JSON numbers. Tables show times to the second.
//!
//! Every command's rendering lives here, not beside the command, so that
//! table and JSON conventions stay the same across `admin`, `keys` and `dev`.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::exit::CliError;
use crate::proto::v1 as pb;

/// A count and the noun that fits it: `1 attempt`, `0 attempts`, `2 attempts`.
pub fn plural<N>(n: N, one: &str, many: &str) -> String
where
    N: std::fmt::Display + PartialEq + From<u8>,
{
    let noun = if n == N::from(1) { one } else { many };
    format!("{n} {noun}")
}

/// The environment variable read for `--output` (`-o`) when the flag is not given.
pub const OUTPUT_ENV: &str = "TOKENVAULT_CLI_OUTPUT";

/// `--output`: how results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document per command on stdout.
    Json,
}

/// Prints one result on stdout: the JSON document `json` builds, or what
/// `text` writes for people; then flushes. A failed write is
/// [`CliError::output`] (a closed pipe ends the command quietly) instead of
/// the panic of `println!`.
pub fn print(
    format: OutputFormat,
    json: impl FnOnce() -> Value,
    text: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    match format {
        OutputFormat::Json => write_json(&mut out, &json()),
        OutputFormat::Table => text(&mut out),
    }
    .and_then(|()| out.flush())
    .map_err(CliError::output)
}

/// Seconds since the epoch from which humantime can no longer format a time
/// (the year 10000).
const YEAR_10000: i64 = 253_402_300_800;

/// A timestamp as a `SystemTime`, if it is one humantime can format
/// (1970 to 9999).
fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    if !(0..YEAR_10000).contains(&ts.seconds) {
        return None;
    }
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// An RFC 3339 timestamp with microseconds, or `null` when unset. A time
/// outside 1970..9999 prints as `@<seconds>`.
pub fn ts_json(ts: Option<&prost_types::Timestamp>) -> Value {
    match ts {
        None => Value::Null,
        Some(t) => match system_time(t) {
            Some(st) => Value::from(humantime::format_rfc3339_micros(st).to_string()),
            None => Value::from(format!("@{}", t.seconds)),
        },
    }
}

/// A timestamp to the second for tables; `-` when unset.
pub fn ts_text(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".to_owned(),
        Some(t) => match system_time(t) {
            Some(st) => humantime::format_rfc3339_seconds(st).to_string(),
            None => format!("@{}", t.seconds),
        },
    }
}

/// An enum value in JSON: the word the tables show (`calendar`,
/// `insufficient_scope`), or the number when this client does not know it.
macro_rules! enum_json {
    ($ty:ty, $prefix:literal, $value:expr) => {{
        let v: i32 = $value;
        match <$ty>::try_from(v) {
            Ok(e) => Value::from(short_name(e.as_str_name(), $prefix)),
            Err(_) => Value::from(v),
        }
    }};
}

/// The short lowercase name of an enum value for tables (`calendar`,
/// `insufficient_scope`): the proto name without its type prefix.
macro_rules! enum_text {
    ($ty:ty, $prefix:literal, $value:expr) => {{
        let v: i32 = $value;
        match <$ty>::try_from(v) {
            Ok(e) => short_name(e.as_str_name(), $prefix),
            Err(_) => v.to_string(),
        }
    }};
}

fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// `tokenvault.v1.Connection`.
pub fn connection_json(c: &pb::Connection) -> Value {
    json!({
        "connection_id": text_json(&c.connection_id),
        "tenant_id": text_json(&c.tenant_id),
        "account_id": text_json(&c.account_id),
        "integration": enum_json!(pb::Integration, "INTEGRATION_", c.integration),
        "google_subject": text_json(&c.google_subject),
        "google_email": text_json(&c.google_email),
        "granted_scopes": c.granted_scopes,
        "missing_scopes": c.missing_scopes,
        "status": enum_json!(pb::ConnectionStatus, "CONNECTION_STATUS_", c.status),
        "created_at": ts_json(c.created_at.as_ref()),
        "updated_at": ts_json(c.updated_at.as_ref()),
        "token_expires_at": ts_json(c.token_expires_at.as_ref()),
        "deleted_at": ts_json(c.deleted_at.as_ref()),
        "deletion_receipt_id": text_json(&c.deletion_receipt_id),
        "status_reason": text_json(&c.status_reason),
        "last_refresh_at": ts_json(c.last_refresh_at.as_ref()),
        "last_refresh_error": text_json(&c.last_refresh_error),
        "last_refresh_error_at": ts_json(c.last_refresh_error_at.as_ref()),
        "next_check_at": ts_json(c.next_check_at.as_ref()),
    })
}

/// `tokenvault.v1.ConnectionDetail`; `kek_version` is `null` when the
/// connection holds no key (a tombstone), as the table's `-`.
pub fn connection_detail_json(d: &pb::ConnectionDetail) -> Value {
    json!({
        "connection": d.connection.as_ref().map_or(Value::Null, connection_json),
        "kek_version": version_json(d.kek_version),
        "has_refresh_token": d.has_refresh_token,
        "open_leases": d.open_leases,
    })
}

/// `tokenvault.v1.UpstreamRevocation`.
fn upstream_json(u: &pb::UpstreamRevocation) -> Value {
    json!({
        "connection_id": text_json(&u.connection_id),
        "state": enum_json!(pb::UpstreamRevocationState, "UPSTREAM_REVOCATION_STATE_", u.state),
        "attempts": u.attempts,
        "last_attempt_at": ts_json(u.last_attempt_at.as_ref()),
        "next_attempt_at": ts_json(u.next_attempt_at.as_ref()),
        "confirmed_at": ts_json(u.confirmed_at.as_ref()),
        "failed_at": ts_json(u.failed_at.as_ref()),
        "last_error": text_json(&u.last_error),
    })
}

/// `tokenvault.v1.DeletionReceipt`.
pub fn receipt_json(r: &pb::DeletionReceipt) -> Value {
    json!({
        "receipt_id": text_json(&r.receipt_id),
        "tenant_id": text_json(&r.tenant_id),
        "account_id": text_json(&r.account_id),
        "connection_ids": r.connection_ids,
        "reason": enum_json!(pb::DeletionReason, "DELETION_REASON_", r.reason),
        "reason_detail": text_json(&r.reason_detail),
        "requested_by": text_json(&r.requested_by),
        "requested_at": ts_json(r.requested_at.as_ref()),
        "tokens_destroyed_at": ts_json(r.tokens_destroyed_at.as_ref()),
        "upstream_revocations": r.upstream_revocations.iter().map(upstream_json).collect::<Vec<_>>(),
        "required_consumers": r.required_consumers,
        "consumer_acks": r.consumer_acks.iter().map(|a| json!({
            "consumer": text_json(&a.consumer),
            "acknowledged_at": ts_json(a.acknowledged_at.as_ref()),
        })).collect::<Vec<_>>(),
        "status": enum_json!(pb::ReceiptStatus, "RECEIPT_STATUS_", r.status),
        "completed_at": ts_json(r.completed_at.as_ref()),
        "overdue": r.overdue,
    })
}

/// `tokenvault.v1.KeyVersionInfo`.
pub fn key_version_json(v: &pb::KeyVersionInfo) -> Value {
    json!({
        "version": v.version,
        "state": enum_json!(pb::KeyState, "KEY_STATE_", v.state),
        "created_at": ts_json(v.created_at.as_ref()),
        "primary_since": ts_json(v.primary_since.as_ref()),
        "primary_until": ts_json(v.primary_until.as_ref()),
        "retired_at": ts_json(v.retired_at.as_ref()),
        "destroyed_at": ts_json(v.destroyed_at.as_ref()),
        "dek_count": v.dek_count,
        "wrapped_keys": {
            "connection": v.connection_keys,
            "oauth_state": v.oauth_state_keys,
            "outbox": v.outbox_keys,
        },
        "provider": text_json(&v.provider),
        "created_by": text_json(&v.created_by),
        "promoted_by": text_json(&v.promoted_by),
        "retired_by": text_json(&v.retired_by),
        "destroyed_by": text_json(&v.destroyed_by),
        "held_by": v.held_by,
    })
}

/// A string in JSON, `null` when empty: "none" has one spelling.
pub fn text_json(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::from(s)
    }
}

/// A key version in JSON, `null` for 0 (no version), as the tables' `-`.
pub fn version_json(version: u32) -> Value {
    if version == 0 {
        Value::Null
    } else {
        Value::from(version)
    }
}

/// `tokenvault.v1.ReplicaInfo`.
pub fn replica_json(r: &pb::ReplicaInfo) -> Value {
    json!({
        "replica_id": text_json(&r.replica_id),
        "host": text_json(&r.host),
        "pid": r.pid,
        "provider": text_json(&r.provider),
        "versions": r.versions,
        "started_at": ts_json(r.started_at.as_ref()),
        "last_seen_at": ts_json(r.last_seen_at.as_ref()),
        "live": r.live,
    })
}

/// `tokenvault.v1.RotationProgress`.
pub fn rotation_json(r: &pb::RotationProgress) -> Value {
    json!({
        "run_id": text_json(&r.run_id),
        "target_version": r.target_version,
        "state": enum_json!(pb::RotationState, "ROTATION_STATE_", r.state),
        "started_at": ts_json(r.started_at.as_ref()),
        "finished_at": ts_json(r.finished_at.as_ref()),
        "rewrapped": r.rewrapped,
        "done": r.done,
        "total": r.total,
        "started_by": text_json(&r.started_by),
        "owner": text_json(&r.owner),
        "last_error": text_json(&r.last_error),
    })
}

/// `tokenvault.v1.KeyStatusResponse`.
pub fn key_status_json(s: &pb::KeyStatusResponse) -> Value {
    json!({
        "provider": text_json(&s.provider),
        "primary_version": version_json(s.primary_version),
        "versions": s.versions.iter().map(key_version_json).collect::<Vec<_>>(),
        "rotation": s.rotation.as_ref().map_or(Value::Null, rotation_json),
        "oldest_version_in_use": version_json(s.oldest_version_in_use),
        "oldest_in_use_age_seconds": s.oldest_in_use_age_seconds,
        "max_kek_age_days": s.max_kek_age_days,
        "rotation_overdue": s.rotation_overdue,
        "replica_id": text_json(&s.replica_id),
        "replicas": s.replicas.iter().map(replica_json).collect::<Vec<_>>(),
    })
}

/// `tokenvault.v1.KeyReportResponse`.
pub fn key_report_json(r: &pb::KeyReportResponse) -> Value {
    json!({
        "generated_at": ts_json(r.generated_at.as_ref()),
        "provider": text_json(&r.provider),
        "primary_version": version_json(r.primary_version),
        "versions": r.versions.iter().map(key_version_json).collect::<Vec<_>>(),
        "rotations": r.rotations.iter().map(rotation_json).collect::<Vec<_>>(),
        "oldest_version_in_use": version_json(r.oldest_version_in_use),
        "oldest_in_use_age_seconds": r.oldest_in_use_age_seconds,
        "max_kek_age_days": r.max_kek_age_days,
        "policy_met": r.policy_met,
        "policy_detail": text_json(&r.policy_detail),
        "replicas": r.replicas.iter().map(replica_json).collect::<Vec<_>>(),
    })
}

/// `tokenvault.v1.AuditEntry`; `role` is `null` for an unauthenticated
/// caller (the table's `-`).
pub fn audit_entry_json(e: &pb::AuditEntry) -> Value {
    json!({
        "seq": e.seq,
        "at": ts_json(e.at.as_ref()),
        "actor": text_json(&e.actor),
        "role": text_json(&e.role),
        "action": text_json(&e.action),
        "target": text_json(&e.target),
        "outcome": enum_json!(pb::AuditOutcome, "AUDIT_OUTCOME_", e.outcome),
        "detail": text_json(&e.detail),
        "prev_hash": text_json(&hex::encode(&e.prev_hash)),
        "entry_hash": text_json(&hex::encode(&e.entry_hash)),
        "mac": text_json(&hex::encode(&e.mac)),
    })
}

/// `tokenvault.v1.VerifyAuditResponse`.
pub fn verify_json(v: &pb::VerifyAuditResponse) -> Value {
    json!({
        "ok": v.ok,
        "entries_checked": v.entries_checked,
        "first_broken_seq": v.first_broken_seq,
        "detail": text_json(&v.detail),
        "from_seq": v.from_seq,
        "to_seq": v.to_seq,
        "checkpoints_verified": v.checkpoints_verified,
        "checkpoint_public_key": text_json(&v.checkpoint_public_key),
        "checkpoints_witnessed": v.checkpoints_witnessed,
        "witness_files": v.witness_files,
    })
}

/// `tokenvault.v1.LeaseTokenResponse` as `dev lease` shows it: everything
/// but the token, of which only the length is given.
pub fn lease_json(
    lease: &pb::LeaseTokenResponse,
    connection_id: &str,
    purpose: &str,
    token_chars: usize,
) -> Value {
    json!({
        "lease_id": text_json(&lease.lease_id),
        "connection_id": text_json(connection_id),
        "purpose": text_json(purpose),
        "granted_scopes": lease.granted_scopes,
        "token_expires_at": ts_json(lease.token_expires_at.as_ref()),
        "lease_expires_at": ts_json(lease.lease_expires_at.as_ref()),
        "access_token_chars": token_chars,
    })
}

/// `tokenvault.v1.WatchResponse`.
pub fn event_json(e: &pb::WatchResponse) -> Value {
    json!({
        "cursor": e.cursor,
        "kind": enum_json!(pb::EventKind, "EVENT_KIND_", e.kind),
        "occurred_at": ts_json(e.occurred_at.as_ref()),
        "tenant_id": text_json(&e.tenant_id),
        "account_id": text_json(&e.account_id),
        "connection_id": text_json(&e.connection_id),
        "integration": enum_json!(pb::Integration, "INTEGRATION_", e.integration),
        "lease_id": text_json(&e.lease_id),
        "receipt_id": text_json(&e.receipt_id),
        "reason": enum_json!(pb::DeletionReason, "DELETION_REASON_", e.reason),
        "detail": text_json(&e.detail),
    })
}

/// Writes one JSON document and a newline.
pub fn write_json(out: &mut dyn Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Writes one JSON document on one line (JSON Lines).
pub fn write_json_line(out: &mut dyn Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)
}

/// Rows of text under a header, printed with aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column; control characters are shown as `?`
    /// so that a hostile value cannot move the cursor).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| printable(&c)).collect());
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The width of each column: its widest cell or title.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        widths
    }

    /// Writes the header and the rows.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let widths = self.widths();
        write_row(out, &self.header, &widths)?;
        for row in &self.rows {
            write_row(out, row, &widths)?;
        }
        Ok(())
    }

    /// Writes only the rows, padded to at least `widths` (for rows that
    /// follow a table already printed).
    pub fn write_rows(&self, out: &mut dyn Write, widths: &[usize]) -> io::Result<()> {
        for row in &self.rows {
            write_row(out, row, widths)?;
        }
        Ok(())
    }
}

fn write_row(out: &mut dyn Write, cells: &[String], widths: &[usize]) -> io::Result<()> {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i + 1 == cells.len() {
            line.push_str(cell);
        } else {
            let width = widths.get(i).copied().unwrap_or(0);
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count()) + 2;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Control characters replaced by `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `name  value` lines for one object, names aligned.
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    /// No fields yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a field.
    pub fn add(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.push((name.to_owned(), printable(&value.into())));
        self
    }

    /// Writes the fields.
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let width = self.0.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, value) in &self.0 {
            writeln!(out, "{name:<width$}  {value}")?;
        }
        Ok(())
    }
}

/// A list of strings for a table cell: comma-separated, `-` when empty.
pub fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// The table row of a connection (see [`connection_table`]).
pub fn connection_row(d: &pb::ConnectionDetail) -> Vec<String> {
    let c = d.connection.clone().unwrap_or_default();
    vec![
        c.connection_id,
        c.tenant_id,
        c.account_id,
        enum_text!(pb::Integration, "INTEGRATION_", c.integration),
        enum_text!(pb::ConnectionStatus, "CONNECTION_STATUS_", c.status),
        if c.google_email.is_empty() {
            "-".to_owned()
        } else {
            c.google_email
        },
        if d.kek_version == 0 {
            "-".to_owned()
        } else {
            format!("v{}", d.kek_version)
        },
        d.open_leases.to_string(),
        ts_text(c.created_at.as_ref()),
    ]
}

/// The columns of [`connection_row`].
pub fn connection_table() -> Table {
    Table::new([
        "ID",
        "TENANT",
        "ACCOUNT",
        "INTEGRATION",
        "STATUS",
        "EMAIL",
        "KEK",
        "LEASES",
        "CREATED",
    ])
}

/// One connection, field by field.
pub fn connection_fields(d: &pb::ConnectionDetail) -> Fields {
    let c = d.connection.clone().unwrap_or_default();
    let mut f = Fields::new();
    f.add("connection_id", c.connection_id)
        .add("tenant", c.tenant_id)
        .add("account", c.account_id)
        .add(
            "integration",
            enum_text!(pb::Integration, "INTEGRATION_", c.integration),
        )
        .add(
            "status",
            enum_text!(pb::ConnectionStatus, "CONNECTION_STATUS_", c.status),
        )
        .add("status_reason", c.status_reason)
        .add("google_subject", c.google_subject)
        .add("google_email", c.google_email)
        .add("granted_scopes", list_text(&c.granted_scopes))
        .add("missing_scopes", list_text(&c.missing_scopes))
        .add("created_at", ts_text(c.created_at.as_ref()))
        .add("updated_at", ts_text(c.updated_at.as_ref()))
        .add("token_expires_at", ts_text(c.token_expires_at.as_ref()))
        .add("deleted_at", ts_text(c.deleted_at.as_ref()))
        .add("deletion_receipt_id", c.deletion_receipt_id)
        .add("last_refresh_at", ts_text(c.last_refresh_at.as_ref()))
        .add("last_refresh_error", c.last_refresh_error)
        .add(
            "last_refresh_error_at",
            ts_text(c.last_refresh_error_at.as_ref()),
        )
        .add("next_check_at", ts_text(c.next_check_at.as_ref()))
        .add(
            "kek_version",
            if d.kek_version == 0 {
                "-".to_owned()
            } else {
                format!("v{}", d.kek_version)
            },
        )
        .add("has_refresh_token", d.has_refresh_token.to_string())
        .add("open_leases", d.open_leases.to_string());
    f
}

/// One receipt, field by field, with a line per upstream revocation.
pub fn receipt_fields(r: &pb::DeletionReceipt) -> Fields {
    let mut f = Fields::new();
    f.add("receipt_id", r.receipt_id.clone())
        .add("tenant", r.tenant_id.clone())
        .add("account", r.account_id.clone())
        .add(
            "status",
            enum_text!(pb::ReceiptStatus, "RECEIPT_STATUS_", r.status),
        )
        .add("overdue", r.overdue.to_string())
        .add(
            "reason",
            enum_text!(pb::DeletionReason, "DELETION_REASON_", r.reason),
        )
        .add("reason_detail", r.reason_detail.clone())
        .add("requested_by", r.requested_by.clone())
        .add("requested_at", ts_text(r.requested_at.as_ref()))
        .add(
            "tokens_destroyed_at",
            ts_text(r.tokens_destroyed_at.as_ref()),
        )
        .add("completed_at", ts_text(r.completed_at.as_ref()))
        .add("connections", list_text(&r.connection_ids))
        .add("required_consumers", list_text(&r.required_consumers));
    for a in &r.consumer_acks {
        f.add(
            "consumer_ack",
            format!("{} at {}", a.consumer, ts_text(a.acknowledged_at.as_ref())),
        );
    }
    for u in &r.upstream_revocations {
        let mut text = format!(
            "{}: {} ({})",
            u.connection_id,
            enum_text!(
                pb::UpstreamRevocationState,
                "UPSTREAM_REVOCATION_STATE_",
                u.state
            ),
            plural(u.attempts, "attempt", "attempts")
        );
        if !u.last_error.is_empty() {
            text.push_str(&format!("; last error: {}", u.last_error));
        }
        f.add("upstream_revocation", text);
    }
    f
}

/// The columns of [`receipt_row`].
pub fn receipt_table() -> Table {
    Table::new([
        "RECEIPT",
        "TENANT",
        "ACCOUNT",
        "REASON",
        "STATUS",
        "OVERDUE",
        "CONNECTIONS",
        "REQUESTED",
    ])
}

/// The table row of a receipt.
pub fn receipt_row(r: &pb::DeletionReceipt) -> Vec<String> {
    vec![
        r.receipt_id.clone(),
        r.tenant_id.clone(),
        r.account_id.clone(),
        enum_text!(pb::DeletionReason, "DELETION_REASON_", r.reason),
        enum_text!(pb::ReceiptStatus, "RECEIPT_STATUS_", r.status),
        if r.overdue { "yes" } else { "no" }.to_owned(),
        r.connection_ids.len().to_string(),
        ts_text(r.requested_at.as_ref()),
    ]
}

/// Key versions as a table.
pub fn key_versions_table(versions: &[pb::KeyVersionInfo]) -> Table {
    let mut t = Table::new([
        "VERSION",
        "STATE",
        "PROVIDER",
        "KEYS",
        "CONNECTION/OAUTH_STATE/OUTBOX",
        "CREATED",
        "PRIMARY",
        "RETIRED",
        "DESTROYED",
        "HELD_BY",
    ]);
    for v in versions {
        let primary = match (&v.primary_since, &v.primary_until) {
            (None, _) => "-".to_owned(),
            (Some(s), None) => format!("since {}", ts_text(Some(s))),
            (Some(s), Some(u)) => format!("{} to {}", ts_text(Some(s)), ts_text(Some(u))),
        };
        t.row(vec![
            format!("v{}", v.version),
            enum_text!(pb::KeyState, "KEY_STATE_", v.state),
            dash_if_empty(&v.provider),
            v.dek_count.to_string(),
            format!(
                "{}/{}/{}",
                v.connection_keys, v.oauth_state_keys, v.outbox_keys
            ),
            ts_text(v.created_at.as_ref()),
            primary,
            ts_text(v.retired_at.as_ref()),
            ts_text(v.destroyed_at.as_ref()),
            if v.held_by.is_empty() {
                "-".to_owned()
            } else {
                v.held_by.join(",")
            },
        ]);
    }
    t
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// Each version's lifecycle with who did each step, one line per step.
pub fn key_lifecycle_lines(v: &pb::KeyVersionInfo) -> Vec<String> {
    let mut lines = vec![format!(
        "v{} created {} by {} ({})",
        v.version,
        ts_text(v.created_at.as_ref()),
        dash_if_empty(&v.created_by),
        dash_if_empty(&v.provider)
    )];
    if v.primary_since.is_some() {
        lines.push(format!(
            "v{} primary from {} by {}{}",
            v.version,
            ts_text(v.primary_since.as_ref()),
            dash_if_empty(&v.promoted_by),
            v.primary_until
                .as_ref()
                .map(|u| format!(" until {}", ts_text(Some(u))))
                .unwrap_or_default()
        ));
    }
    if v.retired_at.is_some() {
        lines.push(format!(
            "v{} retired {} by {}",
            v.version,
            ts_text(v.retired_at.as_ref()),
            dash_if_empty(&v.retired_by)
        ));
    }
    if v.destroyed_at.is_some() {
        lines.push(format!(
            "v{} destroyed {} by {}",
            v.version,
            ts_text(v.destroyed_at.as_ref()),
            dash_if_empty(&v.destroyed_by)
        ));
    }
    lines
}

/// The replicas sharing the database.
pub fn replicas_table(replicas: &[pb::ReplicaInfo]) -> Table {
    let mut t = Table::new([
        "REPLICA",
        "HOST",
        "PID",
        "PROVIDER",
        "VERSIONS",
        "LAST_SEEN",
        "LIVE",
    ]);
    for r in replicas {
        t.row(vec![
            r.replica_id.clone(),
            r.host.clone(),
            r.pid.to_string(),
            r.provider.clone(),
            if r.versions.is_empty() {
                "-".to_owned()
            } else {
                r.versions
                    .iter()
                    .map(|v| format!("v{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            },
            ts_text(r.last_seen_at.as_ref()),
            if r.live { "yes" } else { "no" }.to_owned(),
        ]);
    }
    t
}

/// One key version on one line.
pub fn key_version_text(v: &pb::KeyVersionInfo) -> String {
    format!(
        "v{}: {} ({})",
        v.version,
        enum_text!(pb::KeyState, "KEY_STATE_", v.state),
        plural(v.dek_count, "wrapped key", "wrapped keys")
    )
}

/// A rotation state as the tables show it (`running`, `completed`, `failed`).
pub fn rotation_state_text(state: i32) -> String {
    enum_text!(pb::RotationState, "ROTATION_STATE_", state)
}

/// A rotation run on one line.
pub fn rotation_text(r: &pb::RotationProgress) -> String {
    let mut text = format!(
        "{} to v{}: {}, {}/{} wrapped keys on v{} ({} rewrapped), started {} by {}",
        r.run_id,
        r.target_version,
        enum_text!(pb::RotationState, "ROTATION_STATE_", r.state),
        r.done,
        r.total,
        r.target_version,
        r.rewrapped,
        ts_text(r.started_at.as_ref()),
        r.started_by,
    );
    if r.finished_at.is_some() {
        text.push_str(&format!(", finished {}", ts_text(r.finished_at.as_ref())));
    }
    if !r.last_error.is_empty() {
        text.push_str(&format!("; error: {}", r.last_error));
    }
    text
}

/// The columns of [`audit_row`].
pub fn audit_table() -> Table {
    Table::new([
        "SEQ", "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "OUTCOME", "DETAIL",
    ])
}

/// The table row of an audit entry.
pub fn audit_row(e: &pb::AuditEntry) -> Vec<String> {
    vec![
        e.seq.to_string(),
        ts_text(e.at.as_ref()),
        e.actor.clone(),
        if e.role.is_empty() {
            "-".to_owned()
        } else {
            e.role.clone()
        },
        e.action.clone(),
        e.target.clone(),
        enum_text!(pb::AuditOutcome, "AUDIT_OUTCOME_", e.outcome),
        e.detail.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_one_take_the_singular() {
        assert_eq!(plural(0u32, "attempt", "attempts"), "0 attempts");
        assert_eq!(plural(1u32, "attempt", "attempts"), "1 attempt");
        assert_eq!(plural(2u64, "entry", "entries"), "2 entries");
        assert_eq!(
            plural(1usize, "key version", "key versions"),
            "1 key version"
        );
        let v = pb::KeyVersionInfo {
            version: 2,
            dek_count: 1,
            ..Default::default()
        };
        assert!(
            key_version_text(&v).ends_with("(1 wrapped key)"),
            "{}",
            key_version_text(&v)
        );
    }

    #[test]
    fn timestamps_are_rfc3339_and_never_panic() {
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000,
        };
        assert_eq!(ts_json(Some(&t)), json!("2023-11-14T22:13:20.000005Z"));
        assert_eq!(ts_text(Some(&t)), "2023-11-14T22:13:20Z");
        assert_eq!(ts_json(None), Value::Null);
        for seconds in [-1, YEAR_10000, i64::MAX] {
            let t = prost_types::Timestamp { seconds, nanos: 0 };
            assert_eq!(ts_text(Some(&t)), format!("@{seconds}"));
        }
    }

    #[test]
    fn enums_print_by_name_and_unknown_values_by_number() {
        let c = pb::Connection {
            integration: pb::Integration::Email as i32,
            status: 99,
            ..Default::default()
        };
        let v = connection_json(&c);
        assert_eq!(v["integration"], "email");
        assert_eq!(v["status"], 99);
        let row = connection_row(&pb::ConnectionDetail {
            connection: Some(pb::Connection {
                status: pb::ConnectionStatus::InsufficientScope as i32,
                ..c
            }),
            ..Default::default()
        });
        assert_eq!(row[3], "email");
        assert_eq!(row[4], "insufficient_scope");
    }

    /// Every JSON rendering: the tables' words for enums, and `null`, never
    /// `""`, for what is not there.
    #[test]
    fn json_uses_the_table_words_and_null_for_none() {
        let detail = pb::ConnectionDetail {
            connection: Some(pb::Connection {
                connection_id: "conn_1".into(),
                integration: pb::Integration::Calendar as i32,
                status: pb::ConnectionStatus::InsufficientScope as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let row = connection_row(&detail);
        let v = connection_detail_json(&detail);
        assert_eq!(v["connection"]["integration"], row[3].as_str());
        assert_eq!(v["connection"]["status"], row[4].as_str());
        assert_eq!(v["connection"]["status"], "insufficient_scope");
        assert_eq!(v["connection"]["google_email"], Value::Null);
        assert_eq!(v["connection"]["deletion_receipt_id"], Value::Null);
        assert_eq!(v["kek_version"], Value::Null);

        let entry = pb::AuditEntry {
            seq: 1,
            outcome: pb::AuditOutcome::Denied as i32,
            ..Default::default()
        };
        let v = audit_entry_json(&entry);
        assert_eq!(v["outcome"], audit_row(&entry)[6].as_str());
        assert_eq!(v["outcome"], "denied");
        assert_eq!(v["role"], Value::Null);

        let receipt = pb::DeletionReceipt {
            reason: pb::DeletionReason::AdminRevoked as i32,
            status: pb::ReceiptStatus::Pending as i32,
            upstream_revocations: vec![pb::UpstreamRevocation::default()],
            ..Default::default()
        };
        let run = pb::RotationProgress {
            state: pb::RotationState::Completed as i32,
            ..Default::default()
        };
        let version = pb::KeyVersionInfo {
            state: pb::KeyState::Primary as i32,
            ..Default::default()
        };
        assert_eq!(receipt_json(&receipt)["reason"], "admin_revoked");
        assert_eq!(rotation_json(&run)["state"], "completed");
        assert_eq!(key_version_json(&version)["state"], "primary");
        let documents = [
            connection_detail_json(&detail),
            audit_entry_json(&entry),
            receipt_json(&receipt),
            rotation_json(&run),
            key_version_json(&version),
            key_status_json(&pb::KeyStatusResponse::default()),
            key_report_json(&pb::KeyReportResponse::default()),
            verify_json(&pb::VerifyAuditResponse::default()),
            event_json(&pb::WatchResponse::default()),
        ];
        for doc in documents {
            let text = doc.to_string();
            assert!(!text.contains("\"\""), "an empty string in {text}");
            assert!(
                !text.contains("_UNSPECIFIED"),
                "a proto enum name in {text}"
            );
        }
    }

    #[test]
    fn audit_bytes_are_hex() {
        let v = audit_entry_json(&pb::AuditEntry {
            seq: 7,
            prev_hash: vec![0xab, 0x01],
            ..Default::default()
        });
        assert_eq!(v["prev_hash"], "ab01");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["at"], Value::Null);
    }

    #[test]
    fn tables_align_columns_and_neutralise_control_characters() {
        let mut t = Table::new(["A", "LONGER", "C"]);
        t.row(vec!["wide cell".into(), "x".into(), "last\x1b[2J".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text, "A          LONGER  C\nwide cell  x       last?[2J\n",
            "{text}"
        );
    }
}
