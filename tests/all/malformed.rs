//! Malformed input. Every RPC is fed invalid ids (empty, wrong prefix, not a
//! UUID, 10 KiB), oversized strings in each string field, UNSPECIFIED and
//! unknown enum values and out-of-range numbers; the gRPC port is fed garbage
//! bytes, broken HTTP/2 and gRPC bodies that are not messages; the HTTP port
//! garbage `POST /risc` bodies, broken `GET /oauth/callback` queries and raw
//! bytes. Each gets a clear answer — INVALID_ARGUMENT naming the field (or,
//! for a request over the 256 KiB limit or one that is not a message, saying
//! so), NOT_FOUND for a well-formed unknown id, OUT_OF_RANGE where the
//! contract says so, HTTP 4xx, or a closed connection; every gRPC refusal
//! carries a `google.rpc.ErrorInfo` of the domain `tokenvault` with a
//! documented reason, and one about a field a `google.rpc.BadRequest` naming
//! it (see [`rich_error_problem`]) — while nothing at rest
//! changes (every table but the audit log's is compared before and after, and
//! the audit chain still verifies), no thread of the vault panics, and the
//! server then serves a health check and a real lease.
//!
//! Also the stable smoke test of `tokenvault::fuzzing`, the entry points of
//! the cargo-fuzz targets in `fuzz/`: thousands of pseudo-random and mutated
//! valid inputs, none of which may panic; and every gRPC case below is checked
//! against `fuzzing::grpc_request`, which runs the handlers' own parsers
//! (`grpc::requests`) and mirrors two checks of the vault's: a handler that
//! stops parsing through them, or a mirror that drifts from the vault, is
//! caught. Field limits come from `tokenvault::limits`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _};
use tokenvault::domain::{ErrorReason, Integration};
use tokenvault::fuzzing::{self, Rpc, Verdict};
use tokenvault::google::sim::GoogleSim;
use tokenvault::limits::{
    MAX_CODE_BYTES, MAX_ID_BYTES, MAX_LOGIN_HINT_BYTES, MAX_MIN_VALID_SECONDS, MAX_PAGE_SIZE,
    MAX_PURPOSE_BYTES, MAX_REASON_BYTES, MAX_REQUEST_BYTES, MAX_RISC_BODY_BYTES, MAX_SCOPE_BYTES,
    MAX_STATE_BYTES,
};
use tokenvault::proto::v1 as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, CALENDAR_SCOPE, CLIENT_ID, TestVault, seed_connection, spawn_vault_with,
    start_google, use_google,
};

/// 10 KiB: far beyond every id limit, far below the request limit.
const KIB10: usize = 10 * 1024;
/// Beyond every field limit but within the server's 256 KiB request limit,
/// so the handler's own validation answers.
const BIG: usize = 128 * 1024;
/// 1 MiB: beyond the server's request limit, refused before decoding.
const MIB: usize = 1024 * 1024;
// The sizes above are where their docs say, whatever the request limit becomes.
const _: () = assert!(KIB10 < BIG && BIG < MAX_REQUEST_BYTES && MIB > MAX_REQUEST_BYTES);
/// How long any one call or exchange may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Tables that calls may change: every admin call and every refusal is audited.
pub(crate) const AUDIT_TABLES: [&str; 3] = ["audit_log", "audit_head", "audit_checkpoints"];

// ---------------------------------------------------------------------------
// Panics on the vault's threads
// ---------------------------------------------------------------------------

/// Prefix of the names of the threads [`watched`] runs tests on.
const WATCHED: &str = "tv-malformed-";

/// Panics seen on watched threads: (thread name, panic message).
static PANICS: OnceLock<Mutex<Vec<(String, String)>>> = OnceLock::new();

/// The panic log, installing the hook that fills it on first use.
fn panic_log() -> &'static Mutex<Vec<(String, String)>> {
    PANICS.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if let (Some(name), Some(log)) = (
                thread.name().filter(|n| n.starts_with(WATCHED)),
                PANICS.get(),
            ) {
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((name.to_owned(), info.to_string()));
            }
            previous(info);
        }));
        Mutex::new(Vec::new())
    })
}

