"""Pure-function factories: quadratic forms and Hessian-vector products of an Objective.

GGN forms use forward mode only: v = Jδ by one JVP, then vᵀ H_out v with H_out the Hessian of the
output loss (a second JVP of its gradient at the output, exact for any output loss). Full-Hessian
forms use forward-over-reverse (jvp of grad), which needs double-backward support in the model;
where an operator's forward-over-reverse rule is broken (PyTorch issue #123996: F.mse_loss with
reduction='mean' and a target without tangent fails with "ZeroTensors are immutable"), they fall
back to reverse-over-reverse (vjp of grad), the same H·v for the symmetric Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from hessian_worker.curvature.base import map_products
from hessian_worker.objective import Objective, Params


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def _output_hvp(obj: Objective, b: int, y: Tensor, v: Tensor) -> Tensor:
    """H_out v: the output loss's Hessian at y applied to v."""
    return jvp(grad(lambda z: obj.loss_on_output(z, b)), (y,), (v,))[1]


def ggn_quad_form(obj: Objective) -> Callable[[Params], Tensor]:
    """δ -> δᵀGδ, G = Σ_b w_b J_bᵀ H_out,b J_b. Only the names in δ are differentiated."""

    def quad(delta: Params) -> Tensor:
        p0 = {n: obj.params0[n] for n in delta}
        total = torch.zeros((), dtype=next(iter(p0.values())).dtype, device=next(iter(p0.values())).device)
        for b, w in enumerate(obj.weights):
            y, jv = jvp(lambda p, b=b: obj.output(p, b), (p0,), (delta,))
            total = total + w * (jv * _output_hvp(obj, b, y, jv)).sum()
        return total

    return quad


def _hessian_vector(loss: Callable[[Params], Tensor], p0: Params, v: Params) -> Params:
    """H·v of a scalar function at p0: forward-over-reverse, else reverse-over-reverse."""
    try:
        return jvp(grad(loss), (p0,), (v,))[1]
    except RuntimeError as exc:
        if "ZeroTensors are immutable" not in str(exc):
            raise
        return vjp(grad(loss), p0)[1](v)[0]


def hessian_quad_form(obj: Objective) -> Callable[[Params], Tensor]:
    """δ -> δᵀHδ with the full Hessian of the calibration loss (forward-over-reverse)."""

    def quad(delta: Params) -> Tensor:
        p0 = {n: obj.params0[n] for n in delta}
        total = torch.zeros((), dtype=next(iter(p0.values())).dtype, device=next(iter(p0.values())).device)
        for b, w in enumerate(obj.weights):
            hd = _hessian_vector(lambda p, b=b: obj.batch_loss(p, b), p0, delta)
            total = total + w * _dot(hd, delta)
        return total

    return quad


def batch_ggn_hvp(obj: Objective, b: int, names: list[str]) -> Callable[[Params], Params]:
    """v -> J_bᵀ H_out,b J_b v for batch ``b`` over ``names``.

    The batch's forward and its graph (the VJP) are built here, once, and every v reuses them; built
    inside a vmapped function instead, they would be rebuilt per call at several times the cost of
    the forward (MiniLM, 12 vectors in two vmap calls: 2.07 s -> 1.68 s).
    """
    p0 = {n: obj.params0[n] for n in names}

    def f(p: Params) -> Tensor:
        return obj.output(p, b)

    y, pull = vjp(f, p0)

    def hvp(v: Params) -> Params:
        jv = jvp(f, (p0,), (v,))[1]
        return pull(_output_hvp(obj, b, y, jv))[0]

    return hvp


def ggn_hvp(obj: Objective) -> Callable[[Params], Params]:
    """v -> Gv over the names in v (one JVP, one output HVP, one VJP per batch)."""

    def hvp(v: Params) -> Params:
        out = {n: torch.zeros_like(t) for n, t in v.items()}
        for b, w in enumerate(obj.weights):
            g = batch_ggn_hvp(obj, b, list(v))(v)
            for n in out:
                out[n] = out[n] + w * g[n]
        return out

    return hvp


def ggn_matmat(obj: Objective, shapes: Mapping[str, torch.Size], chunk: int,
               dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor]:
    """rows [n, d] -> G rows (flat over ``shapes``, in ``dtype``), batch by batch: each batch's
    forward and graph are built once for all n rows (``batch_ggn_hvp``), ``chunk`` rows per vmap call.
    Rows are cast to the objective's dtype (it may run in a lower precision than the rows)."""
    names = list(shapes)
    low = obj.params0[names[0]].dtype

    def matmat(rows: Tensor) -> Tensor:
        out = None
        for b, w in enumerate(obj.weights):
            op = batch_ggn_hvp(obj, b, names)
            out = map_products(lambda v, op=op: op({n: t.to(low) for n, t in v.items()}), rows, shapes, chunk,
                               dtype, out=out, weight=w)
        assert out is not None
        return out

    return matmat


def hessian_hvp(obj: Objective) -> Callable[[Params], Params]:
    """v -> Hv with the full Hessian (forward-over-reverse)."""

    def hvp(v: Params) -> Params:
        p0 = {n: obj.params0[n] for n in v}
        out = {n: torch.zeros_like(t) for n, t in v.items()}
        for b, w in enumerate(obj.weights):
            hv = _hessian_vector(lambda p, b=b: obj.batch_loss(p, b), p0, v)
            for n in out:
                out[n] = out[n] + w * hv[n]
        return out

    return hvp


def gradient(obj: Objective, names: list[str]) -> Params:
    """∇L at the reference over ``names`` (zero for self-distillation; kept for task losses)."""
    p0 = {n: obj.params0[n] for n in names}
    return {n: g.detach() for n, g in grad(obj.loss)(p0).items()}
