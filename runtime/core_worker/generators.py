"""Generator tasks: Ray's ObjectRefGenerator (num_returns="streaming") and
DynamicObjectRefGenerator (num_returns="dynamic"), and the owner's bookkeeping of a stream.

A streaming task's worker sends each yielded item back on the task stream as it is
produced (a TaskResult with `stream_item`, carrying the item's location: inline, or in
the object store as any return), before the task's final result, which says how many
items there were. The owner turns each item into an owned ObjectRef and keeps it in a
`GeneratorStream` until the caller's iteration takes it. Items are keyed by index, so a
retried task (a new attempt after its worker died) re-delivers only items not seen yet,
as in Ray. An exception raised inside the generator is the last item (its value is the
error); a task that fails as a whole (cancelled, worker lost with no retries) gets its
error appended as one more item, so iteration raises it where it stands.

Back-pressure (`_generator_backpressure_num_objects=N`): each item the caller consumes is
acknowledged to the worker (a TaskSpec with `generator_ack` on the task stream, or on a
sync actor's call port, whose thread reads it while the generator waits), and the
worker does not produce item k+N before item k was consumed.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from runtime import ids
from runtime.core_worker.memory_store import Value
from runtime.object_ref import ObjectRef

GENERATOR_NONE = 0
GENERATOR_STREAMING = 1
GENERATOR_DYNAMIC = 2

# Return index 1 is the generator task's own return (the ref inside ObjectRefGenerator);
# item i is return index i + 2.
_FIRST_ITEM_INDEX = 2


def item_id(task_id: bytes, index: int) -> bytes:
    """The object id of item `index` of generator task `task_id` (the same on every
    attempt, so a retry's items replace nothing)."""
    return ids.object_id_for_return(task_id, index + _FIRST_ITEM_INDEX)


def generator_mode(num_returns: Any, function: Callable) -> int:
    """Which kind of generator task `num_returns` asks for; a generator function with no
    num_returns is streaming, as in Ray 2.60."""
    if num_returns == "streaming":
        return GENERATOR_STREAMING
    if num_returns == "dynamic":
        return GENERATOR_DYNAMIC
    if num_returns is None and _is_generator_function(function):
        return GENERATOR_STREAMING
    return GENERATOR_NONE


def _is_generator_function(function: Callable) -> bool:
    return inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function)


