//! Lease load generator: how fast can one vault hand out access tokens, next
//! to the cheapest RPC it serves?
//!
//! ```text
//! cargo bench --bench lease_load -- [--backend sqlite|postgres] [--connections 10000]
//!     [--concurrency 64] [--seconds 10] [--warmup 2] [--channels 4]
//!     [--keyring local|pkcs11|both] [--flood N] [--flood-rounds 3] [--refusal-delay-ms N]
//!     [--replicas N] [--scale-to N]
//! ```
//!
//! `--replicas N` (PostgreSQL, local keyring) starts N − 1 more vault
//! processes (`tokenvault serve`) on the first vault's database and keyring
//! file after the workloads below, warms their caches with one unmeasured
//! phase spread over all N, and measures leases against the first vault
//! alone and spread over all N, alternately (1, N, N, 1) with the same
//! `--concurrency`: throughput, latency, the machine's CPU time per lease,
//! entries per audit batch and the audit chain head conflicts per batch over
//! every replica (`tokenvault_audit_head_conflicts_total` over
//! `tokenvault_audit_batch_entries_count`, from each one's `/metrics`).
//!
//! `--scale-to N` (e.g. 1000000) seeds a second vault of the same backend
//! and keyring with N connections through the bulk import path, then
//! measures leases on it and on the first vault alternately (first, N, N,
//! first): the goal is at least 80 % of the first vault's lease rate. Each
//! lease picks its connection uniformly, so at N the record cache misses and
//! the indexes are as deep as they are in production.
//!
//! `--keyring pkcs11` keeps the KEKs in a SoftHSM2 token made for the run (the
//! benchmark re-runs itself with `SOFTHSM2_CONF` pointing at it). `--keyring
//! both` starts one vault per keyring, on databases of their own, and measures
//! their leases alternately (local, pkcs11, pkcs11, local) in one run, so
//! that the comparison sees the same machine; leases served from cached
//! records must not touch the HSM, so pkcs11 should stay within 10 % of local.
//!
//! `--flood N` (default 0: off) measures leases under an anonymous flood.
//! After the workloads below (and the keyring comparison, if any), it runs
//! the LeaseToken workload `--flood-rounds` (3) times four more times on the
//! first vault, quiet, flood, flood, quiet (an ABBA order, repeated, so that
//! a drift in the machine or the growing database weighs on both kinds
//! alike), each `--warmup` seconds unmeasured and `--seconds` measured
//! with the same `--concurrency` and channels. During a flood phase, warmup
//! included, `N` more tasks each open an HTTP/2 connection of their own (as
//! separate attackers would) and call
//! `tokenvault.v1.ConnectionService/GetConnection` back to back with a
//! well-formed connection id and no `authorization` header at all: every
//! such call should end UNAUTHENTICATED. It prints the leases of both quiet
//! phases and of both flood phases, each with their latencies merged
//! (p50/p95/p99), the flood's calls per second and codes, the audit entries
//! its refusals wrote (`authn.refuse*` entries between the audit heads before
//! and after each flood phase; all flood calls come from one address, so per
//! `audit.refusal_window_seconds` window at most one entry at its first
//! refusal and one with the count at the window's end, which may fall after
//! the phase), whether the goal (lease p95 under flood at most 1.2 times the
//! quiet p95, no lease errors under flood) is met, and a markdown table row.
//! The flood phases do not count toward the lease and Health/Check goal
//! above. Each task waits for each answer, so a delay the server puts
//! before a refusal bounds the flood's rate (shown as its calls per second).
//! `--refusal-delay-ms` sets the vault's `auth.refusal_delay_ms` (default:
//! the vault's default), to see the flood with and without that delay.
//! Each task takes two file descriptors (the client and the server end of its
//! connection are both in this process): a large `N` may need `ulimit -n`.
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
//!    lease/health throughput ratio; the hot storage per lease (the
//!    database's growth over the lease workload's measured window, as
//!    `common::database_bytes` counts it, divided by the leases granted in
//!    it); whether the goals (lease throughput at least 50 % of
//!    Health/Check's, lease p99 at most 10 ms, no errors; at most 250 B of hot
//!    storage per lease) are met; and a markdown table row for BENCHMARKS.md.
//!
//! The client and the server share the machine and the same multi-threaded
//! tokio runtime (one worker thread per core unless `TOKIO_WORKER_THREADS`
//! says otherwise), so the numbers are a lower bound for a server with the
//! machine to itself. `cargo bench` builds with the optimised bench profile;
//! a debug build is far slower and says so in its output.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};
use tokenvault::domain::ConnectionId;
use tokenvault::grpc::refusals;
use tokenvault::proto::v1::connection_service_client::ConnectionServiceClient;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tokenvault::proto::v1::{GetConnectionRequest, LeaseTokenRequest};
use tokenvault::store::AuditFilter;
use tokenvault::vault::Vault;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Goal: lease throughput at least this share of Health/Check's.
const GOAL_RATIO: f64 = 0.5;
/// Goal: lease p99 at most this many milliseconds.
const GOAL_P99_MS: f64 = 10.0;
/// Goal: hot storage per lease (database growth over the measured window per
/// lease granted) at most this many bytes.
const GOAL_BYTES_PER_LEASE: u64 = 250;
/// Goal of `--scale-to`: lease throughput at the larger number of
/// connections, as a share of that at `--connections`.
const GOAL_SCALE_RATIO: f64 = 0.8;

