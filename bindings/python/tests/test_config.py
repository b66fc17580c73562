"""Configuration: dict, JSON string, .json/.toml paths, and errors naming the key path."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import wirepool
from conftest import BINDING_DIR, config_for


def _assert_works(pool: wirepool.Pool) -> None:
    pool.wait_ready(timeout=10.0)
    assert pool.stats()["min_connections"] == 2
    assert json.loads(pool.request(b'{"ping":1}')) == {"echo": {"ping": 1}}


def test_config_from_dict(simulator, make_pool):
    _assert_works(make_pool(config_for(simulator.url)))


def test_config_from_json_string(simulator, make_pool):
    _assert_works(make_pool(json.dumps(config_for(simulator.url))))


def test_config_from_json_file(simulator, make_pool, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(config_for(simulator.url)))
    _assert_works(make_pool(path))
    _assert_works(make_pool(str(path)))


def test_config_from_toml_file(simulator, make_pool, tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text(
        "request_timeout_ms = 5000\n"
        "[[servers]]\n"
        f'url = "{simulator.url}"\n'
        'id = "primary"\n'
        "[pool]\n"
        "min_connections = 2\n"
        "max_connections = 2\n"
    )
    _assert_works(make_pool(path))
    _assert_works(make_pool(str(path)))


def test_min_above_max_names_the_key_path():
    config = {"servers": [{"url": "ws://127.0.0.1:9"}], "pool": {"min_connections": 5, "max_connections": 2}}
    with pytest.raises(wirepool.ConfigError) as caught:
        wirepool.Pool(config)
    assert "pool.min_connections" in str(caught.value)
    assert caught.value.code == 1003


def test_min_above_max_without_servers_is_a_config_error():
    with pytest.raises(wirepool.ConfigError, match="pool.min_connections"):
        wirepool.Pool({"pool": {"min_connections": 5, "max_connections": 2}})


def test_unknown_keys_are_named():
    with pytest.raises(wirepool.ConfigError, match="bogus"):
        wirepool.Pool({"bogus": 1})
    with pytest.raises(wirepool.ConfigError, match=r"pool\.bogus"):
        wirepool.Pool({"servers": [{"url": "ws://127.0.0.1:9"}], "pool": {"bogus": 1}})


def test_invalid_json_string_is_a_config_error():
    with pytest.raises(wirepool.ConfigError, match="JSON"):
        wirepool.Pool("{not json")


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[pool\nmin_connections = 1\n")
    with pytest.raises(wirepool.ConfigError, match="TOML"):
        wirepool.Pool(path)


def test_toml_file_errors_name_the_key_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[servers]]\nurl = "ws://127.0.0.1:9"\n[pool]\nmin_connections = 5\nmax_connections = 2\n')
    with pytest.raises(wirepool.ConfigError, match="pool.min_connections"):
        wirepool.Pool(path)


def test_unknown_file_type_is_a_config_error(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("servers: []\n")
    with pytest.raises(wirepool.ConfigError, match="json or .toml"):
        wirepool.Pool(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        wirepool.Pool(tmp_path / "absent.json")


def test_config_of_another_type_is_a_type_error():
    with pytest.raises(TypeError):
        wirepool.Pool(42)  # type: ignore[arg-type]


def test_failed_construction_leaves_nothing_to_close():
    with pytest.raises(wirepool.ConfigError):
        pool = wirepool.Pool({"bogus": 1})
        pool.close()  # never reached


def test_busy_poll_over_a_second_names_the_key():
    config = {"servers": [{"url": "ws://127.0.0.1:9"}], "busy_poll": {"consumer_us": 2_000_000}}
    with pytest.raises(wirepool.ConfigError, match=r"busy_poll\.consumer_us"):
        wirepool.Pool(config)


@pytest.mark.parametrize(
    "config, says",
    [
        (b"\xff{", "not UTF-8"),
        ('{"servers": [{"url": "ws://a:1/\ud800"}]}', "not encodable as UTF-8"),
        ({"servers": [{"url": "ws://127.0.0.1:9"}], "reconnect": {"jitter": float("nan")}}, "not representable as JSON"),
    ],
)
def test_configs_python_cannot_turn_into_json_text_are_config_errors(config, says):
    with pytest.raises(wirepool.ConfigError, match=says):
        wirepool.Pool(config)


def test_a_path_that_does_not_exist_is_named_not_parsed_as_json(tmp_path):
    path = str(tmp_path / "pool-config.yml")
    with pytest.raises(wirepool.ConfigError, match="is neither JSON text") as caught:
        wirepool.Pool(path)
    assert "pool-config.yml" in str(caught.value)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(wirepool.ConfigError, match="is a directory"):
        wirepool.Pool(str(tmp_path))



def test_a_config_path_without_end_or_too_large_is_refused_with_its_size(tmp_path):
    # /dev/zero was read whole: memory filled until the OOM killer came. Tried in a
    # child with 1 GiB of data memory, so that a read without a limit fails the test
    # (MemoryError), not the machine.
    endless = tmp_path / "endless.json"
    endless.symlink_to("/dev/zero")
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))\n"
        f"sys.path.insert(0, {str(BINDING_DIR)!r})\n"
        "import wirepool\n"
        "try:\n"
        "    wirepool.Pool(sys.argv[1])\n"
        "except wirepool.ConfigError as err:\n"
        "    print(err)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(endless)], capture_output=True, text=True, timeout=60
    )
    said = child.stdout + child.stderr
    assert child.returncode == 0, said
    assert re.search(r"endless\.json: too large for a config file: at least 16777217 bytes.*16 MiB", said), said
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as file:
        file.truncate(20_000_000)
    with pytest.raises(wirepool.ConfigError, match=r"huge\.toml: too large for a config file: at least 20000000 bytes"):
        wirepool.Pool(huge)
