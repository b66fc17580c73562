//! The engine end to end against the feed simulator on loopback: subscriptions,
//! requests, unsubscribe, reconnect and re-subscribe, shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{
    pool_from, request_in_background, simulator, thread_cpu, wait_for_event, wait_until, watchdog,
    Acceptor,
};
use wirepool::{Config, Error, Message, Pool, RequestOptions, TimeoutPhase};

fn pool_for(url: &str, connections: u32, extra: serde_json::Value) -> Pool {
    let config = serde_json::json!({
        "servers": [{"url": url}],
        "pool": {"min_connections": connections, "max_connections": connections},
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
    });
    let pool = pool_from(config, extra);
    pool.wait_ready(Duration::from_secs(10))
        .expect("pool ready");
    pool
}

fn seq_of(message: &Message) -> u64 {
    let value: serde_json::Value =
        serde_json::from_slice(&message.payload).expect("payload is the frame's JSON payload");
    value["seq"].as_u64().expect("payload has seq")
}

/// Receives until `count` messages arrived on `channel`, failing after `timeout`.
fn receive_on(pool: &Pool, channel: &str, count: usize, timeout: Duration) -> Vec<Message> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} messages on {channel} within {timeout:?}",
            got.len()
        );
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            if &*message.channel == channel {
                got.push(message);
            }
        }
    }
    got
}

#[test]
fn subscribes_and_receives_in_order() {
    let _guard = watchdog("subscribes_and_receives_in_order", Duration::from_secs(60));
    let sim = simulator(500.0);
    let pool = pool_for(&sim.url(), 2, serde_json::json!({}));
    pool.subscribe("ticker.0").expect("subscribe");
    pool.subscribe("ticker.1").expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    while counts.values().filter(|count| **count >= 200).count() < 2 {
        assert!(Instant::now() < deadline, "not enough data: {counts:?}");
        let mut batch = Vec::new();
        pool.recv_batch(&mut batch, 256, Some(Duration::from_millis(200)))
            .expect("open");
        for message in batch {
            assert_eq!(message.kind, wirepool::MessageKind::Data);
            let seq = seq_of(&message);
            let channel = message.channel.to_string();
            if let Some(previous) = last.insert(channel.clone(), seq) {
                assert_eq!(seq, previous + 1, "{channel}: message out of order or lost");
            }
            *counts.entry(channel).or_default() += 1;
        }
    }
    let stats = pool.stats();
    assert_eq!(stats.subscriptions, 2);
    assert_eq!(stats.subscriptions_active, 2);
    assert!(stats.messages_received >= 400);
    assert_eq!(stats.ready_connections, 2);
    // The two channels were spread over the two connections.
    let connections = pool.connections();
    assert!(
        connections
            .iter()
            .all(|connection| connection.subscriptions.len() == 1),
        "each connection should carry one channel: {connections:?}"
    );
}

