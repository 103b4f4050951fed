"""Lineage in the owner's state machine (owner_state.py): finished tasks kept to rebuild
the objects they returned, the arguments they pin, and the re-runs that rebuild lost
objects (or the reason they cannot be rebuilt).

LineageTransitions is a mixin of OwnerState: it works on OwnerState's state (set up in
OwnerState.__init__) and reaches the other parts through ``self`` (the core's _resolve
and owner_tasks.py's _enqueue for a re-run). A task enters the lineage in the core's
_finish (PinLineage), which calls _evict_lineage and _unindex here.

The owner keeps each finished normal task that may be retried as the *lineage* of the
objects it returned (what is needed to run it again) until the last of them is
released; ``FreeLineage`` then drops it. When an object it owns is lost (its only copy
was on a node or in a store that died, or only lineage kept it and its value was freed),
``object_lost`` re-runs the task that made it, as a new attempt that counts against
``max_retries``; its arguments are resolved again, so an argument that is lost too is
rebuilt first, recursively. What cannot be rebuilt fails with Ray 2.60's
ObjectReconstructionFailedError and its reason: a ``put`` object, a task created with
max_retries=0, one out of retries, lineage evicted (beyond LINEAGE_MAX_BYTES). A task
whose worker could not fetch an argument (its copy was lost meanwhile) is not failed:
the argument is recovered (``ArgumentLost``) and the task resolved again, without
using a retry.

How lineage pins arguments (``PinLineage``, undone by ``FreeLineage``): while a task is
kept as lineage, its arguments this process owns stay known. An argument that can be
rebuilt itself (it has lineage) is pinned by lineage only: its value is freed with its
last reference and rebuilt if a re-run needs it, as Ray's lineage_ref_count. An
argument that cannot be rebuilt (a put object, e.g. a large argument put by .remote())
keeps its value while the lineage lives, since the re-run could not do without it (Ray's
OutOfScope keeps objects that are not reconstructable for lineage references, too).
Borrowed arguments are not pinned: their owner frees them when this process is done,
so rebuilding a task that needs one of them after that fails with its owner's error.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, List, Optional, Tuple

from runtime.core_worker.owner_actions import (Action, ArgumentLost, FailObjects, FreeLineage,
                                               Resubmit)
from runtime.core_worker.owner_records import PENDING_ARGS_AVAIL, PendingTask
from runtime.exceptions import (ObjectFetchTimedOutError, ObjectLostError,
                                ObjectReconstructionFailedError,
                                ObjectReconstructionFailedLineageEvictedError,
                                ObjectReconstructionFailedMaxAttemptsExceededError)

log = logging.getLogger("runtime.core_worker")

# Ray's RAY_max_lineage_bytes: beyond it the oldest lineage is dropped.
LINEAGE_MAX_BYTES = 1 << 30
# Objects whose lineage was evicted, remembered (oldest first out) to name the reason
# when one of them is lost.
EVICTED_KEPT = 100_000
# How often one task may find an argument lost and be resolved again without using a
# retry (each time the argument is recovered first), before the loss fails it.
ARGUMENT_LOSSES_MAX = 3
# Ray's reasons (ErrorType names) why a lost object cannot be rebuilt.
MAX_ATTEMPTS_EXCEEDED = "OBJECT_UNRECONSTRUCTABLE_MAX_ATTEMPTS_EXCEEDED"
LINEAGE_EVICTED = "OBJECT_UNRECONSTRUCTABLE_LINEAGE_EVICTED"
PUT = "OBJECT_UNRECONSTRUCTABLE_PUT"
RETRIES_DISABLED = "OBJECT_UNRECONSTRUCTABLE_RETRIES_DISABLED"
_PUT_INDEX = b"\x00\x00\x00\x00"  # the return index of put objects (runtime/ids.py)


class LineageTransitions:
    """The transitions of the lineage; a part of OwnerState (module docstring)."""

    # -- lineage --------------------------------------------------------------------------------
    def references_released(self, oids: Iterable[bytes]) -> List[Action]:
        """Owned objects lost their last reference: lineage whose objects are all
        released goes (FreeLineage)."""
        out: List[Action] = []
        lineage = self.lineage
        evicted = self.lineage_evicted
        for oid in oids:
            task = lineage.pop(oid, None)
            if task is None:
                if evicted:
                    evicted.pop(oid, None)
                continue
            task.live_returns -= 1
            if task.live_returns == 0 and self.lineage_done.pop(task.task_id, None) is not None:
                self.lineage_bytes -= lineage_size(task)
                task.lineage_kept = False
                out.append(FreeLineage(task))
        return out

    def _unindex(self, task: PendingTask) -> None:
        for oid in task.return_ids:
            self.lineage.pop(oid, None)
        task.live_returns = 0

    def _evict_lineage(self, out: List[Action]) -> None:
        """Beyond lineage_max_bytes the oldest lineage goes first (as Ray's
        max_lineage_bytes): its objects can no longer be rebuilt."""
        evicted = self.lineage_evicted
        while self.lineage_bytes > self.lineage_max_bytes and self.lineage_done:
            _tid, task = self.lineage_done.popitem(last=False)
            self.lineage_bytes -= lineage_size(task)
            for oid in task.return_ids:
                if self.lineage.get(oid) is task:
                    evicted[oid] = None
            while len(evicted) > EVICTED_KEPT:
                evicted.popitem(last=False)
            self._unindex(task)
            task.lineage_kept = False
            out.append(FreeLineage(task))

    # -- lost objects ---------------------------------------------------------------------------
    def object_lost(self, oid: bytes, where: str) -> List[Action]:
        """The value of `oid`, which this process owns, is gone: `where` says what became
        of it (e.g. "its only copy was in the object store of node 1a2b3c4d
        (127.0.0.3:6382), which is unreachable"). The shell has dropped the lost
        location. Re-run the task that made it, unless it runs already (once is enough
        for all its objects), or fail the object with the reason it cannot be rebuilt."""
        out: List[Action] = []
        task = self.lineage.get(oid)
        if task is not None:
            if not task.done:
                return out  # being made (again) already
            if task.retries_left != 0:
                self._rebuild(task, oid, where, out)
                return out
            reason = MAX_ATTEMPTS_EXCEEDED
        elif oid in self.lineage_evicted:
            reason = LINEAGE_EVICTED
        elif oid.endswith(_PUT_INDEX):
            reason = PUT
        else:
            reason = RETRIES_DISABLED
        cls = {MAX_ATTEMPTS_EXCEEDED: ObjectReconstructionFailedMaxAttemptsExceededError,
               LINEAGE_EVICTED: ObjectReconstructionFailedLineageEvictedError
               }.get(reason, ObjectReconstructionFailedError)
        message = ObjectReconstructionFailedError.REASONS[reason]
        log.warning("object %s was lost (%s) and cannot be rebuilt (%s)", oid.hex(), where,
                    reason)
        out.append(FailObjects([oid], cls(oid.hex(), (
            f"Failed to retrieve object {oid.hex()}: it was lost ({where}) and cannot be "
            f"rebuilt.\n\n[{reason}] {message}"), reason=reason, reason_message=message)))
        return out

    def _rebuild(self, task: PendingTask, oid: bytes, where: str, out: List[Action]) -> None:
        """Run a finished task of the lineage again, as a new attempt: its arguments are
        held and resolved again (those lost too are rebuilt first, by the same path)."""
        if self.lineage_done.pop(task.task_id, None) is not None:
            self.lineage_bytes -= lineage_size(task)
        if task.retries_left > 0:
            task.retries_left -= 1
        task.attempt += 1
        task.cancelled = False
        task.link = None
        task.lease = None
        task.argument_losses = 0
        self.tasks[task.task_id] = task
        log.warning("object %s was lost (%s); running %s again to rebuild it (attempt %s, "
                    "%s retries left)", oid.hex(), where, task.name, task.attempt,
                    "unlimited" if task.retries_left < 0 else task.retries_left)
        self.recorder.requeued_task(task)
        out.append(Resubmit(task))
        if task.nslots:
            task.slot_refs = list(task.arg_ids[:task.nslots])
            self._resolve(task, out)
        else:
            task.state = PENDING_ARGS_AVAIL
            self._enqueue(task, out)

    # -- arguments a worker could not fetch ---------------------------------------------------
    def _argument_lost(self, task: PendingTask, i: int, location: Any,
                       out: List[Action]) -> None:
        """Its worker could not fetch argument `i` from `location`: recover the argument
        (ArgumentLost), then resolve the arguments again. Not a retry: the task did not
        run."""
        oid = task.arg_ids[i]
        task.argument_losses += 1
        task.attempt += 1
        task.link = None
        task.lease = None
        log.warning("the worker running %s could not fetch its argument %s (%s); recovering "
                    "it, then running the task again (attempt %s)", task.name, oid.hex(),
                    _where(location), task.attempt)
        self.recorder.requeued_task(task)
        out.append(ArgumentLost(task, oid, location))
        task.slot_refs = list(task.arg_ids[:task.nslots])
        self._resolve(task, out)

    def _lost_argument(self, task: PendingTask, result: Any) -> Optional[Tuple[int, Any]]:
        """(slot index, location) when the task failed only because its worker could not
        fetch that argument from the store that held it (a plain ObjectLostError about
        it: its owner may still rebuild it), else None."""
        if task.argument_losses >= ARGUMENT_LOSSES_MAX or not result.returns:
            return None
        try:
            err = self.parse_error(result.returns[0].inline_data)
        except Exception:
            return None
        cause = getattr(err, "cause", None) or err
        if type(cause) not in (ObjectLostError, ObjectFetchTimedOutError):
            return None
        for i, loc in enumerate(task.arg_values):
            if loc is not None and loc.in_store and loc.object_id.hex() == cause.object_ref_hex:
                return i, loc
        return None


def _where(location: Any) -> str:
    """Where an ObjectLocation says the value is, for messages."""
    if location is None or not location.in_store:
        return "inline"
    return f"the object store of node {location.node_id.hex()[:8]} ({location.store_address})"


def lineage_size(task: PendingTask) -> int:
    """What a lineage entry costs, roughly: its arguments and the record itself."""
    return len(task.args) + 256
