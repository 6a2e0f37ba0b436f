//! Running the service: binds the gRPC and HTTP listeners, serves until told
//! to stop, and shuts down gracefully — health turns NOT_SERVING, listeners
//! stop accepting, in-flight calls drain (up to the configured grace period),
//! then background work stops and the database pool closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::audit::{Actor, Outcome};
use crate::config::Config;
use crate::grpc::auth::{ApiKeyChanges, ApiKeys, SharedApiKeys};
use crate::grpc::refusals::{RefusalAggregator, RefusalLimits};
use crate::grpc::{self, Authenticator, Context};
use crate::http::serve::HttpLimits;
use crate::policy::{ApiKeyHolders, Policy, SharedPolicy};
use crate::vault::Vault;

/// How often the health reporter re-checks the database and keyring.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// A server that failed to start, with a one-line reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// A started server.
pub struct RunningServer {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// Where `/metrics` is served on its own (`http.metrics_addr`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The vault behind it.
    pub vault: Arc<Vault>,
    /// The access policy in force.
    pub policy: Arc<SharedPolicy>,
    /// The API keys in force.
    pub api_keys: Arc<SharedApiKeys>,
    /// The configuration file API keys are reloaded from (none when the
    /// configuration came from the environment only: they are fixed then).
    config_file: Option<PathBuf>,
    /// Who held API keys at start: the holders a reloaded policy is built
    /// against while the keys are fixed (no `config_file`).
    key_holders_at_start: ApiKeyHolders,
    /// Whether the TLS listener was built to require a client certificate
    /// because no API key was configured (`tls.client_ca_file` without
    /// keys): keys added by a reload then take effect after a restart only.
    certificates_required: bool,
    /// Refused authentication counted in the current window: flushed to the
    /// audit log once in-flight calls have drained.
    refusals: Arc<RefusalAggregator>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl RunningServer {
    /// Re-reads the policy from its source and the API keys from the
    /// configuration file (SIGHUP). If either no longer validates, the reload
    /// is refused and both stay as they are; either way the attempt is audited
    /// (`policy.reload`) and logged, and a reload that went through also
    /// audits what it changed in the API keys (`auth.reload`).
    pub async fn reload_policy(&self) -> Result<(), String> {
        let result = self.reload_policy_and_keys();
        let (outcome, detail) = match &result {
            Ok(reloaded) => {
                let (ids, purposes) = reloaded.policy;
                tracing::info!(identities = ids, purposes, "policy reloaded");
                (
                    Outcome::Ok,
                    format!("{ids} identities, {purposes} purposes"),
                )
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "policy reload refused; the previous policy and API keys stay in force"
                );
                (
                    Outcome::Failed,
                    format!("refused, previous policy and API keys kept: {e}"),
                )
            }
        };
        self.audit_reload("policy.reload", "policy", outcome, detail)
            .await;
        if let Ok(Reloaded {
            api_keys: Some(changes),
            ..
        }) = &result
        {
            tracing::info!(
                added = %names(&changes.added),
                removed = %names(&changes.removed),
                keys = changes.count,
                "API keys reloaded"
            );
            if self.certificates_required && !changes.added.is_empty() {
                tracing::warn!(
                    "API keys added to a vault that started without any: the TLS listener \
                     requires a client certificate (tls.client_ca_file) until it restarts"
                );
            }
            self.audit_reload("auth.reload", "api_keys", Outcome::Ok, changes.to_string())
                .await;
        }
        result.map(|_| ())
    }

    /// Validates the configuration file first, then reloads the policy
    /// (built against the API keys that come with it), and only then swaps
    /// the API keys: a refusal at either step changes nothing.
    fn reload_policy_and_keys(&self) -> Result<Reloaded, String> {
        let config = match &self.config_file {
            Some(path) => Some(Config::load(Some(path.as_path())).map_err(|e| e.to_string())?),
            None => None,
        };
        let holders = config.as_ref().map_or_else(
            || self.key_holders_at_start.clone(),
            Config::api_key_holders,
        );
        let inline = config.as_ref().map(Config::inline_policy);
        let policy = self.policy.reload(&holders, inline.as_ref())?;
        warn_of_refused_keys(&self.policy.current());
        let api_keys = config.map(|c| self.api_keys.replace(ApiKeys::from_config(&c.auth)));
        Ok(Reloaded { policy, api_keys })
    }

    async fn audit_reload(&self, action: &str, target: &str, outcome: Outcome, detail: String) {
        if let Err(e) = self
            .vault
            .audit()
            .record(&Actor::system(), action, target, outcome, detail)
            .await
        {
            tracing::error!(error = %e, action, "could not audit the reload");
        }
    }

