//! The downstream side: the relay as a master on its listen address.
//!
//! Each connection is a client session that answers the commands redis-cli, Sentinel and exporters
//! use (`PING`, `AUTH`, `INFO`, `ROLE`, `CLIENT`, pub/sub, ...) and the replica handshake (`REPLCONF`).
//! A `PSYNC` or `SYNC` turns the session into a replica, served by [`replica`] from the snapshot cache
//! and the log; a `SUBSCRIBE` or `PSUBSCRIBE` puts it in subscribed mode, fed by [`pubsub`].

pub mod clients;
mod commands;
mod connection;
mod glob;
pub mod guard;
pub mod info;
pub mod memory;
pub mod pubsub;
pub mod replica;
pub mod tail;
pub mod users;
mod zero_copy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::context::{RelayContext, ServedStats};
use crate::offset::Position;
use crate::protocol::{string2ll_str, ClientCommand, CommandLimits, Reply};
use crate::tls::{Stream, TlsAcceptor};
use clients::{ClientHandle, ClientType, KillFilter, KillType};
pub use connection::{ClientConnection, ClientError};
use pubsub::{Kind, Subscriber};
use users::Identity;

/// Whether clients may repoint the relay with `REPLICAOF`/`SLAVEOF` (`replicaof`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaofPolicy {
    Allow,
    /// Refused with an error, like `rename-command REPLICAOF ""` on redis-server.
    Deny,
}

impl ReplicaofPolicy {
    pub fn parse(text: &str) -> Option<ReplicaofPolicy> {
        match text.to_ascii_lowercase().as_str() {
            "allow" => Some(ReplicaofPolicy::Allow),
            "deny" => Some(ReplicaofPolicy::Deny),
            _ => None,
        }
    }
}

/// Replica states as `INFO replication` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    WaitBgsave,
    SendBulk,
    Online,
}

impl ReplicaState {
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::WaitBgsave => "wait_bgsave",
            ReplicaState::SendBulk => "send_bulk",
            ReplicaState::Online => "online",
        }
    }
}

/// One replica's row in `INFO replication` and `ROLE`.
#[derive(Debug, Clone)]
pub struct ReplicaEntry {
    pub ip: String,
    /// As announced (`REPLCONF listening-port`): redis-server keeps any integer, in a C `int`.
    pub port: i32,
    pub state: ReplicaState,
    /// The last `REPLCONF ACK <offset>`: the position the replica holds.
    pub ack_offset: Position,
    /// The position the replica's cursor has sent up to (never behind `ack_offset` once streaming):
    /// the memory tail is released behind the lowest of these ([`tail`]). Its own atomic, shared
    /// with the replica's task, so a send does not take the table's lock.
    pub sent: Arc<AtomicU64>,
    pub ack_time: Instant,
    /// Whether the replica ACKed on this link yet: a replica still loading its RDB does not, and
    /// cannot serve a snapshot either.
    pub acked: bool,
    /// Whether the replica came in through the TLS listener. A redis-server replica with
    /// `tls-replication yes` then announces its TLS port as its listening port, so a snapshot
    /// request to it must speak TLS too.
    pub tls: bool,
}

/// The replicas attached to a relay. Each row is written only by its replica's task.
#[derive(Debug)]
pub struct ReplicaTable {
    next_id: AtomicU64,
    rows: Mutex<BTreeMap<u64, ReplicaEntry>>,
    /// Bumped on every ACK from a replica, so the upstream link can pass end-to-end ACKs on at once.
    acks: watch::Sender<u64>,
}

impl Default for ReplicaTable {
    fn default() -> Self {
        ReplicaTable { next_id: AtomicU64::new(0), rows: Mutex::new(BTreeMap::new()), acks: watch::channel(0).0 }
    }
}

/// A replica whose last ACK is older than this does not count towards `ack_replicas`: the master
/// must see the relay fall silent when its replicas do (`min-replicas-max-lag`). Redis replicas ACK
/// every second.
pub const ACK_FRESHNESS: std::time::Duration = std::time::Duration::from_secs(2);

impl ReplicaEntry {
    /// A new row's `sent`: the cursor starts at `position`.
    pub fn sent_from(position: Position) -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(position.get()))
    }

    /// Where the replica's cursor is ([`ReplicaEntry::sent`]).
    pub fn sent_offset(&self) -> Position {
        Position::new(self.sent.load(Ordering::Relaxed))
    }
}

impl ReplicaTable {
    fn rows(&self) -> MutexGuard<'_, BTreeMap<u64, ReplicaEntry>> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Vec<ReplicaEntry> {
        self.rows().values().cloned().collect()
    }

    /// The offset at least `k` online replicas have ACKed within [`ACK_FRESHNESS`] (the k-th
    /// highest ACK offset); `None` when fewer than `k` replicas qualify.
    pub fn acked_by(&self, k: usize) -> Option<Position> {
        if k == 0 {
            return None;
        }
        let mut offsets: Vec<Position> = self
            .rows()
            .values()
            .filter(|r| r.state == ReplicaState::Online && r.ack_time.elapsed() <= ACK_FRESHNESS)
            .map(|r| r.ack_offset)
            .collect();
        if offsets.len() < k {
            return None;
        }
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        Some(offsets[k - 1])
    }

    /// Changes on every replica ACK.
    pub fn subscribe_acks(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }

    pub fn register(self: &Arc<Self>, entry: ReplicaEntry) -> ReplicaRow {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.rows().insert(id, entry);
        ReplicaRow { table: self.clone(), id }
    }
}

/// A replica's handle on its row; removes it when dropped.
pub struct ReplicaRow {
    table: Arc<ReplicaTable>,
    id: u64,
}

