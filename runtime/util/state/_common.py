"""What every part of the state API shares: defaults, records, filters, the connection."""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterable, List, Optional, \
    Sequence, Tuple



log = logging.getLogger("runtime.util.state")

DEFAULT_LIMIT = 100
#: Seconds each call to the GCS, a raylet or a worker may take (Ray's default).
DEFAULT_RPC_TIMEOUT = 30
DEFAULT_LOG_LIMIT = 1000
Filter = Tuple[str, str, Any]
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class StateRecord(dict):
    """A dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _gcs_call(method: str, request: Any, doing: str, timeout: float) -> Any:
    """One GCS call; a failure raises an error naming the GCS and its address."""
    from runtime.api import _gcs_call

    return _gcs_call(method, request, doing, timeout=timeout)


def _token() -> str:
    from runtime.api import _ensure_initialized

    return _ensure_initialized().token


def _connect(address: Optional[str]) -> None:
    """Ray's ``address`` argument. None or "auto": this process's cluster (connecting
    first, as Ray's API does). Another address: connect there when nothing is connected
    yet; a process already connected elsewhere cannot query a second cluster."""
    from runtime.api import _ensure_initialized, init, is_initialized

    if address in (None, "", "auto"):
        return
    if not is_initialized():
        init(address=address)
        return
    here = _ensure_initialized().gcs_address

    def norm(a: str) -> str:
        return a.replace("localhost:", "127.0.0.1:").rstrip("/")

    if norm(address) != norm(here):
        raise ValueError(f"this process is connected to the cluster whose GCS is at {here}, "
                         f"so the state API cannot query {address!r} from it: pass "
                         f"address=None, or call shutdown() first")


def _apply(records: Iterable[dict], filters: Optional[Sequence[Filter]], limit: Optional[int]
           ) -> List[StateRecord]:
    out: List[StateRecord] = []
    preds = []
    for f in filters or ():
        if len(f) != 3:
            raise ValueError(f"a filter is (key, predicate, value), got {f!r}")
        key, op, value = f
        if op not in ("=", "!="):
            raise ValueError(f"unsupported filter predicate {op!r}: use '=' or '!='")
        preds.append((key, op, str(value).lower() if value is not None else "none"))
    for r in records:
        ok = True
        for key, op, value in preds:
            if key not in r:
                raise ValueError(f"cannot filter on {key!r}: records have {sorted(r)}")
            actual = str(r[key]).lower()
            if (actual == value) != (op == "="):
                ok = False
                break
        if ok:
            out.append(StateRecord(r))
            if limit and len(out) >= limit:
                break
    return out


def _with_defaults(rec: dict, defaults: Dict[str, Any]) -> dict:
    """rec with Ray's fields it lacks (a fresh dict: raytop's records stay as they are)."""
    out = dict(defaults)
    out.update(rec)
    return out


def _check_id(kind: str, id: str) -> str:
    if not isinstance(id, str) or not _HEX.match(id):
        raise ValueError(f"{kind} id must be a hex string (as list_{kind}s() shows it), "
                         f"got {id!r}")
    return id.lower()
