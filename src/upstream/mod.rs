//! The upstream link: the relay as an ordinary replica of its master.
//!
//! One task owns the link. It connects, runs the replica handshake (`PING`, `AUTH`, `REPLCONF`,
//! `PSYNC`), receives a full-sync RDB into the snapshot cache or continues from the log's offset, then
//! follows the stream: whole commands go into the replication log, and ACKs go back every second and
//! on `REPLCONF GETACK` (`ACK <applied> FACK <durable>`, or the durable offset alone; with
//! `ack_replicas` only what the replicas below have ACKed, passed on as soon as they do). A new
//! history from the master may be held ([`history`]). On any failure it drops the unapplied tail and reconnects with
//! `PSYNC <replid> <offset+1>`. Its state is published through a `watch` for INFO and metrics.

mod connection;
pub mod fetch;
pub mod history;
pub mod rdb;
pub mod stream;
pub mod version;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::log::{ReplicationLog, WriterHandle};
use crate::offset::Position;
use crate::protocol::{encode_command, string2ll_str, ProtocolError};
use crate::snapshot::{SnapshotError, SnapshotStore};
use connection::MasterConnection;
use history::{HeldHistory, HistoryResetPolicy};
use rdb::PayloadForm;
use stream::StreamTracker;

/// How to reach and authenticate to the master.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The master's `host:port`; `REPLICAOF host port` changes it at run time.
    pub target: watch::Receiver<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The port we announce with `REPLCONF listening-port` (our listen port).
    pub listening_port: u16,
    /// The version announced with `REPLCONF version` (`upstream.announce_version`), if any.
    pub announce_version: Option<String>,
    pub repl_timeout: Duration,
    /// What to do when the master presents another history with far fewer keys.
    pub history_reset: HistoryResetPolicy,
    /// Below this fraction of the cached snapshot's keys a new history is a shrink.
    pub history_reset_min_key_ratio: f64,
    /// The replid of a held history an operator accepted (`RELAY HISTORY ACCEPT`).
    pub history_accept: watch::Receiver<Option<String>>,
    pub ack: AckMode,
    /// TLS to the master (`upstream_tls`), read from its files when the relay started.
    pub tls: Option<Arc<crate::tls::TlsConnector>>,
    /// `ack_replicas`: with K >= 1 the relay ACKs only what K of its replicas have ACKed.
    pub ack_replicas: usize,
    /// The relay's replicas and their ACKs (read for `ack_replicas`).
    pub replicas: Arc<crate::downstream::ReplicaTable>,
}

impl UpstreamConfig {
    pub fn addr(&self) -> String {
        self.target.borrow().clone()
    }
}

/// What the relay ACKs to its master (`upstream_ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// `REPLCONF ACK <applied> FACK <durable>`, as a Redis 7.2+ replica with AOF sends it: `WAIT`
    /// counts what the relay has in its log, `WAITAOF` what it has fsynced. Masters before 7.2
    /// ignore the FACK pair.
    Fack,
    /// `REPLCONF ACK <durable>`: only what the log's fsync policy made durable, so `WAIT` on any
    /// master means "on the relay's disk" (and waits up to the fsync period).
    Durable,
}

impl AckMode {
    pub fn parse(text: &str) -> Option<AckMode> {
        match text.to_ascii_lowercase().as_str() {
            "fack" => Some(AckMode::Fack),
            "durable" => Some(AckMode::Durable),
            _ => None,
        }
    }
}

/// The replica link's state, named as `ROLE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connect,
    Connecting,
    Handshake,
    Sync,
    Connected,
}

impl LinkState {
    pub fn role_name(self) -> &'static str {
        match self {
            LinkState::Connect => "connect",
            LinkState::Connecting => "connecting",
            LinkState::Handshake => "handshake",
            LinkState::Sync => "sync",
            LinkState::Connected => "connected",
        }
    }
}

