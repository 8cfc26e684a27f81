"""The compose profile "replicas": Postgres (the official image), two API replicas on it, one port.

Docker cannot run here; these check what the containers would be told: every replica on the same
database through the driver the API image installs, the proxy sending to both on the published
port, and the file valid as a whole (the compose-spec schema is checked where it is vendored).
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy.engine import make_url
from svc_cases import ROOT

yaml = pytest.importorskip("yaml")  # PyYAML (dev extra)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _replicas(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if "replicas" in s.get("profiles", []) and s.get("command", [])[:2] == ["geoshare", "serve"]}


def test_two_replicas_share_one_postgres(compose):
    replicas = _replicas(compose)
    assert len(replicas) == 2
    urls = {s["environment"]["GEOSHARE_DB_URL"] for s in replicas.values()}
    assert len(urls) == 1  # one database, one queue
    url = make_url(urls.pop().replace("${GEOSHARE_PG_PASSWORD:-geoshare}", "pw"))
    assert url.drivername == "postgresql+psycopg" and url.host == "postgres"
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:") and "replicas" in postgres["profiles"]
    assert url.database == postgres["environment"]["POSTGRES_DB"]
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    for name, s in replicas.items():
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "--db" not in s["command"]  # the URL comes from GEOSHARE_DB_URL
        assert "/healthz" in " ".join(s["healthcheck"]["test"])
        assert "ports" not in s  # reached through the proxy only


def test_the_proxy_sends_one_port_to_both_replicas(compose):
    proxy = compose["services"]["proxy"]
    assert "replicas" in proxy["profiles"]
    published = [p for p in proxy["ports"] if p.startswith("127.0.0.1:")]
    assert published == proxy["ports"] and len(published) == 1
    port = published[0].rsplit(":", 1)[1]
    source, target = proxy["volumes"][0].split(":")[:2]
    conf = (ROOT / source).read_text()
    assert target == "/etc/nginx/conf.d/default.conf"
    assert re.search(rf"listen {port};", conf)
    upstream = set(re.findall(r"server (\S+):8000", conf))
    assert upstream == set(_replicas(compose))
    assert {name for name, c in proxy["depends_on"].items() if c["condition"] == "service_healthy"} == upstream
    # long polls and server-sent events outlast nginx's 60 s default
    assert int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1)) > 3600


def test_the_api_image_has_the_postgres_driver():
    api = (ROOT / "docker/Dockerfile.api").read_text()
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', api).group(1).split(",")
    assert "postgres" in extras and "service" in extras
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'postgres = \[\s*"psycopg\[binary\]', pyproject)
