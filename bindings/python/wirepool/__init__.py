"""wirepool: pools of persistent upstream WebSocket connections, from Python.

A thin ctypes layer over ``libwirepool`` (the C ABI in ``include/wirepool.h``)::

    import wirepool

    with wirepool.Pool({"servers": [{"url": "ws://127.0.0.1:9000"}]}) as pool:
        pool.wait_ready()
        pool.subscribe("ticker.BTC-USD")
        for msg in pool.messages(timeout=1.0):
            print(msg.channel, msg.payload)
        reply = pool.request(b'{"op":"history","channel":"ticker.BTC-USD","bars":5}')

Blocking calls release the GIL while they wait inside the library, and waits longer
than a fraction of a second are made of short waits, so Ctrl-C and ``close()`` from
another thread interrupt them promptly (``request_batch`` waits in one call:
``close()`` ends it at once, a Ctrl-C when it returns). ``submit`` sends a request
without waiting; its ``PendingRequest`` collects the reply later. A Ctrl-C that lands
as a receive returns loses no message: what that receive had taken comes first from
the next one; one that lands as any other call returns leaks none of the buffers the
library handed out. A ``Pool`` may be used from several threads at once.
"""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import ctypes
import contextlib
import gc
import itertools
import json
import math
import numbers
import operator
import os
import re
import stat
import struct
import sys
import threading
import time
from ctypes import byref, c_int, c_size_t, c_uint64, sizeof, string_at
from typing import (
    TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, SupportsIndex,
    Tuple, TypeVar, Union,
)

from itertools import repeat as _repeat
from operator import add as _add, itemgetter as _itemgetter

from . import _ffi
from ._ffi import lib

__all__ = [
    "Pool",
    "PendingRequest",
    "Message",
    "WirepoolError",
    "InvalidArgumentError",
    "ConfigError",
    "TimeoutError",
    "ClosedError",
    "ConnectionLostError",
    "RemoteError",
    "CodecError",
    "TransportError",
    "IoError",
    "TlsError",
    "ProtocolError",
    "InternalError",
    "PanicError",
    "library_version",
    "library_path",
]

__version__ = "0.1.0"

# What each public parameter accepts, as type hints (the checks themselves are in
# _config_json, _check_timeout, _body and _integer).
ConfigLike = Union[Mapping[str, Any], str, bytes, bytearray, "os.PathLike[str]"]
"""A config: a mapping, JSON text (str, or UTF-8 bytes), or a path to a .json/.toml file."""
if sys.version_info >= (3, 12):
    from collections.abc import Buffer as _Buffer

    RequestBody = Union[str, _Buffer]
else:  # no name for "any object with the buffer protocol" before 3.12
    RequestBody = Union[str, bytes, bytearray, memoryview]
"""A request body: str (sent as UTF-8), bytes, or any bytes-like object."""
Seconds = float
"""A timeout in seconds: an int or a float (at run time any real number, such as numpy's
floats or a Fraction; not a bool). None, where allowed, means no limit. Spelled float,
as PEP 484 has it, because type checkers cannot do arithmetic on ``numbers.Real``."""

# Longest single wait inside the library: longer waits are loops of these, so that
# KeyboardInterrupt and close() from another thread are noticed quickly.
_WAIT_SLICE_S = 0.25
# The same for a request's reply (request() and PendingRequest.result()): a Ctrl-C
# withdraws the request within this long, before the venue may be sent it.
_REQUEST_WAIT_SLICE_S = 0.1

# Batches kept for reuse per pool, by capacity (recv uses 1, recv_many its `max`).
_MAX_CACHED_CAPACITIES = 8
# Decoded channel names kept per pool; cleared when a feed has more distinct channels.
_MAX_CACHED_CHANNELS = 65536


# --- errors ------------------------------------------------------------------------------


class WirepoolError(Exception):
    """An error reported by wirepool. ``code`` is the C ABI result code."""

    code: Optional[int]

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def code_name(self) -> Optional[str]:
        """The C name of ``code`` (e.g. ``"WIREPOOL_ERR_CONFIG"``)."""
        return None if self.code is None else _ffi.RESULT_NAMES.get(self.code)


class InvalidArgumentError(WirepoolError, ValueError):
    """An argument was rejected (NULL, not UTF-8, or out of range)."""


class ConfigError(WirepoolError):
    """The configuration is invalid; the message names the key path."""


class TimeoutError(WirepoolError, builtins.TimeoutError):
    """A request or wait ran out of time."""


class ClosedError(WirepoolError):
    """The pool is closed."""


class ConnectionLostError(WirepoolError):
    """A non-idempotent request's connection died before the reply: the venue may or may
    not have received it. It is never re-sent silently."""


class RemoteError(WirepoolError):
    """The venue answered the request with an error; ``payload`` holds its error payload."""

    payload: bytes

    def __init__(self, message: str, code: Optional[int] = None, payload: bytes = b"") -> None:
        super().__init__(message, code)
        self.payload = payload


class CodecError(WirepoolError):
    """The codec failed to load or rejected the input."""


class TransportError(WirepoolError):
    """The network failed: base of IoError, TlsError and ProtocolError."""


class IoError(TransportError):
    """An I/O error."""


class TlsError(TransportError):
    """A TLS error."""


class ProtocolError(TransportError):
    """A WebSocket protocol error."""


class InternalError(WirepoolError):
    """A failure inside wirepool."""


class PanicError(InternalError):
    """A bug inside wirepool was caught at the C boundary."""


_ERROR_CLASSES = {
    _ffi.WIREPOOL_ERR_NULL_ARGUMENT: InvalidArgumentError,
    _ffi.WIREPOOL_ERR_INVALID_UTF8: InvalidArgumentError,
    _ffi.WIREPOOL_ERR_INVALID_ARGUMENT: InvalidArgumentError,
    _ffi.WIREPOOL_ERR_CONFIG: ConfigError,
    _ffi.WIREPOOL_ERR_TIMEOUT: TimeoutError,
    _ffi.WIREPOOL_ERR_CLOSED: ClosedError,
    _ffi.WIREPOOL_ERR_CONNECTION_LOST: ConnectionLostError,
    _ffi.WIREPOOL_ERR_REMOTE: RemoteError,
    _ffi.WIREPOOL_ERR_CODEC: CodecError,
    _ffi.WIREPOOL_ERR_IO: IoError,
    _ffi.WIREPOOL_ERR_TLS: TlsError,
    _ffi.WIREPOOL_ERR_PROTOCOL: ProtocolError,
    _ffi.WIREPOOL_ERR_PANIC: PanicError,
    _ffi.WIREPOOL_ERR_INTERNAL: InternalError,
}


def _error(code: int) -> WirepoolError:
    """The exception for a failed call; must run right after it, on the same thread
    (the library's detailed message is per thread and lasts until the next call)."""
    message = _ffi.last_error() or _ffi.result_text(code)
    return _ERROR_CLASSES.get(code, WirepoolError)(message, code)


def library_version() -> str:
    """The version of the loaded ``libwirepool``."""
    version: bytes = lib.wirepool_version()
    return version.decode()


def library_path() -> Optional[str]:
    """The path ``libwirepool`` was loaded from."""
    return _ffi.library_path()


# --- messages ----------------------------------------------------------------------------


try:
    # The C descriptor namedtuple's fields use: a third faster to read than a property.
    # Private to collections, so typeshed does not declare it (the checker sees Any).
    from collections import _tuplegetter as _field  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover (CPython has it since 3.8)

    def _field(index: int, doc: str) -> Any:
        return property(_itemgetter(index), doc=doc)


# A checker sees a Message as the 5-tuple it is; at run time its base stays plain tuple
# (typing.Tuple[...] as a base would add typing.Generic to the class's MRO).
if TYPE_CHECKING:
    _MessageTuple = Tuple[str, bytes, str, int, int]
else:
    _MessageTuple = tuple


