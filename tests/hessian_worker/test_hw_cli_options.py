"""The ``analyze``, ``compress`` and ``apply`` flags cannot drift from their configs
(AnalyzeConfig, CompressConfig, hessian_worker.apply_run.ApplyRunConfig).

Every flag is a config field (same name, or renamed below), or one of the CLI's own; an enum
flag's choices are its field's enum values, in order (plus ``auto`` where the field's None means
the default rule); a flag's default is its field's; and the handlers pass every flag's value into
the config they build (the pipeline faked, nothing runs). Old spellings kept as hidden aliases
(``analyze --rank``) are checked on their own at the end.
"""

from __future__ import annotations

import argparse
from enum import Enum
from types import NoneType, SimpleNamespace
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import hessian_worker
import hessian_worker.apply_run
import hessian_worker.models
import hessian_worker.pipeline
import solver.io
from geoshare.cli import add_model_commands as add_commands
from geoshare.cli import main
from hessian_worker.apply_run import ApplyRunConfig
from hessian_worker.options import AnalyzeConfig, CompressConfig, Shrinkage

CONFIGS: dict[str, type[BaseModel]] = {"analyze": AnalyzeConfig, "compress": CompressConfig,
                                       "apply": ApplyRunConfig}

# flags whose field has another name: dest -> field path (dots: a nested config; "!": the flag
# negates a bool field)
KFAC = {"kfac_rank": "kfac.rank", "kfac_oversample": "kfac.oversample",
        "kfac_gradient_samples": "kfac.gradient_samples", "kfac_output": "kfac.output"}
