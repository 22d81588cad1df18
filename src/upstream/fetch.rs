//! Fresh snapshots on a side connection, from the relay's own replicas first and from the master
//! last: one task, the only one that asks anybody for an RDB outside the main link.
//!
//! A redis-server replica answers a sub-replica's `PSYNC ? -1` with `+FULLRESYNC <master replid>
//! <its offset>` and an RDB of exactly that history, and `REPLCONF rdb-only 1` makes it a one-off
//! transfer. So a snapshot taken from an online replica below the relay costs a fork on that replica,
//! not on the master. The fetcher asks, in the configured order (`snapshot_sources`):
//!
//! - `replicas`: the online replicas that ACKed (so are done loading) by highest acknowledged offset
//!   (lowest lag), skipping those
//!   opted out (`snapshot_source_exclude`), those without an announced port, those whose address is
//!   the one of a replica waiting for a full sync, and for a while those that just failed;
//! - `master`: at most once per `snapshot_min_interval`.
//!
//! A replica that came in through the TLS listener is asked over TLS: a redis-server replica with
//! `tls-replication yes` announces its TLS port as its listening port. The relay verifies it
//! against `tls-ca-cert-file` and presents its listener certificate as the client one, as
//! redis-server presents its own certificate to its master.
//!
//! A replica's RDB is accepted only when its replid is the log's current one and its offset lies in
//! the log (checked before the transfer and again before installing), and only after the CRC-64 holds
//! (the store verifies). Every refusal is counted by reason.
//!
//! It fetches on three occasions: a replica needs a full sync and the cache is not covered by the log
//! (any source); an rdb-only client (`redis-cli --rdb`) wants a snapshot taken now (any source, the
//! caller is told when none could give one); the log is about to drop the stream right after the
//! cached snapshot (replicas only: a master fork for a replica that may never come is what the relay
//! exists to avoid, and the log holds the stream up to `log_max_size` meanwhile).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::connection::MasterConnection;
use super::{handshake, rdb, LinkError, UpstreamConfig, UpstreamStatus};
use crate::config::{SnapshotSource, SnapshotSourcing};
use crate::downstream::{ReplicaState, ReplicaTable};
use crate::log::{LogSummary, ReplicationLog};
use crate::offset::Position;
use crate::protocol::{encode_command, string2ll_str};
use crate::snapshot::{SnapshotError, SnapshotMeta, SnapshotStore};
use crate::tls::TlsConnector;

/// How long a replica that failed as a source is not asked again.
const SOURCE_PENALTY: Duration = Duration::from_secs(30);
/// Least time between two refresh rounds (a waiting replica asks every second).
const MIN_ROUND_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two proactive refresh rounds whose sources all refused. A round that found
/// no source to ask (as right after a restart, before the replicas ACK) is tried again at the next
/// tick: the stream may pass the whole log in seconds.
const PROACTIVE_RETRY: Duration = Duration::from_secs(10);
/// How long an online replica that has not ACKed yet (it just connected or continued) counts as a
/// source about to be available: meanwhile a full sync waits for it rather than forking the master.
/// redis-server replicas ACK every second.
const FIRST_ACK_GRACE: Duration = Duration::from_secs(5);

/// Why a source's snapshot was refused: the `reason` label of the refusal counter.
pub const REFUSAL_REASONS: [&str; 7] = ["replid", "offset", "older", "transfer", "corrupt", "refused", "unreachable"];

/// Whether `snapshot` can still serve full syncs: the log holds (or will hold, once the main link
/// reaches it) the stream right after it, in the same history.
pub fn snapshot_is_current(snapshot: &SnapshotMeta, log: &LogSummary) -> bool {
    log.serves_snapshot(&snapshot.replid, snapshot.offset)
}

/// Whether the log is close to dropping the stream right after `snapshot`: more than three quarters
/// of `log_size` lies past it.
fn snapshot_is_expiring(snapshot: &SnapshotMeta, log: &LogSummary) -> bool {
    log.end.bytes_since(snapshot.offset) > log.capacity / 4 * 3
}

