//! Where snapshots come from: the relay's own replicas first, the master rate-limited, the log held
//! for the snapshot up to `log_max_size`, and `redis-cli --rdb` answered with current data.
//!
//! The scenario is `--log-size 64mb` and 500 MB of stream; these tests scale it down to a
//! 1–8 MB log with small segments and 3–4 times the log size of stream, which exercises the same
//! paths (retention passing the snapshot, the cap, refreshes) in seconds.

mod common;

use std::time::Duration;

use common::{
    load_dataset, parse_info_field, run_with_deadline, stat_of, wait_for, wait_in_sync, wait_until, write_stream,
    write_stream_in_steps, InfoSource, RedisServer, Relay, SYNC_TIMEOUT,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// A master that serves full syncs at once (diskless, no delay).
fn start_master() -> RedisServer {
    RedisServer::builder().diskless_sync(true).start()
}

/// A redis-server replica of `127.0.0.1:upstream`, serving its own sub-replicas (and so snapshot
/// requests) at once.
fn start_replica(upstream: u16) -> RedisServer {
    RedisServer::builder().replica_of(upstream).diskless_sync(true).start()
}

/// Waits until `replica` has the master's replid, offset and `DEBUG DIGEST`.
fn wait_digest_equal(master: &RedisServer, replica: &RedisServer, what: &str) {
    wait_in_sync(master, replica, DEADLINE);
    wait_for(DEADLINE, &format!("{what} to have the master's digest"), || {
        let (m, r) = (master.digest(), replica.digest());
        if m == r && common::offset_of(master) == common::offset_of(replica) {
            Ok(())
        } else {
            Err(format!("master {m}, {what} {r}"))
        }
    });
}

/// Waits until the replica on `port` has ACKed the relay's current offset: only a replica that ACKs
/// (one done loading its RDB) is asked for a snapshot.
fn wait_acked(relay: &Relay, port: u16) {
    wait_for(DEADLINE, &format!("the replica on port {port} to ACK the relay's offset"), || {
        let info = relay.info("replication");
        let offset = parse_info_field(&info, "master_repl_offset").unwrap_or_default();
        let line = info.lines().find(|l| l.contains(&format!(",port={port},"))).unwrap_or("").to_string();
        if line.contains(&format!(",offset={offset},")) {
            Ok(())
        } else {
            Err(format!("relay offset {offset}; {line:?}"))
        }
    });
}

fn relay_i64(relay: &Relay, name: &str) -> i64 {
    relay.info_i64("relay", name)
}

/// The relay's log no longer holds the stream right after `snapshot_offset`.
fn log_passed(relay: &Relay, snapshot_offset: i64) -> bool {
    relay.info_i64("replication", "repl_backlog_first_byte_offset") > snapshot_offset + 1
}

#[test]
fn a_late_joiner_is_served_from_a_replica_snapshot_without_a_master_fork() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = Relay::builder(master.port())
        .args(["--log-size", "8mb", "--log-segment-size", "1mb", "--log-memory", "2mb"])
        .start();
    wait_in_sync(&master, &relay, DEADLINE);
    let first_snapshot = relay_i64(&relay, "snapshot_offset");
    assert_eq!(relay.info_field("relay", "snapshot_source").as_deref(), Some("master"));
    let online = start_replica(relay.port());
    wait_digest_equal(&master, &online, "the replica online from the start");
    let online_addr = format!("127.0.0.1:{}", online.port());

    // Three times log_size of stream in bursts: retention passes the first snapshot. The replica
    // keeps up burst by burst, so it stays online as a source.
    write_stream_in_steps(&master, 24 << 20, 2 << 20, "b", &[&relay, &online], DEADLINE);
    assert!(log_passed(&relay, first_snapshot), "24 MB of stream should have passed the first snapshot");
    // The relay refreshed its snapshot from the online replica before the log dropped it.
    wait_until(DEADLINE, "a snapshot refreshed from the online replica, covered by the log", || {
        relay_i64(&relay, "snapshot_refreshes_replica") >= 1
            && !log_passed(&relay, relay_i64(&relay, "snapshot_offset"))
    });
    assert_eq!(relay.info_field("relay", "snapshot_source"), Some(format!("replica {online_addr}")));
    // Writes have stopped: once the last refresh is done and the snapshot is recent enough not to be
    // refreshed again (less than 3/4 of log_size behind), the fetcher is idle.
    wait_until(DEADLINE, "the fetcher to be idle with a recent snapshot", || {
        let info = relay.info("all");
        let field = |name: &str| parse_info_field(&info, name).unwrap_or_default();
        let behind = field("master_repl_offset").parse::<i64>().unwrap_or(0)
            - field("snapshot_offset").parse::<i64>().unwrap_or(0);
        field("snapshot_fetching_from") == "none" && behind < 6 << 20
    });

    // A new empty replica joins: served from the cache plus the log, no fork on the master.
    let late = start_replica(relay.port());
    wait_digest_equal(&master, &late, "the late joiner");
    // The replica that was there all along goes away and comes back empty (the harness gives it a
    // new port): the late joiner is now the only source.
    drop(online);
    wait_until(DEADLINE, "the relay to drop the killed replica", || {
        relay.info_field("replication", "connected_slaves").as_deref() == Some("1")
    });
    write_stream_in_steps(&master, 12 << 20, 2 << 20, "after", &[&relay, &late], DEADLINE);
    let restarted = start_replica(relay.port());
    wait_digest_equal(&master, &restarted, "the replica restarted without data");
    wait_digest_equal(&master, &late, "the late joiner");

    assert_eq!(stat_of(&master, "sync_full"), 1, "master sync_full: only the relay's first sync");
    assert_eq!(relay_i64(&relay, "rdb_fetches"), 1, "rdb_fetches: only the main link's first sync");
    assert_eq!(relay_i64(&relay, "snapshot_refreshes_master"), 0);
    assert_eq!(relay_i64(&relay, "snapshot_refusals"), 0, "{:?}", relay.info_field("relay", "snapshot_last_refusal"));
    eprintln!(
        "master sync_full {}; relay refreshes from replicas {}; stream {} bytes",
        stat_of(&master, "sync_full"),
        relay_i64(&relay, "snapshot_refreshes_replica"),
        common::offset_of(&master)
    );
}

