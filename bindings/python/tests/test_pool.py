"""Pool lifetime, stats and events."""

from __future__ import annotations

import gc
import signal
import threading
import time

import pytest

import wirepool
from conftest import assert_in_sequence, config_for, receive_at_least, wait_for_event

STATS_FIELDS = {
    "total_connections", "ready_connections", "busy_connections", "pending_requests",
    "min_connections", "max_connections", "initialized", "has_shared_data",
    "messages_received", "messages_sent", "bytes_received", "bytes_sent", "reconnects",
    "subscriptions",
}


def test_context_manager_closes_and_close_is_idempotent(simulator):
    with wirepool.Pool(config_for(simulator.url)) as pool:
        assert isinstance(pool, wirepool.Pool)
        pool.wait_ready(timeout=10.0)
        assert not pool.closed
    assert pool.closed
    pool.close()
    pool.close()
    assert pool.closed


def test_use_after_close_raises_closed_error(simulator):
    pool = wirepool.Pool(config_for(simulator.url))
    pool.close()
    calls = [
        lambda: pool.subscribe("ticker.0"),
        lambda: pool.unsubscribe("ticker.0"),
        lambda: pool.recv(timeout=0),
        lambda: pool.recv_many(10, timeout=0),
        lambda: pool.messages(timeout=0),
        lambda: pool.request(b"{}"),
        lambda: pool.stats(),
        lambda: pool.wait_ready(timeout=0),
        lambda: pool.fileno(),
    ]
    for call in calls:
        with pytest.raises(wirepool.ClosedError, match="pool is closed"):
            call()
    # events() first returns what the pool emitted up to and by its close (see
    # test_events_emitted_up_to_and_by_close_are_returned_after_close), then raises.
    assert pool.events()[-1]["type"] == "pool_closed"
    with pytest.raises(wirepool.ClosedError, match="pool is closed"):
        pool.events()


def test_close_wakes_a_blocked_recv(pool):
    outcome = []

    def consumer() -> None:
        try:
            outcome.append(pool.recv(timeout=None))
        except wirepool.ClosedError as err:
            outcome.append(err)

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.3)  # let it block; either order must end in ClosedError
    started = time.monotonic()
    pool.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "recv(timeout=None) still blocked after close()"
    assert time.monotonic() - started < 5.0
    assert len(outcome) == 1 and isinstance(outcome[0], wirepool.ClosedError), outcome


def _count_frees(monkeypatch):
    """Counts wirepool_pool_free calls (the pool's handle freed), still freeing."""
    real_free = wirepool.lib.wirepool_pool_free
    frees = []

    def counting_free(handle):
        frees.append(handle)
        real_free(handle)

    monkeypatch.setattr(wirepool.lib, "wirepool_pool_free", counting_free)
    return frees


def _close_with_messages_queued(pool, at_least=20):
    """Subscribes, receives a few, lets at least `at_least` more queue up unread, closes.
    Returns what was received before and the queue depth just before the close."""
    pool.subscribe("ticker.0")
    pool.subscribe("ticker.1")
    before = receive_at_least(pool, 3)
    deadline = time.monotonic() + 10.0
    while (depth := pool.stats()["queue_depth"]) < at_least:
        assert time.monotonic() < deadline, f"only {depth} messages queued after 10 s"
        time.sleep(0.05)
    pool.close()
    return before, depth


def _receive_until_closed(receive):
    """Calls `receive` until it raises ClosedError; what each call returned."""
    results = []
    deadline = time.monotonic() + 10.0
    while True:
        assert time.monotonic() < deadline, f"no ClosedError after {len(results)} receives in 10 s"
        try:
            results.append(receive())
        except wirepool.ClosedError:
            return results


