"""The public API's implementation (re-exported by runtime/__init__.py)."""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import grpc

from runtime import rpc
from runtime._version import __version__
from runtime.actor import ActorHandle
from runtime.core_worker.core_worker import DRIVER, CoreWorker
from runtime.core_worker.current import (core_worker, set_auto_init,
                                         set_core_worker)
from runtime.exceptions import AuthenticationError, ClusterConnectionError
from runtime.labels import check_node_labels
from runtime.node import Node, NodeConfig, check_resource_amount
from runtime.object_ref import ObjectRef
from runtime.shapes import check_timeout
from runtime.vocabulary import ACTOR_DEAD
from runtime.protocol import common_pb2, gcs_pb2, gcs_pb2_grpc, runtime_env_pb2, \
    runtime_env_pb2_grpc
from runtime.rpc_errors import gcs_error
from runtime.runtime_context import get_runtime_context  # noqa: F401  (re-exported)
from runtime.runtime_env import context as runtime_env_context
from runtime.runtime_env.resolve import resolve as resolve_runtime_env
from runtime.runtime_env.resolve import store_for
from runtime.runtime_env.runtime_env import merge_job_and_driver
from runtime.runtime_env.runtime_env import parse as parse_runtime_env
from runtime.session import (find_running_cluster, new_session_dir, require_running_cluster,
                             write_cluster_file)

log = logging.getLogger("runtime")

# Every keyword Ray 2.60's init() takes (its named ones and the hidden ones it pops).
_INIT_KEYWORDS = {
    "num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "local_mode",
    "ignore_reinit_error", "include_dashboard", "dashboard_host", "dashboard_port", "job_config",
    "configure_logging", "logging_level", "logging_format", "logging_config", "log_to_driver",
    "namespace", "runtime_env", "enable_resource_isolation", "cgroup_path", "system_reserved_cpu",
    "system_reserved_memory", "proxy_server_url", "_enable_object_reconstruction",
    "_plasma_directory", "object_spilling_directory", "_node_ip_address",
    "_driver_object_store_memory", "_memory", "_redis_username", "_redis_password", "_temp_dir",
    "_metrics_export_port", "_system_config", "_tracing_startup_hook", "_node_name",
    "_skip_env_hook",
}
# dashboard_host, _redis_username, _redis_password, _node_name and _skip_env_hook concern
# parts this runtime does not have (a dashboard, Redis, env hooks): accepted, nothing to do.
# Keywords that would ask for something this runtime does not do: accepted at their
# defaults only, so nothing a script asks for is silently ignored. Value: why, what instead.
_INIT_UNSUPPORTED = {
    "include_dashboard": "this runtime has no web dashboard; use `raytop` or runtime.util.state",
    "dashboard_port": "this runtime has no web dashboard; use `raytop` or runtime.util.state",
    "job_config": "JobConfig is not supported; pass namespace=, runtime_env= and "
                  "log_to_driver= to init() directly",
    "logging_config": "LoggingConfig is not supported; use logging_level= and logging_format=",
    "enable_resource_isolation": "resource isolation with cgroups is not supported",
    "cgroup_path": "resource isolation with cgroups is not supported",
    "system_reserved_cpu": "resource isolation with cgroups is not supported",
    "system_reserved_memory": "resource isolation with cgroups is not supported",
    "proxy_server_url": "Ray Client proxies are not supported; attach with init(address=...)",
    "_enable_object_reconstruction": "lineage reconstruction is not supported",
    "_plasma_directory": "the object store always lives in /dev/shm",
    "object_spilling_directory": "the spill directory is the session's spill/ directory",
    "_driver_object_store_memory": "the driver has no store of its own; use object_store_memory=",
    "_memory": "use resources= or the memory= option of tasks and actors",
    "_metrics_export_port": "metrics export is not supported",
    "_system_config": "Ray's internal config does not apply to this runtime; its settings are "
                      "RUNTIME_* environment variables (runtime/config.py)",
    "_tracing_startup_hook": "tracing hooks are not supported",
}


