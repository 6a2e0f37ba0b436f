//! How `tokenvault admin` reaches the vault: connection settings from flags,
//! the environment and a client configuration file (in that order of
//! precedence), turned into an authenticated `AdminService` client.
//!
//! The API key is read only from `TOKENVAULT_CLI_API_KEY` or from a file named by
//! `--api-key-file` (or `api_key_file` in the configuration file): a flag value
//! would show in `ps`. It is sent as `authorization: Bearer <key>`, and only
//! over TLS or to a loopback address (the vault accepts API keys from loopback
//! peers only, and anything else would send it in clear text).
//!
//! An `https://` server's certificate is checked against `--ca-cert` when one
//! is given (a private CA, as most deployments use), else against the Mozilla
//! root CAs built into the binary (webpki-roots), as a browser would; a
//! certificate neither trusts fails the connection (exit 5) with a message
//! saying to pass `--ca-cert`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use zeroize::Zeroizing;

use super::exit::CliError;
use crate::proto::v1::admin_service_client::AdminServiceClient;

/// The server used when neither a flag, the environment nor the file names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The per-call and connect timeout used when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable holding the API key.
pub const API_KEY_ENV: &str = "TOKENVAULT_CLI_API_KEY";

/// The environment variable naming the client configuration file.
pub const CLIENT_CONFIG_ENV: &str = "TOKENVAULT_CLI_ADMIN_CONFIG";

/// The environment variable naming the server.
pub const SERVER_ENV: &str = "TOKENVAULT_CLI_SERVER";

/// The environment variable naming the CA certificate file (`--ca-cert`).
pub const CA_CERT_ENV: &str = "TOKENVAULT_CLI_CA_CERT";

/// The environment variable naming the client certificate file (`--client-cert`).
pub const CLIENT_CERT_ENV: &str = "TOKENVAULT_CLI_CLIENT_CERT";

/// The environment variable naming the client private key file (`--client-key`).
pub const CLIENT_KEY_ENV: &str = "TOKENVAULT_CLI_CLIENT_KEY";

/// Connection flags of `tokenvault admin`; they may be given after any
/// subcommand. A flag beats its environment variable, which beats the client
/// configuration file's setting.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionFlags {
    /// The vault's gRPC address; `https://` uses TLS [default: http://127.0.0.1:50051]
    #[arg(long, global = true, env = SERVER_ENV, value_name = "URL")]
    pub server: Option<String>,
    /// PEM file of the CA that signed the vault's certificate, for https:// [default: the
    /// Mozilla root CAs built in]; the flag beats the environment, which beats `ca_cert`
    /// in the client config file.
    #[arg(long, global = true, env = CA_CERT_ENV, value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; the flag beats the environment, which
    /// beats `client_cert` in the client config file.
    #[arg(long, global = true, env = CLIENT_CERT_ENV, value_name = "PATH")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate; the flag beats the environment, which
    /// beats `client_key` in the client config file.
    #[arg(long, global = true, env = CLIENT_KEY_ENV, value_name = "PATH")]
    pub client_key: Option<PathBuf>,
    /// File holding the API key (else the TOKENVAULT_CLI_API_KEY environment variable).
    #[arg(long, global = true, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// Connect and per-call timeout, e.g. `10s`, `1m` [default: 10s]
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Client configuration file (TOML) [default: $XDG_CONFIG_HOME/tokenvault/admin.toml
    /// or ~/.config/tokenvault/admin.toml, if it exists]
    #[arg(long, global = true, env = CLIENT_CONFIG_ENV, value_name = "PATH")]
    pub client_config: Option<PathBuf>,
}

/// The client configuration file: the same settings as the flags (relative
/// paths are relative to the file's directory), but never an API key itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: Option<String>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    api_key_file: Option<PathBuf>,
    /// humantime, e.g. "10s".
    timeout: Option<String>,
}

