"""Layerwise backend (GPTQ/OBC style): each linear layer's output reconstruction error.

For y = W x over input rows X (N of them), ‖ΔX‖²/N = tr(Δ G Δᵀ) with G = XᵀX/N, i.e. the
Hessian 2G ⊗ I of that error. One streaming forward pass collects every G with hooks, so the
backend fits models too large for the others. Its costs are in units of layer-output error, not
of the calibration loss, so they rank pairs rather than predict the loss change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hessian_worker.costs import FamilyPairs, block_pair_quads
from hessian_worker.curvature.shrinkage import (
    SecondMoments,
    needs_unit_squares,
    shrunk_covariance,
    unit_squares,
)
from hessian_worker.data import Calibration, call_model
from hessian_worker.errors import BackendError
from hessian_worker.options import Shrinkage, ShrinkageSetting

_WEIGHT_SUFFIX = ".weight"


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: y = x W + b with W stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_modules(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, bool]]:
    """Maps each weight name to (its module, transposed?).

    Raises:
        BackendError: a name is not the weight of a Linear (or GPT-2 Conv1D) layer.
    """
    modules = dict(model.named_modules())
    out, bad = {}, []
    for name in names:
        mod = modules.get(name[: -len(_WEIGHT_SUFFIX)]) if name.endswith(_WEIGHT_SUFFIX) else None
        if isinstance(mod, nn.Linear):
            out[name] = (mod, False)
        elif mod is not None and _is_conv1d(mod):
            out[name] = (mod, True)
        else:
            bad.append(name)
    if bad:
        raise BackendError(
            f"layerwise backend needs Linear weights; not linear: {bad[:5]}; "
            "exclude them with ignore=[...] or use backend='exact' or 'diagonal'"
        )
    return out


def input_moments(model: nn.Module, data: Calibration, names: Sequence[str], *, squares: bool = False,
                  progress: bool = False) -> dict[str, SecondMoments]:
    """Σ x xᵀ, rows and samples per layer from one forward pass over the data (padding rows
    skipped); with ``squares`` also Σ_u ‖X_uᵀX_u‖²_F over the samples (shrinkage.unit_squares)."""
    layers = linear_modules(model, names)
    moments: dict[str, SecondMoments] = {}
    state: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = state["mask"]
            masked = mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape)
            rows = x[mask.bool()] if masked else x.reshape(-1, x.shape[-1])
            g = rows.T @ rows
            m = moments.get(name)
            if m is None:
                m = moments[name] = SecondMoments(g)
            else:
                m.total = m.total + g
            m.rows += rows.shape[0]
            if squares:
                units, square = unit_squares(x * mask.unsqueeze(-1).to(x.dtype) if masked else x)
                m.unit_square += square
            else:  # a sample is a row of 2-D inputs, else everything but the last two dimensions
                units = x.shape[0] if x.dim() == 2 else x.numel() // (x.shape[-2] * x.shape[-1])
            m.units += units

        return hook

    for name, (module, _) in layers.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for batch in tqdm(data.batches, desc="layer inputs", disable=not progress, leave=False):
                state["mask"] = batch.get("attention_mask")
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in moments]
    if missing:
        raise BackendError(f"layers {missing[:5]} saw no input in the forward pass; is the data empty?")
    return {n: moments[n] for n in names}


def input_covariances(model: nn.Module, data: Calibration, names: Sequence[str], *,
                      shrinkage: ShrinkageSetting = Shrinkage.none, progress: bool = False) -> dict[str, Tensor]:
    """G = XᵀX/N per layer from one forward pass over the data, shrunk as ``shrinkage`` says."""
    return shrunk_covariances(model, data, names, shrinkage=shrinkage, progress=progress)[0]


def shrunk_covariances(model: nn.Module, data: Calibration, names: Sequence[str], *,
                       shrinkage: ShrinkageSetting = Shrinkage.none,
                       progress: bool = False) -> tuple[dict[str, Tensor], dict[str, float]]:
    """(name -> Ĝ, name -> its shrinkage intensity ρ) over the data (hessian_worker.curvature.shrinkage)."""
    moments = input_moments(model, data, names, squares=needs_unit_squares(shrinkage), progress=progress)
    covs, rhos = {}, {}
    for name, m in moments.items():
        covs[name], rhos[name] = shrunk_covariance(m, shrinkage)
    return covs, rhos


class LayerwiseCurvature:
    """δᵀHδ = 2 Σ_l tr(Δ_l G_l Δ_lᵀ), block diagonal across layers."""

    def __init__(self, covariances: Mapping[str, Tensor], transposed: Mapping[str, bool],
                 intensities: Mapping[str, float] | None = None) -> None:
        self.cov = dict(covariances)
        self.transposed = dict(transposed)
        self.intensities = dict(intensities or {})  # each G's shrinkage ρ (empty: none)

    @classmethod
    def collect(cls, model: nn.Module, data: Calibration, names: Sequence[str], *,
                shrinkage: ShrinkageSetting = Shrinkage.none, progress: bool = False) -> LayerwiseCurvature:
        """Every named layer's input covariance over ``data``, shrunk as ``shrinkage`` says."""
        layers = linear_modules(model, names)
        covs, rhos = shrunk_covariances(model, data, names, shrinkage=shrinkage, progress=progress)
        return cls(covs, {n: t for n, (_, t) in layers.items()}, rhos)

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        total = None
        for name, d in deltas.items():
            g = self.cov[name]
            pattern = "nio,ij,njo->n" if self.transposed[name] else "noi,ij,noj->n"
            q = 2.0 * torch.einsum(pattern, d, g, d)
            total = q if total is None else total + q
        assert total is not None
        return total

    def quad_pairs(self, family: FamilyPairs) -> Tensor:
        """Every pair of a family from single-layer directions: the form has no cross-layer blocks."""
        return block_pair_quads(self.quad, family)

    def merge(self, names: Sequence[str], weights: Mapping[str, Tensor], damping: float = 0.01) -> Tensor:
        """The shared weight minimizing Σ_k tr((W−W_k) G_k (W−W_k)ᵀ): W* = (Σ W_k G_k)(Σ G_k)⁻¹.

        ``damping`` (relative to the mean diagonal) keeps Σ G_k invertible when inputs are rank
        deficient.
        """
        return layerwise_merge([weights[n] for n in names], [self.cov[n] for n in names],
                               transposed=self.transposed[names[0]], damping=damping)


