//! Steady-rate lease soak: does the vault hold a fixed request rate for a
//! long time without errors, latency creep or memory growth?
//!
//! ```text
//! cargo bench --locked --bench soak -- [--backend sqlite|postgres] [--minutes 10]
//!     [--rate 500] [--connections 1000] [--channels 4] [--max-in-flight 1024]
//!     [--deadline-ms 5000] [--interval 60] [--rss-from N]
//!     [--hot-retention SECONDS [--archive-interval 10]] [--lease-ttl 900] [--dbstat]
//! ```
//!
//! PostgreSQL: `TV_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); a fresh database is created
//! and dropped afterwards. SQLite: a fresh file in a temporary directory.
//!
//! What it does, in one process against one server:
//!
//! 1. Starts the real server (`tokenvault::server::start`, plain gRPC on
//!    127.0.0.1) with one worker API key and the purpose `calendar_sync`, and
//!    seeds `--connections` ACTIVE Calendar connections through the bulk
//!    import path, each with an access token valid for two hours (longer than
//!    any soak, so no lease needs Google).
//! 2. Open loop at a fixed rate: every 5 ms a tokio interval tick sends as
//!    many `LeaseService/LeaseToken` calls (random connection, purpose
//!    `calendar_sync`, `grpc-timeout` of `--deadline-ms`) as are due to keep
//!    `--rate` calls per second since the start, each in its own task, spread
//!    over `--channels` HTTP/2 connections. A call that would exceed
//!    `--max-in-flight` is not sent and counts as an error ("not sent"): a
//!    server that falls behind shows up as errors, not as a lower rate.
//! 3. Every `--interval` seconds (a "minute") prints: calls sent, succeeded,
//!    failed (by gRPC code), the p50/p99/max latency of the calls that
//!    completed in that interval (client-side), the process RSS (`VmRSS` of
//!    /proc/self/status: server and client together) and the database's size
//!    (SQLite's database file, or `pg_database_size`; neither counts the
//!    backend's WAL).
//! 4. At the end: totals, RSS at start, after seeding, after the first
//!    interval and at the end, its growth to the end from the first interval,
//!    from half-way and from the last third, and a verdict line: PASS when no
//!    call failed, the achieved rate is within 1 % of `--rate` and RSS grew
//!    by less than 10 % from the end of interval `--rss-from` (default: the
//!    half-way interval) to the end. A cache that warms up (SQLite keeps up to
//!    32 MiB of pages per pooled connection, the PostgreSQL pool grows to 16
//!    connections with their statement caches) grows and then levels off; a
//!    leak keeps growing over the second half too.
//!
//! Without `--hot-retention`, lease rows and audit entries accumulate in the
//! database for the whole run (500 calls/s for 10 minutes is 300,000 of
//! each): the soak also shows whether latency creeps as they grow. With it,
//! the audit archive is on (`audit.archive_dir` in the soak's directory,
//! `audit.hot_retention_seconds` and `lease.record_retention_seconds` set to
//! it, leases `--lease-ttl` long): the database should stop growing once
//! the first retention window has passed, and the summary adds the
//! database's growth from then to the end (judged: < 10 %), the archive's
//! size and an `audit verify` over archive and live table (judged: it
//! passes).
//!
//! On SQLite each interval's line also shows the database file's free
//! pages and the WAL file, whose largest size is judged against its bound
//! (`journal_size_limit`, 64 MiB): the file keeps the most the WAL has held
//! up to that, so it grows in steps until then and is bounded, not flat.
//! `--dbstat` adds, per interval, the space each table and index takes
//! (SQLite's `dbstat`, which reads every page: a diagnostic that costs the
//! soak some CPU).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom as _, SystemRandom};
use tokenvault::proto::v1::LeaseTokenRequest;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[path = "common/mod.rs"]
mod common;
use common::{
    Bearer, CALENDAR_SCOPE, PURPOSE, XorShift, database, drop_database, percentile_ms,
    seed_calendar_connections, start_worker_vault_with,
};

