"""The cluster as raytop sees it, from any node's agent: views and details (its actions
are agent/cluster_actions.py).

Every view is computed where its data lives and cut to the rows asked for: the GCS
filters, sorts and summarises actors and tasks itself (QueryActors, ListTasks), this
agent does the smaller tables (nodes, jobs, placement groups, events), and another
node's agent answers for its own processes and logs (forwarded over its TCP API with
the cluster token). So raytop gets at most ``limit`` rows per refresh, whatever the
cluster's size.

The agent also keeps what the GCS does not: a short history of each node's CPU and
object-store use (raytop's sparklines), and the events of its own supervised
processes, which it adds to the GCS's cluster event log.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

import grpc
import psutil

from agent.errors import AgentError
from agent.views import (COLUMNS, KEY_FIELD, VIEWS, column_aliases, describe_fields,
                         fmt_resources, make_table, process_info, short_rpc_reason, sort_field,
                         table_rows)
from runtime.object_store.server import LIST_MAX
from runtime.protocol import (agent_pb2, agent_pb2_grpc, common_pb2, core_worker_pb2_grpc,
                              gcs_pb2, gcs_pb2_grpc, object_store_pb2, object_store_pb2_grpc,
                              raylet_pb2_grpc)
from runtime.util import query

if TYPE_CHECKING:
    from agent.core import NodeAgent

log = logging.getLogger("agent.cluster")

DEFAULT_LIMIT = 1000
MAX_LIMIT = 20_000
GCS_TIMEOUT_S = 5.0
PEER_TIMEOUT_S = 5.0
#: Per-node samples kept for the sparklines (one a second at most: five minutes).
HISTORY_SAMPLES = 300
HISTORY_MIN_INTERVAL_S = 1.0
#: Process events waiting to reach the GCS's event log (oldest dropped beyond this).
EVENT_BUFFER = 500
#: How often an agent rewrites its address in the GCS KV even when it did not change.
REPUBLISH_S = 30.0
#: How long a request for a live node waits for its agent's address to be published.
PEER_WAIT_S = 5.0
#: The GCS KV namespace where each agent publishes its TCP API address, by node id.
AGENT_KV_NS = "node_agent"
#: Fields of an objects-view record that the stores' listings fill in (not the owners').
STORE_FIELDS = frozenset({"where", "spilled", "locations"})
#: The most objects one refresh asks the stores about (the most one List may name): a
#: filter on a store field needs an answer for every candidate.
STORE_LOOKUP_MAX = LIST_MAX
#: A worker's stdout (named for the worker, as raytop and agentctl call it) and stderr.
_WORKER_LOG = re.compile(r"(worker-[0-9a-f]{8})\.(out|err)")
_FOLLOWED_PROCESS_STATES = {"exited": "WARNING", "failed": "ERROR", "running": "INFO",
                            "stopped": "INFO"}


def _res_used(n: gcs_pb2.NodeInfo, name: str) -> Tuple[float, float]:
    total = n.resources_total.get(name, 0.0)
    return (max(0.0, total - n.resources_available.get(name, 0.0)) if n.alive else 0.0), total


def node_record(n: gcs_pb2.NodeInfo, now: float) -> Dict[str, Any]:
    """One node as raytop's nodes view shows it (logical resources, as `ray status`)."""
    cpu_used, cpu_total = _res_used(n, "CPU")
    gpu_used, gpu_total = _res_used(n, "GPU")
    mem_used, mem_total = _res_used(n, "memory")
    store_total = float(n.object_store_memory)
    store_used = float(n.object_store_used) if n.alive else 0.0
    state = "DEAD" if not n.alive else ("DRAINING" if n.draining else "ALIVE")
    return {
        "node_id": n.node_id.hex(), "node_ip": n.node_ip, "hostname": n.hostname,
        "role": "head" if n.is_head else "worker", "state": state,
        "cpu": cpu_used / cpu_total if cpu_total else 0.0, "cpu_used": cpu_used,
        "cpu_total": cpu_total,
        "gpu": gpu_used / gpu_total if gpu_total else 0.0, "gpu_used": gpu_used,
        "gpu_total": gpu_total,
        "mem": mem_used / mem_total if mem_total else 0.0, "mem_used": mem_used,
        "mem_total": mem_total,
        "store": store_used / store_total if store_total else 0.0, "store_used": store_used,
        "store_total": store_total, "store_spilled": float(n.object_store_spilled),
        "running_tasks": max(0, n.leased_workers - n.num_actors) if n.alive else 0,
        "actors": n.num_actors if n.alive else 0, "workers": n.num_workers if n.alive else 0,
        "uptime_s": max(0.0, now - n.start_time) if n.alive and n.start_time else None,
        "death_reason": n.death_reason or None, "raylet_pid": n.raylet_pid or None,
        "raylet_port": n.raylet_port, "object_store_port": n.store_port,
        "resources_total": dict(n.resources_total),
        "resources_available": dict(n.resources_available) if n.alive else {},
        "labels": dict(n.labels), "session_dir": n.session_dir,
    }