class _UnknownInitKeyword(RuntimeError, TypeError):
    """Ray raises RuntimeError for an unknown init() keyword; Python itself would raise
    TypeError. Both catch it."""


def _check_init_keywords(kwargs: Dict[str, Any]) -> None:
    """Refuse what Ray refuses, as Ray words it, and anything asked of a keyword that
    this runtime cannot honour, naming it."""
    if kwargs.get("storage"):
        raise RuntimeError("Cluster-wide storage configuration has been removed. The last Ray "
                           "version supporting the `storage` argument is `ray==2.47`.")
    if kwargs.get("allow_multiple"):
        raise RuntimeError("`allow_multiple` argument is passed to `init` when the Ray client "
                           "is not used; this runtime has no Ray client. Do not pass "
                           "`allow_multiple` to `init`.")
    unknown = [k for k in kwargs if k not in _INIT_KEYWORDS]
    if unknown:
        raise _UnknownInitKeyword(f"Unknown keyword argument(s): {', '.join(unknown)}")
    if kwargs.get("local_mode"):
        raise RuntimeError("`local_mode` is no longer supported (as in Ray 2.60). Run tasks "
                           "normally; to debug, call the function directly or print from it.")
    for key, why in _INIT_UNSUPPORTED.items():
        value = kwargs.get(key)
        if value is None or value is False or (key == "_system_config" and value == {}):
            continue
        raise ValueError(f"init({key}={value!r}) is not supported: {why}.")


class RuntimeContextInfo(dict):
    """What init() returns (Ray's RayContext): address_info, and usable as a context manager."""

    def __init__(self, address_info: Dict[str, Any]) -> None:
        super().__init__(address_info)
        self.address_info = address_info
        self.dashboard_url = None
        self.python_version = ".".join(map(str, sys.version_info[:3]))
        self.ray_version = __version__

    def __enter__(self) -> "RuntimeContextInfo":
        return self

    def __exit__(self, *exc) -> None:
        shutdown()

    def disconnect(self) -> None:
        shutdown()


class _Driver:
    def __init__(self) -> None:
        self.node: Optional[Node] = None
        self.cw: Optional[CoreWorker] = None
        self.gcs_channel: Optional[grpc.Channel] = None
        self.gcs: Optional[gcs_pb2_grpc.GcsStub] = None
        self.context: Optional[RuntimeContextInfo] = None
        self.lock = threading.RLock()


_driver = _Driver()


def is_initialized() -> bool:
    return _driver.cw is not None


def _ensure_initialized() -> CoreWorker:
    """The process's core worker, connecting first (Ray's API auto-initializes)."""
    return core_worker()


