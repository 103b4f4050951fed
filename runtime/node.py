"""A node: the GCS (head only), object store and raylet of one machine, started
and stopped through the supervisor.

``runtime.init()`` uses it to start a private cluster; ``node-agent`` uses the
same class for head and worker nodes, so both run exactly the same processes.

The two users differ in two settings only:

* ports: a private cluster binds free ports and learns them from the ready
  files; the agent gives every component a fixed port (GCS 6379, raylet and
  object store from its config), so a component restarted after a crash comes
  back at the address the others already use;
* restarts: a private cluster never restarts anything (a dead component is an
  error the driver sees); under the agent, ``NodeConfig.restart`` makes the
  supervisor restart a dead component with backoff until it crash-loops.

What a restart means for each component (see :meth:`Node.on_component_exit`):

* GCS: its tables are in memory, so a new GCS knows no node. Each raylet's next
  ReportResources is answered ``node_dead`` and the raylet exits; the supervisor
  restarts it and it registers again.
* raylet: a new raylet is a new node (Ray's semantics): its workers died with it,
  so it gets a fresh node id, and the old id is reported dead to the GCS.
* object store: its objects are gone; the files the dead store left in
  ``/dev/shm`` are deleted before it restarts.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from runtime import config, ids
from runtime.gpu import detect_accelerator_type, resolve_gpu_ids
from runtime.labels import ACCELERATOR_RESOURCE_PREFIX, check_node_labels
from runtime.private_fs import ensure_private_dir
from runtime.rpc import TOKEN_ENV, new_cluster_token
from runtime.supervisor import ComponentStartError, ManagedProcess, ProcessSpec, RestartPolicy, Supervisor

log = logging.getLogger("runtime.node")

#: Start order; stop order is the reverse (workers go with their raylet).
COMPONENTS = ("gcs", "object_store", "raylet")


@dataclass
class NodeConfig:
    head: bool = True
    node_ip: str = "127.0.0.1"
    gcs_address: str = ""            # worker nodes: the head's GCS
    gcs_port: int = 0                # head: 0 = any free port (6379 under node-agent)
    num_cpus: Optional[float] = None
    num_gpus: Optional[float] = None
    resources: Dict[str, float] = field(default_factory=dict)
    object_store_memory: Optional[int] = None
    session_dir: str = ""
    token: str = ""
    prestart_workers: Optional[int] = None  # default: one per CPU, up to PRESTART_MAX_WORKERS
    labels: Dict[str, str] = field(default_factory=dict)
    """Custom node labels (Ray's init(labels=...)); the raylet adds Ray's defaults:
    ray.io/node-id, and ray.io/accelerator-type from an accelerator_type resource."""
    raylet_port: int = 0             # 0 = any free port; node-agent: a fixed port
    object_store_port: int = 0       # 0 = any free port; node-agent: a fixed port
    object_transfer_port: int = 0    # the store's TCP port for node-to-node pulls (same)
    memory: Optional[float] = None   # the "memory" resource; default 70% of available RAM
    restart: Optional[RestartPolicy] = None
    """None: a component that dies stays dead (private clusters). node-agent sets a
    policy so the supervisor restarts it with backoff and detects crash loops."""
    component_env: Dict[str, Dict[str, str]] = field(default_factory=dict)
    """Extra environment per component ("gcs", "object_store", "raylet", or "all"
    for every one), e.g. RUNTIME_* tunables from the agent's config."""
    stop_grace_s: float = 3.0


def default_object_store_memory() -> int:
    import psutil

    total = psutil.virtual_memory().total
    size = min(int(total * config.OBJECT_STORE_FRACTION), config.OBJECT_STORE_MAX_DEFAULT)
    try:
        shm = shutil.disk_usage("/dev/shm").total
        size = min(size, int(shm * 0.95))
    except OSError:
        pass
    return size


def check_resource_amount(name: str, amount: Any) -> None:
    """An amount of a resource is a finite, non-negative number; NaN and infinity would
    poison every comparison the scheduler makes."""
    if (not isinstance(amount, numbers.Real) or isinstance(amount, bool)
            or not math.isfinite(amount) or amount < 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {amount!r}")


def node_resources(cfg: NodeConfig) -> tuple[Dict[str, float], List[int]]:
    """Total resources of the node (Ray's names) and the GPU ids it may hand out. A node
    whose GPUs' model is known has 1 of ``accelerator_type:<model>``, as in Ray."""
    import psutil

    for key in ("CPU", "GPU"):
        if key in cfg.resources:
            raise ValueError(f"use num_{key.lower()}s instead of putting {key!r} in resources")
    for k, v in cfg.resources.items():
        check_resource_amount(f"resource {k!r}", v)
    for key in ("num_cpus", "num_gpus", "object_store_memory", "memory"):
        if getattr(cfg, key) is not None:
            check_resource_amount(key, getattr(cfg, key))
    cpus = float(cfg.num_cpus if cfg.num_cpus is not None else (os.cpu_count() or 1))
    gpu_ids = resolve_gpu_ids(cfg.num_gpus)
    total: Dict[str, float] = {"CPU": cpus}
    if gpu_ids:
        total["GPU"] = float(len(gpu_ids))
    store = cfg.object_store_memory or default_object_store_memory()
    if cfg.memory is not None:
        total["memory"] = float(cfg.memory)
    else:
        total["memory"] = float(int(psutil.virtual_memory().available * 0.7))
    total["object_store_memory"] = float(store)
    total[f"node:{cfg.node_ip}"] = 1.0
    if cfg.head:
        total["node:__internal_head__"] = 1.0
    accelerator = detect_accelerator_type(gpu_ids)
    if accelerator:
        total[ACCELERATOR_RESOURCE_PREFIX + accelerator] = 1.0
    total.update({k: float(v) for k, v in cfg.resources.items()})
    return total, gpu_ids


class Node:
    """The processes of one node. ``start()`` raises ComponentStartError naming the
    component that failed; with a restart policy, a component that is still being
    restarted by the supervisor is not an error (see ``start_errors``)."""

    def __init__(self, cfg: NodeConfig, supervisor: Optional[Supervisor] = None) -> None:
        self.cfg = cfg
        self.node_id = ids.random_id(ids.NODE_ID_SIZE)
        # The store names its /dev/shm files after the node id it was started with;
        # that name stays when a restarted raylet becomes a new node.
        self.store_node_hex = self.node_id.hex()
        self.supervisor = supervisor or Supervisor()
        self._own_supervisor = supervisor is None
        self.token = cfg.token or new_cluster_token()
        self.gcs_address = cfg.gcs_address
        self.store_address = ""
        self.raylet_address = ""
        self.resources: Dict[str, float] = {}
        self.labels: Dict[str, str] = {}  # custom; the raylet adds Ray's defaults
        self.gpu_ids: List[int] = []
        self.pids: Dict[str, int] = {}
        self.start_errors: Dict[str, ComponentStartError] = {}

    @property
    def session_dir(self) -> str:
        return self.cfg.session_dir

    def _spec(self, name: str, module: str, args: List[str]) -> ProcessSpec:
        run_dir = os.path.join(self.session_dir, "run")
        ensure_private_dir(run_dir)  # ready files name every component: 0700 like the session
        ready_file = os.path.join(run_dir, f"{name}-{self.node_id.hex()[:8]}.ready")
        argv = [sys.executable, "-m", module, "--session-dir", self.session_dir,
                "--ready-file", ready_file] + args
        env = {TOKEN_ENV: self.token}
        env.update(self.cfg.component_env.get("all", {}))
        env.update(self.cfg.component_env.get(name, {}))
        spec = ProcessSpec(name=name, argv=argv,
                           log_path=os.path.join(self.session_dir, "logs", f"{name}.log"),
                           env=env, ready_file=ready_file, stop_grace_s=self.cfg.stop_grace_s)
        if self.cfg.restart is not None:
            spec.restart = self.cfg.restart
        return spec

    def _wait(self, proc: ManagedProcess, port: int, timeout: float) -> int:
        """Wait for proc's ready file; the port it serves on.

        With a restart policy and a fixed port, a component that died before it was
        ready is being restarted by the supervisor: remember the error for the
        caller's status and carry on with the known port."""
        try:
            info = proc.wait_ready(timeout)
        except ComponentStartError as exc:
            if self.cfg.restart is None or not self.cfg.restart.restart or not port:
                raise
            log.error("%s is not ready yet; the supervisor keeps restarting it: %s",
                      proc.name, str(exc).splitlines()[0])
            self.start_errors[proc.name] = exc
            return port
        self.pids[proc.name] = proc.pid or 0
        return int(info["port"])

    def start(self) -> None:
        """Start the node's processes; raise ComponentStartError naming what failed."""
        cfg = self.cfg
        self.labels = check_node_labels(cfg.labels, "node labels")
        self.resources, self.gpu_ids = node_resources(cfg)
        node_hex = self.node_id.hex()
        timeout = config.COMPONENT_START_TIMEOUT_S
        self.start_errors = {}
        gcs = None
        if cfg.head:
            gcs = self.supervisor.spawn(self._spec(
                "gcs", "runtime.gcs", ["--host", cfg.node_ip, "--port", str(cfg.gcs_port),
                                       "--cluster-id", node_hex[:12]]))
        store = self.supervisor.spawn(self._spec(
            "object_store", "runtime.object_store",
            ["--node-id", node_hex, "--host", cfg.node_ip, "--port", str(cfg.object_store_port),
             "--capacity", str(int(self.resources["object_store_memory"])),
             "--transfer-port", str(cfg.object_transfer_port)]))
        # GCS and store start in parallel; the raylet needs both addresses.
        if gcs is not None:
            self.gcs_address = f"{cfg.node_ip}:{self._wait(gcs, cfg.gcs_port, timeout)}"
        self.store_address = f"{cfg.node_ip}:{self._wait(store, cfg.object_store_port, timeout)}"
        raylet = self.supervisor.spawn(self._spec(
            "raylet", "runtime.raylet",
            ["--node-id", node_hex, "--node-ip", cfg.node_ip, "--port", str(cfg.raylet_port),
             "--gcs-address", self.gcs_address,
             "--store-address", self.store_address, "--resources", json.dumps(self.resources),
             "--gpu-ids", ",".join(str(i) for i in self.gpu_ids),
             "--object-store-memory", str(int(self.resources["object_store_memory"])),
             "--prestart", str(self._prestart())] + (["--is-head"] if cfg.head else [])
            + (["--labels", json.dumps(self.labels, sort_keys=True)] if self.labels else [])))
        self.raylet_address = f"{cfg.node_ip}:{self._wait(raylet, cfg.raylet_port, timeout)}"

    def _prestart(self) -> int:
        if self.cfg.prestart_workers is not None:
            return self.cfg.prestart_workers
        return max(1, min(int(self.resources.get("CPU", 1)), config.PRESTART_MAX_WORKERS))

    def processes(self) -> List[ManagedProcess]:
        """This node's supervised components, in start order."""
        return [p for p in (self.supervisor.get(n) for n in COMPONENTS) if p is not None]

    def on_component_exit(self, proc: ManagedProcess, returncode: int) -> Optional[bytes]:
        """Prepare the restart of a component that exited unexpectedly.

        Called from the supervisor's monitor thread (its on_exit callback), which
        runs the restart only on a later iteration, so changes made here apply to
        it. Returns the node id that stopped existing when the raylet died (the
        caller reports it dead to the GCS), else None.
        """
        if proc.name == "raylet":
            old = self.node_id
            self.node_id = ids.random_id(ids.NODE_ID_SIZE)
            argv = list(proc.spec.argv)
            argv[argv.index("--node-id") + 1] = self.node_id.hex()
            proc.spec.argv = argv
            log.warning("raylet of node %s exited; it restarts as node %s",
                        old.hex()[:8], self.node_id.hex()[:8])
            return old
        if proc.name == "object_store":
            self.remove_store_files()
        return None

    def remove_store_files(self) -> None:
        """Delete the /dev/shm files of this node's object store once it is provably dead
        (its lock is free: runtime/object_store/reclaim.py); a live store is left alone."""
        from runtime.object_store.reclaim import log_sweep, sweep_dead_store

        log_sweep(sweep_dead_store("/dev/shm", self.store_node_hex), "dead object store")

    def address_info(self) -> dict:
        return {"node_ip_address": self.cfg.node_ip, "gcs_address": self.gcs_address,
                "address": self.gcs_address, "raylet_address": self.raylet_address,
                "object_store_address": self.store_address, "session_dir": self.session_dir,
                "node_id": self.node_id.hex(), "webui_url": None}

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop raylet (and its workers) first, then the store, then the GCS.

        Each is stopped (SIGTERM, grace, SIGKILL, reaped) before the next, so the
        raylet can still unregister from the GCS and the store can still delete
        its files. Pending restarts are cancelled."""
        grace = self.cfg.stop_grace_s if grace is None else grace
        for name in reversed(COMPONENTS):
            proc = self.supervisor.get(name)
            if proc is not None:
                proc.stop(grace)
        # A store that stopped cleanly removed its files; one that died did not.
        self.remove_store_files()
        if self._own_supervisor:
            self.supervisor.close()
