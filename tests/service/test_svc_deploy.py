"""The container files: compose keys that matter, and the entrypoints the images call."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from svc_cases import ROOT

yaml = pytest.importorskip("yaml")  # PyYAML (dev extra)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_api(compose):
    api = compose["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert (ROOT / api["build"]["dockerfile"]).is_file()
    assert api["command"][:2] == ["geoshare", "serve"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    volume, target = api["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"] and api["command"][api["command"].index("--db") + 1].startswith(target)
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])  # published on loopback only


def test_compose_worker(compose):
    worker = compose["services"]["worker"]
    assert (ROOT / worker["build"]["dockerfile"]).is_file()
    assert worker["command"] == ["geoshare", "worker"]
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert worker["environment"]["GEOSHARE_API"] == "http://api:8000"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(v.split(":")[0] in compose["volumes"] and v.split(":")[1] == "/models" for v in worker["volumes"])


def test_dockerfiles():
    api = (ROOT / "docker/Dockerfile.api").read_text()
    assert re.search(r"^FROM python:3\.11-slim", api, re.M)
    assert '".[service,postgres]"' in api and "torch" not in api.split("RUN", 1)[1].split("\n")[0]
    assert '"geoshare", "serve"' in api
    worker = (ROOT / "docker/Dockerfile.worker").read_text()
    assert re.search(r"pytorch/pytorch:[\w.-]*cuda", worker)
    assert "-c /tmp/torch-constraint.txt" in worker and '".[worker,service]"' in worker
    assert 'CMD ["geoshare", "worker"]' in worker


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_entrypoints_run(command):
    r = subprocess.run([sys.executable, "-m", "geoshare", command, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"geoshare {command}" in r.stdout


def test_worker_without_api_says_how_to_fix():
    env = {k: v for k, v in os.environ.items() if k != "GEOSHARE_API"}
    r = subprocess.run([sys.executable, "-m", "geoshare", "worker"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2 and "GEOSHARE_API" in r.stderr


def test_cli_import_is_light():
    code = ("import sys, geoshare.cli; geoshare.cli.build_parser(); heavy = [m for m in ('fastapi', 'uvicorn', 'sqlalchemy', 'torch', 'httpx') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_empty_api_key_from_compose_means_no_key(monkeypatch):
    from service.settings import Settings, WorkerSettings

    monkeypatch.setenv("GEOSHARE_API_KEY", "")
    monkeypatch.setenv("GEOSHARE_API", "")
    assert Settings().api_key is None and WorkerSettings().api is None
    monkeypatch.setenv("GEOSHARE_API_KEY", "k")
    monkeypatch.setenv("GEOSHARE_MAX_LAYERS", "7")
    settings = Settings()
    assert settings.api_key.get_secret_value() == "k" and settings.max_layers == 7


# --- who the containers run as, and what jobs may touch in them -------------------------------


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / dockerfile).read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
            pending = ""
    return out


def _compose_default(value: str) -> str:
    """The value compose gives ``${NAME:-default}`` when NAME is unset."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.api", "docker/Dockerfile.worker"])
