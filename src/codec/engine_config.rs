//! The one wasmtime configuration of every codec engine. `build.rs` includes this file
//! too: the built-in codecs are compiled ahead of time with exactly this configuration,
//! which is what lets the library load them without compiling.

/// The engine configuration for codecs. `interruptible`: the compiled code checks the
/// engine's epoch at every function entry and loop header, which is what lets a call
/// be stopped when it overruns its time budget (`codec.max_call_ms`), and costs the
/// `json` codec about 15 % of its time (measured: 90 against 77 ns a frame); codecs
/// without a budget are compiled without the checks.
pub(crate) fn engine_config(interruptible: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(interruptible);
    // The whole 32-bit index space is reserved (address space only, nothing
    // resident) with a guard region after it, so cranelift elides the bounds
    // check on every load and store (measured: the json codec's throughput on one
    // connection rose 10 to 15 %). 1000 connections reserve 4 TiB of the 128 TiB
    // user address space. The memory limit is enforced by each store's limiter,
    // not by the reservation.
    config.memory_reservation(1 << 32);
    config.memory_guard_size(32 << 20);
    config.memory_reservation_for_growth(0);
    config.max_wasm_stack(512 * 1024);
    // Fixed, not read from WASMTIME_BACKTRACE_DETAILS (the default): a precompiled
    // module loads only into an engine with the same setting, and the codecs carry no
    // debug information to show anyway.
    config.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable);
    // For profiling: wasmtime writes /tmp/perf-<pid>.map, which perf reads to name
    // the codecs' functions. Not part of what an artifact must match.
    if std::env::var_os("WIREPOOL_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

/// x86-64 features build.rs compiles the built-in codecs without (cranelift's setting
/// names): cranelift uses them for SIMD only, which the codecs do not use, and leaving
/// them out lets one artifact load on CPUs that lack them.
#[allow(dead_code)] // build.rs and the tests
pub(crate) const LEFT_OUT_OF_ARTIFACTS_X86: [&str; 7] = [
    "has_avx512bitalg",
    "has_avx512dq",
    "has_avx512vl",
    "has_avx512vbmi",
    "has_avx512f",
    "has_avx512vnni",
    "has_avx_vnni",
];
