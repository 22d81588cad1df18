//! Fresh RDBs on a side connection: when a replica needs a full sync and the cached snapshot is no
//! longer covered by the log, one task asks the master for an RDB alone (`REPLCONF rdb-only 1` +
//! `PSYNC ? -1`) without touching the main link. However many replicas ask meanwhile, one fetch runs,
//! and fetches are spaced so that a stuck replica cannot make the master fork in a loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::connection::MasterConnection;
use super::{handshake, rdb, LinkError, UpstreamConfig, UpstreamStatus};
use crate::log::{LogSummary, ReplicationLog};
use crate::protocol::encode_command;
use crate::snapshot::{SnapshotMeta, SnapshotStore};

/// The least time between two fetches.
const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Whether `snapshot` can still serve full syncs: the log holds (or will hold, once the main link
/// reaches it) the stream right after it, in the same history.
pub fn snapshot_is_current(snapshot: &SnapshotMeta, log: &LogSummary) -> bool {
    let Some(ids) = &log.ids else { return false };
    ids.holds(&snapshot.replid, snapshot.offset) && snapshot.offset + 1 >= log.first_byte_offset
}

/// Lets replicas ask for a fresh snapshot; cheap to clone, asking twice is asking once.
#[derive(Clone)]
pub struct FetchRequests(mpsc::Sender<()>);

impl FetchRequests {
    pub fn request(&self) {
        let _ = self.0.try_send(());
    }
}

pub struct RdbFetcher {
    config: UpstreamConfig,
    log: Arc<ReplicationLog>,
    snapshots: Arc<SnapshotStore>,
    status: watch::Sender<UpstreamStatus>,
    requests: mpsc::Receiver<()>,
}

impl RdbFetcher {
    pub fn new(
        config: UpstreamConfig,
        log: Arc<ReplicationLog>,
        snapshots: Arc<SnapshotStore>,
        status: watch::Sender<UpstreamStatus>,
    ) -> (RdbFetcher, FetchRequests) {
        let (tx, requests) = mpsc::channel(1);
        (RdbFetcher { config, log, snapshots, status, requests }, FetchRequests(tx))
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut last_attempt: Option<Instant> = None;
        loop {
            tokio::select! {
                request = self.requests.recv() => if request.is_none() { return },
                _ = crate::relay::stopped(&mut shutdown) => return,
            }
            let needed = match self.snapshots.current() {
                Some(snapshot) => !snapshot_is_current(&snapshot, &self.log.summary()),
                None => true,
            };
            // Without a history the main link is doing a full sync of its own: its RDB will serve.
            if !needed || self.log.summary().ids.is_none() {
                continue;
            }
            // While a history reset is held the master's RDB is of the other history: asking for it
            // would only make the master fork in a loop.
            if self.status.borrow().history_held.is_some() {
                continue;
            }
            if let Some(last) = last_attempt {
                let wait = (last + MIN_FETCH_INTERVAL).saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::relay::stopped(&mut shutdown) => return,
                }
            }
            last_attempt = Some(Instant::now());
            tracing::info!(master = %self.config.addr(), "the cached snapshot is not covered by the log: fetching a fresh RDB on a side connection");
            let started = Instant::now();
            match self.fetch_once().await {
                Ok(meta) => tracing::info!(
                    offset = meta.offset,
                    bytes = meta.size,
                    seconds = started.elapsed().as_secs_f64(),
                    "fresh RDB fetched and cached"
                ),
                Err(error @ (LinkError::Snapshot(_) | LinkError::BadPayload(_))) => {
                    self.status.send_modify(|s| s.rdb_rejected += 1);
                    tracing::warn!("side fetch: {error}");
                }
                Err(LinkError::HistoryHeld(replid)) => tracing::warn!(
                    new_replid = %replid,
                    "side fetch: the master presents another history; not cached (the main link decides)"
                ),
                Err(error) => tracing::warn!("side fetch of a fresh RDB failed: {error}"),
            }
        }
    }

    async fn fetch_once(&self) -> Result<SnapshotMeta, LinkError> {
        let mut conn =
            MasterConnection::connect(&self.config.addr(), self.config.repl_timeout, self.config.tls.as_deref())
                .await?;
        handshake(&self.config, &mut conn, true).await?;
        conn.send(&encode_command(&[b"PSYNC", b"?", b"-1"])).await?;
        let reply = conn.read_reply("waiting for the PSYNC reply (side fetch)").await?;
        let mut parts = reply.strip_prefix("+FULLRESYNC").unwrap_or("").split_whitespace();
        let (Some(replid), Some(offset)) = (parts.next(), parts.next().and_then(|o| o.parse::<u64>().ok())) else {
            return Err(LinkError::BadPsyncReply(reply));
        };
        self.status.send_modify(|s| s.rdb_fetches += 1);
        // Another history is the main link's to judge (and maybe hold): a side fetch never
        // replaces the snapshot with it.
        if self.log.summary().ids.is_some_and(|ids| !ids.holds(replid, offset)) {
            return Err(LinkError::HistoryHeld(replid.to_string()));
        }
        let mut writer = self.snapshots.begin(replid, offset).await?;
        rdb::receive(&mut conn, &mut writer, &mut |_, _| {}).await?;
        Ok(self.snapshots.commit(writer).await?)
    }
}
