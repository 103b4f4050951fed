"""Two nodes on this machine, this runtime and Ray 2.60 side by side: objects moved between
the nodes and tasks pinned to the other node.

    .venv/bin/python scripts/bench_cluster.py [--runs 3] [--json out.json]

Each run measures this runtime (``python -m runtime.bench --only cluster``: the
driver's node on 127.0.0.1, a second node on 127.0.0.2) and then Ray, started as
Ray's docs say (``ray start --head --node-ip-address 127.0.0.1``, ``ray start
--address ... --node-ip-address 127.0.0.2``), with the very same measuring code
(``runtime/bench.py: cluster_bench``, loaded by path into Ray's venv). Runs
alternate which system goes first. Every figure of a run is itself a median of 3;
the table shows the median over runs and the ratio (> 1: this runtime is better).
``--repo DIR`` measures another checkout of this runtime (with its own .venv), and
``--before DIR`` adds one more to every run, e.g. the code before a change.

The failure figures (``--figures faults``; ``all`` is the default) use a fresh pair of
nodes per run: this runtime under two node agents (``agentctl start --head`` /
``join``, default config, so the head agent restarts a dead GCS), Ray as above. One
driver per system (``bench.node_death_s`` and ``bench.gcs_recovery``) SIGKILLs node 2
(our agent and its whole tree; Ray's second raylet and its children) and times until
``ray.nodes()`` says it is dead; then SIGKILLs the GCS while it holds a named detached
actor and times until a task of a function defined after the kill runs and the actor,
looked up by name, answers with its state kept, or reports what failed after 30 s.

Ray's venv is .venv-ray (``python3 -m venv .venv-ray && .venv-ray/bin/pip install
'ray==2.60.*' numpy psutil``). Ray's processes are found by the private temp dir
this script gives them and stopped by PID; ``ray stop`` is never used, since it
would stop every Ray cluster of the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
FIGURES = [("transfer_100mb_gbps", "GB/s"), ("transfer_1gb_gbps", "GB/s"),
           ("cross_node_tasks_per_s", "tasks/s"), ("node_death_detect_s", "s"),
           ("gcs_recovery_s", "s")]
#: Figures where less is better (the ratio is turned round, so > 1 still means "ours better").
LOWER_IS_BETTER = {"node_death_detect_s", "gcs_recovery_s"}
GCS_WAIT_S = 30.0  # how long a cluster gets to work again after its GCS is killed


def scrubbed_env(**extra: str) -> Dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- inside Ray's venv ------------------------------------------------------------------------
def ray_driver(address: str, json_path: str, store_bytes: int) -> None:
    """The measuring driver for Ray (runs under .venv-ray/bin/python)."""
    import ray

    spec = importlib.util.spec_from_file_location("bench_figures", REPO / "runtime" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # only the stdlib and psutil: no `runtime` import
    # The driver's node is the head (127.0.0.1); without this Ray takes the machine's
    # own address for the driver's.
    ray.init(address=address, _node_ip_address="127.0.0.1")
    deadline = time.monotonic() + 60
    other = None
    while other is None and time.monotonic() < deadline:
        other = next((n["NodeID"] for n in ray.nodes()
                      if n["Alive"] and n["NodeManagerAddress"] == "127.0.0.2"), None)
        time.sleep(0.2)
    if other is None:
        raise SystemExit("Ray's second node (127.0.0.2) did not join in 60 s")
    out: Dict[str, float] = {}

    def emit(name, value, unit):
        out[name] = value
        print(f"{name:28s} {value:12.4g} {unit}", flush=True)

    bench.cluster_bench(ray, emit, other)
    ray.shutdown()
    with open(json_path, "w") as fh:
        json.dump(out, fh)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_figures", REPO / "runtime" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # only the stdlib and psutil: no `runtime` import
    return bench


def fault_driver(module: str, address: str, json_path: str, node_roots: List[int],
                 gcs_pid: int) -> None:
    """The failure figures, one driver for either system (runs under that system's venv):
    SIGKILL node 2's processes and time until the head reports it dead; then SIGKILL the
    GCS and time until the cluster works again (see bench.gcs_recovery). Leaves with
    os._exit: after a GCS kill Ray's driver can block in shutdown for a minute."""
    bench = _load_bench()
    ray = importlib.import_module(module)
    kw = {"_node_ip_address": "127.0.0.1"} if module == "ray" else {}
    ray.init(address=address, namespace="bench", **kw)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(n["Alive"] and n["NodeManagerAddress"] == "127.0.0.2" for n in ray.nodes()):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"{module}: the second node (127.0.0.2) did not join in 60 s")

    @ray.remote(num_cpus=0)
    def warm():
        return None

    ray.get([warm.remote() for _ in range(20)], timeout=120)
    out: Dict[str, object] = {}
    out["node_death_detect_s"] = bench.node_death_s(
        ray, "127.0.0.2", lambda: bench.sigkill_tree(node_roots))
    print(f"{module}: node 2 reported dead after {out['node_death_detect_s']:.2f} s", flush=True)
    rec = bench.gcs_recovery(ray, lambda: bench.sigkill_tree([gcs_pid], children=False),
                             wait_s=GCS_WAIT_S)
    print(f"{module}: GCS kill: {rec['outcome']}", flush=True)
    out.update(rec)
    out["gcs_recovery_outcome"] = out.pop("outcome")
    with open(json_path, "w") as fh:
        json.dump(out, fh)
    sys.stdout.flush()
    os._exit(0)


