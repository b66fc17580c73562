//! The default codec: wirepool's JSON protocol (`shared/SPEC.md` section 4).
//!
//! Client to server, one text frame each:
//! `{"type":"subscribe"|"unsubscribe"|"ping"|"data"|"auth", "channel"?, "payload"?, "messageId"}`
//! with message ids `s<id>` (subscribe), `u<id>` (unsubscribe), `r<id>` (request),
//! `h<id>` (ping) and `auth`. Server to client: `subscribed`, `unsubscribed`, `data`,
//! `pong`, `error` and `shared` frames (see `codecs/README.md` for the mapping to
//! records).
//!
//! Subscription data is the hot path: one validating pass over the frame finds the
//! top-level members, and the record is written straight from the frame's bytes; the
//! payload is the member's text exactly as it stood, never re-serialised.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};

use wirepool_sdk::json::{self, Kind, Value};
use wirepool_sdk::{export_codec, kind, log, Codec, Command, Fatal, Frames, Op, Output};

/// An idle instance's heap stays on the page after its statics (see the SDK's `alloc`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: wirepool_sdk::alloc::CodecAllocator = wirepool_sdk::alloc::CodecAllocator::new();

export_codec!(JsonCodec);

/// How much of a bad frame a `MALFORMED` reason quotes.
const EXCERPT_BYTES: usize = 64;
/// Channels whose sequence numbers are tracked at most; a venue sending data on ever
/// new channels cannot grow the table without bound.
const MAX_TRACKED_CHANNELS: usize = 4096;

/// Indexes into the members picked out of each frame.
const TYPE: usize = 0;
const CHANNEL: usize = 1;
const MESSAGE_ID: usize = 2;
const PAYLOAD: usize = 3;
const KEY: usize = 4;
const SEQUENCE: usize = 5;
const MEMBER_NAMES: [&[u8]; 5] = [b"type", b"channel", b"messageId", b"payload", b"key"];

/// The codec's config (`codec.config`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    /// HEARTBEAT sends `{"type":"ping","messageId":"h<id>"}`. Defaults to true.
    app_heartbeat: bool,
    /// Top-level integer member of data frames checked for gaps; `None` turns the check
    /// off. Defaults to `seq`.
    sequence_field: Option<Vec<u8>>,
}

impl Options {
    fn parse(config: &[u8]) -> Result<Options, Fatal> {
        let mut options = Options {
            app_heartbeat: true,
            sequence_field: Some(b"seq".to_vec()),
        };
        if config.iter().all(u8::is_ascii_whitespace) {
            return Ok(options);
        }
        let mut values = [None; 2];
        let top = json::scan(config, &[b"app_heartbeat", b"sequence_field"], &mut values)
            .map_err(|err| Fatal::new(format!("config is not valid JSON: {err}")))?;
        match top {
            Kind::Null => return Ok(options),
            Kind::Object => {}
            _ => return Err(Fatal::new("config must be a JSON object or null")),
        }
        if let Some(value) = values[0] {
            options.app_heartbeat = value
                .as_bool()
                .ok_or_else(|| Fatal::new("config: app_heartbeat must be true or false"))?;
        }
        if let Some(value) = values[1] {
            let mut scratch = Vec::new();
            options.sequence_field = match (value.kind(), value.string(&mut scratch)) {
                (Kind::Null, _) => None,
                (_, Some(b"")) => None,
                (_, Some(name)) => Some(name.to_vec()),
                (_, None) => {
                    return Err(Fatal::new(
                        "config: sequence_field must be a string or null",
                    ))
                }
            };
        }
        Ok(options)
    }
}

/// The `type` of an inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameType {
    Data,
    Error,
    Subscribed,
    Unsubscribed,
    Pong,
    Shared,
    Reconnect,
    Other,
}

impl FrameType {
    fn of(name: &[u8]) -> FrameType {
        match name {
            b"data" => FrameType::Data,
            b"error" => FrameType::Error,
            b"subscribed" => FrameType::Subscribed,
            b"unsubscribed" => FrameType::Unsubscribed,
            b"pong" => FrameType::Pong,
            b"shared" => FrameType::Shared,
            b"reconnect" => FrameType::Reconnect,
            _ => FrameType::Other,
        }
    }
}

/// An inbound frame's `messageId`, as this codec wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageId {
    Absent,
    Auth,
    Request(i64),
    Subscribe(i64),
    Unsubscribe(i64),
    Heartbeat(i64),
    /// Not one of ours.
    Other,
}