/// What the fetcher publishes for INFO and metrics.
#[derive(Debug, Clone, Default)]
pub struct FetcherStatus {
    /// Snapshots installed from each source kind (`replica`, `master`).
    pub refreshes_replica: u64,
    pub refreshes_master: u64,
    /// Refused snapshots by reason (see [`REFUSAL_REASONS`]).
    pub refusals: BTreeMap<&'static str, u64>,
    /// Master fetches skipped because the last one was less than `snapshot_min_interval` ago.
    pub master_rate_limited: u64,
    pub last_master_fetch: Option<Instant>,
    /// The last refusal, for operators: `<source>: <reason>: <detail>`.
    pub last_refusal: String,
    /// The source being asked right now, if any.
    pub fetching_from: Option<String>,
}

type FreshReply = oneshot::Sender<Result<SnapshotMeta, String>>;

/// Lets replicas and rdb-only clients ask for a fresh snapshot; cheap to clone.
#[derive(Clone)]
pub struct FetchRequests {
    wake: mpsc::Sender<()>,
    fresh: Arc<Mutex<Vec<FreshReply>>>,
}

impl FetchRequests {
    /// A replica needs a snapshot the log covers; asking twice is asking once.
    pub fn request(&self) {
        let _ = self.wake.try_send(());
    }

    /// An rdb-only client wants a snapshot taken now: the answer is the installed snapshot, or why
    /// no source could give one.
    pub fn fresh(&self) -> oneshot::Receiver<Result<SnapshotMeta, String>> {
        let (tx, rx) = oneshot::channel();
        self.fresh.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        self.request();
        rx
    }
}

/// One place to ask for an RDB.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Master,
    /// A replica's announced `ip:port`, and whether it is a TLS port.
    Replica {
        addr: String,
        tls: bool,
    },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Master => "master".to_string(),
            Source::Replica { addr, .. } => format!("replica {addr}"),
        }
    }

    fn is_replica(&self) -> bool {
        matches!(self, Source::Replica { .. })
    }
}

/// Why one source gave no snapshot.
struct Refusal {
    reason: &'static str,
    detail: String,
}

/// Why the fetcher runs a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// rdb-only clients wait for a snapshot taken now.
    Fresh,
    /// A replica waits for a full sync and the cache is not covered by the log.
    Stale,
    /// The log will soon drop the stream right after the cached snapshot.
    Proactive,
}

pub struct RdbFetcher {
    config: UpstreamConfig,
    sourcing: SnapshotSourcing,
    log: Arc<ReplicationLog>,
    snapshots: Arc<SnapshotStore>,
    replicas: Arc<ReplicaTable>,
    status: watch::Sender<UpstreamStatus>,
    published: watch::Sender<FetcherStatus>,
    requests: mpsc::Receiver<()>,
    fresh: Arc<Mutex<Vec<FreshReply>>>,
    penalties: HashMap<String, Instant>,
    /// TLS to replicas that came in through the TLS listener (`None` without a listener CA).
    replica_tls: Option<Arc<TlsConnector>>,
}

