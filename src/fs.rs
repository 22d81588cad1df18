//! The file-system seam of the relay's stores (as tikv/raft-engine's `FileSystem`): every file
//! operation the replication log's segment store and the snapshot store make goes through
//! [`FileSystem`], so tests can inject the faults a real disk has (a full disk, `EIO` on fsync,
//! descriptor exhaustion, a stalled fsync) into a running store.
//!
//! [`RealFs`] is the one production implementation; `FaultyFs` (built for tests only) wraps it, with faults
//! switched on and off while the store runs. Files are plain [`std::fs::File`]s: the seam intercepts
//! the operations, not the handle type, so the stores keep using positioned reads on them.
//!
//! A directory is fsynced through a handle opened once (`sync_all` on it), so making a rename or a
//! new file durable needs no new descriptor.
//!
//! Every method blocks: callers run them on the log writer's thread or the blocking pool, never on
//! a runtime worker.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::BorrowedFd;
use std::path::Path;
#[cfg(test)]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(test)]
use std::sync::{Condvar, Mutex};

/// The file operations of the stores. Implementations must be usable from several threads.
pub trait FileSystem: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    /// Creates (truncating) a file for reading and writing.
    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path)
    }

    /// Opens an existing file for reading and writing.
    fn open_rw(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        File::open(path)
    }

    /// Reads into `buf`'s spare capacity at `offset` (`pread`), so a large read buffer need not be
    /// zeroed first; may read less than asked, like the system call. Returns the bytes read.
    fn read_at(&self, file: &File, buf: &mut Vec<u8>, offset: u64) -> io::Result<usize> {
        loop {
            match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), offset) {
                Err(rustix::io::Errno::INTR) => continue,
                result => return result.map_err(io::Error::from),
            }
        }
    }

    /// `sendfile`: the kernel copies up to `len` bytes of `file` from `offset` to `socket`, never
    /// through user space; may send less (a full non-blocking socket fails with `WouldBlock`).
    fn send_file(&self, socket: BorrowedFd<'_>, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        let mut at = offset;
        rustix::fs::sendfile(socket, file, Some(&mut at), len).map_err(io::Error::from)
    }

    /// One positioned vectored write (`pwritev`); may write less than given, like the system call.
    fn write_vectored_at(&self, file: &File, parts: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        loop {
            match rustix::io::pwritev(file, parts, offset) {
                Err(rustix::io::Errno::INTR) => continue,
                result => return result.map_err(io::Error::from),
            }
        }
    }

    /// Appends all of `bytes` at the file's cursor.
    fn write_all(&self, mut file: &File, bytes: &[u8]) -> io::Result<()> {
        file.write_all(bytes)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_all(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl FileSystem for RealFs {}

/// The shared handle the stores hold.
pub type SharedFs = Arc<dyn FileSystem>;

/// The real file system.
pub fn real() -> SharedFs {
    Arc::new(RealFs)
}

/// The faults [`FaultyFs`] can inject; each is on until switched off.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ENOSPC` on every write (the disk is full); a vectored write first writes half of what it
    /// was given, as a file system that runs out mid-write does.
    NoSpace,
    /// `EIO` on every fsync.
    SyncIo,
    /// `EMFILE` on every open or create (the process is out of descriptors).
    NoDescriptors,
    /// Every fsync blocks until the fault is switched off.
    StalledSync,
    /// `EIO` on every read of a file's contents (`pread`, `sendfile`): a failing disk.
    ReadIo,
}

#[cfg(test)]
impl Fault {
    const ALL: [Fault; 5] = [Fault::NoSpace, Fault::SyncIo, Fault::NoDescriptors, Fault::StalledSync, Fault::ReadIo];

    fn index(self) -> usize {
        self as usize
    }
}

/// A [`RealFs`] with switchable faults, for tests. Counts the faults it injected.
#[cfg(test)]
#[derive(Default)]
pub struct FaultyFs {
    on: [AtomicBool; 5],
    injected: AtomicU64,
    /// Syncs blocked by [`Fault::StalledSync`] wait here.
    stall: (Mutex<()>, Condvar),
    /// Syncs currently blocked by a stall.
    stalled: AtomicU64,
}

#[cfg(test)]
impl FaultyFs {
    pub fn new() -> Arc<FaultyFs> {
        Arc::new(FaultyFs::default())
    }

    pub fn set(&self, fault: Fault, on: bool) {
        self.on[fault.index()].store(on, Ordering::SeqCst);
        if fault == Fault::StalledSync && !on {
            let _guard = self.stall.0.lock().unwrap_or_else(|p| p.into_inner());
            self.stall.1.notify_all();
        }
    }

    /// Switches every fault off.
    pub fn clear(&self) {
        for fault in Fault::ALL {
            self.set(fault, false);
        }
    }

    pub fn is_on(&self, fault: Fault) -> bool {
        self.on[fault.index()].load(Ordering::SeqCst)
    }

    /// How many operations failed or stalled because of a fault.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// How many fsyncs are blocked right now.
    pub fn stalled_syncs(&self) -> u64 {
        self.stalled.load(Ordering::SeqCst)
    }

    fn fail_if(&self, fault: Fault, errno: i32) -> io::Result<()> {
        if self.is_on(fault) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        if self.is_on(Fault::StalledSync) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            self.stalled.fetch_add(1, Ordering::SeqCst);
            let mut guard = self.stall.0.lock().unwrap_or_else(|p| p.into_inner());
            while self.is_on(Fault::StalledSync) {
                guard = self.stall.1.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            drop(guard);
            self.stalled.fetch_sub(1, Ordering::SeqCst);
        }
        self.fail_if(Fault::SyncIo, libc::EIO)
    }
}

#[cfg(test)]
impl FileSystem for FaultyFs {
    fn create(&self, path: &Path) -> io::Result<File> {
        self.fail_if(Fault::NoDescriptors, libc::EMFILE)?;
        RealFs.create(path)
    }

    fn open_rw(&self, path: &Path) -> io::Result<File> {
        self.fail_if(Fault::NoDescriptors, libc::EMFILE)?;
        RealFs.open_rw(path)
    }

    fn open_read(&self, path: &Path) -> io::Result<File> {
        self.fail_if(Fault::NoDescriptors, libc::EMFILE)?;
        RealFs.open_read(path)
    }

    fn write_vectored_at(&self, file: &File, parts: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
        if self.is_on(Fault::NoSpace) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            // What a file system that fills up mid-write leaves: a prefix, then ENOSPC.
            let all: Vec<u8> = parts.iter().flat_map(|part| part.iter().copied()).collect();
            if all.len() > 1 {
                let half = &all[..all.len() / 2];
                let _ = RealFs.write_vectored_at(file, &[IoSlice::new(half)], offset);
            }
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        RealFs.write_vectored_at(file, parts, offset)
    }

    fn write_all(&self, file: &File, bytes: &[u8]) -> io::Result<()> {
        self.fail_if(Fault::NoSpace, libc::ENOSPC)?;
        RealFs.write_all(file, bytes)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        self.before_sync()?;
        RealFs.sync_data(file)
    }

    fn sync_all(&self, file: &File) -> io::Result<()> {
        self.before_sync()?;
        RealFs.sync_all(file)
    }

    fn read_at(&self, file: &File, buf: &mut Vec<u8>, offset: u64) -> io::Result<usize> {
        self.fail_if(Fault::ReadIo, libc::EIO)?;
        RealFs.read_at(file, buf, offset)
    }

    fn send_file(&self, socket: BorrowedFd<'_>, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        self.fail_if(Fault::ReadIo, libc::EIO)?;
        RealFs.send_file(socket, file, offset, len)
    }
}

/// The short name of an I/O error's kind for metrics and INFO: `enospc`, `eio`, `emfile`, or `other`.
pub fn error_kind(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => "enospc",
        Some(libc::EIO) => "eio",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "emfile",
        _ => "other",
    }
}

