"""One analysis over several processes (torch.distributed, gloo on CPU): real processes on
127.0.0.1 give the costs and plan of one process, rank 0's problem on every rank with the shares
recorded, the statistics cache of one process; a rank that raises or dies ends the job on every
rank with an error, within the timeout."""

from __future__ import annotations

import json
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
import torch
from safetensors.torch import load_file

from hessian_worker import AnalyzeConfig
from hessian_worker.distributed import DistributedError, GroupLost, shard
from hessian_worker.llm import analyze_checkpoint
from hessian_worker.llm.synthetic import (
    SHAPES,
    decoder_config,
    random_tokens,
    write_random_checkpoint,
)
from solver import SolveConfig, solve
from solver.schema import SharingProblem

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 20  # GEOSHARE_DIST_TIMEOUT in the children: a lost rank is noticed within this
BASE = {"backend": "kfac", "dtype": "float64", "batch_size": 4, "progress": False, "device": "cpu",
        "kfac": {"rank": None, "gradient_samples": 6}}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny LLaMA and 10 padded samples: batches of 4, 4, 2, so rank 0 runs batches 0 and 2 and
    rank 1 batch 1, and 6 gradient samples span a whole batch and part of the next."""
    folder = tmp_path_factory.mktemp("llama")
    write_random_checkpoint(decoder_config("llama", **SHAPES["tiny"]), folder, dtype=torch.float32, std=0.2)
    ids = random_tokens(SHAPES["tiny"]["vocab_size"], 10, 12, seed=1)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 7, 12, 9, 5, 12, 12, 8, 12, 10]):
        mask[row, length:] = 0
    torch.save({"input_ids": ids, "attention_mask": mask}, folder / "calib.pt")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, job: dict[str, Any], out: str) -> None:
    """One rank: join the group (torchrun's variables, or initialized here as a caller would),
    run the analysis, write what it returned or raised to ``out/<rank>.json``."""
    torch.set_num_threads(1)
    os.environ["GEOSHARE_DIST_TIMEOUT"] = str(job.get("timeout", TIMEOUT_S))
    import torch.distributed as dist

    from hessian_worker.llm import analyze as llm_analyze

    if job.get("init") == "caller":
        from datetime import timedelta

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=job.get("timeout", TIMEOUT_S)))
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    failure = job.get("fail", {}).get(str(rank))
    if failure:  # this rank's statistics pass raises, or the process dies there

        def broken(*args: Any, **kwargs: Any) -> Any:
            if failure == "exit":
                os._exit(3)
            raise ValueError(f"injected failure on rank {rank}")

        llm_analyze.stream_factors = broken
    try:
        if "in_memory" in job:
            from hessian_worker import analyze

            model, data, kwargs = _in_memory_case(job["in_memory"])
            problem = analyze(model, data, AnalyzeConfig.model_validate(job["config"]), **kwargs)
            result: dict[str, Any] = {"problem": problem.model_dump(mode="json")}
        elif "compress" in job:
            from hessian_worker.llm import compress_checkpoint
            from hessian_worker.pipeline import CompressConfig

            folder = Path(job["model"])
            report = compress_checkpoint(folder, folder / "calib.pt", CompressConfig.model_validate(job["compress"]),
                                         job["out"])
            result = {"report": report.model_dump(mode="json")}
        elif job.get("model") == "minilm":
            config = AnalyzeConfig.model_validate(job["config"])
            from hessian_worker.data import DEFAULT_SENTENCES
            from hessian_worker.llm.blocks import bert_blocks
            from hessian_worker.models import load_model

            loaded = load_model("minilm")
            problem = llm_analyze.analyze_blocks(bert_blocks(loaded.model.double()), DEFAULT_SENTENCES, config,
                                                 tokenizer=loaded.tokenizer)
            result = {"problem": problem.model_dump(mode="json")}
        else:
            config = AnalyzeConfig.model_validate(job["config"])
            folder = Path(job["model"])
            problem = llm_analyze.analyze_checkpoint(folder, folder / "calib.pt", config, cache_dir=job.get("cache"))
            result = {"problem": problem.model_dump(mode="json")}
    except Exception as exc:  # the test reads it
        result = {"error": type(exc).__name__, "message": str(exc)}
    Path(out, f"{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    if dist.is_initialized():
        dist.destroy_process_group()


def _task_loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A task loss with a gradient at the reference (the first-order term is summed over ranks too)."""
    return (output - 0.1).pow(2).mean()


def _in_memory_case(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, data, analyze's keyword arguments) of an in-memory case, built alike in every process."""
    if name == "minilm":
        from hessian_worker.data import DEFAULT_SENTENCES
        from hessian_worker.models import load_model

        loaded = load_model("minilm")
        return loaded.model, DEFAULT_SENTENCES, {"tokenizer": loaded.tokenizer}
    sys.path.insert(0, str(Path(__file__).parent))
    from hw_cases import bert_data, tiny_bert

    torch.set_default_dtype(torch.float64)  # as conftest.py has it in the test process: the same initial weights

    return tiny_bert(), bert_data(), ({"loss_fn": _task_loss} if name == "bert-task" else {})


def _run(job: dict[str, Any], tmp_path: Path, world: int = 2, limit_s: float = 120) -> tuple[list[dict], float]:
    """(each rank's result, seconds until the last exited): real processes, none left running."""
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(rank, world, port, job, str(tmp_path))) for rank in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(start + limit_s - time.monotonic(), 0.1))
    elapsed = time.monotonic() - start
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"ranks still running after {limit_s} s: the job hangs"
    results = []
    for rank in range(world):
        file = tmp_path / f"{rank}.json"
        results.append(json.loads(file.read_text(encoding="utf-8")) if file.exists() else {"exitcode": procs[rank].exitcode})
    return results, elapsed