/// Runs `body` on a runtime of its own whose threads are named
/// `tv-malformed-<name>`: the vault and the Google simulator it starts run
/// there too, so a panic in any request handler or connection task is seen
/// (tokio would otherwise turn it into a silently closed stream).
pub(crate) async fn watched(name: String, body: impl Future<Output = ()> + Send + 'static) {
    let thread = format!("{WATCHED}{name}");
    panic_log();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(&thread)
        .enable_all()
        .build()
        .expect("build a runtime");
    let result = rt.spawn(body).await;
    rt.shutdown_background();
    if let Err(e) = result {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("{name}: {e}");
    }
    let seen: Vec<String> = panic_log()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(t, _)| *t == thread)
        .map(|(_, m)| m.clone())
        .collect();
    assert!(
        seen.is_empty(),
        "{} panic(s) on the vault's threads:\n{}",
        seen.len(),
        seen.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Calls with arbitrary message bytes
// ---------------------------------------------------------------------------

/// A codec that sends and receives message bytes as they are, so a request
/// can carry any bytes behind a correct 5-byte gRPC length prefix.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// The caller each RPC is made as: a role the RPC allows, with a policy that
/// lets the request through to validation.
fn caller(rpc: Rpc) -> As {
    match rpc {
        Rpc::BeginAuthorization
        | Rpc::CompleteAuthorization
        | Rpc::GetConnection
        | Rpc::ListConnections
        | Rpc::Disconnect
        | Rpc::DeleteAccount
        | Rpc::GetDeletionReceipt => As::App,
        Rpc::LeaseToken | Rpc::ReleaseLease | Rpc::Watch | Rpc::Ack => As::Worker,
        _ => As::Admin,
    }
}

/// Sends `body` as the request message of `rpc`; OK or the status.
pub(crate) async fn call(tv: &TestVault, rpc: Rpc, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(tv.channel.clone());
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", caller(rpc).key())
            .parse()
            .expect("ascii key"),
    );
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(rpc.path());
    let answer = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        if rpc.is_streaming() {
            // The stream opening is the answer; dropping it cancels the watch.
            grpc.server_streaming(request, path, RawCodec)
                .await
                .map(drop)
        } else {
            grpc.unary(request, path, RawCodec).await.map(drop)
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

/// The answer a case must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// INVALID_ARGUMENT with a message naming this field.
    Invalid(&'static str),
    /// As `Invalid`, decided by what is stored (an unknown OAuth state), so
    /// beyond what `tokenvault::fuzzing` can predict.
    InvalidStored(&'static str),
    /// NOT_FOUND: a well-formed id of nothing.
    NotFound,
    /// OUT_OF_RANGE, as documented for event cursors past the newest event.
    OutOfRange,
    /// Refused before decoding: larger than the server's request limit.
    TooLarge,
    /// OK: valid after all (a clamped page size, a free-text filter).
    Ok,
}

/// One malformed request.
struct Case {
    rpc: Rpc,
    what: String,
    body: Vec<u8>,
    want: Want,
}

/// The live connection the cases refer to (tenant `acme`, account `alice`).
pub(crate) struct Fixture {
    pub(crate) conn: String,
}

#[derive(Default)]
struct Cases(Vec<Case>);

impl Cases {
    fn add(&mut self, rpc: Rpc, what: impl Into<String>, msg: &impl prost::Message, want: Want) {
        self.0.push(Case {
            rpc,
            what: what.into(),
            body: msg.encode_to_vec(),
            want,
        });
    }

    /// One case per value of a field: `base` with `set(value)`, named
    /// `<field> <what>`.
    fn each<M: prost::Message + Clone, V>(
        &mut self,
        rpc: Rpc,
        base: &M,
        field: &str,
        set: impl Fn(&mut M, V),
        values: impl IntoIterator<Item = (String, V)>,
        want: Want,
    ) {
        for (what, v) in values {
            let mut m = base.clone();
            set(&mut m, v);
            self.add(rpc, format!("{field} {what}"), &m, want);
        }
    }

    /// As [`Cases::each`] for a string field, plus a 1 MiB value refused
    /// before decoding.
    fn text<M: prost::Message + Clone>(
        &mut self,
        rpc: Rpc,
        base: &M,
        field: &str,
        set: impl Fn(&mut M, String),
        bad: Vec<(&'static str, String)>,
        want: Want,
    ) {
        let bad = bad.into_iter().map(|(w, v)| (w.to_owned(), v));
        self.each(rpc, base, field, &set, bad, want);
        self.each(
            rpc,
            base,
            field,
            &set,
            [("1 MiB".into(), a(MIB))],
            Want::TooLarge,
        );
    }

    /// As [`Cases::each`] for numbers and enum values, named by value.
    fn numbers<M: prost::Message + Clone, V: std::fmt::Debug + Copy>(
        &mut self,
        rpc: Rpc,
        base: &M,
        field: &str,
        set: impl Fn(&mut M, V),
        values: impl IntoIterator<Item = V>,
        want: Want,
    ) {
        let values = values.into_iter().map(|v| (format!("{v:?}"), v));
        self.each(rpc, base, field, set, values, want);
    }
}

fn a(n: usize) -> String {
    "a".repeat(n)
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Malformed values of a vault-minted id with `prefix` (`other` is another
/// kind's prefix).
fn bad_minted(prefix: &str, other: &str) -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("wrong prefix", format!("{other}{}", new_uuid())),
        ("no prefix", new_uuid()),
        ("not a uuid", format!("{prefix}not-a-uuid")),
        ("uuid cut short", format!("{prefix}{}", &new_uuid()[..20])),
        ("NUL and non-ASCII", format!("{prefix}\0é{}", new_uuid())),
        ("10 KiB", format!("{prefix}{}", a(KIB10))),
        ("128 KiB", a(BIG)),
    ]
}

/// Malformed values of a caller-chosen id (tenant, account, consumer).
fn bad_external() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("a space", "has space".into()),
        ("a path", "../etc/passwd".into()),
        ("NUL", "a\0b".into()),
        ("non-ASCII", "tenant-é".into()),
        ("one byte too long", a(MAX_ID_BYTES + 1)),
        ("10 KiB", a(KIB10)),
        ("128 KiB", a(BIG)),
    ]
}

/// Malformed free-text deletion reasons.
fn bad_reasons() -> Vec<(&'static str, String)> {
    vec![
        ("one byte too long", a(MAX_REASON_BYTES + 1)),
        ("128 KiB", a(BIG)),
        ("a control character", "bell\u{7}".into()),
        ("a newline", "two\nlines".into()),
    ]
}

/// Malformed page tokens (the last was issued for other filters).
fn bad_tokens() -> Vec<(&'static str, String)> {
    vec![
        ("not base64", "%%%".into()),
        ("base64 of no separator", URL_SAFE_NO_PAD.encode("nothing")),
        (
            "foreign filters",
            URL_SAFE_NO_PAD.encode(format!("0123456789abcdef|conn_{}", new_uuid())),
        ),
        ("128 KiB", a(BIG)),
    ]
}

/// A well-formed id of nothing.
fn unknown(prefix: &str) -> Vec<(String, String)> {
    vec![("of nothing".into(), format!("{prefix}{}", new_uuid()))]
}

fn cases(fx: &Fixture) -> Vec<Case> {
    use Want::{Invalid, InvalidStored, NotFound, OutOfRange, TooLarge};
    use pb::complete_authorization_request::Outcome;
    let mut c = Cases::default();
    let conn = fx.conn.clone();
    let text_ok = |v: Vec<(&'static str, String)>| v.into_iter().filter(|(_, v)| !v.is_empty());

    // ConnectionService.BeginAuthorization
    let r = Rpc::BeginAuthorization;
    let m = pb::BeginAuthorizationRequest {
        tenant_id: "acme".into(),
        account_id: "malformed".into(),
        integration: pb::Integration::Calendar as i32,
        login_hint: None,
    };
    c.text(
        r,
        &m,
        "tenant_id",
        |m, v| m.tenant_id = v,
        bad_external(),
        Invalid("tenant_id"),
    );
    c.text(
        r,
        &m,
        "account_id",
        |m, v| m.account_id = v,
        bad_external(),
        Invalid("account_id"),
    );
    let set = |m: &mut pb::BeginAuthorizationRequest, v| m.integration = v;
    c.numbers(
        r,
        &m,
        "integration",
        set,
        [0, 99, -1, i32::MAX],
        Invalid("integration"),
    );
    let hints = vec![
        ("empty", String::new()),
        ("a space", "a b".into()),
        ("one byte too long", a(MAX_LOGIN_HINT_BYTES + 1)),
        ("128 KiB", a(BIG)),
    ];
    c.text(
        r,
        &m,
        "login_hint",
        |m, v| m.login_hint = Some(v),
        hints,
        Invalid("login_hint"),
    );

    // ConnectionService.CompleteAuthorization: the state is looked up last.
    let r = Rpc::CompleteAuthorization;
    let m = pb::CompleteAuthorizationRequest {
        state: "no-such-state".into(),
        outcome: Some(Outcome::Code("no-such-code".into())),
        tenant_id: "acme".into(),
        account_id: "alice".into(),
    };
    c.add(r, "unknown state", &m, InvalidStored("state"));
    let states = vec![
        ("empty", String::new()),
        ("one byte too long", a(MAX_STATE_BYTES + 1)),
        ("128 KiB", a(BIG)),
    ];
    c.text(r, &m, "state", |m, v| m.state = v, states, Invalid("state"));
    let mut none = m.clone();
    none.outcome = None;
    c.add(r, "neither code nor error", &none, Invalid("outcome"));
    let codes = vec![
        ("one byte too long", a(MAX_CODE_BYTES + 1)),
        ("128 KiB", a(BIG)),
    ];
    c.text(
        r,
        &m,
        "code",
        |m, v| m.outcome = Some(Outcome::Code(v)),
        codes,
        Invalid("code"),
    );
    // An empty tenant or account means "not checked".
    let set = |m: &mut pb::CompleteAuthorizationRequest, v| m.tenant_id = v;
    c.each(
        r,
        &m,
        "tenant_id",
        set,
        text_ok(bad_external()).map(|(w, v)| (w.into(), v)),
        Invalid("tenant_id"),
    );
    let set = |m: &mut pb::CompleteAuthorizationRequest, v| m.account_id = v;
    c.each(
        r,
        &m,
        "account_id",
        set,
        text_ok(bad_external()).map(|(w, v)| (w.into(), v)),
        Invalid("account_id"),
    );
    c.each(
        r,
        &m,
        "tenant_id",
        |m, v| m.tenant_id = v,
        [("1 MiB".into(), a(MIB))],
        TooLarge,
    );
    c.each(
        r,
        &m,
        "account_id",
        |m, v| m.account_id = v,
        [("1 MiB".into(), a(MIB))],
        TooLarge,
    );
    // Google's error texts are never stored or echoed: the unknown state decides.
    let error = |error: String, error_description: String| {
        Some(Outcome::Error(pb::AuthorizationError {
            error,
            error_description,
        }))
    };
    let texts = vec![(
        "128 KiB with control characters",
        format!("\0\u{7}{}", a(BIG)),
    )];
    c.text(
        r,
        &m,
        "error",
        |m, v| m.outcome = error(v, String::new()),
        texts.clone(),
        InvalidStored("state"),
    );
    let set =
        |m: &mut pb::CompleteAuthorizationRequest, v| m.outcome = error("access_denied".into(), v);
    c.text(
        r,
        &m,
        "error_description",
        set,
        texts,
        InvalidStored("state"),
    );

    // GetConnection, on both services (AdminService's request is a copy of
    // ConnectionService's, the same on the wire).
    for r in [Rpc::GetConnection, Rpc::AdminGetConnection] {
        let m = pb::GetConnectionRequest::default();
        let set = |m: &mut pb::GetConnectionRequest, v| m.connection_id = v;
        c.text(
            r,
            &m,
            "connection_id",
            set,
            bad_minted("conn_", "lease_"),
            Invalid("connection_id"),
        );
        c.each(r, &m, "connection_id", set, unknown("conn_"), NotFound);
    }

    // ConnectionService.ListConnections
    let r = Rpc::ListConnections;
    let m = pb::ListConnectionsRequest {
        tenant_id: "acme".into(),
        ..Default::default()
    };
    c.text(
        r,
        &m,
        "tenant_id",
        |m, v| m.tenant_id = v,
        bad_external(),
        Invalid("tenant_id"),
    );
    let set = |m: &mut pb::ListConnectionsRequest, v| m.account_id = Some(v);
    c.text(
        r,
        &m,
        "account_id",
        set,
        bad_external(),
        Invalid("account_id"),
    );
    let set = |m: &mut pb::ListConnectionsRequest, v| m.integration = Some(v);
    c.numbers(
        r,
        &m,
        "integration",
        set,
        [0, 99, -7],
        Invalid("integration"),
    );
    let set = |m: &mut pb::ListConnectionsRequest, v| m.status = Some(v);
    c.numbers(r, &m, "status", set, [0, 42, -3], Invalid("status"));
    let set = |m: &mut pb::ListConnectionsRequest, v| m.page_size = v;
    c.numbers(
        r,
        &m,
        "page_size",
        set,
        [-1, i32::MIN],
        Invalid("page_size"),
    );
    c.numbers(r, &m, "page_size (clamped)", set, [i32::MAX], Want::Ok);
    c.text(
        r,
        &m,
        "page_token",
        |m, v| m.page_token = v,
        bad_tokens(),
        Invalid("page_token"),
    );

    // Disconnect and RevokeConnection: a bad reason must not delete the live
    // connection it names.
    let m = pb::DisconnectRequest {
        connection_id: conn.clone(),
        reason: String::new(),
    };
    let r = Rpc::Disconnect;
    let set = |m: &mut pb::DisconnectRequest, v| m.connection_id = v;
    c.text(
        r,
        &m,
        "connection_id",
        set,
        bad_minted("conn_", "rcpt_"),
        Invalid("connection_id"),
    );
    c.each(r, &m, "connection_id", set, unknown("conn_"), NotFound);
    c.text(
        r,
        &m,
        "reason",
        |m, v| m.reason = v,
        bad_reasons(),
        Invalid("reason"),
    );
    let m = pb::RevokeConnectionRequest {
        connection_id: conn.clone(),
        reason: String::new(),
    };
    let r = Rpc::RevokeConnection;
    let set = |m: &mut pb::RevokeConnectionRequest, v| m.connection_id = v;
    c.text(
        r,
        &m,
        "connection_id",
        set,
        bad_minted("conn_", "rcpt_"),
        Invalid("connection_id"),
    );
    c.each(r, &m, "connection_id", set, unknown("conn_"), NotFound);
    c.text(
        r,
        &m,
        "reason",
        |m, v| m.reason = v,
        bad_reasons(),
        Invalid("reason"),
    );

    // DeleteAccount, on both services (the same request on the wire): a bad
    // reason must not delete alice.
    for r in [Rpc::DeleteAccount, Rpc::AdminDeleteAccount] {
        let m = pb::DeleteAccountRequest {
            tenant_id: "acme".into(),
            account_id: "alice".into(),
            reason: String::new(),
        };
        c.text(
            r,
            &m,
            "tenant_id",
            |m, v| m.tenant_id = v,
            bad_external(),
            Invalid("tenant_id"),
        );
        c.text(
            r,
            &m,
            "account_id",
            |m, v| m.account_id = v,
            bad_external(),
            Invalid("account_id"),
        );
        c.text(
            r,
            &m,
            "reason",
            |m, v| m.reason = v,
            bad_reasons(),
            Invalid("reason"),
        );
    }

    // GetDeletionReceipt, on both services (the same request on the wire).
    for r in [Rpc::GetDeletionReceipt, Rpc::AdminGetDeletionReceipt] {
        let m = pb::GetDeletionReceiptRequest::default();
        let set = |m: &mut pb::GetDeletionReceiptRequest, v| m.receipt_id = v;
        c.text(
            r,
            &m,
            "receipt_id",
            set,
            bad_minted("rcpt_", "conn_"),
            Invalid("receipt_id"),
        );
        c.each(r, &m, "receipt_id", set, unknown("rcpt_"), NotFound);
    }

    // LeaseService.LeaseToken: the base request would be granted.
    let r = Rpc::LeaseToken;
    let m = pb::LeaseTokenRequest {
        connection_id: conn.clone(),
        purpose: "calendar_sync".into(),
        scopes: vec![CALENDAR_SCOPE.into()],
        min_valid_seconds: 0,
    };
    let set = |m: &mut pb::LeaseTokenRequest, v| m.connection_id = v;
    c.text(
        r,
        &m,
        "connection_id",
        set,
        bad_minted("conn_", "lease_"),
        Invalid("connection_id"),
    );
    c.each(r, &m, "connection_id", set, unknown("conn_"), NotFound);
    let purposes = vec![
        ("empty", String::new()),
        ("upper case and a space", "Calendar Sync".into()),
        ("one byte too long", a(MAX_PURPOSE_BYTES + 1)),
        ("128 KiB", a(BIG)),
    ];
    c.text(
        r,
        &m,
        "purpose",
        |m, v| m.purpose = v,
        purposes,
        Invalid("purpose"),
    );
    let scopes = [
        ("none", vec![]),
        ("an empty one", vec![String::new()]),
        ("a space", vec!["a b".into()]),
        ("a quote", vec![CALENDAR_SCOPE.into(), "bad\"scope".into()]),
        ("one byte too long", vec![a(MAX_SCOPE_BYTES + 1)]),
        ("128 KiB", vec![a(BIG)]),
        ("10,000 empty ones", vec![String::new(); 10_000]),
    ];
    let scopes = scopes.map(|(w, v)| (w.to_owned(), v));
    c.each(
        r,
        &m,
        "scopes",
        |m, v| m.scopes = v,
        scopes,
        Invalid("scopes"),
    );
    c.each(
        r,
        &m,
        "scopes",
        |m, v| m.scopes = v,
        [("1 MiB".into(), vec![a(MIB)])],
        TooLarge,
    );
    let set = |m: &mut pb::LeaseTokenRequest, v| m.min_valid_seconds = v;
    c.numbers(
        r,
        &m,
        "min_valid_seconds",
        set,
        [MAX_MIN_VALID_SECONDS + 1, u32::MAX],
        Invalid("min_valid_seconds"),
    );

    // LeaseService.ReleaseLease
    let r = Rpc::ReleaseLease;
    let m = pb::ReleaseLeaseRequest::default();
    let set = |m: &mut pb::ReleaseLeaseRequest, v| m.lease_id = v;
    c.text(
        r,
        &m,
        "lease_id",
        set,
        bad_minted("lease_", "conn_"),
        Invalid("lease_id"),
    );
    c.each(r, &m, "lease_id", set, unknown("lease_"), NotFound);

    // EventService.Watch: the base request would open a stream.
    let r = Rpc::Watch;
    let m = pb::WatchRequest {
        consumer: "calendar-sync".into(),
        ..Default::default()
    };
    c.text(
        r,
        &m,
        "consumer",
        |m, v| m.consumer = v,
        bad_external(),
        Invalid("consumer"),
    );
    let set = |m: &mut pb::WatchRequest, v: &[i32]| m.kinds = v.to_vec();
    c.numbers(
        r,
        &m,
        "kinds",
        set,
        [&[0][..], &[42], &[1, -1]],
        Invalid("kinds"),
    );
    let set = |m: &mut pb::WatchRequest, v: &[i32]| m.integrations = v.to_vec();
    c.numbers(
        r,
        &m,
        "integrations",
        set,
        [&[0][..], &[99], &[1, i32::MIN]],
        Invalid("integration"),
    );
    let set = |m: &mut pb::WatchRequest, v| m.after_cursor = Some(v);
    c.numbers(
        r,
        &m,
        "after_cursor",
        set,
        [u64::MAX],
        Invalid("after_cursor"),
    );
    c.numbers(
        r,
        &m,
        "after_cursor past the newest event",
        set,
        [1 << 40],
        OutOfRange,
    );

    // EventService.Ack: the base request would move the consumer's position.
    let r = Rpc::Ack;
    let m = pb::AckRequest {
        consumer: "calendar-sync".into(),
        cursor: 1,
    };
    c.text(
        r,
        &m,
        "consumer",
        |m, v| m.consumer = v,
        bad_external(),
        Invalid("consumer"),
    );
    let set = |m: &mut pb::AckRequest, v| m.cursor = v;
    c.numbers(r, &m, "cursor", set, [0, u64::MAX], Invalid("cursor"));
    c.numbers(
        r,
        &m,
        "cursor past the newest event",
        set,
        [1 << 40],
        OutOfRange,
    );

    // AdminService.ListConnections
    let r = Rpc::AdminListConnections;
    let m = pb::AdminServiceListConnectionsRequest::default();
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.tenant_id = Some(v);
    c.text(
        r,
        &m,
        "tenant_id",
        set,
        bad_external(),
        Invalid("tenant_id"),
    );
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.account_id = Some(v);
    c.text(
        r,
        &m,
        "account_id",
        set,
        bad_external(),
        Invalid("account_id"),
    );
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.integration = Some(v);
    c.numbers(r, &m, "integration", set, [0, 99], Invalid("integration"));
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.status = Some(v);
    c.numbers(r, &m, "status", set, [0, 42, -3], Invalid("status"));
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.page_size = v;
    c.numbers(r, &m, "page_size", set, [-1], Invalid("page_size"));
    c.text(
        r,
        &m,
        "page_token",
        |m, v| m.page_token = v,
        bad_tokens(),
        Invalid("page_token"),
    );
    // An exact-match filter, applied in memory, of at most the longest
    // subject OpenID Connect allows.
    let subjects = vec![("128 KiB with NUL", format!("\0{}", a(BIG)))];
    let set = |m: &mut pb::AdminServiceListConnectionsRequest, v| m.google_subject = Some(v);
    c.text(
        r,
        &m,
        "google_subject",
        set,
        subjects,
        Invalid("google_subject"),
    );

    // AdminService.ListDeletionReceipts
    let r = Rpc::ListDeletionReceipts;
    let m = pb::ListDeletionReceiptsRequest::default();
    let set = |m: &mut pb::ListDeletionReceiptsRequest, v| m.tenant_id = Some(v);
    c.text(
        r,
        &m,
        "tenant_id",
        set,
        bad_external(),
        Invalid("tenant_id"),
    );
    let set = |m: &mut pb::ListDeletionReceiptsRequest, v| m.account_id = Some(v);
    c.text(
        r,
        &m,
        "account_id",
        set,
        bad_external(),
        Invalid("account_id"),
    );
    let set = |m: &mut pb::ListDeletionReceiptsRequest, v| m.page_size = v;
    c.numbers(
        r,
        &m,
        "page_size",
        set,
        [-1, i32::MIN],
        Invalid("page_size"),
    );
    c.text(
        r,
        &m,
        "page_token",
        |m, v| m.page_token = v,
        bad_tokens(),
        Invalid("page_token"),
    );

    // AdminService.RetireKey and DestroyKey
    let m = pb::RetireKeyRequest::default();
    let set = |m: &mut pb::RetireKeyRequest, v| m.version = v;
    c.numbers(Rpc::RetireKey, &m, "version", set, [0], Invalid("version"));
    c.numbers(
        Rpc::RetireKey,
        &m,
        "version",
        set,
        [999, u32::MAX],
        NotFound,
    );
    let m = pb::DestroyKeyRequest::default();
    let set = |m: &mut pb::DestroyKeyRequest, v| m.version = v;
    c.numbers(Rpc::DestroyKey, &m, "version", set, [0], Invalid("version"));
    c.numbers(
        Rpc::DestroyKey,
        &m,
        "version",
        set,
        [999, u32::MAX],
        NotFound,
    );

    // AdminService.KeyStatus and KeyReport have no fields: unknown ones are
    // skipped. (RotateKeys only gets garbage: a decodable request rotates.)
    let unknown_fields = vec![0xf8, 0x06, 0x2a, 0x82, 0x07, 0x03, b'a', b'b', b'c'];
    for rpc in [Rpc::KeyStatus, Rpc::KeyReport] {
        c.0.push(Case {
            rpc,
            what: "unknown fields".into(),
            body: unknown_fields.clone(),
            want: Want::Ok,
        });
    }

    // AdminService.QueryAudit
    let r = Rpc::QueryAudit;
    let m = pb::QueryAuditRequest {
        page_size: 1,
        ..Default::default()
    };
    let set = |m: &mut pb::QueryAuditRequest, v| m.outcome = Some(v);
    c.numbers(r, &m, "outcome", set, [0, 42], Invalid("outcome"));
    let set = |m: &mut pb::QueryAuditRequest, v| m.page_size = v;
    c.numbers(
        r,
        &m,
        "page_size",
        set,
        [-1, i32::MIN],
        Invalid("page_size"),
    );
    c.numbers(r, &m, "page_size (clamped)", set, [i32::MAX], Want::Ok);
    c.text(
        r,
        &m,
        "page_token",
        |m, v| m.page_token = v,
        bad_tokens(),
        Invalid("page_token"),
    );
    let set = |m: &mut pb::QueryAuditRequest, v| m.after_seq = Some(v);
    c.numbers(r, &m, "after_seq", set, [u64::MAX], Want::Ok);
    // Any time is a valid bound, even one RFC 3339 cannot write; only an
    // empty range the wrong way round is refused.
    let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let set = |m: &mut pb::QueryAuditRequest, (since, until)| (m.since, m.until) = (since, until);
    let times = [(
        "after until".to_owned(),
        (at(2_000_000_000, 0), at(1_000_000_000, 0)),
    )];
    c.each(r, &m, "since", set, times, Invalid("since"));
    let times = [
        ("before the epoch", (at(-1, 0), None)),
        ("i64::MIN", (at(i64::MIN, i32::MIN), None)),
        ("after year 9999", (None, at(300_000_000_000, 0))),
        ("i64::MAX", (None, at(i64::MAX, i32::MAX))),
        (
            "with nanos out of range",
            (at(1_000_000_000, -5), at(1_000_000_001, 2_000_000_000)),
        ),
    ];
    c.each(
        r,
        &m,
        "since/until",
        set,
        times.map(|(w, v)| (w.to_owned(), v)),
        Want::Ok,
    );
    // Exact-match filters: a value beyond the limit, or with a control
    // character (PostgreSQL refuses NUL in text), is refused.
    for (field, set) in [
        (
            "actor",
            (|m: &mut pb::QueryAuditRequest, v| m.actor = Some(v)) as fn(&mut _, _),
        ),
        ("action", |m, v| m.action = Some(v)),
        ("target", |m, v| m.target = Some(v)),
    ] {
        c.text(r, &m, field, set, vec![("128 KiB", a(BIG))], Invalid(field));
        let controls = [("with NUL", "a\0b"), ("with a newline", "a\nb")];
        let controls = controls.map(|(w, v)| (w.to_owned(), v.to_owned()));
        c.each(r, &m, field, set, controls, Invalid(field));
    }

    // AdminService.VerifyAudit
    let r = Rpc::VerifyAudit;
    let m = pb::VerifyAuditRequest::default();
    let set = |m: &mut pb::VerifyAuditRequest, (from, to)| (m.from_seq, m.to_seq) = (from, to);
    c.numbers(
        r,
        &m,
        "from_seq/to_seq",
        set,
        [(Some(10), Some(2))],
        Invalid("from_seq"),
    );
    let valid = [(Some(u64::MAX), None), (Some(0), Some(u64::MAX))];
    c.numbers(r, &m, "from_seq/to_seq", set, valid, Want::Ok);

    c.0
}

/// Random request bodies for every RPC, each with the verdict the fuzzing
/// module gives it; a body that would pass validation is never sent (it could
/// change something, e.g. start a key rotation).
fn garbage_bodies(rng: &mut Rng) -> Vec<(Rpc, Vec<u8>, Verdict)> {
    let mut out = Vec::new();
    for rpc in Rpc::ALL {
        for len in [1, 7, 64, 4096] {
            let body = rng.bytes(len);
            let verdict = fuzzing::grpc_request(rpc, &body);
            if verdict != Verdict::Accepted {
                out.push((rpc, body, verdict));
            }
        }
        // A length-delimited field 1 whose length runs past the end.
        let body = vec![0x0a, 0x7f, 1, 2, 3];
        let verdict = fuzzing::grpc_request(rpc, &body);
        if verdict != Verdict::Accepted {
            out.push((rpc, body, verdict));
        }
    }
    out
}

/// Whether a status is the clear refusal of a body that is not a message:
/// INVALID_ARGUMENT saying it failed to decode.
pub(crate) fn refuses_undecodable(s: &Status) -> bool {
    s.code() == Code::InvalidArgument && s.message().contains("failed to decode Protobuf message")
}

fn short(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Internal => "INTERNAL",
        Code::Unknown => "UNKNOWN",
        Code::Unavailable => "UNAVAILABLE",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "other",
    }
}

/// What is wrong with the rich error details of the refusal `s`, if
/// anything. Every refusal carries a `google.rpc.ErrorInfo` whose domain is
/// `tokenvault` and whose reason is one of `ErrorReason` (which the README's
/// "Error reasons" table lists, a unit test keeps the two equal) — `want`,
/// when the case decides which. An INVALID_ARGUMENT about a field
/// (`FIELD_*`) also carries a `google.rpc.BadRequest` with one violation
/// naming the field its message names; any other INVALID_ARGUMENT is a
/// refusal of the whole request (`REQUEST_TOO_LARGE`, `REQUEST_MALFORMED`).
pub(crate) fn rich_error_problem(s: &Status, want: Option<ErrorReason>) -> Option<String> {
    let Some(info) = s.get_details_error_info() else {
        return Some(format!("{} without an ErrorInfo", short(s.code())));
    };
    if info.domain != "tokenvault" {
        return Some(format!("ErrorInfo of the domain {:?}", info.domain));
    }
    let Some(reason) = ErrorReason::parse(&info.reason) else {
        return Some(format!("undocumented reason {:?}", info.reason));
    };
    if let Some(want) = want.filter(|w| *w != reason) {
        return Some(format!("reason {reason:?}, not {want:?}"));
    }
    let field_reason = matches!(
        reason,
        ErrorReason::FieldMissing | ErrorReason::FieldInvalid | ErrorReason::FieldTooLong
    );
    let whole_request = matches!(
        reason,
        ErrorReason::RequestTooLarge | ErrorReason::RequestMalformed
    );
    // These reasons, and only these, come with INVALID_ARGUMENT.
    if (s.code() == Code::InvalidArgument) != (field_reason || whole_request) {
        return Some(format!(
            "reason {} with the code {}",
            info.reason,
            short(s.code())
        ));
    }
    let bad_request = s.get_details_bad_request();
    if field_reason {
        let named = bad_request.as_ref().is_some_and(|b| {
            b.field_violations.len() == 1
                && s.message()
                    .starts_with(&format!("invalid {}: ", b.field_violations[0].field))
                && info.metadata.get("field") == Some(&b.field_violations[0].field)
        });
        if !named {
            return Some(format!(
                "{} without a BadRequest naming its field: {bad_request:?}",
                info.reason
            ));
        }
    } else if bad_request.is_some() {
        return Some(format!("a BadRequest with {}", info.reason));
    }
    None
}

/// Whether `got` is the answer `want` asks for.
fn answers(want: Want, got: &Result<(), Status>) -> bool {
    match (want, got) {
        (Want::Ok, Ok(())) => true,
        (Want::Invalid(field) | Want::InvalidStored(field), Err(s)) => {
            s.code() == Code::InvalidArgument && s.message().contains(field)
        }
        (Want::NotFound, Err(s)) => s.code() == Code::NotFound,
        (Want::OutOfRange, Err(s)) => s.code() == Code::OutOfRange,
        (Want::TooLarge, Err(s)) => {
            s.code() == Code::InvalidArgument && s.message().contains("too large")
        }
        _ => false,
    }
}

/// Compares two snapshots; a line per changed table.
pub(crate) fn snapshot_diff(
    before: &BTreeMap<String, Vec<String>>,
    after: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for table in before.keys().chain(after.keys()) {
        let (b, a) = (before.get(table), after.get(table));
        if b != a
            && !out
                .iter()
                .any(|l: &String| l.starts_with(&format!("{table}:")))
        {
            let b = b.cloned().unwrap_or_default();
            let a = a.cloned().unwrap_or_default();
            let added: Vec<&String> = a.iter().filter(|r| !b.contains(r)).collect();
            let removed: Vec<&String> = b.iter().filter(|r| !a.contains(r)).collect();
            out.push(format!(
                "{table}: {} -> {} rows; added {:.600?}; removed {:.600?}",
                b.len(),
                a.len(),
                added,
                removed
            ));
        }
    }
    out
}

/// A vault wired to a fresh Google simulator (also its RISC keys), with one
/// live calendar connection.
pub(crate) async fn vault_with_google(backend: Backend) -> Option<(TestVault, GoogleSim, Fixture)> {
    let sim = start_google().await;
    let tv = spawn_vault_with(backend, |c| {
        use_google(c, &sim);
        c.risc.jwks_uri = sim.jwks_uri();
        c.risc.issuer = sim.risc_issuer();
        // The replica's heartbeat (`key_replicas.seen_at`) is the vault's own
        // liveness record, not a change a call made: these tests compare
        // every table before and after a refused call, so it must not fall
        // between the two snapshots.
        c.keyring.heartbeat_seconds = 3_600;
    })
    .await?;
    let conn = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        "ya29.malformed-access",
        Some("1//malformed-refresh"),
    )
    .await
    .id
    .to_string();
    Some((tv, sim, Fixture { conn }))
}

/// After the abuse: the audit chain verifies, health says SERVING and a real
/// lease is granted.
pub(crate) async fn still_serving(tv: &TestVault, fx: &Fixture) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let verified = tv
        .admin(As::Auditor)
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .expect("VerifyAudit")
        .into_inner();
    assert!(
        verified.ok && verified.entries_checked > 0,
        "the audit chain no longer verifies: {verified:?}"
    );
    let health = HealthClient::new(tv.channel.clone())
        .check(HealthCheckRequest {
            service: "tokenvault.v1.LeaseService".into(),
        })
        .await
        .expect("Health/Check")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    let lease = tv
        .leases(As::Worker)
        .lease_token(pb::LeaseTokenRequest {
            connection_id: fx.conn.clone(),
            purpose: "calendar_sync".into(),
            scopes: vec![CALENDAR_SCOPE.into()],
            min_valid_seconds: 0,
        })
        .await
        .expect("a real lease after the malformed input")
        .into_inner();
    assert_eq!(lease.access_token, "ya29.malformed-access");
    let http = reqwest::get(format!("http://{}/healthz", tv.http_addr))
        .await
        .expect("GET /healthz");
    assert_eq!(http.status().as_u16(), 200);
}

