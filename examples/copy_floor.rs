//! The kernel's copy floor for `bench/run.py` (not part of the relay): the least a fan-out node can
//! spend to send one stream to N replicas on this machine. Build with
//! `cargo build --release --example copy_floor`.
//!
//! ```text
//! copy_floor --bytes B [--value-size V] [--chunk 1048576]
//! ```
//!
//! It writes at least B bytes of `SET key:<12 digits> <V bytes>` commands (the shape of
//! `redis-benchmark -t set -d V` in a replication stream) to a temporary file, listens on a loopback
//! port and plays a master to the sink replicas of `bench_sink sink`: `+PONG`, `+OK` to `REPLCONF`,
//! `+FULLRESYNC <id> 0` and a 9-byte payload to `PSYNC`. On `go write` it sends the file to every
//! replica from one thread with `write()`s of `--chunk` bytes from memory, socket after socket; on
//! `go sendfile` it does the same with `sendfile()` from the file in the page cache. It does nothing
//! else: no parsing, no checksum, no log, so its CPU time is the floor for the same bytes.
//!
//! Driven through stdin, one JSON line per request on stdout: `port` (`{"port":P,"bytes":B}`, B the stream's exact length), `count`
//! (`{"online":N}` replicas past their handshake), `go write|sendfile` (`{"sent_s":S}` once every
//! byte is in the kernel; delivery is measured by the sinks), `quit`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    if let Err(error) = run() {
        eprintln!("copy_floor: {error}");
        std::process::exit(1);
    }
}

fn option(args: &[String], name: &str, default: u64) -> Result<u64, BoxError> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let value = args.get(i + 1).ok_or_else(|| format!("{name} needs a value"))?;
            Ok(value.parse().map_err(|_| format!("{name}: not a number: {value}"))?)
        }
    }
}

fn run() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bytes = option(&args, "--bytes", 0)? as usize;
    if bytes == 0 {
        return Err("usage: copy_floor --bytes B [--value-size V] [--chunk C]".into());
    }
    let value_size = option(&args, "--value-size", 1000)? as usize;
    let chunk = option(&args, "--chunk", 1 << 20)?.max(1) as usize;

    let stream = set_commands(bytes, value_size);
    let dir = std::env::temp_dir().join(format!("copy-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("stream");
    std::fs::write(&path, &stream)?;
    let file = File::open(&path)?;
    // The file stays open; its directory goes now, so nothing is left behind on any exit.
    std::fs::remove_dir_all(&dir)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let replicas: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    {
        let replicas = Arc::clone(&replicas);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let replicas = Arc::clone(&replicas);
                std::thread::spawn(move || match handshake(conn) {
                    Ok(conn) => replicas.lock().unwrap_or_else(|e| e.into_inner()).push(conn),
                    Err(error) => eprintln!("copy_floor: handshake: {error}"),
                });
            }
        });
    }

    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["port"] => format!("{{\"port\":{port},\"bytes\":{}}}", stream.len()),
            ["count"] => format!("{{\"online\":{}}}", replicas.lock().unwrap_or_else(|e| e.into_inner()).len()),
            ["go", how] => {
                let mut conns = std::mem::take(&mut *replicas.lock().unwrap_or_else(|e| e.into_inner()));
                let started = Instant::now();
                match *how {
                    "write" => send_with_write(&mut conns, &stream, chunk)?,
                    "sendfile" => send_with_sendfile(&conns, &file, stream.len(), chunk)?,
                    other => return Err(format!("go: unknown way {other:?}").into()),
                }
                let sent = started.elapsed().as_secs_f64();
                replicas.lock().unwrap_or_else(|e| e.into_inner()).extend(conns);
                format!("{{\"sent_s\":{sent}}}")
            }
            ["quit"] => break,
            _ => format!("{{\"error\":\"unknown request {line:?}\"}}"),
        };
        let mut out = stdout.lock();
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// At least `bytes` of RESP `SET` commands (whole commands: the sinks scan them).
fn set_commands(bytes: usize, value_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + value_size + 64);
    let value = vec![b'x'; value_size];
    let mut key = 0u64;
    while out.len() < bytes {
        out.extend_from_slice(format!("*3\r\n$3\r\nSET\r\n$16\r\nkey:{key:012}\r\n${value_size}\r\n").as_bytes());
        out.extend_from_slice(&value);
        out.extend_from_slice(b"\r\n");
        key += 1;
    }
    out
}

/// Answers a sink replica's handshake; returns the connection once `PSYNC` is answered.
fn handshake(conn: TcpStream) -> Result<TcpStream, BoxError> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let args = read_command(&mut reader)?;
        let name = args.first().map(|a| a.to_ascii_uppercase()).unwrap_or_default();
        match name.as_slice() {
            b"PING" => writer.write_all(b"+PONG\r\n")?,
            b"REPLCONF" => writer.write_all(b"+OK\r\n")?,
            b"PSYNC" | b"SYNC" => {
                writer.write_all(b"+FULLRESYNC 0000000000000000000000000000000000000000 0\r\n$9\r\nREDIS0010")?;
                // The replica's ACKs are read and dropped, so they never fill a buffer.
                std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                return Ok(writer);
            }
            _ => writer.write_all(b"-ERR copy_floor answers only a replica handshake\r\n")?,
        }
    }
}

fn read_command(reader: &mut impl BufRead) -> Result<Vec<Vec<u8>>, BoxError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err("the replica closed the connection".into());
    }
    let count: usize = line.trim().strip_prefix('*').and_then(|n| n.parse().ok()).ok_or("expected a RESP array")?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        line.clear();
        reader.read_line(&mut line)?;
        let len: usize = line.trim().strip_prefix('$').and_then(|n| n.parse().ok()).ok_or("expected a bulk")?;
        let mut arg = vec![0; len + 2];
        reader.read_exact(&mut arg)?;
        arg.truncate(len);
        args.push(arg);
    }
    Ok(args)
}

fn send_with_write(conns: &mut [TcpStream], stream: &[u8], chunk: usize) -> Result<(), BoxError> {
    for piece in stream.chunks(chunk) {
        for conn in conns.iter_mut() {
            conn.write_all(piece)?;
        }
    }
    Ok(())
}

fn send_with_sendfile(conns: &[TcpStream], file: &File, len: usize, chunk: usize) -> Result<(), BoxError> {
    let mut start = 0usize;
    while start < len {
        let end = (start + chunk).min(len);
        for conn in conns {
            let mut offset = start as u64;
            while (offset as usize) < end {
                let want = end - offset as usize;
                let sent = rustix::fs::sendfile(conn, file, Some(&mut offset), want)?;
                if sent == 0 {
                    return Err("sendfile sent nothing: the replica went away".into());
                }
            }
        }
        start = end;
    }
    Ok(())
}
