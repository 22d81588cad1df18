//! Sending the log's checked disk records to a plain-TCP replica with `sendfile`: the kernel copies
//! them from the page cache to the socket, never through the relay's memory.
//!
//! The `sendfile` calls block on the file, so they run on the blocking pool
//! ([`ReplicationLog::send_file`]), on a duplicate of the socket's descriptor; the runtime only waits
//! until the socket has room. TLS replicas cannot take a file (their bytes are encrypted in user
//! space) and keep the copy path ([`WriterKind::tcp`] is `None` for them).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::log::{FileRun, ReplicationLog, SendStop};

/// The write half of a replica's connection, and whether it is a plain TCP socket.
pub(super) trait WriterKind: AsyncWrite + Unpin {
    /// The plain TCP socket under this writer, when there is one.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl WriterKind for tokio::net::tcp::WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncRead + AsyncWrite> WriterKind for tokio::io::WriteHalf<T> {}

/// Why sending a run ended the stream (the replica session maps each to its own disconnect reason).
#[derive(Debug)]
pub(super) enum SendError {
    /// No room in the socket for longer than repl-timeout.
    Timeout,
    /// Writing to the socket failed.
    Socket(io::Error),
    /// Reading the log segment failed.
    File(io::Error),
}

/// A replica socket that `sendfile` writes to from the blocking pool.
pub(super) struct FileSender {
    /// A duplicate of the socket's descriptor (the same open socket, non-blocking), owned so that a
    /// blocking-pool task can hold it.
    socket: Arc<OwnedFd>,
}

impl FileSender {
    pub(super) fn new(tcp: &TcpStream) -> io::Result<FileSender> {
        Ok(FileSender { socket: Arc::new(tcp.as_fd().try_clone_to_owned()?) })
    }

    /// Sends all of `run`, waiting at most `limit` each time for the socket to have room. Returns
    /// the bytes sent: fewer than the run's when its file went away meanwhile (the next read of the
    /// log tells whether the records were trimmed or their history replaced).
    pub(super) async fn send(
        &self,
        log: &ReplicationLog,
        tcp: &TcpStream,
        run: FileRun,
        limit: Duration,
    ) -> Result<u64, SendError> {
        let total = run.bytes();
        let run = Arc::new(run);
        let mut sent = 0;
        while sent < total {
            timeout(limit, wait_for_room(tcp)).await.map_err(|_| SendError::Timeout)?.map_err(SendError::Socket)?;
            let (n, stop) = log.send_file(self.socket.clone(), run.clone(), sent).await;
            sent += n;
            match stop {
                None | Some(SendStop::WouldBlock) => {}
                Some(SendStop::Gone) => break,
                Some(SendStop::Socket(e)) => return Err(SendError::Socket(e)),
                Some(SendStop::File(e)) => return Err(SendError::File(e)),
            }
        }
        Ok(sent)
    }
}

/// Waits until the socket has room for more bytes. The `sendfile` calls happen off the runtime, so
/// the runtime's record of the socket's readiness is kept true here: a socket found full clears it
/// (inside `try_io`, which never loses a wake-up that came meanwhile), and the wait goes on.
async fn wait_for_room(tcp: &TcpStream) -> io::Result<()> {
    loop {
        tcp.writable().await?;
        match tcp.try_io(Interest::WRITABLE, || has_room(tcp)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether the socket takes more bytes now (`poll` with no wait): an error or a hang-up counts as
/// room, so that the next write reports it.
fn has_room(tcp: &TcpStream) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(tcp, PollFlags::OUT)];
    rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).map_err(io::Error::from)?;
    if fds[0].revents().intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
        Ok(())
    } else {
        Err(io::ErrorKind::WouldBlock.into())
    }
}
