//! A worker waiting for room in a full `block` queue (a consumer that stopped reading)
//! still acts on its commands at once: subscriptions, requests and a close reach the
//! venue while the consumer reads nothing (those the rate limit holds, when their turn
//! comes), and nothing it had read is lost.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wirepool::Pool;

use crate::support::{pool_from, request_in_background, watchdog, Acceptor};

/// What the venue read from the client, in order: text frames as they are, a close
/// frame as `"<close>"`, a ping as `"<ping>"`.
type Received = Arc<Mutex<Vec<String>>>;

/// A venue that floods every connection with `data` frames numbered from 0 (written by
/// a thread of their own, so a client that stops reading blocks only that thread) and
/// records what the client sends, read by another thread.
struct FloodVenue {
    acceptor: Acceptor,
    received: Received,
}

impl FloodVenue {
    fn start() -> FloodVenue {
        let received: Received = Arc::default();
        let acceptor = {
            let received = Arc::clone(&received);
            Acceptor::start(move |stream, stop| {
                let Ok(ws) = tungstenite::accept(stream) else {
                    return;
                };
                // The client sends nothing before it has the handshake's reply, so
                // nothing is left in tungstenite's buffer.
                let stream = ws.into_inner();
                let reader = stream.try_clone().expect("clone");
                std::thread::scope(|scope| {
                    scope.spawn(|| read_client_frames(reader, &received, stop));
                    flood(stream, stop);
                });
            })
        };
        FloodVenue { acceptor, received }
    }

    fn url(&self) -> String {
        self.acceptor.url()
    }

