//! The relay as a master: real `redis-server` replicas (and other relays, `redis-cli`, and raw
//! misbehaving clients) below it, a real `redis-server` master above it.
//!
//! Every wait is a condition polled with a deadline; writers run a bounded number of batches.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    connect, load_dataset, offset_of, parse_info_field, replid_of, run_with_deadline, signal_server, stat_of, value_of,
    wait_for, wait_in_sync, wait_link_up, wait_until, write_4k_values, InfoSource, KillOnDrop, RedisServer, Relay,
    SYNC_TIMEOUT,
};

/// Deadline for replication conditions.
const DEADLINE: Duration = SYNC_TIMEOUT;

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// A master that serves full syncs at once (diskless, no delay): the relay's own sync and any
/// side-connection fetch start without the default 5 s wait.
fn start_master() -> RedisServer {
    RedisServer::builder().diskless_sync(true).start()
}

/// A redis-server replica of `127.0.0.1:upstream` with extra arguments.
fn start_replica(upstream: u16, extra: &[&str]) -> RedisServer {
    RedisServer::builder().replica_of(upstream).args(extra.iter().copied()).start()
}

/// Starts a relay of `127.0.0.1:upstream` (a master or another relay) with extra arguments.
fn start_relay(upstream: u16, extra: &[&str]) -> Relay {
    let mut builder = Relay::builder(upstream);
    for arg in extra {
        builder = builder.arg(*arg);
    }
    builder.start()
}

/// How many lines of `log` contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

/// The `slaveN:` lines of an `INFO replication` reply.
fn slave_lines(info: &str) -> Vec<String> {
    info.lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| line.starts_with("slave") && line.contains(":ip="))
        .map(str::to_string)
        .collect()
}

/// One replica's state compared with the master's at one moment: the link is up, both report the
/// same replid and offset, and `DEBUG DIGEST` is equal. Offsets are read before and after the
/// digests so that both digests describe the same offset.
fn compare(master: &RedisServer, replica: &RedisServer) -> Result<i64, String> {
    let m_info = master.info("replication");
    let r_info = replica.info("replication");
    let field = |info: &str, name: &str| parse_info_field(info, name).unwrap_or_else(|| "?".to_string());
    let link = field(&r_info, "master_link_status");
    let (m_off, m_id) = (field(&m_info, "master_repl_offset"), field(&m_info, "master_replid"));
    let (r_off, r_id) = (field(&r_info, "master_repl_offset"), field(&r_info, "master_replid"));
    if link != "up" || m_off != r_off || m_id != r_id {
        return Err(format!("link {link}; master {m_id} @ {m_off}; replica {r_id} @ {r_off}"));
    }
    let m_digest = master.digest();
    let r_digest = replica.digest();
    let (m_after, r_after) = (offset_of(master).to_string(), offset_of(replica).to_string());
    if m_after != m_off || r_after != r_off {
        return Err(format!("offsets moved while taking digests (master {m_off} -> {m_after})"));
    }
    if m_digest != r_digest {
        return Err(format!("at offset {m_off}: master digest {m_digest}, replica digest {r_digest}"));
    }
    Ok(m_off.parse().expect("numeric offset"))
}

