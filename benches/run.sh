#!/usr/bin/env bash
# wirepool's benchmarks, all of them, in one run on loopback:
#   benches/run.sh            full run (a few minutes): numbers for the README
#   benches/run.sh --quick    every path once with short windows (part of the test command)
# Prints a table and writes target/bench/summary.json (target/bench/results.jsonl holds
# every raw result line). Exits non-zero when a measurement fails, never because a
# target is missed: the table says that.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "usage: benches/run.sh [--quick]" >&2; exit 2 ;;
esac

OUT=target/bench
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

if [ "$QUICK" = 1 ]; then
  WARMUP=0.2; WINDOW=0.5; ROUNDS=1
  LATENCY_WARMUP=0.3; LATENCY_WINDOW=1
  CONNECT_SAMPLES=10; MEMORY_CONNECTIONS=200; SUBSCRIBE_CHANNELS=2000
else
  WARMUP=1; WINDOW=2; ROUNDS=3
  LATENCY_WARMUP=0.5; LATENCY_WINDOW=3
  CONNECT_SAMPLES=100; MEMORY_CONNECTIONS=1000; SUBSCRIBE_CHANNELS=10000
fi

step() { printf '\n==> %s\n' "$*" >&2; }

step "build (release): the library and the bench binary"
BUILD_LOG="$OUT/build.json"
cargo build --release --lib --bench feed --message-format=json > "$BUILD_LOG"
FEED=$(python3 - "$BUILD_LOG" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "feed" and message.get("executable"):
        print(message["executable"])
EOF
)
if [ -z "$FEED" ]; then
  echo "benches/run.sh: the bench binary was not found in the build output" >&2
  exit 1
fi

step "C ABI consumer (gcc against include/wirepool.h and libwirepool.so)"
C_CONSUMER="$OUT/c_abi_consumer"
HAVE_C=1
if ! gcc -O2 -Wall -Wextra -Werror -I include benches/c_abi_consumer.c -L target/release -lwirepool \
     -Wl,-rpath,"$PWD/target/release" -o "$C_CONSUMER"; then
  echo "benches/run.sh: cannot build the C consumer" >&2
  HAVE_C=0
fi

step "Python venv ($OUT/venv): websockets, websocket-client, picows"
VENV="$OUT/venv"
PYTHON_CLIENTS="websockets websocket-client picows"
HAVE_PIP_CLIENTS=1
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import websockets, websocket, picows" 2>/dev/null; then
  if ! "$VENV/bin/pip" install --quiet websockets websocket-client picows > "$OUT/pip.log" 2>&1; then
    echo "benches/run.sh: pip install failed (offline?): the other Python clients are not measured (null); see $OUT/pip.log" >&2
    HAVE_PIP_CLIENTS=0
  fi
fi

step "feed server"
READY="$OUT/feed.json"
rm -f "$READY"
"$FEED" serve --ready-file "$READY" 2> "$OUT/feed.log" &
FEED_PID=$!
export FEED_PID
trap 'kill "$FEED_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  [ -s "$READY" ] && break
  sleep 0.1
done
if [ ! -s "$READY" ]; then
  echo "benches/run.sh: the feed server did not start; see $OUT/feed.log" >&2
  exit 1
fi
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$READY" "$1"; }
WS=$(field ws)
WSS=$(field wss)
CA=$(field ca_file)

FAILED=0
# measure NAME COMMAND...: appends the command's JSON line to the results, or an
# error line naming the measurement.
measure() {
  local name="$1"
  shift
  printf '  %-34s' "$name" >&2
  local line
  if line=$(timeout 180 "$@" 2> "$OUT/last.err" | tail -n 1) && [ -n "$line" ]; then
    echo "$line" >> "$RESULTS"
    echo "ok" >&2
  else
    FAILED=1
    echo "FAILED" >&2
    sed 's/^/    /' "$OUT/last.err" >&2
    python3 -c "import json,sys; print(json.dumps({'measure': sys.argv[1], 'error': open(sys.argv[2]).read()[-2000:]}))" \
      "$name" "$OUT/last.err" >> "$RESULTS"
  fi
}

WINDOW_ARGS=(--warmup "$WARMUP" --seconds "$WINDOW")
for round in $(seq "$ROUNDS"); do
  step "throughput, round $round of $ROUNDS (flat-out feed, 100-byte messages)"
  measure raw_tungstenite "$FEED" tungstenite --url "$WS" "${WINDOW_ARGS[@]}"
  measure pool_raw_1 "$FEED" pool --url "$WS" --codec raw --connections 1 "${WINDOW_ARGS[@]}"
  measure pool_raw_decode_1 "$FEED" pool --url "$WS" --codec raw-decode --connections 1 "${WINDOW_ARGS[@]}"
  measure pool_json_1 "$FEED" pool --url "$WS" --codec json --connections 1 "${WINDOW_ARGS[@]}"
  if [ "$HAVE_C" = 1 ]; then
    measure c_abi_batch "$C_CONSUMER" "$WS" "$WARMUP" "$WINDOW"
  fi
  for connections in 4 16; do
    for codec in raw json; do
      measure "pool_${codec}_${connections}" "$FEED" pool --url "$WS" --codec "$codec" \
        --connections "$connections" "${WINDOW_ARGS[@]}"
    done
  done
  step "Python consumers, round $round of $ROUNDS"
  measure python_wirepool "$VENV/bin/python" benches/python_consumers.py wirepool "$WS" "$WARMUP" "$WINDOW"
  measure python_wirepool_json "$VENV/bin/python" benches/python_consumers.py wirepool-json "$WS" "$WARMUP" "$WINDOW"
  if [ "$HAVE_PIP_CLIENTS" = 1 ]; then
    for client in $PYTHON_CLIENTS; do
      measure "python_$client" "$VENV/bin/python" benches/python_consumers.py "$client" "$WS" "$WARMUP" "$WINDOW"
    done
  fi
