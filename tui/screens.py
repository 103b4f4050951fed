"""raytop's dialogs: a row's details, the confirm before an action, the key help."""
from __future__ import annotations

import textwrap
from typing import ClassVar, Iterable, List, Sequence, Tuple

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from runtime.protocol import agent_pb2

from tui.views import KEYS, LOG_KEYS

__all__ = ["DetailScreen", "ConfirmScreen", "HelpScreen"]

#: Fields the detail panel puts first, when the record has them.
_FIRST = ("state", "status", "pending_reason", "death_cause", "error_type", "error_message",
          "failure_reason", "message", "last_exit")


class DetailScreen(ModalScreen[str]):
    """Everything about one row. Dismissed with "" (close) or "logs" / "act"."""

    DEFAULT_CSS = """
    DetailScreen { align: center middle; }
    DetailScreen > Vertical { width: 90%; height: 85%; border: thick $accent;
                              background: $surface; padding: 0 1; }
    DetailScreen #detail-title { text-style: bold; color: $text-accent; height: auto; }
    DetailScreen #detail-hint { color: $text-muted; height: 1; dock: bottom; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,enter", "close", "Close"),
        Binding("l", "dismiss('logs')", "Logs"),
        Binding("x", "dismiss('act')", "Action"),
    ]

    def __init__(self, reply: agent_pb2.DescribeReply, *, can_log: bool, action: str) -> None:
        super().__init__()
        self.reply = reply
        self.can_log = can_log
        self.action_label = action

    def compose(self) -> ComposeResult:
        fields = list(self.reply.fields)
        order = {name: i for i, name in enumerate(_FIRST)}
        fields.sort(key=lambda f: order.get(f.name, len(order)))
        width = max([len(f.name) for f in fields] + [4])
        lines: List[str] = []
        for f in fields:
            value = f.value or "[$text-muted]—[/]"
            if f.value:
                value = escape(f.value)
                if f.name in ("pending_reason", "death_cause", "error_message", "failure_reason"):
                    value = f"[b $warning]{value}[/]"
            first, *rest = value.split("\n") if value else [""]
            lines.append(f"[$text-accent]{f.name.ljust(width + 2)}[/]{first}")
            lines.extend(" " * (width + 2) + more for more in rest)
        hints = ["esc close"]
        if self.can_log:
            hints.append("l logs")
        if self.action_label:
            hints.append(f"x {self.action_label}")
        with Vertical():
            yield Static(escape(self.reply.title), id="detail-title")
            with VerticalScroll():
                yield Static("\n".join(lines), id="detail-body")
            yield Static("  ·  ".join(hints), id="detail-hint")

    def action_close(self) -> None:
        self.dismiss("")


class ConfirmScreen(ModalScreen[bool]):
    """"Kill 2 actors?" with the rows named; y or enter confirms, n or esc cancels."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 80; height: auto; max-height: 80%; border: thick $error;
                               background: $surface; padding: 1 2; }
    ConfirmScreen #confirm-question { text-style: bold; margin-bottom: 1; }
    ConfirmScreen #confirm-rows { height: auto; max-height: 12; color: $text-muted; }
    ConfirmScreen Horizontal { height: auto; align: right middle; margin-top: 1; }
    ConfirmScreen Button { margin-left: 2; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape,q", "answer(False)", "No"),
    ]

    def __init__(self, question: str, rows: Sequence[str], warning: str = "") -> None:
        super().__init__()
        self.question = question
        self.rows = list(rows)
        self.warning = warning

    def compose(self) -> ComposeResult:
        shown = self.rows[:10] + ([f"… and {len(self.rows) - 10} more"]
                                  if len(self.rows) > 10 else [])
        with Vertical():
            yield Static(escape(self.question), id="confirm-question")
            yield Static("\n".join(escape(r) for r in shown), id="confirm-rows")
            if self.warning:
                yield Static(f"[b $error]{escape(self.warning)}[/]", id="confirm-warning")
            with Horizontal():
                yield Button("No (n)", id="no")
                yield Button("Yes (y)", id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def _key_lines(rows: Iterable[Tuple[str, str]], total: int = 94) -> List[str]:
    """Keys and what they do, the descriptions wrapped under themselves."""
    rows = list(rows)
    width = max(len(k) for k, _ in rows)
    out = []
    for k, v in rows:
        wrapped = textwrap.wrap(v, max(20, total - width - 4)) or [""]
        out.append(f"  [b $text-accent]{escape(k.ljust(width + 2))}[/]{escape(wrapped[0])}")
        out.extend(" " * (width + 4) + escape(more) for more in wrapped[1:])
    return out


class HelpScreen(ModalScreen[None]):
    """Every key (the `?` screen)."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 100; height: 85%; border: thick $accent;
                                  background: $surface; padding: 0 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, readonly: bool) -> None:
        super().__init__()
        self.readonly = readonly

    def compose(self) -> ComposeResult:
        lines = ["[b]raytop keys[/]" + ("   [b $warning](read-only: no actions)[/]"
                                        if self.readonly else ""), ""]
        lines += _key_lines(KEYS)
        lines += ["", "[b]in the log view[/]", ""] + _key_lines(LOG_KEYS)
        lines += ["", "[$text-muted]Every view also answers the mouse: the wheel scrolls, a "
                  "click selects, a click on a title sorts. esc closes this help.[/]"]
        with VerticalScroll():
            yield Static("\n".join(lines))

    def action_close(self) -> None:
        self.dismiss(None)
