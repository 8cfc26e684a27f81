"""RelaxedLinear: a linear layer whose weight is a class-shared tensor plus its own low-rank correction.

Members of one class hold the SAME ``shared`` Parameter object (like tied weights), so
``model.parameters()`` lists it once: the unique-parameter count, healing's optimizer and the
de-duplicating save all see one S_c per class, and healing trains it together with every member's
factors while the sharing stays (one tensor, one gradient summed over the members).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hessian_worker.basis.modules import WEIGHT_SUFFIX, module_path, replace_module
from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.errors import PlanError


class RelaxedLinear(nn.Module):
    """y = S x + A (B x) + b: S [out, in] shared by the class, A [out, r] and B [r, in] the layer's
    own correction, the bias b the layer's own.

    Replaces an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose [in, out] weight is transposed first)
    with the same input and output shapes.
    """

    def __init__(self, shared: nn.Parameter, left: nn.Parameter, right: nn.Parameter,
                 bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if shared.dim() != 2 or left.dim() != 2 or right.dim() != 2 or left.shape[0] != shared.shape[0] \
                or right.shape[1] != shared.shape[1] or left.shape[1] != right.shape[0]:
            raise PlanError(f"shared {tuple(shared.shape)}, left {tuple(left.shape)} and right {tuple(right.shape)} "
                            "do not make an [out, in] weight plus an [out, r]·[r, in] correction")
        if bias is not None and tuple(bias.shape) != (shared.shape[0],):
            raise PlanError(f"bias {tuple(bias.shape)} does not fit {shared.shape[0]} outputs")
        self.shared = shared
        self.left = left
        self.right = right
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    @property
    def in_features(self) -> int:
        return int(self.shared.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.shared.shape[0])

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def weight(self) -> Tensor:
        """The dense [out, in] weight S + A·B, for code that reads ``.weight`` (not a Parameter)."""
        return self.shared + self.left @ self.right

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.shared, self.bias) + F.linear(F.linear(x, self.right), self.left)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def has_relaxed_layers(model: nn.Module) -> bool:
    return any(isinstance(m, RelaxedLinear) for m in model.modules())


def install_class(model: nn.Module, names: Sequence[str], shared: Tensor, left: Sequence[Tensor],
                  right: Sequence[Tensor]) -> list[RelaxedLinear]:
    """Replaces each named layer with a RelaxedLinear holding ONE shared Parameter; biases are kept.

    The new Parameters take each replaced weight's dtype, device and ``requires_grad``.
    """
    layers = linear_modules(model, names)
    first = layers[names[0]][0].weight
    common = nn.Parameter(shared.to(dtype=first.dtype, device=first.device).contiguous(),
                          requires_grad=first.requires_grad)
    out = []
    for name, a, b in zip(names, left, right, strict=True):
        module = layers[name][0]

        def own(t: Tensor, module: nn.Module = module) -> nn.Parameter:
            return nn.Parameter(t.to(dtype=first.dtype, device=first.device).contiguous(),
                                requires_grad=module.weight.requires_grad)

        new = RelaxedLinear(common, own(a), own(b), module.bias)
        replace_module(model, module_path(name), new)
        out.append(new)
    return out


def relaxed_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every RelaxedLinear as {path: {rank, out, in, bias, shared}} with ``shared`` the path of the
    first module holding the same S Parameter (what a fresh model needs to rebuild the sharing)."""
    owner: dict[int, str] = {}
    layout = {}
    for path, module in model.named_modules():
        if isinstance(module, RelaxedLinear):
            owner.setdefault(id(module.shared), path)
            layout[path] = {"rank": module.rank, "out": module.out_features, "in": module.in_features,
                            "bias": module.bias is not None, "shared": owner[id(module.shared)]}
    return layout


def rebuild(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> None:
    """Replaces the layout's linear layers of a fresh model with RelaxedLinear modules of the saved
    ranks and sharing (values are placeholders until the saved tensors are loaded).

    Raises:
        PlanError: a path is missing, not a linear layer, or of another shape than saved.
    """
    names = [f"{path}{WEIGHT_SUFFIX}" for path in layout]
    try:
        layers = linear_modules(model, names)
    except ValueError as exc:
        raise PlanError(f"saved relaxed layers do not fit this model: {exc}") from exc
    shared: dict[str, nn.Parameter] = {}
    for path, spec in layout.items():
        module, transposed = layers[f"{path}{WEIGHT_SUFFIX}"]
        w = module.weight.T if transposed else module.weight
        d_out, d_in, rank = spec["out"], spec["in"], spec["rank"]
        if tuple(w.shape) != (d_out, d_in):
            raise PlanError(f"{path} is {tuple(w.shape)} here but {(d_out, d_in)} when saved")
        key = spec["shared"]
        if key not in shared:
            shared[key] = nn.Parameter(w.new_zeros(d_out, d_in), requires_grad=w.requires_grad)
        left = nn.Parameter(w.new_zeros(d_out, rank), requires_grad=w.requires_grad)
        right = nn.Parameter(w.new_zeros(rank, d_in), requires_grad=w.requires_grad)
        replace_module(model, path, RelaxedLinear(shared[key], left, right, module.bias if spec["bias"] else None))
