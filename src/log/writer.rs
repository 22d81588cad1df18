//! The log's one writer, on its own thread (as tikv/raft-engine drives its engine from its own
//! threads): it owns the [`SegmentStore`], so no disk syscall of the log's write path runs on a
//! runtime worker and no lock is held across one.
//!
//! The upstream link hands it whole commands over a bounded channel ([`WriterHandle`]): when the
//! disk is slow or failing the channel fills and the link stops reading from the master (TCP
//! backpressure) instead of holding the stream in memory. The thread appends, rotates, trims, fsyncs
//! by the `appendfsync` policy (`always`: once per batch of appends, before the durable offset
//! moves), then updates the readers' view and publishes `appended` (the log's tip) and `durable`
//! through `watch`. Under `everysec` a second thread, the syncer, fsyncs the active segment once a
//! second, as redis-server's background fsync does; it never delays appends.
//!
//! A failed write (a full disk, `EIO`, no descriptors) is logged at ERROR once per episode, counted
//! ([`WriteFaults`]: INFO `log_write_errors`, metric `redis_relay_log_write_errors_total{kind}`) and
//! retried with a backoff up to a second until it succeeds, the chunk kept: nothing appended before
//! it is lost, nothing after it is written out of order, and what readers see is only what was
//! written whole. A stopping relay ends the retries (the chunks left were never acknowledged).
//!
//! Known limit: after `EIO` from fsync, Linux may have dropped the dirty pages and a later fsync
//! then succeeds without them; the durable offset can then cover bytes the disk lost. Recovery's
//! record checksums still keep them from being served after a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::disk::{self, DiskError, SegmentStore};
use super::{FsyncPolicy, LogTip, Position, ReplIds, ReplicationLog};

/// Chunks the upstream may have in flight to the writer: the bound of the backpressure.
const CHANNEL_CHUNKS: usize = 64;
/// Appends handled before an `always` fsync and a view update at the latest (group commit).
const BATCH: usize = 64;
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// While a fault lasts, its ERROR line is repeated this often (the counter counts every attempt).
const REPEAT_ERROR_EVERY: Duration = Duration::from_secs(10);

/// The log writer has stopped (the relay is stopping, or the writer gave up a write at stop).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the replication log writer has stopped")]
pub struct WriterGone;

enum Command {
    Append(Bytes),
    Reset {
        replid: String,
        offset: Position,
        done: oneshot::Sender<()>,
    },
    ShiftReplid {
        replid: String,
        done: oneshot::Sender<()>,
    },
    /// Answered once every command before it is done (and, under `always`, fsynced).
    Barrier(oneshot::Sender<()>),
}

/// The upstream link's handle on the writer thread. Dropping it stops the thread once it has
/// written what it was given.
pub struct WriterHandle {
    commands: mpsc::Sender<Command>,
}

impl WriterHandle {
    /// Hands whole commands to the writer; waits while the channel is full (backpressure).
    pub async fn append(&self, bytes: Bytes) -> Result<(), WriterGone> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.commands.send(Command::Append(bytes)).await.map_err(|_| WriterGone)
    }

    /// Starts a new history at `offset` with `replid` (after a full sync): everything held is
    /// dropped. Returns once done.
    pub async fn reset(&self, replid: String, offset: Position) -> Result<(), WriterGone> {
        let (done, finished) = oneshot::channel();
        self.commands.send(Command::Reset { replid, offset, done }).await.map_err(|_| WriterGone)?;
        finished.await.map_err(|_| WriterGone)
    }

    /// The master continued our history under a new id (`+CONTINUE <newid>`). Returns once done.
    pub async fn shift_replid(&self, replid: String) -> Result<(), WriterGone> {
        let (done, finished) = oneshot::channel();
        self.commands.send(Command::ShiftReplid { replid, done }).await.map_err(|_| WriterGone)?;
        finished.await.map_err(|_| WriterGone)
    }

    /// Returns once everything handed over before is in the log (so its end is the next PSYNC's) and,
    /// under `always`, fsynced.
    pub async fn barrier(&self) -> Result<(), WriterGone> {
        let (done, finished) = oneshot::channel();
        self.commands.send(Command::Barrier(done)).await.map_err(|_| WriterGone)?;
        finished.await.map_err(|_| WriterGone)
    }
}

