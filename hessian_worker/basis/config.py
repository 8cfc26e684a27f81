"""BasisOptions: how the ``basis`` scheme picks ranks, whitens, and corrects (no torch here)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SideChoice(str, Enum):
    """Which factor a class shares: ``auto`` picks per family the side that saves more."""

    auto = "auto"  # the larger dimension is shared (out when d_out >= d_in)
    out = "out"  # W_l ~ B_c C_l, B_c (d_out x r) shared
    in_ = "in"  # W_l ~ C_l B_c, B_c (r x d_in) shared


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
        ranks = value.values() if isinstance(value, dict) else [] if value is None else [value]
        bad = [r for r in ranks if r < 1]
        if bad:
            raise ValueError(f"basis ranks must be >= 1, got {bad}")
        return value
