"""The process's current CoreWorker (one per process, set by init or worker start)."""
from __future__ import annotations

from typing import Any, Optional

_core_worker: Optional[Any] = None


def set_core_worker(cw: Optional[Any]) -> None:
    global _core_worker
    _core_worker = cw


def core_worker_or_none() -> Optional[Any]:
    return _core_worker


def core_worker() -> Any:
    cw = _core_worker
    if cw is None:
        raise RuntimeError("runtime is not initialized: call runtime.init() first")
    return cw
