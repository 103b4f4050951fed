"""One actor's lifecycle in the GCS, as a pure table of states and transitions.

The GCS's actor manager (actor_manager.py) places actors, leases their workers,
pushes their creation tasks and watches their streams; every decision about what
that means for the actor (alive, restarting with what is left of its restart
budget, dead and why) is taken here, from stimuli, with no socket and no task:
each transition is a unit test (tests/test_actor_lifecycle.py). The states are the
ActorState enum of protos common.proto (Ray's names).

TRANSITIONS below is the table; a stimulus not in it for the current state changes
nothing (a late result for a dead actor, a second kill). ``kill`` and ``worker_died``
pick between two rows by the kill's ``no_restart`` and the restart budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from runtime.protocol import common_pb2

PENDING_CREATION = common_pb2.PENDING_CREATION
ALIVE = common_pb2.ALIVE
RESTARTING = common_pb2.RESTARTING
DEAD = common_pb2.DEAD

#: (state, stimulus) -> next state. "placed" covers a grant and the creation task sent.
TRANSITIONS: Dict[Tuple[int, str], int] = {
    (PENDING_CREATION, "lease_granted"): PENDING_CREATION,
    (PENDING_CREATION, "created"): ALIVE,
    (PENDING_CREATION, "unschedulable"): DEAD,
    (PENDING_CREATION, "constructor_failed"): DEAD,
    (PENDING_CREATION, "worker_died/restart"): RESTARTING,
    (PENDING_CREATION, "worker_died/no_restart"): DEAD,
    (PENDING_CREATION, "kill/no_restart"): DEAD,
    (PENDING_CREATION, "kill/restart"): PENDING_CREATION,
    (PENDING_CREATION, "internal_error"): DEAD,
    (ALIVE, "exited"): DEAD,
    (ALIVE, "worker_died/restart"): RESTARTING,
    (ALIVE, "worker_died/no_restart"): DEAD,
    (ALIVE, "kill/no_restart"): DEAD,
    (ALIVE, "kill/restart"): ALIVE,        # until its worker's stream breaks: worker_died
    (RESTARTING, "lease_granted"): RESTARTING,
    (RESTARTING, "created"): ALIVE,
    (RESTARTING, "unschedulable"): DEAD,
    (RESTARTING, "constructor_failed"): DEAD,
    (RESTARTING, "worker_died/restart"): RESTARTING,
    (RESTARTING, "worker_died/no_restart"): DEAD,
    (RESTARTING, "kill/no_restart"): DEAD,
    (RESTARTING, "kill/restart"): RESTARTING,
    (RESTARTING, "internal_error"): DEAD,
}


# -- actions: what the actor manager carries out -----------------------------------------------
@dataclass(frozen=True)
class Place:
    """Pick a node, request a lease there and create the actor (again, for a restart)."""


@dataclass(frozen=True)
class PushCreation:
    """The lease is granted: send the creation task to the worker."""


@dataclass(frozen=True)
class ReturnLease:
    """Hand the actor's worker back, killing it."""


@dataclass(frozen=True)
class CancelRequest:
    """Cancel the lease request in flight (the actor died before it was granted)."""


@dataclass(frozen=True)
class Publish:
    """The actor's record changed: bump its version so long polls (GetActor) answer."""


@dataclass(frozen=True)
class Event:
    """A line for the cluster's event log."""
    state: str
    message: str
    severity: str = "INFO"


@dataclass(frozen=True)
class ReleaseName:
    """The actor is dead: its name is free again."""


Action = Union[Place, PushCreation, ReturnLease, CancelRequest, Publish, Event, ReleaseName]


class InvalidTransition(RuntimeError):
    pass


