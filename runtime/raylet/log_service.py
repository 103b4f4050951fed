"""The node's log files over gRPC (``LogService``), for the state API's
``list_logs``/``get_log``: Ray's log agent, served by the raylet on its port.

A driver reads the logs of a node on another host with the cluster token and
nothing else: no shell, no shared filesystem. What it can read is fenced in
here, since the token is all it takes:

- only regular files directly inside the node's session ``logs/`` directory: a
  name containing ``/`` or NUL, or ``.``/``..``, is refused before anything is
  opened;
- every file is opened relative to the directory's descriptor with
  ``O_NOFOLLOW``, so a symlink planted in the directory is refused rather than
  followed out of it, and checked to be a regular file on the open descriptor
  (``O_NONBLOCK``: a FIFO planted there cannot hang the open).

Reads never load a file whole: a tail is found by scanning back from the end in
blocks, and data goes out in chunks of at most ``CHUNK_BYTES``, so a multi-GB
log costs the raylet's loop one short read at a time.

A worker writes ``worker-<id>.out`` (stdout) and ``.err`` (stderr), and notes in
``worker-<id>.tasks`` the byte range of each task attempt in both
(runtime/core_worker/task_logs.py): a read for a task serves only its range, looked up
in that index, which is opened by the same fenced-in rules.
"""
from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import re
import stat
from typing import AsyncIterator, List, Optional, Tuple

import grpc

from runtime.core_worker.task_logs import FLUSH_INTERVAL_S, INDEX_SUFFIX, TaskRange, \
    find_range
from runtime.protocol import log_service_pb2, log_service_pb2_grpc

#: Bytes per LogChunk, and per read.
CHUNK_BYTES = 256 * 1024
#: How far back a tail scans per read.
_TAIL_BLOCK = 64 * 1024
#: How often ``follow`` looks for appended data when the caller gives no interval.
FOLLOW_INTERVAL_S = 0.5
#: What the supervisor writes at the top of every process's log (runtime/supervisor.py).
_HEADER = re.compile(rb"^=== (.+?) started pid (\d+) ")
_HEADER_BYTES = 512


