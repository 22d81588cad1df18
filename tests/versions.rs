//! Versions: RDB formats across Redis and Valkey. A Valkey 9 master's `VALKEY080` RDB is cached
//! and served as it is; `REPLCONF version` goes to the master when configured (and a master that
//! does not know it is no obstacle); the RDB version guard refuses a replica that announces a
//! version which cannot load the cached snapshot, and one caught in a full-sync loop.
//!
//! Only redis-server 7.0 is installable here, so the other versions are imitated where a test
//! needs them: a fake master serves an RDB with another version's header (a real 7.0 RDB, its
//! header rewritten and its CRC-64 recomputed), and a fake replica plays the replica that
//! announces a version or fails to load and asks again.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

const REPLID: &str = "5a1e4b7c9d0f2e3a4b5c6d7e8f9a0b1c2d3e4f50";
const OTHER_REPLID: &str = "6b2f5c8d0e1a3f4b5c6d7e8f9a0b1c2d3e4f5061";

/// A real RDB (redis-server 7.0, `REDIS0010`) with a few keys.
fn real_rdb() -> Vec<u8> {
    let server = RedisServer::start(&[]);
    let mut con = server.conn();
    for i in 0..40 {
        let _: () = redis::cmd("SET").arg(format!("key:{i}")).arg(value_of(i, 30)).query(&mut con).unwrap();
    }
    let _: () = redis::cmd("SAVE").query(&mut con).unwrap();
    std::fs::read(server.dir().join("dump.rdb")).expect("dump.rdb after SAVE")
}

/// `rdb` with the 9-byte header `header` (`VALKEY080`, `REDIS0012`) and a recomputed CRC-64: what a
/// master of that version would send for the same keys, as far as the relay's checks can tell.
fn with_header(rdb: &[u8], header: &[u8; 9]) -> Vec<u8> {
    let mut out = rdb.to_vec();
    out[..9].copy_from_slice(header);
    let body = out.len() - 8;
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_REDIS).checksum(&out[..body]);
    out[body..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What the fake master serves: its replid and RDB (changed by a test to start a new history).
struct Served {
    replid: String,
    rdb: Vec<u8>,
}

/// A master imitating another version: it answers the replica handshake (`REPLCONF version`
/// included, as Valkey 8+ does), `INFO server` as Valkey 9 answers it, and `PSYNC` with a full sync
/// of the RDB it holds, then keeps the link open without a stream. It records every command.
struct FakeMaster {
    port: u16,
    commands: Arc<Mutex<Vec<Vec<String>>>>,
    served: Arc<Mutex<Served>>,
    /// The replica links (not side fetches), so a test can cut them.
    links: Arc<Mutex<Vec<TcpStream>>>,
    _thread: JoinHandle<()>,
}

impl FakeMaster {
    fn start(rdb: Vec<u8>) -> FakeMaster {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake master");
        let port = listener.local_addr().expect("fake master address").port();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(Served { replid: REPLID.to_string(), rdb }));
        let links = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (commands, served, links) = (commands.clone(), served.clone(), links.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (commands, served, links) = (commands.clone(), served.clone(), links.clone());
                    std::thread::spawn(move || serve_connection(stream, &commands, &served, &links));
                }
            })
        };
        FakeMaster { port, commands, served, links, _thread: thread }
    }

    fn received(&self, wanted: &[&str]) -> bool {
        let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        commands.iter().any(|c| c.len() == wanted.len() && c.iter().zip(wanted).all(|(a, b)| a.eq_ignore_ascii_case(b)))
    }

    fn received_option(&self, option: &str) -> bool {
        let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        commands
            .iter()
            .any(|c| c[0].eq_ignore_ascii_case("REPLCONF") && c[1..].iter().any(|a| a.eq_ignore_ascii_case(option)))
    }

    /// Serves `rdb` under a new replid from now on, and cuts the relay's link so it syncs again.
    fn new_history(&self, replid: &str, rdb: Vec<u8>) {
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = Served { replid: replid.to_string(), rdb };
        for link in self.links.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = link.shutdown(Shutdown::Both);
        }
    }
}

