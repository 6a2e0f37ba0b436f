//! `tokenvault admin …`: a gRPC client of `AdminService` for operators
//! (role `admin`) and security reviewers (role `auditor`): connections,
//! account deletion, deletion receipts, key-encryption keys and the audit log.
//!
//! Results go to stdout (a table, or with `--output json` one JSON document;
//! see [`super::output`]); progress goes to stderr, and only when stderr is a
//! terminal. Destructive commands (`accounts delete`, `keys destroy`) ask for
//! the account id or the key version to be typed on a terminal, and refuse to
//! run without one unless `--yes` is given.

use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::client::{AdminClient, ClientSettings, ConnectionFlags};
use super::exit::CliError;
use super::output::{self, Fields, OutputFormat};
use crate::proto::v1 as pb;

/// The largest page the vault serves.
const MAX_PAGE: usize = 1000;

/// `rotating to v2: 120/450 wrapped keys (26%)`, for a terminal.
fn rotation_progress_line(run: &pb::RotationProgress) -> String {
    let percent = run
        .done
        .saturating_mul(100)
        .checked_div(run.total)
        .unwrap_or(100);
    format!(
        "rotating to v{}: {}/{} wrapped keys ({percent}%)",
        run.target_version, run.done, run.total
    )
}

/// How often `keys rotate --wait` asks for progress.
const ROTATION_POLL: Duration = Duration::from_millis(500);

