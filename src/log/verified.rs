//! Records already checked on disk: where each one's payload lies in its segment file, so that the
//! readers that come after the first send it straight from the file (`sendfile`) or read it again
//! without checking it again.
//!
//! A record read from disk is verified (its checksum) once, by the first reader that reads it
//! ([`disk::read_range`](super::disk::read_range)); that reader notes the record's place here. Later
//! readers of the same record find it here: plain-TCP replicas get a [`FileRun`] that the kernel
//! copies from the page cache to the socket, with no copy into the relay's memory; TLS replicas
//! read the run back without a second checksum. A record not found here is read and checked again,
//! so a byte is never served that no reader has checked.
//!
//! The table is bounded (`MAX_RECORDS`, oldest forgotten first) and holds only places, never
//! payloads: its memory does not grow with the log or the number of readers. Each place names the
//! segment file by path and by identity (device and inode), so a segment replaced under the same
//! name (a reset to a new history at the same offset) is never read as the old one.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// Most records remembered: about 4 MiB of table, which covers a 1 GiB log of 16 KiB records.
const MAX_RECORDS: usize = 1 << 16;

/// A segment file's identity: a file put in its place under the same name is another file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(file: &File) -> io::Result<FileId> {
        let meta = file.metadata()?;
        Ok(FileId { dev: meta.dev(), ino: meta.ino() })
    }
}

/// Where one verified record's payload is.
#[derive(Debug, Clone)]
pub struct Located {
    pub path: Arc<Path>,
    pub file: FileId,
    /// File offset of the payload's first byte (after the record header).
    pub payload_offset: u64,
    pub len: u64,
}

/// A byte range of a segment file, all of it verified payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file_offset: u64,
    pub len: u64,
}

/// Verified stream bytes in one segment file: the stream after a position, as file extents (the
/// record headers between payloads left out).
#[derive(Debug, Clone)]
pub struct FileRun {
    pub path: Arc<Path>,
    pub file: FileId,
    pub extents: Vec<Extent>,
    /// The segment, opened (and its identity checked) by the run's first send and kept for the
    /// sends after it: a run goes out in as many sends as the socket has room for (about 34 KiB
    /// each on loopback, measured), and each of them opened, fstat'ed and closed the file again. A
    /// history change meanwhile is found by the reader's next read, as before; a segment cut since
    /// (a reset) ends the file before the extent and stops the run.
    opened: std::sync::OnceLock<Arc<File>>,
}

impl FileRun {
    /// Stream bytes in the run.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The extents left after the first `skip` bytes.
    fn remaining(&self, mut skip: u64) -> impl Iterator<Item = Extent> + '_ {
        self.extents.iter().filter_map(move |extent| {
            if skip >= extent.len {
                skip -= extent.len;
                return None;
            }
            let cut = std::mem::take(&mut skip);
            Some(Extent { file_offset: extent.file_offset + cut, len: extent.len - cut })
        })
    }
}

/// The verified records, keyed by (epoch, position before the record's first byte).
#[derive(Default)]
pub struct VerifiedRecords {
    records: BTreeMap<(u64, u64), Located>,
    order: VecDeque<(u64, u64)>,
    /// The log's (epoch, start) at the last note: when it moves, what it left behind is forgotten.
    bounds: (u64, u64),
}

impl VerifiedRecords {
    /// Notes records a reader has just verified, in a log now at `epoch` starting after `start`.
    pub fn note(&mut self, epoch: u64, start: u64, records: impl IntoIterator<Item = (u64, Located)>) {
        if self.bounds != (epoch, start) {
            self.forget_before(epoch, start);
            self.bounds = (epoch, start);
        }
        for (position, located) in records {
            if self.records.insert((epoch, position), located).is_none() {
                self.order.push_back((epoch, position));
            }
        }
        while self.order.len() > MAX_RECORDS {
            if let Some(oldest) = self.order.pop_front() {
                self.records.remove(&oldest);
            }
        }
    }

    /// Forgets the records of one file (it is gone, or is no longer the one that was checked).
    pub fn forget_file(&mut self, file: FileId) {
        self.records.retain(|_, place| place.file != file);
        let records = &self.records;
        self.order.retain(|key| records.contains_key(key));
    }

    /// Forgets everything of other epochs and before `start` (what retention dropped).
    fn forget_before(&mut self, epoch: u64, start: u64) {
        let keep = self.records.split_off(&(epoch, start));
        self.records = keep;
        self.records.retain(|(record_epoch, _), _| *record_epoch == epoch);
        self.order.retain(|key| key.0 == epoch && key.1 >= start);
    }

