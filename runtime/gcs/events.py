"""The cluster event log: what happened to nodes, actors, tasks and supervised processes.

raytop's ``:events`` view reads it. The GCS records what it sees itself (node joined,
died, left, started draining; actor restarted or died; task failed; placement group
created or removed) and node agents add what only they see (a component restarted,
a crash loop). It is a ring of the most recent events (``EVENT_LOG_SIZE``): a burst
of failing tasks evicts old events, never grows the GCS. Each event has a sequence
number, so a reader asks for "what is newer than N" and never misses or repeats one
while it keeps up.

Repetitions are folded: the same (kind, subject, state, message) arriving again
within ``FOLD_S`` bumps the last event's ``count`` instead of adding one, so a
thousand tasks failing with one error cost one entry.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Deque, Dict, Iterable, Optional, Tuple

from runtime.protocol import gcs_pb2

#: Events kept (the oldest are dropped first).
EVENT_LOG_SIZE = 2000
#: Identical events this close together are folded into one with a count.
FOLD_S = 10.0

SEVERITIES = ("INFO", "WARNING", "ERROR")


class EventLog:
    """A bounded, folding ring of gcs_pb2.ClusterEvent."""

    def __init__(self, size: int = EVENT_LOG_SIZE) -> None:
        self.events: Deque[gcs_pb2.ClusterEvent] = deque(maxlen=size)
        self.seq = 0
        self.dropped = 0
        self._last: Dict[Tuple[str, str, str, str], gcs_pb2.ClusterEvent] = {}

    def record(self, kind: str, subject: str, state: str, message: str = "", *,
               severity: str = "INFO", node_id: bytes = b"", node_ip: str = "", pid: int = 0,
               source: str = "gcs", when: Optional[float] = None) -> gcs_pb2.ClusterEvent:
        now = time.time() if when is None else when
        key = (kind, subject if kind != "task" else "", state, message)
        last = self._last.get(key)
        if last is not None and now - last.last_time <= FOLD_S:  # _last holds only kept events
            last.count += 1
            last.last_time = now
            self.seq += 1
            last.seq = self.seq  # readers past its old seq see it again, with the new count
            return last
        self.seq += 1
        ev = gcs_pb2.ClusterEvent(seq=self.seq, time=now, last_time=now, kind=kind,
                                  subject=subject, state=state, message=message,
                                  severity=severity, node_id=node_id, node_ip=node_ip, pid=pid,
                                  source=source, count=1)
        if len(self.events) == self.events.maxlen:
            old = self.events[0]
            self.dropped += 1
            okey = (old.kind, old.subject if old.kind != "task" else "", old.state, old.message)
            if self._last.get(okey) is old:
                del self._last[okey]
        self.events.append(ev)
        self._last[key] = ev
        return ev

    def add(self, events: Iterable[gcs_pb2.ClusterEvent]) -> None:
        """Events a node agent sends (process restarts, crash loops)."""
        for e in events:
            self.record(e.kind, e.subject, e.state, e.message, severity=e.severity or "INFO",
                        node_id=e.node_id, node_ip=e.node_ip, pid=e.pid,
                        source=e.source or "agent", when=e.time or None)

    def list(self, after_seq: int = 0, limit: int = 0) -> gcs_pb2.ClusterEventList:
        """Events with seq > after_seq, oldest first; the newest ``limit`` of them."""
        out = [e for e in self.events if e.seq > after_seq]
        out.sort(key=lambda e: e.seq)
        if limit and len(out) > limit:
            out = out[-limit:]
        return gcs_pb2.ClusterEventList(events=out, last_seq=self.seq, dropped=self.dropped)
