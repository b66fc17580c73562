//! Connect-to-ready timings and the resident memory of idle connections.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wirepool::{Config, Pool, PoolSettings};

use crate::meter::{
    heap_in_use_bytes, mapping_count, pss_bytes, quantile, rss_by_mapping, rss_bytes, thread_count,
};

fn config(url: &str, ca_file: Option<&str>, min: u32, max: u32) -> Result<Config, String> {
    let mut config = json!({
        "servers": [{"url": url}],
        "pool": {"min_connections": min, "max_connections": max},
    });
    if let Some(ca_file) = ca_file {
        config["tls"] = json!({"ca_file": ca_file, "roots": "none"});
    }
    Config::from_json(&config.to_string()).map_err(|err| format!("config: {err}"))
}

fn millis(samples: &mut [u64]) -> (f64, f64) {
    samples.sort_unstable();
    (
        quantile(samples, 0.5) as f64 / 1e6,
        quantile(samples, 0.99) as f64 / 1e6,
    )
}

/// Two timings per scheme, `samples` times each (json codec, idle feed):
/// - `connection`: one more connection on a running pool (`open_connection` until its
///   `ready` event): thread, codec instance, TCP, TLS, WebSocket handshake, codec open;
/// - `cold`: `Pool::new` + `wait_ready` for a one-connection pool, which also starts
///   the pool's threads (`pool_new` is that first part; the codec module is loaded
///   once per process, timed as `first_pool_new`, one sample).
pub fn connect(url: &str, ca_file: Option<&str>, samples: usize) -> Result<Value, String> {
    let idle_url = format!("{url}/feed?idle=1");
    let mut connection_ns = Vec::with_capacity(samples);
    let first_pool_new;
    {
        // The process's first pool: it loads the codec (a built-in one from the
        // artifact build.rs made, or compiled) and starts the pool's threads.
        let started = Instant::now();
        let pool = Pool::new(config(&idle_url, ca_file, 1, samples as u32 + 1)?)
            .map_err(|err| format!("pool: {err}"))?;
        first_pool_new = started.elapsed();
        pool.wait_ready(Duration::from_secs(10))
            .map_err(|err| format!("wait_ready: {err}"))?;
        pool.events(Duration::ZERO);
        for _ in 0..samples {
            let started = Instant::now();
            let id = pool
                .open_connection()
                .map_err(|err| format!("open_connection: {err}"))?;
            'wait: loop {
                if started.elapsed() > Duration::from_secs(10) {
                    return Err(format!("connection {id} not ready within 10 s"));
                }
                for event in pool.events(Duration::from_millis(100)) {
                    if event.connection_id == Some(id) {
                        match event.kind {
                            "ready" => break 'wait,
                            "closed" | "error" => {
                                return Err(format!(
                                    "connection {id}: {} {:?}",
                                    event.kind, event.message
                                ))
                            }
                            _ => {}
                        }
                    }
                }
            }
            connection_ns.push(started.elapsed().as_nanos() as u64);
        }
        pool.close();
    }
    let mut cold_ns = Vec::with_capacity(samples);
    let mut new_ns = Vec::with_capacity(samples);
    for _ in 0..samples {
        let config = config(&idle_url, ca_file, 1, 1)?;
        let started = Instant::now();
        let pool = Pool::new(config).map_err(|err| format!("pool: {err}"))?;
        new_ns.push(started.elapsed().as_nanos() as u64);
        pool.wait_ready(Duration::from_secs(10))
            .map_err(|err| format!("wait_ready: {err}"))?;
        cold_ns.push(started.elapsed().as_nanos() as u64);
        pool.close();
    }
    let (connection_median, connection_p99) = millis(&mut connection_ns);
    let (cold_median, cold_p99) = millis(&mut cold_ns);
    let (new_median, new_p99) = millis(&mut new_ns);
    let scheme = if ca_file.is_some() { "wss" } else { "ws" };
    Ok(json!({
        "measure": format!("connect_{scheme}"),
        "samples": samples,
        "connection_median_ms": connection_median,
        "connection_p99_ms": connection_p99,
        "cold_median_ms": cold_median,
        "cold_p99_ms": cold_p99,
        "pool_new_median_ms": new_median,
        "pool_new_p99_ms": new_p99,
        "first_pool_new_ms": first_pool_new.as_secs_f64() * 1000.0,
    }))
}

