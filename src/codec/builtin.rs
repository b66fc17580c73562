//! The codecs shipped inside the library, built from `codecs/json` and `codecs/raw`
//! (`codecs/build.sh`; the committed `.wasm` files are checked against their sources
//! in CI where the wasm32 target is installed).

use crate::config::BuiltinCodec;

static JSON_CODEC: &[u8] = include_bytes!("../../codecs/json.wasm");
static RAW_CODEC: &[u8] = include_bytes!("../../codecs/raw.wasm");

/// The module bytes of a built-in codec.
pub(crate) fn module_bytes(builtin: BuiltinCodec) -> &'static [u8] {
    match builtin {
        BuiltinCodec::Json => JSON_CODEC,
        BuiltinCodec::Raw => RAW_CODEC,
    }
}