/// What the link task publishes.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    pub state: LinkState,
    /// When the last byte came from the master (`master_last_io_seconds_ago`).
    pub last_io: Option<Instant>,
    /// When the link went down; `None` while up or if it was never up.
    pub link_down_since: Option<Instant>,
    pub ever_connected: bool,
    /// Applied offset plus the unapplied bytes read (`slave_read_repl_offset`).
    pub read_offset: Position,
    /// Payload size of the transfer in progress (-1 for the EOF form).
    pub sync_total_bytes: i64,
    pub sync_read_bytes: u64,
    pub rdb_fetches: u64,
    pub rdb_rejected: u64,
    pub reconnects: u64,
    pub partial_syncs: u64,
    /// Every byte read from the master on the main link (`total_net_repl_input_bytes`).
    pub input_bytes: u64,
    /// The new history the link refuses to follow, while it holds the old dataset.
    pub history_held: Option<HeldHistory>,
    /// Why the link last went down (`upstream_last_error`).
    pub last_error: Option<String>,
    /// Failed TLS handshakes with the master (a wrong CA, an expired or misnamed certificate).
    pub tls_failures: u64,
    /// Full syncs lost to the relay's own disk (writing or installing the snapshot failed).
    pub snapshot_write_errors: u64,
}

impl Default for UpstreamStatus {
    fn default() -> Self {
        UpstreamStatus {
            state: LinkState::Connect,
            last_io: None,
            link_down_since: None,
            ever_connected: false,
            read_offset: Position::ZERO,
            sync_total_bytes: -1,
            sync_read_bytes: 0,
            rdb_fetches: 0,
            rdb_rejected: 0,
            reconnects: 0,
            partial_syncs: 0,
            input_bytes: 0,
            history_held: None,
            last_error: None,
            tls_failures: 0,
            snapshot_write_errors: 0,
        }
    }
}

/// Why a link attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timeout {0}")]
    Timeout(&'static str),
    #[error("the master closed the connection")]
    Closed,
    #[error("protocol error from master: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("error reply to PING from master: {0}")]
    PingRefused(String),
    #[error("authentication to master failed: {0}")]
    Auth(String),
    #[error("master cannot PSYNC now, retrying: {0}")]
    TryLater(String),
    #[error("unexpected reply to PSYNC from master: {0}")]
    BadPsyncReply(String),
    #[error("master aborted the full sync: {0}")]
    MasterAborted(String),
    #[error("rejected RDB from master: {0}")]
    BadPayload(String),
    #[error("rejected RDB from master: {0}")]
    Truncated(String),
    #[error("{}", describe_snapshot_error(.0))]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    LogWriter(#[from] crate::log::WriterGone),
    #[error("holding the old dataset: the master's new history {0} is not followed until accepted")]
    HistoryHeld(String),
    #[error("TLS handshake with the master failed: {0}")]
    Tls(String),
}

/// A snapshot error as the link reports it: the relay's own disk, or an RDB the master sent.
fn describe_snapshot_error(error: &SnapshotError) -> String {
    match error {
        SnapshotError::Io { .. } => format!("writing the snapshot cache failed: {error}"),
        _ => format!("rejected RDB from master: {error}"),
    }
}

/// The upstream link task of one relay.
pub struct UpstreamLink {
    config: UpstreamConfig,
    log: Arc<ReplicationLog>,
    /// The log's one writer (its thread): the link hands it the stream and waits when it is full.
    writer: WriterHandle,
    snapshots: Arc<SnapshotStore>,
    status: watch::Sender<UpstreamStatus>,
}

/// The capability a relay announces when it asks for a snapshot on a side connection.
pub const RELAY_SNAPSHOT_CAPA: &str = "relay-snapshot";

const ACK_PERIOD: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// While a history reset is held, how often the link asks the master again (it may have been
/// restored, or repointed back into the old history); an accept or a REPLICAOF wakes it at once.
const HOLD_RECHECK: Duration = Duration::from_secs(30);

impl UpstreamLink {
    pub fn new(
        config: UpstreamConfig,
        log: Arc<ReplicationLog>,
        writer: WriterHandle,
        snapshots: Arc<SnapshotStore>,
    ) -> (UpstreamLink, watch::Receiver<UpstreamStatus>) {
        let (status, receiver) = watch::channel(UpstreamStatus::default());
        (UpstreamLink { config, log, writer, snapshots, status }, receiver)
    }

