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

from hessian_worker.curvature.kfac import FactorStats, input_factor
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
                 stats: Mapping[str, FactorStats] | None, *, rank: int | None, damping: float) -> Tensor:
    """The shared tensor of the class ``names`` ([out, in] linear weights), in the statistics' dtype
    (float32, or float64 for a float64 model) for the layerwise merge, else in the weights' dtype."""
    check_merge(merge)
    if merge is not Merge.layerwise:
        return merge_weights([weight_of(n) for n in names], merge)
    if stats is None:
        raise BackendError("the layerwise merge needs the layers' input statistics")
    g_sum = num = None
    for name in names:
        g = covariance(stats[name], rank)
        w = weight_of(name).to(device=g.device, dtype=g.dtype)
        g_sum = g if g_sum is None else g_sum + g
        num = w @ g if num is None else num + w @ g
        del g, w
    assert g_sum is not None and num is not None
    return solve_merge(g_sum, num, damping)
