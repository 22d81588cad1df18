//! The replication log: the master's stream, byte for byte, addressed by master offset.
//!
//! It is the one fan-out buffer of the relay. The upstream link is its only writer and appends whole
//! commands (never half a command, never an open MULTI); every downstream replica is a cursor that reads
//! shared [`Bytes`] slices out of it, so the stream is held once however many replicas follow it.
//!
//! Offsets follow Redis: the log holds the bytes at offsets `first_byte_offset ..= end`, where `end` is
//! the relay's `master_repl_offset`. A cursor is a [`Position`]: the offset of the last byte it has, so
//! a replica asking `PSYNC <id> <n>` reads from position `n - 1` ([`Position::from_psync_offset`];
//! the ±1 between positions and Redis's next-byte offsets lives only in [`crate::offset`]).
//!
//! The log also owns the replication ids (replid, replid2, second_repl_offset) because they describe
//! its history: whether a PSYNC may continue is a question about this log.
//!
//! Two tiers: every append goes to a segment file on disk ([`disk`], format in [`format`](mod@format)) and to an
//! in-memory tail of shared chunks. Cursors within the tail get the chunks themselves; cursors further
//! behind read checksummed records from disk, so a replica hours behind costs disk reads, not memory.
//! Retention is by size: whole old segments are deleted, and a cursor behind the log's start is told so.
//!
//! Threads: the log's one writer ([`writer`]) runs on its own thread and owns the segment files;
//! the upstream link hands it chunks over a bounded channel. [`ReplicationLog`] is the readers'
//! view: the writer does its disk work first, with no lock held, then updates the view under a
//! short write lock and publishes `appended` ([`ReplicationLog::subscribe`]) and `durable`
//! ([`ReplicationLog::subscribe_durable`]). Readers in the memory tail share its chunks. Readers
//! behind it read checksummed records on the blocking pool ([`ReplicationLog::read_async`]); a
//! record is checked once, by the first reader, which notes where it lies ([`verified`]), and the
//! readers after it on plain TCP get it sent from the file by the kernel
//! ([`ReplicationLog::read_next`], [`ReplicationLog::send_file`]), with no copy in user space.
//! Recovery ([`ReplicationLog::open`]) blocks and is run on the blocking pool.
//!
//! Lock order: the view's `RwLock`, then the `durable` and `tip` watches (each `watch` has its own
//! lock); the verified-records table's `Mutex` is taken alone. No lock is held across a disk operation.

pub mod disk;
pub mod format;
pub mod verified;
pub mod writer;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use tokio::sync::watch;

use crate::fs::SharedFs;
pub use crate::offset::Position;
pub use disk::{DiskError, DropKind, Dropped, Recovery};
use disk::{DiskIndex, DiskRange, SegmentStore};
use format::HistoryMeta;
pub use verified::{FileRun, SendStop};
use verified::{Located, VerifiedRecords};
pub use writer::{LogWriter, WriterGone, WriterHandle};

/// When appended bytes are fsynced, like Redis's `appendfsync`. The relay ACKs upstream only what is
/// durable under its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before the upstream ACK covers it, every append is fsynced.
    Always,
    /// Once a second, in the background; ACKs trail by up to a second.
    EverySec,
    /// Left to the OS; ACKs cover everything applied.
    No,
}

impl FsyncPolicy {
    pub fn parse(text: &str) -> Option<FsyncPolicy> {
        match text.to_ascii_lowercase().as_str() {
            "always" => Some(FsyncPolicy::Always),
            "everysec" => Some(FsyncPolicy::EverySec),
            "no" => Some(FsyncPolicy::No),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::EverySec => "everysec",
            FsyncPolicy::No => "no",
        }
    }
}

/// Sizes and policies of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Bytes kept in all (disk), the `repl_backlog_size` of INFO.
    pub retention: u64,
    /// Hard cap (`log_max_size`): retention may keep older segments beyond `retention` so that the
    /// stream after the cached snapshot stays in the log, but never more than this.
    pub max_size: u64,
    /// Bytes of the newest stream kept in memory for live fan-out.
    pub memory: u64,
    /// Size at which a new segment file starts.
    pub segment_size: u64,
    /// Also drop segments whose newest byte is older than this.
    pub max_age: Option<std::time::Duration>,
    pub fsync: FsyncPolicy,
}

impl LogOptions {
    /// Segments small enough that retention trims in steps of at most an eighth of it.
    fn effective_segment_size(&self) -> u64 {
        self.segment_size.min((self.retention / 8).max(64 * 1024))
    }
}

/// The replid Redis shows when there is none (`clearReplicationId2`).
pub const NO_REPLID: &str = "0000000000000000000000000000000000000000";

/// The replication ids describing the log's history, as in `INFO replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplIds {
    pub replid: String,
    pub replid2: String,
    /// As INFO shows it: the first PSYNC offset `replid2` no longer covers (the position it is valid
    /// through + 1, [`Position::second_repl_offset`]); -1 when there is no replid2.
    pub second_repl_offset: i64,
}

impl ReplIds {
    pub fn new(replid: String) -> ReplIds {
        ReplIds { replid, replid2: NO_REPLID.into(), second_repl_offset: -1 }
    }

