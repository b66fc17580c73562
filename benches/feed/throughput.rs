//! Throughput on the flat-out feed: the plain tungstenite baseline and the pool
//! through its Rust API. Every consumer does the same small work per message: it
//! reads a number out of the payload (the sequence number of a whole frame, or the
//! send timestamp of a json-codec payload), so nothing is optimised away and gaps
//! would show.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message as WsMessage;
use wirepool::{Config, MessageBatch, Pool};

use crate::frames::{seq_of, ts_ns_of};
use crate::meter::{Meter, Window};

/// How long a consumer waits for data before it gives up on the feed.
const STALL: Duration = Duration::from_secs(15);

/// The subscribe frame every client sends (the raw codec sends it as configured).
pub fn subscribe_frame(channel: &str) -> String {
    format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#)
}

/// Stops the feed and drains the queue, then closes the pool, so the close handshake
/// does not wait behind a flood of data and nothing measured runs into the next job.
pub fn finish(pool: Pool, channels: u32) {
    for index in 0..channels {
        let _ = pool.unsubscribe(&format!("c{index}"));
    }
    let mut sink = Vec::with_capacity(4096);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        sink.clear();
        match pool.recv_batch(&mut sink, 4096, Some(Duration::from_millis(300))) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    pool.close();
}

/// Per connection: the next sequence number expected and the gaps seen. Messages
/// come in runs per connection, so the map is touched only when the connection changes.
#[derive(Default)]
pub struct SeqCheck {
    current: Option<(u64, u64)>,
    others: HashMap<u64, u64>,
    pub gaps: u64,
    pub unparsed: u64,
}

impl SeqCheck {
    pub fn check(&mut self, connection: u64, frame: &[u8]) {
        let Some(seq) = seq_of(frame) else {
            self.unparsed += 1;
            return;
        };
        let expected = match self.current {
            Some((current, next)) if current == connection => next,
            other => {
                if let Some((current, next)) = other {
                    self.others.insert(current, next);
                }
                self.others.remove(&connection).unwrap_or(seq)
            }
        };
        if expected != seq {
            self.gaps += 1;
        }
        self.current = Some((connection, seq + 1));
    }
}

/// The baseline: one blocking tungstenite client reading the feed in a plain loop.
pub fn raw_tungstenite(url: &str, window: Window) -> Result<Value, String> {
    let (host_port, path) = split_url(url)?;
    let tcp = TcpStream::connect(&host_port).map_err(|err| format!("connect {url}: {err}"))?;
    tcp.set_nodelay(true).map_err(|err| err.to_string())?;
    tcp.set_read_timeout(Some(STALL))
        .map_err(|err| err.to_string())?;
    let (mut ws, _) = tungstenite::client(format!("ws://{host_port}{path}"), tcp)
        .map_err(|err| format!("handshake with {url}: {err}"))?;
    ws.send(WsMessage::text(subscribe_frame("c0")))
        .map_err(|err| format!("subscribe: {err}"))?;
    let mut meter = Meter::new(window);
    let mut check = SeqCheck::default();
    let mut bytes = 0u64;
    let mut since_clock = 0usize;
    loop {
        match ws.read() {
            Ok(WsMessage::Text(text)) => {
                if meter.measuring() {
                    bytes += text.len() as u64;
                }
                check.check(0, text.as_bytes());
            }
            Ok(_) => continue,
            Err(err) => return Err(format!("reading the feed: {err}")),
        }
        // The clock is read every 64 messages (the pool is timed per batch).
        since_clock += 1;
        if since_clock == 64 {
            since_clock = 0;
            if meter.batch(64) {
                break;
            }
        }
    }
    drop(ws);
    let mut result = meter.summary("raw_tungstenite");
    result["bytes"] = json!(bytes);
    result["gaps"] = json!(check.gaps);
    Ok(result)
}

