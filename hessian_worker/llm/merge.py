"""The shared value of a class of a streamed decoder, from the statistics of the analysis.

The layerwise merge W* = (Σ W_k A_k)(Σ A_k)⁻¹ needs each member's input covariance A_k. A streamed
analysis already holds them as K-FAC input sums: whole (``rank=None``: the merge is exactly the
in-memory one) or as a sketch, whose Nyström eigenpairs plus the mean of the rest of the spectrum
(``kfac.input_factor``) stand in for A_k. Members are read from the checkpoint one at a time and
the sums accumulated, so a class never has all its covariances in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hessian_worker.curvature.kfac import FactorStats, InputFactor, input_factor
from hessian_worker.curvature.layerwise import solve_merge
from hessian_worker.errors import BackendError
from hessian_worker.merge import Merge, merge_weights

STREAMED_MERGES = (Merge.layerwise, Merge.mean, Merge.representative)


def covariance(stats: FactorStats, rank: int | None) -> Tensor:
    """A = Σ x xᵀ / N of one layer: exact from whole sums, else from the sketch's top ``rank``
    eigenpairs plus the bulk value on the rest of the space."""
    if stats.omega is None:
        return stats.a / max(stats.tokens, 1)
    f = input_factor(stats, rank)
    eye = torch.eye(f.vectors.shape[0], dtype=f.vectors.dtype, device=f.vectors.device)
    return (f.vectors * f.weights) @ f.vectors.T + f.bulk * eye


def difference(total: FactorStats, part: FactorStats) -> FactorStats:
    """The sums over the samples of ``total`` that are not in ``part`` (sums are additive; the same
    test matrix is used by both)."""
    return FactorStats(total.a - part.a, total.a_trace - part.a_trace, total.tokens - part.tokens, None, total.omega)


def check_merge(merge: Merge) -> None:
    """Raises BackendError for a merge a streamed decoder cannot make."""
    if merge not in STREAMED_MERGES:
        raise BackendError(f"merge={merge.value!r} needs the whole model's diagonal curvature; a streamed decoder "
                           f"merges by {', '.join(m.value for m in STREAMED_MERGES)} (layerwise is the default)")


def merged_value(names: Sequence[str], weight_of: Callable[[str], Tensor], merge: Merge,
                 stats: Mapping[str, FactorStats] | None, *, rank: int | None, damping: float,
                 factor_of: Callable[[str], InputFactor] | None = None) -> Tensor:
    """The shared tensor of the class ``names`` ([out, in] linear weights), in the statistics' dtype
    (float32, or float64 for a float64 model) for the layerwise merge, else in the weights' dtype.
    ``factor_of`` may pass each layer's input factor formed already (it is the same for every class)."""
    check_merge(merge)
    if merge is not Merge.layerwise:
        return merge_weights([weight_of(n) for n in names], merge)
    if stats is None:
        raise BackendError("the layerwise merge needs the layers' input statistics")
    if all(stats[n].omega is None for n in names):
        return _dense_merge(names, weight_of, stats, damping)
    factor_of = factor_of or (lambda n: input_factor(stats[n], rank))
    return low_rank_merge([weight_of(n) for n in names], [factor_of(n) for n in names], damping)


def _dense_merge(names: Sequence[str], weight_of: Callable[[str], Tensor], stats: Mapping[str, FactorStats],
                 damping: float) -> Tensor:
    """Whole covariances: accumulated member by member, one solve (the in-memory merge exactly)."""
    g_sum = num = w_sum = None
    for name in names:
        g = covariance(stats[name], None)
        w = weight_of(name).to(device=g.device, dtype=g.dtype)
        g_sum = g if g_sum is None else g_sum + g
        num = w @ g if num is None else num + w @ g
        w_sum = w if w_sum is None else w_sum + w
        del g, w
    assert g_sum is not None and num is not None and w_sum is not None
    return solve_merge(g_sum, num, damping, mean=w_sum / len(names))


def low_rank_merge(weights: Sequence[Tensor], factors: Sequence[InputFactor], damping: float) -> Tensor:
    """W* = (Σ W_k A_k)(Σ A_k + λI)⁻¹ with each A_k = σ_k I + U_k C_k U_kᵀ (C_k = diag(λ_k − σ_k)),
    without forming a d x d matrix: Σ A_k + λI = tI + V C Vᵀ (V = [U_1 … U_m]) is inverted by the
    push-through identity (tI + VCVᵀ)⁻¹ = (I − V (tI + C VᵀV)⁻¹ C Vᵀ) / t, a system of m·rank
    unknowns. λ is ``damping`` times the mean diagonal of Σ A_k and pulls toward the members' mean,
    as in ``solve_merge``."""
    dtype = factors[0].vectors.dtype
    dim = factors[0].vectors.shape[0]
    v = torch.cat([f.vectors for f in factors], dim=1)
    c = torch.cat([f.weights for f in factors])
    trace = sum(f.bulk * dim + float(f.weights.sum()) for f in factors)
    lam = damping * max(trace / dim, 1e-30)
    t = sum(f.bulk for f in factors) + lam
    num = None
    for w, f in zip(weights, factors, strict=True):
        w = w.to(device=v.device, dtype=dtype)
        term = f.bulk * w + ((w @ f.vectors) * f.weights) @ f.vectors.T + (lam / len(weights)) * w
        num = term if num is None else num + term
        del w, term
    assert num is not None
    eye = torch.eye(v.shape[1], dtype=dtype, device=v.device)
    # Y = (num V)(tI + C VᵀV)⁻¹, solved as (tI + VᵀV C) Yᵀ = (num V)ᵀ: [out, m·rank]
    inner = torch.linalg.solve(t * eye + (v.T @ v) * c[None, :], (num @ v).T).T
    return (num - (inner * c) @ v.T) / t
