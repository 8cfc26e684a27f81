"""One call from model to compressed model: costs, candidates, measured choice, merge, heal.

The product's main path (DESIGN.md): the quadratic cost model ranks plans only roughly, so the
solver's optimum and the pattern strategies at the same budget become candidates, each is
measured on the calibration data, the best is tied into the model (optionally with a curvature
merge and healing), and the held-out loss change is reported beside the predicted one.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hessian_worker.analysis import analyze
from hessian_worker.apply import apply_plan
from hessian_worker.choose import choose_plan
from hessian_worker.config import AnalyzeConfig, Backend
from hessian_worker.data import Calibration, load_calibration
from hessian_worker.healing import HealConfig, HealReport, heal
from hessian_worker.losses import DistillLoss
from hessian_worker.measure import measure_loss
from hessian_worker.merge import Merge
from solver.candidates import candidate_plans
from solver.planning import SolveConfig
from solver.schema import SharingPlan


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(gt=0, le=1, description="Share of the shareable parameters to keep.")
    backend: Backend = Backend.exact
    merge: Merge = Merge.mean
    distill: DistillLoss = Field(DistillLoss.auto, description="cosine suits sentence-embedding models.")
    heal_steps: int = Field(0, ge=0)
    heal_lr: float = Field(5e-5, gt=0)
    holdout: int | None = Field(None, ge=1, description="Samples held out for the measured figure (default: a quarter).")
    samples: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    time_limit_s: float = Field(10.0, gt=0)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    progress: bool = True


class Candidate(BaseModel):
    strategy: str
    predicted: float
    measured: float


class CompressReport(BaseModel):
    plan: SharingPlan
    chosen: str
    candidates: list[Candidate]
    unique_params: int
    params_ratio: float
    predicted_loss_change: float
    measured_loss_change: float | None = Field(description="On the held-out samples, after healing if any.")
    heal: HealReport | None = None


def compress(model: nn.Module, data: Any, config: CompressConfig, *, tokenizer: Any | None = None) -> CompressReport:
    """Compresses ``model`` in place to ``config.ratio`` of its shareable parameters.

    Raises:
        BudgetInfeasible, DataError, DiscoveryError: with the fix in the message.
    """
    acfg = AnalyzeConfig(backend=config.backend, samples=config.samples, batch_size=config.batch_size,
                         seed=config.seed, distill=config.distill, device=config.device, progress=config.progress)
    calib = load_calibration(data, tokenizer=tokenizer, samples=config.samples, batch_size=config.batch_size, seed=config.seed)
    fit, held = _split(calib, config)
    problem = analyze(model, fit, acfg, tokenizer=tokenizer)
    pool = candidate_plans(problem, SolveConfig(max_params_ratio=config.ratio, time_limit_s=config.time_limit_s, seed=config.seed))
    choice = choose_plan(model, fit, pool, acfg.model_copy(update={"progress": False}), merge=config.merge, tokenizer=tokenizer)
    reference = copy.deepcopy(model)
    report = apply_plan(model, choice.plan, config.merge, data=fit, config=acfg)
    healed = None
    if config.heal_steps:
        healed = heal(model, reference, fit, HealConfig(steps=config.heal_steps, lr=config.heal_lr, seed=config.seed,
                                                       batch_size=config.batch_size, device=config.device,
                                                       distill=config.distill,
                                                       progress=config.progress), tokenizer=tokenizer)
    measured = measure_loss(model, reference, held, acfg.model_copy(update={"progress": False})) if held is not None else None
    return CompressReport(
        plan=choice.plan,
        chosen=choice.plan.strategy or "optimum",
        candidates=[Candidate(strategy=p.strategy or "optimum", predicted=p.objective, measured=m) for p, m in zip(pool, choice.measured, strict=True)],
        unique_params=report.unique_params_after,
        params_ratio=choice.plan.params.ratio if choice.plan.params else 1.0,
        predicted_loss_change=choice.plan.objective,
        measured_loss_change=measured,
        heal=healed,
    )


def _split(calib: Calibration, config: CompressConfig) -> tuple[Calibration, Calibration | None]:
    n = calib.num_samples
    if n < 4:
        return calib, None
    return calib.split(config.holdout or max(1, n // 4), seed=config.seed, batch_size=config.batch_size)
