//! The C ABI as a C caller uses it, including misuse: NULL handles, bad UTF-8, bad
//! config, each giving an error code and a message, never a crash.

use std::ffi::{c_char, CStr};
use std::net::SocketAddr;
use std::ptr;
use std::time::{Duration, Instant};

use crate::support::{last_error, open_pool, watchdog};
use wirepool::ffi::*;
use wirepool::simulator::{Simulator, SimulatorConfig};

fn bytes_of(bytes: *mut wirepool_bytes) -> Vec<u8> {
    // SAFETY: `bytes` came from wirepool and is freed right here, once.
    unsafe {
        let data =
            std::slice::from_raw_parts(wirepool_bytes_data(bytes), wirepool_bytes_len(bytes))
                .to_vec();
        wirepool_bytes_free(bytes);
        data
    }
}

#[test]
fn null_arguments_get_an_error_code_and_a_message() {
    let mut pool = ptr::null_mut();
    // SAFETY: these calls are exactly the misuse under test; wirepool must check.
    unsafe {
        assert_eq!(
            wirepool_pool_new(ptr::null(), &mut pool),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("config_json is NULL"),
            "{}",
            last_error()
        );
        assert!(pool.is_null(), "out-parameter written on failure");
        let config = c"{}";
        assert_eq!(
            wirepool_pool_new(config.as_ptr(), ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            wirepool_pool_subscribe(ptr::null(), c"x".as_ptr()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"));
        assert_eq!(
            wirepool_pool_wait_ready(ptr::null(), 10),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        let mut count = 0usize;
        assert_eq!(
            wirepool_pool_poll(ptr::null(), ptr::null_mut(), 0, &mut count),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        let mut reply = ptr::null_mut();
        assert_eq!(
            wirepool_pool_request(ptr::null(), ptr::null(), 0, 0, 0, &mut reply),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert_eq!(
            wirepool_pool_close(ptr::null()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        // The _free functions and accessors accept NULL.
        wirepool_pool_free(ptr::null_mut());
        wirepool_batch_free(ptr::null_mut());
        wirepool_bytes_free(ptr::null_mut());
        assert!(wirepool_batch_messages(ptr::null()).is_null());
        assert!(wirepool_bytes_data(ptr::null()).is_null());
        assert_eq!(wirepool_bytes_len(ptr::null()), 0);
        let mut batch = ptr::null_mut();
        assert_eq!(
            wirepool_batch_new(0, &mut batch),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("capacity 0"));
    }
}

#[test]
fn invalid_utf8_and_bad_config_are_reported() {
    let mut pool = ptr::null_mut();
    let bad_utf8: [u8; 4] = [b'{', 0xff, b'}', 0];
    // SAFETY: NUL-terminated buffers and a valid out-pointer.
    unsafe {
        assert_eq!(
            wirepool_pool_new(bad_utf8.as_ptr().cast::<c_char>(), &mut pool),
            wirepool_result::WIREPOOL_ERR_INVALID_UTF8
        );
        assert!(last_error().contains("not valid UTF-8"), "{}", last_error());

        let config = cr#"{"servers":[{"url":"ws://127.0.0.1:1"}],"pool":{"min_connections":5,"max_connections":2}}"#;
        assert_eq!(
            wirepool_pool_new(config.as_ptr(), &mut pool),
            wirepool_result::WIREPOOL_ERR_CONFIG
        );
        let text = last_error();
        assert!(
            text.contains("pool.min_connections: 5 is greater than pool.max_connections (2)"),
            "{text}"
        );

        let config = cr#"{"servers":[{"url":"ws://127.0.0.1:1"}],"heartbeat":{"ping_every":5}}"#;
        assert_eq!(
            wirepool_pool_new(config.as_ptr(), &mut pool),
            wirepool_result::WIREPOOL_ERR_CONFIG
        );
        assert!(
            last_error().contains("heartbeat.ping_every"),
            "{}",
            last_error()
        );

        let config = cr#"{"servers":[{"url":"http://venue.example"}]}"#;
        assert_eq!(
            wirepool_pool_new(config.as_ptr(), &mut pool),
            wirepool_result::WIREPOOL_ERR_CONFIG
        );
        assert!(last_error().contains("servers[0].url"), "{}", last_error());
        assert!(pool.is_null());

        let text = CStr::from_ptr(wirepool_result_text(1003)).to_string_lossy();
        assert!(text.contains("configuration"), "{text}");
        let text = CStr::from_ptr(wirepool_result_text(4242)).to_string_lossy();
        assert_eq!(text, "unknown result code");
    }
}

#[test]
fn subscribe_poll_request_and_close_through_the_c_abi() {
    let _guard = watchdog("c abi", Duration::from_secs(60));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 500.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = open_pool(&sim.url());
    // SAFETY: `pool` and `batch` are live handles used from this thread only; every
    // pointer read from a batch is read before the next poll.
    unsafe {
        assert_eq!(
            wirepool_pool_wait_ready(pool, 10_000),
            wirepool_result::WIREPOOL_OK,
            "{}",
            last_error()
        );
        assert_eq!(
            wirepool_pool_subscribe(pool, c"ticker.3".as_ptr()),
            wirepool_result::WIREPOOL_OK
        );
        let bad_channel: [u8; 3] = [0xc3, 0x28, 0];
        assert_eq!(
            wirepool_pool_subscribe(pool, bad_channel.as_ptr().cast()),
            wirepool_result::WIREPOOL_ERR_INVALID_UTF8
        );
        assert_eq!(
            wirepool_pool_subscribe(pool, c"".as_ptr()),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT
        );

        let mut fd = -1;
        assert_eq!(
            wirepool_pool_fd(pool, &mut fd),
            wirepool_result::WIREPOOL_OK
        );
        assert!(fd >= 0);

        let mut batch = ptr::null_mut();
        assert_eq!(
            wirepool_batch_new(64, &mut batch),
            wirepool_result::WIREPOOL_OK
        );
        let mut received = 0usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while received < 100 {
            assert!(Instant::now() < deadline, "only {received} messages");
            let mut count = 0usize;
            let code = wirepool_pool_poll(pool, batch, 200, &mut count);
            assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
            assert!(count <= 64);
            let messages = std::slice::from_raw_parts(wirepool_batch_messages(batch), count);
            let mut data_len = 0usize;
            let data = wirepool_batch_data(batch, &mut data_len);
            let data = std::slice::from_raw_parts(data, data_len);
            // The documented layout: payloads back to back from offset 0 in message
            // order, then the channel names (one copy for this run of one channel).
            let mut payload_end = 0;
            for message in messages {
                assert_eq!(message.payload_offset, payload_end);
                payload_end += message.payload_len;
            }
            if count > 0 {
                assert!(messages.iter().all(|m| m.channel_offset == payload_end));
                assert_eq!(data_len, payload_end + b"ticker.3".len());
            }
            for message in messages {
                let channel =
                    std::slice::from_raw_parts(message.channel.cast::<u8>(), message.channel_len);
                assert_eq!(channel, b"ticker.3");
                let payload = std::slice::from_raw_parts(message.payload, message.payload_len);
                assert_eq!(
                    &data[message.payload_offset..message.payload_offset + message.payload_len],
                    payload
                );
                assert_eq!(
                    &data[message.channel_offset..message.channel_offset + message.channel_len],
                    channel
                );
                let value: serde_json::Value =
                    serde_json::from_slice(payload).expect("JSON payload");
                assert!(value["seq"].is_u64());
                assert_eq!(message.kind, WIREPOOL_MESSAGE_DATA);
                assert!(message.received_ns > 0);
                assert!(message.connection_id > 0);
            }
            received += count;
        }

        let body = br#"{"op":"history","channel":"ticker.3","bars":2}"#;
        let mut reply = ptr::null_mut();
        let code = wirepool_pool_request(
            pool,
            body.as_ptr(),
            body.len(),
            5000,
            WIREPOOL_REQUEST_IDEMPOTENT,
            &mut reply,
        );
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        let reply: serde_json::Value = serde_json::from_slice(&bytes_of(reply)).expect("JSON");
        assert_eq!(reply["bars"].as_array().map(Vec::len), Some(2));

        let body = br#"{"op":"fail"}"#;
        let mut reply = ptr::null_mut();
        let code = wirepool_pool_request(pool, body.as_ptr(), body.len(), 5000, 0, &mut reply);
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_REMOTE);
        assert!(!reply.is_null(), "the venue's error payload is returned");
        assert!(String::from_utf8_lossy(&bytes_of(reply)).contains("requested failure"));

        let body = br#"{"op":"ignore"}"#;
        let mut reply = ptr::null_mut();
        let code = wirepool_pool_request(pool, body.as_ptr(), body.len(), 200, 0, &mut reply);
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_TIMEOUT);
        assert!(
            last_error().contains("request timed out after 200 ms"),
            "{}",
            last_error()
        );
        assert!(reply.is_null());
        let code = wirepool_pool_request(pool, body.as_ptr(), body.len(), 200, 0x80, &mut reply);
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT);

        let mut json = ptr::null_mut();
        assert_eq!(
            wirepool_pool_stats_json(pool, &mut json),
            wirepool_result::WIREPOOL_OK
        );
        let stats: serde_json::Value = serde_json::from_slice(&bytes_of(json)).expect("stats JSON");
        for key in [
            "total_connections",
            "ready_connections",
            "busy_connections",
            "pending_requests",
            "min_connections",
            "max_connections",
            "initialized",
            "has_shared_data",
            "messages_received",
            "messages_sent",
            "bytes_received",
            "bytes_sent",
            "reconnects",
            "subscriptions",
        ] {
            assert!(stats.get(key).is_some(), "stats lack {key}: {stats}");
        }
        assert_eq!(stats["ready_connections"], 2);

        let mut json = ptr::null_mut();
        assert_eq!(
            wirepool_pool_events_json(pool, 0, &mut json),
            wirepool_result::WIREPOOL_OK
        );
        let events: serde_json::Value =
            serde_json::from_slice(&bytes_of(json)).expect("events JSON");
        let kinds: Vec<&str> = events
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|event| event["type"].as_str())
            .collect();
        for kind in [
            "connecting",
            "connected",
            "ready",
            "pool_ready",
            "subscribed",
        ] {
            assert!(kinds.contains(&kind), "no {kind} event in {kinds:?}");
        }

        assert_eq!(wirepool_pool_close(pool), wirepool_result::WIREPOOL_OK);
        assert_eq!(
            wirepool_pool_close(pool),
            wirepool_result::WIREPOOL_OK,
            "close is idempotent"
        );
        assert_eq!(
            wirepool_pool_subscribe(pool, c"ticker.1".as_ptr()),
            wirepool_result::WIREPOOL_ERR_CLOSED
        );
        // Drain what is left, then the poll reports the close.
        let mut count = 1usize;
        let mut code = wirepool_result::WIREPOOL_OK;
        while code == wirepool_result::WIREPOOL_OK && count > 0 {
            code = wirepool_pool_poll(pool, batch, 100, &mut count);
            if code == wirepool_result::WIREPOOL_OK {
                let mut data_len = 0usize;
                wirepool_batch_data(batch, &mut data_len);
            }
        }
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_CLOSED);
        // The failed poll took the batch's messages back with their chunks: it holds
        // nothing now, not the last poll's copy of bytes that went back to the queue.
        let mut data_len = usize::MAX;
        wirepool_batch_data(batch, &mut data_len);
        assert_eq!(data_len, 0, "a batch whose poll failed holds no bytes");
        // Events too: the shutdown's events (`pool_closed` last), then the close, at
        // once, however long the caller would wait.
        let mut kinds = Vec::new();
        let started = Instant::now();
        let code = loop {
            let mut json = ptr::null_mut();
            let code = wirepool_pool_events_json(pool, 30_000, &mut json);
            if code != wirepool_result::WIREPOOL_OK {
                break code;
            }
            let events: serde_json::Value =
                serde_json::from_slice(&bytes_of(json)).expect("events JSON");
            for event in events.as_array().expect("array") {
                kinds.push(event["type"].as_str().unwrap_or("").to_string());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "events after close kept waiting"
            );
        };
        assert_eq!(
            code,
            wirepool_result::WIREPOOL_ERR_CLOSED,
            "{}",
            last_error()
        );
        assert!(
            kinds.last().map(String::as_str) == Some("pool_closed"),
            "pool_closed is the last event: {kinds:?}"
        );
        wirepool_batch_free(batch);
        wirepool_pool_free(pool);
    }
}

#[test]
fn impossible_lengths_and_counts_are_rejected_before_anything_is_read() {
    let _guard = watchdog("impossible lengths", Duration::from_secs(60));
    // Nothing listens on port 1: the pool never gets ready, which does not matter here.
    let pool = open_pool("ws://127.0.0.1:1");
    let body = *b"{}";
    // SAFETY: the lengths are the misuse under test (no object can be that large, e.g.
    // a (size_t)-1 from a failed length computation); wirepool must reject them
    // instead of reading past `body`. Every other pointer is valid.
    unsafe {
        let mut reply = ptr::null_mut();
        assert_eq!(
            wirepool_pool_request(pool, body.as_ptr(), usize::MAX, 100, 0, &mut reply),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT,
            "{}",
            last_error()
        );
        assert!(
            last_error().contains("payload_len"),
            "the error names the argument: {}",
            last_error()
        );
        assert!(reply.is_null(), "out-parameter written on failure");

        let request = wirepool_request {
            payload: body.as_ptr(),
            payload_len: usize::MAX,
        };
        let mut replies = [ptr::null_mut(); 1];
        let mut codes = [wirepool_result::WIREPOOL_OK; 1];
        // A batch of `count` copies of `request` is refused, naming `what`.
        let mut refused = |count: usize, what: &str| {
            assert_eq!(
                wirepool_pool_request_batch(
                    pool,
                    &request,
                    count,
                    100,
                    0,
                    None,
                    ptr::null_mut(),
                    replies.as_mut_ptr(),
                    codes.as_mut_ptr(),
                ),
                wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT,
                "{}",
                last_error()
            );
            assert!(
                last_error().contains(what),
                "the error names {what}: {}",
                last_error()
            );
        };
        refused(1, "requests[0].payload");
        refused(usize::MAX / 2, "count");
        wirepool_pool_free(pool);
    }
}

/// `wirepool_pool_request_batch_detailed` says why each failed request failed (and
/// nothing for a success); with a NULL `out_errors` it is the plain batch.
#[test]
fn a_detailed_batch_says_why_each_request_failed() {
    let _guard = watchdog("detailed batch", Duration::from_secs(60));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = open_pool(&sim.url());
    let bodies: [&[u8]; 3] = [b"{}", b"not json", br#"{"op":"fail"}"#];
    let requests = bodies.map(|body| wirepool_request {
        payload: body.as_ptr(),
        payload_len: body.len(),
    });
    // SAFETY: `pool` is live; each output array has one slot per request.
    unsafe {
        assert_eq!(
            wirepool_pool_wait_ready(pool, 10_000),
            wirepool_result::WIREPOOL_OK,
            "{}",
            last_error()
        );
        let mut replies = [ptr::null_mut(); 3];
        let mut codes = [wirepool_result::WIREPOOL_OK; 3];
        let mut errors = [ptr::null_mut(); 3];
        assert_eq!(
            wirepool_pool_request_batch_detailed(
                pool,
                requests.as_ptr(),
                3,
                5_000,
                0,
                None,
                ptr::null_mut(),
                replies.as_mut_ptr(),
                codes.as_mut_ptr(),
                errors.as_mut_ptr(),
            ),
            wirepool_result::WIREPOOL_OK,
            "{}",
            last_error()
        );
        assert_eq!(
            codes,
            [
                wirepool_result::WIREPOOL_OK,
                wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT,
                wirepool_result::WIREPOOL_ERR_REMOTE
            ]
        );
        assert!(errors[0].is_null(), "no error text for a success");
        let refused = String::from_utf8(bytes_of(errors[1])).expect("UTF-8");
        assert!(
            refused.contains("not valid JSON") && refused.contains("nothing was sent"),
            "{refused}"
        );
        let remote = String::from_utf8(bytes_of(errors[2])).expect("UTF-8");
        assert!(!remote.is_empty());
        assert!(!bytes_of(replies[0]).is_empty(), "the reply");
        assert!(replies[1].is_null());
        assert!(
            String::from_utf8_lossy(&bytes_of(replies[2])).contains("requested failure"),
            "the venue's error payload"
        );

        // Without `out_errors`: the plain batch.
        let mut codes = [wirepool_result::WIREPOOL_OK; 3];
        assert_eq!(
            wirepool_pool_request_batch_detailed(
                pool,
                requests.as_ptr(),
                3,
                5_000,
                0,
                None,
                ptr::null_mut(),
                replies.as_mut_ptr(),
                codes.as_mut_ptr(),
                ptr::null_mut(),
            ),
            wirepool_result::WIREPOOL_OK
        );
        assert_eq!(codes[1], wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT);
        for reply in replies {
            if !reply.is_null() {
                wirepool_bytes_free(reply);
            }
        }
        wirepool_pool_free(pool);
    }
}

/// Connections through the C ABI: listed as `GET /api/v1/connections` has them,
/// recycled make before break, opened up to the maximum and closed; unknown ids and
/// NULL pools say what was wrong.
#[test]
fn connections_are_listed_recycled_opened_and_closed_through_the_c_abi() {
    let _guard = watchdog("c_abi_connections", Duration::from_secs(60));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 50.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = open_pool(&sim.url());
    let connections = |pool| -> Vec<serde_json::Value> {
        let mut json = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_connections_json(pool, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        let value: serde_json::Value =
            serde_json::from_slice(&bytes_of(json)).expect("connections JSON");
        value["connections"].as_array().expect("a list").clone()
    };
    let wait = |what: &str, mut condition: Box<dyn FnMut() -> bool + '_>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // SAFETY: the pool is live until freed at the end; out-pointers are valid.
    unsafe {
        assert_eq!(
            wirepool_pool_wait_ready(pool, 10_000),
            wirepool_result::WIREPOOL_OK
        );
        let listed = connections(pool);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed
            .iter()
            .all(|c| c["ready"] == true && c["id"].is_u64()));
        let old = listed[0]["id"].as_u64().expect("an id");

        let mut replacement = 0u64;
        let code = wirepool_pool_recycle_connection(pool, old, &mut replacement);
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        assert!(replacement > 0 && replacement != old);
        wait(
            "the replacement listed and the old one gone",
            Box::new(|| {
                let ids: Vec<u64> = connections(pool)
                    .iter()
                    .filter_map(|c| c["id"].as_u64())
                    .collect();
                ids.contains(&replacement) && !ids.contains(&old)
            }),
        );

        // At the maximum (2): no more; once one is closed the pool replaces it.
        let mut opened = 0u64;
        assert_eq!(
            wirepool_pool_open_connection(pool, &mut opened),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("max"), "{}", last_error());
        assert_eq!(
            wirepool_pool_close_connection(pool, replacement),
            wirepool_result::WIREPOOL_OK,
            "{}",
            last_error()
        );
        wait(
            "the closed one replaced",
            Box::new(|| {
                let listed = connections(pool);
                listed.len() == 2
                    && listed
                        .iter()
                        .all(|c| c["id"] != replacement && c["ready"] == true)
            }),
        );

        // Unknown ids and NULL pools.
        for code in [
            wirepool_pool_close_connection(pool, 999_999),
            wirepool_pool_recycle_connection(pool, 999_999, ptr::null_mut()),
        ] {
            assert_eq!(code, wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT);
            assert!(last_error().contains("999999"), "{}", last_error());
        }
        assert_eq!(
            wirepool_pool_close_connection(ptr::null(), 1),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"));
        assert_eq!(
            wirepool_pool_connections_json(pool, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_json is NULL"),
            "{}",
            last_error()
        );
        wirepool_pool_free(pool);
    }
}

/// A C++ `thread_local` object whose destructor calls wirepool runs after the
/// library's own thread-locals are gone (they were set up later, so they are torn
/// down first). A call that fails there still returns its code; it must not panic
/// across the boundary (which aborts the host process).
#[test]
fn a_failing_call_from_a_thread_local_destructor_returns_its_code() {
    struct CallsWirepoolOnDrop(std::sync::mpsc::Sender<wirepool_result>);
    impl Drop for CallsWirepoolOnDrop {
        fn drop(&mut self) {
            // SAFETY: NULL is the misuse under test; the channel name is valid.
            let code = unsafe { wirepool_pool_subscribe(ptr::null(), c"x".as_ptr()) };
            let _ = self.0.send(code);
        }
    }
    thread_local! {
        static ON_EXIT: std::cell::RefCell<Option<CallsWirepoolOnDrop>> =
            const { std::cell::RefCell::new(None) };
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Registered first, so destroyed after wirepool's last-error slot, which the
        // failing call below creates.
        ON_EXIT.with(|slot| *slot.borrow_mut() = Some(CallsWirepoolOnDrop(sender)));
        // SAFETY: as above.
        let code = unsafe { wirepool_pool_subscribe(ptr::null(), c"x".as_ptr()) };
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT);
    })
    .join()
    .expect("the thread ends normally");
    let code = receiver
        .recv_timeout(Duration::from_secs(10))
        .expect("the destructor ran and reported");
    assert_eq!(
        code,
        wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT,
        "the code of the failed call, not a panic"
    );
}

/// The header's promise for `wirepool_pool_close`: it wakes every blocked call, each
/// of which returns `WIREPOOL_ERR_CLOSED`, however long the caller said to wait.
#[test]
fn close_wakes_every_blocked_call_with_closed() {
    let _guard = watchdog("close wakes blocked calls", Duration::from_secs(60));
    // Nothing listens on port 1: no connection is ever ready, so every call below
    // waits its whole timeout unless the close ends it.
    let pool = open_pool("ws://127.0.0.1:1");
    let address = pool as usize;
    let forever = u32::MAX;
    type Call = fn(*const wirepool_pool, u32) -> wirepool_result;
    let calls: [(&str, Call); 5] = [
        ("poll", |pool, timeout| {
            let mut batch = ptr::null_mut();
            let mut count = 0;
            // SAFETY: live pool; the batch is made and freed here.
            unsafe {
                assert_eq!(
                    wirepool_batch_new(16, &mut batch),
                    wirepool_result::WIREPOOL_OK
                );
                let code = wirepool_pool_poll(pool, batch, timeout, &mut count);
                wirepool_batch_free(batch);
                code
            }
        }),
        ("wait_ready", |pool, timeout| {
            // SAFETY: live pool.
            unsafe { wirepool_pool_wait_ready(pool, timeout) }
        }),
        ("events_json", |pool, timeout| loop {
            let mut json = ptr::null_mut();
            // SAFETY: live pool, valid out-pointer; the events are freed at once.
            let code = unsafe { wirepool_pool_events_json(pool, timeout, &mut json) };
            if code != wirepool_result::WIREPOOL_OK {
                return code;
            }
            bytes_of(json);
        }),
        ("request", |pool, timeout| {
            let body = b"{}";
            let mut reply = ptr::null_mut();
            // SAFETY: live pool, valid body and out-pointer.
            unsafe { wirepool_pool_request(pool, body.as_ptr(), 2, timeout, 0, &mut reply) }
        }),
        ("request_batch", |pool, timeout| {
            let body = b"{}";
            let request = wirepool_request {
                payload: body.as_ptr(),
                payload_len: body.len(),
            };
            let mut reply = ptr::null_mut();
            let mut code = wirepool_result::WIREPOOL_OK;
            // SAFETY: live pool, one request and one slot in each output array.
            let result = unsafe {
                wirepool_pool_request_batch(
                    pool,
                    &request,
                    1,
                    timeout,
                    0,
                    None,
                    ptr::null_mut(),
                    &mut reply,
                    &mut code,
                )
            };
            assert_eq!(result, wirepool_result::WIREPOOL_OK, "{}", last_error());
            assert!(reply.is_null());
            code
        }),
    ];
    let threads: Vec<_> = calls
        .into_iter()
        .map(|(name, call)| {
            let thread = std::thread::spawn(move || {
                let code = call(address as *const wirepool_pool, forever);
                (code, last_error())
            });
            (name, thread)
        })
        .collect();
    // Both requests are waiting for a connection before the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut json = ptr::null_mut();
        // SAFETY: live pool, valid out-pointer.
        let code = unsafe { wirepool_pool_stats_json(pool, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK);
        let stats: serde_json::Value = serde_json::from_slice(&bytes_of(json)).expect("JSON");
        if stats["pending_requests"].as_u64() >= Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "requests never pending: {stats}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let closed_at = Instant::now();
    // SAFETY: live pool.
    assert_eq!(
        unsafe { wirepool_pool_close(pool) },
        wirepool_result::WIREPOOL_OK
    );
    for (name, thread) in threads {
        let (code, text) = thread.join().expect("no panic");
        assert_eq!(code, wirepool_result::WIREPOOL_ERR_CLOSED, "{name}: {text}");
    }
    assert!(
        closed_at.elapsed() < Duration::from_secs(10),
        "the blocked calls took {:?} to end after close",
        closed_at.elapsed()
    );
    // SAFETY: every other thread is done with it.
    unsafe { wirepool_pool_free(pool) };
}

/// `wirepool_pool_settings_json` and `wirepool_pool_reconfigure_json` on a real pool:
/// the settings read back, a larger `min_connections` opens connections and a smaller
/// one drains them, every bad body is refused naming what is wrong and leaves the
/// settings as they were, and a closed pool refuses any change.
#[test]
fn pool_settings_are_read_and_changed_through_the_c_abi() {
    let _guard = watchdog("c_abi_settings", Duration::from_secs(60));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 20.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let config = std::ffi::CString::new(format!(
        r#"{{"servers":[{{"url":"{}"}}],"strategy":"least_connections",
            "pool":{{"min_connections":2,"max_connections":2}}}}"#,
        sim.url()
    ))
    .expect("no NUL");
    let mut pool = ptr::null_mut();
    // SAFETY: a NUL-terminated config and a valid out-pointer.
    let code = unsafe { wirepool_pool_new(config.as_ptr(), &mut pool) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    let pool = pool.cast_const();
    let settings = || -> serde_json::Value {
        let mut json = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_settings_json(pool, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        serde_json::from_slice(&bytes_of(json)).expect("settings JSON")
    };
    let reconfigure = |body: &str| -> wirepool_result {
        let body = std::ffi::CString::new(body).expect("no NUL");
        // SAFETY: a live pool and a NUL-terminated string.
        unsafe { wirepool_pool_reconfigure_json(pool, body.as_ptr()) }
    };
    let connections = || -> Vec<serde_json::Value> {
        let mut json = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_connections_json(pool, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        let value: serde_json::Value =
            serde_json::from_slice(&bytes_of(json)).expect("connections JSON");
        value["connections"].as_array().expect("a list").clone()
    };
    // Checks `condition` after each batch of pool events (connections opening, getting
    // ready, closing), not on a timer.
    let wait_for = |what: &str, condition: &dyn Fn(&[serde_json::Value]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = connections();
            if condition(&listed) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {what} within 10 s; connections: {listed:?}"
            );
            let mut events = ptr::null_mut();
            // SAFETY: a live pool and a valid out-pointer.
            let code = unsafe { wirepool_pool_events_json(pool, 500, &mut events) };
            assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
            bytes_of(events);
        }
    };
    let ready_count =
        |listed: &[serde_json::Value]| listed.iter().filter(|c| c["ready"] == true).count();

    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_wait_ready(pool, 10_000) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    assert_eq!(
        settings(),
        serde_json::json!({"min_connections": 2, "max_connections": 2,
                           "strategy": "least_connections"})
    );

    // Only the keys given change.
    assert_eq!(
        reconfigure(r#"{"max_connections": 4, "min_connections": 3}"#),
        wirepool_result::WIREPOOL_OK,
        "{}",
        last_error()
    );
    assert_eq!(
        settings(),
        serde_json::json!({"min_connections": 3, "max_connections": 4,
                           "strategy": "least_connections"})
    );
    wait_for("a third connection ready", &|listed| {
        listed.len() == 3 && ready_count(listed) == 3
    });

    assert_eq!(
        reconfigure(r#"{"min_connections": 1}"#),
        wirepool_result::WIREPOOL_OK,
        "{}",
        last_error()
    );
    wait_for("the surplus drained down to one connection", &|listed| {
        listed.len() == 1 && ready_count(listed) == 1
    });
    assert_eq!(
        reconfigure(r#"{"strategy": "random"}"#),
        wirepool_result::WIREPOOL_OK,
        "{}",
        last_error()
    );
    let before = settings();
    assert_eq!(
        before,
        serde_json::json!({"min_connections": 1, "max_connections": 4, "strategy": "random"})
    );

    // Each refused change names what is wrong and changes nothing.
    for (body, expected) in [
        (
            r#"{"min_connections": 2, "maxx": 3}"#,
            r#"unknown key "maxx"; expected min_connections, max_connections or strategy"#,
        ),
        (
            r#"{"min_connections": 5}"#,
            "pool.min_connections: 5 is greater than pool.max_connections (4)",
        ),
        (
            r#"{"max_connections": 3, "min_connections": -1}"#,
            "min_connections: -1 is not a whole number from 0 to 4294967295",
        ),
        (
            r#"{"max_connections": 2.5}"#,
            "max_connections: 2.5 is not a whole number from 0 to 4294967295",
        ),
        (
            r#"{"min_connections": "2"}"#,
            r#"min_connections: "2" is not a whole number"#,
        ),
        (
            r#"{"strategy": "fastest", "min_connections": 2}"#,
            r#"strategy: "fastest" is not one of "round_robin""#,
        ),
        (
            r#"{"max_connections": 0}"#,
            "pool.max_connections: 0 is outside 1..=10000",
        ),
        (r#"{"min_connections": 2"#, "not JSON"),
        ("[2]", "expected a JSON object"),
        ("", "expected a JSON object"),
    ] {
        assert_eq!(
            reconfigure(body),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT,
            "{body} was accepted"
        );
        let text = last_error();
        assert!(
            text.contains(expected),
            "{body}: expected {expected:?} in {text:?}"
        );
        assert_eq!(settings(), before, "{body} changed the settings");
    }

    // Misuse: NULL and non-UTF-8 arguments.
    let bad_utf8: [u8; 4] = [b'{', 0xff, b'}', 0];
    // SAFETY: exactly the misuse under test; wirepool must check.
    unsafe {
        assert_eq!(
            wirepool_pool_reconfigure_json(pool, ptr::null()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("settings_json is NULL"),
            "{}",
            last_error()
        );
        assert_eq!(
            wirepool_pool_reconfigure_json(ptr::null(), c"{}".as_ptr()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"), "{}", last_error());
        assert_eq!(
            wirepool_pool_reconfigure_json(pool, bad_utf8.as_ptr().cast::<c_char>()),
            wirepool_result::WIREPOOL_ERR_INVALID_UTF8
        );
        assert!(
            last_error().contains("settings_json is not valid UTF-8"),
            "{}",
            last_error()
        );
        assert_eq!(
            wirepool_pool_settings_json(pool, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_json is NULL"),
            "{}",
            last_error()
        );
        assert_eq!(
            wirepool_pool_settings_json(ptr::null(), ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
    }
    assert_eq!(settings(), before);

    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_close(pool) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK);
    assert_eq!(
        reconfigure(r#"{"min_connections": 2}"#),
        wirepool_result::WIREPOOL_ERR_CLOSED
    );
    assert!(last_error().contains("closed"), "{}", last_error());
    // Reading them still works between close and free, as stats do.
    assert_eq!(settings(), before);
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(pool.cast_mut()) };
}

/// The JSON of a `_json` call that must succeed.
fn json_of(
    pool: *const wirepool_pool,
    call: unsafe extern "C" fn(*const wirepool_pool, *mut *mut wirepool_bytes) -> wirepool_result,
) -> serde_json::Value {
    let mut json = ptr::null_mut();
    // SAFETY: a live pool and a valid out-pointer.
    let code = unsafe { call(pool, &mut json) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    serde_json::from_slice(&bytes_of(json)).expect("a JSON reply")
}

/// Takes the pool's events through the C ABI until one matches, failing after 10 s
/// with what was seen.
fn wait_for_c_event(
    pool: *const wirepool_pool,
    what: &str,
    mut matches: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let mut json = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_events_json(pool, 200, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        let events: Vec<serde_json::Value> =
            serde_json::from_slice(&bytes_of(json)).expect("events JSON");
        for event in events {
            if matches(&event) {
                return event;
            }
            seen.push(event["type"].clone());
        }
    }
    panic!("expected {what} within 10 s; events seen: {seen:?}");
}

/// Health through the C ABI: `healthy` with no reasons once both connections are
/// ready, its history ending in that level; the one server listed with a closed
/// breaker and both connections; NULL arguments refused, naming the argument.
#[test]
fn a_ready_pool_is_healthy_through_the_c_abi() {
    let _guard = watchdog("c_abi_health_ready", Duration::from_secs(30));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 20.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = open_pool(&sim.url()).cast_const();
    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_wait_ready(pool, 10_000) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    // The pool thread assesses health as connections change: wait for it on events.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = json_of(pool, wirepool_pool_health_json);
        if health["level"] == "healthy" {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "expected healthy with two ready connections, got {health}"
        );
        let mut events = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_events_json(pool, 200, &mut events) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        bytes_of(events);
    };
    assert_eq!(health["reasons"], serde_json::json!([]), "{health}");
    let history = health["history"].as_array().expect("a history list");
    let last = history.last().expect("at least the change to healthy");
    assert_eq!(last["level"], "healthy", "{health}");
    assert!(last["ts_ms"].as_u64().is_some_and(|ts| ts > 0), "{health}");

    let servers = json_of(pool, wirepool_pool_servers_json);
    let servers = servers["servers"].as_array().expect("a servers list");
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["circuit"], "closed", "{servers:?}");
    assert_eq!(servers[0]["consecutive_failures"], 0, "{servers:?}");
    assert_eq!(servers[0]["ready_connections"], 2, "{servers:?}");
    assert_eq!(servers[0]["retry_after_until_ms"], 0, "{servers:?}");

    // SAFETY: exactly the misuse under test; wirepool must check.
    unsafe {
        for call in [wirepool_pool_health_json, wirepool_pool_servers_json] {
            let mut json = ptr::null_mut();
            assert_eq!(
                call(ptr::null(), &mut json),
                wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
            );
            assert!(last_error().contains("pool is NULL"), "{}", last_error());
            assert!(json.is_null(), "out-parameter written on failure");
            assert_eq!(
                call(pool, ptr::null_mut()),
                wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
            );
            assert!(
                last_error().contains("out_json is NULL"),
                "{}",
                last_error()
            );
        }
        wirepool_pool_free(pool.cast_mut());
    }
}

/// A venue that refuses every connect: once its breaker opens (`circuit_open`), the
/// servers view shows it `open` with its failures while the other server stays
/// `closed`, and health is `degraded` naming the breaker. Between close and free both
/// still answer: health `critical` because the pool is closed.
#[test]
fn an_open_breaker_shows_in_servers_and_health_through_the_c_abi() {
    let _guard = watchdog("c_abi_health_breaker", Duration::from_secs(30));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 20.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let (_refusing, refusing_url) = crate::support::refusing_url();
    let config = std::ffi::CString::new(format!(
        r#"{{"servers":[{{"id":"sim","url":"{}"}},{{"id":"refusing","url":"{refusing_url}"}}],
            "pool":{{"min_connections":2,"max_connections":2}},
            "reconnect":{{"initial_delay_ms":10,"max_delay_ms":20}},
            "circuit_breaker":{{"failure_threshold":1,"recovery_timeout_ms":30000}}}}"#,
        sim.url()
    ))
    .expect("no NUL");
    let mut pool = ptr::null_mut();
    // SAFETY: a NUL-terminated config and a valid out-pointer.
    let code = unsafe { wirepool_pool_new(config.as_ptr(), &mut pool) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    let pool = pool.cast_const();

    let opened = wait_for_c_event(pool, "circuit_open", |event| {
        event["type"] == "circuit_open"
    });
    assert_eq!(opened["server"], "refusing", "{opened}");
    let servers = json_of(pool, wirepool_pool_servers_json);
    let by_id = |id: &str| -> serde_json::Value {
        servers["servers"]
            .as_array()
            .expect("a servers list")
            .iter()
            .find(|server| server["id"] == id)
            .unwrap_or_else(|| panic!("server {id} not listed: {servers}"))
            .clone()
    };
    let refusing = by_id("refusing");
    assert_eq!(refusing["circuit"], "open", "{servers}");
    assert!(
        refusing["consecutive_failures"]
            .as_u64()
            .is_some_and(|failures| failures >= 1),
        "{servers}"
    );
    assert_eq!(refusing["ready_connections"], 0, "{servers}");
    assert_eq!(by_id("sim")["circuit"], "closed", "{servers}");

    // Health follows at the pool thread's next assessment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = json_of(pool, wirepool_pool_health_json);
        let names_breaker = health["reasons"].as_array().is_some_and(|reasons| {
            reasons.iter().any(|reason| {
                reason
                    .as_str()
                    .is_some_and(|r| r.contains("circuit breaker"))
            })
        });
        if names_breaker {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "expected health to name the open breaker, got {health}"
        );
        let mut events = ptr::null_mut();
        // SAFETY: a live pool and a valid out-pointer.
        let code = unsafe { wirepool_pool_events_json(pool, 200, &mut events) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        bytes_of(events);
    };
    assert_eq!(health["level"], "degraded", "{health}");

    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_close(pool) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK);
    let health = json_of(pool, wirepool_pool_health_json);
    assert_eq!(health["level"], "critical", "{health}");
    assert_eq!(
        health["reasons"],
        serde_json::json!(["the pool is closed"]),
        "{health}"
    );
    let servers = json_of(pool, wirepool_pool_servers_json);
    assert_eq!(
        servers["servers"].as_array().map(Vec::len),
        Some(2),
        "{servers}"
    );
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(pool.cast_mut()) };
}

/// Opens a pool through the C ABI from `config` (JSON), failing with the library's
/// message.
fn open_pool_with(config: &serde_json::Value) -> *const wirepool_pool {
    let config = std::ffi::CString::new(config.to_string()).expect("no NUL");
    let mut pool = ptr::null_mut();
    // SAFETY: a NUL-terminated config and a valid out-pointer.
    let code = unsafe { wirepool_pool_new(config.as_ptr(), &mut pool) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    pool.cast_const()
}

/// The admin port's address through `wirepool_pool_health_addr`: `None` when the
/// call says there is no port (`WIREPOOL_OK` with NULL).
fn c_health_addr(pool: *const wirepool_pool) -> Option<SocketAddr> {
    let mut addr = ptr::null_mut();
    // SAFETY: a live pool and a valid out-pointer.
    let code = unsafe { wirepool_pool_health_addr(pool, &mut addr) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    if addr.is_null() {
        return None;
    }
    let text = String::from_utf8(bytes_of(addr)).expect("UTF-8 address");
    Some(
        text.parse()
            .unwrap_or_else(|err| panic!("{text:?} is not a socket address: {err}")),
    )
}

/// The raw body of a `_json` call that must succeed.
fn raw_json_of(
    pool: *const wirepool_pool,
    call: unsafe extern "C" fn(*const wirepool_pool, *mut *mut wirepool_bytes) -> wirepool_result,
) -> Vec<u8> {
    let mut json = ptr::null_mut();
    // SAFETY: a live pool and a valid out-pointer.
    let code = unsafe { call(pool, &mut json) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    bytes_of(json)
}

/// `health.listen` on port 0: `wirepool_pool_health_addr` names the port the system
/// chose, and `GET /health` answers there; a pool without `health` has none (OK with
/// NULL, not an error), nor does a closed one; NULL arguments are refused.
#[test]
fn the_admin_port_address_is_reported_through_the_c_abi() {
    let _guard = watchdog("c_abi_health_addr", Duration::from_secs(30));
    let sim = crate::support::simulator(20.0);
    let pool = open_pool_with(&serde_json::json!({
        "servers": [{"url": sim.url()}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "health": {"listen": "127.0.0.1:0"},
    }));
    let addr = c_health_addr(pool).expect("health.listen is set: an address");
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_ne!(addr.port(), 0, "the port the system chose, not 0");
    let reply = crate::http::get(addr, "/health");
    assert!(
        matches!(reply.status, 200 | 503),
        "GET /health at {addr}: {} {}",
        reply.status,
        reply.text()
    );
    assert!(reply.json()["status"].is_string(), "{}", reply.text());

    // SAFETY: exactly the misuse under test; wirepool must check.
    unsafe {
        let mut out = ptr::null_mut();
        assert_eq!(
            wirepool_pool_health_addr(ptr::null(), &mut out),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"), "{}", last_error());
        assert!(out.is_null(), "out-parameter written on failure");
        assert_eq!(
            wirepool_pool_health_addr(pool, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_addr is NULL"),
            "{}",
            last_error()
        );
    }

    // Close stops the port: no address from then on.
    // SAFETY: a live pool.
    assert_eq!(
        unsafe { wirepool_pool_close(pool) },
        wirepool_result::WIREPOOL_OK
    );
    assert_eq!(c_health_addr(pool), None, "a closed pool has no port");
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(pool.cast_mut()) };

    let without = open_pool_with(&serde_json::json!({
        "servers": [{"url": sim.url()}],
        "pool": {"min_connections": 1, "max_connections": 1},
    }));
    assert_eq!(c_health_addr(without), None, "no health.listen, no port");
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(without.cast_mut()) };
}

/// `wirepool_pool_health_json` and `wirepool_pool_servers_json` give what the admin
/// port gives for the same pool, found through `wirepool_pool_health_addr`, one
/// server's breaker open (a port that refuses connects) and the other serving.
#[test]
fn health_and_servers_json_are_the_admin_port_bodies() {
    let _guard = watchdog("c_abi_port_bodies", Duration::from_secs(30));
    let sim = crate::support::simulator(20.0);
    let (_refusing, refusing_url) = crate::support::refusing_url();
    let pool = open_pool_with(&serde_json::json!({
        "servers": [{"id": "sim", "url": sim.url()}, {"id": "refusing", "url": refusing_url}],
        "pool": {"min_connections": 2, "max_connections": 2},
        "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20},
        "circuit_breaker": {"failure_threshold": 1, "recovery_timeout_ms": 30000},
        "health": {"listen": "127.0.0.1:0"},
    }));
    let addr = c_health_addr(pool).expect("the admin port runs");
    wait_for_c_event(pool, "circuit_open", |event| {
        event["type"] == "circuit_open"
    });
    for (path, call) in [
        (
            "/api/v1/pool/health",
            wirepool_pool_health_json as unsafe extern "C" fn(_, _) -> _,
        ),
        ("/api/v1/servers", wirepool_pool_servers_json),
    ] {
        // The pool moves on meanwhile (health is reassessed, connections get ready):
        // compare once the C view held still around the port's reply.
        let mut attempts = 0;
        loop {
            let before = raw_json_of(pool, call);
            let port = crate::http::get(addr, path);
            let after = raw_json_of(pool, call);
            if before == after {
                assert_eq!(port.status, 200, "{path}: {}", port.text());
                assert_eq!(
                    port.text(),
                    String::from_utf8_lossy(&before),
                    "{path}: the port and the C ABI differ"
                );
                break;
            }
            attempts += 1;
            assert!(attempts < 50, "{path}: the pool never held still");
            let mut events = ptr::null_mut();
            // SAFETY: a live pool and a valid out-pointer.
            let code = unsafe { wirepool_pool_events_json(pool, 100, &mut events) };
            assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
            bytes_of(events);
        }
    }
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(pool.cast_mut()) };
}

/// After 20 answered requests and 2 the venue refused, the latency histogram through
/// the C ABI counts 22 (timeouts do not count), its percentiles are the bounds of the
/// buckets holding those ranks, and `GET /api/v1/pool/latency` gives the same bytes.
/// It still answers between close and free; NULL arguments are refused.
#[test]
fn request_latency_counts_each_answered_request_and_is_the_admin_port_body() {
    let _guard = watchdog("c_abi_request_latency", Duration::from_secs(30));
    let sim = crate::support::simulator(20.0);
    let pool = open_pool_with(&serde_json::json!({
        "servers": [{"url": sim.url()}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "health": {"listen": "127.0.0.1:0"},
    }));
    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_wait_ready(pool, 10_000) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    let before = json_of(pool, wirepool_pool_request_latency_json);
    assert_eq!(before["count"], 0, "{before}");
    assert_eq!(before["p50_upper_bound_us"], serde_json::Value::Null);

    let (answered, refused) = (20u64, 2u64);
    let request = |body: &[u8], expected: wirepool_result| {
        let mut reply = ptr::null_mut();
        // SAFETY: a live pool, `body` readable, a valid out-pointer.
        let code =
            unsafe { wirepool_pool_request(pool, body.as_ptr(), body.len(), 5000, 0, &mut reply) };
        assert_eq!(code, expected, "{}", last_error());
        bytes_of(reply);
    };
    for _ in 0..answered {
        request(
            br#"{"op":"history","channel":"ticker.0","bars":1}"#,
            wirepool_result::WIREPOOL_OK,
        );
    }
    for _ in 0..refused {
        request(br#"{"op":"fail"}"#, wirepool_result::WIREPOOL_ERR_REMOTE);
    }

    let body = raw_json_of(pool, wirepool_pool_request_latency_json);
    let latency: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let total = answered + refused;
    let counts: Vec<u64> = latency["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(|count| count.as_u64().expect("a count"))
        .collect();
    let bounds: Vec<u64> = latency["bounds_us"]
        .as_array()
        .expect("bounds_us")
        .iter()
        .map(|bound| bound.as_u64().expect("a bound"))
        .collect();
    assert_eq!(counts.len(), bounds.len() + 1, "{latency}");
    assert_eq!(counts.iter().sum::<u64>(), total, "{latency}");
    assert_eq!(latency["count"], total, "{latency}");
    assert!(latency["sum_us"].as_u64() > Some(0), "{latency}");
    // Each percentile: the bound of the first bucket whose running count reaches its
    // nearest rank; above the last bound, null.
    for (name, per_mille) in [
        ("p50_upper_bound_us", 500),
        ("p90_upper_bound_us", 900),
        ("p99_upper_bound_us", 990),
    ] {
        let rank = (total * per_mille).div_ceil(1000);
        let mut running = 0;
        let bucket = counts
            .iter()
            .position(|count| {
                running += count;
                running >= rank
            })
            .expect("the counts reach every rank");
        let expected = bounds
            .get(bucket)
            .map_or(serde_json::Value::Null, |bound| (*bound).into());
        assert_eq!(latency[name], expected, "{name} of {latency}");
    }

    let addr = c_health_addr(pool).expect("the admin port runs");
    let port = crate::http::get(addr, "/api/v1/pool/latency");
    assert_eq!(port.status, 200, "{}", port.text());
    assert_eq!(
        port.text(),
        String::from_utf8_lossy(&body),
        "the port and the C ABI differ"
    );

    // SAFETY: exactly the misuse under test; wirepool must check.
    unsafe {
        let mut json = ptr::null_mut();
        assert_eq!(
            wirepool_pool_request_latency_json(ptr::null(), &mut json),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"), "{}", last_error());
        assert!(json.is_null(), "out-parameter written on failure");
        assert_eq!(
            wirepool_pool_request_latency_json(pool, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_json is NULL"),
            "{}",
            last_error()
        );
        assert_eq!(wirepool_pool_close(pool), wirepool_result::WIREPOOL_OK);
    }
    let after_close = json_of(pool, wirepool_pool_request_latency_json);
    assert_eq!(
        after_close, latency,
        "between close and free: the last counts"
    );
    // SAFETY: freed once; nothing uses it afterwards.
    unsafe { wirepool_pool_free(pool.cast_mut()) };
}

/// `wirepool_pool_request_submit` then `wirepool_pending_request_wait`: the outcome
/// once finished (the same every time after), `WIREPOOL_PENDING` before with nothing
/// written, each error as `wirepool_pool_request` gives it; a freed unfinished request
/// leaves the table; after the pool's close and even its free, a wait gives the
/// outcome it already had, or `WIREPOOL_ERR_CLOSED`.
#[test]
fn submitted_requests_are_collected_later_through_the_c_abi() {
    let _guard = watchdog("c_abi_submit", Duration::from_secs(60));
    let sim = crate::support::simulator(10.0);
    let pool = open_pool(&sim.url());
    let submit = |body: &[u8], timeout_ms: u32| {
        let mut request = ptr::null_mut();
        // SAFETY: a live pool, `body` readable, a valid out-pointer.
        let code = unsafe {
            wirepool_pool_request_submit(
                pool,
                body.as_ptr(),
                body.len(),
                timeout_ms,
                0,
                &mut request,
            )
        };
        assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
        assert!(!request.is_null());
        request
    };
    // The code, and the reply (or the venue's error payload) when one was written.
    let wait = |request: *mut wirepool_pending_request, wait_ms: u32| {
        let mut reply = ptr::null_mut();
        // SAFETY: a live request handle used from this thread only.
        let code = unsafe { wirepool_pending_request_wait(request, wait_ms, &mut reply) };
        let reply = (!reply.is_null()).then(|| bytes_of(reply));
        (code, reply)
    };
    let pending_requests = || {
        let mut json = ptr::null_mut();
        // SAFETY: a live pool, valid out-pointer.
        let code = unsafe { wirepool_pool_stats_json(pool, &mut json) };
        assert_eq!(code, wirepool_result::WIREPOOL_OK);
        let stats: serde_json::Value = serde_json::from_slice(&bytes_of(json)).expect("JSON");
        stats["pending_requests"]
            .as_u64()
            .expect("pending_requests")
    };
    // SAFETY: a live pool.
    let code = unsafe { wirepool_pool_wait_ready(pool, 10_000) };
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());

    // Misuse: each NULL named, nothing written.
    // SAFETY: exactly the misuse under test; wirepool must check.
    unsafe {
        let body = b"{}";
        let mut request = ptr::null_mut();
        assert_eq!(
            wirepool_pool_request_submit(ptr::null(), body.as_ptr(), 2, 0, 0, &mut request),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("pool is NULL"), "{}", last_error());
        assert_eq!(
            wirepool_pool_request_submit(pool, ptr::null(), 2, 0, 0, &mut request),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("payload is NULL"), "{}", last_error());
        assert_eq!(
            wirepool_pool_request_submit(pool, body.as_ptr(), 2, 0, 0, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_request is NULL"),
            "{}",
            last_error()
        );
        assert_eq!(
            wirepool_pool_request_submit(pool, body.as_ptr(), 2, 0, 0x80, &mut request),
            wirepool_result::WIREPOOL_ERR_INVALID_ARGUMENT
        );
        assert!(request.is_null(), "out_request written on failure");
        let mut reply = ptr::null_mut();
        assert_eq!(
            wirepool_pending_request_wait(ptr::null_mut(), 0, &mut reply),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(last_error().contains("request is NULL"), "{}", last_error());
        assert_eq!(wirepool_pending_request_id(ptr::null()), 0);
        wirepool_pending_request_free(ptr::null_mut());
        assert!(reply.is_null());
    }
    assert_eq!(
        pending_requests(),
        0,
        "a refused submit left a request behind"
    );

    // Submitted, then collected; a later wait gives the same outcome again.
    let echo = submit(br#"{"n":1}"#, 5000);
    // SAFETY: a live request handle, and the misuse under test.
    unsafe {
        assert!(wirepool_pending_request_id(echo) > 0);
        assert_eq!(
            wirepool_pending_request_wait(echo, 0, ptr::null_mut()),
            wirepool_result::WIREPOOL_ERR_NULL_ARGUMENT
        );
        assert!(
            last_error().contains("out_reply is NULL"),
            "{}",
            last_error()
        );
    }
    let (code, reply) = wait(echo, u32::MAX);
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    assert_eq!(reply.as_deref(), Some(&br#"{"echo":{"n":1}}"#[..]));
    assert_eq!(
        wait(echo, 0),
        (code, reply),
        "a second wait gives the same outcome"
    );

    // Pending: nothing written, and said so; then the reply.
    let late = submit(br#"{"op":"delay","ms":1500,"n":2}"#, 30_000);
    assert_eq!(wait(late, 0), (wirepool_result::WIREPOOL_PENDING, None));
    assert!(
        last_error().contains("has not finished yet"),
        "{}",
        last_error()
    );
    // SAFETY: wirepool_result_text returns a static NUL-terminated string.
    let text = unsafe { CStr::from_ptr(wirepool_result_text(1)) };
    assert_eq!(text.to_str(), Ok("the request has not finished yet"));
    let (code, reply) = wait(late, 30_000);
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    assert_eq!(
        reply.as_deref(),
        Some(&br#"{"echo":{"op":"delay","ms":1500,"n":2}}"#[..])
    );

    // The venue's error, with its payload; a timeout, however the waits are sliced.
    let failing = submit(br#"{"op":"fail"}"#, 5000);
    let (code, payload) = wait(failing, u32::MAX);
    assert_eq!(code, wirepool_result::WIREPOOL_ERR_REMOTE);
    assert!(
        String::from_utf8_lossy(&payload.expect("the error payload")).contains("requested failure")
    );
    let ignored = submit(br#"{"op":"ignore"}"#, 200);
    let code = loop {
        match wait(ignored, 30) {
            (wirepool_result::WIREPOOL_PENDING, None) => continue,
            (code, reply) => {
                assert!(reply.is_none(), "a timeout writes no reply");
                break code;
            }
        }
    };
    assert_eq!(code, wirepool_result::WIREPOOL_ERR_TIMEOUT);
    assert!(
        last_error().contains("request timed out after 200 ms"),
        "{}",
        last_error()
    );

    // Freed unfinished: withdrawn from the table at once.
    let dropped = submit(br#"{"op":"ignore"}"#, 30_000);
    assert_eq!(pending_requests(), 1);
    // SAFETY: a live handle, freed once.
    unsafe { wirepool_pending_request_free(dropped) };
    assert_eq!(pending_requests(), 0, "a freed request stayed in the table");

    // Close: an unfinished request says so, a finished one keeps its outcome; then the
    // same after the pool's free.
    let unfinished = submit(br#"{"op":"ignore"}"#, 30_000);
    let never_waited = submit(br#"{"op":"ignore"}"#, 30_000);
    assert_eq!(wait(unfinished, 0).0, wirepool_result::WIREPOOL_PENDING);
    // SAFETY: a live pool.
    assert_eq!(
        unsafe { wirepool_pool_close(pool) },
        wirepool_result::WIREPOOL_OK
    );
    let started = Instant::now();
    assert_eq!(
        wait(unfinished, 30_000),
        (wirepool_result::WIREPOOL_ERR_CLOSED, None)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed, yet it waited"
    );
    let (code, reply) = wait(echo, 0);
    assert_eq!(code, wirepool_result::WIREPOOL_OK, "{}", last_error());
    assert_eq!(reply.as_deref(), Some(&br#"{"echo":{"n":1}}"#[..]));
    let mut request = ptr::null_mut();
    // SAFETY: a closed (not freed) pool, valid out-pointer.
    let code = unsafe { wirepool_pool_request_submit(pool, b"{}".as_ptr(), 2, 0, 0, &mut request) };
    assert_eq!(code, wirepool_result::WIREPOOL_ERR_CLOSED);
    assert!(request.is_null());
    // SAFETY: freed once; the request handles stay valid without it.
    unsafe { wirepool_pool_free(pool) };
    assert_eq!(
        wait(never_waited, 30_000),
        (wirepool_result::WIREPOOL_ERR_CLOSED, None)
    );
    assert_eq!(
        wait(unfinished, 0),
        (wirepool_result::WIREPOOL_ERR_CLOSED, None)
    );
    assert_eq!(wait(echo, 0).0, wirepool_result::WIREPOOL_OK);
    // SAFETY: each handle freed once, after its pool.
    unsafe {
        for request in [echo, late, failing, ignored, unfinished, never_waited] {
            wirepool_pending_request_free(request);
        }
    }
}
