"""Jobs API benchmark: submit -> RUNNING and -> SUCCEEDED for ``python -c pass``, and
jobs per minute for a burst of small jobs (docs/benchmarks.md, "Jobs").

    python scripts/bench_jobs.py                      # starts a head agent of ours
    python scripts/bench_jobs.py --address http://127.0.0.1:8265 [--token T]
                                                      # any Ray-compatible job server

Only the REST API is used (urllib), so the same client measures our head and Ray's.
Everything runs on loopback; the head it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple


def call(address: str, method: str, path: str, token: Optional[str], body: Any = None
         ) -> Tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(address + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def submit(address: str, token: Optional[str], entrypoint: str) -> str:
    code, reply = call(address, "POST", "/api/jobs/", token, {"entrypoint": entrypoint})
    if code != 200:
        raise RuntimeError(f"submit failed: {code} {reply}")
    return reply["submission_id"]


def status(address: str, token: Optional[str], sid: str) -> str:
    return call(address, "GET", f"/api/jobs/{sid}", token)[1]["status"]


def one_job(address: str, token: Optional[str]) -> Tuple[float, float, str]:
    """(s to RUNNING, s to terminal, final status), polling every 5 ms."""
    t0 = time.perf_counter()
    sid = submit(address, token, "python -c pass")
    running = None
    while True:
        st = status(address, token, sid)
        now = time.perf_counter() - t0
        if st != "PENDING" and running is None:
            running = now
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return running, now, st
        time.sleep(0.005)


def burst(address: str, token: Optional[str], n: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    sids = [submit(address, token, "python -c pass") for _ in range(n)]
    submitted = time.perf_counter() - t0
    final: Dict[str, str] = {}
    while len(final) < n and time.perf_counter() - t0 < 600:
        code, jobs = call(address, "GET", "/api/jobs/", token)
        for j in jobs:
            if j.get("submission_id") in sids and j["status"] in ("SUCCEEDED", "FAILED",
                                                                   "STOPPED"):
                final[j["submission_id"]] = j["status"]
        time.sleep(0.05)
    took = time.perf_counter() - t0
    ok = sum(1 for s in final.values() if s == "SUCCEEDED")
    return {"jobs": n, "succeeded": ok, "lost": n - len(final), "submit_s": round(submitted, 2),
            "total_s": round(took, 2), "jobs_per_min": round(n / took * 60)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(root: str) -> Tuple[str, str, List[str]]:
    ports = {k: free_port() for k in ("gcs", "agent", "raylet", "object_store", "dashboard")}
    config = os.path.join(root, "agent.toml")
    with open(config, "w") as fh:
        fh.write("[ports]\n" + "".join(f"{k} = {v}\n" for k, v in ports.items())
                 + "[resources]\nnum_cpus = 2\n")
    ctl = [os.path.join(os.path.dirname(sys.executable), "agentctl")]
    common = ["--socket", os.path.join(root, "agent.sock")]
    out = subprocess.run(ctl + ["start", "--head", "--node-ip", "127.0.0.1", "--json",
                                "--state-dir", os.path.join(root, "state"), "--config", config]
                         + common, capture_output=True, text=True, check=True)
    token = json.loads(out.stdout)["token"]
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if call(address, "GET", "/api/version", token)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    return address, token, ctl + ["stop"] + common


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", default=None)
    p.add_argument("--token", default=os.environ.get("RAY_AUTH_TOKEN"))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--burst", type=int, default=100)
    args = p.parse_args()
    root = None
    stop: List[str] = []
    if args.address:
        address, token = args.address.rstrip("/"), args.token
    else:
        root = tempfile.mkdtemp(prefix="bench-jobs-")
        address, token, stop = start_head(root)
    try:
        one_job(address, token)  # warm-up
        runs = [one_job(address, token) for _ in range(args.repeat)]
        result = {
            "address": address,
            "to_running_s_median": round(statistics.median(r[0] for r in runs), 3),
            "to_succeeded_s_median": round(statistics.median(r[1] for r in runs), 3),
            "to_succeeded_s_max": round(max(r[1] for r in runs), 3),
            "statuses": sorted({r[2] for r in runs}),
            "burst": burst(address, token, args.burst),
        }
        print(json.dumps(result, indent=2))
    finally:
        if stop:
            subprocess.run(stop, capture_output=True)
        if root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
