//! What the listener's clients hold in memory, and redis-server's two bounds on it: the per-client
//! `client-query-buffer-limit` (the query buffer and, on a relay, the `MULTI` queue) and the total
//! `maxmemory-clients`, past which the biggest clients are evicted (closed), as redis-server does.
//!
//! Each session reports its buffers (query buffer and queued transaction as input, pending replies
//! as output) through its [`ClientMemory`] after every read and every write; the budget keeps the
//! total and evicts on the report that crosses the cap, so a client is stopped within one read of
//! it. Replicas and clients with `CLIENT NO-EVICT on` are exempt, as in redis-server (the relay's
//! master link is not a client of the listener at all); clients under 32 KiB are never evicted
//! (redis-server's smallest eviction bucket).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::clients::{ClientTable, Killer};

/// Redis's default `client-query-buffer-limit`.
pub const DEFAULT_QUERY_BUFFER_LIMIT: u64 = 1 << 30;
/// The relay's default `maxmemory-clients` (redis-server's is 0, off); README "Security" says why.
pub const DEFAULT_MAXMEMORY_CLIENTS: u64 = 64 << 20;
/// Longest a read waits for evicted clients to be freed (a safety net: they are freed within a
/// scheduling round of their task).
const EVICTION_WAIT: Duration = Duration::from_millis(500);
/// Clients using less are never evicted (redis-server's `CLIENT_MEM_USAGE_BUCKET_MIN`).
const EVICTION_MIN_USAGE: u64 = 32 * 1024;
/// A client that held this much at once is followed by a trim of the allocator's heaps.
const TRIM_AFTER: u64 = 1 << 20;
/// `client_recent_max_*_buffer` cover the last this many seconds, as redis-server's
/// `CLIENTS_PEAK_MEM_USAGE_SLOTS`.
const PEAK_SLOTS: usize = 8;

struct Usage {
    input: u64,
    output: u64,
    /// The most this client held at once.
    peak: u64,
    kill: Killer,
    /// Chosen for eviction; its memory is freed once its task has ended.
    evicting: bool,
}

impl Usage {
    fn total(&self) -> u64 {
        self.input + self.output
    }
}

#[derive(Default)]
struct Ledger {
    clients: BTreeMap<u64, Usage>,
    total: u64,
    /// Memory of clients being evicted, not yet freed.
    evicting: u64,
    /// Per second slot: (second, peak input, peak output).
    peaks: [(u64, u64, u64); PEAK_SLOTS],
}

/// The memory budget of one relay's clients.
pub struct ClientMemoryBudget {
    /// `maxmemory-clients`; 0 is off.
    limit: u64,
    /// `client-query-buffer-limit`.
    pub query_buffer_limit: u64,
    table: Arc<ClientTable>,
    ledger: Mutex<Ledger>,
    started: Instant,
    evicted: AtomicU64,
    query_buffer_disconnections: AtomicU64,
    /// Signalled when an evicted client's memory is freed.
    freed: Notify,
}

