//! The shared state of one relay, [`RelayContext`]: what its tasks and sessions read. Every field
//! names its one writer; the rest only read (through `watch` receivers, atomics, or the owner's
//! read methods).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::RelayConfig;
use crate::downstream::clients::ClientTable;
use crate::downstream::pubsub::PubSub;
use crate::downstream::ReplicaTable;
use crate::log::{Recovery, ReplicationLog};
use crate::snapshot::SnapshotStore;
use crate::tls::{TlsAcceptor, TlsConnector};
use crate::upstream::fetch::{FetchRequests, FetcherStatus};
use crate::upstream::version::MasterVersion;
use crate::upstream::UpstreamStatus;

/// Counters of what the relay served below it, as `INFO stats` names them.
#[derive(Debug, Default)]
pub struct ServedStats {
    pub connections: AtomicU64,
    pub commands: AtomicU64,
    pub sync_full: AtomicU64,
    pub sync_partial_ok: AtomicU64,
    pub sync_partial_err: AtomicU64,
    pub repl_output_bytes: AtomicU64,
    /// Stream bytes sent to replicas by where they came from: the memory tail, disk records read
    /// into memory, or disk records sent from the file by the kernel (`sendfile`).
    pub stream_from_memory: AtomicU64,
    pub stream_from_disk: AtomicU64,
    pub stream_sendfile: AtomicU64,
    /// Replica streams ended because reading the log from disk failed (I/O), or a record failed
    /// its check (never served).
    pub log_read_errors: AtomicU64,
    pub log_read_corrupt: AtomicU64,
    /// rdb-only requests (`redis-cli --rdb`) answered with a snapshot taken for them.
    pub rdb_only_fresh: AtomicU64,
    /// rdb-only requests answered from the cache because no source could give a fresh snapshot.
    pub rdb_only_cached: AtomicU64,
    /// Age in seconds of the cached snapshot the last such request got.
    pub rdb_only_last_cached_age: AtomicU64,
    /// Connections refused because of `maxclients` (INFO `rejected_connections`).
    pub rejected_connections: AtomicU64,
    /// Accepts on the listen port that failed (EMFILE and the like; INFO `accept_errors`).
    pub accept_errors: AtomicU64,
    /// Failed `AUTH`s and `HELLO ... AUTH`s (Redis 7.2's INFO `acl_access_denied_auth`).
    pub acl_denied_auth: AtomicU64,
    /// Commands refused with `NOPERM` (Redis 7.2's INFO `acl_access_denied_cmd`).
    pub acl_denied_cmd: AtomicU64,
}

impl ServedStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One relay's shared state, built once by `relay::start` and read by its tasks and sessions.
/// Each field says who writes it; everyone else only reads.
pub struct RelayContext {
    /// The relay's settings. Written once at start, never after (a changed configuration restarts
    /// the relay). `config.upstream` is the configured master; the current one is `upstream_target`.
    pub config: RelayConfig,
    /// The replication log. Changed only on behalf of the upstream link (appends, resets, trims go
    /// through the log's own writer); sessions read it through their cursors, the metrics through
    /// its summary.
    pub log: Arc<ReplicationLog>,
    /// The snapshot cache. Installed by the upstream link (full syncs from the master) and by the
    /// snapshot fetcher (side fetches), one install at a time inside the store; sessions read it.
    pub snapshots: Arc<SnapshotStore>,
    /// The link's state. Published by the upstream link only.
    pub upstream: watch::Receiver<UpstreamStatus>,
    /// The master the link follows, `host:port`. Written by sessions: `REPLICAOF host port` (and
    /// `CLIENT KILL TYPE master` nudges it); the link and the version follower read it.
    pub upstream_target: watch::Sender<String>,
    /// The replid of a held history an operator accepted. Written by `RELAY HISTORY ACCEPT`
    /// sessions; the link reads it.
    pub history_accept: watch::Sender<Option<String>>,
    /// Set at start.
    pub run_id: String,
    /// Set at start.
    pub started: Instant,
    /// When the relay started, as a Unix time (`LASTSAVE` before any snapshot). Set at start.
    pub started_unix: u64,
    /// Served counters. Every session adds to them (they only grow); INFO and metrics read.
    pub stats: ServedStats,
    /// The replicas below. Each replica session writes its own row (dropped with the session);
    /// the link reads the ACKs (`ack_replicas`), the fetcher the sources.
    pub replicas: Arc<ReplicaTable>,
    /// Every client session of the listener (`CLIENT ID`, `CLIENT KILL`). Each session writes its
    /// own row.
    pub clients: Arc<ClientTable>,
    /// Channel and pattern subscriptions. Each session writes its own; `PUBLISH` sessions deliver.
    pub pubsub: Arc<PubSub>,
    /// Requests to the snapshot fetcher. Sessions send (a full sync or an rdb-only request).
    pub fetcher: FetchRequests,
    /// Where snapshots came from and why some were refused. Published by the fetcher only.
    pub fetcher_status: watch::Receiver<FetcherStatus>,
    /// What the log's recovery found at start (INFO shows it). Set at start.
    pub log_recovery: Recovery,
    /// TLS to the master, the same connector the link holds; reloaded on SIGHUP (`reload_tls`).
    pub upstream_tls: Option<Arc<TlsConnector>>,
    /// The TLS listener's certificates; reloaded on SIGHUP.
    pub tls_acceptor: Option<Arc<TlsAcceptor>>,
    /// The same certificates as a client, for snapshot requests to replicas that came in through
    /// the TLS listener; reloaded with them.
    pub replica_tls: Option<Arc<TlsConnector>>,
    /// The master's version, read after each connect (`redis_version` in INFO and HELLO).
    /// Published by the version follower only.
    pub master_version: watch::Receiver<Option<MasterVersion>>,
    /// Connected clients and replicas against `maxclients`. Each session holds its slot.
    pub client_slots: Arc<crate::limits::ClientSlots>,
    /// Whether the listeners are bound. Written by the listener tasks only.
    pub listeners: crate::downstream::ListenerStatus,
    /// The clients' buffers against `maxmemory-clients` and `client-query-buffer-limit`. Each
    /// session accounts for its own buffers.
    pub client_memory: Arc<crate::downstream::memory::ClientMemoryBudget>,
    /// The RDB version guard: full syncs refused to replicas that cannot load the snapshot.
    /// Written by the replica sessions (each its own replica's record).
    pub sync_guard: crate::downstream::guard::SyncGuard,
}

impl RelayContext {
    /// The master the link follows now, as host and port (`INFO replication`, `ROLE`, `CONFIG GET
    /// replicaof`).
    pub fn master_host_port(&self) -> (String, u16) {
        crate::util::split_host_port(&self.upstream_target.borrow())
    }

    /// Reads the relay's certificate files again (SIGHUP): new connections on either side use them.
    /// Runs file I/O: call it off the runtime's workers.
    pub fn reload_tls(&self) -> Result<(), crate::tls::TlsError> {
        if let Some(connector) = &self.upstream_tls {
            connector.reload()?;
        }
        if let Some(acceptor) = &self.tls_acceptor {
            acceptor.reload()?;
        }
        if let Some(connector) = &self.replica_tls {
            connector.reload()?;
        }
        Ok(())
    }
}
