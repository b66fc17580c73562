//! Pool-wide counters, shared codec state, and the stats snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use serde::Serialize;

/// Totals that outlive individual connections; workers add to them per batch.
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    /// The pool thread's Linux thread id (set when it starts).
    pub pool_thread_id: AtomicU64,
    pub frames_received: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub reconnects: AtomicU64,
    pub dropped: AtomicU64,
    pub blocked_ns: AtomicU64,
    pub malformed: AtomicU64,
    pub sequence_gaps: AtomicU64,
    pub requests_sent: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_timed_out: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub request_latency: LatencyCounters,
    pub scale_ups: AtomicU64,
    pub scale_downs: AtomicU64,
    /// The last computed load, as `f64` bits.
    pub load_bits: AtomicU64,
    /// Connection attempts made to replace a connection that was ready.
    pub reconnect_attempts: AtomicU64,
    pub reconnect_successes: AtomicU64,
    pub reconnect_failures: AtomicU64,
    /// Time from losing a ready connection to its replacement being ready.
    pub reconnect_time_last_us: AtomicU64,
    pub reconnect_time_max_us: AtomicU64,
    pub reconnect_time_total_us: AtomicU64,
}

/// Upper bounds (microseconds) of the request latency histogram buckets.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Request round-trip times: successful replies and venue errors, not timeouts.
#[derive(Debug, Default)]
pub(crate) struct LatencyCounters {
    /// One counter per bound, plus one for larger values.
    buckets: [AtomicU64; 15],
    sum_us: AtomicU64,
}

