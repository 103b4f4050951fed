"""The GCS process: serves the Gcs gRPC service on the head (port 6379 by default
for a node started by the agent; any free port for a private cluster).

Its tables (nodes, jobs, submitted jobs, actors, placement groups, KV) live in memory
and in an embedded store (runtime/gcs/storage.py: SQLite by default, the file named by
--storage-path). A change a caller waits for is durable before the reply. A GCS that
starts on a store left by a predecessor of the same cluster (the node agent restarted
it) takes the tables over: nodes are alive until they miss reports, actors find their
workers again through their raylets' leases, placement groups keep their bundles.

Nodes: a node that stops reporting for NODE_DEATH_TIMEOUT_S is marked dead, with the
reason, and told so if it comes back; one whose raylet port refuses connections is dead
after NODE_REFUSED_DEATH_S. Everything on a dead node is told: its actors restart
elsewhere (within their budgets), its placement-group bundles are placed again, and
the jobs of drivers that ran there are finished.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import secrets
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

import grpc

from runtime import component, config, rpc
from runtime.gcs.actor_manager import ACTOR_ALIASES, ACTOR_FIELDS, ActorManager
from runtime.gcs.actor_manager import SPEC_TABLE as T_ACTOR_SPECS
from runtime.gcs.actor_manager import TABLE as T_ACTORS
from runtime.gcs.events import EventLog
from runtime.gcs.jobs import SubmittedJobTable
from runtime.gcs.placement_groups import TABLE as T_GROUPS
from runtime.gcs.placement_groups import PlacementGroupManager
from runtime.gcs.storage import DurableWriter, MemoryStorage, Storage, StorageError, open_storage
from runtime.gcs.task_events import TaskEventStore, _Record
from runtime.gcs.versioned import ChangeSignal
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc, raylet_pb2_grpc

log = logging.getLogger("runtime.gcs")


def _brief(res) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if "_group_" not in k) + "}"


class _Membership:
    """The version of the node membership (joins, deaths, departures, drains)."""

    version = 1


# The store's tables (runtime/gcs/storage.py); actor_manager.py and placement_groups.py
# name their own.
T_META = "meta"
T_NODES = "nodes"
T_JOBS = "jobs"
T_SUBMITTED = "submitted_jobs"
T_KV = "kv"


def kv_key(ns: str, key: bytes) -> bytes:
    raw = ns.encode()
    return struct.pack(">H", len(raw)) + raw + key


def split_kv_key(row: bytes) -> Tuple[str, bytes]:
    (n,) = struct.unpack(">H", row[:2])
    return row[2:2 + n].decode(), row[2 + n:]


def identity(token: str) -> bytes:
    """Which cluster a store belongs to (its token's digest: the token itself is not kept)."""
    return hashlib.sha256(b"runtime-gcs-store\0" + token.encode()).digest()


class Gcs(gcs_pb2_grpc.GcsServicer):
    def __init__(self, cluster_id: str, token: str = "", storage: Optional[Storage] = None
                 ) -> None:
        self.cluster_id = cluster_id
        self.token = token
        self.storage: Storage = storage or MemoryStorage()
        self.writer: Optional[DurableWriter] = None
        self.instance = secrets.token_hex(8)  # tells raylets that a new GCS process answers
        self._probing: Dict[bytes, asyncio.Task] = {}  # node id -> its liveness probe
        self.actor_manager: Optional[ActorManager] = None
        self.pg_manager: Optional[PlacementGroupManager] = None
        self.task_events = TaskEventStore(config.TASK_EVENTS_MAX_TASKS)
        self.nodes: Dict[bytes, gcs_pb2.NodeInfo] = {}
        self.pending: Dict[bytes, list] = {}
        self.report_seq: Dict[bytes, int] = {}
        self.jobs: Dict[bytes, gcs_pb2.JobInfo] = {}
        self.kv: Dict[Tuple[str, bytes], bytes] = {}
        self._next_job = 1
        self._stopping = asyncio.Event()
        self.membership = _Membership()
        self._membership_changed = ChangeSignal()
        self.events = EventLog()
        self.submitted_jobs = SubmittedJobTable(self.events)

    # -- the store ---------------------------------------------------------------------------
    def persist(self, table: str, key: bytes, value) -> asyncio.Future:
        """Write (a protobuf message, bytes, or None to delete) to the store; the future
        resolves once it is durable. A failed write is logged by the writer; the GCS keeps
        serving from memory (a later restart would not see it)."""
        if value is not None and not isinstance(value, bytes):
            value = value.SerializeToString()
        fut = self.writer.write([(table, key, value)])
        fut.add_done_callback(_retrieve)
        return fut

    def _load(self) -> None:
        """Take over the tables a predecessor of this cluster left in the store."""
        st = self.storage
        mine = identity(self.token)
        stored = st.get(T_META, b"identity")
        if stored is not None and stored != mine:
            log.warning("the GCS store (%s) belongs to another cluster (another token): "
                        "starting with empty tables and discarding it", st.description)
            st.clear()
            stored = None
        if stored is None:
            st.put(T_META, b"identity", mine)
            return
        now = time.monotonic()
        for _key, raw in st.scan(T_NODES):
            node = gcs_pb2.NodeInfo.FromString(raw)
            node.last_heartbeat = now  # every node gets a full timeout to report again
            self.nodes[node.node_id] = node
        for _key, raw in st.scan(T_JOBS):
            job = gcs_pb2.JobInfo.FromString(raw)
            self.jobs[job.job_id] = job
        nxt = st.get(T_META, b"next_job")
        self._next_job = max([int.from_bytes(nxt, "little") if nxt else 1] +
                             [int.from_bytes(j, "little") + 1 for j in self.jobs])
        for key, raw in st.scan(T_KV):
            self.kv[split_kv_key(key)] = raw
        self.submitted_jobs.restore(gcs_pb2.SubmittedJob.FromString(raw)
                                    for _key, raw in st.scan(T_SUBMITTED))
        specs = {k: gcs_pb2.ActorSpec.FromString(v) for k, v in st.scan(T_ACTOR_SPECS)}
        self.actor_manager.restore(specs, {k: gcs_pb2.ActorRecord.FromString(v)
                                           for k, v in st.scan(T_ACTORS)})
        self.pg_manager.restore({k: gcs_pb2.PlacementGroupRecord.FromString(v)
                                 for k, v in st.scan(T_GROUPS)})
        alive = sum(1 for n in self.nodes.values() if n.alive)
        log.info("took over the tables of the previous GCS from %s: %d nodes (%d alive), %d "
                 "jobs, %d actors, %d placement groups, %d KV entries", st.description,
                 len(self.nodes), alive, len(self.jobs), len(self.actor_manager.actors),
                 len(self.pg_manager.groups), len(self.kv))
        self.events.record("gcs", "gcs", "restarted",
                           f"took over {alive} alive nodes, {len(self.actor_manager.actors)} "
                           f"actors and {len(self.pg_manager.groups)} placement groups",
                           severity="WARNING")

    # -- nodes -----------------------------------------------------------------------------
    async def RegisterNode(self, request, context):
        known = self.nodes.get(request.node_id)
        if known is not None and not known.alive:
            log.warning("node %s (%s) tried to register again, but it was marked dead: %s",
                        request.node_id.hex()[:8], request.node_ip, known.death_reason)
            return gcs_pb2.RegisterNodeReply(cluster_id=self.cluster_id, node_dead=True,
                                             gcs_instance=self.instance)
        node = gcs_pb2.NodeInfo()
        node.CopyFrom(request)
        node.alive = True
        node.last_heartbeat = time.monotonic()
        if known is not None:  # a raylet telling a restarted GCS what it is
            node.draining = known.draining or request.draining
        self.nodes[node.node_id] = node
        await self.persist(T_NODES, node.node_id, node)
        self._membership_changed.bump(self.membership)
        if known is None:
            self.actor_manager.node_registered(node.node_id)
            log.info("node %s registered: %s:%s resources %s", node.node_id.hex()[:8],
                     node.node_ip, node.raylet_port, dict(node.resources_total))
            self.events.record("node", node.node_id.hex(), "joined",
                               f"{node.node_ip}{' (head)' if node.is_head else ''} with "
                               f"{_brief(node.resources_total)}", node_id=node.node_id,
                               node_ip=node.node_ip, pid=node.raylet_pid)
        else:
            log.info("node %s (%s) registered again with this GCS", node.node_id.hex()[:8],
                     node.node_ip)
        return gcs_pb2.RegisterNodeReply(cluster_id=self.cluster_id, gcs_instance=self.instance)

    async def UnregisterNode(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is not None and node.alive:
            await self._node_gone(node, request.reason or "unregistered", "left", "WARNING")
        return common_pb2.Empty()

    async def _node_gone(self, node: gcs_pb2.NodeInfo, reason: str, state: str,
                         severity: str) -> None:
        """The node is dead (or left): record why, durably, and tell whatever depended on it."""
        if not node.alive:
            return
        node.alive = False
        node.death_reason = reason
        self._membership_changed.bump(self.membership)
        self.pending.pop(node.node_id, None)
        (log.warning if state == "died" else log.info)(
            "node %s (%s) %s: %s", node.node_id.hex()[:8], node.node_ip,
            "marked dead" if state == "died" else state, reason)
        self.events.record("node", node.node_id.hex(), state, reason, severity=severity,
                           node_id=node.node_id, node_ip=node.node_ip, pid=node.raylet_pid)
        saved = self.persist(T_NODES, node.node_id, node)
        short = node.node_id.hex()[:8]
        self.actor_manager.node_died(node.node_id, f"{short} ({node.node_ip})", reason)
        self.pg_manager.node_died(node.node_id)
        if not any(n.alive and n.node_ip == node.node_ip for n in self.nodes.values()):
            for job in list(self.jobs.values()):
                if not job.is_dead and job.driver_ip == node.node_ip:
                    await self._finish_job(job, f"its driver's node {short} ({node.node_ip}) "
                                                f"died")
        await saved

    async def GetAllNodes(self, request, context):
        return gcs_pb2.NodeList(nodes=list(self.nodes.values()))

    async def WaitMembership(self, request, context):
        await self._membership_changed.wait_newer(self.membership, request.newer_than,
                                                  min(request.timeout_s, 60.0))
        return gcs_pb2.MembershipReply(version=self.membership.version)

    async def ReportResources(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is None:
            return gcs_pb2.ResourceReportReply(unknown_node=True, gcs_instance=self.instance)
        if not node.alive:
            return gcs_pb2.ResourceReportReply(node_dead=True, gcs_instance=self.instance)
        if request.seq and request.seq < self.report_seq.get(request.node_id, 0):
            return gcs_pb2.ResourceReportReply(  # overtaken by a newer report
                membership_version=self.membership.version, gcs_instance=self.instance)
        self.report_seq[request.node_id] = request.seq
        for gone in request.exited_drivers:
            job = self.jobs.get(gone.job_id)
            if job is not None and not job.is_dead and job.driver_pid == gone.pid:
                await self._finish_job(job, f"its driver (pid {gone.pid} on {node.node_ip}) "
                                            f"exited without calling shutdown()")
        if node.draining != request.draining:
            node.draining = request.draining
            self._membership_changed.bump(self.membership)
            self.events.record("node", node.node_id.hex(),
                               "draining" if node.draining else "undrained",
                               "taking no new work" if node.draining else "taking work again",
                               node_id=node.node_id, node_ip=node.node_ip)
            await self.persist(T_NODES, node.node_id, node)
        node.object_store_used = request.object_store_used
        node.object_store_spilled = request.object_store_spilled
        node.leased_workers = request.leased_workers
        node.num_workers = request.num_workers
        node.resources_available.clear()
        node.resources_available.update(request.resources_available)
        if request.resources_total:
            node.resources_total.clear()
            node.resources_total.update(request.resources_total)
        node.last_heartbeat = time.monotonic()
        self.pending[request.node_id] = list(request.pending)
        if self.pg_manager is not None:
            ev, self.pg_manager.resources_changed = self.pg_manager.resources_changed, asyncio.Event()
            ev.set()
        return gcs_pb2.ResourceReportReply(membership_version=self.membership.version,
                                           gcs_instance=self.instance)

    async def GetClusterStatus(self, request, context):
        status = gcs_pb2.ClusterStatus(nodes=list(self.nodes.values()))
        per_node: Dict[bytes, int] = {}
        if self.actor_manager is not None:
            for a in self.actor_manager.actors.values():
                if a.info.state == "ALIVE":
                    per_node[a.info.node_id] = per_node.get(a.info.node_id, 0) + 1
        for n in status.nodes:
            n.num_actors = per_node.get(n.node_id, 0)
        for node in self.nodes.values():
            if not node.alive:
                continue
            for k, v in node.resources_total.items():
                status.total[k] = status.total[k] + v
            for k, v in node.resources_available.items():
                status.available[k] = status.available[k] + v
            for demand in self.pending.get(node.node_id, ()):
                status.pending.append(demand)
        return status

    async def _health_loop(self) -> None:
        """Raylets report at least every RESOURCE_REPORT_INTERVAL_S. A node silent for
        NODE_DEATH_TIMEOUT_S is dead; one silent for NODE_REFUSED_DEATH_S is probed, and
        is dead at once if nothing listens on its raylet's port any more."""
        while not self._stopping.is_set():
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for node in list(self.nodes.values()):
                if not node.alive:
                    continue
                silent = now - node.last_heartbeat
                if silent > config.NODE_DEATH_TIMEOUT_S:
                    await self._node_gone(node, (
                        f"no resource report for {silent:.1f}s (NODE_DEATH_TIMEOUT_S="
                        f"{config.NODE_DEATH_TIMEOUT_S:g}): its raylet (pid {node.raylet_pid}) at "
                        f"{node.node_ip}:{node.raylet_port} is unreachable"), "died", "ERROR")
                elif (config.NODE_REFUSED_DEATH_S > 0 and silent > config.NODE_REFUSED_DEATH_S
                      and node.node_id not in self._probing):
                    task = asyncio.ensure_future(self._probe(node))
                    self._probing[node.node_id] = task
                    task.add_done_callback(lambda _t, n=node.node_id: self._probing.pop(n, None))

    async def _probe(self, node: gcs_pb2.NodeInfo) -> None:
        """Is anything of this node still there? A refused connection means its raylet
        process is gone (a node is its raylet: a restarted one is a new node), and a raylet
        of another node on its port means the same. Anything else (a timeout, an answer as
        itself) proves nothing: the report timeout decides."""
        where = f"{node.node_ip}:{node.raylet_port}"
        since = time.monotonic() - node.last_heartbeat
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(node.node_ip, node.raylet_port), 2.0)
        except ConnectionRefusedError:
            if node.alive:
                await self._node_gone(node, (
                    f"its raylet (pid {node.raylet_pid}) at {where} refuses connections (the "
                    f"process is gone) and sent no report for {since:.1f}s"), "died", "ERROR")
            return
        except (OSError, asyncio.TimeoutError):
            return
        writer.close()
        try:
            stats = await raylet_pb2_grpc.RayletStub(
                self.actor_manager.channel(where)).GetNodeStats(common_pb2.Empty(), timeout=2)
        except grpc.RpcError:
            return
        if stats.node_id and stats.node_id != node.node_id and node.alive:
            await self._node_gone(node, (
                f"its raylet (pid {node.raylet_pid}) is gone: node {stats.node_id.hex()[:8]} "
                f"now serves {where}"), "died", "ERROR")

    # -- jobs --------------------------------------------------------------------------------
    async def AddJob(self, request, context):
        job_id = self._next_job.to_bytes(4, "little")
        self._next_job += 1
        job = gcs_pb2.JobInfo()
        job.CopyFrom(request)
        job.job_id = job_id
        job.start_time = job.start_time or time.time()
        self.jobs[job_id] = job
        await self.writer.write([(T_META, b"next_job", self._next_job.to_bytes(4, "little")),
                                 (T_JOBS, job_id, job.SerializeToString())])
        log.info("job %s started by pid %s", job_id.hex(), job.driver_pid)
        self.events.record("job", job_id.hex(), "started",
                           f"driver pid {job.driver_pid} on {job.driver_ip}: {job.entrypoint}"[:300],
                           node_ip=job.driver_ip, pid=job.driver_pid)
        return gcs_pb2.AddJobReply(job_id=job_id)

    async def MarkJobFinished(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is not None and not job.is_dead:
            await self._finish_job(job, "")
        return common_pb2.Empty()

    async def _finish_job(self, job: gcs_pb2.JobInfo, why: str) -> None:
        """The job is over: its driver said so, or (`why`) died without saying so."""
        if job.is_dead:
            return
        job.is_dead = True
        job.end_time = time.time()
        log.info("job %s finished%s", job.job_id.hex(), f": {why}" if why else "")
        self.events.record("job", job.job_id.hex(), "finished",
                           why or f"driver pid {job.driver_pid}", node_ip=job.driver_ip,
                           pid=job.driver_pid, severity="WARNING" if why else "INFO")
        await self.persist(T_JOBS, job.job_id, job)

    async def GetAllJobs(self, request, context):
        return gcs_pb2.JobList(jobs=list(self.jobs.values()))

    # -- submitted jobs (the Jobs REST API's records: runtime/gcs/jobs.py) ----------------------
    async def PutSubmittedJob(self, request, context):
        before = set(self.submitted_jobs.jobs)
        reply = self.submitted_jobs.put(request)
        if reply.ok:
            sid = request.job.submission_id
            ops = [(T_SUBMITTED, sid.encode(), self.submitted_jobs.jobs[sid].SerializeToString())]
            ops += [(T_SUBMITTED, gone.encode(), None)  # evicted: the oldest finished ones
                    for gone in before - set(self.submitted_jobs.jobs)]
            await self.writer.write(ops)
        return reply

    async def GetSubmittedJob(self, request, context):
        return self.submitted_jobs.get(request.submission_id)

    async def ListSubmittedJobs(self, request, context):
        return self.submitted_jobs.list()

    async def DeleteSubmittedJob(self, request, context):
        reply = self.submitted_jobs.delete(request.submission_id)
        if reply.ok:
            await self.persist(T_SUBMITTED, request.submission_id.encode(), None)
        return reply

    # -- KV ------------------------------------------------------------------------------------
    async def KvPut(self, request, context):
        key = (request.ns, request.key)
        if key in self.kv and not request.overwrite:
            return gcs_pb2.KvReply(added=False)
        self.kv[key] = request.value
        await self.persist(T_KV, kv_key(*key), request.value)
        return gcs_pb2.KvReply(added=True)

    async def KvGet(self, request, context):
        value = self.kv.get((request.ns, request.key))
        return gcs_pb2.KvReply(found=value is not None, value=value or b"")

    async def KvDel(self, request, context):
        found = self.kv.pop((request.ns, request.key), None) is not None
        if found:
            await self.persist(T_KV, kv_key(request.ns, request.key), None)
        return gcs_pb2.KvReply(found=found)

    # -- actors --------------------------------------------------------------------------------
    async def RegisterActor(self, request, context):
        return await self.actor_manager.register(request)

    async def GetActor(self, request, context):
        return await self.actor_manager.get(request)

    async def KillActor(self, request, context):
        await self.actor_manager.kill(request)
        return common_pb2.Empty()

    async def ListActors(self, request, context):
        return gcs_pb2.ActorList(actors=self._actor_infos())

    def _actor_infos(self) -> List[gcs_pb2.ActorInfo]:
        """Every actor; a pending one with the reason its raylet reports for its lease
        ("waiting for a worker to start"), which is fresher than the last notice."""
        reasons = self._demand_reasons()
        out = []
        for a in self.actor_manager.actors.values():
            info = a.info
            if info.state in ("PENDING_CREATION", "RESTARTING") and reasons:
                why = (reasons.get((info.job_id, f"actor {info.class_name}"))
                       or reasons.get((b"", f"actor {info.class_name}")))
                if why and why != info.pending_reason:
                    info = gcs_pb2.ActorInfo()
                    info.CopyFrom(a.info)
                    info.pending_reason = why
            out.append(info)
        return out

    async def QueryActors(self, request, context):
        from runtime.util import query
        from runtime.util.state.records import actor_record

        infos = self._actor_infos()
        reply = gcs_pb2.ActorQueryReply(total=len(infos))
        try:
            flt = query.parse(request.filter, ACTOR_FIELDS, ACTOR_ALIASES, "actors")
        except query.FilterError as exc:
            reply.error = str(exc)
            return reply
        pairs = []
        for info in infos:
            if request.job_id and info.job_id != request.job_id:
                continue
            rec = actor_record(info)
            if not flt or flt.matches(rec):
                pairs.append((rec, info))
        reply.matched = len(pairs)
        if request.summary:
            where: Dict[bytes, Dict[str, int]] = {}
            for _, info in pairs:
                if info.state == "ALIVE":
                    classes = where.setdefault(info.node_id, {})
                    classes[info.class_name] = classes.get(info.class_name, 0) + 1
            for node_id, classes in where.items():
                node = self.nodes.get(node_id)
                reply.placement.add(node_id=node_id, node_ip=node.node_ip if node else "",
                                    classes=classes)
        if request.sort:
            key = query.sort_key(request.sort)
            present = [p for p in pairs if p[0].get(request.sort) not in (None, "")]
            present.sort(key=lambda p: key(p[0]), reverse=request.descending)
            pairs = present + [p for p in pairs if p[0].get(request.sort) in (None, "")]
        reply.actors.extend(info for _, info in
                            (pairs[:request.limit] if request.limit else pairs))
        return reply

    # -- placement groups ------------------------------------------------------------------------
    async def CreatePlacementGroup(self, request, context):
        return await self.pg_manager.create(request)

    async def GetPlacementGroup(self, request, context):
        return await self.pg_manager.get(request)

    async def RemovePlacementGroup(self, request, context):
        await self.pg_manager.remove(request)
        return common_pb2.Empty()

    async def ListPlacementGroups(self, request, context):
        return self.pg_manager.list()

    # -- task events -----------------------------------------------------------------------------
    async def AddTaskEvents(self, request, context):
        self.task_events.add(request)
        for oc in request.outcomes:
            if oc.error_type:
                rec = self.task_events.tasks.get(oc.task_id)
                name = rec.static[0] if rec is not None and rec.static else "a task"
                node = self.nodes.get(oc.node_id)
                first = oc.error_message.strip().splitlines()[-1:] if oc.error_message else []
                self.events.record("task", name, "failed",
                                   f"{oc.error_type}{': ' + first[0][:200] if first else ''}",
                                   severity="WARNING", node_id=oc.node_id,
                                   node_ip=node.node_ip if node else "", pid=oc.worker_pid)
        return common_pb2.Empty()

    async def ListTasks(self, request, context):
        node_ips = {n.node_id: n.node_ip for n in self.nodes.values()}
        return self.task_events.query(request, node_ips, self._reason_for())

    def _demand_reasons(self) -> Dict[Tuple[bytes, str], str]:
        """(job id, function name) -> why its lease requests wait, from the raylets'
        reports; (b"", name) too, for requests whose job the raylet did not know."""
        table: Dict[Tuple[bytes, str], str] = {}
        for node_id, demands in self.pending.items():
            node = self.nodes.get(node_id)
            if node is None or not node.alive:
                continue
            for d in demands:
                if d.reason:
                    text = f"{d.reason} (node {node.node_ip})"
                    table.setdefault((d.job_id, d.function_name), text)
                    table.setdefault((b"", d.function_name), text)
        return table

    def _reason_for(self):
        table = self._demand_reasons()

        def reason_for(rec: _Record) -> str:
            if rec.states[-1] == 0:  # PENDING_ARGS_AVAIL: the owner knows which object
                return rec.reason or "waiting for its argument objects to be ready"
            name = rec.static[0] if rec.static else ""
            return (table.get((rec.job_id, name)) or table.get((b"", name))
                    or "waiting for a worker lease (no raylet reports a request for it yet)")
        return reason_for

    # -- the cluster event log -----------------------------------------------------------------
    async def AddClusterEvents(self, request, context):
        self.events.add(request.events)
        return common_pb2.Empty()

    async def ListClusterEvents(self, request, context):
        return self.events.list(request.after_seq, request.limit)

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self, host: str, port: int, token: str, ready_file: str) -> None:
        self._stopping = asyncio.Event()
        self.token = token
        self.writer = DurableWriter(self.storage)
        self.actor_manager = ActorManager(self)
        self.pg_manager = PlacementGroupManager(self)
        self._load()
        server = rpc.make_server(token)
        gcs_pb2_grpc.add_GcsServicer_to_server(self, server)
        bound = rpc.bind(server, host, port)
        await server.start()
        self.actor_manager.start_recovery()
        self.pg_manager.start_recovery()
        component.announce_ready(ready_file, port=bound)
        log.info("GCS serving on %s:%s (tables in %s)", host, bound, self.storage.description)
        loop = asyncio.get_running_loop()
        component.install_stop_handler(lambda: loop.call_soon_threadsafe(self._stopping.set))
        health = asyncio.ensure_future(self._health_loop())
        await self._stopping.wait()
        health.cancel()
        probes = [health, *self._probing.values()]
        for t in probes:
            t.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await server.stop(0.5)
        await self.pg_manager.close()
        await self.actor_manager.close()
        await self.writer.close()
        self.storage.close()


def _retrieve(fut: asyncio.Future) -> None:
    """A write nobody awaits: its failure is logged by the writer, not by asyncio."""
    if not fut.cancelled():
        fut.exception()


def storage_path(session_dir: str, given: str) -> str:
    """The store --storage-path names, else RUNTIME_GCS_STORAGE under the session dir."""
    spec = given or config.GCS_STORAGE
    if spec == ":memory:" or os.path.isabs(spec) or "://" in spec:
        return spec
    return os.path.join(session_dir, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="runtime.gcs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--session-dir", required=True)
    p.add_argument("--cluster-id", default="")
    p.add_argument("--ready-file", default="")
    p.add_argument("--storage-path", default="",
                   help="the GCS's store: a SQLite file (kept across GCS restarts; the node "
                        "agent puts it in its state dir) or :memory:; default: "
                        "RUNTIME_GCS_STORAGE under the session dir")
    args = p.parse_args(argv)
    token = component.token_from_env()
    component.setup_logging("gcs", args.cluster_id or "head")
    component.die_with_parent()
    try:
        storage = open_storage(storage_path(args.session_dir, args.storage_path))
    except StorageError as exc:
        sys.exit(f"gcs: {exc}")
    asyncio.run(Gcs(args.cluster_id, token, storage).run(args.host, args.port, token,
                                                         args.ready_file))


if __name__ == "__main__":
    main()
