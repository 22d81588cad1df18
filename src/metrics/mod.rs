//! Prometheus metrics: the `/metrics` endpoint ([`http`]: our own small server, the recorder only
//! renders the text), and a collector per relay that samples the relay's state once a second.
//!
//! The metrics registry is the one piece of global state (the `metrics` facade's recorder). Values are
//! read from the same state `INFO` shows (upstream status, log summary, replica table, served
//! counters), so the two always agree. Every series carries the `relay` label; per-replica series also
//! `replica` (`ip:port`) and disappear a few seconds after the replica does (idle timeout).
//! Names follow Prometheus conventions: `_bytes`, `_seconds`, `_total`.

pub mod http;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;
use tokio::sync::watch;

use crate::context::{RelayContext, ServedStats};
use crate::downstream::ReplicaState;
use crate::report::RelayReport;
use crate::shutdown::stopped;
use crate::upstream::fetch::REFUSAL_REASONS;

/// Connections the metrics endpoint serves at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 16;

/// How often the collector samples, and how long a series survives without a sample.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);
const SERIES_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics endpoint on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Every metric the relay exports: name, kind, unit, help. The README's table and the deploy files
/// use these names; a test checks that a live scrape has them all.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("redis_relay_upstream_link_up", Kind::Gauge, "1 when the replication link to the master is up"),
    ("redis_relay_listener_up", Kind::Gauge, "1 when the listener (plain/tls) is bound, 0 while its bind is retried"),
    ("redis_relay_listen_errors_total", Kind::Counter, "Failed attempts to bind a listen address"),
    ("redis_relay_upstream_offset_bytes", Kind::Gauge, "Master offset read so far (slave_read_repl_offset)"),
    ("redis_relay_offset_bytes", Kind::Gauge, "The relay's applied offset (master_repl_offset)"),
    ("redis_relay_upstream_lag_bytes", Kind::Gauge, "Bytes read from the master but not yet applied"),
    ("redis_relay_upstream_last_io_seconds", Kind::Gauge, "Seconds since the last byte from the master"),
    ("redis_relay_upstream_reconnects_total", Kind::Counter, "Times the upstream link was lost and retried"),
    ("redis_relay_upstream_received_bytes_total", Kind::Counter, "Bytes read from the master"),
    ("redis_relay_log_first_offset_bytes", Kind::Gauge, "Offset of the first byte the log holds"),
    ("redis_relay_log_last_offset_bytes", Kind::Gauge, "Offset of the last byte the log holds"),
    ("redis_relay_log_durable_offset_bytes", Kind::Gauge, "Offset up to which the log is fsynced"),
    ("redis_relay_log_disk_bytes", Kind::Gauge, "Bytes of log segments on disk"),
    ("redis_relay_log_memory_bytes", Kind::Gauge, "Bytes of the log's in-memory tail"),
    ("redis_relay_log_retention_bytes", Kind::Gauge, "Configured log retention (log_size)"),
    ("redis_relay_snapshot_offset_bytes", Kind::Gauge, "Master offset of the cached RDB (-1 if none)"),
    ("redis_relay_snapshot_size_bytes", Kind::Gauge, "Size of the cached RDB"),
    ("redis_relay_snapshot_age_seconds", Kind::Gauge, "Age of the cached RDB"),
    ("redis_relay_snapshot_keys", Kind::Gauge, "Keys in the cached RDB (-1 if unknown)"),
    (
        "redis_relay_history_reset_held",
        Kind::Gauge,
        "1 while the relay holds its old dataset against a master's new, much smaller history",
    ),
    ("redis_relay_rdb_fetches_total", Kind::Counter, "RDBs fetched from the master (each one a master fork)"),
    ("redis_relay_rdb_rejected_total", Kind::Counter, "RDB payloads from the master rejected as corrupt"),
    (
        "redis_relay_snapshot_refreshes_total",
        Kind::Counter,
        "Snapshots installed from a side fetch, by source (replica/master)",
    ),
    ("redis_relay_snapshot_refusals_total", Kind::Counter, "Snapshots refused from a source, by reason"),
    (
        "redis_relay_snapshot_master_rate_limited_total",
        Kind::Counter,
        "Master fetches skipped by snapshot_min_interval",
    ),
    (
        "redis_relay_log_held_for_snapshot_bytes",
        Kind::Gauge,
        "Log bytes kept beyond log_size so the cached snapshot stays usable",
    ),
    (
        "redis_relay_rdb_only_served_total",
        Kind::Counter,
        "rdb-only requests (redis-cli --rdb) by snapshot (fresh/cached)",
    ),
    ("redis_relay_full_syncs_served_total", Kind::Counter, "Full syncs served to replicas from the cache"),
    ("redis_relay_partial_syncs_total", Kind::Counter, "Partial resync requests, by result (accepted/refused)"),
    ("redis_relay_replicas", Kind::Gauge, "Connected replicas by state"),
    ("redis_relay_replica_ack_offset_bytes", Kind::Gauge, "Last offset a replica acknowledged"),
    ("redis_relay_replica_lag_bytes", Kind::Gauge, "Relay offset minus the replica's acknowledged offset"),
    ("redis_relay_replica_lag_seconds", Kind::Gauge, "Seconds since the replica's last ACK"),
    ("redis_relay_downstream_sent_bytes_total", Kind::Counter, "Bytes sent to replicas (RDB and stream)"),
    (
        "redis_relay_stream_sent_bytes_total",
        Kind::Counter,
        "Stream bytes sent to replicas by source (memory tail, disk read into memory, sendfile from the segment)",
    ),
    (
        "redis_relay_log_read_errors_total",
        Kind::Counter,
        "Replica streams ended by the log's disk: a failed read (io) or a record that failed its check (corrupt)",
    ),
    ("redis_relay_clients_memory_bytes", Kind::Gauge, "Memory of the clients' buffers (mem_clients_normal)"),
    ("redis_relay_evicted_clients_total", Kind::Counter, "Clients evicted at maxmemory-clients"),
    (
        "redis_relay_query_buffer_limit_disconnections_total",
        Kind::Counter,
        "Clients closed at client-query-buffer-limit",
    ),
    ("redis_relay_rejected_connections_total", Kind::Counter, "Connections refused at maxclients"),
    ("redis_relay_accept_errors_total", Kind::Counter, "Failed accepts on the listen port (EMFILE and the like)"),
    (
        "redis_relay_metrics_accept_errors_total",
        Kind::Counter,
        "Failed accepts on the metrics endpoint (process-wide, same value under every relay)",
    ),
    (
        "redis_relay_pubsub_limit_disconnections_total",
        Kind::Counter,
        "Pub/sub clients disconnected at client-output-buffer-limit pubsub",
    ),
    (
        "redis_relay_acl_denied_total",
        Kind::Counter,
        "Failed AUTHs (reason auth) and commands refused with NOPERM (reason command)",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// Installs the recorder, starts the `/metrics` HTTP endpoint on the current runtime (with `auth`
/// required if given, over TLS with `tls`) and describes every metric.
pub fn install(
    addr: SocketAddr,
    auth: Option<http::MetricsAuth>,
    tls: Option<Arc<crate::tls::TlsAcceptor>>,
) -> Result<(), MetricsError> {
    let listener = http::bind(addr).map_err(|e| MetricsError { addr, reason: e.to_string() })?;
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(SERIES_IDLE_TIMEOUT))
        .install_recorder()
        .map_err(|e| MetricsError { addr, reason: e.to_string() })?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        // Without the exporter's own listener, the idle-series sweep is ours to run.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(http::serve(listener, handle, auth, tls, MAX_CONNECTIONS));
    for (name, kind, help) in METRICS {
        let unit = if name.ends_with("_bytes") || name.ends_with("_bytes_total") {
            Some(Unit::Bytes)
        } else if name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else {
            None
        };
        match (kind, unit) {
            (Kind::Gauge, Some(unit)) => describe_gauge!(*name, unit, *help),
            (Kind::Gauge, None) => describe_gauge!(*name, *help),
            (Kind::Counter, Some(unit)) => describe_counter!(*name, unit, *help),
            (Kind::Counter, None) => describe_counter!(*name, *help),
        }
    }
    Ok(())
}

