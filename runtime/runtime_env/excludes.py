"""``excludes`` and ``.gitignore`` patterns, with git's matching rules (as Ray reads them).

Ray matches both with pathspec's "gitwildmatch"; this is the same grammar without the
dependency: ``#`` comments, ``!`` negation (the last matching pattern of a list decides),
a trailing ``/`` for directories only, a ``/`` at the start or in the middle anchoring the
pattern to the base directory (otherwise it matches at any depth), ``*``, ``?``, ``[...]``
and ``**`` (any number of directories).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

__all__ = ["PatternList"]


def _translate(body: str) -> str:
    out: List[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "*":
            if body.startswith("**", i):
                whole_dirs = i == 0 or body[i - 1] == "/"
                i += 2
                if i < n and body[i] == "/":
                    i += 1
                    out.append("(?:.*/)?" if whole_dirs else ".*/")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = body.find("]", i + 2 if i + 1 < n and body[i + 1] in "!^" else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                inner = body[i + 1:j]
                if inner[:1] in ("!", "^"):
                    inner = "^" + inner[1:]
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(body[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _compile(line: str) -> Optional[Tuple[re.Pattern, bool, bool]]:
    """(regex over the path relative to the base, negated, directories only), or None for
    a blank or comment line."""
    pattern = line.rstrip("\n")
    if not pattern.strip() or pattern.startswith("#"):
        return None
    if not pattern.endswith("\\ "):
        pattern = pattern.rstrip(" ")
    negated = pattern.startswith("!")
    if negated:
        pattern = pattern[1:]
    elif pattern.startswith("\\!") or pattern.startswith("\\#"):
        pattern = pattern[1:]
    dir_only = pattern.endswith("/")
    pattern = pattern.rstrip("/")
    if not pattern:
        return None
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    regex = _translate(pattern)
    if not anchored:
        regex = "(?:.*/)?" + regex
    return re.compile(regex + r"\Z", re.DOTALL), negated, dir_only


class PatternList:
    """One list of patterns (a runtime_env's ``excludes``, or one ``.gitignore``), relative
    to its base directory (``base`` is relative to the root walked, "" for the root)."""

    def __init__(self, lines: Sequence[str], base: str = "") -> None:
        self.base = base.strip("/")
        self.rules = [r for r in map(_compile, lines) if r is not None]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def excludes(self, rel: str, is_dir: bool) -> bool:
        """Whether the entry at `rel` (relative to the root, '/'-separated) is excluded."""
        if self.base:
            if not rel.startswith(self.base + "/"):
                return False
            rel = rel[len(self.base) + 1:]
        decided = False
        for regex, negated, dir_only in self.rules:
            if dir_only and not is_dir:
                continue
            if regex.match(rel):
                decided = not negated
        return decided
