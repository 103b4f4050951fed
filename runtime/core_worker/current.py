"""The process's current CoreWorker (one per process, set by init or worker start).

``core_worker()`` is the one accessor the user-facing layer calls: it connects first
(``runtime.init()``, registered by runtime/api.py as the auto-init hook) when nothing
is connected yet, as Ray's API does on first use. ``core_worker_or_none()`` only looks.
The core never imports the user-facing layer; the hook is how ``init`` reaches here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

_core_worker: Optional[Any] = None
_auto_init: Optional[Callable[[], Any]] = None


def set_core_worker(cw: Optional[Any]) -> None:
    global _core_worker
    _core_worker = cw


def set_auto_init(hook: Optional[Callable[[], Any]]) -> None:
    """What core_worker() calls when nothing is connected (runtime.api registers init)."""
    global _auto_init
    _auto_init = hook


def core_worker_or_none() -> Optional[Any]:
    return _core_worker


def core_worker() -> Any:
    """The process's core worker, connecting first through the auto-init hook."""
    cw = _core_worker
    if cw is None and _auto_init is not None:
        _auto_init()
        cw = _core_worker
    if cw is None:
        raise RuntimeError("runtime is not initialized: call runtime.init() first")
    return cw