async fn every_rpc_refuses_malformed_input(backend: Backend) {
    watched(format!("rpc-{backend:?}"), async move {
        let Some((tv, _sim, fx)) = vault_with_google(backend).await else {
            return;
        };
        let raw = RawDb::open(&tv).await;
        let before = raw.snapshot(&AUDIT_TABLES).await;
        let started = Instant::now();

        let cases = cases(&fx);
        let covered: std::collections::HashSet<Rpc> = cases.iter().map(|c| c.rpc).collect();
        let uncovered: Vec<Rpc> = Rpc::ALL
            .into_iter()
            .filter(|r| !covered.contains(r) && *r != Rpc::RotateKeys)
            .collect();
        assert!(
            uncovered.is_empty(),
            "RPCs without a malformed case: {uncovered:?}"
        );

        let mut failures = Vec::new();
        let mut table: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        // How often each ErrorInfo reason was answered, for the summary.
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for case in &cases {
            let got = call(&tv, case.rpc, case.body.clone()).await;
            let code = got.as_ref().err().map_or(Code::Ok, Status::code);
            let name = case
                .rpc
                .path()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            *table.entry((name.clone(), short(code))).or_default() += 1;
            let message = got
                .as_ref()
                .err()
                .map(|s| s.message().to_owned())
                .unwrap_or_default();
            if !answers(case.want, &got) {
                failures.push(format!(
                    "{name} {}: want {:?}, got {} ({:.200})",
                    case.what,
                    case.want,
                    short(code),
                    message
                ));
            }
            if let Err(s) = &got {
                let want = (case.want == Want::TooLarge).then_some(ErrorReason::RequestTooLarge);
                if let Some(problem) = rich_error_problem(s, want) {
                    failures.push(format!(
                        "{name} {}: {problem} ({:.200})",
                        case.what, message
                    ));
                }
                if let Some(info) = s.get_details_error_info() {
                    *reasons.entry(info.reason).or_default() += 1;
                }
            }
            // The fuzzing module must predict every refusal of a request
            // the server decoded, word for word.
            if case.want != Want::TooLarge {
                let predicted = fuzzing::grpc_request(case.rpc, &case.body);
                let agrees = match (&predicted, &got) {
                    (Verdict::Rejected(m), Err(s)) => {
                        s.code() == Code::InvalidArgument && s.message() == m
                    }
                    (Verdict::Accepted, Err(s)) => {
                        s.code() != Code::InvalidArgument
                            || matches!(case.want, Want::InvalidStored(_))
                    }
                    (Verdict::Accepted, Ok(())) => true,
                    _ => false,
                };
                if !agrees {
                    failures.push(format!(
                        "{name} {}: tokenvault::fuzzing predicts {predicted:?}, the server \
                         answered {} ({:.200})",
                        case.what,
                        short(code),
                        message
                    ));
                }
            }
        }

        // Bodies that are not messages, behind a correct length prefix.
        let mut rng = Rng::new(0x5eed_0fba_d0b0_d1e5);
        let garbage = garbage_bodies(&mut rng);
        for (rpc, body, verdict) in &garbage {
            let got = call(&tv, *rpc, body.clone()).await;
            let ok = match (verdict, &got) {
                (Verdict::Undecodable(_), Err(s)) => refuses_undecodable(s),
                (Verdict::Rejected(m), Err(s)) => {
                    s.code() == Code::InvalidArgument && s.message() == m
                }
                _ => false,
            };
            let name = rpc.path().rsplit('.').next().unwrap_or_default().to_owned();
            let code = got.as_ref().err().map_or(Code::Ok, Status::code);
            *table
                .entry((format!("{name} (garbage body)"), short(code)))
                .or_default() += 1;
            if !ok {
                failures.push(format!(
                    "{name} with a {}-byte garbage body ({verdict:?}): got {got:?}",
                    body.len()
                ));
            }
            if let Err(s) = &got {
                let want = matches!(verdict, Verdict::Undecodable(_))
                    .then_some(ErrorReason::RequestMalformed);
                if let Some(problem) = rich_error_problem(s, want) {
                    failures.push(format!(
                        "{name} with a {}-byte garbage body: {problem} ({:.200})",
                        body.len(),
                        s.message()
                    ));
                }
                if let Some(info) = s.get_details_error_info() {
                    *reasons.entry(info.reason).or_default() += 1;
                }
            }
        }
        let elapsed = started.elapsed();

        let after = raw.snapshot(&AUDIT_TABLES).await;
        let changed = snapshot_diff(&before, &after);
        raw.close().await;
        let mut summary = String::new();
        for ((rpc, code), n) in &table {
            let _ = writeln!(summary, "  {rpc:<42} {code:<18} x{n}");
        }
        let _ = writeln!(summary, "  ErrorInfo reasons:");
        for (reason, n) in &reasons {
            let _ = writeln!(summary, "    {reason:<40} x{n}");
        }
        println!(
            "malformed RPC input ({backend:?}): {} cases and {} garbage bodies \
             in {elapsed:.1?}\n{summary}",
            cases.len(),
            garbage.len()
        );
        assert!(
            failures.is_empty(),
            "{} of {} malformed calls were not answered as they should be:\n{}",
            failures.len(),
            cases.len() + garbage.len(),
            failures.join("\n")
        );
        assert!(
            changed.is_empty(),
            "malformed calls changed the database:\n{}",
            changed.join("\n")
        );
        still_serving(&tv, &fx).await;
    })
    .await;
}
both_backends!(rpc_inputs, every_rpc_refuses_malformed_input);

