//! Where snapshots come from: the relay's own replicas first, the master rate-limited, the log held
//! for the snapshot up to `log_max_size`, and `redis-cli --rdb` answered with current data.
//!
//! The scenario is `--log-size 64mb` and 500 MB of stream; these tests scale it down to a
//! 1–8 MB log with small segments and 3–4 times the log size of stream, which exercises the same
//! paths (retention passing the snapshot, the cap, refreshes) in seconds.

mod common;

use std::time::Duration;

use common::{
    load_dataset, parse_info_field, stat_of, value_of, wait_for, wait_in_sync, wait_until, InfoSource, RedisServer,
    Relay, SYNC_TIMEOUT,
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

/// Writes about `bytes` of stream to the master in pipelined bursts of 8 KB values.
fn write_stream(master: &RedisServer, bytes: usize, tag: &str) {
    const VALUE: usize = 8 * 1024;
    let mut con = master.conn();
    let count = bytes / VALUE + 1;
    for burst in 0..count.div_ceil(128) {
        let mut pipe = redis::pipe();
        for i in burst * 128..((burst + 1) * 128).min(count) {
            pipe.cmd("SET").arg(format!("{tag}:{}", i % 300)).arg(value_of(i as u64, VALUE)).ignore();
        }
        pipe.cmd("INCR").arg(format!("{tag}:bursts")).ignore();
        pipe.query::<()>(&mut con).expect("write burst");
    }
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

    // Three times log_size of stream in bursts: retention passes the first snapshot.
    for round in 0..6 {
        write_stream(&master, 4 << 20, &format!("b{round}"));
    }
    wait_in_sync(&master, &relay, DEADLINE);
    wait_in_sync(&master, &online, DEADLINE);
    assert!(log_passed(&relay, first_snapshot), "24 MB of stream should have passed the first snapshot");
    // The relay refreshed its snapshot from the online replica before the log dropped it.
    wait_until(DEADLINE, "a snapshot refreshed from the online replica, covered by the log", || {
        relay_i64(&relay, "snapshot_refreshes_replica") >= 1
            && !log_passed(&relay, relay_i64(&relay, "snapshot_offset"))
    });
    assert_eq!(relay.info_field("relay", "snapshot_source"), Some(format!("replica {online_addr}")));

    // A new empty replica joins: served from the cache plus the log, no fork on the master.
    let late = start_replica(relay.port());
    wait_digest_equal(&master, &late, "the late joiner");
    // The replica that was there all along goes away and comes back empty (the harness gives it a
    // new port): the late joiner is now the only source.
    drop(online);
    write_stream(&master, 12 << 20, "after");
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
