//! `tokenvault-google-sim`: runs the Google simulator on its own, for local
//! development against `tokenvault serve`. Prints the base URL and every
//! endpoint URL on stdout (`name=url`, one per line), logs requests (endpoint
//! and status only) on stderr, and serves until Ctrl-C or SIGTERM. Built only
//! with the `google-sim` feature: `cargo run --locked --features google-sim
//! --bin tokenvault-google-sim`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokenvault::google::sim::{GoogleSim, SimClient, SimConfig};

const USAGE: &str = "\
usage: tokenvault-google-sim [OPTIONS]

Runs a fake Google (OAuth 2.0 authorization, token, revoke, userinfo, JWKS,
discovery) over HTTP and prints its URLs.

options:
  --addr ADDR                   listen address (default 127.0.0.1:9090; port 0 picks one)
  --client-id ID                registers a client; the options below apply to it
  --client-secret SECRET        the last client's secret
  --redirect-uri URI            adds a redirect URI to the last client (repeatable)
  --access-token-lifetime DUR   e.g. 1h, 90s (default 1h)
  --rotate-refresh-tokens       return a new refresh token on every refresh
  --max-refresh-tokens N        live refresh tokens per user and client (default 100)
  --issuer URL                  id_token issuer (default https://accounts.google.com)
  -h, --help                    this text

Without --client-id, one development client is registered:
  client id     tokenvault-dev.apps.googleusercontent.com
  client secret tokenvault-dev-secret
  redirect URI  http://127.0.0.1:8080/oauth/callback
";

const DEV_CLIENT_ID: &str = "tokenvault-dev.apps.googleusercontent.com";
const DEV_CLIENT_SECRET: &str = "tokenvault-dev-secret";
const DEV_REDIRECT_URI: &str = "http://127.0.0.1:8080/oauth/callback";

/// What the command line asked for.
struct Options {
    addr: SocketAddr,
    config: SimConfig,
}

/// Parses the arguments; `Ok(None)` means help was printed.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    let mut addr: SocketAddr = ([127, 0, 0, 1], 9090).into();
    let mut config = SimConfig::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--addr" => {
                let raw = value("--addr")?;
                addr = raw.parse().map_err(|e| format!("--addr {raw}: {e}"))?;
            }
            "--client-id" => config.clients.push(SimClient {
                client_id: value("--client-id")?,
                client_secret: String::new(),
                redirect_uris: Vec::new(),
            }),
            "--client-secret" => {
                let secret = value("--client-secret")?;
                last_client(&mut config, "--client-secret")?.client_secret = secret;
            }
            "--redirect-uri" => {
                let uri = value("--redirect-uri")?;
                last_client(&mut config, "--redirect-uri")?
                    .redirect_uris
                    .push(uri);
            }
            "--access-token-lifetime" => {
                let raw = value("--access-token-lifetime")?;
                config.access_token_lifetime = humantime::parse_duration(&raw)
                    .map_err(|e| format!("--access-token-lifetime {raw}: {e}"))?;
            }
            "--rotate-refresh-tokens" => config.rotate_refresh_tokens = true,
            "--max-refresh-tokens" => {
                let raw = value("--max-refresh-tokens")?;
                config.max_refresh_tokens_per_grant =
                    raw.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--max-refresh-tokens {raw}: not a positive number")
                    })?;
            }
            "--issuer" => config.issuer = value("--issuer")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if config.clients.is_empty() {
        config.clients.push(SimClient::new(
            DEV_CLIENT_ID,
            DEV_CLIENT_SECRET,
            DEV_REDIRECT_URI,
        ));
    }
    for client in &config.clients {
        if client.client_secret.is_empty() {
            return Err(format!(
                "client {} has no --client-secret",
                client.client_id
            ));
        }
        if client.redirect_uris.is_empty() {
            return Err(format!("client {} has no --redirect-uri", client.client_id));
        }
    }
    Ok(Some(Options { addr, config }))
}

fn last_client<'a>(config: &'a mut SimConfig, option: &str) -> Result<&'a mut SimClient, String> {
    config
        .clients
        .last_mut()
        .ok_or_else(|| format!("{option} must follow --client-id"))
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("tokenvault-google-sim: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let clients: Vec<SimClient> = options.config.clients.clone();
    let sim = match GoogleSim::start_on(options.addr, options.config).await {
        Ok(sim) => sim,
        Err(error) => {
            eprintln!(
                "tokenvault-google-sim: cannot start on {}: {error}",
                options.addr
            );
            return ExitCode::FAILURE;
        }
    };
    println!("base_url={}", sim.base_url());
    println!("auth_uri={}", sim.auth_uri());
    println!("token_uri={}", sim.token_uri());
    println!("revoke_uri={}", sim.revoke_uri());
    println!("userinfo_uri={}", sim.userinfo_uri());
    println!("jwks_uri={}", sim.jwks_uri());
    println!("discovery_uri={}", sim.discovery_uri());
    println!("risc_configuration_uri={}", sim.risc_configuration_uri());
    println!("issuer={}", sim.issuer());
    for client in &clients {
        // The secret is the operator's own input: not echoed.
        println!("client_id={}", client.client_id);
        for uri in &client.redirect_uris {
            println!("redirect_uri={uri}");
        }
    }
    stop_signal().await;
    tracing::info!("google sim stopping");
    if tokio::time::timeout(Duration::from_secs(10), sim.shutdown())
        .await
        .is_err()
    {
        eprintln!("tokenvault-google-sim: shutdown timed out");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_after_client_id_belong_to_that_client() {
        let options = parse(args(&[
            "--addr",
            "127.0.0.1:0",
            "--client-id",
            "a",
            "--client-secret",
            "sa",
            "--redirect-uri",
            "http://x/1",
            "--redirect-uri",
            "http://x/2",
            "--client-id",
            "b",
            "--client-secret",
            "sb",
            "--redirect-uri",
            "http://y/",
            "--access-token-lifetime",
            "90s",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(options.addr.port(), 0);
        assert_eq!(options.config.clients.len(), 2);
        assert_eq!(
            options.config.clients[0].redirect_uris,
            ["http://x/1", "http://x/2"]
        );
        assert_eq!(options.config.clients[1].client_secret, "sb");
        assert_eq!(
            options.config.access_token_lifetime,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn defaults_to_the_dev_client_and_rejects_incomplete_clients() {
        let options = parse(Vec::new()).unwrap().unwrap();
        assert_eq!(options.config.clients[0].client_id, DEV_CLIENT_ID);
        assert_eq!(options.addr.to_string(), "127.0.0.1:9090");
        assert!(parse(args(&["--client-secret", "s"])).is_err());
        assert!(parse(args(&["--client-id", "a", "--client-secret", "s"])).is_err());
        assert!(parse(args(&["--bogus"])).is_err());
        assert!(parse(args(&["--help"])).unwrap().is_none());
    }
}
