//! The command line of `tokenvault admin`: every subcommand and flag, as
//! clap parses them, and the argument parsers they use.

use super::*;

/// `tokenvault admin`: the connection flags, the output format and the command.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// How to reach the vault.
    #[command(flatten)]
    pub connection: ConnectionFlags,
    /// How to print results.
    #[arg(
        short = 'o',
        long,
        global = true,
        env = output::OUTPUT_ENV,
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
    pub(super) fn proto(self) -> pb::Integration {
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
    pub(super) fn proto(self) -> pb::ConnectionStatus {
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
        /// Keep printing new entries until interrupted, from one stream that the
        /// vault audits once, when it opens.
        #[arg(short = 'f', long)]
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

/// `--outcome`; the words the tables and JSON show (`success`, `failure`)
/// are accepted too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutcomeArg {
    /// Allowed and carried out (shown as `success`).
    #[value(alias = "success")]
    Ok,
    /// Refused by authentication or policy.
    Denied,
    /// Allowed but failed (shown as `failure`).
    #[value(alias = "failure")]
    Failed,
}

impl OutcomeArg {
    pub(super) fn proto(self) -> pb::AuditOutcome {
        match self {
            OutcomeArg::Ok => pb::AuditOutcome::Success,
            OutcomeArg::Denied => pb::AuditOutcome::Denied,
            OutcomeArg::Failed => pb::AuditOutcome::Failure,
        }
    }
}

/// A key version: `3` or `v3`.
pub(super) fn parse_version(text: &str) -> Result<u32, String> {
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
pub(super) fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
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