/// Waits until every replica has the master's replid, offset and digest; returns the offset.
fn assert_converged(master: &RedisServer, replicas: &[(&str, &RedisServer)]) -> i64 {
    let mut offset = 0;
    for (name, replica) in replicas {
        offset = wait_for(DEADLINE, &format!("{name} (port {}) to match the master", replica.port()), || {
            compare(master, replica)
        });
    }
    // The replication id does not move with writes: all of them still have the master's.
    for (name, replica) in replicas {
        assert_eq!(replid_of(*replica), replid_of(master), "{name}: master_replid");
    }
    offset
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

const WRITE_DBS: [i64; 4] = [0, 1, 4, 9];

/// One batch of real write commands (pipelined) in one database; every fifth batch also runs a
/// MULTI/EXEC transaction.
fn write_batch(con: &mut redis::Connection, batch: u64) -> redis::RedisResult<()> {
    let db = WRITE_DBS[(batch % WRITE_DBS.len() as u64) as usize];
    let mut pipe = redis::pipe();
    pipe.cmd("SELECT").arg(db).ignore();
    for i in 0..6 {
        let n = batch * 6 + i;
        pipe.cmd("SET").arg(format!("w:s:{}", n % 700)).arg(value_of(n, 16 + (n % 40) as usize)).ignore();
    }
    pipe.cmd("INCR").arg("w:counter").ignore();
    pipe.cmd("HSET").arg(format!("w:h:{}", batch % 13)).arg(format!("f{}", batch % 50)).arg(batch).ignore();
    pipe.cmd("RPUSH").arg(format!("w:l:{}", batch % 7)).arg(batch).ignore();
    pipe.cmd("LTRIM").arg(format!("w:l:{}", batch % 7)).arg(-50).arg(-1).ignore();
    pipe.cmd("SADD").arg("w:set").arg(batch % 300).ignore();
    pipe.cmd("ZADD").arg("w:z").arg(batch as f64 / 7.0).arg(format!("m{}", batch % 200)).ignore();
    if batch % 11 == 3 {
        pipe.cmd("DEL").arg(format!("w:s:{}", (batch * 3) % 700)).ignore();
    }
    pipe.query::<()>(con)?;
    if batch.is_multiple_of(5) {
        redis::pipe()
            .atomic()
            .cmd("INCRBY")
            .arg("w:tx")
            .arg(batch)
            .ignore()
            .cmd("LPUSH")
            .arg("w:txlist")
            .arg(batch)
            .ignore()
            .cmd("LTRIM")
            .arg("w:txlist")
            .arg(0)
            .arg(30)
            .ignore()
            .query::<()>(con)?;
    }
    redis::cmd("SELECT").arg(0).exec(con)
}

/// Writes `batches` batches on a fresh connection.
fn write_batches(port: u16, first: u64, batches: u64) {
    let mut con = connect(port, None, None).expect("connect to the master");
    for batch in first..first + batches {
        write_batch(&mut con, batch).expect("write batch");
    }
}

/// A thread writing batches to the master until stopped or until `max_batches`.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(port: u16, first: u64, max_batches: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut con = connect(port, None, None).expect("writer: connect to the master");
                for batch in first..first + max_batches {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    write_batch(&mut con, batch).expect("writer: write batch");
                    written.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Writer { stop, written, handle: Some(handle) }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops the writer and returns how many batches it wrote; panics if the writer failed.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        self.written()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw clients
// ---------------------------------------------------------------------------------------------

/// RESP multibulk encoding of `args`.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A plain TCP client with deadline-bounded reads.
struct RawClient {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// What one bounded read attempt saw.
enum Fill {
    Data,
    Closed,
}

impl RawClient {
    fn connect(port: u16) -> RawClient {
        RawClient::from_stream(TcpStream::connect(("127.0.0.1", port)).expect("raw connect to the relay"))
    }

    /// Connects with a tiny receive buffer (`SO_RCVBUF` set before the connection is made, so the
    /// advertised window stays small): a peer writing to it stalls after a few kilobytes.
    fn connect_with_tiny_receive_buffer(port: u16) -> RawClient {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(2048).expect("SO_RCVBUF");
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
                .await
                .expect("connect timed out")
                .expect("connect to the relay")
        });
        let stream = stream.into_std().expect("into_std");
        stream.set_nonblocking(false).expect("set_nonblocking(false)");
        RawClient::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> RawClient {
        stream.set_read_timeout(Some(Duration::from_millis(100))).expect("set_read_timeout");
        stream.set_write_timeout(Some(Duration::from_secs(10))).expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        RawClient { stream, pending: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw client write");
    }

    fn send_command(&mut self, args: &[&str]) {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&encode(&args));
    }

    /// Reads once more into `pending`, waiting at most until `deadline`.
    fn fill(&mut self, deadline: Instant, what: &str) -> Fill {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Fill::Closed,
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    return Fill::Data;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if Instant::now() >= deadline {
                        panic!("raw client: timed out waiting for {what}; have {:?}", lossy_head(&self.pending));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                    return Fill::Closed
                }
                Err(e) => panic!("raw client: reading {what}: {e}"),
            }
        }
    }

    /// One line (without its `\r\n` or `\n`).
    fn read_line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                return text.trim_end_matches('\n').trim_end_matches('\r').to_string();
            }
            if let Fill::Closed = self.fill(deadline, what) {
                panic!("raw client: connection closed while waiting for {what}; have {:?}", lossy_head(&self.pending));
            }
        }
    }

    /// One line, skipping the empty `\n` keepalives a master sends while it prepares an RDB.
    fn read_reply(&mut self, what: &str) -> String {
        loop {
            let line = self.read_line(what);
            if !line.is_empty() {
                return line;
            }
        }
    }

    /// Exactly `n` bytes.
    fn read_exact(&mut self, n: usize, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.pending.len() < n {
            if let Fill::Closed = self.fill(deadline, what) {
                panic!("raw client: connection closed after {} of {n} bytes of {what}", self.pending.len());
            }
        }
        self.pending.drain(..n).collect()
    }

    /// Reads until the peer closes the connection; returns everything read (including what was
    /// already pending). Panics if the connection is still open at the deadline.
    fn read_until_closed(&mut self, what: &str) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Fill::Closed = self.fill(deadline, what) {
                return std::mem::take(&mut self.pending);
            }
            // Keep memory bounded when the peer streams a lot before closing.
            if self.pending.len() > 1 << 20 {
                let keep = self.pending.split_off(self.pending.len() - 4096);
                self.pending = keep;
            }
        }
    }

    /// Handshake of a replica announcing `listening-port port` (no `capa eof`: `$<len>` payloads).
    fn replica_handshake(&mut self, port: u16) {
        let mut batch = encode(&[b"PING"]);
        batch.extend(encode(&[b"REPLCONF", b"listening-port", port.to_string().as_bytes()]));
        batch.extend(encode(&[b"REPLCONF", b"capa", b"psync2"]));
        self.send(&batch);
        assert_eq!(self.read_line("PING reply"), "+PONG");
        assert_eq!(self.read_line("REPLCONF listening-port reply"), "+OK");
        assert_eq!(self.read_line("REPLCONF capa reply"), "+OK");
    }
}
/// The largest a TCP send buffer may grow to (`tcp_wmem` maximum; 4 MB if unknown).
fn tcp_send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// Size of each big value written to make a large RDB.
const HUGE_VALUE: usize = 1_600_000;

