#!/usr/bin/env bash
# Type checks the Python binding (mypy, pinned below), then runs its tests against an
# already built library and simulator; a type error fails the run before any test.
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
# Pinned: a newer mypy (or typeshed inside it) may find new errors in unchanged code.
# mypy 2.4.1 runs on Python 3.10 and later; an older interpreter (the binding itself
# supports 3.8) runs the tests without the type check, and says so.
mypy_version=2.4.1
if "$venv/bin/python" -c "import sys; sys.exit(sys.version_info < (3, 10))"; then
    if [ "$("$venv/bin/python" -c "import mypy.version; print(mypy.version.__version__)" 2>/dev/null)" != "$mypy_version" ]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mypy==$mypy_version"
    fi
    export MYPY_CACHE_DIR="$venv/mypy_cache"
    # The package with --strict (pyproject.toml's [tool.mypy]); the tests with mypy's
    # own defaults (no config file): most test functions are unannotated, so their
    # bodies are not checked, and the note saying so each time is left out.
    "$venv/bin/python" -m mypy
    "$venv/bin/python" -m mypy --config-file= --disable-error-code=annotation-unchecked tests
else
    echo "run_tests.sh: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())') is older than 3.10, which mypy $mypy_version needs: the type check is skipped" >&2
fi
exec "$venv/bin/python" -m pytest --timeout=120 --timeout-method=thread -p no:cacheprovider "$@" tests