/// Goal of `--flood`: lease p95 under the flood at most this many times the
/// quiet p95.
const GOAL_FLOOD_P95_RATIO: f64 = 1.2;
/// At most this many refusal entries are read back per flood phase (a few
/// per refusal window are expected).
const REFUSAL_ENTRIES_LIMIT: i64 = 100_000;

struct Args {
    backend: String,
    keyring: String,
    connections: usize,
    concurrency: usize,
    seconds: u64,
    warmup: u64,
    channels: usize,
    /// Anonymous flood tasks (0: no flood phases).
    flood: usize,
    /// `auth.refusal_delay_ms` of the vault (default: the vault's own).
    refusal_delay_ms: Option<u64>,
    /// Rounds of quiet, flood, flood, quiet phases (`--flood`).
    flood_rounds: usize,
    /// Vault processes for the replica phases (1: none).
    replicas: usize,
    /// Connections of a second vault for the scale phases (0: none).
    scale_to: usize,
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
        flood: 0,
        refusal_delay_ms: None,
        flood_rounds: 3,
        replicas: 1,
        scale_to: 0,
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
            "--flood" => a.flood = it.next().and_then(|v| v.parse().ok()).expect("--flood N"),
            "--flood-rounds" => {
                a.flood_rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--flood-rounds N");
            }
            "--replicas" => {
                a.replicas = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--replicas N");
            }
            "--scale-to" => {
                a.scale_to = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--scale-to N");
            }
            "--refusal-delay-ms" => {
                a.refusal_delay_ms = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--refusal-delay-ms N"),
                );
            }
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.connections > 0, "--connections must be at least 1");
    assert!(a.concurrency > 0, "--concurrency must be at least 1");
    assert!(a.channels > 0, "--channels must be at least 1");
    assert!(a.seconds > 0, "--seconds must be at least 1");
    assert!(a.flood_rounds > 0, "--flood-rounds must be at least 1");
    assert!(a.replicas > 0, "--replicas must be at least 1");
    assert!(
        a.replicas == 1 || (a.backend == "postgres" && a.keyring == "local"),
        "--replicas above 1 needs --backend postgres and --keyring local"
    );
    assert!(
        matches!(a.keyring.as_str(), "local" | "pkcs11" | "both"),
        "--keyring local|pkcs11|both"
    );
    a
}