/// The first bytes of `bytes`, printable, for messages.
fn lossy_head(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// Deterministic pseudo-random bytes without `\r`, `\n` or a leading `*`.
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (x >> 24) as u8 {
                b'\r' | b'\n' => b'#',
                b'*' if i == 0 => b'#',
                byte => byte,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Child processes (redis-cli)
// ---------------------------------------------------------------------------------------------

/// Collects a child's output stream on a thread.
fn collect(mut source: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let sink = sink.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = source.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
            }
        })
    };
    (sink, handle)
}

fn text_of(sink: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&sink.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

// ---------------------------------------------------------------------------------------------
// 1. Five replicas join one after another under writes; the master forks once.
// ---------------------------------------------------------------------------------------------

#[test]
fn five_replicas_join_under_writes_master_syncs_once() {
    let master = start_master();
    load_dataset(&mut master.conn(), 60);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);

    let writer = Writer::start(master.port(), 0, 40_000);
    let mut replicas = Vec::new();
    let mut progress_at_join = Vec::new();
    for i in 0..5 {
        progress_at_join.push(writer.written());
        let replica = start_replica(relay.port(), &[]);
        wait_link_up(&replica, DEADLINE);
        replicas.push(replica);
        // The next one joins once this one is attached and the writer has moved on.
        let before = progress_at_join[i];
        wait_until(DEADLINE, "the writer to make progress", || writer.written() > before);
    }
    let written = writer.finish();
    assert!(written < 40_000, "the writer ran out of batches before the replicas joined ({written})");
    assert!(
        progress_at_join.windows(2).all(|w| w[0] < w[1]),
        "writes did not continue while replicas joined: {progress_at_join:?}"
    );

    let named: Vec<(String, &RedisServer)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("replica {i}"), r)).collect();
    let named: Vec<(&str, &RedisServer)> = named.iter().map(|(n, r)| (n.as_str(), *r)).collect();
    assert_converged(&master, &named);
    for (name, replica) in &named {
        assert_eq!(replica.dbsize(9), master.dbsize(9), "{name}: DBSIZE of db 9");
    }

    assert_eq!(stat_of(&master, "sync_full"), 1, "the master served one full sync (the relay's)");
    assert_eq!(stat_of(&relay, "sync_full"), 5, "the relay served each replica a full sync");
    assert_eq!(relay.info_field("relay", "rdb_fetches").as_deref(), Some("1"), "one RDB fetched from the master");
    let info = relay.info("replication");
    assert_eq!(parse_info_field(&info, "connected_slaves").as_deref(), Some("5"), "{info}");
    let lines = slave_lines(&info);
    assert_eq!(lines.len(), 5, "{info}");
    for replica in &replicas {
        assert!(
            lines.iter().any(|l| l.contains(&format!("port={},state=online", replica.port()))),
            "replica on port {} is not listed online by the relay: {lines:?}",
            replica.port()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A replica repointed from the relay to the master continues with a partial resync.
// ---------------------------------------------------------------------------------------------

#[test]
fn replica_repointed_to_master_resyncs_partially() {
    let master = start_master();
    load_dataset(&mut master.conn(), 30);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port(), &[]);
    write_batches(master.port(), 0, 300);
    assert_converged(&master, &[("replica", &replica)]);

    let full_before = stat_of(&master, "sync_full");
    let partial_before = stat_of(&master, "sync_partial_ok");
    assert_eq!(full_before, 1);
    let accepted_before = count_lines(&replica.log(), "Master accepted a Partial Resynchronization");

    let reply: String = replica.query(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(master.port()));
    assert!(reply.starts_with("OK"), "REPLICAOF answered {reply}");
    wait_until(DEADLINE, "the master to accept a partial resync", || {
        stat_of(&master, "sync_partial_ok") == partial_before + 1
    });
    wait_until(DEADLINE, "the replica's log to show the partial resync", || {
        count_lines(&replica.log(), "Master accepted a Partial Resynchronization") == accepted_before + 1
    });
    assert_eq!(replica.info_field("replication", "master_port").as_deref(), Some(master.port().to_string().as_str()));

    write_batches(master.port(), 300, 200);
    assert_converged(&master, &[("replica", &replica)]);
    assert_eq!(stat_of(&master, "sync_full"), full_before, "no new full sync on the master");
    assert_eq!(stat_of(&master, "sync_partial_ok"), partial_before + 1);
    assert!(
        master.log().contains("Partial resynchronization request from"),
        "master log lacks the accepted partial resync"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A replica whose link drops resumes with +CONTINUE from the relay's log.
// ---------------------------------------------------------------------------------------------

#[test]
fn replica_link_killed_resumes_from_relay_log() {
    let master = start_master();
    load_dataset(&mut master.conn(), 30);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port(), &[]);
    write_batches(master.port(), 0, 200);
    assert_converged(&master, &[("replica", &replica)]);

    let partial_before = stat_of(&relay, "sync_partial_ok");
    let full_before = stat_of(&relay, "sync_full");
    let log = replica.log();
    let accepted_before = count_lines(&log, "MASTER <-> REPLICA sync: Master accepted a Partial Resynchronization");
    let success_before = count_lines(&log, "Successful partial resynchronization with master");

    let killed: i64 = replica.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("master"));
    assert_eq!(killed, 1, "CLIENT KILL TYPE master on the replica");
    // Writes while the replica reconnects: served from the relay's log.
    write_batches(master.port(), 200, 200);

    wait_until(DEADLINE, "the relay to serve a partial resync", || {
        stat_of(&relay, "sync_partial_ok") == partial_before + 1
    });
    wait_until(DEADLINE, "the replica's log to show the accepted partial resync", || {
        let log = replica.log();
        count_lines(&log, "MASTER <-> REPLICA sync: Master accepted a Partial Resynchronization") == accepted_before + 1
            && count_lines(&log, "Successful partial resynchronization with master") == success_before + 1
    });
    write_batches(master.port(), 400, 100);
    assert_converged(&master, &[("replica", &replica)]);
    assert_eq!(stat_of(&relay, "sync_full"), full_before, "no full sync served for the reconnect");
    assert_eq!(stat_of(&relay, "sync_partial_err"), 0);
    assert_eq!(stat_of(&master, "sync_full"), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Two levels: master -> relay -> relay -> replicas.
// ---------------------------------------------------------------------------------------------

#[test]
fn two_level_relay_chain() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay1 = Relay::start(&master);
    wait_in_sync(&master, &relay1, DEADLINE);
    let relay2 = start_relay(relay1.port(), &[]);
    wait_in_sync(&master, &relay2, DEADLINE);

    let writer = Writer::start(master.port(), 0, 20_000);
    wait_until(DEADLINE, "the writer to start writing", || writer.written() > 0);
    let replica_a = start_replica(relay2.port(), &[]);
    wait_link_up(&replica_a, DEADLINE);
    let progress = writer.written();
    wait_until(DEADLINE, "the writer to make progress", || writer.written() > progress);
    let replica_b = start_replica(relay2.port(), &["--repl-diskless-load", "swapdb"]);
    wait_link_up(&replica_b, DEADLINE);
    let progress = writer.written();
    wait_until(DEADLINE, "the writer to make progress", || writer.written() > progress);
    let written = writer.finish();
    assert!(written < 20_000, "the writer ran out of batches ({written})");
    write_batches(master.port(), 50_000, 50);

    assert_converged(&master, &[("replica a", &replica_a), ("replica b", &replica_b)]);
    wait_in_sync(&master, &relay1, DEADLINE);
    wait_in_sync(&master, &relay2, DEADLINE);
    assert_eq!(replid_of(&relay2), replid_of(&master));

    assert_eq!(stat_of(&master, "sync_full"), 1, "the master forked once");
    assert_eq!(stat_of(&relay1, "sync_full"), 1, "relay 1 served relay 2 only");
    assert_eq!(stat_of(&relay2, "sync_full"), 2, "relay 2 served both replicas");
    assert_eq!(relay1.info_field("relay", "rdb_fetches").as_deref(), Some("1"));
    assert_eq!(relay2.info_field("relay", "rdb_fetches").as_deref(), Some("1"));
    let info = relay1.info("replication");
    let lines = slave_lines(&info);
    assert!(
        lines.len() == 1 && lines[0].contains(&format!("port={},state=online", relay2.port())),
        "relay 1 should list relay 2 online: {lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The log no longer covers the cached RDB: a fresh one on a side connection.
// ---------------------------------------------------------------------------------------------

#[test]
fn stale_snapshot_is_refetched_on_side_connection() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = start_relay(master.port(), &["--log-size", "64kb"]);
    wait_in_sync(&master, &relay, DEADLINE);
    let snapshot_offset = relay.info_i64("relay", "snapshot_offset");
    assert!(snapshot_offset >= 0);
    assert_eq!(relay.info_i64("relay", "rdb_fetches"), 1);

    // Well over 64kb more: ~300 kB of stream.
    {
        let mut con = master.conn();
        for i in 0..150u64 {
            redis::cmd("SET").arg(format!("bulk:{i}")).arg(value_of(i, 2000)).exec(&mut con).expect("SET");
        }
    }
    wait_in_sync(&master, &relay, DEADLINE);
    let first_byte = relay.info_i64("replication", "repl_backlog_first_byte_offset");
    assert!(
        first_byte > snapshot_offset + 1,
        "the log (first byte {first_byte}) still covers the snapshot at {snapshot_offset}"
    );
    assert_eq!(stat_of(&master, "sync_full"), 1);

    let replica = start_replica(relay.port(), &[]);
    let mut last_offset = offset_of(&relay);
    let mut batch = 0;
    wait_for(DEADLINE, "the late replica to match the master", || {
        let info = relay.info("all");
        let offset: i64 = parse_info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).expect("offset");
        assert!(offset >= last_offset, "the relay's master_repl_offset went backwards: {last_offset} -> {offset}");
        last_offset = offset;
        assert_eq!(
            parse_info_field(&info, "master_link_status").as_deref(),
            Some("up"),
            "the relay's main link went down during the side fetch"
        );
        assert_eq!(parse_info_field(&info, "upstream_reconnects").as_deref(), Some("0"));
        // A little traffic while the replica syncs (far less than the log holds).
        if batch < 20 {
            write_batches(master.port(), batch, 1);
            batch += 1;
        }
        compare(&master, &replica)
    });
    write_batches(master.port(), 100, 20);
    assert_converged(&master, &[("late replica", &replica)]);

    assert_eq!(relay.info_i64("relay", "rdb_fetches"), 2, "one side-connection fetch");
    assert_eq!(stat_of(&master, "sync_full"), 2, "the master served the relay's side fetch");
    assert!(relay.info_i64("relay", "snapshot_offset") > snapshot_offset, "the cached snapshot was replaced");
    assert_eq!(relay.info_field("relay", "upstream_reconnects").as_deref(), Some("0"));
    assert_eq!(relay.info_field("replication", "master_link_status").as_deref(), Some("up"));
    assert_eq!(stat_of(&relay, "sync_full"), 1);
}

// ---------------------------------------------------------------------------------------------
// 6. redis-cli --rdb and --replica against the relay.
// ---------------------------------------------------------------------------------------------

#[test]
fn redis_cli_rdb_and_replica() {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let digest = master.digest();

    // --rdb: the cached RDB, loadable by a fresh redis-server.
    let work = tempfile::tempdir().expect("temp dir");
    let load_dir = tempfile::Builder::new().prefix("redis-load-").tempdir().expect("temp dir");
    let rdb_path = load_dir.path().join("dump.rdb");
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &relay.port().to_string(), "--rdb"]).arg(&rdb_path);
    let (ok, out, err) = run_with_deadline(command, DEADLINE, work.path());
    assert!(ok, "redis-cli --rdb failed; stdout: {out}; stderr: {err}");
    assert!(format!("{out}{err}").contains("Transfer finished with success"), "stdout: {out}; stderr: {err}");
    let size = std::fs::metadata(&rdb_path).expect("the RDB file").len();
    assert_eq!(size as i64, relay.info_i64("relay", "snapshot_size"), "the RDB is the cached snapshot");
    let loaded = RedisServer::builder().dir(load_dir).start();
    assert_eq!(loaded.digest(), digest, "the RDB from the relay loads into the master's dataset");
    assert_eq!(loaded.dbsize(5), master.dbsize(5));

    // --replica: the stream.
    let mut child = KillOnDrop(
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &relay.port().to_string(), "--replica"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-cli --replica"),
    );
    let (stdout, out_thread) = collect(child.0.stdout.take().expect("stdout"));
    let (stderr, err_thread) = collect(child.0.stderr.take().expect("stderr"));
    wait_for(DEADLINE, "redis-cli --replica to be an online replica of the relay", || {
        let info = relay.info("replication");
        if slave_lines(&info).iter().any(|l| l.contains("state=online")) {
            Ok(())
        } else {
            Err(format!(
                "{:?}; redis-cli stdout {:?} stderr {:?}",
                slave_lines(&info),
                text_of(&stdout),
                text_of(&stderr)
            ))
        }
    });
    let _: () = master.query(redis::cmd("SET").arg("marker").arg(1));
    wait_for(DEADLINE, "redis-cli --replica to print the marker", || {
        let out = text_of(&stdout);
        if out.contains("marker") {
            Ok(())
        } else {
            Err(format!("stdout {out:?}; stderr {:?}", text_of(&stderr)))
        }
    });
    let out = text_of(&stdout);
    assert!(out.contains("\"SET\",\"marker\",\"1\""), "redis-cli --replica printed {out:?}");
    drop(child);
    let _ = out_thread.join();
    let _ = err_thread.join();
    wait_until(DEADLINE, "the relay to drop the redis-cli replica", || {
        relay.info_field("replication", "connected_slaves").as_deref() == Some("0")
    });
    assert!(relay.ping());
}

