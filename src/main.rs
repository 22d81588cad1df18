//! The `redis-relay` binary: parses the command line or the YAML file, starts every relay, and stops
//! them all on SIGINT or SIGTERM through one shutdown signal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use tokio::signal::unix::{signal, SignalKind};

use redis_relay::config::{self, Config, Duration, List, RelayConfig, Size, Text, YesNo};
use redis_relay::relay::RunningRelay;
use redis_relay::tls::TlsAcceptor;

/// A Redis replication relay: one replica of the master, a master to many replicas.
///
/// The flags are merged over the `--config` file (a flag wins over the file's value for every
/// relay); without a file they describe one relay. Defaults are in `config::DEFAULTS`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML file describing the relays; the flags below override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The master to replicate, HOST:PORT (or set REDIS_RELAY_UPSTREAM).
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_UPSTREAM")]
    upstream: Option<Text>,
    /// Where replicas and clients connect, HOST:PORT (or set REDIS_RELAY_LISTEN); optional when
    /// --tls-listen is given.
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_LISTEN")]
    listen: Option<Text>,
    /// Data directory: replication log and snapshot cache (or set REDIS_RELAY_DIR).
    #[arg(long, value_name = "PATH", env = "REDIS_RELAY_DIR")]
    dir: Option<Text>,
    /// Worker threads serving every relay's clients and replicas: a number, or auto (one per four
    /// CPUs, at least one, so the master beside the relay keeps its cores) [default: auto].
    #[arg(long, value_name = "N|auto")]
    threads: Option<Text>,
    /// How the kernel schedules those threads beside the master on the same host: low (nice 19:
    /// the master's bursts go first), idle (SCHED_IDLE: only CPU time nothing else wants) or
    /// normal; the upstream link and the log writer stay normal [default: low].
    #[arg(long, value_name = "idle|low|normal")]
    fanout_priority: Option<Text>,
    /// Prometheus endpoint, HOST:PORT, serving /metrics (or set REDIS_RELAY_METRICS).
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_METRICS")]
    metrics: Option<Text>,
    /// Credentials /metrics requires: bearer:TOKEN or basic:USER:PASSWORD (or set
    /// REDIS_RELAY_METRICS_AUTH).
    #[arg(long, value_name = "AUTH", env = "REDIS_RELAY_METRICS_AUTH", hide_env_values = true)]
    metrics_auth: Option<Text>,
    /// Serve /metrics over HTTPS with this certificate (PEM); needs --metrics-tls-key-file.
    #[arg(long, value_name = "FILE")]
    metrics_tls_cert_file: Option<Text>,
    /// Key (PEM) of the metrics endpoint's certificate.
    #[arg(long, value_name = "FILE")]
    metrics_tls_key_file: Option<Text>,
    /// CA (PEM) scrapers' client certificates must chain to; without it none is asked for.
    #[arg(long, value_name = "FILE")]
    metrics_tls_ca_cert_file: Option<Text>,
    /// ACL user for AUTH to the master.
    #[arg(long, value_name = "U")]
    upstream_user: Option<Text>,
    /// Password for AUTH to the master (or set REDIS_RELAY_UPSTREAM_PASSWORD).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_UPSTREAM_PASSWORD", hide_env_values = true)]
    upstream_password: Option<Text>,
    /// Replication log retention on disk, in Redis units (64mb, 1gb; a bare number is bytes) [default: 1gb].
    #[arg(long, value_name = "SIZE")]
    log_size: Option<Size>,
    /// Newest part of the log also kept in memory for live fan-out (at most --log-size) [default: 256mb].
    #[arg(long, value_name = "SIZE")]
    log_memory: Option<Size>,
    /// Size of one log segment file [default: 64mb].
    #[arg(long, value_name = "SIZE")]
    log_segment_size: Option<Size>,
    /// Also drop log segments older than this (e.g. 24h); off by default.
    #[arg(long, value_name = "DURATION")]
    log_max_age: Option<Duration>,
    /// When the log is fsynced: always, everysec or no (like appendfsync). The FACK (or, with
    /// --upstream-ack durable, the ACK) to the master covers what is durable under it [default: everysec].
    #[arg(long, value_name = "POLICY")]
    appendfsync: Option<Text>,
    /// Replication timeout, both directions (60 seconds, 60s, 5m; more than 0) [default: 60s].
    #[arg(long, value_name = "DURATION")]
    repl_timeout: Option<Duration>,
    /// Serve full syncs in the EOF-marked (diskless) form to replicas that support it [default: no].
    #[arg(long, value_name = "yes|no")]
    repl_diskless_sync: Option<YesNo>,
    /// Password clients and replicas must give with AUTH (like requirepass; or set
    /// REDIS_RELAY_REQUIREPASS).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_REQUIREPASS", hide_env_values = true)]
    requirepass: Option<Text>,
    /// A named user, NAME:ROLES:PASSWORD with ROLES replica, monitor, admin or several joined by
    /// commas (monitor,admin); repeatable; replaces the file's users. The password shows in `ps`:
    /// prefer YAML users with password_file in production.
    #[arg(long = "user", value_name = "NAME:ROLES:PASSWORD")]
    users: Vec<String>,
    /// When the master presents another history with far fewer keys (e.g. it restarted empty):
    /// hold (keep serving the old dataset until RELAY HISTORY ACCEPT) or follow [default: hold].
    #[arg(long, value_name = "hold|follow")]
    history_reset: Option<Text>,
    /// A new history with fewer keys than this fraction of the cached snapshot's is held (an
    /// empty one always is, when the snapshot has keys) [default: 0.5].
    #[arg(long, value_name = "RATIO")]
    history_reset_min_key_ratio: Option<Text>,
    /// Whether clients may repoint the relay with REPLICAOF/SLAVEOF (allow or deny) [default: allow].
    #[arg(long, value_name = "allow|deny")]
    replicaof: Option<Text>,
    /// What the relay ACKs to its master: fack (ACK applied, FACK durable, like a Redis 7.2+
    /// replica with AOF) or durable (ACK only what is fsynced) [default: fack].
    #[arg(long, value_name = "fack|durable")]
    upstream_ack: Option<Text>,
    /// TLS to the master: yes or no [default: no].
    #[arg(long, value_name = "yes|no")]
    upstream_tls: Option<YesNo>,
    /// CA bundle (PEM) the master's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    upstream_tls_ca_cert_file: Option<Text>,
    /// Client certificate (PEM) for a master with tls-auth-clients.
    #[arg(long, value_name = "FILE")]
    upstream_tls_cert_file: Option<Text>,
    /// Key (PEM) of the client certificate.
    #[arg(long, value_name = "FILE")]
    upstream_tls_key_file: Option<Text>,
    /// Name the master's certificate must carry (default: the upstream host).
    #[arg(long, value_name = "NAME")]
    upstream_tls_server_name: Option<Text>,
    /// TLS listener for replicas and clients, HOST:PORT (beside --listen, or alone).
    #[arg(long, value_name = "HOST:PORT")]
    tls_listen: Option<Text>,
    /// Certificate (PEM) of the TLS listener.
    #[arg(long, value_name = "FILE")]
    tls_cert_file: Option<Text>,
    /// Key (PEM) of the TLS listener's certificate.
    #[arg(long, value_name = "FILE")]
    tls_key_file: Option<Text>,
    /// CA bundle (PEM) client certificates must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca_cert_file: Option<Text>,
    /// Whether TLS clients must present a certificate: yes, no or optional (as tls-auth-clients) [default: yes].
    #[arg(long, value_name = "yes|no|optional")]
    tls_auth_clients: Option<Text>,
    /// End-to-end ACKs: with K >= 1 the relay ACKs to its master only what K of its own replicas
    /// have ACKed (so WAIT on the master counts replicas below the relay); 0 ACKs as the relay [default: 0].
    #[arg(long, value_name = "K")]
    ack_replicas: Option<Text>,
    /// Disconnect a pub/sub client holding more unsent messages than this: "<hard> <soft> <soft
    /// seconds>", like client-output-buffer-limit pubsub [default: "32mb 8mb 60"].
    #[arg(long, value_name = "LIMITS")]
    client_output_buffer_limit_pubsub: Option<Text>,
    /// Hard cap on the log when retention keeps older segments for the cached snapshot (default
    /// twice --log-size).
    #[arg(long, value_name = "SIZE")]
    log_max_size: Option<Size>,
    /// Where fresh snapshots come from, in order: replicas, master [default: replicas,master].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    snapshot_sources: Vec<String>,
    /// Replica addresses (IP:PORT as announced) never asked for a snapshot; repeatable or comma-separated.
    #[arg(long, value_name = "IP:PORT", value_delimiter = ',')]
    snapshot_source_exclude: Vec<String>,
    /// Password for AUTH to a replica asked for a snapshot (default: the upstream password; or set
    /// REDIS_RELAY_SNAPSHOT_SOURCE_PASSWORD).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_SNAPSHOT_SOURCE_PASSWORD", hide_env_values = true)]
    snapshot_source_password: Option<Text>,
    /// Least time between two snapshot fetches from the master (each one a fork there) [default: 15m].
    #[arg(long, value_name = "DURATION")]
    snapshot_min_interval: Option<Duration>,
    /// Clients (replicas included) served at once; more get "-ERR max number of clients reached".
    /// RLIMIT_NOFILE is raised to fit, or maxclients lowered (see INFO clients maxclients) [default: 10000].
    #[arg(long, value_name = "N")]
    maxclients: Option<Text>,
    /// Close a client idle for this long (like redis.conf timeout; replicas and subscribers are
    /// exempt); 0 is off [default: 0].
    #[arg(long, value_name = "DURATION")]
    timeout: Option<Duration>,
    /// Total memory of the clients' query and output buffers (redis.conf maxmemory-clients; the
    /// MULTI queues included); past it the biggest clients are evicted. 0 is off [default: 64mb].
    #[arg(long, value_name = "SIZE")]
    maxmemory_clients: Option<Size>,
    /// One client's query buffer plus MULTI queue (redis.conf client-query-buffer-limit); a client
    /// past it is closed; at least 1mb [default: 1gb].
    #[arg(long, value_name = "SIZE")]
    client_query_buffer_limit: Option<Size>,
    /// Announce this version to the master with REPLCONF version (x.y.z), as Valkey 8+ replicas
    /// do: a Valkey 9 master then writes the RDB format replicas of that version load.
    #[arg(long, value_name = "X.Y.Z")]
    upstream_announce_version: Option<Text>,
    /// Refuse a replica caught in a full-sync loop (it asks again within seconds of each of two
    /// unacknowledged full syncs) for this long, doubling each time; 0 turns the loop detection off
    /// [default: 30s].
    #[arg(long, value_name = "DURATION")]
    replica_resync_backoff: Option<Duration>,
    /// The longest backoff of a looping replica [default: 30m].
    #[arg(long, value_name = "DURATION")]
    replica_resync_backoff_max: Option<Duration>,
    /// Log format: text or json. Filter with RUST_LOG.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a YAML configuration file (with the flags given before the subcommand merged over
    /// it) and exit.
    CheckConfig { file: PathBuf },
}