/// How often the generator wakes up to send what is due.
const TICK: Duration = Duration::from_millis(5);
/// Verdict: RSS may grow by less than this from the first interval to the end.
const MAX_RSS_GROWTH: f64 = 0.10;
/// Verdict: the achieved rate must be at least this share of `--rate`.
const MIN_RATE_SHARE: f64 = 0.99;
/// Verdict (SQLite, `--hot-retention`): the most the WAL file may take at
/// the end of an interval (the store's `journal_size_limit`).
const MAX_WAL_BYTES: u64 = 64 * 1024 * 1024;

struct Args {
    backend: String,
    minutes: f64,
    rate: f64,
    connections: usize,
    channels: usize,
    max_in_flight: usize,
    deadline: Duration,
    interval: Duration,
    /// Interval from which RSS growth is judged; 0 = half-way.
    rss_from: usize,
    /// With a value: the audit archive on, entries and lease rows kept this
    /// many seconds in the database.
    hot_retention: Option<u64>,
    /// `audit.archive_interval_seconds` when the archive is on.
    archive_interval: u64,
    /// `lease.max_ttl_seconds`.
    lease_ttl: u64,
    /// SQLite: print each table's and index's size every interval.
    dbstat: bool,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        minutes: 10.0,
        rate: 500.0,
        connections: 1000,
        channels: 4,
        max_in_flight: 1024,
        deadline: Duration::from_secs(5),
        interval: Duration::from_secs(60),
        rss_from: 0,
        hot_retention: None,
        archive_interval: 10,
        lease_ttl: 900,
        dbstat: false,
    };
    let mut it = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(v: Option<String>, flag: &str) -> T {
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => a.backend = it.next().expect("--backend sqlite|postgres"),
            "--minutes" => a.minutes = num(it.next(), "--minutes"),
            "--rate" => a.rate = num(it.next(), "--rate"),
            "--connections" => a.connections = num(it.next(), "--connections"),
            "--channels" => a.channels = num(it.next(), "--channels"),
            "--max-in-flight" => a.max_in_flight = num(it.next(), "--max-in-flight"),
            "--deadline-ms" => a.deadline = Duration::from_millis(num(it.next(), "--deadline-ms")),
            "--interval" => a.interval = Duration::from_secs(num(it.next(), "--interval")),
            "--rss-from" => a.rss_from = num(it.next(), "--rss-from"),
            "--hot-retention" => a.hot_retention = Some(num(it.next(), "--hot-retention")),
            "--archive-interval" => a.archive_interval = num(it.next(), "--archive-interval"),
            "--lease-ttl" => a.lease_ttl = num(it.next(), "--lease-ttl"),
            "--dbstat" => a.dbstat = true,
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.minutes > 0.0, "--minutes must be positive");
    assert!(a.rate > 0.0, "--rate must be positive");
    assert!(a.connections > 0, "--connections must be at least 1");
    assert!(a.channels > 0, "--channels must be at least 1");
    assert!(a.max_in_flight > 0, "--max-in-flight must be at least 1");
    assert!(!a.interval.is_zero(), "--interval must be at least 1");
    a
}

type Client = LeaseServiceClient<InterceptedService<Channel, Bearer>>;

