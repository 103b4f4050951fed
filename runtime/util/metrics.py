"""Application metrics (``ray.util.metrics``): Counter, Gauge and Histogram, with tags.

Ray exports these to Prometheus through each node's metrics agent. This runtime has no
Prometheus endpoint; instead each process keeps its metrics in memory and pushes them
to the GCS's KV store, where the state API reads them (``runtime.util.state.
list_metrics()``, our addition; raytop can show them the same way).

- **Recording** is a dict update under a lock in the recording process: no I/O, no
  thread hop. Metrics of one name share one series per process, whichever object
  records them (a metric pickled into a task is the same metric there).
- **Pushing** is done by one daemon thread per process, started by the first record,
  kept in this module and stopped (after a last push) at interpreter exit (a worker,
  which ends with ``os._exit``, gets that last push only from ``flush()``). It pushes
  what changed, at most every ``RUNTIME_METRICS_REPORT_INTERVAL_S`` (default 2 s) and
  at once when something changes after a quiet spell, so a short task's metrics reach
  the GCS even if its worker is stopped soon after.
- **Layout in the KV** (namespace ``metrics``): ``proc/<worker id hex>`` holds one
  process's metrics as JSON (with its node, pid and job). ``index/<n>`` (n = 0, 1, ...)
  lists those keys: a process claims the first free slot once, with a put that never
  overwrites, so readers walk the slots until the first missing one. The GCS's KV has
  no key listing; slots are never freed, so they stay a dense prefix.

Validation follows Ray 2.60: an empty name raises, a name Prometheus would refuse warns
and the metric records nothing; tag keys must be a tuple of str; every tag key needs a
value (from the call or the defaults); Counter increments must be > 0; a Histogram
needs positive boundaries.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import threading
import time
import warnings
from bisect import bisect_left
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

log = logging.getLogger("runtime.util.metrics")

#: The KV namespace, and its two key families (see the module's docstring).
KV_NAMESPACE = "metrics"
PROC_PREFIX = b"proc/"
INDEX_PREFIX = b"index/"
#: Prometheus' metric name rule (as Ray checks it).
_VALID_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"

Number = Union[int, float]
TagKey = Tuple[Tuple[str, str], ...]


def _report_interval() -> float:
    try:
        return max(0.05, float(os.environ.get("RUNTIME_METRICS_REPORT_INTERVAL_S", "2.0")))
    except ValueError:
        return 2.0


class _Series:
    """One metric's values in this process, by tag set."""

    __slots__ = ("kind", "description", "tag_keys", "boundaries", "values")

    def __init__(self, kind: str, description: str, tag_keys: Tuple[str, ...],
                 boundaries: Optional[List[float]]) -> None:
        self.kind = kind
        self.description = description
        self.tag_keys = tag_keys
        self.boundaries = boundaries
        # tags -> value (COUNTER, GAUGE) or [bucket counts..., sum, count] (HISTOGRAM)
        self.values: Dict[TagKey, Any] = {}


