"""``agentctl job ...``: the Jobs REST API for users who have only our package.

    agentctl job submit [--address URL] [--submission-id ID] [--working-dir DIR]
                        [--env K=V]... [--metadata K=V]... [--entrypoint-num-cpus N]
                        [--entrypoint-num-gpus N] [--entrypoint-memory BYTES]
                        [--entrypoint-resources JSON] [--no-wait] -- COMMAND...
    agentctl job list | status ID | logs ID [-f] | stop ID | delete ID

Where the API is and which token it takes: ``--address`` (or ``$RAY_API_SERVER_ADDRESS``,
or an ``http://`` ``$RAY_ADDRESS``) and ``--token-file`` (or ``$NODE_AGENT_TOKEN``,
or ``$RAY_AUTH_TOKEN``); on a machine of the cluster neither is needed: the local
agent's socket gives the token and the GCS the API's address.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from agent import tokens

#: How `--working-dir` packages are named, as Ray's client names them.
_PKG_PREFIX = "_ray_pkg_"
_TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")


class JobCliError(Exception):
    """One line for the user (agentctl prints it after "agentctl: ")."""


def _api_from_env() -> str:
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return ""


def _local_cluster(socket_path: Optional[str]) -> Tuple[str, str]:
    """(jobs API address, token) from this machine's agent and its GCS."""
    import grpc

    from agent import client as agent_client
    from agent.jobs.manager import KV_KEY, KV_NAMESPACE
    from runtime import rpc
    from runtime.protocol import gcs_pb2, gcs_pb2_grpc

    try:
        with agent_client.connect(socket_path) as c:
            s = c.status(local_only=True)
    except agent_client.AgentNotRunning as exc:
        raise JobCliError(f"{exc}; or name the jobs API with --address http://HEAD:8265 and "
                          f"give its token (--token-file or ${tokens.TOKEN_ENV})") from None
    if not s.gcs_address or not s.token:
        raise JobCliError(f"this machine's agent is in no cluster (role {s.role}); pass "
                          f"--address http://HEAD:8265")
    channel = rpc.sync_channel(s.gcs_address, s.token)
    try:
        reply = gcs_pb2_grpc.GcsStub(channel).KvGet(
            gcs_pb2.KvRequest(ns=KV_NAMESPACE, key=KV_KEY), timeout=10)
    except grpc.RpcError as exc:
        raise JobCliError(f"cannot ask the GCS at {s.gcs_address} where the jobs API is: "
                          f"{exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()
    if not reply.found:
        raise JobCliError(f"the head of the cluster at {s.gcs_address} serves no jobs API "
                          f"([ports] dashboard = 0, or it is not up yet)")
    return reply.value.decode(), s.token


def resolve(args: argparse.Namespace) -> Tuple[str, str]:
    address = args.address or _api_from_env()
    token = ""
    if args.token_file:
        try:
            token = tokens.read_token_file(args.token_file)
        except OSError as exc:
            raise JobCliError(f"cannot read --token-file {args.token_file}: "
                              f"{exc.strerror or exc}") from None
        except tokens.InvalidToken as exc:
            raise JobCliError(str(exc)) from None
    token = token or os.environ.get(tokens.TOKEN_ENV, "").strip() or \
        os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not address or not token:
        local_address, local_token = _local_cluster(args.socket)
        address = address or local_address
        token = token or local_token
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/"), token


class Api:
    """A small async client of the REST API (aiohttp, as Ray's SDK uses)."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.headers = {"Authorization": f"Bearer {token}"}
        self.session: Any = None

    async def __aenter__(self) -> "Api":
        import aiohttp

        self.session = aiohttp.ClientSession(headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        import aiohttp

        try:
            async with self.session.request(method, self.address + path, **kw) as r:
                text = await r.text()
                if r.status == 401:
                    raise JobCliError(f"{self.address} wants the cluster token: pass "
                                      f"--token-file or set ${tokens.TOKEN_ENV}")
                if r.status == 403:
                    raise JobCliError(f"{self.address} refused the token: use this cluster's "
                                      f"(`agentctl token` on the head)")
                if r.status == 404 and path.startswith("/api/jobs/"):
                    raise JobCliError(text.strip())
                if r.status >= 400:
                    last = text.strip().splitlines()[-1] if text.strip() else ""
                    raise JobCliError(f"{method} {path} failed with status {r.status}: {last}")
                return json.loads(text) if text and r.content_type == "application/json" else text
        except aiohttp.ClientError as exc:
            raise JobCliError(f"cannot reach the jobs API at {self.address}: {exc}") from None

    async def follow(self, job_id: str) -> None:
        import aiohttp

        try:
            async with self.session.ws_connect(
                    f"{self.address}/api/jobs/{job_id}/logs/tail") as ws:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        sys.stdout.write(msg.data)
                        sys.stdout.flush()
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        raise JobCliError(f"following the logs of {job_id} failed: "
                                          f"{ws.exception()}")
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise JobCliError(f"Job {job_id} does not exist") from None
            raise JobCliError(f"following the logs of {job_id} failed: {exc}") from None


def package_dir(path: str, out_dir: str) -> Tuple[str, str]:
    """Zip a directory as Ray's client does for --working-dir: (package name, zip path).
    The name is a hash of the content, so an unchanged directory is not sent again."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise JobCliError(f"--working-dir {path} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "__pycache__"))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                files.append(os.path.relpath(full, root))
    digest = hashlib.sha1()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    name = f"{_PKG_PREFIX}{digest.hexdigest()[:32]}.zip"
    zpath = os.path.join(out_dir, name)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in files:
            zf.write(os.path.join(root, rel), rel)
    return name, zpath


