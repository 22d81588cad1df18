//! The client connections of a relay's listener, for `CLIENT ID|LIST|INFO|KILL` and
//! `INFO clients`.
//!
//! Each session registers itself here while it lives and keeps its row's type current (normal,
//! pubsub, replica); `CLIENT KILL` and a pub/sub subscriber's output-buffer limit end a session
//! through its row's kill signal, which the session's task waits on next to its work, so a session
//! blocked on a client that does not read ends too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::time::Instant;

/// The client types `CLIENT KILL TYPE` names (`master` is the relay's own upstream link, which is
/// not a connection of this listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientType {
    Normal,
    Pubsub,
    Replica,
}

/// What `CLIENT KILL TYPE` names: sessions of a type, or the relay's master link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillType {
    Sessions(ClientType),
    Master,
}

impl KillType {
    /// As redis-server's `getClientTypeByName`; `None` for an unknown name.
    pub fn parse(name: &str) -> Option<KillType> {
        match name.to_ascii_lowercase().as_str() {
            "normal" => Some(KillType::Sessions(ClientType::Normal)),
            "pubsub" => Some(KillType::Sessions(ClientType::Pubsub)),
            "replica" | "slave" => Some(KillType::Sessions(ClientType::Replica)),
            "master" => Some(KillType::Master),
            _ => None,
        }
    }
}

/// What a client asked its replies to be (`CLIENT REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyMode {
    On,
    Off,
    /// `CLIENT REPLY SKIP` was the last command: the next one's reply is dropped.
    Skip,
    /// The command after `CLIENT REPLY SKIP` runs: its reply is dropped, then replies are on again.
    Skipping,
}

/// One connection, as `CLIENT LIST` shows it.
#[derive(Clone)]
pub(crate) struct ClientRow {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: Option<SocketAddr>,
    pub fd: i64,
    pub kind: ClientType,
    kill: Arc<watch::Sender<bool>>,
    pub name: String,
    pub created: Instant,
    pub last_command: Instant,
    /// The last command, as redis-server names it (`client|list`).
    pub cmd: String,
    pub db: u32,
    /// 2 or 3 (`HELLO`).
    pub resp: u8,
    pub no_evict: bool,
    pub reply: ReplyMode,
    /// The user the session authenticated as (`default` until then, as on redis-server).
    pub user: String,
}

impl ClientRow {
    /// redis-server's `CLIENT LIST` line (the fields that mean something on a relay).
    pub fn render(&self) -> String {
        let now = Instant::now();
        let mut flags = String::new();
        match self.kind {
            ClientType::Replica => flags.push('S'),
            ClientType::Pubsub => flags.push('P'),
            ClientType::Normal => {}
        }
        if self.no_evict {
            flags.push('e');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={} db={} cmd={} user={} resp={}",
            self.id,
            self.addr,
            self.laddr.map(|a| a.to_string()).unwrap_or_default(),
            self.fd,
            self.name,
            now.duration_since(self.created).as_secs(),
            now.duration_since(self.last_command).as_secs(),
            flags,
            self.db,
            if self.cmd.is_empty() { "NULL" } else { &self.cmd },
            self.user,
            self.resp,
        )
    }
}

/// The live sessions of one relay.
#[derive(Default)]
pub struct ClientTable {
    next_id: AtomicU64,
    rows: Mutex<BTreeMap<u64, ClientRow>>,
}

/// Which sessions a `CLIENT KILL` selects.
#[derive(Debug, Default)]
pub struct KillFilter {
    pub id: Option<u64>,
    pub addr: Option<String>,
    /// `TYPE master` matches no session of the listener.
    pub kind: Option<KillType>,
    pub skip: Option<u64>,
}

