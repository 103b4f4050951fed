"""The state API (``ray.util.state``): what the cluster is doing, as lists of records.

Data comes from the GCS (nodes, jobs, actors, placement groups, task events, cluster
events, metrics), the raylets (workers, each node's log files through its LogService and
its runtime environments through its RuntimeEnvService) and the core workers themselves
(objects). Each record is a dict that
also allows attribute access (``a["state"]`` and ``a.state``), so code written for
either style of Ray's state API works. Records carry the fields of Ray 2.60's
``*State`` dataclasses (None where this runtime does not know the value) and a few
of ours; ``detail=False`` returns them all too (a superset of Ray's short form).

Filters are Ray's ``[(key, predicate, value)]`` with predicates ``=`` and
``!=``; values are compared as strings, case-insensitively for states.

A component that cannot be asked raises an error from runtime.exceptions naming it
and its address (ClusterConnectionError when unreachable), never a raw gRPC error.
As in Ray, a raylet that fails to answer fails list_workers/list_objects unless
``raise_on_missing_output=False``, which returns what the others answered.

Our additions, not in Ray's API: ``list_metrics()`` (what ``runtime.util.metrics``
recorded, per process) and ``StateApiClient.list("metrics")``.

The parts: ``_common`` (records, filters, the connection), ``records`` (the tables),
``logs`` (get_log, list_logs), ``client`` (StateApiClient); this module only re-exports.
"""
from __future__ import annotations

from runtime.util.state._common import StateRecord
from runtime.util.state.records import (list_nodes, list_jobs, list_actors, get_actor,
                                        list_tasks, get_task, summarize_tasks, summarize_actors,
                                        summarize_objects, list_workers, get_worker,
                                        list_objects, get_objects, list_placement_groups,
                                        get_placement_group, get_node, get_job,
                                        list_cluster_events, list_runtime_envs, list_metrics)
from runtime.util.state.logs import get_log, list_logs
from runtime.util.state.client import (StateApiClient, StateResource, SummaryResource,
                                       ListApiOptions, GetApiOptions, SummaryApiOptions)

__all__ = ["list_nodes", "list_jobs", "list_actors", "get_actor", "list_tasks", "get_task",
           "summarize_tasks", "summarize_actors", "summarize_objects", "list_workers",
           "get_worker", "list_objects", "get_objects", "list_placement_groups",
           "get_placement_group", "get_node", "get_job", "list_cluster_events", "list_logs",
           "get_log", "list_runtime_envs", "list_metrics", "StateApiClient", "StateResource",
           "SummaryResource", "ListApiOptions", "GetApiOptions", "SummaryApiOptions",
           "StateRecord"]