// ---------------------------------------------------------------------------
// Raw bytes on the gRPC port
// ---------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, mut value: usize, n: u32) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, no Huffman coding.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_int(&mut out, name.len(), 7);
        out.extend(name.as_bytes());
        hpack_int(&mut out, value.len(), 7);
        out.extend(value.as_bytes());
    }
    out
}

/// The request headers of a LeaseToken call by the calendar worker.
fn lease_headers(addr: SocketAddr) -> Vec<u8> {
    let authority = addr.to_string();
    let bearer = format!("Bearer {}", As::Worker.key());
    hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", Rpc::LeaseToken.path()),
        (":authority", &authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", &bearer),
    ])
}

/// What the server did with a raw connection.
#[derive(Debug, Default)]
struct Exchange {
    /// Frames received: (type, flags, stream).
    frames: Vec<(u8, u8, u32)>,
    /// Bytes received that are not HTTP/2 frames (after an HTTP/1 answer).
    other: Vec<u8>,
    /// The server closed the connection.
    closed: bool,
}

impl Exchange {
    fn goaway(&self) -> bool {
        self.frames.iter().any(|f| f.0 == GOAWAY)
    }

    /// The server answered stream 1 (response headers or a reset).
    fn answered_stream_1(&self) -> bool {
        self.frames
            .iter()
            .any(|&(kind, _, stream)| stream == 1 && (kind == HEADERS || kind == RST_STREAM))
    }
}