#[test]
fn without_replicas_the_master_is_asked_once_per_interval_and_the_log_holds_the_snapshot() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = Relay::builder(master.port())
        .args(["--log-size", "1mb", "--log-max-size", "4mb", "--log-segment-size", "128kb"])
        .args(["--snapshot-sources", "master", "--snapshot-min-interval", "1h"])
        .start();
    wait_in_sync(&master, &relay, DEADLINE);
    let first_snapshot = relay_i64(&relay, "snapshot_offset");

    // Past the cap: the first snapshot is dropped even though nothing could refresh it.
    write_stream(&master, 6 << 20, "a");
    wait_in_sync(&master, &relay, DEADLINE);
    assert!(log_passed(&relay, first_snapshot), "6 MB of stream should pass a 4 MB cap");
    let histlen = relay.info_i64("replication", "repl_backlog_histlen");
    assert!(histlen <= (4 << 20) + (256 << 10), "the log holds {histlen} bytes, beyond the 4 MB cap");

    // First late joiner: one fetch from the master, logged with its reason.
    let first = start_replica(relay.port());
    wait_digest_equal(&master, &first, "the first late joiner");
    assert_eq!(stat_of(&master, "sync_full"), 2, "one side fetch from the master");
    assert_eq!(relay_i64(&relay, "snapshot_refreshes_master"), 1);
    assert_eq!(relay.info_field("relay", "snapshot_source").as_deref(), Some("master"));
    drop(first);
    let fetched = relay_i64(&relay, "snapshot_offset");

    // Past log_size but within the cap: retention keeps the stream after the snapshot, and the
    // next joiner is served from the cache plus the held log.
    write_stream(&master, 2 << 20, "b");
    wait_in_sync(&master, &relay, DEADLINE);
    assert!(!log_passed(&relay, fetched), "the log should still hold the stream after the snapshot");
    assert!(relay_i64(&relay, "log_held_for_snapshot_bytes") > 0, "INFO should say the log is held");
    let second = start_replica(relay.port());
    wait_digest_equal(&master, &second, "the second late joiner");
    assert_eq!(stat_of(&master, "sync_full"), 2, "no second fetch: the held log served it");
    drop(second);

    // Past the cap again: the next joiner would need a master fetch, which the interval forbids.
    write_stream(&master, 6 << 20, "c");
    wait_in_sync(&master, &relay, DEADLINE);
    assert!(log_passed(&relay, fetched), "6 MB more should pass the cap");
    let third = start_replica(relay.port());
    wait_until(DEADLINE, "the relay to skip a master fetch by the interval", || {
        relay_i64(&relay, "snapshot_master_rate_limited") >= 1
    });
    let waiting = relay.info("replication");
    assert!(waiting.contains("state=wait_bgsave"), "the third joiner waits for a snapshot:\n{waiting}");
    assert_eq!(parse_info_field(&third.info("replication"), "master_link_status").as_deref(), Some("down"));
    assert_eq!(stat_of(&master, "sync_full"), 2, "no master fork within the interval");
    assert_eq!(relay_i64(&relay, "rdb_fetches"), 2);
    assert!(relay_i64(&relay, "snapshot_master_next_fetch_in_seconds") > 3000);
    let _ = SYNC_TIMEOUT;
}