fn serve_connection(
    stream: TcpStream,
    commands: &Mutex<Vec<Vec<String>>>,
    served: &Mutex<Served>,
    links: &Mutex<Vec<TcpStream>>,
) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut rdb_only = false;
    while let Some(command) = read_command(&mut reader) {
        commands.lock().unwrap_or_else(|e| e.into_inner()).push(command.clone());
        let name = command[0].to_ascii_uppercase();
        let option = command.get(1).map(|o| o.to_ascii_lowercase()).unwrap_or_default();
        let reply = match (name.as_str(), option.as_str()) {
            ("PING", _) => b"+PONG\r\n".to_vec(),
            ("AUTH", _) => b"+OK\r\n".to_vec(),
            ("REPLCONF", "ack" | "getack") => continue,
            ("REPLCONF", "rdb-only") => {
                rdb_only = command.get(2).is_some_and(|v| v == "1");
                b"+OK\r\n".to_vec()
            }
            ("REPLCONF", _) => b"+OK\r\n".to_vec(),
            ("INFO", _) => {
                let info = "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:9.0.0\r\n";
                format!("${}\r\n{info}\r\n", info.len()).into_bytes()
            }
            ("PSYNC", _) => {
                let (replid, rdb) = {
                    let served = served.lock().unwrap_or_else(|e| e.into_inner());
                    (served.replid.clone(), served.rdb.clone())
                };
                let mut reply = format!("+FULLRESYNC {replid} 0\r\n${}\r\n", rdb.len()).into_bytes();
                reply.extend_from_slice(&rdb);
                if !rdb_only {
                    if let Ok(link) = writer.try_clone() {
                        links.lock().unwrap_or_else(|e| e.into_inner()).push(link);
                    }
                }
                reply
            }
            _ => b"-ERR unknown command\r\n".to_vec(),
        };
        if writer.write_all(&reply).is_err() {
            return;
        }
    }
}

/// How a fake replica's `PSYNC ? -1` ended.
#[derive(Debug)]
enum SyncResult {
    /// `+FULLRESYNC` and the whole payload.
    Full { payload: Vec<u8>, offset: u64 },
    /// An error reply, as received.
    Refused(String),
}

/// A replica imitating another version (or a replica that fails to load what it is sent): the
/// handshake with `listening-port`, an optional `REPLCONF version`, `capa psync2` (no `capa eof`:
/// `$<len>` payloads), then `PSYNC ? -1`.
struct FakeReplica {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl FakeReplica {
    fn connect(relay_port: u16, listening_port: u16, version: Option<&str>) -> FakeReplica {
        let stream = TcpStream::connect(("127.0.0.1", relay_port)).expect("connect to the relay");
        stream.set_read_timeout(Some(SYNC_TIMEOUT)).expect("read timeout");
        let writer = stream.try_clone().expect("clone stream");
        let mut replica = FakeReplica { reader: BufReader::new(stream), writer };
        let mut handshake = vec![vec!["PING".to_string()]];
        handshake.push(vec!["REPLCONF".into(), "listening-port".into(), listening_port.to_string()]);
        if let Some(version) = version {
            handshake.push(vec!["REPLCONF".into(), "version".into(), version.into()]);
        }
        handshake.push(vec!["REPLCONF".into(), "capa".into(), "psync2".into()]);
        for command in &handshake {
            replica.send(command);
            let reply = replica.line();
            assert!(reply.starts_with('+'), "{command:?} answered {reply:?}");
        }
        replica
    }

    fn send(&mut self, args: &[String]) {
        let mut out = format!("*{}\r\n", args.len());
        for arg in args {
            out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.writer.write_all(out.as_bytes()).expect("write to the relay");
    }

    /// One reply line, skipping the empty keepalive lines a master sends while it prepares an RDB.
    fn line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read from the relay");
            assert!(n > 0, "the relay closed the connection");
            let line = line.trim_end().to_string();
            if !line.is_empty() {
                return line;
            }
        }
    }

    fn full_sync(&mut self) -> SyncResult {
        self.send(&["PSYNC".into(), "?".into(), "-1".into()]);
        let reply = self.line();
        if reply.starts_with('-') {
            return SyncResult::Refused(reply);
        }
        let offset = reply
            .strip_prefix("+FULLRESYNC ")
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|o| o.parse().ok())
            .unwrap_or_else(|| panic!("PSYNC answered {reply:?}"));
        let header = self.line();
        let len: usize = header.strip_prefix('$').and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("{header:?}"));
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload).expect("read the RDB payload");
        SyncResult::Full { payload, offset }
    }
}

fn wait_snapshot_version(relay: &Relay, version: &str) {
    wait_for(SYNC_TIMEOUT, &format!("a cached snapshot of RDB version {version}"), || {
        match relay.info_field("relay", "snapshot_rdb_version") {
            Some(v) if v == version => Ok(()),
            other => Err(format!("snapshot_rdb_version {other:?}")),
        }
    });
}

