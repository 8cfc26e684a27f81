"""Compression as an analysis job over real HTTP: the spec, the worker, the report, the out dir."""

from __future__ import annotations

import threading
from pathlib import Path
from types import NoneType
from typing import get_args

import httpx
import pytest
from pydantic.fields import FieldInfo

from hessian_worker.options import Backend as WorkerBackend
from hessian_worker.options import CompressConfig
from service.analysis_loop import Compressed, run_worker
from service.client import ApiError, GeoShareClient
from service.compress import CONFIG_FIELDS, CompressSpec, compress_config
from service.models import AnalysisSpec, Backend
from service.outdir import MARKER, OutDirError, prepare_out
from solver import SharingProblem, SolveConfig, solve


@pytest.fixture
def api(server):
    with GeoShareClient(server.url, timeout=30) as c:
        # leave no analysis from an earlier test in the queue
        while (claim := c.claim("janitor")) is not None:
            c.fail(claim["id"], claim["lease"], "cleared by the test fixture")
        yield c


def _problem_doc(client: httpx.Client, body: dict, status: int = 422) -> dict:
    r = client.post("/v1/analyses", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return r.json()


# --- the spec --------------------------------------------------------------------------------


def test_bad_compress_specs_are_refused(client):
    doc = _problem_doc(client, {"model": "m:f", "ratio": 0, "compress": {"out": "/tmp/o"}})
    assert "ratio" in doc["detail"] and "greater than 0" in doc["detail"]
    doc = _problem_doc(client, {"model": "m:f", "compress": {"out": ""}})
    assert "compress.out" in doc["detail"]
    doc = _problem_doc(client, {"model": "m:f", "compress": {"out": "   "}})
    assert "out must name a directory" in doc["detail"]
    doc = _problem_doc(client, {"model": "m:f", "compress": {}})
    assert "compress.out" in doc["detail"] and "required" in doc["detail"].lower()
    doc = _problem_doc(client, {"model": "m:f", "compress": {"out": "/tmp/o", "heal": 3}})
    assert "compress.heal" in doc["detail"]  # a misspelled field is an error, not ignored
    doc = _problem_doc(client, {"model": "m:f", "compress": {"out": "/tmp/o", "top": 0}})
    assert "compress.top" in doc["detail"]
    doc = _problem_doc(client, {"model": "m:f", "kind": "assignment", "compress": {"out": "/o"}})
    assert "drop kind or compress" in doc["detail"]


def test_costs_only_requests_are_unchanged(client, api):
    # the stored request, and so the Idempotency-Key hash, is byte for byte what it was before
    assert AnalysisSpec(model="m:f").stored() == (
        '{"backend":"exact","data":null,"kind":"pairwise","model":"m:f","ratio":0.5,'
        '"samples":null,"seed":0,"time_limit_s":null}'
    )
    body = {"model": "m:f", "seed": 11}
    first = client.post("/v1/analyses", json=body, headers={"Idempotency-Key": "costs-11"})
    again = client.post("/v1/analyses", json=body, headers={"Idempotency-Key": "costs-11"})
    assert first.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert "compress" not in first.json()["spec"] and "report" not in first.json()
    claim = api.claim("w1")
    assert claim["id"] == first.json()["id"] and "compress" not in claim["spec"]
    api.fail(claim["id"], claim["lease"], "not run in this test")


FULL = {"model": "m:f", "ratio": 0.7, "backend": "diagonal", "samples": 32, "seed": 3,
        "time_limit_s": 4,
        "compress": {"out": "/o", "overwrite": True, "top": 5, "min_distance": 2, "per_pattern": 1,
                     "merge": "mean", "distill": "cosine", "heal_steps": 7, "heal_lr": 1e-4,
                     "heal_holdout": 0.1, "holdout": 6, "curvature_samples": 16, "batch_size": 4,
                     "shrinkage": "oas"}}  # fmt: skip


def test_compress_fields_map_onto_the_pipeline_config():
    fields = compress_config(AnalysisSpec.model_validate(FULL))
    assert fields == {"ratio": 0.7, "backend": "diagonal", "samples": 32, "seed": 3,
                      "time_limit_s": 4, "top": 5, "min_distance": 2, "per_pattern": 1,
                      "merge": "mean", "distill": "cosine", "heal_steps": 7, "heal_lr": 1e-4,
                      "heal_holdout": 0.1, "holdout": 6, "curvature_samples": 16, "batch_size": 4,
                      "shrinkage": "oas"}  # fmt: skip
    assert CONFIG_FIELDS | {"out", "overwrite"} == set(CompressSpec.model_fields)
    # settings left out are not sent: the worker's CompressConfig defaults apply
    bare = AnalysisSpec.model_validate({"model": "m:f", "compress": {"out": "/o"}})
    assert compress_config(bare) == {"ratio": 0.5, "backend": "exact", "samples": None, "seed": 0}
    with pytest.raises(ValueError, match="no compress settings"):
        compress_config(AnalysisSpec(model="m:f"))


def _extremes(info: FieldInfo) -> list[float]:
    """The most extreme values a numeric API field accepts (its bounds, or just inside them)."""
    step = 1 if int in get_args(info.annotation) else 1e-9
    values: list[float] = []
    for m in info.metadata:
        values += [v for v in (getattr(m, "ge", None), getattr(m, "le", None)) if v is not None]
        if getattr(m, "gt", None) is not None:
            values.append(m.gt + step)
    return values


def _types(info: FieldInfo) -> set[object]:
    return set(get_args(info.annotation) or [info.annotation]) - {NoneType}


def test_compress_spec_fields_are_compress_config_fields():
    """Every API field but out and overwrite is a CompressConfig field of the same type (its enums the
    worker's own), optional with a null default (the pipeline's default applies)."""
    assert set(CompressSpec.model_fields) - CONFIG_FIELDS == {"out", "overwrite"}
    for name in CONFIG_FIELDS:
        spec, config = CompressSpec.model_fields[name], CompressConfig.model_fields[name]
        assert _types(spec) == _types(config), name
        assert NoneType in get_args(spec.annotation) and spec.default is None, name
    for name in ("ratio", "samples", "seed", "time_limit_s"):  # the spec's own fields that compress takes
        assert _types(AnalysisSpec.model_fields[name]) <= _types(CompressConfig.model_fields[name]), name
    # the API's backends are the worker's, kfac included (an added value: older requests stay valid)
    assert Backend is WorkerBackend and "kfac" in {b.value for b in Backend}


def test_compress_fields_are_accepted_by_compress_config():
    """The worker's CompressConfig takes every field and value the API sends."""
    settable = CONFIG_FIELDS | {"ratio", "backend", "samples", "seed", "time_limit_s"}
    # the worker sets device and progress; dtype and kfac (the kfac backend's options: the API runs
    # kfac with their defaults) are the CLI's only; relaxed (the relaxed
    # scheme's nested options) is the Python API's, the API sets its correction_rank
    missing = set(CompressConfig.model_fields) - {"device", "progress", "dtype", "kfac", "relaxed"} - settable
    assert not missing, (
        f"CompressConfig fields the API cannot set: {missing}; mirror them in CompressSpec"
    )
    sent = compress_config(AnalysisSpec.model_validate(FULL))
    config = CompressConfig.model_validate(sent | {"device": "cpu", "progress": False})
    got = config.model_dump(mode="json")
    assert {k: got[k] for k in sent} == sent
    bare = AnalysisSpec.model_validate({"model": "m:f", "compress": {"out": "/o"}})
    CompressConfig.model_validate(compress_config(bare))
    for name in CONFIG_FIELDS:  # the API's bounds are within the pipeline's
        for value in _extremes(CompressSpec.model_fields[name]):
            CompressConfig.model_validate({"ratio": 0.5, name: value})


# --- the out directory -----------------------------------------------------------------------


def test_prepare_out(tmp_path: Path):
    new = prepare_out(str(tmp_path / "a" / "b"), overwrite=False, job_id="j1")
    assert new.is_dir() and (new / MARKER).read_text().strip() == "j1"
    (new / "model.safetensors").write_text("x")
    assert prepare_out(str(new), overwrite=False, job_id="j1") == new  # a retry of the same job
    with pytest.raises(OutDirError, match="not empty .*model.safetensors.*overwrite=true"):
        prepare_out(str(new), overwrite=False, job_id="j2")
    assert prepare_out(str(new), overwrite=True, job_id="j2") == new
    assert (new / MARKER).read_text().strip() == "j2"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / MARKER).write_text("failed-job\n")  # a failed job left only its marker
    assert prepare_out(str(stale), overwrite=False, job_id="j3") == stale
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutDirError, match="is a file"):
        prepare_out(str(tmp_path / "file"), overwrite=True, job_id="j4")


