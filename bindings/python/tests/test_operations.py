"""Leases (acquire/release, idle suspension and restore), codec shared data, connections and
pool settings at run time."""

from __future__ import annotations

import json
import os
import time

import pytest

import wirepool
from conftest import assert_in_sequence, config_for, receive_at_least, wait_for_event


def test_shared_data_from_the_codec(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, pool={"min_connections": 2, "max_connections": 2,
                                                     "require_shared": ["instruments"]}))
    pool.wait_ready(timeout=10.0)
    value = pool.shared_data("instruments")
    assert value is not None, "require_shared=['instruments'] but nothing is stored after wait_ready"
    assert set(json.loads(value)["instruments"]) >= {f"ticker.{n}" for n in range(4)}
    assert pool.stats()["has_shared_data"] is True
    assert pool.shared_data("no-such-key") is None
    with pytest.raises(ValueError):
        pool.shared_data("")


def test_release_without_a_lease_is_an_invalid_argument(pool):
    with pytest.raises(wirepool.InvalidArgumentError):
        pool.release()
    with pool.lease() as leased:
        assert leased is pool
    with pytest.raises(wirepool.InvalidArgumentError):
        pool.release()


def test_a_pool_closed_inside_a_lease_block_does_not_mask_how_the_block_ended(pool):
    class Mine(Exception):
        pass

    with pytest.raises(Mine):
        with pool.lease():
            pool.close()
            raise Mine()
    assert pool.closed


def test_a_lease_block_that_closes_its_pool_ends_cleanly(pool):
    with pool.lease():
        pool.close()
    with pytest.raises(wirepool.ClosedError):
        pool.acquire()


def test_idle_pool_suspends_and_acquire_restores_subscriptions(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, lease={"idle_timeout_ms": 300}))
    pool.wait_ready(timeout=10.0)
    pool.acquire()
    pool.subscribe("ticker.0")
    assert pool.recv(timeout=10.0) is not None
    seen = []
    pool.release()
    wait_for_event(pool, lambda event: event["type"] == "suspended", seen=seen)
    # Drain what arrived before the connections closed; then nothing flows.
    while pool.recv_many(4096, timeout=0.5):
        pass
    assert pool.recv(timeout=0.5) is None, "data flowed while suspended"
    pool.acquire()
    wait_for_event(pool, lambda event: event["type"] == "lease_resumed", seen=seen)
    message = pool.recv(timeout=10.0)
    assert message is not None and message.channel == "ticker.0", "subscription not restored after acquire"
    pool.release()


def test_set_token_rotates_and_a_refused_token_keeps_the_sessions(start_simulator):
    sim = start_simulator(token="secret-a")
    config = {
        "servers": [{"url": sim.url}],
        "pool": {"min_connections": 2, "max_connections": 2},
        "auth": {"token": "secret-a"},
    }
    with wirepool.Pool(config) as pool:
        pool.wait_ready(10.0)
        pool.set_token("secret-a")
        with pytest.raises(wirepool.RemoteError) as raised:
            pool.set_token("wrong")
        assert "old sessions kept" in str(raised.value)
        assert pool.stats()["ready_connections"] == 2


def test_connections_can_be_listed_recycled_opened_and_closed(simulator, make_pool):
    # No scaling down: an idle pool would drain the connection opened beyond min_connections.
    pool = make_pool(config_for(simulator.url, pool={"min_connections": 2, "max_connections": 3,
                                                     "scale_down_at": 0.0}))
    pool.wait_ready(timeout=10.0)
    pool.subscribe("ticker.0")
    first = receive_at_least(pool, 5)
    connections = pool.connections()
    ids = {connection["id"] for connection in connections}
    assert len(ids) == 2 and all(connection["ready"] for connection in connections), connections
    serving = first[-1].connection_id
    assert serving in ids

    # Recycled make before break: the replacement takes over the channel, then the old
    # one leaves the list.
    replacement = pool.recycle_connection(serving)
    assert replacement not in ids
    seen: list = []
    recycled = wait_for_event(pool, lambda event: event["type"] == "recycled", seen=seen)
    assert recycled["connection_id"] == replacement, recycled
    deadline = time.monotonic() + 15.0
    after = []
    while not any(message.connection_id == replacement for message in after):
        assert time.monotonic() < deadline, f"nothing from {replacement}; events {seen}"
        after.extend(pool.recv_many(1024, timeout=1.0))
    assert_in_sequence(first + after)
    deadline = time.monotonic() + 15.0
    while serving in {connection["id"] for connection in pool.connections()}:
        assert time.monotonic() < deadline, f"{serving} still listed: {pool.connections()}"
        time.sleep(0.05)

    # One more, up to max_connections; then no more.
    extra = pool.open_connection()
    assert extra in {connection["id"] for connection in pool.connections()}
    with pytest.raises(wirepool.InvalidArgumentError):
        pool.open_connection()
    pool.close_connection(extra)
    wait_for_event(pool, lambda event: event["type"] == "closed" and event.get("connection_id") == extra,
                   seen=seen)

    # Bad ids say what is wrong.
    with pytest.raises(wirepool.InvalidArgumentError, match="999999"):
        pool.close_connection(999999)
    with pytest.raises(wirepool.InvalidArgumentError):
        pool.recycle_connection(999999)
    with pytest.raises(ValueError, match="connection_id"):
        pool.recycle_connection(-1)
    with pytest.raises(ValueError, match="connection_id"):
        pool.close_connection(1 << 64)
    with pytest.raises(TypeError, match="connection_id"):
        pool.close_connection("1")
    with pytest.raises(TypeError, match="connection_id"):
        pool.recycle_connection(True)


