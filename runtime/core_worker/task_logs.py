"""Which bytes of its worker's stdout and stderr logs each task attempt wrote (Ray's
``task_log_info``), so ``get_log(task_id=...)`` returns that task's lines only.

A worker's stdout is ``<session>/logs/worker-<id>.out`` and its stderr ``.err`` (opened
by the supervisor, O_APPEND; the worker is their only writer). The executor calls
:func:`begin` and :func:`end` around each task attempt and actor call; each flushes
Python's buffers and reads both files' sizes (``lseek(SEEK_END)`` of fds 1 and 2,
keeping the GIL: see :func:`_size_readers`): nothing else on the task's path, which
must stay cheap (about 3 us a task in all). Actor calls are left out unless
``RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING=1`` (Ray's ``RAY_ENABLE_RECORD_ACTOR_TASK_
LOGGING``, off by default there too): an actor's output is read as the actor's log.

The offsets go to the worker's index file ``worker-<id>.tasks`` in the same directory,
written by one daemon thread at most every ``FLUSH_INTERVAL_S`` (and at exit), one text
line per record:

* ``T <task id hex> <attempt> <out start> <err start> <out end> <err end>``: a finished
  attempt;
* ``R <task id hex> <attempt> <out start> <err start>``: an attempt still running when
  the thread last wrote (it reads from there to the current end of the file).

An attempt's ``T`` line always follows its ``R`` line, so a reader scanning back from
the end of the index finds the latest word on it first (:func:`find_range`, used by the
node's LogService). Concurrent actor calls (threaded or async) share the files, so the
range of one holds whatever the others printed meanwhile, as in Ray.
"""
from __future__ import annotations

import atexit
import collections
import functools
import os
import stat
import sys
import threading
from typing import Callable, Deque, Dict, List, Optional, Tuple

__all__ = ["INDEX_SUFFIX", "FLUSH_INTERVAL_S", "RECORD_ACTOR_CALLS_ENV", "worker_log_stem",
           "configure", "begin", "end", "close", "find_range", "TaskRange"]

#: The index file's suffix: ``worker-<id>.tasks`` beside ``worker-<id>.out``/``.err``.
INDEX_SUFFIX = ".tasks"
#: How long a record may wait in memory before the index thread writes it.
FLUSH_INTERVAL_S = 0.1
#: Set to 1 in a worker's environment to record actor calls' ranges too.
RECORD_ACTOR_CALLS_ENV = "RUNTIME_ENABLE_RECORD_ACTOR_TASK_LOGGING"
#: How far back find_range scans per read.
_SCAN_BLOCK = 64 * 1024

_Key = Tuple[bytes, int]


def worker_log_stem(worker_id_hex: str) -> str:
    """``worker-<first 8 hex digits of the id>``: the name of a worker's process and the
    stem of its log files (``.out``, ``.err``, ``.tasks``)."""
    return f"worker-{worker_id_hex[:8]}"


