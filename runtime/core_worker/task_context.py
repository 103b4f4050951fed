"""Which task the calling code runs in: a context variable, not a process global.

A worker may run several tasks at once (threaded actors, async actors, one thread per
call-port connection), so "the current task" belongs to the thread or asyncio task
that runs it. ``CoreWorker.current_task_id`` and friends read this variable; the
executor sets it around each task (``enter``/``leave``), in the thread or asyncio task
that runs the task, so a value never leaks into the next task on that thread.

Code on the runtime-io loop thread runs in no task: whatever it needs of the task that
caused it (a parent task id, a printed line's prefix) must be captured in the task's
own thread and passed along.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What get_runtime_context(), get_gpu_ids() and printed-line prefixes need.

    ``name`` is the task's full name (``Cls.method`` for an actor call); ``gpu_ids`` are
    the GPUs of the task's lease, or of the actor for its calls."""

    task_id: Optional[bytes] = None
    name: str = ""
    gpu_ids: Tuple[int, ...] = ()
    is_actor: bool = False
    spec: Any = None  # the TaskSpec it runs from (get_runtime_context reads it)


NO_TASK = TaskContext()
current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("runtime_task",
                                                                      default=NO_TASK)


def enter(task_id: bytes, name: str, gpu_ids: Sequence[int] = (),
          is_actor: bool = False, spec: Any = None) -> contextvars.Token:
    """Make `task_id` the current task of this thread / asyncio task; give the token to
    leave() in the same thread / asyncio task when the task ends."""
    return current.set(TaskContext(task_id, name, tuple(gpu_ids), is_actor, spec))


def leave(token: contextvars.Token) -> None:
    current.reset(token)


def get() -> TaskContext:
    return current.get()


def print_name(ctx: TaskContext) -> str:
    """The name a printed line is prefixed with: the task's, or the actor's class (Ray's)."""
    if ctx.is_actor:
        return ctx.name.split(".", 1)[0]
    return ctx.name or "task"
