//! The RDB version guard: which replicas a full sync from the cached snapshot is refused to.
//!
//! A replica that cannot load the snapshot's RDB version (Redis 7.0 gets RDB 11 or 12, Valkey 8
//! gets 12 or 80) logs "Can't handle RDB format version", drops its link and asks again: each
//! attempt would be a whole transfer, forever. Two ways to stop that:
//!
//! - a replica that announces its version (`REPLCONF version`, Valkey 8+) is refused at once when
//!   that version cannot load the snapshot's RDB version;
//! - for one that announces nothing, the failure loop: a replica (`ip:listening-port`) whose full
//!   syncs end without a single ACK and who asks again with `PSYNC ? -1` (a replica that failed to
//!   load has no history left to offer; one that loaded offers its own) within
//!   [`RESYNC_LOOP_WINDOW`] of each end gets two transfers, then is refused for a backoff period (doubling each time, capped), then
//!   gets one more transfer; an ACK (it loaded the RDB) clears its record, and so does a change of
//!   the snapshot's RDB version (a new format may load: it is served at once).
//!
//! The guard owns the per-replica records; sessions ask it before a full sync and tell it how the
//! transfer ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::snapshot::format::{header_for, FIRST_VALKEY_RDB_VERSION};

/// A new full-sync request this soon after the end of an unACKed transfer continues a loop (a
/// redis-server replica retries about a second after a failed load).
pub const RESYNC_LOOP_WINDOW: Duration = Duration::from_secs(10);

/// Transfers a looping replica gets before it is refused.
const TRANSFERS_BEFORE_BACKOFF: u32 = 2;

/// Records kept before idle ones are pruned (each is a few dozen bytes).
const MAX_RECORDS: usize = 4096;

/// The RDB versions a server of version `0x00XXYYZZ` (as `REPLCONF version` announces it) loads:
/// RDB versions up to `max`, and with `valkey_own` Valkey's own (80 and up, to `max`) but never
/// Redis's 12 to 79 (Valkey's foreign range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loadable {
    pub max: u32,
    pub valkey: bool,
}

impl Loadable {
    pub fn loads(self, rdb_version: u32) -> bool {
        if self.valkey {
            rdb_version <= 11 || (FIRST_VALKEY_RDB_VERSION..=self.max).contains(&rdb_version)
        } else {
            rdb_version <= self.max
        }
    }

    fn describe(self) -> String {
        if self.valkey && self.max >= FIRST_VALKEY_RDB_VERSION {
            format!("RDB versions up to 11 and {FIRST_VALKEY_RDB_VERSION} to {}", self.max)
        } else {
            format!("RDB versions up to {}", self.max)
        }
    }
}

/// What a replica of this announced version loads. Only Valkey (8.0 and later) announces its version
/// (its `version2num`): from 7.2 the table is Valkey's `RDB_VERSION_MAP` (11 from 7.2, 80 from 9.0,
/// 81 from 9.2), below it Redis's (a version older than Valkey, announced by a relay configured so).
pub fn loadable_by(version: u32) -> Loadable {
    let redis = |max| Loadable { max, valkey: false };
    match version {
        v if v >= 0x09_02_00 => Loadable { max: 81, valkey: true },
        v if v >= 0x09_00_00 => Loadable { max: 80, valkey: true },
        v if v >= 0x07_02_00 => Loadable { max: 11, valkey: true },
        v if v >= 0x07_00_00 => redis(10),
        v if v >= 0x05_00_00 => redis(9),
        v if v >= 0x04_00_00 => redis(8),
        v if v >= 0x03_02_00 => redis(7),
        _ => redis(6),
    }
}

/// One replica's recent full syncs.
#[derive(Debug, Default)]
struct Record {
    /// Consecutive transfers that ended without an ACK, each asked for within the window.
    failed: u32,
    /// When the last unACKed transfer ended.
    last_failure: Option<Instant>,
    /// The snapshot's RDB version of those transfers (a change clears the record).
    rdb_version: u32,
    /// Refused until then, for the snapshot version `rdb_version`.
    backoff_until: Option<Instant>,
    /// Backoffs so far in this loop (the next one is `base * 2^backoffs`).
    backoffs: u32,
    /// Whether the ERROR line for this replica was written (once per replica).
    logged_loop: bool,
    logged_version: bool,
}

/// The guard of one relay.
pub struct SyncGuard {
    backoff: Duration,
    backoff_max: Duration,
    records: Mutex<HashMap<String, Record>>,
    /// Full syncs refused because the announced version cannot load the snapshot.
    pub refused_rdb_version: AtomicU64,
    /// Full syncs refused to a replica in a failure loop's backoff.
    pub refused_resync_loop: AtomicU64,
}

/// Why a full sync is refused: the error line to send (without the leading `-`).
pub type Refusal = String;

