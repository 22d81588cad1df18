//! The `/metrics` HTTP endpoint: a small HTTP/1.1 server on the relay's runtime, so every limit is
//! ours: a connection cap (more connections wait in the kernel's backlog, not in our memory),
//! a header timeout and an idle timeout, `/metrics` only (404 elsewhere, 405 for methods other
//! than GET and HEAD), optional bearer-token or basic authentication, and a backoff on accept
//! errors so descriptor exhaustion never makes the loop spin or flood the log. With a certificate
//! (`metrics.tls_cert_file`), it serves HTTPS only, through the same rustls acceptor as the relays'
//! TLS listeners ([`crate::tls::TlsAcceptor`], reloaded on SIGHUP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::limits::LogThrottle;
use crate::tls::{Stream, TlsAcceptor};

/// The whole request head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A kept-alive connection with no new request within this is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing a response may take at most this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head larger than this is refused with 431.
const MAX_HEAD: usize = 8 * 1024;
/// Pause after a failed accept (EMFILE and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Credentials a scrape must present (`metrics_auth`).
#[derive(Clone, PartialEq, Eq)]
pub enum MetricsAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic base64(user:password)`.
    Basic { user: String, password: String },
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            MetricsAuth::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
        }
    }
}

impl MetricsAuth {
    /// Parses `bearer:TOKEN` or `basic:USER:PASSWORD`.
    pub fn parse(text: &str) -> Option<MetricsAuth> {
        if let Some(token) = text.strip_prefix("bearer:") {
            return (!token.is_empty()).then(|| MetricsAuth::Bearer(token.to_string()));
        }
        let (user, password) = text.strip_prefix("basic:")?.split_once(':')?;
        (!user.is_empty()).then(|| MetricsAuth::Basic { user: user.to_string(), password: password.to_string() })
    }

    fn accepts(&self, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        let (scheme, value) = header.trim().split_once(' ').unwrap_or((header, ""));
        match self {
            MetricsAuth::Bearer(token) => {
                scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(value.trim().as_bytes(), token.as_bytes())
            }
            MetricsAuth::Basic { user, password } => {
                let expected = base64_encode(format!("{user}:{password}").as_bytes());
                scheme.eq_ignore_ascii_case("basic") && constant_time_eq(value.trim().as_bytes(), expected.as_bytes())
            }
        }
    }
}

/// Compares without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Accepts that failed on the metrics listener (EMFILE and the like), for INFO
/// `metrics_accept_errors` and `redis_relay_metrics_accept_errors_total`.
static ACCEPT_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn accept_errors() -> u64 {
    ACCEPT_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Serves `/metrics` on `listener` for the life of the process; over TLS when `tls` is given (the
/// handshake must finish within [`HEADER_TIMEOUT`], under the connection cap like a request).
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    auth: Option<MetricsAuth>,
    tls: Option<Arc<TlsAcceptor>>,
    max_connections: usize,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let auth = Arc::new(auth);
    let mut accept_errors = LogThrottle::new(Duration::from_secs(1));
    loop {
        // Taking the permit first leaves excess connections in the kernel's backlog.
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (handle, auth, tls) = (handle.clone(), auth.clone(), tls.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream = match tls {
                        None => Stream::Plain(stream),
                        Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, "metrics connection: TLS handshake failed: {error}");
                                return;
                            }
                            Err(_) => return,
                        },
                    };
                    if let Err(error) = serve_connection(stream, &handle, auth.as_ref().as_ref()).await {
                        tracing::debug!(%peer, "metrics connection ended: {error}");
                    }
                });
            }
            Err(error) => {
                ACCEPT_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(suppressed) = accept_errors.ready() {
                    tracing::warn!(suppressed, "metrics endpoint: accept failed: {error}");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Binds the endpoint's address (errors surface at start, not in a task).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    keep_alive: bool,
    has_body: bool,
}

async fn serve_connection(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    handle: &PrometheusHandle,
    auth: Option<&MetricsAuth>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        let wait = if first { HEADER_TIMEOUT } else { IDLE_TIMEOUT };
        first = false;
        // The first byte within the idle timeout, the rest of the head within the header timeout.
        if buf.is_empty() && !read_some(&mut stream, &mut buf, wait).await? {
            return Ok(());
        }
        let head_deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
        let head_len = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > MAX_HEAD {
                return respond(&mut stream, 431, "Request Header Fields Too Large", "", b"", false).await;
            }
            let left = head_deadline.saturating_duration_since(tokio::time::Instant::now());
            if !read_some(&mut stream, &mut buf, left).await? {
                return Ok(());
            }
        };
        let Some(request) = parse_head(&buf[..head_len]) else {
            return respond(&mut stream, 400, "Bad Request", "", b"", false).await;
        };
        buf.drain(..head_len);
        // No request of ours has a body; one that comes with it ends the connection after the answer.
        let keep_alive = request.keep_alive && !request.has_body;
        let path = request.path.split('?').next().unwrap_or("");
        if path != "/metrics" {
            respond(&mut stream, 404, "Not Found", "", b"not found\n", keep_alive).await?;
        } else if request.method != "GET" && request.method != "HEAD" {
            respond(
                &mut stream,
                405,
                "Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                b"method not allowed\n",
                keep_alive,
            )
            .await?;
        } else if auth.is_some_and(|auth| !auth.accepts(request.authorization.as_deref())) {
            let challenge = match auth {
                Some(MetricsAuth::Basic { .. }) => "WWW-Authenticate: Basic realm=\"redis-relay\"\r\n",
                _ => "WWW-Authenticate: Bearer\r\n",
            };
            respond(&mut stream, 401, "Unauthorized", challenge, b"unauthorized\n", keep_alive).await?;
        } else {
            let body = handle.render();
            let body = if request.method == "HEAD" { Vec::new() } else { body.into_bytes() };
            respond(
                &mut stream,
                200,
                "OK",
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
                &body,
                keep_alive,
            )
            .await?;
        }
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Reads more bytes within `wait`; false on end of stream or timeout.
async fn read_some(stream: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, wait: Duration) -> std::io::Result<bool> {
    let mut chunk = [0u8; 2048];
    match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
        Err(_) | Ok(Ok(0)) => Ok(false),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Ok(Err(error)) => Err(error),
    }
}

fn parse_head(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        authorization: None,
        keep_alive: version == "HTTP/1.1",
        has_body: false,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "authorization" => request.authorization = Some(value.to_string()),
            "connection" if value.eq_ignore_ascii_case("close") => request.keep_alive = false,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => request.keep_alive = true,
            "content-length" => request.has_body |= value != "0",
            "transfer-encoding" => request.has_body = true,
            _ => {}
        }
    }
    Some(request)
}

async fn respond(
    stream: &mut (impl AsyncWrite + Unpin),
    status: u16,
    reason: &str,
    extra_headers: &str,
    body: &[u8],
    keep_alive: bool,
) -> std::io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: {connection}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_parses_and_checks() {
        let basic = MetricsAuth::parse("basic:prom:pw").unwrap();
        assert!(basic.accepts(Some(&format!("Basic {}", base64_encode(b"prom:pw")))));
        assert!(!basic.accepts(Some("Basic cHJvbTpwdw"))); // truncated
        assert!(!basic.accepts(None));
        let bearer = MetricsAuth::parse("bearer:t0k").unwrap();
        assert!(bearer.accepts(Some("Bearer t0k")) && !bearer.accepts(Some("Bearer t0")));
        assert_eq!(MetricsAuth::parse("token"), None);
        assert_eq!(base64_encode(b"prom:pw"), "cHJvbTpwdw==");
    }
}
