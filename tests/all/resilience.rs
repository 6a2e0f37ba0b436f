//! Resilience under faults and load: PostgreSQL restarted under lease load (a
//! private throwaway cluster, never the shared server other tests use) and a
//! slow or failing Google token endpoint while leases of fresh and expired
//! tokens run. Calls fail with UNAVAILABLE within their deadline instead of
//! hanging or answering INTERNAL, the vault recovers by itself, and nothing
//! it granted is lost.
//!
//! The restart test needs PostgreSQL's `initdb` and `pg_ctl` (found like
//! `.ci/run` finds them, or in `TV_PG_BIN`; as root it runs them as the
//! `postgres` user). Without them it prints `SKIPPED (private postgres
//! cluster)` and passes — unless `CI=true` or `TV_REQUIRE_PRIVATE_POSTGRES=1`
//! (`.ci/run` sets it), when it fails instead.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Row as _;
use tokenvault::domain::{ConnectionId, Integration, LeaseId};
use tokenvault::google::sim::{Endpoint, Fault};
use tokenvault::proto::v1 as pb;
use tokenvault::proto::v1::lease_service_client::LeaseServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::both_backends;
use crate::support::raw::expire_stored_token;
use crate::support::{
    As, Authed, Backend, CALENDAR_SCOPE, TestVault, connect, seed_connection,
    spawn_vault_with_google, start_vault,
};

fn lease_request(connection_id: &str) -> pb::LeaseTokenRequest {
    pb::LeaseTokenRequest {
        connection_id: connection_id.to_owned(),
        purpose: "calendar_sync".to_owned(),
        scopes: vec![CALENDAR_SCOPE.to_owned()],
        min_valid_seconds: 60,
    }
}

/// One lease call as a client saw it.
struct Call {
    started: Instant,
    took: Duration,
    /// The lease id and the connection leased, or the status.
    result: Result<(String, String), tonic::Status>,
}

impl Call {
    fn ended(&self) -> Instant {
        self.started + self.took
    }
}

/// How far past its deadline a call may still end, on a loaded two-core
/// machine running a debug build, and count as having kept to it. A call
/// that ignores its deadline runs into [`call_once`]'s hang detector, twice
/// as far past it.
const OVERRUN: Duration = Duration::from_secs(2);

/// What the tasks of one load share: the stop flag, and counts of their
/// calls so far (for waiting on the load rather than on the clock).
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    /// Calls answered (or given up on as hung).
    answered: AtomicUsize,
    /// Of those, leases granted.
    granted: AtomicUsize,
}

/// A running lease load; [`stop_load`] ends it.
struct Load {
    progress: Arc<Progress>,
    handles: Vec<tokio::task::JoinHandle<Vec<Call>>>,
}

impl Load {
    fn answered(&self) -> usize {
        self.progress.answered.load(Ordering::Relaxed)
    }

    fn granted(&self) -> usize {
        self.progress.granted.load(Ordering::Relaxed)
    }

    /// Polls until `count` reaches `at_least`; fails after `limit`, saying
    /// what it waited for and how far it got.
    async fn wait_until(
        &self,
        what: &str,
        count: fn(&Load) -> usize,
        at_least: usize,
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let seen = count(self);
            if seen >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected at least {at_least} {what} within {limit:?}, saw {seen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Leases the connections of `ids` in turn, `pause` apart, until the
/// load's stop flag is set, each call with `deadline` (see [`call_once`]).
async fn lease_loop(
    mut client: LeaseServiceClient<Authed>,
    ids: Arc<Vec<String>>,
    first: usize,
    deadline: Duration,
    pause: Duration,
    progress: Arc<Progress>,
) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut next = first;
    while !progress.stop.load(Ordering::Relaxed) {
        let id = &ids[next % ids.len()];
        next += 1;
        let call = call_once(&mut client, id, deadline).await;
        if call.result.is_ok() {
            progress.granted.fetch_add(1, Ordering::Relaxed);
        }
        progress.answered.fetch_add(1, Ordering::Relaxed);
        calls.push(call);
        tokio::time::sleep(pause).await;
    }
    calls
}

/// One lease call with `deadline` as its `grpc-timeout`; no answer
/// `2 * OVERRUN` past it is recorded as a hang (`DEADLINE_EXCEEDED` from
/// the client itself).
async fn call_once(client: &mut LeaseServiceClient<Authed>, id: &str, deadline: Duration) -> Call {
    let mut req = tonic::Request::new(lease_request(id));
    req.set_timeout(deadline);
    let started = Instant::now();
    let hung_after = deadline + OVERRUN * 2;
    let answer = tokio::time::timeout(hung_after, client.lease_token(req)).await;
    let result = match answer {
        Ok(r) => r.map(|l| (l.into_inner().lease_id, id.to_owned())),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer {hung_after:?} after the call started, with a {deadline:?} deadline: \
             the call hung"
        ))),
    };
    Call {
        started,
        took: started.elapsed(),
        result,
    }
}