/// The command line as a layer over the file. With a file, values that came from `REDIS_RELAY_*`
/// environment variables are left out: they describe the single relay of a file-less start (a
/// file takes `${VAR}` instead), so an image's environment does not override a mounted file.
fn overrides(cli: Cli, matches: &ArgMatches, with_file: bool) -> config::Overrides {
    let keep = |id: &str, value: Option<Text>| {
        value.filter(|_| !(with_file && matches.value_source(id) == Some(ValueSource::EnvVariable)))
    };
    let list = |items: Vec<String>| (!items.is_empty()).then_some(List(items));
    let upstream = config::UpstreamSettings {
        addr: keep("upstream", cli.upstream),
        user: cli.upstream_user,
        password: keep("upstream_password", cli.upstream_password),
        tls: cli.upstream_tls,
        tls_ca_cert_file: cli.upstream_tls_ca_cert_file,
        tls_cert_file: cli.upstream_tls_cert_file,
        tls_key_file: cli.upstream_tls_key_file,
        tls_server_name: cli.upstream_tls_server_name,
        announce_version: cli.upstream_announce_version,
    };
    config::Overrides {
        threads: cli.threads,
        fanout_priority: cli.fanout_priority,
        metrics: config::MetricsSettings {
            listen: keep("metrics", cli.metrics),
            auth: keep("metrics_auth", cli.metrics_auth),
            tls_cert_file: cli.metrics_tls_cert_file,
            tls_key_file: cli.metrics_tls_key_file,
            tls_ca_cert_file: cli.metrics_tls_ca_cert_file,
        },
        relay: config::RelaySettings {
            name: None,
            upstream: Some(upstream),
            listen: keep("listen", cli.listen),
            dir: keep("dir", cli.dir),
            requirepass: keep("requirepass", cli.requirepass),
            tls_listen: cli.tls_listen,
            tls_cert_file: cli.tls_cert_file,
            tls_key_file: cli.tls_key_file,
            tls_ca_cert_file: cli.tls_ca_cert_file,
            tls_auth_clients: cli.tls_auth_clients,
            snapshot_source_password: keep("snapshot_source_password", cli.snapshot_source_password),
            log_size: cli.log_size,
            log_memory: cli.log_memory,
            log_segment_size: cli.log_segment_size,
            log_max_size: cli.log_max_size,
            log_max_age: cli.log_max_age,
            appendfsync: cli.appendfsync,
            repl_timeout: cli.repl_timeout,
            repl_diskless_sync: cli.repl_diskless_sync,
            history_reset: cli.history_reset,
            history_reset_min_key_ratio: cli.history_reset_min_key_ratio,
            replicaof: cli.replicaof,
            upstream_ack: cli.upstream_ack,
            ack_replicas: cli.ack_replicas,
            client_output_buffer_limit_pubsub: cli.client_output_buffer_limit_pubsub,
            snapshot_sources: list(cli.snapshot_sources),
            snapshot_source_exclude: list(cli.snapshot_source_exclude),
            snapshot_min_interval: cli.snapshot_min_interval,
            maxclients: cli.maxclients,
            timeout: cli.timeout,
            maxmemory_clients: cli.maxmemory_clients,
            client_query_buffer_limit: cli.client_query_buffer_limit,
            replica_resync_backoff: cli.replica_resync_backoff,
            replica_resync_backoff_max: cli.replica_resync_backoff_max,
            users: (!cli.users.is_empty())
                .then(|| cli.users.iter().filter_map(|text| config::UserSettings::from_flag(text)).collect()),
        },
    }
}

