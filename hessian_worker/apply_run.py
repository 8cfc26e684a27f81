"""``apply_and_save``: one solved plan into a model, end to end (what ``geoshare apply`` runs).

It predicts the plan's loss change, ties the plan in (or installs its bases), optionally heals,
measures the loss change on held-out samples against an untouched copy, and saves the directory
``load_compressed`` reads. ``compress`` chooses its plan by measuring many; this verb takes one
plan as given, solved elsewhere (``geoshare solve``, the service).

Nothing heavy is imported at module level, so the configuration can be built without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hessian_worker.options import DType, HealConfig, Merge
from solver.schema import Scheme, SharingPlan, SharingProblem


class ApplyRunConfig(BaseModel):
    """How ``apply_and_save`` merges, heals and measures.

    ``merge`` None picks compress's rule (``merge_rule.default_merge``: layerwise when the data
    pins the input covariances down, else curvature; mean without data). The default stays
    ``mean``: a plan applied without ``merge`` has always been mean-merged, and saved models must
    not change under the same command.
    """

    model_config = ConfigDict(extra="forbid")

    merge: Merge | None = Field(Merge.mean, description="Shared value of a class; None: compress's default rule.")
    holdout: int | None = Field(None, ge=0, description="Samples held out for the measured loss change "
                                "(None or 0: half of them, as the CLI always read 0).")
    heal_steps: int = Field(0, ge=0, description="Self-distillation steps after tying (ties kept; 0: none).")
    heal_lr: float = Field(HealConfig.model_fields["lr"].default, gt=0)
    heal_holdout: float = Field(HealConfig.model_fields["holdout"].default, ge=0, lt=1,
                                description="Share of the healing samples kept out to keep the best step.")
    output_weighting: bool = Field(True, description="basis and relaxed plans: whiten as the problem was analyzed.")
    samples: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str = "auto"
    dtype: DType = DType.float32
    progress: bool = True


@dataclass(frozen=True)
class AppliedPlan:
    """What ``apply_and_save`` did: the apply report (a tying.ApplyReport or its basis subclass),
    the predicted and measured loss changes, healing's report and where the model went (as given)."""

    apply: Any
    predicted_loss_change: float | None
    measured_loss_change: float | None
    heal: dict[str, Any] | None
    out: str

    def to_json(self) -> dict[str, Any]:
        """The report ``geoshare apply`` prints: the apply report's fields and the figures beside them."""
        doc = self.apply.model_dump(mode="json")
        doc.update({"predicted_loss_change": self.predicted_loss_change,
                    "measured_loss_change": self.measured_loss_change, "heal": self.heal, "out": self.out})
        return doc


