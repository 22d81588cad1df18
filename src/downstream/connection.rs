//! A connection from a client or a replica: command framing in, replies out.

use bytes::{Buf, Bytes, BytesMut};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{parse_command_within, ClientCommand, CommandLimits, ProtocolError, Reply};
use crate::tls::Stream;

/// Redis's default `client-query-buffer-limit`: one client cannot make the process buffer more.
const MAX_QUERY_BUFFER: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("connection closed")]
    Closed,
}

pub struct ClientConnection {
    pub stream: Stream,
    /// Bytes read and not yet parsed into commands.
    pub buf: BytesMut,
    out: BytesMut,
}

impl ClientConnection {
    pub fn new(stream: Stream) -> ClientConnection {
        ClientConnection { stream, buf: BytesMut::with_capacity(1024), out: BytesMut::new() }
    }

    /// Returns the next command within `limits`, reading as needed. Cancel-safe.
    pub async fn next_command(&mut self, limits: CommandLimits) -> Result<ClientCommand, ClientError> {
        loop {
            if let Some(command) = parse_command_within(&mut self.buf, limits)? {
                return Ok(command);
            }
            if self.buf.len() > MAX_QUERY_BUFFER {
                return Err(ClientError::Protocol(ProtocolError::TooLong {
                    what: "query buffer",
                    len: self.buf.len(),
                    limit: MAX_QUERY_BUFFER,
                }));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Whether a complete command is already buffered (pipelining: reply in one write).
    pub fn has_buffered_input(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Reply bytes queued and not yet written.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    pub fn queue(&mut self, reply: &Reply) {
        reply.encode(&mut self.out);
    }

    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            // Hands TLS records to the socket; nothing to do on plain TCP.
            self.stream.flush().await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Writes every slice, in order, with vectored writes: the stream goes out as the log's own shared
/// buffers, never copied per replica.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<usize> {
    let mut written = 0;
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().take(64).map(|b| IoSlice::new(b)).collect();
        let n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        written += n;
        let mut left = n;
        while left > 0 {
            let part = &mut parts[first];
            if part.len() <= left {
                left -= part.len();
                first += 1;
            } else {
                part.advance(left);
                left = 0;
            }
        }
    }
    parts.clear();
    // A TLS writer may hold the last record until flushed; a TCP one holds nothing.
    writer.flush().await?;
    Ok(written)
}

/// Reads into `buf`; `Closed` at end of stream.
pub async fn read_more<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut BytesMut) -> Result<usize, ClientError> {
    match reader.read_buf(buf).await? {
        0 => Err(ClientError::Closed),
        n => Ok(n),
    }
}
