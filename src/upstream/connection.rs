//! The socket to the master: buffered reads with the replication timeout, reply lines, raw writes.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::LinkError;
use crate::protocol::MAX_INLINE;
use crate::tls::{Stream, TlsConnector};

const READ_CHUNK: usize = 64 * 1024;

pub struct MasterConnection {
    stream: Stream,
    /// Bytes read and not consumed yet. After the RDB this holds the unapplied stream tail.
    pub buf: BytesMut,
    io_timeout: Duration,
    pub last_io: Instant,
    pub total_read: u64,
}

impl MasterConnection {
    /// Connects to `addr` (`host:port`), with a TLS handshake when `tls` is given.
    pub async fn connect(
        addr: &str,
        io_timeout: Duration,
        tls: Option<&TlsConnector>,
    ) -> Result<MasterConnection, LinkError> {
        let tcp = timeout(io_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Timeout("connecting to the master"))??;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let host = addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr);
                timeout(io_timeout, tls.connect(host, tcp))
                    .await
                    .map_err(|_| LinkError::Timeout("in the TLS handshake with the master"))?
                    .map_err(|e| LinkError::Tls(e.to_string()))?
            }
        };
        Ok(MasterConnection {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK * 2),
            io_timeout,
            last_io: Instant::now(),
            total_read: 0,
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        // The flush hands TLS records to the socket; on plain TCP it does nothing.
        timeout(self.io_timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| LinkError::Timeout("writing to the master"))??;
        Ok(())
    }

    /// Reads more bytes into the buffer; waits at most the replication timeout since the last byte.
    pub async fn fill(&mut self, during: &'static str) -> Result<usize, LinkError> {
        let deadline = self.last_io + self.io_timeout;
        self.fill_until(deadline, during).await
    }

    /// Like [`Self::fill`] with an explicit deadline. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn fill_until(&mut self, deadline: Instant, during: &'static str) -> Result<usize, LinkError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
            .await
            .map_err(|_| LinkError::Timeout(during))??;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        self.last_io = Instant::now();
        self.total_read += n as u64;
        Ok(n)
    }

    /// Reads one reply line, without its line ending. An empty string is a newline keepalive.
    pub async fn read_line(&mut self, during: &'static str) -> Result<String, LinkError> {
        loop {
            if let Some(newline) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(newline + 1);
                let text = String::from_utf8_lossy(&line[..newline]);
                return Ok(text.strip_suffix('\r').unwrap_or(&text).to_string());
            }
            if self.buf.len() > MAX_INLINE {
                return Err(LinkError::Protocol(crate::protocol::ProtocolError::LineTooLong));
            }
            self.fill(during).await?;
        }
    }

    /// Reads reply lines until one that is not a newline keepalive.
    pub async fn read_reply(&mut self, during: &'static str) -> Result<String, LinkError> {
        loop {
            let line = self.read_line(during).await?;
            if !line.is_empty() {
                return Ok(line);
            }
        }
    }
}
