//! Compiles the built-in codecs (`codecs/*.wasm`) ahead of time into `OUT_DIR`, with
//! the engine configuration the library uses (`src/codec/engine_config.rs`), so a pool
//! with a built-in codec loads it without compiling: no ~100 ms compile at the first
//! `Pool::new` of a process, and none of the ~9 MB of compiler code pages it touches.
//! The library checks each artifact against the machine it runs on and compiles the
//! module itself when it does not fit (another CPU, or a cross build: then nothing is
//! precompiled here).

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
    let skip = if host != target {
        Some(format!("a cross build ({host} -> {target})"))
    } else if std::env::var_os("WIREPOOL_NO_PRECOMPILE").is_some() {
        Some("WIREPOOL_NO_PRECOMPILE is set".to_string())
    } else {
        None
    };
    let engine = match skip {
        None => {
            match wasmtime::Engine::new(&engine_config::engine_config()) {
                Ok(engine) => Some(engine),
                Err(err) => {
                    println!("cargo:warning=built-in codecs not precompiled: creating the engine: {err:#}");
                    None
                }
            }
        }
        Some(_) => None,
    };
    for name in CODECS {
        let source = Path::new("codecs").join(format!("{name}.wasm"));
        println!("cargo:rerun-if-changed={}", source.display());
        let artifact = engine.as_ref().and_then(|engine| {
            let wasm = std::fs::read(&source)
                .unwrap_or_else(|err| panic!("reading {}: {err}", source.display()));
            match engine.precompile_module(&wasm) {
                Ok(artifact) => Some(artifact),
                Err(err) => {
                    println!("cargo:warning=codecs/{name}.wasm not precompiled: {err:#}");
                    None
                }
            }
        });
        // Empty: the library compiles this module when it is first used.
        let path = out.join(format!("{name}.cwasm"));
        std::fs::write(&path, artifact.unwrap_or_default())
            .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
    }
    if let Some(why) = skip {
        println!("cargo:warning=built-in codecs not precompiled: {why}; they are compiled when first used");
    }
}
