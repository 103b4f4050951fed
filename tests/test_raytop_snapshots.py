"""raytop's main screens as SVG snapshots (pytest-textual-snapshot), drawn from a fixed
made-up cluster (tui/fake.py) behind the same interface as a real agent. The SVGs
under __snapshots__/ are docs/raytop.md's screenshots; after a deliberate change of
the UI, look at them and accept with
``pytest tests/test_raytop_snapshots.py --snapshot-update``."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from tui.app import RaytopApp  # noqa: E402
from tui.fake import FakeSource  # noqa: E402

SIZE = (150, 38)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Times on screen are local times: draw them in UTC whatever the machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make_app(refresh: float = 3600, **kw) -> RaytopApp:
    # A refresh only when asked (at start, on a change of view): every shot sees one state.
    return RaytopApp(FakeSource(**kw), refresh=refresh)


async def settled(pilot, app: RaytopApp, before: int = 0, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        if app.applied > before and not app._fetching:
            await pilot.pause(0.1)
            return
    raise AssertionError(f"raytop did not apply a refresh in {timeout}s")


def view(command: str = "", *keys: str, stale: bool = False):
    """run_before: wait for the first data, run a `:` command, press keys."""
    async def run_before(pilot) -> None:
        app: RaytopApp = pilot.app
        await settled(pilot, app)
        if command.startswith("logs "):  # a log is streamed, not refreshed
            app.run_command(command)
            deadline = time.monotonic() + 10
            while len(app.logpane.lines) < 40 and time.monotonic() < deadline:
                await pilot.pause(0.05)
        elif command:
            n = app.applied
            app.run_command(command)
            await settled(pilot, app, n)
        if stale:
            n = app.applied
            app.source.unreachable = True
            app.request_refresh(force=True)
            deadline = time.monotonic() + 10
            while not app.main.stale and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert app.main.stale and n == app.applied
        if keys:
            await pilot.press(*keys)
            await pilot.pause(0.3)
    return run_before


def test_nodes_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view())


def test_actors_view_with_placement(snap_compare):
    assert snap_compare(make_app(actors=40), terminal_size=SIZE, run_before=view("actors"))


def test_tasks_view_pending_with_reasons_and_summary(snap_compare):
    assert snap_compare(make_app(tasks=400), terminal_size=SIZE,
                        run_before=view("tasks state=PENDING"))


def test_task_detail_says_why_it_is_pending(snap_compare):
    assert snap_compare(make_app(tasks=400), terminal_size=SIZE,
                        run_before=view("tasks function=needs_gpu state=PENDING", "enter"))


def test_jobs_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("jobs"))


def test_placement_groups_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("pgs"))


def test_objects_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("objects"))


def test_processes_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("procs"))


def test_events_view(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("events"))


def test_log_view_with_find(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE,
                        run_before=view("logs raylet", "slash", *"queued", "enter"))


def test_kill_confirm_dialog(snap_compare):
    assert snap_compare(make_app(actors=40), terminal_size=SIZE,
                        run_before=view("actors class=Trainer", "space", "space", "x"))


def test_stale_banner(snap_compare):
    # Failed refreshes all look the same: the usual 1 s cadence keeps the screen still.
    assert snap_compare(make_app(refresh=1), terminal_size=SIZE, run_before=view(stale=True))


def test_help_screen(snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=view("", "question_mark"))


def test_mouse_sorts_selects_and_opens_and_the_palette_switches_views():
    """Not a snapshot: the mouse (a click on a title sorts, on a row selects, again
    opens it) and the command palette, on the made-up cluster."""
    import asyncio

    from tui.screens import DetailScreen

    app = make_app(actors=12)

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await view("actors")(pilot)
            table = app.main
            columns = table.data.columns
            x = 2 + sum(w + 2 for w in table.data.widths[:columns.index("CLASS")])
            n = app.applied
            await pilot.click("#main", offset=(x + 1, 0))
            await settled(pilot, app, n)
            classes = [r.cells[columns.index("CLASS")] for r in table.data.rows]
            assert app.states["actors"].sort == "CLASS" and classes == sorted(classes)
            await pilot.click("#main", offset=(5, 3))
            assert table.cursor == 2
            await pilot.click("#main", offset=(5, 3))
            deadline = time.monotonic() + 10
            while not isinstance(app.screen, DetailScreen) and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert isinstance(app.screen, DetailScreen)
            assert app.screen.reply.title.endswith(table.data.rows[2].key)
            await pilot.press("escape")
            await pilot.press("ctrl+p")
            await pilot.pause(0.3)
            await pilot.press(*"Events (:events)")
            await pilot.pause(0.5)
            await pilot.press("enter")
            deadline = time.monotonic() + 10
            while app.view != "events" and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert app.view == "events"

    asyncio.run(main())