def _matrix(problem: SharingProblem) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in problem.costs.matrix])


def _same_costs(got: SharingProblem, want: SharingProblem) -> None:
    a, b = _matrix(got), _matrix(want)
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(b) > 0
    finite = ~np.isnan(b)
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-6, atol=1e-12 * np.nanmax(b))


def _same_plan(got: SharingProblem, want: SharingProblem) -> None:
    config = SolveConfig(max_params_ratio=0.75, time_limit_s=10, seed=0)
    assert solve(got, config).coloring == solve(want, config).coloring


def test_two_processes_give_the_costs_and_plan_of_one(llama, tmp_path):
    """torchrun-style launch: sharded statistics all-reduced equal one process's, with the output
    factor's draws (rank 1 skips batch 0's) and padding; rank 0 writes the cache one process reads."""
    config = AnalyzeConfig(**BASE)
    one = analyze_checkpoint(llama, llama / "calib.pt", config)
    assert "world_size" not in one.source  # a lone process is as before
    cache = tmp_path / "cache"
    results, _ = _run({"model": str(llama), "config": config.model_dump(mode="json"), "cache": str(cache)},
                      tmp_path)
    assert all("problem" in r for r in results), results
    two = [SharingProblem.model_validate(r["problem"]) for r in results]
    assert two[0] == two[1]  # rank 0's problem on every rank
    _same_costs(two[0], one)
    _same_plan(two[0], one)
    source = two[0].source
    assert source["world_size"] == 2 and source["rank_samples"] == [6, 4] and source["statistics_cached"] is False
    assert len(list(cache.glob("*/stats.safetensors"))) == 1
    cached = analyze_checkpoint(llama, llama / "calib.pt", config, cache_dir=cache)
    assert cached.source["statistics_cached"] is True
    _same_costs(cached, one)


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_on_every_rank(llama, tmp_path):
    config = AnalyzeConfig(**BASE)
    results, elapsed = _run({"model": str(llama), "config": config.model_dump(mode="json"), "fail": {"1": "raise"}},
                            tmp_path)
    assert results[1] == {"error": "ValueError", "message": "injected failure on rank 1"}
    assert results[0]["error"] == "DistributedError"
    assert "rank 1 failed during the statistics pass: ValueError: injected failure on rank 1" in results[0]["message"]
    assert elapsed < 120


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_within_the_timeout(llama, tmp_path):
    config = AnalyzeConfig(**BASE)
    results, elapsed = _run({"model": str(llama), "config": config.model_dump(mode="json"), "fail": {"0": "exit"},
                             "timeout": 10}, tmp_path, limit_s=90)
    assert results[0] == {"exitcode": 3}
    assert results[1]["error"] == "GroupLost", results[1]  # the DistributedError of a group that cannot go on
    assert "did not answer" in results[1]["message"]
    assert issubclass(GroupLost, DistributedError)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    {"backend": "layerwise"},
    {"kfac": {"rank": 4, "oversample": 4, "gradient_samples": None}},
    {"kind": "assignment", "distill": "mse", "kfac": {"rank": None, "gradient_samples": 10}},
], ids=["layerwise", "sketched-all-gradients", "assignment-mse"])
def test_a_group_the_caller_started_gives_the_costs_of_one_process(llama, tmp_path, fields):
    config = AnalyzeConfig(**{**BASE, **fields})
    one = analyze_checkpoint(llama, llama / "calib.pt", config)
    results, _ = _run({"model": str(llama), "config": config.model_dump(mode="json"), "init": "caller"}, tmp_path)
    assert all("problem" in r for r in results), results
    two = SharingProblem.model_validate(results[0]["problem"])
    _same_costs(two, one)
    _same_plan(two, one)


