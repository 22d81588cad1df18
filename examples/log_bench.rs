//! Measures the replication log on this machine: append throughput under each fsync policy, and the
//! time to reopen (recover) a log of a given size.
//!
//! `cargo run --release --example log_bench -- [SIZE_MB] [CHUNK_KB] [DIR]` (defaults: 1024 MB, 16 KB,
//! a temp dir). `everysec` is simulated as the relay does it: a background thread calls `sync()`
//! once a second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_relay::log::{FsyncPolicy, LogOptions, ReplicationLog};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let size_mb: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let chunk_kb: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let base = match args.next() {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("log-bench-{}", std::process::id())),
    };
    let chunk: Vec<u8> = (0..chunk_kb * 1024).map(|i| (i % 251) as u8).collect();
    let chunk = Bytes::from(chunk);
    let total = size_mb << 20;
    println!("appending {size_mb} MB in {chunk_kb} KB chunks under {}", base.display());
    println!("| policy | append MB/s | reopen (recovery) seconds |");
    println!("|---|---|---|");
    for policy in [FsyncPolicy::No, FsyncPolicy::EverySec, FsyncPolicy::Always] {
        // `always` fsyncs every append: measure it on a tenth of the data so the run stays short.
        let bytes = if policy == FsyncPolicy::Always { total / 10 } else { total };
        let dir = base.join(policy.name());
        let _ = std::fs::remove_dir_all(&dir);
        let options = LogOptions {
            retention: bytes * 2,
            max_size: bytes * 2,
            memory: 64 << 20,
            segment_size: 64 << 20,
            max_age: None,
            fsync: policy,
        };
        let (elapsed, written) = {
            let (log, _) = ReplicationLog::open(&dir, options)?;
            let log = Arc::new(log);
            log.reset("a".repeat(40), 0)?;
            let stop = Arc::new(AtomicBool::new(false));
            let syncer = (policy == FsyncPolicy::EverySec).then(|| {
                let (log, stop) = (log.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_secs(1));
                        let _ = log.sync();
                    }
                })
            });
            let started = Instant::now();
            let mut written = 0;
            while written < bytes {
                log.append(chunk.clone())?;
                written += chunk.len() as u64;
            }
            log.sync()?;
            let elapsed = started.elapsed();
            stop.store(true, Ordering::Relaxed);
            if let Some(handle) = syncer {
                let _ = handle.join();
            }
            (elapsed, written)
        };
        let started = Instant::now();
        let (reopened, recovery) = ReplicationLog::open(&dir, options)?;
        let reopen = started.elapsed();
        assert_eq!(reopened.summary().end, written, "recovered everything");
        assert!(recovery.dropped.is_none());
        let rate = written as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
        println!("| {} ({} MB) | {rate:.0} | {:.2} |", policy.name(), bytes >> 20, reopen.as_secs_f64());
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
