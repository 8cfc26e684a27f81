"""The worker's options: every enum and pydantic config the CLI, the service and the worker share.

No torch here (tests/hessian_worker/test_hw_options.py checks it in a fresh interpreter), so the
service, which must not import torch, validates its requests against the same enums the worker
runs with, and the CLI's choices are these enums' values. The torch side of a config (its device,
its seeded generator, a dtype's torch.dtype) is in hessian_worker.config; the classes are
re-exported from the modules that used to define them (hessian_worker.config, .pipeline, .healing,
.merge, .losses, .basis.config, .curvature.*), so either import path gives the same object.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from solver.schema import CostKind, Scheme

# compress --scheme auto: every registered scheme at the same ratio, the least measured loss wins
AUTO_SCHEME = "auto"

# --- enums -----------------------------------------------------------------------------------


class Backend(str, Enum):
    """How the curvature behind the sharing costs is estimated."""

    exact = "exact"
    projected = "projected"
    diagonal = "diagonal"
    layerwise = "layerwise"
    kfac = "kfac"


class DType(str, Enum):
    """The compute dtype; ``auto`` keeps the model's (a checkpoint's stored dtype)."""

    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"
    float64 = "float64"


class CurvatureKind(str, Enum):
    """Which second-order matrix: the Gauss-Newton matrix (PSD) or the full Hessian."""

    ggn = "ggn"
    hessian = "hessian"


class DiagonalMethod(str, Enum):
    auto = "auto"  # mc for self-distillation, hutchinson for a task loss
    mc = "mc"
    hutchinson = "hutchinson"
    fisher = "fisher"  # empirical Fisher of a task loss (zero for self-distillation)


class OutputFactor(str, Enum):
    diagonal = "diagonal"  # B_l = diag(b_l) from sampled output gradients (K-FAC)
    identity = "identity"  # B_l = 2I: layer-output reconstruction error (the layerwise backend's scale)


class Approximation(str, Enum):
    """How tokens that share a weight enter the factors (Eschenhagen et al. 2023): ``expand`` treats
    every token as its own example (right when the loss is a sum over tokens: language models);
    ``reduce`` first sums each sample's output gradients and averages its inputs (right when the
    loss sees a pooled output: sentence embeddings); ``auto`` picks by the loss's output."""

    auto = "auto"
    expand = "expand"
    reduce = "reduce"


class Eigensolver(str, Enum):
    """How the top eigenpairs are found: ``auto`` = nystrom for the GGN, lanczos for the Hessian."""

    auto = "auto"
    nystrom = "nystrom"  # one batched sketch; PSD operators only
    lanczos = "lanczos"  # sequential Krylov; any symmetric operator


class SketchPrecision(str, Enum):
    """Arithmetic of the Nyström sketch's HVPs (the eigen-algebra after it stays in float32/64).

    The sketch is an estimate whose truncation and trace errors are tens of percent, so bfloat16
    products (relative error ~1%) cost it nothing measurable, and where matmuls run natively in
    bfloat16 (AMX/AVX512-BF16 CPUs, CUDA) they are about 3x faster (bench/curvature_bench.py).
    """

    auto = "auto"  # bfloat16 where native and the model is float32, else the model's dtype
    model = "model"
    bfloat16 = "bfloat16"


class Bulk(str, Enum):
    """The curvature outside the top eigenspace: one scalar per layer, or one for all (the paper)."""

    layer = "layer"
    isotropic = "isotropic"


class DistillLoss(str, Enum):
    """The calibration loss: how far the compressed model's outputs are from the reference's."""

    auto = "auto"  # kl for logits, mse otherwise
    mse = "mse"
    kl = "kl"
    cosine = "cosine"  # 1 - cos per row: for embedding models whose users compare directions


class Merge(str, Enum):
    """How a class's shared tensor is made."""

    mean = "mean"
    representative = "representative"  # the first layer of the group keeps its weight
    curvature = "curvature"  # per-element diagonal weights: Σ F_k⊙W_k / Σ F_k
    layerwise = "layerwise"  # closed form (Σ W_k G_k)(Σ G_k)⁻¹ from layer input covariances


