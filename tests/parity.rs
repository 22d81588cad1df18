//! The relay as a Redis node to tools: `INFO` sections and field names as redis-server has them
//! (what `redis-cli --stat` and exporters read), `redis_version` from the master, and the node
//! commands (`HELLO`, `COMMAND`, `CONFIG`, `CLIENT`, `SELECT`, `DBSIZE`, `TIME`, `LASTSAVE`),
//! checked with real redis-server, redis-cli and the `redis` client.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{parse_info_field, wait_for, wait_in_sync, RedisServer, Relay, SYNC_TIMEOUT};

/// A child process killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// The section headers of an INFO payload, in order, lower-cased.
fn sections(info: &str) -> Vec<String> {
    info.lines().filter_map(|l| l.strip_prefix("# ")).map(|s| s.trim().to_ascii_lowercase()).collect()
}

const DEFAULT_ORDER: [&str; 11] = [
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "modules",
    "cluster",
    "keyspace",
    "relay",
];

#[test]
fn info_has_redis_sections_and_redis_cli_stat_prints_numbers() {
    let master = RedisServer::builder().diskless_sync(true).start();
    let relay = Relay::start(&master);
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);

    for variant in ["", "all", "everything", "default", "ALL"] {
        let mut command = redis::cmd("INFO");
        if !variant.is_empty() {
            command.arg(variant);
        }
        let info: String = relay.query(&command);
        assert_eq!(sections(&info), DEFAULT_ORDER, "INFO {variant}");
        for line in info.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, _) = line.split_once(':').unwrap_or_else(|| panic!("INFO {variant}: not key:value: {line:?}"));
            assert!(!key.is_empty() && !key.contains(' '), "INFO {variant}: bad key in {line:?}");
        }
    }
    // Several sections come in redis-server's order, whatever the order asked; unknown ones add nothing.
    let two: String = relay.query(redis::cmd("INFO").arg("cpu").arg("CLIENTS").arg("nosuch"));
    assert_eq!(sections(&two), ["clients", "cpu"]);
    let keyspace = relay.info("keyspace");
    assert_eq!(keyspace.trim(), "# Keyspace", "the relay holds no keys");

    let info = relay.info("all");
    let number = |name: &str| -> f64 {
        parse_info_field(&info, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing or not a number in INFO all:\n{info}"))
    };
    assert!(number("used_memory") > 1e6, "used_memory is the relay's RSS");
    assert!(number("used_memory_peak") >= number("used_memory_rss"));
    assert_eq!(number("maxmemory"), 0.0);
    assert_eq!(number("blocked_clients"), 0.0);
    assert_eq!(number("loading"), 0.0);
    assert_eq!(number("aof_enabled"), 0.0);
    // CPU times come in clock ticks (10 ms): keep the relay busy until it has used one.
    let mut busy = relay.conn();
    wait_for(SYNC_TIMEOUT, "used_cpu_user + used_cpu_sys to grow above 0", || {
        let mut info = String::new();
        for _ in 0..200 {
            info = redis::cmd("INFO").arg("everything").query(&mut busy).map_err(|e| e.to_string())?;
        }
        let cpu = |name: &str| parse_info_field(&info, name).and_then(|v| v.parse::<f64>().ok());
        match (cpu("used_cpu_user"), cpu("used_cpu_sys")) {
            (Some(user), Some(sys)) if user + sys > 0.0 => Ok(()),
            other => Err(format!("used_cpu_user, used_cpu_sys: {other:?}")),
        }
    });
    drop(busy);
    assert_eq!(number("connected_slaves"), 1.0);
    // The replica's connection is not a client (redis-server counts connected_clients without
    // replicas); the harness's earlier connections go once the relay has seen them close.
    let mut con = relay.conn();
    wait_for(SYNC_TIMEOUT, "connected_clients to count this test's one connection", || {
        let clients: String = redis::cmd("INFO").arg("clients").query(&mut con).map_err(|e| e.to_string())?;
        match parse_info_field(&clients, "connected_clients").as_deref() {
            Some("1") => Ok(()),
            other => Err(format!("connected_clients {other:?}")),
        }
    });

    // redis_version is the master's; the relay's own is relay_version.
    let master_version = master.info_field("server", "redis_version").expect("master redis_version");
    wait_for(SYNC_TIMEOUT, "the relay to report the master's redis_version", || {
        match relay.info_field("server", "redis_version") {
            Some(v) if v == master_version => Ok(()),
            other => Err(format!("relay says {other:?}, master {master_version}")),
        }
    });
    assert_eq!(relay.info_field("server", "relay_version").as_deref(), Some(env!("CARGO_PKG_VERSION")));

    // redis-cli --stat reads keys, used_memory, connected_clients, blocked_clients,
    // total_commands_processed and total_connections_received from INFO.
    let child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &relay.port().to_string(), "--stat", "-i", "0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-cli --stat");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("redis-cli stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rows = Vec::new();
    while rows.len() < 2 {
        let line = lines.recv_timeout(Duration::from_secs(10)).expect("a line from redis-cli --stat");
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            rows.push(line);
        }
    }
    drop(child);
    for row in rows {
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert!(columns.len() >= 6, "redis-cli --stat row {row:?}");
        assert_eq!(columns[0], "0", "keys in {row:?}");
        let memory = columns[1];
        assert!(
            memory.starts_with(|c: char| c.is_ascii_digit()) && memory.ends_with(['B', 'K', 'M', 'G']),
            "memory column {memory:?} in {row:?}"
        );
        for column in [columns[2], columns[3], columns[4]] {
            assert!(column.parse::<u64>().is_ok(), "column {column:?} in {row:?}");
        }
    }
}

