"""Requests: replies, venue errors, timeouts, argument errors, concurrency."""

from __future__ import annotations

import builtins
import json
import threading
import time

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
