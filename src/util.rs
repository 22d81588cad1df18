//! Small helpers shared by the subsystems: ids in Redis's form, progress logs of long transfers, and
//! tasks run on a thread of their own.

use tokio::time::Instant;

/// Random 40-hex-character id, the form of Redis's run_id and replids.
pub(crate) fn random_hex_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..40).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
}

/// Logs the progress of a long transfer every few seconds: bytes, percent when the size is known,
/// and the rate since the start.
pub(crate) struct TransferProgress {
    what: &'static str,
    peer: String,
    started: Instant,
    last_logged: Instant,
}

impl TransferProgress {
    const PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

    pub(crate) fn new(what: &'static str, peer: impl Into<String>) -> TransferProgress {
        let now = Instant::now();
        TransferProgress { what, peer: peer.into(), started: now, last_logged: now }
    }

    /// `total` is -1 when unknown (EOF-marked payloads).
    pub(crate) fn update(&mut self, done: u64, total: i64) {
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

/// `host:port` split at the last colon; a port that does not parse is 0.
pub(crate) fn split_host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

/// Runs `task` on a thread of its own, on a single-threaded runtime there; the future returned
/// completes when it does. For work that must never queue behind the tasks of the shared runtime
/// (the upstream link: reading the master is what keeps its output buffer for the relay small, and
/// its ACKs are what the master's `min-replicas-max-lag` counts); the thread is scheduled by the
/// kernel beside the runtime's workers, whatever they are busy with.
///
/// The thread is started by this call, not when the future is first polled: a thread inherits
/// the scheduling of the thread that starts it, and the runtime's threads may run at a lowered
/// `fanout_priority` that an unprivileged process cannot raise again. Call it from the thread
/// that starts the relay (the main thread), not from a task. The thread runs `task` even if the
/// future is never polled.
pub(crate) fn on_own_thread<F>(name: &str, task: F) -> impl std::future::Future<Output = ()> + Send + 'static
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = name.to_string();
    let spawned = std::thread::Builder::new().name(thread.clone()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(task),
            Err(error) => tracing::error!(thread, "cannot start a runtime for the thread: {error}"),
        }
        drop(done);
    });
    if let Err(error) = &spawned {
        tracing::error!(thread = name, "cannot start the thread: {error}");
    }
    async move {
        // Completes when the thread drops `done`: its task ended (or could not start).
        if spawned.is_ok() {
            let _ = finished.await;
        }
    }
}
