use super::*;

const KEYS: [&[u8]; 6] = [
    b"type",
    b"channel",
    b"messageId",
    b"payload",
    b"seq",
    b"key",
];

fn members(input: &str) -> [Option<Value<'_>>; 6] {
    let mut values = [None; 6];
    let kind = scan(input.as_bytes(), &KEYS, &mut values)
        .unwrap_or_else(|err| panic!("{input:?} should be valid JSON, got {err}"));
    assert_eq!(kind, Kind::Object, "{input:?} is an object");
    values
}

fn raw<'a>(value: Option<Value<'a>>) -> Option<&'a str> {
    value.map(|value| core::str::from_utf8(value.raw()).expect("raw text is UTF-8"))
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn accepts_valid_documents() {
    let valid = [
        "{}",
        "[]",
        "0",
        "-0",
        "1.5e+3",
        "-12.25E-2",
        "10e5",
        "\"\"",
        "\"a\"",
        "true",
        "false",
        " \t\r\n null \n",
        "[1,\"two\",{\"three\":[3,null,true,false]},-4.0]",
        "{\"a\":{\"b\":{\"c\":[]}},\"d\":\"\"}",
        "{ \"a\" : 1 , \"b\" : [ 1 , 2 ] }",
        "\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0041 \\u00e9 \\ud83d\\ude00\"",
        "\"\\ud800\"",
        "\"caf\u{e9} \u{20ac} \u{1f600} \u{10ffff}\"",
        "\"\u{7f}\"",
        "{\"a\":1,\"a\":2}",
        "[\"abcdefghijklmnopqrstuvwxyz0123456789\",\"abcdefgh\\\"ijklmnop\"]",
    ];
    for text in valid {
        assert!(
            validate(text.as_bytes()).is_ok(),
            "{text:?} should be valid: {:?}",
            validate(text.as_bytes())
        );
    }
}

#[test]
fn reports_the_kind_of_the_top_level_value() {
    assert_eq!(validate(b" {\"a\":[]} "), Ok(Kind::Object));
    assert_eq!(validate(b"[{}]"), Ok(Kind::Array));
    assert_eq!(validate(b"\"x\""), Ok(Kind::String));
    assert_eq!(validate(b"-1"), Ok(Kind::Number));
    assert_eq!(validate(b"true"), Ok(Kind::True));
    assert_eq!(validate(b"false"), Ok(Kind::False));
    assert_eq!(validate(b"null"), Ok(Kind::Null));
}

#[test]
fn rejects_invalid_documents() {
    let invalid: [&[u8]; 52] = [
        b"",
        b"  ",
        b"{",
        b"}",
        b"[",
        b"]",
        b"[1,]",
        b"[,1]",
        b"[1,,2]",
        b"[1 2]",
        b"{\"a\":1,}",
        b"{\"a\"}",
        b"{\"a\" 1}",
        b"{\"a\":}",
        b"{1:2}",
        b"{\"a\":1 \"b\":2}",
        b"{\"a\":1]",
        b"[1}",
        b"01",
        b"-",
        b"-a",
        b"1.",
        b"1.e3",
        b".5",
        b"1e",
        b"1e+",
        b"+1",
        b"0x10",
        b"NaN",
        b"Infinity",
        b"tru",
        b"truex",
        b"nul",
        b"'a'",
        b"\"abc",
        b"\"\\x\"",
        b"\"\\u12G4\"",
        b"\"\\u12\"",
        b"\"\x01\"",
        b"\"\t\"",
        b"\"\xc0\x80\"",
        b"\"\xe0\x80\x80\"",
        b"\"\xed\xa0\x80\"",
        b"\"\xf4\x90\x80\x80\"",
        b"\"\xf5\x80\x80\x80\"",
        b"\"\x80\"",
        b"\"\xe2\x82\"",
        b"{} {}",
        b"1 2",
        b"\xef\xbb\xbf{}",
        b"{}\x00",
        b"\x80",
    ];
    for text in invalid {
        assert!(
            validate(text).is_err(),
            "{:?} should be rejected",
            String::from_utf8_lossy(text)
        );
    }
}

