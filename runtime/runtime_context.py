"""get_runtime_context(): who and where the calling code is.

The task fields (id, name, GPUs) come from the caller's own task context
(runtime/core_worker/task_context.py), so each concurrent call of a threaded or
async actor sees its own task.
"""
from __future__ import annotations

from typing import Optional

from runtime.core_worker import task_context


class RuntimeContext:
    """What Ray's RuntimeContext exposes: ids of the job, node, task and worker."""

    def __init__(self, cw) -> None:
        self._cw = cw

    def get_job_id(self) -> str:
        return self._cw.job_id.hex()

    @property
    def job_id(self):
        return self._cw.job_id

    def get_node_id(self) -> str:
        return self._cw.node_id.hex()

    @property
    def node_id(self):
        return self._cw.node_id

    def get_worker_id(self) -> str:
        return self._cw.worker_id.hex()

    def get_task_id(self) -> Optional[str]:
        tid = task_context.current.get().task_id
        return tid.hex() if tid else None

    def get_task_name(self) -> Optional[str]:
        """The running task's name (``Cls.method`` for an actor call); None outside a task."""
        ctx = task_context.current.get()
        return ctx.name if ctx.task_id else None

    def get_actor_id(self) -> Optional[str]:
        aid = getattr(self._cw, "current_actor_id", None)
        return aid.hex() if aid else None

    @property
    def namespace(self) -> str:
        return self._cw.namespace

    def get_assigned_resources(self) -> dict:
        return {}

    @property
    def gcs_address(self) -> str:
        return self._cw.gcs_address

    def get_accelerator_ids(self) -> dict:
        return {"GPU": [str(i) for i in task_context.current.get().gpu_ids]}

    @property
    def was_current_actor_reconstructed(self) -> bool:
        return False
