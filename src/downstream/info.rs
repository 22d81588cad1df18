//! `INFO` and `ROLE`, with redis-server's field names and formats (redis-cli, Sentinel and
//! redis_exporter parse them), plus a `# Relay` section for what only a relay has.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::context::{RelayContext, ServedStats};
use crate::log::NO_REPLID;
use crate::protocol::Reply;
use crate::report::RelayReport;
use crate::upstream::fetch::REFUSAL_REASONS;
use crate::upstream::history::HistoryResetPolicy;
use crate::upstream::version::FALLBACK_REDIS_VERSION;
use crate::upstream::LinkState;

/// The sections in redis-server's order (`genRedisInfoString`), then the relay's own.
const SECTIONS: [&str; 11] = [
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cpu",
    "modules",
    "cluster",
    "keyspace",
    "relay",
];

/// Renders the requested sections (`INFO`, `INFO replication`, `INFO all`, several names) in
/// redis-server's order, whatever the order asked; an unknown name adds nothing.
pub fn render(context: &RelayContext, args: &[Bytes]) -> String {
    let requested: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    // The relay has no commandstats, latencystats or module sections, so `default`, `all` and
    // `everything` are the same set.
    let everything =
        requested.is_empty() || requested.iter().any(|r| r == "all" || r == "everything" || r == "default");
    let mut out = String::new();
    // One gathering for every section, so that the figures of one reply are of one moment.
    let report = RelayReport::gather(context);
    for section in SECTIONS {
        if !(everything || requested.iter().any(|r| r == section)) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        match section {
            "server" => server(context, &mut out),
            "clients" => clients(context, &mut out),
            "memory" => memory(context, &mut out),
            "persistence" => persistence(context, &mut out),
            "stats" => stats(context, &mut out),
            "replication" => replication(context, &report, &mut out),
            "cpu" => cpu(&mut out),
            "modules" => out.push_str("# Modules\r\n"),
            "cluster" => {
                out.push_str("# Cluster\r\n");
                line(&mut out, "cluster_enabled", 0);
            }
            // The relay holds no keys: no `db0:keys=...` line, as on an empty redis-server.
            "keyspace" => out.push_str("# Keyspace\r\n"),
            _ => relay(context, &report, &mut out),
        }
    }
    out
}

/// What the relay's replicas see from the master: its `redis_version` once read, before that
/// [`FALLBACK_REDIS_VERSION`].
pub fn redis_version(context: &RelayContext) -> String {
    context
        .master_version
        .borrow()
        .as_ref()
        .map(|v| v.redis_version.clone())
        .unwrap_or_else(|| FALLBACK_REDIS_VERSION.to_string())
}

fn clients(context: &RelayContext, out: &mut String) {
    out.push_str("# Clients\r\n");
    line(out, "connected_clients", context.clients.connected_clients());
    line(out, "cluster_connections", 0);
    // In force after the descriptor limit was applied (lower than configured if it could not be raised).
    line(out, "maxclients", context.client_slots.effective_max());
    let (max_input, max_output) = context.client_memory.recent_max();
    line(out, "client_recent_max_input_buffer", max_input);
    line(out, "client_recent_max_output_buffer", max_output);
    // The relay has no blocking commands, no client tracking and no command timeouts.
    line(out, "blocked_clients", 0);
    line(out, "tracking_clients", 0);
    line(out, "clients_in_timeout_table", 0);
}

/// Process memory from /proc (a pseudo-file read from kernel memory: it never waits on a disk).
/// The relay does not count its allocations, so `used_memory` is the resident set size.
fn memory(context: &RelayContext, out: &mut String) {
    let process = ProcessMemory::read();
    out.push_str("# Memory\r\n");
    line(out, "used_memory", process.rss);
    line(out, "used_memory_human", bytes_to_human(process.rss));
    line(out, "used_memory_rss", process.rss);
    line(out, "used_memory_rss_human", bytes_to_human(process.rss));
    line(out, "used_memory_peak", process.peak_rss);
    line(out, "used_memory_peak_human", bytes_to_human(process.peak_rss));
    // The log's in-memory tail, the relay's replication backlog in memory.
    line(out, "mem_replication_backlog", context.log.summary().memory_bytes);
    // The buffers `maxmemory-clients` bounds (normal and pub/sub clients; replicas are exempt).
    line(out, "mem_clients_normal", context.client_memory.total());
    line(out, "maxmemory_clients", context.client_memory.limit());
    line(out, "maxmemory", 0);
    line(out, "maxmemory_human", "0B");
    line(out, "maxmemory_policy", "noeviction");
}

