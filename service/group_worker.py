"""``geoshare worker`` as one torch.distributed job (started by torchrun, one process per GPU).

Rank 0 is the worker the API sees: it claims jobs under a lease, heartbeats, checks the job's
paths, prepares a compress job's output folder and hands in the results (``analysis_loop``). Each
job it takes is broadcast to the other ranks (``broadcast_object_list`` over the group's gloo side
group), every rank runs it (the analysis and compress split their samples over the group), and
every rank then says how its part ended, so the ranks start the next job together. While idle,
rank 0 tells the others so at every poll, so a follower's wait is bounded by the poll interval
and not by the job length.

Failures: an error on one rank reaches every rank inside the job (``hessian_worker.distributed``:
that rank's message on all of them) and rank 0 reports it as the job's error; the worker serves
on. A rank that died or stopped answering ends the job at the group timeout
(``GEOSHARE_DIST_TIMEOUT``) with ``GroupLost`` on every rank still alive: rank 0 reports the job
failed (with retry, another worker can run it) and every rank exits with the error, since the
group cannot run another collective. No rank waits longer than that timeout for another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from service.analysis_loop import (
    AnalyzeFn,
    CompressFn,
    default_analyze,
    default_compress,
    run_worker,
)
from service.models import AnalysisSpec
from service.outdir import prepare_out

log = logging.getLogger("geoshare.worker")
STOP = "stop"  # rank 0 is done: the other ranks return


def rank_device(device: str) -> str:
    """This rank's device: ``auto`` or ``cuda`` is the GPU torchrun gave it (LOCAL_RANK) when CUDA
    is there, so N processes on N GPUs never share one; anything else as given."""
    import os

    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def run_group_worker(api: str, *, group: Any, device: str = "auto", analyze_fn: AnalyzeFn | None = None,
                     compress_fn: CompressFn | None = None, stop: threading.Event | None = None,
                     **worker: Any) -> int:
    """Serves jobs as one rank of ``group`` (a ``hessian_worker.distributed.Group``); the number
    of jobs run. ``worker``: ``run_worker``'s other settings (rank 0 claims with them).

    Raises:
        GroupLost: a rank died or stopped answering (every rank still alive raises it).
    """
    analyze_fn = analyze_fn or partial(default_analyze, device=device)
    compress_fn = compress_fn or partial(default_compress, device=device)
    if group.rank == 0:
        return _lead(api, group, analyze_fn, compress_fn, stop or threading.Event(), device=device, **worker)
    return _follow(group, analyze_fn, compress_fn)


def _lead(api: str, group: Any, analyze_fn: AnalyzeFn, compress_fn: CompressFn, stop: threading.Event,
          **worker: Any) -> int:
    """Rank 0: the worker loop, each job announced to the others before it runs here."""
    from hessian_worker.distributed import GroupLost, broadcast

    lost: list[GroupLost] = []

    def shared(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(spec: AnalysisSpec, *args: Any) -> Any:
            if kind == "compress" and spec.compress is not None:  # refused here, before any rank starts
                prepare_out(spec.compress.out, overwrite=spec.compress.overwrite, job_id=args[0])
            broadcast(group, {"kind": kind, "spec": spec.model_dump(mode="json"), "args": list(args)})
            try:
                return _together(group, lambda: fn(spec, *args))
            except GroupLost as exc:
                lost.append(exc)
                stop.set()  # the job is reported failed (retry), then the loop ends
                raise

        return run

    try:
        taken = run_worker(api, analyze_fn=shared("analyze", analyze_fn), compress_fn=shared("compress", compress_fn),
                           stop=stop, on_idle=lambda: broadcast(group, None), **worker)
    finally:
        if not lost:
            broadcast(group, STOP)
    if lost:
        raise lost[0]
    return taken


def _follow(group: Any, analyze_fn: AnalyzeFn, compress_fn: CompressFn) -> int:
    """Another rank: run every job rank 0 announces, until it stops."""
    from hessian_worker.distributed import GroupLost, broadcast

    done = 0
    while True:
        message = broadcast(group, None)
        if message == STOP:
            return done
        if message is None:  # rank 0 is idle
            continue
        spec = AnalysisSpec.model_validate(message["spec"])
        args = message["args"]
        fn = partial(analyze_fn, spec) if message["kind"] == "analyze" else partial(compress_fn, spec, *args)
        done += 1
        try:
            _together(group, fn)
        except GroupLost:
            raise
        except Exception as exc:  # rank 0 reports the job's failure; this rank serves on
            log.warning("rank %d: the job failed here (%s: %s); rank 0 reports it", group.rank,
                        type(exc).__name__, exc)


def _together(group: Any, job: Callable[[], Any]) -> Any:
    """Runs this rank's part of a job, then every rank says how it ended, so all start the next
    announcement together; the job's own error is raised after that (a lost group at once)."""
    from hessian_worker.distributed import GroupLost, gather

    try:
        result = job()
    except GroupLost:
        raise
    except Exception as exc:
        gather(group, f"{type(exc).__name__}: {exc}", "the end of the job")
        raise
    gather(group, None, "the end of the job")
    return result