RENAMED: dict[str, dict[str, str]] = {
    "analyze": {**KFAC, "ratio": "max_params_ratio", "quiet": "!progress", "rank_ratio": "basis.rank_ratio",
                "side": "basis.side", "no_output_weighting": "!basis.output_weighting", "sketch_rank": "rank",
                "basis_rank": "basis.rank", "correction_rank": "relaxed.rank",
                "relaxed_pricing": "relaxed.pricing"},
    "compress": {**KFAC, "heal": "heal_steps", "no_heal_choice": "!heal_choice", "time_limit": "time_limit_s",
                 "quiet": "!progress", "no_output_weighting": "!output_weighting", "holdout_samples": "holdout",
                 "basis_rank": "rank", "predict": "predict", "no_refit": "!refit", "no_relaxed_bases": "!relaxed_bases"},
    "apply": {"heal": "heal_steps", "quiet": "!progress", "no_output_weighting": "!output_weighting",
              "holdout_samples": "holdout"},
}
# flags whose choices add "auto" for the field's None (the rule the pipeline applies)
AUTO_IS_NONE = {("compress", "merge"), ("apply", "merge")}
# flags whose field is an enum or a number (their type parses both): dest -> the enum
ENUM_OR_NUMBER = {"shrinkage": Shrinkage}
# the CLI's own flags: inputs, outputs, the streamed path's cache and memory limit
CLI_ONLY: dict[str, set[str]] = {
    "analyze": {"help", "model", "data", "output", "stats_cache", "no_stats_cache"},
    "compress": {"help", "model", "data", "out", "stats_cache", "no_stats_cache", "memory_limit_gb"},
    "apply": {"help", "model", "data", "out", "plan", "problem"},
}
# AnalyzeConfig fields with no flag (the Python API's); every CompressConfig field has one but the
# relaxed scheme's nested options (its flags fill correction_rank, output_weighting, relaxed.rank_ratio)
NO_FLAG: dict[str, set[str]] = {
    "analyze": {"distill", "families", "max_length", "lanczos_iters", "diagonal_method", "chunk",
                "layerwise_damping"},
    "compress": {"relaxed"},
    "apply": set(),
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_commands(sub)
    return sub.choices


def _field(config: type[BaseModel], path: str) -> FieldInfo:
    *outer, last = path.split(".")
    for name in outer:
        config = config.model_fields[name].annotation
    return config.model_fields[last]


def _types(info: FieldInfo) -> set[Any]:
    return set(get_args(info.annotation) or [info.annotation]) - {NoneType}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _flags(command: str) -> list[tuple[argparse.Action, str | None]]:
    """(action, field path) of every flag of ``command``; None for the CLI's own."""
    out = []
    for action in _subparsers()[command]._actions:
        dest = action.dest
        if action.help == argparse.SUPPRESS:  # an old spelling with its own meaning: checked below
            continue
        if dest in CLI_ONLY[command]:
            out.append((action, None))
        else:
            out.append((action, RENAMED[command].get(dest, dest)))
    return out


@pytest.mark.parametrize("command", CONFIGS)
def test_every_flag_is_a_config_field(command: str):
    config = CONFIGS[command]
    reached = set()
    for action, path in _flags(command):
        if path is None:
            continue
        negated = path.startswith("!")
        path = path.removeprefix("!")
        top = path.split(".")[0]
        assert top in config.model_fields, f"--{action.dest}: no {config.__name__} field {path!r}; rename or list it"
        reached.add(top)
        info = _field(config, path)
        types = _types(info)
        (enum,) = [t for t in types if isinstance(t, type) and issubclass(t, Enum)] or [None]
        auto = (command, action.dest) in AUTO_IS_NONE
        if auto:  # "auto" stands for None; apply's default stays mean (ApplyRunConfig's too)
            assert action.choices[0] == "auto" and NoneType in get_args(info.annotation), action.dest
            assert (action.default == "auto") == (info.default is None), action.dest
        if action.dest in ENUM_OR_NUMBER:
            assert enum is ENUM_OR_NUMBER[action.dest] and action.choices is None, action.dest
            assert [action.type(m.value) for m in enum] == list(enum) and action.type("0.5") == 0.5, action.dest
        elif action.choices is not None:
            choices = tuple(action.choices)[1:] if auto else tuple(action.choices)
            # a Literal beside the enum adds its values (compress --scheme auto)
            extra = tuple(v for t in types if get_origin(t) is Literal for v in get_args(t))
            assert enum is not None and choices == (*(m.value for m in enum), *extra), action.dest
        else:
            assert enum is None, f"--{action.dest}: {enum} without choices"
        if negated:
            assert types == {bool} and action.default is False and info.default is True, action.dest
        elif action.type is not None and action.dest not in ENUM_OR_NUMBER:
            assert action.type in types, (action.dest, action.type, types)
        if action.default not in (None, "auto") and not negated:  # None: the handler decides
            default = info.get_default(call_default_factory=True)
            assert action.default == _plain(default), (action.dest, action.default, default)
    assert set(config.model_fields) - reached == NO_FLAG[command]


class _Captured(Exception):
    """Raised by the faked pipeline with the config the handler built."""


def _capture(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pipeline(model: Any, data: Any, config: BaseModel, **kwargs: Any) -> None:
        raise _Captured(config)

    monkeypatch.setattr(hessian_worker.models, "load_model",
                        lambda spec: SimpleNamespace(model=SimpleNamespace(double=lambda: None), tokenizer=None))
    monkeypatch.setattr(hessian_worker, "analyze", fake_pipeline)
    monkeypatch.setattr(hessian_worker.pipeline, "compress", fake_pipeline)

    def fake_apply(model: Any, plan: Any, out: Any, *, config: BaseModel, **kwargs: Any) -> None:
        raise _Captured(config)

    monkeypatch.setattr(hessian_worker.apply_run, "apply_and_save", fake_apply)
    monkeypatch.setattr(solver.io, "load_plan", lambda path: None)
    monkeypatch.setattr(solver.io, "load_problem", lambda path: None)


def _run(command: str, argv: list[str]) -> tuple[BaseModel, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args([command, *argv])
    with pytest.raises(_Captured) as caught:
        main([command, *argv])
    return caught.value.args[0], args


def _given(config: BaseModel, args: argparse.Namespace, command: str, skip: frozenset[str] = frozenset()) -> set[str]:
    """Checks that every flag given a value other than its default has it in ``config``; returns them."""
    checked = set()
    for action, path in _flags(command):
        if path is None or action.dest in skip:
            continue
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        negated = path.startswith("!")
        got: Any = config
        for name in path.removeprefix("!").split("."):
            got = getattr(got, name)
        assert _plain(got) == ((not value) if negated else value), (action.dest, got, value)
        checked.add(action.dest)
    return checked


def _config_flags(command: str) -> set[str]:
    return {action.dest for action, path in _flags(command) if path is not None}


COMMON = ["--model", "pkg:factory", "--data", "calib.pt", "--samples", "9", "--batch-size", "3", "--seed", "4",
          "--device", "cpu", "--dtype", "float64", "--quiet",
          "--kfac-rank", "5", "--kfac-oversample", "6", "--kfac-gradient-samples", "7", "--kfac-output", "identity"]


def test_compress_passes_every_flag(monkeypatch: pytest.MonkeyPatch, tmp_path):
    _capture(monkeypatch)
    head = [*COMMON, "--ratio", "0.3", "--out", str(tmp_path), "--memory-limit-gb", "3"]
    runs = [
        [*head, "--backend", "diagonal", "--merge", "mean", "--top", "3", "--min-distance", "2",
         "--normalized-top", "4", "--per-pattern", "1", "--curvature-samples", "5", "--distill", "cosine",
         "--heal", "2", "--heal-lr", "0.001", "--heal-holdout", "0.3", "--heal-shortlist", "1", "--no-heal-choice",
         "--choice-holdout", "0.25", "--holdout-samples", "3", "--time-limit", "2.5", "--shrinkage", "0.3"],
        [*head, "--scheme", "basis", "--basis-rank", "2", "--side", "in", "--no-output-weighting", "--no-refit"],
        [*head, "--scheme", "basis", "--rank-ratio", "0.5"],
        [*head, "--scheme", "auto", "--rank-ratio", "0.5", "--predict"],
        [*head, "--scheme", "relaxed", "--correction-rank", "3", "--relaxed-pricing", "exact", "--no-relaxed-bases"],
    ]
    checked = set()
    for argv in runs:
        config, args = _run("compress", argv)
        checked |= _given(config, args, "compress")
    assert checked == _config_flags("compress")


def test_analyze_passes_every_flag(monkeypatch: pytest.MonkeyPatch, tmp_path):
    _capture(monkeypatch)
    head = [*COMMON, "-o", str(tmp_path / "problem.json"), "--memory-limit-gb", "2"]
    runs = [
        [*head, "--backend", "projected", "--kind", "assignment", "--curvature", "hessian", "--ratio", "0.4",
         "--sketch-rank", "3", "--probes", "5", "--eigensolver", "lanczos", "--oversample", "2",
         "--sketch-precision", "model", "--bulk", "isotropic", "--targets", "a", "--targets", "b", "--ignore", "c",
         "--shrinkage", "oas"],
        [*head, "--scheme", "basis", "--rank-ratio", "0.5", "--side", "in", "--no-output-weighting"],
        [*head, "--scheme", "basis", "--basis-rank", "2"],
        [*head, "--scheme", "relaxed", "--correction-rank", "3", "--relaxed-pricing", "exact"],
    ]
    checked = set()
    for argv in runs:
        config, args = _run("analyze", argv)
        checked |= _given(config, args, "analyze")
    assert checked == _config_flags("analyze")
    # relaxed: --rank-ratio and --no-output-weighting go to the relaxed options
    config, args = _run("analyze", [*head, "--scheme", "relaxed", "--rank-ratio", "0.1", "--no-output-weighting"])
    assert config.relaxed.rank_ratio == 0.1 and not config.relaxed.output_weighting and config.relaxed.rank is None
    config, args = _run("compress", [*COMMON, "--ratio", "0.3", "--out", str(tmp_path), "--scheme", "relaxed",
                                     "--rank-ratio", "0.1", "--no-output-weighting"])
    relaxed = config.analyze_config("float32").relaxed
    assert relaxed.rank_ratio == 0.1 and not relaxed.output_weighting
    assert config.analyze_config("float32").max_params_ratio == 0.3
    # with --scheme basis the basis rank leaves AnalyzeConfig.rank (the sketch's) at its default
    config, args = _run("analyze", [*head, "--scheme", "basis", "--basis-rank", "2"])
    assert config.basis.rank == 2 and config.rank == AnalyzeConfig.model_fields["rank"].default


def test_old_spellings_still_set_the_same_fields(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys):
    """Scripts written before the renames keep working: analyze --rank (the sketch rank, or with
    --scheme basis the basis rank), compress --rank and --holdout, and --merge auto = the default."""
    _capture(monkeypatch)
    head = [*COMMON, "-o", str(tmp_path / "problem.json")]
    config, _ = _run("analyze", [*head, "--backend", "projected", "--rank", "3"])
    assert config.rank == 3 and config.basis.rank is None
    config, _ = _run("analyze", [*head, "--scheme", "basis", "--rank", "2"])
    assert config.basis.rank == 2 and config.rank == AnalyzeConfig.model_fields["rank"].default
    assert main(["analyze", *head, "--sketch-rank", "3", "--rank", "4"]) == 2  # the same flag twice
    assert "--rank is the old spelling of --sketch-rank" in capsys.readouterr().err
    compress = [*COMMON, "--ratio", "0.3", "--out", str(tmp_path)]
    old, _ = _run("compress", [*compress, "--scheme", "basis", "--rank", "2", "--holdout", "3"])
    new, _ = _run("compress", [*compress, "--scheme", "basis", "--basis-rank", "2", "--holdout-samples", "3"])
    assert old == new and (old.rank, old.holdout) == (2, 3)
    auto, _ = _run("compress", [*compress, "--merge", "auto"])
    default, _ = _run("compress", compress)
    assert auto == default and auto.merge is None


def test_apply_passes_every_flag(monkeypatch: pytest.MonkeyPatch, tmp_path):
    _capture(monkeypatch)
    head = [*COMMON[:15], "--plan", "plan.json", "--out", str(tmp_path)]
    argv = [*head, "--merge", "curvature", "--holdout-samples", "3", "--heal", "2", "--heal-lr", "0.001",
            "--heal-holdout", "0.3", "--no-output-weighting"]
    config, args = _run("apply", argv)
    assert _given(config, args, "apply") == _config_flags("apply")
    config, _ = _run("apply", [*head, "--merge", "auto"])
    assert config.merge is None  # compress's rule
    config, _ = _run("apply", head)
    assert config.merge == "mean" and config.holdout is None
