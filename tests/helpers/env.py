"""The one way tests build the environment of a process they start.

A daemon, CLI or component started by a test gets what systemd (or a login shell
with nothing set) would give it: PATH, HOME, LANG, and only what the test sets on
purpose. Nothing leaks in from pytest: in particular not GRPC_ENABLE_FORK_SUPPORT,
which ``import runtime`` sets in the test process and which once hid a node agent
that crashed every child when started from a plain shell.

PATH starts with the directory of the interpreter running the tests (the venv's
bin/, where pip put ``node-agent`` and ``agentctl``), as it would for a user who
installed the project there.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

__all__ = ["scrubbed_env", "BASE_KEYS"]

#: What a process started by a test inherits from nobody: it is set here, explicitly.
BASE_KEYS = ("PATH", "HOME", "LANG")


def scrubbed_env(extra: Optional[Dict[str, str]] = None, **more: str) -> Dict[str, str]:
    """PATH, HOME and LANG, plus the variables given (``extra`` and keyword arguments).

    Use it for every subprocess.Popen/run of our programs in the tests.
    """
    env = {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin",
                                 "/bin"]),
        "HOME": os.environ.get("HOME") or "/root",
        "LANG": "C.UTF-8",
    }
    if extra:
        env.update(extra)
    env.update(more)
    return env