// ---------------------------------------------------------------------------------------------
// 7. Both payload forms, both replica load modes.
// ---------------------------------------------------------------------------------------------

fn payload_forms(relay_diskless: bool) {
    let master = start_master();
    load_dataset(&mut master.conn(), 40);
    let relay = start_relay(master.port(), &["--repl-diskless-sync", if relay_diskless { "yes" } else { "no" }]);
    wait_in_sync(&master, &relay, DEADLINE);
    write_batches(master.port(), 0, 100);

    let disk = start_replica(relay.port(), &["--repl-diskless-load", "disabled"]);
    let swapdb = start_replica(relay.port(), &["--repl-diskless-load", "swapdb"]);
    assert_converged(&master, &[("disk-load replica", &disk), ("swapdb replica", &swapdb)]);

    let (disk_line, swapdb_line) = if relay_diskless {
        ("receiving streamed RDB from master with EOF to disk", "receiving streamed RDB from master with EOF to parser")
    } else {
        ("bytes from master to disk", "bytes from master to parser")
    };
    assert!(disk.log().contains(disk_line), "disk-load replica log lacks {disk_line:?}:\n{}", disk.log());
    assert!(swapdb.log().contains(swapdb_line), "swapdb replica log lacks {swapdb_line:?}:\n{}", swapdb.log());
    let form = if relay_diskless { "eof" } else { "length" };
    let stderr = relay.stderr();
    let served: Vec<&str> = stderr.lines().filter(|l| l.contains("sending the cached RDB")).collect();
    assert_eq!(served.len(), 2, "relay stderr:\n{stderr}");
    assert!(
        served.iter().all(|l| l.contains(&format!("form={form}")) || l.contains(&format!("form=\"{form}\""))),
        "{served:?}"
    );

    // Both keep following.
    write_batches(master.port(), 1000, 300);
    let offset = assert_converged(&master, &[("disk-load replica", &disk), ("swapdb replica", &swapdb)]);
    assert!(offset > relay.info_i64("relay", "snapshot_offset"));
    assert_eq!(stat_of(&relay, "sync_full"), 2);
    assert_eq!(stat_of(&master, "sync_full"), 1);
}