/// Runs `redis-cli -p <relay> <mode> <file>` and loads the file into a fresh redis-server.
fn rdb_through_cli(relay: &Relay, mode: &str) -> RedisServer {
    let work = tempfile::tempdir().expect("temp dir");
    let load_dir = tempfile::Builder::new().prefix("redis-load-").tempdir().expect("temp dir");
    let rdb_path = load_dir.path().join("dump.rdb");
    let mut command = std::process::Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &relay.port().to_string(), mode]).arg(&rdb_path);
    let (ok, out, err) = run_with_deadline(command, DEADLINE, work.path());
    assert!(ok, "redis-cli {mode} failed; stdout: {out}; stderr: {err}");
    assert!(format!("{out}{err}").contains("Transfer finished with success"), "stdout: {out}; stderr: {err}");
    RedisServer::builder().dir(load_dir).start()
}

#[test]
fn redis_cli_rdb_gets_current_data_taken_from_a_replica() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port());
    // Writes after the relay's snapshot: the cache alone would miss them.
    write_stream(&master, 1 << 20, "later");
    wait_digest_equal(&master, &replica, "the replica");
    wait_acked(&relay, replica.port());
    assert!(relay_i64(&relay, "snapshot_offset") < common::offset_of(&master), "the cache predates the writes");

    let loaded = rdb_through_cli(&relay, "--rdb");
    assert_eq!(loaded.digest(), master.digest(), "the RDB from redis-cli --rdb has the master's current data");
    assert_eq!(relay_i64(&relay, "rdb_only_served_fresh"), 1);
    assert_eq!(relay_i64(&relay, "rdb_only_served_cached"), 0);
    assert_eq!(relay_i64(&relay, "snapshot_refreshes_replica"), 1);
    assert_eq!(relay.info_field("relay", "snapshot_source"), Some(format!("replica 127.0.0.1:{}", replica.port())));
    assert_eq!(stat_of(&master, "sync_full"), 1, "no master fork for the backup");
}

#[test]
fn a_relay_below_is_a_snapshot_source_too() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let upper = Relay::builder(master.port()).args(["--snapshot-sources", "replicas"]).start();
    wait_in_sync(&master, &upper, DEADLINE);
    let lower = Relay::builder(upper.port()).args(["--snapshot-sources", "replicas"]).start();
    wait_in_sync(&master, &lower, DEADLINE);
    let replica = start_replica(lower.port());
    write_stream(&master, 1 << 20, "later");
    wait_digest_equal(&master, &replica, "the replica below the lower relay");
    wait_in_sync(&master, &upper, DEADLINE);
    wait_in_sync(&master, &lower, DEADLINE);
    wait_acked(&lower, replica.port());
    wait_acked(&upper, lower.port());

    // The lower relay takes a current snapshot from its replica for a backup...
    let from_lower = rdb_through_cli(&lower, "--rdb");
    assert_eq!(from_lower.digest(), master.digest());
    assert_eq!(relay_i64(&lower, "snapshot_refreshes_replica"), 1);
    // ...and the upper relay, whose only replica is the lower relay, gets it from there: the lower
    // relay answers a relay's request from its cache, which its log covers.
    let from_upper = rdb_through_cli(&upper, "--rdb");
    assert_eq!(from_upper.digest(), master.digest(), "current data through the relay below");
    assert_eq!(relay_i64(&upper, "rdb_only_served_fresh"), 1);
    assert_eq!(upper.info_field("relay", "snapshot_source"), Some(format!("replica 127.0.0.1:{}", lower.port())));
    assert_eq!(relay_i64(&upper, "snapshot_offset"), relay_i64(&lower, "snapshot_offset"));
    assert_eq!(stat_of(&master, "sync_full"), 1, "one fork on the master: the upper relay's first sync");
}

