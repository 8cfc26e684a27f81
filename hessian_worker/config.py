"""AnalyzeConfig: one pydantic config for analysis, plan re-scoring and measurement."""

from __future__ import annotations

from enum import Enum

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hessian_worker.basis.config import BasisOptions
from hessian_worker.curvature.base import CurvatureKind
from hessian_worker.curvature.diagonal import DiagonalMethod
from hessian_worker.curvature.kfac import Approximation, OutputFactor
from hessian_worker.curvature.projected import Bulk, Eigensolver, SketchPrecision
from hessian_worker.losses import DistillLoss
from solver.schema import CostKind, Scheme


class Backend(str, Enum):
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

    @property
    def torch(self) -> torch.dtype | None:
        return None if self is DType.auto else getattr(torch, self.value)


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
    dtype: DType = DType.float32
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    progress: bool = True
    # basis sharing (hessian_worker/basis): W_l ~ B_c C_l; analyze/apply_plan dispatch on scheme
    scheme: Scheme = Field(Scheme.tie, description="tie (one tensor per class) or basis (shared low-rank basis)")
    basis: BasisOptions = Field(default_factory=BasisOptions, description="basis scheme: rank, whitening, correction")
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

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def generator(self) -> torch.Generator:
        """The one seeded source of randomness (CPU, so a seed means the same on every device)."""
        return torch.Generator().manual_seed(self.seed)