@pytest.mark.slow
def test_minilm_blocks_in_two_processes_give_the_costs_of_one(tmp_path):
    """The in-memory-blocks path (MiniLM: pooled outputs, K-FAC reduced per sample, mse draws)."""
    from hessian_worker.data import DEFAULT_SENTENCES
    from hessian_worker.llm.analyze import analyze_blocks
    from hessian_worker.llm.blocks import bert_blocks
    from hessian_worker.models import load_model

    config = AnalyzeConfig(**{**BASE, "samples": 12, "kfac": {"rank": None, "gradient_samples": 6}})
    loaded = load_model("minilm")
    one = analyze_blocks(bert_blocks(loaded.model.double()), DEFAULT_SENTENCES, config, tokenizer=loaded.tokenizer)
    results, _ = _run({"model": "minilm", "config": config.model_dump(mode="json"), "init": "caller"}, tmp_path,
                      limit_s=240)
    assert all("problem" in r for r in results), results
    two = SharingProblem.model_validate(results[0]["problem"])
    assert two.source["rank_samples"] == [8, 4]
    _same_costs(two, one)
    _same_plan(two, one)


@pytest.mark.slow
def test_torchrun_runs_the_cli_as_one_job(llama, tmp_path):
    """``torchrun -m geoshare analyze``: the problem file of one process, with world_size 2."""
    flags = ["analyze", "--model", str(llama), "--data", str(llama / "calib.pt"), "--dtype", "float64",
             "--batch-size", "4", "--kfac-rank", "0", "--kfac-gradient-samples", "6", "--no-stats-cache", "--quiet",
             "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GEOSHARE_DIST_TIMEOUT": str(TIMEOUT_S)}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "geoshare", *flags, "-o", str(one)], check=True, cwd=ROOT, env=env,
                   timeout=300, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "geoshare", *flags, "-o", str(two)],
                         cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    want = SharingProblem.model_validate_json(one.read_text(encoding="utf-8"))
    got = SharingProblem.model_validate_json(two.read_text(encoding="utf-8"))
    assert got.source["world_size"] == 2 and "world_size" not in want.source
    _same_costs(got, want)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "fields"), [
    ("minilm", {"backend": "exact", "samples": 8, "batch_size": 2, "targets": [r"re:.*attention\.self\.query\.weight"]}),
    ("bert", {"backend": "layerwise", "batch_size": 3}),
    # the Ledoit-Wolf intensity comes from sums over samples too: shrunk after the ranks' sums
    ("bert", {"backend": "layerwise", "batch_size": 3, "shrinkage": "ledoit-wolf"}),
    ("bert", {"backend": "exact", "batch_size": 3}),
    # assignment: (a, b) and (b, a) take opposite first-order terms, so half the costs stay above 0
    ("bert-task", {"backend": "exact", "curvature": "hessian", "kind": "assignment", "batch_size": 3}),
], ids=["minilm-exact", "bert-layerwise", "bert-layerwise-shrunk", "bert-exact-ggn", "bert-task-hessian"])
def test_in_memory_analysis_in_two_processes_gives_the_costs_of_one(tmp_path, case, fields):
    """The in-memory analysis (no streaming) with its batches split over 2 ranks: the forms (and a
    task loss's gradient) are sums over samples, so 2 ranks give one process's costs and plan."""
    from hessian_worker import analyze

    config = AnalyzeConfig(**{"dtype": "float64", "device": "cpu", "progress": False, **fields})
    model, data, kwargs = _in_memory_case(case)
    one = analyze(model, data, config, **kwargs)
    results, _ = _run({"in_memory": case, "config": config.model_dump(mode="json"), "init": "caller"}, tmp_path,
                      limit_s=240)
    assert all("problem" in r for r in results), results
    two = [SharingProblem.model_validate(r["problem"]) for r in results]
    assert two[0] == two[1]
    _same_costs(two[0], one)
    _same_plan(two[0], one)
    sizes = [4, 4] if case == "minilm" else [3, 2]
    assert two[0].source["world_size"] == 2 and two[0].source["rank_samples"] == sizes
    assert two[0].source["backend"] == fields["backend"] and "world_size" not in one.source


