"""Access rules over real HTTP: what an analysis job may make a worker import, read and write.

Two servers of this module's own: one with no access settings at all (the safe default) and one
with a read root, an out root and one allowed module, both on temp folders with real symlinks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from svc_cases import Server

from service.access import AccessDenied, AccessRules
from service.analysis_loop import run_worker
from service.client import GeoShareClient
from service.models import AnalysisSpec
from service.settings import Settings, WorkerSettings
from solver import SharingProblem

ACCESS_ENV = ("GEOSHARE_READ_ROOTS", "GEOSHARE_OUT_ROOT", "GEOSHARE_MODEL_MODULES")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/models (read root: calib.txt, hf/), base/outs (out root), and real symlinks out of both."""
    base = tmp_path_factory.mktemp("access").resolve()
    models, outs, elsewhere = base / "models", base / "outs", base / "elsewhere"
    for folder in (models / "hf", outs, elsewhere):
        folder.mkdir(parents=True)
    (models / "calib.txt").write_text("a sentence\n")
    (models / "hf" / "config.json").write_text("{}")
    (base / "secret.txt").write_text("not for clients\n")
    (models / "leak.txt").symlink_to(base / "secret.txt")
    (models / "passwd").symlink_to("/etc/passwd")
    (models / "hf-leak").symlink_to(elsewhere)
    (outs / "esc").symlink_to(elsewhere)
    (base / "models-link").symlink_to(models)  # a root given through a symlink still works
    return base


def _server(db: Path, env: dict[str, str]) -> Server:
    with pytest.MonkeyPatch.context() as mp:  # the suite opens the rules for its shared server
        for name in ACCESS_ENV:
            mp.delenv(name, raising=False)
        return Server(db=db, env=env).start()


