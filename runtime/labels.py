"""Node labels and label selectors, with Ray's syntax and rules.

A node's labels are string pairs: Ray's defaults (``ray.io/node-id`` on every node,
``ray.io/accelerator-type`` on a node whose GPU model is known) and the ones given to
``init(labels=...)`` or ``NodeConfig.labels``. A task's or actor's ``label_selector``
maps a label key to one of:

* ``"value"``: the node's label equals it;
* ``"!value"``: the node has no such label, or another value;
* ``"in(a, b)"``: the node's label is one of them;
* ``"!in(a, b)"``: the node has no such label, or a value outside them.

Every entry must match. Keys and values follow Kubernetes' label syntax, as in Ray
(python/ray/_private/label_utils.py). Everything here is pure, so the raylet's scheduler,
the GCS and the option checks share one reading of a selector.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["NODE_ID", "ACCELERATOR_TYPE", "ACCELERATOR_RESOURCE_PREFIX", "RESERVED_PREFIX", "Selector", "check_node_labels",
           "check_selector", "compile_selector", "node_labels", "matches"]

RESERVED_PREFIX = "ray.io/"
#: A node whose GPUs are of type T has 1 of resource "accelerator_type:T" (Ray's
#: RESOURCE_CONSTRAINT_PREFIX); a task or actor with accelerator_type=T asks for 0.001.
ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
NODE_ID = "ray.io/node-id"
ACCELERATOR_TYPE = "ray.io/accelerator-type"

_NAME = r"([a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?)"
_NAME_RE = re.compile(_NAME)
_PREFIX_RE = re.compile(rf"^({_NAME}?(\.{_NAME}?)*)$")
_SELECTOR_RE = re.compile(rf"^!?(?:in)?\({_NAME}(?:, ?{_NAME})*\)$|^!?{_NAME}$")
_SYNTAX = ("63 characters at most, beginning and ending with a letter or digit, with "
           "letters, digits, '-', '_' and '.' between")


def _key_problem(key: Any) -> Optional[str]:
    if not isinstance(key, str):
        return f"label key {key!r} is not a string"
    name = key
    if "/" in key:
        prefix, name = key.rsplit("/", 1)
        if len(prefix) > 253 or not _PREFIX_RE.fullmatch(prefix):
            return (f"label key prefix {prefix!r} (of {key!r}) is not a series of DNS labels "
                    f"separated by dots, 253 characters at most")
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        return f"label key name {name!r} (of {key!r}) is not valid: {_SYNTAX}"
    return None


def check_node_labels(labels: Any, where: str = "labels") -> Dict[str, str]:
    """A copy of a node's custom labels, or ValueError/TypeError naming what is wrong.
    Keys under ``ray.io/`` are Ray's own and refused, as Ray refuses them."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"{where} must be a dict of label key to value (strings), got "
                        f"{type(labels).__name__}")
    out: Dict[str, str] = {}
    for key, value in labels.items():
        problem = _key_problem(key)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"{where}: custom label key {key!r} cannot start with "
                             f"{RESERVED_PREFIX!r}, which is reserved for Ray's default labels")
        if not isinstance(value, str):
            raise TypeError(f"{where}: the value of label {key!r} must be a string, got "
                            f"{type(value).__name__}")
        if value and (len(value) > 63 or not _NAME_RE.fullmatch(value)):
            raise ValueError(f"{where}: value {value!r} of label {key!r} is not valid: {_SYNTAX}")
        out[key] = value
    return out


def node_labels(node_id_hex: str, custom: Optional[Mapping[str, str]] = None,
                resources: Optional[Mapping[str, float]] = None) -> Dict[str, str]:
    """The labels a node advertises: its custom ones and Ray's defaults, ``ray.io/node-id``
    (it follows the node id: a restarted raylet is a new node) and, for a node with an
    ``accelerator_type:<type>`` resource (detected GPUs, or given by hand), its
    ``ray.io/accelerator-type``."""
    out = dict(custom or {})
    types = sorted(k.split(":", 1)[1] for k in (resources or {})
                   if k.startswith(ACCELERATOR_RESOURCE_PREFIX))
    if types:
        out[ACCELERATOR_TYPE] = types[0].replace(" ", "-")  # a label value has no spaces
    out[NODE_ID] = node_id_hex
    return out


def check_selector(selector: Any, where: str = "label_selector") -> Dict[str, str]:
    """A copy of a label selector, or ValueError/TypeError naming the bad entry."""
    if selector is None:
        return {}
    if not isinstance(selector, Mapping):
        raise TypeError(f"{where} must be a dict of label key to a value expression, got "
                        f"{type(selector).__name__}")
    out: Dict[str, str] = {}
    for key, value in selector.items():
        problem = _key_problem(key)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if not isinstance(value, str):
            raise TypeError(f"{where}: the expression for {key!r} must be a string, got "
                            f"{type(value).__name__}")
        if value and not _SELECTOR_RE.fullmatch(value):
            raise ValueError(
                f"{where}: {value!r} (for {key!r}) is not a label selector expression: use "
                f"'value', '!value', 'in(a, b)' or '!in(a, b)', each value {_SYNTAX}")
        out[key] = value
    return out


class Selector:
    """A compiled selector: (key, negated, values) terms; matching a node is a few dict
    lookups, so the scheduler can test one per pending request at every pass."""

    __slots__ = ("terms", "text")

    def __init__(self, terms: Tuple[Tuple[str, bool, frozenset], ...], text: str) -> None:
        self.terms = terms
        self.text = text

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, negated, values in self.terms:
            value = labels.get(key)
            if negated:
                if value is not None and value in values:
                    return False
            elif value is None or value not in values:
                return False
        return True

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and other.terms == self.terms

    def __hash__(self) -> int:
        return hash(self.terms)


def _term(key: str, expr: str) -> Tuple[str, bool, frozenset]:
    negated = expr.startswith("!")
    body = expr[1:] if negated else expr
    if body.startswith("in(") and body.endswith(")"):
        values = frozenset(v.strip() for v in body[3:-1].split(","))
    else:
        values = frozenset([body])
    return key, negated, values


@functools.lru_cache(maxsize=1024)
def _compile(items: Tuple[Tuple[str, str], ...]) -> Optional[Selector]:
    if not items:
        return None
    text = "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    return Selector(tuple(_term(k, v) for k, v in items), text)


def compile_selector(selector: Optional[Mapping[str, str]]) -> Optional[Selector]:
    """The Selector of a checked selector (None when it is empty: anything matches). The
    same selector compiles once, however many lease requests carry it."""
    if not selector:
        return None
    return _compile(tuple(sorted(selector.items())))


def matches(selector: Optional[Mapping[str, str]], labels: Mapping[str, str]) -> bool:
    """Whether a node with `labels` satisfies `selector` (a dict, as in NodeInfo and the
    lease request); for the GCS placing actors."""
    compiled = compile_selector(selector)
    return compiled is None or compiled.matches(labels)
