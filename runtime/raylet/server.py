"""The raylet process: serves the Raylet gRPC service, runs the worker pool
through the supervisor, reports resources to the GCS.

Every core worker on the node keeps one Connect stream open; requests and
grants for leases, blocked/unblocked notices and registration all travel on
it, so a lease costs one message each way and a closed stream is how the
raylet learns that a driver or worker is gone.

The GCS is a lease client too (for actors), but its leases outlive its stream: when
the GCS dies, its actors' workers keep running, and the GCS that the node agent
restarts takes their leases over when it connects (RegisterAck.gcs_leases). The
raylet itself rides out a GCS restart: it keeps reporting, notices the new GCS
(ResourceReportReply.gcs_instance) and registers again with the same node id. Only a
GCS that says this node is dead makes it exit.

The memory monitor (memory_monitor.py) runs here too: above the threshold it picks one
leased worker, writes a ``worker_killed`` notice to the stream holding its lease (a
driver, a worker, or the GCS for an actor), waits until that is written, then SIGKILLs
the worker, and picks no other until that process is gone.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import time
from typing import Dict, Optional

import grpc

from runtime import component, config, rpc
from runtime.core_worker.gcs_client import GcsClient
from runtime.labels import compile_selector
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc, raylet_pb2, raylet_pb2_grpc
from runtime.object_store.reclaim import pid_alive
from runtime.raylet import log_service, runtime_env_service
from runtime.raylet.memory_monitor import (Candidate, Kill, MemoryMonitor, NodeMemoryReader,
                                           NothingToKill, describe, rss_of)
from runtime.raylet.scheduler import (Grant, PendingRequest, Queued, Reject, RemoteNode,
                                      Scheduler, SetupEnv, Spillback, StartWorkers, Warn,
                                      Worker)
from runtime.raylet.worker_pool import WorkerPool
from runtime.supervisor import ManagedProcess, Supervisor

log = logging.getLogger("runtime.raylet")
#: How often the object store's usage is read for the resource report.
STORE_STATS_INTERVAL_S = 1.0
#: How long the memory monitor waits for its notice to be written to the lease holder's
#: stream before it kills the worker anyway (a holder that reads nothing must not keep
#: the node short of memory).
KILL_NOTICE_TIMEOUT_S = 1.0


class Client:
    """One Connect stream: a driver or a worker process."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.worker_id: Optional[bytes] = None
        self.is_driver = False
        self.pid = 0
        self.port = 0
        self.job_id = b""
        self.is_gcs = False
        self.peer = ""  # "ipv4:1.2.3.4:5678", as gRPC names it


