//! Prometheus metrics: the exporter, and per-relay handles labelled by relay name.
//!
//! The metrics registry is the one piece of global state (the `metrics` facade's recorder). Names follow
//! Prometheus conventions: `_bytes`, `_seconds`, `_total`.

use std::net::SocketAddr;

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics endpoint on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Starts the `/metrics` HTTP endpoint and describes every metric.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| MetricsError { addr, reason: e.to_string() })?;
    describe();
    Ok(())
}

fn describe() {
    describe_gauge!("redis_relay_upstream_link_up", "1 when the replication link to the master is up");
    describe_gauge!("redis_relay_offset_bytes", "The relay's applied replication offset (master_repl_offset)");
    describe_counter!("redis_relay_rdb_fetched_total", "Full syncs the relay asked of its master");
    describe_counter!("redis_relay_upstream_received_bytes_total", "Stream bytes applied from the master");
}

/// The handles of one relay's metrics.
#[derive(Clone)]
pub struct RelayMetrics {
    link_up: Gauge,
    offset: Gauge,
    rdb_fetched: Counter,
    bytes_in: Counter,
}

impl RelayMetrics {
    pub fn new(relay: &str) -> RelayMetrics {
        let labels = [("relay", relay.to_string())];
        RelayMetrics {
            link_up: gauge!("redis_relay_upstream_link_up", &labels),
            offset: gauge!("redis_relay_offset_bytes", &labels),
            rdb_fetched: counter!("redis_relay_rdb_fetched_total", &labels),
            bytes_in: counter!("redis_relay_upstream_received_bytes_total", &labels),
        }
    }

    pub fn link_up(&self, up: bool) {
        self.link_up.set(if up { 1.0 } else { 0.0 });
    }

    pub fn offsets(&self, applied: u64) {
        self.offset.set(applied as f64);
    }

    pub fn rdb_fetched(&self) {
        self.rdb_fetched.increment(1);
    }

    pub fn bytes_in(&self, n: usize) {
        self.bytes_in.increment(n as u64);
    }
}