#[test]
fn redis_cli_rdb_without_any_source_gets_the_cache_and_says_how_old() {
    let master = start_master();
    load_dataset(&mut master.conn(), 20);
    let relay = Relay::builder(master.port()).args(["--snapshot-sources", "replicas"]).start();
    wait_in_sync(&master, &relay, DEADLINE);
    let digest_at_snapshot = master.digest();
    write_stream(&master, 256 << 10, "later");
    wait_in_sync(&master, &relay, DEADLINE);

    let loaded = rdb_through_cli(&relay, "--rdb");
    assert_eq!(loaded.digest(), digest_at_snapshot, "the cached snapshot, as it was");
    assert_eq!(relay_i64(&relay, "rdb_only_served_cached"), 1, "INFO counts the request answered from the cache");
    assert_eq!(relay_i64(&relay, "rdb_only_served_fresh"), 0);
    // The age it was served at, against the snapshot's age now (whole seconds, read after it).
    let served_age = relay_i64(&relay, "rdb_only_last_cached_age_seconds");
    let age_now = relay_i64(&relay, "snapshot_age_seconds");
    assert!(served_age <= age_now && age_now - served_age <= 2, "served at age {served_age} s, now {age_now} s");
    assert_eq!(stat_of(&master, "sync_full"), 1);
}

#[test]
fn redis_cli_functions_rdb_gets_the_functions_only() {
    let master = start_master();
    load_dataset(&mut master.conn(), 20);
    let library = "#!lua name=relaylib\nredis.register_function('relay_answer', function() return 42 end)";
    let _: String = master.query(redis::cmd("FUNCTION").arg("LOAD").arg(library));
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port());
    wait_digest_equal(&master, &replica, "the replica");
    wait_acked(&relay, replica.port());

    let loaded = rdb_through_cli(&relay, "--functions-rdb");
    assert_eq!(loaded.dbsize(0), 0, "no keys in a functions-only RDB");
    let answer: i64 = loaded.query(redis::cmd("FCALL").arg("relay_answer").arg(0));
    assert_eq!(answer, 42, "the library loaded from the functions-only RDB");
}

// ---------------------------------------------------------------------------------------------
// Misbehaving replica sources (a fake replica: the one place a test imitates a peer).
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// Answers the snapshot request with another replication id.
    OtherReplid,
    /// Sends half of the RDB and closes.
    DiesMidTransfer,
    /// Sends the whole RDB with one payload byte flipped: its CRC-64 no longer holds.
    CorruptRdb,
}

