//! The relay as a replica of a real Redis master: following the stream, caching the RDB, surviving
//! link kills with partial resyncs, never exposing an offset inside MULTI/EXEC, authenticating.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// Sets the flag when dropped, so a helper thread stops even if the test panics mid-scope.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `INFO relay` counter.
fn relay_stat(relay: &Relay, name: &str) -> i64 {
    relay.info_i64("relay", name)
}

/// The relay followed every command it saw: no RDB rejected, no protocol error, one full sync.
fn assert_single_clean_sync(master: &RedisServer, relay: &Relay) {
    let stderr = relay.stderr();
    assert!(!stderr.contains("protocol error from master"), "relay reported a protocol error:\n{stderr}");
    assert!(!stderr.contains("rejected RDB from master"), "relay rejected an RDB:\n{stderr}");
    assert_eq!(relay_stat(relay, "rdb_rejected"), 0, "rdb_rejected");
    assert_eq!(relay_stat(relay, "rdb_fetches"), 1, "the relay should have needed exactly one full sync");
    assert_eq!(stat_of(master, "sync_full"), 1, "master sync_full: the relay should have full-synced once");
}

#[test]
fn relay_follows_a_mixed_workload_across_databases() {
    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 200);

    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);

    // The replica fields of INFO replication, as a Redis replica has them.
    let info = relay.info("replication");
    for field in [
        "role",
        "master_host",
        "master_port",
        "master_link_status",
        "master_last_io_seconds_ago",
        "master_sync_in_progress",
        "slave_read_repl_offset",
        "slave_repl_offset",
        "slave_priority",
        "slave_read_only",
        "connected_slaves",
        "master_replid",
        "master_replid2",
        "master_repl_offset",
        "second_repl_offset",
        "repl_backlog_active",
        "repl_backlog_size",
        "repl_backlog_first_byte_offset",
        "repl_backlog_histlen",
    ] {
        assert!(parse_info_field(&info, field).is_some(), "INFO replication lacks {field}:\n{info}");
    }
    let field = |name| parse_info_field(&info, name).unwrap();
    assert_eq!(field("role"), "slave");
    assert_eq!(field("master_host"), "127.0.0.1");
    assert_eq!(field("master_port"), master.port().to_string());
    assert_eq!(field("master_sync_in_progress"), "0");
    assert_eq!(field("slave_priority"), "0");
    assert_eq!(field("slave_read_only"), "1");

    let mut con = master.conn();
    mixed_workload(&mut con, 100);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);

    // Keys with short TTLs keep expiring (and DELs keep flowing) for a moment after the workload,
    // so compare every offset field with the master's offset of the same moment. The read offset
    // may be published lazily, but it must catch up with the applied one.
    let offset = wait_for(SYNC_TIMEOUT, "the relay's applied and read offsets to equal the master's", || {
        let before = offset_of(&master);
        let info = relay.info("replication");
        let after = offset_of(&master);
        let get = |name| parse_info_field(&info, name).and_then(|v| v.parse::<i64>().ok());
        let fields = ["master_repl_offset", "slave_repl_offset", "slave_read_repl_offset"].map(|f| (f, get(f)));
        if before == after && fields.iter().all(|(_, v)| *v == Some(before)) {
            Ok(before)
        } else {
            Err(format!("master offset {before}..{after}, relay {fields:?}"))
        }
    });
    assert!(offset > 1_000_000, "the workload should have produced a sizeable stream, offset {offset}");
    assert_eq!(relay.info_field("replication", "master_link_status").as_deref(), Some("up"));
    assert_eq!(relay.info_field("replication", "master_replid"), Some(replid_of(&master)));
    assert_single_clean_sync(&master, &relay);
}

