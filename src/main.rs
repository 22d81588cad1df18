//! The `redis-relay` binary: parses the command line or the YAML file, starts every relay, and stops
//! them all on SIGINT or SIGTERM through one shutdown signal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tokio::task::JoinSet;

use redis_relay::config::{self, Config, RelayConfig};
use redis_relay::log::{FsyncPolicy, LogOptions};

/// A Redis replication relay: one replica of the master, a master to many replicas.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML file describing the relays (instead of the single-relay flags).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The master to replicate, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// Where replicas and clients connect, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Data directory (snapshot cache).
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Prometheus endpoint, HOST:PORT (serves /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
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
    /// When the log is fsynced: always, everysec or no (like appendfsync). Upstream ACKs only cover
    /// what is durable under it.
    #[arg(long, value_name = "POLICY", default_value = "everysec")]
    appendfsync: String,
    /// Replication timeout, both directions (60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    repl_timeout: String,
    /// Serve full syncs in the EOF-marked (diskless) form to replicas that support it.
    #[arg(long, value_name = "yes|no", default_value = "no")]
    repl_diskless_sync: String,
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
    let log = LogOptions {
        retention,
        memory: size("--log-memory", &cli.log_memory)?.min(retention),
        segment_size: size("--log-segment-size", &cli.log_segment_size)?.max(64 * 1024),
        fsync: FsyncPolicy::parse(&cli.appendfsync)
            .with_context(|| format!("--appendfsync: expected always, everysec or no, got {:?}", cli.appendfsync))?,
    };
    let repl_timeout = config::parse_duration(&cli.repl_timeout)
        .with_context(|| format!("--repl-timeout: expected a duration such as 60s, got {:?}", cli.repl_timeout))?;
    let downstream_eof_form = match cli.repl_diskless_sync.as_str() {
        "yes" => true,
        "no" => false,
        other => bail!("--repl-diskless-sync: expected yes or no, got {other:?}"),
    };
    let metrics = match &cli.metrics {
        Some(addr) => Some(config::parse_listen("--metrics", addr)?),
        None => None,
    };
    let config = Config {
        metrics,
        relays: vec![RelayConfig {
            name: "default".into(),
            upstream: config::check_upstream("--upstream", upstream)?,
            upstream_user: cli.upstream_user.clone(),
            upstream_password: cli.upstream_password.clone(),
            listen: config::parse_listen("--listen", listen)?,
            dir: dir.clone(),
            log,
            repl_timeout,
            downstream_eof_form,
        }],
    };
    config.validate()?;
    Ok(config)
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

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
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
    let config = match &cli.config {
        Some(file) => Config::from_file(file)?,
        None => config_from_flags(&cli)?,
    };
    if let Some(addr) = config.metrics {
        redis_relay::metrics::install(addr)?;
        tracing::info!(%addr, "metrics endpoint listening on /metrics");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for relay in config.relays {
        redis_relay::relay::start(relay, shutdown_rx.clone(), &mut tasks).await?;
    }
    shutdown_signal().await?;
    tracing::info!("shutting down");
    shutdown_tx.send_replace(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tracing::warn!("some tasks did not stop within 10 s");
    }
    Ok(())
}
