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
            let record = record.expect("well-formed records");
            (
                record.kind,
                record.id,
                String::from_utf8_lossy(record.channel).into_owned(),
                String::from_utf8_lossy(record.payload).into_owned(),
            )
        })
        .collect()
}

/// Lays `frames` out in the codec's input buffer, as a worker does, and decodes them
/// in one call.
fn decode_frames(
    instance: &mut CodecInstance,
    frames: &[(&[u8], bool)],
) -> Vec<(u32, i64, String, String)> {
    let total = frames.iter().map(|(body, _)| 8 + body.len()).sum();
    let mut batch = FrameBatch::with_goal(total);
    for (body, binary) in frames {
        assert!(instance
            .add_frame(&mut batch, body, *binary)
            .expect("add_frame"));
    }
    owned(instance.decode(&mut batch).expect("decode"))
}

/// The kinds of the last call's records as the codec wrote them (before the engine
/// resolves `DATA_IN_INPUT` into `DATA`).
fn written_kinds(instance: &mut CodecInstance) -> Vec<u32> {
    let packed = instance
        .output
        .call(&mut instance.store, ())
        .expect("wirepool_output") as u64;
    let (ptr, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    let bytes = &instance.memory.data(&instance.store)[ptr..ptr + len];
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let mut kinds = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let kind = word(at);
        kinds.push(kind);
        at += 24 + (word(at + 4) + word(at + 8)) as usize;
    }
    kinds
}

