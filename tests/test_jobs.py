"""The head's jobs API without Ray's client: token checks from the headers alone,
what an unauthenticated upload costs, package limits and zip slip, agentctl job,
entrypoint resources, the GCS's job table rules, and a job dying with its agent."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile

import grpc
import psutil
import pytest

from agent.jobs.packages import PackageError, safe_extract
from agent_helpers import Farm, clean_env, free_port, wait_for
from helpers.jobs import http, rss_mb, start_head, wait_status
from runtime import rpc
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("jobs"))
    try:
        agent, address, token = start_head(farm, jobs_config="max_package_bytes = 65536\n")
        yield {"agent": agent, "address": address, "token": token, "farm": farm}
    finally:
        farm.cleanup()


def _raw(address: str, request: bytes, body_bytes: int = 0, chunk: int = 1 << 20
         ) -> tuple:
    """Send a request head, then up to body_bytes of body until the server stops
    taking it: (reply bytes, body bytes the socket took)."""
    host, port = address[len("http://"):].split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b"x" * chunk
        try:
            while sent < body_bytes:
                sent += s.send(data[:min(chunk, body_bytes - sent)])
        except OSError:
            pass
        try:
            reply = s.recv(4096)
        except OSError:
            reply = b""
    return reply, sent


def test_token_is_checked_before_anything_else(head):
    a, t = head["address"], head["token"]
    jobs_before = len(http(a, "GET", "/api/jobs/", t)[1])
    for method, path in (("GET", "/api/version"), ("GET", "/api/jobs/"),
                         ("POST", "/api/jobs/"), ("GET", "/no/such/path")):
        assert http(a, method, path, body={"entrypoint": "touch /tmp/x"} if method == "POST"
                    else None) == (401, "Unauthorized: Missing authentication token")
        assert http(a, method, path, "wrong", body={"entrypoint": "touch /tmp/x"}
                    if method == "POST" else None) == (403, "Forbidden: Invalid "
                                                            "authentication token")
    # Ray's other header, and the scheme is case-insensitive
    assert http(a, "GET", "/api/version", headers={"X-Ray-Authorization": f"bearer {t}"})[0] == 200
    assert http(a, "GET", "/api/version", headers={"Authorization": t})[0] == 403
    # Expect: 100-continue is not answered with 100 before the token matches
    reply, _ = _raw(a, b"POST /api/jobs/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                       b"Expect: 100-continue\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 401 "), reply
    assert len(http(a, "GET", "/api/jobs/", t)[1]) == jobs_before
    version = http(a, "GET", "/api/version", t)[1]
    assert version["ray_version"] == "2.60.0" and version["version"] == "4"


def test_unauthenticated_upload_is_not_read(head):
    """A 300 MB POST without the token: 401 from the headers, the connection closed,
    the body never read (the socket takes at most its buffers' worth), and the agent's
    RSS does not grow."""
    pid = head["agent"].pid()
    before = rss_mb(pid)
    size = 300 * 1024 * 1024
    for headers in (b"", b"Authorization: Bearer wrong\r\n"):
        t0 = time.monotonic()
        reply, taken = _raw(head["address"], b"POST /api/jobs/ HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\n" + headers +
                            f"Content-Length: {size}\r\n\r\n".encode(), size)
        assert reply.split(b"\r\n")[0] in (b"HTTP/1.1 401 Unauthorized",
                                           b"HTTP/1.1 403 Forbidden"), reply
        assert taken < 32 * 1024 * 1024, f"the server took {taken} bytes of an unread body"
        assert time.monotonic() - t0 < 10
    assert rss_mb(pid) - before < 20


def test_packages_limits_and_names(head):
    a, t = head["address"], head["token"]
    ok = io.BytesIO()
    with zipfile.ZipFile(ok, "w") as zf:
        zf.writestr("run.sh", "echo from-package\n")
    name = "_ray_pkg_0123456789abcdef.zip"
    assert http(a, "GET", f"/api/packages/gcs/{name}", t)[0] == 404
    assert http(a, "PUT", f"/api/packages/gcs/{name}", t, data=ok.getvalue())[0] == 200
    assert http(a, "GET", f"/api/packages/gcs/{name}", t)[0] == 200
    # over max_package_bytes (64 KiB here): 413, refused from Content-Length
    code, text = http(a, "PUT", "/api/packages/gcs/_ray_pkg_big.zip", t, data=b"0" * 70_000)
    assert code == 413 and "65536" in text
    assert http(a, "GET", "/api/packages/gcs/_ray_pkg_big.zip", t)[0] == 404
    assert http(a, "PUT", "/api/packages/s3/x.zip", t, data=ok.getvalue())[0] == 400
    assert http(a, "PUT", "/api/packages/gcs/..zip", t, data=ok.getvalue())[0] == 400
    assert http(a, "PUT", "/api/packages/gcs/notzip.zip", t, data=b"plain")[0] == 400
    sid = http(a, "POST", "/api/jobs/", t, body={
        "entrypoint": "sh run.sh", "runtime_env": {"working_dir": f"gcs://{name}"}})[1][
        "submission_id"]
    wait_status(a, t, sid, ("SUCCEEDED",))
    assert "from-package" in http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]
    # a package never uploaded: the job fails setting up, with the reason
    sid = http(a, "POST", "/api/jobs/", t, body={
        "entrypoint": "true", "runtime_env": {"working_dir": "gcs://_ray_pkg_missing.zip"}})[1][
        "submission_id"]
    info = wait_status(a, t, sid, ("FAILED",))
    assert info["error_type"] == "RUNTIME_ENV_SETUP_FAILURE" and "was not uploaded" in \
        info["message"]


def _zip(entries) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pkg-{os.getpid()}-{time.time()}.zip")
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("entries, why", [
    ([("../escape.txt", b"x", 0o100644)], "outside the package"),
    ([("a/../../escape.txt", b"x", 0o100644)], "outside the package"),
    ([("/etc/escape.txt", b"x", 0o100644)], "absolute"),
    ([("link", b"/etc/passwd", 0o120777)], "symlinks"),
    ([("big", b"0" * 5000, 0o100644)], "more than 4096 bytes"),
    ([("dup", b"x", 0o100644), ("dup", b"y", 0o100644)], "appears twice"),
])
def test_unpacking_stays_inside_and_within_limits(tmp_path, entries, why):
    target = tmp_path / "t"
    target.mkdir()
    path = _zip(entries)
    try:
        with pytest.raises(PackageError, match=why):
            safe_extract(path, str(target), 4096)
    finally:
        os.unlink(path)
    assert not (tmp_path / "escape.txt").exists()
    for root, _, files in os.walk(target):
        for f in files:
            assert not os.path.islink(os.path.join(root, f))


def test_unpacking_keeps_the_tree(tmp_path):
    path = _zip([("pkg/", b"", 0o40755), ("pkg/mod.py", b"X = 1\n", 0o100644),
                 ("run.sh", b"echo hi\n", 0o100755)])
    try:
        assert safe_extract(path, str(tmp_path), 4096) == len(b"X = 1\n") + len(b"echo hi\n")
    finally:
        os.unlink(path)
    assert (tmp_path / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert os.stat(tmp_path / "run.sh").st_mode & stat.S_IXUSR


def test_bad_submissions_are_400(head):
    a, t = head["address"], head["token"]
    for body, text in (({}, "entrypoint"), ({"entrypoint": 3}, "must be a string"),
                       ({"entrypoint": "true", "bogus": 1}, "unexpected keyword"),
                       ({"entrypoint": "true", "runtime_env": {"pip": ["x"]}}, "not supported"),
                       ({"entrypoint": "true", "metadata": {"a": 1}}, "strings"),
                       ({"entrypoint": "true", "submission_id": "../x"}, "submission_id"),
                       ({"entrypoint": "true", "runtime_env": {"working_dir": "rel/dir"}},
                        "absolute")):
        code, reply = http(a, "POST", "/api/jobs/", t, body=body)
        assert code == 400 and text in reply, (body, code, reply)
    # null values are dropped first, as Ray's server does for newer clients
    code, reply = http(a, "POST", "/api/jobs/", t, body={"entrypoint": "true",
                                                         "entrypoint_label_selector": None})
    assert code == 200
    assert http(a, "GET", "/api/jobs/nope", t) == (404, "Job nope does not exist")
    assert http(a, "POST", "/api/jobs/nope/stop", t)[0] == 404


def test_environment_token_file_and_path(head):
    """The driver gets the GCS address and a 0600 token file (never the token in its
    environment); PATH starts with the cluster's Python; the file is gone after."""
    a, t = head["address"], head["token"]
    script = ("import json, os, stat, sys; p = os.environ['NODE_AGENT_TOKEN_FILE']; "
              "print(json.dumps({'addr': os.environ['RUNTIME_ADDRESS'], 'file': p, "
              "'mode': stat.S_IMODE(os.stat(p).st_mode), 'token_in_env': any(os.environ['X'] "
              "in v for v in os.environ.values() if len(v) >= 32) or 'NODE_AGENT_TOKEN' in "
              "os.environ, 'exe': sys.executable, 'path0': os.environ['PATH'].split(':')[0]}))")
    sid = http(a, "POST", "/api/jobs/", t, body={
        "entrypoint": f"python -c \"{script}\"",
        "runtime_env": {"env_vars": {"X": t[:40]}}})[1]["submission_id"]
    wait_status(a, t, sid, ("SUCCEEDED", "FAILED"))
    logs = http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["addr"] == head["agent"].status().gcs_address
    assert seen["mode"] == 0o600 and not os.path.exists(seen["file"])
    assert os.path.dirname(seen["exe"]) == seen["path0"] == os.path.dirname(sys.executable)
    # the driver's env holds the token only through the variable the test put there
    assert seen["token_in_env"] is True  # X itself; now without it:
    sid = http(a, "POST", "/api/jobs/", t, body={"entrypoint": "env"})[1]["submission_id"]
    wait_status(a, t, sid, ("SUCCEEDED",))
    assert t not in http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]


