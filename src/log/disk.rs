//! The log's disk tier: segment files under `<dir>/log/`, one writer, positioned reads for cursors,
//! and recovery that scans every record and truncates at the first one that fails its check.
//!
//! [`SegmentStore`] is owned by the log writer's thread (no lock around it); readers plan their reads
//! on a [`DiskIndex`], the copy of the segments' bounds and index the writer publishes after each
//! write. Every file operation goes through the [`FileSystem`](crate::fs::FileSystem) seam.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::verified::{FileId, FileRun};
use crate::fs::SharedFs;

use bytes::Bytes;

use super::format::{
    self, decode_record_header, decode_segment_header, encode_record_header, encode_segment_header, verify_record,
    FormatError, HistoryMeta, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};

const HISTORY_FILE: &str = "history.meta";
const LOCK_FILE: &str = "LOCK";
/// The next segment, created ahead of time (so a rotation needs no new descriptor) and renamed to
/// its real name when the log rotates into it.
pub(crate) const SPARE_FILE: &str = "segment.next";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} is locked by another redis-relay process (each relay needs its own --dir)")]
    Locked(PathBuf),
    #[error("{path}: unreadable history metadata: {reason}")]
    BadHistory { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io { path: path.to_path_buf(), source }
}

/// Index points are kept at least this far apart in the stream: the in-memory index of a log is
/// bounded by its size / this (16k entries per GiB), however small its records are.
const INDEX_SPACING: u64 = 64 * 1024;

/// A record start: where a read may begin.
#[derive(Debug, Clone, Copy)]
struct IndexPoint {
    position: u64,
    file_offset: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    end: u64,
    path: PathBuf,
    /// Sparse: the first record, then the first record at least [`INDEX_SPACING`] after the last point.
    index: Vec<IndexPoint>,
    /// Bytes of the file that hold good records.
    file_len: u64,
    /// When the newest byte was written (the file's mtime after a restart), for retention by age.
    last_write: SystemTime,
}

impl Segment {
    fn note_record(&mut self, position: u64, file_offset: u64, len: usize) {
        if self.index.last().is_none_or(|last| position - last.position >= INDEX_SPACING) {
            self.index.push(IndexPoint { position, file_offset });
        }
        self.end = position + len as u64;
        self.file_len = file_offset + (RECORD_HEADER_LEN + len) as u64;
    }
}

/// What retention keeps: see [`SegmentStore::trim`].
#[derive(Debug, Clone, Copy)]
pub struct TrimPolicy {
    pub retain: u64,
    pub max_size: u64,
    pub max_age: Option<Duration>,
    pub keep_position: Option<u64>,
}

/// A disk read: a run of whole records in one segment file, starting at an index point.
#[derive(Debug, Clone)]
pub struct DiskRange {
    path: PathBuf,
    file_offset: u64,
    /// The stream position before the run's first record.
    position: u64,
    len: u64,
}

/// What recovery found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    pub history: Option<HistoryMeta>,
    pub start: u64,
    pub end: u64,
    pub segments: usize,
    /// What was cut, when something was.
    pub dropped: Option<Dropped>,
}

/// Data recovery cut from the log.
#[derive(Debug, Clone)]
pub struct Dropped {
    pub kind: DropKind,
    /// Bytes of segment files past the last good record (the cut record and everything after it).
    pub bytes: u64,
    pub reason: String,
}

/// Why recovery cut the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    /// The newest segment ends inside a record (or inside its own header): the relay stopped in the
    /// middle of an append. Legal after a kill: that record was never served nor acknowledged, since
    /// the log publishes a record only after its write returned.
    TornTail,
    /// A record that is whole but fails its check, or segments that do not continue the log.
    Corrupt,
}

impl DropKind {
    /// The name `INFO` shows.
    pub fn name(self) -> &'static str {
        match self {
            DropKind::TornTail => "torn_tail",
            DropKind::Corrupt => "corrupt",
        }
    }
}

