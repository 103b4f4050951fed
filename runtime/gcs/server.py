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
from typing import Dict, Optional, Tuple

from runtime import component, config, rpc
from runtime.gcs.actor_manager import ActorManager
from runtime.gcs.placement_groups import PlacementGroupManager
from runtime.gcs.task_events import TaskEventStore
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("runtime.gcs")


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
        self.membership_version = 1

    # -- nodes -----------------------------------------------------------------------------
    async def RegisterNode(self, request, context):
        node = gcs_pb2.NodeInfo()
        node.CopyFrom(request)
        node.alive = True
        node.last_heartbeat = time.monotonic()
        self.nodes[node.node_id] = node
        self.membership_version += 1
        log.info("node %s registered: %s:%s resources %s", node.node_id.hex()[:8], node.node_ip,
                 node.raylet_port, dict(node.resources_total))
        return gcs_pb2.RegisterNodeReply(cluster_id=self.cluster_id)

    async def UnregisterNode(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is not None and node.alive:
            node.alive = False
            node.death_reason = request.reason or "unregistered"
            self.membership_version += 1
            log.info("node %s left: %s", request.node_id.hex()[:8], node.death_reason)
        return common_pb2.Empty()

    async def GetAllNodes(self, request, context):
        return gcs_pb2.NodeList(nodes=list(self.nodes.values()))

    async def ReportResources(self, request, context):
        node = self.nodes.get(request.node_id)
        if node is None or not node.alive:
            return gcs_pb2.ResourceReportReply(node_dead=True)
        if request.seq and request.seq < self.report_seq.get(request.node_id, 0):
            return gcs_pb2.ResourceReportReply(  # overtaken by a newer report
                membership_version=self.membership_version)
        self.report_seq[request.node_id] = request.seq
        if node.draining != request.draining:
            node.draining = request.draining
            self.membership_version += 1
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
        return gcs_pb2.ResourceReportReply(membership_version=self.membership_version)

    async def GetClusterStatus(self, request, context):
        status = gcs_pb2.ClusterStatus(nodes=list(self.nodes.values()))
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
                    self.membership_version += 1
                    node.death_reason = (f"no resource report for {config.NODE_DEATH_TIMEOUT_S:g}s "
                                         f"(raylet pid {node.raylet_pid} unreachable)")
                    log.warning("node %s marked dead: %s", node.node_id.hex()[:8], node.death_reason)

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
        return gcs_pb2.AddJobReply(job_id=job_id)

    async def MarkJobFinished(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is not None and not job.is_dead:
            job.is_dead = True
            job.end_time = time.time()
            log.info("job %s finished", request.job_id.hex())
        return common_pb2.Empty()

    async def GetAllJobs(self, request, context):
        return gcs_pb2.JobList(jobs=list(self.jobs.values()))

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
        return self.actor_manager.list()

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
        return common_pb2.Empty()

    async def ListTasks(self, request, context):
        return self.task_events.list(request.limit, request.job_id)

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
