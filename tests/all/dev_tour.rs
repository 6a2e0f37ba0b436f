//! The five-minute tour as a new user takes it, with the built binary:
//! `tokenvault serve --dev` (SQLite, the Google simulator in-process, fresh
//! API keys printed as `export` lines), then `tokenvault dev connect`,
//! `dev lease`, `dev disconnect` and `tokenvault admin receipts show` against
//! it. Dev mode refuses to listen beyond loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::serve_cli::BIN;
use crate::support::cli::{field, ok, tokenvault};

/// A running `tokenvault serve --dev` and what it printed.
struct DevServe {
    child: Child,
    grpc_addr: String,
    /// The `export NAME=VALUE` lines of its banner.
    exports: BTreeMap<String, String>,
    banner: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl DevServe {
    /// Starts `tokenvault serve --dev` in `cwd` on ephemeral loopback ports
    /// and waits for its banner.
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
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokenvault serve --dev");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (serving_tx, serving_rx) = mpsc::channel();
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tokenvault serving") {
                    let _ = serving_tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (banner_tx, banner_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut banner = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                banner.push_str(&line);
                banner.push('\n');
                if line.starts_with("Then:") {
                    let _ = banner_tx.send(std::mem::take(&mut banner));
                }
            }
        });
        let limit = Duration::from_secs(60);
        let serving = serving_rx.recv_timeout(limit).unwrap_or_else(|_| {
            panic!("serve --dev did not start; log: {:?}", log.lock().unwrap())
        });
        let banner = banner_rx
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("no banner; log: {:?}", log.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&serving).expect("json log line");
        let exports = banner
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            child,
            grpc_addr: v["grpc_addr"].as_str().unwrap().to_owned(),
            exports,
            banner,
            log,
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for DevServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_five_minute_tour_ends_with_a_completed_deletion_receipt() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let server = DevServe::start(cwd);

    // Loudly not for production, on stdout and in the log.
    assert!(
        server.banner.contains("NOT FOR PRODUCTION"),
        "{}",
        server.banner
    );
    assert!(
        server.log_text().contains("NOT FOR PRODUCTION"),
        "{}",
        server.log_text()
    );
    // Its own data directory, never the real default; the keys also in a 0600 file.
    let data = cwd.join("tokenvault-dev-data");
    assert!(data.join("tokenvault.db").exists());
    assert!(!cwd.join("tokenvault-data").exists());
    let env_file: PathBuf = data.join("dev.env");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let names: Vec<&str> = server.exports.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "TOKENVAULT_CLI_API_KEY",
            "TOKENVAULT_CLI_APP_KEY",
            "TOKENVAULT_CLI_EMAIL_WORKER_KEY",
            "TOKENVAULT_CLI_SERVER",
            "TOKENVAULT_CLI_WORKER_KEY",
        ]
    );
    assert_eq!(
        server.exports["TOKENVAULT_CLI_SERVER"],
        format!("http://{}", server.grpc_addr)
    );
    for (name, key) in &server.exports {
        assert!(!server.log_text().contains(key.as_str()), "{name} logged");
    }
    let env = &server.exports;

    // 1. Connect a Google account through the simulator, as the app.
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
            env,
        ),
    );
    let connection = field(&out, "connection_id").to_owned();
    assert!(connection.starts_with("conn_"), "{out}");
    assert_eq!(field(&out, "status"), "active", "{out}");
    assert!(
        field(&out, "granted_scopes").contains("https://www.googleapis.com/auth/calendar.events"),
        "{out}"
    );
    assert!(out.contains("callback answered 200"), "{out}");

    // 2. Lease a token as calendar-sync, with no variable set: the keys come
    //    from ./tokenvault-dev-data/dev.env. The token is never printed.
    let out = ok(
        "dev lease",
        &tokenvault(
            cwd,
            &["dev", "lease", "--connection", &connection],
            &BTreeMap::new(),
        ),
    );
    assert!(field(&out, "lease_id").starts_with("lease_"), "{out}");
    assert!(field(&out, "access_token").contains("not shown"), "{out}");
    assert!(!out.contains("ya29."), "the token was printed: {out}");
    // The policy holds: email-sync may not lease a calendar connection.
    let denied = tokenvault(
        cwd,
        &[
            "dev",
            "lease",
            "--connection",
            &connection,
            "--purpose",
            "email_sync",
        ],
        env,
    );
    assert_eq!(denied.status.code(), Some(4), "{denied:?}");

    // 3. Disconnect as the app; calendar-sync acknowledges the deletion.
    let out = ok(
        "dev disconnect",
        &tokenvault(
            cwd,
            &["dev", "disconnect", "--connection", &connection],
            env,
        ),
    );
    assert!(out.contains("calendar-sync acknowledged"), "{out}");
    assert!(out.contains("connection_deleted"), "{out}");
    // LEASE_REVOKED names the connection and its cut-off, not each lease.
    assert!(
        out.lines().any(|l| l.contains("lease_revoked")
            && l.contains(&connection)
            && l.contains("leases granted up to 20")),
        "{out}"
    );
    let receipt = field(&out, "receipt_id").to_owned();
    assert_eq!(field(&out, "status"), "complete", "{out}");

    // 4. The admin sees the completed receipt.
    let out = ok(
        "admin receipts show",
        &tokenvault(
            cwd,
            &["admin", "--output", "json", "receipts", "show", &receipt],
            env,
        ),
    );
    let r: serde_json::Value = serde_json::from_str(&out).expect("json receipt");
    assert_eq!(r["status"], "complete", "{r}");
    assert_eq!(r["consumer_acks"][0]["consumer"], "calendar-sync", "{r}");
    assert_eq!(r["upstream_revocations"][0]["state"], "confirmed", "{r}");
    assert_eq!(r["connection_ids"][0], connection.as_str(), "{r}");

    // Stopping the vault stops its keys: the env file goes with it.
    let mut server = server;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "serve --dev did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}; log:\n{}", server.log_text());
    assert!(!env_file.exists(), "dev.env outlived the vault");
    eprintln!("dev tour took {:?}", started.elapsed());
}

#[test]
fn dev_mode_refuses_to_listen_beyond_loopback_and_to_leave_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("TOKENVAULT_GRPC_ADDR", "0.0.0.0:0")], "grpc_addr"),
        (
            &[
                ("TOKENVAULT_GRPC_ADDR", "127.0.0.1:0"),
                ("TOKENVAULT_HTTP_ADDR", "192.0.2.1:8080"),
            ],
            "http_addr",
        ),
        (
            &[(
                "TOKENVAULT_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )],
            "database_url",
        ),
    ];
    for (env, setting) in cases {
        let out = Command::new(BIN)
            .args(["serve", "--dev"])
            .current_dir(dir.path())
            .env_remove("TOKENVAULT_GRPC_ADDR")
            .env_remove("TOKENVAULT_HTTP_ADDR")
            .env_remove("TOKENVAULT_DATABASE_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{setting}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{setting}: {stderr}");
        assert!(stderr.contains(setting), "{setting}: {stderr}");
        if setting != "database_url" {
            assert!(stderr.contains("loopback only"), "{setting}: {stderr}");
        }
        assert!(out.stdout.is_empty(), "{setting}: printed keys anyway");
    }
    assert!(
        !dir.path().join("tokenvault-dev-data").exists(),
        "a refused start created its data directory"
    );
    // Dev mode brings its own configuration.
    let out = Command::new(BIN)
        .args(["serve", "--dev", "--config", "tokenvault.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