def ip_order(ip: str) -> Tuple:
    """IPv4 addresses in numeric order (127.0.0.2 before 127.0.0.10)."""
    return tuple(int(p) if p.isdigit() else 0 for p in ip.split(".")), ip


def node_order(r: Dict[str, Any]) -> Tuple:
    """The nodes view's natural order: the head, then the rest by IP, the dead last."""
    return (r["state"] == "DEAD", r["role"] != "head", *ip_order(r["node_ip"]))


def node_numbers(r: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(r[k]) for k in ("cpu_used", "cpu_total", "gpu_used", "gpu_total",
                                     "mem_used", "mem_total", "store_used", "store_total")}


def fill_summary(cs: gcs_pb2.ClusterStatus, out: agent_pb2.ClusterSummary) -> None:
    """The header every view shows: node counts, cluster totals, pending demand."""
    for n in cs.nodes:
        if not n.alive:
            out.nodes_dead += 1
            continue
        out.nodes_alive += 1
        out.nodes_draining += int(n.draining)
        out.object_store_used += n.object_store_used
        out.object_store_total += n.object_store_memory
    out.total.update({k: v for k, v in cs.total.items() if "_group_" not in k})
    out.available.update({k: v for k, v in cs.available.items() if "_group_" not in k})
    for d in cs.pending:
        out.pending.add(shape=d.shape, count=d.count, infeasible=d.infeasible,
                        reason=d.reason, function_name=d.function_name)


def fill_placement(aux: agent_pb2.Table, placement) -> None:
    """The actors view's second table: alive actors per node, by class."""
    aux.title = "placement: alive actors per node"
    aux.columns.extend(["IP", "NODE", "ACTORS", "CLASSES"])
    for node_id, ip, classes in sorted(placement, key=lambda p: p[1]):
        ranked = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))
        aux.rows.add(key=node_id, cells=[ip, node_id[:8], str(sum(classes.values())),
                                         ", ".join(f"{c}×{k}" if k > 1 else c
                                                   for c, k in ranked)])
    aux.total = aux.matched = len(aux.rows)


def fill_task_summary(aux: agent_pb2.Table, summary) -> None:
    """The tasks view's second table: counts by function and state, busiest first."""
    aux.title = "summary by function and state"
    aux.columns.extend(["FUNCTION", "TYPE", "PENDING", "SUBMITTED", "RUNNING", "FINISHED",
                        "FAILED", "TOTAL"])
    rows = []
    for func, kind, c in summary:
        counts = [c.get("PENDING_ARGS_AVAIL", 0) + c.get("PENDING_NODE_ASSIGNMENT", 0),
                  c.get("SUBMITTED_TO_WORKER", 0), c.get("RUNNING", 0), c.get("FINISHED", 0),
                  c.get("FAILED", 0)]
        rows.append((sum(c.values()), func, kind, counts))
    rows.sort(key=lambda x: (-x[0], x[1]))
    for total, func, kind, counts in rows:
        aux.rows.add(key=func, cells=[func, kind, *(str(x) for x in counts), str(total)])
    aux.total = aux.matched = len(rows)


def fill_stores(aux: agent_pb2.Table, nodes: List[Dict[str, Any]]) -> None:
    """The objects view's second table: each node's object store."""
    from agent.views import fmt_bytes

    aux.title = "object stores"
    aux.columns.extend(["IP", "NODE", "USED", "CAPACITY", "SPILLED"])
    for r in sorted(nodes, key=lambda r: r["node_ip"]):
        aux.rows.add(key=r["node_id"], cells=[
            r["node_ip"], r["node_id"][:8], fmt_bytes(r["store_used"]),
            fmt_bytes(r["store_total"]), fmt_bytes(r["store_spilled"])])
    aux.total = aux.matched = len(aux.rows)


def _pg_record(g: gcs_pb2.PlacementGroupInfo, ips: Dict[bytes, str]) -> Dict[str, Any]:
    spec = g.spec
    bundles = [dict(b.resources) for b in spec.bundles]
    shapes: Dict[str, int] = {}
    for b in bundles:
        shapes[fmt_resources(b)] = shapes.get(fmt_resources(b), 0) + 1
    nodes = sorted({ips.get(n, n.hex()[:8]) for n in g.bundle_nodes if n})
    return {"placement_group_id": spec.placement_group_id.hex(), "name": spec.name,
            "state": g.state, "strategy": spec.strategy,
            "bundles_text": ", ".join(f"{s}×{c}" if c > 1 else s for s, c in shapes.items()),
            "nodes_text": ", ".join(nodes), "pending_reason": g.pending_reason or None,
            "creator_job_id": spec.creator_job_id.hex(), "is_detached": spec.detached,
            "namespace": spec.namespace, "bundles": bundles,
            "bundle_nodes": [ips.get(n, n.hex()) for n in g.bundle_nodes],
            "create_time": g.create_time or None, "scheduled_time": g.scheduled_time or None}


