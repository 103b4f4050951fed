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

import hashlib
import inspect
import threading
from typing import Any, Callable, Dict, List, Optional

from runtime.core_worker.actor_submitter import ActorCreation
from runtime.core_worker.current import core_worker, core_worker_or_none
from runtime.core_worker.generators import GENERATOR_STREAMING, generator_mode
from runtime.exceptions import ActorExitRequested, AsyncioActorExit, PendingCallsLimitExceeded
from runtime.object_ref import ObjectRef
from runtime.options import (placed_resources, scheduling_strategy,
                             task_resources, validate_method_options, validate_task_options)
from runtime.runtime_env import context as runtime_env_context
from runtime.runtime_env.resolve import resolve as resolve_runtime_env
from runtime.runtime_env.resolve import store_for
from runtime.vocabulary import STRATEGY_PLACEMENT_GROUP

ACTOR_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "name", "namespace", "lifetime", "get_if_exists",
    "max_restarts", "max_task_retries", "max_concurrency", "scheduling_strategy", "memory",
    "runtime_env", "concurrency_groups", "max_pending_calls", "enable_task_events",
    "accelerator_type", "label_selector", "_metadata", "placement_group",
    "placement_group_bundle_index", "placement_group_capture_child_tasks", "object_store_memory",
}
#: The actor options that are the same as a task's, checked by validate_task_options.
_TASK_LIKE = ("num_cpus", "num_gpus", "resources", "scheduling_strategy", "memory",
              "runtime_env", "accelerator_type", "label_selector", "placement_group",
              "placement_group_bundle_index", "placement_group_capture_child_tasks",
              "enable_task_events", "_metadata")


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
    if executor is not None and executor.on_actor_loop():
        raise AsyncioActorExit()
    raise ActorExitRequested()


def validate_actor_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    for key in opts:
        if key not in ACTOR_OPTIONS:
            raise ValueError(f"Invalid option keyword {key} for actors. Valid ones are "
                             f"{sorted(ACTOR_OPTIONS)}.")
    checked = validate_task_options({k: v for k, v in opts.items() if k in _TASK_LIKE})
    osm = opts.get("object_store_memory")
    if osm is not None and (not isinstance(osm, int) or isinstance(osm, bool) or osm < 0):
        raise ValueError(f"The keyword 'object_store_memory' only accepts None, 0 or a "
                         f"positive integer, got {osm!r}.")
    lifetime = opts.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError("actor `lifetime` argument must be one of 'detached', 'non_detached' "
                         "and 'None'.")
    for key in ("max_restarts", "max_task_retries"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < -1):
            raise ValueError(f"The keyword '{key}' only accepts -1, 0 or a positive integer, "
                             f"got {v!r}.")
    mpc = opts.get("max_pending_calls")
    if mpc is not None and (not isinstance(mpc, int) or isinstance(mpc, bool) or mpc == 0
                            or mpc < -1):
        raise ValueError(f"max_pending_calls must be -1 (no limit) or a positive integer, "
                         f"got {mpc!r}")
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
    out = dict(opts)
    for key in ("runtime_env", "label_selector"):
        if key in out:
            out[key] = checked[key]
    if "concurrency_groups" in out:
        out["concurrency_groups"] = _check_groups(out["concurrency_groups"])
    return out


def _check_groups(groups: Any) -> Dict[str, int]:
    """Ray's concurrency_groups: group name -> its max concurrency (a positive int)."""
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise TypeError(f"concurrency_groups must be a dict of group name to its max "
                        f"concurrency, e.g. {{'io': 2, 'compute': 4}}, got "
                        f"{type(groups).__name__}")
    for name, limit in groups.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"concurrency_groups: a group name must be a non-empty string, "
                             f"got {name!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"concurrency_groups: the max concurrency of group {name!r} must "
                             f"be a positive integer, got {limit!r}")
    return dict(groups)