    /// The verified stream after `position`, from the record holding its next byte on, while the
    /// records are consecutive and in one file; at least one record, up to about `max_bytes`.
    pub fn run_from(&self, epoch: u64, position: u64, max_bytes: usize) -> Option<FileRun> {
        let (&(_, first), first_place) = self.records.range((epoch, 0)..=(epoch, position)).next_back()?;
        if first + first_place.len <= position {
            return None;
        }
        let mut run = FileRun {
            path: first_place.path.clone(),
            file: first_place.file,
            extents: Vec::new(),
            opened: std::sync::OnceLock::new(),
        };
        let mut next = first;
        let mut taken = 0u64;
        for (&(record_epoch, start), place) in self.records.range((epoch, first)..) {
            if record_epoch != epoch || start != next || place.file != run.file || taken >= max_bytes as u64 {
                break;
            }
            let skip = position.saturating_sub(start);
            let extent = Extent { file_offset: place.payload_offset + skip, len: place.len - skip };
            match run.extents.last_mut() {
                // Consecutive payloads with nothing between them (never, with record headers, but
                // cheap to join).
                Some(last) if last.file_offset + last.len == extent.file_offset => last.len += extent.len,
                _ => run.extents.push(extent),
            }
            taken += extent.len;
            next = start + place.len;
        }
        Some(run)
    }
}

/// How sending a run to a socket stopped before its end.
#[derive(Debug)]
pub enum SendStop {
    /// The socket's buffer is full: wait until it is writable and send the rest.
    WouldBlock,
    /// The segment file is gone or is no longer the one verified (trimmed or reset).
    Gone,
    /// Reading the segment failed.
    File(io::Error),
    /// Writing to the socket failed.
    Socket(io::Error),
}

