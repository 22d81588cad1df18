//! Integration-test harness: real `redis-server` processes, the `redis-relay` binary, and helpers
//! to wait for conditions with deadlines (never fixed sleeps).
//!
//! Everything listens on loopback only. Each [`RedisServer`] and [`Relay`] owns a temporary
//! directory and its child process; both are killed (and reaped) on drop. When a test panics,
//! the drop handlers print the tail of the relay's stderr and of each redis-server's log, so a
//! failure shows what the processes were doing.
//!
//! This module is compiled into every integration-test crate that declares `mod common;`, so not
//! every item is used by every crate.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{Connection, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tempfile::TempDir;

/// Path of the redis-server binary (overridable with `REDIS_SERVER_BIN`).
pub fn redis_server_bin() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_string())
}

/// How often [`wait_until`] and friends poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a process may take to start answering `PING`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// A generous default deadline for replication conditions.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a process start is retried when its (just freed) port was taken meanwhile.
const START_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Ports, connections, waiting
// ---------------------------------------------------------------------------------------------

/// A loopback port that was free a moment ago: binds `127.0.0.1:0`, reads the port, drops the
/// listener. Starting a process on it can still race with another test; the `start` functions
/// below retry with a new port when the process exits early.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Opens a connection to `127.0.0.1:port`, authenticating if `password` is given (as `user` if
/// given). Does not send `CLIENT SETINFO`, so it also works against servers that answer only a
/// handful of commands. Connect, read and write timeouts are bounded so a hung peer fails the
/// test instead of hanging it.
pub fn connect(port: u16, user: Option<&str>, password: Option<&str>) -> redis::RedisResult<Connection> {
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(user) = user {
        settings = settings.set_username(user);
    }
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let info = ConnectionAddr::Tcp("127.0.0.1".to_string(), port).into_connection_info()?.set_redis_settings(settings);
    let client = redis::Client::open(info)?;
    let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(30)))?;
    con.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(con)
}

/// Sends `commands` (each split at spaces) one by one on one connection to `127.0.0.1:port` and
/// returns each reply's bytes exactly as they came (text, lossy), for comparing a server's replies
/// byte for byte with redis-server's. Each command must get exactly one reply.
pub fn raw_transcript(port: u16, commands: &[&str]) -> Vec<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut replies = Vec::new();
    let mut buf = Vec::new();
    for command in commands {
        let words: Vec<&str> = command.split(' ').collect();
        let mut request = format!("*{}\r\n", words.len());
        for word in &words {
            request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
        }
        stream.write_all(request.as_bytes()).expect("send command");
        loop {
            match redis_protocol::resp3::decode::complete::decode(&buf) {
                Ok(Some((_, len))) => {
                    replies.push(String::from_utf8_lossy(&buf[..len]).into_owned());
                    buf.drain(..len);
                    break;
                }
                Ok(None) => {}
                Err(error) => panic!("port {port}: bad reply to {command:?}: {error:?}"),
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => panic!("port {port}: connection closed before the reply to {command:?}"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(error) => panic!("port {port}: no reply to {command:?}: {error}"),
            }
        }
    }
    replies
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value. On
/// deadline, panics naming `description` and the last `Err` the probe returned (a description of
/// the last observed state).
pub fn wait_for<T>(timeout: Duration, description: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {description}; last observed: {last}");
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `condition` every [`POLL_INTERVAL`] until it is true; panics naming `description` on
/// deadline. Use [`wait_for`] when the last observed value helps explain a timeout.
pub fn wait_until(timeout: Duration, description: &str, mut condition: impl FnMut() -> bool) {
    wait_for(timeout, description, || if condition() { Ok(()) } else { Err("condition false".to_string()) })
}

// ---------------------------------------------------------------------------------------------
// INFO
// ---------------------------------------------------------------------------------------------

/// The value of `name` in an `INFO` reply (`name:value` lines), if present.
pub fn parse_info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim_end_matches('\r').split_once(':')?;
        (key == name).then(|| value.to_string())
    })
}

/// Anything that answers `INFO`: a [`RedisServer`] or a [`Relay`].
pub trait InfoSource {
    /// The `INFO <section>` reply. Panics if the process does not answer.
    fn info(&self, section: &str) -> String;

    /// The value of `name` in `INFO <section>`.
    fn info_field(&self, section: &str, name: &str) -> Option<String> {
        parse_info_field(&self.info(section), name)
    }

    /// The value of `name` in `INFO <section>` as an integer; panics if it is missing or not one.
    fn info_i64(&self, section: &str, name: &str) -> i64 {
        let info = self.info(section);
        let value = parse_info_field(&info, name).unwrap_or_else(|| panic!("INFO {section} has no {name}:\n{info}"));
        value.parse().unwrap_or_else(|_| panic!("INFO {section} field {name} is not an integer: {value:?}"))
    }
}

/// `master_repl_offset` from `INFO replication`.
pub fn offset_of(source: &impl InfoSource) -> i64 {
    source.info_i64("replication", "master_repl_offset")
}

/// The offset the master last saw ACKed by the replica listening on `port` (its `slaveN:` line).
pub fn acked_on_master(master: &RedisServer, port: u16) -> Option<u64> {
    let needle = format!("port={port},");
    let info = master.info("replication");
    let line = info.lines().find(|line| line.starts_with("slave") && line.contains(&needle))?;
    line.split(',').find_map(|field| field.strip_prefix("offset="))?.parse().ok()
}

/// `master_replid` from `INFO replication`.
pub fn replid_of(source: &impl InfoSource) -> String {
    source.info_field("replication", "master_replid").expect("INFO replication has master_replid")
}