/// How often `audit tail --follow` asks for new entries.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// `tokenvault admin`: the connection flags, the output format and the command.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// How to reach the vault.
    #[command(flatten)]
    pub connection: ConnectionFlags,
    /// How to print results.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        help_heading = "Output"
    )]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The resources `tokenvault admin` manages.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Connections of every tenant.
    Connections {
        /// The connections command.
        #[command(subcommand)]
        command: ConnectionsCommand,
    },
    /// Accounts: delete one with the full deletion cascade.
    Accounts {
        /// The accounts command.
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Deletion receipts: proof that a deletion happened everywhere.
    Receipts {
        /// The receipts command.
        #[command(subcommand)]
        command: ReceiptsCommand,
    },
    /// Key-encryption keys: status, rotation, retirement, destruction, report.
    Keys {
        /// The keys command.
        #[command(subcommand)]
        command: AdminKeysCommand,
    },
    /// The tamper-evident audit log: read, follow, verify, export.
    Audit {
        /// The audit command.
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// `tokenvault admin connections …`
#[derive(Debug, Subcommand)]
pub enum ConnectionsCommand {
    /// List connections, oldest first (every filter given must match).
    List(ConnectionsList),
    /// Show one connection with its key and lease details.
    Show {
        /// The connection id.
        id: String,
    },
    /// Revoke a connection: the full deletion cascade, reason ADMIN_REVOKED.
    Revoke {
        /// The connection id.
        id: String,
        /// Why (recorded on the receipt and in the audit log; at most 1024 bytes).
        #[arg(long)]
        reason: String,
    },
}

/// Filters of `connections list`.
#[derive(Debug, Args)]
pub struct ConnectionsList {
    /// Only this tenant's connections.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this account's connections.
    #[arg(long)]
    pub account: Option<String>,
    /// Only this integration.
    #[arg(long, value_enum)]
    pub integration: Option<IntegrationArg>,
    /// Only connections in this status (deleted and revoked-upstream include tombstones).
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only connections linked to this Google account (its `sub`).
    #[arg(long, value_name = "SUBJECT")]
    pub google_subject: Option<String>,
    /// Include tombstones of deleted connections.
    #[arg(long)]
    pub include_deleted: bool,
    /// At most this many connections (0 = all).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// `--integration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IntegrationArg {
    /// Google Calendar sync.
    Calendar,
    /// Gmail sync.
    Email,
}

impl IntegrationArg {
    fn proto(self) -> pb::Integration {
        match self {
            IntegrationArg::Calendar => pb::Integration::Calendar,
            IntegrationArg::Email => pb::Integration::Email,
        }
    }
}

/// `--status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Tokens held, leases granted.
    Active,
    /// Google granted only part of the required scopes.
    InsufficientScope,
    /// Suspended after a RISC account-disabled event.
    Suspended,
    /// Revoked at Google; a tombstone.
    RevokedUpstream,
    /// Deleted; a tombstone.
    Deleted,
    /// Google returned no refresh token; the user must connect again.
    ConsentRequired,
}

impl StatusArg {
    fn proto(self) -> pb::ConnectionStatus {
        match self {
            StatusArg::Active => pb::ConnectionStatus::Active,
            StatusArg::InsufficientScope => pb::ConnectionStatus::InsufficientScope,
            StatusArg::Suspended => pb::ConnectionStatus::Suspended,
            StatusArg::RevokedUpstream => pb::ConnectionStatus::RevokedUpstream,
            StatusArg::Deleted => pb::ConnectionStatus::Deleted,
            StatusArg::ConsentRequired => pb::ConnectionStatus::ConsentRequired,
        }
    }
}

/// `tokenvault admin accounts …`
#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Delete every connection of an account (reason ACCOUNT_DELETED). On a
    /// terminal, asks for the account id to be typed to confirm; without a
    /// terminal, refuses (exit 2) unless --yes is given.
    Delete {
        /// The tenant id.
        tenant: String,
        /// The account id.
        account: String,
        /// Why (recorded on the receipt and in the audit log; at most 1024 bytes).
        #[arg(long)]
        reason: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `tokenvault admin receipts …`
#[derive(Debug, Subcommand)]
pub enum ReceiptsCommand {
    /// Show one deletion receipt.
    Show {
        /// The receipt id.
        id: String,
    },
    /// List deletion receipts, oldest request first.
    List {
        /// Only receipts still pending.
        #[arg(long)]
        incomplete: bool,
        /// Only receipts still pending after the deletion SLA.
        #[arg(long)]
        overdue: bool,
        /// Only this tenant's receipts.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this account's receipts.
        #[arg(long)]
        account: Option<String>,
        /// At most this many receipts (0 = all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `tokenvault admin keys …`
#[derive(Debug, Subcommand)]
pub enum AdminKeysCommand {
    /// Key versions, DEK counts, the latest rotation and the rotation policy.
    Status,
    /// Create a new key version, make it primary and rewrap every DEK to it.
    Rotate {
        /// Wait until the rotation has completed or failed.
        #[arg(long)]
        wait: bool,
    },
    /// Mark a non-primary version no DEK uses any more as retired.
    Retire {
        /// The version, `3` or `v3`.
        #[arg(value_parser = parse_version)]
        version: u32,
    },
    /// Destroy a retired version's key material for good. On a terminal, asks
    /// for the version to be typed to confirm; without a terminal, refuses
    /// (exit 2) unless --yes is given.
    Destroy {
        /// The version, `3` or `v3`.
        #[arg(value_parser = parse_version)]
        version: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The key report for reviewers: every version, every rotation, the policy.
    Report,
}

/// `tokenvault admin audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest entries, oldest printed first. With --output json and
    /// --follow, one JSON line per entry.
    Tail {
        /// How many entries.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        lines: usize,
        /// Keep printing new entries (polls every second) until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Entries matching every filter given, oldest first.
    Query(AuditQuery),
    /// Recompute the hash chain and MACs; exit 1 naming the first broken entry.
    Verify {
        /// First entry to verify (default 1).
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// Last entry to verify (default the newest).
        #[arg(long, value_name = "SEQ")]
        to: Option<u64>,
    },
    /// Every entry up to the newest when the export starts, as JSON Lines.
    Export {
        /// Write to this file instead of stdout (a summary is printed).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Filters of `audit query`.
#[derive(Debug, Args)]
pub struct AuditQuery {
    /// Only this caller identity.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only actions starting with this (e.g. `lease.` or `connection.disconnect`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only this target (a connection id, `tenant/account`, `kek:3`…).
    #[arg(long)]
    pub target: Option<String>,
    /// Only this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// Entries at or after this time (RFC 3339; UTC unless it has an offset).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Entries before this time (RFC 3339; UTC unless it has an offset).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<prost_types::Timestamp>,
    /// Newest first.
    #[arg(long)]
    pub newest_first: bool,
    /// At most this many entries (0 = all).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// `--outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutcomeArg {
    /// Allowed and carried out.
    Ok,
    /// Refused by authentication or policy.
    Denied,
    /// Allowed but failed.
    Failed,
}

impl OutcomeArg {
    fn proto(self) -> pb::AuditOutcome {
        match self {
            OutcomeArg::Ok => pb::AuditOutcome::Success,
            OutcomeArg::Denied => pb::AuditOutcome::Denied,
            OutcomeArg::Failed => pb::AuditOutcome::Failure,
        }
    }
}

/// A key version: `3` or `v3`.
fn parse_version(text: &str) -> Result<u32, String> {
    let digits = text
        .strip_prefix('v')
        .or_else(|| text.strip_prefix('V'))
        .unwrap_or(text);
    digits
        .parse()
        .map_err(|_| format!("{text:?} is not a key version (e.g. 3 or v3)"))
}

/// An RFC 3339 time (`2026-11-02T10:00:00Z`, `2026-11-02T12:00:00+02:00`,
/// fractional seconds allowed; without `Z` or an offset, UTC).
fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let text = text.trim();
    let bad = |e: &dyn std::fmt::Display| format!("{text:?} is not an RFC 3339 time: {e}");
    // A numeric offset is the last six characters, `+HH:MM` or `-HH:MM`, after
    // the time of day (which starts at byte 11).
    let (local, offset) = match text.len().checked_sub(6).map(|i| text.split_at(i)) {
        Some((head, tail))
            if head.len() >= 19 && (tail.starts_with('+') || tail.starts_with('-')) =>
        {
            let b = tail.as_bytes();
            let digit = |i: usize| {
                b.get(i)
                    .filter(|c| c.is_ascii_digit())
                    .map(|c| i64::from(c - b'0'))
            };
            let (Some(h1), Some(h2), Some(b':'), Some(m1), Some(m2)) =
                (digit(1), digit(2), b.get(3).copied(), digit(4), digit(5))
            else {
                return Err(bad(&"malformed offset"));
            };
            let seconds = (h1 * 10 + h2) * 3600 + (m1 * 10 + m2) * 60;
            (head, if b[0] == b'-' { -seconds } else { seconds })
        }
        _ => (text, 0),
    };
    let local = humantime::parse_rfc3339_weak(local).map_err(|e| bad(&e))?;
    let shift = Duration::from_secs(offset.unsigned_abs());
    let utc = if offset >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    };
    let since_epoch = utc
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .ok_or_else(|| bad(&"before 1970"))?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).map_err(|_| bad(&"out of range"))?,
        // Below one billion, so it fits.
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    })
}

/// Runs an admin command to completion.
pub async fn run(args: AdminArgs) -> Result<(), CliError> {
    // Confirmation comes first: nothing is sent before the operator agreed.
    match &args.command {
        AdminCommand::Accounts {
            command:
                AccountsCommand::Delete {
                    tenant,
                    account,
                    yes,
                    ..
                },
        } => confirm(
            *yes,
            &format!("delete every connection of account {account:?} of tenant {tenant:?}"),
            &format!("Type the account id ({account}) to confirm: "),
            |answer| answer == account,
        )?,
        AdminCommand::Keys {
            command: AdminKeysCommand::Destroy { version, yes },
        } => confirm(
            *yes,
            &format!("destroy key version v{version}"),
            &format!("Type the version (v{version}) to confirm: "),
            |answer| parse_version(answer) == Ok(*version),
        )?,
        _ => {}
    }
    let settings = ClientSettings::resolve(&args.connection)?;
    let client = settings.connect().await?;
    let mut admin = Admin {
        client,
        output: args.output,
    };
    match args.command {
        AdminCommand::Connections { command } => admin.connections(command).await,
        AdminCommand::Accounts { command } => admin.accounts(command).await,
        AdminCommand::Receipts { command } => admin.receipts(command).await,
        AdminCommand::Keys { command } => admin.keys(command).await,
        AdminCommand::Audit { command } => admin.audit(command).await,
    }
}

/// Asks the operator to confirm `what` on the terminal. Without `--yes` and
/// without a terminal on stdin, refuses with a usage error.
fn confirm(
    yes: bool,
    what: &str,
    prompt: &str,
    accept: impl FnOnce(&str) -> bool,
) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    if !io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "refusing to {what} without confirmation: stdin is not a terminal; \
             pass --yes to confirm non-interactively"
        )));
    }
    let mut stderr = io::stderr();
    // If the prompt cannot be written the operator sees none; the answer is
    // still required and checked below.
    let _ = write!(stderr, "About to {what}. {prompt}");
    let _ = stderr.flush();
    let mut answer = String::new();
    io::stdin()
        .read_line(&mut answer)
        .map_err(|e| CliError::failed(format!("cannot read the confirmation: {e}")))?;
    if accept(answer.trim()) {
        Ok(())
    } else {
        Err(CliError::failed("not confirmed; nothing was changed"))
    }
}

