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

#[test]
fn durable_acks_are_accepted_and_wait_counts_the_relay() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port()).arg("--upstream-ack").arg("durable").start();
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let mut con = master.conn();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    // The fsync runs once a second; WAIT returns when it has covered the write.
    assert_eq!(wait_one(&mut con, 5000), 1);
    assert_eq!(master.info_field("replication", "connected_slaves").as_deref(), Some("1"));
}
