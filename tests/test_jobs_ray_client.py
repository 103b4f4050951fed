"""Ray's own job client against our head: JobSubmissionClient and the `ray job` CLI
(Ray 2.60, from .venv-ray) with Ray's token auth, unchanged.

Covers submit, status, logs, tail, stop, a failing job's exit code, env vars, a
working_dir upload, metadata and submission ids, list, delete and a wrong token.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from agent_helpers import Farm
from helpers.jobs import http, ray_cli, ray_client, ray_client_missing, start_head, wait_status

missing = ray_client_missing()
if missing:
    print(f"test_jobs_ray_client: skipped: {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")

#: A driver the job runs: it attaches with init() and no address.
DRIVER = textwrap.dedent("""
    import os, runtime as ray
    ray.init()
    @ray.remote
    def double(x):
        return 2 * x
    print("result", ray.get(double.remote(21)), os.environ["GREETING"], flush=True)
    print("cwd-file", open("data.txt").read().strip())
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("jobsray"))
    try:
        agent, address, token = start_head(farm)
        yield {"agent": agent, "address": address, "token": token,
               "cwd": str(tmp_path_factory.mktemp("client"))}
    finally:
        farm.cleanup()


def test_submit_driver_with_working_dir_env_and_metadata(head, tmp_path):
    """A working_dir upload, env vars, metadata and a submission id; the driver
    attaches to the cluster by itself and runs a task; status, info and logs."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "data.txt").write_text("shipped with the package\n")
    out = ray_client(f"""
sid = client.submit_job(entrypoint="python driver.py", submission_id="my-job-1",
                        runtime_env={{"working_dir": {str(tmp_path)!r},
                                      "env_vars": {{"GREETING": "hello-from-env"}}}},
                        metadata={{"owner": "tests"}})
deadline = time.time() + 90
while not client.get_job_status(sid).is_terminal() and time.time() < deadline:
    time.sleep(0.05)
info = client.get_job_info(sid)
print(json.dumps({{"sid": sid, "info": info.dict(), "logs": client.get_job_logs(sid)}},
                 default=str))
""", head["address"], head["token"], head["cwd"])
    info = out["info"]
    assert out["sid"] == "my-job-1"
    assert info["status"] == "SUCCEEDED", (info, out["logs"])
    assert info["driver_exit_code"] == 0 and info["type"] == "SUBMISSION"
    assert info["metadata"] == {"owner": "tests"}
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert info["end_time"] >= info["start_time"] > 0
    assert info["message"] == "Job finished successfully."
    assert "result 42 hello-from-env" in out["logs"]
    assert "cwd-file shipped with the package" in out["logs"]


def test_failing_job_reports_its_exit_code(head):
    out = ray_client("""
sid = client.submit_job(entrypoint="echo about to fail; exit 3")
while not client.get_job_status(sid).is_terminal():
    time.sleep(0.05)
print(json.dumps(client.get_job_info(sid).dict(), default=str))
""", head["address"], head["token"], head["cwd"])
    assert out["status"] == "FAILED"
    assert out["driver_exit_code"] == 3
    assert out["error_type"] == "JOB_ENTRYPOINT_COMMAND_ERROR"
    assert "failed with exit code 3" in out["message"] and "about to fail" in out["message"]


def test_tail_then_stop_and_duplicate_ids(head):
    """tail_job_logs streams lines as they come; stop_job ends a running job
    (STOPPED); a second submission with the same id is refused."""
    out = ray_client("""
import asyncio
sid = client.submit_job(entrypoint="for i in 1 2 3; do echo line-$i; sleep 0.2; done",
                        submission_id="tailed")
async def tail():
    got = []
    async for chunk in client.tail_job_logs(sid):
        got.append(chunk)
    return "".join(got)
tailed = asyncio.run(tail())
status_after_tail = str(client.get_job_status(sid))
try:
    client.submit_job(entrypoint="true", submission_id="tailed")
    dup = "accepted"
except RuntimeError as exc:
    dup = str(exc)
long = client.submit_job(entrypoint="echo started; sleep 60")
while client.get_job_status(long) != JobStatus.RUNNING:
    time.sleep(0.05)
stopped = client.stop_job(long)
t0 = time.time()
while not client.get_job_status(long).is_terminal():
    time.sleep(0.05)
