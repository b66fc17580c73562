#!/usr/bin/env bash
# Runs every check wirepool has: formatting, clippy (warnings are errors), the Rust
# tests (including the C header freshness check), the codec rebuild check, the Python
# binding's tests and the C++ example, and the quick benchmark. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the run has taken so far, so a slow CI machine shows where.
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

step "rustfmt"
cargo fmt --all -- --check

step "clippy (warnings are errors)"
cargo clippy --release --all-targets -- -D warnings

step "build (release: the library, the CLI, and wasmtime compiled once)"
cargo build --release

step "Rust tests (unit, integration, C ABI, header freshness)"
cargo test --release

step "codec .wasm files match their sources (where the wasm32 target is installed)"
codecs/build.sh --check

step "codec sources: host unit tests"
(cd codecs && cargo test --release --quiet)

step "Python binding tests"
bindings/python/run_tests.sh

step "C++ wrapper example against the simulator"
bindings/cpp/run_example.sh

step "quick benchmark (every bench path, short windows; targets are reported, not asserted)"
benches/run.sh --quick

printf '\nall checks passed in %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60))
