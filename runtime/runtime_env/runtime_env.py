"""RuntimeEnv and RuntimeEnvConfig: Ray's runtime_env dictionaries, validated as Ray does.

A RuntimeEnv is a dict, so a plain dict and a RuntimeEnv are interchangeable everywhere
(``init``, ``@remote``, ``.options``). Values are normalised on assignment, as in Ray:
``pip=["x"]`` is stored as ``{"packages": ["x"], "pip_check": False}``, empty lists and
dicts are dropped, ``config`` becomes a RuntimeEnvConfig.

Fields Ray has but this runtime cannot honour (conda, container, image_uri, uv, ...) and
unknown fields (Ray's plugins) are refused with the reason, never silently ignored.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import types
from typing import Any, Dict, List, Mapping, Optional, Set, Union

__all__ = ["RuntimeEnv", "RuntimeEnvConfig", "merge", "merge_job_and_driver", "env_hash",
           "SUPPORTED_FIELDS",
           "DEFAULT_SETUP_TIMEOUT_SECONDS", "REMOTE_SCHEMES"]

#: Ray's default for RuntimeEnvConfig.setup_timeout_seconds.
DEFAULT_SETUP_TIMEOUT_SECONDS = 600
SUPPORTED_FIELDS = ("working_dir", "py_modules", "excludes", "pip", "env_vars", "config")
#: Ray's extension fields: bookkeeping of Ray's own releases, accepted and kept as given.
EXTENSION_FIELDS = ("_ray_release", "_ray_commit", "_inject_current_ray")
#: Fields of Ray's RuntimeEnv this runtime refuses, with what to do instead.
UNSUPPORTED_FIELDS = {
    "conda": "conda environments are not supported; use 'pip'",
    "container": "containers are not supported; install the dependencies on the nodes or "
                 "use 'pip'",
    "image_uri": "container images are not supported; install the dependencies on the nodes "
                 "or use 'pip'",
    "uv": "uv is not supported; use 'pip' (it installs with the node's pip)",
    "py_executable": "a custom worker interpreter is not supported; use 'pip' for packages",
    "java_jars": "there are no Java workers",
    "worker_process_setup_hook": "worker setup hooks are not supported; do the setup at the "
                                 "start of the task or in the actor's constructor",
    "nsight": "the Nsight profiler integration is not supported",
    "_nsight": "the Nsight profiler integration is not supported",
    "rocprof_sys": "the rocprof-sys profiler integration is not supported",
    "_rocprof_sys": "the rocprof-sys profiler integration is not supported",
    "docker": "containers are not supported",
    "secret_env_vars": "secret_env_vars is not supported; use env_vars",
}
#: URI schemes of remote storage, which this runtime cannot reach (gcs:// is its own).
REMOTE_SCHEMES = ("s3://", "gs://", "http://", "https://", "file://", "hdfs://", "abfss://",
                  "azure://", "conda://", "pip://")
PIP_KEYS = {"packages", "pip_check", "pip_version", "pip_install_options"}


class RuntimeEnvConfig(dict):
    """Options of the environment's setup; not part of its identity (two environments that
    differ only here share workers), as in Ray."""

    known_fields: Set[str] = {"setup_timeout_seconds", "eager_install", "log_files"}

    def __init__(self, setup_timeout_seconds: int = DEFAULT_SETUP_TIMEOUT_SECONDS,
                 eager_install: bool = True, log_files: Optional[List[str]] = None) -> None:
        """``log_files``: files on the nodes whose end a failed setup's error shows (Ray
        surfaces them in its dashboard, which this runtime does not have)."""
        super().__init__()
        if not isinstance(setup_timeout_seconds, int) or isinstance(setup_timeout_seconds, bool):
            raise TypeError(f"setup_timeout_seconds must be of type int, got: "
                            f"{type(setup_timeout_seconds)}")
        if setup_timeout_seconds <= 0 and setup_timeout_seconds != -1:
            raise ValueError(f"setup_timeout_seconds must be greater than zero or equals to "
                             f"-1, got: {setup_timeout_seconds}")
        if not isinstance(eager_install, bool):
            raise TypeError(f"eager_install must be a boolean. got {type(eager_install)}")
        self["setup_timeout_seconds"] = setup_timeout_seconds
        self["eager_install"] = eager_install
        if log_files is not None:
            if not (isinstance(log_files, (list, tuple)) and
                    all(isinstance(f, str) for f in log_files)):
                raise TypeError(f"log_files must be a list of strings, got {type(log_files)}")
            self["log_files"] = list(log_files)

    @staticmethod
    def parse_and_validate_runtime_env_config(
            config: Union[Mapping[str, Any], "RuntimeEnvConfig"]) -> "RuntimeEnvConfig":
        if isinstance(config, RuntimeEnvConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"runtime_env['config'] must be of type dict or RuntimeEnvConfig, "
                            f"got: {type(config)}")
        unknown = set(config) - RuntimeEnvConfig.known_fields
        if unknown:
            raise ValueError(f"unknown runtime_env['config'] field(s) {sorted(unknown)}; the "
                             f"known ones are {sorted(RuntimeEnvConfig.known_fields)}")
        return RuntimeEnvConfig(**dict(config))

    @classmethod
    def default_config(cls) -> "RuntimeEnvConfig":
        return cls()

    def to_dict(self) -> Dict[str, Any]:
        return dict(self)


def _is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def _check_local_or_gcs(field: str, value: str) -> None:
    if _is_remote(value):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"runtime_env[{field!r}] is the remote URI {value!r}: {scheme}:// "
                         f"storage is not supported by this runtime; pass a local path (it is "
                         f"uploaded to the cluster for you)")


def _validate_working_dir(value: Any) -> Optional[str]:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"`working_dir` must be a string, got {type(value)}.")
    _check_local_or_gcs("working_dir", value)
    return value


def _module_dir(module: types.ModuleType) -> str:
    paths = list(getattr(module, "__path__", None) or [])
    if len(paths) != 1:
        raise ValueError(f"runtime_env['py_modules'] got the module {module.__name__!r}, which "
                         f"is not a package in a single directory (only such packages can be "
                         f"passed as module objects; for a single-file module use "
                         f"working_dir, or pass the path of a directory)")
    return paths[0]


def _validate_py_modules(value: Any) -> Optional[List[str]]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`py_modules` must be a list of strings, got {type(value)}.")
    out: List[str] = []
    for entry in value:
        if isinstance(entry, types.ModuleType):
            entry = _module_dir(entry)
        elif isinstance(entry, os.PathLike):
            entry = os.fspath(entry)
        if not isinstance(entry, str):
            raise TypeError(f"py_modules entries must be paths, URIs or module objects, got "
                            f"{type(entry)}.")
        _check_local_or_gcs("py_modules", entry)
        out.append(entry)
    return out or None


def _validate_excludes(value: Any) -> Optional[List[str]]:
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value) or None
    raise TypeError(f"runtime_env['excludes'] must be of type List[str], got {type(value)}")


def _read_requirements(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ValueError(f"runtime_env['pip'] names the requirements file {path!r}, which does "
                         f"not exist (relative paths are taken from {os.getcwd()!r})")
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh.read().strip().split("\n") if line.strip()]


def _validate_pip(value: Any) -> Optional[Dict[str, Any]]:
    if isinstance(value, str):
        packages = _read_requirements(value)
        return {"packages": packages, "pip_check": False} if packages else None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(p, str) for p in value):
            raise TypeError(f"runtime_env['pip'] must be of type str or List[str], got "
                            f"{type(value)}")
        return {"packages": list(value), "pip_check": False} if value else None
    if isinstance(value, Mapping):
        unknown = set(value) - PIP_KEYS
        if unknown:
            raise ValueError(f"runtime_env['pip'] has unknown key(s) {sorted(unknown)}; the "
                             f"known ones are {sorted(PIP_KEYS)}")
        if "packages" not in value:
            raise ValueError("runtime_env['pip'] as a dict needs the key 'packages' (a list "
                             "of requirement specifiers or the path of a requirements file)")
        packages = value["packages"]
        if isinstance(packages, str):
            packages = _read_requirements(packages)
        elif not (isinstance(packages, (list, tuple)) and all(isinstance(p, str) for p in packages)):
            raise TypeError(f"runtime_env['pip']['packages'] must be of type str or List[str], "
                            f"got {type(packages)}")
        if not packages:
            return None
        out: Dict[str, Any] = {"packages": list(packages),
                               "pip_check": value.get("pip_check", False)}
        if not isinstance(out["pip_check"], bool):
            raise TypeError("runtime_env['pip']['pip_check'] must be of type bool")
        if value.get("pip_version") is not None:
            if not isinstance(value["pip_version"], str):
                raise TypeError("runtime_env['pip']['pip_version'] must be of type str")
            out["pip_version"] = value["pip_version"]
        if value.get("pip_install_options") is not None:
            opts = value["pip_install_options"]
            if not (isinstance(opts, (list, tuple)) and all(isinstance(o, str) for o in opts)):
                raise TypeError("runtime_env['pip']['pip_install_options'] must be of type "
                                "List[str]")
            out["pip_install_options"] = list(opts)
        return out
    raise TypeError(f"runtime_env['pip'] must be of type str, List[str] or dict, got "
                    f"{type(value)}")


#: The runtime's own variables in a worker's environment: a runtime_env may not set them.
RESERVED_ENV_VARS = {"RUNTIME_CLUSTER_TOKEN", "RUNTIME_PARENT_PID", "RUNTIME_WORKER_ENV"}


def _validate_env_vars(value: Any) -> Optional[Dict[str, str]]:
    if not (isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in value.items())):
        raise TypeError("runtime_env['env_vars'] must be of type Dict[str, str]")
    taken = sorted(set(value) & RESERVED_ENV_VARS)
    if taken:
        raise ValueError(f"runtime_env['env_vars'] may not set {', '.join(taken)}: the "
                         f"runtime sets it for its own processes")
    return dict(value) or None


_VALIDATORS = {
    "working_dir": _validate_working_dir,
    "py_modules": _validate_py_modules,
    "excludes": _validate_excludes,
    "pip": _validate_pip,
    "env_vars": _validate_env_vars,
    "config": RuntimeEnvConfig.parse_and_validate_runtime_env_config,
}


def _check_field(name: str) -> None:
    if name in _VALIDATORS or name in EXTENSION_FIELDS:
        return
    why = UNSUPPORTED_FIELDS.get(name)
    if why is not None:
        raise ValueError(f"runtime_env field {name!r} is not supported by this runtime: {why}.")
    raise ValueError(f"unknown runtime_env field {name!r} (runtime_env plugins are not "
                     f"supported); the supported fields are {', '.join(SUPPORTED_FIELDS)}")


class RuntimeEnv(dict):
    """A runtime environment for a job, a task or an actor (Ray's ``ray.runtime_env.
    RuntimeEnv``): use it wherever a runtime_env dict is accepted."""

    known_fields: Set[str] = set(SUPPORTED_FIELDS) | set(EXTENSION_FIELDS) | set(UNSUPPORTED_FIELDS)
    extensions_fields: Set[str] = set(EXTENSION_FIELDS)

    def __init__(self, *, py_modules: Optional[List[Any]] = None, working_dir: Optional[str] = None,
                 pip: Optional[Union[List[str], str, Dict[str, Any]]] = None,
                 conda: Optional[Union[Dict[str, str], str]] = None,
                 container: Optional[Dict[str, str]] = None,
                 env_vars: Optional[Dict[str, str]] = None,
                 worker_process_setup_hook: Any = None,
                 nsight: Optional[Union[str, Dict[str, str]]] = None,
                 rocprof_sys: Any = None,
                 config: Optional[Union[Dict[str, Any], RuntimeEnvConfig]] = None,
                 _validate: bool = True, image_uri: Optional[str] = None,
                 uv: Optional[List[str]] = None, py_executable: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__()
        given = dict(kwargs)
        for key, value in (("py_modules", py_modules), ("working_dir", working_dir),
                           ("pip", pip), ("conda", conda), ("container", container),
                           ("env_vars", env_vars),
                           ("worker_process_setup_hook", worker_process_setup_hook),
                           ("_nsight", nsight), ("_rocprof_sys", rocprof_sys),
                           ("config", config), ("image_uri", image_uri),
                           ("uv", uv), ("py_executable", py_executable)):
            if value is not None:
                given[key] = value
        if not _validate:  # trusted: what serialize() wrote
            dict.update(self, given)
            if isinstance(self.get("config"), Mapping):
                dict.__setitem__(self, "config", RuntimeEnvConfig(**self["config"]))
            return
        for key, value in given.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        _check_field(key)
        validator = _VALIDATORS.get(key)
        if validator is not None:
            value = validator(value)
            if value is None:
                self.pop(key, None)
                return
        dict.__setitem__(self, key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self.get(key)

    def set(self, name: str, value: Any) -> None:
        self[name] = value

    def get(self, name: str, default: Any = None, data_class: Any = None) -> Any:  # type: ignore[override]
        if data_class is not None:
            raise NotImplementedError("RuntimeEnv.get(data_class=...) is not supported")
        return dict.get(self, name, default)

    def __reduce__(self):
        return (_rebuild, (self.serialize(),))

    def copy(self) -> "RuntimeEnv":
        return RuntimeEnv.deserialize(self.serialize())

    # -- Ray's accessors ------------------------------------------------------------------------
    @classmethod
    def deserialize(cls, serialized_runtime_env: str) -> "RuntimeEnv":
        return cls(_validate=False, **json.loads(serialized_runtime_env))

    def serialize(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> Dict[str, Any]:
        out = copy.deepcopy(dict(self))
        if "config" in out:
            out["config"] = dict(out["config"])
        return out

    def has_working_dir(self) -> bool:
        return self.get("working_dir") is not None

    def working_dir_uri(self) -> Optional[str]:
        return self.get("working_dir")

    def working_dir(self) -> str:
        return self.get("working_dir", "")

    def py_modules(self) -> List[str]:
        return list(self.get("py_modules") or [])

    def py_modules_uris(self) -> List[str]:
        return self.py_modules()

    def java_jars(self) -> List[str]:
        return []

    def env_vars(self) -> Dict[str, str]:
        return dict(self.get("env_vars") or {})

    def has_pip(self) -> bool:
        return bool(self.get("pip"))

    def pip_config(self) -> Dict[str, Any]:
        return dict(self.get("pip") or {})

    def virtualenv_name(self) -> Optional[str]:
        return None

    def has_conda(self) -> bool:
        return False

    def conda_env_name(self) -> Optional[str]:
        return None

    def conda_config(self) -> Optional[str]:
        return None

    def has_py_container(self) -> bool:
        return False

    def plugin_uris(self) -> List[str]:
        return []

    def plugins(self) -> List[Any]:
        return []

    def get_extension(self, key: str) -> Optional[str]:
        if key not in EXTENSION_FIELDS:
            raise ValueError(f"Extension key must be one of {set(EXTENSION_FIELDS)}, got: {key}")
        return self.get(key)


def _rebuild(serialized: str) -> RuntimeEnv:
    return RuntimeEnv.deserialize(serialized)


def parse(value: Any) -> Optional[RuntimeEnv]:
    """The validated RuntimeEnv of a user's runtime_env (dict or RuntimeEnv); None when it
    sets nothing."""
    if value is None:
        return None
    if isinstance(value, RuntimeEnv):
        env = value
    elif isinstance(value, Mapping):
        env = RuntimeEnv(**dict(value))
    else:
        raise TypeError(f"runtime_env must be a dict or a runtime.runtime_env.RuntimeEnv, got "
                        f"{type(value).__name__}")
    return env or None


def merge(parent: Optional[Mapping[str, Any]], child: Optional[Mapping[str, Any]]
          ) -> Dict[str, Any]:
    """A child's environment over its parent's, as Ray overrides them: every field the
    child sets replaces the parent's, except ``env_vars``, merged key by key."""
    out = copy.deepcopy(dict(parent or {}))
    child = dict(child or {})
    env_vars = dict(out.pop("env_vars", None) or {})
    env_vars.update(child.pop("env_vars", None) or {})
    out.update(copy.deepcopy(child))
    if env_vars:
        out["env_vars"] = env_vars
    return out


