"""Changes made by other replicas, heard through Postgres LISTEN/NOTIFY.

Replicas share one queue: a job posted to replica A may be solved by replica B, and a long poll or
event stream on A must then wake when B finishes it, not at A's next poll (GEOSHARE_POLL_S later);
an idle runner on B should take a job queued through A now. The store announces every change in
the transaction that makes it (service/db.py: JOB_CHANNEL, QUEUE_CHANNEL); this thread holds one
connection listening on both and hands what it hears to the notifier and the runner. Announcements
are hints, as the notifier's are: waiters re-read the store and still poll, so a listener that is
reconnecting loses nothing but latency.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.db import JOB_CHANNEL, QUEUE_CHANNEL, Store
from service.states import SOLVE_KINDS

log = logging.getLogger("geoshare.api")


class StoreListener:
    """A daemon thread delivering other replicas' announcements; ``stop`` ends it within a second."""

    def __init__(self, store: Store, notify: Callable[..., None], wake: Callable[[], None],
                 retry_s: float = 1.0) -> None:
        self.store, self.notify, self.wake, self.retry_s = store, notify, wake, retry_s
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="geoshare-listen", daemon=True)

    def start(self, wait_s: float = 5.0) -> bool:
        """Starts listening; returns once the first LISTEN holds (so a replica that says it is ready
        hears the others from then on), or after ``wait_s`` if the database is slow to answer."""
        self._thread.start()
        return self._listening.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def deliver(self, channel: str, payload: str) -> None:
        """Act on one announcement (skipping this store's own: it woke its waiters itself)."""
        origin, _, rest = payload.partition(" ")
        if origin == self.store.origin:
            return
        if channel == JOB_CHANNEL:
            job_id, _, settled = rest.partition(" ")
            self.notify(job_id, settled=settled != "0")
        elif channel == QUEUE_CHANNEL and (not rest or rest in SOLVE_KINDS):
            self.wake()

    def _run(self) -> None:
        import psycopg

        conninfo = self.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {JOB_CHANNEL}")
                    conn.execute(f"LISTEN {QUEUE_CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.deliver(note.channel, note.payload)
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("listening for other replicas' changes failed; retrying in %.0f s", self.retry_s)
                self._stop.wait(self.retry_s)