/// Resident memory of `connections` idle, ready connections (json codec): threads,
/// buffers, codec instances, all included. Measured in steps: the process before the
/// pool; the pool with no connection (its one-time costs: the codec module, the code
/// pages the pool runs, its threads); one connection; all of them.
/// The headline is what the connections add to the pool; the pool's own cost and the
/// sum of both are reported beside it.
pub fn memory(url: &str, connections: u32) -> Result<Value, String> {
    // Best effort: a failure shows as connections that do not come up.
    let _ = wirepool::raise_open_file_limit();
    let connections = connections.max(2);
    let idle_url = format!("{url}/feed?idle=1");
    let threads_before = thread_count();
    let rss_before = rss_bytes();
    let pss_before = pss_bytes();
    let pool = Pool::new(config(&idle_url, None, 0, connections)?)
        .map_err(|err| format!("pool: {err}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_pool = rss_bytes();
    let pss_pool = pss_bytes();
    let grow = |count: u32| -> Result<(), String> {
        let settings = pool.settings();
        pool.reconfigure(PoolSettings {
            min_connections: count,
            max_connections: connections,
            ..settings
        })
        .map_err(|err| format!("reconfigure: {err}"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while pool.stats().ready_connections < count as usize {
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {count} connections ready after 120 s",
                    pool.stats().ready_connections
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    grow(1)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_one = rss_bytes();
    let heap_one = heap_in_use_bytes();
    let mappings_one = mapping_count();
    let started = Instant::now();
    grow(connections)?;
    let ready_after = started.elapsed();
    // Idle: the workers have had nothing to do for longer than the quiet time after
    // which they give their deeper stack pages back (2 s), and have waited since.
    std::thread::sleep(Duration::from_millis(3500));
    let rss_after = rss_bytes();
    let pss_after = pss_bytes();
    let heap_after = heap_in_use_bytes();
    let mappings_after = mapping_count();
    let threads_after = thread_count();
    let largest: Vec<Value> = rss_by_mapping()
        .into_iter()
        .take(12)
        .map(|(size_kib, name, mappings, rss_kib)| {
            json!({"mapping_kib": size_kib, "name": name, "mappings": mappings, "rss_kib": rss_kib})
        })
        .collect();
    let ready = pool.stats().ready_connections;
    pool.close();
    let mib = (1 << 20) as f64;
    let per_1000 = |bytes: u64, count: u32| bytes as f64 / f64::from(count) * 1000.0 / mib;
    Ok(json!({
        "measure": "memory_idle",
        "connections": connections,
        "ready_connections": ready,
        "rss_before_mb": rss_before as f64 / mib,
        "rss_pool_mb": rss_pool as f64 / mib,
        "rss_one_connection_mb": rss_one as f64 / mib,
        "rss_after_mb": rss_after as f64 / mib,
        "rss_mb_per_1000_idle": per_1000(rss_after.saturating_sub(rss_pool), connections),
        "rss_mb_per_1000_idle_marginal": per_1000(rss_after.saturating_sub(rss_one), connections - 1),
        // The pool once, and 1000 connections at the rate measured.
        "rss_mb_pool_and_1000_idle": (rss_pool.saturating_sub(rss_before) as f64 / mib)
            + per_1000(rss_after.saturating_sub(rss_pool), connections),
        "pss_mb_per_1000_idle": per_1000(pss_after.saturating_sub(pss_pool), connections),
        "pool_mb": rss_pool.saturating_sub(rss_before) as f64 / mib,
        "pool_pss_mb": pss_pool.saturating_sub(pss_before) as f64 / mib,
        "first_connection_mb": rss_one.saturating_sub(rss_pool) as f64 / mib,
        "mappings_per_connection": mappings_after.saturating_sub(mappings_one) as f64
            / f64::from(connections - 1),
        "heap_in_use_kb_per_connection": heap_after.saturating_sub(heap_one) as f64
            / f64::from(connections - 1)
            / 1024.0,
        "threads_added": threads_after.saturating_sub(threads_before),
        // From one connection to all of them.
        "all_ready_ms": ready_after.as_secs_f64() * 1000.0,
        "largest_rss_groups": largest,
    }))
}

/// A burst of `channels` subscriptions on a pool of three connections to the built-in
/// feed simulator (in this process, sending no data): the time until every one is
/// confirmed by the venue and shown in the pool's stats. The pool thread handles such a
/// burst many messages per pass, so the cost grows with the number of channels, not
/// with its square.
pub fn subscriptions(channels: u32) -> Result<Value, String> {
    use wirepool::simulator::{Simulator, SimulatorConfig};
    let simulator = Simulator::start(SimulatorConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 0.0,
        ..SimulatorConfig::default()
    })
    .map_err(|err| format!("simulator: {err}"))?;
    let config = Config::from_json(
        &json!({
            "servers": [{"url": simulator.url()}],
            "pool": {"min_connections": 3, "max_connections": 3},
        })
        .to_string(),
    )
    .map_err(|err| format!("config: {err}"))?;
    let pool = Pool::new(config).map_err(|err| format!("pool: {err}"))?;
    pool.wait_ready(Duration::from_secs(10))
        .map_err(|err| format!("wait_ready: {err}"))?;
    let channels = channels as usize;
    let started = Instant::now();
    for index in 0..channels {
        pool.subscribe(&format!("instrument.{index}"))
            .map_err(|err| format!("subscribe: {err}"))?;
    }
    let queued = started.elapsed();
    let deadline = started + Duration::from_secs(120);
    loop {
        let stats = pool.stats();
        if stats.subscriptions_active == channels {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {channels} subscriptions confirmed after 120 s",
                stats.subscriptions_active
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let confirmed = started.elapsed();
    pool.close();
    Ok(json!({
        "measure": "subscribe_burst",
        "channels": channels,
        "connections": 3,
        "queued_ms": queued.as_secs_f64() * 1000.0,
        "all_confirmed_ms": confirmed.as_secs_f64() * 1000.0,
    }))
}