class Shrinkage(str, Enum):
    """How the input covariances of the layerwise merge and costs are shrunk toward a scaled identity
    (hessian_worker.curvature.shrinkage); a number in [0, 1] instead fixes the intensity."""

    none = "none"
    ledoit_wolf = "ledoit-wolf"  # intensity from the spread of the samples' contributions
    oas = "oas"  # Oracle-Approximating Shrinkage, Gaussian samples
    # compress: the layerwise merge's ρ of least loss on the choice's held-out samples
    # (hessian_worker.intensity_choice); none where nothing is measured (costs, whitening, apply)
    held_out = "held-out"


# an estimator, or the intensity itself (0: the sample covariance, 1: its scaled identity)
ShrinkageSetting = Union[Shrinkage, Annotated[float, Field(ge=0.0, le=1.0)]]  # noqa: UP007 - a runtime alias


class RelaxedPricing(str, Enum):
    """How the relaxed scheme prices each pair's residual (hessian_worker/relaxed): ``kronecker`` by
    the whitening covariances with one output scale per layer (one eigenproblem per pair gives every
    rank; cheap at any size), ``exact`` by the exact GGN's per-layer blocks (two forward-mode passes
    over the costs' data per pair and rank; ranks plans as measured, bench/results/relaxed-ranking.md)."""

    kronecker = "kronecker"
    exact = "exact"


class SideChoice(str, Enum):
    """Which factor a class shares: ``auto`` picks per family the side that saves more."""

    auto = "auto"  # the larger dimension is shared (out when d_out >= d_in)
    out = "out"  # W_l ~ B_c C_l, B_c (d_out x r) shared
    in_ = "in"  # W_l ~ C_l B_c, B_c (r x d_in) shared


# --- configs ---------------------------------------------------------------------------------


def positive_ranks(value: int | dict[str, int] | None, what: str) -> int | dict[str, int] | None:
    """``value`` (a rank, {family: rank} or None) when every rank is at least 1.

    Raises:
        ValueError: a rank below 1, named ``what``.
    """
    ranks = value.values() if isinstance(value, dict) else [] if value is None else [value]
    bad = [r for r in ranks if r < 1]
    if bad:
        raise ValueError(f"{what} must be >= 1, got {bad}")
    return value


class BasisOptions(BaseModel):
    """Options of the ``basis`` sharing scheme (W_ℓ ≈ B_c·C_ℓ), nested in ``AnalyzeConfig.basis``.

    The rank of a family is ``rank`` (an int for every family, or ``{family: rank}``), else
    ``rank_ratio · min(d_out, d_in)`` rounded (at least 1). The default ratio 0.25 keeps a layer
    alone at 1/4 of min(d_out, d_in) singular directions: for a square layer that is half its
    parameters, and every extra member of a class then adds only its r·d_in coefficients.

    ``side`` says which factor the class shares. A class of s members keeps r·(shared dim) +
    s·r·(other dim) parameters, so sharing the LARGER dimension saves more: ``auto`` shares d_out
    when d_out ≥ d_in (``out``, W_ℓ ≈ B_c·C_ℓ) and d_in otherwise (``in``, W_ℓ ≈ C_ℓ·B_c), e.g. the
    input side for a transformer's FFN down-projection (d_in = 4·d_out).

    ``output_weighting`` (default on) scales each layer's input covariance by its output-side
    curvature s_ℓ = ā_ℓ/2 (K-FAC's A_ℓ ≈ ā_ℓ·I fitted to the diagonal GGN of the calibration loss,
    see scales.py), so unary and pair costs are predicted loss changes, comparable across layers and
    families and on the tie scheme's scale, and a class's basis weighs its members by how much the
    loss feels them. Off, every layer's whitened output error counts alike (the plain layerwise
    error, cheaper: no diagonal GGN). It applies to whitened bases only (``whiten=True``).
    """

    model_config = ConfigDict(extra="forbid")

    rank: int | dict[str, int] | None = Field(
        None,
        description="Rank for every family, or {family: rank}; None: rank_ratio·min(d_out, d_in).",
    )
    rank_ratio: float = Field(
        0.25, gt=0, le=1, description="Default rank as a share of min(d_out, d_in)."
    )
    whiten: bool = Field(
        True, description="Whiten by the layer input covariances (False: plain SVD)."
    )
    output_weighting: bool = Field(
        True,
        description="Scale each layer's input covariance by its output-side curvature ā/2 (diagonal "
        "GGN), so costs are predicted loss changes; False: every layer's output error counts alike.",
    )
    damping: float = Field(
        0.01,
        gt=0,
        description="Ridge on the input covariance, as a share of its mean diagonal (GPTQ's 1%).",
    )
    side: SideChoice = Field(
        SideChoice.auto,
        description="Shared factor: auto (the larger dimension), out (d_out x r) or in (r x d_in).",
    )
    refine_rounds: int = Field(
        0,
        ge=0,
        description="apply: correction rounds under the output-side curvature (0 = none; side out only).",
    )
    trust: float = Field(
        0.1, gt=0, description="apply: trust region of a correction step, ‖ΔB‖ ≤ trust·‖B‖."
    )

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        return positive_ranks(value, "basis ranks")