#[test]
fn request_gets_its_reply_and_errors_carry_the_payload() {
    let _guard = watchdog("request", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = pool_for(&sim.url(), 2, serde_json::json!({}));
    let reply = pool
        .request(br#"{"hello":[1,2,3]}"#, RequestOptions::default())
        .expect("echo reply");
    let reply: serde_json::Value = serde_json::from_slice(&reply).expect("JSON reply");
    assert_eq!(reply, serde_json::json!({"echo": {"hello": [1, 2, 3]}}));

    let history = pool
        .request(
            br#"{"op":"history","channel":"ticker.0","bars":5}"#,
            RequestOptions {
                idempotent: true,
                ..RequestOptions::default()
            },
        )
        .expect("history reply");
    let history: serde_json::Value = serde_json::from_slice(&history).expect("JSON");
    assert_eq!(history["bars"].as_array().map(Vec::len), Some(5));

    match pool.request(br#"{"op":"fail"}"#, RequestOptions::default()) {
        Err(Error::Remote { payload }) => {
            let text = String::from_utf8_lossy(&payload);
            assert!(text.contains("requested failure"), "{text}");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    match pool.request(b"not json", RequestOptions::default()) {
        Err(Error::InvalidArgument(text)) => {
            assert!(text.contains("nothing was sent"), "{text}");
            assert!(text.contains("not valid JSON"), "{text}");
        }
        other => panic!("expected the codec to refuse a non-JSON body, got {other:?}"),
    }
    // Many concurrent requests each get their own reply.
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let pool = &pool;
            scope.spawn(move || {
                for index in 0..25 {
                    let body = format!(r#"{{"thread":{thread},"index":{index}}}"#);
                    let reply = pool
                        .request(body.as_bytes(), RequestOptions::default())
                        .expect("reply");
                    let reply: serde_json::Value = serde_json::from_slice(&reply).expect("JSON");
                    assert_eq!(reply["echo"]["thread"], thread);
                    assert_eq!(reply["echo"]["index"], index);
                }
            });
        }
    });
    assert_eq!(pool.stats().pending_requests, 0);
}

#[test]
fn request_without_reply_times_out_with_a_clear_error() {
    let _guard = watchdog("request timeout", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = pool_for(&sim.url(), 1, serde_json::json!({}));
    let started = Instant::now();
    let result = pool.request(
        br#"{"op":"ignore"}"#,
        RequestOptions {
            timeout: Some(Duration::from_millis(300)),
            ..RequestOptions::default()
        },
    );
    match result {
        Err(Error::Timeout {
            phase,
            after,
            detail,
        }) => {
            assert_eq!(phase, TimeoutPhase::Request);
            assert_eq!(after, Duration::from_millis(300));
            assert!(detail.contains("no reply on connection"), "{detail}");
        }
        other => panic!("expected a request timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout was not honoured"
    );
    assert_eq!(
        pool.stats().pending_requests,
        0,
        "timed-out request left behind"
    );
    assert_eq!(pool.stats().requests_timed_out, 1);
    // The connection still works afterwards.
    pool.request(br#"{"after":"timeout"}"#, RequestOptions::default())
        .expect("later request works");
}

#[test]
fn request_waits_for_a_ready_connection_then_times_out_when_none_comes() {
    let _guard = watchdog("request no connection", Duration::from_secs(60));
    // A port that refuses connections: nothing ever becomes ready.
    let (_refusing, url) = crate::support::refusing_url();
    let config =
        Config::from_json(&format!(r#"{{"servers":[{{"url":"{url}"}}]}}"#)).expect("config");
    let pool = Pool::new(config).expect("pool");
    let result = pool.request(
        b"{}",
        RequestOptions {
            timeout: Some(Duration::from_millis(300)),
            ..RequestOptions::default()
        },
    );
    match result {
        Err(Error::Timeout { detail, .. }) => {
            assert!(detail.contains("no connection was ready"), "{detail}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let events = wait_for_event(&pool, Duration::from_secs(10), "reconnecting", |event| {
        event.kind == "reconnecting"
    });
    assert!(events.iter().any(|event| event.kind == "closed"));
}

#[test]
fn unsubscribe_stops_the_channel() {
    let _guard = watchdog("unsubscribe", Duration::from_secs(60));
    let sim = simulator(200.0);
    let pool = pool_for(&sim.url(), 1, serde_json::json!({}));
    pool.subscribe("ticker.2").expect("subscribe");
    receive_on(&pool, "ticker.2", 20, Duration::from_secs(10));
    pool.unsubscribe("ticker.2").expect("unsubscribe");
    wait_for_event(&pool, Duration::from_secs(10), "unsubscribed", |event| {
        event.kind == "unsubscribed" && event.channel.as_deref() == Some("ticker.2")
    });
    // Drain what was in flight, then nothing more arrives for a while.
    while pool
        .recv(Some(Duration::from_millis(300)))
        .expect("open")
        .is_some()
    {}
    assert!(
        pool.recv(Some(Duration::from_millis(500)))
            .expect("open")
            .is_none(),
        "data kept arriving after unsubscribe"
    );
    assert_eq!(pool.stats().subscriptions, 0);
}

#[test]
fn reconnects_and_resubscribes_after_the_server_drops_connections() {
    let _guard = watchdog("reconnect", Duration::from_secs(60));
    let sim = simulator(200.0);
    let pool = pool_for(&sim.url(), 2, serde_json::json!({}));
    for channel in ["ticker.0", "ticker.1", "ticker.2"] {
        pool.subscribe(channel).expect("subscribe");
    }
    receive_on(&pool, "ticker.0", 10, Duration::from_secs(10));
    let before: Vec<u64> = pool.connections().iter().map(|c| c.id).collect();

    sim.drop_connections();
    wait_for_event(&pool, Duration::from_secs(10), "closed", |event| {
        event.kind == "closed"
    });
    wait_until(
        &pool,
        Duration::from_secs(15),
        "two fresh ready connections",
        || {
            let connections = pool.connections();
            connections.len() == 2
                && connections
                    .iter()
                    .all(|connection| connection.ready && !before.contains(&connection.id))
        },
    );
    // Every channel flows again, from the new connections, without the user asking.
    for channel in ["ticker.0", "ticker.1", "ticker.2"] {
        let messages = receive_on(&pool, channel, 5, Duration::from_secs(10));
        assert!(
            messages
                .iter()
                .all(|message| !before.contains(&message.connection_id))
                || messages.len() == 5,
        );
        let fresh = receive_on(&pool, channel, 1, Duration::from_secs(10));
        assert!(
            !before.contains(&fresh[0].connection_id),
            "{channel} not re-subscribed"
        );
    }
    let stats = pool.stats();
    assert!(
        stats.reconnects >= 2,
        "reconnects counted: {}",
        stats.reconnects
    );
    assert_eq!(stats.subscriptions_active, 3);
}

#[test]
fn close_sends_close_frames_and_fails_waiting_requests() {
    let _guard = watchdog("close", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = std::sync::Arc::new(pool_for(&sim.url(), 2, serde_json::json!({})));
    let waiter =
        request_in_background(&pool, br#"{"op":"ignore"}"#, Duration::from_secs(30), false);
    wait_until(&pool, Duration::from_secs(10), "request in flight", || {
        pool.stats().pending_requests == 1
    });
    let started = Instant::now();
    pool.close();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        started.elapsed()
    );
    assert_eq!(waiter.join().expect("no panic"), Err(Error::Closed));
    assert_eq!(pool.subscribe("x"), Err(Error::Closed));
    assert_eq!(
        pool.recv(Some(Duration::from_millis(10))).map(|_| ()),
        Err(Error::Closed)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.stats().connections_open > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        sim.stats().connections_open,
        0,
        "the server still sees open connections"
    );
}

#[test]
fn frames_read_just_before_a_connection_reset_are_still_delivered() {
    let _guard = watchdog("frames before reset", Duration::from_secs(60));
    const FRAMES: usize = 300;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let (go, start) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut ws = tungstenite::accept(tcp).expect("handshake");
        start.recv().expect("go");
        // Every frame in one write, then a reset: the client's kernel holds the data and
        // then the RST, so its worker reads the frames and meets the error in one go.
        for index in 0..FRAMES {
            ws.write(tungstenite::Message::text(format!("frame {index}")))
                .expect("queue a frame");
        }
        ws.flush().expect("write the frames");
        socket2::SockRef::from(ws.get_ref())
            .set_linger(Some(Duration::ZERO))
            .expect("linger 0");
        drop(ws);
    });
    let pool = pool_for(&url, 1, serde_json::json!({"codec": {"builtin": "raw"}}));
    go.send(()).expect("server waits");
    server.join().expect("server");
    let mut payloads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while payloads.len() < FRAMES && Instant::now() < deadline {
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            payloads.push(String::from_utf8(message.payload).expect("text"));
        }
    }
    let expected: Vec<String> = (0..FRAMES).map(|index| format!("frame {index}")).collect();
    assert_eq!(
        payloads.len(),
        FRAMES,
        "frames lost to the reset; first missing: {:?}",
        expected.iter().find(|frame| !payloads.contains(frame))
    );
    assert_eq!(payloads, expected);
}

/// A server that never reads (so never sees the client's close) and writes `frame`
/// as fast as it can until the client goes away.
fn flooding_server(frame: tungstenite::Message) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        let mut ws = tungstenite::accept(tcp).expect("handshake");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            // Many frames per flush keep the client's socket buffer full.
            for _ in 0..1000 {
                if ws.write(frame.clone()).is_err() {
                    return;
                }
            }
            if ws.flush().is_err() {
                return;
            }
        }
    });
    (url, server)
}

#[test]
fn close_finishes_even_when_the_server_ignores_it_and_keeps_sending() {
    let _guard = watchdog("close against a flooding server", Duration::from_secs(60));
    for frame in [
        tungstenite::Message::text("x".repeat(64)),
        tungstenite::Message::Ping(vec![1, 2, 3].into()),
    ] {
        let data = frame.is_text();
        let what = if data { "data frames" } else { "pings" };
        let (url, server) = flooding_server(frame);
        let pool = pool_for(&url, 1, serde_json::json!({"codec": {"builtin": "raw"}}));
        if data {
            // The feed is flowing.
            assert!(pool
                .recv(Some(Duration::from_secs(10)))
                .expect("open")
                .is_some());
        }
        let started = Instant::now();
        pool.close();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "close took {took:?} against a server that ignores the close handshake and sends {what}"
        );
        server.join().expect("server");
    }
}

/// Busy polling (worker and consumer spinning up to a second, the most allowed): data
/// arrives complete and in order, and commands made while the worker spins on a quiet
/// socket are run at once, not when the spin ends: each request below must be answered
/// within a timeout shorter than the spin.
#[test]
fn busy_polling_delivers_in_order_and_runs_commands_while_it_spins() {
    let _guard = watchdog("busy_polling", Duration::from_secs(90));
    let sim = simulator(2_000.0);
    let pool = pool_for(
        &sim.url(),
        1,
        serde_json::json!({"busy_poll": {"worker_us": 1_000_000, "consumer_us": 1_000_000}}),
    );
    pool.subscribe("ticker.2").expect("subscribe");
    let got = receive_on(&pool, "ticker.2", 1_000, Duration::from_secs(30));
    for pair in got.windows(2) {
        assert_eq!(
            seq_of(&pair[1]),
            seq_of(&pair[0]) + 1,
            "lost or out of order"
        );
    }
    pool.unsubscribe("ticker.2").expect("unsubscribe");
    wait_until(&pool, Duration::from_secs(10), "unsubscribed", || {
        pool.stats().subscriptions_active == 0
    });
    // The socket is quiet now: the worker spins for a second after each reply.
    for index in 0..10 {
        let body = format!(r#"{{"index":{index}}}"#);
        let reply = pool
            .request(
                body.as_bytes(),
                RequestOptions {
                    timeout: Some(Duration::from_millis(400)),
                    idempotent: false,
                },
            )
            .unwrap_or_else(|err| panic!("request {index} while the worker spins: {err}"));
        let reply: serde_json::Value = serde_json::from_slice(&reply).expect("JSON");
        assert_eq!(reply["echo"]["index"], index);
    }
    // A receive keeps to its own timeout, however long the consumer may spin.
    while pool.recv(Some(Duration::ZERO)).expect("open").is_some() {}
    let started = Instant::now();
    assert!(pool
        .recv(Some(Duration::from_millis(50)))
        .expect("open")
        .is_none());
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(800),
        "spun past its timeout: {waited:?}"
    );
    pool.close();
}

/// A busy-polling worker spins while its feed is live (gaps shorter than the spin) and
/// sleeps once its connection has been quiet for longer than the spin: an idle
/// connection does not burn a CPU on every timer wake-up.
#[test]
fn a_busy_polling_worker_spins_on_a_live_feed_and_sleeps_once_it_goes_quiet() {
    let _guard = watchdog("busy_polling_idle", Duration::from_secs(90));
    let sim = simulator(500.0);
    let pool = pool_for(
        &sim.url(),
        1,
        serde_json::json!({"busy_poll": {"worker_us": 300_000}}),
    );
    let tid = pool.connections()[0].thread_id;
    assert!(tid > 0, "the worker's thread id is shown");
    pool.subscribe("ticker.0").expect("subscribe");
    receive_on(&pool, "ticker.0", 50, Duration::from_secs(10));
    // Live: 2 ms between frames, well inside the 300 ms spin.
    let window = Duration::from_millis(1500);
    let before = thread_cpu(tid);
    receive_on(&pool, "ticker.0", 1_000, Duration::from_secs(20));
    let live = thread_cpu(tid) - before;
    // A sleeping worker needs about 1 % of a CPU for this feed (20 ms in these 2 s);
    // a spinning one takes whatever share of a core it is given.
    assert!(
        live >= Duration::from_millis(100),
        "did not spin on a live feed: {live:?} in about 2 s"
    );
    pool.unsubscribe("ticker.0").expect("unsubscribe");
    wait_until(&pool, Duration::from_secs(10), "unsubscribed", || {
        pool.stats().subscriptions_active == 0
    });
    std::thread::sleep(Duration::from_millis(600));
    let before = thread_cpu(tid);
    std::thread::sleep(window);
    let quiet = thread_cpu(tid) - before;
    assert!(
        quiet < Duration::from_millis(100),
        "spun on a quiet connection: {quiet:?} in {window:?}"
    );
    pool.close();
}

/// Two closes at once: neither returns before every connection's thread was joined
/// (the second used to return at once while the first was still joining).
#[test]
fn a_close_made_while_another_is_under_way_returns_only_once_all_is_joined() {
    let _guard = watchdog("concurrent close", Duration::from_secs(60));
    let sim = simulator(100.0);
    let pool = pool_for(&sim.url(), 8, serde_json::json!({}));
    assert_eq!(pool.connections().len(), 8);
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                barrier.wait();
                pool.close();
                let left = pool.connections();
                assert!(
                    left.is_empty(),
                    "close returned with connections left: {left:?}"
                );
            });
        }
    });
}

