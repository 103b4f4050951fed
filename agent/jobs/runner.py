"""Entrypoints on this node: the part of a job that runs where its resources are.

Every agent has one JobRunner. Ray runs a JobSupervisor actor on the node that holds
the job's reservation; here that node's agent plays the part. The head's job manager
(manager.py) calls the runner of its own agent directly, and another node's runner
through that agent's TCP API (StartJobProcess and the other job RPCs, agent/service.py).
Either way the entrypoint gets the same treatment:

* its working directory: a package comes from this node's package store (the head
  pushes one the node lacks, PutJobPackage), an absolute directory must exist here;
* its environment: the agent's own without private variables, PATH led by the
  cluster's Python, the GCS address, this node's agent socket (so ``init()`` attaches
  to this node), and a 0600 token file that is deleted when the job ends, never the
  token itself;
* a supervised process group (process.py) whose exit status is recorded, and the
  log ``<session>/logs/job-driver-<id>.log`` on this node, which the head reads
  through ReadJobLog.

A job started for another node's manager is stopped when nobody watches it: its
manager keeps a WaitJobProcess call open while the job runs, and if none has been
open for ORPHAN_GRACE_S (the head's agent died), the job is stopped, as a job on the
head dies with the head's agent.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Dict, Optional, Set

from agent.config import Jobs as JobSettings
from agent.jobs import records
from agent.jobs.packages import PackageError, PackageStore, uri_name
from agent.jobs.process import JobProcess
from agent.jobs.records import BadRequest
from runtime import rpc
from runtime.private_fs import ensure_private_dir, write_private_file

log = logging.getLogger("agent.jobs")

#: Variables of the agent's own environment a job must not inherit: systemd's
#: notify/watchdog/socket-activation hand-offs and any token.
DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
            "LISTEN_FDNAMES", "JOURNAL_STREAM", "NODE_AGENT_TOKEN", "NODE_AGENT_TOKEN_FILE",
            rpc.TOKEN_ENV, "RUNTIME_PARENT_PID", "RUNTIME_ADDRESS")
SUBMISSION_ID_ENV = "RUNTIME_JOB_SUBMISSION_ID"
#: How long a job started for another node's manager runs with nobody watching it.
ORPHAN_GRACE_S = 10.0
#: How long an ended remote job's exit status is kept for a manager that asks late.
KEEP_EXITED_S = 600.0
LOG_POLL_S = 0.1
MAX_LOG_READ = 1 << 20


@dataclass(frozen=True)
class NodeContext:
    """What the runner needs of the node its agent runs now."""

    session_dir: str
    node_id: str          # hex
    node_ip: str
    gcs_address: str
    token: str
    socket_path: str      # this agent's unix socket ("" = none)
    is_head: bool

    def where(self) -> str:
        return (f"the head ({self.node_ip})" if self.is_head else
                f"node {self.node_id[:8]} ({self.node_ip})")


@dataclass
class StartOutcome:
    pid: int = 0
    missing_package: str = ""   # the node lacks this package: push it, then start again
    error_type: str = ""        # Ray's JobErrorType when the entrypoint was not started
    message: str = ""


@dataclass
class ExitInfo:
    exit_code: Optional[int]    # None: killed before it could report one
    reason: str = ""            # this node stopped it by itself, and why


@dataclass
class LogChunk:
    data: bytes
    offset: int                 # where data starts in the log
    size: int                   # the log's size when read
    running: bool               # the entrypoint still runs here


class JobUnknown(LookupError):
    """This node runs no such job (never did, or its agent restarted since)."""


class _NodeJob:
    def __init__(self, sid: str, session_dir: str, log_path: str, token_path: str,
                 process: JobProcess, remote: bool) -> None:
        self.sid = sid
        self.session_dir = session_dir
        self.log_path = log_path
        self.token_path = token_path
        self.process = process
        self.pid = process.pid
        self.remote = remote
        self.done = asyncio.Event()
        self.exit: Optional[ExitInfo] = None
        self.ended_at = 0.0
        self.watchers = 0
        self.stop_note = ""
        self.stop_reason = ""
        self.stopper: Optional[asyncio.Task] = None
        self.orphan_timer: Optional[asyncio.Task] = None


def log_file(session_dir: str, sid: str) -> str:
    return os.path.join(session_dir, "logs", f"job-driver-{sid}.log")


def append_log(path: str, text: str) -> None:
    """Add a line of ours to a job's log (created 0600 if need be)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot write the job log %s: %s", path, exc)


