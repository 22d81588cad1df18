//! `INFO` and `ROLE`, with redis-server's field names and formats (redis-cli, Sentinel and
//! redis_exporter parse them), plus a `# Relay` section for what only a relay has.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::ReplicaState;
use crate::log::NO_REPLID;
use crate::protocol::Reply;
use crate::relay::{RelayContext, ServedStats};
use crate::upstream::fetch::REFUSAL_REASONS;
use crate::upstream::history::HistoryResetPolicy;
use crate::upstream::LinkState;

const SECTIONS: [&str; 4] = ["server", "replication", "stats", "relay"];

/// Renders the requested sections (`INFO`, `INFO replication`, `INFO all`, several names).
pub fn render(context: &RelayContext, args: &[Bytes]) -> String {
    let requested: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    let everything =
        requested.is_empty() || requested.iter().any(|r| r == "all" || r == "everything" || r == "default");
    let mut out = String::new();
    for section in SECTIONS {
        if !(everything || requested.iter().any(|r| r == section)) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        match section {
            "server" => server(context, &mut out),
            "replication" => replication(context, &mut out),
            "stats" => stats(context, &mut out),
            _ => relay(context, &mut out),
        }
    }
    out
}

fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "{name}:{value}\r\n");
}

fn server(context: &RelayContext, out: &mut String) {
    let uptime = context.started.elapsed().as_secs();
    out.push_str("# Server\r\n");
    line(out, "redis_version", env!("CARGO_PKG_VERSION"));
    line(out, "relay_version", env!("CARGO_PKG_VERSION"));
    line(out, "redis_mode", "standalone");
    line(out, "os", std::env::consts::OS);
    line(out, "arch_bits", usize::BITS);
    line(out, "process_id", std::process::id());
    line(out, "run_id", &context.run_id);
    line(out, "tcp_port", context.config.listen.port());
    line(out, "server_time_usec", SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0));
    line(out, "uptime_in_seconds", uptime);
    line(out, "uptime_in_days", uptime / 86400);
    line(out, "executable", std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default());
}

fn replication(context: &RelayContext, out: &mut String) {
    let upstream = context.upstream.borrow().clone();
    let log = context.log.summary();
    let ids = log.ids.clone();
    let link_up = upstream.state == LinkState::Connected;
    out.push_str("# Replication\r\n");
    line(out, "role", "slave");
    line(out, "master_host", context.upstream_config.host());
    line(out, "master_port", context.upstream_config.port());
    line(out, "master_link_status", if link_up { "up" } else { "down" });
    line(out, "master_last_io_seconds_ago", upstream.last_io.map(|t| t.elapsed().as_secs() as i64).unwrap_or(-1));
    line(out, "master_sync_in_progress", u8::from(upstream.state == LinkState::Sync));
    line(out, "slave_read_repl_offset", if link_up { upstream.read_offset.max(log.end) } else { log.end });
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
    let replicas = context.replicas.snapshot();
    line(out, "connected_slaves", replicas.len());
    for (i, replica) in replicas.iter().enumerate() {
        let lag = if replica.state == ReplicaState::Online { replica.ack_time.elapsed().as_secs() } else { 0 };
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
    line(out, "repl_backlog_first_byte_offset", log.first_byte_offset);
    line(out, "repl_backlog_histlen", log.histlen());
}

fn stats(context: &RelayContext, out: &mut String) {
    let s = &context.stats;
    let upstream = context.upstream.borrow().clone();
    out.push_str("# Stats\r\n");
    line(out, "total_connections_received", ServedStats::get(&s.connections));
    line(out, "total_commands_processed", ServedStats::get(&s.commands));
    line(out, "sync_full", ServedStats::get(&s.sync_full));
    line(out, "sync_partial_ok", ServedStats::get(&s.sync_partial_ok));
    line(out, "sync_partial_err", ServedStats::get(&s.sync_partial_err));
    line(out, "total_net_repl_input_bytes", upstream.input_bytes);
    line(out, "total_net_repl_output_bytes", ServedStats::get(&s.repl_output_bytes));
    let (channels, patterns) = context.pubsub.counts();
    line(out, "pubsub_channels", channels);
    line(out, "pubsub_patterns", patterns);
    // Redis 7.2's name for clients dropped at client-output-buffer-limit (here: pub/sub clients).
    line(out, "client_output_buffer_limit_disconnections", context.pubsub.limit_disconnections());
}

fn relay(context: &RelayContext, out: &mut String) {
    let upstream = context.upstream.borrow().clone();
    let snapshot = context.snapshots.current();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
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
    line(out, "rdb_fetches", upstream.rdb_fetches);
    line(out, "rdb_rejected", upstream.rdb_rejected);
    line(out, "snapshot_offset", snapshot.as_ref().map(|s| s.offset as i64).unwrap_or(-1));
    line(out, "snapshot_size", snapshot.as_ref().map(|s| s.size).unwrap_or(0));
    line(out, "snapshot_replid", snapshot.as_ref().map(|s| s.replid.as_str()).unwrap_or(NO_REPLID));
    line(out, "snapshot_rdb_version", snapshot.as_ref().map(|s| s.rdb_version).unwrap_or(0));
    line(
        out,
        "snapshot_age_seconds",
        snapshot.as_ref().map(|s| now.saturating_sub(s.created_unix) as i64).unwrap_or(-1),
    );
    let recovery = &context.log_recovery;
    line(out, "log_recovered_offset", recovery.history.as_ref().map(|_| recovery.end as i64).unwrap_or(-1));
    line(out, "log_recovery_dropped", recovery.dropped.as_ref().map(|d| d.kind.name()).unwrap_or("none"));
    line(out, "log_recovery_dropped_bytes", recovery.dropped.as_ref().map(|d| d.bytes).unwrap_or(0));
    let keys = snapshot.as_ref().and_then(|s| s.keys);
    line(out, "snapshot_keys", keys.map(|k| k.keys as i64).unwrap_or(-1));
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
    let fetcher = context.fetcher_status.borrow().clone();
    line(out, "snapshot_refreshes_replica", fetcher.refreshes_replica);
    line(out, "snapshot_refreshes_master", fetcher.refreshes_master);
    let refusals: u64 = fetcher.refusals.values().sum();
    line(out, "snapshot_refusals", refusals);
    for reason in REFUSAL_REASONS {
        line(out, &format!("snapshot_refusals_{reason}"), fetcher.refusals.get(reason).copied().unwrap_or(0));
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
    let offset = if upstream.ever_connected { context.log.summary().end as i64 } else { -1 };
    Reply::Array(vec![
        Reply::bulk("slave"),
        Reply::bulk(context.upstream_config.host().to_string()),
        Reply::Integer(context.upstream_config.port() as i64),
        Reply::bulk(upstream.state.role_name()),
        Reply::Integer(offset),
    ])
}
