//! Durability of the relay: crashes (SIGKILL) and graceful stops (SIGTERM) at several points under
//! write load, a replica away for hundreds of megabytes, log retention, corruption of the log and of
//! the snapshot cache while the relay is stopped, and two relays on one directory.
//!
//! Everything runs against real `redis-server` 7.0 processes on loopback ports, in temporary
//! directories, and compares datasets with `DEBUG DIGEST`. Every wait polls a condition under a
//! deadline; the only other sleeps are the writer thread's pacing between batches (a rate limit) and
//! the RSS sampler's interval, neither of which waits for anything.
//! Every child process is killed on drop (the harness's `RedisServer` and `Relay`, and the guards
//! below for the processes this file starts itself).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Masters keep a large backlog so that the relay's restarts never outrun it: whatever the relay
/// lost must be the relay's fault, not the master's.
const MASTER_BACKLOG: [&str; 2] = ["--repl-backlog-size", "256mb"];
/// Deadline for a sync involving a large dataset or a long catch-up.
const LONG_TIMEOUT: Duration = Duration::from_secs(120);

/// The redis-server replica's log line of a partial resync.
const REPLICA_PARTIAL: &str = "Successful partial resynchronization";
/// The redis-server replica's log line of a full resync.
const REPLICA_FULL: &str = "Full resync from master";

// ---------------------------------------------------------------------------------------------
// Processes and signals
// ---------------------------------------------------------------------------------------------

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// SIGTERM to the relay, then waits until it has exited.
fn stop_gracefully(relay: &mut Relay) {
    let pid = relay.pid().expect("the relay is running");
    send_signal(pid, "TERM");
    wait_until(Duration::from_secs(20), "the relay to exit after SIGTERM", || !relay.is_running());
    // A graceful stop: the relay handled the signal and exited 0 (not killed by it).
    let status = relay.exit_status().expect("the relay exited");
    assert!(status.success(), "the relay's exit after SIGTERM: {status}\n{}", relay.stderr());
}

/// How the relay is stopped before a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopBy {
    Sigkill,
    Sigterm,
}

fn stop_relay(relay: &mut Relay, how: StopBy) {
    match how {
        StopBy::Sigkill => relay.kill(),
        StopBy::Sigterm => stop_gracefully(relay),
    }
}

/// A child process this file starts itself (not through the harness); killed and reaped on drop.
struct ChildGuard(Child);

impl ChildGuard {
    /// Waits until the process exits; returns its exit status, or `None` if it is still running at
    /// the deadline.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// `VmRSS` of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Samples a process's RSS every few milliseconds on a thread until stopped; reports the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let (flag, max) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            // Bounded: at most ten minutes of samples, whatever happens to the test.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                max.fetch_max(rss_bytes(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler { stop, peak, handle: Some(handle) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Write load
// ---------------------------------------------------------------------------------------------

/// The writer's pacing between batches: keeps its rate around a few MB/s so the stream is busy
/// during every kill without making catch-ups long. A rate limit, not a wait for a condition.
const WRITER_PACE: Duration = Duration::from_millis(1);
const WRITER_MAX_BATCHES: u64 = 1_000_000;
const WRITER_MAX_RUNTIME: Duration = Duration::from_secs(300);

/// One batch of writes: strings over two databases, a counter, hash, list, sorted set, and every
/// tenth batch a MULTI/EXEC block and a script. No short TTLs, so digests are stable once writes stop.
fn write_batch(con: &mut redis::Connection, seed: u64, batch: u64) {
    let mut pipe = redis::pipe();
    pipe.cmd("SELECT").arg(if batch.is_multiple_of(3) { 1 } else { 0 }).ignore();
    for i in 0..20 {
        let n = batch * 20 + i;
        pipe.cmd("SET").arg(format!("w:s:{}", n % 5000)).arg(value_of(seed ^ n, 40 + (n % 60) as usize)).ignore();
    }
    pipe.cmd("INCRBY").arg("w:counter").arg(batch).ignore();
    pipe.cmd("HSET").arg(format!("w:h:{}", batch % 50)).arg(format!("f{}", batch % 200)).arg(batch).ignore();
    pipe.cmd("RPUSH").arg("w:list").arg(batch).ignore();
    pipe.cmd("LTRIM").arg("w:list").arg(-500).arg(-1).ignore();
    pipe.cmd("ZADD").arg("w:z").arg(batch as f64).arg(format!("m{}", batch % 1000)).ignore();
    pipe.query::<()>(con).expect("writer batch");
    if batch.is_multiple_of(10) {
        redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("w:tx")
            .cmd("SET")
            .arg(format!("w:tx:{}", batch % 100))
            .arg(value_of(seed + batch, 64))
            .cmd("LPUSH")
            .arg("w:txlist")
            .arg(batch)
            .cmd("LTRIM")
            .arg("w:txlist")
            .arg(0)
            .arg(99)
            .query::<()>(con)
            .expect("writer MULTI/EXEC");
        redis::cmd("EVAL")
            .arg("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])")
            .arg(2)
            .arg(format!("w:ev:{}", batch % 20))
            .arg("w:evcount")
            .arg(batch)
            .query::<i64>(con)
            .expect("writer EVAL");
    }
}

/// A thread writing to the master until stopped (bounded in batches and time).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Writer {
    fn start(port: u16, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut con = connect(port, None, None).expect("writer: connect to the master");
            let deadline = Instant::now() + WRITER_MAX_RUNTIME;
            let mut batch = 0;
            while !flag.load(Ordering::SeqCst) && batch < WRITER_MAX_BATCHES && Instant::now() < deadline {
                write_batch(&mut con, seed, batch);
                batch += 1;
                std::thread::sleep(WRITER_PACE);
            }
            batch
        });
        Writer { stop, handle: Some(handle) }
    }

    /// Stops the writer; returns how many batches it wrote. Propagates a writer panic.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.handle.take().expect("writer running");
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observations
// ---------------------------------------------------------------------------------------------