#[test]
fn a_valkey_9_rdb_is_cached_and_served_byte_exactly() {
    let rdb = with_header(&real_rdb(), b"VALKEY080");
    let master = FakeMaster::start(rdb.clone());
    let relay = Relay::builder(master.port).args(["--upstream-announce-version", "9.0.0"]).start();
    wait_snapshot_version(&relay, "80");
    assert!(master.received(&["REPLCONF", "version", "9.0.0"]), "REPLCONF version reaches the master");
    assert_eq!(std::fs::read(relay.snapshot_path()).expect("cached snapshot"), rdb, "cached as received");
    assert_eq!(relay.info_field("relay", "snapshot_keys").as_deref(), Some("40"));
    wait_for(SYNC_TIMEOUT, "the master's Valkey version in INFO server", || {
        match relay.info_field("server", "valkey_version").as_deref() {
            Some("9.0.0") => Ok(()),
            other => Err(format!("valkey_version {other:?}")),
        }
    });

    // A Valkey 9 replica gets the RDB 80 snapshot as the master wrote it.
    let mut replica = FakeReplica::connect(relay.port(), free_port(), Some("9.0.0"));
    match replica.full_sync() {
        SyncResult::Full { payload, offset } => {
            assert_eq!(offset, 0);
            assert!(payload == rdb, "served byte-exactly ({} bytes, expected {})", payload.len(), rdb.len());
        }
        refused => panic!("a Valkey 9 replica is served RDB 80: {refused:?}"),
    }
}

/// redis-server 7.0 answers `REPLCONF version` with `-ERR Unrecognized REPLCONF option`; the relay
/// goes on with the handshake, as Valkey's replica does.
#[test]
fn announce_version_is_tolerated_by_a_master_that_does_not_know_it() {
    let master = RedisServer::builder().start();
    let mut con = master.conn();
    for i in 0..20 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut con).unwrap();
    }
    let relay = Relay::builder(master.port()).args(["--upstream-announce-version", "8.0.0"]).start();
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    assert_eq!(replica.digest(), master.digest());
    assert_eq!(relay.info_field("relay", "upstream_last_error").as_deref(), Some(""));
}

fn info_number(relay: &Relay, section: &str, field: &str) -> i64 {
    relay
        .info_field(section, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} {field} is not a number"))
}

/// No replica connected: the relay has seen the last one go (so the guard knows how it ended).
fn wait_no_replicas(relay: &Relay) {
    wait_for(SYNC_TIMEOUT, "the relay to see the replica go", || {
        match info_number(relay, "replication", "connected_slaves") {
            0 => Ok(()),
            n => Err(format!("connected_slaves {n}")),
        }
    });
}

#[test]
fn a_replica_announcing_a_version_that_cannot_load_the_snapshot_is_refused_at_once() {
    let rdb = with_header(&real_rdb(), b"REDIS0012");
    let master = FakeMaster::start(rdb.clone());
    let relay = Relay::builder(master.port).start();
    wait_snapshot_version(&relay, "12");
    assert!(!master.received_option("version"), "no REPLCONF version unless configured");

    for (version, refusals) in [("7.2.0", 1), ("8.1.1", 2), ("9.0.0", 3)] {
        let mut replica = FakeReplica::connect(relay.port(), free_port(), Some(version));
        match replica.full_sync() {
            SyncResult::Refused(error) => {
                assert!(error.starts_with("-ERR "), "{error}");
                assert!(error.contains("RDB version 12") && error.contains(version), "names both versions: {error}");
            }
            served => panic!("a replica of version {version} is refused RDB 12: {served:?}"),
        }
        assert_eq!(info_number(&relay, "relay", "sync_refused_rdb_version"), refusals);
    }
    assert_eq!(info_number(&relay, "stats", "sync_full"), 0, "no transfer was spent on them");

    // What they could load is served: a replica announcing nothing, and a Valkey 9 replica once
    // the snapshot is Valkey's own RDB 80.
    let mut replica = FakeReplica::connect(relay.port(), free_port(), None);
    assert!(matches!(replica.full_sync(), SyncResult::Full { payload, .. } if payload == rdb));
    drop(replica);
    let valkey = with_header(&real_rdb(), b"VALKEY080");
    master.new_history(OTHER_REPLID, valkey.clone());
    wait_snapshot_version(&relay, "80");
    let mut replica = FakeReplica::connect(relay.port(), free_port(), Some("9.0.0"));
    assert!(matches!(replica.full_sync(), SyncResult::Full { payload, .. } if payload == valkey));
    assert_eq!(info_number(&relay, "relay", "sync_refused_rdb_version"), 3);
}

