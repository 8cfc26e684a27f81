"""Compress settings of an analysis job, and the report a worker hands back (no torch here).

An analysis with a ``compress`` object runs the whole chain on the worker (costs, candidate plans,
measured choice, merge, healing, save), the same as ``hessian_worker.compress`` in one Python call.
The fields are ``hessian_worker.options.CompressConfig``'s, with its enums (that module is
torch-free, so the API imports it), each optional here (null: the pipeline's default) and some
with tighter bounds; tests check that every field is CompressConfig's, with the same type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from hessian_worker.options import (
    CompressConfig,
    DistillLoss,
    Merge,
    RelaxedPricing,
    ShrinkageSetting,
    SideChoice,
)
from solver import SharingPlan, SharingProblem
from solver.schema import Scheme

if TYPE_CHECKING:
    from service.models import AnalysisSpec


class CompressSpec(BaseModel):
    """Turns an analysis into a compression: the worker also ties, heals and saves the model.

    Settings left out (null) take hessian_worker.CompressConfig's defaults on the worker, so the
    API never drifts from the pipeline it drives.
    """

    model_config = ConfigDict(extra="forbid")

    out: str = Field(
        min_length=1,
        max_length=4096,
        description="Directory on the worker (or a shared volume) for model.safetensors, plan.json "
        "and report.json; created if missing. It must lie below the out root (GEOSHARE_OUT_ROOT); a "
        "relative path is taken inside it.",
    )
    overwrite: bool = Field(
        False,
        description="Allow a non-empty `out`: its model.safetensors, plan.json and report.json are "
        "replaced, other files stay. Without it the job fails before any work is done.",
    )
    top: int | None = Field(
        None, ge=1, le=1000, description="Best plans by the cost model measured as candidates."
    )
    min_distance: int | None = Field(
        None, ge=1, le=100_000, description="Sharing pairs each top plan differs from better ones."
    )
    per_pattern: int | None = Field(
        None, ge=0, le=100, description="Budget-filling allocations measured per pattern strategy."
    )
    normalized_top: int | None = Field(
        None, ge=0, le=1000, description="Best plans by size-normalized pair costs, also measured."
    )
    merge: Merge | None = Field(
        None,
        description="Shared value of a class (default: layerwise when the data gives full-rank input covariances, else curvature).",
    )
    distill: DistillLoss | None = Field(None, description="cosine suits sentence-embedding models.")
    heal_steps: int | None = Field(
        None, ge=0, le=1_000_000, description="Self-distillation steps after tying (0: none)."
    )
    heal_lr: float | None = Field(None, gt=0, le=1)
    heal_holdout: float | None = Field(
        None, ge=0, lt=1, description="With heal_steps: share of the healing samples kept out of training, to keep "
        "the best step (step 0 included; 0.2; 0: heal on all, keep the last step).",
    )
    heal_choice: bool | None = Field(
        None, description="With heal_steps: heal a shortlist and keep the least loss after healing (default true)."
    )
    heal_shortlist: int | None = Field(
        None, ge=0, le=100, description="Best zero-shot candidates healed in the choice, besides the best of each "
        "pattern (tie) or form of sharing (relaxed, basis) (2)."
    )
    choice_holdout: float | None = Field(
        None, ge=0, lt=1, description="Layerwise merge: share of the choice samples candidates are scored on, kept "
        "out of the covariances they are merged with (0.5; 0: score on all).",
    )
    refit: bool | None = Field(
        None, description="basis and relaxed: fit the chosen plan on every sample not held out (default true); "
        "false: install the fit the choice measured (on the curvature part).",
    )
    holdout: int | None = Field(
        None, ge=1, description="Samples held out for the measured figure (default: a quarter)."
    )
    curvature_samples: int | None = Field(
        None, gt=0, description="Of the calibration samples, the ones the curvature costs use."
    )
    batch_size: int | None = Field(None, gt=0, le=65536)
    scheme: Scheme | Literal["auto"] | None = Field(
        None, description="tie (one tensor per class; default), basis (a shared low-rank basis), relaxed (one "
        "tensor per class plus a low-rank correction per layer), or auto (every "
        "scheme at the same ratio, measured on the same samples; the least measured loss wins).",
    )
    predict: bool | None = Field(
        None, description="Predict every candidate's loss change with the exact GGN beside measuring it (default "
        "false): the report's candidates[].second_order and spearman.",
    )
    correction_rank: int | None = Field(
        None, ge=1, le=1_000_000, description="relaxed: correction rank of every family (default 1/16 of "
        "min(d_out, d_in), lowered until the ratio fits)."
    )
    relaxed_pricing: RelaxedPricing | None = Field(
        None, description="relaxed: price each pair's residual by the input covariances with one output scale per "
        "layer (kronecker; default) or by the exact GGN's per-layer blocks (exact: costlier, ranks plans as measured)."
    )
    relaxed_bases: bool | None = Field(
        None, description="relaxed: let the candidates keep families as shared bases beside the relaxed ones "
        "(default true); false keeps every family relaxed."
    )
    rank: int | None = Field(
        None, ge=1, le=1_000_000, description="basis: rank of every family (default: rank_ratio)."
    )
    rank_ratio: float | None = Field(
        None, gt=0, le=1, description="basis: default rank as a share of min(d_out, d_in) (0.25)."
    )
    side: SideChoice | None = Field(
        None, description="basis: shared factor, auto (the larger dimension; default), out or in."
    )
    output_weighting: bool | None = Field(
        None,
        description="basis and relaxed: weigh each layer's error by its output-side curvature, so costs are "
        "predicted loss changes (default true); false: every layer's output error alike.",
    )

    shrinkage: ShrinkageSetting | None = Field(
        None,
        description="Input covariances of the layerwise merge and costs and of the basis whitening: shrunk "
        "toward tr(G)/d·I by an intensity estimated from the data (ledoit-wolf, oas), a fixed intensity (a "
        "number in [0, 1]) or not (none); held-out: the layerwise merge's intensity of least loss on the "
        "choice's held-out samples (none elsewhere); default: the pipeline's.",
    )

    @field_validator("out")
    @classmethod
    def _a_directory_name(cls, value: str) -> str:
        value = value.strip()
        if not value or "\x00" in value:
            raise ValueError(
                "out must name a directory on the worker, e.g. /models/out/minilm-0.8 "
                "(got an empty name or one with a NUL byte)"
            )
        return value


# the compress fields that go to CompressConfig: all but `out` and `overwrite`, which stay with the worker
CONFIG_FIELDS = frozenset(CompressSpec.model_fields) & frozenset(CompressConfig.model_fields)


def compress_config(spec: AnalysisSpec) -> dict[str, Any]:
    """The CompressConfig fields of an analysis with ``compress`` (the worker adds device, progress).

    The spec's own ratio, backend, samples, seed and time limit apply to the compression too, so
    one request says everything once; settings left out are not sent (the pipeline's defaults).

    Raises:
        ValueError: the spec has no ``compress`` object.
    """
    if spec.compress is None:
        raise ValueError("this analysis has no compress settings; it only measures costs")
    fields: dict[str, Any] = {
        "ratio": spec.ratio,
        "backend": spec.backend.value,
        "samples": spec.samples,
        "seed": spec.seed,
        **spec.compress.model_dump(mode="json", include=set(CONFIG_FIELDS), exclude_none=True),
    }
    if spec.time_limit_s is not None:
        fields["time_limit_s"] = spec.time_limit_s
    return fields


class CompressReport(BaseModel):
    """What the worker's ``compress`` reported, as JSON (hessian_worker.CompressReport).

    ``plan`` is the plan tied into the saved model: the candidate with the least measured loss,
    which may differ from the plan the service solves from the costs. Fields the worker's report
    gains later pass through unchanged.
    """

    model_config = ConfigDict(extra="allow")

    plan: SharingPlan = Field(description="The plan applied to the saved model.")
    out: str = Field(description="Where the worker saved the compressed model.")
    chosen: str | None = Field(None, description="The strategy of the chosen candidate.")
    merge: Merge | None = Field(None, description="How the shared tensors were made.")
    unique_params: int | None = None
    params_ratio: float | None = None
    predicted_loss_change: float | None = None
    measured_loss_change: float | None = None
    scheme: str | None = Field(None, description="The scheme installed (with scheme auto: the one that lost least).")
    spearman: float | None = Field(None, description="Of the candidates' second-order predictions against their "
                                   "measured losses, over every scheme's candidates.")


class CompressResult(BaseModel):
    """What a worker hands in for a compress job: the costs it measured and its report."""

    model_config = ConfigDict(extra="forbid")

    problem: SharingProblem
    report: CompressReport


def _completion_kind(value: Any) -> str:
    if isinstance(value, CompressResult):
        return "CompressResult"
    if isinstance(value, dict) and ("report" in value or "problem" in value):
        return "CompressResult"
    return "SharingProblem"


# the body of /complete: a bare SharingProblem (every analysis so far) or {problem, report}
Completion = Annotated[
    Annotated[SharingProblem, Tag("SharingProblem")]
    | Annotated[CompressResult, Tag("CompressResult")],
    Discriminator(_completion_kind),
]
