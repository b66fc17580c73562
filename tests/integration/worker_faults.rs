//! Worker edge cases: liveness clocks after a slow consumer, request frames held back
//! by the outbound rate limit (cancelled, or on a connection that dies before they go
//! out), heartbeats behind a slow rate limit, data decoded before a fatal record.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tungstenite::Message as WsMessage;
use wirepool::{Config, Error, Pool, RequestOptions};

use crate::support::{
    last_message, pool_from, request_in_background, simulator, wait_for_event, watchdog, Acceptor,
    ScriptServer,
};

fn pool_with(url: &str, extra: serde_json::Value) -> Pool {
    let config = serde_json::json!({
        "servers": [{"url": url}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
    });
    let pool = pool_from(config, extra);
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    pool
}

/// A JSON-protocol venue that records every text frame it receives, confirms
/// subscriptions, echoes requests, and drops every open connection on demand.
struct RecordingVenue {
    acceptor: Acceptor,
    frames: Arc<Mutex<Vec<String>>>,
    drop_connections: Arc<AtomicBool>,
}

impl RecordingVenue {
    fn start() -> RecordingVenue {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let drop_connections = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (frames, drop_connections) = (Arc::clone(&frames), Arc::clone(&drop_connections));
            Acceptor::start(move |stream, stop| serve(stream, &frames, &drop_connections, stop))
        };
        RecordingVenue {
            acceptor,
            frames,
            drop_connections,
        }
    }

    fn url(&self) -> String {
        self.acceptor.url()
    }

    fn frames(&self) -> Vec<String> {
        self.frames.lock().expect("frames lock").clone()
    }

    fn wait_for_frame(&self, what: &str, predicate: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.frames().iter().any(|frame| predicate(frame)) {
            assert!(
                Instant::now() < deadline,
                "the venue never received {what}; it got {:?}",
                self.frames()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn serve(stream: TcpStream, frames: &Mutex<Vec<String>>, drop: &AtomicBool, stop: &AtomicBool) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    let _ = ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)));
    while !stop.load(Ordering::Relaxed) {
        if drop.swap(false, Ordering::Relaxed) {
            let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            return;
        }
        let text = match ws.read() {
            Ok(WsMessage::Text(text)) => text.to_string(),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(err))
                if err.kind() == ErrorKind::WouldBlock || err.kind() == ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        };
        frames.lock().expect("frames lock").push(text.clone());
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let reply = match frame["type"].as_str() {
            Some("subscribe") => serde_json::json!({
                "type": "subscribed",
                "channel": frame["channel"],
                "messageId": frame["messageId"],
            }),
            Some("data") => serde_json::json!({
                "type": "data",
                "payload": {"echo": frame["payload"]},
                "messageId": frame["messageId"],
            }),
            _ => continue,
        };
        if ws.send(WsMessage::text(reply.to_string())).is_err() {
            return;
        }
    }
}

#[test]
fn a_blocked_push_does_not_make_subscribed_channels_stale() {
    let _guard = watchdog("blocked_push_channel_staleness", Duration::from_secs(90));
    let sim = simulator(200.0);
    let pool = pool_with(
        &sim.url(),
        serde_json::json!({
            "queue": {"capacity": 8, "overflow": "block"},
            "heartbeat": {"stale_after_ms": 300},
        }),
    );
    pool.subscribe("ticker.0").expect("subscribe");
    pool.subscribe("ticker.1").expect("subscribe");
    let receive_both = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut zero, mut one) = (0usize, 0usize);
        while zero < count || one < count {
            assert!(
                Instant::now() < deadline,
                "only {zero} and {one} of {count} messages on ticker.0 / ticker.1"
            );
            if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
                match &*message.channel {
                    "ticker.0" => zero += 1,
                    "ticker.1" => one += 1,
                    _ => {}
                }
            }
        }
    };
    receive_both(50);
    // Both channels flow: anything stale from here on comes from the stall below.
    pool.events(Duration::ZERO);
    // The consumer stalls; the worker waits on the full queue far longer than
    // `stale_after_ms`, while the venue keeps sending on both channels.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.stats().queue_depth < 8 {
        assert!(Instant::now() < deadline, "the queue never filled up");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(1500));
    receive_both(200);
    assert!(
        pool.stats().blocked_ms > 0,
        "the worker should have waited on the full queue"
    );
    let stale: Vec<_> = pool
        .events(Duration::from_millis(100))
        .into_iter()
        .filter(|event| event.kind == "stale")
        .map(|event| (event.channel, event.message))
        .collect();
    assert!(
        stale.is_empty(),
        "time blocked on a slow consumer was counted against channel freshness: {stale:?}"
    );
}

