//! The `tokenvault` binary as an operator meets it: `serve` with no
//! configuration at all, graceful SIGTERM, and one-line configuration errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

/// A `tokenvault serve` child process and the addresses it logged.
pub struct ServeProcess {
    pub child: Child,
    pub grpc_addr: String,
    pub http_addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Starts `tokenvault serve` in `cwd` with extra environment, waiting
    /// until it logs its listen addresses.
    pub fn start(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args);
        Self::run(cmd, cwd, env)
    }

    /// Like [`ServeProcess::start`], with the soft open-file limit lowered
    /// to `open_files` (`ulimit -n`) before the server starts.
    pub fn start_with_open_files(
        cwd: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
        open_files: u64,
    ) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -S -n {open_files} && exec \"$0\" \"$@\""))
            .arg(BIN)
            .arg("serve")
            .args(args);
        Self::run(cmd, cwd, env)
    }

    fn run(mut cmd: Command, cwd: &std::path::Path, env: &[(&str, &str)]) -> Self {
        cmd.current_dir(cwd)
            .env("TOKENVAULT_GRPC_ADDR", "127.0.0.1:0")
            .env("TOKENVAULT_HTTP_ADDR", "127.0.0.1:0")
            .env("TOKENVAULT_LOG__FORMAT", "json")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tokenvault serve");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tokenvault serving") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("server did not start; log: {:?}", log.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        Self {
            grpc_addr: v["grpc_addr"].as_str().unwrap().to_owned(),
            http_addr: v["http_addr"].as_str().unwrap().to_owned(),
            child,
            log,
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_configuration_runs_the_embedded_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServeProcess::start(dir.path(), &[], &[]);
    // Embedded default: SQLite and a 0600 keyring in ./tokenvault-data.
    let data = dir.path().join("tokenvault-data");
    assert!(data.join("tokenvault.db").exists());
    let keyring = data.join("keyring.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let resp = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(resp.get_ref().status(), ServingStatus::Serving);
    let http =
        super::foundation::reqwest_like_get(server.http_addr.parse().unwrap(), "/healthz").await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");

    // Close our connection first: this test then blocks its runtime while waiting.
    drop(health);
    server.signal("TERM");
    let status = server.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        server.log_text()
    );
    assert!(server.log_text().contains("tokenvault stopped"));

    // A second start reuses the keyring and database.
    let mut again = ServeProcess::start(dir.path(), &[], &[]);
    again.signal("INT");
    assert!(again.wait(Duration::from_secs(20)).success());
}

fn bad_config(toml: Option<&str>, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    serve_exit(dir.path(), toml, env)
}

/// Runs `tokenvault serve` in `dir` (with `toml` as its configuration file, if
/// given) until it exits; returns the exit code and stderr.
pub fn serve_exit(
    dir: &std::path::Path,
    toml: Option<&str>,
    env: &[(&str, &str)],
) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").current_dir(dir).stdin(Stdio::null());
    if let Some(text) = toml {
        let path = dir.join("tokenvault.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_non_zero_with_one_line_naming_the_setting() {
    type Case<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            Some("[keyring]\nrotaton_batch_size = 5\n"),
            vec![],
            "keyring.rotaton_batch_size",
        ),
        (
            None,
            vec![("TOKENVAULT_DATABSE_URL", "sqlite://x.db")],
            "databse_url",
        ),
        (
            Some("database_url = \"postgres://u@localhost:notaport/db\"\n"),
            vec![],
            "database_url",
        ),
        (
            Some("database_url = \"mysql://localhost/db\"\n"),
            vec![],
            "database_url",
        ),
        (Some("grpc_addr = \"0.0.0.0:50051\"\n"), vec![], "grpc_addr"),
        (
            None,
            vec![("TOKENVAULT_HTTP_ADDR", "192.0.2.1:8080")],
            "http_addr",
        ),
        (
            Some(
                "[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
            ),
            vec![],
            "tls.cert_file",
        ),
        (
            Some("data_dir = \"/proc/tokenvault-cannot-exist\"\n"),
            vec![],
            "data_dir",
        ),
        (Some("[log]\nformat = \"xml\"\n"), vec![], "log.format"),
        (
            Some("[http]\nmetrics_addr = \"0.0.0.0:9100\"\n"),
            vec![],
            "http.metrics_addr",
        ),
        (
            None,
            vec![("TOKENVAULT_HTTP__MAX_CONNECTIONS", "0")],
            "http.max_connections",
        ),
        (
            Some("[http]\nheader_read_timeout_seconds = 0\n"),
            vec![],
            "http.header_read_timeout_seconds",
        ),
        (
            Some("[auth]\nrefusal_delay_ms = 60000\n"),
            vec![],
            "auth.refusal_delay_ms",
        ),
        (Some("[log]\nlevel = \"verbose\"\n"), vec![], "log.level"),
        (None, vec![("TOKENVAULT_PORTX", "1")], "portx"),
        // Kubernetes service links are not settings: the error names the bad one.
        (
            None,
            vec![
                ("TOKENVAULT_PORT", "tcp://10.0.0.1:50051"),
                ("TOKENVAULT_PORT_50051_TCP_ADDR", "10.0.0.1"),
                ("TOKENVAULT_SERVICE_HOST", "10.0.0.1"),
                ("TOKENVAULT_SERVICE_PORT_GRPC", "50051"),
                ("TOKENVAULT_LOG__LEVEL", "verbose"),
            ],
            "log.level",
        ),
    ];
    for (toml, env, setting) in cases {
        let (code, stderr) = bad_config(toml, &env);
        assert_ne!(code, 0, "{setting}: expected failure, stderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{setting}: expected one line, got {stderr:?}"
        );
        assert!(lines[0].contains(setting), "{setting}: {stderr:?}");
    }
    // An unreadable configuration file.
    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/tokenvault.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("config file"), "{stderr}");
}
