"""The memory monitor in the owner's state machine (owner_state.py): tasks whose worker
a raylet's memory monitor killed follow Ray's OOM retry policy.

OomTransitions is a mixin of OwnerState: it works on OwnerState's state (set up in
OwnerState.__init__); owner_tasks.py's worker_lost hands it each task of a broken link
that carries the monitor's notice (_killed_for_memory), and it reaches the core's _fail
and owner_tasks.py's _requeue through ``self``.

A worker the raylet's memory monitor kills is announced first (``worker_killed``, the
raylet's WorkerKilled notice, written before its SIGKILL): the link is marked, and when
it breaks its tasks follow Ray's OOM retry policy instead of the crash one. A task
created with max_retries=0 fails with OutOfMemoryError (the monitor's text); any other
runs again after a backoff (1 s, doubling, at most 60 s: ``RetryLater``, then
``retry_due``) without using its max_retries, up to TASK_OOM_RETRIES times (-1, the
default: no limit), then fails with OutOfMemoryError. Each such retry is a warning in
the owner's log. A notice that arrives after the link broke (the two travel on
different streams, so the worker's death could be seen first) finds no link and
changes nothing: the tasks were already handled as after any worker death (retried
using max_retries, or failed with WorkerCrashedError). Nothing is lost or run twice
that way; only the error does not say "memory".
"""
from __future__ import annotations

import logging
from typing import List

from runtime.core_worker.owner_actions import Action, RetryLater, Warn
from runtime.core_worker.owner_records import PENDING_NODE_ASSIGNMENT, PendingTask, WorkerLink
from runtime.exceptions import OutOfMemoryError

log = logging.getLogger("runtime.core_worker")

# Ray's backoff before a task the memory monitor killed runs again: the first figure,
# doubling per kill of the same task, at most the second (task_oom_retry_delay_base_ms).
OOM_RETRY_DELAY_S = (1.0, 60.0)


class OomTransitions:
    """The transitions of tasks the memory monitor killed; a part of OwnerState (module
    docstring)."""

    # -- the memory monitor ------------------------------------------------------------------------
    def worker_killed(self, worker_id: bytes, message: str) -> List[Action]:
        """A raylet's memory monitor is killing this worker (`message`: why, with the
        figures). Its link is marked: when it breaks, its tasks follow the OOM retry
        policy. A notice for a link already lost changes nothing (module docstring)."""
        link = self.links.get(worker_id)
        if link is None or link.dead:
            log.info("the memory monitor killed worker %s, whose loss was already handled as "
                     "an ordinary worker death", worker_id.hex()[:8])
            return []
        link.oom = message or "Task was killed due to the node running low on memory."
        return []

    def _killed_for_memory(self, task: PendingTask, link: WorkerLink, out: List[Action]) -> None:
        """Ray's OOM retry policy: max_retries=0 fails at once, others run again after a
        backoff, not using max_retries, while TASK_OOM_RETRIES allows."""
        message = link.oom
        task.oom_kills += 1
        if task.oom_retries_left == 0:
            if task.oom_kills > 1 or task.retries_left != 0:
                message += (f"\n\nThe task was killed for memory {task.oom_kills} times and "
                            f"has no OOM retries left (RAY_task_oom_retries / "
                            f"RUNTIME_TASK_OOM_RETRIES={self.settings.TASK_OOM_RETRIES}).")
            self._fail([task], OutOfMemoryError(message), out)
            return
        if task.oom_retries_left > 0:
            task.oom_retries_left -= 1
        first, most = OOM_RETRY_DELAY_S
        delay = min(most, first * 2 ** (task.oom_kills - 1))
        task.attempt += 1
        task.link = None
        task.lease = None
        task.state = PENDING_NODE_ASSIGNMENT
        self.recorder.requeued_task(task)
        left = ("infinite" if task.oom_retries_left < 0 else str(task.oom_retries_left))
        figures = message.split("\n", 2)[1] if "\n" in message else message
        out.append(Warn(
            f"Task {task.name} failed due to oom: the memory monitor of node "
            f"{link.node_id.hex()[:8]} killed its worker (pid {link.pid}). It runs again in "
            f"{delay:g}s (attempt {task.attempt}), without using its max_retries; there are "
            f"{left} oom retries remaining. {figures}"))
        out.append(RetryLater(task, delay))

    def retry_due(self, task: PendingTask) -> List[Action]:
        """The backoff of a task the memory monitor killed is over: queue it again, unless
        it was cancelled (and failed) meanwhile."""
        out: List[Action] = []
        if task.done or task.link is not None or task.cancelled:
            return out
        self._requeue(task, out, record=False)
        return out
