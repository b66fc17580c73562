//! One JSON line per message for `run --output jsonl`, keeping every payload whole.
//!
//! A payload that is a JSON text is printed as it stood in the frame (SPEC section 4),
//! not parsed and printed again: that lost digits (`1.10` became `1.1`, a 24-digit id
//! a float). Its line breaks, which can only be whitespace between tokens in valid
//! JSON, become spaces so that the message stays one line. Any other payload is a
//! string, with `"payload_encoding":"text"` when it is UTF-8 and `"base64"` when not.

use wirepool::Message;

/// Writes `message` as one line, ending in `\n`, to `line` (cleared first).
pub fn format_line(message: &Message, line: &mut Vec<u8>) {
    line.clear();
    line.extend_from_slice(b"{\"channel\":");
    json_string(&message.channel, line);
    line.extend_from_slice(
        format!(
            ",\"connection_id\":{},\"kind\":\"{}\",\"received_ns\":{}",
            message.connection_id,
            message.kind.as_str(),
            message.received_ns
        )
        .as_bytes(),
    );
    let payload = &message.payload[..];
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            line.extend_from_slice(b",\"payload\":");
            line.extend(payload.iter().map(|&byte| match byte {
                b'\n' | b'\r' => b' ',
                byte => byte,
            }));
        }
        Ok(text) => {
            line.extend_from_slice(b",\"payload_encoding\":\"text\",\"payload\":");
            json_string(text, line);
        }
        Err(_) => {
            line.extend_from_slice(b",\"payload_encoding\":\"base64\",\"payload\":\"");
            base64(payload, line);
            line.push(b'"');
        }
    }
    line.extend_from_slice(b"}\n");
}

fn json_string(text: &str, line: &mut Vec<u8>) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *line, text);
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(bytes: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let group = chunk
            .iter()
            .enumerate()
            .fold(0u32, |group, (index, &byte)| {
                group | u32::from(byte) << (16 - 8 * index)
            });
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[(group >> (18 - 6 * index)) as usize & 63]);
            } else {
                out.push(b'=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            base64(input.as_bytes(), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{input:?}");
        }
    }
}
