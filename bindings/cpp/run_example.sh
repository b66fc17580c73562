#!/usr/bin/env bash
# Builds bindings/cpp/example.cpp against the already built libwirepool, starts the
# feed simulator on a free loopback port, runs the example against it and exits with
# the example's status. Does not build Rust: run `cargo build --release` first.
# Usage: bindings/cpp/run_example.sh [MESSAGE_COUNT]   (from any directory)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
release="$repo/target/release"
build="$here/build"
cxx="${CXX:-g++}"

for needed in "$repo/include/wirepool.h" "$release/libwirepool.so" "$release/wirepool"; do
    if [[ ! -e "$needed" ]]; then
        echo "run_example.sh: missing $needed (build it with: cargo build --release)" >&2
        exit 1
    fi
done

mkdir -p "$build"
"$cxx" -std=c++17 -Wall -Wextra -Werror -O2 \
    -I"$repo/include" -I"$here" \
    "$here/example.cpp" -o "$build/example" \
    -L"$release" -lwirepool -Wl,-rpath,"$release" -pthread

simulator_pid=""
simulator_out="$(mktemp "$build/simulator.XXXXXX")"
cleanup() {
    if [[ -n "$simulator_pid" ]] && kill -0 "$simulator_pid" 2>/dev/null; then
        kill "$simulator_pid" 2>/dev/null || true
        wait "$simulator_pid" 2>/dev/null || true
    fi
    rm -f "$simulator_out"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# stdout goes to a file, not a pipe, so the simulator never blocks on a full pipe
# after the first line has been read.
"$release/wirepool" simulate --listen 127.0.0.1:0 --rate 200 --channels 4 \
    >"$simulator_out" &
simulator_pid=$!

url=""
for _ in $(seq 1 200); do  # 200 x 0.1 s = 20 s
    line="$(head -n 1 "$simulator_out" 2>/dev/null || true)"
    if [[ "$line" =~ ^listening\ on\ (wss?://[^[:space:]]+) ]]; then
        url="${BASH_REMATCH[1]}"
        break
    fi
    if ! kill -0 "$simulator_pid" 2>/dev/null; then
        echo "run_example.sh: the simulator exited before listening; its output:" >&2
        cat "$simulator_out" >&2
        exit 1
    fi
    sleep 0.1
done
if [[ -z "$url" ]]; then
    echo "run_example.sh: no 'listening on ws://...' line from the simulator within 20 s;" \
        "first line: '${line:-}'" >&2
    exit 1
fi

status=0
timeout 120 "$build/example" "$url" "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "run_example.sh: the example did not finish within 120 s" >&2
fi
exit "$status"