#[test]
fn a_request_that_times_out_while_held_by_the_rate_limit_is_never_sent() {
    let _guard = watchdog("rate_limited_cancel", Duration::from_secs(90));
    let venue = RecordingVenue::start();
    let pool = pool_with(
        &venue.url(),
        serde_json::json!({
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    );
    // One frame a second: the first subscribe goes at once, the others wait their turn.
    for channel in ["a", "b", "c", "d"] {
        pool.subscribe(channel).expect("subscribe");
    }
    venue.wait_for_frame("the first subscribe", |frame| frame.contains("subscribe"));
    let held = pool.request(
        br#"{"marker":"given-up"}"#,
        RequestOptions {
            timeout: Some(Duration::from_millis(300)),
            idempotent: false,
        },
    );
    assert!(
        matches!(held, Err(Error::Timeout { .. })),
        "the request behind the rate limit should time out: {held:?}"
    );
    // Queued after the abandoned one: once its reply is here, everything queued
    // before it has gone out (or was withdrawn).
    let later = pool
        .request(
            br#"{"marker":"later"}"#,
            RequestOptions {
                timeout: Some(Duration::from_secs(30)),
                idempotent: false,
            },
        )
        .expect("the later request is answered");
    assert!(String::from_utf8_lossy(&later).contains("later"));
    let sent_anyway: Vec<String> = venue
        .frames()
        .into_iter()
        .filter(|frame| frame.contains("given-up"))
        .collect();
    assert!(
        sent_anyway.is_empty(),
        "a request whose caller was told it timed out still reached the venue: {sent_anyway:?}"
    );
}

/// The same guarantee for a submitted request its caller drops before it finished
/// (`Pool::submit`, then letting go of the `PendingRequest` instead of waiting): it is
/// withdrawn, and the frame the rate limit held is never written.
#[test]
fn a_dropped_request_held_by_the_rate_limit_is_never_sent() {
    let _guard = watchdog("rate_limited_drop", Duration::from_secs(90));
    let venue = RecordingVenue::start();
    let pool = pool_with(
        &venue.url(),
        serde_json::json!({
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    );
    // One frame a second: the first subscribe goes at once, the others wait their turn.
    for channel in ["a", "b", "c", "d"] {
        pool.subscribe(channel).expect("subscribe");
    }
    venue.wait_for_frame("the first subscribe", |frame| frame.contains("subscribe"));
    let mut held = pool
        .submit(
            br#"{"marker":"dropped"}"#,
            RequestOptions {
                timeout: Some(Duration::from_secs(30)),
                idempotent: false,
            },
        )
        .expect("submit");
    assert!(
        held.wait(Duration::ZERO).is_none(),
        "the rate limit should still hold the request back"
    );
    assert_eq!(pool.stats().pending_requests, 1);
    drop(held);
    assert_eq!(
        pool.stats().pending_requests,
        0,
        "the dropped request is still in the table"
    );
    // Queued after the dropped one: once its reply is here, everything queued before
    // it has gone out (or was withdrawn).
    let later = pool
        .request(
            br#"{"marker":"later"}"#,
            RequestOptions {
                timeout: Some(Duration::from_secs(30)),
                idempotent: false,
            },
        )
        .expect("the later request is answered");
    assert!(String::from_utf8_lossy(&later).contains("later"));
    let sent_anyway: Vec<String> = venue
        .frames()
        .into_iter()
        .filter(|frame| frame.contains("dropped"))
        .collect();
    assert!(
        sent_anyway.is_empty(),
        "a request its caller dropped still reached the venue: {sent_anyway:?}"
    );
    assert_eq!(
        pool.stats().requests_timed_out,
        0,
        "a request dropped before its deadline is withdrawn, not timed out"
    );
}

#[test]
fn a_request_still_held_by_the_rate_limit_when_its_connection_dies_is_sent_again() {
    let _guard = watchdog("rate_limited_unsent_on_death", Duration::from_secs(90));
    let venue = RecordingVenue::start();
    let pool = Arc::new(pool_with(
        &venue.url(),
        serde_json::json!({
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    ));
    for channel in ["a", "b", "c"] {
        pool.subscribe(channel).expect("subscribe");
    }
    venue.wait_for_frame("the first subscribe", |frame| frame.contains("subscribe"));
    let caller = request_in_background(
        &pool,
        br#"{"marker":"never-written"}"#,
        Duration::from_secs(30),
        false,
    );
    // Handed to the worker, which holds it behind the queued subscribes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().pending_requests == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the pool"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !venue
            .frames()
            .iter()
            .any(|frame| frame.contains("never-written")),
        "the rate limit should still hold the request back"
    );
    venue.drop_connections.store(true, Ordering::Relaxed);
    let reply = caller.join().expect("caller thread");
    let reply = reply.expect(
        "a request that was never written is not lost with its connection: it goes out on the next",
    );
    assert!(String::from_utf8_lossy(&reply).contains("never-written"));
    let sent = venue
        .frames()
        .iter()
        .filter(|frame| frame.contains("never-written"))
        .count();
    assert_eq!(sent, 1, "sent exactly once");
}

#[test]
fn heartbeats_do_not_pile_up_behind_a_slow_rate_limit() {
    let _guard = watchdog("heartbeats_vs_rate_limit", Duration::from_secs(90));
    let sim = simulator(20.0);
    // Ten application heartbeats a second against one outbound frame a second.
    let pool = pool_with(
        &sim.url(),
        serde_json::json!({
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 100, "pong_timeout_ms": 5000},
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool.stats().messages_sent < 3 {
        assert!(Instant::now() < deadline, "no heartbeat went out");
        std::thread::sleep(Duration::from_millis(20));
    }
    pool.subscribe("ticker.0").expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            Instant::now() < deadline,
            "the subscribe is stuck behind queued heartbeats (sent so far: {})",
            pool.stats().messages_sent
        );
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            if &*message.channel == "ticker.0" {
                break;
            }
        }
    }
}

/// A codec whose decode gives one DATA record on channel "d" per frame (payload = the
/// frame); for a frame starting with `X` it then emits a SEND_TEXT record that is not
/// UTF-8, which ends the session.
const BAD_SEND_AFTER_DATA_WAT: &str = r#"
(module
  (memory (export "memory") 2)
  (global $input i32 (i32.const 0x10000))
  (global $output (mut i32) (i32.const 0x10000))
  (global $output_len (mut i32) (i32.const 0))
  (func (export "wirepool_abi_version") (result i32) (i32.const 1))
  (func (export "wirepool_buffer") (param $size i32) (result i32)
    (local $pages i32)
    (if (i32.gt_u (local.get $size) (i32.const 0x800000))
      (then (return (i32.const 0))))
    (global.set $output
      (i32.add (global.get $input)
        (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.set $pages
      (i32.shr_u
        (i32.add
          (i32.add (global.get $output)
            (i32.add (i32.mul (local.get $size) (i32.const 8)) (i32.const 64)))
          (i32.const 0xffff))
        (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (return (i32.const 0))))))
    (global.get $input))
  (func $header (param $at i32) (param $kind i32) (param $channel_len i32)
                (param $payload_len i32) (param $id i64)
    (i32.store (local.get $at) (local.get $kind))
    (i32.store offset=4 (local.get $at) (local.get $channel_len))
    (i32.store offset=8 (local.get $at) (local.get $payload_len))
    (i32.store offset=12 (local.get $at) (i32.const 0))
    (i64.store offset=16 (local.get $at) (local.get $id)))
  (func (export "wirepool_init") (param $config_len i32) (param $token_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))
  (func (export "wirepool_open") (result i32)
    (call $header (global.get $output) (i32.const 3) (i32.const 0) (i32.const 0) (i64.const 0))
    (global.set $output_len (i32.const 24))
    (i32.const 0))
  (func (export "wirepool_decode") (param $count i32) (param $total_len i32) (result i32)
    (local $in i32)
    (local $out i32)
    (local $len i32)
    (local $index i32)
    (local.set $in (global.get $input))
    (local.set $out (global.get $output))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $index) (local.get $count)))
        (local.set $len (i32.load (local.get $in)))
        (call $header (local.get $out) (i32.const 4) (i32.const 1) (local.get $len) (i64.const 0))
        (i32.store8 offset=24 (local.get $out) (i32.const 0x64))
        (memory.copy
          (i32.add (local.get $out) (i32.const 25))
          (i32.add (local.get $in) (i32.const 8))
          (local.get $len))
        (local.set $out (i32.add (local.get $out) (i32.add (i32.const 25) (local.get $len))))
        (if (i32.and
              (i32.gt_u (local.get $len) (i32.const 0))
              (i32.eq (i32.load8_u offset=8 (local.get $in)) (i32.const 0x58)))
          (then
            (call $header (local.get $out) (i32.const 1) (i32.const 0) (i32.const 1) (i64.const 0))
            (i32.store8 offset=24 (local.get $out) (i32.const 0xff))
            (local.set $out (i32.add (local.get $out) (i32.const 25)))))
        (local.set $in (i32.add (local.get $in) (i32.add (i32.const 8) (local.get $len))))
        (local.set $index (i32.add (local.get $index) (i32.const 1)))
        (br $next)))
    (global.set $output_len (i32.sub (local.get $out) (global.get $output)))
    (i32.const 0))
  (func (export "wirepool_encode") (param $op i32) (param $id i64) (param $channel_len i32)
                                   (param $payload_len i32) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))
  (func (export "wirepool_tick") (param $now_ms i64) (result i32)
    (global.set $output_len (i32.const 0))
    (i32.const 0))
  (func (export "wirepool_output") (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (global.get $output)) (i64.const 32))
      (i64.extend_i32_u (global.get $output_len)))))