def test_agentctl_job_commands(head, tmp_path):
    """agentctl job finds the API and the token through the local agent."""
    agent = head["agent"]
    (tmp_path / "hello.py").write_text("import os\nprint('hello', os.environ['WHO'])\n")

    def ctl(command, *args):
        return subprocess.run(["agentctl", "job", command, "--socket", agent.socket, *args],
                              capture_output=True, text=True, env=clean_env(), cwd=str(tmp_path),
                              timeout=60)
    proc = ctl("submit", "--working-dir", ".", "--env", "WHO=agentctl", "--submission-id",
               "ctl-1", "--", "python", "hello.py")
    assert proc.returncode == 0, proc.stderr
    assert "hello agentctl" in proc.stdout and "SUCCEEDED" in proc.stderr
    proc = ctl("status", "ctl-1", "--json")
    assert json.loads(proc.stdout)["status"] == "SUCCEEDED"
    assert "hello agentctl" in ctl("logs", "ctl-1").stdout
    proc = ctl("submit", "--no-wait", "--submission-id", "ctl-2", "--",
               "echo begun; sleep 60")
    assert proc.returncode == 0 and proc.stdout.strip() == "ctl-2", proc.stderr
    wait_status(head["address"], head["token"], "ctl-2", ("RUNNING",))
    follower = subprocess.Popen(["agentctl", "job", "logs", "--socket", agent.socket, "-f",
                                 "ctl-2"], stdout=subprocess.PIPE, text=True,
                                env=clean_env(), cwd=str(tmp_path))
    try:
        assert "is being stopped" in ctl("stop", "ctl-2").stdout
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert "begun" in out and "was stopped" in out
    listed = json.loads(ctl("list", "--json").stdout)
    assert {"ctl-1": "SUCCEEDED", "ctl-2": "STOPPED"}.items() <= {
        j["submission_id"]: j["status"] for j in listed if j["type"] == "SUBMISSION"}.items()
    assert ctl("delete", "ctl-1").returncode == 0
    proc = ctl("status", "ctl-1")
    assert proc.returncode == 1 and "Job ctl-1 does not exist" in proc.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("f" * 64)
    proc = subprocess.run(["agentctl", "job", "list", "--address", head["address"],
                           "--token-file", str(wrong)], capture_output=True, text=True,
                          env=clean_env(), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 1 and "refused the token" in proc.stderr


def test_entrypoint_resources_are_reserved(head):
    """entrypoint_num_cpus holds the CPU while the job runs (the head has 1): a
    second such job waits PENDING with Ray's message, and runs once the first ends."""
    a, t = head["address"], head["token"]
    first = http(a, "POST", "/api/jobs/", t, body={"entrypoint": "sleep 60",
                                                   "entrypoint_num_cpus": 1})[1]["submission_id"]
    wait_status(a, t, first, ("RUNNING",))
    second = http(a, "POST", "/api/jobs/", t, body={"entrypoint": "echo second",
                                                    "entrypoint_num_cpus": 1})[1]["submission_id"]
    time.sleep(1.0)  # give it every chance to start wrongly
    info = http(a, "GET", f"/api/jobs/{second}", t)[1]
    assert info["status"] == "PENDING" and "waiting for resources" in info["message"]
    assert http(a, "POST", f"/api/jobs/{first}/stop", t)[1] == {"stopped": True}
    wait_status(a, t, second, ("SUCCEEDED",))
    status = head["agent"].status()
    wait_for(lambda: head["agent"].status().available.get("CPU") == 1.0, 20,
             message="the reservation to be released")
    assert status.total["CPU"] == 1.0


def test_gcs_table_rules(head):
    """Ray's rules, enforced by the GCS for every writer: an id is used once, a
    terminal status never changes, a running job cannot be deleted."""
    channel = rpc.sync_channel(head["agent"].status().gcs_address, head["token"])
    gcs = gcs_pb2_grpc.GcsStub(channel)
    try:
        job = gcs_pb2.SubmittedJob(submission_id="rules", status="RUNNING", entrypoint="x")
        assert gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job, create_only=True)).ok
        again = gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job, create_only=True))
        assert not again.ok and "already exists" in again.error
        refused = gcs.DeleteSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id="rules"))
        assert not refused.ok and "non-terminal" in refused.error
        job.status = "FAILED"
        assert gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job)).ok
        job.status = "RUNNING"
        back = gcs.PutSubmittedJob(gcs_pb2.PutSubmittedJobRequest(job=job))
        assert not back.ok and "terminal" in back.error
        assert gcs.DeleteSubmittedJob(gcs_pb2.SubmittedJobRequest(submission_id="rules")).ok
        ids = [j.submission_id for j in gcs.ListSubmittedJobs(common_pb2.Empty()).jobs]
        assert "rules" not in ids
    finally:
        channel.close()
    with pytest.raises(grpc.RpcError) as err:
        bad = rpc.sync_channel(head["agent"].status().gcs_address, "0" * 64)
        try:
            gcs_pb2_grpc.GcsStub(bad).ListSubmittedJobs(common_pb2.Empty(), timeout=10)
        finally:
            bad.close()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_jobs_die_with_their_agent(tmp_path):
    """SIGKILL the head's agent: every process of a running job dies too (its wrapper
    gets the parent-death signal and kills the group). The agent here runs with a
    PATH without the venv, so `python` in an entrypoint comes from the agent's."""
    farm = Farm(tmp_path)
    try:
        agentctl = os.path.join(os.path.dirname(sys.executable), "agentctl")
        agent, a, t = start_head(farm, env=clean_env(PATH="/usr/bin:/bin"), agentctl=agentctl)
        sid = http(a, "POST", "/api/jobs/", t, body={
            "entrypoint": "python -c 'import runtime, sys; print(sys.executable)'; "
                          "sleep 300 & sleep 300"})[1]["submission_id"]
        wait_status(a, t, sid, ("RUNNING",))
        wait_for(lambda: len([p for p in psutil.process_iter(["cmdline"])
                              if p.info["cmdline"] == ["sleep", "300"]]) >= 2, 20,
                 message="the job's two sleeps")
        sleeps = [p for p in psutil.process_iter(["cmdline"])
                  if p.info["cmdline"] == ["sleep", "300"] and
                  psutil.Process(p.pid).environ().get("RUNTIME_JOB_SUBMISSION_ID") == sid]
        assert len(sleeps) == 2
        logs = http(a, "GET", f"/api/jobs/{sid}/logs", t)[1]["logs"]
        assert os.path.dirname(sys.executable) in logs
        os.kill(agent.pid(), signal.SIGKILL)
        gone, alive = psutil.wait_procs(sleeps, timeout=20)
        assert not alive, f"job processes outlived the agent: {alive}"
    finally:
        farm.cleanup()