/// `db0:keys=N,expires=M,...` lines of INFO keyspace as (db, keys, expires).
fn keyspace(server: &RedisServer) -> Vec<(String, i64, i64)> {
    server
        .info("keyspace")
        .lines()
        .filter_map(|line| {
            let (db, rest) = line.trim_end().split_once(':')?;
            let number = |name: &str| -> Option<i64> {
                rest.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            };
            Some((db.to_string(), number("keys")?, number("expires")?))
        })
        .collect()
}

/// Loads data into a master, lets the relay full-sync, then loads the relay's cached snapshot into
/// a fresh redis-server and compares the dataset digests.
fn check_cached_rdb_matches_master(diskless: bool) {
    let master = RedisServer::builder().diskless_sync(diskless).start();
    load_dataset(&mut master.conn(), 300);
    let digest = master.digest();
    assert_ne!(digest, "0".repeat(40), "the master's dataset should not be empty");
    let master_keyspace = keyspace(&master);
    assert_eq!(master_keyspace.len(), DATASET_DBS.len(), "keyspace {master_keyspace:?}");
    // No writes on the master from here on.

    let relay = Relay::start(&master);
    let snapshot_offset = wait_for(SYNC_TIMEOUT, "the relay to cache a snapshot (snapshot_offset >= 0)", || {
        let info = relay.info("relay");
        match parse_info_field(&info, "snapshot_offset").and_then(|v| v.parse::<i64>().ok()) {
            Some(offset) if offset >= 0 => Ok(offset),
            other => Err(format!("snapshot_offset {other:?}; INFO relay:\n{info}")),
        }
    });

    let target = if diskless { "replicas sockets" } else { "disk" };
    let log = master.log();
    assert!(
        log.contains(&format!("Starting BGSAVE for SYNC with target: {target}")),
        "the master should have sent its RDB with target {target:?} (diskless={diskless}); master log:\n{log}"
    );

    let path = relay.snapshot_path();
    let rdb = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        rdb.starts_with(b"REDIS"),
        "snapshot.rdb should start with the RDB magic, got {:?}",
        &rdb[..rdb.len().min(16)]
    );
    assert!(relay.dir().join("snapshot.meta").exists(), "snapshot.meta should exist next to snapshot.rdb");
    assert_eq!(relay.info_i64("relay", "snapshot_size"), rdb.len() as i64, "snapshot_size vs the file's length");
    assert_eq!(relay.info_field("relay", "snapshot_replid"), Some(replid_of(&master)), "snapshot_replid");
    assert!(
        snapshot_offset <= offset_of(&master),
        "snapshot_offset {snapshot_offset} is beyond the master's offset {}",
        offset_of(&master)
    );

    if !diskless {
        // A disk-based sync sends the master's dump.rdb as it is: the cache must be that file.
        let master_rdb = std::fs::read(master.dir().join("dump.rdb")).expect("the master's dump.rdb after a disk sync");
        assert!(
            master_rdb == rdb,
            "snapshot.rdb ({} bytes) differs from the master's dump.rdb ({} bytes)",
            rdb.len(),
            master_rdb.len()
        );
    }

    let load_dir = tempfile::Builder::new().prefix("relay-snapshot-load-").tempdir().expect("temp dir");
    std::fs::write(load_dir.path().join("dump.rdb"), &rdb).expect("write dump.rdb");
    let loaded = RedisServer::builder().dir(load_dir).arg("--dbfilename").arg("dump.rdb").start();
    assert_eq!(keyspace(&loaded), master_keyspace, "keyspace of the server that loaded the cached RDB");
    assert_eq!(loaded.digest(), digest, "DEBUG DIGEST of the cached RDB vs the master's");
    assert_eq!(master.digest(), digest, "the master's dataset changed during the test");

    wait_link_up(&relay, SYNC_TIMEOUT);
    assert_single_clean_sync(&master, &relay);
}

#[test]
fn cached_rdb_matches_master_with_diskless_sync() {
    check_cached_rdb_matches_master(true);
}

#[test]
fn cached_rdb_matches_master_with_disk_sync() {
    check_cached_rdb_matches_master(false);
}

