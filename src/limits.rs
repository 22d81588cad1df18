//! Process-wide connection limits: the file-descriptor budget (`RLIMIT_NOFILE`, raised at start as
//! redis-server's `adjustOpenFilesLimit` does) and the client slots every relay's listener takes
//! from before it serves a connection, so clients can never use the descriptors reserved for the log,
//! the snapshot cache and the upstream link. Also what the relay takes from its host's CPUs: the
//! scheduling of its fan-out threads (`fanout_priority`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Descriptors each relay keeps for itself (log segments and their directory, snapshot files,
/// the upstream link and RDB fetcher), like redis-server's `CONFIG_MIN_RESERVED_FDS`.
pub const RESERVED_FDS_PER_RELAY: u64 = 32;
/// Descriptors the process keeps besides its relays: stdio, the runtime, the metrics listener and
/// its connection cap.
pub const RESERVED_FDS_PROCESS: u64 = 32 + crate::metrics::MAX_CONNECTIONS as u64;

/// Redis's default `maxclients`.
pub const DEFAULT_MAXCLIENTS: u64 = 10_000;

/// Clients all relays of the process may have together: what the descriptor limit leaves after the
/// reserves. `usize::MAX` until [`adjust_open_files_limit`] ran.
static PROCESS_CLIENT_CAP: AtomicUsize = AtomicUsize::new(usize::MAX);
static PROCESS_CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// The outcome of raising `RLIMIT_NOFILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdBudget {
    /// Descriptors the relays' settings need.
    pub wanted: u64,
    /// The soft limit now in force.
    pub limit: u64,
    /// Clients the process can serve within it (sum over relays).
    pub client_cap: u64,
    /// Why the limit could not be raised to `wanted`, if it could not.
    pub shortfall: Option<String>,
}

/// Raises the soft `RLIMIT_NOFILE` to what `maxclients` of every relay plus the reserves need
/// (never lowers it). When the hard limit forbids it, takes the highest value it can get and
/// lowers the process's client capacity to fit, as redis-server lowers `maxclients`.
pub fn adjust_open_files_limit(maxclients: &[u64]) -> FdBudget {
    let reserve = RESERVED_FDS_PROCESS + RESERVED_FDS_PER_RELAY * maxclients.len() as u64;
    let wanted = maxclients.iter().sum::<u64>() + reserve;
    let (mut limit, hard) = current_limit();
    let mut shortfall = None;
    if limit < wanted {
        let target = wanted.min(hard);
        match set_soft_limit(target) {
            Ok(()) => limit = target,
            Err(error) => shortfall = Some(format!("setrlimit({target}) failed: {error}")),
        }
        if limit < wanted && shortfall.is_none() {
            shortfall = Some(format!("the hard limit is {hard}"));
        }
    }
    let client_cap = limit.saturating_sub(reserve);
    PROCESS_CLIENT_CAP.store(usize::try_from(client_cap).unwrap_or(usize::MAX), Ordering::Relaxed);
    FdBudget { wanted, limit, client_cap, shortfall }
}

fn current_limit() -> (u64, u64) {
    let mut rlim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } != 0 {
        return (1024, 1024);
    }
    (rlim.rlim_cur, rlim.rlim_max)
}

