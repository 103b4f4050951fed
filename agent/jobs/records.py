"""Ray's job records in our terms: request validation, ids, JobDetails JSON.

Field by field this follows Ray 2.60's dashboard/modules/job/common.py
(JobSubmitRequest, JobInfo) and pydantic_models.py (JobDetails), so Ray's
JobSubmissionClient and ``ray job`` read our answers unchanged.
"""
from __future__ import annotations

import json
import random
import re
import string
import time
from typing import Any, Dict, List, Optional

from runtime.protocol import gcs_pb2

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = (
    "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
TERMINAL = frozenset({STOPPED, SUCCEEDED, FAILED})

#: Ray's JobErrorType names we use.
ENTRYPOINT_START_ERROR = "JOB_ENTRYPOINT_COMMAND_START_ERROR"
ENTRYPOINT_ERROR = "JOB_ENTRYPOINT_COMMAND_ERROR"
SUPERVISOR_DIED = "JOB_SUPERVISOR_ACTOR_DIED"
RUNTIME_ENV_SETUP_FAILURE = "RUNTIME_ENV_SETUP_FAILURE"
UNSCHEDULABLE = "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE"

#: runtime_env keys a job may use. Everything else (pip, conda, py_modules,
#: container, ...) is refused at submission rather than silently ignored.
RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "excludes", "config")

_ID_CHARS = sorted(set(string.ascii_letters + string.digits) - set("IloO0"))
#: What a submission id may contain: it names a directory and a log file.
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUBMIT_FIELDS = ("entrypoint", "submission_id", "job_id", "runtime_env", "metadata",
                  "entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                  "entrypoint_resources", "entrypoint_label_selector")


class BadRequest(ValueError):
    """The request is malformed: HTTP 400 with this text, as Ray answers."""


def generate_submission_id() -> str:
    """``raysubmit_`` and 16 characters without the confusable ones, as Ray makes them."""
    rand = random.SystemRandom()
    return "raysubmit_" + "".join(rand.choices(_ID_CHARS, k=16))


def now_ms() -> int:
    return int(time.time() * 1000)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {type(value).__name__}")
    if value < 0:
        raise BadRequest(f"{name} must be >= 0, got {value}")
    return float(value)


def _str_dict(name: str, value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a dict, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise BadRequest(f"{name} keys and values must be strings, got {k!r}: {v!r}")
    return dict(value)


def check_runtime_env(runtime_env: Dict[str, Any]) -> None:
    unknown = sorted(k for k in runtime_env if k not in RUNTIME_ENV_KEYS)
    if unknown:
        raise BadRequest(f"runtime_env field(s) {', '.join(unknown)} are not supported by this "
                         f"cluster's job server (it supports {', '.join(RUNTIME_ENV_KEYS)}); "
                         f"install what the job needs on the nodes instead")
    if "env_vars" in runtime_env:
        _str_dict("runtime_env['env_vars']", runtime_env["env_vars"])
    wd = runtime_env.get("working_dir")
    if wd is not None and not isinstance(wd, str):
        raise BadRequest(f"runtime_env['working_dir'] must be a string, got {type(wd).__name__}")


def parse_submit(body: Any) -> gcs_pb2.SubmittedJob:
    """A JobSubmitRequest (JSON already decoded) -> a PENDING record, or BadRequest.

    As Ray's server does, keys whose value is null are dropped first, so newer
    clients with new optional fields work; unknown keys are an error, as they are
    for Ray's dataclass."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    req = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(k for k in req if k not in _SUBMIT_FIELDS)
    if unknown:
        raise BadRequest(f"JobSubmitRequest got unexpected keyword argument(s) "
                         f"{', '.join(unknown)}")
    if "entrypoint" not in req:
        raise BadRequest("JobSubmitRequest is missing the required field 'entrypoint'")
    entrypoint = req["entrypoint"]
    if not isinstance(entrypoint, str):
        raise BadRequest(f"entrypoint must be a string, got {type(entrypoint).__name__}")
    if not entrypoint.strip():
        raise BadRequest("entrypoint must not be empty")
    sid = req.get("submission_id", req.get("job_id"))
    if sid is not None:
        if not isinstance(sid, str):
            raise BadRequest(f"submission_id must be a string if provided, got "
                             f"{type(sid).__name__}")
        if not _SUBMISSION_ID.match(sid):
            raise BadRequest(f"submission_id {sid!r} must be 1 to 128 letters, digits, '.', "
                             f"'_' or '-', starting with a letter or digit")
    job = gcs_pb2.SubmittedJob(submission_id=sid or generate_submission_id(), status=PENDING,
                               entrypoint=entrypoint, start_time_ms=now_ms())
    runtime_env = req.get("runtime_env")
    if runtime_env is not None:
        if not isinstance(runtime_env, dict) or not all(isinstance(k, str) for k in runtime_env):
            raise BadRequest("runtime_env must be a dict with string keys")
        check_runtime_env(runtime_env)
        job.runtime_env_json = json.dumps(runtime_env)
    if "metadata" in req:
        job.metadata.update(_str_dict("metadata", req["metadata"]))
    if "entrypoint_num_cpus" in req:
        job.entrypoint_num_cpus = _number("entrypoint_num_cpus", req["entrypoint_num_cpus"])
    if "entrypoint_num_gpus" in req:
        job.entrypoint_num_gpus = _number("entrypoint_num_gpus", req["entrypoint_num_gpus"])
    if "entrypoint_memory" in req:
        mem = req["entrypoint_memory"]
        if isinstance(mem, bool) or not isinstance(mem, int) or mem < 0:
            raise BadRequest(f"entrypoint_memory must be a non-negative integer, got {mem!r}")
        job.entrypoint_memory = mem
    if "entrypoint_resources" in req:
        res = req["entrypoint_resources"]
        if not isinstance(res, dict):
            raise BadRequest(f"entrypoint_resources must be a dict, got {type(res).__name__}")
        for k, v in res.items():
            if k in ("CPU", "GPU", "memory"):
                raise BadRequest(f"use entrypoint_num_cpus / entrypoint_num_gpus / "
                                 f"entrypoint_memory instead of {k!r} in entrypoint_resources")
            job.entrypoint_resources[str(k)] = _number(f"entrypoint_resources[{k!r}]", v)
    if req.get("entrypoint_label_selector"):
        raise BadRequest("entrypoint_label_selector is not supported by this cluster (nodes "
                         "have no labels); use entrypoint_resources with a custom resource")
    job.message = default_message(job)
    return job


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


def view_record(job: gcs_pb2.SubmittedJob, now_s: float) -> Dict[str, Any]:
    """A submitted job as a row of raytop's jobs view: the keys of agent/cluster.py's
    driver rows (job_id is the submission id, type SUBMISSION), plus the job API's."""
    start = job.start_time_ms / 1000 if job.start_time_ms else None
    end = job.end_time_ms / 1000 if job.end_time_ms else None
    return {"job_id": job.submission_id, "submission_id": job.submission_id,
            "status": job.status, "type": "SUBMISSION", "driver_pid": job.driver_pid or None,
            "driver_ip": job.driver_node_ip, "entrypoint": job.entrypoint,
            "start_time": start, "end_time": end, "namespace": "",
            "duration_s": ((end or now_s) - start) if start else None,
            "message": job.message, "driver_exit_code":
                job.driver_exit_code if job.has_driver_exit_code else None}
