//! Compiles the built-in codecs (`codecs/*.wasm`) ahead of time into `OUT_DIR`, with
//! the engine configuration the library uses (`src/codec/engine_config.rs`), so a pool
//! with a built-in codec loads it without compiling: no ~100 ms compile at the first
//! `Pool::new` of a process, and none of the ~6 MB of compiler code pages it touches.
//!
//! The code is compiled for this machine's CPU, except on x86-64 without AVX-512 and
//! AVX-VNNI: cranelift uses those for SIMD only, which the built-in codecs do not use
//! (a test checks they validate without it), so the code is the same and the artifact
//! also loads on CPUs without them (AMD before Zen 4, most laptops). The library hands
//! it to wasmtime, which checks that it fits (its version and build, the configuration,
//! every CPU feature the code may use), and compiles the module itself when it does
//! not: on a CPU older than the build's (one without AVX2, say), or linked into a
//! program whose wasmtime has other features. Nothing is precompiled in a cross build
//! or with `WIREPOOL_NO_PRECOMPILE=1`.

use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "src/codec/engine_config.rs"]
mod engine_config;

const CODECS: [&str; 2] = ["json", "raw"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/codec/engine_config.rs");
    println!("cargo:rerun-if-env-changed=WIREPOOL_NO_PRECOMPILE");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let host = std::env::var("HOST").unwrap_or_default();
    let target = std::env::var("TARGET").unwrap_or_default();
    let opted_out = std::env::var("WIREPOOL_NO_PRECOMPILE")
        .is_ok_and(|value| !value.is_empty() && value != "0");
    let mut skipped = if host != target {
        Some(format!("a cross build ({host} -> {target})"))
    } else if opted_out {
        Some("WIREPOOL_NO_PRECOMPILE is set".to_string())
    } else {
        None
    };
    // The built-in codecs have no time budget unless a configuration asks for one
    // (`CodecConfig::max_call`): compiled without interruption checks. With a budget
    // the library compiles them when first used.
    let mut config = engine_config::engine_config(false);
    if target.starts_with("x86_64") {
        for flag in engine_config::LEFT_OUT_OF_ARTIFACTS_X86 {
            // SAFETY: turning a CPU feature off only keeps cranelift from using it.
            unsafe {
                config.cranelift_flag_set(flag, "false");
            }
        }
    }
    let engine = match skipped {
        None => match wasmtime::Engine::new(&config) {
            Ok(engine) => Some(engine),
            Err(err) => {
                skipped = Some(format!("creating the engine: {err:#}"));
                None
            }
        },
        Some(_) => None,
    };
    for name in CODECS {
        let source = Path::new("codecs").join(format!("{name}.wasm"));
        println!("cargo:rerun-if-changed={}", source.display());
        let wasm = std::fs::read(&source)
            .unwrap_or_else(|err| panic!("reading {}: {err}", source.display()));
        let artifact = match &engine {
            Some(engine) => engine.precompile_module(&wasm).unwrap_or_else(|err| {
                skipped = Some(format!("codecs/{name}.wasm: {err:#}"));
                Vec::new()
            }),
            // Empty: the library compiles this module when it is first used.
            None => Vec::new(),
        };
        // The library embeds these very bytes beside the artifact made from them (one
        // read: a module rebuilt during the build cannot pair with an older artifact).
        write(&out.join(format!("{name}.wasm")), &wasm);
        write(&out.join(format!("{name}.cwasm")), &artifact);
    }
    if let Some(why) = &skipped {
        println!("cargo:warning=built-in codecs not (all) precompiled ({why}); they are compiled when first used");
    }
    // For the tests: why there is no artifact, or nothing.
    println!(
        "cargo:rustc-env=WIREPOOL_NOT_PRECOMPILED={}",
        skipped.unwrap_or_default().replace(['\n', '\r'], " ")
    );
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
}