#[test]
fn node_commands_answer_like_redis() {
    let master = RedisServer::builder().diskless_sync(true).start();
    let relay = Relay::start(&master);
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    let mut con = relay.conn();

    // COMMAND COUNT matches COMMAND; COMMAND INFO of an unknown name is nil.
    let all: Vec<redis::Value> = redis::cmd("COMMAND").query(&mut con).expect("COMMAND");
    let count: usize = redis::cmd("COMMAND").arg("COUNT").query(&mut con).expect("COMMAND COUNT");
    assert!(count > 10);
    assert_eq!(all.len(), count);
    let info: Vec<redis::Value> =
        redis::cmd("COMMAND").arg("INFO").arg("info").arg("nosuch").query(&mut con).expect("COMMAND INFO");
    assert!(matches!(&info[0], redis::Value::Array(entry) if entry.len() == 10));
    assert_eq!(info[1], redis::Value::Nil);
    let docs: Vec<redis::Value> = redis::cmd("COMMAND").arg("DOCS").query(&mut con).expect("COMMAND DOCS");
    assert_eq!(docs.len(), 2 * count, "a name and its docs per command");

    // CONFIG GET with globs, with the relay's real values.
    let config: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("*").query(&mut con).expect("CONFIG GET *");
    let value = |name: &str| {
        config.chunks(2).find(|pair| pair[0] == name).map(|pair| pair[1].clone()).unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(value("databases"), "16");
    assert_eq!(value("appendonly"), "no");
    assert_eq!(value("save"), "");
    assert_eq!(value("port"), relay.port().to_string());
    assert_eq!(Some(value("repl-backlog-size")), relay.info_field("replication", "repl_backlog_size"));
    assert_eq!(Some(value("maxclients")), relay.info_field("clients", "maxclients"));
    assert_eq!(value("timeout"), "0", "idle clients are kept by default, as in redis.conf");
    let repl: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("REPL-*").arg("port").query(&mut con).expect("CONFIG GET REPL-*");
    let names: Vec<&String> = repl.iter().step_by(2).collect();
    assert!(names.iter().all(|n| n.starts_with("repl-") || *n == "port"), "{names:?}");
    assert!(names.iter().any(|n| *n == "repl-timeout"));
    let set = redis::cmd("CONFIG").arg("SET").arg("repl-timeout").arg("5").exec(&mut con);
    assert!(set.is_err_and(|e| e.to_string().contains("immutable")), "CONFIG SET is refused");

    // SELECT range-checked; DBSIZE 0; TIME; LASTSAVE is the snapshot's time.
    let select = redis::cmd("SELECT").arg(99).exec(&mut con);
    assert!(select.is_err_and(|e| e.to_string().contains("DB index is out of range")));
    redis::cmd("SELECT").arg(15).exec(&mut con).expect("SELECT 15");
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut con).expect("DBSIZE"), 0);
    let time: Vec<u64> = redis::cmd("TIME").query(&mut con).expect("TIME");
    assert!(time[0] > 1_600_000_000 && time[1] < 1_000_000);
    let lastsave: i64 = redis::cmd("LASTSAVE").query(&mut con).expect("LASTSAVE");
    assert_eq!(Some(lastsave.to_string()), relay.info_field("persistence", "rdb_last_save_time"));

    // CLIENT: unique ids, names, the replica listed with flags=S.
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut con).expect("CLIENT ID");
    let other: i64 = redis::cmd("CLIENT").arg("ID").query(&mut relay.conn()).expect("CLIENT ID");
    assert!(id > 0 && other > 0 && id != other);
    redis::cmd("CLIENT").arg("SETNAME").arg("parity").exec(&mut con).expect("CLIENT SETNAME");
    let name: String = redis::cmd("CLIENT").arg("GETNAME").query(&mut con).expect("CLIENT GETNAME");
    assert_eq!(name, "parity");
    assert!(redis::cmd("CLIENT").arg("SETNAME").arg("two words").exec(&mut con).is_err());
    let me: String = redis::cmd("CLIENT").arg("INFO").query(&mut con).expect("CLIENT INFO");
    assert!(me.starts_with(&format!("id={id} addr=127.0.0.1:")), "{me}");
    for field in [" name=parity ", " flags=N ", " db=15 ", " cmd=client|info ", " resp=2"] {
        assert!(me.contains(field), "{field} in {me}");
    }
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).expect("CLIENT LIST");
    let replicas: Vec<&str> = list.lines().filter(|l| l.contains(" flags=S ")).collect();
    assert_eq!(replicas.len(), 1, "{list}");
    let typed: String =
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("replica").query(&mut con).expect("CLIENT LIST TYPE");
    assert_eq!(typed.lines().collect::<Vec<_>>(), replicas);

    // HELLO 3 from redis-cli -3: a RESP3 map with the master's version; HELLO 4 is refused.
    let hello = redis_cli(relay.port(), &["-3", "HELLO", "3"]);
    let master_version = master.info_field("server", "redis_version").expect("master version");
    // redis-cli prints a map's key and value on one line when its output is not a terminal.
    for expected in ["server redis\n", "proto 3\n", "role replica\n", "mode standalone\n"] {
        assert!(hello.contains(expected), "{expected} in HELLO 3 reply: {hello}");
    }
    wait_for(SYNC_TIMEOUT, "HELLO to give the master's version", || {
        let hello = redis_cli(relay.port(), &["-3", "HELLO", "3"]);
        if hello.contains(&master_version) {
            Ok(())
        } else {
            Err(hello)
        }
    });
    assert!(redis_cli(relay.port(), &["HELLO", "4"]).contains("NOPROTO"));
}

