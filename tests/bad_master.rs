//! A misbehaving master: the relay reports each fault with its reason (INFO relay
//! `upstream_last_error`), caches nothing from a bad payload, and recovers by syncing again.
//!
//! The fake master plays a scripted fault on its first connection and an honest full sync on the
//! next one, with a real RDB taken from a real redis-server.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use common::*;

const REPLID: &str = "0123456789abcdef0123456789abcdef01234567";
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// A real RDB with a few keys, as a master would send it.
fn real_rdb() -> Vec<u8> {
    let server = RedisServer::start(&[]);
    let mut con = server.conn();
    for i in 0..50 {
        let _: () = redis::cmd("SET").arg(format!("key:{i}")).arg(value_of(i, 40)).query(&mut con).unwrap();
    }
    let _: () = redis::cmd("SAVE").query(&mut con).unwrap();
    std::fs::read(server.dir().join("dump.rdb")).expect("dump.rdb after SAVE")
}

/// Answers the replica handshake up to and including PSYNC; returns the PSYNC arguments.
fn handshake(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> Option<Vec<String>> {
    loop {
        let command = read_command(reader)?;
        match command.first().map(|c| c.to_ascii_uppercase()).as_deref() {
            Some("PING") => writer.write_all(b"+PONG\r\n").ok()?,
            Some("REPLCONF") if command.get(1).is_some_and(|o| o.eq_ignore_ascii_case("ack")) => {}
            Some("REPLCONF") | Some("AUTH") => writer.write_all(b"+OK\r\n").ok()?,
            Some("PSYNC") => return Some(command),
            _ => writer.write_all(b"-ERR unexpected\r\n").ok()?,
        }
    }
}

/// What the first connection sends after the handshake; the connection is then closed, except
/// after a fault that sends nothing: that connection stays open and silent until the relay
/// connects again.
type Fault = Box<dyn Fn(&[u8]) -> Vec<u8> + Send>;

struct FakeMaster {
    port: u16,
    /// For each connection: the PSYNC arguments, and whether a snapshot was already cached then.
    connections: mpsc::Receiver<(Vec<String>, bool)>,
    _thread: JoinHandle<()>,
}

impl FakeMaster {
    fn start(fault: Fault, rdb: Vec<u8>, snapshot: PathBuf) -> FakeMaster {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake master");
        let port = listener.local_addr().unwrap().port();
        let (tx, connections) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut silent = None;
            for (index, stream) in listener.incoming().enumerate() {
                // The relay gave up on the silent connection: it can close now.
                drop(silent.take());
                let Ok(stream) = stream else { return };
                let mut writer = stream.try_clone().expect("clone stream");
                let mut reader = BufReader::new(stream);
                let Some(psync) = handshake(&mut reader, &mut writer) else { continue };
                if tx.send((psync.clone(), snapshot.exists())).is_err() {
                    return;
                }
                if index == 0 {
                    let bytes = fault(&rdb);
                    if bytes.is_empty() {
                        silent = Some((reader, writer));
                    } else {
                        let _ = writer.write_all(&bytes);
                    }
                    continue; // dropped: closed
                }
                // An honest full sync, then one command, then keep the link open.
                let mut reply = format!("+FULLRESYNC {REPLID} 0\r\n${}\r\n", rdb.len()).into_bytes();
                reply.extend_from_slice(&rdb);
                reply.extend_from_slice(PING);
                if writer.write_all(&reply).is_err() {
                    continue;
                }
                // Hold the connection until the relay goes away.
                let mut sink = Vec::new();
                let _ = reader.read_to_end(&mut sink);
                return;
            }
        });
        FakeMaster { port, connections, _thread: thread }
    }

    fn next_connection(&self) -> (Vec<String>, bool) {
        self.connections.recv_timeout(SYNC_TIMEOUT).expect("the relay connects to the fake master")
    }
}