def layerwise_merge(weights: Sequence[Tensor], covs: Sequence[Tensor], *, transposed: bool = False,
                    damping: float = 0.01) -> Tensor:
    """Closed form W* = (Σ W_k G_k)(Σ G_k)⁻¹ (W as [out, in]; ``transposed`` for [in, out])."""
    ws = [w.T if transposed else w for w in weights]
    merged = solve_merge(sum(covs), sum(w @ g for w, g in zip(ws, covs, strict=True)), damping,
                         mean=sum(ws) / len(ws))
    return merged.T if transposed else merged


def solve_merge(g_sum: Tensor, num: Tensor, damping: float = 0.01, *, mean: Tensor) -> Tensor:
    """W* = (num + λW̄)(Σ G_k + λI)⁻¹ from the sums Σ G_k and num = Σ W_k G_k (W as [out, in]) and
    the members' mean W̄; λ is ``damping`` times the mean diagonal, so rank-deficient inputs still
    give one answer. The damping pulls toward the mean merge, not toward zero: directions the inputs
    never excite keep the members' mean, and identical members merge to themselves."""
    lam = damping * float(g_sum.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(g_sum.shape[0], dtype=g_sum.dtype, device=g_sum.device)
    # W* G = num  <=>  G W*ᵀ = numᵀ (G symmetric)
    return torch.linalg.solve(g_sum + lam * eye, (num + lam * mean.to(num.dtype)).T).T