print(json.dumps({"tailed": tailed, "after": status_after_tail, "dup": dup,
                  "stopped": stopped, "stop_s": time.time() - t0,
                  "final": str(client.get_job_status(long)),
                  "again": client.stop_job(long)}))
""", head["address"], head["token"], head["cwd"])
    assert out["tailed"].splitlines()[-3:] == ["line-1", "line-2", "line-3"]
    assert out["after"] == "SUCCEEDED"
    assert "already exists" in out["dup"] and "400" in out["dup"]
    assert out["stopped"] is True and out["final"] == "STOPPED"
    assert out["stop_s"] < 5
    assert out["again"] is False


def test_list_and_delete(head):
    out = ray_client("""
done = client.submit_job(entrypoint="true", submission_id="to-delete")
running = client.submit_job(entrypoint="sleep 60", submission_id="still-running")
while client.get_job_status(done) != JobStatus.SUCCEEDED or \\
        client.get_job_status(running) != JobStatus.RUNNING:
    time.sleep(0.05)
ids = [j.submission_id for j in client.list_jobs()]
try:
    client.delete_job(running)
    refused = "deleted"
except RuntimeError as exc:
    refused = str(exc)
deleted = client.delete_job(done)
try:
    client.get_job_info(done)
    gone = "still there"
except RuntimeError as exc:
    gone = str(exc)
client.stop_job(running)
print(json.dumps({"ids": ids, "refused": refused, "deleted": deleted, "gone": gone}))
""", head["address"], head["token"], head["cwd"])
    assert {"to-delete", "still-running"} <= set(out["ids"])
    assert "non-terminal" in out["refused"]
    assert out["deleted"] is True
    assert "404" in out["gone"] and "does not exist" in out["gone"]


def test_wrong_or_missing_token_runs_nothing(head):
    before = http(head["address"], "GET", "/api/jobs/", head["token"])[1]
    wrong = "f" * 64
    proc = ray_cli(["job", "submit", "--no-wait", "--", "touch", "/tmp/should-not-run"],
                   head["address"], wrong, head["cwd"])
    assert proc.returncode != 0
    assert "Authentication failed" in proc.stderr and "403" not in proc.stdout
    out = ray_client(f"""
try:
    JobSubmissionClient({head["address"]!r}).submit_job(entrypoint="touch /tmp/should-not-run")
    print(json.dumps("accepted"))
except Exception as exc:
    print(json.dumps(f"{{type(exc).__name__}}: {{exc}}"))
""", head["address"], None, head["cwd"], connect=False)
    assert "401" in out or "Authentication required" in out, out
    after = http(head["address"], "GET", "/api/jobs/", head["token"])[1]
    assert len(after) == len(before)


def test_ray_job_cli(head, tmp_path):
    """`ray job submit --working-dir . -- python script.py` follows the logs to the
    end; then `ray job status`, `logs`, `list`, `stop` and `delete`."""
    (tmp_path / "script.py").write_text("import sys\nprint('from the script', sys.argv[1:])\n")
    a, t = head["address"], head["token"]
    proc = ray_cli(["job", "submit", "--submission-id", "cli-1", "--working-dir", ".",
                    "--metadata-json", json.dumps({"via": "cli"}), "--", "python", "script.py",
                    "x"], a, t, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from the script ['x']" in proc.stdout
    assert "Job 'cli-1' succeeded" in proc.stdout + proc.stderr
    proc = ray_cli(["job", "status", "cli-1"], a, t, str(tmp_path))
    assert "Job 'cli-1' succeeded" in proc.stdout + proc.stderr
    proc = ray_cli(["job", "logs", "cli-1"], a, t, str(tmp_path))
    assert "from the script ['x']" in proc.stdout
    proc = ray_cli(["job", "list"], a, t, str(tmp_path))
    assert "cli-1" in proc.stdout
    proc = ray_cli(["job", "submit", "--no-wait", "--submission-id", "cli-2", "--", "sleep",
                    "60"], a, t, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    wait_status(a, t, "cli-2", ("RUNNING",))
    proc = ray_cli(["job", "stop", "cli-2"], a, t, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wait_status(a, t, "cli-2", ("STOPPED",))["driver_exit_code"] is None
    proc = ray_cli(["job", "delete", "cli-2"], a, t, str(tmp_path))
    assert proc.returncode == 0 and "deleted" in proc.stdout + proc.stderr
    assert http(a, "GET", "/api/jobs/cli-2", t)[0] == 404
