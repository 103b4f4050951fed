"""One filter grammar for every list of records: raytop's ``/`` prompt, the agent's
views and the GCS's task and actor queries all parse it here, so a filter means the
same wherever it runs (and runs where the records are, not where they are shown).

Grammar (terms separated by spaces, all of them must match; quote a term with
spaces in it):

* ``word`` or ``re.gex``: a case-insensitive regular expression searched in each
  field of the record; the term matches if it matches within any one field, so
  ``^`` and ``$`` are the start and end of a field (``^train`` finds the function
  ``train_step``) and no match spans two fields (a term that is not a valid regex
  is a plain substring);
* ``key=value``: the field ``key`` contains ``value`` (case-insensitive substring,
  so ``state=PENDING`` also finds ``PENDING_NODE_ASSIGNMENT``); ``key==value`` is
  an exact (case-insensitive) match;
* ``key>N``, ``key<N``, ``key>=N``, ``key<=N``: numeric comparison (``restarts>0``);
* ``!term`` inverts a term; ``key!=value`` is ``!key=value``.

Keys are record fields (Ray's state-API names such as ``node_ip`` or
``func_or_class_name``) or the aliases the caller passes (raytop's column titles:
``node``, ``function``), in any case (``STATE=`` is ``state=``). ``node`` is a node's
id or its IP wherever records have them (``node=127.0.0.2``, ``node=9f3a``). An
unknown key is a :class:`FilterError` naming the keys there are.
"""
from __future__ import annotations

import difflib
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

#: Keys that name one thing by any of several fields: a node is its id or its IP in every
#: view (the nodes view shows the id under NODE, the others the IP, and people type
#: either), so ``node=`` reads both wherever the records have them.
_EITHER: Mapping[str, Tuple[str, ...]] = {"node": ("node_id", "node_ip")}


@dataclass(frozen=True)
class _Term:
    keys: Tuple[str, ...]  # () = any field; several = any of them
    op: str                # "re", "=", "==", ">", "<", ">=", "<="
    value: str
    negate: bool
    pattern: Optional["re.Pattern[str]"] = None
    number: float = 0.0
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The (first) field the term reads; "" for free text."""
        return self.keys[0] if self.keys else ""

    def matches_fields(self, rec: Record) -> bool:
        memo = self.memo
        for key in self.keys:
            actual = rec.get(key)
            try:
                hit = memo.get(actual)
            except TypeError:  # a dict or a list: not remembered
                hit = self._test(actual)
            else:
                if hit is None:
                    hit = self._test(actual)
                    if len(memo) < _MEMO_SIZE:
                        memo[actual] = hit
            if hit:
                return not self.negate
        return self.negate

    def matches_any(self, values: Iterable[Any]) -> bool:
        """Free text: the pattern found in any one field. Fields are searched one by
        one, never joined, so ``^`` and ``$`` are a field's start and end and no match
        spans two fields; remembered by text, as most fields repeat across records."""
        memo = self.memo
        search = self.pattern.search  # type: ignore[union-attr]
        for v in values:
            if v.__class__ is str:
                text = v
            elif isinstance(v, (dict, list)):
                continue
            else:
                text = _text(v)
            hit = memo.get(text)
            if hit is None:
                hit = search(text) is not None
                if len(memo) < _MEMO_SIZE:
                    memo[text] = hit
            if hit:
                return not self.negate
        return self.negate

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
        self.keys = frozenset(k for t in terms for k in t.keys)
        # Field terms first: one memoised lookup each, and they reject most records
        # before free text searches every field.
        self._fields = tuple(t for t in self.terms if t.keys)
        self._free = tuple(t for t in self.terms if not t.keys)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def matches(self, rec: Record) -> bool:
        for t in self._fields:
            if not t.matches_fields(rec):
                return False
        if not self._free:
            return True
        values = rec.values()
        if len(self._free) > 1:  # computed once (the GCS's records compute them lazily)
            values = list(values)
        for t in self._free:
            if not t.matches_any(values):
                return False
        return True


def _resolve(key: str, aliases: Mapping[str, Any], known: Optional[Mapping[str, str]],
             what: str) -> Tuple[str, ...]:
    """The record fields a filter key names, whatever its case: a column title or
    alias, a key of _EITHER, or a field name. known: lower-cased field -> field."""
    low = key.lower()
    targets: List[str] = []
    alias = aliases.get(low)
    if alias is not None:
        targets.extend((alias,) if isinstance(alias, str) else alias)
    targets.extend(_EITHER.get(low, ()))
    if not targets:
        targets.append(known.get(low, key) if known is not None else key)
    if known is not None:
        fields = set(known.values())
        targets = [t for t in targets if t in fields]
    if targets:
        return tuple(dict.fromkeys(targets))
    names = set(aliases) | set(known.values() if known is not None else ())
    names |= {k for k, fs in _EITHER.items() if any(f in names for f in fs)}
    close = difflib.get_close_matches(low, names, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FilterError(f"no field {key!r} in {what}{hint}; filter on one of: "
                      f"{', '.join(sorted(names))}")


def parse(text: str, fields: Optional[Iterable[str]] = None,
          aliases: Optional[Mapping[str, Any]] = None, what: str = "records") -> Filter:
    """Parse filter text. ``fields`` (when given) are the keys records have, so that an
    unknown key fails here with the list of known ones rather than matching nothing.
    ``aliases`` map keys people type (column titles) to a field or a tuple of fields
    (the term then matches if any of them does); keys match without case."""
    text = (text or "").strip()
    aliases = {k.lower(): v for k, v in (aliases or {}).items()}
    known = {f.lower(): f for f in fields} if fields is not None else None
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
            terms.append(_Term((), "re", word, negate, pattern))
            continue
        key, op, value = m.group(1), m.group(2), m.group(3)
        keys = _resolve(key, aliases, known, what)
        if op == "!=":
            op, negate = "=", not negate
        number = 0.0
        if op in (">", "<", ">=", "<="):
            n = _number(value)
            if n is None:
                raise FilterError(f"filter term {word!r}: {value!r} is not a number")
            number = n
        terms.append(_Term(keys, op, value.lower(), negate, None, number))
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