/// Lines of `text` containing `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|line| line.contains(needle)).count()
}

/// What the relay's log recovery found at its last start (`INFO relay`).
#[derive(Debug)]
struct LogRecovery {
    /// Where the recovered log ends.
    offset: u64,
    /// `none`, `torn_tail` (an append the stop interrupted) or `corrupt`.
    dropped: String,
    dropped_bytes: u64,
}

fn recovery_of(relay: &Relay) -> LogRecovery {
    let info = relay.info("relay");
    let field =
        |name: &str| parse_info_field(&info, name).unwrap_or_else(|| panic!("INFO relay has no {name}:\n{info}"));
    LogRecovery {
        offset: field("log_recovered_offset").parse().expect("log_recovered_offset is a number"),
        dropped: field("log_recovery_dropped"),
        dropped_bytes: field("log_recovery_dropped_bytes").parse().expect("log_recovery_dropped_bytes is a number"),
    }
}

/// `INFO relay` counter of the relay (since its process started).
fn relay_counter(relay: &Relay, name: &str) -> i64 {
    relay.info_i64("relay", name)
}

fn link_status(source: &impl InfoSource) -> String {
    source.info_field("replication", "master_link_status").unwrap_or_default()
}

/// Waits until the replica has the master's replid and offset and the master's digest. The master
/// must be quiet (no writer running).
fn wait_digest_equal(master: &RedisServer, replica: &RedisServer, what: &str) {
    wait_in_sync(master, replica, LONG_TIMEOUT);
    wait_for(SYNC_TIMEOUT, &format!("{what}: DEBUG DIGEST equal to the master's"), || {
        let want = master.digest();
        let got = replica.digest();
        let offsets = (offset_of(master), offset_of(replica));
        if want == got && offsets.0 == offsets.1 {
            Ok(())
        } else {
            Err(format!("master digest {want} offset {}, {what} digest {got} offset {}", offsets.0, offsets.1))
        }
    });
}

/// The relay and every replica end with the master's offset, and each replica with its digest.
fn assert_all_equal(master: &RedisServer, relay: &Relay, replicas: &[(&str, &RedisServer)]) {
    wait_in_sync(master, relay, LONG_TIMEOUT);
    for (name, replica) in replicas {
        wait_digest_equal(master, replica, name);
    }
}

/// Waits until the relay's offset moved `bytes` past where it is now: writes are flowing through it.
fn wait_stream_progress(relay: &Relay, bytes: i64) {
    let from = offset_of(relay);
    wait_for(SYNC_TIMEOUT, "writes to flow through the relay", || {
        let now = offset_of(relay);
        if now >= from + bytes {
            Ok(())
        } else {
            Err(format!("relay offset {now}, was {from}, want +{bytes}"))
        }
    });
}

