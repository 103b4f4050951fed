"""A log viewer in toolong's manner: tail, follow, find.

Lines arrive in batches from a worker thread (the agent's TailLogs stream); the
pane keeps the last ``MAX_LINES`` of them and draws only what is on screen, with
the matches of the current search highlighted.
"""
from __future__ import annotations

import re
from collections import deque
from typing import ClassVar, Deque, Iterable, Optional

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

__all__ = ["LogPane"]

MAX_LINES = 20_000


class LogPane(ScrollView, can_focus=True):
    """The lines of one log; follows the end while ``follow`` is on."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"logpane--match", "logpane--current",
                                             "logpane--warning", "logpane--error",
                                             "logpane--marker"}
    """
    | Class | Description |
    | :- | :- |
    | `logpane--match` | Text matching the search. |
    | `logpane--current` | The line the search is on. |
    | `logpane--warning`, `logpane--error` | Lines logged at those levels. |
    | `logpane--marker` | The supervisor's `=== started ===` lines. |
    """

    DEFAULT_CSS = """
    LogPane { background: $surface; height: 1fr; }
    LogPane > .logpane--match { background: $warning 40%; text-style: bold; }
    LogPane > .logpane--current { background: $boost; }
    LogPane > .logpane--warning { color: $warning; }
    LogPane > .logpane--error { color: $error; }
    LogPane > .logpane--marker { color: $accent; text-style: bold; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "toggle_follow", "Follow"),
        Binding("n", "find_next(1)", "Next match", show=False),
        Binding("N", "find_next(-1)", "Prev match", show=False),
        Binding("up,k", "scroll_up", "Up", show=False),
        Binding("down,j", "scroll_down", "Down", show=False),
        Binding("home,g", "scroll_home", "Top", show=False),
        Binding("end,G", "scroll_end", "Bottom", show=False),
        Binding("pageup", "page_up", show=False),
        Binding("pagedown", "page_down", show=False),
    ]

    follow = reactive(True)
    """Keep the last line in view as lines arrive."""
    find = reactive("")
    """What to highlight (a case-insensitive regex, or text when it is not one)."""

    def __init__(self, *, name: Optional[str] = None, id: Optional[str] = None) -> None:
        super().__init__(name=name, id=id)
        self.lines: Deque[str] = deque(maxlen=MAX_LINES)
        self.source = ""
        self._pattern: Optional[re.Pattern[str]] = None
        self._current = -1
        self._width = 0

    def reset(self, source: str) -> None:
        self.source = source
        self.lines.clear()
        self._current = -1
        self._width = 0
        self.follow = True
        self.virtual_size = Size(0, 0)
        self.scroll_to(0, 0, animate=False)
        self.refresh()

    def append(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.lines.append(line.expandtabs(4))
            if len(line) > self._width:
                self._width = len(line)
        self.virtual_size = Size(self._width, len(self.lines))
        if self.follow:  # once the new size is laid out, else the end is the old end
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)
        self.refresh()

    def watch_find(self, text: str) -> None:
        self._pattern = None
        if text:
            try:
                self._pattern = re.compile(text, re.I)
            except re.error:
                self._pattern = re.compile(re.escape(text), re.I)
            self._current = -1
            self.action_find_next(1)
        self.refresh()

    def watch_follow(self, follow: bool) -> None:
        if follow:
            self.scroll_end(animate=False, x_axis=False)

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.notify(f"follow {'on' if self.follow else 'off'}", timeout=1.5)

    def action_find_next(self, direction: int) -> None:
        if self._pattern is None or not self.lines:
            return
        lines = list(self.lines)
        n = len(lines)
        start = self._current if self._current >= 0 else (n - 1 if direction > 0 else 0)
        for step in range(1, n + 1):
            i = (start + direction * step) % n
            if self._pattern.search(lines[i]):
                self._current = i
                self.follow = False
                self.scroll_to(y=max(0, i - self.size.height // 2), animate=False)
                self.refresh()
                return
        self.notify(f"{self.find!r} not found in the last {n} lines", severity="warning")

    @property
    def matches(self) -> int:
        if self._pattern is None:
            return 0
        return sum(1 for line in self.lines if self._pattern.search(line))

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        if index >= len(self.lines):
            return Strip.blank(width, self.rich_style)
        line = self.lines[index]
        base = self.rich_style
        if line.startswith("==="):
            base = base + self.get_component_rich_style("logpane--marker")
        elif " ERROR " in line or "Traceback" in line:
            base = base + self.get_component_rich_style("logpane--error")
        elif " WARNING " in line:
            base = base + self.get_component_rich_style("logpane--warning")
        if index == self._current:
            base = base + self.get_component_rich_style("logpane--current")
        segments = []
        if self._pattern is not None:
            match_style = base + self.get_component_rich_style("logpane--match")
            pos = 0
            for m in self._pattern.finditer(line):
                if m.start() == m.end():
                    continue
                segments.append(Segment(line[pos:m.start()], base))
                segments.append(Segment(line[m.start():m.end()], match_style))
                pos = m.end()
            segments.append(Segment(line[pos:], base))
        else:
            segments.append(Segment(line, base))
        strip = Strip(segments).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width, base if index == self._current else
                                        self.rich_style or Style())
