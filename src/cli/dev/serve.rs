//! `tokenvault serve --dev`: a vault on loopback with a throwaway keyring,
//! the Google simulator, one API key per role written to a private env file,
//! and the policy the tour needs.

use super::*;
use simulated::DevGoogle;

/// `tokenvault serve --dev`: the embedded default plus the Google simulator
/// and fresh API keys, until SIGINT/SIGTERM.
pub fn serve() -> Result<(), CliError> {
    require_simulator()?;
    let config = dev_config()?;
    config.prepare_data_dir().map_err(|e| e.to_string())?;
    crate::cli::runtime()?.block_on(async move {
        // Inside the runtime: a trace exporter's channel runs on it.
        crate::telemetry::init_serving(&config.log, &config.tracing)?;
        serve_dev(config).await
    })
}

/// The configuration from the environment (no file), with dev mode's data
/// directory, refusing what dev mode does not do.
pub(super) fn dev_config() -> Result<Config, CliError> {
    let refuse = |setting: &str, problem: String| -> CliError {
        ConfigError {
            setting: setting.to_owned(),
            problem,
        }
        .to_string()
        .into()
    };
    let beyond_loopback = |name: &str, addr: SocketAddr| {
        refuse(
            name,
            format!("{addr} is not a loopback address; serve --dev listens on loopback only"),
        )
    };
    // Looked at before loading too: loading refuses them with advice (TLS)
    // that does not apply to dev mode.
    for (name, var) in [
        ("grpc_addr", "TOKENVAULT_GRPC_ADDR"),
        ("http_addr", "TOKENVAULT_HTTP_ADDR"),
    ] {
        if let Some(addr) = std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .filter(|a| !a.ip().is_loopback())
        {
            return Err(beyond_loopback(name, addr));
        }
    }
    let mut config = Config::load(None).map_err(|e| e.to_string())?;
    if std::env::var_os("TOKENVAULT_DATA_DIR").is_none() {
        config.data_dir = PathBuf::from(DEV_DATA_DIR);
    }
    for (name, addr) in [
        ("grpc_addr", config.grpc_addr),
        ("http_addr", config.http_addr),
    ] {
        if !addr.ip().is_loopback() {
            return Err(beyond_loopback(name, addr));
        }
    }
    if config.tls.enabled() || config.tls.client_ca_file.is_some() {
        return Err(refuse(
            "tls",
            "serve --dev serves plaintext on loopback; unset the [tls] settings".to_owned(),
        ));
    }
    if config
        .database_url
        .as_deref()
        .is_some_and(|url| !url.starts_with("sqlite:"))
    {
        return Err(refuse(
            "database_url",
            "serve --dev runs on SQLite only; unset it to use the dev data directory".to_owned(),
        ));
    }
    if config.keyring.provider != KeyringProviderKind::Local {
        return Err(refuse(
            "keyring.provider",
            "serve --dev uses the local keyring in its data directory".to_owned(),
        ));
    }
    Ok(config)
}

