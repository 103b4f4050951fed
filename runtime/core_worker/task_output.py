"""What tasks print reaches the job's driver (Ray's ``log_to_driver``).

A worker's stdout and stderr are wrapped: every write still goes to the worker's
log file, and complete lines written while a task runs are also batched (about
every 100 ms, and always before the task's result, so a driver that has the
result has shown what the task printed) to the driver of that task's job, which
prints them prefixed with the task name and worker PID, as Ray does:
``(square pid=4242) hello``.

Which task wrote a line is read from the writer's own task context
(runtime/core_worker/task_context.py), and an unfinished line is kept per task, so
the concurrent calls of a threaded or async actor never mix pieces of their lines.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import grpc

from runtime.core_worker import task_context
from runtime.protocol import core_worker_pb2, core_worker_pb2_grpc

if TYPE_CHECKING:
    from runtime.core_worker.core_worker import CoreWorker

log = logging.getLogger("runtime.core_worker")
_FLUSH_S = 0.1
_MAX_PENDING_LINES = 10_000
_MAX_PARTIAL_TASKS = 1_000


class TaskOutput:
    """A text stream that tees complete lines of the running task to its driver."""

    def __init__(self, inner, forwarder: "OutputForwarder", is_stderr: bool) -> None:
        self._inner = inner
        self._fwd = forwarder
        self._is_stderr = is_stderr
        self._partial: Dict[bytes, str] = {}  # task id -> its unfinished line
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        n = self._inner.write(s)
        ctx = task_context.current.get()
        if ctx.task_id is not None and self._fwd.active():
            with self._lock:
                lines = (self._partial.pop(ctx.task_id, "") + s).split("\n")
                rest = lines.pop()
                if rest:
                    if len(self._partial) >= _MAX_PARTIAL_TASKS:
                        self._partial.clear()  # tasks that ended mid-line; never unbounded
                    self._partial[ctx.task_id] = rest
            if lines:
                self._fwd.add(lines, self._is_stderr, ctx)
        return n

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class OutputForwarder:
    def __init__(self, cw: "CoreWorker") -> None:
        self.cw = cw
        self.pending: Dict[Tuple[str, int, str, bool], List[str]] = {}
        self.count = 0
        self.dropped = 0
        self.scheduled = False
        self.lock = threading.Lock()

    def install(self) -> None:
        self.cw.output = self
        sys.stdout = TaskOutput(sys.stdout, self, is_stderr=False)
        sys.stderr = TaskOutput(sys.stderr, self, is_stderr=True)

    def active(self) -> bool:
        """Whether lines printed now go to a driver (the caller checked it runs a task)."""
        return self.cw.job_config.driver.port != 0

    def add(self, lines: List[str], is_stderr: bool,
            ctx: Optional[task_context.TaskContext] = None) -> None:
        """Writer's thread: queue lines of the task in `ctx` (default: the current one)."""
        cw = self.cw
        d = cw.job_config.driver
        key = (d.ip, d.port, task_context.print_name(ctx or task_context.current.get()),
               is_stderr)
        with self.lock:
            if self.count >= _MAX_PENDING_LINES:
                self.dropped += len(lines)
                return
            self.pending.setdefault(key, []).extend(lines)
            self.count += len(lines)
            if self.scheduled:
                return
            self.scheduled = True
        # Lines batch for _FLUSH_S (a deadline, not a wait); the flush is kept until it ends.
        cw.post(lambda: cw.loop.call_later(_FLUSH_S, lambda: cw.spawn(self._flush())))

    def has_pending(self) -> bool:
        return bool(self.pending)

    async def flush(self) -> None:
        await self._flush()

    async def _flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
            self.count = 0
            self.scheduled = False
        for (ip, port, name, is_stderr), lines in pending.items():
            stub = core_worker_pb2_grpc.CoreWorkerStub(self.cw.channel(f"{ip}:{port}"))
            try:
                await stub.PrintLines(core_worker_pb2.PrintedLines(
                    pid=os.getpid(), ip=self.cw.node_ip, task_name=name, lines=lines,
                    is_stderr=is_stderr), timeout=10)
            except grpc.RpcError:
                pass  # the driver is gone; the lines are still in the worker's log


def print_lines(msg: core_worker_pb2.PrintedLines) -> None:
    """Driver side: show a worker's lines the way Ray does."""
    prefix = f"({msg.task_name} pid={msg.pid}, ip={msg.ip}) "
    out = sys.stderr if msg.is_stderr else sys.stdout
    out.write("".join(prefix + line + "\n" for line in msg.lines))
    out.flush()
