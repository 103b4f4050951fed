"""Placement groups in the GCS: plan, reserve atomically (two-phase), remove.

A group's bundles are planned onto nodes by its strategy using the GCS's view
of free resources, then reserved with PrepareBundles on every chosen raylet;
only if every prepare succeeds are they committed (CommitBundles turns them
into group resources such as ``CPU_group_0_<id>``), otherwise every prepared
bundle is cancelled and the group waits. A group that cannot be placed stays
PENDING (with the reason) and is retried when resources change; it never
holds anything while it waits, so it cannot block other work.

Which RPC to send next, and what a reply or a removal means at any point, is
decided by the sans-I/O ``GroupReservation`` (pg_reservation.py); this module
only plans, sends the RPCs it asks for and feeds the answers back.

Groups are kept in the GCS's store (``PlacementGroupRecord``): a created group is
written before it is announced, and an attempt's number before its Prepares go out.
A restarted GCS keeps created groups as they are (their raylets never lost the
bundles), undoes any attempt that was under way and tries again, and finishes
removals. When a node dies, the bundles it held are placed again on other nodes
(state RESCHEDULING) while the others stay where they are.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, List, Optional, Tuple

import grpc

from runtime.gcs.pg_reservation import (Cancel, Commit, Created, GroupReservation, Outcome,
                                        Prepare, Retry, State)
from runtime.gcs.versioned import ChangeSignal
from runtime.protocol import gcs_pb2, raylet_pb2, raylet_pb2_grpc
from runtime.raylet.resources import add, fits, missing, subtract
from runtime.raylet.scheduler import brief

log = logging.getLogger("runtime.gcs.placement_groups")
#: The GCS store's table of groups (PlacementGroupRecord by group id).
TABLE = "placement_groups"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BUNDLE_RPC_TIMEOUT_S = 10.0


def plan(strategy: str, bundles: List[Dict[str, float]], nodes: List[Tuple[bytes, dict, dict]]
         ) -> Tuple[Optional[List[bytes]], str]:
    """Node of each bundle, or (None, why). nodes: (node_id, total, available)."""
    if not nodes:
        return None, "no live node"
    for i, b in enumerate(bundles):
        if not any(not missing(total, b) for _nid, total, _avail in nodes):
            return None, (f"bundle {i} {brief(b)} is larger than any node "
                          f"(infeasible until such a node joins)")
    free = {nid: dict(avail) for nid, _t, avail in nodes}
    order = [nid for nid, _t, _a in nodes]
    if strategy in ("PACK", "STRICT_PACK"):
        need: Dict[str, float] = {}
        for b in bundles:
            add(need, b)
        for nid in order:
            if fits(free[nid], need):
                return [nid] * len(bundles), ""
        if strategy == "STRICT_PACK":
            return None, f"no single node has {brief(need)} free (STRICT_PACK)"
    if strategy == "STRICT_SPREAD" and len(bundles) > len(order):
        return None, (f"STRICT_SPREAD needs {len(bundles)} distinct nodes, the cluster has "
                      f"{len(order)}")
    placement: List[bytes] = []
    used: set = set()
    for i, b in enumerate(bundles):
        candidates = [n for n in order if n not in used] if strategy in ("SPREAD", "STRICT_SPREAD") \
            else list(order)
        if strategy == "SPREAD":
            candidates += [n for n in order if n in used]
        chosen = next((n for n in candidates if fits(free[n], b)), None)
        if chosen is None:
            return None, f"not enough free resources for bundle {i} {brief(b)} right now"
        subtract(free[chosen], b)
        used.add(chosen)
        placement.append(chosen)
    return placement, ""


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("placement group scheduling failed", exc_info=task.exception())


#: PlacementGroupInfo.state -> the reservation state a restarted GCS resumes from (any
#: other state was mid-way: the attempt is undone and tried again).
_FINAL = {"CREATED": State.CREATED, "REMOVED": State.REMOVED}


class _Group:
    def __init__(self, spec: gcs_pb2.PlacementGroupSpec,
                 reservation: Optional[GroupReservation] = None) -> None:
        self.info = gcs_pb2.PlacementGroupInfo(spec=spec, state="PENDING", create_time=time.time())
        self.changed = ChangeSignal()
        self.reservation = reservation or GroupReservation(len(spec.bundles))
        self.task: Optional[asyncio.Task] = None
        # The scheduling task waits for resources to change (no RPC of its own in flight),
        # so a removal may cancel it; otherwise it ends by itself once its RPCs answered.
        self.idle = False
        self.removal_done = False


class PlacementGroupManager:
    def __init__(self, gcs) -> None:
        self.gcs = gcs
        self.groups: Dict[bytes, _Group] = {}
        self.names: Dict[Tuple[str, str], bytes] = {}
        self.resources_changed = asyncio.Event()
        self._background: set = set()  # recoveries, removals finished after a restart

    def _stub(self, node) -> raylet_pb2_grpc.RayletStub:
        return raylet_pb2_grpc.RayletStub(
            self.gcs.actor_manager.channel(f"{node.node_ip}:{node.raylet_port}"))

    def _changed(self, g: _Group) -> None:
        g.changed.bump(g.info)

    def _save(self, g: _Group) -> asyncio.Future:
        """Write the group to the GCS's store; the future resolves once it is durable."""
        return self.gcs.persist(TABLE, g.info.spec.placement_group_id,
                                gcs_pb2.PlacementGroupRecord(info=g.info,
                                                             attempts=g.reservation.attempts,
                                                             removal_done=g.removal_done))

    def _announce(self, g: _Group) -> None:
        """Wake GetPlacementGroup long polls once what they will read is durable."""
        self._save(g).add_done_callback(lambda _f: self._changed(g))

    def _start(self, g: _Group, coro=None) -> None:
        g.task = asyncio.ensure_future(coro or self._schedule(g))
        g.task.add_done_callback(_log_failure)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    def _live(self) -> List[bytes]:
        return [n.node_id for n in self.gcs.nodes.values() if n.alive]

    # -- RPCs ---------------------------------------------------------------------------------------------
    async def create(self, spec: gcs_pb2.PlacementGroupSpec) -> gcs_pb2.PlacementGroupReply:
        if spec.strategy not in STRATEGIES:
            return gcs_pb2.PlacementGroupReply(error=f"invalid strategy {spec.strategy!r}: use one "
                                                     f"of {', '.join(STRATEGIES)}")
        existing = self.groups.get(spec.placement_group_id)
        if existing is not None:  # sent again by a client that lost the first answer
            return gcs_pb2.PlacementGroupReply(found=True, info=existing.info)
        if spec.name:
            key = (spec.namespace, spec.name)
            holder = self.groups.get(self.names.get(key, b""))
            if holder is not None and holder.info.state != "REMOVED":
                return gcs_pb2.PlacementGroupReply(error=(
                    f"a placement group named {spec.name!r} already exists in namespace "
                    f"{spec.namespace!r} ({holder.info.spec.placement_group_id.hex()})"))
            self.names[key] = spec.placement_group_id
        g = _Group(spec)
        self.groups[spec.placement_group_id] = g
        await self._save(g)
        self._start(g)
        return gcs_pb2.PlacementGroupReply(found=True, info=g.info)

    async def get(self, req: gcs_pb2.PlacementGroupRequest) -> gcs_pb2.PlacementGroupReply:
        g = self.groups.get(req.placement_group_id) if req.placement_group_id else \
            self.groups.get(self.names.get((req.namespace, req.name), b""))
        if g is None:
            return gcs_pb2.PlacementGroupReply(found=False)
        await g.changed.wait_newer(g.info, req.newer_than, req.timeout_s)
        return gcs_pb2.PlacementGroupReply(found=True, info=g.info)

    async def remove(self, req: gcs_pb2.PlacementGroupRequest) -> None:
        """Returns once every node has released what it held of the group, including what
        a Prepare or Commit still in flight at the removal reserved."""
        g = self.groups.get(req.placement_group_id)
        if g is None or g.info.state == "REMOVED":
            return
        g.info.state = "REMOVED"
        # Every live node hears of the removal: the ones holding bundles free them, and all
        # of them fail work still waiting for the group instead of letting it hang.
        cancels = g.reservation.remove(self._live())
        saved = self._save(g)  # a GCS restarted before the end finishes the removal
        if g.task is not None and g.idle:
            g.task.cancel()
        spec = g.info.spec
        if spec.name and self.names.get((spec.namespace, spec.name)) == spec.placement_group_id:
            del self.names[(spec.namespace, spec.name)]
        await self.gcs.actor_manager.kill_in_placement_group(spec.placement_group_id)
        await self._drive(g, cancels)
        if g.task is not None:
            await asyncio.wait([g.task])  # its late answers are cancelled too
        left = g.reservation.uncancelled
        if left:
            log.warning("placement group %s removed, but %d node(s) did not confirm releasing "
                        "its bundles: %s", spec.placement_group_id.hex()[:8], len(left),
                        ", ".join(n.hex()[:8] for n in left))
        log.info("placement group %s removed", spec.placement_group_id.hex()[:8])
        g.removal_done = True
        await saved
        await self._save(g)
        self._changed(g)
        self.gcs.events.record("placement_group", spec.placement_group_id.hex(), "removed",
                               spec.name or "unnamed")

    def list(self) -> gcs_pb2.PlacementGroupList:
        return gcs_pb2.PlacementGroupList(groups=[g.info for g in self.groups.values()])

    # -- a restarted GCS ---------------------------------------------------------------------------------
    def restore(self, records: Dict[bytes, gcs_pb2.PlacementGroupRecord]) -> None:
        """Take the groups a previous GCS left in the store (before serving)."""
        for pg_id, rec in records.items():
            spec = rec.info.spec
            r = GroupReservation.restored(len(spec.bundles),
                                          _FINAL.get(rec.info.state, State.PENDING),
                                          rec.attempts, list(rec.info.bundle_nodes))
            g = _Group(spec, r)
            g.info.CopyFrom(rec.info)
            g.removal_done = rec.removal_done
            self.groups[pg_id] = g
            if spec.name and rec.info.state != "REMOVED":
                self.names[(spec.namespace, spec.name)] = pg_id

    def start_recovery(self) -> None:
        """Undo the attempts the previous GCS left under way, then schedule those groups
        again; finish the removals it had not finished."""
        for g in self.groups.values():
            r = g.reservation
            if r.state is State.ABORTING:
                log.info("placement group %s was being placed when the GCS stopped (attempt "
                         "%d): undoing that attempt and placing it again",
                         g.info.spec.placement_group_id.hex()[:8], r.attempts)
                self._start(g, self._recover(g))
            elif r.state is State.REMOVED and not g.removal_done:
                self._spawn(self._finish_removal(g))

    async def _recover(self, g: _Group) -> None:
        await self._drive(g, g.reservation.recover(self._live()))
        await self._schedule(g)

    async def _finish_removal(self, g: _Group) -> None:
        await self.gcs.actor_manager.kill_in_placement_group(g.info.spec.placement_group_id)
        again = GroupReservation(len(g.info.spec.bundles))
        await self._drive(g, again.remove(self._live()), again)
        g.removal_done = True
        await self._save(g)

    def node_died(self, node_id: bytes) -> None:
        """Bundles on a dead node are placed again elsewhere; the others stay."""
        for g in self.groups.values():
            r = g.reservation
            lost, actions = r.node_died(node_id)
            if not lost:
                continue
            spec = g.info.spec
            for i in lost:
                if i < len(g.info.bundle_nodes):
                    g.info.bundle_nodes[i] = b""
            g.info.state = "RESCHEDULING"
            g.info.pending_reason = r.reason or f"placing bundle(s) {lost} again"
            log.warning("placement group %s: node %s died with bundle(s) %s; placing them again",
                        spec.placement_group_id.hex()[:8], node_id.hex()[:8], lost)
            self.gcs.events.record("placement_group", spec.placement_group_id.hex(),
                                   "rescheduling", f"{spec.name or 'unnamed'}: node "
                                   f"{node_id.hex()[:8]} died with bundle(s) {lost}",
                                   severity="WARNING", node_id=node_id)
            self._announce(g)
            if actions:
                self._spawn(self._drive(g, actions))
            if g.task is None or g.task.done():
                self._start(g)
        ev, self.resources_changed = self.resources_changed, asyncio.Event()
        ev.set()

    async def close(self) -> None:
        left = [t for t in self._background if not t.done()]
        left += [g.task for g in self.groups.values() if g.task is not None and not g.task.done()]
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    # -- scheduling -------------------------------------------------------------------------------------
    def _plan(self, g: _Group, nodes: list):
        """Where the bundles the next attempt needs go: a list (every bundle) or index ->
        node (the ones lost with a node, the others kept); or (None, why)."""
        spec = g.info.spec
        r = g.reservation
        need = r.missing
        kept_nodes = set(r.kept.values())
        if r.kept and spec.strategy == "STRICT_SPREAD":
            nodes = [n for n in nodes if n.node_id not in kept_nodes]
        elif r.kept and spec.strategy == "STRICT_PACK":
            nodes = [n for n in nodes if n.node_id in kept_nodes]
        placement, why = plan(spec.strategy, [dict(spec.bundles[i].resources) for i in need],
                              [(n.node_id, dict(n.resources_total), dict(n.resources_available))
                               for n in nodes])
        if placement is None or not r.kept:
            return placement, why
        return dict(zip(need, placement)), ""

    async def _schedule(self, g: _Group) -> None:
        r = g.reservation
        while r.state is State.PENDING:
            nodes = [n for n in self.gcs.nodes.values() if n.alive and not n.draining]
            placement, why = self._plan(g, nodes)
            if placement is not None:
                actions = r.begin(placement)
                await self._save(g)  # the attempt number is durable before its Prepares go out
                await self._drive(g, actions)
                if r.state is not State.PENDING:
                    return  # created, or removed meanwhile
                why = r.reason
            if g.info.pending_reason != why:
                g.info.pending_reason = why
                self._changed(g)
            g.idle = True
            try:
                await asyncio.wait_for(self.resources_changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            finally:
                g.idle = False

    async def _drive(self, g: _Group, actions: list,
                     r: Optional[GroupReservation] = None) -> None:
        """Send the RPCs the reservation asks for (concurrently) and feed each answer back,
        until none of them is in flight."""
        r = r or g.reservation
        running: set = set()

        def act(actions: list) -> None:
            for a in actions:
                if isinstance(a, Created):
                    self._created(g, a)
                elif isinstance(a, Retry):
                    log.info("placement group %s: attempt %d failed (%s); it waits for resources",
                             g.info.spec.placement_group_id.hex()[:8], r.attempts, a.reason)
                else:
                    running.add(asyncio.ensure_future(self._rpc(g, a, r)))

        act(actions)
        try:
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    act(t.result())
        finally:
            for t in running:
                t.cancel()

    async def _rpc(self, g: _Group, a, r: GroupReservation) -> list:
        """One bundle RPC; returns what the reservation does with its answer."""
        spec = g.info.spec
        req = raylet_pb2.BundleRequest(placement_group_id=spec.placement_group_id,
                                       indexes=list(a.indexes), attempt=r.attempts)
        if isinstance(a, Prepare):
            req.bundles.extend(raylet_pb2.BundleResources(resources=spec.bundles[i].resources)
                               for i in a.indexes)
            method = "PrepareBundles"
        elif isinstance(a, Commit):
            method = "CommitBundles"
        else:
            req.remove = a.remove
            method = "CancelBundles"
        node = self.gcs.nodes.get(a.node)
        if node is None or not node.alive:
            # What a dead node held died with it.
            outcome = Outcome.OK if isinstance(a, Cancel) else Outcome.LOST
            why = f"node {a.node.hex()[:8]} is not alive"
        else:
            try:
                reply = await getattr(self._stub(node), method)(req, timeout=BUNDLE_RPC_TIMEOUT_S)
                outcome = Outcome.OK if reply.ok else Outcome.REFUSED
                why = "" if reply.ok else f"node {a.node.hex()[:8]}: {reply.message}"
            except grpc.RpcError as exc:
                outcome = Outcome.LOST
                why = (f"{method} to the raylet of node {a.node.hex()[:8]} at "
                       f"{node.node_ip}:{node.raylet_port} failed: {exc.code().name}")
            if outcome is not Outcome.OK and isinstance(a, Cancel):
                log.warning("could not release bundles of %s on %s: %s",
                            spec.placement_group_id.hex()[:8], node.node_ip, why)
        if isinstance(a, Prepare):
            return r.prepared(a, outcome, why)
        if isinstance(a, Commit):
            return r.committed(a, outcome, why)
        return r.cancelled(a, outcome)

    def _created(self, g: _Group, a: Created) -> None:
        spec = g.info.spec
        again = g.info.state == "RESCHEDULING"
        g.info.state = "CREATED"
        del g.info.bundle_nodes[:]
        g.info.bundle_nodes.extend(a.bundle_nodes)
        g.info.pending_reason = ""
        g.info.scheduled_time = time.time()
        log.info("placement group %s %s (%s, %d bundles)", spec.placement_group_id.hex()[:8],
                 "rescheduled" if again else "created", spec.strategy, len(spec.bundles))
        self._announce(g)
        self.gcs.events.record("placement_group", spec.placement_group_id.hex(),
                               "rescheduled" if again else "created",
                               f"{spec.name or 'unnamed'}: {spec.strategy}, "
                               f"{len(spec.bundles)} bundles")