/// Raises RLIMIT_NOFILE for every relay's maxclients plus the reserves, as redis-server does at
/// start, and says so when it cannot (maxclients is then lowered; INFO shows the value in force).
fn adjust_open_files_limit(config: &Config) {
    let maxclients: Vec<u64> = config.relays.iter().map(|r| r.maxclients).collect();
    let budget = redis_relay::limits::adjust_open_files_limit(&maxclients);
    match &budget.shortfall {
        None => tracing::info!(limit = budget.limit, wanted = budget.wanted, "open files limit"),
        Some(reason) => tracing::warn!(
            wanted = budget.wanted,
            limit = budget.limit,
            client_cap = budget.client_cap,
            "cannot raise the open files limit to {} ({reason}): maxclients reduced to {} clients in total to compensate for the low ulimit",
            budget.wanted,
            budget.client_cap
        ),
    }
}

fn init_tracing(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().init(),
        other => bail!("--log-format: expected text or json, got {other:?}"),
    }
    Ok(())
}

/// The relays of this process by name, started and stopped as the configuration says.
struct Supervisor {
    relays: BTreeMap<String, RunningRelay>,
}

impl Supervisor {
    /// Brings the running set to `config`: removed relays stop, new ones start, changed ones restart
    /// alone, unchanged ones are not touched.
    async fn apply(&mut self, config: &Config) -> anyhow::Result<()> {
        let wanted: BTreeMap<&str, &RelayConfig> = config.relays.iter().map(|r| (r.name.as_str(), r)).collect();
        let stale: Vec<String> = self
            .relays
            .iter()
            .filter(|(name, running)| wanted.get(name.as_str()).is_none_or(|w| **w != running.config))
            .map(|(name, _)| name.clone())
            .collect();
        stop_concurrently(stale.iter().filter_map(|name| self.relays.remove(name))).await;
        let mut failures = Vec::new();
        for relay in &config.relays {
            if self.relays.contains_key(&relay.name) {
                continue;
            }
            match RunningRelay::start(relay.clone()).await {
                Ok(running) => {
                    self.relays.insert(relay.name.clone(), running);
                }
                Err(error) => failures.push(error.to_string()),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("{}", failures.join("; "))
        }
    }

    /// Reads every relay's certificate files again, so renewed certificates need no restart; a relay
    /// whose files cannot be read keeps the certificates it has.
    async fn reload_tls(&self) {
        for (name, running) in &self.relays {
            let context = running.context.clone();
            match tokio::task::spawn_blocking(move || context.reload_tls()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(relay = %name, "TLS certificates not reloaded: {error}"),
                Err(error) => tracing::error!(relay = %name, "TLS reload task failed: {error}"),
            }
        }
    }

    async fn stop_all(&mut self) {
        stop_concurrently(std::mem::take(&mut self.relays).into_values()).await;
    }
}

/// Stops relays side by side (each drains its sessions and fsyncs its log), so a stop takes as
/// long as the slowest relay, not their sum.
async fn stop_concurrently(relays: impl Iterator<Item = RunningRelay>) {
    let mut stopping = tokio::task::JoinSet::new();
    for running in relays {
        stopping.spawn(running.stop());
    }
    while stopping.join_next().await.is_some() {}
}

/// Reads the command line and the configuration, then runs the relays on a runtime of `threads`
/// workers (the log writers and blocking I/O have threads of their own).
fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let check = cli.command.as_ref().map(|Command::CheckConfig { file }| file.clone());
    let file = check.clone().or_else(|| cli.config.clone());
    let log_format = cli.log_format.clone();
    if cli.users.iter().any(|text| config::UserSettings::from_flag(text).is_none()) {
        bail!("--user: expected NAME:ROLES:PASSWORD, e.g. sentinel:monitor,admin:secret");
    }
    let overrides = overrides(cli, &matches, file.is_some());
    if let Some(file) = check {
        let config = Config::load(Some(&file), &overrides)?;
        println!("{}: OK, {} relay(s)", file.display(), config.relays.len());
        return Ok(());
    }
    init_tracing(&log_format)?;
    let config = Config::load(file.as_deref(), &overrides)?;
    let fanout_priority = config.fanout_priority;
    redis_relay::limits::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .thread_name("relay-worker")
        // Blocking-pool threads (disk reads, sendfile, snapshot files) end 2 s after their last
        // job instead of 10 s, so their stacks do not stay resident long after a burst.
        .thread_keep_alive(std::time::Duration::from_secs(2))
        // Workers and blocking-pool threads alike: the disk tier's sendfiles are fan-out too.
        .on_thread_start(move || {
            // Blocking-pool threads come and go: say it once, not for each of them.
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if let Err(error) = redis_relay::limits::apply_fanout_priority(fanout_priority) {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(fanout_priority = fanout_priority.as_str(), "fanout_priority not applied: {error}");
                }
            }
        })
        .enable_all()
        .build()
        .context("starting the runtime")?;
    tracing::info!(threads = config.threads, fanout_priority = fanout_priority.as_str(), "runtime started");
    runtime.block_on(serve(config, file, overrides))
}