impl ReplicaRow {
    pub fn update(&self, change: impl FnOnce(&mut ReplicaEntry)) {
        if let Some(entry) = self.table.rows().get_mut(&self.id) {
            change(entry);
        }
    }

    /// The row as it is now.
    pub fn entry(&self) -> Option<ReplicaEntry> {
        self.table.rows().get(&self.id).cloned()
    }

    /// Records `REPLCONF ACK <offset>` from the replica, and tells whoever watches the ACKs.
    pub fn acked(&self, offset: Position) {
        self.update(|r| {
            r.ack_offset = r.ack_offset.max(offset);
            r.ack_time = Instant::now();
            r.acked = true;
        });
        self.table.acks.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Drop for ReplicaRow {
    fn drop(&mut self) {
        self.table.rows().remove(&self.id);
    }
}

/// What a replica announced during its handshake (`REPLCONF`).
#[derive(Debug, Clone, Default)]
pub struct ReplicaHandshake {
    pub listening_port: i32,
    pub ip_address: Option<String>,
    pub capa_eof: bool,
    pub capa_psync2: bool,
    pub rdb_only: bool,
    /// A relay above asks for the cached snapshot as it is (`capa relay-snapshot`).
    pub capa_relay_snapshot: bool,
    /// `REPLCONF rdb-filter-only`: what the RDB keeps (redis-cli --functions-rdb).
    pub rdb_filter: Option<crate::snapshot::RdbFilter>,
    /// `REPLCONF version x.y.z` (Valkey 8+ replicas), as given and as `version2num` reads it.
    pub version: Option<(String, u32)>,
}

/// redis-server's reply to a connection over `maxclients`, written before closing it.
const MAX_CLIENTS_REACHED: &[u8] = b"-ERR max number of clients reached\r\n";

/// Whether the relay's listeners are bound, and how often binding failed. The listener tasks write
/// it; INFO (`relay_listeners_unbound`) and the metrics (`redis_relay_listener_up`,
/// `redis_relay_listen_errors_total`) read it.
#[derive(Debug, Default)]
pub struct ListenerStatus {
    pub plain_bound: AtomicBool,
    pub tls_bound: AtomicBool,
    pub bind_errors: AtomicU64,
}

impl ListenerStatus {
    /// Listeners configured but not bound.
    pub fn unbound(&self, config: &crate::config::RelayConfig) -> u64 {
        let plain = u64::from(config.listen.is_some() && !self.plain_bound.load(Ordering::Relaxed));
        let tls = u64::from(config.tls.is_some() && !self.tls_bound.load(Ordering::Relaxed));
        plain + tls
    }
}

/// The first attempt to bind a listener, at the relay's start; a failure is an ERROR here and
/// counted, and [`listen`] tries again.
pub async fn bind_now(addr: SocketAddr, status: &ListenerStatus) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            status.bind_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%addr, "cannot listen: {error}; retrying every second");
            None
        }
    }
}

/// How often a listener that cannot bind tries again.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds `addr` (or takes `bound`, the first attempt's listener) and serves it. A port that cannot
/// be bound (still held by a process going away, or taken by mistake) is reported and tried again
/// every second until shutdown: the relay's other tasks, and the process's other relays, run
/// meanwhile.
pub async fn listen(
    bound: Option<TcpListener>,
    addr: SocketAddr,
    tls: Option<Arc<TlsAcceptor>>,
    context: Arc<RelayContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let kind = if tls.is_some() { "tls" } else { "plain" };
    let flag = if tls.is_some() { &context.listeners.tls_bound } else { &context.listeners.plain_bound };
    let mut failures = 0u64;
    let mut throttle = crate::limits::LogThrottle::new(std::time::Duration::from_secs(30));
    let listener = match bound {
        Some(listener) => listener,
        None => loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(error) => {
                    failures += 1;
                    context.listeners.bind_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = throttle.ready() {
                        tracing::error!(%addr, listener = kind, failures, suppressed, "cannot listen: {error}; retrying every second");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(BIND_RETRY) => {}
                        _ = crate::shutdown::stopped(&mut shutdown) => return,
                    }
                }
            }
        },
    };
    if failures > 0 {
        tracing::info!(%addr, listener = kind, failures, "listening after failed attempts");
    }
    flag.store(true, Ordering::Relaxed);
    serve(listener, tls, context.clone(), shutdown).await;
    flag.store(false, Ordering::Relaxed);
}