/// Starts `tasks` lease loops over `ids`; end them with [`stop_load`].
fn start_load(
    tv: &TestVault,
    ids: &Arc<Vec<String>>,
    tasks: usize,
    deadline: Duration,
    pause: Duration,
) -> Load {
    let progress = Arc::new(Progress::default());
    let handles = (0..tasks)
        .map(|i| {
            tokio::spawn(lease_loop(
                tv.leases(As::Worker),
                ids.clone(),
                i,
                deadline,
                pause,
                progress.clone(),
            ))
        })
        .collect();
    Load { progress, handles }
}

/// Stops a load (each task finishes the call it is in) and returns every
/// call, in the order they started.
async fn stop_load(load: Load) -> Vec<Call> {
    load.progress.stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for h in load.handles {
        calls.extend(h.await.expect("lease loop panicked"));
    }
    calls.sort_by_key(|c| c.started);
    calls
}

/// Nearest-rank percentile.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latencies<'a>(calls: impl IntoIterator<Item = &'a Call>) -> Vec<Duration> {
    let mut l: Vec<Duration> = calls.into_iter().map(|c| c.took).collect();
    l.sort();
    l
}

async fn health_status(channel: &Channel) -> Result<i32, tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(Duration::from_secs(2));
    HealthClient::new(channel.clone())
        .check(req)
        .await
        .map(|r| r.into_inner().status)
}

/// Polls gRPC health every 100 ms until it reports `want`; how long it took.
async fn await_health(channel: &Channel, want: ServingStatus, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = health_status(channel).await;
        if status.as_ref().is_ok_and(|s| *s == want as i32) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "health did not turn {want:?} within {limit:?} (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// A private PostgreSQL cluster.

/// A PostgreSQL cluster of this test's own, in a temporary directory on a
/// free loopback port, so it can be stopped and started without disturbing
/// the shared server. Stopped (`-m immediate`) when dropped.
struct PrivateCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// Whom `initdb` and `pg_ctl` run as: initdb refuses to run as root, so
    /// under root (as in .ci/run) the cluster belongs to `postgres`.
    run_as: Option<&'static str>,
}