done

LATENCY_ARGS=(--rate 50000 --warmup "$LATENCY_WARMUP" --seconds "$LATENCY_WINDOW")
# The pinned latency rows: the client's message path (the pool's worker, busy polling,
# and its consumer; or the spinning loop) on the last CPU this script may use, the
# feed's threads on the others (moved there for those rows only, then back). Needs two
# CPUs at least; on one, those rows are not measured (null).
read -r CLIENT_CPU FEED_CPUS ALL_CPUS < <(python3 -c '
import os
cpus = sorted(os.sched_getaffinity(0))
print(cpus[-1], ",".join(map(str, cpus[:-1])) or "-", ",".join(map(str, cpus)))')
# place_feed CPUS: every thread of the feed server (and those it starts later) on CPUS.
place_feed() {
  python3 - "$FEED_PID" "$1" <<'EOF2'
import os, sys
pid, cpus = int(sys.argv[1]), {int(cpu) for cpu in sys.argv[2].split(",")}
for task in os.listdir(f"/proc/{pid}/task"):
    try:
        os.sched_setaffinity(int(task), cpus)
    except ProcessLookupError:
        pass
EOF2
}
for round in $(seq "$ROUNDS"); do
  step "latency at 50,000 msgs/s (server write -> consumer's hand), round $round of $ROUNDS"
  measure latency_raw_tungstenite "$FEED" latency --url "$WS" --client tungstenite "${LATENCY_ARGS[@]}"
  measure latency_pool_json "$FEED" latency --url "$WS" --client pool-json "${LATENCY_ARGS[@]}"
  measure latency_pool_raw "$FEED" latency --url "$WS" --client pool-raw "${LATENCY_ARGS[@]}"
  # Busy polling (a CPU kept busy per spinning thread): the worker and the consumer,
  # the consumer alone (on two vCPUs with the feed's sender, two spinning threads
  # compete with it), and the floor, a tungstenite loop that never sleeps.
  measure latency_pool_json_busy_poll "$FEED" latency --url "$WS" --client pool-json \
    --worker-spin-us 1000 --consumer-spin-us 1000 "${LATENCY_ARGS[@]}"
  measure latency_pool_json_consumer_spin "$FEED" latency --url "$WS" --client pool-json \
    --consumer-spin-us 1000 "${LATENCY_ARGS[@]}"
  measure latency_raw_tungstenite_spin "$FEED" latency --url "$WS" --client tungstenite-spin "${LATENCY_ARGS[@]}"
  if [ "$FEED_CPUS" != "-" ]; then
    place_feed "$FEED_CPUS"
    # The worker busy polling, pinned with its consumer to one CPU (affinity.worker_cpus):
    # no halted CPU to wake for a message; then the consumer busy polling too; then
    # the floor, the spinning loop pinned the same way.
    measure latency_pool_json_worker_spin_pinned "$FEED" latency --url "$WS" --client pool-json \
      --worker-spin-us 1000 --cpu "$CLIENT_CPU" "${LATENCY_ARGS[@]}"
    measure latency_pool_json_busy_poll_pinned "$FEED" latency --url "$WS" --client pool-json \
      --worker-spin-us 1000 --consumer-spin-us 1000 --cpu "$CLIENT_CPU" "${LATENCY_ARGS[@]}"
    measure latency_raw_tungstenite_spin_pinned "$FEED" latency --url "$WS" \
      --client tungstenite-spin --cpu "$CLIENT_CPU" "${LATENCY_ARGS[@]}"
    place_feed "$ALL_CPUS"
  fi
done

step "connect-to-ready ($CONNECT_SAMPLES samples each)"
measure connect_ws "$FEED" connect --url "$WS" --samples "$CONNECT_SAMPLES"
measure connect_wss "$FEED" connect --url "$WSS" --ca "$CA" --samples "$CONNECT_SAMPLES"

step "resident memory of $MEMORY_CONNECTIONS idle connections"
measure memory_idle "$FEED" memory --url "$WS" --connections "$MEMORY_CONNECTIONS"

step "a burst of $SUBSCRIBE_CHANNELS subscriptions (built-in simulator, 3 connections)"
measure subscribe_burst "$FEED" subscriptions --channels "$SUBSCRIBE_CHANNELS"

kill "$FEED_PID" 2>/dev/null || true
wait "$FEED_PID" 2>/dev/null || true

step "summary"
echo "load average at the end: $(cat /proc/loadavg)" >&2
REPORT_ARGS=("$RESULTS" "$OUT/summary.json")
[ "$QUICK" = 1 ] && REPORT_ARGS+=(--quick)
[ "$HAVE_PIP_CLIENTS" = 0 ] && REPORT_ARGS+=(--no-pip-clients)
python3 benches/report.py "${REPORT_ARGS[@]}"

if [ "$FAILED" = 1 ]; then
  echo "benches/run.sh: some measurements failed (see above and $RESULTS)" >&2
  exit 1
fi