/// A fake replica of the relay: follows it as an online replica that ACKs `ack` (more than any real
/// one, so the relay asks it first), and answers snapshot requests on its listening port with
/// `fault`.
struct FakeSource {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn read_line(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> String {
    use std::io::Read;
    loop {
        if let Some(at) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if !text.is_empty() {
                return text;
            }
            continue;
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).expect("fake source: read");
        assert!(n > 0, "fake source: the relay closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl FakeSource {
    fn start(relay_port: u16, fault: Fault, ack: u64) -> FakeSource {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        // The replica link: handshake, the RDB, then ACKs while draining the stream.
        let mut link = std::net::TcpStream::connect(("127.0.0.1", relay_port)).expect("connect to the relay");
        link.write_all(format!("REPLCONF listening-port {port}\r\nPSYNC ? -1\r\n").as_bytes()).expect("write");
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut link, &mut buf), "+OK");
        let fullresync = read_line(&mut link, &mut buf);
        let mut parts = fullresync.split_whitespace().skip(1);
        let replid = parts.next().expect("replid").to_string();
        let offset: u64 = parts.next().and_then(|o| o.parse().ok()).expect("offset");
        let header = read_line(&mut link, &mut buf);
        let len: usize = header.trim_start_matches('$').parse().expect("RDB length");
        while buf.len() < len {
            let mut chunk = [0u8; 65536];
            let n = link.read(&mut chunk).expect("read RDB");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let rdb: Vec<u8> = buf.drain(..len).collect();
        let mut threads = Vec::new();
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                link.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
                let mut chunk = vec![0u8; 1 << 16];
                while !stop.load(Ordering::Relaxed) {
                    let _ = link.write_all(format!("REPLCONF ACK {ack}\r\n").as_bytes());
                    let _ = link.read(&mut chunk);
                }
            }));
        }
        {
            let (stop, requests) = (stop.clone(), requests.clone());
            listener.set_nonblocking(true).expect("nonblocking");
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut side, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    side.set_nonblocking(false).expect("blocking");
                    // Dropping the fake joins this thread: a relay that stops mid-handshake must not
                    // leave it blocked in a read.
                    side.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
                    requests.fetch_add(1, Ordering::Relaxed);
                    // PING, then REPLCONFs, then PSYNC: one reply each.
                    let mut buf = Vec::new();
                    loop {
                        let line = read_line(&mut side, &mut buf);
                        if line.starts_with('*') || line.starts_with('$') {
                            continue;
                        }
                        match line.to_ascii_uppercase().as_str() {
                            "PING" => side.write_all(b"+PONG\r\n").expect("write"),
                            "PSYNC" => break,
                            "REPLCONF" => side.write_all(b"+OK\r\n").expect("write"),
                            _ => {}
                        }
                    }
                    // Where a real replica would be: the relay's current offset, in its history.
                    let now: i64 = common::connect(relay_port, None, None)
                        .and_then(|mut con| redis::cmd("INFO").arg("replication").query::<String>(&mut con))
                        .ok()
                        .and_then(|info| parse_info_field(&info, "master_repl_offset"))
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(offset as i64);
                    let mut reply = match fault {
                        Fault::OtherReplid => format!("+FULLRESYNC {} {now}\r\n", "e".repeat(40)).into_bytes(),
                        Fault::DiesMidTransfer | Fault::CorruptRdb => {
                            format!("+FULLRESYNC {replid} {now}\r\n").into_bytes()
                        }
                    };
                    reply.extend_from_slice(format!("${}\r\n", rdb.len()).as_bytes());
                    match fault {
                        Fault::OtherReplid => reply.extend_from_slice(&rdb),
                        Fault::DiesMidTransfer => reply.extend_from_slice(&rdb[..rdb.len() / 2]),
                        Fault::CorruptRdb => {
                            let mut damaged = rdb.clone();
                            damaged[rdb.len() / 2] ^= 0x20;
                            reply.extend_from_slice(&damaged);
                        }
                    }
                    let _ = side.write_all(&reply);
                    drop(side);
                }
            }));
        }
        FakeSource { stop, threads, requests }
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FakeSource {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[test]
fn misbehaving_replica_sources_are_refused_with_their_reason_and_the_next_is_used() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let metrics_port = common::free_port();
    let relay = Relay::builder(master.port()).arg("--metrics").arg(format!("127.0.0.1:{metrics_port}")).start();
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port());
    wait_digest_equal(&master, &replica, "the replica");
    // Asked in this order (highest ACK first), each failing its own way, the real replica last.
    let other_replid = FakeSource::start(relay.port(), Fault::OtherReplid, u64::MAX / 2);
    let dies = FakeSource::start(relay.port(), Fault::DiesMidTransfer, u64::MAX / 4);
    let corrupt = FakeSource::start(relay.port(), Fault::CorruptRdb, u64::MAX / 8);
    wait_until(DEADLINE, "four online replicas", || relay.info("replication").matches("state=online").count() == 4);
    write_stream(&master, 512 << 10, "later");
    wait_digest_equal(&master, &replica, "the replica");
    wait_acked(&relay, replica.port());
    let snapshot_before = relay_i64(&relay, "snapshot_offset");

    let loaded = rdb_through_cli(&relay, "--rdb");
    assert_eq!(loaded.digest(), master.digest(), "served from the real replica after the fakes failed");
    assert_eq!(
        (other_replid.requests(), dies.requests(), corrupt.requests()),
        (1, 1, 1),
        "each fake was asked once, highest ACK first"
    );
    assert_eq!(relay_i64(&relay, "snapshot_refusals_replid"), 1, "{:?}", relay.info("relay"));
    assert_eq!(relay_i64(&relay, "snapshot_refusals_transfer"), 1, "{:?}", relay.info("relay"));
    assert_eq!(relay_i64(&relay, "snapshot_refusals_corrupt"), 1, "{:?}", relay.info("relay"));
    assert_eq!(relay_i64(&relay, "snapshot_refusals"), 3, "{:?}", relay.info("relay"));
    let refusals = |reason: &str| {
        common::metric_value(
            &common::scrape(metrics_port),
            "redis_relay_snapshot_refusals_total",
            &[("relay", "default"), ("reason", reason)],
        )
    };
    wait_until(DEADLINE, "the refusal metric to count each reason", || {
        refusals("replid") == Some(1.0) && refusals("transfer") == Some(1.0) && refusals("corrupt") == Some(1.0)
    });
    assert_eq!(refusals("offset"), Some(0.0));
    assert_eq!(relay_i64(&relay, "snapshot_refreshes_replica"), 1, "only the real replica's snapshot installed");
    assert!(relay_i64(&relay, "snapshot_offset") > snapshot_before);
    assert_eq!(relay.info_field("relay", "snapshot_source"), Some(format!("replica 127.0.0.1:{}", replica.port())));
    assert_eq!(stat_of(&master, "sync_full"), 1);
    let leftovers: Vec<_> = std::fs::read_dir(relay.dir())
        .expect("relay dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "nothing from the refused transfers is left: {leftovers:?}");
}