@pytest.fixture(scope="module")
def default_server(tree: Path) -> Iterator[Server]:
    """`geoshare serve` with no access settings."""
    srv = _server(tree / "default.db", {"GEOSHARE_POLL_S": "0.2"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def rooted_server(tree: Path) -> Iterator[Server]:
    srv = _server(tree / "rooted.db", {"GEOSHARE_READ_ROOTS": str(tree / "models-link"),
                                       "GEOSHARE_OUT_ROOT": str(tree / "outs"),
                                       "GEOSHARE_MODEL_MODULES": "svc_tiny,pkg.models:build"})
    yield srv
    srv.stop()


def _api(server: Server) -> Iterator[GeoShareClient]:
    with GeoShareClient(server.url, timeout=30) as c:
        while (claim := c.claim("janitor")) is not None:  # leave no job of another test queued
            c.fail(claim["id"], claim["lease"], "cleared by the test fixture")
        yield c


@pytest.fixture
def default_api(default_server: Server) -> Iterator[GeoShareClient]:
    yield from _api(default_server)


@pytest.fixture
def rooted_api(rooted_server: Server) -> Iterator[GeoShareClient]:
    yield from _api(rooted_server)


def _refused(server: Server, body: dict, loc: list[str]) -> dict:
    r = httpx.post(server.url + "/v1/analyses", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["type"].endswith(":validation-error")
    assert [e["loc"] for e in doc["errors"]] == [["body", *loc]], doc
    assert ".".join(loc) in doc["detail"]
    return doc


def _accepted(server: Server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/analyses", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


# --- the safe default ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "loc", "words"), [
    ({"model": "os:abort"}, ["model"], "module 'os' is not allowed"),
    ({"model": "this:x"}, ["model"], "module 'this' is not allowed"),
    ({"model": "subprocess:getoutput"}, ["model"], "GEOSHARE_MODEL_MODULES"),
    ({"model": "/etc"}, ["model"], "outside the read roots"),
    ({"model": "bert-base-uncased"}, ["model"], "neither 'minilm'"),
    ({"model": "minilm", "data": "/etc/passwd"}, ["data"], "none are set"),
    ({"model": "minilm", "data": "calib.txt"}, ["data"], "not an absolute path"),
    ({"model": "minilm", "data": "~/.bash_history"}, ["data"], "not an absolute path"),
    ({"model": "minilm", "compress": {"out": "../../../../x"}}, ["compress", "out"], "below the out root"),
    ({"model": "minilm", "compress": {"out": "~/.ssh", "overwrite": True}}, ["compress", "out"], "'~'"),
    ({"model": "minilm", "compress": {"out": "/root/.cache/x", "overwrite": True}}, ["compress", "out"],
     "GEOSHARE_OUT_ROOT"),
    ({"model": "minilm", "compress": {"out": "."}}, ["compress", "out"], "below the out root"),
])  # fmt: skip
def test_default_server_refuses_what_it_was_not_given(default_server, default_api, body, loc, words):
    doc = _refused(default_server, body, loc)
    assert words in doc["detail"]
    assert default_api.claim("w") is None  # nothing was queued


def test_default_server_takes_the_packaged_model_and_built_in_data(default_server, default_api):
    job = _accepted(default_server, {"model": "minilm", "samples": 8})
    assert job["spec"]["model"] == "minilm" and job["spec"].get("data") is None
    out = _accepted(default_server, {"model": "minilm", "compress": {"out": "minilm-0.8"}})
    assert out["spec"]["compress"]["out"] == "minilm-0.8"  # stored as sent: each side resolves it


def test_default_worker_runs_the_packaged_model_unchanged(default_server, default_api, tree):
    """Existing behaviour: minilm with the built-in data goes through both checks untouched."""
    seen: list[AnalysisSpec] = []

    def analyze(spec: AnalysisSpec) -> SharingProblem:
        seen.append(spec)
        from svc_cases import small_problem

        return small_problem((4,), ratio=None)

    job = _accepted(default_server, {"model": "minilm", "samples": 8})
    with pytest.MonkeyPatch.context() as mp:
        for name in ACCESS_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(tree)  # the default out root is ./geoshare-out of the worker
        assert run_worker(default_server.url, analyze_fn=analyze, poll_s=0.1, max_jobs=1) == 1
    assert default_api.wait_analysis(job["id"], timeout=30)["state"] == "succeeded"
    assert [(s.model, s.data, s.samples) for s in seen] == [("minilm", None, 8)]


# --- a server with roots ---------------------------------------------------------------------


def test_paths_under_the_roots_are_accepted(rooted_server, rooted_api, tree):
    models = tree / "models"
    _accepted(rooted_server, {"model": str(models / "hf"), "data": str(models / "calib.txt")})
    _accepted(rooted_server, {"model": "svc_tiny:factory", "data": str(tree / "models-link" / "calib.txt")})
    _accepted(rooted_server, {"model": "pkg.models:build"})  # an exact module:factory entry
    _accepted(rooted_server, {"model": "minilm", "compress": {"out": str(tree / "outs" / "a" / "b")}})
    _accepted(rooted_server, {"model": "minilm", "compress": {"out": "c/../d"}})


@pytest.mark.parametrize(("body", "loc", "words"), [
    ({"model": "minilm", "data": "{models}/leak.txt"}, ["data"], "resolves to '{base}/secret.txt'"),
    ({"model": "minilm", "data": "{models}/passwd"}, ["data"], "resolves to '/etc/passwd'"),
    ({"model": "minilm", "data": "{models}/../secret.txt"}, ["data"], "outside the read roots"),
    ({"model": "minilm", "data": "{models}/hf/../../secret.txt"}, ["data"], "outside the read roots"),
    ({"model": "minilm", "data": "{base}/secret.txt"}, ["data"], "outside the read roots"),
    ({"model": "{models}/hf-leak"}, ["model"], "resolves to '{base}/elsewhere'"),
    ({"model": "minilm", "compress": {"out": "esc/run1"}}, ["compress", "out"], "resolves to '{base}/elsewhere/run1'"),
    ({"model": "minilm", "compress": {"out": "{base}/outs/../elsewhere"}}, ["compress", "out"], "below the out root"),
    ({"model": "minilm", "compress": {"out": "{base}/outs"}}, ["compress", "out"], "below the out root"),
    ({"model": "os:abort"}, ["model"], "allowed: pkg.models:build, svc_tiny"),
    ({"model": "pkg.models:other"}, ["model"], "module 'pkg.models' is not allowed"),
    ({"model": "svc_tiny.sub:factory"}, ["model"], "module 'svc_tiny.sub' is not allowed"),
])  # fmt: skip
def test_escapes_are_refused_with_the_field(rooted_server, rooted_api, tree, body, loc, words):
    fill = {"models": str(tree / "models"), "base": str(tree)}
    body = {k: ({kk: vv.format(**fill) for kk, vv in v.items()} if isinstance(v, dict) else v.format(**fill))
            for k, v in body.items()}
    doc = _refused(rooted_server, body, loc)
    assert words.format(**fill) in doc["detail"]
    assert rooted_api.claim("w") is None
    assert sorted(p.name for p in (tree / "elsewhere").iterdir()) == []


def test_validation_errors_name_their_field(rooted_server):
    _refused(rooted_server, {"model": "minilm", "kind": "assignment", "compress": {"out": "x"}}, ["compress"])
    _refused(rooted_server, {"model": "minilm", "compress": {"out": "   "}}, ["compress", "out"])
    _refused(rooted_server, {"model": "minilm", "data": "/x\x00y"}, ["data"])
    r = httpx.post(rooted_server.url + "/v1/analyses", json={"model": "minilm", "time_limit_s": 3000}, timeout=30)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "time_limit_s"]


# --- the worker checks again, with its own settings ------------------------------------------


def _worker_rules(tree: Path, modules: tuple[str, ...] = ("svc_tiny",)) -> AccessRules:
    return AccessRules.build([tree / "models"], tree / "outs", modules, side="this worker")


def _never(*args: object) -> SharingProblem:
    raise AssertionError("the worker ran a job its rules refuse")


def test_worker_refuses_a_symlink_that_appeared_after_submission(rooted_server, rooted_api, tree):
    data = tree / "models" / "late.txt"
    job = _accepted(rooted_server, {"model": "minilm", "data": str(data)})  # nothing there yet
    data.symlink_to(tree / "secret.txt")
    assert run_worker(rooted_server.url, analyze_fn=_never, poll_s=0.1, max_jobs=1, access=_worker_rules(tree)) == 1
    final = rooted_api.get_analysis(job["id"])
    assert final["state"] == "failed" and final["attempts"] == 1
    detail = final["error"]["detail"]
    assert detail.startswith("AccessDenied: data=") and "outside the read roots of this worker" in detail
    assert f"resolves to '{tree / 'secret.txt'}'" in detail


def test_worker_refuses_an_out_that_escapes_and_writes_nothing(rooted_server, rooted_api, tree):
    (tree / "outs" / "late").mkdir()
    job = _accepted(rooted_server, {"model": "svc_tiny:factory", "compress": {"out": "late/run"}})
    (tree / "outs" / "late").rmdir()
    (tree / "outs" / "late").symlink_to(tree / "elsewhere")
    # the real compress function, which creates and marks its folder before anything else
    assert run_worker(rooted_server.url, poll_s=0.1, max_jobs=1, access=_worker_rules(tree)) == 1
    final = rooted_api.get_analysis(job["id"])
    assert final["state"] == "failed" and "compress.out='late/run'" in final["error"]["detail"]
    assert "below the out root of this worker" in final["error"]["detail"]
    assert list((tree / "elsewhere").iterdir()) == []


def test_worker_has_its_own_roots_and_modules(rooted_server, rooted_api, tree):
    """The API (another machine, other settings) accepted these; this worker's settings do not."""
    jobs = [_accepted(rooted_server, {"model": "pkg.models:build"}),
            _accepted(rooted_server, {"model": "minilm", "data": str(tree / "models" / "calib.txt")}),
            _accepted(rooted_server, {"model": str(tree / "models" / "hf" / "nothing-here")})]
    narrow = AccessRules.build([tree / "models" / "hf"], tree / "outs", ["svc_tiny"], side="this worker")
    assert run_worker(rooted_server.url, analyze_fn=_never, poll_s=0.1, max_jobs=3, access=narrow) == 3
    details = [rooted_api.get_analysis(j["id"])["error"]["detail"] for j in jobs]
    assert "module 'pkg.models' is not allowed on this worker (allowed: svc_tiny" in details[0]
    assert "data=" in details[1] and "outside the read roots of this worker" in details[1]
    assert "is not a directory on this worker" in details[2]


def test_worker_runs_allowed_jobs_on_the_resolved_paths(rooted_server, rooted_api, tree):
    seen: list[AnalysisSpec] = []

    def analyze(spec: AnalysisSpec) -> SharingProblem:
        seen.append(spec)
        from svc_cases import small_problem

        return small_problem((4,), ratio=None)

    link = tree / "models-link"
    job = _accepted(rooted_server, {"model": str(link / "hf" / ".." / "hf"), "data": str(link / "calib.txt")})
    assert run_worker(rooted_server.url, analyze_fn=analyze, poll_s=0.1, max_jobs=1, access=_worker_rules(tree)) == 1
    assert rooted_api.wait_analysis(job["id"], timeout=30)["state"] == "succeeded"
    assert seen[0].model == str(tree / "models" / "hf") and seen[0].data == str(tree / "models" / "calib.txt")


def test_worker_reads_its_rules_from_its_settings(monkeypatch, tree):
    monkeypatch.setenv("GEOSHARE_READ_ROOTS", f"{tree / 'models-link'}, {tree / 'outs'}")
    monkeypatch.setenv("GEOSHARE_OUT_ROOT", str(tree / "outs"))
    monkeypatch.setenv("GEOSHARE_MODEL_MODULES", "svc_tiny")
    from service.analysis_loop import worker_rules

    rules = worker_rules()
    assert rules.read_roots == (tree / "models", tree / "outs") and rules.out_root == tree / "outs"
    spec = rules.check(AnalysisSpec.model_validate({"model": "svc_tiny:factory", "compress": {"out": "x"}}),
                       on_worker=True)
    assert spec.compress is not None and spec.compress.out == str(tree / "outs" / "x")
    with pytest.raises(AccessDenied) as err:
        rules.check(AnalysisSpec(model="os:abort"))
    assert err.value.loc == ("model",)


def test_cli_worker_builds_its_rules_once_and_hands_them_to_the_loop(monkeypatch, tree):
    """``geoshare worker`` reads WorkerSettings once and passes its rules as ``access=`` (the loop
    read the settings a second time for them)."""
    import argparse

    import service.analysis_loop
    import service.settings
    from geoshare.cli.service import worker as _worker

    monkeypatch.setenv("GEOSHARE_READ_ROOTS", str(tree / "models-link"))
    monkeypatch.setenv("GEOSHARE_OUT_ROOT", str(tree / "outs"))
    monkeypatch.setenv("GEOSHARE_MODEL_MODULES", "svc_tiny")
    reads: list[WorkerSettings] = []

    class Counted(WorkerSettings):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)
            reads.append(self)

    seen: dict[str, object] = {}

    def fake_run_worker(api: str, **kwargs: object) -> int:
        seen.update(kwargs, api=api)
        return 0

    monkeypatch.setattr(service.settings, "WorkerSettings", Counted)
    monkeypatch.setattr(service.analysis_loop, "run_worker", fake_run_worker)
    args = argparse.Namespace(api="http://127.0.0.1:9", worker_id=None, poll=None, lease=None, max_jobs=0,
                              device="cpu")
    assert _worker(args) == 0
    rules = seen.get("access")
    assert isinstance(rules, AccessRules), seen
    assert rules.read_roots == (tree / "models",) and rules.out_root == tree / "outs"
    assert rules.model_modules == frozenset({"svc_tiny"}) and rules.side == "this worker"
    assert len(reads) == 1


