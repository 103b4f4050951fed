"""multiprocessing.Pool on the cluster's actors, as Ray's ``ray.util.multiprocessing``.

Each "process" of the pool is an actor (``_PoolActor``, 0 CPUs of its own, as in
Ray, so a pool never starves the tasks it runs beside); work goes to them in chunks
(one actor call runs a list of items), round-robin. A function's exception comes
back as itself, not wrapped, as the standard library's Pool raises it.

Completion is driven by the ObjectRefs' futures: when a call's result arrives, its
future's callback queues the AsyncResult on the pool's single result-handler thread
(the standard library's Pool has one too), which runs the user's callbacks there,
never on the runtime's I/O thread.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
from multiprocessing import TimeoutError
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

log = logging.getLogger("runtime.util.multiprocessing")

__all__ = ["Pool", "AsyncResult", "IMapIterator"]


class _Failure:
    """An item whose function raised: carried in a batch's results, raised at get()."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _PoolActor:
    """One of the pool's processes."""

    def __init__(self, initializer: Optional[Callable] = None, initargs: Iterable = ()) -> None:
        if initializer is not None:
            initializer(*(initargs or ()))

    def ping(self) -> None:
        """Answered once the initializer has run: the pool is ready."""

    def run_batch(self, func: Callable, batch: List[Tuple[tuple, dict]]) -> List[Any]:
        results: List[Any] = []
        for args, kwargs in batch:
            try:
                results.append(func(*(args or ()), **(kwargs or {})))
            except Exception as exc:
                results.append(_Failure(exc))
        return results

    def exit_after_pending(self) -> None:
        """Runs after the calls sent before it (a sync actor runs calls in order), then
        ends the actor: close() lets outstanding work finish."""
        from runtime.actor import exit_actor

        exit_actor()


class AsyncResult:
    """The result of apply_async/map_async/starmap_async, as the standard library's.

    Built from the ObjectRefs of the chunks; ready once every chunk has completed.
    """

    def __init__(self, pool: "Pool", refs: List[Any], single: bool,
                 callback: Optional[Callable] = None,
                 error_callback: Optional[Callable] = None) -> None:
        self._pool = pool
        self._single = single
        self._callback = callback
        self._error_callback = error_callback
        self._event = threading.Event()
        self._values: Optional[List[Any]] = None
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._left = len(refs)
        self._refs = refs
        if not refs:
            self._finish()
            return
        pool._started_result()
        for ref in refs:
            ref.future().add_done_callback(self._chunk_done)

    def _chunk_done(self, _future: Any) -> None:
        """Runs wherever the future resolves (possibly the runtime's I/O thread): count,
        and hand the last one to the pool's result thread."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._pool._results.put(self)

    def _finished_on_handler(self) -> None:
        self._finish()
        self._pool._finished_result()

    def _finish(self) -> None:
        """On the pool's result thread (or at once when there was nothing to run): gather
        the values, then run the callbacks."""
        from runtime.api import get

        values: List[Any] = []
        error: Optional[BaseException] = None
        for ref in self._refs:
            try:
                batch = get(ref)
            except Exception as exc:  # the call itself failed (actor died, unpicklable...)
                batch = [_Failure(exc)]
            for item in batch:
                if isinstance(item, _Failure):
                    error = error or item.exc
                else:
                    values.append(item)
        self._values, self._error = values, error
        self._refs = []
        try:
            if error is not None:
                if self._error_callback is not None:
                    self._error_callback(error)
            elif self._callback is not None:
                self._callback(values[0] if self._single else values)
        except Exception:
            log.exception("a Pool callback raised")
        finally:
            self._event.set()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait until ready or ``timeout`` seconds (no error on timeout)."""
        self._event.wait(timeout)

    def get(self, timeout: Optional[float] = None) -> Any:
        """The result (a list, or one value for apply_async); raises the function's
        exception if one raised, multiprocessing.TimeoutError if not ready in time."""
        if not self._event.wait(timeout):
            raise TimeoutError("the result is not ready within the timeout")
        if self._error is not None:
            raise self._error
        assert self._values is not None
        return self._values[0] if self._single else list(self._values)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether every item succeeded; ValueError if not ready yet (as the stdlib's)."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None


class IMapIterator:
    """Results of imap (in order) or imap_unordered (as they finish).

    Lazy, as Ray's: one chunk per actor is in flight, and a completed chunk sends the
    next chunk of the input to the actor it came from, so an endless or huge iterable
    is consumed only as fast as the pool works. In order, results that finished ahead
    of a slow chunk wait in a buffer: at most ``4 * processes`` chunks may run ahead of
    the next result (Ray does not bound it), so one stuck item cannot make imap read
    the whole input into memory.
    """

    def __init__(self, pool: "Pool", func: Callable, iterable: Iterable, chunksize: int,
                 ordered: bool) -> None:
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        self._pool = pool
        self._func = func
        self._chunks = _chunked(iter(iterable), chunksize)
        self._ordered = ordered
        self._window = 4 * len(pool._actors)
        self._inflight: Dict[Any, Tuple[int, int]] = {}  # ref -> (chunk index, actor index)
        self._idle: List[int] = list(range(len(pool._actors)))
        self._finished: Dict[int, List[Any]] = {}
        self._ready: Deque[Any] = collections.deque()
        self._next_chunk = 0  # ordered: the chunk whose results come next
        self._submitted = 0
        self._exhausted = False
        self._fill()

    def _fill(self) -> None:
        """Send the next chunks to idle actors, as far as the window allows."""
        while self._idle and not self._exhausted:
            if self._ordered and self._submitted - self._next_chunk >= self._window:
                return
            chunk = next(self._chunks, None)
            if chunk is None:
                self._exhausted = True
                return
            actor_index = self._idle.pop()
            ref = self._pool._run_batch(actor_index, self._func, [((a,), {}) for a in chunk])
            self._inflight[ref] = (self._submitted, actor_index)
            self._submitted += 1

    def __iter__(self) -> "IMapIterator":
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: Optional[float] = None) -> Any:
        """The next result; multiprocessing.TimeoutError if none within ``timeout``."""
        from runtime.api import get, wait

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self._ordered and self._next_chunk in self._finished:
                self._ready.extend(self._finished.pop(self._next_chunk))
                self._next_chunk += 1
                self._fill()
                continue
            if not self._inflight:
                raise StopIteration
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = wait(list(self._inflight), num_returns=1, timeout=remaining)
            if not done:
                raise TimeoutError("no result within the timeout")
            ref = done[0]
            chunk_index, actor_index = self._inflight.pop(ref)
            self._idle.append(actor_index)
            self._fill()
            try:
                batch = get(ref)
            except Exception as exc:
                batch = [_Failure(exc)]
            if self._ordered:
                self._finished[chunk_index] = batch
            else:
                self._ready.extend(batch)
        item = self._ready.popleft()
        if isinstance(item, _Failure):
            raise item.exc
        return item