/// Accepts connections until shutdown; with `tls`, each one starts with a TLS handshake. A
/// connection beyond `maxclients` (or beyond what the process's descriptor budget leaves after the
/// reserves) gets redis-server's error (plain connections; a TLS one is just closed) and is closed.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<TlsAcceptor>>,
    context: Arc<RelayContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut accept_errors = crate::limits::LogThrottle::new(std::time::Duration::from_secs(1));
    // Every session of this listener: waited for at shutdown, so that once `serve` returns no
    // session holds the relay's context, address or directory any more.
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            // Reaps finished sessions as they end.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    ServedStats::add(&context.stats.connections, 1);
                    let Some(slot) = context.client_slots.try_acquire() else {
                        ServedStats::add(&context.stats.rejected_connections, 1);
                        // As redis-server: one non-blocking write of the error, then close.
                        if tls.is_none() {
                            let _ = tcp.try_write(MAX_CLIENTS_REACHED);
                        }
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let context = context.clone();
                    let shutdown = shutdown.clone();
                    let tls = tls.clone();
                    let (laddr, fd) = (tcp.local_addr().ok(), std::os::fd::AsRawFd::as_raw_fd(&tcp).into());
                    sessions.spawn(async move {
                        let _slot = slot;
                        let stream = match tls {
                            None => Stream::Plain(tcp),
                            Some(tls) => {
                                match tokio::time::timeout(context.config.repl_timeout, tls.accept(tcp)).await {
                                    Ok(Ok(stream)) => stream,
                                    Ok(Err(error)) => {
                                        tracing::info!(addr = %peer, "TLS handshake failed: {error}");
                                        return;
                                    }
                                    Err(_) => {
                                        tracing::info!(addr = %peer, "TLS handshake timed out");
                                        return;
                                    }
                                }
                            }
                        };
                        let identity = initial_identity(&context);
                        let (client, mut killed) = context.clients.register(peer, laddr, fd);
                        let memory = context.client_memory.register(client.id(), client.killer());
                        let mut session = Session {
                            conn: ClientConnection::new(stream).with_memory(memory),
                            peer,
                            context,
                            handshake: ReplicaHandshake::default(),
                            transaction: None,
                            transaction_dirty: false,
                            identity,
                            client,
                            subscriber: None,
                            unflushed_messages: 0,
                            close_after_reply: false,
                        };
                        let mut stop = shutdown.clone();
                        // Whatever the session is doing (a long RDB transfer, a flush to a client
                        // that stopped reading), shutdown or a kill (`CLIENT KILL`, a pub/sub
                        // output-buffer limit) ends it, so the relay's directory and address are
                        // free for a restart and a stuck client costs nothing more.
                        tokio::select! {
                            result = session.run(shutdown) => if let Err(error) = result {
                                tracing::debug!(addr = %peer, "client connection ended: {error}");
                            },
                            _ = crate::shutdown::stopped(&mut stop) => {}
                            _ = crate::shutdown::stopped(&mut killed) => {
                                tracing::debug!(addr = %peer, "client connection killed");
                            }
                        }
                    }.in_current_span());
                }
                Err(error) => {
                    ServedStats::add(&context.stats.accept_errors, 1);
                    if let Some(suppressed) = accept_errors.ready() {
                        tracing::warn!(suppressed, "accept failed: {error}");
                    }
                    // Out of file descriptors and the like: give the system a moment instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => break,
        }
    }
    // Sessions end on the same signal; the listener goes first so that the port is free as soon as
    // the last of them has closed.
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

/// A client connection that has not (yet) become a replica.
pub struct Session {
    pub conn: ClientConnection,
    pub peer: SocketAddr,
    pub context: Arc<RelayContext>,
    pub handshake: ReplicaHandshake,
    /// Commands queued since `MULTI` (Sentinel wraps its reconfiguration in a transaction).
    pub transaction: Option<Vec<ClientCommand>>,
    /// Who the session is: `None` until `AUTH` succeeds when the default user has a password or
    /// is off; the roles decide what it may run.
    pub identity: Option<Identity>,
    /// A command was refused while queueing a transaction: `EXEC` discards it (redis-server's
    /// `CLIENT_DIRTY_EXEC`).
    transaction_dirty: bool,
    /// This session's row in the relay's client table (`CLIENT ID`, `CLIENT KILL`).
    pub client: ClientHandle,
    /// Pub/sub subscriptions, from the first `(P)SUBSCRIBE` on.
    subscriber: Option<Subscriber>,
    /// Bytes of pub/sub messages queued on the connection and not yet written.
    unflushed_messages: u64,
    /// `CLIENT KILL ... SKIPME no` selected this session: reply, then close (as redis-server).
    close_after_reply: bool,
}

/// What handling a command leads to.
enum Next {
    Reply(Reply),
    /// Several replies to one command (`SUBSCRIBE a b` answers once per channel).
    Replies(Vec<Reply>),
    NoReply,
    Close(Reply),
    BecomeReplica,
}

