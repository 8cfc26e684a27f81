"""Wakes the requests waiting on a job (long polls, SSE) when a thread changes it.

Only a hint: waiters re-read the store, and also look again every few seconds, so a change made
by another replica is still seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextlib import contextmanager


class Notifier:
    """Per-job asyncio events, set from any thread through the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def notify(self, job_id: str) -> None:
        """Thread-safe: wake every waiter of this job."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            self._loop.call_soon_threadsafe(self._set, job_id)

    def _set(self, job_id: str) -> None:
        for ev in self._waiters.get(job_id, ()):
            ev.set()

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set on every change of the job while the block runs (loop thread only)."""
        ev = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(ev)
        try:
            yield ev
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(ev)
                if not waiters:
                    del self._waiters[job_id]
