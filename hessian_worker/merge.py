"""The shared value of a class: mean, representative, or curvature-weighted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hessian_worker.errors import PlanError
from hessian_worker.options import Merge


def merge_weights(
    weights: Sequence[Tensor],
    merge: Merge,
    *,
    diag: Sequence[Tensor] | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """Merged tensor of one class (layerwise merging lives in curvature.layerwise).

    ``eps`` (relative to the mean weight) keeps elements with zero curvature everywhere at their mean.
    """
    if merge is Merge.representative:
        return weights[0].clone()
    if merge is Merge.mean:
        return torch.stack(list(weights)).mean(dim=0)
    if merge is Merge.curvature:
        if diag is None:
            raise PlanError("curvature merge needs diagonal curvature weights")
        f = torch.stack(list(diag)).clamp_min(0.0)
        f = f + eps * float(f.mean().clamp_min(1e-30))
        w = torch.stack(list(weights))
        return (f * w).sum(dim=0) / f.sum(dim=0)
    raise PlanError(f"merge {merge.value!r} needs layer covariances; use apply_plan")


def plan_groups(groups: Sequence[Sequence[str]], params: Mapping[str, Tensor]) -> list[list[str]]:
    """The groups that really share (two or more members), checked against the model.

    Raises:
        PlanError: a name is unknown, listed twice, or a group mixes shapes.
    """
    seen: set[str] = set()
    out = []
    for group in groups:
        unknown = [n for n in group if n not in params]
        if unknown:
            raise PlanError(f"plan names parameters the model does not have: {unknown[:5]}")
        dup = [n for n in group if n in seen]
        if dup:
            raise PlanError(f"plan lists parameters in more than one group: {dup[:5]}")
        seen.update(group)
        shapes = {tuple(params[n].shape) for n in group}
        if len(shapes) > 1:
            raise PlanError(f"group {list(group)[:3]}... mixes shapes {sorted(shapes)}; only one shape can be tied")
        if len(group) >= 2:
            out.append(list(group))
    return out
