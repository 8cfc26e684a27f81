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
    """Per-job asyncio events, set from any thread through the event loop.

    Every waiter subscribes before it reads the store, and every writer writes before it
    notifies, so a notification for a job nobody waits on can be dropped without crossing into
    the event loop at all (the usual case: most jobs finish with no one listening).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[str, set[asyncio.Event]] = {}  # every subscriber
        self._followers: dict[str, set[asyncio.Event]] = {}  # those that want every change (SSE)

    def notify(self, job_id: str, *, settled: bool = True) -> None:
        """Thread-safe: wake the waiters of this job.

        ``settled=False`` marks a change that does not finish the job (it started running, or a
        running solve improved): only subscribers following every change wake for it; long
        polls, which wait for the outcome, sleep on instead of re-reading the store.
        """
        if job_id not in (self._waiters if settled else self._followers):  # one atomic dict lookup
            return
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            self._loop.call_soon_threadsafe(self._set, job_id, settled)

    def _set(self, job_id: str, settled: bool) -> None:
        for ev in (self._waiters if settled else self._followers).get(job_id, ()):
            ev.set()

    @contextmanager
    def subscribe(self, job_id: str, *, every_change: bool = True) -> Iterator[asyncio.Event]:
        """An event set on every change of the job while the block runs (loop thread only).

        With ``every_change=False`` only changes that may settle the job set it (see ``notify``).
        """
        ev = asyncio.Event()
        groups = (self._waiters, self._followers) if every_change else (self._waiters,)
        for group in groups:
            group.setdefault(job_id, set()).add(ev)
        try:
            yield ev
        finally:
            for group in groups:
                waiters = group.get(job_id)
                if waiters is not None:
                    waiters.discard(ev)
                    if not waiters:
                        del group[job_id]
