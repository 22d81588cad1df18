//! [`RelayReport`]: one relay's figures, gathered once from its [`RelayContext`] and rendered by both
//! `INFO` (`downstream::info`) and the Prometheus collector (`metrics`), so the two always agree:
//! where a figure is derived (the read offset, ages, lags, counts by state), it is derived here.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::context::RelayContext;
use crate::downstream::{ReplicaEntry, ReplicaState};
use crate::log::LogSummary;
use crate::offset::Position;
use crate::snapshot::SnapshotMeta;
use crate::upstream::fetch::FetcherStatus;
use crate::upstream::{LinkState, UpstreamStatus};

/// One relay's figures at one moment.
pub(crate) struct RelayReport {
    pub upstream: UpstreamStatus,
    pub log: LogSummary,
    pub snapshot: Option<SnapshotMeta>,
    pub fetcher: FetcherStatus,
    pub replicas: Vec<ReplicaEntry>,
    /// Log bytes kept beyond `log_size` for the cached snapshot.
    pub held_for_snapshot: u64,
    /// Unix time of the gathering, for ages.
    pub now_unix: u64,
}

impl RelayReport {
    pub fn gather(context: &RelayContext) -> RelayReport {
        RelayReport {
            upstream: context.upstream.borrow().clone(),
            log: context.log.summary(),
            snapshot: context.snapshots.current(),
            fetcher: context.fetcher_status.borrow().clone(),
            replicas: context.replicas.snapshot(),
            held_for_snapshot: context.log.held_beyond_retention(),
            now_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        }
    }

    pub fn link_up(&self) -> bool {
        self.upstream.state == LinkState::Connected
    }

    /// The master offset read so far (`slave_read_repl_offset`): what the link read while up, never
    /// behind what the log holds.
    pub fn read_offset(&self) -> Position {
        if self.link_up() {
            self.upstream.read_offset.max(self.log.end)
        } else {
            self.log.end
        }
    }

    /// Bytes read from the master and not yet applied.
    pub fn upstream_lag(&self) -> u64 {
        self.read_offset().bytes_since(self.log.end)
    }

    /// Seconds since the last byte from the master; `None` before any.
    pub fn last_io_seconds(&self) -> Option<f64> {
        self.upstream.last_io.map(|t| t.elapsed().as_secs_f64())
    }

    /// The cached snapshot's offset, -1 without one.
    pub fn snapshot_offset(&self) -> i64 {
        self.snapshot.as_ref().map(|s| s.offset.get() as i64).unwrap_or(-1)
    }

    pub fn snapshot_size(&self) -> u64 {
        self.snapshot.as_ref().map(|s| s.size).unwrap_or(0)
    }

    /// Age of the cached snapshot in seconds, -1 without one.
    pub fn snapshot_age_seconds(&self) -> i64 {
        self.snapshot.as_ref().map(|s| self.now_unix.saturating_sub(s.created_unix) as i64).unwrap_or(-1)
    }

    /// Keys in the cached snapshot, -1 when unknown.
    pub fn snapshot_keys(&self) -> i64 {
        self.snapshot.as_ref().and_then(|s| s.keys).map(|k| k.keys as i64).unwrap_or(-1)
    }

    pub fn snapshot_refusals(&self, reason: &str) -> u64 {
        self.fetcher.refusals.get(reason).copied().unwrap_or(0)
    }

    pub fn replicas_in(&self, state: ReplicaState) -> usize {
        self.replicas.iter().filter(|r| r.state == state).count()
    }

    /// The relay's offset minus what the replica ACKed.
    pub fn replica_lag_bytes(&self, replica: &ReplicaEntry) -> u64 {
        self.log.end.bytes_since(replica.ack_offset)
    }

    /// Seconds since the replica's last ACK (online replicas; 0 otherwise, as INFO shows it).
    pub fn replica_lag_seconds(&self, replica: &ReplicaEntry) -> f64 {
        if replica.state == ReplicaState::Online {
            replica.ack_time.elapsed().as_secs_f64()
        } else {
            0.0
        }
    }

    /// `ip:port`, as INFO, the metrics and the logs name a replica.
    pub fn replica_name(replica: &ReplicaEntry) -> String {
        format!("{}:{}", replica.ip, replica.port)
    }
}