def test_raytop_lists_and_stops_submitted_jobs(head):
    """raytop's jobs view (the agent's View RPC) shows jobs of the jobs API as jobs of
    their own, their drivers not as second rows, and its stop action stops them."""
    from agent.client import AgentClient
    from runtime.protocol import agent_pb2

    a, t = head["address"], head["token"]
    code = "import time, runtime as ray; ray.init(); time.sleep(60)"
    sid = http(a, "POST", "/api/jobs/", t, body={"entrypoint": f"python -c '{code}'"})[1][
        "submission_id"]
    wait_status(a, t, sid, ("RUNNING",))

    def rows():
        with AgentClient(head["agent"].socket) as c:
            reply = c.stub.View(agent_pb2.ViewRequest(view="jobs"), timeout=30)
        return [dict(zip(reply.table.columns, r.cells), key=r.key) for r in reply.table.rows]

    # Its driver registers with the GCS as well; it must show as the submitted job only.
    wait_for(lambda: any(r["key"] == sid and r["STATUS"] == "RUNNING" for r in rows()), 30,
             message="the submitted job in the jobs view")
    with AgentClient(head["agent"].socket) as c:
        out = c.stub.Act(agent_pb2.ActionRequest(action="stop_job", keys=[sid]), timeout=60)
    assert out.results[0].ok, out.results[0].message
    wait_status(a, t, sid, ("STOPPED",))
    assert not any(r.get("TYPE") == "DRIVER" and r["STATUS"] == "RUNNING" for r in rows())