/// The commands a RESP2 client may send in subscribed mode.
const SUBSCRIBED_MODE_COMMANDS: [&str; 7] =
    ["PING", "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "QUIT", "RESET"];

/// Every command [`Session::dispatch`] knows (in subscribed mode the others are refused by name,
/// unknown ones as unknown).
const KNOWN_COMMANDS: [&str; 31] = [
    "PING",
    "LATENCY",
    "SLOWLOG",
    "HELLO",
    "DBSIZE",
    "TIME",
    "LASTSAVE",
    "ECHO",
    "AUTH",
    "INFO",
    "ROLE",
    "COMMAND",
    "CLIENT",
    "SELECT",
    "QUIT",
    "RESET",
    "REPLCONF",
    "PSYNC",
    "SYNC",
    "REPLICAOF",
    "SLAVEOF",
    "CONFIG",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PSUBSCRIBE",
    "PUNSUBSCRIBE",
    "PUBLISH",
    "MULTI",
    "EXEC",
    "DISCARD",
    "RELAY",
];

/// The identity a new (or `RESET`) session starts with: `default` when it has no password.
fn initial_identity(context: &RelayContext) -> Option<Identity> {
    let config = &context.config;
    match users::DefaultUser::of(config.requirepass.as_deref(), &config.users) {
        users::DefaultUser::NoPass => Some(Identity::default_user()),
        _ => None,
    }
}

/// Waits for the next pub/sub message; never resolves for a session without subscriptions.
async fn next_message(subscriber: &mut Option<Subscriber>) -> Option<Bytes> {
    match subscriber {
        Some(subscriber) => subscriber.recv().await,
        None => std::future::pending().await,
    }
}

/// Reply bytes a pipelining client's session gathers before it writes them.
const OUTPUT_BATCH: usize = 64 * 1024;

/// Most message bytes gathered into one write.
const MESSAGE_BATCH: u64 = 64 * 1024;

impl Session {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ClientError> {
        let idle_limit = self.context.config.timeout;
        loop {
            // redis-server's `timeout`: idle normal clients are closed; subscribers are exempt.
            let idle_timeout = !idle_limit.is_zero() && !self.subscribed();
            let command = tokio::select! {
                command = self.conn.next_command(self.command_limits()) => command,
                _ = tokio::time::sleep(idle_limit), if idle_timeout => return Ok(()),
                Some(message) = next_message(&mut self.subscriber) => {
                    self.queue_message(message);
                    self.queue_waiting_messages();
                    self.flush().await?;
                    continue;
                }
                _ = crate::shutdown::stopped(&mut shutdown) => return Ok(()),
            };
            // Messages published before this command go out before its reply.
            self.queue_waiting_messages();
            let command = match command {
                Ok(command) => command,
                Err(ClientError::Protocol(error)) => {
                    self.conn.queue(&Reply::error(format!("ERR Protocol error: {error}")));
                    self.conn.flush().await?;
                    return Err(error.into());
                }
                Err(other) => return Err(other),
            };
            ServedStats::add(&self.context.stats.commands, 1);
            self.client.command_started(&command.args);
            match self.dispatch_in_transaction(command.clone()).await {
                Next::Reply(reply) if self.client.reply_wanted() => self.conn.queue(&reply),
                Next::Reply(_) => {}
                Next::Replies(replies) => replies.iter().for_each(|reply| self.conn.queue(reply)),
                Next::NoReply => {}
                Next::Close(reply) => {
                    self.conn.queue(&reply);
                    return self.flush().await;
                }
                Next::BecomeReplica => {
                    self.flush().await?;
                    self.client.set_type(ClientType::Replica);
                    self.conn.set_memory_exempt(true);
                    match replica::serve(self, &command, shutdown.clone()).await {
                        Ok(replica::Outcome::Refused) => {
                            self.client.set_type(ClientType::Normal);
                            self.conn.set_memory_exempt(false);
                            continue;
                        }
                        Ok(replica::Outcome::Done) => return Ok(()),
                        Err(error) => return Err(error),
                    }
                }
            }
            if self.transaction.is_none() {
                self.conn.queued_input = 0;
            }
            if self.close_after_reply {
                return self.flush().await;
            }
            // Pipelined replies go out in batches: a client that sends faster than it reads holds
            // at most one batch here, the rest waits in its socket (backpressure, not memory).
            if !self.conn.has_buffered_input() || self.conn.pending_output() >= OUTPUT_BATCH {
                self.flush().await?;
            }
        }
    }

    /// redis-server's caps before `AUTH` when a password is required, its normal ones after.
    fn command_limits(&self) -> CommandLimits {
        if self.authenticated() {
            CommandLimits::AUTHENTICATED
        } else {
            CommandLimits::UNAUTHENTICATED
        }
    }

    pub fn authenticated(&self) -> bool {
        self.identity.is_some()
    }

    fn roles(&self) -> users::Roles {
        self.identity.as_ref().map_or(users::Roles::NONE, |identity| identity.roles)
    }

    /// A command refused before it runs, as redis-server's `rejectCommand`: a refused `EXEC`
    /// discards the transaction, any other refusal inside one makes `EXEC` discard it.
    fn reject(&mut self, name: &str, refusal: Reply) -> Next {
        if name == "EXEC" {
            self.transaction = None;
            self.transaction_dirty = false;
            if let Reply::Error(text) = &refusal {
                return Next::Reply(Reply::error(format!("EXECABORT Transaction discarded because of: {text}")));
            }
        } else if self.transaction.is_some() {
            self.transaction_dirty = true;
        }
        Next::Reply(refusal)
    }

    /// Whether the session's user may run `command`; counts and returns the `NOPERM` refusal.
    fn permission(&self, command: &ClientCommand) -> Result<(), Reply> {
        users::check(self.roles(), command).map_err(|refusal| {
            ServedStats::add(&self.context.stats.acl_denied_cmd, 1);
            Reply::error(refusal)
        })
    }

    fn queue_message(&mut self, message: Bytes) {
        self.unflushed_messages += message.len() as u64;
        self.conn.queue_raw(&message);
    }

    /// Queues the messages already in the mailbox, up to one batch.
    fn queue_waiting_messages(&mut self) {
        while self.unflushed_messages < MESSAGE_BATCH {
            let Some(message) = self.subscriber.as_mut().and_then(Subscriber::try_recv) else {
                break;
            };
            self.queue_message(message);
        }
    }

    /// Writes what is queued; written messages no longer count against the output-buffer limit.
    async fn flush(&mut self) -> Result<(), ClientError> {
        self.conn.flush().await?;
        if let Some(subscriber) = &self.subscriber {
            subscriber.written(std::mem::take(&mut self.unflushed_messages));
        }
        Ok(())
    }

    /// Whether the session is in RESP2 subscribed mode (at least one channel or pattern).
    fn subscribed(&self) -> bool {
        self.subscriber.as_ref().is_some_and(|s| s.count() > 0)
    }

    /// `SUBSCRIBE`/`PSUBSCRIBE`: one `[kind, name, count]` reply per name, as redis-server.
    fn subscribe(&mut self, kind: Kind, command: &ClientCommand) -> Next {
        let verb = if kind == Kind::Channel { "subscribe" } else { "psubscribe" };
        if command.args.len() < 2 {
            return Next::Reply(wrong_arity(verb));
        }
        let client = &self.client;
        let pubsub = &self.context.pubsub;
        let subscriber = self.subscriber.get_or_insert_with(|| pubsub.subscriber(client.killer()));
        let replies = command.args[1..]
            .iter()
            .map(|name| {
                subscriber.subscribe(kind, name);
                Reply::Array(vec![
                    Reply::bulk(verb),
                    Reply::Bulk(name.clone()),
                    Reply::Integer(subscriber.count() as i64),
                ])
            })
            .collect();
        self.client.set_type(ClientType::Pubsub);
        Next::Replies(replies)
    }

    /// `UNSUBSCRIBE`/`PUNSUBSCRIBE`: the named ones, or all; with nothing to leave, one reply with a
    /// nil name.
    fn unsubscribe(&mut self, kind: Kind, command: &ClientCommand) -> Next {
        let verb = if kind == Kind::Channel { "unsubscribe" } else { "punsubscribe" };
        let names = match (&self.subscriber, command.args.len()) {
            (_, argc) if argc > 1 => command.args[1..].to_vec(),
            (Some(subscriber), _) => subscriber.names(kind),
            (None, _) => Vec::new(),
        };
        let count = |subscriber: &Option<Subscriber>| subscriber.as_ref().map_or(0, |s| s.count()) as i64;
        if names.is_empty() {
            return Next::Reply(Reply::Array(vec![
                Reply::bulk(verb),
                Reply::Nil,
                Reply::Integer(count(&self.subscriber)),
            ]));
        }
        let mut replies = Vec::new();
        for name in names {
            if let Some(subscriber) = self.subscriber.as_mut() {
                subscriber.unsubscribe(kind, &name);
            }
            replies.push(Reply::Array(vec![
                Reply::bulk(verb),
                Reply::Bulk(name),
                Reply::Integer(count(&self.subscriber)),
            ]));
        }
        if !self.subscribed() {
            self.client.set_type(ClientType::Normal);
        }
        Next::Replies(replies)
    }

    /// `RESET`: leaves subscribed mode and any transaction, and authentication (as redis-server).
    fn reset(&mut self) -> Reply {
        self.subscriber = None;
        self.unflushed_messages = 0;
        self.transaction = None;
        self.transaction_dirty = false;
        self.set_identity(initial_identity(&self.context));
        self.client.set_type(ClientType::Normal);
        Reply::Simple("RESET".into())
    }

    /// `CLIENT KILL addr` or `CLIENT KILL [ID id] [TYPE type] [ADDR addr] [SKIPME yes|no]`, with
    /// redis-server's replies and errors. `TYPE master` restarts the upstream link (a Redis replica
    /// kills its master client, which reconnects and continues with PSYNC).
    fn client_kill(&mut self, command: &ClientCommand) -> Reply {
        let argc = command.args.len();
        if argc < 3 {
            return wrong_arity("client|kill");
        }
        let own = self.client.id();
        let own_addr = self.peer.to_string();
        if argc == 3 {
            let addr = command.arg_str(2);
            if addr == own_addr {
                self.close_after_reply = true;
                return Reply::ok();
            }
            let filter = KillFilter { addr: Some(addr), skip: Some(own), ..KillFilter::default() };
            return match self.context.clients.kill(&filter) {
                0 => Reply::error("ERR No such client"),
                _ => Reply::ok(),
            };
        }
        if argc % 2 == 1 {
            return Reply::error("ERR syntax error");
        }
        let mut filter = KillFilter::default();
        let mut skip_me = true;
        for pair in command.args[2..].chunks(2) {
            let value = String::from_utf8_lossy(&pair[1]).into_owned();
            match String::from_utf8_lossy(&pair[0]).to_ascii_lowercase().as_str() {
                "id" => match value.parse::<u64>() {
                    Ok(id) if id > 0 => filter.id = Some(id),
                    _ => return Reply::error("ERR client-id should be greater than 0"),
                },
                "type" => match KillType::parse(&value) {
                    Some(kind) => filter.kind = Some(kind),
                    None => return Reply::error(format!("ERR Unknown client type '{value}'")),
                },
                "addr" => filter.addr = Some(value),
                "skipme" => match value.to_ascii_lowercase().as_str() {
                    "yes" => skip_me = true,
                    "no" => skip_me = false,
                    _ => return Reply::error("ERR syntax error"),
                },
                _ => return Reply::error("ERR syntax error"),
            }
        }
        if filter.kind == Some(KillType::Master) {
            // The relay's one master client is its upstream link.
            if filter.id.is_some() || filter.addr.is_some() {
                return Reply::Integer(0);
            }
            tracing::info!(addr = %self.peer, "CLIENT KILL TYPE master: restarting the upstream link");
            self.context.upstream_target.send_modify(|_| {});
            return Reply::Integer(1);
        }
        let own_type = if self.subscribed() { ClientType::Pubsub } else { ClientType::Normal };
        let selects_self = !skip_me
            && filter.id.is_none_or(|id| id == own)
            && filter.addr.as_ref().is_none_or(|addr| *addr == own_addr)
            && filter.kind.is_none_or(|kind| kind == KillType::Sessions(own_type));
        // This session is never killed through its signal: it must still send this reply.
        filter.skip = Some(own);
        let mut killed = self.context.clients.kill(&filter);
        if selects_self {
            self.close_after_reply = true;
            killed += 1;
        }
        Reply::Integer(killed as i64)
    }

    /// MULTI/EXEC/DISCARD around [`Self::dispatch`], as far as a relay needs them; and the RESP2
    /// subscribed-mode gate, which redis-server applies before queueing.
    async fn dispatch_in_transaction(&mut self, command: ClientCommand) -> Next {
        let name = command.name();
        // As redis-server's processCommand: before AUTH only the no-auth commands (AUTH, HELLO,
        // QUIT, RESET) run, and nothing is queued, so MULTI itself is refused.
        if !self.authenticated()
            && !command.args.is_empty()
            && !matches!(name.as_str(), "AUTH" | "HELLO" | "QUIT" | "RESET")
        {
            // A refused EXEC discards the transaction, in redis-server's words.
            if name == "EXEC" {
                return Next::Reply(Reply::error(
                    "EXECABORT Transaction discarded because of: NOAUTH Authentication required.",
                ));
            }
            return Next::Reply(Reply::error("NOAUTH Authentication required."));
        }
        // Then, as redis-server's processCommand, the arity (from the `COMMAND` table: nothing of
        // a command with the wrong number of arguments runs) and the user's roles.
        if !command.args.is_empty() && !self.arity_ok(&command) {
            return self.reject(&name, wrong_arity(&name.to_ascii_lowercase()));
        }
        if let Some(Err(noperm)) = (!command.args.is_empty()).then(|| users::check(self.roles(), &command)) {
            ServedStats::add(&self.context.stats.acl_denied_cmd, 1);
            return self.reject(&name, Reply::error(noperm));
        }
        if self.subscribed() && !command.args.is_empty() && !SUBSCRIBED_MODE_COMMANDS.contains(&name.as_str()) {
            if !KNOWN_COMMANDS.contains(&name.as_str()) {
                return Next::Reply(unknown_command(&command));
            }
            return Next::Reply(Reply::error(format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                name.to_ascii_lowercase()
            )));
        }
        match (name.as_str(), self.transaction.is_some()) {
            // redis-server runs these at once even inside a transaction.
            ("QUIT" | "RESET", true) => self.dispatch(&command).await,
            ("MULTI", true) => Next::Reply(Reply::error("ERR MULTI calls can not be nested")),
            ("MULTI", false) => {
                self.transaction = Some(Vec::new());
                Next::Reply(Reply::ok())
            }
            ("EXEC", false) => Next::Reply(Reply::error("ERR EXEC without MULTI")),
            ("DISCARD", false) => Next::Reply(Reply::error("ERR DISCARD without MULTI")),
            ("DISCARD", true) => {
                self.transaction = None;
                self.transaction_dirty = false;
                Next::Reply(Reply::ok())
            }
            ("EXEC", true) if self.transaction_dirty => {
                self.transaction = None;
                self.transaction_dirty = false;
                Next::Reply(Reply::error("EXECABORT Transaction discarded because of previous errors."))
            }
            ("EXEC", true) => {
                let queued = self.transaction.take().unwrap_or_default();
                let mut replies = Vec::new();
                for queued in &queued {
                    // An AUTH queued in the transaction may have changed the user: checked again.
                    if let Err(refusal) = self.permission(queued) {
                        replies.push(refusal);
                        continue;
                    }
                    match self.dispatch(queued).await {
                        Next::Reply(reply) => replies.push(reply),
                        Next::Replies(several) => replies.extend(several),
                        Next::NoReply => replies.push(Reply::Nil),
                        Next::Close(_) | Next::BecomeReplica => {
                            replies.push(Reply::error("ERR command not allowed inside a transaction"))
                        }
                    }
                }
                Next::Reply(Reply::Array(replies))
            }
            (_, true) if !command.args.is_empty() => {
                // Copied out of the read buffer, so a queued command pins only its own bytes (and
                // the accounting below is what it holds).
                let command = ClientCommand { args: command.args.iter().map(|a| Bytes::copy_from_slice(a)).collect() };
                if let Some(queue) = self.transaction.as_mut() {
                    // The queue counts against client-query-buffer-limit and maxmemory-clients.
                    self.conn.queued_input += queued_size(&command);
                    queue.push(command);
                }
                Next::Reply(Reply::Simple("QUEUED".into()))
            }
            _ => self.dispatch(&command).await,
        }
    }

    /// `REPLICAOF host port` repoints the upstream link and keeps the log and the replicas below
    /// (they continue, as under a Redis replica); `REPLICAOF NO ONE` is refused: the relay has no
    /// dataset and must never be promoted. The target is checked first (port 1-65535, a host name
    /// of at most 255 bytes that resolves), and with `replicaof: deny` the command is refused
    /// altogether. A new master with another, much smaller history is held like any history reset.
    async fn replicaof(&self, command: &ClientCommand) -> Reply {
        let name = command.name().to_ascii_lowercase();
        if self.context.config.replicaof == ReplicaofPolicy::Deny {
            return Reply::error(format!(
                "ERR {} is disabled on this relay (replicaof: deny); change its upstream in the configuration",
                name.to_ascii_uppercase()
            ));
        }
        if command.args.len() != 3 {
            return wrong_arity(&name);
        }
        let (host, port) = (command.arg_str(1), command.arg_str(2));
        if host.eq_ignore_ascii_case("no") && port.eq_ignore_ascii_case("one") {
            return Reply::error(
                "ERR redis-relay has no dataset of its own and cannot be promoted: REPLICAOF NO ONE refused",
            );
        }
        let target = match check_replicaof_target(&host, &port).await {
            Ok(target) => target,
            Err(message) => return Reply::error(message),
        };
        if *self.context.upstream_target.borrow() == target {
            return Reply::Simple("OK Already connected to specified master".into());
        }
        tracing::info!(addr = %self.peer, master = %target, "REPLICAOF: repointing the upstream link");
        self.context.upstream_target.send_replace(target);
        Reply::ok()
    }

    /// `RELAY HISTORY ACCEPT`: the operator's consent to follow the held history (the relay then
    /// full-syncs it and its replicas start over on it). Behind `AUTH` when `requirepass` is set,
    /// like every command.
    fn relay_command(&self, command: &ClientCommand) -> Reply {
        let words: Vec<String> =
            command.args[1..].iter().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase()).collect();
        match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["HISTORY", "ACCEPT"] => {
                let held = self.context.upstream.borrow().history_held.clone();
                let Some(held) = held else {
                    return Reply::error("ERR no history reset is held: nothing to accept");
                };
                tracing::warn!(
                    peer = %self.peer,
                    new_replid = %held.new_replid,
                    new_keys = held.new_keys.keys,
                    old_keys = held.old_keys,
                    "RELAY HISTORY ACCEPT: following the master's new history"
                );
                self.context.history_accept.send_replace(Some(held.new_replid));
                Reply::ok()
            }
            ["HELP"] => Reply::Array(
                [
                    "RELAY <subcommand>",
                    "HISTORY ACCEPT",
                    "    Follow the master's new history that is held (see INFO relay).",
                ]
                .iter()
                .map(|line| Reply::Simple(line.to_string()))
                .collect(),
            ),
            _ => Reply::error(format!(
                "ERR unknown subcommand or wrong number of arguments for 'RELAY {}'. Try RELAY HELP.",
                words.join(" ")
            )),
        }
    }

    /// `AUTH [user] password`, like redis-server with `requirepass` as the default user's password
    /// and the relay's `users:`. A failed AUTH leaves the session as it was.
    fn auth(&mut self, command: &ClientCommand) -> Reply {
        let argc = command.args.len();
        if !(2..=3).contains(&argc) {
            return wrong_arity("auth");
        }
        let config = &self.context.config;
        let default = users::DefaultUser::of(config.requirepass.as_deref(), &config.users);
        let user = (argc == 3).then(|| command.args[1].as_ref());
        match users::authenticate(default, &config.users, user, &command.args[argc - 1]) {
            Ok(identity) => {
                self.set_identity(Some(identity));
                Reply::ok()
            }
            Err(users::AuthError::WrongPass) => {
                ServedStats::add(&self.context.stats.acl_denied_auth, 1);
                Reply::error("WRONGPASS invalid username-password pair or user is disabled.")
            }
            Err(users::AuthError::NoPasswordConfigured) => Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            ),
        }
    }

    /// Becomes `identity` (`None`: not authenticated); `CLIENT LIST` shows its user.
    fn set_identity(&mut self, identity: Option<Identity>) {
        let user = identity.as_ref().map_or_else(|| "default".to_string(), |i| i.user.clone());
        self.client.update(|row| row.user = user);
        self.identity = identity;
    }

    /// Whether the argument count fits the command's arity in the `COMMAND` table.
    fn arity_ok(&self, command: &ClientCommand) -> bool {
        commands::arity(&command.args[0]).is_none_or(|arity| {
            let argc = command.args.len() as i64;
            if arity < 0 {
                argc >= -arity
            } else {
                argc == arity
            }
        })
    }

    async fn dispatch(&mut self, command: &ClientCommand) -> Next {
        if command.args.is_empty() {
            return Next::NoReply;
        }
        let name = command.name();
        let argc = command.args.len();
        if let Some(reply) = self.node_command(command) {
            return Next::Reply(reply);
        }
        let reply = match name.as_str() {
            // In subscribed mode PING answers as a message would: `["pong", <arg or "">]`.
            "PING" if self.subscribed() => match argc {
                1 => Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]),
                2 => Reply::Array(vec![Reply::bulk("pong"), Reply::Bulk(command.args[1].clone())]),
                _ => wrong_arity("ping"),
            },
            "PING" => match argc {
                1 => Reply::Simple("PONG".into()),
                2 => Reply::Bulk(command.args[1].clone()),
                _ => wrong_arity("ping"),
            },
            "AUTH" => self.auth(command),
            "INFO" => Reply::Bulk(Bytes::from(info::render(&self.context, &command.args[1..]))),
            "ROLE" => info::role(&self.context),
            "SUBSCRIBE" => return self.subscribe(Kind::Channel, command),
            "PSUBSCRIBE" => return self.subscribe(Kind::Pattern, command),
            "UNSUBSCRIBE" => return self.unsubscribe(Kind::Channel, command),
            "PUNSUBSCRIBE" => return self.unsubscribe(Kind::Pattern, command),
            "PUBLISH" if argc == 3 => Reply::Integer(self.context.pubsub.publish(&command.args[1], &command.args[2])),
            "PUBLISH" => wrong_arity("publish"),
            "RESET" => self.reset(),
            "QUIT" => return Next::Close(Reply::ok()),
            "REPLCONF" => return self.replconf(command),
            "PSYNC" | "SYNC" => return Next::BecomeReplica,
            "REPLICAOF" | "SLAVEOF" => self.replicaof(command).await,
            "RELAY" => self.relay_command(command),
            _ => unknown_command(command),
        };
        Next::Reply(reply)
    }

    /// `replconfCommand`: option pairs left to right, one `+OK` at the end; ACK/GETACK never answered.
    fn replconf(&mut self, command: &ClientCommand) -> Next {
        if command.args.len().is_multiple_of(2) {
            return Next::Reply(Reply::error("ERR syntax error"));
        }
        for pair in command.args[1..].chunks(2) {
            let option = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
            let value = String::from_utf8_lossy(&pair[1]).into_owned();
            match option.as_str() {
                // `getLongFromObjectOrReply` into redis-server's `int slave_listening_port`: no
                // range check, the value is truncated to 32 bits as C's conversion does.
                "listening-port" => match string2ll_str(&value) {
                    Some(port) => self.handshake.listening_port = port as i32,
                    None => return Next::Reply(Reply::error("ERR value is not an integer or out of range")),
                },
                "ip-address" => {
                    if value.len() >= 256 {
                        return Next::Reply(Reply::error(format!(
                            "ERR REPLCONF ip-address provided by replica instance is too long: {} bytes",
                            value.len()
                        )));
                    }
                    self.handshake.ip_address = Some(value);
                }
                "capa" => match value.to_ascii_lowercase().as_str() {
                    "eof" => self.handshake.capa_eof = true,
                    "psync2" => self.handshake.capa_psync2 = true,
                    crate::upstream::RELAY_SNAPSHOT_CAPA => self.handshake.capa_relay_snapshot = true,
                    _ => {}
                },
                "ack" | "getack" => return Next::NoReply,
                "rdb-filter-only" => match crate::snapshot::RdbFilter::parse(&value) {
                    Ok(filter) => self.handshake.rdb_filter = Some(filter),
                    Err(name) => {
                        return Next::Reply(Reply::error(format!("ERR Unsupported rdb-filter-only option: {name}")))
                    }
                },
                // Valkey's `replconfCommand`: a version `version2num` reads, or an error.
                "version" => match crate::upstream::version::version_number(&value) {
                    Some(number) => self.handshake.version = Some((value, number)),
                    None => return Next::Reply(Reply::error(format!("ERR Unrecognized version format: {value}"))),
                },
                "rdb-only" => match string2ll_str(&value) {
                    Some(flag @ 0..=1) => self.handshake.rdb_only = flag == 1,
                    Some(_) => {
                        return Next::Reply(Reply::error("ERR value is out of range, value must between 0 and 1"))
                    }
                    None => return Next::Reply(Reply::error("ERR value is not an integer or out of range")),
                },
                _ => return Next::Reply(Reply::error(format!("ERR Unrecognized REPLCONF option: {option}"))),
            }
        }
        Next::Reply(Reply::ok())
    }
}