class _Index:
    """The records of one worker process, and the thread that writes them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done: Deque[tuple] = collections.deque()     # finished, not written yet
        self.running: Dict[_Key, List] = {}                # key -> [out, err, announced]
        self.armed = False
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.fd: Optional[int] = None
        self.write_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="task-log-index", daemon=True)
        self.thread.start()

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            self.wake.set()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.wake.wait()
            self.wake.clear()
            if self.stop.wait(FLUSH_INTERVAL_S):
                break
            # Records added from here on arm the next round; earlier ones are written now.
            self.armed = False
            self.write()

    def write(self) -> None:
        """Write what is pending: finished attempts first, then running ones not yet
        announced (so an R line never follows its T line)."""
        with self.write_lock:
            parts: List[str] = []
            while True:
                try:
                    task_id, attempt, out0, err0, out1, err1 = self.done.popleft()
                except IndexError:
                    break
                parts.append(f"T {task_id.hex()} {attempt} {out0} {err0} {out1} {err1}\n")
            for (task_id, attempt), rec in self.running.copy().items():
                if not rec[2]:
                    rec[2] = True
                    parts.append(f"R {task_id.hex()} {attempt} {rec[0]} {rec[1]}\n")
            if not parts:
                return
            data = "".join(parts).encode()
            try:
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                      | os.O_CLOEXEC, 0o644)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:  # a full disk costs the per-task ranges, not the task
                print(f"runtime: cannot write the task log index {self.path}: {exc}",
                      file=sys.__stderr__)

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=2.0)
        self.write()
        with self.write_lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


_index: Optional[_Index] = None


def configure(logs_dir: str, stem: str) -> Optional[str]:
    """Worker start: record task ranges in ``<logs_dir>/<stem>.tasks``; returns its path,
    or None when stdout or stderr is not a regular file (a worker started by hand on a
    terminal has no offsets to note). Until this is called (drivers, tests) begin and
    end do nothing."""
    global _index
    close()
    try:
        if not all(stat.S_ISREG(os.fstat(fd).st_mode) for fd in (1, 2)):
            return None
    except OSError:
        return None
    _index = _Index(os.path.join(logs_dir, stem + INDEX_SUFFIX))
    return _index.path


def _size_readers() -> Tuple[Callable[[], int], Callable[[], int]]:
    """Readers of the sizes of the files of fds 1 and 2 that keep the GIL.

    ``os.lseek``/``os.fstat`` release the GIL around the system call, and in a busy
    worker (an async actor: its loop thread and runtime-io hand calls back and forth)
    every release wakes a waiting thread for nothing: four per call cost async actor
    calls a quarter of their rate. libc's lseek called through ``ctypes.PyDLL`` keeps
    the GIL (0.3 us a call). ``lseek(SEEK_END)`` is the size, as fstat's st_size; both files
    are O_APPEND, so moving the offset moves nothing."""
    try:
        import ctypes

        if ctypes.sizeof(ctypes.c_long) != 8:
            raise OSError("off_t is not 64 bits here")
        lseek = ctypes.PyDLL(None).lseek
        lseek.restype = ctypes.c_int64
        # No argtypes: converting arguments by them doubles the call's cost. The fds and
        # whence are C ints, as ctypes passes a Python int; the offset is built once.
        zero: object = ctypes.c_int64(0)
    except (ImportError, OSError, AttributeError):
        lseek, zero = os.lseek, 0
    return (functools.partial(lseek, 1, zero, os.SEEK_END),
            functools.partial(lseek, 2, zero, os.SEEK_END))


_out_size, _err_size = _size_readers()


def _record_actor_calls() -> bool:
    """Whether actor calls get ranges too. Off by default, as in Ray (its
    RAY_ENABLE_RECORD_ACTOR_TASK_LOGGING): an actor's calls are read as the actor's log
    (get_log(actor_id=...)), and a busy async actor would pay for every call."""
    return any(os.environ.get(name, "").lower() in ("1", "true")
               for name in (RECORD_ACTOR_CALLS_ENV, "RAY_ENABLE_RECORD_ACTOR_TASK_LOGGING"))


_actor_calls = _record_actor_calls()


def begin(task_id: bytes, attempt: int, actor_call: bool = False) -> None:
    """A task attempt (or, with actor_call, an actor method call) starts on this thread:
    note where its output begins."""
    index = _index
    if index is None or (actor_call and not _actor_calls):
        return
    try:
        sys.stdout.flush()  # no system call when nothing is buffered
        sys.stderr.flush()
        out, err = _out_size(), _err_size()
    except (OSError, ValueError, AttributeError):  # a closed or replaced stream
        return
    if out < 0 or err < 0:
        return
    index.running[(task_id, attempt)] = [out, err, False]
    if not index.armed:
        index.arm()


def end(task_id: bytes, attempt: int, actor_call: bool = False) -> None:
    """The attempt begun with :func:`begin` ended: note where its output ends."""
    index = _index
    if index is None:
        return
    began = index.running.pop((task_id, attempt), None)
    if began is None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = _out_size(), _err_size()
    except (OSError, ValueError, AttributeError):
        return
    if out < 0 or err < 0:
        return
    index.done.append((task_id, attempt, began[0], began[1], out, err))
    if not index.armed:
        index.arm()


def close() -> None:
    """Write what is pending and stop the index thread (worker exit; also at exit)."""
    global _index
    index, _index = _index, None
    if index is not None:
        index.close()


atexit.register(close)


class TaskRange:
    """Where one attempt's output lies in the worker's ``.out`` and ``.err`` files; the
    ends are None while it runs (or when the worker died during it)."""

    __slots__ = ("out_start", "err_start", "out_end", "err_end")

    def __init__(self, out_start: int, err_start: int, out_end: Optional[int],
                 err_end: Optional[int]) -> None:
        self.out_start, self.err_start = out_start, err_start
        self.out_end, self.err_end = out_end, err_end

    @property
    def finished(self) -> bool:
        return self.out_end is not None

    def of(self, suffix: str) -> Tuple[int, Optional[int]]:
        """(start, end) in the file of `suffix` ("out" or "err")."""
        if suffix == "err":
            return self.err_start, self.err_end
        return self.out_start, self.out_end

    def __repr__(self) -> str:
        return (f"TaskRange(out={self.out_start}..{self.out_end}, "
                f"err={self.err_start}..{self.err_end})")


def _parse(line: bytes, key: bytes) -> Optional[TaskRange]:
    if line[2:2 + len(key)] != key:
        return None
    fields = line.split()
    try:
        if line.startswith(b"T ") and len(fields) == 7:
            return TaskRange(int(fields[3]), int(fields[4]), int(fields[5]), int(fields[6]))
        if line.startswith(b"R ") and len(fields) == 5:
            return TaskRange(int(fields[3]), int(fields[4]), None, None)
    except ValueError:
        pass
    return None


def find_range(fd: int, task_id_hex: str, attempt: int, size: Optional[int] = None
               ) -> Optional[TaskRange]:
    """The latest record of (task, attempt) in an index file open as `fd`, scanning back
    from its end (recent tasks are the ones asked about); None when it has none."""
    key = f"{task_id_hex.lower()} {attempt} ".encode()
    pos = os.fstat(fd).st_size if size is None else size
    carry = b""
    while pos > 0:
        step = min(_SCAN_BLOCK, pos)
        pos -= step
        lines = (os.pread(fd, step, pos) + carry).split(b"\n")
        carry = lines.pop(0) if pos > 0 else b""  # maybe cut at the block's start
        for line in reversed(lines):
            found = _parse(line, key)
            if found is not None:
                return found
    if carry:
        return _parse(carry, key)
    return None
