"""The GPU worker loop: claim an analysis, heartbeat while it runs, hand in the costs.

A compress job (a spec with ``compress``) runs the whole chain instead and hands in the costs
with its report. Before anything runs, the job's model, data and output folder are checked against
this worker's own access settings (service/access.py), on its own file system: the API checked
them at submission, but it may be another machine with other mounts, and a symlink may have
appeared since; the job then runs on the resolved paths that were checked. Both functions are injected (tests use tiny ones); the defaults run
``hessian_worker.analyze`` and ``hessian_worker.compress`` (for a decoder checkpoint with backend
kfac or layerwise, the streamed ``analyze_checkpoint`` and ``compress_checkpoint``, as the CLI
does), imported only when the first job arrives, so the loop needs no torch. Under torchrun the
loop runs on rank 0 of a group (service/group_worker.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from service.access import AccessDenied, AccessRules
from service.client import ApiError, GeoShareClient
from service.compress import compress_config
from service.models import AnalysisSpec
from service.outdir import prepare_out
from solver import SharingProblem

log = logging.getLogger("geoshare.worker")


@dataclass(frozen=True)
class Compressed:
    """What a compress job hands in: the costs it measured and its report (CompressReport JSON)."""

    problem: SharingProblem
    report: dict[str, Any]


AnalyzeFn = Callable[[AnalysisSpec], SharingProblem]
CompressFn = Callable[[AnalysisSpec, str], Compressed]  # (spec, job id): the id marks compress.out


def default_analyze(spec: AnalysisSpec, device: str = "auto") -> SharingProblem:
    """Runs the analysis on this machine with hessian_worker (torch is imported here)."""
    from hessian_worker import AnalyzeConfig, analyze
    from hessian_worker.data import DEFAULT_SENTENCES

    config = AnalyzeConfig(backend=spec.backend.value, kind=spec.kind, samples=spec.samples, seed=spec.seed,
                           max_params_ratio=spec.ratio, device=device, progress=False)
    if _streamed(spec):  # a decoder checkpoint, block by block (as `geoshare analyze`)
        from hessian_worker.llm import analyze_checkpoint

        return analyze_checkpoint(spec.model, spec.data, config)
    data: Any = spec.data if spec.data is not None else DEFAULT_SENTENCES
    return analyze(spec.model, data, config)


def default_compress(spec: AnalysisSpec, job_id: str, device: str = "auto") -> Compressed:
    """Compresses the model on this machine and saves it to ``compress.out`` (torch imported here).

    ``out`` is checked first, so a refused directory costs no GPU time and keeps its files.

    Raises:
        OutDirError: ``out`` is taken by other files (and ``overwrite`` is false) or not writable.
        GeoShareError, ValueError: from loading the model or data, or from ``compress`` itself.
    """
    if spec.compress is None:
        raise ValueError("default_compress needs a spec with `compress`; costs-only specs go to analyze")
    from hessian_worker.distributed import is_writer, refuse_in_job

    # in a torch.distributed worker rank 0 prepared ``out`` before the job reached the other ranks
    out = (prepare_out(spec.compress.out, overwrite=spec.compress.overwrite, job_id=job_id) if is_writer()
           else Path(spec.compress.out).expanduser())
    from hessian_worker import CompressConfig, compress, load_model
    from hessian_worker.compress_run import save_compressed_run
    from hessian_worker.data import DEFAULT_SENTENCES
    from hessian_worker.llm import compress_checkpoint

    config = CompressConfig.model_validate(compress_config(spec) | {"device": device, "progress": False})
    if _streamed(spec, config.scheme.value):  # a decoder checkpoint, block by block (as `geoshare compress`)
        report = compress_checkpoint(spec.model, spec.data, config, out)
        return _handed_in(report, out)
    refuse_in_job(f"an in-memory compress job of {spec.model}")
    loaded = load_model(spec.model)
    if spec.data is None and loaded.tokenizer is None:
        raise ValueError(f"model {spec.model!r} has no tokenizer, so the built-in sentences cannot feed it; "
                         "set data to a torch.save'd tensor file on the worker")
    data: Any = spec.data if spec.data is not None else DEFAULT_SENTENCES
    report = compress(loaded.model, data, config, tokenizer=loaded.tokenizer)
    # the model and report.json, written as `geoshare compress` writes them; a job keeps neither the
    # costs (problem.json) nor figures on the card (docs/contract.md)
    save_compressed_run(out, report, model=loaded.model, source=spec.model, costs=False, card=False)
    return _handed_in(report, out, saved=True)


def _streamed(spec: AnalysisSpec, scheme: str = "tie") -> bool:
    """A job whose model is a decoder checkpoint the streamed path takes (backend kfac or layerwise,
    scheme tie): the rule of ``geoshare analyze`` and ``geoshare compress``."""
    from hessian_worker.llm import is_streamable

    return scheme == "tie" and spec.backend.value in ("kfac", "layerwise") and is_streamable(spec.model)


def _handed_in(report: Any, out: Path, *, saved: bool = False) -> Compressed:
    """What a compress job hands in; the streamed path wrote the model itself, rank 0 writes
    report.json beside it (``saved``: the in-memory path wrote it already)."""
    from hessian_worker.compress_run import save_compressed_run
    from hessian_worker.distributed import is_writer

    if not saved and is_writer():
        save_compressed_run(out, report, costs=False, card=False)
    doc = report.model_dump(mode="json", exclude={"problem"})
    doc["out"] = str(out.resolve())
    return Compressed(problem=report.problem, report=doc)


def worker_rules() -> AccessRules:
    """This worker's access rules, from its settings (GEOSHARE_READ_ROOTS, _OUT_ROOT, _MODEL_MODULES)."""
    from service.settings import WorkerSettings

    return AccessRules.of(WorkerSettings(), side="this worker")


