"""What tasks and actors print shows up in the driver's output, prefixed (log_to_driver)."""
import subprocess
import sys
import textwrap

from helpers.env import scrubbed_env

SCRIPT = textwrap.dedent("""
    import sys
    import runtime as ray
    ray.init(num_cpus=2, _temp_dir=sys.argv[1], log_to_driver={log})

    @ray.remote
    def shout(i):
        print("hello from task", i)
        print("problem", i, file=sys.stderr)
        return i

    @ray.remote
    class Speaker:
        def say(self):
            print("actor speaking")

    assert ray.get([shout.remote(i) for i in range(3)]) == [0, 1, 2]
    ray.get(Speaker.remote().say.remote())
    ray.shutdown()
""")


def run_driver(tmp_path, log_to_driver: bool):
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT.format(log=log_to_driver))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "sessions")],
                          capture_output=True, text=True, timeout=120, env=scrubbed_env(),
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_prints_reach_the_driver_with_a_prefix(tmp_path):
    proc = run_driver(tmp_path, True)
    out_lines = proc.stdout.splitlines()
    for i in range(3):
        assert any(line.startswith("(shout pid=") and line.endswith(f"hello from task {i}")
                   for line in out_lines), proc.stdout
    assert any(line.startswith("(Speaker pid=") and line.endswith("actor speaking")
               for line in out_lines), proc.stdout
    assert any(line.startswith("(shout pid=") and line.endswith("problem 0")
               for line in proc.stderr.splitlines()), proc.stderr


def test_log_to_driver_false_keeps_output_in_the_worker_logs(tmp_path):
    proc = run_driver(tmp_path, False)
    assert "hello from task" not in proc.stdout
    logs = list((tmp_path / "sessions").glob("session_*/logs/worker-*.out"))
    assert any("hello from task 0" in p.read_text() for p in logs)