#[path = "common/mod.rs"]
mod common;
#[path = "common/replicas.rs"]
mod replicas;
use common::{
    Bearer, BenchKeyring, CALENDAR_SCOPE, PURPOSE, XorShift, database, database_bytes,
    drop_database, percentile_ms, seed_calendar_connections, settle_database, softhsm_token,
    start_worker_vault_with,
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
    /// Latency of each successful call, microseconds, sorted: phases of one
    /// kind are merged from these (`--flood`).
    latencies_us: Vec<u32>,
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
    run_from(kind, a, channels, bearer, ids, Instant::now()).await
}

/// Runs one workload whose warmup starts at `t0` (now, or a moment ago when
/// something else was started with it).
async fn run_from(
    kind: Kind,
    a: &Args,
    channels: &[Channel],
    bearer: &Bearer,
    ids: &Arc<Vec<String>>,
    t0: Instant,
) -> Report {
    let rng = SystemRandom::new();
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
        latencies_us: all,
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
    let t0 = Instant::now();
    let sizes = {
        let url = vaults[0].url.clone();
        let measure_from = t0 + Duration::from_secs(a.warmup);
        let until = measure_from + Duration::from_secs(a.seconds);
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let from = database_bytes(&url).await;
            tokio::time::sleep_until(until.into()).await;
            (from, database_bytes(&url).await)
        })
    };
    let lease = run_from(Kind::Lease, &a, channels, bearer, ids, t0).await;
    lease.print();
    let hot_bytes_per_lease = match sizes.await {
        Ok((Some(from), Some(to))) if lease.ok > 0 => {
            let per_lease = to.saturating_sub(from) as f64 / lease.ok as f64;
            println!(
                "  storage    {per_lease:.0} B per lease (database {:+.1} MiB over the measured \
                 window, {} leases; goal <= {GOAL_BYTES_PER_LEASE} B)",
                (to as f64 - from as f64) / (1024.0 * 1024.0),
                lease.ok
            );
            Some(per_lease)
        }
        _ => {
            println!("  storage    n/a (the database size could not be read)");
            None
        }
    };
    if vaults.len() == 2 {
        compare_keyrings(&a, &vaults, lease.clone()).await;
    }
    if a.flood > 0 {
        flood_phases(&a, &vaults[0]).await;
    }
    if a.replicas > 1 {
        replica_phases(&a, &vaults[0]).await;
    }
    if a.scale_to > 0 {
        scale_phases(&a, &vaults[0], lease.clone()).await;
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
    match hot_bytes_per_lease {
        Some(b) if b <= GOAL_BYTES_PER_LEASE as f64 => {
            println!("goal: hot storage <= {GOAL_BYTES_PER_LEASE} B per lease: MET ({b:.0} B)");
        }
        Some(b) => {
            println!("goal: hot storage <= {GOAL_BYTES_PER_LEASE} B per lease: NOT MET ({b:.0} B)")
        }
        None => println!("goal: hot storage <= {GOAL_BYTES_PER_LEASE} B per lease: not measured"),
    }
    let storage = hot_bytes_per_lease.map_or("n/a".to_owned(), |b| format!("{b:.0} B"));
    println!();
    println!(
        "| backend | connections | concurrency | health calls/s | lease calls/s | ratio | lease p50 | lease p99 | storage per lease |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {:.0} | {:.0} | {:.1}% | {:.2} ms | {:.2} ms | {storage} |",
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
        for family in [
            "tokenvault_audit_batch_entries",
            "tokenvault_audit_batch_seconds",
            "tokenvault_lease_read_batch_ids",
            "tokenvault_lease_read_batch_seconds",
            "tokenvault_lease_stage_seconds",
            "tokenvault_sqlite_checkpoint_blocking_seconds",
        ] {
            for h in histograms(&text, family) {
                println!(
                    "  {family}{}: count {:.0}, mean {:.4}, p50 <= {}, p99 <= {}",
                    h.labels,
                    h.count,
                    h.sum / h.count.max(1.0),
                    h.quantile(0.5),
                    h.quantile(0.99)
                );
            }
        }
        for line in text
            .lines()
            .filter(|l| l.starts_with("tokenvault_dek_cache_total{"))
        {
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
    /// The database's URL (for its size).
    url: String,
    /// Where more connections come from (`--flood` opens one per task).
    endpoint: Endpoint,
    channels: Vec<Channel>,
    bearer: Bearer,
    /// The SHA-256 of the worker's API key, as a configuration names it.
    key_sha256: String,
    ids: Arc<Vec<String>>,
}

impl BenchVault {
    async fn start(a: &Args, keyring: BenchKeyring) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, cleanup) = database(&a.backend, dir.path()).await;
        let rng = SystemRandom::new();
        let refusal_delay_ms = a.refusal_delay_ms;
        let (server, key) = start_worker_vault_with(dir.path(), url.clone(), &rng, &keyring, |c| {
            if let Some(ms) = refusal_delay_ms {
                c.auth.refusal_delay_ms = ms;
            }
        })
        .await;
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
            url,
            endpoint,
            channels,
            bearer: Bearer::key(&key),
            key_sha256: tokenvault::grpc::auth::Authenticator::hash_api_key(&key),
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

/// `--scale-to N`: a second vault of the same backend and keyring seeded with
/// N connections, and leases measured on the two alternately (the first
/// vault was measured first; then the large one twice, then the first
/// again), so a drift over the run falls on both. Leases pick their
/// connection uniformly, so at N the reads miss the caches and walk deeper
/// indexes as they would in production.
async fn scale_phases(a: &Args, small: &BenchVault, first_small: Report) {
    let big_args = Args {
        connections: a.scale_to,
        backend: a.backend.clone(),
        keyring: a.keyring.clone(),
        ..*a
    };
    println!();
    println!(
        "scale: seeding a second vault with {} connections",
        a.scale_to
    );
    let big = BenchVault::start(&big_args, small.keyring.clone()).await;
    let settling = settle_database(&big.url).await;
    println!(
        "  settled the database after the import in {settling:.2?} ({})",
        if a.backend == "sqlite" {
            "WAL checkpointed and truncated"
        } else {
            "VACUUM ANALYZE"
        }
    );
    if let Some(bytes) = database_bytes(&big.url).await {
        println!(
            "  database after seeding: {:.1} MiB ({:.0} B per connection)",
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / a.scale_to as f64
        );
    }
    let mut reports: [Vec<Report>; 2] = [vec![first_small], Vec::new()];
    for i in [1, 1, 0] {
        let v = if i == 0 { small } else { &big };
        let r = run(Kind::Lease, a, &v.channels, &v.bearer, &v.ids).await;
        println!("({} connections)", v.ids.len());
        r.print();
        reports[i].push(r);
    }
    let total = |rs: &[Report]| {
        let ok: usize = rs.iter().map(|r| r.ok).sum();
        let secs: f64 = rs.iter().map(|r| r.seconds).sum();
        let errors: u64 = rs.iter().map(Report::error_count).sum();
        let p99 = rs.iter().map(|r| r.p99).fold(0.0, f64::max);
        (ok as f64 / secs, errors, p99)
    };
    let (s, b) = (total(&reports[0]), total(&reports[1]));
    println!();
    println!(
        "connections, leases measured alternately (2 x {} s each):",
        a.seconds
    );
    for (n, (rate, errors, p99)) in [(a.connections, s), (a.scale_to, b)] {
        println!(
            "  {n:>9} connections {rate:>8.0} leases/s  worst p99 {p99:.2} ms  errors {errors}"
        );
    }
    let ratio = b.0 / s.0;
    let verdict = if ratio >= GOAL_SCALE_RATIO && b.1 == 0 {
        "MET"
    } else {
        "NOT MET"
    };
    println!(
        "goal: leases at {} connections >= {:.0}% of those at {}: {verdict} ({:.1}%)",
        a.scale_to,
        GOAL_SCALE_RATIO * 100.0,
        a.connections,
        ratio * 100.0
    );
    println!(
        "| backend | connections | leases/s | worst p99 | ratio |\n| --- | --- | --- | --- | --- |\n\
         | {} | {} | {:.0} | {:.2} ms | 100% |\n| {} | {} | {:.0} | {:.2} ms | {:.1}% |",
        a.backend,
        a.connections,
        s.0,
        s.2,
        a.backend,
        a.scale_to,
        b.0,
        b.2,
        ratio * 100.0
    );
    big.stop().await;
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

/// What the anonymous callers of `--flood` saw in measured windows.
#[derive(Default)]
struct FloodStats {
    /// Calls started in a measured window.
    calls: u64,
    /// Those calls by the code they ended with (`Ok` for a success).
    codes: BTreeMap<String, u64>,
}

impl FloodStats {
    fn merge(&mut self, other: FloodStats) {
        self.calls += other.calls;
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
    }

    /// Calls that did not end UNAUTHENTICATED (a success or another refusal).
    fn unexpected(&self) -> u64 {
        self.codes
            .iter()
            .filter(|(code, _)| code.as_str() != "Unauthenticated")
            .map(|(_, n)| n)
            .sum()
    }

    /// `{Unauthenticated: n, …}`.
    fn codes_text(&self) -> String {
        let list: Vec<String> = self
            .codes
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect();
        format!("{{{}}}", list.join(", "))
    }
}

/// One anonymous caller of `--flood`: `ConnectionService/GetConnection` back
/// to back on its own connection, with a well-formed connection id and no
/// `authorization` header, until `stop`; counts the calls that start within
/// `[measure_from, until)` by the code they end with.
async fn flood_task(
    channel: Channel,
    stop: Arc<AtomicBool>,
    measure_from: Instant,
    until: Instant,
) -> FloodStats {
    let mut client = ConnectionServiceClient::new(channel);
    // `conn_<uuid>`: it passes the request's validation, were it reached.
    let request = GetConnectionRequest {
        connection_id: ConnectionId::generate().to_string(),
    };
    let mut codes: HashMap<tonic::Code, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let code = match client.get_connection(request.clone()).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        if start >= measure_from && start < until {
            *codes.entry(code).or_default() += 1;
        }
    }
    FloodStats {
        calls: codes.values().sum(),
        codes: codes
            .into_iter()
            .map(|(code, n)| (format!("{code:?}"), n))
            .collect(),
    }
}

/// One LeaseToken phase of `--flood` on `v`, with `flood` anonymous tasks
/// (each on a connection of its own, opened before the phase) calling for
/// the whole phase, warmup included; none for a quiet phase.
async fn lease_phase(a: &Args, v: &BenchVault, flood: usize) -> (Report, FloodStats) {
    let mut flood_channels = Vec::with_capacity(flood);
    for _ in 0..flood {
        flood_channels.push(
            v.endpoint
                .connect()
                .await
                .expect("connect a flood task to the vault"),
        );
    }
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs(a.warmup);
    let until = measure_from + Duration::from_secs(a.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = flood_channels
        .into_iter()
        .map(|channel| tokio::spawn(flood_task(channel, stop.clone(), measure_from, until)))
        .collect();
    let report = run_from(Kind::Lease, a, &v.channels, &v.bearer, &v.ids, t0).await;
    stop.store(true, Ordering::Relaxed);
    let mut stats = FloodStats::default();
    for h in flooders {
        stats.merge(h.await.expect("flood task panicked"));
    }
    (report, stats)
}

/// The newest audit sequence number (0 when the log is empty); `None` when
/// the store cannot say.
async fn audit_seq(vault: &Vault) -> Option<i64> {
    vault.store().audit_head().await.ok().map(|(seq, _)| seq)
}

/// Audit entries with a sequence number in `(from, to]`: how many in all
/// (the leases' own included) and how many are refusal entries
/// (`authn.refuse`, `authn.refuse.overflow`).
async fn audit_growth(vault: &Vault, from: i64, to: i64) -> Option<(i64, usize)> {
    let filter = AuditFilter {
        action_prefix: Some(refusals::REFUSE.to_owned()),
        after_seq: Some(from),
        before_seq: Some(to + 1),
        ascending: true,
        ..Default::default()
    };
    let (rows, _) = vault
        .audit_query(&filter, REFUSAL_ENTRIES_LIMIT)
        .await
        .ok()?;
    Some((to - from, rows.len()))
}

/// Leases of several phases taken together.
struct Combined {
    leases_per_second: f64,
    errors: u64,
    p50: f64,
    p95: f64,
    p99: f64,
}

impl Combined {
    /// Throughput over the phases' measured windows, their errors, and the
    /// percentiles of their latencies merged.
    fn of(reports: &[Report]) -> Self {
        let mut all: Vec<u32> = reports
            .iter()
            .flat_map(|r| r.latencies_us.iter().copied())
            .collect();
        all.sort_unstable();
        let seconds: f64 = reports.iter().map(|r| r.seconds).sum();
        Self {
            leases_per_second: all.len() as f64 / seconds,
            errors: reports.iter().map(Report::error_count).sum(),
            p50: percentile_ms(&all, 50.0),
            p95: percentile_ms(&all, 95.0),
            p99: percentile_ms(&all, 99.0),
        }
    }

    fn print(&self, name: &str, what: &str) {
        println!(
            "  {name:<5}  {:>8.0} leases/s  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  errors {}  ({what})",
            self.leases_per_second, self.p50, self.p95, self.p99, self.errors
        );
    }
}

/// `--flood N`: leases on `v` measured quiet, under the anonymous flood,
/// under it again and quiet again; prints each phase, then both kinds with
/// their phases merged, the flood's calls and codes, the refusal entries it
/// wrote to the audit log, the goal and a markdown table row.
async fn flood_phases(a: &Args, v: &BenchVault) {
    let vault: &Vault = &v.server.vault;
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    let mut calls = FloodStats::default();
    // (all entries, refusal entries) written during the flood phases.
    let mut audit: Option<(i64, usize)> = Some((0, 0));
    println!();
    println!(
        "flood: leases quiet, under {} anonymous tasks, again, and quiet again ({} keyring)",
        a.flood,
        v.keyring.name()
    );
    let phases: Vec<usize> = (0..a.flood_rounds)
        .flat_map(|_| [0, a.flood, a.flood, 0])
        .collect();
    let total = phases.len();
    for (i, flood) in phases.into_iter().enumerate() {
        let before = audit_seq(vault).await;
        let (report, stats) = lease_phase(a, v, flood).await;
        let after = audit_seq(vault).await;
        if flood == 0 {
            println!("(phase {} of {total}: quiet)", i + 1);
            report.print();
            quiet.push(report);
            continue;
        }
        println!("(phase {} of {total}: {flood} anonymous tasks)", i + 1);
        report.print();
        println!(
            "  flood      {:>10} calls ({:.0} calls/s), codes {}",
            stats.calls,
            stats.calls as f64 / report.seconds,
            stats.codes_text()
        );
        let growth = match (before, after) {
            (Some(from), Some(to)) => audit_growth(vault, from, to).await,
            _ => None,
        };
        if let Some((all, refused)) = growth {
            println!(
                "  audit      {all} entries written during the phase, {refused} of them refusals"
            );
        }
        audit = audit
            .zip(growth)
            .map(|((all, refused), (more, more_refused))| (all + more, refused + more_refused));
        flooded.push(report);
        calls.merge(stats);
    }

    let (quiet, flooded) = (Combined::of(&quiet), Combined::of(&flooded));
    let flood_seconds = 2.0 * a.flood_rounds as f64 * a.seconds as f64;
    let calls_per_second = calls.calls as f64 / flood_seconds;
    let refusal_entries = audit.map_or("n/a".to_owned(), |(_, refused)| refused.to_string());
    let ratio = flooded.p95 / quiet.p95;
    println!();
    println!(
        "flood: {} anonymous tasks (GetConnection without credentials), each on its own connection",
        a.flood
    );
    quiet.print("quiet", "combined over both quiet phases");
    flooded.print("flood", "combined over both flood phases");
    println!(
        "  flood calls/s: {calls_per_second:.0}, codes: {}, audit entries written during flood: {refusal_entries} refusal entries{}",
        calls.codes_text(),
        audit.map_or(String::new(), |(all, _)| format!(
            " ({all} entries in all, the leases' own included)"
        ))
    );
    if calls.unexpected() > 0 {
        println!(
            "  WARNING: {} of {} flood calls did not end UNAUTHENTICATED",
            calls.unexpected(),
            calls.calls
        );
    }
    let verdict = if ratio.is_nan() || ratio > GOAL_FLOOD_P95_RATIO {
        "NOT met".to_owned()
    } else if flooded.errors > 0 {
        format!("NOT met ({} lease errors under flood)", flooded.errors)
    } else {
        "met".to_owned()
    };
    println!(
        "  p95 under flood / quiet p95: {ratio:.2}  (goal <= {GOAL_FLOOD_P95_RATIO:.2}): {verdict}"
    );
    println!();
    println!(
        "| backend | concurrency | flood tasks | quiet lease p95 | flood lease p95 | ratio | flood calls/s | audit entries during flood |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {:.2} ms | {:.2} ms | {ratio:.2} | {calls_per_second:.0} | {refusal_entries} |",
        a.backend, a.concurrency, a.flood, quiet.p95, flooded.p95
    );
}

/// `--replicas N` (PostgreSQL): N − 1 more vault processes on the first
/// vault's database and keyring; leases measured against the first vault
/// alone and spread over all N, alternately (1, N, N, 1), with the same
/// client concurrency; for each, the head conflicts per audit batch summed
/// over every replica's `/metrics` (a batch whose chain head another
/// replica moved is sealed again under the lock), the entries per batch and
/// the machine's CPU time per lease (every process: the replicas' and
/// PostgreSQL's too).
async fn replica_phases(a: &Args, v: &BenchVault) {
    let n = a.replicas;
    let started = Instant::now();
    let others = replicas::start(
        n - 1,
        &v.url,
        &v.dir.path().join("keyring.json"),
        &v.key_sha256,
    )
    .await;
    println!();
    println!(
        "replicas: {} more vault processes on the same database, healthy in {:.1?}",
        n - 1,
        started.elapsed()
    );
    let mut spread = v.channels.clone();
    for r in &others {
        let endpoint = Endpoint::from_shared(format!("http://{}", r.grpc))
            .expect("endpoint")
            .tcp_nodelay(true);
        for _ in 0..a.channels {
            spread.push(endpoint.connect().await.expect("connect to a replica"));
        }
    }
    // The new replicas start with empty record and DEK caches, which the
    // first vault has long filled: one unmeasured phase over all of them
    // fills theirs, so that no measured phase pays for it.
    let warm = run(Kind::Lease, a, &spread, &v.bearer, &v.ids).await;
    println!(
        "  warm-up over every replica: {:.0} leases/s (not counted)",
        warm.throughput()
    );
    let mut endpoints = vec![v.server.http_addr];
    endpoints.extend(others.iter().map(|r| r.http));
    const NAMES: [&str; 3] = [
        "tokenvault_audit_head_conflicts_total",
        "tokenvault_audit_batch_entries_count",
        "tokenvault_audit_batch_entries_sum",
    ];
    let (mut alone, mut fleet) = (Vec::new(), Vec::new());
    let (mut alone_counts, mut fleet_counts) = ([0.0; 2], [0.0; 2]);
    for (i, many) in [false, true, true, false].into_iter().enumerate() {
        let channels = if many { &spread } else { &v.channels };
        let before = replicas::metric_sums(&endpoints, &NAMES).await;
        let report = run(Kind::Lease, a, channels, &v.bearer, &v.ids).await;
        let after = replicas::metric_sums(&endpoints, &NAMES).await;
        let (conflicts, batches) = (after[0] - before[0], after[1] - before[1]);
        let entries = after[2] - before[2];
        println!(
            "  phase {}: {} {:>8.0} leases/s  p99 {:.2} ms  errors {}  head conflicts {conflicts:.0} in {batches:.0} batches ({:.1} entries each)  machine CPU {} per lease",
            i + 1,
            if many {
                format!("{n} replicas")
            } else {
                "1 replica ".to_owned()
            },
            report.throughput(),
            report.p99,
            report.error_count(),
            entries / batches.max(1.0),
            report
                .machine_us_per_call()
                .map_or_else(|| "?".to_owned(), |us| format!("{us:.0} µs"))
        );
        let counts = if many {
            &mut fleet_counts
        } else {
            &mut alone_counts
        };
        counts[0] += conflicts;
        counts[1] += batches;
        if many {
            fleet.push(report);
        } else {
            alone.push(report);
        }
    }
    let (one, all) = (Combined::of(&alone), Combined::of(&fleet));
    one.print("1", "one vault, phases 1 and 4");
    all.print(&n.to_string(), "spread over every replica, phases 2 and 3");
    let per_batch = |c: [f64; 2]| if c[1] > 0.0 { c[0] / c[1] } else { f64::NAN };
    println!(
        "head conflicts per batch: {:.3} with 1 replica, {:.3} with {n} ({:.0} of {:.0} batches)",
        per_batch(alone_counts),
        per_batch(fleet_counts),
        fleet_counts[0],
        fleet_counts[1]
    );
    let ratio = all.leases_per_second / one.leases_per_second;
    println!(
        "goal: {n} replicas lease at least as fast as 1 and no batch waits on another replica's \
         chain: {} (throughput {:.2}x, {:.3} conflicts per batch)",
        if ratio >= 1.0 && fleet_counts[0] == 0.0 && all.errors == 0 {
            "MET"
        } else {
            "NOT MET"
        },
        ratio,
        per_batch(fleet_counts)
    );
    println!();
    println!("| replicas | leases/s | p50 | p99 | errors | head conflicts per batch |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let n_label = n.to_string();
    for (label, c, counts) in [
        ("1", &one, alone_counts),
        (n_label.as_str(), &all, fleet_counts),
    ] {
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.3} |",
            c.leases_per_second,
            c.p50,
            c.p99,
            c.errors,
            per_batch(counts)
        );
    }
    drop(spread);
    drop(others);
}

/// One series of a histogram in the Prometheus text format.
struct Histogram {
    /// Its labels other than `le`, as written (`{stage="read"}`, or empty).
    labels: String,
    /// Cumulative counts by upper bound, ascending.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    /// The upper bound of the first bucket holding the `q` quantile (what
    /// `histogram_quantile` would interpolate within), as text.
    fn quantile(&self, q: f64) -> String {
        let want = q * self.count;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want && *n > 0.0)
            .map_or_else(|| "n/a".to_owned(), |(le, _)| format!("{le}"))
    }
}

/// The series of `family` in a `/metrics` text.
fn histograms(text: &str, family: &str) -> Vec<Histogram> {
    let mut by_labels: BTreeMap<String, Histogram> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (kind, labels) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        match kind {
            "_bucket" => {
                // `le` is the last label the exporter writes.
                let (others, le) = match labels.rfind("le=\"") {
                    Some(i) => (&labels[..i], &labels[i + 4..labels.len() - 2]),
                    None => continue,
                };
                let others = others.trim_end_matches(',');
                let others = if others == "{" {
                    String::new()
                } else {
                    format!("{others}}}")
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                let h = by_labels
                    .entry(others.clone())
                    .or_insert_with(|| Histogram {
                        labels: others,
                        buckets: Vec::new(),
                        sum: 0.0,
                        count: 0.0,
                    });
                h.buckets.push((bound, value));
            }
            "_sum" | "_count" => {
                let h = by_labels
                    .entry(labels.to_owned())
                    .or_insert_with(|| Histogram {
                        labels: labels.to_owned(),
                        buckets: Vec::new(),
                        sum: 0.0,
                        count: 0.0,
                    });
                if kind == "_sum" {
                    h.sum = value;
                } else {
                    h.count = value;
                }
            }
            _ => {}
        }
    }
    let mut all: Vec<Histogram> = by_labels.into_values().filter(|h| h.count > 0.0).collect();
    for h in &mut all {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    all
}
