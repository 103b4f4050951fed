"""``runtime.runtime_env``: Ray's ``ray.runtime_env`` (RuntimeEnv, RuntimeEnvConfig).

How an environment travels and is set up: resolve.py (where tasks are submitted),
installer.py (on each node), context.py (what a process runs in).
"""
from runtime.runtime_env.runtime_env import RuntimeEnv, RuntimeEnvConfig

__all__ = ["RuntimeEnv", "RuntimeEnvConfig"]
