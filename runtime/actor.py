"""Actors: ``@remote`` classes, their handles and methods.

An actor lives in a worker process of its own, created and (if it dies)
restarted by the GCS. Callers push method calls straight to that worker on a
stream of their own, so calls from one caller run in submission order. A
handle holds an ObjectRef to a per-actor *handle object* owned by the
creator: the distributed reference counting of ObjectRefs then tells the
creator when no handle is left anywhere, and the actor is destroyed (unless
detached).
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
from typing import Any, Dict, List, Optional

from runtime.core_worker.actor_submitter import ActorCreation
from runtime.core_worker.current import core_worker, core_worker_or_none
from runtime.exceptions import ActorExitRequested, AsyncioActorExit
from runtime.object_ref import ObjectRef
from runtime.options import (placed_resources, strategy_proto, task_resources,
                             validate_task_options)
from runtime.vocabulary import STRATEGY_PLACEMENT_GROUP

ACTOR_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "name", "namespace", "lifetime", "get_if_exists",
    "max_restarts", "max_task_retries", "max_concurrency", "scheduling_strategy", "memory",
    "runtime_env", "concurrency_groups", "max_pending_calls", "enable_task_events",
    "accelerator_type", "label_selector", "_metadata", "placement_group",
    "placement_group_bundle_index", "placement_group_capture_child_tasks", "object_store_memory",
}
METHOD_OPTIONS = {"num_returns", "name", "max_task_retries", "retry_exceptions",
                  "concurrency_group", "enable_task_events", "_metadata"}


__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "exit_actor", "ActorExitRequested"]


def exit_actor() -> None:
    """End the current actor from inside one of its methods (no restart).

    Calls already queued on the actor fail with ActorDiedError. In an async actor this
    raises AsyncioActorExit, as Ray does; in a sync one an ActorExitRequested, which
    ``except Exception`` cannot swallow."""
    cw = core_worker_or_none()
    if cw is None or not getattr(cw, "current_actor_id", None):
        raise TypeError("exit_actor() called outside an actor method")
    executor = getattr(cw, "executor", None)
    actor_loop = getattr(executor, "actor_loop", None)
    if actor_loop is not None and _running_loop() is actor_loop:
        raise AsyncioActorExit()
    raise ActorExitRequested()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def validate_actor_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    for key in opts:
        if key not in ACTOR_OPTIONS:
            raise ValueError(f"Invalid option keyword {key} for actors. Valid ones are "
                             f"{sorted(ACTOR_OPTIONS)}.")
    task_like = {k: v for k, v in opts.items()
                 if k in ("num_cpus", "num_gpus", "resources", "scheduling_strategy", "memory",
                          "object_store_memory", "runtime_env")}
    validate_task_options(task_like)
    lifetime = opts.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError("actor `lifetime` argument must be one of 'detached', 'non_detached' "
                         "and 'None'.")
    for key in ("max_restarts", "max_task_retries"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < -1):
            raise ValueError(f"The keyword '{key}' only accepts -1, 0 or a positive integer, "
                             f"got {v!r}.")
    mc = opts.get("max_concurrency")
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
        raise ValueError(f"max_concurrency must be a positive integer, got {mc!r}")
    name = opts.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"Actor name must be a non-empty string, got {name!r}")
    if opts.get("get_if_exists") and not name:
        raise ValueError("The actor name must be specified to use `get_if_exists`.")
    ns = opts.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not ns):
        raise ValueError(f"namespace must be a non-empty string, got {ns!r}")
    return dict(opts)


def _method_names(cls: type) -> List[str]:
    return [n for n, m in inspect.getmembers(cls, predicate=callable)
            if not (n.startswith("__") and n.endswith("__")) or n == "__call__"]


def _is_async(cls: type) -> bool:
    return any(inspect.iscoroutinefunction(m) or inspect.isasyncgenfunction(m)
               for _n, m in inspect.getmembers(cls, predicate=callable))


class ActorClass:
    """What ``@remote`` makes of a class: ``Cls.remote(...)`` creates an actor."""

    def __init__(self, cls: type, options: Optional[Dict[str, Any]] = None) -> None:
        self._cls = cls
        self._name = cls.__qualname__
        self._options = validate_actor_options(options or {})
        self._blob: Optional[bytes] = None
        self._class_id = b""
        self._methods = _method_names(cls)
        self._method_options = {n: getattr(getattr(cls, n), "__runtime_method_options__", {})
                                for n in self._methods}
        self._is_async = _is_async(cls)
        self.__doc__ = cls.__doc__
        self.__name__ = cls.__name__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actors cannot be instantiated directly. Instead of '{self._name}()', "
                        f"use '{self._name}.remote()'.")

    def __repr__(self) -> str:
        return f"<ActorClass {self._name}>"

    def __getstate__(self):
        return {"_cls": self._cls, "_options": self._options}

    def __setstate__(self, state):
        self.__init__(state["_cls"], state["_options"])

    def options(self, **options) -> "_ActorClassOptions":
        merged = dict(self._options)
        merged.update(options)
        return _ActorClassOptions(self, validate_actor_options(merged))

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._remote(args, kwargs, self._options)

    def bind(self, *args, **kwargs):
        raise NotImplementedError("DAG building (bind) is not supported")

    def _export(self) -> None:
        if self._blob is None:
            from runtime.serialization import dumps_function

            self._blob = dumps_function(self._cls)
            self._class_id = hashlib.sha1(self._blob).digest()

    def _remote(self, args: tuple, kwargs: dict, opts: Dict[str, Any]) -> "ActorHandle":
        cw = core_worker()
        self._export()
        others = task_resources({k: v for k, v in opts.items() if k != "num_cpus"})
        others.pop("CPU", None)
        if opts.get("num_cpus") is not None:
            place = dict(others)
            if opts["num_cpus"]:
                place["CPU"] = float(opts["num_cpus"])
            hold = dict(place)
        else:  # Ray's default: 1 CPU to place the actor, none held while it lives
            place = dict(others, CPU=1.0)
            hold = dict(others)
        strategy = strategy_proto(opts.get("scheduling_strategy"))
        if strategy.kind == STRATEGY_PLACEMENT_GROUP:
            place = placed_resources(place, strategy)
            hold = placed_resources(hold, strategy) if hold else {}
        max_task_retries = opts.get("max_task_retries") or 0
        # The GCS refuses a taken name atomically at registration (Ray checks with a racy
        # get_actor first): ActorAlreadyExistsError.
        actor_id, handle_ref, existing = cw.actors.create(ActorCreation(
            class_name=self._name, class_blob=self._blob, class_id=self._class_id,
            method_names=self._methods, is_async=self._is_async,
            constructor=getattr(self._cls, "__init__", self._cls), args=args, kwargs=kwargs,
            place=place, hold=hold, strategy=strategy, name=opts.get("name") or "",
            namespace=opts.get("namespace") or "",
            detached=opts.get("lifetime") == "detached",
            get_if_exists=bool(opts.get("get_if_exists")),
            max_restarts=opts.get("max_restarts") or 0,
            max_concurrency=opts.get("max_concurrency") or (1000 if self._is_async else 1),
            max_task_retries=max_task_retries))
        if existing is not None:
            return ActorHandle._from_info(existing, self)
        return ActorHandle(actor_id, self._name, self._methods, self._method_options,
                           max_task_retries, self._is_async, handle_ref)


class _ActorClassOptions:
    def __init__(self, actor_class: ActorClass, opts: Dict[str, Any]) -> None:
        self._ac = actor_class
        self._opts = opts

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._ac._remote(args, kwargs, self._opts)


class ActorHandle:
    """A reference to an actor; picklable (pass it to tasks and other actors)."""

    def __init__(self, actor_id: bytes, class_name: str, methods: List[str],
                 method_options: Dict[str, dict], max_task_retries: int, is_async: bool,
                 handle_ref: Optional[ObjectRef]) -> None:
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = set(methods)
        self._method_options = method_options
        self._max_task_retries = max_task_retries
        self._is_async = is_async
        self._handle_ref = handle_ref  # keeps the actor in scope (see module docstring)

    def __getattr__(self, name: str) -> "ActorMethod":
        if name.startswith("_") and name not in self.__dict__.get("_methods", ()):
            raise AttributeError(name)
        if name not in self._methods:
            raise AttributeError(f"'{self._class_name}' actor has no method '{name}'")
        return ActorMethod(self, name, self._method_options.get(name) or {})

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    @property
    def _ray_actor_id(self):
        return self._actor_id

    @classmethod
    def _from_info(cls, info: Any, ac: Optional[ActorClass] = None) -> "ActorHandle":
        """A handle to the actor the GCS describes in `info` (an ActorInfo): get_actor,
        get_if_exists, the current actor's own handle. It does not keep the actor in scope."""
        method_options = ac._method_options if ac is not None else {}
        return cls(info.actor_id, info.class_name, list(info.method_names), method_options,
                   info.max_task_retries, info.is_async, None)

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._class_name, sorted(self._methods),
                              self._method_options, self._max_task_retries, self._is_async,
                              self._handle_ref))


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, options: Dict[str, Any]) -> None:
        self._handle = handle
        self._name = name
        self._options = options

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'object.{self._name}()', try 'object.{self._name}.remote()'.")

    def options(self, **options) -> "ActorMethod":
        for key in options:
            if key not in METHOD_OPTIONS:
                raise ValueError(f"Invalid option keyword {key} for actor methods. Valid ones "
                                 f"are {sorted(METHOD_OPTIONS)}.")
        merged = dict(self._options)
        merged.update(options)
        validate_task_options({k: v for k, v in merged.items()
                               if k in ("num_returns", "name", "retry_exceptions")})
        return ActorMethod(self._handle, self._name, merged)

    def remote(self, *args, **kwargs):
        cw = core_worker()
        h = self._handle
        opts = self._options
        num_returns = opts.get("num_returns")
        mtr = opts.get("max_task_retries")
        return cw.actors.call(h._actor_id, h._class_name, self._name, h._handle_ref, args, kwargs,
                              1 if num_returns is None else num_returns,
                              h._max_task_retries if mtr is None else mtr,
                              opts.get("retry_exceptions"))
