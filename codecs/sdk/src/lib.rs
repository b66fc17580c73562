//! Shared plumbing for wirepool codecs, ABI v1 (`docs/codec-abi.md`).
//!
//! A codec implements [`Codec`] and hands its type to [`export_codec!`], which expands
//! to the ABI exports (`wirepool_engine_features` among them). Everything the exports need lives here:
//!
//! - the input buffer the engine writes into (`wirepool_buffer`),
//! - the [`Output`] record writer behind `wirepool_output`, cleared before each call,
//! - [`Frames`], the inbound frames of one `wirepool_decode` batch,
//! - [`json`], a validating JSON scanner that allocates nothing,
//! - [`log`], the optional `wirepool.log` import,
//! - [`alloc`], a small global allocator that keeps an idle instance's heap on as few
//!   pages as possible (opt-in: `#[global_allocator]`).
//!
//! ```
//! use wirepool_sdk::{export_codec, Codec, Command, Fatal, Frames, Output};
//!
//! pub struct Echo;
//!
//! impl Codec for Echo {
//!     fn init(_config: &[u8], _token: &[u8], _out: &mut Output) -> Result<Self, Fatal> {
//!         Ok(Echo)
//!     }
//!     fn open(&mut self, out: &mut Output) -> Result<(), Fatal> {
//!         out.ready();
//!         Ok(())
//!     }
//!     fn decode(&mut self, frames: Frames<'_>, out: &mut Output) -> Result<(), Fatal> {
//!         for frame in frames {
//!             out.data(b"echo", frame.body);
//!         }
//!         Ok(())
//!     }
//!     fn encode(&mut self, _command: Command<'_>, _out: &mut Output) -> Result<(), Fatal> {
//!         Ok(())
//!     }
//! }
//!
//! export_codec!(Echo);
//! ```
//!
//! The crate builds for the host too, so codecs can be unit-tested and measured with a
//! plain `cargo test` through [`testing::Harness`]; the exports only exist on wasm32.

#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub mod alloc;
pub mod json;
pub mod log;

mod frames;
mod output;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod runtime;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use frames::{Frame, Frames};
pub use output::{Output, RecordWriter};

/// The ABI version these exports implement (`wirepool_abi_version`).
pub const ABI_VERSION: i32 = 1;

/// Output record kinds (`docs/codec-abi.md`, "Output records").
pub mod kind {
    /// Send a text frame upstream; payload = frame text.
    pub const SEND_TEXT: u32 = 1;
    /// Send a binary frame upstream; payload = frame bytes.
    pub const SEND_BINARY: u32 = 2;
    /// The session is authenticated and usable.
    pub const READY: u32 = 3;
    /// Subscription data: channel + message.
    pub const DATA: u32 = 4;
    /// A request succeeded: id + response body.
    pub const RESPONSE: u32 = 5;
    /// A request was rejected: id + error body.
    pub const REQUEST_ERROR: u32 = 6;
    /// A subscription was confirmed: channel + command id or 0.
    pub const SUBSCRIBED: u32 = 7;
    /// An unsubscription was confirmed: channel + command id or 0.
    pub const UNSUBSCRIBED: u32 = 8;
    /// An error not tied to a request: channel or empty + text.
    pub const ERROR: u32 = 9;
    /// An application pong or heartbeat arrived.
    pub const HEARTBEAT: u32 = 10;
    /// Shared state for the whole pool: key (in the channel field) + value.
    pub const SHARED: u32 = 11;
    /// Messages were lost upstream: channel + text describing the gap.
    pub const SEQUENCE_GAP: u32 = 12;
    /// The venue rejected the credentials: reason.
    pub const AUTH_FAILED: u32 = 13;
    /// An inbound frame could not be understood: reason.
    pub const MALFORMED: u32 = 14;
    /// The venue refused a subscription: channel + reason + command id or 0.
    pub const SUBSCRIBE_ERROR: u32 = 15;
    /// From now on inbound text and binary frames are data on this channel, unchanged
    /// (the engine may skip `decode` for them); an empty channel ends it.
    pub const PASSTHROUGH: u32 = 16;
    /// Subscription data whose message is `payload_len` bytes of the decode call's
    /// input at offset `id` (the record carries the channel only); written by
    /// [`Output::data`](crate::Output::data).
    pub const DATA_IN_INPUT: u32 = 17;
    /// The venue announced that this session will end (maintenance, an upgrade): the
    /// pool replaces the connection make before break; payload = reason.
    pub const RECONNECT: u32 = 18;
}

/// Bits of `wirepool_engine_features`' argument: the ABI v1 extensions the engine
/// understands (`docs/codec-abi.md`, "Engine features"). The runtime records them;
/// [`Output::data`] uses `DATA_IN_INPUT` only if the engine gave it.
pub mod feature {
    /// `DATA_IN_INPUT` records in `wirepool_decode`'s output.
    pub const DATA_IN_INPUT: i32 = 1;
    /// Every extension this SDK knows (what the test harness's engine understands).
    pub const ALL: i32 = DATA_IN_INPUT;
}

/// An outbound operation (`docs/codec-abi.md`, "Outbound commands").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 1: subscribe to the command's channel.
    Subscribe,
    /// 2: unsubscribe from the command's channel.
    Unsubscribe,
    /// 3: send the payload as a request; answer with RESPONSE or REQUEST_ERROR.
    Request,
    /// 4: emit an application ping if the protocol has one.
    Heartbeat,
    /// 5: forget the request id; emit nothing.
    Cancel,
    /// An op code this ABI version does not define.
    Unknown(i32),
}

