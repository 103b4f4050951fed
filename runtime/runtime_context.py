"""get_runtime_context(): who and where the calling code is."""
from __future__ import annotations

from typing import Optional


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
        tid = self._cw.current_task_id
        return tid.hex() if tid else None

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
        return {"GPU": [str(i) for i in self._cw.current_gpu_ids]}

    @property
    def was_current_actor_reconstructed(self) -> bool:
        return False
