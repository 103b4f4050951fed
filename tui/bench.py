"""``python -m tui.bench``: raytop at scale (100 nodes, 10,000 actors, 100,000 tasks).

What it measures, for a refresh of each main view and for a filter typed in the
tasks view:

* ui_ms: time the UI thread spends on it: swapping in the prepared tables and
  drawing every visible line of the main table (what must stay under 100 ms for
  raytop to feel live; the issue's bar);
* fetch_ms: time in the worker thread: the data source's answer (here the fake
  source filters, sorts and cuts the 100,000 records in-process, as the GCS does
  in its own process) plus preparing the tables (column widths);
* gcs_query_ms: the GCS's own work for the tasks view at this scale
  (TaskEventStore.query over 100,000 tasks: filter, summary, the 1,000 rows sent).

Run it on an idle machine; the figures go to docs/benchmarks.md ("raytop at scale").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Dict, List

__all__ = ["main"]


def _gcs_task_query_ms(n: int, repeat: int) -> Dict[str, float]:
    """TaskEventStore.query over n synthetic tasks (what ListTasks costs the GCS)."""
    from runtime.gcs.task_events import TaskEventStore
    from runtime.protocol import gcs_pb2

    store = TaskEventStore(n)
    node = b"n" * 28
    batch = gcs_pb2.TaskEventBatch(job_id=b"\x01\x00\x00\x00", node_id=node)
    for i in range(n):
        tid = i.to_bytes(24, "big")
        batch.statics.add(task_id=tid, name=f"f{i % 7}", type="NORMAL_TASK",
                          func_or_class_name=f"f{i % 7}", resources={"CPU": 1.0})
        for state, t in ((0, 1.0), (1, 1.1), (2, 1.2)) if i % 10 else ((0, 1.0), (1, 1.1)):
            batch.task_ids.append(tid)
            batch.states.append(state)
            batch.times.append(t + i * 1e-4)
        if i % 10:
            batch.task_ids.append(tid)
            batch.states.append(4 if i % 13 else 5)
            batch.times.append(2.0 + i * 1e-4)
            batch.outcomes.add(task_id=tid, node_id=node, worker_pid=100 + i % 50,
                               error_type="" if i % 13 else "ValueError")
    store.add(batch)
    out = {}
    for label, req in (
            ("none", gcs_pb2.ListTasksRequest(limit=1000)),
            ("summary", gcs_pb2.ListTasksRequest(limit=1000, summary=True)),
            ("filter_state", gcs_pb2.ListTasksRequest(limit=1000, filter="state=PENDING",
                                                      summary=True)),
            ("filter_regex", gcs_pb2.ListTasksRequest(limit=1000, filter="f[35]",
                                                      summary=True)),
            ("sort", gcs_pb2.ListTasksRequest(limit=1000, sort="worker_pid",
                                              descending=True))):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            store.query(req, {node: "10.0.0.1"}, lambda rec: "waiting")
            times.append((time.perf_counter() - t0) * 1000)
        out[label] = statistics.median(times)
    return out


async def _ui(repeat: int, size) -> Dict[str, Dict[str, float]]:
    from tui.app import RaytopApp
    from tui.fake import scale_source
    from tui.source import Query

    source = scale_source()
    app = RaytopApp(source, refresh=3600)
    results: Dict[str, Dict[str, float]] = {}

    async def applied(pilot, before: int) -> None:
        deadline = time.monotonic() + 120
        while app.applied <= before or app._fetching:
            if time.monotonic() > deadline:
                raise RuntimeError("raytop did not apply a refresh within 120 s")
            await pilot.pause(0.01)

    def paint_ms() -> float:
        t0 = time.perf_counter()
        for y in range(app.main.size.height):
            app.main.render_line(y)
        return (time.perf_counter() - t0) * 1000

    def fetch_ms(q: Query) -> float:
        t0 = time.perf_counter()
        reply = source.view(q)
        app._prepare(reply, 0, t0)
        return (time.perf_counter() - t0) * 1000

    async with app.run_test(size=size) as pilot:
        await applied(pilot, 0)
        for view in ("nodes", "actors", "tasks"):
            n = app.applied
            app.switch_view(view)
            await applied(pilot, n)
            ui, fetch, rows = [], [], 0
            for _ in range(repeat):
                n = app.applied
                app.request_refresh(force=True)
                await applied(pilot, n)
                ui.append(app.ui_times[-1] * 1000 + paint_ms())
                fetch.append(fetch_ms(app._query()))
                rows = app.main.data.matched
            results[f"refresh {view}"] = {"ui_ms": statistics.median(ui),
                                          "ui_ms_max": max(ui),
                                          "fetch_ms": statistics.median(fetch), "rows": rows}
        # A filter typed in the tasks view (the prompt, then enter).
        ui, fetch, latency = [], [], []
        for i in range(repeat):
            text = ("state=PENDING", "train_step", "!FINISHED")[i % 3]
            n = app.applied
            t0 = time.perf_counter()
            await pilot.press("slash", *text, "enter")
            await applied(pilot, n)
            latency.append((time.perf_counter() - t0) * 1000)
            ui.append(app.ui_times[-1] * 1000 + paint_ms())
            fetch.append(fetch_ms(app._query()))
            n = app.applied
            await pilot.press("escape")  # clears the filter
            await applied(pilot, n)
        results["filter tasks"] = {"ui_ms": statistics.median(ui), "ui_ms_max": max(ui),
                                   "fetch_ms": statistics.median(fetch),
                                   "keys_to_rows_ms": statistics.median(latency),
                                   "rows": app.main.data.matched}
    return results


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui.bench", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)
    started = time.perf_counter()
    ui = asyncio.run(_ui(args.repeat, (200, 50)))
    gcs = _gcs_task_query_ms(100_000, args.repeat)
    for name, r in ui.items():
        extra = f", keys to rows {r['keys_to_rows_ms']:.0f} ms" if "keys_to_rows_ms" in r else ""
        print(f"{name:16s} ui {r['ui_ms']:6.1f} ms (max {r['ui_ms_max']:.1f})   "
              f"fetch+prepare (worker) {r['fetch_ms']:7.1f} ms   rows {r['rows']:,}{extra}")
    for name, ms in gcs.items():
        print(f"GCS ListTasks over 100,000 tasks, {name:12s} {ms:7.1f} ms")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ui": ui, "gcs_list_tasks_ms": gcs}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
