//! Measures the replication log on this machine: append throughput under each fsync policy, and the
//! time to reopen (recover) a log of a given size.
//!
//! `cargo run --release --example log_bench -- [SIZE_MB] [CHUNK_KB] [DIR]` (defaults: 1024 MB, 16 KB,
//! a temp dir). Appends go through the log writer's thread as the relay's do.

use std::time::Instant;

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
    let runtime = tokio::runtime::Runtime::new()?;
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
        let (elapsed, written) = runtime.block_on(async {
            // The relay's own write path: the writer thread fed over its channel (and, under
            // `everysec`, its syncer thread).
            let (log, writer, _) = ReplicationLog::open(&dir, options)?;
            let writer = writer.spawn()?;
            writer.reset("a".repeat(40), redis_relay::offset::Position::ZERO).await?;
            let started = Instant::now();
            let mut written = 0;
            while written < bytes {
                writer.append(chunk.clone()).await?;
                written += chunk.len() as u64;
            }
            writer.barrier().await?;
            drop(writer);
            // The writer fsyncs what it has before it ends.
            log.writer_stopped().await;
            anyhow::Ok((started.elapsed(), written))
        })?;
        let started = Instant::now();
        let (reopened, _writer, recovery) = ReplicationLog::open(&dir, options)?;
        let reopen = started.elapsed();
        assert_eq!(reopened.summary().end.get(), written, "recovered everything");
        assert!(recovery.dropped.is_none());
        let rate = written as f64 / (1 << 20) as f64 / elapsed.as_secs_f64();
        println!("| {} ({} MB) | {rate:.0} | {:.2} |", policy.name(), bytes >> 20, reopen.as_secs_f64());
        drop(reopened);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