/// Samples one relay's state into its series every second until shutdown.
pub async fn collect(context: Arc<RelayContext>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => sample(&context),
            _ = stopped(&mut shutdown) => return,
        }
    }
}

fn sample(context: &RelayContext) {
    let relay = context.config.name.clone();
    let labels = [("relay", relay.clone())];
    let report = RelayReport::gather(context);
    let (upstream, log) = (&report.upstream, &report.log);
    gauge!("redis_relay_upstream_link_up", &labels).set(f64::from(u8::from(report.link_up())));
    let listeners = &context.listeners;
    let mut kinds = Vec::new();
    if context.config.listen.is_some() {
        kinds.push(("plain", &listeners.plain_bound));
    }
    if context.config.tls.is_some() {
        kinds.push(("tls", &listeners.tls_bound));
    }
    for (kind, bound) in kinds {
        let labels = [("relay", relay.clone()), ("listener", kind.to_string())];
        gauge!("redis_relay_listener_up", &labels).set(f64::from(u8::from(bound.load(Ordering::Relaxed))));
    }
    counter!("redis_relay_listen_errors_total", &labels).absolute(listeners.bind_errors.load(Ordering::Relaxed));
    gauge!("redis_relay_upstream_offset_bytes", &labels).set(report.read_offset().get() as f64);
    gauge!("redis_relay_offset_bytes", &labels).set(log.end.get() as f64);
    gauge!("redis_relay_upstream_lag_bytes", &labels).set(report.upstream_lag() as f64);
    gauge!("redis_relay_upstream_last_io_seconds", &labels).set(report.last_io_seconds().unwrap_or(-1.0));
    counter!("redis_relay_upstream_reconnects_total", &labels).absolute(upstream.reconnects);
    counter!("redis_relay_upstream_received_bytes_total", &labels).absolute(upstream.input_bytes);
    gauge!("redis_relay_log_first_offset_bytes", &labels).set(log.first_byte_offset() as f64);
    gauge!("redis_relay_log_last_offset_bytes", &labels).set(log.end.get() as f64);
    gauge!("redis_relay_log_durable_offset_bytes", &labels).set(log.durable.get() as f64);
    gauge!("redis_relay_log_disk_bytes", &labels).set(log.disk_bytes as f64);
    gauge!("redis_relay_log_memory_bytes", &labels).set(log.memory_bytes as f64);
    gauge!("redis_relay_log_retention_bytes", &labels).set(log.capacity as f64);
    let faults = context.log.write_faults();
    for (kind, count) in &faults.errors {
        let labels = [("relay", relay.clone()), ("kind", kind.to_string())];
        counter!("redis_relay_log_write_errors_total", &labels).absolute(*count);
    }
    gauge!("redis_relay_log_write_failing", &labels).set(f64::from(u8::from(faults.failing)));

    gauge!("redis_relay_snapshot_offset_bytes", &labels).set(report.snapshot_offset() as f64);
    gauge!("redis_relay_snapshot_size_bytes", &labels).set(report.snapshot_size() as f64);
    gauge!("redis_relay_snapshot_age_seconds", &labels).set(report.snapshot_age_seconds() as f64);
    gauge!("redis_relay_snapshot_keys", &labels).set(report.snapshot_keys() as f64);
    gauge!("redis_relay_history_reset_held", &labels).set(f64::from(u8::from(upstream.history_held.is_some())));
    counter!("redis_relay_rdb_fetches_total", &labels).absolute(upstream.rdb_fetches);
    counter!("redis_relay_rdb_rejected_total", &labels).absolute(upstream.rdb_rejected);
    counter!("redis_relay_snapshot_write_errors_total", &labels).absolute(upstream.snapshot_write_errors);

    let fetcher = &report.fetcher;
    for (source, value) in [("replica", fetcher.refreshes_replica), ("master", fetcher.refreshes_master)] {
        let labels = [("relay", relay.clone()), ("source", source.to_string())];
        counter!("redis_relay_snapshot_refreshes_total", &labels).absolute(value);
    }
    for reason in REFUSAL_REASONS {
        let labels = [("relay", relay.clone()), ("reason", reason.to_string())];
        counter!("redis_relay_snapshot_refusals_total", &labels).absolute(report.snapshot_refusals(reason));
    }
    counter!("redis_relay_snapshot_master_rate_limited_total", &labels).absolute(fetcher.master_rate_limited);
    gauge!("redis_relay_log_held_for_snapshot_bytes", &labels).set(report.held_for_snapshot as f64);

    let stats = &context.stats;
    for (kind, value) in [("fresh", &stats.rdb_only_fresh), ("cached", &stats.rdb_only_cached)] {
        let labels = [("relay", relay.clone()), ("snapshot", kind.to_string())];
        counter!("redis_relay_rdb_only_served_total", &labels).absolute(ServedStats::get(value));
    }
    counter!("redis_relay_full_syncs_served_total", &labels).absolute(ServedStats::get(&stats.sync_full));
    let guard = &context.sync_guard;
    for (reason, value) in [("rdb_version", &guard.refused_rdb_version), ("resync_loop", &guard.refused_resync_loop)] {
        let labels = [("relay", relay.clone()), ("reason", reason.to_string())];
        counter!("redis_relay_full_syncs_refused_total", &labels).absolute(value.load(Ordering::Relaxed));
    }
    gauge!("redis_relay_replicas_in_resync_backoff", &labels).set(guard.in_backoff() as f64);
    for (result, value) in [("accepted", &stats.sync_partial_ok), ("refused", &stats.sync_partial_err)] {
        let labels = [("relay", relay.clone()), ("result", result.to_string())];
        counter!("redis_relay_partial_syncs_total", &labels).absolute(ServedStats::get(value));
    }
    counter!("redis_relay_downstream_sent_bytes_total", &labels).absolute(ServedStats::get(&stats.repl_output_bytes));
    for (source, value) in
        [("memory", &stats.stream_from_memory), ("disk", &stats.stream_from_disk), ("sendfile", &stats.stream_sendfile)]
    {
        let labels = [("relay", relay.clone()), ("source", source.to_string())];
        counter!("redis_relay_stream_sent_bytes_total", &labels).absolute(ServedStats::get(value));
    }
    for (kind, value) in [("io", &stats.log_read_errors), ("corrupt", &stats.log_read_corrupt)] {
        let labels = [("relay", relay.clone()), ("kind", kind.to_string())];
        counter!("redis_relay_log_read_errors_total", &labels).absolute(ServedStats::get(value));
    }
    counter!("redis_relay_pubsub_limit_disconnections_total", &labels).absolute(context.pubsub.limit_disconnections());
    gauge!("redis_relay_clients_memory_bytes", &labels).set(context.client_memory.total() as f64);
    counter!("redis_relay_evicted_clients_total", &labels).absolute(context.client_memory.evicted());
    counter!("redis_relay_query_buffer_limit_disconnections_total", &labels)
        .absolute(context.client_memory.query_buffer_disconnections());
    counter!("redis_relay_rejected_connections_total", &labels).absolute(ServedStats::get(&stats.rejected_connections));
    counter!("redis_relay_accept_errors_total", &labels).absolute(ServedStats::get(&stats.accept_errors));
    counter!("redis_relay_metrics_accept_errors_total", &labels).absolute(http::accept_errors());
    for (reason, value) in [("auth", &stats.acl_denied_auth), ("command", &stats.acl_denied_cmd)] {
        let labels = [("relay", relay.clone()), ("reason", reason.to_string())];
        counter!("redis_relay_acl_denied_total", &labels).absolute(ServedStats::get(value));
    }

    for state in [ReplicaState::WaitBgsave, ReplicaState::SendBulk, ReplicaState::Online] {
        let labels = [("relay", relay.clone()), ("state", state.name().to_string())];
        gauge!("redis_relay_replicas", &labels).set(report.replicas_in(state) as f64);
    }
    for replica in report.replicas.iter().filter(|r| r.state == ReplicaState::Online) {
        let labels = [("relay", relay.clone()), ("replica", RelayReport::replica_name(replica))];
        gauge!("redis_relay_replica_ack_offset_bytes", &labels).set(replica.ack_offset.get() as f64);
        gauge!("redis_relay_replica_lag_bytes", &labels).set(report.replica_lag_bytes(replica) as f64);
        gauge!("redis_relay_replica_lag_seconds", &labels).set(report.replica_lag_seconds(replica));
    }
}
