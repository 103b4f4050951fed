"""ActorPool: spread work over a fixed set of actors, as Ray's ``ray.util.ActorPool``.

``fn(actor, value)`` is called, in the caller's thread, only for an idle actor; the actor
counts as busy until the ObjectRef that fn returned completes. Results come back in
submission order (get_next) or as they finish (get_next_unordered).

**Decision (an actor is free when its call completes).** Ray frees an actor only when
its result is *returned*: during an ordered ``map`` the actors that finish ahead of
the result awaited sit idle until the caller reaches their results. Here a completed
call frees its actor at once (its outcome is kept until the caller asks for it), so
an ordered map keeps every actor busy. That is what the documentation promises ("busy
until the ObjectRef completes"), and it is why map throughput does not drop to one
actor's pace behind a slow item.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from runtime.exceptions import ActorDiedError

__all__ = ["ActorPool"]

# A submission's future: one ObjectRef, or a list of them (fn may return several).
_Future = Any


def _key(future: _Future) -> Any:
    return tuple(future) if isinstance(future, list) else future


def _refs(future: _Future) -> List[Any]:
    return list(future) if isinstance(future, (list, tuple)) else [future]


class ActorPool:
    """Utility class to operate on a fixed pool of actors.

    ``ActorPool([a1, a2]).map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])`` yields
    2, 4, 6, 8.
    """

    def __init__(self, actors: Iterable[Any]) -> None:
        self._idle_actors: List[Any] = list(actors)
        # Submitted and not yet returned to the caller: index -> future.
        self._index_to_future: Dict[int, _Future] = {}
        # Calls still running: future key -> (index, actor, future).
        self._running: Dict[Any, Tuple[int, Any, _Future]] = {}
        # Completed, actor already freed, outcome not yet returned: index -> (ok, value),
        # in the order they completed (get_next_unordered takes the oldest).
        self._done: "collections.OrderedDict[int, Tuple[bool, Any]]" = collections.OrderedDict()
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: Deque[Tuple[Callable, Any]] = collections.deque()

    # -- submitting --------------------------------------------------------------------------
    def map(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """Apply fn over the values on the pool's actors; an iterator over the results in
        the order of the values (iterate it to drive the work)."""
        self._drop_outstanding(ordered=True)
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next()

        return results()

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Iterable[Any]) -> Iterator[Any]:
        """As map(), but results come as they finish."""
        self._drop_outstanding(ordered=False)
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next_unordered()

        return results()

    def _drop_outstanding(self, ordered: bool) -> None:
        """A new map starts from a clean slate, as in Ray: earlier results not yet fetched
        are dropped (their actors come back to the pool). An error among them is dropped
        too, where Ray would raise it from map(): nobody asked for that result."""
        while self.has_next():
            try:
                if ordered and self._next_return_index < self._next_task_index:
                    self.get_next(timeout=0, ignore_if_timedout=True)
                else:
                    self.get_next_unordered(timeout=0)
            except TimeoutError:
                pass
            except Exception:  # the discarded result was an error: nobody asked for it
                pass

    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Schedule fn(actor, value) on an idle actor, or once one is free; fetch the
        result with get_next() or get_next_unordered()."""
        if self._idle_actors:
            actor = self._idle_actors.pop()
            future = fn(actor, value)
            index = self._next_task_index
            self._running[_key(future)] = (index, actor, future)
            self._index_to_future[index] = future
            self._next_task_index += 1
        else:
            self._pending_submits.append((fn, value))

    # -- results -------------------------------------------------------------------------------
    def has_next(self) -> bool:
        """Whether results are pending (submitted and not yet returned)."""
        return bool(self._index_to_future)

    def get_next(self, timeout: Optional[float] = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order, waiting up to ``timeout`` seconds.

        On timeout raises TimeoutError; with ``ignore_if_timedout`` the awaited task is
        dropped first (its actor returns to the pool) so the next call moves on."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        index = self._next_return_index
        deadline = None if timeout is None else time.monotonic() + timeout
        while index not in self._done:
            if not self._wait_some(deadline):
                future = self._index_to_future[index]
                if not ignore_if_timedout:
                    raise TimeoutError("Timed out waiting for result")
                self._forget(index, future)
                self._next_return_index += 1
                raise TimeoutError(f"Timed out waiting for result. The task {future} has been "
                                   f"ignored.")
        self._next_return_index += 1
        return self._take(index)

    def get_next_unordered(self, timeout: Optional[float] = None,
                           ignore_if_timedout: bool = False) -> Any:
        """Any next result, the first to finish, waiting up to ``timeout`` seconds."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            if not self._wait_some(deadline):
                if not ignore_if_timedout:
                    raise TimeoutError("Timed out waiting for result")
                index = min(self._index_to_future)
                future = self._index_to_future[index]
                self._forget(index, future)
                self._next_return_index = max(self._next_return_index, index + 1)
                raise TimeoutError(f"Timed out waiting for result. The task {future} has been "
                                   f"ignored.")
        index = next(iter(self._done))
        self._next_return_index = max(self._next_return_index, index + 1)
        return self._take(index)

    def _take(self, index: int) -> Any:
        ok, value = self._done.pop(index)
        del self._index_to_future[index]
        if ok:
            return value
        raise value

    def _forget(self, index: int, future: _Future) -> None:
        """Drop a task the caller gave up on; its actor goes back to the pool (as in Ray)."""
        del self._index_to_future[index]
        entry = self._running.pop(_key(future), None)
        if entry is not None:
            self._return_actor(entry[1])
        else:
            self._done.pop(index, None)

    def _wait_some(self, deadline: Optional[float]) -> bool:
        """Wait until at least one running call completes (False at the deadline), then
        collect every call that has completed, freeing their actors."""
        from runtime.api import get, wait

        refs = [r for _i, _a, f in self._running.values() for r in _refs(f)]
        if not refs:  # only possible when every actor died with work still pending
            raise RuntimeError("ActorPool has pending work but no live actor to run it; "
                               "push() a new actor into the pool")
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = wait(refs, num_returns=1, timeout=remaining)
        if not ready:
            return False
        if len(refs) > 1:
            more, _ = wait(refs, num_returns=len(refs), timeout=0)
            ready = more or ready
        done = set(ready)
        for key, (index, actor, future) in list(self._running.items()):
            if not all(r in done for r in _refs(future)):
                continue
            del self._running[key]
            alive = True
            try:
                outcome = (True, get(future))
            except ActorDiedError as exc:
                alive = False  # a dead actor never comes back: submit() would pick it forever
                outcome = (False, exc)
            except Exception as exc:
                outcome = (False, exc)
            self._done[index] = outcome
            if alive:
                self._return_actor(actor)
        return True

    def _return_actor(self, actor: Any) -> None:
        self._idle_actors.append(actor)
        while self._pending_submits and self._idle_actors:
            self.submit(*self._pending_submits.popleft())

    # -- the pool's actors ---------------------------------------------------------------------
    def has_free(self) -> bool:
        """Whether an actor is idle and no submission is waiting for one."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self) -> Optional[Any]:
        """Remove and return an idle actor; None when none is free."""
        if self.has_free():
            return self._idle_actors.pop()
        return None

    def push(self, actor: Any) -> None:
        """Add an actor to the pool (it starts on waiting submissions at once)."""
        busy = [a for _i, a, _f in self._running.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)
