"""Normal tasks in the owner's state machine (owner_state.py): submission, the queue of
each scheduling key, leases (requested, granted, spilled back, returned when idle),
results, retries after application errors and worker deaths, workers that reach
max_calls, and raylets that go away.

TaskTransitions is a mixin of OwnerState: it works on OwnerState's state (set up in
OwnerState.__init__) and reaches the other parts through ``self``: the core's _resolve,
_push, _fail and _finish, owner_actors.py's _actor_link_lost (an actor's link broke),
owner_oom.py's _killed_for_memory (the memory monitor killed the worker) and
owner_lineage.py's argument recovery (_lost_argument, _argument_lost).

Leases belong to scheduling keys, not to tasks: a task is bound to a lease only when it
is pushed, so a lease is reused by every task of its key and returned after
LEASE_IDLE_RETURN_S of idleness.

Tasks on a node that dies are retried elsewhere like those of any dead worker. A
remote raylet that went away (its stream broke, or it could not be reached) is
remembered: a spillback that names it is not followed but asked of the local raylet
again a moment later (HELD_RETRY_S), the dead raylet being probed at most once per
backoff (DEAD_RAYLET_BACKOFF_S), until it grants a lease again or the local raylet
stops naming it (once the GCS marks its node dead).
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence

from runtime.core_worker.owner_actions import (Action, ArmIdleTimer, ArmRetry, CancelLeaseRequest,
                                               Connect, Finish, RequestLease, ReturnLease, Warn,
                                               WorkerDied)
from runtime.core_worker.owner_records import (FAILED, FINISHED, PENDING_ARGS_AVAIL,
                                               PENDING_NODE_ASSIGNMENT, KeyState, Lease,
                                               PendingTask, WorkerLink)
from runtime.exceptions import (RuntimeEnvSetupError, TaskCancelledError,
                                TaskPlacementGroupRemoved, TaskUnschedulableError)

log = logging.getLogger("runtime.core_worker")

LOCAL_RAYLET = ""  # the raylet of this node; others are named by their address
MAX_LEASE_REQUESTS_PER_KEY = 10
LEASE_IDLE_RETURN_S = 0.2
# Workers this owner saw die, remembered so that a grant of one of them (the raylet may
# not have noticed yet) is handed back at once instead of costing a task a retry.
DEAD_WORKERS_KEPT = 10_000
# A raylet that went away is probed (a spillback to it is followed) at most once per
# this long, doubling per failure up to the second figure; meanwhile spillbacks to it
# are asked of the local raylet again every HELD_RETRY_S, at most (it drops the node
# as soon as the GCS marks it dead).
DEAD_RAYLET_BACKOFF_S = (0.1, 2.0)
HELD_RETRY_S = 0.2


class TaskTransitions:
    """The transitions of normal tasks; a part of OwnerState (module docstring)."""

    # -- normal tasks ---------------------------------------------------------------------------
    def submit(self, task: PendingTask) -> List[Action]:
        """A task from .remote(): resolve its arguments, then queue it under its key."""
        self.tasks[task.task_id] = task
        self.recorder.new_task(task, "NORMAL_TASK", PENDING_ARGS_AVAIL)
        if task.generator:
            self.streams[task.task_id] = task
        if task.retries_left != 0:
            task.oom_retries_left = self.settings.TASK_OOM_RETRIES
        if task.retries_left != 0 and task.return_ids:
            task.live_returns = len(task.return_ids)
            lineage = self.lineage
            for oid in task.return_ids:
                lineage[oid] = task
        out: List[Action] = []
        if task.slot_refs:
            self._resolve(task, out)
        else:
            self._enqueue(task, out)
        return out

    def _enqueue(self, task: PendingTask, out: List[Action]) -> None:
        if self.raylet_error is not None:
            self._fail([task], self.raylet_error, out)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            ks = self.keys[task.key] = KeyState(task.resources, task.strategy, task.function_id,
                                                task.name)
        task.state = PENDING_NODE_ASSIGNMENT
        self.recorder.event(task.task_id, PENDING_NODE_ASSIGNMENT)
        if not task.oom_retries_left:
            ks.retriable = False
        ks.queue.append(task)
        self._pump(ks, out)

    def _depth(self, ks: KeyState) -> int:
        """Tasks in flight per leased worker: one, unless the node is saturated (no more
        workers can be leased now) and this function's tasks are known to be short."""
        if not ks.queued_requests:
            return 1
        t = self.fn_time.get(ks.function_id)
        if t is not None and t < self.settings.PIPELINE_MAX_TASK_SECONDS:
            return self.settings.PIPELINE_DEPTH
        return 1

    def _pump(self, ks: KeyState, out: List[Action]) -> None:
        """Push what is queued onto the key's leases, then ask for as many more leases as
        the queue needs (or cancel the requests it no longer needs)."""
        depth = self._depth(ks)
        queue = ks.queue
        while queue:
            best = None
            for lease in ks.leases:
                if lease.inflight < depth and (best is None or lease.inflight < best.inflight):
                    best = lease
            if best is None:
                break
            task = queue.popleft()
            if task.cancelled:
                continue
            best.idle_since = None
            best.inflight += 1
            task.lease = best
            self._push(task, best.link, best, out)
        if queue:
            if self.raylet_up:  # else they wait for the reconnection (raylet_restored)
                for _ in range(min(len(queue), self.max_lease_requests) - len(ks.requests)
                               - ks.held):
                    self._request_lease(ks, LOCAL_RAYLET, out)
            return
        ks.held = 0  # nothing waits for them any more (the retry timer finds nothing to do)
        if ks.requests:
            for rid in ks.requests:
                self.requests.pop(rid, None)
                out.append(CancelLeaseRequest(rid, self.request_raylet.pop(rid, LOCAL_RAYLET)))
            ks.requests.clear()
            ks.queued_requests.clear()
        for lease in ks.leases:
            if lease.inflight == 0:
                if lease.idle_since is None:
                    lease.idle_since = self.clock()
                if not lease.timer_armed:
                    lease.timer_armed = True
                    out.append(ArmIdleTimer(lease, self.settings.LEASE_IDLE_RETURN_S))

    def _request_lease(self, ks: KeyState, raylet: str, out: List[Action]) -> None:
        """Ask the local raylet, or (after a spillback) the raylet it named, which must
        then grant or reject: a request never bounces between nodes."""
        self._next_request += 1
        rid = self._next_request
        ks.requests.add(rid)
        self.requests[rid] = ks
        self.request_raylet[rid] = raylet
        out.append(RequestLease(ks, rid, raylet))

    # -- lease outcomes (the raylet's LeaseGrant) --------------------------------------------------
    def _answered(self, request_id: int) -> Optional[KeyState]:
        ks = self.requests.pop(request_id, None)
        self.request_raylet.pop(request_id, None)
        if ks is not None:
            ks.requests.discard(request_id)
            ks.queued_requests.discard(request_id)
        return ks

    def lease_queued(self, request_id: int) -> List[Action]:
        """The request waits for busy resources: short tasks may be pipelined meanwhile."""
        out: List[Action] = []
        ks = self.requests.get(request_id)
        if ks is not None:
            ks.queued_requests.add(request_id)
            self._pump(ks, out)
        return out

    def lease_warning(self, request_id: int, message: str) -> List[Action]:
        """The request cannot be granted for now (it stays pending): warn once per key."""
        ks = self.requests.get(request_id)
        if ks is None or ks.warned:
            return []
        ks.warned = True
        return [Warn(message)]

    def lease_rejected(self, request_id: int, message: str, runtime_env_failed: bool = False,
                       group_removed: bool = False) -> List[Action]:
        """No node can ever grant it, its runtime_env could not be set up, or its
        placement group was removed: every task queued under the key fails."""
        out: List[Action] = []
        ks = self._answered(request_id)
        if ks is None:
            return out
        tasks = [t for t in ks.queue if not t.cancelled]
        ks.queue.clear()
        if tasks:
            error = (RuntimeEnvSetupError(message) if runtime_env_failed
                     else TaskPlacementGroupRemoved(message) if group_removed
                     else TaskUnschedulableError(message))
            self._fail(tasks, error, out)
        return out

    def lease_spilled(self, request_id: int, raylet: str) -> List[Action]:
        """Ask `raylet` (another node's) instead."""
        out: List[Action] = []
        ks = self._answered(request_id)
        if ks is None:
            return out
        dead = self.dead_raylets.get(raylet)
        if dead is not None:
            now = self.clock()
            if now < dead[0]:
                # It went away moments ago: ask the local raylet again later (its view
                # of the cluster may drop that node by then) rather than now, in a loop.
                ks.held += 1
                if not ks.retry_armed:
                    ks.retry_armed = True
                    out.append(ArmRetry(ks, min(dead[0] - now, HELD_RETRY_S)))
                return out
            # Time to probe it once more (a node agent may have restarted it there).
            dead[0] = now + _backoff(int(dead[1]))
        log.debug("lease request for %s spilled back to %s", ks.name, raylet)
        self._request_lease(ks, raylet, out)
        return out

    def retry_held(self, ks: KeyState) -> List[Action]:
        """The retry timer of `ks` fired: ask the local raylet again for the requests that
        were spilled back to a raylet that went away."""
        out: List[Action] = []
        ks.retry_armed = False
        ks.held = 0
        if ks.queue:
            self._pump(ks, out)
        return out

    def raylet_is_dead(self, raylet: str) -> bool:
        """Whether the remote raylet at `raylet` went away and has granted nothing since."""
        return raylet in self.dead_raylets

    def lease_granted(self, raylet: str, request_id: int, lease_id: int, worker_id: bytes,
                      address: str, node_id: bytes = b"", pid: int = 0,
                      gpu_ids: Sequence[int] = ()) -> List[Action]:
        """`raylet` granted the worker at `address`; tasks queued under the key go there."""
        out: List[Action] = []
        if raylet != LOCAL_RAYLET:
            self.dead_raylets.pop(raylet, None)  # it answers again
        ks = self._answered(request_id)
        if ks is None:  # cancelled meanwhile (or forgotten with its raylet): give it back
            out.append(ReturnLease(raylet, lease_id))
            return out
        if worker_id in self.dead_workers:
            # Its raylet has not noticed yet: never send a task there.
            out.append(ReturnLease(raylet, lease_id, kill_worker=True))
            self._pump(ks, out)
            return out
        link = self.links.get(worker_id)
        if link is None or link.dead:
            link = self.links[worker_id] = WorkerLink(worker_id, address, node_id, pid)
            out.append(Connect(link))
        ks.leases.append(Lease(lease_id, ks, link, list(gpu_ids), raylet))
        self._pump(ks, out)
        return out

    def lease_idle(self, lease: Lease) -> List[Action]:
        """The idle timer of `lease` fired: return it if it has been idle for LEASE_IDLE_RETURN_S
        (work that came meanwhile kept it; the timer is armed again when it is idle)."""
        lease.timer_armed = False
        ks = lease.key
        if lease.dead or lease.inflight or ks.queue or lease.idle_since is None:
            return []
        left = self.settings.LEASE_IDLE_RETURN_S - (self.clock() - lease.idle_since)
        if left > 1e-3:
            lease.timer_armed = True
            return [ArmIdleTimer(lease, left)]
        lease.dead = True
        ks.leases.remove(lease)
        return [ReturnLease(lease.raylet, lease.lease_id)]

    # -- results and lost workers ---------------------------------------------------------------
    def task_result(self, link: WorkerLink, result: Any) -> List[Action]:
        """A TaskResult came back on `link`."""
        if result.stream_item:
            return self.stream_item(result)
        out: List[Action] = []
        task = link.inflight.pop(result.task_id, None)
        if task is None:
            return out
        a = link.actor
        if a is not None:  # an actor call's error is final (as before: no retry_exceptions)
            a.handshake_failures = 0
            if self.recorder.enabled:
                self.recorder.result(task, link, result, self.node_id)
            self._finish(task, Finish(task, result), FAILED if result.app_error else FINISHED,
                         out)
            return out
        lease = task.lease
        if lease is not None:
            lease.inflight -= 1
        if result.worker_exiting:
            self._worker_exiting(link, out)
        if self.recorder.enabled:
            self.recorder.result(task, link, result, self.node_id)
        fid = task.function_id
        prev = self.fn_time.get(fid)
        self.fn_time[fid] = (result.exec_seconds if prev is None
                             else 0.8 * prev + 0.2 * result.exec_seconds)
        if not result.app_error:
            self._finish(task, Finish(task, result), FINISHED, out)
        elif result.cancelled:
            self._finish(task, Finish(task, result), FAILED, out)
        else:
            lost = self._lost_argument(task, result) if task.nslots else None
            if lost is not None:
                self._argument_lost(task, lost[0], lost[1], out)
            elif self._retry_app_error(task, result):
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                log.info("retrying task %s after an application error (attempt %s)", task.name,
                         task.attempt)
                self._requeue(task, out)
            else:
                self._finish(task, Finish(task, result), FAILED, out)
        if lease is not None and not lease.dead:
            self._pump(lease.key, out)
        return out

    def _worker_exiting(self, link: WorkerLink, out: List[Action]) -> None:
        """The worker ran its function's max_calls and exits: its leases go back marked so
        (the raylet drops it from the pool: no crash), and the tasks sent to it after the
        last one, which it will not run, go back to their queues, retries untouched."""
        link.dead = True
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        touched: List[KeyState] = []
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.link is link]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
                out.append(ReturnLease(lease.raylet, lease.lease_id, worker_exiting=True))
        left = list(link.inflight.values())
        link.inflight.clear()
        for task in left:
            if task.lease is not None:
                task.lease.inflight -= 1
            if task.cancelled:
                self._fail([task], TaskCancelledError(task.task_id.hex()), out)
            else:
                self._requeue(task, out)
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)

    def _retry_app_error(self, task: PendingTask, result: Any) -> bool:
        """retry_exceptions: True retries any exception, a list only those classes."""
        if not task.retry_exceptions or task.retries_left == 0:
            return False
        if task.retry_exceptions is True:
            return True
        try:
            err = self.parse_error(result.returns[0].inline_data)
        except Exception:
            return False
        cause = getattr(err, "cause", err)
        return isinstance(cause, tuple(task.retry_exceptions))

    def _requeue(self, task: PendingTask, out: List[Action], record: bool = True) -> None:
        """Back in front of its key's queue for another attempt (`record`: tell the task
        events it is pending again, unless that was said when its wait began)."""
        task.link = None
        task.lease = None
        if record:
            self.recorder.requeued_task(task)
        if self.raylet_error is not None:
            self._fail([task], self.raylet_error, out)
            return
        ks = self.keys.get(task.key)
        if ks is None:
            self._enqueue(task, out)
            return
        task.state = PENDING_NODE_ASSIGNMENT
        ks.queue.appendleft(task)
        self._pump(ks, out)

    def worker_lost(self, link: WorkerLink, error: str,
                    handshake_error: Optional[str] = None) -> List[Action]:
        """The connection of `link` broke (the worker died or is unreachable).
        `handshake_error`: a call port failed before it accepted this caller, so none of
        the calls sent on it ran."""
        out: List[Action] = []
        if link.dead and not link.inflight:
            return out
        link.dead = True
        if link.actor is not None:
            self._actor_link_lost(link, error, handshake_error, out)
            return out
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
        self.dead_workers[link.worker_id] = None
        if len(self.dead_workers) > DEAD_WORKERS_KEPT:
            self.dead_workers.popitem(last=False)
        touched: List[KeyState] = []
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.link is link]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
                # The worker is gone (or unreachable): make sure the raylet never grants
                # it again, even before it notices the process exit itself.
                out.append(ReturnLease(lease.raylet, lease.lease_id, kill_worker=True))
        tasks = list(link.inflight.values())
        link.inflight.clear()
        died: List[PendingTask] = []
        for task in tasks:
            if task.lease is not None:
                task.lease.inflight -= 1
            if task.cancelled:
                self._fail([task], TaskCancelledError(task.task_id.hex()), out)
            elif link.oom:
                self._killed_for_memory(task, link, out)
            elif task.retries_left != 0:
                if task.retries_left > 0:
                    task.retries_left -= 1
                task.attempt += 1
                log.warning("worker %s running %s died (%s); retrying (attempt %s)",
                            link.address, task.name, error, task.attempt)
                self._requeue(task, out)
            else:
                died.append(task)
        if died:
            out.append(WorkerDied(died, error))
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)
        return out

    # -- raylets ----------------------------------------------------------------------------------
    def raylet_lost(self, raylet: str) -> List[Action]:
        """Drop the requests pending at `raylet` and the leases it granted, so nothing
        waits for an answer that will never come and no task goes to its dying workers;
        then ask again (the queues stay as they are)."""
        out: List[Action] = []
        if raylet == LOCAL_RAYLET:
            self.raylet_up = False
        else:
            dead = self.dead_raylets.get(raylet)
            failures = 1 if dead is None else int(dead[1]) + 1
            self.dead_raylets[raylet] = [self.clock() + _backoff(failures), failures]
        touched: List[KeyState] = []
        for rid in [rid for rid, r in self.request_raylet.items() if r == raylet]:
            ks = self._answered(rid)
            if ks is not None:
                touched.append(ks)
        for ks in self.keys.values():
            for lease in [lease for lease in ks.leases if lease.raylet == raylet]:
                lease.dead = True
                ks.leases.remove(lease)
                touched.append(ks)
        for ks in {id(k): k for k in touched}.values():
            self._pump(ks, out)
        return out

    def raylet_restored(self) -> List[Action]:
        """The local raylet is back (a new node at the same address): ask it for leases."""
        out: List[Action] = []
        self.raylet_up = True
        for ks in list(self.keys.values()):
            if ks.queue:
                self._pump(ks, out)
        return out

    def raylet_gone(self, error: BaseException) -> List[Action]:
        """The local raylet is not coming back: every task still waiting for a worker fails
        (tasks running on other nodes' workers finish as usual), and so do later ones."""
        out: List[Action] = []
        self.raylet_error = error
        for ks in self.keys.values():
            tasks = [t for t in ks.queue if not t.cancelled]
            ks.queue.clear()
            if tasks:
                self._fail(tasks, error, out)
        return out


def _backoff(failures: int) -> float:
    first, most = DEAD_RAYLET_BACKOFF_S
    return min(most, first * (2 ** max(0, failures - 1)))
