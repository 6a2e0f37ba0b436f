//! `lease_load --replicas N` (PostgreSQL): N − 1 more vault processes
//! (`tokenvault serve`, the binary this benchmark was built with) on the
//! first vault's database and keyring file, each with a data directory,
//! gRPC and HTTP port of its own; they leave with the benchmark.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{CALENDAR_SCOPE, IDENTITY, PURPOSE};

/// One vault process.
pub struct Replica {
    child: Child,
    /// Its data directory (configuration and log file inside).
    pub dir: tempfile::TempDir,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address (`/metrics`, `/healthz`).
    pub http: SocketAddr,
}

impl Replica {
    /// Where its log goes.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port free right now.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// Starts `count` vault processes on `database_url` with the local keyring
/// file at `keyring`, accepting the API key whose SHA-256 is `key_sha256`
/// for the benchmark's worker; returns once each answers `/healthz`.
pub async fn start(
    count: usize,
    database_url: &str,
    keyring: &Path,
    key_sha256: &str,
) -> Vec<Replica> {
    let mut replicas = Vec::with_capacity(count);
    for _ in 0..count {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grpc, http) = (free_addr(), free_addr());
        let config = format!(
            "data_dir = {:?}\ndatabase_url = {database_url:?}\ngrpc_addr = \"{grpc}\"\n\
             http_addr = \"{http}\"\n\
             [server]\nshutdown_grace_seconds = 2\n\
             [keyring]\npath = {:?}\n\
             [policy.identities.{IDENTITY:?}]\nrole = \"worker\"\npurposes = [{PURPOSE:?}]\n\
             consumers = [\"calendar-sync\"]\n\
             [policy.purposes.{PURPOSE}]\nintegrations = [\"calendar\"]\n\
             scopes = [{CALENDAR_SCOPE:?}]\n\
             [[auth.api_keys]]\nidentity = {IDENTITY:?}\nsha256 = {key_sha256:?}\n",
            dir.path().display().to_string(),
            keyring.display().to_string(),
        );
        let path = dir.path().join("tokenvault.toml");
        std::fs::write(&path, config).expect("write a replica's configuration");
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tokenvault"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start a tokenvault serve process");
        replicas.push(Replica {
            child,
            dir,
            grpc,
            http,
        });
    }
    for r in &mut replicas {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = reqwest::get(format!("http://{}/healthz", r.http)).await
                && resp.status().is_success()
            {
                break;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "replica on {} exited ({status}); its log:\n{}",
                    r.grpc,
                    std::fs::read_to_string(r.log()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "replica on {} not healthy within 60 s; its log:\n{}",
                r.grpc,
                std::fs::read_to_string(r.log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    replicas
}

/// The sum over `endpoints`' `/metrics` of the samples of `names` (a
/// counter, or a histogram's `_count`), by name; a family not
/// yet exported counts 0.
pub async fn metric_sums(endpoints: &[SocketAddr], names: &[&str]) -> Vec<f64> {
    let mut sums = vec![0.0; names.len()];
    for e in endpoints {
        let Ok(resp) = reqwest::get(format!("http://{e}/metrics")).await else {
            continue;
        };
        let Ok(text) = resp.text().await else {
            continue;
        };
        for line in text.lines() {
            for (i, name) in names.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(name)
                    && (rest.starts_with(' ') || rest.starts_with('{'))
                    && let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
                {
                    sums[i] += v;
                }
            }
        }
    }
    sums
}
