"""raytop: the cluster's terminal UI.

One screen: the cluster's meters on top (nodes, CPU, GPU, memory, object store,
pending demand and why it waits), a row of views, and the current view's table,
with a second table under it for the views that have one (actor placement, the
task summary, the object stores). Data comes from a node agent (tui/source.py)
in worker threads, once a second by default; the UI thread only swaps in
tables that are ready to draw. When the agent or the head does not answer, a
banner says so, the last rows stay on screen dimmed as stale, and the next
refresh tries again.

``raytop --help`` (tui/cli.py) lists the options; docs/raytop.md has the keys.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Deque, Dict, List, Optional, Sequence, Tuple

from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.markup import escape
from textual.widgets import ContentSwitcher, Footer, Header, Input, Static

from runtime.protocol import agent_pb2

from tui.commands import RaytopCommands
from tui.screens import ConfirmScreen, DetailScreen, HelpScreen
from tui.source import Query, Source, SourceError
from tui.views import ORDER, VIEWS, resolve
from tui.widgets.logpane import LogPane
from tui.widgets.meters import bar, compact, meters_markup, sparkline
from tui.widgets.vtable import TableData, VirtualTable

__all__ = ["RaytopApp"]

#: The nodes view's extra columns, drawn here from the agent's samples: (title, width).
HISTORY_COLUMNS = (("CPU HISTORY", 16), ("STORE HISTORY", 12))
#: Widths of the nodes view's meter columns (a bar and the amount).
BAR_WIDTHS = {"CPU": 13, "GPU": 11, "MEM": 15, "STORE": 15}
_BAR_KEYS = {"CPU": "cpu", "GPU": "gpu", "MEM": "mem", "STORE": "store"}
HISTORY_KEPT = 600


@dataclass
class Prepared:
    """One refresh, made ready to draw by a worker thread."""

    generation: int
    reply: agent_pb2.ViewReply
    main: TableData
    aux: TableData
    meters: str
    fetch_s: float


@dataclass
class ViewState:
    filter: str = ""
    sort: str = ""
    descending: bool = False


class RaytopApp(App[int]):
    """The raytop application; ``source`` is where the data comes from."""

    TITLE = "raytop"
    CSS_PATH = "raytop.tcss"
    COMMANDS = App.COMMANDS | {RaytopCommands}
    ENABLE_COMMAND_PALETTE = True

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help"),
        Binding("colon", "prompt('command')", "Cmd"),
        Binding("slash", "prompt('filter')", "Filter"),
        *(Binding(v.key, f"show('{v.name}')", v.title, show=False) for v in VIEWS.values()),
        # One "x" per view action (check_action enables the current view's), so the footer
        # says what x does here.
        Binding("x", "act('nodes')", "Drain+stop", tooltip="Drain and stop the nodes"),
        Binding("x", "act('actors')", "Kill", tooltip="Kill the selected/tagged actors"),
        Binding("x", "act('tasks')", "Cancel", tooltip="Cancel the selected/tagged tasks"),
        Binding("x", "act('jobs')", "Stop job", tooltip="Stop the selected/tagged jobs"),
        Binding("x", "act('procs')", "Restart", tooltip="Restart the selected processes"),
        Binding("l", "logs", "Logs"),
        Binding("p", "toggle_aux", "Panel"),
        Binding("space", "tag", "Tag", show=False),
        Binding("u", "untag", "Untag all", show=False),
        Binding("less_than_sign", "sort(-1)", "Sort ←", show=False),
        Binding("greater_than_sign", "sort(1)", "Sort →", show=False),
        Binding("i", "invert", "Invert sort", show=False),
        Binding("r", "refresh_now", "Refresh", show=False),
        Binding("z", "pause", "Pause", show=False),
        Binding("ctrl+t", "next_theme", "Theme", show=False),
        Binding("ctrl+s", "screenshot", "Screenshot", show=False),
        Binding("escape", "back", "Back", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: Source, *, refresh: float = 1.0, view: str = "nodes",
                 filter: str = "", limit: int = 1000, readonly: bool = False,
                 node: str = "", theme: str = "") -> None:
        super().__init__()
        self.source = source
        self.refresh_s = max(0.1, refresh)
        self.limit = limit
        self.readonly_flag = readonly or source.readonly
        self.view = view if view in VIEWS else "nodes"
        self.states: Dict[str, ViewState] = {v: ViewState() for v in VIEWS}
        self.states[self.view].filter = filter
        self.node = node
        self.show_aux = True
        self.paused = False
        self.history: Dict[str, Deque[Tuple[float, float, float]]] = {}
        self._history_since = 0.0
        self.last_ok: Optional[float] = None
        self.last_error = ""
        self.reply: Optional[agent_pb2.ViewReply] = None
        self.ui_times: Deque[float] = deque(maxlen=100)
        """Seconds the UI thread spent applying each refresh (the scale benchmark reads it)."""
        self.applied = 0
        """Refreshes applied so far (tests wait for it to grow)."""
        self._generation = 0
        self._fetching = False
        self._again = False
        self._prompt_mode = ""
        self._prompt_before = ""
        self.tailing: Optional[Tuple[str, str]] = None
        self._log_stream = None
        self._log_lock = threading.Lock()
        self._log_buffer: List[str] = []
        self._log_error = ""
        if theme:
            self.theme = theme

    # -- layout --------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield Static(id="banner")
        yield Static(id="meters")
        yield Static(id="tabs")
        with ContentSwitcher(initial="tables", id="body"):
            with Vertical(id="tables"):
                yield VirtualTable(renderer=self._render_cell, id="main")
                yield Static(id="auxtitle")
                yield VirtualTable(id="aux")
            yield LogPane(id="logpane")
        yield Input(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.source.label + ("  [read-only]" if self.readonly_flag else "")
        self.main = self.query_one("#main", VirtualTable)
        self.aux = self.query_one("#aux", VirtualTable)
        self.logpane = self.query_one("#logpane", LogPane)
        self.prompt = self.query_one("#prompt", Input)
        self.prompt.display = False
        self.query_one("#banner", Static).display = False
        self.main.placeholder = f"connecting to {self.source.label}…"
        self.main.focus()
        self._show_view_chrome()
        self.set_interval(self.refresh_s, self.request_refresh)
        self.set_interval(0.1, self._drain_log_buffer)
        self.request_refresh()

    @property
    def readonly(self) -> bool:
        return self.readonly_flag or bool(self.reply is not None and self.reply.readonly)

    # -- refreshing (worker threads do the I/O) ---------------------------------------------------
    def _query(self) -> Query:
        st = self.states[self.view]
        return Query(view=self.view, filter=st.filter, sort=st.sort, descending=st.descending,
                     limit=self.limit, node=self.node if VIEWS[self.view].per_node else "",
                     history=self.view == "nodes", history_since=self._history_since)

    def request_refresh(self, *, force: bool = False) -> None:
        """Ask for fresh data (at most one request in flight; a change of view or filter
        queues one more)."""
        if self.paused and not force:
            return
        if self._fetching:
            self._again = self._again or force
            return
        self._fetching = True
        self._fetch(self._query(), self._generation)

    @work(thread=True, group="fetch", exit_on_error=False)
    def _fetch(self, q: Query, generation: int) -> None:
        t0 = time.perf_counter()
        try:
            reply = self.source.view(q)
            prepared = self._prepare(reply, generation, t0)
        except SourceError as exc:
            self.call_from_thread(self._failed, str(exc), generation, exc.unreachable)
        except Exception as exc:  # a bug must not stop the refresh loop
            self.call_from_thread(self._failed, f"{type(exc).__name__}: {exc}", generation, True)
        else:
            self.call_from_thread(self._apply, prepared)

    def _prepare(self, reply: agent_pb2.ViewReply, generation: int, t0: float) -> Prepared:
        extra: Sequence[tuple] = HISTORY_COLUMNS if reply.view == "nodes" else ()
        main = TableData.build(reply.table, extra)
        if reply.view == "nodes":
            for i, col in enumerate(main.columns):
                if col in BAR_WIDTHS:
                    main.widths[i] = BAR_WIDTHS[col]
        aux = TableData.build(reply.aux)
        return Prepared(generation, reply, main, aux, meters_markup(reply.cluster),
                        time.perf_counter() - t0)

    def _apply(self, p: Prepared) -> None:
        t0 = time.perf_counter()
        self._fetching = False
        if p.generation != self._generation:
            self.request_refresh(force=True)  # the view changed meanwhile: ask again
            return
        reply = p.reply
        for h in reply.history:
            ring = self.history.get(h.node_id)
            if ring is None:
                ring = self.history[h.node_id] = deque(maxlen=HISTORY_KEPT)
            for s in h.samples:
                if not ring or s.time > ring[-1][0]:
                    ring.append((s.time, s.cpu, s.store))
                    self._history_since = max(self._history_since, s.time)
        gcs_down = bool(reply.error) and not reply.table.columns
        if reply.filter_error:
            self._banner(f"filter: {reply.filter_error}", "warning")
        elif gcs_down:
            self._stale(reply.error)
        else:
            if self.last_error and self.last_ok is not None:
                self.notify(f"reconnected to {self.source.label}", timeout=3)
            self.last_error = ""
            readonly_before = self.readonly
            self.reply = reply
            if self.readonly != readonly_before:  # the agent says this caller may not act
                self.refresh_bindings()
            self.last_ok = reply.time or time.time()  # the agent's clock: what the data shows
            self.main.placeholder = "no rows" + (" match the filter" if
                                                 self.states[self.view].filter else "")
            self.main.set_data(p.main)
            self.aux.set_data(p.aux)
            self.main.stale = self.aux.stale = False
            self.query_one("#meters", Static).update(p.meters)
            self._banner(reply.error, "warning") if reply.error else self._banner("")
        self._show_view_chrome()
        self.applied += 1
        self.ui_times.append(time.perf_counter() - t0)
        if self._again:
            self._again = False
            self.request_refresh(force=True)

    def _failed(self, message: str, generation: int, unreachable: bool) -> None:
        self._fetching = False
        if generation != self._generation:
            self.request_refresh(force=True)
            return
        if unreachable:
            self._stale(message)
        else:
            self._banner(message, "error")
        if self._again:
            self._again = False
            self.request_refresh(force=True)

    def _stale(self, message: str) -> None:
        self.last_error = message
        self.main.stale = self.aux.stale = True
        since = (f"showing data from {time.strftime('%H:%M:%S', time.localtime(self.last_ok))} "
                 f"(stale)" if self.last_ok else "no data yet")
        self._banner(f"⚠ {message} — {since}; retrying every {self.refresh_s:g}s", "error")
        if self.last_ok is None:
            self.main.placeholder = f"cannot reach the cluster: {message}"
            self.main.refresh()

    def _banner(self, text: str, severity: str = "warning") -> None:
        banner = self.query_one("#banner", Static)
        banner.display = bool(text)
        banner.set_class(severity == "error", "-error")
        banner.update(escape(text))

    # -- drawing -------------------------------------------------------------------------------
    def _show_view_chrome(self) -> None:
        """The row of views, the filter, the sort and the row counts."""
        parts = []
        for name in ORDER:
            spec = VIEWS[name]
            label = f" {spec.key} {name} "
            parts.append(f"[reverse b]{label}[/]" if name == self.view else
                         f"[$text-muted]{label}[/]")
        st = self.states[self.view]
        info = []
        if self.tailing is not None:
            component, node = self.tailing
            follow = "following" if self.logpane.follow else "paused"
            info.append(f"log [b]{escape(component)}[/] @ {escape(node or 'this node')} "
                        f"({follow}{', find ' + escape(repr(self.logpane.find)) if self.logpane.find else ''})")
        else:
            if VIEWS[self.view].per_node:
                node = self.reply.node_ip if self.reply is not None and self.reply.view == \
                    self.view else self.node
                info.append(f"node [b]{escape(node or self.node or 'local')}[/]")
            if st.filter:
                info.append(f"[$warning]/{escape(st.filter)}[/]")
            if st.sort:
                info.append(f"sort {escape(st.sort)} {'▼' if st.descending else '▲'}")
            data = self.main.data
            if data.columns:
                shown = len(data.rows)
                info.append(f"{shown:,} of {data.matched:,}" if shown < data.matched
                            else f"{data.matched:,} rows")
            if self.main.tagged:
                info.append(f"[$warning]{len(self.main.tagged)} tagged[/]")
        if self.paused:
            info.append("[b $warning]PAUSED[/]")
        if self.readonly:
            info.append("[$text-muted]read-only[/]")
        self.query_one("#tabs", Static).update("".join(parts) + "   " + "  ·  ".join(info))
        spec = VIEWS[self.view]
        has_aux = spec.aux and self.show_aux and self.tailing is None
        self.aux.display = has_aux
        auxtitle = self.query_one("#auxtitle", Static)
        auxtitle.display = has_aux
        if has_aux:
            auxtitle.update(f"[b]{escape(self.aux.data.title or '')}[/]  [$text-muted](p hides)[/]")

    def _render_cell(self, column: str, row: agent_pb2.Row, text: str,
                     width: int) -> Optional[Text]:
        """The nodes view's meters and sparklines; None (plain) for everything else."""
        if self.view != "nodes":
            return None
        key = _BAR_KEYS.get(column)
        table = self.main
        if key is not None:
            used, total = row.numbers.get(f"{key}_used", 0.0), row.numbers.get(f"{key}_total", 0.0)
            frac = used / total if total else 0.0
            level = "vtable--bad" if frac >= 0.9 else "vtable--warn" if frac >= 0.7 else "vtable--bar"
            out = Text()
            if total:
                out.append(bar(frac, 5), table.fg(level))
                out.append(bar(frac, 5, empty=True, used=False),
                           table.fg("vtable--bar-empty"))
            else:
                out.append("  –  ", table.fg("vtable--dim"))
            amount = compact(used, total, bytes_=key in ("mem", "store"))
            out.append(" " + amount, Style())
            return out
        if column in ("CPU HISTORY", "STORE HISTORY"):
            ring = self.history.get(row.key)
            if not ring:
                return Text("")
            values = [s[1] if column == "CPU HISTORY" else s[2] for s in ring]
            out = Text()
            out.append(sparkline(values, width), table.fg("vtable--bar"))
            return out
        return None

    # -- view switching ------------------------------------------------------------------------
    def switch_view(self, view: str, *, filter: Optional[str] = None, node: str = "") -> None:
        self._stop_tail()
        changed = view != self.view
        self.view = view
        if filter is not None:
            self.states[view].filter = filter
        if node:
            self.node = node
        if changed:
            self.main.set_data(TableData.empty())
            self.aux.set_data(TableData.empty())
            self.main.tagged.clear()
            self.main.cursor = 0
            self.main.scroll_to(0, 0, animate=False)
            self.main.placeholder = "loading…"
        self.query_one("#body", ContentSwitcher).current = "tables"
        self.main.focus()
        self._generation += 1
        self._show_view_chrome()
        self.refresh_bindings()
        self.request_refresh(force=True)

    def action_show(self, view: str) -> None:
        self.switch_view(view)

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action == "act":
            spec = VIEWS[self.view]
            return (bool(parameters) and parameters[0] == self.view and spec.action is not None
                    and self.tailing is None and not self.readonly)
        if action == "toggle_aux":
            return VIEWS[self.view].aux and self.tailing is None
        return True

    # -- prompt: ":" commands and "/" filters -----------------------------------------------------
    def action_prompt(self, mode: str) -> None:
        if self.tailing is not None and mode == "filter":
            mode = "find"
        self._prompt_mode = mode
        prompt = self.prompt
        if mode == "filter":
            self._prompt_before = self.states[self.view].filter
            prompt.value = self._prompt_before
            prompt.placeholder = "filter: words or regex, !inverts, key=value (state=PENDING)"
        elif mode == "find":
            self._prompt_before = self.logpane.find
            prompt.value = self._prompt_before
            prompt.placeholder = "find in the log (regex allowed)"
        else:
            prompt.value = ""
            prompt.placeholder = ":nodes :actors :tasks :jobs :pgs :objects :procs [node] " \
                                 ":events :logs [component@node] :sort COL :theme NAME :q"
        prompt.display = True
        prompt.focus()
        prompt.cursor_position = len(prompt.value)

    def _close_prompt(self) -> None:
        self.prompt.display = False
        self._prompt_mode = ""
        (self.logpane if self.tailing is not None else self.main).focus()

    @on(Input.Changed, "#prompt")
    def _prompt_changed(self, event: Input.Changed) -> None:
        if self._prompt_mode == "find":
            self.logpane.find = event.value
        elif self._prompt_mode == "filter":
            self._debounced_filter(event.value)

    def _debounced_filter(self, text: str) -> None:
        timer = getattr(self, "_filter_timer", None)
        if timer is not None:
            timer.stop()
        self._filter_timer = self.set_timer(0.25, partial(self._set_filter, text))

    def _set_filter(self, text: str) -> None:
        st = self.states[self.view]
        if st.filter != text:
            st.filter = text
            self._generation += 1
            self.request_refresh(force=True)
            self._show_view_chrome()

    @on(Input.Submitted, "#prompt")
    def _prompt_submitted(self, event: Input.Submitted) -> None:
        mode, text = self._prompt_mode, event.value.strip()
        self._close_prompt()
        if mode == "filter":
            timer = getattr(self, "_filter_timer", None)
            if timer is not None:
                timer.stop()
            self._set_filter(text)
        elif mode == "find":
            self.logpane.find = text
        else:
            self.run_command(text)

    def run_command(self, text: str) -> None:
        """Carry out a `:` command (also used by the command palette)."""
        text = text.strip().lstrip(":").strip()
        if not text:
            return
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        word_l = word.lower()
        if word_l in ("q", "q!", "quit", "exit"):
            self.exit(0)
            return
        if word_l in ("help", "h"):
            self.action_help()
            return
        if word_l == "theme":
            if rest in self.available_themes:
                self.theme = rest
            else:
                self.notify(f"no theme {rest!r}; themes: {', '.join(sorted(self.available_themes))}",
                            severity="error")
            return
        if word_l == "sort":
            self.sort_by(rest)
            return
        if word_l == "refresh":
            try:
                self.refresh_s = max(0.1, float(rest))
            except ValueError:
                self.notify(f"`:refresh {rest}`: give seconds, e.g. `:refresh 2`", severity="error")
            return
        view = resolve(word)
        if view is None:
            self.notify(f"no view or command {word!r}: try :nodes :actors :tasks :jobs :pgs "
                        f":objects :procs :events :logs, :sort, :theme, :q (? lists the keys)",
                        severity="error")
            return
        if view == "logs" and rest and not rest.startswith("/"):
            component, _, node = rest.partition("@")
            self.open_logs(component, node)
            return
        if VIEWS[view].per_node and rest and not rest.startswith("/") and "=" not in rest:
            self.switch_view(view, node=rest.split()[0])
            return
        self.switch_view(view, filter=rest.lstrip("/").strip() if rest else None)

    # -- sorting, tagging ------------------------------------------------------------------------
    def sort_by(self, column: str) -> None:
        columns = self.main.data.columns
        match = next((c for c in columns if c.lower() == column.lower()), None)
        if match is None:
            self.notify(f"no column {column!r} here; columns: {', '.join(columns)}",
                        severity="error")
            return
        if match in dict(HISTORY_COLUMNS):
            match = match.split()[0]
        st = self.states[self.view]
        if st.sort == match:
            st.descending = not st.descending
        else:
            st.sort, st.descending = match, match in ("CPU", "GPU", "MEM", "STORE", "RESTARTS",
                                                       "DURATION", "SIZE", "CPU%", "RSS",
                                                       "TASKS", "ACTORS", "UPTIME")
        self.main.sort_column, self.main.descending = st.sort, st.descending
        self._generation += 1
        self._show_view_chrome()
        self.request_refresh(force=True)

    def action_sort(self, step: int) -> None:
        columns = [c for c in self.main.data.columns if c not in dict(HISTORY_COLUMNS)]
        if not columns:
            return
        st = self.states[self.view]
        i = columns.index(st.sort) if st.sort in columns else (-1 if step > 0 else 0)
        self.sort_by(columns[(i + step) % len(columns)])

    def action_invert(self) -> None:
        st = self.states[self.view]
        if st.sort:
            self.sort_by(st.sort)

    @on(VirtualTable.HeaderClicked, "#main")
    def _header_clicked(self, event: VirtualTable.HeaderClicked) -> None:
        self.sort_by(event.column)

    def action_tag(self) -> None:
        self.main.toggle_tag()
        self._show_view_chrome()

    def action_untag(self) -> None:
        self.main.clear_tags()
        self._show_view_chrome()

    # -- details ------------------------------------------------------------------------------
    @on(VirtualTable.Selected, "#main")
    def _row_selected(self, event: VirtualTable.Selected) -> None:
        if self.view == "logs":
            self.open_logs(event.row.key, self.node)
            return
        self._describe(self.view, event.row.key, self.node if VIEWS[self.view].per_node else "")

    @work(thread=True, group="describe", exclusive=True, exit_on_error=False)
    def _describe(self, view: str, key: str, node: str) -> None:
        try:
            reply = self.source.describe(view, key, node)
        except SourceError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error")
            return
        self.call_from_thread(self._show_detail, view, key, reply)

    def _show_detail(self, view: str, key: str, reply: agent_pb2.DescribeReply) -> None:
        spec = VIEWS[view]
        action = spec.action_label if spec.action and not self.readonly else ""
        can_log = view in ("procs", "nodes", "tasks", "actors", "logs")

        def done(choice: Optional[str]) -> None:
            if choice == "logs":
                self._logs_for(view, key, {f.name: f.value for f in reply.fields})
            elif choice == "act":
                self._confirm_action([key])

        self.push_screen(DetailScreen(reply, can_log=can_log, action=action), done)

    # -- actions -------------------------------------------------------------------------------
    def action_act(self, view: str = "") -> None:
        rows = self.main.tagged_or_current()
        if not rows:
            self.notify("no row selected", severity="warning")
            return
        self._confirm_action([r.key for r in rows])

    def _confirm_action(self, keys: List[str]) -> None:
        spec = VIEWS[self.view]
        if spec.action is None:
            return
        if self.readonly:
            self.notify("read-only: actions are disabled", severity="warning")
            return
        by_key = {r.key: r for r in self.main.data.rows}
        described = []
        warning = ""
        for key in keys:
            row = by_key.get(key)
            described.append("  ".join(c for c in row.cells if c)[:76] if row else key)
            if spec.name == "nodes" and row is not None and "head" in row.cells:
                warning = ("This is the head node: its GCS stops too, and with it the whole "
                           "cluster.")
        n = len(keys)
        noun = spec.noun + ("es" if n > 1 and spec.noun.endswith("s") else "s" if n > 1 else "")
        question = f"{spec.action_label.capitalize()} {n} {noun}?"
        node = self.node if spec.per_node else ""

        def answer(yes: Optional[bool]) -> None:
            if yes:
                self._act(spec.action, keys, node)

        self.push_screen(ConfirmScreen(question, described, warning), answer)

    @work(thread=True, group="act", exit_on_error=False)
    def _act(self, action: str, keys: List[str], node: str) -> None:
        try:
            reply = self.source.act(action, keys, node)
        except SourceError as exc:
            self.call_from_thread(self.notify, str(exc), title="not done", severity="error")
            return
        self.call_from_thread(self._acted, reply)

    def _acted(self, reply: agent_pb2.ActionReply) -> None:
        for r in reply.results:
            self.notify(r.message, severity="information" if r.ok else "error",
                        title="done" if r.ok else "not done", timeout=8)
        self.main.clear_tags()
        self.request_refresh(force=True)

    # -- logs ----------------------------------------------------------------------------------
    def action_logs(self) -> None:
        row = self.main.current_row
        if self.view == "logs" and row is not None:
            self.open_logs(row.key, self.node)
        elif self.view == "procs" and row is not None:
            self.open_logs(row.key, self.node)
        elif self.view == "nodes" and row is not None:
            self.open_logs("raylet", row.key)
        elif self.view in ("tasks", "actors") and row is not None:
            self._describe_for_logs(self.view, row.key)
        elif self.view == "events" and row is not None:
            cells = dict(zip(self.main.data.columns, row.cells))
            if cells.get("KIND") == "process":
                self.open_logs(cells.get("SUBJECT", ""), cells.get("NODE", ""))
            else:
                self.notify("only process events have a log", severity="warning")
        else:
            self.switch_view("logs")

    @work(thread=True, group="describe", exclusive=True, exit_on_error=False)
    def _describe_for_logs(self, view: str, key: str) -> None:
        try:
            reply = self.source.describe(view, key)
        except SourceError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error")
            return
        self.call_from_thread(self._logs_for, view, key, {f.name: f.value for f in reply.fields})

    def _logs_for(self, view: str, key: str, fields: Dict[str, str]) -> None:
        if view in ("procs", "logs"):
            self.open_logs(key, self.node)
        elif view == "nodes":
            self.open_logs("raylet", key)
        elif fields.get("worker_id"):
            self.open_logs(f"worker-{fields['worker_id'][:8]}", fields.get("node_ip", ""))
        else:
            self.notify(f"this {VIEWS[view].noun} has no worker yet, so no log",
                        severity="warning")

    def open_logs(self, component: str, node: str = "") -> None:
        """Tail a component's or worker's log (on node: an IP or node id; "" = local)."""
        self._stop_tail()
        self.tailing = (component, node)
        self.logpane.reset(f"{component}@{node}")
        self.query_one("#body", ContentSwitcher).current = "logpane"
        self.logpane.focus()
        self._log_error = ""
        self._show_view_chrome()
        self.refresh_bindings()
        self._tail(component, node)

    @work(thread=True, group="tail", exit_on_error=False)
    def _tail(self, component: str, node: str) -> None:
        try:
            stream = self.source.tail(component, node, lines=1000, follow=True)
            self._log_stream = stream
            for line in stream:
                with self._log_lock:
                    self._log_buffer.append(line.line)
        except SourceError as exc:
            self.call_from_thread(self.notify, str(exc), title=f"log of {component}",
                                  severity="error")

    def _drain_log_buffer(self) -> None:
        if not self._log_buffer:
            return
        with self._log_lock:
            lines, self._log_buffer = self._log_buffer, []
        if self.tailing is not None:
            self.logpane.append(lines)

    def _stop_tail(self) -> None:
        stream, self._log_stream = self._log_stream, None
        if stream is not None:
            stream.cancel()
        if self.tailing is not None:
            self.tailing = None
            with self._log_lock:
                self._log_buffer = []

    # -- small actions -------------------------------------------------------------------------
    def action_back(self) -> None:
        if self.prompt.display:
            if self._prompt_mode == "filter":
                self._set_filter(self._prompt_before)
            elif self._prompt_mode == "find":
                self.logpane.find = self._prompt_before
            self._close_prompt()
            return
        if self.tailing is not None:
            self.switch_view(self.view)
            return
        if self.states[self.view].filter:
            self._set_filter("")
            return
        if self.main.tagged:
            self.action_untag()

    def action_toggle_aux(self) -> None:
        self.show_aux = not self.show_aux
        self._show_view_chrome()

    def action_refresh_now(self) -> None:
        self.request_refresh(force=True)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self._show_view_chrome()
        if not self.paused:
            self.request_refresh(force=True)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.readonly))

    def action_next_theme(self) -> None:
        names = sorted(self.available_themes)
        self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names \
            else names[0]
        self.notify(f"theme {self.theme}", timeout=2)

    def action_screenshot(self) -> None:
        path = self.save_screenshot()
        self.notify(f"saved {path}", timeout=4)

    def on_unmount(self) -> None:
        self._stop_tail()
        self.source.close()