/// The request a full sync answers, as far as loop detection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// `PSYNC ? -1`: a replica with nothing to continue, as one is after a failed load.
    Fresh,
    /// `PSYNC <replid> <offset>` the log cannot continue: the replica has a history of its own.
    OwnHistory,
    /// `SYNC`, or an rdb-only client: never ACKs, never tracked.
    Untracked,
}

impl SyncGuard {
    /// `backoff` zero turns the loop detection off (the announced-version check stays).
    pub fn new(backoff: Duration, backoff_max: Duration) -> SyncGuard {
        SyncGuard {
            backoff,
            backoff_max: backoff_max.max(backoff),
            records: Mutex::new(HashMap::new()),
            refused_rdb_version: AtomicU64::new(0),
            refused_resync_loop: AtomicU64::new(0),
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replicas refused right now for a loop (INFO `replicas_in_resync_backoff`).
    pub fn in_backoff(&self) -> usize {
        let now = Instant::now();
        self.records().values().filter(|r| r.backoff_until.is_some_and(|until| until > now)).count()
    }

    /// Before a full sync of a snapshot of `rdb_version` to the replica `key` (`ip:port`; `None`
    /// when it announced no port: no loop detection), which announced `version` (text, number).
    /// `tracked`: a replica's `PSYNC` (not `SYNC` nor an rdb-only client, which never ACK), with
    /// `fresh` when it is `PSYNC ? -1`.
    pub fn check(
        &self,
        key: Option<&str>,
        version: Option<&(String, u32)>,
        rdb_version: u32,
        ask: Ask,
        now: Instant,
    ) -> Result<(), Refusal> {
        if let Some((text, number)) = version {
            let loadable = loadable_by(*number);
            if !loadable.loads(rdb_version) {
                self.refused_rdb_version.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "ERR the relay's snapshot is RDB version {rdb_version} ({}), which a replica of version {text} \
                     cannot load ({}): full sync refused",
                    header_for(rdb_version),
                    loadable.describe(),
                );
                let first = key.is_none_or(|key| {
                    let mut records = self.records();
                    let record = records.entry(key.to_string()).or_default();
                    !std::mem::replace(&mut record.logged_version, true)
                });
                if first {
                    tracing::error!(replica = key.unwrap_or("?"), version = %text, rdb_version, "{message}");
                }
                return Err(message);
            }
        }
        let Some(key) = key.filter(|_| !self.backoff.is_zero()) else {
            return Ok(());
        };
        let mut records = self.records();
        if records.len() >= MAX_RECORDS {
            let stale = self.backoff_max + RESYNC_LOOP_WINDOW;
            records.retain(|_, r| {
                r.backoff_until.is_some_and(|until| until > now)
                    || r.last_failure.is_some_and(|at| now.duration_since(at) < stale)
            });
        }
        let record = records.entry(key.to_string()).or_default();
        if record.rdb_version != rdb_version {
            // Another format: whatever failed before may load now.
            let logged = (record.logged_loop, record.logged_version);
            *record = Record { rdb_version, logged_loop: logged.0, logged_version: logged.1, ..Record::default() };
        }
        if let Some(until) = record.backoff_until {
            if now < until {
                self.refused_resync_loop.fetch_add(1, Ordering::Relaxed);
                return Err(loop_refusal(key, rdb_version, until - now, record.failed));
            }
            // Backoff over: one more transfer; failing again within the window backs off again.
            record.backoff_until = None;
            record.failed = TRANSFERS_BEFORE_BACKOFF - 1;
            record.last_failure = Some(now);
        }
        if ask == Ask::Untracked {
            return Ok(());
        }
        let continues_loop =
            ask == Ask::Fresh && record.last_failure.is_some_and(|at| now.duration_since(at) <= RESYNC_LOOP_WINDOW);
        if !continues_loop {
            record.failed = 0;
            record.backoffs = 0;
            return Ok(());
        }
        if record.failed < TRANSFERS_BEFORE_BACKOFF {
            return Ok(());
        }
        let period = self.backoff.saturating_mul(1u32 << record.backoffs.min(20)).min(self.backoff_max);
        record.backoffs += 1;
        record.backoff_until = Some(now + period);
        self.refused_resync_loop.fetch_add(1, Ordering::Relaxed);
        let message = loop_refusal(key, rdb_version, period, record.failed);
        if !std::mem::replace(&mut record.logged_loop, true) {
            tracing::error!(replica = key, rdb_version, backoff_seconds = period.as_secs_f64(), "{message}");
        } else {
            tracing::warn!(replica = key, rdb_version, backoff_seconds = period.as_secs_f64(), "{message}");
        }
        Err(message)
    }

    /// After a tracked full sync whose payload was (at least partly) sent: `acked` when the replica
    /// ACKed on that link, which means it loaded the RDB.
    pub fn finished(&self, key: &str, acked: bool, now: Instant) {
        if self.backoff.is_zero() {
            return;
        }
        let mut records = self.records();
        let Some(record) = records.get_mut(key) else { return };
        if acked {
            let logged = (record.logged_loop, record.logged_version);
            *record = Record {
                rdb_version: record.rdb_version,
                logged_loop: logged.0,
                logged_version: logged.1,
                ..Record::default()
            };
        } else {
            record.failed += 1;
            record.last_failure = Some(now);
        }
    }
}

fn loop_refusal(key: &str, rdb_version: u32, period: Duration, failed: u32) -> Refusal {
    format!(
        "ERR full sync refused for {}s: replica {key} announced no version and asked again right after each of its \
         last {failed} full syncs without acknowledging one; it likely cannot load the relay's snapshot, RDB \
         version {rdb_version} ({})",
        period.as_secs().max(1),
        header_for(rdb_version),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_versions_map_to_what_they_load() {
        let v = |text| crate::upstream::version::version_number(text).unwrap();
        assert!(!loadable_by(v("7.2.0")).loads(12));
        assert!(loadable_by(v("7.2.0")).loads(11));
        assert!(!loadable_by(v("8.1.1")).loads(12));
        assert!(!loadable_by(v("8.0.0")).loads(80));
        assert!(loadable_by(v("9.0.0")).loads(80));
        assert!(!loadable_by(v("9.0.0")).loads(12), "Valkey refuses Redis 7.4+'s RDB 12 (its foreign range)");
        assert!(!loadable_by(v("9.0.0")).loads(81));
        assert!(loadable_by(v("9.2.0")).loads(81));
        assert!(loadable_by(v("7.0.15")).loads(10));
        assert!(!loadable_by(v("7.0.15")).loads(11));
        assert!(!loadable_by(v("6.2.0")).loads(10));
    }

    #[test]
    fn a_loop_gets_two_transfers_then_a_doubling_backoff() {
        let guard = SyncGuard::new(Duration::from_secs(10), Duration::from_secs(25));
        let key = Some("10.0.0.1:6380");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let serve = |now| {
            let result = guard.check(key, None, 11, Ask::Fresh, now);
            if result.is_ok() {
                guard.finished("10.0.0.1:6380", false, now);
            }
            result
        };
        assert!(serve(at(0)).is_ok());
        assert!(serve(at(1)).is_ok());
        assert!(serve(at(2)).is_err(), "third transfer within the window is refused");
        assert!(serve(at(11)).is_err(), "still in the 10 s backoff");
        assert!(serve(at(12)).is_ok(), "one transfer after the backoff");
        assert!(serve(at(13)).is_err(), "then a 20 s backoff");
        assert!(serve(at(32)).is_err());
        assert!(serve(at(34)).is_ok());
        assert!(serve(at(35)).is_err(), "capped at 25 s");
        assert!(serve(at(59)).is_err());
        assert!(serve(at(61)).is_ok());
        // A new snapshot format is served at once.
        assert!(guard.check(key, None, 11, Ask::Fresh, at(62)).is_err());
        assert!(guard.check(key, None, 10, Ask::Fresh, at(62)).is_ok());
        assert_eq!(guard.refused_resync_loop.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn acked_or_spaced_out_syncs_are_no_loop() {
        let guard = SyncGuard::new(Duration::from_secs(10), Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let key = "10.0.0.2:6380";
        for round in 0..5 {
            assert!(guard.check(Some(key), None, 11, Ask::Fresh, at(round)).is_ok());
            guard.finished(key, true, at(round));
        }
        // Failures far apart: a replica restarted now and then.
        for round in 0..5 {
            assert!(guard.check(Some(key), None, 11, Ask::Fresh, at(100 + round * 60)).is_ok());
            guard.finished(key, false, at(100 + round * 60));
        }
        // A replica that loaded (it offers its own history) and asks again at once, unACKed.
        for s in 0..5 {
            assert!(guard.check(Some(key), None, 11, Ask::OwnHistory, at(400 + s)).is_ok());
            guard.finished(key, false, at(400 + s));
        }
        for s in 0..5 {
            assert!(guard.check(Some(key), None, 11, Ask::Untracked, at(450 + s)).is_ok());
        }
        // No port, no key.
        for s in 0..5 {
            assert!(guard.check(None, None, 11, Ask::Fresh, at(500 + s)).is_ok());
        }
        let off = SyncGuard::new(Duration::ZERO, Duration::ZERO);
        for s in 0..5 {
            assert!(off.check(Some(key), None, 11, Ask::Fresh, at(s)).is_ok());
            off.finished(key, false, at(s));
        }
    }
}
