//! The codecs shipped inside the library, built from `codecs/json` and `codecs/raw`
//! (`codecs/build.sh`; the committed `.wasm` files are checked against their sources
//! in CI where the wasm32 target is installed), and compiled ahead of time by
//! `build.rs` for the machine the library is built on.

use crate::config::BuiltinCodec;

static JSON_CODEC: &[u8] = include_bytes!("../../codecs/json.wasm");
static RAW_CODEC: &[u8] = include_bytes!("../../codecs/raw.wasm");
static JSON_PRECOMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/json.cwasm"));
static RAW_PRECOMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/raw.cwasm"));

/// The module bytes of a built-in codec.
pub(crate) fn module_bytes(builtin: BuiltinCodec) -> &'static [u8] {
    match builtin {
        BuiltinCodec::Json => JSON_CODEC,
        BuiltinCodec::Raw => RAW_CODEC,
    }
}

/// The artifact `build.rs` compiled from [`module_bytes`] with this library's wasmtime
/// and engine configuration, or `None` if it compiled none.
pub(crate) fn precompiled(builtin: BuiltinCodec) -> Option<&'static [u8]> {
    let artifact = match builtin {
        BuiltinCodec::Json => JSON_PRECOMPILED,
        BuiltinCodec::Raw => RAW_PRECOMPILED,
    };
    (!artifact.is_empty()).then_some(artifact)
}
