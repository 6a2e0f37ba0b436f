//! The command line: `tokenvault serve` (and `serve --dev`, see [`dev`]), the
//! offline `tokenvault keys …` commands that need no running server, the
//! `tokenvault admin …` gRPC client ([`admin`]), the tour's `tokenvault dev …`
//! client and `tokenvault completions`.
//!
//! Every failure prints `tokenvault: <message>` on stderr and exits with the
//! status its [`CliError`] carries (see [`Exit`]). Every command that prints
//! a result (`admin …`, `keys …`, `dev …`) takes `--output json` (`-o json`,
//! or `TOKENVAULT_CLI_OUTPUT=json`) for one JSON document on stdout, in the
//! same words its table uses (see [`output`]).

pub mod admin;
pub mod client;
pub mod dev;
pub mod exit;
pub mod output;
pub mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::audit::{Actor, Outcome};
use crate::config::{Config, ConfigError, KeyringProviderKind};
use crate::crypto::{EnvKeyring, KekVersion, KeyringProvider, LocalKeyring, Pkcs11Keyring};
use crate::grpc::Authenticator;
use crate::vault::Vault;

pub use exit::{CliError, Exit};
use output::OutputFormat;

/// tokenvault: the Google OAuth token vault.
#[derive(Debug, Parser)]
#[command(name = "tokenvault", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the vault (gRPC and HTTP listeners) until SIGINT/SIGTERM.
    Serve {
        /// TOML configuration file; `TOKENVAULT_*` variables override it.
        #[arg(long, env = "TOKENVAULT_CLI_CONFIG", conflicts_with = "dev")]
        config: Option<PathBuf>,
        /// Development mode, NOT FOR PRODUCTION: SQLite and a local keyring in
        /// ./tokenvault-dev-data, a simulated Google, fresh API keys printed on
        /// stdout, loopback only. Needs a build with `--features google-sim`.
        #[arg(long)]
        dev: bool,
    },
    /// Offline key management.
    Keys {
        /// How to print results.
        #[arg(
            short = 'o',
            long,
            global = true,
            env = output::OUTPUT_ENV,
            value_enum,
            default_value_t,
            help_heading = "Output"
        )]
        output: OutputFormat,
        /// The key command.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Administer a running vault over gRPC (role admin, or auditor for reads).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Admin(Box<admin::AdminArgs>),
    /// The five-minute tour: drive a vault started with `serve --dev` as the
    /// app and the sync workers (connect, lease, disconnect, ack).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Dev(Box<dev::DevArgs>),
    /// Print shell completions for `tokenvault` to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// The shells `tokenvault completions` writes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// Bash: `source <(tokenvault completions bash)`.
    Bash,
    /// Zsh: write to a file named `_tokenvault` on `$fpath`.
    Zsh,
    /// Fish: write to `~/.config/fish/completions/tokenvault.fish`.
    Fish,
}

/// `tokenvault keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the configured keyring with key version 1 and a MAC root key: the local
    /// keyring file (mode 0600), or the vault's keys in the HSM token (`pkcs11`). With
    /// `--env`, print new values for the env provider instead.
    Init {
        /// TOML configuration file.
        #[arg(long, env = "TOKENVAULT_CLI_CONFIG")]
        config: Option<PathBuf>,
        /// Print freshly generated values for the env provider (nothing is stored).
        #[arg(long, conflicts_with = "config")]
        env: bool,
        /// With `--env`: the key version to generate. 1 prints a whole new keyring; a
        /// higher number prints only the entry to append to TOKENVAULT_KEYRING__KEYS.
        #[arg(long, requires = "env", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
    },
    /// Generate an API key for an identity and print the config entry holding its hash.
    NewApiKey {
        /// The identity the key authenticates as (e.g. `crm-backend`).
        identity: String,
    },
}

