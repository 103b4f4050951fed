"""How values become bytes and back.

A serialized value is one contiguous layout, used both inline in RPCs (small
values) and as the content of an object-store file (large values)::

    header  "RT" version kind n_buffers pickle_len      (16 bytes)
    table   (offset, length) per out-of-band buffer     (16 bytes each)
    pickle  protocol-5 pickle of the value
    buffers each aligned to 64 bytes

Pickle protocol 5 out-of-band buffers (numpy arrays, bytes-like objects) are
written once into the layout and, on the way back, handed to ``pickle.loads`` as
slices of the mapped file: a numpy array read from the store is a read-only view
onto shared memory, never a copy.

ObjectRefs met while pickling are recorded (they are *contained* in the value and
must stay alive as long as it does); ObjectRefs met while unpickling register as
borrowed in the current process. Both go through a thread-local context that
:class:`runtime.object_ref.ObjectRef` consults.
"""
from __future__ import annotations

import pickle
import struct
import threading
import traceback
from typing import Any, List, Optional

import cloudpickle

_HEADER = struct.Struct("<2sBBIQ")
_ENTRY = struct.Struct("<QQ")
_MAGIC = b"RT"
_VERSION = 1
ALIGN = 64

KIND_VALUE = 0
KIND_ERROR = 1  # the pickled value is an exception to raise at get()

_FAST_TYPES = (type(None), bool, int, float, str, bytes)


class SerializationError(TypeError):
    """A value could not be pickled; the message names what and why."""


class _Context(threading.local):
    def __init__(self) -> None:
        self.contained: Optional[list] = None


_ctx = _Context()


def record_contained_ref(ref: Any) -> None:
    """Called by ObjectRef.__reduce__: note a ref nested in the value being pickled."""
    lst = _ctx.contained
    if lst is not None:
        lst.append(ref)


class Serialized:
    """A value in wire form: pickle bytes, out-of-band buffers, contained refs."""

    __slots__ = ("kind", "pickled", "buffers", "contained", "_size")

    def __init__(self, kind: int, pickled: bytes, buffers: List[memoryview], contained: list) -> None:
        self.kind = kind
        self.pickled = pickled
        self.buffers = buffers
        self.contained = contained
        self._size = -1

    def _layout(self) -> tuple[int, list[tuple[int, int]]]:
        pos = _HEADER.size + _ENTRY.size * len(self.buffers) + len(self.pickled)
        table = []
        for buf in self.buffers:
            pos = (pos + ALIGN - 1) // ALIGN * ALIGN
            table.append((pos, buf.nbytes))
            pos += buf.nbytes
        return pos, table

    @property
    def total_size(self) -> int:
        if self._size < 0:
            self._size = self._layout()[0] if self.buffers else (
                _HEADER.size + len(self.pickled))
        return self._size

    def chunks(self) -> list:
        """Pieces to write in order (for writev into a store file)."""
        head = _HEADER.pack(_MAGIC, _VERSION, self.kind, len(self.buffers), len(self.pickled))
        if not self.buffers:
            return [head, self.pickled]
        size, table = self._layout()
        out = [head + b"".join(_ENTRY.pack(o, n) for o, n in table), self.pickled]
        pos = _HEADER.size + _ENTRY.size * len(table) + len(self.pickled)
        for (off, n), buf in zip(table, self.buffers):
            if off > pos:
                out.append(bytes(off - pos))
            out.append(buf)
            pos = off + n
        self._size = size
        return out

    def to_bytes(self) -> bytes:
        if not self.buffers:
            return _HEADER.pack(_MAGIC, _VERSION, self.kind, 0, len(self.pickled)) + self.pickled
        return b"".join(bytes(c) if isinstance(c, memoryview) else c for c in self.chunks())


def _dumps(value: Any, buffers: list) -> bytes:
    try:
        return cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise SerializationError(_explain_unpicklable(value, exc)) from exc