impl PrivateCluster {
    /// Where `initdb` and `pg_ctl` are: `TV_PG_BIN`, the newest
    /// /usr/lib/postgresql/*/bin, /usr/local/bin or /usr/bin.
    fn find_bin() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("TV_PG_BIN")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .collect();
        versions.sort_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
                .unwrap_or(0)
        });
        dirs.extend(versions.into_iter().rev());
        dirs.extend(["/usr/local/bin", "/usr/bin"].map(PathBuf::from));
        dirs.into_iter()
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    }

    /// initdb + start, or why not.
    fn create() -> Result<Self, String> {
        let bin = Self::find_bin().ok_or(
            "no initdb/pg_ctl (looked in $TV_PG_BIN, /usr/lib/postgresql/*/bin, /usr/local/bin, \
             /usr/bin)",
        )?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let run_as = root.then_some("postgres");
        if root
            && !Command::new("id")
                .arg("postgres")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            return Err("running as root and there is no `postgres` user to run initdb as".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("tv-resilience-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        if root {
            let chown = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !chown.success() {
                return Err(format!("chown postgres {}: {chown}", dir.path().display()));
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let cluster = Self {
            bin,
            dir,
            port,
            run_as,
        };
        let data = cluster.data();
        cluster.pg_tool(
            "initdb",
            &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"],
        )?;
        cluster.start()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one of the PostgreSQL tools (as `run_as`), output to a file in
    /// the cluster's directory so no daemon inherits our pipes.
    fn pg_tool(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(user) => {
                let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
                    .into_iter()
                    .find(|p| std::path::Path::new(p).is_file())
                    .unwrap_or("runuser");
                let mut c = Command::new(runuser);
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let out_path = self.dir.path().join(format!("{tool}.out"));
        let out = File::create(&out_path).map_err(|e| format!("{tool} output file: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let status = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("running {tool}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} {args:?} failed ({status}): {}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            ))
        }
    }

    fn start(&self) -> Result<(), String> {
        let data = self.data();
        let log = self.dir.path().join("postgres.log").display().to_string();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.pg_tool(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "30", "start",
            ],
        )
    }

    /// Stops the server at once, like a crash: open connections are cut
    /// without a goodbye and the restart replays the WAL.
    fn stop_immediate(&self) -> Result<(), String> {
        let data = self.data();
        self.pg_tool("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.stop_immediate();
    }
}

/// Runs a cluster operation (which waits for the server) off the runtime.
async fn blocking(
    cluster: &Arc<PrivateCluster>,
    op: fn(&PrivateCluster) -> Result<(), String>,
) -> Result<(), String> {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || op(&cluster))
        .await
        .expect("cluster operation panicked")
}

/// Whether this run must not skip for want of PostgreSQL binaries: in CI
/// (`CI=true`) and wherever `TV_REQUIRE_PRIVATE_POSTGRES=1` (`.ci/run` sets it).
fn in_ci() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| v == "true" || v == "1");
    set("CI") || set("TV_REQUIRE_PRIVATE_POSTGRES")
}

/// A vault on the private cluster.
async fn vault_on(url: &str) -> TestVault {
    let dir = tempfile::tempdir().expect("tempdir");
    start_vault(Backend::Postgres, dir, url.to_owned(), |_| {}).await
}