#[test]
fn eof_form_payload_to_disk_and_swapdb_replicas() {
    payload_forms(true);
}

#[test]
fn length_form_payload_to_disk_and_swapdb_replicas() {
    payload_forms(false);
}

// ---------------------------------------------------------------------------------------------
// 8. Bad input does not disturb the relay or its real replicas.
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_clients_do_not_disturb_real_replicas() {
    let master = start_master();
    load_dataset(&mut master.conn(), 80);
    // An RDB larger than the socket buffers can hold (the kernel's send buffer grows up to the
    // `tcp_wmem` maximum), so that a replica that never reads stalls during its full sync.
    let send_buffer_max = tcp_send_buffer_max();
    let huge = (send_buffer_max * 3 / 2 + (2 << 20)).min(24 << 20);
    {
        let mut con = master.conn();
        for (i, start) in (0..huge).step_by(HUGE_VALUE).enumerate() {
            let len = HUGE_VALUE.min(huge - start);
            redis::cmd("SET").arg(format!("huge:{i}")).arg(value_of(i as u64, len)).exec(&mut con).expect("SET");
        }
    }
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port(), &[]);
    assert_converged(&master, &[("replica", &replica)]);
    let mut batch = 0u64;
    let mut write_some = |n: u64| {
        write_batches(master.port(), batch, n);
        batch += n;
    };

    // Garbage as an inline command: an error reply; the relay is fine.
    let mut junk = RawClient::connect(relay.port());
    let mut bytes = garbage(300, 7);
    bytes.extend_from_slice(b"\r\n");
    junk.send(&bytes);
    let reply = junk.read_line("a reply to a garbage line");
    assert!(reply.starts_with("-ERR"), "reply to garbage: {reply:?}");
    // Garbage without a line end, longer than any inline command: a protocol error and a close.
    let mut junk2 = RawClient::connect(relay.port());
    junk2.send(&garbage(80 * 1024, 11));
    let answer = junk2.read_until_closed("the relay to close a garbage connection");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("-ERR Protocol error"),
        "reply to an endless garbage line: {:?}",
        lossy_head(&answer)
    );
    write_some(50);
    assert!(relay.ping(), "PING after garbage");

    // An oversized bulk length: -ERR Protocol error, then the connection is closed.
    let mut oversized = RawClient::connect(relay.port());
    oversized.send(b"*1\r\n$999999999999\r\n");
    let answer = oversized.read_until_closed("the relay to close a connection with an oversized bulk");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("-ERR Protocol error"), "reply to an oversized bulk: {answer:?}");
    assert!(answer.ends_with("\r\n") && answer.matches("\r\n").count() == 1, "one reply line: {answer:?}");
    write_some(50);
    assert!(relay.ping(), "PING after an oversized bulk");

    // A replica that never reads: its full sync stalls; everything else goes on.
    let mut stalled = RawClient::connect_with_tiny_receive_buffer(relay.port());
    stalled.replica_handshake(7001);
    stalled.send_command(&["PSYNC", "?", "-1"]);
    wait_until(DEADLINE, "the relay to list the stalled replica", || {
        slave_lines(&relay.info("replication")).iter().any(|l| l.contains("port=7001"))
    });
    let writer = Writer::start(master.port(), 100_000, 1_500);
    wait_until(DEADLINE, "the writer to finish while the relay answers PING", || {
        assert!(relay.ping(), "PING while a replica is stalled");
        writer.written() == 1_500
    });
    writer.finish();
    assert_converged(&master, &[("replica", &replica)]);
    // The scenario really stalled: the relay is still sending it the RDB.
    let stalled_line = slave_lines(&relay.info("replication")).into_iter().find(|l| l.contains("port=7001"));
    assert!(stalled_line.is_some(), "the non-reading replica is no longer listed");
    if huge >= send_buffer_max + (2 << 20) {
        assert!(
            stalled_line.as_deref().is_some_and(|l| !l.contains("state=online")),
            "the non-reading replica should still be in its full sync: {stalled_line:?}"
        );
    }

    // A replica that, once online, sends a write command: the relay drops it; nothing reaches
    // the real replica.
    let mut writing = RawClient::connect(relay.port());
    writing.replica_handshake(7002);
    writing.send_command(&["PSYNC", "?", "-1"]);
    let fullresync = writing.read_reply("+FULLRESYNC");
    assert!(fullresync.starts_with("+FULLRESYNC "), "PSYNC reply: {fullresync:?}");
    let header = writing.read_reply("the RDB payload header");
    let len: usize =
        header.strip_prefix('$').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("payload header {header:?}"));
    let rdb = writing.read_exact(len, "the RDB payload");
    assert!(rdb.starts_with(b"REDIS"), "payload does not look like an RDB");
    wait_until(DEADLINE, "the fake replica to be online", || {
        slave_lines(&relay.info("replication")).iter().any(|l| l.contains("port=7002,state=online"))
    });
    writing.send_command(&["SET", "written-by-a-replica", "b"]);
    write_some(20);
    writing.read_until_closed("the relay to drop a replica that sent SET");
    wait_until(DEADLINE, "the relay to unlist the writing replica", || {
        !slave_lines(&relay.info("replication")).iter().any(|l| l.contains("port=7002"))
    });

    write_some(50);
    assert!(relay.ping(), "PING at the end");
    assert_converged(&master, &[("replica", &replica)]);
    let exists: i64 = replica.query(redis::cmd("EXISTS").arg("written-by-a-replica"));
    assert_eq!(exists, 0, "a command from a replica reached the stream");
    assert_eq!(stat_of(&master, "sync_full"), 1);
    drop(stalled);
    drop(junk);
}

