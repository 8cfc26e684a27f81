"""The geoshare CLI end to end, as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from solver.evaluate import violations

from .cases import random_problem


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geoshare", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def problem_file(tmp_path: Path):
    problem = random_problem([6, 5, 4], seed=4, ratio=0.5)
    path = tmp_path / "problem.json"
    path.write_text(problem.model_dump_json())
    return problem, path


def test_solve_prints_plan(problem_file):
    problem, path = problem_file
    out = _run("solve", str(path), "--time-limit", "5")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["status"] == "optimal"
    assert violations(problem, plan["coloring"]) == []


def test_solve_ratio_override_and_output_file(problem_file, tmp_path):
    problem, path = problem_file
    target = tmp_path / "out" / "plan.json"
    out = _run("solve", str(path), "--ratio", "0.8", "-o", str(target))
    assert out.returncode == 0, out.stderr
    plan = json.loads(target.read_text())
    assert plan["params"]["ratio"] <= 0.8 and plan["params"]["ratio"] > 0.5


def test_frontier_json_and_plot(problem_file, tmp_path):
    _, path = problem_file
    png = tmp_path / "frontier.png"
    out = _run("frontier", str(path), "--plot", str(png))
    assert out.returncode == 0, out.stderr
    front = json.loads(out.stdout)
    pts = front["points"]
    assert pts[0]["params"] < pts[-1]["params"] and pts[-1]["ratio"] == 1.0
    assert all(a["objective"] > b["objective"] for a, b in zip(pts, pts[1:], strict=False))
    assert all(p["bound"] <= p["objective"] + 1e-12 for p in pts)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_infeasible_budget_exit_code_and_message(problem_file):
    _, path = problem_file
    out = _run("solve", str(path), "--ratio", "0.01")
    assert out.returncode == 2
    assert "least reachable" in out.stderr and "ratio" in out.stderr


def test_bad_json_is_explained(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"layers": [], "costs": {"matrix": []}}')
    out = _run("solve", str(path))
    assert out.returncode == 2
    assert "layers" in out.stderr and "not a valid SharingProblem" in out.stderr
    out = _run("solve", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_strategy_baseline(problem_file):
    problem, path = problem_file
    out = _run("solve", str(path), "--strategy", "cycle")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["strategy"] == "cycle" and plan["params"]["shared"] <= problem.budget_params()


def test_solve_reads_stdin(problem_file):
    _, path = problem_file
    out = subprocess.run(
        [sys.executable, "-m", "geoshare", "solve", "-"], input=path.read_text(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "optimal"


def test_solve_top_lists_diverse_alternatives(problem_file):
    problem, path = problem_file
    out = _run("solve", str(path), "--top", "5", "--min-distance", "2")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    alts = plan["alternatives"]
    top = [a for a in alts if a["strategy"].startswith("top-")]
    assert [a["strategy"] for a in top] == ["top-2", "top-3", "top-4", "top-5"]
    assert [a["objective"] for a in top] == sorted(a["objective"] for a in top)
    assert all(a["objective"] >= plan["objective"] for a in alts)
    assert {"sequence", "cycle"} <= {a["strategy"] for a in alts}
    assert all(violations(problem, a["coloring"]) == [] for a in alts)


def test_solve_top_zero_is_explained(problem_file):
    _, path = problem_file
    out = _run("solve", str(path), "--top", "0")
    assert out.returncode == 2
    assert "top" in out.stderr


def test_large_seed_solves_from_the_cli(tmp_path):
    """Seeds of 2^31 and more used to crash CP-SAT (a TypeError) on families of 17+ layers."""
    problem = random_problem([17], seed=2, ratio=0.5, time_limit_s=2)
    path = tmp_path / "problem.json"
    path.write_text(problem.model_dump_json())
    out = _run("solve", str(path), "--seed", str(2**31))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["solver"]["seed"] == 2**31


def test_closed_pipe_ends_quietly(tmp_path):
    """`geoshare solve problem.json | head`: the reader leaves early; no BrokenPipe traceback.

    The plan is made larger than a pipe's buffer (64 KiB) so the write really meets the closed pipe.
    """
    n = 40
    layers = [{"name": f"{'x' * 3000}.{i}", "family": f"f{i}", "params": 10, "index": 0} for i in range(n)]
    matrix = [[0.0 if i == j else None for j in range(n)] for i in range(n)]
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"layers": layers, "costs": {"matrix": matrix}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoshare", "solve", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{\n  "versi'  # like head: read a little, then go away
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