def test_images_run_as_a_non_root_user_that_owns_the_volumes(dockerfile):
    steps = _instructions(dockerfile)
    keywords = [k for k, _ in steps]
    users = [args for k, args in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert keywords.index("USER") < keywords.index("CMD")
    runs = " && ".join(args for k, args in steps if k == "RUN")
    assert f"useradd --create-home --uid 10001 {users[-1]}" in runs  # one uid: the images share a volume
    assert re.search(r"mkdir -p [^&]*/models/out [^&]*/models/hf", runs)
    assert f"chown -R {users[-1]} /models" in runs
    # VOLUME discards what later steps do to its folder, so the chown must come first
    chown = max(i for i, (k, args) in enumerate(steps) if k == "RUN" and "chown" in args)
    volumes = [i for i, (k, _) in enumerate(steps) if k == "VOLUME"]
    assert volumes and chown < min(volumes)
    env = " ".join(args for k, args in steps if k == "ENV")
    assert "GEOSHARE_OUT_ROOT=/models/out" in env
    assert "GEOSHARE_READ_ROOTS" not in env and "GEOSHARE_MODEL_MODULES" not in env  # the safe default


def test_compose_gives_api_and_worker_the_same_access_settings(compose, monkeypatch):
    from service.access import AccessRules
    from service.settings import Settings, WorkerSettings

    api, worker = compose["services"]["api"], compose["services"]["worker"]
    names = ("GEOSHARE_READ_ROOTS", "GEOSHARE_OUT_ROOT", "GEOSHARE_MODEL_MODULES")
    assert all(api["environment"][n] == worker["environment"][n] for n in names)
    defaults = {n: _compose_default(worker["environment"][n]) for n in names}
    assert defaults == {"GEOSHARE_READ_ROOTS": "/models", "GEOSHARE_OUT_ROOT": "/models/out",
                        "GEOSHARE_MODEL_MODULES": ""}
    mounts = {s: {v.split(":")[1]: v.split(":")[2:] for v in compose["services"][s]["volumes"]}
              for s in ("api", "worker")}
    assert mounts["worker"]["/models"] == [] and mounts["api"]["/models"] == ["ro"]  # api reads, worker writes
    assert {v.split(":")[0] for v in api["volumes"] if ":/models" in v} == {"models"}
    assert _compose_default(worker["environment"]["HF_HOME"]).startswith("/models/")
    for name, value in defaults.items():
        monkeypatch.setenv(name, value)
    for settings in (Settings(), WorkerSettings()):  # what the containers' settings objects read
        rules = AccessRules.of(settings)
        assert [str(r) for r in rules.read_roots] == ["/models"] and str(rules.out_root) == "/models/out"
        assert rules.model_modules == frozenset()


# --- the multi-GPU worker: torchrun inside the container, every GPU reserved ------------------


def test_compose_multi_gpu_worker(compose):
    """Profile multi-gpu: the worker image under torchrun with one process per visible GPU (the
    command parsed by torchrun's own parser), all GPUs reserved, room in /dev/shm for NCCL, and the
    plain worker's API and access settings."""
    torch_run = pytest.importorskip("torch.distributed.run")
    multi, single = compose["services"]["worker-multi-gpu"], compose["services"]["worker"]
    assert multi["profiles"] == ["multi-gpu"] and "profiles" not in single  # the one-GPU worker stays the default
    assert multi["build"] == single["build"] and multi["image"] == single["image"]
    command = multi["command"]
    assert command[0] == "torchrun"
    args = torch_run.get_args_parser().parse_args(command[1:])
    assert args.standalone and args.nproc_per_node == "gpu" and args.module
    assert [args.training_script, *args.training_script_args] == ["geoshare", "worker"]
    device = multi["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == "all" and device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert re.fullmatch(r"\d+gb", multi["shm_size"])
    env = multi["environment"]
    assert all(env[name] == value for name, value in single["environment"].items())
    assert float(_compose_default(env["GEOSHARE_DIST_TIMEOUT"])) > 0
    assert multi["volumes"] == single["volumes"] and multi["depends_on"] == single["depends_on"]


def test_each_rank_of_a_gpu_worker_takes_its_own_gpu_and_nccl(monkeypatch):
    """What the multi-GPU worker's ranks pick without a GPU here: the NCCL paths can only be run
    where there are GPUs; gloo runs them on CPU in the group-worker tests."""
    torch = pytest.importorskip("torch")
    from hessian_worker.distributed import backend_for
    from service.group_worker import rank_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("auto") == rank_device("cuda") == "cuda:3" and rank_device("cpu") == "cpu"
    assert rank_device("cuda:1") == "cuda:1"  # a device named explicitly is kept
    assert backend_for("cuda:3") == "nccl" and backend_for("cpu") == "gloo"