/// A corrupt RDB from the only source: refused, and the cached snapshot stays as it was.
#[test]
fn a_corrupt_rdb_from_the_only_source_installs_nothing() {
    let master = start_master();
    load_dataset(&mut master.conn(), 20);
    let relay = Relay::builder(master.port()).args(["--snapshot-sources", "replicas"]).start();
    wait_in_sync(&master, &relay, DEADLINE);
    let cached = std::fs::read(relay.snapshot_path()).expect("the cached snapshot");
    let (offset, source) = (relay_i64(&relay, "snapshot_offset"), relay.info_field("relay", "snapshot_source"));
    let digest_at_snapshot = master.digest();
    let corrupt = FakeSource::start(relay.port(), Fault::CorruptRdb, u64::MAX / 8);
    wait_until(DEADLINE, "the fake replica online", || relay.info("replication").contains("state=online"));
    write_stream(&master, 256 << 10, "later");
    wait_in_sync(&master, &relay, DEADLINE);

    // No source gave a current snapshot: the cache is served, and says so.
    let loaded = rdb_through_cli(&relay, "--rdb");
    assert_eq!(corrupt.requests(), 1);
    assert_eq!(relay_i64(&relay, "snapshot_refusals_corrupt"), 1, "{:?}", relay.info("relay"));
    assert_eq!(relay_i64(&relay, "rdb_only_served_cached"), 1);
    assert_eq!(relay_i64(&relay, "snapshot_offset"), offset, "the snapshot did not move");
    assert_eq!(relay.info_field("relay", "snapshot_source"), source);
    assert_eq!(std::fs::read(relay.snapshot_path()).expect("the cached snapshot"), cached, "the file is untouched");
    assert_eq!(loaded.digest(), digest_at_snapshot, "the cached snapshot, as it was");
}

// ---------------------------------------------------------------------------------------------
// Chaos: the master forks once, whatever happens below it.
// ---------------------------------------------------------------------------------------------

/// Writes to the master as fast as it takes them until dropped: pipelines of 100 `SET`s of 256-byte
/// values over 20,000 keys (a bounded dataset, an unbounded stream) and a counter. No rate limit,
/// only flow control: it holds off while the slowest of `followers` (the relay and the replicas,
/// each while its link is up) is more than [`WRITER_MAX_LAG`] behind the master. Without it a writer
/// on a loaded 2-core machine outruns a debug-build relay by more than the master's replica output
/// buffer limit (256 MB) and backlog, and the master drops the relay: a full sync any operator would
/// size the backlog against, not what this test is about.
struct UnthrottledWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// How far the slowest follower may trail the master before the writer holds off: well inside the
/// master's 64 MB backlog and the relay's 16 MB log.
const WRITER_MAX_LAG: i64 = 8 << 20;