/// What a snapshot cache directory holds, checked independently of the relay's code: `Ok(None)` when
/// there is no `snapshot.meta`; `Ok(Some(offset))` when `snapshot.meta` describes `snapshot.rdb`
/// exactly (size, CRC-64 trailer) and the file is a complete RDB (signature, EOF opcode, trailer
/// matching its content); `Err` otherwise.
fn snapshot_state(dir: &Path) -> Result<Option<u64>, String> {
    let meta_path = dir.join("snapshot.meta");
    let meta = match std::fs::read_to_string(&meta_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", meta_path.display())),
    };
    let field = |name: &str| -> Result<u64, String> {
        meta.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| format!("snapshot.meta has no numeric {name}:\n{meta}"))
    };
    let (offset, size, crc64) = (field("offset")?, field("size")?, field("crc64")?);
    let rdb_path = dir.join("snapshot.rdb");
    let rdb = std::fs::read(&rdb_path).map_err(|e| format!("snapshot.meta present but {}: {e}", rdb_path.display()))?;
    if rdb.len() as u64 != size {
        return Err(format!("snapshot.meta says {size} bytes, snapshot.rdb has {}", rdb.len()));
    }
    if rdb.len() < 18 || !rdb.starts_with(b"REDIS") {
        return Err(format!("snapshot.rdb does not start with an RDB signature ({} bytes)", rdb.len()));
    }
    let eof = rdb[rdb.len() - 9];
    if eof != 0xFF {
        return Err(format!("snapshot.rdb does not end with the EOF opcode (0x{eof:02x})"));
    }
    let mut trailer = [0u8; 8];
    trailer.copy_from_slice(&rdb[rdb.len() - 8..]);
    let stored = u64::from_le_bytes(trailer);
    let computed = crc::Crc::<u64>::new(&crc::CRC_64_REDIS).checksum(&rdb[..rdb.len() - 8]);
    if stored != 0 && stored != computed {
        return Err(format!("snapshot.rdb trailer CRC {stored:016x}, content CRC {computed:016x}"));
    }
    if stored != crc64 {
        return Err(format!("snapshot.meta CRC {crc64:016x}, snapshot.rdb trailer {stored:016x}"));
    }
    Ok(Some(offset))
}