impl Op {
    /// The op for an ABI op code.
    pub fn from_code(code: i32) -> Op {
        match code {
            1 => Op::Subscribe,
            2 => Op::Unsubscribe,
            3 => Op::Request,
            4 => Op::Heartbeat,
            5 => Op::Cancel,
            other => Op::Unknown(other),
        }
    }

    /// The ABI op code.
    pub fn code(self) -> i32 {
        match self {
            Op::Subscribe => 1,
            Op::Unsubscribe => 2,
            Op::Request => 3,
            Op::Heartbeat => 4,
            Op::Cancel => 5,
            Op::Unknown(code) => code,
        }
    }
}

/// One outbound command, as handed to [`Codec::encode`].
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    /// What to do.
    pub op: Op,
    /// Command or request id (positive, unique per pool).
    pub id: i64,
    /// Channel name (SUBSCRIBE / UNSUBSCRIBE), else empty.
    pub channel: &'a [u8],
    /// Request body (REQUEST), else empty.
    pub payload: &'a [u8],
}

/// The codec's state is broken: the export returns a non-zero code and the engine
/// replaces the connection. The message goes to the host log at error level.
///
/// Not for bad inbound frames: those are `MALFORMED` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal(pub String);

impl Fatal {
    /// A fatal error with this message.
    pub fn new(message: impl Into<String>) -> Fatal {
        Fatal(message.into())
    }
}

impl core::fmt::Display for Fatal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A protocol codec. One value lives per upstream connection (one wasm instance).
///
/// Every method appends its records to `out`, which the runtime has already cleared.
pub trait Codec: Sized {
    /// `wirepool_init`: build the codec from its JSON config (possibly empty, `null`
    /// or `{}`) and the auth token (possibly empty).
    fn init(config: &[u8], token: &[u8], out: &mut Output) -> Result<Self, Fatal>;
    /// `wirepool_open`: the WebSocket is open. Emit handshake frames, and `READY` once
    /// the session is usable (here or later from `decode`).
    fn open(&mut self, out: &mut Output) -> Result<(), Fatal>;
    /// `wirepool_decode`: a batch of inbound frames. A bad frame is a `MALFORMED`
    /// record, never an error.
    fn decode(&mut self, frames: Frames<'_>, out: &mut Output) -> Result<(), Fatal>;
    /// `wirepool_encode`: one outbound command.
    fn encode(&mut self, command: Command<'_>, out: &mut Output) -> Result<(), Fatal>;
    /// `wirepool_tick`: periodic; may emit heartbeat frames only. Defaults to nothing.
    fn tick(&mut self, now_ms: i64, out: &mut Output) -> Result<(), Fatal> {
        let _ = (now_ms, out);
        Ok(())
    }
}

/// Expands to the ABI v1 exports for a type implementing [`Codec`].
///
/// On targets other than wasm32 it expands to nothing, so a codec crate still builds
/// and tests on the host.
#[macro_export]
macro_rules! export_codec {
    ($codec:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static RUNTIME: $crate::runtime::Runtime<$codec> = $crate::runtime::Runtime::new();

            #[no_mangle]
            pub extern "C" fn wirepool_abi_version() -> i32 {
                $crate::ABI_VERSION
            }

            // SAFETY (all exports below): the host calls one export at a time and no
            // export calls back into another, so each call is the only user of RUNTIME.
            #[no_mangle]
            pub extern "C" fn wirepool_buffer(size: i32) -> i32 {
                unsafe { RUNTIME.buffer(size) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_engine_features(features: i32) {
                unsafe { RUNTIME.engine_features(features) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_init(config_len: i32, token_len: i32) -> i32 {
                unsafe { RUNTIME.init(config_len, token_len) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_open() -> i32 {
                unsafe { RUNTIME.open() }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_decode(count: i32, total_len: i32) -> i32 {
                unsafe { RUNTIME.decode(count, total_len) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_encode(
                op: i32,
                id: i64,
                channel_len: i32,
                payload_len: i32,
            ) -> i32 {
                unsafe { RUNTIME.encode(op, id, channel_len, payload_len) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_tick(now_ms: i64) -> i32 {
                unsafe { RUNTIME.tick(now_ms) }
            }

            #[no_mangle]
            pub extern "C" fn wirepool_output() -> i64 {
                unsafe { RUNTIME.output() }
            }
        };
    };
}

#[cfg(test)]
mod abi_tests {
    use super::{kind, Op};

    include!("abi_table.rs");

    const DOC: &str = include_str!("../../../docs/codec-abi.md");

    #[test]
    fn record_kinds_and_op_codes_match_the_documented_abi() {
        let kinds = record_kinds!(kind);
        assert_eq!(documented(DOC, "Output records"), kinds);
        let ops = [
            (Op::Subscribe, "SUBSCRIBE"),
            (Op::Unsubscribe, "UNSUBSCRIBE"),
            (Op::Request, "REQUEST"),
            (Op::Heartbeat, "HEARTBEAT"),
            (Op::Cancel, "CANCEL"),
        ]
        .map(|(op, name)| (i64::from(op.code()), name.to_string()));
        assert_eq!(documented(DOC, "Outbound commands"), ops);
        for (code, _) in &ops {
            let code = i32::try_from(*code).expect("small");
            assert_eq!(Op::from_code(code).code(), code, "op {code} round-trips");
        }
    }
    #[test]
    fn engine_feature_bits_match_the_documented_abi() {
        use super::feature;
        assert_eq!(
            documented(DOC, "Engine features"),
            engine_features!(feature)
        );
    }
}