def test_recv_many_after_close_returns_what_was_queued_in_order_then_raises(pool, monkeypatch):
    # As wirepool_pool_poll between close and free: the queue, then WIREPOOL_ERR_CLOSED.
    frees = _count_frees(monkeypatch)
    before, depth = _close_with_messages_queued(pool)
    assert frees == [], "close() freed the pool with messages still queued"
    batches = _receive_until_closed(lambda: pool.recv_many(7, timeout=5.0))
    after = [message for batch in batches for message in batch]
    assert all(1 <= len(batch) <= 7 for batch in batches), [len(batch) for batch in batches]
    assert len(after) >= depth, f"{depth} messages were queued at close, {len(after)} received after it"
    assert_in_sequence(before + after)
    assert len(frees) == 1, f"the drained pool's handle was freed {len(frees)} times, expected once"
    with pytest.raises(wirepool.ClosedError, match="pool is closed"):
        pool.recv_many(7, timeout=5.0)
    pool.close()
    assert len(frees) == 1, f"the handle was freed {len(frees)} times, expected once"


def test_recv_after_close_returns_what_was_queued_one_by_one_then_raises(pool):
    before, depth = _close_with_messages_queued(pool)
    after = _receive_until_closed(lambda: pool.recv(timeout=5.0))
    assert None not in after, "recv after close timed out instead of returning a message or raising"
    assert len(after) >= depth, f"{depth} messages were queued at close, {len(after)} received after it"
    assert_in_sequence(before + after)
    with pytest.raises(wirepool.ClosedError, match="pool is closed"):
        pool.recv(timeout=None)


def test_messages_after_close_yields_what_was_queued_then_stops(pool):
    before, depth = _close_with_messages_queued(pool)
    started = time.monotonic()
    after = list(pool.messages(timeout=5.0))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"messages() waited {elapsed:.1f} s on a closed, drained queue"
    assert len(after) >= depth, f"{depth} messages were queued at close, {len(after)} yielded after it"
    assert_in_sequence(before + after)
    # Drained: as on a pool closed with nothing queued, messages() raises at once.
    with pytest.raises(wirepool.ClosedError, match="pool is closed"):
        pool.messages(timeout=5.0)


def test_a_pool_closed_with_nothing_queued_raises_at_once_and_is_freed_by_close(pool, monkeypatch):
    frees = _count_frees(monkeypatch)
    pool.close()
    assert len(frees) == 1, f"close() of a pool with an empty queue freed it {len(frees)} times"
    for receive in (lambda: pool.recv(timeout=None), lambda: pool.recv_many(10, timeout=None),
                    lambda: pool.messages(timeout=None)):
        started = time.monotonic()
        with pytest.raises(wirepool.ClosedError, match="pool is closed"):
            receive()
        assert time.monotonic() - started < 0.5, "a receive on a closed, empty pool waited"
    assert len(frees) == 1


def test_a_closed_pool_whose_queue_is_never_read_is_freed_when_collected(simulator, monkeypatch):
    frees = _count_frees(monkeypatch)
    pool = wirepool.Pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    _close_with_messages_queued(pool)
    assert frees == [], "close() freed the pool with messages still queued"
    del pool
    gc.collect()
    assert len(frees) == 1, f"the collected pool's handle was freed {len(frees)} times, expected once"