    /// Whether a dataset the master produced at `position` under `replid` (a snapshot, a
    /// `+FULLRESYNC`, a replica's PSYNC) belongs to this history: the current id, or the previous
    /// one up to where it was valid.
    pub fn holds(&self, replid: &str, position: Position) -> bool {
        replid.eq_ignore_ascii_case(&self.replid)
            || (replid.eq_ignore_ascii_case(&self.replid2)
                && Position::from_second_repl_offset(self.second_repl_offset).is_some_and(|last| position <= last))
    }
}

/// What readers watch: the log's generation and its last offset. A new epoch means the history was
/// replaced or the ids changed, and every downstream replica must be disconnected (as a Redis replica
/// does on a new full sync or on `+CONTINUE <newid>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTip {
    pub epoch: u64,
    pub end: Position,
}

/// Why a cursor cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("the log no longer holds position {0}: it starts after it")]
    Trimmed(Position),
    #[error("the log's history changed (epoch {0})")]
    EpochChanged(u64),
    #[error("a log record failed its check and is not served: {0}")]
    Corrupt(String),
    #[error("reading the log from disk failed: {0}")]
    Io(String),
}

impl ReadError {
    fn from_disk(error: disk::DiskReadError) -> ReadError {
        match error {
            disk::DiskReadError::Corrupt { .. } => ReadError::Corrupt(error.to_string()),
            _ => ReadError::Io(error.to_string()),
        }
    }
}

/// The readers' view of the log. Only the writer ([`LogWriter`]) changes it, under the write lock
/// and never across a disk operation: it writes first, then publishes. (The one exception is
/// [`ReplicationLog::release_memory_before`], which drops memory-tail chunks every reader passed.)
struct Inner {
    /// `None` until the first full sync gives the log a history.
    ids: Option<ReplIds>,
    epoch: u64,
    /// Position before the first byte held (`first_byte_offset - 1`), on disk.
    start: u64,
    end: u64,
    /// The in-memory tail: chunks in order, each with the position before its first byte.
    chunks: VecDeque<(u64, Bytes)>,
    /// Position before the first byte of the memory tail.
    memory_start: u64,
    /// Where readers behind the memory tail find records on disk.
    disk: DiskIndex,
    /// The active segment, which the `everysec` syncer fsyncs.
    active_file: Option<Arc<std::fs::File>>,
    /// Finished segments and the directory, fsynced by the `everysec` syncer before the active one.
    pending_sync: Vec<Arc<std::fs::File>>,
}

/// The log handle shared by the writer thread and the downstream readers: a read-only view of the
/// log that the writer updates after each write.
///
/// Lock order (no lock is ever held across a disk operation): `inner` (the view), then the `durable`
/// and `tip` watches' own locks; `verified` is taken alone, never with `inner`.
pub struct ReplicationLog {
    inner: RwLock<Inner>,
    /// `appended`: the epoch and last offset, published after each write.
    tip: watch::Sender<LogTip>,
    options: LogOptions,
    /// `durable`: the highest position known to be on stable storage (per the fsync policy).
    durable: watch::Sender<Position>,
    /// Where the records that readers have checked lie on disk, for the readers after them.
    verified: std::sync::Mutex<VerifiedRecords>,
    /// Turns of the readers behind the memory tail at the disk ([`ReplicationLog::disk_job`]).
    disk_jobs: tokio::sync::Semaphore,
    /// The position retention keeps in the log (the cached snapshot's offset), up to `max_size`;
    /// `u64::MAX` when nothing is pinned.
    pinned: AtomicU64,
    /// The file system the segments are read through.
    fs: SharedFs,
    /// Write failures of the writer and the syncer.
    faults: writer::WriteFaults,
    /// Flips to true when the writer thread has ended (its segment store and directory lock closed).
    writer_stopped: watch::Sender<bool>,
}

/// Disk reads and sends of the readers behind the memory tail at once (threads of the blocking
/// pool they hold): each is short (a read of about 1 MiB, or `sendfile` until the socket is full).
/// One: the disk tier then costs the relay at most one thread beside its runtime workers, so a
/// master on the same host keeps its core (measured with `bench/run.py`: four at once made the
/// master's 199 MB burst 1.3x as long at 32 sinks and 1.15x at 64, for no faster delivery).
const DISK_JOBS: usize = 1;

/// Where a read's bytes are.
pub enum Chunks {
    Memory(Vec<Bytes>),
    Disk(DiskRange),
}

/// What a reader sends next ([`ReplicationLog::read_next`]), by where it comes from.
pub enum ToSend {
    /// Shared chunks of the memory tail.
    Memory(Vec<Bytes>),
    /// Records read from disk into memory, checked by this reader or one before it.
    Disk(Vec<Bytes>),
    /// Records checked before, to send from their segment file ([`ReplicationLog::send_file`]).
    File(FileRun),
}

/// A consistent view of the log's bounds and ids, for INFO and for PSYNC decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    pub ids: Option<ReplIds>,
    pub epoch: u64,
    /// The position before the first byte held (INFO shows [`Self::first_byte_offset`]).
    pub start: Position,
    /// The last byte held: the relay's `master_repl_offset`.
    pub end: Position,
    pub capacity: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub durable: Position,
}