/// Sends `run` after its first `skip` bytes to `socket` (non-blocking) with `sendfile`, until it is
/// all sent or the socket is full. Blocks on the file: run it on the blocking pool. Returns the
/// bytes sent, and why it stopped short if it did.
pub fn send_run(
    fs: &dyn crate::fs::FileSystem,
    socket: BorrowedFd<'_>,
    run: &FileRun,
    skip: u64,
) -> (u64, Option<SendStop>) {
    let file = match run.opened.get() {
        Some(file) => file.clone(),
        None => match open_checked(fs, run) {
            Ok(file) => run.opened.get_or_init(|| file).clone(),
            Err(stop) => return (0, Some(stop)),
        },
    };
    let mut sent = 0u64;
    for extent in run.remaining(skip) {
        let mut offset = extent.file_offset;
        let end = extent.file_offset + extent.len;
        while offset < end {
            let want = (end - offset).min(1 << 30) as usize;
            match fs.send_file(socket, &file, offset, want) {
                // The file ends before the extent: it was cut (a reset) since it was verified.
                Ok(0) => return (sent, Some(SendStop::Gone)),
                Ok(n) => {
                    offset += n as u64;
                    sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (sent, Some(SendStop::WouldBlock)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_socket_error(&e) => return (sent, Some(SendStop::Socket(e))),
                Err(e) => return (sent, Some(SendStop::File(e))),
            }
        }
    }
    (sent, None)
}

/// Opens the run's segment and checks that it is the file the records were verified in.
fn open_checked(fs: &dyn crate::fs::FileSystem, run: &FileRun) -> Result<Arc<File>, SendStop> {
    let file = match fs.open_read(&run.path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SendStop::Gone),
        Err(e) => return Err(SendStop::File(e)),
    };
    match FileId::of(&file) {
        Ok(id) if id == run.file => Ok(Arc::new(file)),
        Ok(_) => Err(SendStop::Gone),
        Err(e) => Err(SendStop::File(e)),
    }
}

/// `sendfile` errors that come from the socket side (the peer went away), not from the file.
fn is_socket_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(file: u64, payload_offset: u64, len: u64) -> Located {
        Located { path: Arc::from(Path::new("/x")), file: FileId { dev: 1, ino: file }, payload_offset, len }
    }

    #[test]
    fn a_run_starts_inside_a_record_and_follows_consecutive_records_of_one_file() {
        let mut table = VerifiedRecords::default();
        // Records of 100 bytes at positions 0, 100, 200 in file 1 (16-byte headers between), and
        // the next one in file 2.
        table.note(3, 0, [(0, place(1, 48, 100)), (100, place(1, 164, 100)), (200, place(1, 280, 100))]);
        table.note(3, 0, [(300, place(2, 48, 50))]);
        let run = table.run_from(3, 150, 1 << 20).unwrap();
        assert_eq!(
            run.extents,
            vec![Extent { file_offset: 214, len: 50 }, Extent { file_offset: 280, len: 100 }],
            "from position 150: the rest of the second record, then the third; file 2 is another run"
        );
        assert_eq!(run.bytes(), 150);
        assert_eq!(run.remaining(60).collect::<Vec<_>>(), vec![Extent { file_offset: 290, len: 90 }]);
        assert_eq!(table.run_from(3, 300, 1 << 20).unwrap().extents, vec![Extent { file_offset: 48, len: 50 }]);
        assert!(table.run_from(3, 350, 1 << 20).is_none(), "nothing verified after 350");
        assert!(table.run_from(4, 150, 1 << 20).is_none(), "another epoch");
        assert_eq!(table.run_from(3, 0, 150).unwrap().bytes(), 200, "whole records up to max_bytes");
    }

    #[test]
    fn a_gap_ends_a_run_and_forgetting_drops_trimmed_records_and_old_epochs() {
        let mut table = VerifiedRecords::default();
        table.note(1, 0, [(0, place(1, 48, 100)), (200, place(1, 280, 100))]);
        assert_eq!(table.run_from(1, 10, 1 << 20).unwrap().bytes(), 90, "the record at 100 was not verified");
        assert!(table.run_from(1, 100, 1 << 20).is_none());
        table.note(1, 200, [(500, place(2, 48, 10))]);
        assert!(table.run_from(1, 10, 1 << 20).is_none());
        assert!(table.run_from(1, 200, 1 << 20).is_some());
        table.note(2, 0, [(500, place(3, 48, 10))]);
        assert!(table.run_from(1, 200, 1 << 20).is_none(), "a new epoch forgets the old one");
        assert!(table.run_from(2, 500, 1 << 20).is_some());
        table.forget_file(FileId { dev: 1, ino: 3 });
        assert!(table.run_from(2, 500, 1 << 20).is_none());
        assert!(table.order.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = VerifiedRecords::default();
        table.note(1, 0, (0..MAX_RECORDS as u64 + 10).map(|i| (i * 10, place(1, 48 + i * 26, 10))));
        assert_eq!(table.records.len(), MAX_RECORDS);
        assert!(table.run_from(1, 5, 100).is_none(), "the oldest went first");
    }

    #[test]
    fn a_run_opens_its_file_once_and_a_file_cut_or_replaced_stops_it() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let path: Arc<Path> = Arc::from(dir.path().join("segment").as_path());
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let id = FileId::of(&File::open(&path).unwrap()).unwrap();
        let run_of = |len: u64| FileRun {
            path: path.clone(),
            file: id,
            extents: vec![Extent { file_offset: 0, len }],
            opened: std::sync::OnceLock::new(),
        };
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let fs = crate::fs::RealFs;

        // The socket fills long before 4 MiB: the run stops short and keeps its file open.
        let run = run_of(data.len() as u64);
        let (sent, stop) = send_run(&fs, ours.as_fd(), &run, 0);
        assert!(matches!(stop, Some(SendStop::WouldBlock)) && sent > 0 && sent < data.len() as u64, "{sent} {stop:?}");
        let mut received = vec![0u8; sent as usize];
        theirs.read_exact(&mut received).unwrap();
        assert!(received[..] == data[..sent as usize]);
        // The file is removed: the run goes on from the file it opened, with the same bytes.
        std::fs::remove_file(&path).unwrap();
        let (more, _) = send_run(&fs, ours.as_fd(), &run, sent);
        assert!(more > 0, "the open file still serves the verified bytes");
        let mut received = vec![0u8; more as usize];
        theirs.read_exact(&mut received).unwrap();
        assert!(received[..] == data[sent as usize..(sent + more) as usize]);
        // A new run of the removed file cannot open it.
        assert!(matches!(send_run(&fs, ours.as_fd(), &run_of(10), 0), (0, Some(SendStop::Gone))));

        // Another file under the same name (a reset to a new history) is not the run's file.
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        assert!(matches!(send_run(&fs, ours.as_fd(), &run_of(10), 0), (0, Some(SendStop::Gone))));
        // A file cut short since the run opened it ends the run where the file ends.
        let run = FileRun { file: FileId::of(&File::open(&path).unwrap()).unwrap(), ..run_of(data.len() as u64) };
        // Empty the socket (non-blocking reads until none is ready) so the run's first send has room.
        theirs.set_nonblocking(true).unwrap();
        let mut drained = vec![0u8; 1 << 16];
        let mut drain = || while matches!(theirs.read(&mut drained), Ok(n) if n > 0) {};
        drain();
        let (first, _) = send_run(&fs, ours.as_fd(), &run, 0);
        assert!(first > 0);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(first).unwrap();
        drain();
        assert!(matches!(send_run(&fs, ours.as_fd(), &run, first), (0, Some(SendStop::Gone))));
    }
}
