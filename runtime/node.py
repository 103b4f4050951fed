"""A node: the GCS (head only), object store and raylet of one machine, started
and stopped through the supervisor.

``runtime.init()`` uses it to start a private cluster; ``node-agent`` uses the
same class for head and worker nodes, so both run exactly the same processes.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from runtime import config, ids
from runtime.gpu import resolve_gpu_ids
from runtime.rpc import TOKEN_ENV
from runtime.supervisor import ProcessSpec, Supervisor

log = logging.getLogger("runtime.node")


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


def node_resources(cfg: NodeConfig) -> tuple[Dict[str, float], List[int]]:
    """Total resources of the node (Ray's names) and the GPU ids it may hand out."""
    import psutil

    for key in ("CPU", "GPU"):
        if key in cfg.resources:
            raise ValueError(f"use num_{key.lower()}s instead of putting {key!r} in resources")
    for k, v in cfg.resources.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"resource {k!r} must be a non-negative number, got {v!r}")
    cpus = float(cfg.num_cpus if cfg.num_cpus is not None else (os.cpu_count() or 1))
    gpu_ids = resolve_gpu_ids(cfg.num_gpus)
    total: Dict[str, float] = {"CPU": cpus}
    if gpu_ids:
        total["GPU"] = float(len(gpu_ids))
    store = cfg.object_store_memory or default_object_store_memory()
    total["memory"] = float(int(psutil.virtual_memory().available * 0.7))
    total["object_store_memory"] = float(store)
    total[f"node:{cfg.node_ip}"] = 1.0
    if cfg.head:
        total["node:__internal_head__"] = 1.0
    total.update({k: float(v) for k, v in cfg.resources.items()})
    return total, gpu_ids


class Node:
    def __init__(self, cfg: NodeConfig, supervisor: Optional[Supervisor] = None) -> None:
        self.cfg = cfg
        self.node_id = ids.random_id(ids.NODE_ID_SIZE)
        self.supervisor = supervisor or Supervisor()
        self._own_supervisor = supervisor is None
        self.token = cfg.token or secrets.token_urlsafe(32)
        self.gcs_address = cfg.gcs_address
        self.store_address = ""
        self.raylet_address = ""
        self.resources: Dict[str, float] = {}
        self.gpu_ids: List[int] = []
        self.pids: Dict[str, int] = {}

    @property
    def session_dir(self) -> str:
        return self.cfg.session_dir

    def _spec(self, name: str, module: str, args: List[str]) -> ProcessSpec:
        run_dir = os.path.join(self.session_dir, "run")
        os.makedirs(run_dir, exist_ok=True)
        ready_file = os.path.join(run_dir, f"{name}-{self.node_id.hex()[:8]}.ready")
        argv = [sys.executable, "-m", module, "--session-dir", self.session_dir,
                "--ready-file", ready_file] + args
        return ProcessSpec(name=name, argv=argv,
                           log_path=os.path.join(self.session_dir, "logs", f"{name}.log"),
                           env={TOKEN_ENV: self.token}, ready_file=ready_file, stop_grace_s=3.0)

    def start(self) -> None:
        """Start the node's processes; raise ComponentStartError naming what failed."""
        cfg = self.cfg
        self.resources, self.gpu_ids = node_resources(cfg)
        node_hex = self.node_id.hex()
        timeout = config.COMPONENT_START_TIMEOUT_S
        gcs = None
        if cfg.head:
            gcs = self.supervisor.spawn(self._spec(
                "gcs", "runtime.gcs", ["--host", cfg.node_ip, "--port", str(cfg.gcs_port),
                                       "--cluster-id", node_hex[:12]]))
        store = self.supervisor.spawn(self._spec(
            "object_store", "runtime.object_store",
            ["--node-id", node_hex, "--host", cfg.node_ip, "--port", "0",
             "--capacity", str(int(self.resources["object_store_memory"]))]))
        # GCS and store start in parallel; the raylet needs both addresses.
        if gcs is not None:
            info = gcs.wait_ready(timeout)
            self.gcs_address = f"{cfg.node_ip}:{info['port']}"
            self.pids["gcs"] = gcs.pid
        info = store.wait_ready(timeout)
        self.store_address = f"{cfg.node_ip}:{info['port']}"
        self.pids["object_store"] = store.pid
        raylet = self.supervisor.spawn(self._spec(
            "raylet", "runtime.raylet",
            ["--node-id", node_hex, "--node-ip", cfg.node_ip, "--gcs-address", self.gcs_address,
             "--store-address", self.store_address, "--resources", json.dumps(self.resources),
             "--gpu-ids", ",".join(str(i) for i in self.gpu_ids),
             "--object-store-memory", str(int(self.resources["object_store_memory"])),
             "--prestart", str(self._prestart())] + (["--is-head"] if cfg.head else [])))
        info = raylet.wait_ready(timeout)
        self.raylet_address = f"{cfg.node_ip}:{info['port']}"
        self.pids["raylet"] = raylet.pid

    def _prestart(self) -> int:
        if self.cfg.prestart_workers is not None:
            return self.cfg.prestart_workers
        return max(1, min(int(self.resources.get("CPU", 1)), config.PRESTART_MAX_WORKERS))

    def address_info(self) -> dict:
        return {"node_ip_address": self.cfg.node_ip, "gcs_address": self.gcs_address,
                "address": self.gcs_address, "raylet_address": self.raylet_address,
                "object_store_address": self.store_address, "session_dir": self.session_dir,
                "node_id": self.node_id.hex(), "webui_url": None}

    def stop(self, grace: float = 3.0) -> None:
        """Stop raylet (and its workers) first, then the store, then the GCS."""
        for name in ("raylet", "object_store", "gcs"):
            proc = self.supervisor.get(name)
            if proc is not None:
                proc.stop(grace)
        if self._own_supervisor:
            self.supervisor.close()
