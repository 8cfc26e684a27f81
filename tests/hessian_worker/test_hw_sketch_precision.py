"""The Nyström sketch's HVPs in bfloat16: the same curvature to bfloat16's rounding, and the rules
for when it applies."""

from __future__ import annotations

import pytest
import torch
from hw_cases import bert_data, random_params, tiny_bert

from hessian_worker.config import AnalyzeConfig
from hessian_worker.curvature.base import CurvatureKind
from hessian_worker.curvature.projected import (
    Eigensolver,
    ProjectedCurvature,
    SketchPrecision,
    native_bfloat16,
    sketch_dtype,
)
from hessian_worker.discovery import discover_layers
from hessian_worker.objective import Objective


def _bert_obj() -> Objective:
    model = tiny_bert().float()
    return Objective(model, bert_data().to("cpu", torch.float32), [x.name for x in discover_layers(model)])


def test_bfloat16_sketch_matches_the_model_precision_sketch() -> None:
    obj = _bert_obj()
    runs = {p: ProjectedCurvature(obj, rank=6, generator=torch.Generator().manual_seed(0), precision=p)
            for p in (SketchPrecision.model, SketchPrecision.bfloat16)}
    full, low = runs[SketchPrecision.model], runs[SketchPrecision.bfloat16]
    assert (full.sketch_dtype, low.sketch_dtype) == (torch.float32, torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in low.blocks.values())  # only the products ran in bfloat16
    torch.testing.assert_close(low.eigenvalues[:3], full.eigenvalues[:3], rtol=0.03, atol=0.0)
    deltas = {k: v.float() for k, v in random_params(obj, 6).items()}
    torch.testing.assert_close(low.quad(deltas), full.quad(deltas), rtol=0.03, atol=0.0)
    # the objective's own model is untouched (the sketch used a bfloat16 copy)
    assert all(p.dtype == torch.float32 for p in obj.model.parameters())


def test_auto_precision_is_bfloat16_only_where_native_and_for_float32_models() -> None:
    cpu = torch.device("cpu")
    assert sketch_dtype(SketchPrecision.auto, torch.float64, cpu) == torch.float64
    expected = torch.bfloat16 if native_bfloat16(cpu) else torch.float32
    assert sketch_dtype(SketchPrecision.auto, torch.float32, cpu) == expected
    assert sketch_dtype(SketchPrecision.model, torch.float32, cpu) == torch.float32
    assert sketch_dtype(SketchPrecision.bfloat16, torch.float64, cpu) == torch.bfloat16


def test_bfloat16_is_refused_off_the_nystrom_sketch() -> None:
    with pytest.raises(ValueError, match="sketch_precision='bfloat16'"):
        AnalyzeConfig(backend="projected", eigensolver="lanczos", sketch_precision="bfloat16")
    with pytest.raises(ValueError, match="sketch_precision='bfloat16'"):
        AnalyzeConfig(backend="projected", curvature="hessian", sketch_precision="bfloat16")
    with pytest.raises(ValueError, match="Nyström sketch"):
        ProjectedCurvature(_bert_obj(), rank=2, generator=torch.Generator().manual_seed(0),
                           kind=CurvatureKind.ggn, eigensolver=Eigensolver.lanczos, precision=SketchPrecision.bfloat16)
    # auto with Lanczos keeps the model's precision
    lanczos = ProjectedCurvature(_bert_obj(), rank=2, generator=torch.Generator().manual_seed(0),
                                 eigensolver=Eigensolver.lanczos, precision=SketchPrecision.auto, probes=4)
    assert lanczos.sketch_dtype == torch.float32