    /// Stops accepting, drains in-flight calls, writes the refusals counted
    /// since the last window closed, then stops background work.
    pub async fn shutdown(self) {
        // Watch streams end first (with UNAVAILABLE), so the drain below
        // does not wait on them.
        self.vault.begin_shutdown();
        self.stop.send_replace(true);
        let drain = async {
            for t in self.tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight calls did not finish within the grace period");
        }
        // Bounded like the drain: an unreachable database must not hold the
        // shutdown up; what is not written by then goes with the process.
        if tokio::time::timeout(self.grace, self.refusals.flush(self.vault.audit()))
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.grace,
                "the refused authentication counted since the last window could not be audited \
                 within the grace period"
            );
        }
        self.vault.shutdown().await;
        // The spans of everything above, drained and stopped, are exported
        // before the process ends (a no-op when no traces are exported).
        crate::telemetry::traces::shutdown().await;
        tracing::info!("tokenvault stopped");
    }
}

/// What a reload put in force.
struct Reloaded {
    /// The policy's identities and purposes.
    policy: (usize, usize),
    /// What changed in the API keys; `None` when they are fixed.
    api_keys: Option<ApiKeyChanges>,
}

/// Warns of API keys the policy makes useless: their identity authenticates
/// by certificate (`authenticate = "certificate"`), so they are refused.
fn warn_of_refused_keys(policy: &Policy) {
    for identity in policy.api_keys_refused() {
        tracing::warn!(
            identity,
            "the API keys of this identity are refused: the policy has it authenticate by \
             certificate; remove them from [[auth.api_keys]]"
        );
    }
}

/// API key names as one log field: `alice sha256:1a2b3c4d, bob sha256:…`.
fn names(keys: &[grpc::auth::ApiKeyName]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens the vault from configuration and starts both listeners.
pub async fn start(config: &Config) -> Result<RunningServer, StartError> {
    let vault = Vault::open(config)
        .await
        .map_err(|e| StartError(format!("cannot open the vault: {e}")))?;
    start_with(config, vault).await
}

/// Starts both listeners for an opened vault.
pub async fn start_with(config: &Config, vault: Arc<Vault>) -> Result<RunningServer, StartError> {
    crate::telemetry::metrics();
    let grpc_listener = TcpListener::bind(config.grpc_addr).await.map_err(|e| {
        StartError(format!(
            "grpc_addr: cannot listen on {}: {e}",
            config.grpc_addr
        ))
    })?;
    let http_listener = TcpListener::bind(config.http_addr).await.map_err(|e| {
        StartError(format!(
            "http_addr: cannot listen on {}: {e}",
            config.http_addr
        ))
    })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| StartError(e.to_string()))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|e| StartError(e.to_string()))?;
    let metrics_listener = match config.http.metrics_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                StartError(format!("http.metrics_addr: cannot listen on {addr}: {e}"))
            })?;
            let bound = listener
                .local_addr()
                .map_err(|e| StartError(e.to_string()))?;
            Some((listener, bound))
        }
        None => None,
    };
    let http_tls_config = http_tls(config, http_addr)?;
    let metrics_tls_config = match &metrics_listener {
        Some((_, addr)) => http_tls(config, *addr)?,
        None => None,
    };

    let (policy, source) = config.policy_source().map_err(StartError)?;
    warn_of_refused_keys(&policy);
    let policy = Arc::new(SharedPolicy::new(policy, source));
    let tls = grpc::transport::server_config(config).map_err(StartError)?;
    let (stop, _) = watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let refusals = Arc::new(RefusalAggregator::new(RefusalLimits::from(&config.audit)));
    let auth = Authenticator::new(&config.auth, policy.clone(), refusals.clone());
    let api_keys = auth.api_keys().clone();
    let ctx = Arc::new(Context {
        vault: vault.clone(),
        auth,
    });
    let routes = grpc::routes(ctx, health_service)
        .map_err(|e| StartError(format!("cannot build reflection service: {e}")))?;

    // Every call runs in its span (the trace's server span when traces are
    // exported) and is measured (`grpc_server_*`), after the routes have
    // rewritten their refusals: the code counted is the code sent.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .tcp_nodelay(true)
        .layer(grpc::RpcSpanLayer::new(grpc_span))
        .layer(grpc::RpcMetricsLayer);
    let grpc_task = {
        let incoming = grpc::transport::incoming(
            grpc_listener,
            tls,
            vault.audit().clone(),
            refusals.clone(),
            stop.subscribe(),
        );
        let mut stop = stop.subscribe();
        let router = builder.add_routes(routes);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };
    let limits = HttpLimits::new(&config.http);
    let http_task = tokio::spawn(crate::http::serve::serve(
        http_listener,
        http_tls_config,
        crate::http::router(vault.clone(), metrics_listener.is_none()),
        limits,
        stop.subscribe(),
    ));
    let mut tasks = vec![grpc_task, http_task];
    let metrics_addr = match metrics_listener {
        Some((listener, addr)) => {
            tasks.push(tokio::spawn(crate::http::serve::serve(
                listener,
                metrics_tls_config,
                crate::http::metrics_router(vault.clone()),
                limits,
                stop.subscribe(),
            )));
            Some(addr)
        }
        None => None,
    };
    // The first status is set before start returns, so no caller ever sees
    // "service not registered"; the task keeps it current.
    set_health(&health_reporter, check_health(&vault).await).await;
    let refusals_task = tokio::spawn(
        refusals
            .clone()
            .run(vault.audit().clone(), stop.subscribe()),
    );
    let health_task = tokio::spawn(report_health(
        vault.clone(),
        health_reporter,
        stop.subscribe(),
    ));

    tasks.extend([health_task, refusals_task]);
    tracing::info!(%grpc_addr, %http_addr, metrics_addr = ?metrics_addr, backend = vault.store().backend().as_str(), tls = config.tls.enabled(), "tokenvault serving");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        metrics_addr,
        vault,
        policy,
        api_keys,
        config_file: config.source_file.clone(),
        key_holders_at_start: config.api_key_holders(),
        certificates_required: config.tls.client_ca_file.is_some()
            && config.auth.api_keys.is_empty(),
        stop,
        refusals,
        tasks,
        grace: Duration::from_secs(config.server.shutdown_grace_seconds),
    })
}

