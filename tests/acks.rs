//! The relay's ACKs to a real redis-server 7.0: `REPLCONF ACK <applied> FACK <durable>` (the 7.2+
//! replica-with-AOF form) is accepted by 7.0, which reads the ACK pair and ignores the FACK pair,
//! so `WAIT` through the relay is answered from the applied offset without waiting for the fsync.
//! `upstream_ack: durable` keeps ACKing only what is fsynced.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn wait_one(con: &mut redis::Connection, timeout_ms: u64) -> i64 {
    redis::cmd("WAIT").arg(1).arg(timeout_ms).query(con).expect("WAIT")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn fack_acks_make_wait_fast_on_redis_7_0() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port()).arg("--appendfsync").arg("everysec").start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let mut con = master.conn();
    let mut times = Vec::with_capacity(1000);
    for i in 0..1000 {
        let _: () = redis::cmd("SET").arg("wait:key").arg(i).query(&mut con).unwrap();
        let started = Instant::now();
        assert_eq!(wait_one(&mut con, 0), 1, "WAIT 1 0 returns once the relay ACKs");
        times.push(started.elapsed());
    }
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!("WAIT 1 0 through the relay over 1000 calls: p50 {p50:?}, p99 {p99:?}, max {:?}", times[999]);
    // Under everysec a durable-only ACK makes WAIT last up to a second; the applied ACK does not.
    assert!(p99 < Duration::from_millis(200), "p50 {p50:?} p99 {p99:?}");
    // 7.0 took every ACK: the link is up and the relay's ACKed offset is the master's.
    let info = master.info("replication");
    assert_eq!(parse_info_field(&info, "connected_slaves").as_deref(), Some("1"), "{info}");
    assert!(info.contains("state=online"), "{info}");
    assert!(!master.log().contains("Unrecognized REPLCONF"), "{}", master.log());
    assert_eq!(stat_of(&master, "sync_full"), 1);
}

/// `upstream_ack: durable` ACKs only what the log's fsync covered: after every write, the offset
/// the master has from the relay is never past the log's durable offset (read after it; the
/// durable offset only grows), and `WAIT` returns once the once-a-second fsync covered the write.
#[test]
fn durable_acks_never_pass_the_fsync_and_wait_counts_the_relay() {
    let master = RedisServer::start(&[]);
    let relay =
        Relay::builder(master.port()).arg("--upstream-ack").arg("durable").arg("--appendfsync").arg("everysec").start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let durable = || relay.info_i64("relay", "log_durable_offset") as u64;
    let mut con = master.conn();
    for i in 0..3 {
        let _: () = redis::cmd("SET").arg("k").arg(i).query(&mut con).unwrap();
        // Each WAIT asks the relay for an ACK (GETACK); the fsync runs once a second.
        assert_eq!(wait_one(&mut con, 5000), 1, "WAIT counts the relay once the fsync covered the write");
        let acked = acked_on_master(&master, relay.port()).expect("the master lists the relay");
        let durable_after = durable();
        assert!(acked <= durable_after, "the master has ACK {acked} beyond the durable offset {durable_after}");
        assert_eq!(acked as i64, offset_of(&master), "the ACK covers the write WAIT waited for");
    }
    assert_eq!(master.info_field("replication", "connected_slaves").as_deref(), Some("1"));
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Resumes a SIGSTOPped process however the test ends.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn set_and_wait(con: &mut redis::Connection, i: i64, timeout_ms: u64) -> (i64, Duration) {
    let _: () = redis::cmd("SET").arg("e2e:key").arg(i).query(con).unwrap();
    let started = Instant::now();
    (wait_one(con, timeout_ms), started.elapsed())
}

#[test]
fn with_ack_replicas_wait_counts_a_replica_below_the_relay() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port()).arg("--ack-replicas").arg("1").start();
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    let mut con = master.conn();

    let mut times = Vec::new();
    for i in 0..200 {
        let (acked, took) = set_and_wait(&mut con, i, 1000);
        assert_eq!(acked, 1, "WAIT 1 1000 with a healthy replica below");
        times.push(took);
    }
    times.sort();
    println!(
        "WAIT 1 1000 end to end (master -> relay -> replica ACK -> relay -> master), 200 calls: p50 {:?}, p99 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );

    signal(replica.pid(), "STOP");
    let resume = Continue(replica.pid());
    let (acked, took) = set_and_wait(&mut con, 1000, 1000);
    assert_eq!(acked, 0, "WAIT 1 1000 while the only replica below is stopped");
    assert!(took >= Duration::from_millis(900), "WAIT waited its timeout: {took:?}");
    drop(resume);
    let (acked, _) = set_and_wait(&mut con, 1001, 10_000);
    assert_eq!(acked, 1, "WAIT counts the replica again once it ACKs");
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(master.digest(), replica.digest());
}

#[test]
fn without_ack_replicas_wait_counts_the_relay_itself() {
    let master = RedisServer::start(&[]);
    let relay = Relay::start(&master);
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    let mut con = master.conn();
    assert_eq!(set_and_wait(&mut con, 1, 1000).0, 1);
    signal(replica.pid(), "STOP");
    let _resume = Continue(replica.pid());
    assert_eq!(set_and_wait(&mut con, 2, 1000).0, 1, "the relay ACKs for itself, whatever is below it");
}
