"""The ctypes declarations against include/wirepool.h, error mapping, library lookup,
and the Message type."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p

import pytest

import wirepool
from wirepool import _ffi
from conftest import BINDING_DIR, HEADER

# Normalised C type -> the ctypes types that declare it correctly here.
ARG_TYPES = {
    "char*": {c_char_p},
    "uint8_t*": {c_char_p, c_void_p, POINTER(c_uint8)},
    "uint32_t": {c_uint32},
    "size_t": {c_size_t},
    "uint64_t": {c_uint64},
    "uint64_t*": {POINTER(c_uint64)},
    "wirepool_result": {c_uint32},
    "int*": {POINTER(c_int)},
    "size_t*": {POINTER(c_size_t)},
    "wirepool_pool*": {_ffi.pool_p},
    "wirepool_pool**": {POINTER(_ffi.pool_p)},
    "wirepool_batch*": {_ffi.batch_p},
    "wirepool_batch**": {POINTER(_ffi.batch_p)},
    "wirepool_bytes*": {_ffi.bytes_p},
    "wirepool_bytes**": {POINTER(_ffi.bytes_p)},
    "wirepool_pending_request*": {_ffi.pending_request_p},
    "wirepool_pending_request**": {POINTER(_ffi.pending_request_p)},
    "wirepool_request*": {POINTER(_ffi.wirepool_request)},
    "wirepool_progress_fn": {_ffi.progress_fn},
    "void*": {c_void_p},
    "wirepool_result*": {POINTER(c_uint32)},
}
RETURN_TYPES = {
    "void": {None},
    "char*": {c_char_p},
    "uint8_t*": {c_void_p},
    "wirepool_message*": {c_void_p, _ffi.message_p},
    "wirepool_result": {c_uint32},
    "size_t": {c_size_t},
    "uint64_t": {c_uint64},
}
FIELD_SIZES = {"char*": ctypes.sizeof(c_void_p), "uint8_t*": ctypes.sizeof(c_void_p),
               "size_t": ctypes.sizeof(c_size_t), "uint64_t": 8, "uint32_t": 4}


def _header_text() -> str:
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} not present")
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _normalise(c_type: str) -> str:
    c_type = re.sub(r"\b(const|struct)\b", " ", c_type)
    return re.sub(r"\s+", "", c_type)


def _prototypes():
    text = re.sub(r"^\s*#[^\n]*", " ", _header_text(), flags=re.M)
    found = {}
    for match in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(wirepool_\w+)\s*\(([^)]*)\)\s*;", text):
        result, name, params = match.groups()
        params = params.strip()
        args = [] if params in ("", "void") else [
            _normalise(re.sub(r"\b\w+\s*$", "", param.strip())) for param in params.split(",")
        ]
        found[name] = (_normalise(result), args)
    return found


def test_every_header_function_is_declared_with_matching_types():
    prototypes = _prototypes()
    assert set(prototypes) == set(_ffi.DECLARED_FUNCTIONS), (
        f"only in header: {sorted(set(prototypes) - set(_ffi.DECLARED_FUNCTIONS))}; "
        f"only in _ffi: {sorted(set(_ffi.DECLARED_FUNCTIONS) - set(prototypes))}"
    )
    for name, (result, args) in prototypes.items():
        function = getattr(_ffi.lib, name)
        assert function.restype in RETURN_TYPES[result], f"{name}: restype {function.restype} for C {result}"
        assert len(function.argtypes) == len(args), f"{name}: {len(function.argtypes)} argtypes, C has {args}"
        for index, (declared, c_type) in enumerate(zip(function.argtypes, args)):
            assert declared in ARG_TYPES[c_type], f"{name} argument {index}: {declared} for C {c_type}"


def test_message_struct_matches_the_header():
    text = _header_text()
    body = re.search(r"typedef\s+struct\s+wirepool_message\s*\{(.*?)\}\s*wirepool_message\s*;", text, re.S)
    assert body, "struct wirepool_message not found in the header"
    fields = []
    for line in body.group(1).split(";"):
        line = line.strip()
        if line:
            c_type, name = re.match(r"(.*?)(\w+)$", line).groups()
            fields.append((name, _normalise(c_type)))
    declared = _ffi.wirepool_message._fields_
    assert [name for name, _ in fields] == [name for name, _ in declared]
    for (name, c_type), (_, ctype) in zip(fields, declared):
        assert ctypes.sizeof(ctype) == FIELD_SIZES[c_type], f"field {name}"
    if ctypes.sizeof(c_void_p) == 8:
        assert ctypes.sizeof(_ffi.wirepool_message) == 72


def test_constants_match_the_header():
    text = _header_text()
    values = {name: int(value) for name, value in re.findall(r"\b(WIREPOOL_\w+)\s*=\s*(\d+)", text)}
    values.update({name: int(value) for name, value in re.findall(r"#define\s+(WIREPOOL_\w+)\s+(\d+)", text)})
    assert values, "no constants found in the header"
    for name, value in values.items():
        assert getattr(_ffi, name) == value, name
    assert set(_ffi.RESULT_NAMES.values()) == {name for name in values if name.startswith("WIREPOOL_ERR_") or name == "WIREPOOL_OK"}


def test_every_error_code_maps_to_an_exception_class():
    expected = {
        1000: wirepool.InvalidArgumentError, 1001: wirepool.InvalidArgumentError,
        1002: wirepool.InvalidArgumentError, 1003: wirepool.ConfigError,
        1004: wirepool.TimeoutError, 1005: wirepool.ClosedError,
        1006: wirepool.ConnectionLostError, 1007: wirepool.RemoteError,
        1008: wirepool.CodecError, 1009: wirepool.IoError, 1010: wirepool.TlsError,
        1011: wirepool.ProtocolError, 1012: wirepool.PanicError, 1013: wirepool.InternalError,
    }
    assert set(expected) == set(_ffi.RESULT_NAMES) - {0}
    for code, cls in expected.items():
        error = wirepool._error(code)
        assert type(error) is cls, code
        assert isinstance(error, wirepool.WirepoolError)
        assert error.code == code and str(error), code
        assert _ffi.result_text(code) not in ("", "unknown result code"), code
    assert issubclass(wirepool.TimeoutError, TimeoutError)
    assert issubclass(wirepool.InvalidArgumentError, ValueError)
    assert type(wirepool._error(4242)) is wirepool.WirepoolError


def test_library_version_is_a_string():
    assert re.match(r"\d+\.\d+", wirepool.library_version())
    assert wirepool.library_path()


def _import_in_subprocess(cwd, env_lib=None):
    env = {key: value for key, value in os.environ.items() if key != "WIREPOOL_LIB"}
    if env_lib is not None:
        env["WIREPOOL_LIB"] = env_lib
    return subprocess.run(
        [sys.executable, "-c", "import wirepool; print(wirepool.library_path())"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def test_wirepool_lib_that_does_not_exist_is_a_clear_import_error(tmp_path):
    result = _import_in_subprocess(BINDING_DIR, env_lib=str(tmp_path / "missing" / "libwirepool.so"))
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "WIREPOOL_LIB" in result.stderr
    assert str(tmp_path / "missing") in result.stderr


def test_library_lookup_order(tmp_path):
    copy = tmp_path / "site" / "wirepool"
    shutil.copytree(BINDING_DIR / "wirepool", copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    result = _import_in_subprocess(copy.parent)
    assert result.returncode != 0, "imported without any library to find"
    assert "Looked in" in result.stderr, result.stderr
    assert str(copy / _ffi.LIBRARY_FILE) in result.stderr, "the package directory was not searched"
    shutil.copy(wirepool.library_path(), copy / _ffi.LIBRARY_FILE)
    result = _import_in_subprocess(copy.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(copy / _ffi.LIBRARY_FILE)


def test_message_has_slots_and_a_repr():
    message = wirepool.Message("ticker.0", b'{"seq":1}' + b"x" * 200, "data", 3, 123)
    assert not hasattr(message, "__dict__")
    with pytest.raises(AttributeError):
        message.extra = 1  # type: ignore[attr-defined]
    text = repr(message)
    assert text.startswith("Message(channel='ticker.0'") and "connection_id=3" in text and "..." in text
