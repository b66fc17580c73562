"""Arguments a caller can get wrong or push to the edge: infinite timeouts, what a
timeout error says, request bodies that are not bytes, limits beyond the C types."""

from __future__ import annotations

import collections.abc
import json
import math
import signal
import socket
import time
import typing

import pytest

import wirepool
from conftest import config_for


@pytest.fixture
def silent_listener():
    """A loopback TCP listener that accepts connections but never answers the
    WebSocket handshake, so a pool against it never gets ready."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"ws://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_infinite_timeouts_wait_instead_of_raising_overflow_error(pool):
    pool.wait_ready(timeout=math.inf)
    pool.subscribe("ticker.0")
    assert pool.recv(timeout=math.inf) is not None
    assert pool.recv_many(16, timeout=math.inf)
    assert next(pool.messages(timeout=math.inf)) is not None
    assert pool.events(timeout=math.inf), "connect events are queued"
    reply = pool.request(b'{"op":"history","channel":"ticker.0","bars":2}', timeout=math.inf)
    assert reply


def test_wait_ready_timeout_names_the_callers_timeout_not_an_internal_slice(silent_listener, make_pool):
    pool = make_pool(config_for(silent_listener))
    with pytest.raises(wirepool.TimeoutError) as caught:
        pool.wait_ready(timeout=1.5)
    message = str(caught.value)
    assert "1500 ms" in message, f"the message should say how long the caller waited: {message!r}"
    assert "connections ready" in message, f"the library's detail is kept: {message!r}"


@pytest.mark.parametrize("payload", [7, 0, True, None, 3.5, ["{}"]])
def test_request_rejects_payloads_that_are_not_bytes_like(pool, payload):
    # bytes(7) is seven NUL bytes: an int must not turn into a body of zeros.
    with pytest.raises(TypeError, match="payload"):
        pool.request(payload, timeout=5.0)


def test_request_batch_rejects_payloads_that_are_not_bytes_like(pool):
    with pytest.raises(TypeError, match=r"payloads\[1\]"):
        pool.request_batch([b"{}", 7], timeout=5.0)


def test_request_accepts_bytes_like_payloads(pool):
    body = b'{"op":"history","channel":"ticker.0","bars":1}'
    for payload in (body, bytearray(body), memoryview(body), body.decode()):
        assert pool.request(payload, timeout=10.0)
    assert all(isinstance(item, bytes) for item in pool.request_batch([bytearray(body), memoryview(body)], timeout=10.0))


def test_request_batch_rejects_an_in_flight_limit_that_does_not_fit_the_c_type(pool):
    # A uint32_t would silently wrap 2**32 to 0 (which means the default, 8).
    with pytest.raises(ValueError, match="max_in_flight_per_connection"):
        pool.request_batch([b"{}"], timeout=5.0, max_in_flight_per_connection=2**32)


@pytest.mark.parametrize("payloads", ["123", b"123", bytearray(b"12")])
def test_request_batch_refuses_a_single_body_in_place_of_a_sequence(pool, payloads):
    # Iterated, it would send each character or byte as a request of its own.
    with pytest.raises(TypeError, match="sequence of request bodies"):
        pool.request_batch(payloads)
    assert json.loads(pool.request_batch([b'{"a":1}'])[0]) == {"echo": {"a": 1}}


class _Interrupted(Exception):
    pass


def test_a_signal_during_request_batch_is_raised_not_lost(silent_listener, make_pool):
    # Without a progress function no Python runs inside the call: the signal's
    # exception is raised when the batch returns (it was lost in a no-op callback).
    pool = make_pool(config_for(silent_listener))

    def interrupt(_signum, _frame):
        raise _Interrupted("the signal's exception")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted):
            pool.request_batch([b"{}", b"{}"], timeout=1.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_integer_arguments_of_another_type_are_named(pool):
    with pytest.raises(TypeError, match="max must be an int, not str"):
        pool.recv_many("10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max must be an int, not float"):
        pool.recv_many(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_in_flight_per_connection must be an int, not float"):
        pool.request_batch([b"{}"], max_in_flight_per_connection=2.5)  # type: ignore[arg-type]


def test_idempotent_must_be_a_bool(pool):
    # A truthy "no" must never let a request be sent twice.
    for value in ("no", 1, None):
        with pytest.raises(TypeError, match="idempotent must be a bool"):
            pool.request(b"{}", idempotent=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", ["1", b"1", [1.0], True])
def test_a_timeout_that_is_not_a_number_of_seconds_is_named(pool, timeout):
    # A str from a config file or a bool flag passed in the wrong place: a TypeError
    # naming the parameter, not Python's "'>=' not supported between ..." (or, for
    # True, a silent one-second wait).
    calls = {
        "recv": lambda: pool.recv(timeout=timeout),
        "recv_many": lambda: pool.recv_many(8, timeout=timeout),
        "messages": lambda: pool.messages(timeout=timeout),
        "wait_ready": lambda: pool.wait_ready(timeout=timeout),
        "events": lambda: pool.events(timeout=timeout),
        "request": lambda: pool.request(b"{}", timeout=timeout),
        "request_batch": lambda: pool.request_batch([b"{}"], timeout=timeout),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match=f"timeout must be None or a number of seconds, not {type(timeout).__name__}"):
            call()


@pytest.mark.parametrize("call", ["recv", "recv_many", "messages", "wait_ready", "events"])
def test_a_signal_ends_an_endless_wait_promptly(silent_listener, make_pool, call):
    # A pool that never gets ready and has no message to come: each call would wait
    # forever, and a Ctrl-C (here a SIGALRM handler raising) must still
    # end it within a fraction of a second, not when the wait ends.
    pool = make_pool(config_for(silent_listener))

    def events_forever():
        while True:  # connection attempts may still report events: wait again
            pool.events(timeout=None)

    waits = {
        "recv": lambda: pool.recv(timeout=None),
        "recv_many": lambda: pool.recv_many(64, timeout=None),
        "messages": lambda: next(pool.messages(timeout=None)),
        "wait_ready": lambda: pool.wait_ready(timeout=None),
        "events": events_forever,
    }

    def interrupt(_signum, _frame):
        raise _Interrupted("the signal's exception")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        started = time.monotonic()
        with pytest.raises(_Interrupted):
            waits[call]()
        elapsed = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < 3.0, f"{call} took {elapsed:.1f} s to notice the signal"
    assert not pool.closed


def test_a_str_that_is_not_utf8_encodable_is_named(pool):
    # A lone surrogate (what surrogateescape leaves of bad bytes read from a file or
    # the environment) cannot be sent: the error names the argument, as the library's
    # WIREPOOL_ERR_INVALID_UTF8 does, instead of a bare UnicodeEncodeError.
    bad = "ticker.\udc80"
    calls = {
        "channel": lambda: pool.subscribe(bad),
        "token": lambda: pool.set_token(bad),
        "key": lambda: pool.shared_data(bad),
        "payload": lambda: pool.request(bad, timeout=1.0),
        "payloads\\[1\\]": lambda: pool.request_batch([b"{}", bad], timeout=1.0),
    }
    for name, call in calls.items():
        with pytest.raises(wirepool.InvalidArgumentError, match=f"^{name} is not valid UTF-8") as raised:
            call()
        assert raised.value.code_name == "WIREPOOL_ERR_INVALID_UTF8"


class _Index:
    """An int-like with __index__ only (as numpy's integers are)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _fits(value, hint) -> bool:
    """Whether `value` fits the type hint, as a type checker would take it (an int is a
    float, PEP 484), checked at run time one level deep."""
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin is typing.Union:
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is collections.abc.Iterable:
        (item,) = typing.get_args(hint)
        return isinstance(value, collections.abc.Iterable) and all(
            _fits(element, item) for element in list(value))
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def test_type_hints_admit_every_argument_the_methods_accept(simulator, make_pool, tmp_path):
    # The bodies, configs, counts and ids are first passed to the method, which must
    # accept them (timeouts are checked by one function, tested above); the method's
    # type hint must then admit each, or a type checker rejects a call that works.
    config_file = tmp_path / "pool.json"
    config_file.write_text(json.dumps(config_for(simulator.url)))
    config_text = json.dumps(config_for(simulator.url))
    accepted = {(wirepool.Pool.__init__, "config"): [
        config_for(simulator.url), config_text, config_text.encode(), bytearray(config_text.encode()),
        config_file, str(config_file)]}
    pools = [make_pool(value) for value in accepted[(wirepool.Pool.__init__, "config")]]
    pool = pools[0]
    pool.wait_ready(timeout=10.0)
    bodies = ['{"a":1}', b'{"a":1}', bytearray(b'{"a":1}'), memoryview(b'{"a":1}')]
    for body in bodies:
        assert json.loads(pool.request(body, timeout=5.0, idempotent=True)) == {"echo": {"a": 1}}
    accepted[(wirepool.Pool.request, "payload")] = bodies
    accepted[(wirepool.Pool.request, "timeout")] = [5, 5.0, None]
    batches = [list(bodies), tuple(bodies)]
    for batch in batches + [iter(bodies), (body for body in bodies)]:
        assert len(pool.request_batch(batch, timeout=5.0, max_in_flight_per_connection=_Index(2))) == 4
    accepted[(wirepool.Pool.request_batch, "payloads")] = batches
    accepted[(wirepool.Pool.request_batch, "max_in_flight_per_connection")] = [2, _Index(2)]
    pool.recv_many(_Index(3), timeout=0)
    accepted[(wirepool.Pool.recv_many, "max")] = [3, _Index(3)]
    accepted[(wirepool.Pool.recv_many, "timeout")] = [0, 0.5, None]
    accepted[(wirepool.Pool.events, "timeout")] = [0, 0.5, None]
    accepted[(wirepool.Pool.wait_ready, "timeout")] = [10, 10.0, None]
    connection_id = pool.connections()[0]["id"]
    new_id = pool.recycle_connection(_Index(connection_id))
    accepted[(wirepool.Pool.recycle_connection, "connection_id")] = [connection_id, _Index(connection_id)]
    pool.close_connection(_Index(new_id))
    accepted[(wirepool.Pool.close_connection, "connection_id")] = [new_id, _Index(new_id)]
    namespace = vars(wirepool)
    for (method, parameter), values in accepted.items():
        hint = typing.get_type_hints(method, globalns=namespace)[parameter]
        for value in values:
            assert _fits(value, hint), (
                f"{method.__qualname__}({parameter}=...) accepts {type(value).__name__} but its "
                f"type hint {hint} does not admit it")
