"""Validation of ``@remote(...)`` / ``.options(...)`` keywords, with Ray's rules and messages.

Every keyword accepted here is honoured somewhere (resources, the scheduling strategy, the
task or actor spec) or refused with the reason: a script never runs with an option it
asked for silently dropped.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, Optional, Tuple

from runtime import config
from runtime.labels import ACCELERATOR_RESOURCE_PREFIX, check_selector
from runtime.protocol import common_pb2
from runtime.runtime_env.runtime_env import parse as parse_runtime_env
from runtime.shapes import group_resources
from runtime.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                PlacementGroupSchedulingStrategy)
from runtime.vocabulary import (STRATEGY_DEFAULT, STRATEGY_NODE_AFFINITY,
                                STRATEGY_PLACEMENT_GROUP, STRATEGY_SPREAD)

#: Options of an actor method, in ``@method(...)`` and ``.options(...)`` on a call.
METHOD_OPTIONS = {"num_returns", "name", "max_task_retries", "retry_exceptions",
                  "concurrency_group", "enable_task_events", "_metadata",
                  "_generator_backpressure_num_objects"}
TASK_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "num_returns", "max_retries", "retry_exceptions",
    "name", "scheduling_strategy", "memory", "runtime_env", "max_calls", "accelerator_type",
    "placement_group", "placement_group_bundle_index", "placement_group_capture_child_tasks",
    "label_selector", "_metadata", "enable_task_events", "object_store_memory",
    "_generator_backpressure_num_objects",
}
#: What a task or actor with accelerator_type=T asks of resource "accelerator_type:T".
ACCELERATOR_REQUEST = 0.001


def _nonneg_number(key: str, value: Any) -> None:
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"The keyword '{key}' only accepts a finite non-negative number, "
                         f"got {value!r}.")


def _count(key: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 0):
        raise ValueError(f"The keyword '{key}' only accepts None, 0 or a positive integer, "
                         f"got {value!r}.")


def validate_common_options(out: Dict[str, Any]) -> None:
    """The keywords tasks and actors share beyond resources: accelerator_type,
    label_selector (copied, checked), the deprecated placement_group keywords,
    enable_task_events and _metadata."""
    acc = out.get("accelerator_type")
    if acc is not None and (not isinstance(acc, str) or not acc or "," in acc):
        raise ValueError(f"The keyword 'accelerator_type' only accepts an accelerator type "
                         f"name such as 'A100' (see runtime.util.accelerators), got {acc!r}.")
    if out.get("label_selector") is not None:
        out["label_selector"] = check_selector(out["label_selector"])
    resolve_placement_group(out, warn=True)  # validates
    ete = out.get("enable_task_events")
    if ete is not None and not isinstance(ete, bool):
        raise TypeError(f"The keyword 'enable_task_events' only accepts a bool, got {ete!r}.")
    if ete is False:
        raise ValueError("enable_task_events=False is not supported: this runtime records "
                         "the events of every task and actor call (they are what the state "
                         "API, raytop and timeline() show); leave it at its default.")
    md = out.get("_metadata")
    if md is not None and not isinstance(md, dict):
        raise TypeError(f"The keyword '_metadata' only accepts a dict, got "
                        f"{type(md).__name__}.")


def validate_task_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    """A checked copy of a remote function's options."""
    for key in opts:
        if key not in TASK_OPTIONS:
            raise ValueError(f"Invalid option keyword {key} for remote functions. "
                             f"Valid ones are {sorted(TASK_OPTIONS)}.")
    out = dict(opts)
    for key in ("num_cpus", "num_gpus", "memory"):
        if out.get(key) is not None:
            _nonneg_number(key, out[key])
    if out.get("object_store_memory") is not None:
        raise ValueError("Setting 'object_store_memory' is not implemented for tasks (as in "
                         "Ray); it is an actor option.")
    _count("max_calls", out.get("max_calls"))
    validate_common_options(out)
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
            pass  # a generator task (runtime/core_worker/generators.py)
        elif not isinstance(nr, int) or isinstance(nr, bool) or nr < 0:
            raise ValueError(f"The keyword 'num_returns' only accepts a non-negative integer, "
                             f"got {nr!r}.")
    bp = out.get("_generator_backpressure_num_objects")
    if bp is not None and (not isinstance(bp, int) or isinstance(bp, bool) or bp < 0):
        raise ValueError(f"The keyword '_generator_backpressure_num_objects' only accepts a "
                         f"non-negative integer, got {bp!r}.")
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
    if "runtime_env" in out:
        out["runtime_env"] = parse_runtime_env(out["runtime_env"])
    return out


