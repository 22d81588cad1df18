//! The snapshot cache: the master's newest RDB, kept on disk under the relay's directory exactly as the
//! master sent it (EOF framing stripped), with a metadata file beside it.
//!
//! A snapshot is written under a temporary name, verified (signature, EOF opcode, CRC-64), fsynced and
//! only then renamed into place, so `snapshot.rdb` is always a complete RDB that the master produced at
//! `snapshot.meta`'s offset. The store publishes the current snapshot through a `watch` so downstream
//! full syncs see a new one as soon as it is in place.
//!
//! Every file operation goes through the [`FileSystem`](crate::fs::FileSystem) seam and runs on the
//! blocking pool: the check of a cached RDB at open (call [`SnapshotStore::open`] there), the writes
//! of a transfer (buffered, 1 MiB at a time), the install (fsync, renames, directory fsync) and
//! the opening of the cached file for a full sync. The install lock is the store's only lock; it is
//! taken alone.

pub mod format;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::fs::SharedFs;
use crate::offset::Position;

use format::RdbVerifier;
pub use format::{filter_rdb, KeyCount, RdbError, RdbFilter, SnapshotMeta};

const RDB_FILE: &str = "snapshot.rdb";
const META_FILE: &str = "snapshot.meta";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid RDB: {0}")]
    Rdb(#[from] RdbError),
    #[error("snapshot metadata {path} is unreadable: {reason}")]
    BadMeta { path: PathBuf, reason: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// Bytes a transfer gathers before one write to the temporary file.
const WRITE_BUFFER: usize = 1 << 20;

/// The snapshot cache of one relay.
pub struct SnapshotStore {
    dir: PathBuf,
    fs: SharedFs,
    /// The directory, open for its fsyncs (so they need no new descriptor).
    dir_handle: File,
    /// Held while a snapshot is installed (file, metadata, published value) and while a reader opens
    /// the file, so a reader never pairs one RDB with another's metadata, and two commits (main link
    /// and side fetch) never interleave.
    install: std::sync::Mutex<()>,
    /// Numbers temporary files: the main link and the side fetcher may both be receiving.
    temp_counter: std::sync::atomic::AtomicU64,
    current: watch::Sender<Option<SnapshotMeta>>,
}

impl SnapshotStore {
    /// Opens the cache in `dir`, adopting a snapshot already there when its metadata and file agree.
    /// Blocks (it reads the whole RDB to check it): run it off the runtime.
    pub fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        Self::open_with(dir, crate::fs::real())
    }

    /// [`Self::open`] on the given file system.
    pub fn open_with(dir: &Path, fs: SharedFs) -> Result<SnapshotStore, SnapshotError> {
        fs.create_dir_all(dir).map_err(io_error(dir))?;
        let dir_handle = fs.open_read(dir).map_err(io_error(dir))?;
        let store = SnapshotStore {
            dir_handle,
            dir: dir.to_path_buf(),
            fs,
            install: std::sync::Mutex::new(()),
            temp_counter: Default::default(),
            current: watch::channel(None).0,
        };
        store.remove_leftover_temp_files();
        match store.load_existing() {
            Ok(meta) => {
                store.current.send_replace(meta);
            }
            Err(e) => tracing::warn!("ignoring the cached snapshot: {e}"),
        }
        Ok(store)
    }

    fn remove_leftover_temp_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().contains(".tmp") {
                let _ = self.fs.remove_file(&entry.path());
            }
        }
    }

    fn load_existing(&self) -> Result<Option<SnapshotMeta>, SnapshotError> {
        let meta_path = self.dir.join(META_FILE);
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SnapshotError::Io { path: meta_path, source: e }),
        };
        let mut meta: SnapshotMeta = serde_yaml_ng::from_str(&text)
            .map_err(|e| SnapshotError::BadMeta { path: meta_path.clone(), reason: e.to_string() })?;
        let rdb_path = self.rdb_path();
        let mut verifier = RdbVerifier::default();
        let mut file = self.fs.open_read(&rdb_path).map_err(io_error(&rdb_path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf).map_err(io_error(&rdb_path))?;
            if n == 0 {
                break;
            }
            verifier.update(&buf[..n]);
        }
        let facts = verifier.finish()?;
        if facts.size != meta.size || facts.crc64 != meta.crc64 || facts.content_crc64 != meta.content_crc64 {
            return Err(SnapshotError::BadMeta {
                path: meta_path,
                reason: format!(
                    "it describes {} bytes with CRC {:016x}, the file has {} bytes with CRC {:016x}",
                    meta.size, meta.crc64, facts.size, facts.crc64
                ),
            });
        }
        meta.keys.get_or_insert(facts.keys);
        Ok(Some(meta))
    }

    pub fn rdb_path(&self) -> PathBuf {
        self.dir.join(RDB_FILE)
    }

    pub fn current(&self) -> Option<SnapshotMeta> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<SnapshotMeta>> {
        self.current.subscribe()
    }

    /// Starts receiving a new RDB produced at `offset` under `replid` by `source` (`master`,
    /// `replica <ip:port>`).
    pub async fn begin(&self, replid: &str, offset: Position, source: &str) -> Result<SnapshotWriter, SnapshotError> {
        let n = self.temp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp_path = self.dir.join(format!("{RDB_FILE}.tmp-{}-{n}", std::process::id()));
        let (fs, path) = (self.fs.clone(), temp_path.clone());
        let file = blocking(move || fs.create(&path)).await.map_err(io_error(&temp_path))?;
        Ok(SnapshotWriter {
            file: Some(Arc::new(file)),
            fs: self.fs.clone(),
            buffer: Vec::with_capacity(WRITE_BUFFER),
            written: 0,
            temp_path,
            verifier: RdbVerifier::default(),
            replid: replid.to_string(),
            offset,
            source: source.to_string(),
        })
    }

    /// Verifies, syncs and installs a fully received RDB as the current snapshot.
    pub async fn commit(self: &Arc<Self>, mut writer: SnapshotWriter) -> Result<SnapshotMeta, SnapshotError> {
        let checked = match std::mem::take(&mut writer.verifier).finish() {
            Ok(facts) => writer.flush().await.map(|()| facts),
            Err(error) => Err(error.into()),
        };
        let facts = match checked {
            Ok(facts) => facts,
            Err(error) => {
                // Deleted before the error is returned (not later, as a dropped writer does).
                let (fs, path) = (self.fs.clone(), std::mem::take(&mut writer.temp_path));
                let _ = blocking(move || fs.remove_file(&path)).await;
                return Err(error);
            }
        };
        let file = writer.file.take().ok_or_else(|| SnapshotError::BadMeta {
            path: writer.temp_path.clone(),
            reason: "snapshot writer already closed".into(),
        })?;
        let meta = SnapshotMeta {
            replid: writer.replid.clone(),
            offset: writer.offset,
            size: facts.size,
            rdb_version: facts.version,
            crc64: facts.crc64,
            content_crc64: facts.content_crc64,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            keys: Some(facts.keys),
            source: writer.source.clone(),
        };
        let meta_text = serde_yaml_ng::to_string(&meta)
            .map_err(|e| SnapshotError::BadMeta { path: self.dir.join(META_FILE), reason: e.to_string() })?;
        // The temporary file is the install's from here: the writer's drop must not delete it.
        let temp_path = std::mem::take(&mut writer.temp_path);
        let store = self.clone();
        let installed = meta.clone();
        // On the blocking pool and to the end even if the caller is cancelled: the file, the
        // metadata and the published value never disagree.
        let install = tokio::task::spawn_blocking(move || {
            let result = store.install(&file, &temp_path, &meta_text, installed);
            if result.is_err() {
                let _ = store.fs.remove_file(&temp_path);
            }
            result
        });
        install.await.map_err(|join| SnapshotError::Io { path: self.dir.clone(), source: join.into() })??;
        Ok(meta)
    }

    /// Fsyncs the received RDB and installs it with its metadata, under the install lock.
    fn install(&self, file: &File, temp_path: &Path, meta_text: &str, meta: SnapshotMeta) -> Result<(), SnapshotError> {
        self.fs.sync_all(file).map_err(io_error(temp_path))?;
        let meta_temp = PathBuf::from(format!("{}.meta", temp_path.display()));
        let _installing = self.install.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = write_synced(&*self.fs, &meta_temp, meta_text.as_bytes()) {
            let _ = self.fs.remove_file(&meta_temp);
            return Err(error);
        }
        let rdb_path = self.rdb_path();
        self.fs.rename(temp_path, &rdb_path).map_err(io_error(&rdb_path))?;
        let meta_path = self.dir.join(META_FILE);
        self.fs.rename(&meta_temp, &meta_path).map_err(io_error(&meta_path))?;
        self.fs.sync_all(&self.dir_handle).map_err(io_error(&self.dir))?;
        self.current.send_replace(Some(meta));
        Ok(())
    }

    /// Opens the cached RDB together with the metadata that describes it. Blocks: see
    /// [`Self::open_current_async`].
    pub fn open_current(&self) -> Option<(SnapshotMeta, std::fs::File)> {
        let _installing = self.install.lock().unwrap_or_else(|p| p.into_inner());
        let meta = self.current()?;
        let file = self.fs.open_read(&self.rdb_path()).ok()?;
        (file.metadata().ok()?.len() == meta.size).then_some((meta, file))
    }

    /// [`Self::open_current`] on the blocking pool.
    pub async fn open_current_async(self: &Arc<Self>) -> Option<(SnapshotMeta, std::fs::File)> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.open_current()).await.ok().flatten()
    }
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)?
}

