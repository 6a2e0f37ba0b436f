//! Exit statuses of the `tokenvault` binary and the error type that carries
//! one, with the mapping from gRPC status codes and transport failures.
//!
//! The offline commands (`serve`, `keys …`) fail with [`Exit::Failed`]; the
//! `admin` client distinguishes usage, not-found, permission and reachability
//! problems so that scripts can react to them.

use std::fmt;
use std::io;

use tonic::Code;

/// What a failed command tells its caller through the process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 1: the operation failed (any gRPC error not listed below,
    /// FAILED_PRECONDITION, INTERNAL, a broken audit log, an offline command's
    /// failure).
    Failed,
    /// 2: the command was used wrongly: a command-line error (clap's own),
    /// INVALID_ARGUMENT from the server, a destructive command without a
    /// terminal to confirm on and without `--yes`, or a bad client
    /// configuration.
    Usage,
    /// 3: the server answered NOT_FOUND.
    NotFound,
    /// 4: the server answered PERMISSION_DENIED or UNAUTHENTICATED.
    Denied,
    /// 5: the server could not be reached: no connection (including a TLS
    /// handshake that fails, e.g. on a certificate the client does not
    /// trust), a connect timeout, or UNAVAILABLE.
    Unreachable,
    /// 0, and nothing on stderr: the reader of stdout went away (a broken
    /// pipe, as in `tokenvault admin audit export | head`). Whoever reads the
    /// output has all it wanted, so the command ends quietly and successfully.
    Closed,
}

impl Exit {
    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::NotFound => 3,
            Exit::Denied => 4,
            Exit::Unreachable => 5,
            Exit::Closed => 0,
        }
    }

    /// The exit status a gRPC status code maps to.
    pub const fn of_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument => Exit::Usage,
            Code::NotFound => Exit::NotFound,
            Code::PermissionDenied | Code::Unauthenticated => Exit::Denied,
            Code::Unavailable => Exit::Unreachable,
            _ => Exit::Failed,
        }
    }
}

/// The exit statuses of `tokenvault admin`, for its `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0  ok
  1  the operation failed (FAILED_PRECONDITION, INTERNAL, any other gRPC error,
     a broken audit log, a confirmation not given)
  2  usage: a command-line error, INVALID_ARGUMENT from the server, a destructive
     command without a terminal and without --yes, a bad client configuration
  3  not found (NOT_FOUND)
  4  permission denied (PERMISSION_DENIED, UNAUTHENTICATED)
  5  server unreachable (cannot connect or complete the TLS handshake, connect
     timeout, UNAVAILABLE)";

/// A command's failure: the message printed as `tokenvault: <message>` on
/// stderr and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit status.
    pub exit: Exit,
    /// One line for the operator; never holds secret material.
    pub message: String,
}

impl CliError {
    /// A failure with the given status.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }

    /// A usage or client-configuration error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    /// An operation that failed (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(Exit::Failed, message)
    }

    /// An answer to `rpc` without `field`, a message the vault always sets
    /// (exit 1).
    pub fn missing_field(rpc: &str, field: &str) -> Self {
        Self::failed(format!("{rpc}: the vault's answer has no {field}"))
    }

    /// A gRPC error answered to `rpc`: the status message (the vault puts no
    /// secret in one) and the code's canonical name.
    pub fn status(rpc: &str, status: &tonic::Status) -> Self {
        let message = status.message();
        let message = if message.is_empty() {
            "no message".to_owned()
        } else {
            message.to_owned()
        };
        Self::new(
            Exit::of_code(status.code()),
            format!("{rpc}: {message} ({})", code_name(status.code())),
        )
    }

    /// A failure to write the results (to stdout, or to an output file): a
    /// broken pipe is the quiet end [`Exit::Closed`], anything else fails
    /// (exit 1).
    pub fn output(error: io::Error) -> Self {
        if is_broken_pipe(&error) {
            Self::new(Exit::Closed, "the output was closed")
        } else {
            Self::failed(format!("cannot write the output: {error}"))
        }
    }

    /// Whether this "failure" ends the process quietly with status 0
    /// ([`Exit::Closed`]): nothing is printed for it.
    pub fn is_quiet(&self) -> bool {
        self.exit == Exit::Closed
    }

    /// The server could not be reached at `server`.
    pub fn unreachable(server: &str, error: &dyn std::error::Error) -> Self {
        Self::new(
            Exit::Unreachable,
            format!("cannot connect to {server}: {}", error_chain(error)),
        )
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The offline commands report their failures as strings: exit 1.
impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self::failed(message)
    }
}

/// Whether a write failed because the reader of the pipe went away (EPIPE;
/// Rust ignores SIGPIPE, so the write returns this error instead).
pub fn is_broken_pipe(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// The canonical name of a gRPC status code (`NOT_FOUND`).
pub const fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources on one line (`transport error: tcp connect error:
/// Connection refused`), skipping a source that repeats its parent.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_the_documented_exit_statuses() {
        let cases = [
            (Code::InvalidArgument, 2),
            (Code::NotFound, 3),
            (Code::PermissionDenied, 4),
            (Code::Unauthenticated, 4),
            (Code::Unavailable, 5),
            (Code::FailedPrecondition, 1),
            (Code::Internal, 1),
            (Code::DeadlineExceeded, 1),
            (Code::Unknown, 1),
        ];
        for (code, exit) in cases {
            assert_eq!(Exit::of_code(code).code(), exit, "{code:?}");
        }
    }

    #[test]
    fn a_status_error_names_the_rpc_the_message_and_the_code() {
        let e = CliError::status(
            "GetConnection",
            &tonic::Status::not_found("no such connection"),
        );
        assert_eq!(e.exit, Exit::NotFound);
        assert_eq!(e.message, "GetConnection: no such connection (NOT_FOUND)");
    }

    #[test]
    fn offline_failures_exit_1() {
        assert_eq!(CliError::from("boom".to_owned()).exit.code(), 1);
    }

    #[test]
    fn a_broken_pipe_ends_quietly_with_status_0_and_other_write_errors_fail() {
        let closed = CliError::output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(closed.exit, Exit::Closed);
        assert_eq!(closed.exit.code(), 0);
        assert!(closed.is_quiet());

        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::WriteZero,
            io::ErrorKind::Other,
        ] {
            let e = CliError::output(io::Error::from(kind));
            assert_eq!(e.exit, Exit::Failed, "{kind:?}");
            assert!(!e.is_quiet(), "{kind:?}");
            assert!(e.message.starts_with("cannot write the output: "), "{e}");
        }
    }

    /// EPIPE (32 on Linux and the BSDs), as the operating system reports it.
    #[cfg(unix)]
    #[test]
    fn epipe_from_the_os_is_a_broken_pipe() {
        assert!(is_broken_pipe(&io::Error::from_raw_os_error(32)));
        assert!(CliError::output(io::Error::from_raw_os_error(32)).is_quiet());
    }
}