def _configure_logging(level: Union[int, str], fmt: Optional[str]) -> None:
    logger = logging.getLogger("runtime")
    logger.setLevel(level)
    if not any(getattr(h, "_runtime_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._runtime_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    # Process spawn/stop lines belong in the node's logs, not on the user's terminal.
    logging.getLogger("runtime.supervisor").setLevel(max(logging.WARNING, logger.level))


def _token_for(address: str, found: Optional[dict]) -> str:
    for env in ("NODE_AGENT_TOKEN", rpc.TOKEN_ENV):
        if os.environ.get(env):
            return os.environ[env].strip()
    path = os.environ.get("NODE_AGENT_TOKEN_FILE")
    if path:
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError as exc:
            raise AuthenticationError(f"cannot read the cluster token file {path}: {exc}") from None
    if found and found.get("gcs_address") == address:
        return found["token"]
    raise AuthenticationError(
        f"no cluster token for {address}: set NODE_AGENT_TOKEN (or NODE_AGENT_TOKEN_FILE) to the "
        f"token printed by `agentctl start --head`")


def init(address: Optional[str] = None, **kwargs) -> RuntimeContextInfo:
    """Start a private single-node cluster, or connect to a running one.

    address=None starts a private cluster on free ports (unless $RUNTIME_ADDRESS
    names one); "auto" attaches to the newest cluster running on this machine;
    "host:port" attaches to the GCS at that address.
    """
    _check_init_keywords(kwargs)
    with _driver.lock:
        if _driver.cw is not None:
            if kwargs.get("ignore_reinit_error"):
                log.info("Calling init() again after it has already been called.")
                return _driver.context  # type: ignore[return-value]
            raise RuntimeError("Maybe you called init() twice by accident? This error can be "
                               "suppressed by passing in 'ignore_reinit_error=True' or by calling "
                               "'shutdown()' prior to 'init()'.")
        if kwargs.get("configure_logging", True):
            _configure_logging(kwargs.get("logging_level", logging.INFO), kwargs.get("logging_format"))
        # Checked before anything starts; resolved (local paths uploaded) once connected.
        kwargs["runtime_env"] = _job_runtime_env(kwargs.get("runtime_env"))
        if address is None:
            address = os.environ.get("RUNTIME_ADDRESS") or None
        try:
            if address is None or address == "local":
                return _start_private(kwargs)
            return _attach(address, kwargs)
        except BaseException:
            _teardown()
            raise


def _job_runtime_env(given: Any) -> Any:
    """init()'s runtime_env, with the submitted job's (when the job server started this
    driver) merged in as Ray merges them."""
    driver = parse_runtime_env(given)
    raw = os.environ.get(runtime_env_context.JOB_ENV_VAR)
    if not raw:
        return driver
    try:
        job = parse_runtime_env(json.loads(raw))
    except ValueError as exc:
        raise ValueError(f"${runtime_env_context.JOB_ENV_VAR} (the submitted job's "
                         f"runtime_env) is not usable: {exc}") from None
    override = os.environ.get(runtime_env_context.OVERRIDE_JOB_ENV_VAR) == "1"
    return parse_runtime_env(merge_job_and_driver(job, driver, override))


def _check_init_resources(kwargs: Dict[str, Any]) -> None:
    """Refuse bad amounts before anything starts, naming the keyword."""
    for key in ("num_cpus", "num_gpus", "object_store_memory"):
        if kwargs.get(key) is not None:
            check_resource_amount(key, kwargs[key])
    resources = kwargs.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise TypeError(f"init(resources=...) must be a dict, got {type(resources).__name__}")
        for name, amount in resources.items():
            check_resource_amount(f"resources[{name!r}]", amount)
    check_node_labels(kwargs.get("labels"), "init(labels=...)")


def _start_private(kwargs: Dict[str, Any]) -> RuntimeContextInfo:
    t0 = time.perf_counter()
    _check_init_resources(kwargs)
    session_dir = new_session_dir(kwargs.get("_temp_dir"))
    cfg = NodeConfig(head=True, node_ip=kwargs.get("_node_ip_address") or "127.0.0.1",
                     num_cpus=kwargs.get("num_cpus"), num_gpus=kwargs.get("num_gpus"),
                     resources=dict(kwargs.get("resources") or {}),
                     labels=dict(kwargs.get("labels") or {}),
                     object_store_memory=kwargs.get("object_store_memory"),
                     session_dir=session_dir)
    node = Node(cfg)
    _driver.node = node
    node.start()
    write_cluster_file(session_dir, {
        "gcs_address": node.gcs_address, "gcs_pid": node.pids.get("gcs"),
        "node_id": node.node_id.hex(), "session_dir": session_dir,
        "raylet_address": node.raylet_address, "store_address": node.store_address}, node.token)
    _connect(node.gcs_address, node.token, kwargs, session_dir)
    log.debug("private cluster up in %.3fs at %s", time.perf_counter() - t0, session_dir)
    return _driver.context  # type: ignore[return-value]


def _attach(address: str, kwargs: Dict[str, Any]) -> RuntimeContextInfo:
    for key in ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory"):
        if kwargs.get(key) is not None:
            raise ValueError(f"When connecting to an existing cluster, {key} must not be provided.")
    if address == "auto":
        found: Optional[dict] = require_running_cluster(kwargs.get("_temp_dir"))
        address = found["gcs_address"]
    else:
        found = find_running_cluster(kwargs.get("_temp_dir"))
    from runtime.net import split_address

    split_address(address)
    token = _token_for(address, found)
    local_ip = found.get("node_ip") if found and found.get("gcs_address") == address else None
    _connect(address, token, kwargs, found.get("session_dir", "") if found else "", local_ip)
    return _driver.context  # type: ignore[return-value]


#: Set by the job runner (agent/jobs) in a submitted job's environment: the job's drivers
#: record it, so the jobs API and list_jobs() show which driver a submission started.
SUBMISSION_ID_ENV = "RUNTIME_JOB_SUBMISSION_ID"


def _connect(gcs_address: str, token: str, kwargs: Dict[str, Any], session_dir: str,
             local_ip: Optional[str] = None) -> None:
    channel = rpc.sync_channel(gcs_address, token)
    gcs = gcs_pb2_grpc.GcsStub(channel)
    _driver.gcs_channel, _driver.gcs = channel, gcs
    try:
        nodes = gcs.GetAllNodes(common_pb2.Empty(), timeout=10).nodes
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise AuthenticationError(f"{gcs_address}: {exc.details()}") from None
        raise ClusterConnectionError(
            f"cannot reach the GCS at {gcs_address}: {exc.code().name}: {exc.details()}. Is the "
            f"head node running (agentctl status) and the port reachable?") from None
    alive = [n for n in nodes if n.alive]
    if not alive:
        raise ClusterConnectionError(f"the cluster at {gcs_address} has no live node")
    node = _pick_local_node(alive, _driver.node, local_ip)
    # As in Ray, a job that names no namespace gets an anonymous one of its own (a UUID:
    # job ids start again when a GCS restarts, so they would not be unique).
    namespace = kwargs.get("namespace") or str(uuid.uuid4())
    job = gcs_pb2.JobInfo(driver_pid=os.getpid(), driver_ip=node.node_ip,
                          entrypoint=" ".join(sys.argv), namespace=namespace,
                          submission_id=os.environ.get(SUBMISSION_ID_ENV, ""))
    try:
        job_id = gcs.AddJob(job, timeout=10).job_id
    except grpc.RpcError as exc:
        raise gcs_error(gcs_address, exc, "registering this driver's job") from None
    cw = CoreWorker(mode=DRIVER, node_id=node.node_id, node_ip=node.node_ip,
                    raylet_address=f"{node.node_ip}:{node.raylet_port}",
                    store_address=f"{node.node_ip}:{node.store_port}", gcs_address=gcs_address,
                    session_dir=node.session_dir or session_dir, token=token, job_id=job_id,
                    namespace=namespace)
    cw.job_config.sys_path.extend(p for p in sys.path if p)
    cw.job_config.cwd = os.getcwd()
    if _driver.node is not None:
        _watch_private_raylet(cw, _driver.node)
    cw.start()
    if kwargs.get("log_to_driver", True):
        cw.job_config.driver.CopyFrom(cw.address_proto)  # workers send what tasks print
    set_core_worker(cw)
    _driver.cw = cw
    # The job's runtime_env: what its tasks and actors run in (not this driver, as in Ray).
    # A failure here (a package over the size limit) tears the connection down in init().
    job_env = resolve_runtime_env(kwargs.get("runtime_env"), runtime_env_context.EMPTY,
                                  store_for(cw))
    runtime_env_context.set_current(job_env)
    _eager_install(job_env, alive, token)
    info = {"node_ip_address": node.node_ip, "gcs_address": gcs_address, "address": gcs_address,
            "raylet_address": f"{node.node_ip}:{node.raylet_port}",
            "object_store_address": f"{node.node_ip}:{node.store_port}",
            "session_dir": node.session_dir or session_dir, "node_id": node.node_id.hex(),
            "webui_url": None, "job_id": job_id.hex()}
    _driver.context = RuntimeContextInfo(info)


#: The runtime_env fields whose setup takes a node time (unpacking, pip): what Ray's
#: eager_install sets up at init().
_EAGER_FIELDS = ("pip", "working_dir", "py_modules")
#: How long init() waits for each node to say it started an eager setup.
_EAGER_TIMEOUT_S = 5.0


def _eager_install(env: runtime_env_context.ResolvedEnv, nodes: Sequence[Any],
                   token: str) -> None:
    """Ray's ``eager_install`` (default True): ask every live node to set the job's
    runtime_env up now, so the first task does not wait for pip. Each node answers as
    soon as the setup has started; tasks that come before it ends wait for that same
    setup. A node that cannot be asked sets the env up when a task needs it, as with
    ``eager_install=False``."""
    config = env.env.get("config") or {}
    if not env.hash or not config.get("eager_install", True) or \
            not any(env.env.get(f) for f in _EAGER_FIELDS):
        return
    request = runtime_env_pb2.PrepareRuntimeEnvRequest(runtime_env=env.info)
    asked = []
    for n in nodes:  # all at once: each node answers as soon as its setup has started
        address = f"{n.node_ip}:{n.raylet_port}"
        channel = rpc.sync_channel(address, token)
        call = runtime_env_pb2_grpc.RuntimeEnvServiceStub(channel).Prepare.future(
            request, timeout=_EAGER_TIMEOUT_S)
        asked.append((n, address, channel, call))
    for n, address, channel, call in asked:
        try:
            call.result()
        except grpc.RpcError as exc:
            log.warning("could not ask node %s (raylet %s) to set the job's runtime_env up "
                        "ahead of its tasks (eager_install): %s: %s; it is set up there when "
                        "a task needs it", n.node_id.hex()[:8], address, exc.code().name,
                        exc.details())
        finally:
            channel.close()


def _watch_private_raylet(cw: CoreWorker, node: Node) -> None:
    """Tell the core worker what it needs when a private cluster's raylet dies: its pid
    for the error, and how it ended (nobody restarts it, so there is nothing to wait for)."""
    from runtime.supervisor import describe_exit

    cw.raylet_pid = node.pids.get("raylet")
    cw.owns_cluster = True

    def raylet_exit() -> Optional[str]:
        proc = node.supervisor.get("raylet")
        if proc is None:
            return "it is no longer supervised"
        rc = proc.poll()
        return None if rc is None else describe_exit(rc)

    cw.raylet_exit = raylet_exit


def _pick_local_node(alive, private: Optional[Node], local_ip: Optional[str] = None):
    """The node this driver runs on: its private node, the local agent's node, or one
    whose address is this machine's."""
    if private is not None:
        for n in alive:
            if n.node_id == private.node_id:
                return n
    if local_ip:
        for n in alive:
            if n.node_ip == local_ip:
                return n
    local_ips = {"127.0.0.1", socket.gethostbyname(socket.gethostname())}
    for n in alive:
        if n.node_ip in local_ips:
            return n
    heads = [n for n in alive if n.is_head]
    return heads[0] if heads else alive[0]


def shutdown(*, wait_for_processes: bool = False, _exiting_interpreter: bool = False) -> None:
    """Disconnect; a private cluster started by init() is stopped (no process outlives it).

    Its processes are always waited for, so ``wait_for_processes`` (Ray's, default
    False) changes nothing; an attached driver leaves the cluster's processes running."""
    with _driver.lock:
        _teardown()


def _teardown() -> None:
    metrics = sys.modules.get("runtime.util.metrics")  # only if this process recorded any
    if metrics is not None and _driver.cw is not None:
        metrics.flush(timeout=2.0)  # the last values, while the cluster still runs
    cw, node, gcs = _driver.cw, _driver.node, _driver.gcs
    _driver.cw = _driver.node = _driver.gcs = None
    _driver.context = None
    set_core_worker(None)
    runtime_env_context.set_current(runtime_env_context.EMPTY)
    if cw is not None:
        if gcs is not None:
            try:
                gcs.MarkJobFinished(gcs_pb2.JobInfo(job_id=cw.job_id), timeout=2)
            except grpc.RpcError:
                pass
        cw.shutdown()
    if _driver.gcs_channel is not None:
        _driver.gcs_channel.close()
        _driver.gcs_channel = None
    if node is not None:
        node.stop()


atexit.register(shutdown, _exiting_interpreter=True)


# -- objects ------------------------------------------------------------------------------------
def put(value: Any, *, _owner: Any = None) -> ObjectRef:
    """Store a value in the object store; returns its ObjectRef."""
    if isinstance(value, ObjectRef):
        raise TypeError("Calling 'put' on an ObjectRef is not allowed. If you really want to do "
                        "this, you can wrap the ObjectRef in a list and call 'put' on it.")
    return _ensure_initialized().put(value)


def get(object_refs: Union[ObjectRef, Sequence[ObjectRef]], *, timeout: Optional[float] = None) -> Any:
    """The value(s) of one ObjectRef or a list of them; blocks until ready or `timeout`."""
    cw = _ensure_initialized()
    if timeout is not None:
        check_timeout("timeout", timeout)
    if isinstance(object_refs, ObjectRef):
        return cw.get([object_refs], timeout)[0]
    if isinstance(object_refs, (list, tuple)):
        for r in object_refs:
            if not isinstance(r, ObjectRef):
                raise ValueError(f"Invalid type of object refs, {type(r)}, is given. 'object_refs' "
                                 f"must either be an ObjectRef or a list of ObjectRefs.")
        return cw.get(list(object_refs), timeout)
    raise ValueError(f"Invalid type of object refs, {type(object_refs)}, is given. 'object_refs' "
                     f"must either be an ObjectRef or a list of ObjectRefs.")


def wait(ray_waitables: Sequence[ObjectRef], *, num_returns: int = 1,
         timeout: Optional[float] = None,
         fetch_local: bool = True) -> Tuple[List[ObjectRef], List[ObjectRef]]:
    """Split refs into (ready, not ready): at most num_returns ready ones, in input order."""
    object_refs = ray_waitables
    cw = _ensure_initialized()
    if isinstance(object_refs, ObjectRef):
        raise TypeError("wait() expected a list of ObjectRef, got a single ObjectRef")
    if not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"wait() expected a list of ObjectRef, got {type(object_refs)}")
    for r in object_refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait() expected a list of ObjectRef, got list containing {type(r)}")
    if timeout is not None:
        check_timeout("timeout", timeout)
    if not object_refs:  # before the num_returns checks, as in Ray
        return [], []
    if len(set(object_refs)) != len(object_refs):
        raise ValueError("Wait requires a list of unique object refs.")
    if not isinstance(num_returns, int) or num_returns <= 0:
        raise ValueError(f"Invalid number of objects to return {num_returns}.")
    if num_returns > len(object_refs):
        raise ValueError("num_returns cannot be greater than the number of objects provided to wait().")
    return cw.wait(list(object_refs), num_returns, timeout)


def cancel(ray_waitable: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that produces the ref; get() then raises TaskCancelledError."""
    ref = ray_waitable
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() expected an ObjectRef, got {type(ref)}")
    cw = _ensure_initialized()
    if ref.owner_address[2] != cw.worker_id:
        raise ValueError("Only the owner of an ObjectRef (the process that submitted its task) "
                         "can cancel it.")
    cw.cancel(ref, force, recursive)


# -- cluster information ------------------------------------------------------------------------------
def _gcs_call(method: str, request: Any, doing: str, timeout: float = 10) -> Any:
    """A GCS call from the user's thread, waiting out a GCS restart (bounded); failures
    name the GCS (never a raw gRPC error)."""
    return _ensure_initialized().gcs_call(method, request, timeout=timeout, doing=doing)


def nodes() -> List[Dict[str, Any]]:
    """Every node the GCS knows, with Ray's keys."""
    out = []
    for n in _gcs_call("GetAllNodes", common_pb2.Empty(), "listing nodes").nodes:
        out.append({
            "NodeID": n.node_id.hex(), "Alive": n.alive, "alive": n.alive,
            "NodeManagerAddress": n.node_ip, "NodeManagerHostname": n.hostname,
            "NodeManagerPort": n.raylet_port, "ObjectManagerPort": n.store_port,
            "ObjectStoreSocketName": f"{n.node_ip}:{n.store_port}",
            "RayletSocketName": f"{n.node_ip}:{n.raylet_port}", "MetricsExportPort": 0,
            "NodeName": n.node_ip, "Resources": dict(n.resources_total) if n.alive else {},
            "Labels": dict(n.labels), "IsHead": n.is_head, "DeathReason": n.death_reason,
        })
    return out


def cluster_resources() -> Dict[str, float]:
    """Total resources of the live nodes."""
    return dict(_gcs_call("GetClusterStatus", common_pb2.Empty(), "reading cluster resources").total)


def available_resources() -> Dict[str, float]:
    """Resources not in use right now (as last reported by each raylet)."""
    status = _gcs_call("GetClusterStatus", common_pb2.Empty(), "reading available resources")
    return {k: v for k, v in status.available.items() if v > 0}


def get_gpu_ids() -> List[int]:
    """GPU ids assigned to the current task (what CUDA_VISIBLE_DEVICES holds)."""
    cw = _ensure_initialized()
    return list(cw.current_gpu_ids)


# -- actors ------------------------------------------------------------------------------------------
def kill(actor: Any, *, no_restart: bool = True) -> None:
    """Kill an actor; calls then raise ActorDiedError (with no_restart=False it may restart)."""
    if not isinstance(actor, ActorHandle):
        raise ValueError(f"kill() only supports actors; for tasks use cancel(). Got {type(actor)}.")
    cw = _ensure_initialized()
    req = gcs_pb2.KillActorRequest(actor_id=actor._actor_id, no_restart=no_restart,
                              reason="it was killed by kill()" + ("" if no_restart else
                                                                  " (restart allowed)"))
    cw.gcs_call("KillActor", req, doing=f"killing actor {actor._actor_id.hex()}")
    if no_restart:
        cw.post(cw.actors.mark_killed, actor._actor_id, req.reason)


def get_actor(name: str, namespace: Optional[str] = None) -> Any:
    """The handle of the live named actor `name` in `namespace` (default: this job's)."""
    if not isinstance(name, str) or not name:
        raise ValueError("Please supply a non-empty value to get_actor")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError("namespace must be None or a non-empty string")
    cw = _ensure_initialized()
    ns = namespace or cw.namespace
    req = gcs_pb2.GetActorRequest(name=name, namespace=ns)
    reply = cw.gcs_call("GetActor", req, doing=f"looking up actor {name!r}")
    if not reply.found or reply.actor.state == ACTOR_DEAD:
        raise ValueError(f"Failed to look up actor with name '{name}'. This could because 1. You "
                         f"are trying to look up a named actor you didn't create. 2. The named "
                         f"actor died. 3. You did not use a namespace matching the namespace of "
                         f"the actor (looked in namespace {ns!r}).")
    return ActorHandle._from_info(reply.actor)


set_auto_init(init)