#[derive(Debug, Default)]
struct ProcessMemory {
    rss: u64,
    peak_rss: u64,
}

impl ProcessMemory {
    fn read() -> ProcessMemory {
        // procfs is rendered from kernel memory, never from a device: read on the worker like
        // redis-server reads it in its event loop (the rule against file I/O on a worker is about
        // disks that can stall).
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
                .unwrap_or(0)
        };
        let rss = kib("VmRSS:");
        ProcessMemory { rss, peak_rss: kib("VmHWM:").max(rss) }
    }
}

/// redis-server's `bytesToHuman`: `1023B`, `1.00K`, `2.50M`, ...
fn bytes_to_human(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [(1 << 50, "P"), (1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if n >= size {
            return format!("{:.2}{unit}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

fn persistence(context: &RelayContext, out: &mut String) {
    out.push_str("# Persistence\r\n");
    // The relay never loads a dataset (it serves replicas while receiving one) and never forks.
    line(out, "loading", 0);
    line(out, "async_loading", 0);
    line(out, "rdb_bgsave_in_progress", 0);
    line(out, "rdb_last_save_time", super::commands::last_save(context));
    line(out, "aof_enabled", 0);
    line(out, "aof_rewrite_in_progress", 0);
}

/// CPU time from /proc/self/stat (user and system, own and of waited-for children), in seconds
/// as redis-server prints them.
fn cpu(out: &mut String) {
    // procfs, from kernel memory: see `ProcessMemory::read`.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces: the 14th to
    // 17th fields of the line are utime, stime, cutime, cstime.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().skip(11).take(4).filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let seconds = |i: usize| {
        let t = fields.get(i).copied().unwrap_or(0);
        format!("{}.{:06}", t / ticks, (t % ticks) * 1_000_000 / ticks)
    };
    out.push_str("# CPU\r\n");
    line(out, "used_cpu_sys", seconds(1));
    line(out, "used_cpu_user", seconds(0));
    line(out, "used_cpu_sys_children", seconds(3));
    line(out, "used_cpu_user_children", seconds(2));
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "{name}:{value}\r\n");
}

fn server(context: &RelayContext, out: &mut String) {
    let uptime = context.started.elapsed().as_secs();
    out.push_str("# Server\r\n");
    let master = context.master_version.borrow().clone();
    line(out, "redis_version", redis_version(context));
    line(out, "relay_version", env!("CARGO_PKG_VERSION"));
    if let Some(master) = &master {
        if let Some(name) = &master.server_name {
            line(out, "server_name", name);
        }
        if let Some(version) = &master.valkey_version {
            line(out, "valkey_version", version);
        }
    }
    line(out, "redis_mode", "standalone");
    line(out, "os", std::env::consts::OS);
    line(out, "arch_bits", usize::BITS);
    line(out, "process_id", std::process::id());
    line(out, "run_id", &context.run_id);
    line(out, "tcp_port", context.config.listen.map_or(0, |a| a.port()));
    line(out, "server_time_usec", SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0));
    line(out, "uptime_in_seconds", uptime);
    line(out, "uptime_in_days", uptime / 86400);
    line(out, "fanout_priority", crate::limits::current_thread_priority().as_str());
    line(out, "executable", std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default());
}

fn replication(context: &RelayContext, report: &RelayReport, out: &mut String) {
    let (upstream, log) = (&report.upstream, &report.log);
    let ids = log.ids.clone();
    let link_up = report.link_up();
    out.push_str("# Replication\r\n");
    line(out, "role", "slave");
    let (master_host, master_port) = context.master_host_port();
    line(out, "master_host", master_host);
    line(out, "master_port", master_port);
    line(out, "master_link_status", if link_up { "up" } else { "down" });
    line(out, "master_last_io_seconds_ago", upstream.last_io.map(|t| t.elapsed().as_secs() as i64).unwrap_or(-1));
    line(out, "master_sync_in_progress", u8::from(upstream.state == LinkState::Sync));
    line(out, "slave_read_repl_offset", report.read_offset());
    line(out, "slave_repl_offset", log.end);
    if upstream.state == LinkState::Sync {
        line(out, "master_sync_total_bytes", upstream.sync_total_bytes);
        line(out, "master_sync_read_bytes", upstream.sync_read_bytes);
        let left = if upstream.sync_total_bytes >= 0 {
            upstream.sync_total_bytes - upstream.sync_read_bytes as i64
        } else {
            0
        };
        line(out, "master_sync_left_bytes", left);
        let perc = if upstream.sync_total_bytes > 0 {
            upstream.sync_read_bytes as f64 * 100.0 / upstream.sync_total_bytes as f64
        } else {
            0.0
        };
        line(out, "master_sync_perc", format!("{perc:.2}"));
        line(
            out,
            "master_sync_last_io_seconds_ago",
            upstream.last_io.map(|t| t.elapsed().as_secs() as i64).unwrap_or(-1),
        );
    }
    if !link_up {
        let since = upstream.link_down_since.map(|t| t.elapsed().as_secs() as i64).unwrap_or(-1);
        line(out, "master_link_down_since_seconds", since);
    }
    line(out, "slave_priority", 0);
    line(out, "slave_read_only", 1);
    line(out, "replica_announced", 1);
    let replicas = &report.replicas;
    line(out, "connected_slaves", replicas.len());
    for (i, replica) in replicas.iter().enumerate() {
        let lag = report.replica_lag_seconds(replica) as u64;
        let _ = write!(
            out,
            "slave{i}:ip={},port={},state={},offset={},lag={}\r\n",
            replica.ip,
            replica.port,
            replica.state.name(),
            replica.ack_offset,
            lag
        );
    }
    line(out, "master_failover_state", "no-failover");
    line(out, "master_replid", ids.as_ref().map(|i| i.replid.as_str()).unwrap_or(NO_REPLID));
    line(out, "master_replid2", ids.as_ref().map(|i| i.replid2.as_str()).unwrap_or(NO_REPLID));
    line(out, "master_repl_offset", log.end);
    line(out, "second_repl_offset", ids.as_ref().map(|i| i.second_repl_offset).unwrap_or(-1));
    line(out, "repl_backlog_active", u8::from(ids.is_some()));
    line(out, "repl_backlog_size", log.capacity);
    line(out, "repl_backlog_first_byte_offset", log.first_byte_offset());
    line(out, "repl_backlog_histlen", log.histlen());
}

fn stats(context: &RelayContext, out: &mut String) {
    let s = &context.stats;
    let upstream = context.upstream.borrow().clone();
    out.push_str("# Stats\r\n");
    line(out, "total_connections_received", ServedStats::get(&s.connections));
    line(out, "total_commands_processed", ServedStats::get(&s.commands));
    line(out, "rejected_connections", ServedStats::get(&s.rejected_connections));
    line(out, "evicted_clients", context.client_memory.evicted());
    // Failed accepts (out of descriptors and the like) on the listen port and on the process's
    // metrics endpoint: each one is followed by a 100 ms pause, never a spin.
    line(out, "accept_errors", ServedStats::get(&s.accept_errors));
    line(out, "metrics_accept_errors", crate::metrics::http::accept_errors());
    line(out, "sync_full", ServedStats::get(&s.sync_full));
    line(out, "sync_partial_ok", ServedStats::get(&s.sync_partial_ok));
    line(out, "sync_partial_err", ServedStats::get(&s.sync_partial_err));
    line(out, "total_net_repl_input_bytes", upstream.input_bytes);
    line(out, "total_net_repl_output_bytes", ServedStats::get(&s.repl_output_bytes));
    let (channels, patterns) = context.pubsub.counts();
    line(out, "pubsub_channels", channels);
    line(out, "pubsub_patterns", patterns);
    // Redis 7.2's name for clients dropped at client-output-buffer-limit (here: pub/sub clients).
    line(out, "client_query_buffer_limit_disconnections", context.client_memory.query_buffer_disconnections());
    line(out, "client_output_buffer_limit_disconnections", context.pubsub.limit_disconnections());
    // Redis 7.2's names (7.0 has no such fields): refused logins and commands refused by the roles.
    line(out, "acl_access_denied_auth", ServedStats::get(&s.acl_denied_auth));
    line(out, "acl_access_denied_cmd", ServedStats::get(&s.acl_denied_cmd));
}

fn relay(context: &RelayContext, report: &RelayReport, out: &mut String) {
    let (upstream, snapshot, now) = (&report.upstream, &report.snapshot, report.now_unix);
    out.push_str("# Relay\r\n");
    line(out, "relay_name", &context.config.name);
    line(out, "upstream_link_state", upstream.state.role_name());
    line(out, "upstream_reconnects", upstream.reconnects);
    line(out, "upstream_partial_syncs", upstream.partial_syncs);
    line(out, "upstream_tls", if context.config.upstream_tls.is_some() { "yes" } else { "no" });
    line(out, "upstream_tls_failures", upstream.tls_failures);
    // One line: an error's text never holds a line break, but a master's reply could.
    let last_error = upstream.last_error.as_deref().unwrap_or("").replace(['\r', '\n'], " ");
    line(out, "upstream_last_error", &last_error);
    line(out, "tls_port", context.config.tls.as_ref().map(|t| t.listen.port()).unwrap_or(0));
    line(out, "listeners_unbound", context.listeners.unbound(&context.config));
    line(out, "listen_errors", context.listeners.bind_errors.load(std::sync::atomic::Ordering::Relaxed));
    line(out, "rdb_fetches", upstream.rdb_fetches);
    line(out, "rdb_rejected", upstream.rdb_rejected);
    line(out, "snapshot_write_errors", upstream.snapshot_write_errors);
    line(out, "snapshot_offset", report.snapshot_offset());
    line(out, "snapshot_size", report.snapshot_size());
    line(out, "snapshot_replid", snapshot.as_ref().map(|s| s.replid.as_str()).unwrap_or(NO_REPLID));
    line(out, "snapshot_rdb_version", snapshot.as_ref().map(|s| s.rdb_version).unwrap_or(0));
    let guard = &context.sync_guard;
    line(out, "sync_refused_rdb_version", guard.refused_rdb_version.load(std::sync::atomic::Ordering::Relaxed));
    line(out, "sync_refused_resync_loop", guard.refused_resync_loop.load(std::sync::atomic::Ordering::Relaxed));
    line(out, "replicas_in_resync_backoff", guard.in_backoff());
    line(out, "snapshot_age_seconds", report.snapshot_age_seconds());
    // What an ACK may cover under the fsync policy, live (the metric is sampled once a second).
    line(out, "log_durable_offset", context.log.durable_offset().get());
    let recovery = &context.log_recovery;
    line(out, "log_recovered_offset", recovery.history.as_ref().map(|_| recovery.end as i64).unwrap_or(-1));
    line(out, "log_recovery_dropped", recovery.dropped.as_ref().map(|d| d.kind.name()).unwrap_or("none"));
    line(out, "log_recovery_dropped_bytes", recovery.dropped.as_ref().map(|d| d.bytes).unwrap_or(0));
    // Failed log writes and fsyncs (a full disk, EIO, no descriptors): retried until they succeed.
    let faults = context.log.write_faults();
    line(out, "log_write_errors", faults.total());
    for (kind, count) in &faults.errors {
        line(out, &format!("log_write_errors_{kind}"), *count);
    }
    line(out, "log_write_failing", u8::from(faults.failing));
    // The stream sent to replicas by where it came from: the memory tail, disk records read into
    // memory (checked there, or read back for TLS replicas), or disk records the kernel sent
    // from the file with sendfile (checked once before, never copied into the relay).
    let stats = &context.stats;
    line(out, "stream_sent_from_memory", ServedStats::get(&stats.stream_from_memory));
    line(out, "stream_sent_from_disk", ServedStats::get(&stats.stream_from_disk));
    line(out, "stream_sent_by_sendfile", ServedStats::get(&stats.stream_sendfile));
    // Replica streams the log's disk failed: a read error, or a record that failed its check.
    line(out, "log_read_errors", ServedStats::get(&stats.log_read_errors));
    line(out, "log_read_corrupt", ServedStats::get(&stats.log_read_corrupt));
    line(out, "log_last_write_error", faults.last_error.replace(['\r', '\n'], " "));
    let keys = snapshot.as_ref().and_then(|s| s.keys);
    line(out, "snapshot_keys", report.snapshot_keys());
    line(out, "snapshot_keys_exact", u8::from(keys.is_some_and(|k| k.exact)));
    line(out, "history_reset_policy", policy_name(context.config.history_reset));
    line(out, "history_reset_held", u8::from(upstream.history_held.is_some()));
    if let Some(held) = &upstream.history_held {
        line(out, "history_reset_new_replid", &held.new_replid);
        line(out, "history_reset_new_offset", held.new_offset);
        line(out, "history_reset_new_keys", held.new_keys.keys);
        line(out, "history_reset_old_replid", &held.old_replid);
        line(out, "history_reset_old_keys", held.old_keys);
        let since = held.since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        line(out, "history_reset_held_seconds", now.saturating_sub(since));
    }
    let source = snapshot.as_ref().map(|s| if s.source.is_empty() { "unknown" } else { s.source.as_str() });
    line(out, "snapshot_source", source.unwrap_or("none"));
    let sources: Vec<&str> = context.config.snapshot.sources.iter().map(|s| s.name()).collect();
    line(out, "snapshot_sources", sources.join(","));
    let fetcher = &report.fetcher;
    line(out, "snapshot_refreshes_replica", fetcher.refreshes_replica);
    line(out, "snapshot_refreshes_master", fetcher.refreshes_master);
    let refusals: u64 = fetcher.refusals.values().sum();
    line(out, "snapshot_refusals", refusals);
    for reason in REFUSAL_REASONS {
        line(out, &format!("snapshot_refusals_{reason}"), report.snapshot_refusals(reason));
    }
    line(out, "snapshot_last_refusal", &fetcher.last_refusal);
    line(out, "snapshot_fetching_from", fetcher.fetching_from.as_deref().unwrap_or("none"));
    line(out, "snapshot_master_rate_limited", fetcher.master_rate_limited);
    let interval = context.config.snapshot.master_min_interval;
    let next = fetcher.last_master_fetch.map(|t| (t + interval).saturating_duration_since(tokio::time::Instant::now()));
    line(out, "snapshot_master_next_fetch_in_seconds", next.map(|d| d.as_secs()).unwrap_or(0));
    line(out, "rdb_only_served_fresh", ServedStats::get(&context.stats.rdb_only_fresh));
    line(out, "rdb_only_served_cached", ServedStats::get(&context.stats.rdb_only_cached));
    line(out, "rdb_only_last_cached_age_seconds", ServedStats::get(&context.stats.rdb_only_last_cached_age));
    line(out, "log_size", context.log.options().retention);
    line(out, "log_max_size", context.log.options().max_size);
    line(out, "log_held_for_snapshot_bytes", context.log.held_beyond_retention());
}

fn policy_name(policy: HistoryResetPolicy) -> &'static str {
    match policy {
        HistoryResetPolicy::Hold => "hold",
        HistoryResetPolicy::Follow => "follow",
    }
}

/// `ROLE` as a replica: `slave`, master host, port, link state, applied offset.
pub fn role(context: &RelayContext) -> Reply {
    let upstream = context.upstream.borrow().clone();
    let offset = if upstream.ever_connected { context.log.summary().end.get() as i64 } else { -1 };
    let (master_host, master_port) = context.master_host_port();
    Reply::Array(vec![
        Reply::bulk("slave"),
        Reply::bulk(master_host),
        Reply::Integer(i64::from(master_port)),
        Reply::bulk(upstream.state.role_name()),
        Reply::Integer(offset),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human_like_redis() {
        assert_eq!(bytes_to_human(1023), "1023B");
        assert_eq!(bytes_to_human(1024), "1.00K");
        assert_eq!(bytes_to_human(5 << 20), "5.00M");
    }
}