def validate_method_options(opts: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A checked copy of an actor method's options (`where`: "@method" or ".options()")."""
    for key in opts:
        if key not in METHOD_OPTIONS:
            raise ValueError(f"Invalid option keyword {key} for actor methods in {where}. Valid "
                             f"ones are {sorted(METHOD_OPTIONS)}.")
    out = dict(opts)
    validate_task_options({k: v for k, v in out.items()
                           if k in ("num_returns", "name", "retry_exceptions",
                                    "enable_task_events", "_metadata",
                                    "_generator_backpressure_num_objects")})
    mtr = out.get("max_task_retries")
    if mtr is not None and (not isinstance(mtr, int) or isinstance(mtr, bool) or mtr < -1):
        raise ValueError(f"The keyword 'max_task_retries' only accepts -1, 0 or a positive "
                         f"integer, got {mtr!r}.")
    group = out.get("concurrency_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"The keyword 'concurrency_group' only accepts the name of one of "
                         f"the actor's concurrency groups, got {group!r}.")
    return out


def resolve_placement_group(opts: Dict[str, Any], warn: bool = False) -> Tuple[Any, bool]:
    """(scheduling strategy, inherit) from the options, with Ray's deprecated keywords
    ``placement_group``, ``placement_group_bundle_index`` and
    ``placement_group_capture_child_tasks`` turned into the PlacementGroupSchedulingStrategy
    they mean. `inherit` is False when they say not to join the placement group of the
    submitting task (placement_group=None, or capture_child_tasks=False), as in Ray."""
    strategy = opts.get("scheduling_strategy")
    pg = opts.get("placement_group", "default")
    index = opts.get("placement_group_bundle_index", -1)
    capture = opts.get("placement_group_capture_child_tasks")
    if pg == "default" and index == -1 and capture is None:
        return strategy, True  # the common case: no deprecated keyword
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"The keyword 'placement_group_bundle_index' only accepts an int, got "
                        f"{index!r}.")
    if capture is not None and not isinstance(capture, bool):
        raise TypeError(f"The keyword 'placement_group_capture_child_tasks' only accepts a "
                        f"bool, got {capture!r}.")
    if pg not in ("default", None):
        if not hasattr(pg, "id") or not hasattr(pg, "bundle_cache"):
            raise TypeError(f"The keyword 'placement_group' only accepts a PlacementGroup "
                            f"(runtime.util.placement_group(...)), None or 'default', got "
                            f"{pg!r}.")
        if strategy is not None:
            raise ValueError("Placement groups should be specified via the scheduling_strategy "
                             "option. The placement_group option is deprecated.")
        if warn:
            warnings.warn("placement_group parameter is deprecated. Use scheduling_strategy="
                          "PlacementGroupSchedulingStrategy(...) instead.", DeprecationWarning,
                          stacklevel=4)
        return PlacementGroupSchedulingStrategy(pg, index, capture), True
    if index != -1 or capture:
        raise ValueError("placement_group_bundle_index and placement_group_capture_child_tasks "
                         "need placement_group=<a placement group>; better, use "
                         "scheduling_strategy=PlacementGroupSchedulingStrategy(pg, "
                         "placement_group_bundle_index=..., "
                         "placement_group_capture_child_tasks=...).")
    return strategy, False  # placement_group=None, or capture_child_tasks=False


def scheduling_strategy(opts: Dict[str, Any]) -> Tuple[common_pb2.SchedulingStrategy, bool]:
    """(the SchedulingStrategy proto the options ask for, with their label_selector;
    whether the submitting task's placement group may be inherited)."""
    strategy, inherit = resolve_placement_group(opts)
    proto = strategy_proto(strategy)
    selector = opts.get("label_selector")
    if selector:
        for key in sorted(selector):  # a stable order: the strategy is part of the key
            proto.label_selector[key] = selector[key]
    return proto, inherit and strategy is None


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
    """The resource shape a task (or an actor) asks for (Ray's default: 1 CPU);
    `accelerator_type` is a constraint resource, as in Ray."""
    res: Dict[str, float] = {}
    cpus = opts.get("num_cpus")
    res["CPU"] = float(1 if cpus is None else cpus)
    if opts.get("num_gpus"):
        res["GPU"] = float(opts["num_gpus"])
    if opts.get("memory"):
        res["memory"] = float(opts["memory"])
    if opts.get("object_store_memory"):
        res["object_store_memory"] = float(opts["object_store_memory"])
    for k, v in (opts.get("resources") or {}).items():
        res[k] = float(v)
    acc = opts.get("accelerator_type")
    if acc:
        res[ACCELERATOR_RESOURCE_PREFIX + acc] = ACCELERATOR_REQUEST
    return {k: v for k, v in res.items() if v > 0}


def default_max_calls(opts: Dict[str, Any]) -> Optional[int]:
    """Ray's max_calls default: 1 for a function declared with GPUs (a GPU task's worker
    exits after it, releasing what the framework holds on the GPU), else unlimited."""
    mc = opts.get("max_calls")
    if mc is None and opts.get("num_gpus"):
        return 1
    return mc


def default_max_retries(opts: Dict[str, Any]) -> int:
    mr = opts.get("max_retries")
    return config.DEFAULT_MAX_RETRIES if mr is None else mr