impl RdbFetcher {
    pub fn new(
        config: UpstreamConfig,
        sourcing: SnapshotSourcing,
        log: Arc<ReplicationLog>,
        snapshots: Arc<SnapshotStore>,
        replicas: Arc<ReplicaTable>,
        status: watch::Sender<UpstreamStatus>,
        replica_tls: Option<Arc<TlsConnector>>,
    ) -> (RdbFetcher, FetchRequests, watch::Receiver<FetcherStatus>) {
        let (wake, requests) = mpsc::channel(1);
        let fresh = Arc::new(Mutex::new(Vec::new()));
        let (published, published_rx) = watch::channel(FetcherStatus::default());
        let fetcher = RdbFetcher {
            config,
            sourcing,
            log,
            snapshots,
            replicas,
            status,
            published,
            requests,
            fresh: fresh.clone(),
            penalties: HashMap::new(),
            replica_tls,
        };
        (fetcher, FetchRequests { wake, fresh }, published_rx)
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut installed = self.snapshots.subscribe();
        let mut last_round: Option<Instant> = None;
        let mut next_proactive = Instant::now();
        loop {
            let mut asked = false;
            tokio::select! {
                request = self.requests.recv() => match request {
                    Some(()) => asked = true,
                    None => return,
                },
                _ = tick.tick() => {}
                changed = installed.changed() => if changed.is_err() { return },
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
            self.update_pin();
            let waiters: Vec<FreshReply> = std::mem::take(&mut *self.fresh.lock().unwrap_or_else(|p| p.into_inner()));
            let summary = self.log.summary();
            // Without a history the main link is doing a full sync of its own: its RDB will serve.
            if summary.ids.is_none() {
                for waiter in waiters {
                    let _ = waiter.send(Err("the relay has no replication history yet".into()));
                }
                continue;
            }
            let current = self.snapshots.current();
            let stale = current.as_ref().is_none_or(|s| !snapshot_is_current(s, &summary));
            let expiring = current.as_ref().is_some_and(|s| !stale && snapshot_is_expiring(s, &summary));
            let purpose = if !waiters.is_empty() {
                Purpose::Fresh
            } else if asked && stale {
                Purpose::Stale
            } else if (stale || expiring) && Instant::now() >= next_proactive {
                Purpose::Proactive
            } else {
                continue;
            };
            if let Some(last) = last_round {
                let wait = (last + MIN_ROUND_INTERVAL).saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                }
            }
            last_round = Some(Instant::now());
            let (result, asked_any) = self.round(purpose).await;
            if purpose == Purpose::Proactive && result.is_err() && asked_any {
                next_proactive = Instant::now() + PROACTIVE_RETRY;
            }
            self.update_pin();
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    /// Retention keeps the stream after the cached snapshot while the snapshot belongs to the log's
    /// history (up to `log_max_size`).
    fn update_pin(&self) {
        let summary = self.log.summary();
        let pin = self.snapshots.current().filter(|s| snapshot_is_current(s, &summary)).map(|s| s.offset);
        self.log.pin(pin);
    }

    /// Asks the sources in order until one gives a snapshot; returns it, or why none did, and
    /// whether any source was asked.
    async fn round(&mut self, purpose: Purpose) -> (Result<SnapshotMeta, String>, bool) {
        let mut failures = Vec::new();
        let mut asked_any = false;
        for kind in self.sourcing.sources.clone() {
            let candidates = match kind {
                SnapshotSource::Replicas => {
                    self.replica_candidates().into_iter().map(|(addr, tls)| Source::Replica { addr, tls }).collect()
                }
                SnapshotSource::Master if purpose == Purpose::Proactive => Vec::new(),
                // While a history reset is held the master's RDB is of the other history: asking for
                // it would only make the master fork in a loop.
                SnapshotSource::Master if self.status.borrow().history_held.is_some() => Vec::new(),
                // A replica that will be a source in a moment (connected, first ACK pending) is
                // worth the wait of a waiting replica; a master fork is not. rdb-only clients are
                // answered now (from the cache if need be).
                SnapshotSource::Master
                    if purpose == Purpose::Stale
                        && self.sourcing.sources.contains(&SnapshotSource::Replicas)
                        && self.replica_source_pending() =>
                {
                    failures.push("master: not asked while a replica source is about to ACK".to_string());
                    Vec::new()
                }
                SnapshotSource::Master => match self.master_wait() {
                    Some(wait) => {
                        self.published.send_modify(|s| s.master_rate_limited += 1);
                        tracing::info!(
                            next_allowed_in_seconds = wait.as_secs(),
                            "not fetching a snapshot from the master: the last fetch was less than snapshot_min_interval ago"
                        );
                        failures.push(format!("master: rate-limited for {} s more", wait.as_secs()));
                        Vec::new()
                    }
                    None => vec![Source::Master],
                },
            };
            for source in candidates {
                tracing::info!(
                    source = %source.describe(),
                    reason = match purpose {
                        Purpose::Fresh => "an rdb-only client wants current data",
                        Purpose::Stale => "a replica needs a full sync and the log no longer covers the cached snapshot",
                        Purpose::Proactive => "the log is about to drop the stream after the cached snapshot",
                    },
                    "fetching a fresh RDB on a side connection"
                );
                let started = Instant::now();
                asked_any = true;
                self.published.send_modify(|s| s.fetching_from = Some(source.describe()));
                let result = self.fetch_from(&source, purpose).await;
                self.published.send_modify(|s| s.fetching_from = None);
                match result {
                    Ok(meta) => {
                        tracing::info!(
                            source = %source.describe(),
                            offset = meta.offset.get(),
                            bytes = meta.size,
                            seconds = started.elapsed().as_secs_f64(),
                            "fresh RDB fetched and cached"
                        );
                        self.published.send_modify(|s| match source {
                            Source::Master => s.refreshes_master += 1,
                            Source::Replica { .. } => s.refreshes_replica += 1,
                        });
                        return (Ok(meta), true);
                    }
                    Err(refusal) => {
                        let line = format!("{}: {}: {}", source.describe(), refusal.reason, refusal.detail);
                        tracing::warn!("snapshot source refused: {line}");
                        if let Source::Replica { addr, .. } = &source {
                            self.penalties.insert(addr.clone(), Instant::now() + SOURCE_PENALTY);
                        }
                        self.published.send_modify(|s| {
                            *s.refusals.entry(refusal.reason).or_default() += 1;
                            s.last_refusal = line.clone();
                        });
                        failures.push(line);
                    }
                }
            }
        }
        if failures.is_empty() {
            failures.push("no snapshot source is available".into());
        }
        (Err(failures.join("; ")), asked_any)
    }

    /// Whether an online replica that could be asked has not ACKed yet but connected less than
    /// [`FIRST_ACK_GRACE`] ago.
    fn replica_source_pending(&self) -> bool {
        self.replicas.snapshot().iter().any(|r| {
            r.state == ReplicaState::Online
                && !r.acked
                && r.port != 0
                && r.ack_time.elapsed() < FIRST_ACK_GRACE
                && !self.sourcing.exclude.contains(&format!("{}:{}", r.ip, r.port))
        })
    }

    /// How long until the master may be asked again; `None` when it may be now.
    fn master_wait(&self) -> Option<Duration> {
        let last = self.published.borrow().last_master_fetch?;
        let wait = (last + self.sourcing.master_min_interval).saturating_duration_since(Instant::now());
        (!wait.is_zero()).then_some(wait)
    }

    /// Online replicas that may be asked (`ip:port` and whether it is a TLS port), best first:
    /// highest acknowledged offset, then the most recent ACK.
    fn replica_candidates(&mut self) -> Vec<(String, bool)> {
        let now = Instant::now();
        self.penalties.retain(|_, until| *until > now);
        let rows = self.replicas.snapshot();
        let syncing: Vec<String> =
            rows.iter().filter(|r| r.state != ReplicaState::Online).map(|r| format!("{}:{}", r.ip, r.port)).collect();
        let mut online: Vec<_> = rows
            .iter()
            .filter(|r| r.state == ReplicaState::Online && r.acked && (1..=i32::from(u16::MAX)).contains(&r.port))
            .map(|r| (format!("{}:{}", r.ip, r.port), r.ack_offset, r.ack_time, r.tls))
            .filter(|(addr, _, _, _)| {
                !self.sourcing.exclude.contains(addr) && !syncing.contains(addr) && !self.penalties.contains_key(addr)
            })
            .collect();
        online.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)));
        let mut addrs: Vec<(String, bool)> = online.into_iter().map(|(addr, _, _, tls)| (addr, tls)).collect();
        addrs.dedup_by(|a, b| a.0 == b.0);
        addrs
    }

    async fn fetch_from(&self, source: &Source, purpose: Purpose) -> Result<SnapshotMeta, Refusal> {
        let refuse = |reason: &'static str, detail: String| Refusal { reason, detail };
        let (addr, user, password) = match source {
            Source::Master => (self.config.addr(), self.config.user.clone(), self.config.password.clone()),
            Source::Replica { addr, .. } => {
                (addr.clone(), None, self.sourcing.password.clone().or_else(|| self.config.password.clone()))
            }
        };
        // TLS as to the master for the master; a replica over TLS when it came in that way (its
        // announced port is then its TLS port).
        let tls = match source {
            Source::Master => self.config.tls.as_deref(),
            Source::Replica { tls: false, .. } => None,
            Source::Replica { tls: true, .. } => match self.replica_tls.as_deref() {
                Some(connector) => Some(connector),
                None => {
                    return Err(refuse(
                        "unreachable",
                        "the replica came in over TLS and announced its TLS port, but tls-ca-cert-file is not set \
                         to verify it"
                            .into(),
                    ))
                }
            },
        };
        let mut conn = MasterConnection::connect(&addr, self.config.repl_timeout, tls)
            .await
            .map_err(|e| refuse("unreachable", e.to_string()))?;
        let announce = self.config.announce_version.as_deref();
        let handshake_result =
            handshake(&mut conn, user.as_deref(), password.as_deref(), self.config.listening_port, announce, true)
                .await;
        handshake_result.map_err(|e| match e {
            LinkError::Io(_) | LinkError::Timeout(_) | LinkError::Closed => refuse("unreachable", e.to_string()),
            other => refuse("refused", other.to_string()),
        })?;
        conn.send(&encode_command(&[b"PSYNC", b"?", b"-1"])).await.map_err(|e| refuse("unreachable", e.to_string()))?;
        let reply = conn
            .read_reply("waiting for the PSYNC reply (side fetch)")
            .await
            .map_err(|e| refuse("unreachable", e.to_string()))?;
        let mut parts = reply.strip_prefix("+FULLRESYNC").unwrap_or("").split_whitespace();
        let (Some(replid), Some(offset)) =
            (parts.next(), parts.next().and_then(string2ll_str).and_then(Position::from_last_byte_offset))
        else {
            return Err(refuse("refused", format!("PSYNC answered {reply:?}")));
        };
        if source.is_replica() {
            self.check_acceptable(replid, offset, purpose)?;
        }
        if *source == Source::Master {
            let now = Instant::now();
            self.published.send_modify(|s| s.last_master_fetch = Some(now));
            self.status.send_modify(|s| s.rdb_fetches += 1);
            // Another history is the main link's to judge (and maybe hold): a side fetch never
            // replaces the snapshot with it.
            if self.log.summary().ids.is_some_and(|ids| !ids.holds(replid, offset)) {
                return Err(refuse(
                    "replid",
                    format!("the master presents another history ({replid}); not cached, the main link decides"),
                ));
            }
        }
        let mut writer = self.snapshots.begin(replid, offset, &source.describe()).await.map_err(|e| {
            // The cache's own I/O failing is not the source's fault, but it gave no snapshot.
            refuse("transfer", e.to_string())
        })?;
        rdb::receive(&mut conn, &mut writer, &mut |_, _| {}).await.map_err(|e| match e {
            // The cache's own disk failing is not the source's fault either.
            LinkError::Snapshot(SnapshotError::Io { .. }) => refuse("transfer", e.to_string()),
            LinkError::Snapshot(_) | LinkError::BadPayload(_) => refuse("corrupt", e.to_string()),
            LinkError::MasterAborted(_) => refuse("refused", e.to_string()),
            other => refuse("transfer", other.to_string()),
        })?;
        // The history may have moved while the RDB came: check again before installing.
        if source.is_replica() {
            self.check_acceptable(replid, offset, purpose)?;
        }
        match self.snapshots.commit(writer).await {
            Ok(meta) => Ok(meta),
            // The relay's own disk: counted as such, not as a corrupt RDB.
            Err(e @ SnapshotError::Io { .. }) => {
                self.status.send_modify(|s| s.snapshot_write_errors += 1);
                tracing::error!("installing a fetched snapshot failed: {e}");
                Err(refuse("transfer", e.to_string()))
            }
            Err(e) => {
                if *source == Source::Master {
                    self.status.send_modify(|s| s.rdb_rejected += 1);
                }
                Err(refuse("corrupt", e.to_string()))
            }
        }
    }

    /// A replica's `+FULLRESYNC` is usable only in the log's current history, inside the log, and not
    /// older than the snapshot already cached (for a refresh: newer, or it would be fetched again and
    /// again, as from a relay below that has the same snapshot).
    fn check_acceptable(&self, replid: &str, offset: Position, purpose: Purpose) -> Result<(), Refusal> {
        let summary = self.log.summary();
        let current = summary.ids.as_ref().map(|ids| ids.replid.clone()).unwrap_or_default();
        if !replid.eq_ignore_ascii_case(&current) {
            return Err(Refusal { reason: "replid", detail: format!("replid {replid}, the relay's is {current}") });
        }
        if !summary.covers(offset) {
            return Err(Refusal {
                reason: "offset",
                detail: format!("offset {offset} is outside the log ({}..={})", summary.start, summary.end),
            });
        }
        if let Some(cached) = self.snapshots.current() {
            // For an rdb-only client the cached snapshot itself is as good when nothing was written
            // since; otherwise only a newer one is worth the transfer.
            let cache_is_at_end = purpose == Purpose::Fresh && cached.offset == summary.end;
            let not_newer = if cache_is_at_end { cached.offset > offset } else { cached.offset >= offset };
            if snapshot_is_current(&cached, &summary) && not_newer {
                return Err(Refusal {
                    reason: "older",
                    detail: format!("offset {offset} is not newer than the cached snapshot's {}", cached.offset),
                });
            }
        }
        Ok(())
    }
}
