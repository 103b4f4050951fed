"""The GCS's table of submitted jobs (the Jobs REST API's records, agent/jobs/).

The head agent's job manager writes a record per submission and updates it as
the job runs; anyone with the token reads it (the REST API, agentctl, the state
API, raytop). The table enforces the two rules Ray's JobInfoStorageClient
enforces on its KV records, so no writer can break them: a submission id is
used once, and a terminal status never changes again.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

from runtime.gcs.events import EventLog
from runtime.protocol import gcs_pb2

log = logging.getLogger("runtime.gcs")

TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})
STATUSES = frozenset({"PENDING", "RUNNING"}) | TERMINAL
#: Finished jobs kept; past this the oldest finished one is forgotten (running ones never).
MAX_FINISHED = 10_000


class SubmittedJobTable:
    """submission id -> SubmittedJob, in submission order."""

    def __init__(self, events: Optional[EventLog] = None, max_finished: int = MAX_FINISHED
                 ) -> None:
        self.jobs: Dict[str, gcs_pb2.SubmittedJob] = {}
        self.events = events
        self.max_finished = max_finished
        self.finished = 0

    def restore(self, jobs: Iterable[gcs_pb2.SubmittedJob]) -> None:
        """Take the records a previous GCS kept in its store (oldest first)."""
        for job in sorted(jobs, key=lambda j: j.start_time_ms):
            self.jobs[job.submission_id] = job
            if job.status in TERMINAL:
                self.finished += 1

    def put(self, request: gcs_pb2.PutSubmittedJobRequest) -> gcs_pb2.SubmittedJobReply:
        job = request.job
        sid = job.submission_id
        if not sid:
            return gcs_pb2.SubmittedJobReply(error="a submitted job needs a submission_id")
        if job.status not in STATUSES:
            return gcs_pb2.SubmittedJobReply(
                error=f"unknown job status {job.status!r} (one of {', '.join(sorted(STATUSES))})")
        old = self.jobs.get(sid)
        if old is not None and request.create_only:
            return gcs_pb2.SubmittedJobReply(
                found=True, job=old, error=f"Job with submission_id {sid} already exists. "
                                           f"Please use a different submission_id.")
        if old is not None and old.status in TERMINAL and job.status != old.status:
            return gcs_pb2.SubmittedJobReply(
                found=True, job=old, error=f"Attempted to change job status from a terminal "
                                           f"state: {old.status} -> {job.status}")
        stored = gcs_pb2.SubmittedJob()
        stored.CopyFrom(job)
        self.jobs[sid] = stored
        if (old is None or old.status not in TERMINAL) and stored.status in TERMINAL:
            self.finished += 1
            self._evict()
        if old is None or old.status != stored.status:
            self._record(stored)
        return gcs_pb2.SubmittedJobReply(ok=True, found=old is not None)

    def _evict(self) -> None:
        if self.finished <= self.max_finished:
            return
        for sid, job in self.jobs.items():  # insertion order: the oldest first
            if job.status in TERMINAL:
                del self.jobs[sid]
                self.finished -= 1
                return

    def get(self, submission_id: str) -> gcs_pb2.SubmittedJobReply:
        job = self.jobs.get(submission_id)
        if job is None:
            return gcs_pb2.SubmittedJobReply()
        return gcs_pb2.SubmittedJobReply(ok=True, found=True, job=job)

    def list(self) -> gcs_pb2.SubmittedJobList:
        return gcs_pb2.SubmittedJobList(jobs=list(self.jobs.values()))

    def delete(self, submission_id: str) -> gcs_pb2.SubmittedJobReply:
        """Only a finished job may go: a running one would lose its record while
        its supervisor still writes to it."""
        job = self.jobs.get(submission_id)
        if job is None:
            return gcs_pb2.SubmittedJobReply(error=f"Job {submission_id} does not exist")
        if job.status not in TERMINAL:
            return gcs_pb2.SubmittedJobReply(
                found=True, job=job, error=f"Attempted to delete job '{submission_id}', but it "
                                           f"is in a non-terminal state {job.status}.")
        del self.jobs[submission_id]
        self.finished -= 1
        return gcs_pb2.SubmittedJobReply(ok=True, found=True)

    def _record(self, job: gcs_pb2.SubmittedJob) -> None:
        log.info("submitted job %s: %s", job.submission_id, job.status)
        if self.events is None:
            return
        text = job.entrypoint if job.status in ("PENDING", "RUNNING") else job.message
        severity = "WARNING" if job.status == "FAILED" else "INFO"
        self.events.record("job", job.submission_id, job.status.lower(), (text or "")[:300],
                           severity=severity, node_ip=job.driver_node_ip, pid=job.driver_pid)
