//! The `redis-relay` binary: parses the command line or the YAML file, starts every relay, and stops
//! them all on SIGINT or SIGTERM through one shutdown signal.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use tokio::signal::unix::{signal, SignalKind};

use redis_relay::config::{self, Config, RelayConfig};
use redis_relay::downstream::pubsub::OutputBufferLimit;
use redis_relay::downstream::ReplicaofPolicy;
use redis_relay::log::{FsyncPolicy, LogOptions};
use redis_relay::relay::RunningRelay;
use redis_relay::upstream::history::HistoryResetPolicy;
use redis_relay::upstream::AckMode;

/// A Redis replication relay: one replica of the master, a master to many replicas.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML file describing the relays (instead of the single-relay flags).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The master to replicate, HOST:PORT (or set REDIS_RELAY_UPSTREAM).
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_UPSTREAM")]
    upstream: Option<String>,
    /// Where replicas and clients connect, HOST:PORT (or set REDIS_RELAY_LISTEN).
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_LISTEN")]
    listen: Option<String>,
    /// Data directory: replication log and snapshot cache (or set REDIS_RELAY_DIR).
    #[arg(long, value_name = "PATH", env = "REDIS_RELAY_DIR")]
    dir: Option<PathBuf>,
    /// Prometheus endpoint, HOST:PORT, serving /metrics (or set REDIS_RELAY_METRICS).
    #[arg(long, value_name = "HOST:PORT", env = "REDIS_RELAY_METRICS")]
    metrics: Option<String>,
    /// Credentials /metrics requires: bearer:TOKEN or basic:USER:PASSWORD (or set
    /// REDIS_RELAY_METRICS_AUTH).
    #[arg(long, value_name = "AUTH", env = "REDIS_RELAY_METRICS_AUTH", hide_env_values = true)]
    metrics_auth: Option<String>,
    /// ACL user for AUTH to the master.
    #[arg(long, value_name = "U")]
    upstream_user: Option<String>,
    /// Password for AUTH to the master (or set REDIS_RELAY_UPSTREAM_PASSWORD).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_UPSTREAM_PASSWORD", hide_env_values = true)]
    upstream_password: Option<String>,
    /// Replication log retention on disk, in Redis units (64mb, 1gb).
    #[arg(long, value_name = "SIZE", default_value = "1gb")]
    log_size: String,
    /// Newest part of the log also kept in memory for live fan-out.
    #[arg(long, value_name = "SIZE", default_value = "64mb")]
    log_memory: String,
    /// Size of one log segment file.
    #[arg(long, value_name = "SIZE", default_value = "64mb")]
    log_segment_size: String,
    /// Also drop log segments older than this (e.g. 24h); off by default.
    #[arg(long, value_name = "DURATION")]
    log_max_age: Option<String>,
    /// When the log is fsynced: always, everysec or no (like appendfsync). The FACK (or, with
    /// --upstream-ack durable, the ACK) to the master covers what is durable under it.
    #[arg(long, value_name = "POLICY", default_value = "everysec")]
    appendfsync: String,
    /// Replication timeout, both directions (60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    repl_timeout: String,
    /// Serve full syncs in the EOF-marked (diskless) form to replicas that support it.
    #[arg(long, value_name = "yes|no", default_value = "no")]
    repl_diskless_sync: String,
    /// Password clients and replicas must give with AUTH (like requirepass; or set
    /// REDIS_RELAY_REQUIREPASS).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_REQUIREPASS", hide_env_values = true)]
    requirepass: Option<String>,
    /// When the master presents another history with far fewer keys (e.g. it restarted empty):
    /// hold (keep serving the old dataset until RELAY HISTORY ACCEPT) or follow.
    #[arg(long, value_name = "hold|follow", default_value = "hold")]
    history_reset: String,
    /// A new history with fewer keys than this fraction of the cached snapshot's is held (an
    /// empty one always is, when the snapshot has keys).
    #[arg(long, value_name = "RATIO", default_value = "0.5")]
    history_reset_min_key_ratio: String,
    /// Whether clients may repoint the relay with REPLICAOF/SLAVEOF (allow or deny).
    #[arg(long, value_name = "allow|deny", default_value = "allow")]
    replicaof: String,
    /// What the relay ACKs to its master: fack (ACK applied, FACK durable, like a Redis 7.2+
    /// replica with AOF) or durable (ACK only what is fsynced).
    #[arg(long, value_name = "fack|durable", default_value = "fack")]
    upstream_ack: String,
    /// TLS to the master: yes or no.
    #[arg(long, value_name = "yes|no")]
    upstream_tls: Option<String>,
    /// CA bundle (PEM) the master's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    upstream_tls_ca_cert_file: Option<String>,
    /// Client certificate (PEM) for a master with tls-auth-clients.
    #[arg(long, value_name = "FILE")]
    upstream_tls_cert_file: Option<String>,
    /// Key (PEM) of the client certificate.
    #[arg(long, value_name = "FILE")]
    upstream_tls_key_file: Option<String>,
    /// Name the master's certificate must carry (default: the upstream host).
    #[arg(long, value_name = "NAME")]
    upstream_tls_server_name: Option<String>,
    /// TLS listener for replicas and clients, HOST:PORT (beside --listen).
    #[arg(long, value_name = "HOST:PORT")]
    tls_listen: Option<String>,
    /// Certificate (PEM) of the TLS listener.
    #[arg(long, value_name = "FILE")]
    tls_cert_file: Option<String>,
    /// Key (PEM) of the TLS listener's certificate.
    #[arg(long, value_name = "FILE")]
    tls_key_file: Option<String>,
    /// CA bundle (PEM) client certificates must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca_cert_file: Option<String>,
    /// Whether TLS clients must present a certificate: yes, no or optional (as tls-auth-clients).
    #[arg(long, value_name = "yes|no|optional")]
    tls_auth_clients: Option<String>,
    /// End-to-end ACKs: with K >= 1 the relay ACKs to its master only what K of its own replicas
    /// have ACKed (so WAIT on the master counts replicas below the relay); 0 ACKs as the relay.
    #[arg(long, value_name = "K", default_value_t = 0)]
    ack_replicas: usize,
    /// Disconnect a pub/sub client holding more unsent messages than this: "<hard> <soft> <soft
    /// seconds>", like client-output-buffer-limit pubsub.
    #[arg(long, value_name = "LIMITS", default_value = "32mb 8mb 60")]
    client_output_buffer_limit_pubsub: String,
    /// Hard cap on the log when retention keeps older segments for the cached snapshot (default
    /// twice --log-size).
    #[arg(long, value_name = "SIZE")]
    log_max_size: Option<String>,
    /// Where fresh snapshots come from, in order: replicas, master.
    #[arg(long, value_name = "LIST", default_value = "replicas,master", value_delimiter = ',')]
    snapshot_sources: Vec<String>,
    /// Replica addresses (IP:PORT as announced) never asked for a snapshot; repeatable or comma-separated.
    #[arg(long, value_name = "IP:PORT", value_delimiter = ',')]
    snapshot_source_exclude: Vec<String>,
    /// Password for AUTH to a replica asked for a snapshot (default: the upstream password; or set
    /// REDIS_RELAY_SNAPSHOT_SOURCE_PASSWORD).
    #[arg(long, value_name = "P", env = "REDIS_RELAY_SNAPSHOT_SOURCE_PASSWORD", hide_env_values = true)]
    snapshot_source_password: Option<String>,
    /// Least time between two snapshot fetches from the master (each one a fork there).
    #[arg(long, value_name = "DURATION", default_value = "15m")]
    snapshot_min_interval: String,
    /// Clients (replicas included) served at once; more get "-ERR max number of clients reached".
    /// RLIMIT_NOFILE is raised to fit, or maxclients lowered (see INFO clients maxclients).
    #[arg(long, value_name = "N", default_value_t = redis_relay::limits::DEFAULT_MAXCLIENTS)]
    maxclients: u64,
    /// Close a client idle for this long (like redis.conf timeout; replicas and subscribers are
    /// exempt); 0 is off.
    #[arg(long, value_name = "DURATION", default_value = "0")]
    timeout: String,
    /// Log format: text or json. Filter with RUST_LOG.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a YAML configuration file and exit.
    CheckConfig { file: PathBuf },
}