"#;

#[test]
fn data_decoded_before_a_fatal_codec_record_is_delivered() {
    let _guard = watchdog("data_before_fatal_record", Duration::from_secs(60));
    let server = ScriptServer::start();
    let wasm = wat::parse_str(BAD_SEND_AFTER_DATA_WAT).expect("test codec compiles");
    let dir = std::env::temp_dir().join(format!("wirepool-review-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad_send_after_data.wasm");
    std::fs::write(&path, wasm).expect("write wasm");
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": server.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "codec": {"path": path},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 100},
        })
        .to_string(),
    )
    .expect("valid config");
    let pool = Pool::new(config).expect("pool opens");
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    server.poison_one();
    let events = wait_for_event(&pool, Duration::from_secs(20), "codec_failed", |event| {
        event.kind == "codec_failed"
    });
    let reason = last_message(&events);
    assert!(reason.contains("UTF-8"), "unexpected failure: {reason}");
    // Everything the worker accepted is queued by now; the replacement's ticks follow.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "the data record decoded before the fatal one was never delivered"
        );
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            if message.payload.starts_with(b"X") {
                break;
            }
        }
    }
}

/// A server that floods pings and never reads what we send (and sends a pong now and
/// then, so the pong timeout never fires): the pongs we owe it wait in a write buffer
/// of bounded size (they used to pile up without limit, gigabytes within a minute),
/// and once it is full the session ends saying the server is not reading.
#[test]
fn a_server_that_floods_pings_and_never_reads_is_dropped_with_memory_bounded() {
    let _guard = watchdog("ping flood", Duration::from_secs(90));
    let acceptor = Acceptor::start(|stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let tcp = ws.get_mut();
        let _ = tcp.set_write_timeout(Some(Duration::from_millis(200)));
        let mut ping = vec![0x89u8, 125];
        ping.extend_from_slice(&[b'p'; 125]);
        let pings: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 64).collect();
        let unsolicited_pong = [0x8Au8, 0];
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            use std::io::Write;
            match tcp
                .write_all(&pings)
                .and_then(|()| tcp.write_all(&unsolicited_pong))
            {
                Ok(()) => {}
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    });
    let config = serde_json::json!({
        "servers": [{"url": acceptor.url()}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "heartbeat": {"ping_interval_ms": 100, "pong_timeout_ms": 60_000},
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
    });
    let pool = pool_from(config, serde_json::json!({}));
    let seen = wait_for_event(
        &pool,
        Duration::from_secs(60),
        "the flooding session's end",
        |e| e.kind == "closed",
    );
    let text = last_message(&seen);
    assert!(
        text.contains("not reading"),
        "the session ended with {text:?}"
    );
    pool.close();
}

