"""Requests: replies, venue errors, timeouts, argument errors, concurrency."""

from __future__ import annotations

import builtins
import concurrent.futures
import ctypes
import json
import os
import signal
import threading
import time
from typing import List

import pytest

import wirepool
from conftest import config_for


def test_request_echoes_payload(pool):
    reply = pool.request(b'{"hello":"world","n":[1,2,3]}', timeout=5.0)
    assert isinstance(reply, bytes)
    assert json.loads(reply) == {"echo": {"hello": "world", "n": [1, 2, 3]}}


def test_request_accepts_bytes_like_payloads(pool):
    assert json.loads(pool.request(bytearray(b'{"a":1}'))) == {"echo": {"a": 1}}
    assert json.loads(pool.request(memoryview(b'{"b":2}'))) == {"echo": {"b": 2}}


def test_request_history_returns_bars(pool):
    reply = json.loads(pool.request(b'{"op":"history","channel":"ticker.0","bars":5}', timeout=5.0))
    assert reply["channel"] == "ticker.0"
    assert len(reply["bars"]) == 5
    assert all(set(bar) >= {"t", "o", "h", "l", "c", "v"} for bar in reply["bars"])


def test_idempotent_request_gets_reply(pool):
    reply = pool.request(b'{"op":"history","channel":"ticker.1","bars":2}', timeout=5.0, idempotent=True)
    assert len(json.loads(reply)["bars"]) == 2


def test_request_error_raises_remote_error_with_payload(pool):
    with pytest.raises(wirepool.RemoteError) as caught:
        pool.request(b'{"op":"fail"}', timeout=5.0)
    error = caught.value
    assert isinstance(error, wirepool.WirepoolError)
    assert error.code == 1007 and error.code_name == "WIREPOOL_ERR_REMOTE"
    assert isinstance(error.payload, bytes)
    assert b"requested failure" in error.payload
    assert str(error), "the error has no message"
    # The pool keeps working after a venue error.
    assert json.loads(pool.request(b'{"after":"fail"}')) == {"echo": {"after": "fail"}}


def test_request_without_reply_times_out(pool):
    started = time.monotonic()
    with pytest.raises(wirepool.TimeoutError) as caught:
        pool.request(b'{"op":"ignore"}', timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5.0, f"timeout=0.5 took {elapsed:.2f} s"
    assert isinstance(caught.value, builtins.TimeoutError)
    assert caught.value.code == 1004


def test_request_timeout_none_uses_pool_request_timeout(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, request_timeout_ms=300))
    pool.wait_ready(timeout=10.0)
    started = time.monotonic()
    with pytest.raises(wirepool.TimeoutError):
        pool.request(b'{"op":"ignore"}', timeout=None)
    assert time.monotonic() - started < 5.0


def test_request_that_is_not_json_is_refused(pool):
    # docs/c-api.md: a body the codec refuses is WIREPOOL_ERR_INVALID_ARGUMENT, nothing sent.
    with pytest.raises(wirepool.InvalidArgumentError) as caught:
        pool.request(b"not json", timeout=2.0)
    assert caught.value.code == 1002
    assert isinstance(caught.value, ValueError)
    assert "JSON" in str(caught.value)
    assert json.loads(pool.request(b"{}")) == {"echo": {}}


def test_concurrent_requests_get_their_own_replies(pool):
    failures = []

    def worker(index: int) -> None:
        try:
            for round_ in range(10):
                body = {"worker": index, "round": round_}
                reply = json.loads(pool.request(json.dumps(body).encode(), timeout=5.0))
                if reply != {"echo": body}:
                    failures.append((body, reply))
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[:5]


def test_request_batch_returns_results_in_order_with_progress(pool):
    payloads = [b'{"op":"fail"}' if i == 3 else json.dumps({"i": i}).encode() for i in range(20)]
    seen = []
    results = pool.request_batch(payloads, timeout=5.0, max_in_flight_per_connection=2,
                                 progress=lambda done, total: seen.append((done, total)))
    assert len(results) == 20
    for i, result in enumerate(results):
        if i == 3:
            assert isinstance(result, wirepool.RemoteError)
            assert b"requested failure" in result.payload
        else:
            assert json.loads(result)["echo"]["i"] == i
    assert seen[-1] == (20, 20) and len(seen) == 20


def test_request_batch_errors_say_which_request_and_why(pool):
    results = pool.request_batch([b"{}", b"not json", b'{"op":"fail"}'], timeout=5.0)
    assert not isinstance(results[0], Exception)
    refused = results[1]
    assert isinstance(refused, wirepool.InvalidArgumentError)
    assert str(refused).startswith("payloads[1]: "), str(refused)
    assert "not valid JSON" in str(refused) and "nothing was sent" in str(refused), str(refused)
    remote = results[2]
    assert isinstance(remote, wirepool.RemoteError)
    assert str(remote).startswith("payloads[2]: "), str(remote)


def test_request_batch_timeouts_say_why(make_pool):
    # Nothing listens on port 1: no connection is ever ready.
    pool = make_pool(config_for("ws://127.0.0.1:1"))
    results = pool.request_batch([b"{}"], timeout=0.3)
    assert isinstance(results[0], wirepool.TimeoutError), results
    assert "no connection was ready" in str(results[0]), str(results[0])


