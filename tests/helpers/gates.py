"""Synchronisation used *inside* tasks and actors: files in a temp dir that the test
creates (gates) or that tasks create (barriers). Importable by workers, since the
driver's sys.path reaches them."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path


def await_path(path: str, timeout: float = 60.0) -> None:
    """Block until `path` exists; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def meet(directory: str, parties: int, timeout: float = 30.0) -> None:
    """Arrive, then wait until `parties` callers arrived: they run at the same time."""
    Path(directory, f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {parties} tasks ran "
                               f"at the same time")
        time.sleep(0.02)
