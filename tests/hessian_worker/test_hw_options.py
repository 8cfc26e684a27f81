"""hessian_worker.options: the shared configs and enums import without torch, and every old import
path gives the one definition."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

import hessian_worker.options as options
from hessian_worker.config import torch_dtype

ROOT = Path(__file__).resolve().parents[2]

# (old module, name): each name was defined there before options existed
OLD_PATHS = [
    ("hessian_worker.config", "AnalyzeConfig"),
    ("hessian_worker.config", "Backend"),
    ("hessian_worker.config", "DType"),
    ("hessian_worker.config", "KFACOptions"),
    ("hessian_worker.pipeline", "CompressConfig"),
    ("hessian_worker.healing", "HealConfig"),
    ("hessian_worker.merge", "Merge"),
    ("hessian_worker.losses", "DistillLoss"),
    ("hessian_worker.basis.config", "BasisOptions"),
    ("hessian_worker.basis.config", "SideChoice"),
    ("hessian_worker.basis", "BasisOptions"),
    ("hessian_worker.basis", "SideChoice"),
    ("hessian_worker.curvature", "CurvatureKind"),
    ("hessian_worker.curvature.base", "CurvatureKind"),
    ("hessian_worker.curvature.diagonal", "DiagonalMethod"),
    ("hessian_worker.curvature.kfac", "Approximation"),
    ("hessian_worker.curvature.kfac", "OutputFactor"),
    ("hessian_worker.curvature.projected", "Bulk"),
    ("hessian_worker.curvature.projected", "Eigensolver"),
    ("hessian_worker.curvature.projected", "SketchPrecision"),
    ("hessian_worker.curvature.shrinkage", "Shrinkage"),  # new with options: where it is used
    ("hessian_worker", "AnalyzeConfig"),
    ("hessian_worker", "Backend"),
    ("hessian_worker", "BasisOptions"),
    ("hessian_worker", "CompressConfig"),
    ("hessian_worker", "HealConfig"),
    ("hessian_worker", "KFACOptions"),
    ("hessian_worker", "Merge"),
    ("hessian_worker", "RelaxedOptions"),
    ("hessian_worker", "RelaxedPricing"),  # new with options
]


def test_options_import_without_torch():
    """A fresh interpreter: importing options loads neither torch nor another worker module."""
    code = ("import json, sys, hessian_worker.options; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hessian_worker'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["hessian_worker", "hessian_worker.options"]


@pytest.mark.parametrize(("module", "name"), OLD_PATHS)
def test_old_import_paths_give_the_one_definition(module: str, name: str):
    assert getattr(importlib.import_module(module), name) is getattr(options, name)
    assert getattr(options, name).__module__ == "hessian_worker.options"


def test_every_shared_enum_and_config_is_listed():
    defined = {n for n, v in vars(options).items()
               if isinstance(v, type) and issubclass(v, (Enum, BaseModel)) and v.__module__ == options.__name__}
    assert defined == {n for _, n in OLD_PATHS}


def test_torch_dtype():
    assert torch_dtype(options.DType.auto) is None
    for dtype in options.DType:
        if dtype is not options.DType.auto:
            assert torch_dtype(dtype) is getattr(torch, dtype.value)