class GeneratorStream:
    """The owner's view of one generator task's items (thread-safe: items arrive on the
    I/O thread, the caller iterates on its own thread or event loop)."""

    def __init__(self, task_id: bytes, backpressure: int = 0) -> None:
        self.task_id = task_id
        self.backpressure = backpressure
        self._cond = threading.Condition()
        self._refs: Dict[int, ObjectRef] = {}   # arrived, not taken yet
        self._seen: set = set()                  # every index that arrived (retries)
        self.consumed = 0                        # items the caller has taken
        self.end: Optional[int] = None           # number of items, once the task ended
        self._waiters: List[asyncio.Future] = []
        # Set by the owner's shell: sends the consumed count to the worker (back-pressure).
        self.ack: Optional[Callable[[int], None]] = None

    # -- I/O thread ------------------------------------------------------------------------
    def add_item(self, index: int, value: Value, owner: Any) -> bool:
        """Item `index` arrived (`owner` is the core worker that owns it); False for one
        already seen (a retried attempt producing it again)."""
        with self._cond:
            if index in self._seen or (self.end is not None and index >= self.end):
                return False
            self._seen.add(index)
            oid = item_id(self.task_id, index)
            ref = ObjectRef(oid, owner.address, owner)
            owner.memory.put(oid, value)
            self._refs[index] = ref
            self._wake()
        return True

    def finish(self, count: int) -> None:
        """The task ended after producing `count` items."""
        with self._cond:
            if self.end is None:
                self.end = count
            self._wake()

    def fail(self, value: Value, owner: Any) -> None:
        """The task failed as a whole: its error becomes the item after the last one seen,
        so the caller gets everything before it, then the error."""
        with self._cond:
            if self.end is not None:
                return
            index = max(self._seen) + 1 if self._seen else 0
        self.add_item(index, value, owner)
        self.finish(index + 1)

    def complete(self) -> bool:
        """Every item up to the end has arrived (the owner may forget the task)."""
        with self._cond:
            return self.end is not None and len(self._seen) >= self.end

    def _wake(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            loop = fut.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    # -- the caller -------------------------------------------------------------------------
    def _ready(self) -> bool:
        """Under the lock: the next take would not wait."""
        return self.consumed in self._refs or (self.end is not None and self.consumed >= self.end)

    def take(self, timeout: Optional[float] = None) -> Optional[ObjectRef]:
        """The next item's ref; None when the stream ended; raises TimeoutError when
        nothing came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ready():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                # Bounded waits keep the caller's thread responsive to signals (Ctrl-C).
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            return self._take_locked()

    def _take_locked(self) -> Optional[ObjectRef]:
        ref = self._refs.pop(self.consumed, None)
        if ref is None:
            return None
        self.consumed += 1
        if self.backpressure and self.ack is not None:
            self.ack(self.consumed)
        return ref

    async def take_async(self) -> Optional[ObjectRef]:
        while True:
            with self._cond:
                if self._ready():
                    return self._take_locked()
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
            await fut

    def next_ready(self) -> bool:
        with self._cond:
            return self.consumed in self._refs

    def is_finished(self) -> bool:
        with self._cond:
            return self.end is not None and self.consumed >= self.end


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class ObjectRefGenerator(ObjectRef):
    """What a streaming generator task returns: iterate it (or `async for` it) for the
    ObjectRef of each item, as the task yields them.

    It is also the ObjectRef of the task's own return, so `cancel(gen)` cancels the task
    and `completed()` is ready when the task has ended."""

    __slots__ = ("_stream",)

    def __init__(self, object_id: bytes, owner: Any, core_worker: Any,
                 stream: GeneratorStream) -> None:
        super().__init__(object_id, owner, core_worker)
        self._stream = stream

    def __iter__(self) -> "ObjectRefGenerator":
        return self

    def __next__(self) -> ObjectRef:
        ref = self._stream.take()
        if ref is None:
            raise StopIteration
        return ref

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        ref = await self._stream.take_async()
        if ref is None:
            raise StopAsyncIteration
        return ref

    def _next_sync(self, timeout_s: Optional[float] = None) -> ObjectRef:
        """Ray's: the next ref, or a nil ref if none came within `timeout_s`; raises
        StopIteration at the end."""
        try:
            ref = self._stream.take(timeout_s)
        except TimeoutError:
            return ObjectRef(b"\xff" * len(self._id), self._owner, _add_local_ref=False)
        if ref is None:
            raise StopIteration
        return ref

    async def _next_async(self, timeout_s: Optional[float] = None) -> ObjectRef:
        try:
            return await asyncio.wait_for(self.__anext__(), timeout_s)
        except asyncio.TimeoutError:
            return ObjectRef(b"\xff" * len(self._id), self._owner, _add_local_ref=False)

    def completed(self) -> ObjectRef:
        """A ref ready when the task has ended; getting it raises the task's failure."""
        return ObjectRef(self._id, self._owner, self._cw)

    def next_ready(self) -> bool:
        """Whether next() would return without waiting (and not raise StopIteration)."""
        return self._stream.next_ready()

    def is_finished(self) -> bool:
        """Whether the task has ended and every item has been taken."""
        return self._stream.is_finished()

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._id.hex()})"

    def __reduce__(self):
        raise TypeError("An ObjectRefGenerator cannot be passed to another task or actor: its "
                        "items arrive at the process that called .remote(). Pass the item refs "
                        "(next(gen)) instead.")


class DynamicObjectRefGenerator:
    """The value of a num_returns="dynamic" task's ref: the refs of every item it yielded."""

    def __init__(self, refs: List[ObjectRef]) -> None:
        self._refs = list(refs)

    def __iter__(self):
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"


def submit_generator(cw: Any, task: Any, mode: int, backpressure: Any) -> Any:
    """Make `task` a generator task; what .remote() returns for it (before submission,
    so no item can arrive before its stream exists)."""
    if backpressure is not None and (not isinstance(backpressure, int)
                                     or isinstance(backpressure, bool) or backpressure < 0):
        raise ValueError(f"_generator_backpressure_num_objects only accepts a non-negative "
                         f"integer, got {backpressure!r}")
    task.generator = mode
    task.stream = GeneratorStream(task.task_id, backpressure or 0)
    if mode == GENERATOR_STREAMING:
        return ObjectRefGenerator(task.return_ids[0], cw.address, cw, task.stream)
    return ObjectRef(task.return_ids[0], cw.address, cw)