def _method_names(cls: type) -> List[str]:
    return [n for n, m in inspect.getmembers(cls, predicate=callable)
            if not (n.startswith("__") and n.endswith("__")) or n == "__call__"]


def _with_generator_flag(member: Any, opts: Dict[str, Any]) -> Dict[str, Any]:
    """A generator method's options say so: its calls return an ObjectRefGenerator by
    default (Ray 2.60), which the caller must know before the worker answers."""
    if inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member):
        return {**opts, "_is_generator": True}
    return opts


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
        self._method_blob = b""
        self._class_id = b""
        self._methods = _method_names(cls)
        self._method_options = {n: _with_generator_flag(
            getattr(cls, n), getattr(getattr(cls, n), "__runtime_method_options__", {}))
            for n in self._methods}
        self._is_async = _is_async(cls)
        groups = self._options.get("concurrency_groups") or {}
        for n, mopts in self._method_options.items():
            group = mopts.get("concurrency_group")
            if group is not None and group not in groups:
                raise ValueError(
                    f"method {self._name}.{n} is in concurrency group {group!r}, which the "
                    f"actor does not define: define it in @remote(concurrency_groups="
                    f"{{{group!r}: <max concurrency>, ...}}) (its groups: {sorted(groups)})")
        # (parent runtime_env, resolved runtime_env) of the default options (see _env)
        self._env: Optional[tuple] = None
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
        if "concurrency_groups" in options:  # methods name their groups in the class
            raise ValueError("Setting 'concurrency_groups' is not supported in '.options()'.")
        merged = dict(self._options)
        merged.update(options)
        return _ActorClassOptions(self, validate_actor_options(merged))

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._remote(args, kwargs, self._options, self)

    def bind(self, *args, **kwargs):
        raise NotImplementedError("DAG building (bind) is not supported")

    def _export(self) -> None:
        if self._blob is None:
            from runtime.serialization import dumps_function

            self._blob = dumps_function(self._cls)
            self._class_id = hashlib.sha1(self._blob).digest()
            # Only what differs from the defaults: handles from get_actor() get it back.
            shaped = {n: o for n, o in self._method_options.items() if o}
            self._method_blob = dumps_function(shaped) if shaped else b""

    def _remote(self, args: tuple, kwargs: dict, opts: Dict[str, Any],
                holder: Any) -> "ActorHandle":
        """Create an actor with `opts`; `holder` (this class or an options() result) keeps
        the runtime_env they resolve to, for the parent environment it was resolved in."""
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
        strategy, _inherit = scheduling_strategy(opts)
        parent = runtime_env_context.current()
        if holder._env is None or holder._env[0] is not parent:
            holder._env = (parent, resolve_runtime_env(opts.get("runtime_env"), parent,
                                                       store_for(cw)))
        env = holder._env[1]
        if env.hash:
            strategy.runtime_env.CopyFrom(env.info)
        if strategy.kind == STRATEGY_PLACEMENT_GROUP:
            place = placed_resources(place, strategy)
            hold = placed_resources(hold, strategy) if hold else {}
        max_task_retries = opts.get("max_task_retries") or 0
        groups = opts.get("concurrency_groups")
        # Only when set, so that actors without groups need nothing new of the submitter.
        extra = {"concurrency_groups": groups} if groups else {}
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
            max_task_retries=max_task_retries, method_options=self._method_blob, **extra))
        if existing is not None:
            return ActorHandle._from_info(existing, self)
        return ActorHandle(actor_id, self._name, self._methods, self._method_options,
                           max_task_retries, self._is_async, handle_ref,
                           max_pending_calls=opts.get("max_pending_calls") or -1)


class _ActorClassOptions:
    def __init__(self, actor_class: ActorClass, opts: Dict[str, Any]) -> None:
        self._ac = actor_class
        self._opts = opts
        self._env: Optional[tuple] = None

    def remote(self, *args, **kwargs) -> "ActorHandle":
        return self._ac._remote(args, kwargs, self._opts, self)


