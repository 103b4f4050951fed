"""The head's job manager: runs submitted entrypoints and keeps their records.

Ray runs each job through a JobSupervisor actor. Here a node agent supervises
each job as a process group (agent/jobs/runner.py, process.py), which costs no
worker start, so a trivial job goes from submission to SUCCEEDED in tens of
milliseconds. The records live in the GCS (runtime/gcs/jobs.py): every reader
(this API on any agent, agentctl, the state API, raytop) sees the same table.

A job whose submission asks for entrypoint resources first reserves them with a
one-bundle placement group, as Ray's supervisor actor holds them, and starts once
the group is placed; until then it is PENDING with Ray's "waiting for resources"
message. The entrypoint runs on the node where the bundle was placed: on the head
through this agent's own runner, elsewhere through that node's agent
(agent/jobs/hosts.py), which the manager keeps asking how the job goes. A job whose
node dies is FAILED (Ray's JOB_SUPERVISOR_ACTOR_DIED, naming the node). Without
entrypoint resources a job runs on the head, as in Ray. The reservation is
released when the job ends.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Set, Tuple, Union

import grpc

from agent.config import Jobs as JobSettings
from agent.jobs import records
from agent.jobs.hosts import HostError, LocalHost, RemoteHost, agent_address
from agent.jobs.packages import PackageError, PackageStore, uri_name
from agent.jobs.records import BadRequest
from agent.jobs.runner import SUBMISSION_ID_ENV, ExitInfo, JobRunner, NodeContext, append_log
from runtime import ids, rpc
from runtime.private_fs import ensure_private_dir
from runtime.protocol import agent_pb2_grpc, common_pb2, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("agent.jobs")

Host = Union[LocalHost, RemoteHost]
#: Where the head publishes this API's address in the GCS KV (agentctl job, raytop).
KV_NAMESPACE = "dashboard"
KV_KEY = b"jobs_http_address"
GCS_TIMEOUT_S = 10.0
#: How long a status update keeps retrying while the GCS restarts.
UPDATE_RETRY_S = 30.0
REPUBLISH_S = 5.0
#: Ray puts this much of the log's end into a failed job's message.
FAILURE_LOG_CHARS = 20_000
#: How long a new node's agent may take to publish its TCP API address in the GCS.
AGENT_ADDRESS_WAIT_S = 10.0
#: A tail of a remote job's log waits this long on the node for new lines per call.
REMOTE_TAIL_WAIT_S = 1.0


@dataclass(frozen=True)
class HeadInfo:
    gcs_address: str
    token: str
    node_id: str          # hex
    node_ip: str
    session_dir: str
    http_address: str     # http://ip:port of this API


class JobNotFound(LookupError):
    pass


class LogsUnavailable(RuntimeError):
    """A job's log is on a node that cannot be asked for it; the message says which."""


class _Running:
    """What the manager holds for a job it runs."""

    def __init__(self, job: gcs_pb2.SubmittedJob) -> None:
        self.job = job
        self.stop = asyncio.Event()
        self.host: Optional[Host] = None
        self.task: Optional[asyncio.Task] = None


