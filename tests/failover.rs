//! The relay under Sentinel-style reconfiguration: repointed with `MULTI / SLAVEOF / CONFIG REWRITE /
//! CLIENT KILL / EXEC` to the promoted replica of a failover, it continues with partial resyncs, and
//! so do the replicas below it (through `+CONTINUE <newid>` and replid2). It refuses promotion.

mod common;

use common::*;

fn write_keys(server: &RedisServer, prefix: &str, count: usize) {
    let mut con = server.conn();
    for i in 0..count {
        let _: () = redis::cmd("SET").arg(format!("{prefix}:{i}")).arg(value_of(i as u64, 32)).query(&mut con).unwrap();
    }
}

fn stat(source: &impl InfoSource, name: &str) -> i64 {
    stat_of(source, name)
}

#[test]
fn failover_repoints_the_relay_and_everyone_continues_partially() {
    let old_master = RedisServer::start(&[]);
    let candidate = RedisServer::start(&["--replicaof", "127.0.0.1", &old_master.port().to_string()]);
    let relay = Relay::start(&old_master);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &relay.port().to_string()]);
    write_keys(&old_master, "before", 300);
    wait_in_sync(&old_master, &candidate, SYNC_TIMEOUT);
    wait_in_sync(&old_master, &replica, SYNC_TIMEOUT);
    let old_replid = replid_of(&old_master);

    // Failover: the candidate is promoted (new replid, old one kept as replid2); the old master is gone.
    drop(old_master);
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut candidate.conn()).unwrap();
    assert_ne!(replid_of(&candidate), old_replid);
    let full_before = stat(&candidate, "sync_full");

    // Sentinel's +fix-slave-config transaction, as it sends it.
    let mut con = relay.conn();
    let replies: Vec<redis::Value> = redis::pipe()
        .atomic()
        .cmd("SLAVEOF")
        .arg("127.0.0.1")
        .arg(candidate.port())
        .cmd("CONFIG")
        .arg("REWRITE")
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut con)
        .expect("the transaction succeeds");
    assert_eq!(replies.len(), 4, "{replies:?}");
    wait_until(SYNC_TIMEOUT, "the relay reports the new master", || {
        relay.info_field("replication", "master_port") == Some(candidate.port().to_string())
    });

    write_keys(&candidate, "after", 300);
    wait_in_sync(&candidate, &relay, SYNC_TIMEOUT);
    wait_in_sync(&candidate, &replica, SYNC_TIMEOUT);
    assert_eq!(candidate.digest(), replica.digest());
    assert_eq!(stat(&candidate, "sync_full"), full_before, "the promoted master never forked for the relay");
    assert!(stat(&candidate, "sync_partial_ok") >= 1);
    assert_eq!(replid_of(&relay), replid_of(&candidate));
    assert_eq!(relay.info_field("replication", "master_replid2").as_deref(), Some(old_replid.as_str()));
    assert_eq!(replid_of(&replica), replid_of(&candidate), "the replica below shifted ids too");
    assert_eq!(stat(&relay, "sync_full"), 1, "the replica below never full-synced again");
    assert!(stat(&relay, "sync_partial_ok") >= 1, "it continued through replid2");
    assert!(replica.log().contains("Successful partial resynchronization"));
}

#[test]
fn the_relay_refuses_promotion_and_failover() {
    let master = RedisServer::start(&[]);
    let relay = Relay::start(&master);
    wait_link_up(&relay, SYNC_TIMEOUT);
    let mut con = relay.conn();
    let promoted: redis::RedisResult<()> = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut con);
    assert!(promoted.is_err(), "REPLICAOF NO ONE must be refused");
    let failover: redis::RedisResult<()> =
        redis::cmd("PSYNC").arg(replid_of(&master)).arg(1).arg("FAILOVER").query(&mut con);
    assert!(failover.is_err(), "PSYNC ... FAILOVER must be refused");
    assert_eq!(relay.info_field("replication", "slave_priority").as_deref(), Some("0"));
    let same: String = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(master.port()).query(&mut con).unwrap();
    assert_eq!(same, "OK Already connected to specified master");
    assert_eq!(relay.info_field("replication", "role").as_deref(), Some("slave"));
    // Like a Redis without a password: the default user accepts any password, a bare AUTH is refused.
    let default_user: String = redis::cmd("AUTH").arg("default").arg("anything").query(&mut con).unwrap();
    assert_eq!(default_user, "OK");
    let bare: redis::RedisResult<()> = redis::cmd("AUTH").arg("secret").query(&mut con);
    assert!(bare.is_err());
}

/// A relay with `requirepass` serves replicas that carry `masterauth` for a protected master, so
/// they can be repointed between the two; clients without the password get `NOAUTH`.
#[test]
fn replicas_with_masterauth_use_a_relay_with_requirepass() {
    let master = RedisServer::builder().requirepass("s3cret").start();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let stderr = std::fs::File::create(work.path().join("relay.stderr")).unwrap();
    let mut child = std::process::Command::new(relay_bin())
        .args(["--upstream", &format!("127.0.0.1:{}", master.port()), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--dir", &work.path().join("data").display().to_string()])
        .args(["--upstream-password", "s3cret", "--requirepass", "s3cret"])
        .stdin(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn redis-relay");
    struct KillOnDrop<'a>(&'a mut std::process::Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = KillOnDrop(&mut child);
    wait_until(SYNC_TIMEOUT, "the relay answers with the password", || {
        connect(port, None, Some("s3cret"))
            .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con))
            .is_ok_and(|pong| pong == "PONG")
    });
    let anonymous: redis::RedisResult<String> =
        connect(port, None, None).and_then(|mut con| redis::cmd("INFO").query(&mut con));
    assert!(anonymous.is_err_and(|e| e.to_string().contains("NOAUTH")), "INFO without AUTH must be refused");
    let wrong = connect(port, None, Some("nope"));
    assert!(wrong.is_err(), "a wrong password must be refused");

    let replica = RedisServer::builder().arg("--masterauth").arg("s3cret").replica_of(port).start();
    write_keys(&master, "auth", 200);
    wait_until(SYNC_TIMEOUT, "the replica behind the protected relay has the master's data", || {
        master.digest() == replica.digest()
            && replica.info_field("replication", "master_link_status").as_deref() == Some("up")
    });
}
