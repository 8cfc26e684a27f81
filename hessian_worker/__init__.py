"""Curvature worker: discover shareable layers, predict sharing costs, apply plans.

    from hessian_worker import analyze, AnalyzeConfig, apply_plan, save_shared
    problem = analyze(model, "calib.txt", AnalyzeConfig(backend="projected", rank=8))
    model = load_compressed("out/")  # what `geoshare compress` wrote, loaded tied

Names are imported lazily (PEP 562): the API server imports ``hessian_worker.options`` (the
torch-free configs and enums it shares with the worker) and must not pull in torch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AnalyzeConfig": "hessian_worker.options",
    "Backend": "hessian_worker.options",
    "analyze": "hessian_worker.analysis",
    "predict_plan_loss": "hessian_worker.pair_costs",
    "apply_plan": "hessian_worker.apply",
    "ApplyReport": "hessian_worker.tying",
    "unique_params": "hessian_worker.tying",
    "save_shared": "hessian_worker.io",
    "load_shared": "hessian_worker.io",
    # the compressed model directory (a Hugging Face directory) and its dense export
    "load_compressed": "hessian_worker.io",
    "save_compressed": "hessian_worker.io",
    "export_dense": "hessian_worker.export",
    "evaluate": "hessian_worker.evaluation",
    "EvaluateConfig": "hessian_worker.evaluation",
    "EvaluationReport": "hessian_worker.evaluation",
    "measure_loss": "hessian_worker.measure",
    "heal": "hessian_worker.healing",
    "choose_plan": "hessian_worker.choose",
    "compress": "hessian_worker.pipeline",
    "CompressConfig": "hessian_worker.options",
    "CompressReport": "hessian_worker.pipeline",
    "Choice": "hessian_worker.choose",
    "HealConfig": "hessian_worker.options",
    "HealReport": "hessian_worker.healing",
    "measure_plans": "hessian_worker.measure",
    "Merge": "hessian_worker.options",
    "LayerInfo": "hessian_worker.discovery",
    "Matcher": "hessian_worker.discovery",
    "discover_layers": "hessian_worker.discovery",
    "load_calibration": "hessian_worker.data",
    "Calibration": "hessian_worker.data",
    "load_model": "hessian_worker.models",
    # decoder LLMs streamed block by block (hessian_worker/llm)
    "analyze_checkpoint": "hessian_worker.llm.analyze",
    "KFACOptions": "hessian_worker.options",
    # the basis scheme (shared low-rank bases)
    "BasisOptions": "hessian_worker.options",
    "analyze_basis": "hessian_worker.basis.analysis",
    "rescore_basis_plan": "hessian_worker.basis.analysis",
    "apply_basis_plan": "hessian_worker.basis.apply",
    "save_basis": "hessian_worker.basis.io",
    "load_basis": "hessian_worker.basis.io",
    # the relaxed scheme (one tensor per class plus a low-rank correction per layer)
    "RelaxedOptions": "hessian_worker.options",
    "RelaxedPricing": "hessian_worker.options",
    "analyze_relaxed": "hessian_worker.relaxed.analysis",
    "apply_relaxed_plan": "hessian_worker.relaxed.apply",
    "save_relaxed": "hessian_worker.relaxed.io",
    "load_relaxed": "hessian_worker.relaxed.io",
}

__all__ = [
    "AnalyzeConfig",
    "KFACOptions",
    "analyze_checkpoint",
    "ApplyReport",
    "Backend",
    "Calibration",
    "Choice",
    "CompressConfig",
    "CompressReport",
    "LayerInfo",
    "HealConfig",
    "HealReport",
    "Matcher",
    "Merge",
    "analyze",
    "choose_plan",
    "compress",
    "apply_plan",
    "discover_layers",
    "heal",
    "load_calibration",
    "load_model",
    "load_shared",
    "load_compressed",
    "save_compressed",
    "export_dense",
    "evaluate",
    "EvaluateConfig",
    "EvaluationReport",
    "measure_loss",
    "measure_plans",
    "predict_plan_loss",
    "save_shared",
    "unique_params",
    "BasisOptions",
    "analyze_basis",
    "rescore_basis_plan",
    "apply_basis_plan",
    "save_basis",
    "load_basis",
    "RelaxedOptions",
    "RelaxedPricing",
    "analyze_relaxed",
    "apply_relaxed_plan",
    "save_relaxed",
    "load_relaxed",
]

if TYPE_CHECKING:
    from hessian_worker.analysis import analyze
    from hessian_worker.apply import apply_plan
    from hessian_worker.basis.analysis import analyze_basis, rescore_basis_plan
    from hessian_worker.basis.apply import apply_basis_plan
    from hessian_worker.basis.io import load_basis, save_basis
    from hessian_worker.choose import Choice, choose_plan
    from hessian_worker.data import Calibration, load_calibration
    from hessian_worker.discovery import LayerInfo, Matcher, discover_layers
    from hessian_worker.evaluation import EvaluateConfig, EvaluationReport, evaluate
    from hessian_worker.export import export_dense
    from hessian_worker.healing import HealReport, heal
    from hessian_worker.io import load_compressed, load_shared, save_compressed, save_shared
    from hessian_worker.llm.analyze import analyze_checkpoint
    from hessian_worker.measure import measure_loss, measure_plans
    from hessian_worker.models import load_model
    from hessian_worker.options import (
        AnalyzeConfig,
        Backend,
        BasisOptions,
        CompressConfig,
        HealConfig,
        KFACOptions,
        Merge,
        RelaxedOptions,
        RelaxedPricing,
    )
    from hessian_worker.pair_costs import predict_plan_loss
    from hessian_worker.pipeline import CompressReport, compress
    from hessian_worker.relaxed.analysis import analyze_relaxed
    from hessian_worker.relaxed.apply import apply_relaxed_plan
    from hessian_worker.relaxed.io import load_relaxed, save_relaxed
    from hessian_worker.tying import ApplyReport, unique_params


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hessian_worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