def merge_job_and_driver(job: Optional[Mapping[str, Any]], driver: Optional[Mapping[str, Any]],
                         override: bool = False) -> Dict[str, Any]:
    """A submitted job's runtime_env with its driver's ``init(runtime_env=...)``, as Ray
    merges them: combined when they do not conflict (no field, and no env_vars key, in
    both), else a ValueError, unless `override` (then the driver's wins, as a child's)."""
    job, driver = dict(job or {}), dict(driver or {})
    if not override:
        fields = (set(job) & set(driver)) - {"env_vars"}
        keys = set(job.get("env_vars") or {}) & set(driver.get("env_vars") or {})
        if fields or keys:
            clash = ", ".join(sorted(fields) + [f"env_vars[{k!r}]" for k in sorted(keys)])
            raise ValueError(f"Failed to merge the job's runtime_env {job} with the runtime_env "
                             f"given to init() {driver}: both set {clash}. Set "
                             f"RUNTIME_OVERRIDE_JOB_RUNTIME_ENV=1 to let init()'s win.")
    return merge(job, driver)


def env_hash(env: Mapping[str, Any]) -> str:
    """What workers are pooled by: the environment without its setup options ("" when
    it sets nothing)."""
    ident = {k: v for k, v in env.items() if k != "config"}
    if not ident:
        return ""
    blob = json.dumps(ident, sort_keys=True, default=dict)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