impl ClientMemoryBudget {
    pub fn new(limit: u64, query_buffer_limit: u64, table: Arc<ClientTable>) -> Arc<ClientMemoryBudget> {
        Arc::new(ClientMemoryBudget {
            limit,
            query_buffer_limit,
            table,
            ledger: Mutex::new(Ledger::default()),
            started: Instant::now(),
            evicted: AtomicU64::new(0),
            query_buffer_disconnections: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `maxmemory-clients` in force (0: off).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Memory of all normal and pub/sub clients' buffers (`mem_clients_normal`).
    pub fn total(&self) -> u64 {
        self.ledger().total
    }

    /// Clients evicted at `maxmemory-clients` (INFO `evicted_clients`).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Clients closed at `client-query-buffer-limit`.
    pub fn query_buffer_disconnections(&self) -> u64 {
        self.query_buffer_disconnections.load(Ordering::Relaxed)
    }

    pub(crate) fn count_query_buffer_disconnection(&self) {
        self.query_buffer_disconnections.fetch_add(1, Ordering::Relaxed);
    }

    /// The largest input and output buffers of any client over the last 8 seconds
    /// (`client_recent_max_input_buffer`, `client_recent_max_output_buffer`).
    pub fn recent_max(&self) -> (u64, u64) {
        let now = self.started.elapsed().as_secs();
        let ledger = self.ledger();
        let recent = ledger.peaks.iter().filter(|(second, _, _)| now.saturating_sub(*second) < PEAK_SLOTS as u64);
        let mut peak = recent.fold((0, 0), |(i, o), (_, input, output)| (i.max(*input), o.max(*output)));
        // Clients that hold their buffers without reporting (idle) count too.
        for usage in ledger.clients.values() {
            peak = (peak.0.max(usage.input), peak.1.max(usage.output));
        }
        peak
    }

    /// A session's account; dropped with the session.
    pub fn register(self: &Arc<Self>, id: u64, kill: Killer) -> ClientMemory {
        self.ledger().clients.insert(id, Usage { input: 0, output: 0, peak: 0, kill, evicting: false });
        ClientMemory { budget: self.clone(), id, input: 0, output: 0, exempt: false }
    }

    fn report(&self, id: u64, input: u64, output: u64) {
        let mut ledger = self.ledger();
        let Some(usage) = ledger.clients.get_mut(&id) else { return };
        let (before, evicting) = (usage.total(), usage.evicting);
        (usage.input, usage.output) = (input, output);
        let after = input + output;
        usage.peak = usage.peak.max(after);
        ledger.total = ledger.total - before + after;
        if evicting {
            ledger.evicting = ledger.evicting - before + after;
        }
        let second = self.started.elapsed().as_secs();
        let slot = &mut ledger.peaks[second as usize % PEAK_SLOTS];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot.1 = slot.1.max(input);
        slot.2 = slot.2.max(output);
        if self.limit > 0 && ledger.total - ledger.evicting > self.limit {
            self.evict(&mut ledger);
        }
    }

    /// Evicts the biggest clients until what is left fits (as redis-server's `evictClients`).
    fn evict(&self, ledger: &mut Ledger) {
        let mut candidates: Vec<(u64, u64)> = ledger
            .clients
            .iter()
            .filter(|(_, usage)| !usage.evicting && usage.total() >= EVICTION_MIN_USAGE)
            .map(|(id, usage)| (usage.total(), *id))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (size, id) in candidates {
            if ledger.total - ledger.evicting <= self.limit {
                break;
            }
            if self.table.eviction_exempt(id) {
                continue;
            }
            let Some(usage) = ledger.clients.get_mut(&id) else { continue };
            usage.evicting = true;
            if usage.kill.kill() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client = %usage.kill.addr(), size, limit = self.limit, "evicting a client at maxmemory-clients");
            }
            ledger.evicting += size;
        }
    }

    /// Over the cap while evicted clients still hold their memory: reading more now would take the
    /// process past the cap by what they hold.
    fn awaiting_evictions(&self) -> bool {
        let ledger = self.ledger();
        self.limit > 0 && ledger.evicting > 0 && ledger.total > self.limit
    }

    fn unregister(&self, id: u64) {
        let mut ledger = self.ledger();
        if let Some(usage) = ledger.clients.remove(&id) {
            ledger.total -= usage.total();
            if usage.evicting {
                ledger.evicting -= usage.total();
                self.freed.notify_waiters();
            }
            if usage.peak >= TRIM_AFTER {
                crate::limits::trim_freed_memory_soon();
            }
        }
    }
}

/// One session's share of the budget.
pub struct ClientMemory {
    budget: Arc<ClientMemoryBudget>,
    id: u64,
    input: u64,
    output: u64,
    /// A replica's buffers do not count (redis-server exempts replicas from `maxmemory-clients`).
    exempt: bool,
}

impl ClientMemory {
    /// Records the session's current buffers; may evict it (or others) at `maxmemory-clients`.
    pub fn report(&mut self, input: usize, output: usize) {
        let (input, output) = if self.exempt { (0, 0) } else { (input as u64, output as u64) };
        if (input, output) != (self.input, self.output) {
            (self.input, self.output) = (input, output);
            self.budget.report(self.id, input, output);
        }
    }

    /// Waits (at most [`EVICTION_WAIT`]) while the budget is over the cap and evicted clients are
    /// still being freed: every client's next read then waits for them instead of adding to them,
    /// so the total stays near the cap however slowly the evicted tasks are scheduled.
    pub async fn wait_for_evictions(&self) {
        if self.exempt {
            return;
        }
        let deadline = tokio::time::Instant::now() + EVICTION_WAIT;
        loop {
            let freed = self.budget.freed.notified();
            if !self.budget.awaiting_evictions() {
                return;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return;
            }
        }
    }

