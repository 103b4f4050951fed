"""A virtualised table: only the lines on screen are ever rendered.

raytop's tables are replaced wholesale about once a second and may hold
thousands of rows. Textual's DataTable keeps a keyed cell model that costs time
per row on every update; this widget keeps the rows as they came (a list of
``Row`` messages, see agent.proto) plus column widths computed off the UI thread
(:meth:`TableData.build`), so a refresh is a reference swap and a repaint of the
visible lines, whatever the row count.

It keeps the cursor on the same row (by key) across refreshes, tags rows
(htop's tag-then-act), sorts on a click on a header, and selects on a click on a
row (a second click, or enter, opens it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Set

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from runtime.protocol import agent_pb2

__all__ = ["TableData", "VirtualTable", "CellRenderer", "state_class"]

GAP = 2
GUTTER = 2  # the tag mark
#: Cell text wider than this is cut (the detail panel shows it whole).
MAX_WIDTH = 60
#: Columns that may be wider: they hold sentences.
WIDE = {"ERROR": 120, "REASON": 120, "MESSAGE": 140, "PATH": 120, "ENTRYPOINT": 80,
        "LAST EXIT": 80, "CLASSES": 100}

CellRenderer = Callable[[str, agent_pb2.Row, str, int], Optional[Text]]
"""(column title, row, cell text, width) -> the cell as styled Text, or None for plain."""

_OK = {"ALIVE", "RUNNING", "FINISHED", "SUCCEEDED", "CREATED", "INFO", "running", "idle",
       "leased", "joined", "started", "created"}
_BAD = {"DEAD", "FAILED", "ERROR", "failed", "died", "dead", "exited", "REMOVED"}
_WARN = {"PENDING_CREATION", "RESTARTING", "DRAINING", "WARNING", "backoff", "starting",
         "restarting", "draining", "left", "PENDING", "RESCHEDULING", "blocked", "STOPPED",
         "stopped", "SUBMITTED_TO_WORKER"}
STATE_COLUMNS = ("STATE", "STATUS", "SEVERITY")


def state_class(value: str) -> str:
    """The component class a state's cell is drawn with."""
    if value in _OK:
        return "vtable--ok"
    if value in _BAD:
        return "vtable--bad"
    if value in _WARN or value.startswith("PENDING"):
        return "vtable--warn"
    return ""


@dataclass
class TableData:
    """One refresh of a table, ready to draw (built in a worker thread)."""

    columns: List[str]
    rows: Sequence[agent_pb2.Row]
    widths: List[int]
    total: int = 0
    matched: int = 0
    title: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(cls, table: agent_pb2.Table, extra_columns: Sequence[tuple] = ()) -> "TableData":
        """From an agent Table; extra_columns are (title, width) the app draws itself
        (the nodes' sparklines)."""
        columns = list(table.columns)
        widths = [len(c) for c in columns]
        caps = [WIDE.get(c, MAX_WIDTH) for c in columns]
        n = len(columns)
        for row in table.rows:
            cells = row.cells
            for i in range(min(n, len(cells))):
                w = len(cells[i])
                if w > widths[i]:
                    widths[i] = min(w, caps[i])
        for title, width in extra_columns:
            columns.append(title)
            widths.append(max(width, len(title)))
        return cls(columns, table.rows, widths, table.total, table.matched, table.title)

    @classmethod
    def empty(cls) -> "TableData":
        return cls([], [], [])


