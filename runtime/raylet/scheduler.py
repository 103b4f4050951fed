"""The raylet's lease scheduler as a sans-I/O state machine.

Stimuli (method calls: a lease is requested, returned or cancelled, a worker
registers, blocks, dies, a client disconnects) mutate the state; ``schedule()``
returns the actions the I/O layer must carry out (grant a lease, start
workers, reject, warn, kill a worker). Nothing here touches a socket or a
process, so every policy is unit-testable (tests/test_scheduler.py), in the
style of Dask's worker_state_machine.

Policy:
* requests are served FIFO, but a request that cannot be served now never
  blocks later ones that can (no head-of-line blocking);
* a request that no node can ever satisfy stays pending and produces one
  warning naming the missing resources; it is granted if resources appear;
* a worker blocked in ``get`` lends its lease's CPUs back to the node until it
  unblocks (so nested tasks cannot deadlock the node);
* at most ``max_starting`` workers start at once (starting a Python process is
  the expensive part on small machines);
* every request it cannot grant yet records why (``waiting``), cheaply, as a code;
  ``pending_reasons()`` turns the codes into text ("needs {GPU: 1}; no alive node
  has GPU") for the GCS, the state API and raytop, off the hot path;
* a SPREAD request is placed once, when first scheduled, by Ray's spread policy:
  round-robin over the alive nodes in node-id order (this one included), taking
  the next node that has the resources free now, else the next one that has them
  at all; a remote choice is spilled back to that node's raylet (which must then
  grant it) and charged to our view of that node until the GCS reports it again;
* workers are pooled by runtime environment (Ray's runtime_env hash, ``env``): a
  request is granted only a worker started for its environment, "" being none. An
  environment is set up once per node (``SetupEnv``) before its first worker starts;
  while that runs, its requests wait (WAIT_ENV) without holding a starting slot, so a
  long pip install never keeps other work from getting workers. If the setup fails,
  every request waiting for that environment is rejected with the reason, and the next
  request for it tries again;
* a request with a label selector (Ray's ``label_selector``, compiled by runtime/labels.py)
  runs only on a node whose labels match it: this node, else one it spills back to, else
  it waits, as a request for missing resources does, until a matching node joins;
* a worker whose lease comes back with ``worker_exiting`` (it reached its function's
  max_calls and exits) leaves the pool at once: it is never granted again, and its exit
  is no crash;
* a lease keeps what its request said the memory monitor weighs (``retriable``, the
  function's name, actor or not); the monitor (memory_monitor.py) reads ``leases``.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from runtime.labels import Selector, node_labels
from runtime.raylet.resources import (GpuInstances, Resources, add, bundle_resources, describe,
                                      fits, missing, subtract)

RequestKey = Tuple[int, int]  # (client id, request id)
#: Removed placement groups the raylet remembers (see cancel_bundles).
REMOVED_GROUPS_KEPT = 10_000
#: A hard NodeAffinity request naming a node this raylet's view does not have waits this
#: long for the view to catch up (the GCS may know a node that joined, or came back, a
#: moment ago) before it is rejected as naming no alive node. A node the view saw leave
#: is rejected at once.
AFFINITY_UNKNOWN_NODE_GRACE_S = 3.0
#: Nodes remembered as gone from the view (newest last), for that rule.
DEPARTED_NODES_KEPT = 10_000


def _remember(table: "OrderedDict", key: str, value) -> None:
    """Set table[key] as the newest entry, forgetting the oldest beyond REMOVED_GROUPS_KEPT."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMOVED_GROUPS_KEPT:
        table.popitem(last=False)


# Why a request waits (PendingRequest.waiting); see Scheduler.reason_text.
WAIT_NEW, WAIT_INFEASIBLE, WAIT_GROUP, WAIT_RESOURCES, WAIT_WORKER, WAIT_GPU, WAIT_ENV = range(7)


