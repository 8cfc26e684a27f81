"""Finding, replacing and rebuilding the linear layers a factored scheme takes over.

A factored module (BasisLinear, RelaxedLinear) subclasses ``FactoredLinear``: members of one class
hold the SAME shared Parameter object, so ``model.parameters()``, healing's optimizer and the
de-duplicating save see it once. The layout (per module path: shapes, rank, which module's shared
Parameter it holds) is what a fresh copy of the original architecture needs to rebuild the sharing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from hessian_worker.curvature.layerwise import linear_modules
from hessian_worker.errors import DiscoveryError, PlanError
from solver.schema import Scheme

WEIGHT_SUFFIX = ".weight"


class FactoredLinear(nn.Module):
    """A linear layer stored as factors, one of them shared by its class (``shared_factor``).

    Subclasses keep the replaced layer's input and output shapes and expose the dense [out, in]
    ``weight`` (not a Parameter) for code that reads it.
    """

    scheme: Scheme  # the scheme that installs it

    def shared_factor(self) -> nn.Parameter:
        """The Parameter every member of the class holds (the same object)."""
        raise NotImplementedError


def module_path(weight_name: str) -> str:
    """``blocks.0.fc.weight`` -> ``blocks.0.fc``.

    Raises:
        PlanError: the name is not a ``.weight``.
    """
    if not weight_name.endswith(WEIGHT_SUFFIX):
        raise PlanError(f"factored schemes replace linear layers; {weight_name!r} is not a '.weight'")
    return weight_name[: -len(WEIGHT_SUFFIX)]


def dense_weights(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Name -> detached weight as [out, in] (Conv1D transposed), for Linear/Conv1D layers only.

    Raises:
        PlanError: a name is already a factored layer, or not a linear layer's weight.
    """
    modules = dict(model.named_modules())
    done = [n for n in names if isinstance(modules.get(module_path(n)), FactoredLinear)]
    if done:
        kinds = sorted({modules[module_path(n)].scheme.value for n in done})
        raise PlanError(f"these layers are already {'/'.join(kinds)} layers (apply a plan once): {done[:5]}")
    try:
        layers = linear_modules(model, names)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    return {n: (m.weight.detach().T if t else m.weight.detach()) for n, (m, t) in layers.items()}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Puts ``new`` at ``path`` (a ModuleList index works too) and returns the module it replaced."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


# (the class's shared Parameter, the layer's own Parameters, the layer's bias) -> the new module
Build = Callable[[nn.Parameter, list[nn.Parameter], nn.Parameter | None], FactoredLinear]


def install_shared(model: nn.Module, names: Sequence[str], shared: Tensor, owns: Sequence[Sequence[Tensor]],
                   build: Build) -> list[FactoredLinear]:
    """Replaces each named layer with ``build(shared, its own factors, its bias)``, every member
    holding ONE shared Parameter. The new Parameters take the replaced weights' dtype and device, and
    each its layer's ``requires_grad`` (the shared one the first layer's)."""
    layers = linear_modules(model, names)
    first = layers[names[0]][0].weight

    def parameter(t: Tensor, requires_grad: bool) -> nn.Parameter:
        return nn.Parameter(t.to(dtype=first.dtype, device=first.device).contiguous(), requires_grad=requires_grad)

    common = parameter(shared, first.requires_grad)
    out = []
    for name, own in zip(names, owns, strict=True):
        module = layers[name][0]
        new = build(common, [parameter(t, module.weight.requires_grad) for t in own], module.bias)
        replace_module(model, module_path(name), new)
        out.append(new)
    return out


def factored_layout(model: nn.Module, kind: type[FactoredLinear], owner_key: str,
                    spec: Callable[[Any], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every module of ``kind`` as {path: spec(module) + {owner_key: path of the first module holding
    the same shared Parameter}}."""
    owner: dict[int, str] = {}
    layout = {}
    for path, module in model.named_modules():
        if isinstance(module, kind):
            owner.setdefault(id(module.shared_factor()), path)
            layout[path] = {**spec(module), owner_key: owner[id(module.shared_factor())]}
    return layout


def saved_layers(model: nn.Module, layout: Mapping[str, Mapping[str, Any]],
                 what: str) -> Iterator[tuple[str, Mapping[str, Any], nn.Module, Tensor]]:
    """(path, spec, module, its [out, in] weight) for every layer of a saved layout, checked against
    the model.

    Raises:
        PlanError: a path is missing, not a linear layer, or of another shape than saved.
    """
    names = [f"{path}{WEIGHT_SUFFIX}" for path in layout]
    try:
        layers = linear_modules(model, names)
    except ValueError as exc:
        raise PlanError(f"saved {what} layers do not fit this model: {exc}") from exc
    for path, spec in layout.items():
        module, transposed = layers[f"{path}{WEIGHT_SUFFIX}"]
        w = module.weight.T if transposed else module.weight
        if tuple(w.shape) != (spec["out"], spec["in"]):
            raise PlanError(f"{path} is {tuple(w.shape)} here but {(spec['out'], spec['in'])} when saved")
        yield path, spec, module, w


def has_factored_layers(model: nn.Module, kind: type[FactoredLinear] = FactoredLinear) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def require_known_families(rank: object, known: Collection[str], scheme: Scheme) -> None:
    """Raises DiscoveryError when a per-family rank setting (a dict) names a family not in ``known``."""
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(known))
        if unknown:
            raise DiscoveryError(f"{scheme.value} rank names unknown families {unknown}; known: {sorted(known)}")