/// Runs the relays of `config` until SIGTERM or SIGINT, reloading `file` on SIGHUP.
async fn serve(mut config: Config, file: Option<PathBuf>, overrides: config::Overrides) -> anyhow::Result<()> {
    let mut metrics_acceptor = None;
    if let Some(addr) = config.metrics {
        if let Some(tls) = &config.metrics_tls {
            let settings = tls.acceptor_settings(addr);
            let acceptor = tokio::task::spawn_blocking(move || TlsAcceptor::new(&settings))
                .await?
                .context("metrics endpoint TLS")?;
            metrics_acceptor = Some(Arc::new(acceptor));
        }
        redis_relay::install_metrics(addr, config.metrics_auth.clone(), metrics_acceptor.clone())?;
        let scheme = if metrics_acceptor.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "metrics endpoint listening on /metrics");
    }
    adjust_open_files_limit(&config);
    let mut supervisor = Supervisor { relays: BTreeMap::new() };
    supervisor.apply(&config).await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                supervisor.reload_tls().await;
                if let Some(acceptor) = metrics_acceptor.clone() {
                    match tokio::task::spawn_blocking(move || acceptor.reload()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::error!("metrics endpoint TLS certificates not reloaded: {error}"),
                        Err(error) => tracing::error!("metrics TLS reload task failed: {error}"),
                    }
                }
                let Some(file) = &file else {
                    tracing::info!("SIGHUP: certificates reloaded; no --config file to reload");
                    continue;
                };
                // The YAML file and the users' password files are read on the blocking pool, not on
                // a worker that serves replicas.
                let (path, layer) = (file.clone(), overrides.clone());
                let loaded = tokio::task::spawn_blocking(move || Config::load(Some(&path), &layer)).await;
                let loaded = match loaded {
                    Ok(loaded) => loaded,
                    Err(error) => {
                        tracing::error!("reload: the configuration task failed: {error}");
                        continue;
                    }
                };
                match loaded {
                    Ok(new_config) => {
                        if new_config.metrics != config.metrics
                            || new_config.metrics_auth != config.metrics_auth
                            || new_config.metrics_tls != config.metrics_tls
                        {
                            tracing::warn!("metrics.listen, metrics.auth or the metrics TLS files changed: it takes effect at the next restart");
                        }
                        if new_config.threads != config.threads {
                            tracing::warn!(threads = new_config.threads, "threads changed: it takes effect at the next restart");
                        }
                        if new_config.fanout_priority != config.fanout_priority {
                            tracing::warn!(
                                fanout_priority = new_config.fanout_priority.as_str(),
                                "fanout_priority changed: it takes effect at the next restart"
                            );
                        }
                        tracing::info!(file = %file.display(), relays = new_config.relays.len(), "reloading the configuration");
                        adjust_open_files_limit(&new_config);
                        if let Err(error) = supervisor.apply(&new_config).await {
                            tracing::error!("reload: some relays did not start: {error}");
                        }
                        config = new_config;
                    }
                    Err(error) => tracing::error!("reload refused, the running topology stays: {error}"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    supervisor.stop_all().await;
    Ok(())
}
