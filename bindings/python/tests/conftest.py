"""Shared fixtures: the feed simulator (`wirepool simulate`) as a subprocess, and pools
connected to it.

The simulator binary is WIREPOOL_BIN or the repository's target/release/wirepool; the
library is found by the package itself (WIREPOOL_LIB, next to the package, or
target/release). Neither is built here.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

BINDING_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = BINDING_DIR.parents[1]
sys.path.insert(0, str(BINDING_DIR))

import wirepool  # noqa: E402

SIMULATOR_BIN = Path(os.environ.get("WIREPOOL_BIN") or REPO_DIR / "target" / "release" / "wirepool")
HEADER = REPO_DIR / "include" / "wirepool.h"


class Simulator:
    """A running `wirepool simulate` process and its ws:// URL."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def _start_simulator(rate: int = 50, channels: int = 4, token: Optional[str] = None) -> Simulator:
    if not SIMULATOR_BIN.is_file():
        pytest.fail(f"simulator binary not found at {SIMULATOR_BIN} (set WIREPOOL_BIN)")
    args = [str(SIMULATOR_BIN), "simulate", "--listen", "127.0.0.1:0", "--rate", str(rate), "--channels", str(channels)]
    if token is not None:
        args += ["--token", token]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    line = b""
    deadline = time.monotonic() + 10.0
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
        if not ready:
            process.kill()
            pytest.fail(f"simulator printed no 'listening on' line within 10 s (got {line!r})")
        chunk = os.read(process.stdout.fileno(), 1)
        if not chunk:
            process.kill()
            pytest.fail(f"simulator exited before printing its URL (got {line!r})")
        line += chunk
    text = line.decode().strip()
    assert text.startswith("listening on ws://"), f"unexpected first simulator line: {text!r}"
    # Keep draining stdout so the simulator never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return Simulator(process, text.split("listening on ", 1)[1])


@pytest.fixture
def start_simulator():
    """A factory of simulators, all killed at teardown."""
    started: List[Simulator] = []

    def start(**options: Any) -> Simulator:
        simulator = _start_simulator(**options)
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


@pytest.fixture
def simulator(start_simulator) -> Simulator:
    return start_simulator()


def config_for(url: str, **extra: Any) -> Dict[str, Any]:
    config: Dict[str, Any] = {"servers": [{"url": url}], "pool": {"min_connections": 2, "max_connections": 2}}
    config.update(extra)
    return config


@pytest.fixture
def make_pool():
    """A factory of pools, all closed at teardown."""
    pools: List[wirepool.Pool] = []

    def make(config: Any) -> wirepool.Pool:
        pool = wirepool.Pool(config)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def pool(simulator, make_pool) -> wirepool.Pool:
    """A ready two-connection pool on a 4-channel, 50 msg/s simulator."""
    pool = make_pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    return pool


def wait_for_event(pool: wirepool.Pool, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 10.0,
                   seen: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Reads events until one matches; fails with every event seen otherwise."""
    seen = [] if seen is None else seen
    deadline = time.monotonic() + timeout
    while True:
        for event in seen:
            if predicate(event):
                return event
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no matching event within {timeout} s; events seen: {json.dumps(seen)[:4000]}")
        seen.extend(pool.events(timeout=min(remaining, 1.0)))


def receive_at_least(pool: wirepool.Pool, count: int, timeout: float = 15.0) -> List[wirepool.Message]:
    """Collects messages with recv_many until `count` arrived."""
    received: List[wirepool.Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"expected {count} messages within {timeout} s, got {len(received)}")
        received.extend(pool.recv_many(4096, timeout=min(remaining, 1.0)))
    return received


def assert_in_sequence(messages: List[wirepool.Message]) -> Dict[tuple, int]:
    """Every (channel, connection) stream's seq goes up by exactly one per message."""
    last: Dict[tuple, int] = {}
    for message in messages:
        seq = json.loads(message.payload)["seq"]
        key = (message.channel, message.connection_id)
        if key in last:
            assert seq == last[key] + 1, f"{key}: seq {seq} after {last[key]} (lost or reordered message)"
        last[key] = seq
    return last


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt for the test, as in an interactive run. A process
    started in the background by a non-interactive shell (`cmd &`, as CI runners and
    nohup wrappers do) inherits SIGINT ignored, and Python then installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