class Message(_MessageTuple):
    """One received subscription message: an immutable named tuple of

    ``channel`` (str), ``payload`` (bytes: for the default codec the JSON text of the
    frame's payload), ``kind`` (``"data"``), ``connection_id`` (the connection that read
    it) and ``received_ns`` (wall-clock nanoseconds when the frame was read).

    A tuple so that a whole batch is built by C loops (``map`` over columns) instead of
    a Python loop per message; messages compare by value.
    """

    __slots__ = ()

    _fields = ("channel", "payload", "kind", "connection_id", "received_ns")

    def __new__(
        cls,
        channel: str,
        payload: bytes,
        kind: str = "data",
        connection_id: int = 0,
        received_ns: int = 0,
    ) -> "Message":
        return _tuple_new(cls, (channel, payload, kind, connection_id, received_ns))

    channel: str = _field(0, "The channel it arrived on.")
    payload: bytes = _field(1, "The payload bytes.")
    kind: str = _field(2, 'What it is ("data").')
    connection_id: int = _field(3, "The connection that read it.")
    received_ns: int = _field(4, "Wall-clock ns when read.")

    def __getnewargs__(self) -> Tuple[Union[str, bytes, int], ...]:
        return tuple(self)

    def __repr__(self) -> str:
        payload = self.payload
        shown = repr(payload[:80]) + ("..." if len(payload) > 80 else "")
        return (
            f"Message(channel={self.channel!r}, payload={shown}, kind={self.kind!r}, "
            f"connection_id={self.connection_id}, received_ns={self.received_ns})"
        )


_tuple_new = tuple.__new__


class _Formats(Dict[int, str]):
    """`struct` format codes for payloads by length (``"90s"``), made once per length."""

    def __missing__(self, length: int) -> str:
        if len(self) >= _MAX_CACHED_FORMATS:
            self.clear()
        code = self[length] = f"{length}s"
        return code


_MAX_CACHED_FORMATS = 65536
_PAYLOAD_FORMATS = _Formats()

_KIND_NAMES = {_ffi.WIREPOOL_MESSAGE_DATA: "data"}


def _kind_name(kind: int) -> str:
    return _KIND_NAMES.get(kind) or f"kind_{kind}"


# The fields of struct wirepool_message after its two pointers, read straight from the
# array's bytes: channel_len, payload_len, channel_offset, payload_offset (size_t),
# connection_id, received_ns (uint64_t), kind (uint32_t); `reserved` is skipped.
_MESSAGE_SIZE = sizeof(_ffi.wirepool_message)
_MESSAGE_LAYOUT = struct.Struct(f"@{2 * sizeof(ctypes.c_void_p)}x4N2QI4x")
if _MESSAGE_LAYOUT.size != _MESSAGE_SIZE:  # pragma: no cover - exotic ABIs only
    raise ImportError(
        f"wirepool: struct wirepool_message is {_MESSAGE_SIZE} bytes but the unpack layout "
        f"is {_MESSAGE_LAYOUT.size}; this platform's ABI is not supported"
    )
# The struct seen as 64-bit words, for reading one field of every message at once
# (a strided slice): channel_len, payload_len, channel_offset, payload_offset,
# connection_id, received_ns, then kind and reserved sharing one word.
_WORDS = _MESSAGE_SIZE // 8
if _MESSAGE_SIZE % 8 or sizeof(ctypes.c_void_p) != 8 or sys.byteorder != "little":  # pragma: no cover
    raise ImportError("wirepool: the Python binding needs a 64-bit little-endian platform")

# A batch is copied out as two bytes objects (the message structs and the data: about
# 700 KB for 4096 100-byte messages) that live only until it is decoded. glibc's trim
# threshold (twice the largest mmapped block freed so far) stays just under what
# freeing one batch returns, so it trims its heap after every call and the next batch
# faults all its pages in again (measured: 250 000 page faults in a 3 s run, 2.3M
# instead of 2.65M msg/s). Freeing one 4 MB block, before the first batch is copied,
# raises its thresholds to 4 and 8 MB (glibc's own adaptive rule, capped at 32 MB): up
# to 8 MB of freed heap per arena then stays for reuse. Other allocators ignore it;
# GLIBC_TUNABLES=glibc.malloc.trim_threshold=N (any fixed threshold) turns glibc's
# adaptation, and so this, off.
_heap_primed = False


def _prime_heap() -> None:
    global _heap_primed
    if not _heap_primed:
        _heap_primed = True
        bytes(4 << 20)


class _Batch:
    """A ``wirepool_batch`` plus the out-parameter cells its polls reuse."""

    __slots__ = ("handle", "capacity", "count", "count_ref", "data_len", "data_len_ref")

    def __init__(self, capacity: int) -> None:
        handle = _ffi.batch_p()
        code = lib.wirepool_batch_new(capacity, byref(handle))
        if code:
            raise _error(code)
        self.handle: Optional[ctypes._Pointer[_ffi.wirepool_batch]] = handle
        self.capacity = capacity
        self.count = c_size_t()
        self.count_ref = byref(self.count)
        self.data_len = c_size_t()
        self.data_len_ref = byref(self.data_len)

    def free(self) -> None:
        handle, self.handle = self.handle, None
        if handle:
            lib.wirepool_batch_free(handle)


# --- configuration -----------------------------------------------------------------------


# The largest config file read, as the library's MAX_CONFIG_FILE_BYTES: a path naming
# /dev/zero or a huge file is refused instead of filling memory.
_MAX_CONFIG_FILE_BYTES = 16 << 20


def _read_capped(path: str) -> bytes:
    """The file's bytes, read no further than one byte past the limit."""
    with open(path, "rb") as file:
        data = file.read(_MAX_CONFIG_FILE_BYTES + 1)
        seen = len(data)
        if seen > _MAX_CONFIG_FILE_BYTES:
            status = os.fstat(file.fileno())
            if stat.S_ISREG(status.st_mode):
                seen = max(seen, status.st_size)
            raise ConfigError(
                f"config: {path}: too large for a config file: at least {seen} bytes, "
                f"the limit is 16 MiB ({_MAX_CONFIG_FILE_BYTES} bytes)"
            )
    return data


def _read_config_file(path: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".toml"):
        # A version test, not try/except ImportError: type checkers follow it.
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib  # tomllib's original, a dependency before 3.11
            except ImportError as err:
                raise ConfigError(
                    f"config: {path}: reading TOML needs Python 3.11+ or the tomli package"
                ) from err
        try:
            document = tomllib.loads(_decode_config(_read_capped(path), path))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config: {path}: invalid TOML: {err}") from err
        return _dump_config(document, path)
    if lowered.endswith(".json"):
        return _decode_config(_read_capped(path), path)
    raise ConfigError(f"config: {path}: unknown file type (expected a .json or .toml file)")


