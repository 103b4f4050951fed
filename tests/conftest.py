"""Shared fixtures: real clusters on loopback, cleaned up by PID.

``cluster`` is a module-scoped private cluster (2 CPUs) for tests that only
need a working runtime; tests that need their own configuration call
``runtime.init(...)`` themselves inside ``fresh_runtime``. Every fixture checks
that the processes it started are gone afterwards.
"""
from __future__ import annotations

import time
from typing import Callable, List

import psutil
import pytest

import runtime


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll predicate() until truthy or raise AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last value {last!r})")


def cluster_pids() -> List[int]:
    """PIDs of every process started under this test process (the private cluster)."""
    return [p.pid for p in psutil.Process().children(recursive=True)]


def assert_all_gone(pids: List[int], timeout: float = 10.0) -> None:
    def gone():
        return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                   for pid in pids)
    try:
        wait_for(gone, timeout, message=f"processes {pids} to exit")
    finally:
        for pid in pids:  # never leave anything behind, even when the assertion fails
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def _stop_runtime() -> None:
    pids = cluster_pids()
    runtime.shutdown()
    assert_all_gone(pids)


@pytest.fixture(scope="module")
def cluster():
    """A private 2-CPU cluster shared by a test module."""
    if runtime.is_initialized():
        runtime.shutdown()
    ctx = runtime.init(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield ctx
    _stop_runtime()


@pytest.fixture
def actors(cluster):
    """Collects actor handles; every one is killed at the end of the test."""
    handles = []
    yield handles
    for h in handles:
        try:
            runtime.kill(h)
        except Exception:
            pass


@pytest.fixture
def fresh_runtime():
    """For tests that call runtime.init() themselves; shuts down and checks for leftovers."""
    if runtime.is_initialized():
        runtime.shutdown()
    yield runtime
    _stop_runtime()
