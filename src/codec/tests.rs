//! The built-in codecs through the host, without any network.

use super::*;
use crate::config::CodecConfig;

fn runtime(builtin: BuiltinCodec, token: Option<&str>) -> CodecRuntime {
    let config = CodecConfig {
        builtin,
        ..CodecConfig::default()
    };
    CodecRuntime::load(&CodecSource::Builtin(builtin), &config, token).expect("builtin codec loads")
}

fn owned(records: Records<'_>) -> Vec<(u32, i64, String, String)> {
    records
        .iter()
        .map(|record| {
            (
                record.kind,
                record.id,
                String::from_utf8_lossy(record.channel).into_owned(),
                String::from_utf8_lossy(record.payload).into_owned(),
            )
        })
        .collect()
}

#[test]
fn json_codec_is_ready_at_open_without_a_token() {
    let runtime = runtime(BuiltinCodec::Json, None);
    let mut instance = runtime.instantiate(1).expect("instance");
    let records = owned(instance.open().expect("open"));
    assert_eq!(
        records,
        vec![(kind::READY, 0, String::new(), String::new())]
    );
}

#[test]
fn json_codec_authenticates_first_when_a_token_is_set() {
    let runtime = runtime(BuiltinCodec::Json, Some("s3cret\"x"));
    let mut instance = runtime.instantiate(1).expect("instance");
    let records = owned(instance.open().expect("open"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0, kind::SEND_TEXT);
    let frame: serde_json::Value = serde_json::from_str(&records[0].3).expect("auth frame is JSON");
    assert_eq!(frame["type"], "auth");
    assert_eq!(frame["token"], "s3cret\"x");
    let message_id = frame["messageId"].as_str().expect("messageId").to_string();
    let mut frames = FrameBatch::default();
    let reply = format!(r#"{{"type":"data","messageId":"{message_id}","payload":{{"ok":true}}}}"#);
    frames.push(reply.as_bytes(), false);
    let records = owned(instance.decode(&frames).expect("decode"));
    assert_eq!(records[0].0, kind::READY, "{records:?}");
}

#[test]
fn json_codec_round_trip_of_subscribe_data_and_request() {
    let runtime = runtime(BuiltinCodec::Json, None);
    let mut instance = runtime.instantiate(1).expect("instance");
    instance.open().expect("open");
    let records = owned(
        instance
            .encode(op::SUBSCRIBE, 7, b"ticker.1", b"")
            .expect("encode"),
    );
    let frame: serde_json::Value = serde_json::from_str(&records[0].3).expect("JSON");
    assert_eq!(frame["type"], "subscribe");
    assert_eq!(frame["channel"], "ticker.1");

    let records = owned(
        instance
            .encode(op::REQUEST, 42, b"", br#"{"op":"x"}"#)
            .expect("encode"),
    );
    let frame: serde_json::Value = serde_json::from_str(&records[0].3).expect("JSON");
    assert_eq!(frame["type"], "data");
    assert_eq!(frame["payload"], serde_json::json!({"op": "x"}));
    let request_message_id = frame["messageId"].as_str().expect("id").to_string();

    let mut frames = FrameBatch::default();
    frames.push(
        br#"{"type":"subscribed","channel":"ticker.1","messageId":"s7"}"#,
        false,
    );
    frames.push(
        br#"{"type":"data","channel":"ticker.1","seq":1,"payload":{"p": 1.5}}"#,
        false,
    );
    frames.push(
        br#"{"type":"data","channel":"ticker.1","seq":3,"payload":[1,2]}"#,
        false,
    );
    let reply =
        format!(r#"{{"type":"data","messageId":"{request_message_id}","payload":{{"r":1}}}}"#);
    frames.push(reply.as_bytes(), false);
    frames.push(b"not json at all", false);
    let records = owned(instance.decode(&frames).expect("decode"));
    let kinds: Vec<u32> = records.iter().map(|record| record.0).collect();
    assert!(kinds.contains(&kind::SUBSCRIBED), "{records:?}");
    let data: Vec<&(u32, i64, String, String)> = records
        .iter()
        .filter(|record| record.0 == kind::DATA)
        .collect();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0].2, "ticker.1");
    assert_eq!(data[0].3, r#"{"p": 1.5}"#, "payload kept verbatim");
    assert!(kinds.contains(&kind::SEQUENCE_GAP), "{records:?}");
    let response = records
        .iter()
        .find(|record| record.0 == kind::RESPONSE)
        .expect("response");
    assert_eq!((response.1, response.3.as_str()), (42, r#"{"r":1}"#));
    assert!(kinds.contains(&kind::MALFORMED), "{records:?}");
}

#[test]
fn raw_codec_passes_frames_through() {
    let runtime = runtime(BuiltinCodec::Raw, None);
    let mut instance = runtime.instantiate(1).expect("instance");
    assert_eq!(owned(instance.open().expect("open"))[0].0, kind::READY);
    let mut frames = FrameBatch::default();
    frames.push(b"\x00\x01binary", true);
    frames.push(b"text", false);
    let records = owned(instance.decode(&frames).expect("decode"));
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|record| record.0 == kind::DATA && record.2 == "raw"));
    assert_eq!(records[1].3, "text");
}

/// The raw codec's module with a custom section appended: the same code, bytes of
/// their own, so a test gets a compiled-module cache entry no other test shares.
fn raw_module_tagged(tag: &str) -> Vec<u8> {
    let mut bytes = builtin::module_bytes(BuiltinCodec::Raw).to_vec();
    let name = tag.as_bytes();
    bytes.push(0); // custom section
    bytes.push(u8::try_from(name.len() + 1).expect("short tag"));
    bytes.push(u8::try_from(name.len()).expect("short tag"));
    bytes.extend_from_slice(name);
    bytes
}

fn load_bytes(bytes: &[u8], max_memory_mb: usize) -> CodecRuntime {
    let limits = CodecLimits {
        max_call: Duration::from_millis(100),
        max_memory_bytes: max_memory_mb << 20,
    };
    CodecRuntime::from_bytes(
        bytes,
        "tagged raw codec",
        limits,
        b"null".to_vec(),
        Vec::new(),
    )
    .expect("loads")
}

#[test]
fn pools_loading_one_codec_share_its_compiled_module_and_ticker() {
    let bytes = raw_module_tagged("wirepool-test-shared-module");
    // Memory limits belong to each instance's store, not to the compiled module.
    let first = load_bytes(&bytes, 13);
    let second = load_bytes(&bytes, 14);
    assert!(
        Arc::ptr_eq(&first._ticker, &second._ticker),
        "one engine, one epoch ticker"
    );
    assert!(Engine::same(&first.engine, &second.engine), "compiled once");
    let ticker = Arc::downgrade(&first._ticker);
    // Both instances still work, each with its own store.
    let mut a = first.instantiate(1).expect("instance");
    let mut b = second.instantiate(2).expect("instance");
    assert_eq!(owned(a.open().expect("open"))[0].0, kind::READY);
    assert_eq!(owned(b.open().expect("open"))[0].0, kind::READY);
    drop((a, b, first, second));
    assert!(
        ticker.upgrade().is_none(),
        "the ticker thread stops with the last pool using the engine"
    );
    // Other bytes are another module.
    let third = load_bytes(&bytes, 13);
    let fourth = load_bytes(&raw_module_tagged("wirepool-test-other-module"), 13);
    assert!(!Engine::same(&third.engine, &fourth.engine));
}