class RelaxedOptions(BaseModel):
    """Options of the ``relaxed`` sharing scheme (W_ℓ ≈ S_c + A_ℓ·B_ℓ: one tensor per class plus a
    rank-r correction per member), nested in ``AnalyzeConfig.relaxed``.

    The correction rank of a family is ``rank`` (an int for every family, or ``{family: rank}``),
    else ``rank_ratio · min(d_out, d_in)`` rounded (at least 1). A class of s members keeps
    d_out·d_in + s·r·(d_out + d_in) parameters, so at one budget a higher rank leaves fewer classes:
    with ``max_params_ratio`` set (compress sets it) the ranks are lowered, in one proportion, until
    one class per family fits the budget, and compress also solves and measures the plans at every
    share in ``rank_ratios`` (the measured choice then picks the rank, see hessian_worker/relaxed).

    Whitening and ``output_weighting`` are the basis scheme's (the same covariances,
    basis/scales.py): the costs are predicted loss changes on the tie scheme's scale.
    """

    model_config = ConfigDict(extra="forbid")

    rank: int | dict[str, int] | None = Field(
        None, description="Correction rank for every family, or {family: rank}; None: rank_ratio·min(d_out, d_in).")
    rank_ratio: float = Field(0.0625, gt=0, le=0.5, description="Default correction rank as a share of min(d_out, d_in).")
    rank_ratios: list[float] = Field(
        default_factory=lambda: [0.015625, 0.03125, 0.0625, 0.125, 0.1875, 0.25],
        description="compress: the correction-rank shares whose optimum plans are also measured ([]: none).")
    basis_ratios: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.25, 0.4, 0.55, 0.7, 0.85],
        description="compress: the ranks, as shares of min(d_out, d_in), at which a family may share one basis per "
        "class instead (beside the relaxed families, chosen per family by the solver's predicted loss and then "
        "measured, hessian_worker/relaxed/candidates.py); []: every family stays relaxed.")
    whiten: bool = Field(True, description="Whiten by the layer input covariances (False: plain Frobenius error).")
    output_weighting: bool = Field(
        True, description="Scale each layer's input covariance by its output-side curvature ā/2 (diagonal GGN), so "
        "costs are predicted loss changes; False: every layer's output error counts alike.")
    damping: float = Field(0.01, gt=0, description="Ridge on the input covariance, as a share of its mean diagonal.")
    shrinkage: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.03, 0.1, 0.2, 0.4],
        description="Whitening covariances shrunk toward tr(G)/d·I by the intensity of this list with the least "
        "cross-fitted held-out error, per family (hessian_worker/relaxed/holdout.py); []: AnalyzeConfig.shrinkage "
        "as for the basis scheme.")
    pricing: RelaxedPricing = Field(
        RelaxedPricing.kronecker, description="How pair residuals are priced: kronecker (input covariances, one "
        "output scale per layer) or exact (the exact GGN's per-layer blocks; costlier, see RelaxedPricing).")
    rounds: int = Field(20, ge=0, description="L-BFGS iterations fitting S_c of a class of three or more members "
                        "(hessian_worker/relaxed/decompose.py).")

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        return positive_ranks(value, "relaxed correction ranks")

    @field_validator("rank_ratios")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        bad = [x for x in value if not 0 < x <= 0.5]
        if bad:
            raise ValueError(f"relaxed rank_ratios must be in (0, 0.5], got {bad}")
        return value


