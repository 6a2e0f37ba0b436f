//! `tokenvault admin …` as an operator runs it: the built binary, as a child
//! process, against a running vault on each backend. Every command's normal
//! path (JSON parsed and checked, tables smoke-tested), the documented exit
//! statuses, audit-log tampering found through the binary, and mutual TLS
//! with certificates made at test time. Also what every command shares:
//! `--output json` in the tables' words on `admin`, `keys` and `dev`, one
//! audit entry per `audit tail --follow`, progress without control codes
//! when stderr is not a terminal, and `https://` without `--ca-cert`.
//!
//! Children run under `tokio::process` so that the in-process vault, on the
//! same runtime, keeps serving while a test waits for them.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokenvault::domain::Integration;
use tokenvault::proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::both_backends;
use crate::mtls::{Pki, uri};
use crate::support::raw::RawDb;
use crate::support::{
    As, Backend, CALENDAR_SCOPE, TestVault, seed_connection, spawn_vault, spawn_vault_with,
};

const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

/// What a finished child printed and how it exited.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// Asserts exit 0 and parses stdout as one JSON document.
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// Asserts exit 0 and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        &self.stdout
    }

    /// Asserts the exit status and the `tokenvault: ` prefix of the message.
    fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "{self:#?}");
        assert!(
            self.stderr.starts_with("tokenvault: ") || code == 2,
            "{self:#?}"
        );
        &self.stderr
    }
}

