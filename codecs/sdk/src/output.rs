//! Output records (`docs/codec-abi.md`, "Output records"), written straight into one
//! reusable buffer: a 24-byte header, the channel, the payload, no padding.

use crate::kind;

const HEADER_LEN: usize = 24;

/// The records of the current call. The runtime clears it before each call and hands
/// `(ptr, len)` of its bytes to `wirepool_output`; its capacity is kept, so a warm
/// codec allocates nothing per record.
#[derive(Debug, Default)]
pub struct Output {
    bytes: Vec<u8>,
    /// The address and length of the current call's input (decode's frames), which
    /// [`Output::data`] may point into; empty outside decode.
    input_start: usize,
    input_len: usize,
    /// The engine's `wirepool_engine_features` bits ([`crate::feature`]).
    engine_features: i32,
}

fn header(kind: u32, id: i64, channel_len: usize, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[4..8].copy_from_slice(&(channel_len as u32).to_le_bytes());
    header[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    // 12..16 reserved, zero.
    header[16..24].copy_from_slice(&id.to_le_bytes());
    header
}

impl Output {
    /// An empty output.
    pub const fn new() -> Output {
        Output {
            bytes: Vec::new(),
            input_start: 0,
            input_len: 0,
            engine_features: 0,
        }
    }

    /// Records what the engine understands (`wirepool_engine_features`).
    pub(crate) fn set_engine_features(&mut self, features: i32) {
        self.engine_features = features;
    }

    /// The input of the decode call about to run, which [`Output::data`] may point
    /// into if the engine understands `DATA_IN_INPUT`; empty after the call.
    pub(crate) fn set_input(&mut self, input: &[u8]) {
        let allowed = self.engine_features & crate::feature::DATA_IN_INPUT != 0;
        self.input_start = input.as_ptr() as usize;
        self.input_len = if allowed { input.len() } else { 0 };
    }

    /// Drops every record, keeping the capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    /// The encoded records.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends one record whose payload is already at hand.
    pub fn record(&mut self, kind: u32, id: i64, channel: &[u8], payload: &[u8]) {
        self.bytes
            .reserve(HEADER_LEN + channel.len() + payload.len());
        self.bytes
            .extend_from_slice(&header(kind, id, channel.len(), payload.len()));
        self.bytes.extend_from_slice(channel);
        self.bytes.extend_from_slice(payload);
    }

    /// `DATA`: a message for the consumer on `channel`. In `decode`, a payload that
    /// lies in the frames being decoded (a slice of a [`Frame`](crate::Frame)'s body)
    /// is not copied if the engine understands `DATA_IN_INPUT`: the record points at
    /// it, and the engine takes the bytes from there. Anything else is copied into a
    /// `DATA` record, as [`Output::record`] does.
    #[inline]
    pub fn data(&mut self, channel: &[u8], payload: &[u8]) {
        let offset = (payload.as_ptr() as usize).wrapping_sub(self.input_start);
        // `offset < input_len`: never for an empty input (outside decode, or an engine
        // without the extension), so an empty payload is copied there (nothing).
        if offset < self.input_len && payload.len() <= self.input_len - offset {
            // No payload bytes (so that any reader frames it like every record):
            // the message's length goes in the field at 12, its offset in the id.
            let mut header = header(kind::DATA_IN_INPUT, offset as i64, channel.len(), 0);
            header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            self.bytes.reserve(HEADER_LEN + channel.len());
            self.bytes.extend_from_slice(&header);
            self.bytes.extend_from_slice(channel);
        } else {
            self.record(kind::DATA, 0, channel, payload);
        }
    }

    /// Starts a record whose payload is written piece by piece; its length is filled
    /// in when the [`RecordWriter`] is dropped.
    pub fn begin(&mut self, kind: u32, id: i64, channel: &[u8]) -> RecordWriter<'_> {
        let start = self.bytes.len();
        self.bytes
            .extend_from_slice(&header(kind, id, channel.len(), 0));
        self.bytes.extend_from_slice(channel);
        let payload_start = self.bytes.len();
        RecordWriter {
            bytes: &mut self.bytes,
            start,
            payload_start,
        }
    }

    /// `READY`.
    pub fn ready(&mut self) {
        self.record(kind::READY, 0, b"", b"");
    }

    /// `SEND_TEXT` with this frame text.
    pub fn send_text(&mut self, text: &[u8]) {
        self.record(kind::SEND_TEXT, 0, b"", text);
    }

    /// `PASSTHROUGH`: from now on every inbound text or binary frame is one data
    /// message on `channel`, unchanged, and the engine may deliver it without calling
    /// `decode`. `decode` must still turn such frames into the same `DATA` records (an
    /// engine may call it anyway). An empty `channel` ends passthrough: frames read
    /// after this output go to `decode` again.
    pub fn passthrough(&mut self, channel: &[u8]) {
        self.record(kind::PASSTHROUGH, 0, channel, b"");
    }

    /// Starts a `MALFORMED` record; write the reason into the returned writer.
    pub fn malformed(&mut self) -> RecordWriter<'_> {
        self.begin(kind::MALFORMED, 0, b"")
    }
}