def _job_record(j: gcs_pb2.JobInfo, now: float) -> Dict[str, Any]:
    end = j.end_time if j.is_dead and j.end_time else now
    return {"job_id": j.job_id.hex(), "status": "SUCCEEDED" if j.is_dead else "RUNNING",
            "type": "DRIVER", "driver_pid": j.driver_pid or None, "driver_ip": j.driver_ip,
            "entrypoint": j.entrypoint, "start_time": j.start_time or None,
            "end_time": j.end_time or None, "namespace": j.namespace,
            "duration_s": end - j.start_time if j.start_time else None}


def _event_record(e: gcs_pb2.ClusterEvent) -> Dict[str, Any]:
    return {"seq": e.seq, "time": e.time, "last_time": e.last_time, "severity": e.severity,
            "kind": e.kind, "subject": e.subject, "state": e.state, "message": e.message,
            "node_ip": e.node_ip, "node_id": e.node_id.hex() or None, "pid": e.pid or None,
            "source": e.source, "count": e.count}


def _proc_record(p: agent_pb2.ProcessInfo) -> Dict[str, Any]:
    return {"component": p.component, "pid": p.pid or None, "state": p.state,
            "restarts": p.restarts, "cpu_percent": p.cpu_percent if p.cpu_percent >= 0 else None,
            "rss_bytes": p.rss_bytes or None,
            "uptime_s": p.uptime_s if p.uptime_s >= 0 else None,
            "last_exit": p.last_exit or None, "failure_reason": p.failure_reason or None,
            "supervised_by": p.supervised_by, "log_path": p.log_path,
            "start_time": p.start_time or None}