def test_dashboard_port_given_to_a_running_agent_is_kept_with_the_role(tmp_path):
    """`agentctl start --head --dashboard-port P` against an agent that already runs (the
    systemd case: no flag reaches the daemon) serves the jobs API on P, and keeps P
    across a stop and start of the node."""
    farm = Farm(tmp_path)
    try:
        ports = farm.ports()
        agent = farm.agent("head", "127.0.0.1", ports)
        agent.start_daemon()
        dashboard = free_port(taken=farm.taken)
        out = agent.ctl("start", "--head", "--node-ip", "127.0.0.1", "--port", str(ports["gcs"]),
                        "--dashboard-port", str(dashboard), "--json")
        assert out.returncode == 0, out.stderr
        token = json.loads(out.stdout)["token"]
        address = f"http://127.0.0.1:{dashboard}"
        wait_for(lambda: http(address, "GET", "/api/version", token)[0] == 200, 30,
                 message=f"the jobs API on the port given to agentctl ({dashboard})")
        assert agent.ctl("stop").returncode == 0
        assert agent.ctl("start").returncode == 0
        wait_for(lambda: http(address, "GET", "/api/version", token)[0] == 200, 30,
                 message="the jobs API on the same port after a stop and start")
        bad = agent.ctl("start", "--head", "--dashboard-port", "70000")
        assert bad.returncode != 0 and "--dashboard-port must be a TCP port" in bad.stderr
    finally:
        farm.cleanup()