impl ClientTable {
    fn rows(&self) -> MutexGuard<'_, BTreeMap<u64, ClientRow>> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        addr: SocketAddr,
        laddr: Option<SocketAddr>,
        fd: i64,
    ) -> (ClientHandle, watch::Receiver<bool>) {
        // Ids start at 1, as redis-server's.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (kill, killed) = watch::channel(false);
        let kill = Arc::new(kill);
        let now = Instant::now();
        let row = ClientRow {
            id,
            addr,
            laddr,
            fd,
            kind: ClientType::Normal,
            kill: kill.clone(),
            name: String::new(),
            created: now,
            last_command: now,
            cmd: String::new(),
            user: "default".into(),
            db: 0,
            resp: 2,
            no_evict: false,
            reply: ReplyMode::On,
        };
        self.rows().insert(id, row);
        (ClientHandle { table: self.clone(), id, addr, kill }, killed)
    }

    pub(crate) fn list(&self) -> Vec<ClientRow> {
        self.rows().values().cloned().collect()
    }

    /// Connections that are not replicas (`connected_clients`, as redis-server counts them).
    pub fn connected_clients(&self) -> usize {
        self.rows().values().filter(|r| r.kind != ClientType::Replica).count()
    }

    /// Whether `maxmemory-clients` must spare this session: replicas and `CLIENT NO-EVICT on`.
    pub(crate) fn eviction_exempt(&self, id: u64) -> bool {
        self.rows().get(&id).is_none_or(|row| row.kind == ClientType::Replica || row.no_evict)
    }

    /// Signals every matching session to end; returns how many.
    pub fn kill(&self, filter: &KillFilter) -> usize {
        let rows = self.rows();
        let mut killed = 0;
        for (id, row) in rows.iter() {
            let selected = filter.id.is_none_or(|wanted| wanted == *id)
                && filter.addr.as_ref().is_none_or(|wanted| *wanted == row.addr.to_string())
                && filter.kind.is_none_or(|wanted| wanted == KillType::Sessions(row.kind))
                && filter.skip != Some(*id);
            if selected && !row.kill.send_replace(true) {
                killed += 1;
            }
        }
        killed
    }
}

/// A session's row; removed when dropped.
pub struct ClientHandle {
    table: Arc<ClientTable>,
    id: u64,
    addr: SocketAddr,
    kill: Arc<watch::Sender<bool>>,
}

impl ClientHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_type(&self, kind: ClientType) {
        if let Some(row) = self.table.rows().get_mut(&self.id) {
            row.kind = kind;
        }
    }

    /// Ends the session; returns false if it was already being ended.
    pub fn kill(&self) -> bool {
        !self.kill.send_replace(true)
    }

    pub(crate) fn update<T>(&self, change: impl FnOnce(&mut ClientRow) -> T) -> Option<T> {
        self.table.rows().get_mut(&self.id).map(change)
    }

    pub(crate) fn get(&self) -> Option<ClientRow> {
        self.table.rows().get(&self.id).cloned()
    }

    /// Records the command about to run (`cmd=`, `idle=`).
    pub fn command_started(&self, args: &[bytes::Bytes]) {
        let name = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).unwrap_or_default();
        let cmd = match (name.as_str(), args.get(1)) {
            ("client" | "config" | "command" | "relay", Some(sub)) => {
                format!("{name}|{}", String::from_utf8_lossy(sub).to_ascii_lowercase())
            }
            _ => name,
        };
        self.update(|row| {
            row.cmd = cmd;
            row.last_command = Instant::now();
        });
    }

    /// Whether the reply of the command just run goes out (`CLIENT REPLY OFF|SKIP`).
    pub fn reply_wanted(&self) -> bool {
        self.update(|row| match row.reply {
            ReplyMode::On => true,
            ReplyMode::Off => false,
            // `CLIENT REPLY SKIP` itself is not answered; the next command is the skipped one.
            ReplyMode::Skip => {
                row.reply = ReplyMode::Skipping;
                false
            }
            ReplyMode::Skipping => {
                row.reply = ReplyMode::On;
                false
            }
        })
        .unwrap_or(true)
    }

    /// What another owner (a pub/sub mailbox) needs to end this session.
    pub fn killer(&self) -> Killer {
        Killer { addr: self.addr, kill: self.kill.clone() }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.table.rows().remove(&self.id);
    }
}

/// Ends one session from outside it.
pub struct Killer {
    addr: SocketAddr,
    kill: Arc<watch::Sender<bool>>,
}

impl Killer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns false if the session was already being ended.
    pub fn kill(&self) -> bool {
        !self.kill.send_replace(true)
    }
}
