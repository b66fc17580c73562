#!/usr/bin/env bash
# Runs every check wirepool has: formatting, clippy (warnings are errors), the Rust
# tests (including the C header freshness check), the codec rebuild check, the Python
# binding's tests and the C++ example, and the quick benchmark. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the run has taken so far, so a slow CI machine shows where.
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "rustfmt (the engine, and the codecs' own workspace)"
cargo fmt --all -- --check
(cd codecs && cargo fmt --all -- --check)

# clippy-driver compiles the workspace's own crates (library, CLI, tests, benches) with
# clippy's lints, warnings as errors: what `cargo clippy --all-targets -- -D warnings`
# checks, without `cargo clippy`'s second pass over every dependency (~20 minutes of a
# clean CI run, for wasmtime and cranelift alone). Exported, so every cargo command
# below, the bench's included, sees the same compiler and rebuilds nothing.
if clippy_driver=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver); then
  export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
  lints="with clippy's lints, warnings are errors"
else
  echo "tests/run-all.sh: clippy-driver not found (rustup component add clippy): building without clippy's lints" >&2
  lints="WITHOUT clippy (not installed)"
fi

step "build (release, $lints): library, CLI, tests, benches; wasmtime compiled once"
cargo build --release --all-targets

step "Rust tests (unit, integration, C ABI, header freshness, doc examples)"
cargo test --release

# The vendored tiny_http is a path dependency, not a workspace member, so the command
# above skips its unit tests (the health port's client limit is tested there, in orders
# real clients produce only by chance). Its library tests only: its doc examples need
# crates the vendored copy does not depend on. clippy's wrapper applies to workspace
# members only: the vendored code is built by plain rustc, as in the build above.
step "vendored tiny_http: unit tests"
cargo test --release -p tiny_http --lib

# The codecs are a workspace of their own, built by plain rustc (their .wasm bytes are
# compared with the committed ones).
step "codec .wasm files match their sources (where the wasm32 target is installed)"
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS codecs/build.sh --check

step "codec sources: host unit tests"
(cd codecs && env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS cargo test --release --quiet)

step "Python binding tests"
bindings/python/run_tests.sh

step "C++ wrapper example against the simulator"
bindings/cpp/run_example.sh

step "quick benchmark (every bench path, short windows; targets are reported, not asserted)"
benches/run.sh --quick

printf '\nall checks passed in %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60))