/// How long `REPLICAOF` waits for its host name to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The longest host name `REPLICAOF` takes (a DNS name is at most 253 characters).
const MAX_HOST_LEN: usize = 255;

/// Validates a `REPLICAOF` target; returns `host:port` or the error to reply with. Resolution runs
/// through tokio's resolver (on its blocking pool), never on the runtime worker.
async fn check_replicaof_target(host: &str, port: &str) -> Result<String, String> {
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => return Err("ERR Invalid master port".into()),
    };
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return Err(format!("ERR Invalid master host: {} bytes, expected 1 to {MAX_HOST_LEN}", host.len()));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("ERR Invalid master host {host:?}"));
    }
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    match resolved.map(|lookup| lookup.map(|mut addrs| addrs.next().is_some())) {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Err(format!("ERR master host {host} resolves to no address")),
        Ok(Err(error)) => return Err(format!("ERR master host {host} does not resolve: {error}")),
        Err(_) => return Err(format!("ERR master host {host} did not resolve within {RESOLVE_TIMEOUT:?}")),
    }
    Ok(format!("{host}:{port}"))
}

/// What a queued command holds: its arguments and their handles.
fn queued_size(command: &ClientCommand) -> usize {
    const PER_ARG: usize = std::mem::size_of::<Bytes>();
    std::mem::size_of::<ClientCommand>() + command.args.iter().map(|arg| arg.len() + PER_ARG).sum::<usize>()
}