/// Temporary files left in the relay's directory.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// The log's segment files, sorted (oldest first), with their sizes.
fn segments(relay: &Relay) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(relay.dir().join("log"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// XORs one byte of `path` at `offset`.
fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new().read(true).write(true).open(path).expect("open file to corrupt");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read byte to corrupt");
    file.write_all_at(&[byte[0] ^ 0x5a], offset).expect("write corrupted byte");
    file.sync_all().expect("sync corrupted file");
}

fn start_replica(relay: &Relay) -> RedisServer {
    RedisServer::builder().replica_of(relay.port()).start()
}

/// A replica of the relay whose data directory is `dir` (so a `SAVE`d RDB survives its process).
fn start_replica_in(relay: &Relay, dir: &Path) -> RedisServer {
    RedisServer::builder().replica_of(relay.port()).arg("--dir").arg(dir.display().to_string()).start()
}

// ---------------------------------------------------------------------------------------------
// Stop, restart, and check the resume
// ---------------------------------------------------------------------------------------------

/// Stops the relay (`how`) while writes flow, restarts it on the same directory and listen port,
/// and checks the resume:
/// - nothing the relay had is lost: the recovered log ends at or after the relay's last observed
///   offset, the offset the master saw it ACK, and every replica's offset;
/// - the master grants a partial resync (stderr line, `upstream_partial_syncs:1`, no RDB fetch);
/// - every replica in `partial` resumes with a partial resync (its log, and the relay's counters).
///
/// `after_stop` runs while the relay is down.
fn restart_and_check_resume(
    master: &RedisServer,
    relay: &mut Relay,
    partial: &[&RedisServer],
    how: StopBy,
    after_stop: &mut dyn FnMut(),
) {
    let partial_before: Vec<usize> = partial.iter().map(|r| count(&r.log(), REPLICA_PARTIAL)).collect();
    let full_before: Vec<usize> = partial.iter().map(|r| count(&r.log(), REPLICA_FULL)).collect();
    let acked = acked_on_master(master, relay.port());
    let relay_offset = offset_of(relay) as u64;

    stop_relay(relay, how);
    // The replicas notice the closed link; their offsets are then frozen until they reconnect.
    for replica in partial {
        wait_for(SYNC_TIMEOUT, "the replica to see its link to the stopped relay down", || {
            match link_status(*replica).as_str() {
                "up" => Err("master_link_status:up".to_string()),
                _ => Ok(()),
            }
        });
    }
    let replica_offsets: Vec<u64> = partial.iter().map(|r| offset_of(*r) as u64).collect();
    after_stop();

    // The restarted relay answers PING only once its recovery is done.
    relay.restart();
    let recovery = recovery_of(relay);
    let recovered = recovery.offset;
    assert!(
        recovered >= relay_offset,
        "{how:?}: the recovered log ends at {recovered}, but the relay had offset {relay_offset} before the stop"
    );
    if let Some(acked) = acked {
        assert!(recovered >= acked, "{how:?}: recovered log ends at {recovered} < offset {acked} ACKed to the master");
    }
    for (i, offset) in replica_offsets.iter().enumerate() {
        assert!(
            recovered >= *offset,
            "{how:?}: recovered log ends at {recovered} < replica {i}'s offset {offset} (it was served bytes the log lost)"
        );
    }
    // A kill may interrupt an append (a record is one vectored write, but a kill can still cut a large
    // one short): that torn tail was never served nor ACKed, as the offsets above show. Anything else
    // cut at recovery is damage.
    let legal: &[&str] = match how {
        StopBy::Sigkill => &["none", "torn_tail"],
        StopBy::Sigterm => &["none"],
    };
    assert!(legal.contains(&recovery.dropped.as_str()), "{how:?}: recovery dropped data: {recovery:?}");
    eprintln!("{how:?}: recovery {recovery:?}");

    // The restarted process counts from zero.
    wait_until(SYNC_TIMEOUT, "the master to accept the restarted relay's partial resync", || {
        relay_counter(relay, "upstream_partial_syncs") > 0
    });
    assert_eq!(relay_counter(relay, "upstream_partial_syncs"), 1, "upstream_partial_syncs after the restart");
    assert_eq!(relay_counter(relay, "rdb_fetches"), 0, "rdb_fetches after the restart: it needed no new RDB");

    for (i, replica) in partial.iter().enumerate() {
        wait_for(SYNC_TIMEOUT, "the replica to resume with a partial resync from the restarted relay", || {
            let log = replica.log();
            if count(&log, REPLICA_PARTIAL) > partial_before[i] {
                Ok(())
            } else {
                Err(format!(
                    "replica {i} log has {} partial and {} full resync lines",
                    count(&log, REPLICA_PARTIAL),
                    count(&log, REPLICA_FULL)
                ))
            }
        });
        assert_eq!(count(&replica.log(), REPLICA_FULL), full_before[i], "replica {i} did a full resync");
    }
    assert!(stat_of(relay, "sync_partial_ok") >= partial.len() as i64, "sync_partial_ok after the restart");
}

/// A master with data, a relay in sync with it, and a replica of the relay in sync; with the
/// master's `sync_full` after the relay's own sync.
fn master_relay_replica() -> (RedisServer, Relay, i64, RedisServer) {
    let master = RedisServer::start(&MASTER_BACKLOG);
    load_dataset(&mut master.conn(), 100);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let master_full = stat_of(&master, "sync_full");
    let replica = start_replica(&relay);
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    (master, relay, master_full, replica)
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL under write load
// ---------------------------------------------------------------------------------------------

#[test]
fn sigkill_mid_stream_resumes_with_partial_resyncs_everywhere() {
    let (master, mut relay, master_full, replica) = master_relay_replica();

    let writer = Writer::start(master.port(), 1);
    for _ in 0..3 {
        wait_stream_progress(&relay, 256 * 1024);
        restart_and_check_resume(&master, &mut relay, &[&replica], StopBy::Sigkill, &mut || {});
        assert_eq!(stat_of(&relay, "sync_full"), 0, "the restarted relay served a full sync");
        assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full grew after a relay restart");
    }
    wait_stream_progress(&relay, 64 * 1024);
    let batches = writer.stop();
    assert!(batches > 0, "the writer wrote nothing");

    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full");
}

#[test]
fn sigkill_during_a_downstream_full_sync() {
    // A big dataset (200k keys of 100 bytes, uncompressed in the RDB) the relay caches first.
    let master = RedisServer::builder().args(MASTER_BACKLOG).args(["--rdbcompression", "no"]).start();
    master.query::<()>(redis::cmd("DEBUG").arg("POPULATE").arg(200_000).arg("big").arg(100));
    let mut relay = Relay::start(&master);
    wait_in_sync(&master, &relay, LONG_TIMEOUT);
    let master_full = stat_of(&master, "sync_full");
    let replica = start_replica(&relay);
    wait_in_sync(&master, &replica, LONG_TIMEOUT);

    let writer = Writer::start(master.port(), 2);
    wait_stream_progress(&relay, 64 * 1024);
    // A new replica loading from the socket, slowed per key, so the relay is mid-send for a while.
    // It is told to replicate only once started: the harness's start waits out any loading.
    let late = RedisServer::start(&["--repl-diskless-load", "on-empty-db", "--key-load-delay", "-5"]);
    late.query::<()>(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(relay.port()));
    let send_bulk = format!("port={},state=send_bulk", late.port());
    wait_for(SYNC_TIMEOUT, "the new replica to be in the middle of its full sync from the relay", || {
        let in_progress = late.info_field("replication", "master_sync_in_progress");
        let sending = relay.info("replication").contains(&send_bulk);
        if in_progress.as_deref() == Some("1") && sending {
            Ok(())
        } else {
            Err(format!("replica master_sync_in_progress {in_progress:?}, relay sending to it: {sending}"))
        }
    });

    // While the relay is down the interrupted replica is told to load at full speed from now on (it
    // syncs again from scratch: it had nothing).
    restart_and_check_resume(&master, &mut relay, &[&replica], StopBy::Sigkill, &mut || {
        late.query::<()>(redis::cmd("CONFIG").arg("SET").arg("key-load-delay").arg(0));
    });
    wait_in_sync(&master, &late, LONG_TIMEOUT);
    assert!(stat_of(&relay, "sync_full") >= 1, "the interrupted replica should have full-synced again");
    let late_log = late.log();
    assert!(
        count(&late_log, REPLICA_FULL) >= 2,
        "the kill should have interrupted the new replica's full sync (then a second one):\n{late_log}"
    );
    let _ = writer.stop();

    assert_all_equal(&master, &relay, &[("replica", &replica), ("interrupted replica", &late)]);
    assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full: the relay served from its cache");
    assert_eq!(relay_counter(&relay, "rdb_fetches"), 0, "rdb_fetches since the restart");
}

#[test]
fn sigkill_during_rdb_receipt_leaves_no_partial_snapshot() {
    // The master streams its RDB (diskless) slowly, so the relay is killed mid-receipt.
    let master = RedisServer::builder()
        .diskless_sync(true)
        .args(MASTER_BACKLOG)
        .args(["--rdbcompression", "no", "--rdb-key-save-delay", "10"])
        .start();
    master.query::<()>(redis::cmd("DEBUG").arg("POPULATE").arg(100_000).arg("big").arg(100));
    let writer = Writer::start(master.port(), 3);
    let mut relay = Relay::start(&master);
    // Attached before the relay has any history: refused, it retries until the relay can serve it.
    let replica = start_replica(&relay);
    wait_for(SYNC_TIMEOUT, "the relay to be receiving the RDB (more than 2 MB in)", || {
        let info = relay.info("replication");
        let in_progress = parse_info_field(&info, "master_sync_in_progress");
        let read: u64 = parse_info_field(&info, "master_sync_read_bytes").and_then(|v| v.parse().ok()).unwrap_or(0);
        if in_progress.as_deref() == Some("1") && read > 2 << 20 {
            Ok(())
        } else {
            Err(format!("master_sync_in_progress {in_progress:?}, master_sync_read_bytes {read}"))
        }
    });
    relay.kill();
    eprintln!("files left by the relay killed mid-receipt: {:?}", temp_files(relay.dir()));

    // Nothing partial may pass for a snapshot.
    let left = snapshot_state(relay.dir());
    assert_eq!(left, Ok(None), "after a kill during the first RDB receipt there must be no snapshot.meta");
    assert!(!relay.snapshot_path().exists(), "a snapshot.rdb was left by an interrupted receipt");

    master.query::<()>(redis::cmd("CONFIG").arg("SET").arg("rdb-key-save-delay").arg(0));
    relay.restart();
    wait_in_sync(&master, &relay, LONG_TIMEOUT);
    assert_eq!(relay_counter(&relay, "rdb_fetches"), 1, "the restarted relay full-syncs once");
    wait_in_sync(&master, &replica, LONG_TIMEOUT);
    let _ = writer.stop();

    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    let offset = snapshot_state(relay.dir()).unwrap_or_else(|e| panic!("the new snapshot is not valid: {e}"));
    assert_eq!(offset.map(|o| o as i64), Some(relay_counter(&relay, "snapshot_offset")), "snapshot.meta offset");
    assert_eq!(temp_files(relay.dir()), Vec::<String>::new(), "temporary files left in the relay's directory");
    let new_replica = start_replica(&relay);
    wait_digest_equal(&master, &new_replica, "a replica synced from the new snapshot");
}

// ---------------------------------------------------------------------------------------------
// 2. SIGTERM
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_restart_loses_nothing() {
    let (master, mut relay, master_full, replica) = master_relay_replica();

    let writer = Writer::start(master.port(), 4);
    for _ in 1..=2 {
        wait_stream_progress(&relay, 256 * 1024);
        restart_and_check_resume(&master, &mut relay, &[&replica], StopBy::Sigterm, &mut || {});
        assert_eq!(stat_of(&relay, "sync_full"), 0, "the restarted relay served a full sync");
        assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full grew after a relay restart");
    }
    wait_stream_progress(&relay, 64 * 1024);
    let _ = writer.stop();

    // With the writes stopped: the relay holds exactly the master's stream, and a graceful stop
    // keeps all of it.
    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    let before = offset_of(&relay) as u64;
    stop_gracefully(&mut relay);
    relay.restart();
    let recovery = recovery_of(&relay);
    let recovered = recovery.offset;
    assert!(recovered >= before, "a graceful stop lost data: recovered offset {recovered} < {before} before the stop");
    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full");
    assert_eq!((recovery.dropped.as_str(), recovery.dropped_bytes), ("none", 0), "recovery dropped data");
}

// ---------------------------------------------------------------------------------------------
// 3. A replica away while a lot of stream passes
// ---------------------------------------------------------------------------------------------

/// A replica of `relay`, in sync, that saved its RDB (replid and offset in its aux fields) and
/// was then killed: restarted in the returned directory it PSYNCs from the returned offset.
fn replica_saved_then_killed(master: &RedisServer, relay: &Relay) -> (tempfile::TempDir, i64) {
    let replica_dir = tempfile::Builder::new().prefix("replica-data-").tempdir().expect("temp dir");
    let replica = start_replica_in(relay, replica_dir.path());
    wait_in_sync(master, &replica, SYNC_TIMEOUT);
    replica.query::<()>(&redis::cmd("SAVE"));
    let saved_offset = offset_of(&replica);
    drop(replica); // SIGKILL: the RDB on disk is all it keeps.
    (replica_dir, saved_offset)
}

/// The replica is away while ~500 MB of stream pass through the relay (500 times the relay's
/// memory tail). It was
/// stopped with `SAVE` then SIGKILL, so on restart redis-server loads an RDB carrying the replid
/// and offset and asks `PSYNC` from there: the relay must continue it from its disk log without
/// holding the backlog in memory.
#[test]
fn a_replica_away_for_500mb_catches_up_from_the_disk_log() {
    const STREAM_BYTES: usize = 500 << 20;
    const VALUE_LEN: usize = 100 << 10;
    const PER_PIPELINE: usize = 10;
    const RSS_HEADROOM: u64 = 32 << 20;

    // A 500 MB burst outruns the master's default replica output-buffer limit (256mb) against an
    // unoptimised test build of the relay; lift it so the test measures the relay's log, not that.
    let master = RedisServer::start(&["--client-output-buffer-limit", "replica 0 0 0"]);
    load_dataset(&mut master.conn(), 50);
    let relay = Relay::builder(master.port())
        .arg("--log-memory")
        .arg("1mb")
        .arg("--log-size")
        .arg("1gb")
        .arg("--repl-timeout")
        .arg("600s")
        .start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let (replica_dir, saved_offset) = replica_saved_then_killed(&master, &relay);

    let pid = relay.pid().expect("relay running");
    let idle_rss = rss_bytes(pid);
    let writing = RssSampler::start(pid);
    let values: Vec<String> = (0..16).map(|i| value_of(1000 + i, VALUE_LEN)).collect();
    let mut con = master.conn();
    let pipelines = STREAM_BYTES / (VALUE_LEN * PER_PIPELINE);
    for p in 0..pipelines {
        let mut pipe = redis::pipe();
        for i in 0..PER_PIPELINE {
            let n = p * PER_PIPELINE + i;
            pipe.cmd("SET").arg(format!("big:{}", n % 20)).arg(&values[n % values.len()]).ignore();
        }
        pipe.query::<()>(&mut con).expect("write pipeline");
    }
    wait_in_sync(&master, &relay, LONG_TIMEOUT);
    let writing_peak = writing.finish();
    let summary = relay.info("replication");
    let first: i64 = parse_info_field(&summary, "repl_backlog_first_byte_offset").unwrap().parse().unwrap();
    let end = offset_of(&relay);
    assert!(
        first <= saved_offset + 1,
        "the log no longer covers the replica's offset {saved_offset} (starts at {first})"
    );
    let written = (pipelines * PER_PIPELINE * VALUE_LEN) as i64;
    assert!(
        end - saved_offset >= written,
        "only {} bytes passed, {written} bytes of values were written",
        end - saved_offset
    );

    let partial_ok = stat_of(&relay, "sync_partial_ok");
    let catch_up = RssSampler::start(pid);
    let started = Instant::now();
    let replica = start_replica_in(&relay, replica_dir.path());
    wait_in_sync(&master, &replica, LONG_TIMEOUT);
    let catch_up_peak = catch_up.finish();
    eprintln!(
        "relay RSS: idle {} MB, peak while 500 MB were written {} MB, peak during the catch-up {} MB; catch-up took {:?}",
        idle_rss >> 20,
        writing_peak >> 20,
        catch_up_peak >> 20,
        started.elapsed()
    );

    assert_eq!(stat_of(&relay, "sync_partial_ok"), partial_ok + 1, "the replica should have been continued");
    assert_eq!(stat_of(&relay, "sync_full"), 1, "only the replica's first sync was a full one");
    let log = replica.log();
    assert!(log.contains(REPLICA_PARTIAL), "replica log has no partial resync:\n{log}");
    assert!(!log.contains(REPLICA_FULL), "the replica full-synced:\n{log}");
    wait_digest_equal(&master, &replica, "the replica that caught up");
    assert!(
        catch_up_peak < idle_rss + RSS_HEADROOM,
        "relay RSS during the catch-up peaked at {} MB, idle was {} MB (limit +{} MB)",
        catch_up_peak >> 20,
        idle_rss >> 20,
        RSS_HEADROOM >> 20
    );
    assert_eq!(stat_of(&master, "sync_full"), 1, "master sync_full");
}

// ---------------------------------------------------------------------------------------------
// 4. Retention
// ---------------------------------------------------------------------------------------------

#[test]
fn retention_bounds_the_segments_and_a_replica_that_fell_off_full_syncs() {
    const LOG_SIZE: u64 = 256 * 1024;
    const SEGMENT: u64 = 64 * 1024;
    const BOUND: u64 = LOG_SIZE + 2 * SEGMENT;

    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 50);
    // --log-max-size = --log-size: retention may not hold segments for the snapshot (no replica is
    // online to refresh it from), so the bound is log_size itself.
    let relay = Relay::builder(master.port())
        .args(["--log-size", "256kb", "--log-max-size", "256kb", "--log-segment-size", "64kb"])
        .start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let (replica_dir, saved_offset) = replica_saved_then_killed(&master, &relay);

    // About 4 MB of stream in small batches; the log's files stay bounded all along.
    let mut con = master.conn();
    let mut peak_total = 0;
    let mut peak_count = 0;
    for batch in 0..128u64 {
        let mut pipe = redis::pipe();
        for i in 0..32 {
            let n = batch * 32 + i;
            pipe.cmd("SET").arg(format!("r:{}", n % 1000)).arg(value_of(n, 1000)).ignore();
        }
        pipe.query::<()>(&mut con).expect("write batch");
        let files = segments(&relay);
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        peak_total = peak_total.max(total);
        peak_count = peak_count.max(files.len());
        assert!(
            total <= BOUND,
            "batch {batch}: segment files hold {total} bytes > log_size + 2 segments = {BOUND}: {files:?}"
        );
    }
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let files = segments(&relay);
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    eprintln!(
        "segments: peak {peak_total} bytes in up to {peak_count} files; now {total} bytes in {} files",
        files.len()
    );
    assert!(total <= BOUND, "segment files hold {total} bytes > {BOUND}: {files:?}");
    // A segment rotates before a record would overflow it, so closed segments are at least half
    // full with these (<= 32 KB) records.
    assert!(files.len() as u64 <= LOG_SIZE / (SEGMENT / 2) + 2, "too many segment files: {files:?}");
    let info = relay.info("replication");
    let first: i64 = parse_info_field(&info, "repl_backlog_first_byte_offset").unwrap().parse().unwrap();
    let histlen: u64 = parse_info_field(&info, "repl_backlog_histlen").unwrap().parse().unwrap();
    assert!(
        first > saved_offset + 1,
        "the replica's offset {saved_offset} should have fallen off (log starts at {first})"
    );
    assert!(histlen <= BOUND, "repl_backlog_histlen {histlen} > {BOUND}");

    let partial_err = stat_of(&relay, "sync_partial_err");
    let replica = start_replica_in(&relay, replica_dir.path());
    wait_digest_equal(&master, &replica, "the replica that fell off the log");
    assert_eq!(stat_of(&relay, "sync_partial_err"), partial_err + 1, "its PSYNC should have been refused");
    assert!(replica.log().contains(REPLICA_FULL), "the replica should have full-synced:\n{}", replica.log());
    assert!(!replica.log().contains(REPLICA_PARTIAL), "the replica partial-synced:\n{}", replica.log());
    // Its full sync needed a snapshot the log covers: the cached one was too old, so a fresh fetch.
    assert_eq!(relay_counter(&relay, "rdb_fetches"), 2, "initial sync plus one fresh fetch");
    snapshot_state(relay.dir()).unwrap_or_else(|e| panic!("snapshot after the fresh fetch: {e}"));
}

// ---------------------------------------------------------------------------------------------
// 5. Corruption while stopped
// ---------------------------------------------------------------------------------------------

#[test]
fn a_corrupt_log_segment_is_cut_and_refilled_from_the_master() {
    let master = RedisServer::start(&MASTER_BACKLOG);
    load_dataset(&mut master.conn(), 50);
    let mut relay = Relay::builder(master.port()).arg("--log-segment-size").arg("64kb").start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let master_full = stat_of(&master, "sync_full");
    let replica = start_replica(&relay);
    let mut con = master.conn();
    for batch in 0..60 {
        write_batch(&mut con, 5, batch);
    }
    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    let before = offset_of(&relay) as u64;
    stop_gracefully(&mut relay);

    let files = segments(&relay);
    let (newest, len) = files.last().cloned().expect("segment files");
    assert!(files.len() >= 2, "expected several 64kb segments: {files:?}");
    flip_byte(&newest, len / 2);
    // The master moves on while the relay is down.
    for batch in 60..80 {
        write_batch(&mut con, 5, batch);
    }

    relay.restart();
    let recovery = recovery_of(&relay);
    assert_eq!(recovery.dropped, "corrupt", "a flipped byte in a whole record: {recovery:?}");
    assert!(recovery.dropped_bytes > 0, "{recovery:?}");
    let recovered = recovery.offset;
    assert!(recovered < before, "recovery kept offset {recovered} though a byte before {before} was corrupted");
    wait_until(SYNC_TIMEOUT, "the master to continue the relay from the cut", || {
        relay_counter(&relay, "upstream_partial_syncs") > 0
    });
    assert_eq!(relay_counter(&relay, "rdb_fetches"), 0, "the relay needed no new RDB");
    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    assert_eq!(stat_of(&master, "sync_full"), master_full, "master sync_full");
    let late = start_replica(&relay);
    wait_digest_equal(&master, &late, "a replica attached after the recovery");
    eprintln!(
        "replica ahead of the cut log: {} partial / {} full resync lines",
        count(&replica.log(), REPLICA_PARTIAL),
        count(&replica.log(), REPLICA_FULL)
    );
}

#[test]
fn a_corrupt_cached_snapshot_is_ignored_and_fetched_again() {
    let master = RedisServer::start(&MASTER_BACKLOG);
    load_dataset(&mut master.conn(), 200);
    let mut relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let master_full = stat_of(&master, "sync_full");
    let mut con = master.conn();
    for batch in 0..20 {
        write_batch(&mut con, 6, batch);
    }
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    stop_gracefully(&mut relay);

    let snapshot = relay.snapshot_path();
    let len = std::fs::metadata(&snapshot).expect("snapshot.rdb").len();
    flip_byte(&snapshot, len / 2);
    assert!(snapshot_state(relay.dir()).is_err(), "the test's own check should see the corruption");

    relay.restart();
    wait_until(SYNC_TIMEOUT, "the relay to report the bad snapshot", || {
        relay.stderr_count("ignoring the cached snapshot") > 0
    });
    wait_until(SYNC_TIMEOUT, "the master to continue the relay", || {
        relay_counter(&relay, "upstream_partial_syncs") > 0
    });
    assert_eq!(relay_counter(&relay, "snapshot_offset"), -1, "a corrupt snapshot must not be adopted");

    let replica = start_replica(&relay);
    wait_digest_equal(&master, &replica, "a replica attached after the restart");
    assert_eq!(relay_counter(&relay, "rdb_fetches"), 1, "the relay should have fetched one fresh RDB");
    assert_eq!(stat_of(&master, "sync_full"), master_full + 1, "master sync_full: one fresh fetch");
    let offset = snapshot_state(relay.dir()).unwrap_or_else(|e| panic!("the fresh snapshot is not valid: {e}"));
    assert!(offset.is_some(), "a fresh snapshot.meta should be in place");
}

// ---------------------------------------------------------------------------------------------
// 6. Two relays, one directory
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_relay_on_the_same_dir_is_refused() {
    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 50);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let replica = start_replica(&relay);
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);

    let work = tempfile::Builder::new().prefix("second-relay-").tempdir().expect("temp dir");
    let stderr_path = work.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let child = Command::new(relay_bin())
        .arg("--upstream")
        .arg(format!("127.0.0.1:{}", master.port()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--dir")
        .arg(relay.dir())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(stderr.try_clone().expect("clone"))
        .stderr(stderr)
        .spawn()
        .expect("start a second relay");
    let mut second = ChildGuard(child);
    let status = second.wait_exit(SYNC_TIMEOUT).expect("the second relay on a locked dir should exit");
    let output = strip_ansi(&std::fs::read_to_string(&stderr_path).unwrap_or_default());
    assert!(!status.success(), "the second relay exited with {status}; stderr:\n{output}");
    assert!(output.contains("is locked by another redis-relay process"), "stderr of the second relay:\n{output}");

    // The first keeps working, untouched.
    let mut con = master.conn();
    for batch in 0..30 {
        write_batch(&mut con, 7, batch);
    }
    assert_all_equal(&master, &relay, &[("replica", &replica)]);
    let late = start_replica(&relay);
    wait_digest_equal(&master, &late, "a replica attached after the refused second relay");
    snapshot_state(relay.dir()).unwrap_or_else(|e| panic!("snapshot after the refused second relay: {e}"));
    assert_eq!(relay_counter(&relay, "upstream_reconnects"), 0, "the first relay lost its link:\n{}", relay.stderr());
    assert_eq!(stat_of(&master, "sync_full"), 1, "master sync_full");
}