/// The segment files of one log. Owned by the log writer's thread: one writer, no lock.
pub struct SegmentStore {
    dir: PathBuf,
    fs: SharedFs,
    segments: Vec<Segment>,
    active: Option<(Arc<File>, u64)>,
    /// The next segment's file, created ahead of time ([`SPARE_FILE`]).
    spare: Option<File>,
    /// A segment file was created or renamed and the directory not yet fsynced since.
    dir_unsynced: bool,
    /// The directory, open for its fsyncs (so they need no new descriptor).
    dir_handle: Arc<File>,
    /// Whether a rotation fsyncs the finished segment and the directory itself (`always`, `no`), or
    /// leaves them to the `everysec` syncer ([`Self::take_unsynced`]) so a slow fsync never holds
    /// an append.
    sync_on_rotate: bool,
    /// Finished segments (and the directory) a rotation left for the syncer.
    unsynced: Vec<Arc<File>>,
    segment_size: u64,
    _lock: File,
}

impl SegmentStore {
    /// Locks `dir`, then recovers: every record is read and checked; the log ends at the last good one.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        sync_on_rotate: bool,
        fs: SharedFs,
    ) -> Result<(SegmentStore, Recovery), DiskError> {
        fs.create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(DiskError::Locked(dir.to_path_buf()));
        }
        let dir_handle = Arc::new(fs.open_read(dir).map_err(io_err(dir))?);
        let mut store = SegmentStore {
            dir_handle,
            sync_on_rotate,
            unsynced: Vec::new(),
            dir: dir.to_path_buf(),
            fs,
            segments: Vec::new(),
            active: None,
            spare: None,
            dir_unsynced: false,
            segment_size,
            _lock: lock,
        };
        let recovery = store.recover()?;
        Ok((store, recovery))
    }

    pub fn fs(&self) -> &SharedFs {
        &self.fs
    }

    fn remove_if_present(&self, path: &Path) -> Result<(), DiskError> {
        match self.fs.remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(DiskError::Io { path: path.to_path_buf(), source: e })
            }
            _ => Ok(()),
        }
    }

    fn history_path(&self) -> PathBuf {
        self.dir.join(HISTORY_FILE)
    }

    fn read_history(&self) -> Result<Option<HistoryMeta>, DiskError> {
        let path = self.history_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_yaml_ng::from_str(&text)
                .map(Some)
                .map_err(|e| DiskError::BadHistory { path, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DiskError::Io { path, source: e }),
        }
    }

    /// Persists the history atomically (temp file, fsync, rename, fsync the directory).
    pub fn write_history(&self, history: &HistoryMeta) -> Result<(), DiskError> {
        let path = self.history_path();
        let temp = self.dir.join(format!("{HISTORY_FILE}.tmp"));
        let text = serde_yaml_ng::to_string(history)
            .map_err(|e| DiskError::BadHistory { path: path.clone(), reason: e.to_string() })?;
        let file = self.fs.create(&temp).map_err(io_err(&temp))?;
        self.fs.write_all(&file, text.as_bytes()).map_err(io_err(&temp))?;
        self.fs.sync_all(&file).map_err(io_err(&temp))?;
        drop(file);
        self.fs.rename(&temp, &path).map_err(io_err(&path))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), DiskError> {
        self.fs.sync_all(&self.dir_handle).map_err(io_err(&self.dir))
    }

    fn segment_files(&self) -> Result<Vec<(u64, PathBuf)>, DiskError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if let Some(start) = entry.file_name().to_str().and_then(format::parse_segment_file_name) {
                files.push((start, entry.path()));
            }
        }
        files.sort();
        Ok(files)
    }

    fn recover(&mut self) -> Result<Recovery, DiskError> {
        let history = self.read_history()?;
        let files = self.segment_files()?;
        self.remove_if_present(&self.dir.join(SPARE_FILE))?;
        let Some(history) = history else {
            for (_, path) in files {
                self.fs.remove_file(&path).map_err(io_err(&path))?;
            }
            return Ok(Recovery::default());
        };
        let mut recovery =
            Recovery { history: Some(history.clone()), start: history.start, end: history.start, ..Default::default() };
        let mut broken = false;
        let count = files.len();
        for (i, (start, path)) in files.into_iter().enumerate() {
            let newest = i + 1 == count;
            if broken || start < history.start || (!self.segments.is_empty() && start != recovery.end) {
                if !broken && start >= history.start {
                    let reason = format!("segment {} does not continue the log", path.display());
                    recovery.dropped.get_or_insert(Dropped { kind: DropKind::Corrupt, bytes: 0, reason });
                }
                if let Some(dropped) = recovery.dropped.as_mut() {
                    dropped.bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                }
                self.fs.remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let (segment, failure) = scan_segment(&*self.fs, &path, start)?;
            if let Some(failure) = failure {
                let file_len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
                let kind = if newest && failure.torn { DropKind::TornTail } else { DropKind::Corrupt };
                let reason = format!("{}: {}", path.display(), failure.reason);
                recovery.dropped = Some(Dropped { kind, bytes: file_len.saturating_sub(failure.good_len), reason });
                broken = true;
                if !failure.header_ok {
                    self.fs.remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                // Keep the good records; cut the torn or corrupt rest.
                let file = self.fs.open_rw(&path).map_err(io_err(&path))?;
                self.fs.set_len(&file, failure.good_len).map_err(io_err(&path))?;
                self.fs.sync_all(&file).map_err(io_err(&path))?;
            }
            if self.segments.is_empty() {
                recovery.start = segment.start;
            }
            recovery.end = segment.end;
            self.segments.push(segment);
        }
        recovery.segments = self.segments.len();
        if let Some(last) = self.segments.last() {
            let file = self.fs.open_rw(&last.path).map_err(io_err(&last.path))?;
            let len = file.metadata().map_err(io_err(&last.path))?.len();
            self.active = Some((Arc::new(file), len));
        }
        Ok(recovery)
    }

    /// Starts a new history at `start`: every segment is deleted. Safe to repeat after a failure
    /// part way (a segment already gone is skipped).
    pub fn reset(&mut self, history: &HistoryMeta) -> Result<(), DiskError> {
        self.active = None;
        while let Some(segment) = self.segments.last() {
            self.remove_if_present(&segment.path)?;
            self.segments.pop();
        }
        for (_, path) in self.segment_files()? {
            self.remove_if_present(&path)?;
        }
        self.write_history(history)
    }

    /// Creates the next segment's file ahead of time, so that the rotation into it needs no new
    /// descriptor (a process out of descriptors keeps its log going). Does nothing when one is ready.
    pub fn prepare_spare(&mut self) -> Result<(), DiskError> {
        if self.spare.is_none() {
            let path = self.dir.join(SPARE_FILE);
            // Not made durable in the directory: only its rename to a segment's name needs to be.
            self.spare = Some(self.fs.create(&path).map_err(io_err(&path))?);
        }
        Ok(())
    }

    /// Starts the segment at `start`: the finished one is fsynced first (it is durable before any
    /// byte after it is written), then the spare file gets the segment header and its real name.
    /// A failure leaves the store as it was, so the append can be tried again.
    fn rotate(&mut self, start: u64) -> Result<(), DiskError> {
        if let (Some((file, _)), Some(last)) = (&self.active, self.segments.last()) {
            if self.sync_on_rotate {
                self.fs.sync_data(file).map_err(io_err(&last.path))?;
            }
        }
        self.prepare_spare()?;
        let spare_path = self.dir.join(SPARE_FILE);
        let Some(file) = self.spare.as_ref() else {
            return Err(DiskError::Io { path: spare_path, source: std::io::ErrorKind::NotFound.into() });
        };
        let header = encode_segment_header(start);
        write_record_at(&*self.fs, file, &header, &[], 0).map_err(io_err(&spare_path))?;
        let path = self.dir.join(format::segment_file_name(start));
        self.fs.rename(&spare_path, &path).map_err(io_err(&path))?;
        if self.sync_on_rotate {
            self.dir_unsynced = true;
        } else {
            if let Some((finished, _)) = self.active.take() {
                self.unsynced.push(finished);
            }
            if !self.unsynced.iter().any(|f| Arc::ptr_eq(f, &self.dir_handle)) {
                self.unsynced.push(self.dir_handle.clone());
            }
        }
        let file = self.spare.take().map(Arc::new);
        self.active = file.map(|file| (file, SEGMENT_HEADER_LEN as u64));
        self.segments.push(Segment {
            start,
            end: start,
            path,
            index: Vec::new(),
            file_len: SEGMENT_HEADER_LEN as u64,
            last_write: SystemTime::now(),
        });
        Ok(())
    }

    /// Appends `payload`, which starts at stream `position` (the end of the log). On failure nothing
    /// of it counts: the file is cut back to where the record started (best effort: a kill before
    /// the cut leaves a torn tail, which recovery drops) and the append can be tried again.
    pub fn append(&mut self, position: u64, payload: &[u8]) -> Result<(), DiskError> {
        let rotate = match (&self.active, self.segments.last()) {
            // A segment stays within its size (unless one record alone is larger), so retention,
            // which drops whole segments, keeps the disk within log_size plus two segments.
            (Some((_, len)), Some(last)) => {
                let full = *len > SEGMENT_HEADER_LEN as u64
                    && *len + (RECORD_HEADER_LEN + payload.len()) as u64 > self.segment_size;
                full || last.end != position
            }
            _ => true,
        };
        if rotate {
            self.rotate(position)?;
        }
        if self.dir_unsynced {
            self.sync_dir()?;
            self.dir_unsynced = false;
        }
        let (Some((file, len)), Some(segment)) = (self.active.as_mut(), self.segments.last_mut()) else {
            return Err(DiskError::Io { path: self.dir.clone(), source: std::io::ErrorKind::NotFound.into() });
        };
        let header = encode_record_header(position, payload);
        if let Err(error) = write_record_at(&*self.fs, file, &header, payload, *len) {
            let _ = self.fs.set_len(file, *len);
            return Err(DiskError::Io { path: segment.path.clone(), source: error });
        }
        segment.note_record(position, *len, payload.len());
        segment.last_write = SystemTime::now();
        *len += (RECORD_HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    /// Fsyncs the active segment: everything appended so far is then durable (finished segments were
    /// fsynced when the log rotated out of them, the directory before the first record of a new one).
    pub fn sync(&mut self) -> Result<(), DiskError> {
        while let Some(file) = self.unsynced.first() {
            self.fs.sync_all(file).map_err(io_err(&self.dir))?;
            self.unsynced.remove(0);
        }
        if let (Some((file, _)), Some(last)) = (&self.active, self.segments.last()) {
            self.fs.sync_data(file).map_err(io_err(&last.path))?;
        }
        Ok(())
    }

    /// The files rotations left unsynced (finished segments, the directory), for the syncer.
    pub fn take_unsynced(&mut self) -> Vec<Arc<File>> {
        std::mem::take(&mut self.unsynced)
    }

    /// The file to fsync for durability of everything appended so far.
    pub fn active_file(&self) -> Option<Arc<File>> {
        self.active.as_ref().map(|(file, _)| file.clone())
    }

    /// Deletes segment files retention dropped from the index ([`Self::trim`]).
    /// Returns the files it could not delete, and the first error.
    pub fn remove(&self, paths: Vec<PathBuf>) -> (Vec<PathBuf>, Option<DiskError>) {
        let mut left = Vec::new();
        let mut first_error = None;
        for path in paths {
            if let Err(error) = self.remove_if_present(&path) {
                first_error.get_or_insert(error);
                left.push(path);
            }
        }
        (left, first_error)
    }

    /// Deletes the oldest whole segments while more than `retain` bytes would remain, or while their
    /// newest byte is older than `max_age`, but not the stream after `keep_position` unless more
    /// than `max_size` would remain; returns the new first position and the files to delete (with
    /// [`Self::remove`], once readers no longer plan reads of them). The active segment stays.
    pub fn trim(&mut self, policy: &TrimPolicy, end: u64) -> (Option<u64>, Vec<PathBuf>) {
        let mut new_start = None;
        let mut removed = Vec::new();
        let too_old = |segment: &Segment| {
            policy.max_age.is_some_and(|age| segment.last_write.elapsed().is_ok_and(|elapsed| elapsed > age))
        };
        while self.segments.len() > 1 {
            let remaining = end - self.segments[1].start;
            let wanted = remaining >= policy.retain || too_old(&self.segments[0]);
            // Dropping segment 0 keeps `keep_position` in the log when the next segment starts at
            // or before it (the log then still holds the byte after it).
            let keeps_pin = policy.keep_position.is_none_or(|keep| self.segments[1].start <= keep);
            if !(wanted && (keeps_pin || remaining >= policy.max_size)) {
                break;
            }
            let segment = self.segments.remove(0);
            removed.push(segment.path);
            new_start = Some(self.segments[0].start);
        }
        (new_start, removed)
    }
}

/// The readers' copy of the segments: bounds and sparse index, to plan disk reads. The writer
/// brings it up to date after each write ([`DiskIndex::sync_from`]), copying only what changed.
#[derive(Debug, Default)]
pub struct DiskIndex {
    segments: Vec<Segment>,
}

impl DiskIndex {
    /// Catches up with `store`: segments retention dropped go, the active one's new bounds and index
    /// points are copied, new segments added.
    pub fn sync_from(&mut self, store: &SegmentStore) {
        let Some(first) = store.segments.first() else {
            self.segments.clear();
            return;
        };
        self.segments.retain(|s| s.start >= first.start);
        let from = match self.segments.last() {
            Some(last) => store.segments.partition_point(|s| s.start < last.start),
            None => 0,
        };
        for segment in &store.segments[from..] {
            match self.segments.last_mut() {
                Some(last) if last.start == segment.start => {
                    last.end = segment.end;
                    last.file_len = segment.file_len;
                    last.last_write = segment.last_write;
                    let known = last.index.len();
                    last.index.extend_from_slice(segment.index.get(known..).unwrap_or(&[]));
                }
                _ => self.segments.push(segment.clone()),
            }
        }
    }

    pub fn clear(&mut self) {
        self.segments.clear();
    }

    /// Entries of the in-memory index, all segments together.
    pub fn index_entries(&self) -> usize {
        self.segments.iter().map(|s| s.index.len()).sum()
    }

    pub fn bytes_on_disk(&self) -> u64 {
        self.segments.iter().map(|s| s.file_len).sum()
    }

    /// Plans a read of at least `max_bytes` (when there are so many) after `position`: whole records
    /// from the index point at or before it, within one segment.
    pub fn plan_read(&self, position: u64, max_bytes: usize) -> Option<DiskRange> {
        let index = self.segments.partition_point(|s| s.start <= position).checked_sub(1)?;
        let segment = &self.segments[index];
        if position >= segment.end {
            return None;
        }
        let first = segment.index.partition_point(|p| p.position <= position).checked_sub(1)?;
        let start = segment.index[first];
        let wanted_end = position + max_bytes as u64;
        let end_offset = segment.index[first + 1..]
            .iter()
            .find(|p| p.position >= wanted_end)
            .map(|p| p.file_offset)
            .unwrap_or(segment.file_len);
        Some(DiskRange {
            path: segment.path.clone(),
            file_offset: start.file_offset,
            position: start.position,
            len: end_offset - start.file_offset,
        })
    }
}

/// Why a disk read failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskReadError {
    #[error("segment is gone (trimmed or reset)")]
    Gone,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {error}")]
    Corrupt { path: PathBuf, error: FormatError },
}

/// Records read from disk and verified, with where each payload lies in its file (for
/// [`VerifiedRecords`](super::verified::VerifiedRecords)).
pub struct VerifiedRange {
    pub path: Arc<Path>,
    pub file: FileId,
    /// (position before the record, file offset of its payload, payload).
    pub records: Vec<(u64, u64, Bytes)>,
}

/// Reads the whole records of `range` and checks each one; fails rather than return a byte of a
/// record that does not pass its check.
pub fn read_range(fs: &dyn crate::fs::FileSystem, range: &DiskRange) -> Result<VerifiedRange, DiskReadError> {
    let path = &range.path;
    let file = fs.open_read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiskReadError::Gone,
        _ => DiskReadError::Io { path: path.clone(), source: e },
    })?;
    let id = FileId::of(&file).map_err(|source| DiskReadError::Io { path: path.clone(), source })?;
    let buffer = read_exact(fs, &file, range.file_offset, range.len as usize)
        .map_err(|source| DiskReadError::Io { path: path.clone(), source })?;
    let corrupt = |error| DiskReadError::Corrupt { path: path.clone(), error };
    let mut records = Vec::new();
    let mut at = 0;
    let mut expected = range.position;
    while at < buffer.len() {
        if buffer.len() - at < RECORD_HEADER_LEN {
            return Err(corrupt(FormatError::BadRecordLength((buffer.len() - at) as u64)));
        }
        let header = decode_record_header(&buffer[at..at + RECORD_HEADER_LEN]).map_err(corrupt)?;
        if header.position != expected {
            return Err(corrupt(FormatError::Discontinuous { expected, found: header.position }));
        }
        let payload_end = at + RECORD_HEADER_LEN + header.len;
        if payload_end > buffer.len() {
            return Err(corrupt(FormatError::BadRecordLength(header.len as u64)));
        }
        let payload = buffer.slice(at + RECORD_HEADER_LEN..payload_end);
        verify_record(&header, &payload).map_err(corrupt)?;
        records.push((header.position, range.file_offset + (at + RECORD_HEADER_LEN) as u64, payload));
        expected += header.len as u64;
        at = payload_end;
    }
    Ok(VerifiedRange { path: Arc::from(path.as_path()), file: id, records })
}

