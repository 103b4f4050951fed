"""Placement groups (``ray.util.placement_group``): reserve bundles of resources
atomically, then schedule tasks and actors into them."""
from __future__ import annotations

import math
import numbers
import time
from typing import Any, Dict, List, Optional

from runtime import ids
from runtime.core_worker.current import core_worker, core_worker_or_none
from runtime.shapes import check_timeout, group_resources  # noqa: F401  (group_resources: its old home)
from runtime.protocol import gcs_pb2

VALID_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroupID:
    def __init__(self, binary: bytes) -> None:
        self._b = binary

    def binary(self) -> bytes:
        return self._b

    def hex(self) -> str:
        return self._b.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroupID) and other._b == self._b

    def __hash__(self) -> int:
        return hash(self._b)

    def __repr__(self) -> str:
        return f"PlacementGroupID({self.hex()})"


class PlacementGroup:
    """A handle to a placement group; picklable."""

    def __init__(self, id: PlacementGroupID, bundle_cache: Optional[List[Dict[str, float]]] = None) -> None:
        self.id = id
        self.bundle_cache = bundle_cache

    @property
    def bundle_specs(self) -> List[Dict[str, float]]:
        if self.bundle_cache is None:
            info = _get(self.id.binary())
            self.bundle_cache = [dict(b.resources) for b in info.spec.bundles] if info else []
        return self.bundle_cache

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self):
        """An ObjectRef that resolves (to this group) once every bundle is reserved."""
        return core_worker().placement_group_ready_ref(self)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """True once the group is created, False if timeout_seconds pass first."""
        check_timeout("timeout_seconds", timeout_seconds)
        deadline = time.monotonic() + timeout_seconds
        version = 0
        while True:
            left = deadline - time.monotonic()
            wait_s = min(left, 30.0) if version else 0.0
            info = _get(self.id.binary(), newer_than=version if left > 0.01 else 0,
                        timeout_s=max(0.01, wait_s))
            if info is None:
                return False
            if info.state == "CREATED":
                return True
            if info.state == "REMOVED" or left <= 0:
                return False
            version = info.version

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id.hex()})"

    def __reduce__(self):
        return (PlacementGroup, (self.id, self.bundle_cache))


def _cw():
    return core_worker()


def _get(pg_id: bytes = b"", name: str = "", namespace: str = "", newer_than: int = 0,
         timeout_s: float = 0.0) -> Optional[gcs_pb2.PlacementGroupInfo]:
    cw = _cw()
    req = gcs_pb2.PlacementGroupRequest(placement_group_id=pg_id, name=name, namespace=namespace,
                                        newer_than=newer_than, timeout_s=timeout_s)
    reply = cw.gcs_call("GetPlacementGroup", req, timeout=timeout_s + 30,
                        doing="reading a placement group")
    return reply.info if reply.found else None


def placement_group(bundles: List[Dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: Optional[str] = None, _soft_target_node_id: Optional[str] = None,
                    bundle_label_selector: Any = None, _max_cpu_fraction_per_node: Any = None
                    ) -> PlacementGroup:
    """Reserve `bundles` (a list of resource dicts) with `strategy`; returns at once."""
    if not isinstance(bundles, list) or not bundles:
        raise ValueError("The placement group `bundles` argument must be a non-empty list of "
                         "resource dicts.")
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not b:
            raise ValueError(f"Bundles cannot be an empty dictionary or a non-dict: bundle {i} "
                             f"is {b!r}")
        for k, v in b.items():
            if (not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)
                    or v < 0):
                raise ValueError(f"bundle {i}: resource {k!r} must be a finite non-negative "
                                 f"number, got {v!r}")
        if all(v == 0 for v in b.values()):
            raise ValueError(f"Bundle {i} {b} has only zero resources; every bundle must "
                             f"reserve something.")
    if strategy not in VALID_STRATEGIES:
        raise ValueError(f"Invalid placement group strategy {strategy}. Supported strategies "
                         f"are: {list(VALID_STRATEGIES)}.")
    if lifetime not in (None, "detached"):
        raise ValueError("Placement group `lifetime` argument must be either `None` or "
                         "'detached'.")
    cw = _cw()
    pg_id = ids.random_id(ids.PLACEMENT_GROUP_ID_SIZE)
    spec = gcs_pb2.PlacementGroupSpec(
        placement_group_id=pg_id, name=name or "", strategy=strategy,
        bundles=[gcs_pb2.Bundle(resources={k: float(v) for k, v in b.items()}) for b in bundles],
        creator_job_id=cw.job_id, detached=lifetime == "detached", namespace=cw.namespace)
    reply = cw.gcs_call("CreatePlacementGroup", spec, doing="creating a placement group")
    if reply.error:
        raise ValueError(reply.error)
    return PlacementGroup(PlacementGroupID(pg_id), [dict(b) for b in bundles])


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Release the group's resources; tasks and actors running in it are killed."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"expected a PlacementGroup, got {type(placement_group).__name__}")
    cw = _cw()
    req = gcs_pb2.PlacementGroupRequest(placement_group_id=placement_group.id.binary())
    cw.gcs_call("RemovePlacementGroup", req,
                doing=f"removing placement group {placement_group.id.hex()}")


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    cw = _cw()
    info = _get(name=placement_group_name, namespace=cw.namespace)
    if info is None or info.state == "REMOVED":
        raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")
    return PlacementGroup(PlacementGroupID(info.spec.placement_group_id),
                          [dict(b.resources) for b in info.spec.bundles])


def _table_entry(info: gcs_pb2.PlacementGroupInfo) -> Dict[str, Any]:
    spec = info.spec
    return {"placement_group_id": spec.placement_group_id.hex(), "name": spec.name,
            "bundles": {i: dict(b.resources) for i, b in enumerate(spec.bundles)},
            "bundles_to_node_id": {i: n.hex() for i, n in enumerate(info.bundle_nodes)},
            "strategy": spec.strategy, "state": info.state,
            "creator_job_id": spec.creator_job_id.hex(), "is_detached": spec.detached,
            "stats": {"pending_reason": info.pending_reason or None,
                      "scheduling_state": "FINISHED" if info.state == "CREATED" else info.state,
                      "create_time": info.create_time, "scheduled_time": info.scheduled_time}}


def placement_group_table(placement_group: Optional[PlacementGroup] = None) -> Dict[str, Any]:
    """One group's entry, or {id hex: entry} for every group."""
    cw = _cw()
    if placement_group is not None:
        info = _get(placement_group.id.binary())
        return _table_entry(info) if info else {}
    from runtime.protocol import common_pb2

    groups = cw.gcs_call("ListPlacementGroups", common_pb2.Empty(),
                         doing="listing placement groups")
    return {g.spec.placement_group_id.hex(): _table_entry(g) for g in groups.groups}


def get_current_placement_group() -> Optional[PlacementGroup]:
    """The group the current task or actor runs in (when it captures child tasks)."""
    cw = core_worker_or_none()
    pg = getattr(cw, "current_placement_group", None) if cw else None
    return PlacementGroup(PlacementGroupID(pg[0])) if pg else None
