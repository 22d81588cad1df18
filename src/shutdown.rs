//! The one shutdown signal of a relay: a `watch` that the relay's `RunningRelay` (in `relay.rs`)
//! owns and flips to `true` once; every task of the relay (and each of its sessions) holds a
//! receiver and ends when it flips.

use tokio::sync::watch;

/// What a task holds to learn that its relay stops.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once `shutdown` is set (or its sender is gone). Holds no borrow of the value after.
pub(crate) async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