impl MessageId {
    fn parse(text: &[u8]) -> MessageId {
        if text == b"auth" {
            return MessageId::Auth;
        }
        let Some((&prefix, digits)) = text.split_first() else {
            return MessageId::Other;
        };
        let id = parse_id(digits);
        match (prefix, id) {
            (b'r', Some(id)) => MessageId::Request(id),
            (b's', Some(id)) => MessageId::Subscribe(id),
            (b'u', Some(id)) => MessageId::Unsubscribe(id),
            (b'h', Some(id)) => MessageId::Heartbeat(id),
            _ => MessageId::Other,
        }
    }
}

/// A positive decimal id, as the engine hands them out.
fn parse_id(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut id: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        id = id.checked_mul(10)?.checked_add(i64::from(digit - b'0'))?;
    }
    (id > 0).then_some(id)
}

/// A fast hasher for the codec's small tables: ids come from the engine, and the
/// channel table is capped, so hash flooding cannot grow into a problem.
#[derive(Default)]
struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.add(u64::from_le_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ]));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut word = [0u8; 8];
            word[..tail.len()].copy_from_slice(tail);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_i64(&mut self, value: i64) {
        self.add(value as u64);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }
}

type FastBuild = BuildHasherDefault<FastHasher>;

/// Buffers for strings that need unescaping, reused from frame to frame.
#[derive(Default)]
struct Scratch {
    type_name: Vec<u8>,
    channel: Vec<u8>,
    message_id: Vec<u8>,
    text: Vec<u8>,
}

/// One connection's protocol state.
pub struct JsonCodec {
    options: Options,
    token: Vec<u8>,
    /// `auth` was sent and its reply has not come yet.
    awaiting_auth: bool,
    /// Request ids sent and not yet answered or cancelled.
    pending_requests: HashSet<i64, FastBuild>,
    /// Subscribe / unsubscribe command id → channel, until the venue answers.
    pending_commands: HashMap<i64, Vec<u8>, FastBuild>,
    /// Last sequence number seen per channel.
    sequences: Sequences,
    scratch: Scratch,
    /// Data frames of the usual shape take [`usual_data_frame`]; off when the sequence
    /// field shares a member's name, and in the tests that compare the two paths.
    fast_path: bool,
}

impl Codec for JsonCodec {
    fn init(config: &[u8], token: &[u8], _out: &mut Output) -> Result<JsonCodec, Fatal> {
        let options = Options::parse(config)?;
        // A sequence field named like a member the codec reads (say "payload") makes
        // duplicate-looking frames ambiguous: those codecs keep to the general path.
        let fast_path = !options
            .sequence_field
            .as_deref()
            .is_some_and(|field| MEMBER_NAMES.contains(&field));
        Ok(JsonCodec {
            options,
            token: token.to_vec(),
            awaiting_auth: false,
            pending_requests: HashSet::default(),
            pending_commands: HashMap::default(),
            sequences: Sequences::default(),
            scratch: Scratch::default(),
            fast_path,
        })
    }

    fn open(&mut self, out: &mut Output) -> Result<(), Fatal> {
        if self.token.is_empty() {
            out.ready();
        } else {
            out.begin(kind::SEND_TEXT, 0, b"")
                .push(b"{\"type\":\"auth\",\"token\":")
                .push_json_string(&self.token)
                .push(b",\"messageId\":\"auth\"}");
            self.awaiting_auth = true;
        }
        Ok(())
    }

    fn decode(&mut self, frames: Frames<'_>, out: &mut Output) -> Result<(), Fatal> {
        for frame in frames {
            if frame.binary {
                malformed(
                    out,
                    "binary frame (the json codec reads text frames)",
                    None,
                    frame.body,
                );
            } else {
                self.decode_frame(frame.body, out);
            }
        }
        Ok(())
    }