impl LogSummary {
    /// `repl_backlog_first_byte_offset`: the offset of the first byte held.
    pub fn first_byte_offset(&self) -> u64 {
        self.start.next_offset()
    }

    pub fn histlen(&self) -> u64 {
        self.end.bytes_since(self.start)
    }

    /// Whether the log holds everything after `position` (inclusive of "nothing yet to send").
    pub fn covers(&self, position: Position) -> bool {
        self.start <= position && position <= self.end
    }

    /// `masterTryPartialResynchronization`'s test: may a replica that asks `PSYNC replid offset`
    /// continue from this log?
    pub fn can_continue(&self, replid: &str, psync_offset: i64) -> bool {
        Position::from_psync_offset(psync_offset).is_some_and(|position| self.can_continue_from(replid, position))
    }

    /// [`Self::can_continue`] for a replica holding the dataset up to `position` (a snapshot's):
    /// the same history rule as a snapshot's, and the log holds the stream after it.
    pub fn can_continue_from(&self, replid: &str, position: Position) -> bool {
        let Some(ids) = &self.ids else { return false };
        ids.holds(replid, position) && self.covers(position)
    }

    /// Whether a snapshot taken at `position` under `replid` can serve full syncs from this log: it
    /// is of this history ([`ReplIds::holds`]) and the log holds, or will hold once the link reaches
    /// it, the stream right after it.
    pub fn serves_snapshot(&self, replid: &str, position: Position) -> bool {
        let Some(ids) = &self.ids else { return false };
        ids.holds(replid, position) && position >= self.start
    }
}

impl ReplicationLog {
    /// Opens (recovering) the log in `dir`: every record on disk is checked and a torn or corrupt tail
    /// is cut at the last good record. Blocks (a full scan of the segments): run it off the runtime.
    /// Returns the shared view and its one writer, to run on its own thread ([`LogWriter::spawn`]).
    pub fn open(dir: &Path, options: LogOptions) -> Result<(Arc<ReplicationLog>, LogWriter, Recovery), DiskError> {
        Self::open_with(dir, options, crate::fs::real())
    }