/// A replica that announces nothing and cannot load the snapshot: it takes the whole payload, drops
/// the link without an ACK and asks again at once, as redis-server does after "Can't handle RDB
/// format version". Two transfers, then refusals for the backoff, then one transfer, then a longer
/// backoff; a new snapshot format is served at once.
#[test]
fn a_replica_in_a_full_sync_loop_gets_two_transfers_then_a_backoff() {
    let rdb = with_header(&real_rdb(), b"REDIS0012");
    let master = FakeMaster::start(rdb.clone());
    let relay = Relay::builder(master.port)
        .args(["--replica-resync-backoff", "3s", "--replica-resync-backoff-max", "12s"])
        .start();
    wait_snapshot_version(&relay, "12");
    let port = free_port();
    let attempt = || {
        let mut replica = FakeReplica::connect(relay.port(), port, None);
        let result = replica.full_sync();
        drop(replica);
        wait_no_replicas(&relay);
        result
    };
    for transfer in 1..=2 {
        match attempt() {
            SyncResult::Full { payload, .. } => assert!(payload == rdb, "transfer {transfer} is the snapshot"),
            refused => panic!("transfer {transfer} is served: {refused:?}"),
        }
    }
    match attempt() {
        SyncResult::Refused(error) => {
            assert!(error.starts_with("-ERR ") && error.contains("RDB version 12"), "{error}");
        }
        served => panic!("the third full sync within seconds is refused: {served:?}"),
    }
    assert_eq!(info_number(&relay, "stats", "sync_full"), 2);
    assert_eq!(info_number(&relay, "relay", "sync_refused_resync_loop"), 1);
    assert_eq!(info_number(&relay, "relay", "replicas_in_resync_backoff"), 1);

    // After the 3 s backoff it is served once more; failing again, it is refused for 6 s.
    wait_for(Duration::from_secs(15), "a transfer after the backoff", || match attempt() {
        SyncResult::Full { .. } => Ok(()),
        SyncResult::Refused(error) => Err(error),
    });
    assert_eq!(info_number(&relay, "stats", "sync_full"), 3);
    assert!(matches!(attempt(), SyncResult::Refused(_)), "refused again right after");

    // A snapshot in another RDB version may load: served at once, backoff or not.
    let rdb11 = with_header(&real_rdb(), b"REDIS0011");
    master.new_history(OTHER_REPLID, rdb11.clone());
    wait_snapshot_version(&relay, "11");
    match attempt() {
        SyncResult::Full { payload, .. } => assert!(payload == rdb11, "the new snapshot"),
        refused => panic!("a new snapshot version is served at once: {refused:?}"),
    }
    assert_eq!(info_number(&relay, "relay", "replicas_in_resync_backoff"), 0);
}

/// The loop with a real replica: redis-server 7.0 cannot load RDB 12 ("Can't handle RDB format
/// version 12"), drops the link and asks again about a second later. It gets two transfers; then
/// every attempt is refused without a transfer.
#[test]
fn a_real_redis_7_0_replica_that_cannot_load_rdb_12_costs_two_transfers() {
    let rdb = with_header(&real_rdb(), b"REDIS0012");
    let master = FakeMaster::start(rdb);
    let relay = Relay::builder(master.port).start();
    wait_snapshot_version(&relay, "12");
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_for(SYNC_TIMEOUT, "three refused attempts", || {
        match info_number(&relay, "relay", "sync_refused_resync_loop") {
            n if n >= 3 => Ok(()),
            n => Err(format!("sync_refused_resync_loop {n}; replica log:\n{}", replica.log())),
        }
    });
    assert_eq!(info_number(&relay, "stats", "sync_full"), 2, "two transfers, no more");
    assert_eq!(info_number(&relay, "relay", "replicas_in_resync_backoff"), 1);
    assert_eq!(replica.info_field("replication", "master_link_status").as_deref(), Some("down"));
}

/// No false positive: a real redis-server 7.0 replica that loads its RDB (and ACKs) and then asks
/// for a full sync again within seconds, several times, is served every time.
#[test]
fn a_real_replica_that_resyncs_after_loading_is_no_loop() {
    let master = RedisServer::builder().start();
    let mut con = master.conn();
    for i in 0..20 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut con).unwrap();
    }
    let relay = Relay::start(&master);
    let replica = RedisServer::builder().replica_of(relay.port()).start();
    wait_in_sync(&master, &replica, SYNC_TIMEOUT);
    for round in 1..=3 {
        // REPLICAOF NO ONE gives the replica a new replid: its next PSYNC cannot continue.
        let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut replica.conn()).unwrap();
        let _: () = redis::cmd("SET").arg("during").arg(round).query(&mut con).unwrap();
        let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(relay.port()).query(&mut replica.conn()).unwrap();
        eprintln!("round {round}: the replica resyncs through the relay");
        wait_in_sync(&master, &replica, SYNC_TIMEOUT);
        assert_eq!(replica.digest(), master.digest(), "round {round}");
    }
    assert_eq!(info_number(&relay, "stats", "sync_full"), 4, "every full sync served");
    assert_eq!(info_number(&relay, "relay", "sync_refused_resync_loop"), 0);
    assert_eq!(info_number(&relay, "relay", "sync_refused_rdb_version"), 0);
}