/// The deadline of the lease load during the PostgreSQL restart: well past
/// the pool's 2 s acquire timeout. A failing lease may wait for the pool once
/// to read and again to audit the failure (unless the audit writer's 1 s
/// fail-fast window refuses it at once), behind earlier audit batches.
const PG_CALL_DEADLINE: Duration = Duration::from_secs(10);
/// A probe's deadline long enough for the vault itself to answer.
const PG_PROBE_DEADLINE: Duration = Duration::from_secs(30);
/// A worker in a hurry, during the outage.
const SHORT_DEADLINE: Duration = Duration::from_secs(2);
/// Lease loops of the load during the PostgreSQL restart.
const LOAD_TASKS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_lease_load_fails_fast_recovers_and_loses_nothing() {
    let cluster = match tokio::task::spawn_blocking(PrivateCluster::create)
        .await
        .unwrap()
    {
        Ok(c) => Arc::new(c),
        Err(why) if !in_ci() => {
            // Straight to stderr: libtest captures eprintln! of passing tests.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (private postgres cluster): postgres_restart_under_lease_load: {why}"
            );
            return;
        }
        Err(why) => panic!("CI is set, so this test must run: {why}"),
    };
    let mut tv = vault_on(&cluster.url()).await;
    let mut ids = Vec::new();
    for i in 0..16 {
        let c = seed_connection(
            &tv.vault,
            "pg-restart",
            &format!("u{i}"),
            Integration::Calendar,
            &format!("ya29.restart-{i}"),
            Some(&format!("1//restart-{i}")),
        )
        .await;
        ids.push(c.id.to_string());
    }
    let ids = Arc::new(ids);

    // Steady load, then the database goes away. The load runs for a while
    // (pacing), and in any case until more than 20 leases — what the checks
    // below count on — were answered before the stop, however slow the
    // machine.
    let load = start_load(
        &tv,
        &ids,
        LOAD_TASKS,
        PG_CALL_DEADLINE,
        Duration::from_millis(20),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    load.wait_until(
        "leases answered before the outage",
        Load::answered,
        21,
        Duration::from_secs(60),
    )
    .await;
    await_health(&tv.channel, ServingStatus::Serving, Duration::ZERO).await;
    let stopped_at = Instant::now();
    blocking(&cluster, PrivateCluster::stop_immediate)
        .await
        .expect("stop the private cluster");

    // While it is down: a call with a long deadline gets UNAVAILABLE from the
    // vault; one with a short deadline ends at its deadline; health turns
    // NOT_SERVING.
    let long_probe = tokio::spawn({
        let mut client = tv.leases(As::Worker);
        let id = ids[0].clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let call = call_once(&mut client, &id, PG_PROBE_DEADLINE).await;
                if call.result.is_err() {
                    return call;
                }
                assert!(
                    Instant::now() < deadline,
                    "leases still succeeded 60 s after PostgreSQL stopped"
                );
            }
        }
    });
    let short_probe = tokio::spawn({
        let mut client = tv.leases(As::Worker);
        let id = ids[1].clone();
        async move { call_once(&mut client, &id, SHORT_DEADLINE).await }
    });
    let not_serving_after = await_health(
        &tv.channel,
        ServingStatus::NotServing,
        Duration::from_secs(25),
    )
    .await;
    let long = long_probe.await.unwrap();
    let short = short_probe.await.unwrap();

    // Back up: the vault reconnects by itself.
    let restarted_at = Instant::now();
    let down_for = restarted_at - stopped_at;
    blocking(&cluster, PrivateCluster::start)
        .await
        .expect("restart the private cluster");
    let up_at = Instant::now();
    let granted_when_up = load.granted();
    // The README: leases succeed again about a second after the database is
    // back. The deadline counts from when PostgreSQL accepts connections
    // again (its own start-up is not the vault's) and allows ten times that.
    let first_lease_limit = Duration::from_secs(10);
    let first_lease_deadline = up_at + first_lease_limit;
    let mut probe = tv.leases(As::Worker);
    let mut probes = Vec::new();
    let first_lease_after = loop {
        let call = call_once(&mut probe, &ids[2], PG_CALL_DEADLINE).await;
        let ok = call.result.is_ok();
        let status = call.result.as_ref().err().cloned();
        probes.push(call);
        if ok {
            break restarted_at.elapsed();
        }
        assert!(
            Instant::now() < first_lease_deadline,
            "no lease succeeded within {first_lease_limit:?} of PostgreSQL accepting connections \
             again (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let serving_after = await_health(&tv.channel, ServingStatus::Serving, Duration::from_secs(25))
        .await
        + (up_at - restarted_at);
    // Let the load show that leases succeed again: wait until it has been
    // granted more than five leases it started after the restart. Of the
    // grants counted from `up_at` on, at most one per task comes from a call
    // started before it.
    load.wait_until(
        "leases granted to the load after the restart",
        Load::granted,
        granted_when_up + LOAD_TASKS + 6,
        Duration::from_secs(30),
    )
    .await;
    let mut calls = stop_load(load).await;

    // What the clients saw.
    let short_status = short
        .result
        .as_ref()
        .expect_err("no lease while the database is down");
    assert!(
        matches!(
            short_status.code(),
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded
        ),
        "a short deadline ends the call: {short_status:?}"
    );
    assert!(
        short.took < SHORT_DEADLINE + OVERRUN,
        "a call with a {SHORT_DEADLINE:?} deadline ended after {:?}",
        short.took
    );
    println!(
        "postgres restart: a call with a {SHORT_DEADLINE:?} deadline during the outage ended after \
         {:?}: {:?} {:?}",
        short.took,
        short_status.code(),
        short_status.message()
    );
    let long_status = long
        .result
        .as_ref()
        .expect_err("the probe stops at a failure");
    assert_eq!(
        long_status.code(),
        Code::Unavailable,
        "given time, the vault itself answers UNAVAILABLE: {long_status:?}"
    );
    println!(
        "postgres restart: a call with a {PG_PROBE_DEADLINE:?} deadline failed {:?} after the \
         stop, after {:?}: {:?}",
        long.ended().saturating_duration_since(stopped_at),
        long.took,
        long_status.message()
    );
    calls.extend(probes);
    let before: Vec<&Call> = calls.iter().filter(|c| c.ended() < stopped_at).collect();
    let failed: Vec<&Call> = calls.iter().filter(|c| c.result.is_err()).collect();
    let after: Vec<&Call> = calls.iter().filter(|c| c.started > up_at).collect();
    assert!(
        before.len() > 20,
        "load ran before the outage: {}",
        before.len()
    );
    assert!(
        before.iter().all(|c| c.result.is_ok()),
        "every lease before the outage succeeded"
    );
    for c in &failed {
        let status = c.result.as_ref().unwrap_err();
        let at_deadline = matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
            && c.took >= PG_CALL_DEADLINE - Duration::from_millis(100);
        assert!(
            status.code() == Code::Unavailable || at_deadline,
            "a database outage is UNAVAILABLE, or the call's deadline (not INTERNAL): {status:?} \
             after {:?}",
            c.took
        );
        assert!(
            c.took < PG_CALL_DEADLINE + OVERRUN,
            "no call outlives its deadline ({PG_CALL_DEADLINE:?}): {:?}",
            c.took
        );
    }
    assert!(
        after.iter().filter(|c| c.result.is_ok()).count() > 5,
        "leases succeed again after the restart"
    );
    let first_failure = failed
        .iter()
        .map(|c| c.ended())
        .chain([long.ended()])
        .min()
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(stopped_at);
    let fail_took = latencies(failed.iter().copied());
    println!(
        "postgres restart: {} calls ({} before the stop, {} failed, {} started after the restart); \
         first failure {:?} after the stop; failing calls took p50 {:?} max {:?}; \
         health NOT_SERVING after {:?}; down for {:?}; first lease {:?} after the restart, \
         SERVING after {:?}",
        calls.len(),
        before.len(),
        failed.len(),
        after.len(),
        first_failure,
        percentile(&fail_took, 50.0),
        fail_took.last().copied().unwrap_or_default(),
        not_serving_after,
        down_for,
        first_lease_after,
        serving_after,
    );
    let statuses: std::collections::BTreeMap<String, usize> =
        failed.iter().fold(Default::default(), |mut m, c| {
            let s = c.result.as_ref().unwrap_err();
            *m.entry(format!("{:?}: {}", s.code(), s.message()))
                .or_default() += 1;
            m
        });
    println!("postgres restart: failures {statuses:#?}");

    // Nothing granted was lost: every lease a client holds is recorded, with
    // its grant in the audit log (same transaction), and the chain verifies.
    let granted: Vec<&(String, String)> = calls
        .iter()
        .filter_map(|c| c.result.as_ref().ok())
        .collect();
    let pool = sqlx::PgPool::connect(&cluster.url()).await.unwrap();
    let rows: std::collections::HashMap<String, String> =
        sqlx::query("SELECT uuid_send(lease_id), uuid_send(connection_id) FROM leases")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                let (lease, connection): (Vec<u8>, Vec<u8>) = (r.get(0), r.get(1));
                (
                    LeaseId::from_key(&lease).unwrap().to_string(),
                    ConnectionId::from_key(&connection).unwrap().to_string(),
                )
            })
            .collect();
    for (lease, connection) in &granted {
        assert_eq!(
            rows.get(lease),
            Some(connection),
            "granted lease {lease} is recorded for its connection"
        );
    }
    // A lease's record is its grant's entry: each reads back as one.
    let grants: i64 = sqlx::query_scalar("SELECT count(*) FROM lease_entries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        grants as usize,
        rows.len(),
        "every lease row reads back as its lease.grant audit entry"
    );
    pool.close().await;
    let report = tokenvault::audit::verify_chain(
        tv.vault.store().as_ref(),
        tv.vault.keyring().as_ref(),
        1,
        None,
    )
    .await
    .expect("read the audit log");
    assert!(report.ok(), "audit chain verifies: {report:?}");
    assert_eq!(
        health_status(&tv.channel).await.unwrap(),
        ServingStatus::Serving as i32
    );
    println!(
        "postgres restart: {} leases granted to clients, {} lease rows, {} audit entries verified",
        granted.len(),
        rows.len(),
        report.entries_checked
    );
    tv.stop().await;
    drop(cluster);
}

