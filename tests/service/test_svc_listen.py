"""StoreListener.deliver: other replicas' announcements wake waiters and runners; its own do not."""

from __future__ import annotations

from typing import Any

from service.db import JOB_CHANNEL, QUEUE_CHANNEL, Store
from service.listen import StoreListener


def test_announcements_reach_waiters_and_runners(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    notified: list[tuple[str, bool]] = []
    woken: list[Any] = []
    listener = StoreListener(store, lambda job_id, settled: notified.append((job_id, settled)),
                             lambda: woken.append(1))
    listener.deliver(JOB_CHANNEL, "other abc 1")
    listener.deliver(JOB_CHANNEL, "other def 0")
    listener.deliver(JOB_CHANNEL, f"{store.origin} mine 1")  # this store's own: its waiters woke already
    assert notified == [("abc", True), ("def", False)]
    listener.deliver(QUEUE_CHANNEL, "other plan")
    listener.deliver(QUEUE_CHANNEL, "other frontier")
    listener.deliver(QUEUE_CHANNEL, "other ")  # re-queued, kind unknown: look anyway
    listener.deliver(QUEUE_CHANNEL, "other analysis")  # GPU workers take these, not the runner
    listener.deliver(QUEUE_CHANNEL, f"{store.origin} plan")
    assert len(woken) == 3
    assert not store.shared  # a SQLite file announces nothing: one server owns it
    store.dispose()
