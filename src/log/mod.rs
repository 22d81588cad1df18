//! The replication log: the master's stream, byte for byte, addressed by master offset.
//!
//! It is the one fan-out buffer of the relay. The upstream link is its only writer and appends whole
//! commands (never half a command, never an open MULTI); every downstream replica is a cursor that reads
//! shared [`Bytes`] slices out of it, so the stream is held once however many replicas follow it.
//!
//! Offsets follow Redis: the log holds the bytes at offsets `first_byte_offset ..= end`, where `end` is
//! the relay's `master_repl_offset`. A cursor is a *position*: the offset of the last byte it has, so
//! a replica asking `PSYNC <id> <n>` reads from position `n - 1`.
//!
//! The log also owns the replication ids (replid, replid2, second_repl_offset) because they describe
//! its history: whether a PSYNC may continue is a question about this log.

use std::collections::VecDeque;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use tokio::sync::watch;

/// The replid Redis shows when there is none (`clearReplicationId2`).
pub const NO_REPLID: &str = "0000000000000000000000000000000000000000";

/// The replication ids describing the log's history, as in `INFO replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplIds {
    pub replid: String,
    pub replid2: String,
    /// Highest offset + 1 up to which `replid2` is valid; -1 when there is no replid2.
    pub second_repl_offset: i64,
}

impl ReplIds {
    pub fn new(replid: String) -> ReplIds {
        ReplIds { replid, replid2: NO_REPLID.into(), second_repl_offset: -1 }
    }
}

/// What readers watch: the log's generation and its last offset. A new epoch means the history was
/// replaced or the ids changed, and every downstream replica must be disconnected (as a Redis replica
/// does on a new full sync or on `+CONTINUE <newid>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTip {
    pub epoch: u64,
    pub end: u64,
}

/// Why a cursor cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("the log no longer holds position {0}: it starts after it")]
    Trimmed(u64),
    #[error("the log's history changed (epoch {0})")]
    EpochChanged(u64),
}

struct Inner {
    /// `None` until the first full sync gives the log a history.
    ids: Option<ReplIds>,
    epoch: u64,
    /// Position before the first byte held (`first_byte_offset - 1`).
    start: u64,
    end: u64,
    /// Chunks in order, each with the position before its first byte.
    chunks: VecDeque<(u64, Bytes)>,
    capacity: u64,
}

/// The log handle shared by the upstream writer and the downstream readers.
pub struct ReplicationLog {
    inner: RwLock<Inner>,
    tip: watch::Sender<LogTip>,
}

/// A consistent view of the log's bounds and ids, for INFO and for PSYNC decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    pub ids: Option<ReplIds>,
    pub epoch: u64,
    pub first_byte_offset: u64,
    pub end: u64,
    pub capacity: u64,
}

impl LogSummary {
    pub fn histlen(&self) -> u64 {
        self.end + 1 - self.first_byte_offset
    }

    /// Whether the log holds everything after `position` (inclusive of "nothing yet to send").
    pub fn covers(&self, position: u64) -> bool {
        self.first_byte_offset <= position + 1 && position <= self.end
    }

    /// `masterTryPartialResynchronization`'s test: may a replica that asks `PSYNC replid offset`
    /// continue from this log?
    pub fn can_continue(&self, replid: &str, psync_offset: i64) -> bool {
        let Some(ids) = &self.ids else { return false };
        if psync_offset < 1 {
            return false;
        }
        let id_matches = replid.eq_ignore_ascii_case(&ids.replid)
            || (ids.second_repl_offset >= 0
                && replid.eq_ignore_ascii_case(&ids.replid2)
                && psync_offset <= ids.second_repl_offset);
        id_matches && self.covers(psync_offset as u64 - 1)
    }
}

