//! Lease load generator: how fast can one vault hand out access tokens, next
//! to the cheapest RPC it serves?
//!
//! ```text
//! cargo bench --bench lease_load -- [--backend sqlite|postgres] [--connections 10000]
//!     [--concurrency 64] [--seconds 10] [--warmup 2] [--channels 4]
//!     [--keyring local|pkcs11|both]
//! ```
//!
//! `--keyring pkcs11` keeps the KEKs in a SoftHSM2 token made for the run (the
//! benchmark re-runs itself with `SOFTHSM2_CONF` pointing at it). `--keyring
//! both` starts one vault per keyring, on databases of their own, and measures
//! their leases alternately (local, pkcs11, pkcs11, local) in one run, so
//! that the comparison sees the same machine; leases served from cached
//! records must not touch the HSM, so pkcs11 should stay within 10 % of local.
//!
//! PostgreSQL: `TV_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); a fresh database is created
//! and dropped afterwards. SQLite: a fresh file in a temporary directory.
//!
//! What it does, in one process against one server:
//!
//! 1. Starts the real server (`tokenvault::server::start`, plain gRPC on
//!    127.0.0.1, an ephemeral port) with one API key for the worker identity
//!    `spiffe://bench.local/calendar-sync` and an inline policy granting it the
//!    purpose `calendar_sync` (integration `calendar`, scope
//!    `calendar.events`).
//! 2. Seeds `--connections` ACTIVE Calendar connections through the vault's
//!    bulk import path, each with its own random access token valid for an
//!    hour (so no lease ever needs a refresh from Google) and a refresh token.
//! 3. Opens `--channels` HTTP/2 connections and runs `--concurrency` tokio
//!    tasks, spread round-robin over them, each calling back to back, first
//!    `grpc.health.v1.Health/Check` and then
//!    `tokenvault.v1.LeaseService/LeaseToken` (a uniformly random connection,
//!    purpose `calendar_sync`, scope `calendar.events`, default minimum
//!    validity). Each workload runs `--warmup` seconds unmeasured, then
//!    `--seconds` measured. Both send the same `authorization: Bearer` header,
//!    so the request sizes are comparable; Health/Check is the baseline for the
//!    transport, HTTP/2 and tokio cost, LeaseToken adds authentication, the
//!    policy check, the database read, the token's decryption, the lease
//!    record and the audit record.
//! 4. Prints, per workload, calls, errors by gRPC code, throughput of
//!    successful calls, and p50/p90/p99/max latency of successful calls
//!    (client-side, from just before the call to the decoded response), and
//!    the process's CPU time per successful call over the measured window
//!    (`/proc/self/stat`: client and server together; steadier than
//!    throughput on a shared machine) and the whole machine's (`/proc/stat`:
//!    every process, so a PostgreSQL server's share of a lease too); the
//!    lease/health throughput ratio;
//!    whether the goal (lease throughput at least 50 % of Health/Check's,
//!    lease p99 at most 10 ms, no errors) is met; and a markdown table row
//!    for BENCHMARKS.md.
//!
//! The client and the server share the machine and the same multi-threaded
//! tokio runtime (one worker thread per core unless `TOKIO_WORKER_THREADS`
//! says otherwise), so the numbers are a lower bound for a server with the
//! machine to itself. `cargo bench` builds with the optimised bench profile;
//! a debug build is far slower and says so in its output.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};
use tokenvault::proto::v1::LeaseTokenRequest;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Goal: lease throughput at least this share of Health/Check's.
const GOAL_RATIO: f64 = 0.5;
/// Goal: lease p99 at most this many milliseconds.
const GOAL_P99_MS: f64 = 10.0;

struct Args {
    backend: String,
    keyring: String,
    connections: usize,
    concurrency: usize,
    seconds: u64,
    warmup: u64,
    channels: usize,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        keyring: "local".into(),
        connections: 10_000,
        concurrency: 64,
        seconds: 10,
        warmup: 2,
        channels: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => a.backend = it.next().expect("--backend sqlite|postgres"),
            "--keyring" => a.keyring = it.next().expect("--keyring local|pkcs11|both"),
            "--connections" => {
                a.connections = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--connections N")
            }
            "--concurrency" => {
                a.concurrency = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--concurrency N")
            }
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--warmup" => a.warmup = it.next().and_then(|v| v.parse().ok()).expect("--warmup N"),
            "--channels" => {
                a.channels = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--channels N")
            }
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.connections > 0, "--connections must be at least 1");
    assert!(a.concurrency > 0, "--concurrency must be at least 1");
    assert!(a.channels > 0, "--channels must be at least 1");
    assert!(a.seconds > 0, "--seconds must be at least 1");
    assert!(
        matches!(a.keyring.as_str(), "local" | "pkcs11" | "both"),
        "--keyring local|pkcs11|both"
    );
    a
}