/// The connected client and how to print.
struct Admin {
    client: AdminClient,
    output: OutputFormat,
}

/// The answer of `rpc`, or its status as a [`CliError`].
fn answer<T>(rpc: &str, result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, CliError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| CliError::status(rpc, &status))
}

fn write_failed(e: io::Error) -> CliError {
    CliError::failed(format!("cannot write the output: {e}"))
}

/// The page size to ask for when `have` of `limit` (0 = no limit) are there.
fn page_size(limit: usize, have: usize) -> i32 {
    let want = if limit == 0 {
        MAX_PAGE
    } else {
        limit.saturating_sub(have).clamp(1, MAX_PAGE)
    };
    // At most MAX_PAGE, so it fits.
    i32::try_from(want).unwrap_or(1)
}

/// Follows page tokens until `limit` items (0 = all) or the last page; also
/// says whether results were left off.
async fn collect<T, F, Fut>(limit: usize, mut fetch: F) -> Result<(Vec<T>, bool), CliError>
where
    F: FnMut(i32, String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), CliError>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(page_size(limit, items.len()), token).await?;
        items.extend(page);
        if limit != 0 && items.len() >= limit {
            let more = items.len() > limit || !next.is_empty();
            items.truncate(limit);
            return Ok((items, more));
        }
        if next.is_empty() {
            return Ok((items, false));
        }
        token = next;
    }
}

