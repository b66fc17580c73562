"""Authentication against a simulator started with --token."""

from __future__ import annotations

import json

import pytest

import wirepool
from conftest import config_for, wait_for_event


def test_good_token_connects_and_serves(start_simulator, make_pool):
    simulator = start_simulator(token="SECRET")
    pool = make_pool(config_for(simulator.url, auth={"token": "SECRET"}))
    pool.wait_ready(timeout=10.0)
    assert json.loads(pool.request(b'{"authed":true}')) == {"echo": {"authed": True}}
    pool.subscribe("ticker.0")
    assert pool.recv(timeout=10.0) is not None


def test_bad_token_never_gets_ready_and_reports_auth_failed(start_simulator, make_pool):
    simulator = start_simulator(token="SECRET")
    pool = make_pool(config_for(simulator.url, auth={"token": "WRONG"}))
    with pytest.raises(wirepool.TimeoutError):
        pool.wait_ready(timeout=2.0)
    event = wait_for_event(pool, lambda event: event["type"] == "auth_failed")
    assert "WRONG" not in json.dumps(event), "the token leaked into an event"
    assert pool.stats()["ready_connections"] == 0