# ---- Ray's two nodes ----------------------------------------------------------------------------
class RayCluster:
    """Ray's head (127.0.0.1) and a second node (127.0.0.2), each with its own ports."""

    def __init__(self, ray_bin: Path, num_cpus: int, store_bytes: int) -> None:
        self.ray_bin = ray_bin
        self.num_cpus = num_cpus
        self.store_bytes = store_bytes
        self.temp = tempfile.mkdtemp(prefix="rbc-", dir="/tmp")  # short: Ray's socket paths
        self.port = free_port()
        # A HOME of its own: Ray reads and writes ~/.ray (an auth token file there makes
        # Ray's processes demand one), and other Ray clusters of the machine use it too.
        home = os.path.join(self.temp, "home")
        os.mkdir(home)
        self.env = scrubbed_env(RAY_USAGE_STATS_ENABLED="0", HOME=home)

    def _start(self, *args: str) -> None:
        subprocess.run([str(self.ray_bin), "start", *args, "--num-cpus", str(self.num_cpus),
                        "--object-store-memory", str(self.store_bytes),
                        "--dashboard-agent-listen-port", str(free_port()),
                        "--dashboard-agent-grpc-port", str(free_port()),
                        "--runtime-env-agent-port", str(free_port()),
                        "--metrics-export-port", str(free_port()),
                        "--disable-usage-stats"],
                       env=self.env, check=True, stdout=subprocess.DEVNULL, timeout=180)

    def start(self) -> str:
        self._start("--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                    "--include-dashboard", "false",
                    "--temp-dir", self.temp)
        self._start("--address", f"127.0.0.1:{self.port}", "--node-ip-address", "127.0.0.2")
        return f"127.0.0.1:{self.port}"

    def pids(self) -> List[int]:
        """Ray's processes of this cluster: those naming its temp dir, and their children."""
        import psutil

        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in arg for arg in p.info["cmdline"] or ()):
                    roots.append(p)
            except psutil.Error:
                pass
        pids = set()
        for p in roots:
            pids.add(p.pid)
            try:
                pids.update(c.pid for c in p.children(recursive=True))
            except psutil.Error:
                pass
        return sorted(pids)

    def stop(self) -> None:
        import psutil

        procs = []
        for pid in self.pids():
            try:
                p = psutil.Process(pid)
                p.terminate()
                procs.append(p)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _find(self, exe: str, *needles: str) -> int:
        import psutil

        for pid in self.pids():
            try:
                cmd = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            if cmd and os.path.basename(cmd[0]) == exe and all(
                    any(n in a for a in cmd) for n in needles):
                return pid
        raise RuntimeError(f"Ray's {exe} {' '.join(needles)} not found among the processes "
                           f"of {self.temp}")

    def raylet_pid(self, node_ip: str) -> int:
        return self._find("raylet", f"--node_ip_address={node_ip}")

    def gcs_pid(self) -> int:
        return self._find("gcs_server")


