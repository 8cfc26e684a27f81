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
    assert '".[service]"' in api and "torch" not in api.split("RUN", 1)[1].split("\n")[0]
    assert '"geoshare", "serve"' in api
    worker = (ROOT / "docker/Dockerfile.worker").read_text()
    assert re.search(r"pytorch/pytorch:[\w.-]*cuda", worker)
    assert "-c /tmp/torch-constraint.txt" in worker and '".[worker,service]"' in worker
    assert 'CMD ["geoshare", "worker"]' in worker


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_entrypoints_run(command):
    r = subprocess.run([sys.executable, "-m", "solver.cli", command, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"geoshare {command}" in r.stdout


def test_worker_without_api_says_how_to_fix():
    env = {k: v for k, v in os.environ.items() if k != "GEOSHARE_API"}
    r = subprocess.run([sys.executable, "-m", "solver.cli", "worker"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2 and "GEOSHARE_API" in r.stderr


def test_cli_import_is_light():
    code = ("import sys, service.cli; heavy = [m for m in ('fastapi', 'uvicorn', 'sqlalchemy', 'torch', 'httpx') "
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
