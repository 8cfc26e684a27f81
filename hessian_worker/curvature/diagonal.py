"""Diagonal backend: δᵀ diag(H) δ.

diag(G) estimators: Monte Carlo GGN (``mc``: g = Jᵀs with E[ssᵀ] = H_out, so E[g⊙g] = diag(G);
one backward per sample and a variance that does not depend on the off-diagonal entries, so it is
the default for self-distillation), Hutchinson (z ⊙ Gz, any loss), or the empirical Fisher of a
task loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import functional_call, grad, vjp, vmap

from hessian_worker.costs import FamilyPairs, block_pair_quads
from hessian_worker.curvature.base import CurvatureKind, Params
from hessian_worker.curvature.functional import ggn_hvp, hessian_hvp
from hessian_worker.curvature.hutchinson import diagonal as hutchinson_diagonal
from hessian_worker.data import INPUT_KEY
from hessian_worker.errors import BackendError
from hessian_worker.losses import cosine, extract_output, kl, mse, row_mask
from hessian_worker.objective import Objective
from hessian_worker.options import DiagonalMethod


def empirical_fisher(obj: Objective) -> Params:
    """Mean over samples of the squared per-sample gradient (task losses only).

    Raises:
        BackendError: with self-distillation every per-sample gradient is zero at the reference.
    """
    if obj.is_distill:
        raise BackendError(
            "the empirical Fisher is zero for self-distillation (the gradient vanishes at the "
            "reference); use diagonal_method='hutchinson'"
        )
    p0 = {n: obj.params0[n] for n in obj.names}
    acc = {n: torch.zeros_like(p) for n, p in p0.items()}
    total = obj.data.num_samples
    for batch in obj.data.batches:
        def one(p: Params, row: dict[str, Tensor]) -> Tensor:
            single = {k: v.unsqueeze(0) for k, v in row.items()}
            args = (single[INPUT_KEY],) if set(single) == {INPUT_KEY} else ()
            kwargs = {} if args else single
            y = extract_output(functional_call(obj.model, p, args, kwargs, strict=False), single)[0]
            assert obj.task_loss is not None
            return obj.task_loss(y, single)

        grads = vmap(grad(one), in_dims=(None, 0))(p0, batch)
        for n in acc:
            acc[n] += grads[n].pow(2).sum(dim=0).detach()
    return {n: a / total for n, a in acc.items()}


def output_hessian_samples(obj: Objective, b: int, y: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n samples s with E[s sᵀ] = H_out (the output loss Hessian at the reference), shape [n, *y.shape].

    MSE (mean of squares): H_out = 2/numel·I, so s = √(2/numel)·ε with ε standard normal.
    KL per row r of R: H_r = (diag p − p pᵀ)/R, so s_r = (e_c − p)/√R with c ~ Categorical(p).

    Raises:
        BackendError: for a task loss, whose output Hessian has no known factor here.
    """
    if obj.out_loss is mse and obj.is_distill:
        eps = torch.randn(n, *y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return eps * (2.0 / y.numel()) ** 0.5
    if obj.out_loss is kl and obj.is_distill:
        rows = y.reshape(-1, y.shape[-1])
        p = torch.softmax(rows.detach().double(), dim=-1).cpu()
        c = torch.multinomial(p, n, replacement=True, generator=generator)  # [R, n]
        onehot = torch.nn.functional.one_hot(c.T, rows.shape[-1]).double()  # [n, R, V]
        s = onehot - p
        mask = row_mask(y, obj.data.batches[b])
        count = rows.shape[0] if mask is None else float(mask.sum().clamp_min(1.0))
        if mask is not None:
            s = s * mask.cpu().double()[None, :, None]
        return (s / count**0.5).to(dtype=y.dtype, device=y.device).reshape(n, *y.shape)
    if obj.out_loss is cosine and obj.is_distill:
        # 1 - cos(y_r, t_r) at y = t: H_r = (I - t̂ t̂ᵀ)/(|t_r|² R); project a normal onto t̂'s complement
        rows = y.reshape(-1, y.shape[-1])
        norm = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = rows / norm
        eps = torch.randn(n, *rows.shape, generator=generator, dtype=y.dtype).to(y.device)
        s = (eps - (eps * unit).sum(-1, keepdim=True) * unit) / norm
        mask = row_mask(y, obj.data.batches[b])
        count = rows.shape[0] if mask is None else float(mask.sum().clamp_min(1.0))
        if mask is not None:
            s = s * mask[None, :, None]
        return (s / count**0.5).reshape(n, *y.shape)
    raise BackendError("diagonal_method='mc' needs self-distillation (mse, kl or cosine); use 'hutchinson' for a task loss")


def mc_ggn_diagonal(obj: Objective, samples: int, generator: torch.Generator, *, chunk: int = 8) -> Params:
    """diag(G) ≈ Σ_b w_b mean_s (J_bᵀ s)², s from ``output_hessian_samples``."""
    p0 = {n: obj.params0[n] for n in obj.names}
    acc = {n: torch.zeros_like(p) for n, p in p0.items()}
    for b, w in enumerate(obj.weights):
        y, pull = vjp(lambda p, b=b: obj.output(p, b), p0)
        s = output_hessian_samples(obj, b, y.detach(), samples, generator)
        for i in range(0, samples, chunk):
            (g,) = vmap(pull)(s[i : i + chunk])
            for n in acc:
                acc[n] += (w / samples) * g[n].detach().pow(2).sum(dim=0)
    return acc


def estimate_diagonal(obj: Objective, method: DiagonalMethod, *, probes: int, generator: torch.Generator,
                      kind: CurvatureKind = CurvatureKind.ggn, progress: bool = False) -> Params:
    """diag(H) over the objective's names; negatives from estimator noise clipped for the GGN."""
    if method is DiagonalMethod.auto:
        method = DiagonalMethod.mc if obj.is_distill and kind is CurvatureKind.ggn else DiagonalMethod.hutchinson
    if method is DiagonalMethod.fisher:
        return empirical_fisher(obj)
    if method is DiagonalMethod.mc:
        return mc_ggn_diagonal(obj, probes, generator)
    hvp = ggn_hvp(obj) if kind is CurvatureKind.ggn else hessian_hvp(obj)
    diag = hutchinson_diagonal(hvp, obj.params0, probes, generator, progress=progress)
    if kind is CurvatureKind.ggn:
        diag = {n: d.clamp_min(0.0) for n, d in diag.items()}
    return diag


class DiagonalCurvature:
    """δᵀ diag(H) δ."""

    def __init__(self, diag: Params) -> None:
        self.diag = diag

    def quad(self, deltas: Mapping[str, Tensor]) -> Tensor:
        total = None
        for name, d in deltas.items():
            q = (d.pow(2) * self.diag[name]).reshape(d.shape[0], -1).sum(dim=1)
            total = q if total is None else total + q
        assert total is not None
        return total

    def quad_pairs(self, family: FamilyPairs) -> Tensor:
        """Every pair of a family from single-layer directions: the form has no cross-layer blocks."""
        return block_pair_quads(self.quad, family)