def test_a_jobs_driver_is_linked_to_its_submission(head, tmp_path):
    """A driver started by a submitted job records the submission id: the API's record
    names that driver, and list_jobs() shows the job once, as SUBMISSION, not also as a
    hand-started DRIVER."""
    script = tmp_path / "linked.py"
    script.write_text(
        "import json, os, runtime as ray\n"
        "from runtime.util.state import list_jobs\n"
        "ray.init()\n"
        "me = ray.get_runtime_context().get_job_id()\n"
        "print('RECORDS ' + json.dumps([dict(j) for j in list_jobs()\n"
        "                               if j['job_id'] == me or j['submission_id'] == 'linked-1']))\n"
        "print('PID', os.getpid())\n")
    code, reply = http(head["address"], "POST", "/api/jobs/", head["token"],
                       body={"entrypoint": f"python {script}", "submission_id": "linked-1"})
    assert code == 200, reply
    info = wait_status(head["address"], head["token"], "linked-1", ("SUCCEEDED", "FAILED"), 60)
    _, logs = http(head["address"], "GET", "/api/jobs/linked-1/logs", head["token"])
    assert info["status"] == "SUCCEEDED", logs
    records = json.loads(next(line for line in logs["logs"].splitlines()
                              if line.startswith("RECORDS "))[len("RECORDS "):])
    pid = next(line for line in logs["logs"].splitlines() if line.startswith("PID ")).split()[1]
    assert len(records) == 1, records
    rec = records[0]
    assert rec["type"] == "SUBMISSION" and rec["submission_id"] == "linked-1", rec
    assert rec["driver_info"]["pid"] == pid and rec["job_id"] == info["job_id"], (rec, info)
    assert info["driver_info"]["pid"] == pid