    /// Whether the session is a replica now (exempt) or a normal client again.
    pub fn set_exempt(&mut self, exempt: bool) {
        self.exempt = exempt;
        if exempt {
            self.report(0, 0);
        }
    }

    pub fn budget(&self) -> &ClientMemoryBudget {
        &self.budget
    }
}

impl Drop for ClientMemory {
    fn drop(&mut self) {
        self.budget.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(
        table: &Arc<ClientTable>,
        budget: &Arc<ClientMemoryBudget>,
        port: u16,
    ) -> (ClientMemory, super::super::clients::ClientHandle, tokio::sync::watch::Receiver<bool>) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (handle, killed) = table.register(addr, None, 0);
        let memory = budget.register(handle.id(), handle.killer());
        (memory, handle, killed)
    }

    #[test]
    fn the_biggest_clients_are_evicted_past_the_cap() {
        let table = Arc::new(ClientTable::default());
        let budget = ClientMemoryBudget::new(1 << 20, DEFAULT_QUERY_BUFFER_LIMIT, table.clone());
        let (mut small, _h1, small_killed) = session(&table, &budget, 1);
        let (mut big, _h2, big_killed) = session(&table, &budget, 2);
        let (mut tiny, _h3, tiny_killed) = session(&table, &budget, 3);
        small.report(300 << 10, 0);
        tiny.report(1024, 0);
        big.report(600 << 10, 0);
        assert_eq!(budget.total(), (900 << 10) + 1024);
        assert_eq!(budget.evicted(), 0);
        // 200 KiB more output for the small one crosses 1 MiB: the biggest (600 KiB) goes.
        small.report(300 << 10, 200 << 10);
        assert!(*big_killed.borrow() && !*small_killed.borrow() && !*tiny_killed.borrow());
        assert_eq!(budget.evicted(), 1);
        // While the evicted one is still being freed, nobody else is chosen for it.
        small.report(310 << 10, 200 << 10);
        assert_eq!(budget.evicted(), 1);
        drop(big);
        assert_eq!(budget.total(), (510 << 10) + 1024);
        assert_eq!(budget.recent_max(), (600 << 10, 200 << 10));
    }

    #[test]
    fn replicas_and_small_clients_are_never_evicted_and_zero_is_off() {
        let table = Arc::new(ClientTable::default());
        let budget = ClientMemoryBudget::new(64 << 10, DEFAULT_QUERY_BUFFER_LIMIT, table.clone());
        let (mut replica, handle, replica_killed) = session(&table, &budget, 1);
        handle.set_type(super::super::clients::ClientType::Replica);
        // The row says replica: exempt even if its session still reported memory.
        replica.report(1 << 20, 0);
        assert!(!*replica_killed.borrow());
        replica.set_exempt(true);
        assert_eq!(budget.total(), 0);
        let (mut small, _h, small_killed) = session(&table, &budget, 2);
        small.report(20 << 10, 0);
        let (mut other, _h2, other_killed) = session(&table, &budget, 3);
        other.report(20 << 10, 0);
        other.report(20 << 10, 30 << 10);
        assert!(*other_killed.borrow(), "50 KiB of 64 KiB plus 20 KiB: the biggest goes");
        assert!(!*small_killed.borrow(), "under 32 KiB: never evicted");
        drop(other);
        // `CLIENT NO-EVICT on` spares a client; the next biggest goes instead.
        let (mut spared, spared_handle, spared_killed) = session(&table, &budget, 5);
        spared_handle.update(|row| row.no_evict = true);
        spared.report(40 << 10, 0);
        let (mut next, _h5, next_killed) = session(&table, &budget, 6);
        next.report(33 << 10, 0);
        assert!(!*spared_killed.borrow() && *next_killed.borrow());
        let off = ClientMemoryBudget::new(0, DEFAULT_QUERY_BUFFER_LIMIT, table.clone());
        let (mut huge, _h3, huge_killed) = session(&table, &off, 4);
        huge.report(1 << 30, 0);
        assert!(!*huge_killed.borrow());
    }
}
