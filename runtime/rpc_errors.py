"""gRPC failures turned into the runtime's own errors, naming the component.

A user of the API never sees a raw ``grpc.RpcError``: when the GCS, a raylet or an
object store cannot be reached, the error says which one, at which address, and
what to check.
"""
from __future__ import annotations

import grpc

from runtime.exceptions import AuthenticationError, ClusterConnectionError, RayError, RaySystemError

#: What to check, by the first word of the component's name ("raylet of node 1a2b3c4d").
_HINTS = {
    "GCS": "Is the head node running (`agentctl status`, or the driver that started a "
           "private cluster still alive) and its port reachable?",
    "raylet": "Is that node still up (`agentctl status` on it) and its port reachable from "
              "here?",
}


def component_error(component: str, address: str, exc: grpc.RpcError, doing: str = "") -> RayError:
    """The runtime error for a failed call to `component` at `address` while `doing`."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    where = f"{component} at {address}"
    while_ = f" while {doing}" if doing else ""
    hint = _HINTS.get(component.split(" ", 1)[0], f"Is the {component} running?")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"{where} refused this process's cluster token{while_}: "
                                   f"{details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return ClusterConnectionError(f"{where} is unreachable{while_} ({name}: {details}). "
                                      f"{hint}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClusterConnectionError(f"{where} did not answer in time{while_} ({details}). "
                                      f"{hint}")
    return RaySystemError(f"{where} failed{while_}: {name}: {details}")


def gcs_error(address: str, exc: grpc.RpcError, doing: str = "") -> RayError:
    return component_error("GCS", address, exc, doing)
