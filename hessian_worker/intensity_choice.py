"""The layerwise merge's shrinkage intensity chosen by measurement (``shrinkage='held-out'``).

No estimator of ρ measured well on both of the bench's real models (bench/results/
cross_domain_diagnosis.md): on MiniLM, whose 1,536-wide inputs get ~1.8 calibration rows per
dimension, ρ = 0.05-0.1 raises the embedding cosine in the calibration domain (+0.003 to +0.01)
and across domains (+0.03 to +0.07), while Ledoit-Wolf estimates ρ ≈ 0.03 and OAS ≈ 0.19 (which
costs in-domain); on the GPT task model every ρ > 0, even Ledoit-Wolf's ≈ 0.01, raises perplexity
in and across domains. So the pipeline measures it, as it measures plans: the chosen plan is
merged with the covariances of the choice's merge part shrunk by each ρ of a short grid, scored on
the choice's held-out part (the samples its candidates were scored on), and the least loss wins
(ties: the smaller ρ). The grid is short because each point is one forward pass over the held-out
samples and the optimum is broad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hessian_worker.curvature.layerwise import LayerwiseCurvature
from hessian_worker.curvature.shrinkage import shrink
from hessian_worker.data import DataSource
from hessian_worker.measure import measure_plans
from hessian_worker.merge import Merge
from hessian_worker.options import AnalyzeConfig
from solver.schema import SharingPlan

INTENSITIES = (0.0, 0.05, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class IntensityChoice:
    """The ρ of least measured loss and the loss measured at each ρ of the grid."""

    intensity: float
    losses: dict[float, float]


def with_intensity(layerwise: LayerwiseCurvature, rho: float) -> LayerwiseCurvature:
    """Unshrunk covariances shrunk by ``rho`` (Ĝ = (1 − ρ)G + ρ·tr(G)/d·I), the originals untouched.

    Raises:
        ValueError: ``rho`` outside [0, 1], or covariances that were already shrunk (shrinking twice
            would not give the intensity asked for).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"shrinkage intensity {rho} is outside [0, 1]")
    shrunk = {n: r for n, r in layerwise.intensities.items() if r != 0.0}
    if shrunk:
        raise ValueError(f"covariances of {sorted(shrunk)[:3]} are already shrunk (ρ = {next(iter(shrunk.values())):g});"
                         " collect them with shrinkage 'none' or 'held-out' to choose an intensity")
    covs = {n: shrink(g.clone(), rho) for n, g in layerwise.cov.items()}
    return LayerwiseCurvature(covs, layerwise.transposed, dict.fromkeys(covs, rho))


def choose_intensity(model: nn.Module, data: DataSource, plan: SharingPlan, layerwise: LayerwiseCurvature,
                     config: AnalyzeConfig, *, grid: Sequence[float] = INTENSITIES, tokenizer: Any | None = None,
                     **measure: Any) -> IntensityChoice:
    """Measures ``plan`` merged layerwise with ``layerwise`` (unshrunk, fitted on other samples than
    ``data``) shrunk by each ρ of ``grid``, on ``data``; the least loss wins, the smaller ρ on a tie.
    ``measure`` goes on to ``measure_plans`` (problem, covs, diag).

    Raises:
        ValueError: an empty grid, or see ``with_intensity``.
    """
    if not grid:
        raise ValueError("choose_intensity needs at least one intensity in the grid")
    losses = {}
    for rho in grid:
        losses[float(rho)] = measure_plans(model, data, [plan], config, merge=Merge.layerwise, tokenizer=tokenizer,
                                           layerwise=with_intensity(layerwise, float(rho)), **measure)[0]
    best = min(losses, key=lambda r: (losses[r], r))
    return IntensityChoice(best, losses)
