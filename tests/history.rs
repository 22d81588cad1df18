//! History-reset protection with real redis-servers: a master without persistence that restarts
//! empty (new replid, offset 0, an empty RDB) is held, the replicas below keep the old dataset, the
//! old dataset can be taken from the relay with `redis-cli --rdb`, and `RELAY HISTORY ACCEPT` moves
//! everything to the new history. With `history_reset: follow` the relay follows at once.

mod common;

use std::process::Command;

use common::*;

/// Keys in every database of `server`.
fn total_keys(server: &RedisServer) -> i64 {
    (0..16).map(|db| server.dbsize(db)).sum()
}

fn relay_field(relay: &Relay, name: &str) -> String {
    relay.info_field("relay", name).unwrap_or_else(|| panic!("INFO relay lacks {name}:\n{}", relay.info("relay")))
}

/// A loaded master (no persistence), a relay with a metrics endpoint, and one replica below the
/// relay, all in sync. Returns them with the metrics port.
fn loaded_topology(relay_args: &[&str]) -> (RedisServer, Relay, RedisServer, u16) {
    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 20);
    let metrics_port = free_port();
    let mut builder = Relay::builder(master.port()).arg("--metrics").arg(format!("127.0.0.1:{metrics_port}"));
    for arg in relay_args {
        builder = builder.arg(*arg);
    }
    let relay = builder.start();
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    (master, relay, replica, metrics_port)
}

fn held_metric(metrics_port: u16) -> Option<f64> {
    metric_value(&scrape(metrics_port), "redis_relay_history_reset_held", &[("relay", "default")])
}

/// `redis-cli --rdb` from the relay, loaded into a fresh redis-server: its digest.
fn digest_of_rdb_from(relay: &Relay) -> String {
    let load_dir = tempfile::Builder::new().prefix("redis-load-").tempdir().expect("temp dir");
    let rdb_path = load_dir.path().join("dump.rdb");
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &relay.port().to_string(), "--rdb"])
        .arg(&rdb_path)
        .output()
        .expect("run redis-cli --rdb");
    assert!(output.status.success(), "redis-cli --rdb failed: {}", String::from_utf8_lossy(&output.stderr));
    let loaded = RedisServer::builder().dir(load_dir).start();
    loaded.digest()
}

#[test]
fn the_relay_counts_the_keys_of_a_real_rdb() {
    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 30);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    // Every core type in both encodings, streams with groups and consumers, expiries, 4 databases.
    assert_eq!(relay_field(&relay, "snapshot_keys"), total_keys(&master).to_string());
    assert_eq!(relay_field(&relay, "snapshot_keys_exact"), "1");
}

