//! A connection from a client or a replica: command framing in, replies out.

use bytes::{Buf, Bytes, BytesMut};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::memory::{ClientMemory, DEFAULT_QUERY_BUFFER_LIMIT};
use crate::protocol::{parse_command_within, ClientCommand, CommandLimits, ProtocolError, Reply};
use crate::tls::Stream;

/// An empty query buffer or a written output buffer larger than this is given back (a burst must
/// not keep its peak allocated, as redis-server's `clientsCronResizeQueryBuffer`).
const SHRINK_ABOVE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("connection closed")]
    Closed,
    /// redis-server closes such a client without a reply.
    #[error("query buffer of {len} bytes (MULTI queue included) over client-query-buffer-limit {limit}")]
    QueryBufferLimit { len: usize, limit: usize },
}

pub struct ClientConnection {
    pub stream: Stream,
    /// Bytes read and not yet parsed into commands.
    pub buf: BytesMut,
    out: BytesMut,
    /// This client's account in the relay's `maxmemory-clients` budget.
    memory: Option<ClientMemory>,
    /// Bytes of commands queued since `MULTI`: they count as query input.
    pub queued_input: usize,
    query_buffer_limit: usize,
}

impl ClientConnection {
    pub fn new(stream: Stream) -> ClientConnection {
        ClientConnection {
            stream,
            buf: BytesMut::with_capacity(1024),
            out: BytesMut::new(),
            memory: None,
            queued_input: 0,
            query_buffer_limit: DEFAULT_QUERY_BUFFER_LIMIT as usize,
        }
    }

    /// Accounts this connection's buffers in `memory`, whose budget also sets the query-buffer limit.
    pub fn with_memory(mut self, memory: ClientMemory) -> ClientConnection {
        self.query_buffer_limit = usize::try_from(memory.budget().query_buffer_limit).unwrap_or(usize::MAX);
        self.memory = Some(memory);
        self
    }

    /// A replica's buffers are not client memory (they are exempt from `maxmemory-clients`).
    pub fn set_memory_exempt(&mut self, exempt: bool) {
        if let Some(memory) = self.memory.as_mut() {
            memory.set_exempt(exempt);
        }
        self.report_memory();
    }

    /// Tells the budget what this connection holds now: query buffer and MULTI queue as input,
    /// unwritten replies as output.
    pub fn report_memory(&mut self) {
        if let Some(memory) = self.memory.as_mut() {
            memory.report(self.buf.capacity() + self.queued_input, self.out.capacity());
        }
    }

    /// Returns the next command within `limits`, reading as needed. Cancel-safe. The query buffer
    /// and the MULTI queue together stay within `client-query-buffer-limit`.
    pub async fn next_command(&mut self, limits: CommandLimits) -> Result<ClientCommand, ClientError> {
        loop {
            if let Some(command) = parse_command_within(&mut self.buf, limits)? {
                return Ok(command);
            }
            let held = self.buf.len() + self.queued_input;
            if held > self.query_buffer_limit {
                if let Some(memory) = &self.memory {
                    memory.budget().count_query_buffer_disconnection();
                }
                return Err(ClientError::QueryBufferLimit { len: held, limit: self.query_buffer_limit });
            }
            if let Some(memory) = &self.memory {
                memory.wait_for_evictions().await;
            }
            if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                self.buf = BytesMut::with_capacity(1024);
            }
            let read = self.stream.read_buf(&mut self.buf).await?;
            self.report_memory();
            if read == 0 {
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
            // A client that does not read is evicted at maxmemory-clients while this write waits.
            self.report_memory();
            self.stream.write_all(&self.out).await?;
            // Hands TLS records to the socket; nothing to do on plain TCP.
            self.stream.flush().await?;
            if self.out.capacity() > SHRINK_ABOVE {
                self.out = BytesMut::new();
            } else {
                self.out.clear();
            }
            self.report_memory();
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