/// This run's API keys, one per role.
pub(super) struct DevKeys(pub(super) Vec<(&'static DevRole, SecretString)>);

impl DevKeys {
    pub(super) fn generate() -> Result<Self, String> {
        ROLES
            .iter()
            .map(|role| {
                crate::crypto::random_token(32)
                    .map(|key| (*role, key))
                    .map_err(|e| format!("cannot generate a dev API key: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Replaces the configuration's API keys and policy with dev mode's.
    pub(super) fn configure(&self, config: &mut Config) {
        config.auth.api_keys = self
            .0
            .iter()
            .map(|(role, key)| ApiKeyConfig {
                identity: role.identity.to_owned(),
                sha256: Authenticator::hash_api_key(key.expose()),
            })
            .collect();
        config.policy.file = None;
        config.policy.identities = ROLES
            .iter()
            .map(|role| {
                (
                    role.identity.to_owned(),
                    IdentityEntry {
                        role: role.role.to_owned(),
                        purposes: role.purpose.map(str::to_owned).into_iter().collect(),
                        consumers: role.consumer.map(str::to_owned).into_iter().collect(),
                        authenticate: None,
                    },
                )
            })
            .collect();
        config.policy.purposes = [
            ("calendar_sync", "calendar", &config.google.calendar_scopes),
            ("email_sync", "email", &config.google.email_scopes),
        ]
        .into_iter()
        .map(|(purpose, integration, scopes)| {
            (
                purpose.to_owned(),
                PurposeEntry {
                    integrations: vec![integration.to_owned()],
                    scopes: scopes.clone(),
                    tenants: Vec::new(),
                },
            )
        })
        .collect();
    }

    /// The `export` lines (with a comment naming each identity).
    pub(super) fn exports(&self, grpc_addr: SocketAddr) -> String {
        let mut text = String::new();
        for (role, key) in &self.0 {
            text.push_str(&format!(
                "# {}: role {}, {}\nexport {}={}\n",
                role.identity,
                role.role,
                role.note,
                role.env,
                key.expose()
            ));
        }
        text.push_str(&format!("export {SERVER_ENV}=http://{grpc_addr}\n"));
        text
    }
}

pub(super) async fn serve_dev(mut config: Config) -> Result<(), CliError> {
    tracing::warn!(data_dir = %config.data_dir.display(), "DEV MODE, NOT FOR PRODUCTION: simulated Google, throwaway API keys printed on stdout, loopback only");
    crate::cli::first_start_keyring(&config).await?;

    // The simulator redirects the browser to the vault's real callback, so it
    // must know the HTTP port before the vault binds it.
    config.http_addr = resolve_port(config.http_addr)?;
    let redirect_uri = format!("http://{}/oauth/callback", config.http_addr);
    let google = DevGoogle::start(redirect_uri).await?;
    google.configure(&mut config.google);
    let google_url = google.base_url();

    let keys = DevKeys::generate()?;
    keys.configure(&mut config);
    config.validate().map_err(|e| e.to_string())?;

    let env_file = config.data_dir.join(ENV_FILE_NAME);
    let result = crate::server::serve_then(&config, |server| {
        announce(server, &config, &google_url, &keys, &env_file)
    })
    .await;
    // The keys die with this process; so does the file that holds them.
    let _ = std::fs::remove_file(&env_file);
    google.shutdown().await;
    result.map_err(|e| CliError::failed(e.to_string()))
}

/// A port-0 address turned into a free port, by binding it briefly. (Another
/// process could take the port before the vault binds it again; in dev mode
/// that costs a restart, not a secret.)
pub(super) fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    std::net::TcpListener::bind(addr)
        .and_then(|probe| probe.local_addr())
        .map_err(|e| format!("http_addr: cannot listen on {addr}: {e}"))
}

/// Writes the keys' `export` lines to the 0600 env file and prints the
/// banner on stdout, once the listeners are bound.
pub(super) fn announce(
    server: &RunningServer,
    config: &Config,
    google_url: &str,
    keys: &DevKeys,
    env_file: &Path,
) -> Result<(), String> {
    let exports = Zeroizing::new(keys.exports(server.grpc_addr));
    write_private(
        env_file,
        &format!(
            "# tokenvault serve --dev: NOT FOR PRODUCTION. Valid while that process runs.\n{}",
            exports.as_str()
        ),
    )
    .map_err(|e| format!("cannot write {}: {e}", env_file.display()))?;
    let banner = format!(
        "\
*** tokenvault DEV MODE: NOT FOR PRODUCTION ***
Google is simulated (every sign-in consents), the API keys below are new on
every start and die with this process, and nothing listens beyond loopback.

  gRPC            http://{grpc}
  OAuth callback  http://{http}/oauth/callback
  Google (sim)    {google}
  data            {data} (SQLite + local keyring)

In another terminal, paste these lines (or run `. {env_file}`):

{exports}
Then: tokenvault dev connect --tenant acme --account alice --integration calendar
",
        grpc = server.grpc_addr,
        http = server.http_addr,
        google = google_url,
        data = config.data_dir.display(),
        env_file = env_file.display(),
        exports = exports.as_str(),
    );
    let banner = Zeroizing::new(banner);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot print the dev keys: {e}"))?;
    tracing::warn!(grpc_addr = %server.grpc_addr, http_addr = %server.http_addr, google = %google_url, env_file = %env_file.display(), identities = ?ROLES.map(|r| r.identity), "DEV MODE, NOT FOR PRODUCTION: dev API keys printed on stdout");
    Ok(())
}

/// Writes `text` to a file only its owner can read (mode 0600, also when the
/// file existed).
pub(super) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

// ---------------------------------------------------------------------------
// The simulated Google (feature `google-sim`)
// ---------------------------------------------------------------------------

/// Why a binary built without the simulator refuses dev mode, and how to
/// build one with it.
pub(super) const WITHOUT_SIMULATOR: &str = "built without the Google simulator (cargo feature google-sim), \
     which serve --dev and the dev commands need: build with \
     `cargo build --release --locked --features google-sim` or run \
     `cargo run --release --locked --features google-sim -- serve --dev`";

/// Refuses dev mode when the binary has no simulator, before anything is
/// written; exit 1, like dev mode's configuration errors.
pub(super) fn require_simulator() -> Result<(), CliError> {
    if cfg!(feature = "google-sim") {
        Ok(())
    } else {
        Err(CliError::failed(WITHOUT_SIMULATOR))
    }
}

/// Dev mode's Google: the simulator, in this process.
#[cfg(feature = "google-sim")]
mod simulated {
    use super::CliError;
    use crate::config::GoogleConfig;
    use crate::google::sim::{GoogleSim, SimClient, SimConfig};

    /// The OAuth client the simulator registers (the same as
    /// `tokenvault-google-sim`'s development client).
    const DEV_CLIENT_ID: &str = "tokenvault-dev.apps.googleusercontent.com";
    const DEV_CLIENT_SECRET: &str = "tokenvault-dev-secret";

    /// The running simulator, with dev mode's OAuth client registered.
    pub(super) struct DevGoogle {
        sim: GoogleSim,
        redirect_uri: String,
    }

    impl DevGoogle {
        /// Starts the simulator on a free loopback port; it sends the
        /// browser back to `redirect_uri`, the vault's callback.
        pub(super) async fn start(redirect_uri: String) -> Result<Self, CliError> {
            let sim = GoogleSim::start(SimConfig::with_clients(vec![SimClient::new(
                DEV_CLIENT_ID,
                DEV_CLIENT_SECRET,
                &redirect_uri,
            )]))
            .await
            .map_err(|e| format!("cannot start the Google simulator: {e}"))?;
            Ok(Self { sim, redirect_uri })
        }

        /// Points the vault's Google settings at the simulator.
        pub(super) fn configure(&self, google: &mut GoogleConfig) {
            google.client_id = DEV_CLIENT_ID.to_owned();
            google.client_secret = DEV_CLIENT_SECRET.to_owned().into();
            google.redirect_uri = self.redirect_uri.clone();
            google.return_url = None;
            google.auth_uri = self.sim.auth_uri();
            google.token_uri = self.sim.token_uri();
            google.revoke_uri = self.sim.revoke_uri();
            google.userinfo_uri = self.sim.userinfo_uri();
            google.jwks_uri = self.sim.jwks_uri();
            google.issuers = vec![self.sim.issuer()];
        }

        /// `http://127.0.0.1:PORT`.
        pub(super) fn base_url(&self) -> String {
            self.sim.base_url()
        }

        /// Stops the simulator.
        pub(super) async fn shutdown(self) {
            self.sim.shutdown().await;
        }
    }
}

/// Without the simulator there is no dev Google: the type has no values
/// (`require_simulator` refuses dev mode before one would be needed), so
/// `serve --dev` still compiles and none of it is dead code.
#[cfg(not(feature = "google-sim"))]
mod simulated {
    use super::CliError;
    use crate::config::GoogleConfig;

    /// No value: the binary has no simulator.
    pub(super) enum DevGoogle {}

    impl DevGoogle {
        /// Refuses, as `require_simulator` does.
        pub(super) async fn start(_redirect_uri: String) -> Result<Self, CliError> {
            Err(CliError::failed(super::WITHOUT_SIMULATOR))
        }

        pub(super) fn configure(&self, _google: &mut GoogleConfig) {
            match *self {}
        }

        pub(super) fn base_url(&self) -> String {
            match *self {}
        }

        pub(super) async fn shutdown(self) {
            match self {}
        }
    }
}

// ---------------------------------------------------------------------------
// tokenvault dev …
// ---------------------------------------------------------------------------
