//! Load tools for `bench/run.py` (not part of the relay): lightweight sink replicas, a paced writer
//! and a PING latency sampler. Build with `cargo build --release --example bench_sink`.
//!
//! ```text
//! bench_sink sink  --addr HOST:PORT --count N [--port-base P] [--lat]
//! bench_sink write --addr HOST:PORT --rate PER_SEC [--prefix lat:] [--keyspace K] [--value-size B] [--duration S]
//! bench_sink ping  --addr HOST:PORT [--interval-ms MS]
//! ```
//!
//! A sink connection is a replica that only handshakes (`PING`, `REPLCONF listening-port`,
//! `REPLCONF capa eof capa psync2`, `PSYNC ? -1`), discards the RDB payload (`$<len>` or
//! `$EOF:<mark>`, newline keepalives before it), then reads and discards the stream counting bytes
//! (offset = FULLRESYNC offset + bytes), sending `REPLCONF ACK <offset>` every second and on
//! `REPLCONF GETACK`. The stream is scanned command by command (bulk payloads skipped by length), so
//! with `--lat` the sink also records, for every `SET lat:<seq> <unix-ns>`, the delay from the value
//! to the moment the command arrived.
//!
//! All three tools are driven through stdin and answer on stdout, one JSON line per request; they exit
//! when stdin closes (so they die with the driver). Sink requests: `status`, `when <offset>` (per
//! connection, the unix-ns time at which its offset first reached `offset`), `lat` (per connection,
//! `[seq, delay_ns]` pairs), `quit`. The writer and the sampler print their summary on `quit`/EOF.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// `--name value` options after the subcommand.
struct Args {
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    fn parse(raw: &[String]) -> Args {
        let mut pairs = Vec::new();
        let mut flags = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            let name = raw[i].trim_start_matches("--").to_string();
            if i + 1 < raw.len() && !raw[i + 1].starts_with("--") {
                pairs.push((name, raw[i + 1].clone()));
                i += 2;
            } else {
                flags.push(name);
                i += 1;
            }
        }
        Args { pairs, flags }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str, default: u64) -> u64 {
        self.get(name).map(|v| v.parse().unwrap_or_else(|_| panic!("--{name}: not a number: {v}"))).unwrap_or(default)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_sink sink|write|ping --addr HOST:PORT [options] (see the source)";
    let Some(mode) = argv.get(1).cloned() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let args = Args::parse(&argv[2..]);
    let Some(addr) = args.get("addr").map(str::to_string) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.num("threads", 2) as usize)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match mode.as_str() {
        "sink" => runtime.block_on(sink_main(addr, &args)),
        "write" => runtime.block_on(write_main(addr, &args)),
        "ping" => runtime.block_on(ping_main(addr, &args)),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    if let Err(error) = result {
        eprintln!("bench_sink {mode}: {error}");
        std::process::exit(1);
    }
    // Connections may still be open; do not wait for their tasks.
    runtime.shutdown_timeout(Duration::from_millis(100));
}

/// Reads stdin lines on a plain thread and hands them to the async side; `None` at EOF.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn reply(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Sink replicas
// ---------------------------------------------------------------------------------------------

const STATE_CONNECTING: u8 = 0;
const STATE_LOADING: u8 = 1;
const STATE_ONLINE: u8 = 2;
const STATE_FAILED: u8 = 3;

/// What one sink connection shares with the control loop.
#[derive(Default)]
struct SinkState {
    state: AtomicU8,
    offset: AtomicU64,
    rdb_bytes: AtomicU64,
    full_syncs: AtomicU64,
    /// (unix ns, offset) after reads, at most one entry per millisecond (the last read in it).
    history: Mutex<Vec<(u64, u64)>>,
    /// (seq, delay ns) of every `SET lat:<seq> <ns>` seen.
    latencies: Mutex<Vec<(u64, u64)>>,
    error: Mutex<Option<String>>,
}

