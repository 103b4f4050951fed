"""Ray's JobDetails records, shared by the head's job server (agent/jobs) and the
state API (``list_jobs``), so both describe a job the same way, field by field as
Ray 2.60's dashboard/modules/job/pydantic_models.py does.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from runtime.protocol import gcs_pb2

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = (
    "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
TERMINAL = frozenset({STOPPED, SUCCEEDED, FAILED})


def runtime_env(job: gcs_pb2.SubmittedJob) -> Optional[Dict[str, Any]]:
    return json.loads(job.runtime_env_json) if job.runtime_env_json else None


def resources_requested(job: gcs_pb2.SubmittedJob) -> Dict[str, float]:
    """The entrypoint's reservation as resource names (empty: run on the head, unreserved)."""
    out = {k: v for k, v in job.entrypoint_resources.items() if v > 0}
    if job.entrypoint_num_cpus > 0:
        out["CPU"] = job.entrypoint_num_cpus
    if job.entrypoint_num_gpus > 0:
        out["GPU"] = job.entrypoint_num_gpus
    if job.entrypoint_memory > 0:
        out["memory"] = float(job.entrypoint_memory)
    return out


def default_message(job: gcs_pb2.SubmittedJob) -> str:
    """Ray's default message for each status (common.py JobInfo.__post_init__)."""
    if job.status == PENDING:
        msg = "Job has not started yet."
        if resources_requested(job):
            msg += (" It may be waiting for resources (CPUs, GPUs, memory, custom resources) "
                    "to become available.")
        if job.runtime_env_json and job.runtime_env_json != "{}":
            msg += " It may be waiting for the runtime environment to be set up."
        return msg
    return {RUNNING: "Job is currently running.", STOPPED: "Job was intentionally stopped.",
            SUCCEEDED: "Job finished successfully.", FAILED: "Job failed."}[job.status]


def details(job: gcs_pb2.SubmittedJob, driver: Optional[gcs_pb2.JobInfo] = None
            ) -> Dict[str, Any]:
    """JobDetails for a submitted job; ``driver`` is the last driver it started."""
    return {
        "type": "SUBMISSION",
        "job_id": driver.job_id.hex() if driver is not None else None,
        "submission_id": job.submission_id,
        "driver_info": _driver_info(driver) if driver is not None else None,
        "status": job.status,
        "entrypoint": job.entrypoint,
        "message": job.message or None,
        "error_type": job.error_type or None,
        "start_time": job.start_time_ms or None,
        "end_time": job.end_time_ms or None,
        "metadata": dict(job.metadata),
        "runtime_env": runtime_env(job),
        "driver_agent_http_address": job.driver_agent_http_address or None,
        "driver_node_id": job.driver_node_id or None,
        "driver_exit_code": job.driver_exit_code if job.has_driver_exit_code else None,
        # Not in Ray's JobDetails; clients ignore what they do not know.
        "entrypoint_num_cpus": job.entrypoint_num_cpus,
        "entrypoint_num_gpus": job.entrypoint_num_gpus,
        "entrypoint_memory": job.entrypoint_memory,
        "entrypoint_resources": dict(job.entrypoint_resources) or None,
    }


def _driver_info(driver: gcs_pb2.JobInfo) -> Dict[str, str]:
    return {"id": driver.job_id.hex(), "node_ip_address": driver.driver_ip,
            "pid": str(driver.driver_pid)}


def driver_details(driver: gcs_pb2.JobInfo) -> Dict[str, Any]:
    """JobDetails for a driver someone started by hand (type DRIVER), as Ray lists them."""
    return {
        "type": "DRIVER", "job_id": driver.job_id.hex(), "submission_id": None,
        "driver_info": _driver_info(driver),
        "status": SUCCEEDED if driver.is_dead else RUNNING,
        "entrypoint": driver.entrypoint, "message": None, "error_type": None,
        "start_time": int(driver.start_time * 1000) or None,
        "end_time": int(driver.end_time * 1000) or None,
        "metadata": {}, "runtime_env": {}, "driver_agent_http_address": None,
        "driver_node_id": None, "driver_exit_code": None,
    }


def last_drivers(drivers: List[gcs_pb2.JobInfo]) -> Dict[str, gcs_pb2.JobInfo]:
    """submission id -> the newest driver that job started (Ray shows the last one)."""
    out: Dict[str, gcs_pb2.JobInfo] = {}
    for d in sorted(drivers, key=lambda d: int.from_bytes(d.job_id, "little")):
        if d.submission_id:
            out[d.submission_id] = d
    return out
