"""Resource shapes and argument checks that the API modules share.

A leaf: it imports nothing of the runtime, so ``options``, ``util.placement_group`` and
``api`` can all use it without importing one another (no import circle; see
tests/test_imports.py).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict


def group_resources(resources: Dict[str, float], pg_id: bytes, bundle_index: int) -> Dict[str, float]:
    """Rewrite a resource shape to draw from a placement group's bundle(s)."""
    h = pg_id.hex()
    out: Dict[str, float] = {}
    for k, v in resources.items():
        out[f"{k}_group_{bundle_index}_{h}" if bundle_index >= 0 else f"{k}_group_{h}"] = v
    marker = f"bundle_group_{bundle_index}_{h}" if bundle_index >= 0 else f"bundle_group_{h}"
    out[marker] = 0.001
    return out


def check_timeout(name: str, timeout: Any) -> None:
    """A timeout must be a finite, non-negative number of seconds (None: no timeout is
    for the caller to allow). NaN would never compare and infinity cannot be waited on."""
    if (not isinstance(timeout, numbers.Real) or isinstance(timeout, bool)
            or not math.isfinite(timeout) or timeout < 0):
        raise ValueError(f"'{name}' must be a finite non-negative number of seconds (or None "
                         f"to wait without a limit), got {timeout!r}")
