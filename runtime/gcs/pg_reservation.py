"""One placement group's two-phase reservation, as a sans-I/O state machine.

The GCS reserves a group's bundles with RPCs to several raylets: PrepareBundles on
every chosen node, CommitBundles on all of them once every prepare succeeded, and
CancelBundles to undo. Replies arrive in any order, and a removal can arrive at any
point in between. Each of those is a stimulus (a method call) that returns the RPCs to
send next; ``placement_groups.py`` sends them and feeds every reply back. Nothing here
touches a socket, so each interleaving is unit-tested (tests/test_placement_groups.py).

Invariants:

* a removed group is never created, and every reply that may mean "this node holds
  something" after the removal is answered with a Cancel;
* the removal itself cancels every bundle index on every live node (a Cancel of what a
  raylet does not hold is a no-op), and a raylet refuses a Prepare for a group it was
  told is removed, so a Prepare still in flight cannot reserve anything afterwards;
* a failed attempt is undone completely, and answered in full, before the next one
  starts: the next attempt's Prepare can never cross a Cancel of the previous one;
* an RPC that failed without an answer (``LOST``) may have taken effect: it is
  cancelled like a success.

Two stimuli come from failures elsewhere (issue 12). ``node_died``: a created group with
bundles on a dead node keeps its other bundles (``kept``) and goes back to PENDING for
the lost ones only; the next attempt places just those (its Created names every
bundle's node). ``recover``: a restarted GCS found the group mid-attempt in its store;
every live node is told to cancel that attempt's bundles (the attempt number was stored
before its Prepares went out, so a late Prepare of it is refused too), and the group is
then PENDING again.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

NodeId = bytes


class Outcome(Enum):
    OK = "ok"              # the raylet did it
    REFUSED = "refused"    # the raylet answered no: it holds nothing for this request
    LOST = "lost"          # no answer (timeout, node unreachable): it may have done it


class State(Enum):
    PENDING = "PENDING"        # nothing reserved, nothing in flight: ready for an attempt
    PREPARING = "PREPARING"    # Prepare sent to every chosen node
    COMMITTING = "COMMITTING"  # every Prepare succeeded; Commit sent to every node
    ABORTING = "ABORTING"      # the attempt failed: undoing it, waiting for every answer
    CREATED = "CREATED"
    REMOVED = "REMOVED"


# -- actions: what the I/O layer must do ---------------------------------------------------------
@dataclass(frozen=True)
class Prepare:
    node: NodeId
    indexes: Tuple[int, ...]


@dataclass(frozen=True)
class Commit:
    node: NodeId
    indexes: Tuple[int, ...]


@dataclass(frozen=True)
class Cancel:
    node: NodeId
    indexes: Tuple[int, ...]
    remove: bool = False  # the group is removed: the raylet also refuses it from now on


@dataclass(frozen=True)
class Created:
    bundle_nodes: Tuple[NodeId, ...]


@dataclass(frozen=True)
class Retry:
    """The attempt failed and is fully undone: the group is PENDING again."""
    reason: str


Rpc = (Prepare, Commit, Cancel)


class GroupReservation:
    """The reservation state of one group; see the module docstring."""

    def __init__(self, bundle_count: int) -> None:
        self.bundle_count = bundle_count
        self.state = State.PENDING
        self.attempts = 0
        self.placement: Tuple[NodeId, ...] = ()
        self.reason = ""
        self.in_flight = 0  # RPCs sent whose outcome has not been fed back yet
        self.uncancelled: Dict[NodeId, Tuple[int, ...]] = {}  # Cancels that got no answer
        self._nodes: Dict[NodeId, Tuple[int, ...]] = {}   # this attempt: node -> indexes
        self._waiting: set = set()    # nodes of this attempt whose Prepare/Commit is in flight
        self._done: set = set()       # nodes that prepared (PREPARING) or committed (COMMITTING)
        self._cancelled: set = set()  # nodes of this attempt already sent a Cancel
        # Bundles committed by an earlier attempt that stay where they are while the others
        # are placed again (their node is alive): index -> node.
        self.kept: Dict[int, NodeId] = {}

    @classmethod
    def restored(cls, bundle_count: int, state: State, attempts: int,
                 placement: Sequence[NodeId] = ()) -> "GroupReservation":
        """A group a restarted GCS read from its store. CREATED keeps its placement;
        REMOVED stays removed; any other state is mid-way and needs ``recover``, with the
        bundles that have a node in `placement` kept (a group being rescheduled)."""
        r = cls(bundle_count)
        r.attempts = attempts
        if state in (State.CREATED, State.REMOVED):
            r.state = state
            r.placement = tuple(placement)
        else:
            r.state = State.ABORTING
            r.kept = {i: n for i, n in enumerate(placement) if n}
        return r

    @property
    def busy(self) -> bool:
        """True while an RPC of this group is in flight (a new attempt must wait)."""
        return self.in_flight > 0

    # -- stimuli ------------------------------------------------------------------------------
    @property
    def missing(self) -> List[int]:
        """The bundles the next attempt must place (all of them, less the kept ones)."""
        return [i for i in range(self.bundle_count) if i not in self.kept]

    def begin(self, placement: Union[Sequence[NodeId], Mapping[int, NodeId]]) -> List[Prepare]:
        """Start an attempt with bundle i on placement[i] (a sequence for every bundle, or
        index -> node for the missing ones); nothing if not PENDING and idle."""
        if self.state is not State.PENDING or self.busy:
            return []
        assigned = dict(placement) if isinstance(placement, Mapping) else dict(enumerate(placement))
        if sorted(assigned) != self.missing:
            raise ValueError(f"a placement names bundles {sorted(assigned)} where bundles "
                             f"{self.missing} of {self.bundle_count} need a node")
        self.attempts += 1
        self.placement = tuple(assigned.get(i, self.kept.get(i, b"")) for i in
                               range(self.bundle_count))
        self.reason = ""
        self._nodes = {}
        for i, node in sorted(assigned.items()):
            self._nodes[node] = self._nodes.get(node, ()) + (i,)
        self._waiting = set(self._nodes)
        self._done = set()
        self._cancelled = set()
        self.state = State.PREPARING
        return self._send([Prepare(n, idxs) for n, idxs in self._nodes.items()])

    def prepared(self, action: Prepare, outcome: Outcome, why: str = "") -> list:
        self._answered(action.node)
        if self.state is State.PREPARING and outcome is Outcome.OK:
            self._done.add(action.node)
            if self._done == set(self._nodes):
                self.state = State.COMMITTING
                self._done = set()
                self._waiting = set(self._nodes)
                return self._send([Commit(n, idxs) for n, idxs in self._nodes.items()])
            return []
        if self.state is State.PREPARING:
            return self._abort(why or "a raylet did not answer PrepareBundles",
                               also=action.node if outcome is Outcome.LOST else None)
        if outcome is Outcome.REFUSED:
            return self._settle()
        return self._send([self._cancel(action.node, action.indexes)]) + self._settle()

    def committed(self, action: Commit, outcome: Outcome, why: str = "") -> list:
        self._answered(action.node)
        if self.state is State.COMMITTING and outcome is Outcome.OK:
            self._done.add(action.node)
            if self._done == set(self._nodes):
                self.state = State.CREATED
                self.kept = {}
                return [Created(self.placement)]
            return []
        if self.state is State.COMMITTING:
            # A Commit that failed may still have happened, or left the Prepare in place:
            # the node is cancelled whatever it answered.
            return self._abort(why or "a raylet did not answer CommitBundles", also=action.node)
        return self._send([self._cancel(action.node, action.indexes)]) + self._settle()

    def cancelled(self, action: Cancel, outcome: Outcome) -> list:
        self.in_flight -= 1
        if outcome is Outcome.OK:
            self.uncancelled.pop(action.node, None)
        else:
            self.uncancelled[action.node] = action.indexes
        return self._settle()

    def remove(self, live_nodes: Iterable[NodeId]) -> List[Cancel]:
        """The group is removed: cancel every bundle on every live node (and on every node
        of the attempt), whatever is known of it, and never create it."""
        if self.state is State.REMOVED:
            return []
        self.state = State.REMOVED
        every = tuple(range(self.bundle_count))
        nodes = list(dict.fromkeys([*live_nodes, *self._nodes, *self.kept.values(),
                                    *(n for n in self.placement if n)]))
        self.kept = {}
        return self._send([Cancel(n, every, remove=True) for n in nodes])

    def node_died(self, node: NodeId) -> Tuple[List[int], list]:
        """`node` is dead: (the bundles lost with it, the RPCs to send). A created group
        keeps its other bundles and is PENDING for the lost ones; one mid-attempt that
        counted on a kept bundle there undoes the attempt (its answers on `node` itself
        come back LOST anyway); a removed group has nothing to lose."""
        if self.state is State.REMOVED:
            return [], []
        if self.state is State.CREATED:
            lost = [i for i, n in enumerate(self.placement) if n == node]
            if not lost:
                return [], []
            self.kept = {i: n for i, n in enumerate(self.placement) if n != node}
            self.state = State.PENDING
            self.reason = f"node {node.hex()[:8]} died with bundle(s) {lost}; placing them again"
            return lost, []
        lost = sorted(i for i, n in self.kept.items() if n == node)
        if not lost:
            return [], []
        for i in lost:
            del self.kept[i]
        why = f"node {node.hex()[:8]} died with bundle(s) {lost}"
        if self.state in (State.PREPARING, State.COMMITTING):
            return lost, self._abort(why, also=None)
        return lost, []

    def recover(self, live_nodes: Iterable[NodeId]) -> List[Cancel]:
        """After ``restored`` mid-attempt: cancel that attempt's bundles (all but the kept
        ones) on every live node; once all answered the group is PENDING (Retry)."""
        if self.state is not State.ABORTING or self.busy:
            return []
        self.reason = "the GCS restarted during an attempt; undoing it"
        redo = tuple(self.missing)
        self._nodes = {}
        self._waiting = set()
        cancels = [Cancel(n, redo) for n in dict.fromkeys(live_nodes)]
        return self._send(cancels) + self._settle()

    # -- helpers ------------------------------------------------------------------------------
    def _send(self, actions: list) -> list:
        self.in_flight += sum(1 for a in actions if isinstance(a, Rpc))
        return actions

    def _answered(self, node: NodeId) -> None:
        self.in_flight -= 1
        self._waiting.discard(node)

    def _cancel(self, node: NodeId, indexes: Tuple[int, ...]) -> Cancel:
        self._cancelled.add(node)
        return Cancel(node, indexes, remove=self.state is State.REMOVED)

    def _abort(self, reason: str, also: Optional[NodeId]) -> list:
        """Undo this attempt: cancel every node that may hold something and has answered;
        the ones still in flight are cancelled when they answer."""
        self.state = State.ABORTING
        self.reason = reason
        holders = set(self._done)
        if also is not None:
            holders.add(also)
        cancels = [self._cancel(n, self._nodes[n]) for n in self._nodes
                   if n in holders and n not in self._waiting and n not in self._cancelled]
        return self._send(cancels) + self._settle()

    def _settle(self) -> list:
        if self.state is State.ABORTING and not self.busy:
            self.state = State.PENDING
            return [Retry(self.reason)]
        return []