/// Writes `bytes` to the gRPC port (then half-closes if asked) and reads what
/// comes back until the server closes, sends GOAWAY or answers stream 1, or
/// `wait` passes. Acknowledges the server's SETTINGS, as a client must.
async fn h2_exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, wait: Duration) -> Exchange {
    let mut ex = Exchange::default();
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the gRPC port");
    // The server may hang up before reading everything: that is an answer too.
    let _ = s.write_all(bytes).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Err(_) | Ok(0)) => {
                ex.closed = true;
                break;
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if len > 1 << 20 {
                ex.other.append(&mut buf);
                break;
            }
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            buf.drain(..9 + len);
            ex.frames.push((kind, flags, stream));
            if kind == SETTINGS && flags & 0x1 == 0 && !half_close {
                let _ = s.write_all(&frame(SETTINGS, 0x1, 0, &[])).await;
            }
        }
        if ex.goaway() || ex.answered_stream_1() {
            break;
        }
    }
    ex
}

/// A gRPC message: the 5-byte prefix (compressed flag, declared length) and a body.
fn grpc_message(compressed: u8, declared: u32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![compressed];
    m.extend(declared.to_be_bytes());
    m.extend(body);
    m
}

async fn grpc_port_survives_garbage(tv: &TestVault, rng: &mut Rng) -> Vec<String> {
    let addr = tv.grpc_addr;
    let wait = Duration::from_secs(5);
    let mut failures = Vec::new();
    let mut report = |what: &str, ok: bool, ex: &Exchange| {
        println!(
            "gRPC port, {what}: closed={} goaway={} answered={} frames={:?}",
            ex.closed,
            ex.goaway(),
            ex.answered_stream_1(),
            ex.frames
        );
        if !ok {
            failures.push(format!("gRPC port, {what}: {ex:?}"));
        }
    };

    let garbage = rng.bytes(4096);
    let ex = h2_exchange(addr, &garbage, false, wait).await;
    report("4 KiB of random bytes", ex.closed || ex.goaway(), &ex);

    let ex = h2_exchange(addr, &PREFACE[..10], true, wait).await;
    report("a truncated preface, then EOF", ex.closed, &ex);

    let ex = h2_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, wait).await;
    report("an HTTP/1.1 request", ex.closed || ex.goaway(), &ex);

    let mut bytes = PREFACE.to_vec();
    bytes.extend(rng.bytes(2048));
    let ex = h2_exchange(addr, &bytes, false, wait).await;
    report(
        "a preface, then random bytes",
        ex.closed || ex.goaway(),
        &ex,
    );

    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &rng.bytes(200)));
    let ex = h2_exchange(addr, &bytes, false, wait).await;
    report(
        "HEADERS with a garbage header block",
        ex.closed || ex.goaway() || ex.answered_stream_1(),
        &ex,
    );

    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(0x42, 0xff, 7, &rng.bytes(32)));
    bytes.extend(frame(DATA, END_STREAM, 99, &rng.bytes(32)));
    let ex = h2_exchange(addr, &bytes, false, wait).await;
    report(
        "an unknown frame type, then DATA on an idle stream",
        ex.closed || ex.goaway(),
        &ex,
    );

    // Well-formed HTTP/2 carrying a broken gRPC message.
    for (what, message) in [
        (
            "a length prefix longer than the body",
            grpc_message(0, 100, b"abc"),
        ),
        ("a 3-byte length prefix", vec![0, 0, 0]),
        (
            "the compressed flag without grpc-encoding",
            grpc_message(1, 3, b"abc"),
        ),
        (
            "a declared length of 4 GiB",
            grpc_message(0, u32::MAX, b"abc"),
        ),
        ("a compressed flag of 7", grpc_message(7, 3, b"abc")),
        (
            "two messages in a unary call",
            [grpc_message(0, 0, b""), grpc_message(0, 0, b"")].concat(),
        ),
    ] {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[]));
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &lease_headers(addr)));
        bytes.extend(frame(DATA, END_STREAM, 1, &message));
        let ex = h2_exchange(addr, &bytes, false, wait).await;
        report(what, ex.answered_stream_1() || ex.goaway(), &ex);
    }
    failures
}