def test_request_batch_reraises_a_progress_callback_error(pool):
    def boom(done, total):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        pool.request_batch([b"{}", b"{}"], progress=boom)


def _address(pointer) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


# Each call that gets wirepool_bytes from the library: (its C function, how the Python
# method is called, where the library writes the buffers it hands out).
BUFFER_CALLS = {
    "request": ("wirepool_pending_request_wait", lambda pool: pool.request(b'{"n":1}', timeout=5.0),
                lambda args: [args[2]._obj]),
    "request_remote_error": ("wirepool_pending_request_wait",
                             lambda pool: pool.request(b'{"op":"fail"}', timeout=5.0),
                             lambda args: [args[2]._obj]),
    "submitted_result": ("wirepool_pending_request_wait",
                         lambda pool: pool.submit(b'{"n":1}', timeout=5.0).result(),
                         lambda args: [args[2]._obj]),
    "request_batch": ("wirepool_pool_request_batch_detailed",
                      lambda pool: pool.request_batch([b'{"n":1}', b'{"op":"fail"}', b"not json", b'{"n":2}'],
                                                      timeout=5.0),
                      lambda args: list(args[7]) + list(args[9])),
    "events": ("wirepool_pool_events_json", lambda pool: pool.events(timeout=5.0), lambda args: [args[2]._obj]),
    "stats": ("wirepool_pool_stats_json", lambda pool: pool.stats(), lambda args: [args[1]._obj]),
    "connections": ("wirepool_pool_connections_json", lambda pool: pool.connections(), lambda args: [args[1]._obj]),
    "shared_data": ("wirepool_pool_shared_data", lambda pool: pool.shared_data("instruments"),
                    lambda args: [args[2]._obj]),
}


@pytest.mark.parametrize("call", sorted(BUFFER_CALLS))
def test_a_ctrl_c_as_a_call_returns_frees_every_buffer_it_was_handed(pool, monkeypatch, ctrl_c_raises, call):
    # A Ctrl-C is handled at the first Python line after the library call returns, when
    # the library has already handed out its reply buffers (all of them, for a batch).
    # Here a real SIGINT is raised right after the call; every buffer it handed out
    # must still reach wirepool_bytes_free, or a long-running service leaks memory.
    function_name, invoke, out_buffers = BUFFER_CALLS[call]
    if call == "shared_data":
        deadline = time.monotonic() + 10.0
        while pool.shared_data("instruments") is None:
            assert time.monotonic() < deadline, "the simulator's instruments never arrived"
            time.sleep(0.05)
    real_function = getattr(wirepool.lib, function_name)
    real_free = wirepool.lib.wirepool_bytes_free
    handed_out: List[int] = []
    freed: List[int] = []

    def call_then_ctrl_c(*args):
        code = real_function(*args)
        addresses = [_address(buffer) for buffer in out_buffers(args)]
        handed_out.extend(address for address in addresses if address)
        # A wait that found its request still pending handed out nothing: the Ctrl-C
        # comes as the one that does returns.
        if code != wirepool._ffi.WIREPOOL_PENDING:
            signal.raise_signal(signal.SIGINT)
        return code

    def counting_free(buffer):
        address = _address(buffer)
        if address:
            freed.append(address)
        real_free(buffer)

    monkeypatch.setattr(wirepool.lib, function_name, call_then_ctrl_c)
    monkeypatch.setattr(wirepool.lib, "wirepool_bytes_free", counting_free)
    with pytest.raises(KeyboardInterrupt):
        invoke(pool)
    monkeypatch.undo()
    assert handed_out, f"{function_name} handed out no buffer to check"
    leaked = sorted(set(handed_out) - set(freed))
    assert not leaked, (
        f"{call}: {len(leaked)} of the {len(handed_out)} buffers {function_name} handed out "
        f"were never freed after a Ctrl-C as it returned"
    )
    assert len(freed) == len(set(freed)), f"{call}: a buffer was freed twice: {freed}"


# --- submit: requests collected later -------------------------------------------------


def test_submitted_requests_each_get_their_own_reply_whatever_order_they_are_collected_in(pool):
    # The replies arrive in another order than submitted (the delays), and are collected
    # in yet another (last submitted first).
    bodies = [b'{"op":"delay","ms":400,"n":0}', b'{"n":1}', b'{"op":"fail","n":2}',
              b'{"op":"delay","ms":100,"n":3}']
    pending = [pool.submit(body, timeout=20.0) for body in bodies]
    ids = [request.request_id for request in pending]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > 0, ids
    assert repr(pending[0]).startswith(f"<wirepool.PendingRequest {ids[0]} ")
    for n in reversed(range(len(bodies))):
        if n == 2:
            with pytest.raises(wirepool.RemoteError) as caught:
                pending[n].result()
            assert b"requested failure" in caught.value.payload
        else:
            assert json.loads(pending[n].result())["echo"]["n"] == n
        assert pending[n].done() and not pending[n].cancelled()
    assert pool.stats()["pending_requests"] == 0