class _Registry:
    """This process's metrics, and the thread that pushes them to the GCS."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.push_lock = threading.Lock()  # one push at a time (the thread, flush(), exit)
        self.series: Dict[str, _Series] = {}
        self.dirty = False
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.last_push = 0.0
        self.slot_for: Optional[bytes] = None  # the process key whose index slot we hold
        self.channel: Optional[Tuple[Tuple[str, str], Any, Any]] = None  # (to, channel, stub)

    # -- recording (any thread) -------------------------------------------------------------
    def declare(self, name: str, kind: str, description: str, tag_keys: Tuple[str, ...],
                boundaries: Optional[List[float]] = None) -> None:
        with self.lock:
            s = self.series.get(name)
            if s is None:
                self.series[name] = _Series(kind, description, tag_keys, boundaries)
            elif s.kind != kind:
                raise ValueError(f"metric {name!r} is already a {s.kind.lower()} in this "
                                 f"process; a {kind.lower()} needs another name")

    def record(self, name: str, kind: str, tags: TagKey, value: float) -> None:
        with self.lock:
            s = self.series[name]
            if kind == COUNTER:
                s.values[tags] = s.values.get(tags, 0.0) + value
            elif kind == GAUGE:
                s.values[tags] = value
            else:
                cell = s.values.get(tags)
                if cell is None:
                    cell = s.values[tags] = [0] * (len(s.boundaries) + 1) + [0.0, 0]
                cell[bisect_left(s.boundaries, value)] += 1
                cell[-2] += value
                cell[-1] += 1
            if self.dirty:
                return
            self.dirty = True
        self.changed.set()
        if self.thread is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self._run, name="runtime-metrics",
                                           daemon=True)
            self.thread.start()

    # -- pushing (the metrics thread; and at exit) --------------------------------------------
    def snapshot(self) -> List[Dict[str, Any]]:
        out = []
        with self.lock:
            self.dirty = False
            for name, s in sorted(self.series.items()):
                series = []
                for tags, v in s.values.items():
                    if s.kind == HISTOGRAM:
                        series.append({"tags": dict(tags), "buckets": list(v[:-2]),
                                       "sum": v[-2], "count": v[-1]})
                    else:
                        series.append({"tags": dict(tags), "value": v})
                if series:
                    out.append({"name": name, "type": s.kind, "description": s.description,
                                "tag_keys": list(s.tag_keys), "boundaries": s.boundaries,
                                "series": series})
        return out

    def _run(self) -> None:
        interval = _report_interval()
        while not self.stopping.is_set():
            self.changed.wait()
            if self.stopping.is_set():
                return
            wait = self.last_push + interval - time.monotonic()
            if wait > 0 and self.stopping.wait(wait):
                return
            self.changed.clear()
            if not self.push(timeout=5.0):
                self.changed.set()  # not pushed: try again after the interval
                self.last_push = time.monotonic()

    def push(self, timeout: float) -> bool:
        """Send this process's metrics to its cluster's GCS; False when there is no
        cluster to send them to (yet) or the GCS did not take them.

        It uses a blocking channel of its own, not the core worker's loop: a push under
        way while ``shutdown()`` stops that loop would otherwise wait forever."""
        with self.push_lock:
            return self._push(timeout)

    def _push(self, timeout: float) -> bool:
        from runtime.core_worker.current import core_worker_or_none

        cw = core_worker_or_none()
        if cw is None or not getattr(cw, "connected", True):
            with self.lock:
                self.dirty = True
            return False
        metrics = self.snapshot()
        key = PROC_PREFIX + cw.worker_id.hex().encode()
        record = {"worker_id": cw.worker_id.hex(), "pid": os.getpid(),
                  "node_id": cw.node_id.hex(), "node_ip": cw.node_ip,
                  "job_id": cw.job_id.hex() or None, "is_driver": cw.mode == "driver",
                  "time": time.time(), "metrics": metrics}
        try:
            stub = self._stub(cw.gcs_address, cw.token)
            kv = _KvClient(stub, timeout)
            kv.put(key, json.dumps(record).encode())
            if self.slot_for != key:
                claim_slot(kv.found, lambda k: kv.put(k, key, overwrite=False))
                self.slot_for = key
        except Exception as exc:  # the GCS is away, or refused us
            log.debug("metrics not pushed to the GCS at %s: %s", cw.gcs_address, exc)
            with self.lock:
                self.dirty = True
            return False
        finally:
            self.last_push = time.monotonic()
        return True

    def _stub(self, address: str, token: str) -> Any:
        from runtime import rpc
        from runtime.protocol import gcs_pb2_grpc

        if self.channel is None or self.channel[0] != (address, token):
            if self.channel is not None:
                self.channel[1].close()
            ch = rpc.sync_channel(address, token)
            self.channel = ((address, token), ch, gcs_pb2_grpc.GcsStub(ch))
        return self.channel[2]

    def close(self) -> None:
        """At interpreter exit: stop the thread, then push what it had not. Bounded (a
        few seconds) even when the GCS does not answer: exit is never held up long."""
        thread = self.thread
        if thread is None:
            return
        self.stopping.set()
        self.changed.set()
        thread.join(timeout=3.0)
        if self.dirty and self.push_lock.acquire(timeout=1.0):
            try:
                self._push(timeout=2.0)
            finally:
                self.push_lock.release()
        if self.channel is not None and not thread.is_alive():
            self.channel[1].close()
            self.channel = None


class _KvClient:
    """The GCS KV calls a push makes, on the metrics thread's own channel."""

    def __init__(self, stub: Any, timeout: float) -> None:
        self.stub = stub
        self.timeout = timeout

    def put(self, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        from runtime.protocol import gcs_pb2

        return self.stub.KvPut(gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=key, value=value,
                                                 overwrite=overwrite),
                               timeout=self.timeout).added

    def found(self, key: bytes) -> bool:
        from runtime.protocol import gcs_pb2

        return self.stub.KvGet(gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=key),
                               timeout=self.timeout).found


