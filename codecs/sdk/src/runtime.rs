//! The state behind the exports of [`export_codec!`](crate::export_codec): the input
//! buffer, the output records and the codec value, in one static per module.
//!
//! Why a static with interior mutability is sound here: a wasm32 module built without
//! the `atomics` feature has exactly one thread, the host calls one export at a time,
//! and the only import (`wirepool.log`) never calls back into the module. So each
//! export is the only code touching the state while it runs; the `unsafe fn`s below
//! state that contract and the macro's exports are their only callers.

use core::cell::UnsafeCell;

use crate::{log, Codec, Command, Fatal, Op, Output};

/// Per-instance state of one codec module.
pub struct Runtime<C> {
    state: UnsafeCell<State<C>>,
}

struct State<C> {
    /// The input buffer; its length is the largest size ever asked for, so every byte
    /// the engine may write is initialised and growing is amortised.
    input: Vec<u8>,
    output: Output,
    codec: Option<C>,
}

// SAFETY: see the module comment. Only compiled for single-threaded wasm, where no
// second thread can exist to observe the state.
#[cfg(not(target_feature = "atomics"))]
unsafe impl<C> Sync for Runtime<C> {}

impl<C: Codec> Runtime<C> {
    /// An empty runtime, for a `static`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Runtime<C> {
        Runtime {
            state: UnsafeCell::new(State {
                input: Vec::new(),
                output: Output::new(),
                codec: None,
            }),
        }
    }

    /// # Safety
    /// No other reference into this runtime may be alive: only one export runs at a
    /// time and none re-enters another.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state(&self) -> &mut State<C> {
        &mut *self.state.get()
    }

    /// `wirepool_buffer(size)`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn buffer(&self, size: i32) -> i32 {
        let input = &mut self.state().input;
        let Ok(size) = usize::try_from(size) else {
            return 0;
        };
        // Never hand out a dangling pointer, even for a zero-sized request.
        let size = size.max(1);
        if size > input.len() {
            if input.try_reserve(size - input.len()).is_err() {
                return 0;
            }
            input.resize(size, 0);
        }
        input.as_mut_ptr() as usize as i32
    }

    /// `wirepool_engine_features(features)`: what the engine understands, called
    /// before `wirepool_init` (by engines that know the export).
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn engine_features(&self, features: i32) {
        self.state().output.set_engine_features(features);
    }

    /// `wirepool_init(config_len, token_len)`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn init(&self, config_len: i32, token_len: i32) -> i32 {
        let state = self.state();
        state.output.clear();
        let result = input_pair(&state.input, config_len, token_len)
            .and_then(|(config, token)| C::init(config, token, &mut state.output));
        match result {
            Ok(codec) => {
                state.codec = Some(codec);
                0
            }
            Err(fatal) => failed("wirepool_init", &fatal),
        }
    }

    /// `wirepool_open()`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn open(&self) -> i32 {
        let state = self.state();
        state.output.clear();
        let result = match state.codec.as_mut() {
            Some(codec) => codec.open(&mut state.output),
            None => Err(not_initialised()),
        };
        status("wirepool_open", result)
    }

    /// `wirepool_decode(count, total_len)`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn decode(&self, count: i32, total_len: i32) -> i32 {
        let state = self.state();
        state.output.clear();
        let result = match state.codec.as_mut() {
            Some(codec) => input_pair(&state.input, total_len, 0).and_then(|(batch, _)| {
                crate::frames::decode_batch(codec, batch, count, &mut state.output)
            }),
            None => Err(not_initialised()),
        };
        status("wirepool_decode", result)
    }

    /// `wirepool_encode(op, id, channel_len, payload_len)`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn encode(&self, op: i32, id: i64, channel_len: i32, payload_len: i32) -> i32 {
        let state = self.state();
        state.output.clear();
        let result = match state.codec.as_mut() {
            Some(codec) => {
                input_pair(&state.input, channel_len, payload_len).and_then(|(channel, payload)| {
                    let command = Command {
                        op: Op::from_code(op),
                        id,
                        channel,
                        payload,
                    };
                    codec.encode(command, &mut state.output)
                })
            }
            None => Err(not_initialised()),
        };
        status("wirepool_encode", result)
    }

    /// `wirepool_tick(now_ms)`.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn tick(&self, now_ms: i64) -> i32 {
        let state = self.state();
        state.output.clear();
        let result = match state.codec.as_mut() {
            Some(codec) => codec.tick(now_ms, &mut state.output),
            None => Err(not_initialised()),
        };
        status("wirepool_tick", result)
    }

    /// `wirepool_output()`: `(ptr << 32) | len` of the last call's records.
    ///
    /// # Safety
    /// As for [`Runtime::state`].
    pub unsafe fn output(&self) -> i64 {
        let bytes = self.state().output.as_bytes();
        let ptr = bytes.as_ptr() as usize as u64;
        let len = bytes.len() as u64;
        ((ptr << 32) | (len & 0xffff_ffff)) as i64
    }
}

/// The first `first_len` and the next `second_len` bytes of the input buffer.
fn input_pair(input: &[u8], first_len: i32, second_len: i32) -> Result<(&[u8], &[u8]), Fatal> {
    let lengths = usize::try_from(first_len)
        .ok()
        .zip(usize::try_from(second_len).ok());
    let Some((first, second)) = lengths else {
        return Err(Fatal::new("negative input length"));
    };
    match first.checked_add(second) {
        Some(total) if total <= input.len() => {
            let (head, rest) = input.split_at(first);
            Ok((head, &rest[..second]))
        }
        _ => Err(Fatal::new(
            "input lengths exceed the buffer from wirepool_buffer",
        )),
    }
}

fn not_initialised() -> Fatal {
    Fatal::new("called before wirepool_init succeeded")
}

fn status(export: &str, result: Result<(), Fatal>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(fatal) => failed(export, &fatal),
    }
}

fn failed(export: &str, fatal: &Fatal) -> i32 {
    let mut message = String::with_capacity(export.len() + 2 + fatal.0.len());
    message.push_str(export);
    message.push_str(": ");
    message.push_str(&fatal.0);
    log::log(log::Level::Error, &message);
    1
}