def read_log_file(path: str, offset: int, max_bytes: int) -> LogChunk:
    """max_bytes of the log from offset (offset < 0: its last max_bytes), never through
    a symlink planted at its name; an empty chunk when there is no log."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return LogChunk(b"", 0, 0, False)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        start = max(0, size - max_bytes) if offset < 0 else min(offset, size)
        fh.seek(start)
        return LogChunk(fh.read(max_bytes), start, size, False)


def check_submission_id(sid: str) -> str:
    if not records.valid_submission_id(sid):
        raise BadRequest(f"{sid!r} is not a submission id (1 to 128 letters, digits, '.', '_' "
                         f"or '-')")
    return sid


class JobRunner:
    """The entrypoints this node runs. Create and use it on the agent's loop."""

    def __init__(self, context: Callable[[], Optional[NodeContext]],
                 settings: Optional[JobSettings] = None) -> None:
        self._context = context
        self.settings = settings or JobSettings()
        self.jobs: Dict[str, _NodeJob] = {}
        self._starting: Dict[str, asyncio.Future] = {}
        self._tasks: Set[asyncio.Task] = set()
        self._stores: Dict[str, PackageStore] = {}
        self._session_dir = ""

    # ---- plumbing ---------------------------------------------------------------------

    def context(self) -> Optional[NodeContext]:
        ctx = self._context()
        if ctx is not None:
            self._session_dir = ctx.session_dir
        return ctx

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def packages(self, session_dir: str) -> PackageStore:
        store = self._stores.get(session_dir)
        if store is None:
            self._stores.clear()  # one session at a time
            store = self._stores[session_dir] = PackageStore(
                os.path.join(session_dir, "jobs", "_packages"), self.settings.max_package_bytes,
                self.settings.max_packages_bytes, self.settings.max_unpacked_bytes)
        return store

    def _require_context(self) -> NodeContext:
        ctx = self.context()
        if ctx is None:
            raise JobUnknown("this agent runs no node now (it is stopped or stopping)")
        return ctx

    # ---- packages ---------------------------------------------------------------------

    async def put_package(self, name: str, declared: Optional[int],
                          chunks: AsyncIterator[bytes]) -> int:
        """Store a package the head pushes, with this node's package limits."""
        ctx = self._require_context()
        return await self.packages(ctx.session_dir).store(name, declared, chunks)

    # ---- start ------------------------------------------------------------------------

    async def start(self, job, remote: bool = False) -> StartOutcome:
        """Start the job's entrypoint here (once: a second call answers with the first
        one's process). ``remote``: asked by another node's manager, which must keep
        watching it (module doc)."""
        sid = check_submission_id(job.submission_id)
        known = self.jobs.get(sid)
        if known is not None:
            return StartOutcome(pid=known.pid)
        pending = self._starting.get(sid)
        if pending is None:
            pending = self._starting[sid] = asyncio.ensure_future(self._start(job, remote))
            pending.add_done_callback(lambda _f: self._starting.pop(sid, None))
        return await asyncio.shield(pending)

    async def _start(self, job, remote: bool) -> StartOutcome:
        sid = job.submission_id
        ctx = self.context()
        if ctx is None:
            return StartOutcome(error_type=records.SUPERVISOR_START_FAILURE,
                                message="the node agent asked to run the entrypoint runs no "
                                        "node now (it is stopping or stopped)")
        job_dir = os.path.join(ctx.session_dir, "jobs", sid)
        log_path = log_file(ctx.session_dir, sid)
        token_path = os.path.join(job_dir, "token")
        env_spec = records.runtime_env(job) or {}
        wd = env_spec.get("working_dir")
        try:
            ensure_private_dir(os.path.join(ctx.session_dir, "jobs"))
            ensure_private_dir(job_dir)
            if not wd:
                cwd = job_dir
            elif "://" in wd:
                name = uri_name(wd)
                store = self.packages(ctx.session_dir)
                if not store.available(name):
                    return StartOutcome(missing_package=name)
                cwd = await asyncio.to_thread(store.working_dir, name)
            elif not os.path.isdir(wd):
                raise BadRequest(f"working_dir {wd} is not a directory on {ctx.where()}")
            else:
                cwd = wd
            write_private_file(token_path, ctx.token)
        except (PackageError, OSError, BadRequest) as exc:
            msg = f"Failed to set up the runtime environment for job {sid}: {exc}"
            append_log(log_path, msg + "\n")
            return StartOutcome(error_type=records.RUNTIME_ENV_SETUP_FAILURE, message=msg)
        env = self._environment(ctx, sid, env_spec, token_path)
        # The job's runtime_env, with working_dir as this node's copy: its drivers merge it
        # under their own (api.init), so the job's tasks and actors run in it too, as in Ray.
        job_env = dict(env_spec)
        if wd:
            job_env["working_dir"] = cwd
        env["RUNTIME_JOB_RUNTIME_ENV"] = json.dumps(job_env)
        append_log(log_path, f"Running entrypoint for job {sid}: {job.entrypoint}\n")
        proc = JobProcess(job.entrypoint, env, cwd, log_path, os.path.join(job_dir, "exit_status"))
        try:
            proc.start()
        except OSError as exc:
            _unlink(token_path)
            msg = (f"Failed to start the entrypoint of job {sid} on {ctx.where()} (cwd {cwd}): "
                   f"{exc.strerror or exc}")
            append_log(log_path, msg + "\n")
            return StartOutcome(error_type=records.ENTRYPOINT_START_ERROR, message=msg)
        nj = _NodeJob(sid, ctx.session_dir, log_path, token_path, proc, remote)
        self.jobs[sid] = nj
        self._spawn(self._monitor(nj))
        if remote:
            self._arm_orphan_timer(nj)
            log.info("job %s started here for the head's job manager: pid %d", sid, proc.pid)
        return StartOutcome(pid=proc.pid)

    @staticmethod
    def _environment(ctx: NodeContext, sid: str, env_spec: dict, token_path: str
                     ) -> Dict[str, str]:
        """The driver gets the cluster's address, this node's agent socket and a path to
        a 0600 copy of the token, not the token itself: a variable is inherited by every
        process the job starts and ends up in crash reports and `env` dumps, while the
        file can only be read by the agent's user and is deleted when the job ends."""
        env = {k: v for k, v in os.environ.items()
               if k not in DROP_ENV and not k.startswith("LISTEN_")}
        env.update(env_spec.get("env_vars") or {})
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH") or os.defpath
        if path.split(os.pathsep)[0] != bindir:
            path = bindir + os.pathsep + path
        env.update(PATH=path, RUNTIME_ADDRESS=ctx.gcs_address, NODE_AGENT_TOKEN_FILE=token_path,
                   PYTHONUNBUFFERED="1")
        if ctx.socket_path:
            env["NODE_AGENT_SOCKET"] = ctx.socket_path
        env[SUBMISSION_ID_ENV] = sid
        return env

    async def _monitor(self, nj: _NodeJob) -> None:
        rc: Optional[int] = None
        try:
            rc = await nj.process.wait()
        except Exception:  # still record an end, or its manager would wait forever
            log.exception("watching job %s's process failed", nj.sid)
        finally:
            nj.process.close()
            _unlink(nj.token_path)
            if nj.orphan_timer is not None:
                nj.orphan_timer.cancel()
        if nj.stop_note:
            append_log(nj.log_path, nj.stop_note if nj.stop_note.endswith("\n")
                       else nj.stop_note + "\n")
        nj.exit = ExitInfo(rc, nj.stop_reason)
        nj.ended_at = time.monotonic()
        nj.done.set()
        if nj.remote:
            log.info("job %s ended here with exit status %s%s", nj.sid, rc,
                     f" ({nj.stop_reason})" if nj.stop_reason else "")

    # ---- watch, stop ------------------------------------------------------------------

    def _job(self, sid: str) -> _NodeJob:
        nj = self.jobs.get(check_submission_id(sid))
        if nj is None:
            raise JobUnknown(f"no job {sid} runs here (it never started here, or this node's "
                             f"agent restarted since)")
        return nj

    async def wait(self, sid: str, timeout_s: Optional[float] = None,
                   watch: bool = False) -> Optional[ExitInfo]:
        """How the job ended; None when it still runs after timeout_s. ``watch``: the
        caller is the job's manager, so the job is not an orphan while this waits."""
        nj = self._job(sid)
        if watch:
            nj.watchers += 1
            if nj.orphan_timer is not None:
                nj.orphan_timer.cancel()
                nj.orphan_timer = None
        try:
            if timeout_s is None:
                await nj.done.wait()
            else:
                try:
                    await asyncio.wait_for(nj.done.wait(), timeout_s)
                except asyncio.TimeoutError:
                    return None
            return nj.exit
        finally:
            if watch:
                nj.watchers -= 1
                if nj.watchers == 0 and not nj.done.is_set():
                    self._arm_orphan_timer(nj)

    def _arm_orphan_timer(self, nj: _NodeJob) -> None:
        if nj.orphan_timer is None or nj.orphan_timer.done():
            nj.orphan_timer = self._spawn(self._orphaned(nj))

    async def _orphaned(self, nj: _NodeJob) -> None:
        await asyncio.sleep(ORPHAN_GRACE_S)
        if nj.watchers == 0 and not nj.done.is_set():
            why = (f"its job manager on the head stopped watching it {ORPHAN_GRACE_S:g} s ago "
                   f"(the head's node agent died or cannot reach this node)")
            log.warning("stopping job %s: %s", nj.sid, why)
            self.stop(nj.sid, self.settings.stop_grace_s,
                      note=f"Job {nj.sid} was stopped on this node: {why}.", reason=why)

    def stop(self, sid: str, grace_s: float, note: str = "", reason: str = "") -> bool:
        """SIGTERM to the job's process group now, SIGKILL after grace_s; ``note`` goes
        to its log once it has stopped. False when it does not run here."""
        nj = self.jobs.get(check_submission_id(sid))
        if nj is None or nj.done.is_set():
            return False
        nj.stop_note = nj.stop_note or note
        nj.stop_reason = nj.stop_reason or reason
        if nj.stopper is None:
            nj.stopper = self._spawn(nj.process.stop(grace_s))
        elif grace_s <= 0:
            nj.process.signal_group(9)
        return True

    def forget(self, sid: str) -> None:
        """The manager has recorded how the job ended: drop it."""
        nj = self.jobs.get(sid)
        if nj is not None and nj.done.is_set():
            del self.jobs[sid]

    def _prune(self) -> None:
        now = time.monotonic()
        for sid, nj in list(self.jobs.items()):
            if nj.done.is_set() and now - nj.ended_at > KEEP_EXITED_S:
                del self.jobs[sid]

    def sync(self) -> None:
        """Called as the node changes: jobs of a session that is no longer this agent's
        (the node stopped, or another started) are stopped, with the reason."""
        self._prune()
        ctx = self.context()
        current = ctx.session_dir if ctx is not None else ""
        for nj in list(self.jobs.values()):
            if nj.session_dir != current and not nj.done.is_set() and not nj.stop_reason:
                why = "the node agent stopped the node it ran on"
                self.stop(nj.sid, self.settings.stop_grace_s,
                          note=f"Job {nj.sid} was stopped: {why}.", reason=why)

    # ---- logs, files ------------------------------------------------------------------

    async def read_log(self, sid: str, offset: int, max_bytes: int = MAX_LOG_READ,
                       wait_s: float = 0.0) -> LogChunk:
        """Bytes of the job's log from offset (offset < 0: the last max_bytes); while
        the job runs here and there is nothing new, wait up to wait_s for more."""
        check_submission_id(sid)
        max_bytes = min(max_bytes, MAX_LOG_READ) if max_bytes > 0 else MAX_LOG_READ
        nj = self.jobs.get(sid)
        if nj is not None:
            path = nj.log_path
        else:
            ctx = self.context()
            session = ctx.session_dir if ctx is not None else self._session_dir
            if not session:
                raise JobUnknown("this agent has run no node yet")
            path = log_file(session, sid)
        deadline = time.monotonic() + wait_s
        while True:
            chunk = read_log_file(path, offset, max_bytes)
            chunk.running = nj is not None and not nj.done.is_set()
            if chunk.data or not chunk.running or time.monotonic() >= deadline:
                return chunk
            await asyncio.sleep(LOG_POLL_S)

    def delete_files(self, sid: str) -> bool:
        """Remove an ended job's log and directory on this node."""
        check_submission_id(sid)
        nj = self.jobs.get(sid)
        if nj is not None and not nj.done.is_set():
            raise BadRequest(f"job {sid} still runs on this node; stop it first")
        self.jobs.pop(sid, None)
        ctx = self.context()
        session = ctx.session_dir if ctx is not None else self._session_dir
        if not session:
            return False
        deleted = _unlink(log_file(session, sid))
        job_dir = os.path.join(session, "jobs", sid)
        if os.path.isdir(job_dir):
            shutil.rmtree(job_dir, ignore_errors=True)
            deleted = True
        return deleted

    # ---- shutdown ---------------------------------------------------------------------

    async def close(self) -> None:
        """Agent exit: stop every job that still runs here and wait for them."""
        for nj in list(self.jobs.values()):
            if not nj.done.is_set():
                why = "the node agent is stopping"
                self.stop(nj.sid, self.settings.stop_grace_s,
                          note=f"Job {nj.sid} was stopped: {why}.", reason=why)
        waits = [asyncio.ensure_future(nj.done.wait()) for nj in self.jobs.values()
                 if not nj.done.is_set()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.settings.stop_grace_s + 5)
            for nj in self.jobs.values():
                if not nj.done.is_set():
                    nj.process.signal_group(9)
            for w in pending:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._starting.values(), return_exceptions=True)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


__all__ = ["JobRunner", "NodeContext", "StartOutcome", "ExitInfo", "LogChunk", "JobUnknown",
           "ORPHAN_GRACE_S", "SUBMISSION_ID_ENV", "append_log", "read_log_file", "log_file"]
