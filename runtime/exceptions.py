"""The runtime's exceptions: one tree, Ray's names, rooted at :class:`RayError`.

::

    RayError
    ├── RayTaskError                 a task raised; also an instance of the original class
    ├── GetTimeoutError              get() timed out (also a TimeoutError)
    ├── TaskCancelledError           the task was cancelled with cancel()
    ├── WorkerCrashedError           the worker died while running the task, retries exhausted
    ├── NodeDiedError                the node running the task died
    ├── OutOfMemoryError             the node ran out of memory and the work was killed
    ├── ObjectStoreFullError         no room in the object store, even after spilling
    ├── OutOfDiskError               ObjectStoreFullError's sibling for the spill disk
    ├── ObjectLostError              a value can no longer be reached
    │   ├── OwnerDiedError           ... because the process that owned it exited
    │   ├── ObjectFetchTimedOutError ... because fetching it timed out
    │   ├── ObjectFreedError         ... because it was freed explicitly
    │   ├── ObjectReconstructionFailedError  ... because it could not be recomputed
    │   │   ├── ObjectReconstructionFailedMaxAttemptsExceededError  (its task ran out of retries)
    │   │   └── ObjectReconstructionFailedLineageEvictedError       (its lineage was evicted)
    │   └── ReferenceCountingAssertionError  ... because it was freed too early
    ├── RayActorError                an actor cannot run the call
    │   ├── ActorDiedError           ... because the actor is dead (reason attached)
    │   └── ActorUnavailableError    ... because it is restarting or unreachable for now
    ├── ActorAlreadyExistsError      the actor's name is taken (also a ValueError, as in Ray)
    ├── PendingCallsLimitExceeded    a handle has max_pending_calls calls in flight already
    ├── AsyncioActorExit             exit_actor() inside an async actor (caught by the worker)
    ├── TaskUnschedulableError       the task can never be placed (e.g. affinity to a dead node)
    ├── ActorUnschedulableError      the same for an actor
    ├── PlacementGroupSchedulingError
    ├── TaskPlacementGroupRemoved    the task's placement group was removed
    ├── ActorPlacementGroupRemoved   the actor's placement group was removed
    ├── RuntimeEnvSetupError
    ├── UnserializableException      an exception raised remotely could not be unpickled here
    ├── ObjectRefStreamEndOfStreamError  a streaming generator has no more refs
    ├── AuthenticationError          a request carried no or the wrong cluster token
    ├── LocalRayletDiedError         the raylet of this process died (Ray's name)
    │   └── RayletDiedError          ... and did not come back; also a ClusterConnectionError
    │                                and a NodeDiedError (a new raylet is a new node)
    ├── ClusterConnectionError       the GCS / raylet / object store could not be reached
    │   └── RayletDiedError          (the same class as above)
    ├── RaySystemError               an internal failure of the runtime itself
    └── CrossLanguageError           kept for Ray's API; never raised here

Ray's classes that name parts this runtime does not have (compiled graphs' channels,
plasma, Ray's RPC layer) are not defined; docs/compatibility.md lists them.

Every error says what went wrong and what to do about it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

__all__ = [
    "RayError", "RayTaskError", "GetTimeoutError", "TaskCancelledError", "WorkerCrashedError",
    "NodeDiedError", "ObjectStoreFullError", "OutOfDiskError", "ObjectLostError",
    "OwnerDiedError", "ObjectFetchTimedOutError", "ReferenceCountingAssertionError",
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "TaskUnschedulableError",
    "ActorUnschedulableError", "PlacementGroupSchedulingError", "RuntimeEnvSetupError",
    "AuthenticationError", "ClusterConnectionError", "RayletDiedError", "RaySystemError",
    "CrossLanguageError", "OutOfMemoryError", "ActorAlreadyExistsError",
    "PendingCallsLimitExceeded", "ObjectFreedError", "AsyncioActorExit", "LocalRayletDiedError",
    "ObjectReconstructionFailedError", "ActorPlacementGroupRemoved", "TaskPlacementGroupRemoved",
    "UnserializableException", "ObjectRefStreamEndOfStreamError",
    "ObjectReconstructionFailedMaxAttemptsExceededError",
    "ObjectReconstructionFailedLineageEvictedError",
]


class RayError(Exception):
    """Root of every error raised by the runtime."""


class RayTaskError(RayError):
    """A task (or actor method) raised an exception.

    ``get()`` raises it as an instance of *both* this class and the original
    exception's class (see :meth:`as_instanceof_cause`), so ``except ValueError``
    catches a remote ``ValueError``. ``cause`` is the original exception and the
    message carries the remote traceback, as in Ray.
    """

    def __init__(self, function_name: str, traceback_str: str, cause: Optional[BaseException],
                 proctitle: Optional[str] = None, pid: Optional[int] = None,
                 ip: Optional[str] = None, actor_repr: Optional[str] = None,
                 actor_id: Optional[str] = None) -> None:
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.proctitle = proctitle or f"runtime::{function_name}"
        self.pid = pid if pid is not None else os.getpid()
        self.ip = ip or "127.0.0.1"
        self.actor_repr = actor_repr
        self.actor_id = actor_id
        super().__init__(function_name, traceback_str, cause, proctitle, pid, ip)

    def __reduce__(self):
        return (RayTaskError, (self.function_name, self.traceback_str, self.cause,
                               self.proctitle, self.pid, self.ip, self.actor_repr, self.actor_id))

    def __str__(self) -> str:
        head = f"{type(self.cause).__name__ if self.cause is not None else 'RayTaskError'}"
        lines = [f"{head}: {self.proctitle}() (pid={self.pid}, ip={self.ip})"]
        if self.actor_repr:
            lines[0] += f", actor={self.actor_repr}"
        lines.append(self.traceback_str.rstrip())
        return "\n".join(lines)

    def as_instanceof_cause(self) -> "RayTaskError":
        """This error as an instance of RayTaskError *and* the cause's class.

        Falls back to plain RayTaskError when the cause's class cannot be
        subclassed (e.g. it is final or has an incompatible layout).
        """
        cause = self.cause
        if cause is None:
            return self
        cause_cls = type(cause)
        if issubclass(RayTaskError, cause_cls) or isinstance(cause, RayTaskError):
            return self
        return _dual_instance(self, cause_cls)


_DUAL_CLASSES: dict[type, type] = {}


def _dual_instance(err: RayTaskError, cause_cls: type) -> RayTaskError:
    cls = _DUAL_CLASSES.get(cause_cls)
    if cls is None:
        name = f"RayTaskError({cause_cls.__name__})"
        try:
            cls = type(name, (RayTaskError, cause_cls), {
                "__init__": _dual_init,
                "__getattr__": _dual_getattr,
                "__str__": lambda self: self._message,
                "__reduce__": lambda self: (_rebuild_dual, (self._task_error,)),
                "__module__": cause_cls.__module__ if isinstance(cause_cls.__module__, str)
                else __name__,
            })
            cls.__qualname__ = name
        except TypeError:
            return err
        _DUAL_CLASSES[cause_cls] = cls
    try:
        return cls(err)
    except Exception:
        return err


def _dual_init(self, err: RayTaskError) -> None:
    self.__dict__.update(err.__dict__)
    self._task_error = err
    self._message = str(err)
    self.args = (err.cause,)


def _dual_getattr(self, name: str) -> Any:
    cause = self.__dict__.get("cause")
    if cause is None or name.startswith("__"):
        raise AttributeError(name)
    return getattr(cause, name)


def _rebuild_dual(err: RayTaskError) -> RayTaskError:
    return err.as_instanceof_cause()


class GetTimeoutError(RayError, TimeoutError):
    """``get()`` (or an actor call's ``get``) did not finish within ``timeout``."""


class TaskCancelledError(RayError):
    """The task was cancelled with ``cancel()`` before or while it ran."""

    def __init__(self, task_id: Optional[str] = None, message: Optional[str] = None) -> None:
        self.task_id = task_id
        super().__init__(message or (f"Task {task_id} was cancelled" if task_id
                                     else "Task was cancelled"))

    def __reduce__(self):
        # The default (cls(*args)) would pass the message as task_id, doubling it.
        return (type(self), (self.task_id, str(self)))


class WorkerCrashedError(RayError):
    """The worker process died (exit, signal, segfault) while running the task."""

    def __init__(self, message: str = "The worker died unexpectedly while executing this task.") -> None:
        super().__init__(message)


class NodeDiedError(RayError):
    """The node that ran (or held) the work died."""


class OutOfMemoryError(RayError):
    """The node ran low on memory and the raylet's memory monitor killed the worker
    running the task, which may not run again (max_retries=0, or no OOM retries left).

    Its message is the monitor's (Ray's text): the node, its memory use, the threshold,
    which worker and why, and how to change the threshold or turn the monitor off. An
    actor killed this way is dead or restarts as after any death; its callers get
    ActorDiedError with that text as the cause."""

    def __init__(self, message: str = "The node ran out of memory; the task or actor was "
                 "killed to free memory.") -> None:
        self.message = message
        super().__init__(message)


class ObjectStoreFullError(RayError):
    """The object store cannot hold a new object, even after spilling to disk."""


class OutOfDiskError(RayError):
    """The spill directory's disk is full."""


class ObjectLostError(RayError):
    """The value of an ObjectRef can no longer be reached."""

    def __init__(self, object_ref_hex: str = "", message: str = "") -> None:
        self.object_ref_hex = object_ref_hex
        super().__init__(message or f"Object {object_ref_hex} is lost and cannot be retrieved.")

    def __reduce__(self):
        # The default (cls(*args)) would pass the message as object_ref_hex.
        return (type(self), (self.object_ref_hex, str(self)))


class OwnerDiedError(ObjectLostError):
    """The process that owned the object (created the ObjectRef) exited."""


class ObjectFetchTimedOutError(ObjectLostError):
    """Fetching the object from another node timed out."""


class ReferenceCountingAssertionError(ObjectLostError):
    """The object was freed while a reference to it still existed (a bug)."""


class ObjectFreedError(ObjectLostError):
    """The object was freed explicitly by the application while a reference remained."""


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and could not be recomputed from its lineage.

    ``reason`` is Ray 2.60's name for why (its ``ErrorType``), one of REASONS;
    ``reason_message`` says it in words, as Ray's does. The message names the object and
    where its last copy was."""

    REASONS = {
        "OBJECT_UNRECONSTRUCTABLE_MAX_ATTEMPTS_EXCEEDED": (
            "The object cannot be reconstructed because the maximum number of task retries "
            "has been exceeded. Consider increasing the number of retries using "
            "`@ray.remote(max_retries=N)`."),
        "OBJECT_UNRECONSTRUCTABLE_LINEAGE_EVICTED": (
            "The object cannot be reconstructed because its lineage has been evicted to "
            "reduce memory pressure: an owner keeps at most 1 GiB of lineage (Ray's "
            "max_lineage_bytes), the oldest going first."),
        "OBJECT_UNRECONSTRUCTABLE_PUT": (
            "The object cannot be reconstructed because it was created by ray.put(), which "
            "has no task lineage. To prevent this error, return the value from a task "
            "instead."),
        "OBJECT_UNRECONSTRUCTABLE_RETRIES_DISABLED": (
            "The object cannot be reconstructed because the task was created with "
            "max_retries=0. Consider enabling retries using `@ray.remote(max_retries=N)`."),
        "OBJECT_UNRECONSTRUCTABLE_BORROWED": (
            "The object cannot be reconstructed because it crossed an ownership boundary: "
            "only the owner of an object can rebuild it, and this process borrowed it."),
        "OBJECT_UNRECONSTRUCTABLE_TASK_CANCELLED": (
            "The object cannot be reconstructed because the task that would produce it was "
            "cancelled."),
    }

    def __init__(self, object_ref_hex: str = "", message: str = "", *, reason: str = "",
                 reason_message: str = "", owner_address: Any = None,
                 call_site: str = "") -> None:
        self.reason = reason
        self.reason_message = reason_message or self.REASONS.get(reason, "")
        self.owner_address = owner_address
        self.call_site = call_site
        if not message:
            message = f"Failed to retrieve object {object_ref_hex}."
            if self.reason_message:
                message += f"\n\n[{reason or 'UNKNOWN'}] {self.reason_message}"
        super().__init__(object_ref_hex, message)

    def __reduce__(self):
        return (_rebuild_reconstruction_failed,
                (type(self), self.object_ref_hex, str(self), self.reason, self.reason_message))


def _rebuild_reconstruction_failed(cls: type, object_ref_hex: str, message: str, reason: str,
                                   reason_message: str) -> "ObjectReconstructionFailedError":
    return cls(object_ref_hex, message, reason=reason, reason_message=reason_message)


class ObjectReconstructionFailedMaxAttemptsExceededError(ObjectReconstructionFailedError):
    """The object was lost and the task that made it has no retries left (Ray before
    2.60 raised this class; 2.60 raises its base with ``reason`` set, and so do we:
    both ``except`` clauses catch it)."""


class ObjectReconstructionFailedLineageEvictedError(ObjectReconstructionFailedError):
    """The object was lost and its lineage had been evicted (see the class above)."""


class RayActorError(RayError):
    """The actor cannot run the method call."""

    def __init__(self, message: str = "The actor died unexpectedly before finishing this task.",
                 actor_id: Optional[str] = None, cause: Optional[BaseException] = None) -> None:
        self.actor_id = actor_id
        self.cause = cause
        self.error_msg = message
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.error_msg, self.actor_id, self.cause))


class ActorDiedError(RayActorError):
    """The actor is dead: killed, its process died with no restarts left, its
    constructor raised (``cause`` holds that error) or its owner exited."""


class ActorUnavailableError(RayActorError):
    """The actor is temporarily unreachable (restarting); the call may be retried."""


class ActorAlreadyExistsError(ValueError, RayError):
    """An actor with this name already exists in the namespace.

    Also a ValueError, as in Ray, so code written for older versions (``except
    ValueError``) still catches it."""

    def __init__(self, error_message: str) -> None:
        self.error_message = error_message
        super().__init__(error_message)

    def __str__(self) -> str:
        return self.error_message


class PendingCallsLimitExceeded(RayError):
    """An actor handle already has ``max_pending_calls`` calls that have not finished;
    wait for some results before submitting more."""


class ActorExitRequested(BaseException):
    """Raised by exit_actor() in a sync actor; caught by the worker, never seen by user code
    (a BaseException, so ``except Exception`` in the method cannot swallow it)."""


class AsyncioActorExit(RayError, ActorExitRequested):
    """exit_actor() in an async actor, as in Ray: an exception the worker catches to end
    the actor (it is also an ActorExitRequested, which is what the worker catches)."""


class TaskUnschedulableError(RayError):
    """The task can never be scheduled (e.g. hard affinity to a dead node)."""


class ActorUnschedulableError(RayError):
    """The actor can never be scheduled."""


class PlacementGroupSchedulingError(RayError):
    """The placement group could not be created or was removed."""


class TaskPlacementGroupRemoved(RayError):
    """The placement group the task was to run in was removed."""

    def __str__(self) -> str:
        return super().__str__() or ("The placement group corresponding to this task has "
                                     "been removed.")


class ActorPlacementGroupRemoved(RayError):
    """The placement group the actor was to run in was removed."""

    def __str__(self) -> str:
        return super().__str__() or ("The placement group corresponding to this Actor has "
                                     "been removed.")


class RuntimeEnvSetupError(RayError):
    """The task's runtime environment could not be set up."""


class UnserializableException(RayError):
    """An exception raised remotely could not be unpickled in this process; the message
    carries its original text and traceback, as captured where it was raised."""

    def __init__(self, original_stack_trace: str) -> None:
        self._original_stack_trace = original_stack_trace
        super().__init__(original_stack_trace)

    def __str__(self) -> str:
        return ("Failed to deserialize exception. Its class may not be importable here, or "
                "it may not survive pickling (define __reduce__).\nOriginal exception:\n"
                f"{self._original_stack_trace}")


class ObjectRefStreamEndOfStreamError(RayError):
    """A streaming generator has no more ObjectRefs to read."""


class AuthenticationError(RayError):
    """A request carried no cluster token or the wrong one."""


class ClusterConnectionError(RayError, ConnectionError):
    """The cluster (GCS, raylet, object store) could not be reached; the message names
    the component and its address."""


class LocalRayletDiedError(RayError):
    """The raylet of this process (the node's scheduler) died: Ray's name for it.

    The runtime raises the more specific RayletDiedError, a subclass, so ``except
    LocalRayletDiedError`` catches it."""

    def __str__(self) -> str:
        return super().__str__() or ("The task's local raylet died. Check the raylet's log "
                                     "in the session's logs directory.")


class RayletDiedError(LocalRayletDiedError, ClusterConnectionError, NodeDiedError):
    """The raylet this process leases workers from died and did not come back.

    Raised by get() of every task the process was still waiting for, and by work
    submitted afterwards. ``address`` is the raylet's, ``pid`` its process id when
    the driver knows it (a private cluster's raylet), else None.
    """

    def __init__(self, message: str, *, address: str = "", pid: Optional[int] = None) -> None:
        self.address = address
        self.pid = pid
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild_raylet_died, (str(self), self.address, self.pid))


def _rebuild_raylet_died(message: str, address: str, pid: Optional[int]) -> RayletDiedError:
    return RayletDiedError(message, address=address, pid=pid)


class RaySystemError(RayError):
    """An internal error of the runtime; the message names the component."""


class CrossLanguageError(RayError):
    """Kept for API compatibility with Ray; never raised here."""
