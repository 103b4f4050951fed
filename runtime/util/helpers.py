"""as_completed and map_unordered: results as they finish, as Ray 2.60's ray.util has them.

Both are thin loops over wait(): they exist so scripts stop calling get() inside a
for loop (which waits for each ref in turn, however the others are doing).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

__all__ = ["as_completed", "map_unordered"]

DEFAULT_CHUNK_SIZE = 10
DEFAULT_BACKPRESSURE_SIZE = 100


def _check_chunk_size(chunk_size: Any) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")


def _next_batch(refs: List[Any], chunk_size: int, yield_obj_refs: bool,
                wait_kwargs: dict) -> Tuple[List[Any], List[Any]]:
    """(results or refs of up to chunk_size ready refs, the refs still pending)."""
    from runtime.api import get, wait

    ready, rest = wait(refs, num_returns=min(chunk_size, len(refs)), **wait_kwargs)
    if yield_obj_refs:
        return ready, rest
    return (get(ready) if ready else []), rest


def as_completed(refs: Sequence[Any], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 yield_obj_refs: bool = False, **kwargs: Any) -> Iterator[Any]:
    """Yield the values of ``refs`` (or the refs, with ``yield_obj_refs``) as batches of
    ``chunk_size`` of them become ready. ``kwargs`` go to wait() (``timeout``,
    ``fetch_local``); with a timeout an empty batch ends nothing: the loop waits again."""
    _check_chunk_size(chunk_size)
    if "num_returns" in kwargs:
        raise ValueError("Use the `chunk_size` argument instead of `num_returns`.")
    pending = list(refs)
    while pending:
        results, pending = _next_batch(pending, chunk_size, yield_obj_refs, kwargs)
        yield from results


def map_unordered(fn: Any, items: Iterable[Any], *,
                  backpressure_size: Optional[int] = DEFAULT_BACKPRESSURE_SIZE,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, yield_obj_refs: bool = False,
                  **kwargs: Any) -> Iterator[Any]:
    """``fn.remote(item)`` for each item, yielding results as they finish, with at most
    ``backpressure_size`` tasks in flight (None: no limit) so a long input does not
    flood the cluster. ``kwargs`` go to wait()."""
    if backpressure_size is None:
        limit = float("inf")
    elif not isinstance(backpressure_size, int) or backpressure_size <= 0:
        raise ValueError("backpressure_size must be positive.")
    else:
        limit = backpressure_size
    _check_chunk_size(chunk_size)
    if "num_returns" in kwargs:
        raise ValueError("Use the `chunk_size` argument instead of `num_returns`.")
    pending: List[Any] = []
    for item in items:
        pending.append(fn.remote(item))
        if len(pending) >= limit:
            results, pending = _next_batch(pending, chunk_size, yield_obj_refs, kwargs)
            yield from results
    yield from as_completed(pending, chunk_size=chunk_size, yield_obj_refs=yield_obj_refs,
                            **kwargs)