def _explain_unpicklable(value: Any, exc: BaseException) -> str:
    return (f"cannot serialize {type(value).__name__} value {_short_repr(value)}: "
            f"{type(exc).__name__}: {exc}. Objects holding locks, sockets, open files or "
            f"generators cannot be sent to other processes; pass what they are built from "
            f"instead")


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        r = repr(value)
    except Exception:
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def serialize(value: Any, kind: int = KIND_VALUE) -> Serialized:
    """Pickle `value` (protocol 5, out-of-band buffers) and record contained refs."""
    if type(value) in _FAST_TYPES:
        return Serialized(kind, pickle.dumps(value, protocol=5), [], [])
    buffers: list = []
    prev = _ctx.contained
    contained: list = []
    _ctx.contained = contained
    try:
        pickled = _dumps(value, buffers)
    finally:
        _ctx.contained = prev
    views = [b.raw() for b in buffers]
    return Serialized(kind, pickled, views, contained)


class _ErrorEnvelope:
    """An error value on the wire: the exception pickled on its own, and its text. A
    receiver that cannot unpickle the exception (its class is not importable there, or
    it does not survive pickling) still gets the text, as UnserializableException."""

    __slots__ = ("payload", "text")

    def __init__(self, payload: bytes, text: str) -> None:
        self.payload = payload
        self.text = text

    def __reduce__(self):
        return (_ErrorEnvelope, (self.payload, self.text))

    def unwrap(self) -> BaseException:
        try:
            _kind, exc = parse(self.payload)
        except Exception:
            from runtime.exceptions import UnserializableException

            return UnserializableException(self.text)
        return exc


def _error_text(exc: BaseException) -> str:
    if exc.__traceback__ is None:  # a RayTaskError's message already holds the remote one
        return f"{type(exc).__name__}: {exc}"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def serialize_error(exc: BaseException) -> Serialized:
    """An exception as an error value; falls back to a description if unpicklable."""
    try:
        inner = serialize(exc, KIND_ERROR)
    except SerializationError:
        from runtime.exceptions import RaySystemError

        inner = serialize(RaySystemError(f"unpicklable exception {type(exc).__name__}: {exc}"),
                          KIND_ERROR)
    outer = serialize(_ErrorEnvelope(inner.to_bytes(), _error_text(exc)), KIND_ERROR)
    outer.contained = inner.contained  # refs inside the exception stay counted
    return outer


def parse(data: Any) -> tuple[int, Any]:
    """(kind, value) of a serialized layout (bytes or a memoryview over a mapped file)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    magic, version, kind, nbuf, plen = _HEADER.unpack_from(mv, 0)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError("corrupt or foreign serialized object (bad header)")
    pos = _HEADER.size + _ENTRY.size * nbuf
    pickled = mv[pos: pos + plen]
    if nbuf:
        bufs = []
        for i in range(nbuf):
            off, n = _ENTRY.unpack_from(mv, _HEADER.size + i * _ENTRY.size)
            bufs.append(mv[off: off + n])
        value = pickle.loads(pickled, buffers=bufs)
    else:
        value = pickle.loads(pickled)
    if kind == KIND_ERROR and type(value) is _ErrorEnvelope:
        value = value.unwrap()
    return kind, value


def kind_of(data: Any) -> int:
    return _HEADER.unpack_from(data, 0)[2]


NONE_BYTES = serialize(None).to_bytes()


def format_remote_traceback(exc: BaseException) -> str:
    """The traceback as the user should see it, minus the runtime's own frames."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    keep = [line for line in tb if "/runtime/worker/" not in line and "/runtime/core_worker/" not in line]
    return "".join(keep)


def dumps_function(fn: Any) -> bytes:
    """cloudpickle a function or class; functions from __main__ travel by value."""
    try:
        return cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize remote function/class {getattr(fn, '__qualname__', fn)!r}: "
            f"{type(exc).__name__}: {exc}. It probably captures an unpicklable object "
            f"(a lock, a socket, an open file) from its enclosing scope") from exc


def loads_function(blob: bytes) -> Any:
    return pickle.loads(blob)