/// The offset a node has processed, when it answers and (for a replica) its link is up.
fn follower_offset(con: &mut Option<redis::Connection>, port: u16) -> Option<i64> {
    if con.is_none() {
        *con = common::connect(port, None, None).ok();
    }
    let info: String = match redis::cmd("INFO").arg("replication").query(con.as_mut()?) {
        Ok(info) => info,
        Err(_) => {
            *con = None;
            return None;
        }
    };
    if parse_info_field(&info, "master_link_status").as_deref() != Some("up") {
        return None;
    }
    parse_info_field(&info, "master_repl_offset")?.parse().ok()
}

impl UnthrottledWriter {
    fn start(master: &RedisServer, followers: Vec<u16>) -> UnthrottledWriter {
        let mut con = master.conn();
        let mut master_info = master.conn();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut followers: Vec<(u16, Option<redis::Connection>, i64)> =
                followers.into_iter().map(|port| (port, None, 0)).collect();
            let mut batches = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut pipe = redis::pipe();
                for i in 0..100u64 {
                    let n = batches * 100 + i;
                    pipe.cmd("SET").arg(format!("chaos:{}", n % 20_000)).arg(common::value_of(n, 256)).ignore();
                }
                pipe.cmd("INCR").arg("chaos:batches").ignore();
                pipe.query::<()>(&mut con).expect("writer batch");
                batches += 1;
                if !batches.is_multiple_of(10) {
                    continue;
                }
                // Flow control: a follower that is down counts at its last known offset (the relay
                // resumes from its log, a replica from its RDB and the log).
                loop {
                    let info: String =
                        redis::cmd("INFO").arg("replication").query(&mut master_info).expect("master INFO");
                    let master_offset: i64 =
                        parse_info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
                    let slowest = followers
                        .iter_mut()
                        .map(|(port, con, last)| {
                            if let Some(offset) = follower_offset(con, *port) {
                                *last = offset;
                            }
                            *last
                        })
                        .min()
                        .unwrap_or(master_offset);
                    if master_offset - slowest <= WRITER_MAX_LAG || flag.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            batches
        });
        UnthrottledWriter { stop, thread: Some(thread) }
    }

    /// Stops the writer; returns how many batches it wrote.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("writer thread")).unwrap_or(0)
    }
}

impl Drop for UnthrottledWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one chaos round does.
#[derive(Clone, Copy, Debug)]
enum Blow {
    /// `CLIENT KILL TYPE replica` on the master: the relay's link.
    UpstreamLinkKill,
    /// SIGKILL the relay and start it again on its directory.
    RelayKill,
    /// SIGKILL one replica and start it again without its data.
    ReplicaRestart,
    /// `CLIENT KILL TYPE replica` on the relay: every replica's link.
    ReplicaLinksKill,
}

const BLOWS: [Blow; 4] = [Blow::UpstreamLinkKill, Blow::RelayKill, Blow::ReplicaRestart, Blow::ReplicaLinksKill];

/// Chaos rounds in the test (each one blow, in turn).
const CHAOS_ROUNDS: usize = 40;
/// The relay's `log_size` in the chaos test: small enough that the unthrottled stream passes it
/// several times, so snapshots must be refreshed from the replicas while the blows fall.
const CHAOS_LOG_MB: i64 = 16;

