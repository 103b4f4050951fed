"""Validation of ``@remote(...)`` / ``.options(...)`` keywords, with Ray's rules and messages."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict

from runtime import config
from runtime.protocol import common_pb2
from runtime.shapes import group_resources
from runtime.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                PlacementGroupSchedulingStrategy)
from runtime.vocabulary import (STRATEGY_DEFAULT, STRATEGY_NODE_AFFINITY,
                                STRATEGY_PLACEMENT_GROUP, STRATEGY_SPREAD)

TASK_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "num_returns", "max_retries", "retry_exceptions",
    "name", "scheduling_strategy", "memory", "runtime_env", "max_calls", "accelerator_type",
    "placement_group", "placement_group_bundle_index", "placement_group_capture_child_tasks",
    "label_selector", "_metadata", "enable_task_events", "object_store_memory",
}


def _nonneg_number(key: str, value: Any) -> None:
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"The keyword '{key}' only accepts a finite non-negative number, "
                         f"got {value!r}.")


def validate_task_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    for key in opts:
        if key not in TASK_OPTIONS:
            raise ValueError(f"Invalid option keyword {key} for remote functions. "
                             f"Valid ones are {sorted(TASK_OPTIONS)}.")
    out = dict(opts)
    for key in ("num_cpus", "num_gpus", "memory", "object_store_memory"):
        if out.get(key) is not None:
            _nonneg_number(key, out[key])
    if out.get("num_gpus") and out["num_gpus"] > 1 and out["num_gpus"] != int(out["num_gpus"]):
        raise ValueError("num_gpus above 1 must be a whole number")
    res = out.get("resources")
    if res is not None:
        if not isinstance(res, dict):
            raise TypeError(f"The keyword 'resources' must be a dict, got {type(res).__name__}.")
        for k, v in res.items():
            if k in ("CPU", "GPU"):
                raise ValueError("Use the 'num_cpus' and 'num_gpus' keyword instead of 'CPU' and "
                                 "'GPU' in 'resources' keyword")
            _nonneg_number(f"resources[{k!r}]", v)
    nr = out.get("num_returns")
    if nr is not None:
        if nr in ("dynamic", "streaming"):
            raise ValueError(f"num_returns={nr!r} (generators) is not supported yet; return a list "
                             f"and set num_returns to its length")
        if not isinstance(nr, int) or isinstance(nr, bool) or nr < 0:
            raise ValueError(f"The keyword 'num_returns' only accepts a non-negative integer, "
                             f"got {nr!r}.")
    mr = out.get("max_retries")
    if mr is not None and (not isinstance(mr, int) or isinstance(mr, bool) or mr < -1):
        raise ValueError(f"The keyword 'max_retries' only accepts -1 (infinite), 0 or a positive "
                         f"integer, got {mr!r}.")
    re_ = out.get("retry_exceptions")
    if re_ is not None and not isinstance(re_, bool):
        if not isinstance(re_, (list, tuple)) or not all(
                isinstance(c, type) and issubclass(c, BaseException) for c in re_):
            raise TypeError("The keyword 'retry_exceptions' only accepts a bool or a list of "
                            "exception classes.")
    name = out.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"The keyword 'name' only accepts a string, got {type(name).__name__}.")
    strategy_proto(out.get("scheduling_strategy"))  # validates
    if out.get("runtime_env"):
        raise ValueError("runtime_env is not supported yet: install the task's dependencies on "
                         "every node (the workers import what the driver can import)")
    return out


def strategy_proto(strategy: Any) -> common_pb2.SchedulingStrategy:
    if strategy is None or strategy == STRATEGY_DEFAULT:
        return common_pb2.SchedulingStrategy(kind=STRATEGY_DEFAULT)
    if strategy == STRATEGY_SPREAD:
        return common_pb2.SchedulingStrategy(kind=STRATEGY_SPREAD)
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        try:
            node_id = bytes.fromhex(strategy.node_id)
        except ValueError:
            raise ValueError(f"NodeAffinitySchedulingStrategy: node_id {strategy.node_id!r} is not "
                             f"a hex node id (see runtime.nodes() or get_runtime_context()."
                             f"get_node_id())") from None
        return common_pb2.SchedulingStrategy(kind=STRATEGY_NODE_AFFINITY, node_id=node_id,
                                             soft=bool(strategy.soft))
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        pg = strategy.placement_group
        if pg is None or not hasattr(pg, "id"):
            raise ValueError("PlacementGroupSchedulingStrategy needs a placement group "
                             "(runtime.util.placement_group(...))")
        idx = strategy.placement_group_bundle_index
        if not isinstance(idx, int) or idx < -1:
            raise ValueError(f"placement_group_bundle_index must be -1 or a bundle index, got {idx!r}")
        if pg.bundle_cache is not None and idx >= len(pg.bundle_cache):
            raise ValueError(f"placement_group_bundle_index {idx} is out of range: the group has "
                             f"{len(pg.bundle_cache)} bundles")
        return common_pb2.SchedulingStrategy(kind=STRATEGY_PLACEMENT_GROUP,
                                             placement_group_id=pg.id.binary(), bundle_index=idx,
                                             soft=bool(strategy.placement_group_capture_child_tasks))
    raise ValueError(f"Invalid scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD', "
                     f"NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy")


def placed_resources(resources: Dict[str, float], strategy: common_pb2.SchedulingStrategy
                     ) -> Dict[str, float]:
    """The shape to request from the raylet: inside a placement group, its bundle's resources."""
    if strategy.kind != STRATEGY_PLACEMENT_GROUP:
        return resources
    return group_resources(resources, strategy.placement_group_id, strategy.bundle_index)


def task_resources(opts: Dict[str, Any]) -> Dict[str, float]:
    """The resource shape a task asks for (Ray's default: 1 CPU)."""
    res: Dict[str, float] = {}
    cpus = opts.get("num_cpus")
    res["CPU"] = float(1 if cpus is None else cpus)
    if opts.get("num_gpus"):
        res["GPU"] = float(opts["num_gpus"])
    if opts.get("memory"):
        res["memory"] = float(opts["memory"])
    for k, v in (opts.get("resources") or {}).items():
        res[k] = float(v)
    return {k: v for k, v in res.items() if v > 0}


def default_max_retries(opts: Dict[str, Any]) -> int:
    mr = opts.get("max_retries")
    return config.DEFAULT_MAX_RETRIES if mr is None else mr