/// Write failures of the writer and the syncer, for INFO and metrics.
#[derive(Default)]
pub struct WriteFaults {
    counts: [AtomicU64; crate::fs::ERROR_KINDS.len()],
    writer_failing: AtomicBool,
    syncer_failing: AtomicBool,
    last_error: Mutex<String>,
}

/// What [`WriteFaults`] shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFaultReport {
    /// Failed attempts per kind ([`crate::fs::ERROR_KINDS`]).
    pub errors: Vec<(&'static str, u64)>,
    /// A write or fsync is failing right now (appends wait, or the durable offset stands still).
    pub failing: bool,
    pub last_error: String,
}

impl WriteFaultReport {
    pub fn total(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }
}

impl WriteFaults {
    fn record(&self, error: &DiskError) -> &'static str {
        let kind = match error {
            DiskError::Io { source, .. } => crate::fs::error_kind(source),
            _ => "other",
        };
        let index = crate::fs::ERROR_KINDS.iter().position(|k| *k == kind).unwrap_or(crate::fs::ERROR_KINDS.len() - 1);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = format!("{kind}: {error}");
        kind
    }

    pub fn report(&self) -> WriteFaultReport {
        WriteFaultReport {
            errors: crate::fs::ERROR_KINDS
                .iter()
                .zip(&self.counts)
                .map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
                .collect(),
            failing: self.writer_failing.load(Ordering::Relaxed) || self.syncer_failing.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// The log's writer: owns the segment store and is the only one to change the readers' view.
/// [`LogWriter::spawn`] runs it on its own thread; tests drive it directly.
pub struct LogWriter {
    log: Arc<ReplicationLog>,
    store: SegmentStore,
    ids: Option<ReplIds>,
    epoch: u64,
    start: u64,
    end: u64,
    /// Appended since the last fsync.
    unsynced: bool,
    /// Segment files retention dropped whose unlink failed, tried again after the next append.
    pending_removals: Vec<std::path::PathBuf>,
}

impl LogWriter {
    pub(super) fn new(log: Arc<ReplicationLog>, store: SegmentStore, end: u64) -> LogWriter {
        let (ids, epoch, start) = {
            let inner = log.read_inner();
            (inner.ids.clone(), inner.epoch, inner.start)
        };
        LogWriter { log, store, ids, epoch, start, end, unsynced: false, pending_removals: Vec::new() }
    }

    /// Appends whole commands: to disk, then to the readers' view (memory tail, bounds, index).
    /// Trims both tiers to their sizes. On an error nothing of `bytes` is in the log and the append
    /// can be tried again.
    pub fn append(&mut self, bytes: Bytes) -> Result<(), DiskError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let position = self.end;
        self.store.append(position, &bytes)?;
        self.end += bytes.len() as u64;
        self.unsynced = true;
        let options = self.log.options;
        let pinned = self.log.pinned.load(Ordering::Acquire);
        let policy = disk::TrimPolicy {
            retain: options.retention,
            max_size: options.max_size.max(options.retention),
            max_age: options.max_age,
            keep_position: (pinned != u64::MAX).then_some(pinned),
        };
        let (new_start, removed) = self.store.trim(&policy, self.end);
        if let Some(new_start) = new_start {
            self.start = new_start;
        }
        let tip = {
            let mut inner = self.log.write_inner();
            inner.end = self.end;
            inner.chunks.push_back((position, bytes));
            // Keep at least `memory` bytes in memory, dropping whole chunks from the front.
            while let Some(front_len) = inner.chunks.front().map(|(_, c)| c.len() as u64) {
                if inner.end - inner.memory_start - front_len < options.memory {
                    break;
                }
                inner.chunks.pop_front();
                inner.memory_start += front_len;
            }
            if let Some(new_start) = new_start {
                inner.start = new_start;
                inner.memory_start = inner.memory_start.max(new_start);
                while inner.chunks.front().is_some_and(|(p, _)| *p < new_start) {
                    inner.chunks.pop_front();
                }
            }
            inner.disk.sync_from(&self.store);
            inner.active_file = self.store.active_file();
            inner.pending_sync.extend(self.store.take_unsynced());
            if options.fsync == FsyncPolicy::No {
                self.log.durable.send_replace(Position::new(self.end));
            }
            LogTip { epoch: inner.epoch, end: Position::new(self.end) }
        };
        self.log.tip.send_replace(tip);
        // Readers no longer plan reads of the dropped segments: their files can go.
        self.pending_removals.extend(removed);
        let (left, error) = self.store.remove(std::mem::take(&mut self.pending_removals));
        self.pending_removals = left;
        if let Some(error) = error {
            self.log.faults.record(&error);
            tracing::error!(
                "could not delete a segment retention dropped (tried again after the next append): {error}"
            );
        }
        Ok(())
    }

    /// Fsyncs what was appended; the durable offset then covers it.
    pub fn sync(&mut self) -> Result<(), DiskError> {
        self.store.sync()?;
        self.unsynced = false;
        let _inner = self.log.read_inner();
        let end = Position::new(self.end);
        self.log.durable.send_if_modified(|durable| {
            let moved = *durable < end;
            *durable = (*durable).max(end);
            moved
        });
        Ok(())
    }

    /// Starts a new history at `offset` with `replid` (after a full sync): everything held is
    /// dropped, on disk first (no lock held), then in the view.
    pub fn reset(&mut self, replid: String, at: Position) -> Result<(), DiskError> {
        let offset = at.get();
        let ids = ReplIds::new(replid);
        self.store.reset(&ReplicationLog::history(&ids, offset))?;
        self.ids = Some(ids.clone());
        self.epoch += 1;
        self.start = offset;
        self.end = offset;
        self.unsynced = false;
        let tip = {
            let mut inner = self.log.write_inner();
            inner.ids = Some(ids);
            inner.epoch = self.epoch;
            inner.start = offset;
            inner.end = offset;
            inner.memory_start = offset;
            inner.chunks.clear();
            inner.disk.clear();
            inner.active_file = None;
            inner.pending_sync.clear();
            // Under the view's lock: the syncer never moves it on for the old history after this.
            self.log.durable.send_replace(at);
            LogTip { epoch: self.epoch, end: at }
        };
        self.log.tip.send_replace(tip);
        Ok(())
    }

    /// The master continued our history under a new id (`+CONTINUE <newid>`): the old id stays valid
    /// up to the current offset, like `shiftReplicationId`.
    pub fn shift_replid(&mut self, new_replid: String) -> Result<(), DiskError> {
        let ids = match &self.ids {
            Some(old) => {
                let valid_through = Some(Position::new(self.end));
                ReplIds {
                    replid: new_replid,
                    replid2: old.replid.clone(),
                    second_repl_offset: Position::second_repl_offset(valid_through),
                }
            }
            None => ReplIds::new(new_replid),
        };
        self.store.write_history(&ReplicationLog::history(&ids, self.start))?;
        self.ids = Some(ids.clone());
        self.epoch += 1;
        let tip = {
            let mut inner = self.log.write_inner();
            inner.ids = Some(ids);
            inner.epoch = self.epoch;
            LogTip { epoch: self.epoch, end: Position::new(self.end) }
        };
        self.log.tip.send_replace(tip);
        Ok(())
    }

    /// Prepares the next segment's file ahead of time (see [`SegmentStore::prepare_spare`]).
    pub fn prepare_spare(&mut self) -> Result<(), DiskError> {
        self.store.prepare_spare()
    }

    /// Runs the writer on its own thread (and, under `everysec`, the syncer on another).
    pub fn spawn(self) -> std::io::Result<WriterHandle> {
        let (commands, receiver) = mpsc::channel(CHANNEL_CHUNKS);
        // The relay's span (`relay=` on every line) follows the writer onto its thread.
        let span = tracing::Span::current();
        std::thread::Builder::new().name("log-writer".into()).spawn(move || span.in_scope(|| self.run(receiver)))?;
        Ok(WriterHandle { commands })
    }

    fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let log = self.log.clone();
        let syncer = (log.options.fsync == FsyncPolicy::EverySec).then(|| Syncer::spawn(log.clone()));
        if let Err(error) = self.prepare_spare() {
            log.faults.record(&error);
            tracing::error!("replication log: cannot create the next segment ahead of time: {error}");
        }
        'commands: while let Some(first) = commands.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            // Barriers are answered once the batch is done, its `always` fsync included.
            let mut barriers = Vec::new();
            for command in batch {
                match command {
                    Command::Barrier(done) => barriers.push(done),
                    command => {
                        if !self.execute(command, &commands) {
                            break 'commands;
                        }
                    }
                }
            }
            if log.options.fsync == FsyncPolicy::Always
                && self.unsynced
                && self.retry("fsync of the replication log", &commands, |w| w.sync()).is_none()
            {
                break;
            }
            if let Err(error) = self.prepare_spare() {
                log.faults.record(&error);
                tracing::error!(
                    "replication log: cannot create the next segment ahead of time (tried again after the \
                     next append): {error}"
                );
            }
            for done in barriers {
                let _ = done.send(());
            }
        }
        if let Some(syncer) = syncer {
            syncer.stop();
            // A graceful stop leaves everything appended on stable storage.
            if let Err(error) = log.sync_view() {
                log.faults.record(&error);
                tracing::error!("final fsync of the replication log failed: {error}");
            }
        }
        drop(self);
        log.writer_stopped.send_replace(true);
    }

    /// Runs one command, retrying its disk work until it succeeds; false when it gave up because the
    /// relay is stopping.
    fn execute(&mut self, command: Command, commands: &mpsc::Receiver<Command>) -> bool {
        match command {
            Command::Append(bytes) => {
                self.retry("append to the replication log", commands, |w| w.append(bytes.clone())).is_some()
            }
            Command::Reset { replid, offset, done } => {
                let result = self.retry("reset of the replication log", commands, |w| w.reset(replid.clone(), offset));
                let _ = done.send(());
                result.is_some()
            }
            Command::ShiftReplid { replid, done } => {
                let result =
                    self.retry("history update of the replication log", commands, |w| w.shift_replid(replid.clone()));
                let _ = done.send(());
                result.is_some()
            }
            Command::Barrier(done) => {
                let _ = done.send(());
                true
            }
        }
    }

    /// Tries `operation` until it succeeds, backing off up to a second; `None` when the relay stops
    /// meanwhile (the channel's senders are gone).
    fn retry(
        &mut self,
        what: &str,
        commands: &mpsc::Receiver<Command>,
        mut operation: impl FnMut(&mut LogWriter) -> Result<(), DiskError>,
    ) -> Option<()> {
        let faults = &self.log.clone().faults;
        let mut backoff = Duration::from_millis(10);
        let mut failing_since: Option<Instant> = None;
        let mut last_logged = Instant::now();
        loop {
            match operation(self) {
                Ok(()) => {
                    if let Some(since) = failing_since {
                        faults.writer_failing.store(false, Ordering::Relaxed);
                        tracing::warn!(
                            seconds = since.elapsed().as_secs_f64(),
                            "{what} succeeded again: the log writer resumes"
                        );
                    }
                    return Some(());
                }
                Err(error) => {
                    let kind = faults.record(&error);
                    if failing_since.is_none() || last_logged.elapsed() >= REPEAT_ERROR_EVERY {
                        last_logged = Instant::now();
                        tracing::error!(
                            kind,
                            offset = self.end,
                            "{what} failed, retrying (the upstream link waits meanwhile): {error}"
                        );
                    }
                    failing_since.get_or_insert_with(Instant::now);
                    faults.writer_failing.store(true, Ordering::Relaxed);
                    if commands.is_closed() {
                        tracing::error!("{what} abandoned: the relay is stopping (nothing of it was acknowledged)");
                        faults.writer_failing.store(false, Ordering::Relaxed);
                        return None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The `everysec` syncer: fsyncs the active segment once a second, off the writer's thread so a slow
/// fsync never delays appends.
struct Syncer {
    stop: std::sync::mpsc::Sender<()>,
}

impl Syncer {
    fn spawn(log: Arc<ReplicationLog>) -> Syncer {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new().name("log-syncer".into()).spawn(move || {
            let _entered = span.enter();
            let mut failing = false;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1)) {
                match log.sync_view() {
                    Ok(()) if failing => {
                        failing = false;
                        log.faults.syncer_failing.store(false, Ordering::Relaxed);
                        tracing::warn!("fsync of the replication log succeeded again");
                    }
                    Ok(()) => {}
                    Err(error) => {
                        let kind = log.faults.record(&error);
                        if !failing {
                            tracing::error!(
                                kind,
                                "fsync of the replication log failed (the durable offset stands still): {error}"
                            );
                        }
                        failing = true;
                        log.faults.syncer_failing.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        if let Err(error) = spawned {
            tracing::error!("cannot start the replication log's syncer thread: {error}");
        }
        Syncer { stop }
    }

    /// Signals the syncer to end; does not wait (a stalled fsync must not hold the stop).
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

impl ReplicationLog {
    /// Fsyncs the segments rotations finished, the directory and the active segment as the view
    /// shows them, then moves the durable offset to what the view held before (the `everysec` syncer).
    pub(super) fn sync_view(&self) -> Result<(), DiskError> {
        let (pending, file, end, epoch) = {
            let mut inner = self.write_inner();
            (std::mem::take(&mut inner.pending_sync), inner.active_file.clone(), inner.end, inner.epoch)
        };
        for (i, finished) in pending.iter().enumerate() {
            if let Err(source) = self.fs.sync_all(finished) {
                // Tried again next time, before anything newer counts as durable.
                let mut inner = self.write_inner();
                if inner.epoch == epoch {
                    inner.pending_sync.splice(0..0, pending[i..].iter().cloned());
                }
                return Err(DiskError::Io { path: "log segment".into(), source });
            }
        }
        if let Some(file) = file {
            self.fs.sync_data(&file).map_err(|source| DiskError::Io { path: "log segment".into(), source })?;
        }
        // A reset meanwhile started a new history (possibly at a lower offset): what was synced
        // belongs to the old one and says nothing about the new.
        let inner = self.read_inner();
        if inner.epoch == epoch {
            let end = Position::new(end);
            self.durable.send_if_modified(|durable| {
                let moved = *durable < end;
                *durable = (*durable).max(end);
                moved
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogOptions, ReadError};

    pub(crate) fn options(fsync: FsyncPolicy) -> LogOptions {
        LogOptions {
            retention: 1 << 30,
            max_size: 1 << 30,
            memory: 64 * 1024,
            segment_size: 64 * 1024,
            max_age: None,
            fsync,
        }
    }

    pub(crate) async fn read_all(log: &ReplicationLog, mut position: u64) -> Result<Vec<u8>, ReadError> {
        let epoch = log.summary().epoch;
        let end = log.summary().end.get();
        let mut out = Vec::new();
        while position < end {
            for chunk in log.read_async(epoch, Position::new(position), 1 << 20).await? {
                position += chunk.len() as u64;
                out.extend_from_slice(&chunk);
            }
        }
        Ok(out)
    }

    pub(crate) fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| ((i.wrapping_mul(17) ^ seed) % 253) as u8).collect()
    }

    #[tokio::test]
    async fn the_writer_thread_appends_publishes_and_fsyncs_by_policy() {
        for policy in [FsyncPolicy::Always, FsyncPolicy::EverySec, FsyncPolicy::No] {
            let dir = tempfile::tempdir().unwrap();
            let (log, writer, _) = ReplicationLog::open(dir.path(), options(policy)).unwrap();
            let writer = writer.spawn().unwrap();
            let mut tip = log.subscribe();
            let mut durable = log.subscribe_durable();
            writer.reset("w".repeat(40), Position::new(10)).await.unwrap();
            let data = pattern(500_000, 3);
            for piece in data.chunks(3000) {
                writer.append(Bytes::copy_from_slice(piece)).await.unwrap();
            }
            writer.barrier().await.unwrap();
            let end = 10 + data.len() as u64;
            assert_eq!(tip.borrow_and_update().end.get(), end, "{policy:?}: appended is published");
            // `everysec` moves the durable offset within about a second, the others at once.
            let reached =
                tokio::time::timeout(Duration::from_secs(10), durable.wait_for(|d| d.get() == end)).await.is_ok();
            assert!(reached, "{policy:?}: durable reaches the end");
            assert_eq!(read_all(&log, 10).await.unwrap(), data, "{policy:?}");
            assert!(dir.path().join(disk::SPARE_FILE).exists(), "the next segment is ready ahead of time");
            drop(writer);
            tokio::time::timeout(Duration::from_secs(10), log.writer_stopped()).await.expect("the writer ends");
            let (reopened, _, recovery) = ReplicationLog::open(dir.path(), options(policy)).unwrap();
            assert!(recovery.dropped.is_none());
            assert_eq!(reopened.summary().end.get(), end, "{policy:?}: the directory is unlocked and whole");
        }
    }

    #[tokio::test]
    async fn a_full_channel_makes_the_sender_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, writer, _) = ReplicationLog::open(dir.path(), options(FsyncPolicy::No)).unwrap();
        // Not spawned: nobody drains the channel.
        let (commands, _receiver) = mpsc::channel(CHANNEL_CHUNKS);
        let handle = WriterHandle { commands };
        drop(writer);
        for _ in 0..CHANNEL_CHUNKS {
            handle.append(Bytes::from_static(b"x")).await.unwrap();
        }
        let blocked = tokio::time::timeout(Duration::from_millis(200), handle.append(Bytes::from_static(b"y"))).await;
        assert!(blocked.is_err(), "the 65th chunk waits for room");
    }

    use crate::fs::{Fault, FaultyFs};

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn errors_of(log: &ReplicationLog, kind: &str) -> u64 {
        log.write_faults().errors.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n).unwrap_or(0)
    }

    async fn started(
        fs: &Arc<FaultyFs>,
        options: LogOptions,
    ) -> (tempfile::TempDir, Arc<ReplicationLog>, WriterHandle) {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer, _) = ReplicationLog::open_with(dir.path(), options, fs.clone()).unwrap();
        let writer = writer.spawn().unwrap();
        writer.reset("f".repeat(40), Position::new(0)).await.unwrap();
        (dir, log, writer)
    }

    async fn append_all(writer: &WriterHandle, data: &[u8]) {
        for piece in data.chunks(1000) {
            writer.append(Bytes::copy_from_slice(piece)).await.unwrap();
        }
    }

    /// Feeds `data` from a task, which returns the handle once all of it is handed over.
    fn feed(writer: WriterHandle, data: Vec<u8>) -> tokio::task::JoinHandle<WriterHandle> {
        tokio::spawn(async move {
            append_all(&writer, &data).await;
            writer
        })
    }

    async fn stop_and_reopen(
        dir: &tempfile::TempDir,
        log: Arc<ReplicationLog>,
        writer: WriterHandle,
        options: LogOptions,
    ) -> u64 {
        drop(writer);
        tokio::time::timeout(Duration::from_secs(20), log.writer_stopped()).await.expect("the writer ends");
        let (reopened, _, recovery) = ReplicationLog::open(dir.path(), options).unwrap();
        assert!(recovery.dropped.is_none(), "{:?}", recovery.dropped);
        reopened.summary().end.get()
    }

    #[tokio::test]
    async fn a_full_disk_stops_appends_and_the_sender_then_resumes_without_a_loss() {
        let fs = FaultyFs::new();
        // A small memory tail: most reads go to the disk records.
        let opts = LogOptions { memory: 4096, ..options(FsyncPolicy::No) };
        let (dir, log, writer) = started(&fs, opts).await;
        let data = pattern(400_000, 1);
        append_all(&writer, &data[..200_000]).await;
        writer.barrier().await.unwrap();
        fs.set(Fault::NoSpace, true);
        let feeder = feed(writer, data[200_000..].to_vec());
        wait_until("the writer fails and has retried", || log.write_faults().failing && fs.injected() >= 3).await;
        // 200 chunks, a channel of 64 and a writer stuck on its first: the sender waits.
        assert!(!feeder.is_finished(), "the upstream side is held back");
        assert_eq!(log.summary().end.get(), 200_000, "nothing is published that was not written whole");
        assert!(read_all(&log, 0).await.unwrap() == data[..200_000], "readers get exactly what was written");
        assert!(errors_of(&log, "enospc") >= 3);
        assert!(log.write_faults().last_error.starts_with("enospc"), "{}", log.write_faults().last_error);
        fs.set(Fault::NoSpace, false);
        let writer = tokio::time::timeout(Duration::from_secs(20), feeder).await.expect("the sender resumes").unwrap();
        writer.barrier().await.unwrap();
        assert_eq!(log.summary().end.get(), 400_000);
        assert!(!log.write_faults().failing);
        assert!(read_all(&log, 0).await.unwrap() == data, "nothing lost, nothing doubled");
        assert_eq!(stop_and_reopen(&dir, log, writer, opts).await, 400_000, "the half-written record was cut back");
    }

    #[tokio::test]
    async fn eio_on_fsync_holds_the_durable_offset_and_appends_until_an_fsync_succeeds() {
        let fs = FaultyFs::new();
        let opts = options(FsyncPolicy::Always);
        let (dir, log, writer) = started(&fs, opts).await;
        let data = pattern(300_000, 2);
        append_all(&writer, &data[..100_000]).await;
        writer.barrier().await.unwrap();
        assert_eq!(log.durable_offset().get(), 100_000);
        fs.set(Fault::SyncIo, true);
        let feeder = feed(writer, data[100_000..].to_vec());
        wait_until("the fsync fails and is retried", || log.write_faults().failing && errors_of(&log, "eio") >= 3)
            .await;
        assert_eq!(log.durable_offset().get(), 100_000, "the durable offset (what the ACK covers) stands still");
        assert!(!feeder.is_finished(), "appends wait for the fsync under appendfsync always");
        let end = log.summary().end.get();
        assert!(read_all(&log, 0).await.unwrap() == data[..end as usize], "what readers get was written whole");
        fs.set(Fault::SyncIo, false);
        let writer = tokio::time::timeout(Duration::from_secs(20), feeder).await.expect("the sender resumes").unwrap();
        writer.barrier().await.unwrap();
        let mut durable = log.subscribe_durable();
        let reached =
            tokio::time::timeout(Duration::from_secs(20), durable.wait_for(|d| d.get() == 300_000)).await.is_ok();
        assert!(reached, "durable catches up once fsync works");
        assert!(!log.write_faults().failing);
        assert_eq!(stop_and_reopen(&dir, log, writer, opts).await, 300_000);
    }

    #[tokio::test]
    async fn under_everysec_a_failing_or_stalled_fsync_never_delays_appends() {
        for fault in [Fault::SyncIo, Fault::StalledSync] {
            let fs = FaultyFs::new();
            let opts = options(FsyncPolicy::EverySec);
            let (dir, log, writer) = started(&fs, opts).await;
            let data = pattern(300_000, 3);
            append_all(&writer, &data[..100_000]).await;
            writer.barrier().await.unwrap();
            wait_until("the first fsync", || log.durable_offset().get() == 100_000).await;
            fs.set(fault, true);
            wait_until("the fsync fails or stalls", || fs.injected() >= 1).await;
            // Far more than the channel holds: appends go on while fsync is failing or stalled.
            append_all(&writer, &data[100_000..]).await;
            writer.barrier().await.unwrap();
            assert_eq!(log.summary().end.get(), 300_000, "{fault:?}");
            assert!(read_all(&log, 0).await.unwrap() == data, "{fault:?}");
            assert!(log.durable_offset().get() <= 100_000, "{fault:?}: nothing new is durable");
            if fault == Fault::SyncIo {
                wait_until("the fault is reported", || log.write_faults().failing).await;
            }
            fs.set(fault, false);
            wait_until("durable catches up", || log.durable_offset().get() == 300_000).await;
            wait_until("the fault is over", || !log.write_faults().failing).await;
            assert_eq!(stop_and_reopen(&dir, log, writer, opts).await, 300_000);
        }
    }

    #[tokio::test]
    async fn a_stalled_fsync_under_always_never_blocks_readers() {
        let fs = FaultyFs::new();
        let opts = LogOptions { memory: 1 << 20, ..options(FsyncPolicy::Always) };
        let (dir, log, writer) = started(&fs, opts).await;
        let data = pattern(200_000, 4);
        append_all(&writer, &data[..100_000]).await;
        writer.barrier().await.unwrap();
        fs.set(Fault::StalledSync, true);
        writer.append(Bytes::copy_from_slice(&data[100_000..101_000])).await.unwrap();
        wait_until("the writer's fsync stalls", || fs.stalled_syncs() == 1).await;
        // The writer is inside fsync: readers and INFO are answered at once (no lock across it).
        let summary = tokio::time::timeout(Duration::from_secs(2), async { log.summary() }).await.unwrap();
        assert_eq!(summary.end.get(), 101_000);
        assert_eq!(summary.durable.get(), 100_000);
        let read = tokio::time::timeout(Duration::from_secs(2), read_all(&log, 0)).await.expect("reads are not held");
        assert!(read.unwrap() == data[..101_000]);
        let feeder = feed(writer, data[101_000..].to_vec());
        wait_until("the sender waits", || fs.injected() >= 1 && !feeder.is_finished()).await;
        fs.set(Fault::StalledSync, false);
        let writer = tokio::time::timeout(Duration::from_secs(20), feeder).await.expect("the sender resumes").unwrap();
        writer.barrier().await.unwrap();
        wait_until("durable reaches the end", || log.durable_offset().get() == 200_000).await;
        assert_eq!(stop_and_reopen(&dir, log, writer, opts).await, 200_000);
    }

    #[tokio::test]
    async fn out_of_descriptors_the_log_rotates_into_the_segment_opened_ahead() {
        let fs = FaultyFs::new();
        let opts = options(FsyncPolicy::No);
        let (dir, log, writer) = started(&fs, opts).await;
        let data = pattern(300_000, 5);
        append_all(&writer, &data[..10_000]).await;
        writer.barrier().await.unwrap();
        assert!(dir.path().join(disk::SPARE_FILE).exists());
        fs.set(Fault::NoDescriptors, true);
        // Past the 64 KiB segment: one rotation, into the spare; no new descriptor needed.
        append_all(&writer, &data[10_000..100_000]).await;
        writer.barrier().await.unwrap();
        assert_eq!(log.summary().end.get(), 100_000, "the log went on across the rotation");
        assert_eq!(disk::segment_paths(dir.path()).len(), 2);
        wait_until("the failed spare is counted", || errors_of(&log, "emfile") >= 1).await;
        // The next rotation has no spare: it waits for a descriptor.
        let feeder = feed(writer, data[100_000..].to_vec());
        wait_until("the rotation fails", || log.write_faults().failing).await;
        assert!(log.summary().end.get() < 300_000);
        fs.set(Fault::NoDescriptors, false);
        let writer = tokio::time::timeout(Duration::from_secs(20), feeder).await.expect("the sender resumes").unwrap();
        writer.barrier().await.unwrap();
        assert!(read_all(&log, 0).await.unwrap() == data);
        assert_eq!(stop_and_reopen(&dir, log, writer, opts).await, 300_000);
    }
}
