//! Users and roles: `AUTH user pass`, `HELLO ... AUTH`, `NOPERM` byte for byte as redis-server 7.0
//! answers them with the same users in its ACL; a `replica` user syncs a real replica but cannot
//! repoint the relay; a `monitor` user cannot sync; a real Sentinel authenticated as a
//! `monitor,admin` user sees the relay as a replica and repoints it.

mod common;

use std::time::Duration;

use common::*;

const ADMIN_PASSWORD: &str = "admin-pw";

/// The relay's users on the command line (`--user NAME:ROLES:PASSWORD`).
fn user_flags(users: &[&str]) -> Vec<String> {
    users.iter().flat_map(|u| ["--user".to_string(), u.to_string()]).collect()
}

fn stat(relay: &Relay, name: &str) -> i64 {
    relay.info_i64("stats", name)
}

/// The same session against redis-server (users `rep` and `mon` in its ACL with the commands of
/// the relay's `replica` and `monitor` roles that the session uses) and against the relay: every
/// reply identical, byte for byte, from before AUTH to NOPERM inside a transaction.
#[test]
fn auth_hello_and_noperm_replies_are_redis_servers() {
    let redis = RedisServer::builder()
        .requirepass(ADMIN_PASSWORD)
        .args(["--user", "rep", "on", ">rep-pw", "-@all", "+ping", "+replconf", "+psync", "+sync"])
        .args(["--user", "mon", "on", ">mon-pw", "-@all", "+ping", "+info", "+config|get", "+multi", "+exec"])
        .args(["+subscribe", "&*"])
        .start();
    let master = RedisServer::start(&[]);
    let metrics_port = free_port();
    let relay = Relay::builder(master.port())
        .requirepass(ADMIN_PASSWORD)
        .args(user_flags(&["rep:replica:rep-pw", "mon:monitor:mon-pw"]))
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .start();
    let session = [
        "PING",
        "AUTH mon wrong",
        "AUTH nobody mon-pw",
        "AUTH wrong",
        "AUTH default mon-pw",
        "HELLO 3 AUTH mon wrong",
        "HELLO 3",
        "AUTH rep rep-pw",
        "REPLICAOF 127.0.0.1 1",
        "SLAVEOF 127.0.0.1 1",
        "INFO",
        "CONFIG GET maxclients",
        "CLIENT KILL TYPE normal",
        "EXEC",
        "REPLICAOF",
        "SYNC now",
        "MULTI now",
        "PING",
        "AUTH mon mon-pw",
        "PSYNC ?",
        "PSYNC ? -1",
        "SYNC",
        "REPLCONF listening-port 1",
        "CONFIG SET timeout 1",
        "MULTI",
        "REPLICAOF 127.0.0.1 1",
        "PING",
        "EXEC",
        "AUTH mon wrong",
        "PING",
        "SUBSCRIBE x",
    ];
    let expected = raw_transcript(redis.port(), &session);
    let got = raw_transcript(relay.port(), &session);
    for ((command, want), have) in session.iter().zip(&expected).zip(&got) {
        assert_eq!(have, want, "reply to {command:?}");
    }
    assert!(expected[8].starts_with("-NOPERM"), "the reference refused REPLICAOF: {:?}", expected[8]);
    // What the session did, in the relay's INFO stats (Redis 7.2's fields).
    assert_eq!(stat(&relay, "acl_access_denied_auth"), 6, "AUTH mon wrong, nobody, wrong, default, HELLO, mon wrong");
    assert_eq!(stat(&relay, "acl_access_denied_cmd"), 11);
    wait_for(SYNC_TIMEOUT, "the refusals in the metrics", || {
        let scrape = scrape(metrics_port);
        let value = |reason| metric_value(&scrape, "redis_relay_acl_denied_total", &[("reason", reason)]);
        match (value("auth"), value("command")) {
            (Some(6.0), Some(11.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

/// A named user's session: who `CLIENT LIST` says it is, `HELLO 3 AUTH` as redis-server answers
/// it, and `CONFIG GET requirepass` kept from a monitor.
#[test]
fn sessions_carry_their_user() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port())
        .requirepass(ADMIN_PASSWORD)
        .args(user_flags(&["ops:monitor,admin:ops-pw", "mon:monitor:mon-pw"]))
        .start();
    let hello = raw_transcript(relay.port(), &["HELLO 3 AUTH ops ops-pw", "CLIENT INFO"]);
    assert!(hello[0].starts_with("%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"), "{:?}", hello[0]);
    assert!(hello[1].contains(" user=ops "), "{:?}", hello[1]);
    let mut monitor = connect(relay.port(), Some("mon"), Some("mon-pw")).expect("AUTH mon");
    let shown: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("requirepass").query(&mut monitor).unwrap();
    assert_eq!(shown, vec!["requirepass".to_string(), String::new()]);
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut monitor).unwrap();
    assert!(list.lines().any(|l| l.contains(" user=mon ") && l.contains("cmd=client|list")), "{list}");
    let shown: Vec<String> = relay.query(redis::cmd("CONFIG").arg("GET").arg("requirepass"));
    assert_eq!(shown[1], ADMIN_PASSWORD, "the default user is admin and may read it");
}

/// A redis-server replica with `masteruser`/`masterauth` of a `replica` user syncs through the
/// relay (digest-equal with the master); that user cannot `REPLICAOF` the relay; a replica given a
/// `monitor` user's credentials is refused at `PSYNC`/`SYNC` and never attaches.
#[test]
fn replica_user_syncs_but_cannot_repoint_and_monitor_user_cannot_sync() {
    let master = RedisServer::start(&[]);
    load_dataset(&mut master.conn(), 1);
    let relay = Relay::builder(master.port())
        .requirepass(ADMIN_PASSWORD)
        .args(user_flags(&["rep:replica:rep-pw", "mon:monitor:mon-pw"]))
        .start();
    let replica =
        RedisServer::builder().replica_of(relay.port()).args(["--masteruser", "rep", "--masterauth", "rep-pw"]).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(replica.digest(), master.digest());
    let replicas: String = relay.query(redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("replica"));
    assert!(replicas.contains(" user=rep "), "{replicas}");

    let other = RedisServer::start(&[]);
    let refused = raw_transcript(
        relay.port(),
        &["AUTH rep rep-pw", &format!("REPLICAOF 127.0.0.1 {}", other.port()), "CLIENT KILL TYPE master"],
    );
    assert_eq!(refused[1], "-NOPERM this user has no permissions to run the 'replicaof' command\r\n");
    assert_eq!(refused[2], "-NOPERM this user has no permissions to run the 'client|kill' command\r\n");
    assert_eq!(relay.info_field("replication", "master_port"), Some(master.port().to_string()));

    let denied_before = stat(&relay, "acl_access_denied_cmd");
    let intruder =
        RedisServer::builder().replica_of(relay.port()).args(["--masteruser", "mon", "--masterauth", "mon-pw"]).start();
    // redis-server tries PSYNC, then SYNC, then starts over: both refused, at least twice.
    wait_until(SYNC_TIMEOUT, "the monitor user's PSYNC and SYNC to be refused", || {
        stat(&relay, "acl_access_denied_cmd") >= denied_before + 4
    });
    assert_eq!(intruder.info_field("replication", "master_link_status").as_deref(), Some("down"));
    assert_eq!(intruder.dbsize(0), 0);
    assert_eq!(relay.info_field("replication", "connected_slaves").as_deref(), Some("1"));
    assert_eq!(stat(&relay, "sync_full"), 1, "only the replica user's replica synced");
}

/// A real Sentinel with `auth-user`/`auth-pass` of a `monitor,admin` user: it finds the relay in
/// the master's replicas, authenticates as that user, reads its INFO and holds its hello
/// subscription with no command refused; when the relay is pointed elsewhere, Sentinel points it
/// back (`+fix-slave-config`: MULTI, SLAVEOF, CONFIG REWRITE, CLIENT KILL, EXEC), which only an
/// admin may do.
#[test]
fn sentinel_monitors_and_repoints_the_relay_as_a_monitor_admin_user() {
    let sentinel_acl = ["--user", "sentinel", "on", ">sentinel-pw", "+@all", "~*", "&*"];
    let master = RedisServer::builder().args(sentinel_acl).start();
    let relay = Relay::builder(master.port())
        .requirepass(ADMIN_PASSWORD)
        .args(user_flags(&["sentinel:monitor,admin:sentinel-pw"]))
        .start();
    wait_link_up(&relay, SYNC_TIMEOUT);
    let settings = SentinelSettings {
        master_name: "mymaster".into(),
        master_port: master.port(),
        quorum: 1,
        down_after: Duration::from_secs(5),
        // Sentinel repairs a replica pointing at another master once this has passed.
        failover_timeout: Duration::from_secs(2),
        auth: Some(("sentinel".into(), "sentinel-pw".into())),
    };
    let sentinel = Sentinel::start(&settings);
    let events = sentinel.events();
    let relay_port = relay.port().to_string();
    wait_for(SYNC_TIMEOUT, "Sentinel to see the relay as a connected replica", || {
        let replicas = sentinel.replicas("mymaster");
        let row = replicas.iter().find(|r| r.get("port") == Some(&relay_port));
        match row {
            Some(r)
                if r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    // Sentinel's two links to the relay: commands and the hello subscription, both as its user.
    let clients: String = relay.query(redis::cmd("CLIENT").arg("LIST"));
    wait_until(SYNC_TIMEOUT, "Sentinel's hello subscription on the relay", || {
        let clients: String = relay.query(redis::cmd("CLIENT").arg("LIST"));
        clients.lines().any(|l| l.contains(" user=sentinel ") && l.contains("flags=P"))
    });
    assert!(clients.lines().any(|l| l.contains(" user=sentinel ") && l.contains("name=sentinel-")), "{clients}");
    assert_eq!(stat(&relay, "acl_access_denied_auth"), 0, "Sentinel authenticated");
    assert_eq!(stat(&relay, "acl_access_denied_cmd"), 0, "no command of Sentinel's was refused");

    let elsewhere = RedisServer::start(&[]);
    let mut admin = connect(relay.port(), None, Some(ADMIN_PASSWORD)).expect("connect as default");
    let ok: String =
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(elsewhere.port()).query(&mut admin).expect("REPLICAOF");
    assert_eq!(ok, "OK");
    // Sentinel's repair ends with CLIENT KILL TYPE normal, which may close this probe's own
    // connection mid-query: a failed query is one more poll, not a failure.
    wait_for(SYNC_TIMEOUT, "Sentinel to point the relay back at the master", || {
        let info: redis::RedisResult<String> = connect(relay.port(), None, Some(ADMIN_PASSWORD))
            .and_then(|mut con| redis::cmd("INFO").arg("replication").query(&mut con));
        match info.map(|info| parse_info_field(&info, "master_port")) {
            Ok(Some(port)) if port == master.port().to_string() => Ok(()),
            other => Err(format!("master_port {other:?}")),
        }
    });
    assert!(events.find("+fix-slave-config", &relay_port).is_some(), "{:?}", events.all());
    wait_link_up(&relay, SYNC_TIMEOUT);
    assert_eq!(stat(&relay, "acl_access_denied_cmd"), 0, "the repair ran as the admin it is");
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, what: &str) {
    wait_until(STARTUP_TIMEOUT, what, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// A relay from YAML whose users take their passwords from `${ENV}` and a `password_file`, with no
/// `requirepass`: its default user is off, and the session is byte for byte what redis-server
/// answers with `user default off` and the same user.
#[test]
fn yaml_users_with_the_default_user_off_answer_as_redis_server() {
    let work = tempfile::tempdir().expect("temp dir");
    let redis_port = free_port();
    let _redis = KillOnDrop(
        std::process::Command::new(redis_server_bin())
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(work.path())
            .args(["--user", "default", "off", "--user", "mon", "on", ">mon-pw", "-@all", "+ping", "+info"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server"),
    );
    let master = RedisServer::start(&[]);
    let relay_port = free_port();
    std::fs::write(work.path().join("rep.pass"), "file-pw\n").expect("write password file");
    let yaml = format!(
        "data_dir: '{dir}'\nrelays:\n  - name: a\n    upstream: {{addr: '127.0.0.1:{master}'}}\n    listen: '127.0.0.1:{relay_port}'\n    users:\n      - {{name: mon, password: '${{USERS_TEST_MON_PW}}', role: monitor}}\n      - {{name: rep, password_file: '{dir}/rep.pass', role: replica}}\n",
        dir = work.path().display(),
        master = master.port(),
    );
    let config = work.path().join("relay.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let _relay = KillOnDrop(
        std::process::Command::new(relay_bin())
            .arg("--config")
            .arg(&config)
            .env("USERS_TEST_MON_PW", "mon-pw")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-relay"),
    );
    wait_listening(redis_port, "redis-server with the default user off");
    wait_listening(relay_port, "the relay from YAML");
    let session = [
        "PING",
        "AUTH x",
        "AUTH default x",
        "HELLO 3",
        "AUTH mon wrong",
        "AUTH mon mon-pw",
        "PING",
        "CONFIG SET timeout 1",
        "RESET",
        "PING",
    ];
    let expected = raw_transcript(redis_port, &session);
    let got = raw_transcript(relay_port, &session);
    for ((command, want), have) in session.iter().zip(&expected).zip(&got) {
        assert_eq!(have, want, "reply to {command:?}");
    }
    assert_eq!(expected[0], "-NOAUTH Authentication required.\r\n");
    let replica_user = raw_transcript(relay_port, &["AUTH rep file-pw", "INFO", "AUTH rep file-pw\n"]);
    assert_eq!(replica_user[0], "+OK\r\n", "the password file's trailing newline is not part of it");
    assert_eq!(replica_user[1], "-NOPERM this user has no permissions to run the 'info' command\r\n");
    assert!(replica_user[2].starts_with("-WRONGPASS"), "{:?}", replica_user[2]);
}

/// The real redis_exporter logged in as a `monitor` user (`--redis.user`, `--redis.password`): its
/// scrapes (`INFO ALL`, `CONFIG GET *`, `LATENCY LATEST`, `SLOWLOG`, `CLIENT LIST`, ...) run with
/// no command refused and no scrape error.
#[test]
fn redis_exporter_scrapes_as_a_monitor_user() {
    let master = RedisServer::start(&[]);
    let relay = Relay::builder(master.port())
        .requirepass(ADMIN_PASSWORD)
        .args(user_flags(&["exporter:monitor:exporter-pw"]))
        .start();
    wait_link_up(&relay, SYNC_TIMEOUT);
    let web = free_port();
    let _exporter = KillOnDrop(
        std::process::Command::new("prometheus-redis-exporter")
            .arg(format!("--redis.addr=redis://127.0.0.1:{}", relay.port()))
            .args(["--redis.user=exporter", "--redis.password=exporter-pw"])
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus-redis-exporter"),
    );
    let body = wait_for(SYNC_TIMEOUT, "a scrape with the link up", || {
        let body = scrape(web);
        match metric_value(&body, "redis_master_link_up", &[]) {
            Some(1.0) => Ok(body),
            other => Err(format!("redis_master_link_up {other:?}")),
        }
    });
    assert_eq!(metric_value(&body, "redis_up", &[]), Some(1.0), "{body}");
    assert_eq!(metric_value(&body, "redis_exporter_last_scrape_error", &[]), Some(0.0), "{body}");
    let _ = scrape(web);
    assert_eq!(stat(&relay, "acl_access_denied_auth"), 0, "the exporter logged in");
    assert_eq!(stat(&relay, "acl_access_denied_cmd"), 0, "no command of the exporter's was refused");
}