fn set_soft_limit(soft: u64) -> std::io::Result<()> {
    let (_, hard) = current_limit();
    let rlim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The process's client capacity (after [`adjust_open_files_limit`]).
pub fn process_client_cap() -> usize {
    PROCESS_CLIENT_CAP.load(Ordering::Relaxed)
}

/// One relay's client count against its `maxclients`.
#[derive(Debug)]
pub struct ClientSlots {
    maxclients: usize,
    connected: AtomicUsize,
}

impl ClientSlots {
    pub fn new(maxclients: u64) -> Arc<ClientSlots> {
        Arc::new(ClientSlots {
            maxclients: usize::try_from(maxclients).unwrap_or(usize::MAX),
            connected: AtomicUsize::new(0),
        })
    }

    /// `maxclients` in force: the configured value, lowered to the process's capacity.
    pub fn effective_max(&self) -> usize {
        self.maxclients.min(process_client_cap())
    }

    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// A slot for one more client, or `None` when this relay or the process is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ClientSlot> {
        if PROCESS_CLIENTS.fetch_add(1, Ordering::AcqRel) >= process_client_cap() {
            PROCESS_CLIENTS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if self.connected.fetch_add(1, Ordering::AcqRel) >= self.maxclients {
            self.connected.fetch_sub(1, Ordering::AcqRel);
            PROCESS_CLIENTS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot { slots: self.clone() })
    }
}

/// A connected client's slot; freed when the connection ends.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.slots.connected.fetch_sub(1, Ordering::AcqRel);
        PROCESS_CLIENTS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs at most once per period (accept errors under descriptor exhaustion must not flood the log).
#[derive(Debug)]
pub struct LogThrottle {
    period: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(period: std::time::Duration) -> LogThrottle {
        LogThrottle { period, last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last logged one)` when it is time to log again.
    pub fn ready(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.period) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

static TRIM_PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// When the last trim was asked for, in milliseconds since [`trim_clock`]'s start.
static TRIM_ASKED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn trim_clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

/// How long after the last request the allocator's heaps are trimmed (frees come in bursts).
const TRIM_DELAY_MS: u64 = 100;

/// Asks the allocator to give freed heap pages back to the system, 100 ms after the last of a
/// burst of requests: called when a client that held megabytes is gone (its many smaller buffers,
/// such as a MULTI queue's, live in the allocator's heaps, which glibc does not shrink by itself).
pub fn trim_freed_memory_soon() {
    TRIM_ASKED_AT.store(trim_clock(), Ordering::Release);
    if TRIM_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        TRIM_PENDING.store(false, Ordering::Release);
        return;
    };
    runtime.spawn_blocking(|| {
        // Trailing edge: wait until no request came for TRIM_DELAY_MS.
        loop {
            let since = trim_clock().saturating_sub(TRIM_ASKED_AT.load(Ordering::Acquire));
            if since >= TRIM_DELAY_MS {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(TRIM_DELAY_MS - since));
        }
        TRIM_PENDING.store(false, Ordering::Release);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    });
}

/// Schedules the calling thread as `priority` says (Linux: a thread's policy and nice value are its
/// own, so only this thread changes). Called by every thread of the runtime that serves clients
/// and replicas as it starts; the upstream link's and the log writers' threads never call it.
pub fn apply_fanout_priority(priority: crate::config::FanoutPriority) -> std::io::Result<()> {
    use crate::config::FanoutPriority;
    let (policy, nice) = match priority {
        FanoutPriority::Normal => return Ok(()),
        FanoutPriority::Low => (libc::SCHED_OTHER, 19),
        FanoutPriority::Idle => (libc::SCHED_IDLE, 0),
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads the struct we pass; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if nice != 0 {
        // SAFETY: plain syscall on the calling thread (who 0 is this thread under Linux's NPTL).
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `fanout_priority` the calling thread runs at, as the kernel reports it (`idle` for
/// `SCHED_IDLE`, `low` at nice 19, else `normal`): INFO asks it on the worker serving the command,
/// so it shows what was applied, not what was configured. The inverse of [`apply_fanout_priority`].
pub(crate) fn current_thread_priority() -> crate::config::FanoutPriority {
    use crate::config::FanoutPriority;
    // SAFETY: plain syscalls on the calling thread; they read no memory of ours.
    let (policy, nice) = unsafe { (libc::sched_getscheduler(0), libc::getpriority(libc::PRIO_PROCESS, 0)) };
    if policy == libc::SCHED_IDLE {
        FanoutPriority::Idle
    } else if nice == 19 {
        FanoutPriority::Low
    } else {
        FanoutPriority::Normal
    }
}

/// Allocations at least this large get their own mapping, returned to the system when freed:
/// above the fan-out's largest reused buffers (1 MiB disk-tier reads, 128 KiB upstream reads),
/// which would otherwise be mapped and unmapped once per use (a fixed 256 KiB threshold made 64
/// sinks behind the memory tail cost 9.3 CPU-seconds instead of 4.1 for a 199 MB burst).
const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free memory above this at the top of a heap goes back to the system at once. glibc's default
/// grows with the largest buffer freed (up to 64 MiB), and `malloc_trim` leaves the top of every
/// heap but the main one to that rule: after a 199 MB burst to 64 sinks the relay stayed 3-5 MiB
/// above its idle RSS with the default, 1 MiB with this (the threads' heaps returned their tops).
const TRIM_THRESHOLD: i32 = 128 << 10;

/// Fixes glibc's mmap and trim thresholds (see [`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`]); fixing them
/// also stops glibc from raising them after each large free. Call before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