class ClusterViews:
    """raytop's API on one agent. Create it on the agent's loop."""

    def __init__(self, agent: "NodeAgent") -> None:
        self.agent = agent
        self.history: Dict[str, Deque[Tuple[float, float, float]]] = {}
        self._last_sample = 0.0
        self._procs: Dict[int, psutil.Process] = {}
        self._events: Deque[gcs_pb2.ClusterEvent] = deque(maxlen=EVENT_BUFFER)
        self._local_events: Deque[gcs_pb2.ClusterEvent] = deque(maxlen=EVENT_BUFFER)
        self._published: Optional[Tuple[str, str, str]] = None
        self._published_at = 0.0

    # ---- plumbing ----------------------------------------------------------------------------

    def _gcs(self) -> gcs_pb2_grpc.GcsStub:
        a = self.agent
        if not a.gcs_address or not a.token:
            raise AgentError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"this agent runs no node ({a.state.role}, {a.phase}): start one "
                             f"with `agentctl start --head` or `agentctl join`, or point raytop "
                             f"at an agent of the cluster")
        return gcs_pb2_grpc.GcsStub(a._channel(a.gcs_address, a.token))

    def _gcs_error(self, exc: grpc.RpcError) -> str:
        return (f"GCS at {self.agent.gcs_address} unreachable: {short_rpc_reason(exc)} "
                f"(is the head node up?)")

    def local_node_id(self) -> str:
        node = self.agent.node
        return node.node_id.hex() if node is not None else ""

    async def _resolve_node(self, text: str) -> Optional[gcs_pb2.NodeInfo]:
        """The alive node named by an id prefix or an IP (a dead one if nothing alive)."""
        nodes = (await self._gcs().GetAllNodes(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)).nodes
        text = text.strip().lower()
        hits = [n for n in nodes if n.node_ip == text or n.node_id.hex().startswith(text)]
        hits.sort(key=lambda n: (not n.alive, -n.start_time))
        return hits[0] if hits else None

    def is_local(self, node_id: bytes) -> bool:
        node = self.agent.node
        return node is not None and node.node_id == node_id

    async def peer(self, n: gcs_pb2.NodeInfo) -> agent_pb2_grpc.NodeAgentStub:
        """The agent of node n, over its TCP API (published in the GCS KV)."""
        # A node that just joined publishes its agent's address within a publish period.
        deadline = time.monotonic() + (PEER_WAIT_S if n.alive else 0.0)
        while True:
            reply = await self._gcs().KvGet(gcs_pb2.KvRequest(ns=AGENT_KV_NS,
                                                              key=n.node_id.hex().encode()),
                                            timeout=GCS_TIMEOUT_S)
            address = json.loads(reply.value).get("api_address", "") if reply.found else ""
            if address or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        if not address:
            raise AgentError(grpc.StatusCode.UNAVAILABLE,
                             f"the agent of node {n.node_id.hex()[:8]} ({n.node_ip}) publishes "
                             f"no TCP API address; ask it directly (raytop --address "
                             f"{n.node_ip}:6380) or check its [ports] agent setting")
        a = self.agent
        return agent_pb2_grpc.NodeAgentStub(a._channel(address, a.token))

    async def node_or_error(self, text: str) -> gcs_pb2.NodeInfo:
        try:
            n = await self._resolve_node(text)
        except grpc.RpcError as exc:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, self._gcs_error(exc)) from None
        if n is None:
            raise AgentError(grpc.StatusCode.NOT_FOUND,
                             f"no node {text!r} in the cluster (give a node id prefix or an IP; "
                             f"`:nodes` lists them)")
        return n

    # ---- the agent's own bookkeeping (called from NodeAgent) ---------------------------------

    def sample(self, cs: gcs_pb2.ClusterStatus) -> None:
        """Record each alive node's CPU and object-store use for the sparklines."""
        now = time.time()
        if now - self._last_sample < HISTORY_MIN_INTERVAL_S:
            return
        self._last_sample = now
        alive = set()
        for n in cs.nodes:
            if not n.alive:
                continue
            key = n.node_id.hex()
            alive.add(key)
            cpu_used, cpu_total = _res_used(n, "CPU")
            store = n.object_store_used / n.object_store_memory if n.object_store_memory else 0.0
            ring = self.history.get(key)
            if ring is None:
                ring = self.history[key] = deque(maxlen=HISTORY_SAMPLES)
            ring.append((now, cpu_used / cpu_total if cpu_total else 0.0, min(1.0, store)))
        for key in [k for k in self.history if k not in alive]:
            del self.history[key]

    def note_event(self, ev: agent_pb2.AgentEvent) -> None:
        """A supervised process changed state: keep it for the cluster's event log."""
        if ev.kind != "process" or ev.state not in _FOLLOWED_PROCESS_STATES:
            return
        a = self.agent
        node = a.node
        if ev.state == "running":
            message = f"running as pid {ev.pid}" if ev.pid else "running"
        else:
            message = ev.message or ev.state
        ce = gcs_pb2.ClusterEvent(time=ev.time or time.time(), kind="process",
                                  subject=ev.subject, state=ev.state, message=message,
                                  severity=_FOLLOWED_PROCESS_STATES[ev.state],
                                  node_id=node.node_id if node is not None else b"",
                                  node_ip=a.node_ip, pid=ev.pid, source="agent", count=1)
        self._events.append(ce)
        self._local_events.append(ce)

    async def publish(self) -> None:
        """Send buffered process events to the GCS and publish this agent's TCP API
        address there (so other agents can forward to it). Called about every 2 s."""
        a = self.agent
        if not a.gcs_address or not a.token or a.node is None:
            return
        stub = gcs_pb2_grpc.GcsStub(a._channel(a.gcs_address, a.token))
        if self._events:
            batch = gcs_pb2.ClusterEventBatch(events=list(self._events))
            try:
                await stub.AddClusterEvents(batch, timeout=GCS_TIMEOUT_S)
                self._events.clear()
            except grpc.RpcError:
                pass  # kept (bounded) for the next try
        wanted = (a.node.node_id.hex(), a.api_address, a.gcs_address)
        # Rewritten now and then too: a GCS that lost its KV learns the address again.
        stale = time.monotonic() - self._published_at > REPUBLISH_S
        if a.api_address and (wanted != self._published or stale):
            value = json.dumps({"api_address": a.api_address, "node_ip": a.node_ip,
                                "agent_pid": os.getpid()}).encode()
            try:
                await stub.KvPut(gcs_pb2.KvRequest(ns=AGENT_KV_NS, key=wanted[0].encode(),
                                                   value=value, overwrite=True),
                                 timeout=GCS_TIMEOUT_S)
                self._published, self._published_at = wanted, time.monotonic()
            except grpc.RpcError:
                pass

    async def processes(self) -> List[agent_pb2.ProcessInfo]:
        """This node's supervised components and workers, with CPU% and RSS."""
        procs = [process_info(s) for s in self.agent.process_snapshots()]
        procs += await self.agent.workers()
        seen = set()
        for p in procs:
            p.cpu_percent = -1.0
            if not p.pid:
                continue
            seen.add(p.pid)
            ps = self._procs.get(p.pid)
            try:
                if ps is None:
                    ps = self._procs[p.pid] = psutil.Process(p.pid)
                    ps.cpu_percent(None)  # the first call only starts the measurement
                else:
                    p.cpu_percent = ps.cpu_percent(None)
                p.rss_bytes = ps.memory_info().rss
            except psutil.Error:
                self._procs.pop(p.pid, None)
        for pid in [pid for pid in self._procs if pid not in seen]:
            del self._procs[pid]
        return procs

    async def known_logs(self) -> Dict[str, Tuple[str, str]]:
        """Every log this node has, by component name: (path, the directory it must
        lie in). Only these are ever read: a name from the network is looked up
        here, never joined into a path."""
        agent = self.agent
        agent_log = (os.path.join(agent.paths.log_dir, "node-agent.log"), agent.paths.log_dir)
        known = {"node-agent": agent_log, "agent": agent_log}
        node = agent.node
        if node is None:
            return known
        logs_dir = os.path.join(node.session_dir, "logs")
        try:
            names = os.listdir(logs_dir)
        except OSError:
            names = []
        for name in names:  # workers that exited keep their log: often the one wanted
            m = _WORKER_LOG.fullmatch(name)
            if m:
                key = m.group(1) if m.group(2) == "out" else name
                known[key] = (os.path.join(logs_dir, name), logs_dir)
        for w in await agent.workers():
            known[w.component] = (w.log_path, logs_dir)
        for snap in agent.process_snapshots():
            known[snap["name"]] = (snap["log_path"], logs_dir)
        return known

    # ---- views -------------------------------------------------------------------------------

    async def view(self, req: agent_pb2.ViewRequest, readonly: bool) -> agent_pb2.ViewReply:
        if req.view not in VIEWS:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"no view {req.view!r}; views: {', '.join(VIEWS)}")
        a = self.agent
        reply = agent_pb2.ViewReply(view=req.view, time=time.time(), readonly=readonly,
                                    agent_node_id=self.local_node_id(), agent_node_ip=a.node_ip)
        if req.view in ("procs", "logs") and req.node:
            n = await self.node_or_error(req.node)
            if not self.is_local(n.node_id):
                return await self._forward_view(req, n, reply)
        try:
            cs = await self._gcs().GetClusterStatus(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)
        except grpc.RpcError as exc:
            reply.error = self._gcs_error(exc)
            if req.view in ("procs", "logs", "events"):  # this node's own view still works
                await getattr(self, f"_view_{req.view}")(req, reply, None)
            return reply
        self.sample(cs)
        self._summary(cs, reply.cluster)
        if req.history:
            for key, ring in self.history.items():
                h = reply.history.add(node_id=key)
                for t, cpu, store in ring:
                    if t > req.history_since:
                        h.samples.add(time=t, cpu=cpu, store=store)
        try:
            await getattr(self, f"_view_{req.view}")(req, reply, cs)
        except grpc.RpcError as exc:
            reply.error = self._gcs_error(exc)
        except query.FilterError as exc:
            reply.filter_error = str(exc)
        return reply

    async def _forward_view(self, req: agent_pb2.ViewRequest, n: gcs_pb2.NodeInfo,
                            reply: agent_pb2.ViewReply) -> agent_pb2.ViewReply:
        fwd = agent_pb2.ViewRequest()
        fwd.CopyFrom(req)
        fwd.node = ""
        try:
            out = await (await self.peer(n)).View(fwd, timeout=PEER_TIMEOUT_S)
        except grpc.RpcError as exc:
            reply.error = (f"the agent of node {n.node_id.hex()[:8]} ({n.node_ip}) did not "
                           f"answer: {short_rpc_reason(exc)}")
            reply.node, reply.node_ip = n.node_id.hex(), n.node_ip
            return reply
        out.readonly = reply.readonly or out.readonly
        out.agent_node_id, out.agent_node_ip = reply.agent_node_id, reply.agent_node_ip
        return out

    @staticmethod
    def _summary(cs: gcs_pb2.ClusterStatus, out: agent_pb2.ClusterSummary) -> None:
        fill_summary(cs, out)

    def _table(self, view: str, records: List[Dict[str, Any]], req: agent_pb2.ViewRequest,
               out: agent_pb2.Table, numbers=None) -> None:
        """Filter, sort and cut records here (views whose data is not in the GCS's query)."""
        make_table(view, records, req.filter, req.sort, req.descending, _limit(req), out,
                   numbers)

    async def _view_nodes(self, req, reply, cs) -> None:
        now = time.time()
        records = sorted((node_record(n, now) for n in cs.nodes), key=node_order)
        self._table("nodes", records, req, reply.table, node_numbers)

    async def _view_actors(self, req, reply, cs) -> None:
        from runtime.util.state.records import actor_record

        r = await self._gcs().QueryActors(gcs_pb2.QueryRequest(
            filter=req.filter, sort=sort_field("actors", req.sort), descending=req.descending,
            limit=_limit(req), summary=True), timeout=GCS_TIMEOUT_S)
        if r.error:
            reply.filter_error = r.error
            return
        t = reply.table
        t.columns.extend(c.title for c in COLUMNS["actors"])
        t.rows.extend(table_rows("actors", [actor_record(a) for a in r.actors]))
        t.total, t.matched = r.total, r.matched
        fill_placement(reply.aux, ((p.node_id.hex(), p.node_ip, dict(p.classes))
                                   for p in r.placement))

    async def _view_tasks(self, req, reply, cs) -> None:
        from runtime.util.state.records import task_record

        r = await self._gcs().ListTasks(gcs_pb2.ListTasksRequest(
            filter=req.filter, sort=sort_field("tasks", req.sort), descending=req.descending,
            limit=_limit(req), summary=True), timeout=GCS_TIMEOUT_S)
        if r.error:
            reply.filter_error = r.error
            return
        ips = {n.node_id: n.node_ip for n in cs.nodes}
        t = reply.table
        t.columns.extend(c.title for c in COLUMNS["tasks"])
        t.rows.extend(table_rows("tasks", [task_record(x, ips) for x in r.tasks]))
        t.total, t.matched = r.total, r.matched
        fill_task_summary(reply.aux, ((s.func_or_class_name, s.type, dict(s.state_counts))
                                      for s in r.summary))

    async def _job_records(self, gcs) -> List[Dict[str, Any]]:
        """Jobs submitted through the jobs API (agent/jobs/) and drivers started by hand,
        newest first; a submitted job's driver shows as its job, not a second row (Ray's
        list_jobs does the same)."""
        from agent.jobs.records import view_record

        drivers = (await gcs.GetAllJobs(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)).jobs
        submitted = (await gcs.ListSubmittedJobs(common_pb2.Empty(),
                                                 timeout=GCS_TIMEOUT_S)).jobs
        now = time.time()
        records = [view_record(j, now) for j in submitted]
        records += [_job_record(j, now) for j in drivers if not j.submission_id]
        records.sort(key=lambda r: r.get("start_time") or 0, reverse=True)
        return records

    async def _view_jobs(self, req, reply, cs) -> None:
        self._table("jobs", await self._job_records(self._gcs()), req, reply.table)

    async def _view_pgs(self, req, reply, cs) -> None:
        groups = (await self._gcs().ListPlacementGroups(common_pb2.Empty(),
                                                        timeout=GCS_TIMEOUT_S)).groups
        ips = {n.node_id: n.node_ip for n in cs.nodes}
        records = [_pg_record(g, ips) for g in groups]
        records.reverse()
        self._table("pgs", records, req, reply.table)

    async def _view_events(self, req, reply, cs) -> None:
        if cs is not None:
            evs = (await self._gcs().ListClusterEvents(
                gcs_pb2.ClusterEventsRequest(limit=MAX_LIMIT), timeout=GCS_TIMEOUT_S)).events
        else:  # the GCS is away: at least what this node saw
            evs = list(self._local_events)
        records = [_event_record(e) for e in evs]
        records.sort(key=lambda r: r["seq"] or r["time"], reverse=True)  # newest first
        self._table("events", records, req, reply.table)

    async def _view_procs(self, req, reply, cs) -> None:
        records = [_proc_record(p) for p in await self.processes()]
        node = self.agent.node
        reply.node = node.node_id.hex() if node is not None else ""
        reply.node_ip = self.agent.node_ip
        self._table("procs", records, req, reply.table)

    async def _view_logs(self, req, reply, cs) -> None:
        records = []
        seen = set()
        for name, (path, _root) in sorted((await self.known_logs()).items()):
            if path in seen or name == "agent":  # "agent": the old name of node-agent's log
                continue
            seen.add(path)
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                size, mtime = None, None
            records.append({"component": name, "node_ip": self.agent.node_ip, "size": size,
                            "mtime": mtime, "path": path})
        node = self.agent.node
        reply.node = node.node_id.hex() if node is not None else ""
        reply.node_ip = self.agent.node_ip
        self._table("logs", records, req, reply.table)

    async def _view_objects(self, req, reply, cs) -> None:
        records, missing = await self._objects(cs)
        ids, unasked = self._store_lookups(records, req)
        missing += await self._join_stores(cs, records, ids)
        if unasked:
            missing.append(f"where {unasked} smaller objects are held (a filter or sort on "
                           f"WHERE or SPILLED looks up the largest {STORE_LOOKUP_MAX})")
        if missing:
            reply.error = f"left out: {'; '.join(missing[:3])}" + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        self._table("objects", records, req, reply.table)
        now = time.time()
        fill_stores(reply.aux, [node_record(n, now) for n in cs.nodes if n.alive])

    async def _objects(self, cs) -> Tuple[List[Dict[str, Any]], List[str]]:
        """Every owner's objects (each core worker's ListObjects), asked in parallel.

        The fields the stores know (where, spilled, locations) start as what the
        owner alone can say; _join_stores fills them in for the rows it looks up.
        """
        a = self.agent
        sem = asyncio.Semaphore(32)
        missing: List[str] = []

        async def stats(n):
            stub = raylet_pb2_grpc.RayletStub(a._channel(f"{n.node_ip}:{n.raylet_port}", a.token))
            try:
                return n, await stub.GetNodeStats(common_pb2.Empty(), timeout=PEER_TIMEOUT_S)
            except grpc.RpcError as exc:
                missing.append(f"raylet of {n.node_ip}: {short_rpc_reason(exc)}")
                return n, None

        async def owned(n, w):
            async with sem:
                stub = core_worker_pb2_grpc.CoreWorkerStub(
                    a._channel(f"{n.node_ip}:{w.port}", a.token))
                try:
                    return n, await stub.ListObjects(common_pb2.Empty(), timeout=PEER_TIMEOUT_S)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        missing.append(f"worker pid {w.pid} on {n.node_ip}: "
                                       f"{short_rpc_reason(exc)}")
                    return n, None

        nodes = await asyncio.gather(*(stats(n) for n in cs.nodes if n.alive))
        replies = await asyncio.gather(*(owned(n, w) for n, st in nodes if st is not None
                                         for w in st.workers if w.port))
        records = []
        for n, r in replies:
            if r is None:
                continue
            for o in r.objects:
                ref_type = ("LOCAL_REFERENCE" if o.local_refs else
                            "USED_BY_PENDING_TASK" if o.submitted_refs else
                            "CAPTURED_IN_OBJECT" if o.contained_refs else "BORROWED_BY_OTHERS")
                records.append({"object_id": o.object_id.hex(), "object_size": o.size,
                                "task_status": o.task_status, "reference_type": ref_type,
                                "type": "DRIVER" if r.is_driver else "WORKER", "pid": r.pid,
                                "ip": r.ip, "node_id": n.node_id.hex(),
                                "in_object_store": o.in_store,
                                "where": "object store" if o.in_store else "owner's memory",
                                "spilled": "", "locations": [], "borrowers": o.borrowers})
        records.sort(key=lambda r: -(r["object_size"] or 0))
        return records, missing

    @staticmethod
    def _store_lookups(records: List[Dict[str, Any]],
                       req: agent_pb2.ViewRequest) -> Tuple[List[bytes], int]:
        """The objects whose stores a refresh asks about, and how many in-store
        objects it leaves unasked.

        When neither the filter nor the sort reads a store field, these are exactly
        the rows shown (at most the view's limit). Otherwise each candidate needs its
        stores' answer before it can be filtered, so the largest STORE_LOOKUP_MAX
        that pass the owner-side terms are asked about; the rest are reported.
        """
        if not records:
            return [], 0
        flt = query.parse(req.filter, set(records[0]), column_aliases("objects"), "objects")
        owner_terms = [t for t in flt.terms if t.key and not STORE_FIELDS.intersection(t.keys)]
        sort = sort_field("objects", req.sort)
        needs_stores = len(owner_terms) < len(flt.terms) or sort in STORE_FIELDS
        rows, _ = query.apply(records, query.Filter(flt.text, owner_terms),
                              "" if sort in STORE_FIELDS else sort, req.descending,
                              0 if needs_stores else _limit(req))
        ids = [bytes.fromhex(r["object_id"]) for r in rows if r["in_object_store"]]
        return ids[:STORE_LOOKUP_MAX], max(0, len(ids) - STORE_LOOKUP_MAX)

    async def _join_stores(self, cs, records: List[Dict[str, Any]],
                           ids: List[bytes]) -> List[str]:
        """Ask every alive node's object store which of ids it holds (ObjectStore.List,
        in parallel) and write where each is held and whether it is spilled into its
        record. Returns the stores that did not answer."""
        if not ids:
            return []
        a = self.agent
        missing: List[str] = []
        nodes = [n for n in cs.nodes if n.alive and n.store_port]
        ip_count: Dict[str, int] = {}
        for n in nodes:
            ip_count[n.node_ip] = ip_count.get(n.node_ip, 0) + 1
        request = object_store_pb2.ListObjectsRequest(object_ids=ids, limit=len(ids))

        async def listing(n):
            stub = object_store_pb2_grpc.ObjectStoreStub(
                a._channel(f"{n.node_ip}:{n.store_port}", a.token))
            try:
                return n, await stub.List(request, timeout=PEER_TIMEOUT_S)
            except grpc.RpcError as exc:
                missing.append(f"object store of {n.node_ip}: {short_rpc_reason(exc)}")
                return n, None

        held: Dict[bytes, List[Tuple[gcs_pb2.NodeInfo, Any]]] = {}
        for n, r in await asyncio.gather(*(listing(n) for n in nodes)):
            if r is not None:
                for o in r.objects:
                    held.setdefault(o.object_id, []).append((n, o))
        by_id = {r["object_id"]: r for r in records}
        for oid in ids:
            rec = by_id.get(oid.hex())
            if rec is None:
                continue
            copies = sorted(held.get(oid, ()), key=lambda c: (ip_order(c[0].node_ip),
                                                               c[0].store_port))
            rec["locations"] = [{
                "node_ip": n.node_ip, "node_id": n.node_id.hex(),
                "store": f"{n.node_ip}:{n.store_port}", "state": o.state,
                "disk_copy": o.disk_copy, "busy": o.busy, "writers": o.writers}
                for n, o in copies]
            if not copies:
                rec["where"] = "object store (not found)" if not missing else "object store"
                continue
            labels = []
            for n, o in copies:
                label = n.node_ip if ip_count.get(n.node_ip, 0) <= 1 else \
                    f"{n.node_ip}:{n.store_port}"
                if o.state != "sealed":
                    label += " (spilled)" if o.state == "spilled" else f" ({o.state})"
                labels.append(label)
            rec["where"] = "store " + ", ".join(labels)
            rec["spilled"] = "yes" if any(o.state == "spilled" for _, o in copies) else "no"
        return missing

    # ---- details ----------------------------------------------------------------------------

    async def describe(self, req: agent_pb2.DescribeRequest) -> agent_pb2.DescribeReply:
        view, key = req.view, req.key
        if view not in VIEWS:
            raise AgentError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"no view {view!r}; views: {', '.join(VIEWS)}")
        if view in ("procs", "logs") and req.node:
            n = await self.node_or_error(req.node)
            if not self.is_local(n.node_id):
                fwd = agent_pb2.DescribeRequest(view=view, key=key)
                try:
                    return await (await self.peer(n)).Describe(fwd, timeout=PEER_TIMEOUT_S)
                except grpc.RpcError as exc:
                    raise AgentError(exc.code(), exc.details() or "") from None
        try:
            rec = await self._record(view, key)
        except grpc.RpcError as exc:
            raise AgentError(grpc.StatusCode.UNAVAILABLE, self._gcs_error(exc)) from None
        if rec is None:
            raise AgentError(grpc.StatusCode.NOT_FOUND,
                             f"no {view[:-1] if view.endswith('s') else view} {key!r} (it may "
                             f"have left the GCS's window)")
        title = f"{view[:-1] if view.endswith('s') else view} {key}"
        return agent_pb2.DescribeReply(title=title, fields=describe_fields(rec))

    async def _record(self, view: str, key: str) -> Optional[Dict[str, Any]]:
        from runtime.util.state.records import actor_record, task_record

        gcs = self._gcs()
        if view == "actors":  # QueryActors: with the raylet's fresh pending reason
            r = await gcs.QueryActors(gcs_pb2.QueryRequest(filter=f"actor_id=={key}", limit=1),
                                      timeout=GCS_TIMEOUT_S)
            if not r.actors:
                return None
            a = r.actors[0]
            rec = actor_record(a)
            rec["worker_id"] = a.address.worker_id.hex() or None
            rec["methods"] = ", ".join(a.method_names)
            rec["is_async"] = a.is_async
            rec["owner"] = f"{a.owner.ip}:{a.owner.port}"
            return rec
        if view == "tasks":
            cs = await gcs.GetClusterStatus(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)
            r = await gcs.ListTasks(gcs_pb2.ListTasksRequest(filter=f"task_id=={key}", limit=1),
                                    timeout=GCS_TIMEOUT_S)
            ips = {n.node_id: n.node_ip for n in cs.nodes}
            return task_record(r.tasks[0], ips) if r.tasks else None
        field = KEY_FIELD[view]
        if view == "nodes":
            cs = await gcs.GetClusterStatus(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)
            now = time.time()
            for n in cs.nodes:
                if n.node_id.hex() == key:
                    return node_record(n, now)
            return None
        if view == "procs":
            for p in await self.processes():
                if p.component == key:
                    rec = _proc_record(p)
                    rec["failure_reason"] = p.failure_reason or None
                    return rec
            return None
        if view == "logs":
            known = await self.known_logs()
            return {"component": key, "path": known[key][0]} if key in known else None
        cs = await gcs.GetClusterStatus(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)
        if view == "jobs":
            records = await self._job_records(gcs)
        elif view == "pgs":
            groups = (await gcs.ListPlacementGroups(common_pb2.Empty(),
                                                    timeout=GCS_TIMEOUT_S)).groups
            ips = {n.node_id: n.node_ip for n in cs.nodes}
            records = [_pg_record(g, ips) for g in groups]
        elif view == "events":
            evs = (await gcs.ListClusterEvents(gcs_pb2.ClusterEventsRequest(),
                                               timeout=GCS_TIMEOUT_S)).events
            records = [_event_record(e) for e in evs]
        else:  # objects: this one's copies, from every store
            records, _ = await self._objects(cs)
            rec = next((r for r in records if r["object_id"] == key), None)
            if rec is not None and rec["in_object_store"]:
                missing = await self._join_stores(cs, [rec], [bytes.fromhex(key)])
                if missing:
                    rec["store_errors"] = "; ".join(missing)
            return rec
        return next((r for r in records if str(r.get(field)) == key), None)

def _limit(req: agent_pb2.ViewRequest) -> int:
    return min(req.limit or DEFAULT_LIMIT, MAX_LIMIT)


__all__ = ["ClusterViews", "node_record"]