/// Every kind [`error_kind`] names, for metrics that show each one from the start.
pub const ERROR_KINDS: [&str; 4] = ["enospc", "eio", "emfile", "other"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fail_the_operations_they_name_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let path = dir.path().join("f");
        let file = fs.create(&path).unwrap();
        fs.set(Fault::NoSpace, true);
        let error = fs.write_vectored_at(&file, &[IoSlice::new(b"abcdef")], 0).unwrap_err();
        assert_eq!(error_kind(&error), "enospc");
        assert_eq!(std::fs::read(&path).unwrap(), b"abc", "a prefix was written before the error");
        fs.set(Fault::SyncIo, true);
        assert_eq!(error_kind(&fs.sync_data(&file).unwrap_err()), "eio");
        fs.set(Fault::NoDescriptors, true);
        assert_eq!(error_kind(&fs.open_read(&path).unwrap_err()), "emfile");
        assert_eq!(fs.injected(), 3);
        fs.clear();
        assert_eq!(fs.write_vectored_at(&file, &[IoSlice::new(b"xy")], 0).unwrap(), 2);
        fs.sync_data(&file).unwrap();
    }

    #[test]
    fn a_stalled_sync_returns_once_the_stall_is_switched_off() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let file = fs.create(&dir.path().join("f")).unwrap();
        fs.set(Fault::StalledSync, true);
        let syncing = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.sync_data(&file))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs.stalled_syncs() == 0 {
            assert!(std::time::Instant::now() < deadline, "the sync never stalled");
            std::thread::yield_now();
        }
        assert!(!syncing.is_finished());
        fs.set(Fault::StalledSync, false);
        syncing.join().unwrap().unwrap();
    }
}