def _pairs(items: List[str], flag: str) -> Dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobCliError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _entrypoint(words: List[str]) -> str:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise JobCliError("no entrypoint: agentctl job submit [OPTIONS] -- COMMAND ...")
    # One word is taken as the shell command it is ("python a.py && echo ok");
    # several are quoted one by one, as Ray's CLI does.
    return words[0] if len(words) == 1 else shlex.join(words)


def _format_job(j: Dict[str, Any]) -> str:
    ident = j.get("submission_id") or j.get("job_id")
    start = j.get("start_time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else "-"
    line = f"{ident}  {j['status']:<9}  {j['type']:<10}  started {when}  {j['entrypoint']}"
    if j.get("driver_exit_code") is not None:
        line += f"  (exit code {j['driver_exit_code']})"
    return line


async def _run(args: argparse.Namespace) -> int:
    address, token = resolve(args)
    async with Api(address, token) as api:
        if args.job_command == "submit":
            body: Dict[str, Any] = {"entrypoint": _entrypoint(args.entrypoint)}
            runtime_env: Dict[str, Any] = {}
            if args.env:
                runtime_env["env_vars"] = _pairs(args.env, "--env")
            if args.working_dir:
                with tempfile.TemporaryDirectory() as tmp:
                    name, zpath = package_dir(args.working_dir, tmp)
                    path = f"/api/packages/gcs/{name}"
                    try:
                        await api.call("GET", path)
                    except JobCliError:
                        with open(zpath, "rb") as fh:
                            await api.call("PUT", path, data=fh.read())
                runtime_env["working_dir"] = f"gcs://{name}"
            if runtime_env:
                body["runtime_env"] = runtime_env
            if args.metadata:
                body["metadata"] = _pairs(args.metadata, "--metadata")
            if args.submission_id:
                body["submission_id"] = args.submission_id
            for name in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory"):
                if getattr(args, name) is not None:
                    body[name] = getattr(args, name)
            if args.entrypoint_resources:
                try:
                    body["entrypoint_resources"] = json.loads(args.entrypoint_resources)
                except ValueError as exc:
                    raise JobCliError(f"--entrypoint-resources must be JSON: {exc}") from None
            sid = (await api.call("POST", "/api/jobs/", json=body))["submission_id"]
            if args.json and args.no_wait:
                print(json.dumps({"submission_id": sid}))
                return 0
            print(f"Job {sid} submitted to {address}", file=sys.stderr)
            if args.no_wait:
                print(sid)
                return 0
            await api.follow(sid)
            info = await api.call("GET", f"/api/jobs/{sid}")
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                print(f"Job {sid} {info['status']}"
                      + (f": {info['message'].splitlines()[0]}" if info["status"] != "SUCCEEDED"
                         and info.get("message") else ""), file=sys.stderr)
            return 0 if info["status"] == "SUCCEEDED" else 1
        if args.job_command == "list":
            jobs = await api.call("GET", "/api/jobs/")
            if args.json:
                print(json.dumps(jobs, indent=2))
            else:
                for j in jobs:
                    print(_format_job(j))
            return 0
        if args.job_command == "status":
            j = await api.call("GET", f"/api/jobs/{args.job_id}")
            if args.json:
                print(json.dumps(j, indent=2))
            else:
                print(_format_job(j))
                if j.get("message"):
                    print(j["message"])
            return 0
        if args.job_command == "logs":
            if args.follow:
                await api.follow(args.job_id)
            else:
                sys.stdout.write((await api.call("GET", f"/api/jobs/{args.job_id}/logs"))["logs"])
            return 0
        if args.job_command == "stop":
            stopped = (await api.call("POST", f"/api/jobs/{args.job_id}/stop"))["stopped"]
            if args.json:
                print(json.dumps({"stopped": stopped}))
            else:
                print(f"Job {args.job_id} is being stopped" if stopped
                      else f"Job {args.job_id} was not running")
            return 0
        if args.job_command == "delete":
            deleted = (await api.call("DELETE", f"/api/jobs/{args.job_id}"))["deleted"]
            print(json.dumps({"deleted": deleted}) if args.json else f"Job {args.job_id} deleted")
            return 0
    raise JobCliError(f"unknown job command {args.job_command}")


def cmd_job(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def add_parser(sub: Any, common: Any) -> None:
    """`agentctl job ...` on agentctl's parser (common adds --socket and --json)."""
    jp = sub.add_parser("job", help="submit and manage jobs through the head's jobs API "
                                    "(Ray's `ray job`)")
    jsub = jp.add_subparsers(dest="job_command", required=True, metavar="JOB_COMMAND")

    def job_parser(name: str, text: str) -> argparse.ArgumentParser:
        p = jsub.add_parser(name, help=text)
        common(p)
        p.add_argument("--address", default=None,
                       help="the jobs API, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, "
                            "or the head of this machine's cluster)")
        p.add_argument("--token-file", default=None, metavar="FILE",
                       help=f"the cluster token (default ${tokens.TOKEN_ENV}, $RAY_AUTH_TOKEN, "
                            f"or this machine's agent)")
        p.set_defaults(func=cmd_job)
        return p

    s = job_parser("submit", "run COMMAND as a job and follow its logs")
    s.add_argument("--submission-id", default=None)
    s.add_argument("--working-dir", default=None, metavar="DIR",
                   help="upload DIR and run the job in it")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job (repeatable)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--entrypoint-num-cpus", type=float, default=None)
    s.add_argument("--entrypoint-num-gpus", type=float, default=None)
    s.add_argument("--entrypoint-memory", type=int, default=None, metavar="BYTES")
    s.add_argument("--entrypoint-resources", default=None, metavar="JSON")
    s.add_argument("--no-wait", action="store_true", help="print the id and return at once")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    job_parser("list", "all jobs: submitted ones, then drivers started by hand")
    for name, text in (("status", "one job's status"), ("stop", "stop a job (SIGTERM, then "
                                                               "SIGKILL to its process group)"),
                       ("delete", "forget a finished job and its logs")):
        p = job_parser(name, text)
        p.add_argument("job_id", metavar="ID")
    lg = job_parser("logs", "a job's output")
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
