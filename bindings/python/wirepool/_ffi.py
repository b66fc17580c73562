"""Loading ``libwirepool`` and declaring its C ABI (``include/wirepool.h``) for ctypes.

Private: the public API is in ``wirepool/__init__.py``. Every function's ``argtypes``
and ``restype`` are declared here once, next to its C prototype, so a reader can
compare this file with the header line by line (``tests/test_ffi.py`` does it
mechanically when the header is present).

The library is looked up, in order: the ``WIREPOOL_LIB`` environment variable, a
library next to this package (``wirepool/libwirepool.so``), then
``target/release/libwirepool.so`` of the repository the package sits in.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

if sys.platform == "darwin":
    LIBRARY_FILE = "libwirepool.dylib"
elif sys.platform == "win32":
    LIBRARY_FILE = "wirepool.dll"
else:
    LIBRARY_FILE = "libwirepool.so"


def candidate_paths() -> List[Path]:
    """Where the library is looked for, in order (``WIREPOOL_LIB`` first when set)."""
    package_dir = Path(__file__).resolve().parent
    candidates = []
    from_env = os.environ.get("WIREPOOL_LIB")
    if from_env:
        candidates.append(Path(from_env))
    candidates.append(package_dir / LIBRARY_FILE)
    # bindings/python/wirepool -> the repository root is three levels up; walking all
    # parents also finds it when the package is imported from elsewhere in the tree.
    for parent in package_dir.parents:
        candidates.append(parent / "target" / "release" / LIBRARY_FILE)
    return candidates


def _load() -> ctypes.CDLL:
    from_env = os.environ.get("WIREPOOL_LIB")
    if from_env:
        # An explicit choice is never silently replaced by another copy.
        try:
            return ctypes.CDLL(from_env)
        except OSError as err:
            raise ImportError(
                f"wirepool: cannot load the library named by WIREPOOL_LIB={from_env!r}: {err}"
            ) from err
    looked = []
    for path in candidate_paths():
        looked.append(str(path))
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError as err:
                raise ImportError(f"wirepool: cannot load {path}: {err}") from err
    raise ImportError(
        f"wirepool: {LIBRARY_FILE} not found. Set WIREPOOL_LIB to its path, put it next to "
        "the package, or build it with `cargo build --release`. Looked in:\n  "
        + "\n  ".join(looked)
    )


lib = _load()

# --- result codes (enum wirepool_result) -------------------------------------------

WIREPOOL_OK = 0
# Not an error: wirepool_pending_request_wait's "not finished yet" (no exception maps to it).
WIREPOOL_PENDING = 1
WIREPOOL_ERR_NULL_ARGUMENT = 1000
WIREPOOL_ERR_INVALID_UTF8 = 1001
WIREPOOL_ERR_INVALID_ARGUMENT = 1002
WIREPOOL_ERR_CONFIG = 1003
WIREPOOL_ERR_TIMEOUT = 1004
WIREPOOL_ERR_CLOSED = 1005
WIREPOOL_ERR_CONNECTION_LOST = 1006
WIREPOOL_ERR_REMOTE = 1007
WIREPOOL_ERR_CODEC = 1008
WIREPOOL_ERR_IO = 1009
WIREPOOL_ERR_TLS = 1010
WIREPOOL_ERR_PROTOCOL = 1011
WIREPOOL_ERR_PANIC = 1012
WIREPOOL_ERR_INTERNAL = 1013

RESULT_NAMES = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("WIREPOOL_ERR_") or name == "WIREPOOL_OK"
}

WIREPOOL_REQUEST_IDEMPOTENT = 1
WIREPOOL_MESSAGE_DATA = 0

# The largest capacity wirepool_batch_new accepts.
MAX_BATCH_CAPACITY = 1 << 20

# --- types -----------------------------------------------------------------------------

wirepool_result = c_uint32


class wirepool_pool(Structure):
    """Opaque ``struct wirepool_pool``."""


class wirepool_batch(Structure):
    """Opaque ``struct wirepool_batch``."""


class wirepool_bytes(Structure):
    """Opaque ``struct wirepool_bytes``."""


class wirepool_pending_request(Structure):
    """Opaque ``struct wirepool_pending_request``: a submitted request."""


class wirepool_message(Structure):
    """``struct wirepool_message``: one received message, valid until the next poll."""

    _fields_ = [
        ("channel", POINTER(c_char)),
        ("payload", POINTER(c_uint8)),
        ("channel_len", c_size_t),
        ("payload_len", c_size_t),
        ("channel_offset", c_size_t),
        ("payload_offset", c_size_t),
        ("connection_id", c_uint64),
        ("received_ns", c_uint64),
        ("kind", c_uint32),
        ("reserved", c_uint32),
    ]


pool_p = POINTER(wirepool_pool)
batch_p = POINTER(wirepool_batch)
bytes_p = POINTER(wirepool_bytes)
pending_request_p = POINTER(wirepool_pending_request)
message_p = POINTER(wirepool_message)


def _declare(name: str, restype: Optional[type], argtypes: Sequence[type]) -> None:
    try:
        function = getattr(lib, name)
    except AttributeError:
        raise ImportError(
            f"wirepool: the library {getattr(lib, '_name', '?')} has no {name}: it is older "
            "than this binding; rebuild it (cargo build --release --lib) or point "
            "WIREPOOL_LIB at a current one"
        ) from None
    function.restype = restype
    function.argtypes = argtypes


# Pointer-returning data accessors use c_void_p (an int) so ctypes.string_at can copy
# from them without building a pointer object; payload buffers go in as c_char_p
# (a bytes object is passed without a copy; same ABI as const uint8_t *).

# const char *wirepool_version(void);
_declare("wirepool_version", c_char_p, [])
# const char *wirepool_result_text(uint32_t code);
_declare("wirepool_result_text", c_char_p, [c_uint32])
# const char *wirepool_last_error(void);
_declare("wirepool_last_error", c_char_p, [])
# wirepool_result wirepool_pool_new(const char *config_json, wirepool_pool **out_pool);
_declare("wirepool_pool_new", wirepool_result, [c_char_p, POINTER(pool_p)])
# wirepool_result wirepool_pool_close(const wirepool_pool *pool);
_declare("wirepool_pool_close", wirepool_result, [pool_p])
# void wirepool_pool_free(wirepool_pool *pool);
_declare("wirepool_pool_free", None, [pool_p])
# wirepool_result wirepool_pool_wait_ready(const wirepool_pool *pool, uint32_t timeout_ms);
_declare("wirepool_pool_wait_ready", wirepool_result, [pool_p, c_uint32])
# wirepool_result wirepool_pool_subscribe(const wirepool_pool *pool, const char *channel);
_declare("wirepool_pool_subscribe", wirepool_result, [pool_p, c_char_p])
# wirepool_result wirepool_pool_unsubscribe(const wirepool_pool *pool, const char *channel);
_declare("wirepool_pool_unsubscribe", wirepool_result, [pool_p, c_char_p])
# wirepool_result wirepool_pool_request(const wirepool_pool *pool, const uint8_t *payload,
#     size_t payload_len, uint32_t timeout_ms, uint32_t flags, wirepool_bytes **out_reply);
_declare(
    "wirepool_pool_request",
    wirepool_result,
    [pool_p, c_char_p, c_size_t, c_uint32, c_uint32, POINTER(bytes_p)],
)
# wirepool_result wirepool_pool_request_submit(const wirepool_pool *pool,
#     const uint8_t *payload, size_t payload_len, uint32_t timeout_ms, uint32_t flags,
#     wirepool_pending_request **out_request);
_declare(
    "wirepool_pool_request_submit",
    wirepool_result,
    [pool_p, c_char_p, c_size_t, c_uint32, c_uint32, POINTER(pending_request_p)],
)
# wirepool_result wirepool_pending_request_wait(wirepool_pending_request *request,
#     uint32_t wait_ms, wirepool_bytes **out_reply);   /* WIREPOOL_PENDING: not finished */
_declare("wirepool_pending_request_wait", wirepool_result, [pending_request_p, c_uint32, POINTER(bytes_p)])
# uint64_t wirepool_pending_request_id(const wirepool_pending_request *request);
_declare("wirepool_pending_request_id", c_uint64, [pending_request_p])
# void wirepool_pending_request_free(wirepool_pending_request *request);
_declare("wirepool_pending_request_free", None, [pending_request_p])
# wirepool_result wirepool_pool_poll(const wirepool_pool *pool, wirepool_batch *batch,
#     uint32_t timeout_ms, size_t *out_count);
_declare("wirepool_pool_poll", wirepool_result, [pool_p, batch_p, c_uint32, POINTER(c_size_t)])
# wirepool_result wirepool_pool_fd(const wirepool_pool *pool, int *out_fd);
_declare("wirepool_pool_fd", wirepool_result, [pool_p, POINTER(c_int)])
# wirepool_result wirepool_pool_stats_json(const wirepool_pool *pool, wirepool_bytes **out_json);
_declare("wirepool_pool_stats_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_events_json(const wirepool_pool *pool, uint32_t timeout_ms,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_events_json", wirepool_result, [pool_p, c_uint32, POINTER(bytes_p)])
# wirepool_result wirepool_pool_acquire(const wirepool_pool *pool);
_declare("wirepool_pool_acquire", wirepool_result, [pool_p])
# wirepool_result wirepool_pool_release(const wirepool_pool *pool);
_declare("wirepool_pool_release", wirepool_result, [pool_p])
# wirepool_result wirepool_pool_shared_data(const wirepool_pool *pool, const char *key,
#     wirepool_bytes **out_value);
_declare("wirepool_pool_shared_data", wirepool_result, [pool_p, c_char_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_set_token(const wirepool_pool *pool, const char *token);
_declare("wirepool_pool_set_token", wirepool_result, [pool_p, c_char_p])
# wirepool_result wirepool_pool_connections_json(const wirepool_pool *pool,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_connections_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_health_json(const wirepool_pool *pool,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_health_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_servers_json(const wirepool_pool *pool,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_servers_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_request_latency_json(const wirepool_pool *pool,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_request_latency_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_health_addr(const wirepool_pool *pool,
#     wirepool_bytes **out_addr);   /* WIREPOOL_OK with NULL: no admin port */
_declare("wirepool_pool_health_addr", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_close_connection(const wirepool_pool *pool,
#     uint64_t connection_id);
_declare("wirepool_pool_close_connection", wirepool_result, [pool_p, c_uint64])
# wirepool_result wirepool_pool_recycle_connection(const wirepool_pool *pool,
#     uint64_t connection_id, uint64_t *out_replacement_id);
_declare("wirepool_pool_recycle_connection", wirepool_result, [pool_p, c_uint64, POINTER(c_uint64)])
# wirepool_result wirepool_pool_open_connection(const wirepool_pool *pool,
#     uint64_t *out_connection_id);
_declare("wirepool_pool_open_connection", wirepool_result, [pool_p, POINTER(c_uint64)])
# wirepool_result wirepool_pool_settings_json(const wirepool_pool *pool,
#     wirepool_bytes **out_json);
_declare("wirepool_pool_settings_json", wirepool_result, [pool_p, POINTER(bytes_p)])
# wirepool_result wirepool_pool_reconfigure_json(const wirepool_pool *pool,
#     const char *settings_json);
_declare("wirepool_pool_reconfigure_json", wirepool_result, [pool_p, c_char_p])
class wirepool_request(Structure):
    """``struct wirepool_request``: one request of a batch."""

    _fields_ = [("payload", c_void_p), ("payload_len", c_size_t)]


# typedef void (*wirepool_progress_fn)(void *user_data, size_t done, size_t total);
progress_fn = CFUNCTYPE(None, c_void_p, c_size_t, c_size_t)
# wirepool_result wirepool_pool_request_batch(const wirepool_pool *pool,
#     const wirepool_request *requests, size_t count, uint32_t timeout_ms,
#     uint32_t max_in_flight_per_connection, wirepool_progress_fn progress, void *user_data,
#     wirepool_bytes **out_replies, wirepool_result *out_codes);
_declare(
    "wirepool_pool_request_batch",
    wirepool_result,
    [pool_p, POINTER(wirepool_request), c_size_t, c_uint32, c_uint32, progress_fn, c_void_p,
     POINTER(bytes_p), POINTER(wirepool_result)],
)
# wirepool_result wirepool_pool_request_batch_detailed(const wirepool_pool *pool,
#     const wirepool_request *requests, size_t count, uint32_t timeout_ms,
#     uint32_t max_in_flight_per_connection, wirepool_progress_fn progress, void *user_data,
#     wirepool_bytes **out_replies, wirepool_result *out_codes, wirepool_bytes **out_errors);
_declare(
    "wirepool_pool_request_batch_detailed",
    wirepool_result,
    [pool_p, POINTER(wirepool_request), c_size_t, c_uint32, c_uint32, progress_fn, c_void_p,
     POINTER(bytes_p), POINTER(wirepool_result), POINTER(bytes_p)],
)
# wirepool_result wirepool_batch_new(size_t capacity, wirepool_batch **out_batch);
_declare("wirepool_batch_new", wirepool_result, [c_size_t, POINTER(batch_p)])
# void wirepool_batch_free(wirepool_batch *batch);
_declare("wirepool_batch_free", None, [batch_p])
# const wirepool_message *wirepool_batch_messages(const wirepool_batch *batch);
_declare("wirepool_batch_messages", c_void_p, [batch_p])
# const uint8_t *wirepool_batch_data(const wirepool_batch *batch, size_t *out_len);
_declare("wirepool_batch_data", c_void_p, [batch_p, POINTER(c_size_t)])
# const uint8_t *wirepool_bytes_data(const wirepool_bytes *bytes);
_declare("wirepool_bytes_data", c_void_p, [bytes_p])
# size_t wirepool_bytes_len(const wirepool_bytes *bytes);
_declare("wirepool_bytes_len", c_size_t, [bytes_p])
# void wirepool_bytes_free(wirepool_bytes *bytes);
_declare("wirepool_bytes_free", None, [bytes_p])

DECLARED_FUNCTIONS = (
    "wirepool_version",
    "wirepool_result_text",
    "wirepool_last_error",
    "wirepool_pool_new",
    "wirepool_pool_close",
    "wirepool_pool_free",
    "wirepool_pool_wait_ready",
    "wirepool_pool_subscribe",
    "wirepool_pool_unsubscribe",
    "wirepool_pool_request",
    "wirepool_pool_request_submit",
    "wirepool_pending_request_wait",
    "wirepool_pending_request_id",
    "wirepool_pending_request_free",
    "wirepool_pool_poll",
    "wirepool_pool_fd",
    "wirepool_pool_stats_json",
    "wirepool_pool_events_json",
    "wirepool_pool_acquire",
    "wirepool_pool_release",
    "wirepool_pool_shared_data",
    "wirepool_pool_set_token",
    "wirepool_pool_connections_json",
    "wirepool_pool_health_json",
    "wirepool_pool_servers_json",
    "wirepool_pool_request_latency_json",
    "wirepool_pool_health_addr",
    "wirepool_pool_close_connection",
    "wirepool_pool_recycle_connection",
    "wirepool_pool_open_connection",
    "wirepool_pool_settings_json",
    "wirepool_pool_reconfigure_json",
    "wirepool_pool_request_batch",
    "wirepool_pool_request_batch_detailed",
    "wirepool_batch_new",
    "wirepool_batch_free",
    "wirepool_batch_messages",
    "wirepool_batch_data",
    "wirepool_bytes_data",
    "wirepool_bytes_len",
    "wirepool_bytes_free",
)


def last_error() -> str:
    """The detailed text of the last error on this thread ("" when there is none)."""
    text = lib.wirepool_last_error()
    return text.decode("utf-8", "replace") if text else ""


def result_text(code: int) -> str:
    """The library's static description of a result code."""
    text = lib.wirepool_result_text(code)
    return text.decode("utf-8", "replace") if text else ""


def bytes_value(handle: ctypes._Pointer[wirepool_bytes]) -> bytes:
    """A copy of a ``wirepool_bytes`` buffer's contents (b"" for NULL); does not free it.

    The caller frees the buffer in a ``finally`` (``wirepool_bytes_free`` ignores NULL):
    a Ctrl-C is handled at the first line after the library call that handed the buffer
    out, so a free on the success path alone would leak it."""
    address = lib.wirepool_bytes_data(handle)
    length = lib.wirepool_bytes_len(handle)
    return ctypes.string_at(address, length) if address and length else b""


def free_all(buffers: Iterable[ctypes._Pointer[wirepool_bytes]]) -> None:
    """Frees every buffer of an array of ``wirepool_bytes *`` (NULL entries are ignored).

    One ``map`` in C: no Python line runs between the frees, so a signal cannot stop the
    loop half way and leak the rest."""
    collections.deque(map(lib.wirepool_bytes_free, buffers), maxlen=0)


def library_path() -> Optional[str]:
    """The file the library was loaded from, as ctypes saw it."""
    return getattr(lib, "_name", None)