class Raylet(raylet_pb2_grpc.RayletServicer):
    def __init__(self, args: argparse.Namespace, token: str) -> None:
        self.args = args
        self.token = token
        self.node_id = bytes.fromhex(args.node_id)
        resources = json.loads(args.resources)
        gpu_ids = [int(x) for x in args.gpu_ids.split(",") if x.strip()] if args.gpu_ids else []
        self.sched = Scheduler(self.node_id, resources, gpu_ids,
                               max_starting=max(1, min(4, int(resources.get("CPU", 1)) or 1)),
                               labels=json.loads(args.labels))
        self.clients: Dict[int, Client] = {}
        self._cids = itertools.count(1)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.supervisor = Supervisor(on_exit=self._on_process_exit)
        self.pool = WorkerPool(args, lambda: getattr(self, "gcs_client", None) or self.gcs)
        self.starting: Dict[str, ManagedProcess] = {}   # startup token -> process
        self.procs: Dict[bytes, ManagedProcess] = {}    # worker id -> process
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self.port = 0
        self._report_seq = 0
        self.gcs_client: Optional[GcsClient] = None
        self._gcs_instance = ""      # the GCS process this raylet last registered with
        self._gcs_cids: set = set()  # Connect clients that registered as the GCS
        self._start_time = time.time()
        # Drivers whose stream closed without shutdown(): (job id, pid) -> until when to
        # wait for the process to be gone; reported to the GCS once it is (exited_drivers).
        self._driver_suspects: Dict[tuple, float] = {}
        self._exited_drivers: list = []
        self._store_used = 0
        self._store_spilled = 0
        self.memory_monitor: Optional[MemoryMonitor] = None  # None: disabled

    @property
    def gcs(self) -> gcs_pb2_grpc.GcsStub:
        return self.gcs_client.stub

    # -- gRPC ---------------------------------------------------------------------------------
    async def Connect(self, request_iterator, context):
        client = Client(next(self._cids))
        client.peer = context.peer() or ""
        self.clients[client.cid] = client
        reader = asyncio.ensure_future(self._read(client, request_iterator))
        try:
            while True:
                msg = await client.outbox.get()
                if msg is None:
                    break
                if isinstance(msg, asyncio.Future):  # a flush barrier: what came before is written
                    if not msg.done():
                        msg.set_result(None)
                    continue
                yield msg
        finally:
            reader.cancel()
            self._disconnected(client)

    async def _read(self, client: Client, request_iterator) -> None:
        try:
            async for msg in request_iterator:
                self._handle(client, msg)
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        except Exception:
            log.exception("error handling a message from client %s", client.cid)
        finally:
            client.outbox.put_nowait(None)

    def _handle(self, client: Client, msg: raylet_pb2.ClientMessage) -> None:
        kind = msg.WhichOneof("msg")
        if kind == "request_lease":
            r = msg.request_lease
            s = r.strategy
            self.sched.request_lease(PendingRequest(
                client.cid, r.request_id, dict(r.resources), s.kind or "DEFAULT", s.node_id, s.soft,
                r.grant_or_reject, r.function_name, dict(r.hold) if r.hold_differs else None,
                selector=compile_selector(s.label_selector),
                job_id=r.job_id or client.job_id, env=self.pool.learn(s.runtime_env),
                retriable=r.retriable, is_actor=r.is_actor))
        elif kind == "return_lease":
            lease = self.sched.leases.get(msg.return_lease.lease_id)
            if msg.return_lease.kill_worker and lease is not None:
                self._kill_worker(lease.worker_id, "its lease holder asked (force cancel)")
            else:
                self.sched.return_lease(msg.return_lease.lease_id,
                                        worker_exiting=msg.return_lease.worker_exiting)
        elif kind == "cancel_request":
            self.sched.cancel_request(client.cid, msg.cancel_request.request_id)
        elif kind == "blocked":
            if client.worker_id is not None:
                self.sched.set_blocked(client.worker_id, msg.blocked.blocked)
        elif kind == "register":
            self._register(client, msg.register)
        self._run_scheduler()

    def _register(self, client: Client, reg: raylet_pb2.RegisterClient) -> None:
        client.is_driver = reg.is_driver
        client.pid = reg.pid
        client.port = reg.port
        client.job_id = reg.job_id
        ack = raylet_pb2.RegisterAck(
            node_id=self.node_id, store_address=self.args.store_address,
            gcs_address=self.args.gcs_address, session_dir=self.args.session_dir,
            pid=os.getpid())
        if reg.is_gcs:
            client.is_gcs = True
            ack.gcs_leases.extend(self._adopt_gcs_leases(client))
        client.outbox.put_nowait(raylet_pb2.RayletMessage(registered=ack))
        if not reg.is_driver:
            proc = self.starting.pop(reg.startup_token, None)
            if proc is None:
                log.warning("worker pid %s registered with unknown startup token", reg.pid)
                return
            client.worker_id = reg.worker_id
            self.procs[reg.worker_id] = proc
            self.sched.worker_registered(Worker(reg.worker_id, reg.pid, reg.port, client.cid,
                                                env=getattr(proc, "runtime_env", "")))
            log.info("worker %s pid %s registered on port %s", reg.worker_id.hex()[:8], reg.pid, reg.port)

    def _adopt_gcs_leases(self, client: Client) -> list:
        """A GCS connected: the leases of earlier GCS connections (a GCS that died and was
        restarted, or this GCS's lost stream) are its now."""
        out = []
        for lease in self.sched.leases.values():
            if lease.client in self._gcs_cids and lease.client != client.cid:
                lease.client = client.cid
                w = self.sched.workers.get(lease.worker_id)
                out.append(raylet_pb2.GcsLease(lease_id=lease.lease_id, worker_id=lease.worker_id,
                                               worker_pid=w.pid if w else 0,
                                               worker_port=w.port if w else 0))
        self._gcs_cids = {cid for cid in self._gcs_cids if cid in self.clients}
        self._gcs_cids.add(client.cid)
        if out:
            log.info("the GCS (pid %s) connected and took over %d actor lease(s) of an earlier "
                     "GCS connection", client.pid, len(out))
        return out

    def _disconnected(self, client: Client) -> None:
        self.clients.pop(client.cid, None)
        if client.worker_id is not None:
            self.sched.worker_died(client.worker_id)
            proc = self.procs.pop(client.worker_id, None)
            if proc is not None and proc.poll() is None:
                proc.kill()
        kills = self.sched.client_disconnected(client.cid)  # drops its pending requests
        if client.is_gcs:
            if kills:
                log.warning("the GCS's connection (pid %s) closed; its %d actor worker(s) keep "
                            "running until a GCS connects and takes their leases over",
                            client.pid, len(kills))
        else:
            for kill in kills:
                self._kill_worker(kill.worker_id, kill.reason)
        if client.is_driver and client.job_id and client.pid and self._is_local(client.peer):
            self._driver_suspects[(client.job_id, client.pid)] = time.monotonic() + 10.0
        self._run_scheduler()

    def _is_local(self, peer: str) -> bool:
        """Whether a peer runs on this host (so its pid means something here)."""
        host = peer.split(":", 1)[1].rsplit(":", 1)[0] if peer.startswith("ipv") else ""
        host = host.strip("[]")
        return host == self.args.node_ip or host.startswith("127.") or host == "::1"

    def _check_drivers(self) -> None:
        """Drivers gone without shutdown(): their processes are gone (or zombies)."""
        now = time.monotonic()
        for key, until in list(self._driver_suspects.items()):
            if not pid_alive(key[1]):
                del self._driver_suspects[key]
                self._exited_drivers.append(gcs_pb2.DriverExit(job_id=key[0], pid=key[1]))
                log.info("driver pid %s of job %s exited without shutdown()", key[1],
                         key[0].hex())
            elif now > until:
                del self._driver_suspects[key]  # it lives on (its raylet connection broke)

    async def GetNodeStats(self, request, context):
        stats = raylet_pb2.NodeStats(node_id=self.node_id, resources_total=self.sched.total,
                                     resources_available=self.sched.available,
                                     pending_leases=len(self.sched.pending))
        for c in self.clients.values():
            if c.worker_id is None and not c.is_driver:
                continue
            w = self.sched.workers.get(c.worker_id) if c.worker_id else None
            stats.workers.add(worker_id=c.worker_id or b"", pid=c.pid, port=c.port,
                              is_driver=c.is_driver, leased=bool(w and w.lease_id),
                              blocked=bool(w and w.blocked), job_id=c.job_id)
        for shape, infeasible in self.sched.pending_demand():
            if infeasible:
                stats.infeasible.append(json.dumps(shape, sort_keys=True))
        return stats

    async def PrepareBundles(self, request, context):
        bundles = [(i, dict(b.resources)) for i, b in zip(request.indexes, request.bundles)]
        problem = self.sched.prepare_bundles(request.placement_group_id.hex(), bundles,
                                             request.attempt)
        self._dirty.set()
        return raylet_pb2.BundleReply(ok=problem is None, message=problem or "")

    async def CommitBundles(self, request, context):
        self.sched.commit_bundles(request.placement_group_id.hex(), list(request.indexes))
        self._run_scheduler()
        await self._report_now()
        return raylet_pb2.BundleReply(ok=True)

    async def CancelBundles(self, request, context):
        for kill in self.sched.cancel_bundles(request.placement_group_id.hex(), list(request.indexes),
                                              request.remove, request.attempt):
            self._kill_worker(kill.worker_id, kill.reason)
        self._run_scheduler()
        await self._report_now()
        return raylet_pb2.BundleReply(ok=True)

    async def Drain(self, request, context):
        self.sched.draining = request.draining
        log.info("raylet %s", "draining: new work goes to other nodes" if request.draining
                 else "taking work again")
        self._run_scheduler()
        await self._report_now()
        return common_pb2.Empty()

    async def Shutdown(self, request, context):
        self._stopping.set()
        return common_pb2.Empty()

    # -- scheduling ----------------------------------------------------------------------------
    def _run_scheduler(self) -> None:
        for action in self.sched.schedule():
            if isinstance(action, Grant):
                self._send(action.client, raylet_pb2.LeaseGrant(
                    request_id=action.request_id, granted=raylet_pb2.Granted(
                        lease_id=action.lease_id,
                        worker=common_pb2.Address(ip=self.args.node_ip, port=action.worker.port,
                                                  worker_id=action.worker.worker_id,
                                                  node_id=self.node_id),
                        gpu_ids=action.gpu_ids, worker_pid=action.worker.pid)))
            elif isinstance(action, StartWorkers):
                for _ in range(action.count):
                    self._start_worker(action.env)
            elif isinstance(action, SetupEnv):
                self.pool.setup(action.env, self._env_setup_done)
            elif isinstance(action, Reject):
                self._send(action.client, raylet_pb2.LeaseGrant(
                    request_id=action.request_id,
                    rejected=raylet_pb2.Refused(message=action.message,
                                                runtime_env_failed=action.runtime_env,
                                                placement_group_removed=action.group_removed)))
            elif isinstance(action, Spillback):
                self._send(action.client, raylet_pb2.LeaseGrant(
                    request_id=action.request_id,
                    spillback=raylet_pb2.Spillback(raylet_address=action.raylet_address)))
            elif isinstance(action, Queued):
                self._send(action.client, raylet_pb2.LeaseGrant(request_id=action.request_id,
                                                                queued=common_pb2.Empty()))
            elif isinstance(action, Warn):
                log.warning("%s", action.message)
                self._send(action.client, raylet_pb2.LeaseGrant(
                    request_id=action.request_id,
                    warning=raylet_pb2.Refused(message=action.message)))
        self._dirty.set()

    def _send(self, cid: int, grant: raylet_pb2.LeaseGrant) -> None:
        client = self.clients.get(cid)
        if client is not None:
            client.outbox.put_nowait(raylet_pb2.RayletMessage(grant=grant))

    # -- worker pool ----------------------------------------------------------------------------
    def _start_worker(self, env: str = "") -> None:
        spec, token = self.pool.worker_spec(env, f"{self.args.node_ip}:{self.port}")
        try:
            proc = self.supervisor.spawn(spec)
        except Exception as exc:
            log.exception("failed to start a worker process")
            self.sched.worker_start_failed(env)
            self.sched.env_failed(env, f"The runtime_env's worker could not be started: {exc}")
            return
        proc.raylet_token = token  # type: ignore[attr-defined]
        proc.runtime_env = env  # type: ignore[attr-defined]
        self.starting[token] = proc

    def _env_setup_done(self, env: str, error: Optional[str]) -> None:
        if error is None:
            self.sched.env_ready(env)
        else:
            self.sched.env_failed(env, error)
        self._run_scheduler()

    def _on_process_exit(self, proc: ManagedProcess, returncode: int) -> None:
        """Supervisor thread: a worker process exited."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._worker_exited, proc, returncode)

    def _worker_exited(self, proc: ManagedProcess, returncode: int) -> None:
        if self.memory_monitor is not None and self.memory_monitor.worker_gone(proc.pid):
            log.info("memory monitor: worker pid %s is gone (status %s); the monitor may "
                     "choose another if memory stays high", proc.pid, returncode)
        token = getattr(proc, "raylet_token", None)
        if token in self.starting:
            del self.starting[token]
            env = getattr(proc, "runtime_env", "")
            self.sched.worker_start_failed(env)
            tail = "\n".join(proc.tail_log(20))
            log.error("worker pid %s exited with status %s before registering; last log lines:\n%s",
                      proc.pid, returncode, tail)
            self.sched.env_failed(env, f"A worker started for the runtime_env exited with status "
                                       f"{returncode} before registering (node "
                                       f"{self.pool.node}); its last log lines:\n{tail}")
        for wid, p in list(self.procs.items()):
            if p is proc:
                del self.procs[wid]
                if self.sched.worker_died(wid) is not None:
                    log.warning("leased worker %s pid %s died with status %s", wid.hex()[:8],
                                proc.pid, returncode)
        self.supervisor.remove(proc)
        self._run_scheduler()

    def _kill_worker(self, worker_id: bytes, reason: str) -> None:
        proc = self.procs.get(worker_id)
        log.info("killing worker %s: %s", worker_id.hex()[:8], reason)
        self.sched.worker_died(worker_id)
        if proc is not None:
            proc.kill()

    # -- memory monitor ------------------------------------------------------------------------
    def _memory_candidates(self) -> list:
        """Every leased worker, as the monitor weighs it."""
        out = []
        workers = self.sched.workers
        for lease in self.sched.leases.values():
            w = workers.get(lease.worker_id)
            if w is not None and w.pid:
                out.append(Candidate(lease.worker_id, w.pid, lease.lease_id, lease.retriable,
                                     lease.name, lease.is_actor))
        return out

    async def _memory_loop(self, reader: NodeMemoryReader, refresh_s: float) -> None:
        """One reading per refresh; a kill when the monitor decides one."""
        monitor = self.memory_monitor
        assert monitor is not None
        while not self._stopping.is_set():
            await asyncio.sleep(refresh_s)
            victim = monitor.killing
            if victim is not None and not pid_alive(victim.pid):
                monitor.worker_gone(victim.pid)  # its exit was not reported (not ours)
            try:
                decision = monitor.check(reader.read(), self._memory_candidates)
            except Exception:
                log.exception("memory monitor: reading the node's memory failed")
                continue
            if isinstance(decision, Kill):
                await self._memory_kill(decision)
            elif isinstance(decision, NothingToKill):
                log.warning("%s", decision.message)

    async def _memory_kill(self, kill: Kill) -> None:
        """Tell the lease's holder why its worker dies, wait until that is written, then
        SIGKILL the worker (its memory is freed by the kernel; the monitor waits for the
        process to be gone before choosing again)."""
        v = kill.victim
        snap = kill.snapshot
        lease = self.sched.leases.get(v.lease_id)
        client = self.clients.get(lease.client) if lease is not None else None
        # Out of the pool at once: a lease returned while the notice travels must not
        # hand the worker to a holder nobody told.
        self.sched.worker_died(v.worker_id)
        log.warning("memory monitor: node uses %.2f GiB of %.2f GiB (%s; %.3f > threshold %g); "
                    "killing worker %s pid %s (%s, lease %s, %s, kill %d since start)",
                    snap.used / 2**30, snap.total / 2**30, snap.source, snap.fraction,
                    self.memory_monitor.threshold, v.worker_id.hex()[:8], v.pid,
                    v.name or "?", v.lease_id, "retriable" if v.retriable else "not retriable",
                    self.memory_monitor.kills)
        if client is not None:
            written = asyncio.get_running_loop().create_future()
            client.outbox.put_nowait(raylet_pb2.RayletMessage(worker_killed=raylet_pb2.WorkerKilled(
                lease_id=v.lease_id, worker_id=v.worker_id, reason=kill.message)))
            client.outbox.put_nowait(written)
            try:
                await asyncio.wait_for(written, KILL_NOTICE_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("memory monitor: the holder of lease %s (pid %s) did not take the "
                            "notice within %gs; killing its worker anyway", v.lease_id,
                            client.pid, KILL_NOTICE_TIMEOUT_S)
        if v.worker_id in self.procs or v.worker_id in self.sched.workers:
            self._kill_worker(v.worker_id, "the node is low on memory (memory monitor)")
            self._run_scheduler()
        elif not pid_alive(v.pid):
            self.memory_monitor.worker_gone(v.pid)  # it exited meanwhile

    async def _reap_idle_workers(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(1.0)
            for wid in self.sched.idle_workers_to_stop(time.monotonic(), config.IDLE_WORKER_KILL_S):
                proc = self.procs.pop(wid, None)
                self.sched.worker_died(wid)
                if proc is not None:
                    log.info("stopping idle worker %s pid %s", wid.hex()[:8], proc.pid)
                    await asyncio.to_thread(proc.stop, 2.0)
                    self.supervisor.remove(proc)

    def _start_memory_monitor(self) -> Optional[asyncio.Task]:
        """Log what the monitor uses; start its loop unless it is disabled."""
        refresh_ms = config.MEMORY_MONITOR_REFRESH_MS
        threshold = config.MEMORY_USAGE_THRESHOLD
        if refresh_ms <= 0:
            log.info("%s", describe(threshold, refresh_ms, None))
            return None
        reader = NodeMemoryReader()
        log.info("%s", describe(threshold, refresh_ms, reader.read()))
        self.memory_monitor = MemoryMonitor(threshold, self.args.node_ip, self.args.node_id,
                                            rss_of=rss_of)
        return asyncio.ensure_future(self._memory_loop(reader, refresh_ms / 1000.0))

    # -- GCS -----------------------------------------------------------------------------------
    def _node_info(self) -> gcs_pb2.NodeInfo:
        a = self.args
        return gcs_pb2.NodeInfo(
            node_id=self.node_id, node_ip=a.node_ip, raylet_port=self.port,
            store_port=int(a.store_address.rsplit(":", 1)[1]), resources_total=self.sched.total,
            resources_available=self.sched.available, alive=True, hostname=os.uname().nodename,
            session_dir=a.session_dir, is_head=a.is_head, start_time=self._start_time,
            raylet_pid=os.getpid(), object_store_memory=a.object_store_memory,
            draining=self.sched.draining, labels=self.sched.labels)

    async def _register_node(self) -> bool:
        """Register (again) with the GCS; False when the GCS says this node is dead."""
        reply = await self.gcs_client.call("RegisterNode", self._node_info(),
                                           doing="registering this node")
        if reply.node_dead:
            log.error("the GCS at %s has marked this node dead (a dead node never comes back; "
                      "a restarted raylet joins as a new node); exiting", self.args.gcs_address)
            self._stopping.set()
            return False
        self._gcs_instance = reply.gcs_instance
        return True

    async def _send_report(self, timeout: float = 10) -> gcs_pb2.ResourceReportReply:
        """One resource report; the drivers it names as exited are forgotten once it is
        answered."""
        self._check_drivers()
        report = self._report()
        sent = list(self._exited_drivers)
        report.exited_drivers.extend(sent)
        reply = await self.gcs.ReportResources(report, timeout=timeout)
        del self._exited_drivers[:len(sent)]
        return reply

    async def _gcs_loop(self) -> None:
        last = 0.0
        self._membership_version = 0
        down_since: Optional[float] = None
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._dirty.wait(), config.RESOURCE_REPORT_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._dirty.clear()
            try:
                reply = await self._send_report()
                if down_since is not None:
                    log.info("the GCS at %s answers again after %.1fs", self.args.gcs_address,
                             time.monotonic() - down_since)
                    down_since = None
                if reply.node_dead:
                    log.error("the GCS has marked this node dead; exiting")
                    self._stopping.set()
                    return
                if reply.unknown_node or (reply.gcs_instance and self._gcs_instance
                                          and reply.gcs_instance != self._gcs_instance):
                    log.warning("the GCS at %s restarted; registering this node with it again",
                                self.args.gcs_address)
                    if not await self._register_node():
                        return
                    self._dirty.set()  # report at once: the new GCS waits for resources
                now = time.monotonic()
                if now - last > 1.0 or reply.membership_version != self._membership_version:
                    last = now
                    self._membership_version = reply.membership_version
                    await self._refresh_nodes()
            except grpc.RpcError as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("cannot report resources to the GCS at %s (%s); this node keeps "
                                "running and reports again when the GCS is back",
                                self.args.gcs_address,
                                exc.details() if hasattr(exc, "details") else exc)
                await asyncio.sleep(0.2)
            except Exception:  # e.g. re-registration failed for good: keep trying
                log.exception("reporting to the GCS at %s failed", self.args.gcs_address)
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.05)  # coalesce bursts of changes

    async def _membership_loop(self) -> None:
        """Refresh the view of other nodes as soon as the membership changes (long poll), so
        a node that just joined takes SPREAD tasks and spillback at once; the periodic
        refresh in _gcs_loop remains the fallback."""
        seen = 0
        while not self._stopping.is_set():
            try:
                reply = await self.gcs.WaitMembership(
                    gcs_pb2.MembershipRequest(newer_than=seen, timeout_s=30.0), timeout=40)
                if reply.version < seen:
                    seen = 0  # a restarted GCS counts again
                if reply.version != seen:
                    seen = reply.version
                    await self._refresh_nodes()
            except grpc.RpcError:
                await asyncio.sleep(0.5)  # the GCS is restarting: _gcs_loop reports it

    def _report(self) -> gcs_pb2.ResourceReport:
        self._report_seq += 1
        sched = self.sched
        report = gcs_pb2.ResourceReport(node_id=self.node_id, seq=self._report_seq,
                                        draining=sched.draining,
                                        resources_available=sched.available,
                                        resources_total=sched.total,
                                        object_store_used=self._store_used,
                                        object_store_spilled=self._store_spilled,
                                        leased_workers=len(sched.leases),
                                        num_workers=len(sched.workers))
        # One entry per (shape, function, job, reason): the GCS tells why each task waits.
        groups: Dict[tuple, list] = {}
        for d in sched.pending_demand_detail():
            key = (json.dumps(d.resources, sort_keys=True), d.name, d.job_id, d.reason)
            entry = groups.get(key)
            if entry is None:
                groups[key] = [d, 1]
            else:
                entry[1] += 1
        for d, count in groups.values():
            report.pending.add(shape=d.resources, count=count, infeasible=d.infeasible,
                               reason=d.reason, function_name=d.name, job_id=d.job_id)
        return report

    async def _store_loop(self) -> None:
        """Poll the object store's usage for the resource report (raytop's nodes view).
        A store that does not answer (restarting) keeps the last figures."""
        from runtime.protocol import object_store_pb2_grpc

        stub = object_store_pb2_grpc.ObjectStoreStub(
            rpc.aio_channel(self.args.store_address, self.token))
        while not self._stopping.is_set():
            try:
                st = await stub.Stats(common_pb2.Empty(), timeout=5)
                used, spilled = st.used, st.spilled_bytes
                if (used, spilled) != (self._store_used, self._store_spilled):
                    self._store_used, self._store_spilled = used, spilled
                    self._dirty.set()
            except grpc.RpcError:
                pass
            await asyncio.sleep(STORE_STATS_INTERVAL_S)

    async def _report_now(self) -> None:
        """Tell the GCS at once (bundle changes must be visible when the RPC returns)."""
        try:
            await self._send_report()
        except grpc.RpcError as exc:
            log.warning("cannot report resources to the GCS: %s", exc.code().name)

    async def _refresh_nodes(self) -> None:
        nodes = await self.gcs.GetAllNodes(common_pb2.Empty(), timeout=10)
        remote = {}
        for n in nodes.nodes:
            if n.alive and not n.draining and n.node_id != self.node_id:
                remote[n.node_id] = RemoteNode(n.node_id, f"{n.node_ip}:{n.raylet_port}",
                                               dict(n.resources_total), dict(n.resources_available),
                                               dict(n.labels))
        changed = set(remote) != set(self.sched.remote_nodes)
        self.sched.set_remote_nodes(remote)
        if (changed or self.sched.waits_for_view()) and self.sched.pending:
            self._run_scheduler()  # waiting requests may fit a node that just joined

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        a = self.args
        server = rpc.make_server(self.token)
        raylet_pb2_grpc.add_RayletServicer_to_server(self, server)
        log_service.add_to_server(server, a.session_dir)  # get_log/list_logs, token-checked
        runtime_env_service.add_to_server(server, self.pool)  # list_runtime_envs, eager_install
        self.port = rpc.bind(server, a.node_ip, a.port)
        await server.start()
        self.gcs_client = GcsClient(a.gcs_address, self.token)
        if not await self._register_node():
            raise SystemExit(f"raylet: the GCS at {a.gcs_address} refused node {a.node_id}")
        for _ in range(max(0, a.prestart)):
            self.sched.worker_starting()
            self._start_worker()
        component.announce_ready(a.ready_file, port=self.port, node_id=a.node_id)
        log.info("raylet serving on %s:%s with resources %s", a.node_ip, self.port, self.sched.total)
        component.install_stop_handler(lambda: self.loop.call_soon_threadsafe(self._stopping.set))
        tasks = [asyncio.ensure_future(self._gcs_loop()),
                 asyncio.ensure_future(self._membership_loop()),
                 asyncio.ensure_future(self._store_loop()),
                 asyncio.ensure_future(self._reap_idle_workers())]
        memory = self._start_memory_monitor()
        if memory is not None:
            tasks.append(memory)
        await self._stopping.wait()
        log.info("raylet stopping")
        for t in tasks:
            t.cancel()
        for c in list(self.clients.values()):
            c.outbox.put_nowait(None)
        await self.pool.close()
        await asyncio.to_thread(self.supervisor.close)
        try:
            await self.gcs.UnregisterNode(gcs_pb2.NodeId(node_id=self.node_id,
                                                         reason="raylet stopped"), timeout=2)
        except grpc.RpcError:
            pass
        await server.stop(0.5)
        await self.gcs_client.close()



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runtime.raylet")
    p.add_argument("--node-id", required=True)
    p.add_argument("--node-ip", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--gcs-address", required=True)
    p.add_argument("--store-address", required=True)
    p.add_argument("--session-dir", required=True)
    p.add_argument("--resources", required=True, help="JSON: total resources of this node")
    p.add_argument("--gpu-ids", default="")
    p.add_argument("--object-store-memory", type=int, default=0)
    p.add_argument("--prestart", type=int, default=1)
    p.add_argument("--is-head", action="store_true")
    p.add_argument("--labels", default="{}",
                   help="JSON: the node's custom labels (Ray's defaults are added here)")
    p.add_argument("--ready-file", default="")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    token = component.token_from_env()
    component.setup_logging("raylet", args.node_id)
    component.die_with_parent()
    asyncio.run(Raylet(args, token).run())


if __name__ == "__main__":
    main()