/// A JSON document of exactly `len` bytes (`{"x":"aaa…"}`).
fn json_body(len: usize) -> Vec<u8> {
    let mut body = br#"{"x":""#.to_vec();
    body.resize(len - 2, b'a');
    body.extend_from_slice(br#""}"#);
    assert_eq!(body.len(), len);
    body
}

/// Bodies and channel names too big for the codec are refused before anything is
/// sent (an 8 MB body used to kill its connection, and with `idempotent` the next
/// one too; a huge channel name, re-sent after every reconnect, killed them all).
#[test]
fn requests_and_channels_too_big_for_the_codec_are_refused_up_front() {
    let _guard = watchdog("too big", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = pool_for(
        &sim.url(),
        1,
        serde_json::json!({"codec": {"max_memory_mb": 16}}),
    );
    // 1/16 of 16 MiB: 1 MiB.
    let body = json_body((1 << 20) + 1);
    match pool.request(&body, RequestOptions::default()) {
        Err(Error::InvalidArgument(text)) => {
            assert!(text.contains("1048577 bytes"), "{text}");
            assert!(text.contains("nothing was sent"), "{text}");
        }
        other => panic!("an oversized body must be refused, got {other:?}"),
    }
    let results = pool.request_batch(
        &[body.as_slice(), br#"{"ok":1}"#.as_slice()],
        wirepool::BatchOptions::default(),
        |_, _| {},
    );
    assert!(
        matches!(results[0], Err(Error::InvalidArgument(_))),
        "{:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let channel = "c".repeat(64 * 1024 + 1);
    for outcome in [pool.subscribe(&channel), pool.unsubscribe(&channel)] {
        match outcome {
            Err(Error::InvalidArgument(text)) => assert!(text.contains("channel name"), "{text}"),
            other => panic!("an oversized channel name must be refused, got {other:?}"),
        }
    }
    // A body just under the limit goes through, on the connection it started with.
    let fits = json_body(1 << 20);
    let reply = pool
        .request(&fits, RequestOptions::default())
        .expect("a body at the limit is answered");
    assert!(reply.len() > fits.len());
    assert_eq!(pool.stats().reconnects, 0, "no connection was lost");
}

/// A burst of requests as big as allowed, on one connection, to a server that reads
/// them all: the frames the socket cannot take yet wait in the worker, not in the
/// bounded write buffer, so none of them ends the session (6 of 8 used to fail with
/// "the server is not reading").
#[test]
fn a_burst_of_requests_as_big_as_allowed_goes_through_one_healthy_connection() {
    let _guard = watchdog("big burst", Duration::from_secs(120));
    let sim = simulator(10.0);
    let pool = pool_for(&sim.url(), 1, serde_json::json!({}));
    // 1/16 of the default 64 MiB, less room for the JSON around the string.
    let body = json_body((4 << 20) - 62);
    let bodies = vec![body.as_slice(); 8];
    let results = pool.request_batch(
        &bodies,
        wirepool::BatchOptions {
            timeout: Some(Duration::from_secs(60)),
            ..wirepool::BatchOptions::default()
        },
        |_, _| {},
    );
    for (index, result) in results.iter().enumerate() {
        let reply = result
            .as_ref()
            .unwrap_or_else(|err| panic!("request {index}: {err}"));
        assert!(reply.len() > body.len(), "request {index}: a short reply");
    }
    assert_eq!(pool.stats().reconnects, 0, "no connection was lost");
}

/// A venue that writes one burst of `data` frames of very different sizes (a few
/// bytes up to more than one decode batch holds) the moment the client connects,
/// then waits: the worker reads them in batches laid out in the codec's own buffer,
/// which starts small and grows, so frames that do not fit one batch start the next.
/// Every frame arrives once, whole and in order.
#[test]
fn a_burst_of_frames_of_every_size_arrives_whole_and_in_order() {
    let _guard = watchdog("burst of sizes", Duration::from_secs(120));
    // Pad lengths: mostly small, with frames of 40 KB, 120 KB and 300 KB among them
    // (a decode batch holds 256 KiB).
    let pads: Vec<usize> = (0..3000usize)
        .map(|i| match i % 250 {
            17 => 40_000,
            101 => 120_000,
            199 => 300_000,
            _ => (i * 37) % 700,
        })
        .collect();
    let frames: Arc<Vec<String>> = Arc::new(
        pads.iter()
            .enumerate()
            .map(|(i, pad)| {
                format!(
                    r#"{{"type":"data","channel":"burst","seq":{},"payload":{{"i":{i},"pad":"{}"}}}}"#,
                    i + 1,
                    "p".repeat(*pad)
                )
            })
            .collect(),
    );
    let acceptor = {
        let frames = Arc::clone(&frames);
        Acceptor::start(move |stream, stop| {
            let Ok(mut ws) = tungstenite::accept(stream) else {
                return;
            };
            for frame in frames.iter() {
                if ws
                    .write(tungstenite::Message::text(frame.as_str()))
                    .is_err()
                {
                    return;
                }
            }
            if ws.flush().is_err() {
                return;
            }
            crate::support::read_until_stopped(&mut ws, stop);
        })
    };
    let pool = pool_for(&acceptor.url(), 1, serde_json::json!({}));
    let got = receive_on(&pool, "burst", pads.len(), Duration::from_secs(60));
    for (i, message) in got.iter().enumerate() {
        let payload: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("payload is JSON");
        assert_eq!(payload["i"], i, "message {i} out of order");
        let pad = payload["pad"].as_str().expect("pad");
        assert_eq!(pad.len(), pads[i], "message {i} cut or mixed up");
    }
    let stats = pool.stats();
    assert_eq!(stats.sequence_gaps, 0);
    assert_eq!(stats.malformed_frames, 0);
    assert_eq!(stats.reconnects, 0);
}

/// A URL's scheme is case-insensitive: `WS://` connects (tungstenite itself wants
/// `ws://`, so the pool hands it the URL with its scheme in lower case).
#[test]
fn an_upper_case_scheme_connects() {
    let _guard = watchdog("upper-case scheme", Duration::from_secs(60));
    let sim = simulator(50.0);
    let url = sim.url().replacen("ws://", "WS://", 1);
    assert!(url.starts_with("WS://"), "{url}");
    let pool = pool_for(&url, 1, serde_json::json!({}));
    pool.subscribe("ticker.0").expect("subscribe");
    receive_on(&pool, "ticker.0", 3, Duration::from_secs(10));
}

/// The CPUs the calling thread may run on, from `/proc/<task>/status`.
fn cpus_allowed(task: &str) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{task}/status"))
        .unwrap_or_else(|err| panic!("/proc/{task}/status: {err}"));
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (start, end) = part.split_once('-').unwrap_or((part, part));
        let (start, end): (u64, u64) = (start.parse().expect("cpu"), end.parse().expect("cpu"));
        cpus.extend(start..=end);
    }
    cpus
}

/// `affinity.worker_cpus`: each worker runs only on the CPU it was given, the list's
/// CPUs shared out evenly (the least held first), each shown as `cpu` in the connection
/// list; a connection that takes a closed one's place gets the CPU it gave back.
#[test]
fn workers_run_only_on_the_cpus_of_affinity_worker_cpus() {
    let _guard = watchdog("worker_cpus", Duration::from_secs(60));
    // Up to two CPUs, the highest first: the list's order, not the numbers', counts.
    let cpus: Vec<u64> = cpus_allowed("thread-self")
        .into_iter()
        .rev()
        .take(2)
        .collect();
    let per_cpu = 2;
    let sim = simulator(100.0);
    let pool = pool_for(
        &sim.url(),
        (per_cpu * cpus.len()) as u32,
        serde_json::json!({"affinity": {"worker_cpus": cpus}}),
    );
    wait_until(
        &pool,
        Duration::from_secs(10),
        "every worker pinned",
        || pool.connections().iter().all(|c| c.cpu.is_some()),
    );
    let pinned = |pool: &Pool| {
        let mut held: HashMap<u64, usize> = HashMap::new();
        for connection in pool.connections() {
            let cpu = connection.cpu.expect("pinned");
            let task = format!("self/task/{}", connection.thread_id);
            assert_eq!(
                cpus_allowed(&task),
                vec![cpu],
                "connection {} runs only on its CPU",
                connection.id
            );
            *held.entry(cpu).or_default() += 1;
        }
        held
    };
    let expected: HashMap<u64, usize> = cpus.iter().map(|&cpu| (cpu, per_cpu)).collect();
    assert_eq!(pinned(&pool), expected, "shared out evenly");
    // The first worker took the list's first CPU.
    let first = pool
        .connections()
        .into_iter()
        .min_by_key(|c| c.id)
        .expect("one");
    assert_eq!(first.cpu, Some(cpus[0]));
    // Closed: the connection that takes its place gets the CPU it gave back.
    let before: Vec<u64> = pool.connections().iter().map(|c| c.id).collect();
    let gone = pool
        .connections()
        .into_iter()
        .max_by_key(|c| c.id)
        .expect("one");
    pool.close_connection(gone.id).expect("close");
    wait_until(
        &pool,
        Duration::from_secs(10),
        "a replacement, pinned",
        || {
            let now = pool.connections();
            now.len() == before.len()
                && now.iter().any(|c| !before.contains(&c.id))
                && now.iter().all(|c| c.cpu.is_some() && c.ready)
        },
    );
    assert_eq!(pinned(&pool), expected, "still shared out evenly");
    pool.close();
    // Refused before any thread starts, naming the key.
    let refused = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": sim.url()}],
            "affinity": {"worker_cpus": [4095]},
        })
        .to_string(),
    )
    .expect_err("CPU 4095 refused");
    assert!(
        refused
            .to_string()
            .contains("affinity.worker_cpus[0]: CPU 4095 is not one this process may run on"),
        "{refused}"
    );
}
