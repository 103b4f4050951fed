"""Print a markdown table comparing two microbench.py JSON results (ours vs Ray).

    python scripts/bench_compare.py runtime.json ray.json

Ratio is ours/Ray for rates and Ray/ours for times and memory, so > 1 always
means this runtime is better.
"""
import json
import sys

LOWER_IS_BETTER_UNITS = {"s", "ms", "MB", "s/actor", "count"}


def main(ours_path: str, ray_path: str) -> None:
    ours = json.load(open(ours_path))
    ray = json.load(open(ray_path))
    print("| metric | unit | this runtime | Ray 2.60 | better by |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, m in ours["metrics"].items():
        r = ray["metrics"].get(name)
        if r is None:
            continue
        a, b, unit = m["value"], r["value"], m["unit"]
        if unit == "bool" or name.startswith("procs_"):
            ratio = ""
        elif unit in LOWER_IS_BETTER_UNITS:
            ratio = f"{b / a:.1f}x" if a else ""
        else:
            ratio = f"{a / b:.1f}x" if b else ""
        print(f"| `{name}` | {unit} | {a:.4g} | {b:.4g} | {ratio} |")
    for label, doc in (("this runtime", ours), ("Ray 2.60", ray)):
        load = doc.get("load", {})
        print(f"\n{label}: {doc.get('started_at')}, {doc.get('duration_s')} s, foreign CPU "
              f"{load.get('foreign_cpu_pct')} %, loadavg at start {load.get('loadavg_start')}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
