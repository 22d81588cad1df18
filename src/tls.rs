//! TLS on both sides of a relay, with rustls and its ring provider: the settings (named as
//! redis.conf names them), the client configuration for the link to the master, the server
//! configuration for the TLS listener, and [`Stream`], the one socket type both sides use, plain
//! TCP or TLS.
//!
//! Certificates are read from PEM files when a relay starts and again when the binary reloads on
//! SIGHUP ([`TlsAcceptor::reload`]), so renewed files take effect for new connections without a
//! restart; an unreadable file keeps the previous certificates and is reported.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// `tls-auth-clients`: whether clients of the TLS listener must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A certificate signed by the CA is required (redis-server's default).
    Yes,
    No,
    /// A certificate is checked when one is given.
    Optional,
}

impl ClientAuth {
    pub fn parse(text: &str) -> Option<ClientAuth> {
        match text.to_ascii_lowercase().as_str() {
            "yes" => Some(ClientAuth::Yes),
            "no" => Some(ClientAuth::No),
            "optional" => Some(ClientAuth::Optional),
            _ => None,
        }
    }
}

/// TLS to the master (`--upstream-tls yes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA bundle the master's certificate must chain to; without it, the system's roots are not
    /// consulted (there are none in a minimal image), so it is required.
    pub ca_cert_file: PathBuf,
    /// Client certificate and key, for masters with `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the master's certificate must carry; defaults to the upstream host.
    pub server_name: Option<String>,
}

/// The TLS listener below the relay (`--tls-listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownstreamTls {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA that client certificates must chain to (needed unless `auth_clients` is `No`).
    pub ca_cert_file: Option<PathBuf>,
    pub auth_clients: ClientAuth,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certificates.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

fn read_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots.add(certificate).map_err(|e| file_error(path, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the link to the master needs to start TLS: the configuration (reloadable) and the name to
/// verify.
pub struct TlsConnector {
    settings: UpstreamTls,
    connector: RwLock<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// Reads the files of `settings`. Runs file I/O: call it off the runtime's workers.
    pub fn new(settings: &UpstreamTls) -> Result<TlsConnector, TlsError> {
        if let Some(name) = &settings.server_name {
            ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name.clone()))?;
        }
        let connector = RwLock::new(client_config(settings)?);
        Ok(TlsConnector { settings: settings.clone(), connector })
    }

    /// Reads the certificate files again; the next connection uses them. Runs file I/O.
    pub fn reload(&self) -> Result<(), TlsError> {
        let connector = client_config(&self.settings)?;
        *self.connector.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = connector;
        Ok(())
    }

    /// The TLS handshake over `tcp`, verifying the configured name or else `host` (the host the
    /// link connects to, which `REPLICAOF` changes).
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> std::io::Result<Stream> {
        let name = self.settings.server_name.as_deref().unwrap_or(host);
        // An IPv6 host comes bracketed in `[::1]:port` addresses.
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, TlsError::ServerName(name.into())))?;
        let connector = self.connector.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let stream = connector.connect(server_name, tcp).await?;
        Ok(Stream::Client(Box::new(stream)))
    }
}

fn client_config(settings: &UpstreamTls) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let roots = read_roots(&settings.ca_cert_file)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(read_certificates(cert)?, read_key(key)?).map_err(|e| file_error(key, e))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsError::Config("a client certificate needs both a cert file and a key file".into())),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The TLS listener's handshake, with certificates that can be reloaded.
pub struct TlsAcceptor {
    settings: DownstreamTls,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsAcceptor {
    pub fn new(settings: &DownstreamTls) -> Result<TlsAcceptor, TlsError> {
        let config = server_config(settings)?;
        Ok(TlsAcceptor { settings: settings.clone(), config: RwLock::new(config) })
    }

    /// Reads the certificate files again; new connections use them, open ones keep theirs.
    /// Runs file I/O: call it off the runtime's workers.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        *self.config.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        Ok(())
    }

    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let config = self.config.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        Ok(Stream::Server(Box::new(stream)))
    }
}

fn server_config(settings: &DownstreamTls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (settings.auth_clients, &settings.ca_cert_file) {
        (ClientAuth::No, _) => builder.with_no_client_auth(),
        (auth, Some(ca)) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider());
            let verifier = if auth == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(e.to_string()))?)
        }
        (_, None) => {
            return Err(TlsError::Config("tls-auth-clients yes or optional needs tls-ca-cert-file".into()));
        }
    };
    let config = builder
        .with_single_cert(read_certificates(&settings.cert_file)?, read_key(&settings.key_file)?)
        .map_err(|e| file_error(&settings.key_file, e))?;
    Ok(Arc::new(config))
}

/// A connection of either side: plain TCP, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Client(tls) => tls.get_ref().0,
            Stream::Server(tls) => tls.get_ref().0,
        }
    }

    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp)
    }
}

macro_rules! each {
    ($self:expr, $inner:ident => $body:expr) => {
        match $self.get_mut() {
            Stream::Plain($inner) => {
                let $inner = Pin::new($inner);
                $body
            }
            Stream::Client($inner) => {
                let $inner = Pin::new($inner.as_mut());
                $body
            }
            Stream::Server($inner) => {
                let $inner = Pin::new($inner.as_mut());
                $body
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        each!(self, inner => inner.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        each!(self, inner => inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, inner => inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Client(tls) => tls.is_write_vectored(),
            Stream::Server(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, inner => inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, inner => inner.poll_shutdown(cx))
    }
}