    fn encode(&mut self, command: Command<'_>, out: &mut Output) -> Result<(), Fatal> {
        let Command {
            op,
            id,
            channel,
            payload,
        } = command;
        match op {
            Op::Subscribe | Op::Unsubscribe => {
                let (frame_type, prefix): (&[u8], &[u8]) = if op == Op::Subscribe {
                    (b"subscribe", b"s")
                } else {
                    (b"unsubscribe", b"u")
                };
                out.begin(kind::SEND_TEXT, 0, b"")
                    .push(b"{\"type\":\"")
                    .push(frame_type)
                    .push(b"\",\"channel\":")
                    .push_json_string(channel)
                    .push(b",\"messageId\":\"")
                    .push(prefix)
                    .push_i64(id)
                    .push(b"\"}");
                self.pending_commands.insert(id, channel.to_vec());
            }
            Op::Request => match json::validate(payload) {
                Ok(_) => {
                    out.begin(kind::SEND_TEXT, 0, b"")
                        .push(b"{\"type\":\"data\",\"payload\":")
                        .push(payload)
                        .push(b",\"messageId\":\"r")
                        .push_i64(id)
                        .push(b"\"}");
                    self.pending_requests.insert(id);
                }
                Err(err) => {
                    let mut reason = out.begin(kind::REQUEST_ERROR, id, b"");
                    let _ = write!(reason, "request payload is not valid JSON: {err}");
                }
            },
            Op::Heartbeat => {
                if self.options.app_heartbeat {
                    out.begin(kind::SEND_TEXT, 0, b"")
                        .push(b"{\"type\":\"ping\",\"messageId\":\"h")
                        .push_i64(id)
                        .push(b"\"}");
                }
            }
            Op::Cancel => {
                self.pending_requests.remove(&id);
            }
            Op::Unknown(code) => log::warn(&format!("json codec: ignoring unknown op {code}")),
        }
        Ok(())
    }
}

impl JsonCodec {
    fn decode_frame(&mut self, body: &[u8], out: &mut Output) {
        let sequence_field = self.options.sequence_field.as_deref();
        if self.fast_path {
            if let Some(data) = usual_data_frame(body, sequence_field) {
                if let Some(sequence) = data.sequence {
                    self.sequences.check(data.channel, sequence, out);
                }
                return out.data(data.channel, data.payload);
            }
        }
        let mut names = [b"".as_slice(); 6];
        names[..5].copy_from_slice(&MEMBER_NAMES);
        let name_count = match sequence_field {
            Some(name) => {
                names[SEQUENCE] = name;
                6
            }
            None => 5,
        };
        let mut members: [Option<Value<'_>>; 6] = [None; 6];
        match json::scan(body, &names[..name_count], &mut members) {
            Ok(Kind::Object) => {}
            Ok(_) => return malformed(out, "not a JSON object", None, body),
            Err(err) => {
                let mut reason = out.malformed();
                let _ = write!(reason, "not valid JSON: {err}: ");
                reason.push_excerpt(body, EXCERPT_BYTES);
                return;
            }
        }
        let scratch = &mut self.scratch;
        let Some(type_name) = members[TYPE].and_then(|value| value.string(&mut scratch.type_name))
        else {
            return malformed(out, "no string \"type\" member", None, body);
        };
        let message_id = match members[MESSAGE_ID] {
            None => MessageId::Absent,
            Some(value) => match value.string(&mut scratch.message_id) {
                Some(text) => MessageId::parse(text),
                None => return malformed(out, "\"messageId\" is not a string", None, body),
            },
        };
        let channel = match members[CHANNEL] {
            None => None,
            Some(value) => match value.string(&mut scratch.channel) {
                Some(channel) => Some(channel),
                None => return malformed(out, "\"channel\" is not a string", None, body),
            },
        };
        let payload = members[PAYLOAD];
        let frame_type = FrameType::of(type_name);

        if self.awaiting_auth && message_id == MessageId::Auth {
            self.awaiting_auth = false;
            if frame_type == FrameType::Error {
                let reason = error_text(payload, body, &mut scratch.text);
                out.record(kind::AUTH_FAILED, 0, b"", reason);
            } else {
                out.ready();
            }
            return;
        }

        match frame_type {
            FrameType::Data => {
                if let MessageId::Request(id) = message_id {
                    if self.pending_requests.remove(&id) {
                        let response = payload.map_or(&b"null"[..], |value| value.raw());
                        return out.record(kind::RESPONSE, id, b"", response);
                    }
                }
                let Some(channel) = channel else {
                    return match message_id {
                        MessageId::Absent => malformed(
                            out,
                            "data frame without \"channel\" or \"messageId\"",
                            None,
                            body,
                        ),
                        _ => malformed(
                            out,
                            "response to unknown request",
                            Some(members[MESSAGE_ID].map_or(&b""[..], |value| value.raw())),
                            body,
                        ),
                    };
                };
                if let Some(sequence) = members[SEQUENCE].and_then(|value| value.as_i64()) {
                    self.sequences.check(channel, sequence, out);
                }
                let data = payload.map_or(&b"null"[..], |value| value.raw());
                out.data(channel, data);
            }
            FrameType::Error => {
                let reason = error_text(payload, body, &mut scratch.text);
                match message_id {
                    MessageId::Request(id) if self.pending_requests.remove(&id) => {
                        out.record(kind::REQUEST_ERROR, id, b"", reason);
                    }
                    MessageId::Subscribe(id) => {
                        let remembered = self.pending_commands.remove(&id);
                        let channel = channel.or(remembered.as_deref()).unwrap_or(b"");
                        out.record(kind::SUBSCRIBE_ERROR, id, channel, reason);
                    }
                    MessageId::Unsubscribe(id) => {
                        let remembered = self.pending_commands.remove(&id);
                        let channel = channel.or(remembered.as_deref()).unwrap_or(b"");
                        out.record(kind::ERROR, 0, channel, reason);
                    }
                    _ => out.record(kind::ERROR, 0, channel.unwrap_or(b""), reason),
                }
            }
            FrameType::Subscribed | FrameType::Unsubscribed => {
                let (record_kind, id) = match (frame_type, message_id) {
                    (FrameType::Subscribed, MessageId::Subscribe(id)) => (kind::SUBSCRIBED, id),
                    (FrameType::Subscribed, _) => (kind::SUBSCRIBED, 0),
                    (_, MessageId::Unsubscribe(id)) => (kind::UNSUBSCRIBED, id),
                    _ => (kind::UNSUBSCRIBED, 0),
                };
                let remembered = if id > 0 {
                    self.pending_commands.remove(&id)
                } else {
                    None
                };
                let Some(channel) = channel.or(remembered.as_deref()) else {
                    return malformed(out, "confirmation without \"channel\"", None, body);
                };
                // A new subscription starts a new sequence.
                self.sequences.forget(channel);
                out.record(record_kind, id, channel, b"");
            }
            FrameType::Pong => {
                let id = match message_id {
                    MessageId::Heartbeat(id) => id,
                    _ => 0,
                };
                out.record(kind::HEARTBEAT, id, b"", b"");
            }
            FrameType::Shared => {
                let Some(key) = members[KEY].and_then(|value| value.string(&mut scratch.text))
                else {
                    return malformed(out, "shared frame without a string \"key\"", None, body);
                };
                let value = payload.map_or(&b"null"[..], |value| value.raw());
                out.record(kind::SHARED, 0, key, value);
            }
            FrameType::Reconnect => {
                // The venue's notice that this session will end: the pool moves to a
                // new connection before it does.
                let reason = error_text(payload, body, &mut scratch.text);
                out.record(kind::RECONNECT, 0, b"", reason);
            }
            FrameType::Other => malformed(
                out,
                "unknown type",
                members[TYPE].map(|value| value.raw()),
                body,
            ),
        }
    }
}

/// A subscription data frame read by [`usual_data_frame`].
struct UsualData<'a> {
    channel: &'a [u8],
    sequence: Option<i64>,
    payload: &'a [u8],
}

