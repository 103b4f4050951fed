"""The head's job manager: runs submitted entrypoints and keeps their records.

Ray runs each job through a JobSupervisor actor. Here the head agent itself
supervises each job as a process group (agent/jobs/process.py), which costs no
worker start, so a trivial job goes from submission to SUCCEEDED in tens of
milliseconds. The records live in the GCS (runtime/gcs/jobs.py): every reader
(this API on any agent, agentctl, the state API, raytop) sees the same table.

A job whose submission asks for entrypoint resources first reserves them with a
one-bundle placement group, as Ray's supervisor actor holds them, and starts once
the group is placed; until then it is PENDING with Ray's "waiting for resources"
message. The reservation is released when the job ends.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Set, Tuple

import grpc

from agent.config import Jobs as JobSettings
from agent.jobs import records
from agent.jobs.packages import PackageError, PackageStore, uri_name
from agent.jobs.process import JobProcess
from agent.jobs.records import BadRequest
from runtime import ids, rpc
from runtime.private_fs import ensure_private_dir, write_private_file
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc

log = logging.getLogger("agent.jobs")

#: Variables of the agent's own environment a job must not inherit: systemd's
#: notify/watchdog/socket-activation hand-offs and any token.
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
             "LISTEN_FDNAMES", "JOURNAL_STREAM", "NODE_AGENT_TOKEN", "NODE_AGENT_TOKEN_FILE",
             rpc.TOKEN_ENV, "RUNTIME_PARENT_PID", "RUNTIME_ADDRESS")
#: Where the head publishes this API's address in the GCS KV (agentctl job, raytop).
KV_NAMESPACE = "dashboard"
KV_KEY = b"jobs_http_address"
SUBMISSION_ID_ENV = "RUNTIME_JOB_SUBMISSION_ID"
GCS_TIMEOUT_S = 10.0
#: How long a status update keeps retrying while the GCS restarts.
UPDATE_RETRY_S = 30.0
REPUBLISH_S = 5.0
#: Ray puts this much of the log's end into a failed job's message.
FAILURE_LOG_CHARS = 20_000


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


class _Running:
    """What the manager holds for a job it runs."""

    def __init__(self, job: gcs_pb2.SubmittedJob) -> None:
        self.job = job
        self.stop = asyncio.Event()
        self.process: Optional[JobProcess] = None
        self.task: Optional[asyncio.Task] = None


class JobManager:
    def __init__(self, head: HeadInfo, settings: Optional[JobSettings] = None) -> None:
        self.head = head
        self.settings = settings or JobSettings()
        self.jobs_dir = os.path.join(head.session_dir, "jobs")
        self.logs_dir = os.path.join(head.session_dir, "logs")
        self.packages = PackageStore(os.path.join(self.jobs_dir, "_packages"),
                                     self.settings.max_package_bytes,
                                     self.settings.max_packages_bytes,
                                     self.settings.max_unpacked_bytes)
        self._channel = rpc.aio_channel(head.gcs_address, head.token)
        self.gcs = gcs_pb2_grpc.GcsStub(self._channel)
        self.running: Dict[str, _Running] = {}
        self._tasks: Set[asyncio.Task] = set()
        self._republisher: Optional[asyncio.Task] = None
        self._closing = False

    # ---- lifecycle ----------------------------------------------------------------------

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
                                 f"directory on the head, or a package the client uploads "
                                 f"(JobSubmissionClient and `ray job submit --working-dir` do)")
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
        job_dir = self._job_dir(sid)
        reservation: Optional[bytes] = None
        try:
            wanted = records.resources_requested(job)
            if wanted:
                reservation = await self._reserve(run, wanted)
                if reservation is None:
                    return
            if run.stop.is_set():
                await self._update(run, records.STOPPED)
                return
            try:
                cwd, env = self._prepare(job, job_dir)
            except (PackageError, OSError, BadRequest) as exc:
                msg = f"Failed to set up the runtime environment for job {sid}: {exc}"
                self._append_log(sid, msg + "\n")
                await self._update(run, records.FAILED, message=msg,
                                   error_type=records.RUNTIME_ENV_SETUP_FAILURE)
                return
            self._append_log(sid, f"Running entrypoint for job {sid}: {job.entrypoint}\n")
            proc = JobProcess(job.entrypoint, env, cwd, self.log_path(sid),
                              os.path.join(job_dir, "exit_status"))
            try:
                pid = proc.start()
            except OSError as exc:
                msg = (f"Failed to start the entrypoint of job {sid} (cwd {cwd}): "
                       f"{exc.strerror or exc}")
                self._append_log(sid, msg + "\n")
                await self._update(run, records.FAILED, message=msg,
                                   error_type=records.ENTRYPOINT_START_ERROR)
                return
            run.process = proc
            await self._update(run, records.RUNNING, driver_pid=pid,
                               driver_node_id=self.head.node_id, driver_node_ip=self.head.node_ip,
                               driver_agent_http_address=self.head.http_address)
            await self._wait(run, proc)
        except asyncio.CancelledError:
            if run.process is not None:
                run.process.signal_group(9)
            raise
        except Exception as exc:  # a bug here must still end the job, with the reason
            log.exception("supervising job %s failed", sid)
            if run.job.status not in records.TERMINAL:
                await self._update(run, records.FAILED, message=f"the job's supervisor failed: "
                                   f"{type(exc).__name__}: {exc}",
                                   error_type=records.SUPERVISOR_DIED)
        finally:
            if run.process is not None:
                run.process.close()
            if reservation is not None:
                await self._release(reservation)
            try:
                os.unlink(os.path.join(job_dir, "token"))
            except OSError:
                pass
            self.running.pop(sid, None)

    async def _wait(self, run: _Running, proc: JobProcess) -> None:
        sid = run.job.submission_id
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(run.stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if run.stop.is_set() and not waiter.done():
            await proc.stop(self.settings.stop_grace_s)
            await waiter
            self._append_log(sid, f"Job {sid} was stopped.\n" if not self._closing else
                             f"Job {sid} was stopped: the head's node agent is stopping.\n")
            msg = None if not self._closing else ("Job was stopped: the head's node agent "
                                                 "stopped the node.")
            await self._update(run, records.STOPPED, **({"message": msg} if msg else {}))
            return
        rc = waiter.result()
        if rc == 0:
            log.info("job %s succeeded", sid)
            await self._update(run, records.SUCCEEDED, driver_exit_code=0)
            return
        tail = self._log_tail(sid, FAILURE_LOG_CHARS)
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

    def _prepare(self, job: gcs_pb2.SubmittedJob, job_dir: str) -> Tuple[str, Dict[str, str]]:
        """The entrypoint's working directory and environment (module doc of process.py).

        The driver gets the cluster's address and a path to a 0600 copy of the token,
        not the token itself: a variable is inherited by every process the job starts
        and ends up in crash reports and `env` dumps, while the file can only be read
        by the agent's user and is deleted when the job ends."""
        ensure_private_dir(job_dir)
        env_spec = records.runtime_env(job) or {}
        wd = env_spec.get("working_dir")
        if not wd:
            cwd = job_dir
        elif "://" in wd:
            cwd = self.packages.working_dir(uri_name(wd))
        elif not os.path.isdir(wd):
            raise BadRequest(f"working_dir {wd} is not a directory on the head "
                             f"({self.head.node_ip})")
        else:
            cwd = wd
        token_path = os.path.join(job_dir, "token")
        write_private_file(token_path, self.head.token)
        env = {k: v for k, v in os.environ.items()
               if k not in _DROP_ENV and not k.startswith("LISTEN_")}
        env.update(env_spec.get("env_vars") or {})
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH") or os.defpath
        if path.split(os.pathsep)[0] != bindir:
            path = bindir + os.pathsep + path
        env.update(PATH=path, RUNTIME_ADDRESS=self.head.gcs_address,
                   NODE_AGENT_TOKEN_FILE=token_path, PYTHONUNBUFFERED="1")
        env[SUBMISSION_ID_ENV] = job.submission_id
        return cwd, env

    # ---- entrypoint resources -------------------------------------------------------------

    async def _reserve(self, run: _Running, wanted: Dict[str, float]) -> Optional[bytes]:
        """Hold the entrypoint's resources with a one-bundle placement group on the head;
        None when the job ended (stopped) while it waited."""
        pg_id = ids.random_id(ids.PLACEMENT_GROUP_ID_SIZE)
        spec = gcs_pb2.PlacementGroupSpec(
            placement_group_id=pg_id, name=f"_job_entrypoint_{run.job.submission_id}",
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
            if got.found and got.info.state == "CREATED":
                node = got.info.bundle_nodes[0].hex() if got.info.bundle_nodes else ""
                if node and node != self.head.node_id:
                    await self._release(pg_id)
                    await self._update(
                        run, records.FAILED, error_type=records.UNSCHEDULABLE,
                        message=f"the entrypoint's resources {wanted} are only free on node "
                                f"{node[:8]}, not on the head; this cluster runs entrypoints "
                                f"on the head: submit without entrypoint resources, or give "
                                f"the head those resources")
                    return None
                return pg_id
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
        try:
            fd = os.open(self.log_path(sid), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot write the log of job %s: %s", sid, exc)

    def _log_tail(self, sid: str, chars: int) -> str:
        try:
            with open(self.log_path(sid), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - chars * 4))
                return fh.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return ""

    def read_logs(self, sid: str) -> str:
        """The whole log, or its last max_log_response_bytes with a note of what was cut."""
        limit = self.settings.max_log_response_bytes
        try:
            with open(self.log_path(sid), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                skip = max(0, size - limit)
                fh.seek(skip)
                data = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        if skip:
            data = f"[... the first {skip} bytes of this log are not shown ...]\n" + data
        return data

    async def tail_logs(self, sid: str, poll_s: float = 0.1) -> AsyncIterator[str]:
        """The log so far, then what is appended, until the job has ended and all of
        its output has been sent."""
        path = self.log_path(sid)
        pos = 0
        partial = b""
        finished = False
        while True:
            try:
                with open(path, "rb") as fh:
                    fh.seek(pos)
                    data = fh.read(1 << 20)
            except FileNotFoundError:
                data = b""
            if data:
                pos += len(data)
                data = partial + data
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
            if sid not in self.running:
                job = await self.get_record(sid)
                if job is None or job.status in records.TERMINAL:
                    finished = True  # one more read catches what came in meanwhile
                    continue
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
        for path in (self.log_path(sid),):
            try:
                os.unlink(path)
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