/// Parses the command line and runs it; a usage error exits 2 (clap's own).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`… | head`): a quiet, successful end.
        Err(error) if error.is_quiet() => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenvault: {error}");
            ExitCode::from(error.exit.code())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn load(config: Option<&std::path::Path>) -> Result<Config, String> {
    Config::load(config).map_err(|e: ConfigError| e.to_string())
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { dev: true, .. } => dev::serve(),
        Command::Serve { config, dev: false } => {
            let config = load(config.as_deref())?;
            config.prepare_data_dir().map_err(|e| e.to_string())?;
            runtime()?.block_on(async {
                // Inside the runtime: a trace exporter's channel runs on it.
                crate::telemetry::init_serving(&config.log, &config.tracing)?;
                first_start_keyring(&config).await?;
                crate::server::serve(&config)
                    .await
                    .map_err(|e| e.to_string())
            })?;
            Ok(())
        }
        Command::Keys { output, command } => keys(output, command),
        Command::Admin(args) => {
            // One thread is plenty for a client that makes one call at a time.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            runtime.block_on(admin::run(*args))
        }
        Command::Dev(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            runtime.block_on(dev::run(*args))
        }
        Command::Completions { shell } => completions(shell),
    }
}

/// `tokenvault completions <shell>`: the script on stdout.
fn completions(shell: CompletionShell) -> Result<(), CliError> {
    use std::io::Write as _;
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    // Generated into memory first: a write error is then ours to report.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tokenvault", &mut script);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .map_err(CliError::output)
}

/// `tokenvault keys …`.
fn keys(format: OutputFormat, command: KeysCommand) -> Result<(), CliError> {
    match command {
        KeysCommand::Init {
            env: true, version, ..
        } => keys_init_env(format, version),
        KeysCommand::Init { config, .. } => {
            let config = load(config.as_deref())?;
            config.prepare_data_dir().map_err(|e| e.to_string())?;
            crate::telemetry::init(&config.log);
            let created = runtime()?.block_on(keys_init(&config))?;
            output::print(
                format,
                || created.json.clone(),
                |out| writeln!(out, "{}", created.text),
            )
        }
        KeysCommand::NewApiKey { identity } => keys_new_api_key(format, &identity),
    }
}

/// `tokenvault keys new-api-key IDENTITY`: a new key, shown once, and the
/// configuration entry holding its hash.
fn keys_new_api_key(format: OutputFormat, identity: &str) -> Result<(), CliError> {
    /// The JSON document, borrowing the key: no copy of it is left behind
    /// in a `serde_json::Value`.
    #[derive(serde::Serialize)]
    struct NewApiKey<'a> {
        identity: &'a str,
        api_key: &'a str,
        sha256: &'a str,
    }
    let key = crate::crypto::random_token(32).map_err(|e| e.to_string())?;
    let sha256 = Authenticator::hash_api_key(key.expose());
    if format == OutputFormat::Json {
        return print_secret_json(&NewApiKey {
            identity,
            api_key: key.expose(),
            sha256: &sha256,
        });
    }
    print_stdout(|out| {
        writeln!(
            out,
            "API key for {identity} (shown once; give it to the caller):"
        )?;
        writeln!(out, "  {}", key.expose())?;
        writeln!(out)?;
        writeln!(out, "Add to the vault's configuration:")?;
        writeln!(out, "  [[auth.api_keys]]")?;
        writeln!(out, "  identity = {identity:?}")?;
        writeln!(out, "  sha256 = \"{sha256}\"")
    })
}

/// Prints a JSON document that holds secret material (a new key), written
/// straight from the borrowed values rather than through a
/// `serde_json::Value` that would keep an unzeroized copy.
fn print_secret_json(document: &impl serde::Serialize) -> Result<(), CliError> {
    print_stdout(|out| {
        serde_json::to_writer_pretty(&mut *out, document)?;
        writeln!(out)
    })
}