fn config_from_flags(cli: &Cli) -> anyhow::Result<Config> {
    let (Some(upstream), Some(listen), Some(dir)) = (&cli.upstream, &cli.listen, &cli.dir) else {
        bail!("give --config FILE, or --upstream HOST:PORT --listen HOST:PORT --dir PATH");
    };
    let size = |flag: &str, text: &str| {
        config::parse_size(text).with_context(|| format!("{flag}: expected a size such as 64mb, got {text:?}"))
    };
    let retention = size("--log-size", &cli.log_size)?;
    if retention < 16 * 1024 {
        bail!("--log-size: the log must hold at least 16kb, got {:?}", cli.log_size);
    }
    let max_size = match &cli.log_max_size {
        Some(text) => size("--log-max-size", text)?,
        None => retention.saturating_mul(2),
    };
    if max_size < retention {
        bail!("--log-max-size: must be at least --log-size, got {:?}", cli.log_max_size.as_deref().unwrap_or(""));
    }
    let log = LogOptions {
        retention,
        max_size,
        memory: size("--log-memory", &cli.log_memory)?.min(retention),
        segment_size: size("--log-segment-size", &cli.log_segment_size)?.max(64 * 1024),
        max_age: cli
            .log_max_age
            .as_deref()
            .map(|text| {
                config::parse_duration(text)
                    .with_context(|| format!("--log-max-age: expected a duration such as 24h, got {text:?}"))
            })
            .transpose()?,
        fsync: FsyncPolicy::parse(&cli.appendfsync)
            .with_context(|| format!("--appendfsync: expected always, everysec or no, got {:?}", cli.appendfsync))?,
    };
    if cli.maxclients == 0 {
        bail!("--maxclients: must be at least 1");
    }
    let repl_timeout = config::parse_duration(&cli.repl_timeout)
        .with_context(|| format!("--repl-timeout: expected a duration such as 60s, got {:?}", cli.repl_timeout))?;
    let downstream_eof_form = match cli.repl_diskless_sync.as_str() {
        "yes" => true,
        "no" => false,
        other => bail!("--repl-diskless-sync: expected yes or no, got {other:?}"),
    };
    let history_reset = HistoryResetPolicy::parse(&cli.history_reset)
        .with_context(|| format!("--history-reset: expected hold or follow, got {:?}", cli.history_reset))?;
    let history_reset_min_key_ratio = config::parse_ratio(&cli.history_reset_min_key_ratio).with_context(|| {
        format!(
            "--history-reset-min-key-ratio: expected a fraction from 0 to 1, got {:?}",
            cli.history_reset_min_key_ratio
        )
    })?;
    let replicaof = ReplicaofPolicy::parse(&cli.replicaof)
        .with_context(|| format!("--replicaof: expected allow or deny, got {:?}", cli.replicaof))?;
    let upstream_ack = AckMode::parse(&cli.upstream_ack)
        .with_context(|| format!("--upstream-ack: expected fack or durable, got {:?}", cli.upstream_ack))?;
    let pubsub_output_limit = OutputBufferLimit::parse(&cli.client_output_buffer_limit_pubsub).with_context(|| {
        format!(
            "--client-output-buffer-limit-pubsub: expected <hard> <soft> <soft seconds> such as \"32mb 8mb 60\", got {:?}",
            cli.client_output_buffer_limit_pubsub
        )
    })?;
    let sources =
        config::parse_sources(&cli.snapshot_sources).map_err(|m| anyhow::anyhow!("--snapshot-sources: {m}"))?;
    for addr in &cli.snapshot_source_exclude {
        config::check_upstream("--snapshot-source-exclude", addr)?;
    }
    let snapshot = config::SnapshotSourcing {
        sources,
        exclude: cli.snapshot_source_exclude.clone(),
        password: cli.snapshot_source_password.clone(),
        master_min_interval: config::parse_duration(&cli.snapshot_min_interval).with_context(|| {
            format!("--snapshot-min-interval: expected a duration such as 15m, got {:?}", cli.snapshot_min_interval)
        })?,
    };
    let metrics = match &cli.metrics {
        Some(addr) => Some(config::parse_listen("--metrics", addr)?),
        None => None,
    };
    let metrics_auth = match &cli.metrics_auth {
        Some(text) => Some(
            redis_relay::metrics::http::MetricsAuth::parse(text)
                .context("--metrics-auth: expected bearer:TOKEN or basic:USER:PASSWORD")?,
        ),
        None => None,
    };
    let config = Config {
        metrics,
        metrics_auth,
        relays: vec![RelayConfig {
            upstream_tls: config::upstream_tls(
                "--upstream-tls-",
                &config::UpstreamTlsFields {
                    tls: cli.upstream_tls.clone(),
                    ca_cert_file: cli.upstream_tls_ca_cert_file.clone(),
                    cert_file: cli.upstream_tls_cert_file.clone(),
                    key_file: cli.upstream_tls_key_file.clone(),
                    server_name: cli.upstream_tls_server_name.clone(),
                },
            )?,
            tls: config::downstream_tls(
                "--tls-",
                &config::DownstreamTlsFields {
                    listen: cli.tls_listen.clone(),
                    cert_file: cli.tls_cert_file.clone(),
                    key_file: cli.tls_key_file.clone(),
                    ca_cert_file: cli.tls_ca_cert_file.clone(),
                    auth_clients: cli.tls_auth_clients.clone(),
                },
            )?,
            name: "default".into(),
            upstream: config::check_upstream("--upstream", upstream)?,
            upstream_user: cli.upstream_user.clone(),
            upstream_password: cli.upstream_password.clone(),
            listen: config::parse_listen("--listen", listen)?,
            dir: dir.clone(),
            log,
            repl_timeout,
            downstream_eof_form,
            requirepass: cli.requirepass.clone(),
            history_reset,
            history_reset_min_key_ratio,
            replicaof,
            upstream_ack,
            ack_replicas: cli.ack_replicas,
            pubsub_output_limit,
            snapshot,
            maxclients: cli.maxclients,
            timeout: config::parse_duration(&cli.timeout)
                .with_context(|| format!("--timeout: expected a duration such as 300s, or 0, got {:?}", cli.timeout))?,
        }],
    };
    config.validate()?;
    Ok(config)
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
        for name in stale {
            if let Some(running) = self.relays.remove(&name) {
                running.stop().await;
            }
        }
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
        for (_, running) in std::mem::take(&mut self.relays) {
            running.stop().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        let config = Config::from_file(file)?;
        println!("{}: OK, {} relay(s)", file.display(), config.relays.len());
        return Ok(());
    }
    init_tracing(&cli.log_format)?;
    let mut config = match &cli.config {
        Some(file) => Config::from_file(file)?,
        None => config_from_flags(&cli)?,
    };
    if let Some(addr) = config.metrics {
        redis_relay::metrics::install(addr, config.metrics_auth.clone())?;
        tracing::info!(%addr, "metrics endpoint listening on /metrics");
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
                let Some(file) = &cli.config else {
                    tracing::info!("SIGHUP: certificates reloaded; no --config file to reload");
                    continue;
                };
                match Config::from_file(file) {
                    Ok(new_config) => {
                        if new_config.metrics != config.metrics || new_config.metrics_auth != config.metrics_auth {
                            tracing::warn!("metrics.listen or metrics.auth changed: it takes effect at the next restart");
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
