use wirepool_sdk::testing::{Harness, Record};
use wirepool_sdk::{kind, Frame, Op};

use super::*;

fn ready_codec(config: &str) -> Harness<JsonCodec> {
    let (mut codec, init) = Harness::<JsonCodec>::init(config.as_bytes(), b"").expect("init");
    assert!(init.is_empty(), "init emits nothing");
    let open = codec.open().expect("open");
    assert_eq!(kinds(&open), [kind::READY], "no token: ready at once");
    codec
}

fn kinds(records: &[Record]) -> Vec<u32> {
    records.iter().map(|record| record.kind).collect()
}

fn decode_one(codec: &mut Harness<JsonCodec>, frame: &str) -> Record {
    let records = codec
        .decode_text(&[frame.as_bytes()])
        .expect("decode never fails");
    assert_eq!(
        records.len(),
        1,
        "one record for {frame:?}, got {records:?}"
    );
    records.into_iter().next().unwrap()
}

fn sent_text(records: &[Record]) -> String {
    assert_eq!(
        kinds(records),
        [kind::SEND_TEXT],
        "one frame sent, got {records:?}"
    );
    records[0].text()
}

#[test]
fn config_accepts_empty_null_and_objects() {
    for config in ["", "  ", "null", "{}", "{\"unknown\":[1]}"] {
        let (codec, _) = Harness::<JsonCodec>::init(config.as_bytes(), b"").expect(config);
        assert_eq!(
            codec.codec.options,
            Options {
                app_heartbeat: true,
                sequence_field: Some(b"seq".to_vec())
            },
            "defaults for {config:?}"
        );
    }
    let (codec, _) =
        Harness::<JsonCodec>::init(br#"{"app_heartbeat":false,"sequence_field":"n"}"#, b"")
            .unwrap();
    assert!(!codec.codec.options.app_heartbeat);
    assert_eq!(
        codec.codec.options.sequence_field.as_deref(),
        Some(&b"n"[..])
    );
    let (codec, _) = Harness::<JsonCodec>::init(br#"{"sequence_field":null}"#, b"").unwrap();
    assert_eq!(codec.codec.options.sequence_field, None);
}

#[test]
fn config_that_is_not_valid_fails_init() {
    for config in [
        "{",
        "[1]",
        "5",
        "{\"app_heartbeat\":1}",
        "{\"sequence_field\":3}",
    ] {
        assert!(
            Harness::<JsonCodec>::init(config.as_bytes(), b"").is_err(),
            "{config:?} must be refused"
        );
    }
}

#[test]
fn open_with_a_token_authenticates_first() {
    let (mut codec, _) = Harness::<JsonCodec>::init(b"{}", b"se\"cret").unwrap();
    let open = codec.open().unwrap();
    assert_eq!(
        sent_text(&open),
        r#"{"type":"auth","token":"se\"cret","messageId":"auth"}"#
    );
    let reply = decode_one(&mut codec, r#"{"type":"authenticated","messageId":"auth"}"#);
    assert_eq!(reply.kind, kind::READY);
}

#[test]
fn rejected_auth_is_auth_failed_with_the_reason() {
    let (mut codec, _) = Harness::<JsonCodec>::init(b"null", b"t").unwrap();
    codec.open().unwrap();
    let reply = decode_one(
        &mut codec,
        r#"{"type":"error","messageId":"auth","payload":"bad token"}"#,
    );
    assert_eq!(
        (reply.kind, reply.text()),
        (kind::AUTH_FAILED, "bad token".into())
    );

    let (mut codec, _) = Harness::<JsonCodec>::init(b"null", b"t").unwrap();
    codec.open().unwrap();
    let frame = r#"{"type":"error","messageId":"auth"}"#;
    let reply = decode_one(&mut codec, frame);
    assert_eq!(
        (reply.kind, reply.text()),
        (kind::AUTH_FAILED, frame.into())
    );
}

#[test]
fn subscribe_and_confirmation_carry_the_command_id() {
    let mut codec = ready_codec("{}");
    let sent = codec
        .encode(Op::Subscribe, 7, b"ticker.\"BTC\"", b"")
        .unwrap();
    assert_eq!(
        sent_text(&sent),
        r#"{"type":"subscribe","channel":"ticker.\"BTC\"","messageId":"s7"}"#
    );
    let confirmed = decode_one(&mut codec, r#"{"type":"subscribed","messageId":"s7"}"#);
    assert_eq!(confirmed.kind, kind::SUBSCRIBED);
    assert_eq!(confirmed.id, 7);
    assert_eq!(confirmed.channel, b"ticker.\"BTC\"", "remembered channel");

    let unsolicited = decode_one(&mut codec, r#"{"type":"subscribed","channel":"x"}"#);
    assert_eq!((unsolicited.kind, unsolicited.id), (kind::SUBSCRIBED, 0));

    let sent = codec.encode(Op::Unsubscribe, 8, b"x", b"").unwrap();
    assert_eq!(
        sent_text(&sent),
        r#"{"type":"unsubscribe","channel":"x","messageId":"u8"}"#
    );
    let done = decode_one(
        &mut codec,
        r#"{"type":"unsubscribed","channel":"x","messageId":"u8"}"#,
    );
    assert_eq!(
        (done.kind, done.id, done.channel_text()),
        (kind::UNSUBSCRIBED, 8, "x".into())
    );
}

#[test]
fn subscribe_errors_name_the_channel_and_id() {
    let mut codec = ready_codec("{}");
    codec.encode(Op::Subscribe, 3, b"nope", b"").unwrap();
    let refused = decode_one(
        &mut codec,
        r#"{"type":"error","messageId":"s3","payload":{"code":404}}"#,
    );
    assert_eq!(refused.kind, kind::SUBSCRIBE_ERROR);
    assert_eq!((refused.id, refused.channel_text()), (3, "nope".into()));
    assert_eq!(refused.text(), r#"{"code":404}"#);
}

#[test]
fn data_frames_pass_the_payload_through_verbatim() {
    let mut codec = ready_codec("{}");
    let data = decode_one(
        &mut codec,
        r#"{"type":"data","channel":"book","payload": { "b" : [[1.50, 2e3]], "s":"\u00e9" } }"#,
    );
    assert_eq!(data.kind, kind::DATA);
    assert_eq!(data.channel_text(), "book");
    assert_eq!(data.text(), r#"{ "b" : [[1.50, 2e3]], "s":"\u00e9" }"#);

    let escaped_channel = decode_one(
        &mut codec,
        r#"{"type":"data","channel":"a\/b","payload":1}"#,
    );
    assert_eq!(escaped_channel.channel_text(), "a/b");
    let no_payload = decode_one(&mut codec, r#"{"type":"data","channel":"c"}"#);
    assert_eq!(no_payload.text(), "null");
}

#[test]
fn requests_are_answered_by_their_message_id() {
    let mut codec = ready_codec("{}");
    let sent = codec
        .encode(Op::Request, 42, b"", br#"{"op":"balance"}"#)
        .unwrap();
    assert_eq!(
        sent_text(&sent),
        r#"{"type":"data","payload":{"op":"balance"},"messageId":"r42"}"#
    );
    let response = decode_one(
        &mut codec,
        r#"{"type":"data","messageId":"r42","payload":{"usd":10}}"#,
    );
    assert_eq!((response.kind, response.id), (kind::RESPONSE, 42));
    assert_eq!(response.text(), r#"{"usd":10}"#);

    let again = decode_one(
        &mut codec,
        r#"{"type":"data","messageId":"r42","payload":1}"#,
    );
    assert_eq!(again.kind, kind::MALFORMED, "answered once only");
    assert!(
        again
            .text()
            .starts_with("response to unknown request \"r42\""),
        "{}",
        again.text()
    );
}

#[test]
fn request_errors_carry_the_payload_text() {
    let mut codec = ready_codec("{}");
    codec.encode(Op::Request, 5, b"", b"[1]").unwrap();
    let failed = decode_one(
        &mut codec,
        r#"{"type":"error","messageId":"r5","payload":"insufficient \"funds\""}"#,
    );
    assert_eq!((failed.kind, failed.id), (kind::REQUEST_ERROR, 5));
    assert_eq!(failed.text(), "insufficient \"funds\"");

    let late = decode_one(
        &mut codec,
        r#"{"type":"error","messageId":"r5","payload":"x"}"#,
    );
    assert_eq!((late.kind, late.text()), (kind::ERROR, "x".into()));
}

#[test]
fn invalid_request_payloads_are_refused_without_sending() {
    let mut codec = ready_codec("{}");
    for payload in [&b""[..], b"{\"a\":", b"nope", b"{} {}"] {
        let records = codec.encode(Op::Request, 9, b"", payload).unwrap();
        assert_eq!(kinds(&records), [kind::REQUEST_ERROR], "{payload:?}");
        assert_eq!(records[0].id, 9);
        assert!(
            records[0]
                .text()
                .starts_with("request payload is not valid JSON: "),
            "{}",
            records[0].text()
        );
    }
    let answer = decode_one(&mut codec, r#"{"type":"data","messageId":"r9"}"#);
    assert_eq!(
        answer.kind,
        kind::MALFORMED,
        "a refused request is not pending"
    );
}

#[test]
fn cancelled_requests_are_forgotten() {
    let mut codec = ready_codec("{}");
    codec.encode(Op::Request, 11, b"", b"null").unwrap();
    assert!(codec.encode(Op::Cancel, 11, b"", b"").unwrap().is_empty());
    let late = decode_one(
        &mut codec,
        r#"{"type":"data","messageId":"r11","payload":1}"#,
    );
    assert_eq!(late.kind, kind::MALFORMED);
}

#[test]
fn heartbeats_ping_and_pongs_are_reported() {
    let mut codec = ready_codec("{}");
    let ping = codec.encode(Op::Heartbeat, 4, b"", b"").unwrap();
    assert_eq!(sent_text(&ping), r#"{"type":"ping","messageId":"h4"}"#);
    let pong = decode_one(&mut codec, r#"{"type":"pong","messageId":"h4"}"#);
    assert_eq!((pong.kind, pong.id), (kind::HEARTBEAT, 4));
    assert!(codec.tick(1000).unwrap().is_empty());

    let mut quiet = ready_codec(r#"{"app_heartbeat":false}"#);
    assert!(quiet.encode(Op::Heartbeat, 4, b"", b"").unwrap().is_empty());
}

#[test]
fn sequence_gaps_are_reported_per_channel() {
    let mut codec = ready_codec("{}");
    let frames: [&[u8]; 5] = [
        br#"{"type":"data","channel":"a","seq":11,"payload":1}"#,
        br#"{"type":"data","channel":"b","seq":1,"payload":1}"#,
        br#"{"type":"data","channel":"a","seq":12,"payload":2}"#,
        br#"{"type":"data","channel":"a","seq":15,"payload":3}"#,
        br#"{"type":"data","channel":"b","seq":2,"payload":2}"#,
    ];
    let records = codec.decode_text(&frames).unwrap();
    assert_eq!(
        kinds(&records),
        [
            kind::DATA,
            kind::DATA,
            kind::DATA,
            kind::SEQUENCE_GAP,
            kind::DATA,
            kind::DATA
        ]
    );
    assert_eq!(records[3].channel_text(), "a");
    assert_eq!(records[3].text(), "expected 13, got 15");

    decode_one(&mut codec, r#"{"type":"subscribed","channel":"a"}"#);
    let restarted = decode_one(&mut codec, r#"{"type":"data","channel":"a","seq":1}"#);
    assert_eq!(
        restarted.kind,
        kind::DATA,
        "a new subscription sets a new baseline"
    );

    let mut custom = ready_codec(r#"{"sequence_field":"n"}"#);
    let records = custom
        .decode_text(&[
            br#"{"type":"data","channel":"a","n":1,"seq":1}"#,
            br#"{"type":"data","channel":"a","n":3,"seq":2}"#,
        ])
        .unwrap();
    assert_eq!(
        kinds(&records),
        [kind::DATA, kind::SEQUENCE_GAP, kind::DATA]
    );
    assert_eq!(records[1].text(), "expected 2, got 3");
}

#[test]
fn sequence_tracking_matches_a_plain_table_through_switches_and_resubscriptions() {
    // Runs of one channel, switches between names that share prefixes and lengths,
    // resubscriptions (a new baseline) and jumps, checked against a plain map.
    let names = ["a", "b", "ab", "ba", "abcdefghij", "abcdefghik", ""];
    let mut codec = ready_codec("{}");
    let mut model: HashMap<String, i64> = HashMap::new();
    let mut next: HashMap<String, i64> = HashMap::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = move |below: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let mut channel = names[0];
    let mut gaps = 0;
    for _ in 0..20_000 {
        if random(8) == 0 {
            channel = names[random(names.len() as u64) as usize];
        }
        if random(100) == 0 {
            decode_one(
                &mut codec,
                &format!(r#"{{"type":"subscribed","channel":"{channel}"}}"#),
            );
            model.remove(channel);
            // A venue restarts the numbering of a new subscription.
            next.insert(channel.to_string(), 1 + random(1000) as i64);
            continue;
        }
        let counter = next.entry(channel.to_string()).or_insert(1);
        let sequence = if random(20) == 0 {
            *counter + 1 + random(3) as i64
        } else {
            *counter
        };
        *counter = sequence + 1;
        let expected = model
            .insert(channel.to_string(), sequence)
            .map(|last| last + 1);
        let frame =
            format!(r#"{{"type":"data","channel":"{channel}","seq":{sequence},"payload":0}}"#);
        let records = codec.decode_text(&[frame.as_bytes()]).unwrap();
        match expected {
            Some(expected) if expected != sequence => {
                gaps += 1;
                assert_eq!(kinds(&records), [kind::SEQUENCE_GAP, kind::DATA], "{frame}");
                assert_eq!(records[0].channel_text(), channel);
                assert_eq!(
                    records[0].text(),
                    format!("expected {expected}, got {sequence}")
                );
            }
            _ => assert_eq!(kinds(&records), [kind::DATA], "{frame}: no gap expected"),
        }
    }
    assert!(gaps > 100, "the run made only {gaps} gaps");
}

#[test]
fn at_most_max_tracked_channels_are_tracked_and_forgotten_ones_make_room() {
    let mut codec = ready_codec("{}");
    let data = |channel: usize, sequence: i64| {
        format!(r#"{{"type":"data","channel":"c{channel}","seq":{sequence},"payload":0}}"#)
    };
    for channel in 0..MAX_TRACKED_CHANNELS {
        decode_one(&mut codec, &data(channel, 1));
    }
    // One more channel is not tracked: its jumps go unreported.
    let extra = MAX_TRACKED_CHANNELS;
    decode_one(&mut codec, &data(extra, 1));
    assert_eq!(decode_one(&mut codec, &data(extra, 5)).kind, kind::DATA);
    // Tracked ones still are.
    let gap = codec.decode_text(&[data(7, 3).as_bytes()]).unwrap();
    assert_eq!(gap[0].text(), "expected 2, got 3");
    // A resubscription frees a slot, which the new channel then takes.
    decode_one(&mut codec, r#"{"type":"subscribed","channel":"c0"}"#);
    decode_one(&mut codec, &data(extra, 6));
    let gap = codec.decode_text(&[data(extra, 9).as_bytes()]).unwrap();
    assert_eq!(kinds(&gap), [kind::SEQUENCE_GAP, kind::DATA]);
    assert_eq!(gap[0].text(), "expected 7, got 9");
}

#[test]
fn shared_state_and_channel_errors() {
    let mut codec = ready_codec("{}");
    let shared = decode_one(
        &mut codec,
        r#"{"type":"shared","key":"schema","payload":{"fields":["p","q"]}}"#,
    );
    assert_eq!(shared.kind, kind::SHARED);
    assert_eq!(
        (shared.channel_text(), shared.text()),
        ("schema".into(), r#"{"fields":["p","q"]}"#.into())
    );

    let error = decode_one(
        &mut codec,
        r#"{"type":"error","channel":"c","payload":"halted"}"#,
    );
    assert_eq!(
        (error.kind, error.channel_text(), error.text()),
        (kind::ERROR, "c".into(), "halted".into())
    );
}

#[test]
fn a_reconnect_notice_asks_the_pool_to_move_with_the_venues_words() {
    let mut codec = ready_codec("{}");
    for (frame, reason) in [
        (
            r#"{"type":"reconnect","payload":"maintenance at 02:00"}"#,
            "maintenance at 02:00",
        ),
        (
            r#"{"type":"reconnect","payload":{"in_ms":500}}"#,
            r#"{"in_ms":500}"#,
        ),
        (r#"{"type":"reconnect"}"#, r#"{"type":"reconnect"}"#),
    ] {
        let notice = decode_one(&mut codec, frame);
        assert_eq!(
            (notice.kind, notice.channel_text(), notice.text()),
            (kind::RECONNECT, String::new(), reason.into()),
            "{frame}"
        );
    }
}

#[test]
fn bad_frames_are_malformed_never_fatal() {
    let mut codec = ready_codec("{}");
    let deep = "[".repeat(10_000);
    let long_garbage = "x".repeat(1000);
    let cases: [(&str, &str); 13] = [
        (
            "not json",
            "not valid JSON: expected a value at byte 0: not json",
        ),
        (
            "{\"type\":\"data\"",
            "not valid JSON: unexpected end of input at byte 14",
        ),
        ("[1,2]", "not a JSON object: [1,2]"),
        ("{}", "no string \"type\" member: {}"),
        ("{\"type\":5}", "no string \"type\" member"),
        (
            "{\"type\":\"data\",\"channel\":1}",
            "\"channel\" is not a string",
        ),
        (
            "{\"type\":\"data\",\"channel\":\"c\",\"messageId\":7}",
            "\"messageId\" is not a string",
        ),
        (
            "{\"type\":\"data\",\"payload\":1}",
            "data frame without \"channel\" or \"messageId\"",
        ),
        (
            "{\"type\":\"subscribed\"}",
            "confirmation without \"channel\"",
        ),
        (
            "{\"type\":\"shared\",\"payload\":1}",
            "shared frame without a string \"key\"",
        ),
        (
            "{\"type\":\"hello\"}",
            "unknown type \"hello\": {\"type\":\"hello\"}",
        ),
        (
            &deep,
            "not valid JSON: nested deeper than 128 levels at byte 128: [[[[",
        ),
        (
            &long_garbage,
            "not valid JSON: expected a value at byte 0: xxxx",
        ),
    ];
    for (frame, reason) in cases {
        let record = decode_one(&mut codec, frame);
        assert_eq!(record.kind, kind::MALFORMED, "{frame:?}");
        assert!(
            record.text().starts_with(reason),
            "{frame:?}: {}",
            record.text()
        );
        assert!(
            record.text().len() < 300,
            "reason stays short: {}",
            record.text()
        );
    }
    let binary = codec
        .decode([Frame {
            body: b"\x00\x01",
            binary: true,
        }])
        .unwrap();
    assert_eq!(kinds(&binary), [kind::MALFORMED]);
}

#[test]
fn a_batch_yields_records_in_frame_order() {
    let mut codec = ready_codec("{}");
    let records = codec
        .decode_text(&[
            br#"{"type":"data","channel":"a","payload":1}"#,
            b"garbage",
            br#"{"type":"pong"}"#,
        ])
        .unwrap();
    assert_eq!(
        kinds(&records),
        [kind::DATA, kind::MALFORMED, kind::HEARTBEAT]
    );
}

#[test]
fn fast_path_reads_the_usual_data_frame_and_declines_the_rest() {
    let seq = Some(&b"seq"[..]);
    let frame = br#"{"type":"data","channel":"c0","seq":-7,"payload":{"a":[1,"x"]}}"#;
    let data = usual_data_frame(frame, seq).expect("the usual shape");
    assert_eq!(data.channel, b"c0");
    assert_eq!(data.sequence, Some(-7));
    assert_eq!(data.payload, br#"{"a":[1,"x"]}"#);
    let without_seq = br#"{"type":"data","channel":"c0","payload":1}"#;
    let data = usual_data_frame(without_seq, seq).expect("no sequence member");
    assert_eq!((data.sequence, data.payload), (None, &b"1"[..]));
    for other in [
        &br#"{"type":"data", "channel":"c0","payload":1}"#[..],
        br#"{"channel":"c0","type":"data","payload":1}"#,
        br#"{"type":"data","channel":"c\u0030","payload":1}"#,
        br#"{"type":"data","channel":"c0","seq":1.5,"payload":1}"#,
        br#"{"type":"data","channel":"c0","payload":1,"messageId":"r1"}"#,
        br#"{"type":"data","channel":"c0","payload":{"a":}}"#,
        br#"{"type":"data","channel":"c0","payload":1 }"#,
    ] {
        assert!(
            usual_data_frame(other, seq).is_none(),
            "{}",
            String::from_utf8_lossy(other)
        );
    }
}

/// Decodes each frame (one call each) with the fast path as `init` set it and with the
/// general path only; both must emit the same records, in the same order, and keep the
/// same sequence state.
fn assert_paths_agree(config: &str, frames: &[Vec<u8>]) -> usize {
    let mut fast = ready_codec(config);
    let mut general = ready_codec(config);
    general.codec.fast_path = false;
    let mut taken = 0;
    let field = fast.codec.options.sequence_field.clone();
    for frame in frames {
        if fast.codec.fast_path && usual_data_frame(frame, field.as_deref()).is_some() {
            taken += 1;
        }
        let by_fast = fast.decode_text(&[frame]).expect("decode never fails");
        let by_general = general.decode_text(&[frame]).expect("decode never fails");
        assert_eq!(
            by_fast,
            by_general,
            "config {config}, frame {:?}",
            String::from_utf8_lossy(frame)
        );
    }
    taken
}

fn usual_frames() -> Vec<Vec<u8>> {
    let channels = [
        r#""c0""#,
        r#""""#,
        r#""trades.BTC-USD""#,
        r#""a b~\u007f""#,
        r#""ch\u0030""#,
        r#""é""#,
        r#""x\"y""#,
    ];
    let sequences = [
        None,
        Some("1"),
        Some("2"),
        Some("0"),
        Some("-1"),
        Some("-0"),
        Some("01"),
        Some("1.5"),
        Some("1e3"),
        Some("123456789012345678"),
        Some("1234567890123456789"),
        Some("99999999999999999999"),
        Some(r#""5""#),
        Some("null"),
        Some("-"),
    ];
    let payloads = [
        r#"{"ts_ns":1,"pad":"xx"}"#,
        "[]",
        r#"[1,2,{"a":null}]"#,
        r#""s""#,
        r#""esc\n\u00e9""#,
        "1",
        "-2.5e3",
        "true",
        "null",
        "{}",
        r#"{"a":}"#,
        "{",
        "[1,]",
        "nul",
        r#""unterminated"#,
        " 1",
        "1 ",
        r#"{"a":1}}"#,
        r#"{"a":1},"x":2"#,
        r#"1,"seq":9"#,
        "",
    ];
    let mut frames = Vec::new();
    for channel in channels {
        for sequence in sequences {
            for payload in payloads {
                let seq = sequence.map_or(String::new(), |value| format!(r#","seq":{value}"#));
                frames.push(
                    format!(r#"{{"type":"data","channel":{channel}{seq},"payload":{payload}}}"#)
                        .into_bytes(),
                );
            }
        }
    }
    frames
}

#[test]
fn fast_path_agrees_with_the_general_path_on_usual_frames_and_their_cousins() {
    let frames = usual_frames();
    for config in [
        "{}",
        r#"{"sequence_field":"n"}"#,
        r#"{"sequence_field":null}"#,
        r#"{"sequence_field":"payload"}"#,
        r#"{"sequence_field":"channel"}"#,
    ] {
        assert_paths_agree(config, &frames);
    }
    // And the fast path does take the usual ones.
    assert!(assert_paths_agree("{}", &frames) >= 200);
}

#[test]
fn fast_path_agrees_with_the_general_path_on_every_truncation_and_byte_change() {
    let bases = [
        &br#"{"type":"data","channel":"c0","seq":41,"payload":{"ts_ns":17,"pad":"xy"}}"#[..],
        br#"{"type":"data","channel":"c0","payload":[1,"a",null]}"#,
    ];
    let replacements = [
        b'"', b'\\', b' ', b'}', b'{', b',', b':', b'0', b'9', b'-', b'.', b'a', 0x00, 0x1f, 0x7f,
        0xc3, 0xff,
    ];
    for base in bases {
        let mut frames = Vec::new();
        // A good frame first, so sequence state exists for the mutations to disturb.
        frames.push(base.to_vec());
        for end in 0..base.len() {
            frames.push(base[..end].to_vec());
        }
        for at in 0..base.len() {
            for &byte in &replacements {
                let mut changed = base.to_vec();
                changed[at] = byte;
                frames.push(changed);
                // Inserted, too.
                let mut inserted = base.to_vec();
                inserted.insert(at, byte);
                frames.push(inserted);
            }
        }
        assert_paths_agree("{}", &frames);
        assert_paths_agree(r#"{"sequence_field":"seq"}"#, &frames);
    }
}

/// Host-side speed of the data path: `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_decode_speed() {
    let mut codec = ready_codec("{}");
    let frame = br#"{"type":"data","channel":"trades.BTC-USD","seq":1,"payload":{"id":123456789,"price":"64123.50","size":"0.0125","side":"buy","ts":1700000000123}}"#;
    let mut frames = Vec::new();
    for seq in 0..1024 {
        let text =
            String::from_utf8_lossy(frame).replace("\"seq\":1", &format!("\"seq\":{}", seq + 1));
        frames.push(text.into_bytes());
    }
    let count = codec.set_batch(frames.iter().map(|body| Frame {
        body,
        binary: false,
    }));
    let rounds = 2000;
    let start = std::time::Instant::now();
    let mut bytes = 0;
    for _ in 0..rounds {
        bytes += codec.decode_batch(count).unwrap();
    }
    let elapsed = start.elapsed();
    let messages = f64::from(count) * rounds as f64;
    println!(
        "decoded {messages} frames of {} bytes in {elapsed:?}: {:.2} M msgs/s, {:.0} MB/s in, {bytes} bytes out",
        frame.len(),
        messages / elapsed.as_secs_f64() / 1e6,
        messages * frame.len() as f64 / elapsed.as_secs_f64() / 1e6,
    );
}

/// The kinds of the records as the codec wrote them (`DATA_IN_INPUT` unresolved).
fn written_kinds(codec: &Harness<JsonCodec>) -> Vec<u32> {
    let bytes = codec.output_bytes();
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut kinds = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        kinds.push(word(at));
        at += 24 + (word(at + 4) + word(at + 8)) as usize;
    }
    kinds
}

#[test]
fn data_points_into_the_frames_only_for_an_engine_that_understands_it() {
    let frames: [&[u8]; 4] = [
        br#"{"type":"data","channel":"a","seq":1,"payload":{"p":1}}"#,
        br#"{"payload":"x\"y","type":"data","channel":"b\u00e9"}"#,
        br#"{"type":"data","channel":"c"}"#,
        b"nonsense",
    ];
    let mut decoded = Vec::new();
    for (features, data_kind) in [
        (wirepool_sdk::feature::ALL, kind::DATA_IN_INPUT),
        (0, kind::DATA),
    ] {
        let (mut codec, _) =
            Harness::<JsonCodec>::init_with_features(features, b"", b"").expect("init");
        codec.open().expect("open");
        let records = codec.decode_text(&frames).expect("decode");
        // `null` for the frame without a payload is not in the frame: copied.
        assert_eq!(
            written_kinds(&codec),
            [data_kind, data_kind, kind::DATA, kind::MALFORMED],
            "features {features}"
        );
        decoded.push(records);
    }
    assert_eq!(decoded[0], decoded[1], "the same records either way");
    let data: Vec<(String, String)> = decoded[0][..3]
        .iter()
        .map(|record| {
            (
                String::from_utf8_lossy(&record.channel).into_owned(),
                record.text(),
            )
        })
        .collect();
    assert_eq!(
        data,
        [
            ("a".into(), r#"{"p":1}"#.into()),
            ("bé".into(), r#""x\"y""#.into()),
            ("c".into(), "null".into())
        ]
    );
}
