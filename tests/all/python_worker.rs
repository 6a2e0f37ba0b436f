//! The example sync worker in another language, `examples/python-worker/`
//! (Python, grpcio), run as its users run theirs: against the five-minute
//! tour's dev vault (`tokenvault serve --dev`, the worker's API key read from
//! the dev env file), and against a vault with mutual TLS (the worker named by
//! a client certificate made at test time), on SQLite and PostgreSQL.
//!
//! `worker.py --once` lists the services through server reflection v1alpha (a
//! non-Rust client), leases a token for the connection, prints `leased …`, and
//! exits 0 once it has seen that connection's LEASE_REVOKED and
//! CONNECTION_DELETED, dropped the token, purged what it synced and
//! acknowledged the deletion. The test disconnects the connection as the app
//! when the worker says it leased, and checks the receipt carries the ack.
//!
//! It needs python3 with the worker's requirements (`python3 -m pip install
//! -r examples/python-worker/requirements.txt`); without them it prints
//! `SKIPPED (python grpcio)` and passes, unless `TV_REQUIRE_PYTHON=1` or
//! `CI=true` (`.ci/run` installs them and sets `TV_REQUIRE_PYTHON=1`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokenvault::domain::Integration;
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;

use crate::both_backends;
use crate::mtls::{Pki, tls_channel};
use crate::serve_cli::BIN;
use crate::support::cli::{field, ok, tokenvault};
use crate::support::{As, Backend, Bearer, seed_connection, spawn_vault_with};

/// The example worker.
const WORKER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/python-worker/worker.py"
);

/// How to get what the worker needs, from the repository's root.
const INSTALL: &str = "python3 -m pip install -r examples/python-worker/requirements.txt";

/// How long the worker may take to start (generating its stubs) and lease,
/// and then to see the deletion and exit.
const WORKER_LIMIT: Duration = Duration::from_secs(60);

/// The access token seeded for the mutual-TLS test: it must never be printed.
const TOKEN: &str = "ya29.python-worker-test-token";

/// Whether a missing python3 or grpcio must fail the test instead of skipping
/// it (CI).
fn required() -> bool {
    std::env::var("TV_REQUIRE_PYTHON").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether python3 can import the worker's packages; when it cannot, fails
/// the test if they are required, else says SKIPPED (on stderr directly, as
/// a skip must be seen) and returns false.
fn python_ready() -> bool {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_reflection, grpc_status",
        ])
        .stdin(Stdio::null())
        .output();
    let problem = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let last = stderr
                .lines()
                .last()
                .unwrap_or("no message")
                .trim()
                .to_owned();
            format!("python3 cannot import the worker's packages ({last})")
        }
        Err(e) => format!("python3 cannot be run ({e})"),
    };
    if required() {
        panic!(
            "python3 with the worker's packages is required (TV_REQUIRE_PYTHON=1 or CI=true): \
             {problem}; install them with `{INSTALL}`"
        );
    }
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (python grpcio): {test}: {problem}; install with `{INSTALL}`"
    );
    false
}