/// `tokenvault keys init --env [--version N]`: prints new env keyring values.
fn keys_init_env(format: OutputFormat, version: u32) -> Result<(), CliError> {
    /// The variables of a new env keyring (version 1).
    #[derive(serde::Serialize)]
    struct Variables<'a> {
        #[serde(rename = "TOKENVAULT_KEYRING__PROVIDER")]
        provider: &'a str,
        #[serde(rename = "TOKENVAULT_KEYRING__KEYS")]
        keys: &'a str,
        #[serde(rename = "TOKENVAULT_KEYRING__MAC_KEY")]
        mac_key: &'a str,
    }
    /// The JSON document: the whole keyring for version 1, else the entry
    /// to append to TOKENVAULT_KEYRING__KEYS (the other is `null`).
    #[derive(serde::Serialize)]
    struct EnvValues<'a> {
        version: u32,
        variables: Option<Variables<'a>>,
        keys_entry: Option<&'a str>,
    }
    let kek = KekVersion::new(version)
        .ok_or_else(|| CliError::from("--version must be at least 1".to_owned()))?;
    let values = EnvKeyring::generate_values(kek).map_err(|e| e.to_string())?;
    if format == OutputFormat::Json {
        let first = kek == KekVersion::FIRST;
        return print_secret_json(&EnvValues {
            version,
            variables: first.then(|| Variables {
                provider: "env",
                keys: values.keys.expose(),
                mac_key: values.mac_root_key.expose(),
            }),
            keys_entry: (!first).then(|| values.keys.expose()),
        });
    }
    let version = kek;
    print_stdout(|out| {
        if version == KekVersion::FIRST {
            writeln!(
                out,
                "# A new env keyring: key version 1 and the MAC root key. Give both to every"
            )?;
            writeln!(
                out,
                "# replica (a secret store, not a file next to the database backups):"
            )?;
            writeln!(out, "TOKENVAULT_KEYRING__PROVIDER=env")?;
            writeln!(out, "TOKENVAULT_KEYRING__KEYS={}", values.keys.expose())?;
            writeln!(
                out,
                "TOKENVAULT_KEYRING__MAC_KEY={}",
                values.mac_root_key.expose()
            )
        } else {
            writeln!(
                out,
                "# Key version {version}: append this entry to TOKENVAULT_KEYRING__KEYS (entries are"
            )?;
            writeln!(
                out,
                "# comma-separated) on every replica and restart them, then rotate. Keep the MAC key."
            )?;
            writeln!(out, "{}", values.keys.expose())
        }
    })
}

/// Runs `write` on the locked stdout and flushes it; a write error becomes
/// [`CliError::output`] (a broken pipe ends quietly) instead of the panic of
/// `println!`.
fn print_stdout(
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    write(&mut stdout)
        .and_then(|()| stdout.flush())
        .map_err(CliError::output)
}

/// What `tokenvault keys init` created, for people and as JSON.
struct KeyringCreated {
    text: String,
    json: serde_json::Value,
}

/// `tokenvault keys init`: creates the keyring, registers version 1 and
/// audits the creation.
async fn keys_init(config: &Config) -> Result<KeyringCreated, String> {
    let created = match config.keyring.provider {
        KeyringProviderKind::Local => {
            let path = config.keyring_path();
            LocalKeyring::init(&path).map_err(|e| e.to_string())?;
            KeyringCreated {
                text: format!(
                    "created keyring {} with key version v1 (mode 0600); back it up separately from the database",
                    path.display()
                ),
                json: serde_json::json!({
                    "provider": "local",
                    "version": 1,
                    "path": path.display().to_string(),
                    "token_label": null,
                    "label_prefix": null,
                }),
            }
        }
        KeyringProviderKind::Pkcs11 => {
            let settings = config.pkcs11_settings().map_err(|e| e.to_string())?;
            Pkcs11Keyring::init(&settings).map_err(|e| e.to_string())?;
            KeyringCreated {
                text: format!(
                    "created key version v1 and the MAC root key in token {:?} (labels {}/…); they \
                     cannot leave it: back up the token as its vendor documents",
                    settings.token_label, settings.label_prefix
                ),
                json: serde_json::json!({
                    "provider": "pkcs11",
                    "version": 1,
                    "path": null,
                    "token_label": settings.token_label.to_string(),
                    "label_prefix": settings.label_prefix.to_string(),
                }),
            }
        }
        KeyringProviderKind::Env => {
            return Err(
                "keyring.provider: the env keyring is not stored by the vault; run \
                 `tokenvault keys init --env` to generate its values"
                    .to_owned(),
            );
        }
    };
    let vault = Vault::open(config).await.map_err(|e| e.to_string())?;
    vault
        .audit()
        .record(
            &Actor::local_operator(),
            "keys.init",
            "kek:v1",
            Outcome::Ok,
            config.keyring.provider.as_str(),
        )
        .await
        .map_err(|e| e.to_string())?;
    vault.shutdown().await;
    Ok(created)
}