#[test]
fn hello_authenticates_with_requirepass() {
    let master = RedisServer::builder().diskless_sync(true).start();
    let relay = Relay::builder(master.port()).requirepass("sesame").start();
    let refused = redis_cli(relay.port(), &["-3", "HELLO", "3"]);
    assert!(refused.contains("NOAUTH"), "{refused}");
    let wrong = redis_cli(relay.port(), &["HELLO", "3", "AUTH", "default", "nope"]);
    assert!(wrong.contains("WRONGPASS"), "{wrong}");
    let ok = redis_cli(relay.port(), &["-3", "HELLO", "3", "AUTH", "default", "sesame", "SETNAME", "tool"]);
    assert!(ok.contains("proto 3\n"), "{ok}");
}

#[test]
fn client_reply_off_and_skip_drop_replies() {
    use std::io::{Read, Write};
    let master = RedisServer::builder().diskless_sync(true).start();
    let relay = Relay::start(&master);
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", relay.port())).expect("connect to the relay");
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    // SKIP: no reply to itself nor to the next command; OFF: none until ON, which answers +OK.
    socket
        .write_all(
            b"CLIENT REPLY SKIP\r\nPING a\r\nPING b\r\nCLIENT REPLY OFF\r\nPING c\r\nCLIENT REPLY ON\r\nPING d\r\n",
        )
        .expect("write");
    let expected = b"$1\r\nb\r\n+OK\r\n$1\r\nd\r\n";
    let mut got = vec![0u8; expected.len()];
    socket.read_exact(&mut got).expect("the replies");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
    // Nothing more: the next reply is PING's own.
    socket.write_all(b"PING e\r\n").expect("write");
    let mut next = [0u8; 7];
    socket.read_exact(&mut next).expect("PING e");
    assert_eq!(&next, b"$1\r\ne\r\n");
}

