"""Which merge a class's shared tensor gets by default.

The layerwise closed form W* = (Σ W_k G_k)(Σ G_k)⁻¹ uses each layer's full input covariance G_k,
so it is the best merge when the data pins G_k down, and a poor one when it does not: on MiniLM
at 84% of the shareable parameters (one plan, embedding cosine on held-out sentences) it keeps
0.922 with ~2,200 calibration tokens for 1,536-wide inputs, 0.879 with ~1,000, but 0.492 with ~240,
where the per-element curvature merge Σ F_k⊙W_k / Σ F_k keeps 0.834. So: layerwise when the data
holds at least as many input rows as the widest tied layer has inputs (a full-rank covariance),
otherwise curvature.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.data import Calibration
from hessian_worker.errors import BackendError
from hessian_worker.merge import Merge


def input_rows(calib: Calibration) -> int:
    """Rows a linear layer sees over the data: tokens under the attention mask, the rows of
    float inputs (every dimension but the features), or every token id of integer inputs."""
    total = 0
    for batch in calib.batches:
        if "attention_mask" in batch:
            total += int(batch["attention_mask"].sum())
            continue
        x = next(iter(batch.values()))
        total += x.numel() // x.shape[-1] if x.is_floating_point() else x.numel()
    return total


def input_width(model: nn.Module, names: Sequence[str]) -> int | None:
    """The widest input among the named weights (None when one is not a Linear/Conv1D weight)."""
    try:
        layers = linear_modules(model, names)
    except BackendError:
        return None
    widths = [m.weight.shape[0] if transposed else m.weight.shape[1] for m, transposed in layers.values()]
    return max(widths, default=None)


def default_merge(model: nn.Module, calib: Calibration, names: Sequence[str]) -> Merge:
    """Layerwise when ``calib`` gives every named layer a full-rank input covariance, else
    curvature (see the module docstring for the measurements behind the rule)."""
    width = input_width(model, names)
    if width is None or input_rows(calib) < width:
        return Merge.curvature
    return Merge.layerwise
