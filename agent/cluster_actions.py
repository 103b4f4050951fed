"""What raytop can do to the cluster from any node's agent: kill an actor, cancel a task,
drain a node, restart a component, stop a job. Each action is done by the agent where its
subject lives (others forward it over the peer agent's TCP API with the cluster token) and
is recorded in the GCS's cluster event log with who asked, so a raytop user sees who did
what."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Tuple

import grpc

from agent.cluster import GCS_TIMEOUT_S, PEER_TIMEOUT_S, ClusterViews
from agent.errors import AgentError
from agent.views import short_rpc_reason
from runtime.protocol import (agent_pb2, common_pb2, core_worker_pb2, core_worker_pb2_grpc,
                              gcs_pb2, raylet_pb2_grpc)

if TYPE_CHECKING:
    from agent.core import NodeAgent

log = logging.getLogger("agent.cluster")

ACTIONS = {"kill_actor": "actors", "cancel_task": "tasks", "drain_node": "nodes",
           "restart_process": "procs", "stop_job": "jobs"}
#: The components an agent supervises, which restart_process may restart.
RESTARTABLE = ("gcs", "object_store", "raylet")


class ClusterActions:
    """The Act call of the agent API; it finds nodes and peers through `views`."""

    def __init__(self, agent: "NodeAgent", views: ClusterViews) -> None:
        self.agent = agent
        self.views = views

    async def act(self, req: agent_pb2.ActionRequest, who: str) -> agent_pb2.ActionReply:
        if req.action not in ACTIONS:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"no action {req.action!r}; actions: {', '.join(ACTIONS)}")
        if not req.keys:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{req.action}: no rows given (keys is empty)")
        reply = agent_pb2.ActionReply()
        if req.action == "restart_process" and req.node:
            n = await self.views.node_or_error(req.node)
            if not self.views.is_local(n.node_id):
                return await self._forward_act(req, n)
        for key in req.keys:
            try:
                ok, message = await getattr(self, f"_act_{req.action}")(req, key, who)
            except AgentError as exc:
                ok, message = False, exc.message
            except grpc.RpcError as exc:
                ok, message = False, f"failed: {short_rpc_reason(exc)}"
            reply.results.add(key=key, ok=ok, message=message)
            log.info("action %s on %s by %s: %s (%s)", req.action, key, who,
                     "done" if ok else "refused", message)
            await self._record_action(req.action, key, ok, message, who)
        return reply

    async def _forward_act(self, req: agent_pb2.ActionRequest, n: gcs_pb2.NodeInfo
                           ) -> agent_pb2.ActionReply:
        fwd = agent_pb2.ActionRequest()
        fwd.CopyFrom(req)
        fwd.node = ""
        try:
            return await (await self.views.peer(n)).Act(fwd, timeout=120)
        except grpc.RpcError as exc:
            why = (f"the agent of node {n.node_id.hex()[:8]} ({n.node_ip}) did not do it: "
                   f"{short_rpc_reason(exc)}")
            return agent_pb2.ActionReply(results=[agent_pb2.ActionResult(key=k, ok=False,
                                                                         message=why)
                                                  for k in req.keys])

    async def _record_action(self, action: str, key: str, ok: bool, message: str,
                             who: str) -> None:
        a = self.agent
        if not a.gcs_address or not a.token:
            return
        ev = gcs_pb2.ClusterEvent(time=time.time(), kind="action", subject=key[:16],
                                  state=action if ok else f"{action} refused",
                                  message=f"{message} (by {who})", severity="INFO",
                                  node_ip=a.node_ip, source="agent", count=1)
        try:
            await self.views._gcs().AddClusterEvents(gcs_pb2.ClusterEventBatch(events=[ev]),
                                               timeout=GCS_TIMEOUT_S)
        except (grpc.RpcError, AgentError):
            pass

    async def _act_kill_actor(self, req, key: str, who: str) -> Tuple[bool, str]:
        gcs = self.views._gcs()
        try:
            actor_id = bytes.fromhex(key)
        except ValueError:
            return False, f"{key!r} is not an actor id"
        r = await gcs.GetActor(gcs_pb2.GetActorRequest(actor_id=actor_id), timeout=GCS_TIMEOUT_S)
        if not r.found:
            return False, f"no actor {key}"
        label = f"actor {key[:8]} ({r.actor.class_name})"
        if r.actor.state == "DEAD":
            return False, f"{label} is already dead: {r.actor.death_cause}"
        await gcs.KillActor(gcs_pb2.KillActorRequest(
            actor_id=actor_id, no_restart=True, reason=f"it was killed from raytop ({who})"),
            timeout=GCS_TIMEOUT_S)
        return True, f"{label} killed"

    async def _act_cancel_task(self, req, key: str, who: str) -> Tuple[bool, str]:
        gcs = self.views._gcs()
        r = await gcs.ListTasks(gcs_pb2.ListTasksRequest(filter=f"task_id=={key}", limit=1),
                                timeout=GCS_TIMEOUT_S)
        if not r.tasks:
            return False, f"no task {key} in the GCS's task window"
        t = r.tasks[0]
        from runtime.core_worker.task_events import TASK_STATES

        state = TASK_STATES[t.states[-1]] if t.states else "NIL"
        label = f"task {key[:8]} ({t.static.name})"
        if state in ("FINISHED", "FAILED"):
            return False, f"{label} already {state}"
        if state not in ("SUBMITTED_TO_WORKER", "RUNNING"):
            return False, (f"{label} is {state}: it has no worker yet, and only its owner can "
                           f"cancel it before it runs (ray.cancel in the driver)")
        nodes = [n for n in (await gcs.GetAllNodes(common_pb2.Empty(),
                                                   timeout=GCS_TIMEOUT_S)).nodes if n.alive]
        if t.outcome.node_id:  # where it runs is known: ask that worker only
            nodes = [n for n in nodes if n.node_id == t.outcome.node_id]
            if not nodes:
                return False, f"{label}: its node is gone"
        # Owners report where a running task runs at their next flush (about a second), so
        # a task that has just started is found by asking the leased workers (an
        # operator's action, not a hot path).
        a = self.agent

        async def leased(n):
            try:
                stats = await raylet_pb2_grpc.RayletStub(
                    a._channel(f"{n.node_ip}:{n.raylet_port}", a.token)).GetNodeStats(
                    common_pb2.Empty(), timeout=PEER_TIMEOUT_S)
            except grpc.RpcError:
                return []
            return [(n, w) for w in stats.workers if w.port and not w.is_driver and w.leased
                    and (not t.outcome.worker_id or w.worker_id == t.outcome.worker_id)]

        async def cancel(n, w):
            stub = core_worker_pb2_grpc.CoreWorkerStub(a._channel(f"{n.node_ip}:{w.port}",
                                                                  a.token))
            try:
                out = await stub.CancelTask(core_worker_pb2.CancelRequest(
                    task_id=t.task_id, force=req.force), timeout=PEER_TIMEOUT_S)
            except grpc.RpcError:
                return None
            return (n, w) if out.found else None

        workers = [x for found in await asyncio.gather(*(leased(n) for n in nodes))
                   for x in found]
        hits = [h for h in await asyncio.gather(*(cancel(n, w) for n, w in workers)) if h]
        if not hits:
            return False, f"{label} is not running on any worker now (it may have just ended)"
        n, w = hits[0]
        return True, (f"{label} cancelled on worker pid {w.pid} ({n.node_ip})"
                      f"{' (worker killed)' if req.force else ''}")

    async def _act_drain_node(self, req, key: str, who: str) -> Tuple[bool, str]:
        n = await self.views.node_or_error(key)
        if not n.alive:
            return False, f"node {key[:8]} ({n.node_ip}) is already dead"
        if not self.views.is_local(n.node_id):
            fwd = agent_pb2.ActionRequest(action="drain_node", keys=[n.node_id.hex()],
                                          drain_timeout_s=req.drain_timeout_s)
            r = await (await self.views.peer(n)).Act(fwd, timeout=300)
            res = r.results[0]
            return res.ok, res.message
        out = await self.agent.stop_node(req.drain_timeout_s, exit_agent=False)
        return True, (f"node {key[:8]} ({n.node_ip}) drained and stopped: {out.message}; "
                      f"`agentctl start` on {n.node_ip} starts it again")

    async def _act_restart_process(self, req, key: str, who: str) -> Tuple[bool, str]:
        node = self.agent.node
        if node is None:
            return False, "this agent runs no node"
        if key not in RESTARTABLE:
            return False, (f"{key!r} is not a component the agent supervises (it restarts "
                           f"{', '.join(RESTARTABLE)}; workers are the raylet's)")
        proc = node.supervisor.get(key)
        if proc is None:
            return False, f"no {key} on this node"
        snap = proc.snapshot()
        if snap["pid"]:
            try:
                os.kill(snap["pid"], signal.SIGTERM)  # the supervisor restarts it, as after a crash
            except ProcessLookupError:
                pass
            return True, (f"{key} (pid {snap['pid']}) on {self.agent.node_ip} sent SIGTERM; "
                          f"the agent restarts it")
        await asyncio.to_thread(proc.start)
        return True, f"{key} on {self.agent.node_ip} started again (it was {snap['state']})"

    async def _act_stop_job(self, req, key: str, who: str) -> Tuple[bool, str]:
        gcs = self.views._gcs()
        submitted = (await gcs.ListSubmittedJobs(common_pb2.Empty(),
                                                 timeout=GCS_TIMEOUT_S)).jobs
        if any(j.submission_id == key for j in submitted):
            return await self._stop_submitted_job(gcs, key)
        jobs = (await gcs.GetAllJobs(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)).jobs
        job = next((j for j in jobs if j.job_id.hex() == key), None)
        if job is None:
            return False, f"no job {key}"
        if job.is_dead:
            return False, f"job {key} has already finished"
        nodes = (await gcs.GetAllNodes(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)).nodes
        node = next((n for n in nodes if n.alive and n.node_ip == job.driver_ip), None)
        if node is None:
            return False, (f"job {key}: no alive node at its driver's address {job.driver_ip}; "
                           f"stop the driver (pid {job.driver_pid}) where it runs")
        if not self.views.is_local(node.node_id):
            r = await (await self.views.peer(node)).Act(
                agent_pb2.ActionRequest(action="stop_job", keys=[key]), timeout=60)
            return r.results[0].ok, r.results[0].message
        stats = await raylet_pb2_grpc.RayletStub(
            self.agent._channel(self.agent.node.raylet_address, self.agent.token)).GetNodeStats(
            common_pb2.Empty(), timeout=PEER_TIMEOUT_S)
        driver = next((w for w in stats.workers if w.is_driver and w.pid == job.driver_pid
                       and w.job_id == job.job_id), None)
        if driver is None:
            return False, (f"job {key}: its driver pid {job.driver_pid} is not connected to this "
                           f"node's raylet (it may have exited)")
        try:
            os.kill(job.driver_pid, signal.SIGTERM)
        except ProcessLookupError:
            return False, f"job {key}: driver pid {job.driver_pid} is gone"
        except PermissionError:
            return False, (f"job {key}: driver pid {job.driver_pid} belongs to another user; "
                           f"the agent may not signal it")
        return True, f"job {key}: sent SIGTERM to its driver (pid {job.driver_pid})"

    async def _stop_submitted_job(self, gcs, submission_id: str) -> Tuple[bool, str]:
        """Stop a job of the jobs API through that API (its head supervises the job's
        process group: SIGTERM, then SIGKILL)."""
        from agent.jobs.manager import KV_KEY, KV_NAMESPACE

        reply = await gcs.KvGet(gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=KV_KEY),
                                timeout=GCS_TIMEOUT_S)
        if not reply.found:
            return False, f"job {submission_id}: the head serves no jobs API to stop it through"
        address = reply.value.decode()
        try:
            status, body = await _post_stop(address, self.agent.token, submission_id)
        except Exception as exc:  # aiohttp's errors: the API is unreachable
            return False, f"job {submission_id}: the jobs API at {address} did not answer: {exc}"
        if status != 200:
            return False, f"job {submission_id}: the jobs API answered {status}: {body[:200]}"
        try:
            stopped = bool(json.loads(body).get("stopped"))
        except (ValueError, AttributeError):
            stopped = False
        return True, (f"job {submission_id}: stopping (SIGTERM, then SIGKILL to its process "
                      f"group)" if stopped else f"job {submission_id} had already ended")


async def _post_stop(address: str, token: str, submission_id: str) -> Tuple[int, str]:
    import aiohttp

    url = f"{address.rstrip('/')}/api/jobs/{submission_id}/stop"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.text()


__all__ = ["ClusterActions", "ACTIONS", "RESTARTABLE"]
