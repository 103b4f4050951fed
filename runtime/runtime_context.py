"""get_runtime_context(): who and where the calling code is.

The task fields (id, name, GPUs) come from the caller's own task context
(runtime/core_worker/task_context.py), so each concurrent call of a threaded or
async actor sees its own task. What only the GCS knows (the actor's name, its
restarts, the node's labels) is asked for when wanted and cached where it cannot
change (an actor's name, its resources), so the common getters stay local.

As in Ray, the context follows the process's current connection: a RuntimeContext
kept across shutdown() and init() answers for the new one, and its getters raise
RuntimeError while the process is not connected.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional

from runtime.actor import ActorHandle
from runtime.core_worker import task_context
from runtime.core_worker.current import core_worker, core_worker_or_none
from runtime.ids import ActorID, JobID, NodeID, PlacementGroupID, TaskID
from runtime.runtime_env import RuntimeEnv
from runtime.runtime_env import context as runtime_env_context

log = logging.getLogger("runtime")

# Placement-group resources as the raylet names them: CPU_group_0_<pg> or CPU_group_<pg>.
_PG_RESOURCE = re.compile(r"^(?P<name>.+)_group_(?:(?P<index>\d+)_)?(?P<pg>[0-9a-f]+)$")


def original_resources(resources: Dict[str, float]) -> Dict[str, float]:
    """Resources named as the user asked for them: a placement group's ``CPU_group_0_<pg>``
    and ``CPU_group_<pg>`` are both the task's CPU (counted once), and ``bundle_group_*``
    is bookkeeping, as Ray's parse_pg_formatted_resources_to_original does."""
    indexed: Dict[str, float] = {}
    wildcard: Dict[str, float] = {}
    plain: Dict[str, float] = {}
    for key, amount in resources.items():
        m = _PG_RESOURCE.match(key)
        if m is None:
            plain[key] = plain.get(key, 0.0) + amount
            continue
        name = m.group("name")
        if name == "bundle":
            continue
        target = indexed if m.group("index") is not None else wildcard
        target[name] = target.get(name, 0.0) + amount
    for name, amount in {**wildcard, **indexed}.items():
        plain[name] = plain.get(name, 0.0) + amount
    return plain


def get_runtime_context() -> "RuntimeContext":
    """The context of the calling driver, task or actor (connecting first if needed, as
    Ray's does)."""
    core_worker()
    return RuntimeContext()


def _spec(ctx: task_context.TaskContext) -> Any:
    """The TaskSpec the task runs from, when the executor records it in the context."""
    return getattr(ctx, "spec", None)


