"""StateApiClient and its option classes: Ray's object-style state API over the same calls."""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, \
    Union



from runtime.util.state._common import (_connect, DEFAULT_LIMIT, DEFAULT_RPC_TIMEOUT, Filter,
                                        StateRecord)
from runtime.util.state.records import (get_actor, get_job, get_node, get_objects,
                                        get_placement_group, get_task, get_worker, list_actors,
                                        list_cluster_events, list_jobs, list_metrics,
                                        list_nodes, list_objects, list_placement_groups,
                                        list_runtime_envs, list_tasks, list_workers,
                                        summarize_actors, summarize_objects, summarize_tasks)

log = logging.getLogger("runtime.util.state")

# -- StateApiClient -------------------------------------------------------------------------------
class StateResource(enum.Enum):
    ACTORS = "actors"
    JOBS = "jobs"
    PLACEMENT_GROUPS = "placement_groups"
    NODES = "nodes"
    WORKERS = "workers"
    TASKS = "tasks"
    OBJECTS = "objects"
    RUNTIME_ENVS = "runtime_envs"
    CLUSTER_EVENTS = "cluster_events"


class SummaryResource(enum.Enum):
    ACTORS = "actors"
    TASKS = "tasks"
    OBJECTS = "objects"


@dataclasses.dataclass
class ListApiOptions:
    """Ray's list options (``server_timeout_multiplier`` is accepted; there is no server
    in between here, so the whole timeout is the calls')."""

    limit: int = DEFAULT_LIMIT
    timeout: float = DEFAULT_RPC_TIMEOUT
    detail: bool = False
    filters: Optional[List[Filter]] = dataclasses.field(default_factory=list)
    exclude_driver: bool = True
    server_timeout_multiplier: float = 0.8

    def __post_init__(self) -> None:
        if self.filters is None:
            self.filters = []
        for f in self.filters:
            if len(f) != 3 or f[1] not in ("=", "!="):
                raise ValueError(f"Unsupported filter {f!r}: a filter is (key, predicate, "
                                 "value) with predicate '=' or '!='.")


@dataclasses.dataclass
class GetApiOptions:
    timeout: float = DEFAULT_RPC_TIMEOUT


@dataclasses.dataclass
class SummaryApiOptions:
    timeout: float = DEFAULT_RPC_TIMEOUT
    filters: Optional[List[Filter]] = dataclasses.field(default_factory=list)
    summary_by: Optional[str] = None


_LISTS: Dict[str, Callable[..., List[StateRecord]]] = {
    "actors": list_actors, "jobs": list_jobs, "placement_groups": list_placement_groups,
    "nodes": list_nodes, "workers": list_workers, "tasks": list_tasks,
    "objects": list_objects, "cluster_events": list_cluster_events,
    "runtime_envs": list_runtime_envs}
_GETS: Dict[str, Callable[..., Any]] = {
    "actors": get_actor, "jobs": get_job, "placement_groups": get_placement_group,
    "nodes": get_node, "workers": get_worker, "tasks": get_task, "objects": get_objects}
_SUMMARIES: Dict[str, Callable[..., Dict[str, Any]]] = {
    "actors": summarize_actors, "tasks": summarize_tasks, "objects": summarize_objects}


def _resource_name(resource: Union[str, enum.Enum], known: Iterable[str]) -> str:
    name = resource.value if isinstance(resource, enum.Enum) else str(resource)
    name = name.replace("-", "_")
    if name not in known:
        raise ValueError(f"unsupported resource {name!r} here: use one of "
                         f"{', '.join(sorted(known))}")
    return name


class StateApiClient:
    """Ray's client object for the state API: ``get``, ``list`` and ``summary`` by
    resource (a StateResource/SummaryResource or its name). It queries this process's
    cluster (``address`` as the functions take it); ``cookies`` and ``headers`` are for
    Ray's HTTP server, which this runtime does not have, so giving them is an error."""

    def __init__(self, address: Optional[str] = None, cookies: Optional[Dict[str, Any]] = None,
                 headers: Optional[Dict[str, Any]] = None) -> None:
        if cookies or headers:
            raise ValueError("StateApiClient talks gRPC to the GCS with the cluster token; "
                             "it sends no HTTP cookies or headers: leave them out")
        _connect(address)

    def get(self, resource: Union[StateResource, str], id: str,
            options: Optional[GetApiOptions] = None, _explain: bool = False) -> Any:
        fn = _GETS[_resource_name(resource, _GETS)]
        return fn(id, timeout=(options or GetApiOptions()).timeout)

    def list(self, resource: Union[StateResource, str], options: Optional[ListApiOptions] = None,
             raise_on_missing_output: bool = True, _explain: bool = False
             ) -> List[StateRecord]:
        options = options or ListApiOptions()
        name = _resource_name(resource, set(_LISTS) | {"metrics"})
        if name == "metrics":
            return list_metrics(filters=options.filters, limit=options.limit,
                                timeout=options.timeout)
        return _LISTS[name](filters=options.filters, limit=options.limit, timeout=options.timeout,
                  detail=options.detail, raise_on_missing_output=raise_on_missing_output)

    def summary(self, resource: Union[SummaryResource, str], *,
                options: Optional[SummaryApiOptions] = None,
                raise_on_missing_output: bool = True, _explain: bool = False
                ) -> Dict[str, Any]:
        fn = _SUMMARIES[_resource_name(resource, _SUMMARIES)]
        return fn(timeout=(options or SummaryApiOptions()).timeout,
                  raise_on_missing_output=raise_on_missing_output)