/// The built-in codecs are told the engine understands `DATA_IN_INPUT` and point their
/// data records into the frames (no copy in the codec), on the json codec's fast path
/// and its general path alike; a payload that is not in the frame (json's `null` for a
/// data frame without one) is copied.
#[test]
fn builtin_codecs_point_data_records_into_their_input() {
    let json = runtime(BuiltinCodec::Json, None);
    let mut instance = json.instantiate(1).expect("instance");
    instance.open().expect("open");
    let frames: [(&[u8], bool); 3] = [
        (
            br#"{"type":"data","channel":"a","seq":1,"payload":{"p":1}}"#,
            false,
        ),
        (
            br#"{ "payload" : [1, 2] , "channel":"b\u0062", "type":"data" }"#,
            false,
        ),
        (br#"{"type":"data","channel":"c"}"#, false),
    ];
    let records = decode_frames(&mut instance, &frames);
    let data = |channel: &str, payload: &str| (kind::DATA, 0, channel.into(), payload.into());
    assert_eq!(
        records,
        [
            data("a", r#"{"p":1}"#),
            data("bb", "[1, 2]"),
            data("c", "null")
        ]
    );
    assert_eq!(
        written_kinds(&mut instance),
        [kind::DATA_IN_INPUT, kind::DATA_IN_INPUT, kind::DATA]
    );

    let raw = runtime(BuiltinCodec::Raw, None);
    let mut instance = raw.instantiate(1).expect("instance");
    instance.open().expect("open");
    let records = decode_frames(&mut instance, &[(b"one", false), (b"\x00\x01", true)]);
    assert_eq!(records, [data("raw", "one"), data("raw", "\u{0}\u{1}")]);
    assert_eq!(
        written_kinds(&mut instance),
        [kind::DATA_IN_INPUT, kind::DATA_IN_INPUT]
    );
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
    let reply = format!(r#"{{"type":"data","messageId":"{message_id}","payload":{{"ok":true}}}}"#);
    let records = decode_frames(&mut instance, &[(reply.as_bytes(), false)]);
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

    let reply =
        format!(r#"{{"type":"data","messageId":"{request_message_id}","payload":{{"r":1}}}}"#);
    let records = decode_frames(
        &mut instance,
        &[
            (
                br#"{"type":"subscribed","channel":"ticker.1","messageId":"s7"}"#,
                false,
            ),
            (
                br#"{"type":"data","channel":"ticker.1","seq":1,"payload":{"p": 1.5}}"#,
                false,
            ),
            (
                br#"{"type":"data","channel":"ticker.1","seq":3,"payload":[1,2]}"#,
                false,
            ),
            (reply.as_bytes(), false),
            (b"not json at all", false),
        ],
    );
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
    let records = decode_frames(
        &mut instance,
        &[(b"\x00\x01binary", true), (b"text", false)],
    );
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
        max_call: Some(Duration::from_millis(100)),
        max_memory_bytes: max_memory_mb << 20,
    };
    CodecRuntime::from_bytes(
        bytes,
        None,
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
    let (Some(first_ticker), Some(second_ticker)) = (&first._ticker, &second._ticker) else {
        panic!("a codec with a time budget has an epoch ticker");
    };
    assert!(
        Arc::ptr_eq(first_ticker, second_ticker),
        "one engine, one epoch ticker"
    );
    assert!(Engine::same(&first.engine, &second.engine), "compiled once");
    let ticker = Arc::downgrade(first_ticker);
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

/// The built-ins have no time budget by default: no epoch checks in their code (the
/// artifact build.rs made, where there is one) and no ticker thread. Asked for one,
/// they are compiled with the checks, apart from the unchecked module, and work alike.
#[test]
fn built_in_codecs_run_without_a_time_budget_unless_one_is_configured() {
    for builtin in [BuiltinCodec::Json, BuiltinCodec::Raw] {
        let unbudgeted = runtime(builtin, None);
        assert!(unbudgeted._ticker.is_none(), "{builtin:?}: no ticker");
        assert_eq!(unbudgeted.limits.max_call, None);
        // The artifact, where it fits this machine, is what a pool without a budget
        // gets (a wrong kind would be refused by wasmtime and compiled instead).
        let engine = Engine::new(&engine_config::engine_config(false)).expect("engine");
        let fits = builtin::precompiled(builtin)
            .is_some_and(|artifact| deserialize(&engine, artifact).is_ok());
        assert_eq!(unbudgeted.from_artifact, fits, "{builtin:?}");
        let config = CodecConfig {
            builtin,
            max_call_ms: Some(40),
            ..CodecConfig::default()
        };
        let budgeted =
            CodecRuntime::load(&CodecSource::Builtin(builtin), &config, None).expect("loads");
        assert!(budgeted._ticker.is_some(), "{builtin:?}: a ticker");
        assert_eq!(budgeted.limits.max_call, Some(Duration::from_millis(40)));
        assert!(
            !budgeted.from_artifact,
            "{builtin:?}: compiled with the checks"
        );
        assert!(
            !Engine::same(&unbudgeted.engine, &budgeted.engine),
            "{builtin:?}: compiled apart (the cache tells them apart)"
        );
        for runtime in [&unbudgeted, &budgeted] {
            let mut instance = runtime.instantiate(1).expect("instance");
            assert_eq!(owned(instance.open().expect("open"))[0].0, kind::READY);
            let records = decode_data_frames(&mut instance, 3);
            let data = records
                .iter()
                .filter(|record| record.0 == kind::DATA)
                .count();
            assert_eq!(data, 3, "{builtin:?}: {records:?}");
        }
    }
}

/// A built-in codec given a budget is stopped by it: the json codec validating a
/// 32 MiB payload (about 0.1 s here, and the same call finishes without a budget) is
/// stopped by a 1 ms budget.
#[test]
fn a_built_in_codec_given_a_budget_is_stopped_by_it() {
    let mut frame = br#"{"type":"data","channel":"c0","payload":["#.to_vec();
    frame.extend(std::iter::repeat_n(&b"1,"[..], 16 << 20).flatten());
    frame.extend_from_slice(b"1]}");
    let decode = |max_call_ms| {
        let config = CodecConfig {
            max_call_ms,
            max_memory_mb: 256,
            ..CodecConfig::default()
        };
        let runtime = CodecRuntime::load(&CodecSource::Builtin(BuiltinCodec::Json), &config, None)
            .expect("loads");
        let mut instance = runtime.instantiate(1).expect("instance");
        instance.open().expect("open");
        let mut batch = FrameBatch::with_goal(frame.len() + 64);
        assert!(instance.add_frame(&mut batch, &frame, false).expect("add"));
        instance.decode(&mut batch).map(|records| {
            owned(records)
                .iter()
                .map(|record| (record.0, record.3.len()))
                .collect::<Vec<_>>()
        })
    };
    let stopped = decode(Some(1)).expect_err("a 1 ms budget stops it");
    assert!(
        stopped
            .to_string()
            .contains("ran longer than its 1 ms budget"),
        "{stopped}"
    );
    let payload = frame.len() - br#"{"type":"data","channel":"c0","payload":}"#.len();
    assert_eq!(
        decode(None).expect("no budget: it runs to its end"),
        [(kind::DATA, payload)]
    );
}

/// `max_call_ms: 0` is no budget: a decode that runs a long while (2^30 turns of a
/// loop, over a second here) ends normally with its record, where a 10 ms budget stops
/// the very same call.
#[test]
fn a_codec_without_a_time_budget_finishes_a_call_a_budget_would_stop() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/codecs/endless_loop.wat"
    ))
    .expect("endless_loop.wat");
    let (global, endless) = (
        "(global $input i32 (i32.const 0x10000))",
        "(loop $forever (br $forever))",
    );
    assert!(source.contains(global) && source.contains(endless));
    let long = source
        .replace(
            global,
            &format!("{global} (global $turns (mut i64) (i64.const 0))"),
        )
        .replace(
            endless,
            "(global.set $turns (i64.const 0)) \
             (loop $turn \
               (global.set $turns (i64.add (global.get $turns) (i64.const 1))) \
               (br_if $turn (i64.lt_u (global.get $turns) (i64.const 0x40000000))))",
        );
    let wasm = wat::parse_str(&long).expect("valid WAT");
    let path =
        std::env::temp_dir().join(format!("wirepool-long-decode-{}.wasm", std::process::id()));
    std::fs::write(&path, wasm).expect("write");
    let path = path.to_str().expect("UTF-8 path").to_string();
    let decode_long = |max_call_ms| {
        let config = CodecConfig {
            path: Some(path.clone()),
            max_call_ms: Some(max_call_ms),
            ..CodecConfig::default()
        };
        let runtime =
            CodecRuntime::load(&CodecSource::File(path.clone()), &config, None).expect("loads");
        let mut instance = runtime.instantiate(1).expect("instance");
        instance.open().expect("open");
        let mut batch = FrameBatch::with_goal(64);
        assert!(instance
            .add_frame(&mut batch, b"X marks a long call", false)
            .expect("add"));
        instance.decode(&mut batch).map(|records| owned(records))
    };
    let stopped = decode_long(10).expect_err("a 10 ms budget stops it");
    assert!(
        stopped
            .to_string()
            .contains("ran longer than its 10 ms budget"),
        "{stopped}"
    );
    let records = decode_long(0).expect("no budget: the call runs to its end");
    assert_eq!(
        records,
        [(
            kind::DATA,
            0,
            "t".to_string(),
            "X marks a long call".to_string()
        )]
    );
    let _ = std::fs::remove_file(&path);
}

/// Resident pages of the codec memory's byte range `range` (whole pages), by mincore.
fn resident_pages(instance: &mut CodecInstance, range: std::ops::Range<usize>) -> usize {
    let base = instance.memory.data_mut(&mut instance.store).as_mut_ptr() as usize;
    let pages = (range.end - range.start) / crate::connection::page_size();
    let mut flags = vec![0u8; pages];
    // SAFETY: the range lies inside the codec's memory mapping (checked by the caller
    // against its size) and `flags` has a byte per page.
    let rc = unsafe {
        libc::mincore(
            (base + range.start) as *mut libc::c_void,
            range.end - range.start,
            flags.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    flags.iter().filter(|flag| **flag & 1 == 1).count()
}

/// `count` data frames of channel c0, sequence numbers from 1, decoded in one call.
fn decode_data_frames(
    instance: &mut CodecInstance,
    count: usize,
) -> Vec<(u32, i64, String, String)> {
    let frames: Vec<String> = (1..=count)
        .map(|seq| {
            format!(
                r#"{{"type":"data","channel":"c0","seq":{seq},"payload":{{"px":{seq}.5,"nested":[{{"a":[1,2,{{"b":"x"}}]}}]}}}}"#
            )
        })
        .collect();
    let frames: Vec<(&[u8], bool)> = frames
        .iter()
        .map(|frame| (frame.as_bytes(), false))
        .collect();
    decode_frames(instance, &frames)
}

#[test]
fn an_idle_codec_gives_its_shadow_stack_back_and_carries_on() {
    for builtin in [BuiltinCodec::Json, BuiltinCodec::Raw] {
        let runtime = runtime(builtin, None);
        let mut instance = runtime.instantiate(1).expect("instance");
        let stack = instance
            .stack
            .clone()
            .expect("the built-in codecs declare their shadow stack");
        assert!(stack.end <= instance.memory.data_size(&instance.store));
        instance.open().expect("open");
        let first = decode_data_frames(&mut instance, 50);
        let touched = resident_pages(&mut instance, stack.clone());
        assert!(
            touched >= 1,
            "{builtin:?}: a call touches the top of its stack"
        );

        instance.release_stack();
        assert_eq!(
            resident_pages(&mut instance, stack.clone()),
            0,
            "{builtin:?}: every page of the stack is given back"
        );
        // The codec's state lives elsewhere: the same frames again decode the same way
        // for raw, and for json the sequence numbers carry on from where they were.
        let again = decode_data_frames(&mut instance, 50);
        let data = |records: &[(u32, i64, String, String)]| {
            records
                .iter()
                .filter(|record| record.0 == kind::DATA)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(data(&first).len(), 50, "{builtin:?}: {first:?}");
        assert_eq!(data(&first), data(&again), "{builtin:?}");
        if builtin == BuiltinCodec::Json {
            let kinds: Vec<u32> = again.iter().map(|record| record.0).collect();
            assert!(
                kinds.contains(&kind::SEQUENCE_GAP),
                "json still knows the last sequence number (50, then 1 again): {again:?}"
            );
        } else {
            assert_eq!(first, again);
        }
        let more = owned(
            instance
                .encode(op::SUBSCRIBE, 9, b"c9", b"")
                .expect("encode after release"),
        );
        assert_eq!(more.len(), 1, "{builtin:?}: {more:?}");

        // Nothing ran since: nothing to give back, and nothing is.
        instance.release_stack();
        assert!(!instance.stack_used);
        let touched = resident_pages(&mut instance, stack.clone());
        instance.release_stack();
        assert_eq!(resident_pages(&mut instance, stack.clone()), touched);
    }
}

/// A module with a memory of `pages` wasm pages and the given globals (WAT text).
fn module_with(globals: &str, pages: u32) -> (Engine, Module) {
    let wat = format!(r#"(module (memory (export "memory") {pages}) {globals})"#);
    let engine = Engine::default();
    let bytes = wat::parse_str(wat).expect("valid WAT");
    let module = Module::new(&engine, bytes).expect("valid module");
    (engine, module)
}

#[test]
fn a_declared_shadow_stack_must_be_two_immutable_i32_globals() {
    let low = r#"(global (export "__stack_low") i32 (i32.const 0))"#;
    let high = r#"(global (export "__stack_high") i32 (i32.const 0x10000))"#;
    let (_, module) = module_with(&format!("{low} {high}"), 2);
    check_stack_exports(&module).expect("both, immutable i32");
    let (_, module) = module_with("", 2);
    check_stack_exports(&module).expect("neither");

    let (_, module) = module_with(low, 2);
    let text = check_stack_exports(&module).expect_err("one without the other");
    assert!(
        text.contains("exports __stack_low but not __stack_high"),
        "{text}"
    );
    let (_, module) = module_with(high, 2);
    let text = check_stack_exports(&module).expect_err("one without the other");
    assert!(
        text.contains("exports __stack_high but not __stack_low"),
        "{text}"
    );

    let mutable = r#"(global (export "__stack_high") (mut i32) (i32.const 0x10000))"#;
    let (_, module) = module_with(&format!("{low} {mutable}"), 2);
    let text = check_stack_exports(&module).expect_err("mutable");
    assert!(
        text.contains(
            "export __stack_high is a mutable i32 global, expected an immutable i32 global"
        ),
        "{text}"
    );
    let wide = r#"(global (export "__stack_low") i64 (i64.const 0))"#;
    let (_, module) = module_with(&format!("{wide} {high}"), 2);
    let text = check_stack_exports(&module).expect_err("i64");
    assert!(
        text.contains(
            "export __stack_low is an immutable i64 global, expected an immutable i32 global"
        ),
        "{text}"
    );
    let function = r#"(func (export "__stack_low"))"#;
    let (_, module) = module_with(&format!("{function} {high}"), 2);
    let text = check_stack_exports(&module).expect_err("a function");
    assert!(
        text.contains("export __stack_low is a function () -> ()"),
        "{text}"
    );
}

/// The stack range `shadow_stack` reads from an instance of a module with these bounds.
fn stack_of(
    low: u32,
    high: u32,
    pages: u32,
) -> std::result::Result<Option<std::ops::Range<usize>>, String> {
    let globals = format!(
        r#"(global (export "__stack_low") i32 (i32.const {low})) (global (export "__stack_high") i32 (i32.const {high}))"#
    );
    let (engine, module) = module_with(&globals, pages);
    let mut store = Store::new(
        &engine,
        HostState {
            limits: StoreLimitsBuilder::new().build(),
            connection_id: 0,
        },
    );
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
    let memory = instance.get_memory(&mut store, "memory").expect("memory");
    shadow_stack(&instance, &mut store, &memory)
}

#[test]
fn a_shadow_stack_is_released_in_whole_pages_inside_the_memory() {
    let text = stack_of(0x2000, 0x1000, 1).expect_err("inverted");
    assert!(
        text.contains("__stack_low (0x2000) and __stack_high (0x1000) are not a range"),
        "{text}"
    );
    let text = stack_of(0, 0x20000, 1).expect_err("past the memory");
    assert!(text.contains("inside its memory (0x10000 bytes)"), "{text}");
    if crate::connection::page_size() != 4096 {
        eprintln!("the ranges below are for 4 KiB pages: not checked here");
        return;
    }
    assert_eq!(stack_of(0, 0x10000, 1), Ok(Some(0..0x10000)));
    // Partial pages at either end are kept: they may hold other data.
    assert_eq!(stack_of(100, 0xf800, 1), Ok(Some(0x1000..0xf000)));
    assert_eq!(stack_of(0x1100, 0x1f00, 1), Ok(None), "less than a page");
}

#[test]
fn built_in_codecs_load_precompiled_on_the_machine_they_were_built_on() {
    for builtin in [BuiltinCodec::Json, BuiltinCodec::Raw] {
        let bytes = builtin::module_bytes(builtin);
        let Some(artifact) = builtin::precompiled(builtin) else {
            assert!(
                !builtin::NOT_PRECOMPILED.is_empty(),
                "build.rs says why it precompiled nothing"
            );
            eprintln!("not checked: {}", builtin::NOT_PRECOMPILED);
            continue;
        };
        assert!(builtin::NOT_PRECOMPILED.is_empty());
        let engine = Engine::new(&engine_config::engine_config(false)).expect("engine");
        if let Err(err) = deserialize(&engine, artifact) {
            // A target directory built on another CPU: wasmtime refuses code that
            // uses features this one lacks (the pool compiles instead; tested below).
            let text = format!("{err:#}");
            assert!(
                text.contains("not available on the host"),
                "{builtin:?}: {text}"
            );
            eprintln!("not checked: built for another CPU: {text}");
            continue;
        }
        // Straight from the artifact (not the process's cache, which another test
        // may have filled by compiling the same bytes).
        let compiled = Compiled::load(bytes, "built-in", Some(artifact), false).expect("loads");
        assert!(compiled.from_artifact, "{builtin:?}");
        // And the runtime a pool gets works like a compiled one.
        let runtime = runtime(builtin, None);
        let mut instance = runtime.instantiate(1).expect("instance");
        assert_eq!(owned(instance.open().expect("open"))[0].0, kind::READY);
        let records = decode_data_frames(&mut instance, 3);
        assert_eq!(
            records
                .iter()
                .filter(|record| record.0 == kind::DATA)
                .count(),
            3,
            "{builtin:?}: {records:?}"
        );
    }
}

#[test]
fn an_artifact_made_for_another_configuration_is_refused_and_the_module_compiled() {
    let bytes = builtin::module_bytes(BuiltinCodec::Json);
    // Made for an engine with epoch checks, loaded into one without.
    let artifact = Engine::new(&engine_config::engine_config(true))
        .expect("engine")
        .precompile_module(bytes)
        .expect("precompiles");
    // SAFETY: unmodified output of precompile_module.
    let artifact = unsafe { builtin::Precompiled::from_precompile_output(Vec::leak(artifact)) };
    let engine = Engine::new(&engine_config::engine_config(false)).expect("engine");
    let err = deserialize(&engine, artifact).expect_err("another configuration");
    assert!(format!("{err:#}").contains("epoch"), "{err:#}");
    let compiled = Compiled::load(bytes, "json", Some(artifact), false).expect("compiled instead");
    assert!(!compiled.from_artifact);
    assert!(compiled.module.get_export("wirepool_decode").is_some());
}

/// A CPU without AVX-512 or AVX-VNNI, as wasmtime's feature detection sees it.
fn without_avx512(feature: &str) -> Option<bool> {
    if feature.starts_with("avx512") || feature.contains("vnni") {
        return Some(false);
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(feature_detected(feature))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn feature_detected(feature: &str) -> bool {
    match feature {
        "sse3" => std::arch::is_x86_feature_detected!("sse3"),
        "ssse3" => std::arch::is_x86_feature_detected!("ssse3"),
        "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
        "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
        "lzcnt" => std::arch::is_x86_feature_detected!("lzcnt"),
        "cmpxchg16b" => std::arch::is_x86_feature_detected!("cmpxchg16b"),
        _ => false,
    }
}

#[test]
fn the_artifacts_load_on_a_cpu_without_avx512() {
    // The engine the library makes on such a CPU: cranelift's own detection finds no
    // AVX-512 there either.
    let mut config = engine_config::engine_config(false);
    // SAFETY: the engine only loads modules here; nothing runs. (It also reports
    // fewer features than this CPU has, never more.)
    unsafe {
        config.detect_host_feature(without_avx512);
        if cfg!(target_arch = "x86_64") {
            for flag in engine_config::LEFT_OUT_OF_ARTIFACTS_X86 {
                config.cranelift_flag_set(flag, "false");
            }
        }
    }
    let engine = Engine::new(&config).expect("engine");
    for builtin in [BuiltinCodec::Json, BuiltinCodec::Raw] {
        let Some(artifact) = builtin::precompiled(builtin) else {
            eprintln!("not checked: {}", builtin::NOT_PRECOMPILED);
            continue;
        };
        if let Err(err) = deserialize(&engine, artifact) {
            // Only a CPU feature older than AVX-512 that this CPU lacks may refuse it.
            let text = format!("{err:#}");
            assert!(
                !text.contains("avx512") && !text.contains("vnni"),
                "{builtin:?}: {text}"
            );
            eprintln!("not checked: built for another CPU: {text}");
        }
    }
}

#[test]
fn the_built_in_codecs_use_no_simd_so_leaving_out_avx512_changes_no_code() {
    // cranelift uses AVX-512 and AVX-VNNI for vector types only: with no SIMD in the
    // codecs, the artifacts build.rs makes without them hold the same code.
    let mut config = engine_config::engine_config(false);
    config.wasm_relaxed_simd(false);
    config.wasm_simd(false);
    let engine = Engine::new(&config).expect("engine");
    for builtin in [BuiltinCodec::Json, BuiltinCodec::Raw] {
        Module::validate(&engine, builtin::module_bytes(builtin))
            .unwrap_or_else(|err| panic!("{builtin:?} uses SIMD: {err:#}"));
    }
}

/// Frames are laid out straight in the codec's input buffer. A batch's buffer is as
/// big as the first frame the first time, and doubles each time a frame did not fit
/// (that frame then starts the next batch), so a quiet connection's codec keeps a
/// small buffer and a busy one gets large batches; a frame bigger than a whole batch
/// goes alone. Every frame is decoded once, in order.
#[test]
fn frames_go_straight_into_the_codec_buffer_which_grows_with_the_batches() {
    let runtime = runtime(BuiltinCodec::Json, None);
    let mut instance = runtime.instantiate(1).expect("instance");
    instance.open().expect("open");
    let pads: Vec<usize> = (0..400usize)
        .map(|i| {
            if i == 300 {
                FrameBatch::MAX_BYTES + 1000
            } else {
                (i * 53) % 300
            }
        })
        .collect();
    let frames: Vec<String> = pads
        .iter()
        .enumerate()
        .map(|(i, pad)| {
            format!(
                r#"{{"type":"data","channel":"c0","seq":{},"payload":{{"i":{i},"pad":"{}"}}}}"#,
                i + 1,
                "p".repeat(*pad)
            )
        })
        .collect();
    let mut batch = FrameBatch::default();
    let mut sizes = Vec::new();
    let mut records = Vec::new();
    let mut next = frames.iter();
    let mut carried: Option<&String> = None;
    while let Some(frame) = carried.take().or_else(|| next.next()) {
        if instance
            .add_frame(&mut batch, frame.as_bytes(), false)
            .expect("add_frame")
        {
            continue;
        }
        assert!(!batch.is_empty(), "a frame always fits an empty batch");
        sizes.push(batch.len());
        records.extend(owned(instance.decode(&mut batch).expect("decode")));
        assert!(batch.is_empty(), "decode empties the batch");
        carried = Some(frame);
    }
    sizes.push(batch.len());
    records.extend(owned(instance.decode(&mut batch).expect("decode")));

    assert!(
        records.iter().all(|record| record.0 == kind::DATA),
        "no gap, nothing malformed: {:?}",
        records.iter().find(|record| record.0 != kind::DATA)
    );
    let indexes: Vec<usize> = records
        .iter()
        .map(|record| {
            let payload: serde_json::Value = serde_json::from_str(&record.3).expect("JSON");
            assert_eq!(
                payload["pad"].as_str().map(str::len),
                Some(pads[payload["i"].as_u64().expect("i") as usize])
            );
            payload["i"].as_u64().expect("i") as usize
        })
        .collect();
    assert_eq!(indexes, (0..frames.len()).collect::<Vec<_>>());
    assert_eq!(
        sizes[0], 1,
        "the first buffer fits the first frame: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|size| *size > 100),
        "the buffer grew with the batches: {sizes:?}"
    );
    assert_eq!(sizes.iter().sum::<usize>(), frames.len());
}

/// The codec's own cost per frame, for A/B comparisons of codec builds (speed is
/// measured, never asserted): decode of 1024-frame batches of the bench feed's
/// 100-byte frames, add_frame and reading the records included, best round of
/// `WIREPOOL_MEASURE_ROUNDS` (7). Each module in `WIREPOOL_CODEC_FILES` (comma-separated
/// paths; the built-in json codec without it) is measured in turn, round after round,
/// so that a change in the machine's speed hits all alike:
/// `WIREPOOL_CODEC_FILES=a.wasm,b.wasm cargo test --release --lib measure_decode -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_decode_ns_per_frame() {
    let config = CodecConfig::default();
    let sources: Vec<CodecSource> = match std::env::var("WIREPOOL_CODEC_FILES") {
        Ok(paths) => paths
            .split(',')
            .map(|path| CodecSource::File(path.into()))
            .collect(),
        Err(_) => vec![CodecSource::Builtin(BuiltinCodec::Json)],
    };
    let runtimes: Vec<CodecRuntime> = sources
        .iter()
        .map(|source| CodecRuntime::load(source, &config, None).expect("codec loads"))
        .collect();
    let mut instances: Vec<CodecInstance> = runtimes
        .iter()
        .map(|runtime| {
            let mut instance = runtime.instantiate(1).expect("instance");
            instance.open().expect("open");
            instance
        })
        .collect();
    let frames: Vec<Vec<u8>> = (0..FrameBatch::MAX_FRAMES as u64)
        .map(|seq| {
            let mut body = format!(
                r#"{{"type":"data","channel":"c0","seq":{},"payload":{{"ts_ns":{},"pad":""#,
                seq + 1,
                1_732_350_000_123_456_789 + seq * 997
            )
            .into_bytes();
            body.resize(97, b'x');
            body.extend_from_slice(b"\"}}");
            body
        })
        .collect();
    let rounds: usize = std::env::var("WIREPOOL_MEASURE_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(7);
    const BATCHES: usize = 400;
    let mut best = vec![f64::MAX; instances.len()];
    for _ in 0..rounds {
        for (instance, best) in instances.iter_mut().zip(&mut best) {
            let mut batch = FrameBatch::with_goal(FrameBatch::MAX_BYTES);
            let mut payload_bytes = 0;
            let started = std::time::Instant::now();
            for _ in 0..BATCHES {
                for frame in &frames {
                    assert!(instance.add_frame(&mut batch, frame, false).expect("add"));
                }
                for record in instance.decode(&mut batch).expect("decode").iter() {
                    payload_bytes += record.expect("record").payload.len();
                }
            }
            let per_frame = started.elapsed().as_nanos() as f64 / (BATCHES * frames.len()) as f64;
            assert!(payload_bytes >= BATCHES * frames.len() * 40, "data records");
            *best = best.min(per_frame);
        }
    }
    for (source, best) in sources.iter().zip(&best) {
        eprintln!(
            "{}: {best:.1} ns per frame (best of {rounds} rounds)",
            source.describe()
        );
    }
}