fn wrong_arity(name: &str) -> Reply {
    Reply::error(format!("ERR wrong number of arguments for '{name}' command"))
}

/// Redis's wording for an unknown command.
fn unknown_command(command: &ClientCommand) -> Reply {
    // As redis-server's processCommand: at most 128 bytes of the name, and arguments (each followed
    // by a space) only while the list is under 128 bytes, each cut to what is left of the 128.
    const ECHO_LIMIT: usize = 128;
    let mut args = Vec::new();
    for arg in &command.args[1..] {
        if args.len() >= ECHO_LIMIT {
            break;
        }
        let room = ECHO_LIMIT - args.len();
        args.push(b'\'');
        args.extend_from_slice(&arg[..arg.len().min(room)]);
        args.extend_from_slice(b"' ");
    }
    let name = &command.args[0][..command.args[0].len().min(ECHO_LIMIT)];
    Reply::error(format!(
        "ERR unknown command '{}', with args beginning with: {}",
        String::from_utf8_lossy(name),
        String::from_utf8_lossy(&args),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicaof_targets_are_checked() {
        assert_eq!(check_replicaof_target("127.0.0.1", "6379").await, Ok("127.0.0.1:6379".into()));
        assert_eq!(check_replicaof_target("localhost", "65535").await, Ok("localhost:65535".into()));
        for port in ["0", "65536", "-1", "port"] {
            assert_eq!(
                check_replicaof_target("127.0.0.1", port).await,
                Err("ERR Invalid master port".into()),
                "{port}"
            );
        }
        let long = "a".repeat(256);
        assert!(check_replicaof_target(&long, "6379").await.is_err_and(|e| e.contains("256 bytes")));
        assert!(check_replicaof_target("", "6379").await.is_err());
        assert!(check_replicaof_target("bad host", "6379").await.is_err());
        let unresolvable = check_replicaof_target("no-such-host.invalid", "6379").await;
        assert!(unresolvable.is_err_and(|e| e.contains("no-such-host.invalid")));
    }
}
