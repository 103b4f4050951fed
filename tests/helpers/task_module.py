"""A module the driver can import (tests/ is on its sys.path via pytest's rootdir
insertion) but a worker can import only if the driver's sys.path reached it."""
from __future__ import annotations

import os
import time

MARKER = "helpers.task_module loaded"


def square(x):
    return x * x


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm2(self):
        return self.x * self.x + self.y * self.y


def wait_for_path(path: str, timeout: float = 30.0) -> bool:
    """Used inside tasks: block until `path` exists (a gate the test opens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


def bump_counter(path: str) -> int:
    """Increment the integer in `path` (0 when absent); returns the new value.

    Each attempt of a task runs in one process at a time, so no locking is needed.
    """
    try:
        with open(path) as fh:
            n = int(fh.read() or 0)
    except FileNotFoundError:
        n = 0
    n += 1
    with open(path, "w") as fh:
        fh.write(str(n))
        fh.flush()
        os.fsync(fh.fileno())
    return n


def read_counter(path: str) -> int:
    try:
        with open(path) as fh:
            return int(fh.read() or 0)
    except FileNotFoundError:
        return 0
