//! The bench feed's wire format: SPEC section 4 `data` frames of exactly
//! [`MESSAGE_BYTES`] bytes, each carrying its sequence number and the server's
//! `CLOCK_REALTIME` at write time, plus the few WebSocket framing helpers the feed
//! server needs (it writes pre-framed bytes straight to the socket).
//!
//! A frame body looks like
//! `{"type":"data","channel":"c0","seq":17,"payload":{"ts_ns":1732350000123456789,"pad":"xxxx"}}`
//! with `pad` sized so the body is always 100 bytes.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes of every data frame's body (the WebSocket payload).
pub const MESSAGE_BYTES: usize = 100;

/// `CLOCK_REALTIME` in nanoseconds: the clock shared by the feed and every consumer.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

/// Appends the decimal digits of `value` (no allocation, no formatter machinery).
fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends one unmasked server-to-client text frame (header + 100-byte body).
pub fn push_data_frame(out: &mut Vec<u8>, channel: &[u8], seq: u64, ts_ns: u64) {
    // Bodies under 126 bytes take a one-byte length.
    out.extend_from_slice(&[0x81, MESSAGE_BYTES as u8]);
    let start = out.len();
    out.extend_from_slice(b"{\"type\":\"data\",\"channel\":\"");
    out.extend_from_slice(channel);
    out.extend_from_slice(b"\",\"seq\":");
    push_decimal(out, seq);
    out.extend_from_slice(b",\"payload\":{\"ts_ns\":");
    push_decimal(out, ts_ns);
    out.extend_from_slice(b",\"pad\":\"");
    let used = out.len() - start + 3;
    let pad = MESSAGE_BYTES.saturating_sub(used);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}}");
    debug_assert_eq!(
        out.len() - start,
        MESSAGE_BYTES,
        "frame body must be 100 bytes"
    );
}

/// Appends an unmasked server-to-client frame of any opcode.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, body: &[u8]) {
    out.push(0x80 | opcode);
    match body.len() {
        len if len < 126 => out.push(len as u8),
        len if len <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(body);
}

/// Parses the decimal number that follows `key` (e.g. `"seq":`) in `frame`.
pub fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = frame.windows(key.len()).position(|window| window == key)? + key.len();
    let mut value: u64 = 0;
    let mut seen = false;
    for &byte in &frame[at..] {
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        seen = true;
    }
    seen.then_some(value)
}

/// The send timestamp of a data frame or of its `payload` (json codec output).
pub fn ts_ns_of(bytes: &[u8]) -> Option<u64> {
    number_after(bytes, b"\"ts_ns\":")
}

/// The sequence number of a whole data frame (raw codec output, plain clients).
pub fn seq_of(frame: &[u8]) -> Option<u64> {
    // The member follows `{"type":"data","channel":"`: skip that much of the search.
    number_after(frame.get(26..)?, b"\"seq\":")
}

/// The string value of a top-level `"key":"value"` member (no escapes: the bench's
/// own clients write these frames).
pub fn string_member<'a>(frame: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut pattern = Vec::with_capacity(key.len() + 4);
    pattern.push(b'"');
    pattern.extend_from_slice(key);
    pattern.extend_from_slice(b"\":\"");
    let start = frame
        .windows(pattern.len())
        .position(|window| window == pattern.as_slice())?
        + pattern.len();
    let len = frame[start..].iter().position(|&byte| byte == b'"')?;
    Some(&frame[start..start + len])
}