def test_in_memory_backends_that_do_not_split_are_refused_before_any_work():
    from hessian_worker.errors import BackendError
    from hessian_worker.pair_costs import check_data_parallel

    for fields in ({"backend": "projected"}, {"backend": "diagonal"}, {"backend": "kfac"},
                   {"scheme": "basis", "backend": "exact"}):
        with pytest.raises(BackendError, match="runs in one process; under torchrun use scheme 'tie'"):
            check_data_parallel(AnalyzeConfig(**fields))
    check_data_parallel(AnalyzeConfig(backend="layerwise"))


COMPRESS = {"ratio": 0.7, "backend": "kfac", "merge": "layerwise", "dtype": "float64", "batch_size": 3,
            "progress": False, "device": "cpu", "kfac": {"rank": None, "gradient_samples": 6}, "top": 3,
            "normalized_top": 1, "per_pattern": 1, "heal_steps": 4, "heal_lr": 1e-2, "time_limit_s": 5}


@pytest.mark.slow
def test_two_processes_compress_as_one(llama, tmp_path):
    """The streamed compress as one job of 2 ranks: the costs, candidates' measured losses, plan,
    healing and held-out figure of one process, and the same saved tensors (written by rank 0).

    10 samples in batches of 3: 8 fit (3, 3, 2: the statistics on ranks 0, 1, 0), 4 of them scored
    (batches 3 and 1: one each), 2 held out (one batch: rank 1 has none); healing splits every fit
    batch's rows (2 + 1, 2 + 1, 1 + 1), so each step's all-reduced gradient is the whole batch's."""
    from hessian_worker.llm import compress_checkpoint
    from hessian_worker.pipeline import CompressConfig, CompressReport

    config = CompressConfig(**COMPRESS)
    one = compress_checkpoint(llama, llama / "calib.pt", config, tmp_path / "one")
    results, _ = _run({"model": str(llama), "compress": config.model_dump(mode="json"), "out": str(tmp_path / "two")},
                      tmp_path, limit_s=240)
    assert all("report" in r for r in results), results
    two = [CompressReport.model_validate(r["report"]) for r in results]
    assert two[0] == two[1]  # every rank returns the same report
    got = two[0]
    _same_costs(got.problem, one.problem)
    assert got.plan.groups == one.plan.groups and got.chosen == one.chosen
    assert [c.strategy for c in got.candidates] == [c.strategy for c in one.candidates]
    np.testing.assert_allclose([c.measured for c in got.candidates], [c.measured for c in one.candidates], rtol=1e-6)
    np.testing.assert_allclose(got.measured_loss_change, one.measured_loss_change, rtol=1e-6)
    healed_one, healed_two = one.problem.source["heal"], got.problem.source["heal"]
    assert any(b["best_step"] > 0 for b in healed_one["blocks"])  # the healing moved the values
    assert [b["best_step"] for b in healed_two["blocks"]] == [b["best_step"] for b in healed_one["blocks"]]
    np.testing.assert_allclose([b["after"] for b in healed_two["blocks"]], [b["after"] for b in healed_one["blocks"]],
                               rtol=1e-6)
    source = got.problem.source
    assert source["world_size"] == 2 and source["rank_samples"] == [5, 3]
    assert healed_two["rank_samples"] == [5, 3] and "world_size" not in one.problem.source
    ours = load_file(tmp_path / "two" / "model.safetensors")
    theirs = load_file(tmp_path / "one" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and got.unique_params == one.unique_params
    for name, want in theirs.items():  # float64: the sums differ by their order only
        torch.testing.assert_close(ours[name], want, rtol=1e-9, atol=1e-12)


def test_rows_are_split_contiguously_and_cover_every_row_once():
    from hessian_worker.distributed import row_share

    assert [row_share(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [row_share(1, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 1), slice(1, 1)]
    for count in range(7):
        rows = [i for r in range(3) for i in range(count)[row_share(count, r, 3)]]
        assert rows == list(range(count))


@pytest.mark.slow
def test_torchrun_compresses_from_the_cli(llama, tmp_path):
    """``torchrun -m geoshare compress``: rank 0 writes the run's files once (model, plan, report,
    problem with world_size, card); the other rank writes nothing and both exit 0."""
    out = tmp_path / "out"
    flags = ["compress", "--model", str(llama), "--data", str(llama / "calib.pt"), "--ratio", "0.7", "--dtype",
             "float64", "--batch-size", "3", "--kfac-rank", "0", "--top", "2", "--normalized-top", "1",
             "--per-pattern", "1", "--heal", "2", "--heal-lr", "1e-2", "--time-limit", "5", "--no-stats-cache",
             "--quiet", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GEOSHARE_DIST_TIMEOUT": str(TIMEOUT_S)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "geoshare", *flags],
                         cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"chosen"') == 1  # report.json's text, printed by rank 0 only
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "plan.json", "report.json", "problem.json",
                                               "README.md", "config.json"}
    source = json.loads((out / "problem.json").read_text(encoding="utf-8"))["source"]
    assert source["world_size"] == 2 and source["rank_samples"] == [5, 3] and source["heal"]["rank_samples"] == [5, 3]


def test_shards_are_strided_and_cover_every_batch_once():
    shards = [shard(7, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(b for s in shards for b in s) == list(range(7))


def test_a_bad_timeout_is_refused(monkeypatch):
    from hessian_worker.distributed import timeout

    monkeypatch.setenv("GEOSHARE_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="GEOSHARE_DIST_TIMEOUT='soon'"):
        timeout()
    monkeypatch.setenv("GEOSHARE_DIST_TIMEOUT", "90")
    assert timeout().total_seconds() == 90


def test_families_are_dealt_by_pricing_work_each_to_one_rank(llama):
    from hessian_worker.discovery import discover_layers
    from hessian_worker.distributed import Group, deal
    from hessian_worker.llm.analyze import my_families
    from hessian_worker.llm.checkpoint import Checkpoint
    from hessian_worker.llm.decoder import Decoder

    assert deal([1, 5, 2, 4, 3], 2) == [0, 0, 0, 1, 1]  # heaviest first to the lighter rank: 5+2+1 against 4+3
    layers = discover_layers(Decoder(Checkpoint(llama), torch.float32).skeleton)
    shares = [my_families(layers, Group(rank, 2, torch.device("cpu"))) for rank in range(2)]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {x.family for x in layers}
    assert my_families(layers, None) is None


def test_what_cannot_be_split_is_refused_alike_on_every_rank():
    from hessian_worker.data import Calibration
    from hessian_worker.distributed import Group
    from hessian_worker.errors import BackendError, DataError
    from hessian_worker.llm.analyze import check_shardable

    calib = Calibration([{"input_ids": torch.zeros(4, 3, dtype=torch.long)}] * 2)
    with pytest.raises(DataError, match="2 calibration batches for 3 processes"):
        check_shardable(calib, AnalyzeConfig(**BASE), Group(0, 3, torch.device("cpu")))
    with pytest.raises(BackendError, match="exact"):
        check_shardable(calib, AnalyzeConfig(**{**BASE, "backend": "exact"}), Group(1, 2, torch.device("cpu")))
    check_shardable(calib, AnalyzeConfig(**BASE), Group(1, 2, torch.device("cpu")))


def test_stages_that_do_not_split_are_refused_under_torchrun(monkeypatch, tmp_path, capsys):
    """compress of a model that is not streamed, and its analysis by a backend that draws over the
    whole data, would run whole on every rank (each writing the same outputs): under torchrun they
    stop at once with the reason, before any work (no rank waits for the group)."""
    from geoshare.cli import main
    from hessian_worker.distributed import TORCHRUN_ENV

    for name in TORCHRUN_ENV:
        monkeypatch.setenv(name, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.get(name, "29500"))
    out = tmp_path / "out"
    assert main(["compress", "--model", "minilm", "--data", "builtin", "--ratio", "0.8", "--out", str(out)]) == 2
    assert "geoshare compress --backend exact on minilm runs in one process for now" in capsys.readouterr().err
    assert not out.exists()
    problem = tmp_path / "p.json"
    assert main(["analyze", "--model", "minilm", "--data", "builtin", "--backend", "projected", "-o", str(problem)]) == 2
    assert "without torchrun" in capsys.readouterr().err and not problem.exists()