class LogAccessError(Exception):
    """A request the service refuses or cannot serve, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_name(name: str, logs_dir: str) -> None:
    """Refuse anything but a plain file name: the only files served are those directly
    inside the logs directory, whatever the name tries."""
    if not name:
        raise LogAccessError(grpc.StatusCode.INVALID_ARGUMENT,
                             "no log file named: pass a file name as list_logs() shows it")
    if "/" in name or "\0" in name or name in (".", "..") or len(name) > 255:
        raise LogAccessError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"refusing log file name {name!r}: only plain file names inside the node's log "
            f"directory {logs_dir} are served (no '/', no '..'); list them with list_logs()")


def open_log(logs_dir: str, name: str) -> int:
    """A read-only descriptor of logs_dir/name, which must be a regular file reached
    without following a symlink."""
    check_name(name, logs_dir)
    try:
        dir_fd = os.open(logs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LogAccessError(grpc.StatusCode.NOT_FOUND,
                             f"the node's log directory {logs_dir} cannot be opened: "
                             f"{exc.strerror}") from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise LogAccessError(grpc.StatusCode.NOT_FOUND,
                                 f"no log file {name!r} in {logs_dir}; list them with "
                                 f"list_logs()") from None
        if exc.errno == errno.ELOOP:
            raise LogAccessError(grpc.StatusCode.PERMISSION_DENIED,
                                 f"{name!r} in {logs_dir} is a symbolic link; refusing to "
                                 f"follow it out of the log directory") from None
        raise LogAccessError(grpc.StatusCode.PERMISSION_DENIED,
                             f"cannot open {name!r} in {logs_dir}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogAccessError(grpc.StatusCode.PERMISSION_DENIED,
                             f"{name!r} in {logs_dir} is not a regular file; refusing to read it")
    return fd


def header_pid(fd: int) -> int:
    """The pid in the supervisor's header on the file's first line (0: none)."""
    m = _HEADER.match(os.pread(fd, _HEADER_BYTES, 0))
    return int(m.group(2)) if m else 0


def list_files(logs_dir: str, glob: str = "") -> List[log_service_pb2.LogFileInfo]:
    """The regular files directly inside logs_dir whose names match glob, by name."""
    out = []
    try:
        entries = sorted(os.scandir(logs_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for entry in entries:
        if glob and not fnmatch.fnmatchcase(entry.name, glob):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = open_log(logs_dir, entry.name)
        except LogAccessError:
            continue  # replaced by something else since the scan
        try:
            st = os.fstat(fd)
            pid = header_pid(fd)
        finally:
            os.close(fd)
        out.append(log_service_pb2.LogFileInfo(name=entry.name, size=st.st_size,
                                               mtime=st.st_mtime, pid=pid))
    return out


#: What a process with its streams apart (a worker) names its two files.
STREAM_SUFFIXES = (".out", ".err")


def find_by_pid(logs_dir: str, pid: int, suffix: str = "") -> str:
    """The file whose header names pid (the newest, should a pid have been reused). A
    worker has two, stdout's and stderr's: `suffix` ("out", "err"; default "out") picks
    one; a process with one log is served that one."""
    want = f".{suffix or 'out'}"
    best: Optional[Tuple[int, float, str]] = None
    for info in list_files(logs_dir):
        if info.pid != pid:
            continue
        if info.name.endswith(STREAM_SUFFIXES) and not info.name.endswith(want):
            continue  # the worker's other stream
        rank = (1 if info.name.endswith(want) else 0, info.mtime, info.name)
        if best is None or rank > best:
            best = rank
    if best is None:
        raise LogAccessError(grpc.StatusCode.NOT_FOUND,
                             f"no log in {logs_dir} was written by pid {pid} (every process "
                             f"this node started has a log whose first line names its pid)")
    return best[2]


def task_range(logs_dir: str, name: str, task_id_hex: str, attempt: int) -> TaskRange:
    """The byte ranges that a task attempt wrote to the worker log `name` (its .out or
    .err) and its other stream, from the worker's index."""
    stem, dot, ext = name.rpartition(".")
    if not dot or f".{ext}" not in STREAM_SUFFIXES:
        raise LogAccessError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{name!r} is not a worker's .out or .err log, so it has no "
                             f"per-task ranges")
    index = stem + INDEX_SUFFIX
    try:
        fd = open_log(logs_dir, index)
    except LogAccessError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
        raise LogAccessError(grpc.StatusCode.NOT_FOUND,
                             f"the worker of {name!r} recorded no per-task output ranges (no "
                             f"{index} in {logs_dir}); read its whole log by file name, "
                             f"actor or pid") from None
    try:
        found = find_range(fd, task_id_hex, attempt)
    finally:
        os.close(fd)
    if found is None:
        raise LogAccessError(grpc.StatusCode.NOT_FOUND,
                             f"the worker of {name!r} recorded no output range for task "
                             f"{task_id_hex} attempt {attempt} in {index} (a worker "
                             f"killed within {FLUSH_INTERVAL_S:g}s of the task's start or "
                             f"end may not have); read its whole log by file name or pid")
    return found


def tail_offset(fd: int, start: int, end: int, lines: int) -> int:
    """Where the last ``lines`` lines of [start, end) begin. A newline ending the range
    ends its last line; it does not start another."""
    if lines <= 0 or end <= start:
        return start
    scan_end = end
    if os.pread(fd, 1, end - 1) == b"\n":
        scan_end -= 1
    need = lines
    pos = scan_end
    while pos > start:
        size = min(_TAIL_BLOCK, pos - start)
        pos -= size
        buf = os.pread(fd, size, pos)
        i = len(buf)
        while True:
            j = buf.rfind(b"\n", 0, i)
            if j < 0:
                break
            need -= 1
            if need == 0:
                return pos + j + 1
            i = j
    return start


