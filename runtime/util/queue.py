"""A first-in, first-out queue shared by tasks and actors, as Ray's ``ray.util.queue``.

The items live in an async actor (``_QueueActor``) holding an ``asyncio.Queue``: a
blocked ``get`` or ``put`` waits as a coroutine inside the actor, so any number of
callers can wait at once without holding a thread, and a timeout is the actor's own
``asyncio.wait_for``. Pass the Queue object itself to tasks and actors: it pickles as
its actor handle.
"""
from __future__ import annotations

import asyncio
import math
import numbers
import queue
from collections.abc import Iterable
from typing import Any, Dict, List, Optional

__all__ = ["Queue", "Empty", "Full"]


class Empty(queue.Empty):
    """The queue had no item (non-blocking get, or a blocking one that timed out)."""


class Full(queue.Full):
    """The queue had no room (non-blocking put, or a blocking one that timed out)."""


def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is None:
        return
    if (not isinstance(timeout, numbers.Real) or isinstance(timeout, bool)
            or math.isnan(timeout)):
        raise ValueError(f"'timeout' must be a non-negative number of seconds or None, got "
                         f"{timeout!r}")
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


def _result(ref: Any) -> Any:
    """get(ref), with the actor's Empty/Full raised as themselves: the remote traceback of
    a timeout says nothing more than its message."""
    from runtime.api import get

    try:
        return get(ref)
    except (Empty, Full) as exc:
        raise getattr(exc, "cause", None) or exc from None


async def _result_async(ref: Any) -> Any:
    try:
        return await ref
    except (Empty, Full) as exc:
        raise getattr(exc, "cause", None) or exc from None


class Queue:
    """A FIFO queue backed by an actor; sync and async put/get, batches, and timeouts.

    ``maxsize`` 0 means unbounded. ``actor_options`` go to the actor's ``.options()``
    (resources, a name, ``lifetime="detached"``...).
    """

    def __init__(self, maxsize: int = 0, actor_options: Optional[Dict[str, Any]] = None) -> None:
        from runtime.remote import remote

        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__}")
        self.maxsize = maxsize
        actor_cls = remote(_QueueActor)
        if actor_options:
            actor_cls = actor_cls.options(**actor_options)
        self.actor = actor_cls.remote(maxsize)

    def _handle(self) -> Any:
        if self.actor is None:
            raise RuntimeError("This Queue was shut down; create a new one.")
        return self.actor

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        """How many items the queue holds now."""
        from runtime.api import get

        return get(self._handle().qsize.remote())

    def qsize(self) -> int:
        return self.size()

    def empty(self) -> bool:
        from runtime.api import get

        return get(self._handle().empty.remote())

    def full(self) -> bool:
        from runtime.api import get

        return get(self._handle().full.remote())

    # -- put -----------------------------------------------------------------------------------
    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Add an item; with ``block`` wait (up to ``timeout`` seconds, None: for ever) for
        room, else raise Full at once when there is none."""
        if not block:
            _result(self._handle().put_nowait.remote(item))
            return
        _check_timeout(timeout)
        _result(self._handle().put.remote(item, timeout))

    async def put_async(self, item: Any, block: bool = True,
                        timeout: Optional[float] = None) -> None:
        """put() for async code: awaits instead of blocking the event loop."""
        if not block:
            await _result_async(self._handle().put_nowait.remote(item))
            return
        _check_timeout(timeout)
        await _result_async(self._handle().put.remote(item, timeout))

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all the items in order, or none of them (Full) if they do not all fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        _result(self._handle().put_nowait_batch.remote(list(items)))

    # -- get -----------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item; with ``block`` wait (up to ``timeout``
        seconds, None: for ever) for one, else raise Empty at once when there is none."""
        if not block:
            return _result(self._handle().get_nowait.remote())
        _check_timeout(timeout)
        return _result(self._handle().get.remote(timeout))

    async def get_async(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """get() for async code: awaits instead of blocking the event loop."""
        if not block:
            return await _result_async(self._handle().get_nowait.remote())
        _check_timeout(timeout)
        return await _result_async(self._handle().get.remote(timeout))

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        """Remove and return the ``num_items`` oldest items, or none (Empty) if the queue
        holds fewer."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return _result(self._handle().get_nowait_batch.remote(num_items))

    # -- the end -------------------------------------------------------------------------------
    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """Stop the queue's actor, releasing its resources; items left in it are lost.

        Without ``force`` the actor first finishes the calls already sent to it, for up
        to ``grace_period_s`` seconds, then is killed."""
        from runtime.api import kill, wait

        if self.actor is None:
            return
        actor, self.actor = self.actor, None
        if not force:
            done, _ = wait([actor.exit_after_pending.remote()], timeout=grace_period_s)
            if done:
                return
        kill(actor, no_restart=True)


class _QueueActor:
    """The items; an async actor, so every waiting get/put is a coroutine, not a thread."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self.queue.qsize()

    def empty(self) -> bool:
        return self.queue.empty()

    def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: Optional[float] = None) -> None:
        if timeout is not None and timeout <= 0:  # wait_for(0) would cancel even a free put
            return self.put_nowait(item)
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            raise Full(f"the queue stayed full (maxsize {self.maxsize}) for {timeout} s") from None

    async def get(self, timeout: Optional[float] = None) -> Any:
        if timeout is not None and timeout <= 0:
            return self.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Empty(f"the queue stayed empty for {timeout} s") from None

    def put_nowait(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Full(f"the queue is full (maxsize {self.maxsize})") from None

    def put_nowait_batch(self, items: List[Any]) -> None:
        if self.maxsize > 0 and len(items) + self.qsize() > self.maxsize:
            raise Full(f"Cannot add {len(items)} items to queue of size {self.qsize()} and "
                       f"maxsize {self.maxsize}.")
        for item in items:
            self.queue.put_nowait(item)

    def get_nowait(self) -> Any:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty("the queue is empty") from None

    def get_nowait_batch(self, num_items: int) -> List[Any]:
        if num_items > self.qsize():
            raise Empty(f"Cannot get {num_items} items from queue of size {self.qsize()}.")
        return [self.queue.get_nowait() for _ in range(num_items)]

    def exit_after_pending(self) -> None:
        """Ends the actor once the calls sent before it have started (Ray's
        __ray_terminate__); gets and puts still blocked then fail with ActorDiedError."""
        from runtime.actor import exit_actor

        exit_actor()
