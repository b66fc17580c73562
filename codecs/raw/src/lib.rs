//! The `raw` codec: no protocol at all. Every inbound frame, text or binary, is one
//! data message on a configured channel, and a request's payload is sent as it is.
//!
//! Config (`codec.config`, all optional):
//! - `channel`: the channel of every data message. Defaults to `"raw"`.
//! - `request_mode`: `"fire_and_forget"` (default) answers each request at once with an
//!   empty RESPONSE; `"fifo"` makes the next inbound frame the response to the oldest
//!   request still pending.
//! - `subscribe_frame` / `unsubscribe_frame`: text frames sent for SUBSCRIBE /
//!   UNSUBSCRIBE, with every `{channel}` replaced by the channel name as is. Without
//!   them nothing is sent. SUBSCRIBED / UNSUBSCRIBED are reported at once either way.
//! - `passthrough`: `true` (default) tells the engine, with a `PASSTHROUGH` record, that
//!   inbound frames are data as they are, so it hands them to the consumer without a
//!   decode call; `false` has every frame decoded here (same messages, slower). In
//!   `fifo` mode passthrough is off while a request waits for its frame.

use std::collections::VecDeque;

use wirepool_sdk::json::{self, Kind};
use wirepool_sdk::{export_codec, kind, log, Codec, Command, Fatal, Frames, Op, Output};

/// An idle instance's heap stays on the page after its statics (see the SDK's `alloc`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: wirepool_sdk::alloc::CodecAllocator = wirepool_sdk::alloc::CodecAllocator::new();

export_codec!(RawCodec);

const CHANNEL_PLACEHOLDER: &[u8] = b"{channel}";

/// How requests are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestMode {
    /// An empty RESPONSE as soon as the request is sent.
    FireAndForget,
    /// The next inbound frame answers the oldest pending request.
    Fifo,
}

/// The codec's config (`codec.config`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    channel: Vec<u8>,
    request_mode: RequestMode,
    subscribe_frame: Option<Vec<u8>>,
    unsubscribe_frame: Option<Vec<u8>>,
    passthrough: bool,
}

const OPTION_NAMES: [&[u8]; 5] = [
    b"channel",
    b"request_mode",
    b"subscribe_frame",
    b"unsubscribe_frame",
    b"passthrough",
];

impl Options {
    fn parse(config: &[u8]) -> Result<Options, Fatal> {
        let mut options = Options {
            channel: b"raw".to_vec(),
            request_mode: RequestMode::FireAndForget,
            subscribe_frame: None,
            unsubscribe_frame: None,
            passthrough: true,
        };
        if config.iter().all(u8::is_ascii_whitespace) {
            return Ok(options);
        }
        let mut values = [None; 5];
        let top = json::scan(config, &OPTION_NAMES, &mut values)
            .map_err(|err| Fatal::new(format!("config is not valid JSON: {err}")))?;
        match top {
            Kind::Null => return Ok(options),
            Kind::Object => {}
            _ => return Err(Fatal::new("config must be a JSON object or null")),
        }
        let mut scratch = Vec::new();
        if let Some(value) = values[0] {
            match value.string(&mut scratch) {
                Some(channel) if !channel.is_empty() => options.channel = channel.to_vec(),
                _ => return Err(Fatal::new("config: channel must be a non-empty string")),
            }
        }
        if let Some(value) = values[1] {
            options.request_mode = match value.string(&mut scratch) {
                Some(b"fire_and_forget") => RequestMode::FireAndForget,
                Some(b"fifo") => RequestMode::Fifo,
                _ => {
                    return Err(Fatal::new(
                        "config: request_mode must be \"fire_and_forget\" or \"fifo\"",
                    ))
                }
            };
        }
        for (index, slot, name) in [
            (2, &mut options.subscribe_frame, "subscribe_frame"),
            (3, &mut options.unsubscribe_frame, "unsubscribe_frame"),
        ] {
            if let Some(value) = values[index] {
                *slot = match (value.kind(), value.string(&mut scratch)) {
                    (Kind::Null, _) => None,
                    (_, Some(template)) => Some(template.to_vec()),
                    (_, None) => {
                        return Err(Fatal::new(format!(
                            "config: {name} must be a string or null"
                        )))
                    }
                };
            }
        }
        if let Some(value) = values[4] {
            options.passthrough = match value.kind() {
                Kind::True => true,
                Kind::False => false,
                _ => return Err(Fatal::new("config: passthrough must be true or false")),
            };
        }
        Ok(options)
    }
}