/// The payload of one record being written. Dropping it seals the record.
pub struct RecordWriter<'o> {
    bytes: &'o mut Vec<u8>,
    start: usize,
    payload_start: usize,
}

impl Drop for RecordWriter<'_> {
    fn drop(&mut self) {
        let payload_len = (self.bytes.len() - self.payload_start) as u32;
        self.bytes[self.start + 8..self.start + 12].copy_from_slice(&payload_len.to_le_bytes());
    }
}

impl RecordWriter<'_> {
    /// Appends raw bytes.
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    /// Appends text.
    pub fn push_str(&mut self, text: &str) -> &mut Self {
        self.push(text.as_bytes())
    }

    /// Appends a decimal integer.
    pub fn push_i64(&mut self, value: i64) -> &mut Self {
        if value < 0 {
            self.bytes.push(b'-');
        }
        self.push_u64(value.unsigned_abs())
    }

    /// Appends a decimal integer.
    pub fn push_u64(&mut self, mut value: u64) -> &mut Self {
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
        self.push(&digits[at..])
    }

    /// Appends `bytes` as a quoted JSON string, escaping `"`, `\` and control
    /// characters; invalid UTF-8 becomes U+FFFD so the result is always valid JSON.
    pub fn push_json_string(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.push(b'"');
        for chunk in bytes.utf8_chunks() {
            self.push_json_escaped(chunk.valid().as_bytes());
            if !chunk.invalid().is_empty() {
                self.push(b"\\ufffd");
            }
        }
        self.bytes.push(b'"');
        self
    }

    fn push_json_escaped(&mut self, text: &[u8]) {
        let mut run_start = 0;
        for (at, &byte) in text.iter().enumerate() {
            let escape: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0x00..=0x1f => b"",
                _ => continue,
            };
            self.bytes.extend_from_slice(&text[run_start..at]);
            if escape.is_empty() {
                self.push(b"\\u00");
                self.push(&[hex_digit(byte >> 4), hex_digit(byte & 0xf)]);
            } else {
                self.push(escape);
            }
            run_start = at + 1;
        }
        self.bytes.extend_from_slice(&text[run_start..]);
    }

    /// Appends at most `max` bytes of `bytes` as readable text for a reason: valid
    /// UTF-8 as is (cut at a character boundary), control characters and invalid bytes
    /// as `\xNN`, and `...` when cut.
    pub fn push_excerpt(&mut self, bytes: &[u8], max: usize) -> &mut Self {
        let mut cut = bytes.len().min(max);
        while cut > 0 && cut < bytes.len() && bytes[cut] & 0xc0 == 0x80 {
            cut -= 1;
        }
        for chunk in bytes[..cut].utf8_chunks() {
            let valid = chunk.valid().as_bytes();
            let mut run_start = 0;
            for (at, &byte) in valid.iter().enumerate() {
                if byte < 0x20 || byte == 0x7f {
                    self.bytes.extend_from_slice(&valid[run_start..at]);
                    self.push_hex_escape(byte);
                    run_start = at + 1;
                }
            }
            self.bytes.extend_from_slice(&valid[run_start..]);
            for &byte in chunk.invalid() {
                self.push_hex_escape(byte);
            }
        }
        if cut < bytes.len() {
            self.push(b"...");
        }
        self
    }

    fn push_hex_escape(&mut self, byte: u8) {
        self.push(&[b'\\', b'x', hex_digit(byte >> 4), hex_digit(byte & 0xf)]);
    }
}

impl core::fmt::Write for RecordWriter<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        self.push_str(text);
        Ok(())
    }
}