def test_non_empty_out_fails_the_job_and_keeps_its_files(server, api, tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    job = api.submit_analysis({"model": "m:f", "compress": {"out": str(out)}})
    # the real compress function: it refuses the directory before loading anything
    assert run_worker(server.url, poll_s=0.1, max_jobs=1) == 1
    final = api.get_analysis(job["id"])
    assert final["state"] == "failed"
    assert "not empty" in final["error"]["detail"] and "overwrite" in final["error"]["detail"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


# --- completing a compress job ---------------------------------------------------------------


def _fake_compress(make_problem, seen: list[tuple[AnalysisSpec, str]]):
    def run(spec: AnalysisSpec, job_id: str) -> Compressed:
        seen.append((spec, job_id))
        problem = make_problem((4, 4), seed=spec.seed, ratio=None)
        plan = solve(problem, SolveConfig(max_params_ratio=spec.ratio, seed=0))
        report = {"plan": plan.model_dump(mode="json"), "out": spec.compress.out,
                  "chosen": "optimum", "unique_params": plan.params.shared,
                  "params_ratio": plan.params.ratio, "predicted_loss_change": plan.objective,
                  "measured_loss_change": 0.01, "candidates": [{"strategy": "optimum"}]}  # fmt: skip
        return Compressed(problem=problem, report=report)

    return run


def test_compress_job_through_the_worker_loop(server, api, make_problem, tmp_path: Path):
    """The loop, the completion and the view end to end; only the compress function is faked."""
    seen: list[tuple[AnalysisSpec, str]] = []
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(server.url,), kwargs={
        "compress_fn": _fake_compress(make_problem, seen), "poll_s": 0.1, "lease_s": 5,
        "max_jobs": 1, "stop": stop})  # fmt: skip
    worker.start()
    try:
        report = api.compress(
            {"model": "m:f", "ratio": 0.6, "seed": 2, "compress": {"out": str(tmp_path)}},
            timeout=30,
        )
    finally:
        stop.set()
        worker.join(timeout=10)
    spec, job_id = seen[0]
    assert spec.compress is not None and spec.compress.out == str(tmp_path)
    assert report.plan.params.ratio <= 0.6 and report.out == str(tmp_path)
    assert report.model_extra["candidates"] == [{"strategy": "optimum"}]  # extra fields pass
    job = api.get_analysis(job_id)
    assert job["state"] == "succeeded" and job["report"]["plan"] == report.plan.model_dump(
        mode="json", exclude_none=True
    )
    assert job["plan"]["params"]["ratio"] <= 0.6  # the service still solves the costs
    assert SharingProblem.model_validate(job["problem"]).layers
    assert job["spec"]["compress"]["out"] == str(tmp_path)


def test_completion_must_fit_the_job(api, make_problem):
    costs = make_problem((4,), ratio=None)
    plan = solve(costs, SolveConfig(max_params_ratio=0.5))
    report = {"plan": plan.model_dump(mode="json"), "out": "/o"}
    job = api.submit_analysis({"model": "m:f", "compress": {"out": "/o"}})
    claim = api.claim("w1")
    with pytest.raises(ApiError) as err:
        api.complete(job["id"], claim["lease"], costs)
    assert err.value.status == 422 and "is a compress job" in str(err.value)
    with pytest.raises(ApiError) as err:
        api.complete(job["id"], claim["lease"], costs, report={"out": "/o"})
    assert err.value.status == 422 and "report.plan" in str(err.value)
    done = api.complete(job["id"], claim["lease"], costs, report=report)  # the lease still holds
    assert done["state"] in ("solving", "succeeded") and done["report"]["out"] == "/o"

    plain = api.submit_analysis({"model": "m:f", "seed": 9})
    claim = api.claim("w1")
    with pytest.raises(ApiError) as err:
        api.complete(plain["id"], claim["lease"], costs, report=report)
    assert err.value.status == 422 and "only measures costs" in str(err.value)
    api.fail(plain["id"], claim["lease"], "not run in this test")


def test_client_compress_needs_compress_settings(api):
    with pytest.raises(ValueError, match="no `compress` object"):
        api.compress({"model": "m:f"})


# --- the real pipeline on a tiny model -------------------------------------------------------


@pytest.mark.slow
def test_compress_job_on_a_tiny_model(server, api, tmp_path: Path):
    """hessian_worker.compress through the real worker: the report, and the saved model loads."""
    torch = pytest.importorskip("torch")
    from svc_tiny import factory

    from hessian_worker import load_shared, unique_params

    data = tmp_path / "calib.pt"
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.save(x, data)
    out = tmp_path / "out"
    spec = {"model": "svc_tiny:factory", "data": str(data), "ratio": 0.5, "time_limit_s": 5,
            "compress": {"out": str(out), "top": 3, "heal_steps": 2, "batch_size": 4}}  # fmt: skip
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(server.url,), kwargs={
        "poll_s": 0.1, "lease_s": 10, "max_jobs": 1, "stop": stop, "device": "cpu"})  # fmt: skip
    worker.start()
    try:
        report = api.compress(spec, timeout=240)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert report.plan.params.ratio <= 0.5 and report.params_ratio <= 0.5
    assert report.out == str(out.resolve())
    assert {"model.safetensors", "plan.json", "report.json"} <= {p.name for p in out.iterdir()}
    fresh = factory()
    assert load_shared(fresh, out) == report.plan
    assert unique_params(fresh) == report.unique_params < unique_params(factory())
    with torch.no_grad():
        assert fresh(x).shape == (16, 2)