def test_a_ctrl_c_as_a_poll_after_close_returns_loses_no_message(pool, monkeypatch, ctrl_c_raises):
    # As test_a_ctrl_c_as_a_poll_returns_loses_no_message, on a closed pool: what the
    # interrupted poll took comes from the next receive, and the handle is still freed
    # once, when the queue is drained.
    frees = _count_frees(monkeypatch)
    before, depth = _close_with_messages_queued(pool)
    real_poll = wirepool.lib.wirepool_pool_poll
    taken = []

    def poll_then_ctrl_c(handle, batch, timeout_ms, count_ref):
        code = real_poll(handle, batch, timeout_ms, count_ref)
        if code == 0 and count_ref._obj.value and not taken:
            taken.append(count_ref._obj.value)
            signal.raise_signal(signal.SIGINT)
        return code

    monkeypatch.setattr(wirepool.lib, "wirepool_pool_poll", poll_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        pool.recv_many(4, timeout=5.0)
    assert taken, "the interrupted poll took no message"
    after = [message for batch in _receive_until_closed(lambda: pool.recv_many(4, timeout=5.0)) for message in batch]
    assert len(after) >= depth, f"{depth} messages were queued at close, {len(after)} received after it"
    assert_in_sequence(before + after)
    assert len(frees) == 1, f"the drained pool's handle was freed {len(frees)} times, expected once"


def test_a_consumer_receiving_through_close_gets_the_stream_in_order_then_closed_error(pool):
    # A receive waiting when close() runs ends promptly: with what the close grace read,
    # then ClosedError.
    pool.subscribe("ticker.0")
    received = []
    outcome = []

    def consumer() -> None:
        try:
            while True:
                received.extend(pool.recv_many(5, timeout=None))
        except wirepool.ClosedError as err:
            outcome.append(err)

    thread = threading.Thread(target=consumer)
    thread.start()
    receive_deadline = time.monotonic() + 10.0
    while len(received) < 10:
        assert time.monotonic() < receive_deadline, f"the consumer got {len(received)} messages in 10 s"
        time.sleep(0.05)
    started = time.monotonic()
    pool.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "recv_many(timeout=None) still blocked after close()"
    assert time.monotonic() - started < 5.0
    assert len(outcome) == 1, outcome
    assert_in_sequence(received)


def test_close_wakes_a_pending_request(pool):
    outcome = []

    def requester() -> None:
        try:
            outcome.append(pool.request(b'{"op":"ignore"}', timeout=30.0))
        except wirepool.WirepoolError as err:
            outcome.append(err)

    thread = threading.Thread(target=requester)
    thread.start()
    deadline = time.monotonic() + 10.0
    while pool.stats()["pending_requests"] < 1:
        assert time.monotonic() < deadline, "the request never became pending"
        time.sleep(0.01)
    started = time.monotonic()
    pool.close()
    thread.join(timeout=20)
    assert not thread.is_alive()
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"close() took {elapsed:.1f} s to wake a pending request"
    assert len(outcome) == 1 and isinstance(outcome[0], wirepool.ClosedError), outcome


def test_dropping_an_open_pool_closes_it(simulator):
    pool = wirepool.Pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    pool.subscribe("ticker.0")
    del pool
    gc.collect()
    # A new pool on the same simulator still works.
    with wirepool.Pool(config_for(simulator.url)) as again:
        again.wait_ready(timeout=10.0)


def test_wait_ready_times_out_without_a_server(make_pool):
    pool = make_pool({"servers": [{"url": "ws://127.0.0.1:9"}], "connect_timeout_ms": 200})
    started = time.monotonic()
    with pytest.raises(wirepool.TimeoutError):
        pool.wait_ready(timeout=0.7)
    assert 0.6 <= time.monotonic() - started < 5.0


def test_stats_has_the_spec_fields(pool):
    pool.subscribe("ticker.0")
    received = receive_at_least(pool, 10)
    stats = pool.stats()
    missing = STATS_FIELDS - set(stats)
    assert not missing, f"stats() lacks {sorted(missing)}"
    assert stats["min_connections"] == 2 and stats["max_connections"] == 2
    assert stats["total_connections"] == 2 and stats["ready_connections"] == 2
    assert stats["initialized"] is True
    assert stats["messages_received"] >= len(received)
    assert stats["bytes_received"] > 0 and stats["messages_sent"] >= 1
    subscriptions = stats["subscriptions"]
    assert subscriptions == 1 or "ticker.0" in subscriptions


def test_events_report_ready_and_subscribed(simulator, make_pool):
    pool = make_pool(config_for(simulator.url))
    seen = []
    wait_for_event(pool, lambda event: event["type"] == "ready", seen=seen)
    pool.subscribe("ticker.2")
    event = wait_for_event(pool, lambda event: event["type"] == "subscribed", seen=seen)
    assert event.get("channel") == "ticker.2"
    assert all(isinstance(event, dict) and "type" in event and "ts_ms" in event for event in seen)


def test_events_returns_empty_list_on_timeout(pool):
    pool.events(timeout=0.0)  # whatever the start-up produced
    started = time.monotonic()
    while pool.events(timeout=0.2):
        assert time.monotonic() - started < 10.0, "events keep coming on an idle pool"


def test_events_emitted_up_to_and_by_close_are_returned_after_close(simulator):
    # As in C, where wirepool_pool_events_json between close and free gives the
    # shutdown's events, pool_closed last, then WIREPOOL_ERR_CLOSED.
    pool = wirepool.Pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    before = wait_for_event(pool, lambda event: event["type"] == "pool_ready")
    pool.subscribe("ticker.1")
    wait_for_event(pool, lambda event: event["type"] == "subscribed")
    pool.unsubscribe("ticker.1")  # its event is left unread for close() to keep
    pool.close()
    left = pool.events(timeout=0.0)
    kinds = [event["type"] for event in left]
    assert kinds and kinds[-1] == "pool_closed", f"expected pool_closed last; got {kinds}"
    assert kinds.count("pool_closed") == 1, kinds
    assert "pool_ready" not in kinds, f"events read before close came again: {kinds} (first {before})"
    assert all(isinstance(event, dict) and "ts_ms" in event for event in left), left
    started = time.monotonic()
    with pytest.raises(wirepool.ClosedError, match="pool is closed"):
        pool.events(timeout=None)  # nothing more can come: no wait
    assert time.monotonic() - started < 1.0
    with pytest.raises(wirepool.ClosedError):
        pool.events(timeout=0.0)


def test_events_nobody_read_before_close_are_returned_after_close(simulator):
    pool = wirepool.Pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    # The pool thread queues pool_ready before it handles the shutdown, so close()
    # cannot finish before every start-up event is queued.
    pool.close()
    left = pool.events()
    kinds = [event["type"] for event in left]
    assert "pool_ready" in kinds and kinds[-1] == "pool_closed", kinds
    ready = {event.get("connection_id") for event in left if event["type"] == "ready"}
    assert len(ready) == 2, f"expected the ready events of both connections; got {left}"
    with pytest.raises(wirepool.ClosedError):
        pool.events()


def test_a_thread_waiting_for_events_gets_the_shutdown_events(pool):
    # Quiet first: an idle ready pool emits nothing, so the waiting thread's events are
    # the shutdown's; whichever of it and close() takes them from the library, the
    # thread reads pool_closed exactly once, then ClosedError.
    while pool.events(timeout=0.3):
        pass
    got = []
    ended = []

    def reader() -> None:
        try:
            while True:
                got.extend(pool.events(timeout=None))
        except BaseException as error:  # noqa: BLE001 - reported below
            ended.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)  # let it wait; either order must give the same result
    pool.close()
    thread.join(timeout=30)
    assert not thread.is_alive(), "events(timeout=None) still waiting after close()"
    assert len(ended) == 1 and isinstance(ended[0], wirepool.ClosedError), ended
    kinds = [event["type"] for event in got]
    assert kinds.count("pool_closed") == 1 and kinds[-1] == "pool_closed", kinds


