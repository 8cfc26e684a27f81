"""Output-side curvature scales of the ``basis`` scheme: whitened errors as predicted loss changes.

The whitened error of decompose.py, E_ℓ = tr(δ_ℓ G̃_ℓ δ_ℓᵀ), is the mean squared change of layer
ℓ's OUTPUTS. It weighs every layer's output error alike, although the model's loss does not: an
error in a layer whose outputs the loss barely feels costs little, one in a layer it is sensitive
to costs much. Measured on MiniLM, the solver's optimum under E alone crowded such cheap-looking
layers into big classes and was the worst of the basis strategies.

K-FAC's layer block H_ℓ ≈ A_ℓ ⊗ G_ℓ (A_ℓ the output-side curvature, G_ℓ the input covariance)
with A_ℓ ≈ ā_ℓ·I gives the predicted loss change of δ_ℓ as

    ΔL ≈ ½ vec(δ_ℓ)ᵀ H_ℓ vec(δ_ℓ) = ½ ā_ℓ · tr(δ_ℓ G_ℓ δ_ℓᵀ) = tr(δ_ℓ (s_ℓ G_ℓ) δ_ℓᵀ),  s_ℓ = ā_ℓ/2.

ā_ℓ is fitted to the measured diagonal GGN F_ℓ of the calibration loss: diag(A ⊗ G) = a gᵀ
(g = diag G_ℓ), so the least-squares a is decompose.output_weights and the least-squares scalar
ā_ℓ is its mean. Whitening with s_ℓ·G_ℓ instead of G_ℓ therefore turns every unary cost, pair
cost and re-scored class error into a predicted loss change on the scale of the tie scheme's
costs, and it changes the shared basis of a class too: members are weighted by how much the loss
feels them. The scale does not change a layer's own basis (a class of one is the same truncated
SVD under s·G), and relative damping is scale-free, so only how layers are weighed against each
other changes.

``basis_covariances`` is the one place the scheme's whitening covariances come from (analysis,
re-scoring, measuring candidates, apply), so the plan measured is the plan applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from hessian_worker.basis.decompose import output_weights
from hessian_worker.config import AnalyzeConfig, generator
from hessian_worker.curvature.diagonal import estimate_diagonal
from hessian_worker.curvature.layerwise import input_moments, linear_modules
from hessian_worker.curvature.shrinkage import needs_unit_squares, shrunk_covariance
from hessian_worker.data import Calibration
from hessian_worker.objective import Objective


def output_scales(
    diag: Mapping[str, Tensor],
    covs: Mapping[str, Tensor],
    transposed: Mapping[str, bool] | None = None,
) -> dict[str, float]:
    """s_ℓ = ā_ℓ/2 per layer: ā_ℓ the least-squares scalar with diag GGN F_ℓ ≈ ā_ℓ·1·diag(G_ℓ)ᵀ.

    Args:
        diag: name -> diagonal GGN of the weight, in the parameter's own orientation.
        covs: name -> input covariance G (d_in × d_in), unscaled.
        transposed: name -> True for GPT-2 Conv1D weights ([in, out]); default False.
    """
    out = {}
    for name, cov in covs.items():
        f = diag[name].T if (transposed or {}).get(name, False) else diag[name]
        out[name] = 0.5 * float(output_weights(f, cov).mean())
    return out


def scale_covariances(covs: Mapping[str, Tensor], scales: Mapping[str, float]) -> dict[str, Tensor]:
    """name -> s_ℓ·G_ℓ."""
    return {n: c * scales[n] for n, c in covs.items()}


def layer_output_scales(
    model: nn.Module,
    data: Calibration,
    names: Sequence[str],
    covs: Mapping[str, Tensor],
    config: AnalyzeConfig,
) -> dict[str, float]:
    """s_ℓ of ``names`` from the diagonal GGN of the calibration loss on ``data`` (already on the
    model's device and dtype): ``config``'s distillation loss, diagonal method, probes and seed.

    Raises:
        BackendError: a name is not a linear layer's weight.
    """
    layers = linear_modules(model, names)
    obj = Objective(model, data, list(names), config.distill)
    with torch.no_grad():
        diag = estimate_diagonal(
            obj,
            config.diagonal_method,
            probes=config.probes,
            generator=generator(config),
            kind=config.curvature,
        )
    return output_scales(diag, covs, {n: t for n, (_, t) in layers.items()})


def basis_covariances(
    model: nn.Module,
    data: Calibration,
    names: Sequence[str],
    config: AnalyzeConfig,
    *,
    progress: bool = False,
    output_weighting: bool | None = None,
) -> dict[str, Tensor]:
    """The covariances the basis scheme whitens with: each layer's input covariance G_ℓ on ``data``,
    shrunk as ``config.shrinkage`` says, times its output scale s_ℓ when ``output_weighting``
    (default ``config.basis.output_weighting``; the relaxed scheme passes its own).

    ``data`` is a prepared Calibration (on the model's device and dtype); costs, re-scoring,
    measuring and apply all take their covariances from here, so one data set and one config give
    the same whitening everywhere.

    Raises:
        BackendError: a name is not a linear layer's weight.
    """
    moments = input_moments(model, data, list(names), squares=needs_unit_squares(config.shrinkage), progress=progress)
    covs = {n: shrunk_covariance(m, config.shrinkage)[0] for n, m in moments.items()}
    weighted = config.basis.output_weighting if output_weighting is None else output_weighting
    if not weighted:
        return covs
    # the scale is fitted to the measured G (a fact about the curvature), the whitening uses Ĝ
    raw = {n: m.covariance for n, m in moments.items()}
    return scale_covariances(covs, layer_output_scales(model, data, names, raw, config))