/// On a first start, the local keyring file or the HSM's keys are created —
/// but only when the database has never seen a key, so that a lost keyring is
/// reported instead of silently replaced. Replicas starting together claim the
/// creation in the database: one creates, the others wait for its keys.
async fn first_start_keyring(config: &Config) -> Result<(), String> {
    let check = || -> Result<bool, String> {
        match config.keyring.provider {
            KeyringProviderKind::Local => Ok(!config.keyring_path().exists()),
            KeyringProviderKind::Pkcs11 => {
                let settings = config.pkcs11_settings().map_err(|e| e.to_string())?;
                Pkcs11Keyring::token_has_keys(&settings)
                    .map(|has| !has)
                    .map_err(|e| e.to_string())
            }
            KeyringProviderKind::Env => Ok(false),
        }
    };
    // An HSM that another replica is writing to may not answer at once (SoftHSM2
    // reads and writes files): asked again a few times before the error counts.
    let is_missing = async || -> Result<bool, String> {
        let mut last = Ok(false);
        for attempt in 0..5 {
            last = check();
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
        }
        last
    };
    if !is_missing().await? {
        return Ok(());
    }
    let store = crate::store::open(&config.database_url())
        .await
        .map_err(|e| e.to_string())?;
    let known = store.kek_list().await.map_err(|e| e.to_string())?;
    if !known.is_empty() {
        store.close().await;
        return Err(match config.keyring.provider {
            KeyringProviderKind::Pkcs11 => format!(
                "keyring.pkcs11.token_label: token {:?} holds no keys labelled {}/…, but the \
                 database uses {}; use the token (or prefix) that holds them",
                config.keyring.pkcs11.token_label,
                config.keyring.pkcs11.label_prefix,
                output::plural(known.len(), "key version", "key versions")
            ),
            _ => format!(
                "keyring.path: {} is missing, but the database uses {}; restore the keyring from its backup",
                config.keyring_path().display(),
                output::plural(known.len(), "key version", "key versions")
            ),
        });
    }
    let me = format!(
        "first-start-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    );
    let holder = store
        .keyring_claim("init", &me, crate::vault::KEY_CLAIM_TTL)
        .await
        .map_err(|e| e.to_string());
    if holder.as_ref().is_ok_and(|h| *h != me) {
        // Another replica creates the keys; it has a minute. Once the database records
        // them and this replica's keyring still lacks them, it holds another keyring.
        let deadline = std::time::Instant::now() + crate::vault::KEY_CLAIM_TTL;
        let waited = loop {
            if !is_missing().await? {
                break Ok(());
            }
            match store.kek_list().await {
                Ok(known) if !known.is_empty() => {
                    break Err(format!(
                        "the fleet's keys were created by another replica, but this replica's \
                         keyring does not hold them: give it the same keyring ({})",
                        match config.keyring.provider {
                            KeyringProviderKind::Pkcs11 =>
                                "keyring.pkcs11.token_label and label_prefix",
                            _ => "the same keyring.path, or a copy of that file",
                        }
                    ));
                }
                Ok(_) => {}
                Err(e) => break Err(e.to_string()),
            }
            if std::time::Instant::now() > deadline {
                break Err(format!(
                    "{} creates the keyring on first start, but none appeared within a minute; \
                     start again (its claim has expired) or create it with `tokenvault keys init`",
                    holder.as_deref().unwrap_or("another replica")
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        store.close().await;
        return waited;
    }
    store.close().await;
    holder?;
    match config.keyring.provider {
        KeyringProviderKind::Pkcs11 => {
            let settings = config.pkcs11_settings().map_err(|e| e.to_string())?;
            let keyring = Pkcs11Keyring::complete(&settings).map_err(|e| e.to_string())?;
            tracing::warn!(token = %settings.token_label, provider = keyring.kind(), "created the vault's keys in the HSM on first start");
        }
        _ => {
            let keyring = LocalKeyring::init(config.keyring_path()).map_err(|e| e.to_string())?;
            tracing::warn!(path = %config.keyring_path().display(), provider = keyring.kind(), "created a new local keyring on first start; back it up separately from the database");
        }
    }
    let vault = Vault::open(config).await.map_err(|e| e.to_string())?;
    vault
        .audit()
        .record(
            &Actor::system(),
            "keys.init",
            "kek:v1",
            Outcome::Ok,
            "first start",
        )
        .await
        .map_err(|e| e.to_string())?;
    vault.shutdown().await;
    Ok(())
}