/// A counter from `INFO stats` (e.g. `sync_full`, `sync_partial_ok`).
pub fn stat_of(source: &impl InfoSource, name: &str) -> i64 {
    source.info_i64("stats", name)
}

/// A short description of a replica's replication state, for timeout messages.
fn replica_state(source: &impl InfoSource) -> String {
    let info = source.info("replication");
    let field = |name| parse_info_field(&info, name).unwrap_or_else(|| "?".to_string());
    format!(
        "master_link_status:{} master_replid:{} master_repl_offset:{} slave_repl_offset:{} master_sync_in_progress:{}",
        field("master_link_status"),
        field("master_replid"),
        field("master_repl_offset"),
        field("slave_repl_offset"),
        field("master_sync_in_progress"),
    )
}

/// Waits until `replica` reports `master_link_status:up`.
pub fn wait_link_up(replica: &impl InfoSource, timeout: Duration) {
    wait_for(timeout, "master_link_status:up on the replica", || {
        let info = replica.info("replication");
        match parse_info_field(&info, "master_link_status").as_deref() {
            Some("up") => Ok(()),
            _ => Err(replica_state(replica)),
        }
    })
}

/// Waits until `replica` has the link up, the master's replication id, and the master's offset.
/// Returns the common offset.
pub fn wait_in_sync(master: &impl InfoSource, replica: &(impl InfoSource + ?Sized), timeout: Duration) -> i64 {
    wait_for(timeout, "the replica to reach the master's replid and offset", || {
        let master_info = master.info("replication");
        let replica_info = replica.info("replication");
        let m_off = parse_info_field(&master_info, "master_repl_offset");
        let m_id = parse_info_field(&master_info, "master_replid");
        let r_off = parse_info_field(&replica_info, "master_repl_offset");
        let r_id = parse_info_field(&replica_info, "master_replid");
        let link = parse_info_field(&replica_info, "master_link_status");
        if m_off.is_some() && m_off == r_off && m_id == r_id && link.as_deref() == Some("up") {
            Ok(m_off.and_then(|o| o.parse().ok()).expect("numeric master_repl_offset"))
        } else {
            Err(format!(
                "master replid {m_id:?} offset {m_off:?}; replica link {link:?} replid {r_id:?} offset {r_off:?}"
            ))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Kills and reaps a child process (idempotent).
fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes ANSI escape sequences (colours) from `text`.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A cached connection that is re-opened after an error.
struct CachedConnection {
    port: u16,
    user: Option<String>,
    password: Option<String>,
    con: Mutex<Option<Connection>>,
}

impl CachedConnection {
    fn new(port: u16, user: Option<String>, password: Option<String>) -> Self {
        CachedConnection { port, user, password, con: Mutex::new(None) }
    }

    fn open(&self) -> redis::RedisResult<Connection> {
        connect(self.port, self.user.as_deref(), self.password.as_deref())
    }

    /// Runs `cmd` on the cached connection, reconnecting once if the connection was broken.
    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut guard = self.con.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.open()?);
            }
            let con = guard.as_mut().expect("connection just opened");
            match cmd.query::<T>(con) {
                Ok(value) => return Ok(value),
                Err(error) if attempt == 0 && (error.is_connection_dropped() || error.is_io_error()) => {
                    *guard = None;
                }
                Err(error) => {
                    if error.is_connection_dropped() || error.is_io_error() || error.is_timeout() {
                        *guard = None;
                    }
                    return Err(error);
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

/// The command's name (first argument) for error messages.
fn command_name(cmd: &redis::Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).into_owned(),
        _ => "<command>".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

/// Options for starting a [`RedisServer`]; see [`RedisServer::builder`].
#[derive(Default)]
pub struct RedisServerBuilder {
    args: Vec<String>,
    password: Option<String>,
    dir: Option<TempDir>,
}

impl RedisServerBuilder {
    /// Adds one command-line argument (e.g. `"--repl-backlog-size"`, then `"64mb"`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds several command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--requirepass PASSWORD`; the harness's own connections then authenticate with it.
    pub fn requirepass(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self.arg("--requirepass").arg(password)
    }

    /// `--repl-diskless-sync yes|no`, with `--repl-diskless-sync-delay 0` so a sync starts at once.
    pub fn diskless_sync(self, diskless: bool) -> Self {
        self.arg("--repl-diskless-sync")
            .arg(if diskless { "yes" } else { "no" })
            .arg("--repl-diskless-sync-delay")
            .arg("0")
    }

    /// `--replicaof 127.0.0.1 PORT`.
    pub fn replica_of(self, port: u16) -> Self {
        self.arg("--replicaof").arg("127.0.0.1").arg(port.to_string())
    }

    /// Runs the server in `dir` (e.g. one prepared with a `dump.rdb` to load) instead of a new
    /// temporary directory.
    pub fn dir(mut self, dir: TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Starts the server and waits (up to [`STARTUP_TIMEOUT`]) until it answers `PING` (which
    /// also means any RDB in its directory has been loaded).
    pub fn start(self) -> RedisServer {
        let dir = match self.dir {
            Some(dir) => dir,
            None => tempfile::Builder::new().prefix("redis-server-").tempdir().expect("create temp dir"),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match RedisServer::spawn(port, &dir, &self.args, self.password.as_deref()) {
                Ok(child) => {
                    return RedisServer {
                        child,
                        port,
                        args: self.args,
                        con: CachedConnection::new(port, None, self.password.clone()),
                        password: self.password,
                        dir,
                    };
                }
                Err(failure) => failures.push(failure),
            }
        }
        panic!("redis-server did not start after {START_ATTEMPTS} attempts:\n{}", failures.join("\n---\n"));
    }
}

/// Waits until the just-spawned `child` (a redis-server or a Sentinel) answers `PING` and `INFO`
/// on `port` as itself; on failure it is reaped and the description has its log's tail. `PING`
/// fails with LOADING until an RDB in the directory is loaded.
fn wait_answering(
    mut child: Child,
    what: &str,
    port: u16,
    password: Option<&str>,
    logfile: &Path,
) -> Result<Child, String> {
    let pid = child.id().to_string();
    let start = Instant::now();
    let log_tail = || tail(&std::fs::read_to_string(logfile).unwrap_or_default(), 20);
    let mut last: String;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} on port {port} exited with {status}; log:\n{}", log_tail()));
        }
        match connect(port, None, password).and_then(|mut con| {
            redis::cmd("PING").exec(&mut con)?;
            redis::cmd("INFO").arg("server").query::<String>(&mut con)
        }) {
            // Another process may own the port if ours lost the race for it: check the pid.
            Ok(info) if parse_info_field(&info, "process_id").as_deref() == Some(pid.as_str()) => return Ok(child),
            Ok(_) => last = "another process answers on this port".to_string(),
            Err(error) => last = error.to_string(),
        }
        if start.elapsed() >= STARTUP_TIMEOUT {
            kill_child(&mut child);
            return Err(format!(
                "{what} on port {port} did not answer within {STARTUP_TIMEOUT:?} (last: {last}); log:\n{}",
                log_tail()
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A `redis-server` child process on a loopback port, in its own temporary directory.
pub struct RedisServer {
    child: Child,
    port: u16,
    args: Vec<String>,
    password: Option<String>,
    con: CachedConnection,
    dir: TempDir,
}

impl RedisServer {
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// Starts a server with the harness's base arguments plus `args`.
    pub fn start(args: &[&str]) -> RedisServer {
        RedisServer::builder().args(args.iter().copied()).start()
    }

    /// Spawns the process and waits until it answers PING as itself; on failure returns a
    /// description (and the child is reaped).
    fn spawn(port: u16, dir: &TempDir, args: &[String], password: Option<&str>) -> Result<Child, String> {
        let logfile = dir.path().join("redis.log");
        let mut command = Command::new(redis_server_bin());
        command
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(dir.path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--enable-debug-command")
            .arg("yes")
            // 7.0 defaults to diskless sync with a 5 s delay; start syncs at once (tests that care
            // about the sync form set both options through `diskless_sync`).
            .arg("--repl-diskless-sync-delay")
            .arg("0")
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(&logfile)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| format!("cannot run {}: {e}", redis_server_bin()))?;
        wait_answering(child, "redis-server", port, password, &logfile)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory (`--dir`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The password the harness authenticates with (`--requirepass`), if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A new connection, authenticated as the default user if the server has a password.
    pub fn conn(&self) -> Connection {
        connect(self.port, None, self.password.as_deref())
            .unwrap_or_else(|e| panic!("connect to redis-server on port {}: {e}", self.port))
    }

    /// Runs `cmd` on the harness's cached connection.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.con.query(cmd).unwrap_or_else(|e| panic!("redis-server on port {}: {}: {e}", self.port, command_name(cmd)))
    }

    pub fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section))
    }

    pub fn info_field(&self, section: &str, name: &str) -> Option<String> {
        parse_info_field(&self.info(section), name)
    }

    /// `DEBUG DIGEST`: a hash of the whole dataset (all zeros when empty).
    pub fn digest(&self) -> String {
        self.query(redis::cmd("DEBUG").arg("DIGEST"))
    }

    /// `DBSIZE` of database `db`.
    pub fn dbsize(&self, db: i64) -> i64 {
        let mut con = self.conn();
        redis::cmd("SELECT").arg(db).exec(&mut con).expect("SELECT");
        redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE")
    }

    /// The server's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `CLIENT KILL TYPE replica`: drops every replica link; returns how many were killed.
    pub fn kill_replica_links(&self) -> i64 {
        self.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"))
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What a master without persistence does after a crash: killed, its RDB deleted, started
    /// again on the same port with the same arguments, empty, with a new replication id.
    pub fn restart_empty(&mut self) {
        kill_child(&mut self.child);
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        self.child = RedisServer::spawn(self.port, &self.dir, &self.args, self.password.as_deref())
            .unwrap_or_else(|failure| panic!("restart of redis-server on port {}: {failure}", self.port));
        self.con = CachedConnection::new(self.port, None, self.password.clone());
    }

    /// Kills the process with SIGKILL (no shutdown save) and reaps it; the directory remains.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }
}

impl InfoSource for RedisServer {
    fn info(&self, section: &str) -> String {
        RedisServer::info(self, section)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- redis-server on port {} (last lines of its log) ---\n{}", self.port, tail(&self.log(), 30));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------------------------------

/// What a [`Sentinel`] monitors and how quickly it acts.
pub struct SentinelSettings {
    pub master_name: String,
    pub master_port: u16,
    pub quorum: u32,
    pub down_after: Duration,
    pub failover_timeout: Duration,
    /// `sentinel auth-user` and `auth-pass`: the ACL user Sentinel logs in as on every instance.
    pub auth: Option<(String, String)>,
}

/// A real Sentinel (`redis-server <conf> --sentinel`) on a loopback port, with its generated
/// `sentinel.conf` in its own temporary directory; killed on drop.
pub struct Sentinel {
    child: Child,
    port: u16,
    con: CachedConnection,
    dir: TempDir,
}

impl Sentinel {
    pub fn start(settings: &SentinelSettings) -> Sentinel {
        // Sentinel fsyncs its rewritten configuration on its event loop (at every discovery and
        // failover step); on a busy disk that stalls it past 2 s and it enters TILT mode, doing
        // nothing for 30 s. Its small directory lives on tmpfs when the machine has one.
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("redis-sentinel-").to_owned();
        let dir = if shm.is_dir() { builder.tempdir_in(shm) } else { builder.tempdir() }.expect("create temp dir");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match Sentinel::spawn(port, &dir, settings) {
                Ok(child) => return Sentinel { child, port, con: CachedConnection::new(port, None, None), dir },
                Err(failure) => failures.push(failure),
            }
        }
        panic!("redis-sentinel did not start after {START_ATTEMPTS} attempts:\n{}", failures.join("\n---\n"));
    }

    fn spawn(port: u16, dir: &TempDir, s: &SentinelSettings) -> Result<Child, String> {
        let logfile = dir.path().join("sentinel.log");
        let conf = dir.path().join("sentinel.conf");
        // Sentinel rewrites its configuration file, so it must be a writable file of its own.
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {name} 127.0.0.1 {master} {quorum}\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} {timeout}\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.path().display(),
            log = logfile.display(),
            name = s.master_name,
            master = s.master_port,
            quorum = s.quorum,
            down = s.down_after.as_millis(),
            timeout = s.failover_timeout.as_millis(),
        );
        let text = match &s.auth {
            Some((user, password)) => format!(
                "{text}sentinel auth-user {name} {user}\nsentinel auth-pass {name} {password}\n",
                name = s.master_name
            ),
            None => text,
        };
        std::fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
        let child = Command::new(redis_server_bin())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {} --sentinel: {e}", redis_server_bin()))?;
        wait_answering(child, "sentinel", port, None, &logfile)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.con.query(cmd).unwrap_or_else(|e| panic!("sentinel on port {}: {}: {e}", self.port, command_name(cmd)))
    }

    /// `SENTINEL get-master-addr-by-name`: the port of the master it currently names.
    pub fn master_port(&self, name: &str) -> Option<u16> {
        let addr: Option<(String, String)> =
            self.con.query(redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(name)).ok().flatten();
        addr.and_then(|(_, port)| port.parse().ok())
    }

    /// `SENTINEL replicas <name>`: each replica's fields (`ip`, `port`, `flags`, ...).
    pub fn replicas(&self, name: &str) -> Vec<std::collections::HashMap<String, String>> {
        let rows: Vec<Vec<String>> = self.query(redis::cmd("SENTINEL").arg("replicas").arg(name));
        rows.into_iter()
            .map(|row| row.chunks(2).filter(|kv| kv.len() == 2).map(|kv| (kv[0].clone(), kv[1].clone())).collect())
            .collect()
    }

    /// `SENTINEL master <name>`'s fields.
    pub fn master(&self, name: &str) -> std::collections::HashMap<String, String> {
        let row: Vec<String> = self.query(redis::cmd("SENTINEL").arg("master").arg(name));
        row.chunks(2).filter(|kv| kv.len() == 2).map(|kv| (kv[0].clone(), kv[1].clone())).collect()
    }

    /// Collects every event this Sentinel publishes (`PSUBSCRIBE *`: `+sdown`, `+switch-master`,
    /// `+slave-reconf-sent`, ...) from now on, until the collector is dropped.
    pub fn events(&self) -> SentinelEvents {
        SentinelEvents::start(self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        kill_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- sentinel on port {} (last lines of its log) ---\n{}", self.port, tail(&self.log(), 40));
        }
    }
}

/// One event a Sentinel published: its channel (the event name) and message.
#[derive(Debug, Clone)]
pub struct SentinelEvent {
    pub at: Instant,
    pub name: String,
    pub message: String,
}

/// The events of one Sentinel, collected by a thread subscribed to it.
pub struct SentinelEvents {
    events: std::sync::Arc<Mutex<Vec<SentinelEvent>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SentinelEvents {
    fn start(port: u16) -> SentinelEvents {
        let events = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut con = connect(port, None, None).expect("connect to sentinel");
        let (sink, flag) = (events.clone(), stop.clone());
        let (ready, subscribed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut pubsub = con.as_pubsub();
            let ok =
                pubsub.psubscribe("*").is_ok() && pubsub.set_read_timeout(Some(Duration::from_millis(200))).is_ok();
            let _ = ready.send(ok);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let message = match pubsub.get_message() {
                    Ok(message) => message,
                    Err(error) if error.is_timeout() => continue,
                    Err(_) => return,
                };
                let event = SentinelEvent {
                    at: Instant::now(),
                    name: message.get_channel_name().to_string(),
                    message: message.get_payload::<String>().unwrap_or_default(),
                };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(event);
            }
        });
        // Subscribed before this returns, so no event after it is missed.
        assert_eq!(subscribed.recv().ok(), Some(true), "PSUBSCRIBE * on sentinel port {port}");
        SentinelEvents { events, stop, thread: Some(thread) }
    }

    /// The events so far.
    pub fn all(&self) -> Vec<SentinelEvent> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first event named `name` whose message contains `needle`.
    pub fn find(&self, name: &str, needle: &str) -> Option<SentinelEvent> {
        self.all().into_iter().find(|e| e.name == name && e.message.contains(needle))
    }
}

impl Drop for SentinelEvents {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// redis-relay
// ---------------------------------------------------------------------------------------------

/// Path of the relay binary under test.
pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_redis-relay")
}

/// Options for starting a [`Relay`]; see [`Relay::builder`].
pub struct RelayBuilder {
    upstream: String,
    user: Option<String>,
    password: Option<String>,
    dir: Option<PathBuf>,
    listen_port: Option<u16>,
    requirepass: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    open_files_limit: Option<u64>,
}

impl RelayBuilder {
    /// Starts the process with soft and hard `RLIMIT_NOFILE` at `limit` (as `prlimit --nofile`), so
    /// it cannot raise its descriptor limit.
    pub fn open_files_limit(mut self, limit: u64) -> Self {
        self.open_files_limit = Some(limit);
        self
    }

    /// `--upstream HOST:PORT` (the builder's default is `127.0.0.1:<port given to builder()>`).
    pub fn upstream(mut self, addr: impl Into<String>) -> Self {
        self.upstream = addr.into();
        self
    }

    /// `--upstream-user USER`.
    pub fn upstream_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// `--upstream-password PASSWORD`.
    pub fn upstream_password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// `--dir PATH` (default: a `data` directory inside the relay's temporary directory). The
    /// directory is created if missing.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// `--requirepass PASSWORD`; the harness's own connections then authenticate with it.
    pub fn requirepass(mut self, password: &str) -> Self {
        self.requirepass = Some(password.to_string());
        self
    }

    /// Listen on this port instead of a free one (no retry if it is taken).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.listen_port = Some(port);
        self
    }

    /// Any extra argument, e.g. `"--log-size"`, `"1mb"`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Several extra arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the process (e.g. `RUST_LOG`, which defaults to `info`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the relay and waits (up to [`STARTUP_TIMEOUT`]) until its listen port answers PING.
    pub fn start(self) -> Relay {
        let work = tempfile::Builder::new().prefix("redis-relay-").tempdir().expect("create temp dir");
        let dir = self.dir.clone().unwrap_or_else(|| work.path().join("data"));
        std::fs::create_dir_all(&dir).expect("create relay dir");
        let stderr_path = work.path().join("relay.stderr");
        let mut relay = Relay { child: None, port: 0, dir, stderr_path, options: self, work };
        let attempts = if relay.options.listen_port.is_some() { 1 } else { START_ATTEMPTS };
        let mut failures = Vec::new();
        for _ in 0..attempts {
            let port = relay.options.listen_port.unwrap_or_else(free_port);
            match relay.spawn(port) {
                Ok(()) => return relay,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("redis-relay did not start after {attempts} attempt(s):\n{}", failures.join("\n---\n"));
    }
}

/// The `redis-relay` binary as a child process, with its stderr captured to a file.
pub struct Relay {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    stderr_path: PathBuf,
    options: RelayBuilder,
    // Declared last: dropped after the child is killed.
    work: TempDir,
}

impl Relay {
    /// A builder for a relay of the master at `127.0.0.1:upstream_port`.
    pub fn builder(upstream_port: u16) -> RelayBuilder {
        RelayBuilder {
            upstream: format!("127.0.0.1:{upstream_port}"),
            user: None,
            password: None,
            dir: None,
            listen_port: None,
            requirepass: None,
            args: Vec::new(),
            env: Vec::new(),
            open_files_limit: None,
        }
    }

    /// Starts a relay of `master` with default options.
    pub fn start(master: &RedisServer) -> Relay {
        Relay::builder(master.port()).start()
    }

    /// The full command line (without the binary) for listen port `port`.
    fn command_args(&self, port: u16) -> Vec<String> {
        let o = &self.options;
        let mut args = vec![
            "--upstream".to_string(),
            o.upstream.clone(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--dir".to_string(),
            self.dir.display().to_string(),
        ];
        if let Some(user) = &o.user {
            args.extend(["--upstream-user".to_string(), user.clone()]);
        }
        if let Some(password) = &o.password {
            args.extend(["--upstream-password".to_string(), password.clone()]);
        }
        if let Some(password) = &o.requirepass {
            args.extend(["--requirepass".to_string(), password.clone()]);
        }
        args.extend(o.args.iter().cloned());
        args
    }

    /// Spawns the binary on `port` (stderr appended to the capture file) and waits for PING.
    fn spawn(&mut self, port: u16) -> Result<(), String> {
        let stderr =
            OpenOptions::new().create(true).append(true).open(&self.stderr_path).expect("open relay stderr file");
        let stdout = stderr.try_clone().expect("clone relay stderr file");
        let mut command = Command::new(relay_bin());
        command
            .args(self.command_args(port))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        for (key, value) in &self.options.env {
            command.env(key, value);
        }
        if let Some(limit) = self.options.open_files_limit {
            use std::os::unix::process::CommandExt;
            let rlim = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
            // SAFETY: between fork and exec only setrlimit runs, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| format!("cannot run {}: {e}", relay_bin()))?;
        let pid = child.id().to_string();
        let start = Instant::now();
        let mut last = String::from("not tried yet");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-relay on port {port} exited with {status}; stderr:\n{}",
                    tail(&self.stderr(), 20)
                ));
            }
            let answer = connect(port, None, self.options.requirepass.as_deref()).and_then(|mut con| {
                let pong: String = redis::cmd("PING").query(&mut con)?;
                // If INFO names a process id, it must be ours (the port may have been taken by
                // another test's process); a relay without process_id in INFO is accepted.
                let info: String = redis::cmd("INFO").arg("server").query(&mut con).unwrap_or_default();
                Ok((pong, parse_info_field(&info, "process_id")))
            });
            match answer {
                Ok((pong, pid_field)) if pong == "PONG" && pid_field.as_deref().is_none_or(|p| p == pid) => {
                    // Still ours and alive after answering?
                    if let Ok(None) = child.try_wait() {
                        self.port = port;
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Ok((pong, pid_field)) => {
                    last = format!("PING answered {pong:?}, process_id {pid_field:?} (ours: {pid})")
                }
                Err(error) => last = error.to_string(),
            }
            if start.elapsed() >= STARTUP_TIMEOUT {
                kill_child(&mut child);
                return Err(format!(
                    "redis-relay on port {port} did not answer PING within {STARTUP_TIMEOUT:?} (last: {last}); stderr:\n{}",
                    tail(&self.stderr(), 20)
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The relay's data directory (`--dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the cached snapshot: `<dir>/snapshot.rdb`.
    pub fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.rdb")
    }

    /// A new connection to the relay's listen port.
    pub fn conn(&self) -> Connection {
        connect(self.port, None, self.options.requirepass.as_deref())
            .unwrap_or_else(|e| panic!("connect to relay on port {}: {e}", self.port))
    }

    /// Runs `cmd` on a fresh connection; panics with the relay's stderr tail on error.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        connect(self.port, None, self.options.requirepass.as_deref())
            .and_then(|mut con| cmd.query::<T>(&mut con))
            .unwrap_or_else(|e| {
                panic!("relay on port {}: {}: {e}\nstderr:\n{}", self.port, command_name(cmd), tail(&self.stderr(), 20))
            })
    }

    /// `PING` answered with `PONG`?
    pub fn ping(&self) -> bool {
        connect(self.port, None, self.options.requirepass.as_deref())
            .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con))
            .is_ok_and(|pong| pong == "PONG")
    }

    pub fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section))
    }

    pub fn info_field(&self, section: &str, name: &str) -> Option<String> {
        parse_info_field(&self.info(section), name)
    }

    /// [`Self::info_field`] for polls that overlap a `CLIENT KILL TYPE normal` (Sentinel ends each
    /// repoint with one, which closes every normal client, the poll's own included, as
    /// redis-server does): a failed query is an `Err` to poll again, not a panic.
    pub fn try_info_field(&self, section: &str, name: &str) -> Result<Option<String>, String> {
        connect(self.port, None, self.options.requirepass.as_deref())
            .and_then(|mut con| redis::cmd("INFO").arg(section).query::<String>(&mut con))
            .map(|info| parse_info_field(&info, name))
            .map_err(|e| format!("INFO {section}: {e}"))
    }

    /// Everything the relay wrote to stderr/stdout so far (across restarts), ANSI colours removed.
    pub fn stderr(&self) -> String {
        let bytes = std::fs::read(&self.stderr_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&bytes))
    }

    /// How many stderr lines contain `needle`.
    pub fn stderr_count(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|line| line.contains(needle)).count()
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// How the process ended, once it has (`None` while it runs or after `kill`).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL) and reaps it. The directory and stderr capture remain.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Kills the process and starts it again with the same arguments, directory and listen port.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        // The old listener is gone with the process; the same port should bind at once, but allow
        // a moment for the kernel, within the startup deadline.
        let start = Instant::now();
        loop {
            match self.spawn(port) {
                Ok(()) => return,
                Err(failure) if start.elapsed() >= STARTUP_TIMEOUT => panic!("relay restart failed: {failure}"),
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// A file in the relay's private temporary directory (not its data directory).
    pub fn work_path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

impl InfoSource for Relay {
    fn info(&self, section: &str) -> String {
        Relay::info(self, section)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- redis-relay on port {} (last lines of its stderr) ---\n{}",
                self.port,
                tail(&self.stderr(), 60)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus endpoint
// ---------------------------------------------------------------------------------------------

/// Reads `/metrics` over plain HTTP/1.0.
pub fn scrape(port: u16) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut body);
    body
}

/// The value of the series `name{labels...}` whose label set contains every `(key, value)` given.
pub fn metric_value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name {
            return None;
        }
        let all_match = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all_match.then(|| value.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Kills and reaps a child we started (by its handle, never by name).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `command` to completion within `timeout`; returns (success, stdout, stderr).
pub fn run_with_deadline(mut command: Command, timeout: Duration, dir: &Path) -> (bool, String, String) {
    let out_path = dir.join("cmd.stdout");
    let err_path = dir.join("cmd.stderr");
    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("create stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("create stderr file"));
    let mut child = KillOnDrop(command.spawn().expect("spawn command"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() >= timeout {
            let out = std::fs::read_to_string(&out_path).unwrap_or_default();
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            panic!("{command:?} did not finish within {timeout:?}; stdout: {out}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    (status.success(), out, err)
}

// ---------------------------------------------------------------------------------------------
// Data and workloads
// ---------------------------------------------------------------------------------------------

/// A deterministic printable value of `len` bytes derived from `seed`.
pub fn value_of(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// Writes about `bytes` of stream to the master in pipelined bursts of 8 KB values.
pub fn write_stream(master: &RedisServer, bytes: usize, tag: &str) {
    const VALUE: usize = 8 * 1024;
    let mut con = master.conn();
    let count = bytes / VALUE + 1;
    for burst in 0..count.div_ceil(128) {
        let mut pipe = redis::pipe();
        for i in burst * 128..((burst + 1) * 128).min(count) {
            pipe.cmd("SET").arg(format!("{tag}:{}", i % 300)).arg(value_of(i as u64, VALUE)).ignore();
        }
        pipe.cmd("INCR").arg(format!("{tag}:bursts")).ignore();
        pipe.query::<()>(&mut con).expect("write burst");
    }
}

/// [`write_stream`] in steps of `step` bytes, waiting after each for `master` and then every one of
/// `followers` to reach the master's offset. A test whose replicas must stay connected through more
/// stream than the relay's `log_size` uses it: a replica more than `log_size` behind is dropped and
/// full-syncs, by design (as a Redis master drops a replica past its output-buffer limit), and how far
/// one burst lets a replica fall behind depends on the CPU the fan-out gets, not on the relay's
/// correctness.
pub fn write_stream_in_steps(
    master: &RedisServer,
    bytes: usize,
    step: usize,
    tag: &str,
    followers: &[&dyn InfoSource],
    timeout: Duration,
) {
    for start in (0..bytes).step_by(step) {
        write_stream(master, step.min(bytes - start), tag);
        for follower in followers {
            wait_in_sync(master, *follower, timeout);
        }
    }
}

/// The databases [`load_dataset`] fills.
pub const DATASET_DBS: [i64; 4] = [0, 1, 5, 15];

/// Fills several databases with every core type in both small (listpack/intset) and large
/// (hashtable/skiplist/quicklist) encodings, big strings, streams with consumer groups, and keys
/// with long TTLs (so nothing expires during a test). Leaves the connection in db 0.
pub fn load_dataset(con: &mut Connection, scale: usize) {
    for &db in &DATASET_DBS {
        redis::cmd("SELECT").arg(db).exec(con).expect("SELECT");
        let p = format!("db{db}");
        let mut pipe = redis::pipe();
        for i in 0..scale {
            let seed = (db as u64) << 32 | i as u64;
            pipe.cmd("SET").arg(format!("{p}:str:{i}")).arg(value_of(seed, 10 + i % 50)).ignore();
            pipe.cmd("SET").arg(format!("{p}:int:{i}")).arg(i as i64 * 7 - 1000).ignore();
            pipe.cmd("HSET")
                .arg(format!("{p}:hash:small:{}", i % 10))
                .arg(format!("f{i}"))
                .arg(value_of(seed, 8))
                .ignore();
            pipe.cmd("HSET").arg(format!("{p}:hash:big")).arg(format!("field{i}")).arg(value_of(seed, 100)).ignore();
            pipe.cmd("RPUSH").arg(format!("{p}:list:small:{}", i % 10)).arg(value_of(seed, 5)).ignore();
            pipe.cmd("RPUSH").arg(format!("{p}:list:big")).arg(value_of(seed, 80)).ignore();
            pipe.cmd("SADD").arg(format!("{p}:set:int")).arg(i as i64).ignore();
            pipe.cmd("SADD").arg(format!("{p}:set:str:{}", i % 10)).arg(value_of(seed, 6)).ignore();
            pipe.cmd("SADD").arg(format!("{p}:set:big")).arg(value_of(seed, 40)).ignore();
            pipe.cmd("ZADD")
                .arg(format!("{p}:zset:small:{}", i % 10))
                .arg(i as f64 / 3.0)
                .arg(value_of(seed, 7))
                .ignore();
            pipe.cmd("ZADD").arg(format!("{p}:zset:big")).arg(i as f64 * 1.5 - 10.0).arg(value_of(seed, 30)).ignore();
            pipe.cmd("XADD")
                .arg(format!("{p}:stream"))
                .arg("*")
                .arg("n")
                .arg(i)
                .arg("v")
                .arg(value_of(seed, 20))
                .ignore();
            if i % 5 == 0 {
                pipe.cmd("SET").arg(format!("{p}:ttl:{i}")).arg(i).arg("EX").arg(3600 + i).ignore();
            }
        }
        pipe.cmd("SET").arg(format!("{p}:big:string")).arg(value_of(db as u64, 300_000)).ignore();
        pipe.cmd("XGROUP").arg("CREATE").arg(format!("{p}:stream")).arg("group1").arg("0").ignore();
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("group1")
            .arg("consumer1")
            .arg("COUNT")
            .arg(3)
            .arg("STREAMS")
            .arg(format!("{p}:stream"))
            .arg(">")
            .ignore();
        pipe.cmd("HSET").arg(format!("{p}:hash:ttl")).arg("a").arg("1").ignore();
        pipe.cmd("EXPIRE").arg(format!("{p}:hash:ttl")).arg(7200).ignore();
        pipe.query::<()>(con).expect("load dataset");
    }
    redis::cmd("SELECT").arg(0).exec(con).expect("SELECT 0");
}

/// A mixed write workload of `rounds` rounds: strings, hashes, lists, sets, zsets, streams,
/// expiries (`SET EX`, `PEXPIRE`, short ones that expire during the run), MULTI/EXEC, EVAL,
/// SELECT across databases, FLUSHDB, big values, PUBLISH. Deterministic for a given `rounds`.
/// Leaves the connection in db 0.
pub fn mixed_workload(con: &mut Connection, rounds: usize) {
    for r in 0..rounds {
        let db = [0, 2, 3, 9][r % 4];
        redis::cmd("SELECT").arg(db).exec(con).expect("SELECT");
        let k = |name: &str| format!("w:{name}:{}", r % 7);
        let seed = r as u64;

        redis::cmd("SET").arg(k("s")).arg(value_of(seed, 32)).exec(con).expect("SET");
        redis::cmd("APPEND").arg(k("s")).arg("-tail").exec(con).expect("APPEND");
        redis::cmd("INCRBY").arg("w:counter").arg(r).exec(con).expect("INCRBY");
        redis::cmd("INCRBYFLOAT").arg("w:float").arg("1.25").exec(con).expect("INCRBYFLOAT");
        redis::cmd("MSET").arg(k("m1")).arg(r).arg(k("m2")).arg(r * 2).exec(con).expect("MSET");
        redis::cmd("GETSET").arg(k("gs")).arg(r).exec(con).expect("GETSET");
        redis::cmd("HSET").arg(k("h")).arg("a").arg(r).arg("b").arg(value_of(seed, 16)).exec(con).expect("HSET");
        redis::cmd("HINCRBY").arg(k("h")).arg("n").arg(3).exec(con).expect("HINCRBY");
        redis::cmd("HDEL").arg(k("h")).arg("a").exec(con).expect("HDEL");
        redis::cmd("LPUSH").arg(k("l")).arg(r).arg(r + 1).arg(r + 2).exec(con).expect("LPUSH");
        redis::cmd("RPOP").arg(k("l")).exec(con).expect("RPOP");
        redis::cmd("LTRIM").arg(k("l")).arg(0).arg(20).exec(con).expect("LTRIM");
        redis::cmd("LMOVE").arg(k("l")).arg(k("l2")).arg("LEFT").arg("RIGHT").exec(con).expect("LMOVE");
        redis::cmd("SADD").arg(k("set")).arg(r).arg(r % 3).arg("x").exec(con).expect("SADD");
        redis::cmd("SREM").arg(k("set")).arg(r % 3).exec(con).expect("SREM");
        redis::cmd("SPOP").arg(k("set")).exec(con).expect("SPOP");
        redis::cmd("ZADD").arg(k("z")).arg(r as f64).arg(format!("m{r}")).arg(0.5).arg("half").exec(con).expect("ZADD");
        redis::cmd("ZINCRBY").arg(k("z")).arg(2).arg("half").exec(con).expect("ZINCRBY");
        redis::cmd("ZPOPMIN").arg(k("z")).exec(con).expect("ZPOPMIN");
        redis::cmd("XADD")
            .arg("w:stream")
            .arg("MAXLEN")
            .arg("~")
            .arg(100)
            .arg("*")
            .arg("r")
            .arg(r)
            .exec(con)
            .expect("XADD");
        if r == 0 {
            let _ = redis::cmd("XGROUP").arg("CREATE").arg("w:stream").arg("g").arg("0").exec(con);
        }
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(2)
            .arg("STREAMS")
            .arg("w:stream")
            .arg(">")
            .query(con)
            .unwrap_or(redis::Value::Nil);
        // Expiries: long ones, and short ones that expire (and are propagated as DEL) mid-run.
        redis::cmd("SET").arg(k("ex")).arg(r).arg("EX").arg(1000).exec(con).expect("SET EX");
        redis::cmd("SET").arg(k("px")).arg(r).arg("PX").arg(30).exec(con).expect("SET PX");
        redis::cmd("SET").arg(k("pexp")).arg(r).exec(con).expect("SET");
        redis::cmd("PEXPIRE").arg(k("pexp")).arg(50).exec(con).expect("PEXPIRE");
        redis::cmd("EXPIRE").arg(k("h")).arg(5000).exec(con).expect("EXPIRE");
        redis::cmd("PERSIST").arg(k("h")).exec(con).expect("PERSIST");
        // MULTI/EXEC.
        let _: redis::Value = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("w:tx")
            .cmd("SET")
            .arg(k("txs"))
            .arg(value_of(seed + 1, 64))
            .cmd("LPUSH")
            .arg("w:txlist")
            .arg(r)
            .cmd("HSET")
            .arg("w:txhash")
            .arg(r)
            .arg(r)
            .query(con)
            .expect("MULTI/EXEC");
        // Scripts (effects replication wraps them in MULTI/EXEC).
        let _: redis::Value = redis::cmd("EVAL")
            .arg("redis.call('SET', KEYS[1], ARGV[1]); redis.call('INCR', KEYS[2]); return redis.call('RPUSH', KEYS[3], ARGV[1])")
            .arg(3)
            .arg(k("ev"))
            .arg("w:evcount")
            .arg("w:evlist")
            .arg(r)
            .query(con)
            .expect("EVAL");
        let _: redis::Value = redis::cmd("EVAL")
            .arg("return redis.call('DEL', KEYS[1])")
            .arg(1)
            .arg(k("m1"))
            .query(con)
            .expect("EVAL DEL");
        redis::cmd("PUBLISH").arg("w:channel").arg(r).exec(con).expect("PUBLISH");
        redis::cmd("DEL").arg(k("m2")).exec(con).expect("DEL");
        redis::cmd("UNLINK").arg(k("gs")).exec(con).expect("UNLINK");
        redis::cmd("RENAME").arg(k("s")).arg(k("s2")).exec(con).expect("RENAME");
        if r % 10 == 5 {
            redis::cmd("SET").arg("w:big").arg(value_of(seed, 512 * 1024)).exec(con).expect("SET big");
        }
        if r % 25 == 24 {
            redis::cmd("SELECT").arg(3).exec(con).expect("SELECT");
            redis::cmd("FLUSHDB").exec(con).expect("FLUSHDB");
        }
    }
    redis::cmd("SELECT").arg(0).exec(con).expect("SELECT 0");
}

/// Reads one RESP multibulk command from a peer (fake masters and replicas in the tests), skipping
/// newline keepalives; `None` when the peer is gone or sends something else.
pub fn read_command(reader: &mut std::io::BufReader<std::net::TcpStream>) -> Option<Vec<String>> {
    use std::io::{BufRead, Read};
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

/// Writes `count` SETs of 4000-byte values over `keys` keys named `prefix:N`, pipelined by 100.
pub fn write_4k_values(master: &RedisServer, prefix: &str, count: u64, keys: u64) {
    let mut con = master.conn();
    for batch in 0..count / 100 {
        let mut pipe = redis::pipe();
        for n in batch * 100..(batch + 1) * 100 {
            pipe.cmd("SET").arg(format!("{prefix}:{}", n % keys)).arg(value_of(n, 4000)).ignore();
        }
        pipe.query::<()>(&mut con).unwrap();
    }
}

/// Sends SIGSTOP or SIGCONT to a server.
pub fn signal_server(server: &RedisServer, name: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{name}")).arg(server.pid().to_string()).status().unwrap();
    assert!(status.success(), "kill -{name} {}", server.pid());
}