/// Waits until the master counts `expected` partial resyncs; fails at once if it counted another
/// full sync instead.
fn wait_partial_resyncs(master: &RedisServer, expected: i64, sync_full: i64) {
    wait_for(SYNC_TIMEOUT, &format!("master sync_partial_ok to reach {expected}"), || {
        let stats = master.info("stats");
        let get = |name| parse_info_field(&stats, name).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
        let (full, partial) = (get("sync_full"), get("sync_partial_ok"));
        assert_eq!(full, sync_full, "the relay did a full resync after a link kill (sync_partial_ok {partial})");
        if partial >= expected {
            Ok(())
        } else {
            Err(format!("sync_partial_ok {partial}, sync_full {full}, sync_partial_err {}", get("sync_partial_err")))
        }
    });
}

#[test]
fn link_kills_under_load_resume_with_partial_resyncs() {
    const KILLS: i64 = 3;
    const MAX_BATCHES: u64 = 1_000_000;
    const BATCH: u64 = 20;

    let master = RedisServer::builder().arg("--repl-backlog-size").arg("64mb").start();
    load_dataset(&mut master.conn(), 100);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let sync_full = stat_of(&master, "sync_full");
    let partial_before = stat_of(&master, "sync_partial_ok");
    assert_eq!(sync_full, 1, "the relay's first sync should be the master's only full sync");

    let progress = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let writer_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let _stop_on_exit = SetOnDrop(&stop);
        let writer = scope.spawn(|| {
            let _done = SetOnDrop(&writer_done);
            let mut con = master.conn();
            for batch in 0..MAX_BATCHES {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut pipe = redis::pipe();
                for j in 0..BATCH {
                    let n = batch * BATCH + j;
                    match n % 5 {
                        0 => pipe.cmd("SET").arg(format!("load:{}", n % 5000)).arg(value_of(n, 50)).ignore(),
                        1 => pipe.cmd("INCR").arg("load:counter").ignore(),
                        2 => pipe.cmd("HSET").arg("load:hash").arg(n % 500).arg(n).ignore(),
                        3 => pipe.cmd("LPUSH").arg("load:list").arg(n).ignore(),
                        _ => pipe
                            .cmd("XADD")
                            .arg("load:stream")
                            .arg("MAXLEN")
                            .arg(1000)
                            .arg("*")
                            .arg("n")
                            .arg(n)
                            .ignore(),
                    };
                }
                pipe.cmd("LTRIM").arg("load:list").arg(0).arg(999).ignore();
                pipe.query::<()>(&mut con).expect("writer batch");
                progress.store(batch + 1, Ordering::SeqCst);
            }
        });

        let mut killed = 0;
        for kill in 1..=KILLS {
            let target = progress.load(Ordering::SeqCst) + 200;
            wait_until(SYNC_TIMEOUT, "the writer to make progress", || progress.load(Ordering::SeqCst) >= target);
            assert!(!writer_done.load(Ordering::SeqCst), "the writer stopped before kill {kill}");
            let n = master.kill_replica_links();
            assert_eq!(n, 1, "kill {kill}: CLIENT KILL TYPE replica should find the relay's link");
            killed += n;
            wait_partial_resyncs(&master, partial_before + killed, sync_full);
            wait_link_up(&relay, SYNC_TIMEOUT);
        }
        // Some more load on the resumed link, then stop the writer.
        let target = progress.load(Ordering::SeqCst) + 200;
        wait_until(SYNC_TIMEOUT, "the writer to make progress", || progress.load(Ordering::SeqCst) >= target);
        assert!(!writer_done.load(Ordering::SeqCst), "the writer stopped before the test stopped it");
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer thread");
    });

    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    assert_eq!(stat_of(&master, "sync_full"), sync_full, "master sync_full changed: a link kill caused a full resync");
    let partial = stat_of(&master, "sync_partial_ok");
    assert!(
        partial >= partial_before + KILLS,
        "master sync_partial_ok {partial}, was {partial_before} before {KILLS} kills"
    );
    assert_single_clean_sync(&master, &relay);
}

