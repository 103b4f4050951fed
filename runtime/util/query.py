"""One filter grammar for every list of records: raytop's ``/`` prompt, the agent's
views and the GCS's task and actor queries all parse it here, so a filter means the
same wherever it runs (and runs where the records are, not where they are shown).

Grammar (terms separated by spaces, all of them must match; quote a term with
spaces in it):

* ``word`` or ``re.gex``: a case-insensitive regular expression searched in every
  field of the record (a term that is not a valid regex is a plain substring);
* ``key=value``: the field ``key`` contains ``value`` (case-insensitive substring,
  so ``state=PENDING`` also finds ``PENDING_NODE_ASSIGNMENT``); ``key==value`` is
  an exact (case-insensitive) match;
* ``key>N``, ``key<N``, ``key>=N``, ``key<=N``: numeric comparison (``restarts>0``);
* ``!term`` inverts a term; ``key!=value`` is ``!key=value``.

Keys are record fields (Ray's state-API names such as ``node_ip`` or
``func_or_class_name``) or the aliases the caller passes (raytop's column titles:
``node``, ``function``). An unknown key is a :class:`FilterError` naming the keys
there are.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["FilterError", "Filter", "parse", "sort_key", "apply"]

Record = Mapping[str, Any]


class FilterError(ValueError):
    """The filter text does not parse; the message says which term and why."""


_TERM = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(==|!=|>=|<=|=|>|<)(.*)$", re.S)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip().rstrip("%").replace(",", ""))
    except ValueError:
        return None


#: Results a term remembers per distinct value (states, functions and nodes repeat
#: over thousands of records; ids do not, and stop being remembered at this size).
_MEMO_SIZE = 4096


@dataclass(frozen=True)
class _Term:
    key: str          # "" = any field
    op: str           # "re", "=", "==", ">", "<", ">=", "<="
    value: str
    negate: bool
    pattern: Optional["re.Pattern[str]"] = None
    number: float = 0.0
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def matches(self, rec: Record, blob: Callable[[], str]) -> bool:
        if not self.key:
            return (self.pattern.search(blob()) is not None) != self.negate  # type: ignore
        actual = rec.get(self.key)
        try:
            hit = self.memo.get(actual)
        except TypeError:  # a dict or a list: not remembered
            return self._test(actual) != self.negate
        if hit is None:
            hit = self._test(actual)
            if len(self.memo) < _MEMO_SIZE:
                self.memo[actual] = hit
        return hit != self.negate

    def _test(self, actual: Any) -> bool:
        if self.op == "=":
            return self.value in _text(actual).lower()
        if self.op == "==":
            return self.value == _text(actual).lower()
        n = _number(actual)
        return n is not None and {">": n > self.number, "<": n < self.number,
                                  ">=": n >= self.number, "<=": n <= self.number}[self.op]


class Filter:
    """A parsed filter: call :meth:`matches` on records (dicts of fields)."""

    def __init__(self, text: str, terms: Sequence[_Term]) -> None:
        self.text = text
        self.terms = tuple(terms)
        self.keys = frozenset(t.key for t in terms if t.key)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def matches(self, rec: Record) -> bool:
        cache: List[str] = []

        def blob() -> str:
            if not cache:
                cache.append("\t".join(_text(v) for v in rec.values()
                                       if not isinstance(v, (dict, list))))
            return cache[0]

        return all(t.matches(rec, blob) for t in self.terms)


def parse(text: str, fields: Optional[Iterable[str]] = None,
          aliases: Optional[Mapping[str, str]] = None, what: str = "records") -> Filter:
    """Parse filter text. ``fields`` (when given) are the keys records have, so that an
    unknown key fails here with the list of known ones rather than matching nothing."""
    text = (text or "").strip()
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}
    known = set(fields) if fields is not None else None
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise FilterError(f"cannot parse filter {text!r}: {exc}") from None
    terms = []
    for word in words:
        negate = False
        while word.startswith("!") and len(word) > 1:
            negate, word = not negate, word[1:]
        m = _TERM.match(word)
        if m is None or not m.group(3) and m.group(2) in ("=", "=="):
            if m is not None:
                raise FilterError(f"filter term {word!r} has no value after {m.group(2)!r}")
            try:
                pattern = re.compile(word, re.I)
            except re.error:
                pattern = re.compile(re.escape(word), re.I)
            terms.append(_Term("", "re", word, negate, pattern))
            continue
        key, op, value = m.group(1), m.group(2), m.group(3)
        key = aliases.get(key.lower(), key)
        if known is not None and key not in known:
            shown = sorted(set(aliases) | known)
            raise FilterError(f"no field {m.group(1)!r} in {what}; filter on one of: "
                              f"{', '.join(shown)}")
        if op == "!=":
            op, negate = "=", not negate
        number = 0.0
        if op in (">", "<", ">=", "<="):
            n = _number(value)
            if n is None:
                raise FilterError(f"filter term {word!r}: {value!r} is not a number")
            number = n
        terms.append(_Term(key, op, value.lower(), negate, None, number))
    return Filter(text, terms)


def sort_key(field: str) -> Callable[[Record], Tuple]:
    """A key for sorted(): numbers before text, numbers numerically, text without case;
    a missing value sorts last."""
    def key(rec: Record) -> Tuple:
        v = rec.get(field)
        if v is None or v == "":
            return (2, 0.0, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (0, float(v), "")
        return (1, 0.0, _text(v).lower())
    return key


def apply(records: Iterable[Record], flt: Optional[Filter], sort: str = "",
          descending: bool = False, limit: int = 0) -> Tuple[List[Record], int]:
    """(the first ``limit`` matching records, sorted by ``sort`` when given; how many
    matched in all)."""
    matched = [r for r in records if flt.matches(r)] if flt else list(records)
    if sort:
        present = [r for r in matched if r.get(sort) not in (None, "")]
        present.sort(key=sort_key(sort), reverse=descending)
        if len(present) < len(matched):  # missing values last, whichever the direction
            present += [r for r in matched if r.get(sort) in (None, "")]
        matched = present
    n = len(matched)
    return (matched[:limit] if limit else matched), n