impl LatencyCounters {
    pub fn record(&self, elapsed_us: u64) {
        let index = LATENCY_BOUNDS_US
            .iter()
            .position(|bound| elapsed_us <= *bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(elapsed_us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            counts: self
                .buckets
                .iter()
                .map(|bucket| bucket.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A histogram of request round-trip times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LatencyHistogram {
    /// Upper bound of each bucket, in microseconds.
    pub bounds_us: Vec<u64>,
    /// Requests per bucket (not cumulative); one more entry than `bounds_us` for
    /// the requests above the last bound.
    pub counts: Vec<u64>,
    /// Sum of all recorded times, in microseconds.
    pub sum_us: u64,
}

/// Shared state reported by codecs (`SHARED` records), one value per key.
#[derive(Debug, Default)]
pub(crate) struct SharedData {
    // Guards the key → value map; written rarely, read by stats and callers.
    values: RwLock<HashMap<String, Vec<u8>>>,
    /// The bytes of the keys and values, kept with each change.
    bytes: std::sync::atomic::AtomicUsize,
}

/// At most this many shared-data keys: a venue that keeps inventing keys would grow
/// the map for the process's life (it outlives reconnects).
pub(crate) const MAX_SHARED_KEYS: usize = 4096;
/// At most this many bytes of shared data, keys and values.
pub(crate) const MAX_SHARED_BYTES: usize = 64 << 20;

impl SharedData {
    /// Sets `key`; a new key past [`MAX_SHARED_KEYS`], or a value that would take the
    /// whole past [`MAX_SHARED_BYTES`], is refused (and says why); the old value stays.
    pub fn set(&self, key: String, value: Vec<u8>) -> Result<(), String> {
        let mut values = self.values.write();
        let old = values.get(&key).map(|old| key.len() + old.len());
        if old.is_none() && values.len() >= MAX_SHARED_KEYS {
            return Err(format!(
                "shared data {key:?} not kept: the pool holds {MAX_SHARED_KEYS} keys already"
            ));
        }
        // Changed only under the write lock held here.
        let total = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        let after = total - old.unwrap_or(0) + key.len() + value.len();
        if after > MAX_SHARED_BYTES {
            return Err(format!(
                "shared data {key:?} not kept: {} bytes would take the pool's shared data \
                 past {MAX_SHARED_BYTES} bytes",
                value.len()
            ));
        }
        values.insert(key, value);
        self.bytes
            .store(after, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.values.read().get(key).cloned()
    }

    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.values.read().keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn is_empty(&self) -> bool {
        self.values.read().is_empty()
    }
}

/// A snapshot of the pool's state (`GET /api/v1/pool/stats`, `stats()` everywhere).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Live connections in any state.
    pub total_connections: usize,
    /// Connections whose session is ready.
    pub ready_connections: usize,
    /// Ready connections with at least one request in flight.
    pub busy_connections: usize,
    /// Requests awaiting a reply (sent, or waiting for a ready connection).
    pub pending_requests: usize,
    /// Configured minimum.
    pub min_connections: u32,
    /// Configured maximum.
    pub max_connections: u32,
    /// `pool_ready` has fired: the initial connections were ready once.
    pub initialized: bool,
    /// A codec has reported shared state (schema, instruments, ...).
    pub has_shared_data: bool,
    /// Data messages handed to the consumer queue.
    pub messages_received: u64,
    /// Frames read from upstream (data, replies and control messages of the codec).
    pub frames_received: u64,
    /// Frames written upstream.
    pub messages_sent: u64,
    /// Payload bytes read from upstream.
    pub bytes_received: u64,
    /// Payload bytes written upstream.
    pub bytes_sent: u64,
    /// Connections replaced after they ended unexpectedly.
    pub reconnects: u64,
    /// Desired subscriptions.
    pub subscriptions: usize,
    /// Subscriptions confirmed by a ready connection.
    pub subscriptions_active: usize,
    /// Messages waiting in the consumer queue.
    pub queue_depth: usize,
    /// Their payload bytes (bounded by `queue.max_bytes`).
    pub queue_bytes: usize,
    /// Capacity of the consumer queue.
    pub queue_capacity: usize,
    /// Messages dropped by the overflow policy.
    pub dropped_messages: u64,
    /// Milliseconds workers spent blocked on a full queue (slow consumer).
    pub blocked_ms: u64,
    /// Inbound frames the codec could not understand.
    pub malformed_frames: u64,
    /// Sequence gaps reported by the codec.
    pub sequence_gaps: u64,
    /// Requests that timed out.
    pub requests_timed_out: u64,
    /// Requests withdrawn by their caller before they finished and before their
    /// deadline: a [`PendingRequest`](crate::PendingRequest) dropped (C
    /// `wirepool_pending_request_free`, Python `cancel()`, a Ctrl-C in `request`).
    pub requests_cancelled: u64,
    /// Requests that failed (remote error, connection lost).
    pub requests_failed: u64,
    /// Keys of shared data.
    pub shared_keys: Vec<String>,
    /// Events dropped because nobody read them.
    pub events_dropped: u64,
    /// The pool thread's Linux thread id, for `taskset -p`, `top -H` or `perf -t`
    /// (each connection's worker has its own: `thread_id` in the connection list).
    pub pool_thread_id: u64,
    /// Connections added by auto-scaling.
    pub scale_ups: u64,
    /// Connections drained by auto-scaling.
    pub scale_downs: u64,
    /// Current load (0..1) as auto-scaling sees it.
    pub load: f64,
    /// Connection attempts made to replace a connection that had been ready.
    pub reconnect_attempts: u64,
    /// Replacements that became ready.
    pub reconnect_successes: u64,
    /// Replacement attempts that failed.
    pub reconnect_failures: u64,
    /// Milliseconds from the last lost connection to its replacement being ready.
    pub last_time_to_reconnect_ms: f64,
    /// The longest such time so far.
    pub max_time_to_reconnect_ms: f64,
    /// The mean of such times.
    pub mean_time_to_reconnect_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_is_bounded_in_keys_and_bytes_and_says_so() {
        let shared = SharedData::default();
        for index in 0..MAX_SHARED_KEYS {
            shared.set(format!("k{index}"), vec![1]).expect("room");
        }
        let refused = shared
            .set("one more".into(), vec![1])
            .expect_err("no room for a key");
        assert!(refused.contains("4096 keys"), "{refused}");
        // A key it has may still change.
        shared.set("k7".into(), vec![2, 3]).expect("an update");
        assert_eq!(shared.get("k7"), Some(vec![2, 3]));
        // Bytes: a value that would take the whole past the limit is refused, and the
        // old value stays.
        let refused = shared
            .set("k8".into(), vec![0; MAX_SHARED_BYTES])
            .expect_err("too big");
        assert!(refused.contains("bytes would take"), "{refused}");
        assert_eq!(shared.get("k8"), Some(vec![1]));
    }
}