/// `*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n`: what a master emits before the first command after a full
/// sync (a consistent point, so an offset just after it is also acceptable).
const SELECT_0_LEN: i64 = 23;

/// What [`run_transactions_with_link_kills`] saw.
struct TransactionRun {
    /// The master's offset before the first transaction and after each EXEC.
    boundaries: Vec<i64>,
    /// For each polled INFO replication field of the replica, every distinct value seen.
    observed: Vec<(&'static str, HashSet<i64>)>,
    polls: u64,
    killed: i64,
}

impl TransactionRun {
    /// Observed values of `field` that are not at a transaction boundary, explained.
    fn split_offsets(&self, field: &str) -> Vec<String> {
        let allowed: BTreeSet<i64> = self.boundaries.iter().flat_map(|&b| [b, b + SELECT_0_LEN]).collect();
        let observed = &self.observed.iter().find(|(name, _)| *name == field).expect("polled field").1;
        let mut bad: Vec<i64> = observed.iter().copied().filter(|o| !allowed.contains(o)).collect();
        bad.sort_unstable();
        bad.iter()
            .map(|&o| match self.boundaries.iter().copied().filter(|&b| b < o).max() {
                Some(b) => format!("{o} (transaction boundary {b} + {} bytes)", o - b),
                None => format!("{o} (before the first boundary {})", self.boundaries[0]),
            })
            .collect()
    }