impl ReplicationLog {
    pub fn new(capacity: u64) -> ReplicationLog {
        let (tip, _) = watch::channel(LogTip { epoch: 0, end: 0 });
        ReplicationLog {
            inner: RwLock::new(Inner {
                ids: None,
                epoch: 0,
                start: 0,
                end: 0,
                chunks: VecDeque::new(),
                capacity: capacity.max(16 * 1024),
            }),
            tip,
        }
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the log half-written (every mutation is a few
        // field assignments), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<LogTip> {
        self.tip.subscribe()
    }

    pub fn summary(&self) -> LogSummary {
        let inner = self.read_inner();
        LogSummary {
            ids: inner.ids.clone(),
            epoch: inner.epoch,
            first_byte_offset: inner.start + 1,
            end: inner.end,
            capacity: inner.capacity,
        }
    }

    /// Starts a new history at `offset` with `replid` (after a full sync): everything held is dropped.
    pub fn reset(&self, replid: String, offset: u64) {
        let tip = {
            let mut inner = self.write_inner();
            inner.ids = Some(ReplIds::new(replid));
            inner.epoch += 1;
            inner.start = offset;
            inner.end = offset;
            inner.chunks.clear();
            LogTip { epoch: inner.epoch, end: offset }
        };
        self.tip.send_replace(tip);
    }

    /// The master continued our history under a new id (`+CONTINUE <newid>`): the old id stays valid
    /// up to the current offset, like `shiftReplicationId`.
    pub fn shift_replid(&self, new_replid: String) {
        let tip = {
            let mut inner = self.write_inner();
            let end = inner.end;
            if let Some(ids) = inner.ids.as_mut() {
                ids.replid2 = std::mem::replace(&mut ids.replid, new_replid);
                ids.second_repl_offset = end as i64 + 1;
            } else {
                inner.ids = Some(ReplIds::new(new_replid));
            }
            inner.epoch += 1;
            LogTip { epoch: inner.epoch, end }
        };
        self.tip.send_replace(tip);
    }

    /// Appends whole commands. Trims the oldest chunks beyond the capacity.
    pub fn append(&self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let tip = {
            let mut inner = self.write_inner();
            let position = inner.end;
            inner.end += bytes.len() as u64;
            inner.chunks.push_back((position, bytes));
            // Keep at least `capacity` bytes, dropping whole chunks from the front.
            while let Some(front_len) = inner.chunks.front().map(|(_, c)| c.len() as u64) {
                if inner.end - inner.start - front_len < inner.capacity {
                    break;
                }
                inner.chunks.pop_front();
                inner.start += front_len;
            }
            LogTip { epoch: inner.epoch, end: inner.end }
        };
        self.tip.send_replace(tip);
    }

    /// Reads up to `max_bytes` (at least one chunk's worth) after `position`, as shared slices.
    /// Returns an empty vector when the cursor is at the end.
    pub fn read(&self, epoch: u64, position: u64, max_bytes: usize) -> Result<Vec<Bytes>, ReadError> {
        let inner = self.read_inner();
        if inner.epoch != epoch {
            return Err(ReadError::EpochChanged(inner.epoch));
        }
        if position < inner.start || position > inner.end {
            return Err(ReadError::Trimmed(position));
        }
        let mut out = Vec::new();
        if position == inner.end {
            return Ok(out);
        }
        // The chunk holding the byte after `position`: the last one starting at or before it.
        let index = inner.chunks.partition_point(|(chunk_start, _)| *chunk_start <= position) - 1;
        let mut taken = 0usize;
        for (chunk_start, chunk) in inner.chunks.range(index..) {
            let skip = position.saturating_sub(*chunk_start) as usize;
            let slice = chunk.slice(skip..);
            taken += slice.len();
            out.push(slice);
            if taken >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concat(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn reads_from_any_position_and_trims() {
        let log = ReplicationLog::new(16 * 1024);
        log.reset("a".repeat(40), 100);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(1000) {
            log.append(Bytes::copy_from_slice(piece));
        }
        let summary = log.summary();
        assert_eq!(summary.end, 100 + 40_000);
        assert!(summary.histlen() <= 16 * 1024 + 1000 && summary.histlen() >= 16 * 1024);
        let from = summary.first_byte_offset - 1 + 123;
        let got = concat(&log.read(summary.epoch, from, usize::MAX).unwrap());
        assert_eq!(got, data[(from - 100) as usize..]);
        assert_eq!(log.read(summary.epoch, 100, 10), Err(ReadError::Trimmed(100)));
        assert!(log.read(summary.epoch, summary.end, 10).unwrap().is_empty());
        assert_eq!(log.read(summary.epoch + 1, summary.end, 10), Err(ReadError::EpochChanged(summary.epoch)));
    }

    #[test]
    fn partial_resync_rules_follow_redis() {
        let log = ReplicationLog::new(1 << 20);
        assert!(!log.summary().can_continue("?", -1));
        let old = "a".repeat(40);
        let new = "b".repeat(40);
        log.reset(old.clone(), 1000);
        log.append(Bytes::from_static(b"0123456789"));
        let s = log.summary();
        assert!(s.can_continue(&old, 1001));
        assert!(s.can_continue(&old.to_uppercase(), 1011), "replid compares case-insensitively");
        assert!(!s.can_continue(&old, 1012), "beyond the end");
        assert!(!s.can_continue(&old, 1000), "before the first byte");
        assert!(!s.can_continue("?", -1));
        log.shift_replid(new.clone());
        log.append(Bytes::from_static(b"abc"));
        let s = log.summary();
        assert!(s.can_continue(&old, 1011), "replid2 up to second_repl_offset");
        assert!(!s.can_continue(&old, 1012), "replid2 beyond second_repl_offset");
        assert!(s.can_continue(&new, 1014));
        assert_eq!(s.ids.unwrap().second_repl_offset, 1011);
    }
}