class VirtualTable(ScrollView, can_focus=True):
    """A table of Row messages that renders only what is visible."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "vtable--header", "vtable--cursor", "vtable--tagged", "vtable--ok", "vtable--bad",
        "vtable--warn", "vtable--dim", "vtable--sorted", "vtable--bar", "vtable--bar-empty",
    }
    """
    | Class | Description |
    | :- | :- |
    | `vtable--header` | The column titles. |
    | `vtable--sorted` | The title of the column the table is sorted by. |
    | `vtable--cursor` | The selected row. |
    | `vtable--tagged` | Rows tagged for an action. |
    | `vtable--ok`, `vtable--bad`, `vtable--warn` | States: healthy, failed, waiting. |
    | `vtable--dim` | Stale data (the agent did not answer). |
    | `vtable--bar`, `vtable--bar-empty` | The used and free parts of a meter. |
    """

    DEFAULT_CSS = """
    VirtualTable {
        background: $surface;
        height: 1fr;
        scrollbar-gutter: stable;
    }
    VirtualTable > .vtable--header { color: $text-accent; text-style: bold; }
    VirtualTable > .vtable--sorted { color: $accent; text-style: bold underline; }
    VirtualTable > .vtable--cursor { background: $block-cursor-blurred-background; }
    VirtualTable:focus > .vtable--cursor { background: $block-cursor-background;
                                           color: $block-cursor-foreground; }
    VirtualTable > .vtable--tagged { color: $warning; text-style: bold; }
    VirtualTable > .vtable--ok { color: $success; }
    VirtualTable > .vtable--bad { color: $error; text-style: bold; }
    VirtualTable > .vtable--warn { color: $warning; }
    VirtualTable > .vtable--dim { color: $text-muted; }
    VirtualTable > .vtable--bar { color: $accent; }
    VirtualTable > .vtable--bar-empty { color: $panel-lighten-2; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "cursor(-1)", "Up", show=False),
        Binding("down,j", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,g", "edge(0)", "First row", show=False),
        Binding("end,G", "edge(1)", "Last row", show=False),
    ]

    cursor = reactive(0, always_update=True, init=False)
    """Index of the selected row."""
    stale = reactive(False)
    """Draw the rows dimmed: they are the last data that came, not current data."""

    class Selected(Message):
        """A row was opened (enter, or a click on the selected row)."""

        def __init__(self, table: "VirtualTable", row: agent_pb2.Row) -> None:
            super().__init__()
            self.table = table
            self.row = row

        @property
        def control(self) -> "VirtualTable":
            return self.table

    class HeaderClicked(Message):
        """A column title was clicked: sort by it."""

        def __init__(self, table: "VirtualTable", column: str) -> None:
            super().__init__()
            self.table = table
            self.column = column

        @property
        def control(self) -> "VirtualTable":
            return self.table

    def __init__(self, *, renderer: Optional[CellRenderer] = None, name: Optional[str] = None,
                 id: Optional[str] = None, classes: Optional[str] = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.data = TableData.empty()
        self.renderer = renderer
        self.tagged: Set[str] = set()
        self.sort_column = ""
        self.descending = False
        self.placeholder = ""
        self._fg_cache: Dict[tuple, Style] = {}

    # -- data ---------------------------------------------------------------------------------
    def set_data(self, data: TableData) -> None:
        """Show a new refresh, keeping the cursor on the row it was on (by key)."""
        old = self.current_row
        self.data = data
        width = GUTTER + sum(data.widths) + GAP * max(0, len(data.widths) - 1)
        self.virtual_size = Size(width, len(data.rows) + 1)
        index = self.cursor
        if old is not None:
            rows = data.rows
            if index < len(rows) and rows[index].key == old.key:
                pass  # the common case: nothing moved
            else:
                index = next((i for i, r in enumerate(rows) if r.key == old.key), index)
        self.cursor = min(index, max(0, len(data.rows) - 1))
        keys = {r.key for r in data.rows} if self.tagged else set()
        self.tagged &= keys
        self.refresh()

    @property
    def current_row(self) -> Optional[agent_pb2.Row]:
        rows = self.data.rows
        return rows[self.cursor] if 0 <= self.cursor < len(rows) else None

    def tagged_or_current(self) -> List[agent_pb2.Row]:
        """The rows an action applies to: the tagged ones, else the selected one."""
        if self.tagged:
            return [r for r in self.data.rows if r.key in self.tagged]
        row = self.current_row
        return [row] if row is not None else []

    def toggle_tag(self) -> None:
        row = self.current_row
        if row is None:
            return
        self.tagged.symmetric_difference_update({row.key})
        self.action_cursor(1)
        self.refresh()

    def clear_tags(self) -> None:
        self.tagged.clear()
        self.refresh()

    # -- cursor -------------------------------------------------------------------------------
    def watch_cursor(self, old: int, new: int) -> None:
        height = max(1, self.size.height - 1)
        top = round(self.scroll_y)
        if new < top:
            self.scroll_to(y=new, animate=False)
        elif new >= top + height:
            self.scroll_to(y=new - height + 1, animate=False)
        self.refresh()

    def watch_stale(self) -> None:
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        if self.data.rows:
            self.cursor = max(0, min(len(self.data.rows) - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.size.height - 2))

    def action_edge(self, end: int) -> None:
        if self.data.rows:
            self.cursor = len(self.data.rows) - 1 if end else 0

    def key_enter(self) -> None:
        row = self.current_row
        if row is not None:
            self.post_message(self.Selected(self, row))

    async def _on_click(self, event: events.Click) -> None:
        meta = event.style.meta
        if "vrow" not in meta:
            return
        index = meta["vrow"]
        if index < 0:
            column = meta.get("vcol", -1)
            if 0 <= column < len(self.data.columns):
                self.post_message(self.HeaderClicked(self, self.data.columns[column]))
            return
        if index == self.cursor or event.chain > 1:
            self.cursor = index
            self.key_enter()
        else:
            self.cursor = index

    # -- drawing ------------------------------------------------------------------------------
    def fg(self, name: str) -> Style:
        """A component class's foreground only (colour, weight): drawn over a row's own
        background (the cursor's, say) without hiding it."""
        key = (name, self.app.theme)
        style = self._fg_cache.get(key)
        if style is None:
            s = self.get_component_rich_style(name)
            style = self._fg_cache[key] = Style(color=s.color, bold=s.bold, italic=s.italic,
                                                underline=s.underline, dim=s.dim)
        return style

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        if y == 0:
            strip = self._header()
        else:
            index = y - 1 + scroll_y
            rows = self.data.rows
            if index >= len(rows):
                if index == 0 and self.placeholder:
                    return Strip([Segment(self.placeholder.ljust(width)[:width],
                                          self.rich_style + self.fg("vtable--dim"))])
                return Strip.blank(width, self.rich_style)
            strip = self._row(index, rows[index])
        return strip.crop(scroll_x, scroll_x + width).extend_cell_length(width, self.rich_style)

    def _header(self) -> Strip:
        base = self.rich_style + self.fg("vtable--header")
        sorted_style = self.rich_style + self.fg("vtable--sorted")
        segments = [Segment(" " * GUTTER, base)]
        last = len(self.data.columns) - 1
        for i, (title, w) in enumerate(zip(self.data.columns, self.data.widths)):
            is_sorted = title == self.sort_column
            label = title + ((" ▼" if self.descending else " ▲") if is_sorted else "")
            style = (sorted_style if is_sorted else base) + Style.from_meta({"vrow": -1,
                                                                              "vcol": i})
            segments.append(Segment(label.ljust(w)[:max(w, len(label))], style))
            if i != last:
                segments.append(Segment(" " * GAP, base))
        return Strip(segments)

    def _row(self, index: int, row: agent_pb2.Row) -> Strip:
        base = self.rich_style
        tagged = row.key in self.tagged
        if index == self.cursor:
            base = base + self.get_component_rich_style("vtable--cursor")
        if self.stale:
            base = base + self.fg("vtable--dim")
        meta = Style.from_meta({"vrow": index})
        mark_style = base + self.fg("vtable--tagged") if tagged else base
        segments = [Segment("● " if tagged else "  ", mark_style + meta)]
        cells = row.cells
        ncells = len(cells)
        last = len(self.data.columns) - 1
        render = self.renderer
        for i, (title, w) in enumerate(zip(self.data.columns, self.data.widths)):
            text = cells[i] if i < ncells else ""
            styled = render(title, row, text, w) if render is not None else None
            if styled is None:
                if len(text) > w:
                    text = text[:w - 1] + "…"
                style = base
                if tagged:
                    style = mark_style
                elif title in STATE_COLUMNS and not self.stale:
                    cls = state_class(text)
                    if cls:
                        style = base + self.fg(cls)
                segments.append(Segment(text.ljust(w), style + meta))
            else:
                styled.truncate(w, overflow="ellipsis", pad=True)
                for seg in styled.render(self.app.console, end=""):
                    segments.append(Segment(seg.text, base + (seg.style or Style()) + meta))
            if i != last:
                segments.append(Segment(" " * GAP, base + meta))
        return Strip(segments)