/// Reads back a run of records verified before, without checking them again: the copy path for
/// readers that cannot take the file itself (TLS replicas). One buffer per extent.
pub fn read_run(fs: &dyn crate::fs::FileSystem, run: &FileRun) -> Result<Vec<Bytes>, DiskReadError> {
    let path = run.path.to_path_buf();
    let io = |source| DiskReadError::Io { path: path.clone(), source };
    let file = fs.open_read(&run.path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiskReadError::Gone,
        _ => io(e),
    })?;
    match FileId::of(&file) {
        Ok(id) if id == run.file => {}
        Ok(_) => return Err(DiskReadError::Gone),
        Err(e) => return Err(io(e)),
    }
    let mut out = Vec::with_capacity(run.extents.len());
    for extent in &run.extents {
        match read_exact(fs, &file, extent.file_offset, extent.len as usize) {
            Ok(bytes) => out.push(bytes),
            // The file ends before the run: it was cut (a reset) since it was verified.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(DiskReadError::Gone),
            Err(e) => return Err(io(e)),
        }
    }
    Ok(out)
}

/// Reads exactly `len` bytes at `offset` into a new buffer that is never zeroed first.
fn read_exact(fs: &dyn crate::fs::FileSystem, file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    let mut buffer = Vec::with_capacity(len);
    while buffer.len() < len {
        let at = offset + buffer.len() as u64;
        let n = fs.read_at(file, &mut buffer, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    // The allocator may have given more room than asked, and the read filled it.
    buffer.truncate(len);
    Ok(Bytes::from(buffer))
}

/// Where a segment stops being good, and why.
struct ScanFailure {
    reason: String,
    header_ok: bool,
    good_len: u64,
    /// The file ends inside the failed record (or header): what an interrupted append leaves.
    torn: bool,
}

/// Writes a record's `header` then its `payload` at file `offset` in one positioned vectored write:
/// no copy of the payload in user space, and no window between a header and its payload in which a
/// kill leaves a header alone. A short write (a kill can still interrupt a large one) continues where
/// it stopped; what a kill leaves is a prefix, which recovery reports as a torn tail.
fn write_record_at(
    fs: &dyn crate::fs::FileSystem,
    file: &File,
    header: &[u8],
    payload: &[u8],
    offset: u64,
) -> std::io::Result<()> {
    let total = header.len() + payload.len();
    let mut written = 0;
    while written < total {
        let (head, body) = match written.checked_sub(header.len()) {
            None => (&header[written..], payload),
            Some(into_payload) => (&[][..], &payload[into_payload..]),
        };
        let parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(body)];
        match fs.write_vectored_at(file, &parts, offset + written as u64)? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => written += n,
        }
    }
    Ok(())
}

