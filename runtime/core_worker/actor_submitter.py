"""The caller's side of actors: creating them (through the GCS), their handle objects,
and calls (user thread), handed to the owner's state machine (owner_state.py).

Each (caller, actor) pair has one ordered queue and, while the actor is alive, one
connection to the actor's worker: calls go out in submission order, several per
message. When the connection breaks the caller asks the GCS what became of the actor
(restarting, or dead and why) and either resends calls that still have retries
(max_task_retries) or fails them with the reason. A connection to a sync actor's call
port that fails before the port accepted its hello ran none of its calls: they go
back to the front of the queue, retries untouched, and the caller dials again; after
owner_actors.HANDSHAKE_ATTEMPTS such failures in a row it asks the GCS whether the
actor moved or died (see submitter.py), and fails what is queued with
ActorUnavailableError if it is still alive there.

This module knows nothing of the user-facing layer (runtime/actor.py builds an
ActorCreation and turns what `create` returns into an ActorHandle).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import grpc

from runtime import ids
from runtime.core_worker.generators import submit_generator
from runtime.core_worker.memory_store import Value
from runtime.core_worker.submitter import TaskSubmitter, new_task, return_refs
from runtime.core_worker.task_args import prepare_args
from runtime.exceptions import ActorAlreadyExistsError, ActorDiedError, RayError, RayletDiedError
from runtime.object_ref import ObjectRef
from runtime.protocol import common_pb2, gcs_pb2
from runtime.serialization import NONE_BYTES

log = logging.getLogger("runtime.core_worker")
HANDLE_INDEX = b"\xff\xff\xff\xff"


def handle_object_id(actor_id: bytes) -> bytes:
    return actor_id + bytes(ids.TASK_ID_SIZE - len(actor_id)) + HANDLE_INDEX


@dataclass
class ActorCreation:
    """What `create` needs to register an actor: the class (pickled), its constructor's
    arguments, and the options already turned into resources and a strategy."""

    class_name: str
    class_blob: bytes
    class_id: bytes
    method_names: List[str]
    is_async: bool
    constructor: Any                   # for argument error messages
    args: tuple
    kwargs: dict
    place: Dict[str, float]            # resources to place it
    hold: Dict[str, float]             # resources held while it lives
    strategy: common_pb2.SchedulingStrategy
    name: str = ""
    namespace: str = ""
    detached: bool = False
    get_if_exists: bool = False
    max_restarts: int = 0
    max_concurrency: int = 1
    max_task_retries: int = 0
    concurrency_groups: Optional[Dict[str, int]] = None  # name -> max concurrency
    method_options: bytes = b""       # pickled @method options, for get_actor handles


class ActorSubmitter:
    def __init__(self, cw: Any, submitter: TaskSubmitter) -> None:
        """`cw` is the core worker (its user-thread API: posting to the loop, blocking
        on refs, GCS calls, the reference table and memory store); `submitter` carries
        calls out."""
        self.cw = cw
        self.submitter = submitter
        self.handle_objects: Dict[bytes, tuple] = {}  # handle oid -> (actor_id, detached, pinned)
        self._background: Set[asyncio.Task] = set()  # GCS calls in flight, cancelled at close

    def _cluster_gone(self) -> Optional[RayletDiedError]:
        """The error to fail actor work with once a private cluster lost its raylet."""
        err = self.cw.raylet_error
        return err if err is not None and self.cw.owns_cluster else None

    # -- creation (user thread) ------------------------------------------------------------------
    def create(self, c: ActorCreation) -> Tuple[bytes, Optional[ObjectRef],
                                                Optional[gcs_pb2.ActorInfo]]:
        """(actor id, handle ref, None) for a new actor; (b"", None, info) when
        get_if_exists found a live one under that name."""
        cw = self.cw
        gone = self._cluster_gone()
        if gone is not None:
            raise RayletDiedError(str(gone), address=gone.address, pid=gone.pid)
        actor_id = ids.random_id(ids.ACTOR_ID_SIZE)
        blob, slots, held = prepare_args(cw, c.constructor, c.class_name, c.args, c.kwargs)
        arg_values = cw.arg_locations(slots) if slots else []
        spec = gcs_pb2.ActorSpec(
            actor_id=actor_id, job_id=cw.job_id, class_name=c.class_name, class_blob=c.class_blob,
            class_id=c.class_id, args=blob, arg_values=arg_values, owner=cw.address_proto,
            name=c.name, namespace=c.namespace or cw.namespace, detached=c.detached,
            get_if_exists=c.get_if_exists, max_restarts=c.max_restarts,
            max_concurrency=c.max_concurrency, placement_resources=c.place,
            hold_resources=c.hold, strategy=c.strategy, job_config=cw.job_config,
            is_async=c.is_async, method_names=c.method_names,
            max_task_retries=c.max_task_retries, concurrency_groups=c.concurrency_groups or {},
            method_options=c.method_options)
        reply = cw.gcs_call("RegisterActor", spec, doing=f"creating actor {c.class_name}")
        if not reply.ok:
            if reply.HasField("existing"):
                return b"", None, reply.existing
            raise ActorAlreadyExistsError(reply.error)  # the GCS's only refusal: a taken name
        hoid = handle_object_id(actor_id)
        pinned = (list(slots), held)
        if held:
            cw.refs.add_submitted(held)
        handle_ref = ObjectRef(hoid, cw.address, cw)
        cw.memory.put_fresh(hoid, Value(NONE_BYTES, size=len(NONE_BYTES)))
        self.handle_objects[hoid] = (actor_id, c.detached, pinned)
        return actor_id, handle_ref, None

    def on_handle_freed(self, hoid: bytes) -> None:
        """Loop thread: no handle to the actor is left anywhere; destroy it unless detached."""
        actor_id, detached, (slots, held) = self.handle_objects.pop(hoid)
        if held:
            self.cw.refs.remove_submitted(held)
        if not detached:
            self._spawn(self._kill(actor_id, True, "all handles to the actor went out of scope"))

    def _spawn(self, coro) -> None:
        """Run coro in the background, kept (asyncio holds tasks weakly) until it ends or
        close() cancels it; dropped if the loop no longer runs (a handle freed during
        shutdown: the GCS ends the actor with its owner anyway)."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _kill(self, actor_id: bytes, no_restart: bool, reason: str) -> None:
        try:  # waits out a restarting GCS, so a kill is not lost in an outage
            await self.cw.gcs_client.call("KillActor", gcs_pb2.KillActorRequest(
                actor_id=actor_id, no_restart=no_restart, reason=reason), timeout=10,
                doing=f"killing actor {actor_id.hex()}")
        except (RayError, grpc.aio.UsageError) as exc:  # (a channel closed at shutdown)
            log.debug("KillActor failed: %s", exc)

    # -- calls (user thread) ------------------------------------------------------------------------
    def call(self, actor_id: bytes, class_name: str, method: str,
             handle_ref: Optional[ObjectRef], args: tuple, kwargs: dict, num_returns: int,
             max_task_retries: int, retry_exceptions: Any = None, concurrency_group: str = "",
             name: str = "", generator: int = 0, backpressure: Optional[int] = None):
        """Submit `class_name.method(*args, **kwargs)` to the actor; its return refs.
        `concurrency_group` and `name` are what the call's .options() say."""
        cw = self.cw
        name = name or f"{class_name}.{method}"
        blob, slots, held = prepare_args(cw, None, name, args, kwargs)
        if handle_ref is not None:
            # A call in flight keeps its actor in scope: `A.remote().f.remote()` must run f.
            held = held + [handle_ref._id]
        task = new_task(name, blob, slots, held, num_returns, max_task_retries, retry_exceptions)
        task.actor_id = actor_id
        task.method_name = method
        task.concurrency_group = concurrency_group
        if generator:
            refs = submit_generator(cw, task, generator, backpressure)
        else:
            refs = return_refs(cw, task)
        if held:
            cw.refs.add_submitted(held)
        cw.post(self.submitter.submit_call, task)
        return refs

    # -- loop thread ----------------------------------------------------------------------------------
    def mark_killed(self, actor_id: bytes, reason: str) -> None:
        """kill() returned: current, pending and future calls fail at once (the worker
        may take a moment to die, and must not run calls meanwhile)."""
        self.submitter.feed(self.submitter.state.actor_killed(actor_id, ActorDiedError(
            f"The actor {actor_id.hex()} is dead: {reason}", actor_id=actor_id.hex())))

    def on_cluster_gone(self, error: BaseException) -> None:
        """The private cluster lost its raylet, and with it every actor's worker: fail the
        calls in flight and pending, now and from now on."""
        self.submitter.feed(self.submitter.state.cluster_gone(error))

    async def close(self) -> None:
        left = list(self._background)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