#[path = "common/mod.rs"]
mod common;
use common::{
    Bearer, BenchKeyring, CALENDAR_SCOPE, PURPOSE, XorShift, database, drop_database,
    percentile_ms, seed_calendar_connections, softhsm_token, start_worker_vault_with,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Health,
    Lease,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Health => "Health/Check",
            Kind::Lease => "LeaseService/LeaseToken",
        }
    }
}

/// What one task saw during the measured window.
#[derive(Default)]
struct TaskStats {
    /// Latency of each successful call, microseconds.
    ok_us: Vec<u32>,
    /// Failed calls by code, with the first message seen.
    errors: HashMap<tonic::Code, (u64, String)>,
}

impl TaskStats {
    fn record<T>(&mut self, start: Instant, measure_from: Instant, r: Result<T, tonic::Status>) {
        if start < measure_from {
            return;
        }
        match r {
            Ok(_) => {
                let us = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
                self.ok_us.push(us);
            }
            Err(status) => {
                let e = self
                    .errors
                    .entry(status.code())
                    .or_insert_with(|| (0, status.message().to_owned()));
                e.0 += 1;
            }
        }
    }
}

/// One task: calls back to back until `until`, recording calls that start at
/// or after `measure_from`. Responses are dropped at once.
async fn task(
    kind: Kind,
    channel: Channel,
    bearer: Bearer,
    ids: Arc<Vec<String>>,
    seed: u64,
    measure_from: Instant,
    until: Instant,
) -> TaskStats {
    let mut stats = TaskStats {
        ok_us: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    match kind {
        Kind::Health => {
            let mut client = HealthClient::with_interceptor(channel, bearer);
            loop {
                let start = Instant::now();
                if start >= until {
                    break;
                }
                let r = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(drop);
                stats.record(start, measure_from, r);
            }
        }
        Kind::Lease => {
            let mut client = LeaseServiceClient::with_interceptor(channel, bearer);
            let mut rng = XorShift(seed | 1);
            loop {
                let start = Instant::now();
                if start >= until {
                    break;
                }
                let id = &ids[rng.below(ids.len())];
                let r = client
                    .lease_token(LeaseTokenRequest {
                        connection_id: id.clone(),
                        purpose: PURPOSE.to_owned(),
                        scopes: vec![CALENDAR_SCOPE.to_owned()],
                        min_valid_seconds: 0,
                    })
                    .await
                    .map(drop);
                stats.record(start, measure_from, r);
            }
        }
    }
    stats
}

/// The merged result of one workload.
#[derive(Clone)]
struct Report {
    kind: Kind,
    seconds: f64,
    ok: usize,
    /// Code → (count, first message).
    errors: BTreeMap<String, (u64, String)>,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    /// CPU time of the whole process (client and server) during the measured
    /// window, seconds.
    cpu_seconds: Option<f64>,
    /// CPU time of the whole machine (every process: PostgreSQL's too) during
    /// the measured window, seconds.
    machine_cpu_seconds: Option<f64>,
}

impl Report {
    /// The process's CPU time per successful call, microseconds: far steadier
    /// than throughput on a machine shared with other work.
    fn cpu_us_per_call(&self) -> Option<f64> {
        Some(self.cpu_seconds? * 1e6 / self.ok as f64)
    }

    /// The whole machine's CPU time per successful call, microseconds: with
    /// PostgreSQL on the same machine, its share of each call is here too.
    fn machine_us_per_call(&self) -> Option<f64> {
        Some(self.machine_cpu_seconds? * 1e6 / self.ok as f64)
    }

    fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    fn throughput(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn print(&self) {
        println!("{}", self.kind.name());
        println!(
            "  calls      {:>10}  (ok {}, errors {})",
            self.ok as u64 + self.error_count(),
            self.ok,
            self.error_count()
        );
        for (code, (n, msg)) in &self.errors {
            println!("    error {code}: {n}  (first message: {msg:?})");
        }
        println!(
            "  throughput {:>10.0} calls/s (successful)",
            self.throughput()
        );
        println!(
            "  latency    p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            self.p50, self.p90, self.p99, self.max
        );
        if let (Some(cpu), Some(per_call)) = (self.cpu_seconds, self.cpu_us_per_call()) {
            println!(
                "  cpu        {per_call:.1} µs per call (client and server; the process used {:.0} % of one core)",
                cpu / self.seconds * 100.0
            );
        }
        if let (Some(cpu), Some(per_call)) = (self.machine_cpu_seconds, self.machine_us_per_call())
        {
            println!(
                "  machine    {per_call:.1} µs per call (every process, a database server's too; {:.0} % of one core busy)",
                cpu / self.seconds * 100.0
            );
        }
    }
}

/// CPU time this process has used so far, user and system, every thread
/// including those that have ended, in seconds (`utime` and `stime` of
/// `/proc/self/stat`, in the kernel's fixed 100 ticks per second).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // utime and stime are fields 14 and 15; the rest starts at field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU time the whole machine has spent busy so far, every core and process,
/// in seconds (the `cpu` line of `/proc/stat`: user, nice, system, irq,
/// softirq and steal, in the kernel's fixed 100 ticks per second).
fn machine_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    Some(busy as f64 / 100.0)
}

/// Runs one workload: warmup, then the measured window.
async fn run(
    kind: Kind,
    a: &Args,
    channels: &[Channel],
    bearer: &Bearer,
    ids: &Arc<Vec<String>>,
) -> Report {
    let rng = SystemRandom::new();
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs(a.warmup);
    let until = measure_from + Duration::from_secs(a.seconds);
    let handles: Vec<_> = (0..a.concurrency)
        .map(|i| {
            let mut seed = [0u8; 8];
            rng.fill(&mut seed).expect("system randomness");
            tokio::spawn(task(
                kind,
                channels[i % channels.len()].clone(),
                bearer.clone(),
                ids.clone(),
                u64::from_le_bytes(seed),
                measure_from,
                until,
            ))
        })
        .collect();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let from = (process_cpu_seconds(), machine_cpu_seconds());
        tokio::time::sleep_until(until.into()).await;
        let to = (process_cpu_seconds(), machine_cpu_seconds());
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        (delta(from.0, to.0), delta(from.1, to.1))
    });
    let mut all = Vec::new();
    let mut errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for h in handles {
        let s = h.await.expect("load task panicked");
        all.extend_from_slice(&s.ok_us);
        for (code, (n, msg)) in s.errors {
            let e = errors.entry(format!("{code:?}")).or_insert((0, msg));
            e.0 += n;
        }
    }
    all.sort_unstable();
    let cpu = cpu.await;
    Report {
        kind,
        seconds: a.seconds as f64,
        ok: all.len(),
        errors,
        p50: percentile_ms(&all, 50.0),
        p90: percentile_ms(&all, 90.0),
        p99: percentile_ms(&all, 99.0),
        max: all.last().map_or(f64::NAN, |&m| f64::from(m) / 1000.0),
        cpu_seconds: cpu.as_ref().ok().and_then(|c| c.0),
        machine_cpu_seconds: cpu.as_ref().ok().and_then(|c| c.1),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    // The keyrings first: a pkcs11 run re-runs this benchmark with a token.
    let keyrings: Vec<BenchKeyring> = match a.keyring.as_str() {
        "local" => vec![BenchKeyring::Local],
        wanted => {
            let Some(token) = softhsm_token() else {
                println!("SoftHSM2 is not installed (apt-get install softhsm2): no pkcs11 run");
                return;
            };
            println!(
                "pkcs11: SoftHSM2 token {:?} ({})",
                token.label,
                token.module.display()
            );
            if wanted == "both" {
                vec![BenchKeyring::Local, BenchKeyring::Pkcs11(token)]
            } else {
                vec![BenchKeyring::Pkcs11(token)]
            }
        }
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug assertions ON: not an optimised build, numbers are not representative"
    } else {
        "optimised (debug assertions off; `cargo bench` uses the bench/release profile)"
    };
    println!(
        "lease_load: backend {}, keyring {}, {} connections, concurrency {}, {} channels, warmup {} s, measured {} s",
        a.backend, a.keyring, a.connections, a.concurrency, a.channels, a.warmup, a.seconds
    );
    println!("machine: {cores} cores (available_parallelism); client and server share them");
    println!("build: {profile}");

    // 1. One vault per keyring measured: data directory, database, server,
    // connections seeded through the bulk import path, channels.
    let mut vaults = Vec::new();
    for keyring in &keyrings {
        vaults.push(BenchVault::start(&a, keyring.clone()).await);
    }
    let (channels, bearer, ids) = (&vaults[0].channels, &vaults[0].bearer, &vaults[0].ids);
    let dir = &vaults[0].dir;

    // SQLite: the WAL's largest size during the run (it must not grow with
    // the length of the load; see the store's background checkpoints).
    let wal_largest = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wal_sampler = {
        let (path, largest) = (dir.path().join("bench.db-wal"), wal_largest.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(m) = std::fs::metadata(&path) {
                    largest.fetch_max(m.len(), std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    println!();
    let health = run(Kind::Health, &a, channels, bearer, ids).await;
    health.print();
    let lease = run(Kind::Lease, &a, channels, bearer, ids).await;
    lease.print();
    if vaults.len() == 2 {
        compare_keyrings(&a, &vaults, lease.clone()).await;
    }
    wal_sampler.abort();
    if a.backend == "sqlite" {
        println!(
            "SQLite WAL: largest {:.1} MiB during the run",
            wal_largest.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
        );
    }

    // 4. Summary.
    let ratio = lease.throughput() / health.throughput();
    println!();
    println!(
        "lease/health throughput: {:.1}%  ({:.0} / {:.0} calls/s)",
        ratio * 100.0,
        lease.throughput(),
        health.throughput()
    );
    if let (Some(h), Some(l)) = (health.cpu_us_per_call(), lease.cpu_us_per_call()) {
        println!(
            "CPU per call: Health/Check {h:.1} µs, LeaseToken {l:.1} µs ({:.1}x; the goal needs at most 2x when the CPU is the limit)",
            l / h
        );
    }
    if let (Some(h), Some(l)) = (health.machine_us_per_call(), lease.machine_us_per_call()) {
        println!(
            "machine CPU per call (every process): Health/Check {h:.1} µs, LeaseToken {l:.1} µs ({:.1}x)",
            l / h
        );
    }
    let mut missed = Vec::new();
    if ratio.is_nan() || ratio < GOAL_RATIO {
        missed.push(format!("ratio {:.1}% < 50%", ratio * 100.0));
    }
    if lease.p99.is_nan() || lease.p99 > GOAL_P99_MS {
        missed.push(format!("lease p99 {:.2} ms > 10 ms", lease.p99));
    }
    if lease.error_count() + health.error_count() > 0 {
        missed.push(format!(
            "{} lease and {} health errors",
            lease.error_count(),
            health.error_count()
        ));
    }
    if missed.is_empty() {
        println!("goal: lease throughput >= 50% of Health/Check and p99 <= 10 ms: MET");
    } else {
        println!(
            "goal: lease throughput >= 50% of Health/Check and p99 <= 10 ms: NOT MET ({})",
            missed.join("; ")
        );
    }
    println!();
    println!(
        "| backend | connections | concurrency | health calls/s | lease calls/s | ratio | lease p50 | lease p99 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {:.0} | {:.0} | {:.1}% | {:.2} ms | {:.2} ms |",
        a.backend,
        a.connections,
        a.concurrency,
        health.throughput(),
        lease.throughput(),
        ratio * 100.0,
        lease.p50,
        lease.p99
    );

    // The server's own view of its batching (from its /metrics).
    if let Ok(resp) = reqwest::get(format!("http://{}/metrics", vaults[0].server.http_addr)).await
        && let Ok(text) = resp.text().await
    {
        println!();
        println!(
            "server batching, lease stages and the DEK cache (from /metrics; over the whole run, every vault of this process):"
        );
        for line in text.lines().filter(|l| {
            (l.starts_with("tokenvault_audit_batch")
                || l.starts_with("tokenvault_lease_read_batch")
                || l.starts_with("tokenvault_lease_stage")
                || l.starts_with("tokenvault_sqlite_checkpoint"))
                && (l.contains("quantile=\"0.5\"")
                    || l.contains("quantile=\"0.99\"")
                    || l.contains("_sum")
                    || l.contains("_count"))
                || l.starts_with("tokenvault_dek_cache_total{")
        }) {
            println!("  {line}");
        }
    }

    // 5. Shut down and clean up.
    for v in vaults {
        v.stop().await;
    }
}

/// A vault under load: its server, seeded connections and channels.
struct BenchVault {
    keyring: BenchKeyring,
    dir: tempfile::TempDir,
    server: tokenvault::server::RunningServer,
    cleanup: Option<(String, String)>,
    channels: Vec<Channel>,
    bearer: Bearer,
    ids: Arc<Vec<String>>,
}

impl BenchVault {
    async fn start(a: &Args, keyring: BenchKeyring) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, cleanup) = database(&a.backend, dir.path()).await;
        let rng = SystemRandom::new();
        let (server, key) = start_worker_vault_with(dir.path(), url, &rng, &keyring).await;
        let start = Instant::now();
        let ids = seed_calendar_connections(
            &server.vault,
            "bench",
            a.connections,
            Duration::from_secs(3600),
            &rng,
        )
        .await;
        let seeding = start.elapsed();
        println!(
            "{} keyring: seeded {} connections in {:.2?} ({:.0} connections/s)",
            keyring.name(),
            ids.len(),
            seeding,
            ids.len() as f64 / seeding.as_secs_f64()
        );
        let endpoint = Endpoint::from_shared(format!("http://{}", server.grpc_addr))
            .expect("endpoint")
            .tcp_nodelay(true);
        let mut channels = Vec::with_capacity(a.channels);
        for _ in 0..a.channels {
            channels.push(endpoint.connect().await.expect("connect to the vault"));
        }
        Self {
            keyring,
            dir,
            server,
            cleanup,
            channels,
            bearer: Bearer::key(&key),
            ids: Arc::new(ids),
        }
    }

    async fn stop(self) {
        drop(self.channels);
        self.server.shutdown().await;
        if let Some((admin, name)) = self.cleanup {
            drop_database(&admin, &name).await;
        }
        drop(self.dir);
    }
}

/// `--keyring both`: leases on the local and the pkcs11 vault, alternately
/// (local was measured first; then pkcs11, pkcs11, local), and their ratio.
async fn compare_keyrings(a: &Args, vaults: &[BenchVault], first_local: Report) {
    let mut by_keyring: [Vec<Report>; 2] = [vec![first_local], Vec::new()];
    for i in [1, 1, 0] {
        let v = &vaults[i];
        let r = run(Kind::Lease, a, &v.channels, &v.bearer, &v.ids).await;
        println!("({} keyring)", v.keyring.name());
        r.print();
        by_keyring[i].push(r);
    }
    let total = |rs: &[Report]| {
        let ok: usize = rs.iter().map(|r| r.ok).sum();
        let secs: f64 = rs.iter().map(|r| r.seconds).sum();
        let cpu: Option<f64> = rs.iter().map(|r| r.machine_cpu_seconds).sum();
        let errors: u64 = rs.iter().map(Report::error_count).sum();
        let p99 = rs.iter().map(|r| r.p99).fold(0.0, f64::max);
        (
            ok as f64 / secs,
            cpu.map(|c| c * 1e6 / ok as f64),
            errors,
            p99,
        )
    };
    let (local, pkcs11) = (total(&by_keyring[0]), total(&by_keyring[1]));
    let ratio = pkcs11.0 / local.0;
    println!();
    println!(
        "keyrings, leases measured alternately (2 x {} s each):",
        a.seconds
    );
    for (name, (rate, cpu, errors, p99)) in [("local", local), ("pkcs11", pkcs11)] {
        println!(
            "  {name:<7} {rate:>8.0} leases/s  machine CPU {} per lease  worst p99 {p99:.2} ms  errors {errors}",
            cpu.map_or("-".to_owned(), |c| format!("{c:.1} µs"))
        );
    }
    let cpu_ratio = match (local.1, pkcs11.1) {
        (Some(l), Some(p)) => format!("{:.1}%", p / l * 100.0),
        _ => "-".to_owned(),
    };
    println!(
        "pkcs11/local: throughput {:.1}%, CPU per lease {cpu_ratio}; goal: within 10 % of local: {}",
        ratio * 100.0,
        if ratio >= 0.9 && local.2 + pkcs11.2 == 0 {
            "MET"
        } else {
            "NOT MET"
        }
    );
}