def _chunked(it: Iterator[Any], size: int) -> Iterator[List[Any]]:
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


class Pool:
    """A pool of actor "processes", with the standard library's Pool API.

    processes: how many actors (default: the cluster's CPUs). initializer(*initargs)
    runs in each actor as it starts. maxtasksperchild: replace an actor after that many
    chunks. ray_address: the cluster to attach to when not initialized yet (else
    $RUNTIME_ADDRESS, else a private cluster with ``processes`` CPUs).
    ray_remote_args: options for the actors (resources, scheduling...). context is
    accepted for the standard library's signature and ignored, with a warning, as in Ray.
    """

    def __init__(self, processes: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: Optional[Iterable] = None, maxtasksperchild: Optional[int] = None,
                 context: Any = None, ray_address: Optional[str] = None,
                 ray_remote_args: Optional[Dict[str, Any]] = None) -> None:
        if processes is not None and (not isinstance(processes, int) or isinstance(processes, bool)):
            raise TypeError(f"processes must be an int or None, got {processes!r}")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or maxtasksperchild < 1):
            raise ValueError(f"maxtasksperchild must be a positive int or None, got "
                             f"{maxtasksperchild!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if context is not None:
            log.warning("Pool(context=...) is ignored: the pool's processes are the cluster's "
                        "actors, started by the runtime.")
        self._closed = False
        self._terminated = False
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasks = maxtasksperchild or 0
        self._remote_args = dict(ray_remote_args or {})
        self._remote_args.setdefault("num_cpus", 0)
        self._exits: List[Any] = []
        self._next_actor = -1
        # The result thread runs callbacks; it ends once the pool is closed and no
        # AsyncResult is outstanding (a None in the queue wakes it to check).
        self._results: "queue.SimpleQueue[Optional[AsyncResult]]" = queue.SimpleQueue()
        self._outstanding = 0
        self._outstanding_lock = threading.Lock()
        processes = self._init_cluster(processes, ray_address)
        self._actor_class = None
        self._actors: List[List[Any]] = []  # [handle, chunks run]
        try:
            self._actors = [[self._new_actor(), 0] for _ in range(processes)]
            from runtime.api import get

            get([a.ping.remote() for a, _ in self._actors])
        except BaseException:
            self._kill_actors()
            raise
        self._handler = threading.Thread(target=self._handle_results, name="pool-results",
                                         daemon=True)
        self._handler.start()

    # -- set-up --------------------------------------------------------------------------------
    @staticmethod
    def _init_cluster(processes: Optional[int], address: Optional[str]) -> int:
        from runtime.api import cluster_resources, init, is_initialized

        if not is_initialized():
            if address is not None and address != "local":
                init(address=address)
            elif address is None and os.environ.get("RUNTIME_ADDRESS"):
                init()
            else:
                init(num_cpus=processes)
        cpus = int(cluster_resources().get("CPU", 0))
        if processes is None:
            processes = cpus
        if processes <= 0:
            raise ValueError("Processes in the pool must be >0.")
        if cpus < processes:
            raise ValueError(f"Tried to start a pool with {processes} processes on an existing "
                             f"cluster, but there are only {cpus} CPUs in the cluster.")
        return processes

    def _new_actor(self) -> Any:
        if self._actor_class is None:
            from runtime.remote import remote

            self._actor_class = remote(_PoolActor).options(**self._remote_args)
        return self._actor_class.remote(self._initializer, self._initargs)

    def _started_result(self) -> None:
        with self._outstanding_lock:
            self._outstanding += 1

    def _finished_result(self) -> None:
        with self._outstanding_lock:
            self._outstanding -= 1

    def _handle_results(self) -> None:
        while True:
            result = self._results.get()
            if result is not None:
                result._finished_on_handler()
            with self._outstanding_lock:
                if self._closed and self._outstanding == 0:
                    return

    # -- running -------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self._closed:
            raise ValueError("Pool not running")

    def _next_actor_index(self) -> int:
        self._next_actor = (self._next_actor + 1) % len(self._actors)
        return self._next_actor

    def _run_batch(self, actor_index: int, func: Callable, batch: List[Tuple[tuple, dict]]) -> Any:
        entry = self._actors[actor_index]
        ref = entry[0].run_batch.remote(func, batch)
        entry[1] += 1
        if self._maxtasks and entry[1] >= self._maxtasks:
            self._exits.append(entry[0].exit_after_pending.remote())
            entry[0], entry[1] = self._new_actor(), 0
        return ref

    def _chunksize(self, n: int) -> int:
        size, extra = divmod(n, len(self._actors) * 4)
        return max(1, size + (1 if extra else 0))

    def _map_refs(self, func: Callable, iterable: Iterable, chunksize: Optional[int],
                  star: bool) -> List[Any]:
        items = list(iterable)
        if chunksize is None:
            chunksize = self._chunksize(len(items))
        elif not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        refs = []
        for n, start in enumerate(range(0, len(items), chunksize)):
            chunk = items[start:start + chunksize]
            batch = [(tuple(a) if star else (a,), {}) for a in chunk]
            refs.append(self._run_batch(n % len(self._actors), func, batch))
        return refs

    def apply(self, func: Callable, args: Optional[tuple] = None,
              kwargs: Optional[dict] = None) -> Any:
        """func(*args, **kwargs) on one of the pool's actors; its result."""
        return self.apply_async(func, args, kwargs).get()

    def apply_async(self, func: Callable, args: Optional[tuple] = None,
                    kwargs: Optional[dict] = None, callback: Optional[Callable] = None,
                    error_callback: Optional[Callable] = None) -> AsyncResult:
        self._check_running()
        ref = self._run_batch(self._next_actor_index(), func, [(tuple(args or ()), kwargs or {})])
        return AsyncResult(self, [ref], True, callback, error_callback)

    def map(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None) -> List[Any]:
        """[func(x) for x in iterable], run in chunks across the actors."""
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None,
                  callback: Optional[Callable] = None,
                  error_callback: Optional[Callable] = None) -> AsyncResult:
        self._check_running()
        return AsyncResult(self, self._map_refs(func, iterable, chunksize, False), False,
                           callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable,
                chunksize: Optional[int] = None) -> List[Any]:
        """[func(*args) for args in iterable]."""
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: Optional[int] = None,
                      callback: Optional[Callable] = None,
                      error_callback: Optional[Callable] = None) -> AsyncResult:
        self._check_running()
        return AsyncResult(self, self._map_refs(func, iterable, chunksize, True), False,
                           callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> IMapIterator:
        """Lazily, in order: the next chunk goes to an actor when it finishes its last."""
        self._check_running()
        return IMapIterator(self, func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int = 1) -> IMapIterator:
        """As imap, results as they finish."""
        self._check_running()
        return IMapIterator(self, func, iterable, chunksize, ordered=False)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        """No more work may be submitted; what was submitted still runs."""
        if self._closed:
            return
        self._closed = True
        for actor, _ in self._actors:
            self._exits.append(actor.exit_after_pending.remote())
        self._results.put(None)

    def terminate(self) -> None:
        """Stop at once: the actors are killed, unfinished work is lost."""
        self.close()
        if not self._terminated:
            self._terminated = True
            self._kill_actors()

    def join(self) -> None:
        """Wait for the actors of a closed pool to finish their work and exit."""
        from runtime.api import wait

        if not self._closed:
            raise ValueError("Pool is still running")
        if self._exits:
            wait(self._exits, num_returns=len(self._exits))
        self._exits = []

    def _kill_actors(self) -> None:
        from runtime.api import kill

        for actor, _ in self._actors:
            try:
                kill(actor)
            except Exception:  # already gone, or the cluster is
                log.debug("killing a pool actor failed", exc_info=True)

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()