def brief(res: Resources) -> str:
    """{GPU: 1, CPU: 2}: resources as an operator reads them (no quotes)."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _group_of(resource: str) -> str:
    """The placement group a bundle resource name belongs to ('CPU_group_0_<pg>' -> pg)."""
    if "_group_" not in resource:
        return ""
    return resource.rsplit("_", 1)[1]


@dataclass
class PendingRequest:
    client: int
    request_id: int
    resources: Resources
    strategy: str = "DEFAULT"
    affinity_node: bytes = b""
    soft: bool = False
    grant_or_reject: bool = False
    name: str = ""
    hold: Optional[Resources] = None  # held while leased, when it differs from `resources`
    since: float = field(default_factory=time.monotonic)
    warned: bool = False
    told_queued: bool = False
    spread_placed: bool = False  # SPREAD: its node is chosen (it waits here if this one)
    job_id: bytes = b""
    waiting: int = WAIT_NEW      # why it is not granted yet (WAIT_*)
    env: str = ""                # the runtime_env hash of the worker it needs ("" = none)
    selector: Optional[Selector] = None  # the node labels it needs (None: any node)
    retriable: bool = False      # its work runs again if the worker is killed (memory monitor)
    is_actor: bool = False


@dataclass
class Demand:
    """A pending request as the GCS and `status` see it."""
    resources: Resources
    infeasible: bool
    name: str
    job_id: bytes
    reason: str


@dataclass
class Worker:
    worker_id: bytes
    pid: int
    port: int
    client: int
    lease_id: Optional[int] = None
    idle_since: float = field(default_factory=time.monotonic)
    blocked: bool = False
    env: str = ""  # the runtime_env hash it was started for


@dataclass
class Lease:
    lease_id: int
    client: int
    request_id: int
    worker_id: bytes
    resources: Resources
    gpu_ids: List[int]
    lent: Resources = field(default_factory=dict)
    # What the memory monitor weighs and names (from the request): lease ids grow with
    # each grant, so the highest is the newest.
    retriable: bool = False
    name: str = ""
    is_actor: bool = False


# -- actions --------------------------------------------------------------------------
@dataclass
class Grant:
    client: int
    request_id: int
    lease_id: int
    worker: Worker
    gpu_ids: List[int]


@dataclass
class Reject:
    client: int
    request_id: int
    message: str
    runtime_env: bool = False  # its runtime_env could not be set up (RuntimeEnvSetupError)
    group_removed: bool = False  # its placement group was removed (TaskPlacementGroupRemoved)


@dataclass
class Spillback:
    client: int
    request_id: int
    raylet_address: str


@dataclass
class Warn:
    client: int
    request_id: int
    message: str


@dataclass
class Queued:
    """The request waits for busy resources (the client may pipeline meanwhile)."""
    client: int
    request_id: int


@dataclass
class StartWorkers:
    count: int
    env: str = ""  # started for this runtime_env (set up already)


@dataclass
class SetupEnv:
    """Set up the runtime_env `env` on this node, then report env_ready or env_failed."""
    env: str


@dataclass
class KillWorker:
    worker_id: bytes
    reason: str


@dataclass
class RemoteNode:
    """Another node as the GCS last reported it (for spillback)."""
    node_id: bytes
    raylet_address: str
    total: Resources
    available: Resources
    labels: Dict[str, str] = field(default_factory=dict)


class Scheduler:
    def __init__(self, node_id: bytes, total: Resources, gpu_ids: List[int],
                 max_starting: int = 2, soft_worker_limit: Optional[int] = None,
                 labels: Optional[Dict[str, str]] = None) -> None:
        self.node_id = node_id
        self.labels = node_labels(node_id.hex(), labels, total)  # with Ray's defaults
        self.total: Resources = dict(total)
        self.available: Resources = dict(total)
        self.gpus = GpuInstances(gpu_ids)
        self.pending: "OrderedDict[RequestKey, PendingRequest]" = OrderedDict()
        self.workers: Dict[bytes, Worker] = {}
        self.idle: List[bytes] = []  # LIFO: the warmest worker first
        self.leases: Dict[int, Lease] = {}
        self.starting = 0
        self.starting_env: Dict[str, int] = {}  # of `starting`, per runtime_env ("" too)
        self.max_starting = max_starting
        self.envs_ready: set = {""}   # runtime_envs set up on this node
        self.envs_setting_up: set = set()
        self.env_failures: Dict[str, str] = {}  # failed setups whose requests to reject
        self.soft_worker_limit = soft_worker_limit or max(1, int(total.get("CPU", 1)))
        self.remote_nodes: Dict[bytes, RemoteNode] = {}
        self.departed: "OrderedDict[bytes, None]" = OrderedDict()  # left the view
        self.prepared: Dict[Tuple[str, int], Resources] = {}
        self.committed: Dict[Tuple[str, int], Resources] = {}
        # Removed groups, newest last: late Prepares for them are refused. A Prepare is late
        # by seconds at most, so the oldest are forgotten beyond REMOVED_GROUPS_KEPT.
        self.removed_groups: "OrderedDict[str, None]" = OrderedDict()
        # The highest cancelled attempt of each group (BundleRequest.attempt), same bound.
        self.cancelled_attempts: "OrderedDict[str, int]" = OrderedDict()
        self.draining = False
        self._lease_ids = itertools.count(1)
        self._spread_next = 0  # round-robin position of the SPREAD policy

    # -- stimuli ---------------------------------------------------------------------------
    def request_lease(self, req: PendingRequest) -> None:
        self.pending[(req.client, req.request_id)] = req

    def cancel_request(self, client: int, request_id: int) -> bool:
        return self.pending.pop((client, request_id), None) is not None

    def worker_starting(self, n: int = 1, env: str = "") -> None:
        self.starting += n
        self.starting_env[env] = self.starting_env.get(env, 0) + n

    def worker_start_failed(self, env: str = "") -> None:
        self.starting = max(0, self.starting - 1)
        self._started_one(env)

    def worker_registered(self, worker: Worker) -> None:
        self.starting = max(0, self.starting - 1)
        self._started_one(worker.env)
        self.workers[worker.worker_id] = worker
        self.idle.append(worker.worker_id)

    def _started_one(self, env: str) -> None:
        left = self.starting_env.get(env, 0) - 1
        if left > 0:
            self.starting_env[env] = left
        else:
            self.starting_env.pop(env, None)

    def env_ready(self, env: str) -> None:
        """The runtime_env `env` is set up on this node: its workers may start."""
        self.envs_setting_up.discard(env)
        self.envs_ready.add(env)

    def env_failed(self, env: str, message: str) -> None:
        """Setting up `env` failed (or a worker started for it died before registering):
        the next schedule() rejects the requests waiting for it with `message`; a later
        request sets it up again."""
        if not env:
            return  # no environment to blame: a plain worker's failed start is retried
        self.envs_setting_up.discard(env)
        self.envs_ready.discard(env)
        self.env_failures[env] = message

    def return_lease(self, lease_id: int, worker_exiting: bool = False) -> Optional[Worker]:
        """The holder is done with the lease. With `worker_exiting` the worker exits
        (max_calls): it leaves the pool instead of idling, so its exit is no crash."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        self._release(lease)
        if worker_exiting:
            return self.workers.pop(lease.worker_id, None)
        w = self.workers.get(lease.worker_id)
        if w is not None:
            w.lease_id = None
            w.blocked = False
            w.idle_since = time.monotonic()
            self.idle.append(w.worker_id)
        return w

    def worker_died(self, worker_id: bytes) -> Optional[Lease]:
        w = self.workers.pop(worker_id, None)
        if w is None:
            return None
        if worker_id in self.idle:
            self.idle.remove(worker_id)
        if w.lease_id is not None:
            lease = self.leases.pop(w.lease_id, None)
            if lease is not None:
                self._release(lease)
            return lease
        return None

    def client_disconnected(self, client: int) -> List[KillWorker]:
        """A driver or worker's stream closed: drop its requests and leases.

        Workers leased to it may still be running its tasks, which nobody will
        collect: they are killed (and replaced on demand)."""
        for key in [k for k in self.pending if k[0] == client]:
            del self.pending[key]
        kills = []
        for lease in [ls for ls in self.leases.values() if ls.client == client]:
            kills.append(KillWorker(lease.worker_id, "its lease holder disconnected"))
        return kills

    def set_blocked(self, worker_id: bytes, blocked: bool) -> None:
        w = self.workers.get(worker_id)
        if w is None or w.blocked == blocked:
            return
        w.blocked = blocked
        lease = self.leases.get(w.lease_id) if w.lease_id is not None else None
        if lease is None:
            return
        cpu = lease.resources.get("CPU", 0.0)
        if blocked and cpu:
            lease.lent = {"CPU": cpu}
            add(self.available, lease.lent)
        elif not blocked and lease.lent:
            subtract(self.available, lease.lent)
            lease.lent = {}

    # -- decisions -------------------------------------------------------------------------
    def schedule(self) -> list:
        actions: list = []
        # Resources that requests waiting for a starting worker will take: without
        # this, every queued request would ask for a worker of its own.
        spoken_for: Resources = {}
        need: Dict[str, int] = {}  # workers to start, per runtime_env
        failures = self.env_failures
        if failures:
            self.env_failures = {}
        for key, req in list(self.pending.items()):
            if failures and req.env in failures:
                del self.pending[key]
                actions.append(Reject(req.client, req.request_id, failures[req.env],
                                      runtime_env=True))
                continue
            target = self._placement(req, spoken_for)
            if isinstance(target, Reject):
                del self.pending[key]
                actions.append(target)
                continue
            if isinstance(target, Spillback):
                del self.pending[key]
                actions.append(target)
                continue
            if target == "unknown_node":
                req.waiting = WAIT_INFEASIBLE  # until the view has the node, or the grace ends
                continue
            if target == "infeasible":
                if req.strategy == "PLACEMENT_GROUP":
                    gone = next((g for g in (_group_of(k) for k in req.resources)
                                 if g and g in self.removed_groups), None)
                    if gone is not None:
                        del self.pending[key]
                        actions.append(Reject(req.client, req.request_id,
                                              f"its placement group {gone} was removed",
                                              group_removed=True))
                    req.waiting = WAIT_GROUP
                    continue  # otherwise it waits for its group to be created
                req.waiting = WAIT_INFEASIBLE
                if not req.warned:
                    req.warned = True
                    actions.append(Warn(req.client, req.request_id, self._infeasible_message(req)))
                continue
            if req.env not in self.envs_ready:
                req.waiting = WAIT_ENV
                if req.env not in self.envs_setting_up:
                    self.envs_setting_up.add(req.env)
                    actions.append(SetupEnv(req.env))
                continue
            if not fits(self.available, req.resources):
                req.waiting = WAIT_RESOURCES
                if not req.told_queued:
                    req.told_queued = True
                    actions.append(Queued(req.client, req.request_id))
                continue
            idle = self.idle
            if idle and self.workers[idle[-1]].env == req.env:
                slot: Optional[int] = len(idle) - 1  # the warmest worker: the common case
            else:
                slot = self._idle_slot(req.env)
            if slot is None:
                req.waiting = WAIT_WORKER
                free = dict(self.available)
                subtract(free, spoken_for)
                if fits(free, req.resources):
                    add(spoken_for, req.resources)
                    need[req.env] = need.get(req.env, 0) + 1
                continue
            held = req.resources if req.hold is None else req.hold
            gpu_ids = self.gpus.allocate(held.get("GPU", 0.0))
            if gpu_ids is None:
                req.waiting = WAIT_GPU
                continue
            worker = self.workers[self.idle.pop(slot)]
            lease = Lease(next(self._lease_ids), req.client, req.request_id, worker.worker_id,
                          dict(held), gpu_ids, retriable=req.retriable, name=req.name,
                          is_actor=req.is_actor)
            subtract(self.available, held)
            self.leases[lease.lease_id] = lease
            worker.lease_id = lease.lease_id
            del self.pending[key]
            actions.append(Grant(req.client, req.request_id, lease.lease_id, worker, gpu_ids))
        room = self.max_starting - self.starting
        for env, count in need.items():
            to_start = min(count - self.starting_env.get(env, 0), room)
            if to_start > 0:
                room -= to_start
                self.worker_starting(to_start, env)
                actions.append(StartWorkers(to_start, env))
        return actions

    def _idle_slot(self, env: str) -> Optional[int]:
        """Index in `idle` of the warmest idle worker of runtime_env `env`."""
        idle = self.idle
        for i in range(len(idle) - 1, -1, -1):
            if self.workers[idle[i]].env == env:
                return i
        return None

    # -- placement-group bundles (two-phase: prepare, then commit or cancel) ----------------------
    # The GCS sends Commit only once Prepare has answered, but a removal's Cancel can arrive
    # before, between or after them (the group was removed while its Prepare was in flight).
    # So a removed group is remembered (removed_groups): a later Prepare is refused and a
    # later Commit finds nothing prepared. Every step is idempotent, as a step whose answer
    # was lost may be sent again.
    def prepare_bundles(self, pg_hex: str, bundles: List[Tuple[int, Resources]],
                        attempt: int = 0) -> Optional[str]:
        """Reserve all bundles or none; None on success, else what is short. A Prepare of an
        attempt already cancelled here arrived after its Cancel (its answer was lost and
        the GCS gave up on it): it reserves nothing."""
        if pg_hex in self.removed_groups:
            return f"placement group {pg_hex} was removed; its bundles are not reserved"
        if attempt and attempt <= self.cancelled_attempts.get(pg_hex, 0):
            return (f"attempt {attempt} of placement group {pg_hex} was already cancelled; its "
                    f"bundles are not reserved")
        new = [(idx, res) for idx, res in bundles
               if (pg_hex, idx) not in self.prepared and (pg_hex, idx) not in self.committed]
        need: Resources = {}
        for _idx, res in new:
            add(need, res)
        if not fits(self.available, need):
            return f"not enough free resources on this node for {describe(need)}"
        subtract(self.available, need)
        for idx, res in new:
            self.prepared[(pg_hex, idx)] = dict(res)
        return None

    def commit_bundles(self, pg_hex: str, indexes: List[int]) -> None:
        """Turn prepared bundles into the group resources tasks and actors ask for."""
        for idx in indexes:
            res = self.prepared.pop((pg_hex, idx), None)
            if res is None:
                continue  # cancelled (or committed) already
            group = bundle_resources(pg_hex, idx, res)
            add(self.total, group)
            add(self.available, group)
            self.committed[(pg_hex, idx)] = res

    def cancel_bundles(self, pg_hex: str, indexes: List[int], remove: bool = False,
                       attempt: int = 0) -> List[KillWorker]:
        """Undo a prepare, or remove committed bundles: give their resources back and
        kill the workers that run inside them. With remove, requests still waiting for
        the group are rejected by the next schedule(), now and later."""
        kills = []
        suffix = f"_{pg_hex}"
        if remove:
            self.cancelled_attempts.pop(pg_hex, None)
            _remember(self.removed_groups, pg_hex, None)
        elif attempt > self.cancelled_attempts.get(pg_hex, 0):
            _remember(self.cancelled_attempts, pg_hex, attempt)
        for idx in indexes:
            res = self.prepared.pop((pg_hex, idx), None)
            if res is not None:
                add(self.available, res)
            res = self.committed.pop((pg_hex, idx), None)
            if res is not None:
                add(self.available, res)
        if not any(k[0] == pg_hex for k in self.committed):
            for name in [k for k in self.total if k.endswith(suffix) and "_group_" in k]:
                del self.total[name]
                self.available.pop(name, None)
            for lease in self.leases.values():
                if any(k.endswith(suffix) for k in lease.resources):
                    kills.append(KillWorker(lease.worker_id, f"placement group {pg_hex} was removed"))
        return kills

    def idle_workers_to_stop(self, now: float, idle_timeout: float) -> List[bytes]:
        """Idle workers beyond the soft limit that have idled longer than idle_timeout."""
        excess = len(self.workers) - self.soft_worker_limit
        out = []
        for wid in list(self.idle):
            if excess <= 0:
                break
            if now - self.workers[wid].idle_since >= idle_timeout:
                out.append(wid)
                excess -= 1
        return out

    def pending_demand(self) -> List[Tuple[Resources, bool]]:
        """(shape, infeasible) of every pending request, for the GCS and `status`."""
        return [(r.resources, not self._feasible_here(r)) for r in self.pending.values()]

    def pending_demand_detail(self) -> List[Demand]:
        """Every pending request with its function, job and why it waits (the GCS joins
        them to the tasks it lists: "why is it pending?")."""
        return [Demand(r.resources, not self._feasible_here(r), r.name, r.job_id,
                       text) for r, text in self.pending_reasons()]

    def pending_reasons(self) -> List[Tuple[PendingRequest, str]]:
        """(request, why it waits) for every pending request, in queue order."""
        return [(r, self.reason_text(r)) for r in self.pending.values()]

    def reason_text(self, req: PendingRequest) -> str:
        """Why req waits, in words, from the code schedule() recorded."""
        code = req.waiting
        if code == WAIT_INFEASIBLE:
            return self._infeasible_reason(req)
        if code == WAIT_GROUP:
            group = next((g for g in map(_group_of, req.resources) if g), "")
            return f"waiting for placement group {group} to be created on this node"
        if code == WAIT_RESOURCES:
            free = {k: max(0.0, self.available.get(k, 0.0)) for k in req.resources}
            total = {k: self.total.get(k, 0.0) for k in req.resources}
            return (f"waiting for free resources: needs {brief(req.resources)}; {brief(free)} "
                    f"of {brief(total)} free")
        if code == WAIT_WORKER:
            return (f"waiting for a worker to start ({self.starting} starting, "
                    f"{len(self.workers)} running on this node)")
        if code == WAIT_GPU:
            return "waiting for a free GPU instance"
        if code == WAIT_ENV:
            return "waiting for its runtime_env to be set up on this node"
        return "waiting to be scheduled"

    def _infeasible_reason(self, req: PendingRequest) -> str:
        res = req.resources
        parts = []
        for k in sorted(missing(self.total, res)):
            largest = max([self.total.get(k, 0.0)] +
                          [n.total.get(k, 0.0) for n in self.remote_nodes.values()])
            parts.append(f"no alive node has {k}" if largest <= 0
                         else f"the largest node has {k}: {largest:g}")
        if not parts and req.selector is not None:
            parts.append(self._labels_reason(req))
        return f"needs {brief(res)}; {', '.join(parts) or 'no node can run it'}"

    def _labels_reason(self, req: PendingRequest) -> str:
        """Why no node takes a request whose resources some node has: its labels."""
        sized = [n for n in self._nodes() if not missing(n.total, req.resources)]
        return (f"no alive node{' with these resources' if sized else ''} has labels "
                f"matching label_selector {req.selector}")

    def set_remote_nodes(self, remote: Dict[bytes, RemoteNode]) -> None:
        """The other alive nodes, as the GCS lists them now."""
        for node_id in self.remote_nodes.keys() - remote.keys():
            self.departed[node_id] = None
            if len(self.departed) > DEPARTED_NODES_KEPT:
                self.departed.popitem(last=False)
        for node_id in remote:
            self.departed.pop(node_id, None)  # back (a node id is not reused, but be exact)
        self.remote_nodes = remote

    def waits_for_view(self) -> bool:
        """Whether a request waits for a node this raylet's view does not have yet: the
        scheduler must run again at the next refresh of the view even if it is unchanged
        (the grace may have run out)."""
        return any(r.strategy == "NODE_AFFINITY" and not r.soft and r.affinity_node
                   and r.affinity_node != self.node_id
                   and r.affinity_node not in self.remote_nodes for r in self.pending.values())

    # -- helpers -----------------------------------------------------------------------------
    def _nodes(self) -> List[RemoteNode]:
        """Every alive node as the scheduler sees it, this one first."""
        here = RemoteNode(self.node_id, "", self.total, self.available, self.labels)
        return [here] + [n for n in self.remote_nodes.values() if n.node_id != self.node_id]

    @staticmethod
    def _can_run(node: RemoteNode, req: PendingRequest) -> bool:
        """Whether the node could ever run req: it has the resources and matching labels."""
        return not missing(node.total, req.resources) and (
            req.selector is None or req.selector.matches(node.labels))

    def _feasible_here(self, req: PendingRequest) -> bool:
        return not missing(self.total, req.resources) and (
            req.selector is None or req.selector.matches(self.labels))

    def _placement(self, req: PendingRequest, spoken_for: Optional[Resources] = None):
        if self.draining:
            for node in self.remote_nodes.values():
                if self._can_run(node, req) and not req.grant_or_reject:
                    return Spillback(req.client, req.request_id, node.raylet_address)
            return Reject(req.client, req.request_id,
                          f"node {self.node_id.hex()[:8]} is draining (leaving the cluster) and "
                          f"no other node can run {describe(req.resources)}")
        if req.strategy == "NODE_AFFINITY" and req.affinity_node and req.affinity_node != self.node_id:
            node = self.remote_nodes.get(req.affinity_node)
            if node is not None and not req.grant_or_reject:
                return Spillback(req.client, req.request_id, node.raylet_address)
            if not req.soft:
                if (req.affinity_node not in self.departed
                        and time.monotonic() - req.since < AFFINITY_UNKNOWN_NODE_GRACE_S):
                    return "unknown_node"
                return Reject(req.client, req.request_id,
                              f"node {req.affinity_node.hex()} named by NodeAffinitySchedulingStrategy "
                              f"is not alive in the cluster (soft=False)")
        if req.strategy == "SPREAD" and not req.grant_or_reject and not req.spread_placed:
            req.spread_placed = True
            node = self._spread_choice(req, spoken_for or {})
            if node is not None and node.node_id != self.node_id:
                subtract(node.available, req.resources)
                return Spillback(req.client, req.request_id, node.raylet_address)
        if self._feasible_here(req):
            return "local"
        if not req.grant_or_reject:
            for node in self.remote_nodes.values():
                if self._can_run(node, req):
                    return Spillback(req.client, req.request_id, node.raylet_address)
        return "infeasible"

    def _spread_choice(self, req: PendingRequest, spoken_for: Resources
                       ) -> Optional[RemoteNode]:
        """Ray's SpreadSchedulingPolicy: the next node in round-robin order (of the nodes
        whose labels match) with the resources free now, else the next with them at all;
        None when no node could ever run it. This node is a RemoteNode too, for uniformity
        (its node_id is ours)."""
        res = req.resources
        here_free = dict(self.available)
        subtract(here_free, spoken_for)
        nodes = [RemoteNode(self.node_id, "", self.total, here_free, self.labels)]
        nodes += [n for n in self.remote_nodes.values() if n.node_id != self.node_id]
        if req.selector is not None:
            nodes = [n for n in nodes if req.selector.matches(n.labels)]
        nodes.sort(key=lambda n: n.node_id)
        count = len(nodes)
        for free_now in (True, False):
            for i in range(count):
                node = nodes[(self._spread_next + i) % count]
                if missing(node.total, res) or (free_now and not fits(node.available, res)):
                    continue
                self._spread_next = (self._spread_next + i + 1) % count
                return node
        return None

    def _infeasible_message(self, req: PendingRequest) -> str:
        miss = missing(self.total, req.resources)
        what = ", ".join(f"{k} (needs {v:g}, the largest node has "
                         f"{max([self.total.get(k, 0.0)] + [n.total.get(k, 0.0) for n in self.remote_nodes.values()]):g})"
                         for k, v in sorted(miss.items()))
        if not what:  # the resources exist: the labels are what no node has
            return (f"The request {describe(req.resources)}"
                    f"{' of ' + req.name if req.name else ''} with label_selector "
                    f"{req.selector} cannot be scheduled: {self._labels_reason(req)}. It stays "
                    f"pending until such a node joins; other work is not blocked.")
        return (f"The resource request {describe(req.resources)}"
                f"{' of ' + req.name if req.name else ''} cannot be scheduled on any node of the "
                f"cluster: missing {what}. It stays pending until a node with these resources "
                f"joins; other work is not blocked.")

    def _release(self, lease: Lease) -> None:
        held = {k: v for k, v in lease.resources.items() if k in self.total}  # removed groups stay gone
        if lease.lent:
            subtract(held, lease.lent)
        add(self.available, held)
        self.gpus.release(lease.gpu_ids, lease.resources.get("GPU", 0.0))
