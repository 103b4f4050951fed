"""Long-poll support for GCS records: wait until a record changes."""
from __future__ import annotations

import asyncio


class ChangeSignal:
    """A version number and an event that fires (once) each time it is bumped.

    A client that has seen version v asks for "anything newer than v" and the
    server waits on the current event; every change replaces the event, so each
    waiter wakes exactly once per change it has not seen.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def bump(self, record) -> None:
        record.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_newer(self, record, newer_than: int, timeout_s: float) -> None:
        if newer_than and record.version <= newer_than and timeout_s > 0:
            try:
                await asyncio.wait_for(self._event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