/// A running `python3 worker.py` and what it printed.
struct PythonWorker {
    child: Child,
    /// Its stdout, line by line, as printed.
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl PythonWorker {
    /// Starts the worker in `cwd` with `args`, with no `TOKENVAULT_CLI_*`
    /// variable of the machine running the tests and no proxy.
    fn start(cwd: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new("python3");
        cmd.arg(WORKER)
            .args(args)
            .current_dir(cwd)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TOKENVAULT_CLI_") {
                cmd.env_remove(name);
            }
        }
        for proxy in [
            "http_proxy",
            "https_proxy",
            "grpc_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            cmd.env_remove(proxy);
        }
        let mut child = cmd.spawn().expect("run python3 worker.py");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("worker stdout");
        let sink = stdout.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let err = child.stderr.take().expect("worker stderr");
        let sink = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            lines,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Everything it printed, for assertions.
    fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Everything it printed on both streams, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "worker stdout:\n{}\nworker stderr:\n{}",
            self.stdout_text(),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// The first stdout line starting with `prefix`; fails after `limit`, or
    /// when the worker exits first.
    fn wait_for_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "worker.py printed no `{prefix}` line within {limit:?}\n{}",
                    self.transcript()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    self.join_readers();
                    panic!(
                        "worker.py ended ({status:?}) before printing a `{prefix}` line\n{}",
                        self.transcript()
                    );
                }
            }
        }
    }

    /// Waits for the worker to exit; kills it and fails after `limit`.
    fn finish(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for worker.py") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.join_readers();
                panic!(
                    "worker.py did not exit within {limit:?}\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.join_readers();
        status
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lease id of a `leased lease_… for conn_… …` line.
fn lease_id(leased: &str) -> String {
    let id = leased.split_whitespace().nth(1).unwrap_or_default();
    assert!(id.starts_with("lease_"), "not a lease line: {leased}");
    id.to_owned()
}

/// What `worker.py --once` must have done, having exited with `status`:
/// authenticated as `auth` says, listed the four services through v1alpha
/// reflection, dropped the token of `lease` on the connection's
/// LEASE_REVOKED, purged and acked on its CONNECTION_DELETED (of `receipt`),
/// and never printed a token.
fn assert_worker_did_its_job(
    worker: &PythonWorker,
    status: ExitStatus,
    auth: &str,
    connection: &str,
    lease: &str,
    receipt: &str,
) {
    let transcript = worker.transcript();
    assert!(
        status.success(),
        "worker.py --once: {status:?}\n{transcript}"
    );
    let out = worker.stdout_text();
    let line = |prefix: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line\n{transcript}"))
            .to_owned()
    };
    assert!(
        line("calendar-sync: connected").contains(auth),
        "{transcript}"
    );
    let listed = line("reflection (v1alpha) lists");
    for service in tokenvault::grpc::SERVICE_NAMES {
        assert!(
            listed.contains(service),
            "{service} not listed\n{transcript}"
        );
    }
    let revoked = format!("lease_revoked {connection}");
    let dropped = format!("dropped the token of {lease}");
    assert!(
        out.lines()
            .any(|l| l.contains(&revoked) && l.contains(&dropped)),
        "no LEASE_REVOKED of {lease} dropping its token\n{transcript}"
    );
    let deleted = format!("connection_deleted {connection} receipt {receipt}");
    assert!(
        out.lines()
            .any(|l| l.contains(&deleted) && l.contains("purged 1 synced item(s)")),
        "no CONNECTION_DELETED of {connection} purging what was synced\n{transcript}"
    );
    assert!(line("acked #").contains("as calendar-sync"), "{transcript}");
    assert!(line("once: ok:").contains(connection), "{transcript}");
    assert!(
        !transcript.contains("ya29."),
        "the worker printed a token\n{transcript}"
    );
}

// ---------------------------------------------------------------------------
// Against the dev vault of the five-minute tour
// ---------------------------------------------------------------------------

/// A running `tokenvault serve --dev` in a directory of its own.
struct DevVault {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The `export NAME=VALUE` lines of its env file.
    exports: BTreeMap<String, String>,
}

impl DevVault {
    /// Starts `tokenvault serve --dev` in `cwd` on ephemeral loopback ports
    /// and waits until it has written its env file.
    fn start(cwd: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--dev"])
            .current_dir(cwd)
            .env("TOKENVAULT_GRPC_ADDR", "127.0.0.1:0")
            .env("TOKENVAULT_HTTP_ADDR", "127.0.0.1:0")
            .env("TOKENVAULT_LOG__FORMAT", "json")
            .env_remove("TOKENVAULT_DATA_DIR")
            .env_remove("TOKENVAULT_DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokenvault serve --dev");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("serve --dev stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // The env file is written whole once the listeners are bound; its
        // last line is the server's address.
        let env_file = cwd.join("tokenvault-dev-data").join("dev.env");
        let deadline = Instant::now() + Duration::from_secs(60);
        let exports = loop {
            let text = std::fs::read_to_string(&env_file).unwrap_or_default();
            if text.contains("export TOKENVAULT_CLI_SERVER=") && text.ends_with('\n') {
                break text
                    .lines()
                    .filter_map(|l| l.strip_prefix("export "))
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect::<BTreeMap<String, String>>();
            }
            if let Some(status) = child.try_wait().expect("wait for serve --dev") {
                panic!(
                    "serve --dev exited ({status:?}); log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve --dev wrote no env file; log:\n{}",
                log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Self {
            child,
            log,
            exports,
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for DevVault {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_python_worker_drops_its_token_and_acks_a_disconnect_on_the_dev_vault() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let vault = DevVault::start(cwd);
    let none = BTreeMap::new();

    // Connect a Google account through the simulator, as the app.
    let out = ok(
        "dev connect",
        &tokenvault(
            cwd,
            &[
                "dev",
                "connect",
                "--tenant",
                "acme",
                "--account",
                "alice",
                "--integration",
                "calendar",
            ],
            &none,
        ),
    );
    let connection = field(&out, "connection_id").to_owned();
    assert_eq!(field(&out, "status"), "active", "{out}");

    // The worker, as calendar-sync, with no variable set: its key and the
    // vault's address come from ./tokenvault-dev-data/dev.env.
    let mut worker = PythonWorker::start(
        cwd,
        &["--once", "--connection", &connection, "--timeout", "60"],
    );
    let lease = lease_id(&worker.wait_for_line("leased ", WORKER_LIMIT));

    // Disconnect as the app, leaving the acknowledgement to the worker.
    let out = ok(
        "dev disconnect --no-ack",
        &tokenvault(
            cwd,
            &["dev", "disconnect", "--connection", &connection, "--no-ack"],
            &none,
        ),
    );
    let receipt = field(&out, "receipt_id").to_owned();
    let status = worker.finish(WORKER_LIMIT);
    assert_worker_did_its_job(
        &worker,
        status,
        "API key in TOKENVAULT_CLI_WORKER_KEY",
        &connection,
        &lease,
        &receipt,
    );

    // The worker's ack completes the receipt (the simulator confirms the
    // revocation at Google within moments).
    let deadline = Instant::now() + Duration::from_secs(15);
    let shown = loop {
        let out = ok(
            "admin receipts show",
            &tokenvault(
                cwd,
                &["admin", "--output", "json", "receipts", "show", &receipt],
                &vault.exports,
            ),
        );
        let r: serde_json::Value = serde_json::from_str(&out).expect("json receipt");
        if r["status"] == "complete" {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "receipt not complete: {r}\nvault log:\n{}",
            vault.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        shown["consumer_acks"][0]["consumer"], "calendar-sync",
        "{shown}"
    );
    assert_eq!(shown["connection_ids"][0], connection.as_str(), "{shown}");
}

// ---------------------------------------------------------------------------
// Over mutual TLS, on both backends
// ---------------------------------------------------------------------------

/// The worker authenticates by a client certificate naming the calendar
/// worker's identity (whose API key is removed, so a certificate is its one
/// way in); the app disconnects over TLS with its API key.
async fn the_python_worker_over_mutual_tls(backend: Backend) {
    if !python_ready() {
        return;
    }
    let pki = Pki::generate();
    let Some(tv) = spawn_vault_with(backend, |config| {
        let keys = config.auth.api_keys.clone();
        pki.configure(config);
        config.auth.api_keys = keys;
        config
            .auth
            .api_keys
            .retain(|k| k.identity != As::Worker.identity());
    })
    .await
    else {
        return;
    };
    let connection = seed_connection(
        &tv.vault,
        "acme",
        "alice",
        Integration::Calendar,
        TOKEN,
        None,
    )
    .await
    .id
    .to_string();
    let dir = tv.dir.path();
    let write = |name: &str, text: &str| -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path.display().to_string()
    };
    let ca = write("worker-ca.pem", &pki.ca.pem());
    let cert = write("worker-cert.pem", &pki.worker.cert);
    let key = write("worker-key.pem", &pki.worker.key);
    let server = format!("https://{}", tv.grpc_addr);

    // The test thread blocks on the worker below; the vault runs on the
    // runtime's worker threads.
    let mut worker = PythonWorker::start(
        dir,
        &[
            "--once",
            "--server",
            &server,
            "--tls-server-name",
            "localhost",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--connection",
            &connection,
            "--timeout",
            "60",
        ],
    );
    let lease = lease_id(&worker.wait_for_line("leased ", WORKER_LIMIT));

    let channel = tls_channel(tv.grpc_addr, &pki.ca.pem(), None)
        .await
        .expect("the app connects over TLS");
    let mut app = ConnectionServiceClient::with_interceptor(
        channel,
        Bearer(Some(
            format!("Bearer {}", As::App.key())
                .parse()
                .expect("ascii key"),
        )),
    );
    let receipt = app
        .disconnect(pb::DisconnectRequest {
            connection_id: connection.clone(),
            reason: "python worker test".into(),
        })
        .await
        .expect("disconnect as the app")
        .into_inner()
        .receipt
        .unwrap();
    let status = worker.finish(WORKER_LIMIT);
    assert_worker_did_its_job(
        &worker,
        status,
        "client certificate",
        &connection,
        &lease,
        &receipt.receipt_id,
    );
    assert!(
        !worker.transcript().contains(TOKEN),
        "the worker printed its token"
    );

    // The worker's ack is on the deletion receipt.
    let shown = app
        .get_deletion_receipt(pb::GetDeletionReceiptRequest {
            receipt_id: receipt.receipt_id.clone(),
        })
        .await
        .expect("GetDeletionReceipt")
        .into_inner()
        .receipt
        .unwrap();
    assert!(
        shown
            .consumer_acks
            .iter()
            .any(|a| a.consumer == "calendar-sync"),
        "{shown:?}"
    );
}
both_backends!(python_worker_mtls, the_python_worker_over_mutual_tls);