/// One connection's state.
pub struct RawCodec {
    options: Options,
    /// Requests waiting for a frame, oldest first (`fifo` mode only).
    pending: VecDeque<i64>,
    /// What the engine was last told: frames pass through without `decode`.
    passing: bool,
}

impl RawCodec {
    /// Tells the engine when frames may pass through (configured, and no request
    /// waiting for one) and when they may not, if that changed.
    fn sync_passthrough(&mut self, out: &mut Output) {
        let wanted = self.options.passthrough && self.pending.is_empty();
        if wanted != self.passing {
            self.passing = wanted;
            out.passthrough(if wanted { &self.options.channel } else { b"" });
        }
    }
}

impl Codec for RawCodec {
    fn init(config: &[u8], _token: &[u8], _out: &mut Output) -> Result<RawCodec, Fatal> {
        Ok(RawCodec {
            options: Options::parse(config)?,
            pending: VecDeque::new(),
            passing: false,
        })
    }

    fn open(&mut self, out: &mut Output) -> Result<(), Fatal> {
        out.ready();
        self.sync_passthrough(out);
        Ok(())
    }

    fn decode(&mut self, frames: Frames<'_>, out: &mut Output) -> Result<(), Fatal> {
        for frame in frames {
            match self.pending.pop_front() {
                Some(id) => out.record(kind::RESPONSE, id, b"", frame.body),
                None => out.data(&self.options.channel, frame.body),
            }
        }
        self.sync_passthrough(out);
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
            Op::Subscribe => {
                send_template(self.options.subscribe_frame.as_deref(), channel, out);
                out.record(kind::SUBSCRIBED, id, channel, b"");
            }
            Op::Unsubscribe => {
                send_template(self.options.unsubscribe_frame.as_deref(), channel, out);
                out.record(kind::UNSUBSCRIBED, id, channel, b"");
            }
            Op::Request => {
                let frame_kind = if core::str::from_utf8(payload).is_ok() {
                    kind::SEND_TEXT
                } else {
                    kind::SEND_BINARY
                };
                out.record(frame_kind, 0, b"", payload);
                match self.options.request_mode {
                    RequestMode::FireAndForget => out.record(kind::RESPONSE, id, b"", b""),
                    RequestMode::Fifo => self.pending.push_back(id),
                }
            }
            Op::Heartbeat => {}
            Op::Cancel => {
                if let Some(at) = self.pending.iter().position(|pending| *pending == id) {
                    self.pending.remove(at);
                }
            }
            Op::Unknown(code) => log::warn(&format!("raw codec: ignoring unknown op {code}")),
        }
        self.sync_passthrough(out);
        Ok(())
    }
}

/// Sends `template` with each `{channel}` replaced, if there is a template.
fn send_template(template: Option<&[u8]>, channel: &[u8], out: &mut Output) {
    let Some(mut rest) = template else {
        return;
    };
    let mut frame = out.begin(kind::SEND_TEXT, 0, b"");
    while let Some(at) = rest
        .windows(CHANNEL_PLACEHOLDER.len())
        .position(|window| window == CHANNEL_PLACEHOLDER)
    {
        frame.push(&rest[..at]).push(channel);
        rest = &rest[at + CHANNEL_PLACEHOLDER.len()..];
    }
    frame.push(rest);
}

#[cfg(test)]
mod tests {
    use wirepool_sdk::testing::{Harness, Record};
    use wirepool_sdk::Frame;

    use super::*;

