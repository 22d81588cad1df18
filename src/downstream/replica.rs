//! Serving one replica: the PSYNC decision, a full sync from the snapshot cache, then the stream as a
//! cursor into the log.
//!
//! The replica never gets a byte the master did not send: no PINGs, no SELECTs, and newline keepalives
//! only before the payload. After an EOF-marked payload nothing follows until the replica's first ACK.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing::Instrument;

use super::connection::{read_more, write_all_vectored};
use super::guard::Ask;
use super::zero_copy::{FileSender, SendError, WriterKind};
use super::{ClientError, ReplicaEntry, ReplicaRow, ReplicaState, Session};
use crate::context::{RelayContext, ServedStats};
use crate::log::{LogSummary, ReadError, ToSend};
use crate::offset::Position;
use crate::protocol::{parse_command, string2ll, ClientCommand, CommandLimits, Reply};
use crate::snapshot::SnapshotMeta;
use crate::tls::Stream;
use crate::upstream::fetch::snapshot_is_current;
use crate::util::{random_hex_id, TransferProgress};

/// How a replica session ended.
pub enum Outcome {
    /// The sync was refused with an error reply; the connection stays a normal client.
    Refused,
    /// The connection is finished (served, or dropped).
    Done,
}

/// Most bytes handed to one vectored write.
const WRITE_BATCH: usize = 1 << 20;
const RDB_CHUNK: usize = 256 * 1024;
const KEEPALIVE_PERIOD: Duration = Duration::from_secs(1);
/// How long a replica ahead of the log may wait for it.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum Disconnect {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("protocol error: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("write stalled for longer than repl-timeout")]
    WriteTimeout,
    #[error("no ACK for longer than repl-timeout")]
    AckTimeout,
    #[error("replica fell off the start of the log (position {0}); it will full-sync")]
    FellOff(Position),
    #[error("the log's history changed (new full sync or replication id upstream)")]
    HistoryChanged,
    #[error("replica sent {0:?} on the replication link")]
    UnexpectedCommand(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    DiskRead(String),
    #[error("shutting down")]
    Shutdown,
}

pub async fn serve(
    session: &mut Session,
    command: &ClientCommand,
    shutdown: watch::Receiver<bool>,
) -> Result<Outcome, ClientError> {
    let context = session.context.clone();
    let is_psync = command.name() == "PSYNC";
    if is_psync && command.args.len() > 3 {
        return refuse(session, "ERR PSYNC FAILOVER is not supported: redis-relay cannot be promoted").await;
    }
    if is_psync && command.args.len() != 3 {
        return refuse(session, "ERR wrong number of arguments for 'psync' command").await;
    }
    let summary = context.log.summary();
    let Some(ids) = summary.ids.clone() else {
        return refuse(session, "NOMASTERLINK Can't SYNC while not connected with my master").await;
    };
    let peer_ip = session.peer.ip().to_string();
    let ip = session.handshake.ip_address.clone().unwrap_or(peer_ip);
    let port = session.handshake.listening_port;
    // A replica is named as INFO lists it, by its announced address and listening port; the
    // connection's own (ephemeral) source address is the separate `addr`.
    let span = tracing::info_span!("replica", replica = %format_args!("{ip}:{port}"), addr = %session.peer);
    replicate(session, command, is_psync, ip, port, summary, ids, shutdown).instrument(span).await
}