async fn sink_main(addr: String, args: &Args) -> Result<(), BoxError> {
    let count = args.num("count", 1) as usize;
    let port_base = args.num("port-base", 30000);
    let lat = args.flag("lat");
    let states: Vec<Arc<SinkState>> = (0..count).map(|_| Arc::new(SinkState::default())).collect();
    for (i, state) in states.iter().enumerate() {
        let state = state.clone();
        let addr = addr.clone();
        let port = (port_base + i as u64) % 65536;
        tokio::spawn(async move {
            // Retried while the upstream cannot serve a sync yet (no master link, loading, refused).
            let mut attempts = 0;
            loop {
                match sink_connection(&addr, port as u16, lat, &state).await {
                    Ok(()) => break,
                    Err(error) => {
                        attempts += 1;
                        let online = state.state.load(Ordering::Relaxed) == STATE_ONLINE;
                        *state.error.lock().unwrap() = Some(error.to_string());
                        if online || attempts >= 600 {
                            state.state.store(STATE_FAILED, Ordering::Relaxed);
                            break;
                        }
                        state.state.store(STATE_CONNECTING, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    let mut lines = stdin_lines();
    while let Some(line) = lines.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("status") => reply(&sink_status(&states)),
            Some("when") => {
                let target: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(u64::MAX);
                let times: Vec<String> = states
                    .iter()
                    .map(|s| {
                        let history = s.history.lock().unwrap();
                        let i = history.partition_point(|(_, offset)| *offset < target);
                        history.get(i).map(|(t, _)| t.to_string()).unwrap_or_else(|| "null".into())
                    })
                    .collect();
                reply(&format!("{{\"times\":[{}]}}", times.join(",")));
            }
            Some("lat") => {
                let conns: Vec<String> = states
                    .iter()
                    .map(|s| {
                        let l = s.latencies.lock().unwrap();
                        let pairs: Vec<String> = l.iter().map(|(seq, d)| format!("[{seq},{d}]")).collect();
                        format!("[{}]", pairs.join(","))
                    })
                    .collect();
                reply(&format!("{{\"conns\":[{}]}}", conns.join(",")));
            }
            Some("quit") => break,
            Some(other) => reply(&format!("{{\"error\":{}}}", json_str(&format!("unknown request {other}")))),
            None => {}
        }
    }
    Ok(())
}

fn sink_status(states: &[Arc<SinkState>]) -> String {
    let mut online = 0;
    let mut failed = 0;
    let mut loading = 0;
    let mut min_offset = u64::MAX;
    let mut max_offset = 0;
    let mut full_syncs = 0;
    let mut errors = Vec::new();
    for s in states {
        match s.state.load(Ordering::Relaxed) {
            STATE_ONLINE => {
                online += 1;
                let offset = s.offset.load(Ordering::Relaxed);
                min_offset = min_offset.min(offset);
                max_offset = max_offset.max(offset);
            }
            STATE_FAILED => failed += 1,
            STATE_LOADING => loading += 1,
            _ => {}
        }
        full_syncs += s.full_syncs.load(Ordering::Relaxed);
        if let Some(e) = s.error.lock().unwrap().as_ref() {
            if errors.len() < 5 {
                errors.push(json_str(e));
            }
        }
    }
    if online == 0 {
        min_offset = 0;
    }
    let offsets: Vec<String> = states.iter().map(|s| s.offset.load(Ordering::Relaxed).to_string()).collect();
    format!(
        "{{\"count\":{},\"online\":{online},\"loading\":{loading},\"failed\":{failed},\"min_offset\":{min_offset},\
         \"max_offset\":{max_offset},\"full_syncs\":{full_syncs},\"offsets\":[{}],\"errors\":[{}]}}",
        states.len(),
        offsets.join(","),
        errors.join(",")
    )
}

/// Buffered reads for the handshake.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    async fn fill(&mut self) -> Result<(), BoxError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                return Err("line too long".into());
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.end += n;
        Ok(())
    }

    /// One line without its `\r\n` (or `\n`).
    /// The next line that is not a newline keepalive.
    async fn reply_line(&mut self) -> Result<String, BoxError> {
        loop {
            let line = self.line().await?;
            if !line.is_empty() {
                return Ok(line);
            }
        }
    }

    async fn line(&mut self) -> Result<String, BoxError> {
        loop {
            if let Some(i) = self.buf[self.start..self.end].iter().position(|&b| b == b'\n') {
                let raw = &self.buf[self.start..self.start + i];
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                let line = String::from_utf8_lossy(raw).into_owned();
                self.start += i + 1;
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    async fn command(&mut self, args: &[&[u8]]) -> Result<String, BoxError> {
        self.stream.write_all(&encode(args)).await?;
        self.line().await
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn ack(offset: u64) -> Vec<u8> {
    encode(&[b"REPLCONF", b"ACK", offset.to_string().as_bytes()])
}

const READ_BUF: usize = 256 * 1024;

async fn sink_connection(addr: &str, port: u16, lat: bool, state: &SinkState) -> Result<(), BoxError> {
    state.state.store(STATE_CONNECTING, Ordering::Relaxed);
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Conn { stream, buf: vec![0; READ_BUF], start: 0, end: 0 };
    let pong = conn.command(&[b"PING"]).await?;
    if !pong.starts_with('+') {
        return Err(format!("PING: {pong}").into());
    }
    let ok = conn.command(&[b"REPLCONF", b"listening-port", port.to_string().as_bytes()]).await?;
    if !ok.starts_with('+') {
        return Err(format!("REPLCONF listening-port: {ok}").into());
    }
    let ok = conn.command(&[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"]).await?;
    if !ok.starts_with('+') {
        return Err(format!("REPLCONF capa: {ok}").into());
    }
    conn.stream.write_all(&encode(&[b"PSYNC", b"?", b"-1"])).await?;
    let reply = conn.reply_line().await?;
    let Some(rest) = reply.strip_prefix("+FULLRESYNC ") else {
        return Err(format!("PSYNC: {reply}").into());
    };
    let start_offset: u64 = rest.split_whitespace().nth(1).and_then(|o| o.parse().ok()).ok_or("bad FULLRESYNC")?;
    state.state.store(STATE_LOADING, Ordering::Relaxed);
    // The payload header, after any newline keepalives.
    let header = conn.reply_line().await?;
    let Some(form) = header.strip_prefix('$') else {
        return Err(format!("expected the RDB payload header, got {header:?}").into());
    };
    let mut rdb_bytes = 0u64;
    if let Some(mark) = form.strip_prefix("EOF:") {
        // Discard until the stream of payload bytes ends with the mark; nothing follows it until our ACK.
        let mark = mark.as_bytes().to_vec();
        let mut tail: Vec<u8> = Vec::with_capacity(2 * mark.len());
        loop {
            if conn.start == conn.end {
                conn.fill().await?;
            }
            let data = &conn.buf[conn.start..conn.end];
            rdb_bytes += data.len() as u64;
            tail.extend_from_slice(&data[data.len().saturating_sub(mark.len())..]);
            if tail.len() > mark.len() {
                tail.drain(..tail.len() - mark.len());
            }
            conn.start = conn.end;
            if tail == mark {
                break;
            }
        }
        rdb_bytes -= mark.len() as u64;
    } else {
        let len: u64 = form.parse().map_err(|_| format!("bad payload length {form:?}"))?;
        while rdb_bytes < len {
            if conn.start == conn.end {
                conn.fill().await?;
            }
            let take = ((len - rdb_bytes) as usize).min(conn.end - conn.start);
            conn.start += take;
            rdb_bytes += take as u64;
        }
    }
    state.rdb_bytes.store(rdb_bytes, Ordering::Relaxed);
    state.full_syncs.fetch_add(1, Ordering::Relaxed);
    state.offset.store(start_offset, Ordering::Relaxed);
    conn.stream.write_all(&ack(start_offset)).await?;
    state.state.store(STATE_ONLINE, Ordering::Relaxed);
    {
        let mut history = state.history.lock().unwrap();
        history.clear();
        history.push((unix_ns(), start_offset));
    }

    let Conn { stream, mut buf, start, end } = conn;
    let (mut reader, mut writer) = stream.into_split();
    let mut scanner = Scanner::new(start_offset);
    let mut offset = start_offset;
    let mut window_start = 0u64;
    let mut events = Vec::new();
    let mut ack_tick = tokio::time::interval(Duration::from_secs(1));
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Stream bytes that came with the payload's last read.
    let mut pending = buf[start..end].to_vec();
    loop {
        let now;
        if !pending.is_empty() {
            now = unix_ns();
            offset += pending.len() as u64;
            scanner.feed(&pending, lat, &mut events);
            pending.clear();
        } else {
            tokio::select! {
                read = reader.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Err("upstream closed the replication link".into());
                    }
                    now = unix_ns();
                    offset += n as u64;
                    scanner.feed(&buf[..n], lat, &mut events);
                }
                _ = ack_tick.tick() => {
                    writer.write_all(&ack(offset)).await?;
                    continue;
                }
            }
        }
        state.offset.store(offset, Ordering::Relaxed);
        {
            let mut history = state.history.lock().unwrap();
            if now.saturating_sub(window_start) >= 1_000_000 || history.is_empty() {
                window_start = now;
                history.push((now, offset));
            } else if let Some(last) = history.last_mut() {
                *last = (now, offset);
            }
        }
        for event in events.drain(..) {
            match event {
                Event::GetAck(at) => writer.write_all(&ack(at)).await?,
                Event::Lat(seq, sent_ns) => state.latencies.lock().unwrap().push((seq, now.saturating_sub(sent_ns))),
            }
        }
    }
}

enum Event {
    /// `REPLCONF GETACK` starting at this offset: ACK what came before it.
    GetAck(u64),
    /// `SET lat:<seq> <unix ns>`.
    Lat(u64, u64),
}

/// Incremental RESP command scanner over the stream: header lines are parsed, bulk payloads skipped by
/// length; the first three arguments are kept when they are short.
struct Scanner {
    offset: u64,
    line: Vec<u8>,
    args_left: u64,
    skip: u64,
    capturing: bool,
    arg: Vec<u8>,
    args: Vec<Vec<u8>>,
    command_start: u64,
}

const CAPTURE_MAX: u64 = 64;

impl Scanner {
    fn new(offset: u64) -> Scanner {
        Scanner {
            offset,
            line: Vec::new(),
            args_left: 0,
            skip: 0,
            capturing: false,
            arg: Vec::new(),
            args: Vec::new(),
            command_start: offset,
        }
    }

    fn feed(&mut self, data: &[u8], lat: bool, events: &mut Vec<Event>) {
        let mut i = 0;
        while i < data.len() {
            if self.skip > 0 {
                let take = (self.skip as usize).min(data.len() - i);
                if self.capturing {
                    self.arg.extend_from_slice(&data[i..i + take]);
                }
                i += take;
                self.offset += take as u64;
                self.skip -= take as u64;
                if self.skip == 0 {
                    let mut arg = std::mem::take(&mut self.arg);
                    arg.truncate(arg.len().saturating_sub(2));
                    self.args.push(arg);
                    self.args_left -= 1;
                    if self.args_left == 0 {
                        self.command_done(lat, events);
                    }
                }
                continue;
            }
            let Some(nl) = data[i..].iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(&data[i..]);
                self.offset += (data.len() - i) as u64;
                return;
            };
            self.line.extend_from_slice(&data[i..i + nl + 1]);
            self.offset += (nl + 1) as u64;
            i += nl + 1;
            let line = std::mem::take(&mut self.line);
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            let body = body.strip_suffix(b"\r").unwrap_or(body);
            let number = || std::str::from_utf8(&body[1..]).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            match body.first() {
                Some(b'*') if self.args_left == 0 => {
                    self.command_start = self.offset - line.len() as u64;
                    self.args.clear();
                    self.args_left = number();
                }
                Some(b'$') if self.args_left > 0 => {
                    let len = number();
                    self.skip = len + 2;
                    self.capturing = self.args.len() < 3 && len <= CAPTURE_MAX;
                    if !self.capturing {
                        // Keep the argument count right without its bytes.
                        self.arg.clear();
                    }
                }
                _ => {} // newlines or anything unexpected: ignored
            }
            self.line = line;
            self.line.clear();
        }
    }

    fn command_done(&mut self, lat: bool, events: &mut Vec<Event>) {
        let args = &self.args;
        if args.len() >= 2 && args[0].eq_ignore_ascii_case(b"REPLCONF") && args[1].eq_ignore_ascii_case(b"GETACK") {
            events.push(Event::GetAck(self.command_start));
        } else if lat && args.len() >= 3 && args[0].eq_ignore_ascii_case(b"SET") && args[1].starts_with(b"lat:") {
            let seq = std::str::from_utf8(&args[1][4..]).ok().and_then(|s| s.parse().ok());
            let digits: Vec<u8> = args[2].iter().copied().take_while(u8::is_ascii_digit).collect();
            let sent = std::str::from_utf8(&digits).ok().and_then(|s| s.parse().ok());
            if let (Some(seq), Some(sent)) = (seq, sent) {
                events.push(Event::Lat(seq, sent));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paced writer
// ---------------------------------------------------------------------------------------------

async fn write_main(addr: String, args: &Args) -> Result<(), BoxError> {
    let rate = args.num("rate", 1000).max(1);
    let prefix = args.get("prefix").unwrap_or("lat:").to_string();
    let keyspace = args.num("keyspace", 0);
    let value_size = args.num("value-size", 0) as usize;
    let duration = args.num("duration", 0);
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let replies = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let counter = {
        let (replies, errors) = (replies.clone(), errors.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    match b {
                        b'+' => {
                            replies.fetch_add(1, Ordering::Relaxed);
                        }
                        b'-' => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            replies.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        })
    };
    let mut lines = stdin_lines();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            line = lines.recv() => match line.as_deref() {
                None | Some("quit") => break,
                Some(_) => continue,
            },
        }
        let elapsed = started.elapsed();
        if duration > 0 && elapsed >= Duration::from_secs(duration) {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        out.clear();
        while sent < due {
            let key_n = if keyspace > 0 { sent % keyspace } else { sent };
            let key = format!("{prefix}{key_n}");
            let mut value = unix_ns().to_string().into_bytes();
            if value.len() < value_size {
                value.resize(value_size, b'x');
            }
            out.extend_from_slice(&encode(&[b"SET", key.as_bytes(), &value]));
            sent += 1;
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
        }
    }
    // Let the last replies arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while replies.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counter.abort();
    reply(&format!(
        "{{\"sent\":{sent},\"replies\":{},\"errors\":{},\"seconds\":{:.3}}}",
        replies.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PING latency sampler
// ---------------------------------------------------------------------------------------------

async fn ping_main(addr: String, args: &Args) -> Result<(), BoxError> {
    let interval = Duration::from_millis(args.num("interval-ms", 5).max(1));
    let mut stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let mut lines = stdin_lines();
    let mut samples: Vec<u64> = Vec::new();
    let mut buf = [0u8; 64];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            line = lines.recv() => match line.as_deref() {
                None | Some("quit") => break,
                Some(_) => continue,
            },
        }
        let t = Instant::now();
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut got = 0;
        while !buf[..got].ends_with(b"\r\n") {
            let n = stream.read(&mut buf[got..]).await?;
            if n == 0 {
                return Err("server closed the connection".into());
            }
            got += n;
        }
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    reply(&format!(
        "{{\"count\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    ));
    Ok(())
}
