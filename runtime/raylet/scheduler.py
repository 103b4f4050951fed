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
  grant it) and charged to our view of that node until the GCS reports it again.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from runtime.raylet.resources import (GpuInstances, Resources, add, bundle_resources, describe,
                                      fits, missing, subtract)

RequestKey = Tuple[int, int]  # (client id, request id)
#: Removed placement groups the raylet remembers (see cancel_bundles).
REMOVED_GROUPS_KEPT = 10_000


def _remember(table: "OrderedDict", key: str, value) -> None:
    """Set table[key] as the newest entry, forgetting the oldest beyond REMOVED_GROUPS_KEPT."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMOVED_GROUPS_KEPT:
        table.popitem(last=False)


# Why a request waits (PendingRequest.waiting); see Scheduler.reason_text.
WAIT_NEW, WAIT_INFEASIBLE, WAIT_GROUP, WAIT_RESOURCES, WAIT_WORKER, WAIT_GPU = range(6)


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


@dataclass
class Lease:
    lease_id: int
    client: int
    request_id: int
    worker_id: bytes
    resources: Resources
    gpu_ids: List[int]
    lent: Resources = field(default_factory=dict)


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


class Scheduler:
    def __init__(self, node_id: bytes, total: Resources, gpu_ids: List[int],
                 max_starting: int = 2, soft_worker_limit: Optional[int] = None) -> None:
        self.node_id = node_id
        self.total: Resources = dict(total)
        self.available: Resources = dict(total)
        self.gpus = GpuInstances(gpu_ids)
        self.pending: "OrderedDict[RequestKey, PendingRequest]" = OrderedDict()
        self.workers: Dict[bytes, Worker] = {}
        self.idle: List[bytes] = []  # LIFO: the warmest worker first
        self.leases: Dict[int, Lease] = {}
        self.starting = 0
        self.max_starting = max_starting
        self.soft_worker_limit = soft_worker_limit or max(1, int(total.get("CPU", 1)))
        self.remote_nodes: Dict[bytes, RemoteNode] = {}
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

    def worker_starting(self, n: int = 1) -> None:
        self.starting += n

    def worker_start_failed(self) -> None:
        self.starting = max(0, self.starting - 1)

    def worker_registered(self, worker: Worker) -> None:
        self.starting = max(0, self.starting - 1)
        self.workers[worker.worker_id] = worker
        self.idle.append(worker.worker_id)

    def return_lease(self, lease_id: int) -> Optional[Worker]:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return None
        self._release(lease)
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
        need_workers = 0
        # Resources that requests waiting for a starting worker will take: without
        # this, every queued request would ask for a worker of its own.
        spoken_for: Resources = {}
        for key, req in list(self.pending.items()):
            target = self._placement(req, spoken_for)
            if isinstance(target, Reject):
                del self.pending[key]
                actions.append(target)
                continue
            if isinstance(target, Spillback):
                del self.pending[key]
                actions.append(target)
                continue
            if target == "infeasible":
                if req.strategy == "PLACEMENT_GROUP":
                    gone = next((g for g in (_group_of(k) for k in req.resources)
                                 if g and g in self.removed_groups), None)
                    if gone is not None:
                        del self.pending[key]
                        actions.append(Reject(req.client, req.request_id,
                                              f"its placement group {gone} was removed"))
                    req.waiting = WAIT_GROUP
                    continue  # otherwise it waits for its group to be created
                req.waiting = WAIT_INFEASIBLE
                if not req.warned:
                    req.warned = True
                    actions.append(Warn(req.client, req.request_id, self._infeasible_message(req)))
                continue
            if not fits(self.available, req.resources):
                req.waiting = WAIT_RESOURCES
                if not req.told_queued:
                    req.told_queued = True
                    actions.append(Queued(req.client, req.request_id))
                continue
            if not self.idle:
                req.waiting = WAIT_WORKER
                free = dict(self.available)
                subtract(free, spoken_for)
                if fits(free, req.resources):
                    add(spoken_for, req.resources)
                    need_workers += 1
                continue
            held = req.resources if req.hold is None else req.hold
            gpu_ids = self.gpus.allocate(held.get("GPU", 0.0))
            if gpu_ids is None:
                req.waiting = WAIT_GPU
                continue
            worker = self.workers[self.idle.pop()]
            lease = Lease(next(self._lease_ids), req.client, req.request_id, worker.worker_id,
                          dict(held), gpu_ids)
            subtract(self.available, held)
            self.leases[lease.lease_id] = lease
            worker.lease_id = lease.lease_id
            del self.pending[key]
            actions.append(Grant(req.client, req.request_id, lease.lease_id, worker, gpu_ids))
        to_start = min(need_workers - self.starting, self.max_starting - self.starting)
        if to_start > 0:
            self.starting += to_start
            actions.append(StartWorkers(to_start))
        return actions

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
        return [(r.resources, not self._feasible_here(r.resources)) for r in self.pending.values()]

    def pending_demand_detail(self) -> List[Demand]:
        """Every pending request with its function, job and why it waits (the GCS joins
        them to the tasks it lists: "why is it pending?")."""
        return [Demand(r.resources, not self._feasible_here(r.resources), r.name, r.job_id,
                       text) for r, text in self.pending_reasons()]

    def pending_reasons(self) -> List[Tuple[PendingRequest, str]]:
        """(request, why it waits) for every pending request, in queue order."""
        return [(r, self.reason_text(r)) for r in self.pending.values()]

    def reason_text(self, req: PendingRequest) -> str:
        """Why req waits, in words, from the code schedule() recorded."""
        code = req.waiting
        if code == WAIT_INFEASIBLE:
            return self._infeasible_reason(req.resources)
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
        return "waiting to be scheduled"

    def _infeasible_reason(self, res: Resources) -> str:
        parts = []
        for k in sorted(missing(self.total, res)):
            largest = max([self.total.get(k, 0.0)] +
                          [n.total.get(k, 0.0) for n in self.remote_nodes.values()])
            parts.append(f"no alive node has {k}" if largest <= 0
                         else f"the largest node has {k}: {largest:g}")
        return f"needs {brief(res)}; {', '.join(parts) or 'no node can run it'}"

    # -- helpers -----------------------------------------------------------------------------
    def _feasible_here(self, res: Resources) -> bool:
        return not missing(self.total, res)

    def _placement(self, req: PendingRequest, spoken_for: Optional[Resources] = None):
        if self.draining:
            for node in self.remote_nodes.values():
                if not missing(node.total, req.resources) and not req.grant_or_reject:
                    return Spillback(req.client, req.request_id, node.raylet_address)
            return Reject(req.client, req.request_id,
                          f"node {self.node_id.hex()[:8]} is draining (leaving the cluster) and "
                          f"no other node can run {describe(req.resources)}")
        if req.strategy == "NODE_AFFINITY" and req.affinity_node and req.affinity_node != self.node_id:
            node = self.remote_nodes.get(req.affinity_node)
            if node is not None and not req.grant_or_reject:
                return Spillback(req.client, req.request_id, node.raylet_address)
            if not req.soft:
                return Reject(req.client, req.request_id,
                              f"node {req.affinity_node.hex()} named by NodeAffinitySchedulingStrategy "
                              f"is not alive in the cluster (soft=False)")
        if req.strategy == "SPREAD" and not req.grant_or_reject and not req.spread_placed:
            req.spread_placed = True
            node = self._spread_choice(req.resources, spoken_for or {})
            if node is not None and node.node_id != self.node_id:
                subtract(node.available, req.resources)
                return Spillback(req.client, req.request_id, node.raylet_address)
        if self._feasible_here(req.resources):
            return "local"
        if not req.grant_or_reject:
            for node in self.remote_nodes.values():
                if not missing(node.total, req.resources):
                    return Spillback(req.client, req.request_id, node.raylet_address)
        return "infeasible"

    def _spread_choice(self, res: Resources, spoken_for: Resources) -> Optional[RemoteNode]:
        """Ray's SpreadSchedulingPolicy: the next node in round-robin order with `res` free
        now, else the next with `res` at all; None when no node could ever run it. This
        node is a RemoteNode too, for uniformity (its node_id is ours)."""
        here_free = dict(self.available)
        subtract(here_free, spoken_for)
        nodes = [RemoteNode(self.node_id, "", self.total, here_free)]
        nodes += [n for n in self.remote_nodes.values() if n.node_id != self.node_id]
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
