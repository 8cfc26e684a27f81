"""BasisLinear: a linear layer whose weight is a class-shared basis times its own coefficients.

Members of one class hold the SAME ``basis`` Parameter object (like tied weights), so
``model.parameters()`` lists it once: the unique-parameter count, the optimizer in healing and the
de-duplicating save all see one basis per class.
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
from solver.schema import Scheme, Side


class BasisLinear(FactoredLinear):
    """y = B (C x) + b (side ``out``: B [out, r] shared, C [r, in] own) or y = C (B x) + b (side
    ``in``: B [r, in] shared, C [out, r] own); the bias b is always the layer's own.

    Replaces an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose [in, out] weight is transposed first)
    with the same input and output shapes; computing through the rank-r bottleneck is also cheaper.
    """

    def __init__(
        self,
        basis: nn.Parameter,
        coef: nn.Parameter,
        bias: nn.Parameter | None = None,
        *,
        side: Side | str = Side.out,
    ) -> None:
        super().__init__()
        self.side = Side(side)
        first, second = (coef, basis) if self.side is Side.out else (basis, coef)
        if basis.dim() != 2 or coef.dim() != 2 or second.shape[1] != first.shape[0]:
            raise PlanError(
                f"basis {tuple(basis.shape)} and coefficients {tuple(coef.shape)} do not chain "
                f"on side {self.side.value!r}"
            )
        if bias is not None and tuple(bias.shape) != (second.shape[0],):
            raise PlanError(f"bias {tuple(bias.shape)} does not fit {second.shape[0]} outputs")
        self.basis = basis
        self.coef = coef
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    scheme = Scheme.basis

    def shared_factor(self) -> nn.Parameter:
        return self.basis

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(first, second): x ↦ second·(first·x)."""
        return (self.coef, self.basis) if self.side is Side.out else (self.basis, self.coef)

    @property
    def in_features(self) -> int:
        return int(self._factors()[0].shape[1])

    @property
    def out_features(self) -> int:
        return int(self._factors()[1].shape[0])

    @property
    def rank(self) -> int:
        return int(self._factors()[0].shape[0])

    @property
    def weight(self) -> Tensor:
        """The dense [out, in] weight (B·C, or C·B on side in), for code that reads ``.weight``
        (not a Parameter)."""
        first, second = self._factors()
        return second @ first

    def forward(self, x: Tensor) -> Tensor:
        first, second = self._factors()
        return F.linear(F.linear(x, first), second, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"side={self.side.value}, bias={self.bias is not None}"
        )


def install_class(
    model: nn.Module,
    names: Sequence[str],
    basis: Tensor,
    coefs: Sequence[Tensor],
    side: Side | str = Side.out,
) -> list[BasisLinear]:
    """Replaces each named layer with a BasisLinear sharing ONE basis Parameter; biases are kept.

    The new Parameters take each replaced weight's dtype, device and ``requires_grad``.
    """
    return install_shared(model, names, basis, [[c] for c in coefs],
                          lambda b, own, bias: BasisLinear(b, own[0], bias, side=side))


def basis_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every BasisLinear as {path: {rank, out, in, bias, side, basis}} with ``basis`` the path of the
    first module holding the same basis Parameter (what a fresh model needs to rebuild the sharing)."""
    return factored_layout(model, BasisLinear, "basis", lambda m: {
        "rank": m.rank, "out": m.out_features, "in": m.in_features, "bias": m.bias is not None,
        "side": m.side.value})


def has_basis_layers(model: nn.Module) -> bool:
    return has_factored_layers(model, BasisLinear)


def rebuild(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> None:
    """Replaces the layout's linear layers of a fresh model with BasisLinear modules of the saved
    ranks, sides and sharing (values are placeholders until the saved tensors are loaded). A layout
    without ``side`` (saved before sides existed) is side ``out``.

    Raises:
        PlanError: a path is missing, not a linear layer, or of another shape than saved.
    """
    bases: dict[str, nn.Parameter] = {}
    for path, spec, module, w in saved_layers(model, layout, "basis"):
        side = Side(spec.get("side", Side.out.value))
        d_out, d_in, rank = spec["out"], spec["in"], spec["rank"]
        basis_shape, coef_shape = ((d_out, rank), (rank, d_in))
        if side is Side.in_:
            basis_shape, coef_shape = (rank, d_in), (d_out, rank)
        key = spec["basis"]
        if key not in bases:
            bases[key] = nn.Parameter(w.new_zeros(*basis_shape), requires_grad=w.requires_grad)
        coef = nn.Parameter(w.new_zeros(*coef_shape), requires_grad=w.requires_grad)
        bias = module.bias if spec["bias"] else None
        replace_module(model, path, BasisLinear(bases[key], coef, bias, side=side))