    fn distinct(&self, field: &str) -> usize {
        self.observed.iter().find(|(name, _)| *name == field).map_or(0, |(_, set)| set.len())
    }
}

/// Runs MULTI/EXEC transactions (several commands each, some values of hundreds of KB) on
/// `master`, recording the master's offset after each EXEC, while polling the replica at
/// `replica_port` as fast as it answers (recording `fields` of its INFO replication; the `slave_*`
/// ones only while its link is up and not syncing) and killing its link every few transactions.
/// The replica must already be in sync and the master must not emit PINGs
/// (`--repl-ping-replica-period 3600`), so the master's offsets after EXEC are the only
/// transaction boundaries in the stream. Waits until the replica has caught up at the end.
fn run_transactions_with_link_kills(
    master: &RedisServer,
    replica: &impl InfoSource,
    replica_port: u16,
    fields: &[&'static str],
) -> TransactionRun {
    // Enough transactions and kills to make the check meaningful; the writer keeps going until the
    // kills are done (bounded by MAX_TXNS).
    const MIN_TXNS: u64 = 150;
    const MAX_TXNS: u64 = 5_000;
    const KILLS: i64 = 5;
    const KILL_EVERY_TXNS: u64 = 12;
    // The writer lets the replica lag at most this far, so kills land while data is in flight but
    // the backlog is never outrun.
    const MAX_LAG: i64 = 8 << 20;

    // The first write after a full sync is preceded by SELECT 0 in the stream: get it out of the way.
    let _: () = master.query(redis::cmd("SET").arg("warmup").arg(1));
    let start = wait_in_sync(master, replica, SYNC_TIMEOUT);

    let boundaries = Mutex::new(vec![start]);
    let progress = AtomicU64::new(0);
    let kills_done = AtomicBool::new(false);
    let writer_done = AtomicBool::new(false);
    let mut observed: Vec<(&'static str, HashSet<i64>)> = fields.iter().map(|&f| (f, HashSet::new())).collect();
    let mut polls = 0u64;
    let mut killed = 0i64;
    let mut kill_attempts = 0i64;

    std::thread::scope(|scope| {
        // If the main thread panics, let the writer finish quickly.
        let _release_writer = SetOnDrop(&kills_done);
        let writer = scope.spawn(|| {
            let _done = SetOnDrop(&writer_done);
            let mut con = master.conn();
            let mut replica_con = connect(replica_port, None, None).expect("connect to the replica");
            for t in 0..MAX_TXNS {
                if t >= MIN_TXNS && kills_done.load(Ordering::SeqCst) {
                    break;
                }
                let big = 16 * 1024 + (t as usize * 7919) % (400 * 1024);
                let _: redis::Value = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(format!("tx:big:{}", t % 4))
                    .arg(value_of(t, big))
                    .cmd("INCR")
                    .arg("tx:count")
                    .cmd("HSET")
                    .arg("tx:hash")
                    .arg(format!("f{t}"))
                    .arg(t)
                    .cmd("RPUSH")
                    .arg("tx:list")
                    .arg(value_of(t + 1, 1000))
                    .cmd("LTRIM")
                    .arg("tx:list")
                    .arg(-50)
                    .arg(-1)
                    .cmd("SADD")
                    .arg("tx:set")
                    .arg(t)
                    .cmd("SET")
                    .arg(format!("tx:mid:{}", t % 8))
                    .arg(value_of(t + 2, 20_000))
                    .query(&mut con)
                    .expect("MULTI/EXEC");
                let info: String = redis::cmd("INFO").arg("replication").query(&mut con).expect("INFO");
                let offset: i64 = parse_info_field(&info, "master_repl_offset").unwrap().parse().unwrap();
                boundaries.lock().unwrap().push(offset);
                progress.store(t + 1, Ordering::SeqCst);
                // Pace on the replica's progress (condition-based, no fixed sleep).
                wait_until(SYNC_TIMEOUT, "the replica to come within MAX_LAG of the master", || {
                    let info: String = match redis::cmd("INFO").arg("replication").query(&mut replica_con) {
                        Ok(info) => info,
                        Err(_) => {
                            replica_con = connect(replica_port, None, None).expect("reconnect to the replica");
                            return false;
                        }
                    };
                    parse_info_field(&info, "master_repl_offset")
                        .and_then(|v| v.parse::<i64>().ok())
                        .is_some_and(|replica_offset| offset - replica_offset <= MAX_LAG)
                });
            }
        });

        let mut replica_con = connect(replica_port, None, None).expect("connect to the replica");
        let mut next_kill = KILL_EVERY_TXNS;
        while !writer_done.load(Ordering::SeqCst) {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut replica_con).expect("replica INFO");
            polls += 1;
            let get = |name| parse_info_field(&info, name).and_then(|v| v.parse::<i64>().ok());
            let steady = parse_info_field(&info, "master_link_status").as_deref() == Some("up")
                && get("master_sync_in_progress") == Some(0);
            for (field, values) in observed.iter_mut() {
                if field.starts_with("slave_") && !steady {
                    continue;
                }
                values.insert(get(field).unwrap_or_else(|| panic!("the replica's INFO replication lacks {field}")));
            }
            if killed < KILLS && progress.load(Ordering::SeqCst) >= next_kill {
                // Kill only an established link (the replica may still be reconnecting).
                if master.info_field("replication", "connected_slaves").as_deref() == Some("1") {
                    kill_attempts += 1;
                    killed += master.kill_replica_links();
                    next_kill = progress.load(Ordering::SeqCst) + KILL_EVERY_TXNS;
                    if killed >= KILLS {
                        kills_done.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
        writer.join().expect("writer thread");
    });

    let boundaries = boundaries.into_inner().unwrap();
    let final_offset = offset_of(master);
    assert_eq!(Some(&final_offset), boundaries.last(), "the master's offset moved without a transaction");
    assert_eq!(wait_in_sync(master, replica, SYNC_TIMEOUT), final_offset);
    assert!(killed >= KILLS, "only {killed} of {kill_attempts} kills hit the replica's link");
    TransactionRun { boundaries, observed, polls, killed }
}

/// A master that puts nothing but the test's commands into its stream.
fn quiet_master() -> RedisServer {
    RedisServer::builder().args(["--repl-ping-replica-period", "3600", "--repl-backlog-size", "256mb"]).start()
}

#[test]
fn relay_offsets_never_fall_inside_multi_exec() {
    let master = quiet_master();
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);

    let fields = ["master_repl_offset", "slave_repl_offset"];
    let run = run_transactions_with_link_kills(&master, &relay, relay.port(), &fields);

    assert!(
        run.distinct("master_repl_offset") >= 3,
        "the relay's offset was sampled at only {} distinct values in {} polls",
        run.distinct("master_repl_offset"),
        run.polls
    );
    for field in fields {
        let split = run.split_offsets(field);
        assert!(
            split.is_empty(),
            "the relay reported {field} inside a MULTI/EXEC block {} time(s) out of {} distinct values \
             ({} polls, {} link kills, {} transactions): {}",
            split.len(),
            run.distinct(field),
            run.polls,
            run.killed,
            run.boundaries.len() - 1,
            split.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert_eq!(stat_of(&master, "sync_full"), 1, "link kills should not cause full resyncs");
    assert_single_clean_sync(&master, &relay);
}

#[test]
fn relay_authenticates_with_requirepass() {
    let master = RedisServer::builder().requirepass("secret").start();
    let relay = Relay::builder(master.port()).upstream_password("secret").start();
    wait_link_up(&relay, SYNC_TIMEOUT);
    let _: () = master.query(redis::cmd("SET").arg("after-auth").arg(1));
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    assert!(!relay.stderr().contains("authentication to master failed"), "{}", relay.stderr());
}

#[test]
fn relay_authenticates_as_an_acl_user() {
    // The default user has a different password, so only the ACL user can get in.
    let master = RedisServer::builder().requirepass("adminpw").start();
    let _: () = master
        .query(redis::cmd("ACL").arg("SETUSER").arg("relayuser").arg("on").arg(">pw").arg("+@all").arg("~*").arg("&*"));
    let relay = Relay::builder(master.port()).upstream_user("relayuser").upstream_password("pw").start();
    wait_link_up(&relay, SYNC_TIMEOUT);
    let _: () = master.query(redis::cmd("SET").arg("after-auth").arg(1));
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);

    let clients: String = master.query(redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("replica"));
    assert!(clients.contains("user=relayuser"), "the relay's link should be authenticated as relayuser:\n{clients}");
}

#[test]
fn relay_with_a_wrong_password_keeps_running_and_retrying() {
    let master = RedisServer::builder().requirepass("secret").start();
    let mut relay = Relay::builder(master.port()).upstream_password("wrong").start();

    // Each refused attempt is a reconnect, and the last link error carries the master's reply.
    wait_for(Duration::from_secs(60), "two refused attempts (INFO relay upstream_reconnects)", || {
        let attempts = relay.info_i64("relay", "upstream_reconnects");
        if attempts >= 2 {
            Ok(())
        } else {
            Err(format!("{attempts} attempt(s); stderr:\n{}", relay.stderr()))
        }
    });

    assert!(relay.is_running(), "the relay exited after an authentication failure:\n{}", relay.stderr());
    assert!(relay.ping(), "the relay should still answer PING");
    assert_eq!(relay.info_field("replication", "master_link_status").as_deref(), Some("down"));
    assert_eq!(relay.info_i64("relay", "rdb_fetches"), 0, "no full sync can happen without authentication");
    assert_eq!(master.info_field("replication", "connected_slaves").as_deref(), Some("0"));
    let last_error = relay.info_field("relay", "upstream_last_error").unwrap_or_default();
    assert!(
        last_error.starts_with("authentication to master failed") && last_error.contains("WRONGPASS"),
        "upstream_last_error should carry the master's reply: {last_error:?}"
    );
}