/// The process's resident set size in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// The database's size on disk: SQLite's database file, or PostgreSQL's
/// `pg_database_size` (through a one-connection pool of the soak's own).
/// Neither counts the WAL: PostgreSQL's is outside the database, and
/// SQLite's is reported and judged on its own ([`DbSize::wal_bytes`]).
enum DbSize {
    /// The file, and a read-only connection of the soak's own to it.
    Sqlite(std::path::PathBuf, sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl DbSize {
    async fn bytes(&self) -> Option<u64> {
        match self {
            DbSize::Sqlite(path, _) => std::fs::metadata(path).ok().map(|m| m.len()),
            DbSize::Postgres(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT pg_database_size(current_database())")
                    .fetch_one(pool)
                    .await
                    .ok()
                    .and_then(|b| u64::try_from(b).ok())
            }
        }
    }

    /// SQLite: prints an interval's [`DbSize::parts`] line and folds the WAL's
    /// size into `wal_max`, the largest seen at the end of an interval.
    async fn report_parts(&self, tables: bool, wal_max: &mut Option<u64>) {
        if let Some(parts) = self.parts(tables).await {
            println!("         db: {parts}");
        }
        *wal_max = (*wal_max).max(self.wal_bytes());
    }

    /// SQLite: the size of the WAL file.
    fn wal_bytes(&self) -> Option<u64> {
        match self {
            DbSize::Sqlite(path, _) => std::fs::metadata(path.with_extension("db-wal"))
                .ok()
                .map(|m| m.len()),
            DbSize::Postgres(_) => None,
        }
    }

    /// SQLite: the database file, the part of it on the free list, and the
    /// WAL, in MiB (`file 150.2 (free 3.1) + WAL 12.0`), and with `tables`,
    /// every table's and index's size from `dbstat`, largest first.
    async fn parts(&self, tables: bool) -> Option<String> {
        let DbSize::Sqlite(path, pool) = self else {
            return None;
        };
        let mib = |b: i64| b as f64 / 1048576.0;
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len() as i64);
        let page: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(pool)
            .await
            .ok()?;
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(pool)
            .await
            .ok()?;
        let wal = self.wal_bytes().map_or(0, |b| b as i64);
        let mut text = format!(
            "file {:.1} (free {:.1}) + WAL {:.1}",
            mib(len(path)),
            mib(free * page),
            mib(wal)
        );
        if tables {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT name, SUM(pgsize) AS bytes FROM dbstat GROUP BY name ORDER BY bytes DESC",
            )
            .fetch_all(pool)
            .await
            .ok()?;
            for (name, bytes) in rows.iter().filter(|(_, b)| mib(*b) >= 0.1) {
                text.push_str(&format!("; {name} {:.1}", mib(*bytes)));
            }
        }
        Some(text)
    }
}

/// Calls completed in the current interval.
#[derive(Default)]
struct Window {
    /// Latency of each successful call, microseconds.
    ok_us: Vec<u32>,
    /// Failed calls by code, with the first message seen.
    errors: BTreeMap<String, (u64, String)>,
}

impl Window {
    fn error(&mut self, code: String, message: &str) {
        self.errors
            .entry(code)
            .or_insert_with(|| (0, message.to_owned()))
            .0 += 1;
    }
}

/// Running totals over the whole soak.
#[derive(Default)]
struct Totals {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, (u64, String)>,
    worst_p99: f64,
    /// RSS at the end of each interval.
    rss: Vec<Option<u64>>,
    /// The database's size at the end of each interval, bytes.
    db: Vec<Option<u64>>,
}

impl Totals {
    fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }
}