# --- settings --------------------------------------------------------------------------------


def test_access_settings_parse_and_default_safe(monkeypatch, tmp_path):
    for name in ACCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    bare = AccessRules.of(Settings())
    assert bare.read_roots == () and bare.model_modules == frozenset()
    assert bare.out_root == tmp_path.resolve() / "geoshare-out"
    monkeypatch.setenv("GEOSHARE_READ_ROOTS", '["/models", "/data"]')
    monkeypatch.setenv("GEOSHARE_MODEL_MODULES", "a.b, c:make")
    monkeypatch.setenv("GEOSHARE_OUT_ROOT", "")  # compose's unset variable
    settings = WorkerSettings()
    assert settings.read_roots == [Path("/models"), Path("/data")] and settings.model_modules == ["a.b", "c:make"]
    assert settings.out_root == Path("geoshare-out")
    monkeypatch.setenv("GEOSHARE_MODEL_MODULES", "os abort")
    with pytest.raises(ValueError, match="'os abort' is not a module name"):
        Settings()


def test_roots_match_whole_folder_names(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models2").mkdir()
    rules = AccessRules.build([tmp_path / "models"], tmp_path / "out")
    assert rules.readable(str(tmp_path / "models" / "x"), ("data",), "data file") == tmp_path.resolve() / "models/x"
    with pytest.raises(AccessDenied, match="outside the read roots"):
        rules.readable(str(tmp_path / "models2" / "x"), ("data",), "data file")
    with pytest.raises(AccessDenied, match="below the out root"):
        rules.writable(os.fspath(tmp_path / "out2"))


@pytest.mark.slow
def test_default_worker_analyzes_the_packaged_model_for_real(default_server, default_api, tree):
    """`geoshare serve` and a worker with no access settings: minilm on the built-in data, end to end."""
    pytest.importorskip("torch")
    job = _accepted(default_server, {"model": "minilm", "samples": 2, "backend": "diagonal", "ratio": 0.9})
    with pytest.MonkeyPatch.context() as mp:
        for name in ACCESS_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(tree)
        assert run_worker(default_server.url, poll_s=0.1, max_jobs=1, device="cpu") == 1
    final = default_api.wait_analysis(job["id"], timeout=120)
    assert final["state"] == "succeeded", final.get("error")
    assert final["problem"]["layers"] and final["plan"]["params"]["ratio"] <= 0.9