#[test]
fn chaos_under_an_unthrottled_writer_the_master_forks_once() {
    let master = RedisServer::builder().diskless_sync(true).args(["--repl-backlog-size", "64mb"]).start();
    load_dataset(&mut master.conn(), 40);
    let mut relay = Relay::builder(master.port())
        .args(["--log-size", &format!("{CHAOS_LOG_MB}mb"), "--log-segment-size", "2mb", "--log-memory", "8mb"])
        .start();
    wait_in_sync(&master, &relay, DEADLINE);
    let mut replicas: Vec<RedisServer> = (0..3).map(|_| start_replica(relay.port())).collect();
    for replica in &replicas {
        wait_in_sync(&master, replica, DEADLINE);
    }
    let forks_at_start = stat_of(&master, "total_forks");
    assert_eq!((stat_of(&master, "sync_full"), forks_at_start), (1, 1), "the relay's first sync");

    let followers = std::iter::once(relay.port()).chain(replicas.iter().map(|r| r.port())).collect();
    let mut writer = UnthrottledWriter::start(&master, followers);
    let started = std::time::Instant::now();
    let offset_at_start = common::offset_of(&master);
    // Snapshots the relay took from its replicas, by offset (its counters restart with it).
    let mut replica_snapshots = std::collections::BTreeSet::new();
    for round in 0..CHAOS_ROUNDS {
        let blow = BLOWS[round % BLOWS.len()];
        match blow {
            Blow::UpstreamLinkKill => assert_eq!(master.kill_replica_links(), 1, "round {round}: the relay's link"),
            Blow::RelayKill => relay.restart(),
            Blow::ReplicaRestart => {
                let which = (round / BLOWS.len()) % replicas.len();
                replicas[which].restart_empty()
            }
            Blow::ReplicaLinksKill => {
                let _: i64 = relay.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"));
            }
        }
        // Recovered: the relay's link is up again and every replica has reached, over a live link,
        // an offset the master had after the blow (the stream flows end to end).
        let target = common::offset_of(&master);
        wait_for(DEADLINE, &format!("round {round} ({blow:?}): the stream to flow to every replica"), || {
            let relay_offset = relay.info_i64("replication", "master_repl_offset");
            if relay.info_field("replication", "master_link_status").as_deref() != Some("up") || relay_offset < target {
                return Err(format!("relay link down or offset {relay_offset} < {target}"));
            }
            for (i, replica) in replicas.iter().enumerate() {
                let info = replica.info("replication");
                let offset: i64 =
                    parse_info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
                let link = parse_info_field(&info, "master_link_status").unwrap_or_default();
                if link != "up" || offset < target {
                    return Err(format!("replica {i}: link {link}, offset {offset} < {target}"));
                }
            }
            Ok(())
        });
        if relay.info_field("relay", "snapshot_source").is_some_and(|s| s.starts_with("replica ")) {
            replica_snapshots.insert(relay.info_i64("relay", "snapshot_offset"));
        }
        let (sync_full, forks) = (stat_of(&master, "sync_full"), stat_of(&master, "total_forks"));
        assert_eq!(
            (sync_full, forks),
            (1, forks_at_start),
            "round {round} ({blow:?}): master sync_full and total_forks beyond the first sync; relay: {:?}",
            relay.info_field("relay", "snapshot_last_refusal")
        );
    }
    let batches = writer.stop();
    let elapsed = started.elapsed();
    wait_in_sync(&master, &relay, DEADLINE);
    for (i, replica) in replicas.iter().enumerate() {
        wait_digest_equal(&master, replica, &format!("replica {i}"));
    }
    assert_eq!(stat_of(&master, "sync_full"), 1, "master sync_full: only the relay's first sync");
    assert_eq!(stat_of(&master, "total_forks"), forks_at_start, "master forks: only the relay's first sync");
    let stream_mb = (common::offset_of(&master) - offset_at_start) >> 20;
    eprintln!(
        "chaos: {CHAOS_ROUNDS} rounds in {:.1} s; {batches} writer batches, {stream_mb} MB of stream; master \
         total_forks {}, sync_full {}, sync_partial_ok {}; snapshots taken from replicas (seen): {}; relay since \
         its last start: full syncs served {}, partial refused {}",
        elapsed.as_secs_f64(),
        stat_of(&master, "total_forks"),
        stat_of(&master, "sync_full"),
        stat_of(&master, "sync_partial_ok"),
        replica_snapshots.len(),
        relay.info_i64("stats", "sync_full"),
        relay.info_i64("stats", "sync_partial_err"),
    );
    // The stream passed the log several times: the snapshot had to be refreshed from the replicas.
    assert!(stream_mb >= 3 * CHAOS_LOG_MB, "only {stream_mb} MB of stream for a {CHAOS_LOG_MB} MB log");
    assert!(!replica_snapshots.is_empty(), "no snapshot was taken from a replica");
}