/// Prints one interval's line and folds it into the totals.
fn report(index: usize, sent: u64, window: Window, db: Option<u64>, totals: &mut Totals) {
    let db_mib = db.map_or_else(
        || "?".to_owned(),
        |b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)),
    );
    let mut ok = window.ok_us;
    ok.sort_unstable();
    let errors: u64 = window.errors.values().map(|(n, _)| n).sum();
    let (p50, p99) = (percentile_ms(&ok, 50.0), percentile_ms(&ok, 99.0));
    let max = ok.last().map_or(f64::NAN, |&m| f64::from(m) / 1000.0);
    let rss = rss_kib();
    println!(
        "{index:>6} {sent:>9} {:>9} {errors:>7} {p50:>8.2} {p99:>8.2} {max:>8.2} {:>9} {db_mib:>8}",
        ok.len(),
        mib(rss)
    );
    for (code, (n, msg)) in &window.errors {
        println!("         error {code}: {n}  (first message: {msg:?})");
        let e = totals
            .errors
            .entry(code.clone())
            .or_insert((0, msg.clone()));
        e.0 += n;
    }
    totals.sent += sent;
    totals.ok += ok.len() as u64;
    if p99 > totals.worst_p99 {
        totals.worst_p99 = p99;
    }
    totals.rss.push(rss);
    totals.db.push(db);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rss_start = rss_kib();
    let a = args();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug assertions ON: not an optimised build, numbers are not representative"
    } else {
        "optimised (debug assertions off; `cargo bench` uses the bench/release profile)"
    };
    let duration = Duration::from_secs_f64(a.minutes * 60.0);
    println!(
        "soak: backend {}, {} calls/s for {:.1} min ({} calls), {} connections, {} channels, \
         max {} in flight, deadline {:?}, a line every {:?}",
        a.backend,
        a.rate,
        a.minutes,
        (a.rate * duration.as_secs_f64()).round(),
        a.connections,
        a.channels,
        a.max_in_flight,
        a.deadline,
        a.interval
    );
    println!("machine: {cores} cores (available_parallelism); client and server share them");
    println!("build: {profile}");
    println!("rss at start: {} MiB", mib(rss_start));

    // 1. Database, configuration, server, connections.
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, cleanup) = database(&a.backend, dir.path()).await;
    let rng = SystemRandom::new();
    let archive_dir = dir.path().join("archive");
    let (server, key) = start_worker_vault_with(
        dir.path(),
        url.clone(),
        &rng,
        &common::BenchKeyring::Local,
        |c| {
            c.lease.max_ttl_seconds = a.lease_ttl;
            if let Some(keep) = a.hot_retention {
                c.audit.archive_dir = Some(archive_dir.clone());
                c.audit.hot_retention_seconds = keep;
                c.audit.archive_interval_seconds = a.archive_interval;
                c.lease.record_retention_seconds = keep;
            }
        },
    )
    .await;
    // After the server, which creates the SQLite file.
    let db_size = match &cleanup {
        None => {
            let file = dir.path().join("bench.db");
            let reader = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&file)
                        .read_only(true),
                )
                .await
                .expect("open the bench database to measure it");
            DbSize::Sqlite(file, reader)
        }
        Some(_) => DbSize::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .expect("connect to the bench database"),
        ),
    };
    if let Some(keep) = a.hot_retention {
        println!(
            "audit archive on: entries and lease rows kept {keep} s, archived every {} s, \
             leases {} s long",
            a.archive_interval, a.lease_ttl
        );
    }

    let token_life = Duration::from_secs(7200).max(duration + Duration::from_secs(900));
    let ids =
        seed_calendar_connections(&server.vault, "soak", a.connections, token_life, &rng).await;
    let ids = Arc::new(ids);
    let rss_seeded = rss_kib();
    println!(
        "seeded {} connections; rss {} MiB",
        ids.len(),
        mib(rss_seeded)
    );

    let endpoint = Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .tcp_nodelay(true);
    let bearer = Bearer::key(&key);
    let mut clients: Vec<Client> = Vec::with_capacity(a.channels);
    for _ in 0..a.channels {
        let channel = endpoint.connect().await.expect("connect to the vault");
        clients.push(LeaseServiceClient::with_interceptor(
            channel,
            bearer.clone(),
        ));
    }

    // 2. The open loop.
    println!();
    println!(
        "{:>6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "minute", "sent", "ok", "errors", "p50 ms", "p99 ms", "max ms", "rss MiB", "db MiB"
    );
    let window = Arc::new(Mutex::new(Window::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(a.max_in_flight));
    let mut totals = Totals::default();
    // SQLite: the largest the WAL file was at the end of an interval.
    let mut wal_max: Option<u64> = None;
    let mut pick = {
        let mut seed = [0u8; 8];
        rng.fill(&mut seed).expect("system randomness");
        XorShift(u64::from_le_bytes(seed) | 1)
    };
    let start = Instant::now();
    let end = start + duration;
    let mut next_report = start + a.interval;
    let mut reported = 0usize;
    let mut sent = 0u64;
    let mut sent_in_window = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = Instant::now().min(end);
        let due = ((now - start).as_secs_f64() * a.rate) as u64;
        while sent < due {
            let mut client = clients[(sent % clients.len() as u64) as usize].clone();
            sent += 1;
            sent_in_window += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                window
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .error("NotSent".into(), "--max-in-flight calls already waiting");
                continue;
            };
            let id = ids[pick.below(ids.len())].clone();
            let window = window.clone();
            let deadline = a.deadline;
            tokio::spawn(async move {
                let _permit = permit;
                let mut req = tonic::Request::new(LeaseTokenRequest {
                    connection_id: id,
                    purpose: PURPOSE.to_owned(),
                    scopes: vec![CALENDAR_SCOPE.to_owned()],
                    min_valid_seconds: 0,
                });
                req.set_timeout(deadline);
                let started = Instant::now();
                let result = client.lease_token(req).await;
                let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(_) => w.ok_us.push(us),
                    Err(status) => w.error(format!("{:?}", status.code()), status.message()),
                }
            });
        }
        if now >= end {
            break;
        }
        if now >= next_report {
            reported += 1;
            let w = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
            report(
                reported,
                sent_in_window,
                w,
                db_size.bytes().await,
                &mut totals,
            );
            db_size.report_parts(a.dbstat, &mut wal_max).await;
            sent_in_window = 0;
            next_report += a.interval;
        }
    }
    let elapsed = start.elapsed();
    // Let the calls in flight finish (each is bounded by its deadline).
    let drained = tokio::time::timeout(
        a.deadline + Duration::from_secs(2),
        in_flight.acquire_many(u32::try_from(a.max_in_flight).unwrap_or(u32::MAX)),
    )
    .await;
    if drained.is_err() {
        println!("(calls still in flight after their deadline)");
    }
    let w = std::mem::take(&mut *window.lock().unwrap_or_else(|p| p.into_inner()));
    if sent_in_window > 0 || !w.ok_us.is_empty() || !w.errors.is_empty() {
        reported += 1;
        report(
            reported,
            sent_in_window,
            w,
            db_size.bytes().await,
            &mut totals,
        );
        db_size.report_parts(a.dbstat, &mut wal_max).await;
    }
    let rss_end = rss_kib();

    // 3. Summary and verdict.
    let achieved = totals.sent as f64 / elapsed.as_secs_f64();
    println!();
    println!(
        "total: {} sent in {:.1} s ({:.1} calls/s, target {}), {} ok, {} errors, worst interval p99 \
         {:.2} ms",
        totals.sent,
        elapsed.as_secs_f64(),
        achieved,
        a.rate,
        totals.ok,
        totals.error_count(),
        totals.worst_p99
    );
    for (code, (n, msg)) in &totals.errors {
        println!("  error {code}: {n}  (first message: {msg:?})");
    }
    let rss_at = |minute: usize| totals.rss.get(minute.wrapping_sub(1)).copied().flatten();
    let growth = |from: Option<u64>| match (from, rss_end) {
        (Some(from), Some(end)) if from > 0 => Some(end as f64 / from as f64 - 1.0),
        _ => None,
    };
    let pct = |g: Option<f64>| g.map_or_else(|| "?".to_owned(), |g| format!("{:+.1}%", g * 100.0));
    println!(
        "rss: start {} MiB, seeded {} MiB, after minute 1 {} MiB, end {} MiB",
        mib(rss_start),
        mib(rss_seeded),
        mib(rss_at(1)),
        mib(rss_end)
    );
    // Growth to the end from minute 1, half-way and the last third: a
    // cache levels off, a leak does not.
    let n = totals.rss.len();
    let mut froms = vec![1, n / 2, n - n / 3];
    froms.retain(|&m| m >= 1 && m < n);
    froms.dedup();
    let growths: Vec<String> = froms
        .iter()
        .map(|&m| format!("from minute {m} {}", pct(growth(rss_at(m)))))
        .collect();
    println!("rss growth to the end: {}", growths.join(", "));
    // 0: the default, the half-way interval (past a cache's warm-up).
    let rss_from = if a.rss_from == 0 {
        (n / 2).max(1)
    } else {
        a.rss_from
    };
    let judged = growth(rss_at(rss_from));
    let mut missed = Vec::new();
    if totals.error_count() > 0 {
        missed.push(format!("{} errors", totals.error_count()));
    }
    if achieved < a.rate * MIN_RATE_SHARE {
        missed.push(format!(
            "achieved {achieved:.1} calls/s < 99% of {}",
            a.rate
        ));
    }
    if n <= rss_from {
        missed.push(format!(
            "{n} intervals: too short to judge RSS from minute {rss_from}"
        ));
    } else {
        match judged {
            Some(g) if g >= MAX_RSS_GROWTH => {
                missed.push(format!("RSS grew {:.1}% >= 10%", g * 100.0));
            }
            Some(_) => {}
            None => missed.push("RSS unknown (no /proc/self/status)".to_owned()),
        }
    }
    if let Some(keep) = a.hot_retention {
        // The database is flat once the first retention window (and the
        // leases' own lifetime, before their rows may go) has passed, with
        // one archive and one maintenance pass to spare.
        let settled = Duration::from_secs(keep + 2 * a.lease_ttl + a.archive_interval + 60);
        let from = (settled.as_secs_f64() / a.interval.as_secs_f64()).ceil() as usize + 1;
        let at = |m: usize| totals.db.get(m.wrapping_sub(1)).copied().flatten();
        match (at(from), totals.db.last().copied().flatten()) {
            (Some(f), Some(e)) if from < totals.db.len() && f > 0 => {
                let g = e as f64 / f as f64 - 1.0;
                println!(
                    "database: {:.1} MiB after minute {from}, {:.1} MiB at the end ({:+.1}%)",
                    f as f64 / 1048576.0,
                    e as f64 / 1048576.0,
                    g * 100.0
                );
                if g >= MAX_RSS_GROWTH {
                    missed.push(format!(
                        "database grew {:.1}% >= 10% after minute {from}",
                        g * 100.0
                    ));
                }
            }
            _ => missed.push(format!(
                "{} intervals: too short to judge the database from minute {from}",
                totals.db.len()
            )),
        }
        if let Some(wal) = wal_max {
            let (most, bound) = (wal as f64 / 1048576.0, MAX_WAL_BYTES as f64 / 1048576.0);
            println!("WAL: at most {most:.1} MiB at the end of an interval (bound {bound:.0} MiB)");
            if wal > MAX_WAL_BYTES {
                missed.push(format!("the WAL reached {most:.1} MiB > {bound:.0} MiB"));
            }
        }
        let archived: u64 = std::fs::read_dir(&archive_dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let segments = server
            .vault
            .store()
            .audit_segments()
            .await
            .unwrap_or_default();
        println!(
            "archive: {} segments, {:.1} MiB, entries 1..={}",
            segments.len(),
            archived as f64 / 1048576.0,
            segments.last().map_or(0, |s| s.last_seq)
        );
        let started = Instant::now();
        match server.vault.audit_verify(1, None).await {
            Ok(r) if r.ok() => println!(
                "audit verify: ok in {:.1} s: {}",
                started.elapsed().as_secs_f64(),
                r.detail
            ),
            Ok(r) => missed.push(format!(
                "audit verify failed at {:?}: {}",
                r.first_broken_seq, r.detail
            )),
            Err(e) => missed.push(format!("audit verify: {e}")),
        }
    }
    let rss_text = format!("RSS from minute {rss_from} to the end {}", pct(judged));
    if missed.is_empty() {
        println!("verdict: PASS (no errors, {achieved:.1} calls/s, {rss_text} < 10%)");
    } else {
        println!("verdict: FAIL ({}; {rss_text})", missed.join("; "));
    }

    // 4. Shut down and clean up.
    drop(clients);
    match db_size {
        DbSize::Postgres(pool) => pool.close().await,
        DbSize::Sqlite(_, pool) => pool.close().await,
    }
    server.shutdown().await;
    if let Some((admin, name)) = cleanup {
        drop_database(&admin, &name).await;
    }
}