/// Reads a segment and checks every record; returns what is good and why the rest is not.
fn scan_segment(
    fs: &dyn crate::fs::FileSystem,
    path: &Path,
    start: u64,
) -> Result<(Segment, Option<ScanFailure>), DiskError> {
    let file = fs.open_read(path).map_err(io_err(path))?;
    let metadata = file.metadata().map_err(io_err(path))?;
    let file_len = metadata.len();
    let last_write = metadata.modified().unwrap_or_else(|_| SystemTime::now());
    let mut segment = Segment {
        start,
        end: start,
        path: path.to_path_buf(),
        index: Vec::new(),
        file_len: SEGMENT_HEADER_LEN as u64,
        last_write,
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    let bad_header = |reason: String| ScanFailure { reason, header_ok: false, good_len: 0, torn: false };
    if reader.read_exact(&mut header).is_err() {
        let failure = ScanFailure { torn: true, ..bad_header("segment header is torn".into()) };
        return Ok((segment, Some(failure)));
    }
    match decode_segment_header(&header) {
        Ok(declared) if declared == start => {}
        Ok(declared) => {
            return Ok((segment, Some(bad_header(format!("header says position {declared}, file name says {start}")))))
        }
        Err(e) => return Ok((segment, Some(bad_header(e.to_string())))),
    }
    let mut offset = SEGMENT_HEADER_LEN as u64;
    let cut =
        |reason: String, offset: u64| Some(ScanFailure { reason, header_ok: true, good_len: offset, torn: false });
    let torn =
        |reason: String, offset: u64| Some(ScanFailure { reason, header_ok: true, good_len: offset, torn: true });
    let mut payload = Vec::new();
    loop {
        if offset == file_len {
            return Ok((segment, None));
        }
        let mut record_header = [0u8; RECORD_HEADER_LEN];
        if reader.read_exact(&mut record_header).is_err() {
            return Ok((segment, torn(format!("torn record header at file offset {offset}"), offset)));
        }
        let header = match decode_record_header(&record_header) {
            Ok(h) => h,
            Err(e) => return Ok((segment, cut(format!("{e} at file offset {offset}"), offset))),
        };
        if header.position != segment.end {
            let error = FormatError::Discontinuous { expected: segment.end, found: header.position };
            return Ok((segment, cut(format!("{error} at file offset {offset}"), offset)));
        }
        if offset + (RECORD_HEADER_LEN + header.len) as u64 > file_len {
            return Ok((segment, torn(format!("torn record at file offset {offset}"), offset)));
        }
        payload.resize(header.len, 0);
        reader.read_exact(&mut payload).map_err(io_err(path))?;
        if let Err(e) = verify_record(&header, &payload) {
            return Ok((segment, cut(format!("{e} at file offset {offset}"), offset)));
        }
        segment.note_record(header.position, offset, header.len);
        offset += (RECORD_HEADER_LEN + header.len) as u64;
    }
}

/// Helps tests find a segment's files.
pub fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(format::parse_segment_file_name).is_some())
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
}
