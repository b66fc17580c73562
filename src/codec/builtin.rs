//! The codecs shipped inside the library, built from `codecs/json` and `codecs/raw`
//! (`codecs/build.sh`; the committed `.wasm` files are checked against their sources
//! in CI where the wasm32 target is installed), and compiled ahead of time by
//! `build.rs` (for the build machine's CPU; on x86-64 without AVX-512 and AVX-VNNI, so
//! that CPUs without them load it too). Both come from `OUT_DIR`, where build.rs put
//! the module bytes it compiled beside the artifact it made of them.

use crate::config::BuiltinCodec;

static JSON_CODEC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/json.wasm"));
static RAW_CODEC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/raw.wasm"));
static JSON_PRECOMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/json.cwasm"));
static RAW_PRECOMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/raw.cwasm"));

/// Why build.rs precompiled nothing (empty when it did), for the tests.
#[cfg(test)]
pub(crate) const NOT_PRECOMPILED: &str = env!("WIREPOOL_NOT_PRECOMPILED");

/// A compiled module made by `Engine::precompile_module` in build.rs, embedded in this
/// library: the only bytes the engine ever hands to `Module::deserialize`. Only this
/// module makes one.
#[derive(Clone, Copy)]
pub(crate) struct Precompiled(&'static [u8]);

impl Precompiled {
    pub(crate) fn bytes(self) -> &'static [u8] {
        self.0
    }

    /// For tests: an artifact the test made itself with `precompile_module`.
    ///
    /// # Safety
    /// `bytes` must be unmodified output of `Engine::precompile_module` or
    /// `Module::serialize`.
    #[cfg(test)]
    pub(crate) unsafe fn from_precompile_output(bytes: &'static [u8]) -> Precompiled {
        Precompiled(bytes)
    }
}

/// The module bytes of a built-in codec.
pub(crate) fn module_bytes(builtin: BuiltinCodec) -> &'static [u8] {
    match builtin {
        BuiltinCodec::Json => JSON_CODEC,
        BuiltinCodec::Raw => RAW_CODEC,
    }
}

/// The artifact `build.rs` compiled from [`module_bytes`] with this library's wasmtime
/// and engine configuration (for the build machine's CPU, on x86-64 without AVX-512
/// and AVX-VNNI), or `None` if it compiled none.
pub(crate) fn precompiled(builtin: BuiltinCodec) -> Option<Precompiled> {
    let artifact = match builtin {
        BuiltinCodec::Json => JSON_PRECOMPILED,
        BuiltinCodec::Raw => RAW_PRECOMPILED,
    };
    (!artifact.is_empty()).then_some(Precompiled(artifact))
}