#[test]
fn a_master_restarted_empty_is_held_until_an_operator_accepts() {
    let (mut master, relay, replica, metrics_port) = loaded_topology(&[]);
    let old_digest = master.digest();
    let old_keys = total_keys(&master);
    let old_replid = replid_of(&master);
    assert_eq!(relay_field(&relay, "snapshot_keys"), old_keys.to_string());
    assert_eq!(relay_field(&relay, "history_reset_held"), "0");
    wait_until(SYNC_TIMEOUT, "the metric shows no hold", || held_metric(metrics_port) == Some(0.0));
    let err: redis::RedisResult<String> = redis::cmd("RELAY").arg("HISTORY").arg("ACCEPT").query(&mut relay.conn());
    assert!(err.is_err_and(|e| e.to_string().contains("no history reset is held")));

    master.restart_empty();
    wait_until(SYNC_TIMEOUT, "the relay holds the new history", || {
        relay.info_field("relay", "history_reset_held").as_deref() == Some("1")
    });
    // The restarted master took a new replid when the relay's PSYNC created its backlog.
    let new_replid = replid_of(&master);
    assert_ne!(new_replid, old_replid);
    assert_eq!(relay_field(&relay, "history_reset_new_replid"), new_replid);
    assert_eq!(relay_field(&relay, "history_reset_new_keys"), "0");
    assert_eq!(relay_field(&relay, "history_reset_old_replid"), old_replid);
    assert_eq!(relay_field(&relay, "history_reset_old_keys"), old_keys.to_string());
    wait_until(SYNC_TIMEOUT, "the metric shows the hold", || held_metric(metrics_port) == Some(1.0));
    // Nothing of the new history reached the relay's log or its replicas.
    assert_eq!(replid_of(&relay), old_replid);
    assert_eq!(relay_field(&relay, "snapshot_replid"), old_replid);

    // Writes on the new history do not reach the replica, which keeps the old dataset and its link:
    // while it holds, the relay is no replica of the master (it asks again only every 30 s), so no
    // stream flows from it.
    wait_until(SYNC_TIMEOUT, "the holding relay to be no replica of the master", || {
        master.info_field("replication", "connected_slaves").as_deref() == Some("0")
    });
    let _: () = master.query(redis::cmd("SET").arg("after:restart").arg("1"));
    assert_eq!(master.info_field("replication", "connected_slaves").as_deref(), Some("0"));
    assert_eq!(replica.digest(), old_digest, "the replica below keeps the old dataset");
    assert_eq!(total_keys(&replica), old_keys);
    assert_eq!(replica.info_field("replication", "master_link_status").as_deref(), Some("up"));
    assert_eq!(stat_of(&relay, "sync_full"), 1, "the replica below was not full-synced again");

    // The old dataset can be taken from the relay, e.g. to restore the master.
    assert_eq!(digest_of_rdb_from(&relay), old_digest);
    // A new replica still gets the old dataset.
    let late = RedisServer::builder().replica_of(relay.port()).start();
    wait_until(SYNC_TIMEOUT, "a new replica loads the old dataset", || late.digest() == old_digest);

    // The link does not fetch the new history's RDB again and again while it holds.
    assert_eq!(stat_of(&master, "sync_full"), 1, "the held RDB was taken once");

    let reply: String = redis::cmd("RELAY").arg("HISTORY").arg("ACCEPT").query(&mut relay.conn()).unwrap();
    assert_eq!(reply, "OK");
    wait_until(SYNC_TIMEOUT, "the replicas move to the new history", || {
        replica.digest() == master.digest() && late.digest() == master.digest()
    });
    assert_eq!(total_keys(&replica), 1);
    assert_eq!(replid_of(&relay), new_replid);
    assert_eq!(relay_field(&relay, "history_reset_held"), "0");
    assert_eq!(relay_field(&relay, "snapshot_replid"), new_replid);
    wait_until(SYNC_TIMEOUT, "the metric shows the hold ended", || held_metric(metrics_port) == Some(0.0));
    // And it follows from there.
    let _: () = master.query(redis::cmd("SET").arg("after:accept").arg("2"));
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(master.digest(), replica.digest());
}

#[test]
fn with_follow_a_master_restarted_empty_empties_the_replicas() {
    let (mut master, relay, replica, metrics_port) = loaded_topology(&["--history-reset", "follow"]);
    assert_ne!(total_keys(&replica), 0);
    master.restart_empty();
    let _: () = master.query(redis::cmd("SET").arg("after:restart").arg("1"));
    wait_until(SYNC_TIMEOUT, "the replica follows the new, empty history", || replica.digest() == master.digest());
    assert_eq!(total_keys(&replica), 1);
    assert_eq!(replid_of(&relay), replid_of(&master));
    assert_eq!(relay_field(&relay, "history_reset_policy"), "follow");
    assert_eq!(relay_field(&relay, "history_reset_held"), "0");
    assert_eq!(held_metric(metrics_port), Some(0.0));
}

fn replicaof(relay: &Relay, port: u16) -> redis::RedisResult<String> {
    redis::cmd("REPLICAOF").arg("127.0.0.1").arg(port).query(&mut relay.conn())
}

#[test]
fn replicaof_to_an_unrelated_master_is_held_when_it_is_smaller_and_followed_when_not() {
    let (master, relay, replica, _metrics_port) = loaded_topology(&[]);
    let old_digest = master.digest();
    let old_replid = replid_of(&master);

    // A wrong REPLICAOF to an empty master: held, the replica keeps the dataset.
    let empty = RedisServer::start(&[]);
    assert_eq!(replicaof(&relay, empty.port()).unwrap(), "OK");
    wait_until(SYNC_TIMEOUT, "the relay holds the empty master's history", || {
        relay.info_field("relay", "history_reset_held").as_deref() == Some("1")
    });
    assert_eq!(relay_field(&relay, "history_reset_new_keys"), "0");
    assert_eq!(replica.digest(), old_digest);
    assert_eq!(replid_of(&relay), old_replid);

    // Repointed back, the master continues the relay's history: the hold ends, nobody full-syncs.
    let _: () = master.query(redis::cmd("SET").arg("while:held").arg("1"));
    assert_eq!(replicaof(&relay, master.port()).unwrap(), "OK");
    wait_until(SYNC_TIMEOUT, "the hold ends on +CONTINUE", || {
        relay.info_field("relay", "history_reset_held").as_deref() == Some("0")
    });
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(replica.digest(), master.digest());
    assert_eq!(stat_of(&relay, "sync_full"), 1, "the replica below was not full-synced again");
    assert_eq!(stat_of(&master, "sync_full"), 1, "the relay continued, it did not full-sync again");

    // A master with at least as many keys (e.g. restored from a larger backup) is followed.
    let bigger = RedisServer::start(&[]);
    load_dataset(&mut bigger.conn(), 40);
    assert_eq!(replicaof(&relay, bigger.port()).unwrap(), "OK");
    wait_until(SYNC_TIMEOUT, "the replica follows the bigger master", || replica.digest() == bigger.digest());
    assert_eq!(replid_of(&relay), replid_of(&bigger));
    assert_eq!(relay_field(&relay, "history_reset_held"), "0");
}