    /// [`Self::open`] on the given file system.
    pub fn open_with(
        dir: &Path,
        options: LogOptions,
        fs: SharedFs,
    ) -> Result<(Arc<ReplicationLog>, LogWriter, Recovery), DiskError> {
        let sync_on_rotate = options.fsync != FsyncPolicy::EverySec;
        let (store, recovery) = SegmentStore::open(dir, options.effective_segment_size(), sync_on_rotate, fs.clone())?;
        let ids = recovery.history.as_ref().map(|h| ReplIds {
            replid: h.replid.clone(),
            replid2: h.replid2.clone(),
            second_repl_offset: h.second_repl_offset,
        });
        let (tip, _) = watch::channel(LogTip { epoch: 0, end: Position::new(recovery.end) });
        let mut disk = DiskIndex::default();
        disk.sync_from(&store);
        let log = Arc::new(ReplicationLog {
            inner: RwLock::new(Inner {
                ids,
                epoch: 0,
                start: recovery.start,
                end: recovery.end,
                chunks: VecDeque::new(),
                memory_start: recovery.end,
                disk,
                active_file: store.active_file(),
                pending_sync: Vec::new(),
            }),
            tip,
            options,
            durable: watch::channel(Position::new(recovery.end)).0,
            verified: Default::default(),
            disk_jobs: tokio::sync::Semaphore::new(DISK_JOBS),
            pinned: AtomicU64::new(u64::MAX),
            fs,
            faults: Default::default(),
            writer_stopped: watch::channel(false).0,
        });
        let writer = LogWriter::new(log.clone(), store, recovery.end);
        Ok((log, writer, recovery))
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the view half-updated in a way that matters (a
        // few field assignments, no I/O), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn options(&self) -> LogOptions {
        self.options
    }

    pub fn subscribe(&self) -> watch::Receiver<LogTip> {
        self.tip.subscribe()
    }

    pub fn summary(&self) -> LogSummary {
        let inner = self.read_inner();
        LogSummary {
            ids: inner.ids.clone(),
            epoch: inner.epoch,
            start: Position::new(inner.start),
            end: Position::new(inner.end),
            capacity: self.options.retention,
            memory_bytes: inner.end - inner.memory_start,
            disk_bytes: inner.disk.bytes_on_disk(),
            durable: self.durable_offset(),
        }
    }

    /// The last offset written to the log (`appended`), as last published.
    pub fn appended(&self) -> Position {
        self.tip.borrow().end
    }

    /// Watches the durable offset (what the fsync policy has made durable).
    pub fn subscribe_durable(&self) -> watch::Receiver<Position> {
        self.durable.subscribe()
    }

    /// Write failures so far (INFO and metrics).
    pub fn write_faults(&self) -> writer::WriteFaultReport {
        self.faults.report()
    }

    /// Resolves once the writer thread has ended: its files are closed and the directory unlocked.
    pub async fn writer_stopped(&self) {
        let mut stopped = self.writer_stopped.subscribe();
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }

    /// Asks retention to keep the stream after `position` (the cached snapshot's offset) beyond
    /// `log_size`, up to `log_max_size`; `None` releases it.
    pub fn pin(&self, position: Option<Position>) {
        self.pinned.store(position.map_or(u64::MAX, Position::get), Ordering::Release);
    }

    /// Bytes held beyond `log_size` because of the pin (0 when retention is at its normal size).
    pub fn held_beyond_retention(&self) -> u64 {
        let inner = self.read_inner();
        (inner.end - inner.start).saturating_sub(self.options.retention)
    }

    /// The highest offset safe to ACK upstream under the fsync policy.
    pub fn durable_offset(&self) -> Position {
        *self.durable.borrow()
    }

    pub(crate) fn history(ids: &ReplIds, start: u64) -> HistoryMeta {
        HistoryMeta {
            replid: ids.replid.clone(),
            replid2: ids.replid2.clone(),
            second_repl_offset: ids.second_repl_offset,
            start,
        }
    }

    /// Finds up to `max_bytes` (at least one record's or chunk's worth) after `position`: shared
    /// chunks from the memory tail, or a plan of checksummed records to read from disk.
    pub fn read(&self, epoch: u64, at: Position, max_bytes: usize) -> Result<Chunks, ReadError> {
        let position = at.get();
        let inner = self.read_inner();
        if inner.epoch != epoch {
            return Err(ReadError::EpochChanged(inner.epoch));
        }
        if position < inner.start || position > inner.end {
            return Err(ReadError::Trimmed(at));
        }
        if position < inner.memory_start {
            return match inner.disk.plan_read(position, max_bytes) {
                Some(range) => Ok(Chunks::Disk(range)),
                None => Err(ReadError::Trimmed(at)),
            };
        }
        let mut out = Vec::new();
        if position == inner.end {
            return Ok(Chunks::Memory(out));
        }
        // The chunk holding the byte after `position`: the last one starting at or before it.
        let index = inner.chunks.partition_point(|(chunk_start, _)| *chunk_start <= position) - 1;
        let mut taken = 0usize;
        for (chunk_start, chunk) in inner.chunks.range(index..) {
            let skip = position.saturating_sub(*chunk_start) as usize;
            let slice = chunk.slice(skip..);
            taken += slice.len();
            out.push(slice);
            if taken >= max_bytes {
                break;
            }
        }
        Ok(Chunks::Memory(out))
    }

    /// Drops the memory tail's chunks that end at or before `at` (every reader is past them): they
    /// stay on disk, and a reader that comes back for them reads them there. Returns the bytes
    /// dropped. Besides the writer's, the one change to the view: dropping chunks from the tail's
    /// front, under the same lock, with no disk operation; the writer only appends at the back
    /// and trims the front to `log_memory`, so either order of the two keeps the tail whole.
    pub fn release_memory_before(&self, at: Position) -> u64 {
        let mut inner = self.write_inner();
        let mut released = 0;
        while let Some((start, len)) = inner.chunks.front().map(|(start, chunk)| (*start, chunk.len() as u64)) {
            if start + len > at.get() {
                break;
            }
            inner.chunks.pop_front();
            inner.memory_start = start + len;
            released += len;
        }
        released
    }

    /// [`Self::read`], doing any disk reads on the blocking pool. Bytes from disk are only returned
    /// once their record checksums match, checked by this reader or by one before it.
    pub async fn read_async(&self, epoch: u64, at: Position, max_bytes: usize) -> Result<Vec<Bytes>, ReadError> {
        match self.read_next(epoch, at, max_bytes, false).await? {
            ToSend::Memory(parts) | ToSend::Disk(parts) => Ok(parts),
            ToSend::File(run) => self.read_back(epoch, at, run).await,
        }
    }

    /// The stream after `position`, up to about `max_bytes`, doing any disk reads on the blocking
    /// pool: shared chunks of the memory tail; or, behind it, records read from disk and checked
    /// (noted for the readers after this one); or records checked before, as a [`FileRun`] for a
    /// reader that `takes_files` (sent with [`Self::send_file`]), read back without a second check
    /// for one that does not.
    pub async fn read_next(
        &self,
        epoch: u64,
        at: Position,
        max_bytes: usize,
        takes_files: bool,
    ) -> Result<ToSend, ReadError> {
        let range = match self.read(epoch, at, max_bytes)? {
            Chunks::Memory(chunks) => return Ok(ToSend::Memory(chunks)),
            Chunks::Disk(range) => range,
        };
        match self.verified_run(epoch, at, max_bytes) {
            Some(run) if takes_files => Ok(ToSend::File(run)),
            Some(run) => Ok(ToSend::Disk(self.read_back(epoch, at, run).await?)),
            None => Ok(ToSend::Disk(self.read_and_verify(epoch, at, range).await?)),
        }
    }

    /// Reads a run of records checked before back from disk (one buffer per record).
    async fn read_back(&self, epoch: u64, at: Position, run: FileRun) -> Result<Vec<Bytes>, ReadError> {
        let fs = self.fs.clone();
        let file = run.file;
        let joined = self.disk_job(move || disk::read_run(&*fs, &run)).await;
        let parts = joined.map_err(|e| ReadError::Io(format!("disk read task failed: {e}")))?;
        match parts {
            Ok(parts) => {
                self.check_epoch(epoch)?;
                Ok(parts)
            }
            Err(disk::DiskReadError::Gone) => {
                self.forget_file(file);
                self.check_epoch(epoch)?;
                Err(ReadError::Trimmed(at))
            }
            Err(other) => Err(ReadError::from_disk(other)),
        }
    }

    /// Sends `run` after its first `skip` bytes to `socket` (non-blocking) with `sendfile`, on the
    /// blocking pool, until it is sent or the socket is full. Returns the bytes sent and why it
    /// stopped short; after [`SendStop::Gone`] the run's file is forgotten, so the next read finds
    /// out from the disk whether its records are trimmed or their history replaced.
    pub async fn send_file(
        &self,
        socket: Arc<std::os::fd::OwnedFd>,
        run: Arc<FileRun>,
        skip: u64,
    ) -> (u64, Option<SendStop>) {
        use std::os::fd::AsFd;
        let fs = self.fs.clone();
        let file = run.file;
        let joined = self.disk_job(move || verified::send_run(&*fs, socket.as_fd(), &run, skip)).await;
        let (sent, stop) = joined.unwrap_or_else(|e| (0, Some(SendStop::File(std::io::Error::other(e.to_string())))));
        if matches!(stop, Some(SendStop::Gone)) {
            self.forget_file(file);
        }
        (sent, stop)
    }

    /// Runs a disk read or send of the readers behind the memory tail on the blocking pool, at
    /// most [`DISK_JOBS`] at a time: however many replicas trail, they share a few threads (and
    /// their allocator arenas and stacks) and a bounded share of the CPU; the others wait their
    /// turn in order.
    async fn disk_job<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.disk_jobs.acquire().await;
        tokio::task::spawn_blocking(job).await
    }

