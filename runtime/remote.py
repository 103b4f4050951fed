"""The ``@remote`` decorator, bare or with options."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from runtime.options import validate_method_options


def _make(target: Any, options: dict):
    if inspect.isclass(target):
        try:
            from runtime.actor import ActorClass
        except ImportError:
            raise TypeError("remote classes (actors) are not available yet") from None
        return ActorClass(target, options)
    if callable(target):
        from runtime.remote_function import RemoteFunction

        return RemoteFunction(target, options)
    raise TypeError("The @remote decorator must be applied to either a function or a class, "
                    f"got {type(target).__name__}.")


def remote(*args, **kwargs) -> Any:
    """``@remote`` / ``@remote(num_cpus=2, ...)``: make a function a task (a class an actor)."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return _make(args[0], {})
    if args:
        raise TypeError("The @remote decorator takes keyword options only, e.g. "
                        "@remote(num_cpus=2)")

    def decorator(target):
        return _make(target, kwargs)

    return decorator


def method(*args, **kwargs) -> Callable:
    """``@method(num_returns=2)`` on an actor method (options are kept on the function;
    the actor's worker reads its concurrency_group from there too)."""
    options = validate_method_options(kwargs, "@method")

    def decorator(fn):
        fn.__runtime_method_options__ = options
        return fn
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorator(args[0])
    if args:
        raise TypeError("The @method decorator takes keyword options only, e.g. "
                        "@method(num_returns=2)")
    return decorator