// ---------------------------------------------------------------------------
// Garbage on the HTTP port
// ---------------------------------------------------------------------------

/// The status line's code of a raw HTTP/1 answer, if there was one.
fn status_code(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    let line = text.lines().next()?;
    line.strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()
}

/// Writes `bytes` to the HTTP port, half-closes, and reads the answer until
/// the server closes or `CALL_TIMEOUT` passes: (status code, closed).
async fn http_raw(addr: SocketAddr, bytes: &[u8]) -> (Option<u16>, bool) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP port");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(CALL_TIMEOUT, s.read_to_end(&mut answer))
        .await
        .is_ok();
    (status_code(&answer), closed)
}

async fn http_port_survives_garbage(tv: &TestVault, sim: &GoogleSim, rng: &mut Rng) -> Vec<String> {
    // A connection per request: the server may hang up after refusing one
    // (413, 431), and a pooled connection would race that.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let base = format!("http://{}", tv.http_addr);
    let mut failures = Vec::new();
    // `allowed` lists the acceptable codes; 0 stands for "connection closed
    // without an answer".
    let mut check = |what: &str, got: Option<u16>, allowed: &[u16]| {
        println!("HTTP port, {what}: {got:?}");
        if !allowed.contains(&got.unwrap_or(0)) {
            failures.push(format!(
                "HTTP port, {what}: got {got:?}, want one of {allowed:?}"
            ));
        }
    };

    // POST /risc: bodies that are not Security Event Tokens.
    let now = tokenvault::domain::Timestamp::now().seconds_nanos().0;
    let claims = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({
            "iss": sim.risc_issuer(),
            "aud": CLIENT_ID,
            "iat": now,
            "jti": "malformed-jti",
            "events": {"https://schemas.openid.net/secevent/risc/event-type/tokens-revoked":
                {"subject": {"subject_type": "iss-sub", "iss": sim.risc_issuer(), "sub": "123"}}},
        });
        edit(&mut c);
        sim.sign_claims(c).into_bytes()
    };
    let remove = |c: &mut serde_json::Value, key: &str| {
        if let Some(o) = c.as_object_mut() {
            o.remove(key);
        }
    };
    let mut random = rng.bytes(1024);
    random[0] = 0xff;
    let risc_bodies: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("empty", Vec::new(), &[400]),
        ("random bytes (not UTF-8)", random, &[400]),
        ("three dots", b"...".to_vec(), &[400]),
        ("four parts", b"a.b.c.d".to_vec(), &[400]),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
                URL_SAFE_NO_PAD.encode("{}")
            )
            .into_bytes(),
            &[400],
        ),
        (
            "RS256 without kid",
            format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#)).into_bytes(),
            &[400],
        ),
        (
            "an unknown kid and a signature that is not base64",
            format!(
                "{}.e30.%%%",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"nope"}"#)
            )
            .into_bytes(),
            &[400],
        ),
        (
            "one byte too long",
            a(MAX_RISC_BODY_BYTES + 1).into_bytes(),
            &[400],
        ),
        ("1 MiB", a(MIB).into_bytes(), &[400]),
        ("3 MiB", a(3 * MIB).into_bytes(), &[400, 413]),
        (
            "signed, no events",
            claims(&|c| remove(c, "events")),
            &[400],
        ),
        (
            "signed, events not an object",
            claims(&|c| c["events"] = serde_json::json!([1, 2])),
            &[400],
        ),
        (
            "signed, empty events",
            claims(&|c| c["events"] = serde_json::json!({})),
            &[400],
        ),
        ("signed, no jti", claims(&|c| remove(c, "jti")), &[400]),
        (
            "signed, 10 KiB jti",
            claims(&|c| c["jti"] = a(KIB10).into()),
            &[400],
        ),
        (
            "signed, jti with a space",
            claims(&|c| c["jti"] = "a b".into()),
            &[400],
        ),
        (
            "signed, iat a string",
            claims(&|c| c["iat"] = "now".into()),
            &[400],
        ),
        (
            "signed, iat in a year",
            claims(&|c| c["iat"] = (now + 31_536_000).into()),
            &[400],
        ),
        (
            "signed, iat i64::MIN",
            claims(&|c| c["iat"] = i64::MIN.into()),
            &[400],
        ),
        (
            "signed, iat u64::MAX",
            claims(&|c| c["iat"] = u64::MAX.into()),
            &[400],
        ),
        (
            "signed, aud a number",
            claims(&|c| c["aud"] = 7.into()),
            &[400],
        ),
        (
            "signed, iss wrong",
            claims(&|c| c["iss"] = "https://evil.example".into()),
            &[400],
        ),
    ];
    for (what, body, allowed) in risc_bodies {
        let got = http
            .post(format!("{base}/risc"))
            .header("content-type", "application/secevent+jwt")
            .body(body)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        check(&format!("POST /risc {what}"), got, allowed);
    }

    // GET /oauth/callback: missing, oversized and badly encoded parameters.
    let queries: Vec<(&str, String, &[u16])> = vec![
        ("no query", String::new(), &[400]),
        ("an empty state", "state=&code=x".into(), &[400]),
        ("no state", "code=abc".into(), &[400]),
        ("no code and no error", "state=abc".into(), &[400]),
        (
            "a 600-byte state",
            format!("state={}&code=x", a(600)),
            &[400],
        ),
        (
            "a 10 KiB code",
            format!("state=abc&code={}", a(KIB10)),
            &[400],
        ),
        (
            "invalid UTF-8 escapes",
            "state=%ff%fe%fd&code=%c3%28".into(),
            &[400],
        ),
        ("broken escapes", "state=%zz%&code=%".into(), &[400]),
        ("NUL escapes", "%00=%00&state=%00&code=%00".into(), &[400]),
        (
            "repeated parameters",
            "state=a&state=b&code=x&code=y".into(),
            &[400],
        ),
        (
            "an error with a 10 KiB description",
            format!(
                "state=abc&error=access_denied&error_description={}",
                a(KIB10)
            ),
            &[400],
        ),
        ("only separators", "&&&===&&".into(), &[400]),
        // hyper caps the request head (about 400 KiB): 431, or a hang-up.
        (
            "a 1 MiB state",
            format!("state={}&code=x", a(MIB)),
            &[0, 400, 414, 431],
        ),
    ];
    for (what, query, allowed) in queries {
        let got = http
            .get(format!("{base}/oauth/callback?{query}"))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        check(&format!("GET /oauth/callback {what}"), got, allowed);
    }

    // Wrong routes and methods.
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/nope", &[404][..]),
        (reqwest::Method::GET, "/risc", &[405]),
        (reqwest::Method::POST, "/oauth/callback", &[405]),
        (reqwest::Method::DELETE, "/healthz", &[405]),
    ] {
        let got = http
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16());
        check(&format!("{method} {path}"), got, allowed);
    }

    // Raw bytes: hyper answers 4xx (505 for an unknown version) or hangs up.
    let mut random = rng.bytes(4096);
    random[0] = 0x01;
    let raw_requests: Vec<(&str, Vec<u8>, &[u16])> =
        vec![
        ("4 KiB of random bytes", random, &[0, 400]),
        ("an HTTP/2 preface", PREFACE.to_vec(), &[0, 400, 505]),
        (
            "raw invalid UTF-8 in the query",
            b"GET /oauth/callback?state=\xff\xfe&code=\xc3\x28 HTTP/1.1\r\n\
              Host: x\r\n\r\n"
                .to_vec(),
            &[0, 400],
        ),
        (
            "a header line without a colon",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_vec(),
            &[0, 400],
        ),
        (
            "a 100 KiB header",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", a(100 * 1024))
                .into_bytes(),
            &[0, 200, 400, 431],
        ),
        (
            "10,000 headers",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
                "X-A: b\r\n".repeat(10_000)
            )
            .into_bytes(),
            &[0, 400, 431],
        ),
        (
            "a bad chunk size",
            b"POST /risc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              zz\r\nabc\r\n0\r\n\r\n"
                .to_vec(),
            &[0, 400],
        ),
        (
            "a body shorter than its Content-Length",
            b"POST /risc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc".to_vec(),
            &[0, 400],
        ),
        (
            "a negative Content-Length",
            b"POST /risc HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
            &[0, 400],
        ),
        (
            "two different Content-Lengths",
            b"POST /risc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
                .to_vec(),
            &[0, 400],
        ),
        (
            "HTTP/9.9",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            &[0, 400, 505],
        ),
        (
            "a NUL in the path",
            b"GET /oauth/call\0back HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[0, 400],
        ),
    ];
    let mut kept_open = Vec::new();
    for (what, bytes, allowed) in raw_requests {
        let (got, closed) = http_raw(tv.http_addr, &bytes).await;
        check(&format!("raw {what}"), got, allowed);
        if !closed {
            kept_open.push(format!(
                "HTTP port, raw {what}: the server kept the connection open after EOF"
            ));
        }
    }
    failures.extend(kept_open);
    failures
}

