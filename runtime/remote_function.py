"""RemoteFunction: what ``@runtime.remote`` makes of a function."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List, Optional, Union

from runtime.core_worker.current import core_worker
from runtime.core_worker.generators import generator_mode, submit_generator
from runtime.core_worker.submitter import new_task, return_refs
from runtime.core_worker.task_args import prepare_args
from runtime.object_ref import ObjectRef
from runtime.options import (default_max_calls, default_max_retries, placed_resources,
                             scheduling_strategy, task_resources, validate_task_options)
from runtime.protocol import common_pb2
from runtime.runtime_env import context as runtime_env_context
from runtime.runtime_env.resolve import resolve as resolve_runtime_env
from runtime.runtime_env.resolve import store_for
from runtime.serialization import dumps_function
from runtime.vocabulary import STRATEGY_PLACEMENT_GROUP


class RemoteFunction:
    """A function that runs as a task: call ``.remote(*args)``, not the function."""

    def __init__(self, function: Callable, options: Optional[Dict[str, Any]] = None) -> None:
        self._function = function
        self._name = getattr(function, "__qualname__", getattr(function, "__name__", "task"))
        self._options = validate_task_options(options or {})
        self._max_calls = default_max_calls(self._options) or 0
        self._blob: Optional[bytes] = None
        self._function_id = b""
        # (resources, strategy, scheduling key, parent runtime_env) of the default options,
        # computed once per parent environment (the job's, or this worker's); each
        # .options(...) result keeps its own, so nothing here grows with calls.
        self._shape: Optional[tuple] = None
        self.__doc__ = function.__doc__
        self.__name__ = getattr(function, "__name__", self._name)
        self.__wrapped__ = function

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Remote functions cannot be called directly. Instead of running "
                        f"'{self._name}()', try '{self._name}.remote()'.")

    def __repr__(self) -> str:
        return f"<RemoteFunction {self._name}>"

    def __getstate__(self):
        return {"_function": self._function, "_options": self._options}

    def __setstate__(self, state):
        self.__init__(state["_function"], state["_options"])

    def options(self, **options) -> "_BoundOptions":
        merged = dict(self._options)
        merged.update(options)
        if "max_calls" in options:  # it belongs to the function (Ray exports it with it)
            raise ValueError("Setting 'max_calls' is not supported in '.options()'.")
        return _BoundOptions(self, validate_task_options(merged))

    def remote(self, *args, **kwargs) -> Union[ObjectRef, List[ObjectRef], None]:
        return self._remote(args, kwargs, self._options, self)

    def _export(self) -> None:
        if self._blob is None:
            blob = dumps_function(self._function)
            self._function_id = hashlib.sha1(blob).digest()
            self._blob = blob

    def _remote(self, args: tuple, kwargs: dict, opts: Dict[str, Any], holder: Any):
        """Submit with `opts`; `holder` (this function or an options() result) caches the
        resource shape those options make, for as long as it lives itself."""
        cw = core_worker()
        self._export()
        inherited = None
        if opts.get("scheduling_strategy") is None:
            inherited = cw.current_placement_group  # capture_child_tasks
        parent = runtime_env_context.current()
        shape = holder._shape if inherited is None else None
        if shape is None or shape[3] is not parent:
            strategy, may_inherit = scheduling_strategy(opts)
            if inherited is not None and may_inherit:
                strategy = common_pb2.SchedulingStrategy(
                    kind=STRATEGY_PLACEMENT_GROUP, placement_group_id=inherited[0], bundle_index=-1,
                    soft=True, label_selector=strategy.label_selector)
            env = resolve_runtime_env(opts.get("runtime_env"), parent, store_for(cw))
            if env.hash:
                strategy.runtime_env.CopyFrom(env.info)
            resources = placed_resources(task_resources(opts), strategy)
            key = (self._function_id, tuple(sorted(resources.items())),
                   strategy.SerializeToString(deterministic=True))
            shape = (resources, strategy, key, parent)
            if inherited is None:
                holder._shape = shape
        resources, strategy, key, _parent = shape
        num_returns = opts.get("num_returns")
        mode = generator_mode(num_returns, self._function)
        num_returns = 1 if num_returns is None or mode else num_returns
        name = opts.get("name") or self._name
        blob, slots, held = prepare_args(cw, self._function, name, args, kwargs)
        task = new_task(name, blob, slots, held, num_returns, default_max_retries(opts),
                        opts.get("retry_exceptions"))
        task.function_id = self._function_id
        task.function_blob = self._blob
        task.key = key
        task.resources = resources
        task.strategy = strategy
        if self._max_calls:
            task.max_calls = self._max_calls
        if mode:
            refs = submit_generator(cw, task, mode,
                                    opts.get("_generator_backpressure_num_objects"))
        else:
            refs = return_refs(cw, task)
        cw.submit(task)
        return refs


class _BoundOptions:
    """``f.options(...)``: the same function with other options."""

    def __init__(self, fn: RemoteFunction, opts: Dict[str, Any]) -> None:
        self._fn = fn
        self._opts = opts
        self._shape: Optional[tuple] = None

    def remote(self, *args, **kwargs):
        return self._fn._remote(args, kwargs, self._opts, self)

    def __call__(self, *args, **kwargs):
        self._fn(*args, **kwargs)
