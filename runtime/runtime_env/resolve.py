"""Where a task or actor is submitted: its runtime_env over its parent's, ready to travel.

The parent is the job's environment in a driver, the worker's own in a worker (as in Ray).
Local paths of the child (working_dir, py_modules) are packed and stored in the GCS's KV
first, so the result names only packages and any node can set it up from it alone.
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional, Set

from runtime.protocol import gcs_pb2
from runtime.runtime_env.context import ResolvedEnv, make_resolved
from runtime.runtime_env.packaging import PACKAGE_NS, package_key, package_local
from runtime.runtime_env.runtime_env import env_hash, merge, parse

__all__ = ["GcsPackageStore", "store_for", "resolve"]


class GcsPackageStore:
    """Packages stored in one cluster's GCS KV by this process (so each is sent once)."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner  # the core worker: its gcs_call names the GCS on failure
        self._stored: Set[str] = set()

    def has(self, uri: str) -> bool:
        return uri in self._stored

    def put(self, uri: str, data: bytes) -> None:
        self._owner.gcs_call("KvPut", gcs_pb2.KvRequest(ns=PACKAGE_NS, key=package_key(uri),
                                                        value=data, overwrite=False),
                             timeout=120, doing=f"uploading the runtime_env package {uri}")
        self._stored.add(uri)


_stores: "weakref.WeakKeyDictionary[Any, GcsPackageStore]" = weakref.WeakKeyDictionary()


def store_for(owner: Any) -> GcsPackageStore:
    """The package store of a core worker (a new connection is a new cluster's KV)."""
    store = _stores.get(owner)
    if store is None:
        store = _stores[owner] = GcsPackageStore(owner)
    return store


def resolve(runtime_env: Optional[Mapping[str, Any]], parent: ResolvedEnv,
            store: GcsPackageStore) -> ResolvedEnv:
    """`runtime_env` (a dict or RuntimeEnv; None inherits) over `parent`, its local paths
    uploaded through `store`. ``excludes`` is spent on the packing and does not travel."""
    env = parse(runtime_env)
    if not env:
        return parent
    local = env.to_dict()
    excludes = local.pop("excludes", None) or []

    def need(uri: str) -> bool:
        return not store.has(uri)

    def upload(field: str, value: str) -> str:
        package = package_local(field, value, excludes, need)
        if package is None:
            return value
        if package.data:
            store.put(package.uri, package.data)
        return package.uri

    if "working_dir" in local:
        local["working_dir"] = upload("working_dir", local["working_dir"])
    if "py_modules" in local:
        local["py_modules"] = [upload("py_modules", m) for m in local["py_modules"]]
    merged = merge(parent.env, local)
    return make_resolved(merged, env_hash(merged))