// ---------------------------------------------------------------------------
// Google slow or failing under load.

/// The vault's refresh deadline in the Google fault test.
const REFRESH_DEADLINE: Duration = Duration::from_millis(1500);
/// How long the slow token endpoint takes to answer: longer than the refresh
/// deadline, so the deadline is what ends every refresh.
const GOOGLE_LATENCY: Duration = Duration::from_secs(2);
/// The slowest a lease of a still-valid token may be while Google is slow or
/// failing. One that waited for Google would wait for (part of) a refresh,
/// which only the refresh deadline ends, and with leases arriving every few
/// milliseconds some would wait nearly all of it. Measured (BENCHMARKS.md,
/// "Google slow or failing under load"), the slowest takes under 60 ms: the
/// bound leaves a loaded machine more than ten times that.
const FRESH_BOUND: Duration = Duration::from_secs(1);
/// What lease calls ask for as `grpc-timeout` there: longer than the refresh
/// deadline, so the vault's own deadline is what ends a refresh.
const GOOGLE_CALL_DEADLINE: Duration = Duration::from_secs(10);

/// Leases fresh connections (four tasks) and expired ones (two tasks per
/// connection) for `window`, and on until the checks have something to
/// check whatever the machine's speed: more than 20 fresh leases and as
/// many refresh-bound ones as there are tasks leasing them. Returns the
/// calls of each.
async fn fresh_and_stale_load(
    tv: &TestVault,
    fresh: &Arc<Vec<String>>,
    stale: &Arc<Vec<String>>,
    window: Duration,
) -> (Vec<Call>, Vec<Call>) {
    let fresh_load = start_load(
        tv,
        fresh,
        4,
        GOOGLE_CALL_DEADLINE,
        Duration::from_millis(10),
    );
    let stale_load = start_load(
        tv,
        stale,
        2 * stale.len(),
        GOOGLE_CALL_DEADLINE,
        Duration::from_millis(10),
    );
    tokio::time::sleep(window).await;
    fresh_load
        .wait_until(
            "fresh leases answered",
            Load::answered,
            21,
            Duration::from_secs(60),
        )
        .await;
    stale_load
        .wait_until(
            "refresh-bound leases answered",
            Load::answered,
            2 * stale.len(),
            Duration::from_secs(60),
        )
        .await;
    (stop_load(fresh_load).await, stop_load(stale_load).await)
}