    fn codec(config: &str) -> Harness<RawCodec> {
        let (mut codec, _) = Harness::<RawCodec>::init(config.as_bytes(), b"token").expect("init");
        let opened = codec.open().unwrap();
        assert_eq!(opened[0].kind, kind::READY);
        codec
    }

    fn kinds(records: &[Record]) -> Vec<u32> {
        records.iter().map(|record| record.kind).collect()
    }

    #[test]
    fn config_options_and_defaults() {
        let (defaults, _) = Harness::<RawCodec>::init(b"null", b"").unwrap();
        assert_eq!(defaults.codec.options.channel, b"raw");
        assert_eq!(
            defaults.codec.options.request_mode,
            RequestMode::FireAndForget
        );
        let (custom, _) = Harness::<RawCodec>::init(
            br#"{"channel":"feed","request_mode":"fifo","subscribe_frame":"SUB {channel}","other":1}"#,
            b"",
        )
        .unwrap();
        assert_eq!(custom.codec.options.channel, b"feed");
        assert_eq!(custom.codec.options.request_mode, RequestMode::Fifo);
        assert!(custom.codec.options.passthrough, "on unless turned off");
        let (off, _) = Harness::<RawCodec>::init(br#"{"passthrough":false}"#, b"").unwrap();
        assert!(!off.codec.options.passthrough);
        assert_eq!(
            custom.codec.options.subscribe_frame.as_deref(),
            Some(&b"SUB {channel}"[..])
        );
        for bad in [
            "{",
            "[]",
            r#"{"channel":""}"#,
            r#"{"channel":1}"#,
            r#"{"request_mode":"lifo"}"#,
            r#"{"subscribe_frame":2}"#,
            r#"{"passthrough":1}"#,
            r#"{"passthrough":"yes"}"#,
        ] {
            assert!(
                Harness::<RawCodec>::init(bad.as_bytes(), b"").is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn every_frame_is_data_on_the_configured_channel() {
        let mut codec = codec(r#"{"channel":"feed"}"#);
        let records = codec
            .decode([
                Frame {
                    body: b"hello",
                    binary: false,
                },
                Frame {
                    body: b"\x00\xff",
                    binary: true,
                },
                Frame {
                    body: b"",
                    binary: false,
                },
            ])
            .unwrap();
        assert_eq!(kinds(&records), [kind::DATA; 3]);
        assert!(records.iter().all(|record| record.channel == b"feed"));
        assert_eq!(records[1].payload, b"\x00\xff");
    }

    #[test]
    fn fire_and_forget_requests_are_answered_at_once() {
        let mut codec = codec("{}");
        let text = codec.encode(Op::Request, 5, b"", b"GET /x").unwrap();
        assert_eq!(kinds(&text), [kind::SEND_TEXT, kind::RESPONSE]);
        assert_eq!(
            (text[0].payload.as_slice(), text[1].id),
            (&b"GET /x"[..], 5)
        );
        assert!(text[1].payload.is_empty());
        let binary = codec.encode(Op::Request, 6, b"", b"\xff\x00").unwrap();
        assert_eq!(kinds(&binary), [kind::SEND_BINARY, kind::RESPONSE]);
        let data = codec.decode_text(&[b"tick"]).unwrap();
        assert_eq!(kinds(&data), [kind::DATA], "nothing pending");
    }

    #[test]
    fn open_announces_passthrough_on_the_channel_unless_turned_off() {
        let (mut on, _) = Harness::<RawCodec>::init(br#"{"channel":"feed"}"#, b"").unwrap();
        let opened = on.open().unwrap();
        assert_eq!(kinds(&opened), [kind::READY, kind::PASSTHROUGH]);
        assert_eq!(opened[1].channel, b"feed");
        let (mut off, _) = Harness::<RawCodec>::init(br#"{"passthrough":false}"#, b"").unwrap();
        assert_eq!(kinds(&off.open().unwrap()), [kind::READY]);
        // Turned off, it never comes up, not even around fifo requests.
        let (mut fifo_off, _) =
            Harness::<RawCodec>::init(br#"{"passthrough":false,"request_mode":"fifo"}"#, b"")
                .unwrap();
        assert_eq!(kinds(&fifo_off.open().unwrap()), [kind::READY]);
        let sent = fifo_off.encode(Op::Request, 1, b"", b"q").unwrap();
        assert_eq!(kinds(&sent), [kind::SEND_TEXT]);
        let answered = fifo_off.decode_text(&[b"a"]).unwrap();
        assert_eq!(kinds(&answered), [kind::RESPONSE]);
    }

    #[test]
    fn fifo_requests_turn_passthrough_off_until_the_last_is_answered_or_cancelled() {
        let mut codec = codec(r#"{"request_mode":"fifo","channel":"feed"}"#);
        let first = codec.encode(Op::Request, 1, b"", b"q").unwrap();
        assert_eq!(kinds(&first), [kind::SEND_TEXT, kind::PASSTHROUGH]);
        assert!(first[1].channel.is_empty(), "off: the next frame is needed");
        let second = codec.encode(Op::Request, 2, b"", b"q").unwrap();
        assert_eq!(kinds(&second), [kind::SEND_TEXT], "already off");
        let answered = codec.decode_text(&[b"a"]).unwrap();
        assert_eq!(kinds(&answered), [kind::RESPONSE], "one still waits");
        let rest = codec.decode_text(&[b"b", b"c"]).unwrap();
        assert_eq!(
            kinds(&rest),
            [kind::RESPONSE, kind::DATA, kind::PASSTHROUGH],
            "the frames of this batch are decoded, later ones may pass"
        );
        assert_eq!(rest[2].channel, b"feed");
        let third = codec.encode(Op::Request, 3, b"", b"q").unwrap();
        assert_eq!(kinds(&third), [kind::SEND_TEXT, kind::PASSTHROUGH]);
        let cancelled = codec.encode(Op::Cancel, 3, b"", b"").unwrap();
        assert_eq!(kinds(&cancelled), [kind::PASSTHROUGH]);
        assert_eq!(cancelled[0].channel, b"feed");
    }

    #[test]
    fn fifo_requests_take_the_next_frames_in_order() {
        let mut codec = codec(r#"{"request_mode":"fifo","passthrough":false}"#);
        for id in [1, 2, 3] {
            let sent = codec.encode(Op::Request, id, b"", b"q").unwrap();
            assert_eq!(kinds(&sent), [kind::SEND_TEXT]);
        }
        assert!(codec.encode(Op::Cancel, 2, b"", b"").unwrap().is_empty());
        let records = codec.decode_text(&[b"a", b"b", b"c"]).unwrap();
        assert_eq!(
            kinds(&records),
            [kind::RESPONSE, kind::RESPONSE, kind::DATA]
        );
        assert_eq!((records[0].id, records[0].text()), (1, "a".into()));
        assert_eq!((records[1].id, records[1].text()), (3, "b".into()));
        assert_eq!(records[2].text(), "c");
    }

    #[test]
    fn subscriptions_are_confirmed_at_once_and_use_the_templates() {
        let mut codec = codec(
            r#"{"subscribe_frame":"{\"op\":\"sub\",\"args\":[\"{channel}\",\"{channel}\"]}"}"#,
        );
        let records = codec.encode(Op::Subscribe, 9, b"trades", b"").unwrap();
        assert_eq!(kinds(&records), [kind::SEND_TEXT, kind::SUBSCRIBED]);
        assert_eq!(
            records[0].text(),
            r#"{"op":"sub","args":["trades","trades"]}"#
        );
        assert_eq!(
            (records[1].id, records[1].channel_text()),
            (9, "trades".into())
        );

        let records = codec.encode(Op::Unsubscribe, 10, b"trades", b"").unwrap();
        assert_eq!(
            kinds(&records),
            [kind::UNSUBSCRIBED],
            "no template, nothing sent"
        );
        assert!(codec
            .encode(Op::Heartbeat, 11, b"", b"")
            .unwrap()
            .is_empty());
        assert!(codec.tick(5).unwrap().is_empty());
    }
}