fn full_resync_with(payload: &[u8], rdb_len: usize) -> Vec<u8> {
    let mut out = format!("+FULLRESYNC {REPLID} 0\r\n${rdb_len}\r\n").into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Plays `fault` on the first connection, then checks the relay reported `reason`, cached nothing
/// from the fault (unless `cached_before_retry`), and recovered with an honest sync.
fn check_fault(fault: Fault, reason: &str, cached_before_retry: bool) {
    let rdb = real_rdb();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("relay");
    let master = FakeMaster::start(fault, rdb.clone(), dir.join("snapshot.rdb"));
    let relay = Relay::builder(master.port).dir(&dir).arg("--repl-timeout").arg("3s").start();
    let (first_psync, _) = master.next_connection();
    assert_eq!(first_psync, vec!["PSYNC", "?", "-1"]);
    let (_, cached) = master.next_connection();
    assert_eq!(cached, cached_before_retry, "snapshot cached after the fault: {cached}");
    // The last link error stays in INFO until the next one; the honest sync below makes none.
    let last_error = relay.info_field("relay", "upstream_last_error").unwrap_or_default();
    assert!(last_error.contains(reason), "upstream_last_error {last_error:?} does not say {reason:?}");
    wait_until(SYNC_TIMEOUT, "the relay recovers with the honest sync", || {
        relay.info_field("replication", "master_repl_offset").as_deref() == Some("14")
            && relay.info_field("replication", "master_link_status").as_deref() == Some("up")
    });
    assert_eq!(std::fs::read(relay.snapshot_path()).unwrap(), rdb, "the cached RDB is the honest one");
    assert!(relay.ping());
    assert!(
        !std::fs::read_dir(&dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp")),
        "no temporary file is left"
    );
}

#[test]
fn garbage_in_the_stream_is_a_protocol_error_and_the_link_resyncs() {
    // A valid RDB followed by bytes that are not RESP: the RDB is kept, the stream error drops the
    // link, and the relay resumes from its offset.
    check_fault(
        Box::new(|rdb: &[u8]| {
            let mut out = full_resync_with(rdb, rdb.len());
            out.extend_from_slice(b"hello world\r\n");
            out
        }),
        "protocol error from master",
        true,
    );
}

#[test]
fn a_bad_payload_length_is_rejected() {
    check_fault(
        Box::new(|_: &[u8]| format!("+FULLRESYNC {REPLID} 0\r\n$12x4\r\n").into_bytes()),
        "bad payload length",
        false,
    );
}

#[test]
fn a_truncated_rdb_is_rejected() {
    check_fault(
        Box::new(|rdb: &[u8]| full_resync_with(&rdb[..rdb.len() / 2], rdb.len())),
        "rejected RDB from master: payload truncated",
        false,
    );
}

#[test]
fn a_wrong_eof_mark_is_rejected() {
    check_fault(
        Box::new(|rdb: &[u8]| {
            let mut out = format!("+FULLRESYNC {REPLID} 0\r\n$EOF:{}\r\n", "a".repeat(40)).into_bytes();
            out.extend_from_slice(rdb);
            out.extend_from_slice("b".repeat(40).as_bytes());
            out
        }),
        "EOF mark not seen",
        false,
    );
}

#[test]
fn a_crc_mismatch_is_rejected() {
    check_fault(
        Box::new(|rdb: &[u8]| {
            let mut corrupt = rdb.to_vec();
            let middle = corrupt.len() / 2;
            corrupt[middle] ^= 0x01;
            full_resync_with(&corrupt, corrupt.len())
        }),
        "CRC-64 mismatch",
        false,
    );
}

#[test]
fn a_first_byte_that_is_not_dollar_is_rejected() {
    check_fault(
        Box::new(|_: &[u8]| format!("+FULLRESYNC {REPLID} 0\r\n\n\n*3\r\n").into_bytes()),
        "the first byte is not '$'",
        false,
    );
}

#[test]
fn a_silent_master_times_out_and_the_relay_reconnects() {
    check_fault(
        // Nothing at all after PSYNC: the connection stays open until the relay's --repl-timeout.
        Box::new(|_: &[u8]| Vec::new()),
        "timeout ",
        false,
    );
}