def process(client: GeoShareClient, claim: dict[str, Any], analyze_fn: AnalyzeFn, lease_s: float,
            compress_fn: CompressFn | None = None, access: AccessRules | None = None) -> bool:
    """Run one claimed job to the end; True when its costs (and report) were accepted.

    A job ``access`` (default: this worker's settings) refuses fails at once, with nothing loaded,
    read or written."""
    job_id, lease = claim["id"], claim["lease"]
    lease_s = float(claim.get("lease_s") or lease_s)
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not client.heartbeat(job_id, lease, lease_s):
                    log.warning("lease of %s lost (cancelled or expired)", job_id)
                    lost.set()
                    return
            except (httpx.HTTPError, ApiError):
                log.exception("heartbeat of %s failed; trying again", job_id)

    beater = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
    beater.start()
    report: dict[str, Any] | None = None
    try:
        spec = AnalysisSpec.model_validate(claim["spec"])
        spec = (access or worker_rules()).check(spec, on_worker=True)
        if spec.compress is None:
            problem = analyze_fn(spec)
        else:
            done = (compress_fn or default_compress)(spec, job_id)
            problem, report = done.problem, done.report
    except AccessDenied as exc:  # the job asks for what this worker does not allow: no retry
        log.warning("analysis %s refused: %s", job_id, exc)
        if not lost.is_set():
            _report_failure(client, job_id, lease, exc)
        return False
    except Exception as exc:  # report every failure to the API; the worker keeps serving
        log.exception("analysis %s failed", job_id)
        if not lost.is_set():
            _report_failure(client, job_id, lease, exc)
        return False
    finally:
        stop.set()
        beater.join()
    if lost.is_set():
        return False
    try:
        client.complete(job_id, lease, problem, report=report)
    except ApiError as exc:
        log.error("the API refused the costs of %s: %s", job_id, exc)
        if exc.status != 409:
            _report_failure(client, job_id, lease, exc)
        return False
    return True


def _report_failure(client: GeoShareClient, job_id: str, lease: str, exc: BaseException) -> None:
    # a rank of a torch.distributed worker that stopped answering (GroupLost) is no fault of the job
    retry = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or getattr(exc, "retry", False) is True
    try:
        client.fail(job_id, lease, f"{type(exc).__name__}: {exc}", retry=retry)
    except (httpx.HTTPError, ApiError):
        log.exception("could not report the failure of %s", job_id)


def run_worker(api: str, *, api_key: str | None = None, worker_id: str | None = None, poll_s: float = 2.0,
               lease_s: float = 120.0, max_jobs: int | None = None, device: str = "auto",
               analyze_fn: AnalyzeFn | None = None, compress_fn: CompressFn | None = None,
               stop: threading.Event | None = None, client: GeoShareClient | None = None,
               access: AccessRules | None = None, on_idle: Callable[[], None] | None = None) -> int:
    """Serve analysis jobs until ``stop`` is set or ``max_jobs`` were taken; the number taken.

    ``access`` is what jobs may load, read and write here (default: this worker's settings).
    ``on_idle`` runs at every poll without a job (rank 0 of a torch.distributed worker tells the
    other ranks it is still there: service/group_worker.py)."""
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    access = access or worker_rules()
    analyze_fn = analyze_fn or partial(default_analyze, device=device)
    compress_fn = compress_fn or partial(default_compress, device=device)
    stop = stop or threading.Event()
    own = client is None
    client = client or GeoShareClient(api, api_key=api_key)
    taken = 0
    try:
        while not stop.is_set() and (max_jobs is None or taken < max_jobs):
            try:
                claim = client.claim(worker_id, lease_s)
            except (httpx.HTTPError, ApiError) as exc:
                log.warning("claim failed (%s); retrying in %.1f s", exc, poll_s)
                claim = None
            if claim is None:
                if on_idle is not None:
                    on_idle()
                stop.wait(poll_s)
                continue
            taken += 1
            log.info("claimed analysis %s (%s)", claim["id"], claim["spec"].get("model"))
            ok = process(client, claim, analyze_fn, lease_s, compress_fn, access)
            log.info("analysis %s %s", claim["id"], "handed in" if ok else "not completed")
    finally:
        if own:
            client.close()
    return taken