/// Fresh leases all succeed, none waiting for Google; every stale lease
/// fails within the refresh deadline with UNAVAILABLE or DEADLINE_EXCEEDED.
fn assert_only_refreshes_suffer(fault: &str, fresh: &[Call], stale: &[Call]) {
    let fresh_took = latencies(fresh);
    let stale_took = latencies(stale);
    println!(
        "google {fault}: {} fresh leases p50 {:?} p99 {:?} max {:?}; {} refresh-bound leases \
         failed after p50 {:?} max {:?} ({:?})",
        fresh.len(),
        percentile(&fresh_took, 50.0),
        percentile(&fresh_took, 99.0),
        fresh_took.last().copied().unwrap_or_default(),
        stale.len(),
        percentile(&stale_took, 50.0),
        stale_took.last().copied().unwrap_or_default(),
        stale
            .iter()
            .filter_map(|c| c.result.as_ref().err().map(|s| s.code()))
            .fold(
                std::collections::BTreeMap::<String, usize>::new(),
                |mut m, c| {
                    *m.entry(format!("{c:?}")).or_default() += 1;
                    m
                }
            ),
    );
    assert!(fresh.len() > 20, "{fault}: the fresh load ran");
    for c in fresh {
        assert!(
            c.result.is_ok(),
            "{fault}: a lease of a fresh token needs no Google: {:?}",
            c.result.as_ref().err()
        );
    }
    let slowest = fresh_took.last().copied().unwrap_or_default();
    assert!(
        slowest < FRESH_BOUND,
        "{fault}: fresh leases never wait for Google (slowest {slowest:?}, bound {FRESH_BOUND:?}, \
         refresh deadline {REFRESH_DEADLINE:?})"
    );
    assert!(!stale.is_empty(), "{fault}: refresh-bound leases ran");
    for c in stale {
        let status = c
            .result
            .as_ref()
            .expect_err("a refresh-bound lease fails while Google is faulty");
        assert!(
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{fault}: {status:?}"
        );
        // Generous past the deadline, and far short of the call's own
        // deadline, which a vault ignoring its refresh deadline would reach.
        assert!(
            c.took < REFRESH_DEADLINE + OVERRUN,
            "{fault}: failed within the refresh deadline ({REFRESH_DEADLINE:?}), not after {:?}",
            c.took
        );
    }
}