fn hex_digit(nibble: u8) -> u8 {
    b"0123456789abcdef"[usize::from(nibble & 0xf)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload_of_single_record(out: &Output) -> (u32, i64, Vec<u8>, Vec<u8>) {
        let bytes = out.as_bytes();
        let kind = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        let channel_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let payload_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(&bytes[12..16], &[0, 0, 0, 0], "reserved must be zero");
        let id = i64::from_le_bytes(bytes[16..24].try_into().unwrap());
        assert_eq!(
            bytes.len(),
            HEADER_LEN + channel_len + payload_len,
            "exactly one record"
        );
        let channel = bytes[24..24 + channel_len].to_vec();
        let payload = bytes[24 + channel_len..].to_vec();
        (kind, id, channel, payload)
    }

    #[test]
    fn data_points_into_the_input_only_where_the_engine_allows_it() {
        let input = *b"0123456789";
        let elsewhere = *b"3456";
        let mut out = Output::new();
        // An engine that never called `wirepool_engine_features`: always a copy.
        out.set_input(&input);
        out.data(b"ch", &input[3..7]);
        assert_eq!(
            payload_of_single_record(&out),
            (kind::DATA, 0, b"ch".to_vec(), b"3456".to_vec())
        );

        out.set_engine_features(crate::feature::ALL);
        out.set_input(&input);
        for (start, end) in [(3, 7), (0, 10), (9, 10), (0, 1), (4, 4)] {
            out.clear();
            out.data(b"ch", &input[start..end]);
            let mut expected = header(kind::DATA_IN_INPUT, start as i64, 2, 0).to_vec();
            expected[12..16].copy_from_slice(&((end - start) as u32).to_le_bytes());
            expected.extend_from_slice(b"ch");
            assert_eq!(out.as_bytes(), expected, "{start}..{end}");
        }
        // Bytes outside the input (and the empty slice just past its end) are copied.
        for payload in [&elsewhere[..], &input[10..], b"null"] {
            out.clear();
            out.data(b"ch", payload);
            assert_eq!(
                payload_of_single_record(&out),
                (kind::DATA, 0, b"ch".to_vec(), payload.to_vec())
            );
        }
        // After the call (an empty input), nothing points anywhere.
        out.set_input(&[]);
        out.clear();
        out.data(b"ch", &input[3..7]);
        assert_eq!(payload_of_single_record(&out).0, kind::DATA);
    }

    #[test]
    fn record_layout_matches_the_abi() {
        let mut out = Output::new();
        out.record(kind::DATA, -2, b"ch", b"{}");
        assert_eq!(
            out.as_bytes(),
            b"\x04\0\0\0\x02\0\0\0\x02\0\0\0\0\0\0\0\xfe\xff\xff\xff\xff\xff\xff\xffch{}"
        );
    }

    #[test]
    fn writer_fills_in_the_payload_length_when_dropped() {
        let mut out = Output::new();
        out.begin(kind::SEND_TEXT, 7, b"c")
            .push(b"{\"id\":")
            .push_i64(-12)
            .push(b",\"n\":")
            .push_u64(0)
            .push(b"}");
        let (kind, id, channel, payload) = payload_of_single_record(&out);
        assert_eq!((kind, id), (kind::SEND_TEXT, 7));
        assert_eq!(channel, b"c");
        assert_eq!(payload, b"{\"id\":-12,\"n\":0}");
    }

    #[test]
    fn json_strings_are_escaped_and_always_valid_utf8() {
        let mut out = Output::new();
        out.begin(kind::SEND_TEXT, 0, b"")
            .push_json_string(b"a\"b\\c\n\x01\xff\xc3\xa9");
        let (_, _, _, payload) = payload_of_single_record(&out);
        assert_eq!(payload, "\"a\\\"b\\\\c\\n\\u0001\\ufffd\u{e9}\"".as_bytes());
        assert!(crate::json::validate(&payload).is_ok());
    }

    #[test]
    fn excerpts_are_cut_at_a_character_boundary() {
        let mut out = Output::new();
        out.malformed().push_excerpt("ab\u{e9}cd".as_bytes(), 3);
        let (_, _, _, payload) = payload_of_single_record(&out);
        assert_eq!(payload, b"ab...");

        let mut out = Output::new();
        out.malformed().push_excerpt(b"a\n\xffb", 64);
        let (_, _, _, payload) = payload_of_single_record(&out);
        assert_eq!(payload, b"a\\x0a\\xffb");
    }
}
