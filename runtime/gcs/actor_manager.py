"""Actors in the GCS: register, place, create, watch, restart, kill (the async shell).

The GCS leases a worker for each actor from a raylet (it is a lease client
like any driver, on the raylet's Connect stream), pushes the creation task on
a PushTasks stream and keeps that stream open for the actor's life: when it
breaks, the actor's process is gone. What that means for the actor (restarted
within max_restarts, or DEAD with the reason) is decided by its lifecycle, a pure
table of states and transitions (actor_lifecycle.py); this module feeds it what
happens and carries out what it returns. Owners are watched with a WaitForExit
call that fails when the owner exits, which ends its non-detached actors.

States (Ray's): PENDING_CREATION -> ALIVE <-> RESTARTING -> DEAD.

Every actor is in the GCS's store: its spec once (at registration, before the reply),
its record (ActorInfo and lease id) at each state change, and a change is published to
GetActor long polls only once it is durable, so no caller acts on a state a restarted
GCS would not know. A restarted GCS reads them back: each ALIVE actor's raylet hands
the leases of the dead GCS over to the new one when it connects (RegisterAck.gcs_leases)
and the actor's worker is watched again, same process, same state; an actor whose lease
is gone died meanwhile and restarts within its budget; one that was being placed is
placed again. When a node dies its actors restart elsewhere (``node_died``).

The GCS holds the actors' leases, so a raylet's memory monitor tells it (WorkerKilled,
before the SIGKILL) when it kills an actor's worker; the lifecycle keeps the text as the
cause of the death that follows (``memory_killed``). Lease requests say whether an actor
may restart (``retriable``: max_restarts != 0), which the monitor kills first.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Dict, Optional, Tuple

import grpc

from runtime import ids, labels, rpc
from runtime.core_worker.raylet_client import RayletClient
from runtime.core_worker.worker_connection import WorkerConnection
from runtime.gcs import actor_lifecycle as lc
from runtime.gcs.actor_lifecycle import ActorLifecycle
from runtime.gcs.storage import StorageError
from runtime.exceptions import ActorPlacementGroupRemoved
from runtime.gcs.versioned import ChangeSignal
from runtime.protocol import (common_pb2, core_worker_pb2_grpc, gcs_pb2, raylet_pb2)
from runtime.raylet.resources import add, missing, subtract
from runtime.serialization import serialize_error
from runtime.vocabulary import (ACTOR_DEAD, STRATEGY_DEFAULT, STRATEGY_NODE_AFFINITY,
                                STRATEGY_SPREAD)

log = logging.getLogger("runtime.gcs.actors")
#: Fields of an actor record (runtime/util/state.py actor_record) a filter may name, and
#: raytop's column titles for them.
ACTOR_FIELDS = ("actor_id", "class_name", "state", "job_id", "name", "ray_namespace", "node_id",
                "node_ip", "pid", "address", "num_restarts", "max_restarts", "death_cause",
                "is_detached", "required_resources", "repr_name", "pending_reason",
                "start_time_ms", "end_time_ms")
ACTOR_ALIASES = {"id": "actor_id", "class": "class_name", "node": "node_ip",
                 "restarts": "num_restarts", "namespace": "ray_namespace",
                 "reason": "pending_reason", "job": "job_id", "death": "death_cause"}
#: The GCS store's tables: ActorSpec by actor id (written once), ActorRecord by actor id.
SPEC_TABLE = "actor_specs"
TABLE = "actors"
#: A node whose raylet could not be reached is left out of placements for this long.
UNREACHABLE_AVOID_S = 5.0
#: Pause before placing again after a raylet could not be reached.
RETRY_PLACE_S = 0.5


class _RayletLink:
    """The GCS's lease-client connection to one raylet."""

    def __init__(self, manager: "ActorManager", node: gcs_pb2.NodeInfo) -> None:
        self.node_id = node.node_id
        self.address = f"{node.node_ip}:{node.raylet_port}"
        self.pending: Dict[int, asyncio.Future] = {}
        self.warnings: Dict[int, str] = {}
        self.client = RayletClient(manager.channel(self.address), self._on_grant, self._on_lost,
                                   self._on_notice)
        self.ready: Optional[asyncio.Task] = None
        self.manager = manager

    async def connect(self) -> None:
        ack = await self.client.connect(raylet_pb2.RegisterClient(
            worker_id=self.manager.gcs_worker_id, is_driver=True, pid=os.getpid(), port=0,
            is_gcs=True))
        self.manager.on_link_up(self, ack)

    def _on_grant(self, grant: raylet_pb2.LeaseGrant) -> None:
        outcome = grant.WhichOneof("outcome")
        if outcome == "queued":
            self.manager.on_pending_reason(grant.request_id, "waiting for free resources")
            return
        if outcome == "warning":
            self.warnings[grant.request_id] = grant.warning.message
            self.manager.on_pending_reason(grant.request_id, grant.warning.message)
            return
        fut = self.pending.pop(grant.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(grant)
        elif outcome == "granted":
            self.client.return_lease(grant.granted.lease_id)

    def _on_notice(self, notice: raylet_pb2.WorkerKilled) -> None:
        self.manager.on_worker_killed(self, notice)

    def _on_lost(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        self.pending.clear()
        if self.manager.links.get(self.node_id) is self:
            del self.manager.links[self.node_id]
        self.manager.on_link_lost(self, reason)


class _Actor:
    def __init__(self, spec: gcs_pb2.ActorSpec) -> None:
        self.spec = spec
        self.info = gcs_pb2.ActorInfo(
            actor_id=spec.actor_id, state="PENDING_CREATION", class_name=spec.class_name,
            name=spec.name, namespace=spec.namespace, job_id=spec.job_id,
            max_restarts=spec.max_restarts, detached=spec.detached, owner=spec.owner,
            method_names=spec.method_names, is_async=spec.is_async,
            max_task_retries=spec.max_task_retries, start_time=time.time(),
            resources=spec.hold_resources, method_options=spec.method_options)
        self.changed = ChangeSignal()
        self.life = ActorLifecycle(spec.max_restarts)
        self.conn: Optional[WorkerConnection] = None
        self.lease: Optional[Tuple[_RayletLink, int]] = None
        self.request: Optional[Tuple[_RayletLink, int]] = None
        self.creating: Optional[asyncio.Task] = None
        self.resume: list = []   # a restarted GCS: what the restored lifecycle asked for
        self.unsaved = 0         # record writes not committed yet (see _publish)

    def record(self) -> gcs_pb2.ActorRecord:
        return gcs_pb2.ActorRecord(info=self.info,
                                   lease_id=self.lease[1] if self.lease is not None else 0)


class ActorManager:
    def __init__(self, gcs) -> None:
        self.gcs = gcs
        self.token = gcs.token
        self.gcs_worker_id = ids.random_id(ids.WORKER_ID_SIZE)
        self.actors: Dict[bytes, _Actor] = {}
        self.names: Dict[Tuple[str, str], bytes] = {}
        self.links: Dict[bytes, _RayletLink] = {}
        self.by_conn: Dict[int, _Actor] = {}
        self.by_request: Dict[int, _Actor] = {}
        self.owner_watch: Dict[bytes, asyncio.Task] = {}
        self._background: set = set()  # kills on behalf of owners and groups; closed at close()
        self._channels: Dict[str, grpc.aio.Channel] = {}
        self._request_ids = itertools.count(1)
        self._spread_next = 0  # round-robin position for SPREAD actors
        # node id -> (report seq, resources SPREAD placed there since that report)
        self._spread_charged: Dict[bytes, Tuple[int, dict]] = {}
        # node id -> when its raylet could not be reached (placements avoid it a while)
        self._unreachable: Dict[bytes, float] = {}
        # A restarted GCS: node id -> {lease id: ALIVE actor} to find on that node's raylet.
        self._reattach: Dict[bytes, Dict[int, _Actor]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = rpc.aio_channel(address, self.token)
        return ch

    # -- RPCs ----------------------------------------------------------------------------------------
    async def register(self, spec: gcs_pb2.ActorSpec) -> gcs_pb2.RegisterActorReply:
        if spec.actor_id in self.actors:  # sent again by a client that lost the first answer
            return gcs_pb2.RegisterActorReply(ok=True)
        if spec.name:
            key = (spec.namespace, spec.name)
            holder = self.actors.get(self.names.get(key, b""))
            if holder is not None and holder.info.state != ACTOR_DEAD:
                if spec.get_if_exists:
                    return gcs_pb2.RegisterActorReply(ok=False, existing=holder.info)
                return gcs_pb2.RegisterActorReply(ok=False, error=(
                    f"The name {spec.name} (namespace={spec.namespace}) is already taken by actor "
                    f"{holder.info.actor_id.hex()} (class {holder.info.class_name}, job "
                    f"{holder.info.job_id.hex()}, state {holder.info.state}). Pick another name, "
                    f"use get_if_exists=True, or kill that actor first."))
            self.names[key] = spec.actor_id
        actor = _Actor(spec)
        self.actors[spec.actor_id] = actor
        try:
            await self.gcs.writer.write([(SPEC_TABLE, spec.actor_id, spec.SerializeToString()),
                                         (TABLE, spec.actor_id, actor.record().SerializeToString())])
        except StorageError as exc:
            del self.actors[spec.actor_id]
            if spec.name and self.names.get((spec.namespace, spec.name)) == spec.actor_id:
                del self.names[(spec.namespace, spec.name)]
            return gcs_pb2.RegisterActorReply(ok=False, error=(
                f"the GCS could not store actor {spec.class_name} ({exc}); it was not created"))
        if not spec.detached and spec.owner.port:
            self._watch_owner(spec.owner)
        self._apply(actor, actor.life.registered())
        log.info("actor %s (%s%s) registered", spec.actor_id.hex()[:8], spec.class_name,
                 f", name {spec.name!r}" if spec.name else "")
        return gcs_pb2.RegisterActorReply(ok=True)

    async def get(self, req: gcs_pb2.GetActorRequest) -> gcs_pb2.GetActorReply:
        actor = self.actors.get(req.actor_id) if req.actor_id else \
            self.actors.get(self.names.get((req.namespace, req.name), b""))
        if actor is None or (req.name and actor.info.state == ACTOR_DEAD and not req.actor_id):
            return gcs_pb2.GetActorReply(found=False)
        await actor.changed.wait_newer(actor.info, req.newer_than, req.timeout_s or 30.0)
        return gcs_pb2.GetActorReply(found=True, actor=actor.info)

    async def kill(self, req: gcs_pb2.KillActorRequest, error: bytes = b"") -> None:
        actor = self.actors.get(req.actor_id)
        if actor is None:
            return
        self._apply(actor, actor.life.kill_requested(
            req.no_restart, req.reason or "it was killed by kill()", error))

    def list(self) -> gcs_pb2.ActorList:
        return gcs_pb2.ActorList(actors=[a.info for a in self.actors.values()])

    # -- the lifecycle's actions -------------------------------------------------------------------
    def _apply(self, actor: _Actor, actions) -> None:
        """Carry out what the actor's lifecycle decided, and mirror its state into the
        actor's record (ActorInfo) for GetActor, the state API and raytop."""
        life = actor.life
        info = actor.info
        spec = actor.spec
        for action in actions:
            if isinstance(action, lc.Publish):
                info.state = life.state_name
                info.num_restarts = life.num_restarts
                if life.state == lc.DEAD:
                    info.death_cause = life.death_cause
                    if life.death_error:
                        info.death_error = life.death_error
                    info.end_time = time.time()
                    log.info("actor %s (%s) is dead: %s", spec.actor_id.hex()[:8],
                             spec.class_name, life.death_cause)
                elif life.state == lc.ALIVE:
                    log.info("actor %s (%s) is alive in pid %s at %s", spec.actor_id.hex()[:8],
                             spec.class_name, info.pid,
                             actor.conn.address if actor.conn is not None else "?")
                self._publish(actor)
            elif isinstance(action, lc.Event):
                if action.state == "restarting":
                    log.warning("actor %s (%s): %s", spec.actor_id.hex()[:8], spec.class_name,
                                action.message)
                self._event(actor, action.state, action.message, action.severity)
            elif isinstance(action, lc.Place):
                actor.creating = self._spawn(self._create(actor))
            elif isinstance(action, lc.ReturnLease):
                if actor.lease is not None:
                    link, lease_id = actor.lease
                    link.client.return_lease(lease_id, kill_worker=True)
            elif isinstance(action, lc.CancelRequest):
                if actor.request is not None:
                    link, rid = actor.request
                    link.client.cancel_request(rid)
                    fut = link.pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.cancel()
            elif isinstance(action, lc.ReleaseName):
                key = (spec.namespace, spec.name)
                if spec.name and self.names.get(key) == spec.actor_id:
                    del self.names[key]
            # PushCreation is carried out by _create, which holds the grant.

    def _publish(self, actor: _Actor) -> None:
        """Write the actor's record, then wake GetActor long polls: a caller never learns
        a state that a restarted GCS would not know. Of several changes written in a row,
        the last one's commit wakes them (the record they read is that one)."""
        actor.unsaved += 1
        saved = self.gcs.persist(TABLE, actor.spec.actor_id, actor.record())
        saved.add_done_callback(lambda _f: self._saved(actor))

    @staticmethod
    def _saved(actor: _Actor) -> None:
        actor.unsaved -= 1
        if not actor.unsaved:
            actor.changed.bump(actor.info)

    def _spawn(self, coro) -> asyncio.Task:
        """Run coro in the background, kept until it ends or close() cancels it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Cancel and await every task of the manager (placements, owner watches, kills,
        raylet connects), then close the raylet links."""
        left = [t for t in self._background if not t.done()]
        left += [t for t in self.owner_watch.values() if not t.done()]
        left += [link.ready for link in self.links.values()
                 if link.ready is not None and not link.ready.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        for link in list(self.links.values()):
            await link.client.close()
        self.links.clear()

    def _event(self, actor: _Actor, state: str, message: str, severity: str = "INFO") -> None:
        """The cluster's event log (raytop's), naming where the actor ran."""
        info = actor.info
        node = self.gcs.nodes.get(info.node_id) if info.node_id else None
        label = f"{info.class_name}{' ' + repr(info.name) if info.name else ''}"
        self.gcs.events.record("actor", info.actor_id.hex(), state, f"{label}: {message}",
                               severity=severity, node_id=info.node_id,
                               node_ip=node.node_ip if node else "", pid=info.pid)

    def on_worker_killed(self, link: _RayletLink, notice: raylet_pb2.WorkerKilled) -> None:
        """The memory monitor of `link`'s node is killing the worker of one of this GCS's
        leases. Only the actor whose current worker it is takes the notice: one that
        arrives after its worker's stream broke (the death already handled) is ignored."""
        for actor in self.actors.values():
            lease = actor.lease
            if (lease is not None and lease[0] is link and lease[1] == notice.lease_id
                    and actor.conn is not None):
                log.warning("actor %s (%s): the memory monitor of node %s is killing its worker "
                            "(pid %s)", actor.spec.actor_id.hex()[:8], actor.spec.class_name,
                            link.node_id.hex()[:8], actor.info.pid)
                self._apply(actor, actor.life.memory_killed(notice.reason))
                return
        log.info("the memory monitor of node %s killed the worker of lease %s, which no live "
                 "actor holds any more", link.node_id.hex()[:8], notice.lease_id)

    def on_pending_reason(self, request_id: int, message: str) -> None:
        actor = self.by_request.get(request_id)
        if actor is not None:
            actor.info.pending_reason = message
            actor.changed.bump(actor.info)

    # -- a restarted GCS, lost raylets and dead nodes ------------------------------------------------------
    def restore(self, specs: Dict[bytes, gcs_pb2.ActorSpec],
                records: Dict[bytes, gcs_pb2.ActorRecord]) -> None:
        """Take the actors a previous GCS left in the store (before serving)."""
        for actor_id, rec in records.items():
            spec = specs.get(actor_id)
            if spec is None:
                log.error("actor %s has a record but no spec in the GCS store; dropped",
                          actor_id.hex())
                continue
            actor = _Actor(spec)
            actor.info.CopyFrom(rec.info)
            actor.info.version += 1  # long polls of the previous GCS's callers wake up
            state = common_pb2.ActorState.Value(rec.info.state)
            actor.life, actor.resume = ActorLifecycle.restored(
                state, spec.max_restarts, rec.info.num_restarts, rec.info.death_cause,
                rec.info.death_error)
            self.actors[actor_id] = actor
            if spec.name and state != lc.DEAD:
                self.names[(spec.namespace, spec.name)] = actor_id
            if state == lc.ALIVE:
                self._reattach.setdefault(rec.info.node_id, {})[rec.lease_id] = actor

    def start_recovery(self) -> None:
        """Watch the owners again, place the actors that were being placed, and find the
        workers of the alive ones through their raylets (running loop, serving)."""
        for actor in self.actors.values():
            if actor.life.state == lc.DEAD:
                continue
            if not actor.spec.detached and actor.spec.owner.port:
                self._watch_owner(actor.spec.owner)
            resume, actor.resume = actor.resume, []
            self._apply(actor, resume)
        # Every live raylet, not only those with alive actors: leases of the previous GCS
        # for actors it was still creating are returned there.
        for node in self.gcs.nodes.values():
            if node.alive:
                self._reattach.setdefault(node.node_id, {})
        for node_id in list(self._reattach):
            self._spawn(self._reattach_node(node_id))

    def node_registered(self, node_id: bytes) -> None:
        """A node this GCS did not know registered: a raylet that outlived a GCS whose
        store is gone may hold leases of actors nobody knows any more. Connecting hands
        them over, and on_link_up returns them (killing their workers)."""
        if node_id not in self._reattach:
            self._reattach[node_id] = {}
            self._spawn(self._reattach_node(node_id))

    async def _reattach_node(self, node_id: bytes) -> None:
        """Connect to the raylet of a node that had alive actors: the connection hands
        this GCS the leases (on_link_up). Until the node answers or is dead."""
        while node_id in self._reattach:
            node = self.gcs.nodes.get(node_id)
            if node is None or not node.alive:
                self.node_died(node_id, node_id.hex()[:8], node.death_reason if node else
                               "the restarted GCS does not know it")
                return
            try:
                await self._link(node)
                if not self._reattach.get(node_id, True):
                    del self._reattach[node_id]  # linked before: nothing was waiting there
                return
            except (ConnectionError, grpc.RpcError, asyncio.TimeoutError, OSError) as exc:
                log.info("raylet of node %s not reachable yet to find its actors: %s",
                         node_id.hex()[:8], exc)
                await asyncio.sleep(RETRY_PLACE_S)

    def on_link_up(self, link: _RayletLink, ack: raylet_pb2.RegisterAck) -> None:
        """This GCS connected to a raylet, which handed over the leases held there by GCS
        connections (a previous GCS's, or this one's lost link): keep those of alive
        actors, return (killing) the others."""
        self._unreachable.pop(link.node_id, None)
        held = {g.lease_id: g for g in ack.gcs_leases}
        waiting = self._reattach.pop(link.node_id, {})
        for actor in self.actors.values():  # this GCS's own leases, over a lost link
            if actor.lease is not None and actor.info.node_id == link.node_id:
                lease_id = actor.lease[1]
                if held.pop(lease_id, None) is not None:
                    actor.lease = (link, lease_id)
        for lease_id, actor in waiting.items():
            if actor.life.state != lc.ALIVE:
                continue  # killed meanwhile: its lease is returned below, with the others
            got = held.pop(lease_id, None)
            if got is None or got.worker_id != actor.info.address.worker_id:
                log.warning("actor %s (%s): its worker (pid %s) is gone from node %s after the "
                            "GCS restart", actor.spec.actor_id.hex()[:8], actor.spec.class_name,
                            actor.info.pid, link.node_id.hex()[:8])
                self._apply(actor, actor.life.worker_lost_while_down(actor.info.pid))
                continue
            actor.lease = (link, lease_id)
            self._watch_worker(actor)
            log.info("actor %s (%s) found alive in pid %s after the GCS restart",
                     actor.spec.actor_id.hex()[:8], actor.spec.class_name, actor.info.pid)
            self._apply(actor, actor.life.reattached())
            if actor.life.kill is not None:  # kill(no_restart=False) while it was unreachable
                link.client.return_lease(lease_id, kill_worker=True)
        for lease_id, g in held.items():
            log.info("returning lease %s (worker pid %s) on node %s: no actor of this GCS "
                     "holds it", lease_id, g.worker_pid, link.node_id.hex()[:8])
            link.client.return_lease(lease_id, kill_worker=True)

    def _watch_worker(self, actor: _Actor) -> None:
        """Hold a PushTasks stream to the actor's worker: when it breaks, the worker is gone."""
        addr = f"{actor.info.address.ip}:{actor.info.address.port}"
        conn = WorkerConnection(self, self.channel(addr), addr, actor.info.address.worker_id,
                                actor.spec.job_config)
        actor.conn = conn
        self.by_conn[id(conn)] = actor

    def on_link_lost(self, link: _RayletLink, reason: str) -> None:
        """The connection to a raylet broke. The raylet keeps the leases of this GCS's
        actors until a GCS connects again; reconnect while any actor holds one."""
        self._unreachable[link.node_id] = time.monotonic()
        if any(a.lease is not None and a.lease[0] is link for a in self.actors.values()):
            log.warning("lost the connection to the raylet of node %s (%s); reconnecting to "
                        "keep its actors' leases", link.node_id.hex()[:8], reason)
            self._spawn(self._relink(link.node_id))

    async def _relink(self, node_id: bytes) -> None:
        while True:
            node = self.gcs.nodes.get(node_id)
            if node is None or not node.alive:
                return  # node_died takes care of its actors
            try:
                await self._link(node)
                return
            except (ConnectionError, grpc.RpcError, asyncio.TimeoutError, OSError):
                await asyncio.sleep(RETRY_PLACE_S)

    def node_died(self, node_id: bytes, label: str, reason: str) -> None:
        """The node is dead: its actors' workers and leases are gone; each actor restarts
        elsewhere within its budget, or is dead with the node's death as the reason."""
        self._reattach.pop(node_id, None)
        self._unreachable[node_id] = time.monotonic()
        for actor in list(self.actors.values()):
            if actor.life.state == lc.DEAD or actor.info.node_id != node_id:
                continue
            if actor.lease is None and actor.conn is None and actor.life.state != lc.ALIVE:
                continue  # already being placed again (its worker's stream broke first)
            if actor.life.state == lc.ALIVE and not actor.life.leased:
                continue
            conn, actor.conn, actor.lease = actor.conn, None, None
            if conn is not None:
                self.by_conn.pop(id(conn), None)
                conn.close()
            self._apply(actor, actor.life.node_died(label, reason, actor.info.pid))
        link = self.links.pop(node_id, None)
        if link is not None:
            self._spawn(link.client.close())

    # -- placement and creation ---------------------------------------------------------------------------
    def _pick_node(self, actor: _Actor) -> Optional[gcs_pb2.NodeInfo]:
        nodes = [n for n in self.gcs.nodes.values() if n.alive and not n.draining]
        if not nodes:
            return None
        now = time.monotonic()
        reachable = [n for n in nodes
                     if now - self._unreachable.get(n.node_id, -1e9) > UNREACHABLE_AVOID_S]
        s = actor.spec.strategy
        if reachable and not (s.kind == STRATEGY_NODE_AFFINITY and s.node_id and not s.soft):
            nodes = reachable
        if s.label_selector:
            # Only nodes whose labels match; none: wait on one (its raylet says why, and
            # spills the request back here once a matching node joins).
            nodes = [n for n in nodes if labels.matches(s.label_selector, n.labels)] or nodes
        if s.kind == STRATEGY_NODE_AFFINITY and s.node_id:
            for n in nodes:
                if n.node_id == s.node_id:
                    return n
            if not s.soft:
                return None
        place = dict(actor.spec.placement_resources)
        if s.kind == STRATEGY_SPREAD:
            node = self._spread_node(nodes, place)
            if node is not None:
                return node
        owner_node = actor.spec.owner.node_id
        ranked = sorted(nodes, key=lambda n: (n.node_id != owner_node,
                                              -n.resources_available.get("CPU", 0.0)))
        for n in ranked:
            if not missing(dict(n.resources_total), place):
                return n
        return ranked[0]  # infeasible everywhere: wait there (the raylet explains why)

    def _spread_node(self, nodes, place: dict) -> Optional[gcs_pb2.NodeInfo]:
        """SPREAD actors, as Ray places them: round-robin over the nodes in node-id order,
        the next with `place` free now, else the next that has it at all (None: no node
        has it; the caller then waits on one and the raylet explains why)."""
        nodes = sorted(nodes, key=lambda n: n.node_id)
        count = len(nodes)
        for free_now in (True, False):
            for i in range(count):
                n = nodes[(self._spread_next + i) % count]
                if missing(dict(n.resources_total), place):
                    continue
                if free_now and missing(self._free(n), place):
                    continue
                self._spread_next = (self._spread_next + i + 1) % count
                self._charge(n, place)
                return n
        return None

    def _free(self, node: gcs_pb2.NodeInfo) -> dict:
        """The node's free resources as last reported, less what SPREAD placed there since."""
        free = dict(node.resources_available)
        charged = self._spread_charged.get(node.node_id)
        if charged is not None:
            if charged[0] == self.gcs.report_seq.get(node.node_id, 0):
                subtract(free, charged[1])
            else:  # a newer report counts them (or they hold nothing once created)
                del self._spread_charged[node.node_id]
        return free

    def _charge(self, node: gcs_pb2.NodeInfo, place: dict) -> None:
        seq = self.gcs.report_seq.get(node.node_id, 0)
        charged = self._spread_charged.get(node.node_id)
        if charged is None or charged[0] != seq:
            charged = self._spread_charged[node.node_id] = (seq, {})
        add(charged[1], place)

    async def _link(self, node: gcs_pb2.NodeInfo) -> _RayletLink:
        link = self.links.get(node.node_id)
        if link is None:
            link = self.links[node.node_id] = _RayletLink(self, node)
            link.ready = asyncio.ensure_future(link.connect())
        try:
            # Shielded: one caller being cancelled must not cancel the shared connect.
            await asyncio.shield(link.ready)
        except Exception:
            # A failed connect must not stay cached: the next caller dials again.
            if self.links.get(node.node_id) is link:
                del self.links[node.node_id]
                await link.client.close()
            raise
        return link

    async def _create(self, actor: _Actor) -> None:
        """Place the actor and create it: pick a node, lease a worker there, push the
        creation task. Its lifecycle decides what each outcome means."""
        spec = actor.spec
        life = actor.life
        try:
            while life.state != lc.DEAD:
                node = self._pick_node(actor)
                if node is None:
                    s = spec.strategy
                    self._apply(actor, life.unschedulable(
                        f"NodeAffinitySchedulingStrategy names node {s.node_id.hex()} which is "
                        f"not alive (soft=False)"))
                    return
                try:
                    link = await self._link(node)
                except (ConnectionError, grpc.RpcError, asyncio.TimeoutError, OSError) as exc:
                    # A raylet that does not answer is probably on a node that is dying: it
                    # is avoided for a while, and the actor placed again.
                    self._unreachable[node.node_id] = time.monotonic()
                    log.warning("raylet of node %s at %s:%s unreachable while placing actor "
                                "%s: %s", node.node_id.hex()[:8], node.node_ip, node.raylet_port,
                                spec.actor_id.hex()[:8], exc)
                    await asyncio.sleep(RETRY_PLACE_S)
                    continue
                if life.state == lc.DEAD:  # killed while the link connected
                    return
                rid = next(self._request_ids)
                fut = asyncio.get_running_loop().create_future()
                link.pending[rid] = fut
                actor.request = (link, rid)
                self.by_request[rid] = actor
                life.lease_requested()
                # The GCS has spread a SPREAD actor already: its raylet must not spread it
                # again, so it asks as DEFAULT (which stays on a node that can run it).
                # It keeps the actor's runtime_env, which travels with the strategy.
                strategy = spec.strategy
                if strategy.kind == STRATEGY_SPREAD:
                    strategy = common_pb2.SchedulingStrategy(kind=STRATEGY_DEFAULT,
                                                             runtime_env=spec.strategy.runtime_env,
                                                             label_selector=spec.strategy.label_selector)
                link.client.request_lease(raylet_pb2.LeaseRequest(
                    request_id=rid, resources=spec.placement_resources, strategy=strategy,
                    function_name=f"actor {spec.class_name}", is_actor=True, hold_differs=True,
                    hold=spec.hold_resources, job_id=spec.job_id,
                    retriable=spec.max_restarts != 0))
                try:
                    grant = await fut
                except asyncio.CancelledError:
                    life.lease_lost()
                    if life.state == lc.DEAD:  # the kill cancelled the request: done
                        return
                    raise
                except ConnectionError as exc:
                    life.lease_lost()
                    log.warning("raylet %s lost while placing actor %s: %s", link.address,
                                spec.actor_id.hex()[:8], exc)
                    continue
                finally:
                    actor.request = None
                    self.by_request.pop(rid, None)
                outcome = grant.WhichOneof("outcome")
                if outcome == "rejected":
                    life.lease_lost()
                    self._apply(actor, life.unschedulable(grant.rejected.message))
                    return
                if outcome != "granted":  # spilled back: the GCS places it again
                    life.lease_lost()
                    continue
                actions = life.lease_granted()
                if not any(isinstance(a, lc.PushCreation) for a in actions):
                    link.client.return_lease(grant.granted.lease_id, kill_worker=True)
                    return
                self._start_creation(actor, link, node, grant.granted)
                return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("creating actor %s failed", spec.actor_id.hex()[:8])
            self._apply(actor, life.internal_error())

    def _start_creation(self, actor: _Actor, link: _RayletLink, node: gcs_pb2.NodeInfo,
                        grant: raylet_pb2.Granted) -> None:
        spec = actor.spec
        addr = f"{grant.worker.ip}:{grant.worker.port}"
        conn = WorkerConnection(self, self.channel(addr), addr, grant.worker.worker_id,
                                spec.job_config)
        actor.conn = conn
        actor.lease = (link, grant.lease_id)
        self.by_conn[id(conn)] = actor
        info = actor.info
        info.address.CopyFrom(grant.worker)
        info.pid = grant.worker_pid
        info.node_id = node.node_id
        info.pending_reason = ""
        task_id = ids.new_task_id()
        conn.inflight[task_id] = actor
        conn.send(common_pb2.TaskSpec(
            task_id=task_id, job_id=spec.job_id, function_id=spec.class_id,
            function_blob=spec.class_blob, name=f"{spec.class_name}.__init__", args=spec.args,
            arg_values=spec.arg_values, return_ids=[ids.object_id_for_return(task_id, 1)],
            owner=spec.owner, actor_id=spec.actor_id, actor_creation=True,
            max_concurrency=spec.max_concurrency, gpu_ids=grant.gpu_ids,
            concurrency_groups=spec.concurrency_groups))

    # -- WorkerConnection handler ----------------------------------------------------------------------
    def on_result(self, conn: WorkerConnection, result: common_pb2.TaskResult) -> None:
        actor = self.by_conn.get(id(conn))
        conn.inflight.pop(result.task_id, None)
        if actor is None:
            return
        life = actor.life
        if result.actor_exit:
            self._apply(actor, life.exited(result.exit_reason or "it exited"))
        elif result.app_error:
            data = result.returns[0].inline_data if result.returns else b""
            self._apply(actor, life.constructor_failed(actor.spec.class_name, data))
        else:
            if life.state != lc.DEAD:
                actor.info.address.task_port = result.actor_task_port
            self._apply(actor, life.created())

    def on_connection_lost(self, conn: WorkerConnection, error: str) -> None:
        actor = self.by_conn.pop(id(conn), None)
        conn.dead = True
        if actor is None:
            return
        actor.conn = None
        actor.lease = None
        self._apply(actor, actor.life.worker_died(actor.info.pid, error))

    async def kill_in_placement_group(self, pg_id: bytes) -> None:
        """Its callers get ActorPlacementGroupRemoved, as Ray raises it."""
        reason = f"its placement group {pg_id.hex()} was removed"
        for actor in list(self.actors.values()):
            if actor.spec.strategy.placement_group_id == pg_id and actor.life.state != lc.DEAD:
                error = serialize_error(ActorPlacementGroupRemoved(
                    f"The actor {actor.spec.actor_id.hex()} ({actor.spec.class_name}) is dead: "
                    f"{reason}")).to_bytes()
                await self.kill(gcs_pb2.KillActorRequest(
                    actor_id=actor.spec.actor_id, no_restart=True, reason=reason), error)

    # -- owners -------------------------------------------------------------------------------------------
    def _watch_owner(self, owner: common_pb2.Address) -> None:
        if owner.worker_id in self.owner_watch:
            return
        self.owner_watch[owner.worker_id] = asyncio.ensure_future(self._owner_loop(owner))

    async def _owner_loop(self, owner: common_pb2.Address) -> None:
        stub = core_worker_pb2_grpc.CoreWorkerStub(self.channel(f"{owner.ip}:{owner.port}"))
        try:
            await stub.WaitForExit(common_pb2.Empty())
            why = "exited"
        except grpc.RpcError as exc:
            why = f"exited ({exc.code().name})"
        finally:
            self.owner_watch.pop(owner.worker_id, None)
        for actor in list(self.actors.values()):
            if (actor.spec.owner.worker_id == owner.worker_id and not actor.spec.detached
                    and actor.life.state != lc.DEAD):
                await self.kill(gcs_pb2.KillActorRequest(
                    actor_id=actor.spec.actor_id, no_restart=True,
                    reason=f"its owner (the process at {owner.ip}:{owner.port} that created it) "
                           f"{why}"))
