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
from hessian_worker.data import Calibration, call_model
from hessian_worker.errors import BackendError

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


def input_covariances(model: nn.Module, data: Calibration, names: Sequence[str], *,
                      progress: bool = False) -> dict[str, Tensor]:
    """G = XᵀX/N per layer from one forward pass over the data (padding rows skipped)."""
    sums, counts = input_sums(model, data, names, progress=progress)
    return {n: sums[n] / max(counts[n], 1) for n in names}


def input_sums(model: nn.Module, data: Calibration, names: Sequence[str], *,
               progress: bool = False) -> tuple[dict[str, Tensor], dict[str, int]]:
    """(XᵀX, N) per layer over the data's real rows: what G is, before the division (the sums a
    torch.distributed job adds up over its ranks' batches)."""
    layers = linear_modules(model, names)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    state: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            g = x.T @ x
            sums[name] = g if name not in sums else sums[name] + g
            counts[name] += x.shape[0]

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
    return sums, counts


class LayerwiseCurvature:
    """δᵀHδ = 2 Σ_l tr(Δ_l G_l Δ_lᵀ), block diagonal across layers."""

    def __init__(self, covariances: Mapping[str, Tensor], transposed: Mapping[str, bool]) -> None:
        self.cov = dict(covariances)
        self.transposed = dict(transposed)

    @classmethod
    def collect(cls, model: nn.Module, data: Calibration, names: Sequence[str], *,
                progress: bool = False) -> LayerwiseCurvature:
        layers = linear_modules(model, names)
        return cls(input_covariances(model, data, names, progress=progress),
                   {n: t for n, (_, t) in layers.items()})

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
    merged = solve_merge(sum(covs), sum(w @ g for w, g in zip(ws, covs, strict=True)), damping)
    return merged.T if transposed else merged


def solve_merge(g_sum: Tensor, num: Tensor, damping: float = 0.01) -> Tensor:
    """W* = num (Σ G_k + λI)⁻¹ from the sums Σ G_k and num = Σ W_k G_k (W as [out, in]); λ is
    ``damping`` times the mean diagonal, so rank-deficient inputs still give one answer."""
    eye = torch.eye(g_sum.shape[0], dtype=g_sum.dtype, device=g_sum.device)
    g_sum = g_sum + damping * float(g_sum.diagonal().mean().clamp_min(1e-30)) * eye
    # W* G = num  <=>  G W*ᵀ = numᵀ (G symmetric)
    return torch.linalg.solve(g_sum, num.T).T
