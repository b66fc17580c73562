"""Receiving subscription data: recv, recv_many, messages(), unsubscribe, fileno()."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import threading
import time

import pytest

import wirepool
from conftest import assert_in_sequence, config_for, receive_at_least, wait_for_event


def test_recv_delivers_each_channel_in_order(pool):
    pool.subscribe("ticker.0")
    pool.subscribe("ticker.1")
    received = []
    deadline = time.monotonic() + 15.0
    while len(received) < 60 and time.monotonic() < deadline:
        message = pool.recv(timeout=5.0)
        assert message is not None, "no message within 5 s of subscribing"
        received.append(message)
    assert len(received) >= 60
    assert {message.channel for message in received} == {"ticker.0", "ticker.1"}
    now_ns = time.time_ns()
    for message in received:
        assert isinstance(message, wirepool.Message)
        assert isinstance(message.channel, str)
        assert isinstance(message.payload, bytes)
        assert message.kind == "data"
        assert isinstance(message.connection_id, int) and message.connection_id > 0
        assert abs(now_ns - message.received_ns) < 60 * 10**9, "received_ns is not wall-clock nanoseconds"
        body = json.loads(message.payload)
        assert set(body) >= {"seq", "ts_ns", "price", "size"}
    assert_in_sequence(received)


def test_recv_returns_none_when_idle(pool):
    started = time.monotonic()
    assert pool.recv(timeout=0.1) is None
    elapsed = time.monotonic() - started
    assert 0.08 <= elapsed < 2.0, f"recv(timeout=0.1) took {elapsed:.3f} s"
    assert pool.recv(timeout=0) is None


def test_recv_many_returns_batches_in_order(pool):
    for channel in range(4):
        pool.subscribe(f"ticker.{channel}")
    received = receive_at_least(pool, 200)
    assert_in_sequence(received)
    assert {message.channel for message in received} == {f"ticker.{n}" for n in range(4)}
    # `max` bounds a batch: wait until several messages are queued, then take 3.
    deadline = time.monotonic() + 10.0
    while pool.stats()["queue_depth"] < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    small = pool.recv_many(3, timeout=5.0)
    assert 1 <= len(small) <= 3
    more = pool.recv_many(4096, timeout=5.0)
    assert_in_sequence(received + small + more)


def test_recv_many_returns_empty_list_on_timeout(pool):
    started = time.monotonic()
    assert pool.recv_many(1024, timeout=0.3) == []
    assert time.monotonic() - started >= 0.25


def test_recv_many_rejects_a_zero_max(pool):
    with pytest.raises(ValueError):
        pool.recv_many(0)
    with pytest.raises(ValueError):
        pool.recv(timeout=-1)


def test_channel_names_are_shared_between_messages(pool):
    pool.subscribe("ticker.2")
    received = receive_at_least(pool, 10)
    assert all(message.channel is received[0].channel for message in received)


def test_messages_iterator_stops_after_timeout(pool):
    pool.subscribe("ticker.0")
    taken = []
    for message in pool.messages(timeout=5.0):
        taken.append(message)
        if len(taken) == 20:
            break
    assert len(taken) == 20
    assert_in_sequence(taken)
    pool.unsubscribe("ticker.0")
    wait_for_event(pool, lambda event: event["type"] == "unsubscribed")
    rest = list(pool.messages(timeout=0.5))
    assert_in_sequence(taken + rest)
    started = time.monotonic()
    assert list(pool.messages(timeout=0.3)) == []
    assert time.monotonic() - started >= 0.25


def test_unsubscribe_stops_data(pool):
    pool.subscribe("ticker.3")
    receive_at_least(pool, 10)
    pool.unsubscribe("ticker.3")
    wait_for_event(pool, lambda event: event["type"] == "unsubscribed" and event.get("channel") == "ticker.3")
    # What was read before the server confirmed is still queued: drain it.
    for _ in range(10_000):
        if not pool.recv_many(4096, timeout=0.2):
            break
    late = pool.recv(timeout=1.0)
    assert late is None, f"data after unsubscribe was confirmed and drained: {late!r}"


def test_fileno_is_readable_while_messages_are_queued(pool):
    fd = pool.fileno()
    assert isinstance(fd, int) and fd >= 0
    assert pool.fileno() == fd
    readable, _, _ = select.select([fd], [], [], 0.3)
    assert readable == [], "the fd is readable with nothing queued"
    pool.subscribe("ticker.0")
    readable, _, _ = select.select([fd], [], [], 10.0)
    assert readable == [fd], "the fd did not become readable after subscribing"
    assert pool.recv(timeout=0) is not None, "the fd was readable but recv(timeout=0) found nothing"
    pool.unsubscribe("ticker.0")
    wait_for_event(pool, lambda event: event["type"] == "unsubscribed")
    while pool.recv_many(4096, timeout=0.2):
        pass
    readable, _, _ = select.select([fd], [], [], 0.3)
    assert readable == [], "the fd stays readable after the queue was drained"


def test_fileno_works_with_asyncio_add_reader(pool):
    async def first_batch():
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        loop.add_reader(pool.fileno(), woken.set)
        try:
            pool.subscribe("ticker.1")
            await asyncio.wait_for(woken.wait(), timeout=10.0)
            return pool.recv_many(1024, timeout=0)
        finally:
            loop.remove_reader(pool.fileno())

    batch = asyncio.run(first_batch())
    assert batch and batch[0].channel == "ticker.1"


def test_asyncio_consumer_of_a_full_blocking_queue_is_woken_every_time(start_simulator, make_pool):
    # A small `block` queue and a consumer that waits on the fd: the workers fill the
    # queue and wait for room over and over; the fd must wake the consumer whenever
    # messages wait, including after a worker resumed into a queue the consumer emptied.
    simulator = start_simulator(rate=2000, channels=4)
    pool = make_pool(config_for(simulator.url, queue={"capacity": 8, "overflow": "block"}))
    pool.wait_ready(timeout=10.0)

    async def consume(count):
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(pool.fileno(), readable.set)
        got = []
        try:
            for channel in range(4):
                pool.subscribe(f"ticker.{channel}")
            while len(got) < count:
                try:
                    await asyncio.wait_for(readable.wait(), timeout=10.0)
                except asyncio.TimeoutError:
                    pytest.fail(f"the fd stayed quiet for 10 s after {len(got)} messages, "
                                f"with {pool.stats()['queue_depth']} queued")
                readable.clear()
                got.extend(pool.recv_many(3, timeout=0))
                await asyncio.sleep(0)
        finally:
            loop.remove_reader(pool.fileno())
        return got

    got = asyncio.run(consume(4000))
    assert len(got) >= 4000
    assert_in_sequence(got)


def test_concurrent_consumers_each_get_distinct_messages(pool):
    for channel in range(4):
        pool.subscribe(f"ticker.{channel}")
    results = [[] for _ in range(3)]
    errors = []

    def consume(index: int) -> None:
        try:
            deadline = time.monotonic() + 3.0
            capacity = (1, 7, 4096)[index]
            while time.monotonic() < deadline:
                results[index].extend(pool.recv_many(capacity, timeout=0.2))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=consume, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    keys = [(m.channel, m.connection_id, json.loads(m.payload)["seq"]) for r in results for m in r]
    assert len(keys) == len(set(keys)), "a message was delivered twice"
    assert len(keys) > 100
    by_stream = {}
    for channel, connection_id, seq in keys:
        by_stream.setdefault((channel, connection_id), []).append(seq)
    for stream, seqs in by_stream.items():
        seqs.sort()
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{stream}: a message was lost"


class _Names:
    """What `Pool._decode` uses of a pool: its channel-name cache."""

    def __init__(self):
        self._channel_names = {}

    _channel_name = wirepool.Pool._channel_name


def _batch(rows):
    """The struct array and data buffer the C batch fill would make for `rows` of
    (channel, payload), as `wirepool_batch_data` lays them out: the payloads back to
    back from offset 0, then one copy of the name per run."""
    from wirepool import _ffi

    data = bytearray(b"".join(payload for _, payload in rows))
    structs = bytearray()
    last = None
    channel_offset = 0
    payload_offset = 0
    for connection_id, (channel, payload) in enumerate(rows, start=1):
        if channel != last:
            channel_offset = len(data)
            data += channel
            last = channel
        message = _ffi.wirepool_message(
            channel_len=len(channel),
            payload_len=len(payload),
            channel_offset=channel_offset,
            payload_offset=payload_offset,
            connection_id=connection_id,
            received_ns=1000 + connection_id,
        )
        payload_offset += len(payload)
        structs += bytes(message)
    return bytes(structs), bytes(data)


def test_batches_decode_to_messages_with_their_channels_and_payloads():
    rows = [
        (b"a", b"1"),
        (b"a", b"22"),
        (b"bb", b"333"),
        (b"a", b"4"),
        # An empty name takes no bytes: the next name starts at the same offset as
        # the empty one, so offsets alone cannot key the names.
        (b"", b""),
        (b"cc", b"5"),
        (b"", b"6"),
        ("é".encode(), b""),
    ]
    raw, data = _batch(rows)
    messages = wirepool.Pool._decode(_Names(), raw, data)
    assert [(m.channel, m.payload) for m in messages] == [
        (channel.decode(), payload) for channel, payload in rows
    ]
    assert [m.connection_id for m in messages] == list(range(1, len(rows) + 1))
    assert [m.received_ns for m in messages] == [1001 + i for i in range(len(rows))]
    assert {m.kind for m in messages} == {"data"}
    # Without empty names, the offsets alone key the names.
    rows = [(b"x", b"1"), (b"y", b"2"), (b"x", b"3")]
    raw, data = _batch(rows)
    messages = wirepool.Pool._decode(_Names(), raw, data)
    assert [(m.channel, m.payload) for m in messages] == [("x", b"1"), ("y", b"2"), ("x", b"3")]


def test_a_batch_in_the_layout_of_older_libraries_still_decodes():
    # Before the payloads came first, each run's name stood before its payloads; a
    # binding newer than its library must not cut payloads at the wrong places.
    from wirepool import _ffi

    rows = [(b"ticker.1", b'{"seq":1}'), (b"ticker.2", b'{"seq":2}'), (b"ticker.2", b"")]
    data = bytearray()
    structs = bytearray()
    last = None
    for connection_id, (channel, payload) in enumerate(rows, start=1):
        if channel != last:
            channel_offset = len(data)
            data += channel
            last = channel
        structs += bytes(
            _ffi.wirepool_message(
                channel_len=len(channel),
                payload_len=len(payload),
                channel_offset=channel_offset,
                payload_offset=len(data),
                connection_id=connection_id,
                received_ns=1,
            )
        )
        data += payload
    messages = wirepool.Pool._decode(_Names(), bytes(structs), bytes(data))
    assert [(m.channel, m.payload) for m in messages] == [
        (channel.decode(), payload) for channel, payload in rows
    ]


def test_building_a_batch_leaves_the_cyclic_collector_as_it_was():
    # Collections wait while a batch is built (the messages cannot form cycles); the
    # collector must come back as the caller left it, on or off.
    import gc

    raw, data = _batch([(b"ch", b"x" * 10)] * 2000)
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            messages = wirepool.Pool._decode(_Names(), raw, data)
            assert len(messages) == 2000
            assert gc.isenabled() is enabled
        # Collections still happen afterwards: the messages are tracked objects, and a
        # collection finds garbage cycles made meanwhile.
        gc.enable()
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        (gc.enable if was else gc.disable)()


def test_busy_polling_pool_delivers_in_order_and_keeps_to_the_callers_timeout(simulator, make_pool):
    # Worker and consumer may spin up to a second (the most allowed) before sleeping.
    pool = make_pool(config_for(simulator.url, busy_poll={"worker_us": 1_000_000, "consumer_us": 1_000_000}))
    pool.wait_ready(timeout=10.0)
    pool.subscribe("ticker.0")
    received = receive_at_least(pool, 100)
    assert_in_sequence(received)
    pool.unsubscribe("ticker.0")
    wait_for_event(pool, lambda event: event.get("type") == "unsubscribed")
    while pool.recv_many(4096, timeout=0):
        pass
    started = time.monotonic()
    assert pool.recv_many(1024, timeout=0.05) == []
    elapsed = time.monotonic() - started
    assert elapsed < 0.8, f"recv_many(timeout=0.05) spun for {elapsed:.3f} s"
    assert json.loads(pool.request(b'{"ping":1}', timeout=0.5)) == {"echo": {"ping": 1}}


@pytest.mark.parametrize("receive", ["recv", "recv_many", "messages"])
def test_a_ctrl_c_as_a_poll_returns_loses_no_message(pool, monkeypatch, ctrl_c_raises, receive):
    # A Ctrl-C is handled at the first Python line after the library call returns,
    # when the poll has already taken its messages from the queue. Such a signal is
    # raised here right after a poll that took some; the messages it took must come
    # from the next receive, not vanish with the exception.
    pool.subscribe("ticker.0")
    before = receive_at_least(pool, 3)
    real_poll = wirepool.lib.wirepool_pool_poll
    taken = []

    def poll_then_ctrl_c(handle, batch, timeout_ms, count_ref):
        code = real_poll(handle, batch, timeout_ms, count_ref)
        count = count_ref._obj.value
        if code == 0 and count and not taken:
            taken.append(count)
            signal.raise_signal(signal.SIGINT)
        return code

    monkeypatch.setattr(wirepool.lib, "wirepool_pool_poll", poll_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        if receive == "recv":
            pool.recv(timeout=10.0)
        elif receive == "recv_many":
            pool.recv_many(4096, timeout=10.0)
        else:
            next(pool.messages(timeout=10.0))
    assert taken, "the interrupted poll took no message"
    after = receive_at_least(pool, taken[0] + 3)
    assert_in_sequence(before + after)