# ---- this runtime's two nodes, each under a node agent -------------------------------------------
class AgentCluster:
    """Two node agents (``agentctl start --head`` on 127.0.0.1, ``agentctl join`` on
    127.0.0.2), with their defaults (supervision too: the head agent restarts a dead GCS),
    in a private temp dir; stopped by PID."""

    def __init__(self, repo: Path, num_cpus: int, store_bytes: int) -> None:
        self.bin = repo / ".venv" / "bin"
        self.num_cpus = num_cpus
        self.store_bytes = store_bytes
        self.temp = tempfile.mkdtemp(prefix="obc-", dir="/tmp")
        self.env = scrubbed_env(PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        self.token = ""

    def _dir(self, name: str) -> str:
        return os.path.join(self.temp, name)

    def _ctl(self, name: str, *args: str) -> str:
        d = self._dir(name)
        argv = [str(self.bin / "agentctl"), *args, "--socket", os.path.join(d, "agent.sock")]
        if args[0] in ("start", "join"):
            argv += ["--state-dir", os.path.join(d, "state"), "--config",
                     os.path.join(d, "agent.toml")]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=self.env,
                              cwd=d)
        if proc.returncode != 0:
            raise RuntimeError(f"agentctl {' '.join(args)} ({name}) failed with "
                               f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def _config(self, name: str) -> None:
        os.mkdir(self._dir(name))
        ports = "\n".join(f"{k} = {free_port()}" for k in
                          ("gcs", "agent", "raylet", "object_store", "object_transfer"))
        Path(self._dir(name), "agent.toml").write_text(
            f"[ports]\n{ports}\n\n[resources]\nnum_cpus = {self.num_cpus}\n"
            f"object_store_memory = {self.store_bytes}\n")

    def start(self) -> str:
        self._config("head")
        self._config("w2")
        gcs_port = Path(self._dir("head"), "agent.toml").read_text().split("gcs = ")[1].split()[0]
        started = json.loads(self._ctl("head", "start", "--head", "--node-ip", "127.0.0.1",
                                       "--port", gcs_port, "--json"))
        address, self.token = started["gcs_address"], started["token"]
        self._ctl("w2", "join", address, "--token", self.token, "--node-ip", "127.0.0.2")
        return address

    def agent_pid(self, name: str) -> int:
        with open(os.path.join(self._dir(name), "state", "agent.lock")) as fh:
            return int(fh.read().strip())

    def gcs_pid(self) -> int:
        status = json.loads(self._ctl("head", "status", "--json"))
        for p in status["processes"]:
            if p["component"] == "gcs" and p.get("pid"):
                return int(p["pid"])
        raise RuntimeError(f"the head agent ({self._dir('head')}) reports no running GCS: "
                           f"{status['processes']}")

    def pids(self) -> List[int]:
        """The agents, everything under them, and anything naming the temp dir."""
        import psutil

        found = set()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in a for a in p.info["cmdline"] or ()):
                    found.add(p.pid)
            except psutil.Error:
                pass
        for name in ("head", "w2"):
            try:
                pid = self.agent_pid(name)
                found.add(pid)
                found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except (OSError, ValueError, psutil.Error):
                pass
        found.discard(os.getpid())
        return sorted(found)

    def stop(self) -> None:
        import psutil

        procs = []
        for pid in self.pids():
            try:
                p = psutil.Process(pid)
                p.kill()
                procs.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


# ---- one sitting ---------------------------------------------------------------------------------
def run_ours(python: Path, repo: Path, store_gb: float, out: Path) -> Dict[str, float]:
    subprocess.run([str(python), "-m", "runtime.bench", "--only", "cluster", "--store-gb",
                    str(store_gb), "--json", str(out)], cwd=repo, env=scrubbed_env(),
                   check=True, timeout=1800)
    return json.loads(out.read_text())


def run_ray(python: Path, store_gb: float, out: Path) -> Dict[str, float]:
    cluster = RayCluster(python.parent / "ray", 2, int(store_gb * 1e9))
    try:
        address = cluster.start()
        subprocess.run([str(python), __file__, "--ray-driver", address, "--json", str(out),
                        "--store-gb", str(store_gb)],
                       cwd=REPO, env=cluster.env, check=True, timeout=1800)
    finally:
        cluster.stop()
    return json.loads(out.read_text())


def faults_ours(repo: Path, out: Path) -> Dict[str, float]:
    """The failure figures of this runtime, under node agents (a fresh pair per run)."""
    cluster = AgentCluster(repo, 2, 500_000_000)
    try:
        address = cluster.start()
        python = repo / ".venv" / "bin" / "python"
        subprocess.run([str(python), __file__, "--fault-driver", "runtime", address,
                        "--json", str(out), "--node-roots", str(cluster.agent_pid("w2")),
                        "--gcs-pid", str(cluster.gcs_pid())],
                       cwd=cluster.temp, env={**cluster.env, "NODE_AGENT_TOKEN": cluster.token},
                       check=True, timeout=600)
    finally:
        cluster.stop()
    return json.loads(out.read_text())


def faults_ray(python: Path, out: Path) -> Dict[str, float]:
    """The failure figures of Ray: node 2 is its raylet and the raylet's children."""
    cluster = RayCluster(python.parent / "ray", 2, 500_000_000)
    try:
        address = cluster.start()
        subprocess.run([str(python), __file__, "--fault-driver", "ray", address,
                        "--json", str(out), "--node-roots", str(cluster.raylet_pid("127.0.0.2")),
                        "--gcs-pid", str(cluster.gcs_pid())],
                       cwd=REPO, env=cluster.env, check=True, timeout=600)
    finally:
        cluster.stop()
    return json.loads(out.read_text())


