//! One relay: a master upstream, its log and snapshot cache, and the listener below it.
//!
//! [`RelayContext`] is what the downstream side reads: every piece in it has one owner (the log and
//! the snapshot store are written by the upstream link only; the upstream status is a `watch` the link
//! publishes; the replica table is written by each replica's own task).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::RelayConfig;
use crate::downstream::clients::ClientTable;
use crate::downstream::pubsub::PubSub;
use crate::downstream::{self, ReplicaTable};
use crate::log::{DropKind, Recovery, ReplicationLog};
use crate::snapshot::{SnapshotError, SnapshotStore};
use crate::tls::{TlsAcceptor, TlsConnector, UpstreamTls};
use crate::upstream::fetch::{FetchRequests, FetcherStatus};
use crate::upstream::version::MasterVersion;
use crate::upstream::{UpstreamConfig, UpstreamLink, UpstreamStatus};

/// Counters of what the relay served below it, as `INFO stats` names them.
#[derive(Debug, Default)]
pub struct ServedStats {
    pub connections: AtomicU64,
    pub commands: AtomicU64,
    pub sync_full: AtomicU64,
    pub sync_partial_ok: AtomicU64,
    pub sync_partial_err: AtomicU64,
    pub repl_output_bytes: AtomicU64,
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

/// What the downstream side of a relay can see and use.
pub struct RelayContext {
    pub config: RelayConfig,
    pub log: Arc<ReplicationLog>,
    pub snapshots: Arc<SnapshotStore>,
    pub upstream: watch::Receiver<UpstreamStatus>,
    pub upstream_config: UpstreamConfig,
    /// Where the upstream link connects; `REPLICAOF host port` sends a new address here.
    pub upstream_target: watch::Sender<String>,
    /// `RELAY HISTORY ACCEPT` sends the held history's replid here; the upstream link follows it.
    pub history_accept: watch::Sender<Option<String>>,
    pub run_id: String,
    pub started: Instant,
    pub stats: ServedStats,
    pub replicas: Arc<ReplicaTable>,
    /// Every client session of the listener (`CLIENT ID`, `CLIENT KILL`).
    pub clients: Arc<ClientTable>,
    /// Channel and pattern subscriptions of the listener's clients.
    pub pubsub: Arc<PubSub>,
    pub fetcher: FetchRequests,
    /// Where snapshots came from and why some were refused (the fetcher publishes it).
    pub fetcher_status: watch::Receiver<FetcherStatus>,
    /// What the log's recovery found at start (INFO shows it).
    pub log_recovery: Recovery,
    /// The TLS listener's certificates, reloaded on SIGHUP (the link's are in `upstream_config`).
    pub tls_acceptor: Option<Arc<TlsAcceptor>>,
    /// The same certificates as a client, for snapshot requests to replicas that came in through
    /// the TLS listener; reloaded with them.
    pub replica_tls: Option<Arc<TlsConnector>>,
    /// The master's version, read after each connect (`redis_version` in INFO and HELLO).
    pub master_version: watch::Receiver<Option<MasterVersion>>,
    /// When the relay started, as a Unix time (`LASTSAVE` before any snapshot).
    pub started_unix: u64,
    /// Connected clients and replicas against `maxclients`.
    pub client_slots: Arc<crate::limits::ClientSlots>,
    /// Whether the listeners are bound (their tasks write it).
    pub listeners: crate::downstream::ListenerStatus,
    /// The clients' buffers against `maxmemory-clients` and `client-query-buffer-limit`.
    pub client_memory: Arc<crate::downstream::memory::ClientMemoryBudget>,
    /// The RDB version guard: full syncs refused to replicas that cannot load the snapshot.
    pub sync_guard: crate::downstream::guard::SyncGuard,
}

impl RelayContext {
    /// Reads the relay's certificate files again (SIGHUP): new connections on either side use them.
    /// Runs file I/O: call it off the runtime's workers.
    pub fn reload_tls(&self) -> Result<(), crate::tls::TlsError> {
        if let Some(connector) = &self.upstream_config.tls {
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

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay {name}: {source}")]
    Snapshot { name: String, source: SnapshotError },
    #[error("relay {name}: replication log: {source}")]
    Log { name: String, source: crate::log::DiskError },
    #[error("relay {name}: TLS: {source}")]
    Tls { name: String, source: crate::tls::TlsError },
}

/// Random 40-hex-character id, the form of Redis's run_id and replids.
pub fn random_hex_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..40).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
}

/// A started relay: its tasks and the one signal that stops them.
pub struct RunningRelay {
    pub config: RelayConfig,
    pub context: Arc<RelayContext>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl RunningRelay {
    pub async fn start(config: RelayConfig) -> Result<RunningRelay, RelayError> {
        let (shutdown, receiver) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let span = relay_span(&config.name);
        let context = start(config.clone(), receiver, &mut tasks, span.clone()).instrument(span).await?;
        Ok(RunningRelay { config, context, shutdown, tasks })
    }

    /// Stops every task of this relay and waits until its connections are closed, so that its listen
    /// address and data directory are free again.
    pub async fn stop(self) {
        let span = relay_span(&self.config.name);
        self.drain().instrument(span).await
    }

    async fn drain(mut self) {
        self.shutdown.send_replace(true);
        let drain = async {
            while self.tasks.join_next().await.is_some() {}
            // Client and replica sessions hold the context; they end on the same signal.
            while Arc::strong_count(&self.context) > 1 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // The log writer ends when the upstream link (its one sender) is gone, after writing
            // what it was given; then the directory is unlocked for a restart.
            self.context.log.writer_stopped().await;
        };
        if tokio::time::timeout(std::time::Duration::from_secs(10), drain).await.is_err() {
            tracing::warn!("relay did not stop within 10 s");
        }
        tracing::info!("relay stopped");
    }
}

/// The span every task of the relay runs in, so that each of their log lines carries `relay=`.
fn relay_span(name: &str) -> tracing::Span {
    tracing::info_span!("relay", relay = %name)
}

/// Starts one relay's tasks on `tasks`, each in `span`; they stop when `shutdown` flips to true.
pub async fn start(
    config: RelayConfig,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
    span: tracing::Span,
) -> Result<Arc<RelayContext>, RelayError> {
    // A port that cannot be bound now is reported and retried by its listener task (see
    // `downstream::listen`): the rest of this relay, and the other relays, run meanwhile.
    let listeners = crate::downstream::ListenerStatus::default();
    let listener = match config.listen {
        Some(addr) => first_bind(addr, &listeners).await,
        None => None,
    };
    let tls_listener = match &config.tls {
        Some(tls) => first_bind(tls.listen, &listeners).await,
        None => None,
    };
    let LoadedTls { upstream: upstream_tls, acceptor: tls_acceptor, replicas: replica_tls } = load_tls(&config).await?;
    // The log first: it locks the directory, so a second relay on it stops before touching anything.
    // Recovery reads every record and the snapshot check every RDB byte: both on the blocking pool.
    let log_dir = config.dir.join("log");
    let log_options = config.log;
    let opened = tokio::task::spawn_blocking(move || ReplicationLog::open(&log_dir, log_options)).await;
    let log_error = |source| RelayError::Log { name: config.name.clone(), source };
    let (log, log_writer, recovery) = opened
        .map_err(|join| log_error(crate::log::DiskError::Io { path: config.dir.join("log"), source: join.into() }))?
        .map_err(log_error)?;
    let log_writer = log_writer.spawn().map_err(|source| RelayError::Log {
        name: config.name.clone(),
        source: crate::log::DiskError::Io { path: config.dir.join("log"), source },
    })?;
    match &recovery.dropped {
        // An append the stop interrupted: never served nor acknowledged.
        Some(dropped) if dropped.kind == DropKind::TornTail => {
            tracing::info!(bytes = dropped.bytes, "log recovery cut an unfinished append: {}", dropped.reason)
        }
        Some(dropped) => {
            tracing::warn!(bytes = dropped.bytes, "log recovery dropped data after a bad record: {}", dropped.reason)
        }
        None => {}
    }
    if let Some(history) = &recovery.history {
        tracing::info!(
            replid = %history.replid,
            first_byte_offset = recovery.start + 1,
            offset = recovery.end,
            segments = recovery.segments,
            "replication log recovered"
        );
    }
    let snapshot_dir = config.dir.clone();
    let snapshots = tokio::task::spawn_blocking(move || SnapshotStore::open(&snapshot_dir))
        .await
        .map_err(|join| SnapshotError::Io { path: config.dir.clone(), source: join.into() })
        .and_then(|opened| opened)
        .map(Arc::new)
        .map_err(|source| RelayError::Snapshot { name: config.name.clone(), source })?;
    let config_maxclients = config.maxclients;
    let (config_maxmemory_clients, config_query_buffer_limit) =
        (config.maxmemory_clients, config.client_query_buffer_limit);
    let clients = Arc::new(ClientTable::default());
    let sync_guard =
        crate::downstream::guard::SyncGuard::new(config.replica_resync_backoff, config.replica_resync_backoff_max);
    let (upstream_target, target) = watch::channel(config.upstream.clone());
    let (history_accept, accepted) = watch::channel(None);
    let replicas = Arc::new(ReplicaTable::default());
    let upstream_config = UpstreamConfig {
        target,
        user: config.upstream_user.clone(),
        password: config.upstream_password.clone(),
        listening_port: config.announced_port(),
        announce_version: config.upstream_announce_version.clone(),
        repl_timeout: config.repl_timeout,
        history_reset: config.history_reset,
        history_reset_min_key_ratio: config.history_reset_min_key_ratio,
        history_accept: accepted,
        ack: config.upstream_ack,
        tls: upstream_tls,
        ack_replicas: config.ack_replicas,
        replicas: replicas.clone(),
    };
    let (link, upstream) = UpstreamLink::new(upstream_config.clone(), log.clone(), log_writer, snapshots.clone());
    let (fetcher_task, fetcher, fetcher_status) =
        link.fetcher(config.snapshot.clone(), replicas.clone(), replica_tls.clone());
    let (master_version_sender, master_version) = watch::channel(None);
    let version_task = crate::upstream::version::follow(
        upstream_config.clone(),
        upstream.clone(),
        master_version_sender,
        shutdown.clone(),
    );
    let pubsub = Arc::new(PubSub::new(config.pubsub_output_limit));
    let context = Arc::new(RelayContext {
        config,
        log,
        snapshots,
        upstream,
        upstream_config,
        upstream_target,
        history_accept,
        run_id: random_hex_id(),
        started: Instant::now(),
        stats: ServedStats::default(),
        replicas,
        clients: clients.clone(),
        client_memory: crate::downstream::memory::ClientMemoryBudget::new(
            config_maxmemory_clients,
            config_query_buffer_limit,
            clients,
        ),
        pubsub,
        client_slots: crate::limits::ClientSlots::new(config_maxclients),
        sync_guard,
        fetcher,
        fetcher_status,
        log_recovery: recovery,
        tls_acceptor: tls_acceptor.clone(),
        replica_tls,
        master_version,
        listeners,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    tracing::info!(
        listen = %context.config.listen.map(|a| a.to_string()).unwrap_or_else(|| "none".into()),
        tls_listen = %context.config.tls.as_ref().map(|t| t.listen.to_string()).unwrap_or_else(|| "none".into()),
        upstream = %context.config.upstream,
        dir = %context.config.dir.display(),
        "relay starting"
    );
    tasks.spawn(crate::metrics::collect(context.clone(), shutdown.clone()).instrument(span.clone()));
    tasks.spawn(link.run(shutdown.clone()).instrument(span.clone()));
    tasks.spawn(fetcher_task.run(shutdown.clone()).instrument(span.clone()));
    tasks.spawn(version_task.instrument(span.clone()));
    if let (Some(tls), Some(acceptor)) = (&context.config.tls, tls_acceptor) {
        tasks.spawn(
            downstream::listen(tls_listener, tls.listen, Some(acceptor), context.clone(), shutdown.clone())
                .instrument(span.clone()),
        );
    }
    if let Some(listen) = context.config.listen {
        tasks.spawn(downstream::listen(listener, listen, None, context.clone(), shutdown).instrument(span.clone()));
    }
    Ok(context)
}

/// The first attempt to bind a listener; a failure is an ERROR here and counted, and the listener
/// task tries again.
async fn first_bind(
    addr: std::net::SocketAddr,
    status: &crate::downstream::ListenerStatus,
) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Some(listener),
        Err(error) => {
            status.bind_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%addr, "cannot listen: {error}; retrying every second");
            None
        }
    }
}

/// The relay's TLS configurations, read from their files.
struct LoadedTls {
    /// The link to the master.
    upstream: Option<Arc<TlsConnector>>,
    /// The TLS listener.
    acceptor: Option<Arc<TlsAcceptor>>,
    /// Snapshot requests to replicas that came in through the TLS listener: its CA verifies them,
    /// its certificate is the client one (redis-server too presents its own certificate as a
    /// client). Without a listener CA there is nothing to verify them with.
    replicas: Option<Arc<TlsConnector>>,
}

/// Reads the relay's certificates (off the runtime's workers).
async fn load_tls(config: &RelayConfig) -> Result<LoadedTls, RelayError> {
    let (upstream, downstream) = (config.upstream_tls.clone(), config.tls.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let connector = upstream.as_ref().map(TlsConnector::new).transpose()?.map(Arc::new);
        let acceptor = downstream.as_ref().map(TlsAcceptor::new).transpose()?.map(Arc::new);
        let replicas = downstream
            .as_ref()
            .and_then(|tls| {
                let ca_cert_file = tls.ca_cert_file.clone()?;
                Some(UpstreamTls {
                    ca_cert_file,
                    cert_file: Some(tls.cert_file.clone()),
                    key_file: Some(tls.key_file.clone()),
                    server_name: None,
                })
            })
            .map(|settings| TlsConnector::new(&settings))
            .transpose()?
            .map(Arc::new);
        Ok::<_, crate::tls::TlsError>(LoadedTls { upstream: connector, acceptor, replicas })
    })
    .await;
    let name = config.name.clone();
    match loaded {
        Ok(result) => result.map_err(|source| RelayError::Tls { name, source }),
        Err(join) => Err(RelayError::Tls { name, source: crate::tls::TlsError::Config(join.to_string()) }),
    }
}

/// Resolves once `shutdown` is set (or its sender is gone). Holds no borrow of the value after.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Logs the progress of a long transfer every few seconds: bytes, percent when the size is known,
/// and the rate since the start.
pub struct TransferProgress {
    what: &'static str,
    peer: String,
    started: Instant,
    last_logged: Instant,
}

impl TransferProgress {
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(what: &'static str, peer: impl Into<String>) -> TransferProgress {
        let now = Instant::now();
        TransferProgress { what, peer: peer.into(), started: now, last_logged: now }
    }

    /// `total` is -1 when unknown (EOF-marked payloads).
    pub fn update(&mut self, done: u64, total: i64) {
        if self.last_logged.elapsed() < Self::PERIOD {
            return;
        }
        self.last_logged = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate_mb = done as f64 / seconds / (1024.0 * 1024.0);
        let percent =
            if total > 0 { format!("{:.1}%", done as f64 * 100.0 / total as f64) } else { "size unknown".to_string() };
        tracing::info!(peer = %self.peer, bytes = done, total, "{} in progress: {percent}, {rate_mb:.1} MB/s", self.what);
    }
}
