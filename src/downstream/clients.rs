//! The client connections of a relay's listener, for `CLIENT ID` and `CLIENT KILL`.
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

struct ClientRow {
    addr: SocketAddr,
    kind: ClientType,
    kill: Arc<watch::Sender<bool>>,
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

    pub fn register(self: &Arc<Self>, addr: SocketAddr) -> (ClientHandle, watch::Receiver<bool>) {
        // Ids start at 1, as redis-server's.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (kill, killed) = watch::channel(false);
        let kill = Arc::new(kill);
        self.rows().insert(id, ClientRow { addr, kind: ClientType::Normal, kill: kill.clone() });
        (ClientHandle { table: self.clone(), id, addr, kill }, killed)
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