/// A message too big for the codec's memory fails the connection with an error that
/// says how big the batch was and which limit bounds it.
#[test]
fn a_message_too_big_for_the_codec_says_its_size_and_the_limit() {
    let _guard = watchdog("too big for the codec", Duration::from_secs(60));
    let acceptor = Acceptor::start(|stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let payload = "a".repeat(4 << 20);
        let frame = format!(r#"{{"type":"data","channel":"big","payload":"{payload}"}}"#);
        if ws.send(WsMessage::text(frame)).is_err() {
            return;
        }
        crate::support::read_until_stopped(&mut ws, stop);
    });
    let config = serde_json::json!({
        "servers": [{"url": acceptor.url()}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "codec": {"max_memory_mb": 8},
        "reconnect": {"initial_delay_ms": 200, "max_delay_ms": 1000},
    });
    let pool = pool_from(config, serde_json::json!({}));
    let seen = wait_for_event(&pool, Duration::from_secs(30), "the codec's failure", |e| {
        e.kind == "codec_failed" || e.kind == "closed"
    });
    let text = last_message(&seen);
    assert!(text.contains("memory"), "{text}");
    assert!(text.contains("decoding 1 frame(s), 4194"), "{text}");
    assert!(text.contains("codec.max_memory_mb"), "{text}");
    pool.close();
}