def _wait_for_connections(pool: wirepool.Pool, count: int, timeout: float = 10.0) -> list:
    """Waits, event by event, until exactly ``count`` connections are listed, all ready."""
    deadline = time.monotonic() + timeout
    while True:
        listed = pool.connections()
        if len(listed) == count and all(connection["ready"] for connection in listed):
            return listed
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"expected {count} ready connections within {timeout} s: {listed}"
        pool.events(timeout=min(remaining, 0.5))


def test_settings_read_back_and_reconfigure_opens_and_drains_connections(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, strategy="least_connections"))
    pool.wait_ready(timeout=10.0)
    assert pool.settings() == {"min_connections": 2, "max_connections": 2, "strategy": "least_connections"}

    before = {connection["id"] for connection in pool.connections()}
    pool.reconfigure(max_connections=4, min_connections=3)
    assert pool.settings() == {"min_connections": 3, "max_connections": 4, "strategy": "least_connections"}
    grown = _wait_for_connections(pool, 3)
    assert len({connection["id"] for connection in grown} - before) >= 1, grown

    pool.reconfigure(min_connections=1)
    _wait_for_connections(pool, 1)
    pool.reconfigure(strategy="random")
    assert pool.settings() == {"min_connections": 1, "max_connections": 4, "strategy": "random"}
    pool.reconfigure()  # nothing given, nothing changes
    assert pool.settings() == {"min_connections": 1, "max_connections": 4, "strategy": "random"}


@pytest.mark.parametrize("change, reason", [
    ({"min_connections": 3}, "pool.min_connections: 3 is greater than pool.max_connections (2)"),
    ({"max_connections": 1}, "pool.min_connections: 2 is greater than pool.max_connections (1)"),
    ({"min_connections": -1}, "min_connections: -1 is not a whole number from 0 to 4294967295"),
    ({"max_connections": 1 << 32}, "max_connections: 4294967296 is not a whole number"),
    ({"max_connections": 0}, "pool.max_connections: 0 is outside 1..=10000"),
    ({"strategy": "fastest"}, 'strategy: "fastest" is not one of "round_robin"'),
    ({"min_connections": 1, "strategy": "fastest"}, 'strategy: "fastest" is not one of'),
])
def test_a_refused_reconfigure_names_the_reason_and_changes_nothing(pool, change, reason):
    before = pool.settings()
    with pytest.raises(wirepool.InvalidArgumentError) as raised:
        pool.reconfigure(**change)
    assert reason in str(raised.value)
    assert raised.value.code == wirepool._ffi.WIREPOOL_ERR_INVALID_ARGUMENT
    assert pool.settings() == before, f"{change} was refused but changed the settings"


class _Count:
    """An int-like count, as numpy's integers are (``__index__``)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_reconfigure_arguments_of_the_wrong_type_are_named(pool):
    before = pool.settings()
    for change, name in [
        ({"min_connections": 1.0}, "min_connections must be an int, not float"),
        ({"min_connections": "1"}, "min_connections must be an int, not str"),
        ({"max_connections": True}, "max_connections must be an int, not bool"),
        ({"strategy": 1}, "strategy must be a str, not int"),
    ]:
        with pytest.raises(TypeError, match=name):
            pool.reconfigure(**change)
    with pytest.raises(TypeError, match="maxx"):
        pool.reconfigure(maxx=3)
    with pytest.raises(TypeError):
        pool.reconfigure(2)  # keyword-only: a bare count says nothing about which one
    with pytest.raises(wirepool.InvalidArgumentError, match="strategy is not valid UTF-8"):
        pool.reconfigure(strategy="round\udcffrobin")
    assert pool.settings() == before
    pool.reconfigure(max_connections=_Count(3))
    assert pool.settings()["max_connections"] == 3


def test_settings_and_reconfigure_after_close_raise_closed(pool):
    pool.close()
    with pytest.raises(wirepool.ClosedError):
        pool.settings()
    with pytest.raises(wirepool.ClosedError):
        pool.reconfigure(min_connections=1)


def _refusing_url() -> tuple:
    """A ws:// URL that refuses connects while the returned socket lives (bound, never
    listening, so no other test's server can take the port)."""
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, f"ws://127.0.0.1:{sock.getsockname()[1]}"