/// Whether progress may be drawn on stderr.
fn show_progress() -> bool {
    io::stderr().is_terminal()
}

impl Admin {
    /// Prints `json` or, for tables, what `table` writes.
    fn print(
        &self,
        json: impl FnOnce() -> Value,
        table: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), CliError> {
        let mut out = io::stdout().lock();
        match self.output {
            OutputFormat::Json => output::write_json(&mut out, &json()),
            OutputFormat::Table => table(&mut out),
        }
        .and_then(|()| out.flush())
        .map_err(write_failed)
    }

    fn print_receipt(&self, r: &pb::DeletionReceipt) -> Result<(), CliError> {
        self.print(
            || output::receipt_json(r),
            |out| output::receipt_fields(r).write(out),
        )
    }

    fn print_key_version(&self, v: &pb::KeyVersionInfo) -> Result<(), CliError> {
        self.print(
            || output::key_version_json(v),
            |out| writeln!(out, "{}", output::key_version_text(v)),
        )
    }

    async fn connections(&mut self, command: ConnectionsCommand) -> Result<(), CliError> {
        match command {
            ConnectionsCommand::List(args) => {
                let client = self.client.clone();
                let (found, more) = collect(args.limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::AdminListConnectionsRequest {
                        tenant_id: args.tenant.clone(),
                        account_id: args.account.clone(),
                        integration: args.integration.map(|i| i.proto() as i32),
                        status: args.status.map(|s| s.proto() as i32),
                        google_subject: args.google_subject.clone(),
                        include_deleted: args.include_deleted,
                        page_size,
                        page_token,
                    };
                    async move {
                        let r = answer("ListConnections", client.list_connections(request).await)?;
                        Ok((r.connections, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "connections": found.iter().map(output::connection_detail_json).collect::<Vec<_>>(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::connection_table();
                        for d in &found {
                            t.row(output::connection_row(d));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
            ConnectionsCommand::Show { id } => {
                let d = answer(
                    "GetConnection",
                    self.client
                        .get_connection(pb::GetConnectionRequest { connection_id: id })
                        .await,
                )?;
                self.print(
                    || output::connection_detail_json(&d),
                    |out| output::connection_fields(&d).write(out),
                )
            }
            ConnectionsCommand::Revoke { id, reason } => {
                let r = answer(
                    "RevokeConnection",
                    self.client
                        .revoke_connection(pb::RevokeConnectionRequest {
                            connection_id: id,
                            reason,
                        })
                        .await,
                )?;
                self.print_receipt(&r)
            }
        }
    }

    async fn accounts(&mut self, command: AccountsCommand) -> Result<(), CliError> {
        match command {
            AccountsCommand::Delete {
                tenant,
                account,
                reason,
                yes: _,
            } => {
                let r = answer(
                    "DeleteAccount",
                    self.client
                        .delete_account(pb::DeleteAccountRequest {
                            tenant_id: tenant,
                            account_id: account,
                            reason,
                        })
                        .await,
                )?;
                self.print_receipt(&r)
            }
        }
    }

    async fn receipts(&mut self, command: ReceiptsCommand) -> Result<(), CliError> {
        match command {
            ReceiptsCommand::Show { id } => {
                let r = answer(
                    "GetDeletionReceipt",
                    self.client
                        .get_deletion_receipt(pb::GetDeletionReceiptRequest { receipt_id: id })
                        .await,
                )?;
                self.print_receipt(&r)
            }
            ReceiptsCommand::List {
                incomplete,
                overdue,
                tenant,
                account,
                limit,
            } => {
                let client = self.client.clone();
                let (found, more) = collect(limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::ListDeletionReceiptsRequest {
                        incomplete_only: incomplete,
                        overdue_only: overdue,
                        tenant_id: tenant.clone(),
                        account_id: account.clone(),
                        page_size,
                        page_token,
                    };
                    async move {
                        let r = answer(
                            "ListDeletionReceipts",
                            client.list_deletion_receipts(request).await,
                        )?;
                        Ok((r.receipts, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "receipts": found.iter().map(output::receipt_json).collect::<Vec<_>>(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::receipt_table();
                        for r in &found {
                            t.row(output::receipt_row(r));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
        }
    }

    async fn key_status(&mut self) -> Result<pb::KeyStatusResponse, CliError> {
        answer(
            "KeyStatus",
            self.client.key_status(pb::KeyStatusRequest {}).await,
        )
    }

    async fn keys(&mut self, command: AdminKeysCommand) -> Result<(), CliError> {
        match command {
            AdminKeysCommand::Status => {
                let s = self.key_status().await?;
                self.print(
                    || output::key_status_json(&s),
                    |out| {
                        let mut f = Fields::new();
                        f.add("provider", s.provider.clone())
                            .add("primary_version", format!("v{}", s.primary_version))
                            .add(
                                "oldest_version_in_use",
                                format!(
                                    "v{} (age {})",
                                    s.oldest_version_in_use,
                                    age_text(s.oldest_in_use_age_seconds)
                                ),
                            )
                            .add("max_kek_age_days", s.max_kek_age_days.to_string())
                            .add("rotation_overdue", yes_no(s.rotation_overdue))
                            .add(
                                "rotation",
                                s.rotation
                                    .as_ref()
                                    .map_or_else(|| "-".to_owned(), output::rotation_text),
                            );
                        f.write(out)?;
                        writeln!(out)?;
                        output::key_versions_table(&s.versions).write(out)?;
                        writeln!(out)?;
                        output::replicas_table(&s.replicas).write(out)
                    },
                )
            }
            AdminKeysCommand::Rotate { wait } => {
                let mut run = answer(
                    "RotateKeys",
                    self.client.rotate_keys(pb::RotateKeysRequest {}).await,
                )?;
                if wait {
                    run = self.wait_for_rotation(run).await?;
                }
                self.print(
                    || output::rotation_json(&run),
                    |out| writeln!(out, "{}", output::rotation_text(&run)),
                )?;
                if run.state == pb::RotationState::Failed as i32 {
                    return Err(CliError::failed(format!(
                        "rotation {} failed: {}",
                        run.run_id, run.last_error
                    )));
                }
                Ok(())
            }
            AdminKeysCommand::Retire { version } => {
                let v = answer(
                    "RetireKey",
                    self.client
                        .retire_key(pb::RetireKeyRequest { version })
                        .await,
                )?;
                self.print_key_version(&v)
            }
            AdminKeysCommand::Destroy { version, yes: _ } => {
                let v = answer(
                    "DestroyKey",
                    self.client
                        .destroy_key(pb::DestroyKeyRequest { version })
                        .await,
                )?;
                self.print_key_version(&v)
            }
            AdminKeysCommand::Report => {
                let r = answer(
                    "KeyReport",
                    self.client.key_report(pb::KeyReportRequest {}).await,
                )?;
                self.print(
                    || output::key_report_json(&r),
                    |out| {
                        let mut f = Fields::new();
                        f.add("generated_at", output::ts_text(r.generated_at.as_ref()))
                            .add("provider", r.provider.clone())
                            .add("primary_version", format!("v{}", r.primary_version))
                            .add(
                                "oldest_version_in_use",
                                format!(
                                    "v{} (age {})",
                                    r.oldest_version_in_use,
                                    age_text(r.oldest_in_use_age_seconds)
                                ),
                            )
                            .add("max_kek_age_days", r.max_kek_age_days.to_string())
                            .add("policy_met", yes_no(r.policy_met))
                            .add("policy_detail", r.policy_detail.clone());
                        f.write(out)?;
                        writeln!(out)?;
                        output::key_versions_table(&r.versions).write(out)?;
                        writeln!(out)?;
                        writeln!(out, "lifecycle:")?;
                        for v in &r.versions {
                            for line in output::key_lifecycle_lines(v) {
                                writeln!(out, "  {line}")?;
                            }
                        }
                        writeln!(out)?;
                        if r.rotations.is_empty() {
                            writeln!(out, "no rotations")?;
                        } else {
                            writeln!(out, "rotations:")?;
                            for run in &r.rotations {
                                writeln!(out, "  {}", output::rotation_text(run))?;
                            }
                        }
                        writeln!(out)?;
                        output::replicas_table(&r.replicas).write(out)
                    },
                )
            }
        }
    }

    /// Polls KeyStatus until `run` has completed or failed.
    async fn wait_for_rotation(
        &mut self,
        mut run: pb::RotationProgress,
    ) -> Result<pb::RotationProgress, CliError> {
        let progress = show_progress();
        let running = pb::RotationState::Running as i32;
        while run.state == running {
            if progress {
                eprint!("\r{}", rotation_progress_line(&run));
            }
            tokio::time::sleep(ROTATION_POLL).await;
            let status = self.key_status().await?;
            match status.rotation {
                Some(latest) if latest.run_id == run.run_id => run = latest,
                Some(latest) => {
                    return Err(CliError::failed(format!(
                        "rotation {} was superseded by rotation {}",
                        run.run_id, latest.run_id
                    )));
                }
                None => {
                    return Err(CliError::failed(format!(
                        "rotation {} is no longer reported by the vault",
                        run.run_id
                    )));
                }
            }
        }
        if progress {
            eprintln!("\r{}", rotation_progress_line(&run));
        }
        Ok(run)
    }

    async fn query_audit(
        &mut self,
        request: pb::QueryAuditRequest,
    ) -> Result<pb::QueryAuditResponse, CliError> {
        answer("QueryAudit", self.client.query_audit(request).await)
    }

    async fn audit(&mut self, command: AuditCommand) -> Result<(), CliError> {
        match command {
            AuditCommand::Tail { lines, follow } => self.audit_tail(lines, follow).await,
            AuditCommand::Query(args) => {
                let client = self.client.clone();
                let last_seq = std::cell::Cell::new(0);
                let (found, more) = collect(args.limit, |page_size, page_token| {
                    let mut client = client.clone();
                    let request = pb::QueryAuditRequest {
                        actor: args.actor.clone(),
                        action: args.action.clone(),
                        target: args.target.clone(),
                        outcome: args.outcome.map(|o| o.proto() as i32),
                        since: args.since,
                        until: args.until,
                        after_seq: None,
                        newest_first: args.newest_first,
                        page_size,
                        page_token,
                    };
                    let last_seq = &last_seq;
                    async move {
                        let r = answer("QueryAudit", client.query_audit(request).await)?;
                        if last_seq.get() == 0 {
                            last_seq.set(r.last_seq);
                        }
                        Ok((r.entries, r.next_page_token))
                    }
                })
                .await?;
                self.print(
                    || {
                        json!({
                            "entries": found.iter().map(output::audit_entry_json).collect::<Vec<_>>(),
                            "last_seq": last_seq.get(),
                            "more": more,
                        })
                    },
                    |out| {
                        let mut t = output::audit_table();
                        for e in &found {
                            t.row(output::audit_row(e));
                        }
                        t.write(out)?;
                        more_note(out, more, found.len())
                    },
                )
            }
            AuditCommand::Verify { from, to } => {
                let v = answer(
                    "VerifyAudit",
                    self.client
                        .verify_audit(pb::VerifyAuditRequest {
                            from_seq: from,
                            to_seq: to,
                        })
                        .await,
                )?;
                let broken = v
                    .first_broken_seq
                    .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
                self.print(
                    || output::verify_json(&v),
                    |out| {
                        writeln!(
                            out,
                            "entries checked: {} (range {}..={}), checkpoints verified: {}",
                            v.entries_checked, v.from_seq, v.to_seq, v.checkpoints_verified
                        )?;
                        if v.ok {
                            writeln!(out, "ok: {}", v.detail)
                        } else {
                            writeln!(out, "first broken entry: {broken}: {}", v.detail)
                        }
                    },
                )?;
                if v.ok {
                    Ok(())
                } else {
                    Err(CliError::failed(format!(
                        "the audit log does not verify: first broken entry: {broken}: {}",
                        v.detail
                    )))
                }
            }
            AuditCommand::Export { out } => self.audit_export(out).await,
        }
    }

    /// `audit tail`: the newest `lines` entries, oldest first; then, with
    /// `follow`, every new entry as it is appended.
    async fn audit_tail(&mut self, lines: usize, follow: bool) -> Result<(), CliError> {
        let mut newest = Vec::new();
        let mut token = String::new();
        let mut last_seq = 0;
        while newest.len() < lines {
            let r = self
                .query_audit(pb::QueryAuditRequest {
                    newest_first: true,
                    page_size: page_size(lines, newest.len()),
                    page_token: token,
                    ..Default::default()
                })
                .await?;
            last_seq = last_seq.max(r.last_seq);
            newest.extend(r.entries);
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if lines == 0 {
            last_seq = self.query_audit(head_request()).await?.last_seq;
        }
        newest.truncate(lines);
        newest.reverse();
        let mut cursor = newest.last().map_or(last_seq, |e| e.seq);

        let mut out = io::stdout();
        let json = self.output == OutputFormat::Json;
        let mut table = output::audit_table();
        for e in &newest {
            table.row(output::audit_row(e));
        }
        if !follow {
            return self.print(
                || {
                    json!({
                        "entries": newest.iter().map(output::audit_entry_json).collect::<Vec<_>>(),
                        "last_seq": last_seq,
                    })
                },
                |out| table.write(out),
            );
        }
        if json {
            for e in &newest {
                output::write_json_line(&mut out, &output::audit_entry_json(e))
                    .map_err(write_failed)?;
            }
        } else {
            table.write(&mut out).map_err(write_failed)?;
        }
        out.flush().map_err(write_failed)?;
        let mut widths = table.widths();
        loop {
            tokio::time::sleep(FOLLOW_POLL).await;
            let mut token = String::new();
            loop {
                let r = self
                    .query_audit(pb::QueryAuditRequest {
                        after_seq: Some(cursor),
                        page_size: page_size(0, 0),
                        page_token: token,
                        ..Default::default()
                    })
                    .await?;
                let mut rows = output::audit_table();
                for e in &r.entries {
                    cursor = cursor.max(e.seq);
                    if json {
                        output::write_json_line(&mut out, &output::audit_entry_json(e))
                            .map_err(write_failed)?;
                    } else {
                        rows.row(output::audit_row(e));
                    }
                }
                if !json {
                    widths = widths
                        .iter()
                        .zip(rows.widths())
                        .map(|(a, b)| (*a).max(b))
                        .collect();
                    rows.write_rows(&mut out, &widths).map_err(write_failed)?;
                }
                out.flush().map_err(write_failed)?;
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
        }
    }

    /// `audit export`: entries 1 to the newest at the start, as JSON Lines.
    async fn audit_export(&mut self, path: Option<PathBuf>) -> Result<(), CliError> {
        let mut sink: Box<dyn Write> = match &path {
            Some(p) => Box::new(io::BufWriter::new(std::fs::File::create(p).map_err(
                |e| CliError::failed(format!("cannot create {}: {e}", p.display())),
            )?)),
            None => Box::new(io::BufWriter::new(io::stdout())),
        };
        let progress = show_progress();
        let mut token = String::new();
        let mut end: Option<u64> = None;
        let mut written = 0u64;
        'pages: loop {
            let r = self
                .query_audit(pb::QueryAuditRequest {
                    page_size: page_size(0, 0),
                    page_token: token,
                    ..Default::default()
                })
                .await?;
            let last = *end.get_or_insert(r.last_seq);
            for e in &r.entries {
                if e.seq > last {
                    break 'pages;
                }
                output::write_json_line(&mut sink, &output::audit_entry_json(e))
                    .map_err(write_failed)?;
                written += 1;
            }
            if progress {
                eprint!("\rexported {written}/{last} entries");
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if progress {
            eprintln!();
        }
        sink.flush().map_err(write_failed)?;
        drop(sink);
        let last_seq = end.unwrap_or(0);
        if let Some(p) = path {
            self.print(
                || json!({ "out": p.display().to_string(), "entries": written, "last_seq": last_seq }),
                |out| {
                    writeln!(
                        out,
                        "exported {written} entries (up to seq {last_seq}) to {}",
                        p.display()
                    )
                },
            )?;
        }
        Ok(())
    }
}

/// A query for the newest entry only (to learn `last_seq`).
fn head_request() -> pb::QueryAuditRequest {
    pb::QueryAuditRequest {
        newest_first: true,
        page_size: 1,
        ..Default::default()
    }
}

/// Tells a person reading a table that a limit left results off.
fn more_note(out: &mut dyn Write, more: bool, shown: usize) -> io::Result<()> {
    if shown == 0 {
        writeln!(out, "(none)")?;
    }
    if more {
        // On stderr: stdout keeps only the table.
        eprintln!("(first {shown} shown; there are more: raise --limit, or --limit 0 for all)");
    }
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// An age in seconds, e.g. `3days 4h`.
fn age_text(seconds: i64) -> String {
    let seconds = u64::try_from(seconds).unwrap_or(0);
    // Minutes are enough for key ages.
    let rounded = Duration::from_secs(seconds - seconds % 60);
    if rounded.is_zero() {
        format!("{seconds}s")
    } else {
        humantime::format_duration(rounded).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_accepted_with_or_without_v() {
        assert_eq!(parse_version("3"), Ok(3));
        assert_eq!(parse_version("v3"), Ok(3));
        assert_eq!(parse_version("V12"), Ok(12));
        assert!(parse_version("three").is_err());
        assert!(parse_version("v-1").is_err());
        assert!(parse_version("").is_err());
    }

    #[test]
    fn times_are_rfc3339_in_utc_or_with_an_offset() {
        let utc = parse_time("2026-11-02T10:00:00Z").unwrap();
        assert_eq!(utc.seconds, 1_793_613_600);
        assert_eq!(parse_time("2026-11-02T12:00:00+02:00").unwrap(), utc);
        assert_eq!(parse_time("2026-11-02T07:30:00-02:30").unwrap(), utc);
        assert_eq!(parse_time("2026-11-02 10:00:00").unwrap(), utc);
        let frac = parse_time("2026-11-02T10:00:00.25Z").unwrap();
        assert_eq!((frac.seconds, frac.nanos), (utc.seconds, 250_000_000));
        for bad in [
            "yesterday",
            "2026-11-02",
            "2026-11-02T10:00:00+2:00",
            "1970-01-01T00:00:00+01:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_sizes_stay_within_the_server_limits() {
        assert_eq!(page_size(0, 0), 1000);
        assert_eq!(page_size(20, 0), 20);
        assert_eq!(page_size(20, 15), 5);
        assert_eq!(page_size(5000, 0), 1000);
        assert_eq!(page_size(20, 20), 1);
    }

    #[test]
    fn confirmation_with_yes_needs_no_terminal() {
        assert!(confirm(true, "do it", "?", |_| false).is_ok());
    }
}
