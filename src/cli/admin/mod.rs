//! `tokenvault admin …`: a gRPC client of `AdminService` for operators
//! (role `admin`) and security reviewers (role `auditor`): connections,
//! account deletion, deletion receipts, key-encryption keys and the audit log.
//!
//! Results go to stdout (a table, or with `--output json` one JSON document;
//! see [`super::output`]); progress goes to stderr: `keys rotate --wait`
//! draws a progress bar on a terminal and writes plain lines elsewhere (see
//! [`super::progress`]), `audit export` counts on a terminal only.
//! `audit tail --follow` reads one `FollowAudit` stream, which the vault
//! audits once, when it opens. Destructive commands (`accounts delete`,
//! `keys destroy`) ask for the account id or the key version to be typed on a
//! terminal, and refuse to run without one unless `--yes` is given.

mod args;
mod commands;

pub use args::*;

use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::client::{AdminClient, ClientSettings, ConnectionFlags};
use super::exit::{CliError, Exit};
use super::output::{self, Fields, OutputFormat};
use super::progress::Progress;
use crate::proto::v1 as pb;

/// The largest page the vault serves.
const MAX_PAGE: usize = crate::limits::MAX_PAGE_SIZE as usize;

/// How often `keys rotate --wait` asks for progress.
const ROTATION_POLL: Duration = Duration::from_millis(500);

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

/// A failed write of the results; a broken pipe ends the command quietly
/// (see [`CliError::output`]).
fn write_failed(e: io::Error) -> CliError {
    CliError::output(e)
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

/// Whether the `audit export` count may be drawn (with `\r`) on stderr.
fn show_progress() -> bool {
    io::stderr().is_terminal()
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
        let _ = writeln!(
            io::stderr(),
            "(first {shown} shown; there are more: raise --limit, or --limit 0 for all)"
        );
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
