//! wirepool keeps a pool of persistent, authenticated WebSocket connections to upstream
//! market-data and trading venues, speaks each venue's protocol through a sandboxed
//! WebAssembly codec, and hands decoded messages to the host program.
//!
//! One OS thread per upstream connection does blocking-style I/O (a non-blocking socket
//! and a poller the pool can wake); a pool thread keeps the desired subscriptions,
//! places them on ready connections, reconnects with backoff and routes requests.
//! Decoded messages go from the workers straight to a bounded consumer queue.
//!
//! ```no_run
//! use std::time::Duration;
//! use wirepool::{Config, Pool};
//!
//! let config = Config::from_json(r#"{"servers":[{"url":"ws://127.0.0.1:9001"}]}"#)?;
//! let pool = Pool::new(config)?;
//! pool.wait_ready(Duration::from_secs(10))?;
//! pool.subscribe("ticker.0")?;
//! while let Some(message) = pool.recv(Some(Duration::from_secs(1)))? {
//!     println!("{} {}", message.channel, String::from_utf8_lossy(&message.payload));
//! }
//! # Ok::<(), wirepool::Error>(())
//! ```
//!
//! The C ABI lives in [`ffi`] (header `include/wirepool.h`), the codec ABI is
//! described in `docs/codec-abi.md`, and the feed simulator used by the demo and the
//! tests is [`simulator`].
#![deny(missing_docs)]

mod affinity;
mod codec;
pub mod config;
mod connection;
mod error;
mod eventfd;
pub mod ffi;
mod file_limits;
mod http;
mod pool;
mod prefetch;
mod queue;
pub mod simulator;
#[cfg(test)]
mod test_support;

pub use codec::{check_module_file, ABI_VERSION};
pub use config::{Config, ConfigIssue};
pub use error::{Error, Result, TimeoutPhase};
pub use file_limits::{MAX_CODEC_FILE_BYTES, MAX_CONFIG_FILE_BYTES, MAX_TLS_FILE_BYTES};
pub use pool::{
    BatchOptions, ConnectionSnapshot, Event, HealthChange, HealthLevel, HealthReport,
    LatencyHistogram, Lease, PendingRequest, Pool, PoolSettings, PoolStats, RequestOptions,
    ServerSnapshot,
};
pub use queue::{Message, MessageBatch, MessageKind, MessageRef};

/// The library version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Raises this process's soft limit on open files to its hard limit (to the kernel's
/// `fs.nr_open` when the hard limit is unlimited) and returns `(before, after)`.
///
/// Each connection holds three file descriptors (its socket, and its worker's epoll
/// and wake-up eventfd), so the common soft limit of 1024 stops a process near 330
/// connections with "Too many open files". The `wirepool` daemon calls this
/// at start; a program linking the library decides for itself.
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    let mut wanted = limit.rlim_max;
    if wanted == libc::RLIM_INFINITY {
        wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if before >= wanted {
        return Ok((before, before));
    }
    limit.rlim_cur = wanted;
    // SAFETY: setrlimit reads the valid struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            err.kind(),
            format!(
                "the limit stays at {before} (about {} connections): raising it to {wanted} failed: {err}",
                before / 4
            ),
        ));
    }
    Ok((before, wanted))
}
