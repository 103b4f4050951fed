"""raytop's entries in the command palette (ctrl+p): every view, the actions, the panels."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, Tuple

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tui.views import ORDER, VIEWS

if TYPE_CHECKING:
    from tui.app import RaytopApp

__all__ = ["RaytopCommands"]


class RaytopCommands(Provider):
    """Views (":nodes" ...), the current view's action, filter, sort, pause, help."""

    def _commands(self) -> Iterator[Tuple[str, Callable[[], object], str]]:
        app: "RaytopApp" = self.app  # type: ignore[assignment]
        for name in ORDER:
            spec = VIEWS[name]
            yield (f"{spec.title} (:{name})", partial(app.switch_view, name),
                   f"key {spec.key}: show the {spec.title.lower()} view")
        spec = VIEWS[app.view]
        if spec.action and not app.readonly:
            yield (f"{spec.action_label.capitalize()} the selected {spec.noun}s", app.action_act,
                   "key x; asks first")
        yield ("Filter this view (/)", partial(app.action_prompt, "filter"),
               "words, regex, !inverts, key=value")
        yield ("Run a command (:)", partial(app.action_prompt, "command"),
               ":actors state=ALIVE, :procs 10.0.0.2, :logs raylet@10.0.0.2, :sort CPU")
        if spec.aux:
            yield ("Show/hide the second table (p)", app.action_toggle_aux,
                   "actor placement, task summary, object stores")
        yield ("Logs of the selected row (l)", app.action_logs, "tail and follow, with find")
        yield ("Pause / resume refreshing (z)", app.action_pause, "")
        yield ("Refresh now (r)", app.action_refresh_now, "")
        yield ("Keys (?)", app.action_help, "every key raytop knows")

    async def discover(self) -> Hits:
        for title, command, help_text in self._commands():
            yield DiscoveryHit(title, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, command, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), command, help=help_text)
