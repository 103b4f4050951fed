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
from typing import Any, Dict

from runtime.protocol import gcs_pb2
from runtime.util.job_details import (FAILED, PENDING, RUNNING, STOPPED,  # noqa: F401
                                      SUCCEEDED, TERMINAL, default_message, details,
                                      driver_details, last_drivers, resources_requested,
                                      runtime_env)

#: Ray's JobErrorType names we use.
ENTRYPOINT_START_ERROR = "JOB_ENTRYPOINT_COMMAND_START_ERROR"
ENTRYPOINT_ERROR = "JOB_ENTRYPOINT_COMMAND_ERROR"
SUPERVISOR_DIED = "JOB_SUPERVISOR_ACTOR_DIED"
SUPERVISOR_START_FAILURE = "JOB_SUPERVISOR_ACTOR_START_FAILURE"
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


def reservation_name(sid: str) -> str:
    """The name of the placement group that holds a job's entrypoint resources."""
    return f"_job_entrypoint_{sid}"


def valid_submission_id(sid: str) -> bool:
    """Whether sid may name a job's directory and log file (parse_submit's rule)."""
    return bool(_SUBMISSION_ID.match(sid))


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


def check_runtime_env(env: Dict[str, Any]) -> None:
    unknown = sorted(k for k in env if k not in RUNTIME_ENV_KEYS)
    if unknown:
        raise BadRequest(f"runtime_env field(s) {', '.join(unknown)} are not supported by this "
                         f"cluster's job server (it supports {', '.join(RUNTIME_ENV_KEYS)}); "
                         f"install what the job needs on the nodes instead")
    if "env_vars" in env:
        _str_dict("runtime_env['env_vars']", env["env_vars"])
    wd = env.get("working_dir")
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
    env = req.get("runtime_env")
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
            raise BadRequest("runtime_env must be a dict with string keys")
        check_runtime_env(env)
        job.runtime_env_json = json.dumps(env)
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
        raise BadRequest("entrypoint_label_selector is not supported by this cluster's job "
                         "server (tasks and actors take label_selector); use "
                         "entrypoint_resources with a custom resource")
    job.message = default_message(job)
    return job


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