/// The replica's sync and stream, inside its span.
#[allow(clippy::too_many_arguments)]
async fn replicate(
    session: &mut Session,
    command: &ClientCommand,
    is_psync: bool,
    ip: String,
    port: i32,
    summary: LogSummary,
    ids: crate::log::ReplIds,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Outcome, ClientError> {
    let context = session.context.clone();
    if is_psync {
        let requested_id = command.arg_str(1);
        let Some(offset) = string2ll(&command.args[2]) else {
            return refuse(session, "ERR value is not an integer or out of range").await;
        };
        let summary = wait_if_ahead(&context, &requested_id, offset, summary).await;
        let continue_from = Position::from_psync_offset(offset)
            .filter(|&position| !session.handshake.rdb_only && summary.can_continue_from(&requested_id, position));
        if let Some(position) = continue_from {
            ServedStats::add(&context.stats.sync_partial_ok, 1);
            let line = if session.handshake.capa_psync2 {
                format!("+CONTINUE {}\r\n", ids.replid)
            } else {
                "+CONTINUE\r\n".to_string()
            };
            session.conn.queue_raw(line.as_bytes());
            session.conn.flush().await?;
            tracing::info!(position = position.get(), "partial resynchronization accepted");
            let row = context.replicas.register(ReplicaEntry {
                ip,
                port,
                state: ReplicaState::Online,
                ack_offset: position,
                sent: ReplicaEntry::sent_from(position),
                ack_time: Instant::now(),
                acked: false,
                tls: session.conn.stream.is_tls(),
            });
            let result = stream(session, &row, summary.epoch, position, false, &mut shutdown).await;
            log_drop(result);
            return Ok(Outcome::Done);
        }
        if requested_id != "?" {
            ServedStats::add(&context.stats.sync_partial_err, 1);
            tracing::info!(requested_id, offset, "partial resynchronization refused");
        }
    }
    // The RDB version guard, against the snapshot a full sync would send now (checked again in
    // `full_sync` if the one it sends has another version).
    let guard_key = (port != 0).then(|| format!("{ip}:{port}"));
    let ask = match (is_psync && !session.handshake.rdb_only, command.arg_str(1) == "?") {
        (false, _) => Ask::Untracked,
        (true, true) => Ask::Fresh,
        (true, false) => Ask::OwnHistory,
    };
    let checked_version = context.snapshots.current().map(|s| s.rdb_version);
    if let Some(rdb_version) = checked_version {
        let version = session.handshake.version.as_ref();
        if let Err(message) =
            context.sync_guard.check(guard_key.as_deref(), version, rdb_version, ask, std::time::Instant::now())
        {
            return refuse(session, &message).await;
        }
    }
    ServedStats::add(&context.stats.sync_full, 1);
    let row = context.replicas.register(ReplicaEntry {
        ip,
        port,
        state: ReplicaState::WaitBgsave,
        ack_offset: Position::ZERO,
        sent: ReplicaEntry::sent_from(Position::ZERO),
        ack_time: Instant::now(),
        acked: false,
        tls: session.conn.stream.is_tls(),
    });
    let guard = GuardCheck { key: guard_key.as_deref(), ask, checked_version };
    let result = full_sync(session, &row, is_psync, guard, &mut shutdown).await;
    // A transfer that began and ended without an ACK: the replica could not load it, or the link
    // broke. The guard counts it towards a failure loop if the replica asks again at once.
    if let (true, Some(key), Some(entry)) = (ask != Ask::Untracked, &guard_key, row.entry()) {
        if entry.state != ReplicaState::WaitBgsave {
            context.sync_guard.finished(key, entry.acked, std::time::Instant::now());
        }
    }
    log_drop(result);
    Ok(Outcome::Done)
}

/// A replica of this history that is ahead of the log (the relay restarted and lost an unsynced tail,
/// or is still catching up) is given a few seconds for the log to reach it, rather than a full sync.
async fn wait_if_ahead(context: &RelayContext, replid: &str, offset: i64, summary: LogSummary) -> LogSummary {
    let same_history = summary.ids.as_ref().is_some_and(|ids| ids.replid.eq_ignore_ascii_case(replid));
    let Some(target) = Position::from_psync_offset(offset).filter(|&target| same_history && target > summary.end)
    else {
        return summary;
    };
    let mut tip = context.log.subscribe();
    let reached = tokio::time::timeout(CATCH_UP_WAIT, tip.wait_for(|t| t.end >= target)).await;
    if reached.is_ok() {
        tracing::info!(target = target.get(), "a replica ahead of the log waited for it to catch up");
    }
    context.log.summary()
}

/// `ip:listening-port`, as INFO and the metrics name the replica.
fn replica_name(session: &Session) -> String {
    let ip = session.handshake.ip_address.clone().unwrap_or_else(|| session.peer.ip().to_string());
    format!("{ip}:{}", session.handshake.listening_port)
}

async fn refuse(session: &mut Session, message: &str) -> Result<Outcome, ClientError> {
    session.conn.queue(&Reply::error(message));
    session.conn.flush().await?;
    Ok(Outcome::Refused)
}

fn log_drop(result: Result<(), Disconnect>) {
    match result {
        Ok(()) | Err(Disconnect::Shutdown) | Err(Disconnect::Client(ClientError::Closed)) => {
            tracing::info!("replica connection closed")
        }
        // The log failed this replica (a bad disk, a record that failed its check): the operator's problem.
        Err(reason @ (Disconnect::Corrupt(_) | Disconnect::DiskRead(_))) => {
            tracing::error!("disconnecting replica: {reason}")
        }
        Err(reason) => tracing::warn!("disconnecting replica: {reason}"),
    }
}

/// What `serve` checked with the RDB version guard before a full sync.
struct GuardCheck<'a> {
    key: Option<&'a str>,
    ask: Ask,
    /// The snapshot version checked, if a snapshot existed then.
    checked_version: Option<u32>,
}