def apply_and_save(model_spec: str, plan: SharingPlan, out: str | Path, *, problem: SharingProblem | None = None,
                   data: Any = None, config: ApplyRunConfig | None = None) -> AppliedPlan:
    """Loads ``model_spec``, applies ``plan``, heals, measures and saves it to ``out``.

    ``problem`` is the plan's SharingProblem: needed for basis plans (ranks, sides); a tie plan
    may go without. ``data`` is a calibration source (a file, a tensor, texts); without it, a
    model with a tokenizer is measured on the built-in sentences, one without is neither
    predicted nor measured. The model is predicted on one part of the data and measured on the
    other (``holdout``).

    Raises:
        ValueError: a plan solved under another scheme without its problem, a data-hungry merge or
            healing without data, a bad holdout.
        GeoShareError: from loading the model or data, or from applying the plan.
    """
    import copy

    from hessian_worker.apply import apply_plan
    from hessian_worker.data import DEFAULT_SENTENCES, load_calibration
    from hessian_worker.io import save_shared
    from hessian_worker.measure import measure_loss
    from hessian_worker.models import load_model
    from hessian_worker.options import AnalyzeConfig
    from hessian_worker.pair_costs import predict_plan_loss
    from hessian_worker.schemes import scheme_of

    config = config or ApplyRunConfig()
    scheme = scheme_of(problem).name
    basis = scheme is not Scheme.tie  # a scheme with its own modules: basis or relaxed
    analyze_config = AnalyzeConfig(samples=config.samples, batch_size=config.batch_size, seed=config.seed,
                                   device=config.device, dtype=config.dtype, progress=config.progress,
                                   scheme=scheme, basis={"output_weighting": config.output_weighting},
                                   relaxed={"output_weighting": config.output_weighting})
    loaded = load_model(model_spec)
    model = loaded.model
    if problem is None:
        check_tie_accounting(model, plan)
    predicted = measured = None
    fit = held = None
    if data is not None or loaded.tokenizer is not None:
        source = data if data is not None else DEFAULT_SENTENCES
        calib = load_calibration(source, tokenizer=loaded.tokenizer, samples=config.samples,
                                 batch_size=config.batch_size, seed=config.seed)
        n = calib.num_samples
        if n >= 2:
            fit, held = calib.split(config.holdout or n // 2, seed=config.seed, batch_size=config.batch_size)
        else:
            fit = held = calib
    merge = config.merge if config.merge is not None else _default_merge(model, plan, fit)
    if fit is not None and not basis:
        predicted = predict_plan_loss(model, fit, plan, analyze_config, merge=merge)
    elif merge in (Merge.curvature, Merge.layerwise) and fit is None:
        raise ValueError(f"merge {merge.value} needs calibration data: pass --data")
    reference = copy.deepcopy(model)
    report = apply_plan(model, plan, merge, data=fit, config=analyze_config, problem=problem)
    if basis:  # the exact whitened error of the installed classes (a predicted loss change when output-weighted)
        predicted = getattr(report, "whitened_error", None)
    healed = None
    if config.heal_steps > 0:
        from hessian_worker.healing import heal

        if fit is None:
            raise ValueError("healing needs calibration data: pass --data")
        heal_config = HealConfig(steps=config.heal_steps, lr=config.heal_lr, holdout=config.heal_holdout,
                                 seed=config.seed, batch_size=config.batch_size, device=config.device,
                                 progress=config.progress)
        healed = heal(model, reference, fit, heal_config).model_dump()
    if held is not None:
        measured = measure_loss(model, reference, held, analyze_config)
    save_shared(model, plan, out, source=model_spec)
    return AppliedPlan(apply=report, predicted_loss_change=predicted, measured_loss_change=measured, heal=healed,
                       out=str(out))


def _default_merge(model: Any, plan: SharingPlan, fit: Any) -> Merge:
    """compress's rule on the plan's tied layers (``merge_rule.default_merge``); mean without data."""
    if fit is None:
        return Merge.mean
    from hessian_worker.merge_rule import default_merge

    tied = [name for group in plan.groups if len(group) > 1 for name in group]
    return default_merge(model, fit, tied) if tied else Merge.mean


def check_tie_accounting(model: Any, plan: SharingPlan) -> None:
    """Refuses a plan whose ``params.shared`` is not what tying its classes keeps: such a plan was
    solved under another scheme (a basis problem) and would be applied wrongly without it.

    Raises:
        ValueError: the counts differ; the message names the fix (--problem).
    """
    if plan.params is None:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    classes = [list(g) for g in plan.groups if g]
    listed = {n for g in classes for n in g}
    extra: dict[int, list[str]] = {}
    for name, color in plan.coloring.items():
        if name not in listed:
            extra.setdefault(color, []).append(name)
    classes += list(extra.values())
    if any(n not in params for g in classes for n in g):
        return  # apply_plan names the unknown parameters
    tied = sum(params[g[0]].numel() for g in classes)
    if tied != plan.params.shared:
        raise ValueError(
            f"the plan keeps params.shared={plan.params.shared}, but tying its classes keeps {tied}: "
            "it was solved from a problem with another sharing scheme (basis?); pass that problem "
            "with --problem problem.json"
        )