def claim_slot(found: Callable[[bytes], bool], put_new: Callable[[bytes], bool]) -> int:
    """Take the first free ``index/<n>`` slot: find it by doubling then bisecting over
    the dense prefix of taken slots (a few reads however many there are), and claim it
    with a put that never overwrites; a slot taken meanwhile moves us to the next."""
    hi = 1
    while found(INDEX_PREFIX + str(hi - 1).encode()):
        hi *= 2
    lo = hi // 2  # slots below lo are taken, slot hi - 1 is free
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if found(INDEX_PREFIX + str(mid - 1).encode()):
            lo = mid
        else:
            hi = mid
    n = lo  # slot lo == hi - 1: free when we looked
    while not put_new(INDEX_PREFIX + str(n).encode()):
        n += 1
    return n


def stored_records(get: Callable[[bytes], Optional[bytes]]) -> List[Dict[str, Any]]:
    """Every process record in the KV (``get(key)`` is the KV read, None when missing):
    the slots in order, then each slot's record."""
    out = []
    n = 0
    while True:
        proc_key = get(INDEX_PREFIX + str(n).encode())
        if proc_key is None:
            return out
        n += 1
        raw = get(proc_key)
        if raw is None:
            continue
        try:
            out.append(json.loads(raw))
        except ValueError:
            log.warning("skipping the unreadable metrics record %r", proc_key)