/// `ws://host:port/path` → (`host:port`, `/path`).
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url}: expected ws://"))?;
    Ok(match rest.find('/') {
        Some(at) => (rest[..at].to_string(), rest[at..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    })
}

/// A pool config for the bench feed: `connections` connections, `codec` raw (its
/// default: frames pass through without a decode call), raw-decode (the raw codec with
/// passthrough off: one codec call per batch and a record per frame), json, or
/// json-file (the json codec loaded from its file, so compiled at start rather than
/// precompiled by build.rs, and without the call budget a file's codec has by default,
/// so the same code: for comparing the two), or json-budget (the built-in json
/// codec with a 100 ms call budget, so compiled with the epoch checks a budget needs,
/// as a codec loaded from a file is by default).
pub fn pool_config(urls: &[String], codec: &str, connections: u32) -> Result<Config, String> {
    let codec_config = match codec {
        // The raw codec sends the subscribe frame it is given; the feed starts on it.
        "raw" | "raw-decode" => json!({"builtin": "raw", "config": {
            "subscribe_frame": subscribe_frame("{channel}"),
            "unsubscribe_frame": r#"{"type":"unsubscribe","channel":"{channel}"}"#,
            "passthrough": codec == "raw",
        }}),
        "json" => json!({"builtin": "json"}),
        "json-budget" => json!({"builtin": "json", "max_call_ms": 100}),
        // The same module from its file: compiled in this process, not precompiled.
        "json-file" => json!({
            "path": concat!(env!("CARGO_MANIFEST_DIR"), "/codecs/json.wasm"),
            "max_call_ms": 0,
        }),
        other => return Err(format!("unknown codec {other}")),
    };
    let servers: Vec<Value> = urls.iter().map(|url| json!({"url": url})).collect();
    let config = json!({
        "servers": servers,
        "pool": {"min_connections": connections, "max_connections": connections},
        "codec": codec_config,
    });
    Config::from_json(&config.to_string()).map_err(|err| format!("config: {err}"))
}

/// The pool through its Rust API: `connections` connections, one channel each,
/// drained with `recv_into` (read in place) in batches of up to 4096.
pub fn pool_throughput(
    url: &str,
    codec: &str,
    connections: u32,
    window: Window,
) -> Result<Value, String> {
    let config = pool_config(&[url.to_string()], codec, connections)?;
    let pool = Pool::new(config).map_err(|err| format!("pool: {err}"))?;
    pool.wait_ready(Duration::from_secs(30))
        .map_err(|err| format!("wait_ready: {err}"))?;
    for index in 0..connections {
        pool.subscribe(&format!("c{index}"))
            .map_err(|err| format!("subscribe: {err}"))?;
    }
    let mut meter = Meter::new(window);
    let mut check = SeqCheck::default();
    let mut batch = MessageBatch::new();
    let mut bytes = 0u64;
    let mut checksum = 0u64;
    let mut connections_seen = HashSet::new();
    let mut last_connection = u64::MAX;
    let mut last_data = Instant::now();
    loop {
        let count = pool
            .recv_into(&mut batch, 4096, Some(Duration::from_millis(200)))
            .map_err(|err| format!("recv_into: {err}"))?;
        if count == 0 {
            if last_data.elapsed() > STALL {
                return Err(format!("no data for {STALL:?}; stats: {:?}", pool.stats()));
            }
            continue;
        }
        last_data = Instant::now();
        let measuring = meter.measuring();
        for message in batch.iter() {
            let payload = message.payload();
            if measuring {
                bytes += payload.len() as u64;
                // Messages come in runs per connection: the set is touched per run.
                if message.connection_id() != last_connection {
                    last_connection = message.connection_id();
                    connections_seen.insert(last_connection);
                }
            }
            if codec.starts_with("raw") {
                check.check(message.connection_id(), payload);
            } else {
                checksum = checksum.wrapping_add(ts_ns_of(payload).unwrap_or(0));
            }
        }
        if meter.batch(count) {
            break;
        }
    }
    let stats = pool.stats();
    let name = format!("pool_{}_{connections}", codec.replace('-', "_"));
    let mut result = meter.summary(&name);
    result["bytes"] = json!(bytes);
    result["checksum"] = json!(checksum);
    result["gaps"] = json!(check.gaps + stats.sequence_gaps);
    result["malformed"] = json!(stats.malformed_frames);
    result["connections_delivering"] = json!(connections_seen.len());
    result["blocked_ms"] = json!(stats.blocked_ms);
    result["reconnects"] = json!(stats.reconnects);
    finish(pool, connections);
    Ok(result)
}