def read_range(fd: int, start: int, end: int) -> List[bytes]:
    """[start, end) in chunks of at most CHUNK_BYTES (what a file that shrank meanwhile
    still has)."""
    out = []
    pos = start
    while pos < end:
        data = os.pread(fd, min(CHUNK_BYTES, end - pos), pos)
        if not data:
            break
        out.append(data)
        pos += len(data)
    return out


class LogService(log_service_pb2_grpc.LogServiceServicer):
    """The servicer, over one node's logs directory (``<session>/logs``)."""

    def __init__(self, logs_dir: str) -> None:
        self.logs_dir = os.path.abspath(logs_dir)

    async def ListLogs(self, request: log_service_pb2.ListLogsRequest,
                       context: grpc.aio.ServicerContext) -> log_service_pb2.ListLogsReply:
        files = await asyncio.to_thread(list_files, self.logs_dir, request.glob)
        return log_service_pb2.ListLogsReply(files=files, logs_dir=self.logs_dir)

    async def ReadLog(self, request: log_service_pb2.ReadLogRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[log_service_pb2.LogChunk]:
        task: Optional[TaskRange] = None
        try:
            name = request.filename
            if not name:
                if request.pid <= 0:
                    raise LogAccessError(grpc.StatusCode.INVALID_ARGUMENT,
                                         "name a log file, or a pid whose log to read")
                name = await asyncio.to_thread(find_by_pid, self.logs_dir, request.pid,
                                               request.suffix)
            fd = open_log(self.logs_dir, name)
            if request.task_id:
                try:
                    task = await asyncio.to_thread(task_range, self.logs_dir, name,
                                                   request.task_id.hex(), request.task_attempt)
                except BaseException:
                    os.close(fd)
                    raise
        except LogAccessError as exc:
            await context.abort(exc.code, exc.message)
            return
        stream = "err" if name.endswith(".err") else "out"
        try:
            size = os.fstat(fd).st_size
            if task is not None:
                start, task_end = task.of(stream)
                start = min(start, size)
                end = size if task_end is None else min(task_end, size)
            else:
                start = min(max(0, request.start_offset), size)
                end = min(request.end_offset, size) if request.end_offset > 0 else size
            if request.from_end:
                start = end
            elif request.tail_lines > 0:
                start = tail_offset(fd, start, end, request.tail_lines)
            first = True
            for data in read_range(fd, start, end):
                yield log_service_pb2.LogChunk(data=data, filename=name if first else "")
                first = False
            if first:
                yield log_service_pb2.LogChunk(filename=name)
            if not request.follow or request.end_offset > 0 or (task and task.finished):
                return
            interval = request.interval_s if request.interval_s > 0 else FOLLOW_INTERVAL_S
            pos = end
            while True:
                await asyncio.sleep(interval)
                size = os.fstat(fd).st_size
                if task is not None:  # a running task: read on until the worker notes its end
                    task = await asyncio.to_thread(task_range, self.logs_dir, name,
                                                   request.task_id.hex(), request.task_attempt)
                    if task.finished:
                        size = min(size, task.of(stream)[1])
                if size < pos:  # truncated: what is there now is new
                    pos = 0
                for data in read_range(fd, pos, size):
                    pos += len(data)
                    yield log_service_pb2.LogChunk(data=data)
                if task is not None and task.finished:
                    return
        except LogAccessError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            os.close(fd)


def add_to_server(server: grpc.aio.Server, session_dir: str) -> LogService:
    """Serve the logs of the node whose session directory this is on server."""
    service = LogService(os.path.join(session_dir, "logs"))
    log_service_pb2_grpc.add_LogServiceServicer_to_server(service, server)
    return service
