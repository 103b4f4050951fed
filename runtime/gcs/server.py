"""The GCS process: serves the Gcs gRPC service on the head (port 6379 by default
for a node started by the agent; any free port for a private cluster).

State is in memory; a node that stops reporting for NODE_DEATH_TIMEOUT_S is
marked dead and told so if it comes back.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Dict, List, Optional, Tuple

from runtime import component, config, rpc
from runtime.gcs.actor_manager import ACTOR_ALIASES, ACTOR_FIELDS, ActorManager
from runtime.gcs.events import EventLog
from runtime.gcs.jobs import SubmittedJobTable
from runtime.gcs.placement_groups import PlacementGroupManager
from runtime.gcs.task_events import TaskEventStore, _Record
from runtime.gcs.versioned import ChangeSignal
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("runtime.gcs")


def _brief(res) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if "_group_" not in k) + "}"


class _Membership:
    """The version of the node membership (joins, deaths, departures, drains)."""

    version = 1


class Gcs(gcs_pb2_grpc.GcsServicer):
    def __init__(self, cluster_id: str, token: str = "") -> None:
        self.cluster_id = cluster_id
        self.token = token
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

    # -- nodes -----------------------------------------------------------------------------
    async def RegisterNode(self, request, context):
        node = gcs_pb2.NodeInfo()
        node.CopyFrom(request)
        node.alive = True
        node.last_heartbeat = time.monotonic()
        self.nodes[node.node_id] = node
        self._membership_changed.bump(self.membership)
        log.info("node %s registered: %s:%s resources %s", node.node_id.hex()[:8], node.node_ip,
                 node.raylet_port, dict(node.resources_total))
        self.events.record("node", node.node_id.hex(), "joined",
                           f"{node.node_ip}{' (head)' if node.is_head else ''} with "
                           f"{_brief(node.resources_total)}", node_id=node.node_id,
                           node_ip=node.node_ip, pid=node.raylet_pid)
        return gcs_pb2.RegisterNodeReply(cluster_id=self.cluster_id)

    async def UnregisterNode(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is not None and node.alive:
            node.alive = False
            node.death_reason = request.reason or "unregistered"
            self._membership_changed.bump(self.membership)
            log.info("node %s left: %s", request.node_id.hex()[:8], node.death_reason)
            self.events.record("node", node.node_id.hex(), "left", node.death_reason,
                               severity="WARNING", node_id=node.node_id, node_ip=node.node_ip,
                               pid=node.raylet_pid)
        return common_pb2.Empty()

    async def GetAllNodes(self, request, context):
        return gcs_pb2.NodeList(nodes=list(self.nodes.values()))

    async def WaitMembership(self, request, context):
        await self._membership_changed.wait_newer(self.membership, request.newer_than,
                                                  min(request.timeout_s, 60.0))
        return gcs_pb2.MembershipReply(version=self.membership.version)

    async def ReportResources(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is None or not node.alive:
            return gcs_pb2.ResourceReportReply(node_dead=True)
        if request.seq and request.seq < self.report_seq.get(request.node_id, 0):
            return gcs_pb2.ResourceReportReply(  # overtaken by a newer report
                membership_version=self.membership.version)
        self.report_seq[request.node_id] = request.seq
        if node.draining != request.draining:
            node.draining = request.draining
            self._membership_changed.bump(self.membership)
            self.events.record("node", node.node_id.hex(),
                               "draining" if node.draining else "undrained",
                               "taking no new work" if node.draining else "taking work again",
                               node_id=node.node_id, node_ip=node.node_ip)
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
        return gcs_pb2.ResourceReportReply(membership_version=self.membership.version)

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
        while not self._stopping.is_set():
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for node in self.nodes.values():
                if node.alive and now - node.last_heartbeat > config.NODE_DEATH_TIMEOUT_S:
                    node.alive = False
                    self._membership_changed.bump(self.membership)
                    node.death_reason = (f"no resource report for {config.NODE_DEATH_TIMEOUT_S:g}s "
                                         f"(raylet pid {node.raylet_pid} unreachable)")
                    log.warning("node %s marked dead: %s", node.node_id.hex()[:8], node.death_reason)
                    self.events.record("node", node.node_id.hex(), "died", node.death_reason,
                                       severity="ERROR", node_id=node.node_id,
                                       node_ip=node.node_ip, pid=node.raylet_pid)

    # -- jobs --------------------------------------------------------------------------------
    async def AddJob(self, request, context):
        job_id = self._next_job.to_bytes(4, "little")
        self._next_job += 1
        job = gcs_pb2.JobInfo()
        job.CopyFrom(request)
        job.job_id = job_id
        job.start_time = job.start_time or time.time()
        self.jobs[job_id] = job
        log.info("job %s started by pid %s", job_id.hex(), job.driver_pid)
        self.events.record("job", job_id.hex(), "started",
                           f"driver pid {job.driver_pid} on {job.driver_ip}: {job.entrypoint}"[:300],
                           node_ip=job.driver_ip, pid=job.driver_pid)
        return gcs_pb2.AddJobReply(job_id=job_id)

    async def MarkJobFinished(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is not None and not job.is_dead:
            job.is_dead = True
            job.end_time = time.time()
            log.info("job %s finished", request.job_id.hex())
            self.events.record("job", request.job_id.hex(), "finished",
                               f"driver pid {job.driver_pid}", node_ip=job.driver_ip,
                               pid=job.driver_pid)
        return common_pb2.Empty()

    async def GetAllJobs(self, request, context):
        return gcs_pb2.JobList(jobs=list(self.jobs.values()))

    # -- submitted jobs (the Jobs REST API's records: runtime/gcs/jobs.py) ----------------------
    async def PutSubmittedJob(self, request, context):
        return self.submitted_jobs.put(request)

    async def GetSubmittedJob(self, request, context):
        return self.submitted_jobs.get(request.submission_id)

    async def ListSubmittedJobs(self, request, context):
        return self.submitted_jobs.list()

    async def DeleteSubmittedJob(self, request, context):
        return self.submitted_jobs.delete(request.submission_id)

    # -- KV ------------------------------------------------------------------------------------
    async def KvPut(self, request, context):
        key = (request.ns, request.key)
        if key in self.kv and not request.overwrite:
            return gcs_pb2.KvReply(added=False)
        self.kv[key] = request.value
        return gcs_pb2.KvReply(added=True)

    async def KvGet(self, request, context):
        value = self.kv.get((request.ns, request.key))
        return gcs_pb2.KvReply(found=value is not None, value=value or b"")

    async def KvDel(self, request, context):
        return gcs_pb2.KvReply(found=self.kv.pop((request.ns, request.key), None) is not None)

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
        from runtime.util.state import actor_record

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
        self.actor_manager = ActorManager(self)
        self.pg_manager = PlacementGroupManager(self)
        server = rpc.make_server(token)
        gcs_pb2_grpc.add_GcsServicer_to_server(self, server)
        bound = rpc.bind(server, host, port)
        await server.start()
        component.announce_ready(ready_file, port=bound)
        log.info("GCS serving on %s:%s", host, bound)
        loop = asyncio.get_running_loop()
        component.install_stop_handler(lambda: loop.call_soon_threadsafe(self._stopping.set))
        health = asyncio.ensure_future(self._health_loop())
        await self._stopping.wait()
        health.cancel()
        await server.stop(0.5)
        await self.actor_manager.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="runtime.gcs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--session-dir", required=True)
    p.add_argument("--cluster-id", default="")
    p.add_argument("--ready-file", default="")
    args = p.parse_args(argv)
    token = component.token_from_env()
    component.setup_logging("gcs", args.cluster_id or "head")
    component.die_with_parent()
    asyncio.run(Gcs(args.cluster_id, token).run(args.host, args.port, token, args.ready_file))


if __name__ == "__main__":
    main()