def test_compress_scheme_auto_and_predict_reach_the_pipeline():
    spec = AnalysisSpec.model_validate({"model": "m:f", "compress": {"out": "/o", "scheme": "auto", "predict": False}})
    sent = compress_config(spec)
    assert sent["scheme"] == "auto" and sent["predict"] is False
    config = CompressConfig.model_validate(sent)
    assert config.scheme == "auto" and config.predict is False
    with pytest.raises(ValueError, match="scheme"):
        AnalysisSpec.model_validate({"model": "m:f", "compress": {"out": "/o", "scheme": "best"}})


def test_relaxed_fields_reach_the_relaxed_options():
    spec = AnalysisSpec.model_validate({"model": "m:f", "ratio": 0.5, "compress": {
        "out": "/o", "scheme": "relaxed", "correction_rank": 8, "output_weighting": False}})
    config = CompressConfig.model_validate(compress_config(spec) | {"device": "cpu", "progress": False})
    analysis = config.analyze_config("float32")
    assert analysis.scheme.value == "relaxed" and analysis.max_params_ratio == 0.5
    assert analysis.relaxed.rank == 8 and not analysis.relaxed.output_weighting
    assert analysis.relaxed.basis_ratios  # families may go to shared bases unless the spec says otherwise
    spec = AnalysisSpec.model_validate({"model": "m:f", "ratio": 0.5, "compress": {
        "out": "/o", "scheme": "relaxed", "relaxed_bases": False}})
    config = CompressConfig.model_validate(compress_config(spec) | {"device": "cpu", "progress": False})
    assert config.analyze_config("float32").relaxed.basis_ratios == []