class JobManager:
    def __init__(self, head: HeadInfo, settings: Optional[JobSettings] = None,
                 runner: Optional[JobRunner] = None) -> None:
        """``runner``: the head agent's JobRunner, which runs the entrypoints placed on
        the head; without one, a runner of the manager's own for the head's session."""
        self.head = head
        self.settings = settings or JobSettings()
        self._own_runner = runner is None
        self.runner = runner or JobRunner(self._own_node, self.settings)
        self.jobs_dir = os.path.join(head.session_dir, "jobs")
        self.logs_dir = os.path.join(head.session_dir, "logs")
        self.packages = PackageStore(os.path.join(self.jobs_dir, "_packages"),
                                     self.settings.max_package_bytes,
                                     self.settings.max_packages_bytes,
                                     self.settings.max_unpacked_bytes)
        self._channel = rpc.aio_channel(head.gcs_address, head.token)
        self.gcs = gcs_pb2_grpc.GcsStub(self._channel)
        self._agent_channels: Dict[str, Any] = {}
        self.running: Dict[str, _Running] = {}
        self._tasks: Set[asyncio.Task] = set()
        self._republisher: Optional[asyncio.Task] = None
        self._closing = False

    # ---- lifecycle ----------------------------------------------------------------------

    def _own_node(self) -> NodeContext:
        h = self.head
        return NodeContext(session_dir=h.session_dir, node_id=h.node_id, node_ip=h.node_ip,
                           gcs_address=h.gcs_address, token=h.token, socket_path="",
                           is_head=True)

    def set_node_id(self, node_id: str) -> None:
        """The head's raylet restarted as a new node: later jobs name the new id."""
        if node_id and node_id != self.head.node_id:
            self.head = dataclasses.replace(self.head, node_id=node_id)

    async def start(self) -> None:
        ensure_private_dir(self.jobs_dir)
        await self._publish_address()
        self._republisher = asyncio.ensure_future(self._republish_loop())

    async def _publish_address(self) -> None:
        try:
            await self.gcs.KvPut(gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=KV_KEY, overwrite=True,
                                                   value=self.head.http_address.encode()),
                                 timeout=GCS_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.warning("could not publish the jobs API address in the GCS: %s", exc.code().name)

    async def _republish_loop(self) -> None:
        """A restarted GCS knows nothing: give it back the address and the records of
        the jobs this head still runs."""
        while True:
            await asyncio.sleep(REPUBLISH_S)
            try:
                reply = await self.gcs.KvGet(gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=KV_KEY),
                                             timeout=GCS_TIMEOUT_S)
                if reply.found:
                    continue
                await self._publish_address()
                for run in list(self.running.values()):
                    await self.gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=run.job),
                                                   timeout=GCS_TIMEOUT_S)
                log.info("the GCS restarted: published the jobs API address and %d running "
                         "job(s) again", len(self.running))
            except grpc.RpcError:
                pass

    async def close(self) -> None:
        """Agent or node stop: stop every job (SIGTERM, then SIGKILL) and record it."""
        self._closing = True
        if self._republisher is not None:
            self._republisher.cancel()
        for run in self.running.values():
            run.stop.set()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.stop_grace_s + 5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for channel in self._agent_channels.values():
            await channel.close()
        self._agent_channels.clear()
        if self._own_runner:
            await self.runner.close()
        await self._channel.close()

    # ---- submit -------------------------------------------------------------------------

    async def submit(self, body: Any) -> str:
        job = records.parse_submit(body)
        env = records.runtime_env(job) or {}
        wd = env.get("working_dir")
        if wd:
            if "://" in wd:
                try:
                    uri_name(wd)
                except PackageError as exc:
                    raise BadRequest(f"runtime_env['working_dir']: {exc}") from None
            elif not os.path.isabs(wd):
                raise BadRequest(f"runtime_env['working_dir'] {wd!r} must be an absolute "
                                 f"directory on the node that runs the entrypoint (the head, "
                                 f"unless entrypoint resources place it elsewhere), or a "
                                 f"package the client uploads (JobSubmissionClient and `ray "
                                 f"job submit --working-dir` do)")
        reply = await self.gcs.PutSubmittedJob(
            gcs_pb2.PutSubmittedJobRequest(job=job, create_only=True), timeout=GCS_TIMEOUT_S)
        if not reply.ok:
            raise BadRequest(reply.error)
        run = _Running(job)
        self.running[job.submission_id] = run
        run.task = self._spawn_task(self._supervise(run))
        log.info("job %s submitted: %s", job.submission_id, job.entrypoint[:200])
        return job.submission_id

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def log_path(self, submission_id: str) -> str:
        return os.path.join(self.logs_dir, f"job-driver-{submission_id}.log")

    def _job_dir(self, submission_id: str) -> str:
        return os.path.join(self.jobs_dir, submission_id)

    async def _update(self, run: _Running, status: str, **fields: Any) -> None:
        """Set the job's status (and fields) and store it; retried while the GCS is away."""
        job = gcs_pb2.SubmittedJob()
        job.CopyFrom(run.job)
        job.status = status
        job.message = ""
        for name, value in fields.items():
            if name == "driver_exit_code":
                if value is not None:
                    job.has_driver_exit_code = True
                    job.driver_exit_code = value
            else:
                setattr(job, name, value)
        if not job.message:
            job.message = records.default_message(job)
        if status in records.TERMINAL:
            job.end_time_ms = records.now_ms()
            job.driver_pid = 0
        run.job = job
        deadline = time.monotonic() + (2.0 if self._closing else UPDATE_RETRY_S)
        delay = 0.1
        while True:
            try:
                reply = await self.gcs.PutSubmittedJob(
                    gcs_pb2.PutSubmittedJobRequest(job=job), timeout=GCS_TIMEOUT_S)
                if not reply.ok:
                    log.error("job %s: the GCS refused status %s: %s", job.submission_id, status,
                              reply.error)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    log.error("job %s: could not record status %s in the GCS: %s",
                              job.submission_id, status, exc.code().name)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _supervise(self, run: _Running) -> None:
        job = run.job
        sid = job.submission_id
        reservation: Optional[bytes] = None
        try:
            node = ""
            wanted = records.resources_requested(job)
            if wanted:
                placed = await self._reserve(run, wanted)
                if placed is None:
                    return
                reservation, node = placed
            if run.stop.is_set():
                await self._update(run, records.STOPPED)
                return
            try:
                host = await self._host_for(node)
            except HostError as exc:
                await self._fail_before_start(run, f"Job supervisor actor could not be started: "
                                              f"{exc}", records.SUPERVISOR_START_FAILURE)
                return
            try:
                pid = await self._start(run, host, reservation or b"")
            except HostError as exc:
                if isinstance(host, RemoteHost):  # it may have started, its reply lost
                    await host.stop(sid, 0.0, timeout_s=2.0)
                await self._fail_before_start(run, f"Job supervisor actor could not be started: "
                                              f"{exc}", records.SUPERVISOR_START_FAILURE)
                return
            if not pid:
                return
            await self._wait(run, host, pid)
        except asyncio.CancelledError:
            if run.host is not None:  # close() ran out of time: kill, never leave it running
                await asyncio.shield(self._kill_quietly(run))
            raise
        except Exception as exc:  # a bug here must still end the job, with the reason
            log.exception("supervising job %s failed", sid)
            if run.job.status not in records.TERMINAL:
                if run.host is not None:
                    await self._kill_quietly(run)
                await self._update(run, records.FAILED, message=f"the job's supervisor failed: "
                                   f"{type(exc).__name__}: {exc}",
                                   error_type=records.SUPERVISOR_DIED)
        finally:
            if run.host is not None:
                run.host.forget(sid)
            if reservation is not None:
                await self._release(reservation)
            self.running.pop(sid, None)

    async def _kill_quietly(self, run: _Running) -> None:
        host = run.host
        if host is None:
            return
        try:
            if isinstance(host, RemoteHost):
                await host.stop(run.job.submission_id, 0.0, timeout_s=2.0)
            else:
                await host.stop(run.job.submission_id, 0.0)
        except Exception:
            log.exception("killing job %s failed", run.job.submission_id)

    async def _fail_before_start(self, run: _Running, msg: str, error_type: str) -> None:
        """A failure before any node has the job: its log is the head's."""
        self._append_log(run.job.submission_id, msg + "\n")
        await self._update(run, records.FAILED, message=msg, error_type=error_type)

    async def _start(self, run: _Running, host: Host, pg_id: bytes) -> int:
        """Start the entrypoint on host: its pid, or 0 when the job has FAILED."""
        job = run.job
        sid = job.submission_id
        outcome = await host.start(job, pg_id)
        if outcome.missing_package:
            name = outcome.missing_package
            if host.remote and self.packages.exists(name):
                await host.put_package(name, self.packages.path(name))
                outcome = await host.start(job, pg_id)
            if outcome.missing_package:
                await self._fail_before_start(
                    run, f"Failed to set up the runtime environment for job {sid}: package "
                         f"gcs://{name} was not uploaded to this head (or the head restarted "
                         f"since): submit again to upload it", records.RUNTIME_ENV_SETUP_FAILURE)
                return 0
        if outcome.error_type or not outcome.pid:
            # Its log (with this message) is on that node: the record says which.
            await self._update(run, records.FAILED, message=outcome.message or
                               f"the entrypoint was not started on {host.describe()}",
                               error_type=outcome.error_type or records.SUPERVISOR_START_FAILURE,
                               driver_node_id=host.node_id, driver_node_ip=host.node_ip)
            return 0
        run.host = host
        if host.remote:
            log.info("job %s runs on %s as pid %d", sid, host.describe(), outcome.pid)
        return outcome.pid

    async def _wait(self, run: _Running, host: Host, pid: int) -> None:
        """Record the job RUNNING, then how it ends. The wait on its node starts first:
        a remote job nobody waits for is stopped there (runner.ORPHAN_GRACE_S), and the
        status write may take a while when the GCS is restarting."""
        sid = run.job.submission_id
        waiter = asyncio.ensure_future(host.wait(sid))
        stopper = asyncio.ensure_future(run.stop.wait())
        death = asyncio.ensure_future(self._node_death(host.node_id)) if host.remote else None
        watched = {waiter, stopper} | ({death} if death is not None else set())
        try:
            await self._update(run, records.RUNNING, driver_pid=pid,
                               driver_node_id=host.node_id, driver_node_ip=host.node_ip,
                               driver_agent_http_address=self.head.http_address)
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if run.stop.is_set() and not waiter.done() and not (death and death.done()):
                await host.stop(sid, self.settings.stop_grace_s, f"Job {sid} was stopped." if
                                not self._closing else f"Job {sid} was stopped: the head's "
                                f"node agent is stopping.")
                await asyncio.wait({waiter} | ({death} if death is not None else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
                msg = None if not self._closing else ("Job was stopped: the head's node agent "
                                                     "stopped the node.")
                await self._update(run, records.STOPPED, **({"message": msg} if msg else {}))
                return
            if death is not None and death.done() and not waiter.done():
                await self._node_lost(run, host, death.result())
                return
        finally:
            for f in (stopper, death):
                if f is not None and not f.done():
                    f.cancel()
            if not waiter.done():
                waiter.cancel()
            await asyncio.gather(*[f for f in (waiter, stopper, death) if f is not None],
                                 return_exceptions=True)
        try:
            ended: ExitInfo = waiter.result()
        except HostError as exc:
            await self._kill_quietly(run)
            await self._update(run, records.FAILED, error_type=records.SUPERVISOR_DIED,
                               message=f"Job supervisor actor died: {exc}")
            return
        rc = ended.exit_code
        if ended.reason:
            await self._update(run, records.FAILED, error_type=records.SUPERVISOR_DIED,
                               driver_exit_code=rc,
                               message=f"Job supervisor actor died: on {host.describe()}, "
                                       f"{ended.reason}")
            return
        if rc == 0:
            log.info("job %s succeeded", sid)
            await self._update(run, records.SUCCEEDED, driver_exit_code=0)
            return
        tail = await self._log_tail(host, sid, FAILURE_LOG_CHARS)
        if rc is None:
            msg = "Job entrypoint command was killed before it could report an exit status."
        else:
            msg = f"Job entrypoint command failed with exit code {rc}"
            if rc > 128:
                msg += f" (killed by signal {rc - 128}?)"
            msg += (", last available logs (truncated to 20,000 chars):\n" + tail if tail
                    else ". No logs available.")
        log.info("job %s failed with exit code %s", sid, rc)
        await self._update(run, records.FAILED, message=msg, driver_exit_code=rc,
                           error_type=records.ENTRYPOINT_ERROR)

    async def _node_lost(self, run: _Running, host: Host,
                         node: Optional[gcs_pb2.NodeInfo]) -> None:
        """The node running the entrypoint died: FAILED as Ray fails a job whose
        supervisor actor died with its node. Its agent may still live (only the raylet
        died): then it is asked to kill what is left."""
        reason = node.death_reason if node is not None and node.death_reason else "no reason given"
        msg = (f"Job supervisor actor died: {host.describe()}, which ran the job's entrypoint, "
               f"died ({reason})")
        log.warning("job %s: %s", run.job.submission_id, msg)
        await self._kill_quietly(run)
        await self._update(run, records.FAILED, message=msg, error_type=records.SUPERVISOR_DIED)

    async def _node_death(self, node_id: str) -> Optional[gcs_pb2.NodeInfo]:
        """Returns once the GCS says node_id is dead (its record)."""
        version = 0
        while True:
            try:
                nodes = (await self.gcs.GetAllNodes(common_pb2.Empty(),
                                                    timeout=GCS_TIMEOUT_S)).nodes
                for n in nodes:
                    if n.node_id.hex() == node_id and not n.alive:
                        return n
                reply = await self.gcs.WaitMembership(
                    gcs_pb2.MembershipRequest(newer_than=version, timeout_s=10.0),
                    timeout=GCS_TIMEOUT_S + 10.0)
                version = reply.version
            except grpc.RpcError:
                await asyncio.sleep(1.0)

    async def _host_for(self, node_id: str) -> Host:
        """Where to run an entrypoint placed on node_id ("" or the head's node: here)."""
        if not node_id or node_id == self.head.node_id:
            return LocalHost(self.runner, self.head.node_id, self.head.node_ip)
        try:
            nodes = (await self.gcs.GetAllNodes(common_pb2.Empty(),
                                                timeout=GCS_TIMEOUT_S)).nodes
        except grpc.RpcError as exc:
            raise HostError(f"cannot ask the GCS at {self.head.gcs_address} about node "
                            f"{node_id[:8]}: {exc.code().name}") from None
        node = next((n for n in nodes if n.node_id.hex() == node_id), None)
        if node is None or not node.alive:
            raise HostError(f"node {node_id[:8]}, where the entrypoint's resources were "
                            f"reserved, is not alive")
        return await self._remote(node_id, node.node_ip, wait_s=AGENT_ADDRESS_WAIT_S)

    async def _remote(self, node_id: str, node_ip: str, wait_s: float = 0.0) -> RemoteHost:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                address = await agent_address(self.gcs, node_id, node_ip, GCS_TIMEOUT_S)
                break
            except HostError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.5)
        channel = self._agent_channels.get(address)
        if channel is None:
            channel = self._agent_channels[address] = rpc.aio_channel(address, self.head.token)
        return RemoteHost(agent_pb2_grpc.NodeAgentStub(channel), node_id, node_ip, address)

    # ---- entrypoint resources -------------------------------------------------------------

    async def _reserve(self, run: _Running, wanted: Dict[str, float]
                       ) -> Optional[Tuple[bytes, str]]:
        """Hold the entrypoint's resources with a one-bundle placement group: (its id,
        the node holding the bundle), or None when the job ended (stopped, or the
        reservation was refused) while it waited."""
        pg_id = ids.random_id(ids.PLACEMENT_GROUP_ID_SIZE)
        spec = gcs_pb2.PlacementGroupSpec(
            placement_group_id=pg_id, name=records.reservation_name(run.job.submission_id),
            strategy="STRICT_PACK", detached=True, namespace="_jobs",
            bundles=[gcs_pb2.Bundle(resources=wanted)])
        reply = await self.gcs.CreatePlacementGroup(spec, timeout=GCS_TIMEOUT_S)
        if reply.error:
            await self._update(run, records.FAILED, error_type=records.UNSCHEDULABLE,
                               message=f"cannot reserve the entrypoint's resources "
                                       f"{wanted}: {reply.error}")
            return None
        version = 0
        while not run.stop.is_set():
            try:
                got = await self.gcs.GetPlacementGroup(
                    gcs_pb2.PlacementGroupRequest(placement_group_id=pg_id, newer_than=version,
                                                  timeout_s=1.0), timeout=GCS_TIMEOUT_S)
            except grpc.RpcError:
                await asyncio.sleep(0.5)
                continue
            if got.found and got.info.state == "CREATED" and got.info.bundle_nodes:
                return pg_id, got.info.bundle_nodes[0].hex()
            if got.found:
                version = got.info.version
        await self._release(pg_id)
        await self._update(run, records.STOPPED)
        return None

    async def _release(self, pg_id: bytes) -> None:
        try:
            await self.gcs.RemovePlacementGroup(
                gcs_pb2.PlacementGroupRequest(placement_group_id=pg_id), timeout=GCS_TIMEOUT_S)
        except grpc.RpcError as exc:
            log.warning("could not release an entrypoint reservation: %s", exc.code().name)

    # ---- logs ---------------------------------------------------------------------------

    def _append_log(self, sid: str, text: str) -> None:
        append_log(self.log_path(sid), text)

    async def _log_tail(self, host: Host, sid: str, chars: int) -> str:
        try:
            chunk = await host.read_log(sid, -1, chars * 4)
        except HostError as exc:
            log.warning("job %s: no log tail for its message: %s", sid, exc)
            return ""
        return chunk.data.decode("utf-8", "replace")[-chars:]

    async def _log_host(self, job: gcs_pb2.SubmittedJob) -> Host:
        """Whose disk holds the job's log: the node it ran on (the record says), the
        head when it never ran elsewhere. LogsUnavailable when that node's agent cannot
        be found (the node died, and no node runs at its address again)."""
        run = self.running.get(job.submission_id)
        if run is not None and run.host is not None:
            return run.host
        node_id, ip = job.driver_node_id, job.driver_node_ip
        if not node_id or node_id == self.head.node_id or ip == self.head.node_ip:
            return LocalHost(self.runner, self.head.node_id, self.head.node_ip)
        try:
            nodes = (await self.gcs.GetAllNodes(common_pb2.Empty(),
                                                timeout=GCS_TIMEOUT_S)).nodes
            # The same node, or the node its agent runs at that address now (a raylet
            # that restarted registers as a new node; its agent and disk are the same).
            alive = [n for n in nodes if n.alive and n.node_ip == ip]
            alive.sort(key=lambda n: n.node_id.hex() != node_id)
            if not alive:
                raise HostError(f"no node is alive at {ip} any more")
            return await self._remote(alive[0].node_id.hex(), ip)
        except (HostError, grpc.RpcError) as exc:
            why = exc if isinstance(exc, HostError) else f"the GCS did not answer ({exc.code().name})"
            raise LogsUnavailable(f"the log of job {job.submission_id} is on node "
                                  f"{node_id[:8]} ({ip}), which ran it: {why}") from None

    async def read_logs(self, job: gcs_pb2.SubmittedJob) -> str:
        """The whole log, or its last max_log_response_bytes with a note of what was cut."""
        sid = job.submission_id
        host = await self._log_host(job)
        limit = self.settings.max_log_response_bytes
        parts: List[bytes] = []
        try:
            # One read answers small logs; a larger one is read on from where its last
            # `limit` bytes start (a node sends at most runner.MAX_LOG_READ per call).
            first = await host.read_log(sid, -1, limit)
            skip = max(0, first.size - limit)
            pos = skip
            if first.offset == skip:
                parts.append(first.data)
                pos += len(first.data)
            while pos < first.size:
                chunk = await host.read_log(sid, pos, first.size - pos)
                if not chunk.data:
                    break
                parts.append(chunk.data)
                pos += len(chunk.data)
        except HostError as exc:
            raise LogsUnavailable(str(exc)) from None
        data = b"".join(parts).decode("utf-8", "replace")
        if skip:
            data = f"[... the first {skip} bytes of this log are not shown ...]\n" + data
        return data

    async def tail_logs(self, sid: str, poll_s: float = 0.1) -> AsyncIterator[str]:
        """The log so far, then what is appended, until the job has ended and all of
        its output has been sent. LogsUnavailable when the node holding it cannot be
        asked."""
        job = await self.get_record(sid)
        host = await self._log_host(job) if job is not None else None
        pos = 0
        partial = b""
        finished = False
        while True:
            if host is None:
                chunk_data, running = b"", False
            else:
                try:
                    chunk = await host.read_log(sid, pos, 1 << 20,
                                                REMOTE_TAIL_WAIT_S if host.remote else poll_s)
                except HostError as exc:
                    raise LogsUnavailable(str(exc)) from None
                chunk_data, running = chunk.data, chunk.running
            if chunk_data:
                pos += len(chunk_data)
                data = partial + chunk_data
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) < 1 << 16:
                    partial = data
                    continue
                if cut == 0:
                    cut = len(data)
                partial = data[cut:]
                yield data[:cut].decode("utf-8", "replace")
                continue
            if finished:
                if partial:
                    yield partial.decode("utf-8", "replace")
                return
            job = await self.get_record(sid)
            if job is None or job.status in records.TERMINAL:
                finished = True  # one more read catches what came in meanwhile
            if job is not None and (host is None or (job.driver_node_id and
                                                     job.driver_node_id != host.node_id)):
                # It was placed (or has run) elsewhere than where we were reading.
                newer = await self._log_host(job)
                if host is None or newer.node_id != host.node_id:
                    host, pos, partial = newer, 0, b""
                    continue
            if not finished and not running:
                await asyncio.sleep(poll_s)

    # ---- queries ------------------------------------------------------------------------

    async def get_record(self, sid: str) -> Optional[gcs_pb2.SubmittedJob]:
        run = self.running.get(sid)
        if run is not None:
            return run.job
        reply = await self.gcs.GetSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id=sid),
                                               timeout=GCS_TIMEOUT_S)
        return reply.job if reply.found else None

    async def _drivers(self) -> List[gcs_pb2.JobInfo]:
        return list((await self.gcs.GetAllJobs(common_pb2.Empty(), timeout=GCS_TIMEOUT_S)).jobs)

    async def find(self, job_or_submission_id: str
                   ) -> Tuple[Optional[gcs_pb2.SubmittedJob], Dict[str, Any]]:
        """(record, JobDetails) for a submission id or a driver's job id, as Ray's
        find_job_by_ids; JobNotFound when neither names a job."""
        drivers = await self._drivers()
        last = records.last_drivers(drivers)
        sid = job_or_submission_id
        for d in drivers:
            if d.job_id.hex() == job_or_submission_id:
                if not d.submission_id:
                    return None, records.driver_details(d)
                sid = d.submission_id
                break
        job = await self.get_record(sid)
        if job is None:
            raise JobNotFound(job_or_submission_id)
        return job, records.details(job, last.get(sid))

    async def list(self) -> List[Dict[str, Any]]:
        """Submitted jobs, then drivers started by hand, as Ray lists them."""
        listed, drivers = await asyncio.gather(
            self.gcs.ListSubmittedJobs(common_pb2.Empty(), timeout=GCS_TIMEOUT_S),
            self._drivers())
        last = records.last_drivers(drivers)
        jobs = {j.submission_id: j for j in listed.jobs}
        for sid, run in self.running.items():  # fresher than a record being written
            jobs[sid] = run.job
        out = [records.details(j, last.get(sid)) for sid, j in jobs.items()]
        out.extend(records.driver_details(d) for d in
                   sorted(drivers, key=lambda d: d.job_id.hex()) if not d.submission_id)
        return out

    async def stop(self, job_or_submission_id: str) -> bool:
        """True when the job was running (or waiting) and is being stopped."""
        job, det = await self.find(job_or_submission_id)
        if job is None:
            raise BadRequest("Can only stop submission type jobs")
        run = self.running.get(job.submission_id)
        if run is None or run.job.status in records.TERMINAL:
            return False
        log.info("stopping job %s", job.submission_id)
        run.stop.set()
        return True

    async def delete(self, job_or_submission_id: str) -> bool:
        job, _ = await self.find(job_or_submission_id)
        if job is None:
            raise BadRequest("Can only delete submission type jobs")
        sid = job.submission_id
        if sid in self.running:
            raise RuntimeError(f"Attempted to delete job '{sid}', but it is in a non-terminal "
                               f"state {self.running[sid].job.status}.")
        reply = await self.gcs.DeleteSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id=sid),
                                                  timeout=GCS_TIMEOUT_S)
        if not reply.ok:
            if not reply.found:
                raise JobNotFound(job_or_submission_id)
            raise RuntimeError(reply.error)
        if job.driver_node_ip and job.driver_node_ip != self.head.node_ip:
            try:
                await (await self._log_host(job)).delete_files(sid)
            except (LogsUnavailable, HostError) as exc:
                log.warning("job %s: its files on the node that ran it stay: %s", sid, exc)
        try:
            os.unlink(self.log_path(sid))
        except OSError:
            pass
        shutil.rmtree(self._job_dir(sid), ignore_errors=True)
        log.info("job %s deleted", sid)
        return True

    def version(self) -> Dict[str, str]:
        from runtime._version import __version__

        return {"version": "4", "ray_version": RAY_API_VERSION,
                "ray_commit": f"runtime-cluster-{__version__}",
                "session_name": os.path.basename(self.head.session_dir)}


#: The Ray release whose Jobs API this server speaks; Ray's clients check it
#: (>= 1.9 to submit, >= 2.2 for entrypoint resources, >= 2.8 for entrypoint_memory).
RAY_API_VERSION = "2.60.0"


__all__ = ["JobManager", "HeadInfo", "JobNotFound", "LogsUnavailable", "SUBMISSION_ID_ENV",
           "RAY_API_VERSION"]
