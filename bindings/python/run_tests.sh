#!/usr/bin/env bash
# Runs the Python binding's tests against an already built library and simulator.
# Never builds Rust: build first with `cargo build --release` at the repository root.
#
#   WIREPOOL_LIB  the library   (default: ../../target/release/libwirepool.so)
#   WIREPOOL_BIN  the simulator (default: ../../target/release/wirepool)
# Extra arguments go to pytest, e.g. ./run_tests.sh -k request -x
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export WIREPOOL_LIB="${WIREPOOL_LIB:-$repo/target/release/libwirepool.so}"
export WIREPOOL_BIN="${WIREPOOL_BIN:-$repo/target/release/wirepool}"

for file in "$WIREPOOL_LIB" "$WIREPOOL_BIN"; do
    if [ ! -f "$file" ]; then
        echo "run_tests.sh: $file not found; build it with 'cargo build --release' in $repo" >&2
        exit 2
    fi
done

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import pytest, pytest_timeout" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest pytest-timeout
fi

cd "$here"
exec "$venv/bin/python" -m pytest --timeout=120 --timeout-method=thread -p no:cacheprovider "$@" tests