/// The hot path: a data frame exactly of the shape venues speaking this protocol send,
/// `{"type":"data","channel":"<name>","<sequence field>":<integer>,"payload":<value>}`
/// (the sequence member optional; no whitespace between members; a channel name of
/// plain ASCII). Only the payload goes through the validating scanner; the members
/// around it are matched byte for byte. Anything else (another order, whitespace,
/// escapes, a `messageId`, a fraction, any doubt) returns `None` and takes the general
/// path, which gives the same records for such frames (`tests::fast_path_*` compare
/// the two on many thousands of frames and their mutations).
fn usual_data_frame<'a>(body: &'a [u8], sequence_field: Option<&[u8]>) -> Option<UsualData<'a>> {
    const HEAD: &[u8] = br#"{"type":"data","channel":""#;
    const PAYLOAD: &[u8] = br#","payload":"#;
    let rest = body.strip_prefix(HEAD)?;
    let (channel, rest) = rest.split_at(json::plain_run_end(rest, 0));
    let mut rest = rest.strip_prefix(b"\"")?;
    let mut sequence = None;
    if let (Some(field), Some(after)) = (sequence_field, rest.strip_prefix(b",\"")) {
        if let Some(after) = after
            .strip_prefix(field)
            .and_then(|after| after.strip_prefix(b"\":"))
        {
            let (value, after) = small_integer(after)?;
            sequence = Some(value);
            rest = after;
        }
    }
    let payload = rest.strip_prefix(PAYLOAD)?.strip_suffix(b"}")?;
    // The value exactly, without whitespace around it (the general path hands over the
    // value's own text).
    let (first, last) = (*payload.first()?, *payload.last()?);
    if first.is_ascii_whitespace() || last.is_ascii_whitespace() {
        return None;
    }
    json::validate(payload).ok()?;
    Some(UsualData {
        channel,
        sequence,
        payload,
    })
}