def table(ours: List[Dict[str, float]], ray: List[Dict[str, float]],
          before: List[Dict[str, float]]) -> str:
    """Markdown: medians over runs, ours/Ray (and ours/before, when measured)."""
    head = "| figure | unit | this runtime | Ray 2.60 | better by |"
    rule = "| --- | --- | ---: | ---: | ---: |"
    if before:
        head += " before | vs before |"
        rule += " ---: | ---: |"
    lines = [head + " runs (ours / Ray) |", rule + " --- |"]
    for name, unit in FIGURES:
        a = [r[name] for r in ours if name in r]
        b = [r[name] for r in ray if name in r]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        row = f"| `{name}` | {unit} | {ma:.4g} | {mb:.4g} | {_ratio(name, ma, mb)} |"
        c = [r[name] for r in before if name in r]
        if before and c:
            mc = statistics.median(c)
            row += f" {mc:.4g} | {_ratio(name, ma, mc)} |"
        runs = ", ".join(f"{x:.3g}" for x in a) + " / " + ", ".join(f"{x:.3g}" for x in b)
        lines.append(f"{row} {runs} |")
    notes = [f"- GCS kill, {who}, run {i + 1}: {r['gcs_recovery_outcome']}"
             for who, rows in (("ours", ours), ("Ray", ray))
             for i, r in enumerate(rows) if "gcs_recovery_outcome" in r]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _ratio(name: str, ours: float, other: float) -> str:
    """ours/other, turned round for the figures where less is better; NaN (never happened
    within the bounded wait) reads as such."""
    if ours != ours or other != other:
        return "ours: never" if ours != ours and other == other else (
            "Ray: never" if other != other and ours == ours else "-")
    return f"{(other / ours if name in LOWER_IS_BETTER else ours / other):.2f}x"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--store-gb", type=float, default=3.0, help="object store size per node")
    p.add_argument("--json", default="", help="write every run's figures here")
    p.add_argument("--repo", default=str(REPO),
                   help="the checkout of this runtime to measure (its .venv is used)")
    p.add_argument("--ray-python", default=str(REPO / ".venv-ray" / "bin" / "python"))
    p.add_argument("--only", choices=("both", "ours", "ray"), default="both")
    p.add_argument("--before", default="",
                   help="another checkout of this runtime (with its .venv) measured in every "
                        "run too, e.g. the code before a change")
    p.add_argument("--figures", choices=("all", "transfer", "faults"), default="all",
                   help="transfer and cross-node tasks, the failure figures (dead node "
                        "detection, GCS recovery), or all")
    p.add_argument("--ray-driver", default="", help=argparse.SUPPRESS)
    p.add_argument("--fault-driver", nargs=2, metavar=("MODULE", "ADDRESS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--node-roots", default="", help=argparse.SUPPRESS)
    p.add_argument("--gcs-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ray_driver:
        ray_driver(args.ray_driver, args.json, int(args.store_gb * 1e9))
        return 0
    if args.fault_driver:
        fault_driver(args.fault_driver[0], args.fault_driver[1], args.json,
                     [int(x) for x in args.node_roots.split(",") if x], args.gcs_pid)
        return 0
    ray_python = Path(args.ray_python)
    if args.only != "ours" and not ray_python.exists():
        p.error(f"{ray_python} not found: create Ray's venv first (see this script's doc)")
    ours: List[Dict[str, float]] = []
    ray: List[Dict[str, float]] = []
    before: List[Dict[str, float]] = []
    sittings = []
    results = {"ours": ours, "ray": ray, "before": before}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            order = ["ours", "ray"] if i % 2 == 0 else ["ray", "ours"]
            if args.before:
                order.insert(i % 3, "before")
            for who in order:
                if who != "before" and args.only not in ("both", who):
                    continue
                load = os.getloadavg()[0]
                print(f"--- run {i + 1}/{args.runs}: {who} (loadavg {load:.2f})", flush=True)
                out = Path(tmp) / f"{who}-{i}.json"
                faults_out = Path(tmp) / f"{who}-{i}-faults.json"
                figures: Dict[str, float] = {}
                repo = Path(args.repo if who != "before" else args.before)
                if args.figures in ("all", "transfer"):
                    figures.update(run_ray(ray_python, args.store_gb, out) if who == "ray" else
                                   run_ours(repo / ".venv" / "bin" / "python", repo,
                                            args.store_gb, out))
                if args.figures in ("all", "faults"):
                    figures.update(faults_ray(ray_python, faults_out) if who == "ray" else
                                   faults_ours(repo, faults_out))
                results[who].append(figures)
                sittings.append({"run": i, "who": who, "loadavg_start": load,
                                 "figures": results[who][-1]})
    if ours and ray:
        print()
        print(table(ours, ray, before))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sittings": sittings, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
