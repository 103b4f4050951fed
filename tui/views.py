"""raytop's views and keys: what each view is called, its key, its action, and the
help text (the help screen and docs/raytop.md are written from these tables)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["ViewSpec", "VIEWS", "ORDER", "ALIASES", "KEYS", "LOG_KEYS", "resolve"]


@dataclass(frozen=True)
class ViewSpec:
    name: str
    key: str
    title: str
    action: Optional[str] = None
    """The agent action the view's `x` key runs on the selected or tagged rows."""
    action_label: str = ""
    """What the confirm dialog asks: "kill 2 actors?"."""
    noun: str = ""
    aux: bool = False
    """The view has a second table (`p` shows or hides it)."""
    per_node: bool = False
    """The view shows one node (`:procs 10.0.0.2`)."""


VIEWS: Dict[str, ViewSpec] = {v.name: v for v in (
    ViewSpec("nodes", "1", "Nodes", "drain_node", "drain and stop", "node"),
    ViewSpec("actors", "2", "Actors", "kill_actor", "kill", "actor", aux=True),
    ViewSpec("tasks", "3", "Tasks", "cancel_task", "cancel", "task", aux=True),
    ViewSpec("jobs", "4", "Jobs", "stop_job", "stop", "job"),
    ViewSpec("pgs", "5", "Placement groups", noun="placement group"),
    ViewSpec("objects", "6", "Objects", noun="object", aux=True),
    ViewSpec("procs", "7", "Processes", "restart_process", "restart", "process",
             per_node=True),
    ViewSpec("events", "8", "Events", noun="event"),
    ViewSpec("logs", "9", "Logs", noun="log", per_node=True),
)}
ORDER: Tuple[str, ...] = tuple(VIEWS)

#: What `:` accepts besides the view names (k9s-style short forms).
ALIASES = {
    "node": "nodes", "no": "nodes", "n": "nodes",
    "actor": "actors", "ac": "actors", "a": "actors",
    "task": "tasks", "ta": "tasks", "t": "tasks",
    "job": "jobs", "j": "jobs",
    "pg": "pgs", "placementgroups": "pgs", "placement-groups": "pgs",
    "object": "objects", "obj": "objects", "o": "objects",
    "proc": "procs", "process": "procs", "processes": "procs", "ps": "procs",
    "event": "events", "ev": "events", "e": "events",
    "log": "logs", "l": "logs",
}


def resolve(word: str) -> Optional[str]:
    """The view a `:` word names, or None."""
    word = word.strip().lower()
    return word if word in VIEWS else ALIASES.get(word)


#: Every key, for `?` and docs/raytop.md: (keys, what they do).
KEYS: Tuple[Tuple[str, str], ...] = (
    ("1 … 9", "views: 1 nodes, 2 actors, 3 tasks, 4 jobs, 5 placement groups, 6 objects, "
              "7 processes, 8 events, 9 logs"),
    (":", "command: `:actors`, `:tasks state=FAILED`, `:procs 10.0.0.2`, `:logs raylet@10.0.0.2`, "
          "`:sort CPU`, `:theme nord`, `:q`"),
    ("ctrl+p", "command palette (every view and action, fuzzy search, themes)"),
    ("/", "filter: words or regex, `!` inverts, `key=value` on a column (`state=PENDING`, "
          "`node=10.0.0.2`), `restarts>0`; enter keeps it, esc clears it"),
    ("↑ ↓ j k, PgUp PgDn, g G", "move; the mouse wheel scrolls, a click selects"),
    ("enter, double click", "details of the selected row (why it is pending, errors, events)"),
    ("< >, click a title", "sort by the previous / next column"),
    ("i", "invert the sort"),
    ("space", "tag the row (actions apply to tagged rows, else to the selected one)"),
    ("u", "untag all"),
    ("x", "the view's action, after a confirm: drain and stop a node, kill an actor, cancel a "
          "task, stop a job, restart a process (not with --readonly)"),
    ("l", "logs of the selected process, task's worker or node's raylet"),
    ("p", "show / hide the second table (actor placement, task summary, object stores)"),
    ("r", "refresh now"),
    ("z", "pause / resume refreshing"),
    ("ctrl+t", "next theme"),
    ("ctrl+s", "save an SVG screenshot"),
    ("?", "this help"),
    ("q, ctrl+q", "quit (in a dialog: close it)"),
    ("esc", "close the prompt or the log view; clear the filter; untag"),
)

LOG_KEYS: Tuple[Tuple[str, str], ...] = (
    ("f", "follow the log (new lines as they are written) on / off"),
    ("/", "find (case-insensitive; regex allowed)"),
    ("n N", "next / previous match"),
    ("g G, Home End", "top / bottom"),
    ("esc", "back to the previous view"),
)