class KFACOptions(BaseModel):
    """The kfac backend: input factors kept to ``rank`` eigenpairs plus a bulk (None: whole), found
    from a sketch of rank + ``oversample`` columns; the output factor from sampled gradients."""

    model_config = ConfigDict(extra="forbid")

    rank: int | None = Field(64, gt=0, description="Eigenpairs of each input covariance kept (None: all).")
    oversample: int = Field(64, ge=0, description="Sketch columns beyond the rank (a sketch this wide: exact).")
    gradient_samples: int | None = Field(
        16, gt=0, description="Samples whose sampled output gradients estimate the output factor (None: all): a "
        "Monte-Carlo second moment, so a subset suffices and the backward passes stay a fraction of the work.")
    approximation: Approximation = Field(
        Approximation.auto, description="expand (every token an example: language models), reduce (per sample: "
        "pooled outputs such as sentence embeddings), or auto (by the loss's output: logits expand)")
    output: OutputFactor = Field(OutputFactor.diagonal,
                                 description="diagonal (sampled output gradients, loss units) or identity "
                                 "(output reconstruction error, the layerwise scale; no backward pass).")


class AnalyzeConfig(BaseModel):
    """How to turn a model and calibration data into a SharingProblem.

    Layer selection: ``targets`` (default: every 2-D weight of repeated blocks), ``ignore``, and
    ``families`` ({pattern: family}); patterns are full names, module prefixes, or ``re:`` regexes.
    The device and the seeded generator it stands for: ``hessian_worker.config.torch_device`` and
    ``generator``.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Backend = Backend.exact
    kind: CostKind = CostKind.pairwise
    curvature: CurvatureKind = Field(CurvatureKind.ggn, description="ggn (PSD, forward mode) or hessian")
    distill: DistillLoss = DistillLoss.auto
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    families: dict[str, str] | None = None
    samples: int | None = Field(None, gt=0, description="Calibration samples drawn (seeded); None = all.")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(128, gt=0, description="Token limit per text sample.")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    rank: int = Field(8, gt=0, description="projected: eigenpairs kept (a Nyström sketch of rank + oversample HVPs).")
    eigensolver: Eigensolver = Field(
        Eigensolver.auto, description="projected: nystrom (one batched sketch, GGN), lanczos, or auto.")
    oversample: int = Field(4, ge=0, description="projected, nystrom: sketch vectors beyond the rank.")
    bulk: Bulk = Field(Bulk.layer, description="projected: curvature off the top space, per layer or isotropic.")
    sketch_precision: SketchPrecision = Field(
        SketchPrecision.auto, description="projected, nystrom: the sketch's HVPs in bfloat16 (about 3x faster where "
        "native: AMX/AVX512-BF16 CPUs, CUDA), in the model's dtype, or auto (bfloat16 where native, float32 models).")
    lanczos_iters: int | None = Field(None, gt=0, description="projected: Krylov size (default 2·rank+10).")
    probes: int = Field(32, gt=0, description="Hutchinson probes (diagonal; projected with lanczos: traces).")
    diagonal_method: DiagonalMethod = DiagonalMethod.auto
    memory_limit_gb: float = Field(4.0, gt=0, description="projected refuses above this estimate.")
    chunk: int = Field(8, gt=0, description="Directions per vmap call (1 = plain loop).")
    max_params_ratio: float | None = Field(None, gt=0, le=1)
    layerwise_damping: float = Field(
        0.01, ge=0, description="layerwise merge: ridge as a share of mean diag(G) (GPTQ's 1%)")
    shrinkage: ShrinkageSetting = Field(
        Shrinkage.none, description="Input covariances of the layerwise merge and costs and of the basis whitening: "
        "shrunk toward tr(G)/d·I by an intensity estimated from the data (ledoit-wolf, oas), fixed (a number in "
        "[0, 1]), or not (none); held-out: compress chooses the layerwise merge's intensity by its loss on held-out "
        "samples (hessian_worker.intensity_choice), none elsewhere.")
    dtype: DType = DType.float32
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    progress: bool = True
    # basis sharing (hessian_worker/basis): W_l ~ B_c C_l; analyze/apply_plan dispatch on scheme
    scheme: Scheme = Field(Scheme.tie, description="tie (one tensor per class), basis (shared low-rank basis) or relaxed "
                           "(one tensor per class plus a low-rank correction per layer)")
    basis: BasisOptions = Field(default_factory=BasisOptions, description="basis scheme: rank, whitening, correction")
    relaxed: RelaxedOptions = Field(default_factory=RelaxedOptions,
                                    description="relaxed scheme: correction ranks, whitening (hessian_worker/relaxed)")
    kfac: KFACOptions = Field(default_factory=KFACOptions, description="kfac backend: factor ranks, output factor")

    @model_validator(mode="after")
    def _check(self) -> AnalyzeConfig:
        if self.lanczos_iters is not None and self.lanczos_iters < self.rank:
            raise ValueError(f"lanczos_iters={self.lanczos_iters} must be >= rank={self.rank}")
        if self.eigensolver is Eigensolver.nystrom and self.curvature is not CurvatureKind.ggn:
            raise ValueError("eigensolver='nystrom' needs the PSD Gauss-Newton matrix: use curvature='ggn' "
                             "or eigensolver='lanczos' for the full Hessian")
        lanczos = self.eigensolver is Eigensolver.lanczos or self.curvature is not CurvatureKind.ggn
        if self.sketch_precision is SketchPrecision.bfloat16 and lanczos:
            raise ValueError("sketch_precision='bfloat16' applies to the Nyström sketch of the GGN: use "
                             "curvature='ggn' with eigensolver auto/nystrom, or sketch_precision='model'")
        return self


class HealConfig(BaseModel):
    """How long and how hard to heal; the same for every strategy in a comparison."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, gt=0, description="Optimizer steps, one calibration batch each.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    samples: int | None = Field(None, gt=0)
    max_length: int = Field(128, gt=0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    distill: DistillLoss = Field(DistillLoss.auto, description="The distillation loss healing minimizes.")
    holdout: float = Field(0.2, ge=0, lt=1, description="Share of the samples kept out of training to pick the best "
                           "step (step 0 included); 0: train on all and keep the last step.")
    check_every: int = Field(20, gt=0, description="Steps between checks on the held-out samples (and the last step).")
    device: str = "auto"
    progress: bool = True


class CompressConfig(BaseModel):
    """The settings of ``hessian_worker.compress`` (and of a streamed ``compress_checkpoint``); the
    merge it resolves to when ``merge`` is None: ``hessian_worker.pipeline.resolve_merge``."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(gt=0, le=1, description="Share of the shareable parameters to keep.")
    backend: Backend = Backend.exact
    merge: Merge | None = Field(None, description="Shared value of a class (default: layerwise when the data gives full-rank input covariances, else curvature).")
    top: int = Field(16, ge=1, le=1000, description="Best plans by the cost model to measure (plus the pattern plans).")
    min_distance: int = Field(1, ge=1, description="Sharing pairs in which each of the top plans differs from every better one.")
    per_pattern: int = Field(2, ge=0, le=100, description="Budget-filling allocations measured per pattern strategy.")
    normalized_top: int = Field(16, ge=0, le=1000, description="Best plans by size-normalized pair costs, also measured.")
    distill: DistillLoss = Field(DistillLoss.auto, description="cosine suits sentence-embedding models.")
    heal_steps: int = Field(0, ge=0)
    heal_lr: float = Field(HealConfig.model_fields["lr"].default, gt=0)
    heal_holdout: float = Field(HealConfig.model_fields["holdout"].default, ge=0, lt=1, description="With heal_steps: share of the healing samples kept out of "
                                "training, to keep the best step (step 0 included); 0: heal on all, keep the last step.")
    heal_choice: bool = Field(True, description="With heal_steps (every scheme): heal a shortlist and keep the plan that "
                              "loses least after healing, not the zero-shot winner.")
    heal_shortlist: int = Field(2, ge=0, le=100, description="Best zero-shot candidates healed in the choice, "
                                "besides the best of each pattern (tie) or form of sharing (relaxed, basis: choose.heal_kind).")
    choice_holdout: float = Field(0.5, ge=0, lt=1, description="With the layerwise merge: share of the choice samples "
                                  "the candidates are scored on, kept out of the covariances they are merged with "
                                  "(scored where it was fitted, the merge flatters the plans it overfits). 0: score "
                                  "on every choice sample.")
    # held-out: on MiniLM it raised the embedding cosine in and across domains, on the GPT it chose
    # 0 everywhere (= none); docs/design.md §Covariance shrinkage, bench/results/eval-cross-domain.md
    shrinkage: ShrinkageSetting = Field(Shrinkage.held_out, description="Input "
                                        "covariances of the layerwise merge and costs and of the basis whitening: "
                                        "shrunk toward tr(G)/d·I by an estimated intensity (ledoit-wolf, oas), a "
                                        "fixed one (a number in [0, 1]) or not (none); held-out: the layerwise "
                                        "merge's intensity of least loss on the choice's held-out samples, among "
                                        "0-0.4 (none elsewhere).")
    refit: bool = Field(True, description="basis, relaxed: fit the chosen plan on every sample not held out (the "
                        "candidates are fitted on the curvature part and measured on the rest); False: install the "
                        "fit the choice measured.")
    holdout: int | None = Field(None, ge=1, description="Samples held out for the measured figure (default: a quarter).")
    samples: int | None = Field(None, gt=0, description="Calibration samples read (default: all).")
    curvature_samples: int | None = Field(None, gt=0, description="Of those, the ones the curvature costs use (default: all; basis: half, the choice gets the rest).")
    batch_size: int = Field(8, gt=0)
    time_limit_s: float = Field(10.0, gt=0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str = "auto"
    dtype: DType | None = Field(None, description="Compute dtype (default: float32 in memory; a streamed decoder "
                                "keeps its checkpoint's, auto).")
    kfac: KFACOptions = Field(default_factory=KFACOptions, description="backend kfac: factor ranks and samples.")
    progress: bool = True
    scheme: Scheme | Literal["auto"] = Field(
        Scheme.tie, description="tie (one tensor per class), basis (a shared low-rank basis), relaxed (one tensor per "
        "class plus a low-rank correction per layer), or auto (every scheme at the same ratio, measured on the same samples; the least measured loss wins).")
    predict: bool = Field(False, description="Also predict every candidate's loss change with the exact GGN on the "
                          "samples it is measured on (one forward-mode pass each): second_order and spearman in the "
                          "report, on one scale for every scheme. Off by default: a diagnostic that made a whole "
                          "compress of the digits MLP 7x slower (1.7 s -> 12.6 s); the choice uses measured losses.")
    rank: int | None = Field(None, ge=1, description="basis: rank of every family (default: rank_ratio·min(d_out, d_in)).")
    rank_ratio: float = Field(0.25, gt=0, le=1, description="basis: default rank as a share of min(d_out, d_in).")
    side: SideChoice = Field(SideChoice.auto, description="basis: shared factor, auto (the larger dimension), out or in.")
    output_weighting: bool = Field(True, description="basis: weigh each layer's error by its output-side curvature, so costs "
                                   "are predicted loss changes (False: every layer's output error alike).")
    correction_rank: int | None = Field(None, ge=1, description="relaxed: correction rank of every family (default: "
                                        "relaxed.rank_ratio·min(d_out, d_in)).")
    relaxed_pricing: RelaxedPricing | None = Field(
        None, description="relaxed: how pair residuals are priced, kronecker or exact (default: relaxed.pricing, "
        "kronecker; see RelaxedPricing).")
    relaxed_bases: bool = Field(
        True, description="relaxed: the candidates may keep families as shared bases beside the relaxed ones "
        "(relaxed.basis_ratios); false keeps every family relaxed (basis_ratios []).")
    relaxed: RelaxedOptions | None = Field(None, description="relaxed: correction ranks, the rank shares also measured, "
                                           "whitening (default: RelaxedOptions() with this config's output_weighting).")

    def analyze_config(self, dtype: DType, scheme: Scheme | None = None) -> AnalyzeConfig:
        """The analysis settings of this compress (``dtype`` when none is given) for ``scheme`` (default:
        the config's; one of the schemes ``auto`` runs). Under the relaxed scheme the budget goes along
        (``max_params_ratio``): its correction ranks must leave room for one class per family."""
        if scheme is None and self.scheme == AUTO_SCHEME:
            raise ValueError("scheme='auto' runs several schemes: pass the one to analyze")
        scheme = Scheme(scheme or self.scheme)
        relaxed = self.relaxed or RelaxedOptions(output_weighting=self.output_weighting)
        if self.correction_rank is not None:
            relaxed = relaxed.model_copy(update={"rank": self.correction_rank})
        if self.relaxed_pricing is not None:
            relaxed = relaxed.model_copy(update={"pricing": self.relaxed_pricing})
        if not self.relaxed_bases:
            relaxed = relaxed.model_copy(update={"basis_ratios": []})
        return AnalyzeConfig(backend=self.backend, samples=self.samples, batch_size=self.batch_size, seed=self.seed,
                             distill=self.distill, device=self.device, progress=self.progress, scheme=scheme,
                             basis=self.basis_options(), relaxed=relaxed, kfac=self.kfac, dtype=self.dtype or dtype,
                             shrinkage=self.shrinkage, max_params_ratio=self.ratio if scheme is Scheme.relaxed else None)

    def basis_options(self) -> BasisOptions:
        return BasisOptions(rank=self.rank, rank_ratio=self.rank_ratio, side=self.side,
                            output_weighting=self.output_weighting)