def _health_when(pool, predicate, what, timeout=10.0):
    """Reads health after each batch of events until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        health = pool.health()
        if predicate(health):
            return health
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"expected {what} within {timeout} s: {health}"
        pool.events(timeout=min(remaining, 0.5))


def test_a_ready_pool_is_healthy_and_its_server_closed(pool):
    health = _health_when(pool, lambda h: h["level"] == "healthy", "healthy")
    assert health["reasons"] == []
    assert health["history"][-1]["level"] == "healthy", health
    servers = pool.servers()
    assert isinstance(servers, list) and len(servers) == 1, servers
    assert servers[0]["circuit"] == "closed", servers
    assert servers[0]["ready_connections"] == 2, servers


def test_a_refusing_server_opens_its_breaker_in_servers_and_health(simulator, make_pool):
    sock, refusing = _refusing_url()
    try:
        pool = make_pool({
            "servers": [{"id": "sim", "url": simulator.url}, {"id": "refusing", "url": refusing}],
            "pool": {"min_connections": 2, "max_connections": 2},
            "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20},
            "circuit_breaker": {"failure_threshold": 1, "recovery_timeout_ms": 30000},
        })
        opened = wait_for_event(pool, lambda event: event["type"] == "circuit_open")
        assert opened["server"] == "refusing", opened
        servers = {server["id"]: server for server in pool.servers()}
        assert [server["id"] for server in pool.servers()] == ["sim", "refusing"]
        assert servers["refusing"]["circuit"] == "open", servers
        assert servers["refusing"]["consecutive_failures"] >= 1, servers
        assert servers["sim"]["circuit"] == "closed", servers
        health = _health_when(
            pool, lambda h: any("circuit breaker" in reason for reason in h["reasons"]),
            "health to name the open breaker")
        assert health["level"] == "degraded", health
        pool.close()
        with pytest.raises(wirepool.ClosedError):
            pool.health()
        with pytest.raises(wirepool.ClosedError):
            pool.servers()
    finally:
        sock.close()


def _get(addr, path):
    """``GET path`` on the admin port at ``addr``: (status, body bytes)."""
    import http.client

    connection = http.client.HTTPConnection(*addr, timeout=10)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def test_request_latency_counts_each_answered_request_as_the_admin_port_does(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, health={"listen": "127.0.0.1:0"}))
    pool.wait_ready(timeout=10.0)
    assert pool.request_latency()["count"] == 0
    answered, refused = 15, 2
    for _ in range(answered):
        pool.request(b'{"op":"history","channel":"ticker.0","bars":1}', timeout=5.0)
    for _ in range(refused):
        with pytest.raises(wirepool.RemoteError):
            pool.request(b'{"op":"fail"}', timeout=5.0)
    latency = pool.request_latency()
    assert latency["count"] == answered + refused, latency
    assert sum(latency["counts"]) == answered + refused, latency
    assert len(latency["counts"]) == len(latency["bounds_us"]) + 1, latency
    assert latency["p50_upper_bound_us"] in latency["bounds_us"], latency
    status, body = _get(pool.health_addr(), "/api/v1/pool/latency")
    assert status == 200, body
    assert json.loads(body) == latency
    pool.close()
    with pytest.raises(wirepool.ClosedError):
        pool.request_latency()


def test_health_addr_names_the_port_the_system_chose_or_none(simulator, make_pool):
    pool = make_pool(config_for(simulator.url, health={"listen": "127.0.0.1:0"}))
    addr = pool.health_addr()
    assert isinstance(addr, tuple) and addr[0] == "127.0.0.1", addr
    assert isinstance(addr[1], int) and addr[1] > 0, addr
    status, body = _get(addr, "/health")
    assert status in (200, 503), body
    assert "status" in json.loads(body), body
    pool.close()
    with pytest.raises(wirepool.ClosedError):
        pool.health_addr()
    assert make_pool(config_for(simulator.url)).health_addr() is None


def _cpus_allowed(task: str) -> set[int]:
    """The CPUs a thread may run on, from /proc/<task>/status."""
    with open(f"/proc/{task}/status") as status:
        listed = next(line.split(":", 1)[1] for line in status if line.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for part in listed.strip().split(","):
        start, _, end = part.partition("-")
        cpus.update(range(int(start), int(end or start) + 1))
    return cpus


def test_workers_are_pinned_by_affinity_worker_cpus(simulator, make_pool):
    cpu = max(os.sched_getaffinity(0))
    pool = make_pool(config_for(simulator.url, pool={"min_connections": 2, "max_connections": 2},
                                affinity={"worker_cpus": [cpu]}))
    pool.wait_ready(timeout=10.0)
    deadline = time.monotonic() + 10.0
    while not all(connection["cpu"] is not None for connection in pool.connections()):
        assert time.monotonic() < deadline, pool.connections()
        time.sleep(0.02)
    for connection in pool.connections():
        assert connection["cpu"] == cpu, connection
        assert _cpus_allowed(f"self/task/{connection['thread_id']}") == {cpu}, connection
    with pytest.raises(wirepool.ConfigError, match=r"affinity\.worker_cpus\[0\]: CPU 4095 is not one"):
        make_pool(config_for(simulator.url, affinity={"worker_cpus": [4095]}))


def test_an_unpinned_worker_shows_no_cpu(pool):
    pool.wait_ready(timeout=10.0)
    assert all(connection["cpu"] is None for connection in pool.connections()), pool.connections()