#[test]
fn replicaof_is_validated_and_can_be_denied() {
    let master = RedisServer::start(&[]);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, SYNC_TIMEOUT);
    let port = master.port().to_string();
    let long_host = "h".repeat(300);
    // Refused on their form alone: no name lookup, no port but ours.
    let unused_port = free_port().to_string();
    for (host, target_port) in [("127.0.0.1", "0"), ("127.0.0.1", "65536"), (long_host.as_str(), unused_port.as_str())]
    {
        let reply: redis::RedisResult<String> =
            redis::cmd("REPLICAOF").arg(host).arg(target_port).query(&mut relay.conn());
        assert!(reply.is_err(), "REPLICAOF {host:.20} {target_port} answered {reply:?}");
    }
    assert_eq!(relay.info_field("replication", "master_port"), Some(port.clone()), "the upstream is unchanged");

    let other = RedisServer::start(&[]);
    let denied = Relay::builder(master.port()).arg("--replicaof").arg("deny").start();
    wait_in_sync(&master, &denied, SYNC_TIMEOUT);
    for command in ["REPLICAOF", "SLAVEOF"] {
        let reply: redis::RedisResult<String> =
            redis::cmd(command).arg("127.0.0.1").arg(other.port()).query(&mut denied.conn());
        let error = reply.expect_err("refused with replicaof: deny");
        assert!(error.to_string().contains("replicaof: deny"), "{error}");
    }
    assert_eq!(denied.info_field("replication", "master_port"), Some(port));
    assert_eq!(denied.info_field("replication", "master_link_status").as_deref(), Some("up"));
}

#[test]
fn a_relay_restarted_during_a_hold_keeps_holding() {
    let (mut master, mut relay, replica, _metrics_port) = loaded_topology(&[]);
    let old_digest = master.digest();
    let old_replid = replid_of(&master);
    master.restart_empty();
    wait_until(SYNC_TIMEOUT, "the relay holds the new history", || {
        relay.info_field("relay", "history_reset_held").as_deref() == Some("1")
    });
    relay.restart();
    wait_until(SYNC_TIMEOUT, "the restarted relay holds again", || {
        relay.info_field("relay", "history_reset_held").as_deref() == Some("1")
    });
    assert_eq!(replid_of(&relay), old_replid);
    wait_until(SYNC_TIMEOUT, "the replica reconnects to the restarted relay", || {
        replica.info_field("replication", "master_link_status").as_deref() == Some("up")
    });
    assert_eq!(replica.digest(), old_digest);
    // Counters of the restarted relay: the replica continued from the recovered log.
    wait_until(SYNC_TIMEOUT, "the replica continues partially", || stat_of(&relay, "sync_partial_ok") == 1);
    assert_eq!(stat_of(&relay, "sync_full"), 0, "the replica was not full-synced");
}

#[test]
fn the_accept_command_needs_auth_when_the_relay_has_a_password() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port()).requirepass("s3cret").start();
    let mut anonymous = connect(relay.port(), None, None).expect("connect");
    let reply: redis::RedisResult<String> = redis::cmd("RELAY").arg("HISTORY").arg("ACCEPT").query(&mut anonymous);
    assert!(reply.is_err_and(|e| e.code() == Some("NOAUTH")), "refused before AUTH");
    let mut admin = connect(relay.port(), None, Some("s3cret")).expect("connect with AUTH");
    let reply: redis::RedisResult<String> = redis::cmd("RELAY").arg("HISTORY").arg("ACCEPT").query(&mut admin);
    assert!(
        reply.is_err_and(|e| e.to_string().contains("no history reset is held")),
        "authenticated: reaches the command"
    );
}