async fn google_slow_or_failing_delays_only_leases_that_need_a_refresh(backend: Backend) {
    let Some((tv, sim)) = spawn_vault_with_google(backend, |c| {
        c.google.refresh_deadline_ms = REFRESH_DEADLINE.as_millis() as u64;
    })
    .await
    else {
        return;
    };
    let mut fresh = Vec::new();
    for i in 0..8 {
        let c = seed_connection(
            &tv.vault,
            "fresh",
            &format!("u{i}"),
            Integration::Calendar,
            &format!("ya29.fresh-{i}"),
            Some(&format!("1//fresh-{i}")),
        )
        .await;
        fresh.push(c.id.to_string());
    }
    // Connected through the simulator, which knows their refresh tokens; then
    // their access tokens are made to look expired.
    let mut stale = Vec::new();
    for tenant in ["stale-a", "stale-b"] {
        let c = connect(&tv, tenant, "u1", pb::Integration::Calendar).await;
        expire_stored_token(&tv, &c.connection_id).await;
        stale.push(c.connection_id);
    }
    let (fresh, stale) = (Arc::new(fresh), Arc::new(stale));
    // Pacing: long enough for refresh-bound leases to run into the refresh
    // deadline more than once while fresh ones run.
    let window = Duration::from_millis(3500);

    // A slow token endpoint: slower than the refresh deadline.
    let refreshes = sim.refresh_calls();
    sim.inject(Endpoint::Token, Fault::Latency(GOOGLE_LATENCY), None);
    let (f, s) = fresh_and_stale_load(&tv, &fresh, &stale, window).await;
    sim.clear_faults();
    assert_only_refreshes_suffer("latency 2 s", &f, &s);
    assert!(sim.refresh_calls() > refreshes, "the vault did try Google");

    // A failing token endpoint: retried with backoff until the deadline.
    let refreshes = sim.refresh_calls();
    sim.inject(Endpoint::Token, Fault::Status(503), None);
    let (f, s) = fresh_and_stale_load(&tv, &fresh, &stale, window).await;
    sim.clear_faults();
    assert_only_refreshes_suffer("status 503", &f, &s);
    assert!(
        sim.refresh_calls() >= refreshes + 2 * stale.len() as u64,
        "refreshes were retried within the deadline"
    );

    // Google is back: the expired tokens refresh and lease again.
    for id in stale.iter() {
        let lease = tv
            .leases(As::Worker)
            .lease_token(lease_request(id))
            .await
            .expect("lease after Google recovered")
            .into_inner();
        assert!(lease.access_token.starts_with("ya29."));
    }

    // The calls' metrics, labelled by endpoint and status only, are checked
    // in replicas::google_calls_are_measured_by_endpoint_and_status_only, on
    // a process of that test's own: metrics are process-wide.
}

both_backends!(
    google_faults,
    google_slow_or_failing_delays_only_leases_that_need_a_refresh
);
