//! Versions: RDB formats across Redis and Valkey. A Valkey 9 master's `VALKEY080` RDB is cached
//! and served as it is; `REPLCONF version` goes to the master when configured (and a master that
//! does not know it is no obstacle); the RDB version guard refuses a replica that announces a
//! version which cannot load the cached snapshot, and one caught in a full-sync loop.
//!
//! Only redis-server 7.0 is installable here, so the other versions are imitated where a test
//! needs them: a fake master serves an RDB with another version's header (a real 7.0 RDB, its
//! header rewritten and its CRC-64 recomputed), and a fake replica plays the replica that
//! announces a version or fails to load and asks again.

// The RDB version guard's tests (next) use the rest of the fakes.
#![allow(dead_code, unused_imports)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Reads one RESP multibulk command; `None` when the peer is gone.
fn read_command(reader: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let count: usize = line.trim_end().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::new();
    for _ in 0..count {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
        let mut arg = vec![0u8; len + 2];
        reader.read_exact(&mut arg).ok()?;
        arg.truncate(len);
        args.push(String::from_utf8_lossy(&arg).into_owned());
    }
    Some(args)
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

    fn ack(&mut self, offset: u64) {
        self.send(&["REPLCONF".into(), "ACK".into(), offset.to_string()]);
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
