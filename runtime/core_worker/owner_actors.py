"""Actor calls in the owner's state machine (owner_state.py): this caller's queue of
calls per actor, the link to the actor's worker, and what the GCS says of the actor
(alive, restarting, dead), down to a call port that will not take this caller.

ActorTransitions is a mixin of OwnerState: it works on OwnerState's state (set up in
OwnerState.__init__) and reaches the core's _resolve, _push and _fail through ``self``;
owner_tasks.py's worker_lost hands it a broken actor link (_actor_link_lost).

Actor calls queue per (caller, actor), in submission order (``seq``), and go out on one
link to the actor's worker while it is alive. Calls in flight when that link breaks
wait in ``limbo`` until the GCS says what became of the actor: restarted (they are sent
again while they have ``max_task_retries`` left) or dead (they fail with the reason).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, List, Optional

from runtime.core_worker.memory_store import Value
from runtime.core_worker.owner_actions import Action, CloseLink, Connect, WatchActor
from runtime.core_worker.owner_records import (ACTOR_ALIVE, ACTOR_DEAD, PENDING_ARGS_AVAIL,
                                               PENDING_NODE_ASSIGNMENT, ActorQueue, Error,
                                               PendingTask, WorkerLink)
from runtime.exceptions import ActorUnavailableError, RayActorError, TaskCancelledError

log = logging.getLogger("runtime.core_worker")

# Call-port connections that may fail in a row before the hello is accepted.
HANDSHAKE_ATTEMPTS = 3
# How many calls an async actor is taken to run at once, for task events (RUNNING).
ASYNC_ACTOR_CONCURRENCY = 1000


class ActorTransitions:
    """The transitions of actor calls; a part of OwnerState (module docstring)."""

    # -- actor calls -------------------------------------------------------------------------------
    def actor(self, actor_id: bytes) -> ActorQueue:
        a = self.actors.get(actor_id)
        if a is None:
            a = self.actors[actor_id] = ActorQueue(actor_id)
            if self.actors_gone is not None:
                a.death = self.actors_gone
                a.state = ACTOR_DEAD
        return a

    def submit_call(self, task: PendingTask) -> List[Action]:
        """A call from a handle: queue it for its actor, in submission order."""
        out: List[Action] = []
        a = self.actor(task.actor_id)
        self.tasks[task.task_id] = task
        self.recorder.new_task(task, "ACTOR_TASK", PENDING_ARGS_AVAIL)
        if task.generator:
            self.streams[task.task_id] = task
        if a.death is not None:
            self._fail([task], a.death, out)
            return out
        a.next_seq += 1
        task.seq = a.next_seq
        a.queue.append(task)
        task.state = PENDING_NODE_ASSIGNMENT
        if task.slot_refs:
            self._resolve(task, out)
        self._pump_actor(a, out)
        return out

    def _pump_actor(self, a: ActorQueue, out: List[Action]) -> None:
        link = a.link
        if link is None or link.dead:
            if not (a.redial and a.queue and a.endpoint is not None):
                self._watch(a, "", out)
                return
            a.redial = False
            link = self._connect(a, a.endpoint, out)
        queue = a.queue
        while queue:
            task = queue[0]
            if task.cancelled:
                queue.popleft()
                continue
            if task.waiting:
                break  # keep submission order: later calls wait for this one's arguments
            queue.popleft()
            for loc in task.arg_values:
                if loc.is_error:
                    self._fail([task], Value.from_proto(loc), out)
                    break
            else:
                self._push(task, link, None, out)

    def _watch(self, a: ActorQueue, handshake_error: str, out: List[Action]) -> None:
        if not a.watching and a.death is None:
            a.watching = True
            a.recheck_alive = False
            a.watch_handshake_error = handshake_error
            out.append(WatchActor(a))

    def _connect(self, a: ActorQueue, address: Any, out: List[Action]) -> WorkerLink:
        """A link to the actor's worker: its call port when it has one."""
        a.endpoint = address
        grpc_address = f"{address.ip}:{address.port}"
        if address.task_port:
            link = WorkerLink(address.worker_id, f"{address.ip}:{address.task_port}",
                              address.node_id, a.pid, control_address=grpc_address, actor=a,
                              call_port=True)
        else:
            # An async actor runs up to max_concurrency calls at once (Ray's default 1000):
            # the caller does not know the actor's own limit, so it takes the default.
            link = WorkerLink(address.worker_id, grpc_address, address.node_id, a.pid, actor=a,
                              concurrency=ASYNC_ACTOR_CONCURRENCY if a.is_async else 1)
        a.link = link
        out.append(Connect(link))
        return link

    def _actor_link_lost(self, link: WorkerLink, error: str, handshake_error: Optional[str],
                         out: List[Action]) -> None:
        a = link.actor
        assert a is not None
        sent = list(link.inflight.values())
        link.inflight.clear()
        if a.link is not link:  # closed by this owner already (killed): nothing was left on it
            if sent:
                a.limbo.extend(sent)
            return
        a.link = None
        if handshake_error is None:
            a.limbo.extend(sent)
            self._watch(a, "", out)
            return
        # The port never accepted the connection: none of these calls ran. They go back
        # in front of the queue, in order, their retries untouched.
        for task in sent:
            task.link = None  # queued again: cancel() fails it at once
            task.state = PENDING_NODE_ASSIGNMENT
        a.queue.extendleft(reversed(sent))
        a.handshake_failures += 1
        if a.handshake_failures < HANDSHAKE_ATTEMPTS:
            log.info("the call port of actor %s failed before accepting this caller (%s); "
                     "dialling it again", a.actor_id.hex()[:8], handshake_error)
            a.redial = True
            self._pump_actor(a, out)
        else:
            self._watch(a, handshake_error, out)

    def actor_reported(self, actor_id: bytes, version: int, state: int, address: Any = None,
                       pid: int = 0, is_async: bool = False,
                       death: Optional[Error] = None) -> List[Action]:
        """The GCS reported the actor (a watch's answer). ALIVE: connect and send what
        waits, limbo first (ALIVE at the address whose link broke is asked again once,
        ``recheck_alive``); DEAD: fail everything with `death`; otherwise keep watching.
        A watch after call-port failures that brings no news (the same version: alive
        where it was) fails what is queued with ActorUnavailableError."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is not None or not a.watching:
            return out
        if a.watch_handshake_error:
            if version == a.version:  # no news: alive where it was
                self._unreachable(a, a.watch_handshake_error, out)
                return out
            a.watch_handshake_error = ""  # it moved, restarts or died: an ordinary watch
            a.handshake_failures = 0
        a.version = version
        a.state = state
        if state == ACTOR_DEAD:
            self._dead(a, death if death is not None else RayActorError(
                f"The actor {actor_id.hex()} is dead.", actor_id=actor_id.hex()), out)
        elif state == ACTOR_ALIVE:
            if (a.limbo and not a.recheck_alive and a.endpoint is not None
                    and address is not None and address.worker_id == a.endpoint.worker_id):
                # The link to this very worker broke, yet the GCS still has it alive: its
                # own stream to the worker (which breaks at about the same moment when the
                # worker dies) has not told it yet. Ask once more, briefly, rather than
                # resend the calls to a dead worker and fail those without retries as if
                # it had restarted; no news then means the worker lives.
                a.recheck_alive = True
                return out
            a.recheck_alive = False
            a.watching = False
            a.pid = pid
            a.is_async = is_async
            self._connect(a, address, out)
            self._resend_limbo(a, out)
            self._pump_actor(a, out)
        return out

    def actor_dead(self, actor_id: bytes, error: Error) -> List[Action]:
        """The actor is dead (the GCS says so, or it cannot be asked): every call queued,
        in limbo or in flight fails with `error`, and so will later ones."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is None:
            self._dead(a, error, out)
        return out

    def actor_killed(self, actor_id: bytes, error: Error) -> List[Action]:
        """kill() returned: current, pending and future calls fail at once (the worker may
        take a moment to die, and must not run calls meanwhile)."""
        out: List[Action] = []
        a = self.actor(actor_id)
        if a.death is None:
            self._dead(a, error, out)
        return out

    def cluster_gone(self, error: Error) -> List[Action]:
        """The private cluster lost its raylet, and with it every actor's worker: fail the
        calls in flight and pending, now and from now on."""
        out: List[Action] = []
        self.actors_gone = error
        for a in self.actors.values():
            self._dead(a, error, out)
        return out

    def watch_stopped(self, actor_id: bytes) -> None:
        """The shell's watch ended without a verdict (shutdown)."""
        a = self.actors.get(actor_id)
        if a is not None:
            a.watching = False

    def _drop_link(self, a: ActorQueue, out: List[Action]) -> None:
        link = a.link
        if link is not None:
            a.limbo.extend(link.inflight.values())
            link.inflight.clear()
            link.dead = True
            a.link = None
            out.append(CloseLink(link))

    def _dead(self, a: ActorQueue, error: Error, out: List[Action]) -> None:
        self._drop_link(a, out)
        a.death = error
        a.state = ACTOR_DEAD
        a.watching = False
        pending = sorted(a.limbo, key=_seq) + list(a.queue)
        a.limbo, a.queue = [], deque()
        if pending:
            self._fail(pending, error, out)

    def _unreachable(self, a: ActorQueue, error: str, out: List[Action]) -> None:
        """The actor is alive (the GCS says so) but its call port would not take this
        caller's connection, HANDSHAKE_ATTEMPTS times in a row: fail what is queued (none
        of it ran) and let the next call dial again."""
        a.watching = False
        a.watch_handshake_error = ""
        a.handshake_failures = 0
        a.redial = True
        pending, a.queue = list(a.queue), deque()
        if not pending:
            return
        err = ActorUnavailableError(
            f"The actor {a.actor_id.hex()} ({pending[0].name.split('.', 1)[0]}) is alive but "
            f"cannot be reached: {HANDSHAKE_ATTEMPTS} connections to its call port in a row "
            f"failed before it accepted them, so the call did not run (last error: {error}). "
            f"Later calls try again.", actor_id=a.actor_id.hex())
        self._fail(pending, err, out)

    def _resend_limbo(self, a: ActorQueue, out: List[Action]) -> None:
        """The actor is alive again: calls that were in flight when its worker died go
        first, while they have retries; cancelled ones and those without retries fail."""
        limbo = sorted(a.limbo, key=_seq)
        a.limbo = []
        failed: List[PendingTask] = []
        cancelled: List[PendingTask] = []
        for task in reversed(limbo):
            if task.cancelled:
                cancelled.append(task)
            elif task.retries_left != 0:
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                task.link = None
                task.state = PENDING_NODE_ASSIGNMENT
                a.queue.appendleft(task)
            else:
                failed.append(task)
        for task in reversed(cancelled):
            self._fail([task], TaskCancelledError(task.task_id.hex()), out)
        for task in reversed(failed):
            self._fail([task], RayActorError(
                f"The actor {a.actor_id.hex()} died unexpectedly before finishing this call "
                f"({task.name}); it was restarted, but the call has no retries left "
                f"(max_task_retries).", actor_id=a.actor_id.hex()), out)


def _seq(task: PendingTask) -> int:
    return task.seq