/// TLS for an HTTP listener: beyond loopback it is served with the server's
/// certificate (configuration refuses such an address without one); on
/// loopback in plain HTTP, for a proxy or agent on the same host.
fn http_tls(
    config: &Config,
    addr: SocketAddr,
) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    if addr.ip().to_canonical().is_loopback() {
        return Ok(None);
    }
    match grpc::transport::http_server_config(config).map_err(StartError)? {
        Some(tls) => Ok(Some(tls)),
        None => Err(StartError(format!(
            "{addr} is not a loopback address; serving HTTP beyond loopback requires [tls] \
             cert_file and key_file"
        ))),
    }
}

/// Keeps gRPC health in step with the vault's: SERVING while the database and
/// keyring work, NOT_SERVING otherwise and once shutdown begins. Every
/// minute it also runs the vault's housekeeping.
/// The span every gRPC request runs in: its method and a request id, taken
/// from a well-formed `x-request-id` header (the caller's trace of it) or
/// made up. Nothing else of the request is recorded: headers carry
/// credentials. `otel.name` and `otel.kind` are filled in only when traces
/// are exported (see `grpc::trace_context`).
fn grpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let given = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    let id = match given {
        Some(v) => v.to_owned(),
        None => next_request_id(),
    };
    tracing::info_span!(
        "grpc",
        rpc = %request.uri().path(),
        request_id = %id,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty
    )
}

/// A fresh request id: a random per-process start plus a counter, so that
/// ids are unique within a process and unlikely to collide across replicas,
/// without a call to the system's random source per request.
fn next_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", start.wrapping_add(n))
}

async fn report_health(
    vault: Arc<Vault>,
    reporter: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        set_health(&reporter, check_health(&vault).await).await;
        ticks += 1;
        if ticks.is_multiple_of(12)
            && let Err(e) = vault.maintenance().await
        {
            tracing::warn!(error = %e, "maintenance failed");
        }
    }
    set_health(&reporter, ServingStatus::NotServing).await;
}

async fn check_health(vault: &Vault) -> ServingStatus {
    match vault.health().await {
        Ok(()) => ServingStatus::Serving,
        Err(e) => {
            tracing::warn!(error = %e, "vault unhealthy");
            ServingStatus::NotServing
        }
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in grpc::SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn serve(config: &Config) -> Result<(), StartError> {
    serve_then(config, |_| Ok(())).await
}

/// As [`serve`], calling `started` once both listeners are bound (with their
/// real addresses) and before waiting for a signal; if it fails, the server
/// shuts down again and its error is returned.
pub async fn serve_then(
    config: &Config,
    started: impl FnOnce(&RunningServer) -> Result<(), String>,
) -> Result<(), StartError> {
    // Installed before the server announces itself, so a signal that arrives
    // right after the "serving" line is handled (SIGHUP reloads, SIGINT and
    // SIGTERM drain) instead of killing the process with the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| StartError(format!("cannot listen for {name}: {e}")))
    };
    let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    let server = start(config).await?;
    if let Err(e) = started(&server) {
        server.shutdown().await;
        return Err(StartError(e));
    }
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the policy and the API keys");
                let _ = server.reload_policy().await;
            }
        }
    }
    tracing::info!("shutdown requested; draining in-flight calls");
    server.shutdown().await;
    Ok(())
}