/// Waits for a snapshot the log covers, sends it, then streams from its offset.
async fn full_sync(
    session: &mut Session,
    row: &ReplicaRow,
    is_psync: bool,
    guard: GuardCheck<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Disconnect> {
    let context = session.context.clone();
    let mut snapshots = context.snapshots.subscribe();
    if session.handshake.rdb_only && session.handshake.capa_relay_snapshot {
        // A relay above wants our snapshot as a source: only one the log covers, and at once (it
        // may be the master we would fetch from, so it must never wait on us).
        let summary = context.log.summary();
        let usable = context.snapshots.current().is_some_and(|s| summary.can_continue_from(&s.replid, s.offset));
        if !usable {
            session.conn.stream.write_all(b"-NOSNAPSHOT no cached snapshot covered by the log\r\n").await?;
            return Ok(());
        }
    }
    let mut keepalive = tokio::time::interval_at(Instant::now() + KEEPALIVE_PERIOD, KEEPALIVE_PERIOD);
    let wants_current = session.handshake.rdb_only
        && !session.handshake.capa_relay_snapshot
        && session.handshake.rdb_filter.is_none_or(|f| f.functions);
    let mut cached_fallback = None;
    if wants_current {
        match fresh_snapshot(session, &mut keepalive, shutdown).await? {
            Ok(meta) => {
                ServedStats::add(&context.stats.rdb_only_fresh, 1);
                tracing::info!(offset = meta.offset.get(), source = %meta.source, "rdb-only request: a snapshot taken for it");
            }
            Err(reason) => cached_fallback = Some(reason),
        }
    }
    if let Some(reason) = cached_fallback {
        if let Some((snapshot, file)) = context.snapshots.open_current_async().await {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let age = now.saturating_sub(snapshot.created_unix);
            ServedStats::add(&context.stats.rdb_only_cached, 1);
            context.stats.rdb_only_last_cached_age.store(age, Ordering::Relaxed);
            tracing::warn!(
                age_seconds = age,
                offset = snapshot.offset.get(),
                relay_offset = context.log.summary().end.get(),
                "rdb-only request answered from the cache, {age} s old: no source could give a fresh snapshot ({reason})"
            );
            let replid = snapshot.replid.clone();
            if is_psync {
                let line = format!("+FULLRESYNC {replid} {}\r\n", snapshot.offset);
                session.conn.stream.write_all(line.as_bytes()).await?;
            }
            row.update(|r| r.state = ReplicaState::SendBulk);
            let eof_form = context.config.downstream_eof_form && session.handshake.capa_eof;
            return send_rdb(session, &snapshot, tokio::fs::File::from_std(file), eof_form).await;
        }
    }
    let (snapshot, epoch, replid, file) = loop {
        let summary = context.log.summary();
        let current = snapshots.borrow_and_update().clone();
        if let (Some(snapshot), Some(ids)) = (current, summary.ids.clone()) {
            if summary.can_continue_from(&snapshot.replid, snapshot.offset) {
                match context.snapshots.open_current_async().await {
                    Some((opened, file)) if opened == snapshot => {
                        break (snapshot, summary.epoch, ids.replid, tokio::fs::File::from_std(file));
                    }
                    // Replaced meanwhile: look again at once; unreadable: a fresh fetch repairs it.
                    Some(_) => continue,
                    None => context.fetcher.request(),
                }
            } else if !snapshot_is_current(&snapshot, &summary) {
                context.fetcher.request();
            }
        } else if summary.ids.is_some() {
            context.fetcher.request();
        }
        // Newline keepalives while the RDB is being prepared, as a master does during BGSAVE.
        tokio::select! {
            _ = keepalive.tick() => write_flushed(&mut session.conn.stream, b"\n").await?,
            changed = snapshots.changed() => if changed.is_err() { return Err(Disconnect::Shutdown) },
            _ = crate::shutdown::stopped(shutdown) => return Err(Disconnect::Shutdown),
            closed = wait_closed(&mut session.conn.stream) => return Err(closed),
        }
    };
    if guard.checked_version != Some(snapshot.rdb_version) {
        let version = session.handshake.version.as_ref();
        let now = std::time::Instant::now();
        if let Err(message) = context.sync_guard.check(guard.key, version, snapshot.rdb_version, guard.ask, now) {
            write_flushed(&mut session.conn.stream, format!("-{message}\r\n").as_bytes()).await?;
            return Ok(());
        }
    }
    if is_psync {
        let line = format!("+FULLRESYNC {replid} {}\r\n", snapshot.offset);
        write_flushed(&mut session.conn.stream, line.as_bytes()).await?;
    }
    row.update(|r| r.state = ReplicaState::SendBulk);
    let eof_form = context.config.downstream_eof_form && session.handshake.capa_eof;
    tracing::info!(
        offset = snapshot.offset.get(),
        bytes = snapshot.size,
        form = if eof_form { "eof" } else { "length" },
        "full resynchronization: sending the cached RDB"
    );
    send_rdb(session, &snapshot, file, eof_form).await?;
    if session.handshake.rdb_only {
        return Ok(());
    }
    if eof_form {
        wait_first_ack(session).await?;
    }
    row.update(|r| {
        r.state = ReplicaState::Online;
        r.ack_time = Instant::now();
    });
    stream(session, row, epoch, snapshot.offset, !is_psync, shutdown).await
}

/// Asks the fetcher for a snapshot taken now (an rdb-only client), with newline keepalives while it
/// comes. The inner error says why no source could give one.
async fn fresh_snapshot(
    session: &mut Session,
    keepalive: &mut tokio::time::Interval,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Result<SnapshotMeta, String>, Disconnect> {
    let mut answer = session.context.fetcher.fresh();
    loop {
        tokio::select! {
            result = &mut answer => {
                return Ok(result.unwrap_or_else(|_| Err("the snapshot fetcher stopped".into())));
            }
            _ = keepalive.tick() => session.conn.stream.write_all(b"\n").await?,
            _ = crate::shutdown::stopped(shutdown) => return Err(Disconnect::Shutdown),
            closed = wait_closed(&mut session.conn.stream) => return Err(closed),
        }
    }
}

/// Opens the cached RDB, making sure the file is the one `snapshot` describes.
async fn send_rdb(
    session: &mut Session,
    snapshot: &SnapshotMeta,
    mut file: tokio::fs::File,
    eof_form: bool,
) -> Result<(), Disconnect> {
    let repl_timeout = session.context.config.repl_timeout;
    if let Some(filter) = session.handshake.rdb_filter {
        let mut std_file = file.into_std().await;
        let filtered = tokio::task::spawn_blocking(move || {
            crate::snapshot::filter_rdb(&mut std::io::BufReader::new(&mut std_file), filter)
        })
        .await
        .map_err(|e| Disconnect::Corrupt(format!("filter task failed: {e}")))?
        .map_err(|e| Disconnect::Corrupt(e.to_string()))?;
        let stream = &mut session.conn.stream;
        let mark = random_hex_id();
        let header = if eof_form { format!("$EOF:{mark}\r\n") } else { format!("${}\r\n", filtered.len()) };
        write_timed(stream, header.as_bytes(), repl_timeout).await?;
        write_timed(stream, &filtered, repl_timeout).await?;
        if eof_form {
            write_timed(stream, mark.as_bytes(), repl_timeout).await?;
        }
        tracing::info!(bytes = filtered.len(), functions = filter.functions, "sent a filtered RDB (rdb-filter-only)");
        ServedStats::add(&session.context.stats.repl_output_bytes, filtered.len() as u64);
        return Ok(());
    }
    let name = replica_name(session);
    let stream = &mut session.conn.stream;
    let mark = random_hex_id();
    let header = if eof_form { format!("$EOF:{mark}\r\n") } else { format!("${}\r\n", snapshot.size) };
    write_timed(stream, header.as_bytes(), repl_timeout).await?;
    let mut buf = vec![0u8; RDB_CHUNK];
    let mut sent = 0u64;
    let mut progress = TransferProgress::new("full sync to a replica", name);
    while sent < snapshot.size {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Err(Disconnect::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let n = n.min((snapshot.size - sent) as usize);
        write_timed(stream, &buf[..n], repl_timeout).await?;
        sent += n as u64;
        progress.update(sent, snapshot.size as i64);
    }
    if eof_form {
        write_timed(stream, mark.as_bytes(), repl_timeout).await?;
    }
    ServedStats::add(&session.context.stats.repl_output_bytes, sent);
    Ok(())
}

async fn write_timed<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8], limit: Duration) -> Result<(), Disconnect> {
    timeout(limit, write_flushed(writer, bytes)).await.map_err(|_| Disconnect::WriteTimeout)??;
    Ok(())
}

/// Writes `bytes` and flushes (a TLS stream holds its last record until then).
async fn write_flushed<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

/// Resolves when the peer closes (or sends something) while we are not reading. Over TLS a peek
/// would see records, not the peer's bytes, so a close is noticed at the next write instead.
async fn wait_closed(stream: &mut Stream) -> Disconnect {
    let Stream::Plain(stream) = stream else {
        return std::future::pending().await;
    };
    let mut probe = [0u8; 1];
    loop {
        match stream.peek(&mut probe).await {
            Ok(0) => return Disconnect::Client(ClientError::Closed),
            Err(e) => return Disconnect::Io(e),
            // Data (a newline from a loading replica, say) is read later; keep waiting for a close.
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}

/// After an EOF-marked payload: read until the replica's first `REPLCONF ACK`.
async fn wait_first_ack(session: &mut Session) -> Result<(), Disconnect> {
    let limit = session.context.config.repl_timeout;
    loop {
        let command = timeout(limit, session.conn.next_command(CommandLimits::AUTHENTICATED))
            .await
            .map_err(|_| Disconnect::AckTimeout)??;
        match classify(&command) {
            FromReplica::Ack(_) => return Ok(()),
            FromReplica::Keepalive => {}
            FromReplica::Other(name) => return Err(Disconnect::UnexpectedCommand(name)),
        }
    }
}

enum FromReplica {
    Ack(Position),
    Keepalive,
    Other(String),
}

fn classify(command: &ClientCommand) -> FromReplica {
    if command.args.is_empty() {
        return FromReplica::Keepalive;
    }
    if command.name() == "REPLCONF" {
        let option = command.arg_str(1).to_ascii_lowercase();
        if option == "ack" {
            // redis-server: an unparsable offset is ignored, a negative one still counts as an
            // ACK (it refreshes the ACK time) but cannot lower the acknowledged offset.
            if let Some(offset) = command.args.get(2).and_then(|arg| string2ll(arg)) {
                return FromReplica::Ack(Position::new(offset.max(0) as u64));
            }
        }
        if option == "getack" || option == "ack" {
            return FromReplica::Keepalive;
        }
    }
    // At most 128 bytes of it reach the log, as redis-server truncates echoed input.
    FromReplica::Other(command.name().chars().take(128).collect())
}

/// Writes all of `parts`, within `limit`.
async fn write_parts<W: AsyncWrite + Unpin>(
    writer: &mut W,
    parts: &mut Vec<bytes::Bytes>,
    limit: Duration,
) -> Result<u64, Disconnect> {
    let n = timeout(limit, write_all_vectored(writer, parts)).await.map_err(|_| Disconnect::WriteTimeout)??;
    Ok(n as u64)
}

/// Streams the log from `position` until the replica goes away, falls behind the log's start, the
/// history changes, or it stops ACKing (not for old `SYNC` replicas, which never ACK).
async fn stream(
    session: &mut Session,
    row: &ReplicaRow,
    epoch: u64,
    position: Position,
    pre_psync: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Disconnect> {
    let context = session.context.clone();
    let pending = std::mem::take(&mut session.conn.buf);
    // Plain TCP splits without a lock; a TLS session is one state machine, shared by its halves.
    match &mut session.conn.stream {
        Stream::Plain(tcp) => {
            let (reader, writer) = tcp.split();
            stream_halves(&context, reader, writer, pending, row, epoch, position, pre_psync, shutdown).await
        }
        tls => {
            let (reader, writer) = tokio::io::split(tls);
            stream_halves(&context, reader, writer, pending, row, epoch, position, pre_psync, shutdown).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_halves<R: AsyncRead + Unpin, W: WriterKind>(
    context: &RelayContext,
    mut reader: R,
    mut writer: W,
    pending: BytesMut,
    row: &ReplicaRow,
    epoch: u64,
    position: Position,
    pre_psync: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Disconnect> {
    let repl_timeout = context.config.repl_timeout;
    let started = Instant::now();
    let last_ack_ms = AtomicU64::new(0);
    let read_acks = async {
        let mut buf = pending;
        loop {
            while let Some(command) = parse_command(&mut buf)? {
                match classify(&command) {
                    FromReplica::Ack(offset) => row.acked(offset),
                    FromReplica::Keepalive => {}
                    FromReplica::Other(name) => return Err(Disconnect::UnexpectedCommand(name)),
                }
                last_ack_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            if buf.capacity() > 64 * 1024 && buf.is_empty() {
                buf = BytesMut::with_capacity(4096);
            }
            read_more(&mut reader, &mut buf).await?;
        }
    };

    let write_stream = async {
        let mut tip = context.log.subscribe();
        let mut position = position;
        // The tail task reads where this cursor is from the shared atomic (no lock per send).
        let sent = row.entry().map_or_else(|| ReplicaEntry::sent_from(position), |entry| entry.sent);
        sent.store(position.get(), Ordering::Relaxed);
        // Disk records checked before go to a plain-TCP replica straight from the file.
        let file_sender = writer.tcp().map(FileSender::new).transpose()?;
        let stats = &context.stats;
        loop {
            let next = context.log.read_next(epoch, position, WRITE_BATCH, file_sender.is_some()).await;
            let next = match next {
                Ok(next) => next,
                Err(ReadError::Trimmed(at)) => return Err(Disconnect::FellOff(at)),
                Err(ReadError::EpochChanged(_)) => return Err(Disconnect::HistoryChanged),
                Err(ReadError::Corrupt(reason)) => {
                    ServedStats::add(&stats.log_read_corrupt, 1);
                    return Err(Disconnect::Corrupt(reason));
                }
                Err(ReadError::Io(reason)) => {
                    ServedStats::add(&stats.log_read_errors, 1);
                    return Err(Disconnect::DiskRead(reason));
                }
            };
            let (n, source) = match next {
                ToSend::Memory(parts) if parts.is_empty() => {
                    if tip.changed().await.is_err() {
                        return Err(Disconnect::Shutdown);
                    }
                    continue;
                }
                ToSend::Memory(mut parts) => {
                    (write_parts(&mut writer, &mut parts, repl_timeout).await?, &stats.stream_from_memory)
                }
                ToSend::Disk(mut parts) => {
                    (write_parts(&mut writer, &mut parts, repl_timeout).await?, &stats.stream_from_disk)
                }
                ToSend::File(run) => {
                    let (Some(sender), Some(tcp)) = (&file_sender, writer.tcp()) else {
                        return Err(Disconnect::Corrupt("a file run for a replica that cannot take one".into()));
                    };
                    let sent = match sender.send(&context.log, tcp, run, repl_timeout).await {
                        Ok(sent) => sent,
                        Err(SendError::File(error)) => {
                            ServedStats::add(&stats.log_read_errors, 1);
                            return Err(Disconnect::DiskRead(format!(
                                "sending from the log's segment file failed: {error}"
                            )));
                        }
                        Err(SendError::Timeout) => return Err(Disconnect::WriteTimeout),
                        Err(SendError::Socket(error)) => return Err(Disconnect::Io(error)),
                    };
                    (sent, &stats.stream_sendfile)
                }
            };
            position += n;
            sent.store(position.get(), Ordering::Relaxed);
            ServedStats::add(source, n);
            ServedStats::add(&stats.repl_output_bytes, n);
        }
    };

    let watch_acks = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let since = started.elapsed().saturating_sub(Duration::from_millis(last_ack_ms.load(Ordering::Relaxed)));
            if !pre_psync && since > repl_timeout {
                return Disconnect::AckTimeout;
            }
        }
    };

    tokio::select! {
        result = read_acks => result,
        result = write_stream => result,
        reason = watch_acks => Err(reason),
        _ = crate::shutdown::stopped(shutdown) => Err(Disconnect::Shutdown),
    }
}
