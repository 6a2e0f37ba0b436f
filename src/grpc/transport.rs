//! The gRPC listener's connections: plain TCP on loopback, or TLS with
//! client-certificate verification (mTLS) through our own rustls acceptor.
//!
//! Owning the acceptor (instead of tonic's built-in TLS) buys two things: the
//! caller's identity — the verified leaf certificate's URI SAN (`spiffe://…`),
//! else its first DNS SAN — is read once per connection and handed to every
//! request as a [`PeerInfo`] extension; and handshakes refused for a
//! certificate (unknown CA, expired, …) are audited, through the
//! [`RefusalAggregator`] that bounds what anonymous peers can write.
//! Handshakes run concurrently, each with a timeout, so a slow client cannot
//! stall the accept loop.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::refusals::{CertificateProblem, Reason, RefusalAggregator};
use crate::audit::AuditLog;
use crate::config::Config;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the transport knows about a caller's connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate's identity, when one was presented.
    pub certificate: Option<CertIdentity>,
}

/// The identity a verified client certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertIdentity {
    /// The leaf's URI SAN, else its DNS SAN.
    Named(String),
    /// A verified certificate without a URI or DNS SAN: not an identity.
    NoSan,
}

impl PeerInfo {
    /// Whether the peer is on this machine. An IPv4 peer of a dual-stack
    /// (`[::]`) listener arrives as an IPv4-mapped IPv6 address
    /// (`::ffff:127.0.0.1`), which is loopback too.
    pub fn is_loopback(&self) -> bool {
        self.remote
            .is_some_and(|a| a.ip().to_canonical().is_loopback())
    }
}

/// One accepted connection, plain or TLS.
pub enum Conn {
    /// Plain TCP (loopback deployments without `[tls]`).
    Plain(TcpStream, PeerInfo),
    /// TLS, possibly with a verified client certificate.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// Builds the rustls server configuration from `[tls]`: the server's
/// certificate and key, and — with `client_ca_file` — client-certificate
/// verification against that CA bundle. Client certificates are required
/// unless API keys are configured (then a caller without one must present an
/// API key from loopback).
pub fn server_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let Some((certs, key)) = server_identity(config)? else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &config.tls.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("tls.client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("tls.client_ca_file: {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.auth.api_keys.is_empty() {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .map_err(|e| format!("tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: the certificate and key do not form a usable identity: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// The rustls configuration of the HTTP port beyond loopback: the same
/// server certificate and key as gRPC, HTTP/1.1, and no client certificate
/// (Google's redirects come from browsers and its RISC pushes present none).
pub fn http_server_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let Some((certs, key)) = server_identity(config)? else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: the certificate and key do not form a usable identity: {e}"))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// The server's certificate chain and key from `[tls]`, when configured.
type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn server_identity(config: &Config) -> Result<Option<ServerIdentity>, String> {
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    let certs = read_certs("tls.cert_file", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "tls.key_file: cannot read a PEM private key from {}: {e}",
            key.display()
        )
    })?;
    Ok(Some((certs, key)))
}

fn read_certs(name: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{name}: cannot read PEM certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{name}: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The identity in a leaf certificate: its first URI SAN, else its first DNS SAN.
pub fn cert_identity(leaf: &[u8]) -> CertIdentity {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return CertIdentity::NoSan;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return CertIdentity::NoSan;
    };
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let dns = names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(*d),
        _ => None,
    });
    match uri.or(dns) {
        Some(name) if !name.is_empty() => CertIdentity::Named(name.to_owned()),
        _ => CertIdentity::NoSan,
    }
}

/// Accepts connections until `stop`, handshaking TLS when configured;
/// certificate refusals are counted and audited by `refusals`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    audit: AuditLog,
    refusals: Arc<RefusalAggregator>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::vault::stopped(&mut stop) => break,
            };
            let _ = stream.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                let peer = PeerInfo {
                    remote: Some(remote),
                    tls: false,
                    certificate: None,
                };
                if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                    break;
                }
                continue;
            };
            let tx = tx.clone();
            let audit = audit.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let certificate = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|leaf| cert_identity(leaf.as_ref()));
                        let peer = PeerInfo {
                            remote: Some(remote),
                            tls: true,
                            certificate,
                        };
                        let _ = tx.send(Ok(Conn::Tls(Box::new(tls), peer))).await;
                    }
                    Ok(Err(e)) => refused(&audit, &refusals, remote, &e).await,
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Counts and audits a handshake refused because of the client's
/// certificate (the source's first refusal of a window logged at warn, the
/// rest at debug, so that logs stay bounded too); other handshake failures
/// (port scans, plain HTTP) are only logged.
async fn refused(
    audit: &AuditLog,
    refusals: &RefusalAggregator,
    remote: SocketAddr,
    e: &io::Error,
) {
    let cert_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some((
                Reason::Certificate(CertificateProblem::of(c)),
                format!("{c:?}"),
            )),
            rustls::Error::NoCertificatesPresented => Some((
                Reason::NoClientCertificate,
                "no certificate presented".to_owned(),
            )),
            _ => None,
        });
    let Some((reason, why)) = cert_error else {
        tracing::debug!(%remote, error = %e, "TLS handshake failed");
        return;
    };
    let why = format!("client certificate refused: {why}");
    if refusals
        .refuse_handshake(audit, remote, reason, why.clone())
        .await
    {
        tracing::warn!(%remote, reason = %why, "client certificate refused");
    } else {
        tracing::debug!(%remote, reason = %why, "client certificate refused again");
    }
}
