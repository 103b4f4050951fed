"""Ray's ``ray._private``: the few internals that users' scripts call by that name.

Only ``internal_api.free`` lives here; the module is imported so that
``runtime._private.internal_api`` is reachable as an attribute, as in Ray.
"""
from runtime._private import internal_api

__all__ = ["internal_api"]