#[test]
fn errors_say_what_and_where() {
    assert_eq!(
        validate(b"[1,]"),
        Err(JsonError {
            offset: 3,
            reason: "expected a value"
        })
    );
    assert_eq!(
        validate(b"{} x"),
        Err(JsonError {
            offset: 3,
            reason: "unexpected data after the value"
        })
    );
    assert_eq!(
        validate(b"{\"a\":\"\xff\"}"),
        Err(JsonError {
            offset: 6,
            reason: "invalid UTF-8"
        })
    );
    assert_eq!(
        validate(b"[1,]").unwrap_err().to_string(),
        "expected a value at byte 3"
    );
}

#[test]
fn nesting_is_limited_to_max_depth() {
    assert!(validate(nested(MAX_DEPTH).as_bytes()).is_ok());
    let too_deep = validate(nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
    assert_eq!(too_deep.offset, MAX_DEPTH);
    assert_eq!(too_deep.reason, "nested deeper than 128 levels");
}

#[test]
fn arrays_and_objects_alternate_correctly_at_every_depth() {
    // Depths 1..=128 alternate object and array, so both words of the nesting stack
    // (depths up to 64 and beyond) must remember which closer each level needs.
    let mut text = String::new();
    for depth in 0..MAX_DEPTH {
        text.push_str(if depth % 2 == 0 { "{\"k\":" } else { "[" });
    }
    text.push('1');
    for depth in (0..MAX_DEPTH).rev() {
        text.push(if depth % 2 == 0 { '}' } else { ']' });
    }
    assert_eq!(validate(text.as_bytes()), Ok(Kind::Object));
    // The wrong closer for the innermost array (depth 128, in the second word).
    let wrong = text.replacen("1]", "1}", 1);
    let position = wrong.find("1}").unwrap() + 1;
    let err = validate(wrong.as_bytes()).unwrap_err();
    assert_eq!(err.offset, position);
    let mut swapped = text.clone().into_bytes();
    let last_array_closer = text.rfind(']').unwrap();
    swapped[last_array_closer] = b'}';
    assert!(
        validate(&swapped).is_err(),
        "a '}}' closing the array at depth 2"
    );
}

#[test]
fn hostile_nesting_fails_cleanly() {
    let objects = "{\"a\":".repeat(100_000);
    assert!(validate(objects.as_bytes()).is_err());
    assert!(validate(nested(100_000).as_bytes()).is_err());
    assert!(validate("[".repeat(100_000).as_bytes()).is_err());
}

#[test]
fn captures_top_level_members_as_raw_text() {
    let values = members(
        "{ \"type\" : \"data\", \"channel\":\"ticker.BTC\",\"payload\": {\"p\": [1, 2.5, \"x\"], \"type\":\"inner\"} ,\"seq\":12}",
    );
    assert_eq!(raw(values[0]), Some("\"data\""));
    assert_eq!(raw(values[1]), Some("\"ticker.BTC\""));
    assert_eq!(raw(values[2]), None);
    assert_eq!(
        raw(values[3]),
        Some("{\"p\": [1, 2.5, \"x\"], \"type\":\"inner\"}")
    );
    assert_eq!(values[4].and_then(|seq| seq.as_i64()), Some(12));
    assert_eq!(values[0].unwrap().plain_str(), Some(&b"data"[..]));
    assert_eq!(values[3].unwrap().kind(), Kind::Object);
}

#[test]
fn captures_every_kind_of_member_value() {
    let values = members("{\"type\":null,\"channel\":[],\"messageId\":false,\"payload\":-0.5e1,\"seq\":true,\"key\":{}}");
    let kinds: Vec<Option<Kind>> = values.iter().map(|value| value.map(|v| v.kind())).collect();
    assert_eq!(
        kinds,
        [
            Kind::Null,
            Kind::Array,
            Kind::False,
            Kind::Number,
            Kind::True,
            Kind::Object
        ]
        .map(Some)
    );
    assert_eq!(raw(values[3]), Some("-0.5e1"));
    assert_eq!(values[2].unwrap().as_bool(), Some(false));
    assert_eq!(values[4].unwrap().as_bool(), Some(true));
}

#[test]
fn nested_members_with_wanted_names_are_not_captured() {
    let values =
        members("{\"payload\":{\"type\":\"x\",\"channel\":\"y\"},\"list\":[{\"type\":1}]}");
    assert_eq!(raw(values[0]), None);
    assert_eq!(raw(values[1]), None);
    assert_eq!(raw(values[3]), Some("{\"type\":\"x\",\"channel\":\"y\"}"));
}

#[test]
fn escaped_member_names_match_after_unescaping() {
    let values = members("{\"typ\\u0065\":\"pong\",\"\\u0063hannel\":\"c\"}");
    assert_eq!(raw(values[0]), Some("\"pong\""));
    assert_eq!(raw(values[1]), Some("\"c\""));
}

#[test]
fn the_last_duplicate_member_wins() {
    let values = members("{\"type\":\"a\",\"type\":\"b\"}");
    assert_eq!(raw(values[0]), Some("\"b\""));
}

#[test]
fn non_objects_capture_nothing() {
    let mut values = [None; 6];
    assert_eq!(
        scan(b"[{\"type\":\"data\"}]", &KEYS, &mut values),
        Ok(Kind::Array)
    );
    assert!(values.iter().all(Option::is_none));
}

#[test]
fn previous_captures_are_cleared() {
    let mut values = [None; 6];
    scan(b"{\"type\":\"a\"}", &KEYS, &mut values).unwrap();
    scan(b"{\"seq\":1}", &KEYS, &mut values).unwrap();
    assert!(values[0].is_none());
}

#[test]
fn strings_are_unescaped_only_when_needed() {
    let values = members(
        "{\"type\":\"plain\",\"channel\":\"a\\\"b\\\\c\\/d\\n\\u00e9\\ud83d\\ude00\\ud800x\"}",
    );
    let mut scratch = Vec::new();
    let plain = values[0].unwrap();
    assert_eq!(plain.plain_str(), Some(&b"plain"[..]));
    assert_eq!(plain.string(&mut scratch), Some(&b"plain"[..]));
    assert!(scratch.is_empty(), "a plain string is borrowed, not copied");
    let escaped = values[1].unwrap();
    assert_eq!(escaped.plain_str(), None);
    assert_eq!(
        escaped.string(&mut scratch),
        Some("a\"b\\c/d\n\u{e9}\u{1f600}\u{fffd}x".as_bytes())
    );
    assert_eq!(
        members("{\"seq\":1}")[4].unwrap().string(&mut scratch),
        None
    );
}

#[test]
fn integers_convert_only_when_integral_and_in_range() {
    let number = |text: &str| {
        let mut values = [None; 1];
        let doc = format!("{{\"seq\":{text}}}");
        scan(doc.as_bytes(), &[b"seq"], &mut values).unwrap();
        values[0].unwrap().as_i64()
    };
    assert_eq!(number("0"), Some(0));
    assert_eq!(number("12"), Some(12));
    assert_eq!(number("-3"), Some(-3));
    assert_eq!(number("9223372036854775807"), Some(i64::MAX));
    assert_eq!(number("-9223372036854775808"), Some(i64::MIN));
    assert_eq!(number("9223372036854775808"), None);
    assert_eq!(number("-9223372036854775809"), None);
    assert_eq!(number("-0"), Some(0));
    assert_eq!(number("9999999999999999999"), None, "19 digits, past i64");
    assert_eq!(number("18446744073709551616"), None, "20 digits");
    assert_eq!(number("123456789012345678901234567890"), None);
    assert_eq!(number("\"12\""), None, "a string is not a number");
    assert_eq!(number("1.0"), None);
    assert_eq!(number("1e2"), None);
}

#[test]
fn strings_of_every_length_find_their_end() {
    // Exercises the eight-bytes-at-a-time path with the special byte at each offset.
    for len in 0..40 {
        for special in ["\\n", "\u{e9}", "\""] {
            let body = "a".repeat(len);
            let text = if special == "\"" {
                format!("[\"{body}\"]")
            } else {
                format!("[\"{body}{special}{body}\"]")
            };
            assert_eq!(validate(text.as_bytes()), Ok(Kind::Array), "{text:?}");
            let control = format!("[\"{body}\x01{body}\"]");
            assert_eq!(
                validate(control.as_bytes()),
                Err(JsonError {
                    offset: 2 + len,
                    reason: "control character in string"
                }),
                "{control:?}"
            );
        }
    }
}

#[test]
fn digit_runs_end_at_the_first_other_byte_wherever_it_stands() {
    // Every byte value at every offset of a word, after runs of every length up to
    // three words: the eight-at-a-time path must agree with the plain definition.
    for run in 0..24 {
        for stop in 0..=255u8 {
            let mut text = vec![b'7'; run];
            text.push(stop);
            text.extend_from_slice(b"12345678");
            let expected = text
                .iter()
                .position(|byte| !byte.is_ascii_digit())
                .unwrap_or(text.len());
            assert_eq!(
                digits_end(&text, 0),
                expected,
                "run {run}, then byte {stop:#04x}"
            );
        }
    }
    assert_eq!(digits_end(b"0123456789", 0), 10);
    assert_eq!(digits_end(b"", 0), 0);
    // Numbers of every length still validate, and a stray byte after the digits is
    // still found.
    for len in 1..40 {
        let digits = "9".repeat(len);
        assert_eq!(validate(format!("[1{digits}]").as_bytes()), Ok(Kind::Array));
        assert_eq!(
            validate(format!("[1{digits}x]").as_bytes()),
            Err(JsonError {
                offset: 2 + len,
                reason: "expected ',' or ']'"
            })
        );
    }
}

#[test]
fn the_flat_object_shortcut_accepts_only_what_the_full_scanner_accepts() {
    // Objects of scalar members as feeds send them, plus the near misses around them
    // (escapes, whitespace, bad numbers, nesting), then every truncation and every
    // byte replaced by a byte that matters to JSON: wherever the shortcut says yes,
    // the full scanner must say it is an object.
    let members = [
        r#""ts_ns":1764000000000000000"#,
        r#""pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx""#,
        r#""p":-0.5e-3"#,
        r#""q":1E+2"#,
        r#""ok":true"#,
        r#""no":false"#,
        r#""none":null"#,
        r#""":"""#,
        r#""s":"a\"b""#,
        r#""u":"é""#,
        r#""n":01"#,
        r#""n":-"#,
        r#""n":1."#,
        r#""n":.5"#,
        r#""t":tru"#,
        r#""o":{}"#,
        r#""a":[1,2]"#,
        r#""w": 1"#,
        r#"x:1"#,
    ];
    let mut texts = vec![
        "{}".to_string(),
        "{ }".to_string(),
        "{".to_string(),
        "}".to_string(),
    ];
    for (i, first) in members.iter().enumerate() {
        texts.push(format!("{{{first}}}"));
        for second in &members[i..] {
            texts.push(format!("{{{first},{second}}}"));
            texts.push(format!("{{{first},{second},{first}}}"));
        }
    }
    let specials = [
        b'"', b'\\', b':', b',', b'{', b'}', b'[', b']', b' ', b'\n', 0x01, 0x7f, 0xc3, 0x80, 0xff,
        b'x', b'0', b'9', b'-', b'+', b'.', b'e', b't', b'n',
    ];
    let mut accepted = 0;
    let mut check = |text: &[u8]| {
        if flat_object(text) {
            accepted += 1;
            assert_eq!(
                scan(text, &[], &mut []),
                Ok(Kind::Object),
                "the shortcut took {:?}",
                String::from_utf8_lossy(text)
            );
        }
        assert_eq!(validate(text), scan(text, &[], &mut []));
    };
    for text in &texts {
        let bytes = text.as_bytes();
        check(bytes);
        for end in 0..bytes.len() {
            check(&bytes[..end]);
        }
        for at in 0..bytes.len() {
            let mut changed = bytes.to_vec();
            for &special in &specials {
                changed[at] = special;
                check(&changed);
            }
            let mut inserted = bytes.to_vec();
            inserted.insert(at, b' ');
            check(&inserted);
        }
    }
    // The shortcut does take the usual shapes.
    for usual in [
        r#"{"ts_ns":1764000000000000000,"pad":"xxxx"}"#,
        r#"{"id":123456789,"price":"64123.50","size":"0.0125","side":"buy","ts":1700000000123}"#,
        r#"{"bid":-1.5e-3,"ok":true,"halted":false,"note":null,"":""}"#,
        "{}",
    ] {
        assert!(flat_object(usual.as_bytes()), "{usual}");
    }
    assert!(accepted > 1000, "the shortcut took only {accepted} texts");
}
