//! A codec that traps, loops forever or hoards memory takes down only its own
//! connection; the pool replaces it and the other connection keeps delivering.

use std::time::{Duration, Instant};

use crate::support::{compile_wat, wait_for_event, watchdog, ScriptServer};
use wirepool::{Config, Error, Pool, RequestOptions};

/// A pool of two connections, both ready, to a script server, with the test codec
/// `codec` (tests/codecs/<codec>.wat), a 50 ms call budget and 16 MiB of memory.
fn two_connections_with(codec: &str) -> (ScriptServer, Pool) {
    two_connections_configured(codec, serde_json::Value::Null)
}

/// [`two_connections_with`], the codec given `codec_config`.
fn two_connections_configured(
    codec: &str,
    codec_config: serde_json::Value,
) -> (ScriptServer, Pool) {
    let server = ScriptServer::start();
    let path = compile_wat(codec);
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": server.url()}],
            "pool": {"min_connections": 2, "max_connections": 2},
            "codec": {
                "path": path, "config": codec_config, "max_call_ms": 50, "max_memory_mb": 16,
            },
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 100},
        })
        .to_string(),
    )
    .expect("valid config");
    let pool = Pool::new(config).expect("pool opens");
    pool.wait_ready(Duration::from_secs(10))
        .expect("both connections ready");
    (server, pool)
}

/// The pool's third connection becomes ready, and only one was ever replaced.
fn expect_one_replacement(server: &ScriptServer, pool: &Pool) {
    wait_for_event(
        pool,
        Duration::from_secs(10),
        "a replacement ready",
        |event| event.kind == "ready" && event.connection_id.is_some_and(|id| id > 2),
    );
    assert_eq!(server.accepted(), 3, "exactly one connection was replaced");
}

fn misbehaving_codec_loses_only_its_connection(codec: &str, expected_reason: &str) {
    let _guard = watchdog("codec sandbox", Duration::from_secs(60));
    let (server, pool) = two_connections_with(codec);
    assert_eq!(server.accepted(), 2);

    server.poison_one();
    let events = wait_for_event(&pool, Duration::from_secs(20), "codec_failed", |event| {
        event.kind == "codec_failed"
    });
    let failed = events.last().expect("the codec_failed event");
    let reason = failed.message.clone().unwrap_or_default();
    assert!(
        reason.contains(expected_reason),
        "codec_failed should say {expected_reason:?}, got {reason:?}"
    );
    let dead = failed.connection_id.expect("names its connection");

    // The survivor keeps delivering while the pool replaces the dead one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut survivor_messages = 0;
    while survivor_messages < 5 && Instant::now() < deadline {
        if let Some(message) = pool
            .recv(Some(Duration::from_millis(200)))
            .expect("pool open")
        {
            if message.connection_id != dead {
                survivor_messages += 1;
            }
        }
    }
    assert!(
        survivor_messages >= 5,
        "the other connection stopped delivering"
    );
    expect_one_replacement(&server, &pool);
    assert!(!pool.is_closed());
}

#[test]
fn trapping_codec_loses_only_its_own_connection() {
    misbehaving_codec_loses_only_its_connection("trap", "trapped");
}

#[test]
fn endless_loop_codec_is_stopped_by_its_time_budget() {
    misbehaving_codec_loses_only_its_connection("endless_loop", "ran longer than its 50 ms budget");
}

#[test]
fn memory_hog_codec_is_stopped_by_its_memory_limit() {
    misbehaving_codec_loses_only_its_connection(
        "memory_hog",
        "wirepool_decode grew its memory past the 16 MiB limit",
    );
}

/// A decode whose output records do not add up fails the connection with an error that
/// says so; the good records before the broken one (data read from the wire) are
/// delivered first. With `auth_failed_first`, a record that would end the session
/// (AUTH_FAILED) comes before the broken one: the codec's failure is still what is
/// reported (not an auth failure, which the circuit breaker would count against the
/// server).
fn malformed_output_fails_the_connection_after_its_good_records(auth_failed_first: bool) {
    let mode = if auth_failed_first {
        "auth_failed_then_bad_output"
    } else {
        "bad_output"
    };
    broken_output_fails_the_connection_after_its_good_records(
        two_connections_configured("trap", serde_json::json!(mode)),
        &["claims 0 + 2147483647 bytes, past the end of the output"],
    );
}

