"""Task execution inside a worker process.

Tasks arrive on PushTasks streams (loop thread) and run one at a time on the
process's main thread, so user code can use signals and a blocking get() can
lend the CPU back. Results go back on the stream they came from, batched; a
result is held until this worker's borrower registrations for it are
acknowledged, so the owner never frees an object the worker still holds.

Calls to a sync actor are the exception: they arrive on the actor's call port
and run on the thread that reads the caller's connection
(runtime/core_worker/actor_call_server.py), one at a time under `actor_lock`.
Threaded actors run calls on a pool, async actors on an event loop of their own.

Concurrency groups (Ray's ``concurrency_groups``) split an actor's calls: each group
has a pool of its own (threaded actors; a sync actor with groups is threaded) or an
event loop on a thread of its own (async actors), limited to the group's max
concurrency; calls in no group run in the default group, limited by max_concurrency.
A call's group is the one its ``.options(concurrency_group=...)`` names, else its
method's ``@method(concurrency_group=...)``, read here from the class.

A normal task with ``max_calls`` counts the runs of its function: the run that reaches
the limit returns its result marked ``worker_exiting``, the worker runs nothing more,
ends its task streams once every result has gone out, and exits (status 0).

Whichever thread or asyncio task runs a task holds its identity in a context
variable (runtime/core_worker/task_context.py), set here before the task's code
runs and reset after it, so concurrent calls each see their own task.

Cancelling a running task interrupts only that task: the SIGINT carries no
identity, so the handler raises KeyboardInterrupt only while the task it was
sent for still runs on the main thread (a late signal is dropped, never turned
into the cancel of the next task). A running async actor call is cancelled as
its asyncio task; running sync and threaded actor calls are not interrupted
(actors have state), as in Ray.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from runtime import config
from runtime.core_worker import task_context, task_logs
from runtime.core_worker.generators import GENERATOR_STREAMING, item_id
from runtime.core_worker.memory_store import Value
from runtime.core_worker.task_args import ArgSlot
from runtime.exceptions import ActorDiedError, ActorExitRequested, RayTaskError, TaskCancelledError
from runtime.protocol import common_pb2, core_worker_pb2
from runtime.runtime_env import context as runtime_env_context
from runtime.serialization import (KIND_ERROR, NONE_BYTES, format_remote_traceback, loads_function,
                                   parse, serialize, serialize_error)

log = logging.getLogger("runtime.worker")
_SITE_DIRS = ("site-packages", "dist-packages")
# How often a generator paused by back-pressure on a call port looks for a cancel.
_ACK_POLL_S = 0.1


class _GeneratorCancelled(KeyboardInterrupt):
    """A generator call was cancelled between two items: it ends as a cancelled task
    (execute() turns a KeyboardInterrupt into the cancelled result)."""


class ExecutorHost(Protocol):
    """What the executor needs of its core worker (CoreWorker implements it): the
    worker's identity, the I/O loop, the owner-side services a result needs (borrower
    registrations, large values in the store), and the job and actor it now serves."""

    worker_id: bytes
    node_ip: str
    current_actor_id: Optional[bytes]
    refs: Any

    def post(self, fn: Callable, *args: Any) -> None: ...
    def spawn(self, coro: Any) -> Any: ...
    def run(self, coro: Any, timeout: Optional[float] = None) -> Any: ...
    def exit_soon(self, delay: float) -> None: ...
    def shutdown(self, timeout: float = 5.0) -> None: ...
    def enter_job(self, job: common_pb2.JobConfig) -> None: ...
    def host_actor(self, actor_id: bytes) -> None: ...
    def results_must_wait(self) -> bool: ...
    async def flush_before_results(self) -> None: ...
    def add_borrower_at(self, owner: tuple, borrower: tuple, oid: bytes) -> None: ...
    def map_from_store(self, oid: bytes, v: Value) -> memoryview: ...
    def write_to_store(self, oid: bytes, ser: Any) -> Value: ...


class _Stream:
    """One PushTasks stream: results wait in `pending` until the stream's writer takes
    all of them as one ResultBatch (so results batch while a write is in flight)."""

    def __init__(self) -> None:
        self.pending: List[common_pb2.TaskResult] = []
        self.wake = asyncio.Event()
        self.closed = False
        self.job: Optional[common_pb2.JobConfig] = None
        self.ending = False     # the worker exits: end once every result is out
        self.posting = 0        # results waiting for a flush before they are added
        self.finished = asyncio.Event()

    def add(self, result: common_pb2.TaskResult) -> None:
        self.pending.append(result)
        self.wake.set()


class _LoopGroup:
    """A concurrency group of an async actor: an event loop on a thread of its own, and
    the semaphore (made on that loop) that holds it to `limit` calls at once."""

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        self.semaphore: Optional[asyncio.Semaphore] = None
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True,
                         name=f"actor-loop-{name}" if name else "actor-loop").start()


class UnknownConcurrencyGroup(ValueError):
    """A call names a concurrency group its actor does not define."""


class Executor:
    def __init__(self, cw: ExecutorHost) -> None:
        self.cw = cw
        self.tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self.functions: Dict[bytes, Any] = {}
        self.jobs_applied: set = set()
        # The task whose code runs on the main thread now: the only one a SIGINT may stop.
        self.running: Optional[bytes] = None
        # Actor calls running now; an async call's asyncio task, so a cancel can cancel it.
        self.running_calls: Dict[bytes, Optional[asyncio.Task]] = {}
        self.queued_cancels: set = set()
        self._interrupt_for: set = set()  # tasks a SIGINT was sent for
        # A cancel and the start of the task it names never interleave: the cancel either
        # finds the task running or leaves it in queued_cancels for its start to see.
        self._start_lock = threading.Lock()
        self._main_thread = threading.main_thread().ident
        self._exit = False
        self._base_cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.pid = os.getpid()
        self.actor: Any = None
        self.actor_gpu_ids: Tuple[int, ...] = ()
        self.actor_loop: Optional[asyncio.AbstractEventLoop] = None  # the default group's
        # Concurrency groups by name ("" the default group): an async actor's loops, a
        # threaded actor's pools; and the group of each method that names one.
        self.loop_groups: Dict[str, _LoopGroup] = {}
        self.actor_pools: Dict[str, Any] = {}
        self.method_groups: Dict[str, str] = {}
        self.streams: set = set()     # PushTasks streams being served
        self.max_calls_runs: Dict[bytes, int] = {}  # function id -> runs (max_calls only)
        self.creation_stream: Optional[_Stream] = None
        self.creation_task_id = b""
        self.creation_spec = None  # the actor's creation TaskSpec (its placement group)
        self.cancelled_running: set = set()  # running tasks cancel() was called for
        self.actor_exiting = False
        self.actor_lock = threading.Lock()  # a sync actor runs one call at a time
        self.call_server = None  # ActorCallServer, for a sync actor
        # Generator tasks under back-pressure: items their owner has consumed, by task.
        self._acks: Dict[bytes, int] = {}
        self._ack_cond = threading.Condition()
        # Async generators waiting for acks: task id -> (their loop, the event to set).
        self._ack_events: Dict[bytes, Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}

    # -- loop thread ------------------------------------------------------------------------------
    async def serve_stream(self, request_iterator):
        stream = _Stream()
        if self._exit:
            return  # exiting (max_calls): nothing sent now would run
        self.streams.add(stream)
        reader = asyncio.ensure_future(self._read(stream, request_iterator))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.pending:
                    batch = core_worker_pb2.ResultBatch(results=stream.pending)
                    stream.pending = []
                    yield batch
                if stream.closed or (stream.ending and not stream.posting
                                     and not stream.pending):
                    return
        finally:
            reader.cancel()
            self.streams.discard(stream)
            stream.finished.set()

    async def _read(self, stream: _Stream, request_iterator) -> None:
        try:
            async for batch in request_iterator:
                if batch.HasField("job_config"):
                    stream.job = batch.job_config
                for spec in batch.tasks:
                    if spec.generator_ack:
                        self.generator_ack(spec.task_id, spec.generator_ack)
                        continue
                    self.tasks.put((spec, stream))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.debug("task stream closed", exc_info=True)
        finally:
            stream.closed = True
            stream.wake.set()

    def generator_ack(self, task_id: bytes, consumed: int) -> None:
        """The owner has consumed `consumed` items of generator task `task_id` (from a
        task stream's reader, or a call port's thread). Only a generator running under
        back-pressure here keeps the count: an ack that comes after it ended (its last
        items are consumed later) is dropped, not kept forever."""
        with self._ack_cond:
            if consumed > self._acks.get(task_id, consumed):
                self._acks[task_id] = consumed
                self._ack_cond.notify_all()
                waiter = self._ack_events.get(task_id)
                if waiter is not None:
                    waiter[0].call_soon_threadsafe(waiter[1].set)

    def _post_result(self, stream: _Stream, result: common_pb2.TaskResult) -> None:
        if self.must_flush():
            stream.posting += 1
            self.cw.spawn(self._post_after_flush(stream, result))
            return
        stream.add(result)

    def must_flush(self) -> bool:
        """Borrower registrations (and what the task printed) go out before its result."""
        return self.cw.results_must_wait()

    async def flush(self) -> None:
        await self.cw.flush_before_results()

    async def _post_after_flush(self, stream: _Stream, result) -> None:
        try:
            await self.flush()
        finally:
            stream.posting -= 1
            stream.add(result)

    def cancel(self, task_id: bytes, force: bool) -> bool:
        """Loop thread (CancelTask). A running task on the main thread is interrupted, a
        running async actor call has its asyncio task cancelled, a running sync or
        threaded actor call runs to its end (as in Ray: an actor has state), and a task
        not started yet is dropped when it comes up."""
        with self._start_lock:
            if task_id in self.running_calls or self.running == task_id:
                self.cancelled_running.add(task_id)
            if task_id in self.running_calls:
                call = self.running_calls[task_id]
                if call is not None:
                    call.get_loop().call_soon_threadsafe(call.cancel)
                    how = "a running async actor call, cancelling its asyncio task"
                else:
                    how = "a running actor call, not interrupted"
            elif self.running == task_id:
                self._interrupt_for.add(task_id)
                signal.pthread_kill(self._main_thread, signal.SIGINT)
                how = "interrupting it"
            else:
                self.queued_cancels.add(task_id)
                how = "not running here, it will not run"
        log.info("cancel of %s: %s", task_id.hex(), how)
        return True

    def is_cancelled(self, task_id: bytes) -> bool:
        """Whether cancel() was called for this task while it ran (is_canceled())."""
        return task_id in self.cancelled_running

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """Main thread, between two bytecodes of whatever runs there. A cancel's SIGINT may
        be handled after its task has ended (even inside the next task): it stops only the
        task it was sent for, and only while that task's code still runs; any other SIGINT
        is dropped (the raylet stops workers with SIGTERM/SIGKILL, never SIGINT)."""
        task_id = self.running
        if task_id is not None and task_id in self._interrupt_for:
            self._interrupt_for.discard(task_id)
            raise KeyboardInterrupt

    def request_exit(self) -> None:
        self._exit = True
        self.tasks.put((None, None))

    # -- main thread --------------------------------------------------------------------------------
    def run_forever(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            try:
                spec, stream = self.tasks.get()
            except KeyboardInterrupt:
                continue  # only from a handler the user's code installed
            if spec is None:
                return
            if self._dispatch_concurrent(spec, stream):
                continue
            try:
                if spec.actor_id and not spec.actor_creation:
                    result = self.execute_call(spec, stream)
                else:
                    result = self.execute(spec, stream)
            except KeyboardInterrupt:  # only from a handler the user's code installed
                result = self._cancelled_result(spec)
            if spec.max_calls and self._max_calls_reached(spec, result):
                result.worker_exiting = True
                self.cw.post(self._post_result, stream, result)
                self._exit_after_max_calls(spec)
                return
            self.cw.post(self._post_result, stream, result)

    def _max_calls_reached(self, spec: common_pb2.TaskSpec, result: common_pb2.TaskResult
                           ) -> bool:
        """Count a run of the task's function (a cancelled task is no run): whether it
        was the function's max_calls-th on this worker."""
        if result.cancelled:
            return False
        runs = self.max_calls_runs.get(spec.function_id, 0) + 1
        self.max_calls_runs[spec.function_id] = runs
        return runs >= spec.max_calls

    def _exit_after_max_calls(self, spec: common_pb2.TaskSpec) -> None:
        """Main thread: take no more tasks, let every result go out and the task streams
        end, then shut the core worker down; run_forever returns and the process exits.
        A task sent after the last one never runs here: its owner sends it elsewhere."""
        self._exit = True
        log.info("exiting: this worker ran %s %d times, its max_calls", spec.name,
                 spec.max_calls)
        try:
            self.cw.run(self._end_streams(), timeout=10.0)
        except Exception:  # a stream that does not end in time is cut by the exit
            log.warning("not every task stream ended before the max_calls exit",
                        exc_info=True)
        self.cw.shutdown(timeout=5.0)

    async def _end_streams(self) -> None:
        streams = list(self.streams)
        for stream in streams:
            stream.ending = True
            stream.wake.set()
        for stream in streams:
            await stream.finished.wait()

    def execute_call(self, spec: common_pb2.TaskSpec, stream) -> common_pb2.TaskResult:
        """A sync actor call, on whichever thread received it: one at a time."""
        with self.actor_lock:
            return self.execute(spec, stream)

    def execute(self, spec: common_pb2.TaskSpec, stream: _Stream) -> common_pb2.TaskResult:
        """Run a task, an actor creation (main thread) or a sync or threaded actor call
        (the thread it came on), in a task context of its own."""
        task_id = spec.task_id
        call = bool(spec.actor_id) and not spec.actor_creation
        generated: Tuple[int, list] = (0, [])
        with self._start_lock:
            if task_id in self.queued_cancels:
                self.queued_cancels.discard(task_id)
                return self._cancelled_result(spec)
            if call:
                self.running_calls[task_id] = None
            else:
                self._interrupt_for.clear()  # sent for tasks that have ended
                self.running = task_id
        token = task_context.enter(task_id, spec.name,
                                   self.actor_gpu_ids if call else spec.gpu_ids,
                                   bool(spec.actor_id), spec)
        task_logs.begin(task_id, spec.attempt, call)
        start = time.perf_counter()
        wall_start = time.time()
        try:
            try:
                fn, args, kwargs = self._prepare(spec, stream, call)
                if call:
                    value = fn(*args, **kwargs)
                    if spec.generator:
                        generated = self._drain(spec, stream, value)
                        value = None
                else:
                    try:
                        value = fn(*args, **kwargs)
                        if spec.generator:  # its items are its run: a cancel stops them
                            generated = self._drain(spec, stream, value)
                            value = None
                    finally:
                        self.running = None  # from here on a late SIGINT is dropped
                if spec.actor_creation:
                    self._actor_created(spec, stream, value)
                    value = None
                returns = self._returns(spec, value)
                app_error = False
            except KeyboardInterrupt:  # a cancel (or the task's own), as in Ray
                return self._cancelled_result(spec)
            except ActorExitRequested:
                return self._actor_exit(spec)
            except Exception as exc:
                returns = self._error_returns(spec, exc)
                app_error = True
        finally:
            if call:
                self.running_calls.pop(task_id, None)
            else:
                self.running = None
            self.cancelled_running.discard(task_id)
            task_logs.end(task_id, spec.attempt, call)
            task_context.leave(token)
        result = common_pb2.TaskResult(task_id=task_id, returns=returns, app_error=app_error,
                                       exec_seconds=time.perf_counter() - start,
                                       attempt=spec.attempt, start_time=wall_start,
                                       end_time=time.time(), worker_pid=self.pid,
                                       actor_task_port=self._call_port(spec, app_error))
        if spec.generator:
            self._generated(result, generated)
        return result

    # -- generator tasks (runtime/core_worker/generators.py) ----------------------------------
    def _generated(self, result: common_pb2.TaskResult, generated: Tuple[int, list]) -> None:
        count, unstreamed = generated
        result.is_generator = True
        result.stream_count = count
        if not result.app_error:
            result.returns.extend(unstreamed)

    def _streams(self, spec: common_pb2.TaskSpec, stream: Any) -> bool:
        """Whether items go back as they are yielded: a streaming generator, on a task
        stream or a sync actor's call port alike (num_returns="dynamic" sends its items
        in the final result)."""
        return spec.generator == GENERATOR_STREAMING

    def _item(self, spec: common_pb2.TaskSpec, stream: Any, index: int, value: Any,
              error: bool, unstreamed: list) -> None:
        loc = self._store_value(item_id(spec.task_id, index),
                                self._task_error(spec, value) if error else value,
                                spec.owner, kind_error=error)
        if not self._streams(spec, stream):
            unstreamed.append(loc)
            return
        item = common_pb2.TaskResult(task_id=spec.task_id, stream_item=True, item_index=index,
                                     returns=[loc], attempt=spec.attempt)
        if isinstance(stream, _Stream):
            self.cw.post(self._post_result, stream, item)
        else:  # a call port's connection: its own thread (this one) writes it now
            stream.send_item(item)

    def _drain(self, spec: common_pb2.TaskSpec, stream: Any, gen: Any) -> Tuple[int, list]:
        """Run a generator to its end, sending each item as it comes; an exception it
        raises is its last item (the items before it are delivered). It stops early,
        closed so its finally blocks run, when the caller's stream closes or the call is
        cancelled: an actor call is never interrupted, but between two items a generator
        is at a point it chose. (count, items that go in the final result)."""
        if not inspect.isgenerator(gen) and not hasattr(gen, "__next__"):
            raise TypeError(f"{spec.name} was called as a generator task (num_returns="
                            f"'streaming' or 'dynamic') but returned a "
                            f"{type(gen).__name__}, not a generator; use yield in it")
        streaming = self._streams(spec, stream)
        limit = spec.generator_backpressure if streaming else 0
        task_id = spec.task_id
        cancelled = self.cancelled_running
        unstreamed: list = []
        count = 0
        if limit:
            with self._ack_cond:
                self._acks[task_id] = spec.generator_consumed
        try:
            while True:
                if task_id in cancelled:
                    raise _GeneratorCancelled
                if streaming and stream.closed:
                    break  # the owner's stream is gone: nobody reads further items
                if limit and not self._wait_consumed(task_id, count, limit, stream):
                    break
                try:
                    item = next(gen)
                except StopIteration:
                    break
                except (KeyboardInterrupt, ActorExitRequested):
                    raise
                except Exception as exc:
                    self._item(spec, stream, count, exc, True, unstreamed)
                    count += 1
                    break
                self._item(spec, stream, count, item, False, unstreamed)
                count += 1
        finally:
            if limit:
                with self._ack_cond:
                    self._acks.pop(task_id, None)
            close = getattr(gen, "close", None)
            if close is not None:
                close()  # a cancel or a gone owner ends it: its finally blocks run now
        return count, unstreamed

    def _wait_consumed(self, task_id: bytes, produced: int, limit: int, stream: Any) -> bool:
        """Back-pressure: wait until fewer than `limit` items are unconsumed; False if the
        stream closed meanwhile. A cancel ends the wait (a task's SIGINT at once, an actor
        call's flag within a poll). On a call port the acks come on the socket this thread
        serves, so it reads them itself (and keeps the calls that come meanwhile)."""
        acks = self._acks
        if isinstance(stream, _Stream):
            with self._ack_cond:
                while produced - acks.get(task_id, 0) >= limit:
                    if stream.closed:
                        return False
                    if task_id in self.cancelled_running:
                        raise _GeneratorCancelled
                    self._ack_cond.wait(0.2)
            return True
        while produced - acks.get(task_id, 0) >= limit:
            if stream.closed:
                return False
            if task_id in self.cancelled_running:
                raise _GeneratorCancelled
            stream.read(_ACK_POLL_S)
        return True

    async def _drain_async(self, spec: common_pb2.TaskSpec, stream: Any, gen: Any
                           ) -> Tuple[int, list]:
        """_drain for an async actor's call: an async generator, or a sync one."""
        if not inspect.isasyncgen(gen):
            try:
                return self._drain(spec, stream, gen)
            except _GeneratorCancelled:
                raise asyncio.CancelledError from None  # as a cancelled async call ends
        limit = spec.generator_backpressure if self._streams(spec, stream) else 0
        unstreamed: list = []
        count = 0
        acked = asyncio.Event()
        if limit:
            with self._ack_cond:
                self._acks[spec.task_id] = spec.generator_consumed
                self._ack_events[spec.task_id] = (asyncio.get_running_loop(), acked)
        try:
            while True:
                while limit and count - self._acks.get(spec.task_id, 0) >= limit:
                    if getattr(stream, "closed", False):
                        return count, unstreamed
                    acked.clear()
                    if count - self._acks.get(spec.task_id, 0) >= limit:  # none came meanwhile
                        try:  # woken by _generator_ack; the bound rechecks `closed`
                            await asyncio.wait_for(acked.wait(), 0.2)
                        except asyncio.TimeoutError:
                            pass
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
                except (asyncio.CancelledError, ActorExitRequested):
                    raise
                except Exception as exc:
                    self._item(spec, stream, count, exc, True, unstreamed)
                    count += 1
                    break
                self._item(spec, stream, count, item, False, unstreamed)
                count += 1
        finally:
            if limit:
                with self._ack_cond:
                    self._acks.pop(spec.task_id, None)
                    self._ack_events.pop(spec.task_id, None)
            await gen.aclose()
        return count, unstreamed

    def _call_port(self, spec: common_pb2.TaskSpec, app_error: bool) -> int:
        if not spec.actor_creation or app_error or self.call_server is None:
            return 0
        return self.call_server.port

    def _prepare(self, spec: common_pb2.TaskSpec, stream: _Stream, call: bool):
        """(callable, args, kwargs) for a task, an actor creation or an actor call."""
        cw = self.cw
        if self.actor_exiting and spec.actor_id:
            raise ActorExitRequested()  # calls that arrive after exit_actor() fail the same way
        job = stream.job
        if job is not None:
            cw.enter_job(job)
            if job.job_id not in self.jobs_applied:
                self._apply_job(job)
        if call:
            if self.actor is None or spec.actor_id != cw.current_actor_id:
                raise RuntimeError(f"this worker does not host actor {spec.actor_id.hex()}")
            if spec.concurrency_group and not (self.loop_groups or self.actor_pools):
                raise UnknownConcurrencyGroup(
                    f"{spec.name}: the actor has no concurrency groups, so it has no group "
                    f"{spec.concurrency_group!r}; define it in @remote(concurrency_groups=...)")
            method = getattr(self.actor, spec.method_name)
            args, kwargs = self._args(spec)
            return method, args, kwargs
        # Tasks run one at a time on the main thread, so the process-wide environment can
        # follow the task (the placement group follows it in the task context).
        self._set_visible_gpus(spec.gpu_ids)
        fn = self._function(spec)
        args, kwargs = self._args(spec)
        if spec.actor_creation:
            cw.host_actor(spec.actor_id)
            self.actor_gpu_ids = tuple(spec.gpu_ids)
            self.creation_stream = stream
            self.creation_task_id = spec.task_id
            self.creation_spec = spec
        return fn, args, kwargs

    # -- actors ---------------------------------------------------------------------------------------
    def _actor_created(self, spec: common_pb2.TaskSpec, stream: _Stream, instance: Any) -> None:
        self.actor = instance
        cls = type(instance)
        members = inspect.getmembers(cls, callable)
        is_async = any(inspect.iscoroutinefunction(m) or inspect.isasyncgenfunction(m)
                       for _n, m in members)
        limit = spec.max_concurrency or (1000 if is_async else 1)
        groups = dict(spec.concurrency_groups)
        self.method_groups = {
            n: g for n, m in members
            if (g := (getattr(m, "__runtime_method_options__", None) or {}).get(
                "concurrency_group"))}
        lost = sorted({g for g in self.method_groups.values() if g not in groups})
        if lost:
            raise RuntimeError(
                f"actor {spec.name}: its methods run in concurrency groups {lost}, which its "
                f"creation spec does not define (the caller's concurrency_groups did not "
                f"reach this worker)")
        if is_async:
            self.loop_groups = {name: _LoopGroup(name, n)
                                for name, n in [("", limit), *groups.items()]}
            self.actor_loop = self.loop_groups[""].loop
        elif limit > 1 or groups:
            from concurrent.futures import ThreadPoolExecutor

            self.actor_pools = {
                name: ThreadPoolExecutor(max_workers=n, thread_name_prefix=(
                    f"actor-{name}" if name else "actor"))
                for name, n in [("", limit), *groups.items()]}
        else:
            from runtime.core_worker.actor_call_server import ActorCallServer

            try:
                self.call_server = ActorCallServer(self)
            except Exception:  # calls then come through the main port, as tasks do
                log.warning("no call port for actor %s; calls take the task path",
                            spec.actor_id.hex(), exc_info=True)

    def _dispatch_concurrent(self, spec: common_pb2.TaskSpec, stream: _Stream) -> bool:
        """Run an actor call off the main thread when the actor is async or threaded, in
        its concurrency group."""
        if not spec.actor_id or spec.actor_creation:
            return False
        if self.loop_groups:
            group = self._call_group(spec, stream, self.loop_groups)
            if group is not None:
                asyncio.run_coroutine_threadsafe(self._execute_async(spec, stream, group),
                                                 group.loop)
            return True
        if self.actor_pools:
            pool = self._call_group(spec, stream, self.actor_pools)
            if pool is not None:
                pool.submit(self._execute_and_post, spec, stream)
            return True
        return False

    def _call_group(self, spec: common_pb2.TaskSpec, stream: _Stream, groups: Dict[str, Any]):
        """The group (loop or pool) an actor call runs in; None when it names a group the
        actor lacks, whose call has then failed with the reason."""
        name = spec.concurrency_group or self.method_groups.get(spec.method_name, "")
        group = groups.get(name)
        if group is None:
            known = sorted(g for g in groups if g)
            exc = UnknownConcurrencyGroup(
                f"{spec.name}: the actor has no concurrency group {name!r} (its groups: "
                f"{known or 'none'}); define it in @remote(concurrency_groups=...) on the class")
            self.cw.post(self._post_result, stream, common_pb2.TaskResult(
                task_id=spec.task_id, returns=self._error_returns(spec, exc), app_error=True,
                attempt=spec.attempt, worker_pid=self.pid))
        return group

    def on_actor_loop(self) -> bool:
        """Whether the caller runs on one of this async actor's event loops (exit_actor)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return any(g.loop is loop for g in self.loop_groups.values())

    def _execute_and_post(self, spec: common_pb2.TaskSpec, stream: _Stream) -> None:
        result = self.execute(spec, stream)
        self.cw.post(self._post_result, stream, result)

    async def _execute_async(self, spec: common_pb2.TaskSpec, stream: _Stream,
                             group: _LoopGroup) -> None:
        """An async actor call, as an asyncio task of its group's loop: cancel() cancels it
        whether it waits for a slot (the group's max concurrency) or runs."""
        task_id = spec.task_id
        with self._start_lock:
            if task_id in self.queued_cancels:
                self.queued_cancels.discard(task_id)
                self.cw.post(self._post_result, stream, self._cancelled_result(spec))
                return
            self.running_calls[task_id] = asyncio.current_task()
        try:
            if group.semaphore is None:
                group.semaphore = asyncio.Semaphore(group.limit)
            async with group.semaphore:
                result = await self._run_async(spec, stream)
        except asyncio.CancelledError:  # while it waited for a slot
            result = self._cancelled_result(spec)
        finally:
            self.running_calls.pop(task_id, None)
        self.cw.post(self._post_result, stream, result)

    async def _run_async(self, spec: common_pb2.TaskSpec, stream: _Stream) -> common_pb2.TaskResult:
        generated: Tuple[int, list] = (0, [])
        token = task_context.enter(spec.task_id, spec.name, self.actor_gpu_ids, True, spec)
        task_logs.begin(spec.task_id, spec.attempt, True)
        start = time.perf_counter()
        wall_start = time.time()
        try:
            fn, args, kwargs = self._prepare(spec, stream, True)
            value = fn(*args, **kwargs)
            if spec.generator:
                generated = await self._drain_async(spec, stream, value)
                value = None
            elif inspect.isawaitable(value):
                value = await value
            returns = self._returns(spec, value)
            app_error = False
        except asyncio.CancelledError:  # cancel(), as asyncio cancels: the coroutine saw it
            return self._cancelled_result(spec)
        except ActorExitRequested:
            return self._actor_exit(spec)
        except Exception as exc:
            returns = self._error_returns(spec, exc)
            app_error = True
        finally:
            self.cancelled_running.discard(spec.task_id)
            task_logs.end(spec.task_id, spec.attempt, True)
            task_context.leave(token)
        result = common_pb2.TaskResult(task_id=spec.task_id, returns=returns, app_error=app_error,
                                       exec_seconds=time.perf_counter() - start,
                                       attempt=spec.attempt, start_time=wall_start,
                                       end_time=time.time(), worker_pid=self.pid)
        if spec.generator:
            self._generated(result, generated)
        return result

    def _actor_exit(self, spec: common_pb2.TaskSpec) -> common_pb2.TaskResult:
        """exit_actor(): fail this call, tell the GCS not to restart, then exit the process."""
        reason = "the actor exited intentionally (exit_actor())"
        first = not self.actor_exiting
        self.actor_exiting = True
        err = ActorDiedError(f"The actor {spec.actor_id.hex()} is dead: {reason}",
                             actor_id=spec.actor_id.hex())
        data = serialize_error(err).to_bytes()
        result = common_pb2.TaskResult(task_id=spec.task_id, app_error=True, returns=[
            common_pb2.ObjectLocation(object_id=oid, inline_data=data, is_error=True, size=len(data))
            for oid in spec.return_ids])
        if first:
            notice = common_pb2.TaskResult(task_id=self.creation_task_id or b"", actor_exit=True,
                                           exit_reason=reason)
            if self.creation_stream is not None:
                self.cw.post(self._post_result, self.creation_stream, notice)
            self.cw.exit_soon(0.2)
        return result

    def _apply_job(self, job: common_pb2.JobConfig) -> None:
        """Make the driver's importable modules importable here, and start where the
        driver runs. A runtime_env's py_modules and working_dir come first on sys.path,
        and its working_dir stays the current directory, as in Ray. In a pip runtime_env's
        venv the driver's site-packages are left out: they would shadow the packages the
        environment installed (the node's own stay visible, after the venv's)."""
        setup = runtime_env_context.worker_setup()
        for path in reversed(list(job.sys_path)):
            if not path or path in sys.path:
                continue
            if setup.pip and os.path.basename(path.rstrip("/")) in _SITE_DIRS:
                continue
            sys.path.insert(0, path)
        for path in reversed(setup.sys_path):
            if path in sys.path:
                sys.path.remove(path)
            sys.path.insert(0, path)
        cwd = setup.working_dir or job.cwd
        if cwd and os.path.isdir(cwd):
            try:
                os.chdir(cwd)
            except OSError:
                pass
        self.jobs_applied.add(job.job_id)

    def _function(self, spec: common_pb2.TaskSpec) -> Any:
        fn = self.functions.get(spec.function_id)
        if fn is None:
            if not spec.function_blob:
                raise RuntimeError(f"function {spec.name} was not sent to this worker")
            fn = loads_function(spec.function_blob)
            self.functions[spec.function_id] = fn
        return fn

    def _args(self, spec: common_pb2.TaskSpec):
        if not spec.args:
            return (), {}
        _kind, (args, kwargs) = parse(spec.args)
        if spec.arg_values:
            values = [self._arg_value(loc) for loc in spec.arg_values]
            args = [values[a.index] if type(a) is ArgSlot else a for a in args]
            kwargs = {k: values[v.index] if type(v) is ArgSlot else v for k, v in kwargs.items()}
        return args, kwargs

    def _arg_value(self, loc: common_pb2.ObjectLocation) -> Any:
        v = Value.from_proto(loc)
        data = self.cw.map_from_store(loc.object_id, v) if v.in_store else v.data
        kind, value = parse(data)
        if kind == KIND_ERROR:
            raise value
        return value

    def _set_visible_gpus(self, gpu_ids) -> None:
        """CUDA_VISIBLE_DEVICES is process-wide: it follows the task on the main thread (one
        at a time), and an actor's process keeps the GPUs of its lease for all its calls
        (as Ray sets it per worker), so concurrent calls never rewrite it."""
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
        elif self._base_cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self._base_cuda

    def _returns(self, spec: common_pb2.TaskSpec, value: Any) -> List[common_pb2.ObjectLocation]:
        n = len(spec.return_ids)
        if n == 1:
            if value is None:
                return [common_pb2.ObjectLocation(object_id=spec.return_ids[0],
                                                  inline_data=NONE_BYTES, size=len(NONE_BYTES))]
            values = [value]
        elif n == 0:
            return []
        else:
            try:
                values = list(value)
            except TypeError:
                raise ValueError(f"task {spec.name} declared num_returns={n} but returned a "
                                 f"non-iterable {type(value).__name__}") from None
            if len(values) != n:
                raise ValueError(f"task {spec.name} declared num_returns={n} but returned "
                                 f"{len(values)} values")
        return [self._store_value(oid, v, spec.owner) for oid, v in zip(spec.return_ids, values)]

    def _store_value(self, oid: bytes, value: Any, caller: common_pb2.Address,
                     kind_error: bool = False) -> common_pb2.ObjectLocation:
        cw = self.cw
        ser = serialize_error(value) if kind_error else serialize(value)
        loc = common_pb2.ObjectLocation(object_id=oid, size=ser.total_size, is_error=kind_error)
        if ser.contained:
            caller_addr = (caller.ip, caller.port, caller.worker_id)
            for ref in ser.contained:
                owner = ref._owner
                loc.contained.add(object_id=ref._id, owner=common_pb2.Address(
                    ip=owner[0], port=owner[1], worker_id=owner[2]))
                if owner[2] == caller.worker_id:
                    continue  # the caller owns it and will count it as contained
                if owner[2] == cw.worker_id:
                    cw.refs.add_borrower(ref._id, caller_addr)
                else:
                    cw.add_borrower_at(owner, caller_addr, ref._id)
        if ser.total_size <= config.INLINE_OBJECT_MAX_BYTES:
            loc.inline_data = ser.to_bytes()
        else:
            v = cw.write_to_store(oid, ser)
            loc.in_store = True
            loc.node_id = v.node_id
            loc.store_address = v.store_address
        return loc

    def _task_error(self, spec: common_pb2.TaskSpec, exc: BaseException) -> RayTaskError:
        cause = exc
        if isinstance(exc, RayTaskError):
            cause = exc.cause if exc.cause is not None else exc
        return RayTaskError(spec.name or "task", format_remote_traceback(exc), cause,
                            pid=os.getpid(), ip=self.cw.node_ip,
                            actor_repr=repr(self.actor) if spec.actor_id and self.actor is not None
                            and not spec.actor_creation else None,
                            actor_id=spec.actor_id.hex() if spec.actor_id else None)

    def _error_returns(self, spec: common_pb2.TaskSpec, exc: BaseException):
        err = self._task_error(spec, exc)
        loc = self._store_value(spec.return_ids[0], err, spec.owner, kind_error=True) \
            if spec.return_ids else None
        out = []
        for oid in spec.return_ids:
            c = common_pb2.ObjectLocation()
            c.CopyFrom(loc)
            c.object_id = oid
            out.append(c)
        return out

    def _cancelled_result(self, spec: common_pb2.TaskSpec) -> common_pb2.TaskResult:
        data = serialize_error(TaskCancelledError(spec.task_id.hex())).to_bytes()
        return common_pb2.TaskResult(task_id=spec.task_id, cancelled=True, app_error=True,
                                     returns=[common_pb2.ObjectLocation(
                                         object_id=oid, inline_data=data, is_error=True,
                                         size=len(data)) for oid in spec.return_ids])
