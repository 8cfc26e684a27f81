"""RelaxedLinear: a linear layer whose weight is a class-shared tensor plus its own low-rank correction.

Members of one class hold the SAME ``shared`` Parameter object (like tied weights), so
``model.parameters()`` lists it once: the unique-parameter count, healing's optimizer and the
de-duplicating save all see one S_c per class, and healing trains it together with every member's
factors while the sharing stays (one tensor, one gradient summed over the members).

A layer of an ``alone`` family holds no S (``shared`` is None): y = A (B x) + b, per-layer low rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hessian_worker.errors import PlanError
from hessian_worker.factored.layers import (
    FactoredLinear,
    factored_layout,
    has_factored_layers,
    install_shared,
    replace_module,
    saved_layers,
)
from solver.schema import Scheme


class RelaxedLinear(FactoredLinear):
    """y = S x + A (B x) + b: S [out, in] shared by the class, A [out, r] and B [r, in] the layer's
    own correction, the bias b the layer's own; with ``shared`` None (a layer alone) y = A (B x) + b.

    Replaces an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose [in, out] weight is transposed first)
    with the same input and output shapes.
    """

    def __init__(self, shared: nn.Parameter | None, left: nn.Parameter, right: nn.Parameter,
                 bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or (shared is not None and (
                shared.dim() != 2 or left.shape[0] != shared.shape[0] or right.shape[1] != shared.shape[1])):
            kept = "no shared tensor" if shared is None else f"shared {tuple(shared.shape)}"
            raise PlanError(f"{kept}, left {tuple(left.shape)} and right {tuple(right.shape)} "
                            "do not make an [out, in] weight plus an [out, r]·[r, in] correction")
        if bias is not None and tuple(bias.shape) != (left.shape[0],):
            raise PlanError(f"bias {tuple(bias.shape)} does not fit {left.shape[0]} outputs")
        if shared is None:
            self.register_parameter("shared", None)
        else:
            self.shared = shared
        self.left = left
        self.right = right
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    scheme = Scheme.relaxed

    def shared_factor(self) -> nn.Parameter:
        """S, or for a layer alone its own left factor (a class of one shares with itself)."""
        return self.left if self.shared is None else self.shared

    @property
    def alone(self) -> bool:
        """True when the layer keeps no shared tensor."""
        return self.shared is None

    @property
    def in_features(self) -> int:
        return int(self.right.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.left.shape[0])

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def weight(self) -> Tensor:
        """The dense [out, in] weight S + A·B, for code that reads ``.weight`` (not a Parameter)."""
        own = self.left @ self.right
        return own if self.shared is None else self.shared + own

    def forward(self, x: Tensor) -> Tensor:
        own = F.linear(F.linear(x, self.right), self.left, self.bias if self.shared is None else None)
        return own if self.shared is None else F.linear(x, self.shared, self.bias) + own

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}" + (", alone" if self.shared is None else ""))


def has_relaxed_layers(model: nn.Module) -> bool:
    return has_factored_layers(model, RelaxedLinear)


def install_class(model: nn.Module, names: Sequence[str], shared: Tensor, left: Sequence[Tensor],
                  right: Sequence[Tensor]) -> list[RelaxedLinear]:
    """Replaces each named layer with a RelaxedLinear holding ONE shared Parameter; biases are kept.

    The new Parameters take each replaced weight's dtype, device and ``requires_grad``.
    """
    return install_shared(model, names, shared, list(zip(left, right, strict=True)),
                          lambda s, own, bias: RelaxedLinear(s, own[0], own[1], bias))


def install_alone(model: nn.Module, name: str, left: Tensor, right: Tensor) -> RelaxedLinear:
    """Replaces the named layer with a RelaxedLinear of no shared tensor (y = A (B x) + b); bias kept."""
    return install_shared(model, [name], left, [[right]],
                          lambda a, own, bias: RelaxedLinear(None, a, own[0], bias))[0]


def relaxed_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every RelaxedLinear as {path: {rank, out, in, bias, shared}} with ``shared`` the path of the
    first module holding the same S Parameter (what a fresh model needs to rebuild the sharing); a
    layer alone adds ``alone: true`` (its ``shared`` is its own path)."""
    return factored_layout(model, RelaxedLinear, "shared", lambda m: {
        "rank": m.rank, "out": m.out_features, "in": m.in_features, "bias": m.bias is not None,
        **({"alone": True} if m.alone else {})})


def rebuild(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> None:
    """Replaces the layout's linear layers of a fresh model with RelaxedLinear modules of the saved
    ranks and sharing (values are placeholders until the saved tensors are loaded).

    Raises:
        PlanError: a path is missing, not a linear layer, or of another shape than saved.
    """
    shared: dict[str, nn.Parameter] = {}
    for path, spec, module, w in saved_layers(model, layout, "relaxed"):
        d_out, d_in, rank = spec["out"], spec["in"], spec["rank"]
        key = spec["shared"]
        if key not in shared and not spec.get("alone"):
            shared[key] = nn.Parameter(w.new_zeros(d_out, d_in), requires_grad=w.requires_grad)
        left = nn.Parameter(w.new_zeros(d_out, rank), requires_grad=w.requires_grad)
        right = nn.Parameter(w.new_zeros(rank, d_in), requires_grad=w.requires_grad)
        replace_module(model, path, RelaxedLinear(None if spec.get("alone") else shared[key], left, right,
                                                  module.bias if spec["bias"] else None))