async fn ports_survive_garbage(backend: Backend) {
    watched(format!("wire-{backend:?}"), async move {
        let Some((tv, sim, fx)) = vault_with_google(backend).await else {
            return;
        };
        let raw = RawDb::open(&tv).await;
        let before = raw.snapshot(&AUDIT_TABLES).await;
        let started = Instant::now();
        let mut rng = Rng::new(0x0ddb_17e5);
        let mut failures = grpc_port_survives_garbage(&tv, &mut rng).await;
        failures.extend(http_port_survives_garbage(&tv, &sim, &mut rng).await);
        println!(
            "garbage on both ports ({backend:?}) in {:.1?}",
            started.elapsed()
        );
        let after = raw.snapshot(&AUDIT_TABLES).await;
        raw.close().await;
        assert!(
            failures.is_empty(),
            "{} problem(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
        let changed = snapshot_diff(&before, &after);
        assert!(
            changed.is_empty(),
            "garbage changed the database:\n{}",
            changed.join("\n")
        );
        still_serving(&tv, &fx).await;
    })
    .await;
}
both_backends!(wire_garbage, ports_survive_garbage);

// ---------------------------------------------------------------------------
// The fuzzing entry points on stable
// ---------------------------------------------------------------------------

/// xorshift64: a tiny deterministic generator, enough to mutate inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `seed` with one to four random edits: bit flips, interesting bytes,
    /// insertions, deletions, truncation, duplication, splicing in `other`.
    fn mutate(&mut self, seed: &[u8], other: &[u8], interesting: &[&[u8]]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(8) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] = [0x00, 0x7f, 0x80, 0xff][self.below(4)];
                }
                2 => out.insert(at, self.next() as u8),
                3 if !out.is_empty() => {
                    out.remove(self.below(out.len()));
                }
                4 => out.truncate(at),
                5 => {
                    let end = (at + self.below(16)).min(out.len());
                    let piece = out[at..end].to_vec();
                    out.splice(at..at, piece);
                }
                6 if !other.is_empty() => {
                    let from = self.below(other.len());
                    let end = (from + self.below(32)).min(other.len());
                    out.splice(at..at, other[from..end].iter().copied());
                }
                _ => {
                    let piece = interesting[self.below(interesting.len())];
                    out.splice(at..at, piece.iter().copied());
                }
            }
        }
        out
    }
}