/// A JSON integer of at most 18 digits (so it fits an `i64` with room to spare)
/// followed by `,`; the value and the text from the comma on.
fn small_integer(text: &[u8]) -> Option<(i64, &[u8])> {
    let (negative, digits) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, text),
    };
    let count = json::digits_end(digits, 0);
    if count == 0
        || count > 18
        || (digits[0] == b'0' && count > 1)
        || digits.get(count) != Some(&b',')
    {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in &digits[..count] {
        value = value * 10 + i64::from(digit - b'0');
    }
    Some((if negative { -value } else { value }, &digits[count..]))
}

/// The last sequence number seen per channel (at most [`MAX_TRACKED_CHANNELS`]).
///
/// A feed mostly comes in runs of one channel, so the slot of the channel seen last is
/// kept at hand with a copy of its name: a frame of the same channel costs a compare of
/// the name instead of hashing it and probing the table.
#[derive(Default)]
struct Sequences {
    /// Channel → index into `last`.
    slots: HashMap<Box<[u8]>, usize, FastBuild>,
    last: Vec<i64>,
    /// Slots of forgotten channels, for reuse.
    free: Vec<usize>,
    /// The channel seen last, and its slot (`None` when none is at hand).
    recent: Vec<u8>,
    recent_slot: Option<usize>,
}

impl Sequences {
    /// Checks `sequence` against the last one seen on `channel`, emitting
    /// `SEQUENCE_GAP` when it is not the next; the first one seen only sets the
    /// baseline.
    fn check(&mut self, channel: &[u8], sequence: i64, out: &mut Output) {
        let slot = match self.recent_slot {
            Some(slot)
                if self.recent.len() == channel.len()
                    && json::same_bytes(&self.recent, channel) =>
            {
                slot
            }
            _ => match self.lookup(channel, sequence) {
                Some(slot) => slot,
                None => return,
            },
        };
        let last = &mut self.last[slot];
        let expected = last.wrapping_add(1);
        if sequence != expected {
            out.begin(kind::SEQUENCE_GAP, 0, channel)
                .push(b"expected ")
                .push_i64(expected)
                .push(b", got ")
                .push_i64(sequence);
        }
        *last = sequence;
    }

    /// The slot of a known `channel`, made the recent one. A new channel gets a slot
    /// with `sequence` as its baseline (if the table has room) and `None`.
    fn lookup(&mut self, channel: &[u8], sequence: i64) -> Option<usize> {
        let (slot, known) = match self.slots.get(channel) {
            Some(&slot) => (slot, true),
            None if self.slots.len() >= MAX_TRACKED_CHANNELS => return None,
            None => {
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.last[slot] = sequence;
                        slot
                    }
                    None => {
                        self.last.push(sequence);
                        self.last.len() - 1
                    }
                };
                self.slots.insert(channel.into(), slot);
                (slot, false)
            }
        };
        self.recent.clear();
        self.recent.extend_from_slice(channel);
        self.recent_slot = Some(slot);
        known.then_some(slot)
    }

    /// Forgets `channel`: its next sequence number is a new baseline.
    fn forget(&mut self, channel: &[u8]) {
        if let Some(slot) = self.slots.remove(channel) {
            self.free.push(slot);
            if self.recent_slot == Some(slot) {
                self.recent_slot = None;
            }
        }
    }
}

/// The text of an error frame: its `payload` unquoted when a string, as JSON text
/// otherwise, and the whole frame when it has none.
fn error_text<'s>(
    payload: Option<Value<'s>>,
    body: &'s [u8],
    scratch: &'s mut Vec<u8>,
) -> &'s [u8] {
    match payload {
        Some(value) => match value.string(scratch) {
            Some(text) => text,
            None => value.raw(),
        },
        None => body,
    }
}

/// A `MALFORMED` record: `<reason>[ <detail>]: <start of the frame>`.
fn malformed(out: &mut Output, reason: &str, detail: Option<&[u8]>, body: &[u8]) {
    let mut writer = out.malformed();
    writer.push_str(reason);
    if let Some(detail) = detail {
        writer.push(b" ").push_excerpt(detail, EXCERPT_BYTES);
    }
    writer.push(b": ").push_excerpt(body, EXCERPT_BYTES);
}

#[cfg(test)]
mod tests;