/// Numbers in `PSYNC`, `REPLCONF`, `SELECT` and `HELLO` are read as redis-server reads them
/// (`string2ll`: no `+`, no leading zeros, no `-0`, no spaces, within 64 bits), with its replies:
/// each input goes to a real redis-server and to the relay, and the replies must be the same. A
/// refused `PSYNC` leaves the connection an ordinary client, as on redis-server.
#[test]
fn numeric_arguments_are_refused_exactly_as_redis_server_refuses_them() {
    let master = RedisServer::builder().start();
    let relay = Relay::start(&master);
    wait_for(SYNC_TIMEOUT, "the relay's master link", || {
        match relay.info_field("replication", "master_link_status").as_deref() {
            Some("up") => Ok(()),
            other => Err(format!("master_link_status {other:?}")),
        }
    });
    let cases: &[&[&str]] = &[
        &["PSYNC", "?", "+100"],
        &["PSYNC", "?", "0100"],
        &["PSYNC", "?", "-0"],
        &["PSYNC", "?", " 1"],
        &["PSYNC", "?", "1 "],
        &["PSYNC", "?", ""],
        &["PSYNC", "?", "9223372036854775808"],
        &["PSYNC", "?", "-9223372036854775809"],
        &["PSYNC", "?", "1e3"],
        &["REPLCONF", "listening-port", "+6380"],
        &["REPLCONF", "listening-port", "06380"],
        &["REPLCONF", "listening-port", "-0"],
        &["REPLCONF", "listening-port", "99999999999999999999"],
        &["REPLCONF", "listening-port", "6380"],
        &["REPLCONF", "listening-port", "70000"],
        &["REPLCONF", "rdb-only", "2"],
        &["REPLCONF", "rdb-only", "-1"],
        &["REPLCONF", "rdb-only", "+1"],
        &["REPLCONF", "rdb-only", "0"],
        &["SELECT", "+1"],
        &["SELECT", "01"],
        &["SELECT", "-0"],
        &["SELECT", "16"],
        &["SELECT", "-1"],
        &["SELECT", "4294967296"],
        &["SELECT", "1"],
        &["HELLO", "+3"],
        &["HELLO", "03"],
        &["HELLO", "4"],
    ];
    let mut on_redis = master.conn();
    let mut on_relay = relay.conn();
    for args in cases {
        let reply = |conn: &mut redis::Connection| -> String {
            let mut cmd = redis::cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
            match cmd.query::<redis::Value>(conn) {
                Ok(value) => format!("{value:?}"),
                Err(error) => format!("{:?} {}", error.code(), error.detail().unwrap_or_default()),
            }
        };
        let expected = reply(&mut on_redis);
        let got = reply(&mut on_relay);
        assert_eq!(got, expected, "{args:?}");
    }
    // Both connections are still ordinary clients after the refused PSYNCs.
    let pong: String = redis::cmd("PING").query(&mut on_relay).expect("PING after refused PSYNCs");
    assert_eq!(pong, "PONG");
    let port: String = relay.info_field("replication", "connected_slaves").unwrap_or_default();
    assert_eq!(port, "0", "a refused PSYNC registers no replica");
}