class ActorHandle:
    """A reference to an actor; picklable (pass it to tasks and other actors)."""

    def __init__(self, actor_id: bytes, class_name: str, methods: List[str],
                 method_options: Dict[str, dict], max_task_retries: int, is_async: bool,
                 handle_ref: Optional[ObjectRef], max_pending_calls: int = -1) -> None:
        self._actor_id = actor_id
        # Ray's max_pending_calls: a limit of this handle (in this process), not of the
        # actor; a copy passed elsewhere starts with no calls pending and no limit.
        self._max_pending_calls = max_pending_calls
        self._pending: List[ObjectRef] = []
        self._pending_lock = threading.Lock()
        self._class_name = class_name
        self._methods = set(methods)
        self._method_options = method_options
        self._max_task_retries = max_task_retries
        self._is_async = is_async
        self._handle_ref = handle_ref  # keeps the actor in scope (see module docstring)

    def _limited(self, submit: Callable[[], Any]) -> Any:
        """Submit a call unless max_pending_calls of this handle's calls are unfinished
        (PendingCallsLimitExceeded at once, as in Ray)."""
        memory = core_worker().memory
        with self._pending_lock:
            self._pending = [r for r in self._pending if r._id not in memory]
            if len(self._pending) >= self._max_pending_calls:
                raise PendingCallsLimitExceeded(
                    f"The actor {self._class_name} ({self._actor_id.hex()}) has "
                    f"{len(self._pending)} calls pending, its max_pending_calls: wait for "
                    f"some to finish (get or wait on their refs) before submitting more")
            out = submit()
            refs = out if isinstance(out, list) else [out]
            if refs and isinstance(refs[0], ObjectRef):
                self._pending.append(refs[0])
            return out

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
        if ac is not None:
            method_options = ac._method_options
        elif info.method_options:  # @method options, as the creator's class declared them
            from runtime.serialization import loads_function

            method_options = loads_function(info.method_options)
        else:
            method_options = {}
        return cls(info.actor_id, info.class_name, list(info.method_names), method_options,
                   info.max_task_retries, info.is_async, None)

    def __reduce__(self):
        return (ActorHandle, (self._actor_id, self._class_name, sorted(self._methods),
                              self._method_options, self._max_task_retries, self._is_async,
                              self._handle_ref))


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, options: Dict[str, Any],
                 call: Optional[Dict[str, Any]] = None) -> None:
        self._handle = handle
        self._name = name
        self._options = options
        self._call: Dict[str, Any] = call or {}  # set by .options(): name, concurrency_group

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'object.{self._name}()', try 'object.{self._name}.remote()'.")

    def options(self, **options) -> "ActorMethod":
        validate_method_options(options, ".options()")
        merged = dict(self._options)
        merged.update(options)
        # What only a call says travels with it; the method's own concurrency group is
        # the actor's worker's to read from the class.
        call = dict(self._call)
        for key in ("concurrency_group", "name"):
            if key in options:
                call[key] = options[key]
        return ActorMethod(self._handle, self._name, merged, call)

    def remote(self, *args, **kwargs):
        cw = core_worker()
        h = self._handle
        if h._max_pending_calls > 0:
            return h._limited(lambda: self._submit(cw, args, kwargs))
        return self._submit(cw, args, kwargs)

    def _submit(self, cw: Any, args: tuple, kwargs: dict):
        h = self._handle
        opts = self._options
        num_returns = opts.get("num_returns")
        mtr = opts.get("max_task_retries")
        mode = generator_mode(num_returns, None)
        if not mode and num_returns is None and opts.get("_is_generator"):
            mode = GENERATOR_STREAMING
        return cw.actors.call(h._actor_id, h._class_name, self._name, h._handle_ref, args, kwargs,
                              1 if num_returns is None or mode else num_returns,
                              h._max_task_retries if mtr is None else mtr,
                              opts.get("retry_exceptions"), generator=mode,
                              backpressure=opts.get("_generator_backpressure_num_objects"),
                              **self._call)
