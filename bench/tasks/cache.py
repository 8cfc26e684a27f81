"""Trained task models cached on disk by a hash of everything that shapes their weights.

Training takes seconds to minutes on 2 cores and every evaluation run needs the same model, so a
model is trained once per settings (architecture, data selection, optimizer, seed, Python minor
version, since the standard library is training data) and later runs load the state dict.
Training runs on one intra-op thread: these models' matmuls are small, the weights then do not
depend on the machine's thread count, and on a shared 2-core machine two threads spin against
other processes (measured under load: 4-10x slower per step than one thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE = Path(__file__).resolve().parent.parent / "cache"
FORMAT = 1  # bump when the training code changes in a way the settings do not show
TRAIN_THREADS = 1


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able settings (plus the cache format and Python minor version)."""
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    full = {**settings, "format": FORMAT, "python": python, "threads": TRAIN_THREADS}
    blob = json.dumps(full, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` intra-op threads, then restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_or_train(
    prefix: str,
    settings: Mapping[str, Any],
    model: nn.Module,
    train: Callable[[nn.Module], dict[str, Any]],
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fills ``model`` with cached weights, or trains it in place and caches them.

    Returns the training record (time, metrics before/after) written beside the weights as
    ``<prefix>-<hash>.json``; the weights go to ``<prefix>-<hash>.pt``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else CACHE
    stem = cache_dir / f"{prefix}-{settings_hash(settings)}"
    weights, record_path = stem.with_suffix(".pt"), stem.with_suffix(".json")
    if weights.is_file() and record_path.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return json.loads(record_path.read_text())
    with threads(TRAIN_THREADS):
        record = {**train(model), "settings": dict(settings)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    # write then rename, so a concurrent run never reads a half-written file
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    tmp = record_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, record_path)
    return record
