"""One actor's lifecycle in the GCS, as a pure table of states and transitions.

The GCS's actor manager (actor_manager.py) places actors, leases their workers,
pushes their creation tasks and watches their streams; every decision about what
that means for the actor (alive, restarting with what is left of its restart
budget, dead and why) is taken here, from stimuli, with no socket and no task:
each transition is a unit test (tests/test_actor_lifecycle.py). The states are the
ActorState enum of protos common.proto (Ray's names).

TRANSITIONS below is the table; a stimulus not in it for the current state changes
nothing (a late result for a dead actor, a second kill). ``kill``, ``worker_died`` and
``node_died`` pick between two rows by the kill's ``no_restart`` and the restart budget.

Two stimuli come from the GCS's own failures. ``restored`` rebuilds the lifecycle of an
actor a restarted GCS read from its store: an ALIVE actor is taken to be leased until
its raylet says otherwise (``reattached`` or ``worker_lost_while_down``), one that was
being placed is placed again. ``node_died``: the node the actor's worker ran on is dead,
so the worker is gone with its lease; creating the actor there is simply retried
elsewhere, an actor that was alive restarts within its budget.

``memory_killed``: the raylet's memory monitor is killing the actor's worker and said so
(its WorkerKilled notice comes before the SIGKILL). The state does not change yet; the
``worker_died`` that follows restarts the actor within max_restarts, as any death, but
its cause (and the ActorDiedError its callers get when it is dead) is the monitor's text.
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
    (PENDING_CREATION, "node_died"): PENDING_CREATION,   # placed again; no restart counted
    (PENDING_CREATION, "memory_killed"): PENDING_CREATION,  # until worker_died
    (ALIVE, "exited"): DEAD,
    (ALIVE, "worker_died/restart"): RESTARTING,
    (ALIVE, "worker_died/no_restart"): DEAD,
    (ALIVE, "kill/no_restart"): DEAD,
    (ALIVE, "kill/restart"): ALIVE,        # until its worker's stream breaks: worker_died
    (ALIVE, "node_died/restart"): RESTARTING,
    (ALIVE, "node_died/no_restart"): DEAD,
    (ALIVE, "reattached"): ALIVE,          # a restarted GCS found its worker and lease
    (ALIVE, "memory_killed"): ALIVE,       # until its worker's stream breaks: worker_died
    (RESTARTING, "lease_granted"): RESTARTING,
    (RESTARTING, "created"): ALIVE,
    (RESTARTING, "unschedulable"): DEAD,
    (RESTARTING, "constructor_failed"): DEAD,
    (RESTARTING, "worker_died/restart"): RESTARTING,
    (RESTARTING, "worker_died/no_restart"): DEAD,
    (RESTARTING, "kill/no_restart"): DEAD,
    (RESTARTING, "kill/restart"): RESTARTING,
    (RESTARTING, "internal_error"): DEAD,
    (RESTARTING, "node_died/restart"): RESTARTING,
    (RESTARTING, "node_died/no_restart"): DEAD,
    (RESTARTING, "memory_killed"): RESTARTING,
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
        self.memory_kill = ""                 # the memory monitor's notice about its worker

    @classmethod
    def restored(cls, state: int, max_restarts: int, num_restarts: int, death_cause: str = "",
                 death_error: bytes = b"") -> Tuple["ActorLifecycle", List[Action]]:
        """The lifecycle of an actor a restarted GCS read from its store, and what to do.

        ALIVE: its worker is taken to hold its lease still (``leased``) until its raylet
        answers; PENDING_CREATION and RESTARTING: a placement was under way when the GCS
        died, so it starts again (the old lease, if any, is returned by the manager)."""
        life = cls(max_restarts)
        life.state = state
        life.num_restarts = num_restarts
        life.death_cause = death_cause
        life.death_error = death_error
        if state == ALIVE:
            life.leased = True
            return life, []
        if state in (PENDING_CREATION, RESTARTING):
            return life, [Place()]
        return life, []

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

    def kill_requested(self, no_restart: bool, reason: str, error: bytes = b"") -> List[Action]:
        """kill(), its owner's exit, its placement group's removal. With no_restart it is
        dead at once; either way its worker is killed (then worker_died decides). `error`
        (serialized) is what its callers get, when not ActorDiedError."""
        nxt = self._go("kill/no_restart" if no_restart else "kill/restart")
        if nxt is None:
            return []
        self.kill = (no_restart, reason)
        if no_restart:
            self.intentional = True
            return self._die(reason, error)
        if self.leased:
            return [ReturnLease()]
        return []

    def memory_killed(self, message: str) -> List[Action]:
        """The memory monitor is killing the actor's current worker (`message`: Ray's
        text, with the node's figures); the worker_died that follows says so."""
        if self._go("memory_killed") is None:
            return []
        self.memory_kill = message
        return [Event("oom_killed", f"the memory monitor is killing its worker: "
                                    f"{message.splitlines()[0] if message else ''}", "WARNING")]

    def worker_died(self, pid: int, error: str) -> List[Action]:
        """The actor's worker stream broke: restart it if the budget allows."""
        self.leased = False
        oom, self.memory_kill = self.memory_kill, ""
        if self.state == DEAD:
            return []
        kill, self.kill = self.kill, None
        if kill is not None and kill[0]:
            self.intentional = True
            return self._die(kill[1])
        if kill is None and oom:
            return self._restart_or_die(
                "worker_died", f"its worker process (pid {pid}) was killed by the memory "
                               f"monitor because the node ran low on memory", detail=oom)
        cause = (f"its worker process (pid {pid}) died ({error})" if kill is None
                 else f"it was killed ({kill[1]})")
        return self._restart_or_die("worker_died", cause)

    def worker_lost_while_down(self, pid: int) -> List[Action]:
        """A restarted GCS asked the actor's raylet, which no longer holds its lease: the
        worker died while the GCS was down (restarted within the budget, as any death)."""
        return self.worker_died(pid, "it exited while the GCS was down")

    def reattached(self) -> List[Action]:
        """A restarted GCS found the actor's worker still leased: nothing changes."""
        if self._go("reattached") is None:
            return []
        self.leased = True
        return [Event("reattached", "found alive after the GCS restarted")]

    def node_died(self, node: str, reason: str, pid: int = 0) -> List[Action]:
        """The node its worker ran on (or was being created on) is dead; the worker and
        its lease went with it."""
        self.leased = False
        self.requesting = False
        self.memory_kill = ""
        if self.state == DEAD:
            return []
        kill, self.kill = self.kill, None
        if kill is not None and kill[0]:
            self.intentional = True
            return self._die(kill[1])
        where = f"node {node}" + (f" (worker pid {pid})" if pid else "")
        cause = f"its {where} died: {reason}"
        if self.state == PENDING_CREATION:
            self.state = self._go("node_died") or self.state
            return [Event("rescheduling", f"{cause}; creating it on another node", "WARNING"),
                    Place()]
        return self._restart_or_die("node_died", cause)

    def _restart_or_die(self, stimulus: str, cause: str, detail: str = "") -> List[Action]:
        """`detail` (the memory monitor's text) follows the cause of death on lines of its
        own; the restart's event names the cause only."""
        budget = "inf" if self.max_restarts == -1 else str(self.max_restarts)
        if self.max_restarts == -1 or self.num_restarts < self.max_restarts:
            nxt = self._go(f"{stimulus}/restart")
            if nxt is None:  # pragma: no cover - every live state has the row
                raise InvalidTransition(f"{stimulus} in {self.state_name}")
            self.state = nxt
            self.num_restarts += 1
            return [Publish(), Event("restarting",
                                     f"{cause}; restart {self.num_restarts}/{budget}", "WARNING"),
                    Place()]
        return self._die(f"{cause}; no restarts left (max_restarts={self.max_restarts})"
                         + (f".\n{detail}" if detail else ""))
