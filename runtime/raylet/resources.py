"""Resource arithmetic on {name: amount} dicts, plus per-GPU instance assignment."""
from __future__ import annotations

from typing import Dict, List, Optional

EPS = 1e-9
Resources = Dict[str, float]


def fits(available: Resources, request: Resources) -> bool:
    for k, v in request.items():
        if v > 0 and available.get(k, 0.0) + EPS < v:
            return False
    return True


def missing(total: Resources, request: Resources) -> Resources:
    """What `request` asks for beyond `total` (empty when feasible)."""
    return {k: v for k, v in request.items() if v > 0 and total.get(k, 0.0) + EPS < v}


def subtract(into: Resources, request: Resources) -> None:
    for k, v in request.items():
        if v:
            into[k] = into.get(k, 0.0) - v


def add(into: Resources, request: Resources) -> None:
    for k, v in request.items():
        if v:
            into[k] = into.get(k, 0.0) + v


def bundle_resources(pg_hex: str, index: int, res: Resources) -> Resources:
    """The resources a committed bundle adds to its node (Ray's names):
    ``CPU_group_<i>_<pg>``, ``CPU_group_<pg>``, ``bundle_group_<i>_<pg>``, ``bundle_group_<pg>``.
    The unindexed (wildcard) names accumulate over the group's bundles on a node."""
    out: Resources = {}
    for k, v in res.items():
        out[f"{k}_group_{index}_{pg_hex}"] = v
        out[f"{k}_group_{pg_hex}"] = v
    out[f"bundle_group_{index}_{pg_hex}"] = 1000.0
    out[f"bundle_group_{pg_hex}"] = 1000.0
    return out


def describe(res: Resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


class GpuInstances:
    """Which physical GPU ids a lease gets: whole GPUs for k >= 1, a shared
    slice of one GPU for fractions (as Ray does)."""

    def __init__(self, ids: List[int]) -> None:
        self.capacity: Dict[int, float] = {i: 1.0 for i in ids}

    def allocate(self, amount: float) -> Optional[List[int]]:
        if amount <= 0:
            return []
        if amount < 1.0:
            for i, cap in sorted(self.capacity.items()):
                if cap + EPS >= amount:
                    self.capacity[i] = cap - amount
                    return [i]
            return None
        need = int(round(amount))
        free = [i for i, cap in sorted(self.capacity.items()) if cap >= 1.0 - EPS]
        if len(free) < need:
            return None
        for i in free[:need]:
            self.capacity[i] = 0.0
        return free[:need]

    def release(self, ids: List[int], amount: float) -> None:
        if not ids:
            return
        share = amount if amount < 1.0 else 1.0
        for i in ids:
            if i in self.capacity:
                self.capacity[i] = min(1.0, self.capacity[i] + share)