class ActorLifecycle:
    """The state of one actor; see the module docstring."""

    def __init__(self, max_restarts: int = 0) -> None:
        self.state = PENDING_CREATION
        self.max_restarts = max_restarts      # -1: without limit
        self.num_restarts = 0
        self.death_cause = ""
        self.death_error = b""                # the constructor's error, serialized
        self.kill: Optional[Tuple[bool, str]] = None  # (no_restart, reason) of a kill in progress
        self.leased = False                   # a worker is leased for it
        self.requesting = False               # a lease request is in flight
        self.intentional = False              # it died because it was asked to (kill, exit)

    @property
    def state_name(self) -> str:
        return common_pb2.ActorState.Name(self.state)

    def _go(self, stimulus: str) -> Optional[int]:
        """The next state for `stimulus`, or None when the table has no such row."""
        return TRANSITIONS.get((self.state, stimulus))

    def _die(self, cause: str, error: bytes = b"") -> List[Action]:
        self.state = DEAD
        self.death_cause = cause
        if error:
            self.death_error = error
        out: List[Action] = [ReleaseName(), Publish(),
                             Event("dead", cause, "INFO" if self.intentional else "WARNING")]
        if self.leased:
            self.leased = False
            out.append(ReturnLease())
        elif self.requesting:
            self.requesting = False
            out.append(CancelRequest())
        return out

    # -- stimuli --------------------------------------------------------------------------------
    def registered(self) -> List[Action]:
        return [Place()]

    def lease_requested(self) -> None:
        self.requesting = True

    def lease_granted(self) -> List[Action]:
        """A worker is leased for the actor: create it there, unless it died meanwhile."""
        self.requesting = False
        if self._go("lease_granted") is None:
            return [ReturnLease()]
        self.leased = True
        return [PushCreation()]

    def lease_lost(self) -> None:
        """The request got no grant (its raylet went away, or it was spilled): the
        manager places the actor again."""
        self.requesting = False

    def unschedulable(self, why: str) -> List[Action]:
        """No node can take it (a hard node affinity to a dead node, an infeasible shape)."""
        if self._go("unschedulable") is None:
            return []
        return self._die(f"cannot be scheduled: {why}")

    def created(self) -> List[Action]:
        """The constructor returned."""
        nxt = self._go("created")
        if nxt is None:
            return []
        self.state = nxt
        return [Publish()]

    def constructor_failed(self, class_name: str, error: bytes) -> List[Action]:
        if self._go("constructor_failed") is None:
            return []
        return self._die(f"its constructor ({class_name}.__init__) raised an exception", error)

    def exited(self, reason: str) -> List[Action]:
        """exit_actor(): the actor ends itself, never restarted."""
        if self._go("exited") is None:
            return []
        self.kill = (True, reason)
        self.intentional = True
        out = self._die(reason)
        out = [a for a in out if not isinstance(a, ReturnLease)]  # its process exits by itself
        self.leased = False
        return out

    def internal_error(self) -> List[Action]:
        if self._go("internal_error") is None:
            return []
        return self._die("internal error while creating it (see gcs.log)")

    def kill_requested(self, no_restart: bool, reason: str) -> List[Action]:
        """kill(), its owner's exit, its placement group's removal. With no_restart it is
        dead at once; either way its worker is killed (then worker_died decides)."""
        nxt = self._go("kill/no_restart" if no_restart else "kill/restart")
        if nxt is None:
            return []
        self.kill = (no_restart, reason)
        if no_restart:
            self.intentional = True
            return self._die(reason)
        if self.leased:
            return [ReturnLease()]
        return []

    def worker_died(self, pid: int, error: str) -> List[Action]:
        """The actor's worker stream broke: restart it if the budget allows."""
        self.leased = False
        if self.state == DEAD:
            return []
        kill, self.kill = self.kill, None
        if kill is not None and kill[0]:
            self.intentional = True
            return self._die(kill[1])
        cause = (f"its worker process (pid {pid}) died ({error})" if kill is None
                 else f"it was killed ({kill[1]})")
        budget = "inf" if self.max_restarts == -1 else str(self.max_restarts)
        if self.max_restarts == -1 or self.num_restarts < self.max_restarts:
            nxt = self._go("worker_died/restart")
            if nxt is None:  # pragma: no cover - every live state has the row
                raise InvalidTransition(f"worker_died in {self.state_name}")
            self.state = nxt
            self.num_restarts += 1
            return [Publish(), Event("restarting",
                                     f"{cause}; restart {self.num_restarts}/{budget}", "WARNING"),
                    Place()]
        return self._die(f"{cause}; no restarts left (max_restarts={self.max_restarts})")