def _decode_config(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config: {path}: not UTF-8 text: {err}") from err


def _dump_config(document: Any, origin: str) -> str:
    try:
        # NaN and infinities are not JSON: refused here, with Python's reason, rather
        # than passed on as text the library can only call invalid JSON.
        return json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config: {origin}: not representable as JSON: {err}") from err


def _config_json(config: ConfigLike) -> str:
    """The JSON text the C ABI takes, from a mapping, a JSON string or a file path."""
    if isinstance(config, Mapping):
        return _dump_config(dict(config), "dict")
    if isinstance(config, (bytes, bytearray)):
        try:
            return bytes(config).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config: not UTF-8: {err}") from err
    if isinstance(config, os.PathLike):
        return _read_config_file(os.fspath(config))
    if isinstance(config, str):
        text = config.lstrip()
        if text.startswith(("{", "[")):
            return config
        if os.path.isdir(config):
            raise ConfigError(f"config: {config}: is a directory, not a .json or .toml file")
        if config.lower().endswith((".json", ".toml")) or os.path.isfile(config):
            return _read_config_file(config)
        # Neither JSON-looking nor a file.
        raise ConfigError(
            f"config: {config!r} is neither JSON text (it does not start with {{ or [) nor "
            "an existing .json or .toml file"
        )
    raise TypeError(
        f"config must be a dict, a JSON string or a path to a .json/.toml file, "
        f"not {type(config).__name__}"
    )


def _is_bool(value: Any) -> bool:
    """A Python bool, or numpy's (flags often come out of pandas and numpy)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def _integer(value: Any, name: str) -> int:
    """``value`` as an int (anything with ``__index__``; not a float or a str), or a
    TypeError that names the parameter."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _connection_id(value: Any) -> int:
    """A connection id (an int from 0 to 2**64 - 1), or the TypeError / ValueError that
    says what is wrong with it."""
    connection_id = _integer(value, "connection_id")
    if not 0 <= connection_id < 1 << 64:
        raise ValueError(f"connection_id must be from 0 to 2**64 - 1, not {connection_id}")
    return connection_id


# --- timeouts ----------------------------------------------------------------------------


def _check_timeout(timeout: Optional[Seconds]) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        # A str from a config file would fail the comparison below with a message that
        # names no parameter; a bool would be a silent one-second (or no) wait.
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be None or a non-negative number of seconds, not {timeout!r}")


_MAX_MS = 0xFFFFFFFF  # the C ABI's timeouts are uint32_t milliseconds


def _slice_ms(slice_ms: int, deadline: Optional[float]) -> int:
    """The next wait of a call that waits in slices of ``slice_ms`` (so a Ctrl-C or a
    close is seen between them): the slice, or what is left until ``deadline`` (a
    ``time.monotonic()`` value; None: none) if that is less."""
    if deadline is None:
        return slice_ms
    return min(slice_ms, max(0, _ms(deadline - time.monotonic())))


def _ms(seconds: float) -> int:
    # Compared before converting: int(math.ceil(inf)) raises OverflowError, and
    # math.inf is a natural way to say "no limit".
    milliseconds = seconds * 1000.0
    if milliseconds >= _MAX_MS:
        return _MAX_MS
    return int(math.ceil(milliseconds))


def _timeout_error(code: int, timeout: float) -> WirepoolError:
    """The TimeoutError of a wait made of slices: the library's message names the last
    slice's length, so it is restated with the caller's ``timeout``."""
    error = _error(code)
    message = re.sub(r"timed out after \d+ ms", f"timed out after {_ms(timeout)} ms", str(error), count=1)
    return type(error)(message, code)


# --- request bodies ----------------------------------------------------------------------


def _utf8(text: str, name: str) -> bytes:
    """``text`` as UTF-8, or the InvalidArgumentError the library gives a string that is
    not UTF-8, naming the argument (a lone surrogate, as surrogateescape leaves of
    undecodable bytes, has no UTF-8 form)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgumentError(
            f"{name} is not valid UTF-8: {err.reason} at character {err.start}",
            _ffi.WIREPOOL_ERR_INVALID_UTF8,
        ) from None


def _body(payload: Any, name: str) -> bytes:
    """A request body as bytes: bytes, any bytes-like object, or str (as UTF-8).

    ``bytes(payload)`` is not used: it turns an int n into n NUL bytes and a list of
    ints into their bytes, silently sending a body the caller never meant."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return _utf8(payload, name)
    try:
        view = memoryview(payload)
    except TypeError:
        raise TypeError(
            f"{name} must be bytes, a bytes-like object or str, not {type(payload).__name__}"
        ) from None
    with view:
        return view.tobytes()


def _request_timeout_ms(timeout: Optional[Seconds]) -> int:
    """A request's ``timeout`` for the C ABI: 0 (the pool's ``request_timeout_ms``) for
    None, else at least 1 ms."""
    if timeout is None:
        return 0
    _check_timeout(timeout)
    return max(1, _ms(timeout))


def _request_flags(idempotent: Any) -> int:
    if not _is_bool(idempotent):
        # A truthy "no" or 0.0 must not let an order be sent twice.
        raise TypeError(f"idempotent must be a bool, not {type(idempotent).__name__}")
    return _ffi.WIREPOOL_REQUEST_IDEMPOTENT if bool(idempotent) else 0


# --- submitted requests ------------------------------------------------------------------

_PENDING, _FINISHED, _CANCELLED = "pending", "finished", "cancelled"


class PendingRequest:
    """A request sent with ``Pool.submit``, whose reply is collected later, from this
    thread or another: modelled on ``concurrent.futures.Future``.

    ``result(timeout)`` returns the reply, or raises what ``Pool.request`` raises for
    it: RemoteError (``.payload``), ConnectionLostError, ClosedError (the pool was
    closed first), or wirepool.TimeoutError once the request's own timeout (given to
    ``submit``) has passed, which runs from the submit however the waits are sliced. A
    ``result`` wait that ends before the request finishes raises
    ``concurrent.futures.TimeoutError`` instead (the built-in TimeoutError since Python
    3.11) and leaves the request pending: to tell the two apart, catch
    ``wirepool.TimeoutError`` first, or check ``done()``. Once finished, ``result()``
    returns (or raises) the same at once, every time.

    ``cancel()`` withdraws a request that has not finished, as a timeout does: one none
    of which was written yet (the rate limit held it, or no connection was ready) is
    never written afterwards; one already written may still reach the venue, and its
    reply is dropped. Leaving a ``with`` block releases the request without waiting:
    one whose outcome was not taken by then (with ``result()`` or ``done()``) is
    cancelled, as is one nobody holds any more when it is garbage collected. A
    PendingRequest outlives its pool:
    after ``Pool.close()``, ``result()`` gives the outcome it already had or raises
    ClosedError. It may be used from several threads (their calls take turns, each
    waiting inside the library at most 0.1 s at a time).

        with pool.submit(b'{"op":"new_order"}', timeout=2.0) as order:
            ...                                   # other work meanwhile
            while not order.done():
                do_other_things()
            ack = order.result()
    """

    def __init__(self) -> None:
        # Made by Pool.submit, which has the library fill the handle in place: a Ctrl-C
        # right after the submit cannot leave a request nobody can withdraw.
        self._handle: Optional[ctypes._Pointer[_ffi.wirepool_pending_request]] = (
            _ffi.pending_request_p()
        )
        self._lock = threading.Lock()
        self._state = _PENDING
        self._reply = b""
        self._error: Optional[WirepoolError] = None
        self._id = 0

    @property
    def request_id(self) -> int:
        """The request's id, unique within its pool (the ``json`` codec sends it as the
        frame's ``messageId``, ``r<id>``, which finds it in the venue's logs)."""
        return self._id

    def __repr__(self) -> str:
        return f"<wirepool.PendingRequest {self._id} {self._state}>"

    def _free_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.wirepool_pending_request_free(handle)

    def _wait_once(self, wait_ms: int) -> bool:
        """One wait inside the library, with ``_lock`` held; True once the outcome is
        here (kept, and the library's handle freed)."""
        if self._state is not _PENDING:
            return True
        reply = _ffi.bytes_p()
        try:
            code = lib.wirepool_pending_request_wait(self._handle, wait_ms, byref(reply))
            if code == _ffi.WIREPOOL_PENDING:
                return False
            if code == _ffi.WIREPOOL_OK:
                self._reply = _ffi.bytes_value(reply)
            else:
                error = _error(code)
                if code == _ffi.WIREPOOL_ERR_REMOTE and reply:
                    assert isinstance(error, RemoteError)
                    error.payload = _ffi.bytes_value(reply)
                self._error = error
            self._state = _FINISHED
        finally:
            # On every path (a Ctrl-C that lands as the call returns skips the lines
            # above; the library keeps the outcome and gives it again next time).
            lib.wirepool_bytes_free(reply)
        self._free_handle()
        return True

    def result(self, timeout: Optional[Seconds] = None) -> bytes:
        """The reply: waits up to ``timeout`` seconds (None: until the request finishes,
        by its own timeout at the latest). Raises the request's exception when it
        failed, ``concurrent.futures.TimeoutError`` when the wait ended first (the
        request stays pending), ``concurrent.futures.CancelledError`` after
        ``cancel()``."""
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        slice_ms = _ms(_REQUEST_WAIT_SLICE_S)
        while True:
            wait_ms = _slice_ms(slice_ms, deadline)
            with self._lock:
                if self._state is _CANCELLED:
                    raise concurrent.futures.CancelledError(f"request {self._id} was cancelled")
                if self._wait_once(wait_ms):
                    break
            if deadline is not None and time.monotonic() >= deadline:
                raise concurrent.futures.TimeoutError(
                    f"request {self._id} has not finished within the {timeout} s wait; it is "
                    "still pending (wait again, or cancel it)"
                )
        if self._error is not None:
            raise self._error
        return self._reply

    def done(self) -> bool:
        """True once the request has finished (answered, failed, timed out, its pool
        closed) or was cancelled; its outcome stays for ``result()``. Does not wait."""
        with self._lock:
            return self._state is not _PENDING or self._wait_once(0)

    def cancel(self) -> bool:
        """Withdraws the request if it has not finished: True then (and when it was
        cancelled before); False when it had already finished (its outcome stays for
        ``result()``)."""
        with self._lock:
            if self._state is _CANCELLED:
                return True
            if self._wait_once(0):
                return False
            self._state = _CANCELLED
            self._free_handle()
            return True

    def cancelled(self) -> bool:
        """True once ``cancel()`` withdrew the request."""
        return self._state is _CANCELLED

    def __enter__(self) -> "PendingRequest":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # No wait here, not even a look: on the way out of a KeyboardInterrupt the
        # request is withdrawn at once.
        with self._lock:
            if self._state is _PENDING:
                self._state = _CANCELLED
            self._free_handle()

    def __del__(self) -> None:
        try:
            self._free_handle()
        except Exception:  # noqa: BLE001 - nothing can be raised from a finaliser
            pass


# --- the pool ----------------------------------------------------------------------------


_HandleT = TypeVar("_HandleT", bound="_Handle")


class _Handle:
    """Owner of one C handle: ``close()`` is idempotent, the object is a context manager,
    ``__del__`` closes what was not closed, and any use after close raises ClosedError
    (except, with ``_enter(after_close=True)``, reading what the closed handle still
    holds).

    Calls on the handle run between ``_enter`` and ``_exit``. ``close()`` releases the
    library's resources at once (``_close_handle``, which wakes blocked calls). The
    handle itself is freed (``_free_handle``) exactly once: when it is closed and spent
    (nothing more to read from it: ``_close_handle`` says so, or a call after close
    found it so and called ``_spend``), by whichever of close() or the last call still
    running finishes last, so freeing never races with a call; or by ``__del__``.
    """

    _closed_message = "object is closed"

    def __init__(self) -> None:
        self._handle: Any = None
        # Guards _handle, _inflight, _closing and _spent.
        self._lock = threading.Lock()
        self._inflight = 0
        self._closing = False
        self._spent = False

    def _enter(self, after_close: bool = False) -> Any:
        """The handle, counted in flight until ``_exit``. ClosedError after close(),
        unless ``after_close`` and the closed handle is not spent yet."""
        with self._lock:
            if self._closing and not (after_close and not self._spent and self._handle is not None):
                raise ClosedError(self._closed_message, _ffi.WIREPOOL_ERR_CLOSED)
            self._inflight += 1
            return self._handle

    def _exit(self) -> None:
        with self._lock:
            self._inflight -= 1
            if not (self._closing and self._spent and self._inflight == 0 and self._handle is not None):
                return
            handle, self._handle = self._handle, None
        self._free_handle(handle)

    def _spend(self) -> None:
        """Called in flight: the closed handle has nothing more to give, so it is freed
        as the last call still running on it leaves."""
        with self._lock:
            self._spent = True

    def _close_handle(self, handle: Any) -> bool:
        """Closes the handle; True when it still holds something to read after close."""
        raise NotImplementedError

    def _free_handle(self, handle: Any) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closing

    def close(self) -> None:
        """Releases the object; later calls raise ClosedError. Safe to call repeatedly."""
        with self._lock:
            if self._closing or self._handle is None:
                self._closing = True
                return
            self._closing = True
            self._inflight += 1
            handle = self._handle
        keep = False
        try:
            keep = self._close_handle(handle)
        finally:
            # A close that failed (or was interrupted) frees the handle as it leaves.
            if not keep:
                self._spend()
            self._exit()

    def __enter__(self: _HandleT) -> _HandleT:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closing", True):
                self.close()
            # Closed but not spent (what was left to read was never read): nothing can
            # call on it any more, so it is freed here.
            with self._lock:
                handle, self._handle = self._handle, None
            if handle is not None:
                self._free_handle(handle)
        except Exception:  # noqa: BLE001 - nothing can be raised from a finaliser
            pass


class Pool(_Handle):
    """A pool of upstream connections.

    ``config`` is a dict (any mapping), JSON text (a str, or UTF-8 bytes or bytearray),
    or a path (str or os.PathLike) to a ``.json`` or ``.toml`` file, with the schema of the configuration reference
    (``docs/configuration.md``). Connections open in the background; ``wait_ready()``
    waits for the initial ones. Raises ConfigError naming the key path of a bad setting.
    After ``close()`` every call raises ClosedError, except the receives and
    ``events()``. ``recv``, ``recv_many`` and ``messages`` go on returning the messages
    still queued, then what the connections read in the close's grace, in order and in
    batches as usual, and raise ClosedError once the queue is drained (``messages``
    stops then), as ``wirepool_pool_poll`` does in C between close and free; a pool
    closed with nothing queued raises at once. ``events()`` first returns the events left
    unread, the shutdown's among them. ``close()`` does not wait for work queued before
    it: subscriptions the pool has not taken in yet are dropped, and calls still
    waiting on the pool (``close_connection``, ``reconfigure``, ...) raise ClosedError;
    it waits at most a connection's 500 ms close grace for a venue that does not answer
    the close. A receive waiting in another thread when ``close()`` runs returns what
    that grace reads, then raises ClosedError.
    """

    _closed_message = "pool is closed"

    def __init__(self, config: ConfigLike) -> None:
        super().__init__()
        self._batches: Dict[int, List[_Batch]] = {}
        self._batches_lock = threading.Lock()
        self._channel_names: Dict[bytes, str] = {}
        self._fd: Optional[int] = None
        # Receives interrupted after their poll took messages (a Ctrl-C): their
        # batches, then the messages decoded from them, delivered before anything else.
        self._interrupted: List[_Batch] = []
        self._undelivered: Deque[Message] = collections.deque()
        self._redeliver_lock = threading.Lock()
        # The events still queued when close() returned (the shutdown's among them),
        # for events() after close; the C handle that held them is freed by then.
        self._events_at_close: List[Dict[str, Any]] = []
        self._events_at_close_lock = threading.Lock()
        self._events_kept = threading.Event()  # set once close() has taken them
        text = _config_json(config)
        if "\0" in text:
            raise ConfigError("config: the JSON text contains a NUL character")
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate in a str
            raise ConfigError(f"config: not encodable as UTF-8: {err}") from err
        handle = _ffi.pool_p()
        code = lib.wirepool_pool_new(encoded, byref(handle))
        if code:
            raise _error(code)
        self._handle = handle

    def __repr__(self) -> str:
        return f"<wirepool.Pool {'closed' if self._closing else 'open'} at {id(self):#x}>"

    # -- lifetime --

    def close(self) -> None:
        """Closes the pool: its connections close (each within its 500 ms close grace)
        and every thread is joined; later calls raise ClosedError, except the receives
        and ``events()`` (see the class). Safe to call repeatedly, from any thread.

        The library's pool is freed at once when its queue is empty. Messages still
        queued stay in it, not copied into Python objects unless received: it is freed
        when a receive finds the queue drained, or when the Pool is collected (``del
        pool``), whichever comes first."""
        super().close()

    def _close_handle(self, handle: Any) -> bool:
        try:
            code = lib.wirepool_pool_close(handle)
            if code:
                raise _error(code)
            self._keep_events_left_at_close(handle)
        finally:
            self._events_kept.set()
        return self._messages_left_at_close(handle)

    @staticmethod
    def _messages_left_at_close(handle: Any) -> bool:
        """Whether the closed pool's queue still holds messages (it takes no more once
        ``wirepool_pool_close`` has returned). Then the handle is kept, and the messages
        stay in the library until a receive asks for them; else it is freed at once."""
        out = _ffi.bytes_p()
        try:
            code = lib.wirepool_pool_stats_json(handle, byref(out))
            if code:
                return True  # unknown: kept; the first receive finds out
            depth: int = json.loads(_ffi.bytes_value(out)).get("queue_depth", 1)
            return depth > 0
        finally:
            lib.wirepool_bytes_free(out)  # on every path, as in request()

    def _free_handle(self, handle: Any) -> None:
        lib.wirepool_pool_free(handle)
        with self._batches_lock:
            batches, self._batches = self._batches, {}
        try:
            # Messages a receive interrupted by a Ctrl-C had taken (they are in its
            # batch, which does not need the pool): decoded now, for the next receive.
            self._redeliver(0)
        finally:
            interrupted, self._interrupted = self._interrupted, []
            for batch in interrupted:
                batch.free()
            for stack in batches.values():
                for batch in stack:
                    batch.free()

    # -- batches --

    def _take_batch(self, capacity: int) -> _Batch:
        with self._batches_lock:
            stack = self._batches.get(capacity)
            if stack:
                return stack.pop()
        return _Batch(capacity)

    def _give_batch(self, batch: _Batch) -> None:
        with self._batches_lock:
            stack = self._batches.get(batch.capacity)
            if stack is None and len(self._batches) < _MAX_CACHED_CAPACITIES:
                stack = self._batches[batch.capacity] = []
            # Kept while the handle lives (after close too, while its queue drains):
            # _free_handle frees what is kept then.
            if stack is not None and self._handle is not None:
                stack.append(batch)
                return
        batch.free()

    def _poll(self, handle: Any, batch: _Batch, timeout: Optional[Seconds]) -> int:
        """Polls into ``batch`` until a message arrives or ``timeout`` passes; the count."""
        poll = lib.wirepool_pool_poll
        if timeout is not None and timeout <= _WAIT_SLICE_S:
            code = poll(handle, batch.handle, _ms(timeout), batch.count_ref)
            if code:
                raise self._poll_error(code)
            return batch.count.value
        deadline = None if timeout is None else time.monotonic() + timeout
        slice_ms = _ms(_WAIT_SLICE_S)
        while True:
            wait_ms = _slice_ms(slice_ms, deadline)
            code = poll(handle, batch.handle, wait_ms, batch.count_ref)
            if code:
                raise self._poll_error(code)
            count = batch.count.value
            if count or (deadline is not None and time.monotonic() >= deadline):
                return count
            # A close under way is not a reason to stop: the poll gives what the
            # connections read in its grace, then WIREPOOL_ERR_CLOSED once it ended
            # and the queue is drained. A close that failed ends the wait (its queue
            # may never end).
            if self._spent:
                raise ClosedError(self._closed_message, _ffi.WIREPOOL_ERR_CLOSED)

    def _poll_error(self, code: int) -> WirepoolError:
        error = _error(code)
        if code == _ffi.WIREPOOL_ERR_CLOSED:
            self._spend()  # closed and drained: freed as the last call leaves
        return error

    def _receive(self, capacity: int, timeout: Optional[Seconds]) -> List[Message]:
        try:
            handle = self._enter(after_close=True)
        except ClosedError:
            # Drained; messages taken by a receive a Ctrl-C interrupted may be left.
            redelivered = self._redeliver(capacity)
            if redelivered:
                return redelivered
            raise
        try:
            if self._interrupted or self._undelivered:
                redelivered = self._redeliver(capacity)
                if redelivered:
                    return redelivered
            batch = self._take_batch(capacity)
            # Written by the library only when a poll succeeds: nonzero below means
            # this call's poll took messages off the queue.
            batch.count.value = 0
            messages = None
            try:
                count = self._poll(handle, batch, timeout)
                if not count:
                    return []
                raw, data = self._copy_out(batch, count)
                messages = self._decode(raw, data)
                return messages
            finally:
                if messages is None and batch.count.value:
                    # An exception (a Ctrl-C, handled at the first line after the
                    # library call) after the poll took messages: they are only in
                    # this batch now, which is kept for the next receive.
                    self._interrupted.append(batch)
                else:
                    self._give_batch(batch)
        finally:
            self._exit()

    @staticmethod
    def _copy_out(batch: _Batch, count: int) -> "tuple[bytes, bytes]":
        """One copy of the struct array and one of the data buffer of a polled batch."""
        _prime_heap()
        raw = string_at(lib.wirepool_batch_messages(batch.handle), count * _MESSAGE_SIZE)
        address = lib.wirepool_batch_data(batch.handle, batch.data_len_ref)
        size = batch.data_len.value
        data = string_at(address, size) if address and size else b""
        return raw, data

    def _redeliver(self, capacity: int) -> List[Message]:
        """Up to ``capacity`` messages that interrupted receives took, oldest first
        (they were taken before anything still queued)."""
        with self._redeliver_lock:
            while self._interrupted:
                batch = self._interrupted[0]
                if batch.count.value:
                    self._undelivered.extend(self._decode(*self._copy_out(batch, batch.count.value)))
                    # Marked as delivered at once: interrupted again from here on, the
                    # batch is not decoded twice.
                    batch.count.value = 0
                del self._interrupted[0]
                self._give_batch(batch)
            undelivered = self._undelivered
            messages = list(itertools.islice(undelivered, capacity))
            for _ in range(len(messages)):
                undelivered.popleft()
            return messages

    def _decode(self, raw: bytes, data: bytes) -> List[Message]:
        # Column by column, each column by a C loop: no Python code runs per message.
        words = memoryview(raw).cast("Q")
        count = len(words) // _WORDS
        # The payloads lie back to back from the start of `data` (docs/c-api.md): one
        # struct unpack cuts them all out, by a format of their lengths. A library
        # from before that layout is told by the first and last offsets: its payloads
        # are sliced out one by one.
        payload_lengths = words[3::_WORDS].tolist()
        layout = struct.Struct("".join(map(_PAYLOAD_FORMATS.__getitem__, payload_lengths)))
        last = (count - 1) * _WORDS
        if words[5] == 0 and words[last + 5] + words[last + 3] == layout.size:
            payloads: Sequence[bytes] = layout.unpack_from(data)
        else:
            offsets = words[5::_WORDS].tolist()
            ends = map(_add, offsets, payload_lengths)
            payloads = list(map(data.__getitem__, map(slice, offsets, ends)))
        # A run of messages on one channel shares one copy of its name in `data`, so
        # the distinct names are few, and each copy's offset alone tells it apart; but
        # an empty name takes no bytes, so its offset may be another name's, and then
        # the (offset, length) pairs are the keys.
        channel_offsets = words[4::_WORDS].tolist()
        channel_lengths = words[2::_WORDS].tolist()
        if 0 in channel_lengths:
            keys: List[Any] = list(zip(channel_offsets, channel_lengths))
            spans = {key: key for key in set(keys)}
        else:
            keys = channel_offsets
            by_offset = dict(zip(keys, channel_lengths))
            spans = {offset: (offset, length) for offset, length in by_offset.items()}
        names = {}
        for key, (offset, length) in spans.items():
            raw_name = data[offset : offset + length]
            name = self._channel_names.get(raw_name)
            names[key] = name if name is not None else self._channel_name(raw_name)
        channels = map(names.__getitem__, keys)
        kind_words = words[8::_WORDS].tolist()
        if any(kind_words):
            kinds: Iterable[str] = [_kind_name(word & 0xFFFFFFFF) for word in kind_words]
        else:
            kinds = _repeat("data", count)
        rows = zip(channels, payloads, kinds, words[6::_WORDS].tolist(), words[7::_WORDS].tolist())
        # Messages are tuples of strings, bytes and ints: they cannot form a cycle, but
        # as instances of a class they stay tracked by the cyclic collector, which
        # otherwise runs several times while a batch is built and sweeps each message
        # again in the older generations (measured: 30 % of the whole receive path).
        # Collections wait until the batch is built; the usual consumer loop frees the
        # previous batch before it allocates again, and then most never happen. The
        # same trick as Mercurial's `util.nogc`; a collector the caller disabled stays so.
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            return list(map(_tuple_new, _repeat(Message, count), rows))
        finally:
            if collecting:
                gc.enable()

    def _channel_name(self, key: bytes) -> str:
        names = self._channel_names
        if len(names) >= _MAX_CACHED_CHANNELS:
            names.clear()
        channel = names[key] = key.decode("utf-8", "replace")
        return channel

    # -- the public API --

    def wait_ready(self, timeout: Optional[Seconds] = 10.0) -> None:
        """Waits until the initial connections (``pool.min_connections``) are ready.

        Raises TimeoutError when they are not ready within ``timeout`` seconds (None:
        wait as long as it takes).
        """
        _check_timeout(timeout)
        handle = self._enter()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            slice_ms = _ms(_WAIT_SLICE_S)
            while True:
                wait_ms = _slice_ms(slice_ms, deadline)
                code = lib.wirepool_pool_wait_ready(handle, wait_ms)
                if code == _ffi.WIREPOOL_OK:
                    return
                if code != _ffi.WIREPOOL_ERR_TIMEOUT:
                    raise _error(code)
                if deadline is not None and time.monotonic() >= deadline:
                    assert timeout is not None
                    raise _timeout_error(code, timeout)
                if self._closing:
                    raise ClosedError(self._closed_message, _ffi.WIREPOOL_ERR_CLOSED)
        finally:
            self._exit()

    def subscribe(self, channel: str) -> None:
        """Adds ``channel`` to the desired subscriptions (kept across reconnects; sent
        as soon as a connection is ready). Each connection is sent its subscribes in the
        order they were made, on restores after a reconnect too; a channel subscribed
        again after an unsubscribe goes last."""
        encoded = _channel_arg(channel)
        handle = self._enter()
        try:
            code = lib.wirepool_pool_subscribe(handle, encoded)
            if code:
                raise _error(code)
        finally:
            self._exit()

    def unsubscribe(self, channel: str) -> None:
        """Removes ``channel`` from the desired subscriptions. Messages already queued
        are still delivered."""
        encoded = _channel_arg(channel)
        handle = self._enter()
        try:
            code = lib.wirepool_pool_unsubscribe(handle, encoded)
            if code:
                raise _error(code)
        finally:
            self._exit()

    def recv(self, timeout: Optional[Seconds] = None) -> Optional[Message]:
        """The next message, or None when none arrived within ``timeout`` seconds
        (None: wait until one arrives). After ``close()``: the messages left in the
        queue, then ClosedError."""
        _check_timeout(timeout)
        messages = self._receive(1, timeout)
        return messages[0] if messages else None

    def recv_many(self, max: SupportsIndex, timeout: Optional[Seconds] = None) -> List[Message]:  # noqa: A002
        """Up to ``max`` messages: waits up to ``timeout`` seconds (None: until one
        arrives) for the first, then takes every queued one up to ``max``. ``[]`` on
        timeout. ``max`` is an int (or anything with ``__index__``) of at least 1; more
        than 2**20 (the library's largest batch) takes 2**20 at most. After ``close()``:
        the messages left in the queue, then ClosedError."""
        _check_timeout(timeout)
        max = _integer(max, "max")  # noqa: A001
        if max < 1:
            raise ValueError(f"max must be at least 1, not {max!r}")
        return self._receive(min(max, _ffi.MAX_BATCH_CAPACITY), timeout)

    def messages(self, timeout: Optional[Seconds] = 1.0) -> Iterator[Message]:
        """Yields messages as they arrive; stops when none arrived for ``timeout``
        seconds (None: never) or when the pool is closed and its queue drained (after
        ``close()`` it yields what was left in the queue first; ClosedError at once when
        nothing was).

        Messages are taken from the queue one at a time, so breaking out of the loop
        loses nothing; ``recv_many`` is the faster way to drain a busy feed.
        """
        _check_timeout(timeout)
        if self._closing and not self._receivable_after_close():
            raise ClosedError(self._closed_message, _ffi.WIREPOOL_ERR_CLOSED)
        return self._iterate(timeout)

    def _receivable_after_close(self) -> bool:
        """Whether a closed pool may still have messages for a receive."""
        with self._lock:
            if not self._spent and self._handle is not None:
                return True
        return bool(self._undelivered or self._interrupted)

    def _iterate(self, timeout: Optional[Seconds]) -> Iterator[Message]:
        while True:
            try:
                message = self.recv(timeout)
            except ClosedError:
                return
            if message is None:
                return
            yield message

    def request(
        self, payload: RequestBody, timeout: Optional[Seconds] = 5.0, idempotent: bool = False
    ) -> bytes:
        """Sends a request (for the default codec, a JSON document) and returns the reply.

        ``payload`` is a str (sent as UTF-8), bytes, or any bytes-like object
        (bytearray, memoryview, array.array, a contiguous numpy array, ...); anything
        else is a TypeError. ``idempotent`` is a bool (Python's or numpy's). Waits up to ``timeout`` seconds, including for a ready connection (None: the
        pool's ``request_timeout_ms``). With ``idempotent=True`` the request may be sent
        again on another connection when its connection dies, once (the venue is sent
        it at most twice; a connection that died before writing it, the rate limit
        holding it, does not count); otherwise that raises ConnectionLostError. Raises RemoteError (``.payload``) when the venue answers
        with an error, TimeoutError when no reply came in time. A request none of which
        was written when it timed out (the rate limit held it) is withdrawn and never
        written afterwards, whichever connection held it (also one that had stopped
        taking new requests: closed, drained, recycled); one already written may have
        reached the venue.

        Order: one thread's requests reach the venue in the order it made them (each
        call returns once answered). Requests made while no connection is ready go, in the
        order made, to the first that becomes ready; those moved off a dead connection
        keep their order, ahead of newer waiting ones, after newer ones already sent on
        the connection they move to. Requests from several threads at once may arrive
        in either order.

        This is ``submit`` and ``result()``: the reply is waited for in slices of at
        most 0.1 s, so a Ctrl-C (KeyboardInterrupt, or any exception a signal handler
        raises) ends the call within about that, withdrawing the request as a timeout
        does (one the rate limit still held is never written), and leaks no buffer.
        ``close()`` from another thread ends it with ClosedError.
        """
        with self.submit(payload, timeout=timeout, idempotent=idempotent) as pending:
            return pending.result()

    def submit(
        self, payload: RequestBody, timeout: Optional[Seconds] = None, idempotent: bool = False
    ) -> PendingRequest:
        """Sends a request as ``request`` does, without waiting for its reply: the
        returned PendingRequest collects it later (``result()``, ``done()``,
        ``cancel()``; see there), from this thread or another.

        The arguments are ``request``'s, checked the same way; ``timeout`` is the
        request's own (None: the pool's ``request_timeout_ms``) and runs from now,
        however the waits are sliced. Raises at once, with nothing sent, when the pool
        is closed (ClosedError) or the body is too long (InvalidArgumentError).
        Requests are handed on in the order submitted, as for ``request``.
        """
        payload = _body(payload, "payload")
        timeout_ms = _request_timeout_ms(timeout)
        flags = _request_flags(idempotent)
        pending = PendingRequest()
        assert pending._handle is not None  # a new PendingRequest holds its (empty) handle
        handle = self._enter()
        try:
            code = lib.wirepool_pool_request_submit(
                handle, payload, len(payload), timeout_ms, flags, byref(pending._handle)
            )
            if code:
                raise _error(code)
            pending._id = lib.wirepool_pending_request_id(pending._handle)
        finally:
            self._exit()
        return pending

    def request_batch(
        self,
        payloads: Iterable[RequestBody],
        timeout: Optional[Seconds] = 5.0,
        max_in_flight_per_connection: SupportsIndex = 8,
        progress: Optional[Callable[[int, int], object]] = None,
    ) -> List[Union[bytes, WirepoolError]]:
        """Sends many requests spread over the ready connections (at most
        ``max_in_flight_per_connection`` per connection) and returns, in order, each
        reply or the exception for that request (not raised). Batch requests are
        idempotent. ``progress(done, total)`` is called after each completion; an
        exception it raises stops nothing and is re-raised once the batch is done.

        ``payloads`` is any iterable (a list, a tuple, a generator) of request bodies,
        each what ``request`` accepts; a single str or bytes-like body is a TypeError
        (each character or byte would be a request). ``max_in_flight_per_connection``
        is an int (or anything with ``__index__``) from 1 to 2**32 - 1.

        Order: the requests are submitted in the order given, and those that travel on
        one connection reach the venue in that order (also after waiting for a ready
        connection, or moving off a dead one); spread over several ready connections,
        two may arrive in either order: a sequence whose order matters needs one
        connection (``pool.max_connections`` 1) or one request at a time.

        The batch waits in one library call: a Ctrl-C takes effect when it returns
        (within ``timeout``), and every reply it got is freed, not leaked. With a
        ``progress`` function, one that arrives just as a call to it begins is reported
        by ctypes as "Exception ignored" and lost (Python gives a callback from C no way
        to pass it on)."""
        if isinstance(payloads, (str, bytes, bytearray, memoryview)):
            # Each character or byte would be sent as a request of its own.
            raise TypeError(
                f"payloads must be a sequence of request bodies, not a single {type(payloads).__name__}"
            )
        encoded = [_body(p, f"payloads[{index}]") for index, p in enumerate(payloads)]
        count = len(encoded)
        if count == 0:
            return []
        timeout_ms = _request_timeout_ms(timeout)
        max_in_flight_per_connection = _integer(max_in_flight_per_connection, "max_in_flight_per_connection")
        if not 1 <= max_in_flight_per_connection <= 0xFFFFFFFF:
            # A uint32_t in C: larger values would wrap silently (2**32 to 0, the default).
            raise ValueError(
                f"max_in_flight_per_connection must be between 1 and {0xFFFFFFFF}, "
                f"not {max_in_flight_per_connection!r}"
            )
        buffers = [ctypes.create_string_buffer(p, len(p)) for p in encoded]
        requests = (_ffi.wirepool_request * count)(
            *[_ffi.wirepool_request(ctypes.cast(b, ctypes.c_void_p), len(p)) for b, p in zip(buffers, encoded)]
        )
        replies = (_ffi.bytes_p * count)()
        codes = (_ffi.wirepool_result * count)()
        details = (_ffi.bytes_p * count)()
        try:
            return self._request_batch(requests, count, timeout_ms, max_in_flight_per_connection,
                                       progress, replies, codes, details)
        finally:
            # Every buffer the library handed out, whatever ended the call (a Ctrl-C as
            # it returned, an exception from `progress`): the arrays start all NULL.
            _ffi.free_all(replies)
            _ffi.free_all(details)

    def _request_batch(
        self,
        requests: Any,
        count: int,
        timeout_ms: int,
        max_in_flight_per_connection: int,
        progress: Optional[Callable[[int, int], object]],
        replies: Any,
        codes: Any,
        details: Any,
    ) -> List[Union[bytes, WirepoolError]]:
        """The library call of ``request_batch`` and its results; the caller owns (and
        frees) the reply and error buffers."""
        raised: List[BaseException] = []

        def on_progress(_user_data: Any, done: int, total: int) -> None:
            # Everything inside the try: a Ctrl-C is delivered at the first line a
            # callback runs, and one escaping it would be lost ("Exception ignored").
            try:
                if not raised:
                    progress(done, total)  # type: ignore[misc]
            except BaseException as error:  # kept and re-raised after the C call
                raised.append(error)

        # Without a progress function no Python runs during the call, so a Ctrl-C
        # waits for its end instead of landing in a callback.
        callback = _ffi.progress_fn(on_progress) if progress is not None else _ffi.progress_fn()
        handle = self._enter()
        try:
            code = lib.wirepool_pool_request_batch_detailed(
                handle, requests, count, timeout_ms, max_in_flight_per_connection,
                callback, None, replies, codes, details,
            )
            if code:
                raise _error(code)
        finally:
            self._exit()
        results: List[Union[bytes, WirepoolError]] = []
        for index in range(count):
            item_code = codes[index]
            reply = _ffi.bytes_value(replies[index])
            detail = _ffi.bytes_value(details[index]).decode("utf-8", "replace")
            if item_code == _ffi.WIREPOOL_OK:
                results.append(reply)
            else:
                text = f"payloads[{index}]: {detail or _ffi.result_text(item_code)}"
                error = _ERROR_CLASSES.get(item_code, WirepoolError)(text, item_code)
                if isinstance(error, RemoteError):
                    error.payload = reply
                results.append(error)
        if raised:
            raise raised[0]
        return results

    def stats(self) -> Dict[str, Any]:
        """The pool's counters and state (the fields of ``GET /api/v1/pool/stats``)."""
        return self._json_call(lib.wirepool_pool_stats_json)

    def events(self, timeout: Optional[Seconds] = 0.0) -> List[Dict[str, Any]]:
        """Every queued event (dicts with ``type``, ``ts_ms`` and where they apply
        ``connection_id``, ``server``, ``channel``, ``message``); waits up to ``timeout``
        seconds for the first (None: until one arrives). ``[]`` on timeout.

        After ``close()`` the events nobody had read, up to and including the shutdown's
        (each connection's ``closed``, ``pool_closed`` last), are still returned: all of
        them by the first call, then ClosedError, as ``wirepool_pool_events_json`` does
        in C. A call waiting here when another thread closes the pool returns them
        (or, if its ``timeout`` ends first while the close is still joining threads,
        ``[]``, and the next call returns them)."""
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            handle = self._enter()
        except ClosedError:
            return self._events_left_at_close(deadline)
        try:
            slice_ms = _ms(_WAIT_SLICE_S)
            while True:
                wait_ms = _slice_ms(slice_ms, deadline)
                events = self._take_events(handle, wait_ms)
                if events is None:  # closed, and close() took what was left
                    break
                if events or (deadline is not None and time.monotonic() >= deadline):
                    return events
                if self._closing:
                    break
        finally:
            self._exit()
        return self._events_left_at_close(deadline)

    @staticmethod
    def _take_events(handle: Any, wait_ms: int) -> Optional[List[Dict[str, Any]]]:
        """One ``wirepool_pool_events_json``: the events, or None once the pool is closed
        and every event was taken."""
        out = _ffi.bytes_p()
        try:
            code = lib.wirepool_pool_events_json(handle, wait_ms, byref(out))
            if code == _ffi.WIREPOOL_ERR_CLOSED:
                return None
            if code:
                raise _error(code)
            events: List[Dict[str, Any]] = json.loads(_ffi.bytes_value(out))
            return events
        finally:
            lib.wirepool_bytes_free(out)  # on every path, as in request()

    def _keep_events_left_at_close(self, handle: Any) -> None:
        """Takes every event still queued in the library (it emits no more once
        ``wirepool_pool_close`` has returned) into ``_events_at_close``, before the
        handle is freed."""
        with self._events_at_close_lock:
            while True:
                events = self._take_events(handle, 0)
                if not events:
                    return
                self._events_at_close.extend(events)

    def _events_left_at_close(self, deadline: Optional[float]) -> List[Dict[str, Any]]:
        """``events()`` on a closed pool: what close() kept, once; then ClosedError.
        Waits (until ``deadline``) for a close still joining threads to keep them."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._events_kept.wait(remaining):
            return []
        with self._events_at_close_lock:
            events, self._events_at_close = self._events_at_close, []
        if events:
            return events
        raise ClosedError(self._closed_message, _ffi.WIREPOOL_ERR_CLOSED)

    def acquire(self) -> None:
        """Takes a lease: while any lease is held the pool stays connected. After the
        last ``release()`` and ``lease.idle_timeout_ms`` the pool closes its connections
        but keeps its subscriptions; the next ``acquire()`` reconnects and restores them.
        A pool on which no lease was ever taken never idles."""
        self._simple_call(lib.wirepool_pool_acquire)

    def release(self) -> None:
        """Gives back a lease taken with ``acquire()``; InvalidArgumentError when none
        is held."""
        self._simple_call(lib.wirepool_pool_release)

    @contextlib.contextmanager
    def lease(self) -> Iterator["Pool"]:
        """``with pool.lease(): ...`` holds a lease for the block. A pool closed during
        the block (by another thread, say) has no lease left to give back: the block
        then ends as it would have (its own exception, if any, unchanged)."""
        self.acquire()
        try:
            yield self
        finally:
            try:
                self.release()
            except ClosedError:
                if not self._closing:
                    raise

    def shared_data(self, key: str) -> Optional[bytes]:
        """The shared state the codec reported under ``key`` (e.g. the simulator's
        ``"instruments"``; JSON text for the ``json`` codec), or None when there is none
        yet. ``pool.require_shared`` makes ``wait_ready`` wait for such keys."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if not key or "\0" in key:
            raise ValueError("key must be a non-empty str without NUL characters")
        encoded = _utf8(key, "key")
        out = _ffi.bytes_p()
        handle = self._enter()
        try:
            code = lib.wirepool_pool_shared_data(handle, encoded, byref(out))
            if code == _ffi.WIREPOOL_ERR_INVALID_ARGUMENT:
                # For a valid key this is the library's "nothing stored under it".
                return None
            if code:
                raise _error(code)
            return _ffi.bytes_value(out)
        finally:
            lib.wirepool_bytes_free(out)  # on every path, as in request()
            self._exit()

    def set_token(self, token: str) -> None:
        """Re-authenticates every connection with ``token``, make-before-break: each
        old session keeps delivering until its replacement's channels are confirmed, so
        subscribed data does not stop (around the hand-over a channel may briefly
        deliver from both; ``Message.connection_id`` tells them apart). If the venue
        refuses it, the old sessions keep running and ``RemoteError`` says why. An
        empty token raises ``InvalidArgumentError``. Only ready sessions are replaced:
        with none ready the token is just stored and this returns at once (later
        connections use it; the venue's verdict comes as their ``auth_failed``
        events)."""
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, not {type(token).__name__}")
        if "\0" in token:
            raise ValueError("token must not contain NUL characters")
        encoded = _utf8(token, "token")
        self._simple_call(lambda handle: lib.wirepool_pool_set_token(handle, encoded))

    def connections(self) -> List[Dict[str, Any]]:
        """The pool's connections (what ``GET /api/v1/connections`` lists: ``id``,
        ``server``, ``state``, ``ready``, ``subscriptions``, ``last_activity``,
        ``error_count``, its worker's ``thread_id`` and the ``cpu`` it is pinned to by
        ``affinity.worker_cpus``, ...). ``Message.connection_id`` names a message's
        connection here."""
        connections: List[Dict[str, Any]] = self._json_call(lib.wirepool_pool_connections_json)["connections"]
        return connections

    def health(self) -> Dict[str, Any]:
        """The pool's health, as ``GET /api/v1/pool/health`` gives it: ``level``
        (``"healthy"``, ``"degraded"``, ``"unhealthy"`` or ``"critical"``), ``reasons``
        (why it is not healthy, e.g. ``"1 server circuit breaker(s) not closed"``; ``[]``
        when it is) and ``history`` (the last 100 level changes, oldest first, each with
        ``ts_ms``, ``level`` and ``reasons``). The pool thread reassesses it as
        connections and breakers change: to wait for a level, read it again after each
        ``events()``. ``ClosedError`` after ``close()``."""
        return self._json_call(lib.wirepool_pool_health_json)

    def servers(self) -> List[Dict[str, Any]]:
        """The configured servers in order, as ``GET /api/v1/servers`` lists them: ``id``,
        ``circuit`` (``"closed"``, ``"open"`` or ``"half_open"``),
        ``consecutive_failures``, ``connections``, ``ready_connections`` and
        ``retry_after_until_ms`` (Unix milliseconds until which the server asked for no
        new connections, 0 when it did not). ``ClosedError`` after ``close()``."""
        servers: List[Dict[str, Any]] = self._json_call(lib.wirepool_pool_servers_json)["servers"]
        return servers

    def request_latency(self) -> Dict[str, Any]:
        """Request round-trip times, as ``GET /api/v1/pool/latency`` gives them: a
        histogram with ``bounds_us`` (each bucket's upper bound, microseconds),
        ``counts`` (requests per bucket, not cumulative; one more entry than
        ``bounds_us``, the last for those above the last bound), ``count`` (their sum)
        and ``sum_us``, and ``p50_upper_bound_us``, ``p90_upper_bound_us``,
        ``p99_upper_bound_us``: the upper bound of the bucket holding that percentile
        (the true value is at most that), None with no requests yet or above the last
        bound. Answered requests and venue errors count; timeouts and lost connections
        do not. The counts are the pool's since it opened. ``ClosedError`` after
        ``close()``."""
        return self._json_call(lib.wirepool_pool_request_latency_json)

    def health_addr(self) -> Optional[Tuple[str, int]]:
        """Where the admin HTTP port listens, as ``(host, port)`` (``("127.0.0.1",
        41234)``; an IPv6 host without brackets, ``("::1", 41234)``), ready for
        ``http.client.HTTPConnection(*pool.health_addr())`` or
        ``socket.create_connection``; with ``health.listen`` on port 0, the port the
        system chose. None when the configuration has no ``health.listen``.
        ``ClosedError`` after ``close()`` (which stops the port)."""
        out = _ffi.bytes_p()
        handle = self._enter()
        try:
            code = lib.wirepool_pool_health_addr(handle, byref(out))
            if code:
                raise _error(code)
            text = _ffi.bytes_value(out).decode("ascii") if out else None
        finally:
            lib.wirepool_bytes_free(out)  # on every path, as in request()
            self._exit()
        if text is None:
            return None
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    def close_connection(self, connection_id: SupportsIndex) -> None:
        """Closes one connection; the pool replaces it and its channels move to other
        ready connections at once, as do requests made from then on. Until the venue
        answers the close, for at most 500 ms (the close grace), what it still sends is
        handled as usual: a reply completes its request, data reaches the consumer in
        order. Requests still unanswered then fail with ``ConnectionLostError`` unless
        idempotent. The close waits for room in a full queue (``block`` overflow) only
        within the grace: what it could not hand over is counted in
        ``dropped_messages`` and named in a ``dropped_at_close`` event. A codec failing
        on what the grace reads ends the grace with a ``codec_failed`` event; the close
        is still reported as closed by request.
        ``InvalidArgumentError`` when no
        connection has that id, or when it is closing already. ``connection_id`` is an
        int (or anything with ``__index__``) from 0 to 2**64 - 1."""
        connection_id = _connection_id(connection_id)
        self._simple_call(lambda handle: lib.wirepool_pool_close_connection(handle, connection_id))

    def recycle_connection(self, connection_id: SupportsIndex) -> int:
        """Replaces a ready connection make before break and returns the new one's id:
        the new connection takes over its channels, requests and slot once ready, and
        the old one keeps delivering until the new one confirmed every channel (a few
        messages may arrive twice, once from each), so data does not stop. ``recycled``
        or ``recycle_failed`` events follow. ``InvalidArgumentError`` when there is no
        such connection or it cannot be recycled now (not ready, already being
        replaced); ``IoError`` when no server admits a replacement now.
        ``connection_id`` is an int (or anything with ``__index__``) from 0 to 2**64 - 1."""
        connection_id = _connection_id(connection_id)
        out = c_uint64()
        self._simple_call(
            lambda handle: lib.wirepool_pool_recycle_connection(handle, connection_id, byref(out))
        )
        return out.value

    def open_connection(self) -> int:
        """Opens one more connection, up to ``pool.max_connections``, and returns its
        id. It counts as a scaling decision: the next one waits
        ``pool.scale_cooldown_ms``, and a pool whose load stays under
        ``pool.scale_down_at`` then drains one connection beyond ``min_connections``;
        ``reconfigure(min_connections=...)`` keeps it. When it cannot be done nothing is
        opened: ``InvalidArgumentError`` at the maximum or while the pool is idle by
        lease, ``IoError`` when no server admits a connection now (breaker open,
        ``Retry-After``)."""
        out = c_uint64()
        self._simple_call(lambda handle: lib.wirepool_pool_open_connection(handle, byref(out)))
        return out.value

    def settings(self) -> Dict[str, Any]:
        """The run-time settings, as ``GET /api/v1/pool/config`` shows them:
        ``{"min_connections": 2, "max_connections": 4, "strategy": "round_robin"}``."""
        return self._json_call(lib.wirepool_pool_settings_json)

    def reconfigure(
        self,
        *,
        min_connections: Optional[SupportsIndex] = None,
        max_connections: Optional[SupportsIndex] = None,
        strategy: Optional[str] = None,
    ) -> None:
        """Changes pool sizes and strategy at run time; the arguments left None keep
        their value (applied to the settings in force at that moment, so a change made
        meanwhile by another thread or the admin port is kept). A larger
        ``min_connections`` opens connections at once (their ``ready`` events follow);
        a smaller one drains the surplus make before break: their channels move at
        once, and each closes once its requests in flight are answered.

        Counts are ints (or anything with ``__index__``); ``strategy`` is one of
        ``"round_robin"``, ``"least_connections"``, ``"weighted"``, ``"random"``. Any
        other type is a ``TypeError`` naming the argument. A change the library refuses
        (a negative count, ``min_connections`` above ``max_connections``,
        ``max_connections`` 0 or over 10000, an unknown strategy) raises
        ``InvalidArgumentError`` with its reason (``pool.min_connections: 5 is greater
        than pool.max_connections (4)``) and changes nothing."""
        change: Dict[str, Any] = {}
        if min_connections is not None:
            change["min_connections"] = _integer(min_connections, "min_connections")
        if max_connections is not None:
            change["max_connections"] = _integer(max_connections, "max_connections")
        if strategy is not None:
            if not isinstance(strategy, str):
                raise TypeError(f"strategy must be a str, not {type(strategy).__name__}")
            _utf8(strategy, "strategy")  # names a str with no UTF-8 form
            change["strategy"] = strategy
        encoded = json.dumps(change, ensure_ascii=False).encode("utf-8")
        self._simple_call(lambda handle: lib.wirepool_pool_reconfigure_json(handle, encoded))

    def _json_call(self, function: Any) -> Dict[str, Any]:
        """Calls ``function(handle, &out)`` and parses the JSON it wrote."""
        out = _ffi.bytes_p()
        handle = self._enter()
        try:
            code = function(handle, byref(out))
            if code:
                raise _error(code)
            text = _ffi.bytes_value(out)
        finally:
            lib.wirepool_bytes_free(out)  # on every path, as in request()
            self._exit()
        document: Dict[str, Any] = json.loads(text)
        return document

    def _simple_call(self, function: Any) -> None:
        handle = self._enter()
        try:
            code = function(handle)
            if code:
                raise _error(code)
        finally:
            self._exit()

    def fileno(self) -> int:
        """A file descriptor that is readable while messages are queued, for ``select``,
        ``selectors`` or asyncio's ``loop.add_reader``. Owned by the pool: do not close
        it, and stop watching it before closing the pool."""
        handle = self._enter()
        try:
            if self._fd is None:
                fd = c_int()
                code = lib.wirepool_pool_fd(handle, byref(fd))
                if code:
                    raise _error(code)
                self._fd = fd.value
            return self._fd
        finally:
            self._exit()


def _channel_arg(channel: str) -> bytes:
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, not {type(channel).__name__}")
    if "\0" in channel:
        raise ValueError("channel must not contain NUL characters")
    return _utf8(channel, "channel")