/// `tokenvault` with a clean client environment: no `TOKENVAULT_*`
/// variables and no client configuration file found by default.
fn tokenvault(tv: &TestVault) -> Command {
    let mut cmd = Command::new(BIN);
    let nowhere = tv.dir.path().join("no-config-home");
    cmd.env_remove("TOKENVAULT_CLI_SERVER")
        .env_remove("TOKENVAULT_CLI_API_KEY")
        .env_remove("TOKENVAULT_CLI_ADMIN_CONFIG")
        .env_remove("TOKENVAULT_CLI_OUTPUT")
        .env_remove("TOKENVAULT_CLI_CA_CERT")
        .env_remove("TOKENVAULT_CLI_CLIENT_CERT")
        .env_remove("TOKENVAULT_CLI_CLIENT_KEY")
        .env("XDG_CONFIG_HOME", &nowhere)
        .env("HOME", &nowhere)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(mut cmd: Command) -> Ran {
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the command finished within 30 s")
        .expect("run tokenvault");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tokenvault admin --server <vault> <args>` with `who`'s API key.
async fn admin(tv: &TestVault, who: As, args: &[&str]) -> Ran {
    let mut cmd = tokenvault(tv);
    cmd.env("TOKENVAULT_CLI_API_KEY", who.key())
        .arg("admin")
        .arg("--server")
        .arg(format!("http://{}", tv.grpc_addr))
        .args(args);
    finish(cmd).await
}

/// As [`admin`] with `--output json`, expecting success.
async fn admin_json(tv: &TestVault, who: As, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    admin(tv, who, &all).await.json()
}

/// The ids in a JSON list of connection details.
fn connection_ids(list: &Value) -> Vec<String> {
    list["connections"]
        .as_array()
        .expect("a connections array")
        .iter()
        .map(|d| {
            d["connection"]["connection_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// A well-formed vault id (`conn_…`, `rcpt_…`) that names nothing.
fn unknown_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4())
}

async fn connections_accounts_and_receipts(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let c1 = seed_connection(
        &tv.vault,
        "t1",
        "u1",
        Integration::Calendar,
        "a1",
        Some("r1"),
    )
    .await
    .id
    .to_string();
    let c2 = seed_connection(
        &tv.vault,
        "t1",
        "u2",
        Integration::Calendar,
        "a2",
        Some("r2"),
    )
    .await
    .id
    .to_string();
    let c3 = seed_connection(&tv.vault, "t2", "u3", Integration::Email, "a3", None)
        .await
        .id
        .to_string();

    // list, with each filter, and the limit.
    let all = admin_json(&tv, As::Admin, &["connections", "list"]).await;
    assert_eq!(
        connection_ids(&all),
        [c1.as_str(), c2.as_str(), c3.as_str()]
    );
    assert_eq!(all["more"], false);
    let t1 = admin_json(&tv, As::Admin, &["connections", "list", "--tenant", "t1"]).await;
    assert_eq!(connection_ids(&t1), [c1.as_str(), c2.as_str()]);
    let email = admin_json(
        &tv,
        As::Admin,
        &["connections", "list", "--integration", "email"],
    )
    .await;
    assert_eq!(connection_ids(&email), [c3.as_str()]);
    assert_eq!(
        email["connections"][0]["connection"]["integration"],
        "email"
    );
    let by_subject = admin_json(
        &tv,
        As::Admin,
        &["connections", "list", "--google-subject", "sub-t1-u2"],
    )
    .await;
    assert_eq!(connection_ids(&by_subject), [c2.as_str()]);
    let limited = admin_json(&tv, As::Admin, &["connections", "list", "--limit", "2"]).await;
    assert_eq!(connection_ids(&limited), [c1.as_str(), c2.as_str()]);
    assert_eq!(limited["more"], true);

    // The table: a header and one aligned row per connection.
    let table = admin(&tv, As::Admin, &["connections", "list"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 4, "{table:#?}");
    assert!(lines[0].starts_with("ID "), "{table:#?}");
    assert!(lines[0].contains("STATUS"), "{table:#?}");
    assert!(
        lines[1].starts_with(&c1) && lines[1].contains("active"),
        "{table:#?}"
    );
    let status_col = lines[0].find("STATUS").unwrap();
    assert!(lines[3][status_col..].starts_with("active"), "{table:#?}");

    // show
    let shown = admin_json(&tv, As::Admin, &["connections", "show", &c1]).await;
    assert_eq!(shown["connection"]["connection_id"], c1.as_str());
    assert_eq!(shown["connection"]["tenant_id"], "t1");
    assert_eq!(shown["connection"]["status"], "active");
    assert_eq!(shown["connection"]["google_email"], "u1@example.test");
    assert!(
        shown["connection"]["created_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(shown["kek_version"], 1);
    assert_eq!(shown["has_refresh_token"], true);
    assert_eq!(shown["open_leases"], 0);

    // revoke, then the receipt and the tombstone agree.
    let receipt = admin_json(
        &tv,
        As::Admin,
        &["connections", "revoke", &c1, "--reason", "cli test"],
    )
    .await;
    let rid = receipt["receipt_id"].as_str().unwrap().to_owned();
    assert!(rid.starts_with("rcpt_"), "{receipt}");
    assert_eq!(receipt["connection_ids"], serde_json::json!([c1]));
    assert_eq!(receipt["reason"], "admin_revoked");
    assert_eq!(receipt["reason_detail"], "cli test");
    assert_eq!(receipt["requested_by"], As::Admin.identity());
    assert!(receipt["tokens_destroyed_at"].is_string(), "{receipt}");
    let got = admin_json(&tv, As::Admin, &["receipts", "show", &rid]).await;
    assert_eq!(got["receipt_id"], rid.as_str());
    assert_eq!(got["connection_ids"], serde_json::json!([c1]));
    // Auditors read receipts too.
    let by_auditor = admin_json(&tv, As::Auditor, &["receipts", "show", &rid]).await;
    assert_eq!(by_auditor["receipt_id"], rid.as_str());
    let tomb = admin_json(&tv, As::Admin, &["connections", "show", &c1]).await;
    assert_eq!(tomb["connection"]["status"], "deleted");
    assert_eq!(tomb["connection"]["deletion_receipt_id"], rid.as_str());
    // No key: `null`, as the table's `-`.
    assert_eq!(tomb["kek_version"], Value::Null);
    let deleted = admin_json(
        &tv,
        As::Admin,
        &["connections", "list", "--status", "deleted"],
    )
    .await;
    assert_eq!(connection_ids(&deleted), [c1.as_str()]);
    let live = admin_json(&tv, As::Admin, &["connections", "list"]).await;
    assert_eq!(connection_ids(&live), [c2.as_str(), c3.as_str()]);
    let with_tombs = admin_json(
        &tv,
        As::Admin,
        &["connections", "list", "--include-deleted"],
    )
    .await;
    assert_eq!(connection_ids(&with_tombs).len(), 3);

    // accounts delete: refused without a terminal and without --yes…
    let refused = admin(
        &tv,
        As::Admin,
        &["accounts", "delete", "t1", "u2", "--reason", "gdpr"],
    )
    .await;
    let message = refused.fails(2);
    assert!(message.contains("--yes"), "{refused:#?}");
    assert!(refused.stdout.is_empty(), "{refused:#?}");
    let still = admin_json(&tv, As::Admin, &["connections", "show", &c2]).await;
    assert_eq!(still["connection"]["status"], "active");
    // …done with it.
    let account = admin_json(
        &tv,
        As::Admin,
        &[
            "accounts", "delete", "t1", "u2", "--reason", "gdpr", "--yes",
        ],
    )
    .await;
    assert_eq!(account["reason"], "account_deleted");
    assert_eq!(account["connection_ids"], serde_json::json!([c2]));
    assert_eq!(account["tenant_id"], "t1");
    assert_eq!(account["account_id"], "u2");
    let rid2 = account["receipt_id"].as_str().unwrap().to_owned();
    let gone = admin_json(&tv, As::Admin, &["connections", "show", &c2]).await;
    assert_eq!(gone["connection"]["status"], "deleted");

    // receipts list, with filters.
    let receipts = admin_json(&tv, As::Admin, &["receipts", "list"]).await;
    let ids: Vec<&str> = receipts["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["receipt_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [rid.as_str(), rid2.as_str()]);
    let one = admin_json(
        &tv,
        As::Auditor,
        &["receipts", "list", "--tenant", "t1", "--account", "u2"],
    )
    .await;
    assert_eq!(one["receipts"].as_array().unwrap().len(), 1);
    assert_eq!(one["receipts"][0]["receipt_id"], rid2.as_str());
    let overdue = admin_json(&tv, As::Admin, &["receipts", "list", "--overdue"]).await;
    assert_eq!(overdue["receipts"], serde_json::json!([]));
    let limited = admin_json(&tv, As::Admin, &["receipts", "list", "--limit", "1"]).await;
    assert_eq!(limited["receipts"].as_array().unwrap().len(), 1);
    assert_eq!(limited["more"], true);

    // Tables of receipts.
    let table = admin(&tv, As::Admin, &["receipts", "list"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{table:#?}");
    assert!(lines[0].starts_with("RECEIPT "), "{table:#?}");
    assert!(lines[1].starts_with(&rid) && lines[1].contains("admin_revoked"));
    let fields = admin(&tv, As::Admin, &["receipts", "show", &rid]).await;
    let text = fields.ok();
    assert!(
        text.lines()
            .any(|l| l.starts_with("receipt_id") && l.ends_with(&rid)),
        "{text}"
    );
    assert!(text.contains("admin_revoked"), "{text}");
}
both_backends!(
    connections_accounts_and_receipts_cli,
    connections_accounts_and_receipts
);

async fn documented_exit_statuses(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let id = seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "a", Some("r"))
        .await
        .id
        .to_string();
    let active = |v: Value| v["connection"]["status"] == "active";

    // 3: not found.
    let r = admin(
        &tv,
        As::Admin,
        &["connections", "show", &unknown_id("conn_")],
    )
    .await;
    assert!(r.fails(3).contains("NOT_FOUND"), "{r:#?}");
    let r = admin(
        &tv,
        As::Auditor,
        &["receipts", "show", &unknown_id("rcpt_")],
    )
    .await;
    assert!(r.fails(3).contains("NOT_FOUND"), "{r:#?}");

    // 4: the auditor may not revoke; an unknown key is nobody.
    let r = admin(
        &tv,
        As::Auditor,
        &["connections", "revoke", &id, "--reason", "nope"],
    )
    .await;
    assert!(r.fails(4).contains("PERMISSION_DENIED"), "{r:#?}");
    assert!(active(
        admin_json(&tv, As::Admin, &["connections", "show", &id]).await
    ));
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_API_KEY", "tv-not-a-key")
        .args(["admin", "--server", &format!("http://{}", tv.grpc_addr)])
        .args(["keys", "status"]);
    let r = finish(cmd).await;
    assert!(r.fails(4).contains("UNAUTHENTICATED"), "{r:#?}");
    let r = admin(&tv, As::Nobody, &["keys", "status"]).await;
    assert!(r.fails(4).contains("PERMISSION_DENIED"), "{r:#?}");

    // 2: clap's usage errors, the server's INVALID_ARGUMENT, a bad client config.
    let r = admin(&tv, As::Admin, &["connections", "revoke", &id]).await;
    assert!(r.fails(2).contains("--reason"), "{r:#?}");
    let r = admin(&tv, As::Admin, &["connections", "list", "--status", "gone"]).await;
    r.fails(2);
    let long = "x".repeat(2000);
    let r = admin(
        &tv,
        As::Admin,
        &["connections", "revoke", &id, "--reason", &long],
    )
    .await;
    assert!(r.fails(2).contains("INVALID_ARGUMENT"), "{r:#?}");
    assert!(
        !r.stderr.contains(&long),
        "the reason is echoed back: {r:#?}"
    );
    assert!(active(
        admin_json(&tv, As::Admin, &["connections", "show", &id]).await
    ));
    let r = admin(
        &tv,
        As::Admin,
        &["connections", "list", "--tenant", "not a tenant"],
    )
    .await;
    assert!(r.fails(2).contains("INVALID_ARGUMENT"), "{r:#?}");
    let missing = tv.dir.path().join("missing.toml");
    let r = admin(
        &tv,
        As::Admin,
        &[
            "--client-config",
            missing.to_str().unwrap(),
            "keys",
            "status",
        ],
    )
    .await;
    assert!(r.fails(2).contains("client config"), "{r:#?}");
    let r = admin(&tv, As::Admin, &["keys", "destroy", "v1"]).await;
    assert!(r.fails(2).contains("--yes"), "{r:#?}");

    // 1: FAILED_PRECONDITION (the primary cannot be retired).
    let r = admin(&tv, As::Admin, &["keys", "retire", "v1"]).await;
    assert!(r.fails(1).contains("FAILED_PRECONDITION"), "{r:#?}");

    // 5: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_API_KEY", As::Admin.key())
        .args(["admin", "--server", &format!("http://127.0.0.1:{port}")])
        .args(["--timeout", "5s", "keys", "status"]);
    let r = finish(cmd).await;
    assert!(r.fails(5).contains("cannot connect"), "{r:#?}");

    // Settings: a flag beats the environment, which beats the file; the
    // file can name the server and the key file.
    let key_file = tv.dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{}\n", As::Admin.key())).unwrap();
    let config = tv.dir.path().join("admin.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:{port}\"\napi_key_file = \"admin.key\"\ntimeout = \"5s\"\n"
        ),
    )
    .unwrap();
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_ADMIN_CONFIG", &config)
        .env("TOKENVAULT_CLI_SERVER", format!("http://{}", tv.grpc_addr))
        .args(["admin", "keys", "status", "--output", "json"]);
    let v = finish(cmd).await.json();
    assert_eq!(v["primary_version"], 1);
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_ADMIN_CONFIG", &config)
        .args(["admin", "keys", "status"]);
    finish(cmd).await.fails(5);
    std::fs::write(
        &config,
        format!(
            "server = \"http://{}\"\napi_key_file = \"admin.key\"\n",
            tv.grpc_addr
        ),
    )
    .unwrap();
    let mut cmd = tokenvault(&tv);
    cmd.args(["admin", "--client-config", config.to_str().unwrap()])
        .args(["keys", "status", "--output", "json"]);
    assert_eq!(finish(cmd).await.json()["primary_version"], 1);
    // The default file under $XDG_CONFIG_HOME.
    let xdg = tv.dir.path().join("no-config-home").join("tokenvault");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::write(
        xdg.join("admin.toml"),
        format!(
            "server = \"http://{}\"\napi_key_file = {:?}\n",
            tv.grpc_addr,
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = tokenvault(&tv);
    cmd.args(["admin", "keys", "status", "--output", "json"]);
    assert_eq!(finish(cmd).await.json()["primary_version"], 1);
}
both_backends!(exit_statuses_cli, documented_exit_statuses);

async fn key_lifecycle(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    for account in ["u1", "u2"] {
        seed_connection(&tv.vault, "t1", account, Integration::Calendar, "a", None).await;
    }
    let status = admin_json(&tv, As::Auditor, &["keys", "status"]).await;
    assert_eq!(status["provider"], "local");
    assert_eq!(status["primary_version"], 1);
    assert_eq!(status["versions"].as_array().unwrap().len(), 1);
    assert_eq!(status["versions"][0]["state"], "primary");
    assert_eq!(status["versions"][0]["dek_count"], 2);
    assert_eq!(status["rotation"], Value::Null);
    assert_eq!(status["rotation_overdue"], false);
    let table = admin(&tv, As::Auditor, &["keys", "status"]).await;
    let text = table.ok();
    assert!(
        text.lines()
            .any(|l| l.starts_with("provider") && l.ends_with("local")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("v1 ") && l.contains("primary")),
        "{text}"
    );

    // Progress on a stderr that is not a terminal: plain lines without
    // control codes, the first when the wait starts, the last saying how the
    // rotation ended; the result alone on stdout.
    let rotated = admin(
        &tv,
        As::Admin,
        &["keys", "rotate", "--wait", "--output", "json"],
    )
    .await;
    let run = rotated.json();
    assert!(
        !rotated.stderr.contains('\x1b') && !rotated.stderr.contains('\r'),
        "control codes in the progress: {rotated:#?}"
    );
    let progress: Vec<&str> = rotated.stderr.lines().collect();
    assert!(
        progress
            .first()
            .is_some_and(|l| l.starts_with("rotating to v2: ")),
        "{rotated:#?}"
    );
    let ended = "rotation to v2 completed: 2/2 wrapped keys (100%) in ";
    assert!(
        progress.last().is_some_and(|l| l.starts_with(ended)),
        "{rotated:#?}"
    );
    assert_eq!(run["state"], "completed", "{run}");
    assert_eq!(run["target_version"], 2);
    assert_eq!(run["total"], 2);
    assert_eq!(run["rewrapped"], 2);
    assert_eq!(run["started_by"], As::Admin.identity());
    assert!(run["finished_at"].is_string(), "{run}");

    let retired = admin_json(&tv, As::Admin, &["keys", "retire", "v1"]).await;
    assert_eq!(retired["version"], 1);
    assert_eq!(retired["state"], "retired");
    assert!(retired["retired_at"].is_string(), "{retired}");
    let destroyed = admin_json(&tv, As::Admin, &["keys", "destroy", "1", "--yes"]).await;
    assert_eq!(destroyed["version"], 1);
    assert_eq!(destroyed["state"], "destroyed");

    let report = admin_json(&tv, As::Auditor, &["keys", "report"]).await;
    assert_eq!(report["primary_version"], 2);
    let versions: Vec<(u64, &str)> = report["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(versions, [(1, "destroyed"), (2, "primary")]);
    assert_eq!(report["versions"][1]["dek_count"], 2);
    let rotations = report["rotations"].as_array().unwrap();
    assert_eq!(rotations.len(), 1, "{report}");
    assert_eq!(rotations[0]["run_id"], run["run_id"]);
    assert_eq!(report["policy_met"], true);
    assert!(report["generated_at"].is_string());
    let table = admin(&tv, As::Auditor, &["keys", "report"]).await;
    let text = table.ok();
    assert!(
        text.contains("destroyed") && text.contains("rotations:"),
        "{text}"
    );
}
both_backends!(keys_cli, key_lifecycle);

/// Reads one line of a child's stdout within `limit`.
async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    limit: Duration,
) -> Option<String> {
    tokio::time::timeout(limit, lines.next_line())
        .await
        .ok()
        .and_then(|r| r.expect("read the child's stdout"))
}

async fn audit_commands(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "a", None).await;
    admin(&tv, As::Nobody, &["keys", "status"]).await.fails(4);
    admin(&tv, As::Auditor, &["keys", "status"]).await.ok();

    // tail: the newest n, oldest first, the last being the tail's own call.
    let tail = admin_json(&tv, As::Auditor, &["audit", "tail", "-n", "3"]).await;
    let entries = tail["entries"].as_array().unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let last_seq = tail["last_seq"].as_u64().unwrap();
    assert_eq!(seqs, [last_seq - 2, last_seq - 1, last_seq], "{tail}");
    assert_eq!(entries[2]["action"], "admin.call");
    assert_eq!(entries[2]["detail"], "AdminService.QueryAudit");
    assert_eq!(entries[2]["actor"], As::Auditor.identity());
    assert_eq!(entries[2]["outcome"], "success");
    assert_eq!(entries[2]["entry_hash"].as_str().unwrap().len(), 64);
    assert_eq!(entries[2]["prev_hash"], entries[1]["entry_hash"]);
    let table = admin(&tv, As::Auditor, &["audit", "tail", "-n", "2"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{table:#?}");
    assert!(lines[0].starts_with("SEQ "), "{table:#?}");
    assert!(lines[2].contains("admin.call") && lines[2].contains("AdminService.QueryAudit"));

    // query, with filters.
    let denied = admin_json(&tv, As::Auditor, &["audit", "query", "--outcome", "denied"]).await;
    let denied = denied["entries"].as_array().unwrap().clone();
    assert!(!denied.is_empty());
    assert!(denied.iter().all(|e| e["outcome"] == "denied"));
    assert!(
        denied.iter().any(|e| e["actor"] == As::Nobody.identity()),
        "{denied:?}"
    );
    let mine = admin_json(
        &tv,
        As::Admin,
        &[
            "audit",
            "query",
            "--actor",
            As::Auditor.identity(),
            "--action",
            "admin.",
        ],
    )
    .await;
    let mine = mine["entries"].as_array().unwrap().clone();
    assert!(mine.len() >= 3, "{mine:?}");
    assert!(
        mine.iter()
            .all(|e| e["actor"] == As::Auditor.identity() && e["action"] == "admin.call")
    );
    let by_target = admin_json(&tv, As::Admin, &["audit", "query", "--target", "keys"]).await;
    assert!(!by_target["entries"].as_array().unwrap().is_empty());
    let future = admin_json(
        &tv,
        As::Admin,
        &["audit", "query", "--since", "2999-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!(future["entries"], serde_json::json!([]));
    let past = admin_json(
        &tv,
        As::Admin,
        &["audit", "query", "--until", "2000-01-01T00:00:00+02:00"],
    )
    .await;
    assert_eq!(past["entries"], serde_json::json!([]));
    let some = admin_json(
        &tv,
        As::Admin,
        &[
            "audit",
            "query",
            "--since",
            "2000-01-01T00:00:00Z",
            "--limit",
            "2",
        ],
    )
    .await;
    let some_seqs: Vec<u64> = some["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(some_seqs, [1, 2]);
    assert_eq!(some["more"], true);
    let newest = admin_json(
        &tv,
        As::Admin,
        &["audit", "query", "--newest-first", "--limit", "1"],
    )
    .await;
    assert_eq!(newest["entries"][0]["seq"], newest["last_seq"]);

    // export: every entry up to the newest at the start, as JSON Lines.
    let before = tv
        .admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .last_seq;
    let file = tv.dir.path().join("audit.jsonl");
    let summary = admin_json(
        &tv,
        As::Auditor,
        &["audit", "export", "--out", file.to_str().unwrap()],
    )
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    let exported: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    // The export's own first call is the last entry it includes.
    assert_eq!(exported.len() as u64, before + 1, "{summary}");
    assert_eq!(summary["entries"], exported.len());
    assert_eq!(summary["last_seq"], exported.len());
    for (i, e) in exported.iter().enumerate() {
        assert_eq!(e["seq"], i + 1);
    }
    let direct = tv
        .admin(As::Auditor)
        .query_audit(pb::QueryAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    for (line, entry) in exported.iter().zip(&direct) {
        assert_eq!(line["entry_hash"], hex::encode(&entry.entry_hash));
        assert_eq!(line["mac"], hex::encode(&entry.mac));
    }
    let to_stdout = admin(&tv, As::Auditor, &["audit", "export"]).await;
    assert!(to_stdout.ok().lines().count() > exported.len());

    // verify: the whole log, then a range.
    let verified = admin_json(&tv, As::Auditor, &["audit", "verify"]).await;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["first_broken_seq"], Value::Null);
    assert_eq!(verified["from_seq"], 1);
    assert_eq!(verified["entries_checked"], verified["to_seq"]);
    assert!(verified["entries_checked"].as_u64().unwrap() > exported.len() as u64);
    let range = admin_json(
        &tv,
        As::Auditor,
        &["audit", "verify", "--from", "2", "--to", "4"],
    )
    .await;
    assert_eq!(
        (
            &range["ok"],
            &range["entries_checked"],
            &range["from_seq"],
            &range["to_seq"]
        ),
        (
            &Value::from(true),
            &Value::from(3),
            &Value::from(2),
            &Value::from(4)
        )
    );
    let table = admin(&tv, As::Auditor, &["audit", "verify"]).await;
    assert!(table.ok().contains("entries checked:"), "{table:#?}");

    // tail --follow prints new entries as they are appended.
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_API_KEY", As::Auditor.key())
        .args(["admin", "--server", &format!("http://{}", tv.grpc_addr)])
        .args(["audit", "tail", "-n", "1", "--follow", "--output", "json"]);
    let mut child = cmd.spawn().expect("spawn audit tail --follow");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(
        &next_line(&mut lines, Duration::from_secs(10))
            .await
            .expect("the newest entry"),
    )
    .unwrap();
    // The newest entry when the stream opened is the follow's own.
    assert_eq!(first["detail"], "AdminService.FollowAudit");
    assert_eq!(first["outcome"], "success");
    // A call the vault audits with a target of our choosing (it is not found).
    let marker = unknown_id("conn_");
    let err = tv
        .admin(As::Admin)
        .get_connection(pb::AdminServiceGetConnectionRequest {
            connection_id: marker.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut seen = Vec::new();
    let found = loop {
        let Some(line) = next_line(&mut lines, Duration::from_secs(10)).await else {
            break false;
        };
        let entry: Value = serde_json::from_str(&line).expect("a JSON line per entry");
        seen.push(entry["seq"].as_u64().unwrap());
        if entry["target"] == marker.as_str() {
            break true;
        }
    };
    child.kill().await.unwrap();
    assert!(found, "the new entry never showed; saw {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "entries repeated or out of order");
    assert!(seen[0] > first["seq"].as_u64().unwrap());
}
both_backends!(audit_cli, audit_commands);

/// How the audit log is tampered with.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    Edit,
    Delete,
    Swap,
}

/// The statements that tamper with entry `seq` (and, swapping, `seq + 1`).
fn tamper_sql(how: Tamper, seq: u64) -> Vec<String> {
    match how {
        Tamper::Edit => vec![format!(
            "UPDATE audit_log SET detail = 'nothing to see here' WHERE seq = {seq}"
        )],
        Tamper::Delete => vec![format!("DELETE FROM audit_log WHERE seq = {seq}")],
        Tamper::Swap => vec![
            format!("UPDATE audit_log SET seq = -1 WHERE seq = {seq}"),
            format!("UPDATE audit_log SET seq = {seq} WHERE seq = {}", seq + 1),
            format!("UPDATE audit_log SET seq = {} WHERE seq = -1", seq + 1),
        ],
    }
}

async fn tampering_is_found_through_the_binary(backend: Backend) {
    const BROKEN: u64 = 3;
    for how in [Tamper::Edit, Tamper::Delete, Tamper::Swap] {
        let Some(tv) = spawn_vault(backend).await else {
            return;
        };
        seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "a", None).await;
        for _ in 0..5 {
            admin(&tv, As::Auditor, &["keys", "status"]).await.ok();
        }
        // Untouched, the log verifies, every entry counted.
        let clean = admin_json(&tv, As::Auditor, &["audit", "verify"]).await;
        assert_eq!(clean["ok"], true, "{how:?}: {clean}");
        let count = clean["entries_checked"].as_u64().unwrap();
        assert!(count > BROKEN + 2, "{how:?}: {clean}");
        assert_eq!(clean["to_seq"], count);

        let db = RawDb::open(&tv).await;
        for sql in tamper_sql(how, BROKEN) {
            db.execute(&sql).await;
        }
        db.close().await;

        let json = admin(&tv, As::Auditor, &["audit", "verify", "--output", "json"]).await;
        assert_eq!(json.code, 1, "{how:?}: {json:#?}");
        let v: Value = serde_json::from_str(&json.stdout).expect("JSON even when broken");
        assert_eq!(v["ok"], false, "{how:?}: {v}");
        assert_eq!(v["first_broken_seq"], BROKEN, "{how:?}: {v}");
        assert!(
            json.stderr
                .contains(&format!("first broken entry: {BROKEN}"))
        );

        let table = admin(&tv, As::Admin, &["audit", "verify"]).await;
        assert_eq!(table.code, 1, "{how:?}: {table:#?}");
        let line = table
            .stdout
            .lines()
            .find(|l| l.starts_with("first broken entry: "))
            .unwrap_or_else(|| panic!("{how:?}: {table:#?}"));
        assert!(
            line.starts_with(&format!("first broken entry: {BROKEN}: ")),
            "{line}"
        );
        // A range before the damage still verifies.
        let before = admin(
            &tv,
            As::Auditor,
            &["audit", "verify", "--to", &(BROKEN - 1).to_string()],
        )
        .await;
        before.ok();
    }
}
both_backends!(audit_tamper_cli, tampering_is_found_through_the_binary);

async fn admin_over_mutual_tls(backend: Backend) {
    const ADMIN_URI: &str = "spiffe://tokenvault.test/admin-cli";
    let pki = Pki::generate();
    let Some(tv) = spawn_vault_with(backend, |config| {
        pki.configure(config);
        config.policy.identities.insert(
            ADMIN_URI.to_owned(),
            tokenvault::policy::IdentityEntry {
                role: "admin".to_owned(),
                purposes: vec![],
                consumers: vec![],
                authenticate: None,
            },
        );
    })
    .await
    else {
        return;
    };
    let id = seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "a", None)
        .await
        .id
        .to_string();
    let admin_cert = pki.ca.client("admin-cli", vec![uri(ADMIN_URI)]);
    let dir = tv.dir.path();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = write("cli-ca.pem", &pki.ca.pem());
    let cert = write("cli-admin.pem", &admin_cert.cert);
    let key = write("cli-admin.key", &admin_cert.key);
    // The server certificate names localhost (and 127.0.0.1).
    let server = format!("https://localhost:{}", tv.grpc_addr.port());
    let tls_args = [
        "admin",
        "--server",
        &server,
        "--ca-cert",
        &ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
    ];

    let mut cmd = tokenvault(&tv);
    cmd.args(tls_args)
        .args(["connections", "show", &id, "--output", "json"]);
    let shown = finish(cmd).await.json();
    assert_eq!(shown["connection"]["connection_id"], id.as_str());

    // The vault saw the certificate's identity.
    let mut cmd = tokenvault(&tv);
    cmd.args(tls_args)
        .args(["audit", "tail", "-n", "1", "--output", "json"]);
    let tail = finish(cmd).await.json();
    assert_eq!(tail["entries"][0]["actor"], ADMIN_URI);
    assert_eq!(tail["entries"][0]["role"], "admin");

    // https:// without --ca-cert is not refused before connecting: the
    // client trusts the public roots built into it, which did not sign this
    // vault's certificate, and says so (exit 5: no connection was made).
    let mut cmd = tokenvault(&tv);
    cmd.args(["admin", "--server", &server])
        .args(["--client-cert", &cert, "--client-key", &key])
        .args(["keys", "status"]);
    let r = finish(cmd).await;
    let stderr = r.fails(5);
    assert!(
        stderr.contains("cannot connect to https://localhost:"),
        "{r:#?}"
    );
    assert!(stderr.contains("UnknownIssuer"), "{r:#?}");
    assert!(stderr.contains("pass --ca-cert"), "{r:#?}");
    assert!(r.stdout.is_empty(), "{r:#?}");
}
both_backends!(mtls_cli, admin_over_mutual_tls);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_help() {
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tokenvault"),
        ("fish", "complete -c tokenvault"),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(["completions", shell])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let r = finish(cmd).await;
        let script = r.ok();
        assert!(script.contains(needle), "{shell}: {r:#?}");
        assert!(
            script.contains("connections") && script.contains("rotate"),
            "{shell}"
        );
    }
    let mut cmd = Command::new(BIN);
    cmd.args(["completions", "tcsh"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    finish(cmd).await.fails(2);

    let mut cmd = Command::new(BIN);
    cmd.args(["admin", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = finish(cmd).await;
    let help = r.ok();
    for line in [
        "Exit status:",
        "  0  ok",
        "  2  usage",
        "  3  not found",
        "  4  permission denied",
        "  5  server unreachable",
    ] {
        assert!(help.contains(line), "{line:?} missing from:\n{help}");
    }
}

/// Every page of `AdminService.ListConnections` with `filter` at
/// `page_size`: the ids on each page.
async fn admin_pages(
    tv: &TestVault,
    filter: pb::AdminServiceListConnectionsRequest,
    page_size: i32,
) -> Vec<Vec<pb::ConnectionDetail>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = tv
            .admin(As::Admin)
            .list_connections(pb::AdminServiceListConnectionsRequest {
                page_size,
                page_token: token.clone(),
                ..filter.clone()
            })
            .await
            .expect("list connections")
            .into_inner();
        pages.push(page.connections);
        if page.next_page_token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 50, "pagination does not end");
        token = page.next_page_token;
    }
}

/// Filters are applied in the query: every page but the last is full, the
/// pages together hold exactly the matching connections, and each row's
/// detail (tokens' key version, refresh token, open leases, receipt) is
/// right.
async fn admin_list_filters_return_full_pages(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..30 {
        let c = seed_connection(
            &tv.vault,
            "pages",
            &format!("u{i:02}"),
            Integration::Calendar,
            &format!("ya29.page-{i}"),
            (i % 2 == 0).then_some("1//page-refresh"),
        )
        .await;
        ids.push(c.id.to_string());
    }
    // One Google account behind seven scattered connections.
    let shared: Vec<String> = [2, 5, 9, 13, 20, 24, 28]
        .iter()
        .map(|i| ids[*i].clone())
        .collect();
    let raw = RawDb::open(&tv).await;
    raw.execute(&format!(
        "UPDATE connections SET google_subject = 'sub-shared' WHERE connection_id IN ({})",
        shared
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",")
    ))
    .await;
    raw.close().await;
    tv.leases(As::Worker)
        .lease_token(pb::LeaseTokenRequest {
            connection_id: shared[0].clone(),
            purpose: "calendar_sync".into(),
            scopes: vec![crate::support::CALENDAR_SCOPE.into()],
            min_valid_seconds: 0,
        })
        .await
        .expect("lease");
    let mut deleted = Vec::new();
    for i in [1, 5, 17, 29] {
        let receipt = tv
            .connections(As::App)
            .disconnect(pb::DisconnectRequest {
                connection_id: ids[i].clone(),
                reason: String::new(),
            })
            .await
            .expect("disconnect")
            .into_inner()
            .receipt
            .unwrap();
        deleted.push((ids[i].clone(), receipt.receipt_id));
    }

    let check =
        |pages: &[Vec<pb::ConnectionDetail>], page_size: usize, want: &[String], what: &str| {
            for (n, page) in pages.iter().enumerate() {
                if n + 1 < pages.len() {
                    assert_eq!(
                        page.len(),
                        page_size,
                        "{what}: page {n} is short: {pages:?}"
                    );
                }
            }
            let mut got: Vec<String> = pages
                .iter()
                .flatten()
                .map(|d| d.connection.as_ref().unwrap().connection_id.clone())
                .collect();
            got.sort();
            let mut want = want.to_vec();
            want.sort();
            assert_eq!(got, want, "{what}");
        };

    // By Google account: six live ones (one of the seven was disconnected,
    // and tombstones forget their subject).
    let live_shared: Vec<String> = shared.iter().filter(|id| **id != ids[5]).cloned().collect();
    let by_subject = pb::AdminServiceListConnectionsRequest {
        google_subject: Some("sub-shared".into()),
        ..Default::default()
    };
    for size in [1, 2, 4, 5] {
        let pages = admin_pages(&tv, by_subject.clone(), size).await;
        check(
            &pages,
            size as usize,
            &live_shared,
            &format!("subject, page size {size}"),
        );
    }
    let details: Vec<pb::ConnectionDetail> = admin_pages(&tv, by_subject, 10)
        .await
        .into_iter()
        .flatten()
        .collect();
    for d in &details {
        let c = d.connection.as_ref().unwrap();
        let i = ids.iter().position(|id| *id == c.connection_id).unwrap();
        assert_eq!(d.kek_version, 1, "{d:?}");
        assert_eq!(d.has_refresh_token, i % 2 == 0, "{d:?}");
        assert_eq!(
            d.open_leases,
            u32::from(c.connection_id == shared[0]),
            "{d:?}"
        );
        assert!(c.token_expires_at.is_some(), "{d:?}");
    }

    // By status: the four tombstones, each naming its receipt and holding nothing.
    let tombstones = pb::AdminServiceListConnectionsRequest {
        tenant_id: Some("pages".into()),
        status: Some(pb::ConnectionStatus::Deleted as i32),
        ..Default::default()
    };
    let want: Vec<String> = deleted.iter().map(|(id, _)| id.clone()).collect();
    let pages = admin_pages(&tv, tombstones, 3).await;
    check(&pages, 3, &want, "deleted, page size 3");
    for d in pages.iter().flatten() {
        let c = d.connection.as_ref().unwrap();
        let receipt = &deleted
            .iter()
            .find(|(id, _)| *id == c.connection_id)
            .unwrap()
            .1;
        assert_eq!(&c.deletion_receipt_id, receipt);
        assert_eq!(
            (d.kek_version, d.has_refresh_token, d.open_leases),
            (0, false, 0)
        );
    }

    // Everything live in the tenant, and everything with the tombstones.
    let live: Vec<String> = ids
        .iter()
        .filter(|id| !want.contains(id))
        .cloned()
        .collect();
    let tenant = pb::AdminServiceListConnectionsRequest {
        tenant_id: Some("pages".into()),
        ..Default::default()
    };
    check(
        &admin_pages(&tv, tenant.clone(), 7).await,
        7,
        &live,
        "tenant, page size 7",
    );
    let all = pb::AdminServiceListConnectionsRequest {
        include_deleted: true,
        ..tenant
    };
    check(
        &admin_pages(&tv, all, 8).await,
        8,
        &ids,
        "with tombstones, page size 8",
    );
}
both_backends!(admin_list_pages, admin_list_filters_return_full_pages);

/// `tokenvault` with no client settings from the environment or a file,
/// for commands that fail before they connect (no vault needed).
fn offline_tokenvault(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for name in [
        "TOKENVAULT_CLI_SERVER",
        "TOKENVAULT_CLI_API_KEY",
        "TOKENVAULT_CLI_ADMIN_CONFIG",
        "TOKENVAULT_CLI_OUTPUT",
        "TOKENVAULT_CLI_CA_CERT",
        "TOKENVAULT_CLI_CLIENT_CERT",
        "TOKENVAULT_CLI_CLIENT_KEY",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("XDG_CONFIG_HOME", "/nonexistent/tokenvault-test")
        .env("HOME", "/nonexistent/tokenvault-test")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_short_flag_and_connection_environment_variables() {
    // `-o` is `--output`, and TOKENVAULT_CLI_OUTPUT stands in for it.
    let plain = ["admin", "--server", "http://127.0.0.1:1", "keys", "status"];
    let mut with_o = plain.to_vec();
    with_o.extend(["-o", "yaml"]);
    let no_env: [(&str, &str); 0] = [];
    let output_env = [("TOKENVAULT_CLI_OUTPUT", "yaml")];
    for (env, args) in [(&no_env[..], &with_o[..]), (&output_env[..], &plain[..])] {
        let r = finish(offline_tokenvault(env, args)).await;
        let stderr = r.fails(2);
        assert!(stderr.contains("invalid value 'yaml'"), "{r:#?}");
    }

    // The certificate variables are read (and refused without https://).
    for name in ["TOKENVAULT_CLI_CA_CERT", "TOKENVAULT_CLI_CLIENT_CERT"] {
        let r = finish(offline_tokenvault(&[(name, "/nonexistent/x.pem")], &plain)).await;
        let stderr = r.fails(2);
        assert!(stderr.contains("need an https:// server"), "{name}: {r:#?}");
    }
    // The environment's CA file is used; a flag beats it.
    let tls = ["admin", "--server", "https://127.0.0.1:1", "keys", "status"];
    let env = [("TOKENVAULT_CLI_CA_CERT", "/nonexistent/env-ca.pem")];
    let r = finish(offline_tokenvault(&env, &tls)).await;
    assert!(r.fails(2).contains("/nonexistent/env-ca.pem"), "{r:#?}");
    let mut flagged = tls.to_vec();
    flagged.extend(["--ca-cert", "/nonexistent/flag-ca.pem"]);
    let r = finish(offline_tokenvault(&env, &flagged)).await;
    assert!(r.fails(2).contains("/nonexistent/flag-ca.pem"), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_with_status_0() {
    let cases: [&[&str]; 2] = [&["completions", "bash"], &["keys", "new-api-key", "ci"]];
    for args in cases {
        // A pipe whose reader is gone before the child writes: EPIPE.
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let mut cmd = offline_tokenvault(&[], args);
        cmd.stdout(Stdio::from(writer));
        let child = cmd.spawn().expect("run tokenvault");
        drop(cmd);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("the command finished within 30 s")
            .expect("wait for tokenvault");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
}

/// `audit tail --follow` is audited once, when it starts: the follow is one
/// `FollowAudit` stream whose reads are not audited, so a follower that runs
/// for a few seconds (several of the server's reads) adds one entry to the
/// log, not one per read. The entries it follows still reach it.
async fn a_follow_is_audited_once(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let (before, _) = tv.vault.store().audit_head().await.expect("audit head");
    let mut cmd = tokenvault(&tv);
    cmd.env("TOKENVAULT_CLI_API_KEY", As::Auditor.key())
        .args(["admin", "--server", &format!("http://{}", tv.grpc_addr)])
        .args(["audit", "tail", "-n", "1", "--follow", "--output", "json"]);
    let mut child = cmd.spawn().expect("spawn audit tail --follow");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The backlog's one entry, the follow's own: the stream is open.
    let first: Value = serde_json::from_str(
        &next_line(&mut lines, Duration::from_secs(10))
            .await
            .expect("the follow's own entry"),
    )
    .unwrap();
    assert_eq!(first["detail"], "AdminService.FollowAudit", "{first}");
    let marker = unknown_id("conn_");
    let err = tv
        .admin(As::Admin)
        .get_connection(pb::AdminServiceGetConnectionRequest {
            connection_id: marker.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut seen = Vec::new();
    let found = loop {
        let Some(line) = next_line(&mut lines, Duration::from_secs(10)).await else {
            break false;
        };
        let entry: Value = serde_json::from_str(&line).expect("a JSON line per entry");
        seen.push(entry["seq"].as_u64().unwrap());
        if entry["target"] == marker.as_str() {
            break true;
        }
    };
    assert!(found, "the new entry never showed; saw {seen:?}");
    // Four more seconds of following: eight reads at the server's interval
    // (four polls, and four entries, with the old per-second QueryAudit).
    tokio::time::sleep(Duration::from_secs(4)).await;
    child.kill().await.unwrap();
    let _ = child.wait().await;

    let by_follower = tv
        .vault
        .store()
        .audit_query(
            &tokenvault::store::AuditFilter {
                actor: Some(As::Auditor.identity().to_owned()),
                after_seq: Some(before),
                ascending: true,
                ..Default::default()
            },
            1000,
        )
        .await
        .expect("query the audit log");
    let details: Vec<&str> = by_follower
        .iter()
        .map(|r| r.draft.detail.as_str())
        .collect();
    assert_eq!(
        details,
        ["AdminService.FollowAudit"],
        "one entry for the whole follow"
    );
}
both_backends!(follow_audited_once_cli, a_follow_is_audited_once);

/// The cell of `line` in the column titled `title` of a table whose header
/// is `header` (cells are left-aligned under their titles).
fn cell(header: &str, line: &str, title: &str) -> String {
    let start = header.find(title).expect("the column");
    line.get(start..)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

/// The enum fields of the JSON documents.
const ENUM_FIELDS: [&str; 6] = [
    "status",
    "integration",
    "outcome",
    "state",
    "reason",
    "kind",
];

/// Where `value` breaks the JSON conventions: an empty string (where
/// `null` belongs), or an enum field not in the tables' lowercase words.
fn vocabulary_problems(value: &Value, path: &str, problems: &mut Vec<String>) {
    match value {
        Value::String(text) if text.is_empty() => problems.push(format!("{path}: \"\"")),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                vocabulary_problems(item, &format!("{path}[{i}]"), problems);
            }
        }
        Value::Object(fields) => {
            for (name, field) in fields {
                if let Value::String(word) = field
                    && ENUM_FIELDS.contains(&name.as_str())
                    && *word != word.to_lowercase()
                {
                    problems.push(format!("{path}.{name}: {word}"));
                }
                vocabulary_problems(field, &format!("{path}.{name}"), problems);
            }
        }
        _ => {}
    }
}

/// `--output json` speaks the tables' words (`active`, `calendar`,
/// `denied`), and "none" has one spelling, `null`: no JSON document holds
/// `""` or a proto enum name.
async fn json_and_tables_share_one_vocabulary(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    let id = seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, "a", None)
        .await
        .id
        .to_string();
    // A caller with no role: its audit entry has no role either.
    admin(&tv, As::Nobody, &["keys", "status"]).await.fails(4);

    let commands: [&[&str]; 6] = [
        &["connections", "list"],
        &["connections", "show", id.as_str()],
        &["audit", "query"],
        &["audit", "tail", "-n", "5"],
        &["keys", "status"],
        &["keys", "report"],
    ];
    for args in commands {
        let mut with_json = args.to_vec();
        with_json.extend(["-o", "json"]);
        let doc = admin(&tv, As::Admin, &with_json).await.json();
        let mut problems = Vec::new();
        vocabulary_problems(&doc, "$", &mut problems);
        assert!(problems.is_empty(), "{args:?}: {problems:?} in {doc}");
    }

    // Connections: the words of the table's columns.
    let shown = admin_json(&tv, As::Admin, &["connections", "show", &id]).await;
    let listed = admin_json(&tv, As::Admin, &["connections", "list"]).await;
    let table = admin(&tv, As::Admin, &["connections", "list"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    let row = lines
        .iter()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{table:#?}"));
    for doc in [&shown, &listed["connections"][0]] {
        let c = &doc["connection"];
        assert_eq!(c["status"], cell(lines[0], row, "STATUS").as_str(), "{doc}");
        assert_eq!(c["status"], "active", "{doc}");
        assert_eq!(
            c["integration"],
            cell(lines[0], row, "INTEGRATION").as_str(),
            "{doc}"
        );
        assert_eq!(c["integration"], "calendar", "{doc}");
        assert_eq!(c["deletion_receipt_id"], Value::Null, "{doc}");
        assert_eq!(c["deleted_at"], Value::Null, "{doc}");
    }

    // Audit entries: the outcome word of the table, and `null` where the
    // table shows `-` (no role).
    let denied = admin_json(&tv, As::Auditor, &["audit", "query", "--outcome", "denied"]).await;
    let entry = denied["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["actor"] == As::Nobody.identity())
        .unwrap_or_else(|| panic!("no entry for the caller without a role: {denied}"))
        .clone();
    assert_eq!(entry["role"], Value::Null, "{entry}");
    assert_eq!(entry["outcome"], "denied", "{entry}");
    let table = admin(&tv, As::Auditor, &["audit", "query", "--outcome", "denied"]).await;
    let lines: Vec<&str> = table.ok().lines().collect();
    let row = lines
        .iter()
        .find(|l| l.contains(As::Nobody.identity()))
        .unwrap_or_else(|| panic!("{table:#?}"));
    assert_eq!(cell(lines[0], row, "ROLE"), "-");
    assert_eq!(cell(lines[0], row, "OUTCOME"), "denied");
    // The table's word is a filter value too.
    let ok = admin_json(
        &tv,
        As::Auditor,
        &["audit", "query", "--outcome", "success", "--limit", "5"],
    )
    .await;
    let outcomes: Vec<&Value> = ok["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["outcome"])
        .collect();
    assert!(!outcomes.is_empty(), "{ok}");
    assert!(outcomes.iter().all(|o| **o == "success"), "{ok}");
}
both_backends!(json_vocabulary_cli, json_and_tables_share_one_vocabulary);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_key_commands_print_json() {
    // keys new-api-key: the key, its identity and the hash the configuration holds.
    let r = finish(offline_tokenvault(
        &[],
        &["keys", "new-api-key", "ci-bot", "-o", "json"],
    ))
    .await;
    let v = r.json();
    assert_eq!(v["identity"], "ci-bot");
    let key = v["api_key"].as_str().expect("the key").to_owned();
    assert!(!key.is_empty(), "{v}");
    assert_eq!(
        v["sha256"],
        tokenvault::grpc::Authenticator::hash_api_key(&key).as_str()
    );
    // Without --output json, the text as before.
    let r = finish(offline_tokenvault(&[], &["keys", "new-api-key", "ci-bot"])).await;
    assert!(r.ok().starts_with("API key for ci-bot"), "{r:#?}");

    // keys init --env, through TOKENVAULT_CLI_OUTPUT: a whole keyring for v1…
    let r = finish(offline_tokenvault(
        &[("TOKENVAULT_CLI_OUTPUT", "json")],
        &["keys", "init", "--env"],
    ))
    .await;
    let v = r.json();
    assert_eq!(v["version"], 1);
    assert_eq!(v["variables"]["TOKENVAULT_KEYRING__PROVIDER"], "env");
    for name in ["TOKENVAULT_KEYRING__KEYS", "TOKENVAULT_KEYRING__MAC_KEY"] {
        assert!(
            v["variables"][name].as_str().is_some_and(|k| !k.is_empty()),
            "{name}: {v}"
        );
    }
    assert_eq!(v["keys_entry"], Value::Null);
    // …and only the entry to append for a later version.
    let r = finish(offline_tokenvault(
        &[],
        &[
            "keys",
            "init",
            "--env",
            "--version",
            "3",
            "--output",
            "json",
        ],
    ))
    .await;
    let v = r.json();
    assert_eq!(v["version"], 3);
    assert_eq!(v["variables"], Value::Null);
    assert!(
        v["keys_entry"].as_str().is_some_and(|k| !k.is_empty()),
        "{v}"
    );
}

/// `tokenvault dev <args>` against `tv` as its calendar-sync worker, with no
/// env file.
fn dev_command(tv: &TestVault, args: &[&str]) -> Command {
    let mut cmd = tokenvault(tv);
    cmd.env_remove("TOKENVAULT_CLI_APP_KEY")
        .env_remove("TOKENVAULT_CLI_EMAIL_WORKER_KEY")
        .env_remove("TOKENVAULT_CLI_DEV_ENV_FILE")
        .env("TOKENVAULT_CLI_WORKER_KEY", As::Worker.key())
        .arg("dev")
        .arg("--server")
        .arg(format!("http://{}", tv.grpc_addr))
        .arg("--env-file")
        .arg(tv.dir.path().join("no-dev.env"))
        .args(args);
    cmd
}

/// The `dev` commands take `--output json` too: one JSON document on
/// stdout, the steps on stderr, a leased token never shown.
async fn dev_commands_print_json(backend: Backend) {
    let Some(tv) = spawn_vault(backend).await else {
        return;
    };
    const TOKEN: &str = "ya29.dev-json-never-printed";
    let id = seed_connection(&tv.vault, "t1", "u1", Integration::Calendar, TOKEN, None)
        .await
        .id
        .to_string();

    let r = finish(dev_command(
        &tv,
        &[
            "lease",
            "--connection",
            &id,
            "--scope",
            CALENDAR_SCOPE,
            "-o",
            "json",
        ],
    ))
    .await;
    let lease = r.json();
    assert!(
        lease["lease_id"]
            .as_str()
            .is_some_and(|l| l.starts_with("lease_")),
        "{lease}"
    );
    assert_eq!(lease["connection_id"], id.as_str());
    assert_eq!(lease["purpose"], "calendar_sync");
    assert_eq!(lease["granted_scopes"], serde_json::json!([CALENDAR_SCOPE]));
    assert_eq!(lease["access_token_chars"], TOKEN.len());
    assert!(lease["lease_expires_at"].is_string(), "{lease}");
    assert!(
        !r.stdout.contains(TOKEN) && !r.stderr.contains(TOKEN),
        "the token was printed: {r:#?}"
    );
    assert!(
        r.stderr.contains("-> LeaseService.LeaseToken"),
        "the steps go to stderr: {r:#?}"
    );

    // A deletion event for the worker to acknowledge.
    crate::support::disconnect(&tv, &id).await;
    let r = finish(dev_command(
        &tv,
        &["ack", "--consumer", "calendar-sync", "--output", "json"],
    ))
    .await;
    let acked = r.json();
    assert_eq!(acked["consumer"], "calendar-sync");
    let events = acked["events"].as_array().expect("the events");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "connection_deleted" && e["connection_id"] == id.as_str()),
        "{acked}"
    );
    assert_eq!(
        acked["position"],
        events.last().unwrap()["cursor"],
        "{acked}"
    );
    let mut problems = Vec::new();
    vocabulary_problems(&acked, "$", &mut problems);
    assert!(problems.is_empty(), "{problems:?} in {acked}");
    assert!(r.stderr.contains("calendar-sync acknowledged"), "{r:#?}");

    // Nothing left: `position` is null, not absent or 0.
    let r = finish(dev_command(
        &tv,
        &["ack", "--consumer", "calendar-sync", "--output", "json"],
    ))
    .await;
    let again = r.json();
    assert_eq!(again["position"], Value::Null, "{again}");
    assert_eq!(again["events"], serde_json::json!([]), "{again}");
}
both_backends!(dev_json_cli, dev_commands_print_json);