// ---------------------------------------------------------------------------------------------
// 9. Replicas behind the memory tail: records checked once, then sent from the segment file.
// ---------------------------------------------------------------------------------------------

#[test]
fn replicas_behind_the_memory_tail_get_checked_records_sent_from_the_file() {
    let master = start_master();
    let relay = start_relay(master.port(), &["--log-memory", "1mb"]);
    wait_in_sync(&master, &relay, DEADLINE);
    let first = start_replica(relay.port(), &[]);
    let second = start_replica(relay.port(), &[]);
    assert_converged(&master, &[("first", &first), ("second", &second)]);

    // Both replicas stop reading; 32 MB of stream runs ahead of them, far past the 1 MB memory
    // tail and more than the socket buffers between them and the relay hold.
    signal_server(&first, "STOP");
    signal_server(&second, "STOP");
    write_4k_values(&master, "big", 8000, 3000);
    wait_in_sync(&master, &relay, DEADLINE);

    // The first catches up alone: it reads the records from disk and checks them.
    signal_server(&first, "CONT");
    assert_converged(&master, &[("first", &first)]);
    let from_disk = relay.info_i64("relay", "stream_sent_from_disk");
    assert!(from_disk > 8 << 20, "the first replica read the log from disk: {from_disk} bytes");
    // Only checked records go by sendfile, and with two replicas each is sent so at most once: the
    // bytes sent by sendfile never exceed the bytes read and checked. (Some may already have gone to
    // the stopped second replica's socket buffers: a lowered fan-out can trail the writer past the
    // memory tail before those buffers are full.)
    let by_sendfile = relay.info_i64("relay", "stream_sent_by_sendfile");
    assert!(by_sendfile <= from_disk, "sendfile {by_sendfile} bytes, read and checked {from_disk} bytes");

    // The second reads the same records: checked already, they go from the file by sendfile.
    signal_server(&second, "CONT");
    assert_converged(&master, &[("first", &first), ("second", &second)]);
    let by_sendfile = relay.info_i64("relay", "stream_sent_by_sendfile");
    assert!(by_sendfile > 8 << 20, "the second replica got the checked records by sendfile: {by_sendfile} bytes");
    let from_disk = relay.info_i64("relay", "stream_sent_from_disk");
    assert!(by_sendfile <= from_disk, "sendfile {by_sendfile} bytes, read and checked {from_disk} bytes");
    assert_eq!(stat_of(&relay, "sync_full"), 2, "the two initial syncs only");
    assert_eq!(stat_of(&master, "sync_full"), 1);
}