    fn wait_for(&self, what: &str, predicate: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received.lock().expect("lock").clone();
            if received.iter().any(|frame| predicate(frame)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the venue never received {what} while the consumer was stalled; it got {received:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Writes numbered data frames (unmasked, as a server sends them) until told to stop
/// or the client goes away.
fn flood(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(50)));
    let mut n = 0u64;
    let mut batch = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        for _ in 0..64 {
            let text = format!(r#"{{"type":"data","channel":"flood","payload":{{"n":{n}}}}}"#);
            batch.extend_from_slice(&[0x81, text.len() as u8]);
            batch.extend_from_slice(text.as_bytes());
            n += 1;
        }
        let mut written = 0;
        while written < batch.len() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match stream.write(&batch[written..]) {
                Ok(0) => return,
                Ok(k) => written += k,
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    }
}

/// Reads the client's (masked) frames and records them.
fn read_client_frames(mut stream: TcpStream, received: &Mutex<Vec<String>>, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(k) => buffer.extend_from_slice(&chunk[..k]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => return,
        }
        while let Some((opcode, payload, used)) = parse_masked_frame(&buffer) {
            buffer.drain(..used);
            let entry = match opcode {
                0x1 => String::from_utf8_lossy(&payload).into_owned(),
                0x8 => "<close>".to_string(),
                0x9 => "<ping>".to_string(),
                _ => continue,
            };
            received.lock().expect("lock").push(entry);
        }
    }
}

/// One whole client frame at the front of `buffer`: (opcode, unmasked payload, bytes).
fn parse_masked_frame(buffer: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buffer.len() < 2 {
        return None;
    }
    let opcode = buffer[0] & 0x0f;
    let (len, mut at) = match buffer[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buffer.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buffer.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        short => (short as usize, 2),
    };
    let mask: [u8; 4] = buffer.get(at..at + 4)?.try_into().ok()?;
    at += 4;
    let payload = buffer.get(at..at + len)?;
    let unmasked = payload
        .iter()
        .enumerate()
        .map(|(i, byte)| byte ^ mask[i % 4])
        .collect();
    Some((opcode, unmasked, at + len))
}

/// A one-connection pool on `venue` with an 8-message `block` queue (and the `extra`
/// config sections), stalled: the queue is full and the worker waits for room.
fn stalled_pool(venue: &FloodVenue, extra: serde_json::Value) -> Pool {
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": venue.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "queue": {"capacity": 8, "overflow": "block"},
            // No pings: the venue's writer does not answer them.
            "heartbeat": {"ping_interval_ms": 0},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
        }),
        extra,
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().queue_depth < 8 {
        assert!(Instant::now() < deadline, "the queue never filled up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The venue writes far faster than this: by now the worker holds more and waits.
    std::thread::sleep(Duration::from_millis(200));
    pool
}

/// Reads `connection`'s flood in order from 0 until `upto`, checking for gaps.
fn read_flood_in_order(pool: &Pool, connection: u64, upto: u64) {
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < upto {
        assert!(
            Instant::now() < deadline,
            "only {next} of {upto} messages of connection {connection} arrived"
        );
        let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") else {
            continue;
        };
        if message.connection_id != connection {
            continue;
        }
        let text = String::from_utf8_lossy(&message.payload).into_owned();
        assert_eq!(
            text,
            format!(r#"{{"n":{next}}}"#),
            "messages of connection {connection} out of order or lost"
        );
        next += 1;
    }
}

#[test]
fn a_worker_blocked_on_a_full_queue_still_sends_subscriptions_and_requests() {
    let _guard = watchdog("blocked_worker_commands", Duration::from_secs(120));
    let venue = FloodVenue::start();
    let pool = Arc::new(stalled_pool(&venue, serde_json::json!({})));
    let connection = pool.connections()[0].id;
    pool.subscribe("late-channel").expect("subscribe");
    venue.wait_for("the subscribe", |frame| frame.contains("late-channel"));
    // The venue gets the order even though its reply waits behind the flood.
    let caller = request_in_background(
        &pool,
        br#"{"order":"while-stalled"}"#,
        Duration::from_secs(60),
        false,
    );
    venue.wait_for("the request", |frame| frame.contains("while-stalled"));
    // Nothing was lost or reordered on the way: the consumer now reads the flood.
    read_flood_in_order(&pool, connection, 5000);
    pool.close();
    let _ = caller.join().expect("caller thread");
}

#[test]
fn a_worker_blocked_on_a_full_queue_closes_at_once_and_keeps_what_it_read() {
    let _guard = watchdog("blocked_worker_close", Duration::from_secs(120));
    let venue = FloodVenue::start();
    let pool = stalled_pool(&venue, serde_json::json!({}));
    let snapshot = pool.connections()[0].clone();
    // The worker reads nothing more while it waits: this is what it has accepted.
    let read = snapshot.messages_received;
    assert!(read > 8, "the worker should hold more than the queue does");
    pool.close_connection(snapshot.id).expect("close");
    venue.wait_for("the close frame", |frame| frame == "<close>");
    // Everything the worker had read before the close reaches the consumer, in order.
    read_flood_in_order(&pool, snapshot.id, read);
}

#[test]
fn a_frame_held_by_the_rate_limit_goes_out_on_time_while_the_worker_waits_for_room() {
    let _guard = watchdog("blocked_worker_rate_limit", Duration::from_secs(120));
    let venue = FloodVenue::start();
    // One frame a second: the second subscribe waits about a second for its turn.
    let pool = stalled_pool(
        &venue,
        serde_json::json!({"rate_limit": {"messages_per_second": 1}}),
    );
    // By now the bucket has its one token back.
    std::thread::sleep(Duration::from_millis(1200));
    pool.subscribe("first-channel").expect("subscribe");
    pool.subscribe("second-channel").expect("subscribe");
    venue.wait_for("the first subscribe", |frame| {
        frame.contains("first-channel")
    });
    // About a second later, with the consumer still reading nothing.
    venue.wait_for("the subscribe the rate limit held", |frame| {
        frame.contains("second-channel")
    });
    pool.close();
}

#[test]
fn a_worker_blocked_on_a_full_queue_keeps_sending_its_heartbeats() {
    let _guard = watchdog("blocked_worker_heartbeats", Duration::from_secs(120));
    let venue = FloodVenue::start();
    // The venue never answers pings: the time spent waiting for room must not count
    // against the pong timeout either.
    let pool = stalled_pool(
        &venue,
        serde_json::json!({"heartbeat": {"ping_interval_ms": 200, "pong_timeout_ms": 60000}}),
    );
    let connection = pool.connections()[0].id;
    let pings = || {
        let frames = venue.received.lock().expect("lock");
        let websocket = frames.iter().filter(|frame| *frame == "<ping>").count();
        let application = frames
            .iter()
            .filter(|f| f.contains(r#""type":"ping""#))
            .count();
        (websocket, application)
    };
    // Pings (WebSocket, and the json codec's application ping) go on while the
    // consumer reads nothing at all.
    let before = pings();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = pings();
        if now.0 >= before.0 + 2 && now.1 >= before.1 + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "heartbeats stopped while the worker waited for room: {before:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the connection is still the same one, with nothing lost.
    assert_eq!(
        pool.connections()[0].id,
        connection,
        "the connection was replaced"
    );
    read_flood_in_order(&pool, connection, 2000);
}

/// `queue.max_bytes` bounds the queue by payload bytes: with room for 100 000
/// messages but 2000 bytes, a stalled consumer finds about 2000 bytes queued (the
/// flood's messages are about 10 bytes), and reading on loses nothing.
#[test]
fn the_queue_is_bounded_by_bytes_as_well_as_by_messages() {
    let _guard = watchdog("queue bytes", Duration::from_secs(120));
    let venue = FloodVenue::start();
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": venue.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "queue": {"capacity": 100_000, "overflow": "block", "max_bytes": 2000},
            "heartbeat": {"ping_interval_ms": 0},
        }),
        serde_json::json!({}),
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    let connection = pool.connections()[0].id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().queue_depth < 100 {
        assert!(Instant::now() < deadline, "the queue never filled up");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The venue writes far faster than this: by now the worker waits for room.
    std::thread::sleep(Duration::from_millis(200));
    let stats = pool.stats();
    // The limit, and at most the one message that crossed it.
    assert!(
        stats.queue_bytes <= 2100,
        "{} bytes queued",
        stats.queue_bytes
    );
    assert!(
        stats.queue_depth < 1000,
        "{} messages queued",
        stats.queue_depth
    );
    read_flood_in_order(&pool, connection, 5000);
    pool.close();
}