def flatten(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per metric and tag set of a process record (the state API's shape)."""
    rows = []
    where = {k: record.get(k) for k in ("node_id", "node_ip", "pid", "worker_id", "job_id")}
    for m in record.get("metrics", ()):
        for s in m["series"]:
            row = {"name": m["name"], "type": m["type"], "description": m["description"],
                   "tags": s["tags"], "value": s.get("value")}
            if m["type"] == HISTOGRAM:
                row.update(boundaries=m["boundaries"], buckets=s["buckets"], sum=s["sum"],
                           count=s["count"])
            row.update(where, timestamp=record.get("time"))
            rows.append(row)
    return rows


_registry = _Registry()
atexit.register(_registry.close)


def flush(timeout: float = 2.0) -> bool:
    """Push this process's metrics now (what exit does). True when they reached the GCS
    or there was nothing to push."""
    if _registry.thread is None:
        return True
    return _registry.push(timeout)


class Metric:
    """What Counter, Gauge and Histogram share: name, description, tag keys, default
    tags, and Ray's checks."""

    _kind = ""

    def __init__(self, name: str, description: str = "",
                 tag_keys: Optional[Tuple[str, ...]] = None) -> None:
        if len(name) == 0:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        self._discard_metric = not _VALID_METRIC_NAME_RE.match(name)
        if self._discard_metric:
            warnings.warn(f"Invalid metric name: {name}. Metric will be discarded and data "
                          "will not be collected or published. Metric names can only "
                          "contain letters, numbers, _, and :. Metric names cannot start "
                          "with numbers.", UserWarning, stacklevel=3)
        self._name = name
        self._description = description
        self._default_tags: Dict[str, str] = {}
        self._tag_keys = tag_keys or tuple()
        if not isinstance(self._tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(self._tag_keys)}")
        for key in self._tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")

    def _declare(self, boundaries: Optional[List[float]] = None) -> None:
        if not self._discard_metric:
            _registry.declare(self._name, self._kind, self._description, self._tag_keys,
                              boundaries)

    def set_default_tags(self, default_tags: Dict[str, str]) -> "Metric":
        """Tags every record uses unless the call gives its own; returns the metric, so
        ``Counter("n", tag_keys=("a",)).set_default_tags({"a": "b"})`` reads well."""
        for key, val in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key}.")
            if not isinstance(val, str):
                raise TypeError(f"Tag values must be str, got {type(val)}.")
        self._default_tags = dict(default_tags)
        return self

    def _final_tags(self, tags: Optional[Dict[str, str]]) -> TagKey:
        if tags:
            for val in tags.values():
                if not isinstance(val, str):
                    raise TypeError(f"Tag values must be str, got {type(val)}.")
            final = {**self._default_tags, **tags}
        else:
            final = self._default_tags
        missing = [k for k in self._tag_keys if k not in final]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {','.join(missing)}.")
        # Keys not declared would be dropped by Prometheus' view; so they are here.
        return tuple((k, final[k]) for k in self._tag_keys)

    def _record(self, value: Number, tags: Optional[Dict[str, str]]) -> None:
        if self._discard_metric:
            return
        _registry.record(self._name, self._kind, self._final_tags(tags), float(value))

    @property
    def info(self) -> Dict[str, Any]:
        """The metric's name, description, tag keys and default tags (Ray's ``info``)."""
        return {"name": self._name, "description": self._description,
                "tag_keys": self._tag_keys, "default_tags": self._default_tags}


def _check_number(value: Any) -> None:
    if not isinstance(value, (int, float)):
        raise TypeError(f"value must be int or float, got {type(value)}.")


class Counter(Metric):
    """A cumulative value that only goes up (Prometheus' counter)."""

    _kind = COUNTER

    def __init__(self, name: str, description: str = "",
                 tag_keys: Optional[Tuple[str, ...]] = None) -> None:
        super().__init__(name, description, tag_keys)
        self._declare()

    def __reduce__(self):
        return self.__class__, (self._name, self._description, self._tag_keys)

    def inc(self, value: Number = 1.0, tags: Optional[Dict[str, str]] = None) -> None:
        """Add value (> 0, default 1); ``tags`` override the default tags."""
        _check_number(value)
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._record(value, tags)


class Gauge(Metric):
    """The last value set (Prometheus' gauge): it can go up and down."""

    _kind = GAUGE

    def __init__(self, name: str, description: str = "",
                 tag_keys: Optional[Tuple[str, ...]] = None) -> None:
        super().__init__(name, description, tag_keys)
        self._declare()

    def __reduce__(self):
        return self.__class__, (self._name, self._description, self._tag_keys)

    def set(self, value: Optional[Number], tags: Optional[Dict[str, str]] = None) -> None:
        """Set the gauge (None does nothing, as in Ray); ``tags`` override the defaults."""
        if value is None:
            return
        _check_number(value)
        self._record(value, tags)


class Histogram(Metric):
    """Counts of observed values per bucket, with their sum and count (Prometheus'
    histogram). Bucket i counts values <= boundaries[i] (and above the boundary before);
    the last bucket counts those above every boundary."""

    _kind = HISTOGRAM

    def __init__(self, name: str, description: str = "", boundaries: Optional[List[float]] = None,
                 tag_keys: Optional[Tuple[str, ...]] = None) -> None:
        super().__init__(name, description, tag_keys)
        if boundaries is None or len(boundaries) == 0:
            raise ValueError("boundaries argument should be provided when using the Histogram "
                             "class. e.g., Histogram(\"name\", boundaries=[1.0, 2.0])")
        for i, boundary in enumerate(boundaries):
            if boundary <= 0:
                raise ValueError(f"Invalid `boundaries` argument at index {i}, {boundaries}. "
                                 "Use positive values for the arguments.")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"Invalid `boundaries` argument {boundaries}: boundaries must be "
                             "in increasing order.")
        self.boundaries = list(boundaries)
        self._declare(self.boundaries)

    def __reduce__(self):
        return self.__class__, (self._name, self._description, self.boundaries, self._tag_keys)

    def observe(self, value: Number, tags: Optional[Dict[str, str]] = None) -> None:
        """Count value in its bucket; ``tags`` override the default tags."""
        _check_number(value)
        self._record(value, tags)

    @property
    def info(self) -> Dict[str, Any]:
        info = super().info
        info["boundaries"] = self.boundaries
        return info


__all__ = ["Counter", "Gauge", "Histogram", "Metric", "flush"]