FULL_QUEUE_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import wirepool
pool = wirepool.Pool({"servers": [{"url": sys.argv[2]}],
                      "pool": {"min_connections": 2, "max_connections": 2},
                      "queue": {"capacity": 64, "overflow": "block"}})
pool.wait_ready(timeout=10.0)
for channel in range(4):
    pool.subscribe(f"ticker.{channel}")
deadline = time.monotonic() + 10.0
while pool.stats()["queue_depth"] < 64:
    assert time.monotonic() < deadline, "the queue never filled"
    time.sleep(0.01)
time.sleep(0.2)  # the workers are now blocked pushing into the full queue
print("closing", flush=True)
started = time.monotonic()
pool.close()
print(f"closed in {time.monotonic() - started:.2f} s", flush=True)
"""


def test_close_returns_promptly_while_workers_wait_on_a_full_queue(start_simulator):
    # Run in a child process: if wirepool_pool_close deadlocks, only the child hangs.
    import subprocess
    import sys

    from conftest import BINDING_DIR

    simulator = start_simulator(rate=2000, channels=4)
    child = subprocess.Popen(
        [sys.executable, "-c", FULL_QUEUE_SCRIPT, str(BINDING_DIR), simulator.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(
            "Pool.close() (wirepool_pool_close) did not return within 30 s while connection "
            "workers were blocked on a full consumer queue (queue.overflow = block). "
            f"child output: {out!r}"
        )
    assert child.returncode == 0, f"child failed: {out!r} {err[-2000:]!r}"
    assert "closed in" in out
