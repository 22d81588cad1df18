//! The snapshot cache: the master's newest RDB, kept on disk under the relay's directory exactly as the
//! master sent it (EOF framing stripped), with a metadata file beside it.
//!
//! A snapshot is written under a temporary name, verified (signature, EOF opcode, CRC-64), fsynced and
//! only then renamed into place, so `snapshot.rdb` is always a complete RDB that the master produced at
//! `snapshot.meta`'s offset. The store publishes the current snapshot through a `watch` so downstream
//! full syncs see a new one as soon as it is in place.

pub mod format;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

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

/// The snapshot cache of one relay.
pub struct SnapshotStore {
    dir: PathBuf,
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
    pub fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let store = SnapshotStore {
            dir: dir.to_path_buf(),
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
                let _ = std::fs::remove_file(entry.path());
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
        let mut file = std::fs::File::open(&rdb_path).map_err(io_error(&rdb_path))?;
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
    pub async fn begin(&self, replid: &str, offset: u64, source: &str) -> Result<SnapshotWriter, SnapshotError> {
        let n = self.temp_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp_path = self.dir.join(format!("{RDB_FILE}.tmp-{}-{n}", std::process::id()));
        let file = tokio::fs::File::create(&temp_path).await.map_err(io_error(&temp_path))?;
        Ok(SnapshotWriter {
            file: Some(tokio::io::BufWriter::with_capacity(1 << 20, file)),
            temp_path,
            verifier: RdbVerifier::default(),
            replid: replid.to_string(),
            offset,
            source: source.to_string(),
        })
    }

    /// Verifies, syncs and installs a fully received RDB as the current snapshot.
    pub async fn commit(&self, mut writer: SnapshotWriter) -> Result<SnapshotMeta, SnapshotError> {
        let facts = std::mem::take(&mut writer.verifier).finish()?;
        let mut file = writer.file.take().ok_or_else(|| SnapshotError::BadMeta {
            path: writer.temp_path.clone(),
            reason: "snapshot writer already closed".into(),
        })?;
        file.flush().await.map_err(io_error(&writer.temp_path))?;
        file.get_ref().sync_all().await.map_err(io_error(&writer.temp_path))?;
        drop(file);
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
        let meta_temp = PathBuf::from(format!("{}.meta", writer.temp_path.display()));
        // Synchronous and under the install lock: no await point, so a cancelled caller cannot
        // leave the file, the metadata and the published value disagreeing.
        {
            let _installing = self.install.lock().unwrap_or_else(|p| p.into_inner());
            write_synced(&meta_temp, meta_text.as_bytes())?;
            let rdb_path = self.rdb_path();
            std::fs::rename(&writer.temp_path, &rdb_path).map_err(io_error(&rdb_path))?;
            writer.temp_path = PathBuf::new();
            let meta_path = self.dir.join(META_FILE);
            std::fs::rename(&meta_temp, &meta_path).map_err(io_error(&meta_path))?;
            std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_error(&self.dir))?;
            self.current.send_replace(Some(meta.clone()));
        }
        Ok(meta)
    }

    /// Opens the cached RDB together with the metadata that describes it.
    pub fn open_current(&self) -> Option<(SnapshotMeta, std::fs::File)> {
        let _installing = self.install.lock().unwrap_or_else(|p| p.into_inner());
        let meta = self.current()?;
        let file = std::fs::File::open(self.rdb_path()).ok()?;
        (file.metadata().ok()?.len() == meta.size).then_some((meta, file))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// An RDB being received. Dropped without [`SnapshotStore::commit`], it deletes its temporary file, so
/// nothing from a failed transfer is ever cached.
pub struct SnapshotWriter {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    temp_path: PathBuf,
    verifier: RdbVerifier,
    replid: String,
    offset: u64,
    source: String,
}

impl SnapshotWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.verifier.update(bytes);
        if let Some(file) = self.file.as_mut() {
            file.write_all(bytes).await.map_err(io_error(&self.temp_path))?;
        }
        Ok(())
    }

    pub fn offset(&self) -> u64 {
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
        if !self.temp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp_path);
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
        let store = SnapshotStore::open(dir.path()).unwrap();
        assert!(store.current().is_none());
        let rdb = sample_rdb();
        let mut writer = store.begin(&"f".repeat(40), 42, "master").await.unwrap();
        for piece in rdb.chunks(5) {
            writer.write(piece).await.unwrap();
        }
        let meta = store.commit(writer).await.unwrap();
        assert_eq!(meta.offset, 42);
        assert_eq!(std::fs::read(store.rdb_path()).unwrap(), rdb);
        let reopened = SnapshotStore::open(dir.path()).unwrap();
        assert_eq!(reopened.current(), Some(meta));
    }

    #[tokio::test]
    async fn a_bad_rdb_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut rdb = sample_rdb();
        rdb[10] ^= 0x40;
        let mut writer = store.begin(&"f".repeat(40), 1, "master").await.unwrap();
        writer.write(&rdb).await.unwrap();
        assert!(matches!(store.commit(writer).await, Err(SnapshotError::Rdb(RdbError::CrcMismatch { .. }))));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(store.current().is_none());
    }

    #[tokio::test]
    async fn a_corrupt_cached_file_without_trailer_checksum_is_not_adopted() {
        // A master with `rdbchecksum no` writes a zero trailer: the cache still checks the content.
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut rdb = sample_rdb();
        let n = rdb.len();
        rdb[n - 8..].fill(0);
        let mut writer = store.begin(&"f".repeat(40), 1, "master").await.unwrap();
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
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut writer = store.begin(&"f".repeat(40), 1, "master").await.unwrap();
        writer.write(&sample_rdb()).await.unwrap();
        store.commit(writer).await.unwrap();
        let mut bytes = std::fs::read(store.rdb_path()).unwrap();
        bytes[11] ^= 1;
        std::fs::write(store.rdb_path(), bytes).unwrap();
        assert!(SnapshotStore::open(dir.path()).unwrap().current().is_none());
    }
}