/// The API key, zeroized when dropped and never printed.
struct ApiKey(Zeroizing<String>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Settings resolved from flags, environment and file.
#[derive(Debug)]
pub struct ClientSettings {
    /// The server URL.
    pub server: String,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    api_key: Option<ApiKey>,
    /// Connect and per-call timeout.
    pub timeout: Duration,
}

impl ClientSettings {
    /// Resolves the settings: flags (and their environment variables, which
    /// clap already applied) over the configuration file over the defaults.
    pub fn resolve(flags: &ConnectionFlags) -> Result<Self, CliError> {
        Self::resolve_with(flags, |name| std::env::var(name).ok())
    }

    /// As [`ClientSettings::resolve`], with an explicit environment lookup.
    fn resolve_with(
        flags: &ConnectionFlags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CliError> {
        let (file, base) = match &flags.client_config {
            Some(path) => (Some(load_file(path)?), parent(path)),
            None => match default_config_path(&env) {
                Some(path) if path.is_file() => (Some(load_file(&path)?), parent(&path)),
                _ => (None, PathBuf::new()),
            },
        };
        let file = file.unwrap_or_default();
        let in_file = |p: Option<PathBuf>| p.map(|p| base.join(p));

        let server = flags
            .server
            .clone()
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let timeout = match (flags.timeout, file.timeout) {
            (Some(t), _) => t,
            (None, Some(text)) => humantime::parse_duration(&text)
                .map_err(|e| CliError::usage(format!("client config: timeout: {text:?}: {e}")))?,
            (None, None) => DEFAULT_TIMEOUT,
        };
        let api_key = match (&flags.api_key_file, env(API_KEY_ENV)) {
            (Some(path), _) => Some(read_api_key(path)?),
            (None, Some(key)) => Some(ApiKey(Zeroizing::new(key.trim().to_owned()))),
            (None, None) => match in_file(file.api_key_file) {
                Some(path) => Some(read_api_key(&path)?),
                None => None,
            },
        };
        Ok(Self {
            server,
            ca_cert: flags.ca_cert.clone().or(in_file(file.ca_cert)),
            client_cert: flags.client_cert.clone().or(in_file(file.client_cert)),
            client_key: flags.client_key.clone().or(in_file(file.client_key)),
            api_key,
            timeout,
        })
    }

    /// Connects to the vault and returns an `AdminService` client that sends
    /// the API key, if one is configured, with every call.
    pub async fn connect(&self) -> Result<AdminClient, CliError> {
        let uri: Uri = self
            .server
            .parse()
            .map_err(|e| CliError::usage(format!("--server {:?}: {e}", self.server)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(CliError::usage(format!(
                    "--server {:?}: must start with http:// or https://",
                    self.server
                )));
            }
        };
        let host = uri.host().unwrap_or_default().to_owned();
        let bearer = match &self.api_key {
            None => None,
            Some(_) if !tls && !is_loopback(&host) => {
                return Err(CliError::usage(format!(
                    "refusing to send the API key in clear text to {host}: use https:// \
                     (the vault accepts API keys from loopback peers only)"
                )));
            }
            Some(key) => {
                if key.0.is_empty() {
                    return Err(CliError::usage("the API key is empty"));
                }
                let header = Zeroizing::new(format!("Bearer {}", key.0.as_str()));
                let mut value = MetadataValue::try_from(header.as_str()).map_err(|_| {
                    CliError::usage("the API key holds characters not allowed in a header")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };

        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| CliError::usage(format!("--server {:?}: {e}", self.server)))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if tls {
            endpoint = endpoint
                .tls_config(self.tls_config()?)
                .map_err(|e| CliError::usage(format!("TLS settings: {e}")))?;
        } else if self.client_cert.is_some() || self.ca_cert.is_some() {
            return Err(CliError::usage(
                "--ca-cert and --client-cert need an https:// server",
            ));
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let mut error = CliError::unreachable(&self.server, &e);
            // Recognised by type; by rustls' wording too, should a layer between
            // rustls and tonic ever re-wrap the error as text.
            let untrusted =
                untrusted_certificate(&e) || error.message.contains("invalid peer certificate");
            if tls && untrusted {
                error.message.push_str(match self.ca_cert {
                    Some(_) => {
                        "; the vault's certificate does not verify against the CA in --ca-cert \
                         (another CA, another name, or out of its validity)"
                    }
                    None => {
                        "; the vault's certificate does not verify against the public CAs \
                         this client knows (the Mozilla roots): pass --ca-cert with the CA \
                         that signed it"
                    }
                });
            }
            error
        })?;
        Ok(AdminServiceClient::with_interceptor(
            channel,
            BearerAuth(bearer),
        ))
    }

    fn tls_config(&self) -> Result<ClientTlsConfig, CliError> {
        let mut tls = match &self.ca_cert {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca)?)),
            // No CA given: the public web's roots, compiled in (no system
            // certificate store is read).
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let key = Zeroizing::new(read_pem(key)?);
                tls = tls.identity(Identity::from_pem(read_pem(cert)?, key.as_slice()));
            }
            (None, None) => {}
            _ => {
                return Err(CliError::usage(
                    "--client-cert and --client-key go together",
                ));
            }
        }
        Ok(tls)
    }
}

/// An `AdminService` client with the API key interceptor.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Adds `authorization: Bearer <key>` to every call when an API key is set.
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// `$XDG_CONFIG_HOME/tokenvault/admin.toml`, else
/// `$HOME/.config/tokenvault/admin.toml`.
fn default_config_path(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(base.join("tokenvault").join("admin.toml"))
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn load_file(path: &Path) -> Result<ConfigFile, CliError> {
    if !path.is_file() {
        return Err(CliError::usage(format!(
            "client config {}: no such file",
            path.display()
        )));
    }
    Figment::from(Toml::file_exact(path))
        .extract()
        .map_err(|e| CliError::usage(format!("client config {}: {e}", path.display())))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))
}

