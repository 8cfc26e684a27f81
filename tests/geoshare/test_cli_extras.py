"""``geoshare solve`` runs on the base install; a command whose optional part is missing says
which extra to install instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.solver.cases import random_problem

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "sqlalchemy", "httpx", "starlette")


def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_solve_imports_neither_torch_nor_fastapi(tmp_path: Path):
    path = tmp_path / "problem.json"
    path.write_text(random_problem([5, 4], seed=1, ratio=0.6).model_dump_json())
    code = ("import json, sys; from geoshare.cli import main; code = main(sys.argv[1:]); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr); sys.exit(code)")
    out = _python(code, "solve", str(path), "--time-limit", "2", "-o", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []
    assert json.loads((tmp_path / "plan.json").read_text())["status"] in ("optimal", "feasible")


# a fresh interpreter in which these modules cannot be imported, as on an install without the extra
BLOCK = "import sys\nfor name in {blocked!r}: sys.modules[name] = None\nfrom geoshare.cli import main\nsys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    (("torch",), ["analyze", "--model", "minilm", "-o", "p.json"], "worker"),
    (("torch",), ["compress", "--model", "minilm", "--ratio", "0.8", "--out", "out"], "worker"),
    (("torch",), ["export", "out", "--out", "dense"], "worker"),
    (("fastapi", "uvicorn"), ["serve", "--port", "1"], "service"),
    (("httpx",), ["worker", "--api", "http://127.0.0.1:1"], "service,worker"),
])
def test_a_missing_extra_names_the_install_line(tmp_path: Path, blocked, argv, extra):
    out = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked), *argv], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"pip install 'geo-sharing[{extra}]'" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert blocked[0] in out.stderr
    assert not list(tmp_path.iterdir())  # refused before any work


def test_a_missing_module_below_the_check_is_named_too(monkeypatch, capsys):
    """A module of an extra that the up-front check does not look for (transformers, imported deep
    in a handler) still comes out as that extra's install line, not a traceback."""
    import argparse

    import geoshare.cli
    from geoshare.cli.extras import extra_of

    assert extra_of("transformers.models.bert") == "worker" and extra_of("numpy") is None

    def needs_transformers(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    parser = geoshare.cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub.choices["frontier"].set_defaults(func=needs_transformers)
    monkeypatch.setattr(geoshare.cli, "build_parser", lambda: parser)
    assert geoshare.cli.main(["frontier", "p.json"]) == 2
    err = capsys.readouterr().err
    assert "transformers" in err and "pip install 'geo-sharing[worker]'" in err
