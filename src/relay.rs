//! One relay: a master upstream, its log and snapshot cache, and the listener below it.
//!
//! [`RelayContext`] is what the downstream side reads: every piece in it has one owner (the log and
//! the snapshot store are written by the upstream link only; the upstream status is a `watch` the link
//! publishes; the replica table is written by each replica's own task).

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

pub use crate::context::{RelayContext, ServedStats};
use crate::util::random_hex_id;

use crate::config::RelayConfig;
use crate::downstream::clients::ClientTable;
use crate::downstream::pubsub::PubSub;
use crate::downstream::{self, ReplicaTable};
use crate::log::{DropKind, ReplicationLog};
use crate::snapshot::{SnapshotError, SnapshotStore};
use crate::tls::{TlsAcceptor, TlsConnector, UpstreamTls};
use crate::upstream::{UpstreamConfig, UpstreamLink};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay {name}: {source}")]
    Snapshot { name: String, source: SnapshotError },
    #[error("relay {name}: replication log: {source}")]
    Log { name: String, source: crate::log::DiskError },
    #[error("relay {name}: TLS: {source}")]
    Tls { name: String, source: crate::tls::TlsError },
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
        // The listener tasks wait for their sessions: once every task has ended, nothing of the
        // relay runs and its address is free.
        let drain = async {
            while self.tasks.join_next().await.is_some() {}
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
        Some(addr) => downstream::bind_now(addr, &listeners).await,
        None => None,
    };
    let tls_listener = match &config.tls {
        Some(tls) => downstream::bind_now(tls.listen, &listeners).await,
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
            first_byte_offset = crate::offset::Position::new(recovery.start).next_offset(),
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
        upstream_tls: upstream_config.tls.clone(),
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
    tasks.spawn(downstream::tail::release_behind_replicas(context.clone(), shutdown.clone()).instrument(span.clone()));
    // The upstream link reads the master on a thread of its own: ingest never waits behind the
    // fan-out to the replicas on the shared runtime.
    tasks.spawn(crate::util::on_own_thread("upstream", link.run(shutdown.clone()).instrument(span.clone())));
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