fn read_api_key(path: &Path) -> Result<ApiKey, CliError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?,
    );
    Ok(ApiKey(Zeroizing::new(text.trim().to_owned())))
}

/// Whether a connection failed because the server's certificate is not
/// trusted (rustls' `InvalidCertificate`: an unknown issuer, a wrong name, an
/// expired certificate), anywhere in `error`'s chain. tokio-rustls reports
/// it as an `io::Error` wrapping the rustls error.
fn untrusted_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(tls, Some(rustls::Error::InvalidCertificate(_))) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether `host` (from a URI, IPv6 in brackets) is a loopback address.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "file-key\n").unwrap();
        let path = dir.path().join("admin.toml");
        std::fs::write(
            &path,
            "server = \"https://vault.internal:50051\"\nca_cert = \"ca.pem\"\n\
             api_key_file = \"key\"\ntimeout = \"3s\"\n",
        )
        .unwrap();
        let flags = ConnectionFlags {
            client_config: Some(path.clone()),
            ..Default::default()
        };
        let s = ClientSettings::resolve_with(&flags, env_of(&[])).unwrap();
        assert_eq!(s.server, "https://vault.internal:50051");
        assert_eq!(s.ca_cert, Some(dir.path().join("ca.pem")));
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(s.api_key.as_ref().map(|k| k.0.as_str()), Some("file-key"));

        // The environment's key beats the file's key file; flags beat both.
        let s = ClientSettings::resolve_with(&flags, env_of(&[(API_KEY_ENV, "env-key")])).unwrap();
        assert_eq!(s.api_key.as_ref().map(|k| k.0.as_str()), Some("env-key"));
        let flags = ConnectionFlags {
            server: Some("http://127.0.0.1:1".to_owned()),
            timeout: Some(Duration::from_secs(1)),
            client_config: Some(path),
            ..Default::default()
        };
        let s = ClientSettings::resolve_with(&flags, env_of(&[])).unwrap();
        assert_eq!(s.server, "http://127.0.0.1:1");
        assert_eq!(s.timeout, Duration::from_secs(1));
    }

    #[test]
    fn defaults_apply_without_flags_environment_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().display().to_string();
        let s = ClientSettings::resolve_with(
            &ConnectionFlags::default(),
            env_of(&[("XDG_CONFIG_HOME", &home)]),
        )
        .unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert!(s.api_key.is_none());
    }

    #[test]
    fn the_default_file_is_found_under_xdg_config_home_then_home() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().join("xdg");
        std::fs::create_dir_all(xdg.join("tokenvault")).unwrap();
        std::fs::write(
            xdg.join("tokenvault/admin.toml"),
            "server = \"http://127.0.0.1:7\"\n",
        )
        .unwrap();
        let xdg = xdg.display().to_string();
        let s = ClientSettings::resolve_with(
            &ConnectionFlags::default(),
            env_of(&[("XDG_CONFIG_HOME", &xdg), ("HOME", "/nonexistent")]),
        )
        .unwrap();
        assert_eq!(s.server, "http://127.0.0.1:7");
        assert_eq!(
            default_config_path(&env_of(&[("HOME", "/home/op")])),
            Some(PathBuf::from("/home/op/.config/tokenvault/admin.toml"))
        );
    }

    #[test]
    fn a_bad_file_is_a_usage_error_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.toml");
        std::fs::write(&path, "api_key = \"never in a file\"\n").unwrap();
        let flags = ConnectionFlags {
            client_config: Some(path),
            ..Default::default()
        };
        let e = ClientSettings::resolve_with(&flags, env_of(&[])).unwrap_err();
        assert_eq!(e.exit.code(), 2);
        assert!(e.message.contains("api_key"), "{e}");
        let flags = ConnectionFlags {
            client_config: Some(dir.path().join("missing.toml")),
            ..Default::default()
        };
        let e = ClientSettings::resolve_with(&flags, env_of(&[])).unwrap_err();
        assert_eq!(e.exit.code(), 2);
    }

    #[test]
    fn the_api_key_never_prints() {
        let flags = ConnectionFlags::default();
        let s = ClientSettings::resolve_with(&flags, env_of(&[(API_KEY_ENV, "sekrit")])).unwrap();
        assert!(!format!("{s:?}").contains("sekrit"));
    }

    #[test]
    fn an_untrusted_certificate_is_recognised_through_the_io_error() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(untrusted_certificate(&io));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!untrusted_certificate(&refused));
    }

    #[test]
    fn https_without_a_ca_uses_the_built_in_roots() {
        let flags = ConnectionFlags {
            server: Some("https://vault.example:50051".to_owned()),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().display().to_string();
        let s =
            ClientSettings::resolve_with(&flags, env_of(&[("XDG_CONFIG_HOME", &home)])).unwrap();
        assert!(s.tls_config().is_ok());
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["vault.internal", "10.0.0.1", "[2001:db8::1]", ""] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
