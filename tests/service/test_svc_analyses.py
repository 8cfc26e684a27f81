"""The analysis queue over real HTTP: claim, lease, heartbeat, expiry, complete, fail, the worker loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.analysis_loop import run_worker
from service.client import ApiError, GeoShareClient
from service.models import AnalysisSpec
from solver import SharingProblem


@pytest.fixture
def api(server):
    with GeoShareClient(server.url, timeout=30) as c:
        # leave no analysis from an earlier test in the queue
        while (claim := c.claim("janitor")) is not None:
            c.fail(claim["id"], claim["lease"], "cleared by the test fixture")
        yield c


def test_claim_on_empty_queue_is_204(client, api):
    assert api.claim("w1") is None
    assert client.post("/v1/analyses/claim", json={"worker": "w1", "extra": 1}).status_code == 422


def test_complete_solves_and_attaches_the_plan(api, make_problem):
    job = api.submit_analysis(AnalysisSpec(model="minilm", ratio=0.5, samples=8))
    assert job["state"] == "queued"
    claim = api.claim("w1", lease_s=30)
    assert claim["id"] == job["id"] and claim["spec"]["model"] == "minilm" and claim["attempt"] == 1
    assert api.heartbeat(claim["id"], claim["lease"], 30)
    assert not api.heartbeat(claim["id"], "not-the-lease")
    costs = make_problem((4, 4), ratio=0.9)
    after = api.complete(claim["id"], claim["lease"], costs)
    assert after["state"] in ("solving", "succeeded") and after["plan_id"]
    done = api.wait_analysis(job["id"], timeout=30)
    assert done["state"] == "succeeded"
    assert done["plan"]["params"]["ratio"] <= 0.5  # the analysis's ratio, not the costs' own
    assert SharingProblem.model_validate(done["problem"]).costs == costs.costs
    with pytest.raises(ApiError) as err:
        api.complete(claim["id"], claim["lease"], costs)  # the lease is gone once completed
    assert err.value.status == 409


def test_bad_bodies_of_every_analysis_post_are_400_415_or_422_naming_the_field(client, api, make_problem):
    """The analysis POSTs parse their bodies like /v1/plans (service.limits): unparseable JSON is
    400, a non-JSON content type 415, an invalid body 422 whose loc names the field. FastAPI's own
    parse answered 422 for all three."""
    json_headers = {"Content-Type": "application/json"}
    job = api.submit_analysis({"model": "m:f", "seed": 11})
    claim = api.claim("w1", lease_s=30)
    assert claim["id"] == job["id"]
    lease = {"lease": claim["lease"]}
    posts = {"create": ("/v1/analyses", {}), "claim": ("/v1/analyses/claim", {}),
             "complete": (f"/v1/analyses/{job['id']}/complete", lease),
             "fail": (f"/v1/analyses/{job['id']}/fail", lease)}
    for name, (path, params) in posts.items():
        for body, headers, status in ((b"{oops", json_headers, 400), (b'{"a": NaN}', json_headers, 400),
                                      (b"{}", {"Content-Type": "text/plain"}, 415)):
            r = client.post(path, params=params, content=body, headers=headers)
            assert r.status_code == status, (name, body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json"), (name, r.text)
    wrong = {"create": {"model": "minilm", "ratio": 2}, "claim": {"worker": "w1", "lease_s": -1},
             "complete": {**make_problem((4, 4)).model_dump(mode="json"), "layers": "all"},
             "fail": {"error": "x", "retry": "maybe"}}
    field = {"create": "ratio", "claim": "lease_s", "complete": "layers", "fail": "retry"}
    for name, (path, params) in posts.items():
        r = client.post(path, params=params, json=wrong[name])
        assert r.status_code == 422, (name, r.text)
        locs = [e["loc"] for e in r.json()["errors"]]
        assert any(loc[0] == "body" and field[name] in loc for loc in locs), (name, locs)
    # the job is still held under its lease after all that: a good completion goes through
    done = api.complete(job["id"], claim["lease"], make_problem((4, 4), ratio=0.9))
    assert done["plan_id"]


def test_expired_lease_goes_back_to_the_queue(api):
    job = api.submit_analysis({"model": "m:f"})
    first = api.claim("dead-worker", lease_s=0.3)
    assert first["id"] == job["id"]
    time.sleep(1.0)
    second = api.claim("w2", lease_s=30)
    assert second["id"] == job["id"] and second["attempt"] == 2 and second["lease"] != first["lease"]
    assert not api.heartbeat(job["id"], first["lease"])  # the dead worker's lease is void
    done = api.fail(job["id"], second["lease"], "no such model", retry=False)
    assert done["state"] == "failed" and "no such model" in done["error"]["detail"]


def test_fail_with_retry_requeues(api):
    job = api.submit_analysis({"model": "m:f", "seed": 3})
    claim = api.claim("w1")
    assert api.fail(job["id"], claim["lease"], "CUDA out of memory", retry=True)["state"] == "queued"
    again = api.claim("w1")
    assert again["id"] == job["id"]
    api.fail(job["id"], again["lease"], "give up")


def test_cancel_tells_the_worker(api):
    job = api.submit_analysis({"model": "m:f", "seed": 4})
    claim = api.claim("w1")
    assert api.cancel_analysis(job["id"])["state"] == "cancelled"
    assert not api.heartbeat(job["id"], claim["lease"])


def test_worker_loop_with_an_injected_analysis(server, api, make_problem):
    """The worker loop end to end; the analysis function is the only thing replaced."""
    seen: list[AnalysisSpec] = []

    def analyze(spec: AnalysisSpec) -> SharingProblem:
        seen.append(spec)
        return make_problem((5, 5), seed=spec.seed)

    ids = [api.submit_analysis({"model": "m:f", "seed": s, "ratio": 0.6})["id"] for s in range(2)]
    stop = threading.Event()
    t = threading.Thread(target=run_worker, args=(server.url,),
                         kwargs={"analyze_fn": analyze, "poll_s": 0.1, "lease_s": 5, "max_jobs": 2, "stop": stop})
    t.start()
    finals = [api.wait_analysis(i, timeout=30) for i in ids]
    stop.set()
    t.join(timeout=10)
    assert [s.seed for s in seen] == [0, 1]
    assert [f["state"] for f in finals] == ["succeeded", "succeeded"]
    assert all(f["plan"]["params"]["ratio"] <= 0.6 for f in finals)


def test_worker_reports_analysis_errors(server, api):
    def broken(spec: AnalysisSpec) -> SharingProblem:
        raise ValueError(f"model spec {spec.model!r} cannot be loaded")

    job = api.submit_analysis({"model": "nowhere:nothing"})
    run_worker(server.url, analyze_fn=broken, poll_s=0.1, max_jobs=1)
    final = api.get_analysis(job["id"])
    assert final["state"] == "failed" and "cannot be loaded" in final["error"]["detail"]


@pytest.mark.slow
def test_worker_real_cpu_analysis(server, api, tmp_path: Path):
    """hessian_worker.analyze on a tiny torch model on CPU, through the real worker loop."""
    torch = pytest.importorskip("torch")
    try:
        from hessian_worker import AnalyzeConfig, analyze  # noqa: F401  (the worker's entry point)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"hessian_worker.analyze is not importable yet: {exc}")
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), data)
    job = api.submit_analysis({"model": "svc_tiny:factory", "data": str(data), "ratio": 0.75, "samples": 8})
    assert run_worker(server.url, poll_s=0.1, max_jobs=1, device="cpu") == 1
    final = api.wait_analysis(job["id"], timeout=60)
    assert final["state"] == "succeeded", final.get("error")
    assert len(final["problem"]["layers"]) >= 4 and final["plan"]["params"]["ratio"] <= 0.75


def test_worker_streams_a_decoder_checkpoint_with_the_kfac_backend(server, api, tmp_path: Path):
    """backend kfac over the API: the worker streams a LLaMA checkpoint block by block, and the costs
    are those `analyze_checkpoint` computes on this machine with the same settings."""
    torch = pytest.importorskip("torch")
    from hessian_worker import AnalyzeConfig
    from hessian_worker.llm import analyze_checkpoint
    from hessian_worker.llm.synthetic import (
        SHAPES,
        decoder_config,
        random_tokens,
        write_random_checkpoint,
    )

    llama = tmp_path / "llama"
    write_random_checkpoint(decoder_config("llama", **SHAPES["tiny"]), llama, dtype=torch.float32, std=0.2)
    calib = llama / "calib.pt"
    torch.save(random_tokens(SHAPES["tiny"]["vocab_size"], 8, 12, seed=1), calib)
    job = api.submit_analysis({"model": str(llama), "data": str(calib), "backend": "kfac", "ratio": 0.7,
                               "seed": 3, "time_limit_s": 5})
    assert job["spec"]["backend"] == "kfac"
    assert run_worker(server.url, poll_s=0.1, max_jobs=1, device="cpu") == 1
    final = api.wait_analysis(job["id"], timeout=120)
    assert final["state"] == "succeeded", final.get("error")
    got = SharingProblem.model_validate(final["problem"])
    assert got.source["streamed"] is True and got.source["backend"] == "kfac"
    here = analyze_checkpoint(llama, str(calib), AnalyzeConfig(backend="kfac", seed=3, max_params_ratio=0.7,
                                                               device="cpu", progress=False))
    assert [x.name for x in got.layers] == [x.name for x in here.layers]
    pairs = [(i, j) for i, row in enumerate(here.costs.matrix) for j, v in enumerate(row) if v is not None]
    assert pairs and all(got.costs.matrix[i][j] is not None for i, j in pairs)
    assert [got.costs.matrix[i][j] for i, j in pairs] == pytest.approx([here.costs.matrix[i][j] for i, j in pairs],
                                                                       rel=1e-6)
    assert final["plan"]["params"]["ratio"] <= 0.7