/// The poisoned frame's decode output ends in a broken record: the connection fails
/// with a codec error containing each of `expected`, after the frame's own good record was
/// delivered, and only that connection is replaced.
fn broken_output_fails_the_connection_after_its_good_records(
    (server, pool): (ScriptServer, Pool),
    expected: &[&str],
) {
    let _guard = watchdog("malformed output", Duration::from_secs(60));
    server.poison_one();
    let events = wait_for_event(
        &pool,
        Duration::from_secs(20),
        "the connection's end",
        |event| event.kind == "codec_failed" || event.kind == "auth_failed",
    );
    let failed = events.last().expect("the event");
    assert_eq!(failed.kind, "codec_failed", "{failed:?}");
    let reason = failed.message.clone().unwrap_or_default();
    for text in expected {
        assert!(reason.contains(text), "{reason}");
    }
    let dead = failed.connection_id.expect("names its connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut delivered = false;
    while !delivered && Instant::now() < deadline {
        if let Some(message) = pool
            .recv(Some(Duration::from_millis(200)))
            .expect("pool open")
        {
            delivered = message.connection_id == dead && message.payload == b"X marks the spot";
        }
    }
    assert!(
        delivered,
        "the frame's own record, before the broken one, was not delivered"
    );
    expect_one_replacement(&server, &pool);
}

#[test]
fn malformed_output_from_decode_fails_the_connection_after_its_good_records() {
    malformed_output_fails_the_connection_after_its_good_records(false);
}

#[test]
fn malformed_output_after_an_auth_failure_is_still_the_codec_failing() {
    malformed_output_fails_the_connection_after_its_good_records(true);
}

/// A codec whose data records point into its input (`DATA_IN_INPUT`): it is told
/// before `wirepool_init` that the engine understands them (its init fails otherwise,
/// and no connection would be ready), each frame arrives whole on its channel, and a
/// record pointing past the input fails the connection with an error that says so.
#[test]
fn data_records_pointing_into_the_input_deliver_the_frames_they_point_at() {
    let (server, pool) = two_connections_with("input_refs");
    let _guard = watchdog("input refs", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ticks = 0;
    while ticks < 20 && Instant::now() < deadline {
        if let Some(message) = pool
            .recv(Some(Duration::from_millis(200)))
            .expect("pool open")
        {
            assert_eq!(&*message.channel, "t");
            let text = String::from_utf8(message.payload).expect("UTF-8");
            let number = text
                .strip_prefix("tick ")
                .unwrap_or_else(|| panic!("{text:?}"));
            number.parse::<u64>().unwrap_or_else(|_| panic!("{text:?}"));
            ticks += 1;
        }
    }
    assert_eq!(ticks, 20, "the frames' messages were not delivered");
    broken_output_fails_the_connection_after_its_good_records(
        (server, pool),
        &[
            "DATA_IN_INPUT record at output offset",
            "points at 1 byte(s) from input offset",
            "past the call's input",
        ],
    );
}

/// A request whose payload makes the codec trap while encoding it fails at once with
/// a codec error saying nothing was sent, not "connection lost" (the venue never saw
/// it), and, marked idempotent, it is not sent again on the other connection, where
/// the same codec would trap too: one connection is lost and replaced, not two.
#[test]
fn a_request_the_codec_traps_on_fails_as_not_sent_and_costs_one_connection() {
    let _guard = watchdog("encode trap", Duration::from_secs(60));
    let (server, pool) = two_connections_with("trap");
    let outcome = pool.request(
        b"X marks the spot",
        RequestOptions {
            timeout: Some(Duration::from_secs(20)),
            idempotent: true,
        },
    );
    match outcome {
        Err(Error::Codec(text)) => {
            assert!(text.contains("nothing was sent"), "{text}");
            assert!(text.contains("trapped"), "{text}");
        }
        other => panic!("expected a codec error saying nothing was sent, got {other:?}"),
    }
    expect_one_replacement(&server, &pool);
}

/// A channel whose subscription makes the codec trap is dropped from the subscriptions
/// once the codec failed on it on two connections (one failure could be the
/// connection's own), with a `subscribe_failed` event that says so: it does not go
/// from connection to connection taking each down for ever. The pool then carries on
/// with its other channels.
#[test]
fn a_channel_the_codec_traps_on_is_dropped_after_two_connections_fail_on_it() {
    let _guard = watchdog("poison channel", Duration::from_secs(60));
    let (server, pool) = two_connections_with("trap");
    pool.subscribe("good").expect("subscribe");
    pool.subscribe("Xbad").expect("subscribe");
    let events = wait_for_event(
        &pool,
        Duration::from_secs(20),
        "the bad channel dropped",
        |event| {
            event.kind == "subscribe_failed"
                && event.channel.as_deref() == Some("Xbad")
                && event
                    .message
                    .as_deref()
                    .is_some_and(|text| text.contains("dropped"))
        },
    );
    let text = events.last().and_then(|event| event.message.clone());
    assert!(
        text.as_deref().is_some_and(|text| text.contains("trapped")),
        "{text:?}"
    );
    let failed = events
        .iter()
        .filter(|event| event.kind == "codec_failed")
        .count();
    assert!(failed <= 2, "{failed} connections failed on one channel");
    // The pool recovers: both connections ready, the good channel confirmed, and
    // nothing left of the bad one.
    crate::support::wait_until(&pool, Duration::from_secs(20), "a healthy pool", || {
        let stats = pool.stats();
        stats.ready_connections == 2 && stats.subscriptions_active == 1
    });
    let stats = pool.stats();
    assert_eq!(stats.subscriptions, 1, "{stats:?}");
    assert!(server.accepted() <= 4, "{} connections", server.accepted());
}