/// The exporter binary of Debian's `prometheus-redis-exporter` (oliver006/redis_exporter).
const REDIS_EXPORTER: &str = "prometheus-redis-exporter";

/// One `GET /metrics` from an exporter's HTTP port; the body, or an error while it is not up yet.
fn scrape(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).ok_or_else(|| "no body".to_string())
}

/// The value of the first sample of `metric` whose labels contain every one of `labels`.
fn sample(body: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (name_labels, value) = line.rsplit_once(' ')?;
        let name = name_labels.split('{').next()?;
        (name == metric && labels.iter().all(|l| name_labels.contains(l))).then(|| value.parse().ok())?
    })
}

/// The real redis_exporter (it sends `INFO ALL`, `CONFIG GET *`, `LATENCY`, `SLOWLOG`, ... and turns
/// the answers into metrics) sees the relay as a consistent Redis replica: up, no scrape error, the
/// master's version, the link up to the master with the master's offset, one replica below, the
/// relay's real `maxclients`; and every command it sent was answered without an error reply the
/// exporter would log (it counts none in `redis_exporter_last_scrape_error`).
#[test]
fn redis_exporter_reads_the_relay_as_a_replica_node() {
    let master = RedisServer::builder().diskless_sync(true).start();
    let relay = Relay::builder(master.port()).arg("--maxclients").arg("1234").start();
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    let _: () = master.query(redis::cmd("SET").arg("k").arg("v"));
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);

    let web = common::free_port();
    let mut exporter = Command::new(REDIS_EXPORTER);
    exporter
        .arg(format!("--redis.addr=redis://127.0.0.1:{}", relay.port()))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut exporter = KillOnDrop(
        exporter.spawn().expect("start prometheus-redis-exporter (apt-get install prometheus-redis-exporter)"),
    );
    let stderr = exporter.0.stderr.take().expect("exporter stderr");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let master_offset = common::offset_of(&master);
    let body = wait_for(SYNC_TIMEOUT, "the exporter scraping the relay with the link up", || {
        let body = scrape(web)?;
        let link = sample(&body, "redis_master_link_up", &[]);
        let offset = sample(&body, "redis_slave_repl_offset", &[]);
        if link == Some(1.0) && offset == Some(master_offset as f64) {
            Ok(body)
        } else {
            Err(format!("link {link:?}, offset {offset:?} (master at {master_offset})"))
        }
    });
    let version = master.info_field("server", "redis_version").expect("master redis_version");
    assert_eq!(sample(&body, "redis_up", &[]), Some(1.0), "{body}");
    assert_eq!(sample(&body, "redis_exporter_last_scrape_error", &[]), Some(0.0), "{body}");
    assert_eq!(
        sample(&body, "redis_instance_info", &["role=\"slave\"", &format!("redis_version=\"{version}\"")]),
        Some(1.0),
        "{body}"
    );
    let master_port = format!("master_port=\"{}\"", master.port());
    assert_eq!(sample(&body, "redis_master_link_up", &[&master_port]), Some(1.0), "{body}");
    assert_eq!(sample(&body, "redis_connected_slaves", &[]), Some(1.0), "{body}");
    assert_eq!(sample(&body, "redis_config_maxclients", &[]), Some(1234.0), "{body}");
    assert!(sample(&body, "redis_memory_used_rss_bytes", &[]).is_some_and(|rss| rss > 0.0), "{body}");
    assert!(sample(&body, "redis_uptime_in_seconds", &[]).is_some(), "{body}");

    // A second scrape after the first: the exporter logs a failed command at error level once.
    let _ = scrape(web).expect("second scrape");
    let errors: Vec<String> = lines_rx.try_iter().filter(|l| l.contains("level=error")).collect();
    assert!(errors.is_empty(), "commands the exporter sent and the relay refused: {errors:?}");
}