def test_a_result_wait_that_ends_first_leaves_the_request_pending(pool):
    pending = pool.submit(b'{"op":"delay","ms":1500,"n":"late"}', timeout=30.0)
    assert not pending.done(), "a reply delayed 1.5 s cannot be here yet"
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError) as caught:
        pending.result(timeout=0.1)
    assert time.monotonic() - started >= 0.09
    # Not the request's own timeout: that one is wirepool.TimeoutError.
    assert not isinstance(caught.value, wirepool.WirepoolError), caught.value
    assert "still pending" in str(caught.value)
    assert not pending.done()
    reply = pending.result(timeout=30.0)
    assert json.loads(reply) == {"echo": {"op": "delay", "ms": 1500, "n": "late"}}
    assert pending.done()
    assert pending.result(timeout=0) == reply, "a finished request gives its reply again"
    assert not pending.cancel(), "a finished request cannot be cancelled"
    assert pending.result() == reply


def test_a_submitted_request_times_out_with_wirepool_timeout_error(pool):
    started = time.monotonic()
    pending = pool.submit(b'{"op":"ignore"}', timeout=0.3)
    with pytest.raises(wirepool.TimeoutError) as caught:
        pending.result(timeout=30.0)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5.0, f"timeout=0.3 took {elapsed:.2f} s"
    assert caught.value.code == 1004 and "request timed out after 300 ms" in str(caught.value)
    assert pending.done()
    with pytest.raises(wirepool.TimeoutError):
        pending.result(timeout=0)
    assert pool.stats()["pending_requests"] == 0


def test_cancel_withdraws_a_pending_request(pool):
    pending = pool.submit(b'{"op":"ignore"}', timeout=30.0)
    assert pool.stats()["pending_requests"] == 1
    assert pending.cancel()
    assert pending.cancelled() and pending.done()
    assert pool.stats()["pending_requests"] == 0, "a cancelled request stayed in the pool"
    assert pending.cancel(), "cancelling twice is harmless"
    with pytest.raises(concurrent.futures.CancelledError):
        pending.result(timeout=1.0)
    # Leaving a with block releases one still pending the same way.
    with pool.submit(b'{"op":"ignore"}', timeout=30.0) as left:
        assert pool.stats()["pending_requests"] == 1
    assert left.cancelled()
    assert pool.stats()["pending_requests"] == 0
    # One whose reply was taken inside the block keeps it.
    with pool.submit(b'{"n":1}', timeout=5.0) as answered:
        reply = answered.result()
    assert not answered.cancelled() and answered.result() == reply
    stats = pool.stats()
    assert stats["requests_cancelled"] == 2, stats
    assert stats["requests_timed_out"] == 0, stats


def test_submit_checks_its_arguments_as_request_does(pool):
    with pytest.raises(TypeError, match="payload must be bytes, a bytes-like object or str, not int"):
        pool.submit(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be None or a number of seconds, not str"):
        pool.submit(b"{}", timeout="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="idempotent must be a bool"):
        pool.submit(b"{}", idempotent="no")  # type: ignore[arg-type]
    assert json.loads(pool.submit(b'{"a":1}', idempotent=True).result(timeout=5.0)) == {"echo": {"a": 1}}
    pending = pool.submit(b"{}")
    with pytest.raises(TypeError, match="timeout must be None or a number of seconds"):
        pending.result(timeout="1")  # type: ignore[arg-type]


def test_a_pending_request_outlives_its_pool(simulator, make_pool):
    pool = make_pool(config_for(simulator.url))
    pool.wait_ready(timeout=10.0)
    answered = pool.submit(b'{"n":"kept"}', timeout=5.0)
    assert json.loads(answered.result(timeout=5.0)) == {"echo": {"n": "kept"}}
    unanswered = pool.submit(b'{"op":"ignore"}', timeout=30.0)
    never_waited = pool.submit(b'{"op":"ignore"}', timeout=30.0)
    assert not unanswered.done()
    pool.close()
    started = time.monotonic()
    with pytest.raises(wirepool.ClosedError):
        unanswered.result(timeout=30.0)
    with pytest.raises(wirepool.ClosedError):
        never_waited.result(timeout=30.0)
    assert time.monotonic() - started < 5.0
    assert json.loads(answered.result()) == {"echo": {"n": "kept"}}
    with pytest.raises(wirepool.ClosedError):
        pool.submit(b"{}")


def test_ctrl_c_ends_a_request_promptly_and_withdraws_it(pool, ctrl_c_raises):
    # A request the venue never answers, with a minute to go: a Ctrl-C must end the
    # call within a fraction of a second (it used to wait in one library call, so the
    # Ctrl-C took effect only after the whole timeout) and withdraw the request.
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.request(b'{"op":"ignore"}', timeout=60.0)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"the Ctrl-C took {elapsed:.1f} s to end the request"
    assert pool.stats()["pending_requests"] == 0, "the interrupted request was not withdrawn"
    # The pool goes on.
    assert json.loads(pool.request(b'{"after":"ctrl-c"}', timeout=5.0)) == {"echo": {"after": "ctrl-c"}}