/// A valid request of every RPC (RotateKeys and KeyStatus have no fields).
pub(crate) fn valid_requests() -> Vec<(Rpc, Vec<u8>)> {
    let conn = format!("conn_{}", new_uuid());
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    vec![
        (
            Rpc::BeginAuthorization,
            pb::BeginAuthorizationRequest {
                tenant_id: "acme".into(),
                account_id: "alice".into(),
                integration: 1,
                login_hint: Some("alice@example.com".into()),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::CompleteAuthorization,
            pb::CompleteAuthorizationRequest {
                state: "s".repeat(43),
                outcome: Some(pb::complete_authorization_request::Outcome::Error(
                    pb::AuthorizationError {
                        error: "access_denied".into(),
                        error_description: "no".into(),
                    },
                )),
                tenant_id: "acme".into(),
                account_id: "alice".into(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::GetConnection,
            pb::GetConnectionRequest {
                connection_id: conn.clone(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::ListConnections,
            pb::ListConnectionsRequest {
                tenant_id: "acme".into(),
                account_id: Some("alice".into()),
                integration: Some(2),
                include_deleted: true,
                page_size: 5,
                page_token: String::new(),
                status: Some(pb::ConnectionStatus::RevokedUpstream as i32),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::Disconnect,
            pb::DisconnectRequest {
                connection_id: conn.clone(),
                reason: "user asked".into(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::DeleteAccount,
            pb::DeleteAccountRequest {
                tenant_id: "acme".into(),
                account_id: "alice".into(),
                reason: "gone".into(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::GetDeletionReceipt,
            pb::GetDeletionReceiptRequest {
                receipt_id: format!("rcpt_{}", new_uuid()),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::LeaseToken,
            pb::LeaseTokenRequest {
                connection_id: conn.clone(),
                purpose: "calendar_sync".into(),
                scopes: vec![CALENDAR_SCOPE.into(), "openid".into()],
                min_valid_seconds: 120,
            }
            .encode_to_vec(),
        ),
        (
            Rpc::ReleaseLease,
            pb::ReleaseLeaseRequest {
                lease_id: format!("lease_{}", new_uuid()),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::Watch,
            pb::WatchRequest {
                consumer: "calendar-sync".into(),
                after_cursor: Some(3),
                kinds: vec![1, 2, 6],
                integrations: vec![1],
            }
            .encode_to_vec(),
        ),
        (
            Rpc::Ack,
            pb::AckRequest {
                consumer: "calendar-sync".into(),
                cursor: 9,
            }
            .encode_to_vec(),
        ),
        (
            Rpc::AdminListConnections,
            pb::AdminServiceListConnectionsRequest {
                tenant_id: Some("acme".into()),
                account_id: None,
                integration: Some(1),
                status: Some(5),
                google_subject: Some("1234".into()),
                include_deleted: false,
                page_size: MAX_PAGE_SIZE,
                page_token: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::AdminGetConnection,
            pb::AdminServiceGetConnectionRequest {
                connection_id: conn.clone(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::RevokeConnection,
            pb::RevokeConnectionRequest {
                connection_id: conn,
                reason: "compromised".into(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::AdminDeleteAccount,
            pb::AdminServiceDeleteAccountRequest {
                tenant_id: "acme".into(),
                account_id: "bob".into(),
                reason: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::AdminGetDeletionReceipt,
            pb::AdminServiceGetDeletionReceiptRequest {
                receipt_id: format!("rcpt_{}", new_uuid()),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::ListDeletionReceipts,
            pb::ListDeletionReceiptsRequest {
                incomplete_only: true,
                overdue_only: true,
                tenant_id: Some("acme".into()),
                account_id: Some("alice".into()),
                page_size: 10,
                page_token: String::new(),
            }
            .encode_to_vec(),
        ),
        (Rpc::KeyStatus, Vec::new()),
        (Rpc::RotateKeys, Vec::new()),
        (
            Rpc::RetireKey,
            pb::RetireKeyRequest { version: 2 }.encode_to_vec(),
        ),
        (
            Rpc::DestroyKey,
            pb::DestroyKeyRequest { version: 1 }.encode_to_vec(),
        ),
        (Rpc::KeyReport, Vec::new()),
        (
            Rpc::QueryAudit,
            pb::QueryAuditRequest {
                actor: Some("test-admin".into()),
                action: Some("lease.".into()),
                target: Some("keys".into()),
                outcome: Some(2),
                since: at(1_000_000_000),
                until: at(2_000_000_000),
                after_seq: Some(5),
                newest_first: true,
                page_size: 50,
                page_token: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            Rpc::QueryAudit,
            pb::QueryAuditRequest {
                since: at(-86_400),
                until: at(i64::MAX),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            Rpc::VerifyAudit,
            pb::VerifyAuditRequest {
                from_seq: Some(1),
                to_seq: Some(100),
            }
            .encode_to_vec(),
        ),
    ]
}

#[test]
fn fuzzing_entry_points_survive_random_and_mutated_inputs() {
    let started = Instant::now();
    let mut rng = Rng::new(0x7e57_f022);
    let interesting: &[&[u8]] = &[
        &[0xff; 10],
        &[0x80],
        &[0x0a, 0xff, 0xff, 0xff, 0x0f],
        &[0x12, 0x00],
        &[0x08, 0x2a],
        &[
            0x38, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
        b"conn_",
        b"rcpt_",
        b"lease_",
    ];

    // gRPC requests: each valid seed passes.
    let seeds = valid_requests();
    let mut seen: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for (rpc, seed) in &seeds {
        let verdict = fuzzing::grpc_request(*rpc, seed);
        assert_eq!(verdict, Verdict::Accepted, "{rpc:?}: the valid seed");
    }
    for round in 0..20_000 {
        let (rpc, seed) = &seeds[round % seeds.len()];
        let (_, other) = &seeds[rng.below(seeds.len())];
        let input = if rng.below(5) == 0 {
            let n = rng.below(64);
            rng.bytes(n)
        } else {
            rng.mutate(seed, other, interesting)
        };
        let slot = match fuzzing::grpc_request(*rpc, &input) {
            Verdict::Undecodable(_) => 0,
            Verdict::Rejected(_) => 1,
            Verdict::Accepted => 2,
        };
        seen.entry(format!("{rpc:?}")).or_default()[slot] += 1;
        // Every RPC, as the fuzz target picks it from the first byte.
        let any = Rpc::ALL[rng.below(Rpc::ALL.len())];
        let _ = fuzzing::grpc_request(any, &input);
    }
    let mut totals = [0usize; 3];
    for (rpc, counts @ [undecodable, rejected, accepted]) in &seen {
        totals.iter_mut().zip(counts).for_each(|(t, n)| *t += n);
        assert!(
            *undecodable > 0 && rejected + accepted > 0,
            "{rpc}: mutations should be both undecodable and decodable, got {undecodable} \
             undecodable, {rejected} rejected, {accepted} accepted"
        );
    }
    assert!(
        totals.iter().all(|n| *n > 100),
        "mutations should reach every verdict often: {totals:?} (undecodable, rejected, accepted)"
    );

    // OAuth callback queries.
    let queries: [&[u8]; 4] = [
        b"state=Zm9vYmFy0123456789abcdefABCDEF-_xyz&code=4/0Ab-code&scope=openid%20email",
        b"state=abc&error=access_denied&error_description=The+user+said+no",
        b"code=x&state=%F0%9F%92%A9&state=again",
        b"",
    ];
    let interesting_q: &[&[u8]] = &[
        b"%",
        b"%ff",
        b"%c3%28",
        b"&",
        b"=",
        b"+",
        b"state=",
        b"code=",
        b"error=",
        b"%00",
        "\u{fffd}é".as_bytes(),
        b"#",
        b"?",
        b" ",
    ];
    let mut verdicts = [0usize; 3];
    for round in 0..5000 {
        let seed = queries[round % queries.len()];
        let other = queries[rng.below(queries.len())];
        let input = String::from_utf8_lossy(&rng.mutate(seed, other, interesting_q)).into_owned();
        verdicts[match fuzzing::oauth_callback_query(&input) {
            Verdict::Undecodable(_) => 0,
            Verdict::Rejected(_) => 1,
            Verdict::Accepted => 2,
        }] += 1;
    }
    assert_eq!(
        fuzzing::oauth_callback_query(std::str::from_utf8(queries[0]).unwrap()),
        Verdict::Accepted
    );
    assert!(
        verdicts.iter().all(|n| *n > 0),
        "callback mutations should reach every verdict: {verdicts:?}"
    );
    assert_eq!(
        fuzzing::oauth_callback_query(&format!("state={}&code=x", a(MAX_STATE_BYTES + 1))),
        Verdict::Rejected("invalid state: unknown, expired or already used".into())
    );

    // RISC bodies: a token that parses ends where Google's keys are needed.
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        r#"{"iss":"https://accounts.google.com/","aud":"x","iat":1,"jti":"j","events":{}}"#,
    );
    let token = format!(
        "{header}.{payload}.{}",
        URL_SAFE_NO_PAD.encode(rng.bytes(256))
    );
    assert_eq!(fuzzing::risc_body(token.as_bytes()), Verdict::Accepted);
    let tokens: [&[u8]; 3] = [token.as_bytes(), b"eyJhbGciOiJub25lIn0.e30.", b"a.b.c"];
    let interesting_t: &[&[u8]] = &[b".", b"=", b"eyJ", b"\xff", b" ", b"\n", b"AAAA"];
    let mut verdicts = [0usize; 3];
    for round in 0..5000 {
        let seed = tokens[round % tokens.len()];
        let other = tokens[rng.below(tokens.len())];
        let input = rng.mutate(seed, other, interesting_t);
        verdicts[match fuzzing::risc_body(&input) {
            Verdict::Undecodable(_) => 0,
            Verdict::Rejected(_) => 1,
            Verdict::Accepted => 2,
        }] += 1;
    }
    assert!(
        verdicts[1] > 0 && verdicts[2] > 0,
        "RISC mutations should be both refused and accepted: {verdicts:?}"
    );
    assert_eq!(
        fuzzing::risc_body(&vec![b'a'; MAX_RISC_BODY_BYTES + 1]),
        Verdict::Rejected("token too large".into())
    );
    println!("fuzzing smoke test: {:.1?}", started.elapsed());
}
