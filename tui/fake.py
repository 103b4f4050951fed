"""A made-up cluster behind raytop's data-source interface (tui.source.Source).

The snapshot tests, the screenshots in docs/raytop.md and the scale benchmark
use it: the same records, columns, filter grammar and tables as a real agent
(agent/views.py, runtime/util/query.py), from data that never changes, at any
size (``FakeSource(nodes=100, actors=10_000, tasks=100_000)``). The clock is
fixed, so durations and uptimes are the same on every run.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

from agent.cluster import (fill_placement, fill_stores, fill_task_summary, node_numbers,
                           node_record)
from agent.views import KEY_FIELD, VIEWS, describe_fields, make_table
from runtime.gcs.actor_manager import ACTOR_ALIASES
from runtime.gcs.task_events import TASK_ALIASES
from runtime.protocol import agent_pb2, common_pb2, gcs_pb2
from runtime.util import query
from runtime.util.state.records import actor_record, task_dict

from tui.source import Query, SourceError

__all__ = ["FakeSource", "FIXED_NOW"]

#: The fake cluster's "now": 2026-06-01 12:00:00 UTC.
FIXED_NOW = 1_780_315_200.0
GiB = 1024 ** 3
_CLASSES = ("Counter", "Trainer", "ParameterServer", "Replica")
_FUNCS = ("preprocess", "train_step", "evaluate", "load_shard", "needs_gpu")
#: Task state indexes (runtime/core_worker/task_events.py TASK_STATES).
_ARGS, _NODE, _SUBMITTED, _RUNNING, _FINISHED, _FAILED = range(6)


def _id(kind: str, i: int, size: int) -> bytes:
    return hashlib.sha256(f"{kind}-{i}".encode()).digest()[:size]


class _Stream:
    def __init__(self, lines: List[str], component: str, follow: bool) -> None:
        self._lines = lines
        self._component = component
        self._follow = follow
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[agent_pb2.LogLine]:
        for line in self._lines:
            yield agent_pb2.LogLine(component=self._component, line=line)
        while self._follow and not self._stop.wait(0.05):
            pass

    def cancel(self) -> None:
        self._stop.set()


class FakeSource:
    """A fixed cluster: ``nodes`` nodes (the first is the head), ``actors`` actors and
    ``tasks`` recent tasks, a few of each pending for a reason, failed or dead."""

    def __init__(self, *, nodes: int = 3, actors: int = 6, tasks: int = 40,
                 readonly: bool = False, now: float = FIXED_NOW) -> None:
        self.label = f"fake cluster ({nodes} nodes)"
        self.readonly = readonly
        self.now = now
        self.unreachable = False
        self.actions: List[agent_pb2.ActionRequest] = []
        self._nodes = [self._node(i) for i in range(nodes)]
        self._ips = {n.node_id: n.node_ip for n in self._nodes}
        self._actors = [self._actor(i) for i in range(actors)]
        self._tasks = [self._task(i) for i in range(tasks)]
        self._history = {n.node_id.hex(): self._samples(i) for i, n in enumerate(self._nodes)}
        self._cluster = self._status()

    # -- the made-up cluster --------------------------------------------------------------------
    def _node(self, i: int) -> gcs_pb2.NodeInfo:
        gpus = 1.0 if i == 2 else 0.0
        total = {"CPU": 16.0, "memory": 64.0 * GiB, "object_store_memory": 8.0 * GiB}
        if gpus:
            total["GPU"] = gpus
        used_cpu = float((i * 5 + 3) % 17)
        available = dict(total)
        available["CPU"] = max(0.0, 16.0 - used_cpu)
        available["memory"] = total["memory"] - (i % 4 + 1) * 6 * GiB
        n = gcs_pb2.NodeInfo(
            node_id=_id("node", i, 28), node_ip=f"10.0.{i // 250}.{i % 250 + 1}",
            raylet_port=6381, store_port=6382, resources_total=total,
            resources_available=available, alive=i != 4, hostname=f"host{i:03d}",
            is_head=i == 0, start_time=self.now - 3600 * (i + 1) - 60 * i,
            object_store_memory=8 * GiB, object_store_used=(i * 733 % 4096) * 1024 * 1024,
            object_store_spilled=(512 * 1024 * 1024 if i == 1 else 0),
            leased_workers=int(used_cpu), num_workers=int(used_cpu) + 2,
            draining=i == 5, raylet_pid=1000 + i)
        if not n.alive:
            n.death_reason = "no resource report for 10s (raylet pid 1004 unreachable)"
        return n

    def _actor(self, i: int) -> gcs_pb2.ActorInfo:
        cls = _CLASSES[i % len(_CLASSES)]
        alive = [n for n in self._nodes if n.alive and not n.draining]
        node = alive[(i * 7) % len(alive)]
        state, reason, death = "ALIVE", "", ""
        if i % 97 == 5:
            state, reason = "PENDING_CREATION", "needs {GPU: 2}; the largest node has GPU: 1"
        elif i % 89 == 3:
            state = "RESTARTING"
            reason = "waiting for a worker to start (1 starting, 3 running on this node)"
        elif i % 53 == 4:
            state, death = "DEAD", "its worker process (pid 4242) died (SIGKILL); no restarts left"
        info = gcs_pb2.ActorInfo(
            actor_id=_id("actor", i, 16), state=state, class_name=cls,
            name=f"{cls.lower()}-{i}" if i % 3 == 0 else "", namespace="default",
            job_id=(1 + i % 2).to_bytes(4, "little"), num_restarts=(i % 89 == 3) + (i % 11 == 0),
            max_restarts=3, death_cause=death, pending_reason=reason,
            start_time=self.now - 600 - i, pid=0 if state != "ALIVE" else 20000 + i,
            node_id=node.node_id if state == "ALIVE" else b"")
        if state == "ALIVE":
            info.address.CopyFrom(common_pb2.Address(ip=node.node_ip, port=30000 + i % 1000))
        return info

    def _task(self, i: int) -> tuple:
        func = _FUNCS[i % len(_FUNCS)]
        node = self._nodes[i % len(self._nodes)]
        t0 = self.now - 900 + i * 0.01
        states, times = [_ARGS, _NODE], [t0, t0 + 0.001]
        outcome: tuple = ()
        reason = ""
        if func == "needs_gpu" and i % 10 == 4:
            reason = "needs {CPU: 1, GPU: 1}; no alive node has GPU (node 10.0.0.1)"
        elif i % 23 == 7:
            reason = "waiting for a worker to start (2 starting, 16 running on this node) " \
                     f"(node {node.node_ip})"
        elif i % 29 == 11:
            states, times = [_ARGS], [t0]
            reason = f"waiting for argument object {_id('obj', i, 28).hex()}"
        else:
            pid = 20000 + i % 300
            outcome = (node.node_id, _id("worker", i % 300, 28), pid, "", "", 0)
            states += [_SUBMITTED, _RUNNING]
            times += [t0 + 0.002, t0 + 0.003]
            if i % 13 == 0:
                states.append(_FAILED)
                times.append(t0 + 1.5)
                outcome = outcome[:3] + ("ValueError", f"ValueError: bad shard {i % 50}", 1)
            elif i % 17 != 1:
                states.append(_FINISHED)
                times.append(t0 + 0.2 + (i % 7) * 0.3)
        static = (func, "NORMAL_TASK", b"", b"", {"CPU": 1.0}, b"", func)
        return task_dict(_id("task", i, 24), (1 + i % 2).to_bytes(4, "little"), static,
                         outcome, states, times, pending_reason=reason, node_ips=self._ips,
                         events=False, now=self.now)

    def _samples(self, i: int) -> List[tuple]:
        return [(self.now - 120 + k, 0.5 + 0.45 * math.sin((k + 7 * i) / 9.0),
                 min(1.0, 0.1 + 0.004 * k + 0.05 * (i % 3))) for k in range(120)]

    def _status(self) -> gcs_pb2.ClusterStatus:
        cs = gcs_pb2.ClusterStatus(nodes=self._nodes)
        for n in self._nodes:
            if n.alive:
                for k, v in n.resources_total.items():
                    cs.total[k] += v
                for k, v in n.resources_available.items():
                    cs.available[k] += v
        cs.pending.add(shape={"CPU": 1.0, "GPU": 1.0}, count=2, infeasible=True,
                       reason="needs {CPU: 1, GPU: 1}; no alive node has GPU",
                       function_name="needs_gpu")
        cs.pending.add(shape={"CPU": 1.0}, count=12, reason="waiting for free resources: needs "
                       "{CPU: 1}; {CPU: 0} of {CPU: 16} free", function_name="train_step")
        return cs

    # -- the Source interface ---------------------------------------------------------------------
    def _check(self) -> None:
        if self.unreachable:
            raise SourceError(f"{self.label}: connection refused (is the agent running?)")

    def _records(self, view: str, node: str = "") -> List[Dict]:
        from agent.cluster import _event_record, _job_record, _pg_record, _proc_record

        now = self.now
        if view == "nodes":
            from agent.cluster import node_order

            return sorted((node_record(n, now) for n in self._nodes), key=node_order)
        if view == "actors":
            return [actor_record(a) for a in self._actors]
        if view == "tasks":
            return list(reversed(self._tasks))
        if view == "jobs":
            return [_job_record(gcs_pb2.JobInfo(
                job_id=(j + 1).to_bytes(4, "little"), driver_pid=4100 + j, driver_ip="10.0.0.1",
                entrypoint=f"python train.py --epochs {10 * (j + 1)}", start_time=now - 900 + j,
                is_dead=j == 0, end_time=now - 100 if j == 0 else 0), now) for j in (1, 0)]
        if view == "pgs":
            groups = []
            for g in range(3):
                info = gcs_pb2.PlacementGroupInfo(state="CREATED" if g != 2 else "PENDING",
                                                  create_time=now - 300)
                info.spec.placement_group_id = _id("pg", g, 18)
                info.spec.name = ("trainers", "servers", "gpu-pack")[g]
                info.spec.strategy = ("SPREAD", "PACK", "STRICT_PACK")[g]
                for _ in range(2 + g):
                    info.spec.bundles.add(resources={"CPU": 1.0} if g != 2 else {"GPU": 1.0})
                if g != 2:
                    info.bundle_nodes.extend(self._nodes[(g + k) % len(self._nodes)].node_id
                                             for k in range(2 + g))
                else:
                    info.pending_reason = ("no node has {GPU: 1} free for bundle 0 (STRICT_PACK "
                                           "needs all 4 bundles on one node)")
                groups.append(_pg_record(info, self._ips))
            return groups
        if view == "objects":
            return [self._object(o) for o in range(12)]
        if view == "procs":
            procs = [agent_pb2.ProcessInfo(component=c, pid=900 + k, state="running",
                                           restarts=1 if c == "raylet" else 0,
                                           uptime_s=3600.0 - 60 * k, supervised_by="agent",
                                           cpu_percent=3.0 + k, rss_bytes=(80 + 10 * k) << 20,
                                           has_last_exit=c == "raylet",
                                           last_exit="killed by signal SIGKILL" if c == "raylet"
                                           else "")
                     for k, c in enumerate(("gcs", "object_store", "raylet"))]
            procs += [agent_pb2.ProcessInfo(component=f"worker-{_id('w', k, 4).hex()}",
                                            pid=2000 + k, state=("leased", "idle")[k % 2],
                                            uptime_s=300.0 - k, supervised_by="raylet",
                                            cpu_percent=40.0 * (k % 2 == 0), rss_bytes=120 << 20)
                      for k in range(4)]
            return [_proc_record(p) for p in procs]
        if view == "events":
            evs = []
            for e, (kind, subject, state, msg, sev) in enumerate([
                    ("node", self._nodes[0].node_id.hex(), "joined", "10.0.0.1 (head)", "INFO"),
                    ("node", self._nodes[1].node_id.hex(), "joined", "10.0.0.2", "INFO"),
                    ("process", "raylet", "exited", "killed by signal SIGKILL", "WARNING"),
                    ("process", "raylet", "running", "running as pid 902", "INFO"),
                    ("actor", _id("actor", 3, 16).hex(), "restarting",
                     "Trainer: its worker process (pid 4242) died; restart 1/3", "WARNING"),
                    ("task", "train_step", "failed", "ValueError: bad shard 17", "WARNING"),
                    ("node", self._nodes[-1].node_id.hex(), "died",
                     "no resource report for 10s", "ERROR"),
                    ("process", "object_store", "failed",
                     "crash loop: 3 exits in 30s; last exit status 1", "ERROR")]):
                ev = gcs_pb2.ClusterEvent(seq=e + 1, time=now - 300 + 30 * e, kind=kind,
                                          subject=subject, state=state, message=msg,
                                          severity=sev, node_ip="10.0.0.2", count=1 + (e == 5) * 41)
                evs.append(_event_record(ev))
            evs.reverse()
            return evs
        if view == "logs":
            return [{"component": c, "node_ip": node or "10.0.0.1", "size": 4096 * (k + 1),
                     "mtime": now - 10 * k, "path": f"/var/lib/node-agent/sessions/s/logs/{c}.log"}
                    for k, c in enumerate(("gcs", "node-agent", "object_store", "raylet"))]
        raise SourceError(f"no view {view!r}", unreachable=False)

    def _object(self, o: int) -> Dict[str, Any]:
        """One owned object: in the owner's memory, or in stores (every fourth a task's
        return spilled on 10.0.0.2, whose store shows spilled bytes; every fifth also
        copied to a second node), as the agent joins them."""
        in_store = o % 3 != 0
        spilled = in_store and o % 4 == 1
        held = [] if not in_store else [self._nodes[1]] if spilled else \
            [self._nodes[0]] + ([self._nodes[1]] if o % 5 == 2 else [])
        locations = [{"node_ip": n.node_ip, "node_id": n.node_id.hex(),
                      "store": f"{n.node_ip}:{n.store_port}",
                      "state": "spilled" if spilled and k == 0 else "sealed",
                      "disk_copy": spilled and k == 0, "busy": False, "writers": 0}
                     for k, n in enumerate(held)]
        where = "owner's memory" if not in_store else "store " + ", ".join(
            loc["node_ip"] + (" (spilled)" if loc["state"] == "spilled" else "")
            for loc in locations)
        return {"object_id": _id("obj", o, 28).hex(), "object_size": (o * 7919) % 50_000_000,
                "task_status": "FINISHED", "reference_type": "LOCAL_REFERENCE",
                "type": "DRIVER", "pid": 4100, "ip": "10.0.0.1",
                "node_id": self._nodes[0].node_id.hex(), "in_object_store": in_store,
                "where": where, "spilled": ("yes" if spilled else "no") if in_store else "",
                "locations": locations, "borrowers": 0}

    def view(self, q: Query) -> agent_pb2.ViewReply:
        self._check()
        reply = agent_pb2.ViewReply(view=q.view, time=self.now, readonly=self.readonly,
                                    agent_node_id=self._nodes[0].node_id.hex(),
                                    agent_node_ip=self._nodes[0].node_ip)
        from agent.cluster import fill_summary

        fill_summary(self._cluster, reply.cluster)
        if q.history:
            for key, ring in self._history.items():
                h = reply.history.add(node_id=key)
                for t, cpu, store in ring:
                    if t > q.history_since:
                        h.samples.add(time=t, cpu=cpu, store=store)
        records = self._records(q.view, q.node)
        aliases = {"actors": ACTOR_ALIASES, "tasks": TASK_ALIASES}.get(q.view)
        try:
            make_table(q.view, records, q.filter, q.sort, q.descending, q.limit or 1000,
                       reply.table, node_numbers if q.view == "nodes" else None, aliases)
        except query.FilterError as exc:
            reply.filter_error = str(exc)
            return reply
        if q.view in ("procs", "logs"):
            reply.node, reply.node_ip = self._nodes[0].node_id.hex(), q.node or "10.0.0.1"
        if q.view == "actors":
            flt = query.parse(q.filter, records[0].keys() if records else None, ACTOR_ALIASES)
            where: Dict[str, Dict[str, int]] = {}
            for r in records:
                if r["state"] == "ALIVE" and (not flt or flt.matches(r)):
                    where.setdefault(r["node_id"], {}).setdefault(r["class_name"], 0)
                    where[r["node_id"]][r["class_name"]] += 1
            fill_placement(reply.aux, ((k, self._ips[bytes.fromhex(k)], v)
                                       for k, v in where.items()))
        elif q.view == "tasks":
            flt = query.parse(q.filter, records[0].keys() if records else None, TASK_ALIASES)
            counts: Dict[tuple, Dict[str, int]] = {}
            for r in records:
                if not flt or flt.matches(r):
                    c = counts.setdefault((r["func_or_class_name"], r["type"]), {})
                    c[r["state"]] = c.get(r["state"], 0) + 1
            fill_task_summary(reply.aux, ((f, t, c) for (f, t), c in counts.items()))
        elif q.view == "objects":
            fill_stores(reply.aux, [node_record(n, self.now) for n in self._nodes if n.alive])
        return reply

    def describe(self, view: str, key: str, node: str = "") -> agent_pb2.DescribeReply:
        self._check()
        if view not in VIEWS:
            raise SourceError(f"no view {view!r}", unreachable=False)
        field = KEY_FIELD[view]
        rec = next((r for r in self._records(view, node) if str(r.get(field)) == key), None)
        if rec is None:
            raise SourceError(f"no {view} {key!r}", unreachable=False)
        return agent_pb2.DescribeReply(title=f"{view[:-1]} {key}", fields=describe_fields(rec))

    def act(self, action: str, keys: Sequence[str], node: str = "",
            force: bool = False) -> agent_pb2.ActionReply:
        self._check()
        if self.readonly:
            raise SourceError("read-only: raytop was started with --readonly", unreachable=False)
        self.actions.append(agent_pb2.ActionRequest(action=action, keys=list(keys), node=node,
                                                    force=force))
        reply = agent_pb2.ActionReply()
        for key in keys:
            if action == "kill_actor":
                for a in self._actors:
                    if a.actor_id.hex() == key:
                        a.state, a.death_cause = "DEAD", "it was killed from raytop"
            reply.results.add(key=key, ok=True, message=f"{action} {key[:8]}: done")
        return reply

    def tail(self, component: str, node: str = "", lines: int = 500,
             follow: bool = True) -> _Stream:
        self._check()
        base = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.now - 60))
        text = [f"=== {component} started pid 902 ==="]
        for k in range(40):
            level = "WARNING" if k % 9 == 4 else "INFO"
            text.append(f"{base},{k:03d} {level} runtime.{component}: "
                        + ("lease request for train_step queued: waiting for free resources"
                           if k % 9 == 4 else f"granted lease {k} to worker {2000 + k % 4}"))
        return _Stream(text[-lines:], component, follow)

    def close(self) -> None:
        pass


def scale_source(now: Optional[float] = None) -> FakeSource:
    """The scale benchmark's cluster: 100 nodes, 10,000 actors, 100,000 tasks."""
    return FakeSource(nodes=100, actors=10_000, tasks=100_000, now=now or FIXED_NOW)
