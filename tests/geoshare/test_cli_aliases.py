"""Renamed flags: the new names work, and the old spellings still parse to the same values."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from geoshare.cli import build_parser, main
from geoshare.cli.plans import _config
from tests.solver.cases import random_problem

# (old spelling, new spelling): the same command line before and after the renames
RENAMED = [
    ("solve p.json --workers 2", "solve p.json --cpsat-threads 2"),
    ("frontier p.json --workers 3 -o f.json", "frontier p.json --cpsat-threads 3 -o f.json"),
    ("apply --model m --plan plan.json --out o --holdout 3", "apply --model m --plan plan.json --out o --holdout-samples 3"),
    ("compress --model m --ratio 0.5 --out o --holdout 4 --scheme basis --rank 2",
     "compress --model m --ratio 0.5 --out o --holdout-samples 4 --scheme basis --basis-rank 2"),
    ("export out -o dense", "export out --out dense"),
    ("export out --output dense", "export out --out dense"),
]


@pytest.mark.parametrize(("old", "new"), RENAMED)
def test_old_spellings_parse_to_the_same_arguments(old: str, new: str):
    parser = build_parser()
    assert vars(parser.parse_args(shlex.split(old))) == vars(parser.parse_args(shlex.split(new)))


def test_cpsat_threads_reach_the_solver_config():
    args = build_parser().parse_args(["solve", "p.json", "--workers", "2"])
    assert _config(args).workers == 2


@pytest.fixture
def problem_file(tmp_path: Path) -> Path:
    path = tmp_path / "problem.json"
    path.write_text(random_problem([5, 4], seed=3, ratio=0.6).model_dump_json())
    return path


def test_the_problem_positional_or_flag(problem_file: Path, tmp_path: Path, capsys):
    plans = []
    for i, where in enumerate(([str(problem_file)], ["--problem", str(problem_file)])):
        out = tmp_path / f"plan{i}.json"
        assert main(["solve", *where, "--seed", "1", "--cpsat-threads", "1", "-o", str(out)]) == 0
        plans.append(json.loads(out.read_text()))
    assert plans[0]["coloring"] == plans[1]["coloring"] and plans[0]["status"] == "optimal"
    assert main(["solve", str(problem_file), "--problem", str(problem_file)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["frontier"]) == 2
    assert "--problem FILE" in capsys.readouterr().err


def test_export_takes_the_directory_once(capsys):
    assert main(["export", "a", "--model", "b", "--out", "c"]) == 2
    assert "once" in capsys.readouterr().err


def test_the_recorded_command_uses_the_current_spellings():
    from geoshare.cli.record import command_line

    parser = build_parser()
    args = parser.parse_args(shlex.split("compress --model m --ratio 0.5 --out o --holdout 4 --scheme basis --rank 2"))
    words = shlex.split(command_line(args, parser))
    assert "--holdout-samples" in words and "--basis-rank" in words
    assert "--holdout" not in words and "--rank" not in words
    assert vars(parser.parse_args(words[1:])) == vars(args)
    args = parser.parse_args(shlex.split("analyze --model m -o p.json --rank 3"))  # the old analyze --rank
    assert vars(parser.parse_args(shlex.split(command_line(args, parser))[1:])) == vars(args)
