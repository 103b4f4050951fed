"""Placement groups in the GCS: plan, reserve atomically (two-phase), remove.

A group's bundles are planned onto nodes by its strategy using the GCS's view
of free resources, then reserved with PrepareBundles on every chosen raylet;
only if every prepare succeeds are they committed (CommitBundles turns them
into group resources such as ``CPU_group_0_<id>``), otherwise every prepared
bundle is cancelled and the group waits. A group that cannot be placed stays
PENDING (with the reason) and is retried when resources change; it never
holds anything while it waits, so it cannot block other work.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, List, Optional, Tuple

import grpc

from runtime.gcs.versioned import ChangeSignal
from runtime.protocol import gcs_pb2, raylet_pb2, raylet_pb2_grpc
from runtime.raylet.resources import add, describe, fits, missing, subtract

log = logging.getLogger("runtime.gcs.placement_groups")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def plan(strategy: str, bundles: List[Dict[str, float]], nodes: List[Tuple[bytes, dict, dict]]
         ) -> Tuple[Optional[List[bytes]], str]:
    """Node of each bundle, or (None, why). nodes: (node_id, total, available)."""
    if not nodes:
        return None, "no live node"
    for i, b in enumerate(bundles):
        if not any(not missing(total, b) for _nid, total, _avail in nodes):
            return None, (f"bundle {i} {describe(b)} is larger than any node "
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
            return None, f"no single node has {describe(need)} free (STRICT_PACK)"
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
            return None, f"not enough free resources for bundle {i} {describe(b)} right now"
        subtract(free[chosen], b)
        used.add(chosen)
        placement.append(chosen)
    return placement, ""


class _Group:
    def __init__(self, spec: gcs_pb2.PlacementGroupSpec) -> None:
        self.info = gcs_pb2.PlacementGroupInfo(spec=spec, state="PENDING", create_time=time.time())
        self.changed = ChangeSignal()
        self.task: Optional[asyncio.Task] = None


class PlacementGroupManager:
    def __init__(self, gcs) -> None:
        self.gcs = gcs
        self.groups: Dict[bytes, _Group] = {}
        self.names: Dict[Tuple[str, str], bytes] = {}
        self.resources_changed = asyncio.Event()

    def _stub(self, node) -> raylet_pb2_grpc.RayletStub:
        return raylet_pb2_grpc.RayletStub(
            self.gcs.actor_manager.channel(f"{node.node_ip}:{node.raylet_port}"))

    def _changed(self, g: _Group) -> None:
        g.changed.bump(g.info)

    # -- RPCs ---------------------------------------------------------------------------------------------
    async def create(self, spec: gcs_pb2.PlacementGroupSpec) -> gcs_pb2.PlacementGroupReply:
        if spec.strategy not in STRATEGIES:
            return gcs_pb2.PlacementGroupReply(error=f"invalid strategy {spec.strategy!r}: use one "
                                                     f"of {', '.join(STRATEGIES)}")
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
        g.task = asyncio.ensure_future(self._schedule(g))
        return gcs_pb2.PlacementGroupReply(found=True, info=g.info)

    async def get(self, req: gcs_pb2.PlacementGroupRequest) -> gcs_pb2.PlacementGroupReply:
        g = self.groups.get(req.placement_group_id) if req.placement_group_id else \
            self.groups.get(self.names.get((req.namespace, req.name), b""))
        if g is None:
            return gcs_pb2.PlacementGroupReply(found=False)
        await g.changed.wait_newer(g.info, req.newer_than, req.timeout_s)
        return gcs_pb2.PlacementGroupReply(found=True, info=g.info)

    async def remove(self, req: gcs_pb2.PlacementGroupRequest) -> None:
        g = self.groups.get(req.placement_group_id)
        if g is None or g.info.state == "REMOVED":
            return
        was_created = g.info.state == "CREATED"
        g.info.state = "REMOVED"
        if g.task is not None:
            g.task.cancel()
        spec = g.info.spec
        if spec.name and self.names.get((spec.namespace, spec.name)) == spec.placement_group_id:
            del self.names[(spec.namespace, spec.name)]
        await self.gcs.actor_manager.kill_in_placement_group(spec.placement_group_id)
        # Every node hears of the removal: the ones holding bundles free them, and all of
        # them fail work still waiting for the group instead of letting it hang.
        by_node: Dict[bytes, List[int]] = {n.node_id: [] for n in self.gcs.nodes.values() if n.alive}
        if was_created:
            for i, nid in enumerate(g.info.bundle_nodes):
                by_node.setdefault(nid, []).append(i)
        await self._cancel(spec, by_node, remove=True)
        log.info("placement group %s removed", spec.placement_group_id.hex()[:8])
        self._changed(g)

    def list(self) -> gcs_pb2.PlacementGroupList:
        return gcs_pb2.PlacementGroupList(groups=[g.info for g in self.groups.values()])

    # -- scheduling -------------------------------------------------------------------------------------
    async def _schedule(self, g: _Group) -> None:
        spec = g.info.spec
        bundles = [dict(b.resources) for b in spec.bundles]
        while g.info.state == "PENDING":
            nodes = [n for n in self.gcs.nodes.values() if n.alive and not n.draining]
            placement, why = plan(spec.strategy, bundles,
                                  [(n.node_id, dict(n.resources_total), dict(n.resources_available))
                                   for n in nodes])
            if placement is not None:
                ok, why = await self._reserve(spec, bundles, placement)
                if ok:
                    g.info.state = "CREATED"
                    g.info.bundle_nodes.extend(placement)
                    g.info.pending_reason = ""
                    g.info.scheduled_time = time.time()
                    log.info("placement group %s created (%s, %d bundles)",
                             spec.placement_group_id.hex()[:8], spec.strategy, len(bundles))
                    self._changed(g)
                    return
            if g.info.pending_reason != why:
                g.info.pending_reason = why
                self._changed(g)
            try:
                await asyncio.wait_for(self.resources_changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _reserve(self, spec, bundles, placement) -> Tuple[bool, str]:
        by_node: Dict[bytes, List[int]] = {}
        for i, nid in enumerate(placement):
            by_node.setdefault(nid, []).append(i)
        prepared: Dict[bytes, List[int]] = {}
        why = ""
        for nid, idxs in by_node.items():
            node = self.gcs.nodes.get(nid)
            req = raylet_pb2.BundleRequest(placement_group_id=spec.placement_group_id, indexes=idxs,
                                           bundles=[raylet_pb2.BundleResources(resources=bundles[i])
                                                    for i in idxs])
            try:
                reply = await self._stub(node).PrepareBundles(req, timeout=10)
            except grpc.RpcError as exc:
                reply = raylet_pb2.BundleReply(ok=False, message=f"raylet unreachable: {exc.code().name}")
            if not reply.ok:
                why = reply.message
                break
            prepared[nid] = idxs
        if len(prepared) != len(by_node):
            await self._cancel(spec, prepared)
            return False, why
        for nid, idxs in prepared.items():
            req = raylet_pb2.BundleRequest(placement_group_id=spec.placement_group_id, indexes=idxs)
            node = self.gcs.nodes[nid]
            # The raylet reports its new resources to us before it answers, so
            # cluster_resources() shows the group as soon as ready() resolves.
            await self._stub(node).CommitBundles(req, timeout=10)
        return True, ""

    async def _cancel(self, spec, by_node: Dict[bytes, List[int]], remove: bool = False) -> None:
        for nid, idxs in by_node.items():
            node = self.gcs.nodes.get(nid)
            if node is None or not node.alive:
                continue
            try:
                await self._stub(node).CancelBundles(raylet_pb2.BundleRequest(
                    placement_group_id=spec.placement_group_id, indexes=idxs, remove=remove),
                    timeout=10)
            except grpc.RpcError as exc:
                log.warning("could not release bundles of %s on %s: %s",
                            spec.placement_group_id.hex()[:8], node.node_ip, exc.code().name)
