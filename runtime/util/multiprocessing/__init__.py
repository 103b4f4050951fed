"""``runtime.util.multiprocessing``: the standard library's Pool API on the cluster's
actors (Ray's ``ray.util.multiprocessing``); see pool.py."""
from multiprocessing import JoinableQueue, TimeoutError

from runtime.util.multiprocessing.pool import Pool

__all__ = ["Pool", "TimeoutError", "JoinableQueue"]
