"""``geoshare worker`` as one torch.distributed job (gloo on CPU), against a real API server on
loopback: rank 0 claims and hands in, every rank runs the job; a rank that raises fails the job
with its message and the worker serves on; a rank that dies ends the worker on every rank within
the group timeout, the job queued again, nothing left running."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.client import GeoShareClient
from solver import SharingProblem

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15  # GEOSHARE_DIST_TIMEOUT of the ranks


@pytest.fixture
def api(server):
    with GeoShareClient(server.url, timeout=30) as c:
        while (claim := c.claim("janitor")) is not None:  # leave no job of an earlier test queued
            c.fail(claim["id"], claim["lease"], "cleared by the test fixture")
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GEOSHARE_DIST_TIMEOUT": str(TIMEOUT_S),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_torchrun_worker_runs_analysis_and_compress_jobs_as_one_group(server, api, tmp_path):
    """An in-memory analysis (exact, batches split) and a streamed compress with healing, each
    claimed once by rank 0 and run by both ranks; the costs are one process's."""
    from svc_tiny import factory

    from hessian_worker import AnalyzeConfig, analyze
    from hessian_worker.llm.synthetic import (
        SHAPES,
        decoder_config,
        random_tokens,
        write_random_checkpoint,
    )

    data = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    llama = tmp_path / "llama"
    write_random_checkpoint(decoder_config("llama", **SHAPES["tiny"]), llama, dtype=torch.float32, std=0.2)
    torch.save(random_tokens(SHAPES["tiny"]["vocab_size"], 32, 12, seed=1), llama / "calib.pt")
    first = api.submit_analysis({"model": "svc_tiny:factory", "data": str(data), "ratio": 0.75, "samples": 16})
    second = api.submit_analysis({"model": str(llama), "data": str(llama / "calib.pt"), "backend": "layerwise",
                                  "ratio": 0.7, "time_limit_s": 5,
                                  "compress": {"out": str(tmp_path / "out"), "top": 2, "normalized_top": 1,
                                               "per_pattern": 1, "heal_steps": 2}})
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "geoshare", "worker", "--api",
                          server.url, "--max-jobs", "2", "--poll", "0.2", "--device", "cpu"],
                         cwd=ROOT, env=_env(), timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rank 0 of 2: 2 job(s) done" in run.stderr and "rank 1 of 2: 2 job(s) done" in run.stderr
    analysed = api.wait_analysis(first["id"], timeout=30)
    assert analysed["state"] == "succeeded", analysed.get("error")
    got = SharingProblem.model_validate(analysed["problem"])
    assert got.source["world_size"] == 2 and got.source["rank_samples"] == [8, 8]
    want = analyze(factory(), data, AnalyzeConfig(backend="exact", samples=16, max_params_ratio=0.75, device="cpu",
                                                  progress=False))
    a = np.array([[np.nan if v is None else v for v in row] for row in got.costs.matrix])
    b = np.array([[np.nan if v is None else v for v in row] for row in want.costs.matrix])
    assert np.nanmax(b) > 0
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12 * np.nanmax(b))
    compressed = api.wait_analysis(second["id"], timeout=30)
    assert compressed["state"] == "succeeded", compressed.get("error")
    source = compressed["problem"]["source"]
    assert source["world_size"] == 2 and source["heal"]["rank_samples"] == [12, 12]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "report.json").is_file()


def _rank(rank: int, port: int, url: str, failure: str, out: str) -> None:
    """One rank of a worker group whose analysis raises (or the process dies) on rank 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), GEOSHARE_DIST_TIMEOUT=str(TIMEOUT_S))
    from svc_cases import small_problem

    from hessian_worker.distributed import join, step
    from service.group_worker import run_group_worker

    def analyze(spec: Any) -> SharingProblem:
        with step(group, "the injected analysis"):
            if rank == 1 and spec.seed == 1:
                if failure == "exit":
                    os._exit(3)
                raise ValueError("injected failure on rank 1")
        return small_problem((4, 4), seed=spec.seed)

    group = join("cpu")
    try:
        done = run_group_worker(url, group=group, device="cpu", analyze_fn=analyze, poll_s=0.1, lease_s=5,
                                max_jobs=2)
        result = f"done {done}"
    except Exception as exc:  # the test reads it
        result = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.txt").write_text(result, encoding="utf-8")


def _group(url: str, failure: str, tmp_path: Path, limit_s: float = 120) -> list[str]:
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(rank, port, url, failure, str(tmp_path))) for rank in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(start + limit_s - time.monotonic(), 0.1))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"ranks still running after {limit_s} s: the worker hangs"
    return [(tmp_path / f"{r}.txt").read_text(encoding="utf-8") if (tmp_path / f"{r}.txt").exists()
            else f"exit {procs[r].exitcode}" for r in range(2)]


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_and_the_worker_serves_on(server, api, tmp_path):
    good = api.submit_analysis({"model": "m:f", "seed": 0, "ratio": 0.6})
    bad = api.submit_analysis({"model": "m:f", "seed": 1, "ratio": 0.6})
    results = _group(server.url, "raise", tmp_path)
    assert results == ["done 2", "done 2"]
    assert api.wait_analysis(good["id"], timeout=30)["state"] == "succeeded"
    failed = api.get_analysis(bad["id"])
    assert failed["state"] == "failed"
    assert "rank 1 failed during the injected analysis: ValueError: injected failure on rank 1" in \
        failed["error"]["detail"]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_worker_on_every_rank_and_requeues_the_job(server, api, tmp_path):
    first = api.submit_analysis({"model": "m:f", "seed": 0, "ratio": 0.6})
    lost = api.submit_analysis({"model": "m:f", "seed": 1, "ratio": 0.6})
    start = time.monotonic()
    results = _group(server.url, "exit", tmp_path)
    assert time.monotonic() - start < 120
    assert results[1] == "exit 3"
    assert results[0].startswith("GroupLost: rank 0: the other ranks did not answer"), results[0]
    assert api.wait_analysis(first["id"], timeout=30)["state"] == "succeeded"
    again = api.get_analysis(lost["id"])
    assert again["state"] == "queued", again  # a lost rank is no fault of the job: another worker runs it