#[test]
fn the_memory_tail_is_kept_for_what_a_replica_was_not_sent_and_released_behind_what_it_was() {
    let master = start_master();
    let relay = Relay::start(&master);
    wait_in_sync(&master, &relay, DEADLINE);
    let replica = start_replica(relay.port(), &[]);
    assert_converged(&master, &[("replica", &replica)]);
    let tail = || relay.info_i64("memory", "mem_replication_backlog");
    let sent = || {
        ["stream_sent_from_memory", "stream_sent_from_disk", "stream_sent_by_sendfile"]
            .iter()
            .map(|name| relay.info_i64("relay", name))
            .sum::<i64>()
    };

    // A replica that stopped reading (and ACKing) holds what its cursor could not send: 32 MB of
    // stream, more than the socket buffers between them take.
    signal_server(&replica, "STOP");
    let (offset_before, sent_before) = (offset_of(&relay), sent());
    write_4k_values(&master, "tail", 8000, 1000);
    wait_in_sync(&master, &relay, DEADLINE);
    // The relay has gone 2 s without an ACK from it: release rounds (every 100 ms) have run.
    wait_until(DEADLINE, "the stopped replica's ACK to be 2 s old", || {
        slave_lines(&relay.info("replication"))
            .first()
            .and_then(|line| line.split(',').find_map(|f| f.strip_prefix("lag=")).and_then(|v| v.parse::<u64>().ok()))
            .is_some_and(|lag| lag >= 2)
    });
    // Read the tail before what was sent: the cursor only moves on, so the unsent figure can only
    // shrink between the two reads. A master PING may land between the offset and sent reads.
    let held = tail();
    let unsent = (offset_of(&relay) - offset_before) - (sent() - sent_before);
    assert!(unsent >= 8 << 20, "the socket buffers took most of the 32 MB: {unsent} bytes unsent");
    assert!(held + 64 >= unsent, "the {unsent} bytes not sent are kept: {held} bytes held");
    // What was sent is released without waiting for an ACK (whole chunks, so up to one more).
    assert!(held <= unsent + (1 << 20), "what was sent is released: {held} bytes held, {unsent} unsent");

    // Once it has caught up, nobody needs the tail: it is released.
    signal_server(&replica, "CONT");
    assert_converged(&master, &[("replica", &replica)]);
    wait_until(DEADLINE, "the memory tail to be released", || tail() == 0);
    assert_eq!(stat_of(&relay, "sync_full"), 1);
}
