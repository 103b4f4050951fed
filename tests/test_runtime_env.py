"""runtime_env (Ray 2.60's runtime environments) on a real cluster: env_vars, working_dir,
py_modules, pip (from a wheel built here, never the network), config, and workers pooled
per environment. The environment of the module's job is {"env_vars": JOB_VARS}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import psutil
import pytest

import runtime as ray
from runtime.exceptions import RuntimeEnvSetupError
from runtime.node import Node, NodeConfig
from runtime.runtime_env import RuntimeEnv, RuntimeEnvConfig
from runtime.runtime_env.context import JOB_ENV_VAR, OVERRIDE_JOB_ENV_VAR
from runtime.runtime_env.excludes import PatternList
from runtime.session import new_session_dir
from runtime.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from runtime.util.state import list_runtime_envs

from conftest import assert_all_gone, cluster_pids, wait_for
from helpers.env import scrubbed_env

JOB_VARS = {"JOB_ONLY": "job", "SHARED": "from-job"}
WHEEL_MODULE = "rtenv_demo"


@pytest.fixture(scope="module")
def env_cluster(tmp_path_factory):
    """The module's cluster. Its driver's sys.path ends with a site-packages directory the
    nodes do not have (as a driver in a venv of its own would), holding an iniconfig."""
    if ray.is_initialized():
        ray.shutdown()
    root = str(tmp_path_factory.mktemp("sessions"))
    site_dir = tmp_path_factory.mktemp("driver_venv") / "site-packages"
    (site_dir / "iniconfig").mkdir(parents=True)
    (site_dir / "iniconfig" / "__init__.py").write_text("WHERE = 'driver'\n")
    sys.path.append(str(site_dir))
    try:
        ctx = ray.init(num_cpus=2, _temp_dir=root, runtime_env={"env_vars": JOB_VARS})
    finally:
        sys.path.remove(str(site_dir))
    yield ctx
    pids = cluster_pids()
    ray.shutdown()
    assert_all_gone(pids)


def build_wheel(tmp_path_factory, out, name: str, version: str, module: str, body: str):
    """Build name-version's wheel (one module) from a pyproject into `out`, offline."""
    src = tmp_path_factory.mktemp(f"src_{module}")
    (src / module).mkdir()
    (src / module / "__init__.py").write_text(body)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(out),
                    str(src)], check=True, capture_output=True, env=scrubbed_env(), timeout=300)
    (wheel,) = out.glob(f"{module}-{version}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """A directory of wheels built here: rtenv_demo 1.0, and an iniconfig 0.0.1 (the
    driver's sys.path has another one, see env_cluster)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    wheel = build_wheel(tmp_path_factory, out, "rtenv-demo", "1.0", WHEEL_MODULE, "VALUE = 42\n")
    build_wheel(tmp_path_factory, out, "iniconfig", "0.0.1", "iniconfig", "WHERE = 'env'\n")
    return out, wheel


def pip_env(wheel_dir, *packages, **extra):
    """A pip runtime_env that installs only from wheel_dir (no index, no network)."""
    return {"pip": {"packages": list(packages),
                    "pip_install_options": ["--no-index", "--find-links", str(wheel_dir),
                                            "--disable-pip-version-check"]}, **extra}


@ray.remote
def probe(*names):
    """What a task sees of its environment."""
    ctx = ray.get_runtime_context()
    return {"env": {n: os.environ.get(n) for n in names}, "pid": os.getpid(),
            "cwd": os.getcwd(), "runtime_env": ctx.runtime_env,
            "python": sys.executable}


@ray.remote
class Probe:
    def __init__(self, name):
        self.at_start = os.environ.get(name)

    def look(self, name, path=None):
        text = open(path).read() if path else None
        return {"var": os.environ.get(name), "at_start": self.at_start, "file": text,
                "pid": os.getpid(), "runtime_env": ray.get_runtime_context().runtime_env}


# -- the RuntimeEnv class, without a cluster ---------------------------------------------------------
def test_runtime_env_is_a_dict_normalised_as_ray_does():
    env = RuntimeEnv(env_vars={"A": "1"}, pip=["x==1"], config={"setup_timeout_seconds": 5})
    assert isinstance(env, dict)
    assert env == {"env_vars": {"A": "1"}, "pip": {"packages": ["x==1"], "pip_check": False},
                   "config": {"setup_timeout_seconds": 5, "eager_install": True}}
    assert isinstance(env["config"], RuntimeEnvConfig)
    assert RuntimeEnv(env_vars={}, py_modules=[]) == {}  # empty fields are dropped
    assert RuntimeEnv.deserialize(env.serialize()) == env
    assert env.env_vars() == {"A": "1"} and env.has_pip() and not env.has_working_dir()


@pytest.mark.parametrize("bad, match", [
    ({"conda": "py39"}, "'conda' is not supported"),
    ({"image_uri": "img:1"}, "'image_uri' is not supported"),
    ({"my_plugin": {}}, "unknown runtime_env field 'my_plugin'"),
    ({"working_dir": "s3://bucket/x.zip"}, "s3:// storage is not supported"),
    ({"env_vars": {"A": 1}}, r"Dict\[str, str\]"),
    ({"env_vars": {"RUNTIME_CLUSTER_TOKEN": "x"}}, "may not set RUNTIME_CLUSTER_TOKEN"),
    ({"config": {"setup_timeout_seconds": 0}}, "greater than zero"),
    ({"pip": {"packages": ["x"], "pip_chek": True}}, "unknown key"),
])
def test_what_cannot_be_honoured_is_refused_at_decoration(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        @ray.remote(runtime_env=bad)
        def f():
            pass
    with pytest.raises((ValueError, TypeError), match=match):
        @ray.remote(runtime_env=bad)
        class A:
            pass


def test_excludes_follow_gitignore_rules():
    spec = PatternList(["*.log", "/cache/", "docs/**/draft.md", "!keep.log"])
    assert spec.excludes("a/b/x.log", False) and not spec.excludes("keep.log", False)
    assert spec.excludes("cache", True) and not spec.excludes("sub/cache", True)
    assert not spec.excludes("cache", False)  # a trailing slash means directories only
    assert spec.excludes("docs/draft.md", False) and spec.excludes("docs/a/b/draft.md", False)


# -- env_vars --------------------------------------------------------------------------------------
def test_env_vars_of_the_job_reach_tasks_and_actors(env_cluster):
    seen = ray.get(probe.remote("JOB_ONLY", "SHARED"), timeout=60)
    assert seen["env"] == JOB_VARS
    assert seen["runtime_env"] == {"env_vars": JOB_VARS}
    actor = Probe.options(runtime_env={"env_vars": {"ACTOR_VAR": "actor"}}).remote("ACTOR_VAR")
    out = ray.get(actor.look.remote("ACTOR_VAR"), timeout=60)
    assert (out["var"], out["at_start"]) == ("actor", "actor")
    assert out["runtime_env"]["env_vars"] == {**JOB_VARS, "ACTOR_VAR": "actor"}
    ray.kill(actor)
    # The driver itself does not run in the job's environment (as in Ray).
    assert os.environ.get("JOB_ONLY") is None
    assert ray.get_runtime_context().runtime_env == {"env_vars": JOB_VARS}


def test_a_tasks_env_vars_override_the_jobs_key_by_key(env_cluster):
    seen = ray.get(probe.options(runtime_env={"env_vars": {"SHARED": "from-task", "NEW": "n"}})
                   .remote("JOB_ONLY", "SHARED", "NEW"), timeout=60)
    assert seen["env"] == {"JOB_ONLY": "job", "SHARED": "from-task", "NEW": "n"}


def test_env_vars_may_reference_the_nodes_variables(env_cluster):
    seen = ray.get(probe.options(runtime_env={"env_vars": {"P": "${PATH}:/extra",
                                                           "Q": "${NO_SUCH_VAR_XYZ}q"}})
                   .remote("P", "Q"), timeout=60)
    assert seen["env"]["P"].endswith(":/extra") and len(seen["env"]["P"]) > len(":/extra")
    assert seen["env"]["Q"] == "q"


def test_child_tasks_inherit_their_parents_environment(env_cluster):
    @ray.remote
    def parent():
        inherited = ray.get(probe.remote("JOB_ONLY", "PARENT"))
        own = ray.get(probe.options(runtime_env={"env_vars": {"CHILD": "c"}})
                      .remote("JOB_ONLY", "PARENT", "CHILD"))
        return inherited["env"], own["env"]

    inherited, own = ray.get(parent.options(runtime_env={"env_vars": {"PARENT": "p"}}).remote(),
                             timeout=90)
    assert inherited == {"JOB_ONLY": "job", "PARENT": "p"}
    assert own == {"JOB_ONLY": "job", "PARENT": "p", "CHILD": "c"}


def test_runtime_env_object_and_dict_are_the_same_environment(env_cluster):
    as_dict = ray.get(probe.options(runtime_env={"env_vars": {"K": "v"}}).remote("K"), timeout=60)
    as_obj = ray.get(probe.options(runtime_env=RuntimeEnv(env_vars={"K": "v"})).remote("K"),
                     timeout=60)
    assert as_dict["env"] == as_obj["env"] == {"K": "v"}
    assert isinstance(as_obj["runtime_env"], RuntimeEnv)
    assert as_dict["runtime_env"] == as_obj["runtime_env"] == {"env_vars": {**JOB_VARS, "K": "v"}}


# -- one pool of workers per environment ----------------------------------------------------------
def test_workers_are_never_shared_between_environments(env_cluster):
    refs = []
    for i in range(12):
        tag = "A" if i % 2 else "B"
        refs.append((tag, probe.options(runtime_env={"env_vars": {"POOL": tag}}).remote("POOL")))
    results = [(tag, ray.get(ref, timeout=90)) for tag, ref in refs]
    assert all(r["env"]["POOL"] == tag for tag, r in results)
    pids = {tag: {r["pid"] for t, r in results if t == tag} for tag in "AB"}
    assert pids["A"] and pids["B"] and not pids["A"] & pids["B"]
    plain = ray.get([probe.remote("POOL") for _ in range(4)], timeout=60)
    assert all(p["env"]["POOL"] is None for p in plain)
    assert not {p["pid"] for p in plain} & (pids["A"] | pids["B"])


# -- working_dir ----------------------------------------------------------------------------------------
def test_working_dir_is_the_tasks_directory_and_importable(env_cluster, tmp_path):
    (tmp_path / "data.txt").write_text("payload")
    (tmp_path / "wd_helper.py").write_text("def answer():\n    return 'from working_dir'\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.txt").write_text("nested")

    @ray.remote
    def use_files():
        import wd_helper
        return (wd_helper.answer(), open("data.txt").read(), open("sub/nested.txt").read(),
                os.getcwd(), ray.get_runtime_context().runtime_env["working_dir"])

    answer, data, nested, cwd, uri = ray.get(
        use_files.options(runtime_env={"working_dir": str(tmp_path)}).remote(), timeout=60)
    assert (answer, data, nested) == ("from working_dir", "payload", "nested")
    session = env_cluster.address_info["session_dir"]
    assert cwd.startswith(os.path.join(session, "runtime_resources", "working_dir"))
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip")
    # The node's copy is what tasks read: changing the original later changes nothing for
    # the package already made, and a changed directory is a new package.
    (tmp_path / "data.txt").write_text("changed again")
    again = ray.get(use_files.options(runtime_env={"working_dir": str(tmp_path)}).remote(),
                    timeout=60)
    assert again[1] == "changed again" and again[4] != uri


def test_working_dir_excludes_and_gitignore_are_honoured(env_cluster, tmp_path):
    for rel in ("keep.txt", "run.log", "cache/blob.bin", "nested/cache/kept.txt",
                "nested/ignored_by_git.txt", "nested/fine.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    (tmp_path / "nested" / ".gitignore").write_text("ignored_by_git.txt\n")

    @ray.remote
    def listing():
        out = set()
        for top, _dirs, files in os.walk("."):
            out |= {os.path.relpath(os.path.join(top, f), ".") for f in files}
        return out

    env = {"working_dir": str(tmp_path), "excludes": ["*.log", "/cache/"]}
    files = ray.get(listing.options(runtime_env=env).remote(), timeout=60)
    assert files == {"keep.txt", "nested/cache/kept.txt", "nested/fine.txt", "nested/.gitignore"}


def test_a_zip_is_unpacked_at_its_root_and_a_directory_as_it_is(env_cluster, tmp_path):
    archive = tmp_path / "project.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("project/hello.txt", "from zip")  # zip -r project.zip project/
    only_sub = tmp_path / "only_sub"
    (only_sub / "inner").mkdir(parents=True)
    (only_sub / "inner" / "hello.txt").write_text("from a subdirectory")

    @ray.remote
    def read(path):
        return open(path).read()

    assert ray.get(read.options(runtime_env={"working_dir": str(archive)}).remote("hello.txt"),
                   timeout=60) == "from zip"
    assert ray.get(read.options(runtime_env={"working_dir": str(only_sub)})
                   .remote("inner/hello.txt"), timeout=60) == "from a subdirectory"


def test_a_package_over_the_size_limit_is_refused_with_what_to_exclude(env_cluster, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("RUNTIME_ENV_PACKAGE_MAX_BYTES", "10000")
    (tmp_path / "small.txt").write_text("small")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob.bin").write_bytes(b"x" * 20000)
    with pytest.raises(ValueError) as info:
        probe.options(runtime_env={"working_dir": str(tmp_path)}).remote()
    message = str(info.value)
    assert "over the limit" in message and "big/ (" in message and "excludes" in message
    ok = probe.options(runtime_env={"working_dir": str(tmp_path), "excludes": ["big/"]}).remote()
    cwd = ray.get(ok, timeout=60)["cwd"]
    assert os.path.isfile(os.path.join(cwd, "small.txt"))
    assert not os.path.exists(os.path.join(cwd, "big"))


def test_a_missing_working_dir_is_named(env_cluster, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        probe.options(runtime_env={"working_dir": str(tmp_path / "nope")}).remote()


# -- py_modules --------------------------------------------------------------------------------------
def test_py_modules_directories_and_wheels_are_importable(env_cluster, tmp_path, wheelhouse):
    pkg = tmp_path / "my_local_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("NAME = 'local package'\n")
    _dir, wheel = wheelhouse

    @ray.remote
    def use_modules():
        import my_local_pkg
        import rtenv_demo
        return my_local_pkg.NAME, rtenv_demo.VALUE

    env = {"py_modules": [str(pkg), str(wheel)]}
    assert ray.get(use_modules.options(runtime_env=env).remote(), timeout=120) == \
        ("local package", 42)


# -- pip --------------------------------------------------------------------------------------------
def test_pip_installs_a_local_wheel_into_a_venv_of_its_own(env_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse

    @ray.remote
    def use_wheel():
        import rtenv_demo
        import runtime  # the runtime itself stays importable in the venv
        return rtenv_demo.VALUE, rtenv_demo.__file__, sys.executable, os.getpid(), \
            runtime.__name__

    env = pip_env(wheel_dir, "rtenv-demo==1.0")
    value, where, python, pid, _ = ray.get(use_wheel.options(runtime_env=env).remote(),
                                           timeout=180)
    session = env_cluster.address_info["session_dir"]
    venvs = os.path.join(session, "runtime_resources", "pip")
    assert value == 42
    assert where.startswith(venvs) and python.startswith(venvs)
    again = ray.get(use_wheel.options(runtime_env=env).remote(), timeout=60)
    assert again[2] == python  # the same venv: made once per requirement set
    plain = ray.get(probe.remote(), timeout=60)
    assert plain["python"] != python and plain["pid"] != pid
    with pytest.raises(ModuleNotFoundError):
        import rtenv_demo  # noqa: F401  (nothing was installed where the driver runs)


def test_pip_packages_win_over_the_drivers_site_packages(env_cluster, wheelhouse):
    @ray.remote
    def which():
        import iniconfig
        return getattr(iniconfig, "WHERE", "node"), iniconfig.__file__

    # A plain worker imports what the driver can, the driver's site-packages included ...
    assert ray.get(which.remote(), timeout=60)[0] == "driver"
    # ... but in a pip environment the environment's packages come first.
    wheel_dir, _wheel = wheelhouse
    where, path = ray.get(which.options(runtime_env=pip_env(wheel_dir, "iniconfig==0.0.1"))
                          .remote(), timeout=180)
    assert where == "env", f"the driver's iniconfig shadowed the environment's: {path}"


def test_a_failing_pip_install_fails_the_task_with_pips_output(env_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse
    env = pip_env(wheel_dir, "rtenv-missing==9.9")
    t0 = time.monotonic()
    with pytest.raises(RuntimeEnvSetupError) as info:
        ray.get(probe.options(runtime_env=env).remote(), timeout=120)
    message = str(info.value)
    assert "rtenv-missing==9.9" in message
    assert "No matching distribution found" in message  # pip's own words
    assert time.monotonic() - t0 < 100
    # An actor whose environment cannot be made dies with the reason.
    actor = Probe.options(runtime_env=env).remote("X")
    with pytest.raises(ray.exceptions.RayActorError, match="No matching distribution"):
        ray.get(actor.look.remote("X"), timeout=120)


def envs_with(*packages):
    """list_runtime_envs() records of the pip environment of exactly these packages."""
    return [e for e in list_runtime_envs()
            if (e["runtime_env"].get("pip") or {}).get("packages") == list(packages)]


def test_list_runtime_envs_shows_what_each_node_set_up_or_failed_to(env_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse
    node_id = env_cluster.address_info["node_id"]
    good = pip_env(wheel_dir, "rtenv-demo==1.0")
    assert ray.get(probe.options(runtime_env=good).remote(), timeout=180)["python"] != \
        sys.executable
    (rec,) = envs_with("rtenv-demo==1.0")
    assert rec["success"] is True and rec["error"] is None
    assert rec["node_id"] == node_id
    assert rec["runtime_env"]["pip"]["pip_install_options"] == \
        good["pip"]["pip_install_options"]
    assert rec["runtime_env"]["env_vars"] == JOB_VARS  # the job's, merged in
    assert abs(rec["creation_time_ms"] / 1000 - time.time()) < 600
    assert set(rec) >= {"runtime_env", "success", "creation_time_ms", "node_id", "error",
                        "ref_cnt"}

    bad = pip_env(wheel_dir, "rtenv-nowhere==3.1")
    with pytest.raises(RuntimeEnvSetupError):
        ray.get(probe.options(runtime_env=bad).remote(), timeout=120)
    (rec,) = envs_with("rtenv-nowhere==3.1")
    assert rec["success"] is False and rec["node_id"] == node_id
    assert "rtenv-nowhere==3.1" in rec["error"] and "No matching distribution" in rec["error"]
    assert list_runtime_envs(filters=[("success", "=", "False")], limit=100)
    assert all(not e["success"] for e in
               list_runtime_envs(filters=[("success", "=", "False")], limit=100))
    listed = ray.util.state.StateApiClient().list("runtime_envs")
    assert any(e["runtime_env"] == rec["runtime_env"] for e in listed)


def test_setup_timeout_seconds_bounds_the_setup_and_kills_it(env_cluster, tmp_path):
    slow = tmp_path / "slowpkg"
    slow.mkdir()
    pid_file = tmp_path / "build.pid"
    (slow / "setup.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\n")
    env = {"pip": {"packages": [str(slow)],
                   "pip_install_options": ["--no-index", "--no-build-isolation"]},
           "config": {"setup_timeout_seconds": 8}}
    t0 = time.monotonic()
    with pytest.raises(RuntimeEnvSetupError, match="setup_timeout_seconds"):
        ray.get(probe.options(runtime_env=env).remote(), timeout=120)
    assert time.monotonic() - t0 < 60
    assert pid_file.exists(), "the build never started: the test proves nothing"
    build = int(pid_file.read_text())

    def gone():
        try:
            return psutil.Process(build).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(gone, 15, message=f"the timed-out build (pid {build}) to be killed")


# -- clusters of their own (these run last: they replace the module's cluster) ----------------------
@pytest.fixture
def own_cluster(env_cluster, tmp_path_factory):
    """For a test that calls init() itself: the module's cluster is gone first, and
    whatever the test started is gone after it."""
    old = cluster_pids()
    ray.shutdown()
    assert_all_gone(old)
    yield str(tmp_path_factory.mktemp("own_cluster"))
    pids = cluster_pids()
    ray.shutdown()
    assert_all_gone(pids)


def test_a_submitted_jobs_runtime_env_merges_with_inits(own_cluster, tmp_path, monkeypatch):
    (tmp_path / "job_file.txt").write_text("from the job's working_dir")
    monkeypatch.setenv(JOB_ENV_VAR, json.dumps({"env_vars": {"J": "job"},
                                                "working_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match="RUNTIME_OVERRIDE_JOB_RUNTIME_ENV=1"):
        ray.init(num_cpus=1, _temp_dir=own_cluster, runtime_env={"env_vars": {"J": "driver"}})
    assert not ray.is_initialized() and not cluster_pids()  # refused before starting anything
    ray.init(num_cpus=1, _temp_dir=own_cluster, runtime_env={"env_vars": {"D": "driver"}})

    @ray.remote
    def look():
        return os.environ.get("J"), os.environ.get("D"), open("job_file.txt").read()

    assert ray.get(look.remote(), timeout=60) == ("job", "driver", "from the job's working_dir")
    ray.shutdown()
    monkeypatch.setenv(OVERRIDE_JOB_ENV_VAR, "1")
    ray.init(num_cpus=1, _temp_dir=own_cluster, runtime_env={"env_vars": {"J": "driver"}})
    assert ray.get(look.remote(), timeout=60)[0] == "driver"


def test_each_node_unpacks_the_package_from_the_gcs(own_cluster, tmp_path):
    ctx = ray.init(num_cpus=1, _temp_dir=own_cluster)
    token = open(os.path.join(ctx.address_info["session_dir"], "token")).read()
    second = Node(NodeConfig(head=False, node_ip="127.0.0.2",
                             gcs_address=ctx.address_info["gcs_address"], num_cpus=1,
                             session_dir=new_session_dir(own_cluster), token=token,
                             object_store_memory=128 * 1024 * 1024))
    try:
        second.start()
        wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30,
                 message="the second node to register")
        (tmp_path / "data.txt").write_text("shipped")

        @ray.remote
        def read():
            return open("data.txt").read(), os.getcwd()

        there = NodeAffinitySchedulingStrategy(node_id=second.node_id.hex(), soft=False)
        text, cwd = ray.get(read.options(runtime_env={"working_dir": str(tmp_path)},
                                         scheduling_strategy=there).remote(), timeout=90)
        assert text == "shipped"
        assert cwd.startswith(os.path.join(second.session_dir, "runtime_resources"))
    finally:
        second.stop()


# -- eager_install (Ray's default for the job's runtime_env) -----------------------------------------
def setup_runs(session_dir: str, kind: str) -> int:
    """How many times a setup command of `kind` ("venv", "pip") ran on the node."""
    logs = os.path.join(session_dir, "logs")
    return sum(open(os.path.join(logs, name)).read().count(" started pid ")
               for name in os.listdir(logs) if name.startswith(f"runtime_env_setup-{kind}-"))


@ray.remote
def demo_value():
    import rtenv_demo
    return rtenv_demo.VALUE, sys.executable


def test_eager_install_sets_the_jobs_env_up_before_any_task(own_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse
    ctx = ray.init(num_cpus=1, _temp_dir=own_cluster,
                   runtime_env=pip_env(wheel_dir, "rtenv-demo==1.0"))
    session = ctx.address_info["session_dir"]
    (rec,) = wait_for(lambda: [e for e in envs_with("rtenv-demo==1.0") if e["success"]], 180,
                      interval=0.5, message="the job's env to be set up with no task asking")
    assert rec["node_id"] == ctx.address_info["node_id"]
    value, python = ray.get(demo_value.remote(), timeout=120)
    assert value == 42 and python.startswith(os.path.join(session, "runtime_resources"))
    assert setup_runs(session, "venv") == 1  # the task found it made, and made nothing


def test_a_task_during_the_eager_install_waits_for_it(own_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse
    ctx = ray.init(num_cpus=1, _temp_dir=own_cluster,
                   runtime_env=pip_env(wheel_dir, "rtenv-demo==1.0"))
    session = ctx.address_info["session_dir"]
    wait_for(lambda: setup_runs(session, "venv"), 60, interval=0.02,
             message="init() to start setting the job's env up")
    assert ray.get(demo_value.remote(), timeout=180)[0] == 42
    assert setup_runs(session, "venv") == 1 and setup_runs(session, "pip") == 1
    (rec,) = envs_with("rtenv-demo==1.0")
    assert rec["success"] is True


def test_without_eager_install_the_env_is_set_up_on_first_use(own_cluster, wheelhouse):
    wheel_dir, _wheel = wheelhouse
    with pytest.raises(TypeError, match="eager_install must be a boolean"):
        ray.init(num_cpus=1, _temp_dir=own_cluster,
                 runtime_env={"config": {"eager_install": "yes"}})
    assert not ray.is_initialized() and not cluster_pids()
    ctx = ray.init(num_cpus=1, _temp_dir=own_cluster,
                   runtime_env=pip_env(wheel_dir, "rtenv-demo==1.0",
                                       config={"eager_install": False}))
    session = ctx.address_info["session_dir"]
    deadline = time.monotonic() + 3  # what an eager install would have started by now
    while time.monotonic() < deadline:
        assert list_runtime_envs() == [] and setup_runs(session, "venv") == 0
        time.sleep(0.2)
    assert ray.get(demo_value.remote(), timeout=180)[0] == 42
    (rec,) = envs_with("rtenv-demo==1.0")
    assert rec["success"] is True and setup_runs(session, "venv") == 1