    fn verified_run(&self, epoch: u64, at: Position, max_bytes: usize) -> Option<FileRun> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).run_from(epoch, at.get(), max_bytes)
    }

    fn forget_file(&self, file: verified::FileId) {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).forget_file(file);
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), ReadError> {
        let current = self.read_inner().epoch;
        if current != epoch {
            return Err(ReadError::EpochChanged(current));
        }
        Ok(())
    }

    /// Reads `range` from disk on the blocking pool, checks every record, and notes where the
    /// checked records lie for the readers after this one.
    async fn read_and_verify(&self, epoch: u64, at: Position, range: DiskRange) -> Result<Vec<Bytes>, ReadError> {
        let fs = self.fs.clone();
        let joined = self.disk_job(move || disk::read_range(&*fs, &range)).await;
        let read = joined.map_err(|e| ReadError::Io(format!("disk read task failed: {e}")))?;
        let read = match read {
            Ok(read) => read,
            Err(disk::DiskReadError::Gone) => {
                self.check_epoch(epoch)?;
                return Err(ReadError::Trimmed(at));
            }
            Err(other) => return Err(ReadError::from_disk(other)),
        };
        let (current_epoch, start) = {
            let inner = self.read_inner();
            (inner.epoch, inner.start)
        };
        if current_epoch != epoch {
            return Err(ReadError::EpochChanged(current_epoch));
        }
        let places = read.records.iter().map(|(record, payload_offset, payload)| {
            let place = Located {
                path: read.path.clone(),
                file: read.file,
                payload_offset: *payload_offset,
                len: payload.len() as u64,
            };
            (*record, place)
        });
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).note(epoch, start, places);
        Ok(slices_after(read.records.into_iter().map(|(record, _, payload)| (record, payload)), at.get()))
    }
}