    /// The side-connection RDB fetcher that shares this link's master, log, snapshots and status,
    /// and asks the replicas in `replicas` first as `sourcing` says (over TLS with `replica_tls` to
    /// those that came in through the TLS listener).
    pub fn fetcher(
        &self,
        sourcing: crate::config::SnapshotSourcing,
        replicas: Arc<crate::downstream::ReplicaTable>,
        replica_tls: Option<Arc<crate::tls::TlsConnector>>,
    ) -> (fetch::RdbFetcher, fetch::FetchRequests, watch::Receiver<fetch::FetcherStatus>) {
        fetch::RdbFetcher::new(
            self.config.clone(),
            sourcing,
            self.log.clone(),
            self.snapshots.clone(),
            replicas,
            self.status.clone(),
            replica_tls,
        )
    }

    /// Runs until `shutdown` flips to true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::ZERO;
        let mut target = self.config.target.clone();
        target.mark_unchanged();
        let mut accept = self.config.history_accept.clone();
        accept.mark_unchanged();
        loop {
            let mut reached_stream: Option<Instant> = None;
            // Marks the address seen: a change from here on is a repoint (or CLIENT KILL TYPE master).
            let connected_to = target.borrow_and_update().clone();
            let result = tokio::select! {
                result = self.link_once(&mut reached_stream) => result,
                _ = crate::shutdown::stopped(&mut shutdown) => return,
                changed = target.changed() => {
                    if changed.is_ok() {
                        // Like replicationSetMaster: keep the log and the replicas, PSYNC the new master.
                        // The same address again is `CLIENT KILL TYPE master`: reconnect and continue.
                        let master = self.config.addr();
                        if master == connected_to {
                            tracing::info!(%master, "restarting the link to the master (CLIENT KILL TYPE master)");
                        } else {
                            tracing::info!(%master, "switching to a new master (REPLICAOF)");
                        }
                        reached_stream = Some(Instant::now() - Duration::from_secs(1));
                    }
                    Ok(())
                }
            };
            let held = matches!(result, Err(LinkError::HistoryHeld(_)));
            if let Err(error) = &result {
                let tls = matches!(error, LinkError::Tls(_));
                let text = error.to_string();
                self.status.send_modify(|s| {
                    s.last_error = Some(text);
                    s.tls_failures += u64::from(tls);
                });
            }
            if let Err(error) = result {
                match &error {
                    LinkError::HistoryHeld(_) => {}
                    // The relay's own disk failed, not the master's RDB: not a rejection.
                    LinkError::Snapshot(SnapshotError::Io { .. }) => {
                        self.status.send_modify(|s| s.snapshot_write_errors += 1);
                        tracing::error!(master = %self.config.addr(), "{error}");
                    }
                    LinkError::Snapshot(_) | LinkError::BadPayload(_) | LinkError::Truncated(_) => {
                        self.status.send_modify(|s| s.rdb_rejected += 1);
                        tracing::warn!(master = %self.config.addr(), "{error}");
                    }
                    _ => tracing::warn!(master = %self.config.addr(), "replication link lost: {error}"),
                }
            }
            let now = Instant::now();
            self.status.send_modify(|s| {
                if s.state == LinkState::Connected || (s.ever_connected && s.link_down_since.is_none()) {
                    s.link_down_since = Some(now);
                }
                s.state = LinkState::Connect;
                s.reconnects += 1;
                s.read_offset = self.log.summary().end;
            });
            // Reconnect at once after a link that streamed for a while (a killed link, a repoint);
            // back off when attempts fail early or keep failing right after PSYNC (a full disk, a
            // master sending garbage), so the master is not made to resend its backlog in a loop.
            let healthy = reached_stream.is_some_and(|since| since.elapsed() >= Duration::from_secs(1));
            backoff =
                if healthy { Duration::ZERO } else { (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF) };
            if held {
                // Asking again at once would make the master fork and send the same RDB in a loop.
                tokio::select! {
                    _ = tokio::time::sleep(HOLD_RECHECK) => {}
                    _ = accept.changed() => tracing::info!("history reset accepted by an operator: following the master"),
                    _ = target.changed() => {}
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
                continue;
            }
            // A repoint ends the wait at once: Sentinel's reconfiguration must not wait out a backoff
            // grown while the old master was unreachable.
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                changed = target.changed() => if changed.is_ok() {
                    tracing::info!(master = %self.config.addr(), "switching to a new master (REPLICAOF)");
                    backoff = Duration::ZERO;
                },
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }

    fn set_state(&self, state: LinkState) {
        self.status.send_modify(|s| s.state = state);
    }

    async fn link_once(&self, reached_stream: &mut Option<Instant>) -> Result<(), LinkError> {
        // What the last link handed to the writer is in the log before the log's end is read for
        // PSYNC (a failing disk holds the reconnect here, not the master's backlog).
        self.writer.barrier().await?;
        self.set_state(LinkState::Connecting);
        let mut conn =
            MasterConnection::connect(&self.config.addr(), self.config.repl_timeout, self.config.tls.as_deref())
                .await?;
        self.set_state(LinkState::Handshake);
        let (user, password) = (self.config.user.as_deref(), self.config.password.as_deref());
        let announce = self.config.announce_version.as_deref();
        handshake(&mut conn, user, password, self.config.listening_port, announce, false).await?;
        let summary = self.log.summary();
        let psync = match &summary.ids {
            Some(ids) => {
                let next = summary.end.next_offset().to_string();
                encode_command(&[b"PSYNC", ids.replid.as_bytes(), next.as_bytes()])
            }
            None => encode_command(&[b"PSYNC", b"?", b"-1"]),
        };
        conn.send(&psync).await?;
        let reply = conn.read_reply("waiting for the PSYNC reply").await?;
        let mut applied = if let Some(rest) = reply.strip_prefix("+FULLRESYNC") {
            let mut parts = rest.split_whitespace();
            let (Some(replid), Some(offset)) =
                (parts.next(), parts.next().and_then(string2ll_str).and_then(Position::from_last_byte_offset))
            else {
                return Err(LinkError::BadPsyncReply(reply));
            };
            if replid.len() != 40 {
                return Err(LinkError::BadPsyncReply(reply));
            }
            let other_history = summary.ids.as_ref().is_some_and(|ids| !ids.holds(replid, offset));
            if other_history && self.refuses_again(replid) {
                // The history already held: do not take its RDB again.
                return Err(LinkError::HistoryHeld(replid.to_string()));
            }
            self.full_sync(&mut conn, replid, offset, other_history).await?
        } else if let Some(rest) = reply.strip_prefix("+CONTINUE") {
            let new_replid = rest.trim();
            let current = summary.ids.as_ref().map(|ids| ids.replid.as_str()).unwrap_or("");
            if new_replid.len() == 40 && !new_replid.eq_ignore_ascii_case(current) {
                tracing::info!("master continued under a new replication id {new_replid} (was {current})");
                self.writer.shift_replid(new_replid.to_string()).await?;
            }
            self.status.send_modify(|s| {
                s.partial_syncs += 1;
                if s.history_held.take().is_some() {
                    tracing::warn!("the master continues the relay's history: the history-reset hold ends");
                }
            });
            tracing::info!(offset = summary.end.get(), "partial resynchronization accepted by the master");
            summary.end
        } else if reply.starts_with("-NOMASTERLINK") || reply.starts_with("-LOADING") {
            return Err(LinkError::TryLater(reply));
        } else {
            return Err(LinkError::BadPsyncReply(reply));
        };
        *reached_stream = Some(Instant::now());
        let now = Instant::now();
        self.status.send_modify(|s| {
            s.state = LinkState::Connected;
            s.link_down_since = None;
            s.ever_connected = true;
            s.last_io = Some(now);
        });
        self.follow_stream(&mut conn, &mut applied).await
    }

    /// Whether the hold policy still refuses the history `replid` (not accepted by an operator).
    fn accepted(&self, replid: &str) -> bool {
        self.config.history_accept.borrow().as_deref().is_some_and(|a| a.eq_ignore_ascii_case(replid))
    }

    /// Whether `replid` is the history already held and not accepted since.
    fn refuses_again(&self, replid: &str) -> bool {
        let held =
            self.status.borrow().history_held.as_ref().is_some_and(|h| h.new_replid.eq_ignore_ascii_case(replid));
        held && self.config.history_reset == HistoryResetPolicy::Hold && !self.accepted(replid)
    }

    /// For an RDB of another history, fully received in `writer`: whether to hold (keep the old
    /// snapshot and log, refuse this one) or follow. Holding is published and logged at ERROR.
    fn hold_new_history(&self, writer: &crate::snapshot::SnapshotWriter, replid: &str, offset: Position) -> bool {
        let new_keys = writer.keys();
        let old = self.snapshots.current();
        let old_replid = self.log.summary().ids.map(|ids| ids.replid).unwrap_or_default();
        let old_keys = old.as_ref().and_then(|meta| meta.keys).map(|k| k.keys);
        let shrink = old_keys.is_some_and(|old_keys| {
            history::is_shrink(old_keys, new_keys.keys, self.config.history_reset_min_key_ratio)
        });
        let hold = shrink && self.config.history_reset == HistoryResetPolicy::Hold && !self.accepted(replid);
        if !hold {
            tracing::warn!(
                new_replid = replid,
                new_offset = offset.get(),
                new_keys = new_keys.keys,
                new_keys_exact = new_keys.exact,
                old_replid = %old_replid,
                old_keys = ?old_keys,
                accepted = self.accepted(replid),
                "the master presents another history: following it (snapshot, log and replicas start over)"
            );
            return false;
        }
        let old_keys = old_keys.unwrap_or(0);
        tracing::error!(
            new_replid = replid,
            new_offset = offset.get(),
            new_keys = new_keys.keys,
            new_keys_exact = new_keys.exact,
            old_replid = %old_replid,
            old_keys,
            "HISTORY RESET HELD: the master presents another history with {} keys where the cached snapshot has {old_keys}; \
             keeping the old snapshot, log and replicas. Restore the master from this relay (redis-cli --rdb), or accept \
             the new history with RELAY HISTORY ACCEPT",
            new_keys.keys,
        );
        self.status.send_modify(|s| {
            let since = s.history_held.as_ref().filter(|h| h.new_replid == replid).map(|h| h.since);
            s.history_held = Some(HeldHistory {
                new_replid: replid.to_string(),
                new_offset: offset,
                new_keys,
                old_replid,
                old_keys,
                since: since.unwrap_or_else(std::time::SystemTime::now),
            });
        });
        true
    }

    /// Receives the RDB of a full sync; on success it becomes the snapshot and the log starts over at
    /// its offset. Returns the new applied offset. An RDB of `other_history` may be held instead
    /// (see [`history`]).
    async fn full_sync(
        &self,
        conn: &mut MasterConnection,
        replid: &str,
        offset: Position,
        other_history: bool,
    ) -> Result<Position, LinkError> {
        tracing::info!(replid, offset = offset.get(), "full resync from master, receiving the RDB");
        self.set_state(LinkState::Sync);
        self.status.send_modify(|s| s.rdb_fetches += 1);
        let started = Instant::now();
        let mut writer = self.snapshots.begin(replid, offset, "master").await?;
        let status = &self.status;
        let mut log_progress = crate::util::TransferProgress::new("RDB receipt from the master", self.config.addr());
        let mut progress = |total: i64, read: u64| {
            log_progress.update(read, total);
            status.send_modify(|s| {
                s.sync_total_bytes = total;
                s.sync_read_bytes = read;
            })
        };
        let form = rdb::receive(conn, &mut writer, &mut progress).await?;
        if other_history && self.hold_new_history(&writer, replid, offset) {
            // The writer's temporary file goes with it: nothing of the new history is kept.
            return Err(LinkError::HistoryHeld(replid.to_string()));
        }
        let meta = self.snapshots.commit(writer).await?;
        // Only a complete, verified RDB replaces the history (and, through the epoch, drops the
        // downstream replicas of the old one).
        self.writer.reset(replid.to_string(), offset).await?;
        self.status.send_modify(|s| s.history_held = None);
        tracing::info!(
            bytes = meta.size,
            rdb_version = meta.rdb_version,
            seconds = started.elapsed().as_secs_f64(),
            "RDB received and cached"
        );
        if form == PayloadForm::EofMark {
            // The master streams nothing after an EOF-marked payload until our first ACK.
            conn.send(&ack_command(self.config.ack, offset, offset)).await?;
        }
        Ok(offset)
    }

    /// The ACK for `applied` (everything up to it is in the log) under the ACK mode; the durable
    /// part is what the log's fsync policy has made so. With `ack_replicas` K >= 1, also capped by
    /// what K replicas below have ACKed, and `None` (no ACK at all, so the master sees the relay
    /// lag) while fewer than K replicas ACK.
    fn ack(&self, applied: Position) -> Option<Bytes> {
        // Applied means written to the log: not the chunks still in the writer's channel, which a
        // kill of the relay would lose.
        let applied = applied.min(self.log.appended());
        let acked = match self.config.ack_replicas {
            0 => applied,
            k => self.config.replicas.acked_by(k)?.min(applied),
        };
        Some(ack_command(self.config.ack, acked, self.log.durable_offset()))
    }

    fn publish_progress(&self, conn: &MasterConnection, applied: Position, published_read: &mut u64) {
        let read_offset = applied + conn.buf.len() as u64;
        let last_io = conn.last_io;
        let new_input = conn.total_read - *published_read;
        *published_read = conn.total_read;
        self.status.send_modify(|s| {
            s.read_offset = read_offset;
            s.last_io = Some(last_io);
            s.input_bytes += new_input;
        });
    }

    async fn follow_stream(&self, conn: &mut MasterConnection, applied: &mut Position) -> Result<(), LinkError> {
        let mut tracker = StreamTracker::default();
        let mut replica_acks = self.config.replicas.subscribe_acks();
        let end_to_end = self.config.ack_replicas > 0;
        let mut passed_on = Position::ZERO;
        let mut ack_timer = tokio::time::interval(ACK_PERIOD);
        ack_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_published = Instant::now();
        let mut published_read = 0u64;
        loop {
            if !conn.buf.is_empty() {
                let scanned = tracker.scan(&conn.buf, applied.get())?;
                let getack_at = scanned.getack_before.map(|before| *applied + before as u64);
                if scanned.appliable > 0 {
                    let chunk: Bytes = conn.buf.split_to(scanned.appliable).freeze();
                    tracker.consumed(scanned.appliable);
                    *applied += chunk.len() as u64;
                    // Waits while the writer's channel is full: the master's stream is then not read.
                    self.writer.append(chunk).await?;
                }
                if let Some(offset) = getack_at {
                    // The answer covers the bytes before the GETACK once they are in the log (the
                    // ACK never counts what is still on its way to the writer).
                    self.writer.barrier().await?;
                    if let Some(ack) = self.ack(offset) {
                        conn.send(&ack).await?;
                    }
                }
            }
            if last_published.elapsed() >= Duration::from_millis(100) {
                last_published = Instant::now();
                self.publish_progress(conn, *applied, &mut published_read);
            }
            tokio::select! {
                read = conn.fill("following the stream (repl-timeout)") => { read?; }
                _ = ack_timer.tick() => {
                    if let Some(ack) = self.ack(*applied) {
                        conn.send(&ack).await?;
                    }
                    self.publish_progress(conn, *applied, &mut published_read);
                }
                Ok(()) = replica_acks.changed(), if end_to_end => {
                    // Pass a replica's ACK on as soon as it moves the K-th offset, so WAIT on the
                    // master returns when a replica below has the write.
                    let quorum = self.config.replicas.acked_by(self.config.ack_replicas).map(|o| o.min(*applied));
                    if let Some(offset) = quorum.filter(|offset| *offset > passed_on) {
                        passed_on = offset;
                        if let Some(ack) = self.ack(*applied) {
                            conn.send(&ack).await?;
                        }
                    }
                }
            }
        }
    }
}

/// PING, then the pipelined AUTH and REPLCONFs, one reply read per command sent. With `rdb_only` the
/// master is asked for an RDB and no stream (`REPLCONF rdb-only 1`, Redis 7.0+). With
/// `announce_version`, `REPLCONF version <v>` after the capabilities, as a Valkey 8+ replica sends
/// it: a Valkey 9 master picks the RDB format for that version; other masters answer `-ERR
/// Unrecognized REPLCONF option`, which is not critical (Valkey's replica ignores it too).
/// The same handshake serves a replica asked for a snapshot (then `user`/`password` are the snapshot
/// source's): a replica answers a sub-replica's `PSYNC` like a master.
async fn handshake(
    conn: &mut MasterConnection,
    user: Option<&str>,
    password: Option<&str>,
    listening_port: u16,
    announce_version: Option<&str>,
    rdb_only: bool,
) -> Result<(), LinkError> {
    conn.send(&encode_command(&[b"PING"])).await?;
    let pong = conn.read_reply("waiting for the PING reply").await?;
    let acceptable = pong.starts_with('+')
        || pong.starts_with("-NOAUTH")
        || pong.starts_with("-NOPERM")
        || pong.starts_with("-ERR operation not permitted");
    if !acceptable {
        return Err(LinkError::PingRefused(pong));
    }
    // The rest of the handshake is pipelined, one reply per command, like redis-server does it.
    let mut pipeline = Vec::new();
    let auth_sent = match (user, password) {
        (Some(user), Some(password)) => {
            pipeline.extend_from_slice(&encode_command(&[b"AUTH", user.as_bytes(), password.as_bytes()]));
            true
        }
        (None, Some(password)) => {
            pipeline.extend_from_slice(&encode_command(&[b"AUTH", password.as_bytes()]));
            true
        }
        _ => false,
    };
    let port = listening_port.to_string();
    pipeline.extend_from_slice(&encode_command(&[b"REPLCONF", b"listening-port", port.as_bytes()]));
    if rdb_only {
        // `capa relay-snapshot` (ignored by redis-server, which skips unknown capabilities) tells a
        // relay below that a relay above wants its cached snapshot as it is, not a fresh one: two
        // relays never wait on each other for one.
        pipeline.extend_from_slice(&encode_command(&[
            b"REPLCONF",
            b"capa",
            b"eof",
            b"capa",
            b"psync2",
            b"capa",
            RELAY_SNAPSHOT_CAPA.as_bytes(),
        ]));
    } else {
        pipeline.extend_from_slice(&encode_command(&[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"]));
    }
    let mut replconfs = vec!["listening-port", "capa"];
    if let Some(version) = announce_version {
        pipeline.extend_from_slice(&encode_command(&[b"REPLCONF", b"version", version.as_bytes()]));
        replconfs.push("version");
    }
    if rdb_only {
        pipeline.extend_from_slice(&encode_command(&[b"REPLCONF", b"rdb-only", b"1"]));
        replconfs.push("rdb-only");
    }
    conn.send(&pipeline).await?;
    if auth_sent {
        let reply = conn.read_reply("waiting for the AUTH reply").await?;
        if reply.starts_with('-') {
            return Err(LinkError::Auth(reply));
        }
    }
    for what in replconfs {
        let reply = conn.read_reply("waiting for a REPLCONF reply").await?;
        if reply.starts_with('-') && what == "rdb-only" {
            return Err(LinkError::BadPsyncReply(format!("master refused REPLCONF rdb-only: {reply}")));
        }
        if reply.starts_with('-') {
            tracing::info!("(non critical) master does not understand REPLCONF {what}: {reply}");
        }
    }
    Ok(())
}

/// `REPLCONF ACK`, as `replicationSendAck` writes it: with [`AckMode::Fack`],
/// `ACK <applied> FACK <durable>` (Redis 7.2+ with AOF; `replconfCommand` of earlier versions reads
/// the ACK pair and ignores the rest); with [`AckMode::Durable`], `ACK <durable>` alone.
pub(crate) fn ack_command(mode: AckMode, applied: Position, durable: Position) -> Bytes {
    let durable = durable.min(applied).to_string();
    match mode {
        AckMode::Fack => {
            let applied = applied.to_string();
            encode_command(&[b"REPLCONF", b"ACK", applied.as_bytes(), b"FACK", durable.as_bytes()])
        }
        AckMode::Durable => encode_command(&[b"REPLCONF", b"ACK", durable.as_bytes()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_lines_are_byte_exact() {
        assert_eq!(
            &ack_command(AckMode::Fack, Position::new(1234), Position::new(1000))[..],
            b"*5\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$4\r\n1234\r\n$4\r\nFACK\r\n$4\r\n1000\r\n"
        );
        assert_eq!(
            &ack_command(AckMode::Durable, Position::new(1234), Position::new(1000))[..],
            b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$4\r\n1000\r\n"
        );
        // The durable offset never runs ahead of the applied one (a GETACK mid-buffer).
        assert_eq!(
            &ack_command(AckMode::Fack, Position::new(7), Position::new(9))[..],
            b"*5\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$1\r\n7\r\n$4\r\nFACK\r\n$1\r\n7\r\n"
        );
        assert_eq!(
            &ack_command(AckMode::Durable, Position::new(7), Position::new(9))[..],
            b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$1\r\n7\r\n"
        );
    }
}