class RuntimeContext:
    """What Ray's RuntimeContext exposes: ids of the job, node, task, actor and worker,
    the current actor's handle and name, the task's resources and placement group."""

    def __init__(self, worker: Any = None) -> None:
        """``worker`` is accepted for Ray's signature only: a context always answers for
        the process's current connection."""

    # -- the process's connection -----------------------------------------------------------------
    @property
    def _cw(self) -> Any:
        return self._check()

    def _check(self) -> Any:
        """The process's core worker; raises, as every getter does, unless connected."""
        cw = core_worker_or_none()
        if cw is None:
            raise RuntimeError("The runtime is not initialized (or was shut down): call "
                               "runtime.init() first.")
        return cw

    def _in_worker(self) -> bool:
        from runtime.core_worker.core_worker import WORKER

        return self._cw.mode == WORKER

    def _actor_info(self, refresh: bool = False) -> Any:
        """The GCS's record of the actor this process hosts (cached: most of it never
        changes; ``refresh`` for what does, such as the restart count)."""
        from runtime.protocol import gcs_pb2

        cw = self._cw
        actor_id = cw.current_actor_id
        cache = getattr(cw, "_runtime_context_actor", None)
        if not refresh and cache is not None and cache.actor_id == actor_id:
            return cache
        reply = cw.gcs_call("GetActor", gcs_pb2.GetActorRequest(actor_id=actor_id),
                            doing=f"looking up actor {actor_id.hex()}")
        if not reply.found:
            raise RuntimeError(f"the GCS does not know actor {actor_id.hex()}, which this "
                               f"process hosts; was it killed?")
        cw._runtime_context_actor = reply.actor
        return reply.actor

    def get(self) -> Dict[str, Any]:
        """Deprecated in Ray in favour of the get_*_id() methods; kept for old scripts."""
        out: Dict[str, Any] = {"job_id": self.job_id, "node_id": self.node_id,
                               "namespace": self.namespace}
        if self._in_worker():
            if self.task_id is not None:
                out["task_id"] = self.task_id
            if self.actor_id is not None:
                out["actor_id"] = self.actor_id
        return out

    # -- job, node, worker ------------------------------------------------------------------------
    def get_job_id(self) -> str:
        """The job's id in hex: 8 characters (4 bytes, little-endian counter), as Ray's."""
        return self._cw.job_id.hex()

    @property
    def job_id(self) -> JobID:
        return JobID(self._cw.job_id)

    def get_node_id(self) -> str:
        return self._cw.node_id.hex()

    @property
    def node_id(self) -> NodeID:
        return NodeID(self._cw.node_id)

    def get_worker_id(self) -> str:
        return self._cw.worker_id.hex()

    def get_temp_dir(self) -> str:
        """The directory that holds the node's sessions (Ray's /tmp/ray)."""
        session = self._cw.session_dir
        return os.path.dirname(session.rstrip("/")) if session else ""

    def get_session_name(self) -> str:
        """The session's directory name (``session_<time>_<pid>``), the same in every
        process of the cluster."""
        return os.path.basename(self._cw.session_dir.rstrip("/"))

    @property
    def namespace(self) -> str:
        return self._cw.namespace

    @property
    def gcs_address(self) -> str:
        return self._cw.gcs_address

    # -- runtime environment ------------------------------------------------------------------------
    @property
    def runtime_env(self) -> RuntimeEnv:
        """The runtime_env of this job (in a driver) or of this worker's task or actor, as
        it travels: local paths are gcs:// package URIs."""
        self._check()
        return RuntimeEnv.deserialize(self.get_runtime_env_string())

    def get_runtime_env_string(self) -> str:
        """The runtime_env as JSON ("{}" when none)."""
        self._check()
        return runtime_env_context.current().serialized or "{}"

    def get_node_labels(self) -> Dict[str, str]:
        """The labels of this process's node, with Ray's default ``ray.io/node-id``."""
        from runtime.protocol import common_pb2

        cw = self._cw
        nodes = cw.gcs_call("GetAllNodes", common_pb2.Empty(), doing="reading node labels").nodes
        for n in nodes:
            if n.node_id == cw.node_id:
                labels = dict(n.labels)
                labels.setdefault("ray.io/node-id", cw.node_id.hex())
                return labels
        raise RuntimeError(f"the GCS does not list this process's node {cw.node_id.hex()}; "
                           f"it may have been declared dead")

    # -- the task ---------------------------------------------------------------------------------
    @property
    def task_id(self) -> Optional[TaskID]:
        self._check()
        tid = task_context.current.get().task_id
        return TaskID(tid) if tid else None

    def get_task_id(self) -> Optional[str]:
        """The running task's id in hex; None outside a task (the driver's own code)."""
        self._check()
        tid = task_context.current.get().task_id
        return tid.hex() if tid else None

    def get_task_name(self) -> Optional[str]:
        """The running task's name: the function's name, ``Cls.method`` for an actor call,
        or the ``name=`` option; None outside a task."""
        self._check()
        ctx = task_context.current.get()
        return ctx.name if ctx.task_id else None

    def get_task_function_name(self) -> Optional[str]:
        """``module.qualname`` of the running task's function (``module.Cls.method`` for
        an actor call), whatever ``name=`` says; None outside a task."""
        cw = self._cw
        ctx = task_context.current.get()
        if not ctx.task_id:
            return None
        executor = cw.executor
        instance = getattr(executor, "actor", None)
        spec = _spec(ctx)
        if ctx.is_actor and instance is not None:
            cls = type(instance)
            method = spec.method_name if spec is not None else ctx.name.rsplit(".", 1)[-1]
            return f"{cls.__module__}.{cls.__qualname__}.{method}"
        if spec is None:
            raise NotImplementedError(
                "get_task_function_name() of a normal task needs the task's spec in its task "
                "context (runtime/core_worker/task_context.py), which this build's executor "
                "does not record yet")
        fn = executor.functions.get(spec.function_id)
        if spec.actor_creation and fn is not None:
            return f"{fn.__module__}.{fn.__qualname__}.__init__"
        return f"{fn.__module__}.{fn.__qualname__}" if fn is not None else None

    def get_assigned_resources(self) -> Dict[str, float]:
        """What the running task or actor holds: ``{"CPU": 1}`` for a default task, ``{}``
        for a default actor (which holds no CPU while it lives), placement-group
        resources under their plain names, as in Ray."""
        cw = self._cw
        if not self._in_worker():
            raise RuntimeError("get_assigned_resources() is only available in a task or an "
                               "actor, not in the driver")
        if cw.current_actor_id:  # what the actor holds while it lives, as the GCS placed it
            return original_resources(dict(self._actor_info().resources))
        spec = _spec(task_context.current.get())
        if spec is None or not hasattr(spec, "resources"):
            raise NotImplementedError(
                "get_assigned_resources() of a normal task needs the task's resources in its "
                "spec (TaskSpec.resources) and the spec in its task context, which this "
                "build does not have yet")
        return original_resources(dict(spec.resources))

    def get_accelerator_ids(self) -> Dict[str, List[str]]:
        self._check()
        return {"GPU": [str(i) for i in task_context.current.get().gpu_ids]}

    def get_resource_ids(self) -> Dict[str, List[str]]:
        """Deprecated in Ray: get_accelerator_ids()."""
        return self.get_accelerator_ids()

    def is_canceled(self) -> bool:
        """Whether cancel() was called for the running task: a running actor call is not
        interrupted (actors have state), so it can poll this and stop cleanly, as in Ray.
        A running normal task gets KeyboardInterrupt; after catching it, this is True."""
        cw = self._cw
        if not self._in_worker():
            raise RuntimeError("This method is only available when the process is a worker "
                               "(in a task or an actor method), not in the driver.")
        executor = getattr(cw, "executor", None)
        if getattr(executor, "actor_loop", None) is not None:
            raise RuntimeError("This method is not supported in an async actor: a cancelled "
                               "call of an async actor gets asyncio.CancelledError instead.")
        task_id = task_context.current.get().task_id
        if not task_id:
            raise RuntimeError("is_canceled() was called outside a task (in a thread the "
                               "task started?); call it from the task's own thread.")
        check = getattr(executor, "is_cancelled", None)
        if check is None:
            raise NotImplementedError("is_canceled() needs the executor to record cancels of "
                                      "running tasks, which this build's executor does not")
        return bool(check(task_id))

    # -- the actor --------------------------------------------------------------------------------
    @property
    def actor_id(self) -> Optional[ActorID]:
        aid = self._cw.current_actor_id
        return ActorID(aid) if aid else None

    def get_actor_id(self) -> Optional[str]:
        """The id, in hex, of the actor this process hosts; None in a driver or task."""
        aid = self._cw.current_actor_id
        return aid.hex() if aid else None

    def get_actor_name(self) -> Optional[str]:
        """The actor's name; "" for an actor created without one; None outside an actor."""
        if not self._cw.current_actor_id:
            return None
        return self._actor_info().name

    @property
    def current_actor(self) -> Any:
        """A handle to the actor this code runs in (to pass itself to other tasks)."""
        cw = self._cw
        if not cw.current_actor_id:
            raise RuntimeError("This method is only available in an actor.")
        return ActorHandle._from_info(self._actor_info())

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether this actor has been restarted at least once."""
        if not self._cw.current_actor_id:
            raise AssertionError("This method shouldn't be called inside tasks: only in actors.")
        return self._actor_info(refresh=True).num_restarts != 0

    # -- placement group --------------------------------------------------------------------------
    def _placement_group(self) -> tuple:
        """(placement group id or b"", capture child tasks): from the running task's spec,
        or for an actor call from its creation's; else what the process captured."""
        cw = self._cw
        ctx = task_context.current.get()
        spec = _spec(ctx)
        if spec is not None and ctx.is_actor and not spec.actor_creation:
            spec = getattr(cw.executor, "creation_spec", None)
        if spec is not None:
            return spec.placement_group_id, spec.capture_child_tasks
        current = cw.current_placement_group
        return current if current else (b"", False)

    @property
    def current_placement_group_id(self) -> PlacementGroupID:
        pg = self._placement_group()[0]
        return PlacementGroupID(pg) if pg else PlacementGroupID.nil()

    def get_placement_group_id(self) -> Optional[str]:
        """The placement group the running task or actor was scheduled in, in hex; None
        when it runs in none."""
        pg = self._placement_group()[0]
        return pg.hex() if pg else None

    @property
    def should_capture_child_tasks_in_placement_group(self) -> bool:
        return self._placement_group()[1]