fn write_synced(fs: &dyn crate::fs::FileSystem, path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let file = fs.create(path).map_err(io_error(path))?;
    fs.write_all(&file, bytes).map_err(io_error(path))?;
    fs.sync_all(&file).map_err(io_error(path))
}

/// Writes all of `bytes` at `offset`, continuing after short writes.
fn write_all_at(fs: &dyn crate::fs::FileSystem, file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match fs.write_vectored_at(file, &[std::io::IoSlice::new(&bytes[written..])], offset + written as u64)? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => written += n,
        }
    }
    Ok(())
}

/// An RDB being received. Dropped without [`SnapshotStore::commit`], it deletes its temporary file, so
/// nothing from a failed transfer is ever cached.
pub struct SnapshotWriter {
    file: Option<Arc<File>>,
    fs: SharedFs,
    /// Received bytes not yet written to the file.
    buffer: Vec<u8>,
    /// Bytes in the file so far.
    written: u64,
    temp_path: PathBuf,
    verifier: RdbVerifier,
    replid: String,
    offset: Position,
    source: String,
}

impl SnapshotWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.verifier.update(bytes);
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= WRITE_BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the buffered bytes to the temporary file (on the blocking pool).
    async fn flush(&mut self) -> Result<(), SnapshotError> {
        let Some(file) = self.file.clone() else { return Ok(()) };
        if self.buffer.is_empty() {
            return Ok(());
        }
        let buffer = std::mem::replace(&mut self.buffer, Vec::with_capacity(WRITE_BUFFER));
        let (fs, offset, len) = (self.fs.clone(), self.written, buffer.len() as u64);
        blocking(move || write_all_at(&*fs, &file, &buffer, offset)).await.map_err(io_error(&self.temp_path))?;
        self.written += len;
        Ok(())
    }

    pub fn offset(&self) -> Position {
        self.offset
    }

    /// The keys of what was written so far (exact once the whole RDB is in).
    pub fn keys(&self) -> KeyCount {
        self.verifier.keys()
    }

    pub fn replid(&self) -> &str {
        &self.replid
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.temp_path.as_os_str().is_empty() {
            return;
        }
        let (fs, path) = (self.fs.clone(), std::mem::take(&mut self.temp_path));
        // The unlink on the blocking pool when there is a runtime (a writer dropped by a task).
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || fs.remove_file(&path))),
            Err(_) => drop(fs.remove_file(&path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format::tests::sample_rdb;
    use super::*;

    #[tokio::test]
    async fn commit_installs_and_reopen_adopts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SnapshotStore::open(dir.path()).unwrap());
        assert!(store.current().is_none());
        let rdb = sample_rdb();
        let mut writer = store.begin(&"f".repeat(40), Position::new(42), "master").await.unwrap();
        for piece in rdb.chunks(5) {
            writer.write(piece).await.unwrap();
        }
        let meta = store.commit(writer).await.unwrap();
        assert_eq!(meta.offset, Position::new(42));
        assert_eq!(std::fs::read(store.rdb_path()).unwrap(), rdb);
        let reopened = SnapshotStore::open(dir.path()).unwrap();
        assert_eq!(reopened.current(), Some(meta));
    }

    #[tokio::test]
    async fn a_bad_rdb_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SnapshotStore::open(dir.path()).unwrap());
        let mut rdb = sample_rdb();
        rdb[10] ^= 0x40;
        let mut writer = store.begin(&"f".repeat(40), Position::new(1), "master").await.unwrap();
        writer.write(&rdb).await.unwrap();
        assert!(matches!(store.commit(writer).await, Err(SnapshotError::Rdb(RdbError::CrcMismatch { .. }))));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(store.current().is_none());
    }

    #[tokio::test]
    async fn a_corrupt_cached_file_without_trailer_checksum_is_not_adopted() {
        // A master with `rdbchecksum no` writes a zero trailer: the cache still checks the content.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SnapshotStore::open(dir.path()).unwrap());
        let mut rdb = sample_rdb();
        let n = rdb.len();
        rdb[n - 8..].fill(0);
        let mut writer = store.begin(&"f".repeat(40), Position::new(1), "master").await.unwrap();
        writer.write(&rdb).await.unwrap();
        store.commit(writer).await.unwrap();
        assert!(SnapshotStore::open(dir.path()).unwrap().current().is_some());
        let mut bytes = std::fs::read(store.rdb_path()).unwrap();
        bytes[11] ^= 1;
        std::fs::write(store.rdb_path(), bytes).unwrap();
        drop(store);
        assert!(SnapshotStore::open(dir.path()).unwrap().current().is_none());
    }

    #[tokio::test]
    async fn a_corrupt_cached_file_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SnapshotStore::open(dir.path()).unwrap());
        let mut writer = store.begin(&"f".repeat(40), Position::new(1), "master").await.unwrap();
        writer.write(&sample_rdb()).await.unwrap();
        store.commit(writer).await.unwrap();
        let mut bytes = std::fs::read(store.rdb_path()).unwrap();
        bytes[11] ^= 1;
        std::fs::write(store.rdb_path(), bytes).unwrap();
        assert!(SnapshotStore::open(dir.path()).unwrap().current().is_none());
    }

    #[tokio::test]
    async fn disk_faults_keep_the_snapshot_in_place_and_leave_no_temporary_file() {
        use crate::fs::{Fault, FaultyFs};
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::new();
        let store = Arc::new(SnapshotStore::open_with(dir.path(), fs.clone()).unwrap());
        let rdb = sample_rdb();
        let mut writer = store.begin(&"a".repeat(40), Position::new(10), "master").await.unwrap();
        writer.write(&rdb).await.unwrap();
        let first = store.commit(writer).await.unwrap();
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            names.sort();
            names
        };
        let installed = files();
        for fault in [Fault::NoSpace, Fault::SyncIo, Fault::NoDescriptors] {
            fs.set(fault, true);
            let result = async {
                let mut writer = store.begin(&"b".repeat(40), Position::new(20), "master").await?;
                writer.write(&rdb).await?;
                store.commit(writer).await
            }
            .await;
            fs.set(fault, false);
            assert!(matches!(result, Err(SnapshotError::Io { .. })), "{fault:?}: {result:?}");
            assert_eq!(store.current(), Some(first.clone()), "{fault:?}: the installed snapshot stays");
            assert_eq!(files(), installed, "{fault:?}: nothing of the failed one is left");
            assert_eq!(std::fs::read(store.rdb_path()).unwrap(), rdb);
        }
        let mut writer = store.begin(&"b".repeat(40), Position::new(20), "master").await.unwrap();
        writer.write(&rdb).await.unwrap();
        assert_eq!(
            store.commit(writer).await.unwrap().offset,
            Position::new(20),
            "the fault cleared, a snapshot installs again"
        );
    }
}