/// The parts of whole records that come after `position`.
fn slices_after(records: impl IntoIterator<Item = (u64, Bytes)>, position: u64) -> Vec<Bytes> {
    records
        .into_iter()
        .filter(|(start, payload)| start + payload.len() as u64 > position)
        .map(|(start, payload)| payload.slice(position.saturating_sub(start) as usize..))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn options(retention: u64, memory: u64) -> LogOptions {
        LogOptions {
            retention,
            max_size: retention,
            memory,
            segment_size: 64 * 1024,
            max_age: None,
            fsync: FsyncPolicy::No,
        }
    }

    fn read_all(log: &ReplicationLog, epoch: u64, mut position: Position) -> Result<Vec<u8>, ReadError> {
        let mut out = Vec::new();
        loop {
            let chunks = match log.read(epoch, position, 1 << 20)? {
                Chunks::Memory(chunks) => chunks,
                Chunks::Disk(range) => slices_after(
                    disk::read_range(&crate::fs::RealFs, &range)
                        .map_err(|e| ReadError::Corrupt(e.to_string()))?
                        .records
                        .into_iter()
                        .map(|(record, _, payload)| (record, payload)),
                    position.get(),
                ),
            };
            if chunks.is_empty() {
                return Ok(out);
            }
            for chunk in chunks {
                position += chunk.len() as u64;
                out.extend_from_slice(&chunk);
            }
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| ((i.wrapping_mul(31) ^ seed) % 251) as u8).collect()
    }

    #[test]
    fn reads_from_memory_and_disk_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer, _) = ReplicationLog::open(dir.path(), options(256 * 1024, 16 * 1024)).unwrap();
        writer.reset("a".repeat(40), Position::new(100)).unwrap();
        let data = pattern(1_000_000, 7);
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        let summary = log.summary();
        assert_eq!(summary.end.get(), 100 + 1_000_000);
        assert!(summary.histlen() >= 256 * 1024 && summary.histlen() <= 256 * 1024 + 64 * 1024, "{summary:?}");
        assert!(summary.memory_bytes >= 16 * 1024 && summary.memory_bytes < 17 * 1024, "{summary:?}");
        for from in [summary.start, summary.start + 123, summary.end.back(5000), summary.end.back(3)] {
            let got = read_all(&log, summary.epoch, from).unwrap();
            assert_eq!(got, data[from.bytes_since(Position::new(100)) as usize..], "from {from}");
        }
        let trimmed = Position::new(100);
        assert!(matches!(log.read(summary.epoch, trimmed, 10), Err(ReadError::Trimmed(p)) if p == trimmed));
        assert!(matches!(log.read(summary.epoch + 1, summary.end, 10), Err(ReadError::EpochChanged(_))));
    }

    #[test]
    fn retention_holds_the_pinned_position_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { max_size: 1 << 20, ..options(256 * 1024, 16 * 1024) };
        let (log, mut writer, _) = ReplicationLog::open(dir.path(), opts).unwrap();
        writer.reset("p".repeat(40), Position::new(0)).unwrap();
        log.pin(Some(Position::ZERO));
        let data = pattern(600_000, 1);
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        assert_eq!(log.summary().first_byte_offset(), 1, "the pinned position stays in the log");
        assert!(log.held_beyond_retention() > 0);
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        let s = log.summary();
        assert!(s.first_byte_offset() > 1, "past the cap the pin no longer holds: {s:?}");
        assert!(s.histlen() <= (1 << 20) + 64 * 1024, "the cap, plus at most a segment: {s:?}");
        log.pin(Some(s.end.back(100_000)));
        writer.append(Bytes::from_static(b"x")).unwrap();
        let s = log.summary();
        assert!(s.histlen() <= 256 * 1024 + 64 * 1024, "a newer pin lets retention trim to log_size: {s:?}");
        assert!(s.covers(s.end.back(100_000)));
    }

    #[test]
    fn partial_resync_rules_follow_redis() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 20, 1 << 20)).unwrap();
        assert!(!log.summary().can_continue("?", -1));
        let old = "a".repeat(40);
        let new = "b".repeat(40);
        writer.reset(old.clone(), Position::new(1000)).unwrap();
        writer.append(Bytes::from_static(b"0123456789")).unwrap();
        let s = log.summary();
        assert!(s.can_continue(&old, 1001));
        assert!(s.can_continue(&old.to_uppercase(), 1011), "replid compares case-insensitively");
        assert!(!s.can_continue(&old, 1012), "beyond the end");
        assert!(!s.can_continue(&old, 1000), "before the first byte");
        assert!(!s.can_continue("?", -1));
        writer.shift_replid(new.clone()).unwrap();
        writer.append(Bytes::from_static(b"abc")).unwrap();
        let s = log.summary();
        assert!(s.can_continue(&old, 1011), "replid2 up to second_repl_offset");
        assert!(!s.can_continue(&old, 1012), "replid2 beyond second_repl_offset");
        assert!(s.can_continue(&new, 1014));
        assert_eq!(s.ids.unwrap().second_repl_offset, 1011);
    }

    #[test]
    fn replid2_holds_up_to_the_position_before_second_repl_offset() {
        let ids = ReplIds { replid: "n".repeat(40), replid2: "o".repeat(40), second_repl_offset: 1011 };
        assert!(ids.holds(&"o".repeat(40), Position::new(1010)), "PSYNC o 1011 continues in Redis");
        assert!(!ids.holds(&"o".repeat(40), Position::new(1011)), "PSYNC o 1012 does not");
        assert!(ids.holds(&"N".repeat(40), Position::new(u64::MAX)), "the current id has no bound");
        let none = ReplIds::new("n".repeat(40));
        assert_eq!(none.second_repl_offset, -1);
        assert!(!none.holds(NO_REPLID, Position::ZERO), "no replid2: the all-zero id holds nothing");
    }

    #[test]
    fn reopening_recovers_history_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(300_000, 3);
        {
            let (_log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 20, 4096)).unwrap();
            writer.reset("c".repeat(40), Position::new(5)).unwrap();
            for piece in data.chunks(777) {
                writer.append(Bytes::copy_from_slice(piece)).unwrap();
            }
            writer.shift_replid("d".repeat(40)).unwrap();
        }
        let (log, _writer, recovery) = ReplicationLog::open(dir.path(), options(1 << 20, 4096)).unwrap();
        assert!(recovery.dropped.is_none());
        let s = log.summary();
        assert_eq!((s.first_byte_offset(), s.end.get()), (6, 5 + data.len() as u64));
        let ids = s.ids.clone().unwrap();
        assert_eq!(
            (ids.replid, ids.replid2, ids.second_repl_offset),
            ("d".repeat(40), "c".repeat(40), s.end.get() as i64 + 1)
        );
        assert_eq!(read_all(&log, s.epoch, Position::new(5)).unwrap(), data);
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = ReplicationLog::open(dir.path(), options(1 << 20, 4096)).unwrap();
        assert!(matches!(ReplicationLog::open(dir.path(), options(1 << 20, 4096)), Err(DiskError::Locked(_))));
    }

    #[test]
    fn segments_older_than_max_age_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
            writer.reset("f".repeat(40), Position::new(0)).unwrap();
            for piece in pattern(300_000, 9).chunks(10_000) {
                writer.append(Bytes::copy_from_slice(piece)).unwrap();
            }
        }
        let segments = disk::segment_paths(dir.path());
        assert!(segments.len() >= 4, "{segments:?}");
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for path in &segments {
            std::fs::File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
        }
        let aged = LogOptions { max_age: Some(std::time::Duration::from_secs(3600)), ..options(1 << 30, 4096) };
        let (log, mut writer, _) = ReplicationLog::open(dir.path(), aged).unwrap();
        writer.append(Bytes::from_static(b"fresh")).unwrap();
        let left = disk::segment_paths(dir.path());
        assert_eq!(left.len(), 1, "only the active segment is left: {left:?}");
        let s = log.summary();
        assert_eq!(s.end.get(), 300_005);
        assert!(s.first_byte_offset() > 200_000, "{s:?}");
    }

    #[test]
    fn the_index_stays_small_with_tiny_records() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2_000_000, 11);
        {
            let (log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
            writer.reset("h".repeat(40), Position::new(0)).unwrap();
            for piece in data.chunks(20) {
                writer.append(Bytes::copy_from_slice(piece)).unwrap();
            }
            // 100,000 records, but one index entry per 64 KiB of stream (plus one per segment).
            assert!(log.read_inner().disk.index_entries() < 2_000_000 / (64 * 1024) + 40);
            let epoch = log.summary().epoch;
            assert!(read_all(&log, epoch, Position::new(123_457)).unwrap() == data[123_457..]);
        }
        let (log, _writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
        assert!(log.read_inner().disk.index_entries() < 2_000_000 / (64 * 1024) + 40, "after recovery too");
        let epoch = log.summary().epoch;
        assert!(read_all(&log, epoch, Position::new(999_999)).unwrap() == data[999_999..]);
    }

    #[tokio::test]
    async fn disk_reads_return_checked_bytes_and_never_serve_a_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
        writer.reset("g".repeat(40), Position::new(0)).unwrap();
        let data = pattern(200_000, 5);
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        let epoch = log.summary().epoch;
        async fn read_from(
            log: &ReplicationLog,
            epoch: u64,
            mut position: u64,
            until: u64,
        ) -> Result<Vec<u8>, ReadError> {
            let mut out = Vec::new();
            let start = position;
            while position < until {
                for chunk in log.read_async(epoch, Position::new(position), 10_000).await? {
                    position += chunk.len() as u64;
                    out.extend_from_slice(&chunk);
                }
            }
            out.truncate((until - start) as usize);
            Ok(out)
        }
        // Two cursors over the first half, one after the other.
        assert!(read_from(&log, epoch, 123, 100_000).await.unwrap() == data[123..100_000]);
        assert!(read_from(&log, epoch, 500, 100_000).await.unwrap() == data[500..100_000]);
        // Damage a record in the second half, which nobody has read yet: it is never served.
        let segment = disk::segment_paths(dir.path()).pop().unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&segment).unwrap();
        use std::os::unix::fs::FileExt;
        let at = file.metadata().unwrap().len() - 500;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 1], at).unwrap();
        let result = read_from(&log, epoch, 100_000, 200_000 - 4096).await;
        assert!(matches!(result, Err(ReadError::Corrupt(_))), "{result:?}");
    }

    #[tokio::test]
    async fn records_checked_once_are_sent_from_the_file_and_a_failing_disk_serves_nothing() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::fs::FaultyFs::new();
        let (log, mut writer, _) = ReplicationLog::open_with(dir.path(), options(1 << 30, 4096), fs.clone()).unwrap();
        writer.reset("h".repeat(40), Position::ZERO).unwrap();
        let data = pattern(300_000, 9);
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        let epoch = log.summary().epoch;
        // The first reader behind the memory tail reads the records into memory and checks them.
        let ToSend::Disk(parts) = log.read_next(epoch, Position::new(100), 50_000, true).await.unwrap() else {
            panic!("nothing was checked yet: the first read must go through memory");
        };
        let first = parts.concat();
        assert!(first.len() >= 50_000 && first[..] == data[100..100 + first.len()]);
        // A reader after it gets the same records as a file run, and the kernel sends them.
        let ToSend::File(run) = log.read_next(epoch, Position::new(2_500), 20_000, true).await.unwrap() else {
            panic!("records checked before: a file run");
        };
        let len = run.bytes() as usize;
        assert!(len >= 20_000, "{len}");
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let socket = Arc::new(std::os::fd::OwnedFd::from(ours));
        let (sent, stop) = log.send_file(socket.clone(), Arc::new(run.clone()), 0).await;
        assert!(stop.is_none() && sent as usize == len, "{sent} of {len}, {stop:?}");
        let mut received = vec![0u8; len];
        theirs.read_exact(&mut received).unwrap();
        assert!(received[..] == data[2_500..2_500 + len], "the file run holds the stream, headers left out");
        // A reader that cannot take files gets the same bytes read back.
        let ToSend::Disk(parts) = log.read_next(epoch, Position::new(2_500), 20_000, false).await.unwrap() else {
            panic!("a reader without files reads into memory");
        };
        assert!(parts.concat()[..] == data[2_500..2_500 + len]);
        // A failing disk: neither path serves a byte, and the error says what happened.
        fs.set(crate::fs::Fault::ReadIo, true);
        let (sent, stop) = log.send_file(socket, Arc::new(run), 0).await;
        assert!(sent == 0 && matches!(stop, Some(SendStop::File(_))), "{sent} {stop:?}");
        let result = log.read_next(epoch, Position::new(2_500), 20_000, false).await;
        assert!(matches!(result, Err(ReadError::Io(_))), "{:?}", result.err());
        assert!(matches!(log.read_next(epoch, Position::new(200_000), 20_000, true).await, Err(ReadError::Io(_))));
        fs.set(crate::fs::Fault::ReadIo, false);
        let ToSend::File(_) = log.read_next(epoch, Position::new(2_500), 20_000, true).await.unwrap() else {
            panic!("once the disk reads again, the checked records are sent from the file again");
        };
    }

    /// A cut inside the newest segment's last record is what a kill mid-append leaves (a torn tail);
    /// a whole record that fails its check, or damage in an older segment, is corruption.
    #[test]
    fn recovery_tells_a_torn_tail_from_corruption() {
        use std::os::unix::fs::FileExt;
        let write_log = |dir: &Path| {
            let (_log, mut writer, _) = ReplicationLog::open(dir, options(1 << 30, 4096)).unwrap();
            writer.reset("f".repeat(40), Position::new(0)).unwrap();
            for piece in pattern(200_000, 9).chunks(1000) {
                writer.append(Bytes::copy_from_slice(piece)).unwrap();
            }
        };
        let reopen = |dir: &Path| ReplicationLog::open(dir, options(1 << 30, 4096)).unwrap().2;

        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path());
        let segments = disk::segment_paths(dir.path());
        assert!(segments.len() >= 3, "{segments:?}");
        let newest = segments.last().unwrap();
        let len = std::fs::metadata(newest).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(newest).unwrap().set_len(len - 10).unwrap();
        let dropped = reopen(dir.path()).dropped.expect("the cut is reported");
        assert_eq!(dropped.kind, DropKind::TornTail, "{dropped:?}");
        assert_eq!(
            dropped.bytes,
            1000 + format::RECORD_HEADER_LEN as u64 - 10,
            "the part of the last record that was there"
        );
        assert!(reopen(dir.path()).dropped.is_none(), "the cut is made once");

        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path());
        let newest = disk::segment_paths(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&newest).unwrap().len();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&newest).unwrap();
        file.write_all_at(b"X", len - 1).unwrap();
        assert_eq!(reopen(dir.path()).dropped.map(|d| d.kind), Some(DropKind::Corrupt), "a whole record, bad");

        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path());
        let segments = disk::segment_paths(dir.path());
        let oldest = &segments[0];
        let len = std::fs::metadata(oldest).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(oldest).unwrap().set_len(len - 10).unwrap();
        let dropped = reopen(dir.path()).dropped.expect("the cut is reported");
        assert_eq!(dropped.kind, DropKind::Corrupt, "a torn record in an older segment: {dropped:?}");
        assert!(dropped.bytes > 1000, "the later segments are counted too: {dropped:?}");
    }

    /// Whatever byte the file is cut at, recovery yields a prefix of what was written, ending at a
    /// record boundary, and never a byte that was not written.
    #[test]
    fn random_truncation_recovers_a_prefix() {
        let mut rng = rand::rng();
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let data = pattern(rng.random_range(1000..200_000), round);
            let mut boundaries = vec![0usize];
            {
                let (_log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
                writer.reset("e".repeat(40), Position::new(0)).unwrap();
                let mut at = 0;
                while at < data.len() {
                    let n = rng.random_range(1..5000).min(data.len() - at);
                    writer.append(Bytes::copy_from_slice(&data[at..at + n])).unwrap();
                    at += n;
                    boundaries.push(at);
                }
            }
            let segments = disk::segment_paths(dir.path());
            let victim = &segments[rng.random_range(0..segments.len())];
            let len = std::fs::metadata(victim).unwrap().len();
            let cut = rng.random_range(0..len);
            let file = std::fs::OpenOptions::new().read(true).write(true).open(victim).unwrap();
            if round % 2 == 0 {
                file.set_len(cut).unwrap();
            } else {
                // Flip a byte instead of cutting: the damaged record and everything after it go.
                use std::os::unix::fs::FileExt;
                let mut byte = [0u8];
                file.read_exact_at(&mut byte, cut).unwrap();
                file.write_all_at(&[byte[0] ^ 0x5a], cut).unwrap();
            }
            drop(file);
            let (log, mut writer, _) = ReplicationLog::open(dir.path(), options(1 << 30, 4096)).unwrap();
            let s = log.summary();
            let recovered = read_all(&log, s.epoch, Position::ZERO).unwrap();
            assert!(
                boundaries.contains(&recovered.len()),
                "round {round}: {} is not a record boundary",
                recovered.len()
            );
            assert_eq!(recovered, data[..recovered.len()], "round {round}");
            // The recovered log accepts appends where it ended.
            writer.append(Bytes::from_static(b"more")).unwrap();
            assert_eq!(log.summary().end.get(), recovered.len() as u64 + 4);
        }
    }
}
